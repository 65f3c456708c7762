//! The list of PEFT methods: PEFT's `peft_type` → how to load a saved folder, and a pipeline's
//! method config → how to make a fresh adapter. The only place that names every method; stages,
//! the trainer, inference and export go through [`load_adapter`] / [`new_adapter`] and the
//! [`Adapter`] trait. Never prints.

use std::path::Path;

use candle_core::Device;
use serde_json::Value;

use super::format::{read_adapter_config, ADAPTER_CONFIG};
use super::lora::{LoraAdapter, LoraSettings};
use super::{mix_seed, Adapter, PeftError};
use crate::config::method::{resolve_targets, MethodConfig};

/// What a method's constructor may need besides its config: the model's `config.json`, the
/// device, the seed, and a tokenizer for text initialisations.
pub struct MethodContext<'a> {
    /// The base model's config.json.
    pub model_config: &'a Value,
    pub device: &'a Device,
    /// The run's seed; each method mixes in its own label.
    pub seed: u64,
    /// Tokenize text as PEFT's `tokenizer(text)` does, special tokens (BOS) included (prompt
    /// tuning's `init_text`); `None` when no tokenizer is at hand.
    pub tokenize: Option<&'a dyn Fn(&str) -> Result<Vec<u32>, String>>,
}

/// PEFT `peft_type`s this registry loads.
pub const SUPPORTED_PEFT_TYPES: &[&str] = &["LORA"];

/// Load a PEFT adapter folder (any supported `peft_type`) onto `device`. The returned adapter is
/// in inference mode: build the model through its factory, then call `finish_injection`.
pub fn load_adapter(dir: &Path, device: &Device) -> Result<Box<dyn Adapter>, PeftError> {
    let config = read_adapter_config(dir)?;
    let path = dir.join(ADAPTER_CONFIG);
    match super::format::peft_type(&config) {
        Some("LORA") => Ok(Box::new(LoraAdapter::load(dir, device)?)),
        Some(other) => Err(PeftError::invalid(format!(
            "{}: peft_type `{other}` is not supported (supported: {})",
            path.display(),
            SUPPORTED_PEFT_TYPES.join(", ")
        ))),
        None => Err(PeftError::invalid(format!(
            "{}: no `peft_type`",
            path.display()
        ))),
    }
}

/// A fresh adapter (in training mode) for a pipeline's method config.
pub fn new_adapter(
    method: &MethodConfig,
    cx: &MethodContext<'_>,
) -> Result<Box<dyn Adapter>, PeftError> {
    let model_type = cx
        .model_config
        .get("model_type")
        .and_then(Value::as_str)
        .unwrap_or("");
    match method {
        MethodConfig::Lora(lora) => {
            let targets = resolve_targets(lora.target_modules.as_ref(), cx.model_config)
                .map_err(PeftError::invalid)?;
            let settings = LoraSettings {
                rank: lora.r,
                alpha: lora.alpha,
                dropout: lora.dropout as f32,
                targets,
                use_rslora: lora.use_rslora,
                fan_in_fan_out: model_type == "gpt2",
                seed: mix_seed(cx.seed, "lora init"),
            };
            Ok(Box::new(LoraAdapter::new(settings, cx.device)?))
        }
    }
}
