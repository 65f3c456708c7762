//! `peftpipe metrics show` / `metrics diff`: each stage's figures as flat metric names
//! (`accuracy.adapted`, `final_loss`), taken from what lock files record of each stage's last
//! run, and their rendering as tables (human numbers) or JSON (numbers as numbers); `show` adds
//! each evaluate stage's comparison table, its trained candidates' train time, tokens/s and peak
//! memory joined from their train stages' entries. Reads no file itself: the command hands it
//! lock files.

use std::collections::BTreeMap;

use serde::Serialize;

use super::format;
use crate::cache::LockFile;
use crate::stages::comparison::Comparison;

/// One metric of one stage.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Metric {
    pub stage: String,
    /// Flat name: `final_loss`, `accuracy.adapted`.
    pub metric: String,
    pub value: Figure,
}

/// A recorded figure: its value, and whether the record wrote it as an integer (a count, a size),
/// which JSON output keeps (`1150`, not `1150.0`).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Figure {
    pub value: f64,
    pub integer: bool,
}

impl Figure {
    /// A figure recorded as a fraction (or any non-integer number).
    pub fn real(value: f64) -> Self {
        Self {
            value,
            integer: false,
        }
    }

    /// A figure recorded as an integer.
    pub fn integer(value: f64) -> Self {
        Self {
            value,
            integer: true,
        }
    }

    /// `self - before`, an integer when both are.
    fn minus(self, before: Figure) -> Figure {
        Figure {
            value: self.value - before.value,
            integer: self.integer && before.integer,
        }
    }

    fn json(self) -> serde_json::Value {
        // Integers past 2^53 are not exact in an f64: those stay floats.
        if self.integer && self.value.fract() == 0.0 && self.value.abs() < 9.0e15 {
            serde_json::json!(self.value as i64)
        } else {
            serde_json::json!(self.value)
        }
    }
}

impl Serialize for Figure {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        self.json().serialize(serializer)
    }
}

impl std::fmt::Display for Figure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.value)
    }
}

/// Every numeric figure a lock file records, stage by stage in `order` (stages the order does
/// not name follow alphabetically). Nested figures (`{"base": 0.5, "adapted": 0.98}`) flatten
/// to `accuracy.base`, `accuracy.adapted`; a figure written as text `"0.500 → 0.983"` (lock
/// files of earlier versions) reads as the same two numbers; other text is not a metric.
pub fn metrics_of(lock: &LockFile, order: &[String]) -> Vec<Metric> {
    let outcomes: Outcomes = lock
        .stages
        .iter()
        .map(|(stage, entry)| (stage.clone(), entry.outcome.clone()))
        .collect();
    metrics_of_outcomes(&outcomes, order)
}

/// Each stage's recorded figures by stage name.
pub type Outcomes = BTreeMap<String, BTreeMap<String, serde_json::Value>>;

/// [`metrics_of`] on the outcomes themselves.
pub fn metrics_of_outcomes(outcomes: &Outcomes, order: &[String]) -> Vec<Metric> {
    let mut stages: Vec<&String> = outcomes.keys().collect();
    stages.sort_by_key(|stage| {
        (
            order
                .iter()
                .position(|name| name == *stage)
                .unwrap_or(usize::MAX),
            stage.to_string(),
        )
    });
    let mut out = Vec::new();
    for stage in stages {
        for (key, value) in &outcomes[stage] {
            let mut flat = Vec::new();
            flatten(key, value, &mut flat);
            out.extend(flat.into_iter().map(|(metric, value)| Metric {
                stage: stage.clone(),
                metric,
                value,
            }));
        }
    }
    out
}

fn flatten(name: &str, value: &serde_json::Value, out: &mut Vec<(String, Figure)>) {
    use serde_json::Value;
    match value {
        Value::Number(number) => {
            if let Some(value) = number.as_f64() {
                let integer = number.is_i64() || number.is_u64();
                out.push((name.to_string(), Figure { value, integer }));
            }
        }
        Value::Object(fields) => {
            for (key, inner) in fields {
                flatten(&format!("{name}.{key}"), inner, out);
            }
        }
        Value::String(text) => {
            if let Some((before, after)) = text.split_once(" → ") {
                if let (Some(before), Some(after)) = (figure_of(before), figure_of(after)) {
                    out.push((format!("{name}.base"), before));
                    out.push((format!("{name}.adapted"), after));
                }
            }
        }
        _ => {}
    }
}

