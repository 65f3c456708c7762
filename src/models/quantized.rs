//! A base model whose decoder linear weights are 4-bit ([`crate::quant`]): quantized at load time
//! from a 16-bit Hugging Face checkpoint, or read from a checkpoint transformers saved with
//! bitsandbytes 4-bit; and the base-weight memory such a model takes.
//!
//! Owns: which tensors are quantized ([`is_quantized_linear`]: the 2-D `.weight` of every linear
//! layer inside the decoder blocks, `model.layers.N.*`; norms, embeddings and `lm_head` stay
//! 16-bit, as transformers + bitsandbytes leave them by default); streaming quantization shard
//! by shard (each shard is mapped, its tensors quantized or loaded one at a time, and unmapped
//! before the next, so host memory peaks near one shard plus one tensor in `f32`); parsing
//! `quantization_config` in config.json and the serialized bitsandbytes state (`W.weight` packed
//! bytes, `W.weight.absmax`, `W.weight.quant_map`, `W.weight.nested_absmax`,
//! `W.weight.nested_quant_map`, `W.weight.quant_state.bitsandbytes__nf4|fp4` JSON: bitsandbytes'
//! `QuantState.as_dict(packed=True)`), handed to the model layer by layer as stored
//! ([`read_bnb_weights`], `StoredQuantizedFactory`; never dequantized and re-quantized); and
//! [`base_memory`]; [`QuantizingFactory`], which quantizes the linear layers of any model build
//! tensor by tensor (what a QLoRA run loads), with the [`BaseQuantization`] it records, and
//! [`dequantized_base_patches`], the merge of a QLoRA adapter over the dequantized base.
//! Must not: build model layers itself (the model code and PEFT methods take
//! [`QuantizedBase`] from here), know PEFT configs, or print.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use candle_core::safetensors::{Load, MmapedSafetensors};
use candle_core::{DType, Device, Tensor};
use safetensors::tensor::TensorView;
use serde_json::Value;

use super::checkpoint::{Parameter, PatchChange, WeightPatch};
use super::config::ModelConfig;
use super::load::ModelError;
use super::{LinearFactory, LinearLayer, LinearWeights, QuantizedLinearWeights};
use crate::quant::{
    quantized_bytes, Absmax, NestedAbsmax, QuantConfig, QuantType, QuantizedTensor, QuantizedWeight,
};

/// A base model's weights with the decoder linear layers in 4 bits.
#[derive(Debug, Default)]
pub struct QuantizedBase {
    /// 4-bit weights by checkpoint name (`model.layers.0.self_attn.q_proj.weight`), on the device.
    pub quantized: BTreeMap<String, QuantizedWeight>,
    /// Every other tensor by checkpoint name, in the dtype asked for, on the device.
    pub dense: BTreeMap<String, Tensor>,
}

/// Whether the checkpoint tensor `name` of `shape` is quantized: a 2-D `.weight` inside a decoder
/// block (`model.layers.N.…`): the seven projections of a Llama layer. Norms (1-D), biases,
/// embeddings and `lm_head` are not.
pub fn is_quantized_linear(name: &str, shape: &[usize]) -> bool {
    shape.len() == 2 && name.starts_with("model.layers.") && name.ends_with(".weight")
}

fn safetensors_error(path: &Path, message: impl std::fmt::Display) -> ModelError {
    ModelError::Safetensors {
        path: path.to_path_buf(),
        message: message.to_string(),
    }
}

fn weights_error(path: &Path, message: impl std::fmt::Display) -> ModelError {
    ModelError::Weights {
        path: path.to_path_buf(),
        message: message.to_string(),
    }
}

fn map_files(files: &[PathBuf]) -> Result<MmapedSafetensors, ModelError> {
    let first = files.first().map(PathBuf::as_path).unwrap_or(Path::new(""));
    #[expect(
        unsafe_code,
        reason = "memory-mapping the checkpoint is an FFI-level contract (see below)"
    )]
    // SAFETY: the mapped files are model weights we only read; the contract of mmap is that
    // nobody truncates or rewrites them while mapped, which peftpipe never does.
    let mapped = unsafe { MmapedSafetensors::multi(files) };
    mapped.map_err(|error| safetensors_error(first, error))
}

/// Quantize the decoder linear weights of a 16-bit safetensors checkpoint (`files`, the shards in
/// order) while loading it, shard by shard and tensor by tensor; every other tensor is loaded as
/// `dtype`. Quantization is bitsandbytes' (bit-exact with its CPU backend).
pub fn quantize_checkpoint(
    files: &[PathBuf],
    config: &QuantConfig,
    dtype: DType,
    device: &Device,
) -> Result<QuantizedBase, ModelError> {
    let first = files.first().map(PathBuf::as_path).unwrap_or(Path::new(""));
    config
        .validate()
        .map_err(|error| weights_error(first, error))?;
    let mut base = QuantizedBase::default();
    for path in files {
        // One shard mapped at a time: its pages are released when `shard` drops.
        let shard = map_files(std::slice::from_ref(path))?;
        let mut tensors = shard.tensors();
        tensors.sort_by(|a, b| a.0.cmp(&b.0));
        for (name, view) in tensors {
            let failed =
                |error: candle_core::Error| weights_error(path, format!("`{name}`: {error}"));
            if is_quantized_linear(&name, view.shape()) {
                let tensor = view.load(&Device::Cpu).map_err(failed)?;
                let quantized = QuantizedTensor::from_tensor(&tensor, config)
                    .map_err(|error| weights_error(path, format!("`{name}`: {error}")))?;
                drop(tensor);
                let weight = QuantizedWeight::new(&quantized, device).map_err(failed)?;
                base.quantized.insert(name, weight);
            } else {
                let tensor = view
                    .load(device)
                    .and_then(|tensor| tensor.to_dtype(dtype))
                    .map_err(failed)?;
                base.dense.insert(name, tensor);
            }
        }
    }
    Ok(base)
}

/// `quantization_config` of a transformers config.json saved with bitsandbytes 4-bit.
#[derive(Debug, Clone, PartialEq)]
pub struct BnbQuantization {
    pub quant_type: QuantType,
    /// `bnb_4bit_use_double_quant`.
    pub double_quant: bool,
    /// `bnb_4bit_compute_dtype` (`bfloat16`, `float16`, `float32`), when given.
    pub compute_dtype: Option<DType>,
}

