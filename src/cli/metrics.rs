//! `peftpipe metrics show FILE` and `peftpipe metrics diff [--rev REV] FILE [FILE_B]`: each
//! stage's figures as recorded in the pipeline's lock file (its last successful run), shown as
//! a table that names the stages whose figures are stale (the plan finds them dirty), or compared: two pipelines' lock files, or one pipeline's lock file now and as of a
//! git revision (`git show REV:PATH`, so the lock file must be tracked by git at that revision).

use std::path::{Path, PathBuf};
use std::process::Command as Process;

use clap::{Args, Subcommand};

use super::run::{load_pipeline, settings_for};
use super::{Failure, GlobalArgs, PipelineArgs, EXIT_FAILED, EXIT_INVALID, EXIT_OK};
use crate::cache::{Cache, LockFile};
use crate::config::Pipeline;
use crate::report;
use crate::report::metrics::{self as render, Metric};

#[derive(Debug, Subcommand)]
pub enum MetricsCommand {
    /// Each stage's metrics from its last run (the lock file).
    #[command(
        after_help = "Examples:\n  peftpipe metrics show pipelines/quickstart.yaml\n  \
        peftpipe metrics show pipelines/quickstart.yaml --json"
    )]
    Show(ShowArgs),
    /// Compare metrics: two pipelines, or one pipeline now and at a git revision.
    #[command(after_help = "Examples:\n  \
        peftpipe metrics diff pipelines/quickstart.yaml pipelines/quickstart-r16.yaml\n  \
        peftpipe metrics diff --rev HEAD~1 pipelines/quickstart.yaml   # lock file tracked by git\n  \
        peftpipe metrics diff --all --json a.yaml b.yaml")]
    Diff(DiffArgs),
}

#[derive(Debug, Args)]
pub struct ShowArgs {
    #[command(flatten)]
    pub pipeline: PipelineArgs,
}

#[derive(Debug, Args)]
pub struct DiffArgs {
    /// The pipeline (the old side with a second file, else the new side).
    pub pipeline: PathBuf,
    /// The new side: another pipeline file.
    #[arg(conflicts_with = "rev")]
    pub other: Option<PathBuf>,
    /// Compare with the pipeline's lock file as of this git revision (old side).
    #[arg(long, value_name = "GIT_REV")]
    pub rev: Option<String>,
    /// Also list metrics that did not change.
    #[arg(long)]
    pub all: bool,
}

pub fn run(global: &GlobalArgs, command: MetricsCommand) -> u8 {
    match command {
        MetricsCommand::Show(args) => show(global, args),
        MetricsCommand::Diff(args) => diff(global, args),
    }
}

fn show(global: &GlobalArgs, args: ShowArgs) -> u8 {
    let pipeline = match load_pipeline(&args.pipeline, global.json) {
        Ok(pipeline) => pipeline,
        Err(code) => return code,
    };
    let subject = pipeline.file.display().to_string();
    let (mut lock, _) = match read_lock(global, &pipeline) {
        Ok(found) => found,
        Err(failure) => return failure.report(global, &subject),
    };
    // Stages the pipeline no longer has are not its metrics.
    lock.stages
        .retain(|stage, _| pipeline.stages.contains_key(stage));
    // Recorded stages the plan finds dirty: their figures are the last run's, before the
    // changes `status` lists (an edit, `--set`, a changed input).
    let settings = settings_for(global, &pipeline);
    let stale: Vec<String> = match crate::exec::plan::plan_only(&pipeline, &settings) {
        Ok(plan) => plan
            .stages
            .iter()
            .filter(|stage| !stage.freshness.is_fresh() && lock.stages.contains_key(&stage.name))
            .map(|stage| stage.name.clone())
            .collect(),
        Err(error) => {
            // Failed, whatever the error (the figures exist; the plan does not).
            let failure = Failure::exec(&error);
            return Failure::new(EXIT_FAILED, failure.argument, failure.message)
                .report(global, &subject);
        }
    };
    let order = stage_order(&pipeline);
    let metrics = render::metrics_of(&lock, &order);
    let comparisons = render::comparisons_of(&lock, &order);
    if global.json {
        let mut json = render::show_json(&pipeline.name, &metrics);
        // Always there (`{}` without an evaluate stage comparing candidates): one shape.
        json["comparisons"] = render::comparisons_json(&comparisons);
        json["stale"] = serde_json::json!(stale);
        report::json(&json);
    } else {
        let mut text = render::show_text(&pipeline.name, &metrics);
        text.push_str(&render::comparisons_text(&lock, &comparisons));
        if !stale.is_empty() {
            text.push_str(&format!(
                "stale (the figures of the last run, before the changes `peftpipe status` lists): {}\n",
                stale.join(", ")
            ));
        }
        report::write_stdout_raw(&text);
    }
    EXIT_OK
}

