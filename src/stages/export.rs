//! The `export` stage: builds, in its artifact, (a) `adapter/` — the trained LoRA adapter as a PEFT
//! folder (adapter_config.json, adapter_model.safetensors with PEFT's tensor names, a README.md
//! model card) and/or (b) `merged/` — the base model with the adapter merged in, in Hugging Face
//! layout (config.json, model.safetensors with the base checkpoint's tensor names and dtypes,
//! tokenizer files, generation_config.json). [`Stage::publish`] then copies each folder to its
//! declared destination atomically (temp folder + rename), also when restored from the cache.
//!
//! The merge streams the base checkpoint tensor by tensor (W' = W + scale·B·A in f32, cast back to
//! the tensor's dtype), so memory stays near one tensor, whatever the model size. This module must
//! not train, print, or write outside `ctx.out_dir` except through `publish`.

use std::collections::BTreeMap;
use std::fs::{self, File};
use std::io::{BufWriter, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use candle_core::Device;
use safetensors::tensor::{Metadata, TensorInfo};
use safetensors::Dtype;
use serde_json::Value;

use crate::config::export::{parse_size, ExportDtype, DEFAULT_MAX_SHARD_SIZE};
use crate::config::ExportConfig;
use crate::models::ModelDir;
use crate::peft::{LoraFile, LoraPair};

use super::{Progress, Stage, StageContext, StageError, StageOutcome};

/// Name of the marker file that says a destination folder was written by `peftpipe export`
/// (only such folders, or empty ones, are ever replaced).
pub const EXPORT_MARKER: &str = ".peftpipe-export.json";

/// Tokenizer and generation files copied into a merged model folder when the base has them.
const TOKENIZER_FILES: &[&str] = &[
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "added_tokens.json",
    "chat_template.jinja",
    "chat_template.json",
    "generation_config.json",
];

pub struct ExportStage {
    config: ExportConfig,
}

impl ExportStage {
    pub fn new(config: ExportConfig) -> Self {
        ExportStage { config }
    }

    /// The declared destinations: (artifact subfolder, destination as written).
    fn destinations(&self) -> Vec<(&'static str, &str)> {
        self.config.destinations()
    }

    /// `base_model_name_or_path` in the artifact (content-addressed, shared by every checkout):
    /// the user's setting, the Hub id, else the model as written in the pipeline.
    fn cached_base_name(&self, base: &BaseModelRecord) -> String {
        match &self.config.base_model_name_or_path {
            Some(name) => name.clone(),
            None => base.portable_name(),
        }
    }

    /// `base_model_name_or_path` in a published adapter, decided when publishing (never
    /// cached): the user's setting, the Hub id, else the base model folder resolved for this
    /// checkout (falling back to the model as written when it is not on this machine).
    fn published_base_name(&self, ctx: &StageContext<'_>) -> Result<String, StageError> {
        if let Some(name) = &self.config.base_model_name_or_path {
            return Ok(name.clone());
        }
        let record = read_json(&ctx.upstream_dir(&self.config.from)?.join("base_model.json"))?;
        let model = record
            .get("model")
            .and_then(Value::as_str)
            .unwrap_or_default();
        if let Some(id) = hub_repo_id(model) {
            return Ok(id);
        }
        let resolved = crate::config::resolve_path(ctx.project_dir, model)
            .ok()
            .filter(|path| path.join("config.json").is_file())
            .map(|path| path.canonicalize().unwrap_or(path));
        Ok(match resolved {
            Some(path) => path.display().to_string(),
            None => model.to_string(),
        })
    }
}

/// The repository id of an `hf://org/name[@revision]` model (None: a local folder).
fn hub_repo_id(model: &str) -> Option<String> {
    let expanded = crate::config::expand_env(model).unwrap_or_else(|_| model.to_string());
    crate::config::hub::HubId::parse(&expanded)
        .ok()
        .flatten()
        .map(|id| id.repo_id)
}

impl Stage for ExportStage {
    fn run(&self, ctx: &StageContext<'_>) -> Result<StageOutcome, StageError> {
        let train_dir = ctx.upstream_dir(&self.config.from)?;
        let adapter_dir = train_dir.join("adapter");
        let adapter = read_adapter(&adapter_dir)?;
        let base = BaseModelRecord::read(train_dir, ctx.project_dir)?;
        let mut outcome = StageOutcome::default();
        outcome.summary.insert(
            "adapter_parameters".into(),
            adapter.parameter_count().into(),
        );
        let total_steps =
            u64::from(self.config.adapter.is_some()) + u64::from(self.config.merged.is_some());
        let mut done = 0;
        if self.config.adapter.is_some() {
            let out = ctx.out_dir.join("adapter");
            let name = self.cached_base_name(&base);
            write_adapter_folder(&adapter, &adapter_dir, &name, train_dir, &out)?;
            done += 1;
            ctx.progress.progress(Progress {
                position: done,
                length: Some(total_steps),
                unit: "folders",
                message: "adapter written".into(),
            });
        }
        ctx.check_cancel()?;
        if self.config.merged.is_some() {
            let out = ctx.out_dir.join("merged");
            let options = MergedOptions::from_config(&self.config)?;
            let merged =
                write_merged_folder(&adapter, &base.path, &out, options, &|| ctx.check_cancel())?;
            outcome
                .summary
                .insert("merged_tensors".into(), merged.merged_tensors.into());
            outcome
                .summary
                .insert("merged_bytes".into(), merged.bytes.into());
            outcome
                .summary
                .insert("merged_files".into(), merged.files.into());
            done += 1;
            ctx.progress.progress(Progress {
                position: done,
                length: Some(total_steps),
                unit: "folders",
                message: format!("merged {} weight matrices", merged.merged_tensors),
            });
        }
        for (kind, written) in self.destinations() {
            outcome
                .summary
                .insert(format!("{kind}_destination"), written.into());
        }
        Ok(outcome)
    }

    fn publish(&self, artifact: &Path, ctx: &StageContext<'_>) -> Result<(), StageError> {
        for (kind, written) in self.destinations() {
            let source = artifact.join(kind);
            if !source.is_dir() {
                return Err(StageError::Internal(format!(
                    "the export artifact has no `{kind}` folder to publish"
                )));
            }
            let destination =
                resolve_destination(ctx.project_dir, written, ctx.options.allow_outside_project)?;
            if kind == "adapter" {
                let name = self.published_base_name(ctx)?;
                let train_dir = ctx.upstream_dir(&self.config.from)?;
                publish_folder_with(&source, &destination, ctx.name, |folder| {
                    name_base_model(folder, &name, train_dir)
                })?;
            } else {
                publish_folder(&source, &destination, ctx.name)?;
            }
            ctx.progress
                .note(format!("published {kind} to {}", destination.display()));
        }
        Ok(())
    }
}

// ---------------------------------------------------------------------------------------------
// Destinations and atomic publishing
// ---------------------------------------------------------------------------------------------

/// Resolve a destination as written (env vars expanded, relative to the project directory) and
/// refuse one that leaves the project directory unless `allow_outside`: the one rule `validate`
/// applies too ([`crate::config::paths::confine_destination`]), checked again here because the
/// filesystem may have changed since.
pub fn resolve_destination(
    project_dir: &Path,
    written: &str,
    allow_outside: bool,
) -> Result<PathBuf, StageError> {
    crate::config::paths::confine_destination(project_dir, written, allow_outside)
        .map_err(StageError::User)
}

/// Copy `source` (a folder) to `destination`, replacing an earlier export there: the copy is
/// written to a temporary sibling folder first and renamed into place, so the destination is
/// never half written. A non-empty destination that peftpipe did not write is refused.
pub fn publish_folder(source: &Path, destination: &Path, stage: &str) -> Result<(), StageError> {
    publish_folder_with(source, destination, stage, |_| Ok(()))
}

/// [`publish_folder`], letting `finish` adjust the copy (in its temporary folder) before it is
/// moved into place.
pub fn publish_folder_with(
    source: &Path,
    destination: &Path,
    stage: &str,
    finish: impl FnOnce(&Path) -> Result<(), StageError>,
) -> Result<(), StageError> {
    let name = destination.file_name().ok_or_else(|| {
        StageError::user(format!(
            "export destination {} has no folder name",
            destination.display()
        ))
    })?;
    let parent = destination.parent().unwrap_or(Path::new("."));
    fs::create_dir_all(parent).map_err(|error| {
        StageError::user(format!("cannot create {}: {error}", parent.display()))
    })?;
    if let Ok(metadata) = fs::symlink_metadata(destination) {
        if !metadata.is_dir() {
            return Err(StageError::user(format!(
                "export destination {} exists and is not a folder",
                destination.display()
            )));
        }
        let is_empty = fs::read_dir(destination)?.next().is_none();
        if !is_empty && !destination.join(EXPORT_MARKER).is_file() {
            return Err(StageError::user(format!(
                "export destination {} already exists and was not written by peftpipe export; \
                 remove it or choose another folder",
                destination.display()
            )));
        }
    }
    let name = name.to_string_lossy();
    let temporary = tempfile::Builder::new()
        .prefix(&format!(".{name}.peftpipe-tmp-"))
        .tempdir_in(parent)
        .map_err(|error| {
            StageError::user(format!(
                "cannot create a temporary folder in {}: {error}",
                parent.display()
            ))
        })?;
    copy_tree(source, temporary.path())?;
    finish(temporary.path())?;
    let marker = serde_json::json!({
        "written_by": "peftpipe export",
        "stage": stage,
        "peftpipe_version": crate::TOOL_VERSION,
    });
    write_json(&temporary.path().join(EXPORT_MARKER), &marker)?;
    let staged = temporary.keep();
    let old = if destination.exists() {
        let old = parent.join(format!(
            ".{name}.peftpipe-old-{}",
            staged
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default()
        ));
        fs::rename(destination, &old).map_err(|error| {
            StageError::user(format!(
                "cannot move the old {} aside: {error}",
                destination.display()
            ))
        })?;
        Some(old)
    } else {
        None
    };
    if let Err(error) = fs::rename(&staged, destination) {
        // Put the old export back so the destination is left as it was.
        if let Some(old) = &old {
            let _ = fs::rename(old, destination);
        }
        let _ = fs::remove_dir_all(&staged);
        return Err(StageError::user(format!(
            "cannot move the export into {}: {error}",
            destination.display()
        )));
    }
    if let Some(old) = old {
        fs::remove_dir_all(&old).map_err(|error| {
            StageError::user(format!(
                "published, but cannot remove the previous export at {}: {error}",
                old.display()
            ))
        })?;
    }
    Ok(())
}

/// Copy a folder tree: regular files get fresh permissions (the cache's may be read-only);
/// symbolic links are refused (an artifact never contains them).
fn copy_tree(source: &Path, destination: &Path) -> Result<(), StageError> {
    fs::create_dir_all(destination)?;
    let mut entries: Vec<_> = fs::read_dir(source)?.collect::<Result<_, _>>()?;
    entries.sort_by_key(|entry| entry.file_name());
    for entry in entries {
        let kind = entry.file_type()?;
        let target = destination.join(entry.file_name());
        if kind.is_dir() {
            copy_tree(&entry.path(), &target)?;
        } else if kind.is_file() {
            let mut reader = File::open(entry.path())?;
            let mut writer = File::create(&target)?;
            std::io::copy(&mut reader, &mut writer).map_err(|error| {
                StageError::user(format!(
                    "cannot copy {} to {}: {error}",
                    entry.path().display(),
                    target.display()
                ))
            })?;
            writer.sync_all()?;
        } else {
            return Err(StageError::Internal(format!(
                "unexpected non-file {} in an export artifact",
                entry.path().display()
            )));
        }
    }
    Ok(())
}

fn write_json(path: &Path, value: &Value) -> Result<(), StageError> {
    let text = serde_json::to_string_pretty(value)
        .map_err(|error| StageError::Internal(format!("cannot encode JSON: {error}")))?;
    fs::write(path, text + "\n")
        .map_err(|error| StageError::user(format!("cannot write {}: {error}", path.display())))
}

fn read_json(path: &Path) -> Result<Value, StageError> {
    let text = fs::read_to_string(path)
        .map_err(|error| StageError::user(format!("cannot read {}: {error}", path.display())))?;
    serde_json::from_str(&text)
        .map_err(|error| StageError::user(format!("{} is not valid JSON: {error}", path.display())))
}

/// What a train artifact's `base_model.json` says about the base model.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BaseModelRecord {
    /// The model as written in the pipeline (e.g. `${PEFTPIPE_SHARED}/models/stories260k`).
    pub model: String,
    /// The model folder on this machine.
    pub path: PathBuf,
}

