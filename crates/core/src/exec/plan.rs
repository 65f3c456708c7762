//! Planning: for each selected stage, its fingerprint and whether it is Fresh (its output can be
//! restored from the cache) or Dirty (with every reason). A stage is only fresh when its cached
//! object is complete (manifest, every file and size; `--verify`: every hash) and, for `status`,
//! when its published copies (`.peftpipe/out/<pipeline>/<stage>/`, export folders) are what was
//! published; a stale copy makes it dirty with a reason while its output stays known downstream. Used by `status` and `run --dry-run`
//! as the answer, and by the runner as the starting point (the runner re-decides each stage once
//! its upstream stages are done, so a rebuilt upstream with identical output keeps the stage
//! fresh). Planning hashes input files (through the size+mtime index) and reads the lock file;
//! it runs no stage code and loads no weights.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

use serde::Serialize;

use super::{graph, ExecError, RunSettings};
use crate::cache::{Cache, FailureRecord, FileIndex, LockEntry, LockFile};
use crate::config::{Pipeline, StageConfig};
use crate::fingerprint::{DirtyReason, StageFingerprint};

/// An output the cache can supply.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct CachedOutput {
    /// Output digest.
    pub output: String,
    /// The figures the stage reported when it produced this output.
    pub outcome: BTreeMap<String, serde_json::Value>,
    /// Seconds the run that produced it took.
    pub wall_time_seconds: f64,
    /// Found through the run cache (an earlier fingerprint) rather than the lock file.
    pub from_run_cache: bool,
    /// The output is intact in the cache but its published copies are not (deleted, edited,
    /// overwritten, or never published in this checkout): the stage is not rerun, its output is
    /// published again, and until then it counts as dirty for these reasons.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub republish: Vec<DirtyReason>,
}

/// Whether a stage must run.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(tag = "state", rename_all = "snake_case")]
pub enum Freshness {
    Fresh(CachedOutput),
    Dirty { reasons: Vec<DirtyReason> },
}

impl Freshness {
    /// Nothing to do: restored from the cache and published as it should be.
    pub fn is_fresh(&self) -> bool {
        matches!(self, Freshness::Fresh(cached) if cached.republish.is_empty())
    }

    /// The output digest the cache supplies (also when only its publication is stale).
    pub fn cached_output(&self) -> Option<&str> {
        match self {
            Freshness::Fresh(cached) => Some(&cached.output),
            Freshness::Dirty { .. } => None,
        }
    }
}

/// How much of a cached object `status` checks before calling a stage fresh.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ObjectCheck {
    /// The manifest names the object and every file is there with its size (metadata only).
    #[default]
    Sizes,
    /// Also rehash every file (`status --verify`).
    Hash,
}

/// What a plan checks beyond fingerprints.
#[derive(Debug, Clone, Copy, Default)]
pub struct PlanChecks<'a> {
    pub objects: ObjectCheck,
    /// Check the published copies of fresh outputs: `<out_root>/<stage>/` and the stage's
    /// declared destinations (export folders). `None`: skip (the runner republishes itself).
    pub out_root: Option<&'a Path>,
}

/// One stage of a plan.
#[derive(Debug, Clone, Serialize)]
pub struct StagePlan {
    pub name: String,
    pub kind: String,
    /// Upstream stage names.
    pub upstream: Vec<String>,
    /// Input file key → content digest.
    pub inputs: BTreeMap<String, String>,
    /// The fingerprint as far as known (the upstream digest of a dirty upstream stage is its
    /// previous one until it has run).
    pub fingerprint: StageFingerprint,
    pub freshness: Freshness,
    /// How the last run with this very fingerprint ended, when it failed and nothing has
    /// succeeded since (a dirty stage only).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub last_failure: Option<FailureRecord>,
}

/// The plan of a run: the selected stages in topological order.
#[derive(Debug, Clone, Serialize)]
pub struct Plan {
    pub pipeline: String,
    pub stages: Vec<StagePlan>,
}

impl Plan {
    pub fn all_fresh(&self) -> bool {
        self.stages.iter().all(|stage| stage.freshness.is_fresh())
    }

    pub fn stage(&self, name: &str) -> Option<&StagePlan> {
        self.stages.iter().find(|stage| stage.name == name)
    }
}

