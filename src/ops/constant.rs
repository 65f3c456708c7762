//! Ops between a tracked tensor and a constant: `x + c`, `x − c`, `x · c`, `x / c`, matmul, `cat`.
//!
//! candle's binary ops (and `cat`) store a gradient for every operand even when one is a detached
//! constant (a mask, a bias, a position table, a frozen layer's output), and that gradient stays in
//! the store after backward. These ops give the constant none. The `*_constant` ops must not be used
//! where the second operand is trainable; the `*_tracked` ops pick the tracked operand themselves
//! and are candle's op (the same values and the same tracked gradients) otherwise.

use candle_core::{bail, Result, Tensor};

use super::attach::with_backward;

fn check_broadcast(name: &'static str, x: &Tensor, constant: &Tensor) -> Result<()> {
    let shape = x
        .shape()
        .broadcast_shape_binary_op(constant.shape(), name)?;
    if &shape != x.shape() {
        bail!(
            "{name}: the constant {:?} must broadcast into the input {:?}",
            constant.shape(),
            x.shape()
        )
    }
    Ok(())
}

/// `x + c` (`c` broadcast into `x`'s shape); the gradient reaches `x` only.
pub fn add_constant(x: &Tensor, constant: &Tensor) -> Result<Tensor> {
    check_broadcast("add_constant", x, constant)?;
    let output = x.detach().broadcast_add(&constant.detach())?;
    with_backward("add-constant", x, output, |_x, _y, grad| Ok(grad.clone()))
}

/// `x − c` (`c` broadcast into `x`'s shape); the gradient reaches `x` only.
pub fn sub_constant(x: &Tensor, constant: &Tensor) -> Result<Tensor> {
    check_broadcast("sub_constant", x, constant)?;
    let output = x.detach().broadcast_sub(&constant.detach())?;
    with_backward("sub-constant", x, output, |_x, _y, grad| Ok(grad.clone()))
}

/// `x / c` (`c` broadcast into `x`'s shape); the gradient reaches `x` only: `dx = g / c`.
pub fn div_constant(x: &Tensor, constant: &Tensor) -> Result<Tensor> {
    check_broadcast("div_constant", x, constant)?;
    let constant = constant.detach();
    let output = x.detach().broadcast_div(&constant)?;
    with_backward("div-constant", x, output, move |_x, _y, grad| {
        grad.broadcast_div(&constant)
    })
}

/// `x · c` (`c` broadcast into `x`'s shape); the gradient reaches `x` only: `dx = g · c`.
pub fn mul_constant(x: &Tensor, constant: &Tensor) -> Result<Tensor> {
    check_broadcast("mul_constant", x, constant)?;
    let constant = constant.detach();
    let output = x.detach().broadcast_mul(&constant)?;
    with_backward("mul-constant", x, output, move |_x, _y, grad| {
        grad.broadcast_mul(&constant)
    })
}

/// `Σ x · c` over all elements (an f32 scalar; `c` has `x`'s shape); the gradient reaches `x` only:
/// `dx = g · c`. The loss of a local backward: backpropagating it through the graph of `x` gives
/// every tracked input of `x` its gradient for an upstream gradient `c` of `x` (activation
/// checkpointing walks a model layer by layer this way). With `g = 1` the gradient is `c` exactly.
pub fn dot_constant(x: &Tensor, constant: &Tensor) -> Result<Tensor> {
    if x.shape() != constant.shape() {
        bail!(
            "dot_constant: the constant {:?} must have the input's shape {:?}",
            constant.shape(),
            x.shape()
        )
    }
    let constant = constant.detach();
    let output = x
        .detach()
        .to_dtype(candle_core::DType::F32)?
        .mul(&constant.to_dtype(candle_core::DType::F32)?)?
        .sum_all()?;
    with_backward("dot-constant", x, output, move |_x, _y, grad| {
        constant.broadcast_mul(&grad.to_dtype(constant.dtype())?)
    })
}

/// `a + b` (same shape) differentiating only the operands that are part of the graph: where one
/// is a constant (e.g. the embeddings entering layer 0, a frozen layer's output), it is added
/// through [`add_constant`], so the store keeps no gradient for it. The same values as `a + b`.
pub fn add_tracked(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    match (a.track_op(), b.track_op()) {
        (true, false) if a.shape() == b.shape() => add_constant(a, b),
        (false, true) if a.shape() == b.shape() => add_constant(b, a),
        _ => a.add(b),
    }
}

