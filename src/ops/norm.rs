//! RMSNorm and LayerNorm with analytic backwards.
//!
//! Forward: the input is normalized in f32 (f64 stays f64) with candle's fused kernel, cast back to
//! the input dtype and scaled by the weight, as Hugging Face does (`weight * x_normed.to(dtype)`).
//! Backward for the input: RMSNorm `dx = r·(g·w) − x·r³·mean((g·w)·x)`; LayerNorm
//! `dx = r·(g·w − mean(g·w) − x̂·mean(g·w·x̂))`. A frozen weight and bias (the base model's) are
//! constants: they get no gradient and no GradStore entry, and the op keeps only the input. A
//! tracked weight or bias (a trained copy, PEFT's `modules_to_save`) gets `dw = Σ g·x̂` (x̂ as the
//! forward scaled it, in the input dtype) and `db = Σ g` over every position, summed in f32, in
//! the parameter's own dtype (`attach_trained`, shared with the CUDA RMSNorm); x̂ is recomputed
//! from the input in the backward rather than kept. Must not: track a frozen weight.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};

use candle_core::{bail, DType, Result, Tensor, D};

use super::attach::{with_backward, with_backward3};

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

/// `x / sqrt(mean(x²) + eps)` of `x` in `x`'s dtype, computed as the forward computes it (in f32
/// for half types): the x̂ a trained RMSNorm weight's gradient is taken against.
pub(super) fn rms_normalized(x: &Tensor, eps: f64) -> Result<Tensor> {
    let internal = internal_dtype(x.dtype());
    rms_normalize(&x.detach().to_dtype(internal)?.contiguous()?, eps)?.to_dtype(x.dtype())
}

/// `(x − mean) / sqrt(var + eps)` of `x` in `x`'s dtype, as the forward computes it.
pub(super) fn layer_normalized(x: &Tensor, eps: f64) -> Result<Tensor> {
    let internal = internal_dtype(x.dtype());
    layer_normalize(&x.detach().to_dtype(internal)?.contiguous()?, eps)?.to_dtype(x.dtype())
}

/// RMSNorm's input gradient (see the module docs), `weight` in `x`'s dtype.
fn rms_input_grad(x: &Tensor, grad: &Tensor, weight: &Tensor, eps: f64) -> Result<Tensor> {
    let dtype = x.dtype();
    let internal = internal_dtype(dtype);
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
}

/// LayerNorm's input gradient (see the module docs), `weight` in `x`'s dtype.
fn layer_input_grad(x: &Tensor, grad: &Tensor, weight: &Tensor, eps: f64) -> Result<Tensor> {
    let dtype = x.dtype();
    let internal = internal_dtype(dtype);
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
}

/// Whether a norm's parameters train: a tracked weight or bias (a trained copy).
fn trained(weight: &Tensor, bias: Option<&Tensor>) -> bool {
    weight.track_op() || bias.is_some_and(Tensor::track_op)
}

/// `output` (computed by the caller from detached inputs) as a graph node of `x`, a trained
/// `weight` and `bias`, each getting its gradient only when tracked: `dx = input_grad(x, g)`,
/// `dw = Σ g·normalized(x)` and `db = Σ g` over every position, the sums in f32 (f64 stays f64),
/// each in its parameter's dtype. `normalized(x)` is x̂ in `x`'s dtype, as the forward scaled it.
pub(super) fn attach_trained<N, G>(
    name: &'static str,
    x: &Tensor,
    weight: &Tensor,
    bias: Option<&Tensor>,
    output: Tensor,
    normalized: N,
    input_grad: G,
) -> Result<Tensor>
where
    N: Fn(&Tensor) -> Result<Tensor> + Send + Sync + 'static,
    G: Fn(&Tensor, &Tensor) -> Result<Tensor> + Send + Sync + 'static,
{
    // A norm without a bias passes an empty constant in its place: it never gets a gradient and
    // is never read (on the CPU, so no device allocates an empty buffer for it).
    let no_bias;
    let bias = match bias {
        Some(bias) => bias,
        None => {
            no_bias = Tensor::zeros(0, weight.dtype(), &candle_core::Device::Cpu)?;
            &no_bias
        }
    };
    with_backward3(
        name,
        [x, weight, bias],
        output,
        move |[x, weight, bias], _y, grad| {
            let dx = if x.track_op() {
                Some(input_grad(x, grad)?)
            } else {
                None
            };
            let hidden = grad.dim(D::Minus1)?;
            let internal = internal_dtype(grad.dtype());
            let rows = || grad.to_dtype(internal)?.reshape(((), hidden));
            let dw = if weight.track_op() {
                let x_hat = normalized(x)?.to_dtype(internal)?.reshape(((), hidden))?;
                Some((rows()? * x_hat)?.sum(0)?.to_dtype(weight.dtype())?)
            } else {
                None
            };
            let db = if bias.track_op() && bias.elem_count() == hidden {
                Some(rows()?.sum(0)?.to_dtype(bias.dtype())?)
            } else {
                None
            };
            Ok([dx, dw, db])
        },
    )
}

