//! Text completions of many prompts (evaluate's exact match and samples): token generation through
//! [`generate_batch`], `batch_size` prompts per batch (grouped by prompt length so batches carry
//! little padding), each row ending at a stop string as well as at EOS, its budget or the context
//! length; the new tokens decoded after their prompt and cut at the first stop string. Every
//! prompt gets the text it gets alone ([`generate_batch`]'s contract), in prompt order.

use super::generate::{generate_batch, GenerationSettings, StopReason};
use super::text::decode_continuation;
use super::{LanguageModel, TextCodec};

/// One prompt's completion.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Completion {
    /// The generated text after the prompt (special tokens skipped), cut before the first stop
    /// string.
    pub text: String,
    pub stop_reason: StopReason,
}

/// Complete every prompt (token ids, BOS included), `batch_size` at a time, stopping a row once
/// its text contains one of `stop`. `after_batch(done)` runs after each batch with the number of
/// prompts completed so far; an error from it (e.g. cancellation) stops. Completions come back in
/// prompt order.
pub fn complete_prompts<M, E>(
    model: &M,
    codec: &dyn TextCodec,
    prompts: &[Vec<u32>],
    settings: &GenerationSettings,
    stop: &[String],
    batch_size: usize,
    mut after_batch: impl FnMut(usize) -> Result<(), E>,
) -> Result<Vec<Completion>, E>
where
    M: LanguageModel,
    E: From<candle_core::Error>,
{
    let mut order: Vec<usize> = (0..prompts.len()).collect();
    order.sort_by_key(|&index| prompts[index].len());
    let mut completions: Vec<Option<Completion>> = vec![None; prompts.len()];
    let mut done = 0;
    for chunk in order.chunks(batch_size.max(1)) {
        let batch: Vec<&[u32]> = chunk
            .iter()
            .map(|&index| prompts[index].as_slice())
            .collect();
        let mut decode_error = None;
        let generated = generate_batch(model, &batch, settings, |row, tokens| {
            if stop.is_empty() || decode_error.is_some() {
                return decode_error.is_some();
            }
            match decode_continuation(codec, batch[row], tokens) {
                Ok(text) => stop.iter().any(|s| text.contains(s.as_str())),
                Err(error) => {
                    decode_error = Some(format!("prompt {}: {error}", chunk[row] + 1));
                    true
                }
            }
        })?;
        if let Some(error) = decode_error {
            return Err(candle_core::Error::msg(error).into());
        }
        for ((&index, prompt), generated) in chunk.iter().zip(&batch).zip(generated) {
            let mut text =
                decode_continuation(codec, prompt, &generated.token_ids).map_err(|error| {
                    candle_core::Error::msg(format!("prompt {}: {error}", index + 1))
                })?;
            cut_at_first_stop(&mut text, stop);
            completions[index] = Some(Completion {
                text,
                stop_reason: generated.stop_reason,
            });
        }
        done += chunk.len();
        after_batch(done)?;
    }
    completions
        .into_iter()
        .map(|completion| {
            completion.ok_or_else(|| candle_core::Error::msg("a prompt was never completed").into())
        })
        .collect()
}

