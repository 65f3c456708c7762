//! `peftpipe generate`: greedy text and token ids on the real tiny model, seeded sampling, and
//! argument errors. Needs `PEFTPIPE_SHARED` for the model tests (skips with a printed reason).
#![expect(clippy::print_stderr, reason = "tests print skip reasons")]

mod support;

use support::{peftpipe, shared_dir};

#[test]
fn generate_json_gives_the_known_greedy_text_of_stories260k() {
    let Some(shared) = shared_dir() else {
        eprintln!("skipped: PEFTPIPE_SHARED not set");
        return;
    };
    let model = shared.join("models/stories260k");
    let output = peftpipe()
        .args(["--json", "generate"])
        .arg(&model)
        .args([
            "--prompt",
            "Once upon a time",
            "--max-new-tokens",
            "40",
            "--device",
            "cpu",
        ])
        .output()
        .unwrap();
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let json: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
    // /work/shared/README.md: greedy from "Once upon a time" with the real model.
    let expected = ", there was a little girl named Lily. She loved to play outside in the park. \
                    One day, she saw a big, red ball.";
    assert_eq!(json["prompt"], "Once upon a time");
    assert_eq!(json["completion"], expected);
    assert_eq!(json["prompt_token_ids"][0], 1, "BOS first");
    assert_eq!(json["token_ids"].as_array().unwrap().len(), 40);
    assert_eq!(json["stop_reason"], "max_new_tokens");

    // The human form prints prompt + completion on stdout.
    let output = peftpipe()
        .arg("generate")
        .arg(&model)
        .args([
            "--prompt",
            "Once upon a time",
            "--max-new-tokens",
            "40",
            "--device",
            "cpu",
        ])
        .output()
        .unwrap();
    assert!(output.status.success());
    assert_eq!(
        String::from_utf8_lossy(&output.stdout).trim_end(),
        format!("Once upon a time{expected}")
    );
}

#[test]
fn sampling_is_reproducible_with_a_seed() {
    let Some(shared) = shared_dir() else {
        eprintln!("skipped: PEFTPIPE_SHARED not set");
        return;
    };
    let model = shared.join("models/stories260k");
    let run = |seed: &str| {
        let output = peftpipe()
            .args(["--json", "generate"])
            .arg(&model)
            .args([
                "--prompt",
                "Tom had a dog",
                "--max-new-tokens",
                "24",
                "--device",
                "cpu",
            ])
            .args(["--temperature", "1.0", "--top-p", "0.9", "--seed", seed])
            .output()
            .unwrap();
        assert!(
            output.status.success(),
            "{}",
            String::from_utf8_lossy(&output.stderr)
        );
        let json: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
        json["token_ids"].clone()
    };
    let first = run("7");
    assert_eq!(first, run("7"));
    assert_ne!(first, run("8"));
}

#[test]
fn bad_arguments_are_refused_with_exit_code_2() {
    let output = peftpipe()
        .args([
            "generate",
            "no-such-model",
            "--prompt",
            "x",
            "--temperature",
            "0",
        ])
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&output.stderr).contains("temperature"));
    let output = peftpipe()
        .args([
            "generate",
            "no-such-model",
            "--prompt",
            "x",
            "--top-p",
            "0.5",
        ])
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(2), "--top-p needs --temperature");
    let output = peftpipe()
        .args([
            "generate",
            "no-such-model",
            "--prompt",
            "x",
            "--device",
            "cpu",
        ])
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&output.stderr).contains("no-such-model"));
}

