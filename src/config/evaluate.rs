//! Config of the `evaluate` stage kind and its semantic checks. (Skeleton: the owner of this stage
//! kind fills in the fields.)

use std::path::Path;

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::{CheckContext, InputFile, Problem, StageSpec, UpstreamRef};

/// The `evaluate` stage.
#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct EvaluateConfig {
    /// Upstream train stage.
    pub model: String,
}

impl StageSpec for EvaluateConfig {
    fn upstream(&self) -> Vec<UpstreamRef> {
        vec![UpstreamRef {
            key: "model",
            stage: self.model.clone(),
        }]
    }

    fn input_files(&self, _project_dir: &Path) -> Result<Vec<InputFile>, String> {
        Ok(Vec::new())
    }

    fn output_columns(&self, _cx: &CheckContext<'_>, _stage: &str) -> Option<Vec<String>> {
        None
    }

    fn check(&self, _cx: &CheckContext<'_>, _at: &str, _problems: &mut Vec<Problem>) {}
}