fn plain_args(pipeline: &Path) -> PipelineArgs {
    PipelineArgs {
        pipeline: pipeline.to_path_buf(),
        overrides: Vec::new(),
        allow_outside_project: false,
    }
}

fn diff(global: &GlobalArgs, args: DiffArgs) -> u8 {
    let first = match load_pipeline(&plain_args(&args.pipeline), global.json) {
        Ok(pipeline) => pipeline,
        Err(code) => return code,
    };
    let subject = first.file.display().to_string();
    let sides = match (&args.other, &args.rev) {
        (Some(other), _) => {
            let second = match load_pipeline(&plain_args(other), global.json) {
                Ok(pipeline) => pipeline,
                Err(code) => return code,
            };
            both_pipelines(global, &first, &second)
        }
        (None, Some(revision)) => at_revision(global, &first, revision),
        (None, None) => {
            return Failure::new(
                EXIT_INVALID,
                "--rev",
                "metrics diff compares two pipelines or one pipeline with a git revision"
                    .to_string(),
            )
            .with_hint(Some(
                "`peftpipe metrics diff A.yaml B.yaml` or `peftpipe metrics diff --rev HEAD A.yaml`"
                    .to_string(),
            ))
            .report(global, &subject);
        }
    };
    let (old_label, old, new_label, new) = match sides {
        Ok(sides) => sides,
        Err(failure) => return failure.report(global, &subject),
    };
    // A side with no figures at all is a pipeline that never ran (or a revision before it
    // did): every metric "added" or "removed" would hide that.
    for (label, metrics) in [(&old_label, &old), (&new_label, &new)] {
        if metrics.is_empty() {
            return Failure::new(
                EXIT_FAILED,
                "",
                format!(
                    "nothing to compare: `{label}` has no recorded metrics (`peftpipe run` records them)"
                ),
            )
            .report(global, &subject);
        }
    }
    let changes = render::diff(&old, &new);
    if global.json {
        report::json(&render::diff_json(&old_label, &new_label, &changes));
    } else {
        report::write_stdout_raw(&render::diff_text(
            &old_label, &new_label, &changes, args.all,
        ));
    }
    EXIT_OK
}

type Sides = (String, Vec<Metric>, String, Vec<Metric>);

fn both_pipelines(global: &GlobalArgs, old: &Pipeline, new: &Pipeline) -> Result<Sides, Failure> {
    let (old_lock, _) = read_lock(global, old)?;
    let (new_lock, _) = read_lock(global, new)?;
    let mut order = stage_order(new);
    order.extend(stage_order(old));
    let label = |pipeline: &Pipeline| {
        if old.name == new.name {
            pipeline.file.display().to_string()
        } else {
            pipeline.name.clone()
        }
    };
    Ok((
        label(old),
        render::metrics_of(&old_lock, &order),
        label(new),
        render::metrics_of(&new_lock, &order),
    ))
}

