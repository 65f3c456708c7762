//! Our own causal LM code on candle (Llama family incl. Qwen2-style q/k/v bias, GPT-2):
//! `load(vb, cfg, factory)` + `forward`, weight names mirroring the checkpoint.
//!
//! Knows nothing of pipelines or PEFT configs. PEFT methods plug in through two seams:
//! - [`LinearFactory`]: every linear layer (attention, MLP, `lm_head`) is built by the factory from
//!   its frozen base weights and its Hugging Face module path, so LoRA/QLoRA wrap layers without
//!   forking model code. [`FrozenLinearFactory`] builds plain frozen layers. A layer whose base
//!   is stored in 4 bits ([`QuantizedLinearWeights`], made by `quantized::QuantizingFactory`
//!   while the model loads) is built through [`LinearFactory::build_quantized`].
//! - [`Hooks`]: per forward call, extra input embeddings prepended (prompt tuning), extra key/values
//!   per layer prepended (prefix tuning: no RoPE on them, real positions start after them) and a
//!   gated adapter branch per layer (LLaMA-Adapter / PEFT `adaption_prompt`), replaced rows
//!   of the token-embedding table ([`EmbeddingRows`]: PEFT's trainable tokens, a trained copy),
//!   and replaced weights of normalization layers by module path ([`NormWeights`]: a trained
//!   copy, PEFT's `modules_to_save`); [`CausalLm::norms`] lists the frozen ones.
//!
//! The public surface for train/eval code is [`CausalLm`] (one trait for both architectures),
//! [`ModelDir`] (a Hugging Face model directory: config, weights, tokenizer files) and
//! [`generate::greedy`]. Every op on the training path comes from `crate::ops` (none of candle's
//! no-backward fused ops); base weights are never tracked, so a forward without trainable vars
//! builds no graph (evaluation).
//!
//! Must not: read pipeline configs, know PEFT method names, print, or create trainable vars.

use std::collections::BTreeMap;

use candle_core::{DType, Device, Result, Tensor};

pub mod checkpoint;
pub mod config;
pub mod generate;
pub mod gguf;
pub mod gpt2;
pub mod hub;
pub mod llama;
pub mod load;
pub mod quantized;
pub mod quantized_writer;
pub mod random;
mod sequence;
pub mod summary;
pub mod tokenizer;

pub use config::{Architecture, Gpt2Config, LinearSpec, LlamaConfig, ModelConfig};
pub use hub::{resolve_model_path, HubError, HubId};
pub use load::{ModelDir, ModelError, TensorInfo};
pub use tokenizer::{GenerationConfig, ModelTokenizer};

/// A linear layer as a model uses it: `y = x·Wᵀ (+ b)` or any adapted variant.
pub trait LinearLayer: Send + Sync {
    /// The output is the caller's: no backward of the layer reads it (gradients come from the
    /// inputs and weights), so a model may write into it (`ops::rope_heads`, `ops::add_residual`
    /// do so on CUDA when its buffer is shared with no other tensor). The same holds for
    /// [`LinearLayer::forward_swiglu`].
    fn forward(&self, x: &Tensor) -> Result<Tensor>;

    /// `forward(silu(gate) · up)`: a Llama MLP's down projection. A layer may compute it without
    /// keeping the product alive for the backward (LoRA: `ops::low_rank_swiglu_linear`).
    fn forward_swiglu(&self, gate: &Tensor, up: &Tensor) -> Result<Tensor> {
        self.forward(&crate::ops::swiglu(gate, up)?)
    }

    /// `forward(rms_norm(x))` of an RMSNorm's output (a decoder layer's q/k/v or gate/up). A layer
    /// may compute it without keeping the norm's output alive for the backward
    /// (`ops::NormedInput`: LoRA through `ops::low_rank_norm_linear`, frozen layers through
    /// `ops::frozen_norm_linear`); the default reads the plain norm node.
    fn forward_normed(&self, x: &crate::ops::NormedInput) -> Result<Tensor> {
        self.forward(&x.normed()?)
    }

    /// `Some(W)` when the layer is exactly the frozen `x·Wᵀ` (no bias, no adapter), so a loss may
    /// fuse the projection (`ops::next_token_linear_cross_entropy`); `None` otherwise.
    fn frozen_weight(&self) -> Option<&Tensor> {
        None
    }
}

