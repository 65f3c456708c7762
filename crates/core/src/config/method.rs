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

pub use super::auxiliary::TrainableTokenIndices;
use super::probe::{LinearLayerShape, ModelContext};
use super::target_modules::TargetModules;
use super::Problem;

/// A PEFT method.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum MethodConfig {
    /// LoRA (Hu et al. 2021) with Hugging Face PEFT's semantics.
    Lora(LoraConfig),
    /// Prompt tuning (Lester et al. 2021): trainable virtual-token embeddings before the input.
    PromptTuning(PromptTuningConfig),
    /// Prefix tuning (Li & Liang 2021): trainable keys/values prepended in every layer.
    PrefixTuning(PrefixTuningConfig),
    /// LLaMA-Adapter (Zhang et al. 2023; PEFT's `adaption_prompt`): a zero-gated adaption prompt
    /// in the top layers (Llama-family models).
    LlamaAdapter(LlamaAdapterConfig),
    /// IA3 (Liu et al. 2022) with Hugging Face PEFT's semantics: learned scaling vectors.
    Ia3(Ia3Config),
    /// QLoRA (Dettmers et al. 2023): LoRA over a frozen base whose linear layers (all but
    /// `lm_head`; norms and embeddings stay 16-bit) are stored in 4 bits, bit-exact with
    /// bitsandbytes; the saved adapter is a plain PEFT LoRA adapter (Llama-family models).
    Qlora(QloraConfig),
}

/// How prompt tuning initialises its virtual tokens (PEFT's `prompt_tuning_init`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum PromptInit {
    /// Standard normal values (PEFT's `RANDOM`, an `nn.Embedding`'s default).
    #[default]
    Random,
    /// Embeddings of tokens drawn uniformly from the vocabulary (PEFT's `SAMPLE_VOCAB`).
    SampleVocab,
    /// Embeddings of `init_text`'s tokens, repeated or truncated to `num_virtual_tokens`
    /// (PEFT's `TEXT`; the text is tokenized as PEFT does, BOS included).
    Text,
}

impl PromptInit {
    /// PEFT's name.
    pub fn peft_name(self) -> &'static str {
        match self {
            PromptInit::Random => "RANDOM",
            PromptInit::SampleVocab => "SAMPLE_VOCAB",
            PromptInit::Text => "TEXT",
        }
    }
}

/// Prompt tuning hyperparameters (PEFT's meaning).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct PromptTuningConfig {
    /// Virtual tokens prepended to every input.
    #[serde(default = "default_virtual_tokens")]
    pub num_virtual_tokens: usize,
    /// How the virtual tokens start.
    #[serde(default)]
    pub init: PromptInit,
    /// The text of `init: text`.
    #[serde(default)]
    pub init_text: Option<String>,
}

/// Prefix tuning hyperparameters (PEFT's meaning).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct PrefixTuningConfig {
    /// Prefix positions per layer.
    #[serde(default = "default_virtual_tokens")]
    pub num_virtual_tokens: usize,
    /// Reparameterize the prefix through an MLP (embedding → Linear → tanh → Linear), as the
    /// paper does for stability; the saved adapter holds the projected prefix, as PEFT saves it.
    #[serde(default)]
    pub prefix_projection: bool,
    /// Hidden width of that MLP (default: the key/value width, PEFT's `token_dim`).
    #[serde(default)]
    pub encoder_hidden_size: Option<usize>,
    /// How the prefix starts (without `prefix_projection`).
    #[serde(default)]
    pub init: PrefixInit,
}

/// How prefix tuning initialises its keys and values.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum PrefixInit {
    /// Standard normal values (PEFT's default, an `nn.Embedding`'s).
    #[default]
    Random,
    /// The model's own keys and values of uniformly drawn vocabulary tokens (Li & Liang 2021,
    /// §7.2: "initialize with activations of real words"); starts far closer to the base model
    /// than standard-normal keys do on small models.
    SampleVocab,
}

/// LLaMA-Adapter hyperparameters (PEFT's `adaption_prompt` names).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct LlamaAdapterConfig {
    /// Adaption-prompt length per adapted layer.
    #[serde(default = "default_adapter_len")]
    pub adapter_len: usize,
    /// How many of the top layers get an adaption prompt.
    #[serde(default = "default_adapter_layers")]
    pub adapter_layers: usize,
    /// One gate per attention head (the paper's form) instead of PEFT's single gate per layer;
    /// such an adapter is saved in PEFT's layout but only peftpipe loads its gates.
    #[serde(default)]
    pub per_head_gate: bool,
}

