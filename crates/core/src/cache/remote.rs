//! The remote cache: `push` copies a local cache's objects, run records and lock files to an
//! object store, `pull` brings them back, so a teammate or a CI job restores what was already
//! computed instead of rerunning it. It moves bytes and checks digests; it knows nothing of
//! stages or of freshness (a pulled cache is judged by `exec::plan` like any other).
//!
//! A remote is a URL read by [`Remote::open`]: `s3://bucket/prefix` (and S3-compatible servers
//! through `AWS_ENDPOINT`), `gs://bucket/prefix`, `az://container/prefix` (also `azure://`,
//! `abfs[s]://container@account.dfs.core.windows.net/prefix` and
//! `https://account.blob.core.windows.net/container/prefix`), `http(s)://host/path` (a WebDAV
//! server or any HTTP store that takes PUT), `file:///abs/path` or a plain directory path.
//! Credentials and endpoints come from the environment the way the `object_store` crate reads it
//! (`AWS_*`; `GOOGLE_*`, e.g. `GOOGLE_SERVICE_ACCOUNT`, whose key file may name an emulator's
//! `gcs_base_url` with `disable_oauth`; `AZURE_*`, e.g. `AZURE_STORAGE_ACCOUNT_NAME` and
//! `AZURE_STORAGE_ACCOUNT_KEY`, or `AZURE_STORAGE_USE_EMULATOR` for Azurite at
//! `AZURITE_BLOB_STORAGE_URL`); they are never part of a message.
//!
//! Layout under the remote's prefix (the local layout, one key per file):
//!
//! ```text
//! objects/<aa>/<digest>/data/<path>       each file of the artifact
//! objects/<aa>/<digest>/manifest.json     written last: its presence means the object is whole
//! runs/<aa>/<fingerprint>.json            fingerprint → output digest
//! locks/<pipeline>.lock.json              the pushing cache's lock file of the pipeline
//! ```
//!
//! Safety of concurrent pushes: every object key's content is a function of its name (the
//! digest names the manifest, the manifest names each file's blake3), so two writers of one key
//! write the same bytes, and each put replaces a key whole (S3, GCS and Azure puts are atomic;
//! the local-directory store writes a temporary file and renames it). An object's manifest is put
//! after its files, so a reader that finds the manifest finds every file. A run record is
//! written only when the remote has none for its fingerprint, and a pipeline's lock file is put
//! last, after everything it names.
//!
//! Integrity on pull: a manifest must hash to its object's address, each file is hashed while it
//! is downloaded and must match its manifest entry, and the object is assembled in a staging
//! directory and moved into the local cache by [`Cache::store`] only when every file matched. A
//! corrupted remote object is an error naming its key and never reaches the local cache; an
//! interrupted pull leaves only staging leftovers that the next run clears. Run records and the
//! lock file are written (atomically) only after the objects they name are in place. A pulled
//! lock entry must carry the digest of its own fingerprint components, and takes its output and
//! figures from the run record of that fingerprint (this cache's, else the remote's): one answer
//! per fingerprint, so an edited lock file cannot restore another stage's object as fresh. A push
//! from a cache that lost a stage's output keeps the remote's entry for that stage.

use std::collections::{BTreeMap, BTreeSet};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;
#[cfg(feature = "cloud")]
use std::time::Duration;

use futures_util::stream::{StreamExt, TryStreamExt};
use object_store::path::Path as Key;
use object_store::{ObjectStore, ObjectStoreExt, PutPayload};
use serde::Serialize;

use super::lock_file::LOCK_FORMAT;
use super::{remove_path, sanitize_name, Cache, CacheError, LockFile, Manifest, RunRecord};

/// Transfers in flight at once (files of one object).
const CONCURRENCY: usize = 8;

/// Files up to this size are sent in one put; larger ones in parts (where the store has them).
const SINGLE_PUT_BYTES: u64 = 64 << 20;

/// Part size of a multipart upload.
const PART_BYTES: usize = 16 << 20;

/// Something went wrong talking to a remote, or a remote's content failed its check. Every
/// message names the remote (without credentials) and the key or object concerned.
#[derive(Debug, thiserror::Error)]
pub enum RemoteError {
    #[error("remote `{remote}`: {message}")]
    Setup { remote: String, message: String },
    #[error("remote `{remote}`: cannot {action} `{key}`: {message}")]
    Transfer {
        remote: String,
        action: &'static str,
        key: String,
        message: String,
    },
    #[error(
        "remote `{remote}`: `{key}` is corrupted: {detail}; it was not placed in the local cache \
         (repair it with `peftpipe push --verify` from a cache that holds it intact)"
    )]
    Corrupted {
        remote: String,
        key: String,
        detail: String,
    },
    #[error(
        "remote `{remote}` has no `{key}`: the pipeline `{pipeline}` was never pushed there \
         (run `peftpipe push` where it has run)"
    )]
    NoLockFile {
        remote: String,
        key: String,
        pipeline: String,
    },
    #[error(
        "remote `{remote}` is incomplete: `{key}` names object {digest} (stage `{stage}`), which \
         the remote does not have"
    )]
    MissingObject {
        remote: String,
        key: String,
        stage: String,
        digest: String,
    },
    #[error(
        "the local cache has no lock file for the pipeline `{pipeline}` (`{path}`): run it \
         before pushing"
    )]
    NothingToPush { pipeline: String, path: PathBuf },
    #[error("local object {digest} is corrupted ({detail}): not pushed")]
    LocalCorrupted { digest: String, detail: String },
    #[error(transparent)]
    Cache(#[from] CacheError),
}

/// What to transfer: one pipeline's lock file and what it names, or everything.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Scope {
    /// The pipeline's lock file, its stages' output objects and run records.
    Pipeline(String),
    /// Every lock file, run record and the objects they name.
    All,
}

/// What a push or pull did.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct SyncReport {
    /// The remote, as shown (no credentials).
    pub remote: String,
    /// Objects copied, and their files and bytes.
    pub objects_copied: usize,
    pub files_copied: usize,
    pub bytes_copied: u64,
    /// Objects the destination already had (nothing sent).
    pub objects_present: usize,
    /// Run records written to the destination.
    pub run_records_copied: usize,
    /// Lock files written (push) or updated (pull).
    pub lock_files_written: usize,
    /// Stages left out, with why (push: output not in the local cache).
    pub skipped: Vec<String>,
    /// `push --verify`: objects the remote had damaged (a file missing or differing from its
    /// manifest) and run records it could not read, sent again whole.
    pub repaired: Vec<String>,
}

/// An opened remote: the store, the key prefix under it, and a runtime to drive it.
pub struct Remote {
    store: Arc<dyn ObjectStore>,
    prefix: Key,
    shown: String,
    secret: Option<String>,
    /// Transfers in flight at once: [`CONCURRENCY`], or 1 over HTTP/WebDAV, where two puts
    /// under one missing folder both create it and the second MKCOL fails (405).
    concurrency: usize,
    runtime: tokio::runtime::Runtime,
}

impl std::fmt::Debug for Remote {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter
            .debug_struct("Remote")
            .field("remote", &self.shown)
            .finish()
    }
}

