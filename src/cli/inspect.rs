//! `peftpipe inspect MODEL [--target SPEC]... [--rank R]`: describe a model directory (or a lone
//! config.json; no weights are read): architecture, parameter count, dtype, dimensions, tokenizer,
//! its linear layers, and for each `--target` what a LoRA of rank R would adapt and PEFT's
//! trainable-parameter count; for each `--method` (YAML inline or a file: `{prompt_tuning:
//! {num_virtual_tokens: 200}}`) PEFT's trainable-parameter count of any method
//! (`peft::counts`) and, with `--batch`/`--sequence`, a training-memory estimate
//! (`train::memory`). Resolves the arguments and calls models::summary, peft::targets,
//! peft::counts and train::memory; the report renders. Counts from file sizes are checked (clippy denies unchecked arithmetic
//! and `unwrap` here outside the tests): an overflow is an error naming the model, never a panic.
#![cfg_attr(not(test), deny(clippy::unwrap_used, clippy::arithmetic_side_effects))]

use clap::Args;

use super::GlobalArgs;
use crate::config::train::{resolve_targets, TargetModulesConfig};
use crate::models::summary::{group_linear_layers, summarize};
use crate::models::{resolve_model_path, ModelConfig};
use crate::peft::counts::{trainable_parameters, MethodShape};
use crate::peft::targets::{
    check_targets, lora_module_parameters, lora_parameter_count, matched_modules,
};
use crate::peft::TargetModules;
use crate::report;
use crate::report::inspect::{InspectReport, LoraGroup, LoraTargets, MethodCount};
use crate::train::memory::{estimate_training_memory, MemoryQuery};

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
    /// A PEFT method to count, as YAML inline or a YAML file holding it:
    /// `lora: {r: 16}`, `dora: {r: 8}`, `ia3: {}`, `prompt_tuning: {num_virtual_tokens: 200}`,
    /// `prefix_tuning: {num_virtual_tokens: 200, prefix_projection: false}`,
    /// `llama_adapter: {adapter_len: 10, adapter_layers: 30}` (PEFT's field names and
    /// defaults). Repeatable.
    #[arg(long = "method", value_name = "FILE_OR_INLINE")]
    pub methods: Vec<String>,
    /// Batch size for the training-memory estimate of each `--method`.
    #[arg(long, requires = "sequence")]
    pub batch: Option<usize>,
    /// Sequence length (tokens) for the training-memory estimate of each `--method`.
    #[arg(long, requires = "batch")]
    pub sequence: Option<usize>,
    /// Compute dtype of the estimate: bf16 (CUDA's default) or f32 (CPU's).
    #[arg(long, default_value = "bf16", value_parser = ["bf16", "f32"])]
    pub dtype: String,
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
    let mut methods = Vec::with_capacity(args.methods.len());
    for written in &args.methods {
        let counted = parse_method(written, &config).and_then(|(shape, settings)| {
            let count = trainable_parameters(&shape, &config).ok_or_else(|| {
                "the trainable-parameter count does not fit in 64 bits".to_string()
            })?;
            Ok((shape, settings, count))
        });
        let (shape, settings, count) = match counted {
            Ok(counted) => counted,
            Err(message) => {
                report::error(&format!("--method {written}: {message}"));
                return super::EXIT_INVALID;
            }
        };
        let memory = match (args.batch, args.sequence) {
            (Some(batch), Some(sequence)) => Some(estimate_training_memory(
                &config,
                &MemoryQuery {
                    batch,
                    sequence,
                    weight_bytes: if args.dtype == "f32" { 4 } else { 2 },
                    trainable_parameters: count,
                },
            )),
            _ => None,
        };
        methods.push(MethodCount {
            written: written.clone(),
            method: shape.name().to_string(),
            settings,
            trainable_parameters: count,
            memory,
        });
    }
    let inspect = InspectReport {
        model,
        lora,
        methods,
    };
    if global.json {
        report::json(&inspect);
    } else {
        report::write_stdout(&report::inspect::render(&inspect));
    }
    super::EXIT_OK
}

/// `--method` as written: a YAML file's path or inline YAML.
fn method_text(written: &str) -> Result<String, String> {
    let path = std::path::Path::new(written.trim());
    if path.is_file() {
        return std::fs::read_to_string(path)
            .map_err(|error| format!("cannot read {}: {error}", path.display()));
    }
    Ok(written.to_string())
}

