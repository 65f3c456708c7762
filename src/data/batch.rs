//! From tokenized examples to training batches: fitting each example into the maximum sequence
//! length by the declared truncation policy, the seeded order of batches in each epoch (optionally
//! bucketed by length), and collation with right padding, attention validity and the loss mask
//! (1 on completion tokens only). Host-side vectors; the caller makes tensors. Never prints.

use rand::seq::SliceRandom;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;

use super::tokenize::TokenizedExample;
use crate::config::train::Truncation;

/// One example ready to batch: ids, and where the scored part (the completion) starts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Sequence {
    pub ids: Vec<u32>,
    /// Tokens at positions `>= completion_start` are scored (predicted from what precedes them).
    pub completion_start: usize,
}

impl Sequence {
    /// Number of scored tokens (position 0 can never be predicted).
    pub fn scored_tokens(&self) -> usize {
        self.ids.len().saturating_sub(self.completion_start.max(1))
    }
}

/// Fit an example into `max_length` tokens. `keep_prefix` leading prompt tokens (BOS) are never
/// dropped. Returns None when the policy drops the example.
/// - `PromptLeft`: drop prompt tokens from the left (after the kept prefix); if the completion
///   alone does not fit, it is cut on the right.
/// - `Right`: cut the joined sequence on the right.
/// - `Drop`: skip examples that do not fit.
pub fn fit(
    example: &TokenizedExample,
    max_length: usize,
    keep_prefix: usize,
    policy: Truncation,
) -> Option<Sequence> {
    let total = example.prompt.len() + example.completion.len();
    if total <= max_length {
        let mut ids = example.prompt.clone();
        ids.extend_from_slice(&example.completion);
        return Some(Sequence {
            ids,
            completion_start: example.prompt.len(),
        });
    }
    match policy {
        Truncation::Drop => None,
        Truncation::Right => {
            let mut ids = example.prompt.clone();
            ids.extend_from_slice(&example.completion);
            ids.truncate(max_length);
            Some(Sequence {
                completion_start: example.prompt.len().min(max_length),
                ids,
            })
        }
        Truncation::PromptLeft => {
            let prefix = keep_prefix.min(example.prompt.len()).min(max_length);
            let room = max_length - prefix;
            let completion_len = example.completion.len().min(room);
            let prompt_room = room - completion_len;
            let prompt_rest = &example.prompt[prefix..];
            let kept_prompt = &prompt_rest[prompt_rest.len().saturating_sub(prompt_room)..];
            let mut ids = example.prompt[..prefix].to_vec();
            ids.extend_from_slice(kept_prompt);
            let completion_start = ids.len();
            ids.extend_from_slice(&example.completion[..completion_len]);
            Some(Sequence {
                ids,
                completion_start,
            })
        }
    }
}

/// How the examples fared when fitted into the maximum length (training's summary counts).
/// `examples + dropped + without_completion` is every example; `truncated` counts the examples
/// cut by `prompt_left` or `right`, kept or not.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct FitCounts {
    /// Examples kept: they have completion tokens to score.
    pub examples: usize,
    /// Examples longer than the maximum length that were cut.
    pub truncated: usize,
    /// Examples left out for their length: skipped by `drop`, or cut with no completion token
    /// left to score (`completion_cut_off`).
    pub dropped: usize,
    /// Of the truncated examples, those whose whole completion the cut removed (`right` with a
    /// maximum length at or below the prompt); counted in `dropped` too.
    pub completion_cut_off: usize,
    /// Examples whose data has no completion token to score, however long they are.
    pub without_completion: usize,
}

