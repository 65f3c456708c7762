//! [`QuantizedTensor`]: one 4-bit blockwise-quantized tensor in host memory, in bitsandbytes'
//! layout (packed codes, absmax — plain or double-quantized — and the shape and dtype it came
//! from), with its quantization from `f32` values and its dequantization.
//!
//! Owns the composition of [`super::blockwise`] and [`super::double_quant`] into bitsandbytes'
//! `quantize_4bit` / `dequantize_4bit` and the consistency checks of a state read from disk.
//! Must not: touch a device (see [`super::QuantizedWeight`]) or read files.

use candle_core::{DType, Device, Tensor};

use super::blockwise;
use super::double_quant::{self, NESTED_BLOCK_SIZE};
use super::nf4::QuantType;
use super::QuantError;

/// How to quantize (bitsandbytes' `bnb_4bit_quant_type`, block size, `bnb_4bit_use_double_quant`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct QuantConfig {
    pub quant_type: QuantType,
    /// Values per absmax (bitsandbytes: 32, 64, …, 4096; QLoRA: 64).
    pub block_size: usize,
    /// Quantize the absmax values to 8 bits in blocks of 256 (QLoRA's default).
    pub double_quant: bool,
}

impl Default for QuantConfig {
    /// QLoRA's setting: NF4, blocks of 64, double quantization.
    fn default() -> Self {
        Self {
            quant_type: QuantType::Nf4,
            block_size: 64,
            double_quant: true,
        }
    }
}

/// The block sizes bitsandbytes accepts for 4-bit quantization.
pub const BLOCK_SIZES: [usize; 8] = [32, 64, 128, 256, 512, 1024, 2048, 4096];

impl QuantConfig {
    pub fn validate(&self) -> Result<(), QuantError> {
        if !BLOCK_SIZES.contains(&self.block_size) {
            return Err(QuantError::Invalid(format!(
                "block size {} is not one of {BLOCK_SIZES:?}",
                self.block_size
            )));
        }
        Ok(())
    }
}

/// The absmax values quantized to 8 bits (bitsandbytes' `state2` + `offset`).
#[derive(Debug, Clone, PartialEq)]
pub struct NestedAbsmax {
    /// One 8-bit code per 4-bit block (`weight.absmax` in a saved checkpoint).
    pub quantized: Vec<u8>,
    /// One `f32` absmax per nested block (`weight.nested_absmax`).
    pub scale: Vec<f32>,
    /// The 256-level code (`weight.nested_quant_map`; the dynamic map when quantized here).
    pub code: Vec<f32>,
    /// Absmax values per nested block (`nested_blocksize`, 256).
    pub block_size: usize,
    /// Mean subtracted before quantizing (`nested_offset`).
    pub offset: f32,
}

/// The per-block scales of a 4-bit tensor.
#[derive(Debug, Clone, PartialEq)]
pub enum Absmax {
    Plain(Vec<f32>),
    Nested(NestedAbsmax),
}

/// A 4-bit blockwise-quantized tensor, as bitsandbytes stores a `Params4bit` + `QuantState`.
#[derive(Debug, Clone, PartialEq)]
pub struct QuantizedTensor {
    /// Logical shape (`[out, in]` for a linear weight).
    pub shape: Vec<usize>,
    /// The dtype the values had (`quant_state.dtype`), which dequantization returns by default.
    pub dtype: DType,
    pub quant_type: QuantType,
    pub block_size: usize,
    /// `ceil(n / 2)` bytes, two codes each, the first value in the high nibble (row-major order).
    pub packed: Vec<u8>,
    pub absmax: Absmax,
}

