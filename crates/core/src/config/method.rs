//! The PEFT methods a pipeline can choose (`method: { lora: {...} }`, externally tagged), as pure
//! data with PEFT's names and defaults, and their checks: [`MethodConfig::check`] on the values
//! alone, [`MethodConfig::check_against_model`] against the linear layers a model's config.json
//! describes. Adding a method: its config struct, one variant, its checks here. Never loads
//! weights or knows tensors.

use std::collections::BTreeMap;

use schemars::{json_schema, JsonSchema, Schema, SchemaGenerator};
use serde::de::{self, MapAccess, SeqAccess, Visitor};
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use std::borrow::Cow;

use super::probe::LinearLayerShape;
use super::target_modules::TargetModules;
use super::Problem;

/// A PEFT method.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum MethodConfig {
    /// LoRA (Hu et al. 2021) with Hugging Face PEFT's semantics.
    Lora(LoraConfig),
}

impl Default for MethodConfig {
    fn default() -> Self {
        MethodConfig::Lora(LoraConfig::default())
    }
}

/// LoRA hyperparameters (PEFT's names and defaults).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct LoraConfig {
    /// Rank of the update B·A.
    #[serde(default = "default_rank")]
    pub r: usize,
    /// Scaling numerator: the update is scaled by alpha/r (alpha/√r with rsLoRA).
    #[serde(default = "default_alpha")]
    pub alpha: f64,
    /// Dropout on the adapter's input during training.
    #[serde(default)]
    pub dropout: f64,
    /// Which linear layers to adapt: a list of names (`[q_proj, v_proj]`, matching a module
    /// path or its suffix), `all-linear`, or `{regex: "..."}` (must match the whole path).
    /// Default: PEFT's default for the architecture (q_proj, v_proj for Llama; c_attn for GPT-2).
    #[serde(default)]
    pub target_modules: Option<TargetModulesConfig>,
    /// Rank-stabilised LoRA: scale by alpha/√r.
    #[serde(default)]
    pub use_rslora: bool,
}

fn default_rank() -> usize {
    8
}
fn default_alpha() -> f64 {
    8.0
}

impl Default for LoraConfig {
    fn default() -> Self {
        LoraConfig {
            r: default_rank(),
            alpha: default_alpha(),
            dropout: 0.0,
            target_modules: None,
            use_rslora: false,
        }
    }
}

/// `target_modules` as written: a list of names, `all-linear`, or `{regex: ...}`.
#[derive(Debug, Clone, PartialEq)]
pub enum TargetModulesConfig {
    Names(Vec<String>),
    AllLinear,
    Regex(String),
}

impl Serialize for TargetModulesConfig {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        match self {
            TargetModulesConfig::Names(names) => names.serialize(serializer),
            TargetModulesConfig::AllLinear => serializer.serialize_str("all-linear"),
            TargetModulesConfig::Regex(pattern) => {
                BTreeMap::from([("regex", pattern)]).serialize(serializer)
            }
        }
    }
}

impl<'de> Deserialize<'de> for TargetModulesConfig {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct TargetVisitor;
        impl<'de> Visitor<'de> for TargetVisitor {
            type Value = TargetModulesConfig;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("a list of module names, `all-linear`, or `{regex: \"...\"}`")
            }
            fn visit_str<E: de::Error>(self, value: &str) -> Result<Self::Value, E> {
                if value == "all-linear" {
                    Ok(TargetModulesConfig::AllLinear)
                } else {
                    Err(E::custom(format!(
                        "`{value}`: write a list (`[{value}]`), `all-linear`, or `{{regex: \"{value}\"}}`"
                    )))
                }
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
                let mut names = Vec::new();
                while let Some(name) = seq.next_element::<String>()? {
                    names.push(name);
                }
                Ok(TargetModulesConfig::Names(names))
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
                let mut pattern = None;
                while let Some(key) = map.next_key::<String>()? {
                    if key != "regex" || pattern.is_some() {
                        return Err(de::Error::custom(format!(
                            "unknown key `{key}` in target_modules (expected `regex`)"
                        )));
                    }
                    pattern = Some(map.next_value::<String>()?);
                }
                pattern
                    .map(TargetModulesConfig::Regex)
                    .ok_or_else(|| de::Error::custom("target_modules mapping needs `regex`"))
            }
        }
        deserializer.deserialize_any(TargetVisitor)
    }
}

impl JsonSchema for TargetModulesConfig {
    fn schema_name() -> Cow<'static, str> {
        "TargetModules".into()
    }

    fn json_schema(_generator: &mut SchemaGenerator) -> Schema {
        json_schema!({
            "description": "Linear layers to adapt: module names or path suffixes, `all-linear` (every linear layer but lm_head), or a regex matching the whole module path.",
            "oneOf": [
                {"type": "array", "items": {"type": "string"}},
                {"const": "all-linear"},
                {
                    "type": "object",
                    "properties": {"regex": {"type": "string", "description": "A regular expression that must match the whole module path (PEFT semantics), e.g. `.*\\.(q_proj|v_proj)`."}},
                    "required": ["regex"],
                    "additionalProperties": false
                }
            ]
        })
    }
}

