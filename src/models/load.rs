//! A Hugging Face model directory: config.json, weights (model.safetensors or a sharded
//! model.safetensors.index.json), tokenizer and generation config.
//!
//! Owns [`ModelDir`] (opening and validating the directory without reading weights; safetensors
//! headers for dtype and parameter counts; the one memory map of the weight files) and
//! [`ModelError`]. Must not: build trainable vars, or read more than headers in `open`.

use std::collections::BTreeMap;
use std::io::Read;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device};
use candle_nn::VarBuilder;
use serde_json::Value;

use super::config::ModelConfig;
use super::tokenizer::{GenerationConfig, ModelTokenizer};
use super::{gpt2, llama, CausalLm, LinearFactory};

/// Errors opening or loading a model directory; each names the file (and key) at fault.
#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: invalid JSON: {source}")]
    Json {
        path: PathBuf,
        source: serde_json::Error,
    },
    #[error("{path}: key `{key}`: {message}")]
    Config {
        path: PathBuf,
        key: String,
        message: String,
    },
    #[error("{dir}: no model.safetensors or model.safetensors.index.json (only safetensors weights are supported)")]
    NoWeights { dir: PathBuf },
    #[error("{path}: invalid safetensors file: {message}")]
    Safetensors { path: PathBuf, message: String },
    #[error("{path}: {message}")]
    Tokenizer { path: PathBuf, message: String },
    #[error("{dir}: loading the model: {source}")]
    Load {
        dir: PathBuf,
        source: candle_core::Error,
    },
}

pub(crate) fn read_json(path: &Path) -> Result<Value, ModelError> {
    let text = std::fs::read_to_string(path).map_err(|source| ModelError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    serde_json::from_str(&text).map_err(|source| ModelError::Json {
        path: path.to_path_buf(),
        source,
    })
}

/// One tensor of a safetensors header.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct TensorInfo {
    /// safetensors dtype name (`F32`, `BF16`, `F16`, ...).
    pub dtype: String,
    pub shape: Vec<usize>,
    /// The file it lives in.
    pub file: PathBuf,
    /// Its bytes in `file`: absolute offsets `[start, end)`.
    pub start: u64,
    pub end: u64,
}

impl TensorInfo {
    pub fn element_count(&self) -> u64 {
        self.shape.iter().map(|&d| d as u64).product()
    }
}

/// Read only the JSON header of a safetensors file (8-byte little-endian length, then JSON).
pub fn read_safetensors_header(path: &Path) -> Result<BTreeMap<String, TensorInfo>, ModelError> {
    let invalid = |message: String| ModelError::Safetensors {
        path: path.to_path_buf(),
        message,
    };
    let io = |source| ModelError::Io {
        path: path.to_path_buf(),
        source,
    };
    let mut file = std::fs::File::open(path).map_err(io)?;
    let mut length = [0u8; 8];
    file.read_exact(&mut length).map_err(io)?;
    let length = u64::from_le_bytes(length);
    // safetensors caps headers at 100 MB.
    if length > 100_000_000 {
        return Err(invalid(format!("header length {length} is implausible")));
    }
    let mut header = vec![0u8; length as usize];
    file.read_exact(&mut header).map_err(io)?;
    let header: Value = serde_json::from_slice(&header)
        .map_err(|error| invalid(format!("header is not JSON: {error}")))?;
    let Some(entries) = header.as_object() else {
        return Err(invalid("header is not a JSON object".to_string()));
    };
    let data_start = 8 + length;
    let file_length = file.metadata().map_err(io)?.len();
    let mut tensors = BTreeMap::new();
    for (name, entry) in entries {
        if name == "__metadata__" {
            continue;
        }
        let dtype = entry.get("dtype").and_then(Value::as_str);
        let numbers = |key: &str| {
            entry.get(key).and_then(Value::as_array).map(|items| {
                items
                    .iter()
                    .map(|d| d.as_u64().and_then(|d| usize::try_from(d).ok()))
                    .collect::<Option<Vec<usize>>>()
            })
        };
        let (Some(dtype), Some(Some(shape)), Some(Some(offsets))) =
            (dtype, numbers("shape"), numbers("data_offsets"))
        else {
            return Err(invalid(format!(
                "tensor `{name}` has no valid dtype/shape/data_offsets"
            )));
        };
        let [begin, end] = offsets[..] else {
            return Err(invalid(format!(
                "tensor `{name}`: data_offsets is not [begin, end]"
            )));
        };
        let (start, end) = (data_start + begin as u64, data_start + end as u64);
        if start > end || end > file_length {
            return Err(invalid(format!(
                "tensor `{name}`: bytes {start}..{end} are outside the {file_length}-byte file"
            )));
        }
        tensors.insert(
            name.clone(),
            TensorInfo {
                dtype: dtype.to_string(),
                shape,
                file: path.to_path_buf(),
                start,
                end,
            },
        );
    }
    Ok(tensors)
}

/// An opened Hugging Face model directory (config parsed, weight files located; no weights read).
#[derive(Debug, Clone)]
pub struct ModelDir {
    root: PathBuf,
    config: ModelConfig,
    config_json: Value,
    weight_files: Vec<PathBuf>,
}