impl BaseModelRecord {
    /// Read `base_model.json` of a train artifact. A local model as written is resolved again
    /// against this project directory (the artifact may have been trained in another checkout,
    /// whose folder may still exist); the recorded `path` is the fallback, and the first choice
    /// for a Hub model (no cache lookup). When the record holds `config_digest`, the folder's
    /// config.json must still have it: the base model may not change under a trained adapter.
    pub fn read(train_dir: &Path, project_dir: &Path) -> Result<Self, StageError> {
        let file = train_dir.join("base_model.json");
        let value = read_json(&file)?;
        let text = |key: &str| value.get(key).and_then(Value::as_str);
        let model = text("model").unwrap_or_default().to_string();
        let has_config = |path: &PathBuf| path.join("config.json").is_file();
        let recorded = text("path").map(PathBuf::from).filter(has_config);
        let here = if model.is_empty() || hub_repo_id(&model).is_some() {
            None
        } else {
            crate::config::resolve_path(project_dir, &model)
                .ok()
                .filter(has_config)
        };
        let path = match here.or(recorded) {
            Some(path) => path,
            None if !model.is_empty() => crate::config::hub::resolve_model_dir(project_dir, &model)
                .map_err(|message| StageError::user(format!("{}: {message}", file.display())))?,
            None => {
                return Err(StageError::user(format!(
                    "{}: the base model folder it names is not on this machine",
                    file.display()
                )))
            }
        };
        if !path.join("config.json").is_file() {
            return Err(StageError::user(format!(
                "the base model folder {} (from {}) has no config.json",
                path.display(),
                file.display()
            )));
        }
        if let Some(expected) = text("config_digest") {
            let bytes = fs::read(path.join("config.json"))?;
            let actual = blake3::hash(&bytes).to_hex().to_string();
            if actual != expected {
                return Err(StageError::user(format!(
                    "the base model's config.json in {} changed since the adapter was trained \
                     (digest {actual}, trained with {expected}); rerun the train stage",
                    path.display()
                )));
            }
        }
        Ok(BaseModelRecord { model, path })
    }

