//! The one writer of model checkpoints in Hugging Face layout: a base model folder copied tensor by
//! tensor with per-tensor [`WeightPatch`]es applied (the merged export of any mergeable PEFT
//! method), in the base checkpoint's dtypes or one asked for, in one `model.safetensors` or in
//! transformers' shards with `model.safetensors.index.json`; config (dtype updated), tokenizer and
//! generation files copied.
//!
//! The writer streams the base checkpoint tensor by tensor (a patched tensor goes through f32 and
//! back to its dtype), so memory stays near one tensor, whatever the model size. Patches come from
//! the adapter (`peft::Adapter::merge_patches`); this module knows nothing of PEFT methods or
//! pipelines and never prints. The other writers of merged models (`gguf`, `quantized_writer`)
//! take the merge from [`visit_merged_tensors`] and the shared parts of a model folder from here
//! (float conversions, the safetensors header, shard names, config and tokenizer files).

use std::collections::BTreeMap;
use std::fs::{self, File};
use std::io::{BufWriter, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use candle_core::{DType, Device, Tensor};
use safetensors::tensor::{Metadata, TensorInfo};
use safetensors::Dtype;
use serde_json::Value;

use super::ModelDir;

/// Why writing a checkpoint failed.
#[derive(Debug, thiserror::Error)]
pub enum CheckpointError {
    /// Bad input: a base folder or patch that does not fit (the message names it).
    #[error("{0}")]
    Invalid(String),
    /// Reading or writing files.
    #[error(transparent)]
    Io(#[from] std::io::Error),
    /// The caller's cancel check said stop.
    #[error("cancelled")]
    Cancelled,
    /// A broken invariant of this module.
    #[error("internal error: {0}")]
    Internal(String),
}

impl CheckpointError {
    pub fn invalid(message: impl Into<String>) -> Self {
        CheckpointError::Invalid(message.into())
    }
}

fn candle_error(error: candle_core::Error) -> CheckpointError {
    CheckpointError::Internal(error.to_string())
}

/// A function of a base weight (`[out, in]`, f32) giving the merged weight.
pub type WeightMap = Arc<dyn Fn(&Tensor) -> candle_core::Result<Tensor> + Send + Sync>;

/// How one weight changes: a function of the base weight in `[out, in]` layout, f32.
#[derive(Clone)]
pub enum PatchChange {
    /// `W' = W + Δ` with `Δ` `[out, in]` (f32).
    Add(Tensor),
    /// `W' = f(W)` (for merges that depend on the base weight: DoRA's norm, IA3's scaling).
    Map(WeightMap),
}

/// Which tensor of a module a patch changes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Parameter {
    /// `<module>.weight`.
    Weight,
    /// `<module>.bias` (a trained LayerNorm copy's).
    Bias,
}

impl Parameter {
    /// The tensor-name suffix after the module path.
    pub fn name(self) -> &'static str {
        match self {
            Parameter::Weight => "weight",
            Parameter::Bias => "bias",
        }
    }
}

/// A change to one tensor of a module: what a mergeable adapter yields per adapted layer (its
/// weight), or per trained copy of a module (PEFT's `modules_to_save`: a weight, a norm's bias).
#[derive(Clone)]
pub struct WeightPatch {
    /// The module path as Hugging Face names it (`model.layers.0.self_attn.q_proj`, `lm_head`).
    pub path: String,
    /// The module's tensor it changes.
    pub parameter: Parameter,
    /// `(out_features, in_features)` of the layer; 0 for a side the adapter does not know (an
    /// IA3 vector read from a file gives only one side), which the stored weight then decides.
    /// A vector (a norm's weight or bias, `[n]`) is patched as a one-column matrix: `(n, 1)`.
    pub dims: (usize, usize),
    pub change: PatchChange,
    /// Skipped where the base checkpoint has no such tensor (IA3's scaling of an output-side
    /// layer's bias, read from a folder without the model: the layer may have no bias).
    pub optional: bool,
}

