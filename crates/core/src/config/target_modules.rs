//! A LoRA target spec as PEFT understands it (`target_modules`: names, a regex, `all-linear`),
//! resolved from the pipeline's written form, with PEFT's exact matching rules, and the check that
//! a spec fits a model's layers ([`check_targets`]). Pure data: the linear layers of a concrete
//! model are the main crate's (`models`, `peft::targets`); validation gets them through
//! [`super::probe::Probe::check_model`].
//!
//! PEFT's rules (`peft.tuners.tuners_utils.check_target_module_exists`):
//! - a list of names matches a module whose path equals a name or ends with `.` + name;
//! - a single string is a regular expression that must match the *whole* path (`re.fullmatch`);
//! - `all-linear` selects every linear layer except the output layer (`lm_head`); PEFT expands it
//!   into the set of last path components of the selected layers, which is what it saves.

use std::collections::BTreeSet;

use regex::Regex;
use serde_json::Value;

/// A target spec as PEFT understands it (resolved from the pipeline's `target_modules`).
#[derive(Debug, Clone)]
pub enum TargetModules {
    /// Exact names or path suffixes (`q_proj` matches `model.layers.0.self_attn.q_proj`).
    Names(Vec<String>),
    /// A regular expression matched against the whole module path.
    Regex { pattern: String, compiled: Regex },
    /// Every linear layer except the output layer.
    AllLinear,
}

/// The name PEFT gives the output layer; `all-linear` never selects it.
pub const OUTPUT_LAYER: &str = "lm_head";

impl TargetModules {
    /// A regex spec; PEFT uses `re.fullmatch`, so the pattern is anchored at both ends.
    pub fn regex(pattern: &str) -> Result<Self, String> {
        let compiled = Regex::new(&format!("^(?:{pattern})$"))
            .map_err(|error| format!("invalid target_modules regex `{pattern}`: {error}"))?;
        Ok(TargetModules::Regex {
            pattern: pattern.to_string(),
            compiled,
        })
    }

    /// PEFT's default targets for an architecture (`TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING`).
    pub fn default_for(model_type: &str) -> Result<Self, String> {
        let names: &[&str] = match model_type {
            "llama" | "mistral" | "qwen2" | "qwen3" | "gemma" | "gemma2" | "phi3" | "olmo" => {
                &["q_proj", "v_proj"]
            }
            "gpt2" => &["c_attn"],
            other => {
                return Err(format!(
                    "no default LoRA target modules for model_type `{other}`: set target_modules"
                ))
            }
        };
        Ok(TargetModules::Names(
            names.iter().map(|name| name.to_string()).collect(),
        ))
    }

    /// Whether the linear layer at `path` is targeted.
    pub fn matches(&self, path: &str) -> bool {
        match self {
            TargetModules::Names(names) => names.iter().any(|name| {
                path == name
                    || (path.len() > name.len()
                        && path.ends_with(name.as_str())
                        && path.as_bytes()[path.len() - name.len() - 1] == b'.')
            }),
            TargetModules::Regex { compiled, .. } => compiled.is_match(path),
            TargetModules::AllLinear => last_component(path) != OUTPUT_LAYER,
        }
    }

    /// The value PEFT writes as `target_modules` in adapter_config.json, given the paths that
    /// were actually adapted: a sorted list of names, or the regex string. `all-linear` is written
    /// expanded (the last components of the adapted paths), as PEFT does.
    pub fn to_peft_json(&self, adapted_paths: &[String]) -> Value {
        match self {
            TargetModules::Names(names) => {
                let set: BTreeSet<&String> = names.iter().collect();
                Value::Array(set.into_iter().map(|n| Value::String(n.clone())).collect())
            }
            TargetModules::Regex { pattern, .. } => Value::String(pattern.clone()),
            TargetModules::AllLinear => {
                let set: BTreeSet<&str> = adapted_paths.iter().map(|p| last_component(p)).collect();
                Value::Array(
                    set.into_iter()
                        .map(|n| Value::String(n.to_string()))
                        .collect(),
                )
            }
        }
    }

    /// Read PEFT's `target_modules` value (a list, a regex string, or `all-linear`).
    pub fn from_peft_json(value: &Value) -> Result<Self, String> {
        match value {
            Value::String(text) if text == "all-linear" => Ok(TargetModules::AllLinear),
            Value::String(text) => TargetModules::regex(text),
            Value::Array(items) => items
                .iter()
                .map(|item| {
                    item.as_str()
                        .map(str::to_string)
                        .ok_or_else(|| format!("target_modules entry {item} is not a string"))
                })
                .collect::<Result<Vec<_>, _>>()
                .map(TargetModules::Names),
            other => Err(format!(
                "target_modules must be a list or a string, found {other}"
            )),
        }
    }
}

