//! Prefix tuning (Li & Liang 2021) with Hugging Face PEFT's semantics: per layer, `n` trainable
//! key and value positions prepended to that layer's keys/values (the model's
//! `Hooks::layer_prefix`: no RoPE on them, real tokens' positions start after them, as PEFT passes
//! `past_key_values`). The prefix table is `[n, layers · 2 · kv_dim]` viewed as
//! `(n, 2·layers, kv_heads, head_dim)`; entry `2i` is layer i's keys, `2i+1` its values. Widths
//! follow the key/value heads (GQA): PEFT's `token_dim` is `kv_heads · head_dim`.
//! With `prefix_projection` the table is reparameterized as PEFT's `PrefixEncoder` does:
//! `embedding [n, token_dim] → Linear(token_dim, encoder_hidden_size) → tanh →
//! Linear(encoder_hidden_size, layers · 2 · token_dim)`; what is saved is the projected table
//! (PEFT's `get_prompt_embedding_to_save`, loaded with `inference_mode: true`).
//! On disk: one tensor `prompt_embeddings` `[n, layers · 2 · token_dim]`. Init as PyTorch's: the
//! embedding standard normal, linear layers Kaiming-uniform(a = √5) with uniform biases.
//! Never reads pipeline files, never prints.

use std::path::Path;
use std::sync::OnceLock;

use candle_core::{DType, Device, Tensor, Var};
use serde_json::{json, Value};

use super::format::{write_adapter_folder, AdapterFiles, PROMPT_EMBEDDINGS};
use super::{
    live, mix_seed, standard_normal, Adapter, AdapterMode, PeftError, TensorContext, Training,
};
use crate::config::method::PrefixInit;
use crate::models::{CausalLm, Hooks};

/// Prefix tuning hyperparameters.
#[derive(Debug, Clone)]
pub struct PrefixTuningSettings {
    pub num_virtual_tokens: usize,
    pub prefix_projection: bool,
    /// Hidden width of the projection MLP (default: `token_dim`).
    pub encoder_hidden_size: Option<usize>,
    /// How the table starts (without projection).
    pub init: PrefixInit,
    pub seed: u64,
}

enum Source {
    Init(PrefixTuningSettings),
    Loaded {
        table: Tensor,
        files: String,
        config: Value,
    },
}

/// The model's layout of keys/values.
#[derive(Debug, Clone, Copy)]
struct KvShape {
    layers: usize,
    kv_heads: usize,
    head_dim: usize,
}

impl KvShape {
    fn token_dim(&self) -> usize {
        self.kv_heads * self.head_dim
    }
    fn table_width(&self) -> usize {
        self.layers * 2 * self.token_dim()
    }
}

/// The trainable parameters: the table itself, or the reparameterization.
enum Parameters {
    Table(Var),
    Projected {
        embedding: Var,
        first: (Var, Var),
        second: (Var, Var),
    },
}

/// A prefix-tuning adapter.
pub struct PrefixTuningAdapter {
    source: Source,
    device: Device,
    training: Training,
    state: OnceLock<(Parameters, KvShape)>,
}

/// PyTorch's `nn.Linear` init: weight and bias uniform in ±1/√in.
fn linear_init(
    seed: u64,
    out: usize,
    input: usize,
    device: &Device,
) -> candle_core::Result<(Var, Var)> {
    use rand::{Rng, SeedableRng};
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    let bound = 1.0 / (input as f64).sqrt();
    let mut draw = |count: usize| -> Vec<f32> {
        (0..count)
            .map(|_| ((rng.random::<f64>() * 2.0 - 1.0) * bound) as f32)
            .collect()
    };
    let weight = Tensor::from_vec(draw(out * input), (out, input), device)?;
    let bias = Tensor::from_vec(draw(out), out, device)?;
    Ok((Var::from_tensor(&weight)?, Var::from_tensor(&bias)?))
}

/// The table of the model's own keys/values for `n` uniformly drawn tokens: what the model
/// computes when those tokens lead the sequence (cached keys carry their RoPE rotation, which is
/// what a position-free prefix key needs to act like the token at that position).
fn vocab_activations(
    model: &dyn CausalLm,
    shape: KvShape,
    n: usize,
    seed: u64,
) -> candle_core::Result<Tensor> {
    use rand::{Rng, SeedableRng};
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    let vocab = model.config().vocab_size() as u32;
    let ids: Vec<u32> = (0..n).map(|_| rng.random_range(0..vocab)).collect();
    let ids = Tensor::from_vec(ids, (1, n), model.device())?;
    let mut cache = model.new_cache();
    model.forward_hidden(&ids, None, &Hooks::none(), Some(&mut cache))?;
    let mut parts = Vec::with_capacity(2 * shape.layers);
    for layer in 0..shape.layers {
        let Some((key, value)) = cache.layer(layer) else {
            candle_core::bail!("the model cached no keys/values for layer {layer}")
        };
        for tensor in [key, value] {
            // [1, kv_heads, n, head_dim] → [n, 1, kv_heads, head_dim]
            parts.push(tensor.squeeze(0)?.transpose(0, 1)?.unsqueeze(1)?);
        }
    }
    Tensor::cat(&parts, 1)?.reshape((n, shape.table_width()))
}

