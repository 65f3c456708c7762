//! Scoring batches as tensors. The examples are training's [`Sequence`]s and the padding,
//! attention validity and completion mask come from training's collation
//! (`data::batch::collate`), so evaluation scores exactly the tokens training learns from; this
//! file only turns that host batch into the input/target tensors and per-position flags that
//! scoring needs.

use candle_core::{Device, Result, Tensor};

pub use crate::data::batch::Sequence;
use crate::data::batch::{collate, HostBatch};

/// A prompt followed by a scored completion, joined (no truncation).
pub fn joined(prompt: &[u32], completion: &[u32]) -> Sequence {
    let mut ids = Vec::with_capacity(prompt.len() + completion.len());
    ids.extend_from_slice(prompt);
    ids.extend_from_slice(completion);
    Sequence {
        ids,
        completion_start: prompt.len(),
    }
}

/// A right-padded batch of sequences, ready for one forward pass.
#[derive(Debug)]
pub struct Batch {
    /// `[batch, time]` u32 token ids (padding: `pad_id`).
    pub input_ids: Tensor,
    /// `[batch, time]` u32, 1 for tokens and 0 for padding; on the host, where the model's plan
    /// reads it (a device copy would be read back, waiting for every kernel queued before it).
    pub attention_mask: Tensor,
    /// `[batch, time]` u32: the token each position predicts (the next token; 0 where none).
    pub targets: Tensor,
    /// Per example and position: whether the prediction at that position is scored.
    pub scored: Vec<Vec<bool>>,
}

impl Batch {
    /// Pad `sequences[indices]` to the longest one. Errors when `indices` is empty or a sequence
    /// is empty.
    pub fn new(
        sequences: &[Sequence],
        indices: &[usize],
        pad_id: u32,
        device: &Device,
    ) -> Result<Self> {
        if indices.iter().any(|&index| index >= sequences.len()) {
            candle_core::bail!("batch index out of range")
        }
        let host = collate(sequences, indices, pad_id);
        if host.batch == 0 || host.lengths.contains(&0) {
            candle_core::bail!("cannot batch an empty set of examples or an empty sequence")
        }
        Self::from_host(&host, device)
    }

    /// The tensors of a collated batch. Position t predicts token t + 1: its target is that
    /// token and it is scored where the loss mask marks t + 1.
    pub fn from_host(host: &HostBatch, device: &Device) -> Result<Self> {
        let (count, time) = (host.batch, host.length);
        let mut targets = vec![0u32; count * time];
        let mut scored = Vec::with_capacity(count);
        for (row, &length) in host.lengths.iter().enumerate() {
            let base = row * time;
            let mut row_scored = vec![false; time];
            for position in 0..length.saturating_sub(1) {
                targets[base + position] = host.input_ids[base + position + 1];
                row_scored[position] = host.loss_mask[base + position + 1] > 0.0;
            }
            scored.push(row_scored);
        }
        Ok(Batch {
            input_ids: Tensor::from_vec(host.input_ids.clone(), (count, time), device)?,
            attention_mask: Tensor::from_vec(host.attention_mask(), (count, time), &Device::Cpu)?,
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
        let sequences = [joined(&[1, 5, 6], &[7, 2]), joined(&[1, 9], &[4])];
        let batch = Batch::new(&sequences, &[0, 1], 0, &Device::Cpu).unwrap();
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
        assert_eq!(sequences[0].scored_tokens(), 2);
        assert_eq!(sequences[1].scored_tokens(), 1);
        assert!(Batch::new(&sequences, &[], 0, &Device::Cpu).is_err());
        assert!(Batch::new(&sequences, &[2], 0, &Device::Cpu).is_err());
    }
}
