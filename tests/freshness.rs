//! The freshness suite: run → rerun is all fresh → change one thing (a parameter, one input row,
//! the template, the tool version) → exactly the dependent stages rerun, each with its reason.
//! Drives the binary on the real ingest and template stages; stderr is snapshotted with paths,
//! digests and timings redacted.

mod exec_support;

use exec_support::{jsonl, rows, stderr, stdout, Project};

fn status(project: &Project, extra: &[&str]) -> String {
    let mut args = vec!["status", "pipeline.yaml"];
    args.extend_from_slice(extra);
    let output = project.run(&args);
    assert!(output.status.success(), "{}", stderr(&output));
    stdout(&output)
}

fn run_ok(project: &Project, extra: &[&str]) -> String {
    let mut args = vec!["run", "pipeline.yaml"];
    args.extend_from_slice(extra);
    let output = project.run(&args);
    assert!(
        output.status.success(),
        "run failed:\n{}{}",
        stdout(&output),
        stderr(&output)
    );
    project.redact(&stderr(&output))
}

/// The stages a run executed (not restored), from its stderr.
fn ran(stderr: &str) -> Vec<String> {
    stderr
        .lines()
        .filter_map(|line| line.trim_start().strip_prefix("Running "))
        .map(|rest| rest.split_whitespace().next().unwrap_or("").to_string())
        .collect()
}

#[test]
fn first_run_then_everything_is_fresh() {
    let project = Project::new();
    assert_eq!(
        status(&project, &[]),
        "[DIRTY] data: never run\n[DIRTY] prompts: never run\n"
    );
    let first = run_ok(&project, &[]);
    assert_eq!(ran(&first), ["data", "prompts"]);
    insta::assert_snapshot!("first_run", first);

    let second = run_ok(&project, &[]);
    assert!(ran(&second).is_empty(), "{second}");
    insta::assert_snapshot!("second_run_all_fresh", second);
    assert_eq!(status(&project, &[]), "[FRESH] data\n[FRESH] prompts\n");
    let check = project.run(&["status", "--check", "pipeline.yaml"]);
    assert_eq!(check.status.code(), Some(0));
}

#[test]
fn a_parameter_override_reruns_only_the_template() {
    let project = Project::new();
    run_ok(&project, &[]);
    let set = "stages.prompts.template.few_shot.k=2";
    assert_eq!(
        status(&project, &["--set", set]),
        "[FRESH] data\n[DIRTY] prompts: parameter template.few_shot.k changed (1 → 2)\n"
    );
    let check = project.run(&["status", "--check", "pipeline.yaml", "--set", set]);
    assert_eq!(check.status.code(), Some(3), "--check exits 3 when stale");
    let rerun = run_ok(&project, &["--set", set]);
    assert_eq!(ran(&rerun), ["prompts"]);
    insta::assert_snapshot!("parameter_changed", rerun);
    // Back to k = 1: restored from the cache, not rerun.
    assert_eq!(
        status(&project, &[]),
        "[FRESH] data\n[FRESH] prompts (cached output of an earlier run with these inputs)\n"
    );
    assert!(ran(&run_ok(&project, &[])).is_empty());
}

#[test]
fn one_changed_input_row_reruns_both_stages() {
    let project = Project::new();
    run_ok(&project, &[]);
    let mut changed = rows();
    changed[5].0 = "review number 5 was actually fine".to_string();
    project.write("datasets/reviews.jsonl", &jsonl(&changed));
    assert_eq!(
        status(&project, &[]),
        "[DIRTY] data: the file datasets/reviews.jsonl changed\n\
         [DIRTY] prompts: upstream stage data is dirty\n"
    );
    let rerun = run_ok(&project, &[]);
    assert_eq!(ran(&rerun), ["data", "prompts"]);
    insta::assert_snapshot!("input_row_changed", rerun);
}

#[test]
fn a_template_change_reruns_only_the_template() {
    let project = Project::new();
    run_ok(&project, &[]);
    project.write(
        "templates/prompt.j2",
        &exec_support::PROMPT_TEMPLATE.replace("Sentiment:", "Feeling:"),
    );
    assert_eq!(
        status(&project, &[]),
        "[FRESH] data\n[DIRTY] prompts: the file templates/prompt.j2 changed\n"
    );
    let rerun = run_ok(&project, &[]);
    assert_eq!(ran(&rerun), ["prompts"]);
    // An inline template is a parameter.
    let inline = run_ok(
        &project,
        &[
            "--set",
            "stages.prompts.template.completion=' {{ label }}!'",
        ],
    );
    assert!(
        inline.contains(
            r#"parameter template.completion changed (" {{ label }}" → " {{ label }}!")"#
        ),
        "{inline}"
    );
}

#[test]
fn a_new_tool_version_reruns_everything() {
    let project = Project::new();
    run_ok(&project, &[]);
    let output = project
        .command(&["status", "pipeline.yaml"])
        .env("PEFTPIPE_VERSION_OVERRIDE", "9.9.9")
        .output()
        .expect("run peftpipe");
    let version = env!("CARGO_PKG_VERSION");
    assert_eq!(
        stdout(&output),
        format!(
            "[DIRTY] data: peftpipe version changed ({version} → 9.9.9)\n\
             [DIRTY] prompts: upstream stage data is dirty, peftpipe version changed ({version} → 9.9.9)\n"
        )
    );
    let output = project
        .command(&["run", "pipeline.yaml"])
        .env("PEFTPIPE_VERSION_OVERRIDE", "9.9.9")
        .output()
        .expect("run peftpipe");
    assert!(output.status.success(), "{}", stderr(&output));
    assert_eq!(ran(&stderr(&output)), ["data", "prompts"]);
}

#[test]
fn dry_run_runs_nothing() {
    let project = Project::new();
    let output = project.run(&["run", "pipeline.yaml", "--dry-run"]);
    assert!(output.status.success());
    assert_eq!(
        stderr(&output),
        "[DIRTY] data: never run — would run\n[DIRTY] prompts: never run — would run\n"
    );
    assert!(project.recorded_output("data").is_none());
    assert!(!project.path(".peftpipe/out").exists());
}
