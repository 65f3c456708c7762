#!/usr/bin/env bash
# Per-kernel profiles on the GPU host (issue 8), peftpipe beside the anchors in one call, through
# benches/gpu/kprof (CUPTI, LD_PRELOAD; build it here with benches/gpu/kprof/build.sh, which puts
# kprof.so and libcupti.so.13.xz into target/cuda-dist/kprof). Carried: target/cuda-dist, gpu-run
# and .whl (as for engine.sh). Each profile covers the timed steps only (peftpipe's bench opens
# cuProfilerStart after its warm-up; the anchors' script is patched to call
# torch.cuda.profiler.start/stop around its timed steps) and is written to $OUT/prof-NAME.txt with
# ms/step per kernel name, launches/step and the GPU's busy share of the step.
#
# usage: bash benches/gpu/profile.sh PART[,PART...]
#   1b       peftpipe bench train, Llama-3.2-1B shape, 8x512, checkpointing off
#   1b-ckpt  the same with activation checkpointing
#   8b       peftpipe, Llama-3.1-8B shape, 1x4096
#   8b-qlora peftpipe QLoRA (NF4, double quant), Llama-3.1-8B shape, 1x4096
#   1b-qlora peftpipe QLoRA (NF4, double quant), Llama-3.2-1B shape, 8x512
#   anchors  PEFT (bf16 adapters), torch.compile and Unsloth at 1B 8x512, each profiled
#   anchors-8b  Unsloth 16-bit and Unsloth QLoRA at the 8B shape, 1x4096, each profiled
#   (PROFILE_ANCHORS="name ..." replaces either list, e.g. "unsloth_qlora" with `anchors` for
#   Unsloth's QLoRA at the 1B shape, 8x512)
set -uo pipefail
MODE=${1:-1b,anchors}
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
for f in target/cuda-dist/*.xz target/cuda-dist/kprof/*.xz; do xz -dkf "$f"; done
chmod +x target/cuda-dist/* 2>/dev/null
BIN=$PWD/target/cuda-dist/peftpipe
KPROF=$PWD/target/cuda-dist/kprof
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl >/dev/null 2>&1 && export PYTHONPATH=/tmp/site
fi
C1=gpu-run/llama-3.2-1b.config.json
C8=gpu-run/llama-3.1-8b.config.json
"$BIN" bench train --config "$C1" --device cuda --batch 1 --seq 64 --steps 2 --warmup 1 >/dev/null 2>&1

profiled() { # NAME STEPS COMMAND...
  local name=$1 steps=$2; shift 2
  LD_PRELOAD=$KPROF/kprof.so LD_LIBRARY_PATH=$KPROF${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH} \
    KPROF_OUT="$OUT/prof-$name.txt" KPROF_STEPS=$steps timeout 240 "$@" 2>&1 | grep -vE "^RESULT|Warning|warn" | tail -6
  echo "-- prof-$name (top 25)"; head -28 "$OUT/prof-$name.txt" 2>/dev/null
}

for part in ${MODE//,/ }; do
case "$part" in
  1b) profiled peftpipe-1b 10 "$BIN" bench train --config "$C1" --device cuda --batch 8 --seq 512 \
        --rank 16 --alpha 32 --steps 10 --warmup 3 ;;
  1b-ckpt) profiled peftpipe-1b-ckpt 10 "$BIN" bench train --config "$C1" --device cuda --batch 8 \
        --seq 512 --rank 16 --alpha 32 --steps 10 --warmup 3 --checkpointing on ;;
  8b) profiled peftpipe-8b 5 "$BIN" bench train --config "$C8" --device cuda --batch 1 --seq 4096 \
        --rank 16 --alpha 32 --steps 5 --warmup 2 ;;
  8b-qlora) profiled peftpipe-8b-qlora 5 "$BIN" bench train --config "$C8" --device cuda --batch 1 \
        --seq 4096 --method "qlora: {r: 16, alpha: 32, target_modules: all-linear}" --steps 5 --warmup 2 ;;
  1b-qlora) profiled peftpipe-1b-qlora 10 "$BIN" bench train --config "$C1" --device cuda --batch 8 \
        --seq 512 --method "qlora: {r: 16, alpha: 32, target_modules: all-linear}" --steps 10 --warmup 3 ;;
  anchors|anchors-8b)
    python3 - <<'EOF'
import re
s = open("gpu-run/fast_lora_bench.py").read()
loop = "        for i in range(args.warmup + args.steps):\n"
assert loop in s, "fast_lora_bench.py changed: no timed loop found"
s = s.replace(loop, loop + "            if i == args.warmup and is_cuda:\n"
              "                torch.cuda.synchronize(); torch.cuda.profiler.start()\n", 1)
end = "        med = statistics.median(times)\n"
assert end in s
s = s.replace(end, "        if is_cuda:\n            torch.cuda.synchronize(); torch.cuda.profiler.stop()\n" + end, 1)
open("/tmp/fast_lora_bench_prof.py", "w").write(s)
EOF
    names="peft_bf16 compile unsloth"; shape="--batch 8 --seq 512"
    if [ "$part" = anchors-8b ]; then
      # the Llama-3.1-8B shape in place of the 1B one (as engine.sh's ANCHOR_SHAPE=8b)
      sed -i -e 's/hidden_size=2048, num_hidden_layers=16, num_attention_heads=32, num_key_value_heads=8,/hidden_size=4096, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,/' \
        -e 's/intermediate_size=8192, vocab_size=128256, head_dim=64/intermediate_size=14336, vocab_size=128256, head_dim=128/' \
        /tmp/fast_lora_bench_prof.py
      grep -q "hidden_size=4096" /tmp/fast_lora_bench_prof.py || echo "WARNING: 8B substitution failed"
      names="unsloth unsloth_qlora"; shape="--batch 1 --seq 4096"
    fi
    names=${PROFILE_ANCHORS:-$names}
    for a in $names; do
      profiled "anchor-$a-%p" 10 python3 /tmp/fast_lora_bench_prof.py --only "$a" $shape \
        --budget 200 --steps 10 --warmup 3
      for f in "$OUT"/prof-anchor-$a-*.txt; do
        grep -q "cuProfilerStart" "$f" && { mv "$f" "$OUT/prof-anchor-$a.txt"; head -28 "$OUT/prof-anchor-$a.txt"; } || rm -f "$f"
      done
    done ;;
esac
done