/// A number written as text (lock files of earlier versions): an integer when it reads as one.
fn figure_of(text: &str) -> Option<Figure> {
    let text = text.trim();
    let value = text.parse::<f64>().ok()?;
    Some(Figure {
        value,
        integer: text.parse::<i64>().is_ok(),
    })
}

/// The last part of a flat metric name (`accuracy.adapted` → `accuracy`), which decides how it
/// reads (`merged_bytes` in bytes, `*_seconds` as a duration).
fn leaf(metric: &str) -> &str {
    match metric.rsplit_once('.') {
        Some((head, "base" | "adapted")) => head.rsplit('.').next().unwrap_or(head),
        Some((_, tail)) => tail,
        None => metric,
    }
}

/// A metric value for people.
pub fn human(metric: &str, value: f64) -> String {
    let json = if value.fract() == 0.0 && (0.0..9.0e15).contains(&value) {
        serde_json::json!(value as u64)
    } else {
        serde_json::json!(value)
    };
    format::figure(leaf(metric), &json)
}

/// Left-aligned columns, two spaces apart, trailing spaces trimmed.
fn table(rows: &[Vec<String>]) -> String {
    let columns = rows.iter().map(Vec::len).max().unwrap_or(0);
    let mut widths = vec![0usize; columns];
    for row in rows {
        for (width, cell) in widths.iter_mut().zip(row) {
            *width = (*width).max(cell.chars().count());
        }
    }
    let mut text = String::new();
    for row in rows {
        let mut line = String::new();
        for (index, cell) in row.iter().enumerate() {
            line.push_str(&format!("{cell:<width$}  ", width = widths[index]));
        }
        text.push_str(line.trim_end());
        text.push('\n');
    }
    text
}

/// `metrics show`: stage, metric, value.
pub fn show_text(pipeline: &str, metrics: &[Metric]) -> String {
    if metrics.is_empty() {
        return format!(
            "pipeline {pipeline} has no recorded metrics yet (`peftpipe run` records them)\n"
        );
    }
    let mut rows = vec![vec!["stage".into(), "metric".into(), "value".into()]];
    for metric in metrics {
        rows.push(vec![
            metric.stage.clone(),
            metric.metric.clone(),
            human(&metric.metric, metric.value.value),
        ]);
    }
    table(&rows)
}

/// `metrics show --json`: `{"pipeline": ..., "stages": {stage: {metric: value}}}`.
pub fn show_json(pipeline: &str, metrics: &[Metric]) -> serde_json::Value {
    let mut stages: serde_json::Map<String, serde_json::Value> = serde_json::Map::new();
    for metric in metrics {
        let entry = stages
            .entry(metric.stage.clone())
            .or_insert_with(|| serde_json::json!({}));
        if let Some(object) = entry.as_object_mut() {
            object.insert(metric.metric.clone(), metric.value.json());
        }
    }
    serde_json::json!({"pipeline": pipeline, "stages": stages})
}

/// Each evaluate stage's comparison the lock file records (stages in `order`), with each trained
/// candidate's train time, tokens/s and peak memory joined from its train stage's entry.
pub fn comparisons_of(lock: &LockFile, order: &[String]) -> Vec<(String, Comparison)> {
    let mut out: Vec<(String, Comparison)> = lock
        .stages
        .iter()
        .filter_map(|(stage, entry)| {
            let value = entry.outcome.get("comparison")?;
            let mut comparison: Comparison = serde_json::from_value(value.clone()).ok()?;
            comparison.join_training(|name| lock.stages.get(name).map(|entry| &entry.outcome));
            Some((stage.clone(), comparison))
        })
        .collect();
    out.sort_by_key(|(stage, _)| {
        (
            order
                .iter()
                .position(|name| name == stage)
                .unwrap_or(usize::MAX),
            stage.clone(),
        )
    });
    out
}