/// A URL's text without its password (user names are kept, so the message still says who).
pub fn display_url(text: &str) -> String {
    match url::Url::parse(text) {
        Ok(mut url) if url.password().is_some() => {
            let _ = url.set_password(Some("***"));
            url.to_string()
        }
        _ => text.to_string(),
    }
}

/// Retries of transient failures: a few, within half a minute, so an unreachable remote fails
/// in seconds rather than minutes.
#[cfg(feature = "cloud")]
fn retry_config() -> object_store::RetryConfig {
    object_store::RetryConfig {
        backoff: object_store::BackoffConfig::default(),
        max_retries: 3,
        retry_timeout: Duration::from_secs(30),
    }
}

impl Remote {
    /// Open the remote `location`: a URL (`s3://`, `gs://`, `az://`, `http(s)://`, `file://`)
    /// or a directory path, relative to `base_dir` when relative. A local directory is created
    /// if missing. Nothing is read or written on a cloud remote until the first transfer.
    pub fn open(location: &str, base_dir: &Path) -> Result<Remote, RemoteError> {
        let shown = display_url(location);
        let setup = |message: String| RemoteError::Setup {
            remote: shown.clone(),
            message,
        };
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|error| setup(format!("cannot start the I/O runtime: {error}")))?;
        let is_url = location.contains("://");
        // Transfers in flight: one at a time over HTTP/WebDAV (see `concurrency`).
        let mut concurrency = CONCURRENCY;
        let (store, prefix, secret): (Arc<dyn ObjectStore>, Key, Option<String>) = if !is_url {
            let dir = base_dir.join(location);
            (local_store(&dir).map_err(setup)?, Key::default(), None)
        } else {
            let url = url::Url::parse(location)
                .map_err(|error| setup(format!("not a valid URL: {error}")))?;
            let secret = url.password().map(str::to_string);
            let (scheme, prefix) = object_store::ObjectStoreScheme::parse(&url).map_err(|_| {
                setup(format!(
                    "unsupported URL scheme `{}` (expected s3://, gs://, az://, http(s)://, \
                     file:// or a directory path)",
                    url.scheme()
                ))
            })?;
            let store = cloud_store(&scheme, &url)
                .map_err(|message| setup(scrub(&message, secret.as_deref())))?;
            // A `file://` store is rooted at the URL's directory already: its path is not also
            // a prefix inside it (that put the cache at DIR/DIR, where the plain path is not).
            let prefix = if scheme == object_store::ObjectStoreScheme::Local {
                Key::default()
            } else {
                prefix
            };
            // By the store, not the URL's scheme: `https://account.blob.core.windows.net/…` is
            // Azure, which takes concurrent puts.
            if scheme == object_store::ObjectStoreScheme::Http {
                concurrency = 1;
            }
            (store, prefix, secret)
        };
        Ok(Remote {
            store,
            prefix,
            shown,
            secret,
            concurrency,
            runtime,
        })
    }

    /// The remote as shown in messages (no credentials).
    pub fn shown(&self) -> &str {
        &self.shown
    }

    /// Copy to the remote what `scope` selects from `cache` and the remote lacks.
    pub fn push(&self, cache: &Cache, scope: &Scope) -> Result<SyncReport, RemoteError> {
        self.runtime.block_on(self.push_async(cache, scope, false))
    }

    /// [`Remote::push`], also downloading every object and run record the remote already has
    /// and sending again those that are damaged (the repair a corrupted remote needs: a plain
    /// push trusts what is there).
    pub fn push_verified(&self, cache: &Cache, scope: &Scope) -> Result<SyncReport, RemoteError> {
        self.runtime.block_on(self.push_async(cache, scope, true))
    }

    /// Copy into `cache` what `scope` selects on the remote and `cache` lacks, checking every
    /// object against its address.
    pub fn pull(&self, cache: &Cache, scope: &Scope) -> Result<SyncReport, RemoteError> {
        self.runtime.block_on(self.pull_async(cache, scope))
    }

    fn key(&self, relative: &str) -> Key {
        relative
            .split('/')
            .filter(|part| !part.is_empty())
            .fold(self.prefix.clone(), |key, part| key.join(part))
    }

    fn manifest_key(&self, digest: &str) -> Key {
        self.key(&format!("{}/manifest.json", object_prefix(digest)))
    }

    fn data_key(&self, digest: &str, path: &str) -> Key {
        self.key(&format!("{}/data/{path}", object_prefix(digest)))
    }

    fn run_record_key(&self, fingerprint: &str) -> Key {
        self.key(&format!("runs/{}/{fingerprint}.json", shard(fingerprint)))
    }

    fn lock_key(&self, pipeline: &str) -> Key {
        self.key(&format!("locks/{}.lock.json", sanitize_name(pipeline)))
    }

    /// The key without the remote's prefix, for messages.
    fn show_key(&self, key: &Key) -> String {
        let prefix = self.prefix.as_ref();
        let text = key.as_ref();
        if prefix.is_empty() {
            text.to_string()
        } else {
            text.strip_prefix(prefix)
                .map(|rest| rest.trim_start_matches('/').to_string())
                .unwrap_or_else(|| text.to_string())
        }
    }

    fn transfer(
        &self,
        action: &'static str,
        key: &Key,
    ) -> impl FnOnce(object_store::Error) -> RemoteError + '_ {
        let key = self.show_key(key);
        move |error| RemoteError::Transfer {
            remote: self.shown.clone(),
            action,
            key,
            message: scrub(&error.to_string(), self.secret.as_deref()),
        }
    }

    async fn exists(&self, key: &Key) -> Result<bool, RemoteError> {
        match self.store.head(key).await {
            Ok(_) => Ok(true),
            Err(object_store::Error::NotFound { .. }) => Ok(false),
            Err(error) => Err(self.transfer("look up", key)(error)),
        }
    }

    /// The bytes at `key`, or None when it does not exist.
    async fn get_bytes(&self, key: &Key) -> Result<Option<Vec<u8>>, RemoteError> {
        let result = match self.store.get(key).await {
            Ok(result) => result,
            Err(object_store::Error::NotFound { .. }) => return Ok(None),
            Err(error) => return Err(self.transfer("download", key)(error)),
        };
        let bytes = result
            .bytes()
            .await
            .map_err(self.transfer("download", key))?;
        Ok(Some(bytes.to_vec()))
    }

    async fn put_bytes(&self, key: &Key, bytes: Vec<u8>) -> Result<(), RemoteError> {
        self.store
            .put(key, PutPayload::from(bytes))
            .await
            .map_err(self.transfer("upload", key))?;
        Ok(())
    }

    /// Upload a local file: one put when small, parts when large (one put where the store has
    /// no multipart upload).
    async fn put_file(&self, key: &Key, path: &Path, size: u64) -> Result<(), RemoteError> {
        let read = |path: &Path| std::fs::read(path).map_err(CacheError::io("read", path));
        if size <= SINGLE_PUT_BYTES {
            return self.put_bytes(key, read(path)?).await;
        }
        let upload = match self.store.put_multipart(key).await {
            Ok(upload) => upload,
            Err(object_store::Error::NotImplemented { .. }) => {
                return self.put_bytes(key, read(path)?).await;
            }
            Err(error) => return Err(self.transfer("upload", key)(error)),
        };
        let mut writer = object_store::WriteMultipart::new_with_chunk_size(upload, PART_BYTES);
        let mut file = std::fs::File::open(path).map_err(CacheError::io("open", path))?;
        let mut buffer = vec![0u8; PART_BYTES];
        loop {
            let read = std::io::Read::read(&mut file, &mut buffer)
                .map_err(CacheError::io("read", path))?;
            if read == 0 {
                break;
            }
            writer
                .wait_for_capacity(CONCURRENCY)
                .await
                .map_err(self.transfer("upload", key))?;
            writer.write(&buffer[..read]);
        }
        writer
            .finish()
            .await
            .map_err(self.transfer("upload", key))?;
        Ok(())
    }

    async fn push_async(
        &self,
        cache: &Cache,
        scope: &Scope,
        verify: bool,
    ) -> Result<SyncReport, RemoteError> {
        let mut report = SyncReport {
            remote: self.shown.clone(),
            ..SyncReport::default()
        };
        let (mut locks, mut records) = local_selection(cache, scope)?;
        // Only what is whole here is pushed: a lock entry or run record whose object is gone
        // (gc, a deleted cache folder) is left out, so the remote never names an object it
        // does not have.
        let mut objects: BTreeSet<String> = BTreeSet::new();
        let mut skipped_stages: BTreeSet<(String, String)> = BTreeSet::new();
        for lock in locks.values_mut() {
            lock.stages.retain(|stage, entry| {
                let present = cache.has_object(&entry.output);
                if present {
                    objects.insert(entry.output.clone());
                } else {
                    skipped_stages.insert((lock.pipeline.clone(), stage.clone()));
                    report.skipped.push(format!(
                        "{}: stage `{stage}`: output {} is not in the local cache",
                        lock.pipeline,
                        short(&entry.output)
                    ));
                }
                present
            });
        }
        locks.retain(|_, lock| !lock.stages.is_empty());
        records.retain(|_, record| cache.has_object(&record.output));
        objects.extend(records.values().map(|record| record.output.clone()));

        for digest in &objects {
            if self.exists(&self.manifest_key(digest)).await? {
                if !verify || self.remote_object_intact(cache, digest).await? {
                    report.objects_present += 1;
                    continue;
                }
                report.repaired.push(format!("object {}", short(digest)));
            }
            let manifest = match cache.verify_object(digest)? {
                Ok(manifest) => manifest,
                Err(corruption) => {
                    return Err(RemoteError::LocalCorrupted {
                        digest: digest.clone(),
                        detail: corruption.detail,
                    })
                }
            };
            let data = cache.object_data(digest);
            futures_util::stream::iter(manifest.files.iter().map(Ok::<_, RemoteError>))
                .try_for_each_concurrent(self.concurrency, |entry| {
                    let key = self.data_key(digest, &entry.path);
                    let path = local_path(&data, &entry.path);
                    async move { self.put_file(&key, &path, entry.size).await }
                })
                .await?;
            let manifest_json =
                serde_json::to_vec_pretty(&manifest).map_err(|error| CacheError::Invalid {
                    path: cache.object_dir(digest),
                    message: error.to_string(),
                })?;
            self.put_bytes(&self.manifest_key(digest), manifest_json)
                .await?;
            report.objects_copied += 1;
            report.files_copied += manifest.files.len();
            report.bytes_copied += manifest.total_size();
        }

        for (fingerprint, record) in &records {
            let key = self.run_record_key(fingerprint);
            // First writer wins: a record is never replaced (two runs of one fingerprint may
            // differ in their figures, and either is a valid answer), unless it cannot be read.
            if verify {
                if let Some(bytes) = self.get_bytes(&key).await? {
                    if self.parse_run_record(&key, &bytes).is_ok() {
                        continue;
                    }
                    report
                        .repaired
                        .push(format!("run record {}", short(fingerprint)));
                }
            } else if self.exists(&key).await? {
                continue;
            }
            self.put_bytes(&key, to_json(record, &cache.run_record_path(fingerprint))?)
                .await?;
            report.run_records_copied += 1;
        }

        for lock in locks.values_mut() {
            // A stage left out above keeps the entry the remote has for it (its object is
            // there): a push from a cache that lost an output never takes it off the remote.
            let key = self.lock_key(&lock.pipeline);
            if let Some(bytes) = self.get_bytes(&key).await? {
                if let Ok(remote_lock) = serde_json::from_slice::<LockFile>(&bytes) {
                    if remote_lock.format == LOCK_FORMAT {
                        for (stage, entry) in remote_lock.stages {
                            if skipped_stages.contains(&(lock.pipeline.clone(), stage.clone())) {
                                lock.stages.entry(stage).or_insert(entry);
                            }
                        }
                    }
                }
            }
            let path = cache.lock_file_path(&lock.pipeline);
            self.put_bytes(&key, to_json(lock, &path)?).await?;
            report.lock_files_written += 1;
        }
        Ok(report)
    }

    async fn pull_async(&self, cache: &Cache, scope: &Scope) -> Result<SyncReport, RemoteError> {
        let mut report = SyncReport {
            remote: self.shown.clone(),
            ..SyncReport::default()
        };
        let mut locks = self.remote_lock_files(scope).await?;
        // Run records: those of the lock files' entries (from the remote when it has them, else
        // made from the entry), and with `All` every record on the remote.
        let mut records: BTreeMap<String, RunRecord> = BTreeMap::new();
        if *scope == Scope::All {
            records.extend(self.remote_run_records().await?);
        }
        let mut named: BTreeMap<String, (String, String)> = BTreeMap::new();
        for (key, lock) in &mut locks {
            for (stage, entry) in &mut lock.stages {
                if !records.contains_key(&entry.fingerprint) {
                    let record_key = self.run_record_key(&entry.fingerprint);
                    let record = match self.get_bytes(&record_key).await? {
                        Some(bytes) => self.parse_run_record(&record_key, &bytes)?,
                        None => RunRecord {
                            output: entry.output.clone(),
                            outcome: entry.outcome.clone(),
                            wall_time_seconds: entry.wall_time_seconds,
                        },
                    };
                    records.insert(entry.fingerprint.clone(), record);
                }
                // One answer per fingerprint: this cache's own run record when it has one (it
                // is never replaced), else the remote's (the first push's); a lock entry only
                // says which fingerprint a stage last ran with. So an edited or damaged lock
                // entry, or one pushed by a second run of the same inputs, cannot disagree
                // with the record `status` and `run` will find.
                let record = cache
                    .run_record(&entry.fingerprint)
                    .or_else(|| records.get(&entry.fingerprint).cloned());
                if let Some(record) = record {
                    entry.output = record.output;
                    entry.outcome = record.outcome;
                    entry.wall_time_seconds = record.wall_time_seconds;
                }
                named
                    .entry(entry.output.clone())
                    .or_insert_with(|| (key.clone(), stage.clone()));
            }
        }
        let mut objects: BTreeSet<String> = named.keys().cloned().collect();
        objects.extend(records.values().map(|record| record.output.clone()));

        for digest in &objects {
            if cache.has_object(digest) && cache.check_object(digest, false)?.is_ok() {
                report.objects_present += 1;
                continue;
            }
            let manifest_key = self.manifest_key(digest);
            let Some(bytes) = self.get_bytes(&manifest_key).await? else {
                if let Some((key, stage)) = named.get(digest) {
                    return Err(RemoteError::MissingObject {
                        remote: self.shown.clone(),
                        key: key.clone(),
                        stage: stage.clone(),
                        digest: digest.clone(),
                    });
                }
                // A run record of `All` whose object is gone: skip the record.
                records.retain(|_, record| record.output != *digest);
                continue;
            };
            let manifest = self.parse_json::<Manifest>(&manifest_key, &bytes)?;
            let problem = if manifest.digest() != *digest {
                Some("the manifest does not hash to the object's address".to_string())
            } else {
                manifest
                    .files
                    .iter()
                    .find(|entry| !is_relative_path(&entry.path))
                    .map(|entry| format!("the manifest names the unsafe path `{}`", entry.path))
            };
            if let Some(detail) = problem {
                return Err(RemoteError::Corrupted {
                    remote: self.shown.clone(),
                    key: self.show_key(&manifest_key),
                    detail,
                });
            }
            let staging = cache.staging_dir("pull")?;
            let fetched = self.fetch_object(digest, &manifest, &staging).await;
            let stored = match fetched {
                Ok(()) => cache.store(&staging).map_err(RemoteError::from),
                Err(error) => Err(error),
            };
            match stored {
                Ok((stored, _)) if stored == *digest => {}
                Ok((stored, _)) => {
                    // Cannot happen when every file matched its entry; never trust it anyway.
                    cache.remove_object(&stored)?;
                    return Err(RemoteError::Corrupted {
                        remote: self.shown.clone(),
                        key: self.show_key(&manifest_key),
                        detail: format!("its files hash to object {}", short(&stored)),
                    });
                }
                Err(error) => {
                    remove_path(&staging)?;
                    return Err(error);
                }
            }
            report.objects_copied += 1;
            report.files_copied += manifest.files.len();
            report.bytes_copied += manifest.total_size();
        }

        for (fingerprint, record) in &records {
            if cache.run_record(fingerprint).is_some() || !cache.has_object(&record.output) {
                continue;
            }
            cache.put_run_record(fingerprint, record)?;
            report.run_records_copied += 1;
        }

        for lock in locks.values() {
            // This cache's own record of a stage is never replaced: the stages it lacks are
            // added. (Run records make the remote's outputs findable by fingerprint either way.)
            let _pipeline_lock = cache.lock_pipeline(&lock.pipeline, || {})?;
            let mut local = cache.read_lock_file(&lock.pipeline)?;
            let before = local.stages.len();
            for (stage, entry) in &lock.stages {
                local
                    .stages
                    .entry(stage.clone())
                    .or_insert_with(|| entry.clone());
            }
            // The file the name belongs to (`exec::name_owner`), unless this cache records one.
            let adopted = local.file.is_none() && lock.file.is_some();
            if adopted {
                local.file = lock.file.clone();
            }
            if local.stages.len() != before || adopted {
                local.pipeline = lock.pipeline.clone();
                cache.write_lock_file(&local)?;
                report.lock_files_written += 1;
            }
        }
        Ok(report)
    }

    /// Whether the remote's copy of `digest` (whose manifest it has) is whole: its manifest is
    /// the local one and each file downloads with its size and blake3 (into a scratch folder
    /// of the local cache, removed after).
    async fn remote_object_intact(&self, cache: &Cache, digest: &str) -> Result<bool, RemoteError> {
        let manifest_key = self.manifest_key(digest);
        let Some(bytes) = self.get_bytes(&manifest_key).await? else {
            return Ok(false);
        };
        let manifest = match serde_json::from_slice::<Manifest>(&bytes) {
            Ok(manifest) if manifest.digest() == digest => manifest,
            _ => return Ok(false),
        };
        let scratch = cache.staging_dir("verify")?;
        let fetched = self.fetch_object(digest, &manifest, &scratch).await;
        remove_path(&scratch)?;
        match fetched {
            Ok(()) => Ok(true),
            Err(RemoteError::Corrupted { .. }) => Ok(false),
            Err(error) => Err(error),
        }
    }

    /// Download every file of an object into `staging/data`, hashing as it goes; any file that
    /// differs from its manifest entry is [`RemoteError::Corrupted`].
    async fn fetch_object(
        &self,
        digest: &str,
        manifest: &Manifest,
        staging: &Path,
    ) -> Result<(), RemoteError> {
        let data = staging.join("data");
        std::fs::create_dir_all(&data).map_err(CacheError::io("create", &data))?;
        futures_util::stream::iter(manifest.files.iter().map(Ok::<_, RemoteError>))
            .try_for_each_concurrent(self.concurrency, |entry| {
                let key = self.data_key(digest, &entry.path);
                let path = local_path(&data, &entry.path);
                async move {
                    let (size, blake3) = self.download(&key, &path).await?;
                    let problem = if size != entry.size {
                        Some(format!("{size} bytes, expected {}", entry.size))
                    } else if blake3 != entry.blake3 {
                        Some("its content does not match its blake3 in the manifest".into())
                    } else {
                        None
                    };
                    match problem {
                        Some(detail) => Err(RemoteError::Corrupted {
                            remote: self.shown.clone(),
                            key: self.show_key(&key),
                            detail,
                        }),
                        None => Ok(()),
                    }
                }
            })
            .await
    }

    /// Stream `key` into the new file `path`, returning its size and blake3. A missing key is
    /// corruption of the object (its manifest names it).
    async fn download(&self, key: &Key, path: &Path) -> Result<(u64, String), RemoteError> {
        let result = match self.store.get(key).await {
            Ok(result) => result,
            Err(object_store::Error::NotFound { .. }) => {
                return Err(RemoteError::Corrupted {
                    remote: self.shown.clone(),
                    key: self.show_key(key),
                    detail: "the file is missing".into(),
                })
            }
            Err(error) => return Err(self.transfer("download", key)(error)),
        };
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent).map_err(CacheError::io("create", parent))?;
        }
        let mut file = std::fs::File::create(path).map_err(CacheError::io("create", path))?;
        let mut hasher = blake3::Hasher::new();
        let mut size = 0u64;
        let mut stream = result.into_stream();
        while let Some(chunk) = stream.next().await {
            let chunk = chunk.map_err(self.transfer("download", key))?;
            hasher.update(&chunk);
            size += chunk.len() as u64;
            file.write_all(&chunk)
                .map_err(CacheError::io("write", path))?;
        }
        file.sync_all().map_err(CacheError::io("sync", path))?;
        Ok((size, hasher.finalize().to_hex().to_string()))
    }

    /// The remote lock files `scope` selects (shown key → lock file).
    async fn remote_lock_files(
        &self,
        scope: &Scope,
    ) -> Result<BTreeMap<String, LockFile>, RemoteError> {
        let keys = match scope {
            Scope::Pipeline(pipeline) => {
                let key = self.lock_key(pipeline);
                if !self.exists(&key).await? {
                    return Err(RemoteError::NoLockFile {
                        remote: self.shown.clone(),
                        key: self.show_key(&key),
                        pipeline: pipeline.clone(),
                    });
                }
                vec![key]
            }
            Scope::All => self
                .list(&self.key("locks"))
                .await?
                .into_iter()
                .filter(|key| key.as_ref().ends_with(".lock.json"))
                .collect(),
        };
        let mut locks = BTreeMap::new();
        for key in keys {
            let Some(bytes) = self.get_bytes(&key).await? else {
                continue;
            };
            let lock = self.parse_json::<LockFile>(&key, &bytes)?;
            if lock.format != LOCK_FORMAT {
                return Err(RemoteError::Setup {
                    remote: self.shown.clone(),
                    message: format!(
                        "`{}` has lock file format {}, this peftpipe reads format {LOCK_FORMAT}",
                        self.show_key(&key),
                        lock.format
                    ),
                });
            }
            let names_ok = lock
                .stages
                .values()
                .all(|entry| is_digest(&entry.output) && is_digest(&entry.fingerprint));
            if !names_ok {
                return Err(RemoteError::Corrupted {
                    remote: self.shown.clone(),
                    key: self.show_key(&key),
                    detail: "a stage names an output or fingerprint that is not a digest".into(),
                });
            }
            // A fingerprint is the digest of the components beside it: an entry whose two
            // disagree was edited or damaged, and would be restored as fresh under either.
            if let Some(stage) = lock
                .stages
                .iter()
                .find(|(_, entry)| entry.components.digest() != entry.fingerprint)
                .map(|(stage, _)| stage)
            {
                return Err(RemoteError::Corrupted {
                    remote: self.shown.clone(),
                    key: self.show_key(&key),
                    detail: format!(
                        "stage `{stage}`'s fingerprint is not the digest of its recorded components"
                    ),
                });
            }
            locks.insert(self.show_key(&key), lock);
        }
        Ok(locks)
    }

    /// Every run record on the remote (fingerprint → record).
    async fn remote_run_records(&self) -> Result<BTreeMap<String, RunRecord>, RemoteError> {
        let mut records = BTreeMap::new();
        for key in self.list(&self.key("runs")).await? {
            let Some(fingerprint) = key
                .filename()
                .and_then(|name| name.strip_suffix(".json"))
                .map(str::to_string)
            else {
                continue;
            };
            if !is_digest(&fingerprint) {
                continue;
            }
            if let Some(bytes) = self.get_bytes(&key).await? {
                records.insert(fingerprint, self.parse_run_record(&key, &bytes)?);
            }
        }
        Ok(records)
    }

    async fn list(&self, prefix: &Key) -> Result<Vec<Key>, RemoteError> {
        let listed: Vec<object_store::ObjectMeta> =
            match self.store.list(Some(prefix)).try_collect::<Vec<_>>().await {
                Ok(listed) => listed,
                Err(object_store::Error::NotFound { .. }) => Vec::new(),
                Err(error) => return Err(self.transfer("list", prefix)(error)),
            };
        let mut keys: Vec<Key> = listed.into_iter().map(|meta| meta.location).collect();
        keys.sort();
        Ok(keys)
    }

    /// A run record from the remote; its output must be a digest (it becomes a local path).
    fn parse_run_record(&self, key: &Key, bytes: &[u8]) -> Result<RunRecord, RemoteError> {
        let record = self.parse_json::<RunRecord>(key, bytes)?;
        if !is_digest(&record.output) {
            return Err(RemoteError::Corrupted {
                remote: self.shown.clone(),
                key: self.show_key(key),
                detail: "its output is not a digest".into(),
            });
        }
        Ok(record)
    }

    fn parse_json<T: serde::de::DeserializeOwned>(
        &self,
        key: &Key,
        bytes: &[u8],
    ) -> Result<T, RemoteError> {
        serde_json::from_slice(bytes).map_err(|error| RemoteError::Corrupted {
            remote: self.shown.clone(),
            key: self.show_key(key),
            detail: format!("not valid JSON for its kind: {error}"),
        })
    }
}

