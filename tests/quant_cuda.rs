//! The CUDA path of the 4-bit quantized linear (`kernels/nf4.cu`, built with `--features cuda`)
//! against its CPU reference (`peftpipe::quant`, bit-exact with bitsandbytes), on fresh random
//! weights and inputs every run: the dequantization kernel must equal the CPU bit for bit in f32,
//! bf16 and f16, plain and double-quantized absmax, odd sizes and partial blocks; the frozen
//! linear's forward and input gradient must match within GEMM rounding, on both GEMM paths
//! (the fused dequantize + GEMM kernel and dequantize + cuBLAS). A non-finite value anywhere
//! fails. Without a CUDA build or a visible GPU every test prints why and passes.
//!
//! `fused_and_dequantize_timings` (ignored) is the measurement hook for choosing between the two
//! paths: `cargo test --features cuda --release --test quant_cuda -- --ignored --nocapture`.
#![expect(
    clippy::print_stderr,
    reason = "tests print skip reasons and measured errors"
)]

use candle_core::{DType, Device, Result, Tensor, Var};
use peftpipe::quant::{
    quantized_linear, quantized_linear_with, QuantConfig, QuantGemm, QuantType, QuantizedTensor,
    QuantizedWeight,
};

fn gpu() -> Option<Device> {
    if !peftpipe::device::built_with_cuda() || !candle_core::utils::cuda_is_available() {
        eprintln!("skipped: not a CUDA build, or no GPU visible");
        return None;
    }
    Some(Device::new_cuda(0).expect("CUDA device 0"))
}

/// Fresh normal values (candle's CPU generator is seeded from the OS: new inputs every run).
fn random(shape: &[usize], scale: f64) -> Result<Tensor> {
    Tensor::randn(0f32, scale as f32, shape, &Device::Cpu)
}

fn values(t: &Tensor) -> Result<Vec<f32>> {
    t.to_device(&Device::Cpu)?
        .to_dtype(DType::F32)?
        .flatten_all()?
        .to_vec1::<f32>()
}

fn all_finite(name: &str, values: &[f32]) {
    let bad = values.iter().filter(|v| !v.is_finite()).count();
    assert_eq!(bad, 0, "{name}: {bad} non-finite values");
}

fn configs() -> Vec<QuantConfig> {
    let mut configs = Vec::new();
    for quant_type in [QuantType::Nf4, QuantType::Fp4] {
        for double_quant in [false, true] {
            for block_size in [64, 128] {
                configs.push(QuantConfig {
                    quant_type,
                    block_size,
                    double_quant,
                });
            }
        }
    }
    configs
}

#[test]
fn dequantize_kernel_equals_the_cpu_reference_bit_for_bit() -> Result<()> {
    let Some(device) = gpu() else { return Ok(()) };
    // 7 × 45: an odd count and a partial last block (the kernel's 8-value and 2-value loops both
    // run); 96 × 2752: over 256 blocks (several nested blocks when double-quantized).
    for shape in [[7usize, 45], [96, 2752]] {
        let weight = random(&shape, 0.02)?;
        for config in configs() {
            let quantized = QuantizedTensor::from_tensor(&weight, &config)?;
            let cpu = QuantizedWeight::new(&quantized, &Device::Cpu)?;
            let cuda = QuantizedWeight::new(&quantized, &device)?;
            for dtype in [DType::F32, DType::BF16, DType::F16] {
                let expected = values(&cpu.dequantize(dtype)?)?;
                let got = values(&cuda.dequantize(dtype)?)?;
                all_finite("dequantized", &got);
                let differing = expected
                    .iter()
                    .zip(&got)
                    .filter(|(a, b)| a.to_bits() != b.to_bits())
                    .count();
                assert_eq!(
                    differing, 0,
                    "{shape:?} {config:?} {dtype:?}: {differing} values differ from the CPU"
                );
            }
            // The host copy survives the round trip to the GPU unchanged.
            assert_eq!(cuda.to_host()?, quantized);
        }
    }
    Ok(())
}

fn max_relative(expected: &[f32], got: &[f32]) -> f32 {
    let scale = expected.iter().fold(0f32, |m, v| m.max(v.abs())).max(1e-6);
    expected
        .iter()
        .zip(got)
        .map(|(a, b)| (a - b).abs() / scale)
        .fold(0f32, f32::max)
}

