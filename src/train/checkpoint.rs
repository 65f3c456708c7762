//! Resumable training checkpoints: the trainable variables, the optimizer state, the metrics so
//! far and a small state record (step, data position, seeds, the run key that says which run the
//! checkpoint belongs to). Layout of a checkpoint directory:
//!
//! ```text
//! <dir>/step-00000040/adapter.safetensors     trainable variables by name (f32)
//!                     optimizer.safetensors   exp_avg/<name>, exp_avg_sq/<name> (f32)
//!                     metrics.jsonl           metrics lines of steps 1..=40
//!                     state.json              CheckpointState
//!                     best.safetensors        the best evaluation's variables (only when the
//!                                             run evaluates and keeps its best adapter)
//! ```
//! A checkpoint is written into a uniquely named hidden `.step-….tmp-XXXXXX` and renamed into
//! place, so a kill mid-write never leaves a directory a later run trusts; older checkpoints and
//! leftover temporaries are removed after the rename. Only one writer at a time: the train stage
//! holds the directory's lock ([`CheckpointDir`]) while it trains; the directory belongs to one
//! pipeline, stage and fingerprint (the cache's `checkpoints/<pipeline>/<stage>/<fingerprint>/`,
//! collected by `gc` once orphaned). Names not starting with `.` are complete checkpoints, the
//! contract `gc` relies on.
//! Randomness is counter-based (ChaCha streams derived from the seed and the step or micro-batch
//! index), so the seed plus the step *is* the RNG state. Knows nothing of models or data files.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor};
use serde::{Deserialize, Serialize};

use super::evaluation::EvaluationState;
use crate::cache::gc::{lock_checkpoint_dir, CHECKPOINT_LOCK};
use crate::cache::CacheLock;
use crate::peft::{safetensors_bytes, write_atomic, PeftError};

/// Bump when the layout or the meaning of a field changes (older checkpoints are then ignored).
pub const CHECKPOINT_VERSION: u32 = 1;

/// Test-only: `PEFTPIPE_TEST_CHECKPOINT_DELAY=<milliseconds>` makes every checkpoint write pause
/// that long halfway (the adapter written, the rest not), so the crash tests can kill the binary
/// in the middle of a checkpoint write. Not for users.
pub const CHECKPOINT_DELAY_ENV: &str = "PEFTPIPE_TEST_CHECKPOINT_DELAY";

fn hold_for_tests() {
    let delay = std::env::var(CHECKPOINT_DELAY_ENV)
        .ok()
        .and_then(|value| value.trim().parse::<u64>().ok());
    if let Some(milliseconds) = delay {
        std::thread::sleep(std::time::Duration::from_millis(milliseconds));
    }
}

/// The small record of where a run stood.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CheckpointState {
    pub version: u32,
    /// Digest of everything that determines the run (the train stage's fingerprint digest:
    /// config, stage name, seed, data, model weights, tokenizer, tool version, device); a
    /// checkpoint of a different run is never resumed.
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
    /// Evaluation during training: the best step and loss so far and the patience counter
    /// (absent when the run does not evaluate).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub evaluation: Option<EvaluationState>,
}

