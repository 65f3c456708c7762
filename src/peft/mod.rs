//! PEFT methods behind one [`Adapter`] trait: inject into a model (as a [`LinearFactory`] the
//! model builds its linear layers through), list the trainable variables by their on-disk names,
//! save and load Hugging Face PEFT's adapter format, merge into the frozen weights.
//! One file per method (`lora.rs`, with `lora_file.rs` the one reader of PEFT LoRA folders as
//! data; prompt/prefix tuning, LLaMA-Adapter and QLoRA come later and
//! implement the same trait); `targets.rs` holds PEFT's module-matching rules and parameter counts.
//! This module never reads pipeline configs or training data, and never prints.

pub mod lora;
pub mod lora_file;
pub mod targets;

use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor, Var};

use crate::models::LinearFactory;

pub use lora::{LoraAdapter, LoraSettings};
pub use lora_file::{LoraFile, LoraPair};
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

/// Whether the adapter runs in training mode (dropout active, with the given seed for this
/// micro-batch; trainable variables tracked) or inference mode (no dropout; the variables enter
/// the forward pass detached, so it builds no autograd graph). Randomness is a pure function of
/// the seed so a resumed run draws exactly what an uninterrupted one would. A fresh adapter
/// starts in training mode, a loaded one in inference mode (as PEFT's `from_pretrained`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AdapterMode {
    Train { seed: u64 },
    Eval,
}

/// One PEFT method attached to one model.
pub trait Adapter: Send + Sync {
    /// PEFT's `peft_type` (`LORA`, ...).
    fn peft_type(&self) -> &'static str;
    /// The factory to build the model's linear layers with (the injection point).
    fn linear_factory(&self) -> &dyn LinearFactory;
    /// Called once the model is built: errors when the targets matched nothing, or when loaded
    /// adapter tensors were left unused (PEFT's "missing/unexpected keys").
    fn finish_injection(&self) -> Result<(), PeftError>;
    /// Trainable variables by their PEFT on-disk names, sorted by name.
    fn trainable_vars(&self) -> Vec<(String, Var)>;
    /// Number of trainable scalars.
    fn trainable_parameter_count(&self) -> u64 {
        self.trainable_vars()
            .iter()
            .map(|(_, var)| var.elem_count() as u64)
            .sum()
    }
    /// Switch between training (dropout on) and inference.
    fn set_mode(&self, mode: AdapterMode);
    /// Write the adapter folder in PEFT's format (adapter_config.json + adapter_model.safetensors).
    fn save(&self, dir: &Path, base_model_name_or_path: &str) -> Result<(), PeftError>;
    /// Fold the adapter into the frozen weights (forward then skips the adapter branch).
    fn merge(&self) -> Result<(), PeftError>;
    /// Undo [`Adapter::merge`].
    fn unmerge(&self) -> Result<(), PeftError>;
    /// The merged weight of every adapted linear layer (module path → weight in `[out, in]`
    /// layout, the dtype of the base weight), computed without changing the model.
    fn merged_weights(&self) -> Result<Vec<(String, Tensor)>, PeftError>;
}

/// Load a PEFT adapter folder (any supported `peft_type`) onto `device`. The returned adapter is
/// in "load" mode: build the model through its factory, then call `finish_injection`.
pub fn load_adapter(dir: &Path, device: &Device) -> Result<Box<dyn Adapter>, PeftError> {
    let config = read_adapter_config(dir)?;
    match config.get("peft_type").and_then(serde_json::Value::as_str) {
        Some("LORA") => Ok(Box::new(LoraAdapter::load(dir, device)?)),
        Some(other) => Err(PeftError::invalid(format!(
            "{}: peft_type `{other}` is not supported yet (supported: LORA)",
            dir.join(ADAPTER_CONFIG).display()
        ))),
        None => Err(PeftError::invalid(format!(
            "{}: no `peft_type`",
            dir.join(ADAPTER_CONFIG).display()
        ))),
    }
}

/// PEFT's file names.
pub const ADAPTER_CONFIG: &str = "adapter_config.json";
pub const ADAPTER_WEIGHTS: &str = "adapter_model.safetensors";
/// The prefix PEFT puts before every module path in tensor names.
pub const PEFT_PREFIX: &str = "base_model.model.";

/// Read and parse `adapter_config.json`.
pub fn read_adapter_config(dir: &Path) -> Result<serde_json::Value, PeftError> {
    let path = dir.join(ADAPTER_CONFIG);
    let text = std::fs::read_to_string(&path).map_err(|source| PeftError::Io {
        path: path.clone(),
        source,
    })?;
    serde_json::from_str(&text)
        .map_err(|error| PeftError::invalid(format!("{}: invalid JSON: {error}", path.display())))
}

/// Write `bytes` to `path` atomically (temp file in the same directory, then rename).
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<(), PeftError> {
    let io = |source| PeftError::Io {
        path: path.to_path_buf(),
        source,
    };
    let dir = path.parent().unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir).map_err(io)?;
    let mut temp = tempfile::NamedTempFile::new_in(dir).map_err(io)?;
    std::io::Write::write_all(&mut temp, bytes).map_err(io)?;
    temp.as_file().sync_all().map_err(io)?;
    temp.persist(path).map_err(|error| io(error.error))?;
    Ok(())
}

/// Serialize named tensors to safetensors bytes (moved to CPU first), with PEFT's
/// `{"format": "pt"}` metadata. Output is deterministic (sorted by name).
pub fn safetensors_bytes(tensors: &[(String, Tensor)]) -> Result<Vec<u8>, PeftError> {
    let mut cpu = Vec::with_capacity(tensors.len());
    for (name, tensor) in tensors {
        let host = tensor
            .to_device(&Device::Cpu)
            .and_then(|t| t.contiguous())
            .context(|| format!("copying tensor `{name}` to the host"))?;
        cpu.push((name.clone(), host));
    }
    cpu.sort_by(|a, b| a.0.cmp(&b.0));
    let metadata = std::collections::HashMap::from([("format".to_string(), "pt".to_string())]);
    safetensors::serialize(cpu.iter().map(|(n, t)| (n.as_str(), t)), Some(metadata))
        .map_err(|error| PeftError::invalid(format!("serializing safetensors: {error}")))
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
