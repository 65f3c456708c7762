//! Attaching an analytic backward to a value computed without a graph.
//!
//! Owns the one generic custom op the other ops use: the forward of an op is computed by candle's
//! (fused, per-backend) kernels on detached inputs, then [`with_backward`] inserts the result into
//! the graph as the output of a `CustomOp2(input, output)` whose forward is a plain copy of `output`
//! and whose backward is the closure given here. Only `input` receives a gradient; `output` and
//! everything the closure captures (masks, tables, weights) are constants and never get a GradStore
//! entry. Must not: run a kernel of its own or know what the ops mean.

use candle_core::backend::BackendStorage;
use candle_core::{
    CpuStorage, CudaStorage, CustomOp2, Layout, MetalStorage, Result, Shape, Tensor,
};

/// `(input, output, grad_output) -> grad_input`.
type Backward = dyn Fn(&Tensor, &Tensor, &Tensor) -> Result<Tensor> + Send + Sync;

struct WithBackward {
    name: &'static str,
    backward: Box<Backward>,
}

/// The op's forward: a contiguous copy of the precomputed output (`1·y + 0` is exact in every
/// float dtype), through a `BackendStorage` method that every backend implements.
fn copy<S: BackendStorage>(storage: &S, layout: &Layout) -> Result<(S, Shape)> {
    Ok((storage.affine(layout, 1.0, 0.0)?, layout.shape().clone()))
}

impl CustomOp2 for WithBackward {
    fn name(&self) -> &'static str {
        self.name
    }

    fn cpu_fwd(
        &self,
        _input: &CpuStorage,
        _input_layout: &Layout,
        output: &CpuStorage,
        output_layout: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        copy(output, output_layout)
    }

    fn cuda_fwd(
        &self,
        _input: &CudaStorage,
        _input_layout: &Layout,
        output: &CudaStorage,
        output_layout: &Layout,
    ) -> Result<(CudaStorage, Shape)> {
        copy(output, output_layout)
    }

    fn metal_fwd(
        &self,
        _input: &MetalStorage,
        _input_layout: &Layout,
        output: &MetalStorage,
        output_layout: &Layout,
    ) -> Result<(MetalStorage, Shape)> {
        copy(output, output_layout)
    }

    fn bwd(
        &self,
        input: &Tensor,
        _output: &Tensor,
        result: &Tensor,
        grad_result: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        Ok((Some((self.backward)(input, result, grad_result)?), None))
    }
}

/// Return `output` (computed from `input.detach()` by the caller) as a graph node whose gradient
/// with respect to `input` is `backward(input, output, grad_output)`.
///
/// When `input` is not tracked (evaluation, or a constant), `output` is returned as it is: no copy,
/// no graph node.
pub(crate) fn with_backward<F>(
    name: &'static str,
    input: &Tensor,
    output: Tensor,
    backward: F,
) -> Result<Tensor>
where
    F: Fn(&Tensor, &Tensor, &Tensor) -> Result<Tensor> + Send + Sync + 'static,
{
    if !input.track_op() {
        return Ok(output);
    }
    input.apply_op2(
        &output,
        WithBackward {
            name,
            backward: Box::new(backward),
        },
    )
}
