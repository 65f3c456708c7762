//! PEFT's auxiliary trainable modules, for any method whose config carries them (LoRA, QLoRA,
//! IA3): `trainable_token_indices` (PEFT's `TrainableTokensWrapper`: only the chosen rows of the
//! input embedding train, and a tied `lm_head` follows them) and `modules_to_save` (PEFT's
//! `ModulesToSaveWrapper`: a full trainable copy of `lm_head`, of the input embedding or of
//! normalization layers — RMSNorm's weight, LayerNorm's weight and bias).
//!
//! [`WithAuxiliary`] wraps the method's adapter and is itself an [`Adapter`], so the trainer,
//! evaluation, generation and export see the extra rows through the same trait: the embedding
//! rows enter every forward pass as the model's [`Hooks::embedding_rows`], trained norm copies as
//! its [`Hooks::norms`] (`norms::TrainedNorm`), `lm_head` is wrapped through the linear factory
//! (`head::AuxiliaryHead`), the variables join the method's, and merging yields row patches of
//! the embedding / `lm_head` weights and whole-tensor patches of the norms.
//!
//! On disk, exactly as PEFT writes them (`peft.utils.save_and_load.get_peft_model_state_dict`
//! with `TrainableTokensWrapper.adapter_state_dict` and `ModulesToSaveWrapper.adapter_state_dict`,
//! adapter name removed): `base_model.model.<module>.token_adapter.trainable_tokens_delta`
//! (`[n, hidden]`: despite its name, the trained rows themselves, initialised from the base rows —
//! `TrainableTokensLayer.update_layer`), nothing for a tied `lm_head` (it shares the embedding's
//! tensor), and `base_model.model.<module>.weight` (and a LayerNorm's `.bias`) for a module to
//! save (checked against what PEFT 0.21 writes: tests/fixtures/peft_auxiliary);
//! `adapter_config.json` keeps `trainable_token_indices` and `modules_to_save` as written. Which
//! modules the names select, and every check, is `config::auxiliary::resolve` (PEFT's rules),
//! shared with `peftpipe validate`. Never prints.

mod head;
mod norms;
mod rows;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, OnceLock};

use candle_core::{Device, Tensor, Var};
use serde_json::Value;

use self::head::{AuxiliaryHead, HeadRows};
use self::norms::TrainedNorm;
use self::rows::TrainedRows;
use super::format::{write_adapter_folder, AdapterFiles, PEFT_PREFIX};
use super::{Adapter, AdapterMode, Parameter, PeftError, Training, WeightPatch};
use crate::config::auxiliary::{resolve, ResolvedAuxiliary, TrainableTokenIndices};
use crate::config::method::MethodConfig;
use crate::models::quantized::BaseQuantization;
use crate::models::{
    CausalLm, EmbeddingRows, Hooks, LinearFactory, LinearLayer, LinearWeights,
    QuantizedLinearWeights,
};

pub use rows::{TOKEN_DELTA_SUFFIX, WHOLE_WEIGHT_SUFFIX};

/// The suffix of a trained LayerNorm copy's bias (its `state_dict` key).
const NORM_BIAS_SUFFIX: &str = ".bias";

/// The config keys PEFT writes for the two features.
const TOKENS_KEY: &str = "trainable_token_indices";
const MODULES_KEY: &str = "modules_to_save";

/// What a method config (or an adapter_config.json) asks for, as written.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct AuxiliarySpec {
    pub trainable_token_indices: Option<TrainableTokenIndices>,
    pub modules_to_save: Option<Vec<String>>,
}

impl AuxiliarySpec {
    /// The fields of a pipeline's method config; `None` when it asks for neither.
    pub fn from_method(method: &MethodConfig) -> Option<Self> {
        let (tokens, modules) = method.auxiliary();
        let spec = AuxiliarySpec {
            trainable_token_indices: tokens.cloned(),
            modules_to_save: modules.map(<[String]>::to_vec),
        };
        (!spec.is_empty()).then_some(spec)
    }

