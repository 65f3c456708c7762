//! LLaMA-Adapter (Zhang et al. 2023) as Hugging Face PEFT's `adaption_prompt`: in each of the top
//! `adapter_layers` layers, an adaption prompt `[1, adapter_len, hidden]` projected by the
//! layer's own k/v projections (no RoPE), attended to by the layer's queries with a separate
//! softmax and added to the attention output scaled by a gate. The gate starts at zero, so the
//! adapted model equals the base model at step 0. PEFT's gate is one scalar per layer, applied
//! as is; `per_head_gate` gives one per attention head (the paper's form; PEFT cannot load it).
//! Acts through the model's `Hooks::adapters`. Init as PEFT's: prompt standard normal, gate 0.
//! On disk: `base_model.model.model.layers.<i>.self_attn.adaption_prompt` `[1, len, hidden]`
//! and `.adaption_gate` `[1]` (or `[heads]`), config `adapter_len`, `adapter_layers`,
//! `target_modules: self_attn`. Llama-family models only. Never prints.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::OnceLock;

use candle_core::{DType, Device, Tensor, Var};
use serde_json::{json, Value};

use super::format::{write_adapter_folder, AdapterFiles, PEFT_PREFIX};
use super::{
    live, mix_seed, standard_normal, Adapter, AdapterMode, PeftError, TensorContext, Training,
};
use crate::models::{AdapterPrompt, Architecture, CausalLm, Hooks};

/// LLaMA-Adapter hyperparameters.
#[derive(Debug, Clone)]
pub struct LlamaAdapterSettings {
    pub adapter_len: usize,
    pub adapter_layers: usize,
    pub per_head_gate: bool,
    pub seed: u64,
}

enum Source {
    Init(LlamaAdapterSettings),
    /// Layer index → (prompt `[1, len, hidden]`, gate) as read.
    Loaded {
        layers: BTreeMap<usize, (Tensor, Tensor)>,
        files: String,
    },
}

/// One adapted layer's variables.
struct LayerVars {
    layer: usize,
    prompt: Var,
    gate: Var,
}

/// A LLaMA-Adapter.
pub struct LlamaAdapter {
    source: Source,
    device: Device,
    training: Training,
    layers: OnceLock<Vec<LayerVars>>,
}

fn tensor_name(layer: usize, what: &str) -> String {
    format!("{PEFT_PREFIX}model.layers.{layer}.self_attn.{what}")
}

impl LlamaAdapter {
    pub fn new(settings: LlamaAdapterSettings, device: &Device) -> Result<Self, PeftError> {
        if settings.adapter_len == 0 || settings.adapter_layers == 0 {
            return Err(PeftError::invalid(
                "LLaMA-Adapter needs adapter_len and adapter_layers of at least 1",
            ));
        }
        Ok(LlamaAdapter {
            source: Source::Init(settings),
            device: device.clone(),
            training: Training::new(true),
            layers: OnceLock::new(),
        })
    }

    /// Load PEFT's ADAPTION_PROMPT folder (inference mode).
    pub fn load(dir: &Path, device: &Device) -> Result<Self, PeftError> {
        let files = AdapterFiles::read(dir, device)?;
        let declared = |key: &str| files.config.get(key).and_then(Value::as_u64);
        if let Some(target) = files.config.get("target_modules").and_then(Value::as_str) {
            if target != "self_attn" {
                return Err(files.config_error(format!(
                    "target_modules `{target}` is not supported (only self_attn)"
                )));
            }
        }
        let mut parts: BTreeMap<usize, (Option<Tensor>, Option<Tensor>)> = BTreeMap::new();
        for (name, tensor) in &files.tensors {
            let parsed = name
                .strip_prefix(&format!("{PEFT_PREFIX}model.layers."))
                .and_then(|rest| rest.split_once(".self_attn."))
                .and_then(|(layer, what)| Some((layer.parse::<usize>().ok()?, what)));
            let tensor = tensor
                .to_dtype(DType::F32)
                .context(|| format!("converting `{name}`"))?;
            match parsed {
                Some((layer, "adaption_prompt")) => parts.entry(layer).or_default().0 = Some(tensor),
                Some((layer, "adaption_gate")) => parts.entry(layer).or_default().1 = Some(tensor),
                _ => {
                    return Err(files.weights_error(format!(
                        "unexpected tensor `{name}` (expected {PEFT_PREFIX}model.layers.<i>.self_attn.adaption_prompt / adaption_gate)"
                    )))
                }
            }
        }
        let mut layers = BTreeMap::new();
        for (layer, (prompt, gate)) in parts {
            let (Some(prompt), Some(gate)) = (prompt, gate) else {
                return Err(files.weights_error(format!(
                    "layer {layer} has only one of adaption_prompt / adaption_gate"
                )));
            };
            let length = prompt.dims().get(1).copied().unwrap_or(0);
            if prompt.rank() != 3
                || prompt.dim(0).ok() != Some(1)
                || declared("adapter_len").is_some_and(|len| len as usize != length)
            {
                return Err(files.weights_error(format!(
                    "layer {layer}: adaption_prompt is {:?}; expected [1, adapter_len, hidden]",
                    prompt.dims()
                )));
            }
            layers.insert(layer, (prompt, gate));
        }
        if layers.is_empty() {
            return Err(files.weights_error("holds no adaption prompts"));
        }
        if declared("adapter_layers").is_some_and(|n| n as usize != layers.len()) {
            return Err(files.config_error(format!(
                "adapter_layers does not match the {} layers in the weights",
                layers.len()
            )));
        }
        Ok(LlamaAdapter {
            source: Source::Loaded {
                layers,
                files: files.weights_path.display().to_string(),
            },
            device: device.clone(),
            training: Training::new(false),
            layers: OnceLock::new(),
        })
    }

