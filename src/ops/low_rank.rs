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
//! `ops::cuda::gemm_accumulate`); the scaling `s` rides on cuBLAS's α and f32 factor
//! gradients are cuBLAS's f32 accumulator (`ops::cuda::gemm_product`), neither a pass of its
//! own. On the CPU the same formulas run
//! as candle ops: the reference the CUDA path is tested against (tests/device.rs,
//! tests/cuda_kernels.rs).
//!
//! Gradients: `t = s·(dy·B)`; `dA = tᵀ·(x∘m)`, `dB = dyᵀ·h` with `h = s·(x∘m)·Aᵀ`,
//! `dx = f'(dy) + (t·A)∘m` — each only for a tracked input, in that input's dtype (`A`/`B` are cast
//! to `x`'s dtype for the products, as a `to_dtype` in the graph would). Must not: know about PEFT
//! methods or adapters; give the frozen map or the mask a gradient.

use std::sync::Arc;

use candle_core::{bail, DType, Result, Tensor};

use super::attach::{with_backward, with_backward3};
use super::linear::frozen_linear;
use super::norm::NormedInput;

/// The frozen part `f` of a low-rank adapted linear map.
pub trait FrozenMap: Send + Sync {
    /// `f(x)` for a detached, contiguous `x [rows, in]`: a fresh `[rows, out]` tensor (it is
    /// accumulated into in place).
    fn forward(&self, x: &Tensor) -> Result<Tensor>;

    /// The input gradient `dy·∂f/∂x` for `dy [rows, out]`: a fresh `[rows, in]` tensor (it is
    /// accumulated into in place).
    fn input_grad(&self, dy: &Tensor) -> Result<Tensor>;

    /// Whether [`Self::forward_into`] and [`Self::input_grad_into`] run for `rows` rows of
    /// `dtype` on this map's CUDA device: the low-rank update is then written first and this map's
    /// product added into it inside its own GEMM (cuBLAS `β = 1`, whose read of the update rides
    /// on a compute-bound product), instead of a rank-`r` GEMM reading and writing the full-size
    /// output again. Asked only on CUDA with the kernel switched on (the caller checks that).
    /// Default: no.
    fn accumulates(&self, _rows: usize, _dtype: DType) -> bool {
        false
    }

    /// `c += f(x)` in place for a detached, contiguous `x [rows, in]` and `c [rows, out]` (fresh,
    /// read by nothing else). Only called where [`Self::accumulates`] said yes.
    fn forward_into(&self, _x: &Tensor, _c: &Tensor) -> Result<()> {
        bail!("this frozen map cannot accumulate its product into a tensor")
    }

    /// `c += dy·∂f/∂x` in place for `dy [rows, out]` and `c [rows, in]` (fresh, read by nothing
    /// else). Only called where [`Self::accumulates`] said yes.
    fn input_grad_into(&self, _dy: &Tensor, _c: &Tensor) -> Result<()> {
        bail!("this frozen map cannot accumulate its input gradient into a tensor")
    }
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

    /// Without a bias, for a contiguous weight of the input's dtype.
    fn accumulates(&self, _rows: usize, dtype: DType) -> bool {
        self.bias.is_none() && self.weight.dtype() == dtype && self.weight.is_contiguous()
    }

    fn forward_into(&self, x: &Tensor, c: &Tensor) -> Result<()> {
        #[cfg(feature = "cuda")]
        {
            super::cuda::gemm_accumulate(c, x, &self.weight, true, 1.0)
        }
        #[cfg(not(feature = "cuda"))]
        {
            let _ = (x, c);
            bail!("DenseMap::forward_into: CUDA only")
        }
    }

