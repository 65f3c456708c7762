//! One micro-batch's training forward and its backward, as the trainer drives them: a
//! [`ForwardPass`] holds the summed loss and whatever its backward needs, and its backward returns
//! the gradients of the trainable variables only. [`GraphPass`] is candle's autograd over the whole
//! graph (what [`super::LossModel`]s give by default); `super::layered` keeps less and recomputes.
//!
//! Also owns what is known about candle 0.11's `GradStore`: `Tensor::backward` removes the gradient
//! of every tracked intermediate once it has propagated it, but every *argument* of a tracked op
//! gets an entry (`or_insert`), tracked or not, so a constant operand of a stock binary op (a mask, a
//! table, a frozen weight) keeps a gradient until the store is dropped. [`variable_gradients`]
//! takes the variables' gradients out and drops the rest at once; [`store_bytes`] measures it.
//! Must not: know models, PEFT methods or the training loop's bookkeeping.

use candle_core::backprop::GradStore;
use candle_core::{Result, Tensor, Var};

/// The forward of one micro-batch, kept until its backward.
pub trait ForwardPass {
    /// The summed loss over the scored tokens (an f32 scalar).
    fn loss_sum(&self) -> &Tensor;

    /// The gradients of `scale · loss_sum` for `variables`, in their order (`None` where no
    /// gradient reaches one). Consumes the pass, so what it kept is freed.
    fn backward(self: Box<Self>, scale: f64, variables: &[Var]) -> Result<Vec<Option<Tensor>>>;
}

/// The whole autograd graph of the loss, kept from forward to backward (no recomputation).
pub struct GraphPass {
    loss_sum: Tensor,
}

impl GraphPass {
    pub fn new(loss_sum: Tensor) -> Self {
        Self { loss_sum }
    }
}

impl ForwardPass for GraphPass {
    fn loss_sum(&self) -> &Tensor {
        &self.loss_sum
    }

    fn backward(self: Box<Self>, scale: f64, variables: &[Var]) -> Result<Vec<Option<Tensor>>> {
        let store = self.loss_sum.affine(scale, 0.0)?.backward()?;
        drop(self);
        let mut gradients = vec![None; variables.len()];
        accumulate(&mut gradients, store, variables)?;
        Ok(gradients)
    }
}

/// Take the gradients of `variables` out of `store`, detached, and drop everything else it holds.
pub fn variable_gradients(store: GradStore, variables: &[Var]) -> Vec<Option<Tensor>> {
    let mut store = store;
    let gradients = variables
        .iter()
        .map(|var| store.remove(var.as_tensor()).map(|g| g.detach()))
        .collect();
    drop(store);
    gradients
}

/// Add the gradients of `variables` in `store` into `sums` (same order), dropping the store.
pub fn accumulate(sums: &mut [Option<Tensor>], store: GradStore, variables: &[Var]) -> Result<()> {
    for (sum, gradient) in sums.iter_mut().zip(variable_gradients(store, variables)) {
        if let Some(gradient) = gradient {
            *sum = Some(match sum.take() {
                Some(previous) => previous.add(&gradient)?,
                None => gradient,
            });
        }
    }
    Ok(())
}

/// Bytes of all the gradients `store` holds.
pub fn store_bytes(store: &GradStore) -> u64 {
    store
        .get_ids()
        .filter_map(|id| store.get_id(*id))
        .map(tensor_bytes)
        .sum()
}

/// Bytes of one tensor's elements.
pub fn tensor_bytes(tensor: &Tensor) -> u64 {
    (tensor.elem_count() * tensor.dtype().size_in_bytes()) as u64
}
