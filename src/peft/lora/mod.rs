//! LoRA (Hu et al. 2021) with Hugging Face PEFT's semantics: `y = W x + b + s·B(A(dropout(x)))`
//! with `s = alpha / r` (or `alpha / √r` with rsLoRA), A `[r, in]` Kaiming-uniform(a = √5)
//! (uniform in ±1/√in), B `[out, r]` zeros, so the adapter is a no-op at step 0. A and B are f32
//! variables, cast to the compute dtype in forward. Merge folds `s·B·A` into the frozen weight.
//! On disk: PEFT's folder (adapter_config.json + adapter_model.safetensors with tensors
//! `base_model.model.<path>.lora_A.weight` `[r, in]` / `.lora_B.weight` `[out, r]`). GPT-2's
//! Conv1D layers are recorded as `fan_in_fan_out: true`; PEFT stores the same `[r, in]`/`[out, r]`
//! shapes for them (only its merge transposes), and our models hand every factory `[out, in]`
//! weights, so nothing else changes.
//! With `use_dora` (PEFT's option, [`LoraAdapter::with_dora`]) each adapted layer also trains a
//! magnitude vector (`<path>.lora_magnitude_vector`, `[out]`): see `dora.rs`.
//! The folder: this file (the adapter and its layers), `file.rs` (the one reader of PEFT LoRA
//! folders, with `rank_pattern` / `alpha_pattern`), `dora.rs` (DoRA's norm, forward and merge).
//! Never reads pipeline configs, never prints.

pub mod dora;
pub mod file;

pub use file::{LoraFile, LoraPair};

use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};

use candle_core::{DType, Device, Tensor, Var};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde_json::{json, Value};

use super::adapter::{check_loaded_layers, LayerShape, LoadedLayerMessages};
use super::adapter::{Parameter, PatchChange, WeightPatch};
use super::format::{json_number, write_adapter_folder, PEFT_PREFIX};
use super::targets::TargetModules;
use super::{mix_seed, Adapter, AdapterMode, PeftError, TensorContext};
use crate::models::{
    CausalLm, FrozenQuantizedLinear, LinearFactory, LinearLayer, LinearWeights,
    QuantizedLinearWeights,
};

/// LoRA hyperparameters, resolved (targets known).
#[derive(Debug, Clone)]
pub struct LoraSettings {
    /// Rank r.
    pub rank: usize,
    /// lora_alpha.
    pub alpha: f64,
    /// Dropout probability on the adapter input during training.
    pub dropout: f32,
    pub targets: TargetModules,
    /// Scale by alpha/√r instead of alpha/r.
    pub use_rslora: bool,
    /// Recorded in adapter_config.json: true for GPT-2's Conv1D layers.
    pub fan_in_fan_out: bool,
    /// Seed of the A initialisation (each module mixes in its path) and of dropout.
    pub seed: u64,
}

impl LoraSettings {
    /// The factor applied to B·A.
    pub fn scale(&self) -> f64 {
        if self.use_rslora {
            self.alpha / (self.rank as f64).sqrt()
        } else {
            self.alpha / self.rank as f64
        }
    }
}

/// State shared by every layer of one adapter: training mode and the dropout seed.
#[derive(Debug, Default)]
struct Runtime {
    training: AtomicBool,
    dropout_seed: AtomicU64,
}

/// The frozen base of an adapted layer.
enum Base {
    /// The weight `[out, in]` (replaced by the merged weight while merged) and bias.
    Dense {
        weight: RwLock<Tensor>,
        bias: Option<Tensor>,
    },
    /// A 4-bit weight (QLoRA): run through the frozen quantized linear op, never merged in place.
    Quantized(QuantizedLinearWeights),
}

/// One adapted linear layer.
struct LoraLinear {
    path: String,
    base: Base,
    a: Var,
    b: Var,
    scale: f64,
    dropout: f32,
    /// DoRA's magnitude vector `[out]` (f32), when `use_dora`.
    magnitude: Option<Var>,
    /// The base weight while a DoRA layer is merged (its merge is not a plain addition).
    original: Mutex<Option<Tensor>>,
    merged: AtomicBool,
    runtime: Arc<Runtime>,
    /// `A` and `B` cast for the next training forward by [`LoraAdapter::prepare_forward`]
    /// (taken by that forward, so never read twice), and the input dtype of the last training
    /// forward, which is what they are cast to.
    prepared: Mutex<Prepared>,
}

/// A layer's factors prepared for its next training forward.
#[derive(Default)]
struct Prepared {
    factors: Option<(Tensor, Tensor)>,
    input_dtype: Option<DType>,
}

/// y = x·Wᵀ (+ b) through the frozen matmul (no gradient for W).
pub(crate) fn frozen_forward(
    x: &Tensor,
    weight: &Tensor,
    bias: Option<&Tensor>,
) -> candle_core::Result<Tensor> {
    crate::ops::linear(x, weight, bias)
}

/// A linear layer that is not adapted: frozen weight, optional bias.
struct FrozenLayer(LinearWeights);

impl LinearLayer for FrozenLayer {
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        frozen_forward(x, &self.0.weight, self.0.bias.as_ref())
    }

    fn forward_normed(&self, x: &crate::ops::NormedInput) -> candle_core::Result<Tensor> {
        crate::ops::frozen_norm_linear(x, self.0.dense_map())
    }

    fn frozen_weight(&self) -> Option<&Tensor> {
        self.0.bias.is_none().then_some(&self.0.weight)
    }
}

/// The handle a model holds; the adapter keeps another to merge and save.
struct LoraHandle(Arc<LoraLinear>);

impl LinearLayer for LoraHandle {
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        self.0.forward(x, None)
    }

    fn forward_swiglu(&self, gate: &Tensor, up: &Tensor) -> candle_core::Result<Tensor> {
        self.0.forward(gate, Some(up))
    }

    fn forward_normed(&self, x: &crate::ops::NormedInput) -> candle_core::Result<Tensor> {
        self.0.forward_normed(x)
    }
}

