//! A description of a model for `peftpipe inspect`: architecture, dimensions, parameter counts
//! (from config.json, and from the safetensors headers when weights are present), stored dtype,
//! tokenizer conventions, and the linear layers grouped by name.
//!
//! Reads config.json, safetensors headers and tokenizer files only, never weights. Must not: print
//! (report/inspect.rs renders it) or know PEFT methods. Every size comes from a file, so counts use
//! checked arithmetic (clippy denies unchecked arithmetic and `unwrap` outside the tests): a count
//! that does not fit in 64 bits is an error naming the file, not a panic or a wrapped number.
#![cfg_attr(not(test), deny(clippy::unwrap_used, clippy::arithmetic_side_effects))]

use std::collections::BTreeMap;
use std::path::Path;

use serde::Serialize;

use super::config::{Architecture, LinearSpec, ModelConfig};
use super::load::{read_config, ModelDir, ModelError, TensorInfo};
use super::quantized::STATE_SUFFIX;
use crate::ops::RopeScaling;

/// Linear layers of one name (e.g. every `q_proj`), as the factory sees them.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct LinearGroup {
    pub name: String,
    pub in_features: usize,
    pub out_features: usize,
    pub bias: bool,
    pub count: usize,
    pub tied_to_embeddings: bool,
}

/// The tokenizer side, when tokenizer.json is present.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct TokenizerSummary {
    pub vocab_size: usize,
    pub bos_token: Option<String>,
    pub bos_token_id: Option<u32>,
    pub eos_token_ids: Vec<u32>,
    pub pad_token_id: Option<u32>,
    pub add_bos_token: bool,
    pub has_chat_template: bool,
}

/// Everything `inspect` reports about a model.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ModelSummary {
    pub path: String,
    pub architecture: Architecture,
    pub model_type: String,
    pub architectures: Vec<String>,
    /// Parameters as transformers counts them, from config.json (a tied head counted once).
    pub parameters: u64,
    /// Elements stored in the safetensors files (None without weights).
    pub stored_parameters: Option<u64>,
    /// The dominant stored dtype (`F32`, `BF16`, ...), or config.json's `torch_dtype`.
    pub dtype: Option<String>,
    pub weight_files: usize,
    pub layers: usize,
    pub hidden_size: usize,
    pub attention_heads: usize,
    pub key_value_heads: usize,
    pub head_dim: usize,
    pub intermediate_size: usize,
    pub vocab_size: usize,
    pub max_positions: usize,
    pub tie_word_embeddings: bool,
    /// RoPE description (Llama family), e.g. `theta 500000, llama3 ×32`.
    pub rope: Option<String>,
    pub linear_layers: Vec<LinearGroup>,
    pub tokenizer: Option<TokenizerSummary>,
    /// Where config.json and the stored weights disagree (loading the model fails on each):
    /// the description above is config.json's.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub weight_problems: Vec<String>,
}

/// Group linear layers by name (GPT-2's `c_proj` by its last two components), in model order.
pub fn group_linear_layers(layers: &[LinearSpec]) -> Vec<LinearGroup> {
    let mut groups: Vec<LinearGroup> = Vec::new();
    let mut index: BTreeMap<String, usize> = BTreeMap::new();
    for layer in layers {
        let key = layer
            .path
            .split('.')
            .rev()
            .take(2)
            .collect::<Vec<_>>()
            .into_iter()
            .rev()
            .collect::<Vec<_>>()
            .join(".");
        // GPT-2 has `attn.c_proj` and `mlp.c_proj`: group by the last two components when the
        // last one alone is ambiguous, otherwise by the last one.
        let name = if layer.name() == "c_proj" {
            key
        } else {
            layer.name().to_string()
        };
        match index
            .get(&name)
            .and_then(|&position| groups.get_mut(position))
        {
            // At most one per layer in memory: cannot overflow.
            Some(group) => group.count = group.count.saturating_add(1),
            None => {
                index.insert(name.clone(), groups.len());
                groups.push(LinearGroup {
                    name,
                    in_features: layer.in_features,
                    out_features: layer.out_features,
                    bias: layer.bias,
                    count: 1,
                    tied_to_embeddings: layer.tied_to_embeddings,
                });
            }
        }
    }
    groups
}