/// Decide a stage whose fingerprint is complete (every upstream digest known). The cached
/// object is checked as `check` says: an incomplete or corrupted object is never fresh.
pub fn decide(
    cache: &Cache,
    previous: Option<&LockEntry>,
    fingerprint: &StageFingerprint,
    forced: bool,
    check: ObjectCheck,
) -> Freshness {
    if forced {
        return Freshness::Dirty {
            reasons: vec![DirtyReason::Forced],
        };
    }
    let digest = fingerprint.digest();
    if let Some(entry) = previous.filter(|entry| entry.fingerprint == digest) {
        return match object_problem(cache, &entry.output, check) {
            None => Freshness::Fresh(CachedOutput {
                output: entry.output.clone(),
                outcome: entry.outcome.clone(),
                wall_time_seconds: entry.wall_time_seconds,
                from_run_cache: false,
                republish: Vec::new(),
            }),
            Some(reason) => Freshness::Dirty {
                reasons: vec![reason],
            },
        };
    }
    if let Some(record) = cache.run_record(&digest) {
        if object_problem(cache, &record.output, check).is_none() {
            return Freshness::Fresh(CachedOutput {
                output: record.output,
                outcome: record.outcome,
                wall_time_seconds: record.wall_time_seconds,
                from_run_cache: true,
                republish: Vec::new(),
            });
        }
    }
    let reasons = match previous {
        None => vec![DirtyReason::NeverRun],
        Some(entry) => {
            let reasons = fingerprint.diff(&entry.components);
            if reasons.is_empty() {
                // Equal components but another digest: the stored digest was computed by a
                // different encoding.
                vec![DirtyReason::FingerprintVersionChanged {
                    old: entry.components.version,
                    new: fingerprint.version,
                }]
            } else {
                reasons
            }
        }
    };
    Freshness::Dirty { reasons }
}

/// Why the cached object `output` cannot be restored, if it cannot: missing, or failing `check`.
fn object_problem(cache: &Cache, output: &str, check: ObjectCheck) -> Option<DirtyReason> {
    if !cache.object_dir(output).exists() {
        return Some(DirtyReason::OutputMissing);
    }
    match cache.check_object(output, check == ObjectCheck::Hash) {
        Ok(Ok(_)) => None,
        Ok(Err(corruption)) => Some(DirtyReason::OutputCorrupted {
            detail: corruption.detail,
        }),
        Err(error) => Some(DirtyReason::OutputCorrupted {
            detail: error.to_string(),
        }),
    }
}

/// Why the published copies of a fresh stage's output are stale (empty: they are as published):
/// see [`materialized_problem`] and [`destination_problems`].
pub fn publication_problems(
    cache: &Cache,
    pipeline: &Pipeline,
    name: &str,
    config: &StageConfig,
    output: &str,
    out_root: &Path,
    index: &mut FileIndex,
) -> Result<Vec<DirtyReason>, ExecError> {
    let manifest = match cache.check_object(output, false)? {
        Ok(manifest) => manifest,
        // Decided fresh a moment ago: a concurrent gc or edit, which restoring will find.
        Err(_) => return Ok(Vec::new()),
    };
    let stage_dir = out_root.join(crate::cache::sanitize_name(name));
    let mut reasons: Vec<DirtyReason> =
        materialized_problem(&pipeline.project_dir, &manifest, &stage_dir, index)?
            .into_iter()
            .collect();
    reasons.extend(destination_problems(
        cache, pipeline, name, config, output, index,
    )?);
    Ok(reasons)
}

/// Whether `stage_dir` (`.peftpipe/out/<pipeline>/<stage>/`) holds exactly the object's files:
/// paths and sizes, then blake3 through the size+mtime index (so an unchanged copy costs one
/// `stat` per file once the index knows it).
pub fn materialized_problem(
    project_dir: &Path,
    manifest: &crate::cache::Manifest,
    stage_dir: &Path,
    index: &mut FileIndex,
) -> Result<Option<DirtyReason>, ExecError> {
    let mut digest_of = |path: &Path| index.digest(path);
    Ok(manifest
        .compare_directory(stage_dir, Some(&mut digest_of))?
        .map(|detail| DirtyReason::PublishedOutputStale {
            path: show_path(project_dir, stage_dir),
            detail,
        }))
}