fn lock_error(what: &str) -> candle_core::Error {
    candle_core::Error::Msg(format!("lock on {what} poisoned by an earlier panic"))
}

impl LoraLinear {
    fn bias(&self) -> Option<&Tensor> {
        match &self.base {
            Base::Dense { bias, .. } => bias.as_ref(),
            Base::Quantized(base) => base.bias.as_ref(),
        }
    }

    /// The base weight as a dense tensor: the (possibly merged) dense weight, or the 4-bit
    /// weight dequantized to its compute dtype.
    fn dense_weight(&self) -> candle_core::Result<Tensor> {
        match &self.base {
            Base::Dense { weight, .. } => {
                Ok(weight.read().map_err(|_| lock_error(&self.path))?.clone())
            }
            Base::Quantized(base) => base.weight.dequantize(base.compute_dtype),
        }
    }

    /// The dropout mask for an input like `x` (a constant: no gradient is stored for it) and the
    /// factors `A`, `B`, detached in inference mode: with a frozen base and untracked inputs the
    /// forward pass then builds no autograd graph (evaluation, generation).
    fn factors(&self, x: &Tensor) -> candle_core::Result<(Option<Tensor>, Tensor, Tensor)> {
        let training = self.runtime.training.load(Ordering::Acquire);
        let mask = if self.dropout > 0.0 && training {
            let in_features = x.dim(candle_core::D::Minus1)?;
            let rows = x.elem_count() / in_features.max(1);
            let seed = mix_seed(
                self.runtime.dropout_seed.load(Ordering::Acquire),
                &self.path,
            );
            Some(dropout_mask(seed, self.dropout, rows, in_features, x)?)
        } else {
            None
        };
        let (a, b) = if training {
            (self.a.as_tensor().clone(), self.b.as_tensor().clone())
        } else {
            (self.a.as_tensor().detach(), self.b.as_tensor().detach())
        };
        Ok((mask, a, b))
    }

    /// The factors cast by [`LoraAdapter::prepare_forward`] for this training forward of an
    /// input of `dtype` (taken: a later forward casts its own unless prepared again), and
    /// `dtype` noted as the one to prepare next time. `None` outside training.
    fn take_prepared(&self, dtype: DType) -> candle_core::Result<Option<(Tensor, Tensor)>> {
        if !self.runtime.training.load(Ordering::Acquire) {
            return Ok(None);
        }
        let mut prepared = self.prepared.lock().map_err(|_| lock_error(&self.path))?;
        prepared.input_dtype = Some(dtype);
        Ok(prepared.factors.take())
    }

    /// The frozen base as an op's frozen map.
    fn frozen_map(&self) -> candle_core::Result<Arc<dyn crate::ops::FrozenMap>> {
        Ok(match &self.base {
            Base::Dense { weight, bias } => Arc::new(crate::ops::DenseMap {
                weight: weight.read().map_err(|_| lock_error(&self.path))?.clone(),
                bias: bias.clone(),
            }),
            Base::Quantized(base) => Arc::new(base.clone()),
        })
    }

    /// `forward(rms_norm(..))` of an RMSNorm's output: plain LoRA and a merged layer read it
    /// without keeping it (`ops::low_rank_norm_linear`, `ops::frozen_norm_linear`); DoRA reads
    /// the plain norm node.
    fn forward_normed(&self, x: &crate::ops::NormedInput) -> candle_core::Result<Tensor> {
        if self.merged.load(Ordering::Acquire) {
            return crate::ops::frozen_norm_linear(x, self.frozen_map()?);
        }
        if self.magnitude.is_some() {
            return self.forward(&x.normed()?, None);
        }
        let (mask, a, b) = self.factors(x.input())?;
        let cast = self.take_prepared(x.input().dtype())?;
        let factors = crate::ops::Factors::with_cast(&a, &b, cast.as_ref());
        crate::ops::low_rank_norm_linear(x, self.frozen_map()?, factors, self.scale, mask)
    }

    /// `forward(x)`, or with `up`, `forward(silu(x) · up)` (`x` is then the gate).
    fn forward(&self, x: &Tensor, up: Option<&Tensor>) -> candle_core::Result<Tensor> {
        let fused_swiglu = up;
        let product;
        let x = match up {
            // The composition for the merged and DoRA paths (LoRA fuses SwiGLU below).
            Some(up) if self.merged.load(Ordering::Acquire) || self.magnitude.is_some() => {
                product = crate::ops::swiglu(x, up)?;
                &product
            }
            _ => x,
        };
        if self.merged.load(Ordering::Acquire) {
            return match &self.base {
                Base::Dense { weight, bias } => {
                    let weight = weight.read().map_err(|_| lock_error(&self.path))?.clone();
                    frozen_forward(x, &weight, bias.as_ref())
                }
                Base::Quantized(base) => base.forward(x),
            };
        }
        let training = self.runtime.training.load(Ordering::Acquire);
        let dropped = self.dropout > 0.0 && training;
        let dims = x.dims().to_vec();
        let in_features = *dims.last().unwrap_or(&0);
        let rows = x.elem_count() / in_features.max(1);
        let (mask, a, b) = self.factors(x)?;
        let Some(magnitude) = &self.magnitude else {
            // LoRA: base + s·B(A x) as one node (ops::low_rank_linear).
            let base = self.frozen_map()?;
            let cast = self.take_prepared(x.dtype())?;
            let factors = crate::ops::Factors::with_cast(&a, &b, cast.as_ref());
            return match fused_swiglu {
                Some(up) => {
                    crate::ops::low_rank_swiglu_linear(x, up, base, factors, self.scale, mask)
                }
                None => crate::ops::low_rank_linear(x, base, factors, self.scale, mask),
            };
        };
        // DoRA: the composition, as PEFT's DoraLinearLayer writes it.
        let (y, dense) = match &self.base {
            Base::Dense { weight, bias } => {
                let weight = weight.read().map_err(|_| lock_error(&self.path))?.clone();
                (frozen_forward(x, &weight, bias.as_ref())?, Some(weight))
            }
            Base::Quantized(base) => (base.forward(x)?, None),
        };
        let mut input = x.reshape((rows, in_features))?;
        if let Some(mask) = &mask {
            input = crate::ops::mul_constant(&input, mask)?;
        }
        let a = a.to_dtype(x.dtype())?;
        let b = b.to_dtype(x.dtype())?;
        // s·B(A x): scaling the rank-r intermediate is the cheapest place for it.
        // `*_tracked`: an untracked input (layer 0's) or base output gets no stored gradient.
        let hidden = crate::ops::matmul_tracked(&input, &a.t()?)?.affine(self.scale, 0.0)?;
        let delta = hidden.matmul(&b.t()?)?;
        let mut out_dims = dims;
        if let Some(last) = out_dims.last_mut() {
            *last = delta.dim(1)?;
        }
        let delta = delta.reshape(out_dims)?;
        // DoRA (PEFT's DoraLinearLayer.forward): the norm of W + s·B·A enters detached. Over a
        // 4-bit base (QDoRA), W is the dequantized weight.
        let weight = match dense {
            Some(weight) => weight,
            None => self.dense_weight()?.to_dtype(x.dtype())?,
        };
        let norm = dora::weight_norm(&weight, &self.delta_weight()?.detach())?.detach();
        let magnitude = if training {
            magnitude.as_tensor().clone()
        } else {
            magnitude.as_tensor().detach()
        };
        let base = if dropped {
            frozen_forward(&input.reshape(x.shape())?, &weight, None)?
        } else {
            match self.bias() {
                Some(bias) => crate::ops::sub_constant(&y, bias)?,
                None => y.clone(),
            }
        };
        crate::ops::add_tracked(&y, &dora::dora_update(&base, &delta, &magnitude, &norm)?)
    }

