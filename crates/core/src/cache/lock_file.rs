//! The per-pipeline lock file `locks/<pipeline>.lock.json`: for each stage, the fingerprint
//! *components* of its last successful run and the output digest it produced, so `status` can
//! say why a stage is dirty, and `gc` knows which objects are still wanted. Written atomically.
//! Beside it, `locks/<pipeline>.published.json` ([`PublishedFile`]) records what each stage's
//! last publish wrote outside the cache (export folders), so `status` can check them.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::{sanitize_name, write_atomic, Cache, CacheError, Manifest};
use crate::fingerprint::StageFingerprint;

/// Format version of lock files. A lock file of another format is treated as absent (every
/// stage then reads "never run") rather than misread.
pub const LOCK_FORMAT: u32 = 1;

/// What the lock file keeps about one stage.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LockEntry {
    /// Digest of `components`.
    pub fingerprint: String,
    pub components: StageFingerprint,
    /// Digest of the output object.
    pub output: String,
    /// The stage's reported figures (shown again when restored).
    #[serde(default)]
    pub outcome: BTreeMap<String, serde_json::Value>,
    /// Seconds the run that produced the output took.
    #[serde(default)]
    pub wall_time_seconds: f64,
}

/// One pipeline's lock file.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LockFile {
    pub format: u32,
    pub pipeline: String,
    /// The pipeline file that last ran under this name, by its name in its project directory
    /// (the same in every checkout): the name, and so this lock file and
    /// `.peftpipe/out/<pipeline>/`, belongs to it while it declares the name (see
    /// `exec::name_owner`). Absent in lock files written before it was recorded.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub file: Option<String>,
    pub stages: BTreeMap<String, LockEntry>,
}

impl LockFile {
    pub fn empty(pipeline: &str) -> LockFile {
        LockFile {
            format: LOCK_FORMAT,
            pipeline: pipeline.to_string(),
            file: None,
            stages: BTreeMap::new(),
        }
    }
}

impl Cache {
    /// `locks/<pipeline>.lock.json`.
    pub fn lock_file_path(&self, pipeline: &str) -> PathBuf {
        self.root
            .join("locks")
            .join(format!("{}.lock.json", sanitize_name(pipeline)))
    }

    /// Read a pipeline's lock file; a missing one, or one of another format, is empty.
    pub fn read_lock_file(&self, pipeline: &str) -> Result<LockFile, CacheError> {
        let path = self.lock_file_path(pipeline);
        read_lock_file_at(&path, pipeline)
    }

    /// Write a pipeline's lock file atomically.
    pub fn write_lock_file(&self, lock: &LockFile) -> Result<(), CacheError> {
        let path = self.lock_file_path(&lock.pipeline);
        let bytes = serde_json::to_vec_pretty(lock).map_err(|error| CacheError::Invalid {
            path: path.clone(),
            message: error.to_string(),
        })?;
        write_atomic(&path, &bytes, &self.tmp_dir())
    }

    /// Every lock file in the cache (for gc).
    pub fn all_lock_files(&self) -> Result<Vec<(PathBuf, LockFile)>, CacheError> {
        let dir = self.root.join("locks");
        let mut out = Vec::new();
        let entries = std::fs::read_dir(&dir).map_err(CacheError::io("list", &dir))?;
        for entry in entries {
            let entry = entry.map_err(CacheError::io("list", &dir))?;
            let path = entry.path();
            let is_lock = path
                .file_name()
                .and_then(|name| name.to_str())
                .is_some_and(|name| name.ends_with(".lock.json"));
            if is_lock {
                let lock = read_lock_file_at(&path, "")?;
                out.push((path, lock));
            }
        }
        out.sort_by(|a, b| a.0.cmp(&b.0));
        Ok(out)
    }
}

fn read_lock_file_at(path: &Path, pipeline: &str) -> Result<LockFile, CacheError> {
    let text = match std::fs::read_to_string(path) {
        Ok(text) => text,
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => {
            return Ok(LockFile::empty(pipeline))
        }
        Err(error) => return Err(CacheError::io("read", path)(error)),
    };
    #[derive(Deserialize)]
    struct FormatOnly {
        format: u32,
    }
    let format: FormatOnly = serde_json::from_str(&text).map_err(|error| CacheError::Invalid {
        path: path.to_path_buf(),
        message: format!("{error} (delete the file to start over; every stage will rerun)"),
    })?;
    if format.format != LOCK_FORMAT {
        return Ok(LockFile::empty(pipeline));
    }
    serde_json::from_str(&text).map_err(|error| CacheError::Invalid {
        path: path.to_path_buf(),
        message: format!("{error} (delete the file to start over; every stage will rerun)"),
    })
}

/// Format version of `locks/<pipeline>.published.json`.
pub const PUBLISHED_FORMAT: u32 = 1;

/// What the last publish of one stage's output wrote outside the cache (export folders).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PublishedRecord {
    /// The output digest that was published.
    pub output: String,
    /// Destination folder (absolute, on this machine: published copies may differ per checkout,
    /// e.g. `base_model_name_or_path`) → the files written there.
    pub destinations: BTreeMap<String, Manifest>,
    /// What the publish decided on this machine ([`crate::config::StageSpec::publish_context`]).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub context: BTreeMap<String, String>,
}

/// `locks/<pipeline>.published.json`: per stage, what its last publish wrote, so `status` can
/// tell a deleted, edited or overwritten export folder from one that is as published. A local
/// record like the size+mtime index: a missing or unreadable one only means "publish again".
pub type PublishedFile = StageRecords<PublishedRecord>;

