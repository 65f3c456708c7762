//! Fault tests: a run killed (SIGKILL) or interrupted (SIGINT) mid-stage leaves nothing a later
//! run trusts, and the rerun is correct; a corrupted cache object is detected and rebuilt; two
//! concurrent runs on one cache do not corrupt it; a training checkpoint is resumed only by a run
//! with the same full fingerprint (not after the weights or tokenizer changed, never under
//! `--force`). Uses the test-only `PEFTPIPE_TEST_STAGE_DELAY` to hold a stage after it wrote its
//! output and before it is stored. The crash and concurrency suites (tests/crash.rs,
//! tests/concurrency.rs) do the same on a training pipeline at random points.

mod exec_support;
mod train_support;

use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use exec_support::{stderr, tree, Project};
use train_support::TrainProject;

/// Start `peftpipe run` holding the `prompts` stage for a long time.
fn start_held_run(project: &Project) -> Child {
    project
        .command(&["run", "pipeline.yaml"])
        .env("PEFTPIPE_TEST_STAGE_DELAY", "prompts=60000")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn peftpipe")
}

/// Wait until `data` is recorded and `prompts` has a staging directory with files in it.
fn wait_until_prompts_is_mid_stage(project: &Project, child: &mut Child) {
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        if let Some(status) = child.try_wait().expect("poll child") {
            panic!("peftpipe exited early with {status}");
        }
        let staged = std::fs::read_dir(project.path(".peftpipe/cache/tmp"))
            .map(|entries| {
                entries.flatten().any(|entry| {
                    entry.file_name().to_string_lossy().starts_with("prompts-")
                        && entry
                            .path()
                            .join("data")
                            .read_dir()
                            .is_ok_and(|mut d| d.next().is_some())
                })
            })
            .unwrap_or(false);
        if staged && project.recorded_output("data").is_some() {
            return;
        }
        assert!(Instant::now() < deadline, "the prompts stage never started");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The outputs of a clean run of the same pipeline in a fresh project.
fn clean_outputs() -> (String, std::collections::BTreeMap<String, Vec<u8>>) {
    let reference = Project::new();
    let output = reference.run(&["run", "pipeline.yaml"]);
    assert!(output.status.success(), "{}", stderr(&output));
    (
        reference.recorded_output("prompts").expect("recorded"),
        tree(&reference.path(".peftpipe/out/reviews/prompts")),
    )
}

#[test]
fn killed_mid_stage_then_a_correct_rerun() {
    let project = Project::new();
    let mut child = start_held_run(&project);
    wait_until_prompts_is_mid_stage(&project, &mut child);
    child.kill().expect("SIGKILL");
    child.wait().expect("reap");

    // Nothing about prompts was recorded; its half-done staging dir is not an object.
    assert!(project.recorded_output("prompts").is_none());
    let status = project.run(&["status", "pipeline.yaml"]);
    assert_eq!(
        String::from_utf8_lossy(&status.stdout),
        "[FRESH] data\n[DIRTY] prompts: never run\n"
    );

    let rerun = project.run(&["run", "pipeline.yaml"]);
    assert!(rerun.status.success(), "{}", stderr(&rerun));
    let text = stderr(&rerun);
    assert!(text.contains("Fresh data"), "{text}");
    assert!(
        text.contains("Running prompts (template): never run"),
        "{text}"
    );
    let leftovers = std::fs::read_dir(project.path(".peftpipe/cache/tmp"))
        .expect("tmp")
        .count();
    assert_eq!(leftovers, 0, "the killed run's staging dir was cleaned up");

    let (digest, files) = clean_outputs();
    assert_eq!(project.recorded_output("prompts"), Some(digest));
    assert_eq!(tree(&project.path(".peftpipe/out/reviews/prompts")), files);
}

#[test]
fn ctrl_c_mid_stage_exits_130_and_records_nothing_unfinished() {
    let project = Project::new();
    let mut child = start_held_run(&project);
    wait_until_prompts_is_mid_stage(&project, &mut child);
    let killed = std::process::Command::new("kill")
        .args(["-INT", &child.id().to_string()])
        .status()
        .expect("send SIGINT");
    assert!(killed.success());
    let output = child.wait_with_output().expect("wait");
    assert_eq!(output.status.code(), Some(130), "{}", stderr(&output));
    let text = project.redact(&stderr(&output));
    assert!(text.contains("Interrupted"), "{text}");
    assert!(text.contains("Cancelled prompts"), "{text}");
    assert!(project.recorded_output("data").is_some());
    assert!(project.recorded_output("prompts").is_none());
    let rerun = project.run(&["run", "pipeline.yaml"]);
    assert!(rerun.status.success(), "{}", stderr(&rerun));
    assert_eq!(project.recorded_output("prompts"), Some(clean_outputs().0));
}

#[test]
fn a_corrupted_cache_object_is_detected_and_rebuilt() {
    let project = Project::new();
    let first = project.run(&["run", "pipeline.yaml"]);
    assert!(first.status.success(), "{}", stderr(&first));
    let digest = project.recorded_output("data").expect("recorded");
    let data = project.object_data(&digest);
    let victim = tree(&data)
        .into_keys()
        .find(|name| name.ends_with(".parquet"))
        .expect("a parquet file in the ingest output");
    let path = data.join(&victim);
    let mut bytes = std::fs::read(&path).expect("read object file");
    let middle = bytes.len() / 2;
    bytes[middle] ^= 0xff;
    let mut permissions = std::fs::metadata(&path).expect("metadata").permissions();
    #[expect(
        clippy::permissions_set_readonly_false,
        reason = "the test corrupts the object"
    )]
    permissions.set_readonly(false);
    std::fs::set_permissions(&path, permissions).expect("chmod");
    std::fs::write(&path, bytes).expect("corrupt");

    let rerun = project.run(&["run", "pipeline.yaml"]);
    assert!(rerun.status.success(), "{}", stderr(&rerun));
    let text = project.redact(&stderr(&rerun));
    assert!(
        text.contains(&format!(
            "Running data (ingest): cached output corrupted ({victim} content differs)"
        )),
        "{text}"
    );
    // Same inputs, same output: the rebuilt object has the old digest and verifies again;
    // prompts, whose input did not change, is restored.
    assert_eq!(project.recorded_output("data"), Some(digest));
    assert!(text.contains("Fresh prompts"), "{text}");
    let again = project.run(&["run", "pipeline.yaml"]);
    assert!(!stderr(&again).contains("Running"), "{}", stderr(&again));
}