/// Whether every declared destination of the stage (export folders) holds what the last
/// publish of `output` wrote there in this checkout, as recorded in
/// [`crate::cache::PublishedFile`] (same files, sizes and blake3, through the index).
pub fn destination_problems(
    cache: &Cache,
    pipeline: &Pipeline,
    name: &str,
    config: &StageConfig,
    output: &str,
    index: &mut FileIndex,
) -> Result<Vec<DirtyReason>, ExecError> {
    let mut reasons = Vec::new();
    let destinations = config
        .spec()
        .published_paths(&pipeline.project_dir)
        .map_err(|message| ExecError::Input {
            stage: name.to_string(),
            message,
        })?;
    if destinations.is_empty() {
        return Ok(reasons);
    }
    let published = cache.read_published(&pipeline.name)?;
    let record = published
        .stages
        .get(name)
        .filter(|record| record.output == output);
    // A record of this checkout's destinations (a copied project's names other folders, and
    // says so below).
    let this_checkout = record.filter(|record| {
        destinations.iter().all(|destination| {
            record
                .destinations
                .contains_key(&destination.display().to_string())
        })
    });
    if let Some(record) = this_checkout {
        for (key, new) in config.spec().publish_context(pipeline) {
            match record.context.get(&key) {
                Some(old) if *old == new => {}
                old => reasons.push(DirtyReason::PublishContextChanged {
                    key,
                    old: old.cloned().unwrap_or_else(|| "nothing recorded".into()),
                    new,
                }),
            }
        }
    }
    for destination in destinations {
        let shown = show_path(&pipeline.project_dir, &destination);
        let key = destination.display().to_string();
        let Some(expected) = record.and_then(|record| record.destinations.get(&key)) else {
            reasons.push(DirtyReason::PublishedOutputStale {
                path: shown,
                detail: "was not published from this output in this checkout".into(),
            });
            continue;
        };
        let mut digest_of = |path: &Path| index.digest(path);
        if let Some(detail) = expected.compare_published(&destination, Some(&mut digest_of))? {
            reasons.push(DirtyReason::PublishedOutputStale {
                path: shown,
                detail,
            });
        }
    }
    Ok(reasons)
}

/// A path relative to the project directory when inside it, else as is.
pub fn show_path(project_dir: &Path, path: &Path) -> String {
    path.strip_prefix(project_dir)
        .map(|relative| relative.display().to_string())
        .unwrap_or_else(|_| path.display().to_string())
}

/// Input file digests of a stage, through the index.
pub fn input_digests(
    pipeline: &Pipeline,
    name: &str,
    config: &StageConfig,
    index: &mut FileIndex,
) -> Result<BTreeMap<String, String>, ExecError> {
    let files = config
        .spec()
        .fingerprint_inputs(&pipeline.project_dir)
        .map_err(|message| ExecError::Input {
            stage: name.to_string(),
            message,
        })?;
    let mut digests = BTreeMap::new();
    for file in files {
        let digest = index.digest(&file.path).map_err(|error| ExecError::Input {
            stage: name.to_string(),
            message: error.to_string(),
        })?;
        digests.insert(file.key, digest);
    }
    Ok(digests)
}

