//! `peftpipe inspect`: a tiny random model directory written in-test, the real configs in
//! /work/shared (PEFT's LoRA trainable-parameter counts without weights), the LoRA target listing
//! on stories260k, the did-you-mean error for an unknown target, and `hf://` ids resolved through
//! a fake Hugging Face cache.
#![expect(clippy::print_stderr, reason = "tests print skip reasons")]

mod support;

use std::path::Path;

use candle_core::{DType, Device};
use peftpipe::models::random::random_weights;
use peftpipe::models::ModelConfig;
use support::{peftpipe, redact, shared_dir, TestResult};

fn inspect(args: &[&str]) -> std::process::Output {
    peftpipe()
        .arg("inspect")
        .args(args)
        .output()
        .expect("the binary runs")
}

fn inspect_json(args: &[&str]) -> Result<serde_json::Value, Box<dyn std::error::Error>> {
    let output = inspect(&[&["--json"], args].concat());
    assert!(
        output.status.success(),
        "inspect failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    Ok(serde_json::from_slice(&output.stdout)?)
}

fn tiny_model_dir(dir: &Path) -> Result<ModelConfig, Box<dyn std::error::Error>> {
    let config_json = serde_json::json!({
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 40,
        "hidden_size": 16, "intermediate_size": 24, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 2, "tie_word_embeddings": true
    });
    let config = ModelConfig::from_json(&config_json).map_err(|e| e.message)?;
    std::fs::create_dir_all(dir)?;
    std::fs::write(dir.join("config.json"), config_json.to_string())?;
    let tensors = random_weights(&config, 1, 0.02, DType::BF16, &Device::Cpu)?;
    candle_core::safetensors::save(&tensors, dir.join("model.safetensors"))?;
    Ok(config)
}

#[test]
fn inspect_reports_a_model_directory() -> TestResult {
    let dir = tempfile::tempdir()?;
    let config = tiny_model_dir(dir.path())?;
    let path = dir.path().to_string_lossy().to_string();
    let report = inspect_json(&[&path])?;
    let model = &report["model"];
    assert_eq!(model["architecture"], "llama");
    assert_eq!(model["dtype"], "BF16");
    assert_eq!(model["parameters"], config.parameter_count().unwrap());
    assert_eq!(
        model["stored_parameters"],
        config.parameter_count().unwrap()
    );
    assert_eq!(model["key_value_heads"], 2);
    assert_eq!(model["linear_layers"][1]["name"], "k_proj");
    assert_eq!(model["linear_layers"][1]["out_features"], 8);
    assert_eq!(report["lora"], serde_json::json!([]));
    Ok(())
}

#[test]
fn inspect_reports_a_lone_config_file() -> TestResult {
    let Some(shared) = shared_dir() else {
        eprintln!("skipped: PEFTPIPE_SHARED not set");
        return Ok(());
    };
    let path = shared.join("models/configs/llama-3.2-3b.config.json");
    let report = inspect_json(&[&path.to_string_lossy()])?;
    // transformers: LlamaForCausalLM(Llama-3.2-3B config) has 3,212,749,824 parameters.
    assert_eq!(report["model"]["parameters"], 3_212_749_824u64);
    assert_eq!(
        report["model"]["stored_parameters"],
        serde_json::Value::Null
    );
    Ok(())
}

/// PEFT's own numbers (peft-reference.md, PEFT's benchmark) from config.json alone.
#[test]
fn lora_counts_equal_peft_on_the_real_configs() -> TestResult {
    let Some(shared) = shared_dir() else {
        eprintln!("skipped: PEFTPIPE_SHARED not set");
        return Ok(());
    };
    let configs = shared.join("models/configs");
    let cases: [(&str, &str, &str, u64, u64); 4] = [
        ("llama-3.2-3b", "q_proj,v_proj", "32", 9_175_040, 56),
        ("llama-3.2-1b", "all-linear", "16", 11_272_192, 112),
        ("llama-3.1-8b", "q_proj,v_proj", "16", 6_815_744, 64),
        ("llama-7b", "q_proj,v_proj", "8", 4_194_304, 64),
    ];
    for (name, target, rank, expected, modules) in cases {
        let path = configs.join(format!("{name}.config.json"));
        let report = inspect_json(&[&path.to_string_lossy(), "--target", target, "--rank", rank])?;
        let lora = &report["lora"][0];
        assert_eq!(
            lora["trainable_parameters"], expected,
            "{name} {target} r{rank}"
        );
        assert_eq!(lora["matched_modules"], modules, "{name} {target}");
    }
    // A regex selecting q and v in every layer counts the same as the name list.
    let path = configs.join("llama-3.2-3b.config.json");
    let report = inspect_json(&[
        &path.to_string_lossy(),
        "--target",
        r".*\.self_attn\.(q|v)_proj",
        "--target",
        "q_proj,v_proj",
        "--rank",
        "32",
    ])?;
    assert_eq!(report["lora"][0]["trainable_parameters"], 9_175_040);
    assert_eq!(report["lora"][1]["trainable_parameters"], 9_175_040);
    assert_eq!(
        report["lora"][0]["adapter_config_target_modules"],
        r".*\.self_attn\.(q|v)_proj"
    );

    let output = inspect(&[
        &path.to_string_lossy(),
        "--target",
        "q_proj,v_proj",
        "--rank",
        "32",
    ]);
    assert!(output.status.success());
    let text = redact(&String::from_utf8(output.stdout)?, &path, "[CONFIG]");
    insta::assert_snapshot!("llama_3_2_3b_q_v_r32", text);
    Ok(())
}

#[test]
fn lora_targets_listed_on_stories260k() -> TestResult {
    let Some(shared) = shared_dir() else {
        eprintln!("skipped: PEFTPIPE_SHARED not set");
        return Ok(());
    };
    let path = shared.join("models/stories260k");
    let output = inspect(&[
        &path.to_string_lossy(),
        "--target",
        "q_proj,v_proj",
        "--target",
        r"model\.layers\.[0-1]\.mlp\..*",
        "--target",
        "all-linear",
        "--rank",
        "8",
    ]);
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let text = redact(&String::from_utf8(output.stdout)?, &path, "[STORIES260K]");
    insta::assert_snapshot!("stories260k_targets", text);
    // --rank alone: PEFT's default targets for Llama (q_proj, v_proj).
    let report = inspect_json(&[&path.to_string_lossy(), "--rank", "4"])?;
    assert_eq!(report["lora"][0]["target"], "[q_proj, v_proj]");
    // 5 layers × 4 · ((64 + 64) + (64 + 32)).
    assert_eq!(report["lora"][0]["trainable_parameters"], 4480);
    Ok(())
}

#[test]
fn unknown_target_is_refused_with_a_suggestion() -> TestResult {
    let dir = tempfile::tempdir()?;
    tiny_model_dir(dir.path())?;
    let path = dir.path().to_string_lossy().to_string();
    let output = inspect(&[&path, "--target", "q_proj,v_prj", "--rank", "8"]);
    assert_eq!(output.status.code(), Some(2));
    assert!(output.stdout.is_empty());
    insta::assert_snapshot!("unknown_target", String::from_utf8(output.stderr)?);
    let output = inspect(&[&path, "--target", r".*\.attention\..*"]);
    assert_eq!(output.status.code(), Some(2));
    let stderr = String::from_utf8(output.stderr)?;
    assert!(stderr.contains("matches no linear layer"), "{stderr}");
    Ok(())
}

/// A fake Hugging Face cache: `models--org--tiny/refs/main` → `snapshots/<hash>/`.
#[test]
fn hub_ids_resolve_through_the_huggingface_cache() -> TestResult {
    let cache = tempfile::tempdir()?;
    let hash = "a1b2c3d4e5f60718293a4b5c6d7e8f9012345678";
    let repo = cache.path().join("models--org--tiny");
    let snapshot = repo.join("snapshots").join(hash);
    tiny_model_dir(&snapshot)?;
    std::fs::create_dir_all(repo.join("refs"))?;
    std::fs::write(repo.join("refs/main"), hash)?;
    let run = |id: &str, variable: &str, value: &Path| {
        peftpipe()
            .args(["inspect", "--json", id])
            .env_remove("HF_HUB_CACHE")
            .env_remove("HUGGINGFACE_HUB_CACHE")
            .env(variable, value)
            .output()
            .expect("the binary runs")
    };
    for id in ["hf://org/tiny", &format!("hf://org/tiny@{hash}")] {
        let output = run(id, "HF_HUB_CACHE", cache.path());
        assert!(
            output.status.success(),
            "{id}: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        let report: serde_json::Value = serde_json::from_slice(&output.stdout)?;
        assert_eq!(report["model"]["path"], snapshot.to_string_lossy().as_ref());
        assert_eq!(report["model"]["dtype"], "BF16");
    }
    // Without HF_HUB_CACHE, HF_HOME/hub is the cache.
    let home = tempfile::tempdir()?;
    std::fs::create_dir_all(home.path().join("hub"))?;
    std::fs::rename(&repo, home.path().join("hub/models--org--tiny"))?;
    let output = run("hf://org/tiny", "HF_HOME", home.path());
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    // Not in the cache: a clear error that says how to get it (without the `hub` feature; with
    // it, this would try the network).
    if cfg!(feature = "hub") {
        return Ok(());
    }
    let output = run("hf://org/tiny", "HF_HUB_CACHE", cache.path());
    assert_eq!(output.status.code(), Some(2));
    let stderr = String::from_utf8(output.stderr)?;
    assert!(
        stderr.contains("hf://org/tiny is not in the Hugging Face cache"),
        "{stderr}"
    );
    assert!(stderr.contains("refs/main does not exist"), "{stderr}");
    assert!(stderr.contains("--features hub"), "{stderr}");
    Ok(())
}

#[test]
fn sizes_whose_counts_overflow_are_an_error_naming_the_file() -> TestResult {
    let dir = tempfile::tempdir()?;
    // Each size is accepted alone (within MAX_DIMENSION and MAX_LAYERS, so each product of two
    // fits); the MLP weights summed over the layers (16 × 3 × 2^30 × 2^31) exceed 2^64.
    let config = serde_json::json!({
        "model_type": "llama", "hidden_size": 1u64 << 30, "intermediate_size": (1u64 << 31) - 1,
        "num_hidden_layers": 16, "num_attention_heads": 4, "num_key_value_heads": 2,
        "head_dim": 1u64 << 30, "vocab_size": 1u64 << 30
    });
    let file = dir.path().join("config.json");
    std::fs::write(&file, config.to_string())?;
    for args in [vec![], vec!["--target", "all-linear"]] {
        let output = inspect(&[&[file.to_str().ok_or("path")?][..], &args].concat());
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert_eq!(output.status.code(), Some(1), "{stderr}");
        assert!(!stderr.contains("panicked"), "{stderr}");
        assert!(stderr.contains("config.json"), "{stderr}");
        assert!(stderr.contains("does not fit in 64 bits"), "{stderr}");
    }
    Ok(())
}

/// PEFT's trainable-parameter counts of every method (issue 9's numbers), `--method` read by the
/// pipeline's own method config, inline or from a file, with PEFT's spellings `dora:` and
/// `adaption_prompt:` accepted.
#[test]
fn method_counts_equal_peft_on_the_real_configs() -> TestResult {
    let Some(shared) = shared_dir() else {
        eprintln!("skipped: PEFTPIPE_SHARED not set");
        return Ok(());
    };
    let configs = shared.join("models/configs");
    let llama_3b = configs.join("llama-3.2-3b.config.json");
    let dir = tempfile::tempdir()?;
    let file = dir.path().join("prefix.yaml");
    std::fs::write(
        &file,
        "prefix_tuning:\n  num_virtual_tokens: 200\n  prefix_projection: false\n",
    )?;
    let file = file.to_string_lossy().to_string();
    let cases: [(&Path, &str, &str, u64); 10] = [
        (
            &llama_3b,
            "prompt_tuning: {num_virtual_tokens: 200}",
            "prompt_tuning",
            614_400,
        ),
        (&llama_3b, &file, "prefix_tuning", 11_468_800),
        (
            &llama_3b,
            "llama_adapter: {adapter_len: 100, adapter_layers: 28}",
            "llama_adapter",
            8_601_628,
        ),
        (
            &llama_3b,
            "adaption_prompt: {adapter_len: 100, adapter_layers: 28}",
            "llama_adapter",
            8_601_628,
        ),
        (&llama_3b, "ia3", "ia3", 286_720),
        (
            &configs.join("llama-7b.config.json"),
            "llama_adapter: {adapter_len: 10, adapter_layers: 30}",
            "llama_adapter",
            1_228_830,
        ),
        // LoRA through --method agrees with --target/--rank (9,175,040 at r 32 on q, v).
        (
            &llama_3b,
            "lora: {r: 32, target_modules: [q_proj, v_proj]}",
            "lora",
            9_175_040,
        ),
        // QLoRA trains LoRA's parameters over a 4-bit base, and says so.
        (
            &llama_3b,
            "qlora: {r: 32, target_modules: [q_proj, v_proj]}",
            "qlora",
            9_175_040,
        ),
        // Norms as modules to save: hidden (3072) per RMSNorm copy; `norm` ends the name of
        // all 2 · 28 + 1 of them (PEFT's suffix match).
        (
            &llama_3b,
            "lora: {r: 32, target_modules: [q_proj, v_proj], modules_to_save: [norm]}",
            "lora",
            9_175_040 + 57 * 3072,
        ),
        (
            &llama_3b,
            "ia3: {modules_to_save: [model.norm, input_layernorm]}",
            "ia3",
            286_720 + 29 * 3072,
        ),
    ];
    for (config, method, name, expected) in cases {
        let report = inspect_json(&[&config.to_string_lossy(), "--method", method])?;
        let counted = &report["methods"][0];
        assert_eq!(counted["method"], name, "{method}");
        assert_eq!(counted["trainable_parameters"], expected, "{method}");
    }
    // DoRA adds one magnitude per output feature of each adapted layer: q 3072 + v 1024 per
    // layer × 28 on top of LoRA's count.
    let report = inspect_json(&[
        &llama_3b.to_string_lossy(),
        "--method",
        "dora: {r: 32, target_modules: [q_proj, v_proj]}",
        "--method",
        "lora: {r: 32, target_modules: [q_proj, v_proj], use_dora: true}",
    ])?;
    for index in 0..2 {
        assert_eq!(report["methods"][index]["method"], "dora");
        assert_eq!(
            report["methods"][index]["trainable_parameters"],
            9_175_040u64 + 28 * (3072 + 1024)
        );
    }
    Ok(())
}

/// `--method` problems are the pipeline's: same checks, named field, exit code 2.
#[test]
fn method_problems_name_the_field() -> TestResult {
    let Some(shared) = shared_dir() else {
        eprintln!("skipped: PEFTPIPE_SHARED not set");
        return Ok(());
    };
    let config = shared.join("models/configs/llama-3.2-3b.config.json");
    let config = config.to_string_lossy();
    for (method, expected) in [
        (
            "prompt_tuning: {num_virtual_tokens: 0}",
            "num_virtual_tokens: must be at least 1",
        ),
        ("lora: {rank: 8}", "unknown field `rank`"),
        (
            "llama_adapter: {adapter_layers: 99}",
            "adapter_layers: 99 exceeds the model's 28 layers",
        ),
        ("ia3: {target_modules: [q_prj]}", "q_prj"),
        ("loha: {}", "unknown variant `loha`"),
    ] {
        let output = inspect(&[&config, "--method", method]);
        assert_eq!(output.status.code(), Some(2), "{method}");
        let stderr = String::from_utf8(output.stderr)?;
        assert!(stderr.contains(expected), "{method}: {stderr}");
    }
    Ok(())
}

/// The memory estimate follows what each device keeps: on CUDA neither the attention
/// probabilities nor the whole logits, so at 8 × 2048 on Llama-3.2-3B the CUDA activations are
/// far below the CPU's.
#[test]
fn memory_estimate_depends_on_the_device() -> TestResult {
    let Some(shared) = shared_dir() else {
        eprintln!("skipped: PEFTPIPE_SHARED not set");
        return Ok(());
    };
    let config = shared.join("models/configs/llama-3.2-3b.config.json");
    let config = config.to_string_lossy();
    let estimate = |device: &str| -> Result<serde_json::Value, Box<dyn std::error::Error>> {
        let report = inspect_json(&[
            &config,
            "--method",
            "lora: {r: 16}",
            "--batch",
            "8",
            "--sequence",
            "2048",
            "--device",
            device,
        ])?;
        Ok(report["methods"][0]["memory"].clone())
    };
    let cuda = estimate("cuda")?;
    let cpu = estimate("cpu")?;
    assert_eq!(cuda["device"], "cuda");
    assert_eq!(cpu["device"], "cpu");
    assert_eq!(cuda["weights"], cpu["weights"]);
    let (cuda, cpu) = (
        cuda["activations"].as_f64().unwrap(),
        cpu["activations"].as_f64().unwrap(),
    );
    // CPU: 28 layers × 8 × 24 heads × 2048² × 2 bytes of probabilities alone ≈ 42 GiB.
    assert!(cpu - cuda > 40.0 * 1024f64.powi(3), "cpu {cpu} cuda {cuda}");
    // QLoRA's estimate counts its 4-bit base: the linears at ≈ 0.26× bf16, the rest 16-bit.
    let report = inspect_json(&[
        &config,
        "--method",
        "qlora: {r: 16}",
        "--method",
        "lora: {r: 16}",
        "--batch",
        "8",
        "--sequence",
        "2048",
    ])?;
    let weights = |index: usize| {
        report["methods"][index]["memory"]["weights"]
            .as_f64()
            .unwrap()
    };
    let ratio = weights(0) / weights(1);
    assert!((0.3..0.5).contains(&ratio), "qlora/lora base bytes {ratio}");
    Ok(())
}

/// A LoRA that adapts the down projections keeps no MLP product (`ops::low_rank_swiglu_linear`
/// recomputes silu(gate)·up in the backward); DoRA's and a q/v LoRA's layers do: on Llama-3.2-3B
/// at 8 × 2048 the estimates differ by 28 layers × 8 · 2048 tokens × 8192 × 2 bytes = 7 GiB.
#[test]
fn memory_estimate_drops_the_mlp_product_an_adapted_down_projection_recomputes() -> TestResult {
    let Some(shared) = shared_dir() else {
        eprintln!("skipped: PEFTPIPE_SHARED not set");
        return Ok(());
    };
    let config = shared.join("models/configs/llama-3.2-3b.config.json");
    let report = inspect_json(&[
        &config.to_string_lossy(),
        "--method",
        "lora: {r: 16, target_modules: all-linear}",
        "--method",
        "lora: {r: 16, target_modules: all-linear, use_dora: true}",
        "--method",
        "lora: {r: 16, target_modules: [q_proj, v_proj]}",
        "--batch",
        "8",
        "--sequence",
        "2048",
    ])?;
    let activations = |index: usize| {
        report["methods"][index]["memory"]["activations"]
            .as_f64()
            .unwrap()
    };
    let product = 28.0 * 8.0 * 2048.0 * 8192.0 * 2.0;
    assert_eq!(activations(1) - activations(0), product);
    assert_eq!(activations(2), activations(1));
    Ok(())
}

/// A config.json that disagrees with the stored weights: inspect describes config.json and
/// says, per disagreement, that the model will not load (generate refuses the same folder).
#[test]
fn inspect_warns_when_config_and_weights_disagree() -> TestResult {
    let Some(shared) = shared_dir() else {
        eprintln!("skipped: PEFTPIPE_SHARED not set");
        return Ok(());
    };
    let dir = tempfile::tempdir()?;
    let model = dir.path().join("model");
    std::fs::create_dir(&model)?;
    for entry in std::fs::read_dir(shared.join("models/stories260k"))? {
        let entry = entry?;
        if entry.path().is_file() {
            std::fs::copy(entry.path(), model.join(entry.file_name()))?;
        }
    }
    let config_path = model.join("config.json");
    let mut config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&config_path)?)?;
    config["num_hidden_layers"] = 6.into();
    std::fs::write(&config_path, config.to_string())?;
    let output = peftpipe().arg("inspect").arg(&model).output()?;
    let text = String::from_utf8_lossy(&output.stdout);
    assert!(
        text.contains("config.json and the weights disagree") && text.contains("num_hidden_layers"),
        "{text}"
    );
    let json = peftpipe()
        .args(["--json", "inspect"])
        .arg(&model)
        .output()?;
    let value: serde_json::Value = serde_json::from_slice(&json.stdout)?;
    assert_eq!(
        value["model"]["weight_problems"].as_array().map(Vec::len),
        Some(1),
        "{value}"
    );
    Ok(())
}

