//! Finite-difference checks (f64, CPU) of every differentiable op in `peftpipe::ops`, and that the
//! constants each op takes (weights, masks, rope tables, targets) never receive a gradient; a norm's
//! weight and bias are constants when frozen and get their gradients when tracked (a trained
//! copy, PEFT's `modules_to_save`).
#![expect(
    clippy::print_stderr,
    reason = "tests print skip reasons and measured errors"
)]

use candle_core::{DType, Device, Result, Tensor, Var, D};
use peftpipe::ops;

const STEP: f64 = 1e-6;
const TOLERANCE: f64 = 1e-6;

/// A fixed random projection so that `Σ r·f(x)` has a non-trivial gradient (plain `Σ f(x)` is
/// constant for softmax).
fn projection(shape: &[usize], seed: u64) -> Result<Tensor> {
    let count: usize = shape.iter().product();
    let values: Vec<f64> = (0..count)
        .map(|i| {
            let z = (i as u64)
                .wrapping_mul(6364136223846793005)
                .wrapping_add(seed)
                >> 11;
            (z % 2000) as f64 / 1000.0 - 1.0
        })
        .collect();
    Tensor::from_vec(values, shape, &Device::Cpu)
}

/// Compare the analytic gradient of `Σ r·f(x)` with central differences, element by element.
fn check_gradient(name: &str, x: &Tensor, f: impl Fn(&Tensor) -> Result<Tensor>) -> Result<()> {
    let variable = Var::from_tensor(x)?;
    let output = f(variable.as_tensor())?;
    let weights = projection(output.dims(), 17)?;
    let loss = (&output * &weights)?.sum_all()?;
    let grads = loss.backward()?;
    let Some(analytic) = grads.get(variable.as_tensor()) else {
        panic!("{name}: no gradient reached the input")
    };
    let analytic = analytic.flatten_all()?.to_vec1::<f64>()?;
    let base = x.flatten_all()?.to_vec1::<f64>()?;
    let mut worst = 0f64;
    for index in 0..base.len() {
        let evaluate = |delta: f64| -> Result<f64> {
            let mut values = base.clone();
            values[index] += delta;
            let shifted = Tensor::from_vec(values, x.shape(), &Device::Cpu)?;
            (f(&shifted)? * &weights)?.sum_all()?.to_scalar::<f64>()
        };
        let numeric = (evaluate(STEP)? - evaluate(-STEP)?) / (2.0 * STEP);
        let error = (numeric - analytic[index]).abs() / (1.0 + numeric.abs());
        worst = worst.max(error);
    }
    assert!(
        worst < TOLERANCE,
        "{name}: worst relative gradient error {worst:e}"
    );
    assert!(
        analytic.iter().any(|&g| g != 0.0),
        "{name}: gradient is all zero"
    );
    Ok(())
}

fn random(shape: &[usize]) -> Result<Tensor> {
    Tensor::randn(0f64, 1.0, shape, &Device::Cpu)
}

#[test]
fn frozen_linear_backward_matches_finite_differences() -> Result<()> {
    let weight = random(&[4, 5])?;
    let bias = random(&[4])?;
    check_gradient("frozen_linear", &random(&[2, 3, 5])?, |x| {
        ops::frozen_linear(x, &weight)
    })?;
    check_gradient("linear+bias", &random(&[2, 3, 5])?, |x| {
        ops::linear(x, &weight, Some(&bias))
    })
}

#[test]
fn rms_norm_backward_matches_finite_differences() -> Result<()> {
    let weight = random(&[6])?;
    check_gradient("rms_norm", &random(&[2, 3, 6])?, |x| {
        ops::rms_norm(x, &weight, 1e-5)
    })
}

#[test]
fn layer_norm_backward_matches_finite_differences() -> Result<()> {
    let weight = random(&[6])?;
    let bias = random(&[6])?;
    check_gradient("layer_norm", &random(&[2, 3, 6])?, |x| {
        ops::layer_norm(x, &weight, Some(&bias), 1e-5)
    })
}

/// A tracked norm weight (and LayerNorm bias) is a trained copy: its gradient, and the input's
/// beside it, match central differences; a frozen input beside it gets no GradStore entry.
#[test]
fn trained_norm_parameters_match_finite_differences() -> Result<()> {
    let x = random(&[2, 3, 6])?;
    let weight = random(&[6])?;
    let bias = random(&[6])?;
    check_gradient("rms_norm weight", &weight, |w| ops::rms_norm(&x, w, 1e-5))?;
    check_gradient("layer_norm weight", &weight, |w| {
        ops::layer_norm(&x, w, Some(&bias), 1e-5)
    })?;
    check_gradient("layer_norm bias", &bias, |b| {
        ops::layer_norm(&x, &weight, Some(b), 1e-5)
    })?;
    // The input's gradient through the trained path equals the frozen path's formula.
    let trained_weight = Var::from_tensor(&weight)?;
    let trained_bias = Var::from_tensor(&bias)?;
    check_gradient("rms_norm input beside a trained weight", &x, |x| {
        ops::rms_norm(x, trained_weight.as_tensor(), 1e-5)
    })?;
    check_gradient(
        "layer_norm input beside a trained weight and bias",
        &x,
        |x| {
            ops::layer_norm(
                x,
                trained_weight.as_tensor(),
                Some(trained_bias.as_tensor()),
                1e-5,
            )
        },
    )?;
    // A frozen input (layer 0's embeddings) and a frozen bias beside a trained weight: no entry.
    let y = ops::layer_norm(&x, trained_weight.as_tensor(), Some(&bias), 1e-5)?;
    let y = (ops::rms_norm(&x, trained_weight.as_tensor(), 1e-5)? + y)?;
    let grads = y.sqr()?.sum_all()?.backward()?;
    assert!(grads.get(trained_weight.as_tensor()).is_some());
    assert!(grads.get(&x).is_none(), "the frozen input got a gradient");
    assert!(grads.get(&bias).is_none(), "the frozen bias got a gradient");
    Ok(())
}