fn default_virtual_tokens() -> usize {
    20
}
fn default_adapter_len() -> usize {
    10
}
fn default_adapter_layers() -> usize {
    1
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
    /// DoRA (Liu et al. 2024), as PEFT's `use_dora`: the adapted weight is split into a trained
    /// magnitude vector (one per output feature, initialised to the weight's row norms) and the
    /// LoRA-updated direction.
    #[serde(default)]
    pub use_dora: bool,
    /// Token ids whose embedding rows train besides the method (PEFT's `trainable_token_indices`,
    /// e.g. an EOS the base model never learned): `[ids]` targets the input embedding, and a tied
    /// `lm_head` follows it; `{embed_tokens: [ids], lm_head: [ids]}` names the modules. Only those
    /// rows change; they are saved as PEFT's `token_adapter.trainable_tokens_delta`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub trainable_token_indices: Option<TrainableTokenIndices>,
    /// Modules trained fully beside the method, as a trainable copy (PEFT's `modules_to_save`):
    /// `lm_head`, the input embedding (`embed_tokens`, GPT-2's `wte`) and/or normalization layers
    /// (Llama's `input_layernorm`, `post_attention_layernorm`, `model.norm`; GPT-2's `ln_1`,
    /// `ln_2`, `ln_f`: weight and bias); names match a module name's end, as PEFT matches them
    /// (`norm` is the end of every Llama norm's name). Saved under the module's own tensor names.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub modules_to_save: Option<Vec<String>>,
}

/// IA3 hyperparameters (PEFT's names and defaults).
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Ia3Config {
    /// Which linear layers get a scaling vector (same forms as LoRA's `target_modules`).
    /// Default: PEFT's for the architecture (k_proj, v_proj, down_proj for Llama; c_attn,
    /// mlp.c_proj for GPT-2).
    #[serde(default)]
    pub target_modules: Option<TargetModulesConfig>,
    /// Which of the targeted layers are feed-forward: their vector scales the layer's input
    /// (one value per input feature) instead of its output. Names match a module path's end, as
    /// PEFT matches them; each must also be a target. Default: PEFT's for the architecture
    /// (down_proj for Llama; mlp.c_proj for GPT-2).
    #[serde(default)]
    pub feedforward_modules: Option<Vec<String>>,
    /// Modules trained fully beside the method, as a trainable copy (PEFT's `modules_to_save`):
    /// `lm_head`, the input embedding (`embed_tokens`, GPT-2's `wte`) and/or normalization layers
    /// (Llama's `input_layernorm`, `post_attention_layernorm`, `model.norm`; GPT-2's `ln_1`,
    /// `ln_2`, `ln_f`: weight and bias); names match a module name's end, as PEFT matches them
    /// (`norm` is the end of every Llama norm's name). Saved under the module's own tensor names.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub modules_to_save: Option<Vec<String>>,
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
            use_dora: false,
            trainable_token_indices: None,
            modules_to_save: None,
        }
    }
}

/// The 4-bit data type of a QLoRA base (bitsandbytes' `bnb_4bit_quant_type`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum QuantTypeChoice {
    /// 4-bit NormalFloat: 16 levels at the quantiles of a normal distribution (QLoRA's choice).
    #[default]
    Nf4,
    /// bitsandbytes' 4-bit float (1 sign, 2 exponent, 1 mantissa bit).
    Fp4,
}

impl QuantTypeChoice {
    /// bitsandbytes' name (`nf4`, `fp4`).
    pub fn name(self) -> &'static str {
        match self {
            QuantTypeChoice::Nf4 => "nf4",
            QuantTypeChoice::Fp4 => "fp4",
        }
    }
}

/// The dtype a QLoRA base layer computes in (bitsandbytes' `bnb_4bit_compute_dtype`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum ComputeDtypeChoice {
    Bf16,
    F16,
    F32,
}

impl ComputeDtypeChoice {
    /// The dtype name (`bf16`, `f16`, `f32`), as the train stage's `dtype` resolves to.
    pub fn name(self) -> &'static str {
        match self {
            ComputeDtypeChoice::Bf16 => "bf16",
            ComputeDtypeChoice::F16 => "f16",
            ComputeDtypeChoice::F32 => "f32",
        }
    }
}

/// A base stored in bitsandbytes 4-bit, as `BitsAndBytesConfig(load_in_4bit=True, ...)` sets it
/// up (its names without `bnb_4bit_`; QLoRA's defaults): the export stage's re-quantized merged
/// model (`quantize`) and the 4-bit base an evaluate stage scores external adapters over
/// (`base_quantization`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct FourBitSettings {
    /// The 4-bit code book: `nf4` (QLoRA's) or `fp4` (`bnb_4bit_quant_type`).
    #[serde(default)]
    pub quant_type: QuantTypeChoice,
    /// Quantize the per-block absmax values again to 8 bits in blocks of 256
    /// (`bnb_4bit_use_double_quant`; QLoRA's default).
    #[serde(default = "default_true")]
    pub double_quant: bool,
    /// Weights per absmax: a power of two from 64 to 4096 (bitsandbytes' `blocksize`, saved in
    /// each weight's quantization state; transformers quantizes with 64).
    #[serde(default = "default_block_size")]
    pub block_size: usize,
    /// The dtype the 4-bit layers compute in (`bnb_4bit_compute_dtype`; an export writes it into
    /// config.json). Default: the model's dtype (an export's: the merged weights' dtype).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub compute_dtype: Option<ComputeDtypeChoice>,
}

impl Default for FourBitSettings {
    fn default() -> Self {
        FourBitSettings {
            quant_type: QuantTypeChoice::Nf4,
            double_quant: true,
            block_size: default_block_size(),
            compute_dtype: None,
        }
    }
}

