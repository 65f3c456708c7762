//! Hub ids as model paths on the command line: `hf://org/name[@revision]` resolves offline
//! through the Hugging Face cache (`config::hub`, shared with pipeline validation), and, when
//! built with the optional `hub` feature, what the cache lacks (config, safetensors weights —
//! sharded or not —, tokenizer and generation files) is downloaded into the same layout.
//!
//! Owns [`resolve_model_path`] and [`HubError`]. Must not: read weights, print, or touch the
//! network unless built with `hub`.

use std::path::PathBuf;

pub use crate::config::hub::{
    cache_dir, cache_dir_from, download_hint, resolve_in_cache, resolve_model_dir, HubCacheError,
    HubId, DEFAULT_REVISION, HUB_SCHEME,
};

/// Why a model path could not be resolved to a folder.
#[derive(Debug, thiserror::Error)]
pub enum HubError {
    #[error("{source}. {fix}")]
    Cache {
        source: HubCacheError,
        /// How to get the id into the cache (depends on whether this build downloads).
        fix: String,
    },
    #[error("{id}: no Hugging Face cache directory (none of HF_HUB_CACHE, HF_HOME, XDG_CACHE_HOME, HOME is set)")]
    NoCacheDir { id: String },
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("downloading {id}: {message}")]
    Download { id: String, message: String },
}

#[cfg(not(feature = "hub"))]
fn fix_hint(id: &HubId) -> String {
    format!(
        "This peftpipe was built without the `hub` feature and does not download: {}",
        download_hint(id)
    )
}

#[cfg(feature = "hub")]
fn fix_hint(id: &HubId) -> String {
    format!(
        "Downloading {} was not possible; check the network and the id, or use a local model directory",
        id.repo_id
    )
}

/// A model path as the user wrote it: a local path, or `hf://org/name[@revision]` resolved
/// through the Hugging Face cache (downloading what is missing when built with `hub`).
pub fn resolve_model_path(text: &str) -> Result<PathBuf, HubError> {
    let cache_error = |id: &HubId, source: HubCacheError| HubError::Cache {
        fix: fix_hint(id),
        source,
    };
    let id = match HubId::parse(text) {
        Ok(Some(id)) => id,
        Ok(None) => return Ok(PathBuf::from(text)),
        Err(source) => {
            return Err(HubError::Cache {
                source,
                fix: "Use a local model directory or a valid id.".to_string(),
            })
        }
    };
    let Some(cache) = cache_dir() else {
        return Err(HubError::NoCacheDir { id: id.to_string() });
    };
    match resolve_in_cache(&id, &cache) {
        Ok(path) => Ok(path),
        #[cfg(feature = "hub")]
        Err(HubCacheError::NotCached { .. }) => download::snapshot(&id, &cache),
        Err(source) => Err(cache_error(&id, source)),
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
        // HF_ENDPOINT (a mirror or an enterprise hub) as huggingface_hub reads it.
        let endpoint = std::env::var("HF_ENDPOINT")
            .ok()
            .map(|endpoint| endpoint.trim_end_matches('/').to_string())
            .filter(|endpoint| !endpoint.is_empty());
        let mut builder = ApiBuilder::new();
        if let Some(endpoint) = endpoint {
            builder = builder.with_endpoint(endpoint);
        }
        let api = builder
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
            let weight_map = index
                .get("weight_map")
                .and_then(serde_json::Value::as_object)
                .ok_or_else(|| error("model.safetensors.index.json has no weight_map".into()))?;
            let mut shards: Vec<&str> = Vec::new();
            for (tensor, shard) in weight_map {
                let Some(shard) = shard.as_str() else {
                    continue;
                };
                // Never fetched to (or read from) a path outside the snapshot folder.
                if let Some(problem) = crate::config::train::shard_name_problem(shard) {
                    return Err(error(format!(
                        "{}: key `weight_map.{tensor}`: {problem}",
                        index_path.display()
                    )));
                }
                shards.push(shard);
            }
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
    fn local_paths_pass_through_and_bad_ids_are_refused() {
        assert_eq!(
            resolve_model_path("models/x").unwrap(),
            PathBuf::from("models/x")
        );
        let error = resolve_model_path("hf://a/b/c").unwrap_err().to_string();
        assert!(error.contains("not a valid Hub id"), "{error}");
    }
}
