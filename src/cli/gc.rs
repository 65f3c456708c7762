//! `peftpipe gc [FILE]`: drop cache objects that no lock file references (and run records that
//! point at them, and staging leftovers), orphaned training checkpoints (see `cache::gc`), the
//! leftovers of interrupted publishes: hidden `.<name>.peftpipe-tmp-*` / `-old-*` folders next
//! to FILE's export destinations and interrupted materializations under `.peftpipe/out/`, and the
//! `.peftpipe/out/<pipeline>/<stage>/` folders of stages their pipeline no longer has (FILE's
//! pipeline judged by FILE, the project's others by their lock files). The
//! cache is `--cache-dir` / `PEFTPIPE_CACHE_DIR`, else `.peftpipe/cache` next to FILE, else
//! `.peftpipe/cache` in the current directory. Waits for the cache lock like `run` does: holding
//! it exclusively, it never removes what a run of this cache is using.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use clap::Args;

use super::{Failure, GlobalArgs, EXIT_FAILED, EXIT_INVALID, EXIT_OK};
use crate::cache::{sanitize_name, Cache, CacheError};
use crate::config::{Pipeline, StageConfig};
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
    let file_pipeline = args.pipeline.as_deref().and_then(load_for_gc);
    let publish_parents = file_pipeline
        .as_ref()
        .map(export_parents)
        .unwrap_or_default();
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
        if let Some(project) = &project {
            let (owners, protected) = output_owners(&cache, project, file_pipeline.as_ref())?;
            let out_tree = project.join(".peftpipe").join("out");
            let stale = crate::cache::gc::remove_stale_outputs(
                &out_tree,
                &owners,
                &protected,
                args.dry_run,
            )?;
            gc.stale_outputs_removed = stale.len();
            gc.stale_output_bytes_removed = stale.iter().map(|(_, bytes)| bytes).sum();
            gc.stale_outputs = stale
                .iter()
                .map(|(path, _)| {
                    let shown = path.strip_prefix(project).unwrap_or(path);
                    shown.display().to_string()
                })
                .collect();
        }
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
                if gc.stale_outputs_removed > 0 {
                    report::write_stderr(&format!(
                        "{verb} {} published folder(s) of stages their pipeline no longer has \
                         ({}): {}",
                        gc.stale_outputs_removed,
                        report::format::bytes(gc.stale_output_bytes_removed),
                        gc.stale_outputs.join(", ")
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

/// The pipeline `file`, when it validates; a pipeline that does not only costs a warning.
fn load_for_gc(file: &Path) -> Option<Pipeline> {
    match super::run::load_pipeline_file(file, &[]) {
        Ok(pipeline) => Some(pipeline),
        Err(_) => {
            report::warning(&format!(
                "{} does not validate: leftovers next to its export folders are not collected, \
                 and its published stage folders are judged by its lock file",
                file.display()
            ));
            None
        }
    }
}

/// The folders holding the export destinations of `pipeline` (where a killed publish leaves its
/// temporaries).
fn export_parents(pipeline: &Pipeline) -> Vec<PathBuf> {
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

/// Pipeline folder under `.peftpipe/out/` → the folders of the stages it has.
type Owners = BTreeMap<String, BTreeSet<String>>;

/// Which stage folders of `project`'s `.peftpipe/out/` are owned (pipeline folder → its stages'
/// folders), and the export destinations no collection may touch. FILE's pipeline (when it owns
/// its name, see `exec::name_owner`) owns its stages as the file declares them now; another
/// pipeline the stages its lock file records, when that lock file was written by a file of this
/// project (a shared cache holds other projects' lock files, and older lock files name no file).
/// Protected: FILE's declared destinations and every destination a publish recorded.
fn output_owners(
    cache: &Cache,
    project: &Path,
    file_pipeline: Option<&Pipeline>,
) -> Result<(Owners, Vec<PathBuf>), CacheError> {
    let folders = |names: &mut dyn Iterator<Item = &String>| -> BTreeSet<String> {
        names.map(|name| sanitize_name(name)).collect()
    };
    let mut owners = BTreeMap::new();
    let mut protected = Vec::new();
    for (_, lock) in cache.all_lock_files()? {
        for record in cache.read_published(&lock.pipeline)?.stages.values() {
            protected.extend(record.destinations.keys().map(PathBuf::from));
        }
        let ours = lock
            .file
            .as_deref()
            .is_some_and(|file| project.join(file).is_file());
        if ours && !lock.stages.is_empty() {
            owners.insert(
                sanitize_name(&lock.pipeline),
                folders(&mut lock.stages.keys()),
            );
        }
    }
    if let Some(pipeline) = file_pipeline {
        let lock = cache.read_lock_file(&pipeline.name)?;
        if crate::exec::name_owner::check_owner(pipeline, &lock).is_ok() {
            owners.insert(
                sanitize_name(&pipeline.name),
                folders(&mut pipeline.stages.keys()),
            );
        }
        for config in pipeline.stages.values() {
            if let Ok(paths) = config.spec().published_paths(&pipeline.project_dir) {
                protected.extend(paths);
            }
        }
    }
    Ok((owners, protected))
}