    fn input_grad_into(&self, dy: &Tensor, c: &Tensor) -> Result<()> {
        #[cfg(feature = "cuda")]
        {
            super::cuda::gemm_accumulate(c, dy, &self.weight, false, 1.0)
        }
        #[cfg(not(feature = "cuda"))]
        {
            let _ = (dy, c);
            bail!("DenseMap::input_grad_into: CUDA only")
        }
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
    let dtype = c.dtype();
    c.add(&product((a, false), (b, transposed), alpha, dtype)?)
}

/// `α·op(a)·op(b)` in `out` for `a [M, K]` (or `[K, M]`, transposed) and `b [N, K]` (transposed)
/// or `[K, N]`: on CUDA (bf16/f32 operands of one dtype, the GEMM kernel switched on) one cuBLAS
/// call whose α is the scaling and whose f32 accumulator is an f32 `out` (a bf16 product is never
/// rounded to bf16 first); otherwise candle's product, scaled, then cast.
fn product(
    (a, a_transposed): (&Tensor, bool),
    (b, b_transposed): (&Tensor, bool),
    alpha: f64,
    out: DType,
) -> Result<Tensor> {
    #[cfg(feature = "cuda")]
    if super::cuda::applies("lora_gemm", a)
        && a.dtype() == b.dtype()
        && (out == a.dtype() || out == DType::F32)
    {
        return super::cuda::gemm_product((a, a_transposed), (b, b_transposed), alpha, out);
    }
    let a = if a_transposed { a.t()? } else { a.clone() };
    let b = if b_transposed { b.t()? } else { b.clone() };
    let product = a.matmul(&b)?;
    let product = if alpha == 1.0 {
        product
    } else {
        product.affine(alpha, 0.0)?
    };
    product.to_dtype(out)
}

/// `A [r, in]` and `B [out, r]` of a low-rank update: the tracked variables (any float dtype),
/// and, when the caller has them already, their detached copies in the input's dtype
/// ([`cast_factors`]: one launch for all of a model's factors on CUDA instead of two casts per
/// call). A copy whose dtype or shape is not the one the call needs is ignored.
#[derive(Clone, Copy)]
pub struct Factors<'a> {
    pub a: &'a Tensor,
    pub b: &'a Tensor,
    /// The values of `a` and `b` now, in the input's dtype (the caller's promise).
    pub cast: Option<(&'a Tensor, &'a Tensor)>,
}

impl<'a> From<(&'a Tensor, &'a Tensor)> for Factors<'a> {
    fn from((a, b): (&'a Tensor, &'a Tensor)) -> Self {
        Self { a, b, cast: None }
    }
}

impl<'a> Factors<'a> {
    /// `a` and `b` with the copies the caller prepared, if any.
    pub fn with_cast(a: &'a Tensor, b: &'a Tensor, cast: Option<&'a (Tensor, Tensor)>) -> Self {
        Self {
            a,
            b,
            cast: cast.map(|(a, b)| (a, b)),
        }
    }

    /// `A` and `B` detached in `dtype`: the prepared copies when they fit, else cast now.
    fn in_dtype(&self, dtype: DType) -> Result<(Tensor, Tensor)> {
        match self.cast {
            Some((a, b))
                if a.dtype() == dtype
                    && b.dtype() == dtype
                    && a.dims() == self.a.dims()
                    && b.dims() == self.b.dims() =>
            {
                Ok((a.detach(), b.detach()))
            }
            _ => Ok((
                self.a.detach().to_dtype(dtype)?,
                self.b.detach().to_dtype(dtype)?,
            )),
        }
    }
}

/// `tensors` detached and cast to `dtype`, in order: on CUDA, f32 to bf16 for all of them in one
/// launch (`ops::cuda::cast_many_bf16`, bit-equal to candle's cast); otherwise one `to_dtype`
/// each.
pub fn cast_factors(tensors: &[&Tensor], dtype: DType) -> Result<Vec<Tensor>> {
    #[cfg(feature = "cuda")]
    if dtype == DType::BF16
        && tensors.first().is_some_and(|first| {
            super::cuda::enabled("multi_cast")
                && first.device().is_cuda()
                && tensors.iter().all(|t| {
                    t.dtype() == DType::F32
                        && t.is_contiguous()
                        && t.elem_count() > 0
                        && t.device().same_device(first.device())
                })
        })
    {
        return super::cuda::cast_many_bf16(tensors);
    }
    tensors.iter().map(|t| t.detach().to_dtype(dtype)).collect()
}

