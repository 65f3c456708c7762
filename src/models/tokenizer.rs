//! The tokenizer side of a Hugging Face model directory: tokenizer.json (HF `tokenizers`),
//! tokenizer_config.json (special tokens, `add_bos_token`, chat template), special_tokens_map.json
//! (special tokens, as transformers' legacy load reads it) and
//! generation_config.json (bos/eos/pad ids).
//!
//! Owns [`ModelTokenizer`] (encode/decode with the model's BOS/EOS conventions) and
//! [`GenerationConfig`]. Must not: know about datasets, templates or batching.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde_json::Value;
use tokenizers::Tokenizer;

use super::load::{read_json, ModelError};
use crate::config::chat_template::{reads_special_tokens_map, SPECIAL_TOKENS_MAP};

/// generation_config.json (config.json's token ids when the file is absent).
///
/// The ids are read as transformers' `GenerationConfig` reads them: generation_config.json's
/// `bos_token_id`, `eos_token_id` (one id or a list) and `pad_token_id` when the file is there,
/// config.json's when it is not. A generation_config.json without a key gives none (unless it
/// says `_from_model_config: true`, transformers' legacy path back to config.json).
/// `eos_token_ids` are the ids generation stops at, as `generate()` picks them.
/// special_tokens_map.json is not read here: transformers never takes stop ids from it.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct GenerationConfig {
    pub bos_token_id: Option<u32>,
    /// `eos_token_id` may be one id or a list (Llama 3 instruct models list several).
    pub eos_token_ids: Vec<u32>,
    pub pad_token_id: Option<u32>,
    pub max_new_tokens: Option<usize>,
    /// Which file each id above came from (`bos_token_id` → `generation_config.json` or
    /// `config.json`), for error messages.
    #[serde(skip)]
    pub id_files: BTreeMap<&'static str, &'static str>,
}

fn token_id(value: Option<&Value>) -> Option<u32> {
    value
        .and_then(Value::as_u64)
        .and_then(|id| u32::try_from(id).ok())
}

fn token_ids(value: Option<&Value>) -> Vec<u32> {
    match value {
        Some(Value::Array(list)) => list.iter().filter_map(|v| token_id(Some(v))).collect(),
        other => token_id(other).into_iter().collect(),
    }
}

impl GenerationConfig {
    /// Read `generation_config.json` if present, else `config.json`'s ids.
    pub fn load(dir: &Path, model_config: &Value) -> Result<Self, ModelError> {
        let path = dir.join("generation_config.json");
        let generation = if path.is_file() {
            read_json(&path)?
        } else {
            Value::Null
        };
        let mut id_files = BTreeMap::new();
        // transformers reads every generation setting from generation_config.json when it is
        // there; config.json's ids count only where the file was made from it.
        let from_model_config = generation.is_null()
            || generation
                .get("_from_model_config")
                .and_then(Value::as_bool)
                == Some(true);
        let mut pick = |key: &'static str| {
            if let Some(value) = generation.get(key).filter(|value| !value.is_null()) {
                id_files.insert(key, "generation_config.json");
                Some(value)
            } else if let Some(value) = model_config
                .get(key)
                .filter(|value| from_model_config && !value.is_null())
            {
                id_files.insert(key, "config.json");
                Some(value)
            } else {
                None
            }
        };
        let bos_token_id = token_id(pick("bos_token_id"));
        let eos_token_ids = token_ids(pick("eos_token_id"));
        let pad_token_id = token_id(pick("pad_token_id"));
        let max_new_tokens = generation
            .get("max_new_tokens")
            .and_then(Value::as_u64)
            .and_then(|n| usize::try_from(n).ok());
        Ok(Self {
            bos_token_id,
            eos_token_ids,
            pad_token_id,
            max_new_tokens,
            id_files,
        })
    }
}

/// A special token of tokenizer_config.json: a string or an AddedToken object with `content`.
fn special_token(config: &Value, key: &str) -> Option<String> {
    match config.get(key)? {
        Value::String(token) => Some(token.clone()),
        Value::Object(object) => object
            .get("content")
            .and_then(Value::as_str)
            .map(str::to_string),
        _ => None,
    }
}

/// A model's tokenizer with its special-token conventions.
#[derive(Clone)]
pub struct ModelTokenizer {
    tokenizer: Tokenizer,
    path: PathBuf,
    pub bos_token: Option<String>,
    pub eos_token: Option<String>,
    pub pad_token: Option<String>,
    pub bos_token_id: Option<u32>,
    /// The ids that end generation ([`GenerationConfig::eos_token_ids`]; possibly none, as in
    /// transformers: then generation runs to its length limit).
    pub eos_token_ids: Vec<u32>,
    /// The EOS appended to a text (`add_eos_token`, a scored completion): the tokenizer's
    /// `eos_token` (tokenizer_config.json's, or special_tokens_map.json's as transformers' legacy
    /// load takes it), as transformers' tokenizer and training append it, else the first stop id.
    pub eos_token_id: Option<u32>,
    pub pad_token_id: Option<u32>,
    /// tokenizer_config.json `add_bos_token` (default: what the tokenizer.json post-processor does).
    pub add_bos_token: bool,
    pub add_eos_token: bool,
    /// The Jinja chat template (tokenizer_config.json `chat_template`, or chat_template.jinja).
    pub chat_template: Option<String>,
    /// The file each of the BOS/EOS/pad ids came from (see [`GenerationConfig::id_files`];
    /// `tokenizer_config.json` or `special_tokens_map.json` when looked up from its token names,
    /// `eos_token` for the appended EOS).
    id_files: BTreeMap<&'static str, &'static str>,
    /// The generation config's `bos_token_id`/`pad_token_id` with their files: not what the
    /// tokenizer adds where it names its own, but still checked against the vocabulary.
    generation_ids: Vec<(&'static str, u32, &'static str)>,
}