/// The PEFT target spec of a LoRA config for a model (its `config.json`), defaults resolved.
pub fn resolve_targets(
    written: Option<&TargetModulesConfig>,
    model_config: &serde_json::Value,
) -> Result<TargetModules, String> {
    resolve_targets_for(
        written,
        model_config
            .get("model_type")
            .and_then(serde_json::Value::as_str)
            .unwrap_or(""),
    )
}

/// [`resolve_targets`] given config.json's `model_type` alone.
pub fn resolve_targets_for(
    written: Option<&TargetModulesConfig>,
    model_type: &str,
) -> Result<TargetModules, String> {
    match written {
        Some(TargetModulesConfig::Names(names)) if names.is_empty() => {
            Err("target_modules is an empty list".into())
        }
        Some(TargetModulesConfig::Names(names)) => Ok(TargetModules::Names(names.clone())),
        Some(TargetModulesConfig::AllLinear) => Ok(TargetModules::AllLinear),
        Some(TargetModulesConfig::Regex(pattern)) => TargetModules::regex(pattern),
        None => TargetModules::default_for(model_type),
    }
}

impl MethodConfig {
    /// The method's name as written in YAML (`lora`).
    pub fn name(&self) -> &'static str {
        match self {
            MethodConfig::Lora(_) => "lora",
        }
    }

    /// Checks on the values alone; keys are reported under `{at}.method.<name>.<field>`.
    pub fn check(&self, at: &str, problems: &mut Vec<Problem>) {
        let problem =
            |key: &str, message: String| Problem::new(format!("{at}.{key}"), message).about_value();
        match self {
            MethodConfig::Lora(lora) => {
                if lora.r == 0 {
                    problems.push(problem("method.lora.r", "must be at least 1".into()));
                }
                if !(lora.alpha > 0.0 && lora.alpha.is_finite()) {
                    problems.push(problem(
                        "method.lora.alpha",
                        format!(
                            "must be positive (the update is scaled by alpha/r), got {}",
                            lora.alpha
                        ),
                    ));
                }
                if !(0.0..1.0).contains(&lora.dropout) {
                    problems.push(problem(
                        "method.lora.dropout",
                        format!("must be in [0, 1), got {}", lora.dropout),
                    ));
                }
                if let Some(TargetModulesConfig::Regex(pattern)) = &lora.target_modules {
                    if let Err(message) = TargetModules::regex(pattern) {
                        problems.push(problem("method.lora.target_modules", message));
                    }
                }
            }
        }
    }

    /// Checks against the model's linear layers (from its config.json).
    pub fn check_against_model(
        &self,
        at: &str,
        model_type: &str,
        layers: &[LinearLayerShape],
        problems: &mut Vec<Problem>,
    ) {
        let problem =
            |key: &str, message: String| Problem::new(format!("{at}.{key}"), message).about_value();
        match self {
            MethodConfig::Lora(lora) => {
                let targets = match resolve_targets_for(lora.target_modules.as_ref(), model_type) {
                    Ok(targets) => targets,
                    Err(message) => {
                        problems.push(problem("method.lora.target_modules", message));
                        return;
                    }
                };
                let paths: Vec<&str> = layers.iter().map(|layer| layer.path.as_str()).collect();
                if let Err(mismatch) = super::target_modules::check_targets(&targets, &paths) {
                    let key = match mismatch.index {
                        Some(index) => format!("{at}.method.lora.target_modules[{index}]"),
                        None => format!("{at}.method.lora.target_modules"),
                    };
                    let message = match &mismatch.suggestion {
                        Some(close) => format!("{}; did you mean `{close}`?", mismatch.message),
                        None => mismatch.message.clone(),
                    };
                    problems.push(
                        Problem::new(key, message)
                            .about_value()
                            .with_hint(mismatch.listing),
                    );
                    return;
                }
                // A rank above a layer's smaller side adds nothing a full-rank update lacks and its
                // matrices grow with r: `r: 100000` on 64-wide layers allocates gigabytes.
                if let Some(narrowest) = layers
                    .iter()
                    .filter(|layer| targets.matches(&layer.path))
                    .min_by_key(|layer| layer.in_features.min(layer.out_features))
                {
                    let limit = narrowest.in_features.min(narrowest.out_features);
                    if lora.r > limit {
                        problems.push(problem(
                            "method.lora.r",
                            format!(
                                "{} exceeds the rank of the targeted layer {} ({} → {} features): r must be at most {limit}",
                                lora.r, narrowest.path, narrowest.in_features, narrowest.out_features
                            ),
                        ));
                    }
                }
            }
        }
    }
}