/// The shapes and constants of one low-rank adapted linear call, shared by its forward and its
/// backward.
struct Plan {
    rows: usize,
    in_features: usize,
    out_features: usize,
    /// `A` and `B` in the input's dtype.
    a: Tensor,
    b: Tensor,
    scale: f64,
    mask: Option<Tensor>,
    base: Arc<dyn FrozenMap>,
}

/// The gradients a backward computes: `[rows, in]` for the input (in its dtype), `A`'s and
/// `B`'s (in the dtypes the backward is given).
type Gradients = (Option<Tensor>, Option<Tensor>, Option<Tensor>);

impl Plan {
    fn new(
        dims: &[usize],
        dtype: DType,
        base: Arc<dyn FrozenMap>,
        factors: Factors<'_>,
        scale: f64,
        mask: Option<Tensor>,
    ) -> Result<Self> {
        let (a, b) = (factors.a, factors.b);
        let Some(&in_features) = dims.last() else {
            bail!("low_rank_linear: the input must have at least one dimension")
        };
        let (rank, a_in) = a.dims2()?;
        let (out_features, b_rank) = b.dims2()?;
        if a_in != in_features || b_rank != rank {
            bail!(
                "low_rank_linear: input {dims:?}, A {:?} ([r, in]) and B {:?} ([out, r]) do not match",
                a.shape(),
                b.shape()
            )
        }
        let rows = dims.iter().product::<usize>() / in_features.max(1);
        if let Some(mask) = &mask {
            if mask.dims() != [rows, in_features] {
                bail!(
                    "low_rank_linear: the mask {:?} must be [{rows}, {in_features}]",
                    mask.shape()
                )
            }
        }
        let (a, b) = factors.in_dtype(dtype)?;
        Ok(Self {
            rows,
            in_features,
            out_features,
            a,
            b,
            scale,
            mask,
            base,
        })
    }

    fn masked(&self, input: &Tensor) -> Result<Tensor> {
        match &self.mask {
            Some(mask) => input.mul(mask),
            None => Ok(input.clone()),
        }
    }

    /// `(y [rows, out], h [rows, r])` for the detached `input [rows, in]`.
    fn forward(&self, input: &Tensor) -> Result<(Tensor, Tensor)> {
        let hidden = product(
            (&self.masked(input)?, false),
            (&self.a, true),
            self.scale,
            input.dtype(),
        )?;
        if self.base_accumulates(input.dtype()) {
            // The update first (`β = 0`), the frozen product added into it by its own GEMM.
            let y = product((&hidden, false), (&self.b, true), 1.0, input.dtype())?;
            self.base.forward_into(input, &y)?;
            return Ok((y, hidden));
        }
        let y = accumulate(self.base.forward(input)?, &hidden, &self.b, true, 1.0)?;
        Ok((y, hidden))
    }

    /// The gradients for `grad` (the output's), recomputing from the detached `input`; `A`'s and
    /// `B`'s in `factor_dtypes` (their variables' dtypes: an f32 gradient of bf16 products is
    /// cuBLAS's f32 accumulator on CUDA, not a bf16 product cast). Without `input`, `A`'s is left
    /// to the caller: `tᵀ·(input∘m)` for the `t [rows, r]` returned beside the gradients.
    fn backward(
        &self,
        grad: &Tensor,
        input: Option<&Tensor>,
        hidden: &Tensor,
        [need_x, need_a, need_b]: [bool; 3],
        (a_dtype, b_dtype): (DType, DType),
    ) -> Result<(Gradients, Tensor)> {
        let dy = grad.contiguous()?.reshape((self.rows, self.out_features))?;
        let t = product((&dy, false), (&self.b, false), self.scale, dy.dtype())?;
        let ga = match input {
            Some(input) if need_a => Some(self.a_gradient(&t, input, a_dtype)?),
            _ => None,
        };
        let gb = if need_b {
            Some(product((&dy, true), (hidden, false), 1.0, b_dtype)?)
        } else {
            None
        };
        let gx = if need_x {
            Some(match &self.mask {
                None if self.base_accumulates(dy.dtype()) => {
                    let dx = product((&t, false), (&self.a, false), 1.0, dy.dtype())?;
                    self.base.input_grad_into(&dy, &dx)?;
                    dx
                }
                None => accumulate(self.base.input_grad(&dy)?, &t, &self.a, false, 1.0)?,
                Some(mask) => self
                    .base
                    .input_grad(&dy)?
                    .add(&t.matmul(&self.a)?.mul(mask)?)?,
            })
        } else {
            None
        };
        Ok(((gx, ga, gb), t))
    }