    /// The fields of a parsed adapter_config.json (`null` or absent: not asked).
    pub fn from_peft_config(config: &Value, path: &Path) -> Result<Self, PeftError> {
        let field = |key: &str| config.get(key).filter(|value| !value.is_null());
        let invalid = |key: &str, error: serde_json::Error| {
            PeftError::invalid(format!("{}: `{key}`: {error}", path.display()))
        };
        // PEFT's `ensure_weight_tying` ties a tied head to a trained copy of the embedding
        // (`modules_to_tie`); peftpipe keeps PEFT's default, where the head keeps the base weights.
        if field("ensure_weight_tying").and_then(Value::as_bool) == Some(true)
            && field(MODULES_KEY).is_some()
        {
            return Err(PeftError::invalid(format!(
                "{}: `ensure_weight_tying: true` with `{MODULES_KEY}` is not supported (peftpipe trains a copy of a tied embedding without tying lm_head to it, PEFT's default)",
                path.display()
            )));
        }
        Ok(AuxiliarySpec {
            trainable_token_indices: field(TOKENS_KEY)
                .map(|value| serde_json::from_value(value.clone()))
                .transpose()
                .map_err(|error| invalid(TOKENS_KEY, error))?,
            modules_to_save: field(MODULES_KEY)
                .map(|value| match value {
                    // PEFT accepts one name as a string in some configs.
                    Value::String(name) => Ok(vec![name.clone()]),
                    other => serde_json::from_value(other.clone()),
                })
                .transpose()
                .map_err(|error| invalid(MODULES_KEY, error))?,
        })
    }

    pub fn is_empty(&self) -> bool {
        self.trainable_token_indices.is_none() && self.modules_to_save.is_none()
    }

    /// Whether tensor `name` of an adapter file with this config belongs to the auxiliary
    /// modules (so the method's own reader leaves it alone).
    pub fn owns_tensor(&self, name: &str) -> bool {
        if name.ends_with(TOKEN_DELTA_SUFFIX) && self.trainable_token_indices.is_some() {
            return true;
        }
        let Some(names) = &self.modules_to_save else {
            return false;
        };
        let Some(module) = name.strip_prefix(PEFT_PREFIX).and_then(|rest| {
            rest.strip_suffix(WHOLE_WEIGHT_SUFFIX)
                .or_else(|| rest.strip_suffix(NORM_BIAS_SUFFIX))
        }) else {
            return false;
        };
        names.iter().any(|saved| module.ends_with(saved.as_str()))
    }

    fn resolve_for(&self, model: &dyn CausalLm) -> Result<ResolvedAuxiliary, String> {
        let config = model.config();
        resolve(
            self.trainable_token_indices.as_ref(),
            self.modules_to_save.as_deref(),
            config.model_type(),
            config.num_layers(),
            config.vocab_size(),
            config.tie_word_embeddings(),
        )
        .map_err(|problems| {
            problems
                .iter()
                .map(|problem| format!("`{}`: {}", problem.field, problem.message))
                .collect::<Vec<_>>()
                .join("; ")
        })
    }

    /// The two fields written into `config` as PEFT writes them: `modules_to_save` always
    /// (`null` when not asked), `trainable_token_indices` only when asked (IA3Config has no such
    /// field, and PEFT warns about a key its config class does not know).
    fn write_into(&self, config: &mut Value) {
        if let Value::Object(map) = config {
            if self.trainable_token_indices.is_some() {
                map.insert(
                    TOKENS_KEY.into(),
                    serde_json::to_value(&self.trainable_token_indices).unwrap_or(Value::Null),
                );
            }
            map.insert(
                MODULES_KEY.into(),
                serde_json::to_value(&self.modules_to_save).unwrap_or(Value::Null),
            );
        }
    }

    /// The token ids of the module `module` (a full module name) under these settings: the list
    /// form names the input embedding, the mapping form a name `module` ends with.
    fn indices_of(&self, module: &str, is_head: bool) -> Option<Vec<u32>> {
        match self.trainable_token_indices.as_ref()? {
            TrainableTokenIndices::List(ids) => (!is_head).then(|| ids.clone()),
            TrainableTokenIndices::Modules(modules) => modules
                .iter()
                .find(|(name, _)| module.ends_with(name.as_str()))
                .map(|(_, ids)| ids.clone()),
        }
    }
}

