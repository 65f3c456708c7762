//! Expanding an input path as written in a pipeline (a file, a glob, or a directory of shards)
//! into the files it names, each with a stable, machine-independent key: what the fingerprint
//! hashes and the stage reads, so both see the same files in the same order.
//!
//! Only file-system listing: never opens a file. Reading rows and peeking at columns is the main
//! crate's `data::source` (reached from validation through [`super::probe::Probe`]).

use std::path::{Path, PathBuf};

use super::ingest::InputFormat;
use super::{resolve_path, InputFile};

/// Format from a file's extension.
pub fn format_of(path: &Path) -> Option<InputFormat> {
    let extension = path.extension()?.to_str()?.to_ascii_lowercase();
    match extension.as_str() {
        "parquet" | "pq" => Some(InputFormat::Parquet),
        "jsonl" | "ndjson" | "json" => Some(InputFormat::Jsonl),
        "csv" => Some(InputFormat::Csv),
        _ => None,
    }
}

fn has_glob(text: &str) -> bool {
    text.contains(['*', '?', '['])
}

/// Expand a path as written in the pipeline into its files, sorted by key. The key of each file
/// is the path as written (environment variables unexpanded) plus, for globs and directories,
/// the matched file's path below the written prefix.
pub fn expand_input(project_dir: &Path, written: &str) -> Result<Vec<InputFile>, String> {
    if has_glob(written) {
        // The written prefix up to the last `/` before the first glob character.
        let first_glob = written.find(['*', '?', '[']).unwrap_or(written.len());
        let prefix_end = written[..first_glob].rfind('/').map(|i| i + 1).unwrap_or(0);
        let written_prefix = &written[..prefix_end];
        let resolved_prefix = if written_prefix.is_empty() {
            project_dir.to_path_buf()
        } else {
            resolve_path(project_dir, written_prefix)?
        };
        let pattern = resolve_path(project_dir, written)?;
        let pattern_text = pattern
            .to_str()
            .ok_or_else(|| format!("path `{written}` is not valid UTF-8"))?;
        // A leading dot is matched only when written, as shells do, so a glob and the folder
        // it names read the same files (the folder walk skips hidden files too).
        let options = glob::MatchOptions {
            require_literal_leading_dot: true,
            ..glob::MatchOptions::new()
        };
        let paths = glob::glob_with(pattern_text, options)
            .map_err(|e| format!("bad glob `{written}`: {e}"))?;
        let mut files = Vec::new();
        for entry in paths {
            let path = entry.map_err(|e| format!("cannot read a match of `{written}`: {e}"))?;
            if !path.is_file() {
                continue;
            }
            let relative = path.strip_prefix(&resolved_prefix).unwrap_or(&path);
            files.push(InputFile {
                key: format!("{written_prefix}{}", slash_path(relative)),
                path,
            });
        }
        if files.is_empty() {
            return Err(format!(
                "no file matches `{written}` (resolved to {})",
                pattern.display()
            ));
        }
        files.sort_by(|a, b| a.key.cmp(&b.key));
        return Ok(files);
    }
    let path = resolve_path(project_dir, written)?;
    if path.is_dir() {
        let mut found = Vec::new();
        let mut ancestors = Vec::new();
        collect_dir(&path, &mut ancestors, &mut found)?;
        let base = written.trim_end_matches('/');
        let mut files: Vec<InputFile> = found
            .into_iter()
            .map(|file| {
                let relative = file.strip_prefix(&path).unwrap_or(&file);
                InputFile {
                    key: format!("{base}/{}", slash_path(relative)),
                    path: file,
                }
            })
            .collect();
        if files.is_empty() {
            return Err(format!(
                "directory `{written}` holds no .parquet, .jsonl or .csv file"
            ));
        }
        files.sort_by(|a, b| a.key.cmp(&b.key));
        return Ok(files);
    }
    if path.is_file() {
        return Ok(vec![InputFile {
            key: written.to_string(),
            path,
        }]);
    }
    if path.exists() {
        return Err(format!(
            "input `{written}` is not a regular file or directory (resolved to {}): a device, FIFO or socket cannot be read as a table",
            path.display()
        ));
    }
    Err(format!(
        "input `{written}` does not exist (resolved to {})",
        path.display()
    ))
}

fn slash_path(path: &Path) -> String {
    path.components()
        .map(|c| c.as_os_str().to_string_lossy())
        .collect::<Vec<_>>()
        .join("/")
}

/// The table files under `dir` (hidden `.x` and `_x` entries skipped, as Spark and Hive write
/// them), following symlinks; a folder that links back to one it is inside (a symlink cycle)
/// is an error, never the same rows read again and again. `ancestors` holds the canonical
/// folders being walked.
fn collect_dir(
    dir: &Path,
    ancestors: &mut Vec<PathBuf>,
    found: &mut Vec<PathBuf>,
) -> Result<(), String> {
    let listing = |e: std::io::Error| format!("cannot list {}: {e}", dir.display());
    let canonical = dir.canonicalize().map_err(listing)?;
    if ancestors.contains(&canonical) {
        return Err(format!(
            "{} leads back to {}, a folder it is inside (a symlink cycle): its files would be read again and again",
            dir.display(),
            canonical.display()
        ));
    }
    ancestors.push(canonical);
    for entry in std::fs::read_dir(dir).map_err(listing)? {
        let entry = entry.map_err(listing)?;
        let path = entry.path();
        let name = entry.file_name();
        let name = name.to_string_lossy();
        if name.starts_with('.') || name.starts_with('_') {
            continue;
        }
        if path.is_dir() {
            collect_dir(&path, ancestors, found)?;
        } else if format_of(&path).is_some() {
            found.push(path);
        }
    }
    ancestors.pop();
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[cfg(unix)]
    #[test]
    fn a_symlink_cycle_in_a_folder_input_is_an_error_not_repeated_rows() {
        let dir = tempfile::tempdir().unwrap();
        let shards = dir.path().join("shards");
        std::fs::create_dir_all(shards.join("sub")).unwrap();
        std::fs::write(shards.join("sub/part-0.jsonl"), "{}\n").unwrap();
        std::os::unix::fs::symlink("..", shards.join("sub/loop")).unwrap();
        let error = expand_input(dir.path(), "shards").unwrap_err();
        assert!(error.contains("symlink cycle"), "{error}");
        assert!(error.contains("sub/loop"), "{error}");
    }

    #[test]
    fn a_glob_and_its_folder_read_the_same_files() {
        let dir = tempfile::tempdir().unwrap();
        let shards = dir.path().join("shards");
        std::fs::create_dir_all(&shards).unwrap();
        for name in ["a.jsonl", "b.jsonl", ".hidden.jsonl"] {
            std::fs::write(shards.join(name), "{}\n").unwrap();
        }
        let keys = |written: &str| -> Vec<String> {
            expand_input(dir.path(), written)
                .unwrap()
                .into_iter()
                .map(|file| file.key)
                .collect()
        };
        assert_eq!(keys("shards"), ["shards/a.jsonl", "shards/b.jsonl"]);
        assert_eq!(keys("shards/*.jsonl"), ["shards/a.jsonl", "shards/b.jsonl"]);
        assert_eq!(keys("shards/.hidden.jsonl"), ["shards/.hidden.jsonl"]);
    }
}
