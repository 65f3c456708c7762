//! The runner: takes the cache lock (shared with runs of other pipelines, exclusive of gc) and
//! the pipeline's own lock, plans, then walks the selected stages in topological order.
//! A stage starts once all its upstream stages are done; it is then re-decided with their actual
//! output digests and either restored (digest-checked; its copies under `.peftpipe/out` and its
//! published destinations replaced only where they differ from what was published) or run in a
//! fresh staging directory and stored, copied out and published (what publishing wrote to the
//! stage's destinations is recorded in the cache for `status`). Up to `jobs` stages are in flight at once (scoped threads),
//! and at most one of them per GPU (a stage that computes on a GPU holds its slot, see
//! [`super::slots`]; a stage waiting for a GPU does not hold back the stages after it).
//!
//! Failure policy: after a stage fails, or after Ctrl-C, no new stage starts; stages already
//! running finish (and are stored when they succeed); the rest are reported as skipped. The lock
//! file is rewritten (atomically) after every stage, so whatever finished before a crash is kept
//! and nothing unfinished is ever recorded.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use super::materialize::materialize;
use super::plan::{
    decide, destination_problems, forced_stages, make_plan, materialized_problem, CachedOutput,
    Freshness, ObjectCheck, PlanChecks, StagePlan,
};
use super::slots::{device_slot, Slots};
use super::stage::{Progress, ProgressSink, StageContext, StageError, StageOutcome};
use super::{
    graph, CacheUse, EventSink, ExecError, ExecEvent, RunSettings, RunSummary, StageBuilder,
    StageReport, StageStatus, STAGE_DELAY_ENV,
};
use crate::cache::{Cache, FileIndex, LockEntry, Manifest, PublishedRecord, RunRecord};
use crate::config::{Pipeline, StageConfig};
use crate::fingerprint::{DirtyReason, StageFingerprint};