    /// Whether the frozen map adds its product into the update's: on CUDA (the factors, in the
    /// input's dtype, bf16 or f32), the kernel switched on, and the map able to
    /// ([`FrozenMap::accumulates`]).
    fn base_accumulates(&self, dtype: DType) -> bool {
        #[cfg(feature = "cuda")]
        {
            super::cuda::applies("base_accumulate", &self.a)
                && super::cuda::enabled("lora_gemm")
                && self.base.accumulates(self.rows, dtype)
        }
        #[cfg(not(feature = "cuda"))]
        {
            let _ = dtype;
            false
        }
    }

    /// `A`'s gradient `tᵀ·(input∘m)` in `dtype`.
    fn a_gradient(&self, t: &Tensor, input: &Tensor, dtype: DType) -> Result<Tensor> {
        product((t, true), (&self.masked(input)?, false), 1.0, dtype)
    }
}

/// `x [.., in]` as a detached, contiguous `[rows, in]`.
fn rows_of(x: &Tensor, rows: usize, in_features: usize) -> Result<Tensor> {
    x.detach().contiguous()?.reshape((rows, in_features))
}

/// `dims` with the last replaced by `last`.
fn with_last(dims: &[usize], last: usize) -> Vec<usize> {
    let mut dims = dims.to_vec();
    if let Some(d) = dims.last_mut() {
        *d = last;
    }
    dims
}

/// `y = f(x) + scale·(x∘mask)·Aᵀ·Bᵀ` for `x [.., in]`, `A [r, in]`, `B [out, r]` (any float dtype:
/// cast to `x`'s for the products) and an optional constant `mask [rows, in]` (`rows` = all
/// dimensions of `x` but the last). Gradients reach the tracked ones of `x`, `A`, `B`.
pub fn low_rank_linear(
    x: &Tensor,
    base: Arc<dyn FrozenMap>,
    factors: Factors<'_>,
    scale: f64,
    mask: Option<Tensor>,
) -> Result<Tensor> {
    let plan = Plan::new(x.dims(), x.dtype(), base, factors, scale, mask)?;
    let input = rows_of(x, plan.rows, plan.in_features)?;
    let (a, b) = (factors.a, factors.b);
    attach("low-rank-linear", x, input, (a, b), plan, |x| Ok(x.clone()))
}

/// Runs `plan`'s forward on `input` (the detached `[rows, in]` the node computes from) and
/// records the result as a node of `node_input`, `a`, `b`, whose backward rebuilds that input
/// from `node_input` with `recompute` (then detached and made `[rows, in]`).
fn attach<R>(
    name: &'static str,
    node_input: &Tensor,
    input: Tensor,
    (a, b): (&Tensor, &Tensor),
    plan: Plan,
    recompute: R,
) -> Result<Tensor>
where
    R: Fn(&Tensor) -> Result<Tensor> + Send + Sync + 'static,
{
    let (y, hidden) = plan.forward(&input)?;
    drop(input);
    let y = y.reshape(with_last(node_input.dims(), plan.out_features))?;
    with_backward3(name, [node_input, a, b], y, move |[x, a, b], _y, grad| {
        let input = rows_of(&recompute(x)?, plan.rows, plan.in_features)?;
        let need = [x.track_op(), a.track_op(), b.track_op()];
        let ((gx, ga, gb), _) =
            plan.backward(grad, Some(&input), &hidden, need, (a.dtype(), b.dtype()))?;
        Ok([
            gx.map(|g| g.reshape(x.shape())).transpose()?,
            ga.map(|g| g.to_dtype(a.dtype())).transpose()?,
            gb.map(|g| g.to_dtype(b.dtype())).transpose()?,
        ])
    })
}

