//! The model part of a Hugging Face `config.json`: which architecture, and its dimensions.
//!
//! Owns parsing (dispatch on `model_type`, then `architectures`), defaults as transformers applies
//! them, and everything derivable without weights: the linear layers with their HF module paths and
//! shapes ([`ModelConfig::linear_layers`], what LoRA targeting and trainable-parameter counts use) and
//! the tensors a checkpoint must store for the loader ([`ModelConfig::layer_tensors`],
//! [`ModelConfig::global_tensors`]) and the total parameter count. Values that would make every
//! forward pass NaN (a norm epsilon or RoPE base ≤ 0), overflow size arithmetic (a width past
//! [`MAX_DIMENSION`]) or allocate per layer without bound (more than [`MAX_LAYERS`]) are refused
//! here. Must not: read weights or tokenizer files.

use serde::Serialize;
use serde_json::{Map, Value};

use crate::ops::RopeScaling;

/// A problem with one key of a config.json (the caller adds the file path).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    pub key: String,
    pub message: String,
}

impl ConfigError {
    fn new(key: &str, message: impl Into<String>) -> Self {
        Self {
            key: key.to_string(),
            message: message.into(),
        }
    }
}

type Parsed<T> = std::result::Result<T, ConfigError>;

/// The architectures peftpipe implements.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Architecture {
    /// Llama and its close relatives (Mistral without sliding window, Qwen2 with q/k/v bias).
    Llama,
    Gpt2,
}

/// A Llama-family decoder (`LlamaForCausalLM`, `Qwen2ForCausalLM`, `MistralForCausalLM`).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct LlamaConfig {
    pub model_type: String,
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub num_key_value_heads: usize,
    pub head_dim: usize,
    pub rms_norm_eps: f64,
    pub rope_theta: f64,
    #[serde(skip)]
    pub rope_scaling: Option<RopeScaling>,
    pub max_position_embeddings: usize,
    pub tie_word_embeddings: bool,
    /// Bias on q/k/v projections (`attention_bias` for Llama; always for Qwen2).
    pub qkv_bias: bool,
    /// Bias on the output projection (`attention_bias` for Llama; never for Qwen2).
    pub output_bias: bool,
    pub mlp_bias: bool,
    /// The sliding-window attention transformers applies (Mistral's `sliding_window`, Qwen2's
    /// with `use_sliding_window`), in positions; `None` when every layer attends to all keys.
    pub sliding_window: Option<usize>,
}

/// GPT-2's activation (`activation_function`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Gpt2Activation {
    /// `gelu_new` / `gelu_pytorch_tanh`: the tanh approximation.
    GeluTanh,
    /// `gelu`: the exact erf form.
    Gelu,
    Relu,
    Silu,
}

/// GPT-2 (`GPT2LMHeadModel`).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Gpt2Config {
    pub vocab_size: usize,
    pub n_positions: usize,
    pub n_embd: usize,
    pub n_layer: usize,
    pub n_head: usize,
    pub n_inner: usize,
    pub layer_norm_epsilon: f64,
    pub activation: Gpt2Activation,
    pub scale_attn_weights: bool,
    pub scale_attn_by_inverse_layer_idx: bool,
    pub tie_word_embeddings: bool,
}

/// A parsed config.json.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(tag = "architecture", rename_all = "lowercase")]
pub enum ModelConfig {
    Llama(LlamaConfig),
    Gpt2(Gpt2Config),
}

/// One linear layer, as the model builds it through the `LinearFactory`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct LinearSpec {
    /// Hugging Face module path, e.g. `model.layers.0.self_attn.q_proj`.
    pub path: String,
    pub in_features: usize,
    pub out_features: usize,
    pub bias: bool,
    /// `lm_head` whose weight is the token embedding table.
    pub tied_to_embeddings: bool,
}

impl LinearSpec {
    /// The last path component (`q_proj`, `c_attn`, `lm_head`).
    pub fn name(&self) -> &str {
        self.path.rsplit('.').next().unwrap_or(&self.path)
    }
}

/// The module path of the output layer.
const OUTPUT_LAYER_PATH: &str = "lm_head";

/// A tensor the loader reads from a checkpoint: its stored name and shape.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TensorSpec {
    pub name: String,
    pub shape: Vec<usize>,
}

impl TensorSpec {
    fn new(name: String, shape: Vec<usize>) -> Self {
        Self { name, shape }
    }
}

struct Keys<'a> {
    map: &'a Map<String, Value>,
}