/// A trained norm weight in f32 beside a bf16 input: the forward is the frozen one's, bit for bit
/// (step-0 identity of a copy), and the weight's gradient comes back in f32, close to the f64 one.
#[test]
fn trained_norm_weight_keeps_its_dtype_and_the_frozen_forward() -> Result<()> {
    let x = random(&[3, 4, 8])?;
    let weight = random(&[8])?.affine(0.1, 1.0)?;
    let x16 = x.to_dtype(DType::BF16)?;
    let trained = Var::from_tensor(&weight.to_dtype(DType::F32)?)?;
    let frozen = ops::rms_norm(&x16, &weight.to_dtype(DType::F32)?, 1e-5)?;
    let copied = ops::rms_norm(&x16, trained.as_tensor(), 1e-5)?;
    assert!(copied.track_op() && !frozen.track_op());
    assert_eq!(
        (copied.to_dtype(DType::F32)? - frozen.to_dtype(DType::F32)?)?
            .abs()?
            .max_all()?
            .to_scalar::<f32>()?,
        0.0
    );
    let projection = projection(&[3, 4, 8], 5)?;
    let grads = (copied.to_dtype(DType::F64)? * &projection)?
        .sum_all()?
        .backward()?;
    let Some(grad) = grads.get(trained.as_tensor()) else {
        panic!("the trained weight got no gradient")
    };
    assert_eq!(grad.dtype(), DType::F32);
    let reference = Var::from_tensor(&weight)?;
    let exact = (ops::rms_norm(&x, reference.as_tensor(), 1e-5)? * &projection)?
        .sum_all()?
        .backward()?;
    let exact = exact.get(reference.as_tensor()).expect("f64 gradient");
    let error = (grad.to_dtype(DType::F64)? - exact)?
        .abs()?
        .max_all()?
        .to_scalar::<f64>()?;
    let scale = exact.abs()?.max_all()?.to_scalar::<f64>()?;
    assert!(
        error < 0.02 * scale,
        "bf16 weight gradient error {error} of {scale}"
    );
    Ok(())
}

#[test]
fn rope_backward_matches_finite_differences() -> Result<()> {
    let rope = ops::RotaryEmbedding::new(8, 10000.0, None)?;
    // Per-row positions, as with left padding and prefixes.
    let (cos, sin) = rope.tables(&[vec![0, 1, 2], vec![5, 6, 9]], &Device::Cpu, DType::F64)?;
    check_gradient("rope", &random(&[2, 3, 3, 8])?, |x| {
        ops::apply_rope(x, &cos, &sin)
    })
}

#[test]
fn softmax_backward_matches_finite_differences() -> Result<()> {
    check_gradient("softmax", &random(&[2, 3, 5])?, ops::softmax_last_dim)?;
    // Causal + left padding, queries from key 1 on (no row fully masked).
    let mask = ops::causal_mask(&[vec![false, true, true, true]], 1, 3, &Device::Cpu)?;
    check_gradient("masked_softmax", &random(&[1, 2, 3, 4])?, |x| {
        ops::masked_softmax(x, Some(&mask))
    })?;
    // A fully masked row (a padding query) stays finite: uniform, like transformers' finfo.min.
    let mask = ops::causal_mask(&[vec![false, true]], 0, 2, &Device::Cpu)?;
    let y = ops::masked_softmax(&random(&[1, 1, 2, 2])?, Some(&mask))?;
    assert_eq!(y.flatten_all()?.to_vec1::<f64>()?[..2], [0.5, 0.5]);
    Ok(())
}

#[test]
fn attention_backward_matches_finite_differences_for_q_k_v() -> Result<()> {
    // 4 query heads over 2 key/value heads, causal + padding, 2 cached keys before 3 queries.
    let mask = ops::causal_mask(
        &[vec![true; 5], vec![false, true, true, true, true]],
        2,
        3,
        &Device::Cpu,
    )?;
    let (q, k, v) = (
        random(&[2, 4, 3, 4])?,
        random(&[2, 2, 5, 4])?,
        random(&[2, 2, 5, 4])?,
    );
    let scale = 0.5;
    check_gradient("attention dq", &q, |q| {
        ops::attention(q, &k, &v, Some(&mask), scale)
    })?;
    check_gradient("attention dk", &k, |k| {
        ops::attention(&q, k, &v, Some(&mask), scale)
    })?;
    check_gradient("attention dv", &v, |v| {
        ops::attention(&q, &k, v, Some(&mask), scale)
    })
}

#[test]
fn cross_entropy_backward_matches_finite_differences() -> Result<()> {
    // The ignored position holds an out-of-vocabulary target (like -100): it must not be read.
    let targets = Tensor::new(&[[1i64, 4, -100], [0, 2, 3]], &Device::Cpu)?;
    let mask = Tensor::new(&[[1u8, 1, 0], [1, 0, 1]], &Device::Cpu)?;
    check_gradient("token_nll", &random(&[2, 3, 5])?, |logits| {
        ops::token_nll(logits, &targets, &mask)
    })?;
    check_gradient("cross_entropy mean", &random(&[2, 3, 5])?, |logits| {
        ops::cross_entropy(logits, &targets, &mask).map(|loss| loss.mean)
    })
}

