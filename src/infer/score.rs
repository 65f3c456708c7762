//! Log-likelihood scoring: the summed log-probability of each example's scored tokens, computed in
//! f32 from full-sequence logits, summed in f64. Loss, perplexity and candidate scoring for
//! accuracy are all built from it.

use candle_core::{DType, D};

use super::batch::{Batch, Sequence};
use super::LanguageModel;

/// The log-likelihood of one example's scored tokens.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SequenceScore {
    /// Σ log p(token | tokens before it) over the scored tokens (natural log, ≤ 0).
    pub log_likelihood: f64,
    /// How many tokens were scored.
    pub tokens: usize,
}

impl SequenceScore {
    /// Mean log-likelihood per token (−∞ if nothing was scored).
    pub fn mean(&self) -> f64 {
        if self.tokens == 0 {
            f64::NEG_INFINITY
        } else {
            self.log_likelihood / self.tokens as f64
        }
    }
}

/// Token-weighted negative log-likelihood over many examples.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct NllTotal {
    pub nll: f64,
    pub tokens: u64,
}

impl NllTotal {
    pub fn add(&mut self, score: &SequenceScore) {
        self.nll -= score.log_likelihood;
        self.tokens += score.tokens as u64;
    }

    /// Mean NLL per token (None when no token was scored).
    pub fn loss(&self) -> Option<f64> {
        (self.tokens > 0).then(|| self.nll / self.tokens as f64)
    }

    /// exp(mean NLL per token).
    pub fn perplexity(&self) -> Option<f64> {
        self.loss().map(f64::exp)
    }
}

/// Score one batch: per example, the log-likelihood of its scored tokens.
pub fn score_batch<M: LanguageModel>(
    model: &M,
    sequences: &[Sequence],
    indices: &[usize],
    pad_id: u32,
) -> candle_core::Result<Vec<SequenceScore>> {
    let batch = Batch::new(sequences, indices, pad_id, model.device())?;
    let logits = model
        .logits(&batch.input_ids, &batch.attention_mask)?
        .to_dtype(DType::F32)?;
    let (count, time, _vocab) = logits.dims3()?;
    if count != indices.len() || time != batch.scored[0].len() {
        candle_core::bail!(
            "the model returned logits of shape {:?} for a batch of {} × {}",
            logits.dims(),
            indices.len(),
            batch.scored[0].len()
        )
    }
    // log p(target) = logit[target] − logsumexp(logits), computed stably in f32.
    let max = logits.max_keepdim(D::Minus1)?;
    let log_sum_exp = logits
        .broadcast_sub(&max)?
        .exp()?
        .sum_keepdim(D::Minus1)?
        .log()?
        .add(&max)?;
    let target_logits = logits.gather(&batch.targets.unsqueeze(2)?.contiguous()?, 2)?;
    let log_probs: Vec<Vec<f32>> = (target_logits - log_sum_exp)?.squeeze(2)?.to_vec2()?;
    let mut scores = Vec::with_capacity(count);
    for (row, scored) in log_probs.iter().zip(&batch.scored) {
        let mut score = SequenceScore {
            log_likelihood: 0.0,
            tokens: 0,
        };
        for (&log_prob, &is_scored) in row.iter().zip(scored) {
            if is_scored {
                if !log_prob.is_finite() {
                    candle_core::bail!("the model gave a non-finite log-probability ({log_prob})")
                }
                score.log_likelihood += f64::from(log_prob);
                score.tokens += 1;
            }
        }
        scores.push(score);
    }
    Ok(scores)
}

/// Score every example, `batch_size` at a time. Examples are grouped by length to waste little
/// padding; the scores come back in the input order. `after_batch(done)` runs after each batch
/// with the number of examples scored so far; an error from it (e.g. cancellation) stops.
pub fn score_examples<M, E>(
    model: &M,
    examples: &[Sequence],
    batch_size: usize,
    pad_id: u32,
    mut after_batch: impl FnMut(usize) -> Result<(), E>,
) -> Result<Vec<SequenceScore>, E>
where
    M: LanguageModel,
    E: From<candle_core::Error>,
{
    let batch_size = batch_size.max(1);
    let mut order: Vec<usize> = (0..examples.len()).collect();
    order.sort_by_key(|&index| examples[index].ids.len());
    let mut scores = vec![
        SequenceScore {
            log_likelihood: 0.0,
            tokens: 0
        };
        examples.len()
    ];
    let mut done = 0;
    for chunk in order.chunks(batch_size) {
        let batch_scores = score_batch(model, examples, chunk, pad_id)?;
        for (&index, score) in chunk.iter().zip(batch_scores) {
            scores[index] = score;
        }
        done += chunk.len();
        after_batch(done)?;
    }
    Ok(scores)
}

#[cfg(test)]
pub(crate) mod tests {
    use candle_core::{Device, Result, Tensor};

