//! The ingest readers on arbitrary bytes: the first byte picks the format (Parquet, CSV, JSONL),
//! the rest is the file. Peeks the schema (what `validate` does), then scans every row (what
//! `run` does).
#![no_main]

use libfuzzer_sys::fuzz_target;
use peftpipe::config::InputFile;
use peftpipe::data::source::{peek_schema, scan, SourceSpec};

fuzz_target!(|data: &[u8]| {
    let Some((&selector, content)) = data.split_first() else {
        return;
    };
    let extension = match selector % 3 {
        0 => "parquet",
        1 => "csv",
        _ => "jsonl",
    };
    let Ok(dir) = tempfile::tempdir() else {
        return;
    };
    let key = format!("input.{extension}");
    let path = dir.path().join(&key);
    if std::fs::write(&path, content).is_err() {
        return;
    }
    let _ = peek_schema(&path, None);
    let spec = SourceSpec {
        files: vec![InputFile { key, path }],
        format: None,
        columns: Vec::new(),
        rename: indexmap::IndexMap::new(),
        types: indexmap::IndexMap::new(),
        limit: Some(100_000),
    };
    let _ = scan(&spec, |_, _| Ok(()));
});