/// Run a pipeline. Stage failures are in the summary; `Err` means nothing could start.
pub fn execute(
    pipeline: &Pipeline,
    settings: &RunSettings,
    builder: &StageBuilder<'_>,
    events: &dyn EventSink,
    cancel: &AtomicBool,
) -> Result<RunSummary, ExecError> {
    let started = Instant::now();
    let cache = Cache::open(&settings.cache_dir)?;
    // Shared with runs of other pipelines, exclusive of gc; then this pipeline's own lock.
    let _cache_lock = cache.lock_for_run(|| {
        events.event(ExecEvent::WaitingForLock {
            cache: settings.cache_dir.clone(),
        })
    })?;
    let _pipeline_lock = cache.lock_pipeline(&pipeline.name, || {
        events.event(ExecEvent::WaitingForPipeline {
            pipeline: pipeline.name.clone(),
            cache: settings.cache_dir.clone(),
        })
    })?;
    let order = graph::topological_order(&pipeline.stages)?;
    let selected = graph::select(&pipeline.stages, &order, &settings.targets)?;
    let mut lock_file = cache.read_lock_file(&pipeline.name)?;
    super::name_owner::check_owner(pipeline, &lock_file)?;
    // Recorded with the first stage this run records (a renamed file takes the name over).
    let owner = Some(super::name_owner::owner_key(pipeline));
    let mut owner_changed = lock_file.file != owner;
    lock_file.file = owner;
    lock_file
        .stages
        .retain(|name, _| pipeline.stages.contains_key(name));
    let mut index = FileIndex::load(&cache);
    let forced = forced_stages(settings, &selected);
    let device = settings.options.device.as_deref();
    let plan = make_plan(
        pipeline,
        &cache,
        &lock_file,
        &mut index,
        &selected,
        &forced,
        device,
        PlanChecks::default(),
    )?;
    index.save()?;
    events.event(ExecEvent::Planned {
        stages: plan
            .stages
            .iter()
            .map(|stage| (stage.name.clone(), stage.kind.clone()))
            .collect(),
    });

    let count = plan.stages.len();
    let mut states: Vec<State> = vec![State::Waiting; count];
    let mut reports: Vec<Option<StageReport>> = vec![None; count];
    let mut interrupted = false;
    let mut failed = false;
    let jobs = settings.jobs.max(1);
    let delay = stage_delay();
    // The device slot each running stage holds (see `super::slots`).
    let mut slots = Slots::default();
    let mut held: Vec<Option<String>> = vec![None; count];
    let mut told_to_wait = vec![false; count];
    // The fingerprint digest each started stage runs with (for the failure record).
    let mut digests: Vec<Option<String>> = vec![None; count];

    std::thread::scope(|scope| {
        let (sender, receiver) = mpsc::channel::<(usize, JobResult)>();
        let mut running = 0usize;
        loop {
            if cancel.load(Ordering::SeqCst) && !interrupted {
                interrupted = true;
                events.event(ExecEvent::Interrupting);
            }
            if !interrupted && !failed {
                for position in 0..count {
                    if running >= jobs {
                        break;
                    }
                    if states[position] != State::Waiting {
                        continue;
                    }
                    let stage_plan = &plan.stages[position];
                    let Some(upstream) = upstream_outputs(&plan.stages, &states, stage_plan) else {
                        continue;
                    };
                    let Some(config) = pipeline.stages.get(&stage_plan.name) else {
                        continue;
                    };
                    // A GPU another stage holds: wait for it (later stages may still start).
                    let slot = device_slot(config, device);
                    if let Err(holder) = slots.take(slot.as_deref(), &stage_plan.name) {
                        if !told_to_wait[position] {
                            told_to_wait[position] = true;
                            events.event(ExecEvent::StageNote {
                                stage: stage_plan.name.clone(),
                                message: format!(
                                    "waits for {}, which {holder} is using",
                                    slot.as_deref().unwrap_or_default()
                                ),
                            });
                        }
                        continue;
                    }
                    held[position] = slot;
                    let fingerprint = StageFingerprint::new(
                        &stage_plan.name,
                        config,
                        upstream.clone(),
                        stage_plan.inputs.clone(),
                        pipeline.seed,
                    )
                    .with_device_override(device);
                    let forced_here = forced.contains(&stage_plan.name);
                    let freshness = decide(
                        &cache,
                        lock_file.stages.get(&stage_plan.name),
                        &fingerprint,
                        forced_here,
                        ObjectCheck::Sizes,
                    );
                    states[position] = State::Running;
                    digests[position] = Some(fingerprint.digest());
                    running += 1;
                    let upstream_outcomes = upstream
                        .keys()
                        .filter_map(|name| {
                            let entry = lock_file.stages.get(name)?;
                            Some((name.clone(), entry.outcome.clone()))
                        })
                        .collect();
                    let job = Job {
                        upstream_outcomes,
                        watched: watched_inputs(&plan.stages, position),
                        name: stage_plan.name.clone(),
                        kind: stage_plan.kind.clone(),
                        config,
                        fingerprint,
                        freshness,
                        forced: forced_here,
                        upstream,
                    };
                    let sender = sender.clone();
                    let cache = &cache;
                    let delay = delay.clone();
                    scope.spawn(move || {
                        let result = run_job(
                            job, pipeline, settings, cache, builder, events, cancel, delay,
                        );
                        // The receiver outlives every job (same scope).
                        let _ = sender.send((position, result));
                    });
                }
            }
            if running == 0 {
                break;
            }
            let (position, result) = match receiver.recv_timeout(Duration::from_millis(50)) {
                Ok(message) => message,
                Err(mpsc::RecvTimeoutError::Timeout) => continue,
                Err(mpsc::RecvTimeoutError::Disconnected) => break,
            };
            running -= 1;
            slots.release(held[position].take().as_deref());
            let mut report = result.report;
            if let Some(record) = result.published.filter(|_| settings.record) {
                // Written here, one job at a time: the record file is read-modify-write.
                if let Err(error) = cache.record_published(&pipeline.name, &report.name, record) {
                    report.status = StageStatus::Failed;
                    report.error = Some(error.to_string());
                }
            }
            match (&report.status, result.lock_entry) {
                (StageStatus::Fresh | StageStatus::Ran, Some(entry)) => {
                    let output = entry.output.clone();
                    let changed =
                        owner_changed || lock_file.stages.get(&report.name) != Some(&entry);
                    lock_file.stages.insert(report.name.clone(), entry);
                    let written = if changed && settings.record {
                        owner_changed = false;
                        cache.write_lock_file(&lock_file)
                    } else {
                        Ok(())
                    };
                    match written {
                        Ok(()) => {
                            states[position] = State::Done(output);
                            // Stages below it that still wait for others (training) check
                            // what they can already: a setting the data refutes fails the
                            // run now, before those start.
                            for waiting in 0..count {
                                let stage_plan = &plan.stages[waiting];
                                if states[waiting] != State::Waiting
                                    || !stage_plan.upstream.contains(&report.name)
                                {
                                    continue;
                                }
                                let Some(message) = check_upstream_early(
                                    pipeline,
                                    settings,
                                    &cache,
                                    builder,
                                    events,
                                    cancel,
                                    &plan.stages,
                                    &states,
                                    stage_plan,
                                ) else {
                                    continue;
                                };
                                let early = not_started(stage_plan, StageStatus::Failed, message);
                                states[waiting] = State::Failed;
                                failed = true;
                                events.event(ExecEvent::StageFinished(early.clone()));
                                reports[waiting] = Some(early);
                            }
                        }
                        Err(error) => {
                            report.status = StageStatus::Failed;
                            report.error = Some(error.to_string());
                            states[position] = State::Failed;
                            failed = true;
                        }
                    }
                }
                (StageStatus::Cancelled, _) => {
                    states[position] = State::Failed;
                    interrupted = true;
                }
                _ => {
                    states[position] = State::Failed;
                    failed = true;
                }
            }
            if settings.record {
                remember_failure(
                    &cache,
                    &pipeline.name,
                    &report,
                    digests[position].take(),
                    events,
                );
            }
            events.event(ExecEvent::StageFinished(report.clone()));
            reports[position] = Some(report);
        }
    });

    // Whatever did not start is skipped, with the reason.
    for position in 0..count {
        if reports[position].is_some() {
            continue;
        }
        let stage_plan = &plan.stages[position];
        let blocker = stage_plan.upstream.iter().find(|name| {
            plan.stages
                .iter()
                .position(|stage| &stage.name == *name)
                .is_some_and(|index| states[index] == State::Failed)
        });
        let error = match (blocker, interrupted) {
            (Some(name), _) => format!("not run: upstream stage {name} did not finish"),
            (None, true) => "not run: interrupted".to_string(),
            (None, false) => "not run: an earlier stage failed".to_string(),
        };
        states[position] = State::Failed;
        let report = not_started(stage_plan, StageStatus::Skipped, error);
        events.event(ExecEvent::StageFinished(report.clone()));
        reports[position] = Some(report);
    }

    Ok(RunSummary {
        pipeline: pipeline.name.clone(),
        stages: reports.into_iter().flatten().collect(),
        interrupted,
        wall_time: started.elapsed(),
    })
}

