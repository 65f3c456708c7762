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
//!                     digests.json            file name → blake3 (hex) of every file above,
//!                                             written last
//! ```
//! A checkpoint is written into a uniquely named hidden `.step-….tmp-XXXXXX` and renamed into
//! place, so a kill mid-write never leaves a directory a later run trusts; older checkpoints and
//! leftover temporaries are removed after the rename. A checkpoint is resumed only when its
//! digest record names every file it needs and every file's bytes match: one damaged in place
//! after the rename (a flipped bit, a truncated or missing file) is skipped and reported as
//! [`DamagedCheckpoint`], never resumed (its adapter would be cached under a clean run's
//! fingerprint). Only one writer at a time: the train stage
//! holds the directory's lock ([`CheckpointDir`]) while it trains; the directory belongs to one
//! pipeline, stage and fingerprint (the cache's `checkpoints/<pipeline>/<stage>/<fingerprint>/`,
//! collected by `gc` once orphaned). Names not starting with `.` are complete checkpoints, the
//! contract `gc` relies on.
//! Randomness is counter-based (ChaCha streams derived from the seed and the step or micro-batch
//! index), so the seed plus the step *is* the RNG state. Knows nothing of models or data files.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor};
use serde::{Deserialize, Serialize};

use super::evaluation::EvaluationState;
use crate::cache::gc::{lock_checkpoint_dir, CHECKPOINT_LOCK};
use crate::cache::CacheLock;
use crate::peft::{safetensors_bytes, write_atomic, PeftError};

/// Bump when the layout or the meaning of a field changes (older checkpoints are then ignored).
/// 2: the digest record `digests.json`.
pub const CHECKPOINT_VERSION: u32 = 2;

const ADAPTER: &str = "adapter.safetensors";
const OPTIMIZER: &str = "optimizer.safetensors";
const METRICS: &str = "metrics.jsonl";
const STATE: &str = "state.json";
const BEST: &str = "best.safetensors";
/// The digest record: file name → blake3 hex digest of its bytes, for every other file.
const DIGESTS: &str = "digests.json";
/// The files every checkpoint holds (besides the digest record).
const REQUIRED: [&str; 4] = [ADAPTER, OPTIMIZER, METRICS, STATE];

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

/// A checkpoint read back (every file matched its digest).
pub struct Checkpoint {
    pub state: CheckpointState,
    pub variables: HashMap<String, Tensor>,
    pub optimizer: HashMap<String, Tensor>,
    pub metrics: String,
    /// The best evaluation's variables, when the run keeps its best adapter.
    pub best: Option<HashMap<String, Tensor>>,
    pub path: PathBuf,
}

/// A checkpoint of this run that [`latest`] did not trust: its files are not the bytes [`save`]
/// wrote. Displays as `checkpoint <path> is damaged (<reason>)`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DamagedCheckpoint {
    pub path: PathBuf,
    /// What is wrong, e.g. `adapter.safetensors does not match its digest`.
    pub reason: String,
}

impl std::fmt::Display for DamagedCheckpoint {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            formatter,
            "checkpoint {} is damaged ({})",
            self.path.display(),
            self.reason
        )
    }
}