/// QLoRA hyperparameters: LoRA's (PEFT's names and defaults) and the base's 4-bit storage
/// (bitsandbytes' `BitsAndBytesConfig` names without the `bnb_4bit_` prefix; QLoRA's defaults).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct QloraConfig {
    /// Rank of the update B·A.
    #[serde(default = "default_rank")]
    pub r: usize,
    /// Scaling numerator: the update is scaled by alpha/r (alpha/√r with rsLoRA).
    #[serde(default = "default_alpha")]
    pub alpha: f64,
    /// Dropout on the adapter's input during training.
    #[serde(default)]
    pub dropout: f64,
    /// Which linear layers get a LoRA update (same forms as LoRA's `target_modules`; QLoRA's
    /// paper adapts `all-linear`). Default: PEFT's for the architecture. The base weights of
    /// every linear layer but `lm_head` are stored in 4 bits whether targeted or not.
    #[serde(default)]
    pub target_modules: Option<TargetModulesConfig>,
    /// Rank-stabilised LoRA: scale by alpha/√r.
    #[serde(default)]
    pub use_rslora: bool,
    /// DoRA over the 4-bit base (PEFT's QDoRA): the magnitude starts at the row norms of the
    /// dequantized weight.
    #[serde(default)]
    pub use_dora: bool,
    /// The 4-bit code book: `nf4` (QLoRA's) or `fp4`.
    #[serde(default)]
    pub quant_type: QuantTypeChoice,
    /// Quantize the per-block absmax values again to 8 bits in blocks of 256 (saves ~0.37 bit
    /// per weight; QLoRA's default).
    #[serde(default = "default_true")]
    pub double_quant: bool,
    /// Weights per absmax: a power of two from 64 to 4096 (bitsandbytes' `blocksize`).
    #[serde(default = "default_block_size")]
    pub block_size: usize,
    /// The dtype the 4-bit layers compute in (their input is cast to it, their output back).
    /// Default: the train stage's dtype.
    #[serde(default)]
    pub compute_dtype: Option<ComputeDtypeChoice>,
    /// Token ids whose embedding rows train besides the method (PEFT's `trainable_token_indices`,
    /// e.g. an EOS the base model never learned): `[ids]` targets the input embedding, and a tied
    /// `lm_head` follows it; `{embed_tokens: [ids], lm_head: [ids]}` names the modules. Only those
    /// rows change; they are saved as PEFT's `token_adapter.trainable_tokens_delta`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub trainable_token_indices: Option<TrainableTokenIndices>,
    /// Modules trained fully beside the method, as a trainable copy (PEFT's `modules_to_save`):
    /// `lm_head`, the input embedding (`embed_tokens`, GPT-2's `wte`) and/or normalization layers
    /// (Llama's `input_layernorm`, `post_attention_layernorm`, `model.norm`; GPT-2's `ln_1`,
    /// `ln_2`, `ln_f`: weight and bias); names match a module name's end, as PEFT matches them
    /// (`norm` is the end of every Llama norm's name). Saved under the module's own tensor names.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub modules_to_save: Option<Vec<String>>,
}

fn default_true() -> bool {
    true
}
/// bitsandbytes' default 4-bit block size (QLoRA's; transformers quantizes with it).
pub(crate) fn default_block_size() -> usize {
    64
}

/// Why `block_size` is not one of bitsandbytes' 4-bit block sizes ([`QLORA_BLOCK_SIZES`]), or
/// `None` when it is one.
pub fn block_size_problem(block_size: usize) -> Option<String> {
    (!QLORA_BLOCK_SIZES.contains(&block_size)).then(|| {
        format!(
            "must be a power of two from 64 to 4096 (bitsandbytes' 4-bit block sizes), got {block_size}"
        )
    })
}

impl Default for QloraConfig {
    fn default() -> Self {
        QloraConfig::from_lora(&LoraConfig::default())
    }
}

impl QloraConfig {
    /// QLoRA with `lora`'s LoRA settings and QLoRA's quantization defaults.
    pub fn from_lora(lora: &LoraConfig) -> Self {
        QloraConfig {
            r: lora.r,
            alpha: lora.alpha,
            dropout: lora.dropout,
            target_modules: lora.target_modules.clone(),
            use_rslora: lora.use_rslora,
            use_dora: lora.use_dora,
            quant_type: QuantTypeChoice::Nf4,
            double_quant: true,
            block_size: default_block_size(),
            compute_dtype: None,
            trainable_token_indices: lora.trainable_token_indices.clone(),
            modules_to_save: lora.modules_to_save.clone(),
        }
    }

    /// The 4-bit base's settings.
    pub fn four_bit(&self) -> FourBitSettings {
        FourBitSettings {
            quant_type: self.quant_type,
            double_quant: self.double_quant,
            block_size: self.block_size,
            compute_dtype: self.compute_dtype,
        }
    }

    /// The LoRA part.
    pub fn lora(&self) -> LoraConfig {
        LoraConfig {
            r: self.r,
            alpha: self.alpha,
            dropout: self.dropout,
            target_modules: self.target_modules.clone(),
            use_rslora: self.use_rslora,
            use_dora: self.use_dora,
            trainable_token_indices: self.trainable_token_indices.clone(),
            modules_to_save: self.modules_to_save.clone(),
        }
    }
}