    fn vars(&self) -> Result<&Vec<LayerVars>, PeftError> {
        self.layers
            .get()
            .ok_or_else(|| PeftError::invalid("LLaMA-Adapter used before finish_injection"))
    }
}

impl Adapter for LlamaAdapter {
    fn peft_type(&self) -> &'static str {
        "ADAPTION_PROMPT"
    }

    fn finish_injection(&self, model: &dyn CausalLm) -> Result<(), PeftError> {
        let config = model.config();
        if config.architecture() != Architecture::Llama {
            return Err(PeftError::invalid(format!(
                "LLaMA-Adapter needs a Llama-family model, not `{}`",
                config.model_type()
            )));
        }
        let (count, hidden, heads) = (
            config.num_layers(),
            config.hidden_size(),
            config.num_attention_heads(),
        );
        let var = |tensor: Tensor| {
            tensor
                .to_device(&self.device)
                .and_then(|t| Var::from_tensor(&t))
                .context(|| "placing the adaption prompt".into())
        };
        let mut vars = Vec::new();
        match &self.source {
            Source::Init(settings) => {
                if settings.adapter_layers > count {
                    return Err(PeftError::invalid(format!(
                        "adapter_layers {} exceeds the model's {count} layers",
                        settings.adapter_layers
                    )));
                }
                let gate_width = if settings.per_head_gate { heads } else { 1 };
                for layer in count - settings.adapter_layers..count {
                    let values = standard_normal(
                        mix_seed(settings.seed, &format!("adaption prompt {layer}")),
                        settings.adapter_len * hidden,
                    );
                    let prompt =
                        Tensor::from_vec(values, (1, settings.adapter_len, hidden), &Device::Cpu)
                            .context(|| "initialising the adaption prompt".into())?;
                    let gate = Tensor::zeros(gate_width, DType::F32, &Device::Cpu)
                        .context(|| "initialising the gate".into())?;
                    vars.push(LayerVars {
                        layer,
                        prompt: var(prompt)?,
                        gate: var(gate)?,
                    });
                }
            }
            Source::Loaded { layers, files } => {
                for (&layer, (prompt, gate)) in layers {
                    if layer >= count {
                        return Err(PeftError::invalid(format!(
                            "{files}: an adaption prompt for layer {layer}; the model has {count} layers"
                        )));
                    }
                    if prompt.dim(2).ok() != Some(hidden) {
                        return Err(PeftError::invalid(format!(
                            "{files}: layer {layer}'s adaption_prompt is {:?}; the model's hidden size is {hidden}",
                            prompt.dims()
                        )));
                    }
                    if gate.elem_count() != 1 && gate.elem_count() != heads {
                        return Err(PeftError::invalid(format!(
                            "{files}: layer {layer}'s adaption_gate has {} values; expected 1 or {heads} (one per head)",
                            gate.elem_count()
                        )));
                    }
                    let gate = gate.flatten_all().context(|| "adaption_gate".into())?;
                    vars.push(LayerVars {
                        layer,
                        prompt: var(prompt.clone())?,
                        gate: var(gate)?,
                    });
                }
            }
        }
        self.layers
            .set(vars)
            .map_err(|_| PeftError::invalid("LLaMA-Adapter injected twice"))
    }

    fn hooks(&self) -> Result<Hooks, PeftError> {
        let training = self.training.get();
        let mut hooks = Hooks::default();
        for vars in self.vars()? {
            let prompt = live(&vars.prompt, training)
                .squeeze(0)
                .context(|| "adaption_prompt".into())?;
            hooks.adapters.insert(
                vars.layer,
                AdapterPrompt {
                    prompt,
                    gate: live(&vars.gate, training),
                },
            );
        }
        Ok(hooks)
    }

    fn trainable_vars(&self) -> Vec<(String, Var)> {
        let mut out = Vec::new();
        for vars in self.layers.get().into_iter().flatten() {
            out.push((tensor_name(vars.layer, "adaption_gate"), vars.gate.clone()));
            out.push((
                tensor_name(vars.layer, "adaption_prompt"),
                vars.prompt.clone(),
            ));
        }
        out.sort_by(|a, b| a.0.cmp(&b.0));
        out
    }

    fn set_mode(&self, mode: AdapterMode) {
        self.training.set(mode);
    }

    fn save(&self, dir: &Path, base_model_name_or_path: &str) -> Result<(), PeftError> {
        let vars = self.vars()?;
        let adapter_len = vars
            .first()
            .and_then(|v| v.prompt.dims().get(1).copied())
            .unwrap_or(0);
        let config = json!({
            "adapter_layers": vars.len(),
            "adapter_len": adapter_len,
            "auto_mapping": null,
            "base_model_name_or_path": base_model_name_or_path,
            "inference_mode": true,
            "peft_type": "ADAPTION_PROMPT",
            "revision": null,
            "target_modules": "self_attn",
            "task_type": "CAUSAL_LM",
        });
        let tensors: Vec<(String, Tensor)> = self
            .trainable_vars()
            .into_iter()
            .map(|(name, var)| (name, var.as_tensor().clone()))
            .collect();
        write_adapter_folder(dir, &config, &tensors)
    }
}
