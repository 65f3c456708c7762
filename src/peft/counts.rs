//! PEFT's trainable-parameter count of every method, from a model's `config.json` alone (no
//! weights, no tensors): one function per method, next to the registry, so `peftpipe inspect
//! --method` and the comparison table agree with what `PeftModel.print_trainable_parameters()`
//! prints. [`MethodShape`] holds exactly the hyperparameters a count depends on, whichever
//! config type a method's home defines (a method folder maps its config onto it).
//!
//! The formulas (PEFT 0.20, checked against its Llama-3.2-3B benchmark, see
//! `tests/inspect.rs`):
//! - LoRA: Σ r·(in + out) over the targeted linear layers; DoRA adds the magnitude vector, Σ out.
//! - IA3: one vector per targeted layer: `in` features for feed-forward modules (the input is
//!   scaled), `out` features for the others.
//! - prompt tuning: n_virtual · hidden · num_transformer_submodules (1 for a causal LM).
//! - prefix tuning: PEFT shrinks `token_dim` to kv_dim = head_dim · num_key_value_heads for
//!   grouped-query attention; without projection n_virtual · L · 2 · kv_dim; with
//!   `prefix_projection` the encoder is what trains: Embedding(n, kv) + Linear(kv, e) +
//!   Linear(e, 2·L·kv), biases included (e = `encoder_hidden_size`, default kv).
//! - LLaMA-Adapter (`adaption_prompt`): adapter_layers · (adapter_len · hidden + 1) with PEFT's
//!   scalar gate; the paper's per-head gate has num_attention_heads gates per layer.
//!
//! Pure; sizes come from files, so counts use checked arithmetic and return `None` on overflow.
#![cfg_attr(not(test), deny(clippy::unwrap_used, clippy::arithmetic_side_effects))]

use crate::config::method::ia3_is_feedforward;
use crate::models::ModelConfig;

use super::targets::{matched_modules, TargetModules};

/// What a method's trainable-parameter count depends on.
#[derive(Debug, Clone)]
pub enum MethodShape {
    /// LoRA of rank `rank` on `targets`; `dora` adds DoRA's magnitude vectors.
    Lora {
        rank: usize,
        targets: TargetModules,
        dora: bool,
    },
    /// IA3 scaling vectors on `targets`; those whose path ends with a `feedforward` name
    /// (PEFT's rule, `config::method::ia3_is_feedforward`) scale their input.
    Ia3 {
        targets: TargetModules,
        feedforward: Vec<String>,
    },
    /// Prompt tuning: `num_virtual_tokens` trainable input embeddings.
    PromptTuning { num_virtual_tokens: usize },
    /// Prefix tuning; `encoder_hidden_size` is `Some` with `prefix_projection`.
    PrefixTuning {
        num_virtual_tokens: usize,
        encoder_hidden_size: Option<usize>,
    },
    /// LLaMA-Adapter (PEFT's `adaption_prompt`) in the top `adapter_layers` layers.
    LlamaAdapter {
        adapter_len: usize,
        adapter_layers: usize,
        per_head_gate: bool,
    },
}

impl MethodShape {
    /// The method's name as written in YAML.
    pub fn name(&self) -> &'static str {
        match self {
            MethodShape::Lora { dora: false, .. } => "lora",
            MethodShape::Lora { dora: true, .. } => "dora",
            MethodShape::Ia3 { .. } => "ia3",
            MethodShape::PromptTuning { .. } => "prompt_tuning",
            MethodShape::PrefixTuning { .. } => "prefix_tuning",
            MethodShape::LlamaAdapter { .. } => "llama_adapter",
        }
    }
}

fn wide(value: usize) -> Option<u64> {
    u64::try_from(value).ok()
}

/// The product of `factors`, `None` on overflow.
fn product(factors: &[usize]) -> Option<u64> {
    factors
        .iter()
        .try_fold(1u64, |total, &factor| total.checked_mul(wide(factor)?))
}

/// PEFT's trainable parameters of `shape` on the model `config` describes; `None` when the count
/// does not fit in 64 bits. Errors (a target that matches nothing, more adapter layers than the
/// model has) are the caller's checks: this counts what would be created.
pub fn trainable_parameters(shape: &MethodShape, config: &ModelConfig) -> Option<u64> {
    match shape {
        MethodShape::Lora {
            rank,
            targets,
            dora,
        } => lora_parameters(config, targets, *rank, *dora),
        MethodShape::Ia3 {
            targets,
            feedforward,
        } => ia3_parameters(config, targets, feedforward),
        MethodShape::PromptTuning { num_virtual_tokens } => {
            prompt_tuning_parameters(config, *num_virtual_tokens)
        }
        MethodShape::PrefixTuning {
            num_virtual_tokens,
            encoder_hidden_size,
        } => prefix_tuning_parameters(config, *num_virtual_tokens, *encoder_hidden_size),
        MethodShape::LlamaAdapter {
            adapter_len,
            adapter_layers,
            per_head_gate,
        } => llama_adapter_parameters(config, *adapter_len, *adapter_layers, *per_head_gate),
    }
}

