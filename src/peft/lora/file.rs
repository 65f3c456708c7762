//! A PEFT LoRA folder read as data, without a model: adapter_config.json (kept as written) and
//! adapter_model.safetensors split into per-module (A, B) pairs in f32, each with its scale
//! (`lora_alpha / r`, or `/ √r` with rsLoRA; PEFT's `rank_pattern` / `alpha_pattern` applied).
//! The one reader of PEFT LoRA configs and weights (through `peft::format`):
//! [`super::LoraAdapter::load`] injects its pairs into a model, and its settings come from
//! [`LoraFile::settings`].
//!
//! DoRA folders (`use_dora: true`) carry one `<module>.lora_magnitude_vector` `[out]` per module.
//! Refuses what it cannot represent (LoRA bias, trained biases, tensors that are not
//! `base_model.model.<module>.lora_{A,B}.weight`); `modules_to_save` and
//! `trainable_token_indices` tensors are `peft::auxiliary`'s (`AdapterFiles` keeps them apart).
//! Never prints.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use serde_json::Value;

use super::LoraSettings;
use crate::peft::format::{AdapterFiles, PEFT_PREFIX};
use crate::peft::targets::TargetModules;
use crate::peft::{PeftError, TensorContext};

/// One adapted module: `base_model.model.<path>.lora_{A,B}.weight`.
#[derive(Debug, Clone)]
pub struct LoraPair {
    /// Module path as Hugging Face names it, e.g. `model.layers.0.self_attn.q_proj`.
    pub path: String,
    /// `[r, in]`, f32.
    pub a: Tensor,
    /// `[out, r]`, f32.
    pub b: Tensor,
    /// alpha / r, or alpha / √r with rsLoRA (rank_pattern / alpha_pattern applied).
    pub scale: f64,
    /// DoRA's magnitude vector `[out]`, f32 (`use_dora: true` folders).
    pub magnitude: Option<Tensor>,
}

/// A PEFT LoRA adapter folder, read and checked.
#[derive(Debug, Clone)]
pub struct LoraFile {
    /// adapter_config.json as written.
    pub config: Value,
    /// Adapted modules, sorted by path.
    pub pairs: Vec<LoraPair>,
    /// PEFT's `fan_in_fan_out` (GPT-2 Conv1D weights).
    pub fan_in_fan_out: bool,
    /// PEFT's `use_dora`: every pair has its magnitude vector.
    pub use_dora: bool,
    /// The weights file, for messages.
    pub weights_path: PathBuf,
    /// The adapter-wide settings (`r`, `lora_alpha`, targets, ...; seed 0).
    settings: LoraSettings,
}

