//! Garbage collection: drop objects no lock file references, run records pointing at dropped
//! objects, staging leftovers and orphaned checkpoint directories; and, for the CLI, the
//! leftovers of interrupted publishes next to published outputs. Run under the cache's
//! exclusive lock.
//!
//! Checkpoint directories (`checkpoints/<pipeline>/<stage>/<fingerprint>/`) are where a stage
//! keeps state across attempts of one fingerprint (training checkpoints: a killed run's successor
//! resumes from them). They are the cache's, not the stage's: this file owns their layout and
//! their lock (`.lock` inside, held by the stage while it writes), and the stage's only contract
//! is to write complete state under names that do not start with `.` and temporaries under names
//! that do. A directory is orphaned, and collected, when nothing holds its lock and
//! - no lock file of its pipeline is in the cache (the pipeline ran elsewhere or was removed), or
//! - its pipeline's lock file records this fingerprint for the stage (the stage finished: the
//!   state was for an attempt that completed), or
//! - it holds nothing complete (a kill before the first checkpoint), or
//! - a newer attempt of the same pipeline stage (another fingerprint) left state too: only the
//!   latest attempt of each stage is kept, as only the latest run of each stage is kept in the
//!   lock file.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::time::SystemTime;

use fs4::fs_std::FileExt;
use serde::Serialize;

use super::{open_lock, remove_path, sanitize_name, Cache, CacheError, CacheLock, Manifest};

/// The lock file inside a checkpoint directory: held (exclusively, fs4) by the stage writing it.
pub const CHECKPOINT_LOCK: &str = ".lock";

/// What gc removed (or would remove with `dry_run`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct GcReport {
    pub lock_files: usize,
    pub objects_kept: usize,
    pub objects_removed: usize,
    pub bytes_removed: u64,
    pub run_records_removed: usize,
    /// Checkpoint directories kept (the latest attempt of an unfinished stage, or in use).
    pub checkpoints_kept: usize,
    /// Orphaned checkpoint directories removed, and their bytes.
    pub checkpoints_removed: usize,
    pub checkpoint_bytes_removed: u64,
    /// Leftovers of interrupted publishes (`.<name>.peftpipe-tmp-*` and the like) removed next to
    /// published outputs (filled in by [`remove_publish_leftovers`]).
    pub publish_leftovers_removed: usize,
    /// Published stage folders (`.peftpipe/out/<pipeline>/<stage>/`) of stages their pipeline
    /// no longer has (renamed or removed), their bytes, and the folders relative to the project
    /// (filled in by [`remove_stale_outputs`]).
    pub stale_outputs_removed: usize,
    pub stale_output_bytes_removed: u64,
    pub stale_outputs: Vec<String>,
    pub dry_run: bool,
}

impl Cache {
    /// `checkpoints/<pipeline>/<stage>/<fingerprint>`: where the stage `stage` of `pipeline` keeps
    /// state across attempts of the fingerprint `fingerprint` (a digest). Not created here.
    pub fn checkpoint_dir(&self, pipeline: &str, stage: &str, fingerprint: &str) -> PathBuf {
        self.root
            .join("checkpoints")
            .join(sanitize_name(pipeline))
            .join(sanitize_name(stage))
            .join(sanitize_name(fingerprint))
    }
}

/// Create `dir` if needed and take its lock ([`CHECKPOINT_LOCK`]) without waiting. `None` when
/// another holder has it (another process, or another handle in this one). Released on drop.
pub fn lock_checkpoint_dir(dir: &Path) -> Result<Option<CacheLock>, CacheError> {
    std::fs::create_dir_all(dir).map_err(CacheError::io("create", dir))?;
    let path = dir.join(CHECKPOINT_LOCK);
    let file = open_lock(&path)?;
    if FileExt::try_lock_exclusive(&file).map_err(CacheError::io("lock", &path))? {
        Ok(Some(CacheLock { file }))
    } else {
        Ok(None)
    }
}

