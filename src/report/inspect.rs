//! Rendering of `peftpipe inspect`: a model summary and, when asked, what a LoRA target spec
//! matches. Must not: compute anything (the numbers come from models::summary and peft).
#![cfg_attr(not(test), deny(clippy::unwrap_used, clippy::arithmetic_side_effects))]

use serde::Serialize;

use crate::models::summary::{LinearGroup, ModelSummary};
use crate::train::memory::MemoryEstimate;

/// Matched linear layers of one name and the LoRA parameters they get.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct LoraGroup {
    #[serde(flatten)]
    pub layers: LinearGroup,
    /// r·(in + out)·count.
    pub trainable_parameters: u64,
}

/// What a LoRA target spec selects on the model, for `--target`.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct LoraTargets {
    /// The spec as resolved (`[q_proj, v_proj]`, `all-linear`, regex `...`).
    pub target: String,
    pub rank: usize,
    /// Matched linear layers grouped by name, in model order.
    pub matched: Vec<LoraGroup>,
    pub matched_modules: usize,
    /// PEFT's count: Σ r·(in + out) over the matched modules.
    pub trainable_parameters: u64,
    /// What PEFT would write as `target_modules` in adapter_config.json.
    pub adapter_config_target_modules: serde_json::Value,
}

/// One `--method`: PEFT's trainable-parameter count and, with `--batch`/`--sequence`, the
/// training-memory estimate.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct MethodCount {
    /// The method as written (`--method` value).
    pub written: String,
    /// The method's YAML name (`prompt_tuning`, ...).
    pub method: String,
    /// Its hyperparameters as resolved (`200 virtual tokens`, ...).
    pub settings: String,
    pub trainable_parameters: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub memory: Option<MemoryEstimate>,
}

/// The whole `inspect` output (also its `--json` form).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct InspectReport {
    pub model: ModelSummary,
    /// One entry per `--target` (empty without `--target` / `--rank`).
    pub lora: Vec<LoraTargets>,
    /// One entry per `--method`.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub methods: Vec<MethodCount>,
}

/// Bytes → `12.34 GiB` (or MiB below 1 GiB).
fn gibibytes(bytes: f64) -> String {
    const MIB: f64 = 1024.0 * 1024.0;
    if bytes >= 1024.0 * MIB {
        format!("{:.2} GiB", bytes / (1024.0 * MIB))
    } else {
        format!("{:.1} MiB", bytes / MIB)
    }
}

/// `1234567` → `1,234,567`.
fn thousands(value: u64) -> String {
    let digits = value.to_string();
    let mut out = String::with_capacity(digits.len().saturating_mul(2));
    for (index, digit) in digits.chars().enumerate() {
        let remaining = digits.len().saturating_sub(index);
        if index > 0 && remaining.checked_rem(3) == Some(0) {
            out.push(',');
        }
        out.push(digit);
    }
    out
}

