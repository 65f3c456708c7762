//! The low-rank adapted linear map `y = f(x) + s·(x∘m)·Aᵀ·Bᵀ` as one graph node.
//!
//! Owns [`low_rank_linear`]: a frozen map `f` (a dense `x·Wᵀ + b`, or anything implementing
//! [`FrozenMap`], e.g. a 4-bit weight), plus the rank-`r` update of LoRA with an optional constant
//! (dropout) mask `m` on its input. Composed from candle's ops, the same map keeps the base output
//! and the update alive until the backward ends (two `[rows, out]` tensors per adapted linear) and
//! runs two extra full-size additions: one in the forward (`f(x) + update`) and one in the backward
//! (the base's and the update's contributions to `dx`). Here the node keeps only its inputs `x`, `A`,
//! `B`, its output and the `[rows, r]` intermediate, and on CUDA both additions happen inside cuBLAS
//! (`β = 1`, accumulating the rank-`r` product into the fresh base output / base input gradient,
//! [`super::cuda::gemm_accumulate`]). On the CPU the same formulas run as candle ops: the reference
//! the CUDA path is tested against (tests/device.rs, tests/cuda_kernels.rs).
//!
//! Gradients: `t = s·(dy·B)`; `dA = tᵀ·(x∘m)`, `dB = dyᵀ·h` with `h = s·(x∘m)·Aᵀ`,
//! `dx = f'(dy) + (t·A)∘m` — each only for a tracked input, in that input's dtype (`A`/`B` are cast
//! to `x`'s dtype for the products, as a `to_dtype` in the graph would). Must not: know about PEFT
//! methods or adapters; give the frozen map or the mask a gradient.

use std::sync::Arc;

use candle_core::{bail, Result, Tensor};

use super::attach::with_backward3;
use super::linear::frozen_linear;

/// The frozen part `f` of a low-rank adapted linear map.
pub trait FrozenMap: Send + Sync {
    /// `f(x)` for a detached, contiguous `x [rows, in]`: a fresh `[rows, out]` tensor (it is
    /// accumulated into in place).
    fn forward(&self, x: &Tensor) -> Result<Tensor>;

    /// The input gradient `dy·∂f/∂x` for `dy [rows, out]`: a fresh `[rows, in]` tensor (it is
    /// accumulated into in place).
    fn input_grad(&self, dy: &Tensor) -> Result<Tensor>;
}

/// `f(x) = x·Wᵀ (+ b)` with a frozen `W [out, in]` and bias `[out]`.
pub struct DenseMap {
    pub weight: Tensor,
    pub bias: Option<Tensor>,
}

impl FrozenMap for DenseMap {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let y = frozen_linear(x, &self.weight)?;
        match &self.bias {
            Some(bias) => y.broadcast_add(bias),
            None => Ok(y),
        }
    }

    fn input_grad(&self, dy: &Tensor) -> Result<Tensor> {
        dy.matmul(&self.weight)
    }
}

/// `c + α·a·op(b)` for `c [M, N]`, `a [M, K]` and `b [N, K]` (`transposed`: `op(b) = bᵀ`) or
/// `b [K, N]`. On CUDA (bf16/f32, the GEMM kernel switched on) `c` is updated in place by one
/// cuBLAS call with `β = 1` and returned; otherwise a new tensor.
fn accumulate(c: Tensor, a: &Tensor, b: &Tensor, transposed: bool, alpha: f64) -> Result<Tensor> {
    #[cfg(feature = "cuda")]
    if super::cuda::applies("lora_gemm", &c) && a.dtype() == c.dtype() && b.dtype() == c.dtype() {
        super::cuda::gemm_accumulate(&c, a, b, transposed, alpha)?;
        return Ok(c);
    }
    let product = if transposed {
        a.matmul(&b.t()?)?
    } else {
        a.matmul(b)?
    };
    let product = if alpha == 1.0 {
        product
    } else {
        product.affine(alpha, 0.0)?
    };
    c.add(&product)
}

