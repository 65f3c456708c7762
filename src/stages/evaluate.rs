//! The `evaluate` stage: the base model and the adapted model of an upstream train stage, side by
//! side, on one split of a template stage — loss and perplexity over completion tokens, accuracy
//! by candidate scoring, exact match of greedy generations, a few sample generations — written to
//! `metrics.json` as `{base, adapted, delta, samples, ...}`.
//!
//! No graph is built: the models are loaded with frozen base weights and the adapter through
//! `crate::peft` in inference mode (its variables enter the forward pass detached), and
//! everything goes through `crate::infer`. Examples are fitted into the context length with
//! training's prompt-left truncation (`data::batch::fit`). Progress goes through
//! `ctx.progress`; this module never prints.

use std::collections::{BTreeMap, BTreeSet};
use std::fs::File;
use std::path::{Path, PathBuf};

use arrow::array::Array;
use arrow::util::display::{ArrayFormatter, FormatOptions};
use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
use parquet::arrow::ProjectionMask;
use serde::Serialize;
use serde_json::Value;

use crate::config::evaluate::{
    AccuracyConfig, CandidateScore, EvaluateConfig, ExactMatchConfig, FewShotEvaluation,
};
use crate::data::few_shot::{FewShotPool, FewShotSettings};
use crate::infer::generate::{GenerationSettings, StopReason};
use crate::infer::score::{score_examples, NllTotal, SequenceScore};
use crate::infer::{complete_prompts, encode_pair, LanguageModel, Sampling, Sequence, TextCodec};

use super::comparison::{adapter_method, markdown, CandidateKind, Comparison, ComparisonRow};
use super::export::BaseModelRecord;
use super::{derive_seed, Progress, Stage, StageContext, StageError, StageOutcome};
use crate::config::train::{DTypeChoice, Truncation};
use crate::data::batch::fit as fit_sequence;
use crate::data::tokenize::TokenizedExample;
use crate::device::{compute_dtype, resolve_device, DTypeSpec, DeviceSpec};
use crate::infer::adapter_base::{adapter_base, StoredBase, EVALUATE};
use crate::infer::session::InferenceModel;
use crate::models::quantized::BaseQuantization;
use crate::models::{ModelConfig, ModelDir};
use crate::peft::qlora;

pub struct EvaluateStage {
    config: EvaluateConfig,
}

impl EvaluateStage {
    pub fn new(config: EvaluateConfig) -> Self {
        EvaluateStage { config }
    }
}

// ---------------------------------------------------------------------------------------------
// Rows of the evaluated split
// ---------------------------------------------------------------------------------------------

/// The evaluated rows: every needed column as text, in file order.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Rows {
    pub count: usize,
    /// Column name → one text per row.
    pub columns: BTreeMap<String, Vec<String>>,
}

impl Rows {
    pub fn column(&self, name: &str) -> Result<&[String], StageError> {
        self.columns
            .get(name)
            .map(Vec::as_slice)
            .ok_or_else(|| StageError::Internal(format!("column `{name}` was not read")))
    }
}

/// Read `columns` of a Parquet file as text (numbers and booleans as they print), at most
/// `max_rows` rows. Errors name the file as `shown` (the split and stage it is, not its cache
/// path), the column and the row; nulls are errors.
pub fn read_rows(
    path: &Path,
    shown: &str,
    columns: &BTreeSet<String>,
    max_rows: Option<usize>,
) -> Result<Rows, StageError> {
    let file = File::open(path)
        .map_err(|error| StageError::user(format!("cannot open {shown}: {error}")))?;
    let builder = ParquetRecordBatchReaderBuilder::try_new(file).map_err(|error| {
        StageError::user(format!("{shown} is not a readable Parquet file: {error}"))
    })?;
    let schema = builder.schema().clone();
    let mut indices = Vec::with_capacity(columns.len());
    for name in columns {
        let index = schema.index_of(name).map_err(|_| {
            let available: Vec<&str> = schema.fields().iter().map(|f| f.name().as_str()).collect();
            StageError::user(format!(
                "{shown} has no column `{name}` (columns: {})",
                available.join(", ")
            ))
        })?;
        indices.push(index);
    }
    let mask = ProjectionMask::roots(builder.parquet_schema(), indices);
    let mut builder = builder.with_projection(mask);
    if let Some(limit) = max_rows {
        builder = builder.with_limit(limit);
    }
    let reader = builder
        .build()
        .map_err(|error| StageError::user(format!("cannot read {shown}: {error}")))?;
    let mut rows = Rows::default();
    for name in columns {
        rows.columns.insert(name.clone(), Vec::new());
    }
    let options = FormatOptions::default();
    for batch in reader {
        let batch = batch.map_err(|error| {
            StageError::user(format!(
                "cannot read {shown} after row {}: {error}",
                rows.count
            ))
        })?;
        for name in columns {
            let array = batch.column_by_name(name).ok_or_else(|| {
                StageError::Internal(format!("projected column `{name}` missing"))
            })?;
            let formatter = ArrayFormatter::try_new(array.as_ref(), &options).map_err(|error| {
                StageError::user(format!(
                    "{shown}: column `{name}` cannot be read as text: {error}"
                ))
            })?;
            let out = rows
                .columns
                .get_mut(name)
                .ok_or_else(|| StageError::Internal(format!("column `{name}` has no buffer")))?;
            for index in 0..array.len() {
                if array.is_null(index) {
                    return Err(StageError::user(format!(
                        "{shown}: column `{name}` is null in row {}",
                        rows.count + index
                    )));
                }
                out.push(formatter.value(index).to_string());
            }
        }
        rows.count += batch.num_rows();
        if max_rows.is_some_and(|limit| rows.count >= limit) {
            break;
        }
    }
    if let Some(limit) = max_rows {
        rows.count = rows.count.min(limit);
        for values in rows.columns.values_mut() {
            values.truncate(limit);
        }
    }
    Ok(rows)
}

// ---------------------------------------------------------------------------------------------
// What gets evaluated: the encoded work, shared by the base and the adapted model
// ---------------------------------------------------------------------------------------------

/// Candidates of the accuracy metric and which label each stands for.
#[derive(Debug, Clone, PartialEq)]
pub struct Candidates {
    pub choices: Vec<String>,
    /// The label-column value each choice stands for (compared trimmed).
    pub labels: Vec<String>,
}

/// Accuracy: the candidates, one example per row × candidate (row-major), each row's label.
pub struct AccuracyWork {
    pub candidates: Candidates,
    pub examples: Vec<Sequence>,
    pub labels: Vec<String>,
    pub score: CandidateScore,
}

/// The accuracy metric's candidates: its `choices` (standing for its `labels`, else for
/// themselves), or the distinct values of `choices_column` in the rows.
fn accuracy_candidates(
    accuracy: &AccuracyConfig,
    rows: &Rows,
    split: &str,
) -> Result<Candidates, StageError> {
    Ok(match (&accuracy.choices, &accuracy.choices_column) {
        (Some(choices), _) => Candidates {
            choices: choices.clone(),
            labels: accuracy.labels.clone().unwrap_or_else(|| choices.clone()),
        },
        (None, Some(column)) => {
            let distinct: BTreeSet<&String> = rows.column(column)?.iter().collect();
            let choices: Vec<String> = distinct.into_iter().cloned().collect();
            if choices.len() < 2 {
                return Err(StageError::user(format!(
                    "accuracy: column `{column}` has {} distinct value(s) in split `{split}`; at least 2 candidates are needed",
                    choices.len(),
                )));
            }
            Candidates {
                labels: choices.clone(),
                choices,
            }
        }
        (None, None) => {
            return Err(StageError::Internal(
                "accuracy has no candidates (validation should have caught this)".into(),
            ))
        }
    })
}

/// How many of `labels` are none of `candidates`' labels (trimmed): rows accuracy counts as
/// wrong whatever the model scores.
fn labels_outside(candidates: &Candidates, labels: &[String]) -> usize {
    let known: BTreeSet<&str> = candidates.labels.iter().map(|l| l.trim()).collect();
    labels
        .iter()
        .filter(|label| !known.contains(label.trim()))
        .count()
}

/// Exact match: prompt ids and normalized reference per row.
pub struct ExactMatchWork {
    pub config: ExactMatchConfig,
    pub prompts: Vec<Vec<u32>>,
    pub references: Vec<String>,
}

/// One sample generation to make.
pub struct SampleWork {
    pub prompt: String,
    pub prompt_ids: Vec<u32>,
    pub reference: String,
}

/// Everything both models are evaluated on, encoded once.
pub struct EvalPlan {
    pub rows: usize,
    /// Prompt + completion per row (loss / perplexity).
    pub loss_examples: Option<Vec<Sequence>>,
    pub accuracy: Option<AccuracyWork>,
    pub exact_match: Option<ExactMatchWork>,
    /// Sample generations of the first rows.
    pub samples: Vec<SampleWork>,
    pub sample_max_new_tokens: usize,
    /// Rows truncated to fit `max_length` (prompt, completion or both).
    pub truncated_rows: usize,
    /// Rows whose prompt lost tokens on the left.
    pub prompt_cut_rows: usize,
    /// Rows whose completion alone did not fit and was cut on the right.
    pub completion_cut_rows: usize,
    pub max_length: usize,
}