impl QuantizedTensor {
    /// Quantize `values` (row-major, `shape`), which came from a tensor of `dtype`.
    pub fn quantize<T: blockwise::Element>(
        values: &[T],
        shape: &[usize],
        dtype: DType,
        config: &QuantConfig,
    ) -> Result<Self, QuantError> {
        config.validate()?;
        let count: usize = shape.iter().product();
        if count != values.len() {
            return Err(QuantError::Invalid(format!(
                "shape {shape:?} holds {count} values, got {}",
                values.len()
            )));
        }
        let (packed, absmax) =
            blockwise::quantize_4bit(values, config.quant_type, config.block_size);
        let absmax = if config.double_quant {
            let offset = double_quant::mean_offset(&absmax);
            let centred: Vec<f32> = absmax.iter().map(|&x| x - offset).collect();
            let code = double_quant::dynamic_map();
            let (quantized, scale) =
                double_quant::quantize_8bit(&centred, &code, NESTED_BLOCK_SIZE);
            Absmax::Nested(NestedAbsmax {
                quantized,
                scale,
                code: code.to_vec(),
                block_size: NESTED_BLOCK_SIZE,
                offset,
            })
        } else {
            Absmax::Plain(absmax)
        };
        Ok(Self {
            shape: shape.to_vec(),
            dtype,
            quant_type: config.quant_type,
            block_size: config.block_size,
            packed,
            absmax,
        })
    }

    /// Quantize a (CPU or device) tensor of any float dtype; the values are read as `f32`
    /// (exact from bf16/f16, as bitsandbytes' `.float()`).
    pub fn from_tensor(tensor: &Tensor, config: &QuantConfig) -> Result<Self, QuantError> {
        let reading =
            |error: candle_core::Error| QuantError::Invalid(format!("reading the tensor: {error}"));
        let flat = tensor.flatten_all().map_err(reading)?;
        let (shape, dtype) = (tensor.dims(), tensor.dtype());
        // A contiguous host tensor is read where it lies (no copy of its values first).
        {
            use candle_core::{CpuStorage, Storage};
            let (storage, layout) = flat.storage_and_layout();
            if let (Storage::Cpu(storage), Some((start, end))) =
                (&*storage, layout.contiguous_offsets())
            {
                match storage {
                    CpuStorage::BF16(values) => {
                        return Self::quantize(&values[start..end], shape, dtype, config)
                    }
                    CpuStorage::F16(values) => {
                        return Self::quantize(&values[start..end], shape, dtype, config)
                    }
                    CpuStorage::F32(values) => {
                        return Self::quantize(&values[start..end], shape, dtype, config)
                    }
                    _ => {}
                }
            }
        }
        // 16-bit weights are copied to the host as they are and widened inside the (parallel)
        // quantizer: a conversion to an f32 tensor first took longer than the quantization.
        match dtype {
            DType::BF16 => Self::quantize(
                &flat.to_vec1::<half::bf16>().map_err(reading)?,
                shape,
                dtype,
                config,
            ),
            DType::F16 => Self::quantize(
                &flat.to_vec1::<half::f16>().map_err(reading)?,
                shape,
                dtype,
                config,
            ),
            _ => {
                let values = flat
                    .to_dtype(DType::F32)
                    .and_then(|flat| flat.to_vec1::<f32>())
                    .map_err(reading)?;
                Self::quantize(&values, shape, dtype, config)
            }
        }
    }

    /// Number of values.
    pub fn elem_count(&self) -> usize {
        self.shape.iter().product()
    }

    /// Number of 4-bit blocks (absmax values).
    pub fn block_count(&self) -> usize {
        self.elem_count().div_ceil(self.block_size)
    }

    /// The absmax of every block as `f32` (double-dequantized when nested).
    pub fn absmax_f32(&self) -> Vec<f32> {
        match &self.absmax {
            Absmax::Plain(values) => values.clone(),
            Absmax::Nested(nested) => double_quant::dequantize_absmax(
                &nested.quantized,
                &nested.scale,
                &nested.code,
                nested.block_size,
                nested.offset,
            ),
        }
    }

    /// All values as `f32`, equal to bitsandbytes' `dequantize_4bit(..., dtype=float32)` bit for bit.
    pub fn dequantize_f32(&self) -> Vec<f32> {
        blockwise::dequantize_4bit(
            &self.packed,
            &self.absmax_f32(),
            &self.quant_type.code(),
            self.block_size,
            self.elem_count(),
        )
    }

    /// The dequantized tensor in `dtype` on `device` (computed in `f32`, rounded once to `dtype`
    /// to nearest-even, as bitsandbytes' kernels do).
    pub fn dequantize(&self, dtype: DType, device: &Device) -> candle_core::Result<Tensor> {
        Tensor::from_vec(self.dequantize_f32(), self.shape.as_slice(), &Device::Cpu)?
            .to_dtype(dtype)?
            .to_device(device)
    }

