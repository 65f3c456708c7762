//! Token-by-token generation with the model's KV cache, for one prompt or a batch: the prompts
//! are fed once (left-padded and masked in a batch), then one token per unfinished row per step,
//! until EOS, the token budget, the model's context length or a caller's stop test.

use candle_core::{DType, Device, IndexOp, Tensor};
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
    check_prompt(prompt_ids, settings).map_err(candle_core::Error::msg)?;
    let mut outputs = generate_batch(model, &[prompt_ids], settings, |_, tokens| {
        stop_after(tokens)
    })?;
    match outputs.pop() {
        Some(generated) if outputs.is_empty() => Ok(generated),
        _ => candle_core::bail!("batched generation of one prompt returned another count"),
    }
}

/// Why `prompt_ids` cannot be generated from with `settings`: it is empty, or it leaves no room
/// in the model's context.
pub fn check_prompt(prompt_ids: &[u32], settings: &GenerationSettings) -> Result<(), String> {
    if prompt_ids.is_empty() {
        return Err("cannot generate from an empty prompt (no tokens, not even BOS)".to_string());
    }
    if let Some(max_length) = settings.max_length {
        if prompt_ids.len() >= max_length {
            return Err(format!(
                "the prompt has {} tokens, the model's context length is {max_length}: no room to generate",
                prompt_ids.len()
            ));
        }
    }
    Ok(())
}

/// Generate a continuation of every prompt of a batch at once: the prompts are left-padded to
/// the longest (the padding masked out; position ids count real tokens only), then each step
/// feeds one token per unfinished row through one forward pass with the KV cache. A row ends on
/// its own (EOS, its budget, the context length, `stop_after(row, tokens)`) and leaves the
/// batch, so the cache shrinks as rows finish. Each row has its own sampler seeded as
/// [`generate`] seeds it, so every prompt gets the tokens it would get alone (up to the
/// floating-point differences of batched matrix products; greedy decoding is identical in
/// practice and tested). Outputs are in prompt order.
pub fn generate_batch<M: LanguageModel, P: AsRef<[u32]>>(
    model: &M,
    prompts: &[P],
    settings: &GenerationSettings,
    mut stop_after: impl FnMut(usize, &[u32]) -> bool,
) -> candle_core::Result<Vec<Generated>> {
    for (row, prompt) in prompts.iter().enumerate() {
        check_prompt(prompt.as_ref(), settings)
            .map_err(|message| candle_core::Error::msg(format!("prompt {}: {message}", row + 1)))?;
    }
    settings
        .sampling
        .validate()
        .map_err(candle_core::Error::msg)?;
    let mut outputs: Vec<Option<Generated>> = vec![None; prompts.len()];
    if prompts.is_empty() || settings.max_new_tokens == 0 {
        return Ok(prompts
            .iter()
            .map(|_| Generated {
                token_ids: Vec::new(),
                stop_reason: StopReason::MaxNewTokens,
            })
            .collect());
    }
    let mut samplers: Vec<Sampler> = prompts
        .iter()
        .map(|_| Sampler::new(settings.sampling))
        .collect();
    let mut tokens: Vec<Vec<u32>> = vec![Vec::new(); prompts.len()];
    let device = model.device();
    let longest = prompts.iter().map(|p| p.as_ref().len()).max().unwrap_or(0);
    let mut ids = Vec::with_capacity(prompts.len() * longest);
    let mut mask = Vec::with_capacity(prompts.len() * longest);
    for prompt in prompts {
        let prompt = prompt.as_ref();
        let padding = longest - prompt.len();
        // Padding takes the row's first token: an id the model surely has (it is masked out).
        ids.extend(std::iter::repeat_n(prompt[0], padding));
        ids.extend_from_slice(prompt);
        mask.extend(std::iter::repeat_n(0u32, padding));
        mask.extend(std::iter::repeat_n(1u32, prompt.len()));
    }
    let rows = prompts.len();
    let mut input = Tensor::from_vec(ids, (rows, longest), device)?;
    // On the host, where the model's plan reads it (no read-back from the GPU).
    let mut input_mask = Some(Tensor::from_vec(mask, (rows, longest), &Device::Cpu)?);
    // The rows still generating, in the order of the cache's rows.
    let mut active: Vec<usize> = (0..rows).collect();
    let mut cache = model.new_cache()?;
    loop {
        let logits = model.forward_cached(&input, input_mask.as_ref(), &mut cache)?;
        let time = logits.dim(1)?;
        let last: Vec<Vec<f32>> = logits.i((.., time - 1))?.to_dtype(DType::F32)?.to_vec2()?;
        let mut kept = Vec::with_capacity(active.len());
        let mut next_ids = Vec::with_capacity(active.len());
        for (slot, &row) in active.iter().enumerate() {
            let next = samplers[row].next(&last[slot]).map_err(|message| {
                candle_core::Error::msg(format!("prompt {}: {message}", row + 1))
            })?;
            let stop = step(
                &mut tokens[row],
                next,
                prompts[row].as_ref().len(),
                settings,
                |tokens| stop_after(row, tokens),
            );
            match stop {
                Some(stop_reason) => {
                    outputs[row] = Some(Generated {
                        token_ids: std::mem::take(&mut tokens[row]),
                        stop_reason,
                    })
                }
                None => {
                    kept.push(slot);
                    next_ids.push(next);
                }
            }
        }
        if kept.is_empty() {
            break;
        }
        if kept.len() < active.len() {
            model.keep_rows(&mut cache, &kept)?;
            active = kept.iter().map(|&slot| active[slot]).collect();
        }
        input = Tensor::from_vec(next_ids, (active.len(), 1), device)?;
        input_mask = None;
    }
    outputs
        .into_iter()
        .map(|output| {
            output.ok_or_else(|| candle_core::Error::msg("a prompt of the batch never finished"))
        })
        .collect()
}

