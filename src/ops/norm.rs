//! RMSNorm and LayerNorm with analytic backwards; the weight and bias are frozen constants.
//!
//! Forward: the input is normalized in f32 (f64 stays f64) with candle's fused kernel, cast back to
//! the input dtype and scaled by the weight, as Hugging Face does (`weight * x_normed.to(dtype)`).
//! Backward (for the input only): RMSNorm `dx = r·(g·w) − x·r³·mean((g·w)·x)`; LayerNorm
//! `dx = r·(g·w − mean(g·w) − x̂·mean(g·w·x̂))`. Must not: produce gradients for the weight or bias
//! (norm layers are frozen in every PEFT method we implement).

use candle_core::{bail, DType, Result, Tensor, D};

use super::attach::with_backward;

/// The dtype the statistics are computed in: f32 for half types, otherwise the input's own.
fn internal_dtype(dtype: DType) -> DType {
    match dtype {
        DType::F16 | DType::BF16 => DType::F32,
        other => other,
    }
}

fn check_weight(name: &str, x: &Tensor, weight: &Tensor) -> Result<usize> {
    let hidden = x.dim(D::Minus1)?;
    if weight.dims() != [hidden] {
        bail!(
            "{name}: weight {:?} does not match the input's last dimension {hidden}",
            weight.shape()
        )
    }
    Ok(hidden)
}

/// `x / sqrt(mean(x²) + eps)` over the last dimension, in `x`'s dtype (f32 or f64).
fn rms_normalize(x: &Tensor, eps: f64) -> Result<Tensor> {
    if x.dtype() == DType::F32 && x.is_contiguous() {
        let ones = Tensor::ones(x.dim(D::Minus1)?, DType::F32, x.device())?;
        return candle_nn::ops::rms_norm(x, &ones, eps as f32);
    }
    let mean_square = x.sqr()?.mean_keepdim(D::Minus1)?;
    x.broadcast_mul(&(mean_square + eps)?.sqrt()?.recip()?)
}

/// `(x − mean) / sqrt(var + eps)` over the last dimension, in `x`'s dtype (f32 or f64).
fn layer_normalize(x: &Tensor, eps: f64) -> Result<Tensor> {
    if x.dtype() == DType::F32 && x.is_contiguous() {
        let hidden = x.dim(D::Minus1)?;
        let ones = Tensor::ones(hidden, DType::F32, x.device())?;
        let zeros = Tensor::zeros(hidden, DType::F32, x.device())?;
        return candle_nn::ops::layer_norm(x, &ones, &zeros, eps as f32);
    }
    let centered = x.broadcast_sub(&x.mean_keepdim(D::Minus1)?)?;
    let variance = centered.sqr()?.mean_keepdim(D::Minus1)?;
    centered.broadcast_mul(&(variance + eps)?.sqrt()?.recip()?)
}

/// RMSNorm over the last dimension: `weight · (x / sqrt(mean(x²) + eps))`.
pub fn rms_norm(x: &Tensor, weight: &Tensor, eps: f64) -> Result<Tensor> {
    check_weight("rms_norm", x, weight)?;
    #[cfg(feature = "cuda")]
    if super::cuda::applies("rms_norm", x) {
        return super::cuda::rms_norm(x, weight, eps);
    }
    let dtype = x.dtype();
    let internal = internal_dtype(dtype);
    let weight = weight.detach().to_dtype(dtype)?;
    let normalized = rms_normalize(&x.detach().to_dtype(internal)?.contiguous()?, eps)?;
    let output = normalized.to_dtype(dtype)?.broadcast_mul(&weight)?;
    with_backward("rms-norm", x, output, move |x, _y, grad| {
        let x32 = x.detach().to_dtype(internal)?;
        let gw = grad
            .to_dtype(internal)?
            .broadcast_mul(&weight.to_dtype(internal)?)?;
        let r = (x32.sqr()?.mean_keepdim(D::Minus1)? + eps)?
            .sqrt()?
            .recip()?;
        let projection = (&gw * &x32)?.mean_keepdim(D::Minus1)?;
        let dx = (gw.broadcast_mul(&r)? - x32.broadcast_mul(&(r.powf(3.0)? * projection)?)?)?;
        dx.to_dtype(dtype)
    })
}

/// LayerNorm over the last dimension: `weight · (x − mean)/sqrt(var + eps) + bias`.
pub fn layer_norm(x: &Tensor, weight: &Tensor, bias: Option<&Tensor>, eps: f64) -> Result<Tensor> {
    let hidden = check_weight("layer_norm", x, weight)?;
    if let Some(bias) = bias {
        if bias.dims() != [hidden] {
            bail!(
                "layer_norm: bias {:?} does not match {hidden}",
                bias.shape()
            )
        }
    }
    let dtype = x.dtype();
    let internal = internal_dtype(dtype);
    let weight = weight.detach().to_dtype(dtype)?;
    let normalized = layer_normalize(&x.detach().to_dtype(internal)?.contiguous()?, eps)?;
    let mut output = normalized.to_dtype(dtype)?.broadcast_mul(&weight)?;
    if let Some(bias) = bias {
        output = output.broadcast_add(&bias.detach().to_dtype(dtype)?)?;
    }
    with_backward("layer-norm", x, output, move |x, _y, grad| {
        let x32 = x.detach().to_dtype(internal)?;
        let gw = grad
            .to_dtype(internal)?
            .broadcast_mul(&weight.to_dtype(internal)?)?;
        let centered = x32.broadcast_sub(&x32.mean_keepdim(D::Minus1)?)?;
        let r = (centered.sqr()?.mean_keepdim(D::Minus1)? + eps)?
            .sqrt()?
            .recip()?;
        let x_hat = centered.broadcast_mul(&r)?;
        let mean_gw = gw.mean_keepdim(D::Minus1)?;
        let mean_gw_x_hat = (&gw * &x_hat)?.mean_keepdim(D::Minus1)?;
        let inner = (gw.broadcast_sub(&mean_gw)? - x_hat.broadcast_mul(&mean_gw_x_hat)?)?;
        inner.broadcast_mul(&r)?.to_dtype(dtype)
    })
}
