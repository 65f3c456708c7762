//! `peftpipe validate` driven as a user drives it: every invalid fixture under
//! tests/fixtures/invalid/ exits 2 with its rendered problems snapshotted (insta, absolute paths
//! redacted); valid fixtures exit 0; `--json`, several files and `--set` behave.

mod support;

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
    ("train_evaluation_problems", &[]),
    ("split_read_problems", &[]),
    ("filter_column_types", &[]),
    ("gguf_of_an_unsupported_vocabulary", &[]),
    ("jsonl_mixed_types", &[]),
    ("csv_text_columns", &[]),
    ("train_devices_problems", &[]),
    ("evaluate_reads_a_non_train_stage", &[]),
    ("yaml_alias_bomb", &[]),
    ("yaml_alias_bomb_merge_keys", &[]),
    ("template_computed_include", &[]),
    ("pipeline_name_not_a_name", &[]),
    ("matrix_block_problems", &[]),
    ("matrix_reference_problems", &[]),
    ("matrix_value_invalid_in_one_expansion", &[]),
    ("two_methods_in_one_train_stage", &[]),
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
    train_evaluation_problems,
    split_read_problems,
    filter_column_types,
    gguf_of_an_unsupported_vocabulary,
    jsonl_mixed_types,
    csv_text_columns,
    train_devices_problems,
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
    yaml_alias_bomb,
    yaml_alias_bomb_merge_keys,
    template_computed_include,
    pipeline_name_not_a_name,
    matrix_block_problems,
    matrix_reference_problems,
    matrix_value_invalid_in_one_expansion,
    two_methods_in_one_train_stage,
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

/// What a bounded run of the binary used.
struct Bounded {
    output: Output,
    seconds: f64,
    /// Highest VmHWM (peak resident set) seen while polling /proc/PID/status, in KiB: a lower
    /// bound of the true peak, but a run that grows past `kill_above_kib` is killed and fails.
    peak_kib: u64,
}

/// Run `peftpipe args` in `dir`, polling its peak RSS every millisecond; kill it when it runs
/// past `kill_after` or its peak passes `kill_above_kib` (so a regression fails the test instead
/// of taking the machine down).
fn peftpipe_bounded(
    dir: &Path,
    args: &[&str],
    kill_after: std::time::Duration,
    kill_above_kib: u64,
) -> Bounded {
    // Output goes to files, not pipes: a full pipe would block the child until it is killed.
    let outputs = tempfile::tempdir().unwrap_or_else(|e| panic!("tempdir: {e}"));
    let create = |name: &str| {
        std::fs::File::create(outputs.path().join(name)).unwrap_or_else(|e| panic!("{e}"))
    };
    let started = std::time::Instant::now();
    let child = Command::new(env!("CARGO_BIN_EXE_peftpipe"))
        .args(args)
        .current_dir(dir)
        .env("NO_COLOR", "1")
        .env_remove("RUST_LOG")
        .stdout(create("stdout"))
        .stderr(create("stderr"))
        .spawn();
    let mut child = match child {
        Ok(child) => child,
        Err(error) => panic!("cannot run peftpipe: {error}"),
    };
    let status_path = format!("/proc/{}/status", child.id());
    let mut peak_kib = 0;
    loop {
        if let Ok(status) = std::fs::read_to_string(&status_path) {
            let hwm = status
                .lines()
                .find_map(|line| line.strip_prefix("VmHWM:"))
                .and_then(|rest| {
                    rest.trim()
                        .trim_end_matches("kB")
                        .trim()
                        .parse::<u64>()
                        .ok()
                });
            peak_kib = peak_kib.max(hwm.unwrap_or(0));
        }
        match child.try_wait() {
            Ok(Some(_)) => break,
            Ok(None) => {}
            Err(error) => panic!("cannot wait for peftpipe: {error}"),
        }
        if started.elapsed() > kill_after || peak_kib > kill_above_kib {
            let _ = child.kill();
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(1));
    }
    let status = match child.wait() {
        Ok(status) => status,
        Err(error) => panic!("cannot wait for peftpipe: {error}"),
    };
    let read = |name: &str| std::fs::read(outputs.path().join(name)).unwrap_or_default();
    let output = Output {
        status,
        stdout: read("stdout"),
        stderr: read("stderr"),
    };
    Bounded {
        output,
        seconds: started.elapsed().as_secs_f64(),
        peak_kib,
    }
}