/// `hf://org/name` resolves through the Hugging Face cache layout (a fake cache holding a copy of
/// stories260k) and generates what the folder itself does; an id missing from the cache is
/// refused with exit code 2 and says how to get it.
#[test]
fn hub_ids_generate_like_the_cached_folder() {
    let Some(shared) = shared_dir() else {
        eprintln!("skipped: PEFTPIPE_SHARED not set");
        return;
    };
    let model = shared.join("models/stories260k");
    let cache = tempfile::tempdir().unwrap();
    let hash = "0f1e2d3c4b5a69788796a5b4c3d2e1f001234567";
    let repo = cache.path().join("models--karpathy--stories260k");
    let snapshot = repo.join("snapshots").join(hash);
    std::fs::create_dir_all(&snapshot).unwrap();
    for entry in std::fs::read_dir(&model).unwrap() {
        let path = entry.unwrap().path();
        if path.is_file() {
            std::fs::copy(&path, snapshot.join(path.file_name().unwrap())).unwrap();
        }
    }
    std::fs::create_dir_all(repo.join("refs")).unwrap();
    std::fs::write(repo.join("refs/main"), hash).unwrap();
    let run = |model: &str| {
        peftpipe()
            .args(["--json", "generate", model, "--prompt", "Once upon a time"])
            .args(["--max-new-tokens", "12", "--device", "cpu"])
            .env("HF_HUB_CACHE", cache.path())
            .output()
            .unwrap()
    };
    let direct = run(&model.to_string_lossy());
    let hub = run("hf://karpathy/stories260k");
    assert!(
        hub.status.success(),
        "{}",
        String::from_utf8_lossy(&hub.stderr)
    );
    let tokens = |output: &std::process::Output| {
        serde_json::from_slice::<serde_json::Value>(&output.stdout).unwrap()["token_ids"].clone()
    };
    assert_eq!(tokens(&hub), tokens(&direct));
    // Without the `hub` feature nothing is downloaded (with it, this would try the network).
    if cfg!(not(feature = "hub")) {
        let missing = run("hf://karpathy/stories15M");
        assert_eq!(missing.status.code(), Some(2));
        let stderr = String::from_utf8_lossy(&missing.stderr);
        assert!(
            stderr.contains("hf://karpathy/stories15M is not in the Hugging Face cache"),
            "{stderr}"
        );
    }
}

/// `--input FILE.jsonl`: one output line per input line, in order, the input's fields carried
/// through, and greedy completions equal to single `--prompt` calls (batches of 2 over 3 prompts,
/// so one batch is partial); `--output` writes the same lines to a file.
#[test]
fn input_jsonl_generates_like_single_prompts_in_order() {
    let Some(shared) = shared_dir() else {
        eprintln!("skipped: PEFTPIPE_SHARED not set");
        return;
    };
    let model = shared.join("models/stories260k");
    let prompts = ["Once upon a time", "Tom had a dog", "The sun"];
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("prompts.jsonl");
    let mut text = String::new();
    for (index, prompt) in prompts.iter().enumerate() {
        text.push_str(&serde_json::json!({"id": index, "prompt": prompt}).to_string());
        text.push_str("\n\n");
    }
    std::fs::write(&input, text).unwrap();
    let common = ["--max-new-tokens", "10", "--device", "cpu"];
    let output = peftpipe()
        .arg("generate")
        .arg(&model)
        .arg("--input")
        .arg(&input)
        .args(["--batch-size", "2"])
        .args(common)
        .output()
        .unwrap();
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let stdout = String::from_utf8(output.stdout).unwrap();
    let lines: Vec<serde_json::Value> = stdout
        .lines()
        .map(|line| serde_json::from_str(line).unwrap())
        .collect();
    assert_eq!(lines.len(), prompts.len(), "{stdout}");
    for (index, (line, prompt)) in lines.iter().zip(prompts).enumerate() {
        let keys: Vec<&str> = line
            .as_object()
            .unwrap()
            .keys()
            .map(String::as_str)
            .collect();
        assert_eq!(
            keys,
            [
                "id",
                "prompt",
                "completion",
                "completion_tokens",
                "stop_reason"
            ]
        );
        assert_eq!(line["id"], index);
        assert_eq!(line["prompt"], prompt);
        let single = peftpipe()
            .args(["--json", "generate"])
            .arg(&model)
            .args(["--prompt", prompt])
            .args(common)
            .output()
            .unwrap();
        let single: serde_json::Value = serde_json::from_slice(&single.stdout).unwrap();
        assert_eq!(line["completion"], single["completion"], "{prompt}");
        assert_eq!(
            line["completion_tokens"],
            single["token_ids"].as_array().unwrap().len()
        );
        assert_eq!(line["stop_reason"], single["stop_reason"]);
    }
    let out = dir.path().join("out.jsonl");
    let written = peftpipe()
        .arg("generate")
        .arg(&model)
        .arg("--input")
        .arg(&input)
        .arg("--output")
        .arg(&out)
        .args(common)
        .output()
        .unwrap();
    assert!(written.status.success());
    assert!(written.stdout.is_empty());
    assert_eq!(std::fs::read_to_string(&out).unwrap(), stdout);

    // The prompts file itself as --output is refused, and the prompts are kept.
    let before = std::fs::read(&input).unwrap();
    let same = peftpipe()
        .arg("generate")
        .arg(&model)
        .arg("--input")
        .arg(&input)
        .arg("--output")
        .arg(&input)
        .args(common)
        .output()
        .unwrap();
    assert_eq!(same.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&same.stderr).contains("is the --input file"));
    assert_eq!(std::fs::read(&input).unwrap(), before);

    // A run that fails at a later batch leaves the existing --output as it was and keeps what
    // it generated beside it.
    let failing = dir.path().join("failing.jsonl");
    let long = "the cat ".repeat(300);
    std::fs::write(
        &failing,
        format!(
            "{}\n{}\n",
            serde_json::json!({"prompt": "Once upon a time"}),
            serde_json::json!({"prompt": long})
        ),
    )
    .unwrap();
    let failed = peftpipe()
        .arg("generate")
        .arg(&model)
        .arg("--input")
        .arg(&failing)
        .arg("--output")
        .arg(&out)
        .args(["--batch-size", "1"])
        .args(common)
        .output()
        .unwrap();
    assert_eq!(failed.status.code(), Some(1));
    let message = String::from_utf8_lossy(&failed.stderr);
    assert!(
        message.contains("out.jsonl was left as it was"),
        "{message}"
    );
    assert_eq!(std::fs::read_to_string(&out).unwrap(), stdout);
    let partial = std::fs::read_to_string(dir.path().join("out.jsonl.partial")).unwrap();
    assert_eq!(partial.lines().count(), 1, "{partial}");
}