#[test]
fn cross_entropy_counts_and_values_are_exact() -> Result<()> {
    let logits = random(&[2, 3, 5])?;
    let targets = Tensor::new(&[[1u32, 4, 0], [0, 2, 3]], &Device::Cpu)?;
    let mask = Tensor::new(&[[1f32, 1.0, 0.0], [1.0, 0.0, 1.0]], &Device::Cpu)?;
    let loss = ops::cross_entropy(&logits, &targets, &mask)?;
    assert_eq!(loss.count, 4);
    // Reference: candle's log_softmax + explicit picking.
    let log_probs = candle_nn::ops::log_softmax(&logits, D::Minus1)?.to_vec3::<f64>()?;
    let expected: f64 = [(0, 0, 1), (0, 1, 4), (1, 0, 0), (1, 2, 3)]
        .iter()
        .map(|&(b, t, v)| -log_probs[b][t][v])
        .sum();
    let sum = loss.sum.to_scalar::<f64>()?;
    assert!((sum - expected).abs() < 1e-12);
    assert!((loss.mean.to_scalar::<f64>()? - expected / 4.0).abs() < 1e-12);
    // A counted target outside the vocabulary is an error, not a wrong number.
    let bad = Tensor::new(&[[1u32, 9, 0], [0, 2, 3]], &Device::Cpu)?;
    assert!(ops::cross_entropy(&logits, &bad, &mask).is_err());
    Ok(())
}

#[test]
fn constant_ops_backward_matches_finite_differences() -> Result<()> {
    let constant = random(&[1, 5])?;
    check_gradient("add_constant", &random(&[3, 5])?, |x| {
        ops::add_constant(x, &constant)
    })?;
    check_gradient("mul_constant", &random(&[3, 5])?, |x| {
        ops::mul_constant(x, &constant)
    })
}

/// The activations the models use are candle's own ops: their backward must be right too.
#[test]
fn activations_backward_matches_finite_differences() -> Result<()> {
    check_gradient("silu", &random(&[4, 5])?, |x| x.silu())?;
    check_gradient("gelu (tanh)", &random(&[4, 5])?, |x| x.gelu())?;
    check_gradient("gelu (erf)", &random(&[4, 5])?, |x| x.gelu_erf())
}

/// Constants passed to the ops (masks, tables, linear weights) never get a GradStore entry, even
/// when they are `Var`s; frozen norm weights and biases (plain tensors, as the models hold them)
/// neither. (A tracked norm weight is a trained copy: `trained_norm_parameters_*`.)
#[test]
fn constants_never_receive_gradients() -> Result<()> {
    let x = Var::from_tensor(&random(&[2, 3, 4, 8])?)?;
    let norm_weight = random(&[8])?;
    let norm_bias = random(&[8])?;
    let bias = Var::from_tensor(&random(&[8])?)?;
    let linear_weight = Var::from_tensor(&random(&[8, 8])?)?;
    let rope = ops::RotaryEmbedding::new(8, 10000.0, None)?;
    let (cos, sin) = rope.tables(
        &[vec![0, 1, 2, 3], vec![0, 1, 2, 3]],
        &Device::Cpu,
        DType::F64,
    )?;
    let cos = Var::from_tensor(&cos)?;
    let sin = Var::from_tensor(&sin)?;
    let mask = Var::from_tensor(&ops::causal_mask(
        &[vec![true; 4], vec![true; 4]],
        0,
        4,
        &Device::Cpu,
    )?)?;

    let h = ops::rms_norm(x.as_tensor(), &norm_weight, 1e-5)?;
    let h = ops::layer_norm(&h, &norm_weight, Some(&norm_bias), 1e-5)?;
    let h = ops::linear(&h, linear_weight.as_tensor(), Some(bias.as_tensor()))?;
    let h = ops::apply_rope(&h, cos.as_tensor(), sin.as_tensor())?;
    let h = ops::attention(&h, &h, &h, Some(mask.as_tensor()), 0.3)?;
    let grads = h.sqr()?.sum_all()?.backward()?;
    assert!(grads.get(x.as_tensor()).is_some());
    assert!(
        grads.get(&norm_weight).is_none(),
        "norm weight got a gradient"
    );
    assert!(grads.get(&norm_bias).is_none(), "norm bias got a gradient");
    for (name, constant) in [
        ("bias", &bias),
        ("linear weight", &linear_weight),
        ("cos", &cos),
        ("sin", &sin),
        ("mask", &mask),
    ] {
        assert!(
            grads.get(constant.as_tensor()).is_none(),
            "{name} got a gradient"
        );
    }
    Ok(())
}

/// Untracked inputs build no graph: evaluation is graph-free.
#[test]
fn untracked_inputs_build_no_graph() -> Result<()> {
    let x = random(&[2, 3, 8])?;
    let weight = random(&[8])?;
    let y = ops::rms_norm(&x, &weight, 1e-5)?;
    let y = ops::softmax_last_dim(&ops::frozen_linear(&y, &random(&[8, 8])?)?)?;
    assert!(!y.track_op(), "an evaluation forward built graph nodes");
    Ok(())
}

