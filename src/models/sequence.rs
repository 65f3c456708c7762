//! The per-call sequence bookkeeping both architectures share: which keys exist (cached, prefix,
//! virtual, new), which are valid, the query tokens' position ids, and the additive attention mask.
//!
//! Position ids are counted from the validity of the keys before each query (transformers'
//! `cumsum(mask) − 1`), so left and right padding give every real token the same positions, prefix
//! tuning's real tokens start after the prefix and prompt tuning's virtual tokens take `0..n`.
//! Must not: touch weights or build graph nodes.

use candle_core::{bail, DType, Device, Result, Tensor};

use super::{Hooks, KvCache};
use crate::ops::CausalMask;

/// What one forward call attends over.
pub(crate) struct Step {
    pub batch: usize,
    /// Prefix-tuning key/values prepended in this call (0 when the cache already holds them).
    pub prefix_len: usize,
    /// Prompt-tuning embeddings prepended to this call's inputs (0 with a non-empty cache).
    pub virtual_len: usize,
    /// Position ids of this call's queries (virtual + new tokens), `[B][virtual_len + T]`.
    pub positions: Vec<Vec<u32>>,
    /// What the `virtual_len + T` queries see of the keys (validity + causality).
    pub mask: CausalMask,
    /// Validity of all keys after this call (what the cache keeps).
    pub key_valid: Vec<Vec<bool>>,
}

/// Rows of `mask` (`[B, T]`, any dtype, nonzero = valid) as booleans; all valid when absent.
pub(crate) fn mask_rows(
    mask: Option<&Tensor>,
    batch: usize,
    length: usize,
) -> Result<Vec<Vec<bool>>> {
    let Some(mask) = mask else {
        return Ok(vec![vec![true; length]; batch]);
    };
    if mask.dims() != [batch, length] {
        bail!(
            "attention_mask {:?} does not match input_ids [{batch}, {length}]",
            mask.shape()
        )
    }
    Ok(mask
        .to_dtype(DType::F32)?
        .to_vec2::<f32>()?
        .into_iter()
        .map(|row| row.into_iter().map(|value| value != 0.0).collect())
        .collect())
}

pub(crate) fn plan(
    input_ids: &Tensor,
    attention_mask: Option<&Tensor>,
    hooks: &Hooks,
    cache: Option<&KvCache>,
    device: &Device,
) -> Result<Step> {
    let (batch, length) = input_ids.dims2()?;
    let new_valid = mask_rows(attention_mask, batch, length)?;
    let first_call = cache.is_none_or(KvCache::is_empty);
    let prefix_len = match (&hooks.layer_prefix, first_call) {
        (Some(layers), true) => match layers.first() {
            Some((key, _)) => key.dim(2)?,
            None => 0,
        },
        _ => 0,
    };
    let virtual_len = match (&hooks.input_prefix, first_call) {
        (Some(prefix), true) => prefix.dim(1)?,
        _ => 0,
    };
    let past: Vec<Vec<bool>> = match cache {
        Some(cache) if !cache.is_empty() => {
            if cache.valid.len() != batch {
                bail!(
                    "the KV cache holds {} sequences but input_ids has {batch}",
                    cache.valid.len()
                )
            }
            cache.valid.clone()
        }
        _ => vec![Vec::new(); batch],
    };
    let past_len = past.first().map_or(0, Vec::len);
    let key_valid: Vec<Vec<bool>> = past
        .into_iter()
        .zip(&new_valid)
        .map(|(mut row, new)| {
            row.extend(std::iter::repeat_n(true, prefix_len + virtual_len));
            row.extend(new);
            row
        })
        .collect();
    let first_query = past_len + prefix_len;
    let queries = virtual_len + length;
    let positions = key_valid
        .iter()
        .map(|row| {
            let mut seen = 0u32;
            let mut counts = Vec::with_capacity(row.len());
            for &valid in row {
                seen += u32::from(valid);
                counts.push(seen.saturating_sub(1));
            }
            counts[first_query..first_query + queries].to_vec()
        })
        .collect();
    let mask = CausalMask::new(key_valid.clone(), first_query, queries, device)?;
    Ok(Step {
        batch,
        prefix_len,
        virtual_len,
        positions,
        mask,
        key_valid,
    })
}

/// Broadcast a hook tensor `[1 | B, ..]` to batch `batch`, cast to `dtype`.
pub(crate) fn expand_batch(
    tensor: &Tensor,
    batch: usize,
    dtype: DType,
    what: &str,
) -> Result<Tensor> {
    let tensor = tensor.to_dtype(dtype)?;
    let dims = tensor.dims().to_vec();
    match dims.first() {
        Some(&b) if b == batch => Ok(tensor),
        Some(1) => {
            let mut target = dims;
            target[0] = batch;
            tensor.broadcast_as(target)?.contiguous()
        }
        _ => bail!(
            "{what} {:?} must have batch size 1 or {batch}",
            tensor.shape()
        ),
    }
}
