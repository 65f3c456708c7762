//! Llama-family decoder (Llama 1/2/3, Qwen2-style q/k/v bias, Mistral; a sliding window is a
//! limit on the sequence, see `ModelConfig::max_positions`):
//! GQA, SwiGLU MLP, RoPE (incl. Llama-3 scaling), RMSNorm, tied or separate `lm_head`.
//!
//! Owns the architecture's forward pass and the mapping of checkpoint tensor names
//! (`model.layers.{i}.self_attn.q_proj.weight`, ...) to layers. Every linear layer is built through
//! the `LinearFactory` with its HF module path; every op on the training path is one of
//! `crate::ops` (frozen matmul, RMSNorm, RoPE, masked softmax) or a differentiable candle op.
//! Must not: know PEFT methods (they come in through the factory and [`Hooks`]).

use candle_core::{bail, DType, Device, Result, Tensor};
use candle_nn::VarBuilder;

use super::config::{LlamaConfig, ModelConfig};
use super::sequence::{expand_batch, plan, Step};
use super::{
    AdapterPrompt, CausalLm, Hooks, KvCache, LayerPlan, LinearFactory, LinearLayer, LinearWeights,
    NormWeights, QuantizedLinearWeights,
};
use crate::ops::{
    add_residual, attention_heads, causal_attention, full_attention, rms_norm, rope_heads,
    NormedInput, RotaryEmbedding,
};

/// Build one linear layer from `vb` (`weight [out, in]`, optional `bias [out]`) via the factory;
/// a weight the checkpoint stores in 4 bits ([`LinearFactory::stored_quantized`]) is used as
/// stored, through [`LinearFactory::build_quantized`], computing in the model's dtype.
pub(crate) fn build_linear(
    vb: &VarBuilder,
    factory: &dyn LinearFactory,
    path: &str,
    in_features: usize,
    out_features: usize,
    bias: bool,
) -> Result<Box<dyn LinearLayer>> {
    let bias = if bias {
        Some(vb.get(out_features, "bias")?)
    } else {
        None
    };
    if let Some(weight) = factory.stored_quantized(path, out_features, in_features)? {
        return factory.build_quantized(
            path,
            QuantizedLinearWeights {
                weight,
                bias,
                compute_dtype: vb.dtype(),
            },
        );
    }
    let weight = vb.get((out_features, in_features), "weight")?;
    factory.build(path, LinearWeights { weight, bias })
}

struct SelfAttention {
    q_proj: Box<dyn LinearLayer>,
    k_proj: Box<dyn LinearLayer>,
    v_proj: Box<dyn LinearLayer>,
    o_proj: Box<dyn LinearLayer>,
    heads: usize,
    kv_heads: usize,
    head_dim: usize,
}

/// `[B, T, heads·head_dim]` → `[B, heads, T, head_dim]` (contiguous).
pub(crate) fn split_heads(x: &Tensor, heads: usize, head_dim: usize) -> Result<Tensor> {
    let (batch, length, _) = x.dims3()?;
    x.reshape((batch, length, heads, head_dim))?
        .transpose(1, 2)?
        .contiguous()
}

/// `[B, heads, T, head_dim]` → `[B, T, heads·head_dim]`.
pub(crate) fn merge_heads(x: &Tensor) -> Result<Tensor> {
    let (batch, heads, length, head_dim) = x.dims4()?;
    x.transpose(1, 2)?
        .reshape((batch, length, heads * head_dim))
}

/// PEFT's adaption-prompt branch: `gate · softmax(q·kᵀ/√d)·v` over the projected adapter prompt.
pub(crate) fn adapter_branch(
    query: &Tensor,
    adapter_keys: &Tensor,
    adapter_values: &Tensor,
    adapter: &AdapterPrompt,
    scale: f64,
) -> Result<Tensor> {
    let heads = query.dim(1)?;
    let output = full_attention(query, adapter_keys, adapter_values, scale)?;
    // The gate's gradient is one sum over every position and channel of the branch: taken in the
    // compute dtype (bf16) it lost up to 40% of its value to cancellation (tests/device.rs), so
    // the product is formed in f32, as PyTorch promotes PEFT's f32 gate · bf16 output.
    let gate = adapter.gate.to_dtype(DType::F32)?;
    let gate = match gate.elem_count() {
        1 => gate.reshape((1, 1, 1, 1))?,
        n if n == heads => gate.reshape((1, heads, 1, 1))?,
        n => bail!("adapter gate has {n} elements; expected 1 or one per head ({heads})"),
    };
    output
        .to_dtype(DType::F32)?
        .broadcast_mul(&gate)?
        .to_dtype(query.dtype())
}

