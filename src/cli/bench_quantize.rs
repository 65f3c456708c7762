//! `peftpipe bench quantize`: how long quantizing a model's base weights to 4 bits takes (what
//! `qlora` does to a 16-bit checkpoint while it loads, and what `export: quantize:` does to a
//! merged model), and dequantizing them back on the host (the merged export's first step).
//!
//! For each distinct decoder-linear shape of a config.json it quantizes one generated bf16 weight
//! (sums of uniforms: bell-shaped, as trained weights are; on the host, as the loader hands a
//! checkpoint's tensor over, so the time includes reading it) with every thread of the machine and
//! with one, checks that both give the same bytes, and scales the times by how many layers have
//! that shape: the ratio of the two columns is the parallel speed-up measured in the same run.

use std::path::PathBuf;
use std::time::Instant;

use candle_core::{DType, Device, Tensor};
use clap::Args;
use rand::{Rng, SeedableRng};
use serde::Serialize;

use super::{GlobalArgs, EXIT_FAILED, EXIT_OK};
use crate::models::load::read_config;
use crate::models::quantized::is_quantized_linear;
use crate::quant::{QuantConfig, QuantType, QuantizedTensor};

#[derive(Debug, Args)]
pub struct BenchQuantizeArgs {
    /// A Hugging Face config.json (Llama family), e.g. llama-3.1-8b.config.json.
    #[arg(long)]
    pub config: PathBuf,
    /// `nf4` or `fp4`.
    #[arg(long, default_value = "nf4")]
    pub quant_type: String,
    /// Quantize the absmax too (QLoRA's default).
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
    pub double_quant: bool,
    /// Weights per absmax: a power of two from 64 to 4096 (QLoRA's `block_size`).
    #[arg(long, default_value_t = 64, value_parser = block_size)]
    pub block_size: usize,
    /// Timed repetitions per shape (the fastest is kept).
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..))]
    pub runs: u32,
}

/// `--block-size`: one of bitsandbytes' 4-bit block sizes.
fn block_size(text: &str) -> Result<usize, String> {
    let size: usize = text
        .parse()
        .map_err(|_| format!("`{text}` is not a count"))?;
    match crate::config::method::block_size_problem(size) {
        Some(message) => Err(message),
        None => Ok(size),
    }
}

/// One distinct weight shape.
#[derive(Debug, Serialize)]
struct ShapeRow {
    shape: [usize; 2],
    /// Decoder linears of this shape in the model.
    layers: usize,
    quantize_ms: f64,
    quantize_one_thread_ms: f64,
    dequantize_ms: f64,
    dequantize_one_thread_ms: f64,
}

#[derive(Debug, Serialize)]
struct QuantizeBench {
    config: String,
    quant_type: String,
    double_quant: bool,
    block_size: usize,
    threads: usize,
    quantized_values: u64,
    rows: Vec<ShapeRow>,
    /// The whole model's base weights, from the rows times their layer counts.
    quantize_s: f64,
    quantize_one_thread_s: f64,
    dequantize_s: f64,
    dequantize_one_thread_s: f64,
    command: String,
}

/// `count` bell-shaped values around 0 (scale 0.02, a trained linear's order), from `seed`.
fn weights(count: usize, seed: u64) -> Vec<f32> {
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    (0..count)
        .map(|_| {
            let sum: f32 = (0..4).map(|_| rng.random::<f32>()).sum();
            (sum - 2.0) * 0.035
        })
        .collect()
}

/// The fastest of `runs` timings of `work`, in milliseconds, and its last result.
fn fastest<T>(runs: u32, mut work: impl FnMut() -> T) -> (f64, T) {
    let mut best = f64::INFINITY;
    let mut last = None;
    for _ in 0..runs.max(1) {
        let started = Instant::now();
        let value = work();
        best = best.min(started.elapsed().as_secs_f64() * 1e3);
        last = Some(value);
    }
    (best, last.expect("at least one run"))
}

