//! Config of the `evaluate` stage kind and its semantic checks: which trained model and which
//! rendered split to evaluate, and which metrics (loss / perplexity over completion tokens,
//! classification accuracy by candidate scoring, exact match of greedy generations, samples).
//! Pure data plus checks: this module never loads a model or reads Parquet beyond what
//! [`CheckContext`] already knows (the template stage's output columns).

use std::collections::BTreeMap;
use std::path::Path;

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::method::{block_size_problem, FourBitSettings};
use super::probe::ModelFacts;
use super::template::FewShotStrategy;
use super::train::DTypeChoice;
use super::{CheckContext, InputFile, Problem, StageConfig, StageKind, StageSpec, UpstreamRef};

/// The name of the base model's row in the comparison (metrics, samples, the report).
pub const BASE_ROW: &str = "base";

/// The `evaluate` stage: every metric for the base model **and** each candidate — the adapter of
/// `model`, every adapter of `adapters`, the base model with `few_shot` demonstrations — on the
/// same rows, written to `metrics.json` and one comparison table (`comparison.json`,
/// `comparison.md`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct EvaluateConfig {
    /// Upstream `train` stage: its base model and its adapter are both evaluated (`metrics.json`
    /// then pairs them as `base` / `adapted`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub model: Option<String>,
    /// More upstream `train` stages whose adapters are compared on the same rows (`train@*`
    /// stands for every expansion of a matrix stage). All must train the same base model.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub adapters: Vec<String>,
    /// PEFT adapters made elsewhere, each a candidate on the base model: a folder holding
    /// `adapter_config.json` and `adapter_model.safetensors` (relative to the pipeline file;
    /// any method PEFT saves that peftpipe loads), or `hf://org/name[@revision]` found in the
    /// local Hugging Face cache. Their files are part of the fingerprint; the comparison names
    /// each by its folder (`hf://` ids by `org/name`). Without a train stage, `base_model` is
    /// required.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub external_adapters: Vec<String>,
    /// The base model to evaluate when no train stage is named (a model directory or
    /// `hf://org/name`, as the train stage's `model`); its files are part of the fingerprint.
    /// With train stages it must be their model.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub base_model: Option<String>,
    /// Score the base row and `external_adapters` over the base model stored in bitsandbytes
    /// 4-bit, as PEFT scores an adapter trained with QLoRA elsewhere over a model loaded with
    /// `BitsAndBytesConfig(load_in_4bit=True, ...)`: a 16-bit `base_model` is quantized as it
    /// loads (bit-exact with bitsandbytes), one saved in 4 bits is used as stored (these
    /// settings must then be its own). `{}` takes QLoRA's settings (nf4, double quantization,
    /// blocks of 64). A train stage's candidate is always scored over the base it trained on
    /// (its run records it); without this field the base row is 4-bit only when every such
    /// candidate trained over the same 4-bit base.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub base_quantization: Option<FourBitSettings>,
    /// Few-shot prompting as a method: the base model, untrained, on each row's prompt preceded
    /// by k demonstrations (their prompt and completion) drawn from a template stage's `train`
    /// split, one candidate per k.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub few_shot: Option<FewShotEvaluation>,
    /// Upstream `template` stage whose rendered rows (`prompt`, `completion`) are evaluated.
    pub data: String,
    /// Split of the template stage to evaluate (its `<split>.parquet`).
    #[serde(default = "default_split")]
    #[schemars(default = "default_split")]
    pub split: String,
    /// Evaluate only the first N rows of the split (file order); every row when unset.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_rows: Option<usize>,
    /// Which metrics to compute.
    #[serde(default)]
    pub metrics: MetricsConfig,
    /// Number of sample generations (greedy) to show for the base and the adapted model (for
    /// the base and every candidate when no single `model` is named), taken from the first rows
    /// of the split.
    #[serde(default = "default_samples")]
    #[schemars(default = "default_samples")]
    pub samples: usize,
    /// Longest sample generation, in new tokens.
    #[serde(default = "default_sample_max_new_tokens")]
    #[schemars(default = "default_sample_max_new_tokens")]
    pub sample_max_new_tokens: usize,
    /// Sequences per forward pass: scored together (padded to the longest in the batch), and
    /// prompts generated together for exact match and samples (left-padded; each prompt gets
    /// the greedy text it gets alone).
    #[serde(default = "default_batch_size")]
    #[schemars(default = "default_batch_size")]
    pub batch_size: usize,
    /// Longest sequence in tokens; longer prompts lose tokens from the left, down to the BOS
    /// token, and only a completion that does not fit even then is cut on the right (its EOS
    /// first). At least 2, and 3 when the stage generates (samples, exact match). Default: the
    /// model's context (`max_position_embeddings`, GPT-2's `n_positions`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_length: Option<usize>,
    /// Append the tokenizer's EOS token to every scored completion and candidate, as the train
    /// stage's `add_eos` does (keep the two equal so the loss is measured on what was trained).
    #[serde(default = "default_true")]
    #[schemars(default = "default_true")]
    pub add_eos: bool,
    /// Where to evaluate: `auto` (CUDA when built with it and present, else CPU), `cpu`, `cuda`
    /// or `cuda:N`.
    #[serde(default = "default_device")]
    #[schemars(default = "default_device")]
    pub device: String,
    /// Compute dtype of the evaluated models: `auto` (bf16 on CUDA, f32 on the CPU), `f32`,
    /// `bf16` or `f16`. Set `f32` to compare a CUDA evaluation with a CPU one beyond bf16's
    /// rounding (a bf16 model's perplexity differs from the f32 one's in the second decimal).
    #[serde(default, skip_serializing_if = "is_auto_dtype")]
    pub dtype: DTypeChoice,
}

fn is_auto_dtype(dtype: &DTypeChoice) -> bool {
    *dtype == DTypeChoice::Auto
}

/// Few-shot candidates of an evaluate stage (the draws are the template stage's: seeded, from
/// the `train` split only, never the evaluated row).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct FewShotEvaluation {
    /// Demonstrations per prompt, one candidate each (`[0, 1, 2, 4]`; 0 is the base model's
    /// row, which is always evaluated).
    pub k: Vec<usize>,
    /// Template stage whose `train` split holds the demonstrations (default: `data`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub from: Option<String>,
    /// How demonstrations are chosen (the template stage's strategies).
    #[serde(default)]
    pub strategy: FewShotStrategy,
    /// Column the `stratified` strategy balances.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stratify_by: Option<String>,
    /// Demonstrations come from a seeded sample of at most this many rows (per label value
    /// when stratified).
    #[serde(default = "default_pool_size")]
    #[schemars(default = "default_pool_size")]
    pub pool_size: usize,
    /// Seed of the draws (default: derived from the pipeline seed and the stage name).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub seed: Option<u64>,
    /// Text after each demonstration (between it and the next one or the row's prompt).
    #[serde(default = "default_separator")]
    #[schemars(default = "default_separator")]
    pub separator: String,
}