impl FitCounts {
    /// [`fit`] one example and count how it fared; the sequence when it has tokens to score.
    pub fn fit(
        &mut self,
        example: &TokenizedExample,
        max_length: usize,
        keep_prefix: usize,
        policy: Truncation,
    ) -> Option<Sequence> {
        let whole = Sequence {
            ids: [example.prompt.as_slice(), example.completion.as_slice()].concat(),
            completion_start: example.prompt.len(),
        };
        if whole.scored_tokens() == 0 {
            self.without_completion += 1;
            return None;
        }
        if whole.ids.len() <= max_length {
            self.examples += 1;
            return Some(whole);
        }
        let Some(sequence) = fit(example, max_length, keep_prefix, policy) else {
            self.dropped += 1;
            return None;
        };
        self.truncated += 1;
        if sequence.scored_tokens() == 0 {
            self.completion_cut_off += 1;
            self.dropped += 1;
            return None;
        }
        self.examples += 1;
        Some(sequence)
    }

    /// Examples longer than the maximum length (truncated or dropped, each once).
    pub fn too_long(&self) -> usize {
        self.truncated + self.dropped - self.completion_cut_off
    }
}

/// How many of the queued batches a length bucket spans when sorting by length.
pub const BUCKET_BATCHES: usize = 32;

/// The batches of one epoch as lists of example indices: a seeded permutation (ChaCha8, stream =
/// epoch), cut into batches of `batch_size` (the last may be smaller). With `sort_by_length`,
/// each window of `BUCKET_BATCHES` batches is sorted by length (longest first) before cutting,
/// then the batch order is shuffled, so batches hold similar lengths and little padding.
pub fn epoch_batches(
    lengths: &[usize],
    batch_size: usize,
    seed: u64,
    epoch: u64,
    sort_by_length: bool,
) -> Vec<Vec<usize>> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    rng.set_stream(epoch);
    let mut order: Vec<usize> = (0..lengths.len()).collect();
    order.shuffle(&mut rng);
    let batch_size = batch_size.max(1);
    if !sort_by_length {
        return order.chunks(batch_size).map(<[usize]>::to_vec).collect();
    }
    let mut batches = Vec::new();
    for window in order.chunks(batch_size * BUCKET_BATCHES) {
        let mut window = window.to_vec();
        window.sort_by_key(|&index| std::cmp::Reverse(lengths[index]));
        batches.extend(window.chunks(batch_size).map(<[usize]>::to_vec));
    }
    batches.shuffle(&mut rng);
    batches
}

/// A padded batch on the host, `[batch, length]` row-major.
#[derive(Debug, Clone, PartialEq)]
pub struct HostBatch {
    pub batch: usize,
    pub length: usize,
    /// Token ids, right-padded with the pad id.
    pub input_ids: Vec<u32>,
    /// Real (unpadded) length of each row.
    pub lengths: Vec<usize>,
    /// 1.0 at scored (completion) token positions, 0.0 elsewhere: the *target* positions of
    /// the next-token loss (position t is predicted by the logits at t - 1).
    pub loss_mask: Vec<f32>,
    /// Real tokens in the batch.
    pub tokens: usize,
    /// Scored tokens in the batch.
    pub scored_tokens: usize,
}

impl HostBatch {
    /// Which positions each row attends to (true = a real token).
    pub fn key_valid(&self) -> Vec<Vec<bool>> {
        self.lengths
            .iter()
            .map(|&len| (0..self.length).map(|position| position < len).collect())
            .collect()
    }

    /// The attention mask as 0/1 values, `[batch, length]` row-major (transformers' layout).
    pub fn attention_mask(&self) -> Vec<u32> {
        self.lengths
            .iter()
            .flat_map(|&len| (0..self.length).map(move |position| u32::from(position < len)))
            .collect()
    }
}

