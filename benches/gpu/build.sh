#!/usr/bin/env bash
# Prepares a GPU run (here, no GPU needed): builds the CUDA binary with ../shared/gpu/build-cuda.sh
# into target/cuda-dist/ and fills gpu-run/ (git-ignored, never committed) with what the H200 host
# needs: peft_bench.py, the Llama-3.2-1B config, a copy of ../shared's models and datasets (6 MB) and
# the lora-stories pipeline. It also builds the GPU-relevant integration-test binaries with
# `--features cuda` (release, same target dir) and puts them beside the binary as test-NAME.xz.
# Then run on the device, carrying target/cuda-dist and gpu-run:
#   bash benches/gpu/h200.sh
# or, for the engine comparison against the fastest stacks (also carrying .whl/, fetched by
# ../shared/gpu/fetch-anchor-wheels.sh):  bash benches/gpu/engine.sh 1b   (then 8b)
set -euo pipefail
cd "$(dirname "$0")/../.."
SHARED=${PEFTPIPE_SHARED:-../shared}
bash "$SHARED/gpu/build-cuda.sh"

# The test binaries, built with the environment build-cuda.sh sets up for candle's CUDA crates.
TK=${CUDA_TK_DIR:-$HOME/.cache/cuda13-wheels}/cuda-home
TESTS=${GPU_TESTS:-device device_open ops_grad parity lora train}
rm -f target/cuda-dist/test-*
for name in $TESTS; do
  executable=$(PATH="$TK/bin:$PATH" CUDA_HOME="$TK" CUDA_COMPUTE_CAP=${CUDA_COMPUTE_CAP:-90} \
    CUDARC_CUDA_VERSION=13000 cargo test --release --features cuda --target-dir target/cuda \
    --no-run --message-format=json --test "$name" \
    | python3 -c 'import json, sys
for line in sys.stdin:
    m = json.loads(line)
    if m.get("reason") == "compiler-artifact" and m.get("executable"): print(m["executable"])' | tail -1)
  tmp=$(mktemp); cp "$executable" "$tmp"; strip "$tmp" || true
  xz -T0 -6 -c "$tmp" > "target/cuda-dist/test-$name.xz"; chmod 755 "target/cuda-dist/test-$name.xz"
  rm -f "$tmp"
done

rm -rf gpu-run && mkdir -p gpu-run/shared
cp "$SHARED/gpu/peft_bench.py" "$SHARED/gpu/fast_lora_bench.py" \
  "$SHARED/models/configs/llama-3.2-1b.config.json" "$SHARED/models/configs/llama-3.1-8b.config.json" gpu-run/
cp -r "$SHARED/models" "$SHARED/datasets" gpu-run/shared/
cp pipelines/lora-stories.yaml pipelines/sst2.yaml gpu-run/
chmod -R u+w gpu-run
du -sh gpu-run target/cuda-dist