fn default_pool_size() -> usize {
    1000
}

fn default_separator() -> String {
    "\n\n".to_string()
}

impl EvaluateConfig {
    /// `base_quantization` must be the 4-bit base every QLoRA candidate trained over: another
    /// would score the base row on a model none of them learned on.
    fn check_base_quantization_against_stages(
        &self,
        cx: &CheckContext<'_>,
        at: &str,
        problems: &mut Vec<Problem>,
    ) {
        let Some(asked) = &self.base_quantization else {
            return;
        };
        // The 4-bit base is built for Llama-family models (as QLoRA's train stage checks).
        if let Some(written) = &self.base_model {
            if cx.model_type(written).as_deref() == Some("gpt2") {
                problems.push(
                    Problem::new(
                        format!("{at}.base_quantization"),
                        format!("`{written}` is a gpt2 model: a 4-bit base is built for Llama-family models only"),
                    )
                    .with_hint("drop `base_quantization` to score the 16-bit model"),
                );
            }
        }
        for stage in self.adapter_stages() {
            let Some(StageConfig::Train(train)) = cx.pipeline.stages.get(stage) else {
                continue;
            };
            let super::method::MethodConfig::Qlora(qlora) = &train.method else {
                continue;
            };
            let trained = (qlora.quant_type, qlora.double_quant, qlora.block_size);
            if trained != (asked.quant_type, asked.double_quant, asked.block_size) {
                let describe = |(quant_type, double_quant, block_size): (
                    super::method::QuantTypeChoice,
                    bool,
                    usize,
                )| {
                    format!(
                        "{} (double_quant {double_quant}, block_size {block_size})",
                        quant_type.name()
                    )
                };
                problems.push(
                    Problem::new(
                        format!("{at}.base_quantization"),
                        format!(
                            "asks for a {} base, but stage `{stage}` trains QLoRA over {}: the base row would be another model than the one its adapter learned on",
                            describe((asked.quant_type, asked.double_quant, asked.block_size)),
                            describe(trained)
                        ),
                    )
                    .with_hint("drop `base_quantization` (the QLoRA stages' own 4-bit base is used), or give it the stage's settings"),
                );
            }
        }
    }

    /// The base model as written: `base_model`, else the first candidate train stage's model.
    fn base_written(&self, cx: &CheckContext<'_>) -> Option<String> {
        self.base_model.clone().or_else(|| {
            self.adapter_stages().into_iter().find_map(|stage| {
                match cx.pipeline.stages.get(stage) {
                    Some(StageConfig::Train(train)) => Some(train.model.clone()),
                    _ => None,
                }
            })
        })
    }

    /// `base_quantization` over a base saved in bitsandbytes 4-bit must be its storage: the
    /// weights are used as stored (checked here from the headers, as the run will).
    fn check_base_quantization_against_storage(
        &self,
        base: Option<&ModelFacts>,
        at: &str,
        problems: &mut Vec<Problem>,
    ) {
        let Some(asked) = &self.base_quantization else {
            return;
        };
        if let Some(stored) = base.and_then(|facts| facts.stored_4bit.as_ref()) {
            stored.check_settings(
                (
                    asked.quant_type.name(),
                    asked.double_quant,
                    asked.block_size,
                ),
                &format!("{at}.base_quantization"),
                "drop `base_quantization` to use the checkpoint as stored",
                problems,
            );
        }
    }

    /// Each outside adapter folder loads and fits its base model's linear layers, as evaluating
    /// it will check (a folder or file that is missing is said by the input check).
    fn check_external_adapters(
        &self,
        cx: &CheckContext<'_>,
        base: Option<&ModelFacts>,
        at: &str,
        problems: &mut Vec<Problem>,
    ) {
        if self.external_adapters.is_empty() {
            return;
        }
        let layers = base.and_then(|facts| facts.linear_layers.as_deref());
        for (index, written) in self.external_adapters.iter().enumerate() {
            let Ok(dir) = super::hub::resolve_adapter_dir(cx.project_dir, written) else {
                continue;
            };
            if adapter_files(written, &dir).is_err() {
                continue;
            }
            if let Err(message) = cx.probe.check_adapter(&dir, layers) {
                problems.push(
                    Problem::new(
                        format!("{at}.external_adapters[{index}]"),
                        format!("external adapter `{written}`: {message}"),
                    )
                    .about_value(),
                );
            }
        }
    }

    /// Every train stage whose adapter is a candidate: `model` first, then `adapters` in
    /// order, each once.
    pub fn adapter_stages(&self) -> Vec<&str> {
        let mut stages: Vec<&str> = Vec::new();
        for stage in self.model.iter().chain(&self.adapters) {
            if !stages.contains(&stage.as_str()) {
                stages.push(stage);
            }
        }
        stages
    }

    /// The `external_adapters` with the name each has in the comparison, in order: the folder's
    /// name (`org/name` for a Hub id), or the text as written when that name is taken (`base`,
    /// a candidate stage, another adapter's folder name), prefixed with `./` when that text is
    /// taken too (a folder written `base`).
    pub fn external_candidates(&self) -> Vec<(String, &str)> {
        let short = |written: &str| -> String {
            let trimmed = written.trim_end_matches('/');
            match trimmed.strip_prefix("hf://") {
                Some(id) => id.to_string(),
                None => Path::new(trimmed)
                    .file_name()
                    .map(|name| name.to_string_lossy().into_owned())
                    .unwrap_or_else(|| trimmed.to_string()),
            }
        };
        let stages = self.adapter_stages();
        let shorts: Vec<String> = self.external_adapters.iter().map(|w| short(w)).collect();
        let mut taken: Vec<String> = stages.iter().map(|s| s.to_string()).collect();
        taken.push(BASE_ROW.to_string());
        let mut out: Vec<(String, &str)> = Vec::new();
        for (index, written) in self.external_adapters.iter().enumerate() {
            if out.iter().any(|(_, w)| *w == written.as_str()) {
                continue;
            }
            let name = &shorts[index];
            let shared = shorts.iter().filter(|other| *other == name).count() > 1;
            let mut name = if shared || taken.contains(name) {
                written.trim_end_matches('/').to_string()
            } else {
                name.clone()
            };
            // Written as a taken name itself (a folder `base` or named like a candidate stage):
            // the same folder spelled relative to the pipeline, so no two rows share a name
            // (the base row's samples would be overwritten, two rows read alike).
            while taken.contains(&name) {
                name = format!("./{name}");
            }
            taken.push(name.clone());
            out.push((name, written.as_str()));
        }
        out
    }

    /// The template stage the few-shot demonstrations come from.
    pub fn few_shot_source(&self) -> Option<&str> {
        let few_shot = self.few_shot.as_ref()?;
        Some(few_shot.from.as_deref().unwrap_or(&self.data))
    }
}

