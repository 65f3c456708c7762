//! Hugging Face PEFT's on-disk adapter format, read and written in one place: a folder with
//! `adapter_config.json` (the method's settings, `peft_type` names the method) and
//! `adapter_model.safetensors` (the adapter tensors by PEFT's names, `{"format": "pt"}` metadata).
//! Every method reads its folder through [`AdapterFiles::read`] and writes it through
//! [`write_adapter_folder`]; what the config keys mean is each method's business (its `config`
//! module). Writes are atomic (temp file + rename). Never prints.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor};
use serde_json::Value;

use super::{PeftError, TensorContext};

/// PEFT's file names.
pub const ADAPTER_CONFIG: &str = "adapter_config.json";
pub const ADAPTER_WEIGHTS: &str = "adapter_model.safetensors";
/// The prefix PEFT puts before every module path in tensor names.
pub const PEFT_PREFIX: &str = "base_model.model.";

/// The tensor name PEFT saves for prompt-learning methods (prompt and prefix tuning).
pub const PROMPT_EMBEDDINGS: &str = "prompt_embeddings";

/// An adapter folder as written: the config JSON and the tensors, with their paths for messages.
#[derive(Debug, Clone)]
pub struct AdapterFiles {
    pub config: Value,
    pub config_path: PathBuf,
    pub tensors: HashMap<String, Tensor>,
    /// The tensors of PEFT's auxiliary modules (`trainable_token_indices`, `modules_to_save`;
    /// see `peft::auxiliary`), kept apart so a method's reader sees only its own.
    pub auxiliary: HashMap<String, Tensor>,
    pub weights_path: PathBuf,
}

impl AdapterFiles {
    /// Read both files of `dir`, tensors on `device` in their stored dtype.
    pub fn read(dir: &Path, device: &Device) -> Result<Self, PeftError> {
        let config = read_adapter_config(dir)?;
        let weights_path = dir.join(ADAPTER_WEIGHTS);
        let mut tensors = candle_core::safetensors::load(&weights_path, device)
            .context(|| format!("reading {}", weights_path.display()))?;
        let config_path = dir.join(ADAPTER_CONFIG);
        let spec = super::auxiliary::AuxiliarySpec::from_peft_config(&config, &config_path)?;
        let auxiliary_names: Vec<String> = tensors
            .keys()
            .filter(|name| spec.owns_tensor(name))
            .cloned()
            .collect();
        let auxiliary = auxiliary_names
            .into_iter()
            .filter_map(|name| tensors.remove_entry(&name))
            .collect();
        Ok(AdapterFiles {
            config,
            config_path,
            tensors,
            auxiliary,
            weights_path,
        })
    }

    /// `peft_type` of the config.
    pub fn peft_type(&self) -> Option<&str> {
        peft_type(&self.config)
    }

    /// An error about the config file.
    pub fn config_error(&self, message: impl std::fmt::Display) -> PeftError {
        PeftError::invalid(format!("{}: {message}", self.config_path.display()))
    }

    /// An error about the weights file.
    pub fn weights_error(&self, message: impl std::fmt::Display) -> PeftError {
        PeftError::invalid(format!("{}: {message}", self.weights_path.display()))
    }

    /// Take one tensor by name, or say which file lacks it.
    pub fn take(&mut self, name: &str) -> Result<Tensor, PeftError> {
        self.tensors
            .remove(name)
            .ok_or_else(|| self.weights_error(format!("no tensor `{name}`")))
    }

    /// The one tensor of a prompt-learning folder (prompt and prefix tuning), `[rows, width]` in
    /// f32; any other tensor is an error.
    pub fn take_prompt_embeddings(&mut self) -> Result<(Tensor, usize, usize), PeftError> {
        let table = self
            .take(PROMPT_EMBEDDINGS)?
            .to_dtype(candle_core::DType::F32)
            .context(|| format!("{}: {PROMPT_EMBEDDINGS}", self.weights_path.display()))?;
        self.expect_all_used()?;
        let (rows, width) = table
            .dims2()
            .map_err(|_| self.weights_error(format!("{PROMPT_EMBEDDINGS} is not a matrix")))?;
        Ok((table, rows, width))
    }

    /// Error when tensors were left unused (PEFT's "unexpected keys").
    pub fn expect_all_used(&self) -> Result<(), PeftError> {
        let mut left: Vec<&String> = self.tensors.keys().collect();
        left.sort();
        match left.first() {
            None => Ok(()),
            Some(first) => Err(self.weights_error(format!(
                "unexpected tensor `{first}` ({} left unused)",
                left.len()
            ))),
        }
    }

    /// Trainable scalars stored.
    pub fn parameter_count(&self) -> u64 {
        self.tensors
            .values()
            .chain(self.auxiliary.values())
            .map(|t| t.elem_count() as u64)
            .sum()
    }
}

/// `peft_type` of a parsed config.
pub fn peft_type(config: &Value) -> Option<&str> {
    config.get("peft_type").and_then(Value::as_str)
}

/// Positions of the model's context an adapter's virtual tokens take before the text (prompt
/// and prefix tuning's `num_virtual_tokens`; 0 for every other method).
pub fn virtual_positions(config: &Value) -> usize {
    match peft_type(config) {
        Some("PROMPT_TUNING" | "PREFIX_TUNING" | "P_TUNING") => config
            .get("num_virtual_tokens")
            .and_then(Value::as_u64)
            .and_then(|n| usize::try_from(n).ok())
            .unwrap_or(0),
        _ => 0,
    }
}

/// Read and parse `adapter_config.json`.
pub fn read_adapter_config(dir: &Path) -> Result<Value, PeftError> {
    let path = dir.join(ADAPTER_CONFIG);
    let text = std::fs::read_to_string(&path).map_err(|source| PeftError::Io {
        path: path.clone(),
        source,
    })?;
    serde_json::from_str(&text)
        .map_err(|error| PeftError::invalid(format!("{}: invalid JSON: {error}", path.display())))
}

/// Write an adapter folder: `adapter_model.safetensors` then `adapter_config.json` (pretty JSON
/// with a trailing newline), each atomically.
pub fn write_adapter_folder(
    dir: &Path,
    config: &Value,
    tensors: &[(String, Tensor)],
) -> Result<(), PeftError> {
    let bytes = safetensors_bytes(tensors)?;
    let mut text = serde_json::to_string_pretty(config)
        .map_err(|error| PeftError::invalid(format!("serializing adapter config: {error}")))?;
    text.push('\n');
    write_atomic(&dir.join(ADAPTER_WEIGHTS), &bytes)?;
    write_atomic(&dir.join(ADAPTER_CONFIG), text.as_bytes())
}

/// Write `bytes` to `path` atomically (the cache's writer: temp file in the same directory,
/// synced, then renamed), creating the directory first.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<(), PeftError> {
    let io = |source| PeftError::Io {
        path: path.to_path_buf(),
        source,
    };
    let dir = path.parent().unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir).map_err(io)?;
    crate::cache::write_atomic(path, bytes, dir).map_err(|error| match error {
        crate::cache::CacheError::Io { source, .. } => io(source),
        other => PeftError::invalid(other.to_string()),
    })
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

/// Integers as JSON integers (PEFT writes `lora_alpha: 8`), others as floats.
pub fn json_number(value: f64) -> Value {
    if value.fract() == 0.0 && value.abs() < 1e15 {
        serde_json::json!(value as i64)
    } else {
        serde_json::json!(value)
    }
}
