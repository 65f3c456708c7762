//! The CUDA path of the 4-bit quantized linear (`kernels/nf4.cu`, built with `--features cuda`)
//! against its CPU reference (`peftpipe::quant`, bit-exact with bitsandbytes), on fresh random
//! weights and inputs every run: the dequantization kernel must equal the CPU bit for bit in f32,
//! bf16 and f16, plain and double-quantized absmax, odd sizes and partial blocks; the frozen
//! linear's forward and input gradient must match within GEMM rounding. A non-finite value
//! anywhere fails. Without a CUDA build or a visible GPU every test prints why and passes.
#![expect(
    clippy::print_stderr,
    reason = "tests print skip reasons and measured errors"
)]

use candle_core::{DType, Device, Result, Tensor, Var};
use peftpipe::quant::{quantized_linear, QuantConfig, QuantType, QuantizedTensor, QuantizedWeight};

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
    // 7 × 45: an odd count and a partial last block; 96 × 2752: over 256 blocks (several
    // nested blocks when double-quantized).
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
