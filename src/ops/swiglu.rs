//! SwiGLU's gating, `silu(gate) · up`, the product inside a Llama MLP.
//!
//! On the CPU (and for dtypes the kernels do not take) it is candle's `silu` and `mul`, both with
//! autograd; on CUDA it is one fused kernel forward and one backward that gives both gradients
//! (`ops::cuda`), which keeps no `silu(gate)` tensor alive for the backward. Must not: be given
//! tensors of different shapes (an error, not a broadcast).

use candle_core::{bail, Result, Tensor};

/// `silu(gate) · up`, elementwise; gradients reach both inputs.
pub fn swiglu(gate: &Tensor, up: &Tensor) -> Result<Tensor> {
    if gate.shape() != up.shape() {
        bail!(
            "swiglu: gate {:?} and up {:?} differ",
            gate.shape(),
            up.shape()
        )
    }
    #[cfg(feature = "cuda")]
    if super::cuda::applies("swiglu", gate) && gate.dtype() == up.dtype() {
        return super::cuda::swiglu(gate, up);
    }
    gate.silu()? * up
}

/// The gradients of `silu(gate) · up` for an upstream gradient `grad`, computed without a graph
/// (for ops that recompute SwiGLU in their own backward, `ops::low_rank_swiglu_linear`):
/// `d_up = grad · silu(gate)`, `d_gate = grad · up · σ(gate) · (1 + gate · (1 − σ(gate)))`.
pub fn swiglu_backward(gate: &Tensor, up: &Tensor, grad: &Tensor) -> Result<(Tensor, Tensor)> {
    if gate.shape() != up.shape() || gate.shape() != grad.shape() {
        bail!(
            "swiglu_backward: gate {:?}, up {:?} and gradient {:?} differ",
            gate.shape(),
            up.shape(),
            grad.shape()
        )
    }
    let (gate, up, grad) = (gate.detach(), up.detach(), grad.detach());
    #[cfg(feature = "cuda")]
    if super::cuda::applies("swiglu", &gate)
        && gate.dtype() == up.dtype()
        && gate.dtype() == grad.dtype()
    {
        return super::cuda::swiglu_backward(&gate, &up, &grad);
    }
    let sigmoid = gate.neg()?.exp()?.affine(1.0, 1.0)?.recip()?;
    let d_up = grad.mul(&gate.mul(&sigmoid)?)?;
    let slope = sigmoid.mul(&gate.mul(&sigmoid.affine(-1.0, 1.0)?)?.affine(1.0, 1.0)?)?;
    let d_gate = grad.mul(&up)?.mul(&slope)?;
    Ok((d_gate, d_up))
}

/// SwiGLU's backward (as [`swiglu_backward`]) together with `tᵀ·(silu(gate)·up)` for
/// `t [rows, r]`, for `gate`, `up`, `grad` `[rows, n]`: `(d_gate, d_up, product [r, n] in f32)`.
/// In `ops::low_rank_swiglu_linear`'s backward the product of a low-rank update's `A` gradient is
/// the recomputed SwiGLU output's only other use; on CUDA (bf16, r of 8, 16 or 32) one kernel
/// reads `gate`, `up` and `grad` once and never writes that output (`ops::cuda`). `None` where the
/// kernel does not apply (the CPU, other dtypes or ranks): the caller recomputes the product.
pub fn swiglu_backward_with_product(
    gate: &Tensor,
    up: &Tensor,
    grad: &Tensor,
    t: &Tensor,
) -> Result<Option<(Tensor, Tensor, Tensor)>> {
    #[cfg(feature = "cuda")]
    if gate.device().is_cuda() {
        return super::cuda::swiglu_backward_lora(gate, up, grad, t);
    }
    let _ = (gate, up, grad, t);
    Ok(None)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    #[test]
    fn backward_equals_autograd() -> Result<()> {
        let device = Device::Cpu;
        let gate = Var::randn(0f64, 2.0, (3, 7), &device)?;
        let up = Var::randn(0f64, 1.0, (3, 7), &device)?;
        let grad = Tensor::randn(0f64, 1.0, (3, 7), &device)?;
        let store = swiglu(gate.as_tensor(), up.as_tensor())?
            .mul(&grad)?
            .sum_all()?
            .backward()?;
        let (d_gate, d_up) = swiglu_backward(gate.as_tensor(), up.as_tensor(), &grad)?;
        for (ours, var) in [(d_gate, &gate), (d_up, &up)] {
            let theirs = store.get(var.as_tensor()).expect("gradient");
            let diff = (ours - theirs)?.abs()?.max_all()?.to_scalar::<f64>()?;
            assert!(diff < 1e-12, "|Δ| = {diff}");
        }
        Ok(())
    }
}
