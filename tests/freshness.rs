//! The freshness suite: run → rerun is all fresh → change one thing (a parameter, one input row,
//! the template, the tool version, a stage's name) → exactly the dependent stages rerun, each with
//! its reason; a forced retrain that reproduces the adapter bit for bit leaves its dependents
//! fresh.
//! Drives the binary on the real ingest and template stages; stderr is snapshotted with paths,
//! digests and timings redacted.

mod exec_support;
mod train_support;

use exec_support::{jsonl, rows, stderr, stdout, Project};
use train_support::TrainProject;

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
    // Back to k = 1: restorable from the cache, not rerun, but what is published (the
    // `.peftpipe/out` copy) is the k = 2 run's until `run` restores it.
    assert_eq!(
        status(&project, &[]),
        "[FRESH] data\n[DIRTY] prompts: cached output of an earlier run with these inputs; the published copies are another run's\n"
    );
    assert!(ran(&run_ok(&project, &[])).is_empty());
    assert_eq!(status(&project, &[]), "[FRESH] data\n[FRESH] prompts\n");
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
    let version = peftpipe::TOOL_BUILD;
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

#[test]
fn a_renamed_stage_is_rebuilt_and_matches_a_clean_run() {
    // The stage name seeds the split and the few-shot draws: `rows` splits the data differently
    // from `data`, so restoring `data`'s output under the new name would be a lie.
    let project = Project::new();
    run_ok(&project, &[]);
    let before = project.recorded_output("prompts").expect("recorded");
    let renamed = exec_support::PIPELINE
        .replace("  data:\n", "  rows:\n")
        .replace("input: data", "input: rows");
    project.write("pipeline.yaml", &renamed);
    assert_eq!(
        status(&project, &[]),
        "[DIRTY] rows: never run\n[DIRTY] prompts: upstream stage rows is dirty, \
         parameter template.input changed (\"data\" → \"rows\"), no longer reads upstream stage \
         data, now reads upstream stage rows\n"
    );
    let rerun = run_ok(&project, &[]);
    assert_eq!(ran(&rerun), ["rows", "prompts"]);
    let after = project.recorded_output("prompts");
    assert_ne!(
        after.as_deref(),
        Some(before.as_str()),
        "other seeds, other split"
    );
    let clean = Project::with_pipeline(&renamed);
    run_ok(&clean, &[]);
    for stage in ["rows", "prompts"] {
        assert_eq!(clean.recorded_output(stage), project.recorded_output(stage));
    }
}

#[test]
fn renaming_the_train_stage_retrains_and_matches_a_clean_run() {
    // The issue's case: quickstart's `train` renamed `finetune` restored the cached adapter.
    let project = TrainProject::new();
    let first = project.run_ok("pipeline.yaml", &[]);
    let renamed = train_support::PIPELINE
        .replace("  train:\n    train:", "  finetune:\n    train:")
        .replace("model: train", "model: finetune")
        .replace("from: train", "from: finetune");
    project.write("pipeline.yaml", &renamed);
    let status = project.run(&["status", "pipeline.yaml"]);
    let text = stdout(&status);
    assert!(text.contains("[DIRTY] finetune: never run"), "{text}");
    let rerun = project.run_ok("pipeline.yaml", &[]);
    assert_eq!(rerun.status("finetune"), "ran", "{}", rerun.stderr);
    assert_ne!(
        rerun.output("finetune"),
        first.output("train"),
        "another LoRA init"
    );
    let outputs = project.recorded_outputs("quick");
    project.wipe();
    project.run_ok("pipeline.yaml", &[]);
    assert_eq!(outputs, project.recorded_outputs("quick"));
}

