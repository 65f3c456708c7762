//! The `train` stage: read the upstream `<split>.parquet` (columns `prompt`, `completion`),
//! tokenize, load the base model with the PEFT adapter injected, train, and write the artifact.
//!
//! Artifact layout (`out_dir`):
//! ```text
//! adapter/adapter_config.json        PEFT format: PeftModel.from_pretrained(base, "adapter") loads it
//! adapter/adapter_model.safetensors  base_model.model.<module>.lora_A.weight / lora_B.weight (f32)
//! metrics.jsonl                      one line per optimizer step: step, epoch, loss, lr, grad_norm,
//!                                    tokens, scored_tokens; with `eval_steps`, the steps that
//!                                    evaluated add eval_loss, eval_perplexity, eval_scored_tokens
//! summary.json                       final loss, steps, tokens, trainable parameters, examples
//!                                    used / truncated / dropped, seed; with `eval_steps`, an
//!                                    `evaluation` record: split, rows, best step and loss, the
//!                                    step whose adapter was kept, and why training stopped
//! tensorboard/events.out.tfevents.0.peftpipe
//!                                    with `tensorboard: true`: the metrics as TensorBoard
//!                                    scalars (wall times 0, see train::tensorboard)
//! base_model.json                    `model` (as written in the pipeline; never a path resolved on
//!                                    this machine, which would make the artifact differ between
//!                                    checkouts), `config_digest` (blake3 of config.json), `model_type`,
//!                                    `device`, `dtype`, `model_files` (file name → blake3 of
//!                                    every model file the stage's fingerprint covers, so the
//!                                    artifact changes with any of them); a QLoRA run adds `quantization` (its 4-bit
//!                                    settings, `prequantized: true` over a checkpoint saved in
//!                                    bitsandbytes 4-bit)
//! ```
//! The artifact is content-addressed, so it holds only what the inputs determine: a retrain that
//! produces the same adapter produces the same artifact, and downstream stages stay fresh.
//! Timings (wall time, tokens per second), the run's peak memory (`peak_memory_bytes`,
//! `peak_memory_source`, and `peak_memory_shared` when CPU stages trained at the same time; see
//! `train::peak_memory`) and whether the run resumed go to the stage
//! outcome (the run summary, the lock file and the cache's run record), never into these files;
//! the reporter joins them into the evaluate stage's comparison when it shows it.
//!
//! Checkpoints (adapter + optimizer + step/data position + seed) live outside the artifact in the
//! directory the executor gives the stage (`ctx.checkpoint_dir`: the cache's
//! `checkpoints/<pipeline>/<stage>/<fingerprint>/`), so a killed run resumes where it stopped, and
//! only a run with the same full fingerprint (weights, tokenizer, data, config, name, seed, ...)
//! resumes them; `--force` (`ctx.resume == false`) discards them and starts over. The stage holds
//! the directory's lock while training and removes it once the artifact is complete. Only
//! `train/` knows how to train; this file translates the config and does the I/O. Never prints:
//! progress goes through `ctx.progress`.

use std::path::Path;

use arrow::array::{Array, AsArray};
use arrow::datatypes::DataType;
use candle_core::{DType, Device};
use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
use parquet::arrow::ProjectionMask;

pub mod ranks;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::atomic::AtomicBool;

use serde::{Deserialize, Serialize};

use super::{Progress, ProgressSink, Stage, StageContext, StageError, StageOutcome};
use crate::config::hub::resolve_model_dir;
use crate::config::train::DevicesConfig;
use crate::config::train::KeepChoice;
use crate::config::train::{device_kind, TrainConfig};
pub use crate::data::batch::FitCounts;
use crate::data::batch::Sequence;
use crate::data::tokenize::TextTokenizer;
use crate::models::ModelDir;
use crate::peft::qlora::check_stored_base;
use crate::peft::{new_adapter, MethodContext};
use crate::train::checkpoint::CheckpointDir;
use crate::train::distributed::{Communicator, Solo, World};
use crate::train::peak_memory::PeakMemoryWatch;
use crate::train::{
    AdamWSettings, CausalLmLoss, CheckpointedLoss, EarlyStopping, Evaluation, HookSource,
    LossModel, TrainError, TrainOutcome, TrainerSettings,
};

pub struct TrainStage {
    config: TrainConfig,
}