/// A local per-pipeline file of one record per stage beside the lock file
/// (`locks/<pipeline>.<kind>.json`: publish records, failure records). Unlike the lock file it is
/// a hint: a missing, unreadable or other-format file reads as empty.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StageRecords<R> {
    pub format: u32,
    pub pipeline: String,
    pub stages: BTreeMap<String, R>,
}

impl Cache {
    fn records_path(&self, pipeline: &str, kind: &str) -> PathBuf {
        self.root
            .join("locks")
            .join(format!("{}.{kind}.json", sanitize_name(pipeline)))
    }

    /// `locks/<pipeline>.<kind>.json` in `format`; missing, unreadable or another format: empty.
    pub(crate) fn read_records<R: serde::de::DeserializeOwned>(
        &self,
        pipeline: &str,
        kind: &str,
        format: u32,
    ) -> StageRecords<R> {
        std::fs::read_to_string(self.records_path(pipeline, kind))
            .ok()
            .and_then(|text| serde_json::from_str::<StageRecords<R>>(&text).ok())
            .filter(|file| file.format == format)
            .unwrap_or_else(|| StageRecords {
                format,
                pipeline: pipeline.to_string(),
                stages: BTreeMap::new(),
            })
    }

    /// Write `locks/<pipeline>.<kind>.json` atomically.
    pub(crate) fn write_records<R: Serialize>(
        &self,
        kind: &str,
        file: &StageRecords<R>,
    ) -> Result<(), CacheError> {
        let path = self.records_path(&file.pipeline, kind);
        let bytes = serde_json::to_vec_pretty(file).map_err(|error| CacheError::Invalid {
            path: path.clone(),
            message: error.to_string(),
        })?;
        write_atomic(&path, &bytes, &self.tmp_dir())
    }

    /// A pipeline's publish records; missing, unreadable or of another format: empty.
    pub fn read_published(&self, pipeline: &str) -> Result<PublishedFile, CacheError> {
        Ok(self.read_records(pipeline, "published", PUBLISHED_FORMAT))
    }

    /// Record (atomically) what a stage's publish wrote. Call while holding the pipeline lock.
    pub fn record_published(
        &self,
        pipeline: &str,
        stage: &str,
        record: PublishedRecord,
    ) -> Result<(), CacheError> {
        let mut file = self.read_published(pipeline)?;
        if file.stages.get(stage) == Some(&record) {
            return Ok(());
        }
        file.stages.insert(stage.to_string(), record);
        self.write_records("published", &file)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fingerprint::FINGERPRINT_VERSION;

    fn entry() -> LockEntry {
        let components = StageFingerprint {
            version: FINGERPRINT_VERSION,
            stage: "data".into(),
            kind: "ingest".into(),
            params: BTreeMap::from([("ingest.path".to_string(), serde_json::json!("x"))]),
            upstream: BTreeMap::new(),
            inputs: BTreeMap::new(),
            tool_version: "0.1.0".into(),
            seed: 0,
            environment: BTreeMap::new(),
        };
        LockEntry {
            fingerprint: components.digest(),
            components,
            output: "00ff".into(),
            outcome: BTreeMap::new(),
            wall_time_seconds: 0.25,
        }
    }

    #[test]
    fn missing_lock_file_is_empty_and_writes_round_trip() {
        let dir = tempfile::tempdir().unwrap();
        let cache = Cache::open(dir.path()).unwrap();
        let mut lock = cache.read_lock_file("quick start").unwrap();
        assert!(lock.stages.is_empty());
        lock.stages.insert("data".into(), entry());
        cache.write_lock_file(&lock).unwrap();
        assert!(dir.path().join("locks/quick_start.lock.json").is_file());
        assert_eq!(cache.read_lock_file("quick start").unwrap(), lock);
        assert_eq!(cache.all_lock_files().unwrap().len(), 1);
    }

    #[test]
    fn garbled_lock_file_is_an_error_naming_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let cache = Cache::open(dir.path()).unwrap();
        std::fs::write(cache.lock_file_path("p"), "{not json").unwrap();
        let error = cache.read_lock_file("p").unwrap_err().to_string();
        assert!(error.contains("p.lock.json"), "{error}");
        assert!(error.contains("delete the file"), "{error}");
    }

    #[test]
    fn other_format_is_treated_as_empty() {
        let dir = tempfile::tempdir().unwrap();
        let cache = Cache::open(dir.path()).unwrap();
        std::fs::write(cache.lock_file_path("p"), r#"{"format": 999, "x": 1}"#).unwrap();
        assert!(cache.read_lock_file("p").unwrap().stages.is_empty());
    }
}

#[cfg(test)]
mod published_tests {
    use super::*;

    #[test]
    fn published_records_round_trip_and_garbage_reads_as_empty() {
        let dir = tempfile::tempdir().unwrap();
        let cache = Cache::open(dir.path()).unwrap();
        assert!(cache.read_published("p").unwrap().stages.is_empty());
        let record = PublishedRecord {
            output: "ab".into(),
            destinations: BTreeMap::from([(
                "/x/out".to_string(),
                Manifest {
                    format: 1,
                    files: Vec::new(),
                },
            )]),
            context: BTreeMap::from([("base_model_name_or_path".into(), "/m".into())]),
        };
        cache
            .record_published("p", "export", record.clone())
            .unwrap();
        assert_eq!(cache.read_published("p").unwrap().stages["export"], record);
        std::fs::write(dir.path().join("locks/p.published.json"), "{garbage").unwrap();
        assert!(cache.read_published("p").unwrap().stages.is_empty());
        // Not a lock file: gc does not read it.
        assert!(cache.all_lock_files().unwrap().is_empty());
    }
}
