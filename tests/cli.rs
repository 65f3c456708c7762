//! The first things users type (issue 11, item 7): `init` writes a commented pipeline that
//! validates, `completions` and `man` print what shells and man read, every `--help` has
//! examples, `--color` and `-v` do what they say.

mod report_support;

use report_support::{stderr, stdout, Project};

#[test]
fn init_without_arguments_writes_a_pipeline_that_validates() {
    let project = Project::empty();
    let output = project.ok(&["init"]);
    let log = stderr(&output);
    for written in [
        "data/examples.jsonl",
        "pipeline.schema.json",
        "pipeline.yaml",
    ] {
        assert!(project.path(written).is_file(), "{written}: {log}");
    }
    let text = std::fs::read_to_string(project.path("pipeline.yaml")).expect("pipeline");
    assert!(
        text.starts_with("# yaml-language-server: $schema=pipeline.schema.json\n"),
        "{text}"
    );
    assert!(
        text.contains("columns: [\"prompt\", \"completion\"]"),
        "{text}"
    );
    assert!(
        text.contains("  # train:"),
        "train commented out without --model: {text}"
    );
    let schema: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(project.path("pipeline.schema.json")).expect("schema"),
    )
    .expect("the schema is JSON");
    assert!(schema.get("$schema").is_some() || schema.get("properties").is_some());
    let validated = project.peftpipe(&["validate", "pipeline.yaml"]);
    assert!(validated.status.success(), "{}\n{text}", stderr(&validated));

    // Never overwrites.
    let again = project.peftpipe(&["init"]);
    assert_eq!(again.status.code(), Some(2));
    assert!(
        stderr(&again).contains("already exists"),
        "{}",
        stderr(&again)
    );
}

#[test]
fn init_reads_the_columns_of_the_data_and_uses_the_model() {
    let project = Project::tiny();
    let output = project.ok(&[
        "init",
        "--data",
        "data/reviews.parquet",
        "--model",
        "model",
        "-o",
        "reviews.yaml",
    ]);
    let text = std::fs::read_to_string(project.path("reviews.yaml")).expect("pipeline");
    assert!(text.contains("columns: [\"text\", \"label\"]"), "{text}");
    assert!(text.contains("prompt: \"{{ text }}\""), "{text}");
    assert!(text.contains("completion: \" {{ label }}\""), "{text}");
    assert!(text.contains("\n      model: \"model\"\n"), "{text}");
    assert!(!text.contains("# train:"), "{text}");
    let validated = project.peftpipe(&["validate", "reviews.yaml"]);
    assert!(
        validated.status.success(),
        "{}\n{}\n{text}",
        stderr(&output),
        stderr(&validated)
    );
    let stages = stdout(&project.ok(&["validate", "reviews.yaml", "--json"]));
    for stage in ["data", "prompts", "train", "evaluate", "export"] {
        assert!(
            stages.contains(&format!("\"{stage}\"")),
            "{stage}: {stages}"
        );
    }
}

/// Regression: a data file or model outside the pipeline's folder was written as an absolute path
/// (`/home/me/repo/data/reviews.parquet`), which ties the pipeline to one checkout and makes the
/// input's fingerprint key (the path as written) differ on every machine, so a pushed cache never
/// matched a colleague's or CI's checkout. It is written relative to the pipeline's folder, as
/// pipelines/quickstart.yaml writes `../datasets/...`.
#[test]
fn init_writes_paths_outside_the_pipeline_folder_relative_to_it() {
    let project = Project::tiny();
    let output = project.ok(&[
        "init",
        "--data",
        "data/reviews.parquet",
        "--model",
        "model",
        "-o",
        "pipelines/reviews.yaml",
    ]);
    let text = std::fs::read_to_string(project.path("pipelines/reviews.yaml")).expect("pipeline");
    assert!(
        text.contains("\n      path: \"../data/reviews.parquet\"\n"),
        "{text}"
    );
    assert!(text.contains("\n      model: \"../model\"\n"), "{text}");
    let validated = project.peftpipe(&["validate", "pipelines/reviews.yaml"]);
    assert!(
        validated.status.success(),
        "{}\n{}\n{text}",
        stderr(&output),
        stderr(&validated)
    );
}

#[test]
fn init_names_a_data_file_it_cannot_read() {
    let project = Project::empty();
    project.write("notes.txt", "hello\n");
    let output = project.peftpipe(&["init", "--data", "missing.parquet"]);
    assert_eq!(output.status.code(), Some(2));
    assert!(
        stderr(&output).contains("missing.parquet"),
        "{}",
        stderr(&output)
    );
    assert!(!project.path("pipeline.yaml").exists());
}

#[test]
fn completions_for_each_shell() {
    let project = Project::empty();
    for shell in ["bash", "zsh", "fish", "elvish", "powershell"] {
        let script = stdout(&project.ok(&["completions", shell]));
        assert!(script.contains("peftpipe"), "{shell}");
        for subcommand in ["metrics", "report", "init", "status"] {
            assert!(script.contains(subcommand), "{shell}: {subcommand}");
        }
        // The hidden subcommand `run` starts for data-parallel ranks is not offered.
        assert!(!script.contains("train-rank"), "{shell}");
    }
    assert_eq!(
        project.peftpipe(&["completions", "tcsh"]).status.code(),
        Some(2)
    );
}

