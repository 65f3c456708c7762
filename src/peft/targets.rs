//! Which linear layers a PEFT target spec selects, with PEFT's exact matching rules, and PEFT's
//! LoRA parameter count over the linear layers a model's `config.json` describes
//! (`models::ModelConfig::linear_layers`), for `peftpipe inspect` and checks without weights.
//! Pure: no tensors, no files. Sizes come from files, so counts use checked arithmetic (clippy
//! denies unchecked arithmetic and `unwrap` outside the tests).
#![cfg_attr(not(test), deny(clippy::unwrap_used, clippy::arithmetic_side_effects))]
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

/// A LoRA's trainable parameters on one `in → out` linear layer: r·(in + out); `None` when that
/// does not fit in 64 bits (sizes come from config.json: checked, never wrapped).
pub fn lora_module_parameters(in_features: usize, out_features: usize, rank: usize) -> Option<u64> {
    let wide = |value: usize| u64::try_from(value).ok();
    let features = wide(in_features)?.checked_add(wide(out_features)?)?;
    wide(rank)?.checked_mul(features)
}

/// PEFT's LoRA trainable-parameter count: Σ r·(in + out) over the selected linear layers;
/// `None` when it does not fit in 64 bits.
pub fn lora_parameter_count(
    modules: &[LinearSpec],
    targets: &TargetModules,
    rank: usize,
) -> Option<u64> {
    matched_modules(modules, targets)
        .iter()
        .try_fold(0u64, |total, module| {
            total.checked_add(lora_module_parameters(
                module.in_features,
                module.out_features,
                rank,
            )?)
        })
}

/// The distinct last path components of the linear layers, in model order (`q_proj`, ...).
pub fn linear_names(modules: &[LinearSpec]) -> Vec<&str> {
    let mut names: Vec<&str> = Vec::new();
    for module in modules {
        if !names.contains(&module.name()) {
            names.push(module.name());
        }
    }
    names
}

/// The linear-layer name closest to a misspelled `name` (the project's did-you-mean rule), if
/// one is plausibly meant.
pub fn closest_name<'a>(name: &str, candidates: &[&'a str]) -> Option<&'a str> {
    crate::config::problem::did_you_mean(last_component(name), candidates.iter().copied())
}

/// Check that a spec fits the model (the core's [`crate::config::target_modules::check_targets`]):
/// every listed name selects at least one linear layer, and a regex or `all-linear` selects
/// something. The error names the offending entry, suggests the closest linear-layer name, and
/// lists them all.
pub fn check_targets(modules: &[LinearSpec], targets: &TargetModules) -> Result<(), String> {
    let paths: Vec<&str> = modules.iter().map(|module| module.path.as_str()).collect();
    crate::config::target_modules::check_targets(targets, &paths).map_err(|mismatch| {
        let hint = mismatch
            .suggestion
            .map(|close| format!("; did you mean `{close}`?"))
            .unwrap_or_default();
        format!("{}{hint} ({})", mismatch.message, mismatch.listing)
    })
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
    fn lora_counts_that_overflow_are_none() {
        let huge = LinearSpec {
            path: "model.layers.0.self_attn.q_proj".into(),
            in_features: usize::MAX,
            out_features: 2,
            bias: false,
            tied_to_embeddings: false,
        };
        assert_eq!(lora_module_parameters(usize::MAX, 2, 1), None);
        assert_eq!(lora_module_parameters(1 << 40, 1 << 40, 1 << 30), None);
        assert_eq!(lora_module_parameters(64, 32, 8), Some(768));
        let twice = [huge.clone(), huge];
        assert_eq!(
            lora_parameter_count(&twice, &TargetModules::AllLinear, 1),
            None
        );
    }

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

    fn names(list: &[&str]) -> TargetModules {
        TargetModules::Names(list.iter().map(|s| s.to_string()).collect())
    }

    #[test]
    fn unknown_names_get_a_suggestion_and_the_listing() {
        let config = serde_json::json!({"model_type": "llama", "hidden_size": 16,
            "intermediate_size": 24, "num_hidden_layers": 2, "num_attention_heads": 4,
            "num_key_value_heads": 2, "vocab_size": 40});
        let modules = crate::models::ModelConfig::from_json(&config)
            .unwrap()
            .linear_layers();
        assert!(check_targets(&modules, &names(&["q_proj", "v_proj"])).is_ok());
        let error = check_targets(&modules, &names(&["q_proj", "q_prj"])).unwrap_err();
        assert!(error.contains("`q_prj`"), "{error}");
        assert!(error.contains("did you mean `q_proj`?"), "{error}");
        assert!(
            error.contains("gate_proj, up_proj, down_proj, lm_head"),
            "{error}"
        );
        let error = check_targets(&modules, &names(&["c_attn_weird_name"])).unwrap_err();
        assert!(!error.contains("did you mean"), "{error}");
        let regex = TargetModules::regex(r".*\.q_projection").unwrap();
        assert!(check_targets(&modules, &regex)
            .unwrap_err()
            .contains("matches no linear layer"));
        assert!(check_targets(&modules, &TargetModules::AllLinear).is_ok());
    }
}
