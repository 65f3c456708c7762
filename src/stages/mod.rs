//! Stage kinds: one file per kind, each implementing [`Stage`]. A stage reads its upstream
//! artifacts and writes its own artifact only through a [`StageContext`]; it never prints
//! (progress goes through [`ProgressSink`] to the executor's event stream) and never touches the
//! cache (the executor stores `out_dir` once `run` returns Ok).
//!
//! The trait and its context live in the core crate (`exec::stage`, re-exported here) so the
//! executor needs no stage kind; [`default_builder`] is what the binary hands the executor.

use crate::config::StageConfig;

pub use crate::exec::stage::{
    derive_seed, NullSink, Progress, ProgressSink, RunOptions, Stage, StageContext, StageError,
    StageOutcome,
};

/// The stage implementation for a config.
pub fn build(config: &StageConfig) -> Box<dyn Stage> {
    match config {
        StageConfig::Ingest(c) => Box::new(ingest::IngestStage::new(c.clone())),
        StageConfig::Template(c) => Box::new(template::TemplateStage::new(c.clone())),
        StageConfig::Train(c) => Box::new(train::TrainStage::new(c.as_ref().clone())),
        StageConfig::Evaluate(c) => Box::new(evaluate::EvaluateStage::new(c.clone())),
        StageConfig::Export(c) => Box::new(export::ExportStage::new(c.clone())),
    }
}

/// The builder `exec::execute` uses in the binary: [`build`] for every stage.
pub fn default_builder(_name: &str, config: &StageConfig) -> Result<Box<dyn Stage>, StageError> {
    Ok(build(config))
}

pub mod comparison;
pub mod evaluate;
pub mod export;
pub mod ingest;
pub mod template;
pub mod train;
