//! The concurrency suite, on a five-stage training pipeline driven through the real binary: the
//! same pipeline run twice at once, two pipelines sharing a train config (each trains with its own
//! checkpoints, neither resumes the other's), and `gc` during runs (it waits for them and removes
//! nothing a run uses; afterwards it collects orphaned checkpoints and publish leftovers and
//! keeps the checkpoint a killed run will resume).

mod train_support;

use std::time::Duration;

use train_support::{tree, TrainProject, PIPELINE, STAGES};

#[test]
fn the_same_pipeline_twice_at_once() {
    let project = TrainProject::new();
    let first = project.spawn("pipeline.yaml", &[]);
    let second = project.spawn("pipeline.yaml", &[]);
    let (first_code, first_text) = first.finish();
    let (second_code, second_text) = second.finish();
    assert_eq!(first_code, Some(0), "{first_text}");
    assert_eq!(second_code, Some(0), "{second_text}");
    // One took turns with the other and then found everything done.
    let texts = [&first_text, &second_text];
    let waited: Vec<&&String> = texts
        .iter()
        .filter(|text| text.contains("Waiting for the cache lock of pipeline"))
        .collect();
    assert_eq!(waited.len(), 1, "{texts:?}");
    assert!(!waited[0].contains("Running"), "{}", waited[0]);
    let together = project.recorded_outputs("quick");

    project.wipe();
    project.run_ok("pipeline.yaml", &[]);
    assert_eq!(together, project.recorded_outputs("quick"));
}

#[test]
fn two_pipelines_sharing_a_train_config_keep_their_checkpoints_apart() {
    let project = TrainProject::new();
    project.write(
        "other.yaml",
        &PIPELINE
            .replace("name: quick", "name: other")
            .replace("exported/adapter", "exported/other-adapter"),
    );
    // Slow checkpoint writes so that both trainers are writing checkpoints at the same time.
    let slow = [("PEFTPIPE_TEST_CHECKPOINT_DELAY", "150")];
    let mut first = project.spawn("pipeline.yaml", &slow);
    let second = project.spawn("other.yaml", &slow);
    // Both train at once, each in its own checkpoint folder (same fingerprint, other pipeline).
    let apart = first.wait_until(Duration::from_secs(60), || {
        let dirs = project.checkpoint_dirs();
        dirs.iter()
            .any(|dir| dir.to_string_lossy().contains("/quick/train/"))
            && dirs
                .iter()
                .any(|dir| dir.to_string_lossy().contains("/other/train/"))
    });
    assert!(apart, "{:?}", project.checkpoint_dirs());
    let fingerprints: std::collections::BTreeSet<_> = project
        .checkpoint_dirs()
        .iter()
        .map(|dir| dir.file_name().unwrap().to_owned())
        .collect();
    assert_eq!(fingerprints.len(), 1, "one train fingerprint, two folders");
    let (first_code, first_text) = first.finish();
    let (second_code, second_text) = second.finish();
    assert_eq!(first_code, Some(0), "{first_text}");
    assert_eq!(second_code, Some(0), "{second_text}");
    for text in [&first_text, &second_text] {
        assert!(!text.contains("Waiting"), "they ran side by side: {text}");
        assert!(text.contains("Running train (train)"), "{text}");
        assert!(!text.contains("resumed from the checkpoint"), "{text}");
    }
    let quick = project.recorded_outputs("quick");
    let other = project.recorded_outputs("other");
    assert_eq!(quick, other, "same config, same results");
    assert_eq!(
        tree(&project.path("exported/adapter")),
        tree(&project.path("exported/other-adapter"))
    );
    assert!(project.checkpoint_dirs().is_empty(), "both cleaned up");

    project.wipe();
    project.run_ok("pipeline.yaml", &[]);
    assert_eq!(quick, project.recorded_outputs("quick"), "as a clean run");
}

