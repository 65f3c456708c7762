//! Metrics a program and a person can read (issue 11, item 2): `run --json` reports figures as
//! numbers, `run`/`status --json` report an invalid pipeline as structured problems on stdout,
//! `metrics show` lists each stage's figures, `metrics diff` compares two pipelines or one
//! pipeline with its lock file at a git revision.
#![expect(clippy::print_stderr, reason = "a skipped check says why")]

mod report_support;

use report_support::{stderr, stdout, tiny_yaml, Project};

fn json(text: &str) -> serde_json::Value {
    serde_json::from_str(text).unwrap_or_else(|error| panic!("not JSON ({error}):\n{text}"))
}

/// Every string in a JSON document.
fn strings(value: &serde_json::Value, out: &mut Vec<String>) {
    match value {
        serde_json::Value::String(text) => out.push(text.clone()),
        serde_json::Value::Array(items) => items.iter().for_each(|item| strings(item, out)),
        serde_json::Value::Object(fields) => fields.values().for_each(|item| strings(item, out)),
        _ => {}
    }
}

#[test]
fn run_json_reports_figures_as_numbers() {
    let project = Project::tiny();
    let output = project.ok(&["run", "pipeline.yaml", "--json"]);
    let summary = json(&stdout(&output));
    let evaluate = summary["stages"]
        .as_array()
        .expect("stages")
        .iter()
        .find(|stage| stage["name"] == "evaluate")
        .expect("evaluate stage");
    let accuracy = &evaluate["outcome"]["accuracy"];
    assert!(accuracy["base"].is_f64(), "{accuracy}");
    assert!(accuracy["adapted"].is_f64(), "{accuracy}");
    assert!(evaluate["outcome"]["perplexity"]["adapted"].is_number());
    let mut texts = Vec::new();
    strings(&summary, &mut texts);
    assert!(
        texts.iter().all(|text| !text.contains('→')),
        "a preformatted figure in run --json: {texts:?}"
    );
    // The report the run wrote is named in the JSON too.
    let report = summary["report"].as_str().expect("report path");
    assert!(std::path::Path::new(report).is_file(), "{report}");
}

#[test]
fn run_and_status_json_report_an_invalid_pipeline_as_problems_on_stdout() {
    let project = Project::tiny();
    project.write(
        "pipeline.yaml",
        &tiny_yaml("tiny", 4).replace("learning_rate", "learning_rat"),
    );
    for command in ["run", "status"] {
        let output = project.peftpipe(&[command, "pipeline.yaml", "--json"]);
        assert_eq!(
            output.status.code(),
            Some(2),
            "{command}: {}",
            stderr(&output)
        );
        let document = json(&stdout(&output));
        assert_eq!(document["valid"], false, "{command}: {document}");
        let problems = document["files"][0]["problems"]
            .as_array()
            .expect("problems");
        assert!(!problems.is_empty(), "{command}: {document}");
        assert!(
            document.to_string().contains("learning_rat"),
            "{command}: the problem names the key: {document}"
        );
    }
}

#[test]
fn metrics_show_lists_each_stage_figure() {
    let project = Project::tiny();
    let before = project.ok(&["metrics", "show", "pipeline.yaml"]);
    assert!(
        stdout(&before).contains("no recorded metrics"),
        "{}",
        stdout(&before)
    );
    project.ok(&["run", "pipeline.yaml"]);
    let table = stdout(&project.ok(&["metrics", "show", "pipeline.yaml"]));
    let header = table.lines().next().expect("a header");
    assert!(header.starts_with("stage") && header.contains("metric") && header.contains("value"));
    for row in [
        "train     final_loss",
        "evaluate  accuracy.adapted",
        "evaluate  accuracy.base",
        "data      rows_kept",
    ] {
        assert!(table.contains(row), "{row} missing:\n{table}");
    }
    let document = json(&stdout(&project.ok(&[
        "metrics",
        "show",
        "pipeline.yaml",
        "--json",
    ])));
    assert_eq!(document["pipeline"], "tiny");
    assert_eq!(document["stages"]["train"]["steps"], 3.0);
    // A count is written as an integer, as the lock file records it (not `3.0`).
    assert!(document["stages"]["train"]["steps"].is_u64(), "{document}");
    assert!(document["stages"]["evaluate"]["accuracy.adapted"].is_f64());
    // One shape with or without a comparison of candidates: `comparisons` is always an object.
    assert!(document["comparisons"].is_object(), "{document}");
}

