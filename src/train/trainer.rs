//! The training loop: seeded batches, gradient accumulation over micro-batches (the loss of a
//! step is the mean NLL over all scored tokens of its micro-batches), NaN/inf detection that
//! names the step, global-norm clipping, AdamW, the schedule, metrics lines and resumable
//! checkpoints (every `checkpoint_every` steps, and when cancelled, at the step boundary where it
//! stops). Deterministic on CPU: every random draw is a function of the seed and a counter,
//! so an interrupted run resumed from its checkpoint ends bit-identical to an uninterrupted one.
//!
//! Data stream: micro-batch `m` is batch `m mod B` of epoch `m div B` (B batches per epoch, each
//! epoch a fresh seeded order); an epoch has ⌈B/A⌉ optimizer steps, step `j` of epoch `e`
//! consuming its micro-batches `j·A .. min((j+1)·A, B)`: an epoch's last step may hold fewer than
//! A (as in HF Trainer) but never the next epoch's first ([`step_micro_batches`]).
//! Data parallel ([`train_data_parallel`]): the same global micro-batches on every rank, each
//! rank computing its strided shard and the gradients averaged before clipping and AdamW (see
//! [`super::distributed`]); a world of one is the single-device loop.
//! Knows nothing of pipelines, files of the data stage, or which model it trains: the caller
//! passes a [`LossModel`] and an [`Adapter`]. Never prints: it reports through a callback.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use candle_core::{DType, Device, Tensor};
use serde::Serialize;

use super::checkpoint::{self, CheckpointState, DamagedCheckpoint, CHECKPOINT_VERSION};
use super::distributed::{
    average_gradients, backward_scale, shard_rows, CommError, Communicator, Solo,
    DEFAULT_BUCKET_ELEMENTS,
};
use super::evaluation::{evaluate, EvalMetrics, Evaluation, EvaluationState};
use super::optimizer::{clip_coefficient, global_norm, AdamW, AdamWSettings};
pub use super::pass::{ForwardPass, GraphPass};
use super::schedule::{Schedule, ScheduleKind};
use crate::data::batch::{collate, epoch_batches, HostBatch, Sequence};
use crate::models::CausalLm;
use crate::peft::{mix_seed, Adapter, AdapterMode, PeftError};

/// A model (with its adapter injected) that turns a batch into a summed loss.
pub trait LossModel {
    /// Summed next-token NLL over the scored tokens of the batch: an f32 scalar, part of the
    /// autograd graph of the adapter's variables.
    fn loss_sum(&self, batch: &HostBatch) -> candle_core::Result<Tensor>;
    /// The device the model runs on.
    fn device(&self) -> &Device;
    /// The training forward of one micro-batch: its summed loss and what its backward needs.
    /// By default candle's whole graph ([`GraphPass`]); a checkpointed model keeps less.
    fn forward_pass(&self, batch: &HostBatch) -> candle_core::Result<Box<dyn ForwardPass + '_>> {
        Ok(Box::new(GraphPass::new(self.loss_sum(batch)?)))
    }
}

/// A causal LM with its adapter (injected through the linear factory, and/or acting through the
/// hooks it gives for every forward pass) scored with next-token cross-entropy on the batch's
/// loss mask: the loss model of the train stage and the benchmark. Virtual-token positions
/// (prompt tuning) are never scored.
pub struct CausalLmLoss<'a> {
    pub model: &'a dyn CausalLm,
    pub adapter: &'a dyn Adapter,
}

