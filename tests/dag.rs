//! `peftpipe dag`: text, mermaid and dot renderings (snapshotted), `--stage` selection, `--json`,
//! and clean failures on cycles and unknown stages.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
}

fn peftpipe(args: &[&str]) -> Output {
    let output = Command::new(env!("CARGO_BIN_EXE_peftpipe"))
        .args(args)
        .current_dir(fixtures())
        .env("NO_COLOR", "1")
        .output();
    match output {
        Ok(output) => output,
        Err(error) => panic!("cannot run peftpipe: {error}"),
    }
}

fn stdout_of(args: &[&str]) -> String {
    let output = peftpipe(args);
    assert_eq!(
        output.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout).into_owned()
}

#[test]
fn text_format() {
    insta::assert_snapshot!(stdout_of(&["dag", "dag/branches.yaml"]));
}

#[test]
fn mermaid_format() {
    insta::assert_snapshot!(stdout_of(&[
        "dag",
        "dag/branches.yaml",
        "--format",
        "mermaid"
    ]));
}

#[test]
fn dot_format() {
    insta::assert_snapshot!(stdout_of(&["dag", "dag/branches.yaml", "--format", "dot"]));
}

#[test]
fn stage_selection_keeps_what_the_stage_needs() {
    let text = stdout_of(&["dag", "dag/branches.yaml", "--stage", "review_prompts"]);
    assert_eq!(
        text,
        "reviews (ingest)\nreview_prompts (template)\n  ← reviews (input)\n"
    );
}

#[test]
fn json_lists_upstream_and_dependents() {
    let text = stdout_of(&["dag", "dag/branches.yaml", "--json"]);
    let json: serde_json::Value = serde_json::from_str(&text).unwrap_or_default();
    let stages = json["stages"].as_array().cloned().unwrap_or_default();
    let names: Vec<&str> = stages.iter().filter_map(|s| s["name"].as_str()).collect();
    assert_eq!(
        names,
        vec!["reviews", "questions", "review_prompts", "question_prompts"]
    );
    assert_eq!(
        stages[0]["dependents"],
        serde_json::json!(["review_prompts"])
    );
    assert_eq!(
        stages[3]["upstream"],
        serde_json::json!([{"stage": "questions", "key": "input"}])
    );
}

#[test]
fn unknown_stage_is_an_error_with_a_suggestion() {
    let output = peftpipe(&["dag", "dag/branches.yaml", "--stage", "review_promts"]);
    assert_eq!(output.status.code(), Some(2));
    assert!(output.stdout.is_empty());
    assert_eq!(
        String::from_utf8_lossy(&output.stderr),
        "error: --stage review_promts: dag/branches.yaml has no stage of that name\n  = hint: did you mean `review_prompts`?\n"
    );
}

#[test]
fn a_cycle_is_reported_not_drawn() {
    let output = peftpipe(&["dag", "invalid/cycle.yaml"]);
    assert_eq!(output.status.code(), Some(2));
    assert!(output.stdout.is_empty());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.starts_with("invalid/cycle.yaml:7:14: stages.first.template.input: the stages form a cycle: first → second → third → first"),
        "{stderr}"
    );
}

#[test]
fn a_pipeline_with_other_problems_is_still_drawn() {
    let output = peftpipe(&["dag", "dag/problems.yaml"]);
    assert_eq!(output.status.code(), Some(2), "validate's exit code");
    assert_eq!(
        String::from_utf8_lossy(&output.stdout),
        "reviews (ingest)\narchive (ingest)\nreview_prompts (template)\n  ← reviews (input)\n"
    );
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr
            .contains("dag/problems.yaml:15:7: stages.review_prompts.template.shots: unknown key"),
        "{stderr}"
    );
    assert!(
        stderr.contains("stages.archive.ingest.path: input `archive-not-there.csv` does not exist"),
        "{stderr}"
    );
}

#[test]
fn json_carries_the_problems_beside_the_graph() {
    let output = peftpipe(&["dag", "dag/problems.yaml", "--json"]);
    assert_eq!(output.status.code(), Some(2));
    let json: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap_or_default();
    assert_eq!(json["stages"].as_array().map(Vec::len), Some(3), "{json}");
    let paths: Vec<&str> = json["problems"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|problem| problem["path"].as_str())
        .collect();
    assert_eq!(
        paths,
        vec![
            "stages.archive.ingest.path",
            "stages.review_prompts.template.shots"
        ]
    );
    let valid = peftpipe(&["dag", "dag/branches.yaml", "--json"]);
    let json: serde_json::Value = serde_json::from_slice(&valid.stdout).unwrap_or_default();
    assert_eq!(json["problems"], serde_json::json!([]));
}

#[test]
fn a_stage_whose_kind_cannot_be_read_is_reported_not_drawn() {
    let output = peftpipe(&["dag", "dag/unreadable.yaml"]);
    assert_eq!(output.status.code(), Some(2));
    assert!(output.stdout.is_empty());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("stages.prompts.templat: unknown stage kind `templat`"),
        "{stderr}"
    );
}
