//! Evaluating PEFT adapters made outside the pipeline (`external_adapters`, issue 11 part 8): the
//! folder a train stage's export wrote, evaluated on its base model by a pipeline with no train
//! stage, scores exactly what evaluating the train stage scored; changing the adapter's weights
//! reruns the stage; a missing folder, a missing adapter_config.json, an unsupported peft_type, a
//! tensor of the wrong shape and a missing `base_model` are refused with the file and the cause.
//! Runs on the repository's quickstart model (no shared data needed), in a few seconds.

mod train_support;

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor};
use train_support::{stderr, TrainProject};

/// A second pipeline in the same project (same cache): the quickstart's data and template
/// stages and one evaluate stage over `adapters` on `model/`.
fn external_pipeline(adapters: &[&str]) -> String {
    let full = train_support::PIPELINE;
    let head = full[..full.find("  train:\n").expect("a train stage")]
        .replace("name: quick", "name: outside");
    format!(
        "{head}  external:\n    evaluate:\n      external_adapters: [{}]\n      base_model: model\n      data: prompts\n      max_rows: 40\n      samples: 0\n      metrics:\n        accuracy:\n          choices: [\" positive\", \" negative\"]\n          labels: [positive, negative]\n          label_column: label\n      device: cpu\n",
        adapters.join(", ")
    )
}

/// The comparison rows of evaluate stage `stage` of pipeline `pipeline` (its `name:`).
fn comparison(project: &TrainProject, pipeline: &str, stage: &str) -> Vec<serde_json::Value> {
    let dir = project.path(&format!(".peftpipe/out/{pipeline}/{stage}"));
    let text = std::fs::read_to_string(dir.join("comparison.json")).expect("comparison.json");
    let json: serde_json::Value = serde_json::from_str(&text).expect("JSON");
    json["candidates"].as_array().expect("candidates").clone()
}

fn row<'a>(rows: &'a [serde_json::Value], name: &str) -> &'a serde_json::Value {
    rows.iter()
        .find(|row| row["candidate"] == name)
        .unwrap_or_else(|| panic!("no candidate {name} in {rows:?}"))
}

/// Copy `from` to `to` (an adapter folder), then edit its tensors.
fn edited_copy(from: &Path, to: &Path, edit: impl FnOnce(&mut HashMap<String, Tensor>)) -> PathBuf {
    std::fs::create_dir_all(to).unwrap();
    std::fs::copy(
        from.join("adapter_config.json"),
        to.join("adapter_config.json"),
    )
    .unwrap();
    let tensors =
        candle_core::safetensors::load(from.join("adapter_model.safetensors"), &Device::Cpu)
            .unwrap();
    let mut tensors = tensors;
    edit(&mut tensors);
    candle_core::safetensors::save(&tensors, to.join("adapter_model.safetensors")).unwrap();
    to.to_path_buf()
}

#[test]
fn an_exported_adapter_scores_like_its_train_stage_and_its_files_are_fingerprinted() {
    let project = TrainProject::new();
    project.run_ok("pipeline.yaml", &[]);
    let by_stage = comparison(&project, "quick", "evaluate");
    let from_stage = row(&by_stage, "train");

    project.write("external.yaml", &external_pipeline(&["exported/adapter"]));
    let external = project.run_ok("external.yaml", &[]);
    assert_eq!(external.status("external"), "ran");
    let rows = comparison(&project, "outside", "external");
    let names: Vec<&str> = rows
        .iter()
        .filter_map(|r| r["candidate"].as_str())
        .collect();
    assert_eq!(names, ["base", "adapter"]);
    let from_folder = row(&rows, "adapter");
    assert_eq!(from_folder["kind"], "external_adapter");
    assert_eq!(from_folder["method"], "lora");
    assert_eq!(
        from_folder["trainable_parameters"],
        from_stage["trainable_parameters"]
    );
    for figure in ["loss", "perplexity", "accuracy"] {
        let (a, b) = (
            from_folder[figure].as_f64().expect(figure),
            from_stage[figure].as_f64().expect(figure),
        );
        assert!(
            (a - b).abs() <= 1e-9 * b.abs().max(1.0),
            "{figure}: {a} vs {b}"
        );
    }
    assert_eq!(row(&rows, "base")["loss"], row(&by_stage, "base")["loss"]);

    // Unchanged: fresh. New weights in the folder: the stage reruns and scores differently.
    assert_eq!(
        project.run_ok("external.yaml", &[]).status("external"),
        "fresh"
    );
    let folder = project.path("exported/adapter");
    let scratch = project.path("scratch");
    edited_copy(&folder, &scratch, |tensors| {
        for tensor in tensors.values_mut() {
            *tensor = (&*tensor * 3.0).unwrap();
        }
    });
    std::fs::copy(
        scratch.join("adapter_model.safetensors"),
        folder.join("adapter_model.safetensors"),
    )
    .unwrap();
    let status = project.run(&["status", "external.yaml"]);
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&status.stdout),
        stderr(&status)
    );
    assert!(
        text.contains("exported/adapter/adapter_model.safetensors"),
        "status names the changed file: {text}"
    );
    let rerun = project.run_ok("external.yaml", &[]);
    assert_eq!(rerun.status("external"), "ran");
    let changed = comparison(&project, "outside", "external");
    assert_ne!(row(&changed, "adapter")["loss"], from_folder["loss"]);

    // The same folder as a Hub id in the Hugging Face cache layout scores the same.
    let cache = project.path("hf-cache");
    let hash = "2f1e2d3c4b5a69788796a5b4c3d2e1f001234567";
    let repo = cache.join("models--someone--quick-lora");
    let snapshot = repo.join("snapshots").join(hash);
    std::fs::create_dir_all(&snapshot).unwrap();
    for file in ["adapter_config.json", "adapter_model.safetensors"] {
        std::fs::copy(folder.join(file), snapshot.join(file)).unwrap();
    }
    std::fs::create_dir_all(repo.join("refs")).unwrap();
    std::fs::write(repo.join("refs/main"), hash).unwrap();
    // A pipeline of its own name: a name belongs to one file of the project.
    project.write(
        "hub.yaml",
        &external_pipeline(&["exported/adapter", "'hf://someone/quick-lora'"])
            .replace("name: outside", "name: hub"),
    );
    let output = project
        .command(&["--json", "run", "hub.yaml"])
        .env("HF_HUB_CACHE", &cache)
        .output()
        .unwrap();
    assert!(output.status.success(), "{}", stderr(&output));
    let rows = comparison(&project, "hub", "external");
    assert_eq!(
        row(&rows, "someone/quick-lora")["loss"],
        row(&rows, "adapter")["loss"]
    );
    assert_eq!(
        row(&rows, "adapter")["loss"],
        row(&changed, "adapter")["loss"]
    );
}

