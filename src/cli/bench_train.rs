//! `peftpipe bench train`: PEFT (default LoRA) training-step throughput and memory on a random-initialised model
//! of the shape a config.json describes. Resolves the arguments and calls
//! [`crate::train::bench::run`]; the reporter prints the figures and a `RESULT {...}` JSON line.
//!
//! Several shapes (`--shapes 8x512,2x2048`) and/or `--checkpointing both` make a table: each
//! configuration runs in its own child process (`peftpipe --json bench train ...` with one shape
//! and one setting), so each has its own memory pool and its peak memory is its own; a
//! configuration that fails (e.g. out of memory) becomes a failed row and the others still run.

use std::path::PathBuf;
use std::process::Command;

use clap::{Args, ValueEnum};

use super::GlobalArgs;
use crate::train::bench::{
    run as run_bench, BenchMethod, BenchResult, BenchRow, BenchSettings, H200_PEAK_TFLOPS,
};

/// `--checkpointing`: which activation-checkpointing settings to measure.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Checkpointing {
    Off,
    On,
    /// On, with the layer inputs kept in host memory (`activation_offload`).
    Offload,
    /// Off and on.
    Both,
    /// Off, on and offload.
    All,
}

impl Checkpointing {
    /// The `(checkpointing, offload)` settings this choice measures, a row each.
    fn settings(self) -> Vec<(bool, bool)> {
        match self {
            Checkpointing::Off => vec![(false, false)],
            Checkpointing::On => vec![(true, false)],
            Checkpointing::Offload => vec![(true, true)],
            Checkpointing::Both => vec![(false, false), (true, false)],
            Checkpointing::All => vec![(false, false), (true, false), (true, true)],
        }
    }
}

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
    /// Several shapes in one table, `BATCHxSEQ` separated by commas (e.g. `8x512,2x2048`);
    /// replaces --batch and --seq.
    #[arg(long)]
    pub shapes: Option<String>,
    /// Activation checkpointing: off, on, offload (on, layer inputs in host memory), both (off
    /// and on) or all (a row each).
    #[arg(long, value_enum, default_value_t = Checkpointing::Off)]
    pub checkpointing: Checkpointing,
    /// The device's peak dense bf16 TFLOP/s, the denominator of MFU (989: H200 / H100 SXM).
    #[arg(long, default_value_t = H200_PEAK_TFLOPS)]
    pub peak_tflops: f64,
    /// A PEFT method in place of the default LoRA (--rank/--alpha then do not apply), as YAML
    /// inline or a file, written as a pipeline's `method:`: `qlora: {r: 16}`,
    /// `prompt_tuning: {num_virtual_tokens: 20}`, `ia3`, `dora: {r: 16}`.
    #[arg(long, value_name = "FILE_OR_INLINE")]
    pub method: Option<String>,
    /// A kprof build (DIR holds `kprof.so` and `libcupti.so.13`: `bash
    /// benches/gpu/kprof/build.sh`): every row runs in its own process under it and the table adds
    /// the kernel launches per timed step it counted (CUPTI activity records; profiling slows a
    /// step by a few per cent, so compare speeds from runs without it).
    #[arg(long, value_name = "DIR")]
    pub kprof: Option<PathBuf>,
}

/// The launches per step in a kprof report (`… 2639.0 launches/step, …`).
fn launches_per_step(report: &str) -> Option<f64> {
    report.lines().find_map(|line| {
        let before = line
            .split(" launches/step")
            .next()
            .filter(|b| b.len() < line.len())?;
        before.rsplit([' ', ',']).next()?.parse::<f64>().ok()
    })
}

/// `8x512,2x2048` → `[(8, 512), (2, 2048)]`.
fn parse_shapes(text: &str) -> Result<Vec<(usize, usize)>, String> {
    text.split(',')
        .map(str::trim)
        .filter(|part| !part.is_empty())
        .map(|part| {
            let parse = |value: Option<&str>| value.and_then(|v| v.trim().parse::<usize>().ok());
            let mut pieces = part.split(['x', 'X']);
            match (parse(pieces.next()), parse(pieces.next()), pieces.next()) {
                (Some(batch), Some(seq), None) => Ok((batch, seq)),
                _ => Err(format!("--shapes: `{part}` is not BATCHxSEQ (e.g. 8x512)")),
            }
        })
        .collect()
}

