//! Encoded examples and their padded batches: which tokens are context and which are scored.

use candle_core::{Device, Result, Tensor};

/// One token sequence whose tokens from `scored_from` on are scored (each predicted from all
/// tokens before it); the tokens before `scored_from` are context only (the prompt).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Example {
    pub ids: Vec<u32>,
    pub scored_from: usize,
}

/// What [`Example::fit`] had to cut.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Truncation {
    /// Context tokens dropped from the left of the prompt.
    pub prompt_tokens: usize,
    /// Scored tokens dropped from the right (only when the completion alone is too long).
    pub scored_tokens: usize,
}

impl Truncation {
    pub fn any(&self) -> bool {
        self.prompt_tokens > 0 || self.scored_tokens > 0
    }
}

impl Example {
    /// A prompt followed by a scored completion.
    pub fn from_parts(prompt: &[u32], completion: &[u32]) -> Self {
        let mut ids = Vec::with_capacity(prompt.len() + completion.len());
        ids.extend_from_slice(prompt);
        ids.extend_from_slice(completion);
        Example {
            ids,
            scored_from: prompt.len(),
        }
    }

    /// Number of scored tokens (the first token of a sequence cannot be predicted, so a
    /// `scored_from` of 0 scores from position 1).
    pub fn scored_tokens(&self) -> usize {
        self.ids.len().saturating_sub(self.scored_from.max(1))
    }

    /// Make the example at most `max_length` tokens long: drop prompt tokens from the left (after
    /// the first `keep_first` tokens, e.g. 1 to keep BOS), and only if the completion alone does
    /// not fit, drop scored tokens from the right.
    pub fn fit(&mut self, max_length: usize, keep_first: usize) -> Truncation {
        let mut truncation = Truncation::default();
        if self.ids.len() <= max_length {
            return truncation;
        }
        let keep = keep_first.min(self.scored_from);
        let excess = self.ids.len() - max_length;
        // The prompt must keep at least one token so the first completion token has context.
        let droppable = self.scored_from.saturating_sub(keep.max(1));
        let drop = excess.min(droppable);
        if drop > 0 {
            self.ids.drain(keep..keep + drop);
            self.scored_from -= drop;
            truncation.prompt_tokens = drop;
        }
        if self.ids.len() > max_length {
            truncation.scored_tokens = self.ids.len() - max_length;
            self.ids.truncate(max_length);
        }
        truncation
    }
}

/// A right-padded batch of examples, ready for one forward pass.
#[derive(Debug)]
pub struct Batch {
    /// `[batch, time]` u32 token ids (padding: `pad_id`).
    pub input_ids: Tensor,
    /// `[batch, time]` u32, 1 for tokens and 0 for padding.
    pub attention_mask: Tensor,
    /// `[batch, time]` u32: the token each position predicts (the next token; 0 where none).
    pub targets: Tensor,
    /// Per example and position: whether the prediction at that position is scored.
    pub scored: Vec<Vec<bool>>,
}

impl Batch {
    /// Pad `examples` to the longest one. Errors when `examples` is empty or has an empty
    /// sequence.
    pub fn new(examples: &[&Example], pad_id: u32, device: &Device) -> Result<Self> {
        let time = examples.iter().map(|e| e.ids.len()).max().unwrap_or(0);
        if examples.is_empty() || time == 0 {
            candle_core::bail!("cannot batch an empty set of examples or an empty sequence")
        }
        let count = examples.len();
        let mut ids = vec![pad_id; count * time];
        let mut mask = vec![0u32; count * time];
        let mut targets = vec![0u32; count * time];
        let mut scored = Vec::with_capacity(count);
        for (row, example) in examples.iter().enumerate() {
            let base = row * time;
            let length = example.ids.len();
            ids[base..base + length].copy_from_slice(&example.ids);
            mask[base..base + length].fill(1);
            let mut row_scored = vec![false; time];
            for position in 0..length.saturating_sub(1) {
                targets[base + position] = example.ids[position + 1];
                row_scored[position] = position + 1 >= example.scored_from.max(1);
            }
            scored.push(row_scored);
        }
        Ok(Batch {
            input_ids: Tensor::from_vec(ids, (count, time), device)?,
            attention_mask: Tensor::from_vec(mask, (count, time), device)?,
            targets: Tensor::from_vec(targets, (count, time), device)?,
            scored,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn targets_are_the_next_tokens_and_only_completion_positions_are_scored() {
        let a = Example::from_parts(&[1, 5, 6], &[7, 2]);
        let b = Example::from_parts(&[1, 9], &[4]);
        let batch = Batch::new(&[&a, &b], 0, &Device::Cpu).unwrap();
        assert_eq!(
            batch.input_ids.to_vec2::<u32>().unwrap(),
            [[1, 5, 6, 7, 2], [1, 9, 4, 0, 0]]
        );
        assert_eq!(
            batch.attention_mask.to_vec2::<u32>().unwrap(),
            [[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]]
        );
        assert_eq!(
            batch.targets.to_vec2::<u32>().unwrap(),
            [[5, 6, 7, 2, 0], [9, 4, 0, 0, 0]]
        );
        // Position 2 predicts token 7 (the first completion token), position 3 predicts 2.
        assert_eq!(batch.scored[0], [false, false, true, true, false]);
        assert_eq!(batch.scored[1], [false, true, false, false, false]);
        assert_eq!(a.scored_tokens(), 2);
        assert_eq!(b.scored_tokens(), 1);
    }

    #[test]
    fn fit_drops_prompt_tokens_after_bos_first() {
        let mut example = Example::from_parts(&[1, 10, 11, 12, 13], &[20, 21]);
        let cut = example.fit(5, 1);
        assert_eq!(example.ids, [1, 12, 13, 20, 21]);
        assert_eq!(example.scored_from, 3);
        assert_eq!(
            cut,
            Truncation {
                prompt_tokens: 2,
                scored_tokens: 0
            }
        );
    }

    #[test]
    fn fit_cuts_the_completion_only_when_it_alone_is_too_long() {
        let mut example = Example::from_parts(&[1, 10], &[20, 21, 22, 23]);
        let cut = example.fit(3, 1);
        // BOS is kept (it is the minimum context), the other prompt token goes, and then the
        // completion is cut on the right.
        assert_eq!(example.ids, [1, 20, 21]);
        assert_eq!(example.scored_from, 1);
        assert_eq!(cut.prompt_tokens, 1);
        assert_eq!(cut.scored_tokens, 2);
        assert!(cut.any());
        let mut fits = Example::from_parts(&[1], &[2]);
        assert!(!fits.fit(8, 1).any());
    }
}
