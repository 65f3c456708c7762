//! Cross-entropy in f32 with an ignore mask, for training loss, perplexity and choice scoring.
//!
//! Owns [`token_nll`] (per-token negative log-likelihood, zero where the mask is 0; backward
//! `dlogits = (softmax − onehot)·g·mask`, with the softmax recomputed from the logits instead of kept),
//! [`cross_entropy`] (mean over the counted tokens, plus the sum and count for perplexity) and
//! [`next_token_cross_entropy`] (the causal-LM shift). Logits of any float dtype are upcast to f32
//! (f64 stays f64). Must not: count ignored tokens, or read targets at ignored positions (they may
//! hold any value, e.g. a pad id or -100).

use candle_core::{bail, DType, Result, Tensor, D};

use super::attach::with_backward;
use super::linear::frozen_linear;

/// Mean negative log-likelihood over the counted tokens, with the sum and count behind it.
#[derive(Debug, Clone)]
pub struct CrossEntropy {
    /// `sum / count` (0 when nothing is counted), a scalar in f32 (f64 for f64 logits).
    pub mean: Tensor,
    /// Summed NLL over the counted tokens (scalar).
    pub sum: Tensor,
    /// Number of counted tokens (mask ≠ 0).
    pub count: usize,
}

impl CrossEntropy {
    /// `exp(sum / count)` as an f64 (reads the sum back from the device).
    pub fn perplexity(&self) -> Result<f64> {
        let sum = self.sum.to_dtype(DType::F64)?.to_scalar::<f64>()?;
        Ok((sum / self.count.max(1) as f64).exp())
    }
}

fn internal_dtype(dtype: DType) -> DType {
    match dtype {
        DType::F64 => DType::F64,
        _ => DType::F32,
    }
}

/// Per-token NLL `−log softmax(logits)[target]`, multiplied by the mask (0 = ignored).
///
/// `logits [.., V]`; `targets [..]` (any integer dtype; values at ignored positions are not read);
/// `mask [..]` (any dtype, nonzero = counted). Returns `[..]` in f32 (f64 for f64 logits). A counted
/// target outside `0..V` is an error. The gradient reaches `logits` only.
pub fn token_nll(logits: &Tensor, targets: &Tensor, mask: &Tensor) -> Result<Tensor> {
    let dims = logits.dims();
    let Some((&vocab, lead)) = dims.split_last() else {
        bail!("token_nll: logits must have a vocabulary dimension")
    };
    if targets.dims() != lead || mask.dims() != lead {
        bail!(
            "token_nll: logits {:?}, targets {:?} and mask {:?} do not line up",
            logits.shape(),
            targets.shape(),
            mask.shape()
        )
    }
    let count: usize = lead.iter().product();
    let device = logits.device();
    let internal = internal_dtype(logits.dtype());

    // Targets and mask go through the host: validate counted targets, neutralise ignored ones.
    let mask_values = mask.flatten_all()?.to_dtype(DType::F64)?.to_vec1::<f64>()?;
    let target_values = targets
        .flatten_all()?
        .to_dtype(DType::I64)?
        .to_vec1::<i64>()?;
    let mut checked = Vec::with_capacity(count);
    for (index, (&target, &weight)) in target_values.iter().zip(&mask_values).enumerate() {
        if weight == 0.0 {
            checked.push(0u32);
        } else if target < 0 || target as u64 >= vocab as u64 {
            bail!("token_nll: target {target} at flat position {index} is outside the vocabulary 0..{vocab}")
        } else {
            checked.push(target as u32);
        }
    }
    let targets = Tensor::from_vec(checked, (count, 1), device)?;
    let weights = Tensor::from_vec(
        mask_values
            .iter()
            .map(|&w| if w == 0.0 { 0.0 } else { 1.0 })
            .collect::<Vec<f64>>(),
        count,
        device,
    )?
    .to_dtype(internal)?;

    let flat = logits
        .detach()
        .reshape((count, vocab))?
        .to_dtype(internal)?;
    let max = flat.max_keepdim(D::Minus1)?;
    let log_sum_exp = (flat
        .broadcast_sub(&max)?
        .exp()?
        .sum_keepdim(D::Minus1)?
        .log()?
        + &max)?;
    let picked = flat.gather(&targets, D::Minus1)?;
    let nll = ((log_sum_exp - picked)?.squeeze(1)? * &weights)?;
    let output = nll.reshape(lead)?;

    let logits_dtype = logits.dtype();
    with_backward("token-nll", logits, output, move |logits, _y, grad| {
        let flat = logits
            .detach()
            .reshape((count, vocab))?
            .to_dtype(internal)?;
        let grad = (grad.reshape(count)?.to_dtype(internal)? * &weights)?.unsqueeze(1)?;
        let probabilities = candle_nn::ops::softmax_last_dim(&flat)?;
        let dlogits = probabilities.broadcast_mul(&grad)?;
        let dlogits = dlogits.scatter_add(&targets, &grad.neg()?, D::Minus1)?;
        dlogits.reshape(logits.shape())?.to_dtype(logits_dtype)
    })
}

