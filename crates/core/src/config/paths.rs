//! The path policy, one rule for every file a pipeline reads as a template and every folder it
//! publishes to: it must resolve — symbolic links included — inside the project directory (the
//! pipeline file's directory tree), unless the user passes `--allow-outside-project`. Template
//! files are `prompt_file`, `completion_file` and whatever `{% include %}`, `{% import %}`,
//! `{% from %}` and `{% extends %}` load; export destinations are `adapter` and `merged`.
//! Input data and models are not templates and are read wherever they are (`${PEFTPIPE_SHARED}`,
//! the Hugging Face cache), and so is a chat template's `tokenizer_config`, which belongs to a
//! model folder.
//!
//! Validation applies the rule (`config::load`) so a refusal comes before anything runs; the
//! template stage applies it again when it loads templates and the export stage when it
//! publishes. Also reading template files, bounded: a template file is a regular file of at
//! most [`MAX_TEMPLATE_FILE_BYTES`]. Only file-system metadata and template files are read here.

use std::io::Read as _;
use std::path::{Component, Path, PathBuf};

use super::export::escape_reason;
use super::resolve_path;

/// Largest template file read (bytes).
pub const MAX_TEMPLATE_FILE_BYTES: u64 = 4 << 20;

/// What to say when a path is refused.
const FLAG_HINT: &str = "pass --allow-outside-project to allow it";

/// Resolve a template file as written (environment variables expanded, relative to the project
/// directory) and refuse it when it resolves outside the project directory — by an absolute
/// path, `..` or a symbolic link — unless `allow_outside`. `what` names it in the message
/// (`prompt_file`, `the included template`). A file that does not exist is not refused here:
/// reading it says so.
pub fn confine_template(
    project_dir: &Path,
    written: &str,
    what: &str,
    allow_outside: bool,
) -> Result<PathBuf, String> {
    let path = resolve_path(project_dir, written)?;
    if allow_outside {
        return Ok(path);
    }
    let project = canonical_project(project_dir)?;
    let resolved = canonicalize_lenient(&path)?;
    if resolved.starts_with(&project) {
        return Ok(path);
    }
    let how = if written_escapes(written) {
        ""
    } else {
        " through a symbolic link"
    };
    Err(format!(
        "{what} `{written}` resolves{how} to {}, outside the project directory {} ({FLAG_HINT})",
        resolved.display(),
        project.display()
    ))
}

/// Resolve an export destination as written and refuse one that leaves the project directory —
/// through `..`, an absolute path or a symbolic link, or that is itself a symbolic link — unless
/// `allow_outside`. Even then, never the project directory, one of its ancestors or the
/// filesystem root: publishing replaces the destination as a whole.
pub fn confine_destination(
    project_dir: &Path,
    written: &str,
    allow_outside: bool,
) -> Result<PathBuf, String> {
    let expanded = super::expand_env(written)?;
    if !allow_outside {
        if let Some(reason) = escape_reason(&expanded) {
            return Err(format!(
                "export destination {reason}: it would leave the project directory {} ({FLAG_HINT})",
                project_dir.display()
            ));
        }
    }
    let destination = if Path::new(&expanded).is_absolute() {
        PathBuf::from(&expanded)
    } else {
        project_dir.join(&expanded)
    };
    let project = canonical_project(project_dir)?;
    let resolved = canonicalize_lenient(&destination)?;
    if project.starts_with(&resolved) {
        return Err(format!(
            "export destination `{written}` is the project directory or one of its parents: \
             publishing replaces the destination as a whole"
        ));
    }
    if !allow_outside {
        if !resolved.starts_with(&project) {
            return Err(format!(
                "export destination `{written}` resolves (through a symbolic link) to {}, outside \
                 the project directory {} ({FLAG_HINT})",
                resolved.display(),
                project.display()
            ));
        }
        if std::fs::symlink_metadata(&destination).is_ok_and(|m| m.file_type().is_symlink()) {
            return Err(format!(
                "export destination `{written}` is a symbolic link ({FLAG_HINT})"
            ));
        }
    }
    Ok(destination)
}

/// Read a template file: a regular file (not a directory, device or pipe) of at most
/// [`MAX_TEMPLATE_FILE_BYTES`], UTF-8. Errors are messages naming `written` and the cause.
pub fn read_template_file(path: &Path, written: &str) -> Result<String, String> {
    let cannot = |cause: String| {
        format!(
            "cannot read template {written} ({}): {cause}",
            path.display()
        )
    };
    let file = std::fs::File::open(path).map_err(|e| cannot(e.to_string()))?;
    let metadata = file.metadata().map_err(|e| cannot(e.to_string()))?;
    if !metadata.is_file() {
        return Err(cannot("not a regular file".to_string()));
    }
    let mut bytes = Vec::new();
    file.take(MAX_TEMPLATE_FILE_BYTES + 1)
        .read_to_end(&mut bytes)
        .map_err(|e| cannot(e.to_string()))?;
    if bytes.len() as u64 > MAX_TEMPLATE_FILE_BYTES {
        return Err(cannot(format!(
            "larger than {} MiB, the most a template file may hold",
            MAX_TEMPLATE_FILE_BYTES >> 20
        )));
    }
    String::from_utf8(bytes).map_err(|_| cannot("not UTF-8 text".to_string()))
}