#[test]
fn quantized_linear_forward_and_input_gradient_match_the_cpu() -> Result<()> {
    let Some(device) = gpu() else { return Ok(()) };
    let (out_features, in_features) = (384, 512);
    let weight = random(&[out_features, in_features], 0.02)?;
    let quantized = QuantizedTensor::from_tensor(&weight, &QuantConfig::default())?;
    let cpu_weight = QuantizedWeight::new(&quantized, &Device::Cpu)?;
    let cuda_weight = QuantizedWeight::new(&quantized, &device)?;
    let bias = random(&[out_features], 0.1)?;
    for (dtype, tolerance) in [(DType::F32, 1e-4f32), (DType::BF16, 2e-2)] {
        let x = random(&[2, 9, in_features], 1.0)?.to_dtype(dtype)?;
        let upstream = random(&[2, 9, out_features], 1.0)?.to_dtype(dtype)?;
        let run = |device: &Device, weight: &QuantizedWeight| -> Result<(Vec<f32>, Vec<f32>)> {
            let x = Var::from_tensor(&x.to_device(device)?)?;
            let bias = bias.to_device(device)?.to_dtype(dtype)?;
            let y = quantized_linear(x.as_tensor(), weight, Some(&bias))?;
            let loss = (&y * &upstream.to_device(device)?)?.sum_all()?;
            let grads = loss.backward()?;
            let dx = grads.get(x.as_tensor()).expect("the input has a gradient");
            Ok((values(&y)?, values(dx)?))
        };
        let (y_cpu, dx_cpu) = run(&Device::Cpu, &cpu_weight)?;
        let (y_gpu, dx_gpu) = run(&device, &cuda_weight)?;
        all_finite("forward", &y_gpu);
        all_finite("input gradient", &dx_gpu);
        let (forward, backward) = (max_relative(&y_cpu, &y_gpu), max_relative(&dx_cpu, &dx_gpu));
        eprintln!("{dtype:?}: forward max rel |Δ| {forward:e}, input gradient {backward:e}");
        assert!(forward <= tolerance, "{dtype:?} forward: {forward}");
        assert!(
            backward <= tolerance,
            "{dtype:?} input gradient: {backward}"
        );
    }
    Ok(())
}

/// QLoRA's layer: `ops::low_rank_linear` over a 4-bit base (`models::QuantizedLinearWeights` as
/// the frozen map). With more rows than the fused kernel takes, the CUDA path writes the update
/// first and adds the dequantized product into it inside cuBLAS (`FrozenMap::accumulates`); the
/// output and the gradients of `x`, `A` and `B` must match the CPU's composition in f32.
#[test]
fn low_rank_linear_over_a_4_bit_base_matches_the_cpu() -> Result<()> {
    let Some(device) = gpu() else { return Ok(()) };
    let (out_features, in_features, rank) = (192, 256, 16);
    let weight = random(&[out_features, in_features], 0.02)?;
    let quantized = QuantizedTensor::from_tensor(&weight, &QuantConfig::default())?;
    let (a, b) = (
        random(&[rank, in_features], 0.1)?,
        random(&[out_features, rank], 0.1)?,
    );
    // 2 × 70 rows: above FUSED_MAX_ROWS, so the dequantize + cuBLAS path.
    let x = random(&[2, 70, in_features], 1.0)?;
    let upstream = random(&[2, 70, out_features], 1.0)?;
    let run = |device: &Device, dtype: DType| -> Result<Vec<Vec<f32>>> {
        let base = peftpipe::models::QuantizedLinearWeights {
            weight: QuantizedWeight::new(&quantized, device)?,
            bias: None,
            compute_dtype: dtype,
        };
        let rows = 2 * 70;
        eprintln!(
            "{device:?} {dtype:?}: the base accumulates into the update: {}",
            peftpipe::ops::FrozenMap::accumulates(&base, rows, dtype)
        );
        let x = Var::from_tensor(&x.to_dtype(dtype)?.to_device(device)?)?;
        let (a, b) = (
            Var::from_tensor(&a.to_device(device)?)?,
            Var::from_tensor(&b.to_device(device)?)?,
        );
        let y = peftpipe::ops::low_rank_linear(
            x.as_tensor(),
            std::sync::Arc::new(base),
            (a.as_tensor(), b.as_tensor()).into(),
            2.0,
            None,
        )?;
        let loss = (y.to_dtype(DType::F32)? * upstream.to_device(device)?)?.sum_all()?;
        let grads = loss.backward()?;
        let mut out = vec![values(&y)?];
        for v in [x.as_tensor(), a.as_tensor(), b.as_tensor()] {
            out.push(values(grads.get(v).expect("every input has a gradient"))?);
        }
        Ok(out)
    };
    let reference = run(&Device::Cpu, DType::F32)?;
    for (dtype, tolerance) in [(DType::F32, 1e-4f32), (DType::BF16, 3e-2)] {
        let got = run(&device, dtype)?;
        for (name, (want, got)) in ["forward", "dx", "dA", "dB"]
            .iter()
            .zip(reference.iter().zip(&got))
        {
            all_finite(name, got);
            let error = max_relative(want, got);
            eprintln!("{dtype:?} {name}: max rel |Δ| {error:e}");
            assert!(error <= tolerance, "{dtype:?} {name}: {error}");
        }
    }
    Ok(())
}

