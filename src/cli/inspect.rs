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

use super::{Failure, GlobalArgs};
use crate::config::method::{resolve_ia3_for, resolve_targets_for, MethodConfig, QloraConfig};
use crate::config::probe::LinearLayerShape;
use crate::config::train::{resolve_targets, TargetModulesConfig};
use crate::models::summary::{group_linear_layers, summarize};
use crate::models::{resolve_model_path, ModelConfig};
use crate::peft::auxiliary::auxiliary_parameters;
use crate::peft::counts::{trainable_parameters, MethodShape};
use crate::peft::targets::{
    check_targets, lora_module_parameters, lora_parameter_count, matched_modules,
};
use crate::peft::TargetModules;
use crate::report;
use crate::report::inspect::{InspectReport, LoraGroup, LoraTargets, MethodCount};
use crate::train::memory::{estimate_training_memory, MemoryDevice, MemoryQuery};

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
    /// A PEFT method to count, as YAML inline or a YAML file holding it, written as a
    /// pipeline's `method:` (same fields, defaults and checks): `lora: {r: 16}`,
    /// `lora: {r: 8, use_dora: true}` (or `dora: {r: 8}`), `ia3: {}`,
    /// `prompt_tuning: {num_virtual_tokens: 200}`,
    /// `prefix_tuning: {num_virtual_tokens: 200, prefix_projection: false}`,
    /// `llama_adapter: {adapter_len: 10, adapter_layers: 30}` (or PEFT's `adaption_prompt:`).
    /// Repeatable.
    #[arg(long = "method", value_name = "FILE_OR_INLINE")]
    pub methods: Vec<String>,
    /// Batch size for the training-memory estimate of each `--method`.
    #[arg(long, requires_all = ["sequence", "methods"], value_parser = positive_size)]
    pub batch: Option<usize>,
    /// Sequence length (tokens) for the training-memory estimate of each `--method`.
    #[arg(long, requires_all = ["batch", "methods"], value_parser = positive_size)]
    pub sequence: Option<usize>,
    /// Compute dtype of the estimate: bf16 (CUDA's default) or f32 (CPU's).
    #[arg(long, default_value = "bf16", value_parser = ["bf16", "f32"])]
    pub dtype: String,
    /// Device of the estimate: cuda (flash attention, chunked fused loss) or cpu (attention
    /// probabilities and whole logits kept).
    #[arg(long, default_value = "cuda", value_parser = ["cuda", "cpu"])]
    pub device: String,
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
    match inspect(&args) {
        Ok(inspect) => {
            if global.json {
                report::json(&inspect);
            } else {
                report::write_stdout(&report::inspect::render(&inspect));
            }
            super::EXIT_OK
        }
        Err(failure) => failure.report(global, &args.model),
    }
}

/// The report of `args`, or why there is none.
fn inspect(args: &InspectArgs) -> Result<InspectReport, Failure> {
    let path = match resolve_model_path(&args.model) {
        Ok(path) => path,
        Err(error) => {
            return Err(Failure::new(
                super::EXIT_INVALID,
                "MODEL",
                error.to_string(),
            ))
        }
    };
    let (model, config) = match summarize(&path) {
        Ok(summary) => summary,
        Err(error) => return Err(Failure::new(super::EXIT_FAILED, "MODEL", error.to_string())),
    };
    let rank = args.rank.unwrap_or(DEFAULT_RANK);
    if rank == 0 {
        return Err(Failure::new(
            super::EXIT_INVALID,
            "--rank",
            "--rank must be at least 1".to_string(),
        ));
    }
    let mut specs: Vec<(String, Option<TargetModulesConfig>)> = Vec::new();
    for written in &args.targets {
        match parse_target(written) {
            Ok(spec) => specs.push((written.clone(), Some(spec))),
            Err(message) => return Err(Failure::new(super::EXIT_INVALID, "--target", message)),
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
                return Err(Failure::new(
                    super::EXIT_INVALID,
                    "--target",
                    format!("--target {written}: {message}"),
                ))
            }
        }
    }
    let mut methods = Vec::with_capacity(args.methods.len());
    for written in &args.methods {
        let counted = parse_method_config(written).and_then(|method| {
            let (shape, settings) = describe_method(&method, &config)?;
            let too_many = || "the trainable-parameter count does not fit in 64 bits".to_string();
            // PEFT's `trainable_token_indices` / `modules_to_save` train too.
            let count = trainable_parameters(&shape, &config)
                .ok_or_else(too_many)?
                .checked_add(auxiliary_parameters(&method, &config)?)
                .ok_or_else(too_many)?;
            Ok((method, shape, settings, count))
        });
        let (method, shape, settings, count) = match counted {
            Ok(counted) => counted,
            Err(message) => {
                return Err(Failure::new(
                    super::EXIT_INVALID,
                    "--method",
                    format!("--method {written}: {message}"),
                ))
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
                    device: if args.device == "cpu" {
                        MemoryDevice::Cpu
                    } else {
                        MemoryDevice::Cuda
                    },
                    base_bytes: qlora_base_bytes(&method, &config),
                    swiglu_recomputed_layers: swiglu_recomputed_layers(&shape, &config),
                },
            )),
            _ => None,
        };
        methods.push(MethodCount {
            written: written.clone(),
            // QLoRA counts as LoRA; its name says the base is 4-bit.
            method: match method {
                MethodConfig::Qlora(_) => "qlora",
                _ => shape.name(),
            }
            .to_string(),
            settings,
            trainable_parameters: count,
            memory,
        });
    }
    Ok(InspectReport {
        model,
        lora,
        methods,
    })
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

