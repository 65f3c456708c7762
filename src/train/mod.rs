//! Training machinery: our own AdamW (f32 moments, decoupled weight decay, parameter groups,
//! serializable state), global-norm clipping, learning-rate schedules, resumable checkpoints and
//! the training loop. Knows nothing of pipelines or stage configs (the train stage translates),
//! nor of a particular model or PEFT method (it sees a [`trainer::LossModel`] and an
//! [`crate::peft::Adapter`]). Never prints.

pub mod bench;
pub mod checkpoint;
pub mod distributed;
pub mod evaluation;
pub mod layered;
pub mod memory;
pub mod optimizer;
pub mod pass;
pub mod peak_memory;
pub mod schedule;
pub mod tensorboard;
pub mod trainer;

pub use evaluation::{EarlyStopping, EvalMetrics, Evaluation, EvaluationState};
pub use layered::{CheckpointedLoss, HookSource};
pub use optimizer::{AdamW, AdamWSettings};
pub use schedule::{Schedule, ScheduleKind};
pub use trainer::{
    train, train_data_parallel, train_with_evaluation, CausalLmLoss, LossModel, Resumed,
    StepMetrics, TrainError, TrainOutcome, TrainerSettings,
};
