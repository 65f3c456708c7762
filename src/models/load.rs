//! A Hugging Face model directory: config.json, weights (model.safetensors or a sharded
//! model.safetensors.index.json), tokenizer and generation config.
//!
//! Owns [`ModelDir`] (opening and validating the directory without reading weights; safetensors
//! headers, checked as the format requires and against config.json before anything is mapped
//! ([`ModelDir::check_weights`], what `validate` runs too); the tokenizer checked against
//! `vocab_size`; the one memory map of the weight files) and [`ModelError`], whose messages name
//! the file and, where one is at fault, the tensor. A checkpoint saved by transformers with
//! bitsandbytes 4-bit (`quantization_config` in config.json, parsed by `open`) is checked from
//! its headers (the packed bytes fit config.json's shapes) and loads with its 4-bit weights as
//! stored (`quantized::read_bnb_weights` + `StoredQuantizedFactory`), whatever factory the caller
//! gives. Must not: build trainable vars, or read more than headers in `open` and `check_weights`.

use std::collections::BTreeMap;
use std::io::Read;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device};
use candle_nn::VarBuilder;
use serde_json::Value;

use super::config::ModelConfig;
use super::quantized::{bnb_quantization, BnbQuantization, StoredQuantizedFactory, STATE_SUFFIX};
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
    /// The stored tensors disagree with config.json (missing, wrong shape, unusable dtype).
    #[error("{path}: {message}")]
    Weights { path: PathBuf, message: String },
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

/// Read a config.json: the parsed config and its JSON, errors naming the file (and the key). A
/// folder without config.json that holds a PEFT adapter is named as one, with its base model.
pub fn read_config(path: &Path) -> Result<(ModelConfig, Value), ModelError> {
    if let Some(error) = adapter_folder_error(path) {
        return Err(error);
    }
    let json = read_json(path)?;
    let config = ModelConfig::from_json(&json).map_err(|error| ModelError::Config {
        path: path.to_path_buf(),
        key: error.key,
        message: error.message,
    })?;
    Ok((config, json))
}

