//! A `matrix:` pipeline driven through the binary on the quickstart's data and tiny model: two
//! LoRA ranks expanded from one train stage (`train@small`, `train@big`), each scored by an
//! evaluate expansion, over one ingest and one template stage that run once. Each expansion has
//! its own `status` line, fingerprint, cache entry and output folder; changing one matrix value
//! reruns only that expansion and what reads it, with the reason.

mod train_support;

use train_support::{stderr, TrainProject};

const PIPELINE: &str = r#"name: ranks
seed: 17
stages:
  data:
    ingest:
      path: data/reviews.parquet
      columns: [text, label]
      drop_nulls: true
      limit: 200
      split:
        fractions: {train: 0.8, eval: 0.2}
        stratify_by: label
  prompts:
    template:
      input: data
      prompt: "review: {{ text }}\nsentiment:"
      completion: " {{ label }}"
      label: label
  train:
    matrix:
      rank: {small: 2, big: 4}
    train:
      data: prompts
      model: model
      method:
        lora:
          r: ${item.rank}
          alpha: 8
          target_modules: all-linear
      learning_rate: 0.01
      batch_size: 16
      max_steps: 3
      checkpoint_every: 0
      max_seq_len: 48
      device: cpu
  evaluate:
    matrix:
      run: [small, big]
    evaluate:
      model: train@${item.run}
      data: prompts
      max_rows: 16
      samples: 0
      device: cpu
"#;

fn status(project: &TrainProject, file: &str) -> String {
    let output = project.run(&["status", file]);
    assert!(output.status.success(), "{}", stderr(&output));
    String::from_utf8_lossy(&output.stdout).into_owned()
}

fn adapter_rank(project: &TrainProject, stage: &str) -> serde_json::Value {
    let path = project.path(&format!(
        ".peftpipe/out/ranks/{stage}/adapter/adapter_config.json"
    ));
    let text = std::fs::read_to_string(&path)
        .unwrap_or_else(|error| panic!("{}: {error}", path.display()));
    let config: serde_json::Value = serde_json::from_str(&text).expect("adapter_config.json");
    config["r"].clone()
}

#[test]
fn a_two_rank_matrix_runs_each_expansion_over_data_prepared_once() {
    let project = TrainProject::with_pipeline(PIPELINE);
    assert_eq!(
        status(&project, "pipeline.yaml"),
        "[DIRTY] data: never run\n[DIRTY] prompts: never run\n\
         [DIRTY] train@small: never run\n[DIRTY] train@big: never run\n\
         [DIRTY] evaluate@small: never run\n[DIRTY] evaluate@big: never run\n"
    );
    let first = project.run_ok("pipeline.yaml", &[]);
    assert_eq!(
        first.ran(),
        [
            "data",
            "prompts",
            "train@small",
            "train@big",
            "evaluate@small",
            "evaluate@big"
        ]
    );
    // Both adapters are there, each with its own rank and its own cache entry.
    assert_eq!(adapter_rank(&project, "train@small"), 2);
    assert_eq!(adapter_rank(&project, "train@big"), 4);
    assert_ne!(first.output("train@small"), first.output("train@big"));
    for stage in ["evaluate@small", "evaluate@big"] {
        assert!(
            project
                .path(&format!(".peftpipe/out/ranks/{stage}/metrics.json"))
                .is_file(),
            "{stage}"
        );
    }
    let lock = project.lock_file("ranks");
    assert_ne!(
        lock["stages"]["train@small"]["fingerprint"],
        lock["stages"]["train@big"]["fingerprint"]
    );

    // Stable: reading the file again finds everything fresh.
    let all_fresh = "[FRESH] data\n[FRESH] prompts\n[FRESH] train@small\n[FRESH] train@big\n\
                     [FRESH] evaluate@small\n[FRESH] evaluate@big\n";
    assert_eq!(status(&project, "pipeline.yaml"), all_fresh);

    // One matrix value changes: that expansion and its reader rerun, with the reason.
    project.write(
        "pipeline.yaml",
        &PIPELINE.replace("{small: 2, big: 4}", "{small: 2, big: 8}"),
    );
    let changed = status(&project, "pipeline.yaml");
    let lines: Vec<&str> = changed.lines().collect();
    assert_eq!(
        lines[..4],
        [
            "[FRESH] data",
            "[FRESH] prompts",
            "[FRESH] train@small",
            "[DIRTY] train@big: parameter train.method.lora.r changed (4 → 8)",
        ],
        "{changed}"
    );
    assert_eq!(lines[4], "[FRESH] evaluate@small", "{changed}");
    assert!(lines[5].starts_with("[DIRTY] evaluate@big: "), "{changed}");
    let second = project.run_ok("pipeline.yaml", &[]);
    assert_eq!(second.ran(), ["train@big", "evaluate@big"]);
    assert_eq!(adapter_rank(&project, "train@big"), 8);
    assert_eq!(second.output("train@small"), first.output("train@small"));

    // Renaming the matrix key (and its reference) changes no stage.
    project.write(
        "pipeline.yaml",
        &PIPELINE
            .replace("{small: 2, big: 4}", "{small: 2, big: 8}")
            .replace("rank:", "lora_rank:")
            .replace("${item.rank}", "${item.lora_rank}"),
    );
    assert_eq!(status(&project, "pipeline.yaml"), all_fresh);

    // The matrix stage's name selects (and `--force` forces) all its expansions.
    let selected = project.run_ok("pipeline.yaml", &["--stage", "train", "--force"]);
    assert_eq!(selected.ran(), ["train@small", "train@big"]);
    assert_eq!(selected.status("data"), "fresh");
}

#[test]
fn the_quickstart_sweep_pipeline_is_valid_and_expands_to_ten_stages() {
    let pipeline =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("pipelines/quickstart-sweep.yaml");
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_peftpipe"))
        .args(["--json", "validate"])
        .arg(&pipeline)
        .env("NO_COLOR", "1")
        .output()
        .expect("run peftpipe");
    assert!(output.status.success(), "{}", stderr(&output));
    let json: serde_json::Value = serde_json::from_slice(&output.stdout).expect("JSON");
    assert_eq!(
        json["files"][0]["stages"],
        serde_json::json!([
            "data",
            "prompts",
            "train@r4-0_003",
            "train@r4-0_01",
            "train@r8-0_003",
            "train@r8-0_01",
            "evaluate@r4-0_003",
            "evaluate@r4-0_01",
            "evaluate@r8-0_003",
            "evaluate@r8-0_01"
        ])
    );
}