/// What the auxiliary modules hold once the model is built.
struct State {
    /// The input embedding's trained rows (or whole trained copy).
    embedding: Option<Arc<TrainedRows>>,
    /// What `lm_head` uses.
    head: HeadRows,
    /// `modules_to_save` copies the embedding of a tied model: the head keeps the base weights,
    /// so a merged checkpoint must untie it.
    untie_head: bool,
    /// Trained copies of normalization layers, in the model's order.
    norms: Vec<TrainedNorm>,
}

/// Where the auxiliary tensors come from.
enum Source {
    Fresh,
    /// Read from an adapter folder: the tensors not yet matched to a module, and the file paths
    /// for messages.
    Loaded {
        tensors: Mutex<HashMap<String, Tensor>>,
        all: Vec<(String, Tensor)>,
        config_path: PathBuf,
        weights_path: PathBuf,
    },
}

/// A method's adapter with PEFT's auxiliary trainable modules (see the module docs).
pub struct WithAuxiliary {
    inner: Box<dyn Adapter>,
    spec: AuxiliarySpec,
    source: Source,
    device: Device,
    /// `lm_head`'s base weight as the model built it (a fresh head copy / head rows start there).
    head_base: Mutex<Option<LinearWeights>>,
    state: Arc<OnceLock<State>>,
    training: Arc<Training>,
}

impl WithAuxiliary {
    /// Fresh auxiliary modules (rows start at the base rows, copies at the base weights) around
    /// a fresh method adapter.
    pub fn new(inner: Box<dyn Adapter>, spec: AuxiliarySpec, device: &Device) -> Self {
        WithAuxiliary {
            inner,
            spec,
            source: Source::Fresh,
            device: device.clone(),
            head_base: Mutex::new(None),
            state: Arc::new(OnceLock::new()),
            training: Arc::new(Training::new(true)),
        }
    }

    /// The auxiliary modules of the adapter folder `dir` around its loaded method adapter;
    /// `None` when its config asks for none.
    pub fn load(
        inner: Box<dyn Adapter>,
        dir: &Path,
        device: &Device,
    ) -> Result<Box<dyn Adapter>, PeftError> {
        let files = AdapterFiles::read(dir, device)?;
        let spec = AuxiliarySpec::from_peft_config(&files.config, &files.config_path)?;
        if spec.is_empty() {
            return Ok(inner);
        }
        let mut all: Vec<(String, Tensor)> = files
            .auxiliary
            .iter()
            .map(|(name, tensor)| (name.clone(), tensor.clone()))
            .collect();
        all.sort_by(|a, b| a.0.cmp(&b.0));
        Ok(Box::new(WithAuxiliary {
            inner,
            spec,
            source: Source::Loaded {
                tensors: Mutex::new(files.auxiliary),
                all,
                config_path: files.config_path,
                weights_path: files.weights_path,
            },
            device: device.clone(),
            head_base: Mutex::new(None),
            state: Arc::new(OnceLock::new()),
            training: Arc::new(Training::new(false)),
        }))
    }

    fn state(&self) -> Option<&State> {
        self.state.get()
    }

    /// Where errors about these settings point: the adapter_config.json, or the method config.
    fn origin(&self) -> String {
        match &self.source {
            Source::Loaded { config_path, .. } => config_path.display().to_string(),
            Source::Fresh => "the method config".into(),
        }
    }

    /// The rows of `module` (`indices`: `None` for a whole copy), from the file when loaded,
    /// else from `base` (`[vocab, hidden]`).
    fn rows_for(
        &self,
        module: &str,
        indices: Option<Vec<u32>>,
        base: &Tensor,
    ) -> Result<TrainedRows, PeftError> {
        match &self.source {
            Source::Fresh => TrainedRows::from_base(module, indices, base, &self.device),
            Source::Loaded {
                tensors,
                weights_path,
                ..
            } => {
                let name = rows::tensor_name(module, indices.is_some());
                let tensor = tensors
                    .lock()
                    .map_err(|_| PeftError::invalid("auxiliary tensors poisoned"))?
                    .remove(&name)
                    .ok_or_else(|| {
                        PeftError::invalid(format!(
                            "{}: no tensor `{name}` (the config's {} asks for it)",
                            weights_path.display(),
                            if indices.is_some() {
                                TOKENS_KEY
                            } else {
                                MODULES_KEY
                            }
                        ))
                    })?;
                TrainedRows::from_file(module, indices, tensor, base, weights_path)
            }
        }
    }