impl Cache {
    /// Remove every object that no lock file names. With `dry_run`, only count.
    pub fn gc(&self, dry_run: bool) -> Result<GcReport, CacheError> {
        let locks = self.all_lock_files()?;
        let wanted: BTreeSet<String> = locks
            .iter()
            .flat_map(|(_, lock)| lock.stages.values().map(|entry| entry.output.clone()))
            .collect();
        let mut report = GcReport {
            lock_files: locks.len(),
            dry_run,
            ..GcReport::default()
        };
        let objects = self.root.join("objects");
        let mut removed = BTreeSet::new();
        for shard in read_dir_sorted(&objects)? {
            for object in read_dir_sorted(&shard)? {
                let Some(digest) = object
                    .file_name()
                    .and_then(|n| n.to_str())
                    .map(String::from)
                else {
                    continue;
                };
                if wanted.contains(&digest) {
                    report.objects_kept += 1;
                    continue;
                }
                report.objects_removed += 1;
                report.bytes_removed += object_size(&object);
                if !dry_run {
                    self.remove_object(&digest)?;
                }
                removed.insert(digest);
            }
            if !dry_run && read_dir_sorted(&shard)?.is_empty() {
                remove_path(&shard)?;
            }
        }
        let runs = self.root.join("runs");
        for shard in read_dir_sorted(&runs)? {
            for record_path in read_dir_sorted(&shard)? {
                let output = std::fs::read_to_string(&record_path)
                    .ok()
                    .and_then(|text| serde_json::from_str::<super::RunRecord>(&text).ok())
                    .map(|record| record.output);
                let dangling = match &output {
                    Some(output) => removed.contains(output) || !self.has_object(output),
                    None => true,
                };
                if dangling {
                    report.run_records_removed += 1;
                    if !dry_run {
                        remove_path(&record_path)?;
                    }
                }
            }
        }
        self.collect_checkpoints(&locks, &mut report)?;
        if !dry_run {
            self.clear_tmp()?;
        }
        Ok(report)
    }

    /// Remove orphaned checkpoint directories (see the module docs).
    fn collect_checkpoints(
        &self,
        locks: &[(PathBuf, super::LockFile)],
        report: &mut GcReport,
    ) -> Result<(), CacheError> {
        // Sanitized pipeline name (the lock file's stem) → sanitized stage name → fingerprint
        // of its last finished run.
        let mut finished: BTreeMap<String, BTreeMap<String, String>> = BTreeMap::new();
        for (path, lock) in locks {
            let stem = path
                .file_name()
                .and_then(|name| name.to_str())
                .and_then(|name| name.strip_suffix(".lock.json"))
                .unwrap_or_default()
                .to_string();
            let stages = lock
                .stages
                .iter()
                .map(|(name, entry)| (sanitize_name(name), entry.fingerprint.clone()))
                .collect();
            finished.insert(stem, stages);
        }
        let root = self.root.join("checkpoints");
        for pipeline_dir in read_dir_sorted(&root)? {
            if !pipeline_dir.is_dir() {
                continue;
            }
            let pipeline = file_name(&pipeline_dir);
            for stage_dir in read_dir_sorted(&pipeline_dir)? {
                if !stage_dir.is_dir() {
                    continue;
                }
                let stage = file_name(&stage_dir);
                let attempts: Vec<(PathBuf, Option<SystemTime>)> = read_dir_sorted(&stage_dir)?
                    .into_iter()
                    .filter(|path| path.is_dir())
                    .map(|path| {
                        let newest = newest_complete(&path);
                        (path, newest)
                    })
                    .collect();
                let latest = attempts
                    .iter()
                    .filter_map(|(path, time)| time.map(|time| (time, path.clone())))
                    .max()
                    .map(|(_, path)| path);
                for (dir, newest) in &attempts {
                    let fingerprint = file_name(dir);
                    let orphaned = match finished.get(&pipeline) {
                        None => true,
                        Some(stages) => {
                            stages.get(&stage) == Some(&fingerprint)
                                || newest.is_none()
                                || latest.as_ref() != Some(dir)
                        }
                    };
                    // Never touch a directory someone holds; hold it while removing.
                    let Some(lock) = lock_checkpoint_dir(dir)? else {
                        report.checkpoints_kept += 1;
                        continue;
                    };
                    if !orphaned {
                        report.checkpoints_kept += 1;
                        if !report.dry_run {
                            remove_hidden_leftovers(dir)?;
                        }
                        continue;
                    }
                    report.checkpoints_removed += 1;
                    report.checkpoint_bytes_removed += tree_size(dir);
                    if !report.dry_run {
                        remove_path(dir)?;
                    }
                    drop(lock);
                }
                if !report.dry_run {
                    remove_if_empty(&stage_dir)?;
                }
            }
            if !report.dry_run {
                remove_if_empty(&pipeline_dir)?;
            }
        }
        Ok(())
    }
}

