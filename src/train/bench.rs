//! The LoRA training benchmark behind `peftpipe bench train`: a random-initialised Llama of the
//! shape a `config.json` describes, LoRA on every linear but lm_head, random tokens, the real
//! training loop (AdamW, clipping, loss on every token), timed per phase with device
//! synchronisation. Reports tokens/s (median over the steps after warm-up), the peak device memory
//! (CUDA: the async memory pool's high-water marks; CPU: the process's peak RSS) and the
//! forward / backward / optimizer split. Never prints: the CLI renders [`BenchResult`].

use std::collections::HashMap;
use std::path::Path;
use std::sync::atomic::AtomicBool;

use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::Serialize;

use super::trainer::{train, CausalLmLoss, StepMetrics, TrainerSettings};
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
}

/// The figures.
#[derive(Debug, Clone, Serialize)]
pub struct BenchResult {
    pub model_type: String,
    pub device: String,
    pub dtype: String,
    pub batch: usize,
    pub sequence_length: usize,
    pub rank: usize,
    pub alpha: f64,
    pub base_parameters: u64,
    pub trainable_parameters: u64,
    pub warmup_steps: usize,
    pub timed_steps: usize,
    /// Median over the timed steps.
    pub tokens_per_second: f64,
    pub step_ms: f64,
    pub forward_ms: f64,
    pub backward_ms: f64,
    pub optimizer_ms: f64,
    /// Peak memory in bytes and where it was read from.
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

/// Peak memory: CUDA pool high-water mark (used) on CUDA, peak RSS on CPU.
fn peak_memory(device: &Device) -> (u64, String) {
    #[cfg(feature = "cuda")]
    if let Device::Cuda(cuda) = device {
        if let Ok(bytes) = cuda_pool_used_high(cuda) {
            return (bytes, "cuda default mempool USED_MEM_HIGH".to_string());
        }
    }
    let _ = device;
    let rss = std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|status| {
            status
                .lines()
                .find(|line| line.starts_with("VmHWM:"))
                .and_then(|line| line.split_whitespace().nth(1)?.parse::<u64>().ok())
        })
        .map_or(0, |kib| kib * 1024);
    (rss, "process peak RSS (VmHWM)".to_string())
}

/// The high-water mark of bytes in use in the device's default async memory pool (what candle
/// allocates from), read with `cuMemPoolGetAttribute(CU_MEMPOOL_ATTR_USED_MEM_HIGH)`.
#[cfg(feature = "cuda")]
fn cuda_pool_used_high(device: &candle_core::CudaDevice) -> Result<u64, String> {
    use candle_core::cuda_backend::cudarc::driver::sys;
    let stream = device.cuda_stream();
    let context = stream.context();
    context
        .bind_to_thread()
        .map_err(|error| format!("binding the CUDA context: {error:?}"))?;
    let mut pool: sys::CUmemoryPool = std::ptr::null_mut();
    let mut value: u64 = 0;
    #[expect(
        unsafe_code,
        reason = "reading the memory pool's high-water mark needs two CUDA driver calls"
    )]
    // SAFETY: `pool` and `value` are valid out-pointers of the types the driver API writes
    // (CUmemoryPool, cuuint64_t); the device handle comes from a live context.
    let (first, second) = unsafe {
        let first = sys::cuDeviceGetDefaultMemPool(&mut pool, context.cu_device());
        let second = sys::cuMemPoolGetAttribute(
            pool,
            sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_USED_MEM_HIGH,
            (&mut value as *mut u64).cast(),
        );
        (first, second)
    };
    if first != sys::CUresult::CUDA_SUCCESS || second != sys::CUresult::CUDA_SUCCESS {
        return Err(format!("cuMemPoolGetAttribute: {first:?} / {second:?}"));
    }
    Ok(value)
}

/// Run the benchmark on a model of `config_path`'s shape.
pub fn run(config_path: &Path, settings: &BenchSettings) -> Result<BenchResult, String> {
    #[cfg(feature = "cuda")]
    let single_stream = crate::ops::cuda::single_stream(&settings.device);
    #[cfg(not(feature = "cuda"))]
    let single_stream = false;
    #[cfg(feature = "cuda")]
    let pool_kept =
        crate::ops::cuda::keep_pool(&settings.device).map_err(|error| error.to_string())?;
    #[cfg(not(feature = "cuda"))]
    let pool_kept = false;
    let text = std::fs::read_to_string(config_path)
        .map_err(|error| format!("{}: {error}", config_path.display()))?;
    let json: serde_json::Value = serde_json::from_str(&text)
        .map_err(|error| format!("{}: invalid JSON: {error}", config_path.display()))?;
    let config = ModelConfig::from_json(&json).map_err(|error| {
        format!(
            "{}: key `{}`: {}",
            config_path.display(),
            error.key,
            error.message
        )
    })?;
    let adapter = LoraAdapter::new(
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
    .map_err(|error| error.to_string())?;
    let model = random_llama(&config, settings.dtype, &settings.device, &adapter)
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
    train(
        &CausalLmLoss {
            model: &model,
            adapter: &adapter,
        },
        &adapter,
        &sequences,
        &trainer,
        &cancel,
        &mut |metrics| steps.push(metrics.clone()),
    )
    .map_err(|error| error.to_string())?;
    let timed: Vec<&StepMetrics> = steps.iter().skip(settings.warmup).collect();
    let pick = |f: fn(&StepMetrics) -> f64| median(timed.iter().map(|m| f(m)).collect());
    let (peak_memory_bytes, peak_memory_source) = peak_memory(&settings.device);
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
        rank: settings.rank,
        alpha: settings.alpha,
        base_parameters: config.parameter_count().unwrap_or(u64::MAX),
        trainable_parameters: adapter.trainable_parameter_count(),
        warmup_steps: settings.warmup,
        timed_steps: timed.len(),
        tokens_per_second: pick(|m| m.tokens_per_second),
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
    use super::median;

    #[test]
    fn median_of_odd_and_even() {
        assert_eq!(median(vec![3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(vec![4.0, 1.0, 2.0, 3.0]), 2.5);
        assert!(median(vec![]).is_nan());
    }
}
