//! The run reporter: turns the executor's [`ExecEvent`] stream into cargo-style lines on stderr
//! (one per stage start/finish, with the reason a stage runs), live indicatif progress bars when
//! stderr is a terminal (otherwise progress is logged at debug level), and the summary table at
//! the end. Colors only on a terminal without
//! `NO_COLOR`. Never decides anything: it only renders what the executor reports.

use std::collections::BTreeMap;
use std::io::IsTerminal;
use std::sync::Mutex;
use std::time::Duration;

use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};

use crate::exec::{EventSink, ExecEvent, RunSummary, StageReport, StageStatus};
use crate::stages::comparison::Comparison;

/// Terminal styling decisions for stderr.
#[derive(Debug, Clone, Copy)]
pub struct Style {
    /// ANSI colors (terminal, `NO_COLOR` unset).
    pub color: bool,
    /// Live progress bars (terminal).
    pub bars: bool,
}

impl Style {
    /// Decide from the environment and `--color`: stderr a terminal? `NO_COLOR` set?
    pub fn detect() -> Style {
        Style {
            color: super::color_stderr(),
            bars: std::io::stderr().is_terminal(),
        }
    }

    /// Plain text (tests, pipes).
    pub fn plain() -> Style {
        Style {
            color: false,
            bars: false,
        }
    }

    fn paint(&self, code: &str, text: &str) -> String {
        if self.color {
            format!("\x1b[{code}m{text}\x1b[0m")
        } else {
            text.to_string()
        }
    }

    /// A right-aligned 12-column verb, cargo style.
    pub fn verb(&self, verb: &str, code: &str) -> String {
        self.paint(code, &format!("{verb:>12}"))
    }
}

const GREEN: &str = "1;32";
const CYAN: &str = "1;36";
const RED: &str = "1;31";
const YELLOW: &str = "1;33";

/// Renders events of one run. Thread-safe (events come from worker threads).
pub struct RunReporter {
    style: Style,
    quiet: bool,
    multi: Option<MultiProgress>,
    bars: Mutex<BTreeMap<String, ProgressBar>>,
}

impl RunReporter {
    pub fn new(style: Style, quiet: bool) -> RunReporter {
        let multi = (style.bars && !quiet)
            .then(|| MultiProgress::with_draw_target(ProgressDrawTarget::stderr()));
        RunReporter {
            style,
            quiet,
            multi,
            bars: Mutex::new(BTreeMap::new()),
        }
    }

    fn line(&self, text: String) {
        if self.quiet {
            return;
        }
        self.line_always(text);
    }

    /// [`Self::line`], also when quiet.
    fn line_always(&self, text: String) {
        match &self.multi {
            Some(multi) => {
                let _ = multi.println(text);
            }
            None => super::write_stderr(&text),
        }
    }

    fn start_bar(&self, stage: &str) {
        let Some(multi) = &self.multi else {
            return;
        };
        let bar = multi.add(ProgressBar::new_spinner());
        bar.set_style(
            ProgressStyle::with_template("{spinner} {prefix:.bold} {wide_msg} {elapsed}")
                .unwrap_or_else(|_| ProgressStyle::default_spinner()),
        );
        bar.set_prefix(stage.to_string());
        bar.enable_steady_tick(Duration::from_millis(120));
        if let Ok(mut bars) = self.bars.lock() {
            bars.insert(stage.to_string(), bar);
        }
    }

    fn finish_bar(&self, stage: &str) {
        if let Ok(mut bars) = self.bars.lock() {
            if let Some(bar) = bars.remove(stage) {
                bar.finish_and_clear();
                if let Some(multi) = &self.multi {
                    multi.remove(&bar);
                }
            }
        }
    }