    /// s·B·A in f32, `[out, in]`.
    fn delta_weight(&self) -> candle_core::Result<Tensor> {
        self.b
            .as_tensor()
            .matmul(self.a.as_tensor())?
            .affine(self.scale, 0.0)
    }

    fn merged_weight(&self, weight: &Tensor) -> candle_core::Result<Tensor> {
        let merged = match &self.magnitude {
            Some(magnitude) => {
                dora::merged_weight(weight, &self.delta_weight()?, magnitude.as_tensor())?
            }
            None => weight.to_dtype(DType::F32)?.add(&self.delta_weight()?)?,
        };
        merged.to_dtype(weight.dtype())
    }
}

/// Inverted dropout mask (0 or 1/(1-p)) from `seed`, in x's dtype and device. On the CPU it is
/// drawn from a ChaCha stream (bit-reproducible everywhere); on a GPU it is drawn on the device
/// (curand seeded with `seed`, reproducible on that device): a host-drawn mask would copy
/// rows × columns values to the GPU for every adapted layer of every step.
fn dropout_mask(
    seed: u64,
    probability: f32,
    rows: usize,
    columns: usize,
    like: &Tensor,
) -> candle_core::Result<Tensor> {
    let keep = 1.0 / (1.0 - probability);
    if !like.device().is_cpu() {
        like.device().set_seed(seed)?;
        let uniform = Tensor::rand(0f32, 1f32, (rows, columns), like.device())?;
        return uniform
            .ge(probability)?
            .to_dtype(like.dtype())?
            .affine(f64::from(keep), 0.0);
    }
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let values: Vec<f32> = (0..rows * columns)
        .map(|_| {
            if rng.random::<f32>() < probability {
                0.0
            } else {
                keep
            }
        })
        .collect();
    Tensor::from_vec(values, (rows, columns), like.device())?.to_dtype(like.dtype())
}

/// Kaiming-uniform with a = √5 as torch's `nn.Linear` / PEFT use for lora_A: U(±1/√fan_in).
fn kaiming_uniform(
    seed: u64,
    rows: usize,
    columns: usize,
    device: &Device,
) -> candle_core::Result<Tensor> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let bound = 1.0 / (columns as f64).sqrt();
    let values: Vec<f32> = (0..rows * columns)
        .map(|_| ((rng.random::<f64>() * 2.0 - 1.0) * bound) as f32)
        .collect();
    Tensor::from_vec(values, (rows, columns), device)
}

/// Loaded adapter pairs by module path (removed as their layers are built).
type LoadedPairs = BTreeMap<String, LoraPair>;

/// Where the A/B values of new layers come from.
enum Source {
    /// Fresh: A Kaiming-uniform, B zero.
    Init,
    /// From a saved adapter: module path → pair (with its scale), the file they came from, and
    /// every pair as read (for merge patches without a model, and to save the patterns again).
    Loaded {
        tensors: Mutex<LoadedPairs>,
        file: String,
        all: Vec<LoraPair>,
        config: Value,
    },
}

/// A LoRA adapter: the factory that injects it and the registry of adapted layers.
pub struct LoraAdapter {
    settings: LoraSettings,
    /// PEFT's `use_dora`: every adapted layer also trains a magnitude vector.
    use_dora: bool,
    device: Device,
    source: Source,
    runtime: Arc<Runtime>,
    layers: Mutex<Vec<Arc<LoraLinear>>>,
}

impl LoraAdapter {
    /// A fresh adapter (A random, B zero) to inject into a model built on `device`.
    pub fn new(settings: LoraSettings, device: &Device) -> Result<Self, PeftError> {
        if settings.rank == 0 {
            return Err(PeftError::invalid("LoRA rank r must be at least 1"));
        }
        if !(0.0..1.0).contains(&settings.dropout) {
            return Err(PeftError::invalid(format!(
                "LoRA dropout must be in [0, 1), got {}",
                settings.dropout
            )));
        }
        let runtime = Arc::new(Runtime {
            training: AtomicBool::new(true),
            dropout_seed: AtomicU64::new(settings.seed),
        });
        Ok(LoraAdapter {
            settings,
            use_dora: false,
            device: device.clone(),
            source: Source::Init,
            runtime,
            layers: Mutex::new(Vec::new()),
        })
    }