/// The report of a stage that never started: `status` with `error`, no cache use, no output.
fn not_started(stage: &StagePlan, status: StageStatus, error: String) -> StageReport {
    StageReport {
        name: stage.name.clone(),
        kind: stage.kind.clone(),
        status,
        cache: CacheUse::None,
        reasons: Vec::new(),
        wall_time: Duration::ZERO,
        outcome: BTreeMap::new(),
        output: None,
        output_dir: None,
        error: Some(error),
    }
}

/// A waiting stage's [`Stage::check_upstream`](super::stage::Stage::check_upstream) over the
/// upstream artifacts that exist while some are still to come: its error, placed in the pipeline
/// file, or None (passed, nothing to check yet, or every upstream is done and `run` checks).
#[expect(
    clippy::too_many_arguments,
    reason = "the scheduler's context, read only"
)]
fn check_upstream_early(
    pipeline: &Pipeline,
    settings: &RunSettings,
    cache: &Cache,
    builder: &StageBuilder<'_>,
    events: &dyn EventSink,
    cancel: &AtomicBool,
    stages: &[StagePlan],
    states: &[State],
    stage: &StagePlan,
) -> Option<String> {
    let mut upstream = BTreeMap::new();
    for name in &stage.upstream {
        let index = stages.iter().position(|other| &other.name == name)?;
        if let State::Done(output) = &states[index] {
            upstream.insert(name.clone(), cache.object_data(output));
        }
    }
    if upstream.len() == stage.upstream.len() {
        return None;
    }
    let config = pipeline.stages.get(&stage.name)?;
    let built = builder(&stage.name, config).ok()?;
    let sink = StageSink {
        stage: &stage.name,
        events,
    };
    let out_dir = settings
        .out_root
        .join(crate::cache::sanitize_name(&stage.name));
    let context = StageContext {
        name: &stage.name,
        project_dir: &pipeline.project_dir,
        out_dir: &out_dir,
        upstream: &upstream,
        upstream_outcomes: &BTreeMap::new(),
        inputs: &BTreeMap::new(),
        seed: pipeline.seed,
        progress: &sink,
        cancel,
        options: &settings.options,
        fingerprint: "",
        checkpoint_dir: None,
        resume: true,
    };
    match built.check_upstream(&context) {
        Ok(()) | Err(StageError::Cancelled) => None,
        Err(error) => Some(upstream_problem(pipeline, &stage.name, &error)),
    }
}