impl BnbQuantization {
    /// Whether a 4-bit base of `config` has this checkpoint's quant type and double
    /// quantization (its block size is in the weights' stored sizes, not in config.json).
    pub fn has_settings_of(&self, config: &QuantConfig) -> bool {
        (self.quant_type, self.double_quant) == (config.quant_type, config.double_quant)
    }
}

fn torch_dtype(name: &str) -> Option<DType> {
    match name.trim_start_matches("torch.") {
        "bfloat16" => Some(DType::BF16),
        "float16" | "half" => Some(DType::F16),
        "float32" | "float" => Some(DType::F32),
        _ => None,
    }
}

/// The bitsandbytes 4-bit `quantization_config` of a config.json (`path` for errors): `None` when
/// the model is not quantized; an error for a quantization peftpipe cannot read (8-bit, another
/// method, an unknown 4-bit type).
pub fn bnb_quantization(
    config_json: &Value,
    path: &Path,
) -> Result<Option<BnbQuantization>, ModelError> {
    let Some(section) = config_json.get("quantization_config") else {
        return Ok(None);
    };
    let error = |key: &str, message: String| ModelError::Config {
        path: path.to_path_buf(),
        key: format!("quantization_config.{key}"),
        message,
    };
    let method = section
        .get("quant_method")
        .and_then(Value::as_str)
        .unwrap_or("bitsandbytes");
    if method != "bitsandbytes" {
        return Err(error(
            "quant_method",
            format!("`{method}` is not supported (only bitsandbytes 4-bit)"),
        ));
    }
    let flag = |key: &str| section.get(key).and_then(Value::as_bool).unwrap_or(false);
    if flag("load_in_8bit") {
        return Err(error(
            "load_in_8bit",
            "a bitsandbytes 8-bit (LLM.int8()) checkpoint is not supported; only 4-bit ones (load_in_4bit: true, nf4 or fp4) are read as stored".into(),
        ));
    }
    if !flag("load_in_4bit") {
        return Err(error(
            "load_in_4bit",
            "missing or false; only bitsandbytes 4-bit checkpoints (load_in_4bit: true) are supported".into(),
        ));
    }
    let type_name = section
        .get("bnb_4bit_quant_type")
        .and_then(Value::as_str)
        .unwrap_or("fp4");
    let quant_type = QuantType::from_name(type_name).ok_or_else(|| {
        error(
            "bnb_4bit_quant_type",
            format!("`{type_name}` is not nf4 or fp4"),
        )
    })?;
    let compute_dtype =
        match section
            .get("bnb_4bit_compute_dtype")
            .and_then(Value::as_str)
        {
            None => None,
            Some(name) => Some(torch_dtype(name).ok_or_else(|| {
                error("bnb_4bit_compute_dtype", format!("unknown dtype `{name}`"))
            })?),
        };
    Ok(Some(BnbQuantization {
        quant_type,
        double_quant: flag("bnb_4bit_use_double_quant"),
        compute_dtype,
    }))
}

/// The suffix of the packed quantization state bitsandbytes saves beside each 4-bit weight.
pub(crate) const STATE_SUFFIX: &str = ".quant_state.bitsandbytes__";

fn f32_values(view: &TensorView<'_>, path: &Path, name: &str) -> Result<Vec<f32>, ModelError> {
    if view.dtype() != safetensors::Dtype::F32 {
        return Err(weights_error(
            path,
            format!("`{name}`: stored as {:?}, expected F32", view.dtype()),
        ));
    }
    Ok(view
        .data()
        .chunks_exact(4)
        .map(|bytes| f32::from_le_bytes([bytes[0], bytes[1], bytes[2], bytes[3]]))
        .collect())
}

/// One 4-bit weight read from a bitsandbytes checkpoint: the weight on its device, and the file
/// and state tensor it came from (errors name them).
#[derive(Debug, Clone)]
pub struct StoredWeight {
    pub weight: QuantizedWeight,
    pub file: PathBuf,
    /// Its `….weight.quant_state.bitsandbytes__nf4|fp4` tensor.
    pub state_name: String,
}

/// The 4-bit weights of a checkpoint saved by transformers + bitsandbytes, by weight name
/// (`model.layers.0.self_attn.q_proj.weight`), and every tensor that belongs to them.
#[derive(Debug, Default)]
pub struct BnbWeights {
    pub weights: BTreeMap<String, StoredWeight>,
    /// The packed weights and their state tensors (`.absmax`, `.quant_map`, `.nested_absmax`,
    /// `.nested_quant_map`, `.quant_state.bitsandbytes__…`): every tensor that is not dense.
    pub state_tensors: BTreeSet<String>,
}

/// The tensors bitsandbytes' `QuantState.as_dict(packed=True)` saves beside a 4-bit `W.weight`
/// (suffixes of `W.weight`), besides the packed JSON state ([`STATE_SUFFIX`]).
const STATE_PARTS: [&str; 4] = [
    ".absmax",
    ".quant_map",
    ".nested_absmax",
    ".nested_quant_map",
];

