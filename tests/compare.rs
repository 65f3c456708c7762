//! One evaluate stage comparing every method on the same rows (issue 9, items 5 and 8): the
//! pipelines in pipelines/methods-*.yaml validate, and the quickstart one, made small, runs end
//! to end on the CPU — six trained methods from one `matrix:` stage (`adapters: [train@*]`), the
//! base model and few-shot k = 1, 2, 4 — writing comparison.json / comparison.md with a row and
//! numbers for every candidate, which the run summary prints and the HTML report shows.
#![expect(clippy::print_stderr, reason = "tests print skip reasons")]

mod train_support;

use std::path::Path;

use train_support::{stderr, TrainProject};

fn validate(pipeline: &Path) -> serde_json::Value {
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_peftpipe"))
        .args(["--json", "validate"])
        .arg(pipeline)
        .env("NO_COLOR", "1")
        .output()
        .expect("run peftpipe");
    assert!(output.status.success(), "{}", stderr(&output));
    serde_json::from_slice(&output.stdout).expect("JSON")
}

const METHODS: [&str; 7] = [
    "lora",
    "dora",
    "qlora",
    "ia3",
    "prompt_tuning",
    "prefix_tuning",
    "llama_adapter",
];

fn expected_stages(data: &[&str]) -> serde_json::Value {
    let mut stages: Vec<String> = data.iter().map(|s| s.to_string()).collect();
    stages.extend(METHODS.iter().map(|method| format!("train@{method}")));
    stages.push("compare".into());
    serde_json::json!(stages)
}

#[test]
fn the_methods_pipelines_are_valid_and_expand_every_method() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("pipelines");
    let json = validate(&root.join("methods-quickstart.yaml"));
    assert_eq!(
        json["files"][0]["stages"],
        expected_stages(&["data", "prompts"])
    );
    if std::env::var_os("PEFTPIPE_SHARED").is_none() {
        eprintln!("skipped methods-stories.yaml: PEFTPIPE_SHARED not set");
        return;
    }
    let json = validate(&root.join("methods-stories.yaml"));
    assert_eq!(
        json["files"][0]["stages"],
        expected_stages(&["train_data", "validation_data", "stories", "validation"])
    );
}

