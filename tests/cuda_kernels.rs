//! peftpipe's fused CUDA kernels (`ops::cuda`, built with `--features cuda`) against their CPU
//! references (the candle compositions in `peftpipe::ops` and the tensor-op AdamW), forward and
//! backward, on fresh random inputs every run, in bf16 and f32. A non-finite value anywhere fails.
//! Without a CUDA build or a visible GPU every test prints why and passes.
#![expect(
    clippy::print_stderr,
    reason = "tests print skip reasons and measured errors"
)]

use candle_core::{DType, Device, Result, Tensor, Var};
use peftpipe::ops;
use peftpipe::ops::flash::TensorCoreKernels;
use peftpipe::train::{AdamW, AdamWSettings};

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

/// max |a − b| / max(|reference|, floor); panics on any non-finite value of `got`.
fn relative_error(what: &str, got: &Tensor, reference: &Tensor) -> Result<f32> {
    let got = values(got)?;
    let reference = values(reference)?;
    assert_eq!(got.len(), reference.len(), "{what}: sizes differ");
    assert!(
        got.iter().all(|v| v.is_finite()),
        "{what}: the CUDA result has a non-finite value"
    );
    let scale = reference.iter().fold(0f32, |m, v| m.max(v.abs())).max(1e-6);
    let worst = got
        .iter()
        .zip(&reference)
        .fold(0f32, |m, (a, b)| m.max((a - b).abs()));
    Ok(worst / scale)
}

/// The bf16 band: a few bf16 ulps of the largest value; f32: accumulation-order noise.
fn tolerance(dtype: DType) -> f32 {
    match dtype {
        DType::BF16 => 3e-2,
        DType::F16 => 5e-3,
        _ => 1e-4,
    }
}

/// Runs `f` on the CPU in f32 (the reference, on inputs rounded to `dtype` first) and on the GPU
/// in `dtype`; compares the output and the gradient of every input under `Σ r·f(x)`.
fn compare(
    name: &str,
    gpu: &Device,
    dtype: DType,
    inputs: &[Tensor],
    f: &dyn Fn(&[Tensor]) -> Result<Tensor>,
) -> Result<()> {
    let run = |device: &Device, compute: DType| -> Result<(Tensor, Vec<Tensor>)> {
        let vars = inputs
            .iter()
            .map(|t| {
                let rounded = t.to_dtype(dtype)?.to_dtype(compute)?;
                Var::from_tensor(&rounded.to_device(device)?)
            })
            .collect::<Result<Vec<_>>>()?;
        let tensors: Vec<Tensor> = vars.iter().map(|v| v.as_tensor().clone()).collect();
        let output = f(&tensors)?;
        let projection = projection(output.dims())?.to_device(device)?;
        let loss = (output.to_dtype(DType::F32)? * projection)?.sum_all()?;
        let grads = loss.backward()?;
        let gradients = vars
            .iter()
            .map(|v| {
                grads.get(v.as_tensor()).cloned().ok_or_else(|| {
                    candle_core::Error::Msg(format!("{name}: an input got no gradient"))
                })
            })
            .collect::<Result<Vec<_>>>()?;
        Ok((output, gradients))
    };
    let (reference, reference_grads) = run(&Device::Cpu, DType::F32)?;
    let (output, grads) = run(gpu, dtype)?;
    let limit = tolerance(dtype);
    let error = relative_error(&format!("{name} forward"), &output, &reference)?;
    eprintln!("{name} {dtype:?}: forward max rel. error {error:.2e} (limit {limit:.0e})");
    assert!(error < limit, "{name} {dtype:?} forward: {error:e}");
    for (index, (grad, reference)) in grads.iter().zip(&reference_grads).enumerate() {
        let error = relative_error(&format!("{name} gradient {index}"), grad, reference)?;
        eprintln!("{name} {dtype:?}: gradient of input {index} max rel. error {error:.2e}");
        assert!(
            error < limit,
            "{name} {dtype:?} gradient {index}: {error:e}"
        );
    }
    Ok(())
}

/// A fixed-seed-free projection: random too, but the same on both devices.
fn projection(shape: &[usize]) -> Result<Tensor> {
    thread_local! {
        static CACHE: std::cell::RefCell<Vec<(Vec<usize>, Tensor)>> = const { std::cell::RefCell::new(Vec::new()) };
    }
    CACHE.with(|cache| {
        let mut cache = cache.borrow_mut();
        if let Some((_, t)) = cache.iter().find(|(s, _)| s == shape) {
            return Ok(t.clone());
        }
        let t = random(shape, 1.0)?;
        cache.push((shape.to_vec(), t.clone()));
        Ok(t)
    })
}

#[test]
fn rms_norm_matches_the_cpu_reference() -> Result<()> {
    let Some(gpu) = gpu() else { return Ok(()) };
    for dtype in [DType::BF16, DType::F32] {
        // 16-byte accesses (2048, 1000: multiples of 8 values) and one value at a time (1001).
        for (shape, cols) in [
            (vec![3, 5, 2048], 2048),
            (vec![7, 1000], 1000),
            (vec![4, 1001], 1001),
        ] {
            let x = random(&shape, 2.0)?;
            let weight = (random(&[cols], 0.3)? + 1.0)?.to_dtype(dtype)?;
            compare("rms_norm", &gpu, dtype, &[x], &|t| {
                ops::rms_norm(
                    &t[0],
                    &weight.to_device(t[0].device())?.to_dtype(t[0].dtype())?,
                    1e-5,
                )
            })?;
        }
    }
    Ok(())
}

#[test]
fn rope_with_llama3_scaling_matches_the_cpu_reference() -> Result<()> {
    let Some(gpu) = gpu() else { return Ok(()) };
    let scaling = ops::RopeScaling::Llama3 {
        factor: 32.0,
        low_freq_factor: 1.0,
        high_freq_factor: 4.0,
        original_max_position_embeddings: 8192.0,
    };
    // Left padding gives rows their own positions.
    let positions = vec![
        (0..37u32).collect::<Vec<_>>(),
        (0..37u32).map(|p| p.saturating_sub(5) + 1000).collect(),
    ];
    // Head dim 64: the kernel's 16-byte path; 12 (6 pairs): one pair at a time.
    for head_dim in [64, 12] {
        let rotary = ops::RotaryEmbedding::new(head_dim, 500000.0, Some(&scaling))?;
        for dtype in [DType::BF16, DType::F32] {
            let q = random(&[2, 4, 37, head_dim], 1.0)?;
            let k = random(&[2, 2, 37, head_dim], 1.0)?;
            compare("rope(q, k)", &gpu, dtype, &[q, k], &|t| {
                let (cos, sin) = rotary.tables(&positions, t[0].device(), t[0].dtype())?;
                let q = ops::apply_rope(&t[0], &cos, &sin)?;
                let k = ops::apply_rope(&t[1], &cos, &sin)?;
                Tensor::cat(&[q.flatten_all()?, k.flatten_all()?], 0)
            })?;
        }
    }
    Ok(())
}