#[test]
fn two_concurrent_runs_on_one_cache_are_safe() {
    let project = Project::new();
    let spawn = || {
        project
            .command(&["run", "pipeline.yaml"])
            .env("PEFTPIPE_TEST_STAGE_DELAY", "data=1500")
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn peftpipe")
    };
    let first = spawn();
    std::thread::sleep(Duration::from_millis(300));
    let second = spawn();
    let first = first.wait_with_output().expect("wait");
    let second = second.wait_with_output().expect("wait");
    assert!(first.status.success(), "{}", stderr(&first));
    assert!(second.status.success(), "{}", stderr(&second));
    let texts = [stderr(&first), stderr(&second)];
    assert!(
        texts
            .iter()
            .any(|text| text.contains("Waiting for the cache lock")),
        "one run waited: {texts:?}"
    );
    // The run that waited found everything done by the other.
    assert!(texts
        .iter()
        .any(|text| text.contains("Fresh data") && text.contains("Fresh prompts")));
    let status = project.run(&["status", "--check", "pipeline.yaml"]);
    assert_eq!(status.status.code(), Some(0));
}

#[test]
fn two_pipelines_run_at_once_on_one_cache() {
    let project = Project::new();
    // A second pipeline in the same project (same cache), with the same stages: they even share
    // objects.
    project.write(
        "questions.yaml",
        &exec_support::PIPELINE.replace("name: reviews", "name: questions"),
    );
    let spawn = |file: &str| {
        project
            .command(&["run", file])
            .env("PEFTPIPE_TEST_STAGE_DELAY", "data=1500")
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn peftpipe")
    };
    let first = spawn("pipeline.yaml");
    std::thread::sleep(Duration::from_millis(300));
    let second = spawn("questions.yaml");
    let first = first.wait_with_output().expect("wait");
    let second = second.wait_with_output().expect("wait");
    assert!(first.status.success(), "{}", stderr(&first));
    assert!(second.status.success(), "{}", stderr(&second));
    for text in [stderr(&first), stderr(&second)] {
        // Neither took turns with the other: each ran its own stages while the other held its
        // `data` stage.
        assert!(!text.contains("Waiting"), "{text}");
        assert!(text.contains("Running data (ingest)"), "{text}");
    }
    for file in ["pipeline.yaml", "questions.yaml"] {
        let status = project.run(&["status", "--check", file]);
        assert_eq!(status.status.code(), Some(0), "{}", stderr(&status));
    }
    assert!(project
        .path(".peftpipe/cache/locks/questions.lock.json")
        .is_file());
}