    fn progress(&self, stage: &str, progress: &crate::stages::Progress) {
        if self.multi.is_none() {
            // No bars (not a terminal: CI, Slurm logs): progress at debug level
            // (`RUST_LOG=peftpipe=debug`).
            let length = progress
                .length
                .map_or_else(String::new, |length| format!("/{length}"));
            tracing::debug!(
                "{stage}: {}{length} {} {}",
                progress.position,
                progress.unit,
                progress.message
            );
            return;
        }
        let Ok(bars) = self.bars.lock() else {
            return;
        };
        let Some(bar) = bars.get(stage) else {
            return;
        };
        if let Some(length) = progress.length {
            // A new phase (evaluate: base, then adapted; loss, accuracy, samples) has its own
            // length: the bar, its elapsed time and its ETA start over, so the count is always
            // of the phase shown (never `460/3`).
            if bar.length() != Some(length) || progress.position < bar.position() {
                bar.reset();
                bar.set_length(length);
                bar.set_style(
                    ProgressStyle::with_template(
                        "{prefix:.bold} [{bar:30}] {pos}/{len} {msg} · {elapsed} elapsed, ETA {eta}",
                    )
                    .unwrap_or_else(|_| ProgressStyle::default_bar())
                    .progress_chars("=> "),
                );
            }
        }
        bar.set_position(progress.position);
        let unit = if progress.length.is_none() {
            format!("{} {} ", progress.position, progress.unit)
        } else {
            String::new()
        };
        bar.set_message(format!("{unit}{}", progress.message));
    }
}

impl EventSink for RunReporter {
    fn event(&self, event: ExecEvent) {
        let style = self.style;
        match event {
            ExecEvent::WaitingForLock { cache } => self.line(format!(
                "{} for the cache lock on {} (peftpipe gc holds it)",
                style.verb("Waiting", CYAN),
                cache.display()
            )),
            ExecEvent::WaitingForPipeline { pipeline, cache } => self.line(format!(
                "{} for the cache lock of pipeline `{pipeline}` on {} (another run of it holds it)",
                style.verb("Waiting", CYAN),
                cache.display()
            )),
            ExecEvent::Planned { .. } => {}
            ExecEvent::StageStarted {
                stage,
                kind,
                reasons,
            } => {
                let why = reasons
                    .iter()
                    .map(ToString::to_string)
                    .collect::<Vec<_>>()
                    .join(", ");
                self.line(format!(
                    "{} {stage} ({kind}): {why}",
                    style.verb("Running", GREEN)
                ));
                self.start_bar(&stage);
            }
            ExecEvent::StageProgress { stage, progress } => self.progress(&stage, &progress),
            ExecEvent::StageNote { stage, message } => {
                self.line(format!("{} {stage}: {message}", style.verb("Note", CYAN)))
            }
            // Shown even when quiet, as `report::warning` is.
            ExecEvent::StageWarning { stage, message } => self.line_always(format!(
                "{} {stage}: {message}",
                style.verb("Warning", YELLOW)
            )),
            ExecEvent::StageFinished(report) => {
                self.finish_bar(&report.name);
                // A failure is an error: said even when quiet (`--quiet` keeps errors).
                if report.status == StageStatus::Failed {
                    self.line_always(finished_line(&style, &report));
                } else {
                    self.line(finished_line(&style, &report));
                }
            }
            ExecEvent::Interrupting => self.line(format!(
                "{} waiting for running stages to stop (training saves a checkpoint; a second \
                 Ctrl-C or SIGTERM exits at once; nothing unfinished is cached)",
                style.verb("Interrupted", YELLOW)
            )),
        }
    }
}

fn finished_line(style: &Style, report: &StageReport) -> String {
    let name = &report.name;
    let error = report.error.as_deref().unwrap_or("");
    match report.status {
        StageStatus::Fresh => format!(
            "{} {name} (restored from cache)",
            style.verb("Fresh", GREEN)
        ),
        StageStatus::Ran => format!(
            "{} {name} in {}",
            style.verb("Finished", GREEN),
            seconds(report.wall_time)
        ),
        StageStatus::Failed => format!("{} {name}: {error}", style.verb("Failed", RED)),
        StageStatus::Cancelled => format!("{} {name}", style.verb("Cancelled", YELLOW)),
        StageStatus::Skipped => format!("{} {name}: {error}", style.verb("Skipped", YELLOW)),
    }
}

/// `4ms`, `0.58s`, `12.5s`, `3m04s` (see [`super::format::duration`]).
pub fn seconds(duration: Duration) -> String {
    super::format::duration(duration)
}