/// What [`latest`] found: the newest intact checkpoint of the run, and the newer ones it skipped
/// as damaged (newest first), so the caller can say why it did not resume them.
pub struct LatestCheckpoint {
    pub checkpoint: Option<Checkpoint>,
    pub damaged: Vec<DamagedCheckpoint>,
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
    let temp = crate::files::dir_builder()
        .prefix(&format!(".{name}.tmp-"))
        .tempdir_in(dir)
        .map_err(io_error(dir))?
        .keep();
    // Each file's digest is taken of the bytes handed to the write, and the record goes last.
    let mut digests = BTreeMap::new();
    let mut write = |file: &str, bytes: &[u8]| {
        digests.insert(file.to_string(), blake3::hash(bytes).to_hex().to_string());
        write_atomic(&temp.join(file), bytes)
    };
    write(ADAPTER, &safetensors_bytes(variables)?)?;
    hold_for_tests();
    write(OPTIMIZER, &safetensors_bytes(optimizer)?)?;
    write(METRICS, metrics.as_bytes())?;
    if let Some(best) = best {
        write(BEST, &safetensors_bytes(best)?)?;
    }
    let state_json = serde_json::to_vec_pretty(state)
        .map_err(|error| PeftError::invalid(format!("checkpoint state: {error}")))?;
    write(STATE, &state_json)?;
    let record = serde_json::to_vec_pretty(&digests)
        .map_err(|error| PeftError::invalid(format!("checkpoint digests: {error}")))?;
    write_atomic(&temp.join(DIGESTS), &record)?;
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

/// The newest intact checkpoint in `dir` that belongs to the run `run_key`, if any, and the
/// newer checkpoints of the run skipped as damaged. Checkpoints of other runs or versions are
/// ignored (not deleted: the caller decides).
pub fn latest(dir: &Path, run_key: &str, device: &Device) -> Result<LatestCheckpoint, PeftError> {
    let mut latest = LatestCheckpoint {
        checkpoint: None,
        damaged: Vec::new(),
    };
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Ok(latest);
    };
    let mut candidates: Vec<PathBuf> = entries
        .flatten()
        .filter(|entry| entry.file_name().to_string_lossy().starts_with("step-"))
        .map(|entry| entry.path())
        .collect();
    candidates.sort();
    // A checkpoint that is not whole is not trusted: try the next older one.
    while let Some(path) = candidates.pop() {
        match read_checkpoint(&path, run_key, device) {
            Verdict::Intact(checkpoint) => {
                latest.checkpoint = Some(*checkpoint);
                break;
            }
            Verdict::Foreign => {}
            Verdict::Damaged(reason) => latest.damaged.push(DamagedCheckpoint { path, reason }),
        }
    }
    Ok(latest)
}

/// What one checkpoint directory holds.
enum Verdict {
    Intact(Box<Checkpoint>),
    /// Another run's, or another version's (older ones have no digest record).
    Foreign,
    /// Why it is not what [`save`] wrote.
    Damaged(String),
}

