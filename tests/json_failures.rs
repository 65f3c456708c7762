//! Regression: with `--json`, every command that fails prints one JSON object on stdout, the
//! shape `validate --json` gives a problem (`{"valid": false, "files": [{"file", "valid": false,
//! "problems": [{"path", "message"}]}]}`), and not only for a pipeline that does not load. Before,
//! `status`, `metrics`, `run`, `report`, `gc`, `push`/`pull`, `preview` and `dag` printed nothing on
//! stdout for a cache error, a corrupt lock file, an unknown `--stage`, a missing remote, ...
//! The exit code and the error on stderr are those of the same command without `--json`.

mod report_support;

use report_support::{stderr, Project};

/// `peftpipe ARGS` fails with `code`; with `--json` added, stdout is the problem object about
/// `file` with the problem at `path`, and stderr and the exit code are those without `--json`.
fn assert_json_failure(project: &Project, args: &[&str], code: i32, file: &str, path: &str) {
    let plain = project.peftpipe(args);
    assert_eq!(
        plain.status.code(),
        Some(code),
        "{args:?}: {}",
        stderr(&plain)
    );
    let mut with_json = vec!["--json"];
    with_json.extend_from_slice(args);
    let output = project.peftpipe(&with_json);
    assert_eq!(
        output.status.code(),
        Some(code),
        "{with_json:?}: {}",
        stderr(&output)
    );
    assert_eq!(stderr(&output), stderr(&plain), "{args:?}: stderr changed");
    let json: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap_or_else(|error| {
        panic!(
            "{with_json:?}: stdout is not JSON ({error}): {:?}\nstderr: {}",
            String::from_utf8_lossy(&output.stdout),
            stderr(&output)
        )
    });
    assert_eq!(json["valid"], false, "{args:?}: {json}");
    let files = json["files"].as_array().cloned().unwrap_or_default();
    assert_eq!(files.len(), 1, "{args:?}: {json}");
    assert_eq!(files[0]["file"], file, "{args:?}: {json}");
    assert_eq!(files[0]["valid"], false, "{args:?}: {json}");
    assert_eq!(files[0]["problems"][0]["path"], path, "{args:?}: {json}");
    let message = files[0]["problems"][0]["message"]
        .as_str()
        .unwrap_or_default();
    assert!(!message.is_empty(), "{args:?}: {json}");
    assert!(
        stderr(&output).contains(message.lines().next().unwrap_or_default()),
        "{args:?}: the message is stderr's error: {json}\n{}",
        stderr(&output)
    );
}

#[test]
fn pipeline_commands_print_the_problem_object_on_a_cache_error() {
    let project = Project::tiny();
    // A cache folder that is a file: every command that reads the cache fails with code 1.
    project.write("not-a-cache", "a file\n");
    for args in [
        &["status", "pipeline.yaml"][..],
        &["run", "pipeline.yaml", "--dry-run"],
        &["run", "pipeline.yaml"],
        &["metrics", "show", "pipeline.yaml"],
        &["report", "pipeline.yaml"],
        &["preview", "pipeline.yaml", "--stage", "prompts"],
    ] {
        let mut args = args.to_vec();
        args.extend_from_slice(&["--cache-dir", "not-a-cache"]);
        assert_json_failure(&project, &args, 1, "pipeline.yaml", "--cache-dir");
    }
}

#[test]
fn a_corrupt_lock_file_gives_the_problem_object() {
    let project = Project::tiny();
    project.write(".peftpipe/cache/locks/tiny.lock.json", "{ not json");
    for args in [
        &["status", "pipeline.yaml"][..],
        &["metrics", "show", "pipeline.yaml"],
        &["metrics", "diff", "pipeline.yaml", "pipeline.yaml"],
    ] {
        assert_json_failure(&project, args, 1, "pipeline.yaml", "--cache-dir");
    }
}