impl TrainStage {
    pub fn new(config: TrainConfig) -> Self {
        TrainStage { config }
    }
}

/// The candle device for a device string (`auto`, `cpu`, `cuda`, `cuda:N`): the kind
/// [`device_kind`] gives (the one the stage's cache key records; `auto` is CUDA in a CUDA build),
/// opened by [`crate::device::resolve_device`], the one place that sets a CUDA device up.
pub fn select_device(spec: &str) -> Result<Device, String> {
    let kind = device_kind(spec)?;
    if kind == "cpu" {
        return Ok(Device::Cpu);
    }
    // `auto` in a CUDA build, `cuda` and `cuda:N` (device_kind accepted no other).
    let ordinal = match spec.parse() {
        Ok(crate::device::DeviceSpec::Cuda(ordinal)) => ordinal,
        _ => 0,
    };
    if !cfg!(feature = "cuda") {
        return Err(format!(
            "device `{spec}`: this peftpipe was built without CUDA (rebuild with `--features cuda`)"
        ));
    }
    crate::device::resolve_device(crate::device::DeviceSpec::Cuda(ordinal))
        .map_err(|error| format!("device `{spec}`: {error}"))
}

/// The candle dtype for a dtype name from [`crate::config::train::DTypeChoice::resolve`].
pub fn dtype_from_name(name: &str) -> DType {
    match name {
        "bf16" => DType::BF16,
        "f16" => DType::F16,
        _ => DType::F32,
    }
}

/// Read two Utf8 columns of a Parquet file, row by row. Errors name the file as `shown` (the
/// split and stage it is, not its cache path), the column and the row.
pub fn read_text_columns(
    path: &Path,
    shown: &str,
    columns: [&str; 2],
) -> Result<Vec<(String, String)>, StageError> {
    let file = std::fs::File::open(path)
        .map_err(|error| StageError::user(format!("{}: {error}", shown)))?;
    let builder = ParquetRecordBatchReaderBuilder::try_new(file)
        .map_err(|error| StageError::user(format!("{}: {error}", shown)))?;
    let schema = builder.schema().clone();
    let mut indices = Vec::new();
    for column in columns {
        let index = schema.index_of(column).map_err(|_| {
            let available: Vec<&str> = schema.fields().iter().map(|f| f.name().as_str()).collect();
            StageError::user(format!(
                "{}: no column `{column}` (columns: {})",
                shown,
                available.join(", ")
            ))
        })?;
        indices.push(index);
    }
    let mask = ProjectionMask::roots(builder.parquet_schema(), indices.iter().copied());
    let reader = builder
        .with_projection(mask)
        .build()
        .map_err(|error| StageError::user(format!("{}: {error}", shown)))?;
    let mut rows = Vec::new();
    for (batch_index, batch) in reader.enumerate() {
        let batch = batch.map_err(|error| {
            StageError::user(format!("{}: record batch {batch_index}: {error}", shown))
        })?;
        let mut texts: Vec<Vec<String>> = Vec::new();
        for column in columns {
            let array = batch.column_by_name(column).ok_or_else(|| {
                StageError::Internal(format!("projected column `{column}` missing"))
            })?;
            let start = rows.len();
            let values: Vec<Option<&str>> = match array.data_type() {
                DataType::Utf8 => array.as_string::<i32>().iter().collect(),
                DataType::LargeUtf8 => array.as_string::<i64>().iter().collect(),
                DataType::Utf8View => array.as_string_view().iter().collect(),
                other => {
                    return Err(StageError::user(format!(
                        "{}: column `{column}` is {other}, expected text",
                        shown
                    )))
                }
            };
            let mut owned = Vec::with_capacity(values.len());
            for (offset, value) in values.into_iter().enumerate() {
                let Some(value) = value else {
                    return Err(StageError::user(format!(
                        "{}: column `{column}` is null in row {}",
                        shown,
                        start + offset
                    )));
                };
                owned.push(value.to_string());
            }
            texts.push(owned);
        }
        let mut columns_iter = texts.into_iter();
        let (Some(first), Some(second)) = (columns_iter.next(), columns_iter.next()) else {
            return Err(StageError::Internal("two columns expected".into()));
        };
        rows.extend(first.into_iter().zip(second));
    }
    Ok(rows)
}