/// Remove the leftovers of interrupted publishes, returning how many there were (with `dry_run`,
/// only count). In `output_roots` (peftpipe's own `.peftpipe/out/<pipeline>/` folders) that is
/// every hidden `.<name>.partial-*` / `.<name>.old-*` of an interrupted materialization and every
/// `.<name>.peftpipe-tmp-*` / `.<name>.peftpipe-old-*`; in `publish_parents` (the folders that
/// hold user-declared export destinations) only the latter two, which no other tool writes. Only
/// call while holding the cache's exclusive lock: then no run of this cache is publishing.
pub fn remove_publish_leftovers(
    output_roots: &[PathBuf],
    publish_parents: &[PathBuf],
    dry_run: bool,
) -> Result<usize, CacheError> {
    let mut removed = 0;
    let mut seen = BTreeSet::new();
    let roots = output_roots.iter().map(|dir| (dir, true));
    let parents = publish_parents.iter().map(|dir| (dir, false));
    for (dir, owned) in roots.chain(parents) {
        for path in read_dir_sorted(dir)? {
            let name = file_name(&path);
            let leftover = name.starts_with('.')
                && (name.contains(".peftpipe-tmp-")
                    || name.contains(".peftpipe-old-")
                    || (owned && (name.contains(".partial-") || name.contains(".old-"))));
            if leftover && seen.insert(path.clone()) {
                removed += 1;
                if !dry_run {
                    remove_path(&path)?;
                }
            }
        }
    }
    Ok(removed)
}

/// Remove the published stage folders of `out_tree` (a project's `.peftpipe/out/`) that no stage
/// owns, returning each with its bytes (with `dry_run`, only list them). `owners` maps a pipeline
/// folder (`sanitize_name` of its name) to the folders of the stages it has now; the folders of a
/// pipeline not in it are left alone (gc cannot tell what it has). Only stage folders are
/// candidates: files (`report.html`), hidden leftovers (see [`remove_publish_leftovers`]) and any
/// folder that is, holds or lies inside one of `protected` (export destinations, which a user may
/// point into the out tree) stay. Only call while holding the cache's exclusive lock.
pub fn remove_stale_outputs(
    out_tree: &Path,
    owners: &BTreeMap<String, BTreeSet<String>>,
    protected: &[PathBuf],
    dry_run: bool,
) -> Result<Vec<(PathBuf, u64)>, CacheError> {
    let protected: Vec<PathBuf> = protected
        .iter()
        .filter_map(|path| path.canonicalize().ok())
        .collect();
    let mut stale = Vec::new();
    for pipeline_dir in read_dir_sorted(out_tree)? {
        let Some(owned) = owners.get(&file_name(&pipeline_dir)) else {
            continue;
        };
        if !is_real_dir(&pipeline_dir) {
            continue;
        }
        for stage_dir in read_dir_sorted(&pipeline_dir)? {
            let name = file_name(&stage_dir);
            if name.starts_with('.') || owned.contains(&name) || !is_real_dir(&stage_dir) {
                continue;
            }
            let Ok(canonical) = stage_dir.canonicalize() else {
                continue;
            };
            if protected.iter().any(|destination| {
                destination.starts_with(&canonical) || canonical.starts_with(destination)
            }) {
                continue;
            }
            let bytes = tree_size(&stage_dir);
            if !dry_run {
                remove_path(&stage_dir)?;
            }
            stale.push((stage_dir, bytes));
        }
    }
    Ok(stale)
}

/// A directory, not a symbolic link to one.
fn is_real_dir(path: &Path) -> bool {
    std::fs::symlink_metadata(path).is_ok_and(|metadata| metadata.is_dir())
}

fn file_name(path: &Path) -> String {
    path.file_name()
        .map(|name| name.to_string_lossy().into_owned())
        .unwrap_or_default()
}

