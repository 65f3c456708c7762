//! Activation checkpointing: the loss model of a causal LM executed layer by layer on candle's
//! autograd, keeping only each decoder layer's input between forward and backward.
//!
//! Forward: the layer-0 input (embeddings, prompt-tuning prefix through [`Hooks`]), then each
//! decoder layer on the *detached* previous output (so no graph outlives the layer), saving its
//! input; then final norm + head + loss, whose graph is kept (its backward runs first, right after).
//! Backward walks the layers in reverse: recompute layer `i` on a tracked copy of its saved input,
//! backpropagate from a seed that hands `grad_out` to the layer's output
//! ([`crate::ops::gradient_seed`]) locally, add the adapter
//! variables' gradients to the running sums and pass the input's gradient down; the embedding part
//! last when it has trainable inputs. Works for every model (through [`CausalLm`]'s pieces) and
//! every PEFT method (layer methods through the model's linear layers, prompt methods through
//! `hooks`).
//!
//! The recompute must be the same function as the first forward: dropout masks are drawn from the
//! adapter's seed for the micro-batch and the layer's path (see `peft::lora`), which stay set from
//! forward to backward. On the CPU the gradients are bit-identical to the whole-graph backward
//! (`tests/checkpointing.rs`): each local backward runs the same ops in the same order as the
//! corresponding part of the full backward, and the seed hands the layer's output `g` itself.
//! With a [`HostStash`] (`activation_offload`), the layer inputs wait in page-locked host memory
//! instead of on the device (copied out after each layer's forward and back before its
//! recompute, asynchronously on the device's stream).
//! Must not: know PEFT methods, pipelines or the trainer's bookkeeping.

use candle_core::{Device, Result, Tensor, Var};

use super::pass::{accumulate, ForwardPass};
use super::trainer::LossModel;
use crate::data::batch::HostBatch;
use crate::models::{CausalLm, Hooks, LayerPlan};
use crate::ops::gradient_seed;
use crate::ops::offload::{HostStash, Kept};
use crate::peft::Adapter;

/// A causal LM (adapter injected) scored with next-token cross-entropy like
/// [`super::CausalLmLoss`], trained with activation checkpointing.
pub struct CheckpointedLoss<'a> {
    pub model: &'a dyn CausalLm,
    /// What prompt-based methods add to each forward.
    pub hooks: HookSource<'a>,
    /// Keep the layer inputs in host memory between forward and backward (offloaded
    /// checkpointing; CUDA only, see [`HostStash`]). `None`: on the device.
    pub offload: Option<&'a HostStash>,
}

/// Where a forward's [`Hooks`] come from.
pub enum HookSource<'a> {
    /// The same hooks for every micro-batch (`Hooks::none()` for layer methods).
    Fixed(Hooks),
    /// The adapter's, asked once per micro-batch: they follow its variables and its mode.
    Adapter(&'a dyn Adapter),
}

impl From<Hooks> for HookSource<'_> {
    fn from(hooks: Hooks) -> Self {
        HookSource::Fixed(hooks)
    }
}

impl HookSource<'_> {
    fn hooks(&self) -> Result<Hooks> {
        match self {
            HookSource::Fixed(hooks) => Ok(hooks.clone()),
            HookSource::Adapter(adapter) => adapter
                .hooks()
                .map_err(|error| candle_core::Error::Msg(error.to_string())),
        }
    }
}

/// The batch as the model reads it: `(input_ids, attention_mask)`, each `[B, T]`: the ids on
/// `device`, the mask on the host, where the model's plan reads it (a device mask would be copied
/// back at the start of every step, the GPU waiting for the copy and the host for the GPU).
pub(crate) fn batch_tensors(batch: &HostBatch, device: &Device) -> Result<(Tensor, Tensor)> {
    let shape = (batch.batch, batch.length);
    Ok((
        Tensor::from_vec(batch.input_ids.clone(), shape, device)?,
        Tensor::from_vec(batch.attention_mask(), shape, &Device::Cpu)?,
    ))
}

/// The batch as the loss reads it: `(input_ids, loss_mask)` on the host, each `[B, T]`. The loss
/// checks its targets on the host; given device tensors it would copy them back mid-step, making
/// the GPU wait for everything queued before it.
pub(crate) fn loss_targets(batch: &HostBatch) -> Result<(Tensor, Tensor)> {
    let shape = (batch.batch, batch.length);
    Ok((
        Tensor::from_vec(batch.input_ids.clone(), shape, &Device::Cpu)?,
        Tensor::from_vec(batch.loss_mask.clone(), shape, &Device::Cpu)?,
    ))
}

/// Summed next-token NLL of the final hidden states (as `CausalLmLoss` computes it: a frozen
/// `lm_head` fused into the loss).
fn head_loss(
    model: &dyn CausalLm,
    hidden: &Tensor,
    input_ids: &Tensor,
    loss_mask: &Tensor,
) -> Result<Tensor> {
    if let Some(weight) = model.lm_head().frozen_weight() {
        let loss =
            crate::ops::next_token_linear_cross_entropy(hidden, weight, input_ids, loss_mask)?;
        return Ok(loss.sum);
    }
    let logits = model.lm_head().forward(hidden)?;
    Ok(crate::ops::next_token_cross_entropy(&logits, input_ids, loss_mask)?.sum)
}

