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

use rayon::prelude::*;

use super::nf4::{Bounds, QuantType};

/// bitsandbytes' floor on an absmax before taking its reciprocal (`absmax.clamp(min=1e-38)`,
/// a python float rounded to `f32`: a subnormal).
const ABSMAX_FLOOR: f32 = 1e-38_f64 as f32;

/// An element the quantizer reads: `f32`, or a 16-bit float widened to `f32` exactly (as
/// bitsandbytes' `.float()`), so a bf16/f16 weight is quantized where it lies, without an `f32` copy.
pub trait Element: Copy + Send + Sync {
    fn to_f32(self) -> f32;
}

impl Element for f32 {
    #[inline(always)]
    fn to_f32(self) -> f32 {
        self
    }
}

impl Element for half::bf16 {
    #[inline(always)]
    fn to_f32(self) -> f32 {
        half::bf16::to_f32(self)
    }
}

impl Element for half::f16 {
    #[inline(always)]
    fn to_f32(self) -> f32 {
        half::f16::to_f32(self)
    }
}

/// Values per parallel task of [`quantize_4bit`] (rounded to an even number of blocks, so no
/// byte's two codes fall in different tasks).
const TASK_VALUES: usize = 1 << 16;

/// The packed codes (`ceil(n / 2)` bytes, high nibble first) and one absmax per block.
///
/// Whole blocks are quantized in parallel (rayon), in tasks of an even number of blocks whose
/// bytes and absmax values are concatenated in order: the result does not depend on the number
/// of threads (`peftpipe bench quantize` checks it against one thread).
pub fn quantize_4bit<T: Element>(
    values: &[T],
    quant_type: QuantType,
    block_size: usize,
) -> (Vec<u8>, Vec<f32>) {
    let bounds = quant_type.bounds();
    let block_size = block_size.max(1);
    let task = 2 * block_size * (TASK_VALUES / (2 * block_size)).max(1);
    let parallel = values.len() - values.len() % task;
    // Each task writes its bytes and maxima in place: no per-task vectors joined afterwards.
    let mut packed = vec![0u8; values.len().div_ceil(2)];
    let mut absmax = vec![0f32; values.len().div_ceil(block_size)];
    let (packed_head, packed_tail) = packed.split_at_mut(parallel / 2);
    let (absmax_head, absmax_tail) = absmax.split_at_mut(parallel / block_size);
    values[..parallel]
        .par_chunks(task)
        .zip(packed_head.par_chunks_mut(task / 2))
        .zip(absmax_head.par_chunks_mut(task / block_size))
        .for_each(|((chunk, bytes), maxima)| {
            quantize_run(chunk, &bounds, block_size, bytes, maxima)
        });
    quantize_run(
        &values[parallel..],
        &bounds,
        block_size,
        packed_tail,
        absmax_tail,
    );
    (packed, absmax)
}

/// Quantizes `values`, which start at a block boundary with an even index, into `packed`
/// (`ceil(n / 2)` bytes) and `absmax` (one per block): its full blocks, then a trailing partial
/// block (bitsandbytes' remainder rule) and the padding of an odd count.
fn quantize_run<T: Element>(
    values: &[T],
    bounds: &Bounds,
    block_size: usize,
    packed: &mut [u8],
    absmax: &mut [f32],
) {
    // Each value's position among the sorted levels first (a loop the compiler vectorizes), then
    // the codes of two positions per byte.
    let mut positions = vec![0u8; values.len()];
    for ((block, out), maximum) in values
        .chunks(block_size)
        .zip(positions.chunks_mut(block_size))
        .zip(absmax.iter_mut())
    {
        let max = block_absmax(block);
        if block.len() == block_size {
            *maximum = max;
            let inverse = 1.0f32 / max.max(ABSMAX_FLOOR);
            sorted_positions(bounds, block, out, |x| x * inverse);
        } else {
            let max = max.max(ABSMAX_FLOOR);
            *maximum = max;
            sorted_positions(bounds, block, out, |x| x / max);
        }
    }
    let code = |position: u8| bounds.order[usize::from(position)];
    let pairs = positions.chunks_exact(2);
    let odd = pairs.remainder().first().copied();
    for (byte, pair) in packed.iter_mut().zip(pairs) {
        *byte = (code(pair[0]) << 4) | code(pair[1]);
    }
    if let (Some(last), Some(byte)) = (odd, packed.last_mut()) {
        *byte = (code(last) << 4) | bounds.encode(0.0);
    }
}