/// One configuration in a child process; its `--json` result, or why it failed.
fn run_child(
    args: &BenchTrainArgs,
    batch: usize,
    seq: usize,
    (checkpointing, offload): (bool, bool),
) -> BenchRow {
    let failed = |error: String| BenchRow::Failed {
        batch,
        sequence_length: seq,
        activation_checkpointing: checkpointing,
        activation_offload: offload,
        error,
    };
    let exe = match std::env::current_exe() {
        Ok(exe) => exe,
        Err(error) => return failed(format!("finding the peftpipe executable: {error}")),
    };
    let mut command = Command::new(exe);
    command
        .args(["--json", "bench", "train", "--config"])
        .arg(&args.config)
        .args(["--device", &args.device])
        .args(["--batch", &batch.to_string(), "--seq", &seq.to_string()])
        .args(["--rank", &args.rank.to_string()])
        .args(["--steps", &args.steps.to_string()])
        .args(["--warmup", &args.warmup.to_string()])
        .args(["--seed", &args.seed.to_string()])
        .args(["--peak-tflops", &args.peak_tflops.to_string()])
        .args([
            "--checkpointing",
            crate::report::checkpointing_label(checkpointing, offload),
        ]);
    if let Some(dtype) = &args.dtype {
        command.args(["--dtype", dtype]);
    }
    if let Some(alpha) = args.alpha {
        command.args(["--alpha", &alpha.to_string()]);
    }
    if let Some(method) = &args.method {
        command.args(["--method", method]);
    }
    // Under kprof: its report of this child's timed steps (the bench marks them with
    // cuProfilerStart/Stop) goes to a file of its own.
    let report = match &args.kprof {
        Some(dir) => match tempfile::NamedTempFile::new() {
            Ok(file) => {
                let library_path = match std::env::var_os("LD_LIBRARY_PATH") {
                    Some(old) => {
                        let mut path = dir.as_os_str().to_owned();
                        path.push(":");
                        path.push(old);
                        path
                    }
                    None => dir.as_os_str().to_owned(),
                };
                command
                    .env("LD_PRELOAD", dir.join("kprof.so"))
                    .env("LD_LIBRARY_PATH", library_path)
                    .env("KPROF_OUT", file.path())
                    .env("KPROF_STEPS", args.steps.to_string());
                Some(file)
            }
            Err(error) => return failed(format!("a file for kprof's report: {error}")),
        },
        None => None,
    };
    let output = match command.output() {
        Ok(output) => output,
        Err(error) => return failed(format!("starting peftpipe: {error}")),
    };
    let stdout = String::from_utf8_lossy(&output.stdout);
    let parsed = stdout
        .lines()
        .rev()
        .find_map(|line| serde_json::from_str::<BenchResult>(line.trim()).ok());
    match (output.status.success(), parsed) {
        (true, Some(mut result)) => {
            if let Some(report) = &report {
                result.launches_per_step = std::fs::read_to_string(report.path())
                    .ok()
                    .as_deref()
                    .and_then(launches_per_step);
            }
            BenchRow::Measured(Box::new(result))
        }
        _ => {
            let stderr = String::from_utf8_lossy(&output.stderr);
            let last = stderr
                .lines()
                .rev()
                .find(|line| !line.trim().is_empty())
                .unwrap_or("no output")
                .trim()
                .to_string();
            failed(format!("{} ({})", last, output.status))
        }
    }
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
    let shapes = match &args.shapes {
        Some(text) => match parse_shapes(text) {
            Ok(shapes) if !shapes.is_empty() => shapes,
            Ok(_) => {
                crate::report::error("--shapes: no shape given");
                return super::EXIT_INVALID;
            }
            Err(message) => {
                crate::report::error(&message);
                return super::EXIT_INVALID;
            }
        },
        None => vec![(args.batch, args.seq)],
    };
    if shapes.iter().any(|&(batch, seq)| batch == 0 || seq < 2) || args.rank == 0 || args.steps == 0
    {
        crate::report::error("--batch, --rank and --steps must be at least 1 and --seq at least 2");
        return super::EXIT_INVALID;
    }
    if !(args.peak_tflops.is_finite() && args.peak_tflops > 0.0) {
        crate::report::error("--peak-tflops must be a positive number");
        return super::EXIT_INVALID;
    }
    let method = match &args.method {
        None => None,
        Some(written) => match super::inspect::parse_method_config(written) {
            Ok(config) => Some(BenchMethod {
                written: written.clone(),
                config,
            }),
            Err(message) => {
                crate::report::error(&format!("--method {written}: {message}"));
                return super::EXIT_INVALID;
            }
        },
    };
    let settings_list = args.checkpointing.settings();
    if shapes.len() * settings_list.len() > 1 || args.kprof.is_some() {
        let mut rows = Vec::new();
        for &(batch, seq) in &shapes {
            for &checkpointing in &settings_list {
                rows.push(run_child(&args, batch, seq, checkpointing));
            }
        }
        let all_failed = rows
            .iter()
            .all(|row| matches!(row, BenchRow::Failed { .. }));
        crate::report::bench_train_table(&rows, global.json);
        return if all_failed {
            super::EXIT_FAILED
        } else {
            super::EXIT_OK
        };
    }
    let (batch, seq) = shapes[0];
    let settings = BenchSettings {
        device,
        dtype: crate::stages::train::dtype_from_name(&dtype_name),
        batch,
        sequence_length: seq,
        rank: args.rank,
        alpha: args.alpha.unwrap_or(2.0 * args.rank as f64),
        steps: args.steps,
        warmup: args.warmup,
        seed: args.seed,
        activation_checkpointing: settings_list[0].0,
        activation_offload: settings_list[0].1,
        peak_tflops: args.peak_tflops,
        method,
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

#[cfg(test)]
mod tests {
    use super::{launches_per_step, parse_shapes};

    #[test]
    fn shapes_parse_and_bad_ones_are_named() {
        assert_eq!(
            parse_shapes("8x512, 2X2048").unwrap(),
            vec![(8, 512), (2, 2048)]
        );
        let error = parse_shapes("8x512,2048").unwrap_err();
        assert!(error.contains("`2048`"), "{error}");
        assert!(parse_shapes("8x512x2").is_err());
    }

    #[test]
    fn launches_are_read_from_a_kprof_report() {
        let report = "kprof: window cuProfilerStart..Stop; per step = totals / 10\n\
                      kprof: span 74.900 ms/step, kernel sum 70.1 ms/step, GPU busy 66.0 ms/step \
                      (88.1% of span), 2639.0 launches/step, 57 distinct\n";
        assert_eq!(launches_per_step(report), Some(2639.0));
        assert_eq!(
            launches_per_step("kprof: CUPTI did not register (no profile)"),
            None
        );
    }
}