    /// Trained copies of the norms `modules` (full module names) of `model`, from the file when
    /// loaded, else from the model's frozen weights.
    fn norms_for(
        &self,
        model: &dyn CausalLm,
        modules: &[String],
    ) -> Result<Vec<TrainedNorm>, PeftError> {
        if modules.is_empty() {
            return Ok(Vec::new());
        }
        let base: HashMap<String, crate::models::NormWeights> = model.norms().into_iter().collect();
        modules
            .iter()
            .map(|module| {
                let weights = base.get(module).ok_or_else(|| {
                    PeftError::invalid(format!(
                        "{}: the model has no norm `{module}`",
                        self.origin()
                    ))
                })?;
                match &self.source {
                    Source::Fresh => TrainedNorm::from_base(module, weights, &self.device),
                    Source::Loaded {
                        tensors,
                        weights_path,
                        ..
                    } => {
                        let take = |name: &str| {
                            tensors
                                .lock()
                                .map(|mut tensors| tensors.remove(name))
                                .map_err(|_| PeftError::invalid("auxiliary tensors poisoned"))
                        };
                        TrainedNorm::from_file(module, weights, take, weights_path)
                    }
                }
            })
            .collect()
    }

    /// Patches from the file alone (an adapter loaded for export, its model never built): each
    /// tensor names its module; the config gives the ids.
    fn patches_from_file(&self, all: &[(String, Tensor)]) -> Result<Vec<WeightPatch>, PeftError> {
        let mut patches = Vec::new();
        let mut head_patched = false;
        let mut embedding_copied = false;
        for (name, tensor) in all {
            // A vector is a trained norm's weight or bias.
            if tensor.rank() == 1 {
                let (module, parameter) = norm_tensor_of(name).ok_or_else(|| {
                    PeftError::invalid(format!("auxiliary tensor `{name}` names no norm"))
                })?;
                patches.push(norms::patch(module, parameter, tensor.clone())?);
                continue;
            }
            let module = rows::module_of(name).ok_or_else(|| {
                PeftError::invalid(format!("auxiliary tensor `{name}` names no module"))
            })?;
            let whole = name.ends_with(WHOLE_WEIGHT_SUFFIX);
            let indices = if whole {
                None
            } else {
                Some(
                    self.spec
                        .indices_of(module, module == "lm_head")
                        .ok_or_else(|| {
                            PeftError::invalid(format!(
                                "{}: `{TOKENS_KEY}` gives no ids for `{module}` (tensor `{name}`)",
                                self.origin()
                            ))
                        })?,
                )
            };
            head_patched |= module == "lm_head";
            embedding_copied |= whole && module != "lm_head";
            patches.push(rows::patch(module, indices, tensor.clone())?);
        }
        if embedding_copied && !head_patched {
            patches.push(rows::keep_head_patch());
        }
        Ok(patches)
    }
}

/// The module and parameter of a trained norm's tensor name
/// (`base_model.model.transformer.ln_f.bias` → `transformer.ln_f`, bias).
fn norm_tensor_of(name: &str) -> Option<(&str, Parameter)> {
    let rest = name.strip_prefix(PEFT_PREFIX)?;
    match rest.strip_suffix(WHOLE_WEIGHT_SUFFIX) {
        Some(module) => Some((module, Parameter::Weight)),
        None => Some((rest.strip_suffix(NORM_BIAS_SUFFIX)?, Parameter::Bias)),
    }
}

impl LinearFactory for WithAuxiliary {
    fn build(&self, path: &str, base: LinearWeights) -> candle_core::Result<Box<dyn LinearLayer>> {
        if path != head::HEAD_PATH {
            return self.inner.linear_factory().build(path, base);
        }
        if let Ok(mut slot) = self.head_base.lock() {
            *slot = Some(base.clone());
        }
        let inner = self.inner.linear_factory().build(path, base)?;
        Ok(Box::new(AuxiliaryHead::new(
            inner,
            self.state.clone(),
            self.training.clone(),
        )))
    }