/// Cut `text` before the first occurrence of any `stop` string (a generation, and the reference
/// exact match compares it with, so both end alike).
pub fn cut_at_first_stop(text: &mut String, stop: &[String]) {
    if let Some(cut) = stop.iter().filter_map(|s| text.find(s.as_str())).min() {
        text.truncate(cut);
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn a_text_is_cut_before_its_first_stop_string() {
        let stop = vec![".".to_string(), " She".to_string()];
        let mut text = " Lily. She ran".to_string();
        super::cut_at_first_stop(&mut text, &stop);
        assert_eq!(text, " Lily");
        let mut text = " She said hi.".to_string();
        super::cut_at_first_stop(&mut text, &stop);
        assert_eq!(text, "");
        let mut text = " no stop here".to_string();
        super::cut_at_first_stop(&mut text, &[]);
        assert_eq!(text, " no stop here");
    }

    use super::*;
    use crate::infer::generate::generate;
    use crate::infer::sample::Sampling;
    use crate::infer::score::tests::BigramModel;
    use crate::infer::text::tests::LetterCodec;

    /// LetterCodec's ids: 1 BOS, 2 EOS, 3 `a`, 4 `b`, 5 `c`, 6 `d`. Greedy chains: a → b → c → d →
    /// EOS, and BOS → a.
    fn chain() -> BigramModel {
        let mut table = vec![vec![0.0f32; 7]; 7];
        table[1][3] = 4.0;
        table[3][4] = 4.0;
        table[4][5] = 4.0;
        table[5][6] = 4.0;
        table[6][2] = 4.0;
        BigramModel {
            table,
            device: candle_core::Device::Cpu,
        }
    }

    fn greedy(max_new_tokens: usize) -> GenerationSettings {
        GenerationSettings {
            max_new_tokens,
            sampling: Sampling::Greedy,
            eos_token_ids: vec![2],
            max_length: Some(16),
        }
    }

    /// What one prompt gets alone: `generate`, decoded, cut at the first stop string.
    fn alone(prompt: &[u32], settings: &GenerationSettings, stop: &[String]) -> Completion {
        let generated = generate(&chain(), prompt, settings, |tokens| {
            let text = LetterCodec.decode(tokens).unwrap();
            stop.iter().any(|s| text.contains(s.as_str()))
        })
        .unwrap();
        let mut text = LetterCodec.decode(&generated.token_ids).unwrap();
        if let Some(cut) = stop.iter().filter_map(|s| text.find(s.as_str())).min() {
            text.truncate(cut);
        }
        Completion {
            text,
            stop_reason: generated.stop_reason,
        }
    }

    #[test]
    fn batches_give_each_prompt_its_own_completion_in_prompt_order() {
        let model = chain();
        // Prompts of different lengths (grouped by length into batches), ending at EOS, at the
        // budget and at a stop string.
        let prompts = [
            vec![1, 3],
            vec![1, 5, 5, 5, 6],
            vec![1],
            vec![1, 4],
            vec![1, 5, 5],
        ];
        let stop = vec!["d".to_string()];
        let settings = greedy(3);
        for batch_size in [1, 2, 3, 5, 8] {
            let mut reported = Vec::new();
            let completions = complete_prompts(
                &model,
                &LetterCodec,
                &prompts,
                &settings,
                &stop,
                batch_size,
                |done| {
                    reported.push(done);
                    Ok::<_, candle_core::Error>(())
                },
            )
            .unwrap();
            let expected: Vec<Completion> = prompts
                .iter()
                .map(|prompt| alone(prompt, &settings, &stop))
                .collect();
            assert_eq!(completions, expected, "batch_size {batch_size}");
            let batches = prompts.len().div_ceil(batch_size);
            let counts: Vec<usize> = (1..=batches)
                .map(|batch| (batch * batch_size).min(prompts.len()))
                .collect();
            assert_eq!(reported, counts, "batch_size {batch_size}");
        }
        // What the cases are: `a` → b c, then d (the stop string, cut); `d` → EOS; BOS → a b c
        // (the budget); `b` → c, d cut; `c` → d, cut.
        let completions =
            complete_prompts(&model, &LetterCodec, &prompts, &settings, &stop, 2, |_| {
                Ok::<_, candle_core::Error>(())
            })
            .unwrap();
        let texts: Vec<&str> = completions.iter().map(|c| c.text.as_str()).collect();
        assert_eq!(texts, ["bc", "", "abc", "c", ""]);
        let reasons: Vec<StopReason> = completions.iter().map(|c| c.stop_reason).collect();
        assert_eq!(
            reasons,
            [
                StopReason::StopCondition,
                StopReason::Eos,
                StopReason::MaxNewTokens,
                StopReason::StopCondition,
                StopReason::StopCondition
            ]
        );
    }

    #[test]
    fn an_error_of_the_callback_stops_and_is_returned() {
        let prompts = [vec![1], vec![1, 3], vec![1, 4]];
        let mut calls = 0;
        let error = complete_prompts(&chain(), &LetterCodec, &prompts, &greedy(2), &[], 1, |_| {
            calls += 1;
            Err(candle_core::Error::msg("cancelled"))
        })
        .unwrap_err();
        assert_eq!(calls, 1);
        assert!(error.to_string().contains("cancelled"), "{error}");
    }
}
