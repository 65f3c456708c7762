//! Tokenization of prompt/completion pairs for causal-LM training with a model's Hugging Face
//! tokenizer files: `tokenizer.json` (the `tokenizers` crate) and `tokenizer_config.json` (which
//! special tokens transformers adds). The prompt is encoded on its own, so it is exactly what the
//! model gets at inference time, and the completion as the tokens the whole text has after it
//! ([`continuation_ids`]): `[BOS if the tokenizer adds one] + prompt`, then `completion [+ EOS]`; a BOS or
//! EOS the text already holds as a token (a chat template writes them) is not added again.
//! Knows nothing of tensors or batching; never prints.

use std::path::Path;

use crate::models::{GenerationConfig, ModelTokenizer};

/// A prompt/completion pair as token ids.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TokenizedExample {
    /// Leading special tokens (BOS) + prompt tokens: context, never scored.
    pub prompt: Vec<u32>,
    /// Completion tokens (+ EOS when asked): what the loss is computed on.
    pub completion: Vec<u32>,
}

/// A model's tokenizer with the special-token rules transformers applies
/// (read by [`ModelTokenizer`] from tokenizer.json, tokenizer_config.json, generation_config.json).
#[derive(Debug)]
pub struct TextTokenizer {
    tokenizer: ModelTokenizer,
    /// Special tokens transformers puts before every sequence (BOS for Llama), possibly none.
    prefix: Vec<u32>,
    eos: Option<u32>,
    pad: u32,
}

impl TextTokenizer {
    /// The tokenizer of a Hugging Face model directory.
    pub fn from_model_dir(dir: &Path) -> Result<Self, String> {
        let config_path = dir.join("config.json");
        let model_config = match std::fs::read_to_string(&config_path) {
            Ok(text) => serde_json::from_str(&text)
                .map_err(|error| format!("{}: invalid JSON: {error}", config_path.display()))?,
            Err(_) => serde_json::Value::Null,
        };
        let generation =
            GenerationConfig::load(dir, &model_config).map_err(|error| error.to_string())?;
        let tokenizer =
            ModelTokenizer::load(dir, &generation).map_err(|error| error.to_string())?;
        if let Some(vocab_size) = model_config
            .get("vocab_size")
            .and_then(serde_json::Value::as_u64)
        {
            tokenizer
                .check_vocab_size(usize::try_from(vocab_size).unwrap_or(usize::MAX))
                .map_err(|error| error.to_string())?;
        }
        Self::new(tokenizer)
            .map_err(|error| format!("{}: {error}", dir.join("tokenizer_config.json").display()))
    }

    /// BOS when `add_bos_token` (tokenizer_config.json, else what tokenizer.json's post-processor
    /// does); EOS = the tokenizer's `eos_token` (else generation_config's first); pad = pad token,
    /// else EOS, else 0.
    pub fn new(tokenizer: ModelTokenizer) -> Result<Self, String> {
        let prefix = match (tokenizer.add_bos_token, tokenizer.bos_token_id) {
            (true, Some(bos)) => vec![bos],
            (true, None) => {
                return Err("add_bos_token is set but the tokenizer has no bos_token".into())
            }
            (false, _) => Vec::new(),
        };
        let eos = match &tokenizer.eos_token {
            Some(token) => Some(
                tokenizer
                    .token_to_id(token)
                    .ok_or_else(|| format!("eos_token `{token}` is not in the vocabulary"))?,
            ),
            None => tokenizer.eos_token_id,
        };
        Ok(TextTokenizer {
            pad: tokenizer.pad_token_id.or(eos).unwrap_or(0),
            tokenizer,
            prefix,
            eos,
        })
    }

    /// End-of-sequence id, if the tokenizer declares one.
    pub fn eos_id(&self) -> Option<u32> {
        self.eos
    }

    /// The id padded positions hold (pad token, else EOS, else 0); never scored or attended.
    pub fn pad_id(&self) -> u32 {
        self.pad
    }

    /// Leading special tokens (BOS).
    pub fn prefix(&self) -> &[u32] {
        &self.prefix
    }

    /// Vocabulary size including added tokens.
    pub fn vocab_size(&self) -> usize {
        self.tokenizer.vocab_size()
    }

    /// Plain tokens of `text`, no special tokens.
    pub fn encode_plain(&self, text: &str) -> Result<Vec<u32>, String> {
        self.tokenizer
            .encode(text, false)
            .map_err(|error| error.to_string())
    }

    /// `prefix + tokens(prompt)`, without the prefix when the prompt's own tokens begin with it
    /// (a chat template that writes `bos_token` as text: transformers' apply_chat_template keeps
    /// it once).
    pub fn encode_prompt(&self, prompt: &str) -> Result<Vec<u32>, String> {
        Ok(self.with_prefix(self.encode_plain(prompt)?))
    }