/// [`low_rank_linear`] of an RMSNorm's output (`input`, see [`NormedInput`]): the output is read
/// from `input` in the forward and recomputed from the norm's input in the backward instead of
/// being kept alive from one to the other. A norm that cannot be deferred (a trained weight) is
/// read as a plain node. Gradients reach the norm's input (through the stand-in), `A` and `B`.
pub fn low_rank_norm_linear(
    input: &NormedInput,
    base: Arc<dyn FrozenMap>,
    factors: Factors<'_>,
    scale: f64,
    mask: Option<Tensor>,
) -> Result<Tensor> {
    let Some((stand_in, value, renorm)) = input.deferred()? else {
        return low_rank_linear(&input.normed()?, base, factors, scale, mask);
    };
    let plan = Plan::new(value.dims(), value.dtype(), base, factors, scale, mask)?;
    let (a, b) = (factors.a, factors.b);
    let value = rows_of(&value, plan.rows, plan.in_features)?;
    attach(
        "low-rank-norm-linear",
        &stand_in,
        value,
        (a, b),
        plan,
        move |x| renorm.apply(x),
    )
}

/// The frozen map `f` of an RMSNorm's output (`input`, see [`NormedInput`]), keeping neither the
/// output nor anything else: the backward is `f'(dy)` alone. A norm that cannot be deferred is
/// read as a plain node.
pub fn frozen_norm_linear(input: &NormedInput, base: Arc<dyn FrozenMap>) -> Result<Tensor> {
    let (node_input, value) = match input.deferred()? {
        Some((stand_in, value, _)) => (stand_in, value),
        None => {
            let normed = input.normed()?;
            let value = normed.detach();
            (normed, value)
        }
    };
    let dims = value.dims().to_vec();
    let in_features = *dims.last().unwrap_or(&0);
    let rows = value.elem_count() / in_features.max(1);
    let y = base.forward(&rows_of(&value, rows, in_features)?)?;
    drop(value);
    let out_features = y.dim(1)?;
    let y = y.reshape(with_last(&dims, out_features))?;
    with_backward("frozen-norm-linear", &node_input, y, move |x, _y, grad| {
        let dy = grad.contiguous()?.reshape((rows, out_features))?;
        base.input_grad(&dy)?.reshape(x.shape())
    })
}