/// `metrics show`'s comparison tables, each with where its training figures come from.
pub fn comparisons_text(lock: &LockFile, comparisons: &[(String, Comparison)]) -> String {
    let mut text = String::new();
    for (stage, comparison) in comparisons {
        let trained: Vec<&str> = comparison
            .candidates
            .iter()
            .filter(|row| {
                row.train_seconds.is_some()
                    || row.tokens_per_second.is_some()
                    || row.peak_memory_bytes.is_some()
            })
            .map(|row| row.candidate.as_str())
            .collect();
        let mut notes = Vec::new();
        if !trained.is_empty() {
            notes.push("train figures: from each train stage's last run".into());
        }
        if let Some(note) = super::run::peak_memory_note(
            trained
                .iter()
                .filter_map(|name| Some((*name, &lock.stages.get(*name)?.outcome))),
        ) {
            notes.push(note);
        }
        text.push_str(&super::run::comparison_table_text(
            stage, comparison, &notes,
        ));
    }
    text
}

/// `metrics show --json`'s `comparisons`: `{stage: comparison}` (numbers as numbers).
pub fn comparisons_json(comparisons: &[(String, Comparison)]) -> serde_json::Value {
    let mut out = serde_json::Map::new();
    for (stage, comparison) in comparisons {
        out.insert(
            stage.clone(),
            serde_json::to_value(comparison).unwrap_or_default(),
        );
    }
    serde_json::Value::Object(out)
}

/// One row of `metrics diff`.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct MetricChange {
    pub stage: String,
    pub metric: String,
    pub old: Option<Figure>,
    pub new: Option<Figure>,
    /// `new - old` when both exist.
    pub change: Option<Figure>,
}

/// Every metric of either side, in the new side's order, then those only the old side has.
pub fn diff(old: &[Metric], new: &[Metric]) -> Vec<MetricChange> {
    let old_values: BTreeMap<(&str, &str), Figure> = old
        .iter()
        .map(|metric| {
            (
                (metric.stage.as_str(), metric.metric.as_str()),
                metric.value,
            )
        })
        .collect();
    let new_keys: std::collections::BTreeSet<(&str, &str)> = new
        .iter()
        .map(|metric| (metric.stage.as_str(), metric.metric.as_str()))
        .collect();
    let mut out: Vec<MetricChange> = new
        .iter()
        .map(|metric| {
            let before = old_values
                .get(&(metric.stage.as_str(), metric.metric.as_str()))
                .copied();
            MetricChange {
                stage: metric.stage.clone(),
                metric: metric.metric.clone(),
                old: before,
                new: Some(metric.value),
                change: before.map(|before| metric.value.minus(before)),
            }
        })
        .collect();
    out.extend(
        old.iter()
            .filter(|metric| !new_keys.contains(&(metric.stage.as_str(), metric.metric.as_str())))
            .map(|metric| MetricChange {
                stage: metric.stage.clone(),
                metric: metric.metric.clone(),
                old: Some(metric.value),
                new: None,
                change: None,
            }),
    );
    out
}

/// `metrics diff`: stage, metric, old, new, change (`+0.4826 (+96.5%)`); unchanged metrics
/// only with `all`.
pub fn diff_text(old_label: &str, new_label: &str, changes: &[MetricChange], all: bool) -> String {
    let shown: Vec<&MetricChange> = changes
        .iter()
        .filter(|change| all || change.change.map(|change| change.value) != Some(0.0))
        .collect();
    if shown.is_empty() {
        return format!(
            "no metric changed between {old_label} and {new_label} ({} compared; --all lists them)\n",
            changes.len()
        );
    }
    let mut rows = vec![vec![
        "stage".into(),
        "metric".into(),
        old_label.to_string(),
        new_label.to_string(),
        "change".into(),
    ]];
    let value = |metric: &str, value: Option<Figure>| {
        value.map_or_else(|| "-".to_string(), |value| human(metric, value.value))
    };
    for change in shown {
        let difference = match (change.old, change.new, change.change) {
            (Some(old), Some(new), Some(difference)) => {
                let (old, new, difference) = (old.value, new.value, difference.value);
                let percent = format::percent_change(old, new);
                // Written as the figures are (bytes, durations, rates, grouped counts).
                let absolute = if difference == 0.0 {
                    "0".to_string()
                } else {
                    let sign = if difference < 0.0 { "-" } else { "+" };
                    format!("{sign}{}", human(&change.metric, difference.abs()))
                };
                if percent.is_empty() {
                    absolute
                } else {
                    format!("{absolute} ({percent})")
                }
            }
            (None, Some(_), _) => "added".into(),
            (Some(_), None, _) => "removed".into(),
            _ => "-".into(),
        };
        rows.push(vec![
            change.stage.clone(),
            change.metric.clone(),
            value(&change.metric, change.old),
            value(&change.metric, change.new),
            difference,
        ]);
    }
    table(&rows)
}