#[test]
fn man_pages_of_the_tool_and_of_a_subcommand() {
    let project = Project::empty();
    let page = stdout(&project.ok(&["man"]));
    assert!(
        page.contains(".TH peftpipe"),
        "{}",
        &page[..200.min(page.len())]
    );
    assert!(page.contains("metrics"));
    let run = stdout(&project.ok(&["man", "run"]));
    assert!(
        run.contains(".TH peftpipe-run"),
        "{}",
        &run[..200.min(run.len())]
    );
    assert!(run.contains("dry\\-run"), "run's options");
    let unknown = project.peftpipe(&["man", "runn"]);
    assert_eq!(unknown.status.code(), Some(2));
    assert!(stderr(&unknown).contains("no subcommand `runn`"));
    // The list of subcommands names the visible ones only (not the hidden `train-rank`), and a
    // subcommand's page carries the tool's version in its title as the tool's page does.
    assert!(
        stderr(&unknown).contains("validate, run,"),
        "{}",
        stderr(&unknown)
    );
    assert!(
        !stderr(&unknown).contains("train-rank"),
        "{}",
        stderr(&unknown)
    );
    let version = stdout(&project.ok(&["--version"]));
    let version = version.trim().trim_start_matches("peftpipe ");
    assert!(
        run.contains(&format!("\"peftpipe-run {version}\"")),
        "{}",
        &run[..200.min(run.len())]
    );
}

/// Every subcommand path (`run`, `metrics diff`, `bench train`, ...).
fn subcommands() -> Vec<Vec<String>> {
    let help = |args: &[String]| {
        let output = std::process::Command::new(env!("CARGO_BIN_EXE_peftpipe"))
            .args(args)
            .arg("--help")
            .output()
            .expect("run");
        stdout(&output)
    };
    let listed = |text: &str| -> Vec<String> {
        text.split("Commands:")
            .nth(1)
            .map(|section| {
                section
                    .lines()
                    .skip(1)
                    .take_while(|line| line.starts_with("  "))
                    .filter_map(|line| line.split_whitespace().next())
                    .filter(|name| *name != "help")
                    .map(str::to_string)
                    .collect()
            })
            .unwrap_or_default()
    };
    let mut out = Vec::new();
    for name in listed(&help(&[])) {
        let path = vec![name];
        let nested = listed(&help(&path));
        out.push(path.clone());
        for inner in nested {
            out.push(vec![path[0].clone(), inner]);
        }
    }
    out
}

#[test]
fn every_help_has_examples() {
    let paths = subcommands();
    assert!(paths.len() >= 20, "{paths:?}");
    let mut without = Vec::new();
    for path in std::iter::once(Vec::new()).chain(paths) {
        let output = std::process::Command::new(env!("CARGO_BIN_EXE_peftpipe"))
            .args(&path)
            .arg("--help")
            .output()
            .expect("run");
        if !stdout(&output).contains("Examples:\n  peftpipe ") {
            without.push(path.join(" "));
        }
    }
    assert!(without.is_empty(), "--help without examples: {without:?}");
}

#[test]
fn color_always_and_never_override_the_terminal_check() {
    let project = Project::empty();
    project.write("bad.yaml", "name: bad\nstages:\n  x:\n    ingset: {}\n");
    let colored = project.peftpipe(&["validate", "bad.yaml", "--color", "always"]);
    assert!(stderr(&colored).contains("\x1b["), "{}", stderr(&colored));
    let plain = project.peftpipe(&["validate", "bad.yaml", "--color", "never"]);
    assert!(!stderr(&plain).contains("\x1b["), "{}", stderr(&plain));
    // Not a terminal: auto means no colors.
    let auto = project.peftpipe(&["validate", "bad.yaml"]);
    assert!(!stderr(&auto).contains("\x1b["));
}

#[test]
fn verbose_summary_shows_every_figure() {
    let project = Project::tiny();
    let quiet_summary = stderr(&project.ok(&["run", "pipeline.yaml", "--stage", "data"]));
    assert!(!quiet_summary.contains("rows_read="), "{quiet_summary}");
    assert!(quiet_summary.contains("rows_kept="), "{quiet_summary}");
    let verbose = stderr(&project.ok(&["run", "pipeline.yaml", "--stage", "data", "-v"]));
    assert!(verbose.contains("rows_read="), "{verbose}");
    for line in verbose.lines().chain(quiet_summary.lines()) {
        assert!(
            line.chars().count() <= 120,
            "wider than 120 columns: {line}"
        );
    }
}

