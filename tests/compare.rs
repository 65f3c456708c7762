//! One evaluate stage comparing every method on the same rows (issue 9, items 5 and 8): the
//! pipelines in pipelines/methods-*.yaml validate, and the quickstart one, made small, runs end
//! to end on the CPU — six trained methods from one `matrix:` stage (`adapters: [train@*]`), the
//! base model and few-shot k = 1, 2, 4 — writing comparison.json / comparison.md with a row and
//! numbers for every candidate, which the run summary prints and the HTML report shows; what
//! training cost (train time, tokens/s, peak memory) is joined in from the train stages' run
//! records when shown, never cached.
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

/// The quickstart comparison, tiny: LoRA and prompt tuning trained for one epoch, the base model
/// and few-shot k = 1, on 16 rows.
const TINY_COMPARISON: &str = r#"
name: costs
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
      run:
        lora: {method: {lora: {r: 4, alpha: 8, target_modules: all-linear}}, lr: 0.003}
        prompt_tuning: {method: {prompt_tuning: {num_virtual_tokens: 4, init: sample_vocab}}, lr: 0.3}
    train:
      data: prompts
      model: model
      method: ${item.run.method}
      learning_rate: ${item.run.lr}
      batch_size: 16
      epochs: 1
      max_seq_len: 48
      device: cpu
  compare:
    evaluate:
      adapters: [train@*]
      data: prompts
      few_shot:
        k: [0, 1]
        strategy: first_k
      metrics:
        accuracy:
          choices: [" positive", " negative"]
          labels: [positive, negative]
          label_column: label
      samples: 0
      max_rows: 16
      device: cpu
"#;