/// Keep BOS (one leading special token) when truncating prompts from the left.
const KEEP_FIRST: usize = 1;

impl EvalPlan {
    /// Encode the rows for every configured metric. `max_length`: the model's context length
    /// unless the config sets a shorter one.
    pub fn new(
        config: &EvaluateConfig,
        rows: &Rows,
        codec: &dyn TextCodec,
        max_length: usize,
        add_eos: bool,
    ) -> Result<Self, StageError> {
        let max_length = config.max_length.map_or(max_length, |m| m.min(max_length));
        let prompts = rows.column("prompt")?;
        let completions = rows.column("completion")?;
        let encode_error = |row: usize, error: String| {
            StageError::user(format!("row {row} of split `{}`: {error}", config.split))
        };
        let mut prompt_cut = BTreeSet::new();
        let mut completion_cut = BTreeSet::new();
        // Training's truncation: prompt tokens go from the left (BOS kept), the completion is cut
        // on the right only when it alone does not fit.
        let mut fit = |row: usize, example: TokenizedExample| -> Result<Sequence, StageError> {
            let sequence = fit_sequence(&example, max_length, KEEP_FIRST, Truncation::PromptLeft)
                .ok_or_else(|| {
                StageError::Internal(format!(
                    "row {row}: prompt-left truncation dropped the example"
                ))
            })?;
            if sequence.completion_start < example.prompt.len() {
                prompt_cut.insert(row);
            }
            if sequence.ids.len() - sequence.completion_start < example.completion.len() {
                completion_cut.insert(row);
            }
            Ok(sequence)
        };
        let metrics = &config.metrics;
        let loss_examples = if metrics.loss {
            let mut examples = Vec::with_capacity(rows.count);
            for row in 0..rows.count {
                let example = encode_pair(codec, &prompts[row], &completions[row], add_eos)
                    .map_err(|e| encode_error(row, e))?;
                examples.push(fit(row, example)?);
            }
            Some(examples)
        } else {
            None
        };
        let accuracy = match &metrics.accuracy {
            None => None,
            Some(accuracy) => {
                let candidates = accuracy_candidates(accuracy, rows, &config.split)?;
                let labels = rows.column(&accuracy.label_column)?.to_vec();
                if !labels.is_empty() && labels_outside(&candidates, &labels) == labels.len() {
                    return Err(StageError::user(format!(
                        "accuracy: no row's `{}` value is one of the candidates' labels ({}); e.g. row 0 has {:?}",
                        accuracy.label_column,
                        candidates.labels.join(", "),
                        labels[0]
                    )));
                }
                let mut examples = Vec::with_capacity(rows.count * candidates.choices.len());
                for (row, prompt) in prompts.iter().enumerate() {
                    for choice in &candidates.choices {
                        let example = encode_pair(codec, prompt, choice, add_eos)
                            .map_err(|e| encode_error(row, e))?;
                        if example.completion.is_empty() {
                            return Err(StageError::user(format!(
                                "accuracy: candidate {choice:?} encodes to no tokens"
                            )));
                        }
                        examples.push(fit(row, example)?);
                    }
                }
                Some(AccuracyWork {
                    candidates,
                    examples,
                    labels,
                    score: accuracy.score,
                })
            }
        };
        let exact_match = match &metrics.exact_match {
            None => None,
            Some(exact) => {
                let references = rows.column(&exact.reference_column)?;
                let mut prompt_ids = Vec::with_capacity(rows.count);
                for (row, prompt) in prompts.iter().enumerate() {
                    prompt_ids.push(fit_prompt(
                        codec
                            .encode_prompt(prompt)
                            .map_err(|e| encode_error(row, e))?,
                        max_length,
                        exact.max_new_tokens,
                        &mut || {
                            prompt_cut.insert(row);
                        },
                    ));
                }
                let mut ended = Vec::with_capacity(references.len());
                for (row, reference) in references.iter().enumerate() {
                    // Cut as the generation is: at EOS, then before the first stop string.
                    let mut reference = reference_until_eos(codec, &prompt_ids[row], reference)?;
                    crate::infer::completions::cut_at_first_stop(&mut reference, &exact.stop);
                    ended.push(reference);
                }
                let references = ended.iter().map(|r| exact.normalize.apply(r)).collect();
                Some(ExactMatchWork {
                    config: (**exact).clone(),
                    prompts: prompt_ids,
                    references,
                })
            }
        };
        let mut samples = Vec::new();
        for row in 0..rows.count.min(config.samples) {
            let ids = codec
                .encode_prompt(&prompts[row])
                .map_err(|e| encode_error(row, e))?;
            let ids = fit_prompt(ids, max_length, config.sample_max_new_tokens, &mut || {});
            samples.push(SampleWork {
                prompt: prompts[row].clone(),
                prompt_ids: ids,
                reference: completions[row].clone(),
            });
        }
        Ok(EvalPlan {
            rows: rows.count,
            loss_examples,
            accuracy,
            exact_match,
            samples,
            sample_max_new_tokens: config.sample_max_new_tokens,
            truncated_rows: prompt_cut.union(&completion_cut).count(),
            prompt_cut_rows: prompt_cut.len(),
            completion_cut_rows: completion_cut.len(),
            max_length,
        })
    }
}

impl EvalPlan {
    /// What truncation did to the rows, if anything: prompt tokens dropped on the left, or a
    /// completion that alone does not fit (an empty prompt's too) cut on the right.
    pub fn truncation_note(&self) -> Option<String> {
        let mut parts = Vec::new();
        if self.prompt_cut_rows > 0 {
            parts.push(format!(
                "{} of {} rows had prompt tokens dropped on the left to fit {} tokens",
                self.prompt_cut_rows, self.rows, self.max_length
            ));
        }
        if self.completion_cut_rows > 0 {
            parts.push(format!(
                "{} of {} rows had a completion cut on the right: alone it does not fit {} tokens",
                self.completion_cut_rows, self.rows, self.max_length
            ));
        }
        (!parts.is_empty()).then(|| parts.join("; "))
    }
}

/// An exact-match reference as generation would produce it: a reference whose tokens hold an
/// end-of-sequence token (a chat template's end of turn written as text) ends there, decoded
/// after the prompt as generations are; one without is used as written.
/// A comparison row's 4-bit base: the quantization it was loaded with, else "4-bit as stored"
/// over a checkpoint saved in 4 bits, else none (the 16-bit model).
fn four_bit_label(quantization: Option<&BaseQuantization>, stored_4bit: bool) -> Option<String> {
    match quantization {
        Some(quantization) => Some(quantization.label()),
        None if stored_4bit => Some("4-bit as stored".to_string()),
        None => None,
    }
}

fn reference_until_eos(
    codec: &dyn TextCodec,
    prompt_ids: &[u32],
    reference: &str,
) -> Result<String, StageError> {
    let ids = codec
        .encode_continuation(reference)
        .map_err(|error| StageError::user(format!("reference {reference:?}: {error}")))?;
    let Some(end) = ids.iter().position(|id| codec.eos_token_ids().contains(id)) else {
        return Ok(reference.to_string());
    };
    crate::infer::text::decode_continuation(codec, prompt_ids, &ids[..end])
        .map_err(|error| StageError::user(format!("reference {reference:?}: {error}")))
}

/// Leave room for at least one new token (`min(max_new_tokens, max_length / 2)` when possible)
/// by dropping prompt tokens from the left after BOS.
fn fit_prompt(
    mut ids: Vec<u32>,
    max_length: usize,
    max_new_tokens: usize,
    on_cut: &mut dyn FnMut(),
) -> Vec<u32> {
    let room = max_new_tokens.clamp(1, (max_length / 2).max(1));
    let limit = max_length.saturating_sub(room).max(KEEP_FIRST + 1);
    if ids.len() > limit {
        let keep = KEEP_FIRST.min(ids.len());
        let drop = ids.len() - limit;
        ids.drain(keep..keep + drop);
        on_cut();
    }
    ids
}

// ---------------------------------------------------------------------------------------------
// Metrics of one model
// ---------------------------------------------------------------------------------------------

/// Accuracy details.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct AccuracyReport {
    pub accuracy: f64,
    pub correct: usize,
    pub total: usize,
    /// Reference label → predicted label → rows.
    pub confusion: BTreeMap<String, BTreeMap<String, usize>>,
}

/// Exact-match details.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ExactMatchReport {
    pub exact_match: f64,
    pub matches: usize,
    pub total: usize,
    /// How many generations ended at EOS (the rest hit the token budget, a stop string or the
    /// context length).
    pub ended_at_eos: usize,
}