impl LoraFile {
    /// Read `adapter_config.json` and `adapter_model.safetensors` from `dir`, tensors on `device`.
    pub fn read(dir: &Path, device: &Device) -> Result<Self, PeftError> {
        let files = AdapterFiles::read(dir, device)?;
        let config = files.config.clone();
        let config_path = files.config_path.clone();
        let invalid =
            |message: String| PeftError::invalid(format!("{}: {message}", config_path.display()));
        let field = |key: &str| config.get(key).filter(|v| !v.is_null());
        let peft_type = field("peft_type").and_then(Value::as_str).unwrap_or("");
        if peft_type != "LORA" {
            return Err(invalid(format!("peft_type is `{peft_type}`, not LORA")));
        }
        if field("lora_bias").and_then(Value::as_bool) == Some(true) {
            return Err(invalid("`lora_bias: true` is not supported".into()));
        }
        let use_dora = field("use_dora").and_then(Value::as_bool).unwrap_or(false);
        if field("bias")
            .and_then(Value::as_str)
            .is_some_and(|b| b != "none")
        {
            return Err(invalid(
                "`bias` other than \"none\" is not supported".into(),
            ));
        }
        // `modules_to_save` and `trainable_token_indices` are `peft::auxiliary`'s.
        for key in [
            "layers_to_transform",
            "exclude_modules",
            "layer_replication",
        ] {
            if field(key).is_some() {
                return Err(invalid(format!("`{key}` is not supported (must be null)")));
            }
        }
        let number = |key: &str| field(key).and_then(Value::as_f64);
        let rank = number("r").ok_or_else(|| invalid("`r` is missing".into()))?;
        if rank < 1.0 || rank.fract() != 0.0 {
            return Err(invalid(format!(
                "`r` must be a positive integer, got {rank}"
            )));
        }
        let alpha = number("lora_alpha").unwrap_or(8.0);
        let dropout = number("lora_dropout").unwrap_or(0.0) as f32;
        let rslora = field("use_rslora")
            .and_then(Value::as_bool)
            .unwrap_or(false);
        let fan_in_fan_out = field("fan_in_fan_out")
            .and_then(Value::as_bool)
            .unwrap_or(false);
        let targets = field("target_modules")
            .map(TargetModules::from_peft_json)
            .transpose()
            .map_err(&invalid)?;
        let rank_pattern = pattern_map(field("rank_pattern")).map_err(&invalid)?;
        let alpha_pattern = pattern_map(field("alpha_pattern")).map_err(&invalid)?;

        let weights_path = files.weights_path.clone();
        let in_weights =
            |message: String| PeftError::invalid(format!("{}: {message}", weights_path.display()));
        let tensors = files.tensors;
        // Module path → (A, B, DoRA magnitude).
        type Parts = (Option<Tensor>, Option<Tensor>, Option<Tensor>);
        let mut modules: BTreeMap<String, Parts> = BTreeMap::new();
        for (name, tensor) in tensors {
            let module = name.strip_prefix(PEFT_PREFIX).and_then(|rest| {
                [".lora_A.weight", ".lora_B.weight", ".lora_magnitude_vector"]
                    .iter()
                    .enumerate()
                    .find_map(|(kind, suffix)| rest.strip_suffix(suffix).map(|path| (path, kind)))
            });
            let expected = if use_dora {
                " / .lora_magnitude_vector"
            } else {
                ""
            };
            let Some((path, kind)) = module.filter(|(_, kind)| *kind < 2 || use_dora) else {
                return Err(in_weights(format!(
                    "unexpected tensor `{name}` (expected {PEFT_PREFIX}<module>.lora_A.weight / .lora_B.weight{expected})"
                )));
            };
            let tensor = tensor
                .to_dtype(DType::F32)
                .context(|| format!("converting `{name}` to f32"))?;
            let entry = modules.entry(path.to_string()).or_default();
            match kind {
                0 => entry.0 = Some(tensor),
                1 => entry.1 = Some(tensor),
                _ => entry.2 = Some(tensor),
            }
        }
        let mut pairs = Vec::with_capacity(modules.len());
        for (path, (a, b, magnitude)) in modules {
            let (Some(a), Some(b)) = (a, b) else {
                return Err(in_weights(format!(
                    "module `{path}` has only one of lora_A / lora_B"
                )));
            };
            let shapes = || format!("lora_A {:?} and lora_B {:?}", a.dims(), b.dims());
            let (Ok((rank_a, _)), Ok((_, rank_b))) = (a.dims2(), b.dims2()) else {
                return Err(in_weights(format!(
                    "module `{path}` has {}: not matrices",
                    shapes()
                )));
            };
            let module_rank = lookup_pattern(&rank_pattern, &path).unwrap_or(rank);
            if rank_a != rank_b || rank_a as f64 != module_rank {
                return Err(in_weights(format!(
                    "module `{path}` has {}, but the rank is {module_rank}",
                    shapes()
                )));
            }
            let module_alpha = lookup_pattern(&alpha_pattern, &path).unwrap_or(alpha);
            let scale = if rslora {
                module_alpha / module_rank.sqrt()
            } else {
                module_alpha / module_rank
            };
            match &magnitude {
                Some(m) if m.dims() != [b.dim(0).unwrap_or(0)] => {
                    return Err(in_weights(format!(
                        "module `{path}` has lora_magnitude_vector {:?}, expected [{}] (lora_B's rows)",
                        m.dims(),
                        b.dim(0).unwrap_or(0)
                    )));
                }
                None if use_dora => {
                    return Err(in_weights(format!(
                        "module `{path}` has no lora_magnitude_vector, but the config says use_dora: true"
                    )));
                }
                _ => {}
            }
            pairs.push(LoraPair {
                path,
                a,
                b,
                scale,
                magnitude,
            });
        }
        if pairs.is_empty() {
            return Err(in_weights("holds no LoRA weights".into()));
        }
        // Without `target_modules` the adapted modules themselves are the targets.
        let targets = targets.unwrap_or_else(|| {
            TargetModules::Names(pairs.iter().map(|pair| pair.path.clone()).collect())
        });
        let settings = LoraSettings {
            rank: rank as usize,
            alpha,
            dropout,
            targets,
            use_rslora: rslora,
            fan_in_fan_out,
            seed: 0,
        };
        Ok(LoraFile {
            config,
            pairs,
            fan_in_fan_out,
            use_dora,
            weights_path,
            settings,
        })
    }

    /// The adapter-wide settings the config declares (per-module scales are in the pairs).
    pub fn settings(&self) -> &LoraSettings {
        &self.settings
    }