/// `truncation`'s YAML value.
fn truncation_name(truncation: crate::config::train::Truncation) -> &'static str {
    use crate::config::train::Truncation;
    match truncation {
        Truncation::PromptLeft => "truncation: prompt_left",
        Truncation::Right => "truncation: right",
        Truncation::Drop => "truncation: drop",
    }
}

/// Tokenize and fit prompt/completion pairs.
pub fn prepare_sequences(
    tokenizer: &TextTokenizer,
    rows: &[(String, String)],
    config: &TrainConfig,
    max_length: usize,
) -> Result<(Vec<Sequence>, FitCounts), String> {
    let mut counts = FitCounts::default();
    let mut sequences = Vec::with_capacity(rows.len());
    for (row, (prompt, completion)) in rows.iter().enumerate() {
        let example = tokenizer
            .encode_example(prompt, completion, config.add_eos)
            .map_err(|error| format!("row {row}: {error}"))?;
        sequences.extend(counts.fit(
            &example,
            max_length,
            tokenizer.prefix().len(),
            config.truncation,
        ));
    }
    Ok((sequences, counts))
}

/// The evaluation split as training reads it.
struct EvaluatedSplit {
    path: std::path::PathBuf,
    /// Rows read (at most `eval_max_rows`) and how they fitted.
    rows: usize,
    counts: FitCounts,
    sequences: Vec<Sequence>,
}

/// Read and tokenize the first `eval_max_rows` rows of `<eval_split>.parquet` of the data stage.
/// A missing split names the file and the splits the artifact has.
fn read_eval_split(
    data_dir: &Path,
    config: &TrainConfig,
    tokenizer: &TextTokenizer,
    max_length: usize,
) -> Result<EvaluatedSplit, StageError> {
    let split = config.eval_split();
    let path = data_dir.join(format!("{split}.parquet"));
    if !path.is_file() {
        let splits = super::evaluate::available_splits(data_dir);
        return Err(StageError::user(format!(
            "eval_split: stage `{}` has no split `{split}` (its splits: {})",
            config.data,
            splits.join(", ")
        )));
    }
    let shown = format!("eval_split `{split}` of stage `{}`", config.data);
    let mut rows = read_text_columns(&path, &shown, ["prompt", "completion"])?;
    if let Some(limit) = config.eval_max_rows {
        rows.truncate(limit);
    }
    let (sequences, counts) = prepare_sequences(tokenizer, &rows, config, max_length)
        .map_err(|error| StageError::user(format!("{shown}: {error}")))?;
    if sequences.is_empty() {
        return Err(StageError::user(format!(
            "{shown}: no example left to evaluate on ({} rows, {} dropped as too long, {} without completion tokens)",
            rows.len(),
            counts.dropped,
            counts.without_completion
        )));
    }
    Ok(EvaluatedSplit {
        path,
        rows: rows.len(),
        counts,
        sequences,
    })
}

/// summary.json's `evaluation` record: what was evaluated, the best step, the adapter kept and
/// why training stopped.
fn evaluation_record(
    config: &TrainConfig,
    evaluated: &EvaluatedSplit,
    outcome: &TrainOutcome,
) -> serde_json::Value {
    let state = &outcome.evaluation;
    let stopped = if outcome.stopped_early {
        let early = config.early_stopping.as_ref();
        format!(
            "early stopping at step {}: eval_loss did not improve by more than {} for {} evaluation(s)",
            outcome.steps,
            early.map_or(0.0, |early| early.min_delta),
            early.map_or(0, |early| early.patience),
        )
    } else {
        format!("completed all {} steps", outcome.planned_steps)
    };
    let keep = match config.keep() {
        KeepChoice::Best => "best",
        KeepChoice::Last => "last",
    };
    serde_json::json!({
        "split": config.eval_split(),
        "rows": evaluated.rows,
        "examples": evaluated.counts.examples,
        "truncated_examples": evaluated.counts.truncated,
        "dropped_examples": evaluated.counts.dropped,
        "every": config.eval_steps,
        "best_step": state.best_step,
        "best_eval_loss": state.best_loss,
        "best_eval_perplexity": state.best_loss.map(f64::exp),
        "keep": keep,
        "kept_step": outcome.kept_step,
        "stopped_early": outcome.stopped_early,
        "stopped": stopped,
        "planned_steps": outcome.planned_steps,
    })
}