/// A bad line is refused before the model loads, naming the file and line; `--prompt` and
/// `--input` exclude each other.
#[test]
fn bad_input_lines_are_refused_with_file_and_line() {
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("prompts.jsonl");
    std::fs::write(&input, "{\"prompt\": \"a\"}\n{\"text\": \"b\"}\n").unwrap();
    let output = peftpipe()
        .args(["generate", "no-such-model", "--input"])
        .arg(&input)
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains(&format!(
            "{}:2: no field `prompt` (the line has: text)",
            input.display()
        )),
        "{stderr}"
    );
    // The field is configurable; then the first line lacks it.
    let output = peftpipe()
        .args([
            "generate",
            "no-such-model",
            "--prompt-field",
            "text",
            "--input",
        ])
        .arg(&input)
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&output.stderr).contains(":1: no field `text`"));
    std::fs::write(&input, "{\"prompt\": \"a\"\n").unwrap();
    let output = peftpipe()
        .args(["generate", "no-such-model", "--input"])
        .arg(&input)
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&output.stderr).contains(":1: invalid JSON"));
    let output = peftpipe()
        .args(["generate", "no-such-model", "--prompt", "x", "--input"])
        .arg(&input)
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&output.stderr).contains("cannot be used with"));
    let output = peftpipe()
        .args(["generate", "no-such-model"])
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(2), "a prompt is required");
    let missing = dir.path().join("missing.jsonl");
    let output = peftpipe()
        .args(["generate", "no-such-model", "--input"])
        .arg(&missing)
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&output.stderr).contains("missing.jsonl"));
}

/// `--adapter hf://org/name` finds a PEFT adapter in the Hugging Face cache layout (a fake cache
/// holding the reference LoRA of stories260k) and generates what the folder itself does; one
/// missing from the cache is refused with exit code 2.
#[test]
fn hub_adapters_generate_like_the_cached_folder() {
    let Some(shared) = shared_dir() else {
        eprintln!("skipped: PEFTPIPE_SHARED not set");
        return;
    };
    let model = shared.join("models/stories260k");
    let adapter = model.join("reference/peft_lora");
    let cache = tempfile::tempdir().unwrap();
    let hash = "1f1e2d3c4b5a69788796a5b4c3d2e1f001234567";
    let repo = cache.path().join("models--someone--stories-lora");
    let snapshot = repo.join("snapshots").join(hash);
    std::fs::create_dir_all(&snapshot).unwrap();
    for file in ["adapter_config.json", "adapter_model.safetensors"] {
        std::fs::copy(adapter.join(file), snapshot.join(file)).unwrap();
    }
    std::fs::create_dir_all(repo.join("refs")).unwrap();
    std::fs::write(repo.join("refs/main"), hash).unwrap();
    let run = |adapter: &str| {
        peftpipe()
            .args(["--json", "generate"])
            .arg(&model)
            .args(["--adapter", adapter, "--prompt", "Once upon a time"])
            .args(["--max-new-tokens", "12", "--device", "cpu"])
            .env("HF_HUB_CACHE", cache.path())
            .output()
            .unwrap()
    };
    let direct = run(&adapter.to_string_lossy());
    let hub = run("hf://someone/stories-lora");
    assert!(
        hub.status.success(),
        "{}",
        String::from_utf8_lossy(&hub.stderr)
    );
    let tokens = |output: &std::process::Output| {
        serde_json::from_slice::<serde_json::Value>(&output.stdout).unwrap()["token_ids"].clone()
    };
    assert_eq!(tokens(&hub), tokens(&direct));
    let missing = run("hf://someone/other-lora");
    assert_eq!(missing.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&missing.stderr);
    assert!(
        stderr.contains("--adapter: hf://someone/other-lora is not in the Hugging Face cache"),
        "{stderr}"
    );
}