/// Whether the path as written leaves its base by itself (absolute, `~`, or `..` components).
fn written_escapes(written: &str) -> bool {
    let path = Path::new(written);
    written.starts_with(['~', '$'])
        || path.is_absolute()
        || path.components().any(|c| {
            matches!(
                c,
                Component::ParentDir | Component::RootDir | Component::Prefix(_)
            )
        })
}

fn canonical_project(project_dir: &Path) -> Result<PathBuf, String> {
    project_dir.canonicalize().map_err(|error| {
        format!(
            "cannot resolve the project directory {}: {error}",
            project_dir.display()
        )
    })
}

/// Canonicalize the longest existing ancestor of `path` and append the rest lexically (`..`
/// pops), so symbolic links in existing parents are resolved even when the path does not exist.
pub fn canonicalize_lenient(path: &Path) -> Result<PathBuf, String> {
    let mut existing = path.to_path_buf();
    let mut rest = Vec::new();
    loop {
        if std::fs::symlink_metadata(&existing).is_ok() {
            break;
        }
        match (existing.file_name(), existing.parent()) {
            (Some(name), Some(parent)) => {
                rest.push(name.to_os_string());
                existing = parent.to_path_buf();
            }
            _ => break,
        }
    }
    let mut resolved = existing
        .canonicalize()
        .map_err(|error| format!("cannot resolve {}: {error}", existing.display()))?;
    for name in rest.into_iter().rev() {
        resolved.push(name);
    }
    Ok(resolved)
}

#[cfg(test)]
mod tests {
    use std::fs;

    use super::*;

    fn project() -> (tempfile::TempDir, PathBuf) {
        let root = tempfile::tempdir().unwrap();
        let project = root.path().join("project");
        fs::create_dir_all(project.join("prompts")).unwrap();
        fs::write(project.join("prompts/p.j2"), "{{ text }}").unwrap();
        fs::write(root.path().join("secret.txt"), "outside").unwrap();
        (root, project)
    }

    #[test]
    fn templates_inside_the_project_are_accepted() {
        let (_root, project) = project();
        let path = confine_template(&project, "prompts/p.j2", "prompt_file", false).unwrap();
        assert_eq!(path, project.join("prompts/p.j2"));
        // `..` that stays inside is fine; a missing file is for the reader to report.
        assert!(confine_template(&project, "prompts/../prompts/p.j2", "x", false).is_ok());
        assert!(confine_template(&project, "prompts/missing.j2", "x", false).is_ok());
    }

    #[test]
    fn absolute_parent_and_symlinked_escapes_are_refused_unless_allowed() {
        let (root, project) = project();
        let secret = root.path().join("secret.txt");
        std::os::unix::fs::symlink(&secret, project.join("link.j2")).unwrap();
        std::os::unix::fs::symlink(root.path(), project.join("up")).unwrap();
        let absolute = secret.display().to_string();
        for (written, via_link) in [
            (absolute.as_str(), false),
            ("../secret.txt", false),
            ("link.j2", true),
            ("up/secret.txt", true),
        ] {
            let error = confine_template(&project, written, "prompt_file", false).unwrap_err();
            assert!(
                error.contains("outside the project directory"),
                "{written}: {error}"
            );
            assert!(
                error.contains("--allow-outside-project"),
                "{written}: {error}"
            );
            assert!(
                error.starts_with(&format!("prompt_file `{written}` resolves")),
                "{error}"
            );
            assert_eq!(
                error.contains("symbolic link"),
                via_link,
                "{written}: {error}"
            );
            assert!(confine_template(&project, written, "prompt_file", true).is_ok());
        }
    }

    #[test]
    fn destinations_follow_the_export_rule() {
        let (root, project) = project();
        assert_eq!(
            confine_destination(&project, "out/adapter", false).unwrap(),
            project.join("out/adapter")
        );
        for escaping in ["../elsewhere", "/tmp/peftpipe-export-test", "out/../../x"] {
            let error = confine_destination(&project, escaping, false).unwrap_err();
            assert!(
                error.contains("--allow-outside-project"),
                "{escaping}: {error}"
            );
        }
        let outside = root.path().join("outside");
        fs::create_dir_all(&outside).unwrap();
        std::os::unix::fs::symlink(&outside, project.join("link")).unwrap();
        let error = confine_destination(&project, "link/adapter", false).unwrap_err();
        assert!(error.contains("symbolic link"), "{error}");
        assert!(confine_destination(&project, "../elsewhere", true).is_ok());
        assert!(confine_destination(&project, "link/adapter", true).is_ok());
        assert!(confine_destination(&project, "..", true).is_err());
        assert!(confine_destination(&project, "/", true).is_err());
    }

    #[test]
    fn template_files_are_read_bounded_and_only_when_regular() {
        let (root, project) = project();
        assert_eq!(
            read_template_file(&project.join("prompts/p.j2"), "prompts/p.j2").unwrap(),
            "{{ text }}"
        );
        let error = read_template_file(&project.join("prompts"), "prompts").unwrap_err();
        assert!(error.contains("not a regular file"), "{error}");
        let error = read_template_file(Path::new("/dev/zero"), "/dev/zero").unwrap_err();
        assert!(error.contains("not a regular file"), "{error}");
        let big = root.path().join("big.j2");
        fs::write(&big, vec![b'x'; (MAX_TEMPLATE_FILE_BYTES + 1) as usize]).unwrap();
        let error = read_template_file(&big, "big.j2").unwrap_err();
        assert!(error.contains("larger than 4 MiB"), "{error}");
    }
}
