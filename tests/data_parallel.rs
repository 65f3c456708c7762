//! `devices:` / `run --devices N` end to end through the binary (issue 12): the train stage
//! launches `peftpipe train-rank` processes, rank 0 writes the artifact, the stage forwards its
//! progress and outcome. CI has no GPU, so these run the world of one device on the CPU (one
//! worker process, the same launch path); several GPUs are the H200 host's (benches/gpu).

mod report_support;

use report_support::{stderr, stdout, Project};

/// The train stage's entry of `run --json`.
fn train_entry(output: &std::process::Output) -> serde_json::Value {
    let summary: serde_json::Value = serde_json::from_str(&stdout(output)).expect("--json");
    summary["stages"]
        .as_array()
        .and_then(|stages| stages.iter().find(|stage| stage["name"] == "train"))
        .cloned()
        .unwrap_or_else(|| panic!("no train stage in {summary}"))
}

/// The project's pipeline with `devices: DEVICES` in its train stage.
fn with_devices(project: &Project, devices: &str) {
    let yaml = std::fs::read_to_string(project.path("pipeline.yaml")).unwrap();
    let edited = yaml.replace(
        "      device: cpu\n  evaluate:",
        &format!("      device: cpu\n      devices: {devices}\n  evaluate:"),
    );
    assert_ne!(edited, yaml, "the tiny pipeline's train stage moved");
    project.write("pipeline.yaml", &edited);
}

fn adapter_bytes(project: &Project) -> Vec<u8> {
    std::fs::read(project.path(".peftpipe/out/tiny/train/adapter/adapter_model.safetensors"))
        .expect("the train artifact's adapter")
}

#[test]
fn one_device_in_a_worker_process_trains_the_in_process_adapter() {
    let in_process = Project::tiny();
    in_process.ok(&["run", "pipeline.yaml", "--stage", "train"]);
    let expected = adapter_bytes(&in_process);

    let worker = Project::tiny();
    let output = worker.ok(&[
        "run",
        "pipeline.yaml",
        "--stage",
        "train",
        "--devices",
        "1",
        "--json",
    ]);
    assert_eq!(
        adapter_bytes(&worker),
        expected,
        "the worker process trained another adapter"
    );
    let train = train_entry(&output);
    assert_eq!(train["status"], "ran", "{train}");
    assert_eq!(train["outcome"]["devices"], 1, "{train}");
    assert!(train["outcome"]["final_loss"].as_f64().is_some(), "{train}");

    // `devices` is not part of the fingerprint: the in-process project's adapter is reused.
    let rerun = in_process.ok(&[
        "run",
        "pipeline.yaml",
        "--stage",
        "train",
        "--devices",
        "1",
        "--json",
    ]);
    let rerun = train_entry(&rerun);
    assert_ne!(rerun["status"], "ran", "the train stage ran again: {rerun}");
    assert_ne!(rerun["cache"], "miss", "{rerun}");
}

#[test]
fn devices_in_the_pipeline_go_through_the_worker_too() {
    let project = Project::tiny();
    with_devices(&project, "[0]");
    let output = project.ok(&["run", "pipeline.yaml", "--stage", "train", "--json"]);
    let train = train_entry(&output);
    assert_eq!(train["outcome"]["devices"], 1, "{train}");
}

#[test]
fn a_failing_rank_fails_the_stage_with_its_message_and_caches_nothing() {
    let project = Project::tiny();
    // Every example longer than 4 tokens is dropped: the rank finds nothing to train on.
    let output = project.peftpipe(&[
        "run",
        "pipeline.yaml",
        "--stage",
        "train",
        "--devices",
        "1",
        "--set",
        "stages.train.train.max_seq_len=4",
        "--set",
        "stages.train.train.truncation=drop",
    ]);
    assert!(!output.status.success());
    let text = stderr(&output);
    assert!(
        text.contains("training on 1 device(s): rank 0 (GPU 0) failed"),
        "{text}"
    );
    assert!(text.contains("no example left to train on"), "{text}");
    assert!(
        !project.path(".peftpipe/out/tiny/train").exists(),
        "a failed stage left an output"
    );
}

#[test]
fn several_devices_on_the_cpu_are_refused_before_anything_runs() {
    let project = Project::tiny();
    let output = project.peftpipe(&["run", "pipeline.yaml", "--stage", "train", "--devices", "2"]);
    assert!(!output.status.success());
    let text = stderr(&output);
    assert!(text.contains("several devices needs CUDA"), "{text}");

    with_devices(&project, "[0, 1]");
    let invalid = project.peftpipe(&["validate", "pipeline.yaml"]);
    assert!(!invalid.status.success());
    let text = stderr(&invalid);
    assert!(text.contains("devices"), "{text}");
    assert!(text.contains("needs CUDA"), "{text}");
}