impl ModelDir {
    /// Open `root`: parse config.json and locate the safetensors files.
    pub fn open(root: &Path) -> Result<Self, ModelError> {
        let config_path = root.join("config.json");
        let config_json = read_json(&config_path)?;
        let config = ModelConfig::from_json(&config_json).map_err(|error| ModelError::Config {
            path: config_path.clone(),
            key: error.key,
            message: error.message,
        })?;
        let single = root.join("model.safetensors");
        let index = root.join("model.safetensors.index.json");
        let weight_files = if single.is_file() {
            vec![single]
        } else if index.is_file() {
            let index_json = read_json(&index)?;
            let Some(map) = index_json.get("weight_map").and_then(Value::as_object) else {
                return Err(ModelError::Config {
                    path: index,
                    key: "weight_map".to_string(),
                    message: "missing or not an object".to_string(),
                });
            };
            let mut files: Vec<PathBuf> = Vec::new();
            for (tensor, file) in map {
                let Some(file) = file.as_str() else {
                    return Err(ModelError::Config {
                        path: index.clone(),
                        key: format!("weight_map.{tensor}"),
                        message: "expected a file name".to_string(),
                    });
                };
                let path = root.join(file);
                if !files.contains(&path) {
                    files.push(path);
                }
            }
            files.sort();
            for file in &files {
                if !file.is_file() {
                    return Err(ModelError::Io {
                        path: file.clone(),
                        source: std::io::Error::new(
                            std::io::ErrorKind::NotFound,
                            "shard named in model.safetensors.index.json is missing",
                        ),
                    });
                }
            }
            files
        } else {
            return Err(ModelError::NoWeights {
                dir: root.to_path_buf(),
            });
        };
        Ok(Self {
            root: root.to_path_buf(),
            config,
            config_json,
            weight_files,
        })
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    pub fn config(&self) -> &ModelConfig {
        &self.config
    }

    /// The raw config.json (for export: a merged model keeps it as it was).
    pub fn config_json(&self) -> &Value {
        &self.config_json
    }

    pub fn weight_files(&self) -> &[PathBuf] {
        &self.weight_files
    }

    /// Every stored tensor with dtype and shape, from the safetensors headers only.
    pub fn tensor_infos(&self) -> Result<BTreeMap<String, TensorInfo>, ModelError> {
        let mut all = BTreeMap::new();
        for file in &self.weight_files {
            all.extend(read_safetensors_header(file)?);
        }
        Ok(all)
    }

    /// The dtype the weights are stored in (the most common one, by element count).
    pub fn stored_dtype(&self) -> Result<String, ModelError> {
        let mut counts: BTreeMap<String, u64> = BTreeMap::new();
        for info in self.tensor_infos()?.values() {
            *counts.entry(info.dtype.clone()).or_default() += info.element_count();
        }
        Ok(counts
            .into_iter()
            .max_by_key(|(_, count)| *count)
            .map(|(dtype, _)| dtype)
            .unwrap_or_else(|| "none".to_string()))
    }

    pub fn generation_config(&self) -> Result<GenerationConfig, ModelError> {
        GenerationConfig::load(&self.root, &self.config_json)
    }

    pub fn tokenizer(&self) -> Result<ModelTokenizer, ModelError> {
        ModelTokenizer::load(&self.root, &self.generation_config()?)
    }

    /// A VarBuilder over the memory-mapped weight files; tensors are converted to `dtype` on read.
    pub fn var_builder(
        &self,
        dtype: DType,
        device: &Device,
    ) -> Result<VarBuilder<'static>, ModelError> {
        #[expect(
            unsafe_code,
            reason = "memory-mapping the weights avoids reading multi-GB files into memory"
        )]
        // SAFETY: the mapped files are model weights we only read; the contract of mmap is that
        // nobody truncates or rewrites them while mapped. peftpipe never writes into a model
        // directory it loads from (exports go to a fresh directory, renamed into place).
        let builder =
            unsafe { VarBuilder::from_mmaped_safetensors(&self.weight_files, dtype, device) };
        builder.map_err(|source| ModelError::Load {
            dir: self.root.clone(),
            source,
        })
    }

    /// Load the model on `device` in `dtype`, building every linear layer through `factory`.
    pub fn load(
        &self,
        device: &Device,
        dtype: DType,
        factory: &dyn LinearFactory,
    ) -> Result<Box<dyn CausalLm>, ModelError> {
        let builder = self.var_builder(dtype, device)?;
        let model: candle_core::Result<Box<dyn CausalLm>> = match &self.config {
            ModelConfig::Llama(config) => {
                llama::Llama::load(builder, config, &self.config, factory)
                    .map(|model| Box::new(model) as Box<dyn CausalLm>)
            }
            ModelConfig::Gpt2(config) => gpt2::Gpt2::load(builder, config, &self.config, factory)
                .map(|model| Box::new(model) as Box<dyn CausalLm>),
        };
        model.map_err(|source| ModelError::Load {
            dir: self.root.clone(),
            source,
        })
    }
}
