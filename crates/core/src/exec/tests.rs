//! Executor tests with fake stages (through the injectable builder): freshness, reasons, early
//! cutoff, the run cache, selection, failures, cancellation, corruption and concurrency.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::Duration;

use super::stage::{StageContext, StageOutcome};
use super::*;
use crate::config::RawPipeline;
use crate::fingerprint::DirtyReason;

/// What the fake stages did, shared by all of them.
#[derive(Default)]
struct World {
    /// Names of stages whose `run` was called, in order.
    ran: Mutex<Vec<String>>,
    /// Names of stages whose `publish` was called.
    published: Mutex<Vec<String>>,
    running_now: AtomicUsize,
    most_at_once: AtomicUsize,
    /// What each `run` saw of its context.
    contexts: Mutex<Vec<SeenContext>>,
    /// Device as written → (stages running on it now, most at once).
    devices: Mutex<BTreeMap<String, (usize, usize)>>,
    /// Stages named `meet…` that met another `meet…` stage running at the same time.
    met: Mutex<Vec<String>>,
    meeting: AtomicUsize,
    /// Stages named `flaky…` fail while this is set.
    flaky: AtomicBool,
}

/// Stage, fingerprint digest, checkpoint dir, resume.
type SeenContext = (String, String, Option<std::path::PathBuf>, bool);

struct FakeStage<'a> {
    world: &'a World,
    name: String,
    config: StageConfig,
}

impl Stage for FakeStage<'_> {
    fn run(&self, ctx: &StageContext<'_>) -> Result<StageOutcome, StageError> {
        self.world.ran.lock().unwrap().push(self.name.clone());
        self.world.contexts.lock().unwrap().push((
            self.name.clone(),
            ctx.fingerprint.to_string(),
            ctx.checkpoint_dir.map(Path::to_path_buf),
            ctx.resume,
        ));
        let now = self.world.running_now.fetch_add(1, Ordering::SeqCst) + 1;
        self.world.most_at_once.fetch_max(now, Ordering::SeqCst);
        let device = self.config.spec().device().map(str::to_string);
        if let Some(device) = &device {
            let mut devices = self.world.devices.lock().unwrap();
            let (running, most) = devices.entry(device.clone()).or_default();
            *running += 1;
            *most = (*most).max(*running);
        }
        if self.name.starts_with("meet") {
            self.meet();
        }
        let result = self.work(ctx);
        if let Some(device) = &device {
            self.world
                .devices
                .lock()
                .unwrap()
                .entry(device.clone())
                .or_default()
                .0 -= 1;
        }
        self.world.running_now.fetch_sub(1, Ordering::SeqCst);
        result
    }

    fn publish(&self, artifact: &Path, _ctx: &StageContext<'_>) -> Result<(), StageError> {
        assert!(artifact.is_dir());
        self.world.published.lock().unwrap().push(self.name.clone());
        Ok(())
    }
}