    /// Load a PEFT LoRA folder. Build the model through [`Adapter::linear_factory`], then call
    /// [`Adapter::finish_injection`] to check every tensor found its layer.
    pub fn load(dir: &Path, device: &Device) -> Result<Self, PeftError> {
        let file = LoraFile::read(dir, device)?;
        let tensors: LoadedPairs = file
            .pairs
            .iter()
            .map(|pair| (pair.path.clone(), pair.clone()))
            .collect();
        Ok(LoraAdapter {
            settings: file.settings().clone(),
            use_dora: file.use_dora,
            device: device.clone(),
            source: Source::Loaded {
                tensors: Mutex::new(tensors),
                file: file.weights_path.display().to_string(),
                all: file.pairs,
                config: file.config,
            },
            runtime: Arc::default(),
            layers: Mutex::new(Vec::new()),
        })
    }

    pub fn settings(&self) -> &LoraSettings {
        &self.settings
    }

    /// Make a fresh adapter DoRA (PEFT's `use_dora`): each layer's magnitude vector starts at the
    /// row norms of its weight.
    pub fn with_dora(mut self, use_dora: bool) -> Self {
        self.use_dora = use_dora;
        self
    }

    /// Whether the layers are DoRA layers.
    pub fn use_dora(&self) -> bool {
        self.use_dora
    }

    /// Paths of the adapted layers, in build order.
    pub fn adapted_paths(&self) -> Vec<String> {
        self.layers()
            .map(|layers| layers.iter().map(|layer| layer.path.clone()).collect())
            .unwrap_or_default()
    }

    fn layers(&self) -> Result<std::sync::MutexGuard<'_, Vec<Arc<LoraLinear>>>, PeftError> {
        self.layers
            .lock()
            .map_err(|_| PeftError::invalid("LoRA layer registry poisoned by an earlier panic"))
    }

    /// Every targeted layer was built, and every loaded pair found its layer.
    fn check_injection(&self) -> Result<(), PeftError> {
        if self.layers()?.is_empty() {
            return Err(PeftError::invalid(no_target_matched(
                &self.settings.targets,
            )));
        }
        if let Source::Loaded { tensors, file, .. } = &self.source {
            let tensors = tensors
                .lock()
                .map_err(|_| PeftError::invalid("loaded tensors poisoned"))?;
            if let Some(path) = tensors.keys().next() {
                return Err(PeftError::invalid(unused_pairs(file, path, tensors.len())));
            }
        }
        Ok(())
    }

    /// The adapter_config.json PEFT 0.21 writes for these settings.
    pub fn peft_config(&self, base_model_name_or_path: &str) -> Value {
        let targets = self.settings.targets.to_peft_json(&self.adapted_paths());
        // A loaded adapter keeps its per-module ranks and alphas.
        let pattern = |key: &str| match &self.source {
            Source::Loaded { config, .. } => config.get(key).cloned().unwrap_or_else(|| json!({})),
            Source::Init => json!({}),
        };
        // Keys in sorted order, as PEFT writes them; values are PEFT's defaults except ours.
        json!({
            "alpha_pattern": pattern("alpha_pattern"),
            "auto_mapping": null,
            "base_model_name_or_path": base_model_name_or_path,
            "bias": "none",
            "exclude_modules": null,
            "fan_in_fan_out": self.settings.fan_in_fan_out,
            "inference_mode": true,
            "init_lora_weights": true,
            "layer_replication": null,
            "layers_pattern": null,
            "layers_to_transform": null,
            "loftq_config": {},
            "lora_alpha": json_number(self.settings.alpha),
            "lora_bias": false,
            // The f32 setting as its shortest decimal (0.05, not 0.05000000074505806).
            "lora_dropout": shortest_f64(self.settings.dropout),
            "megatron_config": null,
            "megatron_core": "megatron.core",
            "modules_to_save": null,
            "peft_type": "LORA",
            "r": self.settings.rank,
            "rank_pattern": pattern("rank_pattern"),
            "revision": null,
            "target_modules": targets,
            "task_type": "CAUSAL_LM",
            "use_dora": self.use_dora,
            "use_rslora": self.settings.use_rslora,
        })
    }
}

/// The f64 whose decimal is `value`'s shortest round-trip text: what the user wrote.
fn shortest_f64(value: f32) -> f64 {
    value.to_string().parse().unwrap_or(f64::from(value))
}

fn no_target_matched(targets: &TargetModules) -> String {
    format!("LoRA target modules {targets} matched no linear layer of the model")
}

fn missing_pair(file: &str, path: &str) -> String {
    format!("{file}: missing lora_A/lora_B for targeted module `{path}`")
}

/// `count` loaded pairs, the first for module `path`, found no targeted layer.
fn unused_pairs(file: &str, path: &str, count: usize) -> String {
    format!(
        "{file}: adapter tensors for `{path}` (and {} more) match no targeted linear layer of the model",
        count - 1
    )
}

/// Whether a loaded pair (and DoRA magnitude) fits a `[out, in]` layer; rank_pattern may give
/// the module its own rank, so the rank is lora_A's first dimension.
fn pair_shape_problem(
    file: &str,
    path: &str,
    a: &[usize],
    b: &[usize],
    magnitude: Option<&[usize]>,
    out_features: usize,
    in_features: usize,
) -> Result<(), String> {
    let rank = a.first().copied().unwrap_or(0);
    if a != [rank, in_features] || b != [out_features, rank] {
        return Err(format!(
            "{file}: `{path}` has lora_A {a:?} and lora_B {b:?}, expected [{rank}, {in_features}] and [{out_features}, {rank}]"
        ));
    }
    if let Some(magnitude) = magnitude.filter(|dims| *dims != [out_features]) {
        return Err(format!(
            "{file}: `{path}` has lora_magnitude_vector {magnitude:?}, expected [{out_features}]"
        ));
    }
    Ok(())
}