fn file_digest(path: &Path) -> Result<String, StageError> {
    let bytes = std::fs::read(path)
        .map_err(|error| StageError::user(format!("{}: {error}", path.display())))?;
    Ok(blake3::hash(&bytes).to_hex().to_string())
}

fn write_json(path: &Path, value: &serde_json::Value) -> Result<(), StageError> {
    let mut text = serde_json::to_string_pretty(value).map_err(|error| {
        StageError::Internal(format!("serializing {}: {error}", path.display()))
    })?;
    text.push('\n');
    crate::peft::write_atomic(path, text.as_bytes())
        .map_err(|error| StageError::user(error.to_string()))
}

impl Stage for TrainStage {
    fn run(&self, ctx: &StageContext<'_>) -> Result<StageOutcome, StageError> {
        let config = &self.config;
        let user = |message: String| StageError::User(message);
        // `run --devices N` overrides the config's `devices`.
        let devices = ctx
            .options
            .devices
            .map(|count| DevicesConfig::Count(count.max(1)))
            .or_else(|| config.devices.clone());
        // The checkpoint directory of this fingerprint, held for the whole run (by this process:
        // the ranks of a data-parallel run write into it under this lock). Another run holding
        // it (same pipeline, stage and fingerprint) does not stop this one: it trains without
        // checkpoints rather than share them.
        let checkpoints = match ctx.checkpoint_dir {
            Some(dir) if config.checkpoint_every > 0 => {
                let held = CheckpointDir::acquire(dir).map_err(|error| user(error.to_string()))?;
                if held.is_none() {
                    ctx.progress.note(format!(
                        "another run holds the checkpoints in {}; training without checkpoints",
                        dir.display()
                    ));
                }
                held
            }
            _ => None,
        };
        if let Some(held) = &checkpoints {
            if !ctx.resume {
                held.clear().map_err(|error| user(error.to_string()))?;
            }
        }
        let job = TrainJob {
            config: config.clone(),
            device: ctx
                .options
                .device
                .clone()
                .unwrap_or_else(|| config.device.clone()),
            project_dir: ctx.project_dir.to_path_buf(),
            upstream_dir: ctx.upstream_dir(&config.data)?.to_path_buf(),
            out_dir: ctx.out_dir.to_path_buf(),
            fingerprint: ctx.fingerprint.to_string(),
            stage_seed: ctx.stage_seed(),
            checkpoint_dir: checkpoints.as_ref().map(|held| held.path().to_path_buf()),
            // The stage's inputs are the model's files, keyed `<model as written>/<file>` (a
            // shard may sit in a subfolder: the name is the path below the model folder).
            model_files: {
                let prefix = format!("{}/", crate::fingerprint::normalize_key(&config.model));
                ctx.inputs
                    .iter()
                    .map(|(key, digest)| {
                        let name = key.strip_prefix(&prefix).unwrap_or(key);
                        (name.to_string(), digest.clone())
                    })
                    .collect()
            },
        };
        // Under an outside launcher (torchrun's variables, several ranks) this is rank 0: the
        // world is the launcher's, and `devices` does not apply.
        let world = World::from_launcher_env().map_err(|error| user(error.to_string()))?;
        let summary = match devices {
            _ if world.world_size > 1 => ranks::lead(&world, &job, ctx.progress, ctx.cancel)?,
            None => train_job(&job, &Solo, ctx.progress, ctx.cancel)?,
            Some(devices) => ranks::train_on_devices(&job, &devices, ctx.progress, ctx.cancel)?,
        };
        // The artifact is complete: the checkpoints are no longer needed (what stays behind,
        // gc collects).
        if let Some(held) = checkpoints {
            let _ = held.remove();
        }
        Ok(StageOutcome { summary })
    }
}