/// A [`Stage::check_upstream`](super::stage::Stage::check_upstream) error placed in the pipeline
/// file: `pipeline.yaml: stages.<name>.<key path>: message` (an internal error as it is).
fn upstream_problem(pipeline: &Pipeline, name: &str, error: &StageError) -> String {
    match error {
        StageError::User(message) => {
            format!("{}: stages.{name}.{message}", pipeline.file.display())
        }
        other => other.to_string(),
    }
}

/// Keep how a failed stage ended (so `status` and `report` can say so), or forget an earlier
/// failure once the stage has succeeded. The record is a diagnostic: not writing it fails
/// nothing, the run is told.
fn remember_failure(
    cache: &Cache,
    pipeline: &str,
    report: &StageReport,
    fingerprint: Option<String>,
    events: &dyn EventSink,
) {
    let record = match report.status {
        StageStatus::Fresh | StageStatus::Ran => None,
        StageStatus::Failed => match fingerprint {
            Some(fingerprint) => Some(crate::cache::FailureRecord {
                fingerprint,
                error: report.error.clone().unwrap_or_default(),
                wall_time_seconds: report.wall_time.as_secs_f64(),
                failed_at: std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map_or(0, |since| since.as_secs()),
            }),
            None => return,
        },
        // Interrupted or never started: says nothing about the stage.
        StageStatus::Cancelled | StageStatus::Skipped => return,
    };
    if let Err(error) = cache.record_failure(pipeline, &report.name, record) {
        events.event(ExecEvent::StageNote {
            stage: report.name.clone(),
            message: format!("cannot update the failure record: {error}"),
        });
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum State {
    Waiting,
    Running,
    /// Finished with this output digest.
    Done(String),
    /// Failed, cancelled or skipped.
    Failed,
}

/// Upstream name → output digest, once every upstream stage is done.
fn upstream_outputs(
    stages: &[StagePlan],
    states: &[State],
    stage: &StagePlan,
) -> Option<BTreeMap<String, String>> {
    let mut out = BTreeMap::new();
    for name in &stage.upstream {
        let index = stages.iter().position(|other| &other.name == name)?;
        match &states[index] {
            State::Done(output) => {
                out.insert(name.clone(), output.clone());
            }
            _ => return None,
        }
    }
    Some(out)
}

struct Job<'a> {
    name: String,
    kind: String,
    config: &'a StageConfig,
    fingerprint: StageFingerprint,
    freshness: Freshness,
    /// `--force` applies: the stage recomputes from scratch (resumes no checkpoint).
    forced: bool,
    /// Upstream name → output digest.
    upstream: BTreeMap<String, String>,
    /// Upstream name → the outcome recorded with its output (see `StageContext`).
    upstream_outcomes: BTreeMap<String, BTreeMap<String, serde_json::Value>>,
    /// This stage and every planned stage above it, each with the input digests the plan
    /// hashed: checked again before the output is stored (see [`inputs_changed`]).
    watched: Vec<(String, BTreeMap<String, String>)>,
}

struct JobResult {
    report: StageReport,
    lock_entry: Option<LockEntry>,
    /// What this job published to the stage's destinations (when it published).
    published: Option<PublishedRecord>,
}

/// Forwards a running stage's progress to the event stream.
struct StageSink<'a> {
    stage: &'a str,
    events: &'a dyn EventSink,
}

