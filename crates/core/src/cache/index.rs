//! The size+mtime index (DVC's state db): remembers the blake3 of input files together with their
//! size, modification time, change time and inode, so `status` on gigabytes of unchanged inputs
//! does not rehash them. It only *skips rehashing*: the content hash stays the fingerprint key.
//!
//! Racy entries are never trusted: a file whose mtime is within [`RACY_WINDOW`] of the moment it
//! was hashed could be rewritten in the same timestamp tick with the same size, so it is not
//! recorded (git's "racily clean" rule). Entries are keyed by absolute path on this machine; the
//! index is a local hint and never part of a fingerprint. Concurrent writers each replace the
//! file atomically; a lost update only costs a rehash.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

use super::{hash_file, write_atomic, Cache, CacheError};

/// Files modified this recently before hashing are not recorded.
pub const RACY_WINDOW: Duration = Duration::from_secs(2);

const INDEX_FORMAT: u32 = 1;

/// File metadata that changes whenever the content can have changed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Stamp {
    pub size: u64,
    pub modified_ns: i128,
    /// Inode change time (Unix; 0 elsewhere): cannot be set back by `touch`.
    pub changed_ns: i128,
    /// Inode number (Unix; 0 elsewhere).
    pub inode: u64,
}

impl Stamp {
    pub fn of(metadata: &std::fs::Metadata) -> Stamp {
        let modified_ns = metadata.modified().map(system_time_ns).unwrap_or(0);
        #[cfg(unix)]
        let (changed_ns, inode) = {
            use std::os::unix::fs::MetadataExt;
            (
                i128::from(metadata.ctime()) * 1_000_000_000 + i128::from(metadata.ctime_nsec()),
                metadata.ino(),
            )
        };
        #[cfg(not(unix))]
        let (changed_ns, inode) = (0, 0);
        Stamp {
            size: metadata.len(),
            modified_ns,
            changed_ns,
            inode,
        }
    }
}