/// Every metric of one model.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct ModelMetrics {
    /// Mean NLL per completion token (token-weighted over the split).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub loss: Option<f64>,
    /// exp(loss).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub perplexity: Option<f64>,
    /// Completion tokens the loss is over.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub loss_tokens: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub accuracy: Option<AccuracyReport>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub exact_match: Option<ExactMatchReport>,
    /// Sample generations (not serialized here: metrics.json pairs them per row).
    #[serde(skip)]
    pub samples: Vec<String>,
}

impl ModelMetrics {
    /// Headline numbers by name (for the delta and the summary).
    pub fn figures(&self) -> BTreeMap<&'static str, f64> {
        let mut out = BTreeMap::new();
        if let Some(loss) = self.loss {
            out.insert("loss", loss);
        }
        if let Some(perplexity) = self.perplexity {
            out.insert("perplexity", perplexity);
        }
        if let Some(accuracy) = &self.accuracy {
            out.insert("accuracy", accuracy.accuracy);
        }
        if let Some(exact) = &self.exact_match {
            out.insert("exact_match", exact.exact_match);
        }
        out
    }
}

/// Error type for the inference callbacks: candle errors and stage errors (cancellation).
struct Failure(StageError);

impl From<candle_core::Error> for Failure {
    fn from(error: candle_core::Error) -> Self {
        Failure(StageError::Internal(format!("inference failed: {error}")))
    }
}

impl From<StageError> for Failure {
    fn from(error: StageError) -> Self {
        Failure(error)
    }
}

/// How a model's progress is reported.
pub struct Reporter<'a> {
    pub ctx: &'a StageContext<'a>,
    /// `base` or `adapted`.
    pub label: &'a str,
}

impl Reporter<'_> {
    fn report(&self, phase: &str, position: usize, length: usize) -> Result<(), StageError> {
        self.ctx.check_cancel()?;
        self.ctx.progress.progress(Progress {
            position: position as u64,
            length: Some(length as u64),
            unit: "examples",
            message: format!("{} · {phase}", self.label),
        });
        Ok(())
    }
}

/// Evaluate one model on the plan: scoring `batch_size` sequences per forward pass, generating
/// (exact match, samples) `batch_size` prompts per batch. Each phase reports its own progress,
/// from 0 to its own count.
pub fn evaluate_model<M: LanguageModel>(
    model: &M,
    codec: &dyn TextCodec,
    plan: &EvalPlan,
    batch_size: usize,
    reporter: &Reporter<'_>,
) -> Result<ModelMetrics, StageError> {
    let mut metrics = ModelMetrics::default();
    let pad = codec.pad_token_id();
    if let Some(examples) = &plan.loss_examples {
        reporter.report("loss", 0, examples.len())?;
        let scores = score_examples(model, examples, batch_size, pad, |done| {
            reporter
                .report("loss", done, examples.len())
                .map_err(Failure)
        })
        .map_err(|Failure(error)| error)?;
        let mut total = NllTotal::default();
        scores.iter().for_each(|score| total.add(score));
        metrics.loss = total.loss();
        metrics.perplexity = total.perplexity();
        metrics.loss_tokens = Some(total.tokens);
    }
    if let Some(work) = &plan.accuracy {
        reporter.report("accuracy", 0, work.examples.len())?;
        let scores = score_examples(model, &work.examples, batch_size, pad, |done| {
            reporter
                .report("accuracy", done, work.examples.len())
                .map_err(Failure)
        })
        .map_err(|Failure(error)| error)?;
        metrics.accuracy = Some(accuracy_of(
            &work.candidates,
            &scores,
            &work.labels,
            work.score,
        ));
    }
    if let Some(ExactMatchWork {
        config: exact,
        prompts,
        references,
    }) = &plan.exact_match
    {
        let settings = GenerationSettings {
            max_new_tokens: exact.max_new_tokens,
            sampling: Sampling::Greedy,
            eos_token_ids: codec.eos_token_ids().to_vec(),
            max_length: Some(plan.max_length),
        };
        reporter.report("exact match", 0, prompts.len())?;
        let completions = complete_prompts(
            model,
            codec,
            prompts,
            &settings,
            &exact.stop,
            batch_size,
            |done| {
                reporter
                    .report("exact match", done, prompts.len())
                    .map_err(Failure)
            },
        )
        .map_err(|Failure(error)| error)?;
        let mut report = ExactMatchReport {
            exact_match: 0.0,
            matches: 0,
            total: prompts.len(),
            ended_at_eos: 0,
        };
        for (completion, reference) in completions.iter().zip(references) {
            if completion.stop_reason == StopReason::Eos {
                report.ended_at_eos += 1;
            }
            if exact.normalize.apply(&completion.text) == *reference {
                report.matches += 1;
            }
        }
        report.exact_match = ratio(report.matches, report.total);
        metrics.exact_match = Some(report);
    }
    if !plan.samples.is_empty() {
        let settings = GenerationSettings {
            max_new_tokens: plan.sample_max_new_tokens,
            sampling: Sampling::Greedy,
            eos_token_ids: codec.eos_token_ids().to_vec(),
            max_length: Some(plan.max_length),
        };
        let prompts: Vec<Vec<u32>> = plan
            .samples
            .iter()
            .map(|sample| sample.prompt_ids.clone())
            .collect();
        reporter.report("samples", 0, prompts.len())?;
        let completions =
            complete_prompts(model, codec, &prompts, &settings, &[], batch_size, |done| {
                reporter
                    .report("samples", done, prompts.len())
                    .map_err(Failure)
            })
            .map_err(|Failure(error)| error)?;
        metrics.samples = completions
            .into_iter()
            .map(|completion| completion.text)
            .collect();
    }
    Ok(metrics)
}

fn ratio(part: usize, whole: usize) -> f64 {
    if whole == 0 {
        0.0
    } else {
        part as f64 / whole as f64
    }
}

/// Pick the best candidate per row and compare its label with the row's.
pub fn accuracy_of(
    candidates: &Candidates,
    scores: &[SequenceScore],
    labels: &[String],
    score: CandidateScore,
) -> AccuracyReport {
    let count = candidates.choices.len();
    let mut report = AccuracyReport {
        accuracy: 0.0,
        correct: 0,
        total: labels.len(),
        confusion: BTreeMap::new(),
    };
    for (row, label) in labels.iter().enumerate() {
        let row_scores = &scores[row * count..(row + 1) * count];
        let value = |s: &SequenceScore| match score {
            CandidateScore::Sum => s.log_likelihood,
            CandidateScore::Mean => s.mean(),
        };
        let mut best = 0;
        for (index, candidate) in row_scores.iter().enumerate() {
            if value(candidate) > value(&row_scores[best]) {
                best = index;
            }
        }
        let predicted = candidates.labels[best].trim();
        if predicted == label.trim() {
            report.correct += 1;
        }
        *report
            .confusion
            .entry(label.trim().to_string())
            .or_default()
            .entry(predicted.to_string())
            .or_default() += 1;
    }
    report.accuracy = ratio(report.correct, report.total);
    report
}

// ---------------------------------------------------------------------------------------------
// metrics.json and the summary
// ---------------------------------------------------------------------------------------------

/// One sample generation of both models.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Sample {
    pub prompt: String,
    pub reference: String,
    pub base: String,
    pub adapted: String,
}

/// The content of metrics.json.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct MetricsFile {
    pub split: String,
    pub rows: usize,
    /// Rows whose prompt lost tokens on the left to fit the context length.
    pub truncated_rows: usize,
    pub base: ModelMetrics,
    pub adapted: ModelMetrics,
    /// adapted − base for every headline figure both have.
    pub delta: BTreeMap<&'static str, f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub candidates: Option<Vec<String>>,
    pub samples: Vec<Sample>,
}

impl MetricsFile {
    pub fn new(
        config: &EvaluateConfig,
        plan: &EvalPlan,
        base: ModelMetrics,
        adapted: ModelMetrics,
    ) -> Self {
        let base_figures = base.figures();
        let delta = adapted
            .figures()
            .into_iter()
            .filter_map(|(name, value)| base_figures.get(name).map(|b| (name, value - b)))
            .collect();
        let samples = plan
            .samples
            .iter()
            .enumerate()
            .map(|(index, sample)| Sample {
                prompt: sample.prompt.clone(),
                reference: sample.reference.clone(),
                base: base.samples.get(index).cloned().unwrap_or_default(),
                adapted: adapted.samples.get(index).cloned().unwrap_or_default(),
            })
            .collect();
        MetricsFile {
            split: config.split.clone(),
            rows: plan.rows,
            truncated_rows: plan.truncated_rows,
            candidates: plan
                .accuracy
                .as_ref()
                .map(|work| work.candidates.choices.clone()),
            base,
            adapted,
            delta,
            samples,
        }
    }

    /// Headline figures for the run summary, as numbers: `{"base": 0.52, "adapted": 0.97}` per
    /// metric (the reporter formats them; `run --json` keeps them numbers).
    pub fn summary(&self) -> BTreeMap<String, Value> {
        let base = self.base.figures();
        let mut out = BTreeMap::new();
        for (name, adapted) in self.adapted.figures() {
            let Some(before) = base.get(name) else {
                continue;
            };
            out.insert(
                name.to_string(),
                serde_json::json!({"base": before, "adapted": adapted}),
            );
        }
        out.insert("rows".into(), Value::from(self.rows));
        out
    }
}

