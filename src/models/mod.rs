//! Our own causal LM code on candle (Llama family, GPT-2): `load(vb, cfg)` + `forward`, weight
//! names mirroring the checkpoint. Knows nothing of pipelines or PEFT configs: PEFT methods plug
//! in through [`LinearFactory`] (every linear layer is built by it from its frozen base weights)
//! and the attention hooks. (Skeleton: the models owner completes this module.)

use candle_core::{Result, Tensor};

/// A linear layer as a model uses it: `y = x·Wᵀ (+ b)` or any adapted variant.
pub trait LinearLayer: Send + Sync {
    fn forward(&self, x: &Tensor) -> Result<Tensor>;
}

/// The frozen base weights of one linear layer, in `[out, in]` layout (GPT-2's Conv1D weights are
/// transposed at load time so every factory sees the same layout).
#[derive(Debug, Clone)]
pub struct LinearWeights {
    pub weight: Tensor,
    pub bias: Option<Tensor>,
}

/// Builds each linear layer of a model. `path` is the module path as Hugging Face names it,
/// e.g. `model.layers.0.self_attn.q_proj` or `transformer.h.0.attn.c_attn` (no `.weight`).
/// `lm_head` is built through the factory too (path `lm_head`), so targeting rules decide.
pub trait LinearFactory {
    fn build(&self, path: &str, base: LinearWeights) -> Result<Box<dyn LinearLayer>>;
}
