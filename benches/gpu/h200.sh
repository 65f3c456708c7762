#!/usr/bin/env bash
# Runs on the GPU host (no Rust toolchain there) from the repository root of a copy of the working
# tree. Carried: target/cuda-dist (peftpipe.xz and test binaries, built here by
# benches/gpu/build.sh) and gpu-run/ (peft_bench.py, the Llama-3.2-1B config.json, stories260k and
# bevostories from ../shared — copied by build.sh, never committed).
# Everything it measures is side by side on one host, in one call:
#   1. HF PEFT's LoRA r16 (fp32 and bf16 adapters) on a random-init Llama-3.2-1B shape, 8 x 512, bf16
#   2. `peftpipe bench train` with the same shape, rank, alpha, batch and dtype, then its table
#      (8 x 512 and 2 x 2048, activation checkpointing off and on: tokens/s, MFU, peak memory)
#   3. the CUDA test binaries with PEFTPIPE_TEST_DEVICE=cuda: tests/device.rs (gradient flow, step-0
#      identity, AdamW steps and GPU-vs-CPU gradients in bf16) and tests/ops_grad.rs (every op on
#      the GPU vs the CPU); parity/lora/train check the CUDA build's CPU path
#   4. a short real LoRA run on stories260k + bevostories on the GPU and on the CPU (loss curves)
set -uo pipefail
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
for f in target/cuda-dist/*.xz; do xz -dkf "$f"; done
chmod +x target/cuda-dist/* 2>/dev/null
BIN=$PWD/target/cuda-dist/peftpipe
export PEFTPIPE_SHARED=$PWD/gpu-run/shared
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
# warm the PTX JIT cache so start-up is not timed
"$BIN" bench train --config gpu-run/llama-3.2-1b.config.json --device cuda --batch 1 --seq 64 --steps 2 --warmup 1 >/dev/null 2>&1
echo "== peftpipe bench train (LoRA r16 a32, 7 linears, bf16, 8x512)"
"$BIN" bench train --config gpu-run/llama-3.2-1b.config.json --device cuda --batch 8 --seq 512 \
  --rank 16 --alpha 32 --steps 20 --warmup 5 2>&1 | tee "$OUT/peftpipe_bench.txt"
echo "== peftpipe bench train table: 8x512 and 2x2048, activation checkpointing off and on"
"$BIN" bench train --config gpu-run/llama-3.2-1b.config.json --device cuda --shapes 8x512,2x2048 \
  --checkpointing both --rank 16 --alpha 32 --steps 10 --warmup 3 --peak-tflops 989 2>&1 \
  | grep -v "^RESULT" | tee "$OUT/peftpipe_bench_table.txt"
echo "== HF PEFT reference, same host"
PYTHONUNBUFFERED=1 python3 gpu-run/peft_bench.py --only lora_r16,lora_r16_bf16ad --json "$OUT/peft.json" 2>&1 \
  | grep -vE "Warning|warn" | tee "$OUT/peft_bench.txt"
echo "== CUDA test binaries"
for t in target/cuda-dist/test-*; do
  [ -x "$t" ] || continue
  case "$t" in *.xz) continue;; esac
  echo "-- $t"; PEFTPIPE_TEST_DEVICE=cuda "$t" --test-threads 1 --nocapture 2>&1 | grep -vE "^$" | tail -60
done | tee "$OUT/cuda_tests.txt"
if [ -f gpu-run/lora-stories.yaml ]; then
  echo "== real run: LoRA on stories260k + bevostories, cuda vs cpu"
  for dev in cuda cpu; do
    "$BIN" run gpu-run/lora-stories.yaml --device "$dev" --cache-dir "/tmp/cache-$dev" 2>&1 | tail -25
    cp "gpu-run/.peftpipe/out/lora-stories/train/metrics.jsonl" "$OUT/metrics-$dev.jsonl" 2>/dev/null
    cp "gpu-run/.peftpipe/out/lora-stories/evaluate/metrics.json" "$OUT/eval-$dev.json" 2>/dev/null
  done | tee "$OUT/real_run.txt"
fi
if [ -f gpu-run/sst2.yaml ]; then
  echo "== sst2 sentiment pipeline (stories260k, 2-shot, LoRA) on the GPU"
  "$BIN" run gpu-run/sst2.yaml --device cuda --cache-dir /tmp/cache-sst2 2>&1 | tail -12 | tee "$OUT/sst2.txt"
  cp "gpu-run/.peftpipe/out/sst2/evaluate/metrics.json" "$OUT/sst2-eval.json" 2>/dev/null
fi
