//! Evaluation during training: the held-out loss of the adapter at a step (mean NLL per scored
//! token over the evaluation sequences, the training loss's masking, adapter in eval mode so no
//! dropout), and the bookkeeping around it: the best evaluation so far, the patience counter of
//! early stopping and the snapshot of the best adapter. The state is plain data so a checkpoint
//! can carry it across a resume. Knows nothing of files, splits or stage configs; never prints.

use candle_core::{DType, Tensor};
use serde::{Deserialize, Serialize};

use super::trainer::{LossModel, TrainError};
use crate::data::batch::{collate, Sequence};
use crate::peft::{Adapter, AdapterMode};

/// Evaluation during training, as the trainer runs it.
pub struct Evaluation<'a> {
    /// The held-out sequences, evaluated in this order (batched by `batch_size`).
    pub sequences: &'a [Sequence],
    /// Evaluate after every `every` optimizer steps, and after the last step.
    pub every: u64,
    pub batch_size: usize,
    pub early_stopping: Option<EarlyStopping>,
    /// Keep the adapter of the best evaluation as the result (restored into the adapter's
    /// variables when training ends) instead of the last one.
    pub keep_best: bool,
}

/// Stop when `patience` evaluations in a row have not beaten the best so far by more than
/// `min_delta`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct EarlyStopping {
    pub patience: u32,
    pub min_delta: f64,
}

/// One evaluation's figures.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct EvalMetrics {
    /// Mean NLL per scored token.
    pub loss: f64,
    /// `exp(loss)`.
    pub perplexity: f64,
    /// Scored tokens evaluated.
    pub scored_tokens: u64,
}

/// Where evaluation stands after some steps: resumable (a checkpoint carries it).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct EvaluationState {
    /// The step and loss of the lowest evaluation loss so far (ties: the earliest).
    pub best_step: Option<u64>,
    pub best_loss: Option<f64>,
    /// Evaluations in a row that did not beat the best by more than `min_delta`.
    pub evaluations_without_improvement: u32,
}

/// What one evaluation changed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Verdict {
    /// The lowest loss so far: the best adapter is this step's.
    pub new_best: bool,
    /// Early stopping's patience ran out.
    pub stop: bool,
}

impl EvaluationState {
    /// Record the evaluation at `step`: a new best when strictly lower than the best so far; the
    /// patience counter resets only on an improvement by more than `min_delta`.
    pub fn record(&mut self, step: u64, loss: f64, early: Option<EarlyStopping>) -> Verdict {
        let min_delta = early.map_or(0.0, |early| early.min_delta);
        let improved = self.best_loss.is_none_or(|best| loss < best - min_delta);
        let new_best = self.best_loss.is_none_or(|best| loss < best);
        if new_best {
            self.best_step = Some(step);
            self.best_loss = Some(loss);
        }
        if improved {
            self.evaluations_without_improvement = 0;
        } else {
            self.evaluations_without_improvement += 1;
        }
        Verdict {
            new_best,
            stop: self.patience_ran_out(early),
        }
    }

    /// Whether early stopping's patience has run out.
    pub fn patience_ran_out(&self, early: Option<EarlyStopping>) -> bool {
        early.is_some_and(|early| self.evaluations_without_improvement >= early.patience)
    }
}

/// Evaluate the adapter (in eval mode) on `sequences`: the mean NLL per scored token. `step`
/// names the step in errors.
pub fn evaluate(
    model: &dyn LossModel,
    adapter: &dyn Adapter,
    sequences: &[Sequence],
    batch_size: usize,
    pad_id: u32,
    step: u64,
) -> Result<EvalMetrics, TrainError> {
    adapter.set_mode(AdapterMode::Eval);
    let tensor_error = |source| TrainError::Tensor {
        step,
        context: "evaluation".into(),
        source,
    };
    let mut total = 0.0f64;
    let mut scored = 0u64;
    let indices: Vec<usize> = (0..sequences.len()).collect();
    for chunk in indices.chunks(batch_size.max(1)) {
        let batch = collate(sequences, chunk, pad_id);
        let loss = model
            .loss_sum(&batch)
            .and_then(|loss: Tensor| loss.to_dtype(DType::F64))
            .and_then(|loss| loss.to_scalar::<f64>())
            .map_err(tensor_error)?;
        total += loss;
        scored += batch.scored_tokens as u64;
    }
    if scored == 0 {
        return Err(TrainError::Invalid(
            "the evaluation examples have no completion token to score".into(),
        ));
    }
    let loss = total / scored as f64;
    if !loss.is_finite() {
        return Err(TrainError::NonFinite {
            step,
            what: "the evaluation loss".into(),
            value: loss,
        });
    }
    Ok(EvalMetrics {
        loss,
        perplexity: loss.exp(),
        scored_tokens: scored,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn patience_counts_evaluations_without_a_large_enough_improvement() {
        let early = Some(EarlyStopping {
            patience: 2,
            min_delta: 0.1,
        });
        let mut state = EvaluationState::default();
        assert_eq!(
            state.record(10, 3.0, early),
            Verdict {
                new_best: true,
                stop: false
            }
        );
        // Lower, but not by more than min_delta: a new best, and no improvement for patience.
        assert_eq!(
            state.record(20, 2.95, early),
            Verdict {
                new_best: true,
                stop: false
            }
        );
        assert_eq!(state.evaluations_without_improvement, 1);
        assert_eq!(
            state.record(30, 2.0, early),
            Verdict {
                new_best: true,
                stop: false
            }
        );
        assert_eq!(state.evaluations_without_improvement, 0);
        assert!(!state.record(40, 2.5, early).stop);
        assert_eq!(
            state.record(50, 2.0, early),
            Verdict {
                new_best: false,
                stop: true
            },
            "a tie is no new best, and the second evaluation without improvement stops"
        );
        assert_eq!((state.best_step, state.best_loss), (Some(30), Some(2.0)));
    }

    #[test]
    fn without_early_stopping_nothing_stops() {
        let mut state = EvaluationState::default();
        for step in 1..10 {
            assert!(!state.record(step, step as f64, None).stop);
        }
        assert_eq!(state.best_step, Some(1));
        assert_eq!(state.evaluations_without_improvement, 8);
    }
}