fn describe_rope(config: &ModelConfig) -> Option<String> {
    let ModelConfig::Llama(llama) = config else {
        return None;
    };
    let scaling = match &llama.rope_scaling {
        None => String::new(),
        Some(RopeScaling::Linear { factor }) => format!(", linear ×{factor}"),
        Some(RopeScaling::Llama3 { factor, .. }) => format!(", llama3 ×{factor}"),
    };
    Some(format!("theta {}{scaling}", llama.rope_theta))
}

/// The error of a config.json whose sizes give a count that does not fit in 64 bits.
fn too_large(path: &Path, config: &ModelConfig) -> ModelError {
    let message = format!(
        "the parameter count does not fit in 64 bits: implausible sizes (hidden {}, MLP {}, \
         layers {}, heads {}, head dim {}, vocab {})",
        config.hidden_size(),
        config.intermediate_size(),
        config.num_layers(),
        config.num_attention_heads(),
        config.head_dim(),
        config.vocab_size()
    );
    ModelError::Io {
        path: path.to_path_buf(),
        source: std::io::Error::new(std::io::ErrorKind::InvalidData, message),
    }
}

/// Elements of one stored tensor (checked product of its shape).
fn element_count(info: &TensorInfo) -> Option<u64> {
    info.shape.iter().try_fold(1u64, |count, &dimension| {
        count.checked_mul(u64::try_from(dimension).ok()?)
    })
}

/// Elements stored in all the tensors, and the dominant dtype by element count.
fn stored_elements(tensors: &BTreeMap<String, TensorInfo>) -> Result<(u64, String), ModelError> {
    let mut total = 0u64;
    let mut by_dtype: BTreeMap<&str, u64> = BTreeMap::new();
    for (name, info) in tensors {
        let overflow = || ModelError::Safetensors {
            path: info.file.clone(),
            message: format!(
                "tensor `{name}` of shape {:?}: the element count does not fit in 64 bits",
                info.shape
            ),
        };
        let count = element_count(info).ok_or_else(overflow)?;
        total = total.checked_add(count).ok_or_else(overflow)?;
        let slot = by_dtype.entry(info.dtype.as_str()).or_default();
        *slot = slot.checked_add(count).ok_or_else(overflow)?;
    }
    let dtype = by_dtype
        .into_iter()
        .max_by_key(|(_, count)| *count)
        .map_or_else(|| "none".to_string(), |(dtype, _)| dtype.to_string());
    Ok((total, dtype))
}

fn summarize_config(
    path: &Path,
    config: &ModelConfig,
    json: &serde_json::Value,
) -> Result<ModelSummary, ModelError> {
    let architectures = json
        .get("architectures")
        .and_then(serde_json::Value::as_array)
        .map(|list| {
            list.iter()
                .filter_map(serde_json::Value::as_str)
                .map(str::to_string)
                .collect()
        })
        .unwrap_or_default();
    let torch_dtype = json
        .get("torch_dtype")
        .or_else(|| json.get("dtype"))
        .and_then(serde_json::Value::as_str)
        .map(str::to_string);
    let parameters = config
        .parameter_count()
        .ok_or_else(|| too_large(path, config))?;
    Ok(ModelSummary {
        path: path.display().to_string(),
        architecture: config.architecture(),
        model_type: config.model_type().to_string(),
        architectures,
        parameters,
        stored_parameters: None,
        dtype: torch_dtype,
        weight_files: 0,
        layers: config.num_layers(),
        hidden_size: config.hidden_size(),
        attention_heads: config.num_attention_heads(),
        key_value_heads: config.num_key_value_heads(),
        head_dim: config.head_dim(),
        intermediate_size: config.intermediate_size(),
        vocab_size: config.vocab_size(),
        max_positions: config.max_positions(),
        tie_word_embeddings: config.tie_word_embeddings(),
        rope: describe_rope(config),
        linear_layers: group_linear_layers(&config.linear_layers()),
        tokenizer: None,
        weight_problems: Vec::new(),
    })
}

