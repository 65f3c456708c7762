//! The LoRA training benchmark behind `peftpipe bench train`: a random-initialised Llama of the
//! shape a `config.json` describes, LoRA on every linear but lm_head, random tokens, the real
//! training loop (AdamW, clipping, loss on every token), timed per phase with device
//! synchronisation. Reports tokens/s (median over the steps after warm-up), the peak device memory
//! of the run (`train::peak_memory`: CUDA, the async memory pool's high-water mark; CPU, the
//! process's peak RSS) and the
//! forward / backward / optimizer split, and the model FLOPs utilisation ([`lora_flops_per_token`]),
//! with or without activation checkpointing. Never prints: the CLI renders [`BenchResult`].

use std::collections::HashMap;
use std::path::Path;
use std::sync::atomic::AtomicBool;

use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

use super::layered::{CheckpointedLoss, HookSource};
use super::peak_memory::PeakMemoryWatch;
use super::trainer::{train, CausalLmLoss, LossModel, StepMetrics, TrainerSettings};
use super::{AdamWSettings, ScheduleKind};
use crate::data::batch::Sequence;
use crate::models::{llama::Llama, ModelConfig};
use crate::peft::{Adapter, LoraAdapter, LoraSettings, TargetModules};

/// What to measure.
#[derive(Debug, Clone)]
pub struct BenchSettings {
    pub device: Device,
    pub dtype: DType,
    pub batch: usize,
    pub sequence_length: usize,
    pub rank: usize,
    pub alpha: f64,
    /// Timed steps (after warm-up).
    pub steps: usize,
    pub warmup: usize,
    pub seed: u64,
    /// Train through [`CheckpointedLoss`] (activation checkpointing).
    pub activation_checkpointing: bool,
    /// With checkpointing: keep the layer inputs in host memory ([`crate::ops::offload`]).
    pub activation_offload: bool,
    /// The device's peak dense bf16 throughput in TFLOP/s, the MFU's denominator (H200: 989).
    pub peak_tflops: f64,
    /// The PEFT method, as a pipeline's `method:` (the registry builds it); `None`: LoRA of
    /// `rank`/`alpha` on all seven linears.
    pub method: Option<BenchMethod>,
}

/// A method to measure: the config the registry builds and how it was written (its label).
#[derive(Debug, Clone)]
pub struct BenchMethod {
    pub written: String,
    pub config: crate::config::method::MethodConfig,
}

/// The H200's (and H100 SXM's) peak dense bf16 tensor throughput, TFLOP/s.
pub const H200_PEAK_TFLOPS: f64 = 989.0;

/// Model FLOPs per trained token of LoRA training on a decoder of `config`'s shape with
/// sequences of `sequence_length` tokens and `trainable` adapter parameters, the numerator of MFU:
///
/// ```text
/// flops/token = 4·P  +  L · 6 · heads · head_dim · (T + 1)  +  6·R
/// ```
/// - `P` = Σ in·out over every linear layer of the model, `lm_head` included (the frozen weights):
///   2·P for the forward GEMMs and 2·P for the backward's input gradients — no weight gradient is
///   computed for a frozen weight (it would be 6·P in full fine-tuning).
/// - Attention (causal, per layer): the forward's `Q·Kᵀ` and `P·V` are 2·2·heads·head_dim FLOPs per
///   query and key, and a query attends to (T + 1)/2 keys on average: 2·heads·head_dim·(T + 1);
///   the backward is twice the forward (`dQ`, `dK` from `dS`; `dV`, `dP`): 3× in all.
/// - The adapter: LoRA's `R = Σ r·(in + out)` parameters each cost 2 FLOPs in the forward
///   (`x·Aᵀ`, `·Bᵀ`) and 4 in the backward (input and weight gradients of both): 6·R.
///
/// Embedding lookups, norms, RoPE, activations, the softmax and the loss are not counted (as in the
/// usual MFU convention), nor is activation checkpointing's recomputation: MFU counts the model's
/// FLOPs, so recomputing costs MFU. MFU = flops/token × tokens/s ÷ peak FLOP/s.
pub fn lora_flops_per_token(config: &ModelConfig, sequence_length: usize, trainable: u64) -> f64 {
    let frozen: f64 = config
        .linear_layers()
        .iter()
        .map(|layer| (layer.in_features * layer.out_features) as f64)
        .sum();
    let attention = config.num_layers() as f64
        * 6.0
        * (config.num_attention_heads() * config.head_dim()) as f64
        * (sequence_length as f64 + 1.0);
    4.0 * frozen + attention + 6.0 * trainable as f64
}