/// A checkpoint read back.
pub struct Checkpoint {
    pub state: CheckpointState,
    pub variables: HashMap<String, Tensor>,
    pub optimizer: HashMap<String, Tensor>,
    pub metrics: String,
    /// The best evaluation's variables, when the run keeps its best adapter.
    pub best: Option<HashMap<String, Tensor>>,
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

/// A checkpoint directory this process holds: its lock (fs4, `.lock` inside) is taken when it is
/// acquired and released when it is dropped, so two runs never write one directory at once.
pub struct CheckpointDir {
    path: PathBuf,
    _lock: CacheLock,
}

impl CheckpointDir {
    /// Create `dir` if needed and take its lock without waiting; `None` when another run holds it.
    pub fn acquire(dir: &Path) -> Result<Option<CheckpointDir>, PeftError> {
        let lock = lock_checkpoint_dir(dir).map_err(|error| {
            PeftError::invalid(format!("checkpoint directory {}: {error}", dir.display()))
        })?;
        Ok(lock.map(|lock| CheckpointDir {
            path: dir.to_path_buf(),
            _lock: lock,
        }))
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Remove every checkpoint and temporary in the directory (a fresh start), keeping the lock.
    pub fn clear(&self) -> Result<(), PeftError> {
        for entry in std::fs::read_dir(&self.path)
            .map_err(io_error(&self.path))?
            .flatten()
        {
            if entry.file_name() != CHECKPOINT_LOCK {
                remove_entry(&entry.path())?;
            }
        }
        Ok(())
    }

    /// Remove the directory (the run it served is complete) and release the lock.
    pub fn remove(self) -> Result<(), PeftError> {
        self.clear()?;
        // The lock file goes last, while still held; an empty directory is all that could stay.
        let _ = std::fs::remove_file(self.path.join(CHECKPOINT_LOCK));
        let _ = std::fs::remove_dir(&self.path);
        Ok(())
    }
}

fn remove_entry(path: &Path) -> Result<(), PeftError> {
    let result = if path.is_dir() {
        std::fs::remove_dir_all(path)
    } else {
        std::fs::remove_file(path)
    };
    match result {
        Err(error) if error.kind() != std::io::ErrorKind::NotFound => Err(PeftError::Io {
            path: path.to_path_buf(),
            source: error,
        }),
        _ => Ok(()),
    }
}

/// Write a checkpoint atomically into `dir` and remove older ones and leftover temporaries.
/// Returns its path. The caller is the directory's only writer (it holds its [`CheckpointDir`]).
pub fn save(
    dir: &Path,
    state: &CheckpointState,
    variables: &[(String, Tensor)],
    optimizer: &[(String, Tensor)],
    metrics: &str,
    best: Option<&[(String, Tensor)]>,
) -> Result<PathBuf, PeftError> {
    std::fs::create_dir_all(dir).map_err(io_error(dir))?;
    let name = step_dir_name(state.step);
    let temp = tempfile::Builder::new()
        .prefix(&format!(".{name}.tmp-"))
        .tempdir_in(dir)
        .map_err(io_error(dir))?
        .keep();
    write_atomic(
        &temp.join("adapter.safetensors"),
        &safetensors_bytes(variables)?,
    )?;
    hold_for_tests();
    write_atomic(
        &temp.join("optimizer.safetensors"),
        &safetensors_bytes(optimizer)?,
    )?;
    write_atomic(&temp.join("metrics.jsonl"), metrics.as_bytes())?;
    if let Some(best) = best {
        write_atomic(&temp.join("best.safetensors"), &safetensors_bytes(best)?)?;
    }
    let state_json = serde_json::to_vec_pretty(state)
        .map_err(|error| PeftError::invalid(format!("checkpoint state: {error}")))?;
    write_atomic(&temp.join("state.json"), &state_json)?;
    let final_path = dir.join(&name);
    if final_path.exists() {
        std::fs::remove_dir_all(&final_path).map_err(io_error(&final_path))?;
    }
    std::fs::rename(&temp, &final_path).map_err(io_error(&final_path))?;
    // Only the newest checkpoint is needed to resume; temporaries are a killed writer's.
    for entry in std::fs::read_dir(dir).map_err(io_error(dir))?.flatten() {
        let entry_name = entry.file_name().to_string_lossy().into_owned();
        let older = entry_name.starts_with("step-") && entry_name != name;
        let temporary = entry_name.starts_with(".step-");
        if older || temporary {
            remove_entry(&entry.path())?;
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
        // A checkpoint that cannot be read whole is not trusted: try the next older one.
        let load = |file: &str| candle_core::safetensors::load(path.join(file), device).ok();
        let (Some(variables), Some(optimizer), Ok(metrics)) = (
            load("adapter.safetensors"),
            load("optimizer.safetensors"),
            std::fs::read_to_string(path.join("metrics.jsonl")),
        ) else {
            continue;
        };
        let best = if path.join("best.safetensors").exists() {
            let Some(best) = load("best.safetensors") else {
                continue;
            };
            Some(best)
        } else {
            None
        };
        return Ok(Some(Checkpoint {
            variables,
            optimizer,
            metrics,
            best,
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
            evaluation: None,
        }
    }

    #[test]
    fn save_keeps_only_the_newest_and_latest_filters_by_run() {
        let dir = tempfile::tempdir().unwrap();
        let tensor = Tensor::new(&[1.0f32, 2.0], &Device::Cpu).unwrap();
        let vars = vec![("a".to_string(), tensor.clone())];
        let opt = vec![("exp_avg/a".to_string(), tensor)];
        save(
            dir.path(),
            &state(2, "run"),
            &vars,
            &opt,
            "{\"step\":1}\n",
            None,
        )
        .unwrap();
        save(
            dir.path(),
            &state(4, "run"),
            &vars,
            &opt,
            "{\"step\":1}\n{\"step\":2}\n",
            None,
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
    fn the_evaluation_state_and_the_best_adapter_round_trip() {
        let dir = tempfile::tempdir().unwrap();
        let current = vec![(
            "a".to_string(),
            Tensor::new(&[1.0f32], &Device::Cpu).unwrap(),
        )];
        let best = vec![(
            "a".to_string(),
            Tensor::new(&[0.5f32], &Device::Cpu).unwrap(),
        )];
        let mut with_evaluation = state(6, "run");
        with_evaluation.evaluation = Some(EvaluationState {
            best_step: Some(4),
            best_loss: Some(1.25),
            evaluations_without_improvement: 1,
        });
        save(
            dir.path(),
            &with_evaluation,
            &current,
            &current,
            "",
            Some(&best),
        )
        .unwrap();
        let found = latest(dir.path(), "run", &Device::Cpu).unwrap().unwrap();
        assert_eq!(found.state, with_evaluation);
        assert_eq!(
            found.best.unwrap()["a"].to_vec1::<f32>().unwrap(),
            vec![0.5]
        );
        // A best adapter that cannot be read makes the whole checkpoint untrusted.
        std::fs::write(dir.path().join("step-00000006/best.safetensors"), "half").unwrap();
        assert!(latest(dir.path(), "run", &Device::Cpu).unwrap().is_none());
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

    #[test]
    fn one_holder_at_a_time_and_clear_keeps_the_lock() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("quick/train/abc");
        let held = CheckpointDir::acquire(&path).unwrap().expect("free");
        assert!(CheckpointDir::acquire(&path).unwrap().is_none(), "held");
        let tensor = Tensor::new(&[1.0f32], &Device::Cpu).unwrap();
        let vars = vec![("a".to_string(), tensor)];
        save(held.path(), &state(2, "run"), &vars, &vars, "", None).unwrap();
        held.clear().unwrap();
        assert!(latest(held.path(), "run", &Device::Cpu).unwrap().is_none());
        assert!(
            CheckpointDir::acquire(&path).unwrap().is_none(),
            "still held"
        );
        held.remove().unwrap();
        assert!(!path.exists());
        assert!(CheckpointDir::acquire(&path).unwrap().is_some());
    }

    #[test]
    fn temporaries_are_unique_and_a_killed_writers_are_cleaned_up() {
        let dir = tempfile::tempdir().unwrap();
        // A writer killed mid-save left its temporary (same step, fixed name in older versions).
        let stale = dir.path().join(".step-00000002.tmp");
        std::fs::create_dir_all(&stale).unwrap();
        std::fs::write(stale.join("adapter.safetensors"), "half").unwrap();
        let tensor = Tensor::new(&[3.0f32], &Device::Cpu).unwrap();
        let vars = vec![("a".to_string(), tensor)];
        save(dir.path(), &state(2, "run"), &vars, &vars, "", None).unwrap();
        let names: Vec<String> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        assert_eq!(names, ["step-00000002"]);
        // A checkpoint whose tensors cannot be read is skipped, never trusted.
        std::fs::write(
            dir.path().join("step-00000002/adapter.safetensors"),
            "garbage",
        )
        .unwrap();
        assert!(latest(dir.path(), "run", &Device::Cpu).unwrap().is_none());
    }
}