impl FakeStage<'_> {
    /// Wait (at most 10 s) until another `meet…` stage has started: it met one when both ran at
    /// once.
    fn meet(&self) {
        self.world.meeting.fetch_add(1, Ordering::SeqCst);
        let until = std::time::Instant::now() + Duration::from_secs(10);
        while std::time::Instant::now() < until {
            if self.world.meeting.load(Ordering::SeqCst) >= 2 {
                self.world.met.lock().unwrap().push(self.name.clone());
                return;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    fn work(&self, ctx: &StageContext<'_>) -> Result<StageOutcome, StageError> {
        if self.name.starts_with("slow") {
            std::thread::sleep(Duration::from_millis(150));
        }
        if self.name.starts_with("bad") {
            std::fs::write(ctx.out_dir.join("half.txt"), "half")?;
            return Err(StageError::user("bad input row 3"));
        }
        if self.name.starts_with("flaky") && self.world.flaky.load(Ordering::SeqCst) {
            return Err(StageError::user("flaky failure\nsecond line"));
        }
        if self.name.starts_with("panicky") {
            panic!("index out of range");
        }
        if self.name.starts_with("interrupted") {
            ctx.cancel.store(true, Ordering::SeqCst);
            ctx.check_cancel()?;
        }
        let text = match &self.config {
            // Output depends on the path, case-insensitively (so a case change is a parameter
            // change with identical output: early cutoff).
            StageConfig::Ingest(config) => format!("rows of {}", config.path.to_lowercase()),
            StageConfig::Template(config) => {
                let upstream = ctx.upstream_dir(&config.input)?;
                let rows = std::fs::read_to_string(upstream.join("out.txt"))?;
                format!("prompts over [{rows}]")
            }
            other => format!("{:?}", other.kind()),
        };
        std::fs::create_dir_all(ctx.out_dir.join("sub"))?;
        std::fs::write(ctx.out_dir.join("out.txt"), &text)?;
        std::fs::write(ctx.out_dir.join("sub/len.txt"), text.len().to_string())?;
        let mut outcome = StageOutcome::default();
        outcome
            .summary
            .insert("bytes".into(), serde_json::json!(text.len()));
        Ok(outcome)
    }
}

struct Setup {
    _dir: tempfile::TempDir,
    root: std::path::PathBuf,
}

impl Setup {
    fn new() -> Setup {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().to_path_buf();
        // The input files the pipelines below name (ingest stages hash them).
        for name in ["a", "b", "c", "A.parquet", "B.parquet", "a.parquet"] {
            std::fs::write(root.join(name), format!("content of {name}")).unwrap();
        }
        Setup { _dir: dir, root }
    }

    fn pipeline(&self, yaml: &str) -> Pipeline {
        let value: serde_norway::Value = serde_norway::from_str(yaml).unwrap();
        let raw: RawPipeline =
            serde_json::from_value(serde_json::to_value(value).unwrap()).unwrap();
        Pipeline {
            name: raw.name.clone().unwrap_or_else(|| "test".into()),
            file: self.root.join("pipeline.yaml"),
            project_dir: self.root.clone(),
            seed: raw.seed,
            stages: raw.stages,
            overrides: Vec::new(),
        }
    }

    fn settings(&self, pipeline: &Pipeline) -> RunSettings {
        let mut settings = RunSettings::for_pipeline(pipeline);
        settings.jobs = 2;
        settings
    }
}

fn run(world: &World, pipeline: &Pipeline, settings: &RunSettings) -> RunSummary {
    run_with_events(world, pipeline, settings, &IgnoreEvents)
}

fn run_with_events(
    world: &World,
    pipeline: &Pipeline,
    settings: &RunSettings,
    events: &dyn EventSink,
) -> RunSummary {
    let builder = |name: &str, config: &StageConfig| -> Result<Box<dyn Stage + '_>, StageError> {
        Ok(Box::new(FakeStage {
            world,
            name: name.to_string(),
            config: config.clone(),
        }))
    };
    execute(
        pipeline,
        settings,
        &builder,
        events,
        &AtomicBool::new(false),
    )
    .unwrap()
}

fn statuses(summary: &RunSummary) -> Vec<(String, StageStatus)> {
    summary
        .stages
        .iter()
        .map(|stage| (stage.name.clone(), stage.status))
        .collect()
}

fn reasons(summary: &RunSummary, stage: &str) -> Vec<String> {
    summary
        .stages
        .iter()
        .find(|report| report.name == stage)
        .unwrap()
        .reasons
        .iter()
        .map(ToString::to_string)
        .collect()
}

const TWO_STAGES: &str = "
stages:
  data: {ingest: {path: A.parquet}}
  prompts: {template: {input: data}}
";

#[test]
fn second_run_restores_everything_without_running() {
    let setup = Setup::new();
    let world = World::default();
    let pipeline = setup.pipeline(TWO_STAGES);
    let settings = setup.settings(&pipeline);
    let first = run(&world, &pipeline, &settings);
    assert_eq!(
        statuses(&first),
        [
            ("data".into(), StageStatus::Ran),
            ("prompts".into(), StageStatus::Ran)
        ]
    );
    assert_eq!(reasons(&first, "data"), ["never run"]);
    let second = run(&world, &pipeline, &settings);
    assert!(second
        .stages
        .iter()
        .all(|stage| stage.status == StageStatus::Fresh && stage.cache == CacheUse::Hit));
    assert_eq!(*world.ran.lock().unwrap(), ["data", "prompts"]);
    // Restored stages are published again and keep their recorded figures.
    assert_eq!(world.published.lock().unwrap().len(), 4);
    assert_eq!(second.stages[0].outcome["bytes"], serde_json::json!(17));
    // Outputs are visible at the stable path.
    let out = settings.out_root.join("prompts/out.txt");
    assert_eq!(
        std::fs::read_to_string(out).unwrap(),
        "prompts over [rows of a.parquet]"
    );
    assert!(settings.out_root.join("data/sub/len.txt").is_file());
    let plan = plan::plan_only(&pipeline, &settings).unwrap();
    assert!(plan.all_fresh());
}

#[test]
fn a_parameter_change_reruns_the_stage_and_its_dependents_with_reasons() {
    let setup = Setup::new();
    let world = World::default();
    let settings = setup.settings(&setup.pipeline(TWO_STAGES));
    run(&world, &setup.pipeline(TWO_STAGES), &settings);
    let changed = setup.pipeline(&TWO_STAGES.replace("A.parquet", "B.parquet"));
    let plan = plan::plan_only(&changed, &settings).unwrap();
    let plan_reasons: Vec<Vec<String>> = plan
        .stages
        .iter()
        .map(|stage| match &stage.freshness {
            Freshness::Dirty { reasons } => reasons.iter().map(ToString::to_string).collect(),
            Freshness::Fresh(_) => vec![],
        })
        .collect();
    assert_eq!(
        plan_reasons,
        [
            vec![
                r#"parameter ingest.path changed ("A.parquet" → "B.parquet")"#.to_string(),
                "no longer reads the file A.parquet".to_string(),
                "now reads the file B.parquet".to_string(),
            ],
            vec!["upstream stage data is dirty".to_string()],
        ]
    );
    let summary = run(&world, &changed, &settings);
    assert_eq!(
        reasons(&summary, "data"),
        [
            r#"parameter ingest.path changed ("A.parquet" → "B.parquet")"#,
            "no longer reads the file A.parquet",
            "now reads the file B.parquet",
        ]
    );
    assert_eq!(
        reasons(&summary, "prompts"),
        ["upstream stage data was rebuilt"]
    );
}

#[test]
fn identical_upstream_output_keeps_dependents_fresh() {
    let setup = Setup::new();
    let world = World::default();
    let settings = setup.settings(&setup.pipeline(TWO_STAGES));
    run(&world, &setup.pipeline(TWO_STAGES), &settings);
    // The fake ingest lowercases its path: same output, so prompts stays fresh.
    let changed = setup.pipeline(&TWO_STAGES.replace("A.parquet", "a.parquet"));
    let summary = run(&world, &changed, &settings);
    assert_eq!(
        statuses(&summary),
        [
            ("data".into(), StageStatus::Ran),
            ("prompts".into(), StageStatus::Fresh)
        ]
    );
}

#[test]
fn going_back_to_earlier_parameters_restores_from_the_run_cache() {
    let setup = Setup::new();
    let world = World::default();
    let original = setup.pipeline(TWO_STAGES);
    let settings = setup.settings(&original);
    run(&world, &original, &settings);
    run(
        &world,
        &setup.pipeline(&TWO_STAGES.replace("A.parquet", "B.parquet")),
        &settings,
    );
    // Restorable without running; until restored, what is published is the other run's, so
    // the plan is not all fresh (`status --check` must not pass over it).
    let plan = plan::plan_only(&original, &settings).unwrap();
    assert!(!plan.all_fresh(), "{plan:?}");
    assert!(plan.stages.iter().all(|stage| matches!(
        &stage.freshness,
        Freshness::Fresh(cached) if cached.from_run_cache && !cached.republish.is_empty()
    )));
    let back = run(&world, &original, &settings);
    assert!(back
        .stages
        .iter()
        .all(|stage| stage.status == StageStatus::Fresh));
    assert_eq!(world.ran.lock().unwrap().len(), 4);
}

#[test]
fn seed_and_tool_version_are_reasons() {
    let setup = Setup::new();
    let world = World::default();
    let settings = setup.settings(&setup.pipeline(TWO_STAGES));
    run(&world, &setup.pipeline(TWO_STAGES), &settings);
    let reseeded = setup.pipeline(&format!("seed: 5\n{TWO_STAGES}"));
    let summary = run(&world, &reseeded, &settings);
    assert_eq!(reasons(&summary, "data"), ["seed changed (0 → 5)"]);
}

#[test]
fn a_renamed_stage_is_rebuilt_not_restored() {
    // Stages seed their randomness from their name: an identical config under another name is
    // another fingerprint, so the old name's output is not restored from the run cache.
    let setup = Setup::new();
    let world = World::default();
    let pipeline = setup.pipeline(TWO_STAGES);
    let settings = setup.settings(&pipeline);
    run(&world, &pipeline, &settings);
    let renamed = setup.pipeline(
        "
stages:
  rows: {ingest: {path: A.parquet}}
  prompts: {template: {input: rows}}
",
    );
    let summary = run(&world, &renamed, &setup.settings(&renamed));
    assert_eq!(
        statuses(&summary),
        [
            ("rows".into(), StageStatus::Ran),
            ("prompts".into(), StageStatus::Ran)
        ]
    );
    assert_eq!(reasons(&summary, "rows"), ["never run"]);
    // And back: the old names are restored.
    let back = run(&world, &pipeline, &settings);
    assert!(back
        .stages
        .iter()
        .all(|stage| stage.status == StageStatus::Fresh));
}

#[test]
fn a_stage_sees_its_fingerprint_and_checkpoint_dir_and_force_disables_resume() {
    let setup = Setup::new();
    let world = World::default();
    let pipeline = setup.pipeline(TWO_STAGES);
    let mut settings = setup.settings(&pipeline);
    run(&world, &pipeline, &settings);
    let cache = crate::cache::Cache::open(&settings.cache_dir).unwrap();
    let lock = cache.read_lock_file(&pipeline.name).unwrap();
    let seen = world.contexts.lock().unwrap().clone();
    assert_eq!(seen.len(), 2);
    for (stage, fingerprint, checkpoint_dir, resume) in &seen {
        assert_eq!(fingerprint, &lock.stages[stage].fingerprint);
        assert_eq!(
            checkpoint_dir.as_deref(),
            Some(
                cache
                    .checkpoint_dir(&pipeline.name, stage, fingerprint)
                    .as_path()
            )
        );
        assert!(resume, "a normal run may resume");
    }
    settings.force = true;
    run(&world, &pipeline, &settings);
    let forced = world.contexts.lock().unwrap()[2..].to_vec();
    assert_eq!(forced.len(), 2);
    for (stage, fingerprint, _, resume) in &forced {
        assert_eq!(fingerprint, &lock.stages[stage].fingerprint);
        assert!(!resume, "--force recomputes from scratch");
    }
}

#[test]
fn stage_selection_runs_only_what_is_needed() {
    let setup = Setup::new();
    let world = World::default();
    let pipeline = setup.pipeline(
        "
stages:
  data: {ingest: {path: a}}
  prompts: {template: {input: data}}
  other: {ingest: {path: b}}
",
    );
    let mut settings = setup.settings(&pipeline);
    settings.targets = vec!["data".into()];
    let summary = run(&world, &pipeline, &settings);
    assert_eq!(statuses(&summary), [("data".into(), StageStatus::Ran)]);
    settings.targets = vec!["prompts".into()];
    let summary = run(&world, &pipeline, &settings);
    assert_eq!(
        statuses(&summary),
        [
            ("data".into(), StageStatus::Fresh),
            ("prompts".into(), StageStatus::Ran)
        ]
    );
    assert_eq!(reasons(&summary, "prompts"), ["never run"]);
    // --force with --stage forces the target only; its upstream is restored.
    settings.force = true;
    let summary = run(&world, &pipeline, &settings);
    assert_eq!(summary.stages[0].status, StageStatus::Fresh);
    assert_eq!(reasons(&summary, "prompts"), ["forced"]);
}

#[test]
fn a_failed_stage_records_nothing_and_skips_dependents() {
    let setup = Setup::new();
    let world = World::default();
    let pipeline = setup.pipeline(
        "
stages:
  bad: {ingest: {path: a}}
  prompts: {template: {input: bad}}
",
    );
    let settings = setup.settings(&pipeline);
    let summary = run(&world, &pipeline, &settings);
    assert!(summary.failed());
    assert_eq!(
        statuses(&summary),
        [
            ("bad".into(), StageStatus::Failed),
            ("prompts".into(), StageStatus::Skipped)
        ]
    );
    assert_eq!(summary.stages[0].error.as_deref(), Some("bad input row 3"));
    assert_eq!(
        summary.stages[1].error.as_deref(),
        Some("not run: upstream stage bad did not finish")
    );
    let cache = crate::cache::Cache::open(&settings.cache_dir).unwrap();
    assert!(cache.read_lock_file("test").unwrap().stages.is_empty());
    let leftovers = std::fs::read_dir(cache.tmp_dir()).unwrap().count();
    assert_eq!(leftovers, 0, "the failed stage's staging dir is removed");
    // Still dirty, still never run.
    let plan = plan::plan_only(&pipeline, &settings).unwrap();
    assert!(!plan.stages[0].freshness.is_fresh());
}

#[test]
fn a_failed_run_is_remembered_for_its_fingerprint_until_the_stage_succeeds() {
    let setup = Setup::new();
    let world = World::default();
    world.flaky.store(true, Ordering::SeqCst);
    let yaml = "
stages:
  flaky: {ingest: {path: a}}
  prompts: {template: {input: flaky}}
";
    let pipeline = setup.pipeline(yaml);
    let settings = setup.settings(&pipeline);
    assert!(run(&world, &pipeline, &settings).failed());

    let plan = plan::plan_only(&pipeline, &settings).unwrap();
    let failure = plan.stages[0].last_failure.as_ref().expect("remembered");
    assert_eq!(failure.error, "flaky failure\nsecond line");
    assert_eq!(failure.fingerprint, plan.stages[0].fingerprint.digest());
    assert!(
        plan.stages[1].last_failure.is_none(),
        "a stage that was skipped did not fail"
    );
    // Other inputs: that failure was another configuration's.
    let other = setup.pipeline(&yaml.replace("path: a", "path: b"));
    assert!(plan::plan_only(&other, &settings).unwrap().stages[0]
        .last_failure
        .is_none());

    world.flaky.store(false, Ordering::SeqCst);
    assert!(!run(&world, &pipeline, &settings).failed());
    let plan = plan::plan_only(&pipeline, &settings).unwrap();
    assert!(plan.all_fresh());
    assert!(plan.stages[0].last_failure.is_none());
    let cache = crate::cache::Cache::open(&settings.cache_dir).unwrap();
    assert!(cache.read_failures("test").stages.is_empty(), "forgotten");
}

#[test]
fn a_panicking_stage_fails_with_its_message() {
    let setup = Setup::new();
    let world = World::default();
    let pipeline = setup.pipeline("stages:\n  panicky: {ingest: {path: a}}\n");
    let summary = run(&world, &pipeline, &setup.settings(&pipeline));
    assert_eq!(summary.stages[0].status, StageStatus::Failed);
    assert_eq!(
        summary.stages[0].error.as_deref(),
        Some("internal error: the stage panicked: index out of range")
    );
}

#[test]
fn an_interrupted_run_keeps_finished_stages_only() {
    let setup = Setup::new();
    let world = World::default();
    let pipeline = setup.pipeline(
        "
stages:
  data: {ingest: {path: a}}
  interrupted: {template: {input: data}}
  after: {template: {input: interrupted}}
",
    );
    let settings = setup.settings(&pipeline);
    let summary = run(&world, &pipeline, &settings);
    assert!(summary.interrupted);
    assert_eq!(
        statuses(&summary),
        [
            ("data".into(), StageStatus::Ran),
            ("interrupted".into(), StageStatus::Cancelled),
            ("after".into(), StageStatus::Skipped)
        ]
    );
    let cache = crate::cache::Cache::open(&settings.cache_dir).unwrap();
    let lock = cache.read_lock_file("test").unwrap();
    assert_eq!(lock.stages.keys().collect::<Vec<_>>(), ["data"]);
}

#[test]
fn a_corrupted_object_is_detected_and_rebuilt() {
    let setup = Setup::new();
    let world = World::default();
    let pipeline = setup.pipeline(TWO_STAGES);
    let settings = setup.settings(&pipeline);
    let first = run(&world, &pipeline, &settings);
    let digest = first.stages[0].output.clone().unwrap();
    let cache = crate::cache::Cache::open(&settings.cache_dir).unwrap();
    let file = cache.object_data(&digest).join("out.txt");
    let mut permissions = std::fs::metadata(&file).unwrap().permissions();
    #[expect(
        clippy::permissions_set_readonly_false,
        reason = "test corrupts a file"
    )]
    permissions.set_readonly(false);
    std::fs::set_permissions(&file, permissions).unwrap();
    std::fs::write(&file, "rows of a.parquex").unwrap();

    let summary = run(&world, &pipeline, &settings);
    assert_eq!(
        reasons(&summary, "data"),
        ["cached output corrupted (out.txt content differs)"]
    );
    assert_eq!(summary.stages[0].output.as_deref(), Some(digest.as_str()));
    assert_eq!(summary.stages[1].status, StageStatus::Fresh);
    assert!(cache.verify_object(&digest).unwrap().is_ok());
}