impl LossModel for CausalLmLoss<'_> {
    fn loss_sum(&self, batch: &HostBatch) -> candle_core::Result<Tensor> {
        let device = self.model.device();
        let (input_ids, attention_mask) = super::layered::batch_tensors(batch, device)?;
        let (targets, loss_mask) = super::layered::loss_targets(batch)?;
        let hooks = self
            .adapter
            .hooks()
            .map_err(|error| candle_core::Error::Msg(error.to_string()))?;
        let hidden = self
            .model
            .forward_hidden(&input_ids, Some(&attention_mask), &hooks, None)?;
        // Drop the leading virtual-token positions: the loss masks them.
        let total = hidden.dim(1)?;
        let hidden = if total > batch.length {
            hidden.narrow(1, total - batch.length, batch.length)?
        } else {
            hidden
        };
        // A frozen lm_head is fused into the loss (chunked on CUDA; the same ops on the CPU).
        if let Some(weight) = self.model.lm_head().frozen_weight() {
            let loss =
                crate::ops::next_token_linear_cross_entropy(&hidden, weight, &targets, &loss_mask)?;
            return Ok(loss.sum);
        }
        let logits = self.model.lm_head().forward(&hidden)?;
        Ok(crate::ops::next_token_cross_entropy(&logits, &targets, &loss_mask)?.sum)
    }

    fn device(&self) -> &Device {
        self.model.device()
    }
}

/// Everything that shapes a run.
#[derive(Debug, Clone)]
pub struct TrainerSettings {
    pub adamw: AdamWSettings,
    pub learning_rate: f64,
    pub schedule: ScheduleKind,
    pub warmup_steps: u64,
    pub max_grad_norm: Option<f64>,
    pub batch_size: usize,
    pub accumulation: usize,
    pub epochs: u32,
    pub max_steps: Option<u64>,
    pub sort_by_length: bool,
    pub seed: u64,
    pub pad_id: u32,
    /// Save a checkpoint every N steps (0: never) into `checkpoint_dir`.
    pub checkpoint_every: u64,
    pub checkpoint_dir: Option<PathBuf>,
    /// Identifies the run (the train stage passes its fingerprint digest, which covers config,
    /// data, weights, tokenizer, seed and device): only its own checkpoints resume. The caller
    /// holds `checkpoint_dir`'s lock ([`super::checkpoint::CheckpointDir`]) and decides whether
    /// earlier checkpoints may be resumed (clearing the directory when not).
    pub run_key: String,
    /// Synchronize the device around each phase so the forward/backward/optimizer split is
    /// exact (benchmarks); off for normal runs.
    pub synchronize_phases: bool,
}

impl TrainerSettings {
    /// Where this run stands after `step` optimizer steps and `micro_batches` micro-batches, with
    /// `(tokens, scored_tokens)` seen: what a checkpoint records (the cancel path and the
    /// periodic checkpoint both write it).
    fn checkpoint_state(
        &self,
        step: u64,
        micro_batches: u64,
        (tokens, scored_tokens): (u64, u64),
        elapsed_seconds: f64,
        evaluation: Option<super::evaluation::EvaluationState>,
    ) -> CheckpointState {
        CheckpointState {
            version: CHECKPOINT_VERSION,
            run_key: self.run_key.clone(),
            step,
            micro_batches,
            seed: self.seed,
            tokens,
            scored_tokens,
            elapsed_seconds,
            evaluation,
        }
    }
}

/// One line of metrics.jsonl.
#[derive(Debug, Clone, Serialize)]
pub struct StepMetrics {
    /// 1-based optimizer step.
    pub step: u64,
    pub total_steps: u64,
    /// Fractional epoch reached.
    pub epoch: f64,
    /// Mean NLL per scored token over the step's micro-batches.
    pub loss: f64,
    pub lr: f64,
    /// Global gradient norm before clipping.
    pub grad_norm: f64,
    /// Real (unpadded) tokens processed per second in this step.
    pub tokens_per_second: f64,
    pub tokens: u64,
    pub scored_tokens: u64,
    /// Wall time of the phases of this step, seconds.
    pub forward_seconds: f64,
    pub backward_seconds: f64,
    pub optimizer_seconds: f64,
    /// Training wall time so far (including before a resume), seconds.
    pub elapsed_seconds: f64,
    /// The evaluation after this step, when one ran.
    pub eval: Option<EvalMetrics>,
}