impl ProgressSink for StageSink<'_> {
    fn progress(&self, progress: Progress) {
        self.events.event(ExecEvent::StageProgress {
            stage: self.stage.to_string(),
            progress,
        });
    }

    fn note(&self, message: String) {
        self.events.event(ExecEvent::StageNote {
            stage: self.stage.to_string(),
            message,
        });
    }

    fn warning(&self, message: String) {
        self.events.event(ExecEvent::StageWarning {
            stage: self.stage.to_string(),
            message,
        });
    }
}

/// What every [`StageContext`] of one job shares.
struct ContextParts<'a> {
    name: &'a str,
    pipeline: &'a Pipeline,
    upstream: &'a BTreeMap<String, PathBuf>,
    upstream_outcomes: &'a BTreeMap<String, BTreeMap<String, serde_json::Value>>,
    inputs: &'a BTreeMap<String, String>,
    sink: &'a StageSink<'a>,
    cancel: &'a AtomicBool,
    settings: &'a RunSettings,
    /// Digest of the stage's fingerprint, and its checkpoint directory in the cache.
    fingerprint: &'a str,
    checkpoint_dir: &'a std::path::Path,
    resume: bool,
}

impl<'a> ContextParts<'a> {
    fn context(&'a self, dir: &'a std::path::Path) -> StageContext<'a> {
        StageContext {
            name: self.name,
            project_dir: &self.pipeline.project_dir,
            out_dir: dir,
            upstream: self.upstream,
            upstream_outcomes: self.upstream_outcomes,
            inputs: self.inputs,
            seed: self.pipeline.seed,
            progress: self.sink,
            cancel: self.cancel,
            options: &self.settings.options,
            fingerprint: self.fingerprint,
            checkpoint_dir: Some(self.checkpoint_dir),
            resume: self.resume,
        }
    }
}