fn at_revision(global: &GlobalArgs, pipeline: &Pipeline, revision: &str) -> Result<Sides, Failure> {
    let (new_lock, path) = read_lock(global, pipeline)?;
    let old_lock = lock_at_revision(&path, revision)
        .map_err(|message| Failure::new(EXIT_FAILED, "--rev", message))?;
    let order = stage_order(pipeline);
    Ok((
        revision.to_string(),
        render::metrics_of(&old_lock, &order),
        "workspace".to_string(),
        render::metrics_of(&new_lock, &order),
    ))
}

fn stage_order(pipeline: &Pipeline) -> Vec<String> {
    pipeline.stages.keys().cloned().collect()
}

/// The pipeline's lock file (empty when it never ran) and where it is; a cache that cannot be
/// read is a failure at `--cache-dir`.
fn read_lock(global: &GlobalArgs, pipeline: &Pipeline) -> Result<(LockFile, PathBuf), Failure> {
    let settings = settings_for(global, pipeline);
    let failed = |error: crate::cache::CacheError| {
        Failure::new(EXIT_FAILED, "--cache-dir", error.to_string())
    };
    let cache = Cache::open_for_reading(&settings.cache_dir).map_err(failed)?;
    let path = cache.lock_file_path(&pipeline.name);
    let lock = cache.read_lock_file(&pipeline.name).map_err(failed)?;
    crate::exec::name_owner::check_owner(pipeline, &lock).map_err(|error| Failure::exec(&error))?;
    Ok((lock, path))
}

/// `git show REV:PATH` of a lock file, read from the repository that holds it.
fn lock_at_revision(path: &Path, revision: &str) -> Result<LockFile, String> {
    let directory = path.parent().unwrap_or(Path::new("."));
    let directory = if directory.is_dir() {
        directory.to_path_buf()
    } else {
        PathBuf::from(".")
    };
    let git = |arguments: &[&str]| -> Result<String, String> {
        let output = Process::new("git")
            .arg("-C")
            .arg(&directory)
            .args(arguments)
            .output()
            .map_err(|error| format!("cannot run git: {error}"))?;
        if output.status.success() {
            Ok(String::from_utf8_lossy(&output.stdout).into_owned())
        } else {
            Err(String::from_utf8_lossy(&output.stderr).trim().to_string())
        }
    };
    let top = git(&["rev-parse", "--show-toplevel"]).map_err(|error| {
        format!(
            "{} is not inside a git repository, so `--rev {revision}` has nothing to read ({error})",
            path.display()
        )
    })?;
    let top = PathBuf::from(top.trim());
    let top = std::fs::canonicalize(&top).unwrap_or(top);
    let absolute = resolved(path);
    let relative = absolute.strip_prefix(&top).map_err(|_| {
        format!(
            "{} is outside the git repository {}",
            path.display(),
            top.display()
        )
    })?;
    let spec = format!("{revision}:{}", relative.display());
    let text = git(&["show", &spec]).map_err(|error| {
        format!(
            "cannot read the lock file {} at git revision {revision}: {error}\n  hint: the lock file \
             lives in the cache, which git usually ignores; to compare revisions, commit it (or \
             point --cache-dir at a tracked folder), or compare two pipelines: \
             `peftpipe metrics diff A.yaml B.yaml`",
            relative.display()
        )
    })?;
    serde_json::from_str(&text).map_err(|error| {
        format!(
            "the lock file {} at git revision {revision} is not a lock file: {error}",
            relative.display()
        )
    })
}

/// `path` made absolute with its deepest existing ancestor canonicalized (the rest need not
/// exist yet), so it compares with git's canonical top-level folder.
fn resolved(path: &Path) -> PathBuf {
    let absolute = std::path::absolute(path).unwrap_or_else(|_| path.to_path_buf());
    let mut existing = absolute.as_path();
    let mut rest = Vec::new();
    while !existing.exists() {
        match (existing.parent(), existing.file_name()) {
            (Some(parent), Some(name)) => {
                rest.push(name.to_os_string());
                existing = parent;
            }
            _ => return absolute,
        }
    }
    let mut out = std::fs::canonicalize(existing).unwrap_or_else(|_| existing.to_path_buf());
    for name in rest.iter().rev() {
        out.push(name);
    }
    out
}