/// Widest a summary line gets (details past it go behind `-v`).
pub const SUMMARY_WIDTH: usize = 120;

/// Figures shown in the summary by default; the rest only with `-v`.
const HEADLINE: &[&str] = &[
    "rows_kept",
    "train_rows",
    "eval_rows",
    "final_loss",
    "steps",
    "early_stopped_at",
    "best_eval_loss",
    "tokens_per_second",
    "peak_memory_bytes",
    "accuracy",
    "exact_match",
    "loss",
    "perplexity",
    "merged_bytes",
];

/// Figures never shown in the summary: the time column already says it.
const NEVER: &[&str] = &["wall_seconds", "comparison"];

/// `key=value` for each figure of a stage's outcome, in human numbers (strings without quotes):
/// headline figures only, or all of them when `all`.
pub fn outcome_items(outcome: &BTreeMap<String, serde_json::Value>, all: bool) -> Vec<String> {
    let mut keys: Vec<&String> = outcome
        .keys()
        .filter(|key| !NEVER.contains(&key.as_str()))
        .filter(|key| all || HEADLINE.contains(&key.as_str()))
        .collect();
    // Headline figures first, in the order above; the rest alphabetically.
    keys.sort_by_key(|key| {
        (
            HEADLINE
                .iter()
                .position(|name| name == key)
                .unwrap_or(usize::MAX),
            key.to_string(),
        )
    });
    keys.into_iter()
        .map(|key| {
            let label = match key.as_str() {
                "tokens_per_second" => "tokens/s",
                "peak_memory_bytes" => "peak_memory",
                other => other,
            };
            format!("{label}={}", super::format::figure(key, &outcome[key]))
        })
        .collect()
}

/// `key=value, key=value` from a stage's outcome: every figure, human numbers.
pub fn outcome_text(outcome: &BTreeMap<String, serde_json::Value>) -> String {
    outcome_items(outcome, true).join(", ")
}

/// What the summary shows.
#[derive(Debug, Clone, Copy, Default)]
pub struct SummaryOptions {
    /// `-v`: every figure, wrapped onto more lines, instead of the headline figures on one.
    pub verbose: bool,
}