/// A residual connection, `residual + branch`, with [`add_tracked`]'s gradients, `branch` handed
/// over (nothing may read it afterwards). On CUDA the sum is written into `branch`'s buffer when
/// nothing else shares it (`ops::cuda::add_into`; off with `PEFTPIPE_UNFUSED=in_place`), so the
/// layer keeps one buffer where the branch output and the sum were two; elsewhere, and whenever the
/// shapes or layouts differ, it is [`add_tracked`].
pub fn add_residual(branch: Tensor, residual: &Tensor) -> Result<Tensor> {
    #[cfg(feature = "cuda")]
    if super::cuda::applies("in_place", &branch)
        && branch.is_contiguous()
        && branch.shape() == residual.shape()
        && branch.dtype() == residual.dtype()
        && branch.storage_is_unique()
    {
        return super::cuda::add_into(&branch, residual);
    }
    add_tracked(residual, &branch)
}

/// `a · b` (candle's `broadcast_mul`) where a constant operand (e.g. layer 0's frozen output that
/// IA3 scales) gets no gradient. The tracked operand is broadcast to the output's shape first (a
/// graph node whose backward sums the broadcast dimensions, as candle's), then multiplied by the
/// constant through [`mul_constant`]. The same values and tracked gradient as `a.broadcast_mul(b)`.
pub fn broadcast_mul_tracked(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    let (tracked, constant) = match (a.track_op(), b.track_op()) {
        (true, false) => (a, b),
        (false, true) => (b, a),
        _ => return a.broadcast_mul(b),
    };
    let shape = a
        .shape()
        .broadcast_shape_binary_op(b.shape(), "broadcast_mul_tracked")?;
    if tracked.shape() == &shape {
        mul_constant(tracked, constant)
    } else {
        mul_constant(&tracked.broadcast_as(shape)?, constant)
    }
}

/// `a · b` (matmul) where a constant operand (the untracked input of a layer-0 adapter, the frozen
/// keys a tracked query meets) gets no gradient: `da = g · bᵀ`, `db = aᵀ · g`, as candle computes
/// them. The same values as `a.matmul(b)`.
pub fn matmul_tracked(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    match (a.track_op(), b.track_op()) {
        (false, true) => {
            let constant = a.detach();
            let output = constant.matmul(&b.detach())?;
            with_backward("matmul-constant-lhs", b, output, move |_b, _y, grad| {
                constant.t()?.matmul(grad)
            })
        }
        (true, false) => {
            let constant = b.detach();
            let output = a.detach().matmul(&constant)?;
            with_backward("matmul-constant-rhs", a, output, move |_a, _y, grad| {
                grad.matmul(&constant.t()?)
            })
        }
        _ => a.matmul(b),
    }
}

/// `Tensor::cat(parts, dim)` where, when exactly one part is tracked (a virtual prompt before the
/// embedded tokens, a prefix before layer 0's frozen keys), only that part gets a gradient: its
/// slice of the output's gradient, as candle's `cat` gives it. Otherwise candle's `cat`.
pub fn cat_tracked(parts: &[&Tensor], dim: usize) -> Result<Tensor> {
    let mut tracked = parts.iter().enumerate().filter(|(_, part)| part.track_op());
    let (index, part) = match (tracked.next(), tracked.next()) {
        (Some(one), None) => one,
        _ => return Tensor::cat(parts, dim),
    };
    let mut start = 0;
    for before in &parts[..index] {
        start += before.dim(dim)?;
    }
    let length = part.dim(dim)?;
    let detached: Vec<Tensor> = parts.iter().map(|part| part.detach()).collect();
    let output = Tensor::cat(&detached, dim)?;
    with_backward("cat-tracked", part, output, move |_x, _y, grad| {
        grad.narrow(dim, start, length)
    })
}

/// `mask.where_cond(on_true, on_false)` where, when exactly one branch is tracked (the trained
/// embedding rows beside the frozen lookup), only that branch gets a gradient: the output's gradient
/// where the mask picks it, zero elsewhere, as candle's `where_cond` gives it.
pub fn where_cond_tracked(mask: &Tensor, on_true: &Tensor, on_false: &Tensor) -> Result<Tensor> {
    let (tracked, picks_true) = match (on_true.track_op(), on_false.track_op()) {
        (true, false) => (on_true, true),
        (false, true) => (on_false, false),
        _ => return mask.where_cond(on_true, on_false),
    };
    let mask = mask.detach();
    let output = mask.where_cond(&on_true.detach(), &on_false.detach())?;
    with_backward("where-tracked", tracked, output, move |_x, _y, grad| {
        let zeros = grad.zeros_like()?;
        if picks_true {
            mask.where_cond(grad, &zeros)
        } else {
            mask.where_cond(&zeros, grad)
        }
    })
}

#[cfg(test)]
mod tests {
    use candle_core::{Device, Tensor, Var};

    use super::{
        add_tracked, broadcast_mul_tracked, cat_tracked, div_constant, dot_constant,
        matmul_tracked, mul_constant, sub_constant, where_cond_tracked,
    };