/// `y = f(x) + scale·(x∘mask)·Aᵀ·Bᵀ` for `x [.., in]`, `A [r, in]`, `B [out, r]` (any float dtype:
/// cast to `x`'s for the products) and an optional constant `mask [rows, in]` (`rows` = all
/// dimensions of `x` but the last). Gradients reach the tracked ones of `x`, `A`, `B`.
pub fn low_rank_linear(
    x: &Tensor,
    base: Arc<dyn FrozenMap>,
    a: &Tensor,
    b: &Tensor,
    scale: f64,
    mask: Option<Tensor>,
) -> Result<Tensor> {
    let dims = x.dims().to_vec();
    let Some(&in_features) = dims.last() else {
        bail!("low_rank_linear: the input must have at least one dimension")
    };
    let (rank, a_in) = a.dims2()?;
    let (out_features, b_rank) = b.dims2()?;
    if a_in != in_features || b_rank != rank {
        bail!(
            "low_rank_linear: input {:?}, A {:?} ([r, in]) and B {:?} ([out, r]) do not match",
            x.shape(),
            a.shape(),
            b.shape()
        )
    }
    let rows = x.elem_count() / in_features.max(1);
    if let Some(mask) = &mask {
        if mask.dims() != [rows, in_features] {
            bail!(
                "low_rank_linear: the mask {:?} must be [{rows}, {in_features}]",
                mask.shape()
            )
        }
    }
    let dtype = x.dtype();
    let a_c = a.detach().to_dtype(dtype)?;
    let b_c = b.detach().to_dtype(dtype)?;
    let masked = |x: &Tensor| -> Result<Tensor> {
        let x = x.detach().contiguous()?.reshape((rows, in_features))?;
        match &mask {
            Some(mask) => x.mul(mask),
            None => Ok(x),
        }
    };
    let x2 = x.detach().contiguous()?.reshape((rows, in_features))?;
    let input = masked(x)?;
    let hidden = input.matmul(&a_c.t()?)?.affine(scale, 0.0)?;
    let y = accumulate(base.forward(&x2)?, &hidden, &b_c, true, 1.0)?;
    let mut out_dims = dims;
    if let Some(last) = out_dims.last_mut() {
        *last = out_features;
    }
    let y = y.reshape(out_dims)?;
    drop((x2, input));
    with_backward3(
        "low-rank-linear",
        [x, a, b],
        y,
        move |[x, a, b], _y, grad| {
            let dy = grad.contiguous()?.reshape((rows, out_features))?;
            let t = dy.matmul(&b_c)?.affine(scale, 0.0)?;
            let ga = if a.track_op() {
                let input = x.detach().contiguous()?.reshape((rows, in_features))?;
                let input = match &mask {
                    Some(mask) => input.mul(mask)?,
                    None => input,
                };
                Some(t.t()?.matmul(&input)?.to_dtype(a.dtype())?)
            } else {
                None
            };
            let gb = if b.track_op() {
                Some(dy.t()?.matmul(&hidden)?.to_dtype(b.dtype())?)
            } else {
                None
            };
            let gx = if x.track_op() {
                let dx = base.input_grad(&dy)?;
                let dx = match &mask {
                    None => accumulate(dx, &t, &a_c, false, 1.0)?,
                    Some(mask) => dx.add(&t.matmul(&a_c)?.mul(mask)?)?,
                };
                Some(dx.reshape(x.shape())?)
            } else {
                None
            };
            Ok([gx, ga, gb])
        },
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{DType, Device, Var};

    /// The composed reference: candle's own ops, as LoRA's forward was written before.
    fn composed(
        x: &Tensor,
        w: &Tensor,
        bias: &Tensor,
        a: &Tensor,
        b: &Tensor,
        scale: f64,
        mask: Option<&Tensor>,
    ) -> Result<Tensor> {
        let rows = x.elem_count() / x.dim(candle_core::D::Minus1)?;
        let x2 = x.reshape((rows, ()))?;
        let base = x2.matmul(&w.t()?)?.broadcast_add(bias)?;
        let input = match mask {
            Some(mask) => x2.mul(mask)?,
            None => x2,
        };
        let delta = input.matmul(&a.t()?)?.affine(scale, 0.0)?.matmul(&b.t()?)?;
        base.add(&delta)?.reshape((x.dim(0)?, x.dim(1)?, w.dim(0)?))
    }

    #[test]
    fn value_and_gradients_equal_the_composition() -> Result<()> {
        let device = Device::Cpu;
        for with_mask in [false, true] {
            let x = Var::randn(0f64, 1.0, (2, 3, 5), &device)?;
            let w = Tensor::randn(0f64, 1.0, (4, 5), &device)?;
            let bias = Tensor::randn(0f64, 1.0, 4, &device)?;
            let a = Var::randn(0f64, 1.0, (2, 5), &device)?;
            let b = Var::randn(0f64, 1.0, (4, 2), &device)?;
            let mask = with_mask
                .then(|| {
                    Tensor::rand(0f64, 1.0, (6, 5), &device)?
                        .ge(0.3)?
                        .to_dtype(DType::F64)
                })
                .transpose()?;
            let base = Arc::new(DenseMap {
                weight: w.clone(),
                bias: Some(bias.clone()),
            });
            let ours = low_rank_linear(
                x.as_tensor(),
                base,
                a.as_tensor(),
                b.as_tensor(),
                1.5,
                mask.clone(),
            )?;
            let theirs = composed(
                x.as_tensor(),
                &w,
                &bias,
                a.as_tensor(),
                b.as_tensor(),
                1.5,
                mask.as_ref(),
            )?;
            let weights = Tensor::randn(0f64, 1.0, (2, 3, 4), &device)?;
            let g_ours = ours.mul(&weights)?.sum_all()?.backward()?;
            let g_theirs = theirs.mul(&weights)?.sum_all()?.backward()?;
            let diff = (&ours - &theirs)?.abs()?.max_all()?.to_scalar::<f64>()?;
            assert!(diff < 1e-12, "value |Δ| = {diff}");
            for var in [&x, &a, &b] {
                let g1 = g_ours.get(var.as_tensor()).expect("gradient");
                let g2 = g_theirs.get(var.as_tensor()).expect("gradient");
                let diff = (g1 - g2)?.abs()?.max_all()?.to_scalar::<f64>()?;
                assert!(diff < 1e-12, "gradient |Δ| = {diff} (mask: {with_mask})");
            }
            assert!(g_ours.get(&w).is_none() && g_ours.get(&bias).is_none());
        }
        Ok(())
    }

    #[test]
    fn an_untracked_input_gets_no_gradient_and_frozen_factors_build_no_node() -> Result<()> {
        let device = Device::Cpu;
        let x = Tensor::randn(0f32, 1.0, (3, 5), &device)?;
        let w = Tensor::randn(0f32, 1.0, (4, 5), &device)?;
        let a = Var::randn(0f32, 1.0, (2, 5), &device)?;
        let b = Var::randn(0f32, 1.0, (4, 2), &device)?;
        let base: Arc<dyn FrozenMap> = Arc::new(DenseMap {
            weight: w,
            bias: None,
        });
        let y = low_rank_linear(&x, base.clone(), a.as_tensor(), b.as_tensor(), 2.0, None)?;
        let grads = y.sqr()?.sum_all()?.backward()?;
        assert!(grads.get(&x).is_none());
        assert!(grads.get(a.as_tensor()).is_some() && grads.get(b.as_tensor()).is_some());
        let detached = low_rank_linear(
            &x,
            base,
            &a.as_tensor().detach(),
            &b.as_tensor().detach(),
            2.0,
            None,
        )?;
        assert!(!detached.track_op(), "inference builds no graph");
        assert!(low_rank_linear(
            &x,
            Arc::new(DenseMap {
                weight: x.clone(),
                bias: None
            }),
            a.as_tensor(),
            a.as_tensor(),
            1.0,
            None
        )
        .is_err());
        Ok(())
    }
}