/// The summary table and the final line, each line at most [`SUMMARY_WIDTH`] columns.
/// `report` names the HTML report when one was written.
pub fn summary_text(
    style: &Style,
    summary: &RunSummary,
    options: SummaryOptions,
    report: Option<&std::path::Path>,
) -> String {
    let mut rows: Vec<[String; 5]> = vec![[
        "stage".into(),
        "kind".into(),
        "result".into(),
        "time".into(),
        "summary".into(),
    ]];
    let mut details: Vec<Vec<String>> = vec![Vec::new()];
    for stage in &summary.stages {
        let result = match (stage.status, stage.cache) {
            (StageStatus::Fresh, _) => "fresh",
            (StageStatus::Ran, crate::exec::CacheUse::Hit) => "restored",
            (StageStatus::Ran, _) => "ran",
            (StageStatus::Failed, _) => "failed",
            (StageStatus::Cancelled, _) => "cancelled",
            (StageStatus::Skipped, _) => "skipped",
        };
        let time = match stage.status {
            StageStatus::Fresh | StageStatus::Skipped => "-".to_string(),
            _ => seconds(stage.wall_time),
        };
        rows.push([
            stage.name.clone(),
            stage.kind.clone(),
            result.into(),
            time,
            String::new(),
        ]);
        details.push(outcome_items(&stage.outcome, options.verbose));
    }
    let mut widths = [0usize; 4];
    for row in &rows {
        for (width, cell) in widths.iter_mut().zip(row.iter()) {
            *width = (*width).max(cell.chars().count());
        }
    }
    let indent: usize = widths.iter().map(|width| width + 2).sum();
    let room = SUMMARY_WIDTH.saturating_sub(indent).max(20);
    let mut text = String::new();
    for (row_index, (row, items)) in rows.iter().zip(&details).enumerate() {
        let mut line = String::new();
        for (index, cell) in row.iter().take(4).enumerate() {
            line.push_str(&format!("{cell:<width$}  ", width = widths[index]));
        }
        let mut cells: Vec<String> = Vec::new();
        if row_index == 0 {
            cells.push(row[4].clone());
        } else if options.verbose {
            // Every figure, wrapped under the summary column.
            let mut current = String::new();
            for item in items {
                let added = if current.is_empty() {
                    item.clone()
                } else {
                    format!("{current}, {item}")
                };
                if added.chars().count() > room && !current.is_empty() {
                    cells.push(format!("{current},"));
                    current = item.clone();
                } else {
                    current = added;
                }
            }
            cells.push(current);
        } else {
            cells.push(super::format::fit(&items.join(", "), room));
        }
        for (index, cell) in cells.iter().enumerate() {
            let prefix = if index == 0 {
                line.clone()
            } else {
                " ".repeat(indent)
            };
            text.push_str(super::format::fit(&format!("{prefix}{cell}"), SUMMARY_WIDTH).trim_end());
            text.push('\n');
        }
    }
    for stage in &summary.stages {
        if let Some(table) = comparison_text(stage, &summary.stages) {
            text.push_str(&table);
        }
    }
    let count = |status: StageStatus| {
        summary
            .stages
            .iter()
            .filter(|stage| stage.status == status)
            .count()
    };
    let (ran, fresh, failed) = (
        count(StageStatus::Ran),
        count(StageStatus::Fresh),
        count(StageStatus::Failed),
    );
    let closing = if summary.interrupted {
        format!(
            "{} pipeline {} after {}: {ran} ran, {fresh} fresh",
            style.verb("Interrupted", YELLOW),
            summary.pipeline,
            seconds(summary.wall_time)
        )
    } else if failed > 0 {
        format!(
            "{} pipeline {}: {failed} failed, {ran} ran, {fresh} fresh in {}",
            style.verb("Failed", RED),
            summary.pipeline,
            seconds(summary.wall_time)
        )
    } else {
        format!(
            "{} pipeline {}: {ran} ran, {fresh} fresh in {}",
            style.verb("Done", GREEN),
            summary.pipeline,
            seconds(summary.wall_time)
        )
    };
    text.push_str(&closing);
    if let Some(report) = report {
        text.push('\n');
        text.push_str(&format!(
            "{} {}",
            style.verb("Report", CYAN),
            report.display()
        ));
    }
    text
}

/// An evaluate stage's comparison table (its outcome's `comparison`), with each trained
/// candidate's train time, tokens/s and peak memory joined from its train stage's report in
/// `stages` (this run's figures, or those recorded by the run that produced a fresh or restored
/// adapter, which a note says); `None` when the stage compared nothing.
pub fn comparison_text(stage: &StageReport, stages: &[StageReport]) -> Option<String> {
    let value = stage.outcome.get("comparison")?;
    let mut comparison: Comparison = serde_json::from_value(value.clone()).ok()?;
    let joined = comparison.join_training(|name| {
        stages
            .iter()
            .find(|report| report.name == name)
            .map(|report| &report.outcome)
    });
    let earlier: Vec<&str> = joined
        .iter()
        .filter_map(|name| stages.iter().find(|report| &report.name == name))
        .filter(|report| {
            report.status == StageStatus::Fresh || report.cache == crate::exec::CacheUse::Hit
        })
        .map(|report| report.name.as_str())
        .collect();
    let mut notes = Vec::new();
    if !earlier.is_empty() {
        let which = if earlier.len() <= 3 {
            earlier.join(", ")
        } else {
            format!("{} train stages", earlier.len())
        };
        notes.push(format!(
            "train figures of {which}: from the earlier run that produced the adapter"
        ));
    }
    if let Some(note) = peak_memory_note(joined.iter().filter_map(|name| {
        let report = stages.iter().find(|report| &report.name == name)?;
        Some((report.name.as_str(), &report.outcome))
    })) {
        notes.push(note);
    }
    Some(comparison_table_text(&stage.name, &comparison, &notes))
}