/// Read the 4-bit weights of a checkpoint saved by transformers with bitsandbytes 4-bit
/// (`files`, all shards): every `W.weight` that has a `W.weight.quant_state.bitsandbytes__nf4`
/// (or `__fp4`) tensor, with its codes and state used as stored (no requantization), checked
/// for consistency (code book, sizes of the packed bytes and absmax for the stated shape).
/// The layout is bitsandbytes' `QuantState.as_dict(packed=True)` / `from_dict`: the packed codes
/// (`[(n + 1) / 2, 1]` bytes in `quant_storage`'s dtype, high nibble first), `absmax` (`f32`, or
/// with double quantization the `u8` codes of the absmax), `quant_map` (the 16 levels),
/// `nested_absmax` and `nested_quant_map` (double quantization only: the `f32` scales per
/// block of 256 absmax values and the 256-level code), and the JSON state (`quant_type`,
/// `blocksize`, `dtype`, `shape`, and `nested_blocksize`, `nested_dtype`, `nested_offset`).
pub fn read_bnb_weights(files: &[PathBuf], device: &Device) -> Result<BnbWeights, ModelError> {
    // Which shard holds each tensor (headers only, checked before anything is mapped).
    let mut owner: BTreeMap<String, PathBuf> = BTreeMap::new();
    for path in files {
        for name in super::load::read_safetensors_header(path)?.into_keys() {
            owner.insert(name, path.clone());
        }
    }
    // Weight name (`….weight`) → its packed-state tensor name.
    let mut states: BTreeMap<&str, &str> = BTreeMap::new();
    for (name, path) in &owner {
        let Some(index) = name.find(STATE_SUFFIX) else {
            continue;
        };
        if let Some(other) = states.insert(&name[..index], name) {
            return Err(weights_error(
                path,
                format!(
                    "`{}` has two quantization states, `{other}` and `{name}`",
                    &name[..index]
                ),
            ));
        }
    }
    let mut weights = BnbWeights::default();
    if states.is_empty() {
        return Ok(weights);
    }
    let mapped = map_files(files)?;
    for (weight_name, state_name) in states {
        let path = owner.get(state_name).cloned().unwrap_or_default();
        let quantized = read_bnb_state(&mapped, &owner, weight_name, state_name, &path)?;
        let weight = QuantizedWeight::new(&quantized, device)
            .map_err(|error| weights_error(&path, format!("`{weight_name}`: {error}")))?;
        weights.state_tensors.insert(weight_name.to_string());
        weights.state_tensors.insert(state_name.to_string());
        for part in STATE_PARTS {
            let name = format!("{weight_name}{part}");
            if owner.contains_key(&name) {
                weights.state_tensors.insert(name);
            }
        }
        weights.weights.insert(
            weight_name.to_string(),
            StoredWeight {
                weight,
                file: path,
                state_name: state_name.to_string(),
            },
        );
    }
    Ok(weights)
}

/// One weight's [`QuantizedTensor`] from its saved parts (see [`read_bnb_weights`]).
fn read_bnb_state(
    mapped: &MmapedSafetensors,
    owner: &BTreeMap<String, PathBuf>,
    weight_name: &str,
    state_name: &str,
    path: &Path,
) -> Result<QuantizedTensor, ModelError> {
    let get = |name: &str| {
        let file = owner.get(name).map_or(path, PathBuf::as_path);
        mapped
            .get(name)
            .map_err(|error| weights_error(file, format!("`{name}`: {error}")))
    };
    let state: Value = serde_json::from_slice(get(state_name)?.data())
        .map_err(|error| weights_error(path, format!("`{state_name}`: invalid JSON: {error}")))?;
    let bad = |message: String| weights_error(path, format!("`{state_name}`: {message}"));
    let field = |key: &str| state.get(key).ok_or_else(|| bad(format!("no `{key}`")));
    let count = |key: &str| {
        field(key)?
            .as_u64()
            .and_then(|value| usize::try_from(value).ok())
            .ok_or_else(|| bad(format!("`{key}` is not a count")))
    };
    let text = |key: &str| {
        field(key)?
            .as_str()
            .ok_or_else(|| bad(format!("`{key}` is not a string")))
    };
    let type_name = text("quant_type")?;
    let quant_type = QuantType::from_name(type_name).ok_or_else(|| {
        bad(format!(
            "quant_type `{type_name}` is not supported (nf4 or fp4)"
        ))
    })?;
    if !state_name.ends_with(&format!("{STATE_SUFFIX}{type_name}")) {
        return Err(bad(format!(
            "the state says quant_type `{type_name}`, its name another"
        )));
    }
    let block_size = count("blocksize")?;
    let shape = field("shape")?
        .as_array()
        .and_then(|dims| {
            dims.iter()
                .map(|d| d.as_u64().and_then(|d| usize::try_from(d).ok()))
                .collect::<Option<Vec<usize>>>()
        })
        .ok_or_else(|| bad("`shape` is not a list of counts".into()))?;
    if shape
        .iter()
        .try_fold(1usize, |total, &d| total.checked_mul(d))
        .is_none()
    {
        return Err(bad(format!(
            "`shape` {shape:?} holds more values than this machine can address"
        )));
    }
    let dtype_name = text("dtype")?;
    let original = torch_dtype(dtype_name).ok_or_else(|| {
        bad(format!(
            "dtype `{dtype_name}` is not bfloat16, float16 or float32"
        ))
    })?;
    // The packed codes, whatever `quant_storage` dtype they were viewed as (the bytes are the
    // same little-endian bytes bitsandbytes wrote as uint8).
    let packed = get(weight_name)?.data().to_vec();
    let quant_map_name = format!("{weight_name}.quant_map");
    let quant_map = f32_values(&get(&quant_map_name)?, path, &quant_map_name)?;
    // Compared as values: bitsandbytes' python table holds FP4's code 8 as `-0`, an integer,
    // so the saved map has +0.0 where its kernels (and ours) use -0.0.
    let expected = quant_type.code();
    if quant_map.len() != 16 || quant_map.iter().zip(&expected).any(|(a, b)| a != b) {
        return Err(weights_error(
            path,
            format!("`{quant_map_name}` is not bitsandbytes' {type_name} code book"),
        ));
    }
    let absmax_name = format!("{weight_name}.absmax");
    let absmax_view = get(&absmax_name)?;
    let nested_name = format!("{weight_name}.nested_absmax");
    // As `QuantState.from_dict`: double-quantized exactly when `nested_absmax` is saved.
    let absmax = if owner.contains_key(&nested_name) {
        let nested_code_name = format!("{weight_name}.nested_quant_map");
        let offset = field("nested_offset")?
            .as_f64()
            .ok_or_else(|| bad("`nested_offset` is not a number".into()))?;
        let nested_dtype = text("nested_dtype")?;
        if nested_dtype != "float32" {
            return Err(bad(format!(
                "nested_dtype `{nested_dtype}` is not float32 (bitsandbytes' absmax dtype)"
            )));
        }
        if absmax_view.dtype() != safetensors::Dtype::U8 {
            return Err(weights_error(
                path,
                format!(
                    "`{absmax_name}`: a double-quantized absmax must be U8, found {:?}",
                    absmax_view.dtype()
                ),
            ));
        }
        Absmax::Nested(NestedAbsmax {
            quantized: absmax_view.data().to_vec(),
            scale: f32_values(&get(&nested_name)?, path, &nested_name)?,
            code: f32_values(&get(&nested_code_name)?, path, &nested_code_name)?,
            block_size: count("nested_blocksize")?,
            // Saved as `offset.item()`: the f32 value widened to a python float, exact back.
            offset: offset as f32,
        })
    } else {
        Absmax::Plain(f32_values(&absmax_view, path, &absmax_name)?)
    };
    let quantized = QuantizedTensor {
        shape,
        dtype: original,
        quant_type,
        block_size,
        packed,
        absmax,
    };
    quantized.check().map_err(|error| {
        weights_error(
            path,
            format!(
                "`{weight_name}` (shape {:?} in `{state_name}`): {error}",
                quantized.shape
            ),
        )
    })?;
    Ok(quantized)
}

