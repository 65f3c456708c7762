//! What semantic validation asks of the world beyond the pipeline file that only the ML and Arrow
//! side of peftpipe can answer: the columns of a tabular input file, whether a chat template
//! compiles the way transformers renders it, and whether a model directory will load (its
//! `config.json` against the safetensors headers, its tokenizer against `vocab_size`) with the
//! linear layers it has.
//!
//! The core defines the question, the main crate answers it (`peftpipe::probe::StandardProbe`,
//! passed in by the CLI), so config stays free of arrow, parquet and candle while validation
//! checks exactly what the stages will later do. A probe only reads file metadata (footers,
//! safetensors headers, config and tokenizer files); it never reads rows or weights.

use std::path::Path;

use super::chat_template::ChatTemplateSource;
use super::ingest::InputFormat;
use super::Problem;

/// One linear layer of a model: its module path (`model.layers.0.self_attn.q_proj`) and shape.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LinearLayerShape {
    pub path: String,
    pub in_features: usize,
    pub out_features: usize,
}

/// A checkpoint saved by transformers with bitsandbytes 4-bit: config.json's
/// `quantization_config` settings that a QLoRA method must repeat (its weights are used as
/// stored, never re-quantized).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Stored4bit {
    /// config.json's path, for messages.
    pub config_path: String,
    /// `bnb_4bit_quant_type` (`nf4`, `fp4`).
    pub quant_type: String,
    /// `bnb_4bit_use_double_quant`.
    pub double_quant: bool,
    /// Weights per absmax, from the weights' stored sizes: each size found with the first
    /// weight stored so and its file (one entry for a usable checkpoint).
    pub block_sizes: Vec<StoredBlocks>,
}

/// One block size a 4-bit checkpoint's weights are stored with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredBlocks {
    /// Weights per absmax.
    pub size: usize,
    /// The first weight stored so (`model.layers.0.mlp.down_proj.weight`).
    pub tensor: String,
    /// The safetensors file that holds it, for messages.
    pub file: String,
}

impl Stored4bit {
    /// A 4-bit base's settings (`asked`: quant type name, double quantization, block size),
    /// written at `settings` (`stages.x.train.method.qlora`, an evaluate stage's
    /// `base_quantization`), against this checkpoint's storage: its weights are used as stored,
    /// so each must be the checkpoint's. One problem per differing setting, naming config.json,
    /// the stored value and what to write; `otherwise` is the hint's alternative.
    pub fn check_settings(
        &self,
        (quant_type, double_quant, block_size): (&str, bool, usize),
        settings: &str,
        otherwise: &str,
        problems: &mut Vec<Problem>,
    ) {
        let mut differ = |field: &str, stored_as: String, stored_value: String, asked: String| {
            problems.push(
                Problem::new(
                    format!("{settings}.{field}"),
                    format!(
                        "{}: the model is saved with {stored_as}, but this asks for {asked}; a checkpoint saved in 4 bits is used as stored, never re-quantized",
                        self.config_path
                    ),
                )
                .about_value()
                .with_hint(format!("set {field}: {stored_value}, or {otherwise}")),
            );
        };
        if quant_type != self.quant_type {
            differ(
                "quant_type",
                format!(
                    "quantization_config.bnb_4bit_quant_type {}",
                    self.quant_type
                ),
                self.quant_type.clone(),
                quant_type.to_string(),
            );
        }
        if double_quant != self.double_quant {
            differ(
                "double_quant",
                format!(
                    "quantization_config.bnb_4bit_use_double_quant {}",
                    self.double_quant
                ),
                self.double_quant.to_string(),
                double_quant.to_string(),
            );
        }
        match self.block_sizes.as_slice() {
            [] => {}
            [stored] if stored.size == block_size => {}
            [stored] => problems.push(
                Problem::new(
                    format!("{settings}.block_size"),
                    format!(
                        "{}: the model's 4-bit weights are stored in blocks of {} weights per absmax (`{}` and the others), but this asks for {block_size}; a checkpoint saved in 4 bits is used as stored, never re-quantized",
                        stored.file, stored.size, stored.tensor
                    ),
                )
                .about_value()
                .with_hint(match super::method::block_size_problem(stored.size) {
                    // Blocks of 32 (bitsandbytes' ROCm-only size) are no block_size to set.
                    Some(_) => format!(
                        "blocks of {} are not among the sizes a 4-bit base takes (64 to 4096): {otherwise}",
                        stored.size
                    ),
                    None => format!("set block_size: {}, or {otherwise}", stored.size),
                }),
            ),
            [first, rest @ ..] => {
                let others: Vec<String> = rest
                    .iter()
                    .map(|other| format!("`{}` ({}) in blocks of {}", other.tensor, other.file, other.size))
                    .collect();
                problems.push(
                    Problem::new(
                        format!("{settings}.block_size"),
                        format!(
                            "{}: `{}` is stored in blocks of {} weights per absmax, but {}: one 4-bit base has one block size, so no block_size describes this checkpoint",
                            first.file,
                            first.tensor,
                            first.size,
                            others.join(", ")
                        ),
                    )
                    .with_hint("save the checkpoint again with one block size, or use its 16-bit original"),
                );
            }
        }
    }
}