/// Masked mean cross-entropy (see [`token_nll`]) with the sum and count for perplexity.
pub fn cross_entropy(logits: &Tensor, targets: &Tensor, mask: &Tensor) -> Result<CrossEntropy> {
    let nll = token_nll(logits, targets, mask)?;
    let count = mask
        .flatten_all()?
        .to_dtype(DType::F64)?
        .to_vec1::<f64>()?
        .iter()
        .filter(|&&w| w != 0.0)
        .count();
    let sum = nll.sum_all()?;
    let mean = (&sum * (1.0 / count.max(1) as f64))?;
    Ok(CrossEntropy { mean, sum, count })
}

/// The causal-LM loss: the logits at position `t` predict `input_ids[t + 1]`, counted where
/// `loss_mask[t + 1]` is nonzero (the mask marks the *target* tokens, e.g. the completion).
/// `logits [B, T, V]`, `input_ids [B, T]`, `loss_mask [B, T]`.
pub fn next_token_cross_entropy(
    logits: &Tensor,
    input_ids: &Tensor,
    loss_mask: &Tensor,
) -> Result<CrossEntropy> {
    let (_batch, length, _vocab) = logits.dims3()?;
    if length < 2 {
        bail!("next_token_cross_entropy: sequences of length {length} predict nothing")
    }
    let predicting = logits.narrow(1, 0, length - 1)?;
    let targets = input_ids.narrow(1, 1, length - 1)?;
    let mask = loss_mask.narrow(1, 1, length - 1)?;
    cross_entropy(&predicting, &targets, &mask)
}

#[cfg(feature = "cuda")]
/// Counted targets (0 where ignored) and 0/1 weights, read on the host; a counted target outside
/// `0..vocab` is an error naming its flat position.
fn checked_targets(targets: &Tensor, mask: &Tensor, vocab: usize) -> Result<(Vec<u32>, Vec<f32>)> {
    let mask_values = mask.flatten_all()?.to_dtype(DType::F64)?.to_vec1::<f64>()?;
    let target_values = targets
        .flatten_all()?
        .to_dtype(DType::I64)?
        .to_vec1::<i64>()?;
    let mut checked = Vec::with_capacity(target_values.len());
    let mut weights = Vec::with_capacity(target_values.len());
    for (index, (&target, &weight)) in target_values.iter().zip(&mask_values).enumerate() {
        if weight == 0.0 {
            checked.push(0u32);
            weights.push(0.0f32);
        } else if target < 0 || target as u64 >= vocab as u64 {
            bail!("linear_cross_entropy: target {target} at flat position {index} is outside the vocabulary 0..{vocab}")
        } else {
            checked.push(target as u32);
            weights.push(1.0f32);
        }
    }
    Ok((checked, weights))
}

