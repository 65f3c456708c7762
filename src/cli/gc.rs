//! `peftpipe gc [FILE]`: drop cache objects that no lock file references (and run records that
//! point at them, and staging leftovers), orphaned training checkpoints (see `cache::gc`), and
//! the leftovers of interrupted publishes: hidden `.<name>.peftpipe-tmp-*` / `-old-*` folders next
//! to FILE's export destinations and interrupted materializations under `.peftpipe/out/`. The
//! cache is `--cache-dir` / `PEFTPIPE_CACHE_DIR`, else `.peftpipe/cache` next to FILE, else
//! `.peftpipe/cache` in the current directory. Waits for the cache lock like `run` does: holding
//! it exclusively, it never removes what a run of this cache is using.

use std::path::{Path, PathBuf};

use clap::Args;

use super::{Failure, GlobalArgs, EXIT_FAILED, EXIT_INVALID, EXIT_OK};
use crate::cache::Cache;
use crate::config::StageConfig;
use crate::report;

#[derive(Debug, Args)]
pub struct GcArgs {
    /// A pipeline file whose default cache (`.peftpipe/cache` next to it) is collected.
    pub pipeline: Option<PathBuf>,
    /// Only report what would be removed.
    #[arg(long)]
    pub dry_run: bool,
}

pub fn run(global: &GlobalArgs, args: GcArgs) -> u8 {
    // A mistyped FILE is an error, not a collection of whatever cache lies next to it.
    if let Some(file) = args.pipeline.as_deref().filter(|file| !file.is_file()) {
        let cause = if file.is_dir() {
            "is a folder, not a pipeline file"
        } else {
            "no such file"
        };
        return Failure::new(EXIT_INVALID, "FILE", format!("{}: {cause}", file.display()))
            .report(global, &file.display().to_string());
    }
    let project_dir = args.pipeline.as_ref().map(|file| {
        file.parent()
            .filter(|parent| !parent.as_os_str().is_empty())
            .map(PathBuf::from)
            .unwrap_or_else(|| PathBuf::from("."))
    });
    let cache_dir = match (&global.cache_dir, &project_dir) {
        (Some(dir), _) => dir.clone(),
        (None, Some(project)) => crate::cache::default_cache_dir(project),
        (None, None) => crate::cache::default_cache_dir(Path::new(".")),
    };
    // Where published outputs are: this project's `.peftpipe/out/` (the project of FILE, or the
    // current directory when the cache is the default one there) and FILE's export folders.
    let project = match (&project_dir, &global.cache_dir) {
        (Some(project), _) => Some(project.clone()),
        (None, None) => Some(PathBuf::from(".")),
        (None, Some(_)) => None,
    };
    let output_roots = project
        .as_deref()
        .map(|project| subfolders(&project.join(".peftpipe").join("out")))
        .unwrap_or_default();
    let publish_parents = match &args.pipeline {
        Some(file) => export_parents(file),
        None => Vec::new(),
    };
    // What a `--json` failure is about: FILE as given, else the cache folder.
    let subject = match &args.pipeline {
        Some(file) => file.display().to_string(),
        None => cache_dir.display().to_string(),
    };
    if !cache_dir.join("objects").is_dir() {
        return Failure::new(
            EXIT_FAILED,
            "--cache-dir",
            format!("no peftpipe cache at `{}`", cache_dir.display()),
        )
        .report(global, &subject);
    }
    let result = Cache::open(&cache_dir).and_then(|cache| {
        let _lock = cache.lock_exclusive(|| {
            report::write_stderr(&format!(
                "waiting for the cache lock on {} (a run is using the cache)",
                cache_dir.display()
            ))
        })?;
        let mut gc = cache.gc(args.dry_run)?;
        gc.publish_leftovers_removed = crate::cache::gc::remove_publish_leftovers(
            &output_roots,
            &publish_parents,
            args.dry_run,
        )?;
        Ok(gc)
    });
    match result {
        Ok(gc) => {
            if global.json {
                report::json(&gc);
            } else if !global.quiet {
                let verb = if gc.dry_run {
                    "would remove"
                } else {
                    "removed"
                };
                report::write_stderr(&format!(
                    "{verb} {} object(s) ({}) and {} run record(s); kept {} object(s) \
                     referenced by {} lock file(s)",
                    gc.objects_removed,
                    report::format::bytes(gc.bytes_removed),
                    gc.run_records_removed,
                    gc.objects_kept,
                    gc.lock_files
                ));
                if gc.checkpoints_removed + gc.checkpoints_kept > 0 {
                    report::write_stderr(&format!(
                        "{verb} {} orphaned checkpoint folder(s) ({}); kept {} of \
                         unfinished stages",
                        gc.checkpoints_removed,
                        report::format::bytes(gc.checkpoint_bytes_removed),
                        gc.checkpoints_kept
                    ));
                }
                if gc.publish_leftovers_removed > 0 {
                    report::write_stderr(&format!(
                        "{verb} {} leftover(s) of interrupted publishes",
                        gc.publish_leftovers_removed
                    ));
                }
            }
            EXIT_OK
        }
        Err(error) => {
            Failure::new(EXIT_FAILED, "--cache-dir", error.to_string()).report(global, &subject)
        }
    }
}

/// The folders directly under `dir` (none when it does not exist).
fn subfolders(dir: &Path) -> Vec<PathBuf> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut folders: Vec<PathBuf> = entries
        .flatten()
        .map(|entry| entry.path())
        .filter(|path| path.is_dir())
        .collect();
    folders.sort();
    folders
}

/// The folders holding the export destinations of the pipeline `file` (where a killed publish
/// leaves its temporaries). A pipeline that does not load only costs a warning.
fn export_parents(file: &Path) -> Vec<PathBuf> {
    let pipeline = match super::run::load_pipeline_file(file, &[]) {
        Ok(pipeline) => pipeline,
        Err(_) => {
            report::warning(&format!(
                "{} does not validate: leftovers next to its export folders are not collected",
                file.display()
            ));
            return Vec::new();
        }
    };
    let mut parents = Vec::new();
    for config in pipeline.stages.values() {
        let StageConfig::Export(export) = config else {
            continue;
        };
        for written in [&export.adapter, &export.merged].into_iter().flatten() {
            let destination = crate::config::resolve_path(&pipeline.project_dir, written);
            if let Some(parent) = destination.ok().as_deref().and_then(Path::parent) {
                if !parents.iter().any(|known: &PathBuf| known == parent) {
                    parents.push(parent.to_path_buf());
                }
            }
        }
    }
    parents
}
