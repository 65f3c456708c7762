//! Rotary position embeddings in Hugging Face's rotate-half layout, with Llama-3 and linear scaling.
//!
//! Owns the inverse frequencies (computed like transformers' `_compute_default_rope_parameters` /
//! `_compute_llama3_parameters`), the per-token cos/sin tables for arbitrary position ids (left padding
//! and prefixes give every row its own positions), and [`apply_rope`]: forward through candle's fused
//! `rope` kernel on a detached input, backward `dx = rope(g, cos, −sin)` (RoPE is a rotation, so its
//! transpose is the rotation by the opposite angle). Must not: apply positions to anything but the
//! tensors it is given (prefix keys and adapter keys get no rotation; the caller decides).

use std::f64::consts::PI;
use std::fmt;
use std::sync::{Arc, Mutex, PoisonError};

use candle_core::{bail, DType, Device, Result, Tensor};

use super::attach::with_backward;

/// The `rope_scaling` of a config.json.
#[derive(Debug, Clone, PartialEq)]
pub enum RopeScaling {
    /// `rope_type: llama3` (Llama 3.1/3.2).
    Llama3 {
        factor: f64,
        low_freq_factor: f64,
        high_freq_factor: f64,
        original_max_position_embeddings: f64,
    },
    /// `rope_type: linear`: positions divided by `factor`.
    Linear { factor: f64 },
}

/// The inverse frequencies of one model (length `head_dim / 2`).
#[derive(Debug, Clone)]
pub struct RotaryEmbedding {
    inverse_frequencies: Vec<f32>,
    /// cos/sin of every position seen so far (shared by clones: the frequencies are the same).
    angles: Arc<Mutex<AngleTable>>,
}

/// `cos(p·f)` and `sin(p·f)` for the positions `p < len` and every inverse frequency `f`, row by
/// row: computed once per position and grown on demand, so a training step copies its tables
/// instead of evaluating `B·T·head_dim` sines and cosines on the host (5 ms per step of the 8B
/// shape at 1 × 4096, during which the GPU waited).
#[derive(Default)]
struct AngleTable {
    len: usize,
    cos: Vec<f32>,
    sin: Vec<f32>,
}

impl fmt::Debug for AngleTable {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(formatter, "AngleTable {{ positions: {} }}", self.len)
    }
}

impl AngleTable {
    /// Covers positions `0..needed` (at least doubling when it grows).
    fn cover(&mut self, needed: usize, inverse_frequencies: &[f32]) {
        if needed <= self.len {
            return;
        }
        let len = needed.max(2 * self.len);
        let half = inverse_frequencies.len();
        // Whatever an interrupted growth pushed past `len` is dropped first.
        self.cos.truncate(self.len * half);
        self.sin.truncate(self.len * half);
        self.cos.reserve((len - self.len) * half);
        self.sin.reserve((len - self.len) * half);
        for position in self.len..len {
            for &frequency in inverse_frequencies {
                // transformers computes the angle in f32 (position · inv_freq), then cos/sin.
                let angle = position as f32 * frequency;
                self.cos.push(angle.cos());
                self.sin.push(angle.sin());
            }
        }
        self.len = len;
    }
}

impl RotaryEmbedding {
    pub fn new(head_dim: usize, theta: f64, scaling: Option<&RopeScaling>) -> Result<Self> {
        if head_dim == 0 || head_dim % 2 != 0 {
            bail!("rotary embedding: head_dim must be even and positive, got {head_dim}")
        }
        // transformers: 1 / base ** (arange(0, dim, 2) / dim), in f32.
        let mut inverse: Vec<f64> = (0..head_dim / 2)
            .map(|i| {
                let exponent = (2 * i) as f32 / head_dim as f32;
                f64::from(1.0 / (theta as f32).powf(exponent))
            })
            .collect();
        match scaling {
            None => {}
            Some(RopeScaling::Linear { factor }) => {
                for value in &mut inverse {
                    *value /= factor;
                }
            }
            Some(RopeScaling::Llama3 {
                factor,
                low_freq_factor,
                high_freq_factor,
                original_max_position_embeddings,
            }) => {
                let low_freq_wavelength = original_max_position_embeddings / low_freq_factor;
                let high_freq_wavelength = original_max_position_embeddings / high_freq_factor;
                for value in &mut inverse {
                    let wavelength = 2.0 * PI / *value;
                    let scaled = if wavelength > low_freq_wavelength {
                        *value / factor
                    } else {
                        *value
                    };
                    // Frequencies are finite, so "not below and not above" is a closed range.
                    let is_medium =
                        (high_freq_wavelength..=low_freq_wavelength).contains(&wavelength);
                    *value = if is_medium {
                        let smooth = (original_max_position_embeddings / wavelength
                            - low_freq_factor)
                            / (high_freq_factor - low_freq_factor);
                        (1.0 - smooth) * scaled / factor + smooth * scaled
                    } else {
                        scaled
                    };
                }
            }
        }
        Ok(Self {
            inverse_frequencies: inverse.into_iter().map(|v| v as f32).collect(),
            angles: Arc::default(),
        })
    }