/// Right-pad the sequences at `indices` into one batch.
pub fn collate(sequences: &[Sequence], indices: &[usize], pad_id: u32) -> HostBatch {
    let length = indices
        .iter()
        .map(|&index| sequences[index].ids.len())
        .max()
        .unwrap_or(0);
    let batch = indices.len();
    let mut input_ids = Vec::with_capacity(batch * length);
    let mut loss_mask = Vec::with_capacity(batch * length);
    let mut lengths = Vec::with_capacity(batch);
    let mut scored_tokens = 0;
    for &index in indices {
        let sequence = &sequences[index];
        let len = sequence.ids.len();
        lengths.push(len);
        input_ids.extend_from_slice(&sequence.ids);
        input_ids.extend(std::iter::repeat_n(pad_id, length - len));
        let first_scored = sequence.completion_start.max(1);
        loss_mask.extend((0..length).map(|position| {
            if position >= first_scored && position < len {
                1.0
            } else {
                0.0
            }
        }));
        scored_tokens += sequence.scored_tokens();
    }
    HostBatch {
        batch,
        length,
        input_ids,
        tokens: lengths.iter().sum(),
        lengths,
        loss_mask,
        scored_tokens,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn example(prompt: &[u32], completion: &[u32]) -> TokenizedExample {
        TokenizedExample {
            prompt: prompt.to_vec(),
            completion: completion.to_vec(),
        }
    }

    #[test]
    fn fitting_examples_are_untouched() {
        let fitted = fit(&example(&[1, 5, 6], &[7, 2]), 5, 1, Truncation::PromptLeft).unwrap();
        assert_eq!(fitted.ids, vec![1, 5, 6, 7, 2]);
        assert_eq!(fitted.completion_start, 3);
        assert_eq!(fitted.scored_tokens(), 2);
    }

    #[test]
    fn prompt_left_keeps_bos_and_the_completion() {
        let long = example(&[1, 10, 11, 12, 13], &[20, 21, 2]);
        let fitted = fit(&long, 6, 1, Truncation::PromptLeft).unwrap();
        assert_eq!(fitted.ids, vec![1, 12, 13, 20, 21, 2]);
        assert_eq!(fitted.completion_start, 3);
        // The completion alone is too long: keep BOS, cut the completion's end.
        let fitted = fit(&long, 3, 1, Truncation::PromptLeft).unwrap();
        assert_eq!(fitted.ids, vec![1, 20, 21]);
        assert_eq!(fitted.completion_start, 1);
    }

    #[test]
    fn right_and_drop_policies() {
        let long = example(&[1, 10, 11], &[20, 21, 2]);
        let fitted = fit(&long, 4, 1, Truncation::Right).unwrap();
        assert_eq!(fitted.ids, vec![1, 10, 11, 20]);
        assert_eq!(fitted.scored_tokens(), 1);
        assert!(fit(&long, 4, 1, Truncation::Drop).is_none());
    }

    /// Count each example into fresh counts; the sequences kept.
    fn counted(
        examples: &[TokenizedExample],
        max_length: usize,
        policy: Truncation,
    ) -> (Vec<Sequence>, FitCounts) {
        let mut counts = FitCounts::default();
        let kept = examples
            .iter()
            .filter_map(|example| counts.fit(example, max_length, 1, policy))
            .collect();
        (kept, counts)
    }

    #[test]
    fn right_truncation_that_leaves_no_completion_is_truncated_and_dropped() {
        let examples = [
            // The prompt alone fills (or overfills) max_length: the whole completion is cut.
            example(&[1, 10, 11, 12], &[20, 21, 2]),
            example(&[1, 10, 11, 12, 13], &[20, 2]),
            // One completion token survives.
            example(&[1, 10, 11], &[20, 21, 2]),
            // Fits.
            example(&[1, 10], &[20, 2]),
            // The data has no completion (nothing to score even uncut).
            example(&[1, 10], &[]),
            example(&[1, 10, 11, 12, 13], &[]),
        ];
        let (kept, counts) = counted(&examples, 4, Truncation::Right);
        assert_eq!(kept.len(), 2);
        assert_eq!(
            (
                counts.examples,
                counts.truncated,
                counts.dropped,
                counts.completion_cut_off,
                counts.without_completion
            ),
            (2, 3, 2, 2, 2),
            "{counts:?}"
        );
        assert_eq!(counts.too_long(), 3);
    }

    #[test]
    fn counts_under_prompt_left_and_drop() {
        let examples = [
            example(&[1, 10, 11, 12], &[20, 21, 2]),
            example(&[1, 10], &[20, 2]),
            example(&[1, 10, 11, 12, 13], &[]),
        ];
        // prompt_left keeps the completion: truncated, never dropped.
        let (kept, counts) = counted(&examples, 4, Truncation::PromptLeft);
        assert_eq!(kept.len(), 2);
        assert_eq!(
            (counts.examples, counts.truncated, counts.dropped),
            (2, 1, 0)
        );
        assert_eq!(
            (counts.completion_cut_off, counts.without_completion),
            (0, 1)
        );
        // Only BOS fits: prompt_left cannot keep a completion token either.
        let (_, counts) = counted(&examples[..1], 1, Truncation::PromptLeft);
        assert_eq!(
            (counts.truncated, counts.dropped, counts.completion_cut_off),
            (1, 1, 1)
        );
        assert_eq!(counts.too_long(), 1);
        // drop skips the long example without cutting it.
        let (kept, counts) = counted(&examples, 4, Truncation::Drop);
        assert_eq!(kept.len(), 1);
        assert_eq!(
            (counts.examples, counts.truncated, counts.dropped),
            (1, 0, 1)
        );
        assert_eq!(
            (counts.completion_cut_off, counts.without_completion),
            (0, 1)
        );
        assert_eq!(counts.too_long(), 1);
    }

    #[test]
    fn collate_pads_right_and_masks_the_completion() {
        let sequences = vec![
            Sequence {
                ids: vec![1, 5, 6, 7],
                completion_start: 2,
            },
            Sequence {
                ids: vec![1, 8],
                completion_start: 1,
            },
        ];
        let batch = collate(&sequences, &[0, 1], 0);
        assert_eq!((batch.batch, batch.length), (2, 4));
        assert_eq!(batch.input_ids, vec![1, 5, 6, 7, 1, 8, 0, 0]);
        assert_eq!(batch.loss_mask, vec![0., 0., 1., 1., 0., 1., 0., 0.]);
        assert_eq!(batch.attention_mask(), vec![1, 1, 1, 1, 1, 1, 0, 0]);
        assert_eq!((batch.tokens, batch.scored_tokens), (6, 3));
    }

    #[test]
    fn epoch_order_is_seeded_complete_and_differs_by_epoch() {
        let lengths: Vec<usize> = (0..50).map(|i| (i * 7) % 13 + 1).collect();
        for sort in [false, true] {
            let first = epoch_batches(&lengths, 4, 3, 0, sort);
            assert_eq!(first, epoch_batches(&lengths, 4, 3, 0, sort));
            assert_ne!(first, epoch_batches(&lengths, 4, 3, 1, sort));
            let mut all: Vec<usize> = first.iter().flatten().copied().collect();
            all.sort_unstable();
            assert_eq!(all, (0..50).collect::<Vec<_>>());
            assert_eq!(first.len(), 13);
        }
    }

    #[test]
    fn sorting_by_length_reduces_padding() {
        let lengths: Vec<usize> = (0..256).map(|i| (i * 37) % 100 + 1).collect();
        let padding = |batches: &[Vec<usize>]| -> usize {
            batches
                .iter()
                .map(|b| {
                    let max = b.iter().map(|&i| lengths[i]).max().unwrap();
                    b.iter().map(|&i| max - lengths[i]).sum::<usize>()
                })
                .sum()
        };
        let plain = padding(&epoch_batches(&lengths, 8, 1, 0, false));
        let sorted = padding(&epoch_batches(&lengths, 8, 1, 0, true));
        assert!(sorted * 4 < plain, "sorted {sorted} vs plain {plain}");
    }
}
