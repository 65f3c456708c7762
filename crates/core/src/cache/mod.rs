//! The cache: a content-addressed store of stage artifacts plus the records that say which
//! artifact belongs to which fingerprint. It knows bytes, files and digests; it knows nothing of
//! ML, of stage kinds or of how to decide freshness (that is `exec::plan`).
//!
//! Layout under the cache root (default `.peftpipe/cache` next to the pipeline file, overridden
//! by `--cache-dir` / `PEFTPIPE_CACHE_DIR`):
//!
//! ```text
//! objects/<aa>/<digest>/manifest.json   files of the artifact with size + blake3 (see Manifest)
//! objects/<aa>/<digest>/data/...        the artifact itself (read-only files)
//! runs/<aa>/<fingerprint>.json          fingerprint digest → output digest (the "run cache")
//! locks/<pipeline>.lock.json            per pipeline: each stage's last fingerprint components
//! locks/<pipeline>.flock                the file lock a run of that pipeline holds (exclusive)
//! locks/<pipeline>.published.json       what each stage's last publish wrote (export folders)
//! locks/<pipeline>.failures.json        how each stage's last failed run ended (local, never pushed)
//! index/files.json                      size+mtime index of hashed input files (a hint only)
//! tmp/                                  staging dirs; anything here is garbage once nothing
//!                                       holds the cache lock
//! cache.lock                            shared by runs, exclusive for gc (fs4)
//! ```
//!
//! Locking: a run holds `cache.lock` shared and its pipeline's `.flock` exclusively, so runs of
//! different pipelines proceed at once while two runs of one pipeline take turns; `gc` holds
//! `cache.lock` exclusively, so it never deletes what a run is about to use. What runs of
//! different pipelines share is safe to share: objects are content-addressed and moved into
//! place whole (a second writer of the same digest finds the first one's), run records and the
//! file index are replaced atomically (the index is a hint, a lost update only costs a rehash).
//!
//! Every file a later run trusts is written to a temporary name and renamed into place, so a
//! crash never leaves a half-written object, record or lock file behind under its final name.
//!
//! `remote` copies objects, run records and lock files to and from a remote cache (`peftpipe
//! push` / `pull`) with the same layout; what it pulls goes through [`Cache::store`] and the same
//! atomic writes, after every file is checked against its digest.

pub mod failures;
pub mod gc;
pub mod index;
pub mod lock_file;
pub mod objects;
pub mod remote;

use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};

use fs4::fs_std::FileExt;

pub use failures::{FailureRecord, FailuresFile};
pub use index::FileIndex;
pub use lock_file::{LockEntry, LockFile, PublishedFile, PublishedRecord};
pub use objects::{Manifest, RunRecord};
pub use remote::{Remote, RemoteError};

/// Something went wrong reading or writing the cache. Messages name the path.
#[derive(Debug, thiserror::Error)]
pub enum CacheError {
    #[error("cannot {action} `{path}`: {source}")]
    Io {
        action: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("`{path}` is not valid: {message}")]
    Invalid { path: PathBuf, message: String },
}

impl CacheError {
    pub(crate) fn io(action: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> Self {
        let path = path.to_path_buf();
        move |source| CacheError::Io {
            action,
            path,
            source,
        }
    }
}

/// The cache directory default for a pipeline file: `.peftpipe/cache` next to it.
pub fn default_cache_dir(project_dir: &Path) -> PathBuf {
    project_dir.join(".peftpipe").join("cache")
}

/// A cache rooted at a directory. Opening it creates the layout; it takes no lock.
#[derive(Debug, Clone)]
pub struct Cache {
    root: PathBuf,
}

/// A file lock on a cache (the cache's, or one pipeline's), released when dropped.
#[derive(Debug)]
pub struct CacheLock {
    file: File,
}

impl Drop for CacheLock {
    fn drop(&mut self) {
        // Closing the file releases the lock too; unlocking first makes it immediate.
        let _ = FileExt::unlock(&self.file);
    }
}

impl Cache {
    /// Open (creating if needed) the cache at `root`.
    pub fn open(root: &Path) -> Result<Cache, CacheError> {
        for sub in ["objects", "runs", "locks", "index", "tmp"] {
            let dir = root.join(sub);
            std::fs::create_dir_all(&dir).map_err(CacheError::io("create", &dir))?;
        }
        let tag = root.join("CACHEDIR.TAG");
        if !tag.exists() {
            // Tells backup tools to skip the cache (https://bford.info/cachedir/).
            write_atomic(
                &tag,
                b"Signature: 8a477f597d28d172789f06886806bc55\n# peftpipe cache\n",
                root,
            )?;
        }
        Ok(Cache {
            root: root.to_path_buf(),
        })
    }

