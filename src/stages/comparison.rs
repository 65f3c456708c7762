//! The evaluate stage's comparison table: one row per candidate (the base model, the base model
//! with k few-shot demonstrations, each upstream adapter) with its trainable parameters and what
//! it scored on the same rows. Written as `comparison.json` and `comparison.md` into the stage's
//! artifact, which is cached, so they hold only what the inputs determine: the candidates and
//! their deterministic figures. What training cost — train time, tokens/s, peak memory — varies
//! between runs of the same inputs, so it lives in each train stage's run record (its outcome in
//! the lock file and the run cache) and the reporter joins it in when it shows the table
//! ([`Comparison::join_training`]): the run summary, `peftpipe metrics show`, the HTML report.
//! Pure data and text; reads an adapter's method from its `adapter_config.json` through
//! `peft::format` (the one reader) and never prints.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::Path;

use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::evaluate::ModelMetrics;
use super::StageError;

/// What a candidate is.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CandidateKind {
    /// The base model on the rows as rendered (zero-shot).
    Base,
    /// The base model on each row's prompt preceded by `k` demonstrations.
    FewShot,
    /// An upstream train stage's adapter.
    Adapter,
    /// A PEFT adapter folder made outside the pipeline (`external_adapters`).
    ExternalAdapter,
}

/// One row of the table.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ComparisonRow {
    /// `base`, `few-shot k=2`, or the train stage's name (`train@lora`).
    pub candidate: String,
    pub kind: CandidateKind,
    /// `base`, `few_shot`, or the adapter's method (`lora`, `dora`, `ia3`, `prompt_tuning`,
    /// `prefix_tuning`, `llama_adapter`).
    pub method: String,
    /// The 4-bit base the row's model runs over (`4-bit nf4, double quant, block 64`); absent:
    /// the base model as stored. Said because the base row of a comparison of QLoRA candidates
    /// may be the 4-bit or the 16-bit model (see evaluate's `base_quantization`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub base_4bit: Option<String>,
    /// Demonstrations per prompt (few-shot rows).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub k: Option<usize>,
    /// Trained parameters (0 for the base model and few-shot prompting).
    pub trainable_parameters: u64,
    /// Wall time of the training run that produced the adapter. Never in the stage's output:
    /// joined from the train stage's run record for display ([`Comparison::join_training`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub train_seconds: Option<f64>,
    /// Training throughput of that run (joined for display, like `train_seconds`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tokens_per_second: Option<f64>,
    /// Peak memory of that run (joined for display, like `train_seconds`; see
    /// `train::peak_memory` for what it counts on each device).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub peak_memory_bytes: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub loss: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub perplexity: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub accuracy: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exact_match: Option<f64>,
}

impl ComparisonRow {
    /// A row with `metrics`' headline figures and no training cost.
    pub fn new(
        candidate: String,
        kind: CandidateKind,
        method: &str,
        metrics: &ModelMetrics,
    ) -> Self {
        ComparisonRow {
            candidate,
            kind,
            method: method.to_string(),
            base_4bit: None,
            k: None,
            trainable_parameters: 0,
            train_seconds: None,
            tokens_per_second: None,
            peak_memory_bytes: None,
            loss: metrics.loss,
            perplexity: metrics.perplexity,
            accuracy: metrics.accuracy.as_ref().map(|report| report.accuracy),
            exact_match: metrics
                .exact_match
                .as_ref()
                .map(|report| report.exact_match),
        }
    }

    /// The trainable-parameter count of the train artifact in `train_dir` (its `summary.json`).
    pub fn with_trainable_parameters(mut self, train_dir: &Path) -> Result<Self, StageError> {
        let path = train_dir.join("summary.json");
        let text = std::fs::read_to_string(&path).map_err(|error| {
            StageError::user(format!("cannot read {}: {error}", path.display()))
        })?;
        let summary: Value = serde_json::from_str(&text).map_err(|error| {
            StageError::user(format!("{} is not valid JSON: {error}", path.display()))
        })?;
        self.trainable_parameters = summary
            .get("trainable_parameters")
            .and_then(Value::as_u64)
            .ok_or_else(|| {
                StageError::user(format!("{} has no trainable_parameters", path.display()))
            })?;
        Ok(self)
    }
}