/// Lock files by pipeline name, and run records by fingerprint.
type Selection = (BTreeMap<String, LockFile>, BTreeMap<String, RunRecord>);

/// The lock files and run records `scope` selects in the local cache.
fn local_selection(cache: &Cache, scope: &Scope) -> Result<Selection, RemoteError> {
    let mut locks = BTreeMap::new();
    let mut records = BTreeMap::new();
    match scope {
        Scope::Pipeline(pipeline) => {
            let lock = cache.read_lock_file(pipeline)?;
            if lock.stages.is_empty() {
                return Err(RemoteError::NothingToPush {
                    pipeline: pipeline.clone(),
                    path: cache.lock_file_path(pipeline),
                });
            }
            for entry in lock.stages.values() {
                let record = cache.run_record(&entry.fingerprint).unwrap_or(RunRecord {
                    output: entry.output.clone(),
                    outcome: entry.outcome.clone(),
                    wall_time_seconds: entry.wall_time_seconds,
                });
                records.insert(entry.fingerprint.clone(), record);
            }
            locks.insert(pipeline.clone(), lock);
        }
        Scope::All => {
            for (_, lock) in cache.all_lock_files()? {
                if lock.stages.is_empty() {
                    continue;
                }
                locks.insert(lock.pipeline.clone(), lock);
            }
            records = cache.all_run_records()?;
        }
    }
    Ok((locks, records))
}