#[test]
fn metrics_diff_compares_two_pipelines() {
    let project = Project::tiny();
    project.write("wide.yaml", &tiny_yaml("wide", 16));
    project.ok(&["run", "pipeline.yaml"]);
    project.ok(&["run", "wide.yaml"]);
    let document = json(&stdout(&project.ok(&[
        "metrics",
        "diff",
        "pipeline.yaml",
        "wide.yaml",
        "--json",
        "--all",
    ])));
    assert_eq!(document["old"], "tiny");
    assert_eq!(document["new"], "wide");
    let rows = document["metrics"].as_array().expect("metrics");
    let find = |stage: &str, metric: &str| {
        rows.iter()
            .find(|row| row["stage"] == stage && row["metric"] == metric)
            .unwrap_or_else(|| panic!("{stage}.{metric} missing: {document}"))
    };
    // Rank 4 → 16: four times the trainable parameters; the data did not change.
    let parameters = find("train", "trainable_parameters");
    let (old, new) = (
        parameters["old"].as_f64().expect("old"),
        parameters["new"].as_f64().expect("new"),
    );
    assert_eq!(new, 4.0 * old, "{parameters}");
    assert_eq!(parameters["change"].as_f64(), Some(new - old));
    assert_eq!(find("data", "rows_kept")["change"].as_f64(), Some(0.0));
    // Counts and their changes stay integers in JSON; a fraction stays a fraction.
    for field in ["old", "new", "change"] {
        assert!(parameters[field].is_i64(), "{field}: {parameters}");
    }
    assert!(find("data", "rows_kept")["change"].is_i64());
    assert!(find("train", "final_loss")["new"].is_f64());

    let table = stdout(&project.ok(&["metrics", "diff", "pipeline.yaml", "wide.yaml"]));
    let header = table.lines().next().expect("header");
    for column in ["stage", "metric", "tiny", "wide", "change"] {
        assert!(header.contains(column), "{column}: {table}");
    }
    assert!(table.contains("trainable_parameters"), "{table}");
    assert!(table.contains("+300%"), "{table}");
    assert!(
        !table.contains("rows_kept"),
        "unchanged metrics only with --all:\n{table}"
    );
}

fn git(project: &Project, args: &[&str]) -> bool {
    std::process::Command::new("git")
        .args(args)
        .current_dir(&project.root)
        .env("GIT_AUTHOR_NAME", "t")
        .env("GIT_AUTHOR_EMAIL", "t@t.invalid")
        .env("GIT_COMMITTER_NAME", "t")
        .env("GIT_COMMITTER_EMAIL", "t@t.invalid")
        .output()
        .is_ok_and(|output| output.status.success())
}

#[test]
fn metrics_diff_rev_reads_the_lock_file_at_a_git_revision() {
    let project = Project::tiny();
    if !git(&project, &["init", "-q"]) {
        eprintln!("skipped: git is not available");
        return;
    }
    // A cache folder that git tracks (the default .peftpipe/cache is usually ignored): the lock
    // file is committed with the pipeline, DVC style.
    let cache = ["--cache-dir", "cache"];
    project.ok(&["run", "pipeline.yaml", cache[0], cache[1]]);
    assert!(git(&project, &["add", "pipeline.yaml", "cache/locks"]));
    assert!(git(&project, &["commit", "-qm", "rank 4"]));
    project.write("pipeline.yaml", &tiny_yaml("tiny", 8));
    project.ok(&["run", "pipeline.yaml", cache[0], cache[1]]);

    let output = project.ok(&[
        "metrics",
        "diff",
        "--rev",
        "HEAD",
        "pipeline.yaml",
        cache[0],
        cache[1],
        "--json",
    ]);
    let document = json(&stdout(&output));
    assert_eq!(document["old"], "HEAD");
    assert_eq!(document["new"], "workspace");
    let parameters = document["metrics"]
        .as_array()
        .expect("metrics")
        .iter()
        .find(|row| row["metric"] == "trainable_parameters" && row["stage"] == "train")
        .unwrap_or_else(|| panic!("{document}"))
        .clone();
    assert_eq!(
        parameters["new"].as_f64(),
        parameters["old"].as_f64().map(|old| old * 2.0),
        "{parameters}"
    );

    // Without the lock file in git, the error says why and what to do.
    let untracked = project.peftpipe(&["metrics", "diff", "--rev", "HEAD", "pipeline.yaml"]);
    assert_eq!(untracked.status.code(), Some(1), "{}", stderr(&untracked));
    let message = stderr(&untracked);
    assert!(message.contains("at git revision HEAD"), "{message}");
    assert!(message.contains("hint:"), "{message}");
}

