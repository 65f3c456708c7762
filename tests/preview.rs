//! `peftpipe preview` and `peftpipe bench data` driven as a user would: preview runs the stale
//! stages through the executor into the real cache (progress on stderr), then reads the fresh
//! artifact from the cache without running anything; the prompt/completion boundary is visible.
//! stdout and stderr are snapshotted with paths and timings redacted.

mod exec_support;

use exec_support::{stderr, stdout, Project};

fn preview(project: &Project, extra: &[&str]) -> std::process::Output {
    let mut args = vec!["preview", "pipeline.yaml"];
    args.extend_from_slice(extra);
    project.run(&args)
}

/// The stages a command ran (not restored), from its stderr.
fn ran(stderr: &str) -> Vec<String> {
    stderr
        .lines()
        .filter_map(|line| line.trim_start().strip_prefix("Running "))
        .map(|rest| rest.split_whitespace().next().unwrap_or("").to_string())
        .collect()
}

#[test]
fn preview_runs_stale_stages_into_the_cache_then_reads_it() {
    let project = Project::new();
    let first = preview(&project, &["--stage", "prompts", "-n", "3"]);
    assert!(first.status.success(), "{}", stderr(&first));
    let first_err = project.redact(&stderr(&first));
    assert_eq!(ran(&first_err), ["data", "prompts"]);
    insta::assert_snapshot!("stale_stdout", stdout(&first));
    insta::assert_snapshot!("stale_stderr", first_err);
    // The prompt/completion boundary of each row is marked, the completion is the label.
    let shown = stdout(&first);
    assert_eq!(
        shown.lines().filter(|l| l.starts_with("── row ")).count(),
        3
    );
    assert_eq!(stdout(&first).matches("⟦COMPLETION⟧ ").count(), 3);

    // The real cache now holds both stages: status is fresh and a second preview runs nothing.
    let status = project.run(&["status", "pipeline.yaml"]);
    assert_eq!(stdout(&status), "[FRESH] data\n[FRESH] prompts\n");
    let second = preview(&project, &["--stage", "prompts", "-n", "3"]);
    assert!(second.status.success(), "{}", stderr(&second));
    assert!(ran(&stderr(&second)).is_empty(), "{}", stderr(&second));
    assert_eq!(stderr(&second), "");
    insta::assert_snapshot!("fresh_stdout", stdout(&second));
    // Same rows either way.
    let body = |text: &str| text.lines().skip(1).collect::<Vec<_>>().join("\n");
    assert_eq!(body(&stdout(&first)), body(&stdout(&second)));
}

#[test]
fn preview_reruns_only_what_a_change_made_stale() {
    let project = Project::new();
    assert!(preview(&project, &["--stage", "prompts"]).status.success());
    let changed = preview(
        &project,
        &[
            "--stage",
            "prompts",
            "-n",
            "1",
            "--set",
            "stages.prompts.template.completion=' => {{ label }}'",
        ],
    );
    assert!(changed.status.success(), "{}", stderr(&changed));
    assert_eq!(ran(&stderr(&changed)), ["prompts"]);
    let out = stdout(&changed);
    assert!(out.contains("ran prompts first (stale)"), "{out}");
    assert!(out.contains("⟦COMPLETION⟧ => "), "{out}");
}

#[test]
fn preview_of_an_ingest_split_shows_its_columns() {
    let project = Project::new();
    let output = preview(&project, &["--stage", "data", "--split", "eval", "-n", "2"]);
    assert!(output.status.success(), "{}", stderr(&output));
    assert_eq!(ran(&stderr(&output)), ["data"]);
    let out = stdout(&output);
    assert!(
        out.starts_with("stage data (ingest), split eval: 2 of 10 row(s)"),
        "{out}"
    );
    assert_eq!(out.matches("  text: review number ").count(), 2, "{out}");
    assert!(!out.contains("⟦PROMPT⟧"), "{out}");
}