/// The modification time of the newest complete entry (a name not starting with `.`) of a
/// checkpoint directory; None when it has none.
fn newest_complete(dir: &Path) -> Option<SystemTime> {
    std::fs::read_dir(dir)
        .ok()?
        .flatten()
        .filter(|entry| !entry.file_name().to_string_lossy().starts_with('.'))
        .filter_map(|entry| entry.metadata().ok()?.modified().ok())
        .max()
}

/// Remove the temporaries (hidden entries other than the lock) of a checkpoint directory whose
/// lock the caller holds.
fn remove_hidden_leftovers(dir: &Path) -> Result<(), CacheError> {
    for path in read_dir_sorted(dir)? {
        let name = file_name(&path);
        if name.starts_with('.') && name != CHECKPOINT_LOCK {
            remove_path(&path)?;
        }
    }
    Ok(())
}

fn remove_if_empty(dir: &Path) -> Result<(), CacheError> {
    if read_dir_sorted(dir)?.is_empty() {
        remove_path(dir)?;
    }
    Ok(())
}

/// Bytes of the regular files under `dir` (0 for what cannot be read).
fn tree_size(dir: &Path) -> u64 {
    let mut total = 0;
    let mut stack = vec![dir.to_path_buf()];
    while let Some(current) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&current) else {
            continue;
        };
        for entry in entries.flatten() {
            match entry.file_type() {
                Ok(kind) if kind.is_dir() => stack.push(entry.path()),
                Ok(kind) if kind.is_file() => {
                    total += entry.metadata().map(|m| m.len()).unwrap_or(0);
                }
                _ => {}
            }
        }
    }
    total
}

fn object_size(object: &std::path::Path) -> u64 {
    std::fs::read_to_string(object.join("manifest.json"))
        .ok()
        .and_then(|text| serde_json::from_str::<Manifest>(&text).ok())
        .map(|manifest| manifest.total_size())
        .unwrap_or(0)
}

