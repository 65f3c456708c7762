//! Helpers shared by the model/PEFT integration tests (inspect, lora, train, export, generate,
//! parity): where /work/shared is, the binary, a tiny seeded Llama (config, checkpoint-named
//! weights, a model folder on disk), and tensor comparisons. Each test file includes it with
//! `mod support;` and uses a subset.
#![allow(dead_code, reason = "each test file uses a different subset")]

pub mod export;
pub mod methods;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Command;

use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use peftpipe::config::train::Truncation;
use peftpipe::data::batch::{fit, Sequence};
use peftpipe::data::tokenize::TextTokenizer;
use peftpipe::models::{llama::Llama, CausalLm, Hooks, LinearFactory, ModelConfig};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

pub type TestResult = Result<(), Box<dyn std::error::Error>>;

/// `PEFTPIPE_SHARED` (the read-only shared folder), when set.
pub fn shared_dir() -> Option<PathBuf> {
    std::env::var_os("PEFTPIPE_SHARED").map(PathBuf::from)
}

/// The peftpipe binary of this build.
pub fn peftpipe() -> Command {
    Command::new(env!("CARGO_BIN_EXE_peftpipe"))
}

/// The repository's quickstart model (`datasets/quickstart/model`) copied into `dir/model`, its
/// config.json edited by `edit`; returns the folder.
pub fn quickstart_model_in(dir: &Path, edit: impl FnOnce(&mut serde_json::Value)) -> PathBuf {
    let model = dir.join("model");
    std::fs::create_dir(&model).unwrap();
    let source = Path::new(env!("CARGO_MANIFEST_DIR")).join("datasets/quickstart/model");
    for entry in std::fs::read_dir(&source).unwrap() {
        let entry = entry.unwrap();
        std::fs::copy(entry.path(), model.join(entry.file_name())).unwrap();
    }
    edit_config(&model, edit);
    model
}

/// `model`'s config.json rewritten with `edit` applied.
pub fn edit_config(model: &Path, edit: impl FnOnce(&mut serde_json::Value)) {
    let config_path = model.join("config.json");
    let mut config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&config_path).unwrap()).unwrap();
    edit(&mut config);
    std::fs::write(&config_path, config.to_string()).unwrap();
}

/// A Mistral config (`sliding_window` set) over the quickstart model's weights.
pub fn as_mistral(config: &mut serde_json::Value, sliding_window: usize) {
    config["model_type"] = "mistral".into();
    config["architectures"] = serde_json::json!(["MistralForCausalLM"]);
    config["sliding_window"] = sliding_window.into();
}

/// `peftpipe generate MODEL --adapter ADAPTER --prompt Once --max-new-tokens 2 --device cpu`:
/// a short generation, for tests of whether it runs (and of its error) over an adapter.
pub fn generate_two_tokens(model: &Path, adapter: &Path) -> std::process::Output {
    two_token_generation(model, adapter)
        .output()
        .expect("running peftpipe generate")
}

/// The command [`generate_two_tokens`] runs, for callers that add options (`--json`).
pub fn two_token_generation(model: &Path, adapter: &Path) -> Command {
    let mut command = peftpipe();
    command
        .arg("generate")
        .arg(model)
        .arg("--adapter")
        .arg(adapter)
        .args([
            "--prompt",
            "Once",
            "--max-new-tokens",
            "2",
            "--device",
            "cpu",
        ]);
    command
}

/// config.json of the tiny Llama: 2 layers, hidden 16, GQA 4/2 heads, vocabulary 40, untied head.
pub fn tiny_llama_json() -> serde_json::Value {
    serde_json::json!({
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama", "hidden_size": 16, "intermediate_size": 24,
        "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
        "vocab_size": 40, "max_position_embeddings": 64, "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0, "tie_word_embeddings": false, "bos_token_id": 1, "eos_token_id": 2
    })
}

pub fn tiny_llama_config() -> ModelConfig {
    ModelConfig::from_json(&tiny_llama_json()).expect("the tiny Llama config is valid")
}

/// Seeded base weights of a Llama config, named as in a checkpoint: matrices uniform in
/// ±`spread`, norm weights uniform in 1 ± `spread` (large enough that LoRA changes are visible).
pub fn llama_weights(config: &ModelConfig, seed: u64, spread: f32) -> HashMap<String, Tensor> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let mut random = |shape: &[usize], offset: f32| {
        let count: usize = shape.iter().product();
        let values: Vec<f32> = (0..count)
            .map(|_| rng.random::<f32>() * (2.0 * spread) - spread + offset)
            .collect();
        Tensor::from_vec(values, shape, &Device::Cpu).expect("shape and values agree")
    };
    let ModelConfig::Llama(llama) = config else {
        panic!("llama_weights needs a Llama config")
    };
    let mut weights = HashMap::new();
    weights.insert(
        "model.embed_tokens.weight".to_string(),
        random(&[llama.vocab_size, llama.hidden_size], 0.0),
    );
    for layer in config.linear_layers() {
        if layer.tied_to_embeddings {
            continue;
        }
        weights.insert(
            format!("{}.weight", layer.path),
            random(&[layer.out_features, layer.in_features], 0.0),
        );
    }
    for i in 0..llama.num_hidden_layers {
        for norm in ["input_layernorm", "post_attention_layernorm"] {
            weights.insert(
                format!("model.layers.{i}.{norm}.weight"),
                random(&[llama.hidden_size], 1.0),
            );
        }
    }
    weights.insert(
        "model.norm.weight".to_string(),
        random(&[llama.hidden_size], 1.0),
    );
    weights
}