/// What a finished run reports.
#[derive(Debug, Clone)]
pub struct TrainOutcome {
    /// Optimizer steps trained (fewer than `planned_steps` when early stopping stopped the run).
    pub steps: u64,
    /// Optimizer steps the run was set up for (`max_steps`, or the epochs' steps).
    pub planned_steps: u64,
    pub final_loss: f64,
    pub tokens: u64,
    pub scored_tokens: u64,
    pub wall_seconds: f64,
    /// The step the run resumed from, if it did.
    pub resumed_from: Option<u64>,
    /// Checkpoints of this run found damaged and not resumed (newest first).
    pub damaged_checkpoints: Vec<DamagedCheckpoint>,
    /// metrics.jsonl contents, including steps before a resume.
    pub metrics_jsonl: String,
    /// Evaluation during training: the best step and the patience counter (default without).
    pub evaluation: EvaluationState,
    /// Early stopping ended the run (after `steps`).
    pub stopped_early: bool,
    /// The step whose adapter the variables hold at the end: the best evaluation's with
    /// `keep_best`, else the last step.
    pub kept_step: u64,
}

/// Why training stopped early.
#[derive(Debug, thiserror::Error)]
pub enum TrainError {
    #[error("{0}")]
    Invalid(String),
    #[error(
        "step {step}: {what} is not finite ({value}); lower the learning rate or check the data"
    )]
    NonFinite { step: u64, what: String, value: f64 },
    #[error("cancelled at step {step}")]
    Cancelled { step: u64 },
    #[error("step {step}: {context}: {source}")]
    Tensor {
        step: u64,
        context: String,
        source: candle_core::Error,
    },
    #[error(transparent)]
    Peft(#[from] PeftError),
    #[error("step {step}: data-parallel training: {source}")]
    Distributed { step: u64, source: Box<CommError> },
}

fn at_step<T>(step: u64, context: &str, result: candle_core::Result<T>) -> Result<T, TrainError> {
    result.map_err(|source| TrainError::Tensor {
        step,
        context: context.to_string(),
        source,
    })
}

/// The seeded stream of micro-batches over the sequences.
struct DataStream<'a> {
    sequences: &'a [Sequence],
    lengths: Vec<usize>,
    settings: &'a TrainerSettings,
    batches_per_epoch: u64,
    cached_epoch: Option<(u64, Vec<Vec<usize>>)>,
}

impl<'a> DataStream<'a> {
    fn new(sequences: &'a [Sequence], settings: &'a TrainerSettings) -> Self {
        let lengths: Vec<usize> = sequences.iter().map(|s| s.ids.len()).collect();
        let batches_per_epoch = sequences.len().div_ceil(settings.batch_size.max(1)) as u64;
        DataStream {
            sequences,
            lengths,
            settings,
            batches_per_epoch,
            cached_epoch: None,
        }
    }

    /// The rows (sequence indices) of global micro-batch `micro_batch`.
    fn rows(&mut self, micro_batch: u64) -> Vec<usize> {
        let epoch = micro_batch / self.batches_per_epoch;
        let position = (micro_batch % self.batches_per_epoch) as usize;
        if self.cached_epoch.as_ref().map(|(e, _)| *e) != Some(epoch) {
            let order = epoch_batches(
                &self.lengths,
                self.settings.batch_size,
                mix_seed(self.settings.seed, "data order"),
                epoch,
                self.settings.sort_by_length,
            );
            self.cached_epoch = Some((epoch, order));
        }
        let order = &self
            .cached_epoch
            .as_ref()
            .map(|(_, o)| o)
            .map_or(&[][..], |o| &o[..]);
        order[position].clone()
    }

    fn collate(&self, rows: &[usize]) -> HostBatch {
        collate(self.sequences, rows, self.settings.pad_id)
    }
}

/// The number of optimizer steps a run takes.
pub fn total_steps(examples: usize, settings: &TrainerSettings) -> u64 {
    if let Some(max_steps) = settings.max_steps {
        return max_steps;
    }
    let batches = examples.div_ceil(settings.batch_size.max(1)) as u64;
    batches.div_ceil(settings.accumulation.max(1) as u64) * u64::from(settings.epochs)
}