/// The metrics of an evaluate stage.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct MetricsConfig {
    /// Loss (mean negative log-likelihood per completion token, token-weighted over the split)
    /// and perplexity = exp(loss). Prompt tokens are context only.
    #[serde(default = "default_true")]
    #[schemars(default = "default_true")]
    pub loss: bool,
    /// Classification accuracy: each candidate completion is scored by its log-likelihood after
    /// the prompt; the best-scoring candidate is the prediction.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub accuracy: Option<Box<AccuracyConfig>>,
    /// Exact match of a greedy generation against a reference column, after normalization.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exact_match: Option<Box<ExactMatchConfig>>,
}

impl Default for MetricsConfig {
    fn default() -> Self {
        MetricsConfig {
            loss: true,
            accuracy: None,
            exact_match: None,
        }
    }
}

/// Accuracy by scoring candidate completions.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct AccuracyConfig {
    /// The candidate completions, as they follow the prompt (mind leading spaces, e.g.
    /// `" positive"`). Give either `choices` or `choices_column`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub choices: Option<Vec<String>>,
    /// Take the candidates from this column's distinct values over the evaluated split (sorted).
    /// Give either `choices` or `choices_column`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub choices_column: Option<String>,
    /// Column holding each row's correct answer.
    #[serde(default = "default_completion_column")]
    #[schemars(default = "default_completion_column")]
    pub label_column: String,
    /// The label-column value each choice stands for, in the order of `choices` (e.g. `["0",
    /// "1"]` when the label column holds class ids). Default: the choice text itself. Values are
    /// compared as text with surrounding whitespace trimmed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub labels: Option<Vec<String>>,
    /// How a candidate's log-likelihood is aggregated over its tokens.
    #[serde(default)]
    pub score: CandidateScore,
}

/// How candidate log-likelihoods are compared.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum CandidateScore {
    /// Total log-likelihood of the candidate's tokens (what a language model assigns to it).
    #[default]
    Sum,
    /// Mean log-likelihood per token (does not favour short candidates).
    Mean,
}

/// Exact match of greedy generations.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ExactMatchConfig {
    /// Longest generation in new tokens; generation also stops at the tokenizer's EOS.
    #[serde(default = "default_exact_match_max_new_tokens")]
    #[schemars(default = "default_exact_match_max_new_tokens")]
    pub max_new_tokens: usize,
    /// Column holding the reference answer.
    #[serde(default = "default_completion_column")]
    #[schemars(default = "default_completion_column")]
    pub reference_column: String,
    /// Cut the generation at the first occurrence of any of these strings; the reference is cut
    /// the same way, so a reference that contains a stop string can still match.
    #[serde(default)]
    pub stop: Vec<String>,
    /// How generation and reference are normalized before comparing.
    #[serde(default)]
    pub normalize: NormalizeConfig,
}

/// Text normalization for exact match.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct NormalizeConfig {
    /// Remove leading and trailing whitespace.
    #[serde(default = "default_true")]
    #[schemars(default = "default_true")]
    pub trim: bool,
    /// Replace every run of whitespace with one space.
    #[serde(default = "default_true")]
    #[schemars(default = "default_true")]
    pub collapse_whitespace: bool,
    /// Compare case-insensitively.
    #[serde(default)]
    pub lowercase: bool,
    /// Remove ASCII punctuation.
    #[serde(default)]
    pub strip_punctuation: bool,
}

impl Default for NormalizeConfig {
    fn default() -> Self {
        NormalizeConfig {
            trim: true,
            collapse_whitespace: true,
            lowercase: false,
            strip_punctuation: false,
        }
    }
}

impl NormalizeConfig {
    /// Apply the normalization to one text.
    pub fn apply(&self, text: &str) -> String {
        let mut out: String = if self.strip_punctuation {
            text.chars().filter(|c| !c.is_ascii_punctuation()).collect()
        } else {
            text.to_string()
        };
        if self.lowercase {
            out = out.to_lowercase();
        }
        if self.collapse_whitespace {
            let mut collapsed = String::with_capacity(out.len());
            let mut in_space = false;
            for c in out.chars() {
                if c.is_whitespace() {
                    if !in_space {
                        collapsed.push(' ');
                    }
                    in_space = true;
                } else {
                    collapsed.push(c);
                    in_space = false;
                }
            }
            out = collapsed;
        }
        if self.trim {
            out = out.trim().to_string();
        }
        out
    }
}

fn default_split() -> String {
    "eval".to_string()
}

fn default_samples() -> usize {
    3
}

fn default_sample_max_new_tokens() -> usize {
    48
}

fn default_batch_size() -> usize {
    8
}

fn default_device() -> String {
    "auto".to_string()
}

fn default_true() -> bool {
    true
}

fn default_completion_column() -> String {
    "completion".to_string()
}

fn default_exact_match_max_new_tokens() -> usize {
    32
}

/// The files of a PEFT adapter folder that loading reads (`adapter_config.json`,
/// `adapter_model.safetensors`), or why `dir` (written as `written`) is not one.
pub fn adapter_files(written: &str, dir: &Path) -> Result<Vec<std::path::PathBuf>, String> {
    if !dir.is_dir() {
        return Err(format!(
            "external adapter `{written}`: {} is not a folder",
            dir.display()
        ));
    }
    let config = dir.join("adapter_config.json");
    if !config.is_file() {
        return Err(format!(
            "external adapter `{written}`: {} does not exist (a PEFT adapter folder holds adapter_config.json and adapter_model.safetensors)",
            config.display()
        ));
    }
    let weights = dir.join("adapter_model.safetensors");
    if !weights.is_file() {
        let hint = if dir.join("adapter_model.bin").is_file() {
            " (only adapter_model.bin is there: save the adapter with `safe_serialization=True`)"
        } else {
            ""
        };
        return Err(format!(
            "external adapter `{written}`: {} does not exist{hint}",
            weights.display()
        ));
    }
    let mut files = vec![config, weights];
    files.extend(adapter_base_records(dir));
    Ok(files)
}

/// The file an exported QLoRA adapter folder records its 4-bit base in (`{"quantization":
/// {...}}`): PEFT reads only adapter_config.json and the weights, and nothing in them says the
/// adapter was trained over a 4-bit base.
pub const ADAPTER_BASE_RECORD: &str = "peftpipe_base_quantization.json";

