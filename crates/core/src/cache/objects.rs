//! The content-addressed object store and the run cache.
//!
//! An object is a directory `objects/<aa>/<digest>/` holding `manifest.json` (every file of the
//! artifact with its size and blake3) and `data/` (the artifact). `digest` is the blake3 of the
//! manifest's canonical JSON, so an object's name proves its content: [`Cache::verify_object`]
//! rehashes the files and compares. Objects are moved into place by one rename of a complete
//! staging directory, and their files are made read-only.
//!
//! A run record `runs/<aa>/<fingerprint>.json` maps a fingerprint digest to the output digest it
//! produced, so going back to earlier parameters restores instead of rerunning.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::{hash_file, remove_path, write_atomic, Cache, CacheError};
use crate::fingerprint::canonical_json;

/// Format version of `manifest.json`.
pub const MANIFEST_FORMAT: u32 = 1;

/// One file of an artifact.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ManifestEntry {
    /// Path relative to the artifact root, `/`-separated.
    pub path: String,
    pub size: u64,
    pub blake3: String,
}

/// Computes a file's blake3 (hex), e.g. through the size+mtime index.
pub type DigestOf<'a> = &'a mut dyn FnMut(&Path) -> Result<String, CacheError>;

/// Every file of an artifact, sorted by path. Empty directories are not recorded.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Manifest {
    pub format: u32,
    pub files: Vec<ManifestEntry>,
}

impl Manifest {
    /// Hash every file under `root`. Symlinks and special files are refused: an artifact is plain
    /// files, so that it means the same thing on every machine.
    pub fn of_directory(root: &Path) -> Result<Manifest, CacheError> {
        let mut sizes = BTreeMap::new();
        if let Some(problem) = list_sizes(root, root, &mut sizes)? {
            return Err(CacheError::Invalid {
                path: root.to_path_buf(),
                message: format!(
                    "stage artifacts may only contain plain files and directories: {problem}"
                ),
            });
        }
        // BTreeMap order: sorted by path.
        let files = sizes
            .into_iter()
            .map(|(path, size)| {
                Ok(ManifestEntry {
                    blake3: hash_file(&root.join(&path))?,
                    path,
                    size,
                })
            })
            .collect::<Result<Vec<_>, CacheError>>()?;
        Ok(Manifest {
            format: MANIFEST_FORMAT,
            files,
        })
    }

    /// The manifest of a published destination: a directory's files as [`Manifest::of_directory`]
    /// lists them, or one plain file as a single entry with an empty path.
    pub fn of_published(path: &Path) -> Result<Manifest, CacheError> {
        let metadata = std::fs::symlink_metadata(path).map_err(CacheError::io("inspect", path))?;
        if !metadata.is_file() {
            return Self::of_directory(path);
        }
        Ok(Manifest {
            format: MANIFEST_FORMAT,
            files: vec![ManifestEntry {
                path: String::new(),
                size: metadata.len(),
                blake3: hash_file(path)?,
            }],
        })
    }

    /// The one entry of a single-file manifest ([`Manifest::of_published`] of a file).
    fn single_file(&self) -> Option<&ManifestEntry> {
        match self.files.as_slice() {
            [entry] if entry.path.is_empty() => Some(entry),
            _ => None,
        }
    }

    /// [`Manifest::compare_directory`] for a published destination, which may be one file.
    pub fn compare_published(
        &self,
        path: &Path,
        digest_of: Option<DigestOf<'_>>,
    ) -> Result<Option<String>, CacheError> {
        let Some(entry) = self.single_file() else {
            return self.compare_directory(path, digest_of);
        };
        match std::fs::symlink_metadata(path) {
            Ok(metadata) if metadata.is_file() => {
                if metadata.len() != entry.size {
                    return Ok(Some(format!(
                        "has {} bytes, expected {}",
                        metadata.len(),
                        entry.size
                    )));
                }
            }
            Ok(_) => return Ok(Some("is not a file".into())),
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => {
                return Ok(Some("is missing".into()))
            }
            Err(error) => return Err(CacheError::io("inspect", path)(error)),
        }
        if let Some(digest_of) = digest_of {
            if digest_of(path)? != entry.blake3 {
                return Ok(Some("content differs".into()));
            }
        }
        Ok(None)
    }

    /// The digest naming the object: blake3 of the canonical JSON.
    pub fn digest(&self) -> String {
        let value = serde_json::to_value(self).unwrap_or(serde_json::Value::Null);
        blake3::hash(canonical_json(&value).as_bytes())
            .to_hex()
            .to_string()
    }