/// Read a checkpoint saved by transformers with bitsandbytes 4-bit (`files`, all shards): the
/// 4-bit weights keep their stored codes and state ([`read_bnb_weights`], no requantization);
/// every other tensor is loaded as `dtype`.
pub fn load_bnb_checkpoint(
    files: &[PathBuf],
    dtype: DType,
    device: &Device,
) -> Result<QuantizedBase, ModelError> {
    let stored = read_bnb_weights(files, device)?;
    let mut base = QuantizedBase {
        quantized: stored
            .weights
            .into_iter()
            .map(|(name, stored)| (name, stored.weight))
            .collect(),
        dense: BTreeMap::new(),
    };
    for path in files {
        let shard = map_files(std::slice::from_ref(path))?;
        for (name, view) in shard.tensors() {
            if stored.state_tensors.contains(&name) {
                continue;
            }
            let tensor = view
                .load(device)
                .and_then(|tensor| tensor.to_dtype(dtype))
                .map_err(|error| weights_error(path, format!("`{name}`: {error}")))?;
            base.dense.insert(name, tensor);
        }
    }
    Ok(base)
}

/// Write a 16-bit copy of `dir`, a checkpoint saved in bitsandbytes 4-bit, to `out` (what a
/// merged export starts from, as transformers' `model.dequantize()`): each 4-bit weight
/// dequantized bit-exactly (`level · absmax` in `f32`) and rounded once to the dtype it had
/// before quantization (its state's `dtype`), under its own name and `[out, in]` shape; its
/// state tensors dropped; every other tensor as stored; the shards and their file names kept
/// (with an index rewritten to the new names); config.json without `quantization_config`;
/// the other files (tokenizer, generation config) copied. One shard in memory at a time.
pub fn write_dequantized_checkpoint(dir: &super::ModelDir, out: &Path) -> Result<(), ModelError> {
    let io = |path: &Path, source| ModelError::Io {
        path: path.to_path_buf(),
        source,
    };
    let files = dir.weight_files();
    let stored = read_bnb_weights(files, &Device::Cpu)?;
    std::fs::create_dir_all(out).map_err(|error| io(out, error))?;
    let mut weight_map = serde_json::Map::new();
    for path in files {
        let file_name = path
            .file_name()
            .map(|name| name.to_string_lossy().into_owned())
            .unwrap_or_default();
        let shard = map_files(std::slice::from_ref(path))?;
        let mut tensors: std::collections::HashMap<String, Tensor> = Default::default();
        for (name, view) in shard.tensors() {
            let failed =
                |error: candle_core::Error| weights_error(path, format!("`{name}`: {error}"));
            let tensor = match stored.weights.get(&name) {
                Some(weight) => {
                    let host = weight.weight.to_host().map_err(failed)?;
                    host.dequantize(host.dtype, &Device::Cpu).map_err(failed)?
                }
                None if stored.state_tensors.contains(&name) => continue,
                None => view.load(&Device::Cpu).map_err(failed)?,
            };
            weight_map.insert(name.clone(), Value::String(file_name.clone()));
            tensors.insert(name, tensor);
        }
        let target = out.join(&file_name);
        candle_core::safetensors::save(&tensors, &target)
            .map_err(|error| weights_error(&target, error))?;
    }
    let write_json = |path: &Path, value: &Value| {
        let text = serde_json::to_string_pretty(value).unwrap_or_default();
        std::fs::write(path, text + "\n").map_err(|error| io(path, error))
    };
    if files.len() > 1 {
        write_json(
            &out.join("model.safetensors.index.json"),
            &serde_json::json!({"metadata": {}, "weight_map": weight_map}),
        )?;
    }
    let mut config = dir.config_json().clone();
    if let Some(fields) = config.as_object_mut() {
        fields.remove("quantization_config");
    }
    write_json(&out.join("config.json"), &config)?;
    let entries = std::fs::read_dir(dir.root()).map_err(|error| io(dir.root(), error))?;
    for entry in entries {
        let entry = entry.map_err(|error| io(dir.root(), error))?;
        let name = entry.file_name().to_string_lossy().into_owned();
        let weights = name.ends_with(".safetensors") || name == "model.safetensors.index.json";
        if entry.path().is_file() && !weights && name != "config.json" {
            std::fs::copy(entry.path(), out.join(&name))
                .map_err(|error| io(&entry.path(), error))?;
        }
    }
    Ok(())
}

/// The [`LinearFactory`] [`super::ModelDir::load`] puts around the caller's for a checkpoint
/// saved in bitsandbytes 4-bit: it hands each stored 4-bit weight to the model once
/// ([`LinearFactory::stored_quantized`], its shape checked against the layer's), forwards every
/// build to `inner`, and names the file and state tensor when building a 4-bit layer fails.
pub(crate) struct StoredQuantizedFactory<'a> {
    inner: &'a dyn LinearFactory,
    /// Not yet handed to the model, by weight name.
    waiting: std::sync::Mutex<BTreeMap<String, StoredWeight>>,
    /// Handed out: weight name → (file, state tensor).
    handed: std::sync::Mutex<BTreeMap<String, (PathBuf, String)>>,
}

impl<'a> StoredQuantizedFactory<'a> {
    pub(crate) fn new(
        inner: &'a dyn LinearFactory,
        weights: BTreeMap<String, StoredWeight>,
    ) -> Self {
        Self {
            inner,
            waiting: std::sync::Mutex::new(weights),
            handed: std::sync::Mutex::default(),
        }
    }