#[test]
fn a_forced_retrain_with_the_same_adapter_leaves_its_dependents_fresh() {
    // Timings live in the run record, not in the train artifact: retraining (deterministic on
    // CPU) reproduces the artifact byte for byte, so evaluate and export are not rerun.
    let project = TrainProject::new();
    let first = project.run_ok("pipeline.yaml", &[]);
    assert!(first.outcome("train")["wall_seconds"].as_f64().unwrap() > 0.0);
    let forced = project.run_ok("pipeline.yaml", &["--force", "--stage", "train"]);
    assert_eq!(forced.ran(), ["train"]);
    assert_eq!(forced.output("train"), first.output("train"));
    let status = project.run(&["status", "pipeline.yaml"]);
    assert_eq!(
        stdout(&status),
        "[FRESH] data\n[FRESH] prompts\n[FRESH] train\n[FRESH] evaluate\n[FRESH] export\n"
    );
    let after = project.run_ok("pipeline.yaml", &[]);
    assert!(after.ran().is_empty(), "{}", after.stderr);
    assert_eq!(after.status("evaluate"), "fresh");
    assert_eq!(after.status("export"), "fresh");
}

#[test]
fn evaluation_settings_are_part_of_the_train_fingerprint() {
    // Evaluating during training changes what the stage writes (metrics, summary, the kept
    // adapter), so eval_steps, early stopping, keep and tensorboard each retrain; and the cached
    // result is what a clean run produces.
    let project = TrainProject::new();
    project.run_ok("pipeline.yaml", &[]);
    let train_line = |set: &[&str]| {
        let mut args = vec!["status", "pipeline.yaml"];
        for item in set {
            args.extend(["--set", item]);
        }
        let text = stdout(&project.run(&args));
        text.lines()
            .find(|line| line.contains(" train"))
            .unwrap_or_default()
            .to_string()
    };
    let every = "stages.train.train.eval_steps=8";
    assert_eq!(
        train_line(&[every]),
        "[DIRTY] train: parameter train.eval_steps added (8)"
    );
    let evaluating = project.run_ok("pipeline.yaml", &["--set", every]);
    assert_eq!(evaluating.status("train"), "ran", "{}", evaluating.stderr);
    assert!(evaluating.outcome("train")["best_step"].as_u64().is_some());
    assert_eq!(
        train_line(&[every.replace("=8", "=4").as_str()]),
        "[DIRTY] train: parameter train.eval_steps changed (8 → 4)"
    );
    for (set, reason) in [
        (
            "stages.train.train.early_stopping={patience: 1}",
            "parameter train.early_stopping.metric added (\"eval_loss\"), \
             parameter train.early_stopping.min_delta added (0.0), \
             parameter train.early_stopping.patience added (1)",
        ),
        (
            "stages.train.train.keep=last",
            "parameter train.keep added (\"last\")",
        ),
        (
            "stages.train.train.eval_max_rows=null",
            "parameter train.eval_max_rows added (null)",
        ),
        (
            "stages.train.train.tensorboard=true",
            "parameter train.tensorboard added (true)",
        ),
    ] {
        assert_eq!(
            train_line(&[every, set]),
            format!("[DIRTY] train: {reason}"),
            "{set}"
        );
    }
    // Back without evaluation: the first run's cached output, not rerun (its published copy
    // is the last run's until `run` restores it).
    assert_eq!(
        train_line(&[]),
        "[DIRTY] train: cached output of an earlier run with these inputs; the published copies are another run's"
    );
    // The cached output with evaluation is what a clean run produces.
    let outputs = project.recorded_outputs("quick");
    project.wipe();
    project.run_ok("pipeline.yaml", &["--set", every]);
    assert_eq!(outputs, project.recorded_outputs("quick"));
}