    pub fn total_size(&self) -> u64 {
        self.files.iter().map(|file| file.size).sum()
    }

    /// Compare the files under `root` with this manifest: the same paths, the same sizes, and,
    /// when `digest_of` is given, the same blake3 (computed by it, e.g. through the size+mtime
    /// index). Without `digest_of` it only lists directories and reads metadata, so it is cheap
    /// whatever the size of the files. `Ok(None)`: equal; `Ok(Some(detail))`: every difference,
    /// the first [`DIFFERENCES_SHOWN`] named and the rest counted (`adapter/a.bin has 3 bytes,
    /// expected 5, x is missing, y is unexpected, and 2 more`).
    pub fn compare_directory(
        &self,
        root: &Path,
        digest_of: Option<DigestOf<'_>>,
    ) -> Result<Option<String>, CacheError> {
        match std::fs::symlink_metadata(root) {
            Ok(metadata) if metadata.is_dir() => {}
            Ok(_) => return Ok(Some("is not a directory".into())),
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => {
                return Ok(Some("is missing".into()))
            }
            Err(error) => return Err(CacheError::io("inspect", root)(error)),
        }
        let mut found = BTreeMap::new();
        if let Some(problem) = list_sizes(root, root, &mut found)? {
            return Ok(Some(problem));
        }
        let mut differences = Vec::new();
        // Files whose size matches: only their content is left to compare.
        let mut same_size = Vec::new();
        for entry in &self.files {
            match found.get(entry.path.as_str()) {
                None => differences.push(format!("{} is missing", entry.path)),
                Some(size) if *size != entry.size => differences.push(format!(
                    "{} has {size} bytes, expected {}",
                    entry.path, entry.size
                )),
                Some(_) => same_size.push(entry),
            }
        }
        let expected: std::collections::BTreeSet<&str> =
            self.files.iter().map(|file| file.path.as_str()).collect();
        differences.extend(
            found
                .keys()
                .filter(|path| !expected.contains(path.as_str()))
                .map(|extra| format!("{extra} is unexpected")),
        );
        if let Some(digest_of) = digest_of {
            for entry in same_size {
                let path = entry
                    .path
                    .split('/')
                    .fold(root.to_path_buf(), |path, part| path.join(part));
                if digest_of(&path)? != entry.blake3 {
                    differences.push(format!("{} content differs", entry.path));
                }
            }
        }
        Ok(summarize_differences(&differences))
    }
}

/// How many differences [`Manifest::compare_directory`] names before it only counts the rest.
pub const DIFFERENCES_SHOWN: usize = 5;

/// The differences, joined: the first [`DIFFERENCES_SHOWN`], then how many more (None: none).
fn summarize_differences(differences: &[String]) -> Option<String> {
    if differences.is_empty() {
        return None;
    }
    let shown = differences[..differences.len().min(DIFFERENCES_SHOWN)].join(", ");
    Some(match differences.len().checked_sub(DIFFERENCES_SHOWN) {
        Some(more) if more > 0 => format!("{shown}, and {more} more"),
        _ => shown,
    })
}

/// Relative path → size of every plain file under `dir` (what a manifest is made from and checked
/// against). `Some(problem)` when a symlink or special file (which no artifact holds) or a
/// non-UTF-8 name is found.
fn list_sizes(
    root: &Path,
    dir: &Path,
    found: &mut BTreeMap<String, u64>,
) -> Result<Option<String>, CacheError> {
    let entries = std::fs::read_dir(dir).map_err(CacheError::io("list", dir))?;
    for entry in entries {
        let entry = entry.map_err(CacheError::io("list", dir))?;
        let path = entry.path();
        let file_type = entry
            .file_type()
            .map_err(CacheError::io("inspect", &path))?;
        let relative = match relative_key(root, &path) {
            Ok(relative) => relative,
            Err(error) => return Ok(Some(error.to_string())),
        };
        if file_type.is_dir() {
            if let Some(problem) = list_sizes(root, &path, found)? {
                return Ok(Some(problem));
            }
        } else if file_type.is_file() {
            let size = entry
                .metadata()
                .map_err(CacheError::io("inspect", &path))?
                .len();
            found.insert(relative, size);
        } else {
            return Ok(Some(format!("{relative} is a symlink or special file")));
        }
    }
    Ok(None)
}

