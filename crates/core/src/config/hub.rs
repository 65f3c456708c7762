//! Hugging Face Hub ids as model paths, offline: `hf://org/name[@revision]` names a snapshot
//! folder of the standard Hugging Face cache (`$HF_HUB_CACHE`, else `$HF_HOME/hub`, else
//! `$XDG_CACHE_HOME/huggingface/hub`, else `~/.cache/huggingface/hub`), laid out as
//! `models--org--name/refs/<revision>` (a commit hash) → `models--org--name/snapshots/<hash>/`.
//! Pure path logic so validation and fingerprints resolve a pipeline's `model: hf://…` without a
//! network; downloading what the cache lacks is the main crate's (`models::hub`, `hub` feature).
//! Must not: read more than a `refs/` file, or touch the network.

use std::path::{Path, PathBuf};

/// The scheme that marks a Hub id.
pub const HUB_SCHEME: &str = "hf://";
/// The revision used when none is given.
pub const DEFAULT_REVISION: &str = "main";

/// Why a Hub id does not resolve in the cache.
#[derive(Debug, thiserror::Error)]
pub enum HubCacheError {
    #[error("`{text}` is not a valid Hub id: {reason} (expected hf://org/name or hf://org/name@revision)")]
    InvalidId { text: String, reason: String },
    #[error("{id} is not in the Hugging Face cache: {missing} does not exist")]
    NotCached { id: String, missing: PathBuf },
    #[error("{path}: {message}")]
    Unreadable { path: PathBuf, message: String },
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
    pub fn parse(text: &str) -> Result<Option<Self>, HubCacheError> {
        let Some(rest) = text.strip_prefix(HUB_SCHEME) else {
            return Ok(None);
        };
        let invalid = |reason: &str| HubCacheError::InvalidId {
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

/// The repository id of an `hf://org/name[@revision]` model as written (environment variables
/// expanded); None for a local folder.
pub fn repo_id_of(model: &str) -> Option<String> {
    let expanded = super::expand_env(model).unwrap_or_else(|_| model.to_string());
    HubId::parse(&expanded).ok().flatten().map(|id| id.repo_id)
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
pub fn resolve_in_cache(id: &HubId, cache: &Path) -> Result<PathBuf, HubCacheError> {
    resolve_in_cache_holding(id, cache, "config.json")
}

/// [`resolve_in_cache`] for a repository whose snapshot must hold `marker` (`adapter_config.json`
/// for a PEFT adapter).
pub fn resolve_in_cache_holding(
    id: &HubId,
    cache: &Path,
    marker: &str,
) -> Result<PathBuf, HubCacheError> {
    let repo = cache.join(id.cache_folder_name());
    let not_cached = |missing: PathBuf| HubCacheError::NotCached {
        id: id.to_string(),
        missing,
    };
    let snapshots = repo.join("snapshots");
    let commit = if is_commit_hash(&id.revision) && snapshots.join(&id.revision).is_dir() {
        id.revision.clone()
    } else {
        let reference = repo.join("refs").join(&id.revision);
        if !reference.is_file() {
            return Err(not_cached(reference));
        }
        let text =
            std::fs::read_to_string(&reference).map_err(|error| HubCacheError::Unreadable {
                path: reference.clone(),
                message: error.to_string(),
            })?;
        let commit = text.trim().to_string();
        if !is_commit_hash(&commit) {
            return Err(HubCacheError::Unreadable {
                path: reference,
                message: format!("expected a 40-character commit hash, found `{commit}`"),
            });
        }
        commit
    };
    let snapshot = snapshots.join(&commit);
    let config = snapshot.join(marker);
    if !config.is_file() {
        return Err(not_cached(config));
    }
    Ok(snapshot)
}

/// How to get an id into the cache, for messages.
pub fn download_hint(id: &HubId) -> String {
    let revision = if id.revision == DEFAULT_REVISION {
        String::new()
    } else {
        format!(" --revision {}", id.revision)
    };
    format!(
        "fetch it with `hf download {}{revision}` (Python huggingface_hub; set HF_HUB_CACHE or HF_HOME for another cache) or with a peftpipe built with `--features hub` (`peftpipe inspect {id}` downloads it), or use a local model directory",
        id.repo_id
    )
}

/// A pipeline's model path: `hf://org/name[@revision]` resolved offline through the Hugging Face
/// cache, anything else through [`super::resolve_path`] (environment variables, relative to the
/// project directory).
pub fn resolve_model_dir(project_dir: &Path, written: &str) -> Result<PathBuf, String> {
    let expanded = super::expand_env(written)?;
    let Some(id) = HubId::parse(&expanded).map_err(|error| error.to_string())? else {
        return super::resolve_path(project_dir, written);
    };
    let Some(cache) = cache_dir() else {
        return Err(format!(
            "{id}: no Hugging Face cache directory (none of HF_HUB_CACHE, HF_HOME, XDG_CACHE_HOME, HOME is set)"
        ));
    };
    resolve_in_cache(&id, &cache).map_err(|error| match error {
        HubCacheError::NotCached { .. } => format!("{error}; {}", download_hint(&id)),
        other => other.to_string(),
    })
}

/// A PEFT adapter's folder as written in a pipeline or on the command line: `hf://org/name[@rev]`
/// resolved offline through the Hugging Face cache (its snapshot must hold adapter_config.json;
/// nothing is downloaded, with or without the `hub` feature), anything else through
/// [`super::resolve_path`].
pub fn resolve_adapter_dir(project_dir: &Path, written: &str) -> Result<PathBuf, String> {
    let expanded = super::expand_env(written)?;
    let Some(id) = HubId::parse(&expanded).map_err(|error| error.to_string())? else {
        return super::resolve_path(project_dir, written);
    };
    let Some(cache) = cache_dir() else {
        return Err(format!(
            "{id}: no Hugging Face cache directory (none of HF_HUB_CACHE, HF_HOME, XDG_CACHE_HOME, HOME is set)"
        ));
    };
    resolve_in_cache_holding(&id, &cache, "adapter_config.json").map_err(|error| match error {
        HubCacheError::NotCached { .. } => {
            let revision = if id.revision == DEFAULT_REVISION {
                String::new()
            } else {
                format!(" --revision {}", id.revision)
            };
            format!(
                "{error}; fetch it with `hf download {}{revision}` (Python huggingface_hub; set HF_HUB_CACHE or HF_HOME for another cache), or use a local adapter folder",
                id.repo_id
            )
        }
        other => other.to_string(),
    })
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
    }

    #[test]
    fn pipelines_resolve_hub_ids_and_plain_paths() {
        let project = Path::new("/project");
        assert_eq!(
            resolve_model_dir(project, "models/x").unwrap(),
            PathBuf::from("/project/models/x")
        );
        let error = resolve_model_dir(project, "hf://a/b/c").unwrap_err();
        assert!(error.contains("not a valid Hub id"), "{error}");
        // The only test in this crate that reads the Hub cache variables.
        let cache = tempfile::tempdir().unwrap();
        let hash = "89abcdef0123456789abcdef0123456789abcdef";
        let snapshot = cache.path().join("models--org--tiny/snapshots").join(hash);
        std::fs::create_dir_all(&snapshot).unwrap();
        std::fs::write(snapshot.join("config.json"), "{}").unwrap();
        std::fs::create_dir_all(cache.path().join("models--org--tiny/refs")).unwrap();
        std::fs::write(cache.path().join("models--org--tiny/refs/main"), hash).unwrap();
        std::env::set_var("HF_HUB_CACHE", cache.path());
        assert_eq!(
            resolve_model_dir(project, "hf://org/tiny").unwrap(),
            snapshot
        );
        let error = resolve_model_dir(project, "hf://org/other@v2").unwrap_err();
        std::env::remove_var("HF_HUB_CACHE");
        assert!(
            error.contains("hf://org/other@v2 is not in the Hugging Face cache"),
            "{error}"
        );
        assert!(
            error.contains("hf download org/other --revision v2"),
            "{error}"
        );
    }
}