/// The block sizes a QLoRA base accepts (bitsandbytes' 4-bit block sizes from 64 up; 32 only
/// exists for its ROCm builds).
pub const QLORA_BLOCK_SIZES: [usize; 7] = [64, 128, 256, 512, 1024, 2048, 4096];

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

/// PEFT's IA3 targets and feed-forward modules for a model type
/// (`TRANSFORMERS_MODELS_TO_IA3_{TARGET,FEEDFORWARD}_MODULES_MAPPING`).
pub fn ia3_defaults(
    model_type: &str,
) -> Option<(&'static [&'static str], &'static [&'static str])> {
    match model_type {
        "llama" | "mistral" => Some((&["k_proj", "v_proj", "down_proj"], &["down_proj"])),
        "gemma" | "gemma2" | "qwen2" => Some((&["q_proj", "v_proj", "down_proj"], &["down_proj"])),
        "gpt2" => Some((&["c_attn", "mlp.c_proj"], &["mlp.c_proj"])),
        _ => None,
    }
}

/// An IA3 config's targets and feed-forward module names for a model type, defaults resolved.
pub fn resolve_ia3_for(
    config: &Ia3Config,
    model_type: &str,
) -> Result<(TargetModules, Vec<String>), String> {
    let defaults = ia3_defaults(model_type);
    let missing =
        |what: &str| format!("no default IA3 {what} for model_type `{model_type}`: set {what}");
    let targets = match &config.target_modules {
        Some(written) => resolve_targets_for(Some(written), model_type)?,
        None => {
            let (targets, _) = defaults.ok_or_else(|| missing("target_modules"))?;
            TargetModules::Names(targets.iter().map(|name| name.to_string()).collect())
        }
    };
    let feedforward = match &config.feedforward_modules {
        Some(names) => names.clone(),
        None => {
            let (_, feedforward) = defaults.ok_or_else(|| missing("feedforward_modules"))?;
            feedforward.iter().map(|name| name.to_string()).collect()
        }
    };
    Ok((targets, feedforward))
}

/// Whether IA3 treats the module at `path` as feed-forward: PEFT's rule, the path ends with one
/// of the names (a plain string suffix).
pub fn ia3_is_feedforward(path: &str, feedforward: &[String]) -> bool {
    feedforward.iter().any(|name| path.ends_with(name.as_str()))
}