/// The op chain in f32 agrees with f64 on CPU; on a CUDA build with a visible GPU, every op's forward and input gradient on the GPU (f32)
/// agree with the CPU path, and a bf16 run stays close (the GPU half skips, with a printed reason,
/// elsewhere).
#[test]
fn cuda_ops_agree_with_cpu() -> Result<()> {
    let rope = ops::RotaryEmbedding::new(8, 10000.0, None)?;
    let positions = [vec![0, 1, 2, 3], vec![3, 4, 5, 6]];
    let targets = Tensor::new(&[[1u32, 4, 0, 2], [0, 2, 3, 7]], &Device::Cpu)?;
    let loss_mask = Tensor::new(&[[1u8, 1, 0, 1], [1, 0, 1, 1]], &Device::Cpu)?;
    // Fixed inputs (not `random`): the tolerances below are checked against the same values on
    // every run.
    let weight = projection(&[8], 3)?;
    let bias = projection(&[8], 4)?;
    let linear_weight = (projection(&[8, 8], 5)? * 2.0)?;
    let x = (projection(&[2, 2, 4, 8], 6)? * 2.0)?;

    // The whole op chain as one function of the input, on any device and dtype.
    let chain = |x: &Tensor, device: &Device, dtype: DType| -> Result<(Tensor, Tensor)> {
        let on = |t: &Tensor| t.to_device(device)?.to_dtype(dtype);
        let variable = Var::from_tensor(&on(x)?)?;
        let (cos, sin) = rope.tables(&positions, device, dtype)?;
        let mask = ops::causal_mask(
            &[vec![true; 4], vec![false, true, true, true]],
            0,
            4,
            device,
        )?;
        let h = ops::rms_norm(variable.as_tensor(), &on(&weight)?, 1e-5)?;
        let h = ops::layer_norm(&h, &on(&weight)?, Some(&on(&bias)?), 1e-5)?;
        let h = ops::linear(&h, &on(&linear_weight)?, Some(&on(&bias)?))?;
        let h = ops::apply_rope(&h, &cos, &sin)?;
        let h = ops::attention(&h, &h, &h, Some(&mask), 0.3)?;
        // [2, 2, 4, 8] → logits [2, 4, 16] over a 16-token vocabulary.
        let logits = h.transpose(1, 2)?.reshape((2, 4, 16))?;
        let loss = ops::cross_entropy(
            &logits,
            &targets.to_device(device)?,
            &loss_mask.to_device(device)?,
        )?;
        let grads = loss.mean.backward()?;
        let Some(grad) = grads.get(variable.as_tensor()) else {
            candle_core::bail!("no gradient on {device:?}")
        };
        Ok((
            logits.to_dtype(DType::F32)?.to_device(&Device::Cpu)?,
            grad.to_dtype(DType::F32)?.to_device(&Device::Cpu)?,
        ))
    };
    let difference =
        |a: &Tensor, b: &Tensor| -> Result<f32> { (a - b)?.abs()?.max_all()?.to_scalar::<f32>() };
    // Always: the f32 CPU path agrees with the f64 one.
    let (cpu_logits, cpu_grad) = chain(&x, &Device::Cpu, DType::F32)?;
    let (f64_logits, f64_grad) = chain(&x, &Device::Cpu, DType::F64)?;
    assert!(difference(&cpu_logits, &f64_logits)? < 1e-4);
    assert!(difference(&cpu_grad, &f64_grad)? < 1e-4);
    // The bf16 path on the CPU too, against the same tolerance the GPU gets below.
    let (bf16_logits, bf16_grad) = chain(&x, &Device::Cpu, DType::BF16)?;
    let relative = |a: &Tensor, b: &Tensor| -> Result<f32> {
        Ok(difference(a, b)? / b.abs()?.max_all()?.to_scalar::<f32>()?.max(1e-3))
    };
    let (logit_error, grad_error) = (
        relative(&bf16_logits, &cpu_logits)?,
        relative(&bf16_grad, &cpu_grad)?,
    );
    eprintln!("cpu bf16 vs cpu f32 (relative to max |value|): logits {logit_error:e}, input gradient {grad_error:e}");
    assert!(logit_error < 0.06 && grad_error < 0.06);
    if !peftpipe::device::built_with_cuda() || !candle_core::utils::cuda_is_available() {
        eprintln!("skipped the GPU half: not a CUDA build, or no GPU visible");
        return Ok(());
    }
    let gpu = Device::new_cuda(0)?;
    let logit_scale = cpu_logits.abs()?.max_all()?.to_scalar::<f32>()?.max(1e-3);
    let grad_scale = cpu_grad.abs()?.max_all()?.to_scalar::<f32>()?.max(1e-3);
    let (gpu_logits, gpu_grad) = chain(&x, &gpu, DType::F32)?;
    let (logit_error, grad_error) = (
        difference(&cpu_logits, &gpu_logits)? / logit_scale,
        difference(&cpu_grad, &gpu_grad)? / grad_scale,
    );
    eprintln!("cuda f32 vs cpu (relative to max |value|): logits {logit_error:e}, input gradient {grad_error:e}");
    assert!(logit_error < 1e-5 && grad_error < 1e-5);
    let (bf16_logits, bf16_grad) = chain(&x, &gpu, DType::BF16)?;
    let (logit_error, grad_error) = (
        difference(&cpu_logits, &bf16_logits)? / logit_scale,
        difference(&cpu_grad, &bf16_grad)? / grad_scale,
    );
    eprintln!("cuda bf16 vs cpu f32 (relative to max |value|): logits {logit_error:e}, input gradient {grad_error:e}");
    assert!(logit_error < 0.06 && grad_error < 0.06);
    Ok(())
}

