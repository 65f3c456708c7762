//! Scaled dot-product attention with grouped key/value heads and a constant additive mask.
//!
//! Owns [`attention`] (explicit `softmax(q·kᵀ·scale + mask)·v`, differentiable through candle's
//! matmul and our [`masked_softmax`]) and [`causal_mask`], which builds the additive mask from
//! per-key validity (padding) and causality. GQA never copies keys/values: the query heads that share
//! a key/value head are folded into the query-length axis. Must not: use candle's `sdpa` or
//! `softmax_last_dim` on tracked tensors (no backward), or give the mask a gradient.

use candle_core::{bail, DType, Device, Result, Tensor};

use super::constant::matmul_tracked;
use super::softmax::masked_softmax;

/// The additive value of a masked position: finite, so a fully masked row (a padding query) gives a
/// uniform distribution instead of NaN, as transformers' `finfo.min` masks do.
pub const MASK_VALUE: f32 = f32::MIN;

/// Additive mask `[B, 1, Tq, S]` (f32): key `j` is visible to query `i` iff `key_valid[b][j]` and
/// `j <= first_query + i` (the queries are the keys `first_query..first_query + Tq`).
pub fn causal_mask(
    key_valid: &[Vec<bool>],
    first_query: usize,
    num_queries: usize,
    device: &Device,
) -> Result<Tensor> {
    let batch = key_valid.len();
    let keys = key_valid.first().map_or(0, Vec::len);
    if key_valid.iter().any(|row| row.len() != keys) {
        bail!("causal_mask: key rows have different lengths")
    }
    if first_query + num_queries > keys {
        bail!("causal_mask: {num_queries} queries from key {first_query} exceed {keys} keys")
    }
    let mut values = Vec::with_capacity(batch * num_queries * keys);
    for row in key_valid {
        for query in 0..num_queries {
            let last_visible = first_query + query;
            values.extend(row.iter().enumerate().map(|(key, &valid)| {
                if valid && key <= last_visible {
                    0.0
                } else {
                    MASK_VALUE
                }
            }));
        }
    }
    Tensor::from_vec(values, (batch, 1, num_queries, keys), device)
}

/// `softmax(q·kᵀ·scale + mask)·v` for `q [B, H, T, D]`, `k`, `v` `[B, KVH, S, D]` with `H` a
/// multiple of `KVH` (query head `h` uses key/value head `h / (H/KVH)`, as transformers'
/// `repeat_kv`), `mask` additive and broadcastable to `[B, H, T, S]` (or `[B, 1, T, S]`).
/// Returns `[B, H, T, D]`.
pub fn attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    mask: Option<&Tensor>,
    scale: f64,
) -> Result<Tensor> {
    let (batch, heads, queries, head_dim) = q.dims4()?;
    let (k_batch, kv_heads, keys, k_dim) = k.dims4()?;
    if k.dims() != v.dims() || k_batch != batch || k_dim != head_dim {
        bail!(
            "attention: q {:?}, k {:?}, v {:?} are inconsistent",
            q.shape(),
            k.shape(),
            v.shape()
        )
    }
    if kv_heads == 0 || heads % kv_heads != 0 {
        bail!("attention: {heads} query heads are not a multiple of {kv_heads} key/value heads")
    }
    let group = heads / kv_heads;
    // [B, H, T, D] → [B, KVH, group·T, D]: the heads sharing a kv head become extra query rows.
    let q = q
        .contiguous()?
        .reshape((batch, kv_heads, group * queries, head_dim))?;
    // `matmul_tracked`: a frozen query (layer 0's under prefix tuning) or frozen keys/values get
    // no gradient.
    let scores = matmul_tracked(&q, &k.contiguous()?.t()?)?;
    let scores = (scores.reshape((batch, heads, queries, keys))? * scale)?;
    let probabilities = match mask {
        Some(mask) => {
            let mask = match mask.rank() {
                4 => mask.clone(),
                other => bail!("attention: mask must be rank 4, got rank {other}"),
            };
            masked_softmax(&scores, Some(&mask.to_dtype(DType::F32)?))?
        }
        None => masked_softmax(&scores, None)?,
    };
    let probabilities = probabilities.reshape((batch, kv_heads, group * queries, keys))?;
    matmul_tracked(&probabilities, &v.contiguous()?)?.reshape((batch, heads, queries, head_dim))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn causal_mask_hides_future_and_padding() -> Result<()> {
        let mask = causal_mask(&[vec![false, true, true]], 0, 3, &Device::Cpu)?;
        let rows = mask.squeeze(0)?.squeeze(0)?.to_vec2::<f32>()?;
        assert_eq!(rows[0], vec![MASK_VALUE, MASK_VALUE, MASK_VALUE]);
        assert_eq!(rows[1], vec![MASK_VALUE, 0.0, MASK_VALUE]);
        assert_eq!(rows[2], vec![MASK_VALUE, 0.0, 0.0]);
        Ok(())
    }

    /// GQA by folding query heads must equal explicit `repeat_kv` (repeat_interleave on heads).
    #[test]
    fn grouped_heads_match_repeated_key_values() -> Result<()> {
        let device = Device::Cpu;
        let q = Tensor::randn(0f64, 1.0, (2, 4, 3, 5), &device)?;
        let k = Tensor::randn(0f64, 1.0, (2, 2, 3, 5), &device)?;
        let v = Tensor::randn(0f64, 1.0, (2, 2, 3, 5), &device)?;
        let grouped = attention(&q, &k, &v, None, 0.5)?;
        let repeat = |t: &Tensor| -> Result<Tensor> {
            t.unsqueeze(2)?
                .broadcast_as((2, 2, 2, 3, 5))?
                .reshape((2, 4, 3, 5))
        };
        let explicit = attention(&q, &repeat(&k)?, &repeat(&v)?, None, 0.5)?;
        let difference = (grouped - explicit)?.abs()?.max_all()?.to_scalar::<f64>()?;
        assert!(difference < 1e-12);
        Ok(())
    }
}