impl SelfAttention {
    fn load(
        vb: &VarBuilder,
        factory: &dyn LinearFactory,
        path: &str,
        c: &LlamaConfig,
    ) -> Result<Self> {
        let q_out = c.num_attention_heads * c.head_dim;
        let kv_out = c.num_key_value_heads * c.head_dim;
        let h = c.hidden_size;
        let build = |name: &str, input, output, bias| {
            build_linear(
                &vb.pp(name),
                factory,
                &format!("{path}.{name}"),
                input,
                output,
                bias,
            )
        };
        Ok(Self {
            q_proj: build("q_proj", h, q_out, c.qkv_bias)?,
            k_proj: build("k_proj", h, kv_out, c.qkv_bias)?,
            v_proj: build("v_proj", h, kv_out, c.qkv_bias)?,
            o_proj: build("o_proj", q_out, h, c.output_bias)?,
            heads: c.num_attention_heads,
            kv_heads: c.num_key_value_heads,
            head_dim: c.head_dim,
        })
    }

    #[expect(
        clippy::too_many_arguments,
        reason = "one layer's full context; private"
    )]
    fn forward(
        &self,
        layer: usize,
        x: NormedInput,
        cos: &Tensor,
        sin: &Tensor,
        step: &Step,
        hooks: &Hooks,
        cached: Option<&(Tensor, Tensor)>,
    ) -> Result<(Tensor, (Tensor, Tensor))> {
        let dtype = x.input().dtype();
        // On CUDA the heads stay where the projections wrote them (`[B, T, heads, D]` views, RoPE
        // written in place) and the flash kernels read them there; elsewhere they are copied into
        // `[B, heads, T, D]` (ops::rope_heads, ops::attention_heads).
        let (heads, kv_heads, dim) = (self.heads, self.kv_heads, self.head_dim);
        let query = rope_heads(self.q_proj.forward_normed(&x)?, heads, dim, cos, sin)?;
        let key = rope_heads(self.k_proj.forward_normed(&x)?, kv_heads, dim, cos, sin)?;
        let value = attention_heads(&self.v_proj.forward_normed(&x)?, kv_heads, dim)?;
        // The norm's output (when the projections computed it) is freed here, not kept.
        drop(x);

        let mut keys = Vec::with_capacity(3);
        let mut values = Vec::with_capacity(3);
        if let Some((cached_keys, cached_values)) = cached {
            keys.push(cached_keys.clone());
            values.push(cached_values.clone());
        }
        if step.prefix_len > 0 {
            let Some((prefix_keys, prefix_values)) = hooks
                .layer_prefix
                .as_ref()
                .and_then(|layers| layers.get(layer))
            else {
                bail!("prefix hooks: no key/values for layer {layer}")
            };
            let expected = [self.kv_heads, step.prefix_len, self.head_dim];
            for (what, tensor) in [("key", prefix_keys), ("value", prefix_values)] {
                if tensor.rank() != 4 || tensor.dims()[1..] != expected {
                    bail!(
                        "prefix {what} of layer {layer} is {:?}; expected [1|B, {}, {}, {}]",
                        tensor.shape(),
                        expected[0],
                        expected[1],
                        expected[2]
                    )
                }
            }
            keys.push(expand_batch(prefix_keys, step.batch, dtype, "prefix key")?);
            values.push(expand_batch(
                prefix_values,
                step.batch,
                dtype,
                "prefix value",
            )?);
        }
        keys.push(key);
        values.push(value);
        // `cat_tracked`: layer 0's frozen keys/values beside a trained prefix get no gradient.
        let keys = crate::ops::cat_tracked(&keys.iter().collect::<Vec<_>>(), 2)?;
        let values = crate::ops::cat_tracked(&values.iter().collect::<Vec<_>>(), 2)?;

        let scale = 1.0 / (self.head_dim as f64).sqrt();
        let mut output = causal_attention(&query, &keys, &values, &step.mask, scale)?;
        if let Some(adapter) = hooks.adapters.get(&layer) {
            let prompt = adapter.prompt.to_dtype(dtype)?.unsqueeze(0)?;
            let adapter_keys =
                split_heads(&self.k_proj.forward(&prompt)?, self.kv_heads, self.head_dim)?;
            let adapter_values =
                split_heads(&self.v_proj.forward(&prompt)?, self.kv_heads, self.head_dim)?;
            let adapter_keys = expand_batch(&adapter_keys, step.batch, dtype, "adapter key")?;
            let adapter_values = expand_batch(&adapter_values, step.batch, dtype, "adapter value")?;
            let branch = adapter_branch(&query, &adapter_keys, &adapter_values, adapter, scale)?;
            output = crate::ops::add_tracked(&output, &branch)?;
        }
        let output = self.o_proj.forward(&merge_heads(&output)?)?;
        Ok((output, (keys, values)))
    }
}