    pub fn inverse_frequencies(&self) -> &[f32] {
        &self.inverse_frequencies
    }

    /// cos and sin tables `[B, T, head_dim/2]` in `dtype` for position ids `positions[b][t]`.
    pub fn tables(
        &self,
        positions: &[Vec<u32>],
        device: &Device,
        dtype: DType,
    ) -> Result<(Tensor, Tensor)> {
        let batch = positions.len();
        let length = positions.first().map_or(0, Vec::len);
        if positions.iter().any(|row| row.len() != length) {
            bail!("rotary embedding: position rows have different lengths")
        }
        let half = self.inverse_frequencies.len();
        let mut cos = Vec::with_capacity(batch * length * half);
        let mut sin = Vec::with_capacity(batch * length * half);
        let needed = positions
            .iter()
            .flatten()
            .max()
            .map_or(0, |&p| p as usize + 1);
        let mut angles = self.angles.lock().unwrap_or_else(PoisonError::into_inner);
        angles.cover(needed, &self.inverse_frequencies);
        for &position in positions.iter().flatten() {
            let start = position as usize * half;
            cos.extend_from_slice(&angles.cos[start..start + half]);
            sin.extend_from_slice(&angles.sin[start..start + half]);
        }
        drop(angles);
        let shape = (batch, length, half);
        let cos = Tensor::from_vec(cos, shape, device)?.to_dtype(dtype)?;
        let sin = Tensor::from_vec(sin, shape, device)?.to_dtype(dtype)?;
        Ok((cos, sin))
    }
}

/// Rotate `x [B, H, T, D]` by the tables `cos`, `sin` `[B, T, D/2]` (rotate-half layout):
/// `x·cos + rotate_half(x)·sin`. The gradient reaches `x` only.
pub fn apply_rope(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
    #[cfg(feature = "cuda")]
    if super::cuda::applies("rope", x) {
        if let Some(rotated) = super::cuda::rope(x, cos, sin)? {
            return Ok(rotated);
        }
    }
    let dtype = x.dtype();
    let cos = cos.detach().to_dtype(dtype)?.contiguous()?;
    let sin = sin.detach().to_dtype(dtype)?.contiguous()?;
    let output = candle_nn::rotary_emb::rope(&x.detach().contiguous()?, &cos, &sin)?;
    let negative_sin = sin.neg()?;
    with_backward("rope", x, output, move |_x, _y, grad| {
        candle_nn::rotary_emb::rope(&grad.contiguous()?, &cos, &negative_sin)
    })
}