/// The figures.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct BenchResult {
    pub model_type: String,
    pub device: String,
    pub dtype: String,
    pub batch: usize,
    pub sequence_length: usize,
    /// What was trained: `LoRA r16 α32` by default, else the `--method` as written.
    #[serde(default)]
    pub method: String,
    pub rank: usize,
    pub alpha: f64,
    pub base_parameters: u64,
    pub trainable_parameters: u64,
    pub warmup_steps: usize,
    pub timed_steps: usize,
    /// Whether the loss model was the checkpointed one.
    pub activation_checkpointing: bool,
    /// Whether the checkpointed layer inputs waited in host memory.
    #[serde(default)]
    pub activation_offload: bool,
    /// Kernel launches per timed step, when counted (`bench train --kprof`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub launches_per_step: Option<f64>,
    /// Median over the timed steps.
    pub tokens_per_second: f64,
    pub step_ms: f64,
    pub forward_ms: f64,
    pub backward_ms: f64,
    pub optimizer_ms: f64,
    /// Model FLOPs per token ([`lora_flops_per_token`]) and the MFU they give at the median
    /// tokens/s against `peak_tflops`.
    pub flops_per_token: f64,
    pub peak_tflops: f64,
    pub mfu: f64,
    /// Peak memory in bytes during this row's run (the high-water mark is reset when it starts;
    /// see `train::peak_memory`) and where it was read from; 0 when it cannot be measured.
    pub peak_memory_bytes: u64,
    pub peak_memory_source: String,
    /// Loss of the first and the last step (random data: it only shows the loop runs).
    pub first_loss: f64,
    pub last_loss: f64,
    /// peftpipe's fused CUDA kernels in use (`ops::cuda::KERNELS` minus those switched off with
    /// `PEFTPIPE_FUSED=0` / `PEFTPIPE_UNFUSED`); empty on the CPU.
    pub fused_kernels: Vec<String>,
    /// Whether cudarc's per-buffer event tracking was switched off (one stream: it orders nothing).
    pub events_off: bool,
    /// Whether the memory pool keeps freed memory (release threshold raised; see `ops::cuda`).
    pub pool_kept: bool,
}

/// One row of a `bench train` table: the figures, or why that configuration failed (e.g. out of
/// memory), so the other rows still print.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(untagged)]
pub enum BenchRow {
    Measured(Box<BenchResult>),
    Failed {
        batch: usize,
        sequence_length: usize,
        activation_checkpointing: bool,
        #[serde(default)]
        activation_offload: bool,
        error: String,
    },
}

fn fused_kernels(device: &Device) -> Vec<String> {
    #[cfg(feature = "cuda")]
    if device.is_cuda() {
        return crate::ops::cuda::KERNELS
            .iter()
            .filter(|kernel| crate::ops::cuda::enabled(kernel))
            .map(|kernel| kernel.to_string())
            .collect();
    }
    let _ = device;
    Vec::new()
}

fn median(mut values: Vec<f64>) -> f64 {
    if values.is_empty() {
        return f64::NAN;
    }
    values.sort_by(f64::total_cmp);
    let middle = values.len() / 2;
    if values.len() % 2 == 1 {
        values[middle]
    } else {
        0.5 * (values[middle - 1] + values[middle])
    }
}

/// Random weights (normal, std 0.02; norms 1) for a Llama-family config, named as in a Hugging
/// Face checkpoint, made directly on `device` in `dtype`.
pub fn random_llama_weights(
    config: &ModelConfig,
    dtype: DType,
    device: &Device,
) -> candle_core::Result<HashMap<String, Tensor>> {
    let ModelConfig::Llama(llama) = config else {
        candle_core::bail!("random initialisation is implemented for Llama-family configs only")
    };
    let normal = |shape: &[usize]| -> candle_core::Result<Tensor> {
        Tensor::randn(0f32, 0.02, shape, device)?.to_dtype(dtype)
    };
    let ones = |size: usize| Tensor::ones(size, dtype, device);
    let mut weights = HashMap::new();
    weights.insert(
        "model.embed_tokens.weight".to_string(),
        normal(&[llama.vocab_size, llama.hidden_size])?,
    );
    for layer in config.linear_layers() {
        if layer.tied_to_embeddings {
            continue;
        }
        weights.insert(
            format!("{}.weight", layer.path),
            normal(&[layer.out_features, layer.in_features])?,
        );
        if layer.bias {
            weights.insert(
                format!("{}.bias", layer.path),
                normal(&[layer.out_features])?,
            );
        }
    }
    for i in 0..llama.num_hidden_layers {
        for norm in ["input_layernorm", "post_attention_layernorm"] {
            weights.insert(
                format!("model.layers.{i}.{norm}.weight"),
                ones(llama.hidden_size)?,
            );
        }
    }
    weights.insert("model.norm.weight".to_string(), ones(llama.hidden_size)?);
    Ok(weights)
}

