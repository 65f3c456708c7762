//! Resumable training checkpoints: the trainable variables, the optimizer state, the metrics so
//! far and a small state record (step, data position, seeds, the run key that says which run the
//! checkpoint belongs to). Layout of a checkpoint directory:
//!
//! ```text
//! <dir>/step-00000040/adapter.safetensors     trainable variables by name (f32)
//!                     optimizer.safetensors   exp_avg/<name>, exp_avg_sq/<name> (f32)
//!                     metrics.jsonl           metrics lines of steps 1..=40
//!                     state.json              CheckpointState
//! ```
//! A checkpoint is written into `.step-….tmp` and renamed into place, so a kill mid-write never
//! leaves a directory a later run trusts; older checkpoints are removed after the rename.
//! Randomness is counter-based (ChaCha streams derived from the seed and the step or micro-batch
//! index), so the seed plus the step *is* the RNG state. Knows nothing of models or data files.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor};
use serde::{Deserialize, Serialize};

use crate::peft::{safetensors_bytes, write_atomic, PeftError};

/// Bump when the layout or the meaning of a field changes (older checkpoints are then ignored).
pub const CHECKPOINT_VERSION: u32 = 1;

/// The small record of where a run stood.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CheckpointState {
    pub version: u32,
    /// Digest of everything that determines the run (config, data, model); a checkpoint of a
    /// different run is never resumed.
    pub run_key: String,
    /// Optimizer steps completed.
    pub step: u64,
    /// Micro-batches consumed (the data position: epoch = position / batches per epoch).
    pub micro_batches: u64,
    /// The seed all random streams derive from (init, data order per epoch, dropout per micro-batch).
    pub seed: u64,
    /// Real tokens and scored tokens seen so far.
    pub tokens: u64,
    pub scored_tokens: u64,
    /// Training wall time before this checkpoint, seconds.
    pub elapsed_seconds: f64,
}

/// A checkpoint read back.
pub struct Checkpoint {
    pub state: CheckpointState,
    pub variables: HashMap<String, Tensor>,
    pub optimizer: HashMap<String, Tensor>,
    pub metrics: String,
    pub path: PathBuf,
}

fn step_dir_name(step: u64) -> String {
    format!("step-{step:08}")
}

fn io_error(path: &Path) -> impl Fn(std::io::Error) -> PeftError + '_ {
    move |source| PeftError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// Write a checkpoint atomically into `dir` and remove older ones. Returns its path.
pub fn save(
    dir: &Path,
    state: &CheckpointState,
    variables: &[(String, Tensor)],
    optimizer: &[(String, Tensor)],
    metrics: &str,
) -> Result<PathBuf, PeftError> {
    std::fs::create_dir_all(dir).map_err(io_error(dir))?;
    let name = step_dir_name(state.step);
    let temp = dir.join(format!(".{name}.tmp"));
    if temp.exists() {
        std::fs::remove_dir_all(&temp).map_err(io_error(&temp))?;
    }
    std::fs::create_dir_all(&temp).map_err(io_error(&temp))?;
    write_atomic(
        &temp.join("adapter.safetensors"),
        &safetensors_bytes(variables)?,
    )?;
    write_atomic(
        &temp.join("optimizer.safetensors"),
        &safetensors_bytes(optimizer)?,
    )?;
    write_atomic(&temp.join("metrics.jsonl"), metrics.as_bytes())?;
    let state_json = serde_json::to_vec_pretty(state)
        .map_err(|error| PeftError::invalid(format!("checkpoint state: {error}")))?;
    write_atomic(&temp.join("state.json"), &state_json)?;
    let final_path = dir.join(&name);
    if final_path.exists() {
        std::fs::remove_dir_all(&final_path).map_err(io_error(&final_path))?;
    }
    std::fs::rename(&temp, &final_path).map_err(io_error(&final_path))?;
    // Only the newest checkpoint is needed to resume.
    for entry in std::fs::read_dir(dir).map_err(io_error(dir))?.flatten() {
        let entry_name = entry.file_name().to_string_lossy().into_owned();
        if entry_name.starts_with("step-") && entry_name != name {
            std::fs::remove_dir_all(entry.path()).map_err(io_error(&entry.path()))?;
        }
    }
    Ok(final_path)
}

