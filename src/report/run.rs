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

/// Terminal styling decisions for stderr.
#[derive(Debug, Clone, Copy)]
pub struct Style {
    /// ANSI colors (terminal, `NO_COLOR` unset).
    pub color: bool,
    /// Live progress bars (terminal).
    pub bars: bool,
}

impl Style {
    /// Decide from the environment: stderr a terminal? `NO_COLOR` set?
    pub fn detect() -> Style {
        let terminal = std::io::stderr().is_terminal();
        let no_color = std::env::var_os("NO_COLOR").is_some_and(|value| !value.is_empty());
        Style {
            color: terminal && !no_color,
            bars: terminal,
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
            if bar.length() != Some(length) {
                bar.set_length(length);
                bar.set_style(
                    ProgressStyle::with_template(
                        "{prefix:.bold} [{bar:30}] {pos}/{len} {msg} ({elapsed}, eta {eta})",
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
            ExecEvent::StageFinished(report) => {
                self.finish_bar(&report.name);
                self.line(finished_line(&style, &report));
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

/// `0.12s`, `3.4s`, `2m05s`.
pub fn seconds(duration: Duration) -> String {
    let total = duration.as_secs_f64();
    if total < 10.0 {
        format!("{total:.2}s")
    } else if total < 60.0 {
        format!("{total:.1}s")
    } else {
        let whole = duration.as_secs();
        format!("{}m{:02}s", whole / 60, whole % 60)
    }
}

/// `key=value, key=value` from a stage's outcome (strings without quotes).
pub fn outcome_text(outcome: &BTreeMap<String, serde_json::Value>) -> String {
    outcome
        .iter()
        .map(|(key, value)| match value {
            serde_json::Value::String(text) => format!("{key}={text}"),
            other => format!("{key}={other}"),
        })
        .collect::<Vec<_>>()
        .join(", ")
}

/// The summary table and the final line, on stderr.
pub fn print_summary(style: &Style, summary: &RunSummary) {
    let mut rows: Vec<[String; 6]> = vec![[
        "stage".into(),
        "kind".into(),
        "result".into(),
        "cache".into(),
        "time".into(),
        "summary".into(),
    ]];
    for stage in &summary.stages {
        let result = match stage.status {
            StageStatus::Fresh => "fresh",
            StageStatus::Ran => "ran",
            StageStatus::Failed => "failed",
            StageStatus::Cancelled => "cancelled",
            StageStatus::Skipped => "skipped",
        };
        let cache = match stage.cache {
            crate::exec::CacheUse::Hit => "hit",
            crate::exec::CacheUse::Miss => "miss",
            crate::exec::CacheUse::None => "-",
        };
        rows.push([
            stage.name.clone(),
            stage.kind.clone(),
            result.into(),
            cache.into(),
            seconds(stage.wall_time),
            outcome_text(&stage.outcome),
        ]);
    }
    let mut widths = [0usize; 5];
    for row in &rows {
        for (width, cell) in widths.iter_mut().zip(row.iter()) {
            *width = (*width).max(cell.chars().count());
        }
    }
    let mut text = String::new();
    for row in &rows {
        let mut line = String::new();
        for (index, cell) in row.iter().enumerate() {
            if index < 5 {
                line.push_str(&format!("{cell:<width$}  ", width = widths[index]));
            } else {
                line.push_str(cell);
            }
        }
        text.push_str(line.trim_end());
        text.push('\n');
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
    super::write_stderr(&text);
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

    #[test]
    fn outcome_text_lists_figures() {
        let outcome = BTreeMap::from([
            ("rows".to_string(), serde_json::json!(10)),
            ("split".to_string(), serde_json::json!("train")),
        ]);
        assert_eq!(outcome_text(&outcome), "rows=10, split=train");
    }

    #[test]
    fn plain_style_has_no_escape_codes() {
        assert_eq!(Style::plain().verb("Fresh", GREEN), "       Fresh");
    }
}
