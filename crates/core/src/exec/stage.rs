//! The interface between the executor and the stage kinds: the [`Stage`] trait every kind
//! implements, the [`StageContext`] it works through (output directory, upstream artifacts, seed,
//! progress sink, cancel flag, run options, fingerprint digest and checkpoint directory), its
//! [`StageOutcome`] and [`StageError`].
//!
//! The kinds themselves (ingest, template, train, evaluate, export) live in the main crate's
//! `stages/`, which re-exports everything here; the executor builds them through an
//! [`super::StageBuilder`]. A stage never prints (progress goes through [`ProgressSink`] to the
//! executor's event stream) and never touches the cache (the executor stores `out_dir` once
//! `run` returns Ok). Nothing here may depend on a stage kind.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};

/// Progress of a running stage, forwarded by the executor as an event to the reporter.
#[derive(Debug, Clone, PartialEq)]
pub struct Progress {
    /// Units done so far (rows, steps, examples).
    pub position: u64,
    /// Total units, if known.
    pub length: Option<u64>,
    /// What a unit is ("rows", "steps").
    pub unit: &'static str,
    /// Short live message, e.g. `loss 2.31 · 5.1k tok/s`.
    pub message: String,
}

/// Where a stage sends progress and log lines. Implemented by the executor.
pub trait ProgressSink: Sync {
    fn progress(&self, progress: Progress);
    /// A line worth keeping in the run log (shown by the reporter, not by the stage).
    fn note(&self, message: String);
    /// A note the user must see even with `--quiet`: the result is not what they may assume
    /// (a damaged checkpoint skipped, an adapter scored over another base). Default: a note.
    fn warning(&self, message: String) {
        self.note(message);
    }
}

/// A sink that drops everything (tests, `preview`).
pub struct NullSink;

impl ProgressSink for NullSink {
    fn progress(&self, _progress: Progress) {}
    fn note(&self, _message: String) {}
}

/// Run-wide options a stage may need; resolved from the command line by cli/.
#[derive(Debug, Clone, Default)]
pub struct RunOptions {
    /// Let export write outside the project directory.
    pub allow_outside_project: bool,
    /// Override the device of training/evaluation (`cpu`, `cuda`, `cuda:1`).
    pub device: Option<String>,
    /// Train data-parallel on the first N GPUs, one process each (`run --devices N`; overrides a
    /// train stage's `devices`). Not part of any fingerprint.
    pub devices: Option<usize>,
}

/// Everything a stage may read or write.
pub struct StageContext<'a> {
    /// The stage's name in the pipeline.
    pub name: &'a str,
    /// Directory of the pipeline file; relative paths in the config resolve against it.
    pub project_dir: &'a Path,
    /// Empty directory owned by the executor; everything written here becomes the artifact.
    pub out_dir: &'a Path,
    /// Upstream stage name → its artifact directory (read-only).
    pub upstream: &'a BTreeMap<String, PathBuf>,
    /// Upstream stage name → the outcome recorded with the run that produced its artifact (the
    /// figures the run summary shows: a train stage's wall time and tokens/s). Not part of the
    /// artifact nor of this stage's fingerprint: the record of how the (hashed) upstream output
    /// was made. Empty outside the executor.
    pub upstream_outcomes: &'a BTreeMap<String, BTreeMap<String, serde_json::Value>>,
    /// The stage's input files as its fingerprint has them: key (the path as written,
    /// normalized) → blake3 of the content, hashed once by the executor. A stage whose artifact
    /// records what it was made from (a train stage's base model files) takes them from here, so
    /// the artifact changes whenever they do. Empty outside the executor.
    pub inputs: &'a BTreeMap<String, String>,
    /// The pipeline seed (stages derive their own streams from it and their name; both are in
    /// the stage's fingerprint).
    pub seed: u64,
    pub progress: &'a dyn ProgressSink,
    /// Set when the user pressed Ctrl-C: long loops check it and return [`StageError::Cancelled`].
    pub cancel: &'a AtomicBool,
    pub options: &'a RunOptions,
    /// Digest of the stage's full fingerprint (parameters, name, seed, upstream outputs, input
    /// files, tool version, environment): whatever the stage keeps across attempts, such as
    /// training checkpoints, is valid for this digest only. Empty outside the executor.
    pub fingerprint: &'a str,
    /// A directory private to this pipeline, stage and fingerprint where the stage may keep state
    /// across attempts (training checkpoints); created by the stage when needed. A later run with
    /// the same fingerprint finds it after a kill; `gc` removes it once orphaned. The stage holds
    /// its lock while writing (see `cache::gc::lock_checkpoint_dir`). None: keep nothing (tests,
    /// benchmarks, preview).
    pub checkpoint_dir: Option<&'a Path>,
    /// False under `--force`: recompute from scratch and resume nothing from `checkpoint_dir`.
    pub resume: bool,
}