/// The newest complete checkpoint in `dir` that belongs to the run `run_key`, if any.
/// Checkpoints of other runs or versions are ignored (not deleted: the caller decides).
pub fn latest(dir: &Path, run_key: &str, device: &Device) -> Result<Option<Checkpoint>, PeftError> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Ok(None);
    };
    let mut candidates: Vec<PathBuf> = entries
        .flatten()
        .filter(|entry| entry.file_name().to_string_lossy().starts_with("step-"))
        .map(|entry| entry.path())
        .collect();
    candidates.sort();
    while let Some(path) = candidates.pop() {
        let state_path = path.join("state.json");
        let Ok(text) = std::fs::read_to_string(&state_path) else {
            continue;
        };
        let Ok(state) = serde_json::from_str::<CheckpointState>(&text) else {
            continue;
        };
        if state.version != CHECKPOINT_VERSION || state.run_key != run_key {
            continue;
        }
        let load = |file: &str| -> Result<HashMap<String, Tensor>, PeftError> {
            let file_path = path.join(file);
            candle_core::safetensors::load(&file_path, device).map_err(|source| PeftError::Tensor {
                context: format!("reading checkpoint {}", file_path.display()),
                source,
            })
        };
        let metrics_path = path.join("metrics.jsonl");
        let metrics = std::fs::read_to_string(&metrics_path).map_err(io_error(&metrics_path))?;
        return Ok(Some(Checkpoint {
            variables: load("adapter.safetensors")?,
            optimizer: load("optimizer.safetensors")?,
            metrics,
            state,
            path,
        }));
    }
    Ok(None)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn state(step: u64, key: &str) -> CheckpointState {
        CheckpointState {
            version: CHECKPOINT_VERSION,
            run_key: key.into(),
            step,
            micro_batches: step * 2,
            seed: 5,
            tokens: 100,
            scored_tokens: 40,
            elapsed_seconds: 1.5,
        }
    }

    #[test]
    fn save_keeps_only_the_newest_and_latest_filters_by_run() {
        let dir = tempfile::tempdir().unwrap();
        let tensor = Tensor::new(&[1.0f32, 2.0], &Device::Cpu).unwrap();
        let vars = vec![("a".to_string(), tensor.clone())];
        let opt = vec![("exp_avg/a".to_string(), tensor)];
        save(dir.path(), &state(2, "run"), &vars, &opt, "{\"step\":1}\n").unwrap();
        save(
            dir.path(),
            &state(4, "run"),
            &vars,
            &opt,
            "{\"step\":1}\n{\"step\":2}\n",
        )
        .unwrap();
        let names: Vec<String> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        assert_eq!(names, vec!["step-00000004".to_string()]);
        let found = latest(dir.path(), "run", &Device::Cpu).unwrap().unwrap();
        assert_eq!(found.state, state(4, "run"));
        assert_eq!(found.metrics.lines().count(), 2);
        assert_eq!(
            found.variables["a"].to_vec1::<f32>().unwrap(),
            vec![1.0, 2.0]
        );
        assert!(latest(dir.path(), "other run", &Device::Cpu)
            .unwrap()
            .is_none());
    }

    #[test]
    fn an_incomplete_checkpoint_is_never_trusted() {
        let dir = tempfile::tempdir().unwrap();
        // A kill before the rename leaves only the temp dir; one before state.json leaves no state.
        std::fs::create_dir_all(dir.path().join(".step-00000006.tmp")).unwrap();
        std::fs::create_dir_all(dir.path().join("step-00000008")).unwrap();
        assert!(latest(dir.path(), "run", &Device::Cpu).unwrap().is_none());
        assert!(latest(&dir.path().join("missing"), "run", &Device::Cpu)
            .unwrap()
            .is_none());
    }
}
