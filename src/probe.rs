//! The binary's answers to what validation asks beyond the pipeline file
//! ([`crate::config::probe::Probe`]): input columns from Parquet footers / CSV headers / JSONL
//! records (`data::source`), chat-template compilation as the template stage renders it
//! (`data::chat`), and whether a model directory will load, with its linear layers (`models`:
//! config.json, safetensors headers, tokenizer; `data::tokenize`: the special-token rules).
//!
//! Glue only: each answer calls into the modules that own it, so validation checks exactly what
//! the stages will do. Reads file metadata, never rows or a model's weights (an outside adapter
//! folder is loaded, as evaluating it will, to check it against its base model); never prints.

use std::path::Path;

use crate::config::chat_template::ChatTemplateSource;
use crate::config::ingest::{IngestConfig, InputFormat};
use crate::config::probe::{
    LinearLayerShape, ModelContext, ModelFacts, Probe, Stored4bit, StoredBlocks,
};
use crate::data::chat::ChatTemplate;
use crate::data::source::peek_columns;
use crate::data::tokenize::TextTokenizer;
use crate::models::ModelDir;

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

    fn check_adapter(&self, dir: &Path, layers: Option<&[LinearLayerShape]>) -> Result<(), String> {
        let adapter = crate::peft::load_adapter(dir, &candle_core::Device::Cpu)
            .map_err(|error| error.to_string())?;
        // The record of the 4-bit base it was trained over, read as evaluating it will.
        crate::infer::session::recorded_base_quantization(dir)?;
        let Some(layers) = layers else {
            return Ok(());
        };
        let shapes: Vec<crate::peft::LayerShape<'_>> = layers
            .iter()
            .map(|layer| crate::peft::LayerShape {
                path: &layer.path,
                out_features: layer.out_features,
                in_features: layer.in_features,
            })
            .collect();
        adapter
            .check_layers(&shapes)
            .map_err(|error| error.to_string())
    }

    fn gguf_problem(&self, dir: &Path) -> Option<String> {
        crate::models::gguf::export_problem(dir)
    }

    fn check_column_types(&self, path: &Path, ingest: &IngestConfig) -> Vec<(String, String)> {
        let schema =
            match crate::data::source::peek_schema_typed(path, ingest.format, &ingest.types) {
                Ok(schema) => schema,
                // A typed read failing where the untyped one reads is a cell `types` cannot parse
                // (the run would fail on it); other read errors are said where columns are read.
                Err(message)
                    if !ingest.types.is_empty()
                        && crate::data::source::peek_schema(path, ingest.format).is_ok() =>
                {
                    return vec![("types".to_string(), message)];
                }
                Err(_) => return Vec::new(),
            };
        // The stage's output schema: the selected columns, renamed, with their stored types.
        let selected: Vec<&arrow::datatypes::Field> = if ingest.columns.is_empty() {
            schema.fields().iter().map(AsRef::as_ref).collect()
        } else {
            ingest
                .columns
                .iter()
                .filter_map(|name| schema.field_with_name(name).ok())
                .collect()
        };
        let mapped = arrow::datatypes::Schema::new(
            selected
                .into_iter()
                .map(|field| {
                    let name = ingest
                        .rename
                        .get(field.name())
                        .cloned()
                        .unwrap_or_else(|| field.name().clone());
                    arrow::datatypes::Field::new(
                        name,
                        crate::data::source::stored_type(field.data_type()),
                        true,
                    )
                })
                .collect::<Vec<_>>(),
        );
        let mut problems = Vec::new();
        let csv = ingest
            .format
            .or_else(|| crate::config::input::format_of(path))
            == Some(InputFormat::Csv);
        let mut text_compared = std::collections::BTreeSet::new();
        if csv {
            for (index, message) in crate::data::filter::csv_text_filter_problems(
                &ingest.filters,
                &ingest.rename,
                &ingest.types,
            ) {
                if mapped.index_of(ingest.filters[index].column()).is_ok() {
                    text_compared.insert(index);
                    problems.push((format!("filters[{index}]"), message));
                }
            }
        }
        for (index, filter) in ingest.filters.iter().enumerate() {
            if text_compared.contains(&index) {
                continue;
            }
            if mapped.index_of(filter.column()).is_err() {
                continue;
            }
            if let Err(error) = crate::data::filter::RowFilters::compile(
                std::slice::from_ref(filter),
                false,
                &mapped,
            ) {
                problems.push((format!("filters[{index}]"), error.to_string()));
            }
        }
        // Strata are read as text.
        let as_text = |name: &str| {
            mapped.field_with_name(name).ok().and_then(|field| {
                (!arrow::compute::can_cast_types(
                    field.data_type(),
                    &arrow::datatypes::DataType::Utf8,
                ))
                .then(|| field.data_type().clone())
            })
        };
        // Dedup keys are compared by value, in Arrow's row format.
        for (index, column) in ingest.dedup.iter().enumerate() {
            let Ok(field) = mapped.field_with_name(column) else {
                continue;
            };
            if !crate::data::filter::dedup_supports(field.data_type()) {
                problems.push((
                    format!("dedup[{index}]"),
                    format!(
                        "column `{column}` is {}, whose values cannot be compared to find duplicates",
                        field.data_type()
                    ),
                ));
            }
        }
        if let Some(column) = &ingest.split.stratify_by {
            if let Some(data_type) = as_text(column) {
                problems.push((
                    "split.stratify_by".to_string(),
                    format!(
                        "column `{column}` is {data_type}, which has no text form to group rows by"
                    ),
                ));
            }
        }
        problems
    }

    fn check_model(&self, dir: &Path) -> ModelFacts {
        check_model_dir(dir)
    }
}