/// A peaked softmax in bf16: the backward must use the f32 probabilities (recomputed from the
/// input), not the bf16-rounded output, whose `1 − y` near 1 is all rounding error. Against an f64
/// reference, the bf16 input gradient stays within bf16 precision of the gradient's scale.
#[test]
fn bf16_softmax_backward_keeps_peaked_rows_accurate() -> Result<()> {
    let logits = Tensor::new(&[[9.0f64, 0.5, -1.0, 1.5, 0.0, 2.0]], &Device::Cpu)?;
    let weights = projection(&[1, 6], 5)?;
    let gradient = |dtype: DType| -> Result<Vec<f64>> {
        let variable = Var::from_tensor(&logits.to_dtype(dtype)?)?;
        let output = ops::softmax_last_dim(variable.as_tensor())?;
        let loss = (output.to_dtype(DType::F64)? * &weights)?.sum_all()?;
        let grads = loss.backward()?;
        let Some(grad) = grads.get(variable.as_tensor()) else {
            candle_core::bail!("no gradient in {dtype:?}")
        };
        grad.to_dtype(DType::F64)?.flatten_all()?.to_vec1::<f64>()
    };
    let reference = gradient(DType::F64)?;
    let bf16 = gradient(DType::BF16)?;
    let scale = reference.iter().fold(0f64, |m, g| m.max(g.abs()));
    let error = reference
        .iter()
        .zip(&bf16)
        .fold(0f64, |m, (a, b)| m.max((a - b).abs()));
    eprintln!("bf16 peaked softmax: max |Δgrad| {error:e} of max |grad| {scale:e}");
    assert!(
        error < 0.02 * scale,
        "bf16 softmax gradient {error:e} vs scale {scale:e}"
    );
    Ok(())
}

// ---- Flash attention (the op's CPU reference loops) ------------------------------------------

/// One attention case: shapes, which keys each query sees, and the explicit composition's mask.
struct AttentionCase {
    name: &'static str,
    batch: usize,
    heads: usize,
    kv_heads: usize,
    queries: usize,
    key_valid: Vec<Vec<bool>>,
    /// `Some(offset)`: causal with the queries at keys `offset..`; `None`: every key visible.
    causal: Option<usize>,
}

impl AttentionCase {
    fn keys(&self) -> usize {
        self.key_valid[0].len()
    }

    fn visible(&self, b: usize, i: usize, j: usize) -> bool {
        self.key_valid[b][j] && self.causal.is_none_or(|offset| j <= offset + i)
    }

    /// `[B, 1, T, S]`: 0 where visible, `MASK_VALUE` elsewhere (the explicit composition's mask).
    fn additive(&self) -> Result<Tensor> {
        let mut values = Vec::new();
        for b in 0..self.batch {
            for i in 0..self.queries {
                for j in 0..self.keys() {
                    values.push(if self.visible(b, i, j) {
                        0f32
                    } else {
                        ops::MASK_VALUE
                    });
                }
            }
        }
        Tensor::from_vec(
            values,
            (self.batch, 1, self.queries, self.keys()),
            &Device::Cpu,
        )
    }

    /// `[B, 1, T, 1]` f64: 1 for a query that sees some key, 0 for one that sees none.
    fn rows_seen(&self) -> Result<Tensor> {
        let values: Vec<f64> = (0..self.batch)
            .flat_map(|b| (0..self.queries).map(move |i| (b, i)))
            .map(|(b, i)| f64::from(u8::from((0..self.keys()).any(|j| self.visible(b, i, j)))))
            .collect();
        Tensor::from_vec(values, (self.batch, 1, self.queries, 1), &Device::Cpu)
    }

    fn visibility(&self) -> Result<ops::Visibility> {
        let flat: Vec<u8> = self
            .key_valid
            .iter()
            .flatten()
            .map(|&v| u8::from(v))
            .collect();
        let valid = Tensor::from_vec(flat, (self.batch, self.keys()), &Device::Cpu)?;
        Ok(ops::Visibility {
            causal: self.causal.is_some(),
            offset: self.causal.unwrap_or(0),
            key_valid: Some(valid),
        })
    }

    fn inputs(&self, dim: usize) -> Result<(Tensor, Tensor, Tensor)> {
        Ok((
            random(&[self.batch, self.heads, self.queries, dim])?,
            random(&[self.batch, self.kv_heads, self.keys(), dim])?,
            random(&[self.batch, self.kv_heads, self.keys(), dim])?,
        ))
    }
}

fn attention_cases() -> Vec<AttentionCase> {
    vec![
        AttentionCase {
            name: "gqa causal, 2 cached keys, left padding with a fully padded query",
            batch: 2,
            heads: 4,
            kv_heads: 2,
            queries: 4,
            key_valid: vec![vec![true; 6], vec![false, false, false, true, true, true]],
            causal: Some(2),
        },
        AttentionCase {
            name: "causal with a 3-key prefix visible to every query, right padding",
            batch: 2,
            heads: 2,
            kv_heads: 1,
            queries: 5,
            key_valid: vec![vec![true; 8], {
                let mut row = vec![true; 8];
                row[7] = false;
                row
            }],
            causal: Some(3),
        },
        AttentionCase {
            name: "non-causal (adapter prompt), all valid",
            batch: 1,
            heads: 3,
            kv_heads: 3,
            queries: 4,
            key_valid: vec![vec![true; 3]],
            causal: None,
        },
    ]
}

