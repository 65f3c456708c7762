//! Config of the `train` stage kind (pure data: every field documented and defaulted where a
//! default makes sense) and its semantic checks. The PEFT method is an externally tagged enum
//! (`method: { lora: { r: 16 } }`) so further methods slot in beside LoRA.
//! Never loads weights: the model directory is checked by the [`super::probe::Probe`] (config.json
//! against the safetensors headers, the tokenizer against `vocab_size`), which also says which
//! linear layers the model has, so targets and rank are checked against their shapes.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

pub use super::devices::DevicesConfig;
pub use super::method::{
    resolve_targets, resolve_targets_for, LoraConfig, MethodConfig, TargetModulesConfig,
};
use super::{CheckContext, InputFile, Problem, StageSpec, UpstreamRef};

/// The `train` stage: attach a PEFT adapter to a pre-trained model and train it on the
/// prompt/completion pairs of an upstream template stage (loss on completion tokens only).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct TrainConfig {
    /// Upstream stage (a template stage) whose artifact holds `<split>.parquet` with Utf8
    /// columns `prompt` and `completion`.
    pub data: String,
    /// Which split file of the upstream artifact to train on (`<split>.parquet`).
    #[serde(default = "default_split")]
    pub split: String,
    /// Hugging Face model directory (config.json, model.safetensors or a sharded index,
    /// tokenizer.json, tokenizer_config.json). `$VAR`/`${VAR}` are expanded; relative paths
    /// resolve against the pipeline file's directory; `hf://org/name[@revision]` is a snapshot in
    /// the local Hugging Face cache. Its files are part of the fingerprint.
    pub model: String,
    /// The PEFT method and its hyperparameters (externally tagged: `lora: {...}`).
    #[serde(default)]
    pub method: MethodConfig,
    /// Peak learning rate (after warmup).
    #[serde(default = "default_learning_rate")]
    pub learning_rate: f64,
    /// Decoupled (AdamW) weight decay, applied to matrices only (never to biases or norms).
    #[serde(default)]
    pub weight_decay: f64,
    /// AdamW β1.
    #[serde(default = "default_beta1")]
    pub adam_beta1: f64,
    /// AdamW β2.
    #[serde(default = "default_beta2")]
    pub adam_beta2: f64,
    /// AdamW ε (the optimizer state is f32: at least f32's smallest normal value, about 1.2e-38).
    #[serde(default = "default_epsilon")]
    pub adam_epsilon: f64,
    /// Learning-rate decay after warmup (transformers' semantics).
    #[serde(default)]
    pub schedule: ScheduleKind,
    /// Optimizer steps of linear warmup from 0.
    #[serde(default)]
    pub warmup_steps: u64,
    /// Clip the global gradient norm to this value; null disables clipping.
    #[serde(default = "default_max_grad_norm")]
    pub max_grad_norm: Option<f64>,
    /// Examples per micro-batch.
    #[serde(default = "default_batch_size")]
    pub batch_size: usize,
    /// Micro-batches per optimizer step (the loss is averaged over all scored tokens of a step).
    /// An epoch's last step holds the micro-batches left (fewer when the epoch's batch count is
    /// not a multiple), never the next epoch's first, as in HF Trainer.
    #[serde(default = "default_one")]
    pub gradient_accumulation_steps: usize,
    /// Activation checkpointing: the forward keeps only each decoder layer's input and the backward
    /// recomputes the layer (less activation memory for about one more forward of compute). The
    /// gradients are the same as without it (bit-identical on the CPU), so it is not part of the
    /// stage fingerprint: toggling it does not retrain.
    #[serde(default)]
    pub activation_checkpointing: bool,
    /// With `activation_checkpointing` on CUDA: keep the decoder layers' inputs in page-locked
    /// host memory between forward and backward instead of on the GPU (copied out and back
    /// asynchronously on the GPU's stream), as Unsloth's offloaded checkpointing does: less GPU
    /// memory (one hidden state per layer) for the copies' time. Nothing to offload on the CPU.
    /// Not part of the fingerprint (the values are copied exactly).
    #[serde(default, skip_serializing_if = "is_false")]
    #[schemars(extend("default" = false))]
    pub activation_offload: bool,
    /// Passes over the training split (ignored when `max_steps` is set).
    #[serde(default = "default_epochs")]
    pub epochs: u32,
    /// Stop after this many optimizer steps (cycling through epochs as needed); overrides `epochs`.
    #[serde(default)]
    pub max_steps: Option<u64>,
    /// Maximum tokens per example (prompt + completion, special tokens included). Within the
    /// model's context (config.json `max_position_embeddings`, GPT-2's `n_positions`) less the
    /// method's virtual tokens (prompt and prefix tuning): a longer value is refused; the
    /// default, 512, is cut to a shorter context.
    // `None`: left out, the default (a written 512 is checked like any other value).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(with = "usize", extend("default" = DEFAULT_MAX_SEQ_LEN))]
    pub max_seq_len: Option<usize>,
    /// What to do with an example longer than `max_seq_len`.
    #[serde(default)]
    pub truncation: Truncation,
    /// Bucket examples of similar length into batches (less padding; the batch order stays seeded).
    #[serde(default)]
    pub sort_by_length: bool,
    /// Append the tokenizer's EOS token to every completion (so the model learns to stop).
    #[serde(default = "default_true")]
    pub add_eos: bool,
    /// Save a resumable checkpoint every N optimizer steps (0: never). Checkpoints live outside
    /// the artifact, under `.peftpipe/checkpoints/<pipeline>/<stage>/`.
    #[serde(default = "default_checkpoint_every")]
    pub checkpoint_every: u64,
    /// Evaluate every N optimizer steps (and after the last step) on `eval_split`: the mean NLL
    /// per completion token (the training loss's masking, no dropout) and its perplexity go into
    /// metrics.jsonl as `eval_loss` / `eval_perplexity` on that step's line. Unset: no evaluation
    /// during training.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1))]
    pub eval_steps: Option<u64>,
    /// Which split file of the upstream artifact (`<split>.parquet`) to evaluate on during
    /// training; default `eval` (as the evaluate stage). Only with `eval_steps`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(default = "default_eval_split")]
    pub eval_split: Option<String>,
    /// Evaluate on at most the first N rows of `eval_split` (file order) so an evaluation stays
    /// bounded in time; default 256; null evaluates every row. Only with `eval_steps`.
    #[serde(
        default = "default_eval_max_rows",
        skip_serializing_if = "is_default_eval_max_rows"
    )]
    #[schemars(extend("default" = DEFAULT_EVAL_MAX_ROWS), range(min = 1))]
    pub eval_max_rows: Option<usize>,
    /// Stop training when `metric` has not improved by more than `min_delta` for `patience`
    /// evaluations in a row. Needs `eval_steps`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub early_stopping: Option<EarlyStoppingConfig>,
    /// Which adapter is the stage's output: `best` (the lowest `eval_loss` seen; the default when
    /// `eval_steps` is set) or `last` (the adapter after the last step; the default, and the only
    /// choice, without evaluation). summary.json records the best step and why training stopped.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub keep: Option<KeepChoice>,
    /// Also write the metrics as TensorBoard scalars to `tensorboard/events.out.tfevents.0.peftpipe`
    /// in the stage's output (`tensorboard --logdir .peftpipe/out/<pipeline>/<stage>`). The file
    /// is part of the cached artifact, so it holds only what the inputs determine: wall times are
    /// 0 and timings (tokens/s) stay out, as in metrics.jsonl.
    #[serde(default, skip_serializing_if = "is_false")]
    #[schemars(extend("default" = false))]
    pub tensorboard: bool,
    /// `auto` (CUDA when built with it, else CPU), `cpu`, `cuda` or `cuda:N`.
    #[serde(default = "default_device")]
    pub device: String,
    /// Data-parallel training: one process per GPU (`[0, 1]`, a number N for GPUs 0..N, or
    /// `all`), each reading its strided shard of every batch, gradients averaged over NCCL before
    /// clipping and AdamW, so every rank holds the same adapter. `batch_size` and
    /// `gradient_accumulation_steps` stay global: the results do not depend on the number of GPUs
    /// beyond the order of floating-point sums, so this is not part of the fingerprint (an adapter
    /// trained on 2 GPUs is reused by a 1-GPU run, and a run resumes on any number). Needs a CUDA
    /// build with NCCL (`--features nccl`) for more than one GPU; with `device: cpu` only one
    /// device is accepted (a worker process, the same path). `peftpipe run --devices N`
    /// overrides it. Unset: train in the `run` process itself.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub devices: Option<DevicesConfig>,
    /// Compute dtype of the frozen model; adapter weights and optimizer state stay f32.
    #[serde(default)]
    pub dtype: DTypeChoice,
    /// Seed of initialisation, data order and dropout; default: derived from the pipeline seed
    /// and the stage name.
    #[serde(default)]
    pub seed: Option<u64>,
}