impl std::fmt::Debug for ModelTokenizer {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter
            .debug_struct("ModelTokenizer")
            .field("path", &self.path)
            .field("vocab_size", &self.vocab_size())
            .field("bos_token_id", &self.bos_token_id)
            .field("eos_token_ids", &self.eos_token_ids)
            .field("pad_token_id", &self.pad_token_id)
            .field("add_bos_token", &self.add_bos_token)
            .finish_non_exhaustive()
    }
}

impl ModelTokenizer {
    /// Load `dir/tokenizer.json` with `dir/tokenizer_config.json` (optional) and the generation
    /// config's token ids.
    pub fn load(dir: &Path, generation: &GenerationConfig) -> Result<Self, ModelError> {
        let path = dir.join("tokenizer.json");
        if !path.is_file() {
            return Err(ModelError::Tokenizer {
                path,
                message: "not found (a Hugging Face tokenizer.json is required)".to_string(),
            });
        }
        let tokenizer = Tokenizer::from_file(&path).map_err(|error| ModelError::Tokenizer {
            path: path.clone(),
            message: error.to_string(),
        })?;
        let config_path = dir.join("tokenizer_config.json");
        let config = if config_path.is_file() {
            read_json(&config_path)?
        } else {
            Value::Null
        };
        let mut bos_token = special_token(&config, "bos_token");
        let mut eos_token = special_token(&config, "eos_token");
        let mut pad_token = special_token(&config, "pad_token");
        // transformers' legacy load: special_tokens_map.json's tokens replace
        // tokenizer_config.json's where it is read (the rule chat templates follow too).
        let mut token_files = BTreeMap::new();
        let map_path = dir.join(SPECIAL_TOKENS_MAP);
        if reads_special_tokens_map(&config) && map_path.is_file() {
            let map = read_json(&map_path)?;
            if !map.is_object() {
                return Err(ModelError::Tokenizer {
                    path: map_path,
                    message: "must be a JSON object of special tokens".to_string(),
                });
            }
            for (key, id_key, token) in [
                ("bos_token", "bos_token_id", &mut bos_token),
                ("eos_token", "eos_token", &mut eos_token),
                ("pad_token", "pad_token_id", &mut pad_token),
            ] {
                if map.get(key).is_some() {
                    *token = special_token(&map, key);
                    token_files.insert(id_key, SPECIAL_TOKENS_MAP);
                }
            }
        }
        let lookup =
            |token: &Option<String>| token.as_deref().and_then(|t| tokenizer.token_to_id(t));
        let mut id_files = generation.id_files.clone();
        let token_file = |key: &str| {
            token_files
                .get(key)
                .copied()
                .unwrap_or("tokenizer_config.json")
        };
        // The BOS the tokenizer adds is its own `bos_token`, as in transformers; the generation
        // config's id only stands in where the tokenizer names none.
        let bos_token_id = match lookup(&bos_token) {
            Some(id) => {
                id_files.insert("bos_token_id", token_file("bos_token_id"));
                Some(id)
            }
            None => generation.bos_token_id,
        };
        let generation_ids = [
            ("bos_token_id", generation.bos_token_id),
            ("pad_token_id", generation.pad_token_id),
        ]
        .into_iter()
        .filter_map(|(key, id)| {
            let file = generation.id_files.get(key).copied();
            Some((key, id?, file.unwrap_or("config.json")))
        })
        .collect();
        let eos_token_ids = generation.eos_token_ids.clone();
        let eos_token_id = lookup(&eos_token).or_else(|| eos_token_ids.first().copied());
        id_files.insert("eos_token", token_file("eos_token"));
        let pad_token_id = match lookup(&pad_token) {
            Some(id) => {
                id_files.insert("pad_token_id", token_file("pad_token_id"));
                Some(id)
            }
            None => generation.pad_token_id,
        };
        let probe = tokenizer
            .encode("a", true)
            .map_err(|error| ModelError::Tokenizer {
                path: path.clone(),
                message: error.to_string(),
            })?;
        let post_processor_adds_bos =
            bos_token_id.is_some() && probe.get_ids().first().copied() == bos_token_id;
        let add_bos_token = config
            .get("add_bos_token")
            .and_then(Value::as_bool)
            .unwrap_or(post_processor_adds_bos);
        let add_eos_token = config
            .get("add_eos_token")
            .and_then(Value::as_bool)
            .unwrap_or(false);
        // chat_template.jinja wins over the config's `chat_template`, and of the list form only
        // the `default` entry is used: as transformers (and the template stage) choose.
        let template_file = dir.join("chat_template.jinja");
        let chat_template = match config.get("chat_template") {
            _ if template_file.is_file() => Some(std::fs::read_to_string(&template_file).map_err(
                |source| ModelError::Io {
                    path: template_file.clone(),
                    source,
                },
            )?),
            Some(Value::String(template)) => Some(template.clone()),
            Some(Value::Array(named)) => named
                .iter()
                .find(|entry| entry.get("name").and_then(Value::as_str) == Some("default"))
                .and_then(|entry| entry.get("template"))
                .and_then(Value::as_str)
                .map(str::to_string),
            _ => None,
        };
        Ok(Self {
            tokenizer,
            path,
            bos_token,
            eos_token,
            pad_token,
            bos_token_id,
            eos_token_ids,
            eos_token_id,
            pad_token_id,
            add_bos_token,
            add_eos_token,
            chat_template,
            id_files,
            generation_ids,
        })
    }