impl std::fmt::Debug for WeightPatch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WeightPatch")
            .field("path", &self.path)
            .field("parameter", &self.parameter)
            .field("dims", &self.dims)
            .finish_non_exhaustive()
    }
}

impl WeightPatch {
    /// The tensor's name in a checkpoint: `<path>.weight` or `<path>.bias`.
    pub fn tensor_name(&self) -> String {
        format!("{}.{}", self.path, self.parameter.name())
    }

    /// The patched weight of `weight` (`[out, in]`, any float dtype), in f32.
    pub fn apply(&self, weight: &Tensor) -> candle_core::Result<Tensor> {
        let weight = weight.to_dtype(DType::F32)?;
        match &self.change {
            PatchChange::Add(delta) => {
                weight.add(&delta.to_dtype(DType::F32)?.to_device(weight.device())?)
            }
            PatchChange::Map(function) => function(&weight),
        }
    }
}

/// What writing the merged folder did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MergedFolder {
    pub merged_tensors: usize,
    /// Bytes of all weight files written.
    pub bytes: u64,
    /// Weight files written (1: `model.safetensors`; more: shards with an index).
    pub files: usize,
}

/// How the merged weights are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MergedOptions {
    /// Largest weight file in tensor bytes; a bigger model is sharded like transformers does.
    pub max_shard_size: u64,
    /// dtype of the floating-point tensors (None: each keeps the base checkpoint's).
    pub dtype: Option<DType>,
}

/// The safetensors dtype of a float dtype, and the name transformers gives it in config.json.
pub(super) fn safetensors_dtype(dtype: DType) -> Result<(Dtype, &'static str), CheckpointError> {
    match dtype {
        DType::F32 => Ok((Dtype::F32, "float32")),
        DType::BF16 => Ok((Dtype::BF16, "bfloat16")),
        DType::F16 => Ok((Dtype::F16, "float16")),
        other => Err(CheckpointError::invalid(format!(
            "cannot write a checkpoint in {other:?}: use f32, bf16 or f16"
        ))),
    }
}

/// The index transformers writes beside sharded weights.
pub const SHARD_INDEX: &str = "model.safetensors.index.json";

/// Shard file names as transformers writes them: `model-00001-of-00003.safetensors`.
pub fn shard_name(index: usize, count: usize) -> String {
    format!("model-{:05}-of-{count:05}.safetensors", index + 1)
}

/// Split tensor sizes (in order) into shards of at most `max` bytes, as transformers'
/// `shard_checkpoint` does: a tensor that does not fit starts a new shard; one bigger than `max`
/// gets a shard of its own.
pub fn plan_shards(sizes: &[u64], max: u64) -> Vec<Vec<usize>> {
    let mut shards: Vec<Vec<usize>> = Vec::new();
    let mut current: Vec<usize> = Vec::new();
    let mut current_size = 0u64;
    for (index, &size) in sizes.iter().enumerate() {
        if !current.is_empty() && current_size + size > max {
            shards.push(std::mem::take(&mut current));
            current_size = 0;
        }
        current.push(index);
        current_size += size;
    }
    if !current.is_empty() || shards.is_empty() {
        shards.push(current);
    }
    shards
}

/// One tensor of a safetensors file: where its bytes are.
#[derive(Debug, Clone)]
struct SourceTensor {
    file: PathBuf,
    dtype: Dtype,
    shape: Vec<usize>,
    /// Absolute byte range in `file`.
    start: u64,
    end: u64,
}

/// Every tensor of a model folder (single file or sharded index), from its safetensors headers
/// as `models::ModelDir` reads them.
fn read_checkpoint_index(
    base: &ModelDir,
) -> Result<BTreeMap<String, SourceTensor>, CheckpointError> {
    let infos = base
        .tensor_infos()
        .map_err(|error| CheckpointError::invalid(error.to_string()))?;
    let mut tensors = BTreeMap::new();
    for (name, info) in infos {
        let dtype: Dtype =
            serde_json::from_value(Value::String(info.dtype.clone())).map_err(|_| {
                CheckpointError::invalid(format!(
                    "{}: tensor `{name}` has the unknown dtype `{}`",
                    info.file.display(),
                    info.dtype
                ))
            })?;
        tensors.insert(
            name,
            SourceTensor {
                file: info.file,
                dtype,
                shape: info.shape,
                start: info.start,
                end: info.end,
            },
        );
    }
    Ok(tensors)
}

