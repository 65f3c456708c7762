//! peftpipe's core: everything a run does before and around the machine learning, with no
//! dependency on candle, arrow, parquet or tokenizers (the compiler enforces it: this crate
//! cannot name them).
//!
//! - [`config`]: the YAML surface, parsed with spans and validated into a `Pipeline`;
//! - [`schema`]: the JSON Schema generated from the config types;
//! - [`dag`]: the stage graph (references, cycles, order, selection);
//! - [`cache`]: the content-addressed object store, lock files and gc;
//! - [`fingerprint`]: what is hashed for each stage and why a stage is dirty;
//! - [`exec`]: the plan and the runner, and the `Stage` trait stage kinds implement.
//!
//! What needs the ML or Arrow side comes in through two small interfaces the main `peftpipe`
//! crate implements: [`config::probe::Probe`] (Parquet footers, chat templates, model configs,
//! asked during semantic validation) and [`exec::stage::Stage`] built by an
//! [`exec::StageBuilder`] (the stage kinds themselves). The main crate re-exports these modules
//! under the same paths (`peftpipe::config`, `peftpipe::exec`, …).

pub mod cache;
pub mod config;
pub mod dag;
pub mod exec;
pub mod fingerprint;
pub mod schema;

/// The tool version that goes into every stage fingerprint (the workspace's one version).
pub const TOOL_VERSION: &str = env!("CARGO_PKG_VERSION");