/// `x [B, T, heads·head_dim]` (a query or key projection's output, handed over: nothing else may
/// read it afterwards) as rotated heads `[B, heads, T, head_dim]`.
///
/// Where the flash kernels read heads where they lie ([`super::flash::reads_strided_heads`]) the
/// result is `x` itself viewed as heads and stored `[B, T, heads, head_dim]`: the rotation is
/// written into `x`'s buffer when nothing else shares it (`PEFTPIPE_UNFUSED=in_place` writes a
/// new one), so the layer keeps one buffer where a contiguous copy and a rotated copy were two.
/// Elsewhere (the CPU included): one contiguous copy per head layout, then [`apply_rope`].
pub fn rope_heads(
    x: Tensor,
    heads: usize,
    head_dim: usize,
    cos: &Tensor,
    sin: &Tensor,
) -> Result<Tensor> {
    let (batch, length, _) = x.dims3()?;
    #[cfg(feature = "cuda")]
    if super::cuda::applies("rope", &x) && super::flash::reads_strided_heads(&x) {
        let in_place = super::cuda::enabled("in_place") && x.storage_is_unique();
        let x4 = x.reshape((batch, length, heads, head_dim))?;
        // `x4` is a view sharing `x`'s buffer: the buffer is still unique to this one tensor.
        drop(x);
        if let Some(rotated) = super::cuda::rope_bthd(&x4, cos, sin, in_place)? {
            return rotated.transpose(1, 2);
        }
        let split = x4.transpose(1, 2)?.contiguous()?;
        return apply_rope(&split, cos, sin);
    }
    let split = x
        .reshape((batch, length, heads, head_dim))?
        .transpose(1, 2)?
        .contiguous()?;
    apply_rope(&split, cos, sin)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn llama3_scaling_matches_transformers_formula_on_band_edges() -> Result<()> {
        let scaling = RopeScaling::Llama3 {
            factor: 32.0,
            low_freq_factor: 1.0,
            high_freq_factor: 4.0,
            original_max_position_embeddings: 8192.0,
        };
        let plain = RotaryEmbedding::new(64, 500000.0, None)?;
        let scaled = RotaryEmbedding::new(64, 500000.0, Some(&scaling))?;
        // The highest frequency (wavelength 2π < 2048) is unchanged; the lowest is divided by 32.
        assert_eq!(
            plain.inverse_frequencies()[0],
            scaled.inverse_frequencies()[0]
        );
        let last = plain.inverse_frequencies().len() - 1;
        let ratio = plain.inverse_frequencies()[last] / scaled.inverse_frequencies()[last];
        assert!((ratio - 32.0).abs() < 1e-3, "ratio {ratio}");
        Ok(())
    }

    /// The tables, computed directly: transformers' f32 angle, then cos and sin.
    fn direct(rope: &RotaryEmbedding, positions: &[Vec<u32>]) -> (Vec<f32>, Vec<f32>) {
        let (mut cos, mut sin) = (Vec::new(), Vec::new());
        for &position in positions.iter().flatten() {
            for &frequency in rope.inverse_frequencies() {
                let angle = position as f32 * frequency;
                cos.push(angle.cos());
                sin.push(angle.sin());
            }
        }
        (cos, sin)
    }

    #[test]
    fn tables_from_the_kept_angles_equal_the_direct_formula_bit_for_bit() -> Result<()> {
        let rope = RotaryEmbedding::new(16, 500000.0, None)?;
        let clone = rope.clone();
        // Out of order, repeated, padded rows; then longer positions (the table grows), through
        // a clone (which shares it), and back to short ones.
        let calls: [Vec<Vec<u32>>; 3] = [
            vec![vec![3, 0, 1, 2], vec![0, 0, 5, 6]],
            vec![(100..140).collect(), (0..40).rev().collect()],
            vec![vec![7, 1, 130]],
        ];
        for (index, positions) in calls.iter().enumerate() {
            let embedding = if index == 1 { &clone } else { &rope };
            let (cos, sin) = embedding.tables(positions, &Device::Cpu, DType::F32)?;
            let (want_cos, want_sin) = direct(&rope, positions);
            let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
            assert_eq!(bits(&cos.flatten_all()?.to_vec1::<f32>()?), bits(&want_cos));
            assert_eq!(bits(&sin.flatten_all()?.to_vec1::<f32>()?), bits(&want_sin));
        }
        assert!(rope.angles.lock().map_or(0, |t| t.len) >= 140);
        Ok(())
    }

    #[test]
    fn position_zero_is_identity() -> Result<()> {
        let rope = RotaryEmbedding::new(8, 10000.0, None)?;
        let (cos, sin) = rope.tables(&[vec![0, 0]], &Device::Cpu, DType::F64)?;
        let x = Tensor::randn(0f64, 1.0, (1, 2, 2, 8), &Device::Cpu)?;
        let y = apply_rope(&x, &cos, &sin)?;
        let difference = (y - &x)?.abs()?.max_all()?.to_scalar::<f64>()?;
        assert!(difference < 1e-12);
        Ok(())
    }
}