/// The fields of a `--method` body that the count reads, PEFT's names and defaults; fields that
/// do not change the count (dropout, init, ...) are accepted and ignored.
#[derive(Debug, Default, serde::Deserialize)]
#[serde(deny_unknown_fields)]
#[allow(dead_code)] // every accepted key is listed so unknown ones are rejected; counts read a few
struct MethodFields {
    r: Option<usize>,
    target_modules: Option<TargetModulesConfig>,
    feedforward_modules: Option<TargetModulesConfig>,
    num_virtual_tokens: Option<usize>,
    prefix_projection: Option<bool>,
    encoder_hidden_size: Option<usize>,
    adapter_len: Option<usize>,
    adapter_layers: Option<usize>,
    /// `scalar` (PEFT) or `per_head` (the paper).
    gate: Option<String>,
    #[serde(alias = "lora_alpha")]
    alpha: Option<serde_json::Value>,
    #[serde(alias = "lora_dropout")]
    dropout: Option<serde_json::Value>,
    use_rslora: Option<serde_json::Value>,
    use_dora: Option<bool>,
    init: Option<serde_json::Value>,
    init_text: Option<serde_json::Value>,
    prompt_tuning_init: Option<serde_json::Value>,
    prompt_tuning_init_text: Option<serde_json::Value>,
    init_ia3_weights: Option<serde_json::Value>,
    /// QLoRA's base: `nf4` (default) or `fp4`.
    quant_type: Option<String>,
    /// QLoRA's base: double-quantized absmax (default true).
    double_quant: Option<bool>,
    /// QLoRA's base: weights per absmax (default 64).
    block_size: Option<usize>,
    compute_dtype: Option<serde_json::Value>,
}

/// PEFT's IA3 default targets: (target_modules, feedforward_modules) for a `model_type`.
fn ia3_defaults(model_type: &str) -> Result<(TargetModules, TargetModules), String> {
    let names = |list: &[&str]| TargetModules::Names(list.iter().map(|s| s.to_string()).collect());
    match model_type {
        "llama" | "mistral" | "qwen2" => Ok((
            names(&["k_proj", "v_proj", "down_proj"]),
            names(&["down_proj"]),
        )),
        "gpt2" => Ok((names(&["c_attn", "mlp.c_proj"]), names(&["mlp.c_proj"]))),
        other => Err(format!(
            "PEFT has no default IA3 targets for `{other}`: give target_modules and feedforward_modules"
        )),
    }
}

/// Parse `--method` into the shape its count needs, plus a one-line description.
pub fn parse_method(written: &str, config: &ModelConfig) -> Result<(MethodShape, String), String> {
    let text = method_text(written)?;
    let value: serde_json::Value =
        serde_norway::from_str(&text).map_err(|error| format!("not YAML: {error}"))?;
    let (name, body) = match &value {
        serde_json::Value::String(name) => (name.clone(), serde_json::json!({})),
        serde_json::Value::Object(map) if map.len() == 1 => {
            let (name, body) = map.iter().next().ok_or("an empty mapping")?;
            let body = if body.is_null() {
                serde_json::json!({})
            } else {
                body.clone()
            };
            (name.clone(), body)
        }
        _ => {
            return Err(
                "write one method as `NAME: {FIELDS}` (e.g. `prompt_tuning: {num_virtual_tokens: 200}`)"
                    .into(),
            )
        }
    };
    let fields: MethodFields =
        serde_json::from_value(body).map_err(|error| format!("{name}: {error}"))?;
    let model_type = config.model_type();
    let resolve = |written: Option<&TargetModulesConfig>| {
        resolve_targets(written, &serde_json::json!({ "model_type": model_type }))
    };
    let layers = config.num_layers();
    let need = |value: Option<usize>, key: &str| -> Result<usize, String> {
        match value {
            Some(0) => Err(format!("{name}.{key} must be at least 1")),
            Some(value) => Ok(value),
            None => Err(format!("{name} needs `{key}`")),
        }
    };
    let shape = match name.as_str() {
        "lora" | "dora" | "qlora" => {
            let rank = need(Some(fields.r.unwrap_or(DEFAULT_RANK)), "r")?;
            let targets = resolve(fields.target_modules.as_ref())?;
            check_targets(&config.linear_layers(), &targets)?;
            MethodShape::Lora {
                rank,
                targets,
                dora: name == "dora" || fields.use_dora == Some(true),
            }
        }
        "ia3" => {
            let (default_targets, default_feedforward) = ia3_defaults(model_type)?;
            let targets = match &fields.target_modules {
                Some(written) => resolve(Some(written))?,
                None => default_targets,
            };
            let feedforward = match &fields.feedforward_modules {
                Some(written) => resolve(Some(written))?,
                None if fields.target_modules.is_some() => TargetModules::Names(Vec::new()),
                None => default_feedforward,
            };
            check_targets(&config.linear_layers(), &targets)?;
            MethodShape::Ia3 {
                targets,
                feedforward,
            }
        }
        "prompt_tuning" => MethodShape::PromptTuning {
            num_virtual_tokens: need(fields.num_virtual_tokens, "num_virtual_tokens")?,
        },
        "prefix_tuning" => {
            let num_virtual_tokens = need(fields.num_virtual_tokens, "num_virtual_tokens")?;
            let encoder_hidden_size = if fields.prefix_projection == Some(true) {
                Some(need(
                    Some(fields.encoder_hidden_size.unwrap_or(config.kv_dim())),
                    "encoder_hidden_size",
                )?)
            } else {
                None
            };
            MethodShape::PrefixTuning {
                num_virtual_tokens,
                encoder_hidden_size,
            }
        }
        "llama_adapter" | "adaption_prompt" => {
            let adapter_len = need(fields.adapter_len, "adapter_len")?;
            let adapter_layers = need(fields.adapter_layers, "adapter_layers")?;
            if adapter_layers > layers {
                return Err(format!(
                    "{name}.adapter_layers is {adapter_layers} but the model has {layers} layers"
                ));
            }
            let per_head_gate = match fields.gate.as_deref() {
                None | Some("scalar") => false,
                Some("per_head") => true,
                Some(other) => {
                    return Err(format!(
                        "{name}.gate `{other}`: write `scalar` (PEFT) or `per_head` (the paper)"
                    ))
                }
            };
            MethodShape::LlamaAdapter {
                adapter_len,
                adapter_layers,
                per_head_gate,
            }
        }
        other => {
            return Err(format!(
                "unknown method `{other}` (known: lora, dora, ia3, prompt_tuning, prefix_tuning, llama_adapter)"
            ))
        }
    };
    let settings = match &shape {
        MethodShape::Lora { rank, targets, .. } if name == "qlora" => format!(
            "r {rank} · target {targets} · {}",
            qlora_base_memory(&fields, config)?
        ),
        MethodShape::Lora { rank, targets, .. } => format!("r {rank} · target {targets}"),
        MethodShape::Ia3 {
            targets,
            feedforward,
        } => format!("target {targets} · feed-forward {feedforward}"),
        MethodShape::PromptTuning { num_virtual_tokens } => {
            format!("{num_virtual_tokens} virtual tokens")
        }
        MethodShape::PrefixTuning {
            num_virtual_tokens,
            encoder_hidden_size,
        } => match encoder_hidden_size {
            Some(hidden) => format!("{num_virtual_tokens} virtual tokens · projection {hidden}"),
            None => format!("{num_virtual_tokens} virtual tokens · no projection"),
        },
        MethodShape::LlamaAdapter {
            adapter_len,
            adapter_layers,
            per_head_gate,
        } => format!(
            "adapter_len {adapter_len} × adapter_layers {adapter_layers} · {} gate",
            if *per_head_gate { "per-head" } else { "scalar" }
        ),
    };
    Ok((shape, settings))
}