    fn build_quantized(
        &self,
        path: &str,
        base: QuantizedLinearWeights,
    ) -> candle_core::Result<Box<dyn LinearLayer>> {
        // `lm_head` is never stored in 4 bits (QLoRA keeps it 16-bit).
        self.inner.linear_factory().build_quantized(path, base)
    }
}

impl Adapter for WithAuxiliary {
    fn peft_type(&self) -> &'static str {
        self.inner.peft_type()
    }

    fn linear_factory(&self) -> &dyn LinearFactory {
        self
    }

    fn finish_injection(&self, model: &dyn CausalLm) -> Result<(), PeftError> {
        self.inner.finish_injection(model)?;
        if self.state.get().is_some() {
            return Err(PeftError::invalid(
                "the auxiliary modules were already attached to a model",
            ));
        }
        let resolved = self
            .spec
            .resolve_for(model)
            .map_err(|message| PeftError::invalid(format!("{}: {message}", self.origin())))?;
        let touches_head =
            resolved.save_head || resolved.head_tokens.is_some() || resolved.head_follows_embedding;
        let head_prefix = format!("{PEFT_PREFIX}{}.", head::HEAD_PATH);
        if touches_head
            && self
                .inner
                .trainable_vars()
                .iter()
                .any(|(name, _)| name.starts_with(&head_prefix))
        {
            return Err(PeftError::invalid(format!(
                "{}: the method adapts lm_head, and {} train lm_head's rows too; leave lm_head out of one of them",
                self.origin(),
                if resolved.save_head { MODULES_KEY } else { TOKENS_KEY }
            )));
        }
        // In the model's dtype: only the chosen rows (or a whole copy) become f32 variables.
        let embeddings = model.token_embeddings().clone();
        let embedding = if resolved.save_embedding {
            Some(self.rows_for(&resolved.embedding_name, None, &embeddings)?)
        } else if let Some(ids) = &resolved.embedding_tokens {
            Some(self.rows_for(&resolved.embedding_name, Some(ids.clone()), &embeddings)?)
        } else {
            None
        };
        let head_base = || -> Result<Tensor, PeftError> {
            let base = self
                .head_base
                .lock()
                .map_err(|_| PeftError::invalid("lm_head base poisoned"))?
                .clone()
                .ok_or_else(|| {
                    PeftError::invalid("the model was not built through this adapter's factory")
                })?;
            if base.bias.is_some() {
                return Err(PeftError::invalid(
                    "lm_head has a bias; peftpipe's trainable lm_head rows cover bias-free heads only",
                ));
            }
            Ok(base.weight)
        };
        let norms = self.norms_for(model, &resolved.save_norms)?;
        let head = if resolved.save_head {
            HeadRows::Own(Arc::new(self.rows_for(
                head::HEAD_PATH,
                None,
                &head_base()?,
            )?))
        } else if let Some(ids) = &resolved.head_tokens {
            HeadRows::Own(Arc::new(self.rows_for(
                head::HEAD_PATH,
                Some(ids.clone()),
                &head_base()?,
            )?))
        } else if resolved.head_follows_embedding {
            HeadRows::Follows
        } else {
            HeadRows::Base
        };
        if let Source::Loaded {
            tensors,
            weights_path,
            ..
        } = &self.source
        {
            let left = tensors
                .lock()
                .map_err(|_| PeftError::invalid("auxiliary tensors poisoned"))?;
            let mut names: Vec<&String> = left.keys().collect();
            names.sort();
            if let Some(first) = names.first() {
                return Err(PeftError::invalid(format!(
                    "{}: tensor `{first}` matches no trainable token rows or module to save of the model",
                    weights_path.display()
                )));
            }
        }
        let untie_head = resolved.save_embedding && matches!(head, HeadRows::Base);
        let embedding = embedding.map(Arc::new);
        let head = match head {
            HeadRows::Follows => match &embedding {
                Some(rows) => HeadRows::Tied(rows.clone()),
                None => HeadRows::Base,
            },
            other => other,
        };
        self.state
            .set(State {
                embedding,
                head,
                untie_head,
                norms,
            })
            .map_err(|_| PeftError::invalid("the auxiliary modules were attached twice"))
    }

    fn hooks(&self) -> Result<Hooks, PeftError> {
        let mut hooks = self.inner.hooks()?;
        if let Some(rows) = self.state().and_then(|state| state.embedding.as_ref()) {
            hooks.embedding_rows = Some(EmbeddingRows {
                slots: rows.slots().cloned(),
                rows: super::live(rows.var(), self.training.get()),
            });
        }
        for norm in self.state().map_or(&[][..], |state| &state.norms) {
            hooks
                .norms
                .insert(norm.module().to_string(), norm.weights(self.training.get()));
        }
        Ok(hooks)
    }

    fn trainable_vars(&self) -> Vec<(String, Var)> {
        let mut vars = self.inner.trainable_vars();
        if let Some(state) = self.state() {
            if let Some(rows) = &state.embedding {
                vars.push((rows.tensor_name(), rows.var().clone()));
            }
            if let HeadRows::Own(rows) = &state.head {
                vars.push((rows.tensor_name(), rows.var().clone()));
            }
            for norm in &state.norms {
                vars.extend(norm.vars());
            }
        }
        vars.sort_by(|x, y| x.0.cmp(&y.0));
        vars
    }

    fn set_mode(&self, mode: AdapterMode) {
        self.inner.set_mode(mode);
        self.training.set(mode);
    }

    fn prepare_forward(&self) -> Result<(), PeftError> {
        self.inner.prepare_forward()
    }

    fn save(&self, dir: &Path, base_model_name_or_path: &str) -> Result<(), PeftError> {
        let state = self.state().ok_or_else(|| {
            PeftError::invalid("the auxiliary modules are saved after the model is built")
        })?;
        self.inner.save(dir, base_model_name_or_path)?;
        // The method wrote its folder; add the auxiliary fields and tensors to it.
        let mut files = AdapterFiles::read(dir, &Device::Cpu)?;
        self.spec.write_into(&mut files.config);
        let mut tensors: Vec<(String, Tensor)> = files.tensors.into_iter().collect();
        tensors.extend(files.auxiliary);
        for rows in [state.embedding.as_ref(), state.head.own()]
            .into_iter()
            .flatten()
        {
            tensors.push((rows.tensor_name(), rows.var().as_tensor().clone()));
        }
        for norm in &state.norms {
            tensors.extend(
                norm.vars()
                    .into_iter()
                    .map(|(name, var)| (name, var.as_tensor().clone())),
            );
        }
        write_adapter_folder(dir, &files.config, &tensors)
    }

    fn merge_patches(&self) -> Result<Option<Vec<WeightPatch>>, PeftError> {
        let Some(mut patches) = self.inner.merge_patches()? else {
            return Ok(None);
        };
        match (self.state(), &self.source) {
            (Some(state), _) => {
                for rows in [state.embedding.as_ref(), state.head.own()]
                    .into_iter()
                    .flatten()
                {
                    patches.push(rows.merge_patch()?);
                }
                if state.untie_head {
                    patches.push(rows::keep_head_patch());
                }
                for norm in &state.norms {
                    patches.extend(norm.merge_patches()?);
                }
            }
            (None, Source::Loaded { all, .. }) => patches.extend(self.patches_from_file(all)?),
            (None, Source::Fresh) => {}
        }
        Ok(Some(patches))
    }

    fn merge(&self) -> Result<(), PeftError> {
        // The auxiliary rows stay active as hooks and the head wrapper: the model's outputs are
        // the merged model's either way.
        self.inner.merge()
    }

    fn unmerge(&self) -> Result<(), PeftError> {
        self.inner.unmerge()
    }

    fn base_quantization(&self) -> Option<BaseQuantization> {
        self.inner.base_quantization()
    }

    fn check_layers(&self, layers: &[super::adapter::LayerShape<'_>]) -> Result<(), PeftError> {
        self.inner.check_layers(layers)
    }
}