/// Regression: the 9-line billion-laughs file drove `validate` past 9.8 GB in 30 s (16.2 GB with
/// the merge-key variant). Aliases are now bounded: an answer in well under a second, exit 2.
#[test]
fn yaml_alias_bombs_are_refused_fast_in_bounded_memory() {
    let dir = fixtures("invalid");
    for (file, line) in [
        ("yaml_alias_bomb.yaml", 6),
        ("yaml_alias_bomb_merge_keys.yaml", 8),
    ] {
        let run = peftpipe_bounded(
            &dir,
            &["validate", file],
            std::time::Duration::from_secs(5),
            1 << 20,
        );
        let stderr = text(&run.output.stderr);
        assert!(
            run.seconds < 1.0,
            "{file}: took {:.2} s (peak {} KiB)",
            run.seconds,
            run.peak_kib
        );
        assert!(
            run.peak_kib < 1 << 20,
            "{file}: peak RSS {} KiB",
            run.peak_kib
        );
        assert_eq!(run.output.status.code(), Some(2), "{file}: {stderr}");
        assert!(
            stderr.starts_with(&format!("{file}:{line}:"))
                && stderr.contains("too many alias expansions"),
            "{file}: {stderr}"
        );
    }
}

#[test]
fn deep_nesting_and_huge_files_are_refused_without_a_crash() {
    let temp = tempfile::tempdir().unwrap_or_else(|e| panic!("tempdir: {e}"));
    let deep = format!("stages: {}{}\n", "[".repeat(100), "]".repeat(100));
    std::fs::write(temp.path().join("deep.yaml"), deep).unwrap_or_else(|e| panic!("{e}"));
    let mut block = String::from("stages:\n");
    for depth in 1..100 {
        block.push_str(&format!("{}a:\n", "  ".repeat(depth)));
    }
    std::fs::write(temp.path().join("block.yaml"), block).unwrap_or_else(|e| panic!("{e}"));
    // Past the YAML scanner's own limit: a syntax error, not a crash.
    let deepest = format!("stages: {}{}\n", "[".repeat(100_000), "]".repeat(100_000));
    std::fs::write(temp.path().join("deepest.yaml"), deepest).unwrap_or_else(|e| panic!("{e}"));
    let wide = format!("stages: [{}]\n", "1,".repeat(150_000));
    std::fs::write(temp.path().join("wide.yaml"), wide).unwrap_or_else(|e| panic!("{e}"));
    let huge = format!("# {}\n", "x".repeat(9 << 20));
    std::fs::write(temp.path().join("huge.yaml"), huge).unwrap_or_else(|e| panic!("{e}"));
    for (file, expected) in [
        (
            "deep.yaml",
            "deep.yaml:1:72: document too large: mappings and lists nested more than 64 deep",
        ),
        ("block.yaml", "block.yaml:65:"),
        ("deepest.yaml", "deepest.yaml:1:"),
        ("wide.yaml", "wide.yaml:1:"),
        (
            "huge.yaml",
            "huge.yaml: document too large: a pipeline file may hold at most 8 MiB",
        ),
    ] {
        let run = peftpipe_bounded(
            temp.path(),
            &["validate", file],
            std::time::Duration::from_secs(10),
            1 << 20,
        );
        let stderr = text(&run.output.stderr);
        assert_eq!(run.output.status.code(), Some(2), "{file}: {stderr}");
        assert!(stderr.starts_with(expected), "{file}: {stderr}");
        if file != "deepest.yaml" {
            assert!(stderr.contains("document too large"), "{file}: {stderr}");
        }
        assert!(
            run.peak_kib < 1 << 20,
            "{file}: peak RSS {} KiB",
            run.peak_kib
        );
    }
}

fn write(path: &Path, text: &str) {
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent).unwrap_or_else(|e| panic!("{e}"));
    }
    std::fs::write(path, text).unwrap_or_else(|e| panic!("cannot write {}: {e}", path.display()));
}

fn symlink(target: &Path, link: &Path) {
    std::os::unix::fs::symlink(target, link)
        .unwrap_or_else(|e| panic!("cannot link {}: {e}", link.display()));
}

/// A project `root/project` with a CSV and a secret file beside it (outside the project).
fn project_with_a_secret_beside_it() -> (tempfile::TempDir, PathBuf) {
    let root = tempfile::tempdir().unwrap_or_else(|e| panic!("tempdir: {e}"));
    let project = root.path().join("project");
    write(
        &project.join("rows.csv"),
        "text,label\ngood,positive\nbad,negative\n",
    );
    write(&root.path().join("secret.j2"), "the secret {{ text }}");
    write(&project.join("prompts/ok.j2"), "Review: {{ text }}");
    (root, project)
}