#[test]
fn a_failing_stage_exits_1_records_nothing_and_skips_its_dependents() {
    // A folder of shards, the second one broken: validation reads only the first file, so
    // only the stage finds it.
    let project = Project::with_pipeline(
        &exec_support::PIPELINE.replace("datasets/reviews.jsonl", "datasets/shards"),
    );
    let many: Vec<(String, &str)> = (0..50)
        .map(|index| (format!("review {index}"), "positive"))
        .collect();
    project.write("datasets/shards/a.jsonl", &exec_support::jsonl(&many));
    project.write(
        "datasets/shards/b.jsonl",
        "{\"text\": \"broken row\", \"label\": \n",
    );
    let output = project.run(&["run", "pipeline.yaml"]);
    assert_eq!(output.status.code(), Some(1), "{}", stderr(&output));
    insta::assert_snapshot!("failing_stage", project.redact(&stderr(&output)));
    assert!(project.recorded_output("data").is_none());
    // `--quiet` keeps errors: the failure is said (it printed nothing before), the rest not.
    let quiet = project.run(&["run", "pipeline.yaml", "--quiet"]);
    assert_eq!(quiet.status.code(), Some(1));
    let said = stderr(&quiet);
    assert!(
        said.contains("Failed data: ") && said.contains("b.jsonl"),
        "{said}"
    );
    assert!(
        !said.contains("Skipped") && !said.contains("Running"),
        "{said}"
    );
    let leftovers = std::fs::read_dir(project.path(".peftpipe/cache/tmp"))
        .expect("tmp")
        .count();
    assert_eq!(leftovers, 0);
    // Fixing the input makes the next run succeed.
    project.write(
        "datasets/shards/b.jsonl",
        &exec_support::jsonl(&exec_support::rows()),
    );
    let fixed = project.run(&["run", "pipeline.yaml"]);
    assert!(fixed.status.success(), "{}", stderr(&fixed));
}

/// Start a training run (slow checkpoint writes) and SIGKILL it once a complete checkpoint is on
/// disk.
fn kill_after_a_checkpoint(project: &TrainProject, extra: &[&str]) {
    let mut args = vec!["run", "pipeline.yaml"];
    args.extend_from_slice(extra);
    let mut command = project.command(&args);
    command.env("PEFTPIPE_TEST_CHECKPOINT_DELAY", "200");
    let mut running = train_support::Running::start(command);
    let caught = running.wait_until(Duration::from_secs(60), || {
        project.has_complete_checkpoint()
    });
    assert!(caught, "no checkpoint was written: {:?}", running.seen);
    running.kill();
}

#[test]
fn changed_weights_or_tokenizer_after_a_kill_do_not_resume_the_old_checkpoint() {
    type Change = fn(&TrainProject);
    let nudge_tokenizer: Change = |project| {
        // Same vocabulary, other bytes: another fingerprint all the same.
        let path = project.path("model/tokenizer.json");
        let mut text = std::fs::read_to_string(&path).unwrap();
        text.push('\n');
        std::fs::write(path, text).unwrap();
    };
    let changes: [(&str, Change); 2] = [
        ("weights", train_support::nudge_weights),
        ("tokenizer", nudge_tokenizer),
    ];
    for (what, change) in changes {
        let project = TrainProject::new();
        kill_after_a_checkpoint(&project, &[]);
        change(&project);
        let rerun = project.run_ok("pipeline.yaml", &[]);
        assert!(
            !rerun.resumed(),
            "{what} changed, yet the old checkpoint was resumed:\n{}",
            rerun.stderr
        );
        assert_eq!(rerun.status("train"), "ran");
        let outputs = project.recorded_outputs("quick");
        project.wipe();
        project.run_ok("pipeline.yaml", &[]);
        assert_eq!(
            outputs,
            project.recorded_outputs("quick"),
            "{what}: the rerun differs from a clean run"
        );
    }
}

