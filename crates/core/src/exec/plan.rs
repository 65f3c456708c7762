//! Planning: for each selected stage, its fingerprint and whether it is Fresh (its output can be
//! restored from the cache) or Dirty (with every reason). Used by `status` and `run --dry-run`
//! as the answer, and by the runner as the starting point (the runner re-decides each stage once
//! its upstream stages are done, so a rebuilt upstream with identical output keeps the stage
//! fresh). Planning hashes input files (through the size+mtime index) and reads the lock file;
//! it runs no stage code and loads no weights.

use std::collections::{BTreeMap, BTreeSet};

use serde::Serialize;

use super::{graph, ExecError, RunSettings};
use crate::cache::{Cache, FileIndex, LockEntry, LockFile};
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
}

/// Whether a stage must run.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(tag = "state", rename_all = "snake_case")]
pub enum Freshness {
    Fresh(CachedOutput),
    Dirty { reasons: Vec<DirtyReason> },
}

impl Freshness {
    pub fn is_fresh(&self) -> bool {
        matches!(self, Freshness::Fresh(_))
    }
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

/// Decide a stage whose fingerprint is complete (every upstream digest known).
pub fn decide(
    cache: &Cache,
    previous: Option<&LockEntry>,
    fingerprint: &StageFingerprint,
    forced: bool,
) -> Freshness {
    if forced {
        return Freshness::Dirty {
            reasons: vec![DirtyReason::Forced],
        };
    }
    let digest = fingerprint.digest();
    if let Some(entry) = previous.filter(|entry| entry.fingerprint == digest) {
        return if cache.has_object(&entry.output) {
            Freshness::Fresh(CachedOutput {
                output: entry.output.clone(),
                outcome: entry.outcome.clone(),
                wall_time_seconds: entry.wall_time_seconds,
                from_run_cache: false,
            })
        } else {
            Freshness::Dirty {
                reasons: vec![DirtyReason::OutputMissing],
            }
        };
    }
    if let Some(record) = cache.run_record(&digest) {
        if cache.has_object(&record.output) {
            return Freshness::Fresh(CachedOutput {
                output: record.output,
                outcome: record.outcome,
                wall_time_seconds: record.wall_time_seconds,
                from_run_cache: true,
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

/// Input file digests of a stage, through the index.
pub fn input_digests(
    pipeline: &Pipeline,
    name: &str,
    config: &StageConfig,
    index: &mut FileIndex,
) -> Result<BTreeMap<String, String>, ExecError> {
    let files = config
        .spec()
        .input_files(&pipeline.project_dir)
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
pub fn make_plan(
    pipeline: &Pipeline,
    cache: &Cache,
    lock: &LockFile,
    index: &mut FileIndex,
    selected: &[String],
    forced: &BTreeSet<String>,
    device: Option<&str>,
) -> Result<Plan, ExecError> {
    let mut stages: Vec<StagePlan> = Vec::with_capacity(selected.len());
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
            match planned.map(|stage| &stage.freshness) {
                Some(Freshness::Fresh(cached)) => {
                    upstream_digests.insert(upstream_name.clone(), cached.output.clone());
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
        let freshness =
            if dirty_upstream.is_empty() || forced_here {
                decide(cache, previous, &fingerprint, forced_here)
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
        stages.push(StagePlan {
            name: name.clone(),
            kind: config.kind().as_str().to_string(),
            upstream,
            inputs,
            fingerprint,
            freshness,
        });
    }
    Ok(Plan {
        pipeline: pipeline.name.clone(),
        stages,
    })
}

/// Plan without running or locking anything (`status`, `run --dry-run`). Creates the cache
/// directory if needed and updates the size+mtime index.
pub fn plan_only(pipeline: &Pipeline, settings: &RunSettings) -> Result<Plan, ExecError> {
    let cache = Cache::open(&settings.cache_dir)?;
    let order = graph::topological_order(&pipeline.stages)?;
    let selected = graph::select(&pipeline.stages, &order, &settings.targets)?;
    let lock = cache.read_lock_file(&pipeline.name)?;
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
    )?;
    index.save()?;
    Ok(plan)
}

/// The stages `--force` applies to: the targets, or every selected stage without `--stage`.
pub fn forced_stages(settings: &RunSettings, selected: &[String]) -> BTreeSet<String> {
    if !settings.force {
        BTreeSet::new()
    } else if settings.targets.is_empty() {
        selected.iter().cloned().collect()
    } else {
        settings.targets.iter().cloned().collect()
    }
}