    /// After the model is built: a 4-bit weight no layer took is an error (the model has no
    /// linear layer of that name, e.g. a 4-bit `lm_head` or embedding).
    pub(crate) fn finish(self) -> Result<(), ModelError> {
        let waiting = self.waiting.into_inner().unwrap_or_default();
        match waiting.into_iter().next() {
            None => Ok(()),
            Some((name, stored)) => Err(weights_error(
                &stored.file,
                format!(
                    "`{name}` is stored in 4 bits (`{}`), but it is not the weight of a linear layer peftpipe builds from this checkpoint (only decoder-block linear layers are read in 4 bits)",
                    stored.state_name
                ),
            )),
        }
    }
}

impl LinearFactory for StoredQuantizedFactory<'_> {
    fn build(&self, path: &str, base: LinearWeights) -> candle_core::Result<Box<dyn LinearLayer>> {
        self.inner.build(path, base)
    }

    fn build_quantized(
        &self,
        path: &str,
        base: QuantizedLinearWeights,
    ) -> candle_core::Result<Box<dyn LinearLayer>> {
        let origin = self
            .handed
            .lock()
            .ok()
            .and_then(|handed| handed.get(&format!("{path}.weight")).cloned());
        self.inner
            .build_quantized(path, base)
            .map_err(|error| match origin {
                Some((file, state)) => {
                    candle_core::Error::Msg(format!("{}: `{state}`: {error}", file.display()))
                }
                None => error,
            })
    }

    fn stored_quantized(
        &self,
        path: &str,
        out_features: usize,
        in_features: usize,
    ) -> candle_core::Result<Option<QuantizedWeight>> {
        let name = format!("{path}.weight");
        let poisoned =
            || candle_core::Error::Msg("the 4-bit weight table was poisoned by a panic".into());
        let Some(stored) = self.waiting.lock().map_err(|_| poisoned())?.remove(&name) else {
            return Ok(None);
        };
        let stored_dims = (stored.weight.out_features(), stored.weight.in_features());
        if stored_dims != (out_features, in_features) {
            return Err(candle_core::Error::Msg(format!(
                "{}: `{}`: shape [{}, {}], but config.json implies [{out_features}, {in_features}] for `{name}`",
                stored.file.display(),
                stored.state_name,
                stored_dims.0,
                stored_dims.1
            )));
        }
        self.handed
            .lock()
            .map_err(|_| poisoned())?
            .insert(name, (stored.file, stored.state_name));
        Ok(Some(stored.weight))
    }
}

/// How a QLoRA base is stored: bitsandbytes' 4-bit settings, the dtype its 4-bit layers
/// compute in (`None`: the model's dtype), and whether the checkpoint already stores them in 4
/// bits. Recorded beside a trained adapter (the adapter itself is a plain PEFT LoRA folder) so
/// evaluation, generation and export rebuild the same base.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BaseQuantization {
    pub config: QuantConfig,
    pub compute_dtype: Option<DType>,
    /// The checkpoint was saved by transformers with bitsandbytes 4-bit (`quantization_config`
    /// in its config.json): its 4-bit weights are used as stored and must have `config`'s
    /// settings; a linear layer it stores dense (bitsandbytes' `llm_int8_skip_modules`) stays
    /// dense. `false`: a 16-bit checkpoint quantized while it loads.
    pub prequantized: bool,
}

fn dtype_name(dtype: DType) -> &'static str {
    match dtype {
        DType::BF16 => "bf16",
        DType::F16 => "f16",
        _ => "f32",
    }
}

impl BaseQuantization {
    /// For tables: `4-bit nf4, double quant, block 64`.
    pub fn label(&self) -> String {
        format!(
            "4-bit {}{}, block {}",
            self.config.quant_type.name(),
            if self.config.double_quant {
                ", double quant"
            } else {
                ""
            },
            self.config.block_size
        )
    }

    /// The JSON record (`{"quant_type": "nf4", "double_quant": true, "block_size": 64,
    /// "compute_dtype": "bf16" | null}`, plus `"prequantized": true` for a base the checkpoint
    /// stores in 4 bits; absent, as in records written before it existed, means `false`).
    pub fn to_json(&self) -> Value {
        let mut record = serde_json::json!({
            "quant_type": self.config.quant_type.name(),
            "double_quant": self.config.double_quant,
            "block_size": self.config.block_size,
            "compute_dtype": self.compute_dtype.map(dtype_name),
        });
        if let (true, Some(fields)) = (self.prequantized, record.as_object_mut()) {
            fields.insert("prequantized".into(), Value::Bool(true));
        }
        record
    }

    /// Read [`BaseQuantization::to_json`]'s record; the message names the field at fault.
    pub fn from_json(value: &Value) -> Result<Self, String> {
        let type_name = value
            .get("quant_type")
            .and_then(Value::as_str)
            .ok_or("`quant_type` is missing or not a string")?;
        let quant_type = QuantType::from_name(type_name)
            .ok_or_else(|| format!("`quant_type` `{type_name}` is not nf4 or fp4"))?;
        let double_quant = value
            .get("double_quant")
            .and_then(Value::as_bool)
            .ok_or("`double_quant` is missing or not a boolean")?;
        let block_size = value
            .get("block_size")
            .and_then(Value::as_u64)
            .and_then(|size| usize::try_from(size).ok())
            .ok_or("`block_size` is missing or not a count")?;
        let compute_dtype = match value.get("compute_dtype") {
            None | Some(Value::Null) => None,
            Some(Value::String(name)) => Some(match name.as_str() {
                "bf16" => DType::BF16,
                "f16" => DType::F16,
                "f32" => DType::F32,
                other => return Err(format!("`compute_dtype` `{other}` is not bf16, f16 or f32")),
            }),
            Some(_) => return Err("`compute_dtype` is not a string".into()),
        };
        let prequantized = match value.get("prequantized") {
            None | Some(Value::Null) => false,
            Some(Value::Bool(flag)) => *flag,
            Some(_) => return Err("`prequantized` is not a boolean".into()),
        };
        let config = QuantConfig {
            quant_type,
            block_size,
            double_quant,
        };
        // A QLoRA base is set up with 64..4096 only (method.qlora, base_quantization), so no
        // run writes a record of another size (32 is bitsandbytes' ROCm-only one).
        if let Some(problem) = crate::config::method::block_size_problem(block_size) {
            return Err(format!("`block_size` {problem}"));
        }
        config.validate().map_err(|error| error.to_string())?;
        Ok(Self {
            config,
            compute_dtype,
            prequantized,
        })
    }