/// RMSNorm over the last dimension: `weight · (x / sqrt(mean(x²) + eps))`. A tracked `weight`
/// (a trained copy) gets its gradient; a frozen one is a constant.
pub fn rms_norm(x: &Tensor, weight: &Tensor, eps: f64) -> Result<Tensor> {
    check_weight("rms_norm", x, weight)?;
    #[cfg(feature = "cuda")]
    if super::cuda::applies("rms_norm", x) {
        return super::cuda::rms_norm(x, weight, eps);
    }
    let dtype = x.dtype();
    let internal = internal_dtype(dtype);
    let trained_weight = trained(weight, None).then(|| weight.clone());
    let weight = weight.detach().to_dtype(dtype)?;
    let normalized = rms_normalize(&x.detach().to_dtype(internal)?.contiguous()?, eps)?;
    let output = normalized.to_dtype(dtype)?.broadcast_mul(&weight)?;
    if let Some(trained_weight) = trained_weight {
        return attach_trained(
            "rms-norm-trained",
            x,
            &trained_weight,
            None,
            output,
            move |x| rms_normalized(x, eps),
            move |x, grad| rms_input_grad(x, grad, &weight, eps),
        );
    }
    with_backward("rms-norm", x, output, move |x, _y, grad| {
        rms_input_grad(x, grad, &weight, eps)
    })
}

/// The input gradient of RMSNorm with a frozen `weight`, by the same path [`rms_norm`]'s node
/// takes (the fused kernel on CUDA, [`rms_input_grad`] elsewhere).
fn frozen_rms_input_grad(x: &Tensor, grad: &Tensor, weight: &Tensor, eps: f64) -> Result<Tensor> {
    #[cfg(feature = "cuda")]
    if super::cuda::applies("rms_norm", x) {
        return super::cuda::rms_norm_input_grad(x, weight, grad, eps);
    }
    rms_input_grad(x, grad, &weight.to_dtype(x.dtype())?, eps)
}

/// An RMSNorm's output `rms_norm(x, weight, eps)` as the input of linear layers, which may read it
/// without keeping it for the backward (`LinearLayer::forward_normed`).
///
/// A layer's node keeps its input alive until the backward ends; the norm's output (`[rows,
/// hidden]`, one per norm, read by q/k/v or by gate/up) is then kept only so the backward can read
/// it again, while the norm's input `x` (the residual stream) is kept anyway. A deferring layer
/// computes its forward from the detached output [`NormedInput::deferred`] returns (computed once,
/// dropped with this struct) and enters the graph through its stand-in instead: a node that holds `x`'s
/// buffer (no copy) and whose gradient is the gradient *of the norm's output*, which its backward
/// turns into `x`'s (the same kernel [`rms_norm`]'s node runs, once for all the layers that read
/// it, their gradients summed first as for the norm's output). The layer's backward recomputes
/// the output from the stand-in with [`Renorm`], once for all the layers that read it. A layer
/// that does not defer reads
/// [`NormedInput::normed`], the plain [`rms_norm`] node; both kinds may read one `NormedInput`.
/// A tracked `weight` (a trained copy) is never deferred: its gradient needs the norm's node.
pub struct NormedInput {
    x: Tensor,
    weight: Tensor,
    eps: f64,
    value: std::cell::OnceCell<Tensor>,
    normed: std::cell::OnceCell<Tensor>,
    stand_in: std::cell::OnceCell<Tensor>,
    recomputed: Arc<Mutex<Recomputed>>,
}

