//! Config of the `export` stage kind and its semantic checks. (Skeleton: the owner of this stage
//! kind fills in the fields.)

use std::path::Path;

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::{CheckContext, InputFile, Problem, StageSpec, UpstreamRef};

/// The `export` stage.
#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ExportConfig {
    /// Upstream train stage.
    pub from: String,
}

impl StageSpec for ExportConfig {
    fn upstream(&self) -> Vec<UpstreamRef> {
        vec![UpstreamRef {
            key: "from",
            stage: self.from.clone(),
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