#[test]
fn an_eval_forward_on_the_gpu_builds_no_graph() -> Result<()> {
    let Some(device) = gpu() else { return Ok(()) };
    let weight = random(&[64, 128], 0.02)?;
    let quantized = QuantizedTensor::from_tensor(&weight, &QuantConfig::default())?;
    let cuda_weight = QuantizedWeight::new(&quantized, &device)?;
    let x = random(&[4, 128], 1.0)?
        .to_dtype(DType::BF16)?
        .to_device(&device)?;
    let y = quantized_linear(&x, &cuda_weight, None)?;
    assert!(!y.track_op());
    all_finite("forward", &values(&y)?);
    Ok(())
}

/// Element-wise check of a 16-bit GPU result against an `f32` reference computed from the same
/// 16-bit inputs and weights: `|got - ref| <= rel·|ref| + abs·max|ref|`. `rel` is twice the
/// dtype's half-ulp (bf16 2⁻⁸, f16 2⁻¹⁰): the output is rounded once from an `f32` sum; `abs`
/// leaves room for the summation order of `f32` accumulation (orders of magnitude smaller).
fn assert_in_band(name: &str, dtype: DType, expected: &[f32], got: &[f32]) {
    all_finite(name, got);
    assert_eq!(expected.len(), got.len(), "{name}: sizes");
    let (rel, abs) = match dtype {
        DType::BF16 => (2f32.powi(-8), 2f32.powi(-10)),
        DType::F16 => (2f32.powi(-10), 2f32.powi(-12)),
        other => panic!("{name}: unexpected dtype {other:?}"),
    };
    let max = expected.iter().fold(0f32, |m, v| m.max(v.abs()));
    assert!(max > 0.0, "{name}: an all-zero reference tests nothing");
    let mut worst = (0usize, 0f32);
    for (index, (e, g)) in expected.iter().zip(got).enumerate() {
        let excess = (e - g).abs() - (rel * e.abs() + abs * max);
        if excess > worst.1 {
            worst = (index, excess);
        }
    }
    let (index, excess) = worst;
    assert!(
        excess <= 0.0,
        "{name}: value {index} is {} for a reference of {} (max |ref| {max})",
        got[index],
        expected[index]
    );
}

/// `(y, dx)` of `x·dequant(W)ᵀ` and of the upstream gradient `dy` through it, on the GPU on
/// GEMM path `gemm` (autograd: `loss = Σ y ⊙ dy`, so the op's backward receives `dy` exactly).
fn gpu_forward_backward(
    device: &Device,
    weight: &QuantizedWeight,
    x: &Tensor,
    dy: &Tensor,
    gemm: QuantGemm,
) -> Result<(Vec<f32>, Vec<f32>)> {
    let x = Var::from_tensor(&x.to_device(device)?)?;
    let y = quantized_linear_with(x.as_tensor(), weight, None, gemm)?;
    let loss = (&y * &dy.to_device(device)?)?.sum_all()?;
    let grads = loss.backward()?;
    let dx = grads.get(x.as_tensor()).expect("the input has a gradient");
    Ok((values(&y)?, values(dx)?))
}

/// The CPU reference in `f32` over the same 16-bit values: `x·Wᵀ` and `dy·W` with `W` the CPU
/// dequantization to `dtype` (bit-equal to the GPU's, see the first test).
fn cpu_reference(
    quantized: &QuantizedTensor,
    dtype: DType,
    x: &Tensor,
    dy: &Tensor,
) -> Result<(Vec<f32>, Vec<f32>)> {
    let cpu = QuantizedWeight::new(quantized, &Device::Cpu)?;
    let w = cpu.dequantize(dtype)?.to_dtype(DType::F32)?;
    let x = x.to_dtype(DType::F32)?;
    let dy = dy.to_dtype(DType::F32)?;
    // `broadcast_matmul`: the inputs may be `[batch, tokens, features]`.
    Ok((
        values(&x.broadcast_matmul(&w.t()?)?)?,
        values(&dy.broadcast_matmul(&w)?)?,
    ))
}

