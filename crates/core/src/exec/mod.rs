//! The executor: turns a validated [`Pipeline`] and the cache into a [`plan::Plan`] (each stage
//! Fresh or Dirty with its reasons), then walks the stage graph in topological order restoring
//! fresh stages from the cache and running dirty ones, storing their outputs, and materializing
//! every stage's output under `.peftpipe/out/<pipeline>/<stage>/`.
//!
//! It never prints: everything a user should see is an [`ExecEvent`] sent to an [`EventSink`]
//! (the reporter implements one). It never sees clap types: the CLI resolves [`RunSettings`].
//! It only knows stages through `StageConfig`, `StageSpec` and a [`StageBuilder`] that makes a
//! [`stage::Stage`] (the main crate's `stages::default_builder` in the binary, fakes in tests), so
//! new stage kinds need no change here.

pub mod graph;
pub mod materialize;
pub mod name_owner;
pub mod plan;
pub mod runner;
pub mod slots;
pub mod stage;

use std::path::PathBuf;
use std::time::Duration;

use serde::Serialize;

use crate::cache::CacheError;
use crate::config::{Pipeline, StageConfig};
use crate::fingerprint::DirtyReason;
use stage::{Progress, RunOptions, Stage, StageError};

pub use plan::{Freshness, Plan, StagePlan};
pub use runner::execute;

/// Builds the implementation of a stage from its name and config. The lifetime lets test
/// builders hand out stages that borrow test state.
pub type StageBuilder<'a> =
    dyn Fn(&str, &StageConfig) -> Result<Box<dyn Stage + 'a>, StageError> + Sync + 'a;

/// Test-only: `PEFTPIPE_TEST_STAGE_DELAY=<stage>=<milliseconds>` makes the executor wait that
/// long after the named stage wrote its output and before storing it, so fault tests can kill
/// or interrupt the binary mid-stage. Not for users.
pub const STAGE_DELAY_ENV: &str = "PEFTPIPE_TEST_STAGE_DELAY";

/// Settings of one run, resolved by the CLI.
#[derive(Debug, Clone)]
pub struct RunSettings {
    /// Cache root.
    pub cache_dir: PathBuf,
    /// Where stage outputs are materialized: `<out_root>/<stage>/`.
    pub out_root: PathBuf,
    /// `--stage`: run these and what they need (empty: every stage).
    pub targets: Vec<String>,
    /// `--force`: rerun the targets (every stage without `--stage`) even when fresh.
    pub force: bool,
    /// At most this many stages run at once (≥ 1).
    pub jobs: usize,
    pub options: RunOptions,
    /// Record the run: the lock file, the published copies (`out_root`, export folders) and
    /// failure records. `false` (`preview` of a pipeline with `--set`): outputs and run records
    /// go to the cache only, so what `status` checks stays the last real run's.
    pub record: bool,
}

impl RunSettings {
    /// Defaults for a pipeline: cache and outputs under `.peftpipe/` next to the pipeline file.
    pub fn for_pipeline(pipeline: &Pipeline) -> RunSettings {
        RunSettings {
            cache_dir: crate::cache::default_cache_dir(&pipeline.project_dir),
            out_root: default_out_root(pipeline),
            targets: Vec::new(),
            force: false,
            jobs: default_jobs(),
            options: RunOptions::default(),
            record: true,
        }
    }
}

/// `.peftpipe/out/<pipeline-name>` next to the pipeline file.
pub fn default_out_root(pipeline: &Pipeline) -> PathBuf {
    pipeline
        .project_dir
        .join(".peftpipe")
        .join("out")
        .join(crate::cache::sanitize_name(&pipeline.name))
}

/// Default parallelism: available cores, at most 4 (stages are heavy; training uses its own
/// threads).
pub fn default_jobs() -> usize {
    std::thread::available_parallelism()
        .map(|n| n.get().min(4))
        .unwrap_or(1)
}

/// Why a run could not start (no stage ran). Stage failures are not errors: they are in the
/// [`RunSummary`].
#[derive(Debug, thiserror::Error)]
pub enum ExecError {
    #[error(transparent)]
    Cache(#[from] CacheError),
    /// `--stage` named a stage that does not exist.
    #[error("no stage named `{name}`{}", hint.as_ref().map(|h| format!(" (did you mean `{h}`?)")).unwrap_or_default())]
    UnknownStage { name: String, hint: Option<String> },
    /// An input file could not be listed or read.
    #[error("stage `{stage}`: {message}")]
    Input { stage: String, message: String },
    /// The stage graph has a cycle or an unknown reference (validation should have caught it).
    #[error("{0}")]
    Graph(String),
    /// Another pipeline file of the project last ran under this pipeline's name and still
    /// declares it (see [`name_owner`]).
    #[error(
        "pipeline name `{name}` belongs to {owner}, the file of this project that last ran under \
         it: {file} would share its lock file and `.peftpipe/out/{name}/`"
    )]
    NameTaken {
        name: String,
        /// The owning file, shown as the pipeline file was given (same directory).
        owner: String,
        /// The pipeline file as given.
        file: String,
    },
}