/// Open a model directory as training will and check it from metadata alone: config.json
/// (values included), the safetensors headers against it, the tokenizer against `vocab_size`
/// and its special-token rules. The linear layers are listed only once config.json agrees with
/// the stored weights, so their number is bounded by the files, not by config.json.
fn check_model_dir(dir: &Path) -> ModelFacts {
    let mut facts = ModelFacts::default();
    if !dir.is_dir() {
        facts
            .problems
            .push(format!("model directory {} does not exist", dir.display()));
        return facts;
    }
    let model = match ModelDir::open(dir) {
        Ok(model) => model,
        Err(error) => {
            facts.problems.push(error.to_string());
            return facts;
        }
    };
    facts.model_type = Some(model.config().model_type().to_string());
    let config = model.config();
    facts.context = Some(ModelContext {
        max_positions: config.max_positions(),
        positions_key: config.max_positions_key().to_string(),
        num_layers: config.num_layers(),
        kv_dim: config.kv_dim(),
        sliding_window: config.limiting_sliding_window(),
    });
    // The safetensors headers, read once for the block sizes and the weight check.
    let headers = model.read_headers();
    facts.stored_4bit = model.stored_quantization().map(|stored| Stored4bit {
        config_path: model.config_path().display().to_string(),
        quant_type: stored.quant_type.name().to_string(),
        double_quant: stored.double_quant,
        block_sizes: model
            .stored_block_sizes_in(&headers)
            .into_iter()
            .map(|(size, (tensor, file))| StoredBlocks {
                size,
                tensor,
                file: file.display().to_string(),
            })
            .collect(),
    });
    let weight_problems = model.check_weights_in(headers);
    let weights_agree = weight_problems.is_empty();
    facts
        .problems
        .extend(weight_problems.iter().map(ToString::to_string));
    match model
        .tokenizer()
        .map_err(|error| error.to_string())
        .and_then(|tokenizer| {
            TextTokenizer::new(tokenizer).map_err(|error| {
                format!("{}: {error}", dir.join("tokenizer_config.json").display())
            })
        }) {
        Ok(tokenizer) => facts.has_eos = Some(tokenizer.eos_id().is_some()),
        Err(message) => facts.problems.push(message),
    }
    if weights_agree {
        facts.linear_layers = Some(
            model
                .config()
                .linear_layers()
                .into_iter()
                .map(|layer| LinearLayerShape {
                    path: layer.path,
                    in_features: layer.in_features,
                    out_features: layer.out_features,
                })
                .collect(),
        );
    }
    facts
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_quickstart_model_is_described_without_problems() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("datasets/quickstart/model");
        let facts = StandardProbe.check_model(&dir);
        assert_eq!(facts.problems, Vec::<String>::new());
        assert_eq!(facts.model_type.as_deref(), Some("llama"));
        assert_eq!(facts.has_eos, Some(true));
        let layers = facts.linear_layers.unwrap();
        assert_eq!(layers.len(), 2 * 7 + 1);
        assert_eq!(
            layers[0],
            LinearLayerShape {
                path: "model.layers.0.self_attn.q_proj".into(),
                in_features: 64,
                out_features: 64
            }
        );
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
