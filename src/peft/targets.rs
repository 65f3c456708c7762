//! Which linear layers a PEFT target spec selects, with PEFT's exact matching rules, and PEFT's
//! LoRA parameter count over the linear layers a model's `config.json` describes
//! (`models::ModelConfig::linear_layers`), for `peftpipe inspect` and checks without weights.
//! Pure: no tensors, no files.
//!
//! The spec itself ([`TargetModules`], PEFT's matching rules) is pure data in the core crate
//! (`config::target_modules`), re-exported here, so validation can check it without models.

use crate::models::LinearSpec;

pub use crate::config::target_modules::{last_component, TargetModules, OUTPUT_LAYER};

/// The linear layers a spec selects, in model order.
pub fn matched_modules<'a>(
    modules: &'a [LinearSpec],
    targets: &TargetModules,
) -> Vec<&'a LinearSpec> {
    modules
        .iter()
        .filter(|module| targets.matches(&module.path))
        .collect()
}

/// PEFT's LoRA trainable-parameter count: Σ r·(in + out) over the selected linear layers.
pub fn lora_parameter_count(modules: &[LinearSpec], targets: &TargetModules, rank: usize) -> u64 {
    matched_modules(modules, targets)
        .iter()
        .map(|module| (rank * (module.in_features + module.out_features)) as u64)
        .sum()
}

/// Whether a GPT-2 style model stores its linear weights as Conv1D (`[in, out]`), which PEFT
/// records as `fan_in_fan_out: true`.
pub fn uses_conv1d(model_type: &str) -> bool {
    model_type == "gpt2"
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn all_linear_skips_the_output_layer_and_saves_expanded_names() {
        let config = serde_json::json!({"model_type": "gpt2", "n_embd": 8, "n_layer": 2, "n_head": 2, "n_positions": 16,
            "vocab_size": 10});
        let modules = crate::models::ModelConfig::from_json(&config)
            .unwrap()
            .linear_layers();
        let matched: Vec<String> = matched_modules(&modules, &TargetModules::AllLinear)
            .iter()
            .map(|m| m.path.clone())
            .collect();
        assert_eq!(matched.len(), 8);
        assert!(!matched.iter().any(|p| p == "lm_head"));
        assert_eq!(
            TargetModules::AllLinear.to_peft_json(&matched),
            serde_json::json!(["c_attn", "c_fc", "c_proj"])
        );
    }
}