impl LinearFactory for LoraAdapter {
    fn build(&self, path: &str, base: LinearWeights) -> candle_core::Result<Box<dyn LinearLayer>> {
        if !self.settings.targets.matches(path) {
            return Ok(Box::new(FrozenLayer(base)));
        }
        let (out_features, in_features) = base.weight.dims2()?;
        self.adapt(
            path,
            Base::Dense {
                weight: RwLock::new(base.weight),
                bias: base.bias,
            },
            out_features,
            in_features,
        )
    }

    /// QLoRA: the same layer over a 4-bit base weight (untargeted layers stay frozen 4-bit).
    fn build_quantized(
        &self,
        path: &str,
        base: QuantizedLinearWeights,
    ) -> candle_core::Result<Box<dyn LinearLayer>> {
        if !self.settings.targets.matches(path) {
            return Ok(Box::new(FrozenQuantizedLinear(base)));
        }
        let (out_features, in_features) = base.dims();
        self.adapt(path, Base::Quantized(base), out_features, in_features)
    }
}

impl LoraAdapter {
    /// Wrap the targeted layer `path` (`[out_features, in_features]`) with its A and B.
    fn adapt(
        &self,
        path: &str,
        base: Base,
        out_features: usize,
        in_features: usize,
    ) -> candle_core::Result<Box<dyn LinearLayer>> {
        let rank = self.settings.rank;
        let (a, b, scale, magnitude) = match &self.source {
            Source::Init => (
                kaiming_uniform(
                    mix_seed(self.settings.seed, path),
                    rank,
                    in_features,
                    &self.device,
                )?,
                Tensor::zeros((out_features, rank), DType::F32, &self.device)?,
                self.settings.scale(),
                None,
            ),
            Source::Loaded { tensors, file, .. } => {
                let mut tensors = tensors.lock().map_err(|_| lock_error("loaded tensors"))?;
                let Some(LoraPair {
                    a,
                    b,
                    scale,
                    magnitude,
                    ..
                }) = tensors.remove(path)
                else {
                    return Err(candle_core::Error::Msg(missing_pair(file, path)));
                };
                pair_shape_problem(
                    file,
                    path,
                    a.dims(),
                    b.dims(),
                    magnitude.as_ref().map(Tensor::dims),
                    out_features,
                    in_features,
                )
                .map_err(candle_core::Error::Msg)?;
                (
                    a.to_device(&self.device)?,
                    b.to_device(&self.device)?,
                    scale,
                    magnitude.map(|m| m.to_device(&self.device)).transpose()?,
                )
            }
        };
        let magnitude = match (self.use_dora, magnitude) {
            (false, _) => None,
            (true, Some(loaded)) => Some(loaded),
            // PEFT's init: the row norms of W + s·B·A (B = 0: of W), as the forward computes them.
            (true, None) => {
                let delta = b.matmul(&a)?.affine(scale, 0.0)?;
                let weight = match &base {
                    Base::Dense { weight, .. } => {
                        weight.read().map_err(|_| lock_error(path))?.clone()
                    }
                    Base::Quantized(base) => base.weight.dequantize(base.compute_dtype)?,
                };
                Some(dora::weight_norm(
                    &weight,
                    &delta.to_device(weight.device())?,
                )?)
            }
        };
        let layer = Arc::new(LoraLinear {
            path: path.to_string(),
            base,
            a: Var::from_tensor(&a)?,
            b: Var::from_tensor(&b)?,
            scale,
            dropout: self.settings.dropout,
            magnitude: magnitude.map(|m| Var::from_tensor(&m)).transpose()?,
            original: Mutex::new(None),
            merged: AtomicBool::new(false),
            runtime: self.runtime.clone(),
            prepared: Mutex::new(Prepared::default()),
        });
        let mut layers = self.layers.lock().map_err(|_| lock_error("LoRA layers"))?;
        if layers.iter().any(|existing| existing.path == path) {
            return Err(candle_core::Error::Msg(format!(
                "linear layer `{path}` was built twice through one LoRA adapter"
            )));
        }
        layers.push(layer.clone());
        Ok(Box::new(LoraHandle(layer)))
    }
}

