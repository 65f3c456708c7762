//! PEFT methods, one folder each (the shape Hugging Face PEFT uses: a tuner's config, layer and
//! model code together), behind one [`Adapter`] trait (`adapter.rs`) that covers both families:
//! layer methods inject through the model's `LinearFactory` (`lora/` with DoRA, `ia3/`, `qlora/`:
//! LoRA over a 4-bit base), prompt
//! methods through its `Hooks` (`prompt_tuning/`, `prefix_tuning/`, `llama_adapter/`).
//! - `auxiliary/`: PEFT's `trainable_token_indices` and `modules_to_save` for any method whose
//!   config carries them, wrapping the method's adapter.
//! - `counts.rs`: trainable-parameter counts of every method from a model's config alone.
//! - `registry.rs`: PEFT's `peft_type` → loader, and a pipeline's method config → constructor;
//!   the only place that lists the methods.
//! - `format.rs`: the one reader/writer of PEFT folders (adapter_config.json +
//!   adapter_model.safetensors).
//! - `targets.rs`: PEFT's module-matching rules and LoRA parameter counts.
//!
//! Adding a method: its folder, one line in the registry, one row in tests/methods.rs.
//! This module never reads pipeline files or training data, and never prints.

pub mod adapter;
pub mod auxiliary;
pub mod counts;
pub mod format;
pub mod ia3;
pub mod llama_adapter;
pub mod lora;
pub mod prefix_tuning;
pub mod prompt_tuning;
pub mod qlora;
pub mod registry;
pub mod targets;

use std::path::PathBuf;

use candle_core::{Tensor, Var};

pub use adapter::{Adapter, AdapterMode, LayerShape, Parameter, PatchChange, WeightPatch};
pub use format::{
    read_adapter_config, safetensors_bytes, write_atomic, AdapterFiles, ADAPTER_CONFIG,
    ADAPTER_WEIGHTS, PEFT_PREFIX,
};
pub use ia3::{Ia3Adapter, Ia3Settings};
pub use llama_adapter::{LlamaAdapter, LlamaAdapterSettings};
pub use lora::{LoraAdapter, LoraFile, LoraPair, LoraSettings};
pub use prefix_tuning::{PrefixTuningAdapter, PrefixTuningSettings};
pub use prompt_tuning::{PromptTuningAdapter, PromptTuningSettings};
pub use qlora::QloraAdapter;
pub use registry::{load_adapter, new_adapter, MethodContext};
pub use targets::TargetModules;

/// Why a PEFT operation failed. Messages name the file, tensor or module involved.
#[derive(Debug, thiserror::Error)]
pub enum PeftError {
    /// Bad adapter files or an adapter that does not fit the model.
    #[error("{0}")]
    Invalid(String),
    /// Reading or writing a file.
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    /// A tensor operation failed.
    #[error("{context}: {source}")]
    Tensor {
        context: String,
        source: candle_core::Error,
    },
}

impl PeftError {
    pub fn invalid(message: impl Into<String>) -> Self {
        PeftError::Invalid(message.into())
    }
}

/// Attach a context string to candle errors.
pub(crate) trait TensorContext<T> {
    fn context(self, context: impl FnOnce() -> String) -> Result<T, PeftError>;
}

impl<T> TensorContext<T> for candle_core::Result<T> {
    fn context(self, context: impl FnOnce() -> String) -> Result<T, PeftError> {
        self.map_err(|source| PeftError::Tensor {
            context: context(),
            source,
        })
    }
}

/// Mix a seed with a label into a new seed (blake3; stable across platforms).
pub fn mix_seed(seed: u64, label: &str) -> u64 {
    let mut hasher = blake3::Hasher::new();
    hasher.update(&seed.to_le_bytes());
    hasher.update(label.as_bytes());
    let mut first = [0u8; 8];
    first.copy_from_slice(&hasher.finalize().as_bytes()[..8]);
    u64::from_le_bytes(first)
}

/// A variable as a forward pass uses it: tracked while training, detached in inference (so an
/// inference forward builds no autograd graph).
pub(crate) fn live(var: &Var, training: bool) -> Tensor {
    if training {
        var.as_tensor().clone()
    } else {
        var.as_tensor().detach()
    }
}

/// `count` standard-normal f32 values from `seed` (Box–Muller over a ChaCha stream: the same
/// values on every platform), as torch's `normal_()` / `nn.Embedding` initialise.
pub(crate) fn standard_normal(seed: u64, count: usize) -> Vec<f32> {
    use rand::{Rng, SeedableRng};
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    (0..count)
        .map(|_| {
            let u1: f64 = rng.random::<f64>().max(f64::MIN_POSITIVE);
            let u2: f64 = rng.random::<f64>();
            ((-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos()) as f32
        })
        .collect()
}

/// Train/eval mode shared by the pieces of one prompt-method adapter.
#[derive(Debug)]
pub(crate) struct Training(std::sync::atomic::AtomicBool);

impl Training {
    pub(crate) fn new(training: bool) -> Self {
        Training(std::sync::atomic::AtomicBool::new(training))
    }

    pub(crate) fn get(&self) -> bool {
        self.0.load(std::sync::atomic::Ordering::Acquire)
    }

    pub(crate) fn set(&self, mode: AdapterMode) {
        self.0.store(
            matches!(mode, AdapterMode::Train { .. }),
            std::sync::atomic::Ordering::Release,
        );
    }
}