    /// The cache at `root` for reading only (`status`, `metrics`, `report`): like [`Cache::open`]
    /// when it exists; when it does not, a cache that holds nothing, and nothing is created (a
    /// mistyped `--cache-dir` must not leave a folder behind): readers find no lock file, object
    /// or run record in it.
    pub fn open_for_reading(root: &Path) -> Result<Cache, CacheError> {
        if root.exists() {
            Cache::open(root)
        } else {
            Ok(Cache {
                root: root.to_path_buf(),
            })
        }
    }

    /// Whether the cache's folder exists (a [`Cache::open_for_reading`] of a missing one does
    /// not create it, and nothing may be written into it).
    pub fn exists(&self) -> bool {
        self.root.exists()
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    pub fn tmp_dir(&self) -> PathBuf {
        self.root.join("tmp")
    }

    /// Take the cache's exclusive lock (gc: no run may be in flight). When another process holds
    /// it, `on_wait` is called once and this blocks until the other process is done (like
    /// cargo's package cache lock).
    pub fn lock_exclusive(&self, on_wait: impl FnOnce()) -> Result<CacheLock, CacheError> {
        let path = self.root.join("cache.lock");
        let file = open_lock(&path)?;
        let acquired = FileExt::try_lock_exclusive(&file).map_err(CacheError::io("lock", &path))?;
        if !acquired {
            on_wait();
            FileExt::lock_exclusive(&file).map_err(CacheError::io("lock", &path))?;
        }
        Ok(CacheLock { file })
    }

    /// Take the cache's lock for a run: shared with other runs, exclusive of gc (`on_wait` is
    /// called once when gc holds it). When nothing else holds the cache, the leftovers of crashed
    /// or killed runs in `tmp/` are removed first: only then is no staging directory there in use.
    pub fn lock_for_run(&self, on_wait: impl FnOnce()) -> Result<CacheLock, CacheError> {
        let path = self.root.join("cache.lock");
        let file = open_lock(&path)?;
        if FileExt::try_lock_exclusive(&file).map_err(CacheError::io("lock", &path))? {
            let lock = CacheLock { file };
            self.clear_tmp()?;
            // Downgrade to shared (flock converts the lock on the same file).
            FileExt::lock_shared(&lock.file).map_err(CacheError::io("lock", &path))?;
            return Ok(lock);
        }
        // Another run holds it exclusively for a moment while it clears `tmp/` (above): wait
        // that out quietly; only a holder that stays (gc) is worth a message.
        for _ in 0..50 {
            if FileExt::try_lock_shared(&file).map_err(CacheError::io("lock", &path))? {
                return Ok(CacheLock { file });
            }
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        on_wait();
        FileExt::lock_shared(&file).map_err(CacheError::io("lock", &path))?;
        Ok(CacheLock { file })
    }

    /// Take one pipeline's exclusive lock (`locks/<pipeline>.flock`), held by a run of that
    /// pipeline next to [`Cache::lock_for_run`]. When another run of the pipeline holds it,
    /// `on_wait` is called once and this blocks until that run is done.
    pub fn lock_pipeline(
        &self,
        pipeline: &str,
        on_wait: impl FnOnce(),
    ) -> Result<CacheLock, CacheError> {
        let path = self
            .root
            .join("locks")
            .join(format!("{}.flock", sanitize_name(pipeline)));
        let file = open_lock(&path)?;
        let acquired = FileExt::try_lock_exclusive(&file).map_err(CacheError::io("lock", &path))?;
        if !acquired {
            on_wait();
            FileExt::lock_exclusive(&file).map_err(CacheError::io("lock", &path))?;
        }
        Ok(CacheLock { file })
    }

    /// Remove leftovers of crashed or killed runs. Only call while holding the cache lock
    /// exclusively ([`Cache::lock_exclusive`], or inside [`Cache::lock_for_run`]).
    pub fn clear_tmp(&self) -> Result<(), CacheError> {
        let tmp = self.tmp_dir();
        let entries = std::fs::read_dir(&tmp).map_err(CacheError::io("list", &tmp))?;
        for entry in entries {
            let entry = entry.map_err(CacheError::io("list", &tmp))?;
            let path = entry.path();
            remove_path(&path)?;
        }
        Ok(())
    }

    /// A fresh, empty, uniquely named directory under `tmp/`.
    pub fn staging_dir(&self, label: &str) -> Result<PathBuf, CacheError> {
        let tmp = self.tmp_dir();
        let dir = crate::files::dir_builder()
            .prefix(&format!("{}-", sanitize_name(label)))
            .tempdir_in(&tmp)
            .map_err(CacheError::io("create a staging directory in", &tmp))?;
        Ok(dir.keep())
    }
}

fn open_lock(path: &Path) -> Result<File, CacheError> {
    std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .read(true)
        .write(true)
        .open(path)
        .map_err(CacheError::io("open", path))
}

/// Remove a file or a directory tree (making read-only files writable as needed).
pub fn remove_path(path: &Path) -> Result<(), CacheError> {
    let metadata = match std::fs::symlink_metadata(path) {
        Ok(metadata) => metadata,
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(error) => return Err(CacheError::io("inspect", path)(error)),
    };
    if metadata.is_dir() {
        std::fs::remove_dir_all(path).map_err(CacheError::io("remove", path))
    } else {
        std::fs::remove_file(path).map_err(CacheError::io("remove", path))
    }
}

/// A file-name-safe spelling of a pipeline or stage name. `@` (of matrix expansions,
/// `train@lora`) is kept, so `train@lora` and a stage named `train_lora` never share a folder.
pub fn sanitize_name(name: &str) -> String {
    let cleaned: String = name
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '_' || c == '.' || c == '@' {
                c
            } else {
                '_'
            }
        })
        .collect();
    let trimmed = cleaned.trim_start_matches('.');
    if trimmed.is_empty() {
        "_".to_string()
    } else {
        trimmed.to_string()
    }
}

/// Write `bytes` to `path` atomically: a temporary file in `temp_in` (same filesystem), synced,
/// then renamed over `path`.
pub fn write_atomic(path: &Path, bytes: &[u8], temp_in: &Path) -> Result<(), CacheError> {
    let mut file = crate::files::file_builder()
        .prefix(".write-")
        .tempfile_in(temp_in)
        .map_err(CacheError::io("create a temporary file in", temp_in))?;
    file.write_all(bytes)
        .map_err(CacheError::io("write", file.path()))?;
    file.as_file()
        .sync_all()
        .map_err(CacheError::io("sync", path))?;
    file.persist(path).map_err(|error| CacheError::Io {
        action: "replace",
        path: path.to_path_buf(),
        source: error.error,
    })?;
    Ok(())
}

/// blake3 of a file's content, hex.
pub fn hash_file(path: &Path) -> Result<String, CacheError> {
    let file = File::open(path).map_err(CacheError::io("open", path))?;
    let mut hasher = blake3::Hasher::new();
    hasher
        .update_reader(std::io::BufReader::with_capacity(1 << 20, file))
        .map_err(CacheError::io("read", path))?;
    Ok(hasher.finalize().to_hex().to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sanitize_name_keeps_safe_characters() {
        assert_eq!(sanitize_name("quick start/v2"), "quick_start_v2");
        assert_eq!(sanitize_name("..hidden"), "hidden");
        assert_eq!(sanitize_name(""), "_");
        assert_eq!(sanitize_name("train@r8-0_01"), "train@r8-0_01");
    }

    #[test]
    fn write_atomic_replaces_content() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("a.json");
        write_atomic(&path, b"one", dir.path()).unwrap();
        write_atomic(&path, b"two", dir.path()).unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), b"two");
        let names: Vec<_> = std::fs::read_dir(dir.path()).unwrap().collect();
        assert_eq!(names.len(), 1, "no temporary file is left behind");
    }

    #[test]
    fn second_lock_waits_for_the_first() {
        let dir = tempfile::tempdir().unwrap();
        let cache = Cache::open(dir.path()).unwrap();
        let first = cache
            .lock_exclusive(|| panic!("first lock must not wait"))
            .unwrap();
        let waited = std::sync::atomic::AtomicBool::new(false);
        std::thread::scope(|scope| {
            let handle = scope.spawn(|| {
                let other = Cache::open(dir.path()).unwrap();
                other
                    .lock_exclusive(|| waited.store(true, std::sync::atomic::Ordering::SeqCst))
                    .unwrap()
            });
            // Hold the first lock until the second has reported that it waits (a fixed sleep
            // here was flaky on a loaded machine: the thread could start after the release).
            let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
            while !waited.load(std::sync::atomic::Ordering::SeqCst)
                && std::time::Instant::now() < deadline
            {
                std::thread::sleep(std::time::Duration::from_millis(5));
            }
            drop(first);
            drop(handle.join().unwrap());
        });
        assert!(waited.load(std::sync::atomic::Ordering::SeqCst));
    }

    /// Whether taking a lock with `take` had to wait (and said so) while `held` is held for
    /// longer than a run's quiet wait (0.5 s, see [`Cache::lock_for_run`]).
    fn waits(held: CacheLock, take: impl FnOnce(&dyn Fn()) -> CacheLock + Send) -> bool {
        let waited = std::sync::atomic::AtomicBool::new(false);
        std::thread::scope(|scope| {
            let handle =
                scope.spawn(|| take(&|| waited.store(true, std::sync::atomic::Ordering::SeqCst)));
            std::thread::sleep(std::time::Duration::from_millis(800));
            drop(held);
            drop(handle.join().unwrap());
        });
        waited.load(std::sync::atomic::Ordering::SeqCst)
    }

    #[test]
    fn runs_share_the_cache_lock_gc_excludes_them() {
        let dir = tempfile::tempdir().unwrap();
        let cache = Cache::open(dir.path()).unwrap();
        let run = cache
            .lock_for_run(|| panic!("nothing else holds it"))
            .unwrap();
        let other_run = cache
            .lock_for_run(|| panic!("runs share the cache lock"))
            .unwrap();
        drop(other_run);
        assert!(waits(run, |on_wait| cache.lock_exclusive(on_wait).unwrap()));
        let gc = cache.lock_exclusive(|| panic!("free again")).unwrap();
        assert!(waits(gc, |on_wait| cache.lock_for_run(on_wait).unwrap()));
    }

    #[test]
    fn pipeline_locks_exclude_runs_of_one_pipeline_only() {
        let dir = tempfile::tempdir().unwrap();
        let cache = Cache::open(dir.path()).unwrap();
        let reviews = cache.lock_pipeline("reviews", || panic!("free")).unwrap();
        let questions = cache
            .lock_pipeline("questions", || {
                panic!("another pipeline's lock is independent")
            })
            .unwrap();
        drop(questions);
        assert!(waits(reviews, |on_wait| cache
            .lock_pipeline("reviews", on_wait)
            .unwrap()));
        // The pipeline locks are not lock files gc reads.
        assert!(cache.all_lock_files().unwrap().is_empty());
    }

    #[test]
    fn a_run_clears_leftovers_only_when_it_has_the_cache_to_itself() {
        let dir = tempfile::tempdir().unwrap();
        let cache = Cache::open(dir.path()).unwrap();
        let leftover = cache.staging_dir("killed").unwrap();
        let running = cache.lock_for_run(|| panic!("free")).unwrap();
        assert!(
            !leftover.exists(),
            "nothing else held the cache: leftovers removed"
        );
        let in_use = cache.staging_dir("running").unwrap();
        let second = cache.lock_for_run(|| panic!("shared")).unwrap();
        assert!(
            in_use.exists(),
            "another run holds the cache: its staging dir stays"
        );
        drop((running, second));
    }

    #[test]
    fn clear_tmp_removes_staging_leftovers() {
        let dir = tempfile::tempdir().unwrap();
        let cache = Cache::open(dir.path()).unwrap();
        let staging = cache.staging_dir("train").unwrap();
        std::fs::write(staging.join("partial.bin"), b"half").unwrap();
        cache.clear_tmp().unwrap();
        assert!(!staging.exists());
    }
}
