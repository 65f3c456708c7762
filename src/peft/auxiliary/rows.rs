//! One trained table of embedding rows: the chosen rows of a module (PEFT's
//! `trainable_tokens_delta`) or a whole trained copy of it (a module to save), with its PEFT
//! tensor name, its slot table for the forward pass and its merge patch. Never prints.

use std::path::Path;
use std::sync::Arc;

use candle_core::{DType, Device, Tensor, Var};

use super::super::format::PEFT_PREFIX;
use super::super::{Parameter, PatchChange, PeftError, TensorContext, WeightPatch};

/// PEFT's tensor-name suffix of trained token rows (`TrainableTokensWrapper.adapter_state_dict`
/// with the adapter name removed).
pub const TOKEN_DELTA_SUFFIX: &str = ".token_adapter.trainable_tokens_delta";
/// The suffix of a module to save (`ModulesToSaveWrapper.adapter_state_dict`: the copy's own
/// `state_dict` keys under the module's name).
pub const WHOLE_WEIGHT_SUFFIX: &str = ".weight";

/// The PEFT tensor name of `module`'s token rows (`tokens`) or whole copy.
pub fn tensor_name(module: &str, tokens: bool) -> String {
    let suffix = if tokens {
        TOKEN_DELTA_SUFFIX
    } else {
        WHOLE_WEIGHT_SUFFIX
    };
    format!("{PEFT_PREFIX}{module}{suffix}")
}

/// The module a PEFT auxiliary tensor name belongs to.
pub fn module_of(name: &str) -> Option<&str> {
    let rest = name.strip_prefix(PEFT_PREFIX)?;
    rest.strip_suffix(TOKEN_DELTA_SUFFIX)
        .or_else(|| rest.strip_suffix(WHOLE_WEIGHT_SUFFIX))
}

/// `[vocab]` slots: 0 keeps the base row, `k` takes row `k − 1` of the trained rows.
fn slot_values(vocab: usize, indices: &[u32]) -> Result<Vec<u32>, String> {
    let mut slots = vec![0u32; vocab];
    for (position, &id) in indices.iter().enumerate() {
        let slot = slots
            .get_mut(id as usize)
            .ok_or_else(|| format!("token id {id} is outside the vocabulary of {vocab} rows"))?;
        if *slot != 0 {
            return Err(format!("token id {id} is given twice"));
        }
        *slot = position as u32 + 1;
    }
    Ok(slots)
}

/// Replace rows `indices` of `table` (`[vocab, hidden]`) by `rows` (`[n, hidden]`), as PEFT's
/// `weight.index_copy(0, indices, trainable_tokens_delta)` does.
pub fn replace_rows(table: &Tensor, indices: &[u32], rows: &Tensor) -> candle_core::Result<Tensor> {
    let (vocab, hidden) = table.dims2()?;
    let slots = slot_values(vocab, indices).map_err(candle_core::Error::Msg)?;
    let slots = Tensor::from_vec(slots, vocab, table.device())?;
    let rows = rows.to_device(table.device())?.to_dtype(table.dtype())?;
    let zero = Tensor::zeros((1, hidden), table.dtype(), table.device())?;
    let replaced = Tensor::cat(&[&zero, &rows], 0)?.index_select(&slots, 0)?;
    let keep = slots
        .ne(0u32)?
        .reshape((vocab, 1))?
        .broadcast_as((vocab, hidden))?;
    keep.where_cond(&replaced, table)
}

/// The merge patch of `module` from its trained `tensor`: its rows replaced (`indices`) or the
/// whole weight replaced.
pub fn patch(
    module: &str,
    indices: Option<Vec<u32>>,
    tensor: Tensor,
) -> Result<WeightPatch, PeftError> {
    let (rows, hidden) = tensor.dims2().map_err(|_| {
        PeftError::invalid(format!("the trained rows of `{module}` are not a matrix"))
    })?;
    let tensor = tensor
        .to_dtype(DType::F32)
        .context(|| format!("merging into `{module}`"))?;
    let (dims, change) = match indices {
        Some(indices) => (
            (0, hidden),
            PatchChange::Map(Arc::new(move |weight: &Tensor| {
                replace_rows(weight, &indices, &tensor)
            })),
        ),
        None => (
            (rows, hidden),
            PatchChange::Map(Arc::new(move |weight: &Tensor| {
                tensor.to_device(weight.device())?.to_dtype(weight.dtype())
            })),
        ),
    };
    Ok(WeightPatch {
        path: module.to_string(),
        parameter: Parameter::Weight,
        dims,
        change,
        optional: false,
    })
}

/// `lm_head` unchanged: with a trained copy of a tied embedding the head keeps the base
/// weights, so the merged checkpoint unties them (`models::checkpoint` writes `lm_head.weight`).
pub fn keep_head_patch() -> WeightPatch {
    WeightPatch {
        path: super::head::HEAD_PATH.to_string(),
        parameter: Parameter::Weight,
        dims: (0, 0),
        change: PatchChange::Map(Arc::new(|weight: &Tensor| Ok(weight.clone()))),
        optional: false,
    }
}

