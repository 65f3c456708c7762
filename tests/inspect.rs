//! `peftpipe inspect` on a tiny random model directory written in-test, and on a shared config.
#![expect(clippy::print_stderr, reason = "tests print skip reasons")]

use std::process::Command;

use candle_core::{DType, Device};
use peftpipe::models::random::random_weights;
use peftpipe::models::ModelConfig;

type TestResult = Result<(), Box<dyn std::error::Error>>;

fn inspect_json(path: &std::path::Path) -> Result<serde_json::Value, Box<dyn std::error::Error>> {
    let output = Command::new(env!("CARGO_BIN_EXE_peftpipe"))
        .args(["inspect", "--json"])
        .arg(path)
        .output()?;
    assert!(
        output.status.success(),
        "inspect failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    Ok(serde_json::from_slice(&output.stdout)?)
}

#[test]
fn inspect_reports_a_model_directory() -> TestResult {
    let config_json = serde_json::json!({
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 40,
        "hidden_size": 16, "intermediate_size": 24, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 2, "tie_word_embeddings": true
    });
    let config = ModelConfig::from_json(&config_json).map_err(|e| e.message)?;
    let dir = tempfile::tempdir()?;
    std::fs::write(dir.path().join("config.json"), config_json.to_string())?;
    let tensors = random_weights(&config, 1, 0.02, DType::BF16, &Device::Cpu)?;
    candle_core::safetensors::save(&tensors, dir.path().join("model.safetensors"))?;

    let report = inspect_json(dir.path())?;
    let model = &report["model"];
    assert_eq!(model["architecture"], "llama");
    assert_eq!(model["dtype"], "BF16");
    assert_eq!(model["parameters"], config.parameter_count());
    assert_eq!(model["stored_parameters"], config.parameter_count());
    assert_eq!(model["key_value_heads"], 2);
    assert_eq!(model["linear_layers"][1]["name"], "k_proj");
    assert_eq!(model["linear_layers"][1]["out_features"], 8);
    Ok(())
}

#[test]
fn inspect_reports_a_lone_config_file() -> TestResult {
    let Some(shared) = std::env::var_os("PEFTPIPE_SHARED") else {
        eprintln!("skipped: PEFTPIPE_SHARED not set");
        return Ok(());
    };
    let path = std::path::Path::new(&shared).join("models/configs/llama-3.2-3b.config.json");
    let report = inspect_json(&path)?;
    // transformers: LlamaForCausalLM(Llama-3.2-3B config) has 3,212,749,824 parameters.
    assert_eq!(report["model"]["parameters"], 3_212_749_824u64);
    assert_eq!(
        report["model"]["stored_parameters"],
        serde_json::Value::Null
    );
    Ok(())
}
