//! Hugging Face Hub ids as model paths: `hf://org/name[@revision]` resolves to a snapshot folder
//! of the standard Hugging Face cache (`$HF_HUB_CACHE`, else `$HF_HOME/hub`, else
//! `$XDG_CACHE_HOME/huggingface/hub`, else `~/.cache/huggingface/hub`), laid out as
//! `models--org--name/refs/<revision>` (a commit hash) → `models--org--name/snapshots/<hash>/`.
//! That offline resolution is always built. Downloading what the cache lacks (config, weights,
//! tokenizer files, into the same layout) needs the optional `hub` cargo feature.
//!
//! Owns [`HubId`], [`resolve_model_path`] and [`HubError`]. Must not: read weights, print, or
//! touch the network unless built with `hub`.

use std::path::{Path, PathBuf};

/// The scheme that marks a Hub id.
pub const HUB_SCHEME: &str = "hf://";
/// The revision used when none is given.
pub const DEFAULT_REVISION: &str = "main";

/// Why a Hub id could not be resolved to a folder.
#[derive(Debug, thiserror::Error)]
pub enum HubError {
    #[error("`{text}` is not a valid Hub id: {reason} (expected hf://org/name or hf://org/name@revision)")]
    InvalidId { text: String, reason: String },
    #[error("{id} is not in the Hugging Face cache: {missing} does not exist. {fix}")]
    NotCached {
        id: String,
        missing: PathBuf,
        fix: String,
    },
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("downloading {id}: {message}")]
    Download { id: String, message: String },
}

/// A parsed `hf://org/name[@revision]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HubId {
    /// `org/name` (or a bare `name` for the few legacy ids without an organisation).
    pub repo_id: String,
    /// A branch, tag or commit hash (default `main`).
    pub revision: String,
}

impl std::fmt::Display for HubId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{HUB_SCHEME}{}", self.repo_id)?;
        if self.revision != DEFAULT_REVISION {
            write!(f, "@{}", self.revision)?;
        }
        Ok(())
    }
}

impl HubId {
    /// Parse `text`; `Ok(None)` when it does not start with `hf://` (a local path).
    pub fn parse(text: &str) -> Result<Option<Self>, HubError> {
        let Some(rest) = text.strip_prefix(HUB_SCHEME) else {
            return Ok(None);
        };
        let invalid = |reason: &str| HubError::InvalidId {
            text: text.to_string(),
            reason: reason.to_string(),
        };
        let (repo_id, revision) = match rest.split_once('@') {
            Some((repo_id, revision)) => (repo_id, revision),
            None => (rest, DEFAULT_REVISION),
        };
        if revision.is_empty() {
            return Err(invalid("empty revision after `@`"));
        }
        if revision
            .split('/')
            .any(|part| part.is_empty() || part == "..")
        {
            return Err(invalid("the revision has an empty or `..` component"));
        }
        let parts: Vec<&str> = repo_id.split('/').collect();
        if parts.len() > 2 {
            return Err(invalid("a repository id has at most one `/`"));
        }
        let valid_part = |part: &&str| {
            !part.is_empty()
                && *part != "."
                && *part != ".."
                && part
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
        };
        if !parts.iter().all(valid_part) {
            return Err(invalid(
                "organisation and name may use letters, digits, `-`, `_` and `.` only",
            ));
        }
        Ok(Some(HubId {
            repo_id: repo_id.to_string(),
            revision: revision.to_string(),
        }))
    }

    /// The repository's folder name in the cache: `models--org--name`.
    pub fn cache_folder_name(&self) -> String {
        format!("models--{}", self.repo_id.replace('/', "--"))
    }
}

/// The Hub cache directory as huggingface_hub computes it, from the given environment lookup.
pub fn cache_dir_from(env: impl Fn(&str) -> Option<String>) -> Option<PathBuf> {
    let set = |key: &str| env(key).filter(|value| !value.is_empty());
    if let Some(dir) = set("HF_HUB_CACHE").or_else(|| set("HUGGINGFACE_HUB_CACHE")) {
        return Some(PathBuf::from(dir));
    }
    if let Some(home) = set("HF_HOME") {
        return Some(Path::new(&home).join("hub"));
    }
    if let Some(cache) = set("XDG_CACHE_HOME") {
        return Some(Path::new(&cache).join("huggingface").join("hub"));
    }
    set("HOME").map(|home| {
        Path::new(&home)
            .join(".cache")
            .join("huggingface")
            .join("hub")
    })
}

/// The Hub cache directory of this process's environment.
pub fn cache_dir() -> Option<PathBuf> {
    cache_dir_from(|key| std::env::var(key).ok())
}

fn is_commit_hash(revision: &str) -> bool {
    revision.len() == 40 && revision.chars().all(|c| c.is_ascii_hexdigit())
}