/// The frozen base weights of one linear layer, in `[out, in]` layout (GPT-2's Conv1D weights are
/// transposed at load time so every factory sees the same layout), in the model's compute dtype.
#[derive(Debug, Clone)]
pub struct LinearWeights {
    pub weight: Tensor,
    pub bias: Option<Tensor>,
}

impl LinearWeights {
    /// `(out_features, in_features)`.
    pub fn dims(&self) -> Result<(usize, usize)> {
        self.weight.dims2()
    }

    /// The weights as the frozen map of an op (`ops::frozen_norm_linear`, `ops::low_rank_linear`).
    pub fn dense_map(&self) -> std::sync::Arc<dyn crate::ops::FrozenMap> {
        std::sync::Arc::new(crate::ops::DenseMap {
            weight: self.weight.clone(),
            bias: self.bias.clone(),
        })
    }
}

/// The frozen base of one linear layer stored in 4 bits (a QLoRA base, see [`quantized`]): the
/// weight `[out, in]`, its frozen bias (in the model's dtype) and the dtype its matmul runs in
/// (bitsandbytes' `compute_dtype`).
#[derive(Debug, Clone)]
pub struct QuantizedLinearWeights {
    pub weight: crate::quant::QuantizedWeight,
    pub bias: Option<Tensor>,
    pub compute_dtype: DType,
}

impl QuantizedLinearWeights {
    /// `(out_features, in_features)`.
    pub fn dims(&self) -> (usize, usize) {
        (self.weight.out_features(), self.weight.in_features())
    }

    /// `y = x·dequant(W)ᵀ (+ b)` as bitsandbytes' `Linear4bit` computes it: `x` cast to the
    /// compute dtype, the product cast back to `x`'s dtype, then the bias added. The gradient
    /// reaches `x` only ([`crate::quant::quantized_linear`]).
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let y =
            crate::quant::quantized_linear(&x.to_dtype(self.compute_dtype)?, &self.weight, None)?
                .to_dtype(x.dtype())?;
        match &self.bias {
            Some(bias) => crate::ops::add_constant(&y, &bias.to_dtype(x.dtype())?),
            None => Ok(y),
        }
    }
}

/// The 4-bit base as the frozen map of a low-rank adapted linear (QLoRA through
/// [`crate::ops::low_rank_linear`]): the same forward, and `dx = dy·dequant(W)` computed in the
/// compute dtype, the weight dequantized again rather than kept from the forward.
impl crate::ops::FrozenMap for QuantizedLinearWeights {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        QuantizedLinearWeights::forward(self, &x.detach())
    }

    fn input_grad(&self, dy: &Tensor) -> Result<Tensor> {
        let w = self.weight.dequantize(self.compute_dtype)?;
        dy.to_dtype(self.compute_dtype)?
            .matmul(&w)?
            .to_dtype(dy.dtype())
    }

    /// Without a bias, computing in the input's dtype, on the dequantize + cuBLAS path.
    fn accumulates(&self, rows: usize, dtype: DType) -> bool {
        self.bias.is_none()
            && self.compute_dtype == dtype
            && crate::quant::accumulates_into(&self.weight, rows, dtype)
    }

    fn forward_into(&self, x: &Tensor, c: &Tensor) -> Result<()> {
        crate::quant::quantized_linear_accumulate(x, &self.weight, c, false)
    }

    fn input_grad_into(&self, dy: &Tensor, c: &Tensor) -> Result<()> {
        crate::quant::quantized_linear_accumulate(dy, &self.weight, c, true)
    }
}

/// Builds each linear layer of a model. `path` is the module path as Hugging Face names it,
/// e.g. `model.layers.0.self_attn.q_proj` or `transformer.h.0.attn.c_attn` (no `.weight`).
/// `lm_head` is built through the factory too (path `lm_head`, also when tied to the embeddings),
/// so targeting rules decide. Paths are the same whatever prefix the checkpoint's tensor names use.
pub trait LinearFactory {
    fn build(&self, path: &str, base: LinearWeights) -> Result<Box<dyn LinearLayer>>;

    /// Build a layer over a 4-bit base weight (a QLoRA base: [`quantized::QuantizingFactory`]
    /// quantizes while the model loads). A factory that cannot wrap a quantized layer refuses.
    fn build_quantized(
        &self,
        path: &str,
        _base: QuantizedLinearWeights,
    ) -> Result<Box<dyn LinearLayer>> {
        candle_core::bail!(
            "linear layer `{path}`: its base weight is stored in 4 bits, and this method cannot adapt a quantized layer"
        )
    }