/// PEFT's trainable-parameter count of a method config's auxiliary modules on the model `config`
/// describes (what `print_trainable_parameters` adds): `n · hidden` per module with trainable
/// token rows (a tied head that follows the embedding shares its tensor), `vocab · hidden` per
/// embedding or head to save, `hidden` per RMSNorm to save and `2 · hidden` per LayerNorm (weight
/// and bias). Errors are the settings' problems (as `peftpipe validate` reports them).
pub fn auxiliary_parameters(
    method: &MethodConfig,
    config: &crate::models::ModelConfig,
) -> Result<u64, String> {
    let (tokens, modules) = method.auxiliary();
    if tokens.is_none() && modules.is_none() {
        return Ok(0);
    }
    let resolved = resolve(
        tokens,
        modules,
        config.model_type(),
        config.num_layers(),
        config.vocab_size(),
        config.tie_word_embeddings(),
    )
    .map_err(|problems| {
        problems
            .iter()
            .map(|problem| format!("`{}`: {}", problem.field, problem.message))
            .collect::<Vec<_>>()
            .join("; ")
    })?;
    let hidden = config.hidden_size() as u64;
    let whole = config.vocab_size() as u64 * hidden;
    let rows = |ids: &Option<Vec<u32>>| ids.as_ref().map_or(0, |ids| ids.len() as u64 * hidden);
    // GPT-2's LayerNorms have a bias beside the weight; Llama's RMSNorms a weight only.
    let per_norm = match config {
        crate::models::ModelConfig::Gpt2(_) => 2 * hidden,
        _ => hidden,
    };
    Ok(rows(&resolved.embedding_tokens)
        + rows(&resolved.head_tokens)
        + u64::from(resolved.save_embedding) * whole
        + u64::from(resolved.save_head) * whole
        + resolved.save_norms.len() as u64 * per_norm)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn method(yaml: &str) -> MethodConfig {
        let value: Value = serde_norway::from_str(yaml).unwrap();
        serde_json::from_value(value).unwrap()
    }

    #[test]
    fn auxiliary_counts_follow_peft() {
        // stories260k's shape: hidden 64, vocabulary 512, tied head.
        let config = crate::models::ModelConfig::from_json(&serde_json::json!({
            "model_type": "llama", "hidden_size": 64, "intermediate_size": 172,
            "num_hidden_layers": 5, "num_attention_heads": 8, "num_key_value_heads": 4,
            "vocab_size": 512, "tie_word_embeddings": true
        }))
        .unwrap();
        let count = |yaml: &str| auxiliary_parameters(&method(yaml), &config);
        assert_eq!(count("lora: {}"), Ok(0));
        // The tied head shares the embedding's rows.
        assert_eq!(count("lora: {trainable_token_indices: [2]}"), Ok(64));
        assert_eq!(
            count("lora: {trainable_token_indices: {embed_tokens: [2], lm_head: [5, 9]}}"),
            Ok(3 * 64)
        );
        assert_eq!(count("ia3: {modules_to_save: [lm_head]}"), Ok(512 * 64));
        assert_eq!(
            count("qlora: {modules_to_save: [lm_head, embed_tokens]}"),
            Ok(2 * 512 * 64)
        );
        assert!(count("lora: {trainable_token_indices: [512]}")
            .unwrap_err()
            .contains("outside the vocabulary"));
        // Norms: `hidden` per RMSNorm; `norm` ends the name of all 2·5 + 1 of them (PEFT's
        // suffix match).
        assert_eq!(count("lora: {modules_to_save: [model.norm]}"), Ok(64));
        assert_eq!(
            count("ia3: {modules_to_save: [input_layernorm]}"),
            Ok(5 * 64)
        );
        assert_eq!(count("qlora: {modules_to_save: [norm]}"), Ok(11 * 64));
        assert_eq!(
            count("lora: {modules_to_save: [lm_head, post_attention_layernorm]}"),
            Ok(512 * 64 + 5 * 64)
        );
        // GPT-2's LayerNorms: weight and bias.
        let gpt2 = crate::models::ModelConfig::from_json(&serde_json::json!({
            "model_type": "gpt2", "n_embd": 32, "n_layer": 3, "n_head": 4, "n_positions": 64,
            "vocab_size": 100
        }))
        .unwrap();
        let count = |yaml: &str| auxiliary_parameters(&method(yaml), &gpt2);
        assert_eq!(count("lora: {modules_to_save: [ln_f]}"), Ok(2 * 32));
        assert_eq!(
            count("lora: {modules_to_save: [ln_1, ln_2]}"),
            Ok(6 * 2 * 32)
        );
        assert!(count("lora: {modules_to_save: [input_layernorm]}")
            .unwrap_err()
            .contains("matches no module of this gpt2 model"));
    }
}
