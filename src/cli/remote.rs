//! `peftpipe push [FILE]` / `peftpipe pull [FILE]`: copy the cache to or from a remote (see
//! `cache::remote`). With FILE, that pipeline's lock file and the outputs it names; without,
//! everything in the cache (push) or on the remote (pull). The remote is `--remote URL`, else
//! `PEFTPIPE_REMOTE`, else `cache: {remote: URL}` in `.peftpipe/config.yaml` of the project (FILE's
//! folder, or the current directory). The cache is `--cache-dir` / `PEFTPIPE_CACHE_DIR`, else
//! `.peftpipe/cache` of the project. Both hold the cache's run lock, so `gc` never removes what
//! they are copying.

use std::path::{Path, PathBuf};

use clap::Args;

use super::run::load_pipeline;
use super::{Failure, GlobalArgs, PipelineArgs, EXIT_FAILED, EXIT_INVALID, EXIT_OK};
use crate::cache::remote::{Remote, RemoteError, Scope, SyncReport};
use crate::cache::Cache;
use crate::config::project_config::{project_config_path, ProjectConfig};
use crate::report;

#[derive(Debug, Args)]
pub struct RemoteArgs {
    /// A pipeline file: transfer its lock file and the outputs it names (default: everything).
    pub pipeline: Option<PathBuf>,
    /// The remote: `s3://bucket/prefix`, `gs://bucket/prefix`, `az://container/prefix` (or
    /// `azure://`), `https://host/path` (WebDAV), `file:///path` or a directory (default:
    /// `cache.remote` in `.peftpipe/config.yaml`); credentials: `peftpipe push --help`.
    #[arg(long, env = "PEFTPIPE_REMOTE", value_name = "URL")]
    pub remote: Option<String>,
}

/// `peftpipe push`: the shared arguments and push's own flag (pull refuses it).
#[derive(Debug, Args)]
pub struct PushArgs {
    #[command(flatten)]
    pub common: RemoteArgs,
    /// Also download what the remote already has and send again every object or run record it
    /// holds damaged (what a pull that found corruption asks for). Reads the pushed outputs
    /// back in full.
    #[arg(long)]
    pub verify: bool,
}

/// `peftpipe pull`: the shared arguments and pull's own flag (push refuses it).
#[derive(Debug, Args)]
pub struct PullArgs {
    #[command(flatten)]
    pub common: RemoteArgs,
    /// A pipeline the remote has never seen is a warning, not an error (the first CI job of a
    /// new pipeline). A corrupted or unreachable remote is still an error.
    #[arg(long)]
    pub missing_ok: bool,
}

/// Which way the copy goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Direction {
    Push,
    Pull,
}

/// What the command resolved: the cache, the remote's location and where relative remote paths
/// are resolved from, and the scope.
struct Resolved {
    cache_dir: PathBuf,
    location: String,
    base_dir: PathBuf,
    scope: Scope,
}

pub fn push(global: &GlobalArgs, args: PushArgs) -> u8 {
    transfer(global, &args.common, Direction::Push, args.verify, false)
}

pub fn pull(global: &GlobalArgs, args: PullArgs) -> u8 {
    transfer(
        global,
        &args.common,
        Direction::Pull,
        false,
        args.missing_ok,
    )
}

/// One push or pull; `verify` is push's flag, `missing_ok` pull's.
fn transfer(
    global: &GlobalArgs,
    args: &RemoteArgs,
    direction: Direction,
    verify: bool,
    missing_ok: bool,
) -> u8 {
    let resolved = match resolve(global, args) {
        Ok(resolved) => resolved,
        Err(code) => return code,
    };
    let subject = subject(global, args);
    if direction == Direction::Push && !resolved.cache_dir.join("objects").is_dir() {
        return Failure::new(
            EXIT_FAILED,
            "--cache-dir",
            format!(
                "no peftpipe cache at `{}` (nothing to push)",
                resolved.cache_dir.display()
            ),
        )
        .report(global, &subject);
    }
    let remote = match Remote::open(&resolved.location, &resolved.base_dir) {
        Ok(remote) => remote,
        Err(error) => {
            return Failure::new(EXIT_INVALID, "--remote", error.to_string())
                .report(global, &subject);
        }
    };
    let result = Cache::open(&resolved.cache_dir)
        .map_err(RemoteError::from)
        .and_then(|cache| {
            let _lock = cache.lock_for_run(|| {
                report::write_stderr(&format!(
                    "waiting for the cache lock on {} (gc is running)",
                    resolved.cache_dir.display()
                ))
            })?;
            match direction {
                Direction::Push if verify => remote.push_verified(&cache, &resolved.scope),
                Direction::Push => remote.push(&cache, &resolved.scope),
                Direction::Pull => remote.pull(&cache, &resolved.scope),
            }
        });
    match result {
        Ok(sync) => {
            for skipped in &sync.skipped {
                report::warning(&format!("not pushed: {skipped}"));
            }
            if global.json {
                report::json(&sync);
            } else if !global.quiet {
                report::write_stderr(&summary(&sync, direction));
            }
            EXIT_OK
        }
        Err(error @ RemoteError::NoLockFile { .. })
            if missing_ok && direction == Direction::Pull =>
        {
            let note = format!("nothing pulled: {error}");
            report::warning(&note);
            if global.json {
                report::json(&missing_ok_json(remote.shown(), note));
            }
            EXIT_OK
        }
        Err(error) => {
            // The local cache's side, or the remote's.
            let at = match &error {
                RemoteError::Cache(_)
                | RemoteError::NothingToPush { .. }
                | RemoteError::LocalCorrupted { .. } => "--cache-dir",
                _ => "--remote",
            };
            Failure::new(EXIT_FAILED, at, error.to_string()).report(global, &subject)
        }
    }
}