    /// The base weight of the layer at `path` (`[out_features, in_features]`) when the checkpoint
    /// already stores it in 4 bits (a checkpoint saved by transformers with bitsandbytes 4-bit,
    /// see [`quantized`]): the model then builds the layer through [`Self::build_quantized`]
    /// instead of reading a dense weight. `None` (the default): the weight is dense. Answered by
    /// the factory [`ModelDir::load`] wraps around the caller's for such a checkpoint.
    fn stored_quantized(
        &self,
        _path: &str,
        _out_features: usize,
        _in_features: usize,
    ) -> Result<Option<crate::quant::QuantizedWeight>> {
        Ok(None)
    }
}

impl<T: LinearFactory + ?Sized> LinearFactory for &T {
    fn build(&self, path: &str, base: LinearWeights) -> Result<Box<dyn LinearLayer>> {
        (**self).build(path, base)
    }

    fn build_quantized(
        &self,
        path: &str,
        base: QuantizedLinearWeights,
    ) -> Result<Box<dyn LinearLayer>> {
        (**self).build_quantized(path, base)
    }

    fn stored_quantized(
        &self,
        path: &str,
        out_features: usize,
        in_features: usize,
    ) -> Result<Option<crate::quant::QuantizedWeight>> {
        (**self).stored_quantized(path, out_features, in_features)
    }
}

/// A frozen linear layer over a 4-bit base weight (no adapter).
#[derive(Debug, Clone)]
pub struct FrozenQuantizedLinear(pub QuantizedLinearWeights);

impl LinearLayer for FrozenQuantizedLinear {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        self.0.forward(x)
    }

    fn forward_normed(&self, x: &crate::ops::NormedInput) -> Result<Tensor> {
        crate::ops::frozen_norm_linear(x, std::sync::Arc::new(self.0.clone()))
    }
}

/// `y = x·Wᵀ + b` with frozen `W`, `b`: the gradient reaches `x` only (see `ops::linear`).
#[derive(Debug, Clone)]
pub struct FrozenLinear {
    weights: LinearWeights,
}

impl FrozenLinear {
    pub fn new(weights: LinearWeights) -> Self {
        Self { weights }
    }

    pub fn weights(&self) -> &LinearWeights {
        &self.weights
    }
}

impl LinearLayer for FrozenLinear {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        crate::ops::linear(x, &self.weights.weight, self.weights.bias.as_ref())
    }

    fn forward_normed(&self, x: &crate::ops::NormedInput) -> Result<Tensor> {
        crate::ops::frozen_norm_linear(x, self.weights.dense_map())
    }

    fn frozen_weight(&self) -> Option<&Tensor> {
        self.weights.bias.is_none().then_some(&self.weights.weight)
    }
}

/// Builds every layer as a [`FrozenLinear`]: the base model as it is.
#[derive(Debug, Clone, Copy, Default)]
pub struct FrozenLinearFactory;

impl LinearFactory for FrozenLinearFactory {
    fn build(&self, _path: &str, base: LinearWeights) -> Result<Box<dyn LinearLayer>> {
        Ok(Box::new(FrozenLinear::new(base)))
    }

    fn build_quantized(
        &self,
        _path: &str,
        base: QuantizedLinearWeights,
    ) -> Result<Box<dyn LinearLayer>> {
        Ok(Box::new(FrozenQuantizedLinear(base)))
    }
}

/// A LLaMA-Adapter branch for one layer (PEFT `adaption_prompt` semantics): the prompt is projected
/// by the layer's own k/v projections (no RoPE), the layer's (rotated) queries attend to it with a
/// separate softmax (no mask), and `gate · softmax(q·kᵀ/√d)·v` is added to the attention output
/// before the output projection.
#[derive(Debug, Clone)]
pub struct AdapterPrompt {
    /// `[adapter_len, hidden]` (any float dtype; cast to the compute dtype).
    pub prompt: Tensor,
    /// The gate: one element (PEFT's scalar gate, zero-initialised) or `[num_heads]` (per head).
    /// Applied as given: pass `gate.tanh()` for the paper's form.
    pub gate: Tensor,
}

