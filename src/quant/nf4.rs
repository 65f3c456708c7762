//! The two 4-bit code books of bitsandbytes (NF4 and FP4) and the nearest-level rule its CPU
//! quantizer uses.
//!
//! Owns the 16 levels of each data type exactly as bitsandbytes holds them in `float32` (NF4: the
//! decimal values of `get_4bit_type("nf4")` rounded once from `float64` to `float32`; FP4: the
//! FP4 bit-pattern values divided by their largest magnitude, 12, in `float32`) and the mapping of
//! a scaled value in [-1, 1] to a 4-bit code: the number of level midpoints strictly below it
//! (torch's `bucketize(right=False)`: a value on a midpoint goes to the lower level), remapped
//! through the stable value order of the code book (FP4's codes are not sorted by value).
//! Must not: know blocks, absmax or tensors.

/// Which 4-bit code book (bitsandbytes' `quant_type`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum QuantType {
    /// NormalFloat4: quantiles of N(0, 1) (QLoRA's default).
    Nf4,
    /// bitsandbytes' FP4: 1 sign, 2 exponent, 1 mantissa bit, bias 2, normalised to [-1, 1].
    Fp4,
}

/// NF4 as bitsandbytes writes it (python floats, i.e. `f64`), in code order (sorted).
const NF4_DECIMAL: [f64; 16] = [
    -1.0,
    -0.6961928009986877,
    -0.5250730514526367,
    -0.39491748809814453,
    -0.28444138169288635,
    -0.18477343022823334,
    -0.09105003625154495,
    0.0,
    0.07958029955625534,
    0.16093020141124725,
    0.24611230194568634,
    0.33791524171829224,
    0.44070982933044434,
    0.5626170039176941,
    0.7229568362236023,
    1.0,
];

/// FP4 bit patterns `0bSEEM` as values before normalisation (0b0000 = 0, 0b0001 = 0.0625 (the
/// subnormal), 0b0010 = 8, ...; the sign bit gives the negatives, including a negative zero).
const FP4_RAW: [f32; 16] = [
    0.0, 0.0625, 8.0, 12.0, 4.0, 6.0, 2.0, 3.0, -0.0, -0.0625, -8.0, -12.0, -4.0, -6.0, -2.0, -3.0,
];

impl QuantType {
    /// bitsandbytes' name (`nf4`, `fp4`), as in `quant_state.bitsandbytes__nf4`.
    pub fn name(self) -> &'static str {
        match self {
            Self::Nf4 => "nf4",
            Self::Fp4 => "fp4",
        }
    }

    /// The type named `name` (`nf4` / `fp4`), if any.
    pub fn from_name(name: &str) -> Option<Self> {
        match name {
            "nf4" => Some(Self::Nf4),
            "fp4" => Some(Self::Fp4),
            _ => None,
        }
    }

    /// The 16 levels, indexed by code, as `float32` (bitsandbytes' `get_4bit_type`).
    pub fn code(self) -> [f32; 16] {
        match self {
            Self::Nf4 => NF4_DECIMAL.map(|level| level as f32),
            // `data.div_(data.abs().max())`: one f32 division per level.
            Self::Fp4 => FP4_RAW.map(|level| level / 12.0f32),
        }
    }

    /// The quantizer's tables: the 15 midpoints between value-sorted levels (`(a + b) / 2` in
    /// `f32`) and, for each sorted position, its code.
    pub fn bounds(self) -> Bounds {
        let code = self.code();
        let mut order: [u8; 16] = std::array::from_fn(|index| index as u8);
        // Stable: FP4's +0 (code 0) sorts before its -0 (code 8), as torch's CPU argsort does.
        order.sort_by(|&a, &b| code[a as usize].total_cmp_equal_zero(code[b as usize]));
        let midpoints = std::array::from_fn(|index| {
            (code[order[index] as usize] + code[order[index + 1] as usize]) / 2.0
        });
        Bounds { midpoints, order }
    }
}

/// Comparison of code levels where `-0.0 == 0.0` (IEEE order, as torch sorts).
trait EqualZeroOrder {
    fn total_cmp_equal_zero(self, other: f32) -> std::cmp::Ordering;
}

