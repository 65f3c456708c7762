//! Softmax over the last dimension, optionally after adding a constant mask, with its backward.
//!
//! Forward: candle's fused `softmax_last_dim` on a detached input (half types are upcast to f32
//! first, as transformers' eager attention does). Backward: `dx = y·(g − Σ g·y)`. The additive mask
//! is a constant: it never gets a gradient. Must not: be fed a mask with `-inf` (use [`MASK_VALUE`](super::MASK_VALUE)
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
    #[cfg(feature = "cuda")]
    if super::cuda::applies("softmax", x) {
        if let Some(probabilities) = super::cuda::masked_softmax(x, mask)? {
            return Ok(probabilities);
        }
    }
    let dtype = x.dtype();
    let internal = internal_dtype(dtype);
    let mask = mask
        .map(|mask| mask.detach().to_dtype(internal))
        .transpose()?;
    let probabilities = softmax_in(x, mask.as_ref(), internal)?;
    let output = probabilities.to_dtype(dtype)?;
    with_backward("softmax", x, output, move |x, y, grad| {
        // In f32/f64 the backward reads y from the op's own output. For half types it recomputes
        // the f32 probabilities from the (kept) input instead: y rounded to bf16 loses 1 − y of a
        // peaked row entirely (bf16 steps by 2⁻⁸ near 1), which made bf16 q/k gradients 10× off
        // on stories260k. This is what transformers' eager attention gets by saving its f32
        // softmax, without keeping an f32 copy of every score matrix alive until the backward.
        let y = if internal == dtype {
            y.clone()
        } else {
            softmax_in(x, mask.as_ref(), internal)?
        };
        let grad = grad.to_dtype(internal)?;
        let projection = (&grad * &y)?.sum_keepdim(D::Minus1)?;
        (grad.broadcast_sub(&projection)? * &y)?.to_dtype(dtype)
    })
}

/// `softmax(x + mask)` of a detached `x`, in `internal` precision.
fn softmax_in(x: &Tensor, mask: Option<&Tensor>, internal: DType) -> Result<Tensor> {
    let mut scores = x.detach().to_dtype(internal)?;
    if let Some(mask) = mask {
        scores = add_constant(&scores, mask)?;
    }
    candle_nn::ops::softmax_last_dim(&scores.contiguous()?)
}