    /// The base model named the same way on every machine: the Hub id for `hf://org/name`,
    /// else the model as written in the pipeline (e.g. `${PEFTPIPE_SHARED}/models/x`), which is
    /// what a cached artifact may hold. Published copies name the folder resolved at publish.
    pub fn portable_name(&self) -> String {
        hub_repo_id(&self.model).unwrap_or_else(|| self.model.clone())
    }
}

// ---------------------------------------------------------------------------------------------
// The LoRA adapter as PEFT stores it
// ---------------------------------------------------------------------------------------------

/// Read the trained adapter through `crate::peft` (the one reader of PEFT LoRA folders).
fn read_adapter(dir: &Path) -> Result<LoraFile, StageError> {
    LoraFile::read(dir, &Device::Cpu).map_err(|error| StageError::user(error.to_string()))
}

fn candle_error(error: candle_core::Error) -> StageError {
    StageError::Internal(error.to_string())
}

// ---------------------------------------------------------------------------------------------
// (a) The PEFT adapter folder
// ---------------------------------------------------------------------------------------------

/// Write the adapter's PEFT files (the weights byte for byte; the config with
/// `base_model_name_or_path` set to `base_name`) and a model card.
fn write_adapter_folder(
    adapter: &LoraFile,
    adapter_dir: &Path,
    base_name: &str,
    train_dir: &Path,
    out: &Path,
) -> Result<(), StageError> {
    fs::create_dir_all(out)?;
    let weights = adapter_dir.join("adapter_model.safetensors");
    fs::copy(&weights, out.join("adapter_model.safetensors"))
        .map_err(|error| StageError::user(format!("cannot copy {}: {error}", weights.display())))?;
    write_named_config_and_card(adapter, base_name, train_dir, out)
}

