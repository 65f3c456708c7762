//! A model folder loaded for inference (optionally with a PEFT adapter), and generation of one
//! prompt or a batch of prompts as `peftpipe generate` runs it.

use std::path::{Path, PathBuf};

use candle_core::{DType, Device};
use serde::Serialize;

use super::generate::{check_prompt, generate, generate_batch, GenerationSettings, StopReason};
use super::model::HookedModel;
use super::sample::Sampling;
use super::text::decode_continuation;
use super::TextCodec;
use crate::config::evaluate::ADAPTER_BASE_RECORD;
use crate::models::quantized::{BaseQuantization, QuantizingFactory};
use crate::models::{
    CausalLm, FrozenLinearFactory, Hooks, LinearFactory, ModelDir, ModelTokenizer,
};
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
        let positions = dir.config().max_positions();
        if hooks.virtual_positions() >= positions {
            return Err(format!(
                "{}: the adapter's {} virtual tokens take all of the model's {positions} positions (config.json `{}`), leaving none for the text",
                adapter_dir.unwrap_or(model_dir).display(),
                hooks.virtual_positions(),
                dir.config().max_positions_key()
            ));
        }
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

    /// Longest sequence of real tokens the model takes: its context less the positions the
    /// adapter's virtual tokens take (at least one, checked when it loads).
    pub fn max_length(&self) -> usize {
        self.dir
            .config()
            .max_positions()
            .saturating_sub(self.hooks.virtual_positions())
            .max(1)
    }
}

/// The 4-bit base an adapter folder was trained over, and the file that says so: an exported
/// folder's own [`crate::config::evaluate::ADAPTER_BASE_RECORD`], else a train artifact's sibling
/// `base_model.json` (`quantization`, written by a QLoRA run); `None` for any other folder. When
/// both exist they must say the same (one adapter, one base): otherwise an error naming both.
pub fn recorded_base_quantization(
    adapter_dir: &Path,
) -> Result<Option<(BaseQuantization, PathBuf)>, String> {
    let records = crate::config::evaluate::adapter_base_records(adapter_dir);
    let Some(first) = records.first() else {
        return Ok(None);
    };
    let recorded = read_base_record(first)?;
    if let Some(sibling) = records.get(1) {
        let other = read_base_record(sibling)?;
        let base = |record: &Option<(BaseQuantization, PathBuf)>| match record {
            Some((quantization, _)) => format!("the 4-bit base {}", quantization.to_json()),
            None => "a 16-bit base".to_string(),
        };
        let setting = |record: &Option<(BaseQuantization, PathBuf)>| {
            record.as_ref().map(|(quantization, _)| *quantization)
        };
        if setting(&recorded) != setting(&other) {
            return Err(format!(
                "{}: records {}, but {} beside the adapter folder records {}; an adapter is trained over one base: delete or correct the record that is wrong",
                first.display(),
                base(&recorded),
                sibling.display(),
                base(&other)
            ));
        }
    }
    Ok(recorded)
}

/// One record file's 4-bit base ([`recorded_base_quantization`]).
fn read_base_record(record: &Path) -> Result<Option<(BaseQuantization, PathBuf)>, String> {
    let text = std::fs::read_to_string(record).map_err(|e| format!("{}: {e}", record.display()))?;
    let value: serde_json::Value = serde_json::from_str(&text)
        .map_err(|e| format!("{}: invalid JSON: {e}", record.display()))?;
    let own = record.file_name() == Some(std::ffi::OsStr::new(ADAPTER_BASE_RECORD));
    match value.get("quantization") {
        // An exported folder's record exists only to say which 4-bit base: one that says
        // nothing is damaged (a train artifact's base_model.json without it: a 16-bit run).
        None | Some(serde_json::Value::Null) if own => Err(format!(
            "{}: no `quantization` record (expected {{\"quantization\": {{\"quant_type\": \"nf4\", ...}}}}, as export writes it); re-export the adapter, or delete the file to use the folder as a plain LoRA adapter",
            record.display()
        )),
        None | Some(serde_json::Value::Null) => Ok(None),
        Some(quantization) => BaseQuantization::from_json(quantization)
            .map(|quantization| Some((quantization, record.to_path_buf())))
            .map_err(|message| format!("{}: quantization: {message}", record.display())),
    }
}