/// The comparison a user reads shows each trained candidate's train time, tokens/s and peak
/// memory (joined from the train stages' run records at display time), while the cached
/// comparison.json holds none of them and is byte-identical across two clean runs; a cache hit
/// shows the figures the producing run recorded and says so.
#[test]
fn the_displayed_comparison_joins_training_costs_that_the_cached_one_never_holds() {
    let project = TrainProject::with_pipeline(TINY_COMPARISON);
    let comparison_file = ".peftpipe/out/costs/compare/comparison.json";
    let first_run = project.run(&["run", "pipeline.yaml"]);
    assert!(first_run.status.success(), "{}", stderr(&first_run));
    let first = std::fs::read(project.path(comparison_file)).expect("comparison.json");
    let first_markdown =
        std::fs::read(project.path(".peftpipe/out/costs/compare/comparison.md")).expect("md");
    let cached: serde_json::Value = serde_json::from_slice(&first).expect("JSON");
    for row in cached["candidates"].as_array().expect("candidates") {
        for figure in ["train_seconds", "tokens_per_second", "peak_memory_bytes"] {
            assert!(row[figure].is_null(), "{figure} in the cached {row}");
        }
    }

    // The run summary: the columns, filled for trained candidates, "—" for the others.
    let text = stderr(&first_run);
    let table = text
        .split("compare: 4 candidates")
        .nth(1)
        .unwrap_or_else(|| panic!("no comparison table:\n{text}"));
    let header = table.lines().nth(1).unwrap_or_default();
    for column in ["train time", "tokens/s", "peak memory"] {
        assert!(header.contains(column), "{header}");
    }
    let row_of = |table: &str, name: &str| -> String {
        table
            .lines()
            .find(|line| line.starts_with(&format!("{name} ")))
            .unwrap_or_else(|| panic!("no row {name}:\n{table}"))
            .to_string()
    };
    for trained in ["train@lora", "train@prompt_tuning"] {
        let row = row_of(table, trained);
        assert!(!row.contains('—'), "{row}");
        assert!(row.contains("iB"), "no peak memory in {row}");
    }
    for untrained in ["base", "few-shot k=1"] {
        let row = row_of(table, untrained);
        assert_eq!(row.matches('—').count(), 3, "{row}");
    }
    assert!(!table.contains("earlier run"), "{table}");
    // The train stage recorded them with the run (lock file), not in its artifact.
    let lock = project.lock_file("costs");
    let recorded = &lock["stages"]["train@lora"]["outcome"];
    let peak = recorded["peak_memory_bytes"].as_u64().unwrap_or(0);
    assert!(peak > 1 << 20, "{recorded}");
    assert_eq!(recorded["peak_memory_source"], "process_rss");
    assert!(recorded["wall_seconds"].as_f64().unwrap_or(0.0) > 0.0);

    // A second clean run: the cached comparison is byte-identical (no timings inside).
    project.wipe();
    let second_run = project.run(&["run", "pipeline.yaml"]);
    assert!(second_run.status.success(), "{}", stderr(&second_run));
    let second = std::fs::read(project.path(comparison_file)).expect("comparison.json");
    assert_eq!(
        String::from_utf8_lossy(&first),
        String::from_utf8_lossy(&second)
    );
    let second_markdown =
        std::fs::read(project.path(".peftpipe/out/costs/compare/comparison.md")).expect("md");
    assert_eq!(first_markdown, second_markdown);

    // A cache hit: the figures recorded by the run that produced the adapters, said to be so.
    let recorded_peak = project.lock_file("costs")["stages"]["train@lora"]["outcome"]
        ["peak_memory_bytes"]
        .as_u64()
        .expect("a recorded peak");
    let fresh_run = project.run(&["run", "pipeline.yaml"]);
    assert!(fresh_run.status.success(), "{}", stderr(&fresh_run));
    let text = stderr(&fresh_run);
    let table = text
        .split("compare: 4 candidates")
        .nth(1)
        .unwrap_or_else(|| panic!("no comparison table:\n{text}"));
    let shown = peftpipe::report::format::bytes(recorded_peak);
    assert!(
        row_of(table, "train@lora").contains(&shown),
        "{shown}:\n{table}"
    );
    assert!(
        table.contains(
            "train figures of train@lora, train@prompt_tuning: from the earlier run that produced"
        ),
        "{table}"
    );

    // `metrics show`: the same table from the lock file, and numbers in --json.
    let output = project.run(&["metrics", "show", "pipeline.yaml"]);
    assert!(output.status.success(), "{}", stderr(&output));
    let shown_text = String::from_utf8_lossy(&output.stdout).to_string();
    let table = shown_text
        .split("compare: 4 candidates")
        .nth(1)
        .unwrap_or_else(|| panic!("no comparison in metrics show:\n{shown_text}"));
    assert!(row_of(table, "train@lora").contains(&shown), "{table}");
    assert!(table.contains("peak memory: CPU"), "{table}");
    let output = project.run(&["--json", "metrics", "show", "pipeline.yaml"]);
    assert!(output.status.success(), "{}", stderr(&output));
    let json: serde_json::Value = serde_json::from_slice(&output.stdout).expect("JSON");
    let rows = json["comparisons"]["compare"]["candidates"]
        .as_array()
        .expect("the comparison in --json");
    let lora = rows
        .iter()
        .find(|row| row["candidate"] == "train@lora")
        .expect("train@lora");
    assert_eq!(lora["peak_memory_bytes"].as_u64(), Some(recorded_peak));
    assert!(lora["tokens_per_second"].as_f64().unwrap_or(0.0) > 0.0);
    let base = rows
        .iter()
        .find(|row| row["candidate"] == "base")
        .expect("base");
    assert!(base["train_seconds"].is_null());

    // The HTML report's comparison section.
    let output = project.run(&["report", "pipeline.yaml"]);
    assert!(output.status.success(), "{}", stderr(&output));
    let page = std::fs::read_to_string(project.path(".peftpipe/out/costs/report.html"))
        .expect("report.html");
    let section = page
        .split("<h3>Comparison</h3>")
        .nth(1)
        .expect("a comparison section");
    let section = section.split("</table>").next().unwrap_or_default();
    for column in ["train time", "tokens/s", "peak memory"] {
        assert!(section.contains(&format!("<th>{column}</th>")), "{section}");
    }
    assert!(section.contains(&shown), "{section}");
}

#[test]
fn accuracy_says_how_many_rows_have_a_label_outside_the_candidates() {
    // Rows whose label is none of the candidates' count as wrong whatever the model scores: the
    // run says how many, instead of a silently lower accuracy.
    let project = TrainProject::new();
    let run = project.run_ok(
        "pipeline.yaml",
        &[
            "--stage",
            "evaluate",
            "--set",
            "stages.evaluate.evaluate.metrics.accuracy.labels=[positive, neutral]",
        ],
    );
    assert!(
        run.stderr.contains("rows have a `label` value that is none of the candidates' labels (positive, neutral); they count as wrong"),
        "{}",
        run.stderr
    );
}
