#!/usr/bin/env bash
# CPU emulation of the FlashAttention-2-style kernels (namespace fa2 of kernels/flash_attn.cu), no
# GPU needed: the kernel code runs as is, one host thread per CUDA thread (std::barrier for
# __syncthreads and warp collectives); only the inline-PTX primitives (between the "fa2 primitives"
# markers) are replaced by prims.inc, written from the PTX ISA's ldmatrix / mma.m16n8k16 fragment
# layouts. Checks O, lse, dQ, dK, dV (bf16, f16) against an f64 reference on GQA, causal + offset,
# padding, non-causal and ragged-tile cases, and that rows with no visible key give exact zeros.
#   run.sh [immediate|deferred] [small | all | CASES] [Q,KV]   (CASES: comma-separated case indices
#   of emu.cpp; Q,KV: the storage layouts handed to the kernels, 0 = [B, H, T, D], 1 = [B, T, H, D]
#   as a projection's output is read without a copy; default 0,0)
# immediate: cp.async copies at issue (catches a tile overwritten while still read);
# deferred: at cp.async.wait_group (catches a tile read before it is waited for).
# Slow (minutes per case on 2 cores); `small` runs 3 cases. d128 runs the wide kernels the entry
# points launch (forward_wide, backward_dkdv_wide with 256 threads, backward_dq_wide).
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
work=$(mktemp -d)
python3 "$here/extract.py" "$here/../../../kernels/flash_attn.cu" "$work/fa2_body.inc"
cp "$here/prims.inc" "$work/"
g++ -std=c++20 -O2 -pthread -Wno-unknown-pragmas -I"$work" "$here/emu.cpp" -o "$work/emu"
"$work/emu" "${1:-immediate}" "${2:-all}" "${3:-0,0}"