#[test]
fn export_quantize_settings_are_part_of_the_export_fingerprint() {
    // The merged model re-quantized in 4 bits is other bytes for every setting: adding or
    // changing `quantize` reruns export only, and the cached result is what a clean run produces.
    let project = TrainProject::new();
    let merged = "stages.export.export.merged=exported/merged";
    project.run_ok("pipeline.yaml", &["--set", merged]);
    let export_line = |set: &[&str]| {
        let mut args = vec!["status", "pipeline.yaml"];
        for item in set {
            args.extend(["--set", item]);
        }
        let text = stdout(&project.run(&args));
        text.lines()
            .find(|line| line.contains(" export"))
            .unwrap_or_default()
            .to_string()
    };
    let quant_type = || -> serde_json::Value {
        let text = std::fs::read_to_string(project.path("exported/merged/config.json"))
            .expect("the published merged model has a config.json");
        let config: serde_json::Value = serde_json::from_str(&text).expect("config.json is JSON");
        config["quantization_config"]["bnb_4bit_quant_type"].clone()
    };
    let nf4 = "stages.export.export.quantize={}";
    assert_eq!(
        export_line(&[merged, nf4]),
        "[DIRTY] export: parameter export.quantize.block_size added (64), \
         parameter export.quantize.double_quant added (true), \
         parameter export.quantize.quant_type added (\"nf4\")"
    );
    let first = project.run_ok("pipeline.yaml", &["--set", merged, "--set", nf4]);
    assert_eq!(first.ran(), ["export"], "{}", first.stderr);
    assert_eq!(quant_type(), "nf4");
    let fp4 = "stages.export.export.quantize={quant_type: fp4}";
    assert_eq!(
        export_line(&[merged, fp4]),
        "[DIRTY] export: parameter export.quantize.quant_type changed (\"nf4\" → \"fp4\")"
    );
    let second = project.run_ok("pipeline.yaml", &["--set", merged, "--set", fp4]);
    assert_eq!(second.ran(), ["export"], "{}", second.stderr);
    assert_eq!(quant_type(), "fp4");
    // Back to nf4: the first run's cached output, republished, not rerun.
    assert_eq!(
        export_line(&[merged, nf4]),
        "[DIRTY] export: cached output of an earlier run with these inputs; the published copies are another run's"
    );
    let restored = project.run_ok("pipeline.yaml", &["--set", merged, "--set", nf4]);
    assert!(restored.ran().is_empty(), "{}", restored.stderr);
    assert_eq!(quant_type(), "nf4");
    let outputs = project.recorded_outputs("quick");
    project.wipe();
    project.run_ok("pipeline.yaml", &["--set", merged, "--set", nf4]);
    assert_eq!(outputs, project.recorded_outputs("quick"));
}