/// The flash op's forward and all three gradients equal the explicit composition on every row
/// that sees a key; a row that sees none gives 0 (not the composition's uniform average).
#[test]
fn flash_attention_matches_the_explicit_composition() -> Result<()> {
    let scale = 0.4;
    for case in attention_cases() {
        let (q, k, v) = case.inputs(5)?;
        let seen = case.rows_seen()?;
        let run = |flash: bool| -> Result<(Tensor, Vec<Tensor>)> {
            let vars = [
                Var::from_tensor(&q)?,
                Var::from_tensor(&k)?,
                Var::from_tensor(&v)?,
            ];
            let (q, k, v) = (
                vars[0].as_tensor(),
                vars[1].as_tensor(),
                vars[2].as_tensor(),
            );
            let output = if flash {
                ops::flash_attention(q, k, v, &case.visibility()?, scale)?
            } else {
                ops::attention(q, k, v, Some(&case.additive()?), scale)?
            };
            let weights = projection(output.dims(), 5)?;
            let loss = (output.broadcast_mul(&seen)? * weights)?.sum_all()?;
            let grads = loss.backward()?;
            let grads = vars
                .iter()
                .map(|var| grads.get(var.as_tensor()).cloned().expect("a gradient"))
                .collect();
            Ok((output, grads))
        };
        let (flash, flash_grads) = run(true)?;
        let (explicit, explicit_grads) = run(false)?;
        let worst = |a: &Tensor, b: &Tensor| -> Result<f64> {
            (a - b)?.abs()?.max_all()?.to_scalar::<f64>()
        };
        let error = worst(&flash, &explicit.broadcast_mul(&seen)?)?;
        assert!(error < 1e-12, "{}: forward differs by {error:e}", case.name);
        // Rows that see no key are exactly 0 (the explicit output is not, there).
        let unseen = (flash.broadcast_mul(&(1.0 - &seen)?)?).abs()?.max_all()?;
        assert_eq!(unseen.to_scalar::<f64>()?, 0.0, "{}", case.name);
        for (index, (a, b)) in flash_grads.iter().zip(&explicit_grads).enumerate() {
            let error = worst(a, b)?;
            assert!(
                error < 1e-12,
                "{}: gradient {index} differs by {error:e}",
                case.name
            );
            assert!(a.abs()?.max_all()?.to_scalar::<f64>()? > 0.0);
        }
    }
    Ok(())
}

#[test]
fn flash_attention_backward_matches_finite_differences_for_q_k_v() -> Result<()> {
    let scale = 0.5;
    for case in attention_cases() {
        let (q, k, v) = case.inputs(4)?;
        let visibility = case.visibility()?;
        let seen = case.rows_seen()?;
        let f = |q: &Tensor, k: &Tensor, v: &Tensor| {
            ops::flash_attention(q, k, v, &visibility, scale)?.broadcast_mul(&seen)
        };
        check_gradient("flash dq", &q, |q| f(q, &k, &v))?;
        check_gradient("flash dk", &k, |k| f(&q, k, &v))?;
        check_gradient("flash dv", &v, |v| f(&q, &k, v))?;
    }
    Ok(())
}

/// On the CPU, `causal_attention` is today's explicit composition, bit for bit (the models' CPU
/// outputs do not move), and the key validity never gets a gradient.
#[test]
fn causal_attention_on_the_cpu_is_the_explicit_composition() -> Result<()> {
    let key_valid = vec![
        vec![true; 7],
        vec![false, true, true, true, true, true, false],
    ];
    let mask = ops::CausalMask::new(key_valid.clone(), 3, 4, &Device::Cpu)?;
    let (q, k, v) = (
        random(&[2, 4, 4, 8])?,
        random(&[2, 2, 7, 8])?,
        random(&[2, 2, 7, 8])?,
    );
    let got = ops::causal_attention(&q, &k, &v, &mask, 0.3)?;
    let explicit = ops::attention(
        &q,
        &k,
        &v,
        Some(&ops::causal_mask(&key_valid, 3, 4, &Device::Cpu)?),
        0.3,
    )?;
    assert_eq!(
        got.flatten_all()?.to_vec1::<f64>()?,
        explicit.flatten_all()?.to_vec1::<f64>()?
    );
    let full = ops::full_attention(&q, &k, &v, 0.3)?;
    let explicit = ops::attention(&q, &k, &v, None, 0.3)?;
    assert_eq!(
        full.flatten_all()?.to_vec1::<f64>()?,
        explicit.flatten_all()?.to_vec1::<f64>()?
    );
    // The validity the kernels would take: None when all keys are real.
    assert!(mask.key_valid()?.is_some());
    let all = ops::CausalMask::new(vec![vec![true; 3]], 1, 2, &Device::Cpu)?;
    assert!(all.key_valid()?.is_none());
    assert!(ops::CausalMask::new(vec![vec![true; 3]], 2, 2, &Device::Cpu).is_err());
    Ok(())
}