/// The checkpoint tensor name of a module's weight (GPT-2 checkpoints may omit `transformer.`).
fn weight_name(
    tensors: &BTreeMap<String, SourceTensor>,
    path: &str,
    parameter: Parameter,
) -> Option<String> {
    let direct = format!("{path}.{}", parameter.name());
    if tensors.contains_key(&direct) {
        return Some(direct);
    }
    let short = path.strip_prefix("transformer.")?;
    let short = format!("{short}.{}", parameter.name());
    tensors.contains_key(&short).then_some(short)
}

/// candle's dtype of a float safetensors dtype.
fn candle_dtype(dtype: Dtype) -> Option<DType> {
    match dtype {
        Dtype::F32 => Some(DType::F32),
        Dtype::F16 => Some(DType::F16),
        Dtype::BF16 => Some(DType::BF16),
        Dtype::F64 => Some(DType::F64),
        _ => None,
    }
}

fn element_size(dtype: Dtype) -> Option<usize> {
    match dtype {
        Dtype::F32 => Some(4),
        Dtype::F16 | Dtype::BF16 => Some(2),
        Dtype::F64 => Some(8),
        _ => None,
    }
}

pub(super) fn bytes_to_f32(dtype: Dtype, bytes: &[u8]) -> Option<Vec<f32>> {
    Some(match dtype {
        Dtype::F32 => bytes
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect(),
        Dtype::F16 => bytes
            .chunks_exact(2)
            .map(|c| half::f16::from_le_bytes([c[0], c[1]]).to_f32())
            .collect(),
        Dtype::BF16 => bytes
            .chunks_exact(2)
            .map(|c| half::bf16::from_le_bytes([c[0], c[1]]).to_f32())
            .collect(),
        Dtype::F64 => bytes
            .chunks_exact(8)
            .map(|c| f64::from_le_bytes([c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7]]) as f32)
            .collect(),
        _ => return None,
    })
}

pub(super) fn f32_to_bytes(dtype: Dtype, values: &[f32]) -> Vec<u8> {
    let mut out = Vec::with_capacity(values.len() * element_size(dtype).unwrap_or(4));
    for &value in values {
        match dtype {
            Dtype::F16 => out.extend(half::f16::from_f32(value).to_le_bytes()),
            Dtype::BF16 => out.extend(half::bf16::from_f32(value).to_le_bytes()),
            Dtype::F64 => out.extend(f64::from(value).to_le_bytes()),
            _ => out.extend(value.to_le_bytes()),
        }
    }
    out
}

/// A merge error about a tensor of the base checkpoint `file`, naming the file.
fn in_file(error: CheckpointError, file: &Path) -> CheckpointError {
    match error {
        CheckpointError::Invalid(message) => {
            CheckpointError::invalid(format!("{}: {message}", file.display()))
        }
        other => other,
    }
}

