//! GPT-2 (`GPT2LMHeadModel`): learned positions, pre-LayerNorm blocks with bias, fused `c_attn`
//! (q, k, v split after the projection), gelu_new MLP, tied head.
//!
//! Owns the architecture's forward pass and the checkpoint mapping. Conv1D weights are stored
//! `[in, out]`; they are transposed once at load into `LinearWeights`' `[out, in]`. Tensor names are
//! accepted with and without the `transformer.` prefix; factory paths always carry it
//! (`transformer.h.{i}.attn.c_attn`). Must not: know PEFT methods.

use candle_core::{bail, DType, Device, Result, Tensor};
use candle_nn::VarBuilder;

use super::config::{Gpt2Activation, Gpt2Config, ModelConfig};
use super::llama::{adapter_branch, check_cache, merge_heads, split_heads};
use super::sequence::{expand_batch, plan, Step};
use super::{
    CausalLm, Hooks, KvCache, LayerPlan, LinearFactory, LinearLayer, LinearWeights, NormWeights,
};
use crate::ops::{add_constant, add_tracked, causal_attention, layer_norm};

/// A Conv1D layer (`weight [in, out]`, `bias [out]`) built through the factory as `[out, in]`.
fn build_conv1d(
    vb: &VarBuilder,
    factory: &dyn LinearFactory,
    path: &str,
    in_features: usize,
    out_features: usize,
) -> Result<Box<dyn LinearLayer>> {
    let weight = vb
        .get((in_features, out_features), "weight")?
        .t()?
        .contiguous()?;
    let bias = Some(vb.get(out_features, "bias")?);
    factory.build(path, LinearWeights { weight, bias })
}

/// One LayerNorm: its frozen weight and bias and its module path (under which [`Hooks::norms`]
/// may replace them).
struct Norm {
    path: String,
    weight: Tensor,
    bias: Tensor,
}

impl Norm {
    fn load(vb: &VarBuilder, path: String, size: usize) -> Result<Self> {
        Ok(Self {
            path,
            weight: vb.get(size, "weight")?,
            bias: vb.get(size, "bias")?,
        })
    }

    fn forward(&self, x: &Tensor, eps: f64, hooks: &Hooks) -> Result<Tensor> {
        match hooks.norms.get(&self.path) {
            None => layer_norm(x, &self.weight, Some(&self.bias), eps),
            Some(NormWeights { bias: None, .. }) => {
                bail!("norm `{}`: a GPT-2 LayerNorm needs its bias", self.path)
            }
            Some(replaced) => layer_norm(x, &replaced.weight, replaced.bias.as_ref(), eps),
        }
    }

    fn weights(&self) -> (String, NormWeights) {
        (
            self.path.clone(),
            NormWeights {
                weight: self.weight.clone(),
                bias: Some(self.bias.clone()),
            },
        )
    }
}

struct Block {
    ln_1: Norm,
    c_attn: Box<dyn LinearLayer>,
    attn_c_proj: Box<dyn LinearLayer>,
    ln_2: Norm,
    c_fc: Box<dyn LinearLayer>,
    mlp_c_proj: Box<dyn LinearLayer>,
}

/// A loaded GPT-2 model.
pub struct Gpt2 {
    config: ModelConfig,
    gpt2: Gpt2Config,
    wte: Tensor,
    wpe: Tensor,
    blocks: Vec<Block>,
    ln_f: Norm,
    lm_head: Box<dyn LinearLayer>,
    device: Device,
    dtype: DType,
}

