//! A trained copy of one normalization layer (PEFT's `ModulesToSaveWrapper` around an RMSNorm or
//! a LayerNorm): its weight (and LayerNorm's bias) as f32 variables starting at the base values,
//! with PEFT's tensor names, the replacement the model takes through `Hooks::norms`, and its merge
//! patches. Never prints.

use std::path::Path;
use std::sync::Arc;

use candle_core::{DType, Device, Tensor, Var};

use super::super::format::PEFT_PREFIX;
use super::super::{live, Parameter, PatchChange, PeftError, TensorContext, WeightPatch};
use crate::models::NormWeights;

/// The PEFT tensor name of `module`'s `parameter` (`ModulesToSaveWrapper.adapter_state_dict`:
/// the copy's own `state_dict` keys under the module's name).
pub fn tensor_name(module: &str, parameter: Parameter) -> String {
    format!("{PEFT_PREFIX}{module}.{}", parameter.name())
}

/// The merge patch writing `tensor` (trained, any shape with the parameter's element count) as
/// `module`'s `parameter`.
pub fn patch(module: &str, parameter: Parameter, tensor: Tensor) -> Result<WeightPatch, PeftError> {
    let length = tensor.elem_count();
    if tensor.rank() != 1 {
        return Err(PeftError::invalid(format!(
            "the trained {} of the norm `{module}` has shape {:?}, not a vector",
            parameter.name(),
            tensor.dims()
        )));
    }
    let tensor = tensor
        .to_dtype(DType::F32)
        .context(|| format!("merging into `{module}`"))?;
    let what = format!("{module}.{}", parameter.name());
    Ok(WeightPatch {
        path: module.to_string(),
        parameter,
        // A vector is patched as a one-column matrix (`models::checkpoint`).
        dims: (length, 1),
        change: PatchChange::Map(Arc::new(move |weight: &Tensor| {
            if weight.elem_count() != length {
                candle_core::bail!(
                    "`{what}` has {} values in the base model, the trained copy {length}",
                    weight.elem_count()
                )
            }
            tensor
                .to_device(weight.device())?
                .to_dtype(weight.dtype())?
                .reshape(weight.shape())
        })),
        optional: false,
    })
}

/// One normalization layer trained as a whole copy.
#[derive(Debug)]
pub struct TrainedNorm {
    module: String,
    weight: Var,
    bias: Option<Var>,
}

/// `tensor` as an f32 variable on `device`.
fn variable(tensor: &Tensor, device: &Device, what: impl Fn() -> String) -> Result<Var, PeftError> {
    tensor
        .to_dtype(DType::F32)
        .and_then(|t| t.to_device(device))
        .and_then(|t| t.copy())
        .and_then(|t| Var::from_tensor(&t))
        .context(what)
}

impl TrainedNorm {
    /// A copy starting at the model's frozen `base` (PEFT deep-copies the module).
    pub fn from_base(module: &str, base: &NormWeights, device: &Device) -> Result<Self, PeftError> {
        let context = || format!("copying the norm `{module}`");
        Ok(TrainedNorm {
            module: module.to_string(),
            weight: variable(&base.weight, device, context)?,
            bias: base
                .bias
                .as_ref()
                .map(|bias| variable(bias, device, context))
                .transpose()?,
        })
    }

    /// A copy read from an adapter file (`take` removes a tensor by name), checked against the
    /// model's frozen `base`: the same shapes, and a bias exactly where the layer has one.
    pub fn from_file(
        module: &str,
        base: &NormWeights,
        mut take: impl FnMut(&str) -> Result<Option<Tensor>, PeftError>,
        weights_path: &Path,
    ) -> Result<Self, PeftError> {
        let read = |parameter: Parameter,
                    base: &Tensor,
                    take: &mut dyn FnMut(&str) -> Result<Option<Tensor>, PeftError>|
         -> Result<Var, PeftError> {
            let name = tensor_name(module, parameter);
            let tensor = take(&name)?.ok_or_else(|| {
                PeftError::invalid(format!(
                    "{}: no tensor `{name}` (the config's modules_to_save asks for the norm `{module}`)",
                    weights_path.display()
                ))
            })?;
            if tensor.dims() != base.dims() {
                return Err(PeftError::invalid(format!(
                    "{}: tensor `{name}` has shape {:?}; the model needs {:?}",
                    weights_path.display(),
                    tensor.dims(),
                    base.dims()
                )));
            }
            let device = tensor.device().clone();
            variable(&tensor, &device, || format!("reading `{name}`"))
        };
        let weight = read(Parameter::Weight, &base.weight, &mut take)?;
        let bias = base
            .bias
            .as_ref()
            .map(|bias| read(Parameter::Bias, bias, &mut take))
            .transpose()?;
        Ok(TrainedNorm {
            module: module.to_string(),
            weight,
            bias,
        })
    }

    pub fn module(&self) -> &str {
        &self.module
    }

    /// The variables by PEFT tensor name.
    pub fn vars(&self) -> Vec<(String, Var)> {
        let mut vars = vec![(
            tensor_name(&self.module, Parameter::Weight),
            self.weight.clone(),
        )];
        if let Some(bias) = &self.bias {
            vars.push((tensor_name(&self.module, Parameter::Bias), bias.clone()));
        }
        vars
    }

    /// The weights the model uses in place of its frozen ones (tracked while training).
    pub fn weights(&self, training: bool) -> NormWeights {
        NormWeights {
            weight: live(&self.weight, training),
            bias: self.bias.as_ref().map(|bias| live(bias, training)),
        }
    }

    pub fn merge_patches(&self) -> Result<Vec<WeightPatch>, PeftError> {
        let mut patches = vec![patch(
            &self.module,
            Parameter::Weight,
            self.weight.as_tensor().detach(),
        )?];
        if let Some(bias) = &self.bias {
            patches.push(patch(
                &self.module,
                Parameter::Bias,
                bias.as_tensor().detach(),
            )?);
        }
        Ok(patches)
    }
}
