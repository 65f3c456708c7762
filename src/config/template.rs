//! Config of the `template` stage kind and its semantic checks. (Skeleton: the owner of this stage
//! kind fills in the fields.)

use std::path::Path;

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::{CheckContext, InputFile, Problem, StageSpec, UpstreamRef};

/// The `template` stage.
#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct TemplateConfig {
    /// Upstream stage whose rows are rendered.
    pub input: String,
}

impl StageSpec for TemplateConfig {
    fn upstream(&self) -> Vec<UpstreamRef> {
        vec![UpstreamRef {
            key: "input",
            stage: self.input.clone(),
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