#[test]
fn evaluate_dtype_sets_the_compute_dtype_and_enters_the_fingerprint() {
    let project = Project::tiny();
    let perplexity = |output: &std::process::Output| -> (f64, String) {
        let summary = json(&stdout(output));
        let evaluate = summary["stages"]
            .as_array()
            .and_then(|stages| stages.iter().find(|stage| stage["name"] == "evaluate"))
            .cloned()
            .expect("an evaluate stage");
        let value = evaluate["outcome"]["perplexity"]["adapted"]
            .as_f64()
            .unwrap_or_else(|| panic!("{evaluate}"));
        (value, evaluate["status"].as_str().unwrap_or("").to_string())
    };
    let (f32_ppl, _) = perplexity(&project.ok(&["run", "pipeline.yaml", "--json"]));
    let bf16 = project.ok(&[
        "run",
        "pipeline.yaml",
        "--json",
        "--set",
        "stages.evaluate.evaluate.dtype=bf16",
    ]);
    let (bf16_ppl, status) = perplexity(&bf16);
    assert_eq!(status, "ran", "a changed dtype must rerun the evaluation");
    assert!(bf16_ppl != f32_ppl, "bf16 evaluated as f32: {bf16_ppl}");
    // The tiny model's loss is large (≈ 70 nats): compare the losses, ln(perplexity).
    assert!(
        (bf16_ppl.ln() / f32_ppl.ln() - 1.0).abs() < 0.01,
        "bf16 {bf16_ppl} vs f32 {f32_ppl}"
    );
    // Writing the default explicitly changes nothing.
    let explicit = project.ok(&[
        "run",
        "pipeline.yaml",
        "--json",
        "--set",
        "stages.evaluate.evaluate.dtype=auto",
    ]);
    let (again, status) = perplexity(&explicit);
    assert_ne!(status, "ran");
    assert_eq!(again, f32_ppl);
}

#[test]
fn metrics_show_marks_stale_stages_and_leaves_out_removed_ones() {
    let project = Project::tiny();
    project.ok(&["run", "pipeline.yaml", "--no-report"]);
    let fresh = stdout(&project.ok(&["metrics", "show", "pipeline.yaml"]));
    assert!(!fresh.contains("stale"), "{fresh}");
    let changed = [
        "metrics",
        "show",
        "pipeline.yaml",
        "--set",
        "stages.train.train.max_steps=2",
    ];
    let text = stdout(&project.ok(&changed));
    let note = text
        .lines()
        .find(|line| line.starts_with("stale"))
        .unwrap_or_else(|| panic!("no stale line:\n{text}"));
    assert!(
        note.contains("train, evaluate, export") && !note.contains("data"),
        "{note}"
    );
    let mut with_json = changed.to_vec();
    with_json.push("--json");
    let document = json(&stdout(&project.ok(&with_json)));
    assert_eq!(
        document["stale"],
        serde_json::json!(["train", "evaluate", "export"])
    );

    // A stage taken out of the pipeline is no longer shown.
    let without_export = tiny_yaml("tiny", 4)
        .split("  export:")
        .next()
        .expect("the stages before export")
        .to_string();
    project.write("pipeline.yaml", &without_export);
    let text = stdout(&project.ok(&["metrics", "show", "pipeline.yaml"]));
    assert!(!text.contains("export"), "{text}");
}

#[test]
fn metrics_diff_with_a_pipeline_that_never_ran_says_so() {
    let project = Project::tiny();
    project.write("other.yaml", &tiny_yaml("other", 8));
    project.ok(&["run", "pipeline.yaml", "--no-report"]);
    let output = project.peftpipe(&["metrics", "diff", "pipeline.yaml", "other.yaml"]);
    assert_eq!(output.status.code(), Some(1), "{}", stdout(&output));
    assert!(
        stderr(&output).contains("`other` has no recorded metrics"),
        "{}",
        stderr(&output)
    );
}