/// Build a Llama from in-memory weights (f32, CPU) through `factory`.
pub fn build_llama(
    config: &ModelConfig,
    weights: &HashMap<String, Tensor>,
    factory: &dyn LinearFactory,
) -> Llama {
    let ModelConfig::Llama(llama) = config else {
        panic!("build_llama needs a Llama config")
    };
    let builder = VarBuilder::from_tensors(weights.clone(), DType::F32, &Device::Cpu);
    Llama::load(builder, llama, config, factory).expect("the tiny Llama loads")
}

/// Write a model folder (config.json + model.safetensors) for `config_json` with `weights`.
pub fn write_model_dir(
    dir: &Path,
    config_json: &serde_json::Value,
    weights: &HashMap<String, Tensor>,
) -> TestResult {
    std::fs::create_dir_all(dir)?;
    std::fs::write(
        dir.join("config.json"),
        serde_json::to_string_pretty(config_json)?,
    )?;
    candle_core::safetensors::save(weights, dir.join("model.safetensors"))?;
    Ok(())
}

/// max |a − b| over all elements (f32).
pub fn max_difference(a: &Tensor, b: &Tensor) -> f32 {
    a.to_dtype(DType::F32)
        .and_then(|a| a.sub(&b.to_dtype(DType::F32)?))
        .and_then(|d| d.abs()?.max_all()?.to_scalar::<f32>())
        .expect("tensors of one shape")
}

/// max |ours − reference| over the positions where `mask` ([batch, time], 1 = token) is set;
/// logits are `[batch, time, vocab]`.
pub fn masked_max_abs(
    ours: &Tensor,
    reference: &Tensor,
    mask: &Tensor,
) -> candle_core::Result<f32> {
    let per_position = (ours - reference)?.abs()?.max(candle_core::D::Minus1)?;
    (per_position * mask.to_dtype(DType::F32)?)?
        .max_all()?
        .to_scalar::<f32>()
}

/// Replace `text` occurrences of `path` with `[NAME]` for snapshots.
pub fn redact(text: &str, path: &Path, name: &str) -> String {
    text.replace(&path.display().to_string(), name)
}

/// The stories of one of bevostories' Parquet files (its `text` column).
pub fn read_texts(path: &Path) -> Vec<String> {
    use arrow::array::AsArray;
    let file = std::fs::File::open(path).unwrap();
    let reader = parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder::try_new(file)
        .unwrap()
        .build()
        .unwrap();
    let mut texts = Vec::new();
    for batch in reader {
        let batch = batch.unwrap();
        let column = batch.column_by_name("text").unwrap();
        texts.extend(
            column
                .as_string::<i32>()
                .iter()
                .map(|t| t.unwrap().to_string()),
        );
    }
    texts
}

/// bevostories' train and validation stories as stories260k sequences (BOS, no EOS, at most 512
/// tokens): what the perplexity tests train on and score (base validation perplexity 13.37).
pub fn bevostories(shared: &Path) -> (Vec<Sequence>, Vec<Sequence>) {
    let tokenizer = TextTokenizer::from_model_dir(&shared.join("models/stories260k")).unwrap();
    let encode = |file: &str| -> Vec<Sequence> {
        read_texts(&shared.join("datasets/bevostories").join(file))
            .iter()
            .map(|text| {
                let example = tokenizer.encode_example("", text, false).unwrap();
                fit(&example, 512, 1, Truncation::PromptLeft).unwrap()
            })
            .collect()
    };
    (encode("train.parquet"), encode("validation.parquet"))
}

/// Perplexity over every token after BOS, summed over the sequences, with `hooks` (positions a
/// prompt method adds in front are dropped); no graph is built (detached inputs).
pub fn perplexity(model: &dyn CausalLm, hooks: &Hooks, sequences: &[Sequence]) -> f64 {
    let (mut total, mut count) = (0.0, 0usize);
    for sequence in sequences {
        let length = sequence.ids.len();
        let ids = Tensor::from_vec(sequence.ids.clone(), (1, length), &Device::Cpu).unwrap();
        let mask = Tensor::ones((1, length), DType::F32, &Device::Cpu).unwrap();
        let logits = model.forward(&ids, None, hooks).unwrap();
        let positions = logits.dim(1).unwrap();
        let logits = logits.narrow(1, positions - length, length).unwrap();
        let loss = peftpipe::ops::next_token_cross_entropy(&logits, &ids, &mask).unwrap();
        total += f64::from(loss.sum.to_scalar::<f32>().unwrap());
        count += loss.count;
    }
    (total / count as f64).exp()
}