/// One training run of a train stage, resolved from its context: what [`train_job`] needs, and
/// what each rank process of a data-parallel run receives (as JSON) from the stage that
/// launched it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TrainJob {
    pub config: TrainConfig,
    /// `cpu`, `cuda` or `cuda:N` (the run's `--device` or the config's); a rank of a
    /// data-parallel run trains on `cuda:LOCAL_RANK` instead.
    pub device: String,
    pub project_dir: PathBuf,
    /// The data stage's artifact (`<split>.parquet`).
    pub upstream_dir: PathBuf,
    /// Where the artifact goes (rank 0 writes it).
    pub out_dir: PathBuf,
    /// The stage's fingerprint digest (part of the checkpoints' run key).
    pub fingerprint: String,
    /// The seed derived from the pipeline seed and the stage name (used when `seed` is unset).
    pub stage_seed: u64,
    /// The checkpoint directory, its lock held (and, under `--force`, cleared) by the stage.
    pub checkpoint_dir: Option<PathBuf>,
    /// The base model's files as the stage's fingerprint hashed them (file name → blake3),
    /// recorded in base_model.json: a tokenizer or generation file that changes (and with it
    /// the merged export that copies it) changes the artifact even when the adapter does not,
    /// so what depends on it reruns. Empty outside the executor.
    #[serde(default)]
    pub model_files: BTreeMap<String, String>,
}