#[test]
fn a_killed_run_resumes_but_force_never_does() {
    let project = TrainProject::new();
    // Killed, then rerun: the checkpoint of the same fingerprint is resumed...
    kill_after_a_checkpoint(&project, &[]);
    let resumed = project.run_ok("pipeline.yaml", &[]);
    assert!(resumed.resumed(), "{}", resumed.stderr);
    let outputs = project.recorded_outputs("quick");
    // ...and the result is the clean run's.
    project.wipe();
    project.run_ok("pipeline.yaml", &[]);
    assert_eq!(outputs, project.recorded_outputs("quick"));

    // Killed again: --force recomputes from scratch, it does not resume.
    project.wipe();
    kill_after_a_checkpoint(&project, &[]);
    let forced = project.run_ok("pipeline.yaml", &["--force"]);
    assert!(!forced.resumed(), "{}", forced.stderr);
    assert_eq!(forced.status("train"), "ran");
    assert_eq!(outputs, project.recorded_outputs("quick"));
    assert!(project.checkpoint_dirs().is_empty());
}

#[test]
fn an_input_edited_while_its_stage_runs_is_never_cached_under_the_old_content() {
    // The fingerprint hashes the inputs when the run is planned; the stage reads them later. An
    // edit in between (a branch switch during a long run) must not store what the stage read
    // under the planned digest: restored to the old content, the input would then match the
    // fingerprint and `status` would call the stale output fresh.
    let project = Project::new();
    let original = std::fs::read_to_string(project.path("templates/prompt.j2")).expect("template");
    let mut child = project
        .command(&["run", "pipeline.yaml"])
        .env("PEFTPIPE_TEST_STAGE_DELAY", "prompts=3000")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn peftpipe");
    wait_until_prompts_is_mid_stage(&project, &mut child);
    project.write("templates/prompt.j2", "EDITED {{ text }}");
    let output = child.wait_with_output().expect("wait");
    let text = stderr(&output);
    assert!(!output.status.success(), "the run succeeded:\n{text}");
    assert!(
        text.contains("templates/prompt.j2") && text.contains("changed while"),
        "{text}"
    );
    assert_eq!(project.recorded_output("prompts"), None, "{text}");
    // Back to the planned content: nothing stale is restored.
    project.write("templates/prompt.j2", &original);
    let status = project.run(&["status", "pipeline.yaml"]);
    let status = exec_support::stdout(&status);
    assert!(status.contains("[DIRTY] prompts"), "{status}");
}

#[test]
fn status_is_not_fresh_over_published_copies_of_another_configuration() {
    // A run-cache hit (the output of an earlier run with these inputs) is restored and
    // republished by `run`; until then its published copies may hold another configuration's
    // output, and `status --check` must say so.
    let project = TrainProject::new();
    let other = ["--set", "stages.evaluate.evaluate.max_rows=20"];
    project.run_ok("pipeline.yaml", &other);
    project.run_ok("pipeline.yaml", &[]);
    let mut args = vec!["status", "--check", "pipeline.yaml"];
    args.extend_from_slice(&other);
    let status = project.run(&args);
    let text = exec_support::stdout(&status);
    assert_eq!(status.status.code(), Some(3), "{text}");
    assert!(text.contains("[DIRTY] evaluate"), "{text}");
    let rerun = project.run_ok("pipeline.yaml", &other);
    assert!(rerun.ran().is_empty(), "{}", rerun.stderr);
    let status = project.run(&args);
    assert_eq!(
        status.status.code(),
        Some(0),
        "{}",
        exec_support::stdout(&status)
    );
}