impl StageContext<'_> {
    /// The artifact directory of the upstream stage named `stage`.
    pub fn upstream_dir(&self, stage: &str) -> Result<&Path, StageError> {
        self.upstream
            .get(stage)
            .map(PathBuf::as_path)
            .ok_or_else(|| {
                StageError::Internal(format!("upstream stage `{stage}` has no artifact"))
            })
    }

    /// Err(Cancelled) once the user asked to stop.
    pub fn check_cancel(&self) -> Result<(), StageError> {
        if self.cancel.load(Ordering::Relaxed) {
            Err(StageError::Cancelled)
        } else {
            Ok(())
        }
    }

    /// A seed for this stage derived from the pipeline seed and the stage name (both are
    /// fingerprint components, so a renamed stage is rebuilt, never restored).
    pub fn stage_seed(&self) -> u64 {
        derive_seed(self.seed, self.name)
    }
}

/// Mix a seed with a label (stable across platforms and versions: blake3).
pub fn derive_seed(seed: u64, label: &str) -> u64 {
    let mut hasher = blake3::Hasher::new();
    hasher.update(&seed.to_le_bytes());
    hasher.update(label.as_bytes());
    let bytes = hasher.finalize();
    let mut first = [0u8; 8];
    first.copy_from_slice(&bytes.as_bytes()[..8]);
    u64::from_le_bytes(first)
}

/// What a finished stage reports: small figures for the run summary and `--json`.
#[derive(Debug, Clone, Default, serde::Serialize, serde::Deserialize)]
pub struct StageOutcome {
    pub summary: BTreeMap<String, serde_json::Value>,
}

/// Why a stage failed. Messages are for the user: name the file, column, row group, step.
#[derive(Debug, thiserror::Error)]
pub enum StageError {
    /// Bad user data or environment (exit code 1).
    #[error("{0}")]
    User(String),
    /// Ctrl-C.
    #[error("cancelled")]
    Cancelled,
    /// A bug in peftpipe.
    #[error("internal error: {0}")]
    Internal(String),
}

impl StageError {
    pub fn user(message: impl Into<String>) -> Self {
        StageError::User(message.into())
    }
}

impl From<std::io::Error> for StageError {
    fn from(error: std::io::Error) -> Self {
        StageError::User(error.to_string())
    }
}

/// One stage kind's behaviour.
pub trait Stage: Send + Sync {
    /// Produce the artifact in `ctx.out_dir`.
    fn run(&self, ctx: &StageContext<'_>) -> Result<StageOutcome, StageError>;

    /// Check the configuration against the upstream artifacts in `ctx.upstream` (those that
    /// exist: while an expensive upstream stage such as training has yet to run, only the
    /// others are there), so a setting only the data can refute fails the run before that
    /// stage starts, not after it. The executor calls it when an upstream stage finishes while
    /// others are still to come, and once more before `run` with every upstream artifact.
    /// `ctx.out_dir` is not to be written. An error is a user error whose message begins with
    /// the key path under the stage's name (`evaluate.metrics.accuracy.labels: ...`); the
    /// executor puts the pipeline file and `stages.<name>.` before it. Default: nothing.
    fn check_upstream(&self, _ctx: &StageContext<'_>) -> Result<(), StageError> {
        Ok(())
    }

    /// Called after `run` and also when the stage is restored from the cache: copy the artifact
    /// to a user-declared destination (export). Default: nothing.
    fn publish(&self, _artifact: &Path, _ctx: &StageContext<'_>) -> Result<(), StageError> {
        Ok(())
    }
}
