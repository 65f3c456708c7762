#!/usr/bin/env bash
# Prepares a GPU run (here, no GPU needed): builds the CUDA binary with ../shared/gpu/build-cuda.sh
# into target/cuda-dist/ and fills gpu-run/ (git-ignored, never committed) with what the H200 host
# needs: peft_bench.py, the Llama-3.2-1B config, stories260k, bevostories and the lora-stories
# pipeline. Then run on the device, carrying target/cuda-dist and gpu-run:
#   bash benches/gpu/h200.sh
set -euo pipefail
cd "$(dirname "$0")/../.."
SHARED=${PEFTPIPE_SHARED:-../shared}
bash "$SHARED/gpu/build-cuda.sh"
rm -rf gpu-run && mkdir -p gpu-run/shared/models gpu-run/shared/datasets
cp "$SHARED/gpu/peft_bench.py" "$SHARED/models/configs/llama-3.2-1b.config.json" gpu-run/
cp -r "$SHARED/models/stories260k" gpu-run/shared/models/
cp -r "$SHARED/datasets/bevostories" gpu-run/shared/datasets/
cp pipelines/lora-stories.yaml gpu-run/
chmod -R u+w gpu-run
du -sh gpu-run target/cuda-dist