fn failure(project: &TrainProject, adapters: &[&str]) -> String {
    project.write(
        "bad.yaml",
        &external_pipeline(adapters).replace("name: outside", "name: bad"),
    );
    let output = project.run(&["run", "bad.yaml"]);
    assert!(!output.status.success(), "{adapters:?} should fail");
    stderr(&output)
}

/// What `validate` says of `bad.yaml` over `adapters`: it must refuse it (exit 2), before any
/// stage runs, at the adapter's key.
fn refused_by_validate(project: &TrainProject, adapters: &[&str]) -> String {
    project.write(
        "bad.yaml",
        &external_pipeline(adapters).replace("name: outside", "name: bad"),
    );
    let output = project.run(&["validate", "bad.yaml"]);
    let message = stderr(&output);
    assert_eq!(output.status.code(), Some(2), "{adapters:?}: {message}");
    assert!(
        message.contains("stages.external.evaluate.external_adapters[0]"),
        "{message}"
    );
    message
}

#[test]
fn bad_adapter_folders_are_refused_with_the_file_and_the_cause() {
    let project = TrainProject::new();
    let message = failure(&project, &["nowhere/adapter"]);
    assert!(
        message.contains("external adapter `nowhere/adapter`") && message.contains("not a folder"),
        "{message}"
    );
    std::fs::create_dir_all(project.path("empty")).unwrap();
    let message = failure(&project, &["empty"]);
    assert!(
        message.contains("adapter_config.json does not exist"),
        "{message}"
    );

    // A real adapter, then damaged copies of it.
    project.run_ok("pipeline.yaml", &[]);
    let folder = project.path("exported/adapter");
    let unsupported = edited_copy(&folder, &project.path("loha"), |_| {});
    let config = std::fs::read_to_string(unsupported.join("adapter_config.json")).unwrap();
    std::fs::write(
        unsupported.join("adapter_config.json"),
        config.replace("\"LORA\"", "\"LOHA\""),
    )
    .unwrap();
    for message in [
        failure(&project, &["loha"]),
        refused_by_validate(&project, &["loha"]),
    ] {
        assert!(
            message.contains("loha/adapter_config.json")
                && message.contains("`LOHA` is not supported"),
            "{message}"
        );
    }
    // A config.json that does not parse, and one whose rank disagrees with the tensors.
    let truncated = edited_copy(&folder, &project.path("truncated"), |_| {});
    let config = std::fs::read_to_string(truncated.join("adapter_config.json")).unwrap();
    std::fs::write(
        truncated.join("adapter_config.json"),
        &config[..config.len() / 2],
    )
    .unwrap();
    let message = refused_by_validate(&project, &["truncated"]);
    assert!(
        message.contains("truncated/adapter_config.json"),
        "{message}"
    );
    let ranked = edited_copy(&folder, &project.path("ranked"), |_| {});
    let mut config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(ranked.join("adapter_config.json")).unwrap())
            .unwrap();
    config["r"] = serde_json::json!(8);
    std::fs::write(ranked.join("adapter_config.json"), config.to_string()).unwrap();
    let message = refused_by_validate(&project, &["ranked"]);
    assert!(message.contains("ranked"), "{message}");
    // Targets that name no layer of this base model (an adapter of another architecture).
    let foreign = edited_copy(&folder, &project.path("foreign"), |tensors| {
        let renamed: HashMap<String, Tensor> = tensors
            .drain()
            .map(|(name, tensor)| (name.replace("self_attn.q_proj", "attn.c_attn"), tensor))
            .collect();
        *tensors = renamed;
    });
    let mut config: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(foreign.join("adapter_config.json")).unwrap(),
    )
    .unwrap();
    config["target_modules"] = serde_json::json!(["c_attn"]);
    std::fs::write(foreign.join("adapter_config.json"), config.to_string()).unwrap();
    for message in [
        failure(&project, &["foreign"]),
        refused_by_validate(&project, &["foreign"]),
    ] {
        assert!(
            message.contains("foreign") && message.contains("matched no linear layer"),
            "{message}"
        );
    }
    // The adapter as exported passes.
    project.write("good.yaml", &external_pipeline(&["exported/adapter"]));
    let output = project.run(&["validate", "good.yaml"]);
    assert!(output.status.success(), "{}", stderr(&output));
    let mut renamed = String::new();
    edited_copy(&folder, &project.path("wide"), |tensors| {
        let (name, tensor) = tensors
            .iter()
            .find(|(name, _)| name.contains("lora_A"))
            .map(|(name, tensor)| (name.clone(), tensor.clone()))
            .expect("a lora_A tensor");
        let (rank, columns) = tensor.dims2().unwrap();
        let wider = Tensor::zeros((rank, columns + 3), tensor.dtype(), &Device::Cpu).unwrap();
        tensors.insert(name.clone(), wider);
        renamed = name;
    });
    // The module whose tensor does not fit (PEFT's prefix and the tensor suffix stripped).
    let module = renamed
        .trim_start_matches("base_model.model.")
        .trim_end_matches(".lora_A.weight");
    for message in [
        failure(&project, &["wide"]),
        refused_by_validate(&project, &["wide"]),
    ] {
        assert!(message.contains("wide"), "{message}");
        assert!(message.contains(module), "names {module}: {message}");
    }

    // No train stage and no base model: the validation says what is missing.
    let yaml = external_pipeline(&["exported/adapter"]).replace("      base_model: model\n", "");
    project.write("nobase.yaml", &yaml);
    let output = project.run(&["validate", "nobase.yaml"]);
    assert_eq!(output.status.code(), Some(2));
    let message = stderr(&output);
    assert!(
        message.contains("external adapters need `base_model`"),
        "{message}"
    );
}