#[test]
fn gc_during_a_run_waits_for_it_and_removes_nothing_it_uses() {
    let project = TrainProject::new();
    let mut running = project.spawn(
        "pipeline.yaml",
        &[("PEFTPIPE_TEST_CHECKPOINT_DELAY", "200")],
    );
    assert!(
        running.wait_until(Duration::from_secs(60), || project
            .has_complete_checkpoint()),
        "{:?}",
        running.seen
    );
    let gc = project.run(&["gc", "pipeline.yaml"]);
    // gc got the cache lock only once the run was over: every stage was recorded by then.
    let recorded_before_gc_ended = project.recorded_outputs("quick").len();
    assert!(
        gc.status.success(),
        "{}",
        String::from_utf8_lossy(&gc.stderr)
    );
    let gc_text = String::from_utf8_lossy(&gc.stderr).into_owned();
    assert!(gc_text.contains("waiting for the cache lock"), "{gc_text}");
    assert_eq!(recorded_before_gc_ended, STAGES.len());
    let (code, text) = running.finish();
    assert_eq!(code, Some(0), "{text}");
    // Everything the run made is still there and fresh; the finished run's checkpoints are gone.
    let check = project.run(&["status", "--check", "pipeline.yaml"]);
    assert_eq!(check.status.code(), Some(0));
    let again = project.run_ok("pipeline.yaml", &[]);
    assert!(again.ran().is_empty(), "{}", again.stderr);
    assert!(project.checkpoint_dirs().is_empty());
}

#[test]
fn gc_after_a_kill_keeps_the_checkpoint_to_resume_and_collects_orphans() {
    let project = TrainProject::new();
    project.run_ok("pipeline.yaml", &[]);
    let finished = project.lock_file("quick")["stages"]["train"]["fingerprint"]
        .as_str()
        .expect("train fingerprint")
        .to_string();

    // A run with another learning rate, killed after its first checkpoint: the next run with
    // that setting resumes it, so gc keeps it.
    let set = ["--set", "stages.train.train.learning_rate=0.002"];
    let mut command = project.command(&["run", "pipeline.yaml", set[0], set[1]]);
    command.env("PEFTPIPE_TEST_CHECKPOINT_DELAY", "200");
    let mut running = train_support::Running::start(command);
    assert!(
        running.wait_until(Duration::from_secs(60), || project
            .has_complete_checkpoint()),
        "{:?}",
        running.seen
    );
    running.kill();
    let live = project.checkpoint_dirs();
    assert_eq!(live.len(), 1);

    // Orphans: checkpoints of a pipeline this cache has no lock file for, of the fingerprint
    // the lock file records as finished, of an older attempt of the stage; and the leftovers
    // of an interrupted publish and of an interrupted materialization.
    let root = project.path(".peftpipe/cache/checkpoints");
    let step = |dir: &std::path::Path, age: u64| {
        let step = dir.join("step-00000002");
        std::fs::create_dir_all(&step).unwrap();
        std::fs::write(step.join("state.json"), "{}").unwrap();
        let when = std::time::SystemTime::now() - Duration::from_secs(age);
        std::fs::File::open(&step)
            .unwrap()
            .set_modified(when)
            .unwrap();
    };
    let gone = root.join("gone/train/0123");
    step(&gone, 1);
    let done = root.join("quick/train").join(&finished);
    step(&done, 1);
    let older = root.join("quick/train/4567");
    step(&older, 3600);
    let publish_tmp = project.path("exported/.adapter.peftpipe-tmp-Xy12");
    std::fs::create_dir_all(&publish_tmp).unwrap();
    std::fs::write(publish_tmp.join("adapter_model.safetensors"), "half").unwrap();
    let partial = project.path(".peftpipe/out/quick/.train.partial-Ab34");
    std::fs::create_dir_all(&partial).unwrap();
    let orphans = [&gone, &done, &older, &publish_tmp, &partial];

    let dry = project.run(&["gc", "--dry-run", "pipeline.yaml"]);
    assert!(dry.status.success());
    assert!(
        orphans.iter().all(|path| path.exists()),
        "a dry run removes nothing"
    );

    let gc = project.run(&["--json", "gc", "pipeline.yaml"]);
    assert!(
        gc.status.success(),
        "{}",
        String::from_utf8_lossy(&gc.stderr)
    );
    let report: serde_json::Value = serde_json::from_slice(&gc.stdout).expect("gc --json");
    assert_eq!(report["checkpoints_removed"], 3, "{report}");
    assert_eq!(report["checkpoints_kept"], 1, "{report}");
    assert_eq!(report["publish_leftovers_removed"], 2, "{report}");
    for path in orphans {
        assert!(!path.exists(), "{} is an orphan", path.display());
    }
    assert_eq!(project.checkpoint_dirs(), live, "the live checkpoint stays");
    assert!(project
        .path("exported/adapter/adapter_model.safetensors")
        .is_file());

    // The next run with that setting resumes the kept checkpoint.
    let resumed = project.run_ok("pipeline.yaml", &set);
    assert!(resumed.resumed(), "{}", resumed.stderr);
    assert!(project.checkpoint_dirs().is_empty());
}