/// Rows `indices` of `base` as an f32 copy on `device` (`None` without indices). An id outside
/// the table is an error, not a panic.
fn base_rows(
    module: &str,
    indices: Option<&[u32]>,
    base: &Tensor,
    device: &Device,
) -> Result<Option<Tensor>, PeftError> {
    let Some(ids) = indices else {
        return Ok(None);
    };
    let vocab = base
        .dim(0)
        .context(|| format!("the base weight of `{module}`"))?;
    if let Some(id) = ids.iter().find(|id| **id as usize >= vocab) {
        return Err(PeftError::invalid(format!(
            "`{module}`: token id {id} is outside the vocabulary of {vocab} rows"
        )));
    }
    let context = || format!("copying the rows of `{module}`");
    let ids = Tensor::from_slice(ids, ids.len(), base.device()).context(context)?;
    base.index_select(&ids, 0)
        .and_then(|rows| rows.to_dtype(DType::F32))
        .and_then(|rows| rows.to_device(device))
        .and_then(|rows| rows.copy())
        .map(Some)
        .context(context)
}

/// Trained rows of one module, as variables.
#[derive(Debug)]
pub struct TrainedRows {
    module: String,
    /// The token ids (row `k` of the variable is token `indices[k]`); `None`: a whole copy.
    indices: Option<Vec<u32>>,
    /// `[vocab]` u32 slots on the model's device (see [`slot_values`]); `None` for a whole copy.
    slots: Option<Tensor>,
    /// The base rows the trained ones replace (`[n, hidden]`, f32; token rows only): an output
    /// projection adds `x·(rows − base)ᵀ` to its base output, exactly the base at step 0.
    base_rows: Option<Tensor>,
    var: Var,
}

impl TrainedRows {
    /// Rows starting at the base rows (PEFT's default `init_weights`), or a whole copy.
    pub fn from_base(
        module: &str,
        indices: Option<Vec<u32>>,
        base: &Tensor,
        device: &Device,
    ) -> Result<Self, PeftError> {
        let context = || format!("copying the rows of `{module}`");
        let rows = match base_rows(module, indices.as_deref(), base, device)? {
            Some(rows) => rows,
            None => base
                .to_dtype(DType::F32)
                .and_then(|rows| rows.to_device(device))
                .and_then(|rows| rows.copy())
                .context(context)?,
        };
        Self::new(module, indices, rows, base, device)
    }

    /// Rows read from an adapter file, checked against the model's table `base`
    /// (`[vocab, hidden]`).
    pub fn from_file(
        module: &str,
        indices: Option<Vec<u32>>,
        tensor: Tensor,
        base: &Tensor,
        weights_path: &Path,
    ) -> Result<Self, PeftError> {
        let (vocab, hidden) = base
            .dims2()
            .context(|| format!("the base weight of `{module}`"))?;
        let expected = [indices.as_ref().map_or(vocab, Vec::len), hidden];
        if tensor.dims() != expected {
            return Err(PeftError::invalid(format!(
                "{}: tensor `{}` has shape {:?}; the model needs {expected:?}",
                weights_path.display(),
                tensor_name(module, indices.is_some()),
                tensor.dims()
            )));
        }
        let device = tensor.device().clone();
        let rows = tensor
            .to_dtype(DType::F32)
            .context(|| format!("reading `{module}`"))?;
        Self::new(module, indices, rows, base, &device)
    }

    fn new(
        module: &str,
        indices: Option<Vec<u32>>,
        rows: Tensor,
        base: &Tensor,
        device: &Device,
    ) -> Result<Self, PeftError> {
        let vocab = base
            .dim(0)
            .context(|| format!("the base weight of `{module}`"))?;
        let base_rows = base_rows(module, indices.as_deref(), base, device)?;
        let slots = match &indices {
            Some(ids) => {
                let slots = slot_values(vocab, ids)
                    .map_err(|message| PeftError::invalid(format!("`{module}`: {message}")))?;
                Some(Tensor::from_vec(slots, vocab, device).context(|| "token slots".into())?)
            }
            None => None,
        };
        Ok(TrainedRows {
            module: module.to_string(),
            indices,
            slots,
            base_rows,
            var: Var::from_tensor(&rows).context(|| format!("the rows of `{module}`"))?,
        })
    }

    pub fn tensor_name(&self) -> String {
        tensor_name(&self.module, self.indices.is_some())
    }

    pub fn slots(&self) -> Option<&Tensor> {
        self.slots.as_ref()
    }

    /// The base rows the token rows replace (`None` for a whole copy).
    pub fn base_rows(&self) -> Option<&Tensor> {
        self.base_rows.as_ref()
    }

    pub fn var(&self) -> &Var {
        &self.var
    }

    pub fn merge_patch(&self) -> Result<WeightPatch, PeftError> {
        patch(
            &self.module,
            self.indices.clone(),
            self.var.as_tensor().detach(),
        )
    }
}
