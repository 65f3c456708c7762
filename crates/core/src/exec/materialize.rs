//! Materialization: make a stage's cached output visible at its stable path
//! `.peftpipe/out/<pipeline>/<stage>/` by copying the object's files. The new tree is built
//! beside the old one under a hidden name and swapped in by renames, so readers see the old or
//! the new tree, never a mix.
//!
//! Copies, not hard links: an in-place edit of a published file (an editor that writes through,
//! `>>`, a tool that opens it read-write) must never reach the cache object, which other runs and
//! checkouts restore from. `std::fs::copy` clones the file where the filesystem supports it
//! (copy_file_range reflinks on Btrfs and XFS, clonefile on APFS), so the copy costs no space
//! there and a plain copy elsewhere. The copies keep the objects' read-only permissions as a hint
//! to edit elsewhere; `status` compares them with the object's manifest and `run` replaces a copy
//! that was deleted or changed.

use std::path::Path;

use crate::cache::{remove_path, CacheError};

/// Replace `destination` with a copy of the tree under `source`.
pub fn materialize(source: &Path, destination: &Path) -> Result<(), CacheError> {
    let parent = destination
        .parent()
        .ok_or_else(|| CacheError::Invalid {
            path: destination.to_path_buf(),
            message: "has no parent directory".into(),
        })?
        .to_path_buf();
    std::fs::create_dir_all(&parent).map_err(CacheError::io("create", &parent))?;
    let name = destination
        .file_name()
        .and_then(|name| name.to_str())
        .unwrap_or("stage")
        .to_string();
    remove_leftovers(&parent, &name)?;
    let partial = crate::files::dir_builder()
        .prefix(&format!(".{name}.partial-"))
        .tempdir_in(&parent)
        .map_err(CacheError::io("create a directory in", &parent))?
        .keep();
    copy_tree(source, &partial)?;
    if std::fs::symlink_metadata(destination).is_ok() {
        let old = tempfile::Builder::new()
            .prefix(&format!(".{name}.old-"))
            .tempdir_in(&parent)
            .map_err(CacheError::io("create a directory in", &parent))?
            .keep();
        let moved = old.join("tree");
        std::fs::rename(destination, &moved).map_err(CacheError::io("move away", destination))?;
        std::fs::rename(&partial, destination)
            .map_err(CacheError::io("move into place", destination))?;
        remove_path(&old)?;
    } else {
        std::fs::rename(&partial, destination)
            .map_err(CacheError::io("move into place", destination))?;
    }
    Ok(())
}

/// Remove `.<name>.partial-*` / `.<name>.old-*` left by an interrupted materialization.
fn remove_leftovers(parent: &Path, name: &str) -> Result<(), CacheError> {
    let entries = std::fs::read_dir(parent).map_err(CacheError::io("list", parent))?;
    for entry in entries {
        let entry = entry.map_err(CacheError::io("list", parent))?;
        let file_name = entry.file_name();
        let Some(text) = file_name.to_str() else {
            continue;
        };
        if text.starts_with(&format!(".{name}.partial-"))
            || text.starts_with(&format!(".{name}.old-"))
        {
            remove_path(&entry.path())?;
        }
    }
    Ok(())
}

fn copy_tree(source: &Path, destination: &Path) -> Result<(), CacheError> {
    let entries = std::fs::read_dir(source).map_err(CacheError::io("list", source))?;
    for entry in entries {
        let entry = entry.map_err(CacheError::io("list", source))?;
        let from = entry.path();
        let to = destination.join(entry.file_name());
        let file_type = entry
            .file_type()
            .map_err(CacheError::io("inspect", &from))?;
        if file_type.is_dir() {
            std::fs::create_dir(&to).map_err(CacheError::io("create", &to))?;
            copy_tree(&from, &to)?;
        } else {
            std::fs::copy(&from, &to).map_err(CacheError::io("copy", &from))?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn materialize_replaces_the_previous_tree() {
        let dir = tempfile::tempdir().unwrap();
        let first = dir.path().join("first");
        std::fs::create_dir_all(first.join("sub")).unwrap();
        std::fs::write(first.join("sub/a.txt"), "one").unwrap();
        std::fs::write(first.join("old.txt"), "old").unwrap();
        let second = dir.path().join("second");
        std::fs::create_dir_all(&second).unwrap();
        std::fs::write(second.join("b.txt"), "two").unwrap();

        let out = dir.path().join("out/pipeline/data");
        materialize(&first, &out).unwrap();
        assert_eq!(
            std::fs::read_to_string(out.join("sub/a.txt")).unwrap(),
            "one"
        );
        materialize(&second, &out).unwrap();
        assert_eq!(std::fs::read_to_string(out.join("b.txt")).unwrap(), "two");
        assert!(!out.join("old.txt").exists());
        let siblings: Vec<_> = std::fs::read_dir(out.parent().unwrap())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(siblings, ["data"], "no partial or old tree is left behind");
    }

    #[test]
    fn editing_a_materialized_file_leaves_the_source_intact() {
        let dir = tempfile::tempdir().unwrap();
        let source = dir.path().join("object");
        std::fs::create_dir_all(&source).unwrap();
        std::fs::write(source.join("metrics.json"), "{\"accuracy\": 0.9}").unwrap();
        let out = dir.path().join("out/pipeline/evaluate");
        materialize(&source, &out).unwrap();
        let published = out.join("metrics.json");
        let mut permissions = std::fs::metadata(&published).unwrap().permissions();
        #[expect(
            clippy::permissions_set_readonly_false,
            reason = "the test edits the published copy as a user would"
        )]
        permissions.set_readonly(false);
        std::fs::set_permissions(&published, permissions).unwrap();
        // Write through the existing file (no new inode), as `>>` or an editor saving in place.
        let mut file = std::fs::OpenOptions::new()
            .write(true)
            .open(&published)
            .unwrap();
        std::io::Write::write_all(&mut file, b"{\"accuracy\": 1.0}").unwrap();
        drop(file);
        assert_eq!(
            std::fs::read_to_string(source.join("metrics.json")).unwrap(),
            "{\"accuracy\": 0.9}"
        );
    }

    #[test]
    fn leftovers_of_an_interrupted_swap_are_removed() {
        let dir = tempfile::tempdir().unwrap();
        let source = dir.path().join("source");
        std::fs::create_dir_all(&source).unwrap();
        let parent = dir.path().join("out");
        std::fs::create_dir_all(parent.join(".data.partial-abc")).unwrap();
        materialize(&source, &parent.join("data")).unwrap();
        assert!(!parent.join(".data.partial-abc").exists());
    }
}