/// The records of the base an adapter folder was trained over, those that exist, in this order:
/// the folder's own [`ADAPTER_BASE_RECORD`], then a train artifact's `base_model.json` beside it.
/// The first is the one that counts; evaluating the adapter reads both to check that they agree,
/// so both are among the stage's inputs.
///
/// A record that is there but no readable file (a dangling link, a folder) is listed too, so
/// that reading it fails naming it instead of the adapter passing for one with no record.
pub fn adapter_base_records(dir: &Path) -> Vec<std::path::PathBuf> {
    let own = Some(dir.join(ADAPTER_BASE_RECORD));
    // `.`, `..` or `x/..` have no last name to strip, and a link's parent is not its
    // folder's: then the parent is the real folder's.
    let linked = dir
        .symlink_metadata()
        .is_ok_and(|meta| meta.file_type().is_symlink());
    let parent = match dir.file_name() {
        Some(_) if !linked => dir.parent().map(Path::to_path_buf),
        _ => dir
            .canonicalize()
            .ok()
            .and_then(|real| real.parent().map(Path::to_path_buf)),
    };
    let sibling = parent.map(|parent| parent.join("base_model.json"));
    [own, sibling]
        .into_iter()
        .flatten()
        .filter(|record| record.symlink_metadata().is_ok())
        .collect()
}

/// Is `text` a device spelling we accept (`auto`, `cpu`, `cuda`, `cuda:N`)?
pub fn is_valid_device(text: &str) -> bool {
    match text {
        "auto" | "cpu" | "cuda" => true,
        other => other
            .strip_prefix("cuda:")
            .is_some_and(|index| !index.is_empty() && index.bytes().all(|b| b.is_ascii_digit())),
    }
}

/// Check that `stage` names a stage of kind `kind` (unknown names are reported by the loader).
pub(crate) fn check_upstream_kind(
    cx: &CheckContext<'_>,
    stage: &str,
    kind: StageKind,
    path: String,
    problems: &mut Vec<Problem>,
) {
    if let Some(found) = cx.pipeline.stages.get(stage).map(StageConfig::kind) {
        if found != kind {
            problems.push(
                Problem::new(
                    path,
                    format!(
                        "stage `{stage}` is {} stage, but {} stage is needed here",
                        found.with_article(),
                        kind.with_article()
                    ),
                )
                .about_value(),
            );
        }
    }
}

/// Check that `column` is among the known output columns of stage `data` (when known).
fn check_column(
    cx: &CheckContext<'_>,
    data: &str,
    column: &str,
    path: String,
    problems: &mut Vec<Problem>,
) {
    let Some(columns) = cx.columns.get(data) else {
        return;
    };
    if !columns.iter().any(|c| c == column) {
        let mut problem = Problem::new(
            path,
            format!("column `{column}` is not an output of stage `{data}`"),
        )
        .about_value();
        let hint = match super::problem::did_you_mean(column, columns.iter().map(String::as_str)) {
            Some(close) => format!("did you mean `{close}`? available: {}", columns.join(", ")),
            None => format!("available columns: {}", columns.join(", ")),
        };
        problem = problem.with_hint(hint);
        problems.push(problem);
    }
}

impl StageSpec for EvaluateConfig {
    fn upstream(&self) -> Vec<UpstreamRef> {
        let mut references: Vec<UpstreamRef> = self
            .model
            .iter()
            .map(|stage| UpstreamRef {
                key: "model",
                stage: stage.clone(),
            })
            .collect();
        references.extend(self.adapters.iter().map(|stage| UpstreamRef {
            key: "adapters",
            stage: stage.clone(),
        }));
        references.push(UpstreamRef {
            key: "data",
            stage: self.data.clone(),
        });
        if let Some(few_shot) = &self.few_shot {
            if let Some(from) = &few_shot.from {
                references.push(UpstreamRef {
                    key: "few_shot.from",
                    stage: from.clone(),
                });
            }
        }
        references
    }

    fn input_files(&self, project_dir: &Path) -> Result<Vec<InputFile>, String> {
        // Everything else it reads comes from the upstream artifacts; a `base_model` named here
        // is hashed as the train stage hashes its model.
        // An external adapter's files are hashed by content, keyed by the text as written.
        let keyed = |written: &str, files: Vec<(String, std::path::PathBuf)>| -> Vec<InputFile> {
            let written = written.trim_end_matches('/');
            files
                .into_iter()
                .map(|(name, path)| InputFile {
                    key: format!("{written}/{name}"),
                    path,
                })
                .collect()
        };
        let mut files = Vec::new();
        if let Some(written) = &self.base_model {
            let dir = super::hub::resolve_model_dir(project_dir, written)?;
            files.extend(keyed(written, super::train::model_files(&dir)?));
        }
        for written in &self.external_adapters {
            let dir = super::hub::resolve_adapter_dir(project_dir, written)?;
            let named = adapter_files(written, &dir)?.into_iter().map(|path| {
                let name = path.file_name().unwrap_or_default().to_string_lossy();
                // A train artifact's base_model.json lies beside the adapter folder.
                let name = if path.parent() == Some(dir.as_path()) {
                    name.into_owned()
                } else {
                    format!("../{name}")
                };
                (name, path)
            });
            files.extend(keyed(written, named.collect()));
        }
        Ok(files)
    }

    fn output_columns(&self, _cx: &CheckContext<'_>, _stage: &str) -> Option<Vec<String>> {
        // The artifact is metrics.json, not a table.
        None
    }