/// `inspect --json` that fails still prints one JSON object on stdout, the shape every command
/// prints for a problem (`validate --json`'s: `valid: false` and the file's problems), with
/// the exit code unchanged: 1 for a model that cannot be read, 2 for a bad argument.
#[test]
fn inspect_json_failures_print_the_problem_object() -> TestResult {
    let dir = tempfile::tempdir()?;
    let missing = dir.path().join("no-such-model");
    let missing_text = missing.to_string_lossy().to_string();
    let output = inspect(&["--json", &missing_text]);
    let code = output.status.code();
    assert!(matches!(code, Some(1 | 2)), "{code:?}");
    let json: serde_json::Value = serde_json::from_slice(&output.stdout)
        .map_err(|error| format!("stdout is not JSON ({error}): {output:?}"))?;
    assert_eq!(json["valid"], false);
    assert_eq!(json["files"][0]["file"], missing_text.as_str());
    assert_eq!(json["files"][0]["valid"], false);
    let message = json["files"][0]["problems"][0]["message"]
        .as_str()
        .unwrap_or_default();
    assert!(message.contains("no-such-model"), "{json}");
    // The same code as without --json.
    assert_eq!(inspect(&[&missing_text]).status.code(), code);

    tiny_model_dir(dir.path())?;
    let model = dir.path().to_string_lossy().to_string();
    let output = inspect(&["--json", &model, "--target", "q_prj"]);
    assert_eq!(output.status.code(), Some(2));
    let json: serde_json::Value = serde_json::from_slice(&output.stdout)?;
    assert_eq!(json["valid"], false);
    assert_eq!(json["files"][0]["problems"][0]["path"], "--target");
    assert!(
        json["files"][0]["problems"][0]["message"]
            .as_str()
            .is_some_and(|message| message.contains("q_prj")),
        "{json}"
    );
    Ok(())
}

/// An adapter folder given where a model is expected (`inspect`, `generate`'s MODEL) is named as
/// what it is, with its base model and the flag that applies it, not as a missing config.json.
#[test]
fn an_adapter_folder_given_as_the_model_is_named_as_one() -> TestResult {
    let dir = tempfile::tempdir()?;
    std::fs::write(
        dir.path().join("adapter_config.json"),
        r#"{"peft_type": "LORA", "r": 4, "base_model_name_or_path": "models/base"}"#,
    )?;
    let path = dir.path().to_string_lossy().to_string();
    for output in [
        inspect(&[&path]),
        peftpipe()
            .args(["generate", &path, "--prompt", "hi"])
            .output()?,
    ] {
        assert!(!output.status.success());
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(stderr.contains("PEFT adapter folder"), "{stderr}");
        assert!(stderr.contains("models/base"), "{stderr}");
        assert!(stderr.contains("--adapter"), "{stderr}");
    }
    Ok(())
}