#[test]
fn fused_kernel_forward_and_input_gradient_match_the_cpu_reference() -> Result<()> {
    let Some(device) = gpu() else { return Ok(()) };
    // (out, in, block): partial column tiles (200, 97 = 6·32 + 8, 3·32 + 1), the backward's
    // reduction tail (200 % 64 = 8; 97: odd, so the gradient rows are read element by element),
    // several reduction steps, and blocks of 128 / 32 (a 128-block spans two rows when in = 192).
    let shapes = [
        (200usize, 192usize, 64usize),
        (97, 128, 64),
        (97, 192, 128),
        (200, 256, 32),
    ];
    // 1 and 7: the 16-row tile; 37, 100: the 64-row tile, partial row tiles.
    let rows_list = [1usize, 7, 37, 100];
    for (out_features, in_features, block_size) in shapes {
        let weight = random(&[out_features, in_features], 0.02)?;
        for quant_type in [QuantType::Nf4, QuantType::Fp4] {
            for double_quant in [false, true] {
                let config = QuantConfig {
                    quant_type,
                    block_size,
                    double_quant,
                };
                let quantized = QuantizedTensor::from_tensor(&weight, &config)?;
                let cuda = QuantizedWeight::new(&quantized, &device)?;
                for dtype in [DType::BF16, DType::F16] {
                    for rows in rows_list {
                        let x = random(&[rows, in_features], 1.0)?.to_dtype(dtype)?;
                        let dy = random(&[rows, out_features], 1.0)?.to_dtype(dtype)?;
                        let (y_ref, dx_ref) = cpu_reference(&quantized, dtype, &x, &dy)?;
                        let (y, dx) =
                            gpu_forward_backward(&device, &cuda, &x, &dy, QuantGemm::Fused)?;
                        let case = format!(
                            "{out_features}×{in_features} block {block_size} {config:?} {dtype:?} \
                             rows {rows}"
                        );
                        assert_in_band(&format!("forward {case}"), dtype, &y_ref, &y);
                        assert_in_band(&format!("input gradient {case}"), dtype, &dx_ref, &dx);
                    }
                }
            }
        }
    }
    Ok(())
}

#[test]
fn fused_kernel_matches_the_cpu_on_a_layer_sized_weight() -> Result<()> {
    let Some(device) = gpu() else { return Ok(()) };
    // 16 reduction steps forward, many column tiles, three-dimensional inputs (batch × tokens).
    let (out_features, in_features) = (1000, 1024);
    let weight = random(&[out_features, in_features], 0.02)?;
    let quantized = QuantizedTensor::from_tensor(&weight, &QuantConfig::default())?;
    let cuda = QuantizedWeight::new(&quantized, &device)?;
    for dtype in [DType::BF16, DType::F16] {
        for (batch, tokens) in [(1usize, 1usize), (2, 9), (3, 43)] {
            let x = random(&[batch, tokens, in_features], 1.0)?.to_dtype(dtype)?;
            let dy = random(&[batch, tokens, out_features], 1.0)?.to_dtype(dtype)?;
            let (y_ref, dx_ref) = cpu_reference(&quantized, dtype, &x, &dy)?;
            let (y, dx) = gpu_forward_backward(&device, &cuda, &x, &dy, QuantGemm::Fused)?;
            let case = format!("{dtype:?} {batch}×{tokens}");
            assert_in_band(&format!("forward {case}"), dtype, &y_ref, &y);
            assert_in_band(&format!("input gradient {case}"), dtype, &dx_ref, &dx);
        }
    }
    Ok(())
}

#[test]
fn an_explicit_fused_request_the_kernel_cannot_serve_is_an_error() -> Result<()> {
    let Some(device) = gpu() else { return Ok(()) };
    // f32 activations, and in_features not a multiple of 64.
    for (dtype, in_features) in [(DType::F32, 128usize), (DType::BF16, 96)] {
        let weight = random(&[32, in_features], 0.02)?;
        let quantized = QuantizedTensor::from_tensor(&weight, &QuantConfig::default())?;
        let cuda = QuantizedWeight::new(&quantized, &device)?;
        assert!(cuda.fused_unsupported(dtype, 4).is_some());
        let x = random(&[4, in_features], 1.0)?
            .to_dtype(dtype)?
            .to_device(&device)?;
        let error = quantized_linear_with(&x, &cuda, None, QuantGemm::Fused)
            .expect_err("the fused kernel cannot take this product");
        assert!(
            error.to_string().contains("fused kernel cannot run"),
            "{error}"
        );
        // Auto falls back to dequantize + cuBLAS.
        all_finite(
            "auto fallback",
            &values(&quantized_linear_with(&x, &cuda, None, QuantGemm::Auto)?)?,
        );
    }
    Ok(())
}