/// Write JSON atomically (temp file + rename) so a crash never leaves half a file.
pub fn write_json_atomic(path: &Path, value: &impl Serialize) -> Result<(), StageError> {
    let mut text = serde_json::to_string_pretty(value).map_err(|error| {
        StageError::Internal(format!("cannot encode {}: {error}", path.display()))
    })?;
    text.push('\n');
    let directory = path.parent().unwrap_or(Path::new("."));
    crate::cache::write_atomic(path, text.as_bytes(), directory)
        .map_err(|error| StageError::user(error.to_string()))
}

impl EvaluateStage {
    /// The columns of the split the configured metrics read.
    fn needed_columns(&self) -> BTreeSet<String> {
        let mut columns: BTreeSet<String> = ["prompt".to_string(), "completion".to_string()].into();
        if let Some(accuracy) = &self.config.metrics.accuracy {
            columns.insert(accuracy.label_column.clone());
            if let Some(column) = &accuracy.choices_column {
                columns.insert(column.clone());
            }
        }
        if let Some(exact) = &self.config.metrics.exact_match {
            columns.insert(exact.reference_column.clone());
        }
        columns
    }
}

/// The split files a template artifact holds (for error hints).
pub(crate) fn available_splits(data_dir: &Path) -> Vec<String> {
    let mut splits: Vec<String> = std::fs::read_dir(data_dir)
        .map(|entries| {
            entries
                .filter_map(Result::ok)
                .filter_map(|entry| {
                    entry
                        .file_name()
                        .to_str()
                        .and_then(|name| name.strip_suffix(".parquet"))
                        .map(str::to_string)
                })
                .collect()
        })
        .unwrap_or_default();
    splits.sort();
    splits
}

/// The pool of `k` demonstrations drawn from `source`'s `train.parquet`, and that file.
fn few_shot_pool(
    few_shot: &FewShotEvaluation,
    k: usize,
    source: &Path,
    seed: u64,
) -> Result<(FewShotPool, PathBuf), StageError> {
    let path = source.join("train.parquet");
    if !path.is_file() {
        return Err(StageError::user(format!(
            "few_shot: the demonstrations' stage wrote no `train` split ({} is missing)",
            path.display()
        )));
    }
    let pool = FewShotPool::build(
        &path,
        FewShotSettings {
            k,
            strategy: few_shot.strategy,
            label: few_shot.stratify_by.clone(),
            pool_size: few_shot.pool_size,
            seed,
            split: "train".to_string(),
        },
    )?;
    Ok((pool, path))
}

/// The few-shot seed of the stage `name` in a pipeline seeded `seed`.
fn few_shot_seed(few_shot: &FewShotEvaluation, seed: u64, name: &str) -> u64 {
    few_shot
        .seed
        .unwrap_or_else(|| derive_seed(derive_seed(seed, name), "few-shot"))
}

/// The split name the few-shot pool knows the evaluated rows by: their own split when the
/// demonstrations come from the evaluated stage (the row itself is then left out of its
/// draws), else `stage/split`, sharing no identity with the pool's rows.
fn evaluated_split(config: &EvaluateConfig, source: &str) -> String {
    if source == config.data {
        config.split.clone()
    } else {
        format!("{}/{}", config.data, config.split)
    }
}

/// The few-shot candidates' prompts: each row's prompt preceded by `k` demonstrations (their
/// prompt and completion, each followed by the separator) drawn by the template stage's pool
/// from `source`'s `train.parquet`.
fn few_shot_rows(
    rows: &Rows,
    split: &str,
    few_shot: &FewShotEvaluation,
    k: usize,
    source: &Path,
    seed: u64,
) -> Result<Rows, StageError> {
    let (pool, path) = few_shot_pool(few_shot, k, source, seed)?;
    let prompts = rows.column("prompt")?;
    let mut with_demonstrations = Vec::with_capacity(prompts.len());
    for (row, prompt) in prompts.iter().enumerate() {
        let demonstrations = pool
            .draw(split, row as u64)
            .map_err(|error| StageError::user(format!("few_shot k={k}: {error}")))?;
        let mut text = String::new();
        for demonstration in demonstrations {
            for column in ["prompt", "completion"] {
                let value = demonstration.get_attr(column).map_err(|error| {
                    StageError::Internal(format!("demonstration without `{column}`: {error}"))
                })?;
                text.push_str(value.as_str().ok_or_else(|| {
                    StageError::user(format!(
                        "few_shot: column `{column}` of {} is not text",
                        path.display()
                    ))
                })?);
            }
            text.push_str(&few_shot.separator);
        }
        text.push_str(prompt);
        with_demonstrations.push(text);
    }
    let mut out = rows.clone();
    out.columns
        .insert("prompt".to_string(), with_demonstrations);
    Ok(out)
}

/// `metrics.json` when no single `model` is named: the base model's metrics and every
/// candidate's, by candidate name, and the sample generations of all of them per row.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct CandidatesMetricsFile {
    pub split: String,
    pub rows: usize,
    pub truncated_rows: usize,
    pub base: ModelMetrics,
    pub candidates: BTreeMap<String, ModelMetrics>,
    pub samples: Vec<CandidatesSample>,
}

/// One sample row of [`CandidatesMetricsFile`]: what the base and each candidate generated.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct CandidatesSample {
    pub prompt: String,
    pub reference: String,
    /// `base` and each candidate's name → its generation.
    pub outputs: BTreeMap<String, String>,
}

impl CandidatesMetricsFile {
    pub fn new(
        config: &EvaluateConfig,
        plan: &EvalPlan,
        base: ModelMetrics,
        candidates: BTreeMap<String, ModelMetrics>,
    ) -> Self {
        let samples = plan
            .samples
            .iter()
            .enumerate()
            .map(|(index, sample)| {
                let mut outputs = BTreeMap::new();
                let generated = |metrics: &ModelMetrics| {
                    metrics.samples.get(index).cloned().unwrap_or_default()
                };
                outputs.insert("base".to_string(), generated(&base));
                for (name, metrics) in &candidates {
                    outputs.insert(name.clone(), generated(metrics));
                }
                CandidatesSample {
                    prompt: sample.prompt.clone(),
                    reference: sample.reference.clone(),
                    outputs,
                }
            })
            .collect();
        CandidatesMetricsFile {
            split: config.split.clone(),
            rows: plan.rows,
            truncated_rows: plan.truncated_rows,
            base,
            candidates,
            samples,
        }
    }
}

/// The 4-bit base an evaluate stage's `base_quantization` asks for over the model at
/// `base_path` (checked against the checkpoint's own 4-bit storage when it has one), and
/// whether that checkpoint is stored in 4 bits (then it is 4-bit with or without the field).
fn asked_base_quantization(
    config: &EvaluateConfig,
    base_path: &Path,
    stage: &str,
) -> Result<(Option<BaseQuantization>, Option<StoredBase>), StageError> {
    let dir = ModelDir::open(base_path).map_err(|error| StageError::user(error.to_string()))?;
    let stored = dir.stored_quantization();
    let stored_base = StoredBase::of(&dir);
    let Some(settings) = &config.base_quantization else {
        return Ok((None, stored_base));
    };
    let at = format!("stages.{stage}.evaluate.base_quantization");
    if matches!(dir.config(), ModelConfig::Gpt2(_)) {
        return Err(StageError::user(format!(
            "{at}: a 4-bit base is supported for Llama-family models; {} is gpt2",
            base_path.display()
        )));
    }
    let quantization = qlora::base_quantization(settings, stored.is_some());
    if let Some(stored) = stored {
        qlora::check_stored_base(&quantization, stored, &dir.config_path(), &at)
            .map_err(|error| StageError::user(error.to_string()))?;
    }
    Ok((Some(quantization), stored_base))
}

/// A candidate's method as the comparison names it: a LoRA (DoRA) adapter over a 4-bit base is
/// QLoRA (QDoRA); its folder is a plain LoRA folder either way.
fn four_bit_method(method: String, four_bit: bool) -> String {
    match (method.as_str(), four_bit) {
        ("lora", true) => "qlora".to_string(),
        ("dora", true) => "qdora".to_string(),
        _ => method,
    }
}

