//! The `export` stage: builds, in its artifact, (a) `adapter/` — the trained LoRA adapter as a PEFT
//! folder (adapter_config.json, adapter_model.safetensors with PEFT's tensor names, a README.md
//! model card) and/or (b) `merged/` — the base model with the adapter merged in, in Hugging Face
//! layout (config.json, model.safetensors with the base checkpoint's tensor names and dtypes,
//! tokenizer files, generation_config.json; with `quantize`, re-quantized in bitsandbytes' saved
//! 4-bit format by `models::quantized_writer`) and/or (c) `gguf/model.gguf` — the merged model as one
//! llama.cpp GGUF file. [`Stage::publish`] then copies each folder (or the file) to its declared
//! destination atomically (temp folder or file + rename), also when restored from the cache.
//!
//! The adapter is read through `peft::registry` (any method); a mergeable method's per-tensor
//! patches are written by the one checkpoint writer, `models::checkpoint` (streamed tensor by
//! tensor), and by the GGUF writer, `models::gguf`. This stage only translates config and moves artifacts: it must not merge weights
//! itself, train, print, or write outside `ctx.out_dir` except through `publish`.

use std::fs::{self, File};
use std::path::{Path, PathBuf};

use candle_core::{DType, Device};
use serde_json::Value;

use candle_core::quantized::GgmlDType;

use crate::config::export::{parse_size, ExportDtype, GgufType, DEFAULT_MAX_SHARD_SIZE};
use crate::config::ExportConfig;
use crate::models::checkpoint::{
    write_merged_folder, CheckpointError, MergedFolder, MergedOptions, WeightPatch,
};
use crate::models::gguf::{write_gguf, WRITER_KEY};
use crate::models::quantized::{
    dequantized_base_patches, write_dequantized_checkpoint, BaseQuantization,
};
use crate::models::quantized_writer::{write_quantized_merged_folder, QuantizedMergedOptions};
use crate::models::ModelDir;
use crate::peft::qlora::{compute_dtype, quant_config};
use crate::peft::{load_adapter, AdapterFiles};

use super::{Progress, Stage, StageContext, StageError, StageOutcome};

/// Name of the marker file that says a destination folder was written by `peftpipe export`
/// (only such folders, or empty ones, are ever replaced).
pub const EXPORT_MARKER: &str = ".peftpipe-export.json";

/// The GGUF file's place in the export artifact.
pub const GGUF_ARTIFACT: &str = "gguf/model.gguf";

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

    /// `base_model_name_or_path` in a published adapter (never cached): the export config's
    /// rule ([`ExportConfig::published_base_name`]) on the model as the train stage recorded it,
    /// the same rule `status` checks a publish against.
    fn published_base_name(&self, ctx: &StageContext<'_>) -> Result<String, StageError> {
        let record = read_json(&ctx.upstream_dir(&self.config.from)?.join("base_model.json"))?;
        let model = record
            .get("model")
            .and_then(Value::as_str)
            .unwrap_or_default();
        Ok(self.config.published_base_name(ctx.project_dir, model))
    }
}