struct Mlp {
    gate_proj: Box<dyn LinearLayer>,
    up_proj: Box<dyn LinearLayer>,
    down_proj: Box<dyn LinearLayer>,
}

impl Mlp {
    fn load(
        vb: &VarBuilder,
        factory: &dyn LinearFactory,
        path: &str,
        c: &LlamaConfig,
    ) -> Result<Self> {
        let (h, m) = (c.hidden_size, c.intermediate_size);
        let build = |name: &str, input, output| {
            build_linear(
                &vb.pp(name),
                factory,
                &format!("{path}.{name}"),
                input,
                output,
                c.mlp_bias,
            )
        };
        Ok(Self {
            gate_proj: build("gate_proj", h, m)?,
            up_proj: build("up_proj", h, m)?,
            down_proj: build("down_proj", m, h)?,
        })
    }

    /// SwiGLU: `down(silu(gate(x)) · up(x))`.
    fn forward(&self, x: NormedInput) -> Result<Tensor> {
        let gate = self.gate_proj.forward_normed(&x)?;
        let up = self.up_proj.forward_normed(&x)?;
        drop(x);
        self.down_proj.forward_swiglu(&gate, &up)
    }
}

/// One RMSNorm: its frozen weight and module path (under which [`Hooks::norms`] may replace it).
struct RmsNorm {
    path: String,
    weight: Tensor,
}

impl RmsNorm {
    fn load(vb: &VarBuilder, path: String, hidden: usize) -> Result<Self> {
        Ok(Self {
            path,
            weight: vb.get(hidden, "weight")?,
        })
    }

    fn forward(&self, x: &Tensor, eps: f64, hooks: &Hooks) -> Result<Tensor> {
        match hooks.norms.get(&self.path) {
            None => rms_norm(x, &self.weight, eps),
            Some(NormWeights { bias: Some(_), .. }) => {
                bail!("norm `{}`: an RMSNorm has no bias", self.path)
            }
            Some(replaced) => rms_norm(x, &replaced.weight, eps),
        }
    }

    /// [`Self::forward`] as the input of linear layers, which may read it without keeping it
    /// (`ops::NormedInput`).
    fn normed(&self, x: &Tensor, eps: f64, hooks: &Hooks) -> Result<NormedInput> {
        match hooks.norms.get(&self.path) {
            None => NormedInput::rms(x, &self.weight, eps),
            Some(NormWeights { bias: Some(_), .. }) => {
                bail!("norm `{}`: an RMSNorm has no bias", self.path)
            }
            Some(replaced) => NormedInput::rms(x, &replaced.weight, eps),
        }
    }

    fn weights(&self) -> (String, NormWeights) {
        (
            self.path.clone(),
            NormWeights {
                weight: self.weight.clone(),
                bias: None,
            },
        )
    }
}

struct DecoderLayer {
    input_layernorm: RmsNorm,
    self_attn: SelfAttention,
    post_attention_layernorm: RmsNorm,
    mlp: Mlp,
}

/// A cache made for another model (a different layer count) is an error, not a panic.
pub(crate) fn check_cache(cache: &KvCache, layers: usize) -> Result<()> {
    if cache.layers.len() != layers {
        bail!(
            "the KV cache was made for {} layers; the model has {layers}",
            cache.layers.len()
        )
    }
    Ok(())
}

/// A loaded Llama-family model.
pub struct Llama {
    config: ModelConfig,
    rms_norm_eps: f64,
    embed_tokens: Tensor,
    layers: Vec<DecoderLayer>,
    norm: RmsNorm,
    lm_head: Box<dyn LinearLayer>,
    rotary: RotaryEmbedding,
    device: Device,
    dtype: DType,
}