#[test]
fn reading_commands_leave_a_missing_cache_missing() {
    // A mistyped --cache-dir: status says every stage never ran and metrics has nothing, but
    // neither leaves a folder behind.
    let project = Project::tiny();
    let missing = project.path("no-such-cache");
    let missing_text = missing.display().to_string();
    let status = project.ok(&["status", "pipeline.yaml", "--cache-dir", &missing_text]);
    assert!(stdout(&status).contains("never run"), "{}", stdout(&status));
    let _ = project.peftpipe(&[
        "metrics",
        "show",
        "pipeline.yaml",
        "--cache-dir",
        &missing_text,
    ]);
    assert!(!missing.exists(), "{} was created", missing.display());
}

#[test]
fn training_says_when_examples_are_cut_and_names_splits_not_cache_paths() {
    let project = Project::tiny();
    let output = project.ok(&[
        "run",
        "pipeline.yaml",
        "--no-report",
        "--stage",
        "train",
        "--set",
        "stages.train.train.max_seq_len=8",
    ]);
    let log = stderr(&output);
    assert!(
        log.contains("examples were longer than 8 tokens")
            && log.contains("cut (truncation: prompt_left)"),
        "{log}"
    );
    // Nothing left to train on: the message names the split and the stage.
    let output = project.peftpipe(&[
        "run",
        "pipeline.yaml",
        "--no-report",
        "--stage",
        "train",
        "--set",
        "stages.train.train.max_seq_len=2",
        "--set",
        "stages.train.train.truncation=drop",
    ]);
    let log = stderr(&output);
    assert!(!output.status.success());
    assert!(
        log.contains("split `train` of stage `prompts`: no example left to train on"),
        "{log}"
    );
    assert!(!log.contains(".peftpipe/cache"), "{log}");
}

#[test]
fn init_quotes_what_the_user_named_and_makes_a_valid_pipeline_name() {
    let project = Project::empty();
    project.write(
        "my data #1: v1.jsonl",
        "{\"question\": \"2 + 2 =\", \"answer\": \"4\"}\n{\"question\": \"1 + 2 =\", \"answer\": \"3\"}\n",
    );
    for output in ["sft.v2.yaml", "true.yaml"] {
        project.ok(&[
            "init",
            "--data",
            "my data #1: v1.jsonl",
            "--model",
            "models/my model",
            "-o",
            output,
        ]);
        let text = std::fs::read_to_string(project.path(output)).expect("written");
        assert!(
            text.contains("path: \"my data #1: v1.jsonl\"")
                && text.contains("model: \"models/my model\"")
                && text.contains(&format!("`peftpipe validate {output}`")),
            "{text}"
        );
        // The model folder does not exist: the only problem validate may find is that one.
        let output = project.peftpipe(&["validate", output]);
        let log = stderr(&output);
        assert!(
            log.contains("stages.train.train.model: model directory")
                && log.contains("error: 1 problem in 1 of 1 file"),
            "{log}"
        );
    }
    let text = std::fs::read_to_string(project.path("sft.v2.yaml")).expect("written");
    assert!(text.contains("name: \"sft_v2\""), "{text}");
    let text = std::fs::read_to_string(project.path("true.yaml")).expect("written");
    assert!(text.contains("name: \"true\""), "{text}");
}

#[test]
fn bench_and_inspect_refuse_sizes_that_measure_nothing() {
    let project = Project::empty();
    for args in [
        &["bench", "data", "--rows", "0"][..],
        &["bench", "status", "--shards", "0"],
        &["bench", "status", "--runs", "0"],
        &["bench", "quantize", "--runs", "0"],
        // An estimate needs a method to estimate.
        &["inspect", "model", "--batch", "4", "--sequence", "128"],
        &[
            "inspect",
            "model",
            "--method",
            "lora: {}",
            "--batch",
            "0",
            "--sequence",
            "8",
        ],
    ] {
        let output = project.peftpipe(args);
        assert_eq!(
            output.status.code(),
            Some(2),
            "{args:?}: {}",
            stderr(&output)
        );
    }
}

/// `bench quantize --block-size` quantizes in blocks of that many weights (the command it records
/// says so) and refuses a size bitsandbytes has not.
#[test]
fn bench_quantize_takes_a_block_size() {
    let project = Project::empty();
    let config = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("datasets/quickstart/model/config.json");
    let config = config.to_str().expect("a UTF-8 path");
    let output = project.peftpipe(&[
        "--json",
        "bench",
        "quantize",
        "--config",
        config,
        "--block-size",
        "128",
    ]);
    assert_eq!(output.status.code(), Some(0), "{}", stderr(&output));
    let report: serde_json::Value = serde_json::from_str(&stdout(&output)).expect("JSON");
    let command = report["command"].as_str().expect("command");
    assert!(command.contains("--block-size 128"), "{command}");
    assert_eq!(report["block_size"], 128, "{report}");
    assert_eq!(report["quant_type"], "nf4", "{report}");
    assert_eq!(report["double_quant"], true, "{report}");
    let output = project.peftpipe(&[
        "bench",
        "quantize",
        "--config",
        config,
        "--block-size",
        "100",
    ]);
    assert_eq!(output.status.code(), Some(2), "a usage error");
    let log = stderr(&output);
    assert!(
        log.contains("--block-size") && log.contains("power of two"),
        "{log}"
    );
}
