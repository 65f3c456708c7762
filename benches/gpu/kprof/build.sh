#!/usr/bin/env bash
# Builds kprof.so (benches/gpu/kprof/kprof.c) here, against the CUPTI of the pinned CUDA 13.0 wheel,
# into target/cuda-dist/kprof/ with that libcupti.so.13 beside it, so a device call that carries
# target/cuda-dist can profile with
#   LD_PRELOAD=target/cuda-dist/kprof/kprof.so LD_LIBRARY_PATH=target/cuda-dist/kprof KPROF_OUT=… cmd
set -euo pipefail
cd "$(dirname "$0")/../../.."
CUDA_HOME=${CUDA_HOME:-$HOME/.cache/cuda13-wheels/cuda-home}
WORK=target/kprof-wheel
OUTDIR=target/cuda-dist/kprof
mkdir -p "$WORK" "$OUTDIR"
if [ ! -f "$WORK/nvidia/cu13/lib/libcupti.so.13" ]; then
  python3 -m pip download -q --no-deps "nvidia-cuda-cupti==13.0.85" -d "$WORK"
  python3 -m zipfile -e "$WORK"/nvidia_cuda_cupti-*.whl "$WORK"
fi
gcc -O2 -shared -fPIC -Wall -Wextra -I"$WORK/nvidia/cu13/include" -I"$CUDA_HOME/include" \
  -o "$OUTDIR/kprof.so" benches/gpu/kprof/kprof.c -L"$WORK/nvidia/cu13/lib" -l:libcupti.so.13 -lpthread
cp "$WORK/nvidia/cu13/lib/libcupti.so.13" "$OUTDIR/"
xz -kf -T1 "$OUTDIR/libcupti.so.13" && rm "$OUTDIR/libcupti.so.13"
ls -la "$OUTDIR"