fn relative_key(root: &Path, path: &Path) -> Result<String, CacheError> {
    let relative = path.strip_prefix(root).map_err(|_| CacheError::Invalid {
        path: path.to_path_buf(),
        message: format!("is not under `{}`", root.display()),
    })?;
    let mut parts = Vec::new();
    for component in relative.components() {
        match component.as_os_str().to_str() {
            Some(text) => parts.push(text.to_string()),
            None => {
                return Err(CacheError::Invalid {
                    path: path.to_path_buf(),
                    message: "file names in artifacts must be valid UTF-8".into(),
                })
            }
        }
    }
    Ok(parts.join("/"))
}

/// What the run cache records for one fingerprint.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RunRecord {
    /// Output digest.
    pub output: String,
    /// The stage's reported figures.
    #[serde(default)]
    pub outcome: BTreeMap<String, serde_json::Value>,
    /// Seconds the run took.
    #[serde(default)]
    pub wall_time_seconds: f64,
}

/// A cached artifact failed its check.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Corruption {
    pub detail: String,
}

/// The first 12 characters of a digest, for messages.
fn short(digest: &str) -> &str {
    digest.get(..12).unwrap_or(digest)
}

fn shard(digest: &str) -> &str {
    digest.get(..2).unwrap_or("__")
}

impl Cache {
    /// `objects/<aa>/<digest>`.
    pub fn object_dir(&self, digest: &str) -> PathBuf {
        self.root.join("objects").join(shard(digest)).join(digest)
    }

    /// The artifact files of an object.
    pub fn object_data(&self, digest: &str) -> PathBuf {
        self.object_dir(digest).join("data")
    }

    /// Cheap presence check (no hashing): the manifest exists.
    pub fn has_object(&self, digest: &str) -> bool {
        self.object_dir(digest).join("manifest.json").is_file()
    }

    /// Store the artifact in `staging/data` (a directory from [`Cache::staging_dir`]) and return
    /// its digest. `staging` is consumed: renamed into place, or removed when an intact object
    /// with the same digest already exists. A corrupted object of the same digest is replaced.
    pub fn store(&self, staging: &Path) -> Result<(String, Manifest), CacheError> {
        let data = staging.join("data");
        if !data.is_dir() {
            std::fs::create_dir_all(&data).map_err(CacheError::io("create", &data))?;
        }
        let manifest = Manifest::of_directory(&data)?;
        let digest = manifest.digest();
        let target = self.object_dir(&digest);
        if self.has_object(&digest) {
            if self.verify_object(&digest)?.is_ok() {
                remove_path(staging)?;
                return Ok((digest, manifest));
            }
            // Move the corrupted object out of the way first, then delete it.
            let trash = self.staging_dir("corrupted")?;
            let moved = trash.join("object");
            std::fs::rename(&target, &moved).map_err(CacheError::io("move away", &target))?;
            remove_path(&trash)?;
        }
        let manifest_json =
            serde_json::to_vec_pretty(&manifest).map_err(|error| CacheError::Invalid {
                path: staging.to_path_buf(),
                message: error.to_string(),
            })?;
        write_atomic(&staging.join("manifest.json"), &manifest_json, staging)?;
        make_read_only(&data)?;
        let parent = target.parent().unwrap_or(&self.root).to_path_buf();
        std::fs::create_dir_all(&parent).map_err(CacheError::io("create", &parent))?;
        if let Err(error) = std::fs::rename(staging, &target) {
            // A run of another pipeline stored the same content meanwhile: keep its object.
            if self.has_object(&digest) && self.verify_object(&digest)?.is_ok() {
                remove_path(staging)?;
                return Ok((digest, manifest));
            }
            return Err(CacheError::io("move into place", &target)(error));
        }
        Ok((digest, manifest))
    }

    /// Check an object against its manifest: the manifest is readable and names the object, and
    /// the data holds exactly its files with their sizes (`verify`: and their blake3). Without
    /// `verify` this reads metadata only (what `status` can afford on gigabytes); with it, it is
    /// [`Cache::verify_object`]. `Ok(Err(_))` describes what is wrong.
    pub fn check_object(
        &self,
        digest: &str,
        verify: bool,
    ) -> Result<Result<Manifest, Corruption>, CacheError> {
        if verify {
            return self.verify_object(digest);
        }
        let manifest = match self.read_manifest(digest) {
            Ok(manifest) => manifest,
            Err(corruption) => return Ok(Err(corruption)),
        };
        let data = self.object_data(digest);
        Ok(match manifest.compare_directory(&data, None)? {
            None => Ok(manifest),
            Some(detail) => Err(Corruption {
                detail: format!("{detail} in object {}", short(digest)),
            }),
        })
    }