/// Write `adapter_config.json` (the adapter's config with `base_model_name_or_path`) and the
/// model card `README.md` into `out`.
fn write_named_config_and_card(
    adapter: &LoraFile,
    base_name: &str,
    train_dir: &Path,
    out: &Path,
) -> Result<(), StageError> {
    let mut config = adapter.config.clone();
    if let Value::Object(map) = &mut config {
        map.insert(
            "base_model_name_or_path".into(),
            Value::String(base_name.to_string()),
        );
    }
    write_json(&out.join("adapter_config.json"), &config)?;
    let summary = read_json(&train_dir.join("summary.json")).ok();
    fs::write(
        out.join("README.md"),
        model_card(adapter, base_name, summary.as_ref()),
    )?;
    Ok(())
}

/// Name the base model in a published adapter folder (a copy of the artifact's `adapter/`).
fn name_base_model(folder: &Path, base_name: &str, train_dir: &Path) -> Result<(), StageError> {
    let adapter = read_adapter(folder)?;
    write_named_config_and_card(&adapter, base_name, train_dir, folder)
}

/// Training figures a model card shows: facts about the trained adapter, never timings or how
/// the run went (wall time, throughput, a resumed checkpoint), so the card is the same for the
/// same adapter and a content-addressed export does not change with the clock.
const CARD_FIGURES: &[&str] = &[
    "final_loss",
    "steps",
    "tokens",
    "scored_tokens",
    "trainable_parameters",
    "examples",
    "truncated_examples",
    "dropped_examples",
    "examples_without_completion",
    "seed",
];

