//! QLoRA (Dettmers et al. 2023): LoRA over a frozen base whose linear layers are stored in 4 bits
//! (NF4 or FP4, blockwise absmax, optionally double-quantized; bit-exact with bitsandbytes, see
//! `crate::quant`), computing in the compute dtype.
//!
//! Shape (PEFT's and torchtune's): not a second LoRA. The layer is the LoRA layer of `lora/`
//! with a quantized base ([`LoraAdapter`]'s `build_quantized`: `y = Linear4bit(x) + s·B(A x)`,
//! the base through `quant::quantized_linear`, whose backward reaches the input only), and the
//! quantization is the model-loading side's ([`QuantizingFactory`] in `models/quantized.rs`:
//! every linear layer but `lm_head` is quantized as the model loads, one tensor at a time; norms,
//! embeddings and the head stay in the model's 16-bit dtype, as bitsandbytes leaves them). This
//! folder only puts the two together: a [`QloraAdapter`] is a LoRA adapter behind a quantizing
//! factory, and it says which [`BaseQuantization`] its base needs so evaluation, generation and
//! export rebuild the same base. A quantized-base option inside `lora/` alone would not do: the
//! quantization belongs to the base model, not to the adapter, and a plain LoRA folder must load
//! onto either base.
//!
//! On disk the adapter is a plain PEFT LoRA folder (`peft_type: LORA`), what PEFT saves for a
//! QLoRA run and what `PeftModel.from_pretrained` loads onto the bitsandbytes-quantized base.
//!
//! Merging and its rounding. The adapter is never merged into the 4-bit weights: a LoRA update
//! is typically far smaller than one NF4 step (`absmax · ~0.1` between neighbouring levels), so
//! re-quantizing `W + ΔW` would round most of the update away. [`Adapter::merge`] refuses;
//! [`Adapter::merge_patches`] gives a 16-bit model over the *dequantized* base: every quantized
//! layer's weight becomes `dequant(quant(W)) + s·B·A`, computed in `f32` and rounded once to the
//! output dtype, and every quantized layer is replaced even where no update applies (the trained
//! model never saw the original `W`). Consequences: the merged model reproduces the QLoRA
//! model's outputs up to that one rounding (exactly in f32 up to summation order; in bf16 the
//! merged weight is rounded where the QLoRA forward used the dequantized weight in the compute
//! dtype and added the LoRA branch separately), and it differs from the original 16-bit base by
//! the quantization error in every linear layer; it is the model that was trained, not the
//! original base plus the update.
//!
//! A checkpoint transformers saved with bitsandbytes 4-bit (`quantization_config` in its
//! config.json) is trained over as stored: its packed codes and absmax state become the base
//! layers without being dequantized and re-quantized (`models/quantized.rs` reads them). The run's
//! settings must then describe that storage: [`check_stored_base`] refuses a `quant_type` or
//! `double_quant` that differs from config.json's, and the quantizing factory a block size that
//! differs from a weight's state (the checkpoint never silently overrides what the pipeline says,
//! and the pipeline never silently re-quantizes the checkpoint). The compute dtype is a run
//! setting, not a storage one: the method's `compute_dtype` (default: the run's dtype) applies,
//! not config.json's `bnb_4bit_compute_dtype`. Such a base is recorded as `prequantized`; the
//! export stage merges over the checkpoint's dequantized copy
//! (`models::quantized::write_dequantized_checkpoint`), while [`Adapter::merge_patches`] in
//! process refuses (it has no 16-bit weights to patch).
//!
//! Never reads pipeline configs, never prints.

use std::path::Path;

use candle_core::{DType, Device, Var};

use crate::config::method::{ComputeDtypeChoice, FourBitSettings, QuantTypeChoice};
use crate::quant::{QuantConfig, QuantType};

use super::adapter::WeightPatch;
use super::lora::{LoraAdapter, LoraSettings};
use super::{Adapter, AdapterMode, PeftError};
use crate::models::quantized::{
    dequantized_base_patches, BaseQuantization, BnbQuantization, QuantizingFactory,
};
use crate::models::{CausalLm, LinearFactory};

