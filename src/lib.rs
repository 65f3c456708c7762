//! peftpipe: one YAML file to a reproducible, cached parameter-efficient fine-tuning run.
//!
//! The passes (see ARCHITECTURE.md): parse → validate → plan → execute → report.
//! Dependencies point one way: cli → exec → stages → (data, models, peft, train) → ops.
//! `config`, `dag`, `cache`, `fingerprint`, `exec` and `schema` live in the `peftpipe-core`
//! workspace crate (crates/core), which cannot name candle or arrow; they are re-exported here
//! under their usual paths. This crate plugs the ML and Arrow side into them: [`probe`] answers
//! validation's questions, [`stages`] supplies the stage kinds the executor runs.

pub use peftpipe_core::{cache, config, dag, exec, files, fingerprint, schema};

pub mod cli;
pub mod device;
pub mod infer;
pub mod probe;
pub mod report;
pub mod stages;

pub mod data;
pub mod models;
pub mod ops;
pub mod peft;
pub mod quant;
pub mod train;

/// The tool version that goes into every stage fingerprint.
pub use peftpipe_core::{TOOL_BUILD, TOOL_VERSION};