impl LossModel for CheckpointedLoss<'_> {
    fn loss_sum(&self, batch: &HostBatch) -> Result<Tensor> {
        Ok(self.layered(batch)?.loss_sum)
    }

    fn device(&self) -> &Device {
        self.model.device()
    }

    fn forward_pass(&self, batch: &HostBatch) -> Result<Box<dyn ForwardPass + '_>> {
        Ok(Box::new(self.layered(batch)?))
    }
}

impl<'a> CheckpointedLoss<'a> {
    fn layered(&self, batch: &HostBatch) -> Result<LayeredPass<'a>> {
        let model = self.model;
        let (input_ids, attention_mask) = batch_tensors(batch, model.device())?;
        let hooks = self.hooks.hooks()?;
        let plan = model.layer_plan(&input_ids, Some(&attention_mask), &hooks)?;
        let embedded = model.layer_input(&input_ids, &plan, &hooks)?;
        let embedding_tracked = embedded.track_op();
        let layers = model.config().num_layers();
        let mut inputs = Vec::with_capacity(layers);
        let mut x = embedded.detach();
        drop(embedded);
        for index in 0..layers {
            let output = model.layer(index, &x, &plan, &hooks)?.detach();
            inputs.push(match self.offload {
                Some(stash) => stash.keep(index, x)?,
                None => Kept::Device(x),
            });
            x = output;
        }
        let head_input = Var::from_tensor(&x)?;
        drop(x);
        let mut hidden = model.final_norm(head_input.as_tensor(), &hooks)?;
        // Prompt tuning's virtual tokens are not scored: the head sees the real positions only.
        let virtual_tokens = plan.virtual_tokens();
        if virtual_tokens > 0 {
            let length = hidden.dim(1)? - virtual_tokens;
            hidden = hidden.narrow(1, virtual_tokens, length)?;
        }
        let (targets, loss_mask) = loss_targets(batch)?;
        let loss_sum = head_loss(model, &hidden, &targets, &loss_mask)?;
        Ok(LayeredPass {
            model,
            offload: self.offload,
            hooks,
            input_ids,
            plan,
            embedding_tracked,
            inputs,
            head_input,
            loss_sum,
        })
    }
}

/// What a checkpointed forward keeps: every layer's input, the head's graph, the plan.
struct LayeredPass<'a> {
    model: &'a dyn CausalLm,
    offload: Option<&'a HostStash>,
    hooks: Hooks,
    input_ids: Tensor,
    plan: LayerPlan,
    embedding_tracked: bool,
    /// `inputs[i]`: the (detached) input of decoder layer `i`, on the device or offloaded.
    inputs: Vec<Kept>,
    head_input: Var,
    loss_sum: Tensor,
}

impl ForwardPass for LayeredPass<'_> {
    fn loss_sum(&self) -> &Tensor {
        &self.loss_sum
    }

    fn backward(self: Box<Self>, scale: f64, variables: &[Var]) -> Result<Vec<Option<Tensor>>> {
        let LayeredPass {
            model,
            offload,
            hooks,
            input_ids,
            plan,
            embedding_tracked,
            mut inputs,
            head_input,
            loss_sum,
        } = *self;
        let mut sums = vec![None; variables.len()];
        // The head: its graph is still there.
        let mut store = loss_sum.affine(scale, 0.0)?.backward()?;
        drop(loss_sum);
        let mut gradient = take_input_gradient(&mut store, head_input.as_tensor())?;
        drop(head_input);
        accumulate(&mut sums, store, variables)?;
        // The decoder layers, last first, each recomputed from its saved input.
        for index in (0..inputs.len()).rev() {
            let kept = inputs
                .pop()
                .unwrap_or_else(|| unreachable!("one input per layer"));
            let saved = match offload {
                Some(stash) => stash.take(kept)?,
                None => match kept {
                    Kept::Device(x) => x,
                    Kept::Host { slot, .. } => {
                        candle_core::bail!("layer input {slot} was offloaded without a stash")
                    }
                },
            };
            let input = Var::from_tensor(&saved)?;
            drop(saved);
            let output = model.layer(index, input.as_tensor(), &plan, &hooks)?;
            let mut store = gradient_seed(&output, &gradient)?.backward()?;
            drop(output);
            gradient = take_input_gradient(&mut store, input.as_tensor())?;
            accumulate(&mut sums, store, variables)?;
        }
        // The embedding part, when trainable inputs (prompt tuning) reach it.
        if embedding_tracked {
            let embedded = model.layer_input(&input_ids, &plan, &hooks)?;
            let store = gradient_seed(&embedded, &gradient)?.backward()?;
            accumulate(&mut sums, store, variables)?;
        }
        Ok(sums)
    }
}

/// The gradient of a part's (tracked) input, removed from the part's store; zeros when nothing
/// reached it.
fn take_input_gradient(
    store: &mut candle_core::backprop::GradStore,
    input: &Tensor,
) -> Result<Tensor> {
    match store.remove(input) {
        Some(gradient) => Ok(gradient.detach()),
        None => input.zeros_like(),
    }
}