impl std::fmt::Display for TargetModules {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            TargetModules::Names(names) => write!(f, "[{}]", names.join(", ")),
            TargetModules::Regex { pattern, .. } => write!(f, "regex `{pattern}`"),
            TargetModules::AllLinear => f.write_str("all-linear"),
        }
    }
}

/// Why a target spec does not fit a model (see [`check_targets`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TargetMismatch {
    /// The entry of a name list at fault (its index), or `None` for the whole spec.
    pub index: Option<usize>,
    /// What is wrong, e.g. "target module `q_prj` matches no linear layer".
    pub message: String,
    /// The closest linear-layer name, when one is plausibly meant.
    pub suggestion: Option<String>,
    /// "the model's linear layers: q_proj, k_proj, ...".
    pub listing: String,
}

/// Check a spec against the module paths of a model's linear layers. Every listed name must
/// select at least one layer: PEFT adapts whatever the other names match and says nothing, so
/// `[q_prj, v_proj]` would silently train `v_proj` alone. A regex or `all-linear` must select
/// something. The first entry at fault is reported, with the closest layer name (the project's
/// did-you-mean rule) and the list of all of them.
pub fn check_targets(targets: &TargetModules, paths: &[&str]) -> Result<(), TargetMismatch> {
    let mut names: Vec<&str> = Vec::new();
    for path in paths {
        let name = last_component(path);
        if !names.contains(&name) {
            names.push(name);
        }
    }
    let listing = format!("the model's linear layers: {}", names.join(", "));
    if let TargetModules::Names(wanted) = targets {
        for (index, name) in wanted.iter().enumerate() {
            let single = TargetModules::Names(vec![name.clone()]);
            if !paths.iter().any(|path| single.matches(path)) {
                return Err(TargetMismatch {
                    index: Some(index),
                    message: format!("target module `{name}` matches no linear layer"),
                    suggestion: super::problem::did_you_mean(
                        last_component(name),
                        names.iter().copied(),
                    )
                    .map(str::to_string),
                    listing,
                });
            }
        }
        return Ok(());
    }
    if !paths.iter().any(|path| targets.matches(path)) {
        return Err(TargetMismatch {
            index: None,
            message: format!("{targets} matches no linear layer"),
            suggestion: None,
            listing,
        });
    }
    Ok(())
}

/// The last `.`-separated component of a module path.
pub fn last_component(path: &str) -> &str {
    path.rsplit('.').next().unwrap_or(path)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(list: &[&str]) -> TargetModules {
        TargetModules::Names(list.iter().map(|s| s.to_string()).collect())
    }

    #[test]
    fn names_match_whole_components_only() {
        let targets = names(&["q_proj", "attn.c_proj"]);
        assert!(targets.matches("model.layers.0.self_attn.q_proj"));
        assert!(targets.matches("q_proj"));
        assert!(!targets.matches("model.layers.0.self_attn.xq_proj"));
        assert!(targets.matches("transformer.h.1.attn.c_proj"));
        assert!(!targets.matches("transformer.h.1.mlp.c_proj"));
    }

    #[test]
    fn regex_must_match_the_whole_path() {
        let targets = TargetModules::regex(r".*\.layers\.[01]\.self_attn\.(q|v)_proj").unwrap();
        assert!(targets.matches("model.layers.1.self_attn.v_proj"));
        assert!(!targets.matches("model.layers.2.self_attn.v_proj"));
        // fullmatch: a prefix match is not enough.
        let prefix = TargetModules::regex("model").unwrap();
        assert!(!prefix.matches("model.layers.0.self_attn.q_proj"));
        assert!(TargetModules::regex("(unclosed").is_err());
    }

    #[test]
    fn peft_json_round_trips() {
        let list = TargetModules::from_peft_json(&serde_json::json!(["v_proj", "q_proj"])).unwrap();
        assert_eq!(
            list.to_peft_json(&[]),
            serde_json::json!(["q_proj", "v_proj"])
        );
        let regex = TargetModules::from_peft_json(&serde_json::json!(".*q_proj")).unwrap();
        assert!(regex.matches("model.layers.0.self_attn.q_proj"));
        assert!(matches!(
            TargetModules::from_peft_json(&serde_json::json!("all-linear")).unwrap(),
            TargetModules::AllLinear
        ));
        assert!(TargetModules::from_peft_json(&serde_json::json!(3)).is_err());
    }
}