    /// Why a weight stored in 4 bits (a pre-quantized checkpoint) cannot serve as this base:
    /// its quant type, block size or double quantization differ from [`Self::config`].
    pub fn stored_mismatch(&self, weight: &QuantizedWeight) -> Option<String> {
        let wanted = &self.config;
        let differ = |field: &str, stored: String, asked: String| {
            Some(format!(
                "stored with {field} {stored}, but {field} {asked} is asked for; a checkpoint saved in 4 bits is used as stored, never re-quantized: set {field}: {stored} where the 4-bit base is set up (method.qlora, or an evaluate stage's base_quantization), or use the 16-bit original"
            ))
        };
        if weight.quant_type() != wanted.quant_type {
            return differ(
                "quant_type",
                weight.quant_type().name().into(),
                wanted.quant_type.name().into(),
            );
        }
        if weight.block_size() != wanted.block_size {
            return differ(
                "block_size",
                weight.block_size().to_string(),
                wanted.block_size.to_string(),
            );
        }
        if weight.double_quant() != wanted.double_quant {
            return differ(
                "double_quant",
                weight.double_quant().to_string(),
                wanted.double_quant.to_string(),
            );
        }
        None
    }

    /// `dequant(quant(weight))` in `f32`: the values a 4-bit layer made from `weight` computes
    /// with (before the rounding to its compute dtype).
    pub fn round_trip(&self, weight: &Tensor) -> candle_core::Result<Tensor> {
        let quantized = QuantizedTensor::from_tensor(weight, &self.config)?;
        quantized.dequantize(DType::F32, weight.device())
    }
}

/// A [`LinearFactory`] that stores the base weight of every quantizable linear layer
/// ([`is_quantized_linear`]: all but `lm_head`) in 4 bits while the model loads, one tensor at
/// a time (the dense tensor is dropped as soon as it is quantized), and builds the layer through
/// `inner`'s [`LinearFactory::build_quantized`]; other layers go to `inner.build` unchanged.
/// The weight is quantized from the values the model loaded (the checkpoint converted to the
/// run's dtype), as transformers quantizes a checkpoint loaded with `torch_dtype`.
pub struct QuantizingFactory<F> {
    inner: F,
    quantization: BaseQuantization,
    /// What was quantized: checkpoint name (`….weight`) → shape, and the dtype it was loaded in.
    quantized: std::sync::Mutex<QuantizedLayers>,
}

/// The layers a [`QuantizingFactory`] stored in 4 bits.
#[derive(Debug, Clone, Default)]
pub struct QuantizedLayers {
    /// Checkpoint name (`model.layers.0.self_attn.q_proj.weight`) → `[out, in]`.
    pub shapes: BTreeMap<String, Vec<usize>>,
    /// The dtype the dense weights had when quantized (the run's dtype).
    pub load_dtype: Option<DType>,
}

impl<F: LinearFactory> QuantizingFactory<F> {
    pub fn new(inner: F, quantization: BaseQuantization) -> Self {
        Self {
            inner,
            quantization,
            quantized: std::sync::Mutex::default(),
        }
    }

    /// The layers quantized so far.
    pub fn quantized_layers(&self) -> QuantizedLayers {
        self.quantized
            .lock()
            .map(|layers| layers.clone())
            .unwrap_or_default()
    }

    pub fn inner(&self) -> &F {
        &self.inner
    }

    pub fn quantization(&self) -> &BaseQuantization {
        &self.quantization
    }
}

impl<F: LinearFactory> LinearFactory for QuantizingFactory<F> {
    fn build(&self, path: &str, base: LinearWeights) -> candle_core::Result<Box<dyn LinearLayer>> {
        let (out_features, in_features) = base.dims()?;
        // A pre-quantized checkpoint's dense linear layers are those bitsandbytes left in 16
        // bits (`llm_int8_skip_modules`): they stay dense, as transformers loads them.
        if self.quantization.prequantized
            || !is_quantized_linear(&format!("{path}.weight"), &[out_features, in_features])
        {
            return self.inner.build(path, base);
        }
        let LinearWeights { weight, bias } = base;
        let quantized = QuantizedTensor::from_tensor(&weight, &self.quantization.config)
            .map_err(|error| candle_core::Error::Msg(format!("quantizing `{path}`: {error}")))?;
        {
            let mut layers = self.quantized.lock().map_err(|_| {
                candle_core::Error::Msg("the quantized-layer record was poisoned by a panic".into())
            })?;
            layers
                .shapes
                .insert(format!("{path}.weight"), vec![out_features, in_features]);
            layers.load_dtype = Some(weight.dtype());
        }
        let compute_dtype = self.quantization.compute_dtype.unwrap_or(weight.dtype());
        let device = weight.device().clone();
        drop(weight);
        let weight = QuantizedWeight::new(&quantized, &device)?;
        self.inner.build_quantized(
            path,
            QuantizedLinearWeights {
                weight,
                bias,
                compute_dtype,
            },
        )
    }

    /// A layer the checkpoint already stores in 4 bits (a pre-quantized base): its settings must
    /// be this base's (else an error naming the one that differs); it is recorded like a layer
    /// quantized here and computes in the configured compute dtype (default: the model's).
    fn build_quantized(
        &self,
        path: &str,
        base: QuantizedLinearWeights,
    ) -> candle_core::Result<Box<dyn LinearLayer>> {
        if let Some(problem) = self.quantization.stored_mismatch(&base.weight) {
            return Err(candle_core::Error::Msg(format!(
                "`{path}.weight` is {problem}"
            )));
        }
        let (out_features, in_features) = base.dims();
        {
            let mut layers = self.quantized.lock().map_err(|_| {
                candle_core::Error::Msg("the quantized-layer record was poisoned by a panic".into())
            })?;
            layers
                .shapes
                .insert(format!("{path}.weight"), vec![out_features, in_features]);
            layers.load_dtype = Some(base.compute_dtype);
        }
        let compute_dtype = self
            .quantization
            .compute_dtype
            .unwrap_or(base.compute_dtype);
        self.inner.build_quantized(
            path,
            QuantizedLinearWeights {
                compute_dtype,
                ..base
            },
        )
    }
}