impl EqualZeroOrder for f32 {
    fn total_cmp_equal_zero(self, other: f32) -> std::cmp::Ordering {
        self.partial_cmp(&other)
            .unwrap_or(std::cmp::Ordering::Equal)
    }
}

/// Midpoints and the sorted-position → code map of one code book.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Bounds {
    pub midpoints: [f32; 15],
    pub order: [u8; 16],
}

impl Bounds {
    /// The 4-bit code of a value already scaled into [-1, 1]: the count of midpoints strictly
    /// below it ([`Self::position`]), through the sorted order. NaN compares below nothing and
    /// gets the lowest level.
    #[inline]
    pub fn encode(&self, scaled: f32) -> u8 {
        self.order[usize::from(self.position(scaled))]
    }

    /// The number of midpoints strictly below `scaled`: its position among the sorted levels.
    /// All 15 comparisons are counted (no branch, so a loop over values vectorizes) instead of a
    /// binary search, whose branches mispredict on bell-shaped weights (`peftpipe bench quantize`).
    #[inline(always)]
    pub fn position(&self, scaled: f32) -> u8 {
        self.midpoints
            .iter()
            .fold(0u8, |count, &mid| count + u8::from(mid < scaled))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nf4_is_sorted_and_symmetric_at_the_ends() {
        let code = QuantType::Nf4.code();
        assert!(code.windows(2).all(|pair| pair[0] < pair[1]));
        assert_eq!((code[0], code[7], code[15]), (-1.0, 0.0, 1.0));
        assert_eq!(
            QuantType::Nf4.bounds().order,
            std::array::from_fn(|i| i as u8)
        );
    }

    #[test]
    fn fp4_levels_match_the_cpp_table_of_bitsandbytes() {
        // csrc/cpu_ops.cpp writes the normalised FP4 levels as decimal float literals.
        #[expect(
            clippy::excessive_precision,
            reason = "the literals exactly as bitsandbytes' C++ writes them"
        )]
        let cpp: [f32; 8] = [
            0.0,
            0.005208333333,
            0.66666667,
            1.0,
            0.33333333,
            0.5,
            0.16666667,
            0.25,
        ];
        let code = QuantType::Fp4.code();
        for (index, level) in cpp.iter().enumerate() {
            assert_eq!(code[index].to_bits(), level.to_bits(), "level {index}");
            assert_eq!(
                code[index + 8].to_bits(),
                (-level).to_bits(),
                "level {}",
                index + 8
            );
        }
    }

    #[test]
    fn encode_counts_the_midpoints_below_as_a_binary_search_does() {
        for quant_type in [QuantType::Nf4, QuantType::Fp4] {
            let bounds = quant_type.bounds();
            let mut probes = vec![0.0f32, -0.0, 1.0, -1.0, f32::NAN, f32::MIN_POSITIVE, 1e-40];
            for &mid in &bounds.midpoints {
                probes.extend([mid, mid.next_up(), mid.next_down(), -mid]);
            }
            probes.extend((0..=2000).map(|i| i as f32 / 1000.0 - 1.0));
            for scaled in probes {
                let searched = bounds.midpoints.partition_point(|&mid| mid < scaled);
                assert_eq!(
                    bounds.encode(scaled),
                    bounds.order[searched],
                    "{quant_type:?} at {scaled:e}"
                );
            }
        }
    }

    #[test]
    fn encode_sends_midpoints_down_and_small_positive_fp4_values_to_negative_zero() {
        let nf4 = QuantType::Nf4.bounds();
        assert_eq!(nf4.encode(0.0), 7);
        assert_eq!(nf4.encode(1.0), 15);
        assert_eq!(nf4.encode(-1.0), 0);
        assert_eq!(nf4.encode(nf4.midpoints[7]), 7);
        assert_eq!(
            nf4.encode(f32::from_bits(nf4.midpoints[7].to_bits() + 1)),
            8
        );
        let fp4 = QuantType::Fp4.bounds();
        assert_eq!(fp4.encode(0.0), 0);
        // Above the +0/-0 midpoint (0) and below the one to 0.0052: the sorted slot of -0.
        assert_eq!(fp4.encode(0.001), 8);
        assert_eq!(fp4.encode(1.0), 3);
        assert_eq!(fp4.encode(-1.0), 11);
    }
}