#[test]
fn every_method_and_few_shot_k_get_a_row_with_numbers() {
    let pipeline = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("pipelines/methods-quickstart.yaml"),
    )
    .expect("the pipeline");
    // Small: the project's copies of the data and model, 2 epochs, 24 evaluated rows.
    let small = pipeline
        .replace(
            "../datasets/quickstart/reviews.parquet",
            "data/reviews.parquet",
        )
        .replace("../datasets/quickstart/model", "model")
        .replace("epochs: 8", "epochs: 2")
        .replace(
            "      samples: 0\n",
            "      samples: 0\n      max_rows: 24\n",
        );
    assert_ne!(small, pipeline);
    let project = TrainProject::with_pipeline(&small);
    let run = project.run_ok("pipeline.yaml", &[]);
    let out = project.path(".peftpipe/out/methods-quickstart/compare");
    let comparison: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(out.join("comparison.json")).expect("comparison.json"),
    )
    .expect("JSON");
    assert_eq!(comparison["rows"], 24);
    let rows = comparison["candidates"].as_array().expect("candidates");
    let names: Vec<&str> = rows
        .iter()
        .map(|row| row["candidate"].as_str().unwrap_or_default())
        .collect();
    let mut expected = vec!["base", "few-shot k=1", "few-shot k=2", "few-shot k=4"];
    let trained: Vec<String> = METHODS.iter().map(|m| format!("train@{m}")).collect();
    expected.extend(trained.iter().map(String::as_str));
    assert_eq!(names, expected);
    for row in rows {
        let name = &row["candidate"];
        for figure in ["loss", "perplexity", "accuracy"] {
            let value = row[figure].as_f64().unwrap_or(f64::NAN);
            assert!(value.is_finite(), "{name}: {figure} = {}", row[figure]);
        }
        let accuracy = row["accuracy"].as_f64().unwrap_or(-1.0);
        assert!((0.0..=1.0).contains(&accuracy), "{name}");
        match row["kind"].as_str() {
            Some("adapter") => {
                assert!(
                    row["trainable_parameters"].as_u64().unwrap_or(0) > 0,
                    "{name}"
                );
                // Timings differ between runs of the same inputs: never in the cached output.
                assert!(row["train_seconds"].is_null(), "{name}");
                assert!(row["tokens_per_second"].is_null(), "{name}");
            }
            _ => assert_eq!(row["trainable_parameters"], 0, "{name}"),
        }
    }
    let methods: Vec<&str> = rows[4..]
        .iter()
        .map(|row| row["method"].as_str().unwrap_or_default())
        .collect();
    assert_eq!(methods, METHODS);
    // Different prompts, different figures: the demonstrations reach the model.
    assert_ne!(rows[0]["loss"], rows[3]["loss"]);
    // LoRA and DoRA learn the task within two epochs: lower loss than the untrained base model.
    for row in &rows[4..6] {
        assert!(
            row["loss"].as_f64() < rows[0]["loss"].as_f64(),
            "{}: {} vs base {}",
            row["candidate"],
            row["loss"],
            rows[0]["loss"]
        );
    }
    let markdown = std::fs::read_to_string(out.join("comparison.md")).expect("comparison.md");
    for name in &expected {
        assert!(
            markdown.contains(&format!("| {name} |")),
            "{name}:\n{markdown}"
        );
    }
    assert!(
        markdown.contains("| trainable params | eval loss |"),
        "{markdown}"
    );
    // The run's summary carries the table for the reporter; metrics.json keeps every candidate.
    assert_eq!(run.outcome("compare")["candidates"], 11);
    let metrics: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(out.join("metrics.json")).expect("metrics.json"),
    )
    .expect("JSON");
    assert!(metrics["candidates"]["few-shot k=4"]["accuracy"].is_object());

    // Rerun: everything fresh; the terminal summary prints the comparison table.
    let output = project.run(&["run", "pipeline.yaml"]);
    assert!(output.status.success(), "{}", stderr(&output));
    let text = stderr(&output);
    assert!(
        text.contains("compare: 11 candidates on split `eval` (24 rows)"),
        "{text}"
    );
    assert!(text.contains("few-shot k=4"), "{text}");
    // The HTML report shows the table and a bar chart per figure.
    let output = project.run(&["report", "pipeline.yaml"]);
    assert!(output.status.success(), "{}", stderr(&output));
    let page =
        std::fs::read_to_string(project.path(".peftpipe/out/methods-quickstart/report.html"))
            .expect("report.html");
    assert!(
        page.contains("<h3>Comparison</h3>"),
        "no comparison in the report"
    );
    assert!(page.contains("train@prefix_tuning"));
}

/// Few-shot prompting alone: no train stage, the base model named by `base_model` (its files in
/// the fingerprint: a changed model file makes the stage dirty), k = 0 and 2 with the `first_k`
/// strategy.
#[test]
fn few_shot_alone_evaluates_a_base_model_without_training() {
    let project = TrainProject::with_pipeline(
        r#"name: shots
seed: 3
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
  compare:
    evaluate:
      base_model: model
      data: prompts
      max_rows: 8
      few_shot: {k: [0, 2], strategy: first_k}
      metrics:
        accuracy: {choices: [" positive", " negative"], labels: [positive, negative], label_column: label}
      samples: 0
      device: cpu
"#,
    );
    project.run_ok("pipeline.yaml", &[]);
    let comparison: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(project.path(".peftpipe/out/shots/compare/comparison.json"))
            .expect("comparison.json"),
    )
    .expect("JSON");
    let rows = comparison["candidates"].as_array().expect("candidates");
    assert_eq!(rows.len(), 2);
    assert_eq!(rows[0]["candidate"], "base");
    assert_eq!(rows[1]["candidate"], "few-shot k=2");
    assert_eq!(rows[1]["k"], 2);
    for row in rows {
        assert!(row["accuracy"].as_f64().is_some(), "{row}");
        assert!(row["train_seconds"].is_null(), "{row}");
    }
    // The base model's files are inputs of the stage.
    let tokenizer_config = project.path("model/tokenizer_config.json");
    let text = std::fs::read_to_string(&tokenizer_config).expect("tokenizer_config.json");
    std::fs::write(&tokenizer_config, format!("{text}\n")).expect("write");
    let output = project.run(&["status", "pipeline.yaml"]);
    let status = String::from_utf8_lossy(&output.stdout).into_owned();
    assert!(status.contains("[DIRTY] compare"), "{status}");
    assert!(status.contains("[FRESH] prompts"), "{status}");
}