/// The human-readable report.
pub fn render(report: &InspectReport) -> String {
    use std::fmt::Write as _;
    let m = &report.model;
    let mut out = String::new();
    let names = if m.architectures.is_empty() {
        String::new()
    } else {
        format!(", {}", m.architectures.join(", "))
    };
    let _ = writeln!(out, "model       {} ({}{names})", m.path, m.model_type);
    let stored = match m.stored_parameters {
        Some(stored) => format!(
            " · stored {} in {} file(s)",
            thousands(stored),
            m.weight_files
        ),
        None => " · no weights (config only)".to_string(),
    };
    let _ = writeln!(out, "parameters  {}{stored}", thousands(m.parameters));
    for problem in &m.weight_problems {
        let _ = writeln!(
            out,
            "warning     config.json and the weights disagree (the model will not load): {problem}"
        );
    }
    let _ = writeln!(
        out,
        "dtype       {}",
        m.dtype.as_deref().unwrap_or("unknown")
    );
    let _ = writeln!(
        out,
        "shape       {} layers · hidden {} · heads {} (kv {}, head dim {}) · MLP {} · vocab {} · max positions {}",
        m.layers,
        m.hidden_size,
        m.attention_heads,
        m.key_value_heads,
        m.head_dim,
        m.intermediate_size,
        m.vocab_size,
        m.max_positions
    );
    if let Some(rope) = &m.rope {
        let _ = writeln!(out, "rope        {rope}");
    }
    let _ = writeln!(
        out,
        "embeddings  {}",
        if m.tie_word_embeddings {
            "tied to lm_head"
        } else {
            "separate lm_head"
        }
    );
    if let Some(t) = &m.tokenizer {
        let bos = match (&t.bos_token, t.bos_token_id) {
            (Some(token), Some(id)) => format!("{token} ({id})"),
            (_, Some(id)) => id.to_string(),
            _ => "none".to_string(),
        };
        let pad = t
            .pad_token_id
            .map_or("none".to_string(), |id| id.to_string());
        let _ = writeln!(
            out,
            "tokenizer   vocab {} · bos {bos}{} · eos {:?} · pad {pad} · chat template {}",
            t.vocab_size,
            if t.add_bos_token { " (added)" } else { "" },
            t.eos_token_ids,
            if t.has_chat_template { "yes" } else { "no" }
        );
    }
    let _ = writeln!(out, "linear layers (LinearFactory paths):");
    for group in &m.linear_layers {
        let _ = writeln!(
            out,
            "  {:<14} {:>6} → {:<7} ×{}{}{}",
            group.name,
            group.in_features,
            group.out_features,
            group.count,
            if group.bias { " · bias" } else { "" },
            if group.tied_to_embeddings {
                " · tied"
            } else {
                ""
            }
        );
    }
    for lora in &report.lora {
        let share = 100.0 * lora.trainable_parameters as f64 / m.parameters.max(1) as f64;
        let _ = writeln!(
            out,
            "LoRA        target {} · rank {}",
            lora.target, lora.rank
        );
        for group in &lora.matched {
            let _ = writeln!(
                out,
                "  {:<14} {:>6} → {:<7} ×{:<4} {:>14}",
                group.layers.name,
                group.layers.in_features,
                group.layers.out_features,
                group.layers.count,
                thousands(group.trainable_parameters)
            );
        }
        let _ = writeln!(
            out,
            "  {} modules · {} trainable parameters ({share:.4} % of the model) · adapter_config target_modules {}",
            lora.matched_modules,
            thousands(lora.trainable_parameters),
            lora.adapter_config_target_modules
        );
    }
    for method in &report.methods {
        let share = 100.0 * method.trainable_parameters as f64 / m.parameters.max(1) as f64;
        let _ = writeln!(
            out,
            "method      {} ({}) · {} trainable parameters ({share:.4} % of the model)",
            method.method,
            method.settings,
            thousands(method.trainable_parameters)
        );
        if let Some(memory) = &method.memory {
            let _ = writeln!(
                out,
                "  memory estimate on {}, batch {} × sequence {} ({} bytes/element): weights {} · adapter {} · gradients {} · optimizer {}",
                match memory.device {
                    crate::train::memory::MemoryDevice::Cuda => "CUDA",
                    crate::train::memory::MemoryDevice::Cpu => "CPU",
                },
                memory.batch,
                memory.sequence,
                memory.weight_bytes_per_element,
                gibibytes(memory.weights),
                gibibytes(memory.adapter),
                gibibytes(memory.gradients),
                gibibytes(memory.optimizer)
            );
            let _ = writeln!(
                out,
                "  activations {} → total {} · with activation checkpointing: activations {} → total {}",
                gibibytes(memory.activations),
                gibibytes(memory.total),
                gibibytes(memory.activations_checkpointed),
                gibibytes(memory.total_checkpointed)
            );
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::thousands;

    #[test]
    fn groups_digits_by_thousands() {
        assert_eq!(thousands(0), "0");
        assert_eq!(thousands(999), "999");
        assert_eq!(thousands(1000), "1,000");
        assert_eq!(thousands(1_235_814_400), "1,235,814,400");
    }
}