impl TrainConfig {
    /// Fields that change how a run executes but not its results: left out of the parameters the
    /// fingerprint hashes (see [`super::StageConfig::params`]).
    pub const NOT_HASHED: &'static [&'static str] =
        &["activation_checkpointing", "activation_offload", "devices"];
}

fn default_split() -> String {
    "train".into()
}
/// The schema's default of `eval_split` (the field stays `None` when not written, so configs
/// that do not evaluate keep their fingerprint).
fn default_eval_split() -> Option<String> {
    Some("eval".into())
}
/// Rows an evaluation during training reads at most, unless `eval_max_rows` says otherwise.
pub const DEFAULT_EVAL_MAX_ROWS: usize = 256;
fn default_eval_max_rows() -> Option<usize> {
    Some(DEFAULT_EVAL_MAX_ROWS)
}
fn is_default_eval_max_rows(value: &Option<usize>) -> bool {
    *value == default_eval_max_rows()
}
fn is_false(value: &bool) -> bool {
    !*value
}
fn default_min_delta() -> f64 {
    0.0
}

/// Early stopping on an evaluation metric (needs `eval_steps`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct EarlyStoppingConfig {
    /// Evaluations in a row without improvement after which training stops.
    #[schemars(range(min = 1))]
    pub patience: u32,
    /// The metric watched (lower is better).
    #[serde(default)]
    pub metric: EarlyStoppingMetric,
    /// An evaluation improves only when it beats the best so far by more than this.
    #[serde(default = "default_min_delta")]
    pub min_delta: f64,
}

