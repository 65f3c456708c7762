//! Running the export stage in-process as the executor does (run, then publish) on a train
//! artifact, for tests/export.rs and tests/peft_python.rs.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;

use peftpipe::config::ExportConfig;
use peftpipe::stages::export::ExportStage;
use peftpipe::stages::{NullSink, RunOptions, Stage, StageContext};

/// Run the export stage (run + publish) in `project` with the given train artifact.
pub fn export(
    project: &Path,
    train: &Path,
    config: ExportConfig,
    allow_outside_project: bool,
) -> Result<PathBuf, peftpipe::stages::StageError> {
    let out_dir = project.join(".artifact");
    std::fs::create_dir_all(&out_dir)?;
    let upstream = BTreeMap::from([("tune".to_string(), train.to_path_buf())]);
    let cancel = AtomicBool::new(false);
    let options = RunOptions {
        allow_outside_project,
        ..RunOptions::default()
    };
    let ctx = StageContext {
        name: "export",
        project_dir: project,
        out_dir: &out_dir,
        upstream: &upstream,
        seed: 0,
        progress: &NullSink,
        cancel: &cancel,
        options: &options,
        fingerprint: "",
        upstream_outcomes: &Default::default(),
        inputs: &Default::default(),
        checkpoint_dir: None,
        resume: true,
    };
    let stage = ExportStage::new(config);
    stage.run(&ctx)?;
    stage.publish(&out_dir, &ctx)?;
    Ok(out_dir)
}