    use super::*;
    use crate::infer::batch::joined;

    /// A bigram model: the logits at each position are row `token` of a fixed table, so every
    /// probability is known by hand. Its cache is the tokens seen, per batch row.
    pub struct BigramModel {
        pub table: Vec<Vec<f32>>,
        pub device: Device,
    }

    impl BigramModel {
        pub fn log_prob(&self, previous: u32, next: u32) -> f64 {
            let row = &self.table[previous as usize];
            let log_sum: f64 = row.iter().map(|&v| f64::from(v).exp()).sum::<f64>().ln();
            f64::from(row[next as usize]) - log_sum
        }
    }

    impl LanguageModel for BigramModel {
        type Cache = Vec<Vec<u32>>;

        fn device(&self) -> &Device {
            &self.device
        }

        fn logits(&self, input_ids: &Tensor, _attention_mask: &Tensor) -> Result<Tensor> {
            let ids = input_ids.to_vec2::<u32>()?;
            let vocab = self.table[0].len();
            let rows: Vec<f32> = ids
                .iter()
                .flat_map(|row| row.iter().flat_map(|&id| self.table[id as usize].clone()))
                .collect();
            Tensor::from_vec(rows, (ids.len(), ids[0].len(), vocab), &self.device)
        }

        fn new_cache(&self) -> Result<Vec<Vec<u32>>> {
            Ok(Vec::new())
        }

        fn forward_cached(
            &self,
            input_ids: &Tensor,
            _attention_mask: Option<&Tensor>,
            cache: &mut Vec<Vec<u32>>,
        ) -> Result<Tensor> {
            let rows = input_ids.to_vec2::<u32>()?;
            cache.resize(rows.len(), Vec::new());
            for (seen, row) in cache.iter_mut().zip(rows) {
                seen.extend(row);
            }
            let mask = input_ids.ones_like()?;
            self.logits(input_ids, &mask)
        }

        fn keep_rows(&self, cache: &mut Vec<Vec<u32>>, rows: &[usize]) -> Result<()> {
            *cache = rows.iter().map(|&row| cache[row].clone()).collect();
            Ok(())
        }
    }

    pub fn bigram() -> BigramModel {
        BigramModel {
            table: vec![
                vec![0.0, 1.0, 2.0, 0.5],
                vec![2.0, 0.0, 1.0, -1.0],
                vec![0.3, 0.3, 0.3, 3.0],
                vec![1.0, 2.0, 0.0, 0.0],
            ],
            device: Device::Cpu,
        }
    }

    #[test]
    fn perplexity_is_exp_of_mean_nll_over_completion_tokens_only() {
        let model = bigram();
        let examples = vec![joined(&[0, 1], &[2, 3]), joined(&[3], &[1, 0, 2])];
        let scores =
            score_examples::<_, candle_core::Error>(&model, &examples, 1, 0, |_| Ok(())).unwrap();
        // By hand: completion tokens only (the prompt's 0→1 is context).
        let first = model.log_prob(1, 2) + model.log_prob(2, 3);
        let second = model.log_prob(3, 1) + model.log_prob(1, 0) + model.log_prob(0, 2);
        assert!((scores[0].log_likelihood - first).abs() < 1e-5);
        assert!((scores[1].log_likelihood - second).abs() < 1e-5);
        assert_eq!((scores[0].tokens, scores[1].tokens), (2, 3));
        let mut total = NllTotal::default();
        scores.iter().for_each(|s| total.add(s));
        let expected_loss = -(first + second) / 5.0;
        assert!((total.loss().unwrap() - expected_loss).abs() < 1e-6);
        assert!((total.perplexity().unwrap() - expected_loss.exp()).abs() < 1e-5);
    }

    #[test]
    fn batching_and_padding_do_not_change_scores() {
        let model = bigram();
        let examples = vec![
            joined(&[0, 1, 2, 3, 0], &[1]),
            joined(&[2], &[3, 3]),
            joined(&[1, 1], &[0]),
        ];
        let one =
            score_examples::<_, candle_core::Error>(&model, &examples, 1, 0, |_| Ok(())).unwrap();
        let mut progress = Vec::new();
        let all = score_examples::<_, candle_core::Error>(&model, &examples, 2, 0, |done| {
            progress.push(done);
            Ok(())
        })
        .unwrap();
        for (a, b) in one.iter().zip(&all) {
            assert!((a.log_likelihood - b.log_likelihood).abs() < 1e-6);
            assert_eq!(a.tokens, b.tokens);
        }
        assert_eq!(progress, [2, 3]);
    }

    #[test]
    fn nothing_scored_has_no_loss() {
        assert_eq!(NllTotal::default().loss(), None);
        assert_eq!(
            SequenceScore {
                log_likelihood: 0.0,
                tokens: 0
            }
            .mean(),
            f64::NEG_INFINITY
        );
    }
}