/// The patched values of one stored weight: brought to `[out, in]` (transposed from Conv1D's
/// `[in, out]` for GPT-2), patched in f32, and back to the stored layout.
fn patched_values(
    patch: &WeightPatch,
    stored_shape: &[usize],
    values: Vec<f32>,
    fan_in_fan_out: bool,
) -> Result<Vec<f32>, CheckpointError> {
    let side = |wanted: usize, stored: usize| wanted == 0 || wanted == stored;
    // A vector (a norm's weight or bias) is a one-column matrix.
    let matrix_shape = match stored_shape {
        [length] => [*length, 1],
        [rows, columns] => [*rows, *columns],
        _ => [0, 0],
    };
    let (linear, conv1d) = match stored_shape {
        [rows, columns] => (
            side(patch.dims.0, *rows) && side(patch.dims.1, *columns),
            side(patch.dims.1, *rows) && side(patch.dims.0, *columns),
        ),
        [length] => (side(patch.dims.0, *length) && side(patch.dims.1, 1), false),
        _ => (false, false),
    };
    let transpose = match (linear, conv1d) {
        (true, true) => fan_in_fan_out,
        (false, true) => true,
        (true, false) => false,
        (false, false) => {
            return Err(CheckpointError::invalid(format!(
                "module `{}`: the base weight has shape {stored_shape:?}, the adapter expects \
                 [{}, {}]: the adapter was trained on another model",
                patch.path, patch.dims.0, patch.dims.1
            )))
        }
    };
    let (out_features, in_features) = if transpose {
        (matrix_shape[1], matrix_shape[0])
    } else {
        (matrix_shape[0], matrix_shape[1])
    };
    let stored = Tensor::from_vec(values, &matrix_shape, &Device::Cpu).map_err(candle_error)?;
    let weight = if transpose {
        stored.t().map_err(candle_error)?
    } else {
        stored
    };
    let patched = patch.apply(&weight).map_err(|error| {
        CheckpointError::invalid(format!("merging into `{}`: {error}", patch.path))
    })?;
    if patched.dims() != [out_features, in_features] {
        return Err(CheckpointError::Internal(format!(
            "the patch of `{}` gave shape {:?}, not [{out_features}, {in_features}]",
            patch.path,
            patched.dims()
        )));
    }
    let patched = if transpose {
        patched.t().map_err(candle_error)?
    } else {
        patched
    };
    patched
        .to_device(&Device::Cpu)
        .and_then(|d| d.contiguous())
        .and_then(|d| d.flatten_all())
        .and_then(|d| d.to_vec1::<f32>())
        .map_err(candle_error)
}

/// One tensor of the merged output: where it comes from, the patch applied to it, and its
/// output dtype and byte size.
struct OutputTensor<'a> {
    name: &'a str,
    source: &'a SourceTensor,
    patch: Option<&'a WeightPatch>,
    dtype: Dtype,
    size: u64,
}

/// Reads tensor bytes from the base checkpoint, keeping the last file open.
#[derive(Default)]
struct SourceReader {
    open: Option<(PathBuf, File)>,
}

impl SourceReader {
    fn read(&mut self, name: &str, tensor: &SourceTensor) -> Result<Vec<u8>, CheckpointError> {
        if self
            .open
            .as_ref()
            .is_none_or(|(path, _)| path != &tensor.file)
        {
            self.open = Some((tensor.file.clone(), File::open(&tensor.file)?));
        }
        let Some((_, file)) = self.open.as_mut() else {
            return Err(CheckpointError::Internal("no open checkpoint file".into()));
        };
        let mut bytes = vec![0u8; (tensor.end - tensor.start) as usize];
        file.seek(SeekFrom::Start(tensor.start))?;
        file.read_exact(&mut bytes).map_err(|error| {
            CheckpointError::invalid(format!(
                "{}: cannot read tensor `{name}`: {error}",
                tensor.file.display()
            ))
        })?;
        Ok(bytes)
    }
}

/// The output bytes of one tensor: the source bytes as they are, or converted through f32 (to
/// merge W + scale·B·A and/or change the dtype).
fn output_bytes(
    entry: &OutputTensor<'_>,
    source_bytes: Vec<u8>,
    fan_in_fan_out: bool,
) -> Result<Vec<u8>, CheckpointError> {
    let source = entry.source;
    if entry.patch.is_none() && entry.dtype == source.dtype {
        return Ok(source_bytes);
    }
    let mut values = bytes_to_f32(source.dtype, &source_bytes).ok_or_else(|| {
        CheckpointError::invalid(format!(
            "cannot merge into or convert `{}`: its dtype {:?} is not a float type (quantized bases are merged by dequantizing first)",
            entry.name, source.dtype
        ))
    })?;
    if let Some(patch) = entry.patch {
        let expected = values.len();
        values = patched_values(patch, &source.shape, values, fan_in_fan_out)
            .map_err(|error| in_file(error, &source.file))?;
        if values.len() != expected {
            return Err(CheckpointError::Internal(format!(
                "merge of `{}`: {} patched values for {expected} weights",
                entry.name,
                values.len(),
            )));
        }
    }
    Ok(f32_to_bytes(entry.dtype, &values))
}