/// What validation learns from a model directory's files.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ModelFacts {
    /// config.json's `model_type` (PEFT's default targets depend on it), when it has one.
    pub model_type: Option<String>,
    /// Every linear layer, in model order. `None` when config.json cannot describe them or
    /// disagrees with the stored weights (a problem says why): the list is only built once its
    /// length is bounded by what the weight files hold.
    pub linear_layers: Option<Vec<LinearLayerShape>>,
    /// Whether the tokenizer has an EOS token (`add_eos` needs one); `None` when the tokenizer
    /// could not be read (a problem says why).
    pub has_eos: Option<bool>,
    /// What will fail when the model is loaded, each naming the file and the cause.
    pub problems: Vec<String>,
    /// The model is saved in bitsandbytes 4-bit (`None`: 16 or 32 bits).
    pub stored_4bit: Option<Stored4bit>,
    /// The sizes the virtual-token methods are bounded by, once config.json has been read.
    pub context: Option<ModelContext>,
}

/// A model's context length and the widths prompt/prefix methods depend on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ModelContext {
    /// Positions the model takes (GPT-2's learned `n_positions`, a Llama's
    /// `max_position_embeddings`).
    pub max_positions: usize,
    /// The config.json key that says so, for messages.
    pub positions_key: String,
    /// Decoder layers.
    pub num_layers: usize,
    /// Width of one position's keys (or values): head_dim · key/value heads (PEFT's prefix
    /// `token_dim`).
    pub kv_dim: usize,
    /// config.json's `sliding_window` when it is the context (`max_positions`): the model uses
    /// sliding-window attention, which peftpipe does not implement, so a sequence longer than
    /// it is refused rather than cut to fit.
    pub sliding_window: Option<usize>,
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

    /// Check the model directory `dir` as loading it will (config.json, the safetensors
    /// headers, the tokenizer files) and describe it; never reads weights.
    fn check_model(&self, dir: &Path) -> ModelFacts;

    /// The ingest stage's filters, dedup and stratify columns against the column types of its
    /// first input file (after selection and renaming), as the run will compile them: each
    /// problem as (key under the stage, e.g. `filters[0]` or `dedup[1]`, message). Names that
    /// are not columns are the caller's to report. The default knows no types: no problem.
    /// Whether the PEFT adapter folder `dir` (an evaluate stage's `external_adapters` entry)
    /// loads, and fits the linear layers of its base model (`layers`, when known), as evaluating
    /// it will check; Err names the file and the cause. Reads the adapter's own files (small
    /// beside a model), never the base model's weights. The default finds nothing.
    fn check_adapter(
        &self,
        _dir: &Path,
        _layers: Option<&[LinearLayerShape]>,
    ) -> Result<(), String> {
        Ok(())
    }

    /// Why a GGUF export of the model in `dir` would fail (an architecture or vocabulary the
    /// writer does not handle), from its files alone. The default knows none.
    fn gguf_problem(&self, _dir: &Path) -> Option<String> {
        None
    }

    fn check_column_types(
        &self,
        _path: &Path,
        _ingest: &super::ingest::IngestConfig,
    ) -> Vec<(String, String)> {
        Vec::new()
    }
}

/// `inner`, asked once per model folder: the first [`Probe::check_model`] of a folder is
/// answered by `inner` (config.json, the index, the safetensors headers, the tokenizer files),
/// later ones for the same folder (however spelled: compared canonicalized) by a copy of that
/// answer. One pipeline's checks use one (and `peftpipe validate` one for all its files), so a
/// sweep of train stages (`matrix:`), an evaluate stage's base and an export's merge check read
/// one model's files once. Every other question goes to `inner` as asked.
pub struct ModelsCheckedOnce<'a> {
    inner: &'a dyn Probe,
    facts: std::sync::Mutex<std::collections::BTreeMap<std::path::PathBuf, ModelFacts>>,
}

