//! The `evaluate` stage. (Skeleton: the owner of this stage kind implements it.)

use crate::config::EvaluateConfig;

use super::{Stage, StageContext, StageError, StageOutcome};

pub struct EvaluateStage {
    config: EvaluateConfig,
}

impl EvaluateStage {
    pub fn new(config: EvaluateConfig) -> Self {
        EvaluateStage { config }
    }
}

impl Stage for EvaluateStage {
    fn run(&self, _ctx: &StageContext<'_>) -> Result<StageOutcome, StageError> {
        let _ = &self.config;
        Err(StageError::Internal(
            "the evaluate stage is not built yet".into(),
        ))
    }
}