/// Take `next` into one row's `tokens`; `Some(reason)` when the row is finished. The order of the
/// tests is the contract: EOS (not kept), the caller's stop test, the budget, the context length.
fn step(
    tokens: &mut Vec<u32>,
    next: u32,
    prompt_length: usize,
    settings: &GenerationSettings,
    stop_after: impl FnOnce(&[u32]) -> bool,
) -> Option<StopReason> {
    if settings.eos_token_ids.contains(&next) {
        return Some(StopReason::Eos);
    }
    tokens.push(next);
    if stop_after(tokens) {
        return Some(StopReason::StopCondition);
    }
    if tokens.len() >= settings.max_new_tokens {
        return Some(StopReason::MaxNewTokens);
    }
    if let Some(max_length) = settings.max_length {
        if prompt_length + tokens.len() >= max_length {
            return Some(StopReason::MaxLength);
        }
    }
    None
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
        let error = generate_batch(&model, &[vec![0], vec![]], &greedy(3, &[]), |_, _| false)
            .unwrap_err()
            .to_string();
        assert!(
            error.contains("prompt 2: cannot generate from an empty prompt"),
            "{error}"
        );
    }

    #[test]
    fn a_batch_gives_each_prompt_what_it_gets_alone() {
        let model = bigram();
        // Different lengths (left padding), rows ending at EOS, at their stop test, at the budget
        // and at the context length, at different steps.
        // Chain 0→2→3→1(EOS)→0.
        let prompts = [vec![0], vec![3, 3, 2], vec![0; 6], vec![2], vec![3]];
        let mut settings = greedy(2, &[1]);
        settings.max_length = Some(7);
        let stop = |row: usize, tokens: &[u32]| row == 3 && tokens.len() == 1;
        let batched = generate_batch(&model, &prompts, &settings, stop).unwrap();
        let reasons: Vec<StopReason> = batched.iter().map(|g| g.stop_reason).collect();
        assert_eq!(
            reasons,
            [
                StopReason::MaxNewTokens,
                StopReason::Eos,
                StopReason::MaxLength,
                StopReason::StopCondition,
                StopReason::Eos
            ]
        );
        let tokens: Vec<&[u32]> = batched.iter().map(|g| g.token_ids.as_slice()).collect();
        assert_eq!(tokens, [&[2, 3][..], &[3], &[2], &[3], &[]]);
        for (row, (prompt, together)) in prompts.iter().zip(&batched).enumerate() {
            let alone = generate(&model, prompt, &settings, |tokens| stop(row, tokens)).unwrap();
            assert_eq!(together, &alone, "row {row}");
        }
        // Seeded sampling: each row samples with its own stream, as alone.
        let sampled = GenerationSettings {
            sampling: Sampling::Random {
                temperature: 1.5,
                top_p: 1.0,
                seed: 11,
            },
            ..greedy(12, &[])
        };
        let batched = generate_batch(&model, &prompts, &sampled, |_, _| false).unwrap();
        for (prompt, together) in prompts.iter().zip(&batched) {
            assert_eq!(
                together,
                &generate(&model, prompt, &sampled, |_| false).unwrap()
            );
        }
        assert!(
            generate_batch::<_, Vec<u32>>(&model, &[], &sampled, |_, _| false)
                .unwrap()
                .is_empty()
        );
    }
}