/// The patches that write a QLoRA model as a 16-bit checkpoint: every quantizable linear weight
/// of the base (`tensors`: checkpoint name → shape, e.g. from the safetensors headers) becomes
/// its dequantized 4-bit value, quantized from the weight converted to `load_dtype` as training
/// loaded it, plus the adapter's change where `adapter` has one for that layer. The merge is
/// computed in `f32` and rounded once to the output dtype; never re-quantized.
pub fn dequantized_base_patches(
    adapter: Vec<WeightPatch>,
    quantization: &BaseQuantization,
    load_dtype: DType,
    tensors: &BTreeMap<String, Vec<usize>>,
) -> Vec<WeightPatch> {
    // By tensor name: a trained norm copy patches a module's weight and bias.
    let mut by_name: BTreeMap<String, WeightPatch> = adapter
        .into_iter()
        .map(|patch| (patch.tensor_name(), patch))
        .collect();
    let mut patches = Vec::new();
    for (name, shape) in tensors {
        if !is_quantized_linear(name, shape) {
            continue;
        }
        let Some(path) = name.strip_suffix(".weight") else {
            continue;
        };
        let adapter_patch = by_name.remove(name);
        let quantization = *quantization;
        let dims = (shape[0], shape[1]);
        let change = PatchChange::Map(std::sync::Arc::new(move |weight: &Tensor| {
            let base = quantization.round_trip(&weight.to_dtype(load_dtype)?)?;
            match &adapter_patch {
                Some(patch) => patch.apply(&base),
                None => Ok(base),
            }
        }));
        patches.push(WeightPatch {
            path: path.to_string(),
            parameter: Parameter::Weight,
            dims,
            change,
            optional: false,
        });
    }
    // Adapted layers that are not quantized (`lm_head`, a trained norm) merge as LoRA does.
    patches.extend(by_name.into_values());
    patches
}

/// Base-weight bytes of a model with its decoder linear weights quantized, against bf16.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct BaseMemory {
    /// Parameters in the quantized linear weights.
    pub quantized_parameters: u64,
    /// Every other parameter (embeddings, norms, an untied head, biases).
    pub dense_parameters: u64,
    /// The quantized weights' bytes: packed codes, absmax state, code books.
    pub quantized_bytes: u64,
}

impl BaseMemory {
    /// The quantized weights in bf16.
    pub fn linear_bf16_bytes(&self) -> u64 {
        self.quantized_parameters * 2
    }

    /// The linear layers' share: quantized bytes / bf16 bytes.
    pub fn linear_ratio(&self) -> f64 {
        self.quantized_bytes as f64 / self.linear_bf16_bytes().max(1) as f64
    }

    /// The whole base in bf16.
    pub fn total_bf16_bytes(&self) -> u64 {
        (self.quantized_parameters + self.dense_parameters) * 2
    }

    /// The whole base with the linear layers quantized and the rest in bf16.
    pub fn total_quantized_bytes(&self) -> u64 {
        self.quantized_bytes + self.dense_parameters * 2
    }

    pub fn total_ratio(&self) -> f64 {
        self.total_quantized_bytes() as f64 / self.total_bf16_bytes().max(1) as f64
    }
}