#[test]
fn a_missing_object_is_a_reason() {
    let setup = Setup::new();
    let world = World::default();
    let pipeline = setup.pipeline(TWO_STAGES);
    let settings = setup.settings(&pipeline);
    let first = run(&world, &pipeline, &settings);
    let cache = crate::cache::Cache::open(&settings.cache_dir).unwrap();
    cache
        .remove_object(first.stages[0].output.as_deref().unwrap())
        .unwrap();
    let plan = plan::plan_only(&pipeline, &settings).unwrap();
    assert_eq!(
        plan.stages[0].freshness,
        Freshness::Dirty {
            reasons: vec![DirtyReason::OutputMissing]
        }
    );
}

#[test]
fn independent_stages_run_concurrently_within_the_bound() {
    let yaml = "
stages:
  slow1: {ingest: {path: a}}
  slow2: {ingest: {path: b}}
  slow3: {ingest: {path: c}}
";
    for (jobs, expected) in [(1, 1), (3, 3)] {
        let setup = Setup::new();
        let world = World::default();
        let pipeline = setup.pipeline(yaml);
        let mut settings = setup.settings(&pipeline);
        settings.jobs = jobs;
        let summary = run(&world, &pipeline, &settings);
        assert!(!summary.failed());
        assert_eq!(
            world.most_at_once.load(Ordering::SeqCst),
            expected,
            "jobs = {jobs}"
        );
    }
}