/// A local directory as a store (created if missing).
fn local_store(dir: &Path) -> Result<Arc<dyn ObjectStore>, String> {
    std::fs::create_dir_all(dir)
        .map_err(|error| format!("cannot create the directory `{}`: {error}", dir.display()))?;
    let store = object_store::local::LocalFileSystem::new_with_prefix(dir)
        .map_err(|error| format!("cannot open the directory `{}`: {error}", dir.display()))?;
    Ok(Arc::new(store))
}

/// A cloud or HTTP store for `url`, its settings and credentials read from the environment.
fn cloud_store(
    scheme: &object_store::ObjectStoreScheme,
    url: &url::Url,
) -> Result<Arc<dyn ObjectStore>, String> {
    use object_store::ObjectStoreScheme as Scheme;
    if let Scheme::Local = scheme {
        let path = url
            .to_file_path()
            .map_err(|()| format!("`{url}` is not a local path"))?;
        return local_store(&path);
    }
    #[cfg(not(feature = "cloud"))]
    return Err(match scheme {
        Scheme::AmazonS3 | Scheme::GoogleCloudStorage | Scheme::MicrosoftAzure | Scheme::Http => {
            format!(
                "`{}://` remotes need a build with the `cloud` feature (`cargo install --features cloud` / `cargo build --release --features cloud`); this build reads and writes directory remotes only",
                url.scheme()
            )
        }
        other => format!("unsupported kind of store {other:?}"),
    });
    #[cfg(feature = "cloud")]
    {
        // Each builder's error, with what a user sets for that store where it helps.
        match scheme {
            Scheme::AmazonS3 => object_store::aws::AmazonS3Builder::from_env()
                .with_url(url.as_str())
                .with_retry(retry_config())
                .build()
                .map(|store| Arc::new(store) as _)
                .map_err(|error| error.to_string()),
            Scheme::GoogleCloudStorage => object_store::gcp::GoogleCloudStorageBuilder::from_env()
                .with_url(url.as_str())
                .with_retry(retry_config())
                .build()
                .map(|store| Arc::new(store) as _)
                .map_err(|error| {
                    format!(
                        "{error} (GCS credentials: GOOGLE_SERVICE_ACCOUNT naming a service-account key file, GOOGLE_SERVICE_ACCOUNT_KEY holding one, or GOOGLE_APPLICATION_CREDENTIALS; else the VM's metadata server)"
                    )
                }),
            Scheme::MicrosoftAzure => object_store::azure::MicrosoftAzureBuilder::from_env()
                .with_url(url.as_str())
                .with_retry(retry_config())
                .build()
                .map(|store| Arc::new(store) as _)
                .map_err(|error| {
                    format!(
                        "{error} (Azure: set AZURE_STORAGE_ACCOUNT_NAME and a credential — AZURE_STORAGE_ACCOUNT_KEY, AZURE_STORAGE_SAS_KEY, or AZURE_CLIENT_ID, AZURE_CLIENT_SECRET and AZURE_TENANT_ID — or AZURE_STORAGE_USE_EMULATOR=true for Azurite, at AZURITE_BLOB_STORAGE_URL, default http://127.0.0.1:10000)"
                    )
                }),
            Scheme::Http => {
                // The store is the server; the URL's path is the prefix of every key.
                let origin = &url[..url::Position::BeforePath];
                // Plain `http://` is what the user wrote (a server on the LAN or loopback).
                let options =
                    object_store::ClientOptions::new().with_allow_http(url.scheme() == "http");
                object_store::http::HttpBuilder::new()
                    .with_url(origin)
                    .with_client_options(options)
                    .with_retry(retry_config())
                    .build()
                    .map(|store| Arc::new(store) as _)
                    .map_err(|error| error.to_string())
            }
            other => Err(format!("unsupported kind of store {other:?}")),
        }
    }
}