    fn check(&self, cx: &CheckContext<'_>, at: &str, problems: &mut Vec<Problem>) {
        if let Some(model) = &self.model {
            check_upstream_kind(cx, model, StageKind::Train, format!("{at}.model"), problems);
        }
        for (index, stage) in self.adapters.iter().enumerate() {
            check_upstream_kind(
                cx,
                stage,
                StageKind::Train,
                format!("{at}.adapters[{index}]"),
                problems,
            );
        }
        for (index, written) in self.external_adapters.iter().enumerate() {
            let key = format!("{at}.external_adapters[{index}]");
            if written.trim().is_empty() {
                problems.push(Problem::new(key, "the adapter path is empty").about_value());
            } else if self.external_adapters[..index].contains(written) {
                problems.push(
                    Problem::new(key, format!("adapter `{written}` is listed twice")).about_value(),
                );
            }
        }
        self.check_base_quantization_against_stages(cx, at, problems);
        // The base model's files, checked once for the two checks that read them.
        let base = (self.base_quantization.is_some() || !self.external_adapters.is_empty())
            .then(|| self.base_written(cx))
            .flatten()
            .and_then(|written| super::hub::resolve_model_dir(cx.project_dir, &written).ok())
            .map(|dir| cx.probe.check_model(&dir));
        self.check_base_quantization_against_storage(base.as_ref(), at, problems);
        if let Some(message) = self
            .base_quantization
            .as_ref()
            .and_then(|settings| block_size_problem(settings.block_size))
        {
            problems.push(
                Problem::new(format!("{at}.base_quantization.block_size"), message).about_value(),
            );
        }
        self.check_candidates(cx, at, problems);
        self.check_external_adapters(cx, base.as_ref(), at, problems);
        check_upstream_kind(
            cx,
            &self.data,
            StageKind::Template,
            format!("{at}.data"),
            problems,
        );
        super::template::check_split_read(
            cx,
            &self.data,
            &self.split,
            &format!("{at}.split"),
            problems,
        );
        if self.max_rows == Some(0) {
            problems.push(
                Problem::new(
                    format!("{at}.max_rows"),
                    "max_rows is 0: nothing to evaluate",
                )
                .about_value()
                .with_hint("leave max_rows out to evaluate every row"),
            );
        }
        if self.batch_size == 0 {
            problems.push(
                Problem::new(format!("{at}.batch_size"), "batch_size must be at least 1")
                    .about_value(),
            );
        }
        // A scored sequence keeps its first token (BOS) and one more; a generation also needs
        // room for one new token after them.
        let generates = self.samples > 0 || self.metrics.exact_match.is_some();
        let least = if generates { 3 } else { 2 };
        if let Some(length) = self.max_length.filter(|&length| length < least) {
            problems.push(
                Problem::new(
                    format!("{at}.max_length"),
                    format!(
                        "max_length {length} is too short: a prompt keeps its first token and one more{}",
                        if generates {
                            ", and generating (samples, exact_match) needs room for a new token: at least 3"
                        } else {
                            ": at least 2"
                        }
                    ),
                )
                .about_value(),
            );
        }
        if self.samples > 0 && self.sample_max_new_tokens == 0 {
            problems.push(
                Problem::new(
                    format!("{at}.sample_max_new_tokens"),
                    "sample_max_new_tokens must be at least 1 when samples are requested",
                )
                .about_value(),
            );
        }
        if !is_valid_device(&self.device) {
            problems.push(
                Problem::new(
                    format!("{at}.device"),
                    format!("unknown device `{}`", self.device),
                )
                .about_value()
                .with_hint("use auto, cpu, cuda or cuda:N"),
            );
        }
        let metrics = &self.metrics;
        if !metrics.loss
            && metrics.accuracy.is_none()
            && metrics.exact_match.is_none()
            && self.samples == 0
        {
            problems.push(
                Problem::new(
                    format!("{at}.metrics"),
                    "no metric is enabled and no samples are requested: the stage would do nothing",
                )
                .about_value()
                .with_hint("enable metrics.loss, metrics.accuracy or metrics.exact_match"),
            );
        }
        if let Some(accuracy) = &metrics.accuracy {
            self.check_accuracy(cx, accuracy, &format!("{at}.metrics.accuracy"), problems);
        }
        if let Some(exact) = &metrics.exact_match {
            let path = format!("{at}.metrics.exact_match");
            if exact.max_new_tokens == 0 {
                problems.push(
                    Problem::new(
                        format!("{path}.max_new_tokens"),
                        "max_new_tokens must be at least 1",
                    )
                    .about_value(),
                );
            }
            if exact.stop.iter().any(String::is_empty) {
                problems.push(
                    Problem::new(
                        format!("{path}.stop"),
                        "an empty stop string would cut every generation to nothing",
                    )
                    .about_value(),
                );
            }
            check_column(
                cx,
                &self.data,
                &exact.reference_column,
                format!("{path}.reference_column"),
                problems,
            );
        }
    }

    fn device(&self) -> Option<&str> {
        Some(&self.device)
    }

    fn environment(&self) -> BTreeMap<String, String> {
        // The device kind decides the compute dtype (f32 on CPU, bf16 on CUDA), which changes
        // the figures; `auto` means CUDA exactly in a CUDA build.
        let kind = match self.device.as_str() {
            // `cuda` here is the core's marker feature, on exactly in a CUDA build of the binary.
            "auto" if cfg!(feature = "cuda") => "cuda",
            "auto" | "cpu" => "cpu",
            _ => "cuda",
        };
        BTreeMap::from([("device".to_string(), kind.to_string())])
    }
}

impl EvaluateConfig {
    /// A base model to evaluate, one base model for every candidate, and sound few-shot settings.
    fn check_candidates(&self, cx: &CheckContext<'_>, at: &str, problems: &mut Vec<Problem>) {
        let stages = self.adapter_stages();
        if stages.is_empty() && self.base_model.is_none() && !self.external_adapters.is_empty() {
            problems.push(
                Problem::new(
                    format!("{at}.external_adapters"),
                    "external adapters need `base_model`: no train stage names the model they apply to",
                )
                .with_hint("add `base_model: MODEL_DIR` (or `hf://org/name`), the model the adapters were trained on"),
            );
        } else if stages.is_empty() && self.base_model.is_none() {
            problems.push(
                Problem::new(
                    at.to_string(),
                    "nothing names the model to evaluate",
                )
                .with_hint("set `model: TRAIN_STAGE`, `adapters: [TRAIN_STAGE, ...]` or `base_model: MODEL_DIR`"),
            );
        }
        // The key naming a candidate stage: `model`, or its first place in `adapters`.
        let candidate_key = |stage: &str| {
            if self.model.as_deref() == Some(stage) {
                format!("{at}.model")
            } else {
                let index = self.adapters.iter().position(|a| a == stage).unwrap_or(0);
                format!("{at}.adapters[{index}]")
            }
        };
        if stages.contains(&BASE_ROW) {
            problems.push(
                Problem::new(
                    candidate_key(BASE_ROW),
                    format!("the train stage `{BASE_ROW}` would share its name with the base row of the comparison (the base model's metrics and samples)"),
                )
                .about_value()
                .with_hint(format!("rename the stage, e.g. `{BASE_ROW}_lora`")),
            );
        }
        // Every candidate shares the base model: the table compares methods, not models.
        let mut first: Option<(String, &str)> = self
            .base_model
            .as_ref()
            .map(|model| ("base_model".to_string(), model.as_str()));
        for stage in &stages {
            let Some(StageConfig::Train(train)) = cx.pipeline.stages.get(*stage) else {
                continue;
            };
            match &first {
                None => first = Some((format!("stage `{stage}`"), train.model.as_str())),
                Some((owner, model)) if *model != train.model => {
                    problems.push(
                        Problem::new(
                            candidate_key(stage),
                            format!(
                                "stage `{stage}` trains `{}` but {owner} is `{model}`: every candidate must share one base model",
                                train.model
                            ),
                        )
                        .about_value(),
                    );
                }
                Some(_) => {}
            }
        }
        let Some(few_shot) = &self.few_shot else {
            return;
        };
        let path = format!("{at}.few_shot");
        if few_shot.k.is_empty() {
            problems.push(
                Problem::new(format!("{path}.k"), "lists no k")
                    .about_value()
                    .with_hint("e.g. `k: [0, 1, 2, 4]`"),
            );
        }
        let mut seen = std::collections::BTreeSet::new();
        for (index, k) in few_shot.k.iter().enumerate() {
            if !seen.insert(*k) {
                problems.push(
                    Problem::new(
                        format!("{path}.k[{index}]"),
                        format!("k = {k} is listed twice"),
                    )
                    .about_value(),
                );
            }
            if *k > few_shot.pool_size {
                problems.push(
                    Problem::new(
                        format!("{path}.k[{index}]"),
                        format!(
                            "k = {k} exceeds pool_size {}: the pool cannot hold that many demonstrations",
                            few_shot.pool_size
                        ),
                    )
                    .about_value(),
                );
            }
        }
        if few_shot.pool_size == 0 {
            problems.push(
                Problem::new(format!("{path}.pool_size"), "pool_size must be at least 1")
                    .about_value(),
            );
        }
        if let Some(from) = &few_shot.from {
            check_upstream_kind(
                cx,
                from,
                StageKind::Template,
                format!("{path}.from"),
                problems,
            );
        }
        let source = self.few_shot_source().unwrap_or(&self.data).to_string();
        match (few_shot.strategy, &few_shot.stratify_by) {
            (FewShotStrategy::Stratified, None) => problems.push(
                Problem::new(
                    format!("{path}.strategy"),
                    "the `stratified` strategy needs `stratify_by`",
                )
                .about_value()
                .with_hint("name the label column: `stratify_by: label`"),
            ),
            (FewShotStrategy::Stratified, Some(column)) => {
                check_column(cx, &source, column, format!("{path}.stratify_by"), problems)
            }
            (_, Some(_)) => problems.push(
                Problem::new(
                    format!("{path}.stratify_by"),
                    "is only used with `strategy: stratified`",
                )
                .about_value(),
            ),
            (_, None) => {}
        }
    }