fn bench(args: &BenchQuantizeArgs) -> Result<QuantizeBench, String> {
    let path = &args.config;
    let (config, _) = read_config(path).map_err(|e| e.to_string())?;
    let quant_type = QuantType::from_name(&args.quant_type).ok_or_else(|| {
        format!(
            "--quant-type {}: expected nf4 or fp4",
            args.quant_type.as_str()
        )
    })?;
    let quant = QuantConfig {
        quant_type,
        double_quant: args.double_quant,
        block_size: args.block_size,
    };
    let mut shapes: Vec<([usize; 2], usize)> = Vec::new();
    for layer in config.linear_layers() {
        let shape = [layer.out_features, layer.in_features];
        if !is_quantized_linear(&format!("{}.weight", layer.path), &shape) {
            continue;
        }
        match shapes.iter_mut().find(|(s, _)| *s == shape) {
            Some((_, count)) => *count += 1,
            None => shapes.push((shape, 1)),
        }
    }
    if shapes.is_empty() {
        return Err(format!(
            "{}: no decoder linear layer is quantized for this architecture",
            path.display()
        ));
    }
    let one_thread = rayon::ThreadPoolBuilder::new()
        .num_threads(1)
        .build()
        .map_err(|e| format!("starting a one-thread pool: {e}"))?;
    let mut rows = Vec::new();
    for (index, &(shape, layers)) in shapes.iter().enumerate() {
        crate::report::write_stderr(&format!(
            "quantizing {} × {} ({layers} layers) …",
            shape[0], shape[1]
        ));
        // As the loader hands it over: a bf16 weight on the host.
        let weight = Tensor::from_vec(
            weights(shape[0] * shape[1], index as u64),
            (shape[0], shape[1]),
            &Device::Cpu,
        )
        .and_then(|weight| weight.to_dtype(DType::BF16))
        .map_err(|e| format!("generating a {shape:?} weight: {e}"))?;
        let quantize = || QuantizedTensor::from_tensor(&weight, &quant);
        let (quantize_ms, all) = fastest(args.runs, quantize);
        let (quantize_one_thread_ms, one) = one_thread.install(|| fastest(args.runs, quantize));
        let (all, one) = (
            all.map_err(|e| e.to_string())?,
            one.map_err(|e| e.to_string())?,
        );
        if all.packed != one.packed || all.absmax_f32() != one.absmax_f32() {
            return Err(format!(
                "{shape:?}: the parallel quantization differs from the one-thread one"
            ));
        }
        let (dequantize_ms, back) = fastest(args.runs, || all.dequantize_f32());
        let (dequantize_one_thread_ms, back_one) =
            one_thread.install(|| fastest(args.runs, || all.dequantize_f32()));
        if back
            .iter()
            .map(|v| v.to_bits())
            .ne(back_one.iter().map(|v| v.to_bits()))
        {
            return Err(format!(
                "{shape:?}: the parallel dequantization differs from the one-thread one"
            ));
        }
        rows.push(ShapeRow {
            shape,
            layers,
            quantize_ms,
            quantize_one_thread_ms,
            dequantize_ms,
            dequantize_one_thread_ms,
        });
    }
    let total = |pick: fn(&ShapeRow) -> f64| -> f64 {
        rows.iter().map(|r| pick(r) * r.layers as f64).sum::<f64>() / 1e3
    };
    Ok(QuantizeBench {
        config: path.display().to_string(),
        quant_type: quant_type.name().to_string(),
        double_quant: args.double_quant,
        block_size: args.block_size,
        threads: rayon::current_num_threads(),
        quantized_values: shapes.iter().map(|(s, n)| (s[0] * s[1] * n) as u64).sum(),
        quantize_s: total(|r| r.quantize_ms),
        quantize_one_thread_s: total(|r| r.quantize_one_thread_ms),
        dequantize_s: total(|r| r.dequantize_ms),
        dequantize_one_thread_s: total(|r| r.dequantize_one_thread_ms),
        rows,
        command: format!(
            "peftpipe bench quantize --config {} --quant-type {} --double-quant {} --block-size {} --runs {}",
            path.display(),
            args.quant_type,
            args.double_quant,
            args.block_size,
            args.runs
        ),
    })
}

fn render(report: &QuantizeBench) -> String {
    let mut text = format!(
        "4-bit quantization of {} ({} base values), {} threads vs 1\n",
        report.config, report.quantized_values, report.threads
    );
    text.push_str("  shape            layers  quantize ms (1 thread)  dequantize ms (1 thread)\n");
    for row in &report.rows {
        text.push_str(&format!(
            "  {:>6} × {:<6}  {:>6}  {:>8.1} ({:>8.1})  {:>8.1} ({:>8.1})\n",
            row.shape[0],
            row.shape[1],
            row.layers,
            row.quantize_ms,
            row.quantize_one_thread_ms,
            row.dequantize_ms,
            row.dequantize_one_thread_ms
        ));
    }
    let ratio = |a: f64, b: f64| if a > 0.0 { b / a } else { 0.0 };
    text.push_str(&format!(
        "  whole model: quantize {:.2} s ({:.2} s on 1 thread, {:.1}×), dequantize {:.2} s ({:.2} s, {:.1}×)\n",
        report.quantize_s,
        report.quantize_one_thread_s,
        ratio(report.quantize_s, report.quantize_one_thread_s),
        report.dequantize_s,
        report.dequantize_one_thread_s,
        ratio(report.dequantize_s, report.dequantize_one_thread_s),
    ));
    text.push_str(&format!("  ({})", report.command));
    text
}

pub fn run(global: &GlobalArgs, args: BenchQuantizeArgs) -> u8 {
    match bench(&args) {
        Ok(report) => {
            if global.json {
                crate::report::json(&report);
            } else {
                crate::report::write_stdout(&render(&report));
            }
            EXIT_OK
        }
        Err(message) => {
            crate::report::error(&message);
            EXIT_FAILED
        }
    }
}