fn template_pipeline(prompt: &str) -> String {
    format!(
        "stages:\n  data:\n    ingest:\n      path: rows.csv\n  prompts:\n    template:\n      input: data\n      {prompt}\n      completion: \" {{{{ label }}}}\"\n"
    )
}

/// Regression: includes were confined to the project except through symlinks, while
/// `prompt_file: /etc/hostname` was read freely. One rule now: template files resolve (symbolic
/// links included) inside the project unless `--allow-outside-project`.
#[test]
fn template_files_outside_the_project_are_refused_unless_allowed() {
    let (root, project) = project_with_a_secret_beside_it();
    let secret = root.path().join("secret.j2");
    symlink(&secret, &project.join("prompts/link.j2"));
    symlink(root.path(), &project.join("up"));
    let absolute = format!("prompt_file: {}", secret.display());
    let cases = [
        ("absolute.yaml", absolute.as_str(), "prompt_file `/", false),
        (
            "parent.yaml",
            "prompt_file: ../secret.j2",
            "prompt_file `../secret.j2`",
            false,
        ),
        (
            "symlink.yaml",
            "prompt_file: prompts/link.j2",
            "prompt_file `prompts/link.j2`",
            true,
        ),
        (
            "include.yaml",
            "prompt: \"{% include 'up/secret.j2' %}\"",
            "the included template `up/secret.j2`",
            true,
        ),
    ];
    for (file, prompt, expected, via_link) in cases {
        write(&project.join(file), &template_pipeline(prompt));
        let output = peftpipe(&project, &["validate", file]);
        let stderr = text(&output.stderr);
        assert_eq!(output.status.code(), Some(2), "{file}: {stderr}");
        assert!(stderr.contains(expected), "{file}: {stderr}");
        assert!(
            stderr.contains("outside the project directory")
                && stderr.contains("--allow-outside-project"),
            "{file}: {stderr}"
        );
        assert_eq!(
            stderr.contains("through a symbolic link"),
            via_link,
            "{file}: {stderr}"
        );
        let output = peftpipe(&project, &["validate", "--allow-outside-project", file]);
        assert_eq!(
            output.status.code(),
            Some(0),
            "{file} with the flag: {}",
            text(&output.stderr)
        );
    }
    // Inside the project, no flag needed.
    write(
        &project.join("inside.yaml"),
        &template_pipeline("prompt_file: prompts/ok.j2"),
    );
    let output = peftpipe(&project, &["validate", "inside.yaml"]);
    assert_eq!(output.status.code(), Some(0), "{}", text(&output.stderr));
}

/// Regression: an export destination outside the project was refused only at publish, after
/// training; `validate` (and so `run`, before anything runs) refuses it now.
#[test]
fn export_destinations_outside_the_project_are_refused_by_validate() {
    let (root, project) = project_with_a_secret_beside_it();
    symlink(root.path(), &project.join("up"));
    let pipeline = |destination: &str| {
        format!(
            "stages:\n  data:\n    ingest:\n      path: rows.csv\n  prompts:\n    template:\n      input: data\n      prompt: \"{{{{ text }}}}\"\n      completion: \"{{{{ label }}}}\"\n  train:\n    train:\n      data: prompts\n      model: model\n  export:\n    export:\n      from: train\n      adapter: {destination}\n"
        )
    };
    for (file, destination, expected) in [
        ("parent.yaml", "../elsewhere", "goes up with `..`"),
        (
            "absolute.yaml",
            "/tmp/peftpipe-validate-export",
            "is an absolute path",
        ),
        ("symlink.yaml", "up/adapter", "through a symbolic link"),
    ] {
        write(&project.join(file), &pipeline(destination));
        let output = peftpipe(&project, &["validate", file]);
        let stderr = text(&output.stderr);
        assert!(
            stderr.contains("stages.export.export.adapter: export destination")
                && stderr.contains(expected)
                && stderr.contains("--allow-outside-project"),
            "{file}: {stderr}"
        );
        let allowed = peftpipe(&project, &["validate", "--allow-outside-project", file]);
        assert!(
            !text(&allowed.stderr).contains("export destination"),
            "{file} with the flag: {}",
            text(&allowed.stderr)
        );
    }
}

