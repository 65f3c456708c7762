//! Attaching an analytic backward to a value computed without a graph.
//!
//! Owns the generic custom ops the other ops use: the forward of an op is computed by candle's
//! (fused, per-backend) kernels on detached inputs, then [`with_backward`] (one tracked input) or
//! [`with_backward3`] (three) records the result in the graph as the output of a custom op whose
//! backward is the closure given here, *sharing the output's storage* (the vendored candle-core's
//! `Tensor::attach_op*`, vendor/README.md): no copy is made and the node keeps only its inputs and
//! that one output alive. Only the inputs receive gradients; everything the closure captures
//! (masks, tables, weights, small intermediates) is a constant and never gets a GradStore entry.
//! Must not: run a kernel of its own or know what the ops mean.

#[cfg(feature = "cuda")]
use candle_core::CustomOp2;
use candle_core::{bail, CpuStorage, CustomOp1, CustomOp3, Layout, Result, Shape, Tensor};

/// `(input, output, grad_output) -> grad_input`.
type Backward = dyn Fn(&Tensor, &Tensor, &Tensor) -> Result<Tensor> + Send + Sync;

/// `([a, b], output, grad_output) -> [grad_a, grad_b]` (`None`: no gradient).
#[cfg(feature = "cuda")]
type Backward2 =
    dyn Fn([&Tensor; 2], &Tensor, &Tensor) -> Result<[Option<Tensor>; 2]> + Send + Sync;

/// `([a, b, c], output, grad_output) -> [grad_a, grad_b, grad_c]` (`None`: no gradient).
type Backward3 =
    dyn Fn([&Tensor; 3], &Tensor, &Tensor) -> Result<[Option<Tensor>; 3]> + Send + Sync;

struct WithBackward {
    name: &'static str,
    backward: Box<Backward>,
}

#[cfg(feature = "cuda")]
struct WithBackward2 {
    name: &'static str,
    backward: Box<Backward2>,
}

struct WithBackward3 {
    name: &'static str,
    backward: Box<Backward3>,
}

fn never_run(name: &str) -> Result<(CpuStorage, Shape)> {
    bail!("{name}: an attached op's forward is computed by its caller, never by candle")
}

impl CustomOp1 for WithBackward {
    fn name(&self) -> &'static str {
        self.name
    }

    fn cpu_fwd(&self, _: &CpuStorage, _: &Layout) -> Result<(CpuStorage, Shape)> {
        never_run(self.name)
    }

    fn bwd(&self, input: &Tensor, result: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        Ok(Some((self.backward)(input, result, grad)?))
    }
}

#[cfg(feature = "cuda")]
impl CustomOp2 for WithBackward2 {
    fn name(&self) -> &'static str {
        self.name
    }

    fn cpu_fwd(
        &self,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        never_run(self.name)
    }

    fn bwd(
        &self,
        a: &Tensor,
        b: &Tensor,
        result: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let [ga, gb] = (self.backward)([a, b], result, grad)?;
        Ok((ga, gb))
    }
}

impl CustomOp3 for WithBackward3 {
    fn name(&self) -> &'static str {
        self.name
    }

    fn cpu_fwd(
        &self,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        never_run(self.name)
    }

    fn bwd(
        &self,
        a: &Tensor,
        b: &Tensor,
        c: &Tensor,
        result: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let [ga, gb, gc] = (self.backward)([a, b, c], result, grad)?;
        Ok((ga, gb, gc))
    }
}

/// Return `output` (computed from `input.detach()` by the caller) as a graph node whose gradient
/// with respect to `input` is `backward(input, output, grad_output)`.
///
/// When `input` is not tracked (evaluation, or a constant), `output` is returned as it is: no graph
/// node.
pub(crate) fn with_backward<F>(
    name: &'static str,
    input: &Tensor,
    output: Tensor,
    backward: F,
) -> Result<Tensor>
where
    F: Fn(&Tensor, &Tensor, &Tensor) -> Result<Tensor> + Send + Sync + 'static,
{
    input.attach_op1(
        &output,
        WithBackward {
            name,
            backward: Box::new(backward),
        },
    )
}

/// [`with_backward`] for an op of two inputs; the closure returns a gradient per input (`None` for
/// an input that is not tracked). When no input is tracked, `output` is returned as it is.
/// (Only the CUDA in-place ops need it so far.)
#[cfg(feature = "cuda")]
pub(crate) fn with_backward2<F>(
    name: &'static str,
    inputs: [&Tensor; 2],
    output: Tensor,
    backward: F,
) -> Result<Tensor>
where
    F: Fn([&Tensor; 2], &Tensor, &Tensor) -> Result<[Option<Tensor>; 2]> + Send + Sync + 'static,
{
    let [a, b] = inputs;
    a.attach_op2(
        b,
        &output,
        WithBackward2 {
            name,
            backward: Box::new(backward),
        },
    )
}

/// [`with_backward`] for an op of three inputs; the closure returns a gradient per input (it should
/// return `None` for an input that is not tracked, and skip computing it). When no input is
/// tracked, `output` is returned as it is.
pub(crate) fn with_backward3<F>(
    name: &'static str,
    inputs: [&Tensor; 3],
    output: Tensor,
    backward: F,
) -> Result<Tensor>
where
    F: Fn([&Tensor; 3], &Tensor, &Tensor) -> Result<[Option<Tensor>; 3]> + Send + Sync + 'static,
{
    let [a, b, c] = inputs;
    a.attach_op3(
        b,
        c,
        &output,
        WithBackward3 {
            name,
            backward: Box::new(backward),
        },
    )
}