    /// An object's manifest, checked to name the object.
    fn read_manifest(&self, digest: &str) -> Result<Manifest, Corruption> {
        let manifest_path = self.object_dir(digest).join("manifest.json");
        let text = std::fs::read_to_string(&manifest_path).map_err(|error| Corruption {
            detail: if error.kind() == std::io::ErrorKind::NotFound {
                format!("object {} has no manifest.json", short(digest))
            } else {
                format!("manifest unreadable: {error}")
            },
        })?;
        let manifest: Manifest = serde_json::from_str(&text).map_err(|error| Corruption {
            detail: format!(
                "manifest.json of object {} is not valid JSON: {error}",
                short(digest)
            ),
        })?;
        if manifest.digest() != digest {
            return Err(Corruption {
                detail: format!(
                    "manifest.json of object {} does not match the object's digest",
                    short(digest)
                ),
            });
        }
        Ok(manifest)
    }

    /// Rehash an object and compare with its manifest and name. `Ok(Err(_))` describes the
    /// corruption; `Err` is an I/O failure other than a missing or unreadable object file.
    pub fn verify_object(&self, digest: &str) -> Result<Result<Manifest, Corruption>, CacheError> {
        let dir = self.object_dir(digest);
        let manifest_path = dir.join("manifest.json");
        let text = match std::fs::read_to_string(&manifest_path) {
            Ok(text) => text,
            Err(error) => {
                return Ok(Err(Corruption {
                    detail: format!("manifest unreadable: {error}"),
                }))
            }
        };
        let manifest: Manifest = match serde_json::from_str(&text) {
            Ok(manifest) => manifest,
            Err(error) => {
                return Ok(Err(Corruption {
                    detail: format!("manifest is not valid JSON: {error}"),
                }))
            }
        };
        if manifest.digest() != digest {
            return Ok(Err(Corruption {
                detail: "manifest does not match the object's digest".into(),
            }));
        }
        let actual = match Manifest::of_directory(&dir.join("data")) {
            Ok(actual) => actual,
            Err(error) => {
                return Ok(Err(Corruption {
                    detail: error.to_string(),
                }))
            }
        };
        if actual.files == manifest.files {
            return Ok(Ok(manifest));
        }
        let expected: BTreeMap<&str, &ManifestEntry> = manifest
            .files
            .iter()
            .map(|file| (file.path.as_str(), file))
            .collect();
        let found: BTreeMap<&str, &ManifestEntry> = actual
            .files
            .iter()
            .map(|file| (file.path.as_str(), file))
            .collect();
        let detail = expected
            .iter()
            .find_map(|(path, entry)| match found.get(path) {
                None => Some(format!("{path} is missing")),
                Some(other) if other.size != entry.size => Some(format!(
                    "{path} has {} bytes, expected {}",
                    other.size, entry.size
                )),
                Some(other) if other.blake3 != entry.blake3 => {
                    Some(format!("{path} content differs"))
                }
                _ => None,
            })
            .or_else(|| {
                found
                    .keys()
                    .find(|path| !expected.contains_key(*path))
                    .map(|path| format!("{path} is unexpected"))
            })
            .unwrap_or_else(|| "files differ from the manifest".into());
        Ok(Err(Corruption { detail }))
    }

    /// Remove an object (gc, or a corrupted one). Renamed away first so no half-deleted object is
    /// ever visible under its name.
    pub fn remove_object(&self, digest: &str) -> Result<(), CacheError> {
        let target = self.object_dir(digest);
        if !target.exists() {
            return Ok(());
        }
        let trash = self.staging_dir("removed")?;
        let moved = trash.join("object");
        std::fs::rename(&target, &moved).map_err(CacheError::io("move away", &target))?;
        remove_path(&trash)
    }

    /// `runs/<aa>/<fingerprint>.json`.
    pub fn run_record_path(&self, fingerprint: &str) -> PathBuf {
        self.root
            .join("runs")
            .join(shard(fingerprint))
            .join(format!("{fingerprint}.json"))
    }