/// Plan the given stages (topological order). `forced` stages are dirty with reason `forced`;
/// `device` is the run's `--device` override (see [`StageFingerprint::with_device_override`]).
#[expect(
    clippy::too_many_arguments,
    reason = "the plan's whole context, each a different record"
)]
pub fn make_plan(
    pipeline: &Pipeline,
    cache: &Cache,
    lock: &LockFile,
    index: &mut FileIndex,
    selected: &[String],
    forced: &BTreeSet<String>,
    device: Option<&str>,
    checks: PlanChecks<'_>,
) -> Result<Plan, ExecError> {
    let mut stages: Vec<StagePlan> = Vec::with_capacity(selected.len());
    let mut failures = cache.read_failures(&pipeline.name).stages;
    for name in selected {
        let Some(config) = pipeline.stages.get(name) else {
            return Err(ExecError::Graph(format!(
                "stage `{name}` is not in the pipeline"
            )));
        };
        let upstream = graph::upstream_names(config);
        let inputs = input_digests(pipeline, name, config, index)?;
        let previous = lock.stages.get(name);
        let mut dirty_upstream = Vec::new();
        let mut upstream_digests = BTreeMap::new();
        for upstream_name in &upstream {
            let planned = stages.iter().find(|stage| &stage.name == upstream_name);
            match planned.and_then(|stage| stage.freshness.cached_output()) {
                Some(output) => {
                    // Known, also when only its publication is stale (republishing keeps it).
                    upstream_digests.insert(upstream_name.clone(), output.to_string());
                }
                _ => {
                    // Unknown until the upstream stage runs: compare the rest against the
                    // previous run by assuming the previous digest.
                    dirty_upstream.push(upstream_name.clone());
                    let assumed = previous
                        .and_then(|entry| entry.components.upstream.get(upstream_name))
                        .cloned()
                        .unwrap_or_else(|| "pending".to_string());
                    upstream_digests.insert(upstream_name.clone(), assumed);
                }
            }
        }
        let fingerprint = StageFingerprint::new(
            name,
            config,
            upstream_digests,
            inputs.clone(),
            pipeline.seed,
        )
        .with_device_override(device);
        let forced_here = forced.contains(name);
        let mut freshness =
            if dirty_upstream.is_empty() || forced_here {
                decide(cache, previous, &fingerprint, forced_here, checks.objects)
            } else {
                let mut reasons: Vec<DirtyReason> = Vec::new();
                match previous {
                    None => reasons.push(DirtyReason::NeverRun),
                    Some(entry) => {
                        reasons.extend(dirty_upstream.iter().map(|stage| {
                            DirtyReason::UpstreamDirty {
                                stage: stage.clone(),
                            }
                        }));
                        reasons.extend(fingerprint.diff(&entry.components));
                    }
                }
                Freshness::Dirty { reasons }
            };
        if let (Some(out_root), Freshness::Fresh(cached)) = (checks.out_root, &mut freshness) {
            // A run-cache hit too: its published copies may hold another configuration's
            // output until `run` restores and republishes it.
            cached.republish = publication_problems(
                cache,
                pipeline,
                name,
                config,
                &cached.output,
                out_root,
                index,
            )?;
        }
        let last_failure = failures
            .remove(name)
            .filter(|failure| !freshness.is_fresh() && failure.fingerprint == fingerprint.digest());
        stages.push(StagePlan {
            name: name.clone(),
            kind: config.kind().as_str().to_string(),
            upstream,
            inputs,
            fingerprint,
            freshness,
            last_failure,
        });
    }
    Ok(Plan {
        pipeline: pipeline.name.clone(),
        stages,
    })
}

/// Plan without running or locking anything (`status`, `run --dry-run`): fingerprints, cached
/// objects checked for completeness (sizes), published copies checked. Creates the cache
/// directory if needed and updates the size+mtime index.
pub fn plan_only(pipeline: &Pipeline, settings: &RunSettings) -> Result<Plan, ExecError> {
    plan_checked(pipeline, settings, ObjectCheck::Sizes)
}

/// [`plan_only`] checking cached objects as `objects` says (`status --verify`: rehash).
pub fn plan_checked(
    pipeline: &Pipeline,
    settings: &RunSettings,
    objects: ObjectCheck,
) -> Result<Plan, ExecError> {
    // Planning only reads: a missing cache is an empty one, and stays missing.
    let cache = Cache::open_for_reading(&settings.cache_dir)?;
    let order = graph::topological_order(&pipeline.stages)?;
    let selected = graph::select(&pipeline.stages, &order, &settings.targets)?;
    let lock = cache.read_lock_file(&pipeline.name)?;
    super::name_owner::check_owner(pipeline, &lock)?;
    let mut index = FileIndex::load(&cache);
    let forced = forced_stages(settings, &selected);
    let plan = make_plan(
        pipeline,
        &cache,
        &lock,
        &mut index,
        &selected,
        &forced,
        settings.options.device.as_deref(),
        PlanChecks {
            objects,
            out_root: Some(&settings.out_root),
        },
    )?;
    if cache.exists() {
        index.save()?;
    }
    Ok(plan)
}

/// The stages `--force` applies to: the targets, or every selected stage without `--stage`.
pub fn forced_stages(settings: &RunSettings, selected: &[String]) -> BTreeSet<String> {
    if !settings.force {
        BTreeSet::new()
    } else if settings.targets.is_empty() {
        selected.iter().cloned().collect()
    } else {
        // A target naming a matrix stage forces each of its expansions.
        selected
            .iter()
            .filter(|name| {
                settings.targets.iter().any(|target| {
                    *name == target
                        || name
                            .strip_prefix(target.as_str())
                            .is_some_and(|rest| rest.starts_with('@'))
                })
            })
            .cloned()
            .collect()
    }
}