/// The header of a safetensors file holding `tensors` (name and info, in file order):
/// the JSON with `{"format": "pt"}` metadata, padded with spaces to a multiple of 8 bytes, as
/// `safetensors.torch.save_file` writes it. The file is its length (u64, little-endian), the
/// header, then the tensors' bytes.
pub(super) fn safetensors_header(
    tensors: Vec<(String, TensorInfo)>,
) -> Result<Vec<u8>, CheckpointError> {
    let metadata = Metadata::new(
        Some(std::collections::HashMap::from([(
            "format".to_string(),
            "pt".to_string(),
        )])),
        tensors,
    )
    .map_err(|error| CheckpointError::Internal(format!("safetensors header: {error}")))?;
    let mut header = serde_json::to_vec(&metadata)
        .map_err(|error| CheckpointError::Internal(format!("safetensors header: {error}")))?;
    while header.len() % 8 != 0 {
        header.push(b' ');
    }
    Ok(header)
}

/// Write one safetensors file holding `tensors` (in order, `{"format": "pt"}` metadata), streamed
/// tensor by tensor. Returns how many tensors were patched.
fn write_shard(
    path: &Path,
    tensors: &[&OutputTensor<'_>],
    fan_in_fan_out: bool,
    reader: &mut SourceReader,
    cancelled: &dyn Fn() -> bool,
) -> Result<usize, CheckpointError> {
    let mut infos = Vec::with_capacity(tensors.len());
    let mut offset = 0usize;
    for entry in tensors {
        let size = entry.size as usize;
        infos.push((
            entry.name.to_string(),
            TensorInfo {
                dtype: entry.dtype,
                shape: entry.source.shape.clone(),
                data_offsets: (offset, offset + size),
            },
        ));
        offset += size;
    }
    let header = safetensors_header(infos)?;
    let mut writer = BufWriter::new(File::create(path)?);
    writer.write_all(&(header.len() as u64).to_le_bytes())?;
    writer.write_all(&header)?;
    let mut merged = 0;
    for entry in tensors {
        if cancelled() {
            return Err(CheckpointError::Cancelled);
        }
        let source_bytes = reader.read(entry.name, entry.source)?;
        let bytes = output_bytes(entry, source_bytes, fan_in_fan_out)?;
        if bytes.len() as u64 != entry.size {
            return Err(CheckpointError::Internal(format!(
                "`{}`: {} bytes written for a declared {}",
                entry.name,
                bytes.len(),
                entry.size
            )));
        }
        merged += usize::from(entry.patch.is_some());
        writer.write_all(&bytes)?;
    }
    writer.flush()?;
    writer
        .into_inner()
        .map_err(|error| {
            CheckpointError::invalid(format!("cannot write {}: {error}", path.display()))
        })?
        .sync_all()?;
    Ok(merged)
}

/// Output name → (source tensor, optional patch applied to it) of a merge, and whether adapting a
/// tied `lm_head` unties it from the embeddings (it is then written as `lm_head.weight`).
type MergePlan<'a> = BTreeMap<String, (SourceTensor, Option<&'a WeightPatch>)>;