/// Read `path` whole (each file once), check every file against the digest record and build
/// the checkpoint from the verified bytes.
fn read_checkpoint(path: &Path, run_key: &str, device: &Device) -> Verdict {
    let record = match std::fs::read(path.join(DIGESTS)) {
        Ok(record) => record,
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => {
            // Checkpoints of earlier versions had no record; only a current one is damaged.
            #[derive(Deserialize)]
            struct Version {
                version: u32,
            }
            let version = std::fs::read(path.join(STATE))
                .ok()
                .and_then(|bytes| serde_json::from_slice::<Version>(&bytes).ok());
            return match version {
                Some(Version { version }) if version != CHECKPOINT_VERSION => Verdict::Foreign,
                _ => Verdict::Damaged(format!("it has no digest record {DIGESTS}")),
            };
        }
        Err(error) => return Verdict::Damaged(format!("{DIGESTS} cannot be read: {error}")),
    };
    let Ok(digests) = serde_json::from_slice::<BTreeMap<String, String>>(&record) else {
        return Verdict::Damaged(format!("its digest record {DIGESTS} does not parse"));
    };
    if let Some(unknown) = digests
        .keys()
        .find(|file| !REQUIRED.contains(&file.as_str()) && file.as_str() != BEST)
    {
        return Verdict::Damaged(format!("{DIGESTS} names an unknown file `{unknown}`"));
    }
    if let Some(missing) = REQUIRED.iter().find(|file| !digests.contains_key(**file)) {
        return Verdict::Damaged(format!("{DIGESTS} does not name {missing}"));
    }
    if !digests.contains_key(BEST) && path.join(BEST).exists() {
        return Verdict::Damaged(format!("{DIGESTS} does not name {BEST}"));
    }
    let mut files = HashMap::new();
    for (file, digest) in &digests {
        let bytes = match std::fs::read(path.join(file)) {
            Ok(bytes) => bytes,
            Err(error) => return Verdict::Damaged(format!("{file} cannot be read: {error}")),
        };
        if blake3::hash(&bytes).to_hex().as_str() != digest.as_str() {
            return Verdict::Damaged(format!("{file} does not match its digest"));
        }
        files.insert(file.as_str(), bytes);
    }
    let state = match serde_json::from_slice::<CheckpointState>(&files[STATE]) {
        Ok(state) => state,
        Err(error) => return Verdict::Damaged(format!("{STATE} does not parse: {error}")),
    };
    if state.version != CHECKPOINT_VERSION || state.run_key != run_key {
        return Verdict::Foreign;
    }
    let load = |file: &str| {
        candle_core::safetensors::load_buffer(&files[file], device)
            .map_err(|error| format!("{file} cannot be read: {error}"))
    };
    let read = || -> Result<Checkpoint, String> {
        Ok(Checkpoint {
            variables: load(ADAPTER)?,
            optimizer: load(OPTIMIZER)?,
            metrics: String::from_utf8(files[METRICS].clone())
                .map_err(|_| format!("{METRICS} is not UTF-8"))?,
            best: files.contains_key(BEST).then(|| load(BEST)).transpose()?,
            state,
            path: path.to_path_buf(),
        })
    };
    match read() {
        Ok(checkpoint) => Verdict::Intact(Box::new(checkpoint)),
        Err(reason) => Verdict::Damaged(reason),
    }
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
        let found = latest(dir.path(), "run", &Device::Cpu)
            .unwrap()
            .checkpoint
            .unwrap();
        assert_eq!(found.state, state(4, "run"));
        assert_eq!(found.metrics.lines().count(), 2);
        assert_eq!(
            found.variables["a"].to_vec1::<f32>().unwrap(),
            vec![1.0, 2.0]
        );
        assert!(latest(dir.path(), "other run", &Device::Cpu)
            .unwrap()
            .checkpoint
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
        let found = latest(dir.path(), "run", &Device::Cpu)
            .unwrap()
            .checkpoint
            .unwrap();
        assert_eq!(found.state, with_evaluation);
        assert_eq!(
            found.best.unwrap()["a"].to_vec1::<f32>().unwrap(),
            vec![0.5]
        );
        // A best adapter that cannot be read makes the whole checkpoint untrusted.
        std::fs::write(dir.path().join("step-00000006/best.safetensors"), "half").unwrap();
        assert!(latest(dir.path(), "run", &Device::Cpu)
            .unwrap()
            .checkpoint
            .is_none());
    }

    #[test]
    fn an_incomplete_checkpoint_is_never_trusted() {
        let dir = tempfile::tempdir().unwrap();
        // A kill before the rename leaves only the temp dir; one before state.json leaves no state.
        std::fs::create_dir_all(dir.path().join(".step-00000006.tmp")).unwrap();
        std::fs::create_dir_all(dir.path().join("step-00000008")).unwrap();
        assert!(latest(dir.path(), "run", &Device::Cpu)
            .unwrap()
            .checkpoint
            .is_none());
        assert!(latest(&dir.path().join("missing"), "run", &Device::Cpu)
            .unwrap()
            .checkpoint
            .is_none());
    }

    /// A checkpoint with `[1.0, 2.0]` as variable `a` at step 4 of run `run`.
    fn saved(dir: &Path) -> PathBuf {
        let tensor = Tensor::new(&[1.0f32, 2.0], &Device::Cpu).unwrap();
        let vars = vec![("a".to_string(), tensor.clone())];
        let opt = vec![("exp_avg/a".to_string(), tensor)];
        save(dir, &state(4, "run"), &vars, &opt, "{\"step\":1}\n", None).unwrap()
    }

    /// `latest` in `dir` trusts nothing and reports one damaged checkpoint, for `reason`.
    fn damaged(dir: &Path, path: &Path, reason: &str) {
        let found = latest(dir, "run", &Device::Cpu).unwrap();
        assert!(found.checkpoint.is_none(), "{reason}: resumed");
        let expected = DamagedCheckpoint {
            path: path.to_path_buf(),
            reason: reason.to_string(),
        };
        assert_eq!(found.damaged, [expected]);
    }

    /// Regression: a killed run's checkpoint damaged in place (same size, bytes flipped) was
    /// resumed silently, and the wrong adapter cached under a clean run's fingerprint.
    #[test]
    fn a_checkpoint_damaged_in_place_is_never_resumed() {
        let dir = tempfile::tempdir().unwrap();
        let path = saved(dir.path());
        let adapter = path.join("adapter.safetensors");
        let mut bytes = std::fs::read(&adapter).unwrap();
        let last = bytes.len() - 1;
        bytes[last] ^= 0x01;
        std::fs::write(&adapter, &bytes).unwrap();
        damaged(
            dir.path(),
            &path,
            "adapter.safetensors does not match its digest",
        );
        assert_eq!(
            DamagedCheckpoint {
                path: path.clone(),
                reason: "adapter.safetensors does not match its digest".into()
            }
            .to_string(),
            format!(
                "checkpoint {} is damaged (adapter.safetensors does not match its digest)",
                path.display()
            )
        );

        let dir = tempfile::tempdir().unwrap();
        let path = saved(dir.path());
        let state_path = path.join("state.json");
        let text = std::fs::read_to_string(&state_path).unwrap();
        let changed = text.replace("\"tokens\": 100", "\"tokens\": 900");
        assert_ne!(changed, text);
        std::fs::write(&state_path, changed).unwrap();
        damaged(dir.path(), &path, "state.json does not match its digest");
    }

    #[test]
    fn a_checkpoint_without_a_whole_digest_record_is_never_resumed() {
        let dir = tempfile::tempdir().unwrap();
        let path = saved(dir.path());
        std::fs::remove_file(record_of(&path)).unwrap();
        damaged(dir.path(), &path, "it has no digest record digests.json");

        let dir = tempfile::tempdir().unwrap();
        let path = saved(dir.path());
        let record = record_of(&path);
        let mut bytes = std::fs::read(&record).unwrap();
        bytes.truncate(bytes.len() / 2);
        std::fs::write(&record, &bytes).unwrap();
        damaged(
            dir.path(),
            &path,
            "its digest record digests.json does not parse",
        );

        // A record that leaves a file out: that file is not vouched for.
        let dir = tempfile::tempdir().unwrap();
        let path = saved(dir.path());
        let text = std::fs::read_to_string(record_of(&path)).unwrap();
        let mut digests: BTreeMap<String, String> = serde_json::from_str(&text).unwrap();
        digests.remove("optimizer.safetensors");
        std::fs::write(record_of(&path), serde_json::to_vec(&digests).unwrap()).unwrap();
        damaged(
            dir.path(),
            &path,
            "digests.json does not name optimizer.safetensors",
        );

        // A missing file the record names.
        let dir = tempfile::tempdir().unwrap();
        let path = saved(dir.path());
        std::fs::remove_file(path.join("metrics.jsonl")).unwrap();
        let found = latest(dir.path(), "run", &Device::Cpu).unwrap();
        assert!(found.checkpoint.is_none());
        assert!(
            found.damaged[0]
                .reason
                .starts_with("metrics.jsonl cannot be read"),
            "{:?}",
            found.damaged
        );
    }

    fn record_of(path: &Path) -> PathBuf {
        path.join("digests.json")
    }

    #[test]
    fn a_damaged_checkpoint_falls_back_to_an_older_intact_one() {
        let dir = tempfile::tempdir().unwrap();
        // Two checkpoints, as a kill between the rename and the removal of the older one leaves.
        let older = saved(dir.path());
        let kept = dir.path().join("kept");
        std::fs::rename(&older, &kept).unwrap();
        let tensor = Tensor::new(&[3.0f32, 4.0], &Device::Cpu).unwrap();
        let vars = vec![("a".to_string(), tensor)];
        let newer = save(dir.path(), &state(6, "run"), &vars, &vars, "", None).unwrap();
        std::fs::rename(&kept, &older).unwrap();
        std::fs::write(newer.join("metrics.jsonl"), "x").unwrap();
        let found = latest(dir.path(), "run", &Device::Cpu).unwrap();
        assert_eq!(found.checkpoint.unwrap().state, state(4, "run"));
        assert_eq!(
            found.damaged,
            [DamagedCheckpoint {
                path: newer,
                reason: "metrics.jsonl does not match its digest".into()
            }]
        );
    }

    /// A checkpoint of an earlier version (no digest record) is ignored, not reported damaged.
    #[test]
    fn a_checkpoint_of_an_earlier_version_is_ignored_quietly() {
        let dir = tempfile::tempdir().unwrap();
        let path = saved(dir.path());
        std::fs::remove_file(record_of(&path)).unwrap();
        let mut old = state(4, "run");
        old.version = 1;
        std::fs::write(path.join("state.json"), serde_json::to_vec(&old).unwrap()).unwrap();
        let found = latest(dir.path(), "run", &Device::Cpu).unwrap();
        assert!(found.checkpoint.is_none());
        assert!(found.damaged.is_empty(), "{:?}", found.damaged);
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
        assert!(latest(held.path(), "run", &Device::Cpu)
            .unwrap()
            .checkpoint
            .is_none());
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
        assert!(latest(dir.path(), "run", &Device::Cpu)
            .unwrap()
            .checkpoint
            .is_none());
    }
}
