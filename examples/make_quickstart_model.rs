//! Writes the quickstart's base model: `datasets/quickstart/model/config.json` and
//! `model.safetensors`, a tiny Llama (hidden 64, 2 layers, 4 heads over 2 key/value heads, MLP 172,
//! tied embeddings, f32) initialised at random (normal, std 0.02, fixed seed) for the word-level
//! tokenizer already in that folder (its vocabulary size is read from tokenizer.json).
//!
//! It is honestly an untrained model: the quickstart shows an adapter learning a task from
//! random-init features, not a pretrained model being adapted.
//!
//! Run: `cargo run --example make_quickstart_model [MODEL_DIR]` (default: datasets/quickstart/model).
#![expect(
    clippy::print_stdout,
    reason = "a developer tool that reports what it wrote"
)]

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use candle_core::{DType, Device};
use peftpipe::models::random::random_weights;
use peftpipe::models::{ModelConfig, ModelDir};

/// Fixed so that regenerating gives byte-identical weights.
const SEED: u64 = 20_261_128;
const INIT_STD: f64 = 0.02;
/// Standard deviation of the token embeddings (PyTorch's nn.Embedding default).
const EMBEDDING_STD: f64 = 1.0;

/// Write `bytes` to `path` through a temporary file in the same directory and a rename.
fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let dir = path
        .parent()
        .context("output path has no parent directory")?;
    let mut file = tempfile::NamedTempFile::new_in(dir)
        .with_context(|| format!("creating a temporary file in {}", dir.display()))?;
    std::io::Write::write_all(&mut file, bytes)
        .with_context(|| format!("writing {}", path.display()))?;
    file.persist(path)
        .with_context(|| format!("renaming into {}", path.display()))?;
    Ok(())
}

fn main() -> Result<()> {
    let dir = std::env::args_os().nth(1).map_or_else(
        || PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("datasets/quickstart/model"),
        PathBuf::from,
    );
    let tokenizer_path = dir.join("tokenizer.json");
    let tokenizer = tokenizers::Tokenizer::from_file(&tokenizer_path)
        .map_err(|error| anyhow::anyhow!("{}: {error}", tokenizer_path.display()))?;
    let vocab_size = tokenizer.get_vocab_size(true);
    let id = |token: &str| {
        tokenizer
            .token_to_id(token)
            .with_context(|| format!("{}: no `{token}` token", tokenizer_path.display()))
    };
    let (bos, eos, pad) = (id("<s>")?, id("</s>")?, id("<pad>")?);

    let config_json = serde_json::json!({
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": vocab_size,
        "hidden_size": 64,
        "intermediate_size": 172,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "head_dim": 16,
        "hidden_act": "silu",
        "max_position_embeddings": 128,
        "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0,
        "rope_scaling": null,
        "attention_bias": false,
        "mlp_bias": false,
        "tie_word_embeddings": true,
        "initializer_range": INIT_STD,
        "bos_token_id": bos,
        "eos_token_id": eos,
        "pad_token_id": pad,
        "torch_dtype": "float32"
    });
    let config = ModelConfig::from_json(&config_json)
        .map_err(|error| anyhow::anyhow!("config key `{}`: {}", error.key, error.message))?;
    let mut tensors = random_weights(&config, SEED, INIT_STD, DType::F32, &Device::Cpu)?;
    // Embeddings get PyTorch's nn.Embedding default, N(0, 1): with a tied, frozen head,
    // std-0.02 embeddings cap every logit near ±1, so no adapter could ever make a confident
    // prediction through it (measured: the quickstart loss plateaued at 4.0 ≈ ln(177/3.6)).
    if let Some(embedding) = tensors.get_mut("model.embed_tokens.weight") {
        *embedding = (&*embedding * (EMBEDDING_STD / INIT_STD))?;
    }

    let config_text = serde_json::to_string_pretty(&config_json)? + "\n";
    write_atomic(&dir.join("config.json"), config_text.as_bytes())?;
    let staging = tempfile::tempdir_in(&dir)?;
    let staged = staging.path().join("model.safetensors");
    candle_core::safetensors::save(&tensors, &staged)?;
    let bytes = std::fs::read(&staged)?;
    if bytes.len() > 1_000_000 {
        bail!(
            "the quickstart model would be {} bytes (limit 1 MB)",
            bytes.len()
        );
    }
    write_atomic(&dir.join("model.safetensors"), &bytes)?;

    // Check what was written loads as a model directory.
    let written = ModelDir::open(&dir)?;
    println!(
        "wrote {}: {} parameters (random init, seed {SEED}), vocab {vocab_size}, {} bytes",
        dir.display(),
        written.config().parameter_count().unwrap_or_default(),
        bytes.len()
    );
    Ok(())
}
