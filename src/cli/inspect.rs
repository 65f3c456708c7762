//! `peftpipe inspect MODEL [--target SPEC]... [--rank R]`: describe a model directory (or a lone
//! config.json; no weights are read): architecture, parameter count, dtype, dimensions, tokenizer,
//! its linear layers, and for each `--target` what a LoRA of rank R would adapt and PEFT's
//! trainable-parameter count. Resolves the arguments and calls models::summary and peft::targets;
//! the report renders. Counts from file sizes are checked (clippy denies unchecked arithmetic
//! and `unwrap` here outside the tests): an overflow is an error naming the model, never a panic.
#![cfg_attr(not(test), deny(clippy::unwrap_used, clippy::arithmetic_side_effects))]

use clap::Args;

use super::GlobalArgs;
use crate::config::train::{resolve_targets, TargetModulesConfig};
use crate::models::summary::{group_linear_layers, summarize};
use crate::models::{resolve_model_path, ModelConfig};
use crate::peft::targets::{
    check_targets, lora_module_parameters, lora_parameter_count, matched_modules,
};
use crate::peft::TargetModules;
use crate::report;
use crate::report::inspect::{InspectReport, LoraGroup, LoraTargets};

/// PEFT's default LoRA rank.
const DEFAULT_RANK: usize = 8;

#[derive(Debug, Args)]
pub struct InspectArgs {
    /// A Hugging Face model directory (config.json + safetensors), a config.json file, or a Hub
    /// id `hf://org/name[@revision]` found in the local Hugging Face cache.
    pub model: String,
    /// LoRA target modules to evaluate: names (`q_proj,v_proj`), a regular expression matched
    /// against the whole module path (`.*\.layers\.[0-3]\..*_proj`, or `regex:PATTERN`), or
    /// `all-linear`. Repeatable. Without it but with `--rank`: PEFT's default for the model.
    #[arg(long = "target", value_name = "SPEC")]
    pub targets: Vec<String>,
    /// LoRA rank r for the trainable-parameter count (default 8, PEFT's default).
    #[arg(long)]
    pub rank: Option<usize>,
}

/// Characters that make a `--target` value a regular expression rather than a name list.
const REGEX_CHARACTERS: &[char] = &[
    '\\', '^', '$', '*', '+', '?', '(', ')', '[', ']', '{', '}', '|',
];

/// `--target` as written → the pipeline's `target_modules` form.
pub fn parse_target(spec: &str) -> Result<TargetModulesConfig, String> {
    let spec = spec.trim();
    if spec == "all-linear" {
        return Ok(TargetModulesConfig::AllLinear);
    }
    if let Some(pattern) = spec.strip_prefix("regex:") {
        return Ok(TargetModulesConfig::Regex(pattern.to_string()));
    }
    if spec.contains(REGEX_CHARACTERS) {
        return Ok(TargetModulesConfig::Regex(spec.to_string()));
    }
    let names: Vec<String> = spec
        .split(',')
        .map(str::trim)
        .filter(|name| !name.is_empty())
        .map(str::to_string)
        .collect();
    if names.is_empty() {
        return Err(format!(
            "--target `{spec}` names no module (write e.g. `q_proj,v_proj`, a regex, or `all-linear`)"
        ));
    }
    Ok(TargetModulesConfig::Names(names))
}

/// What one resolved spec selects on the model.
fn lora_targets(
    config: &ModelConfig,
    targets: &TargetModules,
    rank: usize,
) -> Result<LoraTargets, String> {
    let modules = config.linear_layers();
    check_targets(&modules, targets)?;
    let matched: Vec<_> = matched_modules(&modules, targets)
        .into_iter()
        .cloned()
        .collect();
    let paths: Vec<String> = matched.iter().map(|module| module.path.clone()).collect();
    let too_many =
        || format!("the trainable-parameter count at rank {rank} does not fit in 64 bits");
    let mut groups = Vec::new();
    for layers in group_linear_layers(&matched) {
        let per_module = lora_module_parameters(layers.in_features, layers.out_features, rank);
        let trainable_parameters = per_module
            .and_then(|count| count.checked_mul(u64::try_from(layers.count).ok()?))
            .ok_or_else(too_many)?;
        groups.push(LoraGroup {
            layers,
            trainable_parameters,
        });
    }
    Ok(LoraTargets {
        target: targets.to_string(),
        rank,
        matched: groups,
        matched_modules: matched.len(),
        trainable_parameters: lora_parameter_count(&modules, targets, rank).ok_or_else(too_many)?,
        adapter_config_target_modules: targets.to_peft_json(&paths),
    })
}

pub fn run(global: &GlobalArgs, args: InspectArgs) -> u8 {
    let path = match resolve_model_path(&args.model) {
        Ok(path) => path,
        Err(error) => {
            report::error(&error.to_string());
            return super::EXIT_INVALID;
        }
    };
    let (model, config) = match summarize(&path) {
        Ok(summary) => summary,
        Err(error) => {
            report::error(&error.to_string());
            return super::EXIT_FAILED;
        }
    };
    let rank = args.rank.unwrap_or(DEFAULT_RANK);
    if rank == 0 {
        report::error("--rank must be at least 1");
        return super::EXIT_INVALID;
    }
    let mut specs: Vec<(String, Option<TargetModulesConfig>)> = Vec::new();
    for written in &args.targets {
        match parse_target(written) {
            Ok(spec) => specs.push((written.clone(), Some(spec))),
            Err(message) => {
                report::error(&message);
                return super::EXIT_INVALID;
            }
        }
    }
    if specs.is_empty() && args.rank.is_some() {
        specs.push(("(PEFT's default)".to_string(), None));
    }
    let model_type = serde_json::json!({ "model_type": config.model_type() });
    let mut lora = Vec::with_capacity(specs.len());
    for (written, spec) in &specs {
        let resolved = resolve_targets(spec.as_ref(), &model_type)
            .and_then(|targets| lora_targets(&config, &targets, rank));
        match resolved {
            Ok(targets) => lora.push(targets),
            Err(message) => {
                report::error(&format!("--target {written}: {message}"));
                return super::EXIT_INVALID;
            }
        }
    }
    let inspect = InspectReport { model, lora };
    if global.json {
        report::json(&inspect);
    } else {
        report::write_stdout(&report::inspect::render(&inspect));
    }
    super::EXIT_OK
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn target_specs_parse_as_names_regex_or_all_linear() {
        assert_eq!(
            parse_target("q_proj, v_proj").unwrap(),
            TargetModulesConfig::Names(vec!["q_proj".into(), "v_proj".into()])
        );
        assert_eq!(
            parse_target("attn.c_proj").unwrap(),
            TargetModulesConfig::Names(vec!["attn.c_proj".into()])
        );
        assert_eq!(
            parse_target("all-linear").unwrap(),
            TargetModulesConfig::AllLinear
        );
        assert_eq!(
            parse_target(r".*\.(q|v)_proj").unwrap(),
            TargetModulesConfig::Regex(r".*\.(q|v)_proj".into())
        );
        assert_eq!(
            parse_target("regex:q_proj").unwrap(),
            TargetModulesConfig::Regex("q_proj".into())
        );
        assert!(parse_target(" , ").is_err());
    }
}