/// The batch size changes how prompts are decoded (left-padded together), never what they
/// decode to: seeded sampling over prompts of different lengths writes the same lines with
/// batches of 1 and of 4.
#[test]
fn input_batches_sample_the_same_tokens_as_single_prompts() {
    let Some(shared) = shared_dir() else {
        eprintln!("skipped: PEFTPIPE_SHARED not set");
        return;
    };
    let model = shared.join("models/stories260k");
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("prompts.jsonl");
    let prompts = [
        "Once",
        "Tom and his mom went to the store to buy some",
        "The sun",
        "Lily",
        "One day, a little bird flew",
    ];
    let text: String = prompts
        .iter()
        .map(|prompt| format!("{}\n", serde_json::json!({ "prompt": prompt })))
        .collect();
    std::fs::write(&input, text).unwrap();
    let run = |batch_size: &str| {
        let output = peftpipe()
            .arg("generate")
            .arg(&model)
            .arg("--input")
            .arg(&input)
            .args(["--batch-size", batch_size, "--max-new-tokens", "16"])
            .args(["--temperature", "0.8", "--seed", "3", "--device", "cpu"])
            .output()
            .unwrap();
        assert!(
            output.status.success(),
            "{}",
            String::from_utf8_lossy(&output.stderr)
        );
        String::from_utf8(output.stdout).unwrap()
    };
    let single = run("1");
    assert_eq!(single.lines().count(), prompts.len());
    assert_eq!(run("4"), single);
}

/// A prompt that leaves no room in the model's context fails its batch naming the file and
/// line, and nothing of that batch is written.
#[test]
fn a_prompt_longer_than_the_context_names_its_line() {
    let Some(shared) = shared_dir() else {
        eprintln!("skipped: PEFTPIPE_SHARED not set");
        return;
    };
    // The tiny GPT-2 has 128 positions.
    let model = shared.join("models/tiny-gpt2-random");
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("prompts.jsonl");
    let long = "word ".repeat(400);
    std::fs::write(
        &input,
        format!(
            "{}\n{}\n",
            serde_json::json!({"prompt": "short"}),
            serde_json::json!({ "prompt": long })
        ),
    )
    .unwrap();
    let output = peftpipe()
        .arg("generate")
        .arg(&model)
        .arg("--input")
        .arg(&input)
        .args(["--device", "cpu"])
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(1));
    assert!(output.stdout.is_empty(), "the failed batch wrote nothing");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains(&format!("{}:2: the prompt has ", input.display()))
            && stderr.contains("the model's context length is 128"),
        "{stderr}"
    );
}

/// `generate --json` that fails still prints one JSON object on stdout, the shape every command
/// prints for a problem (`validate --json`'s), with the exit code unchanged.
#[test]
fn generate_json_failures_print_the_problem_object() {
    for (args, code, path) in [
        (&["--prompt", "x", "--device", "cpu"][..], 1, "MODEL"),
        (&["--prompt", "x", "--device", "tpu"][..], 2, "--device"),
    ] {
        let output = peftpipe()
            .args(["--json", "generate", "no-such-model"])
            .args(args)
            .output()
            .unwrap();
        assert_eq!(output.status.code(), Some(code), "{args:?}");
        let json: serde_json::Value = serde_json::from_slice(&output.stdout)
            .unwrap_or_else(|error| panic!("{args:?}: stdout is not JSON ({error}): {output:?}"));
        assert_eq!(json["valid"], false, "{json}");
        assert_eq!(json["files"][0]["file"], "no-such-model", "{json}");
        assert_eq!(json["files"][0]["problems"][0]["path"], path, "{json}");
        assert!(
            json["files"][0]["problems"][0]["message"].is_string(),
            "{json}"
        );
    }
}

