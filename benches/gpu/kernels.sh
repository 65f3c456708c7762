#!/usr/bin/env bash
# Issue 8, first slice: the fused CUDA kernels on the H200, in ONE device call, from the root of a
# copy of the working tree with the folder CARRY (default gpu-carry) carried beside it, holding:
#   peftpipe.xz, test-cuda_kernels.xz, test-ops_grad.xz, test-device.xz   (benches/gpu/build.sh)
#   llama-3.2-1b.config.json, fast_lora_bench.py, .whl/ (../shared/gpu/fetch-anchor-wheels.sh)
# MODE=tests: the CUDA test binaries only; MODE=noanchors: tests and bench. MODE=all (default): tests, then `peftpipe bench train`
# with the fused kernels and without (PEFTPIPE_FUSED=0 PEFTPIPE_EVENT_TRACKING=1: the candle
# compositions with cudarc's per-buffer events, i.e. "before") at
# 8 x 512 and 2 x 2048, then the anchors (PEFT default/bf16, torch.compile, Unsloth) in the same
# call, so every ratio compares figures from one host and one call. ABLATE lists the kernels
# (PEFTPIPE_UNFUSED values) to switch off one run at a time, to see what each one buys.
set -uo pipefail
C=${CARRY:-gpu-carry}
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
MODE=${MODE:-all}
for f in "$C"/*.xz; do xz -dkf "$f"; done
chmod +x "$C"/peftpipe "$C"/test-* 2>/dev/null
BIN=$C/peftpipe
CFG=$C/llama-3.2-1b.config.json
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/gpu.txt"
start=$(date +%s)
# Warm the PTX JIT cache (candle's kernels and ours) so start-up is not timed.
"$BIN" bench train --config "$CFG" --device cuda --batch 1 --seq 64 --steps 1 --warmup 1 >/dev/null 2>&1
echo "JIT warm-up done after $(( $(date +%s) - start )) s"
echo "== CUDA test binaries (PEFTPIPE_TEST_DEVICE=cuda)"
for t in cuda_kernels ops_grad device; do
  [ -x "$C/test-$t" ] || continue
  echo "-- test-$t"
  PEFTPIPE_TEST_DEVICE=cuda "$C/test-$t" --test-threads 1 --nocapture 2>&1 \
    | grep -E "^test |error|max rel|norm|store|panicked|cuda|result|FAILED|passed" | tail -60
done 2>&1 | tee "$OUT/tests.txt"
[ "$MODE" = tests ] && exit 0
bench() {  # label, batch, seq, env...
  local label=$1 batch=$2 seq=$3; shift 3
  echo "-- $label"
  env "$@" "$BIN" bench train --config "$CFG" --device cuda --batch "$batch" --seq "$seq" \
    --rank 16 --alpha 32 --steps "${STEPS:-20}" --warmup "${WARMUP:-5}" 2>&1 | tail -14
}
echo "== peftpipe bench train (Llama-3.2-1B shape, bf16, LoRA r16 a32 on 7 linears)"
{
  bench "fused 8x512" 8 512 PEFTPIPE_FUSED=1
  bench "unfused (before) 8x512" 8 512 PEFTPIPE_FUSED=0 PEFTPIPE_EVENT_TRACKING=1
  bench "fused 2x2048" 2 2048 PEFTPIPE_FUSED=1
  STEPS=10 WARMUP=3 bench "unfused (before) 2x2048" 2 2048 PEFTPIPE_FUSED=0 PEFTPIPE_EVENT_TRACKING=1
  # What each kernel buys: all fused but one (8 x 512, 10 timed steps).
  for k in ${ABLATE-softmax cross_entropy adamw rms_norm,rope,swiglu}; do
    STEPS=10 WARMUP=3 bench "fused except $k 8x512" 8 512 PEFTPIPE_UNFUSED=$k
  done
  STEPS=10 WARMUP=3 bench "fused, cudarc event tracking on 8x512" 8 512 PEFTPIPE_EVENT_TRACKING=1
} 2>&1 | tee "$OUT/bench.txt"
echo "bench done after $(( $(date +%s) - start )) s"
[ "$MODE" = noanchors ] && exit 0
echo "== anchors, same call"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site "$C"/.whl/*.whl \
  && export PYTHONPATH=/tmp/site
PYTHONUNBUFFERED=1 timeout 420 python3 "$C/fast_lora_bench.py" --only "${ANCHORS:-peft_default,peft_bf16,compile,unsloth}" \
  --budget "${BUDGET:-330}" --json "$OUT/anchors.json" 2>&1 | grep -E "RESULT|config|error|Error|OOM|tokens" | tail -30 | tee "$OUT/anchors.txt"
echo "all done after $(( $(date +%s) - start )) s"