impl Stage for EvaluateStage {
    /// What the rows can refute before any model is trained or loaded: accuracy labels that
    /// no row of the evaluated split has, a few-shot `k` larger than the demonstrations the
    /// source's `train` split holds. Anything else (a missing split, an unreadable file) is
    /// left to `run`, which reports it as it always has.
    fn check_upstream(&self, ctx: &StageContext<'_>) -> Result<(), StageError> {
        let config = &self.config;
        let Some(data_dir) = ctx.upstream.get(&config.data) else {
            return Ok(());
        };
        let table = data_dir.join(format!("{}.parquet", config.split));
        let shown = format!("split `{}` of stage `{}`", config.split, config.data);
        let Ok(rows) = read_rows(&table, &shown, &self.needed_columns(), config.max_rows) else {
            return Ok(());
        };
        if rows.count == 0 {
            return Ok(());
        }
        if let Some(accuracy) = &config.metrics.accuracy {
            if let (Ok(candidates), Ok(labels)) = (
                accuracy_candidates(accuracy, &rows, &config.split),
                rows.column(&accuracy.label_column),
            ) {
                if !labels.is_empty() && labels_outside(&candidates, labels) == labels.len() {
                    let key = if accuracy.labels.is_some() {
                        "labels"
                    } else if accuracy.choices.is_some() {
                        "choices"
                    } else {
                        "choices_column"
                    };
                    return Err(StageError::user(format!(
                        "evaluate.metrics.accuracy.{key}: no row's `{}` value in {shown} is one of the candidates' labels ({}); e.g. row 0 has {:?}",
                        accuracy.label_column,
                        candidates.labels.join(", "),
                        labels[0]
                    )));
                }
            }
        }
        if let (Some(few_shot), Some(source)) = (&config.few_shot, config.few_shot_source()) {
            let Some(source_dir) = ctx.upstream.get(source) else {
                return Ok(());
            };
            let seed = few_shot_seed(few_shot, ctx.seed, ctx.name);
            let evaluated = evaluated_split(config, source);
            for (index, &k) in few_shot.k.iter().enumerate().filter(|(_, &k)| k > 0) {
                let Ok((pool, _)) = few_shot_pool(few_shot, k, source_dir, seed) else {
                    return Ok(());
                };
                for row in 0..rows.count {
                    ctx.check_cancel()?;
                    if let Err(error) = pool.draw(&evaluated, row as u64) {
                        return Err(StageError::user(format!(
                            "evaluate.few_shot.k[{index}]: {error} (stage `{source}`)"
                        )));
                    }
                }
            }
        }
        Ok(())
    }

    fn run(&self, ctx: &StageContext<'_>) -> Result<StageOutcome, StageError> {
        let config = &self.config;
        let data_dir = ctx.upstream_dir(&config.data)?;
        let table = data_dir.join(format!("{}.parquet", config.split));
        if !table.is_file() {
            return Err(StageError::user(format!(
                "stage `{}` has no split `{}` (splits: {})",
                config.data,
                config.split,
                available_splits(data_dir).join(", ")
            )));
        }
        let shown = format!("split `{}` of stage `{}`", config.split, config.data);
        let rows = read_rows(&table, &shown, &self.needed_columns(), config.max_rows)?;
        if rows.count == 0 {
            return Err(StageError::user(format!(
                "split `{}` of stage `{}` has no rows to evaluate",
                config.split, config.data
            )));
        }
        // The base model: the train stages' (all the same, checked by validation and here by
        // path), else `base_model`.
        let adapter_stages = config.adapter_stages();
        let mut base_path: Option<std::path::PathBuf> = None;
        // Each candidate's 4-bit base (QLoRA), by stage.
        let mut quantization_of: BTreeMap<String, Option<BaseQuantization>> = BTreeMap::new();
        for stage in &adapter_stages {
            let record = BaseModelRecord::read(ctx.upstream_dir(stage)?, ctx.project_dir)?;
            quantization_of.insert(stage.to_string(), record.quantization);
            match &base_path {
                None => base_path = Some(record.path),
                Some(path) if *path != record.path => {
                    return Err(StageError::user(format!(
                        "stage `{stage}` trained {} but another candidate trained {}: every candidate must share one base model",
                        record.path.display(),
                        path.display()
                    )))
                }
                Some(_) => {}
            }
        }
        let base_path = match (base_path, &config.base_model) {
            (Some(path), _) => path,
            (None, Some(written)) => {
                crate::config::hub::resolve_model_dir(ctx.project_dir, written)
                    .map_err(StageError::user)?
            }
            (None, None) => {
                return Err(StageError::Internal(
                    "no base model (validation should have caught this)".into(),
                ))
            }
        };
        let device_text = ctx.options.device.as_deref().unwrap_or(&config.device);
        let device_spec: DeviceSpec = device_text
            .parse()
            .map_err(|error: crate::device::DeviceError| StageError::user(error.to_string()))?;
        let device =
            resolve_device(device_spec).map_err(|error| StageError::user(error.to_string()))?;
        let dtype = compute_dtype(
            &device,
            match config.dtype {
                DTypeChoice::Auto => DTypeSpec::Auto,
                DTypeChoice::F32 => DTypeSpec::F32,
                DTypeChoice::Bf16 => DTypeSpec::Bf16,
                DTypeChoice::F16 => DTypeSpec::F16,
            },
        );
        // The base row runs on the 4-bit base `base_quantization` asks for, else on the base
        // every candidate shares: the 4-bit one when all of them are QLoRA adapters over the
        // same quantization (train stages, and outside folders that record theirs), else the
        // 16-bit model.
        let (asked_quantization, stored) = asked_base_quantization(config, &base_path, ctx.name)?;
        let stored_4bit = stored.is_some();
        // Each outside adapter: its folder, the base it is scored over, and why (a note).
        let mut externals = Vec::new();
        for (name, written) in config.external_candidates() {
            let adapter_dir = crate::config::hub::resolve_adapter_dir(ctx.project_dir, written)
                .map_err(StageError::user)?;
            crate::config::evaluate::adapter_files(written, &adapter_dir)
                .map_err(StageError::user)?;
            let (quantization, note) = adapter_base(
                &name,
                asked_quantization.as_ref(),
                stored.as_ref(),
                crate::infer::session::recorded_base_quantization(&adapter_dir)
                    .map_err(StageError::user)?,
                EVALUATE,
            );
            externals.push((name, adapter_dir, quantization, note));
        }
        let shared_quantization = {
            let mut all = quantization_of
                .values()
                .chain(externals.iter().map(|(_, _, quantization, _)| quantization));
            match all.next() {
                Some(first) if all.all(|other| other == first) => *first,
                _ => None,
            }
        };
        let base_quantization = asked_quantization.or(shared_quantization);
        let load = |adapter: Option<&Path>, quantization: Option<&BaseQuantization>| {
            InferenceModel::load(&base_path, adapter, quantization, &device, dtype)
                .map_err(StageError::User)
        };

        let base = load(None, base_quantization.as_ref())?;
        // Every model is scored on the same tokens: those that fit the context left after the
        // most virtual tokens any candidate prepends (prompt and prefix tuning).
        let reserved = adapter_stages
            .iter()
            .map(|stage| ctx.upstream_dir(stage).map(|dir| dir.join("adapter")))
            .collect::<Result<Vec<_>, _>>()?
            .into_iter()
            .chain(
                config
                    .external_candidates()
                    .into_iter()
                    .filter_map(|(_, written)| {
                        crate::config::hub::resolve_adapter_dir(ctx.project_dir, written).ok()
                    }),
            )
            .filter_map(|dir| crate::peft::read_adapter_config(&dir).ok())
            .map(|adapter_config| crate::peft::format::virtual_positions(&adapter_config))
            .max()
            .unwrap_or(0);
        let max_length = base.max_length().saturating_sub(reserved).max(1);
        let plan = EvalPlan::new(config, &rows, &base.tokenizer, max_length, config.add_eos)?;
        if let Some(note) = plan.truncation_note() {
            ctx.progress.note(note);
        }
        if let (Some(work), Some(accuracy)) = (&plan.accuracy, &config.metrics.accuracy) {
            let outside = labels_outside(&work.candidates, &work.labels);
            if outside > 0 {
                ctx.progress.note(format!(
                    "accuracy: {outside} of {} rows have a `{}` value that is none of the candidates' labels ({}); they count as wrong",
                    plan.rows,
                    accuracy.label_column,
                    work.candidates.labels.join(", ")
                ));
            }
        }
        let evaluate = |model: &InferenceModel, plan: &EvalPlan, label: &str| {
            evaluate_model(
                &model.language_model(),
                &model.tokenizer,
                plan,
                config.batch_size,
                &Reporter { ctx, label },
            )
        };
        let base_metrics = evaluate(&base, &plan, "base")?;
        let mut base_row = ComparisonRow::new(
            "base".to_string(),
            CandidateKind::Base,
            "base",
            &base_metrics,
        );
        base_row.base_4bit = four_bit_label(base_quantization.as_ref(), stored_4bit);
        let mut rows_out = vec![base_row];
        let mut candidates: BTreeMap<String, ModelMetrics> = BTreeMap::new();
        if let (Some(few_shot), Some(source)) = (&config.few_shot, config.few_shot_source()) {
            let source_dir = ctx.upstream_dir(source)?;
            let seed = few_shot_seed(few_shot, ctx.seed, ctx.name);
            for &k in few_shot.k.iter().filter(|&&k| k > 0) {
                let evaluated = evaluated_split(config, source);
                let shot_rows = few_shot_rows(&rows, &evaluated, few_shot, k, source_dir, seed)?;
                let shot_plan = EvalPlan::new(
                    config,
                    &shot_rows,
                    &base.tokenizer,
                    max_length,
                    config.add_eos,
                )?;
                if shot_plan.prompt_cut_rows > 0 {
                    ctx.progress.note(format!(
                        "few-shot k={k}: {} of {} prompts lost demonstration tokens on the left to fit {} tokens",
                        shot_plan.prompt_cut_rows, shot_plan.rows, shot_plan.max_length
                    ));
                }
                let name = format!("few-shot k={k}");
                let metrics = evaluate(&base, &shot_plan, &name)?;
                let mut row =
                    ComparisonRow::new(name.clone(), CandidateKind::FewShot, "few_shot", &metrics);
                row.k = Some(k);
                rows_out.push(row);
                candidates.insert(name, metrics);
            }
        }
        drop(base);
        let mut adapted_of_model = None;
        for stage in &adapter_stages {
            let train_dir = ctx.upstream_dir(stage)?;
            let adapter_dir = train_dir.join("adapter");
            let quantization = quantization_of.get(*stage).copied().flatten();
            let method = four_bit_method(adapter_method(&adapter_dir)?, quantization.is_some());
            let adapted = load(Some(&adapter_dir), quantization.as_ref())?;
            let metrics = evaluate(&adapted, &plan, stage)?;
            drop(adapted);
            let mut row =
                ComparisonRow::new(stage.to_string(), CandidateKind::Adapter, &method, &metrics)
                    // Parameters only: a run's wall time, tokens/s and peak memory vary between
                    // runs of the same inputs, so they must not enter this stage's output (the
                    // cache would then hold what a clean run does not reproduce); they stay in
                    // the train stages' run records, and the reporter joins them in.
                    .with_trainable_parameters(train_dir)?;
            row.base_4bit = four_bit_label(quantization.as_ref(), stored_4bit);
            rows_out.push(row);
            if config.model.as_deref() == Some(*stage) {
                adapted_of_model = Some(metrics.clone());
            }
            candidates.insert(stage.to_string(), metrics);
        }
        for (name, adapter_dir, quantization, note) in externals {
            if let Some(warning) = base_mismatch(&adapter_dir, &base_path, config)? {
                ctx.progress.warning(warning);
            }
            if let Some(note) = note {
                ctx.progress.note(note);
            }
            // Loading first: its errors name the file and list the methods peftpipe loads.
            let adapted = load(Some(&adapter_dir), quantization.as_ref())?;
            let method = four_bit_method(
                adapter_method(&adapter_dir)?,
                quantization.is_some() || stored_4bit,
            );
            let parameters = adapted
                .adapter
                .as_ref()
                .map_or(0, |adapter| adapter.trainable_parameter_count());
            let metrics = evaluate(&adapted, &plan, &name)?;
            drop(adapted);
            let mut row = ComparisonRow::new(
                name.clone(),
                CandidateKind::ExternalAdapter,
                &method,
                &metrics,
            );
            row.trainable_parameters = parameters;
            row.base_4bit = four_bit_label(quantization.as_ref(), stored_4bit);
            rows_out.push(row);
            candidates.insert(name, metrics);
        }
        let comparison = Comparison {
            split: config.split.clone(),
            rows: plan.rows,
            candidates: rows_out,
        };
        write_json_atomic(&ctx.out_dir.join("comparison.json"), &comparison)?;
        crate::peft::write_atomic(
            &ctx.out_dir.join("comparison.md"),
            markdown(&comparison).as_bytes(),
        )
        .map_err(|error| StageError::user(error.to_string()))?;
        let mut summary = match adapted_of_model {
            Some(adapted) => {
                let file = MetricsFile::new(config, &plan, base_metrics, adapted);
                write_json_atomic(&ctx.out_dir.join("metrics.json"), &file)?;
                file.summary()
            }
            None => {
                let mut summary = BTreeMap::new();
                for (name, value) in base_metrics.figures() {
                    summary.insert(format!("base_{name}"), Value::from(value));
                }
                summary.insert("rows".into(), Value::from(plan.rows));
                let file = CandidatesMetricsFile::new(config, &plan, base_metrics, candidates);
                write_json_atomic(&ctx.out_dir.join("metrics.json"), &file)?;
                summary
            }
        };
        if comparison.candidates.len() > 2 || config.model.is_none() {
            summary.insert(
                "candidates".into(),
                Value::from(comparison.candidates.len()),
            );
            summary.insert(
                "comparison".into(),
                serde_json::to_value(&comparison).map_err(|error| {
                    StageError::Internal(format!("cannot encode the comparison: {error}"))
                })?,
            );
        }
        Ok(StageOutcome { summary })
    }
}