/// Rows of the token-embedding table replaced for one forward pass (PEFT's trainable tokens, or a
/// trained copy of the whole table). A token whose slot is `k > 0` is embedded as row `k − 1` of
/// `rows`; slot 0 keeps the frozen row. Only `rows` can carry a gradient.
#[derive(Debug, Clone)]
pub struct EmbeddingRows {
    /// `[vocab]` u32 slots; `None`: `rows` is the whole table (`[vocab, hidden]`).
    pub slots: Option<Tensor>,
    /// `[n, hidden]` (any float dtype; cast to the compute dtype).
    pub rows: Tensor,
}

impl EmbeddingRows {
    /// Embeddings `[B, T, hidden]` of `input_ids [B, T]`: `base` (the frozen lookup) where the
    /// token keeps its frozen row, the replacement row where it has one.
    pub fn embed(&self, input_ids: &Tensor, base: &Tensor) -> Result<Tensor> {
        let (batch, length) = input_ids.dims2()?;
        let ids = input_ids
            .to_device(base.device())?
            .to_dtype(DType::U32)?
            .flatten_all()?;
        let rows = self.rows.to_dtype(base.dtype())?;
        let Some(slots) = &self.slots else {
            return rows.index_select(&ids, 0)?.reshape((batch, length, ()));
        };
        let slot = slots.index_select(&ids, 0)?;
        let hidden = rows.dim(1)?;
        // Row 0 of the extended table is a placeholder for "no replacement".
        // `*_tracked`: the placeholder row and the frozen lookup get no stored gradient.
        let extended = crate::ops::cat_tracked(&[&rows.zeros_like()?.narrow(0, 0, 1)?, &rows], 0)?;
        let replaced = extended
            .index_select(&slot, 0)?
            .reshape((batch, length, hidden))?;
        let keep = slot
            .ne(0u32)?
            .reshape((batch, length, 1))?
            .broadcast_as((batch, length, hidden))?;
        crate::ops::where_cond_tracked(&keep, &replaced, base)
    }
}

/// The weights of one normalization layer: RMSNorm's `weight [hidden]`, LayerNorm's `weight` and
/// `bias` (each `[hidden]`). Frozen as the model holds them; a replacement given through
/// [`Hooks::norms`] may be tracked (a trained copy), and the norm ops then give it a gradient.
#[derive(Debug, Clone)]
pub struct NormWeights {
    pub weight: Tensor,
    pub bias: Option<Tensor>,
}

/// What prompt-based PEFT methods add to a forward pass. `Hooks::default()` is the plain model.
#[derive(Debug, Clone, Default)]
pub struct Hooks {
    /// Replaced rows of the token-embedding table (used on every call).
    pub embedding_rows: Option<EmbeddingRows>,
    /// Replaced normalization weights by the layer's Hugging Face module path
    /// (`model.layers.0.input_layernorm`, `model.norm`, `transformer.h.0.ln_1`, as
    /// [`CausalLm::norms`] names them), used on every call instead of the frozen ones. Each must
    /// have the frozen weights' shapes (and a bias exactly where the layer has one).
    pub norms: BTreeMap<String, NormWeights>,
    /// Prompt tuning: `[1 | B, n, hidden]` embeddings prepended to the input embeddings. They are
    /// attended to like tokens (positions `0..n`, real tokens from `n`), and the returned logits have
    /// `n` extra leading positions. With a KV cache they are used on the first call only.
    pub input_prefix: Option<Tensor>,
    /// Prefix tuning: per layer, `(key, value)` each `[1 | B, kv_heads, n, head_dim]`, prepended to
    /// that layer's keys/values as PEFT passes `past_key_values`: no RoPE is applied to them and the
    /// real tokens' positions start at `n`. With a KV cache they are used on the first call only.
    pub layer_prefix: Option<Vec<(Tensor, Tensor)>>,
    /// LLaMA-Adapter: layer index → its adapter branch (used on every call).
    pub adapters: BTreeMap<usize, AdapterPrompt>,
}

impl Hooks {
    /// No hooks: the base model.
    pub fn none() -> Self {
        Self::default()
    }

    /// Positions of the context the virtual tokens take before the real ones (prompt tuning's
    /// prepended embeddings, prefix tuning's keys and values).
    pub fn virtual_positions(&self) -> usize {
        let prompt = self
            .input_prefix
            .as_ref()
            .and_then(|prefix| prefix.dim(1).ok())
            .unwrap_or(0);
        let prefix = self
            .layer_prefix
            .as_ref()
            .and_then(|layers| layers.first())
            .and_then(|(key, _)| key.dim(2).ok())
            .unwrap_or(0);
        prompt + prefix
    }
}