#[test]
fn unknown_stage_is_an_error_with_a_hint() {
    let setup = Setup::new();
    let world = World::default();
    let pipeline = setup.pipeline(TWO_STAGES);
    let mut settings = setup.settings(&pipeline);
    settings.targets = vec!["prompt".into()];
    let builder = |name: &str, config: &StageConfig| -> Result<Box<dyn Stage + '_>, StageError> {
        Ok(Box::new(FakeStage {
            world: &world,
            name: name.to_string(),
            config: config.clone(),
        }))
    };
    let error = execute(
        &pipeline,
        &settings,
        &builder,
        &IgnoreEvents,
        &AtomicBool::new(false),
    )
    .unwrap_err();
    assert_eq!(
        error.to_string(),
        "no stage named `prompt` (did you mean `prompts`?)"
    );
}

#[test]
fn events_tell_the_story_in_order() {
    let setup = Setup::new();
    let world = World::default();
    let pipeline = setup.pipeline(TWO_STAGES);
    let settings = setup.settings(&pipeline);
    let events = CollectEvents::default();
    let builder = |name: &str, config: &StageConfig| -> Result<Box<dyn Stage + '_>, StageError> {
        Ok(Box::new(FakeStage {
            world: &world,
            name: name.to_string(),
            config: config.clone(),
        }))
    };
    execute(
        &pipeline,
        &settings,
        &builder,
        &events,
        &AtomicBool::new(false),
    )
    .unwrap();
    let story: Vec<String> = events
        .0
        .lock()
        .unwrap()
        .iter()
        .map(|event| match event {
            ExecEvent::Planned { stages } => format!("planned {}", stages.len()),
            ExecEvent::StageStarted { stage, .. } => format!("started {stage}"),
            ExecEvent::StageFinished(report) => format!("finished {}", report.name),
            other => format!("{other:?}"),
        })
        .collect();
    assert_eq!(
        story,
        [
            "planned 2",
            "started data",
            "finished data",
            "started prompts",
            "finished prompts"
        ]
    );
}