#[expect(
    clippy::too_many_arguments,
    reason = "one job carries the whole run context"
)]
fn run_job(
    job: Job<'_>,
    pipeline: &Pipeline,
    settings: &RunSettings,
    cache: &Cache,
    builder: &StageBuilder<'_>,
    events: &dyn EventSink,
    cancel: &AtomicBool,
    delay: Option<(String, Duration)>,
) -> JobResult {
    let started = Instant::now();
    let upstream: BTreeMap<String, PathBuf> = job
        .upstream
        .iter()
        .map(|(name, digest)| (name.clone(), cache.object_data(digest)))
        .collect();
    let out_dir = settings
        .out_root
        .join(crate::cache::sanitize_name(&job.name));
    let sink = StageSink {
        stage: &job.name,
        events,
    };
    let stage = match builder(&job.name, job.config) {
        Ok(stage) => stage,
        Err(error) => {
            return failed(&job, started, Vec::new(), error.to_string(), false);
        }
    };
    let fingerprint_digest = job.fingerprint.digest();
    let checkpoint_dir = cache.checkpoint_dir(&pipeline.name, &job.name, &fingerprint_digest);
    let parts = ContextParts {
        name: &job.name,
        pipeline,
        upstream: &upstream,
        upstream_outcomes: &job.upstream_outcomes,
        inputs: &job.fingerprint.inputs,
        sink: &sink,
        cancel,
        settings,
        fingerprint: &fingerprint_digest,
        checkpoint_dir: &checkpoint_dir,
        resume: !job.forced,
    };
    let context = |dir| parts.context(dir);

    let reasons = match &job.freshness {
        Freshness::Fresh(cached) => match cache.verify_object(&cached.output) {
            Ok(Ok(_)) if !settings.record => {
                return fresh(&job, cached, started, out_dir);
            }
            Ok(Ok(manifest)) => {
                let source = cache.object_data(&cached.output);
                let republished = republish(
                    &job,
                    pipeline,
                    cache,
                    &manifest,
                    &source,
                    &out_dir,
                    events,
                    || stage.publish(&source, &context(&source)),
                );
                return match republished {
                    Ok(published) => {
                        let mut result = fresh(&job, cached, started, out_dir);
                        result.published = published;
                        result
                    }
                    Err(message) => failed(&job, started, Vec::new(), message, false),
                };
            }
            Ok(Err(corruption)) => {
                events.event(ExecEvent::StageNote {
                    stage: job.name.clone(),
                    message: format!(
                        "cached output is corrupted ({}); rebuilding",
                        corruption.detail
                    ),
                });
                if let Err(error) = cache.remove_object(&cached.output) {
                    return failed(&job, started, Vec::new(), error.to_string(), false);
                }
                vec![DirtyReason::OutputCorrupted {
                    detail: corruption.detail,
                }]
            }
            Err(error) => return failed(&job, started, Vec::new(), error.to_string(), false),
        },
        Freshness::Dirty { reasons } => reasons.clone(),
    };

    events.event(ExecEvent::StageStarted {
        stage: job.name.clone(),
        kind: job.kind.clone(),
        reasons: reasons.clone(),
    });
    let staging = match cache.staging_dir(&job.name) {
        Ok(staging) => staging,
        Err(error) => return failed(&job, started, reasons, error.to_string(), false),
    };
    let data = staging.join("data");
    if let Err(error) = std::fs::create_dir_all(&data) {
        return failed(&job, started, reasons, error.to_string(), false);
    }
    // The checks `check_upstream` made early, now over every upstream artifact: the same error
    // whether or not the stages it waited for ran in this run.
    if let Err(error) = stage.check_upstream(&context(&data)) {
        let _ = crate::cache::remove_path(&staging);
        let cancelled = matches!(error, StageError::Cancelled);
        let message = upstream_problem(pipeline, &job.name, &error);
        return failed(&job, started, reasons, message, cancelled);
    }
    let outcome =
        std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| stage.run(&context(&data))))
            .unwrap_or_else(|panic| {
                let message = panic
                    .downcast_ref::<&str>()
                    .map(|text| text.to_string())
                    .or_else(|| panic.downcast_ref::<String>().cloned())
                    .unwrap_or_else(|| "unknown panic".to_string());
                Err(StageError::Internal(format!(
                    "the stage panicked: {message}"
                )))
            });
    let outcome = outcome.and_then(|outcome| {
        hold_for_tests(&job.name, &delay, cancel)?;
        Ok(outcome)
    });
    let outcome: StageOutcome = match outcome {
        Ok(outcome) => outcome,
        Err(error) => {
            let _ = crate::cache::remove_path(&staging);
            let cancelled = matches!(error, StageError::Cancelled);
            return failed(&job, started, reasons, error.to_string(), cancelled);
        }
    };
    // The stage read its inputs after the plan hashed them: an input edited in between would
    // be stored under the old content's fingerprint (and restored once the edit is undone).
    if let Some(changed) = inputs_changed(pipeline, cache, &job.watched) {
        let _ = crate::cache::remove_path(&staging);
        return failed(&job, started, reasons, changed, false);
    }
    let stored = cache.store(&staging).and_then(|(output, _manifest)| {
        let source = cache.object_data(&output);
        if settings.record {
            materialize(&source, &out_dir)?;
        }
        Ok((output, source))
    });
    let (output, source) = match stored {
        Ok(stored) => stored,
        Err(error) => {
            let _ = crate::cache::remove_path(&staging);
            return failed(&job, started, reasons, error.to_string(), false);
        }
    };
    let published = if settings.record {
        if let Err(error) = stage.publish(&source, &context(&source)) {
            return failed(&job, started, reasons, error.to_string(), false);
        }
        match record_destinations(&job, pipeline, &output) {
            Ok(published) => published,
            Err(message) => return failed(&job, started, reasons, message, false),
        }
    } else {
        None
    };
    let wall_time = started.elapsed();
    let record = RunRecord {
        output: output.clone(),
        outcome: outcome.summary.clone(),
        wall_time_seconds: wall_time.as_secs_f64(),
    };
    if let Err(error) = cache.put_run_record(&fingerprint_digest, &record) {
        return failed(&job, started, reasons, error.to_string(), false);
    }
    JobResult {
        report: StageReport {
            name: job.name.clone(),
            kind: job.kind.clone(),
            status: StageStatus::Ran,
            cache: CacheUse::Miss,
            reasons,
            wall_time,
            outcome: outcome.summary.clone(),
            output: Some(output.clone()),
            output_dir: Some(out_dir),
            error: None,
        },
        lock_entry: Some(LockEntry {
            fingerprint: fingerprint_digest,
            components: job.fingerprint,
            output,
            outcome: outcome.summary,
            wall_time_seconds: wall_time.as_secs_f64(),
        }),
        published,
    }
}