impl<'a> Keys<'a> {
    fn value(&self, key: &str) -> Option<&'a Value> {
        self.map.get(key).filter(|value| !value.is_null())
    }

    fn usize(&self, key: &str) -> Parsed<usize> {
        self.optional_usize(key)?
            .ok_or_else(|| ConfigError::new(key, "missing (a positive integer is required)"))
    }

    fn optional_usize(&self, key: &str) -> Parsed<Option<usize>> {
        match self.value(key) {
            None => Ok(None),
            Some(value) => value
                .as_u64()
                .and_then(|v| usize::try_from(v).ok())
                .map(Some)
                .ok_or_else(|| {
                    ConfigError::new(
                        key,
                        format!("expected a non-negative integer, found {value}"),
                    )
                }),
        }
    }

    fn f64_or(&self, key: &str, default: f64) -> Parsed<f64> {
        match self.value(key) {
            None => Ok(default),
            Some(value) => value
                .as_f64()
                .ok_or_else(|| ConfigError::new(key, format!("expected a number, found {value}"))),
        }
    }

    fn bool_or(&self, key: &str, default: bool) -> Parsed<bool> {
        match self.value(key) {
            None => Ok(default),
            Some(value) => value.as_bool().ok_or_else(|| {
                ConfigError::new(key, format!("expected true/false, found {value}"))
            }),
        }
    }

    fn string(&self, key: &str) -> Option<&'a str> {
        self.value(key).and_then(Value::as_str)
    }
}

/// The largest width or count a config.json may give: products of two such values (a weight's
/// element count) cannot overflow, and nothing near it is a real model.
pub const MAX_DIMENSION: usize = (1 << 31) - 1;

/// The most layers a config.json may give. The deepest released models have under 200; per-layer
/// lists (linear layers, expected tensors) are built from this count, so `num_hidden_layers:
/// 10000000` must be refused before anything allocates for it.
pub const MAX_LAYERS: usize = 4096;

/// A positive layer count of at most [`MAX_LAYERS`].
fn layer_count(key: &str, value: usize) -> Parsed<usize> {
    let value = positive(key, value)?;
    if value > MAX_LAYERS {
        return Err(ConfigError::new(
            key,
            format!("{value} layers is implausibly many (at most {MAX_LAYERS})"),
        ));
    }
    Ok(value)
}

fn positive(key: &str, value: usize) -> Parsed<usize> {
    if value == 0 {
        return Err(ConfigError::new(key, "must be positive"));
    }
    if value > MAX_DIMENSION {
        return Err(ConfigError::new(
            key,
            format!("{value} is implausibly large (at most {MAX_DIMENSION})"),
        ));
    }
    Ok(value)
}

/// A float that must be finite and > 0 (norm epsilons, RoPE base and factors): 0 or a negative
/// value makes every forward pass NaN.
fn positive_number(key: &str, value: f64) -> Parsed<f64> {
    if !(value.is_finite() && value > 0.0) {
        return Err(ConfigError::new(
            key,
            format!("must be a positive number, found {value}"),
        ));
    }
    Ok(value)
}

fn parse_rope_scaling(keys: &Keys) -> Parsed<Option<RopeScaling>> {
    // transformers ≥ 4.5x: `rope_scaling`; v5 may use `rope_parameters` (with the type inside).
    let (key, scaling) = match (keys.value("rope_scaling"), keys.value("rope_parameters")) {
        (Some(value), _) => ("rope_scaling", value),
        (None, Some(value)) => ("rope_parameters", value),
        (None, None) => return Ok(None),
    };
    let Some(map) = scaling.as_object() else {
        return Err(ConfigError::new(
            key,
            format!("expected an object, found {scaling}"),
        ));
    };
    let inner = Keys { map };
    let kind = inner
        .string("rope_type")
        .or_else(|| inner.string("type"))
        .unwrap_or("default");
    let number = |name: &str| -> Parsed<f64> {
        let full = format!("{key}.{name}");
        let value = inner
            .value(name)
            .and_then(Value::as_f64)
            .ok_or_else(|| ConfigError::new(&full, "missing or not a number"))?;
        positive_number(&full, value)
    };
    match kind {
        "default" => Ok(None),
        "linear" => Ok(Some(RopeScaling::Linear {
            factor: number("factor")?,
        })),
        "llama3" => Ok(Some(RopeScaling::Llama3 {
            factor: number("factor")?,
            low_freq_factor: number("low_freq_factor")?,
            high_freq_factor: number("high_freq_factor")?,
            original_max_position_embeddings: number("original_max_position_embeddings")?,
        })),
        other => Err(ConfigError::new(
            &format!("{key}.rope_type"),
            format!("`{other}` is not supported (supported: default, linear, llama3)"),
        )),
    }
}

