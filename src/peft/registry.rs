//! The list of PEFT methods: PEFT's `peft_type` → how to load a saved folder, and a pipeline's
//! method config → how to make a fresh adapter. The only place that names every method; stages,
//! the trainer, inference and export go through [`load_adapter`] / [`new_adapter`] and the
//! [`Adapter`] trait. Never prints.

use std::path::Path;

use candle_core::Device;
use serde_json::Value;

use super::auxiliary::{AuxiliarySpec, WithAuxiliary};
use super::format::{read_adapter_config, ADAPTER_CONFIG};
use super::ia3::{Ia3Adapter, Ia3Settings};
use super::llama_adapter::{LlamaAdapter, LlamaAdapterSettings};
use super::lora::{LoraAdapter, LoraSettings};
use super::prefix_tuning::{PrefixTuningAdapter, PrefixTuningSettings};
use super::prompt_tuning::{PromptTuningAdapter, PromptTuningSettings};
use super::qlora::QloraAdapter;
use super::{mix_seed, Adapter, PeftError};
use crate::config::method::{resolve_ia3_for, resolve_targets, MethodConfig, PromptInit};

/// Text → token ids, special tokens included (see [`MethodContext::tokenize`]).
pub type Tokenize<'a> = &'a dyn Fn(&str) -> Result<Vec<u32>, String>;

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
    pub tokenize: Option<Tokenize<'a>>,
}

/// PEFT `peft_type`s this registry loads.
pub const SUPPORTED_PEFT_TYPES: &[&str] = &[
    "LORA",
    "PROMPT_TUNING",
    "PREFIX_TUNING",
    "ADAPTION_PROMPT",
    "IA3",
];

/// Load a PEFT adapter folder (any supported `peft_type`) onto `device`. The returned adapter is
/// in inference mode: build the model through its factory, then call `finish_injection`.
pub fn load_adapter(dir: &Path, device: &Device) -> Result<Box<dyn Adapter>, PeftError> {
    let config = read_adapter_config(dir)?;
    let path = dir.join(ADAPTER_CONFIG);
    let method = load_method(dir, device, &config, &path)?;
    WithAuxiliary::load(method, dir, device)
}

/// The method's own adapter of a PEFT folder (without its auxiliary modules).
fn load_method(
    dir: &Path,
    device: &Device,
    config: &Value,
    path: &Path,
) -> Result<Box<dyn Adapter>, PeftError> {
    match super::format::peft_type(config) {
        Some("LORA") => Ok(Box::new(LoraAdapter::load(dir, device)?)),
        Some("PROMPT_TUNING") => Ok(Box::new(PromptTuningAdapter::load(dir, device)?)),
        Some("PREFIX_TUNING") => Ok(Box::new(PrefixTuningAdapter::load(dir, device)?)),
        Some("ADAPTION_PROMPT") => Ok(Box::new(LlamaAdapter::load(dir, device)?)),
        Some("IA3") => Ok(Box::new(Ia3Adapter::load(dir, device)?)),
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

/// A fresh adapter (in training mode) for a pipeline's method config, with the auxiliary
/// trainable modules it asks for (`trainable_token_indices`, `modules_to_save`).
pub fn new_adapter(
    method: &MethodConfig,
    cx: &MethodContext<'_>,
) -> Result<Box<dyn Adapter>, PeftError> {
    let adapter = new_method_adapter(method, cx)?;
    Ok(match AuxiliarySpec::from_method(method) {
        Some(spec) => Box::new(WithAuxiliary::new(adapter, spec, cx.device)),
        None => adapter,
    })
}

/// The method's own fresh adapter.
fn new_method_adapter(
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
            Ok(Box::new(
                LoraAdapter::new(settings, cx.device)?.with_dora(lora.use_dora),
            ))
        }
        MethodConfig::Qlora(qlora) => {
            if model_type == "gpt2" {
                return Err(PeftError::invalid(
                    "QLoRA's 4-bit base is supported for Llama-family models, not gpt2 (use lora)",
                ));
            }
            let targets = resolve_targets(qlora.target_modules.as_ref(), cx.model_config)
                .map_err(PeftError::invalid)?;
            let settings = LoraSettings {
                rank: qlora.r,
                alpha: qlora.alpha,
                dropout: qlora.dropout as f32,
                targets,
                use_rslora: qlora.use_rslora,
                fan_in_fan_out: false,
                seed: mix_seed(cx.seed, "lora init"),
            };
            // A checkpoint saved with bitsandbytes 4-bit: its weights are used as stored (the
            // train stage checks config.json's settings against these first).
            let quantization = super::qlora::base_quantization(
                &qlora.four_bit(),
                cx.model_config.get("quantization_config").is_some(),
            );
            Ok(Box::new(QloraAdapter::new(
                settings,
                qlora.use_dora,
                quantization,
                cx.device,
            )?))
        }
        MethodConfig::Ia3(ia3) => {
            let (targets, feedforward) =
                resolve_ia3_for(ia3, model_type).map_err(PeftError::invalid)?;
            let settings = Ia3Settings {
                targets,
                feedforward,
                fan_in_fan_out: model_type == "gpt2",
            };
            Ok(Box::new(Ia3Adapter::new(settings, cx.device)?))
        }
        MethodConfig::PromptTuning(prompt) => {
            let init_token_ids = match (prompt.init, &prompt.init_text) {
                (PromptInit::Text, Some(text)) => {
                    let tokenize = cx.tokenize.ok_or_else(|| {
                        PeftError::invalid("prompt tuning `init: text` needs the model's tokenizer")
                    })?;
                    Some(tokenize(text).map_err(|error| {
                        PeftError::invalid(format!("tokenizing init_text: {error}"))
                    })?)
                }
                _ => None,
            };
            let settings = PromptTuningSettings {
                num_virtual_tokens: prompt.num_virtual_tokens,
                init: prompt.init,
                init_text: prompt.init_text.clone(),
                init_token_ids,
                seed: mix_seed(cx.seed, "prompt tuning init"),
            };
            Ok(Box::new(PromptTuningAdapter::new(settings, cx.device)?))
        }
        MethodConfig::PrefixTuning(prefix) => {
            let settings = PrefixTuningSettings {
                num_virtual_tokens: prefix.num_virtual_tokens,
                prefix_projection: prefix.prefix_projection,
                encoder_hidden_size: prefix.encoder_hidden_size,
                init: prefix.init,
                seed: mix_seed(cx.seed, "prefix tuning init"),
            };
            Ok(Box::new(PrefixTuningAdapter::new(settings, cx.device)?))
        }
        MethodConfig::LlamaAdapter(adapter) => {
            if model_type == "gpt2" {
                return Err(PeftError::invalid(
                    "LLaMA-Adapter (PEFT's adaption_prompt) needs a Llama-family model, not gpt2",
                ));
            }
            let settings = LlamaAdapterSettings {
                adapter_len: adapter.adapter_len,
                adapter_layers: adapter.adapter_layers,
                per_head_gate: adapter.per_head_gate,
                seed: mix_seed(cx.seed, "llama adapter init"),
            };
            Ok(Box::new(LlamaAdapter::new(settings, cx.device)?))
        }
    }
}
