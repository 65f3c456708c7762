//! Prompt tuning (Lester et al. 2021) with Hugging Face PEFT's semantics: `num_virtual_tokens`
//! trainable embeddings `[n, hidden]` prepended to the input embeddings of every sequence
//! (through the model's `Hooks::input_prefix`: positions `0..n`, real tokens from `n`; the
//! trainer drops their logits, so the loss never scores them). Initialisation as PEFT's
//! `prompt_tuning_init`: `RANDOM` (standard normal, an `nn.Embedding`'s default),
//! `SAMPLE_VOCAB` (embeddings of uniformly drawn token ids) or `TEXT` (embeddings of the
//! tokenized init text, repeated then truncated to `n`).
//! On disk: PEFT's folder with one tensor `prompt_embeddings` `[n, hidden]` and PEFT's config
//! keys (`token_dim`, `num_layers`, `num_attention_heads`, ...), which `PeftModel` loads.
//! Never reads pipeline files, never prints.

use std::path::Path;
use std::sync::OnceLock;

use candle_core::{DType, Device, Tensor, Var};
use rand::{Rng, SeedableRng};
use serde_json::{json, Value};

use super::format::{write_adapter_folder, AdapterFiles, PROMPT_EMBEDDINGS};
use super::{
    live, mix_seed, standard_normal, Adapter, AdapterMode, PeftError, TensorContext, Training,
};
use crate::config::method::PromptInit;
use crate::models::{CausalLm, Hooks};

/// Prompt tuning hyperparameters, resolved (init text tokenized).
#[derive(Debug, Clone)]
pub struct PromptTuningSettings {
    pub num_virtual_tokens: usize,
    pub init: PromptInit,
    /// The init text as written (saved in the config).
    pub init_text: Option<String>,
    /// Its token ids, as PEFT's `tokenizer(init_text)` gives them.
    pub init_token_ids: Option<Vec<u32>>,
    pub seed: u64,
}

/// Where the table comes from.
enum Source {
    Init(PromptTuningSettings),
    Loaded {
        table: Tensor,
        files: String,
        config: Value,
    },
}

/// What the model told us at injection.
#[derive(Debug, Clone, Copy)]
struct ModelShape {
    hidden: usize,
    layers: usize,
    heads: usize,
}

/// A prompt-tuning adapter.
pub struct PromptTuningAdapter {
    source: Source,
    device: Device,
    training: Training,
    table: OnceLock<(Var, ModelShape)>,
}

impl PromptTuningAdapter {
    /// A fresh adapter (training mode); its table is made at [`Adapter::finish_injection`].
    pub fn new(settings: PromptTuningSettings, device: &Device) -> Result<Self, PeftError> {
        if settings.num_virtual_tokens == 0 {
            return Err(PeftError::invalid(
                "prompt tuning needs at least one virtual token",
            ));
        }
        if settings.init == PromptInit::Text
            && settings.init_token_ids.as_ref().is_none_or(Vec::is_empty)
        {
            return Err(PeftError::invalid(
                "prompt tuning `init: text` needs an init_text that tokenizes to at least one token",
            ));
        }
        Ok(PromptTuningAdapter {
            source: Source::Init(settings),
            device: device.clone(),
            training: Training::new(true),
            table: OnceLock::new(),
        })
    }

    /// Load PEFT's PROMPT_TUNING folder (inference mode).
    pub fn load(dir: &Path, device: &Device) -> Result<Self, PeftError> {
        let mut files = AdapterFiles::read(dir, device)?;
        let (table, rows, width) = files.take_prompt_embeddings()?;
        let declared = |key: &str| files.config.get(key).and_then(Value::as_u64);
        if declared("num_virtual_tokens").is_some_and(|n| n as usize != rows)
            || declared("token_dim").is_some_and(|d| d as usize != width)
        {
            return Err(files.config_error(format!(
                "num_virtual_tokens / token_dim do not match prompt_embeddings [{rows}, {width}]"
            )));
        }
        if declared("num_transformer_submodules").is_some_and(|n| n != 1) {
            return Err(files.config_error(
                "num_transformer_submodules other than 1 (encoder-decoder models) is not supported",
            ));
        }
        Ok(PromptTuningAdapter {
            source: Source::Loaded {
                table,
                files: files.weights_path.display().to_string(),
                config: files.config,
            },
            device: device.clone(),
            training: Training::new(false),
            table: OnceLock::new(),
        })
    }

    fn table(&self) -> Result<&(Var, ModelShape), PeftError> {
        self.table
            .get()
            .ok_or_else(|| PeftError::invalid("prompt tuning used before finish_injection"))
    }

    /// The initial table `[n, hidden]` (f32) for a model.
    fn initial_table(
        settings: &PromptTuningSettings,
        model: &dyn CausalLm,
    ) -> Result<Tensor, PeftError> {
        let n = settings.num_virtual_tokens;
        let hidden = model.config().hidden_size();
        let vocab = model.config().vocab_size();
        let rows = |ids: Vec<u32>| -> Result<Tensor, PeftError> {
            let ids = Tensor::new(ids.as_slice(), model.device())
                .context(|| "virtual token ids".into())?;
            model
                .token_embeddings()
                .index_select(&ids, 0)
                .and_then(|t| t.to_dtype(DType::F32))
                .context(|| "initialising the virtual tokens from the embeddings".into())
        };
        match settings.init {
            PromptInit::Random => Tensor::from_vec(
                standard_normal(mix_seed(settings.seed, "prompt tuning init"), n * hidden),
                (n, hidden),
                model.device(),
            )
            .context(|| "initialising the virtual tokens".into()),
            PromptInit::SampleVocab => {
                let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(mix_seed(
                    settings.seed,
                    "prompt tuning sample_vocab",
                ));
                rows((0..n).map(|_| rng.random_range(0..vocab as u32)).collect())
            }
            PromptInit::Text => {
                let ids = settings.init_token_ids.clone().unwrap_or_default();
                if let Some(bad) = ids.iter().find(|&&id| id as usize >= vocab) {
                    return Err(PeftError::invalid(format!(
                        "init_text token id {bad} is outside the model's vocabulary of {vocab}"
                    )));
                }
                rows(repeat_to(&ids, n))
            }
        }
    }

