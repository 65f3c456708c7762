//! DoRA (Liu et al. 2024) as PEFT's `use_dora` LoRA option: the adapted weight `W + s·B·A` is
//! split into its direction and a trained magnitude vector `m` (one value per output feature,
//! PEFT's `lora_magnitude_vector`), initialised to the row norms `‖W + s·B·A‖` (over the input
//! dimension, what PEFT calls the column-wise norm; `= ‖W‖` at init since B = 0).
//! Forward (PEFT's `DoraLinearLayer.forward`): with `f = m / ‖W + s·B·A‖` (the norm detached,
//! paper §4.3), `y = W x + b + (f − 1) ⊙ W x' + f ⊙ s·B A x'` (`x'` = dropout(x); without dropout
//! `W x'` is the base result minus its bias). Merge: `W' = f ⊙ (W + s·B·A)` row-wise, bias
//! unchanged. The math only; the layer lives in `super` (mod.rs). Never prints.

use candle_core::{DType, Tensor};

/// `‖W + Δ‖` per output row (`[out]`, f32) of `weight` and `delta` (`[out, in]`).
pub(crate) fn weight_norm(weight: &Tensor, delta: &Tensor) -> candle_core::Result<Tensor> {
    weight
        .to_dtype(DType::F32)?
        .add(&delta.to_dtype(DType::F32)?)?
        .sqr()?
        .sum(1)?
        .sqrt()
}

/// The merged DoRA weight `(m / ‖W + Δ‖) ⊙ (W + Δ)` (rows scaled), f32.
pub(crate) fn merged_weight(
    weight: &Tensor,
    delta: &Tensor,
    magnitude: &Tensor,
) -> candle_core::Result<Tensor> {
    let weight = weight.to_dtype(DType::F32)?;
    let delta = delta.to_dtype(DType::F32)?.to_device(weight.device())?;
    let norm = weight_norm(&weight, &delta)?;
    let factor = magnitude
        .to_dtype(DType::F32)?
        .to_device(weight.device())?
        .div(&norm)?
        .unsqueeze(1)?;
    weight.add(&delta)?.broadcast_mul(&factor)
}

/// The DoRA part added to the frozen result `y = W x + b`: `(f − 1) ⊙ base + f ⊙ lora` with
/// `f = magnitude / norm` (`norm` detached by the caller), broadcast over the last dimension.
pub(crate) fn dora_update(
    base: &Tensor,
    lora: &Tensor,
    magnitude: &Tensor,
    norm: &Tensor,
) -> candle_core::Result<Tensor> {
    // The detached norm and a frozen base output (layer 0's) get no stored gradient.
    let factor = crate::ops::div_constant(
        &magnitude.to_dtype(base.dtype())?,
        &norm.to_dtype(base.dtype())?,
    )?;
    let shifted = factor.affine(1.0, -1.0)?;
    crate::ops::add_tracked(
        &crate::ops::broadcast_mul_tracked(base, &shifted)?,
        &lora.broadcast_mul(&factor)?,
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn norm_is_per_output_row_and_merge_keeps_the_magnitude() {
        let w = Tensor::new(&[[3f32, 4.0], [0.0, 2.0], [1.0, 0.0]], &Device::Cpu).unwrap();
        let zero = Tensor::zeros((3, 2), DType::F32, &Device::Cpu).unwrap();
        let norm: Vec<f32> = weight_norm(&w, &zero).unwrap().to_vec1().unwrap();
        assert_eq!(norm, vec![5.0, 2.0, 1.0]);
        let m = Tensor::new(&[10f32, 1.0, 3.0], &Device::Cpu).unwrap();
        let merged = merged_weight(&w, &zero, &m).unwrap();
        // Each merged row has the magnitude as its norm.
        let rows: Vec<f32> = weight_norm(&merged, &zero).unwrap().to_vec1().unwrap();
        assert_eq!(rows, vec![10.0, 1.0, 3.0]);
    }
}
