//! A pre-flight estimate of training memory for a batch × sequence, from a model's `config.json`
//! and a method's trainable-parameter count alone (`peftpipe inspect --method ... --batch B
//! --sequence S [--device cuda|cpu]`). An estimate, not a measurement: the GPU figures check it.
//! Pure arithmetic in f64 bytes; never allocates a tensor, never prints.
//!
//! The formula follows what the code keeps for the backward pass on each device (b = batch,
//! s = sequence, L = layers, h = hidden, kv = kv_dim, i = intermediate, a = attention heads,
//! V = vocabulary, P = base parameters, T = trainable parameters, w = bytes per element of the
//! compute dtype: 2 for bf16, 4 for f32):
//! - weights      P · w (the frozen base in the compute dtype; QLoRA: its 4-bit base's bytes)
//! - adapter      T · 4 (trainable variables are f32)
//! - gradients    T · 4
//! - optimizer    T · 8 (AdamW's two f32 moments)
//! - activations  per layer and token, what autograd keeps:
//!   attention block: norm input h, normed h, q h, k kv, v kv, context h  → 4h + 2kv;
//!   MLP block: norm input h, normed h, gate i, up i, silu(gate)·up i      → 2h + 3i;
//!   so b·s·(6h + 2kv + 3i)·w per layer. A Llama-family model keeps neither normed h: its
//!   projections read the RMSNorm's output without keeping it (`ops::NormedInput`), so
//!   b·s·(4h + 2kv + 3i)·w. A layer whose down projection is LoRA-adapted (LoRA or QLoRA, not
//!   DoRA: `ops::low_rank_swiglu_linear`) recomputes silu(gate)·up in the backward instead of
//!   keeping it: b·s·i·w less for each such layer. Plus what attention keeps:
//!   - CUDA: the flash kernel (`ops::flash`) saves only its output (the context, counted above)
//!     and one f32 log-sum-exp per head and query: b·a·s·4; the backward recomputes the
//!     probabilities.
//!   - CPU: the explicit composition (`ops::attention`) keeps the probabilities: b·a·s²·w.
//!
//!   Without checkpointing: L × that. With activation checkpointing: only each layer's input
//!   (b·s·h·w per layer) plus one layer recomputed during backward: L·b·s·h·w + one layer.
//! - logits (lm_head + cross-entropy):
//!   - CUDA: fused and chunked (`ops::next_token_linear_cross_entropy`): the `[b·s, V]` logits
//!     never exist whole; one chunk of at most 256 MiB of logits and its f32 gradient are live at
//!     a time, and the hidden-state gradient b·s·h·w is kept for the backward.
//!   - CPU: the whole f32 logits and their gradient, b·s·V·4 · 2.
//!
//! Not counted: the CUDA context and allocator slack (≈0.5–1 GB on a GPU), the tokenized data,
//! and prompt methods' extra virtual positions (add them to `s`).

use serde::Serialize;

use crate::models::ModelConfig;

/// What is being trained, for the estimate.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct MemoryQuery {
    pub batch: usize,
    pub sequence: usize,
    /// Bytes per element of the compute dtype (2 for bf16, 4 for f32).
    pub weight_bytes: usize,
    /// PEFT's trainable-parameter count of the method.
    pub trainable_parameters: u64,
    /// Where it trains: what attention and the loss keep differs (see the module docs).
    pub device: MemoryDevice,
    /// The frozen base's bytes when they are not P · w: QLoRA's 4-bit base (packed codes, absmax
    /// state, and the 16-bit embeddings, norms and head).
    pub base_bytes: Option<u64>,
    /// Decoder layers whose MLP product silu(gate)·up is recomputed rather than kept (those whose
    /// down projection LoRA or QLoRA adapts).
    pub swiglu_recomputed_layers: usize,
}

/// The device kind of an estimate.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum MemoryDevice {
    /// The flash-attention kernel and the chunked fused lm_head + cross-entropy.
    Cuda,
    /// The explicit compositions: attention probabilities and whole logits are kept.
    Cpu,
}