/// `out[i]` = the number of midpoints strictly below `scale(values[i])` clamped to [-1, 1]
/// ([`Bounds::position`]), for all `i`.
#[inline(always)]
fn sorted_positions<T: Element>(
    bounds: &Bounds,
    values: &[T],
    out: &mut [u8],
    scale: impl Fn(f32) -> f32,
) {
    for (position, &x) in out.iter_mut().zip(values) {
        *position = bounds.position(scale(x.to_f32()).clamp(-1.0, 1.0));
    }
}

/// `max |x|` of a block (torch's `abs().max()`: a NaN propagates, as `f32::NAN`). On the bit
/// patterns with the sign cleared, integer order is the order of magnitudes and every NaN is
/// above infinity: one integer maximum, which vectorizes.
fn block_absmax<T: Element>(block: &[T]) -> f32 {
    let bits = block
        .iter()
        .map(|x| x.to_f32().to_bits() & 0x7fff_ffff)
        .max()
        .unwrap_or(0);
    let max = f32::from_bits(bits);
    if max.is_nan() {
        f32::NAN
    } else {
        max
    }
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

/// The `count` values of `packed` as `f32`: `code[q] · absmax[block]`, one rounding each (in
/// parallel over runs of whole blocks; an odd `block_size`, which bitsandbytes never uses, value
/// by value).
pub fn dequantize_4bit(
    packed: &[u8],
    absmax: &[f32],
    code: &[f32; 16],
    block_size: usize,
    count: usize,
) -> Vec<f32> {
    let block_size = block_size.max(1);
    if block_size % 2 == 1 {
        return (0..count)
            .into_par_iter()
            .with_min_len(TASK_VALUES)
            .map(|index| code[code_at(packed, index) as usize] * absmax[index / block_size])
            .collect();
    }
    let task = block_size * (TASK_VALUES / block_size).max(1);
    let mut values = vec![0.0f32; count];
    values
        .par_chunks_mut(task)
        .enumerate()
        .for_each(|(index, run)| {
            let first = index * task;
            for (offset, block) in run.chunks_mut(block_size).enumerate() {
                let start = first + offset * block_size;
                let scale = absmax[start / block_size];
                let bytes = &packed[start / 2..];
                for (pair, &byte) in block.chunks_mut(2).zip(bytes) {
                    pair[0] = code[usize::from(byte >> 4)] * scale;
                    if let Some(low) = pair.get_mut(1) {
                        *low = code[usize::from(byte & 0x0f)] * scale;
                    }
                }
            }
        });
    values
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
    fn parallel_tasks_give_the_bytes_of_one_sequential_pass() {
        // Three whole tasks, five more blocks and a partial one of odd length: every boundary.
        for (block_size, quant_type) in [
            (64, QuantType::Nf4),
            (32, QuantType::Fp4),
            (3, QuantType::Nf4),
        ] {
            let count = 3 * TASK_VALUES + 5 * block_size + 37;
            let values: Vec<f32> = (0..count)
                .map(|i| ((i * 7919 % 1013) as f32 - 506.0) * 1e-3 * (1 + i % 3) as f32)
                .collect();
            let (packed, absmax) = quantize_4bit(&values, quant_type, block_size);
            let mut sequential = vec![0u8; count.div_ceil(2)];
            let mut sequential_absmax = vec![0f32; count.div_ceil(block_size)];
            quantize_run(
                &values,
                &quant_type.bounds(),
                block_size,
                &mut sequential,
                &mut sequential_absmax,
            );
            assert_eq!(packed, sequential);
            assert_eq!(absmax, sequential_absmax);
            let code = quant_type.code();
            let back = dequantize_4bit(&packed, &absmax, &code, block_size, count);
            assert_eq!(back.len(), count);
            for (index, value) in back.iter().enumerate() {
                let expected = code[code_at(&packed, index) as usize] * absmax[index / block_size];
                assert_eq!(value.to_bits(), expected.to_bits());
            }
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