/// The recorded 4-bit base of a QLoRA run must be the one this folder gives: pre-quantized
/// exactly when its config.json has a bitsandbytes `quantization_config`, and then with the same
/// settings (a base that changed under the adapter is an error, never a silent other base).
/// `generate` and `evaluate` choose the base through [`super::adapter_base::adapter_base`],
/// which passes this check and says when it is not the recorded one.
fn check_recorded_base(quantization: &BaseQuantization, dir: &ModelDir) -> Result<(), String> {
    match (quantization.prequantized, dir.stored_quantization()) {
        (true, Some(stored)) if !stored.has_settings_of(&quantization.config) => {
            Err(format!(
                "{}: key `quantization_config`: this checkpoint is stored in 4 bits as {} (double_quant {}), but the adapter was trained over one stored as {} (double_quant {}); point at the checkpoint it was trained over",
                dir.config_path().display(),
                stored.quant_type.name(),
                stored.double_quant,
                quantization.config.quant_type.name(),
                quantization.config.double_quant
            ))
        }
        (true, Some(_)) | (false, None) => Ok(()),
        (true, None) => Err(format!(
            "{}: no `quantization_config`, but the adapter was trained over a checkpoint saved in bitsandbytes 4-bit (its record says `prequantized`); point at that checkpoint",
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
    /// What the output does not say by itself: the base an adapter was applied over when it is
    /// not the one its record describes (added by the caller that chose the base), and a
    /// sliding window that ended generation (config.json's `sliding_window`, the context
    /// peftpipe uses for the model as it has no sliding-window attention).
    pub notes: Vec<String>,
    /// The context that ends generation as config.json names it (`` `sliding_window` 4096 in
    /// model/config.json ``), for the line that says why generation stopped.
    #[serde(skip)]
    pub context: String,
}

impl InferenceModel {
    fn generation_settings(&self, max_new_tokens: usize, sampling: Sampling) -> GenerationSettings {
        GenerationSettings {
            max_new_tokens,
            sampling,
            eos_token_ids: self.tokenizer.eos_token_ids.clone(),
            max_length: Some(self.max_length()),
        }
    }
}

/// Generate a continuation of one prompt.
pub fn generate_one(
    model: &InferenceModel,
    request: &GenerateRequest,
) -> Result<GenerateOutput, String> {
    let prompt_token_ids = model.tokenizer.encode_prompt(&request.prompt)?;
    let settings = model.generation_settings(request.max_new_tokens, request.sampling);
    let generated = generate(
        &model.language_model(),
        &prompt_token_ids,
        &settings,
        |_| false,
    )
    .map_err(|e| format!("generation failed: {e}"))?;
    let completion =
        decode_continuation(&model.tokenizer, &prompt_token_ids, &generated.token_ids)?;
    let (notes, context) = stop_notes(model, generated.stop_reason);
    Ok(GenerateOutput {
        prompt: request.prompt.clone(),
        completion,
        token_ids: generated.token_ids,
        prompt_token_ids,
        stop_reason: generated.stop_reason,
        notes,
        context,
    })
}

/// [`GenerateOutput`]'s `notes` and `context` for a generation that ended for `stop_reason`:
/// the context as config.json names it, and a note when a sliding window ended it.
fn stop_notes(model: &InferenceModel, stop_reason: StopReason) -> (Vec<String>, String) {
    let mut notes = Vec::new();
    let config = model.dir.config();
    let context = format!(
        "`{}` {} in {}",
        config.max_positions_key(),
        config.max_positions(),
        model.dir.config_path().display()
    );
    if let Some(window) = config.limiting_sliding_window() {
        if stop_reason == StopReason::MaxLength {
            notes.push(format!(
                "generation stopped at the model's sliding window, config.json `sliding_window` {window} ({}): peftpipe has no sliding-window attention, so the window is the model's context",
                model.dir.config_path().display()
            ));
        }
    }
    (notes, context)
}

/// A prompt of a batch that cannot be generated from: its index in the batch and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BatchError {
    /// The prompt's index, or None when the batch as a whole failed (the model's forward pass).
    pub index: Option<usize>,
    pub message: String,
}

/// Generate a continuation of every prompt at once ([`generate_batch`]: left-padded, one forward
/// pass per step for the whole batch, each row stopping on its own, seeded samplers per row), with
/// the same settings for each; outputs in prompt order, each what [`generate_one`] gives for it.
pub fn generate_many(
    model: &InferenceModel,
    prompts: &[String],
    max_new_tokens: usize,
    sampling: Sampling,
) -> Result<Vec<GenerateOutput>, BatchError> {
    let settings = model.generation_settings(max_new_tokens, sampling);
    let mut encoded = Vec::with_capacity(prompts.len());
    for (index, prompt) in prompts.iter().enumerate() {
        let ids = model
            .tokenizer
            .encode_prompt(prompt)
            .and_then(|ids| check_prompt(&ids, &settings).map(|()| ids))
            .map_err(|message| BatchError {
                index: Some(index),
                message,
            })?;
        encoded.push(ids);
    }
    let generated = generate_batch(&model.language_model(), &encoded, &settings, |_, _| false)
        .map_err(|error| BatchError {
            index: None,
            message: format!("generation failed: {error}"),
        })?;
    prompts
        .iter()
        .zip(encoded)
        .zip(generated)
        .enumerate()
        .map(|(index, ((prompt, prompt_token_ids), generated))| {
            let completion =
                decode_continuation(&model.tokenizer, &prompt_token_ids, &generated.token_ids)
                    .map_err(|message| BatchError {
                        index: Some(index),
                        message,
                    })?;
            let (notes, context) = stop_notes(model, generated.stop_reason);
            Ok(GenerateOutput {
                prompt: prompt.clone(),
                completion,
                token_ids: generated.token_ids,
                prompt_token_ids,
                stop_reason: generated.stop_reason,
                notes,
                context,
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(path: &Path, value: serde_json::Value) {
        std::fs::write(path, value.to_string()).unwrap();
    }

    #[test]
    fn an_adapter_folder_with_two_records_needs_them_to_agree() {
        let root = tempfile::tempdir().unwrap();
        let folder = root.path().join("adapter");
        std::fs::create_dir(&folder).unwrap();
        let own = folder.join(ADAPTER_BASE_RECORD);
        let sibling = root.path().join("base_model.json");
        let nf4 = serde_json::json!({"quant_type": "nf4", "double_quant": true, "block_size": 64});
        let fp4 = serde_json::json!({"quant_type": "fp4", "double_quant": true, "block_size": 64});
        // Only the train artifact's record: it counts.
        write(
            &sibling,
            serde_json::json!({"model": "m", "quantization": fp4}),
        );
        let (found, path) = recorded_base_quantization(&folder).unwrap().unwrap();
        assert_eq!(
            (found.config.quant_type.name(), path),
            ("fp4", sibling.clone())
        );
        // Both, disagreeing: an error naming both files, never one silently over the other.
        write(&own, serde_json::json!({"quantization": nf4}));
        let error = recorded_base_quantization(&folder).unwrap_err();
        assert!(
            error.contains(&own.display().to_string())
                && error.contains(&sibling.display().to_string())
                && error.contains("\"fp4\"")
                && error.contains("\"nf4\""),
            "{error}"
        );
        // A 16-bit run's record beside a 4-bit one disagrees too.
        write(&sibling, serde_json::json!({"model": "m"}));
        let error = recorded_base_quantization(&folder).unwrap_err();
        assert!(error.contains("a 16-bit base"), "{error}");
        // Both saying the same: the folder's own record.
        write(
            &sibling,
            serde_json::json!({"model": "m", "quantization": nf4}),
        );
        let (found, path) = recorded_base_quantization(&folder).unwrap().unwrap();
        assert_eq!((found.config.quant_type.name(), path), ("nf4", own.clone()));
        assert_eq!(
            crate::config::evaluate::adapter_base_records(&folder),
            vec![own, sibling],
            "both are read, so both are inputs"
        );
    }

    #[test]
    fn a_folder_named_without_a_last_name_still_finds_the_record_beside_it() {
        let root = tempfile::tempdir().unwrap();
        let folder = root.path().join("art").join("adapter");
        std::fs::create_dir_all(folder.join("sub")).unwrap();
        let sibling = root.path().join("art").join("base_model.json");
        let fp4 = serde_json::json!({"quant_type": "fp4", "double_quant": true, "block_size": 64});
        write(
            &sibling,
            serde_json::json!({"model": "m", "quantization": fp4}),
        );
        // `adapter/sub/..` is the folder (as `.` is from inside it): its parent is `art`.
        let (found, _) = recorded_base_quantization(&folder.join("sub").join(".."))
            .unwrap()
            .expect("the train artifact's record beside the folder");
        assert_eq!(found.config.quant_type.name(), "fp4");
        // A link to the folder: the record beside the folder, not beside the link.
        #[cfg(unix)]
        {
            let link = root.path().join("linked");
            std::os::unix::fs::symlink(&folder, &link).unwrap();
            let (found, _) = recorded_base_quantization(&link)
                .unwrap()
                .expect("the train artifact's record beside the linked folder");
            assert_eq!(found.config.quant_type.name(), "fp4");
        }
    }

    #[test]
    fn a_record_that_is_there_but_unreadable_is_an_error_not_no_record() {
        let root = tempfile::tempdir().unwrap();
        let folder = root.path().join("adapter");
        std::fs::create_dir(&folder).unwrap();
        let own = folder.join(ADAPTER_BASE_RECORD);
        // A folder where the record should be.
        std::fs::create_dir(&own).unwrap();
        let error = recorded_base_quantization(&folder).unwrap_err();
        assert!(error.contains(&own.display().to_string()), "{error}");
        std::fs::remove_dir(&own).unwrap();
        // A dangling link, in either place.
        #[cfg(unix)]
        for record in [own.clone(), root.path().join("base_model.json")] {
            std::os::unix::fs::symlink(root.path().join("gone.json"), &record).unwrap();
            let error = recorded_base_quantization(&folder).unwrap_err();
            assert!(error.contains(&record.display().to_string()), "{error}");
            std::fs::remove_file(&record).unwrap();
        }
        assert_eq!(recorded_base_quantization(&folder).unwrap(), None);
    }
}