/// With a bias the update is accumulated into the frozen output (a rank-r GEMM, `β = 1`);
/// without one, on CUDA, the frozen product is added into the update by its own GEMM
/// (`FrozenMap::accumulates`, `PEFTPIPE_UNFUSED=base_accumulate` switches it off).
#[test]
fn low_rank_linear_matches_the_cpu_reference() -> Result<()> {
    let Some(gpu) = gpu() else { return Ok(()) };
    // A scale that is not a power of two: on CUDA it rides on cuBLAS's α (rounded once).
    let scale = 1.7;
    for with_bias in [true, false] {
        for dtype in [DType::BF16, DType::F32] {
            let weight = random(&[48, 64], 0.1)?;
            let bias = random(&[48], 0.1)?;
            let x = random(&[3, 5, 64], 1.0)?;
            let a = random(&[8, 64], 0.2)?;
            let b = random(&[48, 8], 0.2)?;
            let name = format!("low_rank_linear (bias: {with_bias})");
            compare(&name, &gpu, dtype, &[x, a, b], &|t| {
                let device = t[0].device();
                let bias = with_bias
                    .then(|| bias.to_device(device)?.to_dtype(t[0].dtype()))
                    .transpose()?;
                let base = std::sync::Arc::new(ops::DenseMap {
                    weight: weight.to_device(device)?.to_dtype(t[0].dtype())?,
                    bias,
                });
                ops::low_rank_linear(&t[0], base, (&t[1], &t[2]).into(), scale, None)
            })?;
        }
    }
    // f32 factors over a bf16 input (the trainer's case): A's and B's gradients come out in f32.
    let (weight, x) = (random(&[48, 64], 0.1)?, random(&[3, 5, 64], 1.0)?);
    let (a, b) = (random(&[8, 64], 0.2)?, random(&[48, 8], 0.2)?);
    let run = |device: &Device, dtype: DType| -> Result<Vec<Tensor>> {
        let x = x
            .to_dtype(DType::BF16)?
            .to_dtype(dtype)?
            .to_device(device)?;
        let (a, b) = (
            Var::from_tensor(&a.to_device(device)?)?,
            Var::from_tensor(&b.to_device(device)?)?,
        );
        let base = std::sync::Arc::new(ops::DenseMap {
            weight: weight
                .to_dtype(DType::BF16)?
                .to_dtype(dtype)?
                .to_device(device)?,
            bias: None,
        });
        let y = ops::low_rank_linear(&x, base, (a.as_tensor(), b.as_tensor()).into(), scale, None)?;
        let projection = projection(y.dims())?.to_device(device)?;
        let grads = (y.to_dtype(DType::F32)? * projection)?
            .sum_all()?
            .backward()?;
        [a.as_tensor(), b.as_tensor()]
            .iter()
            .map(|v| {
                grads.get(v).cloned().ok_or_else(|| {
                    candle_core::Error::Msg("low_rank_linear: a factor got no gradient".into())
                })
            })
            .collect()
    };
    let reference = run(&Device::Cpu, DType::F32)?;
    for (index, (got, want)) in run(&gpu, DType::BF16)?.iter().zip(&reference).enumerate() {
        assert_eq!(got.dtype(), DType::F32, "factor {index}'s gradient");
        let error = relative_error("low_rank_linear f32 factor gradient", got, want)?;
        eprintln!(
            "low_rank_linear bf16 input, f32 factor {index}: gradient max rel. error {error:.2e}"
        );
        assert!(error < tolerance(DType::BF16), "factor {index}: {error:e}");
    }
    Ok(())
}

#[test]
fn swiglu_matches_the_cpu_reference() -> Result<()> {
    let Some(gpu) = gpu() else { return Ok(()) };
    // 6,993 elements: the kernels' element-by-element path; 2,560: their 16-byte chunks.
    for shape in [[3usize, 7, 333], [2, 5, 256]] {
        for dtype in [DType::BF16, DType::F32] {
            let gate = random(&shape, 3.0)?;
            let up = random(&shape, 1.0)?;
            compare("swiglu", &gpu, dtype, &[gate, up], &|t| {
                ops::swiglu(&t[0], &t[1])
            })?;
        }
    }
    Ok(())
}

/// The down projection of a Llama MLP with LoRA (`ops::low_rank_swiglu_linear`): in bf16 with a
/// rank of 8, 16 or 32 its backward runs SwiGLU's backward and A's gradient as one kernel; f32
/// and rank 12 take the composition. All against the CPU reference.
#[test]
fn low_rank_swiglu_linear_matches_the_cpu_reference() -> Result<()> {
    let Some(gpu) = gpu() else { return Ok(()) };
    let scale = 1.7;
    for (rank, dtype) in [
        (16, DType::BF16),
        (8, DType::BF16),
        (32, DType::BF16),
        (12, DType::BF16),
        (16, DType::F32),
    ] {
        // 3 × 37 rows: not a multiple of the kernel's row blocks; 72 columns: of its 4-wide
        // column groups but not of a block's 512.
        let weight = random(&[40, 72], 0.1)?;
        let gate = random(&[3, 37, 72], 2.0)?;
        let up = random(&[3, 37, 72], 1.0)?;
        let a = random(&[rank, 72], 0.2)?;
        let b = random(&[40, rank], 0.2)?;
        let name = format!("low_rank_swiglu_linear r{rank}");
        compare(&name, &gpu, dtype, &[gate, up, a, b], &|t| {
            let device = t[0].device();
            let base = std::sync::Arc::new(ops::DenseMap {
                weight: weight.to_device(device)?.to_dtype(t[0].dtype())?,
                bias: None,
            });
            ops::low_rank_swiglu_linear(&t[0], &t[1], base, (&t[2], &t[3]).into(), scale, None)
        })?;
    }
    Ok(())
}

