//! `.peftpipe/config.yaml`: a project's settings that belong to no pipeline and change no result,
//! today the remote cache of `peftpipe push` / `pull`:
//!
//! ```yaml
//! cache:
//!   remote: s3://team-bucket/peftpipe   # or gs://, az:// (azure://), https://, file://, a directory
//! ```
//!
//! It sits next to the default cache (`<project>/.peftpipe/`), so a project can commit it while
//! ignoring the cache. Unknown keys are errors, as in pipeline files. This module only reads the
//! file; the command line decides what wins (`--remote`, `PEFTPIPE_REMOTE`, then this file).

use std::path::{Path, PathBuf};

use serde::Deserialize;

/// The file's contents.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProjectConfig {
    #[serde(default)]
    pub cache: CacheConfig,
}

/// `cache:`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CacheConfig {
    /// The remote cache: a URL (`s3://`, `gs://`, `az://` or `azure://`, `http(s)://`,
    /// `file://`), or a directory relative to the project directory. Credentials never go here:
    /// they come from the environment (`peftpipe push --help` lists them).
    pub remote: Option<String>,
}

/// `<project>/.peftpipe/config.yaml`.
pub fn project_config_path(project_dir: &Path) -> PathBuf {
    project_dir.join(".peftpipe").join("config.yaml")
}

impl ProjectConfig {
    /// Read the project's config file; a missing file is the default (no remote). Errors name
    /// the file and, for bad YAML or unknown keys, the line and column.
    pub fn load(project_dir: &Path) -> Result<ProjectConfig, String> {
        let path = project_config_path(project_dir);
        let shown = path.strip_prefix(".").unwrap_or(&path).display();
        let text = match std::fs::read_to_string(&path) {
            Ok(text) => text,
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => {
                return Ok(ProjectConfig::default())
            }
            Err(error) => return Err(format!("cannot read `{shown}`: {error}")),
        };
        if text.trim().is_empty() {
            return Ok(ProjectConfig::default());
        }
        serde_norway::from_str(&text).map_err(|error| format!("{shown}: {error}"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn load(text: &str) -> Result<ProjectConfig, String> {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dir.path().join(".peftpipe")).unwrap();
        std::fs::write(project_config_path(dir.path()), text).unwrap();
        ProjectConfig::load(dir.path())
            .map_err(|error| error.replace(&dir.path().display().to_string(), "[PROJECT]"))
    }

    #[test]
    fn reads_the_remote() {
        let config = load("cache:\n  remote: s3://bucket/prefix\n").unwrap();
        assert_eq!(config.cache.remote.as_deref(), Some("s3://bucket/prefix"));
        assert_eq!(load("").unwrap(), ProjectConfig::default());
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(
            ProjectConfig::load(dir.path()).unwrap(),
            ProjectConfig::default()
        );
    }

    #[test]
    fn unknown_keys_are_errors_naming_the_file_and_line() {
        let error = load("cache:\n  remtoe: s3://bucket\n").unwrap_err();
        assert!(
            error.starts_with("[PROJECT]/.peftpipe/config.yaml: cache: unknown field `remtoe`"),
            "{error}"
        );
        assert!(error.contains("line 2"), "{error}");
    }
}
