//! An inference-only view of a PEFT LoRA folder: a [`LinearFactory`] whose adapted layers compute
//! `x·Wᵀ + b + s·(x·Aᵀ)·Bᵀ` with A and B as plain tensors (never `Var`s), so evaluation and
//! generation build no autograd graph. Training uses `crate::peft`; this reads the same files.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Mutex;

use candle_core::{DType, Device, Tensor};
use serde_json::Value;

use crate::models::{FrozenLinear, LinearFactory, LinearLayer, LinearWeights};

const PREFIX: &str = "base_model.model.";

/// LoRA weights by module path, consumed as the model's layers are built.
pub struct InferenceLora {
    pending: Mutex<BTreeMap<String, (Tensor, Tensor)>>,
    scale: f64,
}

impl InferenceLora {
    /// Read `adapter_config.json` and `adapter_model.safetensors` (A and B kept in f32).
    pub fn load(dir: &Path, device: &Device) -> Result<Self, String> {
        let config_path = dir.join("adapter_config.json");
        let text = std::fs::read_to_string(&config_path)
            .map_err(|e| format!("cannot read {}: {e}", config_path.display()))?;
        let config: Value = serde_json::from_str(&text)
            .map_err(|e| format!("{}: invalid JSON: {e}", config_path.display()))?;
        let field = |key: &str| config.get(key).filter(|v| !v.is_null());
        let peft_type = field("peft_type").and_then(Value::as_str).unwrap_or("");
        if peft_type != "LORA" {
            return Err(format!(
                "{}: peft_type `{peft_type}` is not supported for inference (supported: LORA)",
                config_path.display()
            ));
        }
        for key in ["use_dora", "lora_bias"] {
            if field(key).and_then(Value::as_bool) == Some(true) {
                return Err(format!(
                    "{}: `{key}` is not supported",
                    config_path.display()
                ));
            }
        }
        for key in ["rank_pattern", "alpha_pattern"] {
            if field(key)
                .and_then(Value::as_object)
                .is_some_and(|m| !m.is_empty())
            {
                return Err(format!(
                    "{}: a non-empty `{key}` is not supported",
                    config_path.display()
                ));
            }
        }
        let rank = field("r")
            .and_then(Value::as_f64)
            .ok_or_else(|| format!("{}: `r` is missing", config_path.display()))?;
        let alpha = field("lora_alpha").and_then(Value::as_f64).unwrap_or(8.0);
        let scale = if field("use_rslora").and_then(Value::as_bool) == Some(true) {
            alpha / rank.sqrt()
        } else {
            alpha / rank
        };
        let weights_path = dir.join("adapter_model.safetensors");
        let tensors = candle_core::safetensors::load(&weights_path, device)
            .map_err(|e| format!("cannot read {}: {e}", weights_path.display()))?;
        let mut halves: BTreeMap<String, (Option<Tensor>, Option<Tensor>)> = BTreeMap::new();
        for (name, tensor) in tensors {
            let tensor = tensor.to_dtype(DType::F32).map_err(|e| e.to_string())?;
            let rest = name.strip_prefix(PREFIX);
            if let Some(path) = rest.and_then(|r| r.strip_suffix(".lora_A.weight")) {
                halves.entry(path.to_string()).or_default().0 = Some(tensor);
            } else if let Some(path) = rest.and_then(|r| r.strip_suffix(".lora_B.weight")) {
                halves.entry(path.to_string()).or_default().1 = Some(tensor);
            } else {
                return Err(format!(
                    "{}: unexpected tensor `{name}` (expected {PREFIX}<module>.lora_A/B.weight)",
                    weights_path.display()
                ));
            }
        }
        let mut pending = BTreeMap::new();
        for (path, pair) in halves {
            match pair {
                (Some(a), Some(b)) => {
                    pending.insert(path, (a, b));
                }
                _ => {
                    return Err(format!(
                        "{}: `{path}` has only one of lora_A / lora_B",
                        weights_path.display()
                    ))
                }
            }
        }
        Ok(InferenceLora {
            pending: Mutex::new(pending),
            scale,
        })
    }

    /// Error when adapter weights were left unused (PEFT's "unexpected keys").
    pub fn finish(&self) -> Result<(), String> {
        let pending = self
            .pending
            .lock()
            .map_err(|_| "LoRA weights lock poisoned")?;
        match pending.keys().next() {
            None => Ok(()),
            Some(path) => Err(format!(
                "adapter weights for `{path}` (and {} more) match no linear layer of the model",
                pending.len() - 1
            )),
        }
    }
}

struct InferenceLoraLayer {
    base: FrozenLinear,
    a: Tensor,
    b: Tensor,
    scale: f64,
}

impl LinearLayer for InferenceLoraLayer {
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let y = self.base.forward(x)?;
        let a = self.a.to_dtype(x.dtype())?;
        let b = self.b.to_dtype(x.dtype())?;
        let delta = (x.broadcast_matmul(&a.t()?)? * self.scale)?.broadcast_matmul(&b.t()?)?;
        y + delta
    }
}

impl LinearFactory for InferenceLora {
    fn build(&self, path: &str, base: LinearWeights) -> candle_core::Result<Box<dyn LinearLayer>> {
        let pair = self
            .pending
            .lock()
            .map_err(|_| candle_core::Error::Msg("LoRA weights lock poisoned".into()))?
            .remove(path);
        let Some((a, b)) = pair else {
            return Ok(Box::new(FrozenLinear::new(base)));
        };
        let (out_features, in_features) = base.dims()?;
        if a.dim(1)? != in_features || b.dim(0)? != out_features || a.dim(0)? != b.dim(1)? {
            candle_core::bail!(
                "LoRA `{path}`: lora_A {:?} and lora_B {:?} do not fit a [{out_features}, {in_features}] layer",
                a.dims(),
                b.dims()
            )
        }
        let device = base.weight.device().clone();
        Ok(Box::new(InferenceLoraLayer {
            base: FrozenLinear::new(base),
            a: a.to_device(&device)?,
            b: b.to_device(&device)?,
            scale: self.scale,
        }))
    }
}