/// [`cross_entropy`] of the logits `hidden · weightᵀ` (`hidden [.., H]`, `weight [V, H]` frozen:
/// the gradient reaches `hidden` only), with the same ignore mask and result.
///
/// On CUDA (bf16/f32) the logits never exist whole: `ops::cuda` runs it in chunks of rows, each
/// chunk's logits turned into the loss and `dlogits` by one kernel each and into `dhidden` by one
/// GEMM, so the `[N, V]` f32 logits and their gradient (2 GiB each at 8 × 512 × 128k) are never
/// allocated. Elsewhere it is `cross_entropy(frozen_linear(hidden, weight))`, the reference.
/// `targets` and `mask` are read on the host (checked there): host tensors cost nothing, device
/// ones a copy that waits for every kernel queued before it (the trainers pass host tensors).
pub fn linear_cross_entropy(
    hidden: &Tensor,
    weight: &Tensor,
    targets: &Tensor,
    mask: &Tensor,
) -> Result<CrossEntropy> {
    let dims = hidden.dims();
    let Some((&width, lead)) = dims.split_last() else {
        bail!("linear_cross_entropy: hidden states must have a feature dimension")
    };
    let (vocab, weight_width) = weight.dims2()?;
    if weight_width != width || targets.dims() != lead || mask.dims() != lead {
        bail!(
            "linear_cross_entropy: hidden {:?}, weight {:?}, targets {:?} and mask {:?} do not line up",
            hidden.shape(),
            weight.shape(),
            targets.shape(),
            mask.shape()
        )
    }
    #[cfg(feature = "cuda")]
    if super::cuda::applies("cross_entropy", hidden) && weight.dtype() == hidden.dtype() {
        let rows: usize = lead.iter().product();
        let (checked, weights) = checked_targets(targets, mask, vocab)?;
        let count = weights.iter().filter(|&&w| w != 0.0).count();
        let flat = hidden.reshape((rows, width))?;
        let sum = super::cuda::linear_cross_entropy_sum(&flat, weight, &checked, &weights)?;
        let mean = (&sum * (1.0 / count.max(1) as f64))?;
        return Ok(CrossEntropy { mean, sum, count });
    }
    let _ = vocab;
    cross_entropy(&frozen_linear(hidden, weight)?, targets, mask)
}

/// The causal-LM loss of [`next_token_cross_entropy`] on the logits `hidden · weightᵀ`, through
/// [`linear_cross_entropy`]: position `t` predicts `input_ids[t + 1]` where `loss_mask[t + 1]` is
/// nonzero. On CUDA every row of `hidden [B, T, H]` is used as it is (the last position of each
/// row is simply not counted), so the hidden states are not copied for the shift.
pub fn next_token_linear_cross_entropy(
    hidden: &Tensor,
    weight: &Tensor,
    input_ids: &Tensor,
    loss_mask: &Tensor,
) -> Result<CrossEntropy> {
    let (batch, length, _width) = hidden.dims3()?;
    if length < 2 {
        bail!("next_token_linear_cross_entropy: sequences of length {length} predict nothing")
    }
    #[cfg(feature = "cuda")]
    if super::cuda::applies("cross_entropy", hidden) && weight.dtype() == hidden.dtype() {
        // Targets shifted left by one; the last position of every row gets mask 0.
        let shift = |t: &Tensor, fill: &Tensor| -> Result<Tensor> {
            Tensor::cat(&[&t.narrow(1, 1, length - 1)?, fill], 1)
        };
        let ids_fill = input_ids.narrow(1, 0, 1)?;
        let mask_fill = loss_mask.narrow(1, 0, 1)?.zeros_like()?;
        let _ = batch;
        return linear_cross_entropy(
            hidden,
            weight,
            &shift(input_ids, &ids_fill)?,
            &shift(loss_mask, &mask_fill)?,
        );
    }
    let _ = batch;
    let logits = frozen_linear(hidden, weight)?;
    next_token_cross_entropy(&logits, input_ids, loss_mask)
}