/// The fused kernel itself: SwiGLU's gradients bit for bit those of its own backward kernel, and
/// `tᵀ·(silu(gate)·up)` within f32 summation noise of the product of the forward kernel's output
/// (the same bf16 rounding), summed in f64 on the CPU; odd row counts and many row blocks.
#[test]
fn swiglu_backward_with_product_is_swiglus_backward_and_the_product() -> Result<()> {
    let Some(gpu) = gpu() else { return Ok(()) };
    for (rows, n, rank) in [
        (4099, 1028, 16),
        (515, 8192, 8),
        (1000, 520, 32),
        (1, 4, 16),
    ] {
        let bf16 = |shape: &[usize], scale: f64| -> Result<Tensor> {
            random(shape, scale)?.to_dtype(DType::BF16)?.to_device(&gpu)
        };
        let (gate, up, grad) = (
            bf16(&[rows, n], 3.0)?,
            bf16(&[rows, n], 1.0)?,
            bf16(&[rows, n], 1.0)?,
        );
        let t = bf16(&[rows, rank], 1.0)?;
        let (d_gate, d_up, product) = ops::swiglu_backward_with_product(&gate, &up, &grad, &t)?
            .expect("the fused kernel takes bf16 at this rank");
        assert_eq!(product.dtype(), DType::F32);
        assert_eq!(product.dims(), [rank, n]);
        let (want_gate, want_up) = ops::swiglu_backward(&gate, &up, &grad)?;
        let bits = |x: &Tensor| -> Result<Vec<u16>> {
            Ok(x.to_device(&Device::Cpu)?
                .flatten_all()?
                .to_vec1::<half::bf16>()?
                .iter()
                .map(|v| v.to_bits())
                .collect())
        };
        assert!(bits(&d_gate)? == bits(&want_gate)?, "d_gate {rows}×{n}");
        assert!(bits(&d_up)? == bits(&want_up)?, "d_up {rows}×{n}");
        let h = ops::swiglu(&gate, &up)?
            .to_device(&Device::Cpu)?
            .to_dtype(DType::F64)?;
        let t64 = t.to_device(&Device::Cpu)?.to_dtype(DType::F64)?;
        let want = t64.t()?.matmul(&h)?;
        let error = relative_error("tᵀ·h", &product, &want)?;
        eprintln!("swiglu_backward_with_product {rows}×{n} r{rank}: max rel. error {error:.2e}");
        assert!(error < 1e-5, "{rows}×{n} r{rank}: {error:e}");
    }
    let (gate, t) = (
        random(&[8, 64], 1.0)?
            .to_dtype(DType::BF16)?
            .to_device(&gpu)?,
        random(&[8, 12], 1.0)?
            .to_dtype(DType::BF16)?
            .to_device(&gpu)?,
    );
    assert!(
        ops::swiglu_backward_with_product(&gate, &gate, &gate, &t)?.is_none(),
        "rank 12"
    );
    Ok(())
}

/// Attention (GQA, causal + left-padding mask) through the fused masked softmax, q/k/v gradients.
#[test]
fn attention_masked_softmax_matches_the_cpu_reference() -> Result<()> {
    let Some(gpu) = gpu() else { return Ok(()) };
    let length = 37;
    let valid = vec![
        vec![true; length],
        (0..length).map(|j| j >= 3).collect::<Vec<_>>(),
    ];
    for dtype in [DType::BF16, DType::F32] {
        let q = random(&[2, 4, length, 64], 1.0)?;
        let k = random(&[2, 2, length, 64], 1.0)?;
        let v = random(&[2, 2, length, 64], 1.0)?;
        compare(
            "attention (masked softmax)",
            &gpu,
            dtype,
            &[q, k, v],
            &|t| {
                let mask = ops::causal_mask(&valid, 0, length, t[0].device())?;
                ops::attention(&t[0], &t[1], &t[2], Some(&mask), 0.125)
            },
        )?;
        let x = random(&[5, 1000], 3.0)?;
        compare("softmax (no mask)", &gpu, dtype, &[x], &|t| {
            ops::softmax_last_dim(&t[0])
        })?;
    }
    Ok(())
}

/// The fused, chunked linear + cross-entropy against `cross_entropy(frozen_linear(..))` on the
/// CPU, with ignored positions (whose targets hold out-of-range junk), through the public op and
/// through the kernel path with tiny chunks (many chunks, a ragged last one); a vocabulary of
/// 3008 (rows read 16 bytes at a time) and one of 3001 (one value at a time).
#[test]
fn linear_cross_entropy_matches_the_cpu_reference() -> Result<()> {
    let Some(gpu) = gpu() else { return Ok(()) };
    for vocab in [3008, 3001] {
        linear_cross_entropy_case(&gpu, vocab)?;
    }
    Ok(())
}

fn linear_cross_entropy_case(gpu: &Device, vocab: usize) -> Result<()> {
    let (batch, length, width) = (3, 11, 64);
    let ids: Vec<u32> = (0..batch * length)
        .map(|i| ((i as u64 * 2654435761) % vocab as u64) as u32)
        .collect();
    let mask: Vec<u8> = (0..batch * length).map(|i| u8::from(i % 4 != 1)).collect();
    let input_ids = Tensor::from_vec(ids, (batch, length), &Device::Cpu)?;
    let loss_mask = Tensor::from_vec(mask, (batch, length), &Device::Cpu)?;
    for dtype in [DType::BF16, DType::F32] {
        let hidden = random(&[batch, length, width], 1.0)?;
        let weight = random(&[vocab, width], 0.3)?.to_dtype(dtype)?;
        let on = |t: &Tensor, like: &Tensor| -> Result<Tensor> { t.to_device(like.device()) };
        compare(
            "next_token_linear_cross_entropy",
            gpu,
            dtype,
            std::slice::from_ref(&hidden),
            &|t| {
                let w = weight.to_device(t[0].device())?.to_dtype(t[0].dtype())?;
                let loss = ops::next_token_linear_cross_entropy(
                    &t[0],
                    &w,
                    &on(&input_ids, &t[0])?,
                    &on(&loss_mask, &t[0])?,
                )?;
                loss.sum.reshape(1)
            },
        )?;
        #[cfg(feature = "cuda")]
        {
            // Many small chunks through the kernel path directly.
            let rows = batch * length;
            let targets: Vec<u32> = (0..rows as u32).map(|i| (i * 7) % vocab as u32).collect();
            let weights: Vec<f32> = (0..rows)
                .map(|i| if i % 3 == 0 { 0.0 } else { 1.0 })
                .collect();
            let flat = hidden.reshape((rows, width))?;
            compare(
                "linear_cross_entropy (chunks of 4 rows)",
                gpu,
                dtype,
                &[flat],
                &|t| {
                    let w = weight.to_device(t[0].device())?.to_dtype(t[0].dtype())?;
                    if t[0].device().is_cuda() {
                        ops::cuda::linear_cross_entropy_sum_chunked(
                            &t[0], &w, &targets, &weights, 4,
                        )?
                        .reshape(1)
                    } else {
                        let target = Tensor::new(targets.as_slice(), &Device::Cpu)?;
                        let mask = Tensor::new(weights.as_slice(), &Device::Cpu)?;
                        ops::linear_cross_entropy(&t[0], &w, &target, &mask)?
                            .sum
                            .reshape(1)
                    }
                },
            )?;
        }
    }
    Ok(())
}