/// Make a restored output's published copies whole again: `out_dir` is copied afresh when it
/// differs from the object, and the stage publishes again (then recorded) when a destination
/// differs from what was last published there (a stage that declares no destinations publishes
/// on every restore, as it cannot be checked). Copies that are as published are left alone
/// (no rewrite of gigabytes on every run). Each republish is noted with its reason.
#[expect(
    clippy::too_many_arguments,
    reason = "the restore path's whole context"
)]
fn republish(
    job: &Job<'_>,
    pipeline: &Pipeline,
    cache: &Cache,
    manifest: &Manifest,
    source: &std::path::Path,
    out_dir: &std::path::Path,
    events: &dyn EventSink,
    publish: impl FnOnce() -> Result<(), StageError>,
) -> Result<Option<PublishedRecord>, String> {
    let mut index = FileIndex::load(cache);
    let note = |reason: &DirtyReason| {
        events.event(ExecEvent::StageNote {
            stage: job.name.clone(),
            message: format!("{reason}: publishing it again"),
        })
    };
    let stale = materialized_problem(&pipeline.project_dir, manifest, out_dir, &mut index)
        .map_err(|error| error.to_string())?;
    if let Some(reason) = &stale {
        note(reason);
        materialize(source, out_dir).map_err(|error| error.to_string())?;
    }
    let declared = job
        .config
        .spec()
        .published_paths(&pipeline.project_dir)
        .map_err(|message| format!("stage `{}`: {message}", job.name))?;
    if declared.is_empty() {
        // A publish without declared destinations cannot be checked: it runs on every restore.
        let _ = index.save();
        publish().map_err(|error| error.to_string())?;
        return Ok(None);
    }
    let stale = destination_problems(
        cache,
        pipeline,
        &job.name,
        job.config,
        &manifest.digest(),
        &mut index,
    )
    .map_err(|error| error.to_string())?;
    // The index only saves time; failing to save it loses nothing.
    let _ = index.save();
    if stale.is_empty() {
        return Ok(None);
    }
    stale.iter().for_each(note);
    publish().map_err(|error| error.to_string())?;
    record_destinations(job, pipeline, &manifest.digest())
}

/// What the stage's publish just wrote to its declared destinations (None: it has none).
fn record_destinations(
    job: &Job<'_>,
    pipeline: &Pipeline,
    output: &str,
) -> Result<Option<PublishedRecord>, String> {
    let destinations = job
        .config
        .spec()
        .published_paths(&pipeline.project_dir)
        .map_err(|message| format!("stage `{}`: {message}", job.name))?;
    if destinations.is_empty() {
        return Ok(None);
    }
    let mut record = PublishedRecord {
        output: output.to_string(),
        destinations: BTreeMap::new(),
        context: job.config.spec().publish_context(pipeline),
    };
    for destination in destinations {
        let manifest = Manifest::of_published(&destination).map_err(|error| error.to_string())?;
        record
            .destinations
            .insert(destination.display().to_string(), manifest);
    }
    Ok(Some(record))
}

fn fresh(job: &Job<'_>, cached: &CachedOutput, started: Instant, out_dir: PathBuf) -> JobResult {
    let wall_time = started.elapsed();
    JobResult {
        report: StageReport {
            name: job.name.clone(),
            kind: job.kind.clone(),
            status: StageStatus::Fresh,
            cache: CacheUse::Hit,
            reasons: Vec::new(),
            wall_time,
            outcome: cached.outcome.clone(),
            output: Some(cached.output.clone()),
            output_dir: Some(out_dir),
            error: None,
        },
        lock_entry: Some(LockEntry {
            fingerprint: job.fingerprint.digest(),
            components: job.fingerprint.clone(),
            output: cached.output.clone(),
            outcome: cached.outcome.clone(),
            wall_time_seconds: cached.wall_time_seconds,
        }),
        published: None,
    }
}