/// Metrics early stopping can watch.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum EarlyStoppingMetric {
    /// Mean NLL per completion token on `eval_split` (perplexity is its exponential, so it
    /// ranks evaluations the same way).
    #[default]
    EvalLoss,
}

/// Which adapter a train stage with evaluation outputs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum KeepChoice {
    /// The adapter of the evaluation with the lowest `eval_loss` (ties: the earliest).
    Best,
    /// The adapter after the last step trained.
    Last,
}

impl TrainConfig {
    /// The split evaluated during training (`eval_split`, default `eval`).
    pub fn eval_split(&self) -> &str {
        self.eval_split.as_deref().unwrap_or("eval")
    }

    /// The adapter kept: `best` by default when evaluating, else `last`.
    pub fn keep(&self) -> KeepChoice {
        match (self.keep, self.eval_steps) {
            (Some(choice), _) => choice,
            (None, Some(_)) => KeepChoice::Best,
            (None, None) => KeepChoice::Last,
        }
    }
}
fn default_learning_rate() -> f64 {
    2e-4
}
fn default_beta1() -> f64 {
    0.9
}
fn default_beta2() -> f64 {
    0.999
}
fn default_epsilon() -> f64 {
    1e-8
}
fn default_max_grad_norm() -> Option<f64> {
    Some(1.0)
}
fn default_batch_size() -> usize {
    4
}
fn default_one() -> usize {
    1
}
fn default_epochs() -> u32 {
    1
}
/// `max_seq_len` when the key is left out.
pub const DEFAULT_MAX_SEQ_LEN: usize = 512;
fn default_true() -> bool {
    true
}
fn default_checkpoint_every() -> u64 {
    100
}
fn default_device() -> String {
    "auto".into()
}

/// Learning-rate decay after warmup.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum ScheduleKind {
    /// Constant after warmup.
    Constant,
    /// Linear decay to 0 at the last step.
    #[default]
    Linear,
    /// Half a cosine from the peak to 0 at the last step.
    Cosine,
}

/// What happens to an example longer than `max_seq_len`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum Truncation {
    /// Drop prompt tokens from the left (BOS kept) so the completion survives; a completion that
    /// alone is too long is cut on the right.
    #[default]
    PromptLeft,
    /// Cut the joined prompt + completion on the right; an example cut to no completion token
    /// (`max_seq_len` at or below its prompt) is not trained on: counted as truncated and dropped.
    Right,
    /// Skip the example (counted in the summary).
    Drop,
}

/// Compute dtype of the frozen model.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum DTypeChoice {
    /// bf16 on CUDA, f32 on CPU.
    #[default]
    Auto,
    F32,
    Bf16,
    F16,
}

impl DTypeChoice {
    /// The dtype name for a device kind (`cpu` / `cuda`).
    pub fn resolve(self, device_kind: &str) -> &'static str {
        match self {
            DTypeChoice::Auto if device_kind == "cuda" => "bf16",
            DTypeChoice::Auto | DTypeChoice::F32 => "f32",
            DTypeChoice::Bf16 => "bf16",
            DTypeChoice::F16 => "f16",
        }
    }
}

/// The device kind a device string selects (`cpu` or `cuda`), without touching any device:
/// `auto` is CUDA exactly when this binary was built with the `cuda` feature.
pub fn device_kind(device: &str) -> Result<&'static str, String> {
    match device {
        "auto" if cfg!(feature = "cuda") => Ok("cuda"),
        "auto" | "cpu" => Ok("cpu"),
        "cuda" => Ok("cuda"),
        other => match other.strip_prefix("cuda:") {
            Some(index) if index.parse::<usize>().is_ok() => Ok("cuda"),
            _ => Err(format!(
                "unknown device `{other}` (expected auto, cpu, cuda or cuda:N)"
            )),
        },
    }
}