/// What "peak memory" measured, from the outcomes of the train stages whose figures a table
/// shows (`peak_memory_source`, `peak_memory_shared`).
pub fn peak_memory_note<'a>(
    outcomes: impl Iterator<Item = (&'a str, &'a BTreeMap<String, serde_json::Value>)>,
) -> Option<String> {
    let mut described = Vec::new();
    let mut shared = Vec::new();
    for (name, outcome) in outcomes {
        let Some(source) = outcome
            .get("peak_memory_source")
            .and_then(serde_json::Value::as_str)
        else {
            continue;
        };
        described.push(match source {
            "cuda_pool" => "CUDA memory pool high-water mark",
            "process_rss" => "CPU process peak RSS while training",
            _ => "as recorded",
        });
        if outcome.get("peak_memory_shared") == Some(&serde_json::Value::Bool(true)) {
            shared.push(name);
        }
    }
    described.sort_unstable();
    described.dedup();
    if described.is_empty() {
        return None;
    }
    let mut note = format!("peak memory: {}", described.join("; "));
    if !shared.is_empty() {
        note.push_str(&format!(
            "; {} trained beside other CPU stages (a shared peak)",
            shared.join(", ")
        ));
    }
    Some(note)
}

/// A comparison table for the terminal: a title line, the columns aligned (numbers
/// right-aligned), then `notes`, one per line.
pub fn comparison_table_text(stage: &str, comparison: &Comparison, notes: &[String]) -> String {
    let lines = crate::stages::comparison::table(comparison);
    let columns = lines.first().map_or(0, Vec::len);
    let mut widths = vec![0usize; columns];
    for line in &lines {
        for (width, cell) in widths.iter_mut().zip(line) {
            *width = (*width).max(cell.chars().count());
        }
    }
    let mut text = format!(
        "\n{stage}: {} candidates on split `{}` ({} rows)\n",
        comparison.candidates.len(),
        comparison.split,
        comparison.rows
    );
    for line in &lines {
        let mut row = String::new();
        for (index, cell) in line.iter().enumerate() {
            let width = widths[index];
            // `{:>width$}` pads by chars, and "—" is one.
            if index < 2 {
                row.push_str(&format!("{cell:<width$}  "));
            } else {
                row.push_str(&format!("{cell:>width$}  "));
            }
        }
        text.push_str(row.trim_end());
        text.push('\n');
    }
    for note in notes {
        text.push_str(note);
        text.push('\n');
    }
    text.push('\n');
    text
}