/// The base-weight memory of `config` with its decoder linear weights quantized under `quant`
/// (the tensors [`is_quantized_linear`] selects); `None` when a count overflows 64 bits.
pub fn base_memory(config: &ModelConfig, quant: &QuantConfig) -> Option<BaseMemory> {
    let mut quantized_parameters = 0u64;
    let mut quantized = 0u64;
    for layer in 0..config.num_layers() {
        for linear in config.layer_linear_layers(layer) {
            let count = linear.in_features.checked_mul(linear.out_features)?;
            quantized_parameters = quantized_parameters.checked_add(count as u64)?;
            quantized = quantized.checked_add(quantized_bytes(count, quant) as u64)?;
        }
    }
    let total = config.parameter_count()?;
    Some(BaseMemory {
        quantized_parameters,
        dense_parameters: total.checked_sub(quantized_parameters)?,
        quantized_bytes: quantized,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn shared_config(name: &str) -> Option<ModelConfig> {
        let Some(shared) = std::env::var_os("PEFTPIPE_SHARED") else {
            #[expect(clippy::print_stderr, reason = "a test says why it skips")]
            {
                eprintln!("skipped: PEFTPIPE_SHARED is not set");
            }
            return None;
        };
        let path = PathBuf::from(shared).join("models/configs").join(name);
        let text = std::fs::read_to_string(&path).expect("reading the shared config");
        let json: Value = serde_json::from_str(&text).expect("the shared config is JSON");
        Some(ModelConfig::from_json(&json).expect("the shared config parses"))
    }

    #[test]
    fn the_linear_share_of_llama_bases_is_about_a_quarter_of_bf16_with_double_quant() {
        for (name, total_low, total_high) in [
            ("llama-3.2-1b.config.json", 0.40, 0.50),
            ("llama-3.1-8b.config.json", 0.33, 0.38),
        ] {
            let Some(config) = shared_config(name) else {
                return;
            };
            let double = base_memory(&config, &QuantConfig::default()).expect("counts fit");
            let plain = base_memory(
                &config,
                &QuantConfig {
                    double_quant: false,
                    ..QuantConfig::default()
                },
            )
            .expect("counts fit");
            // 4 bits + 8 bits per 64 values + 32 bits per 16 384 values = 4.127 bits per weight.
            assert!(
                (double.linear_ratio() - 0.2579).abs() < 0.0005,
                "{name}: {double:?}"
            );
            // 4 bits + 32 bits per 64 values = 4.5 bits per weight.
            assert!(
                (plain.linear_ratio() - 0.28125).abs() < 0.0005,
                "{name}: {plain:?}"
            );
            // Embeddings (and the untied head of the 8B) stay bf16.
            assert!(
                (total_low..total_high).contains(&double.total_ratio()),
                "{name}: total ratio {}",
                double.total_ratio()
            );
        }
    }

    #[test]
    fn the_base_quantization_record_round_trips_and_names_bad_fields() {
        let record = BaseQuantization {
            config: QuantConfig {
                quant_type: QuantType::Fp4,
                block_size: 128,
                double_quant: false,
            },
            compute_dtype: Some(DType::BF16),
            prequantized: false,
        };
        assert_eq!(BaseQuantization::from_json(&record.to_json()), Ok(record));
        let default = BaseQuantization {
            config: QuantConfig::default(),
            compute_dtype: None,
            prequantized: false,
        };
        assert_eq!(BaseQuantization::from_json(&default.to_json()), Ok(default));
        // A 16-bit base quantized at load writes no `prequantized` (records from before it
        // existed read the same); a pre-quantized one writes `true`.
        assert!(default.to_json().get("prequantized").is_none());
        let stored = BaseQuantization {
            prequantized: true,
            ..default
        };
        assert_eq!(stored.to_json()["prequantized"], true);
        assert_eq!(BaseQuantization::from_json(&stored.to_json()), Ok(stored));
        for (json, field) in [
            (
                serde_json::json!({"double_quant": true, "block_size": 64}),
                "quant_type",
            ),
            (
                serde_json::json!({"quant_type": "int4", "double_quant": true, "block_size": 64}),
                "quant_type",
            ),
            (
                serde_json::json!({"quant_type": "nf4", "double_quant": true, "block_size": 100}),
                "`block_size` must be a power of two from 64 to 4096",
            ),
            (
                serde_json::json!({"quant_type": "fp4", "double_quant": false, "block_size": 32}),
                "`block_size` must be a power of two from 64 to 4096",
            ),
            (
                serde_json::json!({"quant_type": "nf4", "double_quant": true, "block_size": 32, "prequantized": true}),
                "`block_size` must be a power of two from 64 to 4096",
            ),
            (
                serde_json::json!({"quant_type": "nf4", "double_quant": true, "block_size": 64, "compute_dtype": "f64"}),
                "compute_dtype",
            ),
            (
                serde_json::json!({"quant_type": "nf4", "double_quant": true, "block_size": 64, "prequantized": "yes"}),
                "prequantized",
            ),
        ] {
            let error = BaseQuantization::from_json(&json).unwrap_err();
            assert!(error.contains(field), "{json}: {error}");
        }
    }

    #[test]
    fn the_quantizing_factory_stores_linears_in_4_bits_and_leaves_the_head() {
        use crate::models::FrozenLinearFactory;
        let factory = QuantizingFactory::new(
            FrozenLinearFactory,
            BaseQuantization {
                config: QuantConfig::default(),
                compute_dtype: Some(DType::F32),
                prequantized: false,
            },
        );
        let weight = Tensor::randn(0f32, 0.1, (8, 64), &Device::Cpu).unwrap();
        let x = Tensor::randn(0f32, 1.0, (3, 64), &Device::Cpu).unwrap();
        let base = LinearWeights {
            weight: weight.clone(),
            bias: None,
        };
        let layer = factory
            .build("model.layers.0.mlp.up_proj", base.clone())
            .unwrap();
        let head = factory.build("lm_head", base).unwrap();
        let expected = x
            .matmul(
                &factory
                    .quantization()
                    .round_trip(&weight)
                    .unwrap()
                    .t()
                    .unwrap(),
            )
            .unwrap();
        let got = layer.forward(&x).unwrap();
        let difference = got
            .sub(&expected)
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert!(difference < 1e-5, "{difference}");
        assert!(
            head.frozen_weight().is_some(),
            "lm_head stays a dense layer"
        );
        let layers = factory.quantized_layers();
        assert_eq!(
            layers.shapes.keys().collect::<Vec<_>>(),
            ["model.layers.0.mlp.up_proj.weight"]
        );
        assert_eq!(layers.load_dtype, Some(DType::F32));
    }

    #[test]
    fn a_4bit_layer_computes_in_its_compute_dtype_and_returns_the_input_dtype() {
        let weight = Tensor::randn(0f32, 0.1, (8, 64), &Device::Cpu).unwrap();
        let quantized = QuantizedTensor::from_tensor(&weight, &QuantConfig::default()).unwrap();
        let layer = |compute_dtype| QuantizedLinearWeights {
            weight: QuantizedWeight::new(&quantized, &Device::Cpu).unwrap(),
            bias: Some(Tensor::ones(8, DType::F32, &Device::Cpu).unwrap()),
            compute_dtype,
        };
        let x = Tensor::randn(0f32, 1.0, (3, 64), &Device::Cpu).unwrap();
        let dense = quantized.dequantize(DType::F32, &Device::Cpu).unwrap();
        let in_f32 = layer(DType::F32).forward(&x).unwrap();
        let in_bf16 = layer(DType::BF16).forward(&x).unwrap();
        assert_eq!((in_f32.dtype(), in_bf16.dtype()), (DType::F32, DType::F32));
        // bf16 compute: the input and weight rounded to bf16, the product returned as f32.
        let expected = x
            .to_dtype(DType::BF16)
            .unwrap()
            .matmul(&dense.to_dtype(DType::BF16).unwrap().t().unwrap())
            .unwrap()
            .to_dtype(DType::F32)
            .unwrap()
            .affine(1.0, 1.0)
            .unwrap();
        let max = |t: Tensor| {
            t.abs()
                .unwrap()
                .max_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap()
        };
        assert_eq!(max(in_bf16.sub(&expected).unwrap()), 0.0);
        assert!(
            max(in_bf16.sub(&in_f32).unwrap()) > 0.0,
            "bf16 compute changed nothing"
        );
    }

    #[test]
    fn only_decoder_block_matrices_are_quantized() {
        assert!(is_quantized_linear(
            "model.layers.3.mlp.down_proj.weight",
            &[16, 24]
        ));
        assert!(!is_quantized_linear(
            "model.layers.3.input_layernorm.weight",
            &[16]
        ));
        assert!(!is_quantized_linear("model.embed_tokens.weight", &[40, 16]));
        assert!(!is_quantized_linear("lm_head.weight", &[40, 16]));
        assert!(!is_quantized_linear(
            "model.layers.0.self_attn.q_proj.bias",
            &[16]
        ));
    }
}