/// Keys and values of the positions seen so far, per layer, for incremental generation.
#[derive(Debug, Clone)]
pub struct KvCache {
    /// Per layer `(key, value)` `[B, kv_heads, S, head_dim]` (keys already rotated).
    layers: Vec<Option<(Tensor, Tensor)>>,
    /// Per batch row, which of the `S` cached positions are real (not padding).
    valid: Vec<Vec<bool>>,
}

impl KvCache {
    pub fn new(num_layers: usize) -> Self {
        Self {
            layers: vec![None; num_layers],
            valid: Vec::new(),
        }
    }

    /// Number of cached positions (including prefix and virtual tokens).
    pub fn len(&self) -> usize {
        self.valid.first().map_or(0, Vec::len)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The cached `(key, value)` of one layer, each `[B, kv_heads, S, head_dim]` (keys rotated).
    pub fn layer(&self, index: usize) -> Option<&(Tensor, Tensor)> {
        self.layers.get(index)?.as_ref()
    }

    /// Keep only the batch rows `rows` (in that order) and drop the cached positions that are
    /// padding in every kept row, so a batch whose rows finished decoding shrinks in both
    /// dimensions. What the kept rows attend to and their position ids (counted from key
    /// validity) are unchanged: only keys no kept query could see are removed.
    pub fn keep_rows(&mut self, rows: &[usize]) -> Result<()> {
        if let Some(&bad) = rows.iter().find(|&&row| row >= self.valid.len()) {
            candle_core::bail!(
                "KV cache row {bad} does not exist (the cache holds {})",
                self.valid.len()
            )
        }
        if rows.is_empty() {
            self.layers.iter_mut().for_each(|layer| *layer = None);
            self.valid.clear();
            return Ok(());
        }
        let valid: Vec<Vec<bool>> = rows.iter().map(|&row| self.valid[row].clone()).collect();
        let columns: Vec<u32> = (0..self.len())
            .filter(|&column| valid.iter().any(|row| row[column]))
            .map(|column| column as u32)
            .collect();
        let all_rows =
            rows.len() == self.valid.len() && rows.iter().enumerate().all(|(i, &r)| i == r);
        let all_columns = columns.len() == self.len();
        if all_rows && all_columns {
            return Ok(());
        }
        for (key, value) in self.layers.iter_mut().flatten() {
            let device = key.device().clone();
            let row_index = Tensor::from_vec(
                rows.iter().map(|&row| row as u32).collect::<Vec<_>>(),
                rows.len(),
                &device,
            )?;
            let column_index = Tensor::from_slice(&columns, columns.len(), &device)?;
            let select = |tensor: &Tensor| -> Result<Tensor> {
                let tensor = if all_rows {
                    tensor.clone()
                } else {
                    tensor.index_select(&row_index, 0)?
                };
                if all_columns {
                    Ok(tensor)
                } else {
                    tensor.index_select(&column_index, 2)
                }
            };
            *key = select(key)?;
            *value = select(value)?;
        }
        self.valid = valid
            .into_iter()
            .map(|row| columns.iter().map(|&column| row[column as usize]).collect())
            .collect();
        Ok(())
    }
}

/// What the pieces of one layer-by-layer forward share (see [`CausalLm::layer_plan`]): the
/// sequence bookkeeping (masks, positions) and, for Llama, the RoPE tables. Made once per batch;
/// opaque outside the models.
pub struct LayerPlan {
    pub(crate) step: sequence::Step,
    /// Llama: `(cos, sin)` for the queries' positions.
    pub(crate) rope: Option<(Tensor, Tensor)>,
}

impl LayerPlan {
    /// Prompt tuning's virtual tokens in front of the real ones in every layer's input.
    pub fn virtual_tokens(&self) -> usize {
        self.step.virtual_len
    }
}

/// A causal language model: what train and eval code need, whatever the architecture.
///
/// Inputs: `input_ids [B, T]` (integer dtype) and `attention_mask [B, T]` (1 = token, 0 = padding;
/// `None` = all ones). Right and left padding both work: position ids are counted from the mask.
pub trait CausalLm: Send + Sync {
    fn config(&self) -> &ModelConfig;
    fn device(&self) -> &Device;
    /// The compute dtype (weights were converted to it at load).
    fn dtype(&self) -> DType;
    /// The token embedding table `[vocab, hidden]` (frozen, compute dtype).
    fn token_embeddings(&self) -> &Tensor;