/// `message` without `secret` in it.
fn scrub(message: &str, secret: Option<&str>) -> String {
    match secret {
        Some(secret) if !secret.is_empty() => message.replace(secret, "***"),
        _ => message.to_string(),
    }
}

fn shard(digest: &str) -> &str {
    digest.get(..2).unwrap_or("__")
}

fn short(digest: &str) -> &str {
    digest.get(..12).unwrap_or(digest)
}

fn object_prefix(digest: &str) -> String {
    format!("objects/{}/{digest}", shard(digest))
}

/// A blake3 digest as the cache names things: 64 lowercase hex digits. Names read from a remote
/// become local paths, so nothing else is accepted.
fn is_digest(text: &str) -> bool {
    text.len() == 64
        && text
            .bytes()
            .all(|byte| byte.is_ascii_digit() || (b'a'..=b'f').contains(&byte))
}

/// A manifest path from a remote that stays inside the artifact: relative, `/`-separated, no
/// empty, `.` or `..` part, no backslash or NUL.
fn is_relative_path(path: &str) -> bool {
    !path.is_empty()
        && !path.contains(['\\', '\0'])
        && path
            .split('/')
            .all(|part| !part.is_empty() && part != "." && part != "..")
}

/// A manifest path (`/`-separated) under `root`.
fn local_path(root: &Path, relative: &str) -> PathBuf {
    relative
        .split('/')
        .fold(root.to_path_buf(), |path, part| path.join(part))
}