    /// Trainable parameters: Σ r·(in + out).
    pub fn parameter_count(&self) -> u64 {
        self.pairs
            .iter()
            .map(|p| (p.a.elem_count() + p.b.elem_count()) as u64)
            .sum()
    }
}

/// PEFT's `rank_pattern` / `alpha_pattern`: key regex (matched against the module path's tail)
/// → value.
fn pattern_map(value: Option<&Value>) -> Result<Vec<(regex::Regex, f64)>, String> {
    let Some(Value::Object(map)) = value else {
        return Ok(Vec::new());
    };
    map.iter()
        .map(|(key, value)| {
            let regex = regex::Regex::new(&format!(r"^(.*\.)?(?:{key})$"))
                .map_err(|error| format!("pattern `{key}`: {error}"))?;
            let number = value
                .as_f64()
                .ok_or_else(|| format!("pattern `{key}` has no number"))?;
            Ok((regex, number))
        })
        .collect()
}

/// PEFT matches rank/alpha patterns against the module name: the first key that matches wins.
fn lookup_pattern(patterns: &[(regex::Regex, f64)], path: &str) -> Option<f64> {
    patterns
        .iter()
        .find(|(regex, _)| regex.is_match(path))
        .map(|(_, value)| *value)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::peft::format::{ADAPTER_CONFIG, ADAPTER_WEIGHTS};

    #[test]
    fn rank_patterns_match_like_peft() {
        let patterns = pattern_map(Some(
            &serde_json::json!({"q_proj": 16, "layers.1.self_attn.v_proj": 2}),
        ))
        .unwrap();
        assert_eq!(
            lookup_pattern(&patterns, "model.layers.0.self_attn.q_proj"),
            Some(16.0)
        );
        assert_eq!(
            lookup_pattern(&patterns, "model.layers.1.self_attn.v_proj"),
            Some(2.0)
        );
        assert_eq!(
            lookup_pattern(&patterns, "model.layers.0.self_attn.v_proj"),
            None
        );
        assert_eq!(
            lookup_pattern(&patterns, "model.layers.0.self_attn.xq_proj"),
            None
        );
        assert!(pattern_map(Some(&serde_json::json!({"(": 2}))).is_err());
    }

    #[test]
    fn a_folder_reads_into_scaled_pairs_and_bad_files_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let write_config = |config: Value| {
            std::fs::write(dir.path().join(ADAPTER_CONFIG), config.to_string()).unwrap()
        };
        let a = Tensor::ones((2, 5), DType::F32, &Device::Cpu).unwrap();
        let b = Tensor::zeros((3, 2), DType::F32, &Device::Cpu).unwrap();
        let prefix = "base_model.model.layers.0.q_proj";
        let tensors = std::collections::HashMap::from([
            (format!("{prefix}.lora_A.weight"), a.clone()),
            (format!("{prefix}.lora_B.weight"), b.clone()),
        ]);
        candle_core::safetensors::save(&tensors, dir.path().join(ADAPTER_WEIGHTS)).unwrap();
        write_config(
            serde_json::json!({"peft_type": "LORA", "r": 2, "lora_alpha": 8,
            "alpha_pattern": {"q_proj": 4}}),
        );
        let file = LoraFile::read(dir.path(), &Device::Cpu).unwrap();
        assert_eq!(file.pairs.len(), 1);
        assert_eq!(file.pairs[0].path, "layers.0.q_proj");
        assert_eq!(file.pairs[0].scale, 2.0);
        assert_eq!(file.parameter_count(), 16);
        write_config(serde_json::json!({"peft_type": "LORA", "r": 4}));
        let error = LoraFile::read(dir.path(), &Device::Cpu)
            .unwrap_err()
            .to_string();
        assert!(error.contains("but the rank is 4"), "{error}");
        write_config(serde_json::json!({"peft_type": "LORA", "r": 2, "use_dora": true}));
        let error = LoraFile::read(dir.path(), &Device::Cpu)
            .unwrap_err()
            .to_string();
        assert!(error.contains("no lora_magnitude_vector"), "{error}");
        let only_a = std::collections::HashMap::from([(format!("{prefix}.lora_A.weight"), a)]);
        candle_core::safetensors::save(&only_a, dir.path().join(ADAPTER_WEIGHTS)).unwrap();
        write_config(serde_json::json!({"peft_type": "LORA", "r": 2}));
        let error = LoraFile::read(dir.path(), &Device::Cpu)
            .unwrap_err()
            .to_string();
        assert!(error.contains("only one of lora_A / lora_B"), "{error}");
    }
}