/// Which base tensor each output tensor comes from and which patch applies to it.
fn merge_plan<'a>(
    patches: &'a [WeightPatch],
    source: &BTreeMap<String, SourceTensor>,
    tied: bool,
    base_dir: &Path,
) -> Result<(MergePlan<'a>, bool), CheckpointError> {
    let mut plan: MergePlan<'a> = source
        .iter()
        .map(|(name, tensor)| (name.clone(), (tensor.clone(), None)))
        .collect();
    let mut untie = false;
    for pair in patches {
        let head = pair.path == "lm_head" && pair.parameter == Parameter::Weight;
        if let Some(name) = weight_name(source, &pair.path, pair.parameter) {
            plan.insert(name.clone(), (source[&name].clone(), Some(pair)));
            // A tied checkpoint may store `lm_head.weight` too (stories260k does); loaders
            // ignore it while the config says tied, so a patched head must untie them.
            untie |= head && tied;
        } else if head && tied {
            // The head is the embedding matrix; adapting it unties them.
            let embedding = ["model.embed_tokens.weight", "transformer.wte.weight", "wte.weight"]
                .into_iter()
                .find(|name| source.contains_key(*name))
                .ok_or_else(|| {
                    CheckpointError::invalid("the adapter targets lm_head, but the base model has neither lm_head.weight nor a known embedding to tie it to")
                })?;
            plan.insert(
                "lm_head.weight".into(),
                (source[embedding].clone(), Some(pair)),
            );
            untie = true;
        } else if pair.optional {
            continue;
        } else {
            return Err(CheckpointError::invalid(format!(
                "the adapter adapts `{}`, but the base model in {} has no tensor `{}`",
                pair.path,
                base_dir.display(),
                pair.tensor_name()
            )));
        }
    }
    // A tied checkpoint that also stores its embedding as `lm_head.weight` (stories260k does, for
    // loaders without tying): while the head stays tied, that copy follows a patched embedding.
    // transformers 5 unties a stored copy that differs from the embedding, so a stale copy would
    // give it the base head (trainable token rows of a tied model, measured 3.5 logits off).
    if tied && !untie && source.contains_key("lm_head.weight") {
        let embedding_patch = [
            "model.embed_tokens.weight",
            "transformer.wte.weight",
            "wte.weight",
        ]
        .into_iter()
        .find_map(|name| plan.get(name).and_then(|(_, patch)| *patch));
        if let Some(patch) = embedding_patch {
            plan.insert(
                "lm_head.weight".into(),
                (source["lm_head.weight"].clone(), Some(patch)),
            );
        }
    }
    Ok((plan, untie))
}

/// One tensor of a merged model in f32: its checkpoint name, shape (as stored) and values.
#[derive(Debug, Clone)]
pub struct MergedTensor {
    pub name: String,
    pub shape: Vec<usize>,
    /// The dtype the checkpoint stores it in (the values are exact in `f32` for all but `F64`).
    pub dtype: DType,
    pub values: Vec<f32>,
    /// Whether a patch changed it.
    pub patched: bool,
}

/// Visit every tensor of the merged model (each base tensor with its patch applied; `lm_head.weight`
/// too when a patch of a tied head unties it), in f32 and name order, one at a time, so memory
/// stays near one tensor. The tensors keep the checkpoint's names and stored layouts (GPT-2's
/// Conv1D weights stay `[in, out]`). Returns the base folder's config.json with
/// `tie_word_embeddings` false where the merge untied the head.
pub fn visit_merged_tensors(
    patches: &[WeightPatch],
    base_dir: &Path,
    cancelled: &dyn Fn() -> bool,
    mut visit: impl FnMut(MergedTensor) -> Result<(), CheckpointError>,
) -> Result<Value, CheckpointError> {
    let base =
        ModelDir::open(base_dir).map_err(|error| CheckpointError::invalid(error.to_string()))?;
    let source = read_checkpoint_index(&base)?;
    let mut config = base.config_json().clone();
    let fan_in_fan_out = base.config().model_type() == "gpt2";
    // As the loader reads it (a Llama config without the key is untied, a GPT-2 one tied).
    let tied = base.config().tie_word_embeddings();
    let (plan, untie) = merge_plan(patches, &source, tied, base_dir)?;
    if let (true, Value::Object(map)) = (untie, &mut config) {
        map.insert("tie_word_embeddings".into(), Value::Bool(false));
    }
    let mut reader = SourceReader::default();
    for (name, (tensor, patch)) in &plan {
        if cancelled() {
            return Err(CheckpointError::Cancelled);
        }
        let bytes = reader.read(name, tensor)?;
        let mut values = bytes_to_f32(tensor.dtype, &bytes).ok_or_else(|| {
            CheckpointError::invalid(format!(
                "{}: tensor `{name}` has dtype {:?}, not a float type",
                tensor.file.display(),
                tensor.dtype
            ))
        })?;
        if let Some(patch) = patch {
            values = patched_values(patch, &tensor.shape, values, fan_in_fan_out)
                .map_err(|error| in_file(error, &tensor.file))?;
        }
        visit(MergedTensor {
            name: name.clone(),
            shape: tensor.shape.clone(),
            dtype: candle_dtype(tensor.dtype).ok_or_else(|| {
                CheckpointError::Internal(format!("`{name}`: {:?} read as floats", tensor.dtype))
            })?,
            values,
            patched: patch.is_some(),
        })?;
    }
    Ok(config)
}

