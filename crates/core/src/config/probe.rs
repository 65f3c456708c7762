//! What semantic validation asks of the world beyond the pipeline file that only the ML and Arrow
//! side of peftpipe can answer: the columns of a tabular input file, whether a chat template
//! compiles the way transformers renders it, and the linear layers a model's `config.json`
//! describes.
//!
//! The core defines the question, the main crate answers it (`peftpipe::probe::StandardProbe`,
//! passed in by the CLI), so config stays free of arrow, parquet and candle while validation
//! checks exactly what the stages will later do. A probe only reads file metadata (footers,
//! headers, config files); it never reads rows or weights.

use std::path::Path;

use super::chat_template::ChatTemplateSource;
use super::ingest::InputFormat;

/// A problem with a model's `config.json`: the key that is wrong (empty for the whole file) and
/// what is wrong with it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ModelConfigProblem {
    pub key: String,
    pub message: String,
}

/// The questions semantic checks ask (see the module docs). Errors are messages for the user that
/// name the file.
pub trait Probe: Sync {
    /// Column names of a tabular file without reading its rows (Parquet footer, CSV header, the
    /// first JSONL records). `format` is the declared format, else the file's extension decides.
    fn input_columns(
        &self,
        path: &Path,
        format: Option<InputFormat>,
    ) -> Result<Vec<String>, String>;

    /// Whether a chat template compiles as the template stage will render it; Err is the syntax
    /// error with its line.
    fn check_chat_template(&self, source: &ChatTemplateSource) -> Result<(), String>;

    /// The module paths (`model.layers.0.self_attn.q_proj`, …) of every linear layer of the
    /// model a `config.json` describes, in model order.
    fn model_linear_layers(
        &self,
        config: &serde_json::Value,
    ) -> Result<Vec<String>, ModelConfigProblem>;
}

/// A probe for unit tests of the core: knows no file, compiles chat templates with plain
/// minijinja, and answers model questions with a small Llama-like layer list.
#[cfg(test)]
pub(crate) struct TestProbe;

#[cfg(test)]
impl Probe for TestProbe {
    fn input_columns(
        &self,
        path: &Path,
        _format: Option<InputFormat>,
    ) -> Result<Vec<String>, String> {
        Err(format!("{}: the test probe reads no file", path.display()))
    }

    fn check_chat_template(&self, source: &ChatTemplateSource) -> Result<(), String> {
        minijinja::Environment::new()
            .template_from_str(&source.template)
            .map(|_| ())
            .map_err(|error| error.to_string())
    }

    fn model_linear_layers(
        &self,
        _config: &serde_json::Value,
    ) -> Result<Vec<String>, ModelConfigProblem> {
        Ok(["q_proj", "k_proj", "v_proj", "o_proj"]
            .iter()
            .map(|name| format!("model.layers.0.self_attn.{name}"))
            .chain(std::iter::once("lm_head".to_string()))
            .collect())
    }
}