/// Recomputes a deferred norm's output from its stand-in: the detached forward of [`rms_norm`],
/// bit for bit the output [`NormedInput::deferred`] returned. The readers of one norm share the
/// recomputation: the first backward to ask computes it, the others of the same norm (q/k/v,
/// gate/up: adjacent in the backward) take that one, and it is dropped when every reader has had
/// it or was dropped without asking. Not `Clone`: each one is one reader.
pub struct Renorm {
    weight: Tensor,
    eps: f64,
    shared: Arc<Mutex<Recomputed>>,
    /// Still counted among the shared state's readers to come.
    pending: AtomicBool,
}

/// The recomputed output, kept while readers are still to come.
#[derive(Default)]
struct Recomputed {
    value: Option<Tensor>,
    readers: usize,
}

impl Recomputed {
    /// One reader less; the value goes with the last.
    fn served(&mut self) {
        self.readers = self.readers.saturating_sub(1);
        if self.readers == 0 {
            self.value = None;
        }
    }
}

impl Renorm {
    /// `rms_norm(stand_in, weight, eps)`, detached (shared with the norm's other readers).
    pub fn apply(&self, stand_in: &Tensor) -> Result<Tensor> {
        let mut shared = self.shared.lock().unwrap_or_else(PoisonError::into_inner);
        let value = match &shared.value {
            Some(value) => value.clone(),
            None => rms_norm(&stand_in.detach(), &self.weight, self.eps)?,
        };
        if self.pending.swap(false, Ordering::Relaxed) {
            shared.served();
            if shared.readers > 0 {
                shared.value = Some(value.clone());
            }
        }
        Ok(value)
    }
}

impl Drop for Renorm {
    fn drop(&mut self) {
        if self.pending.swap(false, Ordering::Relaxed) {
            self.shared
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .served();
        }
    }
}

impl NormedInput {
    /// `rms_norm(x, weight, eps)` to be read by layers; nothing is computed yet.
    pub fn rms(x: &Tensor, weight: &Tensor, eps: f64) -> Result<Self> {
        check_weight("rms_norm", x, weight)?;
        Ok(Self {
            x: x.clone(),
            weight: weight.clone(),
            eps,
            value: Default::default(),
            normed: Default::default(),
            stand_in: Default::default(),
            recomputed: Arc::default(),
        })
    }

    /// The norm's output as a plain graph node ([`rms_norm`]), made once.
    pub fn normed(&self) -> Result<Tensor> {
        if let Some(normed) = self.normed.get() {
            return Ok(normed.clone());
        }
        let normed = rms_norm(&self.x, &self.weight, self.eps)?;
        Ok(self.normed.get_or_init(|| normed).clone())
    }

    /// The norm's input: the output has its shape, dtype and device.
    pub fn input(&self) -> &Tensor {
        &self.x
    }

    /// `None` when the norm cannot be deferred (a tracked weight); otherwise the stand-in node to
    /// enter the graph through, the detached output for the forward, and how to recompute it.
    pub fn deferred(&self) -> Result<Option<(Tensor, Tensor, Renorm)>> {
        if self.weight.track_op() {
            return Ok(None);
        }
        let value = match self.value.get() {
            Some(value) => value.clone(),
            None => {
                let value = rms_norm(&self.x.detach(), &self.weight, self.eps)?;
                self.value.get_or_init(|| value).clone()
            }
        };
        let stand_in = match self.stand_in.get() {
            Some(stand_in) => stand_in.clone(),
            None => {
                let (weight, eps) = (self.weight.detach(), self.eps);
                let stand_in = with_backward(
                    "rms-norm-deferred",
                    &self.x,
                    self.x.detach(),
                    move |x, _, grad| frozen_rms_input_grad(x, grad, &weight, eps),
                )?;
                self.stand_in.get_or_init(|| stand_in).clone()
            }
        };
        self.recomputed
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .readers += 1;
        let renorm = Renorm {
            weight: self.weight.detach(),
            eps: self.eps,
            shared: Arc::clone(&self.recomputed),
            pending: AtomicBool::new(true),
        };
        Ok(Some((stand_in, value, renorm)))
    }
}

