//! Double quantization of the 4-bit absmax values, bit-exact with bitsandbytes' CPU backend
//! (`quantize_4bit(..., compress_statistics=True)` → `quantize_blockwise(absmax - offset, blocksize=256)`).
//!
//! Owns: the signed 8-bit dynamic code book (`create_dynamic_map(signed=True)`, built with torch's
//! `float32` `linspace`, whose scalar path is one fused multiply-add per point); the offset (the
//! mean of the absmax values: the sum rounded to `f32`, then an `f32` division); bitsandbytes'
//! CPU 8-bit blockwise quantizer, which does *not* pick the nearest of the 256 levels: it maps
//! `x / absmax` onto a 65 536-bin grid of [-1, 1] (`(x + 1) · ½ · 65535 + ½`, truncated) and takes
//! the precomputed level of that bin (the first level whose upper midpoint is not below the bin's
//! left edge); and the dequantization `code[q] · scale + offset` (two `f32` roundings, never fused).
//! Must not: know 4-bit codes or tensors.

/// bitsandbytes' block size for the nested (absmax) quantization.
pub const NESTED_BLOCK_SIZE: usize = 256;

/// Bins of bitsandbytes' CPU quantization lookup table.
const LUT_BINS: usize = 65_536;

/// torch's `linspace(start, end, steps)` in `float32` (the scalar kernel: the first half counts up
/// from `start`, the rest down from `end`, each point one fused multiply-add).
fn linspace(start: f32, end: f32, steps: usize) -> Vec<f32> {
    let step = (end - start) / (steps - 1) as f32;
    let halfway = steps / 2;
    (0..steps)
        .map(|index| {
            if index < halfway {
                step.mul_add(index as f32, start)
            } else {
                (-step).mul_add((steps - index - 1) as f32, end)
            }
        })
        .collect()
}

/// The signed dynamic 8-bit map (`create_dynamic_map(signed=True, max_exponent_bits=7,
/// total_bits=8)`): for exponents 10⁻⁶ … 10⁰, `2^i` fraction means in (0.1, 1) scaled by `10^(i-6)`
/// with both signs, plus 0 and 1; sorted.
pub fn dynamic_map() -> [f32; 256] {
    let mut data: Vec<f32> = Vec::with_capacity(256);
    for exponent in 0..7 {
        let boundaries = linspace(0.1f64 as f32, 1.0, (1 << exponent) + 1);
        // A python float times a float32 tensor: the scalar is rounded to f32 first.
        let scale = 10f64.powi(exponent - 6) as f32;
        for pair in boundaries.windows(2) {
            let mean = (pair[0] + pair[1]) / 2.0;
            data.push(scale * mean);
            data.push(-scale * mean);
        }
    }
    data.push(0.0);
    data.push(1.0);
    data.sort_by(f32::total_cmp);
    let mut map = [0f32; 256];
    map.copy_from_slice(&data);
    map
}

/// The offset bitsandbytes subtracts before the nested quantization: `absmax.mean()` in `f32`.
pub fn mean_offset(absmax: &[f32]) -> f32 {
    if absmax.is_empty() {
        return 0.0;
    }
    let sum: f64 = absmax.iter().map(|&x| f64::from(x)).sum();
    (sum as f32) / absmax.len() as f32
}

/// bitsandbytes' quantization lookup: bin → code index, for a sorted 256-level code.
pub struct Lookup {
    bins: Vec<u8>,
}

impl Lookup {
    pub fn new(code: &[f32; 256]) -> Self {
        let midpoints: Vec<f32> = code
            .windows(2)
            .map(|pair| 0.5 * (pair[0] + pair[1]))
            .collect();
        let mut bins = Vec::with_capacity(LUT_BINS);
        let mut index = 0usize;
        for bin in 0..LUT_BINS {
            let value = -1.0f32 + (2.0f32 * bin as f32) / (LUT_BINS - 1) as f32;
            while index < midpoints.len() && midpoints[index] < value {
                index += 1;
            }
            bins.push(index as u8);
        }
        Self { bins }
    }