/// The error for a config.json that is absent beside an adapter_config.json: the folder is a
/// PEFT adapter, given where a model is expected.
fn adapter_folder_error(config_path: &Path) -> Option<ModelError> {
    if config_path.exists() {
        return None;
    }
    let dir = config_path.parent()?;
    let adapter_config = dir.join("adapter_config.json");
    if !adapter_config.is_file() {
        return None;
    }
    let base = read_json(&adapter_config)
        .ok()
        .and_then(|json| {
            json.get("base_model_name_or_path")
                .and_then(Value::as_str)
                .map(str::to_string)
        })
        .map_or_else(String::new, |base| format!(" ({base}, as it names it)"));
    Some(ModelError::Weights {
        path: dir.to_path_buf(),
        message: format!(
            "this is a PEFT adapter folder (adapter_config.json, no config.json), not a model: \
             give its base model{base} as the model and this folder as --adapter"
        ),
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

/// The largest header the safetensors format allows (its reference implementation's limit).
const MAX_HEADER_BYTES: u64 = 100_000_000;

/// At most this many tensor problems are listed for one model; the rest are counted.
const LISTED_TENSOR_PROBLEMS: usize = 8;
/// Counting tensor problems stops here (a header naming layer 10^9 must not cost 10^9 checks).
const COUNTED_TENSOR_PROBLEMS: usize = 10_000;

/// Bytes per element of a safetensors dtype, and whether it can hold weights peftpipe loads
/// (floats candle converts from). `None`: not a safetensors dtype peftpipe knows.
fn dtype_size(dtype: &str) -> Option<(u64, bool)> {
    Some(match dtype {
        "F64" => (8, true),
        "F32" => (4, true),
        "F16" | "BF16" => (2, true),
        "I64" | "U64" => (8, false),
        "I32" | "U32" => (4, false),
        "I16" | "U16" => (2, false),
        "I8" | "U8" | "BOOL" | "F8_E4M3" | "F8_E5M2" => (1, false),
        _ => return None,
    })
}

/// Read only the JSON header of a safetensors file (8-byte little-endian length, then JSON) and
/// check it the way the safetensors format requires before anything is memory-mapped: the
/// header fits in the file, every tensor has a known dtype and a shape whose byte size equals its
/// `data_offsets` span, the spans tile the data section exactly (no gap, no overlap) and the
/// data section ends at the end of the file. Errors name the file and, where one is at fault,
/// the tensor. Reads at most the header; sizes are checked arithmetic (no overflow on hostile
/// numbers).
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
    let metadata = file.metadata().map_err(io)?;
    if !metadata.is_file() {
        return Err(invalid("not a regular file".to_string()));
    }
    let file_length = metadata.len();
    if file_length < 8 {
        return Err(invalid(format!(
            "the file is {file_length} bytes, shorter than the 8-byte header length"
        )));
    }
    let mut length = [0u8; 8];
    file.read_exact(&mut length).map_err(io)?;
    let length = u64::from_le_bytes(length);
    let available = file_length - 8;
    if length > available {
        return Err(invalid(format!(
            "the header length {length} runs past the end of the {file_length}-byte file (truncated or not a safetensors file)"
        )));
    }
    if length > MAX_HEADER_BYTES {
        return Err(invalid(format!(
            "the header length {length} exceeds safetensors' limit of {MAX_HEADER_BYTES} bytes"
        )));
    }
    let mut header = vec![0u8; usize::try_from(length).unwrap_or(0)];
    file.read_exact(&mut header).map_err(io)?;
    let header: Value = serde_json::from_slice(&header)
        .map_err(|error| invalid(format!("header is not JSON: {error}")))?;
    let Some(entries) = header.as_object() else {
        return Err(invalid("header is not a JSON object".to_string()));
    };
    let data_start = 8 + length;
    let data_length = available - length;
    let mut tensors = BTreeMap::new();
    // (begin, end, name) relative to the data section, to check that they tile it.
    let mut spans: Vec<(u64, u64, &str)> = Vec::with_capacity(entries.len());
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
        let Some((element_bytes, _)) = dtype_size(dtype) else {
            return Err(invalid(format!(
                "tensor `{name}`: dtype `{dtype}` is not supported"
            )));
        };
        let (begin, end) = (begin as u64, end as u64);
        let bytes = shape
            .iter()
            .try_fold(element_bytes, |total, &d| total.checked_mul(d as u64));
        // Both must be known and equal: an overflowing shape (None) and a reversed span (None)
        // must not pass as "equal" and let a hostile `begin` through.
        let span = end.checked_sub(begin);
        if bytes.is_none() || bytes != span {
            return Err(invalid(format!(
                "tensor `{name}`: shape {shape:?} of {dtype} needs {} bytes but data_offsets [{begin}, {end}] span {}",
                bytes.map_or_else(|| "more than 2^64".to_string(), |b| b.to_string()),
                span.map_or_else(|| "a negative range".to_string(), |b| format!("{b} bytes")),
            )));
        }
        if end > data_length {
            return Err(invalid(format!(
                "tensor `{name}`: data_offsets [{begin}, {end}] run past the end of the data ({data_length} bytes after the header): the file is truncated"
            )));
        }
        spans.push((begin, end, name));
        tensors.insert(
            name.clone(),
            TensorInfo {
                dtype: dtype.to_string(),
                shape,
                file: path.to_path_buf(),
                // Cannot overflow (begin <= end <= data_length, data_start + data_length is the
                // file length), but the sizes come from the file: checked all the same.
                start: data_start.checked_add(begin).ok_or_else(|| {
                    invalid(format!(
                        "tensor `{name}`: data offset {begin} is out of range"
                    ))
                })?,
                end: data_start.checked_add(end).ok_or_else(|| {
                    invalid(format!(
                        "tensor `{name}`: data offset {end} is out of range"
                    ))
                })?,
            },
        );
    }
    spans.sort_unstable();
    let mut expected = 0u64;
    for &(begin, end, name) in &spans {
        if begin != expected {
            return Err(invalid(format!(
                "tensor `{name}` starts at data offset {begin}, but the previous tensor ends at {expected} (tensors must be stored back to back)"
            )));
        }
        expected = end;
    }
    if expected != data_length {
        return Err(invalid(format!(
            "the tensors end at data offset {expected} but the file holds {data_length} bytes of data (trailing bytes)"
        )));
    }
    Ok(tensors)
}

/// For a checkpoint saved in bitsandbytes 4-bit, the header-level check of a linear weight
/// `name` that config.json shapes `shape`: `None` when it is not stored in 4 bits (no
/// `name.quant_state.bitsandbytes__*` tensor; the dense checks apply), `Some(None)` when its
/// packed bytes fit `shape` (`(n + 1) / 2` bytes, in whatever `quant_storage` dtype), and
/// `Some(Some(problem))` otherwise. The state itself is checked when the model loads.
fn stored_4bit_problem(
    stored: &BTreeMap<String, TensorInfo>,
    name: &str,
    shape: &[usize],
    quantization: &BnbQuantization,
) -> Option<Option<(PathBuf, String)>> {
    let state = format!("{name}{STATE_SUFFIX}");
    // The weight's packed-state tensor (`…quant_state.bitsandbytes__<type>`), if it has one.
    let state_entry = stored
        .range(state.clone()..)
        .next()
        .filter(|(key, _)| key.starts_with(&state));
    // Packed codes without their state: the state is what is missing (not a shape or a dtype).
    let packed_codes = |info: &TensorInfo| {
        info.dtype == "U8" && info.shape.len() == 2 && info.shape[1] == 1 && shape.len() == 2
    };
    let Some((state_key, state_info)) = state_entry else {
        let info = stored.get(name).filter(|info| packed_codes(info))?;
        return Some(Some((
            info.file.clone(),
            format!(
                "tensor `{state}{}` is missing: `{name}` holds packed 4-bit codes ({} {:?}) and cannot be read without its state",
                quantization.quant_type.name(),
                info.dtype,
                info.shape
            ),
        )));
    };
    let state_file = state_info.file.clone();
    // config.json and the weights must tell one story: transformers builds its 4-bit layers from
    // config.json, so a state of another type, or double quantization config.json does not
    // declare, would be read differently by it than by peftpipe.
    let stored_type = state_key.strip_prefix(&state).unwrap_or_default();
    if stored_type != quantization.quant_type.name() {
        return Some(Some((
            state_file,
            format!(
                "`{state}{stored_type}`: `{name}` is stored as {stored_type}, but config.json's quantization_config.bnb_4bit_quant_type is {} (transformers' default when absent); the two must agree",
                quantization.quant_type.name()
            ),
        )));
    }
    if !quantization.double_quant && stored.contains_key(&format!("{name}.nested_absmax")) {
        return Some(Some((
            state_file,
            format!(
                "tensor `{name}.nested_absmax`: `{name}` is stored with double quantization, but config.json's quantization_config.bnb_4bit_use_double_quant is false (or absent); the two must agree"
            ),
        )));
    }
    // The other tensors of the state (bitsandbytes' `QuantState.as_dict(packed=True)`).
    let parts: &[&str] = if quantization.double_quant {
        &[
            ".absmax",
            ".quant_map",
            ".nested_absmax",
            ".nested_quant_map",
        ]
    } else {
        &[".absmax", ".quant_map"]
    };
    if let Some(part) = parts
        .iter()
        .find(|part| !stored.contains_key(&format!("{name}{part}")))
    {
        let why = if part.starts_with(".nested") {
            " (config.json's quantization_config has bnb_4bit_use_double_quant: true)"
        } else {
            ""
        };
        return Some(Some((
            state_file,
            format!("tensor `{name}{part}` of the 4-bit weight `{name}` is missing{why}"),
        )));
    }
    let Some(info) = stored.get(name) else {
        return Some(Some((
            state_file,
            format!("tensor `{name}` has a 4-bit quantization state but no packed weight"),
        )));
    };
    let count = shape
        .iter()
        .try_fold(1u64, |total, &d| total.checked_mul(d as u64))?;
    let (element_bytes, _) = dtype_size(&info.dtype)?;
    let needed = count.div_ceil(2) / element_bytes * element_bytes;
    let held = info.element_count().checked_mul(element_bytes)?;
    if held != needed {
        return Some(Some((
            info.file.clone(),
            format!(
                "tensor `{name}` holds {held} bytes of 4-bit codes, but config.json's shape {shape:?} needs {needed}"
            ),
        )));
    }
    Some(
        state_block_problem(stored, name, count, state_key, state_info)
            .map(|message| (state_file, message)),
    )
}

/// The largest JSON state of a 4-bit weight `validate` reads (bitsandbytes writes ~200 bytes);
/// a larger one is left to the load, so validation reads a bounded amount per weight.
const MAX_STATE_BYTES: u64 = 64 * 1024;

/// The block sizes a 4-bit weight's JSON state (`state_key`, read from its file: a few hundred
/// bytes, never the weights) says, against the absmax the headers hold: `blocksize` must give
/// one absmax value per block of the weight's `count` values (`ceil(count / blocksize)`), and
/// with double quantization `nested_blocksize` one `nested_absmax` scale per block of those.
/// `None` when they agree (or the state is too large to read here); otherwise the problem,
/// naming the tensors and both numbers. Loading the weights checks the same sizes.
fn state_block_problem(
    stored: &BTreeMap<String, TensorInfo>,
    name: &str,
    count: u64,
    state_key: &str,
    state_info: &TensorInfo,
) -> Option<String> {
    let length = state_info.end.checked_sub(state_info.start)?;
    if length > MAX_STATE_BYTES {
        return None;
    }
    let bytes = match read_span(&state_info.file, state_info.start, length) {
        Ok(bytes) => bytes,
        Err(error) => return Some(format!("reading `{state_key}`: {error}")),
    };
    let state: Value = match serde_json::from_slice(&bytes) {
        Ok(state) => state,
        Err(error) => return Some(format!("`{state_key}`: invalid JSON: {error}")),
    };
    let size = |key: &str| match state.get(key).map(Value::as_u64) {
        None => Err(format!("`{state_key}`: no `{key}`")),
        Some(Some(size)) if size > 0 => Ok(size),
        Some(_) => Err(format!("`{state_key}`: `{key}` is not a positive count")),
    };
    let values = |tensor: &str| stored.get(tensor).map(TensorInfo::element_count);
    let block_size = match size("blocksize") {
        Ok(size) => size,
        Err(message) => return Some(message),
    };
    let absmax = format!("{name}.absmax");
    let blocks = count.div_ceil(block_size);
    let held = values(&absmax)?;
    if held != blocks {
        return Some(format!(
            "`{state_key}` says blocksize {block_size}, so the {count} weights of `{name}` make {blocks} blocks, but `{absmax}` holds {held} values (one per block)"
        ));
    }
    let nested = format!("{name}.nested_absmax");
    let nested_held = values(&nested)?;
    let nested_size = match size("nested_blocksize") {
        Ok(size) => size,
        Err(message) => return Some(message),
    };
    let nested_blocks = blocks.div_ceil(nested_size);
    (nested_held != nested_blocks).then(|| {
        format!(
            "`{state_key}` says nested_blocksize {nested_size}, so the {blocks} absmax values of `{name}` make {nested_blocks} blocks, but `{nested}` holds {nested_held} values (one per block)"
        )
    })
}

/// `length` bytes of `path` from byte `start`.
fn read_span(path: &Path, start: u64, length: u64) -> std::io::Result<Vec<u8>> {
    use std::io::{Seek, SeekFrom};
    let mut file = std::fs::File::open(path)?;
    file.seek(SeekFrom::Start(start))?;
    let mut bytes = vec![0u8; usize::try_from(length).unwrap_or(0)];
    file.read_exact(&mut bytes)?;
    Ok(bytes)
}

fn file_name(path: &Path) -> String {
    path.file_name().map_or_else(
        || path.display().to_string(),
        |name| name.to_string_lossy().into_owned(),
    )
}

/// The safetensors headers of a model's weight files ([`ModelDir::read_headers`]): every tensor
/// of the files that read, and a problem per file that did not (or a tensor stored twice).
#[derive(Debug, Default)]
pub struct StoredHeaders {
    tensors: BTreeMap<String, TensorInfo>,
    problems: Vec<ModelError>,
}

/// An opened Hugging Face model directory (config parsed, weight files located; no weights read).
#[derive(Debug, Clone)]
pub struct ModelDir {
    root: PathBuf,
    config: ModelConfig,
    config_json: Value,
    weight_files: Vec<PathBuf>,
    /// A sharded checkpoint's model.safetensors.index.json and its `weight_map` (tensor → shard
    /// file name as written); `None` for one model.safetensors.
    shard_index: Option<ShardIndex>,
    /// config.json's bitsandbytes 4-bit `quantization_config`: the checkpoint stores its
    /// decoder linear weights in 4 bits (read as stored, see [`super::quantized`]).
    stored_quantization: Option<BnbQuantization>,
}

/// model.safetensors.index.json: where it is, and which shard each tensor is in.
#[derive(Debug, Clone)]
struct ShardIndex {
    path: PathBuf,
    /// Tensor name → shard file name as the index writes it.
    weight_map: BTreeMap<String, String>,
}

impl ShardIndex {
    /// Every disagreement between the index and the shard headers (`stored`, the tensors of
    /// all shards): an entry whose shard does not hold its tensor (held by another shard or
    /// by none), and a stored tensor no entry lists (transformers loads only listed tensors).
    /// At most [`LISTED_TENSOR_PROBLEMS`] are listed; the rest are counted in one more.
    fn problems(&self, root: &Path, stored: &BTreeMap<String, TensorInfo>) -> Vec<ModelError> {
        let index_name = file_name(&self.path);
        let shard_name = |file: &Path| {
            file.strip_prefix(root).map_or_else(
                |_| file.display().to_string(),
                |name| name.display().to_string(),
            )
        };
        let messages = self.weight_map.iter().filter_map(|(tensor, shard)| {
            let placed = root.join(shard);
            match stored.get(tensor) {
                Some(info) if info.file == placed => None,
                Some(info) => Some(format!(
                    "weight_map places tensor `{tensor}` in `{shard}`, but that shard's header does not hold it; it is stored in `{}`",
                    shard_name(&info.file)
                )),
                None => Some(format!(
                    "weight_map places tensor `{tensor}` in `{shard}`, but that shard's header does not hold it (no shard does)"
                )),
            }
        });
        let mut problems: Vec<ModelError> = Vec::new();
        let mut unlisted = 0usize;
        let mut push = |message: String| {
            if problems.len() < LISTED_TENSOR_PROBLEMS {
                problems.push(ModelError::Weights {
                    path: self.path.clone(),
                    message,
                });
            } else {
                unlisted += 1;
            }
        };
        for message in messages {
            push(message);
        }
        for (tensor, info) in stored {
            if !self.weight_map.contains_key(tensor) {
                push(format!(
                    "tensor `{tensor}` is stored in `{}` but weight_map does not list it (transformers would not load it); add it to {index_name} or remove it from the shard",
                    shard_name(&info.file)
                ));
            }
        }
        if unlisted > 0 {
            problems.push(ModelError::Weights {
                path: self.path.clone(),
                message: format!(
                    "and {unlisted} more disagreements like these between weight_map and the shard headers"
                ),
            });
        }
        problems
    }
}

/// Add one weight file's tensors to those of the files before it: a tensor stored in two shards
/// is refused (which copy a loader takes would depend on the order it reads the files).
fn add_shard(
    all: &mut BTreeMap<String, TensorInfo>,
    tensors: BTreeMap<String, TensorInfo>,
) -> Result<(), ModelError> {
    for (name, info) in tensors {
        if let Some(first) = all.get(&name) {
            return Err(ModelError::Weights {
                path: info.file.clone(),
                message: format!(
                    "tensor `{name}` is also stored in {}: a tensor may be in one shard only",
                    first.file.display()
                ),
            });
        }
        all.insert(name, info);
    }
    Ok(())
}

impl ModelDir {
    /// Open `root`: parse config.json and locate the safetensors files.
    pub fn open(root: &Path) -> Result<Self, ModelError> {
        let config_path = root.join("config.json");
        let (config, config_json) = read_config(&config_path)?;
        let stored_quantization = bnb_quantization(&config_json, &config_path)?;
        if stored_quantization.is_some() && matches!(config, ModelConfig::Gpt2(_)) {
            return Err(ModelError::Config {
                path: config_path,
                key: "quantization_config".to_string(),
                message: "a checkpoint saved in bitsandbytes 4-bit is read for Llama-family models; this is gpt2 (use its 16-bit checkpoint)".to_string(),
            });
        }
        let single = root.join("model.safetensors");
        let index = root.join("model.safetensors.index.json");
        let mut shard_index = None;
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
            let mut weight_map = BTreeMap::new();
            for (tensor, file) in map {
                let Some(file) = file.as_str() else {
                    return Err(ModelError::Config {
                        path: index.clone(),
                        key: format!("weight_map.{tensor}"),
                        message: "expected a file name".to_string(),
                    });
                };
                if let Some(problem) = crate::config::train::shard_name_problem(file) {
                    return Err(ModelError::Config {
                        path: index.clone(),
                        key: format!("weight_map.{tensor}"),
                        message: problem,
                    });
                }
                weight_map.insert(tensor.clone(), file.to_string());
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
            shard_index = Some(ShardIndex {
                path: index,
                weight_map,
            });
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
            shard_index,
            stored_quantization,
        })
    }

    /// config.json's path (errors about its keys name it).
    pub fn config_path(&self) -> PathBuf {
        self.root.join("config.json")
    }

    /// The bitsandbytes 4-bit `quantization_config` of a checkpoint transformers saved in 4 bits;
    /// `None` for a 16-bit (or 32-bit) checkpoint.
    pub fn stored_quantization(&self) -> Option<&BnbQuantization> {
        self.stored_quantization.as_ref()
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
            add_shard(&mut all, read_safetensors_header(file)?)?;
        }
        Ok(all)
    }

    /// The block sizes (weights per absmax) of a checkpoint saved in bitsandbytes 4-bit, read
    /// from the safetensors headers alone: for every 4-bit weight, its packed bytes (two values a
    /// byte, whatever dtype they are stored as) against its absmax count (`ceil(n / block)`
    /// values). Each size found, with the first weight stored so and its file; empty for a
    /// 16-bit checkpoint or when the headers cannot be read (the weight check says why). A weight
    /// whose sizes pin no single power of two is left out (loading it says what is wrong).
    pub fn stored_block_sizes(&self) -> BTreeMap<usize, (String, PathBuf)> {
        if self.stored_quantization.is_none() {
            return BTreeMap::new();
        }
        self.stored_block_sizes_in(&self.read_headers())
    }

    /// [`Self::stored_block_sizes`] from headers already read ([`Self::read_headers`]).
    pub fn stored_block_sizes_in(
        &self,
        headers: &StoredHeaders,
    ) -> BTreeMap<usize, (String, PathBuf)> {
        let mut sizes = BTreeMap::new();
        if self.stored_quantization.is_none() || !headers.problems.is_empty() {
            return sizes;
        }
        let tensors = &headers.tensors;
        for (name, absmax) in tensors {
            let Some(weight_name) = name.strip_suffix(".absmax") else {
                continue;
            };
            let state = format!("{weight_name}{STATE_SUFFIX}");
            let has_state = tensors
                .range(state.clone()..)
                .next()
                .is_some_and(|(key, _)| key.starts_with(&state));
            let Some(weight) = tensors.get(weight_name).filter(|_| has_state) else {
                continue;
            };
            let Some((element_bytes, _)) = dtype_size(&weight.dtype) else {
                continue;
            };
            let values = 2 * weight.shape.iter().product::<usize>() * element_bytes as usize;
            let blocks: usize = absmax.shape.iter().product();
            let mut fitting = (4..=12)
                .map(|power| 1usize << power)
                .filter(|&size| values.div_ceil(size) == blocks);
            if let (Some(size), None) = (fitting.next(), fitting.next()) {
                sizes
                    .entry(size)
                    .or_insert_with(|| (weight_name.to_string(), weight.file.clone()));
            }
        }
        sizes
    }

    /// Check the stored tensors against config.json from the safetensors headers alone (no
    /// weight is read): every header is well formed (see [`read_safetensors_header`]), a
    /// sharded checkpoint's `weight_map` places each tensor in the shard whose header holds it
    /// and lists every stored tensor, the checkpoint stores as many decoder layers as config.json declares, and every tensor the
    /// loader reads is present with the shape config.json implies and a float dtype. Returns
    /// every problem found (tensor problems past the first few are counted in one more); empty
    /// when the model will load. Work is bounded by the headers, not by config.json's numbers.
    pub fn check_weights(&self) -> Vec<ModelError> {
        self.check_weights_in(self.read_headers())
    }

    /// Every weight file's safetensors header, each read once (for callers that ask both
    /// [`Self::stored_block_sizes_in`] and [`Self::check_weights_in`], as `validate` does).
    pub fn read_headers(&self) -> StoredHeaders {
        let mut headers = StoredHeaders::default();
        for file in &self.weight_files {
            if let Err(error) = read_safetensors_header(file)
                .and_then(|tensors| add_shard(&mut headers.tensors, tensors))
            {
                headers.problems.push(error);
            }
        }
        headers
    }

    /// [`Self::check_weights`] from headers already read ([`Self::read_headers`]).
    pub fn check_weights_in(&self, headers: StoredHeaders) -> Vec<ModelError> {
        let StoredHeaders {
            tensors: stored,
            problems,
        } = headers;
        let mut problems = problems;
        if !problems.is_empty() {
            return problems;
        }
        // The index and the headers must tell one story (which shard holds which tensor).
        if let Some(index) = &self.shard_index {
            let problems = index.problems(&self.root, &stored);
            if !problems.is_empty() {
                return problems;
            }
        }
        // Where a missing tensor should have been: the one weight file, or the shard index.
        let weights_file = match &self.weight_files[..] {
            [single] if single.ends_with("model.safetensors") => single.clone(),
            _ => self.root.join("model.safetensors.index.json"),
        };
        let config = &self.config;
        let root = config.checkpoint_root(|name| stored.contains_key(name));
        let layer_prefix = config.layer_name_prefix(root);
        let stored_layers = stored
            .keys()
            .filter_map(|name| name.strip_prefix(layer_prefix.as_str()))
            .filter_map(|rest| rest.split('.').next()?.parse::<usize>().ok())
            .max()
            .map_or(0, |last| last.saturating_add(1));
        let declared_layers = config.num_layers();
        if declared_layers != stored_layers {
            let stored_text = match stored_layers {
                0 => format!("no decoder layer (no tensor named {layer_prefix}N.*)"),
                1 => format!("1 decoder layer ({layer_prefix}0)"),
                n => format!(
                    "{n} decoder layers ({layer_prefix}0 to {layer_prefix}{})",
                    n - 1
                ),
            };
            problems.push(ModelError::Config {
                path: self.root.join("config.json"),
                key: config.layer_count_key().to_string(),
                message: format!(
                    "{declared_layers} layers, but {} stores {stored_text}",
                    file_name(&weights_file)
                ),
            });
        }
        let mut listed = 0usize;
        let mut unlisted = 0usize;
        let checked_layers = declared_layers.min(stored_layers);
        let expected = config
            .global_tensors(root)
            .into_iter()
            .chain((0..checked_layers).flat_map(|layer| config.layer_tensors(layer, root)));
        for spec in expected {
            let packed = match &self.stored_quantization {
                Some(quantization) => {
                    stored_4bit_problem(&stored, &spec.name, &spec.shape, quantization)
                }
                None => None,
            };
            let problem = match (packed, stored.get(&spec.name)) {
                (Some(None), _) => continue,
                (Some(Some(problem)), _) => problem,
                (None, None) => (
                    weights_file.clone(),
                    format!(
                        "tensor `{}` (shape {:?}) is missing; config.json's model needs it",
                        spec.name, spec.shape
                    ),
                ),
                (None, Some(info)) if info.shape != spec.shape => (
                    info.file.clone(),
                    format!(
                        "tensor `{}` has shape {:?}, but config.json implies {:?}",
                        spec.name, info.shape, spec.shape
                    ),
                ),
                (None, Some(info)) if !dtype_size(&info.dtype).is_some_and(|(_, float)| float) => (
                    info.file.clone(),
                    format!(
                        "tensor `{}` is stored as {}; model weights must be floats (F32, BF16, F16 or F64)",
                        spec.name, info.dtype
                    ),
                ),
                (None, Some(_)) => continue,
            };
            if listed < LISTED_TENSOR_PROBLEMS {
                listed += 1;
                problems.push(ModelError::Weights {
                    path: problem.0,
                    message: problem.1,
                });
            } else {
                unlisted += 1;
                if unlisted >= COUNTED_TENSOR_PROBLEMS {
                    break;
                }
            }
        }
        if unlisted > 0 {
            let at_least = if unlisted >= COUNTED_TENSOR_PROBLEMS {
                "at least "
            } else {
                ""
            };
            problems.push(ModelError::Weights {
                path: weights_file,
                message: format!("and {at_least}{unlisted} more tensor problems like these"),
            });
        }
        problems
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

    /// The tokenizer, checked against config.json's `vocab_size` (every id it can produce, and
    /// the BOS/EOS/pad ids, must index the embedding table).
    pub fn tokenizer(&self) -> Result<ModelTokenizer, ModelError> {
        let tokenizer = ModelTokenizer::load(&self.root, &self.generation_config()?)?;
        tokenizer.check_vocab_size(self.config.vocab_size())?;
        Ok(tokenizer)
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
        builder.map_err(|source| {
            // candle's safetensors errors name no file or tensor; our header check names both.
            self.weight_files
                .iter()
                .find_map(|file| read_safetensors_header(file).err())
                .unwrap_or(ModelError::Load {
                    dir: self.root.clone(),
                    source,
                })
        })
    }

    /// Load the model on `device` in `dtype`, building every linear layer through `factory`.
    pub fn load(
        &self,
        device: &Device,
        dtype: DType,
        factory: &dyn LinearFactory,
    ) -> Result<Box<dyn CausalLm>, ModelError> {
        if let Some(problem) = self.check_weights().into_iter().next() {
            return Err(problem);
        }
        if self.stored_quantization.is_none() {
            return self.build(device, dtype, factory);
        }
        // Saved in bitsandbytes 4-bit: the decoder linear layers take their stored 4-bit
        // weights (never dequantized and re-quantized), every other tensor loads as usual.
        let stored = super::quantized::read_bnb_weights(&self.weight_files, device)?;
        let stored = StoredQuantizedFactory::new(factory, stored.weights);
        let model = self.build(device, dtype, &stored)?;
        stored.finish()?;
        Ok(model)
    }

    fn build(
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