/// Regression: two pipeline files with the same `name:` shared a lock file and
/// `.peftpipe/out/<name>/`; `validate` of both now says so, in each file.
#[test]
fn two_pipelines_of_one_project_may_not_share_a_name() {
    let (_root, project) = project_with_a_secret_beside_it();
    let pipeline =
        |name: &str| format!("name: {name}\nstages:\n  data:\n    ingest:\n      path: rows.csv\n");
    write(&project.join("first.yaml"), &pipeline("reviews"));
    write(&project.join("second.yaml"), &pipeline("reviews"));
    write(&project.join("third.yaml"), &pipeline("other"));
    let output = peftpipe(
        &project,
        &["validate", "first.yaml", "second.yaml", "third.yaml"],
    );
    let stderr = text(&output.stderr);
    assert_eq!(output.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains("first.yaml:1:7: name: pipeline name `reviews` is also the name of second.yaml: the two would share its lock file and `.peftpipe/out/reviews/`"),
        "{stderr}"
    );
    assert!(
        stderr.contains(
            "second.yaml:1:7: name: pipeline name `reviews` is also the name of first.yaml"
        ),
        "{stderr}"
    );
    assert!(stderr.contains("valid: third.yaml"), "{stderr}");
    // The same file twice is not a conflict; a file named like another's `name:` is.
    let output = peftpipe(&project, &["validate", "first.yaml", "first.yaml"]);
    assert_eq!(output.status.code(), Some(0), "{}", text(&output.stderr));
    write(
        &project.join("reviews.yaml"),
        "stages:\n  data:\n    ingest:\n      path: rows.csv\n",
    );
    let output = peftpipe(
        &project,
        &["validate", "third.yaml", "reviews.yaml", "first.yaml"],
    );
    let stderr = text(&output.stderr);
    assert_eq!(output.status.code(), Some(2), "{stderr}");
    assert!(
        stderr
            .contains("reviews.yaml: name: pipeline name `reviews` is also the name of first.yaml"),
        "{stderr}"
    );
}