/// `comparison.json`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Comparison {
    pub split: String,
    /// Rows every candidate was scored on.
    pub rows: usize,
    pub candidates: Vec<ComparisonRow>,
}

impl Comparison {
    /// Fill each adapter row's training cost from the outcome its train stage's run recorded
    /// (`wall_seconds`, `tokens_per_second`, `peak_memory_bytes`), found by the row's candidate
    /// name through `outcome_of`: for display only, never for the stage's output. Rows whose
    /// stage has no record keep none. Returns the candidates that got figures.
    pub fn join_training<'a>(
        &mut self,
        outcome_of: impl Fn(&str) -> Option<&'a BTreeMap<String, Value>>,
    ) -> Vec<String> {
        let mut joined = Vec::new();
        for row in &mut self.candidates {
            if row.kind != CandidateKind::Adapter {
                continue;
            }
            let Some(outcome) = outcome_of(&row.candidate) else {
                continue;
            };
            row.train_seconds = outcome.get("wall_seconds").and_then(Value::as_f64);
            row.tokens_per_second = outcome.get("tokens_per_second").and_then(Value::as_f64);
            row.peak_memory_bytes = outcome.get("peak_memory_bytes").and_then(Value::as_u64);
            if row.train_seconds.is_some()
                || row.tokens_per_second.is_some()
                || row.peak_memory_bytes.is_some()
            {
                joined.push(row.candidate.clone());
            }
        }
        joined
    }
}

/// The method of the adapter folder `dir`, as written in YAML.
pub fn adapter_method(dir: &Path) -> Result<String, StageError> {
    let config = crate::peft::read_adapter_config(dir)
        .map_err(|error| StageError::user(error.to_string()))?;
    let peft_type = crate::peft::format::peft_type(&config).unwrap_or_default();
    let dora = config.get("use_dora").and_then(Value::as_bool) == Some(true);
    Ok(match peft_type {
        "LORA" if dora => "dora",
        "LORA" => "lora",
        "IA3" => "ia3",
        "PROMPT_TUNING" => "prompt_tuning",
        "PREFIX_TUNING" => "prefix_tuning",
        "ADAPTION_PROMPT" => "llama_adapter",
        other => {
            return Err(StageError::user(format!(
                "{}: unknown peft_type `{other}` in adapter_config.json",
                dir.display()
            )))
        }
    }
    .to_string())
}

/// The columns the table shows: those with a value in some row, in a fixed order.
fn columns(comparison: &Comparison) -> Vec<&'static str> {
    let rows = &comparison.candidates;
    let any = |test: &dyn Fn(&ComparisonRow) -> bool| rows.iter().any(test);
    let mut out = vec!["candidate", "method", "trainable params"];
    if any(&|row| row.train_seconds.is_some()) {
        out.push("train time");
    }
    if any(&|row| row.tokens_per_second.is_some()) {
        out.push("tokens/s");
    }
    if any(&|row| row.peak_memory_bytes.is_some()) {
        out.push("peak memory");
    }
    if any(&|row| row.loss.is_some()) {
        out.extend(["eval loss", "perplexity"]);
    }
    if any(&|row| row.accuracy.is_some()) {
        out.push("accuracy");
    }
    if any(&|row| row.exact_match.is_some()) {
        out.push("exact match");
    }
    out
}

/// `1234567` → `1,234,567`.
fn thousands(value: u64) -> String {
    let digits = value.to_string();
    let mut out = String::with_capacity(digits.len() + digits.len() / 3);
    for (index, digit) in digits.chars().enumerate() {
        if index > 0 && (digits.len() - index) % 3 == 0 {
            out.push(',');
        }
        out.push(digit);
    }
    out
}