#[test]
fn preview_refuses_unknown_stages_splits_and_other_kinds() {
    let project = Project::new();
    let unknown = preview(&project, &["--stage", "prompt"]);
    assert_eq!(unknown.status.code(), Some(2));
    assert!(
        stderr(&unknown).contains("no stage named `prompt`; stages: data, prompts"),
        "{}",
        stderr(&unknown)
    );
    // A split the stage does not write is a usage error, like an unknown stage, said before
    // anything runs.
    let split = preview(&project, &["--stage", "prompts", "--split", "test"]);
    assert_eq!(split.status.code(), Some(2));
    assert!(
        stderr(&split).contains("stage `prompts` writes no `test` split; its splits: train, eval"),
        "{}",
        stderr(&split)
    );
    assert!(!stderr(&split).contains("Running"), "{}", stderr(&split));
}

#[test]
fn bench_data_reports_rows_per_second_and_peak_rss() {
    let project = Project::new();
    let output = project.run(&["bench", "data", "--rows", "2000"]);
    assert!(output.status.success(), "{}", stderr(&output));
    let out = stdout(&output);
    let figures = regex::Regex::new(
        r"peftpipe  ingest\+template +\d+\.\d\d s  (\d+) rows/s .* peak RSS (\d+) MiB .* kept (\d+) of 2000 rows",
    )
    .expect("regex");
    let captures = figures.captures(&out).unwrap_or_else(|| panic!("{out}"));
    let number = |index: usize| captures[index].parse::<u64>().expect("number");
    assert!(number(1) > 0 && number(2) > 0, "{out}");
    assert!(number(3) > 1000 && number(3) <= 2000, "{out}");
    assert!(
        out.contains("python    skipped: not requested (--python)"),
        "{out}"
    );
    // The memory check runs at 4 × the rows by default.
    assert!(
        regex::Regex::new(
            r"memory    peftpipe peak RSS \d+ MiB at 2000 rows vs \d+ MiB at 8000 rows"
        )
        .expect("regex")
        .is_match(&out),
        "{out}"
    );

    let json = project.run(&[
        "--json",
        "bench",
        "data",
        "--rows",
        "2000",
        "--large-rows",
        "0",
    ]);
    assert!(json.status.success(), "{}", stderr(&json));
    let report: serde_json::Value = serde_json::from_str(&stdout(&json)).expect("JSON report");
    assert_eq!(report["ours"]["rows_read"], 2000);
    assert!(report["ours"]["peak_rss_kb"].as_u64().unwrap_or(0) > 0);
    assert!(report["ours"]["wall_s"].as_f64().unwrap_or(0.0) > 0.0);
    assert!(report.get("large").is_none());
}

#[test]
fn a_preview_with_set_leaves_the_pipelines_lock_and_published_copies_alone() {
    let project = Project::new();
    assert!(project.run(&["run", "pipeline.yaml"]).status.success());
    let lock = project.lock_file();
    let changed = preview(
        &project,
        &[
            "--stage",
            "prompts",
            "-n",
            "1",
            "--set",
            "stages.prompts.template.completion=' => {{ label }}'",
        ],
    );
    assert!(changed.status.success(), "{}", stderr(&changed));
    assert!(stdout(&changed).contains("⟦COMPLETION⟧ => "));
    assert_eq!(project.lock_file(), lock, "the lock file is the pipeline's");
    let status = project.run(&["status", "pipeline.yaml", "--check"]);
    assert!(status.status.success(), "{}", stdout(&status));
    // The variant's output is in the cache: previewing it again runs nothing.
    let again = preview(
        &project,
        &[
            "--stage",
            "prompts",
            "-n",
            "1",
            "--set",
            "stages.prompts.template.completion=' => {{ label }}'",
        ],
    );
    assert!(ran(&stderr(&again)).is_empty(), "{}", stderr(&again));
}