/// LayerNorm over the last dimension: `weight · (x − mean)/sqrt(var + eps) + bias`. A tracked
/// `weight` or `bias` (a trained copy) gets its gradient; frozen ones are constants.
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
    #[cfg(feature = "cuda")]
    if super::cuda::applies("layer_norm", x) {
        return super::cuda::layer_norm(x, weight, bias, eps);
    }
    let dtype = x.dtype();
    let internal = internal_dtype(dtype);
    let trained_parameters = trained(weight, bias).then(|| (weight.clone(), bias.cloned()));
    let weight = weight.detach().to_dtype(dtype)?;
    let normalized = layer_normalize(&x.detach().to_dtype(internal)?.contiguous()?, eps)?;
    let mut output = normalized.to_dtype(dtype)?.broadcast_mul(&weight)?;
    if let Some(bias) = bias {
        output = output.broadcast_add(&bias.detach().to_dtype(dtype)?)?;
    }
    if let Some((trained_weight, trained_bias)) = trained_parameters {
        return attach_trained(
            "layer-norm-trained",
            x,
            &trained_weight,
            trained_bias.as_ref(),
            output,
            move |x| layer_normalized(x, eps),
            move |x, grad| layer_input_grad(x, grad, &weight, eps),
        );
    }
    with_backward("layer-norm", x, output, move |x, _y, grad| {
        layer_input_grad(x, grad, &weight, eps)
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    fn values(t: &Tensor) -> Result<Vec<f32>> {
        t.flatten_all()?.to_vec1::<f32>()
    }

    #[test]
    fn readers_of_one_norm_share_one_recomputation_and_release_it() -> Result<()> {
        let x = Var::from_tensor(&Tensor::randn(0f32, 1.0, (2, 3, 8), &Device::Cpu)?)?;
        let weight = Tensor::randn(0f32, 1.0, 8, &Device::Cpu)?;
        let input = NormedInput::rms(x.as_tensor(), &weight, 1e-5)?;
        let reader = || -> Result<(Tensor, Tensor, Renorm)> {
            input
                .deferred()?
                .ok_or_else(|| candle_core::Error::Msg("a frozen weight defers".into()))
        };
        let (stand_in, forward, q) = reader()?;
        let (_, _, k) = reader()?;
        let (_, _, v) = reader()?;
        // A reader that never asks (a frozen projection) is not waited for.
        drop(reader()?.2);
        let kept = || input.recomputed.lock().is_ok_and(|r| r.value.is_some());
        let first = v.apply(&stand_in)?;
        assert_eq!(values(&first)?, values(&forward)?);
        assert!(kept());
        let second = k.apply(&stand_in)?;
        assert_eq!(second.id(), first.id(), "the second reader recomputed");
        let third = q.apply(&stand_in)?;
        assert_eq!(third.id(), first.id(), "the third reader recomputed");
        assert!(!kept(), "every reader was served, yet the output is kept");
        // A second backward over the same graph recomputes, to the same values.
        let again = q.apply(&stand_in)?;
        assert_ne!(again.id(), first.id());
        assert_eq!(values(&again)?, values(&first)?);
        assert!(!kept());
        // Readers dropped before asking release it too.
        let (stand_in, _, a) = reader()?;
        let (_, _, b) = reader()?;
        a.apply(&stand_in)?;
        assert!(kept());
        drop(b);
        assert!(!kept());
        Ok(())
    }
}