/// Load a random-initialised Llama of `config`'s shape through `factory`.
pub fn random_llama(
    config: &ModelConfig,
    dtype: DType,
    device: &Device,
    factory: &dyn crate::models::LinearFactory,
) -> candle_core::Result<Llama> {
    let ModelConfig::Llama(llama) = config else {
        candle_core::bail!("random initialisation is implemented for Llama-family configs only")
    };
    let weights = random_llama_weights(config, dtype, device)?;
    let builder = VarBuilder::from_tensors(weights, dtype, device);
    Llama::load(builder, llama, config, factory)
}

/// Run the benchmark on a model of `config_path`'s shape.
pub fn run(config_path: &Path, settings: &BenchSettings) -> Result<BenchResult, String> {
    let peak = PeakMemoryWatch::start(&settings.device);
    #[cfg(feature = "cuda")]
    let single_stream = crate::ops::cuda::single_stream(&settings.device);
    #[cfg(not(feature = "cuda"))]
    let single_stream = false;
    #[cfg(feature = "cuda")]
    let pool_kept =
        crate::ops::cuda::keep_pool(&settings.device).map_err(|error| error.to_string())?;
    #[cfg(not(feature = "cuda"))]
    let pool_kept = false;
    let (config, json) =
        crate::models::load::read_config(config_path).map_err(|error| error.to_string())?;
    let adapter: Box<dyn Adapter> = match &settings.method {
        None => Box::new(
            LoraAdapter::new(
                LoraSettings {
                    rank: settings.rank,
                    alpha: settings.alpha,
                    dropout: 0.0,
                    targets: TargetModules::AllLinear,
                    use_rslora: false,
                    fan_in_fan_out: false,
                    seed: settings.seed,
                },
                &settings.device,
            )
            .map_err(|error| error.to_string())?,
        ),
        Some(method) => crate::peft::registry::new_adapter(
            &method.config,
            &crate::peft::registry::MethodContext {
                model_config: &json,
                device: &settings.device,
                seed: settings.seed,
                tokenize: None,
            },
        )
        .map_err(|error| format!("--method: {error}"))?,
    };
    let adapter = adapter.as_ref();
    let model = random_llama(
        &config,
        settings.dtype,
        &settings.device,
        adapter.linear_factory(),
    )
    .map_err(|error| format!("building the model: {error}"))?;
    adapter
        .finish_injection(&model)
        .map_err(|error| error.to_string())?;

    let vocab = config.vocab_size() as u32;
    let mut rng = ChaCha8Rng::seed_from_u64(settings.seed);
    let total_steps = settings.warmup + settings.steps;
    let sequences: Vec<Sequence> = (0..settings.batch)
        .map(|_| Sequence {
            ids: (0..settings.sequence_length)
                .map(|_| rng.random_range(0..vocab))
                .collect(),
            completion_start: 0,
        })
        .collect();
    let trainer = TrainerSettings {
        adamw: AdamWSettings::default(),
        learning_rate: 1e-4,
        schedule: ScheduleKind::Constant,
        warmup_steps: 0,
        max_grad_norm: Some(1.0),
        batch_size: settings.batch,
        accumulation: 1,
        epochs: 1,
        max_steps: Some(total_steps as u64),
        sort_by_length: false,
        seed: settings.seed,
        pad_id: 0,
        checkpoint_every: 0,
        checkpoint_dir: None,
        run_key: "bench".to_string(),
        synchronize_phases: true,
    };
    let mut steps: Vec<StepMetrics> = Vec::with_capacity(total_steps);
    let cancel = AtomicBool::new(false);
    let whole_graph = CausalLmLoss {
        model: &model,
        adapter,
    };
    let stash = crate::ops::offload::HostStash::new(settings.activation_offload);
    let checkpointed = CheckpointedLoss {
        model: &model,
        hooks: HookSource::Adapter(adapter),
        offload: settings.activation_offload.then_some(&stash),
    };
    let loss_model: &dyn LossModel = if settings.activation_checkpointing {
        &checkpointed
    } else {
        &whole_graph
    };
    train(
        loss_model,
        adapter,
        &sequences,
        &trainer,
        &cancel,
        &mut |metrics| {
            steps.push(metrics.clone());
            // The timed steps are the profiled range (benches/gpu/kprof reads it).
            #[cfg(feature = "cuda")]
            if steps.len() == settings.warmup {
                let _ = crate::ops::cuda::profiler_range(&settings.device, true);
            }
        },
    )
    .map_err(|error| error.to_string())?;
    #[cfg(feature = "cuda")]
    let _ = crate::ops::cuda::profiler_range(&settings.device, false);
    let timed: Vec<&StepMetrics> = steps.iter().skip(settings.warmup).collect();
    let pick = |f: fn(&StepMetrics) -> f64| median(timed.iter().map(|m| f(m)).collect());
    // The watch started with the run: this row's peak, not an earlier row's.
    let (peak_memory_bytes, peak_memory_source) = match peak.peak() {
        Some(peak) => (peak.bytes, peak.source.describe().to_string()),
        None => (
            0,
            "unavailable (the high-water mark could not be reset)".to_string(),
        ),
    };
    let trainable_parameters = adapter.trainable_parameter_count();
    let flops_per_token =
        lora_flops_per_token(&config, settings.sequence_length, trainable_parameters);
    let tokens_per_second = pick(|m| m.tokens_per_second);
    Ok(BenchResult {
        model_type: config.model_type().to_string(),
        device: if settings.device.is_cuda() {
            "cuda"
        } else {
            "cpu"
        }
        .to_string(),
        dtype: format!("{:?}", settings.dtype).to_lowercase(),
        batch: settings.batch,
        sequence_length: settings.sequence_length,
        method: match &settings.method {
            None => format!("LoRA r{} α{}", settings.rank, settings.alpha),
            Some(method) => method.written.clone(),
        },
        rank: settings.rank,
        alpha: settings.alpha,
        base_parameters: config.parameter_count().unwrap_or(u64::MAX),
        trainable_parameters,
        warmup_steps: settings.warmup,
        timed_steps: timed.len(),
        activation_checkpointing: settings.activation_checkpointing,
        activation_offload: settings.activation_checkpointing && settings.activation_offload,
        launches_per_step: None,
        tokens_per_second,
        flops_per_token,
        peak_tflops: settings.peak_tflops,
        mfu: flops_per_token * tokens_per_second / (settings.peak_tflops * 1e12),
        step_ms: pick(|m| 1e3 * (m.forward_seconds + m.backward_seconds + m.optimizer_seconds)),
        forward_ms: pick(|m| 1e3 * m.forward_seconds),
        backward_ms: pick(|m| 1e3 * m.backward_seconds),
        optimizer_ms: pick(|m| 1e3 * m.optimizer_seconds),
        peak_memory_bytes,
        peak_memory_source,
        first_loss: steps.first().map_or(f64::NAN, |m| m.loss),
        last_loss: steps.last().map_or(f64::NAN, |m| m.loss),
        fused_kernels: fused_kernels(&settings.device),
        events_off: single_stream,
        pool_kept,
    })
}