/// An evaluate stage may not read, as an outside adapter, the folder another stage of the same
/// pipeline publishes: nothing orders it after the export, so a run could score the folder as an
/// earlier run left it and call the stage fresh. `validate` refuses it, naming the publisher.
#[test]
fn an_outside_adapter_published_by_the_same_pipeline_is_refused() {
    let project = TrainProject::new();
    project.run_ok("pipeline.yaml", &[]);
    let reader = "  reader:\n    evaluate:\n      external_adapters: [exported/adapter]\n      base_model: model\n      data: prompts\n      max_rows: 40\n      samples: 0\n      device: cpu\n";
    project.write("both.yaml", &format!("{}{reader}", train_support::PIPELINE));
    let output = project.run(&["validate", "both.yaml"]);
    let message = stderr(&output);
    assert_eq!(output.status.code(), Some(2), "{message}");
    for text in [
        "stages.reader.evaluate",
        "exported/adapter/adapter_config.json",
        "which stage `export` publishes",
        "read the train stage `train` it exports through `model:` or `adapters:`",
    ] {
        assert!(message.contains(text), "no `{text}` in:\n{message}");
    }
    // Another pipeline reading the folder is ordered by the user (it runs after this one).
    project.write("external.yaml", &external_pipeline(&["exported/adapter"]));
    let output = project.run(&["validate", "external.yaml"]);
    assert_eq!(output.status.code(), Some(0), "{}", stderr(&output));
}

/// An adapter whose adapter_config.json names another base than the one it is scored on is
/// scored, with a warning naming both, which `--quiet` keeps (it used to be a note, which
/// `--quiet` dropped).
#[test]
fn an_adapter_over_another_base_is_scored_with_a_warning_quiet_keeps() {
    let project = TrainProject::new();
    project.run_ok("pipeline.yaml", &[]);
    let folder = project.path("other-base");
    std::fs::create_dir_all(&folder).unwrap();
    for file in ["adapter_config.json", "adapter_model.safetensors"] {
        std::fs::copy(
            project.path("exported/adapter").join(file),
            folder.join(file),
        )
        .unwrap();
    }
    let config_path = folder.join("adapter_config.json");
    let mut config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&config_path).unwrap()).unwrap();
    config["base_model_name_or_path"] = "someone/another-model".into();
    std::fs::write(&config_path, config.to_string()).unwrap();
    project.write("external.yaml", &external_pipeline(&["other-base"]));
    let run = project.run_ok("external.yaml", &["--quiet"]);
    assert_eq!(run.status("external"), "ran");
    for text in [
        "Warning external:",
        "base_model_name_or_path is `someone/another-model`",
        "only meaningful on the model it was trained on",
    ] {
        assert!(run.stderr.contains(text), "no `{text}` in:\n{}", run.stderr);
    }
}
