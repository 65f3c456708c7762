//! Evaluate settings that only the data can refute (accuracy labels that no row has, a few-shot k
//! larger than the demonstrations there are) fail the run as soon as the template's artifact
//! exists, before the train stage starts, with an error naming the pipeline file and the field;
//! nothing of the failing configuration is cached, and once the file is fixed the run goes
//! through. Drives the binary on the cut-down quickstart of `train_support`.

mod train_support;

use train_support::{stderr, RunResult, TrainProject, PIPELINE};

/// `--json run FILE` that must fail with exit code 1: its summary.
fn run_failing(project: &TrainProject, file: &str) -> RunResult {
    let output = project.run(&["--json", "run", file, "--no-report"]);
    assert_eq!(output.status.code(), Some(1), "{}", stderr(&output));
    RunResult::new(&output)
}

fn stage_error(result: &RunResult, stage: &str) -> String {
    result.json["stages"]
        .as_array()
        .and_then(|stages| stages.iter().find(|entry| entry["name"] == stage))
        .and_then(|entry| entry["error"].as_str())
        .unwrap_or_default()
        .to_string()
}

fn check_fails_before_training(yaml: &str, field: &str, says: &str) {
    let project = TrainProject::new();
    project.write("pipeline.yaml", yaml);
    let result = run_failing(&project, "pipeline.yaml");
    assert_eq!(result.status("train"), "skipped", "{}", result.json);
    assert_eq!(result.status("evaluate"), "failed", "{}", result.json);
    let error = stage_error(&result, "evaluate");
    assert!(
        error.contains("pipeline.yaml") && error.contains(field) && error.contains(says),
        "{error}"
    );
    // Nothing trained, nothing of the evaluate stage recorded.
    let recorded = project.recorded_outputs("quick");
    assert!(!recorded.contains_key("train"), "{recorded:?}");
    assert!(!recorded.contains_key("evaluate"), "{recorded:?}");
    // Again: the same error, still before training (no cached success, no skipped check).
    let again = run_failing(&project, "pipeline.yaml");
    assert_eq!(again.status("train"), "skipped");
    assert_eq!(stage_error(&again, "evaluate"), error);
    // Fixed: the run goes through, and `status` keeps no stale error.
    project.write("pipeline.yaml", PIPELINE);
    let fixed = project.run_ok("pipeline.yaml", &["--no-report"]);
    assert_eq!(fixed.status("train"), "ran");
    assert_eq!(fixed.status("evaluate"), "ran");
    let status = project.run(&["status", "pipeline.yaml"]);
    let status = String::from_utf8_lossy(&status.stdout).into_owned();
    assert!(!status.contains("failed"), "{status}");
}

#[test]
fn accuracy_labels_no_row_has_fail_the_run_before_training() {
    let yaml = PIPELINE.replace("labels: [positive, negative]", "labels: [pos, neg]");
    check_fails_before_training(
        &yaml,
        "stages.evaluate.evaluate.metrics.accuracy.labels",
        "pos, neg",
    );
}

#[test]
fn a_few_shot_k_beyond_the_demonstrations_fails_the_run_before_training() {
    let yaml = PIPELINE.replace(
        "      samples: 0\n",
        "      samples: 0\n      few_shot: {k: [1000]}\n",
    );
    check_fails_before_training(
        &yaml,
        "stages.evaluate.evaluate.few_shot.k",
        "demonstration(s) are available",
    );
}