/// QLoRA's base-weight memory for `inspect --method '{qlora: {...}}'`: the 4-bit linear
/// weights (packed codes, absmax state, code books) against bf16, and the whole base with
/// embeddings, norms and the head in bf16.
fn qlora_base_memory(fields: &MethodFields, config: &ModelConfig) -> Result<String, String> {
    use crate::models::quantized::base_memory;
    use crate::quant::{QuantConfig, QuantType};
    let type_name = fields.quant_type.as_deref().unwrap_or("nf4");
    let quant_type = QuantType::from_name(type_name)
        .ok_or_else(|| format!("qlora.quant_type `{type_name}`: write nf4 or fp4"))?;
    let block_size = fields.block_size.unwrap_or(64);
    if !crate::config::method::QLORA_BLOCK_SIZES.contains(&block_size) {
        return Err(format!(
            "qlora.block_size {block_size}: must be a power of two from 64 to 4096"
        ));
    }
    let double_quant = fields.double_quant.unwrap_or(true);
    let quant = QuantConfig {
        quant_type,
        block_size,
        double_quant,
    };
    let memory =
        base_memory(config, &quant).ok_or("the base-weight memory does not fit in 64 bits")?;
    let mib = |bytes: u64| bytes as f64 / (1024.0 * 1024.0);
    Ok(format!(
        "4-bit {type_name} base ({}blocks of {block_size}): linear weights {:.2} MiB vs {:.2} MiB bf16 (×{:.3}), whole base {:.2} MiB vs {:.2} MiB (×{:.3})",
        if double_quant { "double quant, " } else { "" },
        mib(memory.quantized_bytes),
        mib(memory.linear_bf16_bytes()),
        memory.linear_ratio(),
        mib(memory.total_quantized_bytes()),
        mib(memory.total_bf16_bytes()),
        memory.total_ratio()
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn qlora_counts_as_lora_and_reports_its_4bit_base_memory() {
        let config = ModelConfig::from_json(&serde_json::json!({
            "model_type": "llama", "hidden_size": 2048, "intermediate_size": 8192,
            "num_hidden_layers": 16, "num_attention_heads": 32, "num_key_value_heads": 8,
            "vocab_size": 128256, "tie_word_embeddings": true
        }))
        .unwrap();
        let (shape, settings) = parse_method("{qlora: {r: 16}}", &config).unwrap();
        let (lora, _) = parse_method("{lora: {r: 16}}", &config).unwrap();
        assert_eq!(
            trainable_parameters(&shape, &config),
            trainable_parameters(&lora, &config)
        );
        // 4 bits + 8 bits per 64 weights + the nested state: ×0.258 of bf16 (Llama-3.2-1B shape).
        assert!(settings.contains("(×0.258)"), "{settings}");
        let (_, plain) =
            parse_method("{qlora: {double_quant: false, quant_type: fp4}}", &config).unwrap();
        assert!(
            plain.contains("4-bit fp4") && plain.contains("(×0.281)"),
            "{plain}"
        );
        assert!(parse_method("{qlora: {block_size: 32}}", &config).is_err());
        assert!(parse_method("{qlora: {quant_type: int4}}", &config).is_err());
    }

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
