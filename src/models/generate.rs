//! Greedy decoding for a batch of prompts, with or without the KV cache.
//!
//! Owns the generation loop (left padding for batches, stop tokens, max new tokens). Sampling is
//! out of scope (candle-transformers' `LogitsProcessor` covers it if needed). Must not: tokenize or
//! decode text (callers hold the tokenizer), or build a graph (call it with untracked adapters).

use candle_core::{bail, DType, Result, Tensor, D};

use super::{CausalLm, Hooks};

/// How to decode.
#[derive(Debug, Clone)]
pub struct GreedyOptions {
    pub max_new_tokens: usize,
    /// Generation of a row ends at the first of these (the stop token is not returned).
    pub stop_token_ids: Vec<u32>,
    /// Incremental decoding with the KV cache (otherwise each step reruns the whole sequence).
    pub use_cache: bool,
    /// Id used for left padding of shorter prompts (masked out; any valid id works).
    pub pad_token_id: u32,
}

/// One row's generated continuation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Generated {
    /// New tokens (the prompt and the stop token excluded).
    pub tokens: Vec<u32>,
    /// Whether a stop token ended it (otherwise `max_new_tokens` did).
    pub stopped: bool,
}

fn last_position_argmax(logits: &Tensor) -> Result<Vec<u32>> {
    let length = logits.dim(1)?;
    logits
        .narrow(1, length - 1, 1)?
        .squeeze(1)?
        .to_dtype(DType::F32)?
        .argmax(D::Minus1)?
        .to_vec1::<u32>()
}

/// Greedy continuation of each prompt (token ids, e.g. with BOS). Prompts of different lengths are
/// left-padded; position ids come from the mask, so every row decodes as it would alone.
pub fn greedy(
    model: &dyn CausalLm,
    prompts: &[Vec<u32>],
    hooks: &Hooks,
    options: &GreedyOptions,
) -> Result<Vec<Generated>> {
    if prompts.iter().any(Vec::is_empty) {
        bail!("greedy: every prompt needs at least one token")
    }
    let batch = prompts.len();
    if batch == 0 {
        return Ok(Vec::new());
    }
    let device = model.device();
    let longest = prompts.iter().map(Vec::len).max().unwrap_or(0);
    let mut sequences: Vec<Vec<u32>> = Vec::with_capacity(batch);
    let mut masks: Vec<Vec<u32>> = Vec::with_capacity(batch);
    for prompt in prompts {
        let padding = longest - prompt.len();
        let mut row = vec![options.pad_token_id; padding];
        row.extend(prompt);
        sequences.push(row);
        let mut mask = vec![0u32; padding];
        mask.extend(std::iter::repeat_n(1u32, prompt.len()));
        masks.push(mask);
    }
    let to_tensor = |rows: &[Vec<u32>]| -> Result<Tensor> {
        let width = rows.first().map_or(0, Vec::len);
        Tensor::from_vec(rows.concat(), (rows.len(), width), device)
    };

    let mut results: Vec<Generated> = vec![
        Generated {
            tokens: Vec::new(),
            stopped: false,
        };
        batch
    ];
    let mut cache = options.use_cache.then(|| model.new_cache());
    let mut next = if let Some(cache) = cache.as_mut() {
        let logits = model.forward_cached(
            &to_tensor(&sequences)?,
            Some(&to_tensor(&masks)?),
            hooks,
            cache,
        )?;
        last_position_argmax(&logits)?
    } else {
        let logits = model.forward(&to_tensor(&sequences)?, Some(&to_tensor(&masks)?), hooks)?;
        last_position_argmax(&logits)?
    };
    for _ in 0..options.max_new_tokens {
        for (row, &token) in results.iter_mut().zip(&next) {
            if row.stopped || row.tokens.len() >= options.max_new_tokens {
                continue;
            }
            if options.stop_token_ids.contains(&token) {
                row.stopped = true;
            } else {
                row.tokens.push(token);
            }
        }
        let done = results
            .iter()
            .all(|row| row.stopped || row.tokens.len() >= options.max_new_tokens);
        if done {
            break;
        }
        // Every row takes a step (finished rows too, their tokens are ignored): shapes stay equal.
        for ((sequence, mask), &token) in sequences.iter_mut().zip(&mut masks).zip(&next) {
            sequence.push(token);
            mask.push(1);
        }
        next = if let Some(cache) = cache.as_mut() {
            let step: Vec<Vec<u32>> = next.iter().map(|&token| vec![token]).collect();
            let ones = vec![vec![1u32]; batch];
            let logits =
                model.forward_cached(&to_tensor(&step)?, Some(&to_tensor(&ones)?), hooks, cache)?;
            last_position_argmax(&logits)?
        } else {
            let logits =
                model.forward(&to_tensor(&sequences)?, Some(&to_tensor(&masks)?), hooks)?;
            last_position_argmax(&logits)?
        };
    }
    Ok(results)
}