    /// `ours` and `theirs` (the same function built on our op and on candle's) give the same value
    /// and the same gradients to `vars` (summed against `weights` so every entry matters); ours
    /// stores no gradient beyond the variables' (candle's stores more: checked by `extra`).
    fn same_as_candle(
        vars: &[&Var],
        ours: &Tensor,
        theirs: &Tensor,
        weights: &Tensor,
    ) -> candle_core::Result<()> {
        let flat = |t: &Tensor| t.flatten_all()?.to_vec1::<f32>();
        assert_eq!(flat(ours)?, flat(theirs)?);
        let our_store = mul_constant(ours, weights)?.sum_all()?.backward()?;
        let their_store = mul_constant(theirs, weights)?.sum_all()?.backward()?;
        for var in vars {
            let a = our_store.get(var.as_tensor()).expect("gradient");
            let b = their_store.get(var.as_tensor()).expect("gradient");
            assert_eq!(flat(a)?, flat(b)?);
        }
        assert_eq!(our_store.get_ids().count(), vars.len());
        assert!(their_store.get_ids().count() > vars.len());
        Ok(())
    }

    #[test]
    fn tracked_cat_matches_candle_and_skips_the_constants() -> candle_core::Result<()> {
        let device = Device::Cpu;
        let c = Tensor::arange(0f32, 12., &device)?.reshape((2, 2, 3))?;
        let d = Tensor::arange(-4f32, 0., &device)?
            .reshape((2, 1, 2))?
            .affine(0.5, 0.)?;
        let p = Var::from_vec(vec![1f32, -2., 0.5, 3., 0.25, -1.], (2, 1, 3), &device)?;
        let weights = Tensor::arange(1f32, 21., &device)?.reshape((2, 5, 2))?;
        // Middle part tracked, dim 1: every part's slice must land where candle's does.
        let ours = cat_tracked(&[&c, p.as_tensor(), &c], 1)?.narrow(2, 1, 2)?;
        let theirs = Tensor::cat(&[&c, p.as_tensor(), &c], 1)?.narrow(2, 1, 2)?;
        same_as_candle(&[&p], &ours, &theirs, &weights)?;
        // Last dimension, tracked part first.
        let q = Var::from_vec(vec![2f32, -1., 0.5, 4.], (2, 1, 2), &device)?;
        let ours = cat_tracked(&[q.as_tensor(), &d], 2)?;
        let theirs = Tensor::cat(&[q.as_tensor(), &d], 2)?;
        let weights = Tensor::arange(1f32, 9., &device)?.reshape((2, 1, 4))?;
        same_as_candle(&[&q], &ours, &theirs, &weights)?;
        // Two tracked parts: candle's cat, both get gradients.
        let both = cat_tracked(&[q.as_tensor(), p.as_tensor()], 2)?
            .sum_all()?
            .backward()?;
        assert!(both.get(q.as_tensor()).is_some() && both.get(p.as_tensor()).is_some());
        Ok(())
    }

    #[test]
    fn tracked_broadcast_mul_matches_candle_either_way_round() -> candle_core::Result<()> {
        let device = Device::Cpu;
        let c = Tensor::from_vec(vec![0.5f32, -1., 2., 3., 0.25, -4.], (2, 1, 3), &device)?;
        let weights = Tensor::arange(1f32, 13., &device)?.reshape((2, 2, 3))?;
        // A smaller tracked operand broadcast over the constant's batch ...
        let v = Var::from_vec(vec![1f32, -2., 0.5, 3., 1.5, -0.5], (2, 3), &device)?;
        let ours = broadcast_mul_tracked(&c, v.as_tensor())?;
        let theirs = c.broadcast_mul(v.as_tensor())?;
        same_as_candle(&[&v], &ours, &theirs, &weights)?;
        // ... and a larger tracked operand times a smaller constant, tracked operand first.
        let w = Var::from_vec(
            (0..12).map(|i| i as f32 - 5.5).collect(),
            (2, 2, 3),
            &device,
        )?;
        let ours = broadcast_mul_tracked(w.as_tensor(), &c)?;
        let theirs = w.as_tensor().broadcast_mul(&c)?;
        same_as_candle(&[&w], &ours, &theirs, &weights)
    }

    #[test]
    fn tracked_where_cond_matches_candle_for_either_branch() -> candle_core::Result<()> {
        let device = Device::Cpu;
        let mask = Tensor::from_vec(vec![1u8, 0, 0, 1, 1, 0], (2, 3), &device)?;
        let c = Tensor::from_vec(vec![0.5f32, -1., 2., 3., 0.25, -4.], (2, 3), &device)?;
        let x = Var::from_vec(vec![1f32, -2., 0.7, 3., 0.25, -1.], (2, 3), &device)?;
        let weights = Tensor::from_vec(vec![1f32, 2., -3., 0.5, 4., -1.], (2, 3), &device)?;
        let ours = where_cond_tracked(&mask, x.as_tensor(), &c)?;
        let theirs = mask.where_cond(x.as_tensor(), &c)?;
        same_as_candle(&[&x], &ours, &theirs, &weights)?;
        let ours = where_cond_tracked(&mask, &c, x.as_tensor())?;
        let theirs = mask.where_cond(&c, x.as_tensor())?;
        same_as_candle(&[&x], &ours, &theirs, &weights)
    }