/// Train as rank `comm.rank()` of `comm.world_size()` (a world of one: [`Solo`]) and, on rank 0,
/// write the artifact into `job.out_dir`. Returns the outcome summary the run records (rank 0's;
/// the other ranks return an empty one).
pub fn train_job(
    job: &TrainJob,
    comm: &dyn Communicator,
    progress: &dyn ProgressSink,
    cancel: &AtomicBool,
) -> Result<BTreeMap<String, serde_json::Value>, StageError> {
    let config = &job.config;
    let user = |message: String| StageError::User(message);
    let main_rank = comm.rank() == 0;
    let device = select_device(&job.device).map_err(user)?;
    // The run's peak memory, from loading the model to the last step (recorded with the run,
    // not in the artifact).
    let peak_memory = PeakMemoryWatch::start(&device);
    let kind = if device.is_cuda() { "cuda" } else { "cpu" };
    let dtype_name = config.dtype.resolve(kind);
    let dtype = dtype_from_name(dtype_name);

    // Base model and tokenizer.
    let model_root = resolve_model_dir(&job.project_dir, &config.model).map_err(user)?;
    let model_dir = ModelDir::open(&model_root).map_err(|error| user(error.to_string()))?;
    let tokenizer = TextTokenizer::from_model_dir(&model_root).map_err(user)?;
    // The method's virtual tokens take positions before the text (validation refuses them
    // when they take all of them).
    let positions = model_dir.config().max_positions();
    let virtual_positions = config.method.virtual_positions();
    if virtual_positions >= positions {
        return Err(user(format!(
            "{virtual_positions} virtual tokens take all of the model's {positions} positions (config.json `{}`), leaving none for the text",
            model_dir.config().max_positions_key()
        )));
    }
    // A sliding window (Mistral, Qwen2) is the context only because peftpipe has no
    // sliding-window attention: a longer max_seq_len is refused (validate says so too), not cut.
    if let Some(window) = model_dir.config().limiting_sliding_window() {
        if config.max_seq_len().saturating_add(virtual_positions) > window {
            return Err(user(format!(
                "max_seq_len {} (+ {virtual_positions} virtual tokens) is longer than the model's sliding window ({} `sliding_window` {window}): peftpipe has no sliding-window attention; use max_seq_len: {} or less",
                config.max_seq_len(),
                model_dir.config_path().display(),
                window.saturating_sub(virtual_positions)
            )));
        }
    }
    let max_length = config.max_seq_len().min(positions - virtual_positions);

    // Data.
    let data_path = job.upstream_dir.join(format!("{}.parquet", config.split));
    let shown = format!("split `{}` of stage `{}`", config.split, config.data);
    if !data_path.is_file() {
        let splits = super::evaluate::available_splits(&job.upstream_dir);
        return Err(user(format!(
            "split: stage `{}` has no split `{}` (its splits: {})",
            config.data,
            config.split,
            splits.join(", ")
        )));
    }
    let rows = read_text_columns(&data_path, &shown, ["prompt", "completion"])?;
    let (sequences, counts) = prepare_sequences(&tokenizer, &rows, config, max_length)
        .map_err(|error| user(format!("{shown}: {error}")))?;
    if sequences.is_empty() {
        return Err(user(format!(
                "{shown}: no example left to train on ({} rows, {} dropped as too long, {} without completion tokens)",
                rows.len(),
                counts.dropped,
                counts.without_completion
            )));
    }
    if main_rank && (counts.truncated > 0 || counts.dropped > 0) {
        // Said where the run is watched, not only in summary.json (evaluate says it too).
        let capped = if max_length < config.max_seq_len() {
            format!(
                " (max_seq_len {} is capped at the model's context: {max_length})",
                config.max_seq_len()
            )
        } else {
            String::new()
        };
        // A cut that leaves no completion token drops the example (nothing to train on).
        let cut_off = match (counts.completion_cut_off, config.truncation) {
            (0, _) => "",
            (_, crate::config::train::Truncation::Right) => {
                " (the cut left them no completion token to train on: use a max_seq_len above their prompts, or truncation: prompt_left)"
            }
            _ => " (the cut left them no completion token to train on: use a larger max_seq_len)",
        };
        progress.note(format!(
            "{} of {} examples were longer than {max_length} tokens: {} cut ({}), {} dropped{cut_off}{capped}",
            counts.too_long(),
            rows.len(),
            counts.truncated,
            truncation_name(config.truncation),
            counts.dropped
        ));
    }

    // The held-out split evaluated during training (its first `eval_max_rows` rows).
    let evaluated = match config.eval_steps {
        Some(_) => Some(read_eval_split(
            &job.upstream_dir,
            config,
            &tokenizer,
            max_length,
        )?),
        None => None,
    };

    // Adapter + model.
    let seed = config.seed.unwrap_or(job.stage_seed);
    let tokenize = |text: &str| tokenizer.encode_prompt(text);
    let adapter = new_adapter(
        &config.method,
        &MethodContext {
            model_config: model_dir.config_json(),
            device: &device,
            seed,
            tokenize: Some(&tokenize),
        },
    )
    .map_err(|error| user(error.to_string()))?;
    // A checkpoint saved in bitsandbytes 4-bit trains only with qlora, with its settings.
    if let Some(stored) = model_dir.stored_quantization() {
        match adapter.base_quantization() {
                Some(quantization) => {
                    check_stored_base(&quantization, stored, &model_dir.config_path(), "method.qlora")
                        .map_err(|error| user(error.to_string()))?;
                }
                None => {
                    return Err(user(format!(
                        "{}: key `quantization_config`: the checkpoint is stored in bitsandbytes 4-bit, and method `{}` trains over a 16-bit base; use method qlora (LoRA over the 4-bit base as stored) or the checkpoint's 16-bit original",
                        model_dir.config_path().display(),
                        config.method.name()
                    )))
                }
            }
    }
    let model = model_dir
        .load(&device, dtype, adapter.linear_factory())
        .map_err(|error| user(error.to_string()))?;
    adapter
        .finish_injection(model.as_ref())
        .map_err(|error| user(error.to_string()))?;
    let trainable = adapter.trainable_parameter_count();
    // Activation checkpointing changes what is kept and recomputed, not the gradients.
    let whole_graph = CausalLmLoss {
        model: &*model,
        adapter: adapter.as_ref(),
    };
    let stash = crate::ops::offload::HostStash::new(config.activation_offload);
    let checkpointed = CheckpointedLoss {
        model: &*model,
        hooks: HookSource::Adapter(adapter.as_ref()),
        offload: config.activation_offload.then_some(&stash),
    };
    let model: &dyn LossModel = if config.activation_checkpointing {
        &checkpointed
    } else {
        &whole_graph
    };

    // The run key: what determines the result, so only this run's checkpoints resume. The
    // stage's fingerprint digest covers everything (weights, tokenizer, data, config, name,
    // seed, tool version, device); the rest is what this stage can see for itself, for
    // contexts without a fingerprint.
    let config_digest = file_digest(&model_root.join("config.json"))?;
    let run_key = {
        let mut hasher = blake3::Hasher::new();
        hasher.update(job.fingerprint.as_bytes());
        // The config as the fingerprint hashes it: settings that do not change the results
        // (`devices`, `activation_checkpointing`) leave the key alone, so a run resumes on
        // any number of GPUs.
        hasher.update(
            crate::config::StageConfig::Train(Box::new(config.clone()))
                .params()
                .to_string()
                .as_bytes(),
        );
        hasher.update(file_digest(&data_path)?.as_bytes());
        if let Some(evaluated) = &evaluated {
            hasher.update(file_digest(&evaluated.path)?.as_bytes());
        }
        hasher.update(config_digest.as_bytes());
        hasher.update(&seed.to_le_bytes());
        hasher.update(kind.as_bytes());
        hasher.update(dtype_name.as_bytes());
        hasher.update(crate::TOOL_BUILD.as_bytes());
        hasher.finalize().to_hex().to_string()
    };
    let checkpoint_dir = job.checkpoint_dir.clone();
    let trainer_settings = TrainerSettings {
        adamw: AdamWSettings {
            beta1: config.adam_beta1,
            beta2: config.adam_beta2,
            epsilon: config.adam_epsilon,
            weight_decay: config.weight_decay,
        },
        learning_rate: config.learning_rate,
        schedule: config.schedule,
        warmup_steps: config.warmup_steps,
        max_grad_norm: config.max_grad_norm,
        batch_size: config.batch_size,
        accumulation: config.gradient_accumulation_steps,
        epochs: config.epochs,
        max_steps: config.max_steps,
        sort_by_length: config.sort_by_length,
        seed,
        pad_id: tokenizer.pad_id(),
        checkpoint_every: config.checkpoint_every,
        checkpoint_dir: checkpoint_dir.clone(),
        run_key,
        synchronize_phases: false,
    };

    // The bar shows the raw and the smoothed loss (exponential moving average, bias
    // corrected as TensorBoard's smoothing), the learning rate and the latest evaluation;
    // the reporter adds the ETA.
    let mut smoothed = 0.0;
    let mut weight = 0.0;
    let mut last_eval: Option<(f64, u64)> = None;
    let mut observe = |metrics: &crate::train::StepMetrics| {
        smoothed = 0.9 * smoothed + 0.1 * metrics.loss;
        weight = 0.9 * weight + 0.1;
        let mut message = format!(
            "loss {:.4} (smoothed {:.4}) · lr {:.1e} · {:.0} tok/s",
            metrics.loss,
            smoothed / weight,
            metrics.lr,
            metrics.tokens_per_second,
        );
        if let Some(eval) = &metrics.eval {
            last_eval = Some((eval.loss, metrics.step));
        }
        // The latest evaluation stays on the bar until the next one.
        if let Some((loss, step)) = last_eval {
            message.push_str(&format!(" · eval loss {loss:.4} (step {step})"));
        }
        progress.progress(Progress {
            position: metrics.step,
            length: Some(metrics.total_steps),
            unit: "steps",
            message,
        });
    };
    let evaluation = match (config.eval_steps, &evaluated) {
        (Some(every), Some(evaluated)) => Some(Evaluation {
            sequences: &evaluated.sequences,
            every,
            batch_size: config.batch_size,
            early_stopping: config.early_stopping.as_ref().map(|early| EarlyStopping {
                patience: early.patience,
                min_delta: early.min_delta,
            }),
            keep_best: config.keep() == KeepChoice::Best,
        }),
        _ => None,
    };
    // A warmup as long as the run never reaches the learning rate asked for (validate can only
    // compare it with max_steps; the step count of an epoch-bound run is known here).
    let steps = crate::train::trainer::total_steps(sequences.len(), &trainer_settings);
    if main_rank && steps > 0 && config.warmup_steps >= steps {
        let schedule = crate::train::schedule::Schedule {
            kind: config.schedule,
            base_lr: config.learning_rate,
            warmup_steps: config.warmup_steps,
            total_steps: steps,
        };
        progress.note(format!(
            "warmup_steps {} is not below the run's {steps} optimizer steps: the learning rate rises the whole run and never reaches learning_rate {} (the last step uses {:.3e}); lower warmup_steps or train longer",
            config.warmup_steps,
            config.learning_rate,
            config.learning_rate * schedule.factor(steps - 1)
        ));
    }
    let outcome = crate::train::train_data_parallel(
        model,
        adapter.as_ref(),
        &sequences,
        evaluation.as_ref(),
        &trainer_settings,
        comm,
        cancel,
        &mut observe,
        // Said when the run starts, where it is watched (the outcome comes when training ends);
        // by rank 0 only: every rank reads the same checkpoint directory.
        &mut |resumed| {
            if !main_rank {
                return;
            }
            for damaged in resumed.damaged {
                progress.warning(format!("{damaged}: not resumed"));
            }
            if let (Some(step), Some(dir)) = (resumed.from, &checkpoint_dir) {
                progress.note(format!(
                    "resumed from the checkpoint at step {step} in {}",
                    dir.display()
                ));
            }
        },
    )
    .map_err(|error| match error {
        TrainError::Cancelled { .. } => StageError::Cancelled,
        other => user(format!("training: {other}")),
    })?;
    let peak = peak_memory.peak();

    // The artifact: rank 0 writes it (every rank holds the same adapter).
    if !main_rank {
        return Ok(BTreeMap::new());
    }
    adapter
        .save(&job.out_dir.join("adapter"), &config.model)
        .map_err(|error| user(error.to_string()))?;
    crate::peft::write_atomic(
        &job.out_dir.join("metrics.jsonl"),
        outcome.metrics_jsonl.as_bytes(),
    )
    .map_err(|error| user(error.to_string()))?;
    // Only what the inputs determine (no timings, no resume point): see the module docs.
    let mut summary = serde_json::json!({
        "final_loss": outcome.final_loss,
        "steps": outcome.steps,
        "tokens": outcome.tokens,
        "scored_tokens": outcome.scored_tokens,
        "trainable_parameters": trainable,
        "examples": counts.examples,
        "truncated_examples": counts.truncated,
        "dropped_examples": counts.dropped,
        "examples_without_completion": counts.without_completion,
        "seed": seed,
    });
    if let (Some(evaluated), Some(object)) = (&evaluated, summary.as_object_mut()) {
        object.insert(
            "evaluation".into(),
            evaluation_record(config, evaluated, &outcome),
        );
    }
    write_json(&job.out_dir.join("summary.json"), &summary)?;
    if config.tensorboard {
        crate::train::tensorboard::write_metrics(
            &job.out_dir.join(crate::train::tensorboard::EVENTS_FILE),
            &outcome.metrics_jsonl,
        )
        .map_err(|error| user(error.to_string()))?;
    }
    let mut base_record = serde_json::json!({
        "model": config.model,
        "config_digest": config_digest,
        "model_type": model_dir.config().model_type(),
        "device": kind,
        "dtype": dtype_name,
    });
    if let (false, Some(record)) = (job.model_files.is_empty(), base_record.as_object_mut()) {
        record.insert(
            "model_files".into(),
            serde_json::to_value(&job.model_files).unwrap_or_default(),
        );
    }
    // A QLoRA run: the 4-bit base evaluation, generation and export must rebuild (the
    // adapter folder itself is plain PEFT LoRA).
    if let (Some(quantization), Some(record)) =
        (adapter.base_quantization(), base_record.as_object_mut())
    {
        record.insert("quantization".into(), quantization.to_json());
    }
    write_json(&job.out_dir.join("base_model.json"), &base_record)?;
    let mut outcome_summary = std::collections::BTreeMap::new();
    for key in ["final_loss", "steps", "tokens", "trainable_parameters"] {
        outcome_summary.insert(key.to_string(), summary[key].clone());
    }
    // Timings, peak memory and the resume point: shown and recorded with the run, not in the
    // artifact.
    outcome_summary.insert(
        "wall_seconds".into(),
        serde_json::json!(outcome.wall_seconds),
    );
    if outcome.wall_seconds > 0.0 {
        outcome_summary.insert(
            "tokens_per_second".into(),
            serde_json::json!(outcome.tokens as f64 / outcome.wall_seconds),
        );
    }
    if let Some(peak) = peak {
        outcome_summary.insert("peak_memory_bytes".into(), serde_json::json!(peak.bytes));
        outcome_summary.insert(
            "peak_memory_source".into(),
            serde_json::to_value(peak.source).unwrap_or_default(),
        );
        if peak.shared {
            // Other CPU stages trained at the same time: the process's peak, theirs included.
            outcome_summary.insert("peak_memory_shared".into(), serde_json::json!(true));
        }
    }
    if let Some(step) = outcome.resumed_from {
        outcome_summary.insert("resumed_from".into(), serde_json::json!(step));
    }
    if let Some(record) = summary.get("evaluation") {
        for key in ["best_step", "best_eval_loss", "kept_step"] {
            if let Some(value) = record.get(key) {
                outcome_summary.insert(key.into(), value.clone());
            }
        }
        if outcome.stopped_early {
            outcome_summary.insert("early_stopped_at".into(), serde_json::json!(outcome.steps));
        }
    }
    Ok(outcome_summary)
}