/// The sliding window transformers applies to a Llama-family `model_type` (`None`: no layer has
/// one). Mistral: `sliding_window`, MistralConfig's default 4096 when the key is absent, none
/// when it is `null` (v0.2 and later). Qwen2: none unless `use_sliding_window` is true, then
/// `sliding_window` (default 4096) on the layers `layer_types` marks `sliding_attention`, or
/// without it on the layers from `max_window_layers` (default 28) on. Llama has none (the key
/// is not read).
fn parse_sliding_window(keys: &Keys, model_type: &str, layers: usize) -> Parsed<Option<usize>> {
    let window = || -> Parsed<Option<usize>> {
        let window = if keys.map.contains_key("sliding_window") {
            keys.optional_usize("sliding_window")?
        } else {
            Some(4096)
        };
        window.map(|w| positive("sliding_window", w)).transpose()
    };
    match model_type {
        "mistral" => window(),
        "qwen2" if keys.bool_or("use_sliding_window", false)? => {
            let slides = match keys.value("layer_types").and_then(Value::as_array) {
                Some(types) => types
                    .iter()
                    .any(|kind| kind.as_str() == Some("sliding_attention")),
                None => keys.optional_usize("max_window_layers")?.unwrap_or(28) < layers,
            };
            if slides {
                window()
            } else {
                Ok(None)
            }
        }
        _ => Ok(None),
    }
}

fn parse_llama(keys: &Keys, model_type: &str) -> Parsed<LlamaConfig> {
    let hidden_size = positive("hidden_size", keys.usize("hidden_size")?)?;
    let num_attention_heads = positive("num_attention_heads", keys.usize("num_attention_heads")?)?;
    let num_key_value_heads = match keys.optional_usize("num_key_value_heads")? {
        Some(heads) => positive("num_key_value_heads", heads)?,
        None => num_attention_heads,
    };
    if num_key_value_heads == 0 || num_attention_heads % num_key_value_heads != 0 {
        return Err(ConfigError::new(
            "num_key_value_heads",
            format!(
                "{num_key_value_heads} does not divide num_attention_heads {num_attention_heads}"
            ),
        ));
    }
    let head_dim = match keys.optional_usize("head_dim")? {
        Some(head_dim) => head_dim,
        None if hidden_size % num_attention_heads == 0 => hidden_size / num_attention_heads,
        None => {
            return Err(ConfigError::new(
                "head_dim",
                "missing, and hidden_size is not a multiple of num_attention_heads",
            ))
        }
    };
    let head_dim = positive("head_dim", head_dim)?;
    if head_dim % 2 != 0 {
        return Err(ConfigError::new(
            "head_dim",
            format!("{head_dim} is odd; rotary embeddings rotate pairs of dimensions"),
        ));
    }
    if let Some(activation) = keys.string("hidden_act") {
        if activation != "silu" {
            return Err(ConfigError::new(
                "hidden_act",
                format!("`{activation}` is not supported for Llama-family models (only silu)"),
            ));
        }
    }
    let is_qwen2 = model_type == "qwen2";
    let attention_bias = keys.bool_or("attention_bias", false)?;
    let rope_theta = match keys
        .value("rope_parameters")
        .and_then(|p| p.get("rope_theta"))
    {
        Some(theta) if keys.value("rope_theta").is_none() => theta
            .as_f64()
            .ok_or_else(|| ConfigError::new("rope_parameters.rope_theta", "not a number"))?,
        _ => keys.f64_or("rope_theta", 10000.0)?,
    };
    let rope_theta = positive_number("rope_theta", rope_theta)?;
    let num_hidden_layers = layer_count("num_hidden_layers", keys.usize("num_hidden_layers")?)?;
    Ok(LlamaConfig {
        model_type: model_type.to_string(),
        vocab_size: positive("vocab_size", keys.usize("vocab_size")?)?,
        hidden_size,
        intermediate_size: positive("intermediate_size", keys.usize("intermediate_size")?)?,
        num_hidden_layers,
        num_attention_heads,
        num_key_value_heads,
        head_dim,
        rms_norm_eps: positive_number("rms_norm_eps", keys.f64_or("rms_norm_eps", 1e-6)?)?,
        rope_theta,
        rope_scaling: parse_rope_scaling(keys)?,
        max_position_embeddings: positive(
            "max_position_embeddings",
            keys.optional_usize("max_position_embeddings")?
                .unwrap_or(2048),
        )?,
        tie_word_embeddings: keys.bool_or("tie_word_embeddings", false)?,
        qkv_bias: is_qwen2 || attention_bias,
        output_bias: !is_qwen2 && attention_bias,
        mlp_bias: keys.bool_or("mlp_bias", false)?,
        sliding_window: parse_sliding_window(keys, model_type, num_hidden_layers)?,
    })
}

