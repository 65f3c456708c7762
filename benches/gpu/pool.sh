#!/usr/bin/env bash
# From the repository root with gpu-carry/ carried (peftpipe.xz, llama-3.2-1b.config.json).
# The memory-pool release-threshold experiment: one binary, pool kept (default) vs released.
set -uo pipefail
C=gpu-carry; xz -dkf $C/peftpipe.xz; chmod +x $C/peftpipe
B() { # label batch seq env...
  local label=$1 batch=$2 seq=$3; shift 3; echo "-- $label"
  env "$@" $C/peftpipe bench train --config $C/llama-3.2-1b.config.json --device cuda --batch $batch --seq $seq \
    --rank 16 --alpha 32 --steps 20 --warmup 5 2>&1 | grep -vE "^RESULT" | tail -3; }
$C/peftpipe bench train --config $C/llama-3.2-1b.config.json --device cuda --batch 1 --seq 64 --steps 1 --warmup 1 >/dev/null 2>&1
B "fused, pool kept 8x512" 8 512 PEFTPIPE_FUSED=1
B "fused, pool released (as call 3) 8x512" 8 512 PEFTPIPE_POOL_RELEASE=1
B "before: unfused, events on, pool released 8x512" 8 512 PEFTPIPE_FUSED=0 PEFTPIPE_EVENT_TRACKING=1 PEFTPIPE_POOL_RELEASE=1
B "fused, pool kept 2x2048" 2 2048 PEFTPIPE_FUSED=1