impl PrefixTuningAdapter {
    pub fn new(settings: PrefixTuningSettings, device: &Device) -> Result<Self, PeftError> {
        if settings.num_virtual_tokens == 0 {
            return Err(PeftError::invalid(
                "prefix tuning needs at least one virtual token",
            ));
        }
        if settings.encoder_hidden_size == Some(0) {
            return Err(PeftError::invalid(
                "prefix tuning encoder_hidden_size must be at least 1",
            ));
        }
        Ok(PrefixTuningAdapter {
            source: Source::Init(settings),
            device: device.clone(),
            training: Training::new(true),
            state: OnceLock::new(),
        })
    }

    /// Load PEFT's PREFIX_TUNING folder (the projected table; inference mode).
    pub fn load(dir: &Path, device: &Device) -> Result<Self, PeftError> {
        let mut files = AdapterFiles::read(dir, device)?;
        let (table, rows, _) = files.take_prompt_embeddings()?;
        if files
            .config
            .get("num_virtual_tokens")
            .and_then(Value::as_u64)
            .is_some_and(|n| n as usize != rows)
        {
            return Err(files.config_error(format!(
                "num_virtual_tokens does not match prompt_embeddings' {rows} rows"
            )));
        }
        Ok(PrefixTuningAdapter {
            source: Source::Loaded {
                table,
                files: files.weights_path.display().to_string(),
                config: files.config,
            },
            device: device.clone(),
            training: Training::new(false),
            state: OnceLock::new(),
        })
    }

    fn state(&self) -> Result<&(Parameters, KvShape), PeftError> {
        self.state
            .get()
            .ok_or_else(|| PeftError::invalid("prefix tuning used before finish_injection"))
    }

    /// The prefix table `[n, layers · 2 · token_dim]` (projected when reparameterized).
    fn table(&self) -> Result<Tensor, PeftError> {
        let training = self.training.get();
        let (parameters, _) = self.state()?;
        match parameters {
            Parameters::Table(var) => Ok(live(var, training)),
            Parameters::Projected {
                embedding,
                first,
                second,
            } => {
                let linear = |x: &Tensor, (weight, bias): &(Var, Var)| {
                    x.matmul(&live(weight, training).t()?)?
                        .broadcast_add(&live(bias, training))
                };
                let project =
                    || linear(&linear(&live(embedding, training), first)?.tanh()?, second);
                project().context(|| "projecting the prefix".into())
            }
        }
    }

    fn peft_config(&self, base_model_name_or_path: &str) -> Result<Value, PeftError> {
        let (_, shape) = self.state()?;
        let (n, projection, encoder) = match &self.source {
            Source::Init(settings) => (
                settings.num_virtual_tokens,
                settings.prefix_projection,
                settings.encoder_hidden_size.unwrap_or(shape.token_dim()),
            ),
            Source::Loaded { table, config, .. } => (
                table.dim(0).context(|| "prompt_embeddings".into())?,
                config
                    .get("prefix_projection")
                    .and_then(Value::as_bool)
                    .unwrap_or(false),
                config
                    .get("encoder_hidden_size")
                    .and_then(Value::as_u64)
                    .map_or(shape.token_dim(), |v| v as usize),
            ),
        };
        Ok(json!({
            "auto_mapping": null,
            "base_model_name_or_path": base_model_name_or_path,
            "encoder_hidden_size": encoder,
            "inference_mode": true,
            "init_weights": null,
            "modules_to_save": null,
            "num_attention_heads": shape.kv_heads,
            "num_layers": shape.layers,
            "num_transformer_submodules": 1,
            "num_virtual_tokens": n,
            "peft_type": "PREFIX_TUNING",
            "prefix_projection": projection,
            "revision": null,
            "task_type": "CAUSAL_LM",
            "token_dim": shape.token_dim(),
        }))
    }
}