fn parse_gpt2(keys: &Keys) -> Parsed<Gpt2Config> {
    let n_embd = positive("n_embd", keys.usize("n_embd")?)?;
    let n_head = positive("n_head", keys.usize("n_head")?)?;
    if n_embd % n_head != 0 {
        return Err(ConfigError::new(
            "n_head",
            format!("n_embd {n_embd} is not a multiple of n_head {n_head}"),
        ));
    }
    let activation = match keys.string("activation_function").unwrap_or("gelu_new") {
        "gelu_new" | "gelu_pytorch_tanh" | "gelu_fast" => Gpt2Activation::GeluTanh,
        "gelu" => Gpt2Activation::Gelu,
        "relu" => Gpt2Activation::Relu,
        "silu" | "swish" => Gpt2Activation::Silu,
        other => {
            return Err(ConfigError::new(
                "activation_function",
                format!("`{other}` is not supported (gelu_new, gelu, relu, silu)"),
            ))
        }
    };
    Ok(Gpt2Config {
        vocab_size: positive("vocab_size", keys.usize("vocab_size")?)?,
        n_positions: positive("n_positions", keys.usize("n_positions")?)?,
        n_embd,
        n_layer: layer_count("n_layer", keys.usize("n_layer")?)?,
        n_head,
        n_inner: positive(
            "n_inner",
            keys.optional_usize("n_inner")?.unwrap_or(4 * n_embd),
        )?,
        layer_norm_epsilon: positive_number(
            "layer_norm_epsilon",
            keys.f64_or("layer_norm_epsilon", 1e-5)?,
        )?,
        activation,
        scale_attn_weights: keys.bool_or("scale_attn_weights", true)?,
        scale_attn_by_inverse_layer_idx: keys.bool_or("scale_attn_by_inverse_layer_idx", false)?,
        tie_word_embeddings: keys.bool_or("tie_word_embeddings", true)?,
    })
}

impl ModelConfig {
    /// Parse a config.json's contents. Dispatch on `model_type`, else on `architectures`.
    pub fn from_json(value: &Value) -> Parsed<Self> {
        let Some(map) = value.as_object() else {
            return Err(ConfigError::new("", "config.json must be a JSON object"));
        };
        let keys = Keys { map };
        let architectures: Vec<&str> = keys
            .value("architectures")
            .and_then(Value::as_array)
            .map(|list| list.iter().filter_map(Value::as_str).collect())
            .unwrap_or_default();
        let model_type = match keys.string("model_type") {
            Some(model_type) => model_type.to_string(),
            None => match architectures.first() {
                Some(&"LlamaForCausalLM") => "llama".to_string(),
                Some(&"Qwen2ForCausalLM") => "qwen2".to_string(),
                Some(&"MistralForCausalLM") => "mistral".to_string(),
                Some(&"GPT2LMHeadModel") => "gpt2".to_string(),
                _ => {
                    return Err(ConfigError::new(
                        "model_type",
                        format!(
                            "missing, and architectures {architectures:?} name no supported model"
                        ),
                    ))
                }
            },
        };
        match model_type.as_str() {
            // Mistral is Llama with a sliding window (see `ModelConfig::max_positions`).
            "llama" | "qwen2" | "mistral" => Ok(Self::Llama(parse_llama(&keys, &model_type)?)),
            "gpt2" => Ok(Self::Gpt2(parse_gpt2(&keys)?)),
            other => Err(ConfigError::new(
                "model_type",
                format!("`{other}` is not supported (supported: llama, qwen2, mistral, gpt2)"),
            )),
        }
    }

    pub fn architecture(&self) -> Architecture {
        match self {
            Self::Llama(_) => Architecture::Llama,
            Self::Gpt2(_) => Architecture::Gpt2,
        }
    }

    pub fn model_type(&self) -> &str {
        match self {
            Self::Llama(config) => &config.model_type,
            Self::Gpt2(_) => "gpt2",
        }
    }

    pub fn num_layers(&self) -> usize {
        match self {
            Self::Llama(config) => config.num_hidden_layers,
            Self::Gpt2(config) => config.n_layer,
        }
    }