    /// A prompt's plain tokens with the prefix in front, unless they already begin with it.
    fn with_prefix(&self, plain: Vec<u32>) -> Vec<u32> {
        if !self.prefix.is_empty() && plain.starts_with(&self.prefix) {
            return plain;
        }
        let mut ids = self.prefix.clone();
        ids.extend(plain);
        ids
    }

    /// Prompt and completion, EOS appended to the completion when `add_eos`.
    pub fn encode_example(
        &self,
        prompt: &str,
        completion: &str,
        add_eos: bool,
    ) -> Result<TokenizedExample, String> {
        // The prompt's plain tokens serve twice: the boundary in the whole text, and the
        // prompt itself (with its prefix).
        let prompt_plain = self.encode_plain(prompt)?;
        let mut completion_ids = continuation_ids(
            &prompt_plain,
            &self.encode_plain(&format!("{prompt}{completion}"))?,
            || self.encode_plain(completion),
        )?;
        // A completion that ends with the EOS token as text (a chat template's end of turn)
        // already ends the sequence.
        let ended = self.eos.is_some() && completion_ids.last() == self.eos.as_ref();
        if add_eos && !ended {
            completion_ids.push(
                self.eos
                    .ok_or("add_eos is set but the tokenizer declares no eos_token")?,
            );
        }
        Ok(TokenizedExample {
            prompt: self.with_prefix(prompt_plain),
            completion: completion_ids,
        })
    }

    /// Text of token ids (special tokens skipped).
    pub fn decode(&self, ids: &[u32]) -> Result<String, String> {
        self.tokenizer
            .decode(ids, true)
            .map_err(|error| error.to_string())
    }
}

