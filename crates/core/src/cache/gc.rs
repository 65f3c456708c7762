//! Garbage collection: drop objects no lock file references, run records pointing at dropped
//! objects, and staging leftovers. Run under the cache's exclusive lock.

use std::collections::BTreeSet;

use serde::Serialize;

use super::{remove_path, Cache, CacheError, Manifest};

/// What gc removed (or would remove with `dry_run`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct GcReport {
    pub lock_files: usize,
    pub objects_kept: usize,
    pub objects_removed: usize,
    pub bytes_removed: u64,
    pub run_records_removed: usize,
    pub dry_run: bool,
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
        if !dry_run {
            self.clear_tmp()?;
        }
        Ok(report)
    }
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
        let components = StageFingerprint {
            version: FINGERPRINT_VERSION,
            kind: "ingest".into(),
            params: BTreeMap::new(),
            upstream: BTreeMap::new(),
            inputs: BTreeMap::new(),
            tool_version: "0".into(),
            seed: 0,
            environment: BTreeMap::new(),
        };
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
}