/// Probe item: a Mistral stops at its sliding window (the context peftpipe uses for it, as it
/// has no sliding-window attention). The stop line, and `--json`'s `notes`, name config.json's
/// `sliding_window` and its size: "the model's context length" alone does not say why a Mistral
/// with 32k positions stops at 4096.
#[test]
fn generation_stopped_by_a_sliding_window_names_the_key() {
    let dir = tempfile::tempdir().unwrap();
    let model = support::quickstart_model_in(dir.path(), |config| support::as_mistral(config, 16));
    let run = |json: bool| {
        let mut command = peftpipe();
        if json {
            command.arg("--json");
        }
        command
            .arg("generate")
            .arg(&model)
            .args([
                "--prompt",
                "review: a",
                "--max-new-tokens",
                "64",
                "--device",
                "cpu",
            ])
            .output()
            .unwrap()
    };
    let output = run(false);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "{stderr}");
    assert!(
        stderr.contains("stopped: ")
            && stderr.contains("`sliding_window` 16")
            && stderr.contains("config.json"),
        "{stderr}"
    );
    let output = run(true);
    assert!(output.status.success());
    let json: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
    assert_eq!(json["stop_reason"], "max_length", "{json}");
    let notes = json["notes"].as_array().cloned().unwrap_or_default();
    assert!(
        notes
            .iter()
            .any(|note| note.as_str().is_some_and(
                |note| note.contains("`sliding_window` 16") && note.contains("config.json")
            )),
        "{json}"
    );

    // Without a window the limit is max_position_embeddings, said as such, and no note.
    support::edit_config(&model, |config| {
        config["sliding_window"] = serde_json::Value::Null;
    });
    let output = run(true);
    let json: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
    assert_eq!(json["notes"], serde_json::json!([]), "{json}");
}

/// Regression: `--input` dropped the sliding-window note (a line said `stop_reason: max_length`
/// and nothing said why a Mistral with more positions stopped there), and `--json` changed
/// nothing in its output. Now with `--json` every line also carries `notes`, as `--prompt
/// --json` does; with `--output FILE` the JSON on stdout is a summary naming the file and the
/// notes; without `--json` the lines are as before and stderr's summary says the note.
#[test]
fn input_json_lines_carry_the_sliding_window_note() {
    let dir = tempfile::tempdir().unwrap();
    let model = support::quickstart_model_in(dir.path(), |config| support::as_mistral(config, 16));
    let input = dir.path().join("prompts.jsonl");
    std::fs::write(
        &input,
        "{\"id\": 1, \"prompt\": \"review: a\"}\n{\"id\": 2, \"prompt\": \"review: dull\"}\n",
    )
    .unwrap();
    let run = |flags: &[&str]| {
        peftpipe()
            .args(flags)
            .arg("generate")
            .arg(&model)
            .arg("--input")
            .arg(&input)
            .args(["--max-new-tokens", "64", "--device", "cpu"])
            .output()
            .unwrap()
    };
    let said = |text: &str| text.contains("`sliding_window` 16") && text.contains("config.json");
    let lines = |output: &std::process::Output| -> Vec<serde_json::Value> {
        String::from_utf8_lossy(&output.stdout)
            .lines()
            .map(|line| serde_json::from_str(line).unwrap())
            .collect()
    };
    let output = run(&["--json"]);
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let json_lines = lines(&output);
    assert_eq!(json_lines.len(), 2);
    for line in &json_lines {
        assert_eq!(line["stop_reason"], "max_length", "{line}");
        let notes = line["notes"].as_array().cloned().unwrap_or_default();
        assert!(
            notes.len() == 1 && notes[0].as_str().is_some_and(said),
            "{line}"
        );
    }
    // Without --json: the lines as before, the note in stderr's summary.
    let output = run(&[]);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "{stderr}");
    for (plain, json) in lines(&output).iter().zip(&json_lines) {
        assert!(plain.get("notes").is_none(), "{plain}");
        let mut json = json.clone();
        json.as_object_mut().unwrap().remove("notes");
        assert_eq!(plain, &json);
    }
    assert!(said(&stderr), "{stderr}");
    // --output FILE --json: the lines in the file carry the notes, stdout is one summary.
    let out = dir.path().join("out.jsonl");
    let output = peftpipe()
        .args(["--json", "generate"])
        .arg(&model)
        .arg("--input")
        .arg(&input)
        .arg("--output")
        .arg(&out)
        .args(["--max-new-tokens", "64", "--device", "cpu"])
        .output()
        .unwrap();
    assert!(output.status.success());
    let written: Vec<serde_json::Value> = std::fs::read_to_string(&out)
        .unwrap()
        .lines()
        .map(|line| serde_json::from_str(line).unwrap())
        .collect();
    assert_eq!(written, json_lines);
    let summary: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap_or_else(|e| {
        panic!(
            "stdout is not JSON ({e}): {:?}",
            String::from_utf8_lossy(&output.stdout)
        )
    });
    assert_eq!(summary["prompts"], 2, "{summary}");
    assert_eq!(summary["output"], out.display().to_string(), "{summary}");
    let notes = summary["notes"].as_array().cloned().unwrap_or_default();
    assert!(
        notes.len() == 1 && notes[0].as_str().is_some_and(said),
        "{summary}"
    );
}