/// Median seconds of `run` over `repeats` calls after two warm-ups, synchronising the device.
fn median_seconds(
    device: &Device,
    repeats: usize,
    mut run: impl FnMut() -> Result<Tensor>,
) -> Result<f64> {
    for _ in 0..2 {
        run()?;
    }
    device.synchronize()?;
    let mut times = Vec::with_capacity(repeats);
    for _ in 0..repeats {
        let start = std::time::Instant::now();
        let out = run()?;
        device.synchronize()?;
        times.push(start.elapsed().as_secs_f64());
        drop(out);
    }
    times.sort_by(f64::total_cmp);
    Ok(times[times.len() / 2])
}

/// Forward and input-gradient times of the fused kernel and of dequantize + cuBLAS on the
/// Llama-3.2-1B and Llama-3.1-8B linear shapes (NF4, double quant, bf16), for choosing
/// `FUSED_MAX_ROWS`. Prints; fails only if the two paths disagree beyond bf16 rounding.
#[test]
#[ignore = "measurement: run on a GPU with --ignored --nocapture"]
fn fused_and_dequantize_timings() -> Result<()> {
    let Some(device) = gpu() else { return Ok(()) };
    let shapes = [
        ("1B q/o", 2048usize, 2048usize),
        ("1B gate/up", 8192, 2048),
        ("1B down", 2048, 8192),
        ("8B q/o", 4096, 4096),
        ("8B gate/up", 14336, 4096),
        ("8B down", 4096, 14336),
    ];
    eprintln!("shape rows | forward fused / dequant µs | input gradient fused / dequant µs");
    for (name, out_features, in_features) in shapes {
        let weight = random(&[out_features, in_features], 0.02)?;
        let quantized = QuantizedTensor::from_tensor(&weight, &QuantConfig::default())?;
        let cuda = QuantizedWeight::new(&quantized, &device)?;
        for rows in [1usize, 16, 64, 256, 1024, 4096] {
            let x = random(&[rows, in_features], 1.0)?
                .to_dtype(DType::BF16)?
                .to_device(&device)?;
            let dy = random(&[rows, out_features], 1.0)?
                .to_dtype(DType::BF16)?
                .to_device(&device)?;
            let x_var = Var::from_tensor(&x)?;
            let mut forward = [0f64; 2];
            let mut backward = [0f64; 2];
            let mut results = Vec::new();
            for (slot, gemm) in [QuantGemm::Fused, QuantGemm::Dequantize]
                .into_iter()
                .enumerate()
            {
                forward[slot] =
                    median_seconds(&device, 10, || quantized_linear_with(&x, &cuda, None, gemm))?;
                // The backward of `Σ y ⊙ dy` minus its forward: the input-gradient GEMM (plus
                // the elementwise product and sum, the same for both paths).
                let step = median_seconds(&device, 10, || {
                    let y = quantized_linear_with(x_var.as_tensor(), &cuda, None, gemm)?;
                    let grads = (&y * &dy)?.sum_all()?.backward()?;
                    Ok(grads
                        .get(x_var.as_tensor())
                        .expect("the input has a gradient")
                        .clone())
                })?;
                backward[slot] = (step - forward[slot]).max(0.0);
                let y = quantized_linear_with(&x, &cuda, None, gemm)?;
                results.push(values(&y)?);
            }
            let dequantized = &results[1];
            all_finite("dequantize + cuBLAS", dequantized);
            // Both multiply the same bf16 weights: agree within two bf16 roundings.
            let max = dequantized.iter().fold(0f32, |m, v| m.max(v.abs()));
            for (index, (a, b)) in dequantized.iter().zip(&results[0]).enumerate() {
                assert!(
                    (a - b).abs() <= 2f32.powi(-7) * a.abs() + 2f32.powi(-9) * max,
                    "{name} rows {rows} value {index}: fused {b}, dequantize {a}"
                );
            }
            eprintln!(
                "{name} {rows} | {:.1} / {:.1} | {:.1} / {:.1}",
                forward[0] * 1e6,
                forward[1] * 1e6,
                backward[0] * 1e6,
                backward[1] * 1e6
            );
        }
    }
    Ok(())
}