impl Llama {
    /// Load from `vb` (the checkpoint's root) with `llama`'s dimensions; `config` is the same
    /// config as the enum every model exposes.
    pub fn load(
        vb: VarBuilder,
        llama: &LlamaConfig,
        config: &ModelConfig,
        factory: &dyn LinearFactory,
    ) -> Result<Self> {
        let c = llama;
        let model = vb.pp("model");
        let embed_tokens = model
            .pp("embed_tokens")
            .get((c.vocab_size, c.hidden_size), "weight")?;
        let mut layers = Vec::with_capacity(c.num_hidden_layers);
        for i in 0..c.num_hidden_layers {
            let path = format!("model.layers.{i}");
            let layer = model.pp(format!("layers.{i}"));
            layers.push(DecoderLayer {
                input_layernorm: RmsNorm::load(
                    &layer.pp("input_layernorm"),
                    format!("{path}.input_layernorm"),
                    c.hidden_size,
                )?,
                self_attn: SelfAttention::load(
                    &layer.pp("self_attn"),
                    factory,
                    &format!("{path}.self_attn"),
                    c,
                )?,
                post_attention_layernorm: RmsNorm::load(
                    &layer.pp("post_attention_layernorm"),
                    format!("{path}.post_attention_layernorm"),
                    c.hidden_size,
                )?,
                mlp: Mlp::load(&layer.pp("mlp"), factory, &format!("{path}.mlp"), c)?,
            });
        }
        let norm = RmsNorm::load(&model.pp("norm"), "model.norm".into(), c.hidden_size)?;
        let head_weight = if c.tie_word_embeddings {
            embed_tokens.clone()
        } else {
            vb.pp("lm_head")
                .get((c.vocab_size, c.hidden_size), "weight")?
        };
        let lm_head = factory.build(
            "lm_head",
            LinearWeights {
                weight: head_weight,
                bias: None,
            },
        )?;
        Ok(Self {
            config: config.clone(),
            rms_norm_eps: c.rms_norm_eps,
            device: embed_tokens.device().clone(),
            dtype: embed_tokens.dtype(),
            embed_tokens,
            layers,
            norm,
            lm_head,
            rotary: RotaryEmbedding::new(c.head_dim, c.rope_theta, c.rope_scaling.as_ref())?,
        })
    }
}

impl Llama {
    /// peftpipe has no sliding-window attention: a row with more valid keys (cached, prefix,
    /// virtual and new; padding is no position) than config.json's window is refused, since its
    /// later queries would attend to keys transformers masks. Up to the window, plain causal
    /// attention is what transformers computes.
    fn check_sliding_window(&self, step: &Step) -> Result<()> {
        let ModelConfig::Llama(config) = &self.config else {
            return Ok(());
        };
        let Some(window) = config.sliding_window else {
            return Ok(());
        };
        let longest = step
            .key_valid
            .iter()
            .map(|row| row.iter().filter(|&&valid| valid).count())
            .max()
            .unwrap_or(0);
        if longest > window {
            bail!(
                "a sequence of {longest} positions is longer than config.json's `sliding_window` {window}: {} sliding-window attention is not implemented, and past the window it would differ from transformers",
                config.model_type
            )
        }
        Ok(())
    }

    fn check_prefix(&self, step: &Step, hooks: &Hooks) -> Result<()> {
        if let Some(layers) = hooks.layer_prefix.as_ref().filter(|_| step.prefix_len > 0) {
            if layers.len() != self.layers.len() {
                bail!(
                    "prefix hooks give {} layers; the model has {}",
                    layers.len(),
                    self.layers.len()
                )
            }
        }
        Ok(())
    }

    /// Token embeddings with prompt tuning's virtual tokens prepended.
    fn input_embeddings(&self, input_ids: &Tensor, step: &Step, hooks: &Hooks) -> Result<Tensor> {
        let mut x = self.embed_hooked(input_ids, hooks)?;
        if let Some(prefix) = hooks.input_prefix.as_ref().filter(|_| step.virtual_len > 0) {
            let prefix = expand_batch(prefix, step.batch, self.dtype, "input prefix")?;
            x = crate::ops::cat_tracked(&[&prefix, &x], 1)?;
        }
        Ok(x)
    }