/// Regression: the note that a QLoRA adapter runs over another base than its record describes
/// went to stderr only in `--input` mode; with `--json` every line's `notes` now holds it first,
/// as `--prompt --json`'s `notes` does. A warning about the result, it stays on stderr under
/// `--quiet` (warnings survive `--quiet`; only the informational lines go).
#[test]
fn input_json_lines_carry_the_adapter_base_note() {
    let Some(shared) = shared_dir() else {
        eprintln!("skipped: PEFTPIPE_SHARED not set");
        return;
    };
    let model = shared.join("models/stories260k");
    let dir = tempfile::tempdir().unwrap();
    // The reference LoRA, recorded as trained over a checkpoint saved in 4 bits: over the
    // 16-bit stories260k it runs in 16 bits, with the note.
    let adapter = dir.path().join("adapter");
    std::fs::create_dir(&adapter).unwrap();
    for file in ["adapter_config.json", "adapter_model.safetensors"] {
        std::fs::copy(
            model.join("reference/peft_lora").join(file),
            adapter.join(file),
        )
        .unwrap();
    }
    std::fs::write(
        adapter.join("peftpipe_base_quantization.json"),
        serde_json::json!({"quantization": {
            "quant_type": "nf4", "double_quant": true, "block_size": 64,
            "compute_dtype": null, "prequantized": true
        }})
        .to_string(),
    )
    .unwrap();
    let input = dir.path().join("prompts.jsonl");
    std::fs::write(
        &input,
        "{\"prompt\": \"Once upon a time\"}\n{\"prompt\": \"The sun\"}\n",
    )
    .unwrap();
    let said = |text: &str| {
        text.contains("saved in 4 bits; this base model is 16-bit")
            && text.contains("peftpipe_base_quantization.json")
    };
    let run = |flags: &[&str], source: &[&str]| {
        peftpipe()
            .args(flags)
            .arg("generate")
            .arg(&model)
            .arg("--adapter")
            .arg(&adapter)
            .args(source)
            .args(["--max-new-tokens", "4", "--device", "cpu"])
            .output()
            .unwrap()
    };
    let file = ["--input", input.to_str().unwrap()];
    let output = run(&["--json"], &file);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "{stderr}");
    assert!(stderr.contains("warning: ") && said(&stderr), "{stderr}");
    let lines: Vec<serde_json::Value> = String::from_utf8_lossy(&output.stdout)
        .lines()
        .map(|line| serde_json::from_str(line).unwrap())
        .collect();
    assert_eq!(lines.len(), 2);
    for line in &lines {
        assert!(line["notes"][0].as_str().is_some_and(said), "{line}");
    }
    // --quiet keeps the warning, in both modes.
    for source in [&file[..], &["--prompt", "Once upon a time"]] {
        let output = run(&["--quiet"], source);
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(output.status.success(), "{stderr}");
        assert!(
            stderr.contains("warning: ") && said(&stderr),
            "{source:?}: {stderr}"
        );
    }
}