    /// Every normalization layer's frozen weights (compute dtype), by Hugging Face module path
    /// (the names [`Hooks::norms`] takes), in the model's order.
    fn norms(&self) -> Vec<(String, NormWeights)>;

    /// Token embeddings `[B, T, hidden]` of `input_ids [B, T]` with `hooks.embedding_rows`
    /// applied (no position embeddings).
    fn embed_hooked(&self, input_ids: &Tensor, hooks: &Hooks) -> Result<Tensor> {
        let base = self.embed(input_ids)?;
        match &hooks.embedding_rows {
            Some(rows) => rows.embed(input_ids, &base),
            None => Ok(base),
        }
    }

    /// Token embeddings `[B, T, hidden]` of `input_ids [B, T]` (no position embeddings).
    fn embed(&self, input_ids: &Tensor) -> Result<Tensor> {
        let (batch, length) = input_ids.dims2()?;
        let ids = input_ids
            .to_device(self.device())?
            .to_dtype(DType::U32)?
            .flatten_all()?;
        self.token_embeddings()
            .index_select(&ids, 0)?
            .reshape((batch, length, ()))
    }

    /// Final hidden states `[B, n + T, hidden]` (after the final norm), `n` = virtual tokens of
    /// `hooks.input_prefix` when the cache is empty or absent. With `cache`, the new keys/values
    /// are appended to it and `attention_mask` covers the new tokens only.
    fn forward_hidden(
        &self,
        input_ids: &Tensor,
        attention_mask: Option<&Tensor>,
        hooks: &Hooks,
        cache: Option<&mut KvCache>,
    ) -> Result<Tensor>;

    /// The output projection (`lm_head`, possibly adapted).
    fn lm_head(&self) -> &dyn LinearLayer;

    /// Logits `[B, n + T, vocab]` in the compute dtype; see [`CausalLm::forward_hidden`].
    fn forward(
        &self,
        input_ids: &Tensor,
        attention_mask: Option<&Tensor>,
        hooks: &Hooks,
    ) -> Result<Tensor> {
        let hidden = self.forward_hidden(input_ids, attention_mask, hooks, None)?;
        self.lm_head().forward(&hidden)
    }

    /// Logits for the new tokens only, appending their keys/values to `cache`.
    fn forward_cached(
        &self,
        input_ids: &Tensor,
        attention_mask: Option<&Tensor>,
        hooks: &Hooks,
        cache: &mut KvCache,
    ) -> Result<Tensor> {
        let hidden = self.forward_hidden(input_ids, attention_mask, hooks, Some(cache))?;
        self.lm_head().forward(&hidden)
    }

    fn new_cache(&self) -> KvCache {
        KvCache::new(self.config().num_layers())
    }

    // The forward in pieces, for layer-by-layer execution (activation checkpointing):
    // `final_norm(layer(L-1, … layer(0, layer_input(ids))))` is `forward_hidden` without a
    // cache, op for op (both run the same code), so its values and gradients are the same.

    /// The bookkeeping of a cache-less forward of `input_ids` with `hooks` (checked as
    /// `forward_hidden` checks it).
    fn layer_plan(
        &self,
        input_ids: &Tensor,
        attention_mask: Option<&Tensor>,
        hooks: &Hooks,
    ) -> Result<LayerPlan>;

    /// The input of decoder layer 0 `[B, n + T, hidden]`: token embeddings, prompt tuning's
    /// `hooks.input_prefix` prepended, position embeddings added (GPT-2).
    fn layer_input(&self, input_ids: &Tensor, plan: &LayerPlan, hooks: &Hooks) -> Result<Tensor>;

    /// Decoder layer `index` (residuals included) applied to `x`, the previous layer's output.
    fn layer(&self, index: usize, x: &Tensor, plan: &LayerPlan, hooks: &Hooks) -> Result<Tensor>;

    /// The final norm of the last layer's output: the hidden states `forward_hidden` returns
    /// (with `hooks.norms`' weights where they replace it).
    fn final_norm(&self, x: &Tensor, hooks: &Hooks) -> Result<Tensor>;
}
