//! peftpipe: one YAML file to a reproducible, cached parameter-efficient fine-tuning run.
//!
//! The passes (see ARCHITECTURE.md): parse → validate → plan → execute → report.
//! Dependencies point one way: cli → exec → stages → (data, models, peft, train) → ops.
//! `config`, `dag`, `cache` and `fingerprint` know nothing of candle or arrow.

pub mod cache;
pub mod cli;
pub mod config;
pub mod dag;
pub mod device;
pub mod exec;
pub mod fingerprint;
pub mod infer;
pub mod report;
pub mod schema;
pub mod stages;

pub mod data;
pub mod models;
pub mod ops;
pub mod peft;
pub mod train;

/// The tool version that goes into every stage fingerprint.
pub const TOOL_VERSION: &str = env!("CARGO_PKG_VERSION");
