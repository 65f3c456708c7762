//! Our models and tokenizers as inference sees them: [`HookedModel`] (a [`CausalLm`] with its PEFT
//! hooks) implements [`LanguageModel`], [`ModelTokenizer`] implements [`TextCodec`].

use candle_core::{Device, Result, Tensor};

use super::{LanguageModel, TextCodec};
use crate::models::{CausalLm, Hooks, KvCache, ModelTokenizer};

/// A model with the hooks of its adapter (none for the base model or LoRA).
pub struct HookedModel<'a> {
    pub model: &'a dyn CausalLm,
    pub hooks: &'a Hooks,
}

impl HookedModel<'_> {
    /// Drop the logits of prompt-tuning virtual tokens (they lead the sequence). The rest is
    /// made contiguous: scoring gathers from it, and candle's gather refuses a strided view
    /// (evaluating a prompt-tuning adapter failed with "gather only supports contiguous
    /// tensors").
    fn without_virtual(&self, logits: Tensor, length: usize) -> Result<Tensor> {
        let total = logits.dim(1)?;
        if total > length {
            logits.narrow(1, total - length, length)?.contiguous()
        } else {
            Ok(logits)
        }
    }
}

impl LanguageModel for HookedModel<'_> {
    type Cache = KvCache;

    fn device(&self) -> &Device {
        self.model.device()
    }

    fn logits(&self, input_ids: &Tensor, attention_mask: &Tensor) -> Result<Tensor> {
        let length = input_ids.dim(1)?;
        let logits = self
            .model
            .forward(input_ids, Some(attention_mask), self.hooks)?;
        self.without_virtual(logits, length)
    }

    fn new_cache(&self) -> Result<KvCache> {
        Ok(self.model.new_cache())
    }

    fn forward_cached(
        &self,
        input_ids: &Tensor,
        attention_mask: Option<&Tensor>,
        cache: &mut KvCache,
    ) -> Result<Tensor> {
        let length = input_ids.dim(1)?;
        let logits = self
            .model
            .forward_cached(input_ids, attention_mask, self.hooks, cache)?;
        self.without_virtual(logits, length)
    }

    fn keep_rows(&self, cache: &mut KvCache, rows: &[usize]) -> Result<()> {
        cache.keep_rows(rows)
    }
}

impl TextCodec for ModelTokenizer {
    fn encode_prompt(&self, text: &str) -> std::result::Result<Vec<u32>, String> {
        let mut ids = self.encode(text, true).map_err(|e| e.to_string())?;
        // A text that begins with the BOS token itself (a chat template writes `bos_token`)
        // keeps no second one from the post-processor, which adds exactly one: as training
        // encodes it.
        if let Some(bos) = self.bos_token_id.filter(|_| self.add_bos_token) {
            if ids.starts_with(&[bos, bos]) {
                ids.remove(0);
            }
        }
        // A prompt never ends the sequence, even when the tokenizer adds EOS to every text.
        if self.add_eos_token
            && self.eos_token_id.is_some()
            && ids.last() == self.eos_token_id.as_ref()
        {
            ids.pop();
        }
        Ok(ids)
    }

    fn encode_continuation(&self, text: &str) -> std::result::Result<Vec<u32>, String> {
        self.encode(text, false).map_err(|e| e.to_string())
    }

    fn decode(&self, ids: &[u32]) -> std::result::Result<String, String> {
        ModelTokenizer::decode(self, ids, true).map_err(|e| e.to_string())
    }

    fn eos_token_ids(&self) -> &[u32] {
        &self.eos_token_ids
    }

    fn appended_eos_token_id(&self) -> Option<u32> {
        self.eos_token_id
    }

    fn pad_token_id(&self) -> u32 {
        self.pad_token_id.or(self.eos_token_id).unwrap_or(0)
    }
}
