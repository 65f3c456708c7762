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