/// Write the merged model folder: every base tensor under its original name (in its original
/// dtype unless `options.dtype` asks for another), each patched weight as its patch says, in one
/// `model.safetensors` or, above `options.max_shard_size`, in transformers' shards with
/// `model.safetensors.index.json`; config (dtype updated), tokenizer and generation files copied.
pub fn write_merged_folder(
    patches: &[WeightPatch],
    base_dir: &Path,
    out: &Path,
    options: MergedOptions,
    cancelled: &dyn Fn() -> bool,
) -> Result<MergedFolder, CheckpointError> {
    // Start empty: weight files of an earlier layout (one file vs shards) must not linger.
    if out.exists() {
        fs::remove_dir_all(out)?;
    }
    fs::create_dir_all(out)?;
    let base =
        ModelDir::open(base_dir).map_err(|error| CheckpointError::invalid(error.to_string()))?;
    let source = read_checkpoint_index(&base)?;
    let mut config = base.config_json().clone();
    let fan_in_fan_out = base.config().model_type() == "gpt2";
    let wanted_dtype = options.dtype.map(safetensors_dtype).transpose()?;
    // As the loader reads it (a Llama config without the key is untied, a GPT-2 one tied).
    let tied = base.config().tie_word_embeddings();

    let (plan, untie) = merge_plan(patches, &source, tied, base_dir)?;
    if untie {
        if let Value::Object(map) = &mut config {
            map.insert("tie_word_embeddings".into(), Value::Bool(false));
        }
    }

    // Every output tensor with its dtype and size, in name order.
    let entries: Vec<OutputTensor> = plan
        .iter()
        .map(|(name, (source, patch))| {
            let dtype = match wanted_dtype {
                Some((wanted, _)) if element_size(source.dtype).is_some() => wanted,
                _ => source.dtype,
            };
            let size = match element_size(dtype) {
                Some(bytes) if dtype != source.dtype => {
                    source.shape.iter().product::<usize>() as u64 * bytes as u64
                }
                _ => source.end - source.start,
            };
            OutputTensor {
                name,
                source,
                patch: *patch,
                dtype,
                size,
            }
        })
        .collect();
    let sizes: Vec<u64> = entries.iter().map(|entry| entry.size).collect();
    let total_size: u64 = sizes.iter().sum();
    let shards = if total_size <= options.max_shard_size {
        vec![(0..entries.len()).collect()]
    } else {
        plan_shards(&sizes, options.max_shard_size)
    };
    let mut reader = SourceReader::default();
    let mut merged_tensors = 0;
    let mut bytes = 0;
    let mut weight_map = serde_json::Map::new();
    for (index, members) in shards.iter().enumerate() {
        let file_name = if shards.len() == 1 {
            "model.safetensors".to_string()
        } else {
            shard_name(index, shards.len())
        };
        let shard: Vec<&OutputTensor> = members.iter().map(|&member| &entries[member]).collect();
        for entry in &shard {
            weight_map.insert(entry.name.to_string(), Value::String(file_name.clone()));
        }
        let path = out.join(&file_name);
        merged_tensors += write_shard(&path, &shard, fan_in_fan_out, &mut reader, cancelled)?;
        bytes += fs::metadata(&path)?.len();
    }
    if shards.len() > 1 {
        let index = serde_json::json!({
            "metadata": {"total_size": total_size},
            "weight_map": weight_map,
        });
        write_json(&out.join(SHARD_INDEX), &index)?;
    }
    if let Some((_, torch_name)) = wanted_dtype {
        set_config_dtype(&mut config, torch_name);
    }
    write_model_files(base_dir, out, &config)?;
    Ok(MergedFolder {
        merged_tensors,
        bytes,
        files: shards.len(),
    })
}

