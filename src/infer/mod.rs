//! Inference without a graph: log-likelihood scoring of completions (loss, perplexity, candidate
//! scoring for accuracy) and text generation (greedy or seeded temperature / top-p sampling) with
//! the model's KV cache, stopping at EOS, one prompt or a batch at a time.
//!
//! Owns: the [`LanguageModel`] view of a causal LM that inference needs, the tensor form of
//! scoring batches (padding and masks come from `data::batch`, as in training), the scoring and
//! (batched) generation loops, text completions of many prompts cut at stop strings, the
//! samplers, and loading a model folder (with a PEFT adapter through `crate::peft`, switched to
//! inference mode) for `generate` and `evaluate`. Must not: train,
//! build autograd graphs (base weights are plain tensors; adapters in `AdapterMode::Eval` hand
//! their variables to the forward pass detached), read pipelines or Parquet, or print.

pub mod adapter_base;
pub mod batch;
pub mod completions;
pub mod generate;
pub mod jsonl;
pub mod model;
pub mod sample;
pub mod score;
pub mod session;
pub mod text;

use candle_core::{Device, Result, Tensor};

pub use batch::{joined, Batch, Sequence};
pub use completions::{complete_prompts, Completion};
pub use generate::{generate, Generated, GenerationSettings, StopReason};
pub use sample::Sampling;
pub use score::{score_examples, NllTotal, SequenceScore};
pub use text::{encode_pair, TextCodec};

/// What inference needs from a causal language model.
///
/// Implementations must not track gradients: weights are plain tensors (no `Var`), so the
/// forward passes build no autograd graph.
pub trait LanguageModel {
    /// Per-generation state (the KV cache).
    type Cache;

    /// The device the weights live on; inputs are created there.
    fn device(&self) -> &Device;

    /// Full-sequence logits `[batch, time, vocab]` for right-padded `input_ids` `[batch, time]`
    /// (u32) with `attention_mask` `[batch, time]` (u32, 1 = token, 0 = padding).
    fn logits(&self, input_ids: &Tensor, attention_mask: &Tensor) -> Result<Tensor>;

    /// A fresh, empty cache (for one sequence or a batch: the first call fixes its rows).
    fn new_cache(&self) -> Result<Self::Cache>;

    /// Feed `input_ids` `[batch, time]` after everything already in `cache`, with
    /// `attention_mask` `[batch, time]` (u32, 1 = token, 0 = padding; `None`: all tokens) so
    /// left-padded prompts of a batch decode as they would alone; returns the logits of the new
    /// positions `[batch, time, vocab]` and extends the cache.
    fn forward_cached(
        &self,
        input_ids: &Tensor,
        attention_mask: Option<&Tensor>,
        cache: &mut Self::Cache,
    ) -> Result<Tensor>;

    /// Keep only the batch rows `rows` of `cache` (in that order): finished rows leave the batch.
    fn keep_rows(&self, cache: &mut Self::Cache, rows: &[usize]) -> Result<()>;
}