    fn check_accuracy(
        &self,
        cx: &CheckContext<'_>,
        accuracy: &AccuracyConfig,
        path: &str,
        problems: &mut Vec<Problem>,
    ) {
        match (&accuracy.choices, &accuracy.choices_column) {
            (Some(_), Some(_)) => problems.push(
                Problem::new(
                    path.to_string(),
                    "give either `choices` or `choices_column`, not both",
                )
                .with_hint(
                    "`choices` lists the candidates; `choices_column` takes them from a column",
                ),
            ),
            (None, None) => problems.push(
                Problem::new(path.to_string(), "the candidates are missing")
                    .with_hint("add `choices: [...]` or `choices_column: COLUMN`"),
            ),
            (Some(choices), None) => {
                if choices.len() < 2 {
                    problems.push(
                        Problem::new(
                            format!("{path}.choices"),
                            format!("accuracy needs at least 2 choices, found {}", choices.len()),
                        )
                        .about_value(),
                    );
                }
                if let Some(index) = choices.iter().position(String::is_empty) {
                    problems.push(
                        Problem::new(
                            format!("{path}.choices"),
                            format!(
                                "choice {index} is empty: an empty completion cannot be scored"
                            ),
                        )
                        .about_value(),
                    );
                }
                let mut seen = std::collections::BTreeSet::new();
                for choice in choices {
                    if !seen.insert(choice) {
                        problems.push(
                            Problem::new(
                                format!("{path}.choices"),
                                format!("choice `{choice}` is listed twice"),
                            )
                            .about_value(),
                        );
                    }
                }
                if let Some(labels) = &accuracy.labels {
                    if labels.len() != choices.len() {
                        problems.push(
                            Problem::new(
                                format!("{path}.labels"),
                                format!(
                                    "{} labels for {} choices: give one label per choice, in order",
                                    labels.len(),
                                    choices.len()
                                ),
                            )
                            .about_value(),
                        );
                    }
                }
            }
            (None, Some(column)) => {
                check_column(
                    cx,
                    &self.data,
                    column,
                    format!("{path}.choices_column"),
                    problems,
                );
                if accuracy.labels.is_some() {
                    problems.push(
                        Problem::new(
                            format!("{path}.labels"),
                            "`labels` needs `choices` (their order defines which label is which)",
                        )
                        .with_hint("with `choices_column` each choice stands for itself"),
                    );
                }
            }
        }
        check_column(
            cx,
            &self.data,
            &accuracy.label_column,
            format!("{path}.label_column"),
            problems,
        );
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::config::RawPipeline;

    /// YAML → JSON value → type (as the loader does: serde_norway alone reads enums as tags).
    pub(crate) fn from_yaml<T: serde::de::DeserializeOwned>(yaml: &str) -> Result<T, String> {
        let value: serde_json::Value = serde_norway::from_str(yaml).map_err(|e| e.to_string())?;
        serde_json::from_value(value).map_err(|e| e.to_string())
    }

    fn pipeline(yaml: &str) -> RawPipeline {
        crate::config::evaluate::tests::from_yaml(yaml).unwrap()
    }

    fn problems_of(yaml: &str, columns: &[&str]) -> Vec<Problem> {
        let raw = pipeline(yaml);
        let columns = BTreeMap::from([(
            "prompts".to_string(),
            columns.iter().map(|c| c.to_string()).collect(),
        )]);
        let cx = CheckContext {
            pipeline: &raw,
            project_dir: Path::new("."),
            columns: &columns,
            probe: &crate::config::probe::TestProbe,
        };
        let mut problems = Vec::new();
        let StageConfig::Evaluate(config) = &raw.stages["eval"] else {
            panic!("test pipeline has no evaluate stage `eval`");
        };
        config.check(&cx, "stages.eval.evaluate", &mut problems);
        problems
    }

    const HEAD: &str = "
stages:
  data: { ingest: { path: x.parquet } }
  prompts: { template: { input: data } }
  tune: { train: { data: prompts, model: base-model } }
";

    #[test]
    fn base_quantization_must_be_the_qlora_stages_base() {
        let columns = ["prompt", "completion"];
        let pipeline = |asked: &str| {
            format!("{HEAD}  q: {{ train: {{ data: prompts, model: base-model, method: {{ qlora: {{ r: 8 }} }} }} }}\n  eval: {{ evaluate: {{ model: q, data: prompts, base_quantization: {asked} }} }}\n")
        };
        assert!(problems_of(&pipeline("{}"), &columns).is_empty());
        let problems = problems_of(&pipeline("{ quant_type: fp4 }"), &columns);
        assert_eq!(problems.len(), 1, "{problems:?}");
        assert_eq!(problems[0].path, "stages.eval.evaluate.base_quantization");
        assert!(
            problems[0]
                .message
                .contains("stage `q` trains QLoRA over nf4"),
            "{}",
            problems[0].message
        );
    }

    #[test]
    fn max_length_leaves_room_for_what_the_stage_does() {
        let paths = |evaluate: &str| {
            problems_of(
                &format!("{HEAD}  eval: {{ evaluate: {evaluate} }}\n"),
                &["prompt", "completion"],
            )
            .into_iter()
            .map(|problem| problem.path)
            .collect::<Vec<_>>()
        };
        // Samples (3 by default) generate: 2 tokens leave no room for a new one.
        assert_eq!(
            paths("{ model: tune, data: prompts, max_length: 2 }"),
            ["stages.eval.evaluate.max_length"]
        );
        assert!(paths("{ model: tune, data: prompts, max_length: 3 }").is_empty());
        // Loss alone: a first token and one scored token.
        assert!(paths("{ model: tune, data: prompts, max_length: 2, samples: 0 }").is_empty());
        assert_eq!(
            paths("{ model: tune, data: prompts, max_length: 1, samples: 0 }"),
            ["stages.eval.evaluate.max_length"]
        );
    }

    #[test]
    fn defaults_fill_every_field() {
        let raw = pipeline(&format!(
            "{HEAD}  eval: {{ evaluate: {{ model: tune, data: prompts }} }}\n"
        ));
        let StageConfig::Evaluate(config) = &raw.stages["eval"] else {
            panic!("not an evaluate stage");
        };
        assert_eq!(config.split, "eval");
        assert!(config.metrics.loss);
        assert_eq!(config.batch_size, 8);
        assert_eq!(config.samples, 3);
        assert_eq!(config.device, "auto");
        assert!(config.metrics.accuracy.is_none());
    }

    #[test]
    fn unknown_keys_are_errors() {
        let text = format!(
            "{HEAD}  eval: {{ evaluate: {{ model: tune, data: prompts, metrics: {{ acuracy: {{}} }} }} }}\n"
        );
        let error = from_yaml::<RawPipeline>(&text).unwrap_err();
        assert!(error.to_string().contains("acuracy"), "{error}");
    }

    #[test]
    fn a_valid_accuracy_config_has_no_problems() {
        let problems = problems_of(
            &format!(
                "{HEAD}  eval: {{ evaluate: {{ model: tune, data: prompts, metrics: {{ accuracy: {{ choices: [' negative', ' positive'], label_column: label, labels: ['0', '1'] }} }} }} }}\n"
            ),
            &["prompt", "completion", "text", "label"],
        );
        assert!(problems.is_empty(), "{problems:?}");
    }

    #[test]
    fn accuracy_problems_are_all_reported() {
        let problems = problems_of(
            &format!(
                "{HEAD}  eval: {{ evaluate: {{ model: tune, data: prompts, batch_size: 0, device: gpu, metrics: {{ accuracy: {{ choices: [' yes'], label_column: lable, labels: ['0', '1'] }} }} }} }}\n"
            ),
            &["prompt", "completion", "text", "label"],
        );
        let paths: Vec<&str> = problems.iter().map(|p| p.path.as_str()).collect();
        assert_eq!(
            paths,
            [
                "stages.eval.evaluate.batch_size",
                "stages.eval.evaluate.device",
                "stages.eval.evaluate.metrics.accuracy.choices",
                "stages.eval.evaluate.metrics.accuracy.labels",
                "stages.eval.evaluate.metrics.accuracy.label_column",
            ]
        );
        let column = &problems[4];
        assert!(column
            .hint
            .as_deref()
            .unwrap()
            .contains("did you mean `label`"));
    }

    #[test]
    fn choices_and_choices_column_are_exclusive() {
        let both = problems_of(
            &format!(
                "{HEAD}  eval: {{ evaluate: {{ model: tune, data: prompts, metrics: {{ accuracy: {{ choices: [a, b], choices_column: completion }} }} }} }}\n"
            ),
            &["prompt", "completion", "text"],
        );
        assert_eq!(both.len(), 1, "{both:?}");
        assert!(both[0].message.contains("not both"));
        let neither = problems_of(
            &format!(
                "{HEAD}  eval: {{ evaluate: {{ model: tune, data: prompts, metrics: {{ accuracy: {{}} }} }} }}\n"
            ),
            &["prompt", "completion", "text"],
        );
        assert_eq!(neither.len(), 1, "{neither:?}");
        assert!(neither[0].message.contains("missing"));
    }

    #[test]
    fn wrong_upstream_kinds_are_reported() {
        let problems = problems_of(
            &format!("{HEAD}  eval: {{ evaluate: {{ model: prompts, data: tune }} }}\n"),
            &[],
        );
        let paths: Vec<&str> = problems.iter().map(|p| p.path.as_str()).collect();
        assert_eq!(
            paths,
            ["stages.eval.evaluate.model", "stages.eval.evaluate.data"]
        );
        assert!(problems[0].message.contains("a train stage is needed"));
    }

    #[test]
    fn a_stage_that_does_nothing_is_refused() {
        let problems = problems_of(
            &format!(
                "{HEAD}  eval: {{ evaluate: {{ model: tune, data: prompts, samples: 0, metrics: {{ loss: false }} }} }}\n"
            ),
            &[],
        );
        assert_eq!(problems.len(), 1, "{problems:?}");
        assert_eq!(problems[0].path, "stages.eval.evaluate.metrics");
    }

    #[test]
    fn candidates_need_one_base_model_and_sound_few_shot_settings() {
        let head = format!(
            "{HEAD}  other: {{ train: {{ data: prompts, model: another-model }} }}\n  same: {{ train: {{ data: prompts, model: base-model }} }}\n"
        );
        let columns = ["prompt", "completion", "label"];
        let fine = problems_of(
            &format!(
                "{head}  eval: {{ evaluate: {{ adapters: [tune, same], data: prompts, few_shot: {{ k: [0, 1, 4], strategy: stratified, stratify_by: label }} }} }}\n"
            ),
            &columns,
        );
        assert!(fine.is_empty(), "{fine:?}");
        let mixed = problems_of(
            &format!("{head}  eval: {{ evaluate: {{ model: tune, adapters: [same, other], data: prompts }} }}\n"),
            &columns,
        );
        assert_eq!(mixed.len(), 1, "{mixed:?}");
        assert_eq!(mixed[0].path, "stages.eval.evaluate.adapters[1]");
        assert!(
            mixed[0].message.contains("one base model"),
            "{}",
            mixed[0].message
        );
        let nothing = problems_of(
            &format!("{head}  eval: {{ evaluate: {{ data: prompts, few_shot: {{ k: [1] }} }} }}\n"),
            &columns,
        );
        assert_eq!(nothing.len(), 1, "{nothing:?}");
        assert!(nothing[0].message.contains("nothing names the model"));
        let few_shot = problems_of(
            &format!(
                "{head}  eval: {{ evaluate: {{ base_model: m, data: prompts, few_shot: {{ k: [2, 2, 9], pool_size: 8, strategy: stratified, from: tune }} }} }}\n"
            ),
            &columns,
        );
        let paths: Vec<&str> = few_shot.iter().map(|p| p.path.as_str()).collect();
        assert_eq!(
            paths,
            [
                "stages.eval.evaluate.few_shot.k[1]",
                "stages.eval.evaluate.few_shot.k[2]",
                "stages.eval.evaluate.few_shot.from",
                "stages.eval.evaluate.few_shot.strategy",
            ]
        );
    }

    #[test]
    fn candidate_stages_are_upstream_in_order_each_once() {
        let raw = pipeline(&format!(
            "{HEAD}  eval: {{ evaluate: {{ model: tune, adapters: [tune, x, y], data: prompts, few_shot: {{ k: [1], from: demos }} }} }}\n"
        ));
        let StageConfig::Evaluate(config) = &raw.stages["eval"] else {
            panic!("not an evaluate stage");
        };
        assert_eq!(config.adapter_stages(), ["tune", "x", "y"]);
        let upstream: Vec<String> = config.upstream().into_iter().map(|r| r.stage).collect();
        assert_eq!(upstream, ["tune", "tune", "x", "y", "prompts", "demos"]);
        assert_eq!(config.few_shot_source(), Some("demos"));
    }

    #[test]
    fn external_adapters_need_a_base_model_and_get_readable_unique_names() {
        let columns = ["prompt", "completion"];
        let missing = problems_of(
            &format!(
                "{HEAD}  eval: {{ evaluate: {{ external_adapters: [a/lora], data: prompts }} }}\n"
            ),
            &columns,
        );
        assert_eq!(missing.len(), 1, "{missing:?}");
        assert_eq!(missing[0].path, "stages.eval.evaluate.external_adapters");
        assert!(missing[0].message.contains("need `base_model`"));
        let listed = problems_of(
            &format!("{HEAD}  eval: {{ evaluate: {{ external_adapters: [a/lora, '', a/lora], base_model: m, data: prompts }} }}\n"),
            &columns,
        );
        let paths: Vec<&str> = listed.iter().map(|p| p.path.as_str()).collect();
        assert_eq!(
            paths,
            [
                "stages.eval.evaluate.external_adapters[1]",
                "stages.eval.evaluate.external_adapters[2]"
            ]
        );
        // With a train stage its model is the base; the names avoid stage names and each other.
        let raw = pipeline(&format!(
            "{HEAD}  eval: {{ evaluate: {{ model: tune, external_adapters: [out/sst2-lora/, 'hf://org/name@v1', x/tune, p/adapter, q/adapter], data: prompts }} }}\n"
        ));
        let StageConfig::Evaluate(config) = &raw.stages["eval"] else {
            panic!("not an evaluate stage");
        };
        let names: Vec<String> = config
            .external_candidates()
            .into_iter()
            .map(|(name, _)| name)
            .collect();
        assert_eq!(
            names,
            [
                "sst2-lora",
                "org/name@v1",
                "x/tune",
                "p/adapter",
                "q/adapter"
            ]
        );
        assert!(problems_of(
            &format!("{HEAD}  eval: {{ evaluate: {{ model: tune, external_adapters: [a/lora], data: prompts }} }}\n"),
            &columns,
        )
        .is_empty());
    }

    #[test]
    fn an_external_adapter_written_as_a_taken_name_gets_another_name() {
        // Folders called `base` and `tune` beside the pipeline: their short name and the text
        // as written are both taken (the base row, the stage `tune`).
        let raw = pipeline(&format!(
            "{HEAD}  eval: {{ evaluate: {{ model: tune, external_adapters: [base, tune/, other/tune], data: prompts }} }}\n"
        ));
        let StageConfig::Evaluate(config) = &raw.stages["eval"] else {
            panic!("not an evaluate stage");
        };
        let names: Vec<String> = config
            .external_candidates()
            .into_iter()
            .map(|(name, _)| name)
            .collect();
        assert_eq!(names, ["./base", "./tune", "other/tune"]);
    }

    #[test]
    fn a_train_stage_named_base_is_refused_as_a_candidate() {
        // The comparison's base row is `base`: a stage of that name would share it (the base
        // row's metrics and samples overwritten, two rows read alike).
        for evaluate in ["model: base", "model: tune, adapters: [tune, base]"] {
            let problems = problems_of(
                &format!("{HEAD}  base: {{ train: {{ data: prompts, model: base-model }} }}\n  eval: {{ evaluate: {{ {evaluate}, data: prompts }} }}\n"),
                &["prompt", "completion"],
            );
            let named: Vec<&Problem> = problems
                .iter()
                .filter(|p| p.message.contains("base row"))
                .collect();
            assert_eq!(named.len(), 1, "{evaluate}: {problems:?}");
            let key = if evaluate.starts_with("model: base") {
                "stages.eval.evaluate.model"
            } else {
                "stages.eval.evaluate.adapters[1]"
            };
            assert_eq!(named[0].path, key, "{evaluate}");
        }
    }

    #[test]
    fn a_4bit_base_takes_qloras_settings_and_checks_its_block_size() {
        let columns = ["prompt", "completion"];
        let raw = pipeline(&format!(
            "{HEAD}  eval: {{ evaluate: {{ base_model: m, external_adapters: [a/lora], base_quantization: {{}}, data: prompts }} }}\n"
        ));
        let StageConfig::Evaluate(config) = &raw.stages["eval"] else {
            panic!("not an evaluate stage");
        };
        assert_eq!(config.base_quantization, Some(FourBitSettings::default()));
        let problems = problems_of(
            &format!("{HEAD}  eval: {{ evaluate: {{ base_model: m, external_adapters: [a/lora], base_quantization: {{ quant_type: fp4, block_size: 32 }}, data: prompts }} }}\n"),
            &columns,
        );
        assert_eq!(problems.len(), 1, "{problems:?}");
        assert_eq!(
            problems[0].path,
            "stages.eval.evaluate.base_quantization.block_size"
        );
        assert!(
            problems[0].message.contains("from 64 to 4096"),
            "{problems:?}"
        );
        // Unset, it leaves the stage's fingerprint as it was.
        let raw = pipeline(&format!(
            "{HEAD}  eval: {{ evaluate: {{ base_model: m, data: prompts }} }}\n"
        ));
        let StageConfig::Evaluate(config) = &raw.stages["eval"] else {
            panic!("not an evaluate stage");
        };
        assert!(serde_json::to_value(config)
            .unwrap()
            .get("base_quantization")
            .is_none());
    }

    #[test]
    fn normalization_options_apply_in_order() {
        let default = NormalizeConfig::default();
        assert_eq!(default.apply("  The  cat\n sat "), "The cat sat");
        let strict = NormalizeConfig {
            lowercase: true,
            strip_punctuation: true,
            ..NormalizeConfig::default()
        };
        assert_eq!(strict.apply(" Hello, World! "), "hello world");
        let none = NormalizeConfig {
            trim: false,
            collapse_whitespace: false,
            lowercase: false,
            strip_punctuation: false,
        };
        assert_eq!(none.apply(" a  b "), " a  b ");
    }

    #[test]
    fn device_spellings() {
        for good in ["auto", "cpu", "cuda", "cuda:0", "cuda:12"] {
            assert!(is_valid_device(good), "{good}");
        }
        for bad in ["gpu", "cuda:", "cuda:x", "CPU", ""] {
            assert!(!is_valid_device(bad), "{bad}");
        }
    }
}