impl Adapter for LoraAdapter {
    fn peft_type(&self) -> &'static str {
        "LORA"
    }

    fn linear_factory(&self) -> &dyn LinearFactory {
        self
    }

    fn finish_injection(&self, _model: &dyn CausalLm) -> Result<(), PeftError> {
        self.check_injection()
    }

    fn check_layers(&self, layers: &[LayerShape<'_>]) -> Result<(), PeftError> {
        let Source::Loaded { file, all, .. } = &self.source else {
            return Ok(());
        };
        check_loaded_layers(
            layers,
            &self.settings.targets,
            all.iter().map(|pair| (pair.path.as_str(), pair)).collect(),
            |layer, pair| {
                pair_shape_problem(
                    file,
                    layer.path,
                    pair.a.dims(),
                    pair.b.dims(),
                    pair.magnitude.as_ref().map(Tensor::dims),
                    layer.out_features,
                    layer.in_features,
                )
            },
            LoadedLayerMessages {
                missing: &|path| missing_pair(file, path),
                none_matched: no_target_matched(&self.settings.targets),
                unused: &|path, count| unused_pairs(file, path, count),
            },
        )
    }

    fn trainable_vars(&self) -> Vec<(String, Var)> {
        let mut vars = Vec::new();
        if let Ok(layers) = self.layers() {
            for layer in layers.iter() {
                vars.push((
                    format!("{PEFT_PREFIX}{}.lora_A.weight", layer.path),
                    layer.a.clone(),
                ));
                vars.push((
                    format!("{PEFT_PREFIX}{}.lora_B.weight", layer.path),
                    layer.b.clone(),
                ));
                if let Some(magnitude) = &layer.magnitude {
                    // PEFT saves `lora_magnitude_vector.default.weight` as `lora_magnitude_vector`.
                    vars.push((
                        format!("{PEFT_PREFIX}{}.lora_magnitude_vector", layer.path),
                        magnitude.clone(),
                    ));
                }
            }
        }
        vars.sort_by(|x, y| x.0.cmp(&y.0));
        vars
    }

    fn set_mode(&self, mode: AdapterMode) {
        match mode {
            AdapterMode::Train { seed } => {
                self.runtime.dropout_seed.store(seed, Ordering::Release);
                self.runtime.training.store(true, Ordering::Release);
            }
            AdapterMode::Eval => self.runtime.training.store(false, Ordering::Release),
        }
        // Nothing prepared before a mode change is read after it.
        if let Ok(layers) = self.layers() {
            for layer in layers.iter() {
                if let Ok(mut prepared) = layer.prepared.lock() {
                    prepared.factors = None;
                }
            }
        }
    }

    /// Every plain LoRA layer's `A` and `B` cast to the input dtype of its last training
    /// forward, all in one launch on CUDA (`ops::cast_factors`), for the next forward to take.
    /// Layers never run in training yet, DoRA layers, merged layers and factors already in
    /// that dtype get nothing (their forward casts as before).
    fn prepare_forward(&self) -> Result<(), PeftError> {
        let layers = self.layers()?;
        let training = self.runtime.training.load(Ordering::Acquire);
        let mut groups: Vec<(DType, Vec<&Arc<LoraLinear>>)> = Vec::new();
        for layer in layers.iter() {
            let mut prepared = layer
                .prepared
                .lock()
                .map_err(|_| PeftError::invalid(format!("{}: lock poisoned", layer.path)))?;
            prepared.factors = None;
            if !training || layer.magnitude.is_some() || layer.merged.load(Ordering::Acquire) {
                continue;
            }
            let Some(dtype) = prepared.input_dtype else {
                continue;
            };
            if layer.a.dtype() == dtype && layer.b.dtype() == dtype {
                continue;
            }
            match groups.iter_mut().find(|(d, _)| *d == dtype) {
                Some((_, group)) => group.push(layer),
                None => groups.push((dtype, vec![layer])),
            }
        }
        for (dtype, group) in groups {
            let tensors: Vec<&Tensor> = group
                .iter()
                .flat_map(|layer| [layer.a.as_tensor(), layer.b.as_tensor()])
                .collect();
            let casts = crate::ops::cast_factors(&tensors, dtype)
                .context(|| format!("casting LoRA's factors to {dtype:?} for the forward"))?;
            for (layer, pair) in group.iter().zip(casts.chunks_exact(2)) {
                layer
                    .prepared
                    .lock()
                    .map_err(|_| PeftError::invalid(format!("{}: lock poisoned", layer.path)))?
                    .factors = Some((pair[0].clone(), pair[1].clone()));
            }
        }
        Ok(())
    }

    fn save(&self, dir: &Path, base_model_name_or_path: &str) -> Result<(), PeftError> {
        let tensors: Vec<(String, Tensor)> = self
            .trainable_vars()
            .into_iter()
            .map(|(name, var)| (name, var.as_tensor().clone()))
            .collect();
        write_adapter_folder(dir, &self.peft_config(base_model_name_or_path), &tensors)
    }

    fn merge_patches(&self) -> Result<Option<Vec<WeightPatch>>, PeftError> {
        let layers = self.layers()?;
        let mut patches = Vec::new();
        if layers.is_empty() {
            // A loaded adapter whose model was never built: the pairs as read.
            if let Source::Loaded { all, .. } = &self.source {
                for pair in all {
                    let delta = pair
                        .b
                        .matmul(&pair.a)
                        .and_then(|d| d.affine(pair.scale, 0.0))
                        .context(|| format!("merging LoRA into `{}`", pair.path))?;
                    patches.push(patch(&pair.path, delta, pair.magnitude.clone())?);
                }
            }
        }
        for layer in layers.iter() {
            let delta = layer
                .delta_weight()
                .context(|| format!("merging LoRA into `{}`", layer.path))?;
            let magnitude = layer.magnitude.as_ref().map(|m| m.as_tensor().clone());
            patches.push(patch(&layer.path, delta, magnitude)?);
        }
        Ok(Some(patches))
    }

    fn merge(&self) -> Result<(), PeftError> {
        for layer in self.layers()?.iter() {
            if layer.merged.load(Ordering::Acquire) {
                continue;
            }
            let Base::Dense { weight, .. } = &layer.base else {
                return Err(PeftError::invalid(format!(
                    "`{}`: a LoRA layer over a 4-bit base is not merged into the 4-bit weight (the update would mostly round away); export a merged 16-bit model over the dequantized base instead",
                    layer.path
                )));
            };
            let mut weight = weight
                .write()
                .map_err(|_| PeftError::invalid(format!("{}: lock poisoned", layer.path)))?;
            let merged = layer
                .merged_weight(&weight)
                .context(|| format!("merging LoRA into `{}`", layer.path))?;
            if layer.magnitude.is_some() {
                *layer
                    .original
                    .lock()
                    .map_err(|_| PeftError::invalid(format!("{}: lock poisoned", layer.path)))? =
                    Some(weight.clone());
            }
            *weight = merged;
            layer.merged.store(true, Ordering::Release);
        }
        Ok(())
    }

    fn unmerge(&self) -> Result<(), PeftError> {
        for layer in self.layers()?.iter() {
            if !layer.merged.load(Ordering::Acquire) {
                continue;
            }
            let Base::Dense { weight, .. } = &layer.base else {
                continue;
            };
            let mut weight = weight
                .write()
                .map_err(|_| PeftError::invalid(format!("{}: lock poisoned", layer.path)))?;
            let original = layer
                .original
                .lock()
                .map_err(|_| PeftError::invalid(format!("{}: lock poisoned", layer.path)))?
                .take();
            if let Some(original) = original {
                // DoRA: its merge scales rows, so the base weight kept at merge comes back.
                *weight = original;
                layer.merged.store(false, Ordering::Release);
                continue;
            }
            let restored = weight
                .to_dtype(DType::F32)
                .and_then(|w| w.sub(&layer.delta_weight()?))
                .and_then(|w| w.to_dtype(weight.dtype()))
                .context(|| format!("unmerging LoRA from `{}`", layer.path))?;
            *weight = restored;
            layer.merged.store(false, Ordering::Release);
        }
        Ok(())
    }
}