impl Gpt2 {
    pub fn load(
        vb: VarBuilder,
        gpt2: &Gpt2Config,
        config: &ModelConfig,
        factory: &dyn LinearFactory,
    ) -> Result<Self> {
        let c = gpt2;
        let h = c.n_embd;
        let root = if vb.contains_tensor("transformer.wte.weight") {
            vb.pp("transformer")
        } else {
            vb.clone()
        };
        let wte = root.pp("wte").get((c.vocab_size, h), "weight")?;
        let wpe = root.pp("wpe").get((c.n_positions, h), "weight")?;
        let mut blocks = Vec::with_capacity(c.n_layer);
        for i in 0..c.n_layer {
            let block = root.pp(format!("h.{i}"));
            let path = format!("transformer.h.{i}");
            blocks.push(Block {
                ln_1: Norm::load(&block.pp("ln_1"), format!("{path}.ln_1"), h)?,
                c_attn: build_conv1d(
                    &block.pp("attn.c_attn"),
                    factory,
                    &format!("{path}.attn.c_attn"),
                    h,
                    3 * h,
                )?,
                attn_c_proj: build_conv1d(
                    &block.pp("attn.c_proj"),
                    factory,
                    &format!("{path}.attn.c_proj"),
                    h,
                    h,
                )?,
                ln_2: Norm::load(&block.pp("ln_2"), format!("{path}.ln_2"), h)?,
                c_fc: build_conv1d(
                    &block.pp("mlp.c_fc"),
                    factory,
                    &format!("{path}.mlp.c_fc"),
                    h,
                    c.n_inner,
                )?,
                mlp_c_proj: build_conv1d(
                    &block.pp("mlp.c_proj"),
                    factory,
                    &format!("{path}.mlp.c_proj"),
                    c.n_inner,
                    h,
                )?,
            });
        }
        let ln_f = Norm::load(&root.pp("ln_f"), "transformer.ln_f".into(), h)?;
        let head_weight = if c.tie_word_embeddings {
            wte.clone()
        } else {
            vb.pp("lm_head").get((c.vocab_size, h), "weight")?
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
            gpt2: c.clone(),
            device: wte.device().clone(),
            dtype: wte.dtype(),
            wte,
            wpe,
            blocks,
            ln_f,
            lm_head,
        })
    }

    fn activation(&self, x: &Tensor) -> Result<Tensor> {
        match self.gpt2.activation {
            Gpt2Activation::GeluTanh => x.gelu(),
            Gpt2Activation::Gelu => x.gelu_erf(),
            Gpt2Activation::Relu => x.relu(),
            Gpt2Activation::Silu => x.silu(),
        }
    }

    /// q, k, v `[B, heads, T, head_dim]` from the fused projection `[B, T, 3·hidden]`.
    fn split_qkv(&self, qkv: &Tensor) -> Result<(Tensor, Tensor, Tensor)> {
        let h = self.gpt2.n_embd;
        let heads = self.gpt2.n_head;
        let head_dim = h / heads;
        let part = |index: usize| split_heads(&qkv.narrow(2, index * h, h)?, heads, head_dim);
        Ok((part(0)?, part(1)?, part(2)?))
    }

    #[expect(
        clippy::too_many_arguments,
        reason = "one block's full context; private"
    )]
    fn attention(
        &self,
        layer: usize,
        block: &Block,
        x: &Tensor,
        step: &Step,
        hooks: &Hooks,
        cached: Option<&(Tensor, Tensor)>,
        scale: f64,
    ) -> Result<(Tensor, (Tensor, Tensor))> {
        let dtype = x.dtype();
        let (query, key, value) = self.split_qkv(&block.c_attn.forward(x)?)?;
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
        let mut output = causal_attention(&query, &keys, &values, &step.mask, scale)?;
        if let Some(adapter) = hooks.adapters.get(&layer) {
            let prompt = adapter.prompt.to_dtype(dtype)?.unsqueeze(0)?;
            let (_, adapter_keys, adapter_values) =
                self.split_qkv(&block.c_attn.forward(&prompt)?)?;
            let adapter_keys = expand_batch(&adapter_keys, step.batch, dtype, "adapter key")?;
            let adapter_values = expand_batch(&adapter_values, step.batch, dtype, "adapter value")?;
            let branch = adapter_branch(&query, &adapter_keys, &adapter_values, adapter, scale)?;
            output = crate::ops::add_tracked(&output, &branch)?;
        }
        let output = block.attn_c_proj.forward(&merge_heads(&output)?)?;
        Ok((output, (keys, values)))
    }
}

impl Gpt2 {
    fn check_prefix(&self, step: &Step, hooks: &Hooks) -> Result<()> {
        if let Some(layers) = hooks.layer_prefix.as_ref().filter(|_| step.prefix_len > 0) {
            if layers.len() != self.blocks.len() {
                bail!(
                    "prefix hooks give {} layers; the model has {}",
                    layers.len(),
                    self.blocks.len()
                )
            }
        }
        Ok(())
    }