#[cfg(test)]
mod tests {
    use super::{lora_flops_per_token, median};
    use crate::models::ModelConfig;

    /// By hand for a tiny Llama: hidden 8, 2 layers, 2 heads of 4 (1 KV head), MLP 16, vocab 10.
    /// Linears per layer: q 8·8 = 64, k 8·4 = 32, v 32, o 64, gate 8·16 = 128, up 128, down 128
    /// → 576; two layers 1152; lm_head 8·10 = 80 → P = 1232, 4·P = 4928. Attention at T = 5:
    /// 2 layers · 6 · (2·4) · 6 = 576. LoRA r 2 on the 14 layer linears: R = Σ 2·(in + out) =
    /// 2·2·(16 + 12 + 12 + 16 + 24 + 24 + 24) = 512, 6·R = 3072. Total 4928 + 576 + 3072 = 8576.
    #[test]
    fn lora_flops_per_token_by_hand() {
        let config = ModelConfig::from_json(&serde_json::json!({
            "model_type": "llama", "hidden_size": 8, "intermediate_size": 16,
            "num_hidden_layers": 2, "num_attention_heads": 2, "num_key_value_heads": 1,
            "vocab_size": 10, "max_position_embeddings": 32, "rms_norm_eps": 1e-5,
            "tie_word_embeddings": false
        }))
        .expect("config");
        assert_eq!(lora_flops_per_token(&config, 5, 512), 8576.0);
        // Tied embeddings: lm_head is still a GEMM of the same size.
        let tied = ModelConfig::from_json(&serde_json::json!({
            "model_type": "llama", "hidden_size": 8, "intermediate_size": 16,
            "num_hidden_layers": 2, "num_attention_heads": 2, "num_key_value_heads": 1,
            "vocab_size": 10, "max_position_embeddings": 32, "rms_norm_eps": 1e-5,
            "tie_word_embeddings": true
        }))
        .expect("config");
        assert_eq!(lora_flops_per_token(&tied, 5, 512), 8576.0);
    }

    #[test]
    fn median_of_odd_and_even() {
        assert_eq!(median(vec![3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(vec![4.0, 1.0, 2.0, 3.0]), 2.5);
        assert!(median(vec![]).is_nan());
    }
}