/// A pipeline read as `peftpipe` reads it up to the semantic checks (which need real files):
/// YAML, `matrix:` expansion, deserialization. Panics on any problem.
fn expanded_pipeline(setup: &Setup, yaml: &str) -> Pipeline {
    let file = setup.root.join("pipeline.yaml");
    std::fs::write(&file, yaml).unwrap();
    let parsed = crate::config::load::parse_pipeline(&file, &[]).unwrap();
    assert!(parsed.problems.is_empty(), "{:?}", parsed.problems);
    Pipeline {
        name: "test".into(),
        file,
        project_dir: setup.root.clone(),
        seed: parsed.raw.seed,
        stages: parsed.raw.stages,
        overrides: Vec::new(),
    }
}

fn matrix_yaml(ranks: &str, device: &str) -> String {
    format!(
        "
stages:
  data: {{ingest: {{path: a}}}}
  slow_train:
    matrix:
      rank: {ranks}
    train: {{data: data, model: model, method: {{lora: {{r: '${{item.rank}}'}}}}, device: '{device}'}}
  meet_a: {{ingest: {{path: b}}}}
  meet_b: {{ingest: {{path: c}}}}
"
    )
}

fn model_dir(setup: &Setup) {
    std::fs::create_dir_all(setup.root.join("model")).unwrap();
    std::fs::write(setup.root.join("model/config.json"), "{}").unwrap();
}