    /// The run record for a fingerprint digest, if any (unreadable records count as absent).
    pub fn run_record(&self, fingerprint: &str) -> Option<RunRecord> {
        let text = std::fs::read_to_string(self.run_record_path(fingerprint)).ok()?;
        serde_json::from_str(&text).ok()
    }

    /// Every readable run record (fingerprint digest → record), sorted by fingerprint; records
    /// that are not valid JSON are left out, as [`Cache::run_record`] treats them as absent.
    pub fn all_run_records(&self) -> Result<BTreeMap<String, RunRecord>, CacheError> {
        let mut records = BTreeMap::new();
        let runs = self.root.join("runs");
        let shards = match std::fs::read_dir(&runs) {
            Ok(shards) => shards,
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => return Ok(records),
            Err(error) => return Err(CacheError::io("list", &runs)(error)),
        };
        for shard in shards {
            let shard = shard.map_err(CacheError::io("list", &runs))?.path();
            if !shard.is_dir() {
                continue;
            }
            let entries = std::fs::read_dir(&shard).map_err(CacheError::io("list", &shard))?;
            for entry in entries {
                let path = entry.map_err(CacheError::io("list", &shard))?.path();
                let Some(fingerprint) = path
                    .file_name()
                    .and_then(|name| name.to_str())
                    .and_then(|name| name.strip_suffix(".json"))
                else {
                    continue;
                };
                if let Some(record) = self.run_record(fingerprint) {
                    records.insert(fingerprint.to_string(), record);
                }
            }
        }
        Ok(records)
    }

    /// Record (atomically) that `fingerprint` produced `record.output`.
    pub fn put_run_record(&self, fingerprint: &str, record: &RunRecord) -> Result<(), CacheError> {
        let path = self.run_record_path(fingerprint);
        let parent = path.parent().unwrap_or(&self.root).to_path_buf();
        std::fs::create_dir_all(&parent).map_err(CacheError::io("create", &parent))?;
        let bytes = serde_json::to_vec_pretty(record).map_err(|error| CacheError::Invalid {
            path: path.clone(),
            message: error.to_string(),
        })?;
        write_atomic(&path, &bytes, &self.tmp_dir())
    }
}