/// The global micro-batches `first..last` of optimizer step `step` (0-based), with
/// `batches_per_epoch` micro-batches an epoch and `accumulation` per step: an epoch's steps
/// never reach into the next epoch, so its last step may hold fewer.
pub fn step_micro_batches(step: u64, batches_per_epoch: u64, accumulation: u64) -> (u64, u64) {
    let batches_per_epoch = batches_per_epoch.max(1);
    let accumulation = accumulation.max(1);
    let steps_per_epoch = batches_per_epoch.div_ceil(accumulation);
    let (epoch, within) = (step / steps_per_epoch, step % steps_per_epoch);
    let start = epoch * batches_per_epoch;
    let first = start + within * accumulation;
    (first, (first + accumulation).min(start + batches_per_epoch))
}

fn synchronize(device: &Device, enabled: bool) -> candle_core::Result<()> {
    if enabled {
        device.synchronize()
    } else {
        Ok(())
    }
}

/// Train `adapter` (already injected into `model`) on `sequences`. Resumes from the newest
/// checkpoint of the same run if one exists. `observe` sees every step's metrics.
pub fn train(
    model: &dyn LossModel,
    adapter: &dyn Adapter,
    sequences: &[Sequence],
    settings: &TrainerSettings,
    cancel: &AtomicBool,
    observe: &mut dyn FnMut(&StepMetrics),
) -> Result<TrainOutcome, TrainError> {
    train_with_evaluation(model, adapter, sequences, None, settings, cancel, observe)
}

/// [`train`], evaluating on held-out sequences every `evaluation.every` steps and after the
/// last one: the figures go into the step's metrics, early stopping may end the run before
/// its planned steps, and with `keep_best` the adapter's variables end holding the best
/// evaluation's values. The best-so-far state, the patience counter and the best adapter travel
/// in checkpoints, so a resumed run ends as an uninterrupted one.
pub fn train_with_evaluation(
    model: &dyn LossModel,
    adapter: &dyn Adapter,
    sequences: &[Sequence],
    evaluation: Option<&Evaluation<'_>>,
    settings: &TrainerSettings,
    cancel: &AtomicBool,
    observe: &mut dyn FnMut(&StepMetrics),
) -> Result<TrainOutcome, TrainError> {
    train_data_parallel(
        model,
        adapter,
        sequences,
        evaluation,
        settings,
        &Solo,
        cancel,
        observe,
        &mut |_| {},
    )
}

/// How a run started, told before its first step (also in [`TrainOutcome`], which comes only when
/// training ends).
#[derive(Debug, Clone, Copy)]
pub struct Resumed<'a> {
    /// The checkpoint step the run resumed from, if it did.
    pub from: Option<u64>,
    /// Checkpoints of this run found damaged and not resumed (newest first).
    pub damaged: &'a [DamagedCheckpoint],
}

