//! Blockwise 4-bit quantization and dequantization, bit-exact with bitsandbytes' CPU backend
//! (`quantize_4bit` / `dequantize_4bit`).
//!
//! Owns the per-block rules: the flattened values are cut into blocks of `block_size`; each full
//! block's absmax is `max |x|` and its values are scaled by the `f32` reciprocal
//! `1 / max(absmax, 1e-38)` (a multiplication, so an all-zero block scales to zeros instead of
//! NaN), clamped to [-1, 1] and encoded to the nearest level ([`Bounds::encode`]). A trailing
//! partial block stores the *clamped* absmax and divides by it (bitsandbytes' remainder path). An
//! odd count is padded with one scaled zero. Two codes per byte, the first value in the high
//! nibble. Dequantization is one `f32` product `level · absmax` per value.
//! Must not: know tensors, devices or the double quantization of the absmax.

use super::nf4::{Bounds, QuantType};

/// bitsandbytes' floor on an absmax before taking its reciprocal (`absmax.clamp(min=1e-38)`,
/// a python float rounded to `f32`: a subnormal).
const ABSMAX_FLOOR: f32 = 1e-38_f64 as f32;

/// The packed codes (`ceil(n / 2)` bytes, high nibble first) and one absmax per block.
pub fn quantize_4bit(
    values: &[f32],
    quant_type: QuantType,
    block_size: usize,
) -> (Vec<u8>, Vec<f32>) {
    let bounds = quant_type.bounds();
    let block_size = block_size.max(1);
    let mut codes: Vec<u8> = Vec::with_capacity(values.len() + 1);
    let mut absmax: Vec<f32> = Vec::with_capacity(values.len().div_ceil(block_size));
    let full = values.len() - values.len() % block_size;
    for block in values[..full].chunks_exact(block_size) {
        let max = block_absmax(block);
        absmax.push(max);
        let inverse = 1.0f32 / max.max(ABSMAX_FLOOR);
        codes.extend(block.iter().map(|&x| encode(&bounds, x * inverse)));
    }
    let rest = &values[full..];
    if !rest.is_empty() {
        let max = block_absmax(rest).max(ABSMAX_FLOOR);
        absmax.push(max);
        codes.extend(rest.iter().map(|&x| encode(&bounds, x / max)));
    }
    if codes.len() % 2 == 1 {
        codes.push(bounds.encode(0.0));
    }
    let packed = codes
        .chunks_exact(2)
        .map(|pair| (pair[0] << 4) | pair[1])
        .collect();
    (packed, absmax)
}

/// `max |x|` of a block (torch's `abs().max()`: a NaN propagates).
fn block_absmax(block: &[f32]) -> f32 {
    block.iter().fold(0.0f32, |max, &x| {
        let magnitude = x.abs();
        if magnitude.is_nan() || max.is_nan() {
            f32::NAN
        } else {
            max.max(magnitude)
        }
    })
}

#[inline]
fn encode(bounds: &Bounds, scaled: f32) -> u8 {
    bounds.encode(scaled.clamp(-1.0, 1.0))
}

/// The 4-bit code of value `index` in `packed` (high nibble first).
#[inline]
pub fn code_at(packed: &[u8], index: usize) -> u8 {
    let byte = packed[index / 2];
    if index % 2 == 0 {
        byte >> 4
    } else {
        byte & 0x0f
    }
}

/// The `count` values of `packed` as `f32`: `code[q] · absmax[block]`, one rounding each.
pub fn dequantize_4bit(
    packed: &[u8],
    absmax: &[f32],
    code: &[f32; 16],
    block_size: usize,
    count: usize,
) -> Vec<f32> {
    (0..count)
        .map(|index| code[code_at(packed, index) as usize] * absmax[index / block_size])
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn packs_high_nibble_first_and_round_trips_levels() {
        let code = QuantType::Nf4.code();
        // Levels times 2: the absmax is 2 and every value is a level exactly.
        let values: Vec<f32> = [15usize, 0, 7, 8, 15]
            .iter()
            .map(|&q| code[q] * 2.0)
            .collect();
        let (packed, absmax) = quantize_4bit(&values, QuantType::Nf4, 4);
        assert_eq!(absmax, vec![2.0, 2.0]);
        // 15,0 | 7,8 | 15,<pad: the code of 0 = 7>
        assert_eq!(packed, vec![0xf0, 0x78, 0xf7]);
        let back = dequantize_4bit(&packed, &absmax, &code, 4, values.len());
        for (a, b) in values.iter().zip(&back) {
            assert_eq!(a.to_bits(), b.to_bits());
        }
    }

    #[test]
    fn an_all_zero_block_encodes_zero_with_absmax_zero() {
        let (packed, absmax) = quantize_4bit(&[0.0; 8], QuantType::Nf4, 4);
        assert_eq!(absmax, vec![0.0, 0.0]);
        assert_eq!(packed, vec![0x77; 4]);
        // A trailing partial block stores its floored absmax (bitsandbytes' remainder path).
        let (packed, absmax) = quantize_4bit(&[0.0; 6], QuantType::Nf4, 4);
        assert_eq!(absmax, vec![0.0, ABSMAX_FLOOR]);
        assert_eq!(packed, vec![0x77; 3]);
    }
}