/// A warning when an external adapter's `base_model_name_or_path` (PEFT's record of what it was
/// trained on) names another model than the base it is applied to, compared by the last path
/// segment (`meta-llama/Llama-3.2-1B` ~ `models/Llama-3.2-1B`, case-insensitive). A warning, not
/// an error: local paths differ between machines and copies keep their weights; a base of
/// another shape fails to load with the tensor named.
fn base_mismatch(
    adapter_dir: &Path,
    base_path: &Path,
    config: &EvaluateConfig,
) -> Result<Option<String>, StageError> {
    let adapter_config = crate::peft::read_adapter_config(adapter_dir)
        .map_err(|error| StageError::user(error.to_string()))?;
    let Some(recorded) = adapter_config
        .get("base_model_name_or_path")
        .and_then(Value::as_str)
        .filter(|text| !text.trim().is_empty())
    else {
        return Ok(None);
    };
    let last = |text: &str| {
        let text = text.trim().trim_end_matches('/');
        let text = text.strip_prefix("hf://").unwrap_or(text);
        let text = text.split('@').next().unwrap_or(text);
        text.rsplit('/').next().unwrap_or(text).to_lowercase()
    };
    let mut names = vec![last(&base_path.to_string_lossy())];
    if let Some(written) = &config.base_model {
        names.push(last(written));
    }
    // A Hub snapshot folder is named by its commit; its repository folder holds the name.
    if let Some(repo) = base_path
        .ancestors()
        .filter_map(|dir| dir.file_name())
        .map(|name| name.to_string_lossy().into_owned())
        .find(|name| name.starts_with("models--"))
    {
        names.push(last(&repo.replacen("models--", "", 1).replace("--", "/")));
    }
    if names.contains(&last(recorded)) {
        return Ok(None);
    }
    Ok(Some(format!(
        "{}: base_model_name_or_path is `{recorded}`, but the adapter is evaluated on {}; its figures are only meaningful on the model it was trained on",
        adapter_dir.join("adapter_config.json").display(),
        base_path.display()
    )))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::evaluate::AccuracyConfig;
    use crate::infer::score::tests::BigramModel;
    use crate::infer::text::tests::LetterCodec;
    use crate::models::quantized::BnbQuantization;
    use crate::stages::{NullSink, RunOptions};

    #[test]
    fn a_stored_base_in_other_blocks_than_the_record_is_said_in_the_note() {
        let recorded = BaseQuantization::from_json(&serde_json::json!({
            "quant_type": "nf4", "double_quant": true, "block_size": 64, "prequantized": true
        }))
        .unwrap();
        let stored = |block_size| StoredBase {
            settings: BnbQuantization {
                quant_type: recorded.config.quant_type,
                double_quant: true,
                compute_dtype: None,
            },
            block_size,
        };
        let note = |stored: StoredBase| {
            adapter_base(
                "ext",
                None,
                Some(&stored),
                Some((recorded, PathBuf::from("a/peftpipe_base_quantization.json"))),
                EVALUATE,
            )
            .1
        };
        // The checkpoint it trained over, as far as the files tell: scored as trained, no note.
        assert_eq!(note(stored(Some(64))), None);
        // The same type and double quantization but blocks of 32: not the base it learned on.
        let said = note(stored(Some(32))).expect("a note");
        assert!(
            said.contains("blocks of 32") && said.contains("ext"),
            "{said}"
        );
    }

    /// A completion longer than the context is cut on the right (the prompt, here empty, keeps
    /// its BOS): the note said prompt tokens were dropped on the left, which none were.
    #[test]
    fn the_truncation_note_says_which_part_was_cut() {
        let config = config("{ model: t, data: p, samples: 0 }");
        // Row 0: an empty prompt and a completion of 7 tokens; row 1: a long prompt; row 2 fits.
        let rows = rows(&["", "abcdefgh", "a"], &["abcdefg", "b", "b"]);
        let plan = EvalPlan::new(&config, &rows, &LetterCodec, 5, false).unwrap();
        assert_eq!(plan.truncated_rows, 2);
        let note = plan.truncation_note().expect("a note");
        assert!(
            note.contains("1 of 3 rows had prompt tokens dropped on the left to fit 5 tokens")
                && note.contains("1 of 3 rows had a completion cut on the right"),
            "{note}"
        );
        // Only the empty prompt's row: nothing is said of prompt tokens.
        let rows = super::tests::rows(&[""], &["abcdefg"]);
        let plan = EvalPlan::new(&config, &rows, &LetterCodec, 5, false).unwrap();
        let note = plan.truncation_note().expect("a note");
        assert!(!note.contains("prompt tokens"), "{note}");
        let rows = super::tests::rows(&["a"], &["b"]);
        let plan = EvalPlan::new(&config, &rows, &LetterCodec, 5, false).unwrap();
        assert_eq!(plan.truncation_note(), None);
    }

    /// YAML → JSON value → the config (as the loader does).
    fn config(yaml: &str) -> EvaluateConfig {
        let value: serde_json::Value = serde_norway::from_str(yaml).unwrap();
        serde_json::from_value(value).unwrap()
    }

    fn rows(prompts: &[&str], completions: &[&str]) -> Rows {
        Rows {
            count: prompts.len(),
            columns: BTreeMap::from([
                (
                    "prompt".into(),
                    prompts.iter().map(|s| s.to_string()).collect(),
                ),
                (
                    "completion".into(),
                    completions.iter().map(|s| s.to_string()).collect(),
                ),
            ]),
        }
    }

    fn with_context<T>(f: impl FnOnce(&StageContext<'_>) -> T) -> T {
        with_context_cancelled(false, f)
    }

    /// A test context whose cancel flag starts as `cancelled`.
    fn with_context_cancelled<T>(cancelled: bool, f: impl FnOnce(&StageContext<'_>) -> T) -> T {
        with_sink(cancelled, &NullSink, f)
    }

    /// A test context sending progress to `progress`.
    fn with_sink<T>(
        cancelled: bool,
        progress: &dyn crate::stages::ProgressSink,
        f: impl FnOnce(&StageContext<'_>) -> T,
    ) -> T {
        let upstream = BTreeMap::new();
        let cancel = std::sync::atomic::AtomicBool::new(cancelled);
        let options = RunOptions::default();
        let ctx = StageContext {
            name: "eval",
            project_dir: Path::new("."),
            out_dir: Path::new("."),
            upstream: &upstream,
            seed: 0,
            progress,
            cancel: &cancel,
            options: &options,
            fingerprint: "",
            upstream_outcomes: &Default::default(),
            inputs: &Default::default(),
            checkpoint_dir: None,
            resume: true,
        };
        f(&ctx)
    }

    /// Tokens: 0 pad, 1 BOS, 2 EOS, 3 `a`, 4 `b`, 5 `c` (LetterCodec's ids). After `a` the
    /// model strongly prefers `b` over `c`; after `b` it prefers EOS.
    fn prefers_b_after_a() -> BigramModel {
        let mut table = vec![vec![0.0f32; 6]; 6];
        table[1][3] = 4.0; // BOS → a
        table[3][4] = 3.0; // a → b
        table[3][5] = 1.0; // a → c (less likely)
        table[4][2] = 5.0; // b → EOS
        table[5][2] = 5.0; // c → EOS
        BigramModel {
            table,
            device: candle_core::Device::Cpu,
        }
    }

    #[test]
    fn loss_accuracy_exact_match_and_samples_on_a_model_with_a_known_preference() {
        let model = prefers_b_after_a();
        let rows = rows(&["a", "a"], &["b", "c"]);
        let config = config(
            "{ model: t, data: p, samples: 2, sample_max_new_tokens: 4, metrics: { accuracy: { choices: [b, c] }, exact_match: { max_new_tokens: 4 } } }",
        );
        let plan = EvalPlan::new(&config, &rows, &LetterCodec, 64, false).unwrap();
        let metrics = with_context(|ctx| {
            evaluate_model(
                &model,
                &LetterCodec,
                &plan,
                2,
                &Reporter { ctx, label: "base" },
            )
        })
        .unwrap();
        // Loss over completion tokens only: log p(b | a) and log p(c | a); the prompt's BOS → a
        // is context.
        let expected = -(model.log_prob(3, 4) + model.log_prob(3, 5)) / 2.0;
        assert!((metrics.loss.unwrap() - expected).abs() < 1e-6);
        assert!((metrics.perplexity.unwrap() - expected.exp()).abs() < 1e-5);
        assert_eq!(metrics.loss_tokens, Some(2));
        // The model always picks `b`: right on row 0, wrong on row 1.
        let accuracy = metrics.accuracy.unwrap();
        assert_eq!((accuracy.correct, accuracy.total), (1, 2));
        assert_eq!(accuracy.confusion["c"]["b"], 1);
        // Greedy: a → b → EOS, so the generation is `b` on both rows.
        let exact = metrics.exact_match.unwrap();
        assert_eq!((exact.matches, exact.total, exact.ended_at_eos), (1, 2, 2));
        assert_eq!(metrics.samples, ["b", "b"]);
    }

    #[test]
    fn an_exact_match_reference_ends_where_its_end_of_sequence_token_is() {
        // A chat template's completion ends with the end-of-turn token as text (`$` here);
        // generation stops there and drops it, so the reference must too.
        let exact = exact_match_after_a(
            &["b$", "b$c"],
            "{ model: t, data: p, metrics: { exact_match: { max_new_tokens: 4 } } }",
        );
        assert_eq!((exact.matches, exact.total), (2, 2));
    }

    /// Exact match of [`prefers_b_after_a`] (which generates `b`) over the prompt `a` with each
    /// of `references`, evaluated with `yaml`.
    fn exact_match_after_a(references: &[&str], yaml: &str) -> ExactMatchReport {
        let model = prefers_b_after_a();
        let prompts = vec!["a"; references.len()];
        let rows = rows(&prompts, references);
        let plan = EvalPlan::new(&config(yaml), &rows, &LetterCodec, 64, false).unwrap();
        let metrics = with_context(|ctx| {
            evaluate_model(
                &model,
                &LetterCodec,
                &plan,
                2,
                &Reporter { ctx, label: "base" },
            )
        })
        .unwrap();
        metrics.exact_match.unwrap()
    }

    #[test]
    fn an_exact_match_reference_is_cut_at_a_stop_string_as_the_generation_is() {
        // The generation `b` stops before `c`; the reference `bc` must end there too, or a
        // reference that holds a stop string could never match.
        let exact = exact_match_after_a(
            &["bc", "cb"],
            "{ model: t, data: p, metrics: { exact_match: { max_new_tokens: 4, stop: [c] } } }",
        );
        // Row 0: `b` against `b`; row 1: `b` against the empty text before `c`.
        assert_eq!((exact.matches, exact.total), (1, 2));
    }

    /// Progress as (message, position, length).
    #[derive(Default)]
    struct RecordingSink(std::sync::Mutex<Vec<(String, u64, Option<u64>)>>);

    impl crate::stages::ProgressSink for RecordingSink {
        fn progress(&self, progress: Progress) {
            if let Ok(mut seen) = self.0.lock() {
                seen.push((progress.message, progress.position, progress.length));
            }
        }

        fn note(&self, _message: String) {}
    }

    #[test]
    fn generations_are_batched_and_each_phase_counts_its_own_examples() {
        let model = prefers_b_after_a();
        let rows = rows(&["a", "a", "ab"], &["b", "c", "b"]);
        let config = config(
            "{ model: t, data: p, samples: 3, sample_max_new_tokens: 4, metrics: { exact_match: { max_new_tokens: 4 } } }",
        );
        let plan = EvalPlan::new(&config, &rows, &LetterCodec, 64, false).unwrap();
        let sink = RecordingSink::default();
        let by_batch = |batch_size: usize| {
            with_sink(false, &sink, |ctx| {
                evaluate_model(
                    &model,
                    &LetterCodec,
                    &plan,
                    batch_size,
                    &Reporter { ctx, label: "base" },
                )
            })
            .unwrap()
        };
        let batched = by_batch(2);
        let seen = std::mem::take(&mut *sink.0.lock().unwrap());
        let phase = |name: &str| -> Vec<(u64, Option<u64>)> {
            seen.iter()
                .filter(|(message, _, _)| message == name)
                .map(|&(_, position, length)| (position, length))
                .collect()
        };
        // Two batches per phase (2 + 1 prompts), each phase counted from 0 to its own rows.
        let expected = [(0, Some(3)), (2, Some(3)), (3, Some(3))];
        assert_eq!(phase("base · loss"), expected);
        assert_eq!(phase("base · exact match"), expected);
        assert_eq!(phase("base · samples"), expected);
        // One prompt at a time gives the same generations.
        let alone = by_batch(1);
        assert_eq!(batched.samples, ["b", "b", ""]);
        assert_eq!(batched.samples, alone.samples);
        assert_eq!(batched.exact_match, alone.exact_match);
        let exact = batched.exact_match.unwrap();
        assert_eq!((exact.matches, exact.total, exact.ended_at_eos), (1, 3, 3));
    }

    #[test]
    fn eos_is_scored_when_appended() {
        let model = prefers_b_after_a();
        let rows = rows(&["a"], &["b"]);
        let config = config("{ model: t, data: p, samples: 0 }");
        let plan = EvalPlan::new(&config, &rows, &LetterCodec, 64, true).unwrap();
        let metrics = with_context(|ctx| {
            evaluate_model(
                &model,
                &LetterCodec,
                &plan,
                2,
                &Reporter { ctx, label: "base" },
            )
        })
        .unwrap();
        let expected = -(model.log_prob(3, 4) + model.log_prob(4, 2)) / 2.0;
        assert!((metrics.loss.unwrap() - expected).abs() < 1e-6);
        assert_eq!(metrics.loss_tokens, Some(2));
    }

    #[test]
    fn cancellation_stops_evaluation() {
        let model = prefers_b_after_a();
        let rows = rows(&["a"], &["b"]);
        let config = config("{ model: t, data: p }");
        let plan = EvalPlan::new(&config, &rows, &LetterCodec, 64, false).unwrap();
        let error = with_context_cancelled(true, |ctx| {
            evaluate_model(
                &model,
                &LetterCodec,
                &plan,
                2,
                &Reporter { ctx, label: "base" },
            )
        })
        .unwrap_err();
        assert!(matches!(error, StageError::Cancelled));
    }

    #[test]
    fn a_base_other_than_the_adapters_recorded_one_is_a_warning() {
        let dir = tempfile::tempdir().unwrap();
        let write = |recorded: &str| {
            std::fs::write(
                dir.path().join("adapter_config.json"),
                format!(r#"{{"peft_type": "LORA", "base_model_name_or_path": "{recorded}"}}"#),
            )
            .unwrap();
        };
        let config =
            config("{ base_model: models/Llama-3.2-1B, external_adapters: [a], data: prompts }");
        let base = Path::new("/work/models/Llama-3.2-1B");
        for same in ["meta-llama/Llama-3.2-1B", "/elsewhere/llama-3.2-1b/", ""] {
            write(same);
            assert_eq!(
                base_mismatch(dir.path(), base, &config).unwrap(),
                None,
                "{same}"
            );
        }
        // A Hub snapshot is named by its repository folder.
        let snapshot = Path::new("/hf/models--meta-llama--Llama-3.2-3B/snapshots/0123abcd");
        write("meta-llama/Llama-3.2-3B");
        assert_eq!(base_mismatch(dir.path(), snapshot, &config).unwrap(), None);
        write("Qwen/Qwen2.5-0.5B");
        let warning = base_mismatch(dir.path(), base, &config).unwrap().unwrap();
        assert!(
            warning.contains("adapter_config.json")
                && warning.contains("`Qwen/Qwen2.5-0.5B`")
                && warning.contains("Llama-3.2-1B"),
            "{warning}"
        );
    }

    #[test]
    fn accuracy_picks_the_most_likely_candidate() {
        let candidates = Candidates {
            choices: vec![" no".into(), " yes".into()],
            labels: vec!["0".into(), "1".into()],
        };
        let score = |log_likelihood, tokens| SequenceScore {
            log_likelihood,
            tokens,
        };
        // Row 0 prefers yes, row 1 prefers no by sum but yes by mean.
        let scores = [
            score(-3.0, 1),
            score(-1.0, 1),
            score(-2.0, 1),
            score(-3.0, 3),
        ];
        let labels = ["1".to_string(), " 1 ".to_string()];
        let sum = accuracy_of(&candidates, &scores, &labels, CandidateScore::Sum);
        assert_eq!((sum.correct, sum.total), (1, 2));
        assert_eq!(sum.confusion["1"]["0"], 1);
        assert_eq!(sum.confusion["1"]["1"], 1);
        let mean = accuracy_of(&candidates, &scores, &labels, CandidateScore::Mean);
        assert_eq!((mean.correct, mean.accuracy), (2, 1.0));
    }

    #[test]
    fn candidates_metrics_file_keeps_every_models_samples() {
        let config = config("{ base_model: m, data: p, samples: 1 }");
        let rows = rows(&["ab"], &["c"]);
        let plan = EvalPlan::new(&config, &rows, &LetterCodec, 64, true).unwrap();
        let with = |text: &str| ModelMetrics {
            loss: Some(1.0),
            samples: vec![text.into()],
            ..ModelMetrics::default()
        };
        let candidates = BTreeMap::from([
            ("r8".to_string(), with("c")),
            ("few-shot k=2".to_string(), with("d")),
        ]);
        let file = CandidatesMetricsFile::new(&config, &plan, with("x"), candidates);
        let json = serde_json::to_value(&file).unwrap();
        assert_eq!(json["samples"][0]["prompt"], "ab");
        assert_eq!(json["samples"][0]["reference"], "c");
        assert_eq!(
            json["samples"][0]["outputs"],
            serde_json::json!({"base": "x", "r8": "c", "few-shot k=2": "d"})
        );
        assert_eq!(json["candidates"]["r8"]["loss"], 1.0);
    }

    #[test]
    fn metrics_file_has_base_adapted_delta_and_samples() {
        let config = config("{ model: t, data: p }");
        let rows = rows(&["ab"], &["c"]);
        let plan = EvalPlan::new(&config, &rows, &LetterCodec, 64, true).unwrap();
        let base = ModelMetrics {
            loss: Some(2.0),
            perplexity: Some(2f64.exp()),
            loss_tokens: Some(10),
            samples: vec!["x".into()],
            ..ModelMetrics::default()
        };
        let adapted = ModelMetrics {
            loss: Some(1.5),
            perplexity: Some(1.5f64.exp()),
            loss_tokens: Some(10),
            samples: vec!["c".into()],
            ..ModelMetrics::default()
        };
        let file = MetricsFile::new(&config, &plan, base, adapted);
        let json = serde_json::to_value(&file).unwrap();
        assert_eq!(json["delta"]["loss"], -0.5);
        assert_eq!(json["samples"][0]["prompt"], "ab");
        assert_eq!(json["samples"][0]["reference"], "c");
        assert_eq!(json["samples"][0]["base"], "x");
        assert_eq!(json["samples"][0]["adapted"], "c");
        assert_eq!(json["base"]["loss_tokens"], 10);
        let summary = file.summary();
        assert_eq!(
            summary["perplexity"],
            serde_json::json!({"base": 2f64.exp(), "adapted": 1.5f64.exp()})
        );
        assert_eq!(
            summary["loss"],
            serde_json::json!({"base": 2.0, "adapted": 1.5})
        );
    }

    #[test]
    fn candidates_from_a_column_and_unknown_labels() {
        let mut rows = rows(&["a", "a", "a"], &["b", "c", "b"]);
        rows.columns
            .insert("label".into(), vec!["x".into(), "y".into(), "z".into()]);
        let from_column = config(
            "{ model: t, data: p, metrics: { loss: false, accuracy: { choices_column: completion } } }",
        );
        let plan = EvalPlan::new(&from_column, &rows, &LetterCodec, 64, false).unwrap();
        let work = plan.accuracy.as_ref().unwrap();
        assert_eq!(work.candidates.choices, ["b", "c"]);
        assert_eq!(work.examples.len(), 6);
        let mismatched = EvaluateConfig {
            metrics: crate::config::evaluate::MetricsConfig {
                loss: false,
                accuracy: Some(Box::new(AccuracyConfig {
                    choices: Some(vec!["b".into(), "c".into()]),
                    choices_column: None,
                    label_column: "label".into(),
                    labels: None,
                    score: CandidateScore::Sum,
                })),
                exact_match: None,
            },
            ..from_column
        };
        let error = EvalPlan::new(&mismatched, &rows, &LetterCodec, 64, false)
            .err()
            .unwrap();
        assert!(
            error.to_string().contains("no row's `label` value"),
            "{error}"
        );
    }

    #[test]
    fn read_rows_reads_text_and_numbers_and_refuses_nulls() {
        use arrow::array::{Int64Array, StringArray};
        use arrow::datatypes::{DataType, Field, Schema};
        use arrow::record_batch::RecordBatch;
        use std::sync::Arc;

        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("eval.parquet");
        let schema = Arc::new(Schema::new(vec![
            Field::new("prompt", DataType::Utf8, true),
            Field::new("label", DataType::Int64, true),
        ]));
        let batch = RecordBatch::try_new(
            schema.clone(),
            vec![
                Arc::new(StringArray::from(vec![Some("p0"), Some("p1"), None])),
                Arc::new(Int64Array::from(vec![0, 1, 1])),
            ],
        )
        .unwrap();
        let mut writer =
            parquet::arrow::ArrowWriter::try_new(File::create(&path).unwrap(), schema, None)
                .unwrap();
        writer.write(&batch).unwrap();
        writer.close().unwrap();
        let wanted: BTreeSet<String> = ["prompt".to_string(), "label".to_string()].into();
        let two = read_rows(&path, "the file", &wanted, Some(2)).unwrap();
        assert_eq!(two.count, 2);
        assert_eq!(two.columns["prompt"], ["p0", "p1"]);
        assert_eq!(two.columns["label"], ["0", "1"]);
        let error = read_rows(&path, "the file", &wanted, None).unwrap_err();
        assert!(
            error.to_string().contains("`prompt` is null in row 2"),
            "{error}"
        );
        let missing: BTreeSet<String> = ["answer".to_string()].into();
        let error = read_rows(&path, "the file", &missing, None).unwrap_err();
        assert!(error.to_string().contains("no column `answer`"), "{error}");
    }
}