/// A QLoRA adapter: LoRA layers built over the 4-bit base a [`QuantizingFactory`] makes.
pub struct QloraAdapter {
    factory: QuantizingFactory<LoraAdapter>,
}

impl QloraAdapter {
    /// A fresh adapter (A random, B zero; DoRA's magnitude from the dequantized weight with
    /// `use_dora`) for a model built on `device` through [`Adapter::linear_factory`].
    pub fn new(
        settings: LoraSettings,
        use_dora: bool,
        quantization: BaseQuantization,
        device: &Device,
    ) -> Result<Self, PeftError> {
        quantization
            .config
            .validate()
            .map_err(|error| PeftError::invalid(format!("QLoRA quantization: {error}")))?;
        let lora = LoraAdapter::new(settings, device)?.with_dora(use_dora);
        Ok(Self {
            factory: QuantizingFactory::new(lora, quantization),
        })
    }

    /// The LoRA adapter inside.
    pub fn lora(&self) -> &LoraAdapter {
        self.factory.inner()
    }

    pub fn quantization(&self) -> &BaseQuantization {
        self.factory.quantization()
    }
}

impl Adapter for QloraAdapter {
    fn peft_type(&self) -> &'static str {
        "LORA"
    }

    fn linear_factory(&self) -> &dyn LinearFactory {
        &self.factory
    }

    fn finish_injection(&self, model: &dyn CausalLm) -> Result<(), PeftError> {
        if self.factory.quantized_layers().shapes.is_empty() {
            return Err(PeftError::invalid(format!(
                "QLoRA quantized no linear layer of this {} model (its 4-bit base covers the linear layers of Llama-family decoder blocks)",
                model.config().model_type()
            )));
        }
        self.lora().finish_injection(model)
    }

    fn trainable_vars(&self) -> Vec<(String, Var)> {
        self.lora().trainable_vars()
    }

    fn set_mode(&self, mode: AdapterMode) {
        self.lora().set_mode(mode);
    }

    fn prepare_forward(&self) -> Result<(), PeftError> {
        self.lora().prepare_forward()
    }

    fn save(&self, dir: &Path, base_model_name_or_path: &str) -> Result<(), PeftError> {
        self.lora().save(dir, base_model_name_or_path)
    }

    /// A 16-bit model over the dequantized base (see the module docs): every quantized layer's
    /// `dequant(quant(W))`, plus `s·B·A` where adapted.
    fn merge_patches(&self) -> Result<Option<Vec<WeightPatch>>, PeftError> {
        if self.quantization().prequantized {
            return Err(PeftError::invalid(PREQUANTIZED_MERGE));
        }
        let layers = self.factory.quantized_layers();
        let Some(load_dtype) = layers.load_dtype else {
            return Err(PeftError::invalid(
                "a QLoRA adapter merges over the base it quantized: build the model through it first",
            ));
        };
        let lora = self.lora().merge_patches()?.unwrap_or_default();
        Ok(Some(dequantized_base_patches(
            lora,
            self.quantization(),
            load_dtype,
            &layers.shapes,
        )))
    }

    fn merge(&self) -> Result<(), PeftError> {
        Err(PeftError::invalid(
            "a QLoRA adapter is not merged into its 4-bit base (the update would mostly round away); export a merged 16-bit model over the dequantized base instead",
        ))
    }

    fn unmerge(&self) -> Result<(), PeftError> {
        Ok(())
    }

    fn base_quantization(&self) -> Option<BaseQuantization> {
        Some(*self.quantization())
    }
}

/// bitsandbytes' 4-bit settings for a pipeline's choices (`method: {qlora: …}`, export's
/// `quantize: …`, evaluate's `base_quantization: …`).
pub fn quant_config(settings: &FourBitSettings) -> QuantConfig {
    QuantConfig {
        quant_type: match settings.quant_type {
            QuantTypeChoice::Nf4 => QuantType::Nf4,
            QuantTypeChoice::Fp4 => QuantType::Fp4,
        },
        block_size: settings.block_size,
        double_quant: settings.double_quant,
    }
}