#[test]
fn argument_errors_of_pipeline_commands_give_the_problem_object() {
    let project = Project::tiny();
    assert_json_failure(
        &project,
        &["run", "pipeline.yaml", "--stage", "trian"],
        2,
        "pipeline.yaml",
        "--stage",
    );
    assert_json_failure(
        &project,
        &["run", "pipeline.yaml", "--stage", "trian", "--dry-run"],
        2,
        "pipeline.yaml",
        "--stage",
    );
    for stage in ["train", "nope"] {
        assert_json_failure(
            &project,
            &["preview", "pipeline.yaml", "--stage", stage],
            2,
            "pipeline.yaml",
            "--stage",
        );
    }
    assert_json_failure(
        &project,
        &[
            "preview",
            "pipeline.yaml",
            "--stage",
            "prompts",
            "--split",
            "test",
        ],
        2,
        "pipeline.yaml",
        "--split",
    );
    assert_json_failure(
        &project,
        &["dag", "pipeline.yaml", "--stage", "trian"],
        2,
        "pipeline.yaml",
        "--stage",
    );
    // Never ran: nothing to compare.
    assert_json_failure(
        &project,
        &["metrics", "diff", "pipeline.yaml", "pipeline.yaml"],
        1,
        "pipeline.yaml",
        "",
    );
    assert_json_failure(
        &project,
        &["metrics", "diff", "pipeline.yaml"],
        2,
        "pipeline.yaml",
        "--rev",
    );
    // A page that cannot be written.
    assert_json_failure(
        &project,
        &["report", "pipeline.yaml", "-o", "pipeline.yaml/report.html"],
        1,
        "pipeline.yaml",
        "--output",
    );
}

#[test]
fn a_pipeline_file_that_does_not_parse_gives_the_problem_object_in_dag() {
    let project = Project::tiny();
    project.write("broken.yaml", "stages: [unclosed\n");
    let output = project.peftpipe(&["--json", "dag", "broken.yaml"]);
    assert_eq!(output.status.code(), Some(2), "{}", stderr(&output));
    let json: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap_or_else(|error| {
        panic!(
            "stdout is not JSON ({error}): {:?}",
            String::from_utf8_lossy(&output.stdout)
        )
    });
    assert_eq!(json["valid"], false, "{json}");
    assert_eq!(json["files"][0]["file"], "broken.yaml", "{json}");
    assert!(json["files"][0]["problems"][0]["message"].is_string());
}

#[test]
fn cache_and_remote_commands_give_the_problem_object() {
    let project = Project::tiny();
    // No such pipeline file (gc says so before anything else).
    assert_json_failure(&project, &["gc", "nope.yaml"], 2, "nope.yaml", "FILE");
    // No cache yet.
    assert_json_failure(
        &project,
        &["gc", "pipeline.yaml"],
        1,
        "pipeline.yaml",
        "--cache-dir",
    );
    assert_json_failure(
        &project,
        &["push", "pipeline.yaml", "--remote", "remote"],
        1,
        "pipeline.yaml",
        "--cache-dir",
    );
    // No remote configured.
    assert_json_failure(
        &project,
        &["push", "pipeline.yaml"],
        2,
        "pipeline.yaml",
        "--remote",
    );
    // A remote that never saw the pipeline.
    std::fs::create_dir_all(project.path("remote")).expect("remote folder");
    assert_json_failure(
        &project,
        &["pull", "pipeline.yaml", "--remote", "remote"],
        1,
        "pipeline.yaml",
        "--remote",
    );
}

#[test]
fn dag_json_of_a_pipeline_with_problems_has_the_problem_object_beside_the_graph() {
    let project = Project::tiny();
    let text = std::fs::read_to_string(project.path("pipeline.yaml")).expect("pipeline");
    project.write("typo.yaml", &text.replace("seed: 3", "sed: 3"));
    let output = project.peftpipe(&["--json", "dag", "typo.yaml"]);
    assert_eq!(output.status.code(), Some(2), "{}", stderr(&output));
    let json: serde_json::Value = serde_json::from_slice(&output.stdout).expect("JSON");
    assert_eq!(json["stages"].as_array().map(Vec::len), Some(5), "{json}");
    assert_eq!(json["problems"][0]["path"], "sed", "{json}");
    assert_eq!(json["valid"], false, "{json}");
    assert_eq!(json["files"][0]["file"], "typo.yaml", "{json}");
    assert_eq!(json["files"][0]["problems"], json["problems"], "{json}");
}