    #[test]
    fn sub_and_div_by_a_constant_match_candle() -> candle_core::Result<()> {
        let device = Device::Cpu;
        let c = Tensor::from_vec(vec![0.5f32, -1., 3.], 3, &device)?;
        let x = Var::from_vec(vec![1f32, -2., 0.7, 3., 0.25, -1.], (2, 3), &device)?;
        let weights = Tensor::from_vec(vec![1f32, 2., -3., 0.5, 4., -1.], (2, 3), &device)?;
        let ours = div_constant(&sub_constant(x.as_tensor(), &c)?, &c)?;
        let theirs = x.as_tensor().broadcast_sub(&c)?.broadcast_div(&c)?;
        same_as_candle(&[&x], &ours, &theirs, &weights)
    }

    #[test]
    fn tracked_matmul_with_a_constant_right_operand() -> candle_core::Result<()> {
        let device = Device::Cpu;
        let c = Tensor::from_vec(vec![0.5f32, -1., 2., 3., 0.25, -4.], (3, 2), &device)?;
        let x = Var::from_vec(vec![1f32, -2., 0.7, 3., 0.25, -1.], (2, 3), &device)?;
        let weights = Tensor::from_vec(vec![1f32, 2., -3., 0.5], (2, 2), &device)?;
        let ours = matmul_tracked(x.as_tensor(), &c)?;
        let theirs = x.as_tensor().matmul(&c)?;
        same_as_candle(&[&x], &ours, &theirs, &weights)
    }

    /// Same values and the same tracked gradient as candle's ops, and no entry for the constant.
    #[test]
    fn tracked_add_and_matmul_match_candle_and_skip_the_constant() -> candle_core::Result<()> {
        let device = Device::Cpu;
        let c = Tensor::from_vec(vec![0.5f32, -1., 2., 3., 0.25, -4.], (2, 3), &device)?;
        let w = Var::from_vec(vec![1f32, 2., -3., 0.5, 4., -1.], (3, 2), &device)?;
        let ours = matmul_tracked(&c, w.as_tensor())?;
        let theirs = c.matmul(w.as_tensor())?;
        assert_eq!(ours.to_vec2::<f32>()?, theirs.to_vec2::<f32>()?);
        let v = Var::from_vec(vec![1f32, -2., 0.5, 3.], (2, 2), &device)?;
        let our_store = add_tracked(&ours, &c.narrow(1, 0, 2)?)?
            .mul(v.as_tensor())?
            .sum_all()?
            .backward()?;
        let their_store = (theirs + c.narrow(1, 0, 2)?)?
            .mul(v.as_tensor())?
            .sum_all()?
            .backward()?;
        for var in [&w, &v] {
            let a = our_store.get(var.as_tensor()).expect("gradient");
            let b = their_store.get(var.as_tensor()).expect("gradient");
            assert_eq!(a.to_vec2::<f32>()?, b.to_vec2::<f32>()?);
        }
        assert!(our_store.get(&c).is_none());
        // Only the two variables and the (tracked) sum's inputs were ever stored: candle's ops
        // leave entries for `c` and the narrowed constant.
        assert_eq!(our_store.get_ids().count(), 2);
        assert!(their_store.get_ids().count() > 2);
        Ok(())
    }

    #[test]
    fn dot_constant_value_and_gradient() -> candle_core::Result<()> {
        let x = Var::from_vec(vec![1f32, -2., 3., 0.5], (2, 2), &Device::Cpu)?;
        let c = Tensor::from_vec(vec![0.25f32, 4., -1., 2.], (2, 2), &Device::Cpu)?;
        let y = dot_constant(x.as_tensor(), &c)?;
        assert_eq!(y.to_scalar::<f32>()?, 0.25 - 8. - 3. + 1.);
        // Through a further op: d(3·y)/dx = 3·c.
        let grads = y.affine(3.0, 0.0)?.backward()?;
        let gx = grads.get(x.as_tensor()).expect("x has a gradient");
        assert_eq!(gx.to_vec2::<f32>()?, vec![vec![0.75, 12.], vec![-3., 6.]]);
        assert!(grads.get(&c).is_none(), "the constant gets no gradient");
        assert!(dot_constant(x.as_tensor(), &c.reshape(4)?).is_err());
        Ok(())
    }
}