#[test]
fn two_expanded_train_stages_never_share_a_gpu_while_cpu_stages_overlap() {
    let setup = Setup::new();
    model_dir(&setup);
    let world = World::default();
    let pipeline = expanded_pipeline(&setup, &matrix_yaml("{r4: 4, r8: 8, r16: 16}", "cuda:0"));
    let names: Vec<&String> = pipeline.stages.keys().collect();
    assert_eq!(
        names,
        [
            "data",
            "slow_train@r4",
            "slow_train@r8",
            "slow_train@r16",
            "meet_a",
            "meet_b"
        ]
    );
    let mut settings = setup.settings(&pipeline);
    settings.jobs = 4;
    let events = CollectEvents::default();
    let summary = run_with_events(&world, &pipeline, &settings, &events);
    assert!(!summary.failed(), "{summary:?}");
    let devices = world.devices.lock().unwrap();
    assert_eq!(devices["cuda:0"], (0, 1), "one train at a time on cuda:0");
    // Each waiting train says once what it waits for.
    let waits: Vec<String> = events
        .0
        .lock()
        .unwrap()
        .iter()
        .filter_map(|event| match event {
            ExecEvent::StageNote { stage, message } if message.starts_with("waits for") => {
                Some(format!("{stage}: {message}"))
            }
            _ => None,
        })
        .collect();
    assert_eq!(
        waits,
        [
            "slow_train@r8: waits for cuda:0, which slow_train@r4 is using",
            "slow_train@r16: waits for cuda:0, which slow_train@r4 is using",
        ]
    );
    // The CPU stages met while running (each waits for the other).
    let mut met = world.met.lock().unwrap().clone();
    met.sort();
    assert_eq!(met, ["meet_a", "meet_b"]);
    // The waiting trains ran one after the other, not after the whole run.
    assert_eq!(world.ran.lock().unwrap().len(), 6);
}

