//! The `export` stage. (Skeleton: the owner of this stage kind implements it.)

use crate::config::ExportConfig;

use super::{Stage, StageContext, StageError, StageOutcome};

pub struct ExportStage {
    config: ExportConfig,
}

impl ExportStage {
    pub fn new(config: ExportConfig) -> Self {
        ExportStage { config }
    }
}

impl Stage for ExportStage {
    fn run(&self, _ctx: &StageContext<'_>) -> Result<StageOutcome, StageError> {
        let _ = &self.config;
        Err(StageError::Internal(
            "the export stage is not built yet".into(),
        ))
    }
}