impl MethodConfig {
    /// The method's name as written in YAML (`lora`).
    pub fn name(&self) -> &'static str {
        match self {
            MethodConfig::Lora(_) => "lora",
            MethodConfig::PromptTuning(_) => "prompt_tuning",
            MethodConfig::PrefixTuning(_) => "prefix_tuning",
            MethodConfig::LlamaAdapter(_) => "llama_adapter",
            MethodConfig::Ia3(_) => "ia3",
            MethodConfig::Qlora(_) => "qlora",
        }
    }

    /// The auxiliary trainable modules the method carries (PEFT's `trainable_token_indices` and
    /// `modules_to_save`; see `config::auxiliary`): LoRA, QLoRA and IA3 (modules only) have them.
    pub fn auxiliary(&self) -> (Option<&TrainableTokenIndices>, Option<&[String]>) {
        match self {
            MethodConfig::Lora(lora) => (
                lora.trainable_token_indices.as_ref(),
                lora.modules_to_save.as_deref(),
            ),
            MethodConfig::Qlora(qlora) => (
                qlora.trainable_token_indices.as_ref(),
                qlora.modules_to_save.as_deref(),
            ),
            MethodConfig::Ia3(ia3) => (None, ia3.modules_to_save.as_deref()),
            MethodConfig::PromptTuning(_)
            | MethodConfig::PrefixTuning(_)
            | MethodConfig::LlamaAdapter(_) => (None, None),
        }
    }

    /// Whether training changes the model's weights (LoRA, QLoRA, DoRA, IA3), so a merged model
    /// can be written; prompt tuning, prefix tuning and LLaMA-Adapter add to its inputs or
    /// attention instead.
    pub fn has_weight_update(&self) -> bool {
        !matches!(
            self,
            MethodConfig::PromptTuning(_)
                | MethodConfig::PrefixTuning(_)
                | MethodConfig::LlamaAdapter(_)
        )
    }

    /// Positions of the model's context the method's virtual tokens take: prompt tuning's
    /// embeddings are prepended to the input, prefix tuning's keys and values are PEFT's
    /// `past_key_values`, so the real tokens' positions start after them. LLaMA-Adapter's
    /// adaption prompt has an attention of its own and takes none.
    pub fn virtual_positions(&self) -> usize {
        match self {
            MethodConfig::PromptTuning(prompt) => prompt.num_virtual_tokens,
            MethodConfig::PrefixTuning(prefix) => prefix.num_virtual_tokens,
            _ => 0,
        }
    }

    /// Checks of the prompt methods' sizes against the model's context: virtual tokens must
    /// leave the text at least one position, an adaption prompt is no longer than the context,
    /// and a prefix encoder is no wider than the prefix it produces (2 · layers · kv_dim values
    /// per position). Without them a typo (`num_virtual_tokens: 100000000`) passes validation and
    /// the run dies allocating, or fails after training.
    pub fn check_against_context(
        &self,
        at: &str,
        context: &ModelContext,
        problems: &mut Vec<Problem>,
    ) {
        let problem =
            |key: &str, message: String| Problem::new(format!("{at}.{key}"), message).about_value();
        let positions = context.max_positions;
        let key = &context.positions_key;
        let virtual_tokens = self.virtual_positions();
        // The text needs a first token and one to score, and evaluation one more to generate.
        const TEXT_POSITIONS: usize = 3;
        if virtual_tokens > 0 && virtual_tokens.saturating_add(TEXT_POSITIONS) > positions {
            problems.push(
                problem(
                    &format!("method.{}.num_virtual_tokens", self.name()),
                    format!(
                        "{virtual_tokens} virtual tokens leave {} of the model's {positions} positions (config.json `{key}`) for the text, which needs at least {TEXT_POSITIONS}",
                        positions.saturating_sub(virtual_tokens)
                    ),
                )
                .with_hint(format!(
                    "virtual tokens come before the text in the same context: use well under {positions}"
                )),
            );
        }
        match self {
            MethodConfig::LlamaAdapter(adapter) if adapter.adapter_len > positions => {
                problems.push(problem(
                    "method.llama_adapter.adapter_len",
                    format!(
                        "an adaption prompt of {} positions is longer than the model's context of {positions} (config.json `{key}`)",
                        adapter.adapter_len
                    ),
                ));
            }
            MethodConfig::PrefixTuning(prefix) if prefix.prefix_projection => {
                let produced = context
                    .num_layers
                    .saturating_mul(2)
                    .saturating_mul(context.kv_dim);
                if let Some(width) = prefix.encoder_hidden_size.filter(|&width| width > produced) {
                    problems.push(
                        problem(
                            "method.prefix_tuning.encoder_hidden_size",
                            format!(
                                "{width} is wider than the {produced} values per position the encoder produces (2 × {} layers × {} key/value width)",
                                context.num_layers, context.kv_dim
                            ),
                        )
                        .with_hint(format!(
                            "PEFT's default is the key/value width, {}",
                            context.kv_dim
                        )),
                    );
                }
            }
            _ => {}
        }
    }

    /// Checks on the values alone; keys are reported under `{at}.method.<name>.<field>`.
    pub fn check(&self, at: &str, problems: &mut Vec<Problem>) {
        let problem =
            |key: &str, message: String| Problem::new(format!("{at}.{key}"), message).about_value();
        match self {
            MethodConfig::Lora(lora) => check_lora(lora, "method.lora", &problem, problems),
            MethodConfig::Qlora(qlora) => {
                check_lora(&qlora.lora(), "method.qlora", &problem, problems);
                if let Some(message) = block_size_problem(qlora.block_size) {
                    problems.push(problem("method.qlora.block_size", message));
                }
            }
            MethodConfig::PromptTuning(prompt) => {
                if prompt.num_virtual_tokens == 0 {
                    problems.push(problem(
                        "method.prompt_tuning.num_virtual_tokens",
                        "must be at least 1".into(),
                    ));
                }
                let has_text = prompt.init_text.as_deref().is_some_and(|t| !t.is_empty());
                match (prompt.init, has_text) {
                    (PromptInit::Text, false) => problems.push(problem(
                        "method.prompt_tuning.init_text",
                        "`init: text` needs a non-empty init_text".into(),
                    )),
                    (PromptInit::Random | PromptInit::SampleVocab, true) => problems.push(problem(
                        "method.prompt_tuning.init_text",
                        "init_text is only used with `init: text`".into(),
                    )),
                    _ => {}
                }
            }
            MethodConfig::PrefixTuning(prefix) => {
                if prefix.num_virtual_tokens == 0 {
                    problems.push(problem(
                        "method.prefix_tuning.num_virtual_tokens",
                        "must be at least 1".into(),
                    ));
                }
                if prefix.encoder_hidden_size == Some(0) {
                    problems.push(problem(
                        "method.prefix_tuning.encoder_hidden_size",
                        "must be at least 1".into(),
                    ));
                }
                if prefix.init == PrefixInit::SampleVocab && prefix.prefix_projection {
                    problems.push(problem(
                        "method.prefix_tuning.init",
                        "`init: sample_vocab` sets the prefix itself; it does not apply with `prefix_projection: true`".into(),
                    ));
                }
                if prefix.encoder_hidden_size.is_some() && !prefix.prefix_projection {
                    problems.push(problem(
                        "method.prefix_tuning.encoder_hidden_size",
                        "is only used with `prefix_projection: true`".into(),
                    ));
                }
            }
            MethodConfig::LlamaAdapter(adapter) => {
                if adapter.adapter_len == 0 {
                    problems.push(problem(
                        "method.llama_adapter.adapter_len",
                        "must be at least 1".into(),
                    ));
                }
                if adapter.adapter_layers == 0 {
                    problems.push(problem(
                        "method.llama_adapter.adapter_layers",
                        "must be at least 1".into(),
                    ));
                }
            }
            MethodConfig::Ia3(ia3) => {
                for item in super::auxiliary::check_values(None, ia3.modules_to_save.as_deref()) {
                    problems.push(problem(&format!("method.ia3.{}", item.field), item.message));
                }
                match &ia3.target_modules {
                    Some(TargetModulesConfig::Regex(pattern)) => {
                        if let Err(message) = TargetModules::regex(pattern) {
                            problems.push(problem("method.ia3.target_modules", message));
                        }
                    }
                    Some(TargetModulesConfig::Names(names)) if names.is_empty() => problems.push(
                        problem("method.ia3.target_modules", "is an empty list".into()),
                    ),
                    _ => {}
                }
                let Some(feedforward) = &ia3.feedforward_modules else {
                    return;
                };
                for (index, name) in feedforward.iter().enumerate() {
                    let key = format!("method.ia3.feedforward_modules[{index}]");
                    if name.is_empty() {
                        problems.push(problem(&key, "is an empty name".into()));
                        continue;
                    }
                    // PEFT's rule: feed-forward modules must be a subset of the targets.
                    if let Some(TargetModulesConfig::Names(targets)) = &ia3.target_modules {
                        if !targets.contains(name) {
                            problems.push(problem(
                                &key,
                                format!(
                                    "`{name}` is not in target_modules ({}): feed-forward modules must be a subset of the targets, as PEFT requires",
                                    targets.join(", ")
                                ),
                            ));
                        }
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
                check_lora_against_model(
                    lora,
                    &format!("{at}.method.lora"),
                    model_type,
                    layers,
                    problems,
                );
            }
            MethodConfig::Qlora(qlora) => {
                if model_type == "gpt2" {
                    problems.push(problem(
                        "method.qlora",
                        "QLoRA's 4-bit base is supported for Llama-family models, not gpt2 (use lora)"
                            .into(),
                    ));
                    return;
                }
                check_lora_against_model(
                    &qlora.lora(),
                    &format!("{at}.method.qlora"),
                    model_type,
                    layers,
                    problems,
                );
            }
            MethodConfig::PromptTuning(_) | MethodConfig::PrefixTuning(_) => {}
            MethodConfig::LlamaAdapter(adapter) => {
                if model_type == "gpt2" {
                    problems.push(problem(
                        "method.llama_adapter",
                        "LLaMA-Adapter (PEFT's adaption_prompt) needs a Llama-family model, not gpt2"
                            .into(),
                    ));
                    return;
                }
                let layer_count = layers
                    .iter()
                    .filter_map(|layer| layer_index(&layer.path))
                    .max()
                    .map_or(0, |last| last + 1);
                if layer_count > 0 && adapter.adapter_layers > layer_count {
                    problems.push(problem(
                        "method.llama_adapter.adapter_layers",
                        format!(
                            "{} exceeds the model's {layer_count} layers",
                            adapter.adapter_layers
                        ),
                    ));
                }
            }
            MethodConfig::Ia3(ia3) => {
                super::auxiliary::check_against_model(
                    None,
                    ia3.modules_to_save.as_deref(),
                    &format!("{at}.method.ia3"),
                    model_type,
                    layers,
                    problems,
                );
                let (targets, feedforward) = match resolve_ia3_for(ia3, model_type) {
                    Ok(resolved) => resolved,
                    Err(message) => {
                        problems.push(problem("method.ia3.target_modules", message));
                        return;
                    }
                };
                let paths: Vec<&str> = layers.iter().map(|layer| layer.path.as_str()).collect();
                if let Err(mismatch) = super::target_modules::check_targets(&targets, &paths) {
                    let key = match mismatch.index {
                        Some(index) => format!("{at}.method.ia3.target_modules[{index}]"),
                        None => format!("{at}.method.ia3.target_modules"),
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
                if ia3.feedforward_modules.is_none() {
                    return;
                }
                for (index, name) in feedforward.iter().enumerate() {
                    let single = [name.clone()];
                    if !paths
                        .iter()
                        .any(|path| targets.matches(path) && ia3_is_feedforward(path, &single))
                    {
                        problems.push(problem(
                            &format!("method.ia3.feedforward_modules[{index}]"),
                            format!("`{name}` matches no targeted linear layer"),
                        ));
                    }
                }
            }
        }
    }
}

/// LoRA's checks on the values alone, reported under `{at}.{key}.<field>` through `problem`.
fn check_lora(
    lora: &LoraConfig,
    key: &str,
    problem: &dyn Fn(&str, String) -> Problem,
    problems: &mut Vec<Problem>,
) {
    if lora.r == 0 {
        problems.push(problem(&format!("{key}.r"), "must be at least 1".into()));
    }
    if !(lora.alpha > 0.0 && lora.alpha.is_finite()) {
        problems.push(problem(
            &format!("{key}.alpha"),
            format!(
                "must be positive (the update is scaled by alpha/r), got {}",
                lora.alpha
            ),
        ));
    }
    if !(0.0..1.0).contains(&lora.dropout) {
        problems.push(problem(
            &format!("{key}.dropout"),
            format!("must be in [0, 1), got {}", lora.dropout),
        ));
    }
    if let Some(TargetModulesConfig::Regex(pattern)) = &lora.target_modules {
        if let Err(message) = TargetModules::regex(pattern) {
            problems.push(problem(&format!("{key}.target_modules"), message));
        }
    }
    for item in super::auxiliary::check_values(
        lora.trainable_token_indices.as_ref(),
        lora.modules_to_save.as_deref(),
    ) {
        problems.push(problem(&format!("{key}.{}", item.field), item.message));
    }
}

/// LoRA's checks against the model's linear layers; `key` is the full key of the method
/// (`stages.train.method.lora`).
fn check_lora_against_model(
    lora: &LoraConfig,
    key: &str,
    model_type: &str,
    layers: &[LinearLayerShape],
    problems: &mut Vec<Problem>,
) {
    let targets = match resolve_targets_for(lora.target_modules.as_ref(), model_type) {
        Ok(targets) => targets,
        Err(message) => {
            problems.push(Problem::new(format!("{key}.target_modules"), message).about_value());
            return;
        }
    };
    super::auxiliary::check_against_model(
        lora.trainable_token_indices.as_ref(),
        lora.modules_to_save.as_deref(),
        key,
        model_type,
        layers,
        problems,
    );
    let paths: Vec<&str> = layers.iter().map(|layer| layer.path.as_str()).collect();
    if let Err(mismatch) = super::target_modules::check_targets(&targets, &paths) {
        let key = match mismatch.index {
            Some(index) => format!("{key}.target_modules[{index}]"),
            None => format!("{key}.target_modules"),
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
            problems.push(Problem::new(format!("{key}.r"),
                            format!(
                                "{} exceeds the rank of the targeted layer {} ({} → {} features): r must be at most {limit}",
                                lora.r, narrowest.path, narrowest.in_features, narrowest.out_features
                            ),
                        ).about_value());
        }
    }
}

/// The layer index in a module path (`model.layers.3.self_attn.q_proj` → 3).
fn layer_index(path: &str) -> Option<usize> {
    let mut parts = path.split('.');
    while let Some(part) = parts.next() {
        if part == "layers" || part == "h" {
            return parts.next()?.parse().ok();
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(yaml: &str) -> MethodConfig {
        let value: serde_json::Value = serde_norway::from_str(yaml).unwrap();
        serde_json::from_value(value).unwrap()
    }

    fn problem_keys(yaml: &str) -> Vec<String> {
        let mut problems = Vec::new();
        parse(yaml).check("stages.train", &mut problems);
        problems.into_iter().map(|p| p.path).collect()
    }

    #[test]
    fn every_method_parses_with_peft_defaults() {
        let MethodConfig::PromptTuning(prompt) = parse("prompt_tuning: {}") else {
            panic!("prompt tuning")
        };
        assert_eq!(
            (prompt.num_virtual_tokens, prompt.init),
            (20, PromptInit::Random)
        );
        let MethodConfig::PrefixTuning(prefix) = parse("prefix_tuning: {num_virtual_tokens: 8}")
        else {
            panic!("prefix tuning")
        };
        assert!(!prefix.prefix_projection && prefix.encoder_hidden_size.is_none());
        let MethodConfig::LlamaAdapter(adapter) = parse("llama_adapter: {adapter_layers: 3}")
        else {
            panic!("llama adapter")
        };
        assert_eq!((adapter.adapter_len, adapter.adapter_layers), (10, 3));
        let value: serde_json::Value =
            serde_norway::from_str("prompt_tuning: {virtual_tokens: 8}").unwrap();
        assert!(serde_json::from_value::<MethodConfig>(value).is_err());
    }

    #[test]
    fn method_checks_name_the_field() {
        assert_eq!(
            problem_keys("prompt_tuning: {init: text}"),
            ["stages.train.method.prompt_tuning.init_text"]
        );
        assert_eq!(
            problem_keys("prompt_tuning: {init_text: hello}"),
            ["stages.train.method.prompt_tuning.init_text"]
        );
        assert!(problem_keys("prompt_tuning: {init: text, init_text: hello}").is_empty());
        assert_eq!(
            problem_keys("prefix_tuning: {num_virtual_tokens: 0, encoder_hidden_size: 8}"),
            [
                "stages.train.method.prefix_tuning.num_virtual_tokens",
                "stages.train.method.prefix_tuning.encoder_hidden_size"
            ]
        );
        assert_eq!(
            problem_keys("prefix_tuning: {prefix_projection: true, init: sample_vocab}"),
            ["stages.train.method.prefix_tuning.init"]
        );
        assert_eq!(
            problem_keys("llama_adapter: {adapter_len: 0}"),
            ["stages.train.method.llama_adapter.adapter_len"]
        );
    }

    #[test]
    fn qlora_parses_with_qlora_defaults_and_checks_its_fields() {
        let MethodConfig::Qlora(qlora) = parse("qlora: {r: 16}") else {
            panic!("qlora")
        };
        assert_eq!(qlora.r, 16);
        assert_eq!(qlora.quant_type, QuantTypeChoice::Nf4);
        assert!(qlora.double_quant);
        assert_eq!(qlora.block_size, 64);
        assert_eq!(qlora.compute_dtype, None);
        assert_eq!(qlora.lora().alpha, LoraConfig::default().alpha);
        let MethodConfig::Qlora(qlora) = parse(
            "qlora: {quant_type: fp4, double_quant: false, block_size: 4096, compute_dtype: bf16}",
        ) else {
            panic!("qlora")
        };
        assert_eq!(
            (qlora.quant_type, qlora.double_quant, qlora.block_size),
            (QuantTypeChoice::Fp4, false, 4096)
        );
        assert_eq!(qlora.compute_dtype, Some(ComputeDtypeChoice::Bf16));
        assert!(problem_keys("qlora: {r: 4, target_modules: all-linear}").is_empty());
        assert_eq!(
            problem_keys("qlora: {r: 0, alpha: -1, dropout: 1.5, block_size: 32}"),
            [
                "stages.train.method.qlora.r",
                "stages.train.method.qlora.alpha",
                "stages.train.method.qlora.dropout",
                "stages.train.method.qlora.block_size"
            ]
        );
        assert_eq!(
            problem_keys("qlora: {block_size: 100}"),
            ["stages.train.method.qlora.block_size"]
        );
        for bad in [
            "qlora: {quant_type: int4}",
            "qlora: {compute_dtype: f64}",
            "qlora: {bnb_4bit_quant_type: nf4}",
        ] {
            let value: serde_json::Value = serde_norway::from_str(bad).unwrap();
            assert!(
                serde_json::from_value::<MethodConfig>(value).is_err(),
                "{bad}"
            );
        }
    }

    #[test]
    fn qlora_targets_and_rank_are_checked_against_the_model_like_lora() {
        let layers: Vec<LinearLayerShape> = ["q_proj", "v_proj"]
            .iter()
            .map(|name| LinearLayerShape {
                path: format!("model.layers.0.self_attn.{name}"),
                in_features: 8,
                out_features: 8,
            })
            .collect();
        let check = |yaml: &str, model_type: &str| {
            let mut problems = Vec::new();
            parse(yaml).check_against_model("stages.train", model_type, &layers, &mut problems);
            problems.into_iter().map(|p| p.path).collect::<Vec<_>>()
        };
        assert!(check("qlora: {r: 8}", "llama").is_empty());
        assert_eq!(
            check("qlora: {r: 9}", "llama"),
            ["stages.train.method.qlora.r"]
        );
        assert_eq!(
            check("qlora: {target_modules: [q_prj]}", "llama"),
            ["stages.train.method.qlora.target_modules[0]"]
        );
        assert_eq!(check("qlora: {}", "gpt2"), ["stages.train.method.qlora"]);
        assert_eq!(
            check("lora: {target_modules: [q_prj]}", "llama"),
            ["stages.train.method.lora.target_modules[0]"]
        );
    }

    #[test]
    fn llama_adapter_layers_are_checked_against_the_model() {
        let layers: Vec<LinearLayerShape> = (0..4)
            .map(|i| LinearLayerShape {
                path: format!("model.layers.{i}.self_attn.q_proj"),
                in_features: 8,
                out_features: 8,
            })
            .collect();
        let mut problems = Vec::new();
        parse("llama_adapter: {adapter_layers: 5}").check_against_model(
            "stages.train",
            "llama",
            &layers,
            &mut problems,
        );
        assert_eq!(problems.len(), 1);
        let mut problems = Vec::new();
        parse("llama_adapter: {adapter_layers: 4}").check_against_model(
            "stages.train",
            "gpt2",
            &layers,
            &mut problems,
        );
        assert_eq!(problems.len(), 1);
    }

    #[test]
    fn prompt_methods_must_fit_the_models_context() {
        let context = ModelContext {
            max_positions: 128,
            positions_key: "n_positions".to_string(),
            num_layers: 2,
            kv_dim: 64,
            sliding_window: None,
        };
        let problems_of = |yaml: &str| {
            let mut problems = Vec::new();
            parse(yaml).check_against_context("stages.train", &context, &mut problems);
            problems
                .iter()
                .map(|problem| problem.path.clone())
                .collect::<Vec<_>>()
        };
        assert_eq!(
            problems_of("prompt_tuning: {num_virtual_tokens: 128}"),
            ["stages.train.method.prompt_tuning.num_virtual_tokens"]
        );
        assert_eq!(
            problems_of("prompt_tuning: {num_virtual_tokens: 126}"),
            ["stages.train.method.prompt_tuning.num_virtual_tokens"]
        );
        assert!(problems_of("prompt_tuning: {num_virtual_tokens: 125}").is_empty());
        assert_eq!(
            problems_of("prefix_tuning: {num_virtual_tokens: 100000000}"),
            ["stages.train.method.prefix_tuning.num_virtual_tokens"]
        );
        assert_eq!(
            problems_of("llama_adapter: {adapter_len: 129}"),
            ["stages.train.method.llama_adapter.adapter_len"]
        );
        assert!(problems_of("llama_adapter: {adapter_len: 128}").is_empty());
        // The encoder produces 2 × 2 × 64 = 256 values per position.
        assert_eq!(
            problems_of(
                "prefix_tuning: {num_virtual_tokens: 8, prefix_projection: true, encoder_hidden_size: 257}"
            ),
            ["stages.train.method.prefix_tuning.encoder_hidden_size"]
        );
        assert!(problems_of(
            "prefix_tuning: {num_virtual_tokens: 8, prefix_projection: true, encoder_hidden_size: 256}"
        )
        .is_empty());
        assert!(problems_of("lora: {r: 8}").is_empty());
    }
}