    /// The config.json key holding the number of decoder layers.
    pub fn layer_count_key(&self) -> &'static str {
        match self {
            Self::Llama(_) => "num_hidden_layers",
            Self::Gpt2(_) => "n_layer",
        }
    }

    pub fn hidden_size(&self) -> usize {
        match self {
            Self::Llama(config) => config.hidden_size,
            Self::Gpt2(config) => config.n_embd,
        }
    }

    pub fn vocab_size(&self) -> usize {
        match self {
            Self::Llama(config) => config.vocab_size,
            Self::Gpt2(config) => config.vocab_size,
        }
    }

    pub fn num_attention_heads(&self) -> usize {
        match self {
            Self::Llama(config) => config.num_attention_heads,
            Self::Gpt2(config) => config.n_head,
        }
    }

    pub fn num_key_value_heads(&self) -> usize {
        match self {
            Self::Llama(config) => config.num_key_value_heads,
            Self::Gpt2(config) => config.n_head,
        }
    }

    pub fn head_dim(&self) -> usize {
        match self {
            Self::Llama(config) => config.head_dim,
            Self::Gpt2(config) => config.n_embd / config.n_head,
        }
    }

    /// `head_dim · num_key_value_heads`: the width of one layer's keys (prefix tuning's kv dim).
    pub fn kv_dim(&self) -> usize {
        self.head_dim() * self.num_key_value_heads()
    }

    /// The MLP's inner width.
    pub fn intermediate_size(&self) -> usize {
        match self {
            Self::Llama(config) => config.intermediate_size,
            Self::Gpt2(config) => config.n_inner,
        }
    }

    /// The longest position the model has embeddings for (GPT-2) or was trained to (Llama).
    ///
    /// A sliding window shorter than `max_position_embeddings` (Mistral v0.1, Qwen2 with
    /// `use_sliding_window`) is the context instead: peftpipe has no sliding-window attention,
    /// and up to the window full causal attention is exactly what transformers computes. Every
    /// sequence is kept within it (training refuses a longer `max_seq_len`, generation stops,
    /// evaluation cuts prompts as at any context length) and the model refuses a longer one.
    pub fn max_positions(&self) -> usize {
        match self {
            Self::Llama(config) => config
                .sliding_window
                .map_or(config.max_position_embeddings, |window| {
                    window.min(config.max_position_embeddings)
                }),
            Self::Gpt2(config) => config.n_positions,
        }
    }

    /// The config.json key of [`ModelConfig::max_positions`].
    pub fn max_positions_key(&self) -> &'static str {
        match self {
            Self::Llama(config)
                if config
                    .sliding_window
                    .is_some_and(|window| window < config.max_position_embeddings) =>
            {
                "sliding_window"
            }
            Self::Llama(_) => "max_position_embeddings",
            Self::Gpt2(_) => "n_positions",
        }
    }

    /// config.json's sliding window when it limits the context ([`Self::max_positions`]).
    pub fn limiting_sliding_window(&self) -> Option<usize> {
        (self.max_positions_key() == "sliding_window").then(|| self.max_positions())
    }

    pub fn tie_word_embeddings(&self) -> bool {
        match self {
            Self::Llama(config) => config.tie_word_embeddings,
            Self::Gpt2(config) => config.tie_word_embeddings,
        }
    }

    /// Every linear layer the model builds through its `LinearFactory`, in build order, with its
    /// Hugging Face module path (GPT-2 paths always carry the `transformer.` prefix).
    pub fn linear_layers(&self) -> Vec<LinearSpec> {
        let mut layers: Vec<LinearSpec> = (0..self.num_layers())
            .flat_map(|layer| self.layer_linear_layers(layer))
            .collect();
        layers.push(self.output_layer());
        layers
    }

    /// The linear layers of decoder layer `layer` (a slice of [`ModelConfig::linear_layers`]).
    pub fn layer_linear_layers(&self, layer: usize) -> Vec<LinearSpec> {
        let spec = |path: String, in_features, out_features, bias| LinearSpec {
            path,
            in_features,
            out_features,
            bias,
            tied_to_embeddings: false,
        };
        match self {
            Self::Llama(c) => {
                let q = c.num_attention_heads * c.head_dim;
                let kv = c.num_key_value_heads * c.head_dim;
                let (h, m) = (c.hidden_size, c.intermediate_size);
                let attn = format!("model.layers.{layer}.self_attn");
                let mlp = format!("model.layers.{layer}.mlp");
                vec![
                    spec(format!("{attn}.q_proj"), h, q, c.qkv_bias),
                    spec(format!("{attn}.k_proj"), h, kv, c.qkv_bias),
                    spec(format!("{attn}.v_proj"), h, kv, c.qkv_bias),
                    spec(format!("{attn}.o_proj"), q, h, c.output_bias),
                    spec(format!("{mlp}.gate_proj"), h, m, c.mlp_bias),
                    spec(format!("{mlp}.up_proj"), h, m, c.mlp_bias),
                    spec(format!("{mlp}.down_proj"), m, h, c.mlp_bias),
                ]
            }
            Self::Gpt2(c) => {
                let h = c.n_embd;
                let block = format!("transformer.h.{layer}");
                vec![
                    spec(format!("{block}.attn.c_attn"), h, 3 * h, true),
                    spec(format!("{block}.attn.c_proj"), h, h, true),
                    spec(format!("{block}.mlp.c_fc"), h, c.n_inner, true),
                    spec(format!("{block}.mlp.c_proj"), c.n_inner, h, true),
                ]
            }
        }
    }

    /// The output layer (`lm_head`), the last of [`ModelConfig::linear_layers`].
    pub fn output_layer(&self) -> LinearSpec {
        LinearSpec {
            path: OUTPUT_LAYER_PATH.to_string(),
            in_features: self.hidden_size(),
            out_features: self.vocab_size(),
            bias: false,
            tied_to_embeddings: self.tie_word_embeddings(),
        }
    }

    /// Where the tensors of decoder layer `N` are stored: the name prefix before `N`
    /// (`model.layers.`, or `{root}h.` for GPT-2, whose checkpoints may lack the `transformer.`
    /// root: see [`ModelConfig::checkpoint_root`]).
    pub fn layer_name_prefix(&self, root: &str) -> String {
        match self {
            Self::Llama(_) => "model.layers.".to_string(),
            Self::Gpt2(_) => format!("{root}h."),
        }
    }

    /// The prefix the loader reads GPT-2 tensors under, given the stored names (`transformer.` when
    /// the checkpoint has `transformer.wte.weight`, else none); empty for Llama, whose names
    /// always start with `model.`.
    pub fn checkpoint_root(&self, has_tensor: impl Fn(&str) -> bool) -> &'static str {
        match self {
            Self::Gpt2(_) if has_tensor("transformer.wte.weight") => "transformer.",
            _ => "",
        }
    }

    /// The tensors the loader reads for decoder layer `layer`, named and shaped as the checkpoint
    /// stores them (GPT-2's Conv1D weights `[in, out]`), under `root` ([`ModelConfig::checkpoint_root`]).
    pub fn layer_tensors(&self, layer: usize, root: &str) -> Vec<TensorSpec> {
        let hidden = self.hidden_size();
        let prefix = format!("{}{layer}.", self.layer_name_prefix(root));
        let mut tensors = Vec::new();
        let norms: &[&str] = match self {
            Self::Llama(_) => &["input_layernorm.weight", "post_attention_layernorm.weight"],
            Self::Gpt2(_) => &["ln_1.weight", "ln_1.bias", "ln_2.weight", "ln_2.bias"],
        };
        for norm in norms {
            tensors.push(TensorSpec::new(format!("{prefix}{norm}"), vec![hidden]));
        }
        let conv1d = matches!(self, Self::Gpt2(_));
        for linear in self.layer_linear_layers(layer) {
            // The module path after `model.layers.N.` / `transformer.h.N.`.
            let local = linear
                .path
                .splitn(4, '.')
                .nth(3)
                .unwrap_or(linear.path.as_str());
            let shape = if conv1d {
                vec![linear.in_features, linear.out_features]
            } else {
                vec![linear.out_features, linear.in_features]
            };
            tensors.push(TensorSpec::new(format!("{prefix}{local}.weight"), shape));
            if linear.bias {
                tensors.push(TensorSpec::new(
                    format!("{prefix}{local}.bias"),
                    vec![linear.out_features],
                ));
            }
        }
        tensors
    }

    /// The tensors the loader reads outside the decoder layers: embeddings, the final norm and an
    /// untied output layer (`lm_head.weight`, never under `root`).
    pub fn global_tensors(&self, root: &str) -> Vec<TensorSpec> {
        let (vocab, hidden) = (self.vocab_size(), self.hidden_size());
        let mut tensors = match self {
            Self::Llama(_) => vec![
                TensorSpec::new("model.embed_tokens.weight".into(), vec![vocab, hidden]),
                TensorSpec::new("model.norm.weight".into(), vec![hidden]),
            ],
            Self::Gpt2(c) => vec![
                TensorSpec::new(format!("{root}wte.weight"), vec![vocab, hidden]),
                TensorSpec::new(format!("{root}wpe.weight"), vec![c.n_positions, hidden]),
                TensorSpec::new(format!("{root}ln_f.weight"), vec![hidden]),
                TensorSpec::new(format!("{root}ln_f.bias"), vec![hidden]),
            ],
        };
        if !self.tie_word_embeddings() {
            tensors.push(TensorSpec::new(
                format!("{OUTPUT_LAYER_PATH}.weight"),
                vec![vocab, hidden],
            ));
        }
        tensors
    }

    /// Total parameters as transformers counts them (a tied head counted once); `None` when the
    /// count does not fit in 64 bits (a config.json with absurd sizes: checked, never wrapped).
    pub fn parameter_count(&self) -> Option<u64> {
        let wide = |value: usize| u64::try_from(value).ok();
        let mut total = 0u64;
        for layer in self.linear_layers() {
            if layer.tied_to_embeddings {
                continue;
            }
            let (inputs, outputs) = (wide(layer.in_features)?, wide(layer.out_features)?);
            let bias = if layer.bias { outputs } else { 0 };
            total = total.checked_add(inputs.checked_mul(outputs)?.checked_add(bias)?)?;
        }
        let hidden = wide(self.hidden_size())?;
        let embeddings = wide(self.vocab_size())?.checked_mul(hidden)?;
        let layer_norms = wide(self.num_layers())?.checked_mul(2)?.checked_add(1)?;
        let norms = match self {
            // input + post-attention RMSNorm per layer, final norm (weights only).
            Self::Llama(_) => layer_norms.checked_mul(hidden)?,
            // ln_1, ln_2 per layer and ln_f (weight + bias), learned positions.
            Self::Gpt2(c) => layer_norms
                .checked_mul(2)?
                .checked_mul(hidden)?
                .checked_add(wide(c.n_positions)?.checked_mul(hidden)?)?,
        };
        total.checked_add(embeddings)?.checked_add(norms)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn llama_3_2_1b() -> Value {
        serde_json::json!({
            "architectures": ["LlamaForCausalLM"], "model_type": "llama", "head_dim": 64,
            "hidden_act": "silu", "hidden_size": 2048, "intermediate_size": 8192,
            "max_position_embeddings": 131072, "num_attention_heads": 32, "num_hidden_layers": 16,
            "num_key_value_heads": 8, "rms_norm_eps": 1e-5, "rope_theta": 500000.0,
            "rope_scaling": {"factor": 32.0, "high_freq_factor": 4.0, "low_freq_factor": 1.0,
                "original_max_position_embeddings": 8192, "rope_type": "llama3"},
            "tie_word_embeddings": true, "vocab_size": 128256
        })
    }

    #[test]
    fn llama_3_2_1b_parameter_count_matches_transformers() {
        let config = ModelConfig::from_json(&llama_3_2_1b()).expect("valid config");
        // transformers: sum(p.numel() for p in model.parameters()) = 1,235,814,400.
        assert_eq!(config.parameter_count(), Some(1_235_814_400));
        assert_eq!(config.kv_dim(), 512);
        assert_eq!(config.linear_layers().len(), 16 * 7 + 1);
    }

    /// The tensors validation expects are exactly those a random-init checkpoint stores (the
    /// loader reads both), with the same shapes, for every layout variant.
    #[test]
    fn expected_tensors_match_what_a_checkpoint_stores() {
        let llama = |extra: Value| {
            let mut config = serde_json::json!({"model_type": "llama", "hidden_size": 16,
                "intermediate_size": 24, "num_hidden_layers": 2, "num_attention_heads": 4,
                "num_key_value_heads": 2, "vocab_size": 40});
            for (key, value) in extra.as_object().unwrap() {
                config[key] = value.clone();
            }
            config
        };
        let configs = [
            llama(serde_json::json!({})),
            llama(
                serde_json::json!({"tie_word_embeddings": true, "attention_bias": true,
                "mlp_bias": true}),
            ),
            llama(serde_json::json!({"model_type": "qwen2"})),
            serde_json::json!({"model_type": "gpt2", "n_embd": 8, "n_layer": 2, "n_head": 2,
                "n_positions": 16, "vocab_size": 10}),
            serde_json::json!({"model_type": "gpt2", "n_embd": 8, "n_layer": 1, "n_head": 2,
                "n_positions": 16, "vocab_size": 10, "tie_word_embeddings": false}),
        ];
        for value in configs {
            let config = ModelConfig::from_json(&value).unwrap();
            let stored = crate::models::random::random_weights(
                &config,
                0,
                0.02,
                candle_core::DType::F32,
                &candle_core::Device::Cpu,
            )
            .unwrap();
            let mut stored: Vec<(String, Vec<usize>)> = stored
                .iter()
                .map(|(name, tensor)| (name.clone(), tensor.dims().to_vec()))
                .collect();
            stored.sort();
            let root = config.checkpoint_root(|name| stored.iter().any(|(n, _)| n == name));
            let mut expected: Vec<(String, Vec<usize>)> = config
                .global_tensors(root)
                .into_iter()
                .chain((0..config.num_layers()).flat_map(|i| config.layer_tensors(i, root)))
                .map(|spec| (spec.name, spec.shape))
                .collect();
            expected.sort();
            assert_eq!(expected, stored, "{value}");
        }
    }

    /// Probe item: Mistral loaded as Llama. Its sliding window is what transformers applies:
    /// MistralConfig's default 4096 when config.json has no `sliding_window` key (it was taken
    /// as no window), none for `null` (v0.2+); Qwen2's only with `use_sliding_window: true` on
    /// layers from `max_window_layers` on. A window shorter than `max_position_embeddings` is
    /// the context peftpipe computes exactly (it has no sliding-window attention), and a window
    /// was refused outright before.
    #[test]
    fn sliding_windows_are_read_as_transformers_reads_them() {
        let with = |model_type: &str, extra: Value| {
            let mut value = llama_3_2_1b();
            value["model_type"] = serde_json::json!(model_type);
            value["max_position_embeddings"] = serde_json::json!(32768);
            for (key, item) in extra.as_object().unwrap() {
                value[key] = item.clone();
            }
            if extra.get("sliding_window") == Some(&serde_json::json!("absent")) {
                value.as_object_mut().unwrap().remove("sliding_window");
            }
            let config = ModelConfig::from_json(&value).unwrap();
            let ModelConfig::Llama(llama) = &config else {
                panic!("a Llama-family config")
            };
            (
                llama.sliding_window,
                config.max_positions(),
                config.max_positions_key(),
            )
        };
        let full = (None, 32768, "max_position_embeddings");
        assert_eq!(
            with("mistral", serde_json::json!({"sliding_window": "absent"})),
            (Some(4096), 4096, "sliding_window")
        );
        assert_eq!(
            with("mistral", serde_json::json!({"sliding_window": null})),
            full
        );
        assert_eq!(
            with("mistral", serde_json::json!({"sliding_window": 4096})),
            (Some(4096), 4096, "sliding_window")
        );
        // A window no shorter than the context changes nothing.
        assert_eq!(
            with("mistral", serde_json::json!({"sliding_window": 32768})).1,
            32768
        );
        assert_eq!(
            with("qwen2", serde_json::json!({"sliding_window": 4096})),
            full
        );
        assert_eq!(
            with(
                "qwen2",
                serde_json::json!({"sliding_window": 4096, "use_sliding_window": false})
            ),
            full
        );
        // max_window_layers: layers below it attend fully; 16 layers, so 16 means none slides.
        assert_eq!(
            with(
                "qwen2",
                serde_json::json!({"sliding_window": 4096, "use_sliding_window": true,
                    "max_window_layers": 16})
            ),
            full
        );
        assert_eq!(
            with(
                "qwen2",
                serde_json::json!({"sliding_window": 4096, "use_sliding_window": true,
                    "max_window_layers": 8})
            ),
            (Some(4096), 4096, "sliding_window")
        );
        // Llama has no sliding window in transformers: the key is not read.
        assert_eq!(
            with("llama", serde_json::json!({"sliding_window": 4096})),
            full
        );
        let mut value = llama_3_2_1b();
        value["model_type"] = serde_json::json!("mistral");
        value["sliding_window"] = serde_json::json!(0);
        assert_eq!(
            ModelConfig::from_json(&value).unwrap_err().key,
            "sliding_window"
        );
    }

    #[test]
    fn values_that_make_every_forward_nan_or_overflow_are_refused() {
        let mut value = llama_3_2_1b();
        value["rms_norm_eps"] = serde_json::json!(-1);
        assert_eq!(
            ModelConfig::from_json(&value).unwrap_err().key,
            "rms_norm_eps"
        );
        let mut value = llama_3_2_1b();
        value["rope_theta"] = serde_json::json!(0);
        assert_eq!(
            ModelConfig::from_json(&value).unwrap_err().key,
            "rope_theta"
        );
        let mut value = llama_3_2_1b();
        value["rope_scaling"]["factor"] = serde_json::json!(-2.0);
        assert_eq!(
            ModelConfig::from_json(&value).unwrap_err().key,
            "rope_scaling.factor"
        );
        let mut value = llama_3_2_1b();
        value["num_hidden_layers"] = serde_json::json!(10_000_000);
        let error = ModelConfig::from_json(&value).unwrap_err();
        assert_eq!(error.key, "num_hidden_layers");
        assert!(error.message.contains("at most 4096"), "{}", error.message);
        let mut value = llama_3_2_1b();
        value["vocab_size"] = serde_json::json!(u64::MAX);
        assert!(ModelConfig::from_json(&value)
            .unwrap_err()
            .message
            .contains("implausibly large"));
        let gpt2 = serde_json::json!({"model_type": "gpt2", "n_embd": 8, "n_layer": 1,
            "n_head": 2, "n_positions": 16, "vocab_size": 10, "layer_norm_epsilon": 0.0});
        assert_eq!(
            ModelConfig::from_json(&gpt2).unwrap_err().key,
            "layer_norm_epsilon"
        );
    }

    #[test]
    fn unknown_model_type_names_the_key() {
        let error = ModelConfig::from_json(&serde_json::json!({"model_type": "bert"}))
            .expect_err("bert is not supported");
        assert_eq!(error.key, "model_type");
    }

    #[test]
    fn qwen2_has_qkv_bias_but_no_output_bias() {
        let mut value = llama_3_2_1b();
        value["model_type"] = "qwen2".into();
        let Ok(ModelConfig::Llama(config)) = ModelConfig::from_json(&value) else {
            panic!("qwen2 parses as a Llama-family config")
        };
        assert!(config.qkv_bias && !config.output_bias);
    }
}