/// The patch of one module: `W + Δ`, or with DoRA's magnitude `(m / ‖W + Δ‖) ⊙ (W + Δ)`.
fn patch(path: &str, delta: Tensor, magnitude: Option<Tensor>) -> Result<WeightPatch, PeftError> {
    let dims = delta
        .dims2()
        .context(|| format!("the LoRA delta of `{path}`"))?;
    let change = match magnitude {
        None => PatchChange::Add(delta),
        Some(magnitude) => PatchChange::Map(Arc::new(move |weight: &Tensor| {
            dora::merged_weight(weight, &delta, &magnitude)
        })),
    };
    Ok(WeightPatch {
        path: path.to_string(),
        parameter: Parameter::Weight,
        dims,
        change,
        optional: false,
    })
}

/// Load only the tensors of a PEFT LoRA file as `name → tensor` (for checks and tools).
pub fn read_adapter_tensors(
    dir: &Path,
    device: &Device,
) -> Result<HashMap<String, Tensor>, PeftError> {
    let path = dir.join(super::format::ADAPTER_WEIGHTS);
    candle_core::safetensors::load(&path, device).context(|| format!("reading {}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings(targets: &[&str]) -> LoraSettings {
        LoraSettings {
            rank: 2,
            alpha: 4.0,
            dropout: 0.0,
            targets: TargetModules::Names(targets.iter().map(|s| s.to_string()).collect()),
            use_rslora: false,
            fan_in_fan_out: false,
            seed: 7,
        }
    }

    fn base(out: usize, input: usize, seed: u64) -> LinearWeights {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let values: Vec<f32> = (0..out * input)
            .map(|_| rng.random::<f32>() - 0.5)
            .collect();
        LinearWeights {
            weight: Tensor::from_vec(values, (out, input), &Device::Cpu).unwrap(),
            bias: Some(Tensor::new(&[0.5f32, -0.25, 1.0][..out], &Device::Cpu).unwrap()),
        }
    }

    fn input() -> Tensor {
        Tensor::arange(0f32, 2.0 * 4.0 * 5.0, &Device::Cpu)
            .unwrap()
            .affine(0.05, -1.0)
            .unwrap()
            .reshape((2, 4, 5))
            .unwrap()
    }

    #[test]
    fn adapter_config_writes_dropout_as_the_user_wrote_it() {
        for (dropout, text) in [(0.05f32, "0.05"), (0.1, "0.1"), (0.0, "0.0")] {
            let mut s = settings(&["q"]);
            s.dropout = dropout;
            let adapter = LoraAdapter::new(s, &Device::Cpu).unwrap();
            let config = adapter.peft_config("base");
            assert_eq!(config["lora_dropout"].to_string(), text);
        }
    }

    #[test]
    fn scale_follows_rslora() {
        let mut s = settings(&["q"]);
        s.rank = 16;
        s.alpha = 32.0;
        assert_eq!(s.scale(), 2.0);
        s.use_rslora = true;
        assert_eq!(s.scale(), 8.0);
    }

    #[test]
    fn kaiming_init_is_bounded_seeded_and_b_is_zero() {
        let adapter = LoraAdapter::new(settings(&["q"]), &Device::Cpu).unwrap();
        adapter.build("layer.q", base(3, 5, 1)).unwrap();
        let vars = adapter.trainable_vars();
        assert_eq!(vars[0].0, "base_model.model.layer.q.lora_A.weight");
        let a: Vec<f32> = vars[0].1.flatten_all().unwrap().to_vec1().unwrap();
        let bound = 1.0 / 5f32.sqrt();
        assert!(a.iter().all(|v| v.abs() <= bound) && a.iter().any(|v| *v != 0.0));
        let b: Vec<f32> = vars[1].1.flatten_all().unwrap().to_vec1().unwrap();
        assert!(b.iter().all(|v| *v == 0.0));
        let again = LoraAdapter::new(settings(&["q"]), &Device::Cpu).unwrap();
        again.build("layer.q", base(3, 5, 1)).unwrap();
        let a2: Vec<f32> = again.trainable_vars()[0]
            .1
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        assert_eq!(a, a2);
    }

    #[test]
    fn forward_matches_the_formula_and_merge_agrees() {
        let adapter = LoraAdapter::new(settings(&["q"]), &Device::Cpu).unwrap();
        let weights = base(3, 5, 2);
        let layer = adapter.build("layer.q", weights.clone()).unwrap();
        let frozen = adapter.build("layer.k", base(3, 5, 3)).unwrap();
        let x = input();
        let plain = frozen_forward(&x, &weights.weight, weights.bias.as_ref()).unwrap();
        // Step 0: B = 0 → identical output.
        let diff = layer
            .forward(&x)
            .unwrap()
            .sub(&plain)
            .unwrap()
            .abs()
            .unwrap();
        assert_eq!(diff.max_all().unwrap().to_scalar::<f32>().unwrap(), 0.0);
        // Non-zero B: compare with W + s·B·A computed by hand.
        let vars = adapter.trainable_vars();
        let b = Tensor::new(&[[0.1f32, -0.2], [0.3, 0.4], [-0.5, 0.6]], &Device::Cpu).unwrap();
        vars[1].1.set(&b).unwrap();
        let a = vars[0].1.as_tensor();
        let w = weights
            .weight
            .add(&b.matmul(a).unwrap().affine(2.0, 0.0).unwrap())
            .unwrap();
        let expected = frozen_forward(&x, &w, weights.bias.as_ref()).unwrap();
        let got = layer.forward(&x).unwrap();
        let error = got
            .sub(&expected)
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap();
        assert!(error.to_scalar::<f32>().unwrap() < 1e-5);
        adapter.merge().unwrap();
        let merged = layer.forward(&x).unwrap();
        let error = merged.sub(&got).unwrap().abs().unwrap().max_all().unwrap();
        assert!(error.to_scalar::<f32>().unwrap() < 1e-5);
        adapter.unmerge().unwrap();
        let error = layer
            .forward(&x)
            .unwrap()
            .sub(&got)
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap();
        assert!(error.to_scalar::<f32>().unwrap() < 1e-5);
        // The unadapted layer has no trainable vars.
        assert_eq!(vars.len(), 2);
        drop(frozen);
    }

    #[test]
    fn prepared_factors_are_read_by_one_training_forward_only() {
        let adapter = LoraAdapter::new(settings(&["q"]), &Device::Cpu).unwrap();
        let weights = base(3, 5, 2);
        let weights = LinearWeights {
            weight: weights.weight.to_dtype(DType::BF16).unwrap(),
            bias: weights.bias.map(|b| b.to_dtype(DType::BF16).unwrap()),
        };
        let layer = adapter.build("layer.q", weights).unwrap();
        let x = input().to_dtype(DType::BF16).unwrap();
        let vars = adapter.trainable_vars();
        let b = |scale: f64| {
            Tensor::new(&[[0.1f32, -0.2], [0.3, 0.4], [-0.5, 0.6]], &Device::Cpu)
                .unwrap()
                .affine(scale, 0.0)
                .unwrap()
        };
        vars[1].1.set(&b(1.0)).unwrap();
        let run = || {
            let y = layer.forward(&x).unwrap();
            let grads = y
                .to_dtype(DType::F32)
                .unwrap()
                .sum_all()
                .unwrap()
                .backward()
                .unwrap();
            let grad = |v: &Var| grads.get(v.as_tensor()).unwrap().to_vec2::<f32>().unwrap();
            let y = y.to_dtype(DType::F32).unwrap().to_vec3::<f32>().unwrap();
            (y, grad(&vars[0].1), grad(&vars[1].1))
        };
        let prepared = || {
            adapter.layers().unwrap()[0]
                .prepared
                .lock()
                .unwrap()
                .factors
                .is_some()
        };
        // Nothing to prepare before a training forward has shown the input dtype.
        adapter.set_mode(AdapterMode::Train { seed: 1 });
        adapter.prepare_forward().unwrap();
        assert!(!prepared());
        let cast_in_the_forward = run();
        // Prepared: the same output and gradients, and the forward takes what was prepared.
        adapter.prepare_forward().unwrap();
        assert!(prepared());
        assert_eq!(run(), cast_in_the_forward);
        assert!(!prepared(), "the forward took the prepared factors");
        // The variables change after a prepared forward: the next forward sees the new values.
        vars[1].1.set(&b(-2.0)).unwrap();
        let after_change = run();
        adapter.set_mode(AdapterMode::Train { seed: 1 });
        adapter.prepare_forward().unwrap();
        assert_eq!(run(), after_change);
        assert_ne!(after_change.0, cast_in_the_forward.0);
        // A mode change drops what was prepared; inference prepares nothing.
        adapter.prepare_forward().unwrap();
        adapter.set_mode(AdapterMode::Train { seed: 2 });
        assert!(!prepared());
        adapter.set_mode(AdapterMode::Eval);
        adapter.prepare_forward().unwrap();
        assert!(!prepared());
    }

    #[test]
    fn dropout_only_in_training_and_seeded() {
        let mut s = settings(&["q"]);
        s.dropout = 0.5;
        let adapter = LoraAdapter::new(s, &Device::Cpu).unwrap();
        let layer = adapter.build("layer.q", base(3, 5, 2)).unwrap();
        let vars = adapter.trainable_vars();
        vars[1]
            .1
            .set(&Tensor::ones((3, 2), DType::F32, &Device::Cpu).unwrap())
            .unwrap();
        let x = input();
        adapter.set_mode(AdapterMode::Eval);
        let eval = layer.forward(&x).unwrap();
        adapter.set_mode(AdapterMode::Train { seed: 1 });
        let first = layer.forward(&x).unwrap();
        let again = layer.forward(&x).unwrap();
        adapter.set_mode(AdapterMode::Train { seed: 2 });
        let other = layer.forward(&x).unwrap();
        let max = |t: Tensor| {
            t.abs()
                .unwrap()
                .max_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap()
        };
        assert_eq!(max(first.sub(&again).unwrap()), 0.0);
        assert!(max(first.sub(&eval).unwrap()) > 0.0);
        assert!(max(first.sub(&other).unwrap()) > 0.0);
        adapter.set_mode(AdapterMode::Eval);
        assert_eq!(max(layer.forward(&x).unwrap().sub(&eval).unwrap()), 0.0);
    }

    #[test]
    fn inference_mode_builds_no_graph_and_training_mode_does() {
        let adapter = LoraAdapter::new(settings(&["q"]), &Device::Cpu).unwrap();
        let layer = adapter.build("layer.q", base(3, 5, 2)).unwrap();
        // A fresh adapter trains: its variables are tracked.
        assert!(layer.forward(&input()).unwrap().track_op());
        adapter.set_mode(AdapterMode::Eval);
        let y = layer.forward(&input()).unwrap();
        assert!(!y.track_op(), "an inference forward built graph nodes");
        adapter.set_mode(AdapterMode::Train { seed: 3 });
        assert!(layer.forward(&input()).unwrap().track_op());
    }

    #[test]
    fn nothing_matched_is_an_error() {
        let adapter = LoraAdapter::new(settings(&["nope"]), &Device::Cpu).unwrap();
        adapter.build("layer.q", base(3, 5, 2)).unwrap();
        let error = adapter.check_injection().unwrap_err().to_string();
        assert!(error.contains("matched no linear layer"), "{error}");
    }
}
