//! `locks/<pipeline>.failures.json`: per stage, how its last failed run ended (the fingerprint
//! it ran with, the error, how long it ran, when), so `status` and `report` can say "the last run
//! with these inputs failed: ..." where they would otherwise say "never run". A local record
//! like the publish records: a missing or unreadable one only means "no failure known", and a
//! stage's entry is dropped when it next succeeds. Never pushed to a remote.

use serde::{Deserialize, Serialize};

use super::lock_file::StageRecords;
use super::{Cache, CacheError};

/// Format version of `locks/<pipeline>.failures.json`.
pub const FAILURES_FORMAT: u32 = 1;

/// How one stage's last failed run ended.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FailureRecord {
    /// Digest of the fingerprint the stage ran with.
    pub fingerprint: String,
    /// The error, as the run reported it.
    pub error: String,
    /// Seconds the stage ran before it failed.
    pub wall_time_seconds: f64,
    /// When it failed (seconds since the Unix epoch).
    pub failed_at: u64,
}

/// One pipeline's failure records.
pub type FailuresFile = StageRecords<FailureRecord>;

impl Cache {
    /// A pipeline's failure records; missing, unreadable or of another format: empty.
    pub fn read_failures(&self, pipeline: &str) -> FailuresFile {
        self.read_records(pipeline, "failures", FAILURES_FORMAT)
    }

    /// Record (atomically) a stage's failed run, or with `None` forget it (after a success;
    /// nothing is written when there is nothing to forget). Call while holding the pipeline lock.
    pub fn record_failure(
        &self,
        pipeline: &str,
        stage: &str,
        record: Option<FailureRecord>,
    ) -> Result<(), CacheError> {
        let mut file = self.read_failures(pipeline);
        let changed = match record {
            Some(record) => file.stages.insert(stage.to_string(), record.clone()) != Some(record),
            None => file.stages.remove(stage).is_some(),
        };
        if !changed {
            return Ok(());
        }
        self.write_records("failures", &file)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(error: &str) -> FailureRecord {
        FailureRecord {
            fingerprint: "f1".into(),
            error: error.into(),
            wall_time_seconds: 1.5,
            failed_at: 1_700_000_000,
        }
    }

    #[test]
    fn failures_are_recorded_replaced_and_forgotten() {
        let dir = tempfile::tempdir().unwrap();
        let cache = Cache::open(dir.path()).unwrap();
        assert!(cache.read_failures("p").stages.is_empty());
        // Forgetting what is not there writes nothing.
        cache.record_failure("p", "train", None).unwrap();
        assert!(!dir.path().join("locks/p.failures.json").exists());

        cache
            .record_failure("p", "train", Some(record("out of memory")))
            .unwrap();
        cache
            .record_failure("p", "data", Some(record("bad row")))
            .unwrap();
        cache
            .record_failure("p", "train", Some(record("bad row 2")))
            .unwrap();
        let file = cache.read_failures("p");
        assert_eq!(file.stages["train"].error, "bad row 2");
        assert_eq!(file.stages["data"].error, "bad row");

        cache.record_failure("p", "train", None).unwrap();
        let file = cache.read_failures("p");
        assert_eq!(file.stages.keys().collect::<Vec<_>>(), ["data"]);
        // Another pipeline's records are its own.
        assert!(cache.read_failures("q").stages.is_empty());
    }

    #[test]
    fn an_unreadable_record_is_no_record() {
        let dir = tempfile::tempdir().unwrap();
        let cache = Cache::open(dir.path()).unwrap();
        std::fs::write(dir.path().join("locks/p.failures.json"), "{garbage").unwrap();
        assert!(cache.read_failures("p").stages.is_empty());
        cache
            .record_failure("p", "train", Some(record("x")))
            .unwrap();
        assert_eq!(cache.read_failures("p").stages.len(), 1);
    }
}