/// Three multi-tensor AdamW steps (weight decay, a no-decay vector, clipping scale < 1, one
/// parameter without a gradient) against the CPU tensor-op AdamW on the same values.
#[test]
fn multi_tensor_adamw_matches_the_cpu_optimizer() -> Result<()> {
    let Some(gpu) = gpu() else { return Ok(()) };
    let settings = AdamWSettings {
        weight_decay: 0.1,
        ..AdamWSettings::default()
    };
    for dtype in [DType::BF16, DType::F32] {
        let shapes: [&[usize]; 4] = [&[16, 2048], &[2048, 16], &[333], &[8, 8]];
        let names = [
            "a.lora_A.weight",
            "a.lora_B.weight",
            "a.bias",
            "frozen_this_step",
        ];
        let initial: Vec<Tensor> = shapes
            .iter()
            .map(|s| random(s, 0.5).and_then(|t| t.to_dtype(dtype)))
            .collect::<Result<_>>()?;
        let build = |device: &Device| -> Result<(AdamW, Vec<Var>)> {
            let vars = initial
                .iter()
                .map(|t| Var::from_tensor(&t.to_device(device)?))
                .collect::<Result<Vec<_>>>()?;
            let named = names
                .iter()
                .map(|n| n.to_string())
                .zip(vars.iter().cloned())
                .collect();
            Ok((AdamW::new(named, settings)?, vars))
        };
        let (mut cpu_optimizer, cpu_vars) = build(&Device::Cpu)?;
        let (mut gpu_optimizer, gpu_vars) = build(&gpu)?;
        for step in 0..3 {
            let grads: Vec<Option<Tensor>> = shapes
                .iter()
                .enumerate()
                .map(|(i, s)| {
                    if i == 3 && step == 1 {
                        return Ok(None);
                    }
                    let scale = 0.01 * (step + 1) as f64;
                    // The first gradient is a transposed view, as a matmul backward gives a
                    // weight used as wᵀ: the kernels read it in place.
                    let gradient = if i == 0 {
                        random(&[s[1], s[0]], scale)?.t()?
                    } else {
                        random(s, scale)?
                    };
                    gradient.to_dtype(dtype).map(Some)
                })
                .collect::<Result<_>>()?;
            let on_gpu: Vec<Option<Tensor>> = grads
                .iter()
                .map(|g| g.as_ref().map(|g| g.to_device(&gpu)).transpose())
                .collect::<Result<_>>()?;
            let cpu_norm = peftpipe::train::optimizer::global_norm(&grads)?;
            let gpu_norm = peftpipe::train::optimizer::global_norm(&on_gpu)?;
            eprintln!("global norm {dtype:?}: cpu {cpu_norm} gpu {gpu_norm}");
            assert!(gpu_norm.is_finite() && (gpu_norm - cpu_norm).abs() <= 1e-4 * cpu_norm);
            let scale = peftpipe::train::optimizer::clip_coefficient(cpu_norm, 0.5 * cpu_norm);
            cpu_optimizer.step_scaled(&grads, 1e-2, scale)?;
            gpu_optimizer.step_scaled(&on_gpu, 1e-2, scale)?;
        }
        let limit = match dtype {
            DType::BF16 => 1e-2,
            _ => 1e-5,
        };
        for (index, (cpu, gpu)) in cpu_vars.iter().zip(&gpu_vars).enumerate() {
            let error = relative_error("adamw parameter", gpu.as_tensor(), cpu.as_tensor())?;
            eprintln!("adamw {dtype:?} parameter {index}: max rel. error {error:.2e}");
            assert!(
                error < limit,
                "adamw {dtype:?} parameter {index}: {error:e}"
            );
        }
        let cpu_state = cpu_optimizer.state_tensors();
        for (name, gpu_tensor) in gpu_optimizer.state_tensors() {
            let (_, cpu_tensor) = cpu_state
                .iter()
                .find(|(n, _)| *n == name)
                .expect("same names");
            let error = relative_error(&name, &gpu_tensor, cpu_tensor)?;
            assert!(error < 1e-3, "adamw {dtype:?} state {name}: {error:e}");
        }
    }
    Ok(())
}

#[test]
fn multi_tensor_cast_is_bitwise_candles_cast() -> Result<()> {
    let Some(gpu) = gpu() else { return Ok(()) };
    // LoRA-like factor shapes, odd sizes, and the values rounding must get right: ties, values
    // past bf16's range, infinities, NaN, subnormals.
    let special = Tensor::new(
        &[
            1.0f32 + f32::EPSILON * 64.0,
            1.0 + f32::EPSILON * 192.0,
            3.4e38,
            -3.4e38,
            f32::INFINITY,
            f32::NEG_INFINITY,
            f32::NAN,
            1e-40,
            -1e-45,
            0.0,
            -0.0,
        ],
        &Device::Cpu,
    )?;
    let mut tensors = vec![special];
    for shape in [
        [16, 2048],
        [2048, 16],
        [1, 1],
        [7, 3],
        [16, 8192],
        [512, 16],
        [3, 1],
    ] {
        tensors.push(random(&shape, 0.05)?);
    }
    let on_gpu = tensors
        .iter()
        .map(|t| t.to_device(&gpu))
        .collect::<Result<Vec<_>>>()?;
    let refs: Vec<&Tensor> = on_gpu.iter().collect();
    let casts = ops::cast_factors(&refs, DType::BF16)?;
    assert_eq!(casts.len(), tensors.len());
    for (index, (cast, source)) in casts.iter().zip(&on_gpu).enumerate() {
        assert_eq!(cast.dtype(), DType::BF16);
        assert_eq!(cast.dims(), source.dims());
        let bits = |t: &Tensor| -> Result<Vec<u16>> {
            Ok(t.to_device(&Device::Cpu)?
                .flatten_all()?
                .to_vec1::<half::bf16>()?
                .iter()
                .map(|v| v.to_bits())
                .collect())
        };
        let ours = bits(cast)?;
        let candle = bits(&source.to_dtype(DType::BF16)?)?;
        // NaN payloads may differ; every other value must be the same bits.
        for (i, (x, y)) in ours.iter().zip(&candle).enumerate() {
            let nan = |b: u16| half::bf16::from_bits(b).is_nan();
            assert!(
                x == y || (nan(*x) && nan(*y)),
                "tensor {index} element {i}: {x:#06x} vs candle's {y:#06x}"
            );
        }
    }
    Ok(())
}

#[test]
fn layer_norm_matches_the_cpu_reference() -> Result<()> {
    let Some(gpu) = gpu() else { return Ok(()) };
    for dtype in [DType::BF16, DType::F32] {
        for (shape, cols) in [
            (vec![3, 5, 768], 768),
            (vec![7, 1000], 1000),
            (vec![2, 64], 64),
            (vec![4, 8192], 8192),
        ] {
            // An offset mean: the variance must not come from E[x²] − E[x]².
            let x = (random(&shape, 2.0)? + 3.0)?;
            let weight = (random(&[cols], 0.3)? + 1.0)?.to_dtype(dtype)?;
            let bias = random(&[cols], 0.5)?.to_dtype(dtype)?;
            let frozen = |t: &[Tensor], bias: Option<&Tensor>| -> Result<Tensor> {
                let on = |p: &Tensor| p.to_device(t[0].device())?.to_dtype(t[0].dtype());
                let bias = bias.map(on).transpose()?;
                ops::layer_norm(&t[0], &on(&weight)?, bias.as_ref(), 1e-5)
            };
            compare("layer_norm", &gpu, dtype, std::slice::from_ref(&x), &|t| {
                frozen(t, Some(&bias))
            })?;
            compare(
                "layer_norm without bias",
                &gpu,
                dtype,
                std::slice::from_ref(&x),
                &|t| frozen(t, None),
            )?;
            // A trained weight and bias (modules_to_save): their gradients are compared too.
            compare(
                "layer_norm trained",
                &gpu,
                dtype,
                &[x, weight.to_dtype(DType::F32)?, bias.to_dtype(DType::F32)?],
                &|t| ops::layer_norm(&t[0], &t[1], Some(&t[2]), 1e-5),
            )?;
        }
    }
    Ok(())
}

