//! The binary's answers to what validation asks beyond the pipeline file
//! ([`crate::config::probe::Probe`]): input columns from Parquet footers / CSV headers / JSONL
//! records (`data::source`), chat-template compilation as the template stage renders it
//! (`data::chat`), and the linear layers a model's `config.json` describes (`models`).
//!
//! Glue only: each answer is one call into the module that owns it, so validation checks exactly
//! what the stages will do. Reads file metadata, never rows or weights; never prints.

use std::path::Path;

use crate::config::chat_template::ChatTemplateSource;
use crate::config::ingest::InputFormat;
use crate::config::probe::{ModelConfigProblem, Probe};
use crate::data::chat::ChatTemplate;
use crate::data::source::peek_columns;
use crate::models::ModelConfig;

/// The probe `validate`, `run`, `status` and `dag` pass to the core.
pub struct StandardProbe;

impl Probe for StandardProbe {
    fn input_columns(
        &self,
        path: &Path,
        format: Option<InputFormat>,
    ) -> Result<Vec<String>, String> {
        peek_columns(path, format)
    }

    fn check_chat_template(&self, source: &ChatTemplateSource) -> Result<(), String> {
        ChatTemplate::new(source.clone()).map(|_| ())
    }

    fn model_linear_layers(
        &self,
        config: &serde_json::Value,
    ) -> Result<Vec<String>, ModelConfigProblem> {
        let model = ModelConfig::from_json(config).map_err(|error| ModelConfigProblem {
            key: error.key,
            message: error.message,
        })?;
        Ok(model
            .linear_layers()
            .into_iter()
            .map(|layer| layer.path)
            .collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn model_layers_come_from_the_config_and_errors_name_the_key() {
        let gpt2 = serde_json::json!({"model_type": "gpt2", "n_embd": 8, "n_layer": 1, "n_head": 2,
            "n_positions": 16, "vocab_size": 10});
        let layers = StandardProbe.model_linear_layers(&gpt2).unwrap();
        assert!(layers
            .iter()
            .any(|path| path == "transformer.h.0.attn.c_attn"));
        assert!(layers.iter().any(|path| path == "lm_head"));
        let error = StandardProbe
            .model_linear_layers(&serde_json::json!({"model_type": "bert"}))
            .unwrap_err();
        assert_eq!(error.key, "model_type");
    }

    #[test]
    fn chat_template_syntax_errors_are_reported() {
        let source = |template: &str| ChatTemplateSource {
            template: template.into(),
            bos_token: String::new(),
            eos_token: String::new(),
            pad_token: None,
            unk_token: None,
        };
        assert!(StandardProbe
            .check_chat_template(&source(
                "{% for m in messages %}{{ m.content }}{% endfor %}"
            ))
            .is_ok());
        assert!(StandardProbe
            .check_chat_template(&source("{% for m in messages %}"))
            .is_err());
    }
}