fn read_dir_sorted(dir: &std::path::Path) -> Result<Vec<std::path::PathBuf>, CacheError> {
    let entries = match std::fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(error) => return Err(CacheError::io("list", dir)(error)),
    };
    let mut paths = Vec::new();
    for entry in entries {
        paths.push(entry.map_err(CacheError::io("list", dir))?.path());
    }
    paths.sort();
    Ok(paths)
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;
    use crate::cache::{LockEntry, RunRecord};
    use crate::fingerprint::{StageFingerprint, FINGERPRINT_VERSION};
    use std::path::PathBuf;

    /// The names in `dir`, sorted.
    fn names(dir: &Path) -> Vec<String> {
        read_dir_sorted(dir)
            .unwrap()
            .iter()
            .map(|p| file_name(p))
            .collect()
    }

    /// Fingerprint components with nothing but a stage name and kind.
    fn components(stage: &str, kind: &str) -> StageFingerprint {
        StageFingerprint {
            version: FINGERPRINT_VERSION,
            stage: stage.into(),
            kind: kind.into(),
            params: BTreeMap::new(),
            upstream: BTreeMap::new(),
            inputs: BTreeMap::new(),
            tool_version: "0".into(),
            seed: 0,
            environment: BTreeMap::new(),
        }
    }

    fn store(cache: &Cache, content: &str) -> String {
        let staging = cache.staging_dir("t").unwrap();
        std::fs::create_dir_all(staging.join("data")).unwrap();
        std::fs::write(staging.join("data/file.txt"), content).unwrap();
        cache.store(&staging).unwrap().0
    }

    #[test]
    fn gc_keeps_referenced_objects_only() {
        let dir = tempfile::tempdir().unwrap();
        let cache = Cache::open(dir.path()).unwrap();
        let kept = store(&cache, "kept");
        let dropped = store(&cache, "dropped");
        let components = components("data", "ingest");
        let mut lock = cache.read_lock_file("p").unwrap();
        lock.stages.insert(
            "data".into(),
            LockEntry {
                fingerprint: components.digest(),
                components,
                output: kept.clone(),
                outcome: BTreeMap::new(),
                wall_time_seconds: 0.0,
            },
        );
        cache.write_lock_file(&lock).unwrap();
        let record = |output: &str| RunRecord {
            output: output.into(),
            outcome: BTreeMap::new(),
            wall_time_seconds: 0.0,
        };
        cache.put_run_record("f1", &record(&kept)).unwrap();
        cache.put_run_record("f2", &record(&dropped)).unwrap();

        let preview = cache.gc(true).unwrap();
        assert_eq!(preview.objects_removed, 1);
        assert_eq!(preview.bytes_removed, 7);
        assert!(cache.has_object(&dropped), "dry run removes nothing");

        let report = cache.gc(false).unwrap();
        assert_eq!(
            (
                report.objects_kept,
                report.objects_removed,
                report.run_records_removed
            ),
            (1, 1, 1)
        );
        assert!(cache.has_object(&kept));
        assert!(!cache.has_object(&dropped));
        assert!(cache.run_record("f1").is_some());
        assert!(cache.run_record("f2").is_none());
    }

    /// A lock file for pipeline `pipeline` whose stage `stage` finished with `fingerprint`.
    fn finished(cache: &Cache, pipeline: &str, stage: &str, fingerprint: &str) {
        let output = store(cache, &format!("{pipeline}/{stage}"));
        let components = components(stage, "train");
        let mut lock = cache.read_lock_file(pipeline).unwrap();
        lock.stages.insert(
            stage.into(),
            LockEntry {
                fingerprint: fingerprint.into(),
                components,
                output,
                outcome: BTreeMap::new(),
                wall_time_seconds: 0.0,
            },
        );
        cache.write_lock_file(&lock).unwrap();
    }

    /// A checkpoint directory with a complete checkpoint written `age` seconds ago, or (with
    /// `None`) only a killed writer's temporary.
    fn checkpoint(
        cache: &Cache,
        pipeline: &str,
        stage: &str,
        fp: &str,
        age: Option<u64>,
    ) -> PathBuf {
        let dir = cache.checkpoint_dir(pipeline, stage, fp);
        match age {
            Some(age) => {
                let step = dir.join("step-00000002");
                std::fs::create_dir_all(&step).unwrap();
                std::fs::write(step.join("state.json"), "{}").unwrap();
                let when = SystemTime::now() - std::time::Duration::from_secs(age);
                std::fs::File::open(&step)
                    .unwrap()
                    .set_modified(when)
                    .unwrap();
            }
            None => {
                let temp = dir.join(".step-00000002.tmp-x1");
                std::fs::create_dir_all(&temp).unwrap();
                std::fs::write(temp.join("adapter.safetensors"), "half").unwrap();
            }
        }
        dir
    }

    #[test]
    fn gc_collects_orphaned_checkpoints_and_keeps_the_latest_unfinished_attempt() {
        let dir = tempfile::tempdir().unwrap();
        let cache = Cache::open(dir.path()).unwrap();
        finished(&cache, "p", "train", "fdone");
        let done = checkpoint(&cache, "p", "train", "fdone", Some(50));
        let superseded = checkpoint(&cache, "p", "train", "fold", Some(100));
        let latest = checkpoint(&cache, "p", "train", "fnew", Some(10));
        // A killed writer's temporary inside the kept one goes.
        let stale_temp = latest.join(".step-00000004.tmp-zz");
        std::fs::create_dir_all(&stale_temp).unwrap();
        let nothing_complete = checkpoint(&cache, "p", "eval", "f1", None);
        let no_lock_file = checkpoint(&cache, "gone", "train", "f2", Some(1));
        // Held by a running trainer: never touched, whatever else is true of it.
        let held_dir = checkpoint(&cache, "gone", "tune", "f3", Some(1));
        let held = lock_checkpoint_dir(&held_dir).unwrap().expect("free");

        let preview = cache.gc(true).unwrap();
        assert_eq!(
            (preview.checkpoints_removed, preview.checkpoints_kept),
            (4, 2)
        );
        assert!(preview.checkpoint_bytes_removed > 0);
        for path in [
            &done,
            &superseded,
            &nothing_complete,
            &no_lock_file,
            &stale_temp,
        ] {
            assert!(path.exists(), "dry run removes nothing: {}", path.display());
        }

        let report = cache.gc(false).unwrap();
        assert_eq!(
            (report.checkpoints_removed, report.checkpoints_kept),
            (4, 2)
        );
        for path in [
            &done,
            &superseded,
            &nothing_complete,
            &no_lock_file,
            &stale_temp,
        ] {
            assert!(!path.exists(), "{} is orphaned", path.display());
        }
        assert!(latest.join("step-00000002/state.json").is_file());
        assert!(held_dir.join("step-00000002/state.json").is_file());
        // Emptied stage and pipeline folders go too.
        assert!(!dir.path().join("checkpoints/p/eval").exists());
        assert!(dir.path().join("checkpoints/gone/tune").exists());

        // Once released, the held one is an orphan like any other (its pipeline has no lock file).
        drop(held);
        assert_eq!(cache.gc(false).unwrap().checkpoints_removed, 1);
        assert!(!dir.path().join("checkpoints/gone").exists());
    }

    #[test]
    fn a_checkpoint_dir_has_one_holder_at_a_time() {
        let dir = tempfile::tempdir().unwrap();
        let cache = Cache::open(dir.path()).unwrap();
        let path = cache.checkpoint_dir("quick start", "train", "abc");
        assert!(path.ends_with("checkpoints/quick_start/train/abc"));
        let first = lock_checkpoint_dir(&path).unwrap().expect("free");
        assert!(lock_checkpoint_dir(&path).unwrap().is_none(), "held");
        drop(first);
        assert!(lock_checkpoint_dir(&path).unwrap().is_some(), "released");
    }

    #[test]
    fn stale_outputs_are_stage_folders_no_stage_owns_and_never_a_destination() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join(".peftpipe/out");
        for path in [
            "reviews/data",
            "reviews/renamed",
            "reviews/gone/sub",
            "reviews/.gone.partial-a1",
            "reviews/exported",
            "reviews/holds/adapter",
            "unknown/gone",
        ] {
            std::fs::create_dir_all(out.join(path)).unwrap();
        }
        std::fs::write(out.join("reviews/gone/sub/a.txt"), "12345").unwrap();
        std::fs::write(out.join("reviews/report.html"), "<html>").unwrap();
        let owners = BTreeMap::from([(
            "reviews".to_string(),
            BTreeSet::from(["data".to_string(), "renamed".to_string()]),
        )]);
        // A user's export destinations inside the out tree: the folder, and one inside a folder.
        let protected = [
            out.join("reviews/exported"),
            out.join("reviews/holds/adapter"),
            dir.path().join("not/there"),
        ];
        let preview = remove_stale_outputs(&out, &owners, &protected, true).unwrap();
        assert_eq!(preview, [(out.join("reviews/gone"), 5)]);
        assert!(out.join("reviews/gone").exists(), "dry run");
        let removed = remove_stale_outputs(&out, &owners, &protected, false).unwrap();
        assert_eq!(removed, preview);
        assert!(!out.join("reviews/gone").exists());
        assert_eq!(
            names(&out.join("reviews")),
            [
                ".gone.partial-a1",
                "data",
                "exported",
                "holds",
                "renamed",
                "report.html"
            ]
        );
        assert!(
            out.join("unknown/gone").exists(),
            "a pipeline gc cannot judge"
        );
    }

    #[test]
    fn publish_leftovers_are_removed_and_nothing_else() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join(".peftpipe/out/quick");
        let exports = dir.path().join("exported");
        for path in [
            out.join("train/adapter"),
            out.join(".train.partial-a1/x"),
            out.join(".train.old-b2/tree"),
            exports.join("adapter"),
            exports.join(".adapter.peftpipe-tmp-c3"),
            exports.join(".adapter.peftpipe-old-d4"),
            exports.join(".user.partial-keep"),
            exports.join(".config"),
        ] {
            std::fs::create_dir_all(path).unwrap();
        }
        let roots = [out.clone()];
        let parents = [exports.clone()];
        assert_eq!(remove_publish_leftovers(&roots, &parents, true).unwrap(), 4);
        assert!(out.join(".train.partial-a1").exists());
        assert_eq!(
            remove_publish_leftovers(&roots, &parents, false).unwrap(),
            4
        );
        assert_eq!(names(&out), ["train"]);
        assert_eq!(
            names(&exports),
            [".config", ".user.partial-keep", "adapter"]
        );
    }
}