/// Bytes of logits one chunk of the fused CUDA lm_head + cross-entropy holds (`ops::cuda`).
const LOGIT_CHUNK_BYTES: f64 = (256u64 << 20) as f64;

/// The estimate, in bytes, by part.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct MemoryEstimate {
    pub device: MemoryDevice,
    pub batch: usize,
    pub sequence: usize,
    pub weight_bytes_per_element: usize,
    pub weights: f64,
    pub adapter: f64,
    pub gradients: f64,
    pub optimizer: f64,
    /// Activations kept for backward without activation checkpointing (logits included).
    pub activations: f64,
    /// Activations with activation checkpointing (layer inputs + one layer; logits included).
    pub activations_checkpointed: f64,
    /// weights + adapter + gradients + optimizer + activations.
    pub total: f64,
    /// The same with activation checkpointing.
    pub total_checkpointed: f64,
}

/// Estimate training memory (see the module docs for the formula).
pub fn estimate_training_memory(config: &ModelConfig, query: &MemoryQuery) -> MemoryEstimate {
    let f = |value: usize| value as f64;
    let (b, s) = (f(query.batch), f(query.sequence));
    let w = f(query.weight_bytes);
    let h = f(config.hidden_size());
    let kv = f(config.kv_dim());
    let i = f(config.intermediate_size());
    let a = f(config.num_attention_heads());
    let layers = f(config.num_layers());
    let vocab = f(config.vocab_size());
    let base = config.parameter_count().map_or(0.0, |count| count as f64);
    let trainable = query.trainable_parameters as f64;

    let weights = query.base_bytes.map_or(base * w, |bytes| bytes as f64);
    let adapter = trainable * 4.0;
    let gradients = trainable * 4.0;
    let optimizer = trainable * 8.0;
    let kept_by_attention = match query.device {
        MemoryDevice::Cuda => b * a * s * 4.0,
        MemoryDevice::Cpu => b * a * s * s * w,
    };
    // GPT-2's LayerNorm outputs are kept; a Llama's RMSNorm outputs are not (see the module docs).
    let norm_outputs = match config.architecture() {
        crate::models::Architecture::Llama => 0.0,
        crate::models::Architecture::Gpt2 => 2.0 * h,
    };
    let per_layer = b * s * (4.0 * h + norm_outputs + 2.0 * kv + 3.0 * i) * w + kept_by_attention;
    let logits = match query.device {
        MemoryDevice::Cuda => {
            // One chunk of logits (compute dtype) and its f32 gradient, plus dhidden.
            let chunk = (b * s * vocab * w).min(LOGIT_CHUNK_BYTES);
            chunk + chunk / w * 4.0 + b * s * h * w
        }
        MemoryDevice::Cpu => b * s * vocab * 4.0 * 2.0,
    };
    let recomputed = f(query.swiglu_recomputed_layers.min(config.num_layers())) * b * s * i * w;
    let activations = layers * per_layer - recomputed + logits;
    // The one layer recomputed during the backward keeps its product unless its down projection
    // recomputes it (counted as the first layer's: every adapted layer alike).
    let one_layer = if query.swiglu_recomputed_layers > 0 {
        per_layer - b * s * i * w
    } else {
        per_layer
    };
    let activations_checkpointed = layers * b * s * h * w + one_layer + logits;
    let fixed = weights + adapter + gradients + optimizer;
    MemoryEstimate {
        device: query.device,
        batch: query.batch,
        sequence: query.sequence,
        weight_bytes_per_element: query.weight_bytes,
        weights,
        adapter,
        gradients,
        optimizer,
        activations,
        activations_checkpointed,
        total: fixed + activations,
        total_checkpointed: fixed + activations_checkpointed,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A 3-layer Llama: hidden 8, MLP 16, 2 heads on 1 kv head, vocabulary 32.
    fn tiny_llama() -> ModelConfig {
        ModelConfig::from_json(&serde_json::json!({
            "model_type": "llama", "hidden_size": 8, "intermediate_size": 16,
            "num_attention_heads": 2, "num_key_value_heads": 1, "num_hidden_layers": 3,
            "vocab_size": 32, "max_position_embeddings": 64, "rms_norm_eps": 1e-5
        }))
        .unwrap()
    }

    /// 2 × 4 tokens in bf16, 100 trainable parameters, a dense base.
    fn tiny_query(device: MemoryDevice, swiglu_recomputed_layers: usize) -> MemoryQuery {
        MemoryQuery {
            batch: 2,
            sequence: 4,
            weight_bytes: 2,
            trainable_parameters: 100,
            device,
            base_bytes: None,
            swiglu_recomputed_layers,
        }
    }

    #[test]
    fn parts_follow_the_formula() {
        let config = tiny_llama();
        let estimate = estimate_training_memory(&config, &tiny_query(MemoryDevice::Cpu, 0));
        assert_eq!(estimate.adapter, 400.0);
        assert_eq!(estimate.optimizer, 800.0);
        // Per layer: 2·4·(32 + 8 + 48)·2 + 2·2·16·2 = 1408 + 128 (a Llama keeps no norm
        // output); logits 2·4·32·8 = 2048.
        assert_eq!(estimate.activations, 3.0 * 1536.0 + 2048.0);
        assert_eq!(
            estimate.activations_checkpointed,
            3.0 * 2.0 * 4.0 * 8.0 * 2.0 + 1536.0 + 2048.0
        );
        assert!(estimate.total_checkpointed < estimate.total);
        assert_eq!(
            estimate.weights,
            config.parameter_count().unwrap() as f64 * 2.0
        );
        // CUDA: the flash kernel keeps an f32 lse per head and query instead of the
        // probabilities (2·2·4·4 = 64 per layer), and the chunked loss one chunk of logits
        // (2·4·32·2 = 512 bytes, under the 256 MiB cap) + its f32 gradient (1024) + dhidden
        // (2·4·8·2 = 128).
        let cuda = estimate_training_memory(&config, &tiny_query(MemoryDevice::Cuda, 0));
        assert_eq!(
            cuda.activations,
            3.0 * (1408.0 + 64.0) + 512.0 + 1024.0 + 128.0
        );
    }

    #[test]
    fn the_cuda_logits_stay_within_one_chunk_at_a_large_vocabulary() {
        // Llama-3-sized vocabulary, 8 × 512 tokens: whole f32 logits + gradient are 3.9 GiB.
        let config = ModelConfig::from_json(&serde_json::json!({
            "model_type": "llama", "hidden_size": 64, "intermediate_size": 128,
            "num_attention_heads": 4, "num_key_value_heads": 4, "num_hidden_layers": 1,
            "vocab_size": 128256, "max_position_embeddings": 1024, "rms_norm_eps": 1e-5
        }))
        .unwrap();
        let query = |device| MemoryQuery {
            batch: 8,
            sequence: 512,
            weight_bytes: 2,
            trainable_parameters: 0,
            device,
            base_bytes: None,
            swiglu_recomputed_layers: 0,
        };
        let cpu = estimate_training_memory(&config, &query(MemoryDevice::Cpu));
        let cuda = estimate_training_memory(&config, &query(MemoryDevice::Cuda));
        assert!(
            cpu.activations > 3.9 * 1024f64.powi(3),
            "{}",
            cpu.activations
        );
        assert!(
            cuda.activations < 1.0 * 1024f64.powi(3),
            "{}",
            cuda.activations
        );
    }

    #[test]
    fn an_adapted_down_projection_keeps_no_mlp_product() {
        let config = tiny_llama();
        let query = |recomputed| tiny_query(MemoryDevice::Cuda, recomputed);
        let kept = estimate_training_memory(&config, &query(0));
        let recomputed = estimate_training_memory(&config, &query(3));
        // b·s·i·w = 2·4·16·2 = 256 per layer.
        assert_eq!(kept.activations - recomputed.activations, 3.0 * 256.0);
        assert_eq!(
            kept.activations_checkpointed - recomputed.activations_checkpointed,
            256.0
        );
        // More layers than the model has count as all of them.
        assert_eq!(
            estimate_training_memory(&config, &query(7)).activations,
            recomputed.activations
        );
    }
}
