//! Regenerates `datasets/quickstart/`: the review dataset (`reviews.parquet`) and the word-level
//! tokenizer files of the quickstart model (`model/tokenizer.json`, `model/tokenizer_config.json`).
//! Deterministic: rerunning it reproduces the committed files byte for byte.
//!
//! ```text
//! cargo run --example make_quickstart_data [-- OUTPUT_DIR]   # default datasets/quickstart
//! ```
#![expect(
    clippy::print_stderr,
    reason = "a developer tool reporting what it wrote"
)]

use std::path::PathBuf;
use std::process::ExitCode;

use peftpipe::data::synthetic;

fn main() -> ExitCode {
    let out = std::env::args_os()
        .nth(1)
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("datasets/quickstart"));
    match write(&out) {
        Ok(()) => ExitCode::SUCCESS,
        Err(message) => {
            eprintln!("error: {message}");
            ExitCode::FAILURE
        }
    }
}

fn write(out: &std::path::Path) -> Result<(), String> {
    let model = out.join("model");
    std::fs::create_dir_all(&model).map_err(|e| format!("{}: {e}", model.display()))?;
    let rows = synthetic::quickstart_rows();
    let data = out.join("reviews.parquet");
    synthetic::write_reviews(&data, &rows).map_err(|e| e.to_string())?;
    eprintln!("wrote {} ({} rows)", data.display(), rows.len());
    for (name, value) in [
        ("tokenizer.json", synthetic::quickstart_tokenizer_json()),
        (
            "tokenizer_config.json",
            synthetic::quickstart_tokenizer_config(),
        ),
    ] {
        let path = model.join(name);
        let mut text = serde_json::to_string_pretty(&value).map_err(|e| e.to_string())?;
        text.push('\n');
        std::fs::write(&path, text).map_err(|e| format!("{}: {e}", path.display()))?;
        eprintln!("wrote {}", path.display());
    }
    eprintln!(
        "vocabulary: {} tokens (4 special + {} words and punctuation)",
        synthetic::quickstart_vocabulary().len() + synthetic::SPECIAL_TOKENS.len(),
        synthetic::quickstart_vocabulary().len()
    );
    Ok(())
}
