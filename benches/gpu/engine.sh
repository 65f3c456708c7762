#!/usr/bin/env bash
# The engine comparison (issue 8), run on the GPU host from the repository root of a copy of the
# working tree, everything side by side in one call. Carried: target/cuda-dist (peftpipe.xz and the
# test binaries, from benches/gpu/build.sh), gpu-run/ (configs + fast_lora_bench.py, from build.sh)
# and .whl/ (the anchors' wheels: bash ../shared/gpu/fetch-anchor-wheels.sh .whl).
#
# usage: bash benches/gpu/engine.sh PART[,PART...]   (each call must fit the device's 10 minutes)
#   tests    the CUDA test binaries (PEFTPIPE_TEST_DEVICE=cuda)
#   real     lora-stories on cuda and on cpu (loss curves, eval), qlora-stories on cuda
#   real-f32 lora-stories on cuda and cpu in f32 and bf16 (train and evaluate), |dloss| and perplexity
#            against cpu f32 (issue 8 item 6)
#   offload  1B checkpointing off / on / offload at 8x512 and 2x2048, beside Unsloth's offloaded
#            checkpointing
#   8b-d     8B at 1x4096 beside PEFT's default and Unsloth; 1x16384 checkpointed and offloaded
#   qlora-8b QLoRA on the 8B shape at 1x4096 beside PEFT + bitsandbytes and Unsloth's QLoRA
#   qlora-8b-u the same beside Unsloth's QLoRA only (a shorter call)
#   launches the 1B table under kprof (bench train --kprof): kernel launches per step
#   real-dtypes lora-stories with the train dtype forced: cuda f32 and cpu bf16 (whose difference?)
#   1b       Llama-3.2-1B shape: peftpipe's table at 8x512 and 2x2048, activation checkpointing off
#            and on; the anchors peft_default, peft_bf16, compile, unsloth, unsloth_gc at 8x512
#   noflash  the same 1B shapes with the flash-attention kernels off (PEFTPIPE_UNFUSED)
#   methods  every PEFT method at 8x512 (`bench train --method`), beside ../shared/gpu/peft_bench.py's
#            rows for the same methods; QLoRA beside PEFT + bitsandbytes and Unsloth's QLoRA
#   ab       A/B of single kernels at 8x512 (1B) and 1x4096 (8B), checkpointing off, no anchors:
#            all on; RoPE and the residual adds written into new buffers (PEFTPIPE_UNFUSED=in_place);
#            also the heads copied for attention (strided_heads); the LoRA GEMM-accumulate off
#            (PEFTPIPE_UNFUSED=lora_gemm); the previous (wmma)
#            flash-attention kernels (PEFTPIPE_FLASH=wmma); QLoRA with the fused dequantize + GEMM
#            vs dequantize + cuBLAS (PEFTPIPE_QGEMM)
#   ab-qlora two builds (OLD_BIN, if set, and this one) alternating at the QLoRA shapes (1B 8x512, 8B
#            1x4096), beside Unsloth's QLoRA at both; AB_UNFUSED=KERNEL adds this build with that
#            kernel off at both shapes
#   qlora    QLoRA (NF4, double quant, r16 a32, all linears) at 8x512, checkpointing off and on,
#            beside PEFT + bitsandbytes and Unsloth's QLoRA; the quant_cuda test binary and the fused
#            dequantize + GEMM timings first
#   8b-long  Llama-3.1-8B shape at 1x16384 (checkpointing off and on), and PEFT's default (fp32
#            adapters) at 1x4096 beside peftpipe at 1x4096
#   8b-unsloth Llama-3.1-8B shape at 1x4096: peftpipe beside Unsloth (16-bit LoRA)
#   8b-short Llama-3.1-8B shape at 1x4096 only: peftpipe (checkpointing off and on) and PEFT (bf16)
#   wgmma    the Hopper flash kernels' harnesses (benches/gpu/wgmma: f64 reference, fa2, strided,
#            determinism, 8B-shape timing), from the xz binaries in benches/gpu/wgmma/.build/carry
#   qlora-8b-mma  the 8B QLoRA row again with the FlashAttention-2-style kernels (PEFTPIPE_FLASH=mma):
#            the A/B of the Hopper kernels in the same call
#   quantize the 4-bit quantization of the 8B and 1B shapes' base weights on the host's CPU threads
#            vs one thread (`bench quantize`: QLoRA's quantize-at-load, the quantized export)
#   8b       Llama-3.1-8B shape: peftpipe at 1x1024 and 1x4096 (off/on) and 1x16384 (on); PEFT (bf16
#            adapters) and Unsloth at 1x4096
#   floor    issue 10's bound: benches/gpu/floor.py (the frozen base's GEMMs, attention and the 4-bit
#            dequantization a bf16 QLoRA step must do, timed with PyTorch's cuBLAS, SDPA and
#            bitsandbytes kernels) at 8B 1x4096 and 1B 8x512, beside peftpipe's and Unsloth's QLoRA
#            steps at both shapes (FLOOR_SHAPES=8b or 1b for one; FLOOR_ARGS=--fp8 adds FP8 GEMMs;
#            FLOOR_ONLY=1 skips the training runs)
# Every figure is LoRA r16 alpha 32 on all seven linears of a random-init model, bf16 base, AdamW.
set -uo pipefail
MODE=${1:-1b}
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
for f in target/cuda-dist/*.xz; do xz -dkf "$f"; done
chmod +x target/cuda-dist/* 2>/dev/null
BIN=$PWD/target/cuda-dist/peftpipe
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl >/dev/null 2>&1 && export PYTHONPATH=/tmp/site
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/gpu.txt"
# warm the PTX JIT cache so start-up is not timed
"$BIN" bench train --config gpu-run/llama-3.2-1b.config.json --device cuda --batch 1 --seq 64 \
  --steps 2 --warmup 1 >/dev/null 2>&1

table() { # CONFIG SHAPES CHECKPOINTING STEPS [label]
  "$BIN" bench train --config "$1" --device cuda --shapes "$2" --checkpointing "$3" --rank 16 \
    --alpha 32 --steps "$4" --warmup 3 --peak-tflops 989 2>&1 | grep -v "^RESULT"
}
anchors() { # MODEL_CONFIGS BATCH SEQ BUDGET
  local script=gpu-run/fast_lora_bench.py
  if [ "${ANCHOR_SHAPE:-1b}" = 8b ]; then
    # the same script with the Llama-3.1-8B shape in place of the 1B one
    sed -e 's/hidden_size=2048, num_hidden_layers=16, num_attention_heads=32, num_key_value_heads=8,/hidden_size=4096, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,/' \
        -e 's/intermediate_size=8192, vocab_size=128256, head_dim=64/intermediate_size=14336, vocab_size=128256, head_dim=128/' \
        gpu-run/fast_lora_bench.py > /tmp/fast_lora_bench_8b.py
    grep -q "hidden_size=4096" /tmp/fast_lora_bench_8b.py || echo "WARNING: 8B substitution failed"
    script=/tmp/fast_lora_bench_8b.py
  fi
  PYTHONUNBUFFERED=1 python3 "$script" --only "$1" --batch "$2" --seq "$3" --budget "$4" \
    --steps 10 --warmup 3 --json "$OUT/anchors-${ANCHOR_SHAPE:-1b}.json" 2>&1 | grep -vE "Warning|warn|^\s*$" | tail -30
}

tests() {
  echo "== CUDA test binaries"
  for t in target/cuda-dist/test-*; do
    [ -x "$t" ] || continue
    case "$t" in *.xz) continue ;; esac
    echo "-- $t"; PEFTPIPE_TEST_DEVICE=cuda timeout 150 "$t" --test-threads 1 --nocapture 2>&1 \
      | tee "$OUT/$(basename "$t").log" \
      | grep -E "^test |test result|panicked|FAILED|Error|store|ratio|verdict|worst" | tail -40
  done | tee "$OUT/cuda_tests.txt"
}

for part in ${MODE//,/ }; do
case "$part" in
  tests) tests ;;
  wgmma)
    echo "== Hopper flash kernels: harnesses"
    for t in flash_wgmma_test flash_wgmma_bwd_test; do
      xz -dc "benches/gpu/wgmma/.build/carry/$t.xz" > "/tmp/$t" && chmod +x "/tmp/$t"
      timeout 120 "/tmp/$t" 20 > "$OUT/$t.txt" 2>&1; echo "$t rc=$?"
      grep -E "ok|FAIL|wrong|speed-up|ms/layer|bitwise|rows without" "$OUT/$t.txt" | tail -25
    done
    ;;
  qlora-8b-mma)
    echo "== peftpipe QLoRA 8B 1x4096, FlashAttention-2-style kernels (PEFTPIPE_FLASH=mma)"
    PEFTPIPE_FLASH=mma timeout 200 "$BIN" bench train --config gpu-run/llama-3.1-8b.config.json --device cuda --shapes 1x4096 \
      --checkpointing off --steps 5 --warmup 2 --method "qlora: {r: 16, alpha: 32, target_modules: all-linear}" \
      --peak-tflops 989 2>&1 | grep -v "^RESULT" | tee "$OUT/peftpipe-qlora-8b-mma.txt"
    ;;
  quantize)
    echo "== 4-bit quantization of the base weights, $(nproc) CPU threads vs 1"
    for C in gpu-run/llama-3.1-8b.config.json gpu-run/llama-3.2-1b.config.json; do
      timeout 120 "$BIN" bench quantize --config "$C" --runs 2 2>&1
    done | tee "$OUT/quantize.txt"
    ;;
  real-ab)
    # lora-stories on cuda with the LoRA GEMM-accumulate off: is a cuda-vs-cpu difference the kernel's?
    export PEFTPIPE_SHARED=$PWD/gpu-run/shared
    for variant in "on|" "lora_gemm off|PEFTPIPE_UNFUSED=lora_gemm"; do
      echo "-- lora-stories on cuda, $variant"
      env ${variant#*|} timeout 60 "$BIN" run gpu-run/lora-stories.yaml --device cuda --cache-dir "/tmp/cache-ab-${variant%%|*}" 2>&1 | grep -E "train|evaluate"
      cp gpu-run/.peftpipe/out/lora-stories/train/metrics.jsonl "$OUT/metrics-cuda-${variant%% *}.jsonl" 2>/dev/null
    done | tee "$OUT/real_ab.txt"
    ;;
  real-f32)
    # Issue 8 item 6: lora-stories on cuda and cpu, each in bf16 and f32 (train and evaluate both:
    # `evaluate: {dtype}`), then every run's per-step |Δloss| and eval perplexity against cpu f32.
    export PEFTPIPE_SHARED=$PWD/gpu-run/shared
    for run in "cpu f32" "cuda f32" "cuda bf16" "cpu bf16"; do
      set -- $run
      echo "-- lora-stories on $1, $2 (train and evaluate)"
      timeout 150 "$BIN" run gpu-run/lora-stories.yaml --device "$1" --cache-dir "/tmp/cache-$1-$2" \
        --stage evaluate --set "stages.train.train.dtype=$2" --set "stages.evaluate.evaluate.dtype=$2" 2>&1 | tail -4
      cp gpu-run/.peftpipe/out/lora-stories/train/metrics.jsonl "$OUT/metrics-$1-$2.jsonl" 2>/dev/null
      cp gpu-run/.peftpipe/out/lora-stories/evaluate/metrics.json "$OUT/eval-$1-$2.json" 2>/dev/null
    done | tee "$OUT/real_f32.txt"
    python3 - "$OUT" <<'PY' | tee -a "$OUT/real_f32.txt"
import json, sys, os
out = sys.argv[1]
def losses(name):
    with open(os.path.join(out, f"metrics-{name}.jsonl")) as f:
        return [json.loads(l)["loss"] for l in f if l.strip()]
def ppl(name):
    with open(os.path.join(out, f"eval-{name}.json")) as f:
        m = json.load(f)
    return {side: round(m[side]["perplexity"], 4) for side in ("base", "adapted")}
ref = losses("cpu-f32")
print("eval cpu-f32:", json.dumps(ppl("cpu-f32")))
for name in ["cuda-f32", "cuda-bf16", "cpu-bf16"]:
    try:
        other = losses(name)
        d = max(abs(a - b) for a, b in zip(ref, other))
        print(f"{name}: steps {len(other)}, max |dloss| vs cpu-f32 {d:.4g}; eval {json.dumps(ppl(name))}")
    except Exception as e:
        print(f"{name}: {e}")
PY
    ;;
  offload)
    # Offloaded checkpointing (layer inputs in host memory) beside on-device checkpointing and
    # Unsloth's offloaded checkpointing, 1B shape.
    C=gpu-run/llama-3.2-1b.config.json
    echo "== peftpipe 1B: checkpointing off, on, offload; 8x512 and 2x2048"
    timeout 300 bash -c "$(declare -f table); BIN=$BIN; table $C 8x512,2x2048 all 10" | tee "$OUT/peftpipe-offload.txt"
    echo "== Unsloth with its offloaded checkpointing, same host, 8x512"
    anchors unsloth_gc 8 512 200 | tee "$OUT/anchors-offload.txt"
    ;;
  8b-d)
    # Target (d) in one call: 8B at 1x4096 beside PEFT's default and Unsloth; 1x16384 checkpointed
    # (on and offloaded).
    C=gpu-run/llama-3.1-8b.config.json
    echo "== peftpipe 8B: 1x4096 off; 1x16384 on and offload"
    timeout 100 bash -c "$(declare -f table); BIN=$BIN; table $C 1x4096 off 5" | tee "$OUT/peftpipe-8b-d.txt"
    timeout 150 bash -c "$(declare -f table); BIN=$BIN; table $C 1x16384 on 3" | tee -a "$OUT/peftpipe-8b-d.txt"
    timeout 150 bash -c "$(declare -f table); BIN=$BIN; table $C 1x16384 offload 3" | tee -a "$OUT/peftpipe-8b-d.txt"
    echo "== anchors 8B, same host, 1x4096: PEFT default (fp32 adapters), Unsloth"
    ANCHOR_SHAPE=8b anchors peft_default,unsloth 1 4096 220 | tee "$OUT/anchors-8b-d.txt"
    ;;
  qlora-8b)
    # Issue 10: QLoRA (NF4, double quant, r16 a32, all linears) on the 8B shape at 1x4096 beside
    # PEFT + bitsandbytes and Unsloth's QLoRA.
    C=gpu-run/llama-3.1-8b.config.json
    echo "== peftpipe QLoRA 8B 1x4096"
    timeout 200 "$BIN" bench train --config "$C" --device cuda --shapes 1x4096 --checkpointing off --steps 5 --warmup 2 \
      --method "qlora: {r: 16, alpha: 32, target_modules: all-linear}" --peak-tflops 989 2>&1 | grep -v "^RESULT" | tee "$OUT/peftpipe-qlora-8b.txt"
    echo "== QLoRA anchors 8B, same host, 1x4096"
    ANCHOR_SHAPE=8b anchors peft_qlora,unsloth_qlora 1 4096 300 | tee "$OUT/anchors-qlora-8b.txt"
    ;;
  floor)
    for F in ${FLOOR_SHAPES:-8b 1b}; do
      echo "== floor $F"
      timeout 150 python3 benches/gpu/floor.py --shape "$F" ${FLOOR_ARGS:-} --json "$OUT/floor-$F.json" 2>&1 \
        | grep -vE "Warning|warn" | tee "$OUT/floor-$F.txt"
      [ -n "${FLOOR_ONLY:-}" ] && continue
      if [ "$F" = 8b ]; then C=gpu-run/llama-3.1-8b.config.json S=1x4096 B=1 T=4096
      else C=gpu-run/llama-3.2-1b.config.json S=8x512 B=8 T=512; fi
      echo "== peftpipe QLoRA $F $S"
      timeout 200 "$BIN" bench train --config "$C" --device cuda --shapes "$S" --checkpointing off --steps 5 \
        --warmup 2 --method "qlora: {r: 16, alpha: 32, target_modules: all-linear}" --peak-tflops 989 2>&1 \
        | grep -v "^RESULT" | tee "$OUT/peftpipe-qlora-$F.txt"
      echo "== Unsloth QLoRA $F, same host, $S"
      ANCHOR_SHAPE=$F anchors unsloth_qlora $B $T 200 | tee "$OUT/anchors-qlora-$F.txt"
    done
    ;;
  qlora-8b-u)
    # The 8B QLoRA row beside Unsloth's QLoRA only (the shorter call: PEFT + bitsandbytes at this
    # shape takes minutes and is far behind both).
    C=gpu-run/llama-3.1-8b.config.json
    echo "== peftpipe QLoRA 8B 1x4096"
    timeout 200 "$BIN" bench train --config "$C" --device cuda --shapes 1x4096 --checkpointing off --steps 5 --warmup 2 \
      --method "qlora: {r: 16, alpha: 32, target_modules: all-linear}" --peak-tflops 989 2>&1 | grep -v "^RESULT" | tee "$OUT/peftpipe-qlora-8b.txt"
    echo "== Unsloth QLoRA 8B, same host, 1x4096"
    ANCHOR_SHAPE=8b anchors unsloth_qlora 1 4096 200 | tee "$OUT/anchors-qlora-8b.txt"
    ;;
  launches)
    # Item 5's kernel launches per step: the 1B table under kprof (benches/gpu/kprof/build.sh put
    # kprof.so and libcupti.so.13.xz into target/cuda-dist/kprof). Profiling costs a few per cent,
    # so the speeds of this part are not the ones to compare.
    for f in target/cuda-dist/kprof/*.xz; do xz -dkf "$f"; done
    C=gpu-run/llama-3.2-1b.config.json
    echo "== peftpipe 1B under kprof: launches per step, checkpointing off / on / offload"
    timeout 300 "$BIN" bench train --config "$C" --device cuda --shapes 8x512,2x2048 --checkpointing all \
      --rank 16 --alpha 32 --steps 10 --warmup 3 --peak-tflops 989 --kprof "$PWD/target/cuda-dist/kprof" 2>&1 \
      | grep -v "^RESULT" | tee "$OUT/peftpipe-launches.txt"
    ;;
  real-dtypes)
    # Is a cuda-vs-cpu difference of the real run bf16's or the engine's? lora-stories with the
    # train stage's dtype forced: cuda in f32 (against the cpu's f32) and cpu in bf16 (against
    # cuda's bf16). Evaluate has no dtype: it runs in the device's default (bf16 on cuda, f32 on cpu).
    export PEFTPIPE_SHARED=$PWD/gpu-run/shared
    for run in "cuda f32" "cpu bf16"; do
      set -- $run
      # the train stage's `device: auto` (the first one) gets the dtype; evaluate has none
      awk -v d="$2" '{print} /^      device: auto$/ && !done {print "      dtype: " d; done=1}' \
        gpu-run/lora-stories.yaml > "gpu-run/lora-stories-$2.yaml"
      sed -i "s/^name: lora-stories$/name: lora-stories-$2/" "gpu-run/lora-stories-$2.yaml"
      echo "-- lora-stories on $1, train dtype $2"
      timeout 200 "$BIN" run "gpu-run/lora-stories-$2.yaml" --device "$1" --cache-dir "/tmp/cache-$1-$2" 2>&1 | tail -8
      cp "gpu-run/.peftpipe/out/lora-stories-$2/train/metrics.jsonl" "$OUT/metrics-$1-$2.jsonl" 2>/dev/null
      cp "gpu-run/.peftpipe/out/lora-stories-$2/evaluate/metrics.json" "$OUT/eval-$1-$2.json" 2>/dev/null
    done | tee "$OUT/real_dtypes.txt"
    ;;
  real)
    # A real run stays right: lora-stories on cuda vs cpu (loss curves, eval perplexity), and
    # qlora-stories on cuda.
    export PEFTPIPE_SHARED=$PWD/gpu-run/shared
    for dev in cuda cpu; do
      echo "-- lora-stories on $dev"
      timeout 120 "$BIN" run gpu-run/lora-stories.yaml --device "$dev" --cache-dir "/tmp/cache-$dev" 2>&1 | tail -8
      cp gpu-run/.peftpipe/out/lora-stories/train/metrics.jsonl "$OUT/metrics-$dev.jsonl" 2>/dev/null
      cp gpu-run/.peftpipe/out/lora-stories/evaluate/metrics.json "$OUT/eval-$dev.json" 2>/dev/null
    done | tee "$OUT/real_run.txt"
    if [ -f gpu-run/qlora-stories.yaml ]; then
      echo "-- qlora-stories on cuda"
      timeout 120 "$BIN" run gpu-run/qlora-stories.yaml --device cuda --cache-dir /tmp/cache-q 2>&1 | tail -8 | tee "$OUT/qlora_run.txt"
    fi
    ;;
  1b)
    C=gpu-run/llama-3.2-1b.config.json
    echo "== peftpipe (flash attention on): 8x512, 2x2048; checkpointing off and on"
    timeout 200 bash -c "$(declare -f table); BIN=$BIN; table $C 8x512,2x2048 both 10" | tee "$OUT/peftpipe-1b.txt"
    echo "== anchors, same host, 8x512"
    anchors peft_default,peft_bf16,compile,unsloth,unsloth_gc 8 512 300 | tee "$OUT/anchors-1b.txt"
    ;;
  noflash)
    C=gpu-run/llama-3.2-1b.config.json
    echo "== peftpipe, flash attention off (PEFTPIPE_UNFUSED=flash_attention) vs on: 8x512"
    PEFTPIPE_UNFUSED=flash_attention timeout 100 bash -c "$(declare -f table); BIN=$BIN; table $C 8x512,2x2048 off 10" | tee "$OUT/peftpipe-1b-noflash.txt"
    ;;
  methods)
    C=gpu-run/llama-3.2-1b.config.json
    echo "== peftpipe, every method, 1B shape, 8x512 (the same settings as peft_bench.py's rows)"
    for m in "prompt_tuning: {num_virtual_tokens: 20}" "prefix_tuning: {num_virtual_tokens: 20}" \
             "llama_adapter: {adapter_len: 10, adapter_layers: 8}" "ia3" "dora: {r: 16, alpha: 32}" \
             "qlora: {r: 16, alpha: 32}"; do
      timeout 120 "$BIN" bench train --config "$C" --device cuda --batch 8 --seq 512 --method "$m" \
        --steps 10 --warmup 3 2>&1 | grep -v "^RESULT" | grep -E "on llama|tokens/s|peak|rror"
    done | tee "$OUT/peftpipe-methods.txt"
    echo "== peft_bench.py, same host"
    PYTHONUNBUFFERED=1 timeout 200 python3 gpu-run/peft_bench.py --device cuda \
      --only prompt_tuning_20,prefix_tuning_20,adaption_prompt_10x8,ia3 --json "$OUT/peft-methods.json" 2>&1 \
      | grep -vE "Warning|warn|^\s*$" | tail -8 | tee -a "$OUT/peftpipe-methods.txt"
    echo "== QLoRA anchors, same host"
    anchors peft_qlora,unsloth_qlora 8 512 240 | tee "$OUT/anchors-qlora.txt"
    ;;
  ab)
    C=gpu-run/llama-3.2-1b.config.json
    C8=gpu-run/llama-3.1-8b.config.json
    for variant in "all on|" "in-place RoPE and residual adds off|PEFTPIPE_UNFUSED=in_place" \
        "strided heads and in-place off|PEFTPIPE_UNFUSED=strided_heads,in_place" \
        "lora_gemm off|PEFTPIPE_UNFUSED=lora_gemm" "flash wmma|PEFTPIPE_FLASH=wmma"; do
      label=${variant%%|*}; envs=${variant#*|}
      echo "-- $label: 1B 8x512"
      env $envs timeout 60 bash -c "$(declare -f table); BIN=$BIN; table $C 8x512 off 10"
      case "$label" in "all on"|"flash wmma") ;; *) continue ;; esac
      echo "-- $label: 8B 1x4096"
      env $envs timeout 90 bash -c "$(declare -f table); BIN=$BIN; table $C8 1x4096 off 5"
    done 2>&1 | tee "$OUT/ab.txt"
    for q in fused dequant; do
      echo "-- qlora, PEFTPIPE_QGEMM=$q: 1B 8x512"
      PEFTPIPE_QGEMM=$q timeout 60 "$BIN" bench train --config "$C" --device cuda --batch 8 --seq 512 \
        --method "qlora: {r: 16, alpha: 32}" --steps 10 --warmup 3 2>&1 | grep -E "tokens/s|peak|rror"
    done 2>&1 | tee -a "$OUT/ab.txt"
    ;;
  ab-qlora)
    # Two builds side by side: OLD_BIN (an earlier peftpipe, e.g. carried xz-compressed in an
    # excluded folder) and this one, alternating (old, new, old, new) at the 1B shape 8x512 and the
    # 8B shape 1x4096, QLoRA r16 a32 on all linears, beside Unsloth's QLoRA at both shapes.
    # Without OLD_BIN only this build runs (with AB_UNFUSED: this build with and without).
    old=""
    if [ -n "${OLD_BIN:-}" ]; then
      [ -x "$OLD_BIN" ] || { echo "ab-qlora: OLD_BIN is not an executable"; exit 2; }
      old=old
    fi
    q="qlora: {r: 16, alpha: 32, target_modules: all-linear}"
    # AB_UNFUSED=KERNEL[,..]: also this build with those kernels off (PEFTPIPE_UNFUSED).
    for round in 1 2; do
      for which in $old new ${AB_UNFUSED:+unfused}; do
        b=$BIN; [ "$which" = old ] && b=$OLD_BIN
        off=""; [ "$which" = unfused ] && off=$AB_UNFUSED
        echo "== $which${off:+ ($off off)} (round $round): 1B 8x512"
        PEFTPIPE_UNFUSED=$off timeout 120 "$b" bench train --config gpu-run/llama-3.2-1b.config.json --device cuda --shapes 8x512 \
          --checkpointing off --steps 10 --warmup 3 --method "$q" --peak-tflops 989 2>&1 | grep -E "tokens/s|peak" \
          | tee -a "$OUT/ab-qlora-$which.txt"
      done
    done
    for which in $old new ${AB_UNFUSED:+unfused}; do
      b=$BIN; [ "$which" = old ] && b=$OLD_BIN
      off=""; [ "$which" = unfused ] && off=$AB_UNFUSED
      echo "== $which${off:+ ($off off)}: 8B 1x4096"
      PEFTPIPE_UNFUSED=$off timeout 200 "$b" bench train --config gpu-run/llama-3.1-8b.config.json --device cuda --shapes 1x4096 \
        --checkpointing off --steps 5 --warmup 2 --method "$q" --peak-tflops 989 2>&1 | grep -E "tokens/s|peak" \
        | tee -a "$OUT/ab-qlora-$which.txt"
    done
    echo "== Unsloth QLoRA, same host: 1B 8x512, then 8B 1x4096"
    anchors unsloth_qlora 8 512 200 | tee "$OUT/anchors-qlora.txt"
    ANCHOR_SHAPE=8b anchors unsloth_qlora 1 4096 200 | tee "$OUT/anchors-qlora-8b.txt"
    ;;
  qlora)
    C=gpu-run/llama-3.2-1b.config.json
    if [ -x target/cuda-dist/test-quant_cuda ]; then
      echo "== quant_cuda"
      PEFTPIPE_TEST_DEVICE=cuda timeout 120 target/cuda-dist/test-quant_cuda --test-threads 1 2>&1 | grep -E "^test |test result|panicked" | tail -30
      echo "== fused dequantize + GEMM vs dequantize + cuBLAS"
      PEFTPIPE_TEST_DEVICE=cuda timeout 90 target/cuda-dist/test-quant_cuda --ignored fused_and_dequantize_timings --nocapture 2>&1 | grep -vE "^\s*$" | tail -30
    fi 2>&1 | tee "$OUT/quant_cuda.txt"
    echo "== peftpipe QLoRA all linears, 8x512"
    "$BIN" bench train --config "$C" --device cuda --shapes 8x512 --checkpointing both --steps 10 --warmup 3 \
      --method "qlora: {r: 16, alpha: 32, target_modules: all-linear}" --peak-tflops 989 2>&1 | grep -v "^RESULT" | tee "$OUT/peftpipe-qlora.txt"
    echo "== QLoRA anchors, same host"
    anchors peft_qlora,unsloth_qlora 8 512 240 | tee "$OUT/anchors-qlora.txt"
    ;;
  8b-long)
    C=gpu-run/llama-3.1-8b.config.json
    echo "== peftpipe 8B: 1x4096 off, 1x16384 off and on"
    timeout 100 bash -c "$(declare -f table); BIN=$BIN; table $C 1x4096 off 5" | tee "$OUT/peftpipe-8b-long.txt"
    timeout 200 bash -c "$(declare -f table); BIN=$BIN; table $C 1x16384 both 3" | tee -a "$OUT/peftpipe-8b-long.txt"
    echo "== PEFT default (fp32 adapters) 8B, same host, 1x4096"
    ANCHOR_SHAPE=8b anchors peft_default 1 4096 120 | tee "$OUT/anchors-8b-default.txt"
    ;;
  8b-unsloth)
    C=gpu-run/llama-3.1-8b.config.json
    echo "== peftpipe 8B: 1x4096, checkpointing off and on"
    timeout 150 bash -c "$(declare -f table); BIN=$BIN; table $C 1x4096 both 5" | tee "$OUT/peftpipe-8b-u.txt"
    echo "== Unsloth 8B, same host, 1x4096"
    ANCHOR_SHAPE=8b anchors unsloth 1 4096 200 | tee "$OUT/anchors-8b-unsloth.txt"
    ;;
  8b-short)
    C=gpu-run/llama-3.1-8b.config.json
    echo "== peftpipe 8B: 1x4096, checkpointing off and on"
    timeout 150 bash -c "$(declare -f table); BIN=$BIN; table $C 1x4096 both 5" | tee "$OUT/peftpipe-8b.txt"
    echo "== PEFT (bf16 adapters) 8B, same host, 1x4096"
    ANCHOR_SHAPE=8b anchors peft_bf16 1 4096 120 | tee "$OUT/anchors-8b.txt"
    ;;
  8b)
    C=gpu-run/llama-3.1-8b.config.json
    echo "== peftpipe 8B: 1x1024 and 1x4096, checkpointing off and on; 1x16384 on"
    timeout 200 bash -c "$(declare -f table); BIN=$BIN; table $C 1x1024,1x4096 both 6" | tee "$OUT/peftpipe-8b.txt"
    timeout 90 bash -c "$(declare -f table); BIN=$BIN; table $C 1x16384 on 3" | tee -a "$OUT/peftpipe-8b.txt"
    echo "== anchors 8B, same host, 1x4096"
    ANCHOR_SHAPE=8b anchors peft_bf16,unsloth 1 4096 200 | tee "$OUT/anchors-8b.txt"
    ;;
esac
done