/// [`train_with_evaluation`] as rank `comm.rank()` of `comm.world_size()` (see
/// [`super::distributed`]): every rank builds the same global batches and trains on its strided
/// shard of each; the gradients are averaged before clipping and AdamW, so every rank holds the
/// same variables after every step. `batch_size` and `accumulation` are global (the run's
/// results do not depend on the world size). Only rank 0 writes checkpoints; every rank
/// resumes from the newest one (the checkpoint directory must be shared). A world of one
/// ([`Solo`]) is exactly [`train_with_evaluation`]. `resumed` is told how the run started (the
/// checkpoint resumed, the damaged ones skipped) once, before the first step.
#[allow(clippy::too_many_arguments)]
pub fn train_data_parallel(
    model: &dyn LossModel,
    adapter: &dyn Adapter,
    sequences: &[Sequence],
    evaluation: Option<&Evaluation<'_>>,
    settings: &TrainerSettings,
    comm: &dyn Communicator,
    cancel: &AtomicBool,
    observe: &mut dyn FnMut(&StepMetrics),
    resumed: &mut dyn FnMut(Resumed<'_>),
) -> Result<TrainOutcome, TrainError> {
    let (rank, world_size) = (comm.rank(), comm.world_size());
    let main_rank = rank == 0;
    if let Some(evaluation) = evaluation {
        if evaluation.every == 0 {
            return Err(TrainError::Invalid(
                "evaluation every 0 steps: use at least 1".into(),
            ));
        }
        if evaluation.sequences.is_empty() {
            return Err(TrainError::Invalid("no evaluation examples".into()));
        }
    }
    if sequences.is_empty() {
        return Err(TrainError::Invalid("no training examples".into()));
    }
    if let Some(index) = sequences.iter().position(|s| s.scored_tokens() == 0) {
        return Err(TrainError::Invalid(format!(
            "example {index} has no completion token to train on"
        )));
    }
    let device = model.device().clone();
    let variables = adapter.trainable_vars();
    if variables.is_empty() {
        return Err(TrainError::Invalid(
            "the adapter has no trainable variables".into(),
        ));
    }
    let variable_list: Vec<candle_core::Var> =
        variables.iter().map(|(_, var)| var.clone()).collect();
    let mut optimizer = at_step(
        0,
        "creating the optimizer",
        AdamW::new(variables.clone(), settings.adamw),
    )?;
    let steps = total_steps(sequences.len(), settings);
    let schedule = Schedule {
        kind: settings.schedule,
        base_lr: settings.learning_rate,
        warmup_steps: settings.warmup_steps,
        total_steps: steps,
    };
    let accumulation = settings.accumulation.max(1) as u64;
    let mut stream = DataStream::new(sequences, settings);

    let mut start_step = 0;
    let mut metrics_jsonl = String::new();
    let mut tokens = 0u64;
    let mut scored = 0u64;
    let mut elapsed_before = 0.0;
    let mut resumed_from = None;
    let mut damaged_checkpoints = Vec::new();
    let mut eval_state = EvaluationState::default();
    // A copy (own storage: the optimizer updates the variables in place) of the best
    // evaluation's variables, when the best adapter is kept.
    let mut best_variables: Option<Vec<(String, Tensor)>> = None;
    let keep_best = evaluation.is_some_and(|evaluation| evaluation.keep_best);
    if let Some(dir) = &settings.checkpoint_dir {
        let latest = checkpoint::latest(dir, &settings.run_key, &device)?;
        damaged_checkpoints = latest.damaged;
        if let Some(found) = latest.checkpoint {
            for (name, var) in &variables {
                let tensor = found.variables.get(name).ok_or_else(|| {
                    TrainError::Invalid(format!(
                        "checkpoint {} has no variable `{name}`",
                        found.path.display()
                    ))
                })?;
                at_step(found.state.step, "restoring a variable", var.set(tensor))?;
            }
            optimizer
                .load_state(&found.optimizer, found.state.step)
                .map_err(|message| {
                    TrainError::Invalid(format!("{}: {message}", found.path.display()))
                })?;
            start_step = found.state.step;
            metrics_jsonl = found.metrics;
            tokens = found.state.tokens;
            scored = found.state.scored_tokens;
            elapsed_before = found.state.elapsed_seconds;
            resumed_from = Some(start_step);
            eval_state = found.state.evaluation.clone().unwrap_or_default();
            if keep_best && eval_state.best_step.is_some() {
                let Some(best) = found.best else {
                    return Err(TrainError::Invalid(format!(
                        "checkpoint {} records a best step but holds no best adapter",
                        found.path.display()
                    )));
                };
                best_variables = Some(
                    variables
                        .iter()
                        .map(|(name, _)| {
                            best.get(name)
                                .cloned()
                                .map(|t| (name.clone(), t))
                                .ok_or_else(|| {
                                    TrainError::Invalid(format!(
                                        "checkpoint {}: the best adapter has no variable `{name}`",
                                        found.path.display()
                                    ))
                                })
                        })
                        .collect::<Result<_, _>>()?,
                );
            }
        }
    }
    resumed(Resumed {
        from: resumed_from,
        damaged: &damaged_checkpoints,
    });

    // Every rank has read the checkpoint before rank 0 may write the next one.
    comm.barrier().map_err(|source| TrainError::Distributed {
        step: start_step,
        source: Box::new(source),
    })?;
    let variable_tensors: Vec<&Tensor> = variable_list.iter().map(|v| v.as_tensor()).collect();

    let started = Instant::now();
    let mut final_loss = f64::NAN;
    let early_stopping = evaluation.and_then(|evaluation| evaluation.early_stopping);
    // A run resumed from the checkpoint of the step where patience ran out stops there.
    let mut stopped_early = eval_state.patience_ran_out(early_stopping);
    let mut trained = start_step;
    for step in start_step..steps {
        if stopped_early {
            break;
        }
        if cancel.load(Ordering::Relaxed) {
            // Stopping at a step boundary (Ctrl-C, SIGTERM): keep the steps done since the last
            // checkpoint, unless checkpoints are off or this step already has one.
            let unsaved = step > start_step
                && settings.checkpoint_every > 0
                && step % settings.checkpoint_every != 0;
            if let (true, true, Some(dir)) = (main_rank, unsaved, &settings.checkpoint_dir) {
                let state = settings.checkpoint_state(
                    step,
                    match step {
                        0 => 0,
                        done => {
                            step_micro_batches(done - 1, stream.batches_per_epoch, accumulation).1
                        }
                    },
                    (tokens, scored),
                    elapsed_before + started.elapsed().as_secs_f64(),
                    evaluation.map(|_| eval_state.clone()),
                );
                save_checkpoint(
                    dir,
                    &state,
                    &variables,
                    &optimizer,
                    &metrics_jsonl,
                    best_variables.as_deref(),
                )?;
            }
            return Err(TrainError::Cancelled { step });
        }
        let step_started = Instant::now();
        let (first, last) = step_micro_batches(step, stream.batches_per_epoch, accumulation);
        // The global micro-batches give the step's token counts; this rank computes its shard.
        let mut batches: Vec<HostBatch> = Vec::new();
        let (mut window_scored, mut window_tokens) = (0usize, 0usize);
        for m in first..last {
            let rows = stream.rows(m);
            let shard = shard_rows(&rows, rank, world_size);
            if world_size == 1 {
                let batch = stream.collate(&rows);
                (window_scored, window_tokens) = (
                    window_scored + batch.scored_tokens,
                    window_tokens + batch.tokens,
                );
                batches.push(batch);
            } else {
                let global = stream.collate(&rows);
                (window_scored, window_tokens) = (
                    window_scored + global.scored_tokens,
                    window_tokens + global.tokens,
                );
                // A global batch with fewer rows than ranks leaves this rank nothing.
                if !shard.is_empty() {
                    batches.push(stream.collate(&shard));
                }
            }
        }
        let mut gradients: Vec<Option<Tensor>> = vec![None; variables.len()];
        let mut loss_total = 0.0f64;
        let (mut forward_seconds, mut backward_seconds) = (0.0, 0.0);
        for (offset, batch) in batches.iter().enumerate() {
            let micro_batch = first + offset as u64;
            adapter.set_mode(AdapterMode::Train {
                seed: mix_seed(settings.seed, &format!("dropout {micro_batch}")),
            });
            // After the last optimizer step, so what it prepares holds this forward's values.
            adapter.prepare_forward()?;
            let phase = Instant::now();
            let pass = at_step(step + 1, "forward", model.forward_pass(batch))?;
            // The loss is read once the backward is queued: reading it here would make the host
            // wait for the forward's last kernel before walking the graph and queueing the
            // backward (on CUDA a gap per micro-batch). Detached: no graph is kept alive by it.
            let loss = pass.loss_sum().detach();
            at_step(
                step + 1,
                "forward",
                synchronize(&device, settings.synchronize_phases),
            )?;
            forward_seconds += phase.elapsed().as_secs_f64();
            let phase = Instant::now();
            // Only the variables' gradients come back; the rest of the store is already freed.
            let grads = at_step(
                step + 1,
                "backward",
                pass.backward(backward_scale(world_size, window_scored), &variable_list),
            )?;
            let loss_value = at_step(
                step + 1,
                "reading the loss",
                loss.to_dtype(DType::F64).and_then(|l| l.to_scalar::<f64>()),
            )?;
            if !loss_value.is_finite() {
                return Err(TrainError::NonFinite {
                    step: step + 1,
                    what: format!("the loss of micro-batch {}", offset + 1),
                    value: loss_value,
                });
            }
            loss_total += loss_value;
            for (slot, gradient) in gradients.iter_mut().zip(grads) {
                if let Some(gradient) = gradient {
                    *slot = Some(match slot.take() {
                        Some(sum) => {
                            at_step(step + 1, "accumulating gradients", sum.add(&gradient))?
                        }
                        None => gradient,
                    });
                }
            }
            at_step(
                step + 1,
                "backward",
                synchronize(&device, settings.synchronize_phases),
            )?;
            backward_seconds += phase.elapsed().as_secs_f64();
        }
        adapter.set_mode(AdapterMode::Eval);

        let phase = Instant::now();
        if world_size > 1 {
            let distributed = |source| TrainError::Distributed {
                step: step + 1,
                source: Box::new(source),
            };
            average_gradients(
                comm,
                &mut gradients,
                &variable_tensors,
                DEFAULT_BUCKET_ELEMENTS,
            )
            .map_err(distributed)?;
            // The step's loss over the whole global batch, for the metrics.
            let local = at_step(
                step + 1,
                "summing the loss",
                Tensor::new(&[loss_total as f32], &device),
            )?;
            let summed = comm.all_reduce_sum(&local).map_err(distributed)?;
            loss_total = at_step(
                step + 1,
                "summing the loss",
                summed.to_vec1::<f32>().map(|v| f64::from(v[0])),
            )?;
        }
        let norm = at_step(step + 1, "gradient norm", global_norm(&gradients))?;
        if !norm.is_finite() {
            let culprit = variables
                .iter()
                .zip(&gradients)
                .find(|(_, g)| {
                    g.as_ref()
                        .and_then(|g| global_norm(std::slice::from_ref(&Some(g.clone()))).ok())
                        .is_some_and(|n| !n.is_finite())
                })
                .map_or_else(String::new, |((name, _), _)| {
                    format!(" (first in `{name}`)")
                });
            return Err(TrainError::NonFinite {
                step: step + 1,
                what: format!("the gradient norm{culprit}"),
                value: norm,
            });
        }
        // Clipping is folded into the update (one multi-tensor launch on CUDA).
        let grad_scale = settings
            .max_grad_norm
            .map_or(1.0, |max_norm| clip_coefficient(norm, max_norm));
        let learning_rate = schedule.learning_rate(step);
        at_step(
            step + 1,
            "optimizer",
            optimizer.step_scaled(&gradients, learning_rate, grad_scale),
        )?;
        at_step(
            step + 1,
            "optimizer",
            synchronize(&device, settings.synchronize_phases),
        )?;
        let optimizer_seconds = phase.elapsed().as_secs_f64();
        drop(gradients);

        let step_seconds = step_started.elapsed().as_secs_f64();
        tokens += window_tokens as u64;
        scored += window_scored as u64;
        final_loss = loss_total / window_scored as f64;
        let done = step + 1;
        trained = done;
        // Evaluation (not counted in the step's tokens per second).
        let mut eval = None;
        if let Some(evaluation) = evaluation.filter(|e| done % e.every == 0 || done == steps) {
            let figures = evaluate(
                model,
                adapter,
                evaluation.sequences,
                evaluation.batch_size,
                settings.pad_id,
                done,
            )?;
            let verdict = eval_state.record(done, figures.loss, evaluation.early_stopping);
            if verdict.new_best && evaluation.keep_best {
                best_variables = Some(
                    variables
                        .iter()
                        .map(|(name, var)| Ok((name.clone(), var.as_tensor().copy()?)))
                        .collect::<candle_core::Result<_>>()
                        .map_err(|source| TrainError::Tensor {
                            step: done,
                            context: "keeping the best adapter".into(),
                            source,
                        })?,
                );
            }
            stopped_early = verdict.stop;
            eval = Some(figures);
        }
        let metrics = StepMetrics {
            step: step + 1,
            total_steps: steps,
            epoch: last as f64 / stream.batches_per_epoch as f64,
            loss: final_loss,
            lr: learning_rate,
            grad_norm: norm,
            tokens_per_second: window_tokens as f64 / step_seconds.max(1e-9),
            tokens,
            scored_tokens: scored,
            forward_seconds,
            backward_seconds,
            optimizer_seconds,
            elapsed_seconds: elapsed_before + started.elapsed().as_secs_f64(),
            eval,
        };
        let line = serde_json::to_string(&metrics_line(&metrics))
            .map_err(|error| TrainError::Invalid(format!("metrics: {error}")))?;
        metrics_jsonl.push_str(&line);
        metrics_jsonl.push('\n');
        observe(&metrics);

        if main_rank
            && settings.checkpoint_every > 0
            && done % settings.checkpoint_every == 0
            && done < steps
        {
            if let Some(dir) = &settings.checkpoint_dir {
                let state = settings.checkpoint_state(
                    done,
                    last,
                    (tokens, scored),
                    metrics.elapsed_seconds,
                    evaluation.map(|_| eval_state.clone()),
                );
                save_checkpoint(
                    dir,
                    &state,
                    &variables,
                    &optimizer,
                    &metrics_jsonl,
                    best_variables.as_deref(),
                )?;
            }
        }
    }
    // The kept adapter: the best evaluation's, restored into the variables.
    let mut kept_step = trained;
    if let (Some(best), Some(best_step)) = (&best_variables, eval_state.best_step) {
        for ((_, var), (_, tensor)) in variables.iter().zip(best) {
            at_step(trained, "restoring the best adapter", var.set(tensor))?;
        }
        kept_step = best_step;
    }
    Ok(TrainOutcome {
        steps: trained,
        planned_steps: steps,
        final_loss,
        tokens,
        scored_tokens: scored,
        wall_seconds: elapsed_before + started.elapsed().as_secs_f64(),
        resumed_from,
        damaged_checkpoints,
        metrics_jsonl,
        evaluation: eval_state,
        stopped_early,
        kept_step,
    })
}

/// Save a resumable checkpoint of the adapter variables and the optimizer.
fn save_checkpoint(
    dir: &std::path::Path,
    state: &CheckpointState,
    variables: &[(String, candle_core::Var)],
    optimizer: &AdamW,
    metrics_jsonl: &str,
    best: Option<&[(String, Tensor)]>,
) -> Result<(), TrainError> {
    let current: Vec<(String, Tensor)> = variables
        .iter()
        .map(|(name, var)| (name.clone(), var.as_tensor().clone()))
        .collect();
    checkpoint::save(
        dir,
        state,
        &current,
        &optimizer.state_tensors(),
        metrics_jsonl,
        best,
    )?;
    Ok(())
}

/// The metrics.jsonl record of a step (the documented subset of [`StepMetrics`]): only what the
/// inputs determine, no timings, so an uninterrupted run, a resumed one and a forced retrain write
/// the same bytes (the file is part of a content-addressed artifact). Timings reach the user
/// through the progress callback and the run's outcome.
/// A step with an evaluation adds `eval_loss`, `eval_perplexity` and `eval_scored_tokens`.
fn metrics_line(metrics: &StepMetrics) -> serde_json::Value {
    let mut line = serde_json::json!({
        "step": metrics.step,
        "epoch": metrics.epoch,
        "loss": metrics.loss,
        "lr": metrics.lr,
        "grad_norm": metrics.grad_norm,
        "tokens": metrics.tokens,
        "scored_tokens": metrics.scored_tokens,
    });
    if let (Some(eval), Some(object)) = (&metrics.eval, line.as_object_mut()) {
        object.insert("eval_loss".into(), eval.loss.into());
        object.insert("eval_perplexity".into(), eval.perplexity.into());
        object.insert("eval_scored_tokens".into(), eval.scored_tokens.into());
    }
    line
}

/// Restore named tensors into the adapter's variables (e.g. from a saved adapter).
pub fn restore_variables(
    adapter: &dyn Adapter,
    tensors: &HashMap<String, Tensor>,
) -> Result<(), TrainError> {
    for (name, var) in adapter.trainable_vars() {
        let tensor = tensors
            .get(&name)
            .ok_or_else(|| TrainError::Invalid(format!("no tensor `{name}` to restore")))?;
        at_step(0, "restoring a variable", var.set(tensor))?;
    }
    Ok(())
}