#[test]
fn every_model_file_a_run_reads_or_copies_is_an_input() {
    // generation_config.json gives the BOS/EOS ids training and evaluation use; the tokenizer
    // side files and chat templates are copied into the merged export. Changing one must rerun
    // what reads it and give what a clean run gives, never the old outputs restored.
    let pipeline = train_support::PIPELINE.replace(
        "adapter: exported/adapter\n",
        "adapter: exported/adapter\n      merged: exported/merged\n",
    );
    let project = TrainProject::with_pipeline(&pipeline);
    project.run_ok("pipeline.yaml", &[]);
    for (file, content) in [
        (
            "generation_config.json",
            r#"{"bos_token_id": 1, "eos_token_id": 4}"#,
        ),
        ("special_tokens_map.json", r#"{"eos_token": "</s>"}"#),
        ("chat_template.jinja", "{{ messages }}"),
        ("added_tokens.json", "{}"),
        ("tokenizer.model", "not a sentencepiece model, only copied"),
    ] {
        project.write(&format!("model/{file}"), content);
        let status = stdout(&project.run(&["status", "pipeline.yaml"]));
        assert!(
            status.contains("[DIRTY] train") && status.contains(file),
            "{file}:\n{status}"
        );
        project.run_ok("pipeline.yaml", &[]);
        let outputs = project.recorded_outputs("quick");
        let exported = std::fs::read(project.path(&format!("exported/merged/{file}")));
        assert_eq!(exported.ok().as_deref(), Some(content.as_bytes()), "{file}");
        project.wipe();
        project.run_ok("pipeline.yaml", &[]);
        assert_eq!(
            outputs,
            project.recorded_outputs("quick"),
            "{file}: a clean run"
        );
    }
}

#[test]
fn the_files_beside_a_chat_template_are_inputs_of_the_template_stage() {
    // A tokenizer_config.json without `chat_template` takes chat_template.jinja beside it (the
    // layout recent transformers saves); a `.jinja` template takes its special tokens from the
    // tokenizer_config.json beside it. Editing either must rerun the template stage and give
    // what a clean run gives.
    let head = &train_support::PIPELINE[..train_support::PIPELINE.find("  prompts:\n").unwrap()];
    let chat = |source: &str| {
        format!(
            "{head}  prompts:\n    template:\n      input: data\n      chat:\n        tokenizer_config: {source}\n        user: \"{{{{ text }}}}\"\n        assistant: \" {{{{ label }}}}\"\n"
        )
    };
    let project = TrainProject::with_pipeline(&chat("chat/tokenizer_config.json"));
    project.write(
        "chat/tokenizer_config.json",
        r#"{"bos_token": "<s>", "eos_token": "</s>"}"#,
    );
    project.write(
        "chat/chat_template.jinja",
        "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}{{ eos_token }}{% endfor %}",
    );
    // special_tokens_map.json overrides the config's tokens (transformers' legacy load), for
    // either source.
    let edits: [(&str, &str, &str); 4] = [
        (
            "chat/tokenizer_config.json",
            "chat/chat_template.jinja",
            "{% for m in messages %}[{{ m['role'] }}]{{ m['content'] }}{{ eos_token }}{% endfor %}",
        ),
        (
            "chat/chat_template.jinja",
            "chat/tokenizer_config.json",
            r#"{"bos_token": "<s>", "eos_token": "<unk>"}"#,
        ),
        (
            "chat/tokenizer_config.json",
            "chat/special_tokens_map.json",
            r#"{"eos_token": "<pad>"}"#,
        ),
        (
            "chat/chat_template.jinja",
            "chat/special_tokens_map.json",
            r#"{"eos_token": "<mask>"}"#,
        ),
    ];
    for (source, edited, content) in edits {
        project.write("pipeline.yaml", &chat(source));
        project.run_ok("pipeline.yaml", &["--stage", "prompts"]);
        let before = project.recorded_outputs("quick");
        project.write(edited, content);
        let status = stdout(&project.run(&["status", "pipeline.yaml"]));
        assert!(status.contains("[DIRTY] prompts"), "{edited}:\n{status}");
        project.run_ok("pipeline.yaml", &["--stage", "prompts"]);
        let outputs = project.recorded_outputs("quick");
        assert_ne!(before["prompts"], outputs["prompts"], "{edited}: no change");
        project.wipe();
        project.run_ok("pipeline.yaml", &["--stage", "prompts"]);
        assert_eq!(
            outputs["prompts"],
            project.recorded_outputs("quick")["prompts"],
            "{edited}: a clean run"
        );
    }
}

#[test]
fn a_train_artifact_is_the_same_in_every_checkout() {
    // Two checkouts of one project share a cache: the train artifact holds what its inputs
    // determine, never where this checkout lives, so retraining in the second reproduces the
    // first's artifact and leaves its dependents fresh in both.
    let a = TrainProject::new();
    let b = TrainProject::new();
    let cache = a.path("shared-cache");
    let cache = cache.to_str().unwrap();
    let first = a.run_ok("pipeline.yaml", &["--cache-dir", cache]);
    let restored = b.run_ok("pipeline.yaml", &["--cache-dir", cache]);
    assert!(restored.ran().is_empty(), "{}", restored.stderr);
    let forced = b.run_ok(
        "pipeline.yaml",
        &["--cache-dir", cache, "--force", "--stage", "train"],
    );
    assert_eq!(forced.output("train"), first.output("train"));
    for project in [&a, &b] {
        let after = project.run_ok("pipeline.yaml", &["--cache-dir", cache]);
        assert!(after.ran().is_empty(), "{}", after.stderr);
    }
}

#[test]
fn every_shard_the_index_names_is_an_input_and_nothing_else_is() {
    // A sharded checkpoint whose index puts the shards in a subfolder: a change to one must
    // rerun the train stage and give what a clean run gives; a safetensors file the index does
    // not name is not read, so adding one changes nothing.
    use candle_core::{Device, Tensor};
    use std::collections::HashMap;
    let project = TrainProject::new();
    let single = project.path("model/model.safetensors");
    let tensors = candle_core::safetensors::load(&single, &Device::Cpu).unwrap();
    let mut names: Vec<&String> = tensors.keys().collect();
    names.sort();
    let files = [
        "sub/model-00001-of-00002.safetensors",
        "sub/model-00002-of-00002.safetensors",
    ];
    let mut shards: [HashMap<String, Tensor>; 2] = Default::default();
    let mut weight_map = serde_json::Map::new();
    for (i, name) in names.iter().enumerate() {
        let half = usize::from(i >= names.len() / 2);
        shards[half].insert((*name).clone(), tensors[*name].clone());
        weight_map.insert((*name).clone(), files[half].into());
    }
    std::fs::create_dir_all(project.path("model/sub")).unwrap();
    for (file, shard) in files.iter().zip(&shards) {
        candle_core::safetensors::save(shard, project.path(&format!("model/{file}"))).unwrap();
    }
    project.write(
        "model/model.safetensors.index.json",
        &serde_json::json!({"metadata": {}, "weight_map": weight_map}).to_string(),
    );
    std::fs::remove_file(&single).unwrap();
    project.run_ok("pipeline.yaml", &[]);

    std::fs::write(project.path("model/zz-extra.safetensors"), b"not read").unwrap();
    let status = stdout(&project.run(&["status", "pipeline.yaml"]));
    assert!(!status.contains("[DIRTY]"), "{status}");

    // Scale one tensor of the second shard, in place.
    let mut second = shards[1].clone();
    let (name, tensor) = second.iter_mut().next().unwrap();
    let name = name.clone();
    *tensor = (tensor.clone() * 1.5).unwrap();
    candle_core::safetensors::save(&second, project.path(&format!("model/{}", files[1]))).unwrap();
    let status = stdout(&project.run(&["status", "pipeline.yaml"]));
    assert!(
        status.contains("[DIRTY] train") && status.contains(files[1]),
        "{name}:\n{status}"
    );
    project.run_ok("pipeline.yaml", &[]);
    let outputs = project.recorded_outputs("quick");
    project.wipe();
    project.run_ok("pipeline.yaml", &[]);
    assert_eq!(outputs, project.recorded_outputs("quick"), "a clean run");
}

/// `status --json`, `run --dry-run --json` and `run --json` name a stage's state by one key,
/// `status` (`status --json` called it `state`, still written as an alias for now).
#[test]
fn status_and_run_json_name_a_stage_state_by_one_key() {
    let project = Project::new();
    let json = |args: &[&str]| -> serde_json::Value {
        let output = project.run(args);
        assert!(output.status.success(), "{}", stderr(&output));
        serde_json::from_slice(&output.stdout).expect("JSON on stdout")
    };
    let planned = json(&["--json", "status", "pipeline.yaml"]);
    assert_eq!(planned["stages"][0]["status"], "dirty", "{planned}");
    assert_eq!(planned["stages"][0]["state"], "dirty", "{planned}");
    let dry = json(&["--json", "run", "pipeline.yaml", "--dry-run"]);
    assert_eq!(dry["stages"][1]["status"], "dirty", "{dry}");
    let ran = json(&["--json", "run", "pipeline.yaml", "--no-report"]);
    assert_eq!(ran["stages"][0]["status"], "ran", "{ran}");
    let fresh = json(&["--json", "status", "pipeline.yaml"]);
    assert_eq!(fresh["stages"][0]["status"], "fresh", "{fresh}");
    assert_eq!(fresh["stages"][1]["status"], "fresh", "{fresh}");
}