fn failed(
    job: &Job<'_>,
    started: Instant,
    reasons: Vec<DirtyReason>,
    message: String,
    cancelled: bool,
) -> JobResult {
    let message = super::without_backtrace(&message);
    JobResult {
        report: StageReport {
            name: job.name.clone(),
            kind: job.kind.clone(),
            status: if cancelled {
                StageStatus::Cancelled
            } else {
                StageStatus::Failed
            },
            cache: CacheUse::None,
            reasons,
            wall_time: started.elapsed(),
            outcome: BTreeMap::new(),
            output: None,
            output_dir: None,
            error: Some(message),
        },
        lock_entry: None,
        published: None,
    }
}

/// The test-only delay from [`STAGE_DELAY_ENV`], if set and well-formed.
/// The stage at `position` and every planned stage it depends on (transitively), each with the
/// input digests its plan hashed.
fn watched_inputs(
    stages: &[super::plan::StagePlan],
    position: usize,
) -> Vec<(String, BTreeMap<String, String>)> {
    let mut watched: Vec<(String, BTreeMap<String, String>)> = Vec::new();
    let mut pending = vec![position];
    while let Some(index) = pending.pop() {
        let stage = &stages[index];
        if watched.iter().any(|(name, _)| *name == stage.name) {
            continue;
        }
        watched.push((stage.name.clone(), stage.inputs.clone()));
        for upstream in &stage.upstream {
            if let Some(found) = stages.iter().position(|other| &other.name == upstream) {
                pending.push(found);
            }
        }
    }
    watched
}

/// Why the outputs of a stage that just ran may not be stored: an input of it or of a stage
/// above it whose content (or, for a folder or glob input, whose set of files) is no longer
/// what the plan hashed. Unchanged files are recognised by the index's stamps without
/// rehashing.
fn inputs_changed(
    pipeline: &Pipeline,
    cache: &Cache,
    watched: &[(String, BTreeMap<String, String>)],
) -> Option<String> {
    let mut index = FileIndex::load(cache);
    for (stage, planned) in watched {
        let config = pipeline.stages.get(stage)?;
        let changed = |what: String| {
            Some(format!(
                "{what} changed while this run was going (stage `{stage}` was planned with the old content); its output is not cached: run again"
            ))
        };
        let files = match config.spec().fingerprint_inputs(&pipeline.project_dir) {
            Ok(files) => files,
            Err(message) => return changed(format!("an input ({message})")),
        };
        let mut now = BTreeMap::new();
        for file in files {
            // As the plan keyed them (the fingerprint normalizes them later).
            let key = file.key;
            match index.digest(&file.path) {
                Ok(digest) => {
                    if planned.get(&key) != Some(&digest) {
                        return changed(format!("the input {key}"));
                    }
                    now.insert(key, digest);
                }
                Err(_) => return changed(format!("the input {key}")),
            }
        }
        if let Some(gone) = planned.keys().find(|key| !now.contains_key(*key)) {
            return changed(format!("the input {gone}"));
        }
    }
    // The index only saves time; failing to save it loses nothing.
    let _ = index.save();
    None
}

fn stage_delay() -> Option<(String, Duration)> {
    let value = std::env::var(STAGE_DELAY_ENV).ok()?;
    let (stage, milliseconds) = value.split_once('=')?;
    let milliseconds: u64 = milliseconds.trim().parse().ok()?;
    Some((
        stage.trim().to_string(),
        Duration::from_millis(milliseconds),
    ))
}

/// Wait (test-only) between a stage's run and the store, giving up on Ctrl-C.
fn hold_for_tests(
    stage: &str,
    delay: &Option<(String, Duration)>,
    cancel: &AtomicBool,
) -> Result<(), StageError> {
    let Some((name, duration)) = delay else {
        return Ok(());
    };
    if name != stage {
        return Ok(());
    }
    let until = Instant::now() + *duration;
    while Instant::now() < until {
        if cancel.load(Ordering::SeqCst) {
            return Err(StageError::Cancelled);
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    Ok(())
}