impl<'a> ModelsCheckedOnce<'a> {
    pub fn new(inner: &'a dyn Probe) -> Self {
        ModelsCheckedOnce {
            inner,
            facts: std::sync::Mutex::default(),
        }
    }
}

impl Probe for ModelsCheckedOnce<'_> {
    fn input_columns(
        &self,
        path: &Path,
        format: Option<InputFormat>,
    ) -> Result<Vec<String>, String> {
        self.inner.input_columns(path, format)
    }

    fn check_chat_template(&self, source: &ChatTemplateSource) -> Result<(), String> {
        self.inner.check_chat_template(source)
    }

    fn check_model(&self, dir: &Path) -> ModelFacts {
        let key = dir.canonicalize().unwrap_or_else(|_| dir.to_path_buf());
        // A poisoned lock only means another check panicked; its map is still whole.
        let known = self
            .facts
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .get(&key)
            .cloned();
        if let Some(facts) = known {
            return facts;
        }
        let facts = self.inner.check_model(dir);
        self.facts
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .insert(key, facts.clone());
        facts
    }

    fn check_adapter(&self, dir: &Path, layers: Option<&[LinearLayerShape]>) -> Result<(), String> {
        self.inner.check_adapter(dir, layers)
    }

    fn gguf_problem(&self, dir: &Path) -> Option<String> {
        self.inner.gguf_problem(dir)
    }

    fn check_column_types(
        &self,
        path: &Path,
        ingest: &super::ingest::IngestConfig,
    ) -> Vec<(String, String)> {
        self.inner.check_column_types(path, ingest)
    }
}

/// A probe for unit tests of the core: knows no file, compiles chat templates with plain
/// minijinja, and describes every model directory as a small valid Llama (64-wide attention).
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

    fn check_model(&self, _dir: &Path) -> ModelFacts {
        let layer = |name: &str, width: usize| LinearLayerShape {
            path: name.to_string(),
            in_features: 64,
            out_features: width,
        };
        let layers = ["q_proj", "k_proj", "v_proj", "o_proj"]
            .iter()
            .map(|name| layer(&format!("model.layers.0.self_attn.{name}"), 64))
            .chain(std::iter::once(layer("lm_head", 100)))
            .collect();
        ModelFacts {
            model_type: Some("llama".to_string()),
            linear_layers: Some(layers),
            has_eos: Some(true),
            problems: Vec::new(),
            stored_4bit: None,
            context: Some(ModelContext {
                max_positions: 2048,
                positions_key: "max_position_embeddings".to_string(),
                num_layers: 1,
                kv_dim: 64,
                sliding_window: None,
            }),
        }
    }
}

#[cfg(test)]
mod stored_tests {
    use super::*;

    fn stored(size: usize) -> Stored4bit {
        Stored4bit {
            config_path: "b32/config.json".into(),
            quant_type: "nf4".into(),
            double_quant: true,
            block_sizes: vec![StoredBlocks {
                size,
                tensor: "model.layers.0.mlp.down_proj.weight".into(),
                file: "b32/model.safetensors".into(),
            }],
        }
    }

    #[test]
    fn a_stored_block_size_no_config_takes_is_not_offered_as_the_fix() {
        let mut problems = Vec::new();
        let at = "stages.tune.train.method.qlora";
        let otherwise = "train from the 16-bit original";
        stored(32).check_settings(("nf4", true, 64), at, otherwise, &mut problems);
        let [problem] = problems.as_slice() else {
            panic!("one problem: {problems:?}")
        };
        let hint = problem.hint.as_deref().unwrap_or_default();
        assert_eq!(problem.path, format!("{at}.block_size"));
        assert!(
            !hint.contains("set block_size")
                && hint.contains("64 to 4096")
                && hint.contains(otherwise),
            "{hint}"
        );
        // A size a config takes is the value to write.
        let mut problems = Vec::new();
        stored(128).check_settings(("nf4", true, 64), at, otherwise, &mut problems);
        let hint = problems[0].hint.as_deref().unwrap_or_default();
        assert!(hint.contains("set block_size: 128"), "{hint}");
    }
}