/// `--method` as written → the pipeline's method config (the core's `MethodConfig`, the one
/// reader of `method:`), two spellings accepted besides its own: `dora: {...}` is
/// `lora: {use_dora: true, ...}` and `adaption_prompt: {...}` (PEFT's name) is
/// `llama_adapter: {...}`. A bare name (`ia3`) takes the method's defaults.
pub fn parse_method_config(written: &str) -> Result<MethodConfig, String> {
    let text = method_text(written)?;
    let value: serde_json::Value =
        serde_norway::from_str(&text).map_err(|error| format!("not YAML: {error}"))?;
    let (name, mut body) = match value {
        serde_json::Value::String(name) => (name, serde_json::json!({})),
        serde_json::Value::Object(map) if map.len() == 1 => {
            let Some((name, body)) = map.into_iter().next() else {
                return Err("an empty mapping".into());
            };
            let body = if body.is_null() {
                serde_json::json!({})
            } else {
                body
            };
            (name, body)
        }
        _ => {
            return Err(
                "write one method as `NAME: {FIELDS}` (e.g. `prompt_tuning: {num_virtual_tokens: 200}`)"
                    .into(),
            )
        }
    };
    let name = match name.as_str() {
        "dora" => {
            match body.as_object_mut() {
                Some(fields) => {
                    fields.insert("use_dora".into(), serde_json::Value::Bool(true));
                }
                None => return Err("dora: write its fields as a mapping".into()),
            }
            "lora".to_string()
        }
        "adaption_prompt" => "llama_adapter".to_string(),
        _ => name,
    };
    let method: MethodConfig = serde_json::from_value(serde_json::json!({ &name: body }))
        .map_err(|error| format!("{name}: {error}"))?;
    let mut problems = Vec::new();
    method.check("--method", &mut problems);
    first_problem(problems)?;
    Ok(method)
}

/// The first problem as an error message (`method.lora.r: must be at least 1`).
fn first_problem(problems: Vec<crate::config::Problem>) -> Result<(), String> {
    match problems.into_iter().next() {
        None => Ok(()),
        Some(problem) => {
            let path = problem.path.trim_start_matches("--method.");
            let hint = problem
                .hint
                .map(|hint| format!(" ({hint})"))
                .unwrap_or_default();
            Err(format!("{path}: {}{hint}", problem.message))
        }
    }
}

/// A method config on a model → the shape its count needs (the model checks first: targets
/// that match no layer, more adapter layers than the model has).
pub fn method_shape(method: &MethodConfig, config: &ModelConfig) -> Result<MethodShape, String> {
    let model_type = config.model_type();
    let layers: Vec<LinearLayerShape> = config
        .linear_layers()
        .into_iter()
        .map(|layer| LinearLayerShape {
            path: layer.path,
            in_features: layer.in_features,
            out_features: layer.out_features,
        })
        .collect();
    let mut problems = Vec::new();
    method.check_against_model("--method", model_type, &layers, &mut problems);
    method.check_against_context(
        "--method",
        &crate::config::probe::ModelContext {
            max_positions: config.max_positions(),
            positions_key: config.max_positions_key().to_string(),
            num_layers: config.num_layers(),
            kv_dim: config.kv_dim(),
            sliding_window: config.limiting_sliding_window(),
        },
        &mut problems,
    );
    first_problem(problems)?;
    Ok(match method {
        MethodConfig::Lora(lora) => MethodShape::Lora {
            rank: lora.r,
            targets: resolve_targets_for(lora.target_modules.as_ref(), model_type)?,
            dora: lora.use_dora,
        },
        MethodConfig::Qlora(qlora) => MethodShape::Lora {
            rank: qlora.r,
            targets: resolve_targets_for(qlora.target_modules.as_ref(), model_type)?,
            dora: qlora.use_dora,
        },
        MethodConfig::Ia3(ia3) => {
            let (targets, feedforward) = resolve_ia3_for(ia3, model_type)?;
            MethodShape::Ia3 {
                targets,
                feedforward,
            }
        }
        MethodConfig::PromptTuning(prompt) => MethodShape::PromptTuning {
            num_virtual_tokens: prompt.num_virtual_tokens,
        },
        MethodConfig::PrefixTuning(prefix) => MethodShape::PrefixTuning {
            num_virtual_tokens: prefix.num_virtual_tokens,
            encoder_hidden_size: prefix
                .prefix_projection
                .then(|| prefix.encoder_hidden_size.unwrap_or(config.kv_dim())),
        },
        MethodConfig::LlamaAdapter(adapter) => {
            if adapter.adapter_layers > config.num_layers() {
                return Err(format!(
                    "llama_adapter.adapter_layers is {} but the model has {} layers",
                    adapter.adapter_layers,
                    config.num_layers()
                ));
            }
            MethodShape::LlamaAdapter {
                adapter_len: adapter.adapter_len,
                adapter_layers: adapter.adapter_layers,
                per_head_gate: adapter.per_head_gate,
            }
        }
    })
}