fn cell(row: &ComparisonRow, column: &str) -> String {
    use crate::report::format;
    let or_dash = |value: Option<String>| value.unwrap_or_else(|| "—".to_string());
    match column {
        "candidate" => row.candidate.clone(),
        "method" => match (row.k, &row.base_4bit) {
            (Some(k), _) => format!("few_shot (k={k})"),
            (None, Some(base)) => format!("{} (over {base})", row.method),
            (None, None) => row.method.clone(),
        },
        "trainable params" => thousands(row.trainable_parameters),
        "train time" => or_dash(row.train_seconds.map(format::seconds)),
        "tokens/s" => or_dash(row.tokens_per_second.map(|v| thousands(v.round() as u64))),
        "peak memory" => or_dash(row.peak_memory_bytes.map(format::bytes)),
        "eval loss" => or_dash(row.loss.map(|v| format!("{v:.4}"))),
        "perplexity" => or_dash(row.perplexity.map(|v| {
            // An untrained model's perplexity can be astronomically large: keep it readable.
            if v.abs() >= 1e6 {
                format!("{v:.3e}")
            } else {
                format!("{v:.2}")
            }
        })),
        "accuracy" => or_dash(row.accuracy.map(|v| format!("{:.1}%", v * 100.0))),
        "exact match" => or_dash(row.exact_match.map(|v| format!("{:.1}%", v * 100.0))),
        _ => String::new(),
    }
}

/// The table as text cells: the header, then one line per candidate.
pub fn table(comparison: &Comparison) -> Vec<Vec<String>> {
    let columns = columns(comparison);
    let mut lines = vec![columns.iter().map(|c| c.to_string()).collect()];
    for row in &comparison.candidates {
        lines.push(columns.iter().map(|column| cell(row, column)).collect());
    }
    lines
}

/// `comparison.md`: a heading line and a GitHub-flavoured Markdown table (numbers right-aligned).
pub fn markdown(comparison: &Comparison) -> String {
    let lines = table(comparison);
    let mut text = format!(
        "Comparison on split `{}` ({} rows, the same rows for every candidate).\n\n",
        comparison.split, comparison.rows
    );
    let escape = |cell: &str| cell.replace('|', "\\|");
    for (index, line) in lines.iter().enumerate() {
        let cells: Vec<String> = line.iter().map(|cell| escape(cell)).collect();
        let _ = writeln!(text, "| {} |", cells.join(" | "));
        if index == 0 {
            let rule: Vec<&str> = line
                .iter()
                .map(|name| match name.as_str() {
                    "candidate" | "method" => "---",
                    _ => "---:",
                })
                .collect();
            let _ = writeln!(text, "|{}|", rule.join("|"));
        }
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn markdown_shows_only_recorded_columns_and_every_row() {
        let metrics = ModelMetrics {
            loss: Some(2.5),
            perplexity: Some(2.5f64.exp()),
            ..ModelMetrics::default()
        };
        let mut adapter = ComparisonRow::new(
            "train@lora".into(),
            CandidateKind::Adapter,
            "lora",
            &metrics,
        );
        adapter.trainable_parameters = 1234;
        let mut few = ComparisonRow::new(
            "few-shot k=2".into(),
            CandidateKind::FewShot,
            "few_shot",
            &metrics,
        );
        few.k = Some(2);
        let mut comparison = Comparison {
            split: "eval".into(),
            rows: 5,
            candidates: vec![
                ComparisonRow::new("base".into(), CandidateKind::Base, "base", &metrics),
                few,
                adapter,
            ],
        };
        // The stage's own table: no training cost columns.
        assert!(!markdown(&comparison).contains("train time"));
        // Joined from the train stage's record: the adapter row only, the few-shot row "—".
        let record = BTreeMap::from([
            ("wall_seconds".to_string(), Value::from(3.5)),
            ("tokens_per_second".to_string(), Value::from(2000.0)),
        ]);
        let joined = comparison.join_training(|name| (name == "train@lora").then_some(&record));
        assert_eq!(joined, ["train@lora"]);
        let text = markdown(&comparison);
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(
            lines[2],
            "| candidate | method | trainable params | train time | tokens/s | eval loss | perplexity |"
        );
        assert_eq!(lines[3], "|---|---|---:|---:|---:|---:|---:|");
        assert!(
            lines[5].starts_with("| few-shot k=2 | few_shot (k=2) | 0 | — | — | 2.5000 | 12.18 |"),
            "{}",
            lines[5]
        );
        assert!(
            lines[6].starts_with("| train@lora | lora | 1,234 | 3.50s | 2,000 |"),
            "{}",
            lines[6]
        );
        assert_eq!(lines.len(), 7);
        assert!(!text.contains("peak memory"));
    }
}