/// `pull --missing-ok --json` of a pipeline the remote never saw: `pull --json`'s object with
/// nothing copied, `missing: true`, and the warning in `notes`.
fn missing_ok_json(remote: &str, note: String) -> serde_json::Value {
    let nothing = SyncReport {
        remote: remote.to_string(),
        ..SyncReport::default()
    };
    let mut value = serde_json::to_value(&nothing).unwrap_or_default();
    if let Some(fields) = value.as_object_mut() {
        fields.insert("missing".into(), serde_json::Value::Bool(true));
        fields.insert("notes".into(), serde_json::json!([note]));
    }
    value
}

/// What a `--json` failure is about: FILE as given, else the cache folder.
fn subject(global: &GlobalArgs, args: &RemoteArgs) -> String {
    match (&args.pipeline, &global.cache_dir) {
        (Some(file), _) => file.display().to_string(),
        (None, Some(cache_dir)) => cache_dir.display().to_string(),
        (None, None) => crate::cache::default_cache_dir(Path::new("."))
            .display()
            .to_string(),
    }
}

/// `pushed 2 objects (7 files, 1.2 MiB), 2 run records and 1 lock file to `s3://b/p`; 1 object
/// was already there`.
fn summary(sync: &SyncReport, direction: Direction) -> String {
    let (verb, preposition) = match direction {
        Direction::Push => ("pushed", "to"),
        Direction::Pull => ("pulled", "from"),
    };
    let mut text = format!(
        "{verb} {} ({} {}, {}), {} and {} {preposition} `{}`",
        count(sync.objects_copied, "object"),
        sync.files_copied,
        if sync.files_copied == 1 {
            "file"
        } else {
            "files"
        },
        report::format::bytes(sync.bytes_copied),
        count(sync.run_records_copied, "run record"),
        count(sync.lock_files_written, "lock file"),
        sync.remote
    );
    if !sync.repaired.is_empty() {
        text.push_str(&format!(
            "; repaired on the remote: {}",
            sync.repaired.join(", ")
        ));
    }
    if sync.objects_present > 0 {
        let there = match direction {
            Direction::Push => "the remote had",
            Direction::Pull => "the cache had",
        };
        text.push_str(&format!(
            "; {there} {} already",
            count(sync.objects_present, "object")
        ));
    }
    text
}

fn count(n: usize, noun: &str) -> String {
    if n == 1 {
        format!("1 {noun}")
    } else {
        format!("{n} {noun}s")
    }
}

fn resolve(global: &GlobalArgs, args: &RemoteArgs) -> Result<Resolved, u8> {
    let (project_dir, scope, default_cache) = match &args.pipeline {
        Some(file) => {
            let pipeline = load_pipeline(
                &PipelineArgs {
                    pipeline: file.clone(),
                    overrides: Vec::new(),
                    allow_outside_project: true,
                },
                global.json,
            )?;
            let cache_dir = super::run::settings_for(global, &pipeline).cache_dir;
            (
                pipeline.project_dir.clone(),
                Scope::Pipeline(pipeline.name.clone()),
                cache_dir,
            )
        }
        None => {
            let project = PathBuf::from(".");
            let cache_dir = global
                .cache_dir
                .clone()
                .unwrap_or_else(|| crate::cache::default_cache_dir(&project));
            (project, Scope::All, cache_dir)
        }
    };
    // Where the remote comes from decides what a relative directory is relative to: the
    // current directory for the flag and the variable, the project for its config file.
    if let Some(location) = args.remote.clone().filter(|text| !text.is_empty()) {
        return Ok(Resolved {
            cache_dir: default_cache,
            location,
            base_dir: PathBuf::from("."),
            scope,
        });
    }
    let config = ProjectConfig::load(&project_dir).map_err(|message| {
        Failure::new(EXIT_INVALID, "--remote", message).report(global, &subject(global, args))
    })?;
    match config.cache.remote {
        Some(location) => Ok(Resolved {
            cache_dir: default_cache,
            location,
            base_dir: project_dir,
            scope,
        }),
        None => Err(Failure::new(
            EXIT_INVALID,
            "--remote",
            format!(
                "no remote: pass `--remote URL`, set PEFTPIPE_REMOTE, or add `cache: {{remote: \
                 URL}}` to `{}`",
                show(&project_config_path(&project_dir))
            ),
        )
        .report(global, &subject(global, args))),
    }
}

fn show(path: &Path) -> String {
    path.strip_prefix(".").unwrap_or(path).display().to_string()
}