/// How a stage ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum StageStatus {
    /// Restored from the cache, not run.
    Fresh,
    /// Run and stored.
    Ran,
    Failed,
    /// Interrupted by Ctrl-C.
    Cancelled,
    /// Not started (an upstream stage failed or the run was interrupted).
    Skipped,
}

/// Whether the cache supplied the output.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum CacheUse {
    Hit,
    Miss,
    /// Not applicable (the stage failed or never started).
    None,
}

/// The outcome of one stage in a run.
#[derive(Debug, Clone, Serialize)]
pub struct StageReport {
    pub name: String,
    pub kind: String,
    pub status: StageStatus,
    pub cache: CacheUse,
    /// Why it ran (empty when fresh).
    pub reasons: Vec<DirtyReason>,
    #[serde(serialize_with = "serialize_seconds", rename = "wall_time_seconds")]
    pub wall_time: Duration,
    /// The stage's figures (from this run, or recorded when restored).
    pub outcome: std::collections::BTreeMap<String, serde_json::Value>,
    /// Output digest, when the stage has an output.
    pub output: Option<String>,
    /// Where the output is materialized.
    pub output_dir: Option<PathBuf>,
    /// The error, when it failed or was skipped.
    pub error: Option<String>,
}

/// An error message without the backtrace candle appends when `RUST_BACKTRACE` is set (its
/// frames, `   0: candle_core::error::Error::bt` and on): a stage's error, its failure record and
/// the terminal show what went wrong, not where in peftpipe's code.
pub fn without_backtrace(message: &str) -> String {
    let mut kept = Vec::new();
    for line in message.lines() {
        let trimmed = line.trim_start();
        if trimmed.starts_with("0: ") && trimmed.contains("::") {
            break;
        }
        kept.push(line);
    }
    kept.join("\n").trim_end().to_string()
}

fn serialize_seconds<S: serde::Serializer>(
    duration: &Duration,
    serializer: S,
) -> Result<S::Ok, S::Error> {
    serializer.serialize_f64((duration.as_secs_f64() * 1000.0).round() / 1000.0)
}

/// The whole run, in topological order of the selected stages.
#[derive(Debug, Clone, Serialize)]
pub struct RunSummary {
    pub pipeline: String,
    pub stages: Vec<StageReport>,
    pub interrupted: bool,
    #[serde(serialize_with = "serialize_seconds", rename = "wall_time_seconds")]
    pub wall_time: Duration,
}

impl RunSummary {
    pub fn failed(&self) -> bool {
        self.stages
            .iter()
            .any(|stage| stage.status == StageStatus::Failed)
    }
}

/// What the executor tells the reporter, in order per stage.
#[derive(Debug, Clone)]
pub enum ExecEvent {
    /// Another process holds the cache lock exclusively (gc); this run waits for it.
    WaitingForLock {
        cache: PathBuf,
    },
    /// Another run of the same pipeline holds its lock on this cache; this run waits for it.
    WaitingForPipeline {
        pipeline: String,
        cache: PathBuf,
    },
    /// The stages this run will consider, in topological order, with the plan's view.
    Planned {
        stages: Vec<(String, String)>,
    },
    /// A dirty stage starts running.
    StageStarted {
        stage: String,
        kind: String,
        reasons: Vec<DirtyReason>,
    },
    StageProgress {
        stage: String,
        progress: Progress,
    },
    StageNote {
        stage: String,
        message: String,
    },
    /// A note the reporter shows even when quiet ([`ProgressSink::warning`](crate::exec::stage::ProgressSink::warning)).
    StageWarning {
        stage: String,
        message: String,
    },
    /// A stage ended (fresh, ran, failed, cancelled or skipped).
    StageFinished(StageReport),
    /// Ctrl-C was seen: running stages are asked to stop, nothing new starts.
    Interrupting,
}

/// Receives events from the executor (possibly from several threads).
pub trait EventSink: Sync {
    fn event(&self, event: ExecEvent);
}

/// An event sink that collects events (tests).
#[derive(Default)]
pub struct CollectEvents(pub std::sync::Mutex<Vec<ExecEvent>>);

impl EventSink for CollectEvents {
    fn event(&self, event: ExecEvent) {
        if let Ok(mut events) = self.0.lock() {
            events.push(event);
        }
    }
}

/// An event sink that drops everything.
pub struct IgnoreEvents;

impl EventSink for IgnoreEvents {
    fn event(&self, _event: ExecEvent) {}
}

#[cfg(test)]
mod tests;