/// Where `id` lives in `cache`, offline: the snapshot folder of its revision. The folder must hold
/// a config.json. `NotCached` names the first missing piece.
pub fn resolve_in_cache(id: &HubId, cache: &Path) -> Result<PathBuf, HubError> {
    let repo = cache.join(id.cache_folder_name());
    let not_cached = |missing: PathBuf| HubError::NotCached {
        id: id.to_string(),
        missing,
        fix: fix_hint(id),
    };
    let snapshots = repo.join("snapshots");
    let commit = if is_commit_hash(&id.revision) && snapshots.join(&id.revision).is_dir() {
        id.revision.clone()
    } else {
        let reference = repo.join("refs").join(&id.revision);
        if !reference.is_file() {
            return Err(not_cached(reference));
        }
        let text = std::fs::read_to_string(&reference).map_err(|source| HubError::Io {
            path: reference.clone(),
            source,
        })?;
        let commit = text.trim().to_string();
        if !is_commit_hash(&commit) {
            return Err(HubError::Io {
                path: reference,
                source: std::io::Error::new(
                    std::io::ErrorKind::InvalidData,
                    format!("expected a 40-character commit hash, found `{commit}`"),
                ),
            });
        }
        commit
    };
    let snapshot = snapshots.join(&commit);
    let config = snapshot.join("config.json");
    if !config.is_file() {
        return Err(not_cached(config));
    }
    Ok(snapshot)
}

#[cfg(not(feature = "hub"))]
fn fix_hint(id: &HubId) -> String {
    let revision = if id.revision == DEFAULT_REVISION {
        String::new()
    } else {
        format!(" --revision {}", id.revision)
    };
    format!(
        "This peftpipe was built without the `hub` feature and does not download: fetch it with `hf download {}{revision}` (Python huggingface_hub; set HF_HUB_CACHE or HF_HOME if you use another cache), rebuild with `cargo build --features hub`, or pass a local model directory",
        id.repo_id
    )
}

#[cfg(feature = "hub")]
fn fix_hint(id: &HubId) -> String {
    format!(
        "Downloading {} failed or was not attempted; check the network and the id, or pass a local model directory",
        id.repo_id
    )
}

/// A model path as the user wrote it: a local path, or `hf://org/name[@revision]` resolved
/// through the Hugging Face cache (downloading what is missing when built with `hub`).
pub fn resolve_model_path(text: &str) -> Result<PathBuf, HubError> {
    let Some(id) = HubId::parse(text)? else {
        return Ok(PathBuf::from(text));
    };
    let Some(cache) = cache_dir() else {
        return Err(HubError::NotCached {
            id: id.to_string(),
            missing: PathBuf::from("$HF_HUB_CACHE"),
            fix: "Neither HF_HUB_CACHE, HF_HOME, XDG_CACHE_HOME nor HOME is set.".to_string(),
        });
    };
    match resolve_in_cache(&id, &cache) {
        Ok(path) => Ok(path),
        #[cfg(feature = "hub")]
        Err(HubError::NotCached { .. }) => download::snapshot(&id, &cache),
        Err(error) => Err(error),
    }
}

#[cfg(feature = "hub")]
mod download {
    //! Fetching a model's files into the cache with hf-hub's blocking (ureq) client.

    use std::path::{Path, PathBuf};

    use hf_hub::api::sync::ApiBuilder;
    use hf_hub::{Repo, RepoType};

    use super::{HubError, HubId};

    /// Files fetched when the repository has them (besides config.json and the weights).
    const OPTIONAL_FILES: &[&str] = &[
        "tokenizer.json",
        "tokenizer_config.json",
        "generation_config.json",
        "special_tokens_map.json",
    ];

