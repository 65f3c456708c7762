//! The `template` stage. (Skeleton: the owner of this stage kind implements it.)

use crate::config::TemplateConfig;

use super::{Stage, StageContext, StageError, StageOutcome};

pub struct TemplateStage {
    config: TemplateConfig,
}

impl TemplateStage {
    pub fn new(config: TemplateConfig) -> Self {
        TemplateStage { config }
    }
}

impl Stage for TemplateStage {
    fn run(&self, _ctx: &StageContext<'_>) -> Result<StageOutcome, StageError> {
        let _ = &self.config;
        Err(StageError::Internal(
            "the template stage is not built yet".into(),
        ))
    }
}