/// A NaN in the input must come out as a failure of the comparison helpers, not pass silently.
#[test]
fn a_nan_never_passes() -> Result<()> {
    let Some(gpu) = gpu() else { return Ok(()) };
    let mut x = values(&random(&[4, 256], 1.0)?)?;
    x[17] = f32::NAN;
    let x = Tensor::from_vec(x, (4, 256), &gpu)?.to_dtype(DType::BF16)?;
    let weight = Tensor::ones(256, DType::BF16, &gpu)?;
    let reference = Tensor::zeros((4, 256), DType::F32, &Device::Cpu)?;
    for y in [
        ops::rms_norm(&x, &weight, 1e-5)?,
        ops::layer_norm(&x, &weight, None, 1e-5)?,
    ] {
        let caught = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            relative_error("nan", &y, &reference)
        }));
        assert!(caught.is_err(), "a NaN output passed the comparison");
    }
    Ok(())
}

// ---- Flash attention ---------------------------------------------------------------------------

/// One flash-attention case: the kernels (`causal_attention` / `full_attention` on CUDA) against
/// the explicit composition (the same calls on the CPU), forward and the gradients of q, k and v.
/// Rows that see no key are compared after multiplying by 0 on both sides (the kernels give 0
/// there, the composition a uniform average); [`flash_unseen_rows_are_zero`] checks them.
struct FlashCase {
    name: &'static str,
    batch: usize,
    heads: usize,
    kv_heads: usize,
    queries: usize,
    key_valid: Vec<Vec<bool>>,
    causal: Option<usize>,
}

impl FlashCase {
    fn keys(&self) -> usize {
        self.key_valid[0].len()
    }

    fn seen(&self, b: usize, i: usize) -> bool {
        (0..self.keys())
            .any(|j| self.key_valid[b][j] && self.causal.is_none_or(|offset| j <= offset + i))
    }

    /// `[B, 1, T, 1]` f32: 1 for a query that sees some key.
    fn rows_seen(&self) -> Result<Tensor> {
        let values: Vec<f32> = (0..self.batch)
            .flat_map(|b| (0..self.queries).map(move |i| (b, i)))
            .map(|(b, i)| if self.seen(b, i) { 1.0 } else { 0.0 })
            .collect();
        Tensor::from_vec(values, (self.batch, 1, self.queries, 1), &Device::Cpu)
    }

    /// The dispatchers (`causal_attention` / `full_attention`: on CUDA the kernels, their
    /// tensor-core family from `PEFTPIPE_FLASH`, by default the FlashAttention-2-style ones).
    fn run(&self, t: &[Tensor], scale: f64) -> Result<Tensor> {
        if t[0].device().is_cuda() {
            assert!(
                ops::flash::kernel_applies(&t[0]),
                "{}: the flash kernels do not apply (PEFTPIPE_UNFUSED?)",
                self.name
            );
        }
        match self.causal {
            Some(offset) => {
                let mask = ops::CausalMask::new(
                    self.key_valid.clone(),
                    offset,
                    self.queries,
                    t[0].device(),
                )?;
                ops::causal_attention(&t[0], &t[1], &t[2], &mask, scale)
            }
            None => ops::full_attention(&t[0], &t[1], &t[2], scale),
        }
    }

    /// On CUDA the flash op with the tensor-core family `kernels`; on the CPU the explicit
    /// composition, as [`Self::run`].
    fn run_with(&self, t: &[Tensor], scale: f64, kernels: TensorCoreKernels) -> Result<Tensor> {
        if !t[0].device().is_cuda() {
            return self.run(t, scale);
        }
        let visibility = match self.causal {
            Some(offset) => {
                ops::CausalMask::new(self.key_valid.clone(), offset, self.queries, t[0].device())?
                    .visibility()?
            }
            None => ops::Visibility::all(),
        };
        ops::flash::flash_attention_with(&t[0], &t[1], &t[2], &visibility, scale, kernels)
    }

    fn inputs(&self, dim: usize) -> Result<Vec<Tensor>> {
        Ok(vec![
            random(&[self.batch, self.heads, self.queries, dim], 1.0)?,
            random(&[self.batch, self.kv_heads, self.keys(), dim], 1.0)?,
            random(&[self.batch, self.kv_heads, self.keys(), dim], 1.0)?,
        ])
    }
}

fn flash_cases() -> Vec<FlashCase> {
    let padded = |length: usize, invalid: &dyn Fn(usize) -> bool| -> Vec<bool> {
        (0..length).map(|j| !invalid(j)).collect()
    };
    vec![
        FlashCase {
            name: "gqa causal 77x77, left padding (5 fully padded queries)",
            batch: 2,
            heads: 4,
            kv_heads: 2,
            queries: 77,
            key_valid: vec![vec![true; 77], padded(77, &|j| j < 5)],
            causal: Some(0),
        },
        FlashCase {
            name: "causal 45 queries after a 16-key prefix, right padding, 4 heads on 1",
            batch: 2,
            heads: 4,
            kv_heads: 1,
            queries: 45,
            key_valid: vec![vec![true; 61], padded(61, &|j| j >= 54)],
            causal: Some(16),
        },
        FlashCase {
            name: "generation step: 1 query over 45 cached keys",
            batch: 2,
            heads: 4,
            kv_heads: 2,
            queries: 1,
            key_valid: vec![vec![true; 45], padded(45, &|j| j < 3)],
            causal: Some(44),
        },
        FlashCase {
            name: "non-causal (adapter prompt of 10 keys)",
            batch: 2,
            heads: 4,
            kv_heads: 2,
            queries: 37,
            key_valid: vec![vec![true; 10]; 2],
            causal: None,
        },
        // Several 64-row query and key tiles with ragged ends; a group of 4 query heads per
        // key/value head, padding on both sides.
        FlashCase {
            name: "gqa causal 150x150, 8 heads on 2, left and right padding",
            batch: 2,
            heads: 8,
            kv_heads: 2,
            queries: 150,
            key_valid: vec![padded(150, &|j| j < 70), padded(150, &|j| j >= 131)],
            causal: Some(0),
        },
        FlashCase {
            name: "causal 100 queries after 37 cached keys, all keys valid",
            batch: 1,
            heads: 6,
            kv_heads: 3,
            queries: 100,
            key_valid: vec![vec![true; 137]],
            causal: Some(37),
        },
        FlashCase {
            name: "non-causal 70 queries over 150 keys with holes",
            batch: 2,
            heads: 2,
            kv_heads: 2,
            queries: 70,
            key_valid: vec![
                vec![true; 150],
                padded(150, &|j| (40..107).contains(&j) || j % 7 == 3),
            ],
            causal: None,
        },
        FlashCase {
            name: "non-causal 129 queries over 65 keys, 3 heads on 1",
            batch: 1,
            heads: 3,
            kv_heads: 1,
            queries: 129,
            key_valid: vec![vec![true; 65]],
            causal: None,
        },
    ]
}