/// A low-rank adapted linear (LoRA's node, `ops::low_rank_linear`) and its SwiGLU form: the
/// gradients of the input(s) and of both factors against finite differences.
#[test]
fn low_rank_linear_backward_matches_finite_differences() -> Result<()> {
    use std::sync::Arc;
    let weight = random(&[4, 6])?;
    let bias = random(&[4])?;
    let a = random(&[3, 6])?;
    let b = random(&[4, 3])?;
    let x = random(&[2, 3, 6])?;
    let up = random(&[2, 3, 6])?;
    let base = || -> Arc<dyn ops::FrozenMap> {
        Arc::new(ops::DenseMap {
            weight: weight.clone(),
            bias: Some(bias.clone()),
        })
    };
    let mask = Tensor::new(&[[1f64, 0., 2., 2., 0., 2.]; 6], &Device::Cpu)?;
    for mask in [None, Some(mask)] {
        let m = || mask.clone();
        check_gradient("low_rank_linear dx", &x, |x| {
            ops::low_rank_linear(x, base(), (&a, &b).into(), 0.7, m())
        })?;
        check_gradient("low_rank_linear dA", &a, |a| {
            ops::low_rank_linear(&x, base(), (a, &b).into(), 0.7, m())
        })?;
        check_gradient("low_rank_linear dB", &b, |b| {
            ops::low_rank_linear(&x, base(), (&a, b).into(), 0.7, m())
        })?;
        check_gradient("low_rank_swiglu_linear d_gate", &x, |gate| {
            ops::low_rank_swiglu_linear(gate, &up, base(), (&a, &b).into(), 0.7, m())
        })?;
        check_gradient("low_rank_swiglu_linear d_up", &up, |up| {
            ops::low_rank_swiglu_linear(&x, up, base(), (&a, &b).into(), 0.7, m())
        })?;
        // A and B enter the SwiGLU form as one concatenated input, split again by its backward.
        check_gradient("low_rank_swiglu_linear dA", &a, |a| {
            ops::low_rank_swiglu_linear(&x, &up, base(), (a, &b).into(), 0.7, m())
        })?;
        check_gradient("low_rank_swiglu_linear dB", &b, |b| {
            ops::low_rank_swiglu_linear(&x, &up, base(), (&a, b).into(), 0.7, m())
        })?;
    }
    Ok(())
}

/// The same node on CUDA (where the update accumulates inside cuBLAS, β = 1) against the CPU f32
/// path, for bf16 and f32, with and without a dropout mask and in the SwiGLU form: values and the
/// gradients of every input, relative to their scale (bf16 band 3e-2; f32 1e-5).
#[test]
fn low_rank_linear_on_cuda_agrees_with_the_cpu() -> Result<()> {
    use std::sync::Arc;
    if !peftpipe::device::built_with_cuda() || !candle_core::utils::cuda_is_available() {
        eprintln!("skipped: not a CUDA build, or no GPU visible");
        return Ok(());
    }
    let gpu = Device::new_cuda(0)?;
    let (rows, input, output, rank) = (37, 64, 48, 8);
    let weight = (random(&[output, input])? * 0.2)?;
    let a = (random(&[rank, input])? * 0.2)?;
    let b = (random(&[output, rank])? * 0.2)?;
    let x = random(&[rows, input])?;
    let up = random(&[rows, input])?;
    let keep = Tensor::rand(0f64, 1.0, (rows, input), &Device::Cpu)?
        .ge(0.25)?
        .to_dtype(DType::F64)?
        .affine(1.0 / 0.75, 0.0)?;
    type Outputs = Vec<Tensor>;
    let run = |device: &Device, dtype: DType, mask: bool, swiglu: bool| -> Result<Outputs> {
        let on = |t: &Tensor| t.to_device(device)?.to_dtype(dtype);
        let x = Var::from_tensor(&on(&x)?)?;
        let up = Var::from_tensor(&on(&up)?)?;
        let a = Var::from_tensor(&a.to_device(device)?.to_dtype(DType::F32)?)?;
        let b = Var::from_tensor(&b.to_device(device)?.to_dtype(DType::F32)?)?;
        let base: Arc<dyn ops::FrozenMap> = Arc::new(ops::DenseMap {
            weight: on(&weight)?,
            bias: None,
        });
        let mask = mask.then(|| on(&keep)).transpose()?;
        let y = if swiglu {
            ops::low_rank_swiglu_linear(
                x.as_tensor(),
                up.as_tensor(),
                base,
                (a.as_tensor(), b.as_tensor()).into(),
                2.0,
                mask,
            )?
        } else {
            ops::low_rank_linear(
                x.as_tensor(),
                base,
                (a.as_tensor(), b.as_tensor()).into(),
                2.0,
                mask,
            )?
        };
        let projection = on(&projection(&[rows, output], 9)?)?;
        let grads = y.mul(&projection)?.sum_all()?.backward()?;
        let mut outputs = vec![y];
        let mut tracked = vec![&x, &a, &b];
        if swiglu {
            tracked.push(&up);
        }
        for var in tracked {
            let Some(grad) = grads.get(var.as_tensor()) else {
                candle_core::bail!("no gradient on {device:?}")
            };
            outputs.push(grad.clone());
        }
        outputs
            .into_iter()
            .map(|t| t.to_dtype(DType::F32)?.to_device(&Device::Cpu))
            .collect()
    };
    for swiglu in [false, true] {
        for mask in [false, true] {
            let reference = run(&Device::Cpu, DType::F32, mask, swiglu)?;
            for (dtype, tolerance) in [(DType::F32, 1e-5f32), (DType::BF16, 3e-2)] {
                let ours = run(&gpu, dtype, mask, swiglu)?;
                for (index, (got, want)) in ours.iter().zip(&reference).enumerate() {
                    let scale = want.abs()?.max_all()?.to_scalar::<f32>()?.max(1e-3);
                    let error = (got - want)?.abs()?.max_all()?.to_scalar::<f32>()? / scale;
                    eprintln!("low-rank {dtype:?} swiglu={swiglu} mask={mask} output {index}: relative error {error:e}");
                    assert!(
                        error.is_finite() && error < tolerance,
                        "output {index}: {error:e}"
                    );
                }
            }
        }
    }
    Ok(())
}