/// Make every file under `dir` read-only, so an accidental write through a hard link fails.
fn make_read_only(dir: &Path) -> Result<(), CacheError> {
    let entries = std::fs::read_dir(dir).map_err(CacheError::io("list", dir))?;
    for entry in entries {
        let entry = entry.map_err(CacheError::io("list", dir))?;
        let path = entry.path();
        let metadata = entry.metadata().map_err(CacheError::io("inspect", &path))?;
        if metadata.is_dir() {
            make_read_only(&path)?;
        } else {
            let mut permissions = metadata.permissions();
            permissions.set_readonly(true);
            std::fs::set_permissions(&path, permissions)
                .map_err(CacheError::io("make read-only", &path))?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn staged(cache: &Cache, files: &[(&str, &str)]) -> PathBuf {
        let staging = cache.staging_dir("test").unwrap();
        for (path, content) in files {
            let full = staging.join("data").join(path);
            std::fs::create_dir_all(full.parent().unwrap()).unwrap();
            std::fs::write(full, content).unwrap();
        }
        staging
    }

    #[test]
    fn a_published_file_has_a_single_entry_manifest() {
        let root = tempfile::tempdir().unwrap();
        let file = root.path().join("model.gguf");
        std::fs::write(&file, "weights").unwrap();
        let manifest = Manifest::of_published(&file).unwrap();
        assert_eq!(manifest.files.len(), 1);
        assert_eq!(manifest.files[0].path, "");
        let mut digest = |path: &Path| hash_file(path);
        assert_eq!(
            manifest
                .compare_published(&file, Some(&mut digest))
                .unwrap(),
            None
        );
        std::fs::write(&file, "WEIGHTS").unwrap();
        assert_eq!(
            manifest
                .compare_published(&file, Some(&mut digest))
                .unwrap()
                .as_deref(),
            Some("content differs")
        );
        std::fs::write(&file, "more weights").unwrap();
        assert_eq!(
            manifest.compare_published(&file, None).unwrap().as_deref(),
            Some("has 12 bytes, expected 7")
        );
        std::fs::remove_file(&file).unwrap();
        assert_eq!(
            manifest.compare_published(&file, None).unwrap().as_deref(),
            Some("is missing")
        );
        std::fs::create_dir(&file).unwrap();
        assert_eq!(
            manifest.compare_published(&file, None).unwrap().as_deref(),
            Some("is not a file")
        );
        // A folder keeps the directory manifest.
        std::fs::write(file.join("a.txt"), "a").unwrap();
        let folder = Manifest::of_published(&file).unwrap();
        assert_eq!(folder.files[0].path, "a.txt");
        assert_eq!(folder.compare_published(&file, None).unwrap(), None);
    }

    fn make_writable(path: &Path) {
        let mut permissions = std::fs::metadata(path).unwrap().permissions();
        #[expect(
            clippy::permissions_set_readonly_false,
            reason = "test corrupts a file"
        )]
        permissions.set_readonly(false);
        std::fs::set_permissions(path, permissions).unwrap();
    }

    #[test]
    fn store_is_content_addressed_and_deduplicated() {
        let dir = tempfile::tempdir().unwrap();
        let cache = Cache::open(dir.path()).unwrap();
        let first = staged(&cache, &[("a.txt", "one"), ("sub/b.txt", "two")]);
        let (digest, manifest) = cache.store(&first).unwrap();
        assert_eq!(manifest.files.len(), 2);
        assert_eq!(manifest.files[1].path, "sub/b.txt");
        assert!(cache.has_object(&digest));
        assert!(!first.exists(), "staging is consumed");
        let second = staged(&cache, &[("sub/b.txt", "two"), ("a.txt", "one")]);
        let (again, _) = cache.store(&second).unwrap();
        assert_eq!(digest, again);
        assert!(!second.exists());
        let third = staged(&cache, &[("a.txt", "ONE"), ("sub/b.txt", "two")]);
        let (other, _) = cache.store(&third).unwrap();
        assert_ne!(digest, other);
        assert!(cache.verify_object(&digest).unwrap().is_ok());
    }

    #[test]
    fn verify_detects_changed_missing_and_extra_files() {
        let dir = tempfile::tempdir().unwrap();
        let cache = Cache::open(dir.path()).unwrap();
        let (digest, _) = cache
            .store(&staged(&cache, &[("a.txt", "one"), ("b.txt", "two")]))
            .unwrap();
        let file = cache.object_data(&digest).join("a.txt");
        make_writable(&file);
        std::fs::write(&file, "0ne").unwrap();
        let detail = cache.verify_object(&digest).unwrap().unwrap_err().detail;
        assert_eq!(detail, "a.txt content differs");
        std::fs::remove_file(&file).unwrap();
        let detail = cache.verify_object(&digest).unwrap().unwrap_err().detail;
        assert_eq!(detail, "a.txt is missing");
        std::fs::write(&file, "one").unwrap();
        std::fs::write(cache.object_data(&digest).join("c.txt"), "x").unwrap();
        let detail = cache.verify_object(&digest).unwrap().unwrap_err().detail;
        assert_eq!(detail, "c.txt is unexpected");
    }

    #[test]
    fn storing_again_replaces_a_corrupted_object() {
        let dir = tempfile::tempdir().unwrap();
        let cache = Cache::open(dir.path()).unwrap();
        let (digest, _) = cache.store(&staged(&cache, &[("a.txt", "one")])).unwrap();
        let file = cache.object_data(&digest).join("a.txt");
        make_writable(&file);
        std::fs::write(&file, "bad").unwrap();
        let (again, _) = cache.store(&staged(&cache, &[("a.txt", "one")])).unwrap();
        assert_eq!(digest, again);
        assert!(cache.verify_object(&digest).unwrap().is_ok());
    }

    #[test]
    fn stored_files_are_read_only() {
        let dir = tempfile::tempdir().unwrap();
        let cache = Cache::open(dir.path()).unwrap();
        let (digest, _) = cache.store(&staged(&cache, &[("a.txt", "one")])).unwrap();
        let metadata = std::fs::metadata(cache.object_data(&digest).join("a.txt")).unwrap();
        assert!(metadata.permissions().readonly());
    }

    #[test]
    fn run_records_round_trip() {
        let dir = tempfile::tempdir().unwrap();
        let cache = Cache::open(dir.path()).unwrap();
        assert!(cache.run_record("abcd").is_none());
        let record = RunRecord {
            output: "ff".into(),
            outcome: BTreeMap::from([("rows".to_string(), serde_json::json!(3))]),
            wall_time_seconds: 1.5,
        };
        cache.put_run_record("abcd", &record).unwrap();
        assert_eq!(cache.run_record("abcd"), Some(record));
    }
}