/// The 4-bit base `settings` describe: quantized from a 16-bit checkpoint as it loads, or, when
/// `prequantized` (the checkpoint's config.json has a bitsandbytes `quantization_config`), as
/// the checkpoint stores it (whose settings must then be these).
pub fn base_quantization(settings: &FourBitSettings, prequantized: bool) -> BaseQuantization {
    BaseQuantization {
        config: quant_config(settings),
        compute_dtype: settings.compute_dtype.map(compute_dtype),
        prequantized,
    }
}

/// The dtype a `compute_dtype` choice names.
pub fn compute_dtype(choice: ComputeDtypeChoice) -> DType {
    match choice {
        ComputeDtypeChoice::Bf16 => DType::BF16,
        ComputeDtypeChoice::F16 => DType::F16,
        ComputeDtypeChoice::F32 => DType::F32,
    }
}

/// Why [`Adapter::merge_patches`] refuses over a pre-quantized base.
pub const PREQUANTIZED_MERGE: &str = "a QLoRA adapter trained over a checkpoint saved in bitsandbytes 4-bit has no 16-bit base weights to patch in process; the export stage's `merged:` writes it over the checkpoint's dequantized copy";

/// Check a 4-bit base's settings (`quantization`, written at `settings`: `method.qlora`, an
/// evaluate stage's `base_quantization`) against the bitsandbytes `quantization_config` of the
/// checkpoint (`stored`, from `config_path`): the 4-bit type and double quantization must be
/// the checkpoint's, since its weights are used as stored. The error names config.json's key,
/// the setting and the value to write.
pub fn check_stored_base(
    quantization: &BaseQuantization,
    stored: &BnbQuantization,
    config_path: &Path,
    settings: &str,
) -> Result<(), PeftError> {
    let differ = |key: &str, field: &str, stored: String, asked: String| {
        Err(PeftError::invalid(format!(
            "{}: key `quantization_config.{key}`: the checkpoint is stored with {field} {stored}, but {settings}.{field} is {asked}; a checkpoint saved in 4 bits is used as stored (never re-quantized): set {settings}.{field}: {stored}, or use its 16-bit original",
            config_path.display()
        )))
    };
    let wanted = &quantization.config;
    if stored.quant_type != wanted.quant_type {
        return differ(
            "bnb_4bit_quant_type",
            "quant_type",
            stored.quant_type.name().into(),
            wanted.quant_type.name().into(),
        );
    }
    if stored.double_quant != wanted.double_quant {
        return differ(
            "bnb_4bit_use_double_quant",
            "double_quant",
            stored.double_quant.to_string(),
            wanted.double_quant.to_string(),
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::quant::{QuantConfig, QuantType};

    #[test]
    fn a_stored_base_that_differs_from_the_method_names_the_key_and_the_value_to_write() {
        let wanted = BaseQuantization {
            config: QuantConfig::default(),
            compute_dtype: None,
            prequantized: true,
        };
        let stored = |quant_type, double_quant| BnbQuantization {
            quant_type,
            double_quant,
            compute_dtype: None,
        };
        let path = Path::new("/models/x/config.json");
        assert!(
            check_stored_base(&wanted, &stored(QuantType::Nf4, true), path, "method.qlora").is_ok()
        );
        let error = check_stored_base(&wanted, &stored(QuantType::Fp4, true), path, "method.qlora")
            .unwrap_err()
            .to_string();
        for text in [
            "/models/x/config.json",
            "quantization_config.bnb_4bit_quant_type",
            "set method.qlora.quant_type: fp4",
        ] {
            assert!(error.contains(text), "{error}");
        }
        let error = check_stored_base(
            &wanted,
            &stored(QuantType::Nf4, false),
            path,
            "method.qlora",
        )
        .unwrap_err()
        .to_string();
        assert!(
            error.contains("set method.qlora.double_quant: false"),
            "{error}"
        );
    }
}