/// Describe `path`: a model directory (config, weight headers, tokenizer), or a lone config.json
/// file (dimensions and counts only). Also returns the parsed config for further analysis.
pub fn summarize(path: &Path) -> Result<(ModelSummary, ModelConfig), ModelError> {
    if path.is_file() {
        let (config, json) = read_config(path)?;
        return Ok((summarize_config(path, &config, &json)?, config));
    }
    let dir = ModelDir::open(path)?;
    let mut summary = summarize_config(&path.join("config.json"), dir.config(), dir.config_json())?;
    summary.path = path.display().to_string();
    let tensors = dir.tensor_infos()?;
    let (stored, dtype) = stored_elements(&tensors)?;
    summary.stored_parameters = Some(stored);
    summary.weight_problems = dir
        .check_weights()
        .iter()
        .map(ToString::to_string)
        .collect();
    summary.dtype = Some(match dir.stored_quantization() {
        None => dtype,
        // Saved in bitsandbytes 4-bit: the dtype of the dense tensors, and the 4-bit storage
        // (the packed codes and their state are U8/F32 tensors that say nothing of the model).
        Some(quantization) => {
            let weights: Vec<&str> = tensors
                .keys()
                .filter_map(|name| name.find(STATE_SUFFIX).map(|index| &name[..index]))
                .collect();
            let dense: BTreeMap<String, TensorInfo> = tensors
                .iter()
                .filter(|(name, _)| {
                    !weights.iter().any(|weight| {
                        name.strip_prefix(weight)
                            .is_some_and(|rest| rest.is_empty() || rest.starts_with('.'))
                    })
                })
                .map(|(name, info)| (name.clone(), info.clone()))
                .collect();
            let (_, dense_dtype) = stored_elements(&dense)?;
            format!(
                "{dense_dtype} · {} linear weights in bitsandbytes 4-bit {}{}",
                weights.len(),
                quantization.quant_type.name(),
                if quantization.double_quant {
                    " (double quant)"
                } else {
                    ""
                }
            )
        }
    });
    summary.weight_files = dir.weight_files().len();
    if path.join("tokenizer.json").is_file() {
        let tokenizer = dir.tokenizer()?;
        summary.tokenizer = Some(TokenizerSummary {
            vocab_size: tokenizer.vocab_size(),
            bos_token: tokenizer.bos_token.clone(),
            bos_token_id: tokenizer.bos_token_id,
            eos_token_ids: tokenizer.eos_token_ids.clone(),
            pad_token_id: tokenizer.pad_token_id,
            add_bos_token: tokenizer.add_bos_token,
            has_chat_template: tokenizer.chat_template.is_some(),
        });
    }
    Ok((summary, dir.config().clone()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tensor(shape: Vec<usize>) -> TensorInfo {
        TensorInfo {
            dtype: "F32".into(),
            shape,
            file: "model/model.safetensors".into(),
            start: 8,
            end: 8,
        }
    }

    #[test]
    fn stored_element_counts_are_checked() {
        let fine = BTreeMap::from([
            ("a".to_string(), tensor(vec![3, 4])),
            ("b".to_string(), tensor(vec![5])),
        ]);
        assert_eq!(stored_elements(&fine).unwrap(), (17, "F32".to_string()));
        let huge = BTreeMap::from([("a".to_string(), tensor(vec![1 << 40, 1 << 40]))]);
        let error = stored_elements(&huge).unwrap_err().to_string();
        assert!(error.contains("model/model.safetensors"), "{error}");
        assert!(error.contains("tensor `a`"), "{error}");
        let many = BTreeMap::from([
            ("a".to_string(), tensor(vec![1 << 32, 1 << 31])),
            ("b".to_string(), tensor(vec![1 << 32, 1 << 31])),
        ]);
        assert!(stored_elements(&many).is_err());
    }
}
