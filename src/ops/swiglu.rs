//! SwiGLU's gating, `silu(gate) · up`, the product inside a Llama MLP.
//!
//! On the CPU (and for dtypes the kernels do not take) it is candle's `silu` and `mul`, both with
//! autograd; on CUDA it is one fused kernel forward and one backward that gives both gradients
//! (`ops::cuda`), which keeps no `silu(gate)` tensor alive for the backward. Must not: be given
//! tensors of different shapes (an error, not a broadcast).

use candle_core::{bail, Result, Tensor};

/// `silu(gate) · up`, elementwise; gradients reach both inputs.
pub fn swiglu(gate: &Tensor, up: &Tensor) -> Result<Tensor> {
    if gate.shape() != up.shape() {
        bail!(
            "swiglu: gate {:?} and up {:?} differ",
            gate.shape(),
            up.shape()
        )
    }
    #[cfg(feature = "cuda")]
    if super::cuda::applies("swiglu", gate) && gate.dtype() == up.dtype() {
        return super::cuda::swiglu(gate, up);
    }
    gate.silu()? * up
}