/// The fused CUDA RMSNorm with a trained weight (f32 copy, bf16 or f32 input): the output, the
/// input's gradient and the weight's gradient agree with the CPU path; a frozen weight beside it
/// still gets no GradStore entry on the GPU.
#[test]
fn trained_rms_norm_weight_on_cuda_agrees_with_the_cpu() -> Result<()> {
    if !peftpipe::device::built_with_cuda() || !candle_core::utils::cuda_is_available() {
        eprintln!("skipped: not a CUDA build, or no GPU visible");
        return Ok(());
    }
    let gpu = Device::new_cuda(0)?;
    let x = random(&[3, 5, 64])?;
    let weight = random(&[64])?.affine(0.1, 1.0)?;
    let projection = projection(&[3, 5, 64], 9)?;
    let run = |device: &Device, dtype: DType, tracked_input: bool| -> Result<Vec<Tensor>> {
        let x = Var::from_tensor(&x.to_device(device)?.to_dtype(dtype)?)?;
        let input = if tracked_input {
            x.as_tensor().clone()
        } else {
            x.as_tensor().detach()
        };
        let trained = Var::from_tensor(&weight.to_device(device)?.to_dtype(DType::F32)?)?;
        let frozen = weight.to_device(device)?.to_dtype(dtype)?;
        let y = ops::rms_norm(&input, trained.as_tensor(), 1e-5)?;
        let z = ops::rms_norm(&y, &frozen, 1e-5)?;
        let loss = (z.to_dtype(DType::F32)?
            * projection.to_device(device)?.to_dtype(DType::F32)?)?
        .sum_all()?;
        let grads = loss.backward()?;
        assert!(
            grads.get(&frozen).is_none(),
            "the frozen weight got a gradient"
        );
        let Some(dw) = grads.get(trained.as_tensor()) else {
            candle_core::bail!("no weight gradient on {device:?}")
        };
        assert_eq!(dw.dtype(), DType::F32);
        let mut out = vec![
            z.to_dtype(DType::F32)?.to_device(&Device::Cpu)?,
            dw.to_device(&Device::Cpu)?,
        ];
        match grads.get(x.as_tensor()) {
            Some(dx) if tracked_input => {
                out.push(dx.to_dtype(DType::F32)?.to_device(&Device::Cpu)?)
            }
            None if !tracked_input => {}
            _ => candle_core::bail!("the input's gradient does not follow its tracking"),
        }
        Ok(out)
    };
    let relative = |a: &Tensor, b: &Tensor| -> Result<f32> {
        let scale = b.abs()?.max_all()?.to_scalar::<f32>()?.max(1e-3);
        Ok((a - b)?.abs()?.max_all()?.to_scalar::<f32>()? / scale)
    };
    for tracked_input in [true, false] {
        let cpu = run(&Device::Cpu, DType::F32, tracked_input)?;
        for (dtype, tolerance) in [(DType::F32, 1e-5), (DType::BF16, 0.03)] {
            let cuda = run(&gpu, dtype, tracked_input)?;
            for (what, (a, b)) in ["output", "weight gradient", "input gradient"]
                .iter()
                .zip(cuda.iter().zip(&cpu))
            {
                let error = relative(a, b)?;
                eprintln!("{dtype:?} {what} (input tracked: {tracked_input}): {error:e}");
                assert!(error < tolerance, "{dtype:?} {what}: {error}");
            }
        }
    }
    Ok(())
}

/// The vendored candle-core's `GradStore::accumulate` keeps a gradient that arrives as a permuted
/// view of a dense buffer as it is (attention's q, k, v gradients arrive transposed: copying them
/// cost 8 strided copies per decoder layer on the H200) and makes any other view contiguous, as
/// the add made it (a narrowed gradient has rows wider than themselves, which cuBLAS refuses in a
/// matmul).
#[test]
fn the_gradient_store_keeps_transposed_gradients_and_compacts_narrowed_ones() -> Result<()> {
    let a = Var::from_tensor(&random(&[4, 3])?)?;
    let weights = projection(&[3, 4], 5)?;
    let grads = (a.as_tensor().t()? * &weights)?.sum_all()?.backward()?;
    let Some(gradient) = grads.get(a.as_tensor()) else {
        panic!("no gradient reached a")
    };
    assert!(
        !gradient.is_contiguous(),
        "the transposed gradient was copied: {:?}",
        gradient.layout()
    );
    assert_eq!(gradient.to_vec2::<f64>()?, weights.t()?.to_vec2::<f64>()?);

    let b = Var::from_tensor(&random(&[4, 2])?)?;
    let joined = Tensor::cat(&[b.as_tensor(), &random(&[4, 1])?], 1)?;
    let weights = projection(&[4, 3], 9)?;
    let grads = (joined * &weights)?.sum_all()?.backward()?;
    let Some(gradient) = grads.get(b.as_tensor()) else {
        panic!("no gradient reached b")
    };
    assert!(
        gradient.is_contiguous(),
        "the narrowed gradient was kept as a view: {:?}",
        gradient.layout()
    );
    assert_eq!(
        gradient.to_vec2::<f64>()?,
        weights.narrow(1, 0, 2)?.to_vec2::<f64>()?
    );
    Ok(())
}