/// A short model card in the shape PEFT's own cards have (YAML front matter + text).
fn model_card(adapter: &LoraFile, base_name: &str, summary: Option<&Value>) -> String {
    let config = &adapter.config;
    let text = |key: &str| match config.get(key) {
        Some(Value::String(s)) => s.clone(),
        Some(Value::Null) | None => "—".to_string(),
        Some(other) => other.to_string(),
    };
    let mut card = format!(
        "---\nbase_model: {base_name}\nlibrary_name: peft\ntags:\n- lora\n- peftpipe\n---\n\n\
         # LoRA adapter\n\nTrained and exported by peftpipe {version}. Load it with PEFT:\n\n\
         ```python\nfrom transformers import AutoModelForCausalLM\nfrom peft import PeftModel\n\n\
         base = AutoModelForCausalLM.from_pretrained(\"{base_name}\")\n\
         model = PeftModel.from_pretrained(base, \"path/to/this/folder\")\n```\n\n\
         | setting | value |\n|---|---|\n| rank (r) | {r} |\n| lora_alpha | {alpha} |\n\
         | rsLoRA | {rslora} |\n| target modules | {targets} |\n| adapted layers | {layers} |\n\
         | trainable parameters | {params} |\n",
        version = crate::TOOL_VERSION,
        r = text("r"),
        alpha = text("lora_alpha"),
        rslora = text("use_rslora"),
        targets = text("target_modules"),
        layers = adapter.pairs.len(),
        params = adapter.parameter_count(),
    );
    if let Some(Value::Object(summary)) = summary {
        card.push_str("\n## Training summary\n\n| figure | value |\n|---|---|\n");
        for (key, value) in summary {
            if !CARD_FIGURES.contains(&key.as_str()) {
                continue;
            }
            if value.is_number() || value.is_string() || value.is_boolean() {
                card.push_str(&format!("| {key} | {value} |\n"));
            }
        }
    }
    card
}

// ---------------------------------------------------------------------------------------------
// (b) The merged model folder
// ---------------------------------------------------------------------------------------------

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
    pub dtype: Option<ExportDtype>,
}

impl Default for MergedOptions {
    fn default() -> Self {
        MergedOptions {
            max_shard_size: DEFAULT_MAX_SHARD_SIZE,
            dtype: None,
        }
    }
}

impl MergedOptions {
    /// The options an export config asks for (its `max_shard_size` already validated).
    pub fn from_config(config: &ExportConfig) -> Result<Self, StageError> {
        let max_shard_size = match &config.max_shard_size {
            None => DEFAULT_MAX_SHARD_SIZE,
            Some(written) => parse_size(written)
                .map_err(|message| StageError::user(format!("max_shard_size: {message}")))?,
        };
        Ok(MergedOptions {
            max_shard_size,
            dtype: config.dtype,
        })
    }
}

