//! Softmax over the last dimension, optionally after adding a constant mask, with its backward.
//!
//! Forward: candle's fused `softmax_last_dim` on a detached input (half types are upcast to f32
//! first, as transformers' eager attention does). Backward: `dx = y·(g − Σ g·y)`. The additive mask
//! is a constant: it never gets a gradient. Must not: be fed a mask with `-inf` (use [`MASK_VALUE`]
//! from `attention`, a finite minimum, so fully masked rows stay finite).

use candle_core::{DType, Result, Tensor, D};

use super::attach::with_backward;
use super::constant::add_constant;

fn internal_dtype(dtype: DType) -> DType {
    match dtype {
        DType::F16 | DType::BF16 => DType::F32,
        other => other,
    }
}

/// `softmax(x)` over the last dimension.
pub fn softmax_last_dim(x: &Tensor) -> Result<Tensor> {
    masked_softmax(x, None)
}

/// `softmax(x + mask)` over the last dimension; `mask` (additive, broadcast into `x`) is constant.
/// The result has `x`'s dtype; the arithmetic runs in f32 (f64 stays f64).
pub fn masked_softmax(x: &Tensor, mask: Option<&Tensor>) -> Result<Tensor> {
    let dtype = x.dtype();
    let internal = internal_dtype(dtype);
    let mut scores = x.detach().to_dtype(internal)?;
    if let Some(mask) = mask {
        scores = add_constant(&scores, &mask.detach().to_dtype(internal)?)?;
    }
    let probabilities = candle_nn::ops::softmax_last_dim(&scores.contiguous()?)?;
    let output = probabilities.to_dtype(dtype)?;
    // The backward reads y from the op's own output (the graph keeps it anyway) instead of
    // capturing the f32 probabilities: one score-sized tensor per layer saved, not two.
    with_backward("softmax", x, output, move |_x, y, grad| {
        let y = y.to_dtype(internal)?;
        let grad = grad.to_dtype(internal)?;
        let projection = (&grad * &y)?.sum_keepdim(D::Minus1)?;
        (grad.broadcast_sub(&projection)? * &y)?.to_dtype(dtype)
    })
}
