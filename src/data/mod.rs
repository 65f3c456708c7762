//! Data handling below the stages: reading Parquet / JSONL / CSV, filters and keys, exact
//! streaming splits, bounded-memory dedup and shuffle, statistics, incremental Parquet writing,
//! minijinja rendering (row templates, few-shot demonstrations, chat templates), and synthetic
//! datasets. Tokenization and batching for training live here too (their own files).
//!
//! Knows Arrow and minijinja, not pipelines or the cache: stages call in with resolved settings.
//! Never prints.

pub mod artifact;
pub mod batch;
pub mod bench;
pub mod chat;
pub mod few_shot;
pub mod filter;
pub mod jsonl_schema;
pub mod preview;
pub mod render;
pub mod source;
pub mod spill;
pub mod split;
pub mod stats;
pub mod synthetic;
pub mod tokenize;
