//! Which pipeline file a pipeline name belongs to. A pipeline's name keys its lock file (and the
//! publish and failure records beside it), its checkpoint folders and `.peftpipe/out/<name>/`, so
//! two files of one project declaring the same `name:` would read each other's fingerprints as
//! their own, drop each other's lock entries and overwrite each other's published outputs. As DVC
//! refuses two stages writing one output, the name belongs to one file: the lock file records the
//! file that last ran under the name, and a run or plan of another file of the project is refused
//! while the recorded one still declares the name. A renamed file (the recorded one is gone, or
//! declares another name now) takes the name over at its next run. Reads files; writes nothing.

use std::path::{Path, PathBuf};

use super::ExecError;
use crate::cache::LockFile;
use crate::config::Pipeline;

/// How the lock file records `pipeline`'s file: its name (the project directory is the file's
/// directory, so the name is the path relative to it, the same in every checkout).
pub fn owner_key(pipeline: &Pipeline) -> String {
    pipeline
        .file
        .file_name()
        .map(|name| name.to_string_lossy().into_owned())
        .unwrap_or_default()
}

/// Refuse `pipeline` when `lock` (its name's lock file) records another file of its project
/// that still declares the name. A file that cannot be read as YAML is taken to still declare it:
/// nothing of its state is overwritten until it is fixed or renamed.
pub fn check_owner(pipeline: &Pipeline, lock: &LockFile) -> Result<(), ExecError> {
    let Some(owner) = lock.file.as_deref() else {
        return Ok(());
    };
    if owner == owner_key(pipeline) || !is_plain_name(owner) {
        return Ok(());
    }
    let owner_path = pipeline.project_dir.join(owner);
    if !owner_path.is_file() || declared_name(&owner_path).is_some_and(|name| name != pipeline.name)
    {
        return Ok(());
    }
    Err(ExecError::NameTaken {
        name: pipeline.name.clone(),
        owner: shown_beside(&pipeline.file, owner).display().to_string(),
        file: pipeline.file.display().to_string(),
    })
}

/// A file name, not a path (a lock file from elsewhere may hold anything).
fn is_plain_name(name: &str) -> bool {
    let path = Path::new(name);
    !name.is_empty()
        && path
            .file_name()
            .is_some_and(|file| file == path.as_os_str())
}

/// The pipeline name `file` declares (`name:`, else its stem); None when it cannot be read.
fn declared_name(file: &Path) -> Option<String> {
    let (document, _) = crate::config::load::read_document(file).ok()?;
    match document.value.get("name") {
        None => file
            .file_stem()
            .map(|stem| stem.to_string_lossy().into_owned()),
        Some(name) => Some(name.as_str().unwrap_or_default().to_string()),
    }
}

/// `name` in the directory of `file` as it was given.
fn shown_beside(file: &Path, name: &str) -> PathBuf {
    match file.parent() {
        Some(parent) if !parent.as_os_str().is_empty() => parent.join(name),
        _ => PathBuf::from(name),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pipeline(dir: &Path, file: &str, name: &str) -> Pipeline {
        Pipeline {
            name: name.into(),
            file: dir.join(file),
            project_dir: dir.to_path_buf(),
            seed: 0,
            stages: Default::default(),
            overrides: Vec::new(),
        }
    }

    fn owned_by(file: &str) -> LockFile {
        LockFile {
            file: Some(file.into()),
            ..LockFile::empty("reviews")
        }
    }

    #[test]
    fn the_recorded_file_owns_the_name_while_it_declares_it() {
        let dir = tempfile::tempdir().unwrap();
        let variant = pipeline(dir.path(), "variant.yaml", "reviews");
        assert!(check_owner(&variant, &LockFile::empty("reviews")).is_ok());
        assert!(check_owner(&variant, &owned_by("variant.yaml")).is_ok());
        // Gone: renamed, or removed.
        assert!(check_owner(&variant, &owned_by("a.yaml")).is_ok());
        std::fs::write(dir.path().join("a.yaml"), "name: reviews\nstages: {}\n").unwrap();
        let error = check_owner(&variant, &owned_by("a.yaml")).unwrap_err();
        assert!(matches!(error, ExecError::NameTaken { .. }), "{error}");
        // Named after its stem.
        std::fs::write(dir.path().join("reviews.yaml"), "stages: {}\n").unwrap();
        assert!(check_owner(&variant, &owned_by("reviews.yaml")).is_err());
        // Declares another name now.
        std::fs::write(dir.path().join("a.yaml"), "name: other\nstages: {}\n").unwrap();
        assert!(check_owner(&variant, &owned_by("a.yaml")).is_ok());
        // Unreadable: taken to still declare it.
        std::fs::write(dir.path().join("a.yaml"), "name: [unclosed\n").unwrap();
        assert!(check_owner(&variant, &owned_by("a.yaml")).is_err());
        // A recorded path (a lock file from elsewhere) names no file of this project.
        assert!(check_owner(&variant, &owned_by("../a.yaml")).is_ok());
        assert!(check_owner(&variant, &owned_by("")).is_ok());
    }
}