#[test]
fn flash_attention_matches_the_cpu_reference() -> Result<()> {
    let Some(gpu) = gpu() else { return Ok(()) };
    for dim in [64, 128] {
        let scale = 1.0 / (dim as f64).sqrt();
        for case in flash_cases() {
            for dtype in [DType::BF16, DType::F16, DType::F32] {
                let seen = case.rows_seen()?;
                let name = format!("flash d{dim} {}", case.name);
                compare(&name, &gpu, dtype, &case.inputs(dim)?, &|t| {
                    let output = case.run(t, scale)?;
                    let seen = seen.to_device(t[0].device())?.to_dtype(output.dtype())?;
                    output.broadcast_mul(&seen)
                })?;
            }
        }
    }
    Ok(())
}

/// The families the default does not pick on every GPU, chosen explicitly on the same cases, bf16
/// and f16: the FlashAttention-2-style kernels (`PEFTPIPE_FLASH=mma`; on a Hopper GPU the default
/// runs the wgmma kernels for bf16 at head_dim 128 instead) and the first tensor-core kernels
/// (`PEFTPIPE_FLASH=wmma`, kept for comparison).
#[test]
fn flash_attention_mma_and_wmma_match_the_cpu_reference() -> Result<()> {
    let Some(gpu) = gpu() else { return Ok(()) };
    for kernels in [TensorCoreKernels::Mma, TensorCoreKernels::Wmma] {
        for dim in [64, 128] {
            let scale = 1.0 / (dim as f64).sqrt();
            for case in flash_cases() {
                for dtype in [DType::BF16, DType::F16] {
                    let seen = case.rows_seen()?;
                    let name = format!("flash ({kernels:?}) d{dim} {}", case.name);
                    compare(&name, &gpu, dtype, &case.inputs(dim)?, &|t| {
                        let output = case.run_with(t, scale, kernels)?;
                        let seen = seen.to_device(t[0].device())?.to_dtype(output.dtype())?;
                        output.broadcast_mul(&seen)
                    })?;
                }
            }
        }
    }
    Ok(())
}

/// On a GPU of compute capability 9.0 the default runs the Hopper (wgmma) kernels for bf16 at
/// head_dim 128 (and so every default-family test above exercises them there), and not at 64; on
/// any other GPU it never does. Their gradients against the FlashAttention-2-style kernels' on
/// the same inputs: within the band of the CPU-reference comparison (the two forwards sum in a
/// different order, so the backwards see different outputs and log-sum-exps).
#[cfg(feature = "cuda")]
#[test]
fn flash_hopper_kernels_run_on_hopper_and_agree_with_fa2() -> Result<()> {
    let Some(gpu) = gpu() else { return Ok(()) };
    let capability = gpu
        .as_cuda_device()?
        .cuda_stream()
        .context()
        .compute_capability()
        .map_err(|e| candle_core::Error::Msg(e.to_string()))?;
    let hopper = ops::flash::hopper_kernels_apply(&gpu, 128);
    eprintln!("compute capability {capability:?}: hopper flash kernels {hopper}");
    assert_eq!(hopper, capability == (9, 0), "capability {capability:?}");
    assert!(!ops::flash::hopper_kernels_apply(&gpu, 64));
    if !hopper {
        eprintln!("skipping the comparison: not a Hopper GPU");
        return Ok(());
    }
    let scale = 1.0 / 128f64.sqrt();
    for case in flash_cases() {
        let seen = case.rows_seen()?;
        let inputs = case.inputs(128)?;
        let run = |kernels: TensorCoreKernels| {
            let seen = seen.clone();
            let case = &case;
            move |t: &[Tensor]| -> Result<Tensor> {
                let output = case.run_with(t, scale, kernels)?;
                let seen = seen.to_device(t[0].device())?.to_dtype(output.dtype())?;
                output.broadcast_mul(&seen)
            }
        };
        let hopper = output_and_grads(&gpu, DType::BF16, &inputs, &run(TensorCoreKernels::Auto))?;
        let fa2 = output_and_grads(&gpu, DType::BF16, &inputs, &run(TensorCoreKernels::Mma))?;
        for (index, (a, b)) in hopper.iter().zip(&fa2).enumerate() {
            let (a, b) = (
                Tensor::new(a.as_slice(), &Device::Cpu)?,
                Tensor::new(b.as_slice(), &Device::Cpu)?,
            );
            let error = relative_error(&format!("{} result {index}", case.name), &a, &b)?;
            eprintln!("hopper vs fa2 {} result {index}: {error:.2e}", case.name);
            assert!(
                error < tolerance(DType::BF16),
                "{}: result {index} (0 = output) {error} from fa2's",
                case.name
            );
        }
    }
    Ok(())
}

/// `x` (logical `[B, H, T, D]`) stored as `[B, T, H, D]`: the layout of a projection's output
/// viewed as heads, which the FlashAttention-2-style kernels read where it lies.
fn stored_bthd(x: &Tensor) -> Result<Tensor> {
    x.transpose(1, 2)?.contiguous()?.transpose(1, 2)
}

/// Output and every gradient of `f` on the GPU, in `dtype`, under the fixed projection.
fn output_and_grads(
    gpu: &Device,
    dtype: DType,
    inputs: &[Tensor],
    f: &dyn Fn(&[Tensor]) -> Result<Tensor>,
) -> Result<Vec<Vec<f32>>> {
    let vars = inputs
        .iter()
        .map(|t| Var::from_tensor(&t.to_dtype(dtype)?.to_device(gpu)?))
        .collect::<Result<Vec<_>>>()?;
    let tensors: Vec<Tensor> = vars.iter().map(|v| v.as_tensor().clone()).collect();
    let output = f(&tensors)?;
    let projection = projection(output.dims())?.to_device(gpu)?;
    let grads = (output.to_dtype(DType::F32)? * projection)?
        .sum_all()?
        .backward()?;
    let mut all = vec![values(&output)?];
    for var in &vars {
        let grad = grads
            .get(var.as_tensor())
            .ok_or_else(|| candle_core::Error::Msg("an input got no gradient".into()))?;
        all.push(values(grad)?);
    }
    Ok(all)
}