/// `--batch` / `--sequence`: a count from 1 to 2^24 (an estimate beyond that is no estimate).
fn positive_size(text: &str) -> Result<usize, String> {
    let value: usize = text
        .parse()
        .map_err(|_| format!("`{text}` is not a whole number"))?;
    if (1..=1 << 24).contains(&value) {
        Ok(value)
    } else {
        Err(format!("{value} is outside 1..=16777216"))
    }
}

/// Parse `--method` into the shape its count needs, plus a one-line description.
pub fn parse_method(written: &str, config: &ModelConfig) -> Result<(MethodShape, String), String> {
    describe_method(&parse_method_config(written)?, config)
}

/// A parsed method on a model → the shape its count needs, plus a one-line description.
fn describe_method(
    method: &MethodConfig,
    config: &ModelConfig,
) -> Result<(MethodShape, String), String> {
    let shape = method_shape(method, config)?;
    let settings = match &shape {
        MethodShape::Lora { rank, targets, .. } => match &method {
            MethodConfig::Qlora(qlora) => format!(
                "r {rank} · target {targets} · {}",
                qlora_base_memory(qlora, config)?
            ),
            _ => format!("r {rank} · target {targets}"),
        },
        MethodShape::Ia3 {
            targets,
            feedforward,
        } => format!("target {targets} · feed-forward {}", feedforward.join(", ")),
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

/// How many of a Llama's MLPs recompute silu(gate)·up instead of keeping it: those whose
/// `down_proj` LoRA or QLoRA adapts (`ops::low_rank_swiglu_linear`; DoRA keeps it).
fn swiglu_recomputed_layers(shape: &MethodShape, config: &ModelConfig) -> usize {
    match shape {
        MethodShape::Lora {
            targets,
            dora: false,
            ..
        } if config.architecture() == crate::models::Architecture::Llama => {
            matched_modules(&config.linear_layers(), targets)
                .iter()
                .filter(|module| module.name() == "down_proj")
                .count()
        }
        _ => 0,
    }
}

/// The whole base's bytes under QLoRA (4-bit linears, 16-bit rest); `None` for other methods.
fn qlora_base_bytes(method: &MethodConfig, config: &ModelConfig) -> Option<u64> {
    let MethodConfig::Qlora(qlora) = method else {
        return None;
    };
    let quant = crate::quant::QuantConfig {
        quant_type: crate::quant::QuantType::from_name(qlora.quant_type.name())?,
        block_size: qlora.block_size,
        double_quant: qlora.double_quant,
    };
    crate::models::quantized::base_memory(config, &quant)
        .map(|memory| memory.total_quantized_bytes())
}

/// QLoRA's base-weight memory for `inspect --method '{qlora: {...}}'`: the 4-bit linear
/// weights (packed codes, absmax state, code books) against bf16, and the whole base with
/// embeddings, norms and the head in bf16.
fn qlora_base_memory(qlora: &QloraConfig, config: &ModelConfig) -> Result<String, String> {
    use crate::models::quantized::base_memory;
    use crate::quant::{QuantConfig, QuantType};
    let type_name = qlora.quant_type.name();
    let quant_type = QuantType::from_name(type_name)
        .ok_or_else(|| format!("qlora.quant_type `{type_name}`: write nf4 or fp4"))?;
    let quant = QuantConfig {
        quant_type,
        block_size: qlora.block_size,
        double_quant: qlora.double_quant,
    };
    let memory =
        base_memory(config, &quant).ok_or("the base-weight memory does not fit in 64 bits")?;
    let mib = |bytes: u64| bytes as f64 / (1024.0 * 1024.0);
    Ok(format!(
        "4-bit {type_name} base ({}blocks of {}): linear weights {:.2} MiB vs {:.2} MiB bf16 (×{:.3}), whole base {:.2} MiB vs {:.2} MiB (×{:.3})",
        if qlora.double_quant { "double quant, " } else { "" },
        qlora.block_size,
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