/// The repository id of an `hf://org/name[@revision]` model (None: a local folder).
fn hub_repo_id(model: &str) -> Option<String> {
    crate::config::hub::repo_id_of(model)
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
        let total_steps = u64::from(self.config.adapter.is_some())
            + u64::from(self.config.merged.is_some())
            + u64::from(self.config.gguf.is_some());
        let mut done = 0;
        if self.config.adapter.is_some() {
            let out = ctx.out_dir.join("adapter");
            let name = self.cached_base_name(&base);
            write_adapter_folder(&adapter, &adapter_dir, &name, train_dir, &out)?;
            done += 1;
            ctx.progress.progress(Progress {
                position: done,
                length: Some(total_steps),
                unit: "files",
                message: "adapter written".into(),
            });
        }
        ctx.check_cancel()?;
        let merging = self.config.merged.is_some() || self.config.gguf.is_some();
        // A QLoRA run over a checkpoint saved in bitsandbytes 4-bit: the merge starts from its
        // dequantized copy (a scratch folder removed before the stage ends), with LoRA's patches.
        let dequantized = match &base.quantization {
            Some(quantization) if merging && quantization.prequantized => {
                let scratch = tempfile::Builder::new()
                    .prefix(".dequantized-base-")
                    .tempdir_in(ctx.out_dir)
                    .map_err(|error| {
                        StageError::user(format!("{}: {error}", ctx.out_dir.display()))
                    })?;
                let stored = ModelDir::open(&base.path)
                    .map_err(|error| StageError::user(error.to_string()))?;
                if stored.stored_quantization().is_none() {
                    return Err(StageError::user(format!(
                        "{}: no `quantization_config`, but the adapter was trained over this model saved in bitsandbytes 4-bit (base_model.json: prequantized)",
                        stored.config_path().display()
                    )));
                }
                write_dequantized_checkpoint(&stored, scratch.path())
                    .map_err(|error| StageError::user(error.to_string()))?;
                Some(scratch)
            }
            _ => None,
        };
        let merge_base = dequantized
            .as_ref()
            .map_or(base.path.clone(), |scratch| scratch.path().to_path_buf());
        let patches = if merging {
            let patches = merge_patches(&adapter_dir)?;
            // A QLoRA run: a 16-bit model over the dequantized base (never re-quantized).
            match &base.quantization {
                Some(quantization) if quantization.prequantized => patches,
                Some(quantization) => {
                    let shapes = ModelDir::open(&base.path)
                        .and_then(|dir| dir.tensor_infos())
                        .map_err(|error| StageError::user(error.to_string()))?
                        .into_iter()
                        .map(|(name, info)| (name, info.shape))
                        .collect();
                    dequantized_base_patches(
                        patches,
                        quantization,
                        base.dtype.unwrap_or(DType::F32),
                        &shapes,
                    )
                }
                None => patches,
            }
        } else {
            Vec::new()
        };
        if self.config.merged.is_some() {
            let out = ctx.out_dir.join("merged");
            let options = merged_options(&self.config)?;
            let cancelled = || ctx.check_cancel().is_err();
            let (merged, message) = match &self.config.quantize {
                None => {
                    let merged =
                        write_merged_folder(&patches, &merge_base, &out, options, &cancelled)
                            .map_err(checkpoint_error)?;
                    let message = format!("merged {} weight matrices", merged.merged_tensors);
                    (merged, message)
                }
                // The merged model re-quantized in bitsandbytes' saved 4-bit format.
                Some(settings) => {
                    let options = QuantizedMergedOptions {
                        merged: options,
                        quant: quant_config(settings),
                        compute_dtype: settings.compute_dtype.map(compute_dtype),
                    };
                    let written = write_quantized_merged_folder(
                        &patches,
                        &merge_base,
                        &out,
                        options,
                        &cancelled,
                    )
                    .map_err(checkpoint_error)?;
                    outcome.summary.insert(
                        "merged_4bit_tensors".into(),
                        written.quantized_tensors.into(),
                    );
                    let message = format!(
                        "merged {} weight matrices, {} written in 4 bits ({})",
                        written.merged_tensors,
                        written.quantized_tensors,
                        settings.quant_type.name()
                    );
                    let merged = MergedFolder {
                        merged_tensors: written.merged_tensors,
                        bytes: written.bytes,
                        files: written.files,
                    };
                    (merged, message)
                }
            };
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
                unit: "files",
                message,
            });
        }
        ctx.check_cancel()?;
        if self.config.gguf.is_some() {
            let gguf_type = self.config.gguf_type.unwrap_or_default();
            let out = ctx.out_dir.join(GGUF_ARTIFACT);
            let name = base
                .path
                .file_name()
                .map(|name| name.to_string_lossy().into_owned())
                .unwrap_or_else(|| base.portable_name());
            let written = write_gguf(
                &patches,
                &merge_base,
                &out,
                ggml_type(gguf_type),
                &name,
                &|| ctx.check_cancel().is_err(),
            )
            .map_err(checkpoint_error)?;
            outcome
                .summary
                .insert("gguf_type".into(), gguf_type.name().into());
            outcome
                .summary
                .insert("gguf_bytes".into(), written.bytes.into());
            outcome
                .summary
                .insert("gguf_tensors".into(), written.tensors.into());
            // llama.cpp's fallbacks for matrices whose rows are not a multiple of the block.
            outcome.summary.insert(
                "gguf_fallback_tensors".into(),
                written.fallbacks.len().into(),
            );
            done += 1;
            ctx.progress.progress(Progress {
                position: done,
                length: Some(total_steps),
                unit: "files",
                message: format!("GGUF ({}) written", gguf_type.name()),
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
        // Every destination is checked before any is written, so one that cannot take the
        // export (a foreign folder or file) leaves the others unpublished too.
        let mut destinations = Vec::new();
        for (kind, written) in self.destinations() {
            let destination =
                resolve_destination(ctx.project_dir, written, ctx.options.allow_outside_project)?;
            if kind == "gguf" {
                refuse_foreign_file(&destination)?;
            } else {
                refuse_foreign_folder(&destination, &artifact.join(kind))?;
            }
            destinations.push((kind, destination));
        }
        for (kind, destination) in destinations {
            if kind == "gguf" {
                let source = artifact.join(GGUF_ARTIFACT);
                if !source.is_file() {
                    return Err(StageError::Internal(format!(
                        "the export artifact has no `{GGUF_ARTIFACT}` to publish"
                    )));
                }
                publish_gguf(&source, &destination)?;
                ctx.progress
                    .note(format!("published {kind} to {}", destination.display()));
                continue;
            }
            let source = artifact.join(kind);
            if !source.is_dir() {
                return Err(StageError::Internal(format!(
                    "the export artifact has no `{kind}` folder to publish"
                )));
            }
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

/// The GGML type of a GGUF export's matrices.
fn ggml_type(gguf_type: GgufType) -> GgmlDType {
    match gguf_type {
        GgufType::F16 => GgmlDType::F16,
        GgufType::Q8_0 => GgmlDType::Q8_0,
        GgufType::Q4K => GgmlDType::Q4K,
    }
}

/// The per-tensor patches of the trained adapter (any mergeable method).
fn merge_patches(adapter_dir: &Path) -> Result<Vec<WeightPatch>, StageError> {
    let loaded = load_adapter(adapter_dir, &Device::Cpu)
        .map_err(|error| StageError::user(error.to_string()))?;
    loaded
        .merge_patches()
        .map_err(|error| StageError::user(error.to_string()))?
        .ok_or_else(|| {
            StageError::user(format!(
                "{}: {} adapters cannot be merged into the base weights; export `adapter:` only",
                adapter_dir.display(),
                loaded.peft_type()
            ))
        })
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
    refuse_foreign_folder(destination, source)?;
    let name = name.to_string_lossy();
    let temporary = crate::files::dir_builder()
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
    // The files written, so a later publish can tell a file someone added from its own.
    let marker = serde_json::json!({
        "written_by": "peftpipe export",
        "stage": stage,
        "peftpipe_version": crate::TOOL_BUILD,
        "files": relative_files(temporary.path())?,
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

/// Refuse a folder destination that exists and is not an export peftpipe wrote (or empty), or
/// that holds a file neither the last publish wrote (its marker's list) nor this one (`source`)
/// would write: publishing replaces the whole folder, and such a file would be lost.
fn refuse_foreign_folder(destination: &Path, source: &Path) -> Result<(), StageError> {
    let Ok(metadata) = fs::symlink_metadata(destination) else {
        return Ok(());
    };
    if !metadata.is_dir() {
        return Err(StageError::user(format!(
            "export destination {} exists and is not a folder",
            destination.display()
        )));
    }
    let is_empty = fs::read_dir(destination)?.next().is_none();
    let marker = destination.join(EXPORT_MARKER);
    if !is_empty && !marker.is_file() {
        return Err(StageError::user(format!(
            "export destination {} already exists and was not written by peftpipe export; \
             remove it or choose another folder",
            destination.display()
        )));
    }
    // A file the last publish wrote (the marker lists them; markers of earlier versions list
    // nothing) or this one writes is peftpipe's; anything else someone put there.
    let mut written: Vec<String> = read_json(&marker)
        .ok()
        .and_then(|value| serde_json::from_value(value.get("files")?.clone()).ok())
        .unwrap_or_default();
    if source.is_dir() {
        written.extend(relative_files(source)?);
    }
    let added: Vec<String> = relative_files(destination)?
        .into_iter()
        .filter(|file| !written.contains(file))
        .collect();
    if !added.is_empty() {
        let shown = match added.len() {
            1..=5 => added.join(", "),
            n => format!("{} and {} more", added[..5].join(", "), n - 5),
        };
        return Err(StageError::user(format!(
            "export destination {} holds {shown}, which peftpipe did not write; move \
             {} elsewhere first (publishing replaces the whole folder)",
            destination.display(),
            if added.len() == 1 { "it" } else { "them" }
        )));
    }
    Ok(())
}

/// The files under `dir` (recursively), as `/`-separated paths relative to it, sorted; the
/// export marker is not one of them.
fn relative_files(dir: &Path) -> Result<Vec<String>, StageError> {
    fn walk(dir: &Path, prefix: &str, out: &mut Vec<String>) -> Result<(), StageError> {
        for entry in fs::read_dir(dir)? {
            let entry = entry?;
            let name = format!("{prefix}{}", entry.file_name().to_string_lossy());
            if entry.file_type()?.is_dir() {
                walk(&entry.path(), &format!("{name}/"), out)?;
            } else if name != EXPORT_MARKER {
                out.push(name);
            }
        }
        Ok(())
    }
    let mut files = Vec::new();
    walk(dir, "", &mut files)?;
    files.sort();
    Ok(files)
}

/// Refuse a file destination that exists and is not a GGUF file peftpipe export wrote.
fn refuse_foreign_file(destination: &Path) -> Result<(), StageError> {
    let Ok(metadata) = fs::symlink_metadata(destination) else {
        return Ok(());
    };
    if !metadata.is_file() {
        return Err(StageError::user(format!(
            "export destination {} exists and is not a file",
            destination.display()
        )));
    }
    if !written_by_export(destination) {
        return Err(StageError::user(format!(
            "export destination {} already exists and is not a GGUF file written by \
             peftpipe export; remove it or choose another file name",
            destination.display()
        )));
    }
    Ok(())
}

/// Copy the GGUF file `source` to `destination`, replacing an earlier export there: the copy is
/// written to a temporary sibling file and renamed into place, so the destination is never half
/// written. An existing file that is not a GGUF file written by peftpipe export is refused.
pub fn publish_gguf(source: &Path, destination: &Path) -> Result<(), StageError> {
    let parent = match destination.parent() {
        Some(parent) if !parent.as_os_str().is_empty() => parent,
        _ => Path::new("."),
    };
    fs::create_dir_all(parent).map_err(|error| {
        StageError::user(format!("cannot create {}: {error}", parent.display()))
    })?;
    refuse_foreign_file(destination)?;
    let name = destination
        .file_name()
        .map(|name| name.to_string_lossy().into_owned())
        .unwrap_or_default();
    let temporary = crate::files::file_builder()
        .prefix(&format!(".{name}.peftpipe-tmp-"))
        .tempfile_in(parent)
        .map_err(|error| {
            StageError::user(format!(
                "cannot create a temporary file in {}: {error}",
                parent.display()
            ))
        })?;
    let mut reader = File::open(source)?;
    std::io::copy(&mut reader, &mut temporary.as_file()).map_err(|error| {
        StageError::user(format!(
            "cannot copy {} to {}: {error}",
            source.display(),
            parent.display()
        ))
    })?;
    temporary.as_file().sync_all()?;
    temporary.persist(destination).map_err(|error| {
        StageError::user(format!(
            "cannot move the GGUF file into {}: {error}",
            destination.display()
        ))
    })?;
    Ok(())
}

/// Whether `path` is a GGUF file whose metadata says peftpipe export wrote it.
fn written_by_export(path: &Path) -> bool {
    let Ok(mut file) = File::open(path) else {
        return false;
    };
    candle_core::quantized::gguf_file::Content::read(&mut file)
        .is_ok_and(|content| content.metadata.contains_key(WRITER_KEY))
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
    /// The 4-bit base a QLoRA run trained over (`quantization`), `None` for other methods.
    pub quantization: Option<BaseQuantization>,
    /// The dtype the run loaded the base in (`dtype`: `f32`, `bf16`, `f16`), when recorded.
    pub dtype: Option<DType>,
}

impl BaseModelRecord {
    /// Read `base_model.json` of a train artifact. A local model as written is resolved against
    /// this project directory (the artifact may have been trained in another checkout), a Hub
    /// model in the local Hugging Face cache; the `path` older records hold is the fallback.
    /// When the record holds `config_digest`, the folder's
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
        let quantization = match value.get("quantization") {
            None | Some(Value::Null) => None,
            Some(record) => Some(BaseQuantization::from_json(record).map_err(|message| {
                StageError::user(format!("{}: quantization: {message}", file.display()))
            })?),
        };
        let dtype = text("dtype").map(crate::stages::train::dtype_from_name);
        Ok(BaseModelRecord {
            model,
            path,
            quantization,
            dtype,
        })
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

/// Read the trained adapter's files through `crate::peft::format` (the one reader of PEFT
/// folders).
fn read_adapter(dir: &Path) -> Result<AdapterFiles, StageError> {
    AdapterFiles::read(dir, &Device::Cpu).map_err(|error| StageError::user(error.to_string()))
}

fn checkpoint_error(error: CheckpointError) -> StageError {
    match error {
        CheckpointError::Cancelled => StageError::Cancelled,
        CheckpointError::Internal(message) => StageError::Internal(message),
        other => StageError::user(other.to_string()),
    }
}

/// The options an export config asks for (its `max_shard_size` already validated).
fn merged_options(config: &ExportConfig) -> Result<MergedOptions, StageError> {
    let max_shard_size = match &config.max_shard_size {
        None => DEFAULT_MAX_SHARD_SIZE,
        Some(written) => parse_size(written)
            .map_err(|message| StageError::user(format!("max_shard_size: {message}")))?,
    };
    Ok(MergedOptions {
        max_shard_size,
        dtype: config.dtype.map(|dtype| match dtype {
            ExportDtype::F32 => DType::F32,
            ExportDtype::Bf16 => DType::BF16,
            ExportDtype::F16 => DType::F16,
        }),
    })
}

// ---------------------------------------------------------------------------------------------
// (a) The PEFT adapter folder
// ---------------------------------------------------------------------------------------------

/// Write the adapter's PEFT files (the weights byte for byte; the config with
/// `base_model_name_or_path` set to `base_name`) and a model card.
fn write_adapter_folder(
    adapter: &AdapterFiles,
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
    adapter: &AdapterFiles,
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
        // A TEXT-initialised prompt's tokenizer is the base's (PEFT loads it when the adapter
        // is loaded for training): named as the base is, not as the pipeline wrote the model.
        if map
            .get("tokenizer_name_or_path")
            .is_some_and(|value| !value.is_null())
        {
            map.insert(
                "tokenizer_name_or_path".into(),
                Value::String(base_name.to_string()),
            );
        }
    }
    write_json(&out.join("adapter_config.json"), &config)?;
    let summary = read_json(&train_dir.join("summary.json")).ok();
    let quantization =
        crate::infer::session::recorded_base_quantization(&train_dir.join("adapter"))
            .map_err(StageError::user)?
            .map(|(quantization, _)| quantization);
    fs::write(
        out.join("README.md"),
        model_card(adapter, base_name, summary.as_ref(), quantization.as_ref()),
    )?;
    // The folder says which 4-bit base it was trained over, so that peftpipe applies it over
    // that base (generate, an evaluate stage's external_adapters) and never silently over the
    // 16-bit one.
    if let Some(quantization) = &quantization {
        write_json(
            &out.join(crate::config::evaluate::ADAPTER_BASE_RECORD),
            &serde_json::json!({ "quantization": quantization.to_json() }),
        )?;
    }
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

/// How to load the adapter with PEFT: over the base as transformers loads it, which for a QLoRA
/// adapter is the base in bitsandbytes 4-bit with the settings it was trained over.
fn loading_snippet(base_name: &str, quantization: Option<&BaseQuantization>) -> String {
    // The name as a Python string literal (JSON's escapes are Python's): a `"` or `\` in it
    // must not end or bend the string.
    let base_name = serde_json::Value::from(base_name).to_string();
    let Some(quantization) = quantization else {
        return format!(
            "Load it with PEFT:\n\n```python\nfrom transformers import AutoModelForCausalLM\n\
             from peft import PeftModel\n\nbase = AutoModelForCausalLM.from_pretrained({base_name})\n\
             model = PeftModel.from_pretrained(base, \"path/to/this/folder\")\n```\n\n"
        );
    };
    let config = &quantization.config;
    let python_bool = |flag: bool| if flag { "True" } else { "False" };
    if quantization.prequantized {
        return format!(
            "It was trained with QLoRA over the base as saved in bitsandbytes 4-bit ({}, \
             double_quant {}); transformers loads that checkpoint in 4 bits as it is:\n\n\
             ```python\nfrom transformers import AutoModelForCausalLM\nfrom peft import PeftModel\n\n\
             base = AutoModelForCausalLM.from_pretrained({base_name})\n\
             model = PeftModel.from_pretrained(base, \"path/to/this/folder\")\n```\n\n",
            config.quant_type.name(),
            python_bool(config.double_quant)
        );
    }
    let compute = match quantization.compute_dtype {
        Some(DType::BF16) => ",\n    bnb_4bit_compute_dtype=torch.bfloat16",
        Some(DType::F16) => ",\n    bnb_4bit_compute_dtype=torch.float16",
        Some(_) => ",\n    bnb_4bit_compute_dtype=torch.float32",
        None => "",
    };
    let blocks = if config.block_size == 64 {
        String::new()
    } else {
        format!(
            "\nIt was trained over blocks of {} weights per absmax; transformers' \
             `BitsAndBytesConfig` always quantizes in blocks of 64, so the base PEFT loads differs \
             slightly from the one it was trained over.\n",
            config.block_size
        )
    };
    format!(
        "It was trained with QLoRA: load it over the base in bitsandbytes 4-bit, as it was \
         trained (over the 16-bit base it computes something else):\n\n\
         ```python\n{torch}from transformers import AutoModelForCausalLM, BitsAndBytesConfig\n\
         from peft import PeftModel\n\nquantization = BitsAndBytesConfig(\n    load_in_4bit=True,\n    \
         bnb_4bit_quant_type=\"{}\",\n    bnb_4bit_use_double_quant={}{compute},\n)\n\
         base = AutoModelForCausalLM.from_pretrained(\n    {base_name}, quantization_config=quantization\n)\n\
         model = PeftModel.from_pretrained(base, \"path/to/this/folder\")\n```\n{blocks}\n\
         With peftpipe: `peftpipe generate {base_name} --adapter path/to/this/folder --load-in-4bit {}{}{}`, \
         or an evaluate stage's `external_adapters` with `base_quantization`.\n\n",
        config.quant_type.name(),
        python_bool(config.double_quant),
        config.quant_type.name(),
        if config.double_quant { "" } else { " --no-double-quant" },
        if config.block_size == 64 {
            String::new()
        } else {
            format!(" --block-size {}", config.block_size)
        },
        torch = if compute.is_empty() {
            ""
        } else {
            "import torch\n"
        },
    )
}

/// A short model card in the shape PEFT's own cards have (YAML front matter + text).
/// `text` as a YAML scalar of the card's front matter: as it is when YAML reads it back as that
/// string (a Hub id, a plain path), else double-quoted (JSON's escaping is YAML's): `#` would
/// start a comment, `: ` a mapping, and `true` or `1.0` would not be strings.
fn yaml_scalar(text: &str) -> String {
    let plain_char = |c: char| c.is_ascii_alphanumeric() || "._/-+=~@".contains(c);
    let plain = text.chars().all(plain_char)
        && (text.starts_with("./")
            || text.starts_with("../")
            || text
                .chars()
                .next()
                .is_some_and(|c| c.is_ascii_alphabetic() || "_/".contains(c)))
        && !matches!(
            text.to_ascii_lowercase().as_str(),
            "true" | "false" | "yes" | "no" | "on" | "off" | "null" | "y" | "n"
        );
    if plain {
        text.to_string()
    } else {
        Value::String(text.to_string()).to_string()
    }
}

fn model_card(
    adapter: &AdapterFiles,
    base_name: &str,
    summary: Option<&Value>,
    quantization: Option<&BaseQuantization>,
) -> String {
    let config = &adapter.config;
    let text = |key: &str| match config.get(key) {
        Some(Value::String(s)) => s.clone(),
        Some(Value::Null) | None => "—".to_string(),
        Some(other) => other.to_string(),
    };
    let peft_type = text("peft_type");
    let tag = peft_type.to_lowercase().replace('_', "-");
    let mut card = format!(
        "---\nbase_model: {base_model}\nlibrary_name: peft\ntags:\n- {tag}\n- peftpipe\n---\n\n\
         # {peft_type} adapter\n\nTrained and exported by peftpipe {version}. {loading}\
         | setting | value |\n|---|---|\n",
        base_model = yaml_scalar(base_name),
        version = crate::TOOL_BUILD,
        loading = loading_snippet(base_name, quantization),
    );
    // The settings that shape each method (PEFT's names), those the config has.
    for (label, key) in [
        ("rank (r)", "r"),
        ("lora_alpha", "lora_alpha"),
        ("rsLoRA", "use_rslora"),
        ("target modules", "target_modules"),
        ("virtual tokens", "num_virtual_tokens"),
        ("prompt init", "prompt_tuning_init"),
        ("prefix projection", "prefix_projection"),
        ("adapter length", "adapter_len"),
        ("adapter layers", "adapter_layers"),
    ] {
        if config.get(key).is_some() {
            card.push_str(&format!("| {label} | {} |\n", text(key)));
        }
    }
    if let Some(quantization) = quantization {
        let config = &quantization.config;
        card.push_str(&format!(
            "| base | bitsandbytes 4-bit {}, {}blocks of {}{} |\n",
            config.quant_type.name(),
            if config.double_quant {
                "double-quantized absmax, "
            } else {
                ""
            },
            config.block_size,
            if quantization.prequantized {
                ", as the checkpoint stores it"
            } else {
                ""
            }
        ));
    }
    card.push_str(&format!(
        "| adapter tensors | {} |\n| trainable parameters | {} |\n",
        adapter.tensors.len(),
        adapter.parameter_count()
    ));
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
        // With evaluation during training the adapter may be an earlier step's than the last
        // (`keep: best`): say which, and what its held-out loss was; final_loss is the last
        // step's training loss.
        if let Some(Value::Object(evaluation)) = summary.get("evaluation") {
            let field = |key: &str| evaluation.get(key).filter(|value| !value.is_null());
            if let (Some(kept), Some(steps)) = (field("kept_step"), summary.get("steps")) {
                let keep = field("keep").and_then(Value::as_str).unwrap_or("last");
                card.push_str(&format!(
                    "| kept adapter | step {kept} of {steps} (keep: {keep}) |\n"
                ));
            }
            if let (Some(loss), Some(step)) = (field("best_eval_loss"), field("best_step")) {
                let split = field("split").and_then(Value::as_str).unwrap_or("eval");
                card.push_str(&format!(
                    "| best eval_loss | {loss} at step {step} (split {split}) |\n"
                ));
            }
        }
    }
    card
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_model_card_names_the_kept_step_when_evaluation_chose_an_earlier_adapter() {
        let adapter = AdapterFiles {
            config: serde_json::json!({"peft_type": "LORA", "r": 4}),
            config_path: PathBuf::from("adapter_config.json"),
            tensors: Default::default(),
            auxiliary: Default::default(),
            weights_path: PathBuf::from("adapter_model.safetensors"),
        };
        let summary = serde_json::json!({
            "final_loss": 10.97,
            "steps": 6,
            "evaluation": {"split": "eval", "best_step": 2, "best_eval_loss": 7.5877,
                           "keep": "best", "kept_step": 2},
        });
        let card = model_card(&adapter, "base", Some(&summary), None);
        assert!(
            card.contains("| kept adapter | step 2 of 6 (keep: best) |"),
            "{card}"
        );
        assert!(
            card.contains("| best eval_loss | 7.5877 at step 2 (split eval) |"),
            "{card}"
        );
        let plain = model_card(
            &adapter,
            "base",
            Some(&serde_json::json!({"final_loss": 1.0, "steps": 6})),
            None,
        );
        assert!(!plain.contains("kept adapter"), "{plain}");
    }

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

        // A file added since is never lost: that publish is refused and the folder kept.
        fs::write(destination.join("stale.txt"), "old").unwrap();
        fs::write(source.join("a.txt"), "three").unwrap();
        let error = publish_folder(&source, &destination, "export").unwrap_err();
        assert!(error.to_string().contains("holds stale.txt"), "{error}");
        assert_eq!(
            fs::read_to_string(destination.join("a.txt")).unwrap(),
            "one"
        );
        // Also under a marker of an earlier version, which lists no files: a file this publish
        // does not write either is someone's.
        fs::write(
            destination.join(EXPORT_MARKER),
            r#"{"written_by": "peftpipe export", "stage": "export"}"#,
        )
        .unwrap();
        let error = publish_folder(&source, &destination, "export").unwrap_err();
        assert!(error.to_string().contains("holds stale.txt"), "{error}");
        // Without it, a second publish replaces the folder as a whole.
        fs::remove_file(destination.join("stale.txt")).unwrap();
        publish_folder(&source, &destination, "export").unwrap();
        assert_eq!(
            fs::read_to_string(destination.join("a.txt")).unwrap(),
            "three"
        );
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
}
