//! Text ↔ token ids for inference: the [`TextCodec`] view of a tokenizer (implemented for the
//! models' `ModelTokenizer` in `model.rs`) and how a (prompt, completion) pair becomes a scored
//! [`TokenizedExample`] (training's form).

use crate::data::tokenize::TokenizedExample;

/// What inference needs from a tokenizer: the same prompt / completion split training uses
/// (the prompt with the tokenizer's leading special tokens, the completion as plain tokens).
pub trait TextCodec {
    /// Leading special tokens (BOS) + the prompt's tokens.
    fn encode_prompt(&self, text: &str) -> Result<Vec<u32>, String>;
    /// Plain tokens of a continuation (no special tokens).
    fn encode_continuation(&self, text: &str) -> Result<Vec<u32>, String>;
    /// Text of `ids`, special tokens skipped.
    fn decode(&self, ids: &[u32]) -> Result<String, String>;
    /// Token ids that end generation (any of them stops it).
    fn eos_token_ids(&self) -> &[u32];
    /// The EOS training appends to a completion (the tokenizer's `eos_token`); by default the
    /// first stop id.
    fn appended_eos_token_id(&self) -> Option<u32> {
        self.eos_token_ids().first().copied()
    }
    /// Id used to pad batches (never scored, masked out of attention).
    fn pad_token_id(&self) -> u32;
}

/// Encode a prompt followed by a completion whose tokens are scored, the way training encodes
/// it: the prompt on its own, the completion as the whole text's tokens after the prompt's
/// (`data::tokenize::continuation_ids`); with `append_eos`, the EOS training appends
/// ([`TextCodec::appended_eos_token_id`]) follows the completion and is scored too.
pub fn encode_pair(
    codec: &dyn TextCodec,
    prompt: &str,
    completion: &str,
    append_eos: bool,
) -> Result<TokenizedExample, String> {
    let prompt_ids = codec.encode_prompt(prompt)?;
    let mut completion_ids = crate::data::tokenize::continuation_ids(
        &codec.encode_continuation(prompt)?,
        &codec.encode_continuation(&format!("{prompt}{completion}"))?,
        || codec.encode_continuation(completion),
    )?;
    // A completion that already ends with an EOS token (a chat template's end of turn written
    // as text) gets no second one, as training encodes it.
    let appended = codec.appended_eos_token_id();
    let ended = appended.is_some() && completion_ids.last() == appended.as_ref();
    if append_eos && !ended {
        let eos = appended.ok_or("the tokenizer declares no EOS token to append")?;
        completion_ids.push(eos);
    }
    Ok(TokenizedExample {
        prompt: prompt_ids,
        completion: completion_ids,
    })
}

/// The text `ids` add after `prompt_ids`: decoded together and the prompt's text cut off, so a
/// leading space that tokenizers drop when decoding a sequence on its own is kept.
pub fn decode_continuation(
    codec: &dyn TextCodec,
    prompt_ids: &[u32],
    ids: &[u32],
) -> Result<String, String> {
    let prompt = codec.decode(prompt_ids)?;
    let mut all = prompt_ids.to_vec();
    all.extend_from_slice(ids);
    let full = codec.decode(&all)?;
    match full.strip_prefix(&prompt) {
        Some(rest) => Ok(rest.to_string()),
        None => codec.decode(ids),
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// One token per character: `a` = 3, `b` = 4, ...; BOS 1, EOS 2 (written `$`, as a chat
    /// template writes its end-of-turn token) — enough for hand-made cases.
    pub struct LetterCodec;

    impl TextCodec for LetterCodec {
        fn encode_prompt(&self, text: &str) -> Result<Vec<u32>, String> {
            let mut ids = vec![1];
            ids.extend(self.encode_continuation(text)?);
            Ok(ids)
        }

        fn encode_continuation(&self, text: &str) -> Result<Vec<u32>, String> {
            text.chars()
                .map(|c| {
                    if c.is_ascii_lowercase() {
                        Ok(u32::from(c as u8 - b'a') + 3)
                    } else if c == '$' {
                        Ok(2)
                    } else {
                        Err(format!("LetterCodec cannot encode {c:?}"))
                    }
                })
                .collect()
        }

        fn decode(&self, ids: &[u32]) -> Result<String, String> {
            Ok(ids
                .iter()
                .filter(|&&id| id >= 3)
                .map(|&id| char::from(b'a' + (id - 3) as u8))
                .collect())
        }

        fn eos_token_ids(&self) -> &[u32] {
            &[2]
        }

        fn pad_token_id(&self) -> u32 {
            0
        }
    }

    #[test]
    fn a_completion_that_already_ends_the_sequence_gets_no_second_eos() {
        let mut codec_ids = encode_pair(&LetterCodec, "ab", "c", true)
            .unwrap()
            .completion;
        assert_eq!(codec_ids, [5, 2]);
        // `c` then the EOS a chat template wrote as text (here: id 2 by hand).
        struct EndingCodec;
        impl TextCodec for EndingCodec {
            fn encode_prompt(&self, text: &str) -> Result<Vec<u32>, String> {
                LetterCodec.encode_prompt(text)
            }
            fn encode_continuation(&self, text: &str) -> Result<Vec<u32>, String> {
                let mut ids = LetterCodec.encode_continuation(text)?;
                ids.push(2);
                Ok(ids)
            }
            fn decode(&self, ids: &[u32]) -> Result<String, String> {
                LetterCodec.decode(ids)
            }
            fn eos_token_ids(&self) -> &[u32] {
                &[2]
            }
            fn pad_token_id(&self) -> u32 {
                0
            }
        }
        codec_ids = encode_pair(&EndingCodec, "ab", "c", true)
            .unwrap()
            .completion;
        assert_eq!(codec_ids, [5, 2]);
    }

    #[test]
    fn the_completion_is_scored_and_eos_appended() {
        let example = encode_pair(&LetterCodec, "ab", "c", true).unwrap();
        assert_eq!(example.prompt, [1, 3, 4]);
        assert_eq!(example.completion, [5, 2]);
        let example = encode_pair(&LetterCodec, "ab", "c", false).unwrap();
        assert_eq!(example.completion, [5]);
    }
}