    /// Bytes this tensor occupies (packed codes, absmax and nested state, code books).
    pub fn storage_bytes(&self) -> usize {
        let codes = self.packed.len() + 16 * 4;
        codes
            + match &self.absmax {
                Absmax::Plain(values) => values.len() * 4,
                Absmax::Nested(nested) => {
                    nested.quantized.len() + nested.scale.len() * 4 + nested.code.len() * 4 + 4
                }
            }
    }

    /// Check that the parts agree with each other (a state read from disk): sizes of the packed
    /// codes, absmax, nested scales and code books.
    pub fn check(&self) -> Result<(), QuantError> {
        let invalid = |message: String| Err(QuantError::Invalid(message));
        if self.block_size == 0 {
            return invalid("block size 0".into());
        }
        let count = self.elem_count();
        if self.packed.len() != count.div_ceil(2) {
            return invalid(format!(
                "{} packed bytes for {count} values (expected {})",
                self.packed.len(),
                count.div_ceil(2)
            ));
        }
        let blocks = self.block_count();
        match &self.absmax {
            Absmax::Plain(values) if values.len() != blocks => invalid(format!(
                "{} absmax values for {blocks} blocks of {}",
                values.len(),
                self.block_size
            )),
            Absmax::Plain(_) => Ok(()),
            Absmax::Nested(nested) => {
                if nested.quantized.len() != blocks {
                    return invalid(format!(
                        "{} quantized absmax values for {blocks} blocks",
                        nested.quantized.len()
                    ));
                }
                if nested.block_size == 0
                    || nested.scale.len() != blocks.div_ceil(nested.block_size)
                {
                    return invalid(format!(
                        "{} nested absmax values for {blocks} absmax values in blocks of {}",
                        nested.scale.len(),
                        nested.block_size
                    ));
                }
                if nested.code.len() != 256 {
                    return invalid(format!(
                        "nested code book of {} levels (expected 256)",
                        nested.code.len()
                    ));
                }
                Ok(())
            }
        }
    }
}

/// Bytes of one quantized tensor of `count` values under `config` (what
/// [`QuantizedTensor::storage_bytes`] reports once quantized).
pub fn quantized_bytes(count: usize, config: &QuantConfig) -> usize {
    let blocks = count.div_ceil(config.block_size.max(1));
    let codes = count.div_ceil(2) + 16 * 4;
    if config.double_quant {
        codes + blocks + blocks.div_ceil(NESTED_BLOCK_SIZE) * 4 + 256 * 4 + 4
    } else {
        codes + blocks * 4
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_host_tensor_read_in_place_quantizes_as_its_copied_values() {
        // A view that starts inside its storage (narrowed rows) and a strided one (transposed):
        // both quantize exactly as their values copied out, in every float dtype.
        let values: Vec<f32> = (0..3 * 1000)
            .map(|i| ((i * 37 % 101) as f32 - 50.0) / 7.0)
            .collect();
        let whole = Tensor::from_vec(values, (3, 1000), &Device::Cpu).unwrap();
        let config = QuantConfig::default();
        for dtype in [DType::F32, DType::BF16, DType::F16] {
            let whole = whole.to_dtype(dtype).unwrap();
            for view in [
                whole.narrow(0, 1, 2).unwrap(),
                whole.t().unwrap().narrow(0, 3, 500).unwrap(),
            ] {
                let copied = Tensor::from_vec(
                    view.flatten_all()
                        .unwrap()
                        .to_dtype(DType::F32)
                        .unwrap()
                        .to_vec1::<f32>()
                        .unwrap(),
                    view.dims(),
                    &Device::Cpu,
                )
                .unwrap();
                let in_place = QuantizedTensor::from_tensor(&view, &config).unwrap();
                let reference = QuantizedTensor::from_tensor(&copied, &config).unwrap();
                assert_eq!(in_place.packed, reference.packed, "{dtype:?}");
                assert_eq!(in_place.absmax_f32(), reference.absmax_f32(), "{dtype:?}");
            }
        }
    }
}