    /// The largest id the tokenizer can produce (its vocabulary with added tokens) and its token.
    pub fn max_token_id(&self) -> Option<(u32, String)> {
        self.tokenizer
            .get_vocab(true)
            .into_iter()
            .max_by_key(|(_, id)| *id)
            .map(|(token, id)| (id, token))
    }

    /// Check that every id this tokenizer can produce, and the BOS/EOS/pad ids, index a row of
    /// the model's embedding table (config.json `vocab_size`): an id past it fails deep inside
    /// the first forward pass (`index-select invalid index`).
    pub fn check_vocab_size(&self, vocab_size: usize) -> Result<(), ModelError> {
        let dir = self.path.parent().unwrap_or(Path::new("."));
        if let Some((id, token)) = self.max_token_id() {
            if id as usize >= vocab_size {
                return Err(ModelError::Tokenizer {
                    path: self.path.clone(),
                    message: format!(
                        "produces id {id} (token {token:?}) ≥ config.json vocab_size {vocab_size}: the model has no embedding for it"
                    ),
                });
            }
        }
        let special = self
            .bos_token_id
            .map(|id| ("bos_token_id", id))
            .into_iter()
            .chain(self.eos_token_ids.iter().map(|&id| ("eos_token_id", id)))
            .chain(self.eos_token_id.map(|id| ("eos_token", id)))
            .chain(self.pad_token_id.map(|id| ("pad_token_id", id)))
            .map(|(key, id)| {
                let file = self.id_files.get(key).copied().unwrap_or("config.json");
                (key, id, file)
            })
            .chain(self.generation_ids.iter().copied());
        for (key, id, file) in special {
            if id as usize >= vocab_size {
                return Err(ModelError::Tokenizer {
                    path: dir.join(file),
                    message: format!(
                        "{key} {id} ≥ config.json vocab_size {vocab_size}: the model has no embedding for it"
                    ),
                });
            }
        }
        Ok(())
    }

    /// The underlying HF tokenizer.
    pub fn inner(&self) -> &Tokenizer {
        &self.tokenizer
    }

    /// Vocabulary size including added tokens.
    pub fn vocab_size(&self) -> usize {
        self.tokenizer.get_vocab_size(true)
    }

    pub fn token_to_id(&self, token: &str) -> Option<u32> {
        self.tokenizer.token_to_id(token)
    }

    /// Encode `text`. With `add_special_tokens`, the tokenizer.json post-processor runs, and BOS/EOS
    /// are added per tokenizer_config.json when the post-processor did not add them (as
    /// transformers does for `add_bos_token`/`add_eos_token`).
    pub fn encode(&self, text: &str, add_special_tokens: bool) -> Result<Vec<u32>, ModelError> {
        let encoding = self
            .tokenizer
            .encode(text, add_special_tokens)
            .map_err(|error| ModelError::Tokenizer {
                path: self.path.clone(),
                message: format!("encoding {text:?}: {error}"),
            })?;
        let mut ids = encoding.get_ids().to_vec();
        if add_special_tokens {
            if let Some(bos) = self.bos_token_id.filter(|_| self.add_bos_token) {
                if ids.first() != Some(&bos) {
                    ids.insert(0, bos);
                }
            }
            if let Some(eos) = self.eos_token_id.filter(|_| self.add_eos_token) {
                if ids.last() != Some(&eos) {
                    ids.push(eos);
                }
            }
        }
        Ok(ids)
    }

    pub fn decode(&self, ids: &[u32], skip_special_tokens: bool) -> Result<String, ModelError> {
        self.tokenizer
            .decode(ids, skip_special_tokens)
            .map_err(|error| ModelError::Tokenizer {
                path: self.path.clone(),
                message: format!("decoding {} ids: {error}", ids.len()),
            })
    }
}
