//! `peftpipe validate` driven as a user drives it: every invalid fixture under
//! tests/fixtures/invalid/ exits 2 with its rendered problems snapshotted (insta, absolute paths
//! redacted); valid fixtures exit 0; `--json`, several files and `--set` behave.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn fixtures(kind: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(kind)
}

/// Run the binary in `dir` with `args`, colors off.
fn peftpipe(dir: &Path, args: &[&str]) -> Output {
    let output = Command::new(env!("CARGO_BIN_EXE_peftpipe"))
        .args(args)
        .current_dir(dir)
        .env("NO_COLOR", "1")
        .env_remove("RUST_LOG")
        .output();
    match output {
        Ok(output) => output,
        Err(error) => panic!("cannot run peftpipe: {error}"),
    }
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// Snapshot the stderr of `validate NAME.yaml [extra...]` run inside tests/fixtures/invalid/.
fn check_invalid(name: &str, extra: &[&str]) {
    let dir = fixtures("invalid");
    let file = format!("{name}.yaml");
    let mut args = vec!["validate", file.as_str()];
    args.extend_from_slice(extra);
    let output = peftpipe(&dir, &args);
    let stderr = text(&output.stderr);
    assert_eq!(
        output.status.code(),
        Some(2),
        "{name}: expected exit 2 (invalid), stderr:\n{stderr}"
    );
    assert!(
        output.stdout.is_empty(),
        "{name}: stdout must stay empty without --json"
    );
    assert!(
        !stderr.contains("panicked"),
        "{name}: peftpipe panicked:\n{stderr}"
    );
    let root = env!("CARGO_MANIFEST_DIR");
    insta::with_settings!({
        description => format!("peftpipe validate {}", args[1..].join(" ")),
        filters => vec![(regex_escape(root).as_str(), "[ROOT]")],
    }, {
        insta::assert_snapshot!(name, stderr);
    });
}

fn regex_escape(text: &str) -> String {
    let mut escaped = String::new();
    for c in text.chars() {
        if "\\.+*?()|[]{}^$".contains(c) {
            escaped.push('\\');
        }
        escaped.push(c);
    }
    escaped
}

/// Fixture name and extra arguments. Every file in tests/fixtures/invalid/*.yaml must be here.
const INVALID: &[(&str, &[&str])] = &[
    ("unknown_top_level_key", &[]),
    ("misspelled_stage_field", &[]),
    ("unknown_stage_kind", &[]),
    ("unknown_stage_kind_far_off", &[]),
    ("two_kinds_in_one_stage", &[]),
    ("wrong_types", &[]),
    ("duplicate_stage_names", &[]),
    ("unknown_upstream_reference", &[]),
    ("self_reference", &[]),
    ("cycle", &[]),
    (
        "bad_set_path",
        &["--set", "stages.prmpts.template.input=data"],
    ),
    (
        "bad_set_value",
        &[
            "--set",
            "seed=abc",
            "--set",
            "stages.data.ingest.pth=x",
            "--set",
            "novalue",
        ],
    ),
    ("yaml_syntax_error", &[]),
    ("empty_file", &[]),
    ("only_comments", &[]),
    ("missing_stages", &[]),
    ("tab_indentation", &[]),
    ("not_a_mapping", &[]),
    ("no_stages_listed", &[]),
    ("stage_without_kind", &[]),
    ("stage_not_a_mapping", &[]),
    ("setting_next_to_kind", &[]),
    ("missing_required_key", &[]),
    ("invalid_stage_name", &[]),
    ("several_documents", &[]),
    ("every_problem_reported", &[]),
    ("non_finite_number", &[]),
    ("unsupported_tag", &[]),
    ("missing_input_file", &[]),
    ("missing_parquet_column", &[]),
    ("template_syntax_error", &[]),
    ("template_variable_no_column_provides", &[]),
    ("split_fractions_do_not_add_up", &[]),
    ("evaluate_reads_a_non_train_stage", &[]),
];

macro_rules! invalid_fixture_tests {
    ($($name:ident),* $(,)?) => {
        $(
            #[test]
            fn $name() {
                let name = stringify!($name);
                let Some((_, extra)) = INVALID.iter().find(|(fixture, _)| *fixture == name) else {
                    panic!("{name} is not listed in INVALID");
                };
                check_invalid(name, extra);
            }
        )*
    };
}

invalid_fixture_tests!(
    unknown_top_level_key,
    misspelled_stage_field,
    unknown_stage_kind,
    unknown_stage_kind_far_off,
    two_kinds_in_one_stage,
    wrong_types,
    duplicate_stage_names,
    unknown_upstream_reference,
    self_reference,
    cycle,
    bad_set_path,
    bad_set_value,
    yaml_syntax_error,
    empty_file,
    only_comments,
    missing_stages,
    tab_indentation,
    not_a_mapping,
    no_stages_listed,
    stage_without_kind,
    stage_not_a_mapping,
    setting_next_to_kind,
    missing_required_key,
    invalid_stage_name,
    several_documents,
    every_problem_reported,
    non_finite_number,
    unsupported_tag,
    missing_input_file,
    missing_parquet_column,
    template_syntax_error,
    template_variable_no_column_provides,
    split_fractions_do_not_add_up,
    evaluate_reads_a_non_train_stage,
);

fn yaml_files(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = match std::fs::read_dir(dir) {
        Ok(entries) => entries
            .filter_map(Result::ok)
            .filter_map(|entry| {
                let name = entry.file_name().to_string_lossy().into_owned();
                name.strip_suffix(".yaml").map(str::to_string)
            })
            .collect(),
        Err(error) => panic!("cannot list {}: {error}", dir.display()),
    };
    names.sort();
    names
}

#[test]
fn every_invalid_fixture_has_a_test_and_there_are_at_least_twenty() {
    let on_disk = yaml_files(&fixtures("invalid"));
    let mut listed: Vec<String> = INVALID.iter().map(|(name, _)| name.to_string()).collect();
    listed.sort();
    assert_eq!(
        on_disk, listed,
        "tests/fixtures/invalid/*.yaml and INVALID differ"
    );
    assert!(listed.len() >= 20, "only {} invalid fixtures", listed.len());
}

#[test]
fn valid_fixtures_pass() {
    let dir = fixtures("valid");
    let names = yaml_files(&dir);
    assert!(!names.is_empty());
    for name in names {
        let file = format!("{name}.yaml");
        let output = peftpipe(&dir, &["validate", &file]);
        assert_eq!(
            output.status.code(),
            Some(0),
            "{file} should be valid:\n{}",
            text(&output.stderr)
        );
        assert!(text(&output.stderr).starts_with(&format!("valid: {file} (")));
    }
}

#[test]
fn several_files_are_all_checked_and_one_invalid_file_fails_the_run() {
    let root = fixtures("");
    let output = peftpipe(
        &root,
        &[
            "validate",
            "valid/minimal.yaml",
            "invalid/cycle.yaml",
            "invalid/self_reference.yaml",
        ],
    );
    let stderr = text(&output.stderr);
    assert_eq!(output.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("valid: valid/minimal.yaml (2 stages: data, prompts)"));
    assert!(stderr.contains("invalid/cycle.yaml:7:14: stages.first.template.input:"));
    assert!(stderr.contains("invalid/self_reference.yaml:4:14:"));
    assert!(
        stderr.ends_with("error: 2 problems in 2 of 3 files\n"),
        "{stderr}"
    );
}

#[test]
fn json_output_lists_every_problem_with_its_position() {
    let root = fixtures("");
    let output = peftpipe(
        &root,
        &[
            "validate",
            "--json",
            "valid/minimal.yaml",
            "invalid/every_problem_reported.yaml",
        ],
    );
    assert_eq!(output.status.code(), Some(2));
    let json: serde_json::Value = match serde_json::from_slice(&output.stdout) {
        Ok(json) => json,
        Err(error) => panic!("stdout is not JSON ({error}): {}", text(&output.stdout)),
    };
    assert_eq!(json["valid"], serde_json::Value::Bool(false));
    let files = json["files"].as_array().cloned().unwrap_or_default();
    assert_eq!(files.len(), 2);
    assert_eq!(files[0]["valid"], serde_json::Value::Bool(true));
    assert_eq!(files[0]["stages"], serde_json::json!(["data", "prompts"]));
    let problems = files[1]["problems"].as_array().cloned().unwrap_or_default();
    let paths: Vec<&str> = problems.iter().filter_map(|p| p["path"].as_str()).collect();
    assert_eq!(
        paths,
        vec![
            "seed",
            "stages.data.ingest.pathh",
            "stages.data.ingest.colums",
            "stages.prompts.template.input",
            "stages.prompts.template.inptu",
            "stages.train.train.data",
        ]
    );
    let first = &problems[0];
    // `seed: -1`: the value is wrong, so the position is the value's.
    assert_eq!(first["line"], serde_json::json!(1));
    assert_eq!(first["column"], serde_json::json!(7));
    assert!(first["message"]
        .as_str()
        .unwrap_or_default()
        .contains("found -1"));
    let misspelled = &problems[4];
    assert_eq!(
        misspelled["hint"],
        serde_json::json!("did you mean `input`?")
    );
}

#[test]
fn set_overrides_apply_before_validation() {
    let dir = fixtures("invalid");
    // The file reads an unknown stage; the override points it at the right one.
    let output = peftpipe(
        &dir,
        &[
            "validate",
            "unknown_upstream_reference.yaml",
            "--set",
            "stages.prompts.template.input=data",
        ],
    );
    assert_eq!(output.status.code(), Some(0), "{}", text(&output.stderr));
}

#[test]
fn a_missing_file_is_a_problem_not_a_crash() {
    let output = peftpipe(&fixtures("invalid"), &["validate", "no/such/pipeline.yaml"]);
    assert_eq!(output.status.code(), Some(2));
    assert_eq!(
        text(&output.stderr),
        "no/such/pipeline.yaml: no such file\n\nerror: 1 problem in 1 of 1 file\n"
    );
}

#[test]
fn colors_follow_no_color() {
    // Not a terminal here, so never colored; NO_COLOR must not be required for plain output.
    let output = Command::new(env!("CARGO_BIN_EXE_peftpipe"))
        .args(["validate", "cycle.yaml"])
        .current_dir(fixtures("invalid"))
        .env_remove("NO_COLOR")
        .output();
    let Ok(output) = output else {
        panic!("cannot run peftpipe");
    };
    assert!(!text(&output.stderr).contains('\u{1b}'));
}