fn to_json<T: Serialize>(value: &T, path: &Path) -> Result<Vec<u8>, RemoteError> {
    serde_json::to_vec_pretty(value).map_err(|error| {
        RemoteError::Cache(CacheError::Invalid {
            path: path.to_path_buf(),
            message: error.to_string(),
        })
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cache::LockEntry;
    use crate::fingerprint::{StageFingerprint, FINGERPRINT_VERSION};

    /// A cache whose pipeline `p` has one stage `data` with an object of `files`.
    fn cache_with_stage(root: &Path, files: &[(&str, &str)]) -> (Cache, String) {
        let cache = Cache::open(root).unwrap();
        let staging = cache.staging_dir("t").unwrap();
        for (path, content) in files {
            let full = local_path(&staging.join("data"), path);
            std::fs::create_dir_all(full.parent().unwrap()).unwrap();
            std::fs::write(full, content).unwrap();
        }
        let (digest, _) = cache.store(&staging).unwrap();
        let components = StageFingerprint {
            version: FINGERPRINT_VERSION,
            stage: "data".into(),
            kind: "ingest".into(),
            params: BTreeMap::new(),
            upstream: BTreeMap::new(),
            inputs: BTreeMap::new(),
            tool_version: "0".into(),
            seed: 0,
            environment: BTreeMap::new(),
        };
        let mut lock = LockFile::empty("p");
        let entry = LockEntry {
            fingerprint: components.digest(),
            components,
            output: digest.clone(),
            outcome: BTreeMap::from([("rows".to_string(), serde_json::json!(3))]),
            wall_time_seconds: 1.0,
        };
        cache
            .put_run_record(
                &entry.fingerprint,
                &RunRecord {
                    output: digest.clone(),
                    outcome: entry.outcome.clone(),
                    wall_time_seconds: 1.0,
                },
            )
            .unwrap();
        lock.stages.insert("data".into(), entry);
        cache.write_lock_file(&lock).unwrap();
        (cache, digest)
    }

    fn pipeline() -> Scope {
        Scope::Pipeline("p".into())
    }

    #[test]
    fn a_pulled_cache_holds_what_was_pushed() {
        let dir = tempfile::tempdir().unwrap();
        let (cache, digest) = cache_with_stage(
            &dir.path().join("a"),
            &[("x.txt", "one"), ("sub/y.txt", "two")],
        );
        let remote = Remote::open("remote", dir.path()).unwrap();
        let pushed = remote.push(&cache, &pipeline()).unwrap();
        assert_eq!(
            (
                pushed.objects_copied,
                pushed.files_copied,
                pushed.bytes_copied
            ),
            (1, 2, 6)
        );
        assert_eq!(
            (pushed.run_records_copied, pushed.lock_files_written),
            (1, 1)
        );
        for key in [
            format!("objects/{}/{digest}/manifest.json", &digest[..2]),
            format!("objects/{}/{digest}/data/sub/y.txt", &digest[..2]),
            "locks/p.lock.json".to_string(),
        ] {
            assert!(dir.path().join("remote").join(&key).is_file(), "{key}");
        }
        // Pushing again sends nothing new.
        let again = remote.push(&cache, &pipeline()).unwrap();
        assert_eq!((again.objects_copied, again.objects_present), (0, 1));
        assert_eq!(again.run_records_copied, 0);

        let fresh = Cache::open(&dir.path().join("b")).unwrap();
        let pulled = remote.pull(&fresh, &pipeline()).unwrap();
        assert_eq!((pulled.objects_copied, pulled.files_copied), (1, 2));
        assert_eq!(
            (pulled.run_records_copied, pulled.lock_files_written),
            (1, 1)
        );
        assert!(fresh.verify_object(&digest).unwrap().is_ok());
        assert_eq!(
            fresh.read_lock_file("p").unwrap(),
            cache.read_lock_file("p").unwrap()
        );
        let fingerprint = &cache.read_lock_file("p").unwrap().stages["data"].fingerprint;
        assert_eq!(fresh.run_record(fingerprint), cache.run_record(fingerprint));
        let nothing = remote.pull(&fresh, &pipeline()).unwrap();
        assert_eq!((nothing.objects_copied, nothing.objects_present), (0, 1));
        assert_eq!(nothing.lock_files_written, 0);
        // Everything, without naming a pipeline.
        let all = Cache::open(&dir.path().join("c")).unwrap();
        let pulled = remote.pull(&all, &Scope::All).unwrap();
        assert_eq!((pulled.objects_copied, pulled.lock_files_written), (1, 1));
    }

    /// Overwrite a file of the remote directory (object_store writes them read-only or not: make
    /// sure it can be written).
    fn tamper(path: &Path, content: &[u8]) {
        std::fs::remove_file(path).unwrap();
        std::fs::write(path, content).unwrap();
    }

    #[test]
    fn a_corrupted_remote_file_is_an_error_and_never_reaches_the_cache() {
        let dir = tempfile::tempdir().unwrap();
        let (cache, digest) = cache_with_stage(&dir.path().join("a"), &[("x.txt", "one")]);
        let remote = Remote::open("remote", dir.path()).unwrap();
        remote.push(&cache, &pipeline()).unwrap();
        let file = dir.path().join(format!(
            "remote/objects/{}/{digest}/data/x.txt",
            &digest[..2]
        ));
        tamper(&file, b"0ne");
        let fresh = Cache::open(&dir.path().join("b")).unwrap();
        let error = remote.pull(&fresh, &pipeline()).unwrap_err().to_string();
        assert_eq!(
            error,
            format!(
                "remote `remote`: `objects/{}/{digest}/data/x.txt` is corrupted: its content \
                 does not match its blake3 in the manifest; it was not placed in the local \
                 cache (repair it with `peftpipe push --verify` from a cache that holds it \
                 intact)",
                &digest[..2]
            )
        );
        assert!(!fresh.has_object(&digest));
        assert!(fresh.read_lock_file("p").unwrap().stages.is_empty());
        assert_eq!(std::fs::read_dir(fresh.tmp_dir()).unwrap().count(), 0);
        // A truncated file: its size says so.
        tamper(&file, b"on");
        let error = remote.pull(&fresh, &pipeline()).unwrap_err().to_string();
        assert!(
            error.contains("is corrupted: 2 bytes, expected 3"),
            "{error}"
        );
        // A missing file.
        std::fs::remove_file(&file).unwrap();
        let error = remote.pull(&fresh, &pipeline()).unwrap_err().to_string();
        assert!(
            error.contains("is corrupted: the file is missing"),
            "{error}"
        );
        assert!(!fresh.has_object(&digest));
    }

    #[test]
    fn a_pulled_lock_entry_takes_its_output_and_figures_from_the_run_record() {
        let dir = tempfile::tempdir().unwrap();
        let (cache, digest) = cache_with_stage(&dir.path().join("a"), &[("x.txt", "one")]);
        let remote = Remote::open("remote", dir.path()).unwrap();
        remote.push(&cache, &pipeline()).unwrap();
        // The fresh cache holds another object; the remote's lock is edited to name it, and
        // its figures are edited too (a damaged or hand-edited lock file).
        let fresh = Cache::open(&dir.path().join("b")).unwrap();
        let staging = fresh.staging_dir("t").unwrap();
        std::fs::create_dir_all(staging.join("data")).unwrap();
        std::fs::write(staging.join("data/other.txt"), "other").unwrap();
        let (other, _) = fresh.store(&staging).unwrap();
        let lock_path = dir.path().join("remote/locks/p.lock.json");
        let text = std::fs::read_to_string(&lock_path).unwrap();
        tamper(
            &lock_path,
            text.replace(&digest, &other)
                .replace("\"rows\": 3", "\"rows\": 4")
                .as_bytes(),
        );
        remote.pull(&fresh, &pipeline()).unwrap();
        let entry = &fresh.read_lock_file("p").unwrap().stages["data"];
        assert_eq!(entry.output, digest, "the run record's output");
        assert_eq!(entry.outcome["rows"], 3);
        assert!(fresh.verify_object(&digest).unwrap().is_ok());

        // A fingerprint that is not its components' digest is refused.
        let edited = text.replace("\"stage\": \"data\"", "\"stage\": \"date\"");
        assert_ne!(edited, text);
        tamper(&lock_path, edited.as_bytes());
        let other_cache = Cache::open(&dir.path().join("c")).unwrap();
        let error = remote
            .pull(&other_cache, &pipeline())
            .unwrap_err()
            .to_string();
        assert!(
            error.contains("p.lock.json` is corrupted") && error.contains("`data`"),
            "{error}"
        );
        assert!(other_cache.read_lock_file("p").unwrap().stages.is_empty());
    }

    #[test]
    fn a_push_that_lacks_a_stages_output_keeps_the_remotes_entry_for_it() {
        let dir = tempfile::tempdir().unwrap();
        let (cache, digest) = cache_with_stage(&dir.path().join("a"), &[("x.txt", "one")]);
        // A second stage, `prompts`, with its own object.
        let staging = cache.staging_dir("t").unwrap();
        std::fs::create_dir_all(staging.join("data")).unwrap();
        std::fs::write(staging.join("data/p.txt"), "prompts").unwrap();
        let (prompts, _) = cache.store(&staging).unwrap();
        let mut lock = cache.read_lock_file("p").unwrap();
        let mut entry = lock.stages["data"].clone();
        entry.components.stage = "prompts".into();
        entry.fingerprint = entry.components.digest();
        entry.output = prompts.clone();
        cache
            .put_run_record(
                &entry.fingerprint,
                &RunRecord {
                    output: prompts.clone(),
                    outcome: entry.outcome.clone(),
                    wall_time_seconds: 1.0,
                },
            )
            .unwrap();
        lock.stages.insert("prompts".into(), entry);
        cache.write_lock_file(&lock).unwrap();
        let remote = Remote::open("remote", dir.path()).unwrap();
        remote.push(&cache, &pipeline()).unwrap();

        // The local cache loses `prompts`' object (gc, a deleted folder), then pushes again.
        std::fs::remove_dir_all(cache.object_dir(&prompts)).unwrap();
        let pushed = remote.push(&cache, &pipeline()).unwrap();
        assert_eq!(pushed.skipped.len(), 1, "{pushed:?}");
        let fresh = Cache::open(&dir.path().join("b")).unwrap();
        remote.pull(&fresh, &pipeline()).unwrap();
        let pulled = fresh.read_lock_file("p").unwrap();
        assert_eq!(
            pulled.stages.keys().collect::<Vec<_>>(),
            ["data", "prompts"],
            "the remote still has `prompts`"
        );
        assert_eq!(pulled.stages["prompts"].output, prompts);
        assert_eq!(pulled.stages["data"].output, digest);
    }

    #[test]
    fn push_verify_repairs_a_damaged_remote_and_a_plain_push_does_not() {
        let dir = tempfile::tempdir().unwrap();
        let (cache, digest) = cache_with_stage(&dir.path().join("a"), &[("x.txt", "one")]);
        let remote = Remote::open("remote", dir.path()).unwrap();
        remote.push(&cache, &pipeline()).unwrap();
        let file = dir.path().join(format!(
            "remote/objects/{}/{digest}/data/x.txt",
            &digest[..2]
        ));
        tamper(&file, b"on");
        let fingerprint = cache.read_lock_file("p").unwrap().stages["data"]
            .fingerprint
            .clone();
        let record = dir.path().join(format!(
            "remote/runs/{}/{fingerprint}.json",
            &fingerprint[..2]
        ));
        tamper(&record, b"{\"out");

        // A plain push trusts what the remote has.
        let plain = remote.push(&cache, &pipeline()).unwrap();
        assert_eq!((plain.objects_present, plain.repaired.len()), (1, 0));
        let fresh = Cache::open(&dir.path().join("b")).unwrap();
        assert!(remote.pull(&fresh, &pipeline()).is_err());

        let verified = remote.push_verified(&cache, &pipeline()).unwrap();
        assert_eq!(verified.objects_copied, 1);
        assert_eq!(verified.repaired.len(), 2, "{:?}", verified.repaired);
        assert_eq!(std::fs::read(&file).unwrap(), b"one");
        remote.pull(&fresh, &pipeline()).unwrap();
        assert!(fresh.verify_object(&digest).unwrap().is_ok());
        assert_eq!(
            fresh.run_record(&fingerprint),
            cache.run_record(&fingerprint)
        );
        // Nothing left to repair; the scratch folders are gone.
        let again = remote.push_verified(&cache, &pipeline()).unwrap();
        assert_eq!((again.objects_present, again.repaired.len()), (1, 0));
        assert_eq!(std::fs::read_dir(cache.tmp_dir()).unwrap().count(), 0);
    }

    #[test]
    fn a_manifest_that_does_not_hash_to_its_address_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let (cache, digest) = cache_with_stage(&dir.path().join("a"), &[("x.txt", "one")]);
        let remote = Remote::open("remote", dir.path()).unwrap();
        remote.push(&cache, &pipeline()).unwrap();
        let manifest = dir.path().join(format!(
            "remote/objects/{}/{digest}/manifest.json",
            &digest[..2]
        ));
        let text = std::fs::read_to_string(&manifest).unwrap();
        tamper(
            &manifest,
            text.replace("\"size\": 3", "\"size\": 4").as_bytes(),
        );
        let fresh = Cache::open(&dir.path().join("b")).unwrap();
        let error = remote.pull(&fresh, &pipeline()).unwrap_err().to_string();
        assert!(
            error.contains("manifest.json` is corrupted: the manifest does not hash"),
            "{error}"
        );
        assert!(!fresh.has_object(&digest));
    }

    #[test]
    fn remote_names_that_would_escape_the_cache_are_refused() {
        assert!(is_relative_path("adapter/a.bin"));
        for bad in [
            "",
            "/etc/passwd",
            "../x",
            "a/../../x",
            "a//b",
            "./a",
            "a\\b",
        ] {
            assert!(!is_relative_path(bad), "{bad}");
        }
        assert!(is_digest(&"a".repeat(64)));
        assert!(!is_digest(&"A".repeat(64)));
        assert!(!is_digest("../../etc"));
    }

    #[test]
    fn pushing_a_pipeline_that_never_ran_or_lost_its_output_says_so() {
        let dir = tempfile::tempdir().unwrap();
        let cache = Cache::open(&dir.path().join("a")).unwrap();
        let remote = Remote::open("remote", dir.path()).unwrap();
        let error = remote.push(&cache, &pipeline()).unwrap_err().to_string();
        assert!(
            error.starts_with("the local cache has no lock file for the pipeline `p`"),
            "{error}"
        );
        let (cache, digest) = cache_with_stage(&dir.path().join("b"), &[("x.txt", "one")]);
        cache.remove_object(&digest).unwrap();
        let report = remote.push(&cache, &pipeline()).unwrap();
        assert_eq!(report.objects_copied, 0);
        assert_eq!(report.skipped.len(), 1, "{:?}", report.skipped);
        assert!(report.skipped[0].contains("is not in the local cache"));
        assert_eq!(
            report.lock_files_written, 0,
            "a lock file naming nothing is not pushed"
        );
        let error = remote
            .pull(&Cache::open(&dir.path().join("c")).unwrap(), &pipeline())
            .unwrap_err()
            .to_string();
        assert!(error.contains("has no `locks/p.lock.json`"), "{error}");
    }

    #[test]
    fn pulling_a_pipeline_the_remote_lacks_names_the_key() {
        let dir = tempfile::tempdir().unwrap();
        let remote = Remote::open("remote", dir.path()).unwrap();
        let cache = Cache::open(&dir.path().join("a")).unwrap();
        let error = remote.pull(&cache, &pipeline()).unwrap_err().to_string();
        assert_eq!(
            error,
            "remote `remote` has no `locks/p.lock.json`: the pipeline `p` was never pushed \
             there (run `peftpipe push` where it has run)"
        );
    }

    #[test]
    fn concurrent_pushes_of_one_cache_leave_one_whole_copy() {
        let dir = tempfile::tempdir().unwrap();
        let files: Vec<(String, String)> = (0..40)
            .map(|index| {
                (
                    format!("f{index}.txt"),
                    format!("content {index}").repeat(500),
                )
            })
            .collect();
        let borrowed: Vec<(&str, &str)> = files
            .iter()
            .map(|(path, content)| (path.as_str(), content.as_str()))
            .collect();
        let (cache, digest) = cache_with_stage(&dir.path().join("a"), &borrowed);
        std::thread::scope(|scope| {
            let pushes: Vec<_> = (0..4)
                .map(|_| {
                    scope.spawn(|| {
                        let remote = Remote::open("remote", dir.path()).unwrap();
                        remote.push(&cache, &pipeline()).unwrap()
                    })
                })
                .collect();
            for push in pushes {
                push.join().unwrap();
            }
        });
        let fresh = Cache::open(&dir.path().join("b")).unwrap();
        let remote = Remote::open("remote", dir.path()).unwrap();
        remote.pull(&fresh, &pipeline()).unwrap();
        assert!(fresh.verify_object(&digest).unwrap().is_ok());
    }

    #[test]
    fn passwords_are_not_shown() {
        assert_eq!(
            display_url("https://user:hunter2@dav.example/cache"),
            "https://user:***@dav.example/cache"
        );
        assert_eq!(display_url("s3://bucket/prefix"), "s3://bucket/prefix");
        assert_eq!(
            scrub("GET https://u:hunter2@h failed", Some("hunter2")),
            "GET https://u:***@h failed"
        );
        let error = Remote::open("ftp://host/x", Path::new(".")).unwrap_err();
        assert!(
            error.to_string().contains("unsupported URL scheme `ftp`"),
            "{error}"
        );
    }
}