/// Heads stored `[B, T, H, D]` (q, k/v, or all three) give the same output and gradients, bit for
/// bit, as contiguous heads — the kernels differ only in where they read and write — and both agree
/// with the CPU reference.
#[test]
fn flash_attention_reads_heads_where_they_lie() -> Result<()> {
    let Some(gpu) = gpu() else { return Ok(()) };
    for dim in [64, 128] {
        let scale = 1.0 / (dim as f64).sqrt();
        for case in flash_cases() {
            let case = &case;
            for dtype in [DType::BF16, DType::F16] {
                let seen = case.rows_seen()?;
                let inputs = case.inputs(dim)?;
                let run = |q_strided: bool, kv_strided: bool| {
                    let seen = seen.clone();
                    move |t: &[Tensor]| -> Result<Tensor> {
                        let pick = |x: &Tensor, strided: bool| {
                            if strided {
                                stored_bthd(x)
                            } else {
                                Ok(x.clone())
                            }
                        };
                        let q = pick(&t[0], q_strided)?;
                        let (k, v) = (pick(&t[1], kv_strided)?, pick(&t[2], kv_strided)?);
                        let output = case.run(&[q, k, v], scale)?;
                        let seen = seen.to_device(t[0].device())?.to_dtype(output.dtype())?;
                        output.broadcast_mul(&seen)
                    }
                };
                let contiguous = output_and_grads(&gpu, dtype, &inputs, &run(false, false))?;
                for (q_strided, kv_strided) in [(true, true), (true, false), (false, true)] {
                    let name = format!(
                        "flash d{dim} {} (q {}, k/v {})",
                        case.name,
                        if q_strided { "[B,T,H,D]" } else { "contiguous" },
                        if kv_strided {
                            "[B,T,H,D]"
                        } else {
                            "contiguous"
                        },
                    );
                    let strided =
                        output_and_grads(&gpu, dtype, &inputs, &run(q_strided, kv_strided))?;
                    for (index, (a, b)) in strided.iter().zip(&contiguous).enumerate() {
                        let differ = a.iter().zip(b).filter(|(x, y)| x.to_bits() != y.to_bits());
                        assert_eq!(
                            differ.count(),
                            0,
                            "{name} {dtype:?}: result {index} (0 = output) differs from contiguous heads"
                        );
                    }
                    compare(&name, &gpu, dtype, &inputs, &run(q_strided, kv_strided))?;
                }
            }
        }
    }
    Ok(())
}

/// `ops::rope_heads` on CUDA (RoPE written into the projection's buffer, heads left where they
/// lie) against the CPU's split + rotate, values and gradients; a projection output shared with
/// another tensor is rotated into a new buffer and left as it was.
#[test]
fn rope_heads_in_place_matches_the_cpu_reference() -> Result<()> {
    let Some(gpu) = gpu() else { return Ok(()) };
    let rotary = ops::RotaryEmbedding::new(64, 500000.0, None)?;
    let positions = vec![
        (0..37u32).collect::<Vec<_>>(),
        (0..37u32).map(|p| p.saturating_sub(5) + 100).collect(),
    ];
    for dtype in [DType::BF16, DType::F32] {
        let x = random(&[2, 37, 4 * 64], 1.0)?;
        // A fresh buffer (`x · 1`): rotated in place on CUDA.
        compare(
            "rope_heads (fresh)",
            &gpu,
            dtype,
            std::slice::from_ref(&x),
            &|t| {
                let (cos, sin) = rotary.tables(&positions, t[0].device(), t[0].dtype())?;
                ops::rope_heads((&t[0] * 1.0)?, 4, 64, &cos, &sin)
            },
        )?;
        // The variable's own buffer is shared (the Var holds it): never written.
        compare(
            "rope_heads (shared)",
            &gpu,
            dtype,
            std::slice::from_ref(&x),
            &|t| {
                let before = values(&t[0])?;
                let (cos, sin) = rotary.tables(&positions, t[0].device(), t[0].dtype())?;
                let rotated = ops::rope_heads(t[0].clone(), 4, 64, &cos, &sin)?;
                assert_eq!(
                    values(&t[0])?,
                    before,
                    "rope_heads wrote into a buffer it shares"
                );
                Ok(rotated)
            },
        )?;
    }
    Ok(())
}

/// `ops::add_residual` on CUDA (the sum written into the branch's buffer) against the CPU's add,
/// values and both gradients; a branch shared with another tensor is left as it was.
#[test]
fn add_residual_in_place_matches_the_cpu_reference() -> Result<()> {
    let Some(gpu) = gpu() else { return Ok(()) };
    for dtype in [DType::BF16, DType::F32] {
        let inputs = [random(&[3, 17, 256], 1.0)?, random(&[3, 17, 256], 1.0)?];
        compare("add_residual (fresh)", &gpu, dtype, &inputs, &|t| {
            ops::add_residual((&t[1] * 1.0)?, &t[0])
        })?;
        compare("add_residual (shared)", &gpu, dtype, &inputs, &|t| {
            let before = values(&t[1])?;
            let sum = ops::add_residual(t[1].clone(), &t[0])?;
            assert_eq!(
                values(&t[1])?,
                before,
                "add_residual wrote into a buffer it shares"
            );
            Ok(sum)
        })?;
    }
    Ok(())
}

/// The GradStore's gradient sums by peftpipe's add kernel (`ops::cuda::gradient_add`): the
/// same bits as candle's add (both round the f32 sum once), in place only into a buffer nothing
/// else holds, on the 16-byte path (a multiple of 8 elements) and the element-wise one (3·17·5);
/// and a backward with the kernel installed gives the CPU's gradients.
#[cfg(feature = "cuda")]
#[test]
fn gradient_sums_match_candle_and_never_write_a_shared_buffer() -> Result<()> {
    let Some(gpu) = gpu() else { return Ok(()) };
    for dtype in [DType::BF16, DType::F32] {
        for shape in [[3usize, 17, 256], [3, 17, 5]] {
            let a = random(&shape, 1.0)?.to_dtype(dtype)?.to_device(&gpu)?;
            let b = random(&shape, 1.0)?.to_dtype(dtype)?.to_device(&gpu)?;
            let expected = values(&(&a + &b)?)?;
            // Shared: `a` is held twice, so a new buffer is written and `a` keeps its values.
            let held = a.clone();
            let before = values(&a)?;
            let sum = ops::cuda::gradient_add(&a, &b)?.expect("a CUDA sum");
            assert_eq!(values(&sum)?, expected, "{dtype:?} {shape:?} (shared)");
            assert_eq!(values(&held)?, before, "wrote into a shared buffer");
            drop(held);
            // Unique: written into `a`'s own buffer.
            let unique = a.copy()?;
            let sum = ops::cuda::gradient_add(&unique, &b)?.expect("a CUDA sum");
            assert_eq!(values(&sum)?, expected, "{dtype:?} {shape:?} (unique)");
            assert_eq!(sum.id(), unique.id(), "a unique sum is written in place");
        }
    }
    assert!(
        ops::cuda::gradient_add(
            &Tensor::zeros(3, DType::F32, &Device::Cpu)?,
            &Tensor::zeros(3, DType::F32, &Device::Cpu)?
        )?
        .is_none(),
        "the CPU keeps candle's add"
    );
    // One tensor reached by three gradients, through the store with the kernel installed.
    ops::cuda::install_gradient_add();
    let x = random(&[4, 64], 1.0)?;
    let gradients = |device: &Device| -> Result<Tensor> {
        let x = Var::from_tensor(&x.to_device(device)?)?;
        let t = x.as_tensor();
        let y = ((t.sqr()? + t.exp()?)? + t.sin()?)?.sum_all()?;
        let grads = y.backward()?;
        grads.get(t).expect("a gradient").to_device(&Device::Cpu)
    };
    let error = relative_error(
        "summed gradients",
        &gradients(&gpu)?,
        &gradients(&Device::Cpu)?,
    )?;
    assert!(error < tolerance(DType::F32), "summed gradients: {error}");
    Ok(())
}