#[test]
fn trains_overlap_again_when_the_run_puts_them_on_the_cpu() {
    let setup = Setup::new();
    model_dir(&setup);
    let world = World::default();
    // Both trains meet: they can only finish by running at once.
    let yaml = matrix_yaml("[4, 8]", "cuda:0").replace("slow_train", "meet_train");
    let yaml = yaml
        .replace("meet_a", "other_a")
        .replace("meet_b", "other_b");
    let pipeline = expanded_pipeline(&setup, &yaml);
    let mut settings = setup.settings(&pipeline);
    settings.jobs = 4;
    settings.options.device = Some("cpu".into());
    let summary = run(&world, &pipeline, &settings);
    assert!(!summary.failed(), "{summary:?}");
    let mut met = world.met.lock().unwrap().clone();
    met.sort();
    assert_eq!(met, ["meet_train@4", "meet_train@8"]);
    assert_eq!(world.devices.lock().unwrap()["cuda:0"], (0, 2));
}

#[test]
fn expansions_have_their_own_stable_fingerprints_and_rerun_alone() {
    let setup = Setup::new();
    model_dir(&setup);
    let world = World::default();
    let pipeline = expanded_pipeline(&setup, &matrix_yaml("{r4: 4, r8: 8}", "cpu"));
    let settings = setup.settings(&pipeline);
    run(&world, &pipeline, &settings);
    let fingerprints = |world: &World| -> BTreeMap<String, String> {
        world
            .contexts
            .lock()
            .unwrap()
            .iter()
            .map(|(name, fingerprint, _, _)| (name.clone(), fingerprint.clone()))
            .collect()
    };
    let first = fingerprints(&world);
    assert_ne!(first["slow_train@r4"], first["slow_train@r8"]);

    // Stable: a second read of the file runs nothing.
    let again = World::default();
    let pipeline = expanded_pipeline(&setup, &matrix_yaml("{r4: 4, r8: 8}", "cpu"));
    let summary = run(&again, &pipeline, &settings);
    assert!(again.ran.lock().unwrap().is_empty());
    assert!(statuses(&summary)
        .iter()
        .all(|(_, status)| *status == StageStatus::Fresh));

    // One value changes: only its expansion reruns, saying why.
    let changed = World::default();
    let pipeline = expanded_pipeline(&setup, &matrix_yaml("{r4: 4, r8: 16}", "cpu"));
    let summary = run(&changed, &pipeline, &settings);
    assert_eq!(*changed.ran.lock().unwrap(), ["slow_train@r8"]);
    assert_eq!(
        reasons(&summary, "slow_train@r8"),
        ["parameter train.method.lora.r changed (8 → 16)"]
    );
    let changed_fingerprints = fingerprints(&changed);
    assert_ne!(
        changed_fingerprints["slow_train@r8"],
        first["slow_train@r8"]
    );

    // Renaming the matrix key (and its reference) changes no stage.
    let renamed = World::default();
    let yaml = matrix_yaml("{r4: 4, r8: 16}", "cpu").replace("rank", "lora_rank");
    let pipeline = expanded_pipeline(&setup, &yaml);
    run(&renamed, &pipeline, &settings);
    assert!(renamed.ran.lock().unwrap().is_empty());
}

#[test]
fn a_backtrace_after_an_error_message_is_left_out() {
    let message = "inference failed: position 135 is beyond GPT-2's 128 learned positions\n   0: candle_core::error::Error::bt\n             at /src/error.rs:1:1\n   1: peftpipe::models::gpt2::input_embeddings";
    assert_eq!(
        without_backtrace(message),
        "inference failed: position 135 is beyond GPT-2's 128 learned positions"
    );
    let plain = "line 1: bad value\nhint: 0: not a frame";
    assert_eq!(without_backtrace(plain), plain);
}