#[test]
#[expect(clippy::print_stderr, reason = "a skipped test says why")]
fn what_a_merged_gpt2_export_cannot_hold_is_refused_before_training() {
    let Some(shared) = std::env::var_os("PEFTPIPE_SHARED") else {
        eprintln!("skipped: PEFTPIPE_SHARED not set");
        return;
    };
    let dir = tempfile::tempdir().expect("temporary directory");
    let pipeline = |method: &str| {
        format!(
            "stages:
  data: {{ingest: {{path: {shared}/datasets/bevostories/validation.parquet, limit: 10}}}}
  stories: {{template: {{input: data, prompt: \"\", completion: \"{{{{ text }}}}\"}}}}
  train: {{train: {{data: stories, model: {shared}/models/tiny-gpt2-random, method: {method}, max_steps: 1}}}}
  out: {{export: {{from: train, adapter: out/a, merged: out/m}}}}
",
            shared = Path::new(&shared).display()
        )
    };
    // IA3 on c_attn scales its output, bias included, and merges so (weight and bias patched);
    // feed-forward targets scale inputs.
    for method in [
        "{ia3: {}}",
        "{ia3: {target_modules: [mlp.c_proj], feedforward_modules: [mlp.c_proj]}}",
    ] {
        write(&dir.path().join("p.yaml"), &pipeline(method));
        let output = peftpipe(dir.path(), &["validate", "p.yaml"]);
        assert!(
            output.status.success(),
            "{method}: {}",
            text(&output.stderr)
        );
    }
    // IA3's defaults (c_attn output-side) train and merge (enough rows for an eval split).
    write(
        &dir.path().join("p.yaml"),
        &pipeline("{ia3: {}}").replace("validation.parquet, limit: 10", "train.parquet, limit: 40"),
    );
    let output = peftpipe(dir.path(), &["run", "p.yaml"]);
    assert!(output.status.success(), "{}", text(&output.stderr));
    assert!(dir.path().join("out/m/model.safetensors").is_file());
    // A merged model re-quantized in 4 bits is written for Llama-family models only.
    write(
        &dir.path().join("p.yaml"),
        &pipeline("{lora: {r: 2}}").replace("merged: out/m", "merged: out/m, quantize: {}"),
    );
    let output = peftpipe(dir.path(), &["validate", "p.yaml"]);
    let stderr = text(&output.stderr);
    assert_eq!(output.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains("stages.out.export.quantize") && stderr.contains("gpt2"),
        "{stderr}"
    );
    // Nor is a 4-bit base for evaluation.
    write(
        &dir.path().join("p.yaml"),
        &format!(
            "stages:
  data: {{ingest: {{path: {shared}/datasets/bevostories/validation.parquet, limit: 10}}}}
  stories: {{template: {{input: data, prompt: \"\", completion: \"{{{{ text }}}}\"}}}}
  ev: {{evaluate: {{base_model: {shared}/models/tiny-gpt2-random, base_quantization: {{}}, data: stories}}}}
",
            shared = Path::new(&shared).display()
        ),
    );
    let output = peftpipe(dir.path(), &["validate", "p.yaml"]);
    let stderr = text(&output.stderr);
    assert_eq!(output.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains("stages.ev.evaluate.base_quantization") && stderr.contains("gpt2"),
        "{stderr}"
    );
}

#[test]
fn a_typed_csv_cell_that_cannot_be_read_is_found_by_validate() {
    // `types` parses cells the untyped read accepts: validate reads the first records typed, as
    // the run does, and says which cell (the run would fail on it).
    let dir = tempfile::tempdir().expect("temporary directory");
    write(&dir.path().join("b.csv"), "id,text\nabc,hi\n");
    write(
        &dir.path().join("p.yaml"),
        "stages:\n  data: {ingest: {path: b.csv, types: {id: int64}}}\n",
    );
    let output = peftpipe(dir.path(), &["validate", "p.yaml"]);
    let stderr = text(&output.stderr);
    assert_eq!(output.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains("stages.data.ingest.types")
            && stderr.contains("line 2: column `id`: \"abc\" is not an integer"),
        "{stderr}"
    );
    write(&dir.path().join("b.csv"), "id,text\n7,hi\n");
    let output = peftpipe(dir.path(), &["validate", "p.yaml"]);
    assert!(output.status.success(), "{}", text(&output.stderr));
}

/// Probe item: Mistral loaded as Llama. With a sliding window shorter than the context,
/// training on sequences longer than the window would not be computed as transformers does
/// (peftpipe has no sliding-window attention): `validate` refuses a `max_seq_len` that could
/// exceed it, naming config.json's key and both numbers; one within it passes.
#[test]
fn a_max_seq_len_past_the_sliding_window_is_refused() {
    let project = tempfile::tempdir().unwrap();
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    // The pipeline names it as `model`, beside itself.
    support::quickstart_model_in(project.path(), |config| support::as_mistral(config, 32));
    let pipeline = |max_seq_len: usize| {
        quickstart_train_pipeline(
            root,
            &format!("method: {{lora: {{r: 4}}}}\n      max_seq_len: {max_seq_len}"),
        )
    };
    std::fs::write(project.path().join("p.yaml"), pipeline(48)).unwrap();
    let output = peftpipe(
        project.path(),
        &["validate", "p.yaml", "--allow-outside-project"],
    );
    let stderr = text(&output.stderr);
    assert_eq!(output.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains("max_seq_len")
            && stderr.contains("`sliding_window` 32")
            && stderr.contains("48"),
        "{stderr}"
    );
    std::fs::write(project.path().join("p.yaml"), pipeline(32)).unwrap();
    let output = peftpipe(
        project.path(),
        &["validate", "p.yaml", "--allow-outside-project"],
    );
    assert!(output.status.success(), "{}", text(&output.stderr));
}

/// `max_seq_len` above the model's context (config.json `max_position_embeddings`) was cut to
/// it without a word: a written value peftpipe cannot honour (it never computes past the
/// context, where transformers' RoPE would extrapolate) is refused, naming config.json's key
/// and both numbers, with the method's virtual tokens counted (a written 512 too); the default
/// (512 when the key is left out, cut to the context as documented) and a value within it pass. A RoPE-scaled (llama3) model's context
/// is `max_position_embeddings`, as transformers defines it, not the `original_` one.
#[test]
fn a_max_seq_len_past_max_position_embeddings_is_refused() {
    let project = tempfile::tempdir().unwrap();
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let model = support::quickstart_model_in(project.path(), |_| {});
    let pipeline = |train: &str| quickstart_train_pipeline(root, train);
    let validate = |train: &str| {
        std::fs::write(project.path().join("p.yaml"), pipeline(train)).unwrap();
        let output = peftpipe(
            project.path(),
            &["validate", "p.yaml", "--allow-outside-project"],
        );
        (output.status.code(), text(&output.stderr))
    };
    // The quickstart model: max_position_embeddings 128.
    let lora = "method: {lora: {r: 4}}";
    let (code, stderr) = validate(&format!("{lora}\n      max_seq_len: 200"));
    assert_eq!(code, Some(2), "{stderr}");
    for expected in [
        "stages.train.train.max_seq_len",
        "200",
        "`max_position_embeddings` 128",
        "use max_seq_len: 128 or less",
    ] {
        assert!(stderr.contains(expected), "no `{expected}` in:\n{stderr}");
    }
    // A written 512 is a value like any other (only leaving the key out means the default).
    let (code, stderr) = validate(&format!("{lora}\n      max_seq_len: 512"));
    assert_eq!(code, Some(2), "{stderr}");
    assert!(
        stderr.contains("512") && stderr.contains("use max_seq_len: 128 or less"),
        "{stderr}"
    );
    let prompt = "method: {prompt_tuning: {num_virtual_tokens: 8}}";
    let (code, stderr) = validate(&format!("{prompt}\n      max_seq_len: 128"));
    assert_eq!(code, Some(2), "{stderr}");
    for expected in ["128 (+ 8 virtual tokens)", "use max_seq_len: 120 or less"] {
        assert!(stderr.contains(expected), "no `{expected}` in:\n{stderr}");
    }
    for fits in [
        format!("{lora}\n      max_seq_len: 128"),
        format!("{prompt}\n      max_seq_len: 120"),
        // The default, 512, is cut to the context (the run says so when it cuts an example).
        lora.to_string(),
    ] {
        let (code, stderr) = validate(&fits);
        assert_eq!(code, Some(0), "{fits}: {stderr}");
    }
    // llama3 RoPE scaling: the context is max_position_embeddings (128), not the original 32.
    support::edit_config(&model, |config| {
        config["rope_scaling"] = serde_json::json!({
            "rope_type": "llama3", "factor": 4.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
            "original_max_position_embeddings": 32
        });
    });
    let (code, stderr) = validate(&format!("{lora}\n      max_seq_len: 100"));
    assert_eq!(code, Some(0), "{stderr}");
    let (code, stderr) = validate(&format!("{lora}\n      max_seq_len: 129"));
    assert_eq!(code, Some(2), "{stderr}");
    assert!(stderr.contains("`max_position_embeddings` 128"), "{stderr}");
}

/// A pipeline training the folder `model` beside it one step on the quickstart reviews, with
/// `train` (more keys of the train stage, indented as one) added.
fn quickstart_train_pipeline(root: &Path, train: &str) -> String {
    format!(
        r#"name: context
stages:
  data:
    ingest:
      path: {}
      columns: [text, label]
      split: {{fractions: {{train: 0.8, eval: 0.2}}}}
  prompts:
    template:
      input: data
      prompt: "review: {{{{ text }}}}\nsentiment:"
      completion: " {{{{ label }}}}"
  train:
    train:
      data: prompts
      model: model
      max_steps: 1
      device: cpu
      {train}
"#,
        root.join("datasets/quickstart/reviews.parquet").display()
    )
}

/// The optimizer state is f32: an `adam_epsilon` that is 0 in f32 (`1e-300`, or anything below
/// f32's smallest normal value, which a GPU flushes to 0) divides 0 by 0 where a gradient is 0,
/// and the run failed at its second step with a NaN loss blamed on the learning rate or the
/// data. `validate` names the key instead.
#[test]
fn an_adam_epsilon_that_is_zero_in_f32_is_refused() {
    let project = tempfile::tempdir().unwrap();
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    support::quickstart_model_in(project.path(), |_| {});
    let validate = |train: &str| {
        let pipeline = quickstart_train_pipeline(root, train);
        std::fs::write(project.path().join("p.yaml"), pipeline).unwrap();
        let output = peftpipe(
            project.path(),
            &["validate", "p.yaml", "--allow-outside-project"],
        );
        (output.status.code(), text(&output.stderr))
    };
    for tiny in ["1e-300", "1e-40"] {
        let (code, stderr) = validate(&format!("adam_epsilon: {tiny}"));
        assert_eq!(code, Some(2), "{tiny}: {stderr}");
        for expected in ["stages.train.train.adam_epsilon", tiny, "is 0 in f32"] {
            assert!(stderr.contains(expected), "no `{expected}` in:\n{stderr}");
        }
    }
    for fits in ["adam_epsilon: 1e-8", "adam_epsilon: 1e-30"] {
        let (code, stderr) = validate(fits);
        assert_eq!(code, Some(0), "{fits}: {stderr}");
    }
}
