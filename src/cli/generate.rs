//! `peftpipe generate MODEL [--adapter DIR] --prompt TEXT`: try a model (a base model, a merged
//! export, or a base model with a PEFT adapter). Resolves the arguments into an
//! [`crate::infer::session::GenerateRequest`] and hands the result to the reporter.

use std::path::PathBuf;

use clap::Args;

use super::{GlobalArgs, EXIT_FAILED, EXIT_INVALID, EXIT_OK};
use crate::device::{compute_dtype, resolve_device, DTypeSpec, DeviceSpec};
use crate::infer::session::{
    generate_one, recorded_base_quantization, GenerateRequest, InferenceModel,
};
use crate::infer::Sampling;
use crate::models::resolve_model_path;
use crate::report;

#[derive(Debug, Args)]
pub struct GenerateArgs {
    /// Model folder in Hugging Face layout (config.json, model.safetensors, tokenizer.json): a
    /// base model or a merged export; or a Hub id `hf://org/name[@revision]` found in the local
    /// Hugging Face cache (downloaded when built with the `hub` feature).
    #[arg(value_name = "MODEL")]
    pub model: String,
    /// PEFT adapter folder (adapter_config.json + adapter_model.safetensors) applied on the model.
    /// A train artifact's adapter of a QLoRA run is applied over the same 4-bit base, as its
    /// run recorded in the sibling base_model.json.
    #[arg(long, value_name = "DIR")]
    pub adapter: Option<PathBuf>,
    /// The prompt (BOS is added when the tokenizer adds it).
    #[arg(long)]
    pub prompt: String,
    /// Most tokens to generate (generation also stops at EOS).
    #[arg(long, default_value_t = 64, value_name = "N")]
    pub max_new_tokens: usize,
    /// Sample with this temperature instead of greedy decoding.
    #[arg(long, value_name = "T")]
    pub temperature: Option<f64>,
    /// Nucleus sampling: keep the most likely tokens up to this probability mass (needs
    /// --temperature).
    #[arg(long, value_name = "P", requires = "temperature")]
    pub top_p: Option<f64>,
    /// Seed of the sampler (needs --temperature; default 0).
    #[arg(long, value_name = "S", requires = "temperature")]
    pub seed: Option<u64>,
    /// `auto`, `cpu`, `cuda` or `cuda:N`.
    #[arg(long, default_value = "auto")]
    pub device: String,
    /// Compute dtype: `auto` (f32 on CPU, bf16 on CUDA), `f32`, `bf16` or `f16`.
    #[arg(long, default_value = "auto")]
    pub dtype: String,
}

pub fn run(global: &GlobalArgs, args: GenerateArgs) -> u8 {
    let device_spec: DeviceSpec = match args.device.parse() {
        Ok(spec) => spec,
        Err(error) => {
            report::error(&format!("--device: {error}"));
            return EXIT_INVALID;
        }
    };
    let dtype_spec: DTypeSpec = match args.dtype.parse() {
        Ok(spec) => spec,
        Err(error) => {
            report::error(&format!("--dtype: {error}"));
            return EXIT_INVALID;
        }
    };
    let sampling = match args.temperature {
        None => Sampling::Greedy,
        Some(temperature) => Sampling::Random {
            temperature,
            top_p: args.top_p.unwrap_or(1.0),
            seed: args.seed.unwrap_or(0),
        },
    };
    if let Err(message) = sampling.validate() {
        report::error(&message);
        return EXIT_INVALID;
    }
    let device = match resolve_device(device_spec) {
        Ok(device) => device,
        Err(error) => {
            report::error(&error.to_string());
            return EXIT_FAILED;
        }
    };
    let dtype = compute_dtype(&device, dtype_spec);
    let model_dir = match resolve_model_path(&args.model) {
        Ok(path) => path,
        Err(error) => {
            report::error(&error.to_string());
            return EXIT_INVALID;
        }
    };
    let quantization = match args.adapter.as_deref().map(recorded_base_quantization) {
        Some(Err(message)) => {
            report::error(&message);
            return EXIT_INVALID;
        }
        Some(Ok(quantization)) => quantization,
        None => None,
    };
    let model = match InferenceModel::load(
        &model_dir,
        args.adapter.as_deref(),
        quantization.as_ref(),
        &device,
        dtype,
    ) {
        Ok(model) => model,
        Err(message) => {
            report::error(&message);
            return EXIT_FAILED;
        }
    };
    let request = GenerateRequest {
        prompt: args.prompt,
        max_new_tokens: args.max_new_tokens,
        sampling,
    };
    match generate_one(&model, &request) {
        Ok(output) => {
            if global.json {
                report::json(&output);
            } else {
                report::generate::print(&output, global.quiet);
            }
            EXIT_OK
        }
        Err(message) => {
            report::error(&message);
            EXIT_FAILED
        }
    }
}