    /// Token embeddings, prompt tuning's virtual tokens prepended, position embeddings added.
    fn input_embeddings(&self, input_ids: &Tensor, step: &Step, hooks: &Hooks) -> Result<Tensor> {
        let c = &self.gpt2;
        let mut x = self.embed_hooked(input_ids, hooks)?;
        if let Some(prefix) = hooks.input_prefix.as_ref().filter(|_| step.virtual_len > 0) {
            let prefix = expand_batch(prefix, step.batch, self.dtype, "input prefix")?;
            x = crate::ops::cat_tracked(&[&prefix, &x], 1)?;
        }
        let queries = step.positions.first().map_or(0, Vec::len);
        let positions: Vec<u32> = step.positions.iter().flatten().copied().collect();
        if let Some(&last) = positions.iter().max() {
            if last as usize >= c.n_positions {
                bail!(
                    "position {last} is beyond GPT-2's {} learned positions (n_positions)",
                    c.n_positions
                )
            }
        }
        let positions = Tensor::from_vec(positions, step.batch * queries, &self.device)?;
        let position_embeddings = self
            .wpe
            .index_select(&positions, 0)?
            .reshape((step.batch, queries, c.n_embd))?;
        add_constant(&x, &position_embeddings)
    }

    /// Block `index` on `x`: its output and this call's keys/values (for the cache).
    fn block(
        &self,
        index: usize,
        x: &Tensor,
        step: &Step,
        hooks: &Hooks,
        cached: Option<&(Tensor, Tensor)>,
    ) -> Result<(Tensor, (Tensor, Tensor))> {
        let c = &self.gpt2;
        let block = self
            .blocks
            .get(index)
            .ok_or_else(|| candle_core::Error::Msg(format!("no GPT-2 block {index}")))?;
        let head_dim = c.n_embd / c.n_head;
        let mut scale = if c.scale_attn_weights {
            1.0 / (head_dim as f64).sqrt()
        } else {
            1.0
        };
        if c.scale_attn_by_inverse_layer_idx {
            scale /= (index + 1) as f64;
        }
        let normed = block.ln_1.forward(x, c.layer_norm_epsilon, hooks)?;
        let (attended, key_values) =
            self.attention(index, block, &normed, step, hooks, cached, scale)?;
        // `add_tracked`: block 0's input (the embeddings) is a constant; it gets no gradient.
        let x = add_tracked(x, &attended)?;
        let normed = block.ln_2.forward(&x, c.layer_norm_epsilon, hooks)?;
        let hidden = self.activation(&block.c_fc.forward(&normed)?)?;
        let x = add_tracked(&x, &block.mlp_c_proj.forward(&hidden)?)?;
        Ok((x, key_values))
    }
}

impl CausalLm for Gpt2 {
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
        &self.wte
    }

    fn norms(&self) -> Vec<(String, NormWeights)> {
        let mut norms = Vec::with_capacity(2 * self.blocks.len() + 1);
        for block in &self.blocks {
            norms.push(block.ln_1.weights());
            norms.push(block.ln_2.weights());
        }
        norms.push(self.ln_f.weights());
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
            check_cache(cache, self.blocks.len())?;
        }
        let step = plan(
            input_ids,
            attention_mask,
            hooks,
            cache.as_deref(),
            &self.device,
        )?;
        self.check_prefix(&step, hooks)?;
        let mut x = self.input_embeddings(input_ids, &step, hooks)?;
        for index in 0..self.blocks.len() {
            let cached = cache
                .as_deref()
                .and_then(|cache| cache.layers.get(index).cloned().flatten());
            let key_values;
            (x, key_values) = self.block(index, &x, &step, hooks, cached.as_ref())?;
            if let Some(cache) = cache.as_deref_mut() {
                cache.layers[index] = Some(key_values);
            }
        }
        if let Some(cache) = cache {
            cache.valid = step.key_valid;
        }
        self.ln_f.forward(&x, self.gpt2.layer_norm_epsilon, hooks)
    }

    fn layer_plan(
        &self,
        input_ids: &Tensor,
        attention_mask: Option<&Tensor>,
        hooks: &Hooks,
    ) -> Result<LayerPlan> {
        let step = plan(input_ids, attention_mask, hooks, None, &self.device)?;
        self.check_prefix(&step, hooks)?;
        Ok(LayerPlan { step, rope: None })
    }

    fn layer_input(&self, input_ids: &Tensor, plan: &LayerPlan, hooks: &Hooks) -> Result<Tensor> {
        self.input_embeddings(input_ids, &plan.step, hooks)
    }

    fn layer(&self, index: usize, x: &Tensor, plan: &LayerPlan, hooks: &Hooks) -> Result<Tensor> {
        Ok(self.block(index, x, &plan.step, hooks, None)?.0)
    }

    fn final_norm(&self, x: &Tensor, hooks: &Hooks) -> Result<Tensor> {
        self.ln_f.forward(x, self.gpt2.layer_norm_epsilon, hooks)
    }
}