    /// Decoder layer `index` on `x`: its output and this call's keys/values (for the cache).
    #[expect(
        clippy::too_many_arguments,
        reason = "one layer's full context; private"
    )]
    fn decoder_layer(
        &self,
        index: usize,
        x: &Tensor,
        cos: &Tensor,
        sin: &Tensor,
        step: &Step,
        hooks: &Hooks,
        cached: Option<&(Tensor, Tensor)>,
    ) -> Result<(Tensor, (Tensor, Tensor))> {
        let layer = self
            .layers
            .get(index)
            .ok_or_else(|| candle_core::Error::Msg(format!("no decoder layer {index}")))?;
        let normed = layer.input_layernorm.normed(x, self.rms_norm_eps, hooks)?;
        let (attended, key_values) = layer
            .self_attn
            .forward(index, normed, cos, sin, step, hooks, cached)?;
        // `add_residual`: layer 0's input (the embeddings) is a constant and gets no gradient; on
        // CUDA the sum is written into the branch's output (each branch output is read by nothing
        // else, `LinearLayer::forward`).
        let x = add_residual(attended, x)?;
        let normed = layer
            .post_attention_layernorm
            .normed(&x, self.rms_norm_eps, hooks)?;
        let x = add_residual(layer.mlp.forward(normed)?, &x)?;
        Ok((x, key_values))
    }
}

impl CausalLm for Llama {
    fn config(&self) -> &ModelConfig {
        &self.config
    }

    fn device(&self) -> &Device {
        &self.device
    }

    fn dtype(&self) -> DType {
        self.dtype
    }

    fn token_embeddings(&self) -> &Tensor {
        &self.embed_tokens
    }

    fn norms(&self) -> Vec<(String, NormWeights)> {
        let mut norms = Vec::with_capacity(2 * self.layers.len() + 1);
        for layer in &self.layers {
            norms.push(layer.input_layernorm.weights());
            norms.push(layer.post_attention_layernorm.weights());
        }
        norms.push(self.norm.weights());
        norms
    }

    fn lm_head(&self) -> &dyn LinearLayer {
        self.lm_head.as_ref()
    }

    fn forward_hidden(
        &self,
        input_ids: &Tensor,
        attention_mask: Option<&Tensor>,
        hooks: &Hooks,
        mut cache: Option<&mut KvCache>,
    ) -> Result<Tensor> {
        if let Some(cache) = cache.as_deref() {
            check_cache(cache, self.layers.len())?;
        }
        let step = plan(
            input_ids,
            attention_mask,
            hooks,
            cache.as_deref(),
            &self.device,
        )?;
        self.check_prefix(&step, hooks)?;
        self.check_sliding_window(&step)?;
        let mut x = self.input_embeddings(input_ids, &step, hooks)?;
        let (cos, sin) = self
            .rotary
            .tables(&step.positions, &self.device, self.dtype)?;
        for index in 0..self.layers.len() {
            let cached = cache
                .as_deref()
                .and_then(|cache| cache.layers.get(index).cloned().flatten());
            let key_values;
            (x, key_values) =
                self.decoder_layer(index, &x, &cos, &sin, &step, hooks, cached.as_ref())?;
            if let Some(cache) = cache.as_deref_mut() {
                cache.layers[index] = Some(key_values);
            }
        }
        if let Some(cache) = cache {
            cache.valid = step.key_valid;
        }
        self.norm.forward(&x, self.rms_norm_eps, hooks)
    }

    fn layer_plan(
        &self,
        input_ids: &Tensor,
        attention_mask: Option<&Tensor>,
        hooks: &Hooks,
    ) -> Result<LayerPlan> {
        let step = plan(input_ids, attention_mask, hooks, None, &self.device)?;
        self.check_prefix(&step, hooks)?;
        let rope = self
            .rotary
            .tables(&step.positions, &self.device, self.dtype)?;
        Ok(LayerPlan {
            step,
            rope: Some(rope),
        })
    }

    fn layer_input(&self, input_ids: &Tensor, plan: &LayerPlan, hooks: &Hooks) -> Result<Tensor> {
        self.input_embeddings(input_ids, &plan.step, hooks)
    }

    fn layer(&self, index: usize, x: &Tensor, plan: &LayerPlan, hooks: &Hooks) -> Result<Tensor> {
        let Some((cos, sin)) = plan.rope.as_ref() else {
            bail!("a Llama layer plan has RoPE tables")
        };
        Ok(self
            .decoder_layer(index, x, cos, sin, &plan.step, hooks, None)?
            .0)
    }

    fn final_norm(&self, x: &Tensor, hooks: &Hooks) -> Result<Tensor> {
        self.norm.forward(x, self.rms_norm_eps, hooks)
    }
}
