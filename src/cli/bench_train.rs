//! `peftpipe bench train`: LoRA training-step throughput and memory on a random-initialised model
//! of the shape a config.json describes. Resolves the arguments and calls
//! [`crate::train::bench::run`]; the reporter prints the figures and a `RESULT {...}` JSON line.

use std::path::PathBuf;

use clap::Args;

use super::GlobalArgs;
use crate::train::bench::{run as run_bench, BenchSettings};

#[derive(Debug, Args)]
pub struct BenchTrainArgs {
    /// A Hugging Face config.json (Llama family), e.g. llama-3.2-1b.config.json.
    #[arg(long)]
    pub config: PathBuf,
    /// `cpu`, `cuda` or `cuda:N` (default: cuda when built with it, else cpu).
    #[arg(long, default_value = "auto")]
    pub device: String,
    /// Compute dtype: bf16 (default on CUDA), f32 (default on CPU), f16.
    #[arg(long)]
    pub dtype: Option<String>,
    /// Sequences per step.
    #[arg(long, default_value_t = 8)]
    pub batch: usize,
    /// Tokens per sequence.
    #[arg(long, default_value_t = 512)]
    pub seq: usize,
    /// LoRA rank (alpha defaults to 2·rank).
    #[arg(long, default_value_t = 16)]
    pub rank: usize,
    /// LoRA alpha.
    #[arg(long)]
    pub alpha: Option<f64>,
    /// Timed steps.
    #[arg(long, default_value_t = 20)]
    pub steps: usize,
    /// Untimed warm-up steps before them.
    #[arg(long, default_value_t = 3)]
    pub warmup: usize,
    /// Seed of the random weights and tokens.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
}

pub fn run(global: &GlobalArgs, args: BenchTrainArgs) -> u8 {
    let device = match crate::stages::train::select_device(&args.device) {
        Ok(device) => device,
        Err(message) => {
            crate::report::error(&message);
            return super::EXIT_INVALID;
        }
    };
    let dtype_name = args
        .dtype
        .clone()
        .unwrap_or_else(|| if device.is_cuda() { "bf16" } else { "f32" }.to_string());
    if !matches!(dtype_name.as_str(), "bf16" | "f32" | "f16") {
        crate::report::error(&format!("--dtype {dtype_name}: expected bf16, f32 or f16"));
        return super::EXIT_INVALID;
    }
    if args.batch == 0 || args.seq < 2 || args.rank == 0 || args.steps == 0 {
        crate::report::error("--batch, --rank and --steps must be at least 1 and --seq at least 2");
        return super::EXIT_INVALID;
    }
    let settings = BenchSettings {
        device,
        dtype: crate::stages::train::dtype_from_name(&dtype_name),
        batch: args.batch,
        sequence_length: args.seq,
        rank: args.rank,
        alpha: args.alpha.unwrap_or(2.0 * args.rank as f64),
        steps: args.steps,
        warmup: args.warmup,
        seed: args.seed,
    };
    match run_bench(&args.config, &settings) {
        Ok(result) => {
            crate::report::bench_train(&result, global.json);
            super::EXIT_OK
        }
        Err(message) => {
            crate::report::error(&message);
            super::EXIT_FAILED
        }
    }
}