/// `metrics diff --json`.
pub fn diff_json(old_label: &str, new_label: &str, changes: &[MetricChange]) -> serde_json::Value {
    serde_json::json!({"old": old_label, "new": new_label, "metrics": changes})
}

#[cfg(test)]
mod tests {
    use super::*;

    fn outcomes(value: serde_json::Value) -> Outcomes {
        serde_json::from_value(value).unwrap()
    }

    #[test]
    fn nested_and_legacy_figures_flatten() {
        let file = outcomes(serde_json::json!({
            "evaluate": {"accuracy": {"base": 0.5, "adapted": 0.98}, "loss": "70.594 → 0.047",
                          "rows": 230},
            "export": {"merged_destination": "out/x", "merged_bytes": 411152},
        }));
        let metrics = metrics_of_outcomes(&file, &["export".into(), "evaluate".into()]);
        let names: Vec<String> = metrics
            .iter()
            .map(|metric| format!("{}:{}={}", metric.stage, metric.metric, metric.value))
            .collect();
        assert_eq!(
            names,
            [
                "export:merged_bytes=411152",
                "evaluate:accuracy.base=0.5",
                "evaluate:accuracy.adapted=0.98",
                "evaluate:loss.base=70.594",
                "evaluate:loss.adapted=0.047",
                "evaluate:rows=230",
            ]
        );
        assert_eq!(human("merged_bytes", 411152.0), "402 KiB");
        assert_eq!(human("perplexity.base", 4.55e30), "4.6e30");
    }

    #[test]
    fn changes_are_written_like_their_figures() {
        let pair = |metric: &str, old: Figure, new: Figure| {
            let old = vec![Metric {
                stage: "train".into(),
                metric: metric.into(),
                value: old,
            }];
            let new = vec![Metric {
                stage: "train".into(),
                metric: metric.into(),
                value: new,
            }];
            diff_text("old", "new", &diff(&old, &new), false)
        };
        // Counts grouped as the figures are, rates with their SI prefix.
        let text = pair(
            "trainable_parameters",
            Figure::integer(9248.0),
            Figure::integer(113_294.0),
        );
        assert!(text.contains("+104,046 ("), "{text}");
        let text = pair(
            "tokens_per_second",
            Figure::real(13_200.0),
            Figure::real(9_612.0),
        );
        assert!(text.contains("-3.59k ("), "{text}");
        let text = pair("final_loss", Figure::real(0.5), Figure::real(0.25));
        assert!(text.contains("-0.25 (-50.0%)"), "{text}");
    }

    #[test]
    fn diff_pairs_metrics_and_marks_added_and_removed() {
        let old = vec![
            Metric {
                stage: "train".into(),
                metric: "final_loss".into(),
                value: Figure::real(0.5),
            },
            Metric {
                stage: "train".into(),
                metric: "steps".into(),
                value: Figure::integer(10.0),
            },
            Metric {
                stage: "gone".into(),
                metric: "x".into(),
                value: Figure::integer(1.0),
            },
        ];
        let new = vec![
            Metric {
                stage: "train".into(),
                metric: "final_loss".into(),
                value: Figure::real(0.25),
            },
            Metric {
                stage: "train".into(),
                metric: "steps".into(),
                value: Figure::integer(10.0),
            },
            Metric {
                stage: "evaluate".into(),
                metric: "accuracy.adapted".into(),
                value: Figure::real(0.9),
            },
        ];
        let changes = diff(&old, &new);
        assert_eq!(changes.len(), 4);
        assert_eq!(changes[0].change, Some(Figure::real(-0.25)));
        let text = diff_text("old", "new", &changes, false);
        assert!(
            text.contains("final_loss        0.5  0.25  -0.25 (-50.0%)"),
            "{text}"
        );
        assert!(
            !text.contains("steps"),
            "unchanged shown without --all: {text}"
        );
        assert!(text.contains("added"), "{text}");
        assert!(text.contains("removed"), "{text}");
        assert!(diff_text("old", "new", &changes, true).contains("steps"));
    }
}