/// [`low_rank_linear`] of SwiGLU's `silu(gate) · up` (`gate`, `up` `[.., in]`), the down projection
/// of a Llama MLP: the product is computed in the forward and recomputed in the backward instead
/// of being kept alive (`[rows, in]`, the MLP's widest activation) from one to the other.
/// Gradients reach the tracked ones of `gate`, `up`, `A` and `B` (which must share a dtype: the
/// node's third input is their concatenation).
pub fn low_rank_swiglu_linear(
    gate: &Tensor,
    up: &Tensor,
    base: Arc<dyn FrozenMap>,
    factors: Factors<'_>,
    scale: f64,
    mask: Option<Tensor>,
) -> Result<Tensor> {
    let (a, b) = (factors.a, factors.b);
    if gate.shape() != up.shape() {
        bail!(
            "low_rank_swiglu_linear: gate {:?} and up {:?} differ",
            gate.shape(),
            up.shape()
        )
    }
    if a.dtype() != b.dtype() {
        bail!(
            "low_rank_swiglu_linear: A ({:?}) and B ({:?}) must share a dtype",
            a.dtype(),
            b.dtype()
        )
    }
    let plan = Plan::new(gate.dims(), gate.dtype(), base, factors, scale, mask)?;
    let product = |gate: &Tensor, up: &Tensor| -> Result<Tensor> {
        let product = super::swiglu::swiglu(&gate.detach(), &up.detach())?;
        rows_of(&product, plan.rows, plan.in_features)
    };
    let (y, hidden) = plan.forward(&product(gate, up)?)?;
    let y = y.reshape(with_last(gate.dims(), plan.out_features))?;
    // A and B enter as one input (a custom op takes at most three); its backward splits the
    // gradient again.
    let factors = Tensor::cat(&[a.flatten_all()?, b.flatten_all()?], 0)?;
    with_backward3(
        "low-rank-swiglu-linear",
        [gate, up, &factors],
        y,
        move |[gate, up, factors], _y, grad| {
            let rows = (plan.rows, plan.in_features);
            let recompute = || super::swiglu::swiglu(&gate.detach(), &up.detach())?.reshape(rows);
            let need_inputs = gate.track_op() || up.track_op();
            let need_factors = factors.track_op();
            let dtype = factors.dtype();
            let need = [need_inputs, need_factors, need_factors];
            let (g_gate, g_up, ga, gb) = if need_inputs && need_factors && plan.mask.is_none() {
                // The recomputed product's one use besides SwiGLU's backward is A's gradient:
                // on CUDA both come from one kernel that never writes the product out.
                let ((ds, _, gb), t) = plan.backward(grad, None, &hidden, need, (dtype, dtype))?;
                let ds = ds.ok_or_else(|| {
                    candle_core::Error::Msg("low_rank_swiglu_linear: no input gradient".into())
                })?;
                let (gate_rows, up_rows) =
                    (gate.detach().reshape(rows)?, up.detach().reshape(rows)?);
                let fused =
                    super::swiglu::swiglu_backward_with_product(&gate_rows, &up_rows, &ds, &t)?;
                let (g_gate, g_up, ga) = match fused {
                    Some((g_gate, g_up, ga)) => (g_gate, g_up, ga.to_dtype(dtype)?),
                    None => {
                        let (g_gate, g_up) =
                            super::swiglu::swiglu_backward(&gate_rows, &up_rows, &ds)?;
                        (g_gate, g_up, plan.a_gradient(&t, &recompute()?, dtype)?)
                    }
                };
                let (g_gate, g_up) = (g_gate.reshape(gate.shape())?, g_up.reshape(up.shape())?);
                (Some(g_gate), Some(g_up), Some(ga), gb)
            } else {
                let input = recompute()?;
                let ((ds, ga, gb), _) =
                    plan.backward(grad, Some(&input), &hidden, need, (dtype, dtype))?;
                drop(input);
                let (g_gate, g_up) = match ds {
                    Some(ds) => {
                        let (g_gate, g_up) =
                            super::swiglu::swiglu_backward(gate, up, &ds.reshape(gate.shape())?)?;
                        (Some(g_gate), Some(g_up))
                    }
                    None => (None, None),
                };
                (g_gate, g_up, ga, gb)
            };
            let g_gate = g_gate.filter(|_| gate.track_op());
            let g_up = g_up.filter(|_| up.track_op());
            let g_factors = match (ga, gb) {
                (Some(ga), Some(gb)) => Some(
                    Tensor::cat(&[ga.flatten_all()?, gb.flatten_all()?], 0)?
                        .to_dtype(factors.dtype())?,
                ),
                _ => None,
            };
            Ok([g_gate, g_up, g_factors])
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

    /// A random 0/1 mask `[rows, columns]`.
    fn random_mask(rows: usize, columns: usize) -> Result<Tensor> {
        Tensor::rand(0f64, 1.0, (rows, columns), &Device::Cpu)?
            .ge(0.3)?
            .to_dtype(DType::F64)
    }

    /// `ours` and `theirs` have equal values, and equal gradients for every one of `vars` through
    /// the same random projection of the output; returns our gradient store.
    fn assert_same(
        ours: &Tensor,
        theirs: &Tensor,
        vars: &[&Var],
        case: &str,
    ) -> Result<candle_core::backprop::GradStore> {
        let weights = Tensor::randn(0f64, 1.0, ours.dims(), &Device::Cpu)?;
        let g_ours = ours.mul(&weights)?.sum_all()?.backward()?;
        let g_theirs = theirs.mul(&weights)?.sum_all()?.backward()?;
        let diff = (ours - theirs)?.abs()?.max_all()?.to_scalar::<f64>()?;
        assert!(diff < 1e-12, "value |Δ| = {diff} ({case})");
        for var in vars {
            let g1 = g_ours.get(var.as_tensor()).expect("gradient");
            let g2 = g_theirs.get(var.as_tensor()).expect("gradient");
            let diff = (g1 - g2)?.abs()?.max_all()?.to_scalar::<f64>()?;
            assert!(diff < 1e-12, "gradient |Δ| = {diff} ({case})");
        }
        Ok(g_ours)
    }

    /// A random `x [2, 3, 5]`, frozen `W [4, 5]` and bias, and factors `A [2, 5]`, `B [4, 2]`.
    fn random_case() -> Result<(Var, Tensor, Tensor, Var, Var)> {
        let device = Device::Cpu;
        Ok((
            Var::randn(0f64, 1.0, (2, 3, 5), &device)?,
            Tensor::randn(0f64, 1.0, (4, 5), &device)?,
            Tensor::randn(0f64, 1.0, 4, &device)?,
            Var::randn(0f64, 1.0, (2, 5), &device)?,
            Var::randn(0f64, 1.0, (4, 2), &device)?,
        ))
    }

    #[test]
    fn value_and_gradients_equal_the_composition() -> Result<()> {
        for with_mask in [false, true] {
            let (x, w, bias, a, b) = random_case()?;
            let mask = with_mask.then(|| random_mask(6, 5)).transpose()?;
            let base = Arc::new(DenseMap {
                weight: w.clone(),
                bias: Some(bias.clone()),
            });
            let ours = low_rank_linear(
                x.as_tensor(),
                base,
                (a.as_tensor(), b.as_tensor()).into(),
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
            let g_ours = assert_same(&ours, &theirs, &[&x, &a, &b], &format!("mask: {with_mask}"))?;
            assert!(g_ours.get(&w).is_none() && g_ours.get(&bias).is_none());
        }
        Ok(())
    }

    #[test]
    fn swiglu_form_equals_the_composition() -> Result<()> {
        let device = Device::Cpu;
        for with_mask in [false, true] {
            let gate = Var::randn(0f64, 1.5, (2, 3, 6), &device)?;
            let up = Var::randn(0f64, 1.0, (2, 3, 6), &device)?;
            let w = Tensor::randn(0f64, 1.0, (4, 6), &device)?;
            let a = Var::randn(0f64, 1.0, (2, 6), &device)?;
            let b = Var::randn(0f64, 1.0, (4, 2), &device)?;
            let mask = with_mask.then(|| random_mask(6, 6)).transpose()?;
            let base = Arc::new(DenseMap {
                weight: w.clone(),
                bias: None,
            });
            let ours = low_rank_swiglu_linear(
                gate.as_tensor(),
                up.as_tensor(),
                base,
                (a.as_tensor(), b.as_tensor()).into(),
                0.5,
                mask.clone(),
            )?;
            let product = crate::ops::swiglu(gate.as_tensor(), up.as_tensor())?;
            let zero = Tensor::zeros(4, DType::F64, &device)?;
            let theirs = composed(
                &product,
                &w,
                &zero,
                a.as_tensor(),
                b.as_tensor(),
                0.5,
                mask.as_ref(),
            )?;
            let case = format!("swiglu, mask: {with_mask}");
            assert_same(&ours, &theirs, &[&gate, &up, &a, &b], &case)?;
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
        let y = low_rank_linear(
            &x,
            base.clone(),
            (a.as_tensor(), b.as_tensor()).into(),
            2.0,
            None,
        )?;
        let grads = y.sqr()?.sum_all()?.backward()?;
        assert!(grads.get(&x).is_none());
        assert!(grads.get(a.as_tensor()).is_some() && grads.get(b.as_tensor()).is_some());
        let detached = low_rank_linear(
            &x,
            base,
            (&a.as_tensor().detach(), &b.as_tensor().detach()).into(),
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
            (a.as_tensor(), a.as_tensor()).into(),
            1.0,
            None
        )
        .is_err());
        Ok(())
    }

    /// Whether any node of `y`'s graph holds exactly `values` (compared element by element).
    fn graph_holds(y: &Tensor, values: &Tensor) -> Result<bool> {
        let values = values.flatten_all()?.to_vec1::<f64>()?;
        for node in y.sorted_nodes() {
            if node.elem_count() == values.len() && node.flatten_all()?.to_vec1::<f64>()? == values
            {
                return Ok(true);
            }
        }
        Ok(false)
    }

    #[test]
    fn norm_forms_equal_the_composition_and_keep_no_norm_output() -> Result<()> {
        let device = Device::Cpu;
        for with_mask in [false, true] {
            let (x, w, bias, a, b) = random_case()?;
            let norm_weight = Tensor::randn(1f64, 0.2, 5, &device)?;
            let w2 = Tensor::randn(0f64, 1.0, (3, 5), &device)?;
            let mask = with_mask.then(|| random_mask(6, 5)).transpose()?;
            let base = Arc::new(DenseMap {
                weight: w.clone(),
                bias: Some(bias.clone()),
            });
            let frozen = Arc::new(DenseMap {
                weight: w2.clone(),
                bias: None,
            });
            // Two layers read one norm (as q and k do), and the norm's input is also read by a
            // residual path: every gradient reaches x through the stand-in once.
            let normed = NormedInput::rms(x.as_tensor(), &norm_weight, 1e-5)?;
            let adapted = low_rank_norm_linear(
                &normed,
                base.clone(),
                (a.as_tensor(), b.as_tensor()).into(),
                1.5,
                mask.clone(),
            )?;
            let plain = frozen_norm_linear(&normed, frozen.clone())?;
            let output = normed.input().sum_keepdim(2)?.broadcast_add(&plain)?;
            let ours = Tensor::cat(&[&adapted, &output], 2)?;
            let h = crate::ops::rms_norm(x.as_tensor(), &norm_weight, 1e-5)?;
            assert!(!graph_holds(&ours, &h)?, "the norm's output is kept");
            drop(normed);

            let theirs_adapted = composed(
                &h,
                &w,
                &bias,
                a.as_tensor(),
                b.as_tensor(),
                1.5,
                mask.as_ref(),
            )?;
            let theirs_plain = crate::ops::frozen_linear(&h, &w2)?;
            let theirs_output = x.as_tensor().sum_keepdim(2)?.broadcast_add(&theirs_plain)?;
            let theirs = Tensor::cat(&[&theirs_adapted, &theirs_output], 2)?;
            assert!(
                graph_holds(&theirs, &h)?,
                "the composition keeps the norm's output"
            );
            assert_same(&ours, &theirs, &[&x, &a, &b], &format!("mask: {with_mask}"))?;
        }
        Ok(())
    }

    #[test]
    fn a_trained_norm_weight_is_read_as_the_plain_node_and_gets_its_gradient() -> Result<()> {
        let device = Device::Cpu;
        let x = Var::randn(0f64, 1.0, (1, 3, 5), &device)?;
        let norm_weight = Var::randn(1f64, 0.2, 5, &device)?;
        let w = Tensor::randn(0f64, 1.0, (4, 5), &device)?;
        let a = Var::randn(0f64, 1.0, (2, 5), &device)?;
        let b = Var::randn(0f64, 1.0, (4, 2), &device)?;
        let base = Arc::new(DenseMap {
            weight: w.clone(),
            bias: None,
        });
        let normed = NormedInput::rms(x.as_tensor(), norm_weight.as_tensor(), 1e-5)?;
        assert!(normed.deferred()?.is_none());
        let ours = low_rank_norm_linear(
            &normed,
            base,
            (a.as_tensor(), b.as_tensor()).into(),
            0.5,
            None,
        )?;
        let h = crate::ops::rms_norm(x.as_tensor(), norm_weight.as_tensor(), 1e-5)?;
        let zero = Tensor::zeros(4, DType::F64, &device)?;
        let theirs = composed(&h, &w, &zero, a.as_tensor(), b.as_tensor(), 0.5, None)?;
        assert_same(&ours, &theirs, &[&x, &norm_weight, &a, &b], "trained norm")?;
        Ok(())
    }
}
