//! Differentiable operations for training on candle, with CPU and CUDA paths.
//!
//! Owns every op the training path uses whose stock candle version either has no backward (the fused
//! `rms_norm`, `layer_norm`, `softmax_last_dim`, `rope`, `sdpa` are applied with `apply_op*_no_bwd`
//! and silently cut gradients) or computes gradients nobody needs (a frozen weight's dW, a constant
//! mask's gradient). Each op here computes its forward with candle's kernels on *detached* inputs (so
//! no graph is built for the forward internals, and evaluation with untracked inputs builds none at
//! all) and attaches an analytic backward that returns a gradient for the tracked input only.
//!
//! Must not: know about models, PEFT methods or pipelines; hold state between calls; call any of
//! candle's no-backward ops on a tensor that is part of the graph.
//!
//! Every op has a finite-difference test of its backward (f64, CPU) in `tests/ops_grad.rs` and beside
//! the code. With `--features cuda`, RMSNorm, RoPE, SwiGLU and the linear + cross-entropy run on
//! CUDA (bf16/f32) as peftpipe's own fused kernels (`cuda`); the candle composition each replaces
//! stays the CPU path and the reference `tests/cuda_kernels.rs` compares them against. Attention
//! runs as a flash-attention kernel on CUDA ([`flash`], `kernels/flash_attn.cu`).

mod attach;
pub mod attention;
pub mod constant;
#[cfg(feature = "cuda")]
pub mod cuda;
pub mod flash;
pub mod linear;
pub mod loss;
pub mod low_rank;
pub mod norm;
pub mod offload;
pub mod rope;
pub mod softmax;
pub mod swiglu;

pub use attention::{attention, causal_mask, MASK_VALUE};
pub use constant::{
    add_constant, add_residual, add_tracked, broadcast_mul_tracked, cat_tracked, div_constant,
    dot_constant, gradient_seed, matmul_tracked, mul_constant, sub_constant, where_cond_tracked,
};
pub use flash::{
    attention_heads, causal_attention, flash_attention, full_attention, CausalMask, Visibility,
};
pub use linear::{frozen_linear, linear};
pub use loss::{
    cross_entropy, linear_cross_entropy, next_token_cross_entropy, next_token_linear_cross_entropy,
    token_nll, CrossEntropy,
};
pub use low_rank::{
    cast_factors, frozen_norm_linear, low_rank_linear, low_rank_norm_linear,
    low_rank_swiglu_linear, DenseMap, Factors, FrozenMap,
};
pub use norm::{layer_norm, rms_norm, NormedInput, Renorm};
pub use rope::{apply_rope, rope_heads, RopeScaling, RotaryEmbedding};
pub use softmax::{masked_softmax, softmax_last_dim};
pub use swiglu::{swiglu, swiglu_backward, swiglu_backward_with_product};
