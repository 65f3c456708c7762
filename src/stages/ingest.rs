//! The `ingest` stage. (Skeleton: the owner of this stage kind implements it.)

use crate::config::IngestConfig;

use super::{Stage, StageContext, StageError, StageOutcome};

pub struct IngestStage {
    config: IngestConfig,
}

impl IngestStage {
    pub fn new(config: IngestConfig) -> Self {
        IngestStage { config }
    }
}

impl Stage for IngestStage {
    fn run(&self, _ctx: &StageContext<'_>) -> Result<StageOutcome, StageError> {
        let _ = &self.config;
        Err(StageError::Internal(
            "the ingest stage is not built yet".into(),
        ))
    }
}
