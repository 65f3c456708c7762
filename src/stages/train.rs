//! The `train` stage. (Skeleton: the owner of this stage kind implements it.)

use crate::config::TrainConfig;

use super::{Stage, StageContext, StageError, StageOutcome};

pub struct TrainStage {
    config: TrainConfig,
}

impl TrainStage {
    pub fn new(config: TrainConfig) -> Self {
        TrainStage { config }
    }
}

impl Stage for TrainStage {
    fn run(&self, _ctx: &StageContext<'_>) -> Result<StageOutcome, StageError> {
        let _ = &self.config;
        Err(StageError::Internal(
            "the train stage is not built yet".into(),
        ))
    }
}