    /// Download config.json, the safetensors weights (sharded or not) and the tokenizer files;
    /// returns the snapshot folder.
    pub fn snapshot(id: &HubId, cache: &Path) -> Result<PathBuf, HubError> {
        let error = |message: String| HubError::Download {
            id: id.to_string(),
            message,
        };
        let api = ApiBuilder::new()
            .with_cache_dir(cache.to_path_buf())
            .with_token(std::env::var("HF_TOKEN").ok().filter(|t| !t.is_empty()))
            .with_progress(false)
            .build()
            .map_err(|e| error(e.to_string()))?;
        let repo = api.repo(Repo::with_revision(
            id.repo_id.clone(),
            RepoType::Model,
            id.revision.clone(),
        ));
        let info = repo.info().map_err(|e| error(e.to_string()))?;
        let files: Vec<String> = info.siblings.into_iter().map(|s| s.rfilename).collect();
        let has = |name: &str| files.iter().any(|file| file == name);
        let get = |name: &str| {
            repo.get(name)
                .map_err(|e| error(format!("fetching {name}: {e}")))
        };
        let config = get("config.json")?;
        if has("model.safetensors.index.json") {
            let index_path = get("model.safetensors.index.json")?;
            let text = std::fs::read_to_string(&index_path).map_err(|source| HubError::Io {
                path: index_path.clone(),
                source,
            })?;
            let index: serde_json::Value = serde_json::from_str(&text)
                .map_err(|e| error(format!("{}: {e}", index_path.display())))?;
            let mut shards: Vec<&str> = index
                .get("weight_map")
                .and_then(serde_json::Value::as_object)
                .ok_or_else(|| error("model.safetensors.index.json has no weight_map".into()))?
                .values()
                .filter_map(serde_json::Value::as_str)
                .collect();
            shards.sort_unstable();
            shards.dedup();
            for shard in shards {
                get(shard)?;
            }
        } else if has("model.safetensors") {
            get("model.safetensors")?;
        } else {
            return Err(error(
                "the repository has no model.safetensors or model.safetensors.index.json".into(),
            ));
        }
        for name in OPTIONAL_FILES {
            if has(name) {
                get(name)?;
            }
        }
        config
            .parent()
            .map(Path::to_path_buf)
            .ok_or_else(|| error(format!("{} has no parent folder", config.display())))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_parse_with_and_without_revision() {
        assert_eq!(HubId::parse("models/local").unwrap(), None);
        let id = HubId::parse("hf://meta-llama/Llama-3.2-1B")
            .unwrap()
            .unwrap();
        assert_eq!(id.repo_id, "meta-llama/Llama-3.2-1B");
        assert_eq!(id.revision, "main");
        assert_eq!(id.cache_folder_name(), "models--meta-llama--Llama-3.2-1B");
        assert_eq!(id.to_string(), "hf://meta-llama/Llama-3.2-1B");
        let pinned = HubId::parse("hf://org/name@refs/pr/1").unwrap().unwrap();
        assert_eq!(pinned.revision, "refs/pr/1");
        assert_eq!(pinned.to_string(), "hf://org/name@refs/pr/1");
        for bad in [
            "hf://",
            "hf://a/b/c",
            "hf://org/na me",
            "hf://org/name@",
            "hf://../x",
            "hf://o/n@../x",
        ] {
            assert!(HubId::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn cache_dir_follows_huggingface_hub_precedence() {
        fn env<'a>(pairs: &'a [(&'a str, &'a str)]) -> impl Fn(&str) -> Option<String> + 'a {
            move |key: &str| {
                pairs
                    .iter()
                    .find(|(k, _)| *k == key)
                    .map(|(_, v)| v.to_string())
            }
        }
        let all = [
            ("HF_HUB_CACHE", "/a"),
            ("HF_HOME", "/b"),
            ("XDG_CACHE_HOME", "/c"),
            ("HOME", "/d"),
        ];
        assert_eq!(cache_dir_from(env(&all)), Some(PathBuf::from("/a")));
        assert_eq!(
            cache_dir_from(env(&all[1..])),
            Some(PathBuf::from("/b/hub"))
        );
        assert_eq!(
            cache_dir_from(env(&all[2..])),
            Some(PathBuf::from("/c/huggingface/hub"))
        );
        assert_eq!(
            cache_dir_from(env(&all[3..])),
            Some(PathBuf::from("/d/.cache/huggingface/hub"))
        );
        assert_eq!(cache_dir_from(env(&[])), None);
    }

    #[test]
    fn snapshots_resolve_through_refs_or_a_pinned_hash() {
        let cache = tempfile::tempdir().unwrap();
        let hash = "0123456789abcdef0123456789abcdef01234567";
        let repo = cache.path().join("models--org--tiny");
        std::fs::create_dir_all(repo.join("refs")).unwrap();
        std::fs::create_dir_all(repo.join("snapshots").join(hash)).unwrap();
        std::fs::write(repo.join("refs/main"), format!("{hash}\n")).unwrap();
        let id = HubId::parse("hf://org/tiny").unwrap().unwrap();
        // A snapshot without config.json is incomplete.
        let error = resolve_in_cache(&id, cache.path()).unwrap_err().to_string();
        assert!(error.contains("config.json"), "{error}");
        std::fs::write(repo.join("snapshots").join(hash).join("config.json"), "{}").unwrap();
        assert_eq!(
            resolve_in_cache(&id, cache.path()).unwrap(),
            repo.join("snapshots").join(hash)
        );
        let pinned = HubId::parse(&format!("hf://org/tiny@{hash}"))
            .unwrap()
            .unwrap();
        assert_eq!(
            resolve_in_cache(&pinned, cache.path()).unwrap(),
            repo.join("snapshots").join(hash)
        );
        let branch = HubId::parse("hf://org/tiny@dev").unwrap().unwrap();
        let error = resolve_in_cache(&branch, cache.path())
            .unwrap_err()
            .to_string();
        assert!(error.contains("refs/dev"), "{error}");
        #[cfg(not(feature = "hub"))]
        assert!(error.contains("--features hub"), "{error}");
    }
}
