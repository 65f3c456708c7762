//! A model folder loaded for inference (optionally with a PEFT adapter), and one-prompt generation
//! as `peftpipe generate` runs it.

use std::path::Path;

use candle_core::{DType, Device};
use serde::Serialize;

use super::generate::{generate, GenerationSettings, StopReason};
use super::model::HookedModel;
use super::sample::Sampling;
use super::text::decode_continuation;
use super::TextCodec;
use crate::models::quantized::{BaseQuantization, QuantizingFactory};
use crate::models::{
    CausalLm, FrozenLinearFactory, Hooks, LinearFactory, ModelDir, ModelTokenizer,
};
use crate::peft::qlora::check_stored_base;
use crate::peft::{load_adapter, Adapter, AdapterMode};

/// A model ready for inference: weights (adapter applied), tokenizer, hooks.
pub struct InferenceModel {
    pub dir: ModelDir,
    pub model: Box<dyn CausalLm>,
    pub tokenizer: ModelTokenizer,
    pub hooks: Hooks,
    /// The PEFT adapter built into `model`, in inference mode (no dropout, no graph).
    pub adapter: Option<Box<dyn Adapter>>,
}

impl InferenceModel {
    /// Load a Hugging Face model folder (a base model or a merged export) on `device` in `dtype`,
    /// with a PEFT adapter folder applied when given; with `quantization` (a QLoRA run's base)
    /// the linear layers are stored in 4 bits as they load, as the run trained them.
    pub fn load(
        model_dir: &Path,
        adapter_dir: Option<&Path>,
        quantization: Option<&BaseQuantization>,
        device: &Device,
        dtype: DType,
    ) -> Result<Self, String> {
        let dir = ModelDir::open(model_dir).map_err(|e| e.to_string())?;
        if let Some(quantization) = quantization {
            check_recorded_base(quantization, &dir)?;
        }
        let tokenizer = dir.tokenizer().map_err(|e| e.to_string())?;
        let build = |factory: &dyn LinearFactory| match quantization {
            Some(quantization) => dir.load(
                device,
                dtype,
                &QuantizingFactory::new(factory, *quantization),
            ),
            None => dir.load(device, dtype, factory),
        };
        let (model, adapter) = match adapter_dir {
            None => (
                build(&FrozenLinearFactory).map_err(|e| e.to_string())?,
                None,
            ),
            Some(adapter_dir) => {
                let adapter = load_adapter(adapter_dir, device).map_err(|e| e.to_string())?;
                adapter.set_mode(AdapterMode::Eval);
                let model = build(adapter.linear_factory())
                    .map_err(|e| format!("{}: {e}", adapter_dir.display()))?;
                adapter
                    .finish_injection(model.as_ref())
                    .map_err(|e| format!("{}: {e}", adapter_dir.display()))?;
                (model, Some(adapter))
            }
        };
        // The adapter's hooks, computed once: in inference mode they are plain tensors.
        let hooks = match &adapter {
            Some(adapter) => adapter
                .hooks()
                .map_err(|e| format!("{}: {e}", adapter_dir.unwrap_or(model_dir).display()))?,
            None => Hooks::none(),
        };
        Ok(InferenceModel {
            dir,
            model,
            tokenizer,
            hooks,
            adapter,
        })
    }

    /// The model as [`super::LanguageModel`].
    pub fn language_model(&self) -> HookedModel<'_> {
        HookedModel {
            model: self.model.as_ref(),
            hooks: &self.hooks,
        }
    }

    /// Longest sequence the model takes.
    pub fn max_length(&self) -> usize {
        self.dir.config().max_positions()
    }
}

/// The 4-bit base a train artifact's adapter folder was trained over: the `quantization` its
/// run recorded in the sibling `base_model.json` (a QLoRA run); `None` for any other folder.
pub fn recorded_base_quantization(adapter_dir: &Path) -> Result<Option<BaseQuantization>, String> {
    let Some(record) = adapter_dir
        .parent()
        .map(|parent| parent.join("base_model.json"))
    else {
        return Ok(None);
    };
    if !record.is_file() {
        return Ok(None);
    }
    let text =
        std::fs::read_to_string(&record).map_err(|e| format!("{}: {e}", record.display()))?;
    let value: serde_json::Value = serde_json::from_str(&text)
        .map_err(|e| format!("{}: invalid JSON: {e}", record.display()))?;
    match value.get("quantization") {
        None | Some(serde_json::Value::Null) => Ok(None),
        Some(quantization) => BaseQuantization::from_json(quantization)
            .map(Some)
            .map_err(|message| format!("{}: quantization: {message}", record.display())),
    }
}

/// The recorded 4-bit base of a QLoRA run must be the one this folder gives: pre-quantized
/// exactly when its config.json has a bitsandbytes `quantization_config`, and then with the same
/// settings (a base that changed under the adapter is an error, never a silent other base).
fn check_recorded_base(quantization: &BaseQuantization, dir: &ModelDir) -> Result<(), String> {
    match (quantization.prequantized, dir.stored_quantization()) {
        (true, Some(stored)) => check_stored_base(quantization, stored, &dir.config_path())
            .map_err(|error| error.to_string()),
        (false, None) => Ok(()),
        (true, None) => Err(format!(
            "{}: no `quantization_config`, but the adapter was trained over this model saved in bitsandbytes 4-bit (base_model.json: prequantized); point at that checkpoint",
            dir.config_path().display()
        )),
        (false, Some(_)) => Err(format!(
            "{}: key `quantization_config`: this checkpoint is saved in bitsandbytes 4-bit, but the adapter was trained over a 16-bit checkpoint quantized as it loaded; point at that 16-bit checkpoint",
            dir.config_path().display()
        )),
    }
}

/// What `peftpipe generate` asks for.
#[derive(Debug, Clone, PartialEq)]
pub struct GenerateRequest {
    pub prompt: String,
    pub max_new_tokens: usize,
    pub sampling: Sampling,
}

/// What it gives back (also the `--json` output).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct GenerateOutput {
    pub prompt: String,
    /// The generated text (special tokens skipped), without the prompt.
    pub completion: String,
    /// Generated token ids (without the final EOS).
    pub token_ids: Vec<u32>,
    /// The prompt's token ids (BOS included when the tokenizer adds it).
    pub prompt_token_ids: Vec<u32>,
    pub stop_reason: StopReason,
}

/// Generate a continuation of one prompt.
pub fn generate_one(
    model: &InferenceModel,
    request: &GenerateRequest,
) -> Result<GenerateOutput, String> {
    let prompt_token_ids = model.tokenizer.encode_prompt(&request.prompt)?;
    let settings = GenerationSettings {
        max_new_tokens: request.max_new_tokens,
        sampling: request.sampling,
        eos_token_ids: model.tokenizer.eos_token_ids.clone(),
        max_length: Some(model.max_length()),
    };
    let generated = generate(
        &model.language_model(),
        &prompt_token_ids,
        &settings,
        |_| false,
    )
    .map_err(|e| format!("generation failed: {e}"))?;
    let completion =
        decode_continuation(&model.tokenizer, &prompt_token_ids, &generated.token_ids)?;
    Ok(GenerateOutput {
        prompt: request.prompt.clone(),
        completion,
        token_ids: generated.token_ids,
        prompt_token_ids,
        stop_reason: generated.stop_reason,
    })
}
