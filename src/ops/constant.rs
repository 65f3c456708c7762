//! Elementwise ops between a tracked tensor and a constant: `x + c`, `x · c`.
//!
//! candle's binary ops store a gradient for both operands even when one is a detached constant (a
//! mask, a bias, a position table), and that gradient keeps its inputs alive until backward ends.
//! These ops give the constant none. Must not: be used where the second operand is trainable.

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

/// `a · b` (matmul) where a constant `a` (e.g. the untracked input of a layer-0 adapter) gets no
/// gradient: `db = aᵀ · g`, as candle computes it. The same values as `a.matmul(b)`.
pub fn matmul_tracked(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    if a.track_op() || !b.track_op() {
        return a.matmul(b);
    }
    let constant = a.detach();
    let output = constant.matmul(&b.detach())?;
    with_backward("matmul-constant-lhs", b, output, move |_b, _y, grad| {
        constant.t()?.matmul(grad)
    })
}

#[cfg(test)]
mod tests {
    use candle_core::{Device, Tensor, Var};

    use super::{add_tracked, dot_constant, matmul_tracked};

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