/// The safetensors dtype of an export dtype.
fn safetensors_dtype(dtype: ExportDtype) -> Dtype {
    match dtype {
        ExportDtype::F32 => Dtype::F32,
        ExportDtype::Bf16 => Dtype::BF16,
        ExportDtype::F16 => Dtype::F16,
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
fn read_checkpoint_index(base: &ModelDir) -> Result<BTreeMap<String, SourceTensor>, StageError> {
    let infos = base
        .tensor_infos()
        .map_err(|error| StageError::user(error.to_string()))?;
    let mut tensors = BTreeMap::new();
    for (name, info) in infos {
        let dtype: Dtype =
            serde_json::from_value(Value::String(info.dtype.clone())).map_err(|_| {
                StageError::user(format!(
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
fn weight_name(tensors: &BTreeMap<String, SourceTensor>, path: &str) -> Option<String> {
    let direct = format!("{path}.weight");
    if tensors.contains_key(&direct) {
        return Some(direct);
    }
    let short = path.strip_prefix("transformer.")?;
    let short = format!("{short}.weight");
    tensors.contains_key(&short).then_some(short)
}

fn element_size(dtype: Dtype) -> Option<usize> {
    match dtype {
        Dtype::F32 => Some(4),
        Dtype::F16 | Dtype::BF16 => Some(2),
        Dtype::F64 => Some(8),
        _ => None,
    }
}

fn bytes_to_f32(dtype: Dtype, bytes: &[u8]) -> Option<Vec<f32>> {
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

fn f32_to_bytes(dtype: Dtype, values: &[f32]) -> Vec<u8> {
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

/// The merge delta scale·B·A for one module, `[out, in]`, transposed to `[in, out]` for
/// Conv1D-style weights (GPT-2) so it matches the stored layout.
fn delta_for(
    pair: &LoraPair,
    stored_shape: &[usize],
    fan_in_fan_out: bool,
) -> Result<Vec<f32>, StageError> {
    let (out_features, _) = pair.b.dims2().map_err(candle_error)?;
    let (_, in_features) = pair.a.dims2().map_err(candle_error)?;
    let delta =
        (pair.b.matmul(&pair.a).map_err(candle_error)? * pair.scale).map_err(candle_error)?;
    let linear = stored_shape == [out_features, in_features];
    let conv1d = stored_shape == [in_features, out_features];
    let transpose = match (linear, conv1d) {
        (true, true) => fan_in_fan_out,
        (false, true) => true,
        (true, false) => false,
        (false, false) => {
            return Err(StageError::user(format!(
                "module `{}`: the base weight has shape {stored_shape:?}, the adapter expects \
                 [{out_features}, {in_features}]: the adapter was trained on another model",
                pair.path
            )))
        }
    };
    let delta = if transpose {
        delta.t().map_err(candle_error)?
    } else {
        delta
    };
    delta
        .contiguous()
        .and_then(|d| d.flatten_all())
        .and_then(|d| d.to_vec1::<f32>())
        .map_err(candle_error)
}

/// One tensor of the merged output: where it comes from, the LoRA pair merged into it, and its
/// output dtype and byte size.
struct OutputTensor<'a> {
    name: &'a str,
    source: &'a SourceTensor,
    pair: Option<&'a LoraPair>,
    dtype: Dtype,
    size: u64,
}

/// Reads tensor bytes from the base checkpoint, keeping the last file open.
#[derive(Default)]
struct SourceReader {
    open: Option<(PathBuf, File)>,
}

impl SourceReader {
    fn read(&mut self, name: &str, tensor: &SourceTensor) -> Result<Vec<u8>, StageError> {
        if self
            .open
            .as_ref()
            .is_none_or(|(path, _)| path != &tensor.file)
        {
            self.open = Some((tensor.file.clone(), File::open(&tensor.file)?));
        }
        let Some((_, file)) = self.open.as_mut() else {
            return Err(StageError::Internal("no open checkpoint file".into()));
        };
        let mut bytes = vec![0u8; (tensor.end - tensor.start) as usize];
        file.seek(SeekFrom::Start(tensor.start))?;
        file.read_exact(&mut bytes).map_err(|error| {
            StageError::user(format!(
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
) -> Result<Vec<u8>, StageError> {
    let source = entry.source;
    if entry.pair.is_none() && entry.dtype == source.dtype {
        return Ok(source_bytes);
    }
    let mut values = bytes_to_f32(source.dtype, &source_bytes).ok_or_else(|| {
        StageError::user(format!(
            "cannot merge into or convert `{}`: its dtype {:?} is not a float type (quantized bases are merged by dequantizing first)",
            entry.name, source.dtype
        ))
    })?;
    if let Some(pair) = entry.pair {
        let delta = delta_for(pair, &source.shape, fan_in_fan_out)?;
        if delta.len() != values.len() {
            return Err(StageError::Internal(format!(
                "merge of `{}`: {} delta values for {} weights",
                entry.name,
                delta.len(),
                values.len()
            )));
        }
        for (value, change) in values.iter_mut().zip(&delta) {
            *value += change;
        }
    }
    Ok(f32_to_bytes(entry.dtype, &values))
}

/// Write one safetensors file holding `tensors` (in order, `{"format": "pt"}` metadata), streamed
/// tensor by tensor. Returns how many tensors had a LoRA merged in.
fn write_shard(
    path: &Path,
    tensors: &[&OutputTensor<'_>],
    fan_in_fan_out: bool,
    reader: &mut SourceReader,
    check_cancel: &dyn Fn() -> Result<(), StageError>,
) -> Result<usize, StageError> {
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
    let metadata = Metadata::new(
        Some(std::collections::HashMap::from([(
            "format".to_string(),
            "pt".to_string(),
        )])),
        infos,
    )
    .map_err(|error| StageError::Internal(format!("merged safetensors header: {error}")))?;
    let mut header = serde_json::to_vec(&metadata)
        .map_err(|error| StageError::Internal(format!("merged safetensors header: {error}")))?;
    while header.len() % 8 != 0 {
        header.push(b' ');
    }
    let mut writer = BufWriter::new(File::create(path)?);
    writer.write_all(&(header.len() as u64).to_le_bytes())?;
    writer.write_all(&header)?;
    let mut merged = 0;
    for entry in tensors {
        check_cancel()?;
        let source_bytes = reader.read(entry.name, entry.source)?;
        let bytes = output_bytes(entry, source_bytes, fan_in_fan_out)?;
        if bytes.len() as u64 != entry.size {
            return Err(StageError::Internal(format!(
                "`{}`: {} bytes written for a declared {}",
                entry.name,
                bytes.len(),
                entry.size
            )));
        }
        merged += usize::from(entry.pair.is_some());
        writer.write_all(&bytes)?;
    }
    writer.flush()?;
    writer
        .into_inner()
        .map_err(|error| StageError::user(format!("cannot write {}: {error}", path.display())))?
        .sync_all()?;
    Ok(merged)
}

/// Write the merged model folder: every base tensor under its original name (in its original
/// dtype unless `options.dtype` asks for another), the adapted weights as W + scale·B·A, in one
/// `model.safetensors` or, above `options.max_shard_size`, in transformers' shards with
/// `model.safetensors.index.json`; config (dtype updated), tokenizer and generation files copied.
pub fn write_merged_folder(
    adapter: &LoraFile,
    base_dir: &Path,
    out: &Path,
    options: MergedOptions,
    check_cancel: &dyn Fn() -> Result<(), StageError>,
) -> Result<MergedFolder, StageError> {
    // Start empty: weight files of an earlier layout (one file vs shards) must not linger.
    if out.exists() {
        fs::remove_dir_all(out)?;
    }
    fs::create_dir_all(out)?;
    let base = ModelDir::open(base_dir).map_err(|error| StageError::user(error.to_string()))?;
    let source = read_checkpoint_index(&base)?;
    let mut config = base.config_json().clone();
    let tied = config
        .get("tie_word_embeddings")
        .and_then(Value::as_bool)
        .unwrap_or(true);

    // Output name → (source tensor, optional LoRA pair merged into it).
    let mut plan: BTreeMap<String, (SourceTensor, Option<&LoraPair>)> = source
        .iter()
        .map(|(name, tensor)| (name.clone(), (tensor.clone(), None)))
        .collect();
    let mut untie = false;
    for pair in &adapter.pairs {
        if let Some(name) = weight_name(&source, &pair.path) {
            plan.insert(name.clone(), (source[&name].clone(), Some(pair)));
        } else if pair.path == "lm_head" && tied {
            // The head is the embedding matrix; adapting it unties them.
            let embedding = ["model.embed_tokens.weight", "transformer.wte.weight", "wte.weight"]
                .into_iter()
                .find(|name| source.contains_key(*name))
                .ok_or_else(|| {
                    StageError::user("the adapter targets lm_head, but the base model has neither lm_head.weight nor a known embedding to tie it to")
                })?;
            plan.insert(
                "lm_head.weight".into(),
                (source[embedding].clone(), Some(pair)),
            );
            untie = true;
        } else {
            return Err(StageError::user(format!(
                "the adapter adapts `{}`, but the base model in {} has no weight `{}.weight`",
                pair.path,
                base_dir.display(),
                pair.path
            )));
        }
    }
    if untie {
        if let Value::Object(map) = &mut config {
            map.insert("tie_word_embeddings".into(), Value::Bool(false));
        }
    }

    // Every output tensor with its dtype and size, in name order.
    let entries: Vec<OutputTensor> = plan
        .iter()
        .map(|(name, (source, pair))| {
            let dtype = match options.dtype {
                Some(wanted) if element_size(source.dtype).is_some() => safetensors_dtype(wanted),
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
                pair: *pair,
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
        merged_tensors += write_shard(
            &path,
            &shard,
            adapter.fan_in_fan_out,
            &mut reader,
            check_cancel,
        )?;
        bytes += fs::metadata(&path)?.len();
    }
    if shards.len() > 1 {
        let index = serde_json::json!({
            "metadata": {"total_size": total_size},
            "weight_map": weight_map,
        });
        write_json(&out.join(SHARD_INDEX), &index)?;
    }
    if let (Some(dtype), Value::Object(map)) = (options.dtype, &mut config) {
        // transformers < 4.56 reads `torch_dtype`, later versions `dtype`: keep both in step.
        let name = Value::String(dtype.torch_name().to_string());
        if map.contains_key("dtype") {
            map.insert("dtype".into(), name.clone());
        }
        map.insert("torch_dtype".into(), name);
    }

    write_json(&out.join("config.json"), &config)?;
    for file in TOKENIZER_FILES {
        let from = base_dir.join(file);
        if from.is_file() {
            fs::copy(&from, out.join(file)).map_err(|error| {
                StageError::user(format!("cannot copy {}: {error}", from.display()))
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
    Ok(MergedFolder {
        merged_tensors,
        bytes,
        files: shards.len(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn publish_replaces_an_earlier_export_and_refuses_foreign_folders() {
        let root = tempfile::tempdir().unwrap();
        let source = root.path().join("artifact");
        fs::create_dir_all(source.join("sub")).unwrap();
        fs::write(source.join("a.txt"), "one").unwrap();
        fs::write(source.join("sub/b.txt"), "two").unwrap();
        let destination = root.path().join("out/adapter");
        publish_folder(&source, &destination, "export").unwrap();
        assert_eq!(
            fs::read_to_string(destination.join("a.txt")).unwrap(),
            "one"
        );
        assert_eq!(
            fs::read_to_string(destination.join("sub/b.txt")).unwrap(),
            "two"
        );
        assert!(destination.join(EXPORT_MARKER).is_file());

        // A second publish replaces the folder as a whole (stale files vanish).
        fs::write(destination.join("stale.txt"), "old").unwrap();
        fs::write(source.join("a.txt"), "three").unwrap();
        publish_folder(&source, &destination, "export").unwrap();
        assert_eq!(
            fs::read_to_string(destination.join("a.txt")).unwrap(),
            "three"
        );
        assert!(!destination.join("stale.txt").exists());
        // No temporary or old folders are left beside it.
        let siblings: Vec<_> = fs::read_dir(root.path().join("out"))
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(siblings, ["adapter"]);

        let foreign = root.path().join("mine");
        fs::create_dir_all(&foreign).unwrap();
        fs::write(foreign.join("notes.txt"), "keep me").unwrap();
        let error = publish_folder(&source, &foreign, "export").unwrap_err();
        assert!(
            error.to_string().contains("not written by peftpipe"),
            "{error}"
        );
        assert_eq!(
            fs::read_to_string(foreign.join("notes.txt")).unwrap(),
            "keep me"
        );
    }

    #[test]
    fn destinations_may_not_escape_the_project() {
        let root = tempfile::tempdir().unwrap();
        let project = root.path().join("project");
        fs::create_dir_all(&project).unwrap();
        let inside = resolve_destination(&project, "out/adapter", false).unwrap();
        assert_eq!(inside, project.join("out/adapter"));
        for escaping in ["../elsewhere", "/tmp/peftpipe-export-test", "out/../../x"] {
            let error = resolve_destination(&project, escaping, false).unwrap_err();
            assert!(
                error.to_string().contains("--allow-outside-project"),
                "{escaping}: {error}"
            );
        }
        // Through a symbolic link inside the project.
        let outside = root.path().join("outside");
        fs::create_dir_all(&outside).unwrap();
        std::os::unix::fs::symlink(&outside, project.join("link")).unwrap();
        let error = resolve_destination(&project, "link/adapter", false).unwrap_err();
        assert!(error.to_string().contains("symbolic link"), "{error}");
        // Allowed with the flag, except the project itself or its parents.
        assert!(resolve_destination(&project, "../elsewhere", true).is_ok());
        assert!(resolve_destination(&project, "link/adapter", true).is_ok());
        assert!(resolve_destination(&project, "..", true).is_err());
        assert!(resolve_destination(&project, "/", true).is_err());
    }

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