/// The summary table and the final line, on stderr.
pub fn print_summary(
    style: &Style,
    summary: &RunSummary,
    options: SummaryOptions,
    report: Option<&std::path::Path>,
) {
    super::write_stderr(&summary_text(style, summary, options, report));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seconds_are_short() {
        assert_eq!(seconds(Duration::from_millis(120)), "0.12s");
        assert_eq!(seconds(Duration::from_millis(12_340)), "12.3s");
        assert_eq!(seconds(Duration::from_secs(125)), "2m05s");
    }

    fn quickstart_summary() -> RunSummary {
        use crate::exec::{CacheUse, StageReport};
        let stage =
            |name: &str, kind: &str, seconds: f64, outcome: serde_json::Value| StageReport {
                name: name.into(),
                kind: kind.into(),
                status: StageStatus::Ran,
                cache: CacheUse::Miss,
                reasons: Vec::new(),
                wall_time: Duration::from_secs_f64(seconds),
                outcome: serde_json::from_value(outcome).unwrap(),
                output: None,
                output_dir: None,
                error: None,
            };
        RunSummary {
            pipeline: "quickstart".into(),
            interrupted: false,
            wall_time: Duration::from_secs_f64(8.38),
            stages: vec![
                stage(
                    "data",
                    "ingest",
                    0.004,
                    serde_json::json!({"duplicates": 40, "eval_rows": 230,
                    "rows_kept": 1150, "rows_read": 1202, "train_rows": 920}),
                ),
                stage(
                    "train",
                    "train",
                    7.76,
                    serde_json::json!({"final_loss": 0.006208181381225586,
                    "steps": 464, "tokens": 111800, "tokens_per_second": 14488.319760111659,
                    "trainable_parameters": 18496, "wall_seconds": 7.716560778}),
                ),
                stage(
                    "evaluate",
                    "evaluate",
                    0.58,
                    serde_json::json!({
                    "accuracy": {"base": 0.5, "adapted": 0.9826086956521739},
                    "loss": {"base": 70.59368998486063, "adapted": 0.04652185854704484},
                    "perplexity": {"base": 4.5545976487822755e30, "adapted": 1.0476209782907002},
                    "rows": 230}),
                ),
                stage(
                    "export",
                    "export",
                    0.07,
                    serde_json::json!({
                    "adapter_destination": "out/quickstart/adapter", "adapter_parameters": 18496,
                    "merged_bytes": 411152, "merged_destination": "out/quickstart/merged",
                    "merged_files": 1, "merged_tensors": 14}),
                ),
            ],
        }
    }

    #[test]
    fn summary_has_human_numbers_and_fits_120_columns() {
        let summary = quickstart_summary();
        let text = summary_text(
            &Style::plain(),
            &summary,
            SummaryOptions::default(),
            Some(std::path::Path::new("report.html")),
        );
        insta::assert_snapshot!("run_summary", text);
        for line in text.lines() {
            assert!(line.chars().count() <= SUMMARY_WIDTH, "too wide: {line}");
        }
        assert!(text.contains("perplexity=4.6e30 → 1.048"), "{text}");
        assert!(!text.contains("wall_seconds"), "{text}");
    }

    #[test]
    fn verbose_summary_shows_every_figure_within_120_columns() {
        let summary = quickstart_summary();
        let text = summary_text(
            &Style::plain(),
            &summary,
            SummaryOptions { verbose: true },
            None,
        );
        insta::assert_snapshot!("run_summary_verbose", text);
        for line in text.lines() {
            assert!(line.chars().count() <= SUMMARY_WIDTH, "too wide: {line}");
        }
        for figure in [
            "merged_tensors=14",
            "rows_read=1202",
            "trainable_parameters=18,496",
        ] {
            assert!(text.contains(figure), "{figure} missing: {text}");
        }
        assert!(!text.contains("wall_seconds"), "{text}");
    }

    #[test]
    fn outcome_text_lists_figures() {
        let outcome = BTreeMap::from([
            ("rows".to_string(), serde_json::json!(10)),
            ("split".to_string(), serde_json::json!("train")),
        ]);
        assert_eq!(outcome_text(&outcome), "rows=10, split=train");
        let outcome = BTreeMap::from([("merged_bytes".to_string(), serde_json::json!(411_152))]);
        assert_eq!(outcome_text(&outcome), "merged_bytes=402 KiB");
    }

    #[test]
    fn a_new_phase_restarts_the_bar_at_its_own_count() {
        let reporter = RunReporter {
            style: Style::plain(),
            quiet: false,
            multi: Some(MultiProgress::with_draw_target(ProgressDrawTarget::hidden())),
            bars: Mutex::new(BTreeMap::new()),
        };
        reporter.event(ExecEvent::StageStarted {
            stage: "evaluate".into(),
            kind: "evaluate".into(),
            reasons: Vec::new(),
        });
        let step = |position: u64, length: u64, message: &str| {
            reporter.event(ExecEvent::StageProgress {
                stage: "evaluate".into(),
                progress: crate::stages::Progress {
                    position,
                    length: Some(length),
                    unit: "examples",
                    message: message.into(),
                },
            })
        };
        let state = || {
            let bars = reporter.bars.lock().unwrap();
            let bar = &bars["evaluate"];
            (bar.position(), bar.length())
        };
        step(460, 460, "base · accuracy");
        assert_eq!(state(), (460, Some(460)));
        step(1, 3, "base · samples");
        assert_eq!(
            state(),
            (1, Some(3)),
            "the samples phase counts its own rows"
        );
        step(3, 3, "base · samples");
        // Same length, position back to the start: the adapted model's pass of a phase.
        step(1, 3, "adapted · samples");
        assert_eq!(state(), (1, Some(3)));
    }

    #[test]
    fn plain_style_has_no_escape_codes() {
        assert_eq!(Style::plain().verb("Fresh", GREEN), "       Fresh");
    }
}