/// Regression: an argument the command line parser refuses (an unknown option or subcommand, an
/// option without its value, a value it does not take, a missing argument, two that conflict)
/// printed nothing on stdout under `--json`, in every command. Now the problem object, `file`
/// empty (nothing was read) and `path` the argument clap names, with clap's message; stderr and
/// the exit code (2) are clap's, and `--json` counts wherever it stands on the command line.
#[test]
fn arguments_the_parser_refuses_give_the_problem_object() {
    let project = Project::tiny();
    for (args, path) in [
        (&["status", "pipeline.yaml", "--bogus"][..], "--bogus"),
        (&["run", "pipeline.yaml", "--jobs"], "--jobs"),
        (&["run", "pipeline.yaml", "--jobs", "many"], "--jobs"),
        (&["dag", "pipeline.yaml", "--format", "svg"], "--format"),
        (&["status", "pipeline.yaml", "--color", "purple"], "--color"),
        (&["statsu", "pipeline.yaml"], "COMMAND"),
        (&["status"], "PIPELINE"),
        (&["generate", "model"], "--prompt"),
        (
            &["generate", "model", "--prompt", "a", "--input", "b.jsonl"],
            "--prompt",
        ),
        // clap takes no value starting with `--` for --input: `--json` here is the flag, and
        // --input lacks its value.
        (&["generate", "model", "--input"], "--input"),
    ] {
        assert_json_failure(&project, args, 2, "", path);
    }
    // `--json` after the error, or at the end, counts as well.
    for args in [
        &["status", "pipeline.yaml", "--bogus", "--json"][..],
        &["generate", "model", "--input", "--json"],
    ] {
        let output = project.peftpipe(args);
        assert_eq!(output.status.code(), Some(2), "{args:?}");
        let json: serde_json::Value = serde_json::from_slice(&output.stdout)
            .unwrap_or_else(|error| panic!("{args:?}: stdout is not JSON ({error})"));
        assert_eq!(json["valid"], false, "{args:?}: {json}");
    }
    // The suggestion clap makes is the hint.
    let output = project.peftpipe(&["--json", "status", "pipeline.yaml", "--jsno"]);
    let json: serde_json::Value = serde_json::from_slice(&output.stdout).expect("JSON");
    let hint = json["files"][0]["problems"][0]["hint"]
        .as_str()
        .unwrap_or_default();
    assert!(hint.contains("'--json'"), "{json}");
}

/// After `--`, `--json` is a value (here an extra PIPELINE clap refuses), not the flag: no JSON.
#[test]
fn json_after_the_end_of_options_is_not_the_flag() {
    let project = Project::tiny();
    let output = project.peftpipe(&["status", "pipeline.yaml", "--", "--json"]);
    assert_eq!(output.status.code(), Some(2), "{}", stderr(&output));
    assert!(
        output.stdout.is_empty(),
        "{}",
        report_support::stdout(&output)
    );
}

/// A command that needs a subcommand (`metrics`, `bench`) given none: clap prints its help on
/// stderr and exits 2; with `--json` the problem object says which command lacks one.
#[test]
fn a_missing_subcommand_gives_the_problem_object() {
    let project = Project::tiny();
    let plain = project.peftpipe(&["metrics"]);
    let output = project.peftpipe(&["--json", "metrics"]);
    assert_eq!(output.status.code(), Some(2));
    assert_eq!(stderr(&output), stderr(&plain));
    let json: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap_or_else(|error| {
        panic!(
            "stdout is not JSON ({error}): {:?}",
            report_support::stdout(&output)
        )
    });
    let problem = &json["files"][0]["problems"][0];
    assert_eq!(problem["path"], "COMMAND", "{json}");
    assert!(
        problem["message"]
            .as_str()
            .is_some_and(|message| message.contains("peftpipe metrics")),
        "{json}"
    );
    assert!(
        problem["hint"]
            .as_str()
            .is_some_and(|hint| hint.contains("show") && hint.contains("diff")),
        "{json}"
    );
}

/// `--help` and `--version` print what they print without `--json` (on stdout, exit 0).
#[test]
fn help_and_version_are_unchanged_by_json() {
    let project = Project::tiny();
    for args in [
        &["--help"][..],
        &["status", "--help"],
        &["--version"],
        &["help", "run"],
    ] {
        let plain = project.peftpipe(args);
        let mut with_json = vec!["--json"];
        with_json.extend_from_slice(args);
        let output = project.peftpipe(&with_json);
        assert_eq!(output.status.code(), Some(0), "{with_json:?}");
        assert_eq!(output.stdout, plain.stdout, "{with_json:?}");
        assert_eq!(stderr(&output), stderr(&plain), "{with_json:?}");
    }
}