/// Tokenizer and generation files of a model folder besides config.json and the weights: read
/// by the tokenizer (tokenizer.json, tokenizer_config.json, generation_config.json's BOS/EOS/pad
/// ids) or copied into a merged export when the base has them.
pub const TOKENIZER_FILES: &[&str] = &[
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

/// Why a shard file name of model.safetensors.index.json's `weight_map` is refused, if it is: a
/// shard must lie in the model folder (a subfolder is fine), so an absolute path, a `..`
/// component or an empty name is refused wherever the index is read (loading, hashing, download).
pub fn shard_name_problem(shard: &str) -> Option<String> {
    use std::path::Component;
    if shard.is_empty() {
        return Some("the shard file name is empty".to_string());
    }
    let outside = Path::new(shard)
        .components()
        .any(|part| !matches!(part, Component::Normal(_) | Component::CurDir));
    outside.then(|| {
        format!(
            "shard `{shard}` is outside the model folder (an absolute path or a `..` component); shards must lie in the folder"
        )
    })
}

/// Files of a model directory that change what a stage over the model computes or writes, each
/// as (its name relative to the folder, its path): config.json, every [`TOKENIZER_FILES`] entry
/// it has, and the weights the loader reads — model.safetensors when it is there, else
/// model.safetensors.index.json and every shard its `weight_map` names (in subfolders too, under
/// any file name). Other safetensors files in the folder are not read, so they are not listed; a
/// shard the index names but the folder lacks, or an index that does not parse, is left to the
/// loader's error. A shard name outside the folder ([`shard_name_problem`]) is an error naming
/// the index and the entry.
pub fn model_files(dir: &Path) -> Result<Vec<(String, PathBuf)>, String> {
    // Worded as the model check words it, so validation reports it once.
    if !dir.is_dir() {
        return Err(format!("model directory {} does not exist", dir.display()));
    }
    let mut files: Vec<(String, PathBuf)> = Vec::new();
    let mut add = |name: &str| {
        let path = dir.join(name);
        if path.is_file() && !files.iter().any(|(known, _)| known == name) {
            files.push((name.to_string(), path));
        }
    };
    add("config.json");
    for name in TOKENIZER_FILES {
        add(name);
    }
    if dir.join("model.safetensors").is_file() {
        add("model.safetensors");
    } else {
        let index = dir.join("model.safetensors.index.json");
        add("model.safetensors.index.json");
        let shards = std::fs::read(&index)
            .ok()
            .and_then(|bytes| serde_json::from_slice::<serde_json::Value>(&bytes).ok())
            .and_then(|json| json.get("weight_map").cloned());
        if let Some(serde_json::Value::Object(map)) = shards {
            for (tensor, file) in &map {
                let Some(file) = file.as_str() else {
                    continue;
                };
                if let Some(problem) = shard_name_problem(file) {
                    return Err(format!(
                        "{}: key `weight_map.{tensor}`: {problem}",
                        index.display()
                    ));
                }
                add(file);
            }
        }
    }
    files.sort();
    if !files.iter().any(|(name, _)| name == "config.json") {
        return Err(format!(
            "model directory {} has no config.json",
            dir.display()
        ));
    }
    Ok(files)
}

impl TrainConfig {
    /// Maximum tokens per example: the written `max_seq_len`, or the default (512).
    pub fn max_seq_len(&self) -> usize {
        self.max_seq_len.unwrap_or(DEFAULT_MAX_SEQ_LEN)
    }

    /// Evaluation during training: `eval_steps` and what depends on it.
    /// A written `max_seq_len` (+ the method's virtual tokens) past the model's context
    /// (config.json `max_position_embeddings`, GPT-2's `n_positions`) is refused: peftpipe
    /// never computes past it (transformers' RoPE would extrapolate; axolotl raises
    /// `max_position_embeddings` with a warning), so such a value would be cut to the context.
    /// The default (512) is cut to a shorter context as documented, and the run says so when
    /// it cuts an example. With RoPE scaling (llama3, linear) `max_position_embeddings` is the
    /// scaled context, as transformers defines it. A sliding window that is the context is
    /// checked by the caller, naming its own key.
    fn check_max_seq_len_against_context(
        &self,
        at: &str,
        context: &super::probe::ModelContext,
        problems: &mut Vec<Problem>,
    ) {
        let Some(max_seq_len) = self.max_seq_len else {
            return;
        };
        if context.sliding_window.is_some() {
            return;
        }
        let positions = context.max_positions;
        let virtual_positions = self.method.virtual_positions();
        // Virtual tokens that take every position are the method check's to report.
        if virtual_positions >= positions
            || max_seq_len.saturating_add(virtual_positions) <= positions
        {
            return;
        }
        let virtual_text = virtual_tokens_text(virtual_positions);
        problems.push(
            Problem::new(
                format!("{at}.max_seq_len"),
                format!(
                    "{max_seq_len}{virtual_text} is longer than the model's context (config.json `{}` {positions}): peftpipe never computes past it, so every example would be cut to {}",
                    context.positions_key,
                    positions - virtual_positions
                ),
            )
            .about_value()
            .with_hint(format!(
                "use max_seq_len: {} or less (left out, the default {DEFAULT_MAX_SEQ_LEN} is cut to the model's context)",
                positions - virtual_positions,
            )),
        );
    }

    fn check_evaluation(&self, cx: &CheckContext<'_>, at: &str, problems: &mut Vec<Problem>) {
        let problem =
            |key: &str, message: String| Problem::new(format!("{at}.{key}"), message).about_value();
        let Some(every) = self.eval_steps else {
            let dependents = [
                ("eval_split", self.eval_split.is_some()),
                (
                    "eval_max_rows",
                    !is_default_eval_max_rows(&self.eval_max_rows),
                ),
                ("early_stopping", self.early_stopping.is_some()),
                ("keep", self.keep == Some(KeepChoice::Best)),
            ];
            for (key, set) in dependents {
                if set {
                    problems.push(
                        problem(key, format!("`{key}` needs evaluation during training"))
                            .with_hint("set eval_steps: N to evaluate every N optimizer steps"),
                    );
                }
            }
            return;
        };
        if every == 0 {
            problems.push(problem("eval_steps", "must be at least 1".into()));
        }
        if self.eval_max_rows == Some(0) {
            problems.push(
                problem("eval_max_rows", "is 0: nothing to evaluate".into())
                    .with_hint("use null to evaluate every row of the split"),
            );
        }
        super::template::check_split_read(
            cx,
            &self.data,
            self.eval_split(),
            &format!("{at}.eval_split"),
            problems,
        );
        if let Some(early) = &self.early_stopping {
            if early.patience == 0 {
                problems.push(problem(
                    "early_stopping.patience",
                    "must be at least 1 (evaluations without improvement)".into(),
                ));
            }
            if !(early.min_delta >= 0.0 && early.min_delta.is_finite()) {
                problems.push(problem(
                    "early_stopping.min_delta",
                    format!("must be 0 or more, got {}", early.min_delta),
                ));
            }
        }
    }
}

/// A model saved in bitsandbytes 4-bit trains only with qlora, whose `quant_type`,
/// `double_quant` and `block_size` must be the checkpoint's (its weights are used as stored).
fn check_stored_4bit(
    method: &MethodConfig,
    stored: &super::probe::Stored4bit,
    at: &str,
    problems: &mut Vec<Problem>,
) {
    let MethodConfig::Qlora(qlora) = method else {
        problems.push(
            Problem::new(
                format!("{at}.method"),
                format!(
                    "{}: the model is saved in bitsandbytes 4-bit (quantization_config), and method `{}` trains over a 16-bit base",
                    stored.config_path,
                    method.name()
                ),
            )
            .with_hint("use method qlora (LoRA over the 4-bit base as stored), or the model's 16-bit original"),
        );
        return;
    };
    stored.check_settings(
        (
            qlora.quant_type.name(),
            qlora.double_quant,
            qlora.block_size,
        ),
        &format!("{at}.method.qlora"),
        "train from the 16-bit original",
        problems,
    );
}

impl StageSpec for TrainConfig {
    fn upstream(&self) -> Vec<UpstreamRef> {
        vec![UpstreamRef {
            key: "data",
            stage: self.data.clone(),
        }]
    }

    fn input_files(&self, project_dir: &Path) -> Result<Vec<InputFile>, String> {
        let dir = super::hub::resolve_model_dir(project_dir, &self.model)?;
        let written = self.model.trim_end_matches('/');
        Ok(model_files(&dir)?
            .into_iter()
            .map(|(name, path)| InputFile {
                key: format!("{written}/{name}"),
                path,
            })
            .collect())
    }

    fn output_columns(&self, _cx: &CheckContext<'_>, _stage: &str) -> Option<Vec<String>> {
        None
    }

    fn check(&self, cx: &CheckContext<'_>, at: &str, problems: &mut Vec<Problem>) {
        let problem =
            |key: &str, message: String| Problem::new(format!("{at}.{key}"), message).about_value();
        super::template::check_split_read(
            cx,
            &self.data,
            &self.split,
            &format!("{at}.split"),
            problems,
        );
        if let Some(columns) = cx.columns.get(&self.data) {
            for needed in ["prompt", "completion"] {
                if !columns.iter().any(|c| c == needed) {
                    problems.push(problem(
                        "data",
                        format!(
                            "stage `{}` has no `{needed}` column (columns: {})",
                            self.data,
                            columns.join(", ")
                        ),
                    ));
                }
            }
        }
        if let Err(message) = device_kind(&self.device) {
            problems.push(problem("device", message));
        }
        if self.activation_offload && !self.activation_checkpointing {
            problems.push(problem(
                "activation_offload",
                "offloads the layer inputs activation checkpointing keeps: set activation_checkpointing: true too".into(),
            ));
        }
        if let Some(message) = self.devices.as_ref().and_then(DevicesConfig::check) {
            problems.push(problem("devices", message));
        }
        if let (Some(devices), Ok("cpu")) = (&self.devices, device_kind(&self.device)) {
            if devices.check().is_none()
                && devices != &DevicesConfig::Count(1)
                && devices != &DevicesConfig::List(vec![0])
            {
                problems.push(problem(
                    "devices",
                    "data-parallel training over several devices needs CUDA, and `device` is cpu (on the CPU only one device is accepted)".into(),
                ));
            }
        }
        if !(self.learning_rate > 0.0 && self.learning_rate.is_finite()) {
            problems.push(problem(
                "learning_rate",
                format!("must be positive, got {}", self.learning_rate),
            ));
        }
        if self.weight_decay < 0.0 {
            problems.push(problem("weight_decay", "must not be negative".into()));
        }
        for (key, value) in [
            ("adam_beta1", self.adam_beta1),
            ("adam_beta2", self.adam_beta2),
        ] {
            if !(0.0..1.0).contains(&value) {
                problems.push(problem(key, format!("must be in [0, 1), got {value}")));
            }
        }
        if self.max_grad_norm.is_some_and(|norm| norm <= 0.0) {
            problems.push(problem(
                "max_grad_norm",
                "must be positive (or null to disable)".into(),
            ));
        }
        if self.batch_size == 0 {
            problems.push(problem("batch_size", "must be at least 1".into()));
        }
        if self.gradient_accumulation_steps == 0 {
            problems.push(problem(
                "gradient_accumulation_steps",
                "must be at least 1".into(),
            ));
        }
        if self.max_steps.is_none() && self.epochs == 0 {
            problems.push(problem(
                "epochs",
                "must be at least 1 (or set max_steps)".into(),
            ));
        }
        if self.max_steps == Some(0) {
            problems.push(problem("max_steps", "must be at least 1".into()));
        }
        if self.max_seq_len() < 2 {
            problems.push(problem("max_seq_len", "must be at least 2".into()));
        }
        if !(self.adam_epsilon > 0.0 && self.adam_epsilon.is_finite()) {
            problems.push(problem(
                "adam_epsilon",
                format!("must be positive, got {}", self.adam_epsilon),
            ));
        } else if self.adam_epsilon < f64::from(f32::MIN_POSITIVE) {
            // The optimizer state is f32: a smaller ε is 0 there (or a subnormal a GPU flushes
            // to 0), and a zero gradient then divides 0 by 0 into a NaN loss.
            problems.push(
                problem(
                    "adam_epsilon",
                    format!(
                        "{:e} is 0 in f32, the optimizer's precision (the smallest usable value is {:e}): a parameter with a zero gradient would become NaN",
                        self.adam_epsilon,
                        f32::MIN_POSITIVE
                    ),
                )
                .with_hint("AdamW's usual ε is 1e-8"),
            );
        }
        if let Some(max_steps) = self.max_steps.filter(|&steps| steps > 0) {
            if self.warmup_steps >= max_steps {
                problems.push(problem(
                    "warmup_steps",
                    format!(
                        "{} warmup steps leave none of the {max_steps} max_steps at the peak learning rate; use fewer",
                        self.warmup_steps
                    ),
                ));
            }
        }
        self.check_evaluation(cx, at, problems);
        self.method.check(at, problems);
        // The model: it must load (config.json, weights, tokenizer) and the targets must fit it.
        let dir = match super::hub::resolve_model_dir(cx.project_dir, &self.model) {
            Ok(dir) => dir,
            Err(message) => {
                problems.push(problem("model", message));
                return;
            }
        };
        let facts = cx.probe.check_model(&dir);
        for message in &facts.problems {
            problems.push(problem("model", message.clone()));
        }
        if self.add_eos && facts.has_eos == Some(false) {
            problems.push(
                Problem::new(
                    format!("{at}.add_eos"),
                    format!(
                        "the tokenizer of {} declares no EOS token to append",
                        dir.display()
                    ),
                )
                .about_value()
                .with_hint("set add_eos: false, or give tokenizer_config.json an eos_token"),
            );
        }
        if let Some(stored) = &facts.stored_4bit {
            check_stored_4bit(&self.method, stored, at, problems);
        }
        if let Some(layers) = &facts.linear_layers {
            self.method.check_against_model(
                at,
                facts.model_type.as_deref().unwrap_or(""),
                layers,
                problems,
            );
        }
        if let Some(context) = &facts.context {
            self.method.check_against_context(at, context, problems);
            self.check_max_seq_len_against_context(at, context, problems);
            if let Some(window) = context.sliding_window {
                let virtual_positions = self.method.virtual_positions();
                let longest = self.max_seq_len().saturating_add(virtual_positions);
                if longest > window {
                    let virtual_text = virtual_tokens_text(virtual_positions);
                    problems.push(
                        Problem::new(
                            format!("{at}.max_seq_len"),
                            format!(
                                "{}{virtual_text} is longer than the model's sliding window (config.json `sliding_window` {window}): peftpipe has no sliding-window attention, so a longer sequence would not be computed as transformers computes it",
                                self.max_seq_len()
                            ),
                        )
                        .about_value()
                        .with_hint(format!(
                            "use max_seq_len: {} or less",
                            window.saturating_sub(virtual_positions)
                        )),
                    );
                }
            }
        }
    }

    fn device(&self) -> Option<&str> {
        Some(&self.device)
    }

    fn environment(&self) -> BTreeMap<String, String> {
        let kind = device_kind(&self.device).unwrap_or("cpu");
        BTreeMap::from([
            ("device".to_string(), kind.to_string()),
            ("dtype".to_string(), self.dtype.resolve(kind).to_string()),
        ])
    }
}

/// ` (+ N virtual tokens)` after a sequence length, or nothing without virtual tokens.
fn virtual_tokens_text(virtual_positions: usize) -> String {
    if virtual_positions > 0 {
        format!(" (+ {virtual_positions} virtual tokens)")
    } else {
        String::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// As the loader does: YAML → JSON value → the typed config.
    fn parse(yaml: &str) -> Result<TrainConfig, String> {
        let value: serde_json::Value = serde_norway::from_str(yaml).map_err(|e| e.to_string())?;
        serde_json::from_value(value).map_err(|e| e.to_string())
    }

    #[test]
    fn model_files_are_the_files_the_loader_reads() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        let write = |name: &str, text: &str| {
            let path = root.join(name);
            std::fs::create_dir_all(path.parent().unwrap()).unwrap();
            std::fs::write(path, text).unwrap();
        };
        let names = |files: Vec<(String, PathBuf)>| -> Vec<String> {
            for (name, path) in &files {
                assert_eq!(path, &root.join(name));
            }
            files.into_iter().map(|(name, _)| name).collect()
        };
        write("config.json", "{}");
        write("tokenizer.json", "{}");
        write("notes.txt", "");
        // Sharded: the index and every shard it names, in a subfolder or under any file name;
        // a safetensors file the index does not name is not read.
        write(
            "model.safetensors.index.json",
            r#"{"weight_map": {"a": "sub/model-00001-of-00002.safetensors", "b": "shard-2.st", "c": "shard-2.st"}}"#,
        );
        write("sub/model-00001-of-00002.safetensors", "");
        write("shard-2.st", "");
        write("zz-extra.safetensors", "");
        assert_eq!(
            names(model_files(root).unwrap()),
            [
                "config.json",
                "model.safetensors.index.json",
                "shard-2.st",
                "sub/model-00001-of-00002.safetensors",
                "tokenizer.json"
            ]
        );
        // model.safetensors wins over the index (as the loader decides): only it is read.
        write("model.safetensors", "");
        assert_eq!(
            names(model_files(root).unwrap()),
            ["config.json", "model.safetensors", "tokenizer.json"]
        );
    }

    /// Probe item: a `weight_map` entry naming a file outside the model folder (absolute, or
    /// through `..`) was hashed into the cache key (an absolute path in it, too); it is refused,
    /// naming the index and the entry.
    #[test]
    fn model_files_refuse_shards_outside_the_model_folder() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("model");
        std::fs::create_dir_all(&root).unwrap();
        std::fs::write(root.join("config.json"), "{}").unwrap();
        std::fs::write(dir.path().join("outside.safetensors"), "").unwrap();
        let outside = dir.path().join("outside.safetensors");
        for shard in [
            outside.display().to_string(),
            "../outside.safetensors".to_string(),
            "sub/../../outside.safetensors".to_string(),
        ] {
            std::fs::write(
                root.join("model.safetensors.index.json"),
                serde_json::json!({"weight_map": {"lm_head.weight": shard}}).to_string(),
            )
            .unwrap();
            let error = model_files(&root).unwrap_err();
            assert!(
                error.contains("model.safetensors.index.json")
                    && error.contains("weight_map.lm_head.weight")
                    && error.contains(&shard)
                    && error.contains("outside the model folder"),
                "{error}"
            );
        }
    }

    #[test]
    fn defaults_fill_everything_but_data_and_model() {
        let config = parse("data: prompts\nmodel: models/x\n").unwrap();
        assert_eq!(config.method, MethodConfig::Lora(LoraConfig::default()));
        assert_eq!(
            (config.batch_size, config.epochs, config.max_seq_len()),
            (4, 1, 512)
        );
        assert_eq!(config.truncation, Truncation::PromptLeft);
        assert_eq!(config.schedule, ScheduleKind::Linear);
        assert_eq!(config.max_grad_norm, Some(1.0));
    }

    #[test]
    fn target_modules_forms() {
        let names =
            parse("data: d\nmodel: m\nmethod: {lora: {r: 4, target_modules: [q_proj, v_proj]}}")
                .unwrap();
        let MethodConfig::Lora(lora) = names.method else {
            panic!("a LoRA method")
        };
        assert_eq!(
            lora.target_modules,
            Some(TargetModulesConfig::Names(vec![
                "q_proj".into(),
                "v_proj".into()
            ]))
        );
        let all = parse("data: d\nmodel: m\nmethod: {lora: {target_modules: all-linear}}").unwrap();
        let MethodConfig::Lora(lora) = all.method else {
            panic!("a LoRA method")
        };
        assert_eq!(lora.target_modules, Some(TargetModulesConfig::AllLinear));
        let regex =
            parse("data: d\nmodel: m\nmethod: {lora: {target_modules: {regex: '.*q_proj'}}}")
                .unwrap();
        let MethodConfig::Lora(lora) = regex.method else {
            panic!("a LoRA method")
        };
        assert_eq!(
            lora.target_modules,
            Some(TargetModulesConfig::Regex(".*q_proj".into()))
        );
        // A bare string other than all-linear is ambiguous: rejected with a hint.
        let error =
            parse("data: d\nmodel: m\nmethod: {lora: {target_modules: q_proj}}").unwrap_err();
        assert!(error.contains("[q_proj]"), "{error}");
        // Round trip through serde (what the fingerprint hashes).
        let value = serde_json::to_value(TargetModulesConfig::Regex("x".into())).unwrap();
        assert_eq!(value, serde_json::json!({"regex": "x"}));
    }

    /// The auxiliary fields are hashed when given (a change reruns the train stage, with the
    /// changed key as the reason) and absent otherwise (caches of existing pipelines stay fresh).
    #[test]
    fn auxiliary_fields_enter_the_fingerprint_only_when_given() {
        let params = |yaml: &str| {
            let config = parse(yaml).unwrap();
            let mut flat = BTreeMap::new();
            crate::fingerprint::flatten_params(
                "train",
                &super::super::StageConfig::Train(Box::new(config)).params(),
                &mut flat,
            );
            flat
        };
        let plain = params("data: d\nmodel: m\nmethod: {lora: {r: 4}}");
        assert!(!plain
            .keys()
            .any(|key| key.contains("trainable_token") || key.contains("modules_to_save")));
        let eos = params("data: d\nmodel: m\nmethod: {lora: {r: 4, trainable_token_indices: [2]}}");
        assert_eq!(
            eos.get("train.method.lora.trainable_token_indices[0]"),
            Some(&serde_json::json!(2))
        );
        let other =
            params("data: d\nmodel: m\nmethod: {lora: {r: 4, trainable_token_indices: [3]}}");
        assert_ne!(eos, other);
        let head = params("data: d\nmodel: m\nmethod: {lora: {r: 4, modules_to_save: [lm_head]}}");
        assert_eq!(
            head.get("train.method.lora.modules_to_save[0]"),
            Some(&serde_json::json!("lm_head"))
        );
    }

    #[test]
    fn unknown_keys_are_errors() {
        assert!(parse("data: d\nmodel: m\nlerning_rate: 1").is_err());
        assert!(parse("data: d\nmodel: m\nmethod: {lora: {rank: 4}}").is_err());
        assert!(parse("data: d\nmodel: m\nmethod: {dora: {}}").is_err());
    }

    #[test]
    fn evaluation_settings_are_hashed_only_when_written() {
        let params =
            |yaml: &str| super::super::StageConfig::Train(Box::new(parse(yaml).unwrap())).params();
        // A config that does not evaluate hashes exactly the fields it hashed before.
        let plain = params("data: d\nmodel: m\n");
        for key in [
            "eval_steps",
            "eval_split",
            "eval_max_rows",
            "early_stopping",
            "keep",
            "tensorboard",
        ] {
            assert!(plain.get(key).is_none(), "{key} in {plain}");
        }
        let every_8 = params("data: d\nmodel: m\neval_steps: 8\n");
        assert_eq!(every_8["eval_steps"], 8);
        assert_ne!(every_8, params("data: d\nmodel: m\neval_steps: 4\n"));
        let early = params("data: d\nmodel: m\neval_steps: 8\nearly_stopping: {patience: 2}\n");
        assert_eq!(
            early["early_stopping"],
            serde_json::json!({"patience": 2, "metric": "eval_loss", "min_delta": 0.0})
        );
        assert_eq!(
            params("data: d\nmodel: m\neval_steps: 8\neval_max_rows: null\n")["eval_max_rows"],
            serde_json::Value::Null
        );
        assert_eq!(
            params("data: d\nmodel: m\ntensorboard: true\n")["tensorboard"],
            true
        );
    }

    #[test]
    fn keep_defaults_to_best_only_when_evaluating() {
        assert_eq!(
            parse("data: d\nmodel: m\n").unwrap().keep(),
            KeepChoice::Last
        );
        let evaluating = parse("data: d\nmodel: m\neval_steps: 5\n").unwrap();
        assert_eq!(evaluating.keep(), KeepChoice::Best);
        assert_eq!(evaluating.eval_split(), "eval");
        assert_eq!(evaluating.eval_max_rows, Some(DEFAULT_EVAL_MAX_ROWS));
        let last = parse("data: d\nmodel: m\neval_steps: 5\nkeep: last\n").unwrap();
        assert_eq!(last.keep(), KeepChoice::Last);
        assert!(parse("data: d\nmodel: m\nkeep: newest\n").is_err());
        assert!(parse("data: d\nmodel: m\nearly_stopping: {patience: 1, metric: loss}\n").is_err());
        assert!(parse("data: d\nmodel: m\nearly_stopping: {patients: 1}\n").is_err());
    }

    #[test]
    fn device_and_dtype_resolution() {
        assert_eq!(device_kind("cpu").unwrap(), "cpu");
        assert_eq!(device_kind("cuda:1").unwrap(), "cuda");
        assert!(device_kind("cuda:x").is_err());
        assert!(device_kind("tpu").is_err());
        assert_eq!(DTypeChoice::Auto.resolve("cuda"), "bf16");
        assert_eq!(DTypeChoice::Auto.resolve("cpu"), "f32");
    }
}