    /// adapter_config.json as PEFT 0.21 writes it.
    fn peft_config(&self, base_model_name_or_path: &str) -> Result<Value, PeftError> {
        let (var, shape) = self.table()?;
        let (n, _) = var.dims2().context(|| "prompt_embeddings".into())?;
        let (init, text) = match &self.source {
            Source::Init(settings) => (settings.init.peft_name(), settings.init_text.clone()),
            Source::Loaded { config, .. } => (
                config
                    .get("prompt_tuning_init")
                    .and_then(Value::as_str)
                    .map_or("RANDOM", |name| match name {
                        "SAMPLE_VOCAB" => "SAMPLE_VOCAB",
                        "TEXT" => "TEXT",
                        _ => "RANDOM",
                    }),
                config
                    .get("prompt_tuning_init_text")
                    .and_then(Value::as_str)
                    .map(str::to_string),
            ),
        };
        // PEFT re-runs a TEXT init when loading (then overwrites it with the saved table): it
        // needs a tokenizer, the base model's.
        let tokenizer = (init == "TEXT").then(|| base_model_name_or_path.to_string());
        Ok(json!({
            "auto_mapping": null,
            "base_model_name_or_path": base_model_name_or_path,
            "inference_mode": true,
            "modules_to_save": null,
            "num_attention_heads": shape.heads,
            "num_layers": shape.layers,
            "num_transformer_submodules": 1,
            "num_virtual_tokens": n,
            "peft_type": "PROMPT_TUNING",
            "prompt_tuning_init": init,
            "prompt_tuning_init_text": text,
            "revision": null,
            "task_type": "CAUSAL_LM",
            "token_dim": shape.hidden,
            "tokenizer_kwargs": null,
            "tokenizer_name_or_path": tokenizer,
        }))
    }
}

/// PEFT's TEXT init: the ids repeated until there are at least `n`, then the first `n`.
pub fn repeat_to(ids: &[u32], n: usize) -> Vec<u32> {
    ids.iter().copied().cycle().take(n).collect()
}

impl Adapter for PromptTuningAdapter {
    fn peft_type(&self) -> &'static str {
        "PROMPT_TUNING"
    }

    fn finish_injection(&self, model: &dyn CausalLm) -> Result<(), PeftError> {
        let config = model.config();
        let shape = ModelShape {
            hidden: config.hidden_size(),
            layers: config.num_layers(),
            heads: config.num_attention_heads(),
        };
        let table = match &self.source {
            Source::Init(settings) => Self::initial_table(settings, model)?,
            Source::Loaded { table, files, .. } => {
                let width = table.dim(1).context(|| files.clone())?;
                if width != shape.hidden {
                    return Err(PeftError::invalid(format!(
                        "{files}: prompt_embeddings are {width} wide; the model's hidden size is {}",
                        shape.hidden
                    )));
                }
                table.clone()
            }
        };
        let table = table
            .to_device(&self.device)
            .and_then(|t| Var::from_tensor(&t))
            .context(|| "placing prompt_embeddings".into())?;
        self.table
            .set((table, shape))
            .map_err(|_| PeftError::invalid("prompt tuning injected twice"))
    }

    fn hooks(&self) -> Result<Hooks, PeftError> {
        let (var, _) = self.table()?;
        let prefix = live(var, self.training.get())
            .unsqueeze(0)
            .context(|| "prompt_embeddings".into())?;
        Ok(Hooks {
            input_prefix: Some(prefix),
            ..Hooks::default()
        })
    }

    fn trainable_vars(&self) -> Vec<(String, Var)> {
        self.table
            .get()
            .map(|(var, _)| vec![(PROMPT_EMBEDDINGS.to_string(), var.clone())])
            .unwrap_or_default()
    }

    fn set_mode(&self, mode: AdapterMode) {
        self.training.set(mode);
    }

    fn save(&self, dir: &Path, base_model_name_or_path: &str) -> Result<(), PeftError> {
        let (var, _) = self.table()?;
        write_adapter_folder(
            dir,
            &self.peft_config(base_model_name_or_path)?,
            &[(PROMPT_EMBEDDINGS.to_string(), var.as_tensor().clone())],
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn text_init_repeats_then_truncates_like_peft() {
        assert_eq!(repeat_to(&[1, 2, 3], 8), [1, 2, 3, 1, 2, 3, 1, 2]);
        assert_eq!(repeat_to(&[1, 2, 3, 4, 5], 3), [1, 2, 3]);
        assert_eq!(repeat_to(&[7], 2), [7, 7]);
    }

    #[test]
    fn text_init_without_tokens_is_refused() {
        let settings = PromptTuningSettings {
            num_virtual_tokens: 4,
            init: PromptInit::Text,
            init_text: Some(String::new()),
            init_token_ids: Some(Vec::new()),
            seed: 0,
        };
        assert!(PromptTuningAdapter::new(settings, &Device::Cpu).is_err());
    }
}