/// Queries that see no key (a fully padded row) give output 0 and send no gradient anywhere;
/// nothing is NaN. Two cases: 5 such queries, and 70 (a whole 64-query tile and a 64-key tile of
/// padding), at both head dims.
#[test]
fn flash_unseen_rows_are_zero() -> Result<()> {
    let Some(gpu) = gpu() else { return Ok(()) };
    let cases = flash_cases();
    for (case, dim) in [(&cases[0], 64), (&cases[4], 64), (&cases[4], 128)] {
        for dtype in [DType::BF16, DType::F16, DType::F32] {
            let inputs = case.inputs(dim)?;
            let vars = inputs
                .iter()
                .map(|t| Var::from_tensor(&t.to_dtype(dtype)?.to_device(&gpu)?))
                .collect::<Result<Vec<_>>>()?;
            let tensors: Vec<Tensor> = vars.iter().map(|v| v.as_tensor().clone()).collect();
            let output = case.run(&tensors, 1.0 / (dim as f64).sqrt())?;
            let loss = (output.to_dtype(DType::F32)?
                * projection(output.dims())?.to_device(&gpu)?)?
            .sum_all()?;
            let grads = loss.backward()?;
            let output = values(&output)?;
            let dq = values(grads.get(vars[0].as_tensor()).expect("dq"))?;
            assert!(
                output.iter().chain(&dq).all(|v| v.is_finite()),
                "non-finite"
            );
            let mut unseen = 0;
            for b in 0..case.batch {
                for h in 0..case.heads {
                    for i in 0..case.queries {
                        let start = ((b * case.heads + h) * case.queries + i) * dim;
                        let row = start..start + dim;
                        let what = format!("{} d{dim} {dtype:?} batch {b} row {i}", case.name);
                        if case.seen(b, i) {
                            assert!(output[row].iter().any(|&v| v != 0.0), "{what} is 0");
                        } else {
                            unseen += 1;
                            assert!(output[row.clone()].iter().all(|&v| v == 0.0), "{what}");
                            assert!(dq[row].iter().all(|&v| v == 0.0), "dq {what}");
                        }
                    }
                }
            }
            assert!(unseen > 0, "{}: no unseen row to check", case.name);
            for var in &vars[1..] {
                let g = values(grads.get(var.as_tensor()).expect("dk/dv"))?;
                assert!(g.iter().all(|v| v.is_finite()), "non-finite dk/dv");
            }
        }
    }
    Ok(())
}

/// Not a check: the time of one forward + backward at Llama-3.2-1B's attention shape (8 × 512,
/// 32 heads on 8, head_dim 64) and Llama-3.1-8B's (1 × 4096, 32 heads on 8, head_dim 128), bf16,
/// causal: the FlashAttention-2-style kernels, the wmma ones and (1B shape) the explicit
/// composition (run with `--include-ignored --nocapture`).
#[test]
#[ignore = "a measurement; run on a GPU with --include-ignored"]
fn flash_attention_timing() -> Result<()> {
    let Some(gpu) = gpu() else { return Ok(()) };
    #[derive(Clone, Copy, PartialEq)]
    enum Path {
        Explicit,
        Flash(TensorCoreKernels),
    }
    let dtype = DType::BF16;
    for (batch, heads, kv_heads, length, dim) in [(8, 32, 8, 512, 64), (1, 32, 8, 4096, 128)] {
        let make = |h: usize| -> Result<Var> {
            Var::from_tensor(
                &random(&[batch, h, length, dim], 1.0)?
                    .to_dtype(dtype)?
                    .to_device(&gpu)?,
            )
        };
        let (q, k, v) = (make(heads)?, make(kv_heads)?, make(kv_heads)?);
        let mask = ops::CausalMask::new(vec![vec![true; length]; batch], 0, length, &gpu)?;
        let scale = 1.0 / (dim as f64).sqrt();
        let mut paths = vec![
            Path::Flash(TensorCoreKernels::Wmma),
            Path::Flash(TensorCoreKernels::Mma),
        ];
        if ops::flash::hopper_kernels_apply(&gpu, dim) {
            paths.push(Path::Flash(TensorCoreKernels::Auto));
        }
        if length <= 512 {
            paths.insert(0, Path::Explicit);
        }
        // Every path twice, the first round as warm-up.
        for path in paths.iter().chain(&paths).copied() {
            let attend = || -> Result<Tensor> {
                match path {
                    Path::Explicit => ops::attention(
                        q.as_tensor(),
                        k.as_tensor(),
                        v.as_tensor(),
                        Some(&mask.additive()?),
                        scale,
                    ),
                    Path::Flash(kernels) => ops::flash::flash_attention_with(
                        q.as_tensor(),
                        k.as_tensor(),
                        v.as_tensor(),
                        &mask.visibility()?,
                        scale,
                        kernels,
                    ),
                }
            };
            let step = || -> Result<f32> {
                let grads = attend()?.to_dtype(DType::F32)?.sum_all()?.backward()?;
                let dq = grads.get(q.as_tensor()).expect("dq");
                dq.to_dtype(DType::F32)?.sum_all()?.to_scalar::<f32>()
            };
            step()?;
            let runs = 10;
            let start = std::time::Instant::now();
            for _ in 0..runs {
                step()?;
            }
            let forward_only = std::time::Instant::now();
            for _ in 0..runs {
                attend()?
                    .to_dtype(DType::F32)?
                    .sum_all()?
                    .to_scalar::<f32>()?;
            }
            let name = match path {
                Path::Explicit => "explicit",
                Path::Flash(TensorCoreKernels::Mma) => "flash mma",
                Path::Flash(TensorCoreKernels::Wmma) => "flash wmma",
                Path::Flash(TensorCoreKernels::Auto) => "flash wgmma (hopper)",
            };
            let both = (forward_only - start).as_secs_f64() / runs as f64;
            let forward = forward_only.elapsed().as_secs_f64() / runs as f64;
            // Causal: half the 4·B·H·T²·D forward FLOPs, 2.5× that for the backward.
            let flops = 4.0 * (batch * heads * length * length * dim) as f64 / 2.0;
            eprintln!(
                "attention {name}: forward+backward {:.2} ms, forward {:.2} ms \
                 ({batch}x{length}, {heads}/{kv_heads} heads, d{dim}, bf16, causal; \
                 forward {:.0} TFLOP/s, backward {:.0} TFLOP/s incl. the output reduction)",
                both * 1e3,
                forward * 1e3,
                flops / forward / 1e12,
                2.5 * flops / (both - forward).max(1e-9) / 1e12,
            );
        }
    }
    Ok(())
}
