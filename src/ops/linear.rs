//! The frozen linear map `y = x·Wᵀ (+ b)`: gradient to `x` only, never a dW.
//!
//! Owns the GEMM custom op (the verified recipe of candle-training.md §8): its forward calls the
//! backend's `matmul` (the same cuBLAS call `x.matmul(&w.t())` makes), its backward is one GEMM
//! `dx = dy·W` and returns nothing for `W`, even when `W` is a `Var`. Must not: ever produce a
//! gradient for the weight or the bias.

use candle_core::backend::BackendStorage;
use candle_core::{
    bail, CpuStorage, CudaStorage, CustomOp2, Layout, MetalStorage, Result, Shape, Tensor,
};

use super::constant::add_constant;

type MatmulPlan = ((usize, usize, usize, usize), Layout, Layout, Shape);

/// `y = x·wᵀ` for `x [.., k]` (contiguous) and `w [n, k]`: the (b, m, n, k) of the GEMM, `x` seen
/// as `[m, k]`, `wᵀ` as `[k, n]`, and the output shape `[.., n]`.
fn plan(x_layout: &Layout, w_layout: &Layout) -> Result<MatmulPlan> {
    let (n, k) = w_layout.shape().dims2()?;
    let dims = x_layout.dims();
    if dims.last() != Some(&k) {
        bail!(
            "frozen_linear: input {:?} does not match weight {:?} ([out, in])",
            x_layout.shape(),
            w_layout.shape()
        )
    }
    if !x_layout.is_contiguous() {
        bail!("frozen_linear: the input must be contiguous")
    }
    let m = x_layout.shape().elem_count() / k;
    let x2 = Layout::new((m, k).into(), vec![k, 1], x_layout.start_offset());
    let mut out: Vec<usize> = dims[..dims.len() - 1].to_vec();
    out.push(n);
    Ok((
        (1, m, n, k),
        x2,
        w_layout.transpose(0, 1)?,
        Shape::from(out),
    ))
}

fn forward<S: BackendStorage>(
    x: &S,
    x_layout: &Layout,
    w: &S,
    w_layout: &Layout,
) -> Result<(S, Shape)> {
    let (bmnk, x2, wt, shape) = plan(x_layout, w_layout)?;
    Ok((x.matmul(w, bmnk, &x2, &wt)?, shape))
}

struct FrozenMatmul;

impl CustomOp2 for FrozenMatmul {
    fn name(&self) -> &'static str {
        "frozen-linear"
    }

    fn cpu_fwd(
        &self,
        x: &CpuStorage,
        x_layout: &Layout,
        w: &CpuStorage,
        w_layout: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        forward(x, x_layout, w, w_layout)
    }

    fn cuda_fwd(
        &self,
        x: &CudaStorage,
        x_layout: &Layout,
        w: &CudaStorage,
        w_layout: &Layout,
    ) -> Result<(CudaStorage, Shape)> {
        forward(x, x_layout, w, w_layout)
    }

    fn metal_fwd(
        &self,
        x: &MetalStorage,
        x_layout: &Layout,
        w: &MetalStorage,
        w_layout: &Layout,
    ) -> Result<(MetalStorage, Shape)> {
        forward(x, x_layout, w, w_layout)
    }

    /// `dx = dy·w`; the weight gets `None`: no dW GEMM, no GradStore entry.
    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _y: &Tensor,
        dy: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let dx = dy.reshape(((), w.dim(0)?))?.matmul(w)?.reshape(x.shape())?;
        Ok((Some(dx), None))
    }
}

/// `y = x·wᵀ` for `x [.., in]` and `w [out, in]`; the gradient reaches `x` only.
///
/// `x` and `w` must share a dtype and device (a mismatch is an error, not a silent cast).
pub fn frozen_linear(x: &Tensor, w: &Tensor) -> Result<Tensor> {
    if x.dtype() != w.dtype() {
        bail!(
            "frozen_linear: input dtype {:?} differs from weight dtype {:?}",
            x.dtype(),
            w.dtype()
        )
    }
    let x = x.contiguous()?;
    // An untracked input builds no graph node, even when `w` happens to be a `Var`.
    if x.track_op() {
        x.apply_op2(w, FrozenMatmul)
    } else {
        x.apply_op2_no_bwd(w, &FrozenMatmul)
    }
}

/// `y = x·wᵀ + b` with `w [out, in]` and `b [out]` both frozen.
pub fn linear(x: &Tensor, w: &Tensor, bias: Option<&Tensor>) -> Result<Tensor> {
    let y = frozen_linear(x, w)?;
    match bias {
        Some(bias) => add_constant(&y, bias),
        None => Ok(y),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{DType, Device, Var};

    #[test]
    fn forward_equals_stock_matmul_and_weight_gets_no_gradient() -> Result<()> {
        let device = Device::Cpu;
        let x = Var::randn(0f64, 1.0, (2, 3, 5), &device)?;
        let w = Var::randn(0f64, 1.0, (4, 5), &device)?;
        let y = frozen_linear(x.as_tensor(), w.as_tensor())?;
        let reference = x.broadcast_matmul(&w.t()?)?;
        let difference = (&y - &reference)?.abs()?.max_all()?.to_scalar::<f64>()?;
        assert!(difference < 1e-12, "max |Δ| = {difference}");
        let grads = y.sqr()?.sum_all()?.backward()?;
        assert!(grads.get(x.as_tensor()).is_some());
        assert!(
            grads.get(w.as_tensor()).is_none(),
            "a frozen weight got a gradient"
        );
        Ok(())
    }

    #[test]
    fn rejects_mismatched_dtypes() -> Result<()> {
        let x = Tensor::zeros((2, 5), DType::F32, &Device::Cpu)?;
        let w = Tensor::zeros((4, 5), DType::F64, &Device::Cpu)?;
        assert!(frozen_linear(&x, &w).is_err());
        Ok(())
    }
}
