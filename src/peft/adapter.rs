//! The [`Adapter`] trait: what every PEFT method offers to the trainer, evaluation, generation and
//! export, whichever family it belongs to.
//!
//! - Layer methods (LoRA with DoRA, IA3, QLoRA) inject through the model's
//!   [`LinearFactory`]: the model is built through [`Adapter::linear_factory`].
//! - Prompt methods (prompt tuning, prefix tuning, LLaMA-Adapter) act through the model's
//!   [`Hooks`]: [`Adapter::hooks`] gives them for each forward pass.
//!
//! Lifecycle: make the adapter (`peft::registry::new_adapter` from a method config, or
//! `peft::registry::load_adapter` from a PEFT folder) → build the model through its factory →
//! [`Adapter::finish_injection`] with the built model (checks the targets, creates prompt
//! variables that need the model's sizes or embeddings) → train / evaluate with
//! [`Adapter::hooks`] on every forward → [`Adapter::save`]. Merging is optional: a mergeable
//! method yields per-tensor [`WeightPatch`]es that `models::checkpoint` writes into a merged
//! checkpoint. Never prints, never reads pipeline configs.

use std::path::Path;

use candle_core::Var;

use super::PeftError;
use crate::models::quantized::BaseQuantization;
use crate::models::{CausalLm, FrozenLinearFactory, Hooks, LinearFactory};

pub use crate::models::checkpoint::{Parameter, PatchChange, WeightPatch};

/// Whether the adapter runs in training mode (dropout active, with the given seed for this
/// micro-batch; trainable variables tracked) or inference mode (no dropout; the variables enter
/// the forward pass detached, so it builds no autograd graph). Randomness is a pure function of
/// the seed so a resumed run draws exactly what an uninterrupted one would. A fresh adapter
/// starts in training mode, a loaded one in inference mode (as PEFT's `from_pretrained`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AdapterMode {
    Train { seed: u64 },
    Eval,
}

/// A linear layer of a model as the model's builder hands it to a [`LinearFactory`]: its module
/// path (`model.layers.0.self_attn.q_proj`) and its weight's `[out, in]`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LayerShape<'a> {
    pub path: &'a str,
    pub out_features: usize,
    pub in_features: usize,
}

/// Messages of a layer method's [`Adapter::check_layers`], as its factory and
/// `finish_injection` word them.
pub(crate) struct LoadedLayerMessages<'a> {
    /// A targeted layer has no loaded tensors: the message for its path.
    pub missing: &'a dyn Fn(&str) -> String,
    /// The targets matched no layer.
    pub none_matched: String,
    /// Loaded tensors found no targeted layer: the message for the first path and the count.
    pub unused: &'a dyn Fn(&str, usize) -> String,
}

/// [`Adapter::check_layers`] of a loaded layer method: every layer `targets` matches takes its
/// entry from `loaded` (module path → what was read), which `fits` checks against the layer's
/// shape; the targets must match some layer, and every loaded entry must find its layer.
pub(crate) fn check_loaded_layers<T>(
    layers: &[LayerShape<'_>],
    targets: &super::targets::TargetModules,
    mut loaded: std::collections::BTreeMap<&str, T>,
    fits: impl Fn(&LayerShape<'_>, T) -> Result<(), String>,
    messages: LoadedLayerMessages<'_>,
) -> Result<(), PeftError> {
    let mut targeted = 0usize;
    for layer in layers {
        if !targets.matches(layer.path) {
            continue;
        }
        targeted += 1;
        let Some(entry) = loaded.remove(layer.path) else {
            return Err(PeftError::invalid((messages.missing)(layer.path)));
        };
        fits(layer, entry).map_err(PeftError::invalid)?;
    }
    if targeted == 0 {
        return Err(PeftError::invalid(messages.none_matched));
    }
    if let Some(path) = loaded.keys().next() {
        return Err(PeftError::invalid((messages.unused)(path, loaded.len())));
    }
    Ok(())
}

/// One PEFT method attached to one model.
pub trait Adapter: Send + Sync {
    /// PEFT's `peft_type` (`LORA`, `PROMPT_TUNING`, ...).
    fn peft_type(&self) -> &'static str;

    /// The factory to build the model's linear layers with (the injection point of layer
    /// methods). Prompt methods keep the frozen layers.
    fn linear_factory(&self) -> &dyn LinearFactory {
        &FrozenLinearFactory
    }

    /// Called once the model is built: layer methods error when the targets matched nothing or
    /// loaded tensors were left unused (PEFT's "missing/unexpected keys"); prompt methods check
    /// their sizes against the model and create their variables.
    fn finish_injection(&self, model: &dyn CausalLm) -> Result<(), PeftError>;

    /// What this adapter adds to a forward pass (tracked in training mode, detached in
    /// inference mode). Layer methods add nothing.
    fn hooks(&self) -> Result<Hooks, PeftError> {
        Ok(Hooks::none())
    }

    /// Trainable variables by their PEFT on-disk names, sorted by name.
    fn trainable_vars(&self) -> Vec<(String, Var)>;

    /// Number of trainable scalars.
    fn trainable_parameter_count(&self) -> u64 {
        self.trainable_vars()
            .iter()
            .map(|(_, var)| var.elem_count() as u64)
            .sum()
    }

    /// Switch between training (dropout on) and inference.
    fn set_mode(&self, mode: AdapterMode);

    /// Prepares what the next training forward reads of the variables, once they hold the
    /// values that forward must see (the trainer calls it after `set_mode(Train)`, right before
    /// every forward): LoRA casts all of its factors to the compute dtype in one launch instead
    /// of two casts per layer. What is prepared is read by at most that one forward and dropped
    /// by the next `set_mode` or `prepare_forward`, so a forward without it is correct, only
    /// slower. Nothing by default.
    fn prepare_forward(&self) -> Result<(), PeftError> {
        Ok(())
    }

    /// Write the adapter folder in PEFT's format (adapter_config.json + adapter_model.safetensors)
    /// through `peft::format`.
    fn save(&self, dir: &Path, base_model_name_or_path: &str) -> Result<(), PeftError>;

    /// The merge as per-tensor patches of the base weights, computed without changing the model
    /// (also on a loaded adapter whose model was never built); `None` when the method cannot be
    /// merged (prompt methods).
    fn merge_patches(&self) -> Result<Option<Vec<WeightPatch>>, PeftError> {
        Ok(None)
    }

    /// Fold the adapter into the frozen weights of the built model (forward then skips the
    /// adapter branch).
    fn merge(&self) -> Result<(), PeftError> {
        Err(PeftError::invalid(format!(
            "{} adapters cannot be merged into the base weights",
            self.peft_type()
        )))
    }

    /// Undo [`Adapter::merge`].
    fn unmerge(&self) -> Result<(), PeftError> {
        self.merge()
    }

    /// The 4-bit storage the base model needs (QLoRA), recorded beside the saved adapter so
    /// evaluation, generation and export load the same base; `None`: the base as stored.
    fn base_quantization(&self) -> Option<BaseQuantization> {
        None
    }

    /// What building a model with these linear layers through this (loaded) adapter's factory
    /// and [`Adapter::finish_injection`] would refuse — targets that match no layer, a targeted
    /// layer without its tensors, tensors of the wrong shape or for no layer — found from the
    /// shapes alone, without building the model (validation checks an outside adapter folder
    /// against its base model this way). Default: nothing to check (prompt methods check their
    /// sizes against the built model).
    fn check_layers(&self, _layers: &[LayerShape<'_>]) -> Result<(), PeftError> {
        Ok(())
    }
}