/// The completion's tokens as the whole text `prompt + completion` has them after the prompt's
/// own tokens (TRL's rule): a SentencePiece tokenizer gives "Making" on its own a word-start
/// piece it does not have after "assistant\n", and the model must learn the text's tokens.
/// When the whole text does not begin with the prompt's tokens (a token merging across the
/// boundary), the completion is tokenized on its own (`alone`), so the prompt the model is
/// trained on is always the prompt it gets at inference.
pub fn continuation_ids<E>(
    prompt_ids: &[u32],
    joint_ids: &[u32],
    alone: impl FnOnce() -> Result<Vec<u32>, E>,
) -> Result<Vec<u32>, E> {
    if joint_ids.len() > prompt_ids.len() && joint_ids.starts_with(prompt_ids) {
        Ok(joint_ids[prompt_ids.len()..].to_vec())
    } else {
        alone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;
    use tokenizers::models::wordlevel::WordLevel;
    use tokenizers::pre_tokenizers::whitespace::Whitespace;
    use tokenizers::Tokenizer;

    /// A model directory with a word-level tokenizer and the given tokenizer_config.json.
    fn model_dir(config: serde_json::Value) -> tempfile::TempDir {
        let vocab: HashMap<String, u32> = ["<unk>", "<s>", "</s>", "hello", "world", "yes"]
            .iter()
            .enumerate()
            .map(|(i, t)| (t.to_string(), i as u32))
            .collect();
        let model = WordLevel::builder()
            .vocab(vocab.into_iter().collect())
            .unk_token("<unk>".into())
            .build()
            .unwrap();
        let mut tokenizer = Tokenizer::new(model);
        tokenizer.with_pre_tokenizer(Some(Whitespace {}));
        tokenizer
            .add_special_tokens([
                tokenizers::AddedToken::from("<s>", true),
                tokenizers::AddedToken::from("</s>", true),
            ])
            .unwrap();
        let dir = tempfile::tempdir().unwrap();
        tokenizer
            .save(dir.path().join("tokenizer.json"), false)
            .unwrap();
        std::fs::write(dir.path().join("tokenizer_config.json"), config.to_string()).unwrap();
        dir
    }

    #[test]
    fn bos_and_eos_follow_tokenizer_config() {
        let dir = model_dir(serde_json::json!({"bos_token": "<s>",
            "eos_token": {"content": "</s>"}, "add_bos_token": true}));
        let tokenizer = TextTokenizer::from_model_dir(dir.path()).unwrap();
        let example = tokenizer
            .encode_example("hello world", "yes", true)
            .unwrap();
        assert_eq!(example.prompt, vec![1, 3, 4]);
        assert_eq!(example.completion, vec![5, 2]);
        assert_eq!(tokenizer.pad_id(), 2);
        let without = tokenizer.encode_example("hello", "yes", false).unwrap();
        assert_eq!(without.completion, vec![5]);
    }

    #[test]
    fn special_tokens_a_chat_template_writes_are_not_added_twice() {
        let dir = model_dir(serde_json::json!({"bos_token": "<s>",
            "eos_token": {"content": "</s>"}, "add_bos_token": true}));
        let tokenizer = TextTokenizer::from_model_dir(dir.path()).unwrap();
        // Llama-2's chat template writes `<s>` and `</s>` as text, as transformers'
        // apply_chat_template(tokenize=True) keeps them: once.
        let example = tokenizer
            .encode_example("<s> hello world", "yes </s>", true)
            .unwrap();
        assert_eq!(example.prompt, vec![1, 3, 4]);
        assert_eq!(example.completion, vec![5, 2]);
        assert_eq!(tokenizer.encode_prompt("<s> hello").unwrap(), vec![1, 3]);
    }

    #[test]
    fn a_completion_is_tokenized_as_it_continues_the_prompt() {
        // stories260k's SentencePiece tokenizer (Metaspace, prepend_scheme first): "Making" on
        // its own gets the word-start piece `▁M`, after "assistant\n" it is `M`; the model
        // must learn the tokens the whole text has, not a space the text lacks.
        let Some(shared) = std::env::var_os("PEFTPIPE_SHARED") else {
            return;
        };
        let dir = std::path::Path::new(&shared).join("models/stories260k");
        let tokenizer = TextTokenizer::from_model_dir(&dir).unwrap();
        let joint = tokenizer.encode_plain("assistant\nMaking").unwrap();
        let example = tokenizer
            .encode_example("assistant\n", "Making", false)
            .unwrap();
        let prompt_plain = tokenizer.encode_plain("assistant\n").unwrap();
        assert_eq!(example.completion, joint[prompt_plain.len()..].to_vec());
        assert_ne!(
            example.completion,
            tokenizer.encode_plain("Making").unwrap(),
            "on its own it starts a word"
        );
        assert_eq!(
            [example.prompt.clone(), example.completion.clone()].concat()[1..],
            joint[..],
            "BOS, then exactly the whole text's tokens"
        );
        // A leading space is the same either way.
        let spaced = tokenizer
            .encode_example("great", " positive", false)
            .unwrap();
        assert_eq!(
            spaced.completion,
            tokenizer.encode_plain(" positive").unwrap()
        );
    }

    #[test]
    fn the_inference_tokenizer_takes_its_chat_template_as_transformers_does() {
        // chat_template.jinja wins over tokenizer_config.json's; of a named list only `default`.
        let Some(shared) = std::env::var_os("PEFTPIPE_SHARED") else {
            return;
        };
        let stories = std::path::Path::new(&shared).join("models/stories260k");
        let dir = tempfile::tempdir().unwrap();
        for name in ["tokenizer.json", "config.json"] {
            std::fs::copy(stories.join(name), dir.path().join(name)).unwrap();
        }
        let config: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(dir.path().join("config.json")).unwrap())
                .unwrap();
        let template = |tokenizer_config: &str| {
            std::fs::write(dir.path().join("tokenizer_config.json"), tokenizer_config).unwrap();
            let generation = GenerationConfig::load(dir.path(), &config).unwrap();
            ModelTokenizer::load(dir.path(), &generation)
                .unwrap()
                .chat_template
        };
        let named = r#"{"chat_template": [{"name": "tool_use", "template": "tools"}]}"#;
        assert_eq!(template(named), None);
        let config_only = r#"{"chat_template": "from the config"}"#;
        assert_eq!(template(config_only).as_deref(), Some("from the config"));
        std::fs::write(dir.path().join("chat_template.jinja"), "from the file").unwrap();
        assert_eq!(template(config_only).as_deref(), Some("from the file"));
    }

    #[test]
    fn training_and_inference_encode_a_prompt_that_writes_bos_alike() {
        // stories260k's tokenizer.json has a post-processor that adds BOS to every text:
        // inference's prompt encoding must not add a second one either.
        let Some(shared) = std::env::var_os("PEFTPIPE_SHARED") else {
            return;
        };
        let dir = std::path::Path::new(&shared).join("models/stories260k");
        let training = TextTokenizer::from_model_dir(&dir).unwrap();
        let config: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(dir.join("config.json")).unwrap())
                .unwrap();
        let generation = GenerationConfig::load(&dir, &config).unwrap();
        let inference = ModelTokenizer::load(&dir, &generation).unwrap();
        for prompt in ["<s>[INST] hi [/INST]", "[INST] hi [/INST]", "Once upon"] {
            let trained = training.encode_prompt(prompt).unwrap();
            let inferred = crate::infer::TextCodec::encode_prompt(&inference, prompt).unwrap();
            assert_eq!(trained, inferred, "{prompt}");
            assert_eq!(
                trained
                    .iter()
                    .filter(|&&id| Some(id) == training.prefix().first().copied())
                    .count(),
                1,
                "{prompt}: one BOS"
            );
        }
    }

    #[test]
    fn no_bos_rule_and_no_post_processor_means_no_prefix() {
        let dir = model_dir(serde_json::json!({}));
        let tokenizer = TextTokenizer::from_model_dir(dir.path()).unwrap();
        assert!(tokenizer.prefix().is_empty());
        assert!(tokenizer
            .encode_example("hello", "yes", true)
            .unwrap_err()
            .contains("eos_token"));
        let bad = model_dir(serde_json::json!({"eos_token": "<nope>"}));
        assert!(TextTokenizer::from_model_dir(bad.path())
            .unwrap_err()
            .contains("<nope>"));
    }
}