impl Adapter for PrefixTuningAdapter {
    fn peft_type(&self) -> &'static str {
        "PREFIX_TUNING"
    }

    fn finish_injection(&self, model: &dyn CausalLm) -> Result<(), PeftError> {
        let config = model.config();
        let shape = KvShape {
            layers: config.num_layers(),
            kv_heads: config.num_key_value_heads(),
            head_dim: config.head_dim(),
        };
        let device = &self.device;
        let parameters = match &self.source {
            Source::Init(settings) => {
                let n = settings.num_virtual_tokens;
                let seed = |label: &str| mix_seed(settings.seed, label);
                if settings.prefix_projection {
                    let token_dim = shape.token_dim();
                    let hidden = settings.encoder_hidden_size.unwrap_or(token_dim);
                    let embedding = Tensor::from_vec(
                        standard_normal(seed("prefix embedding"), n * token_dim),
                        (n, token_dim),
                        device,
                    )
                    .and_then(|t| Var::from_tensor(&t))
                    .context(|| "initialising the prefix embedding".into())?;
                    Parameters::Projected {
                        embedding,
                        first: linear_init(seed("prefix transform 0"), hidden, token_dim, device)
                            .context(|| "initialising the prefix MLP".into())?,
                        second: linear_init(
                            seed("prefix transform 2"),
                            shape.table_width(),
                            hidden,
                            device,
                        )
                        .context(|| "initialising the prefix MLP".into())?,
                    }
                } else {
                    let table = match settings.init {
                        PrefixInit::Random => Tensor::from_vec(
                            standard_normal(seed("prefix table"), n * shape.table_width()),
                            (n, shape.table_width()),
                            device,
                        ),
                        PrefixInit::SampleVocab => {
                            vocab_activations(model, shape, n, seed("prefix sample_vocab"))
                        }
                    }
                    .and_then(|t| t.to_device(device)?.to_dtype(DType::F32))
                    .and_then(|t| Var::from_tensor(&t))
                    .context(|| "initialising the prefix".into())?;
                    Parameters::Table(table)
                }
            }
            Source::Loaded { table, files, .. } => {
                let width = table.dim(1).context(|| files.clone())?;
                if width != shape.table_width() {
                    return Err(PeftError::invalid(format!(
                        "{files}: prompt_embeddings are {width} wide; this model needs {} layers × 2 × {} (key/value width) = {}",
                        shape.layers,
                        shape.token_dim(),
                        shape.table_width()
                    )));
                }
                Parameters::Table(
                    table
                        .to_device(device)
                        .and_then(|t| Var::from_tensor(&t))
                        .context(|| "placing prompt_embeddings".into())?,
                )
            }
        };
        self.state
            .set((parameters, shape))
            .map_err(|_| PeftError::invalid("prefix tuning injected twice"))
    }

    fn hooks(&self) -> Result<Hooks, PeftError> {
        let (_, shape) = self.state()?;
        let table = self.table()?;
        let build = || -> candle_core::Result<Vec<(Tensor, Tensor)>> {
            let n = table.dim(0)?;
            let table = table.reshape((n, 2 * shape.layers, shape.kv_heads, shape.head_dim))?;
            let pick = |index: usize| -> candle_core::Result<Tensor> {
                table
                    .narrow(1, index, 1)?
                    .squeeze(1)?
                    .transpose(0, 1)?
                    .contiguous()?
                    .unsqueeze(0)
            };
            (0..shape.layers)
                .map(|layer| Ok((pick(2 * layer)?, pick(2 * layer + 1)?)))
                .collect()
        };
        Ok(Hooks {
            layer_prefix: Some(build().context(|| "splitting the prefix per layer".into())?),
            ..Hooks::default()
        })
    }

    fn trainable_vars(&self) -> Vec<(String, Var)> {
        let Some((parameters, _)) = self.state.get() else {
            return Vec::new();
        };
        let mut vars = match parameters {
            Parameters::Table(var) => vec![(PROMPT_EMBEDDINGS.to_string(), var.clone())],
            Parameters::Projected {
                embedding,
                first,
                second,
            } => vec![
                ("prompt_encoder.embedding.weight".into(), embedding.clone()),
                ("prompt_encoder.transform.0.weight".into(), first.0.clone()),
                ("prompt_encoder.transform.0.bias".into(), first.1.clone()),
                ("prompt_encoder.transform.2.weight".into(), second.0.clone()),
                ("prompt_encoder.transform.2.bias".into(), second.1.clone()),
            ],
        };
        vars.sort_by(|a, b| a.0.cmp(&b.0));
        vars
    }

    fn set_mode(&self, mode: AdapterMode) {
        self.training.set(mode);
    }

    fn save(&self, dir: &Path, base_model_name_or_path: &str) -> Result<(), PeftError> {
        let table = self.table()?.detach();
        write_adapter_folder(
            dir,
            &self.peft_config(base_model_name_or_path)?,
            &[(PROMPT_EMBEDDINGS.to_string(), table)],
        )
    }
}