/// LoRA: Σ r·(in + out); DoRA also Σ out (the magnitude vector of each adapted layer).
pub fn lora_parameters(
    config: &ModelConfig,
    targets: &TargetModules,
    rank: usize,
    dora: bool,
) -> Option<u64> {
    let modules = config.linear_layers();
    matched_modules(&modules, targets)
        .iter()
        .try_fold(0u64, |total, module| {
            let features = wide(module.in_features)?.checked_add(wide(module.out_features)?)?;
            let mut count = wide(rank)?.checked_mul(features)?;
            if dora {
                count = count.checked_add(wide(module.out_features)?)?;
            }
            total.checked_add(count)
        })
}

/// IA3: `in` features for feed-forward targets, `out` features for the others.
pub fn ia3_parameters(
    config: &ModelConfig,
    targets: &TargetModules,
    feedforward: &[String],
) -> Option<u64> {
    let modules = config.linear_layers();
    matched_modules(&modules, targets)
        .iter()
        .try_fold(0u64, |total, module| {
            let width = if ia3_is_feedforward(&module.path, feedforward) {
                module.in_features
            } else {
                module.out_features
            };
            total.checked_add(wide(width)?)
        })
}

/// Prompt tuning: n_virtual · hidden (one transformer submodule for a causal LM).
pub fn prompt_tuning_parameters(config: &ModelConfig, num_virtual_tokens: usize) -> Option<u64> {
    product(&[num_virtual_tokens, config.hidden_size()])
}

/// Prefix tuning: n · L · 2 · kv_dim, or the projection encoder's parameters.
pub fn prefix_tuning_parameters(
    config: &ModelConfig,
    num_virtual_tokens: usize,
    encoder_hidden_size: Option<usize>,
) -> Option<u64> {
    let kv = config.kv_dim();
    let layers = config.num_layers();
    match encoder_hidden_size {
        None => product(&[num_virtual_tokens, layers, 2, kv]),
        Some(encoder) => {
            let out = product(&[layers, 2, kv])?;
            let embedding = product(&[num_virtual_tokens, kv])?;
            let first = product(&[kv, encoder])?.checked_add(wide(encoder)?)?;
            let second = wide(encoder)?.checked_mul(out)?.checked_add(out)?;
            embedding.checked_add(first)?.checked_add(second)
        }
    }
}

/// LLaMA-Adapter: adapter_layers · (adapter_len · hidden + gates per layer).
pub fn llama_adapter_parameters(
    config: &ModelConfig,
    adapter_len: usize,
    adapter_layers: usize,
    per_head_gate: bool,
) -> Option<u64> {
    let gates = if per_head_gate {
        config.num_attention_heads()
    } else {
        1
    };
    let per_layer = product(&[adapter_len, config.hidden_size()])?.checked_add(wide(gates)?)?;
    wide(adapter_layers)?.checked_mul(per_layer)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tiny() -> ModelConfig {
        ModelConfig::from_json(&serde_json::json!({
            "model_type": "llama", "hidden_size": 8, "intermediate_size": 16,
            "num_attention_heads": 2, "num_key_value_heads": 1, "num_hidden_layers": 3,
            "vocab_size": 32, "max_position_embeddings": 64, "rms_norm_eps": 1e-5
        }))
        .unwrap()
    }

    #[test]
    fn small_counts_by_hand() {
        let config = tiny();
        // kv_dim = 4 (head_dim 4 × 1 kv head).
        assert_eq!(prompt_tuning_parameters(&config, 5), Some(40));
        assert_eq!(
            prefix_tuning_parameters(&config, 5, None),
            Some(5 * 3 * 2 * 4)
        );
        // Embedding 5·4 + Linear(4, 6) 24 + 6 + Linear(6, 24) 144 + 24.
        assert_eq!(
            prefix_tuning_parameters(&config, 5, Some(6)),
            Some(20 + 30 + 168)
        );
        assert_eq!(llama_adapter_parameters(&config, 2, 3, false), Some(51));
        assert_eq!(llama_adapter_parameters(&config, 2, 3, true), Some(54));
        let qv = TargetModules::Names(vec!["q_proj".into(), "v_proj".into()]);
        // q: 8→8, v: 8→4 per layer; r = 2.
        assert_eq!(
            lora_parameters(&config, &qv, 2, false),
            Some(3 * (2 * 16 + 2 * 12))
        );
        assert_eq!(
            lora_parameters(&config, &qv, 2, true),
            Some(3 * (2 * 16 + 2 * 12 + 8 + 4))
        );
        let ia3 = TargetModules::Names(vec!["k_proj".into(), "down_proj".into()]);
        let ff = ["down_proj".to_string()];
        assert_eq!(ia3_parameters(&config, &ia3, &ff), Some(3 * (4 + 16)));
    }
}
