// Hopper flash attention on wgmma (head_dim 128, bf16): the persistent warp-specialised TMA forward
// (kernels/wgmma/forward.cuh) and the deterministic dK/dV and dQ kernels (kernels/wgmma/backward.cuh),
// launched by src/ops/flash.rs in place of kernels/flash_attn.cu's `flash_mma_*_bf16_d128` on a
// GPU of compute capability 9.0 (PEFTPIPE_FLASH=mma keeps those). wgmma, setmaxnreg and TMA exist
// only in the arch-specific target sm_90a, so build.rs compiles this file with -arch=compute_90a
// (and only when CUDA_COMPUTE_CAP is 90; otherwise the module is empty and never loaded).
//
// Entry points (the harnesses in benches/gpu/wgmma/ run them against an f64 reference and fa2):
//   flash_wgmma_forward_persistent_bf16_d128(tq, tk, tv, valid, o, lse, batch, heads, kv_heads,
//       queries, keys, offset, causal, scale, q_bthd, kv_bthd)   — q, k, v as TMA tensor maps
//   flash_wgmma_backward_dkdv_bf16_d128 / flash_wgmma_backward_dq_bf16_d128 — fa2's arguments
#include "wgmma/forward.cuh"
#include "wgmma/backward.cuh"
