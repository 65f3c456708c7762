//! Token-by-token generation with the model's KV cache: the prompt is fed once, then one token
//! per step, until EOS, the token budget, the model's context length or a caller's stop test.

use candle_core::{DType, IndexOp, Tensor};
use serde::Serialize;

use super::sample::{Sampler, Sampling};
use super::LanguageModel;

/// How to generate.
#[derive(Debug, Clone, PartialEq)]
pub struct GenerationSettings {
    /// Most tokens to generate.
    pub max_new_tokens: usize,
    pub sampling: Sampling,
    /// Tokens that end the generation (they are not part of the output).
    pub eos_token_ids: Vec<u32>,
    /// Longest total sequence (prompt + generated) the model accepts; None: no limit.
    pub max_length: Option<usize>,
}

/// Why generation ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum StopReason {
    /// The model produced an end-of-sequence token.
    Eos,
    /// `max_new_tokens` were generated.
    MaxNewTokens,
    /// The sequence reached the model's context length.
    MaxLength,
    /// The caller's stop test matched (e.g. a stop string).
    StopCondition,
}

/// The generated continuation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Generated {
    /// New tokens, without the prompt and without the final EOS.
    pub token_ids: Vec<u32>,
    pub stop_reason: StopReason,
}

/// Generate a continuation of `prompt_ids`. `stop_after(tokens)` is asked after each new token
/// (EOS excluded) and ends generation when it returns true.
pub fn generate<M: LanguageModel>(
    model: &M,
    prompt_ids: &[u32],
    settings: &GenerationSettings,
    mut stop_after: impl FnMut(&[u32]) -> bool,
) -> candle_core::Result<Generated> {
    if prompt_ids.is_empty() {
        candle_core::bail!("cannot generate from an empty prompt (no tokens, not even BOS)")
    }
    if let Some(max_length) = settings.max_length {
        if prompt_ids.len() >= max_length {
            candle_core::bail!(
                "the prompt has {} tokens, the model's context length is {max_length}: no room to generate",
                prompt_ids.len()
            )
        }
    }
    settings
        .sampling
        .validate()
        .map_err(candle_core::Error::msg)?;
    let mut sampler = Sampler::new(settings.sampling);
    let mut cache = model.new_cache()?;
    let mut token_ids = Vec::new();
    if settings.max_new_tokens == 0 {
        return Ok(Generated {
            token_ids,
            stop_reason: StopReason::MaxNewTokens,
        });
    }
    let device = model.device();
    let mut input = Tensor::from_slice(prompt_ids, (1, prompt_ids.len()), device)?;
    loop {
        let logits = model.forward_cached(&input, &mut cache)?;
        let time = logits.dim(1)?;
        let last: Vec<f32> = logits.i((0, time - 1))?.to_dtype(DType::F32)?.to_vec1()?;
        let next = sampler.next(&last).map_err(candle_core::Error::msg)?;
        if settings.eos_token_ids.contains(&next) {
            return Ok(Generated {
                token_ids,
                stop_reason: StopReason::Eos,
            });
        }
        token_ids.push(next);
        if stop_after(&token_ids) {
            return Ok(Generated {
                token_ids,
                stop_reason: StopReason::StopCondition,
            });
        }
        if token_ids.len() >= settings.max_new_tokens {
            return Ok(Generated {
                token_ids,
                stop_reason: StopReason::MaxNewTokens,
            });
        }
        if let Some(max_length) = settings.max_length {
            if prompt_ids.len() + token_ids.len() >= max_length {
                return Ok(Generated {
                    token_ids,
                    stop_reason: StopReason::MaxLength,
                });
            }
        }
        input = Tensor::from_slice(&[next], (1, 1), device)?;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::infer::score::tests::bigram;

    fn greedy(max_new_tokens: usize, eos: &[u32]) -> GenerationSettings {
        GenerationSettings {
            max_new_tokens,
            sampling: Sampling::Greedy,
            eos_token_ids: eos.to_vec(),
            max_length: None,
        }
    }

    #[test]
    fn greedy_follows_the_most_likely_chain_and_stops_at_eos() {
        // Bigram argmax chain: 0→2, 2→3, 3→1, 1→0.
        let model = bigram();
        let out = generate(&model, &[0], &greedy(10, &[1]), |_| false).unwrap();
        assert_eq!(out.token_ids, [2, 3]);
        assert_eq!(out.stop_reason, StopReason::Eos);
    }

    #[test]
    fn the_token_budget_and_context_length_end_generation() {
        let model = bigram();
        let out = generate(&model, &[0], &greedy(5, &[]), |_| false).unwrap();
        assert_eq!(out.token_ids, [2, 3, 1, 0, 2]);
        assert_eq!(out.stop_reason, StopReason::MaxNewTokens);
        let mut limited = greedy(5, &[]);
        limited.max_length = Some(3);
        let out = generate(&model, &[0], &limited, |_| false).unwrap();
        assert_eq!(out.token_ids, [2, 3]);
        assert_eq!(out.stop_reason, StopReason::MaxLength);
        assert!(generate(&model, &[0, 1, 2], &limited, |_| false).is_err());
    }

    #[test]
    fn a_stop_condition_ends_generation() {
        let model = bigram();
        let out = generate(&model, &[0], &greedy(10, &[]), |tokens| tokens.contains(&1)).unwrap();
        assert_eq!(out.token_ids, [2, 3, 1]);
        assert_eq!(out.stop_reason, StopReason::StopCondition);
    }

    #[test]
    fn an_empty_prompt_is_refused() {
        let model = bigram();
        assert!(generate(&model, &[], &greedy(3, &[]), |_| false).is_err());
    }
}
