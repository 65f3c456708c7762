//! 4-bit blockwise quantization of frozen base weights (QLoRA's NF4 / FP4), bit-exact with
//! bitsandbytes, and the frozen quantized linear op a LoRA layer wraps.
//!
//! Owns: the code books ([`nf4`]), blockwise 4-bit quantization with two codes per byte
//! ([`blockwise`]), the 8-bit double quantization of the absmax ([`double_quant`]), the host-side
//! [`QuantizedTensor`] (bitsandbytes' `Params4bit` + `QuantState`), the device-side
//! [`QuantizedWeight`] and [`quantized_linear`] (`y = x·dequant(W)ᵀ (+ b)`: the gradient reaches `x`
//! only, the dequantized weight is a scratch freed after each forward and rebuilt in the
//! backward, or never built when the fused kernel runs: [`QuantGemm`]), and with
//! `--features cuda` the dequantization and fused dequantize + GEMM kernels (`kernels/nf4.cu`).
//!
//! bitsandbytes' CPU backend (0.50) is the reference: its quantizer rounds by nearest level with
//! ties going down for 4 bits, by a 65 536-bin lookup table for the 8-bit absmax, and dequantizes
//! with one `f32` product per value; every rule is documented where it is implemented and tested
//! against `../shared/fixtures/nf4` (tests/quant.rs).
//!
//! Must not: know model architectures, checkpoints, PEFT methods or pipelines; create trainable vars.

pub mod blockwise;
#[cfg(feature = "cuda")]
mod cuda;
pub mod double_quant;
mod linear;
pub mod nf4;
mod tensor;

pub use linear::{
    accumulates_into, quantized_linear, quantized_linear_accumulate, quantized_linear_with,
    QuantGemm, QuantizedWeight, FUSED_MAX_ROWS,
};
pub use nf4::QuantType;
pub use tensor::{
    quantized_bytes, Absmax, NestedAbsmax, QuantConfig, QuantizedTensor, BLOCK_SIZES,
};

/// A quantization state that does not hold together, or a setting bitsandbytes does not accept.
#[derive(Debug, thiserror::Error)]
pub enum QuantError {
    #[error("{0}")]
    Invalid(String),
}

impl From<QuantError> for candle_core::Error {
    fn from(error: QuantError) -> Self {
        candle_core::Error::Msg(error.to_string())
    }
}