fn system_time_ns(time: SystemTime) -> i128 {
    match time.duration_since(UNIX_EPOCH) {
        Ok(after) => after.as_nanos() as i128,
        Err(before) => -(before.duration().as_nanos() as i128),
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct IndexEntry {
    stamp: Stamp,
    blake3: String,
}

#[derive(Debug, Default, Serialize, Deserialize)]
struct IndexFile {
    format: u32,
    files: BTreeMap<String, IndexEntry>,
}

/// The index, loaded in memory; [`FileIndex::save`] writes it back when it changed.
#[derive(Debug)]
pub struct FileIndex {
    path: PathBuf,
    temp_dir: PathBuf,
    files: BTreeMap<String, IndexEntry>,
    changed: bool,
    /// How many digests came from the index / were computed (for tests and the bench).
    pub hits: usize,
    pub misses: usize,
}

impl FileIndex {
    /// Load the cache's index; a missing or unreadable index is empty (it is only a hint).
    pub fn load(cache: &Cache) -> FileIndex {
        let path = cache.root().join("index").join("files.json");
        let files = std::fs::read_to_string(&path)
            .ok()
            .and_then(|text| serde_json::from_str::<IndexFile>(&text).ok())
            .filter(|index| index.format == INDEX_FORMAT)
            .map(|index| index.files)
            .unwrap_or_default();
        FileIndex {
            path,
            temp_dir: cache.tmp_dir(),
            files,
            changed: false,
            hits: 0,
            misses: 0,
        }
    }

    /// blake3 of the file's content, from the index when size, mtime, ctime and inode match.
    pub fn digest(&mut self, path: &Path) -> Result<String, CacheError> {
        let absolute = std::path::absolute(path).unwrap_or_else(|_| path.to_path_buf());
        let key = absolute.to_string_lossy().into_owned();
        let before = std::fs::metadata(&absolute).map_err(CacheError::io("read", &absolute))?;
        let stamp = Stamp::of(&before);
        if let Some(entry) = self.files.get(&key) {
            if entry.stamp == stamp {
                self.hits += 1;
                return Ok(entry.blake3.clone());
            }
        }
        self.misses += 1;
        let started = SystemTime::now();
        let digest = hash_file(&absolute)?;
        let after = std::fs::metadata(&absolute).map_err(CacheError::io("read", &absolute))?;
        let settled = system_time_ns(started) - stamp.modified_ns > RACY_WINDOW.as_nanos() as i128;
        if Stamp::of(&after) == stamp && settled {
            self.files.insert(
                key,
                IndexEntry {
                    stamp,
                    blake3: digest.clone(),
                },
            );
            self.changed = true;
        } else if self.files.remove(&key).is_some() {
            self.changed = true;
        }
        Ok(digest)
    }

    /// Write the index back (atomically) if anything was added.
    pub fn save(&mut self) -> Result<(), CacheError> {
        if !self.changed {
            return Ok(());
        }
        // Drop entries of files that no longer exist, so the index does not grow forever.
        self.files.retain(|path, _| Path::new(path).exists());
        let index = IndexFile {
            format: INDEX_FORMAT,
            files: std::mem::take(&mut self.files),
        };
        let bytes = serde_json::to_vec(&index).map_err(|error| CacheError::Invalid {
            path: self.path.clone(),
            message: error.to_string(),
        })?;
        self.files = index.files;
        write_atomic(&self.path, &bytes, &self.temp_dir)?;
        self.changed = false;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Set a file's mtime into the past so the index will record it (not racy).
    fn age(path: &Path) {
        let file = std::fs::File::options().write(true).open(path).unwrap();
        file.set_modified(SystemTime::now() - Duration::from_secs(60))
            .unwrap();
    }

    #[test]
    fn unchanged_file_is_not_rehashed_and_changes_are_seen() {
        let dir = tempfile::tempdir().unwrap();
        let cache = Cache::open(&dir.path().join("cache")).unwrap();
        let file = dir.path().join("input.txt");
        std::fs::write(&file, "hello").unwrap();
        age(&file);
        let mut index = FileIndex::load(&cache);
        let first = index.digest(&file).unwrap();
        assert_eq!(first, blake3::hash(b"hello").to_hex().to_string());
        index.save().unwrap();

        let mut index = FileIndex::load(&cache);
        assert_eq!(index.digest(&file).unwrap(), first);
        assert_eq!((index.hits, index.misses), (1, 0));

        // Same size, new content, mtime set back to the old value: ctime still differs.
        let old_modified = std::fs::metadata(&file).unwrap().modified().unwrap();
        std::fs::write(&file, "HELLO").unwrap();
        std::fs::File::options()
            .write(true)
            .open(&file)
            .unwrap()
            .set_modified(old_modified)
            .unwrap();
        let second = index.digest(&file).unwrap();
        assert_ne!(second, first);
        assert_eq!(index.misses, 1);
    }

    #[test]
    fn racy_files_are_not_recorded() {
        let dir = tempfile::tempdir().unwrap();
        let cache = Cache::open(&dir.path().join("cache")).unwrap();
        let file = dir.path().join("fresh.txt");
        std::fs::write(&file, "just written").unwrap();
        let mut index = FileIndex::load(&cache);
        index.digest(&file).unwrap();
        index.digest(&file).unwrap();
        assert_eq!(index.hits, 0, "a just-written file is always rehashed");
    }

    #[test]
    fn missing_file_is_an_error_naming_it() {
        let dir = tempfile::tempdir().unwrap();
        let cache = Cache::open(&dir.path().join("cache")).unwrap();
        let mut index = FileIndex::load(&cache);
        let error = index
            .digest(&dir.path().join("nope.parquet"))
            .unwrap_err()
            .to_string();
        assert!(error.contains("nope.parquet"), "{error}");
    }
}