    /// The code of a value already scaled by the block's reciprocal absmax.
    #[inline]
    pub fn encode(&self, scaled: f32) -> u8 {
        let clamped = scaled.clamp(-1.0, 1.0);
        let position = (clamped + 1.0) * 0.5 * (LUT_BINS - 1) as f32 + 0.5;
        // Truncation toward zero of a value in [0.5, 65535.5]: `as` saturates, never wraps.
        self.bins[position as u16 as usize]
    }
}

/// 8-bit blockwise quantization (bitsandbytes' CPU `quantize_blockwise`): one absmax per block of
/// `block_size` (an all-zero block stores codes 0), codes from [`Lookup::encode`] of `x · (1/absmax)`.
pub fn quantize_8bit(values: &[f32], code: &[f32; 256], block_size: usize) -> (Vec<u8>, Vec<f32>) {
    let lookup = Lookup::new(code);
    let mut codes = Vec::with_capacity(values.len());
    let mut absmax = Vec::with_capacity(values.len().div_ceil(block_size));
    for block in values.chunks(block_size.max(1)) {
        let max = block.iter().fold(0.0f32, |max, &x| max.max(x.abs()));
        absmax.push(max);
        if max == 0.0 {
            codes.extend(std::iter::repeat_n(0u8, block.len()));
            continue;
        }
        let inverse = 1.0f32 / max;
        codes.extend(block.iter().map(|&x| lookup.encode(x * inverse)));
    }
    (codes, absmax)
}

/// The absmax values back: `code[q] · scale[i / block_size] + offset`, rounded after each step.
pub fn dequantize_absmax(
    quantized: &[u8],
    scale: &[f32],
    code: &[f32],
    block_size: usize,
    offset: f32,
) -> Vec<f32> {
    quantized
        .iter()
        .enumerate()
        .map(|(index, &q)| {
            let value = code[q as usize] * scale[index / block_size];
            value + offset
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_dynamic_map_is_sorted_signed_and_ends_at_one() {
        let map = dynamic_map();
        assert!(map.windows(2).all(|pair| pair[0] <= pair[1]));
        assert_eq!(map[255], 1.0);
        assert_eq!(map[0], -map[254]);
        assert_eq!(map.iter().filter(|&&x| x == 0.0).count(), 1);
        // Smallest magnitude: 1e-6 · (0.1 + 1) / 2.
        assert!((map[128] - 0.55e-6).abs() < 1e-9, "{}", map[128]);
    }

    #[test]
    fn the_lookup_is_not_always_the_nearest_level() {
        // Levels 0 and 1e-6 are far closer than one bin (2/65535): values in between all land in
        // the same bin, so one of the two is unreachable, unlike a nearest-level search.
        let map = dynamic_map();
        let lookup = Lookup::new(&map);
        let zero = map.iter().position(|&x| x == 0.0).unwrap_or_default();
        assert_eq!(lookup.encode(map[zero + 1]), lookup.encode(map[zero]));
        assert_eq!(lookup.encode(1.0), 255);
        assert_eq!(lookup.encode(-1.0), 0);
    }

    #[test]
    fn round_trip_error_is_below_a_percent_of_the_block_max() {
        let values: Vec<f32> = (0..600)
            .map(|i| ((i * 37 % 101) as f32 - 50.0) / 1000.0)
            .collect();
        let map = dynamic_map();
        let (codes, absmax) = quantize_8bit(&values, &map, NESTED_BLOCK_SIZE);
        let back = dequantize_absmax(&codes, &absmax, &map, NESTED_BLOCK_SIZE, 0.0);
        for (index, (a, b)) in values.iter().zip(&back).enumerate() {
            let max = absmax[index / NESTED_BLOCK_SIZE];
            assert!((a - b).abs() <= 0.01 * max, "value {index}: {a} vs {b}");
        }
    }
}