/// Set config.json's dtype to `torch_name` (`bfloat16`, …) after converting the weights.
pub(super) fn set_config_dtype(config: &mut Value, torch_name: &str) {
    if let Value::Object(map) = config {
        // transformers < 4.56 reads `torch_dtype`, later versions `dtype`: keep both in step.
        let name = Value::String(torch_name.to_string());
        if map.contains_key("dtype") {
            map.insert("dtype".into(), name.clone());
        }
        map.insert("torch_dtype".into(), name);
    }
}

/// Write the files of a model folder beside its weights: `config`, the tokenizer and generation
/// files the base folder has, and a generation_config.json from config.json's token ids where the
/// base has none.
pub(super) fn write_model_files(
    base_dir: &Path,
    out: &Path,
    config: &Value,
) -> Result<(), CheckpointError> {
    write_json(&out.join("config.json"), config)?;
    for file in crate::config::train::TOKENIZER_FILES {
        let from = base_dir.join(file);
        if from.is_file() {
            fs::copy(&from, out.join(file)).map_err(|error| {
                CheckpointError::invalid(format!("cannot copy {}: {error}", from.display()))
            })?;
        }
    }
    if !out.join("generation_config.json").is_file() {
        let mut generation = serde_json::Map::new();
        for key in ["bos_token_id", "eos_token_id", "pad_token_id"] {
            if let Some(value) = config.get(key).filter(|v| !v.is_null()) {
                generation.insert(key.into(), value.clone());
            }
        }
        write_json(
            &out.join("generation_config.json"),
            &Value::Object(generation),
        )?;
    }
    Ok(())
}

/// Write pretty JSON with a trailing newline.
pub(super) fn write_json(path: &Path, value: &Value) -> Result<(), CheckpointError> {
    let mut text = serde_json::to_string_pretty(value).map_err(|error| {
        CheckpointError::Internal(format!("serializing {}: {error}", path.display()))
    })?;
    text.push('\n');
    fs::write(path, text)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shards_are_cut_like_transformers() {
        assert_eq!(plan_shards(&[4, 4, 4], 8), vec![vec![0, 1], vec![2]]);
        // A tensor larger than the limit gets a shard of its own.
        assert_eq!(
            plan_shards(&[2, 20, 2, 2], 5),
            vec![vec![0], vec![1], vec![2, 3]]
        );
        assert_eq!(plan_shards(&[], 5), vec![Vec::<usize>::new()]);
        assert_eq!(shard_name(0, 3), "model-00001-of-00003.safetensors");
    }

    #[test]
    fn float_conversions_round_trip() {
        let values = [1.5f32, -2.25, 0.0, 1e-3];
        for dtype in [Dtype::F32, Dtype::F16, Dtype::BF16, Dtype::F64] {
            let bytes = f32_to_bytes(dtype, &values);
            assert_eq!(bytes.len(), values.len() * element_size(dtype).unwrap());
            let back = bytes_to_f32(dtype, &bytes).unwrap();
            for (a, b) in values.iter().zip(&back) {
                assert!(
                    (a - b).abs() <= 1e-2 * a.abs().max(1e-3),
                    "{dtype:?}: {a} vs {b}"
                );
            }
        }
        assert!(bytes_to_f32(Dtype::I64, &[0; 8]).is_none());
    }
}
