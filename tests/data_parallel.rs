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

/// `torchrun … peftpipe run`: every process has torchrun's variables; rank 0 runs the pipeline and
/// hands the train stage's job to rank 1 through the rendezvous. This build has no NCCL (CI has
/// no GPU), so both ranks then fail to form the communicator — which shows the job reached rank
/// 1, both fail with a clear error, rank 0 still dismisses rank 1, and nothing is cached.
#[test]
fn under_torchrun_variables_rank_0_hands_the_train_job_to_the_other_ranks() {
    let project = Project::tiny();
    let port = std::net::TcpListener::bind(("127.0.0.1", 0))
        .and_then(|listener| listener.local_addr())
        .map(|address| address.port())
        .expect("a free port");
    let start = |rank: usize| {
        std::process::Command::new(env!("CARGO_BIN_EXE_peftpipe"))
            .args(["run", "pipeline.yaml", "--stage", "train"])
            .current_dir(&project.root)
            .env_remove("PEFTPIPE_CACHE_DIR")
            .env("NO_COLOR", "1")
            .envs([
                ("RANK", rank.to_string()),
                ("LOCAL_RANK", rank.to_string()),
                ("WORLD_SIZE", "2".to_string()),
                ("MASTER_ADDR", "127.0.0.1".to_string()),
                ("MASTER_PORT", port.to_string()),
            ])
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .expect("start peftpipe")
    };
    let started = std::time::Instant::now();
    let follower = start(1);
    let leader = start(0);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(120);
    let finish = |mut child: std::process::Child| {
        while child.try_wait().expect("wait").is_none() {
            if std::time::Instant::now() > deadline {
                let _ = child.kill();
                panic!("a rank did not finish within 120 s");
            }
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
        child.wait_with_output().expect("output")
    };
    let leader = finish(leader);
    let follower = finish(follower);
    let (leader_text, follower_text) = (stderr(&leader), stderr(&follower));
    assert_eq!(leader.status.code(), Some(1), "{leader_text}");
    assert!(
        leader_text.contains("training on 2 ranks (torchrun's world)"),
        "{leader_text}"
    );
    assert!(leader_text.contains("NCCL"), "{leader_text}");
    assert!(!follower.status.success(), "{follower_text}");
    assert!(
        follower_text.contains("rank 1: training failed") && follower_text.contains("NCCL"),
        "{follower_text}"
    );
    // Dismissed by rank 0 at the end of its run (not left waiting for a next job).
    assert!(
        follower_text.contains("1 training job(s) failed on this rank"),
        "{follower_text}"
    );
    assert!(
        started.elapsed() < std::time::Duration::from_secs(30),
        "the ranks took {:?}",
        started.elapsed()
    );
    assert!(
        !project.path(".peftpipe/out/tiny/train").exists(),
        "a failed stage left an output"
    );
}
