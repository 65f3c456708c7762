//! peftpipe's own CUDA kernels (`kernels/peftpipe.cu`, compiled to PTX by build.rs with
//! `--features cuda`): loading, launching, and the custom ops that wrap them.
//!
//! Owns every launch of a peftpipe kernel: fused RMSNorm, LayerNorm (GPT-2), RoPE, SwiGLU and masked softmax forward +
//! backward, the row-wise cross-entropy of the chunked linear + cross-entropy, and the multi-tensor
//! AdamW with its global gradient norm. The PTX is loaded once per device through candle's
//! `CudaDevice::get_or_load_custom_func` (module `peftpipe`) and launched on candle's stream, so
//! ordering with candle's own kernels and its stream-ordered allocator holds without events.
//! Each op here has a CPU reference: the candle composition in `src/ops` it replaces on CUDA
//! (tests/cuda_kernels.rs compares them). Must not: be reached for dtypes other than bf16/f32 or
//! for non-CUDA tensors (the callers check [`applies`]).
#![expect(
    unsafe_code,
    reason = "launching CUDA kernels and reading device pointers are FFI calls"
)]

use std::sync::OnceLock;

use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc::cublas::{result as cublas, sys as cublas_sys};
use candle_core::cuda_backend::cudarc::driver::{DevicePtr, LaunchConfig, PushKernelArg};
use candle_core::cuda_backend::WrapErr;
use candle_core::{
    bail, CpuStorage, CudaDevice, CudaStorage, CustomOp1, CustomOp2, CustomOp3, DType, Device,
    InplaceOp2, InplaceOp3, Layout, Result, Shape, Storage, Tensor,
};

use super::attach::{with_backward, with_backward2};

const PTX: &str = include_str!(concat!(env!("OUT_DIR"), "/peftpipe_kernels.ptx"));
const MODULE: &str = "peftpipe";

/// The fused kernels, by the names `PEFTPIPE_UNFUSED` takes.
pub const KERNELS: [&str; 15] = [
    "rms_norm",
    "layer_norm",
    "rope",
    "swiglu",
    "softmax",
    "cross_entropy",
    "adamw",
    "flash_attention",
    "lora_gemm",
    // Not kernels of their own but ways of calling them, switched off the same way: the flash
    // kernels reading a projection's heads where they lie ([B, T, H, D], no copy), and RoPE and
    // the residual additions written into the buffer they read (`ops::rope_heads`,
    // `ops::add_residual`).
    "strided_heads",
    "in_place",
    // The backward's gradient sums (candle's GradStore) by peftpipe's add kernel, in place when
    // the stored sum is shared with nothing ([`gradient_add`]).
    "grad_add",
    // LoRA's factors cast to the compute dtype for a forward in one launch ([`cast_many_bf16`])
    // instead of one cast per factor.
    "multi_cast",
    // SwiGLU's backward and the A gradient of the down projection's low-rank update in one
    // kernel, which never recomputes the product into memory ([`swiglu_backward_lora`]).
    "swiglu_lora",
    // A low-rank adapted linear's frozen product added by its own GEMM (`β = 1`) into the
    // update written first, instead of the update accumulated into the frozen output by a rank-r
    // GEMM that reads and writes it again ([`crate::ops::FrozenMap::accumulates`]).
    "base_accumulate",
];

/// Whether the fused kernel `kernel` (one of [`KERNELS`]) is used: yes unless `PEFTPIPE_FUSED=0`
/// (all off: the candle compositions run on CUDA too, "before") or `kernel` is listed in
/// `PEFTPIPE_UNFUSED` (comma-separated), for before/after measurements kernel by kernel.
pub fn enabled(kernel: &str) -> bool {
    static OFF: OnceLock<Vec<String>> = OnceLock::new();
    let off = OFF.get_or_init(|| {
        if std::env::var("PEFTPIPE_FUSED").is_ok_and(|v| v == "0") {
            return KERNELS.iter().map(|k| k.to_string()).collect();
        }
        std::env::var("PEFTPIPE_UNFUSED")
            .map(|v| v.split(',').map(|k| k.trim().to_string()).collect())
            .unwrap_or_default()
    });
    !off.iter().any(|k| k == kernel)
}

/// A tensor the kernel `kernel` can take: on CUDA, bf16 or f32, and that kernel switched on.
pub fn applies(kernel: &str, x: &Tensor) -> bool {
    x.device().is_cuda() && matches!(x.dtype(), DType::BF16 | DType::F32) && enabled(kernel)
}

/// Candle runs a CUDA device on one stream, where cudarc's per-buffer events (two created and
/// destroyed with every tensor) order nothing; switch them off for buffers allocated from now on,
/// unless `PEFTPIPE_EVENT_TRACKING=1`. Returns whether they were switched off.
pub fn single_stream(device: &Device) -> bool {
    let Device::Cuda(cuda) = device else {
        return false;
    };
    if std::env::var("PEFTPIPE_EVENT_TRACKING").is_ok_and(|v| v == "1") {
        return false;
    }
    // SAFETY: every candle op, cuBLAS call and peftpipe kernel on this device runs on the
    // device's one stream, so stream order alone orders every use and free of a buffer.
    unsafe { cuda.disable_event_tracking() };
    true
}

/// Keep freed memory in the device's default (async) memory pool instead of returning it to the
/// driver at every synchronisation (CUDA's default release threshold is 0, so each step would
/// unmap and re-map its activations), as torch's caching allocator does; unless
/// `PEFTPIPE_POOL_RELEASE=1`. Returns whether the threshold was raised.
pub fn keep_pool(device: &Device) -> Result<bool> {
    use candle_core::cuda_backend::cudarc::driver::sys;
    let Device::Cuda(cuda) = device else {
        return Ok(false);
    };
    if std::env::var("PEFTPIPE_POOL_RELEASE").is_ok_and(|v| v == "1") {
        return Ok(false);
    }
    let stream = cuda.cuda_stream();
    let context = stream.context();
    context.bind_to_thread().w()?;
    let mut pool: sys::CUmemoryPool = std::ptr::null_mut();
    let mut threshold: u64 = u64::MAX;
    // SAFETY: valid out-pointer and attribute value of the types the driver API reads/writes.
    let (first, second) = unsafe {
        let first = sys::cuDeviceGetDefaultMemPool(&mut pool, context.cu_device());
        let second = sys::cuMemPoolSetAttribute(
            pool,
            sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_RELEASE_THRESHOLD,
            (&mut threshold as *mut u64).cast(),
        );
        (first, second)
    };
    if first != sys::CUresult::CUDA_SUCCESS || second != sys::CUresult::CUDA_SUCCESS {
        bail!("setting the memory pool's release threshold: {first:?} / {second:?}")
    }
    Ok(true)
}

/// Marks the profiled range for an attached profiler (CUPTI's callback on `cuProfilerStart` /
/// `cuProfilerStop`: `benches/gpu/kprof`, or `nsys --capture-range=cudaProfilerApi`): `true`
/// opens it, `false` closes it. Without a profiler the calls do nothing; a CPU device is a no-op.
pub fn profiler_range(device: &Device, open: bool) -> Result<()> {
    use candle_core::cuda_backend::cudarc::driver::sys;
    let Device::Cuda(cuda) = device else {
        return Ok(());
    };
    device.synchronize()?;
    cuda.cuda_stream().context().bind_to_thread().w()?;
    // SAFETY: no arguments; the context is bound to this thread.
    let result = unsafe {
        if open {
            sys::cuProfilerStart()
        } else {
            sys::cuProfilerStop()
        }
    };
    if result != sys::CUresult::CUDA_SUCCESS {
        bail!(
            "cuProfiler{}: {result:?}",
            if open { "Start" } else { "Stop" }
        )
    }
    Ok(())
}

/// Whether the multi-tensor kernels read `gradient` as it is (contiguous, or a transposed 2-D
/// view); otherwise the caller makes it contiguous first.
pub fn gradient_readable(gradient: &Tensor) -> Result<bool> {
    Ok(gradient_view(gradient)?.is_some())
}

fn suffix(dtype: DType) -> Result<&'static str> {
    Ok(match dtype {
        DType::BF16 => "bf16",
        DType::F32 => "f32",
        other => bail!("peftpipe kernels: unsupported dtype {other:?}"),
    })
}

fn element_size(dtype: DType) -> Result<usize> {
    Ok(match dtype {
        DType::BF16 => 2,
        DType::F32 | DType::U32 => 4,
        DType::F64 | DType::I64 => 8,
        other => bail!("peftpipe kernels: unsupported dtype {other:?}"),
    })
}

/// The device address of the first element of a contiguous view of `storage`.
fn address(storage: &CudaStorage, layout: &Layout) -> Result<u64> {
    let Some((start, _)) = layout.contiguous_offsets() else {
        bail!("peftpipe kernels: the input must be contiguous")
    };
    address_at(storage, start)
}

/// The device address of element `start` of `storage`.
pub(super) fn address_at(storage: &CudaStorage, start: usize) -> Result<u64> {
    let stream = storage.device.cuda_stream();
    let base = match storage.dtype() {
        DType::BF16 => storage.as_cuda_slice::<half::bf16>()?.device_ptr(&stream).0,
        DType::F32 => storage.as_cuda_slice::<f32>()?.device_ptr(&stream).0,
        DType::U32 => storage.as_cuda_slice::<u32>()?.device_ptr(&stream).0,
        DType::F64 => storage.as_cuda_slice::<f64>()?.device_ptr(&stream).0,
        DType::I64 => storage.as_cuda_slice::<i64>()?.device_ptr(&stream).0,
        other => bail!("peftpipe kernels: unsupported dtype {other:?}"),
    };
    Ok(base + (start * element_size(storage.dtype())?) as u64)
}

/// The device address of a contiguous CUDA tensor (the tensor must outlive the launch's enqueue;
/// frees are stream-ordered, so dropping it right after is safe).
fn tensor_address(tensor: &Tensor) -> Result<u64> {
    let (storage, layout) = tensor.storage_and_layout();
    let Storage::Cuda(cuda) = &*storage else {
        bail!("peftpipe kernels: a tensor is not on a CUDA device")
    };
    address(cuda, layout)
}

/// The address of a gradient for the multi-tensor kernels and its `cols` code: 0 when contiguous,
/// `C` when it is the `[R, C]` transposed view of a contiguous `[C, R]` buffer (a matmul backward's
/// gradient of a weight used as `wᵀ`); `None` for any other layout (the caller copies it).
fn gradient_view(tensor: &Tensor) -> Result<Option<(u64, i64)>> {
    let (storage, layout) = tensor.storage_and_layout();
    let Storage::Cuda(cuda) = &*storage else {
        bail!("peftpipe kernels: a tensor is not on a CUDA device")
    };
    if layout.is_contiguous() {
        return Ok(Some((address(cuda, layout)?, 0)));
    }
    match (layout.dims(), layout.stride()) {
        ([rows, cols], [1, stride]) if stride == rows => Ok(Some((
            address_at(cuda, layout.start_offset())?,
            *cols as i64,
        ))),
        _ => Ok(None),
    }
}

fn cuda_device(tensor: &Tensor) -> Result<&CudaDevice> {
    match tensor.device() {
        Device::Cuda(device) => Ok(device),
        _ => bail!("peftpipe kernels: a tensor is not on a CUDA device"),
    }
}

/// An uninitialised output of `count` elements of `dtype`, and its address.
fn output(device: &CudaDevice, dtype: DType, count: usize) -> Result<(CudaStorage, u64)> {
    // SAFETY (of the callers): every element is written by the kernel launched next.
    let storage = match dtype {
        DType::BF16 => CudaStorage::wrap_cuda_slice(
            unsafe { device.alloc::<half::bf16>(count)? },
            device.clone(),
        ),
        DType::F32 => {
            CudaStorage::wrap_cuda_slice(unsafe { device.alloc::<f32>(count)? }, device.clone())
        }
        other => bail!("peftpipe kernels: unsupported output dtype {other:?}"),
    };
    let layout = Layout::contiguous(count);
    let pointer = address(&storage, &layout)?;
    Ok((storage, pointer))
}

fn rows_config(rows: usize, threads: u32) -> LaunchConfig {
    LaunchConfig {
        grid_dim: (rows as u32, 1, 1),
        block_dim: (threads, 1, 1),
        shared_mem_bytes: 0,
    }
}

fn elementwise_config(count: usize) -> LaunchConfig {
    let blocks = count.div_ceil(256).clamp(1, 132 * 16);
    LaunchConfig {
        grid_dim: (blocks as u32, 1, 1),
        block_dim: (256, 1, 1),
        shared_mem_bytes: 0,
    }
}

/// Threads per row for a row of `cols` elements: a multiple of 32, at most 1024.
fn row_threads(cols: usize) -> u32 {
    (cols.div_ceil(8).next_multiple_of(32)).clamp(32, 1024) as u32
}

macro_rules! launch {
    ($device:expr, $name:expr, $config:expr, $($arg:expr),+ $(,)?) => {{
        let function = $device.get_or_load_custom_func($name, MODULE, PTX)?;
        let mut builder = function.builder();
        $( builder.arg($arg); )+
        // SAFETY: the arguments match the kernel's signature in kernels/peftpipe.cu (pointers to
        // live, contiguous buffers of the sizes the kernel reads and writes).
        unsafe { builder.launch($config) }.w()?;
    }};
}

pub(crate) fn no_cpu(name: &str) -> Result<(CpuStorage, Shape)> {
    bail!("{name}: a CUDA-only op was applied to a CPU tensor")
}

/// The `cpu_fwd` of a CUDA-only custom op taking 1, 2 or 3 tensors: an error naming the op (also
/// used by `ops::flash`).
macro_rules! cuda_only {
    (1) => {
        fn cpu_fwd(&self, _: &CpuStorage, _: &Layout) -> Result<(CpuStorage, Shape)> {
            $crate::ops::cuda::no_cpu(self.name())
        }
    };
    (2) => {
        fn cpu_fwd(
            &self,
            _: &CpuStorage,
            _: &Layout,
            _: &CpuStorage,
            _: &Layout,
        ) -> Result<(CpuStorage, Shape)> {
            $crate::ops::cuda::no_cpu(self.name())
        }
    };
    (3) => {
        fn cpu_fwd(
            &self,
            _: &CpuStorage,
            _: &Layout,
            _: &CpuStorage,
            _: &Layout,
            _: &CpuStorage,
            _: &Layout,
        ) -> Result<(CpuStorage, Shape)> {
            $crate::ops::cuda::no_cpu(self.name())
        }
    };
}
pub(crate) use cuda_only;

/// Launch the row kernel `{kernel}_{bf16,f32}` (one block per row of `x`) on `x`, the weight `w`
/// and a third input `t` (a gradient shaped like `x`, or a bias), writing a new tensor shaped like
/// `x`: the arguments `(x, w, t, out, cols, eps[, flag])`.
fn launch_rows(
    kernel: &str,
    eps: f32,
    flag: Option<i32>,
    (x, xl): (&CudaStorage, &Layout),
    (w, wl): (&CudaStorage, &Layout),
    (t, tl): (&CudaStorage, &Layout),
) -> Result<(CudaStorage, Shape)> {
    let cols = *xl.dims().last().unwrap_or(&1);
    let count = xl.shape().elem_count();
    let rows = count / cols.max(1);
    let device = &x.device;
    let (out, y) = output(device, x.dtype(), count)?;
    let (xp, wp, tp) = (address(x, xl)?, address(w, wl)?, address(t, tl)?);
    let config = rows_config(rows, row_threads(cols));
    let cols = cols as i32;
    let name = format!("{kernel}_{}", suffix(x.dtype())?);
    match flag {
        Some(flag) => launch!(device, &name, config, &xp, &wp, &tp, &y, &cols, &eps, &flag),
        None => launch!(device, &name, config, &xp, &wp, &tp, &y, &cols, &eps),
    }
    Ok((out, xl.shape().clone()))
}

// ---- RMSNorm ------------------------------------------------------------------------------------

struct RmsNorm {
    eps: f32,
}

impl CustomOp2 for RmsNorm {
    fn name(&self) -> &'static str {
        "fused-rms-norm"
    }

    cuda_only!(2);

    fn cuda_fwd(
        &self,
        x: &CudaStorage,
        xl: &Layout,
        w: &CudaStorage,
        wl: &Layout,
    ) -> Result<(CudaStorage, Shape)> {
        let cols = *xl.dims().last().unwrap_or(&1);
        let count = xl.shape().elem_count();
        let rows = count / cols.max(1);
        let device = &x.device;
        let (out, y) = output(device, x.dtype(), count)?;
        let (xp, wp) = (address(x, xl)?, address(w, wl)?);
        let (cols, eps) = (cols as i32, self.eps);
        let name = format!("rms_norm_forward_{}", suffix(x.dtype())?);
        launch!(
            device,
            &name,
            rows_config(rows, row_threads(cols as usize)),
            &xp,
            &wp,
            &y,
            &cols,
            &eps
        );
        Ok((out, xl.shape().clone()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _y: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let dx = x.apply_op3_no_bwd(w, &grad.contiguous()?, &NormBackward::rms(self.eps))?;
        Ok((Some(dx), None))
    }
}

/// The input gradient of a row norm (RMSNorm or LayerNorm): inputs `(x, weight, grad)`, one
/// kernel per row (`{kernel}_{bf16,f32}`), recomputing the row's statistics from `x`.
struct NormBackward {
    eps: f32,
    /// `rms_norm_backward` or `layer_norm_backward`.
    kernel: &'static str,
}

impl NormBackward {
    fn rms(eps: f32) -> Self {
        NormBackward {
            eps,
            kernel: "rms_norm_backward",
        }
    }

    fn layer(eps: f32) -> Self {
        NormBackward {
            eps,
            kernel: "layer_norm_backward",
        }
    }
}

impl CustomOp3 for NormBackward {
    fn name(&self) -> &'static str {
        self.kernel
    }

    cuda_only!(3);

    fn cuda_fwd(
        &self,
        x: &CudaStorage,
        xl: &Layout,
        w: &CudaStorage,
        wl: &Layout,
        g: &CudaStorage,
        gl: &Layout,
    ) -> Result<(CudaStorage, Shape)> {
        launch_rows(self.kernel, self.eps, None, (x, xl), (w, wl), (g, gl))
    }
}

/// RMSNorm forward and backward in one kernel each. A frozen weight gets no gradient (the op
/// tracks `x` alone); a tracked one (a trained copy) gets `Σ g·x̂` through
/// `ops::norm::attach_trained`, the input's gradient still from the backward kernel.
pub fn rms_norm(x: &Tensor, weight: &Tensor, eps: f64) -> Result<Tensor> {
    let x = x.contiguous()?;
    let trained_weight = weight.track_op().then(|| weight.clone());
    let weight = weight.detach().to_dtype(x.dtype())?.contiguous()?;
    let op = RmsNorm { eps: eps as f32 };
    if let Some(trained_weight) = trained_weight {
        let output = x.apply_op2_no_bwd(&weight, &op)?;
        return super::norm::attach_trained(
            "fused-rms-norm-trained",
            &x,
            &trained_weight,
            None,
            output,
            move |x| super::norm::rms_normalized(x, eps),
            move |x, grad| {
                x.apply_op3_no_bwd(&weight, &grad.contiguous()?, &NormBackward::rms(op.eps))
            },
        );
    }
    if x.track_op() {
        x.apply_op2(&weight, op)
    } else {
        x.apply_op2_no_bwd(&weight, &op)
    }
}

/// RMSNorm's input gradient for a frozen `weight`: the fused backward kernel, exactly what
/// [`rms_norm`]'s node returns (`super::norm::NormedInput`'s stand-in runs it).
pub fn rms_norm_input_grad(x: &Tensor, weight: &Tensor, grad: &Tensor, eps: f64) -> Result<Tensor> {
    let x = x.contiguous()?;
    let weight = weight.detach().to_dtype(x.dtype())?.contiguous()?;
    x.apply_op3_no_bwd(&weight, &grad.contiguous()?, &NormBackward::rms(eps as f32))
}

// ---- LayerNorm ----------------------------------------------------------------------------------

/// GPT-2's LayerNorm forward: inputs `(x, weight, bias)`; without a bias the third input is the
/// weight again and is not read.
struct LayerNorm {
    eps: f32,
    has_bias: bool,
}

impl CustomOp3 for LayerNorm {
    fn name(&self) -> &'static str {
        "fused-layer-norm"
    }

    cuda_only!(3);

    fn cuda_fwd(
        &self,
        x: &CudaStorage,
        xl: &Layout,
        w: &CudaStorage,
        wl: &Layout,
        b: &CudaStorage,
        bl: &Layout,
    ) -> Result<(CudaStorage, Shape)> {
        let has_bias = i32::from(self.has_bias);
        launch_rows(
            "layer_norm_forward",
            self.eps,
            Some(has_bias),
            (x, xl),
            (w, wl),
            (b, bl),
        )
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _b: &Tensor,
        _y: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let dx = x.apply_op3_no_bwd(w, &grad.contiguous()?, &NormBackward::layer(self.eps))?;
        Ok((Some(dx), None, None))
    }
}

/// LayerNorm forward and backward in one kernel each, like [`rms_norm`]: frozen weight and bias
/// get no gradient; a tracked one (a trained copy) gets `Σ g·x̂` (weight) or `Σ g` (bias) through
/// `ops::norm::attach_trained`, the input's gradient still from the backward kernel.
pub fn layer_norm(x: &Tensor, weight: &Tensor, bias: Option<&Tensor>, eps: f64) -> Result<Tensor> {
    let x = x.contiguous()?;
    let trained = weight.track_op() || bias.is_some_and(Tensor::track_op);
    let trained_parameters = trained.then(|| (weight.clone(), bias.cloned()));
    let weight = weight.detach().to_dtype(x.dtype())?.contiguous()?;
    let frozen_bias = match bias {
        Some(bias) => bias.detach().to_dtype(x.dtype())?.contiguous()?,
        None => weight.clone(),
    };
    let op = LayerNorm {
        eps: eps as f32,
        has_bias: bias.is_some(),
    };
    if let Some((trained_weight, trained_bias)) = trained_parameters {
        let output = x.apply_op3_no_bwd(&weight, &frozen_bias, &op)?;
        return super::norm::attach_trained(
            "fused-layer-norm-trained",
            &x,
            &trained_weight,
            trained_bias.as_ref(),
            output,
            move |x| super::norm::layer_normalized(x, eps),
            move |x, grad| {
                x.apply_op3_no_bwd(&weight, &grad.contiguous()?, &NormBackward::layer(op.eps))
            },
        );
    }
    if x.track_op() {
        x.apply_op3(&weight, &frozen_bias, op)
    } else {
        x.apply_op3_no_bwd(&weight, &frozen_bias, &op)
    }
}

// ---- RoPE ---------------------------------------------------------------------------------------

struct Rope {
    sign: f32,
    /// `x` is `[B, T, H, D]` (else `[B, H, T, D]`).
    bthd: bool,
}

impl Rope {
    /// Launch on `x` (contiguous, `[B, H, T, D]` or with `bthd` `[B, T, H, D]`) into `y` (which
    /// may be `x`'s own buffer).
    fn launch(
        &self,
        device: &CudaDevice,
        dtype: DType,
        xl: &Layout,
        (xp, cp, sp, y): (u64, u64, u64, u64),
    ) -> Result<()> {
        let (_batch, second, third, dim) = xl.shape().dims4()?;
        let (heads, length) = if self.bthd {
            (third, second)
        } else {
            (second, third)
        };
        let count = xl.shape().elem_count();
        let (heads, length, half) = (heads as i32, length as i32, (dim / 2) as i32);
        let pairs = (count / 2) as u64;
        let (sign, bthd) = (self.sign, i32::from(self.bthd));
        let name = format!("rope_{}", suffix(dtype)?);
        launch!(
            device,
            &name,
            elementwise_config(count / 2),
            &xp,
            &cp,
            &sp,
            &y,
            &heads,
            &length,
            &half,
            &sign,
            &pairs,
            &bthd
        );
        Ok(())
    }
}

impl CustomOp3 for Rope {
    fn name(&self) -> &'static str {
        "fused-rope"
    }

    cuda_only!(3);

    fn cuda_fwd(
        &self,
        x: &CudaStorage,
        xl: &Layout,
        cos: &CudaStorage,
        cl: &Layout,
        sin: &CudaStorage,
        sl: &Layout,
    ) -> Result<(CudaStorage, Shape)> {
        let count = xl.shape().elem_count();
        let device = &x.device;
        let (out, y) = output(device, x.dtype(), count)?;
        let (xp, cp, sp) = (address(x, xl)?, address(cos, cl)?, address(sin, sl)?);
        self.launch(device, x.dtype(), xl, (xp, cp, sp, y))?;
        Ok((out, xl.shape().clone()))
    }

    fn bwd(
        &self,
        _x: &Tensor,
        cos: &Tensor,
        sin: &Tensor,
        _y: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let dx = grad.contiguous()?.apply_op3_no_bwd(
            cos,
            sin,
            &Rope {
                sign: -self.sign,
                bthd: self.bthd,
            },
        )?;
        Ok((Some(dx), None, None))
    }
}

/// [`Rope`] written into its input's buffer.
struct RopeInPlace(Rope);

impl InplaceOp3 for RopeInPlace {
    fn name(&self) -> &'static str {
        "fused-rope-in-place"
    }

    fn cpu_fwd(
        &self,
        _: &mut CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
    ) -> Result<()> {
        bail!("fused-rope-in-place: no CPU implementation")
    }

    fn cuda_fwd(
        &self,
        x: &mut CudaStorage,
        xl: &Layout,
        cos: &CudaStorage,
        cl: &Layout,
        sin: &CudaStorage,
        sl: &Layout,
    ) -> Result<()> {
        let xp = address(x, xl)?;
        let (cp, sp) = (address(cos, cl)?, address(sin, sl)?);
        let device = x.device.clone();
        self.0.launch(&device, x.dtype(), xl, (xp, cp, sp, xp))
    }
}

/// RoPE (rotate-half) of `x [B, H, T, D]` with tables `[B, T, D/2]` (same batch), one kernel each
/// way; `None` when the shapes are not the ones the kernel takes (the caller falls back).
pub fn rope(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Option<Tensor>> {
    let (batch, _heads, length, dim) = x.dims4()?;
    if dim % 2 != 0 || cos.dims() != [batch, length, dim / 2] || sin.dims() != cos.dims() {
        return Ok(None);
    }
    let x = x.contiguous()?;
    let cos = cos.detach().to_dtype(x.dtype())?.contiguous()?;
    let sin = sin.detach().to_dtype(x.dtype())?.contiguous()?;
    let op = Rope {
        sign: 1.0,
        bthd: false,
    };
    Ok(Some(if x.track_op() {
        x.apply_op3(&cos, &sin, op)?
    } else {
        x.apply_op3_no_bwd(&cos, &sin, &op)?
    }))
}

/// RoPE of `x [B, T, H, D]` (contiguous: a projection's output viewed as heads) with tables
/// `[B, T, D/2]`, `[B, T, H, D]` out. With `in_place` the rotation is written into `x`'s own
/// buffer and the result is a graph node over `x` sharing it: `x`'s values are gone, so the caller
/// must own `x` with nothing else reading it (its storage not shared,
/// [`Tensor::storage_is_unique`], and no backward reading it). `None` when the shapes are not the
/// kernel's.
pub fn rope_bthd(x: &Tensor, cos: &Tensor, sin: &Tensor, in_place: bool) -> Result<Option<Tensor>> {
    let (batch, length, _heads, dim) = x.dims4()?;
    if dim % 2 != 0
        || cos.dims() != [batch, length, dim / 2]
        || sin.dims() != cos.dims()
        || !x.is_contiguous()
    {
        return Ok(None);
    }
    let cos = cos.detach().to_dtype(x.dtype())?.contiguous()?;
    let sin = sin.detach().to_dtype(x.dtype())?.contiguous()?;
    let op = Rope {
        sign: 1.0,
        bthd: true,
    };
    if !in_place {
        return Ok(Some(if x.track_op() {
            x.apply_op3(&cos, &sin, op)?
        } else {
            x.apply_op3_no_bwd(&cos, &sin, &op)?
        }));
    }
    x.inplace_op3(&cos, &sin, &RopeInPlace(op))?;
    let inverse = Rope {
        sign: -1.0,
        bthd: true,
    };
    Ok(Some(with_backward(
        "rope-in-place",
        x,
        x.detach(),
        move |_x, _y, grad| grad.contiguous()?.apply_op3_no_bwd(&cos, &sin, &inverse),
    )?))
}

// ---- Residual addition in place -----------------------------------------------------------------

struct AddInto;

impl InplaceOp2 for AddInto {
    fn name(&self) -> &'static str {
        "add-into"
    }

    fn cpu_fwd(&self, _: &mut CpuStorage, _: &Layout, _: &CpuStorage, _: &Layout) -> Result<()> {
        bail!("add-into: no CPU implementation")
    }

    fn cuda_fwd(
        &self,
        y: &mut CudaStorage,
        yl: &Layout,
        x: &CudaStorage,
        xl: &Layout,
    ) -> Result<()> {
        let count = yl.shape().elem_count();
        let (yp, xp) = (address(y, yl)?, address(x, xl)?);
        let n = count as u64;
        let device = y.device.clone();
        let name = format!("add_into_{}", suffix(y.dtype())?);
        launch!(device, &name, elementwise_config(count), &yp, &xp, &n);
        Ok(())
    }
}

/// `a + b` into a new buffer (contiguous, same shape and dtype).
struct Add;

impl CustomOp2 for Add {
    fn name(&self) -> &'static str {
        "add"
    }

    cuda_only!(2);

    fn cuda_fwd(
        &self,
        a: &CudaStorage,
        al: &Layout,
        b: &CudaStorage,
        bl: &Layout,
    ) -> Result<(CudaStorage, Shape)> {
        let count = al.shape().elem_count();
        let device = &a.device;
        let (out, o) = output(device, a.dtype(), count)?;
        let (ap, bp) = (address(a, al)?, address(b, bl)?);
        let n = count as u64;
        let name = format!("add_{}", suffix(a.dtype())?);
        launch!(device, &name, elementwise_config(count), &o, &ap, &bp, &n);
        Ok((out, al.shape().clone()))
    }
}

/// The sum of two gradients of one tensor for candle's `GradStore` (installed by
/// [`install_gradient_add`]): on CUDA, for contiguous bf16/f32 tensors of one shape, the add
/// kernel, written into `sum`'s buffer when nothing else shares it (a gradient a backward also
/// handed elsewhere, e.g. both inputs of a residual addition get the same tensor, is shared and is
/// never written), otherwise into a new one. `None` leaves the sum to candle (`sum + grad`).
/// Detached: the store's gradients are not part of a graph.
pub fn gradient_add(sum: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
    if !applies("grad_add", sum)
        || sum.shape() != grad.shape()
        || sum.dtype() != grad.dtype()
        || !sum.is_contiguous()
        || !grad.is_contiguous()
        || sum.track_op()
        || grad.track_op()
    {
        return Ok(None);
    }
    if sum.storage_is_unique() {
        sum.inplace_op2(grad, &AddInto)?;
        return Ok(Some(sum.clone()));
    }
    Ok(Some(sum.apply_op2_no_bwd(grad, &Add)?))
}

/// Has candle's `GradStore` sum gradients with [`gradient_add`] (process-wide, once; the stock
/// `a + b` stays wherever it returns `None`). Returns whether this call installed it.
pub fn install_gradient_add() -> bool {
    candle_core::backprop::set_gradient_add(gradient_add)
}

/// `residual + branch` written into `branch`'s buffer (contiguous, same shape and dtype, its
/// storage not shared: [`Tensor::storage_is_unique`]); the result is a graph node over both
/// sharing that buffer, whose gradient reaches each tracked input unchanged (an untracked one, layer
/// 0's embeddings, gets none). `branch`'s values are gone: the caller owns it and nothing reads it
/// again.
pub fn add_into(branch: &Tensor, residual: &Tensor) -> Result<Tensor> {
    if branch.shape() != residual.shape() || branch.dtype() != residual.dtype() {
        bail!(
            "add_into: branch {:?} {:?} and residual {:?} {:?} differ",
            branch.shape(),
            branch.dtype(),
            residual.shape(),
            residual.dtype()
        )
    }
    let residual_c = residual.contiguous()?;
    branch.inplace_op2(&residual_c, &AddInto)?;
    with_backward2(
        "add-into",
        [residual, branch],
        branch.detach(),
        |[residual, branch], _y, grad| {
            Ok([
                residual.track_op().then(|| grad.clone()),
                branch.track_op().then(|| grad.clone()),
            ])
        },
    )
}

// ---- SwiGLU -------------------------------------------------------------------------------------

struct Swiglu;

impl CustomOp2 for Swiglu {
    fn name(&self) -> &'static str {
        "fused-swiglu"
    }

    cuda_only!(2);

    fn cuda_fwd(
        &self,
        a: &CudaStorage,
        al: &Layout,
        b: &CudaStorage,
        bl: &Layout,
    ) -> Result<(CudaStorage, Shape)> {
        let count = al.shape().elem_count();
        let device = &a.device;
        let (out, h) = output(device, a.dtype(), count)?;
        let (ap, bp) = (address(a, al)?, address(b, bl)?);
        let n = count as u64;
        let name = format!("swiglu_forward_{}", suffix(a.dtype())?);
        launch!(device, &name, elementwise_config(count), &ap, &bp, &h, &n);
        Ok((out, al.shape().clone()))
    }

    fn bwd(
        &self,
        gate: &Tensor,
        up: &Tensor,
        _h: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let both = gate.apply_op3_no_bwd(up, &grad.contiguous()?, &SwigluBackward)?;
        Ok((Some(both.get(0)?), Some(both.get(1)?)))
    }
}

struct SwigluBackward;

impl CustomOp3 for SwigluBackward {
    fn name(&self) -> &'static str {
        "fused-swiglu-backward"
    }

    cuda_only!(3);

    /// Output `[2, ..]`: the gradients of gate and up.
    fn cuda_fwd(
        &self,
        a: &CudaStorage,
        al: &Layout,
        b: &CudaStorage,
        bl: &Layout,
        g: &CudaStorage,
        gl: &Layout,
    ) -> Result<(CudaStorage, Shape)> {
        let count = al.shape().elem_count();
        let device = &a.device;
        let (out, o) = output(device, a.dtype(), 2 * count)?;
        let (ap, bp, gp) = (address(a, al)?, address(b, bl)?, address(g, gl)?);
        let n = count as u64;
        let name = format!("swiglu_backward_{}", suffix(a.dtype())?);
        launch!(
            device,
            &name,
            elementwise_config(count),
            &ap,
            &bp,
            &gp,
            &o,
            &n
        );
        let mut dims = vec![2];
        dims.extend_from_slice(al.dims());
        Ok((out, Shape::from(dims)))
    }
}

/// `silu(gate) · up` in one kernel; its backward in one kernel giving both gradients.
pub fn swiglu(gate: &Tensor, up: &Tensor) -> Result<Tensor> {
    let gate = gate.contiguous()?;
    let up = up.contiguous()?;
    if gate.track_op() || up.track_op() {
        gate.apply_op2(&up, Swiglu)
    } else {
        gate.apply_op2_no_bwd(&up, &Swiglu)
    }
}

/// The gradients of `silu(gate) · up` for `grad`, in one kernel, without a graph: `(d_gate, d_up)`.
pub fn swiglu_backward(gate: &Tensor, up: &Tensor, grad: &Tensor) -> Result<(Tensor, Tensor)> {
    let both = gate.contiguous()?.apply_op3_no_bwd(
        &up.contiguous()?,
        &grad.contiguous()?,
        &SwigluBackward,
    )?;
    Ok((both.get(0)?, both.get(1)?))
}

/// The ranks [`swiglu_backward_lora`] takes, and the columns each thread of its kernel owns.
const SWIGLU_LORA_RANKS: [(usize, usize); 3] = [(8, 4), (16, 4), (32, 2)];

/// SwiGLU's backward for `grad` fused with `tᵀ·(silu(gate)·up)`: `(d_gate, d_up, product)` for
/// `gate`, `up`, `grad` `[rows, n]` and `t [rows, r]` (bf16), the product `[r, n]` in f32, summed
/// in a fixed order (deterministic). One kernel reads `gate`, `up` and `grad` once and never
/// writes `silu(gate)·up` (rounded to bf16 as the forward kernel rounds it), then one kernel sums
/// its row blocks. `None` where it does not apply: the kernel switched off, a dtype other than
/// bf16, a rank other than 8, 16 or 32, `n` not a multiple of 4 or a buffer not 16-byte aligned.
pub fn swiglu_backward_lora(
    gate: &Tensor,
    up: &Tensor,
    grad: &Tensor,
    t: &Tensor,
) -> Result<Option<(Tensor, Tensor, Tensor)>> {
    if !enabled("swiglu_lora") || !gate.device().is_cuda() {
        return Ok(None);
    }
    let (rows, n) = gate.dims2()?;
    let (t_rows, rank) = t.dims2()?;
    let Some(&(_, columns)) = SWIGLU_LORA_RANKS.iter().find(|(r, _)| *r == rank) else {
        return Ok(None);
    };
    let bf16 = [gate, up, grad, t].iter().all(|x| x.dtype() == DType::BF16);
    if !bf16
        || up.dims() != [rows, n]
        || grad.dims() != [rows, n]
        || t_rows != rows
        || rows == 0
        || n % 4 != 0
        || rows > i32::MAX as usize
        || n > i32::MAX as usize
    {
        return Ok(None);
    }
    let [gate, up, grad, t] = [gate, up, grad, t].map(|x| x.contiguous());
    let (gate, up, grad, t) = (gate?, up?, grad?, t?);
    let pointers = addresses(&[&gate, &up, &grad, &t])?;
    if pointers.iter().any(|p| p % 16 != 0) {
        return Ok(None);
    }
    let device = cuda_device(&gate)?;
    // About one wave of 128-thread blocks (four per SM at these kernels' ~112 registers):
    // taller row blocks mean fewer partial sums to add up.
    let column_blocks = n.div_ceil(128 * columns);
    let rows_per_block = (rows * column_blocks)
        .div_ceil(4 * 132)
        .next_multiple_of(8)
        .clamp(32, 256)
        .min(rows);
    let row_blocks = rows.div_ceil(rows_per_block);
    let (both, out) = output(device, DType::BF16, 2 * rows * n)?;
    let (partials, partial) = output(device, DType::F32, row_blocks * rank * n)?;
    let (sums, sum) = output(device, DType::F32, rank * n)?;
    let config = LaunchConfig {
        grid_dim: (column_blocks as u32, row_blocks as u32, 1),
        block_dim: (128, 1, 1),
        shared_mem_bytes: (rows_per_block * rank * 4) as u32,
    };
    let name = format!("swiglu_backward_lora_bf16_r{rank}");
    let (rows_arg, n_arg, block_arg) = (rows as i32, n as i32, rows_per_block as i32);
    launch!(
        device,
        &name,
        config,
        &pointers[0],
        &pointers[1],
        &pointers[2],
        &pointers[3],
        &out,
        &partial,
        &rows_arg,
        &n_arg,
        &block_arg
    );
    let (blocks, count) = (row_blocks as i32, (rank * n) as u64);
    launch!(
        device,
        "sum_blocks_f32",
        elementwise_config(rank * n),
        &partial,
        &sum,
        &blocks,
        &count
    );
    // Frees are stream-ordered: the partial sums live until the second kernel has read them.
    drop(partials);
    let none = || candle_core::op::BackpropOp::none();
    let both = Tensor::from_storage(Storage::Cuda(both), (2, rows, n), none(), false);
    let product = Tensor::from_storage(Storage::Cuda(sums), (rank, n), none(), false);
    Ok(Some((both.get(0)?, both.get(1)?, product)))
}

// ---- GEMM accumulate ----------------------------------------------------------------------------

/// `c += α·a·op(b)` in place (cuBLAS `β = 1`): the low-rank update of `ops::low_rank_linear`
/// added into the fresh base output / input gradient without a separate addition kernel.
struct GemmAccumulate {
    /// `op(b) = bᵀ` with `b [N, K]`; otherwise `b [K, N]`.
    transposed: bool,
    alpha: f32,
}

/// How a GEMM reads its operands: `a` stored `[M, K]`, or `[K, M]` when `a_transposed`
/// (`op(a) = aᵀ`); `b` stored `[N, K]` when `b_transposed` (`op(b) = bᵀ`), else `[K, N]`.
#[derive(Clone, Copy)]
struct Operands {
    a_transposed: bool,
    b_transposed: bool,
}

/// `(M, N, K)` of `c [M, N] = op(a) · op(b)`, or an error naming `what` when the shapes or the
/// operands' dtypes do not fit.
fn gemm_dims(
    what: &str,
    a: (&CudaStorage, &Layout),
    b: (&CudaStorage, &Layout),
    operands: Operands,
) -> Result<(usize, usize, usize)> {
    let (m, k) = if operands.a_transposed {
        let (k, m) = a.1.shape().dims2()?;
        (m, k)
    } else {
        a.1.shape().dims2()?
    };
    let (n, bk) = if operands.b_transposed {
        b.1.shape().dims2()?
    } else {
        let (bk, n) = b.1.shape().dims2()?;
        (n, bk)
    };
    if bk != k {
        bail!(
            "{what}: a {:?} (transposed: {}) · b {:?} (transposed: {}) do not match",
            a.1.shape(),
            operands.a_transposed,
            b.1.shape(),
            operands.b_transposed,
        )
    }
    if a.0.dtype() != b.0.dtype() {
        bail!("{what}: mixed dtypes")
    }
    Ok((m, n, k))
}

fn cuda_data_type(what: &str, dtype: DType) -> Result<cublas_sys::cudaDataType_t> {
    Ok(match dtype {
        DType::BF16 => cublas_sys::cudaDataType_t::CUDA_R_16BF,
        DType::F32 => cublas_sys::cudaDataType_t::CUDA_R_32F,
        other => bail!("{what}: unsupported dtype {other:?}"),
    })
}

/// `c = α·op(a)·op(b) + β·c` by cuBLAS on row-major contiguous buffers, operands of `dtype` (bf16
/// or f32), `c` of `c_dtype` (the operands' or f32), f32 accumulation; `β = 0` never reads `c`.
fn gemm(
    what: &str,
    device: &CudaDevice,
    (dtype, c_dtype): (DType, DType),
    (m, n, k): (usize, usize, usize),
    operands: Operands,
    (alpha, beta): (f32, f32),
    (a_ptr, b_ptr, c_ptr): (u64, u64, u64),
) -> Result<()> {
    let data_type = cuda_data_type(what, dtype)?;
    let c_type = cuda_data_type(what, c_dtype)?;
    // Row-major C[M, N] is column-major Cᵀ[N, M] = op(b)ᵀ[N, K] · op(a)ᵀ[K, M]: cuBLAS gets
    // (m, n, k) = (N, M, K), C with ld N, first operand b (row-major [N, K] is column-major [K, N]
    // with ld K, to be transposed; row-major [K, N] is column-major [N, K] with ld N, as it is),
    // second a (row-major [M, K] is column-major [K, M] with ld K, as it is; row-major [K, M] is
    // column-major [M, K] with ld M, to be transposed).
    let (transa, lda) = if operands.b_transposed {
        (cublas_sys::cublasOperation_t::CUBLAS_OP_T, k)
    } else {
        (cublas_sys::cublasOperation_t::CUBLAS_OP_N, n)
    };
    let (transb, ldb) = if operands.a_transposed {
        (cublas_sys::cublasOperation_t::CUBLAS_OP_T, m)
    } else {
        (cublas_sys::cublasOperation_t::CUBLAS_OP_N, k)
    };
    let blas = device.cublas_handle();
    // SAFETY: the callers pass live CUDA allocations of the shapes `gemm_dims` checked (c held
    // mutably or freshly allocated); cuBLAS runs on candle's stream, ordered with every other op.
    unsafe {
        cublas::gemm_ex(
            *blas.handle(),
            transa,
            transb,
            n as i32,
            m as i32,
            k as i32,
            (&alpha) as *const f32 as *const _,
            b_ptr as *const _,
            data_type,
            lda as i32,
            a_ptr as *const _,
            data_type,
            ldb as i32,
            (&beta) as *const f32 as *const _,
            c_ptr as *mut _,
            c_type,
            n as i32,
            cublas_sys::cublasComputeType_t::CUBLAS_COMPUTE_32F,
            cublas_sys::cublasGemmAlgo_t::CUBLAS_GEMM_DEFAULT,
        )
    }
    .map_err(|error| candle_core::Error::Msg(format!("{what}: {error:?}")))
}

impl InplaceOp3 for GemmAccumulate {
    fn name(&self) -> &'static str {
        "gemm-accumulate"
    }

    fn cpu_fwd(
        &self,
        _: &mut CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
    ) -> Result<()> {
        bail!("gemm_accumulate: CUDA only (the CPU path adds a product)")
    }

    fn cuda_fwd(
        &self,
        c: &mut CudaStorage,
        c_layout: &Layout,
        a: &CudaStorage,
        a_layout: &Layout,
        b: &CudaStorage,
        b_layout: &Layout,
    ) -> Result<()> {
        let operands = Operands {
            a_transposed: false,
            b_transposed: self.transposed,
        };
        let dims = gemm_dims("gemm_accumulate", (a, a_layout), (b, b_layout), operands)?;
        if c_layout.shape().dims2()? != (dims.0, dims.1) || c.dtype() != a.dtype() {
            bail!(
                "gemm_accumulate: c {:?} {:?} does not take a {:?} · b {:?} {:?}",
                c_layout.shape(),
                c.dtype(),
                a_layout.shape(),
                b_layout.shape(),
                a.dtype()
            )
        }
        let pointers = (
            address(a, a_layout)?,
            address(b, b_layout)?,
            address(c, c_layout)?,
        );
        gemm(
            "gemm_accumulate",
            &c.device,
            (c.dtype(), c.dtype()),
            dims,
            operands,
            (self.alpha, 1.0),
            pointers,
        )
    }
}

/// `α·op(a)·op(b)` into a fresh buffer of `out` (the operands' dtype or f32): the scale rides on
/// cuBLAS's α and the f32 result is cuBLAS's accumulator, neither a pass of its own.
struct GemmProduct {
    operands: Operands,
    alpha: f32,
    out: DType,
}

impl CustomOp2 for GemmProduct {
    fn name(&self) -> &'static str {
        "gemm-product"
    }

    cuda_only!(2);

    fn cuda_fwd(
        &self,
        a: &CudaStorage,
        a_layout: &Layout,
        b: &CudaStorage,
        b_layout: &Layout,
    ) -> Result<(CudaStorage, Shape)> {
        let dims = gemm_dims("gemm_product", (a, a_layout), (b, b_layout), self.operands)?;
        let (m, n, _) = dims;
        let (out, c_ptr) = output(&a.device, self.out, m * n)?;
        gemm(
            "gemm_product",
            &a.device,
            (a.dtype(), self.out),
            dims,
            self.operands,
            (self.alpha, 0.0),
            (address(a, a_layout)?, address(b, b_layout)?, c_ptr),
        )?;
        Ok((out, Shape::from((m, n))))
    }
}

/// `α·op(a)·op(b)` for contiguous 2-D CUDA tensors of one dtype (bf16 or f32): `a [M, K]`, or
/// `[K, M]` when `a_transposed`; `b [N, K]` when `b_transposed`, else `[K, N]`; written in `out`
/// (the operands' dtype, or f32 from bf16 operands: cuBLAS's f32 accumulator, never rounded to
/// bf16). One cuBLAS call; no gradient.
pub fn gemm_product(
    (a, a_transposed): (&Tensor, bool),
    (b, b_transposed): (&Tensor, bool),
    alpha: f64,
    out: DType,
) -> Result<Tensor> {
    if out != a.dtype() && out != DType::F32 {
        bail!(
            "gemm_product: {:?} operands give {:?} or f32, not {out:?}",
            a.dtype(),
            a.dtype()
        )
    }
    a.contiguous()?.apply_op2_no_bwd(
        &b.contiguous()?,
        &GemmProduct {
            operands: Operands {
                a_transposed,
                b_transposed,
            },
            alpha: alpha as f32,
            out,
        },
    )
}

/// `c += α·a·op(b)` in place for contiguous 2-D CUDA tensors of one dtype (bf16 or f32): `c [M,
/// N]`, `a [M, K]`, `b [N, K]` when `transposed` (`op(b) = bᵀ`), else `b [K, N]`. `c` must be a
/// tensor nobody else reads (a fresh output).
pub fn gemm_accumulate(
    c: &Tensor,
    a: &Tensor,
    b: &Tensor,
    transposed: bool,
    alpha: f64,
) -> Result<()> {
    let (a, b) = (a.contiguous()?, b.contiguous()?);
    if !c.is_contiguous() {
        bail!("gemm_accumulate: the accumulator must be contiguous")
    }
    c.inplace_op3(
        &a,
        &b,
        &GemmAccumulate {
            transposed,
            alpha: alpha as f32,
        },
    )
}

// ---- Masked softmax -----------------------------------------------------------------------------

/// Softmax of `x + mask` over the last dimension; `mask` `[B, 1, T, S]` f32 for `x [B, H, T, S]`.
struct MaskedSoftmax {
    mask: Option<Tensor>,
    heads: i32,
    length: i32,
}

impl MaskedSoftmax {
    fn mask_address(&self) -> Result<u64> {
        self.mask.as_ref().map_or(Ok(0), tensor_address)
    }
}

impl CustomOp1 for MaskedSoftmax {
    fn name(&self) -> &'static str {
        "fused-masked-softmax"
    }

    cuda_only!(1);

    fn cuda_fwd(&self, x: &CudaStorage, xl: &Layout) -> Result<(CudaStorage, Shape)> {
        let cols = *xl.dims().last().unwrap_or(&1);
        let count = xl.shape().elem_count();
        let rows = count / cols.max(1);
        let device = &x.device;
        let (out, y) = output(device, x.dtype(), count)?;
        let (xp, mp) = (address(x, xl)?, self.mask_address()?);
        let (cols, heads, length) = (cols as i32, self.heads, self.length);
        let name = format!("masked_softmax_forward_{}", suffix(x.dtype())?);
        launch!(
            device,
            &name,
            rows_config(rows, row_threads(cols as usize).min(256)),
            &xp,
            &mp,
            &y,
            &cols,
            &heads,
            &length
        );
        Ok((out, xl.shape().clone()))
    }

    fn bwd(&self, x: &Tensor, _y: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        let backward = MaskedSoftmaxBackward {
            mask: self.mask.clone(),
            heads: self.heads,
            length: self.length,
        };
        Ok(Some(x.apply_op2_no_bwd(&grad.contiguous()?, &backward)?))
    }
}

struct MaskedSoftmaxBackward {
    mask: Option<Tensor>,
    heads: i32,
    length: i32,
}

impl CustomOp2 for MaskedSoftmaxBackward {
    fn name(&self) -> &'static str {
        "fused-masked-softmax-backward"
    }

    cuda_only!(2);

    fn cuda_fwd(
        &self,
        x: &CudaStorage,
        xl: &Layout,
        g: &CudaStorage,
        gl: &Layout,
    ) -> Result<(CudaStorage, Shape)> {
        let cols = *xl.dims().last().unwrap_or(&1);
        let count = xl.shape().elem_count();
        let rows = count / cols.max(1);
        let device = &x.device;
        let (out, dx) = output(device, x.dtype(), count)?;
        let mask = self.mask.as_ref().map_or(Ok(0), tensor_address)?;
        let (xp, gp) = (address(x, xl)?, address(g, gl)?);
        let (cols, heads, length) = (cols as i32, self.heads, self.length);
        let name = format!("masked_softmax_backward_{}", suffix(x.dtype())?);
        launch!(
            device,
            &name,
            rows_config(rows, row_threads(cols as usize).min(256)),
            &xp,
            &mask,
            &gp,
            &dx,
            &cols,
            &heads,
            &length
        );
        Ok((out, xl.shape().clone()))
    }
}

/// `softmax(x + mask)` over the last dimension in one kernel each way (f32 inside, the backward
/// recomputing the probabilities from `x`); `None` when the mask is not `[B, 1, T, S]` for
/// `x [B, H, T, S]` (the caller falls back).
pub fn masked_softmax(x: &Tensor, mask: Option<&Tensor>) -> Result<Option<Tensor>> {
    let (mask, heads, length) = match mask {
        None => (None, 1, 1),
        Some(mask) => {
            let Ok((batch, heads, length, keys)) = x.dims4() else {
                return Ok(None);
            };
            if mask.dims() != [batch, 1, length, keys] {
                return Ok(None);
            }
            let mask = mask.detach().to_dtype(DType::F32)?.contiguous()?;
            (Some(mask), heads as i32, length as i32)
        }
    };
    let x = x.contiguous()?;
    let op = MaskedSoftmax {
        mask,
        heads,
        length,
    };
    Ok(Some(if x.track_op() {
        x.apply_op1(op)?
    } else {
        x.apply_op1_no_bwd(&op)?
    }))
}

// ---- Linear + cross-entropy, chunked -----------------------------------------------------------

struct CrossEntropyRows;

impl CustomOp3 for CrossEntropyRows {
    fn name(&self) -> &'static str {
        "fused-cross-entropy-rows"
    }

    cuda_only!(3);

    /// `(logits [R, V], targets u32 [R], weights f32 [R])` → stats `[R, 4]` (lse, weighted NLL,
    /// weight, target bits).
    fn cuda_fwd(
        &self,
        l: &CudaStorage,
        ll: &Layout,
        t: &CudaStorage,
        tl: &Layout,
        w: &CudaStorage,
        wl: &Layout,
    ) -> Result<(CudaStorage, Shape)> {
        let (rows, vocab) = ll.shape().dims2()?;
        let device = &l.device;
        let (out, s) = output(device, DType::F32, 4 * rows)?;
        let (lp, tp, wp) = (address(l, ll)?, address(t, tl)?, address(w, wl)?);
        let vocab_i = vocab as i32;
        let name = format!("cross_entropy_forward_{}", suffix(l.dtype())?);
        launch!(
            device,
            &name,
            rows_config(rows, 1024),
            &lp,
            &tp,
            &wp,
            &s,
            &vocab_i
        );
        Ok((out, Shape::from((rows, 4))))
    }
}

struct CrossEntropyGradient;

impl CustomOp2 for CrossEntropyGradient {
    fn name(&self) -> &'static str {
        "fused-cross-entropy-gradient"
    }

    cuda_only!(2);

    /// `(logits [R, V], stats [R, 4])` → `dlogits [R, V] = (softmax − onehot)·weight`.
    fn cuda_fwd(
        &self,
        l: &CudaStorage,
        ll: &Layout,
        s: &CudaStorage,
        sl: &Layout,
    ) -> Result<(CudaStorage, Shape)> {
        let (rows, vocab) = ll.shape().dims2()?;
        let device = &l.device;
        let (out, d) = output(device, l.dtype(), rows * vocab)?;
        let (lp, sp) = (address(l, ll)?, address(s, sl)?);
        let vocab_i = vocab as i32;
        let name = format!("cross_entropy_backward_{}", suffix(l.dtype())?);
        launch!(
            device,
            &name,
            rows_config(rows, 1024),
            &lp,
            &sp,
            &d,
            &vocab_i
        );
        Ok((out, ll.shape().clone()))
    }
}

/// Bytes of logits one chunk may hold (bf16 at a 128k vocabulary: 1024 rows).
const CHUNK_BYTES: usize = 256 << 20;

/// Summed weighted NLL of `hidden [N, H] · weightᵀ` (weight `[V, H]`, frozen) against `targets`
/// (`N` u32, validated by the caller) with `weights` (`N` f32, 0 = ignored), without ever holding
/// more than one chunk of logits: per chunk one GEMM, the row kernel, and (when `hidden` is
/// tracked) the gradient kernel and one GEMM for `dhidden`, which is kept (`N × H`) and scaled by
/// the upstream gradient in the backward. Returns the f32 scalar sum.
pub fn linear_cross_entropy_sum(
    hidden: &Tensor,
    weight: &Tensor,
    targets: &[u32],
    weights: &[f32],
) -> Result<Tensor> {
    let vocab = weight.dim(0)?;
    let chunk = CHUNK_BYTES / (vocab * element_size(hidden.dtype())?).max(1);
    linear_cross_entropy_sum_chunked(hidden, weight, targets, weights, chunk)
}

/// [`linear_cross_entropy_sum`] with chunks of `chunk` rows (tests use tiny ones).
pub fn linear_cross_entropy_sum_chunked(
    hidden: &Tensor,
    weight: &Tensor,
    targets: &[u32],
    weights: &[f32],
    chunk: usize,
) -> Result<Tensor> {
    let (rows, _width) = hidden.dims2()?;
    if targets.len() != rows || weights.len() != rows {
        bail!(
            "linear_cross_entropy: {rows} rows but {} targets and {} weights",
            targets.len(),
            weights.len()
        )
    }
    let device = hidden.device();
    let flat = hidden.detach().contiguous()?;
    let weight = weight.detach();
    let targets = Tensor::from_slice(targets, rows, device)?;
    let weights = Tensor::from_slice(weights, rows, device)?;
    let chunk = chunk.clamp(1, rows.max(1));
    let track = hidden.track_op();
    let mut sums = Vec::with_capacity(rows.div_ceil(chunk));
    let mut gradients = Vec::with_capacity(rows.div_ceil(chunk));
    let mut start = 0;
    while start < rows {
        let size = chunk.min(rows - start);
        let logits = flat.narrow(0, start, size)?.matmul(&weight.t()?)?;
        let stats = logits.apply_op3_no_bwd(
            &targets.narrow(0, start, size)?,
            &weights.narrow(0, start, size)?,
            &CrossEntropyRows,
        )?;
        sums.push(stats.narrow(1, 1, 1)?.sum_all()?);
        if track {
            let dlogits = logits.apply_op2_no_bwd(&stats, &CrossEntropyGradient)?;
            gradients.push(dlogits.matmul(&weight)?);
        }
        start += size;
    }
    let sum = Tensor::stack(&sums, 0)?.sum_all()?;
    if !track {
        return Ok(sum);
    }
    let dhidden = Tensor::cat(&gradients, 0)?;
    drop(gradients);
    let dtype = hidden.dtype();
    with_backward(
        "fused-linear-cross-entropy",
        hidden,
        sum,
        move |_x, _y, grad| {
            dhidden
                .to_dtype(DType::F32)?
                .broadcast_mul(&grad.to_dtype(DType::F32)?)?
                .to_dtype(dtype)
        },
    )
}

// ---- Multi-tensor AdamW ---------------------------------------------------------------------

/// Prefix sums of the element counts, `[0, n0, n0 + n1, ..]`.
fn offsets(tensors: &[&Tensor]) -> Vec<i64> {
    let mut offsets = Vec::with_capacity(tensors.len() + 1);
    let mut total = 0i64;
    offsets.push(0);
    for tensor in tensors {
        total += tensor.elem_count() as i64;
        offsets.push(total);
    }
    offsets
}

fn addresses(tensors: &[&Tensor]) -> Result<Vec<u64>> {
    tensors.iter().map(|t| tensor_address(t)).collect()
}

fn multi_tensor_config(total: i64) -> LaunchConfig {
    let blocks = (total as usize).div_ceil(256).clamp(1, 132 * 8);
    LaunchConfig {
        grid_dim: (blocks as u32, 1, 1),
        block_dim: (256, 1, 1),
        shared_mem_bytes: 0,
    }
}

/// `Σ g²` over contiguous CUDA gradients of one dtype (bf16 or f32), accumulated in f64 on the
/// device into `accumulator` (one launch).
fn sum_squares_into(device: &CudaDevice, gradients: &[&Tensor], accumulator: u64) -> Result<()> {
    let Some(first) = gradients.first() else {
        return Ok(());
    };
    let offsets = offsets(gradients);
    let total = *offsets.last().unwrap_or(&0);
    let views = gradients
        .iter()
        .map(|g| {
            gradient_view(g)?.map(|(a, _)| a).ok_or_else(|| {
                candle_core::Error::Msg("sum_squares: unsupported gradient layout".into())
            })
        })
        .collect::<Result<Vec<u64>>>()?;
    let table = device.clone_htod(&views)?;
    let offsets_device = device.clone_htod(&offsets)?;
    let stream = device.cuda_stream();
    let (table_ptr, offsets_ptr) = (
        table.device_ptr(&stream).0,
        offsets_device.device_ptr(&stream).0,
    );
    let count = gradients.len() as i32;
    let name = format!("sum_squares_{}", suffix(first.dtype())?);
    launch!(
        device,
        &name,
        multi_tensor_config(total),
        &table_ptr,
        &offsets_ptr,
        &count,
        &accumulator
    );
    Ok(())
}

/// `sources` (contiguous f32 tensors of one CUDA device) cast to bf16 in one launch: fresh
/// contiguous tensors of the same shapes, bit-equal to candle's `to_dtype(DType::BF16)` (both
/// round to nearest even).
pub fn cast_many_bf16(sources: &[&Tensor]) -> Result<Vec<Tensor>> {
    let Some(first) = sources.first() else {
        return Ok(Vec::new());
    };
    let device = cuda_device(first)?.clone();
    for source in sources {
        if source.dtype() != DType::F32 || !source.is_contiguous() || source.elem_count() == 0 {
            bail!(
                "multi-tensor cast: a source is not a non-empty contiguous f32 tensor ({:?}, {:?})",
                source.dtype(),
                source.layout()
            )
        }
        if !source.device().same_device(first.device()) {
            bail!("multi-tensor cast: the sources are on different devices")
        }
    }
    let offsets = offsets(sources);
    let total = *offsets.last().unwrap_or(&0);
    let mut outputs = Vec::with_capacity(sources.len());
    let mut targets = Vec::with_capacity(sources.len());
    for source in sources {
        let (storage, pointer) = output(&device, DType::BF16, source.elem_count())?;
        targets.push(pointer);
        outputs.push(Tensor::from_storage(
            Storage::Cuda(storage),
            source.shape().clone(),
            candle_core::op::BackpropOp::none(),
            false,
        ));
    }
    let source_table = device.clone_htod(&addresses(sources)?)?;
    let target_table = device.clone_htod(&targets)?;
    let offsets_device = device.clone_htod(&offsets)?;
    let stream = device.cuda_stream();
    let (source_ptr, target_ptr, offsets_ptr) = (
        source_table.device_ptr(&stream).0,
        target_table.device_ptr(&stream).0,
        offsets_device.device_ptr(&stream).0,
    );
    let count = sources.len() as i32;
    launch!(
        device,
        "multi_cast_f32_bf16",
        multi_tensor_config(total),
        &source_ptr,
        &target_ptr,
        &offsets_ptr,
        &count
    );
    Ok(outputs)
}

/// The global L2 norm of CUDA gradients (any mix of bf16 and f32): one launch per dtype, one read.
pub fn global_norm(gradients: &[&Tensor]) -> Result<f64> {
    let Some(first) = gradients.first() else {
        return Ok(0.0);
    };
    let device = cuda_device(first)?.clone();
    let accumulator = device.alloc_zeros::<f64>(1)?;
    let stream = device.cuda_stream();
    let accumulator_ptr = accumulator.device_ptr(&stream).0;
    // Transposed views are read in place (the sum does not care about order); other layouts
    // and dtypes are copied.
    let contiguous: Vec<Tensor> = gradients
        .iter()
        .map(|g| match g.dtype() {
            DType::BF16 | DType::F32 if gradient_view(g)?.is_some() => Ok((*g).clone()),
            DType::BF16 | DType::F32 => g.contiguous(),
            _ => g.to_dtype(DType::F32),
        })
        .collect::<Result<_>>()?;
    for dtype in [DType::BF16, DType::F32] {
        let group: Vec<&Tensor> = contiguous.iter().filter(|g| g.dtype() == dtype).collect();
        sum_squares_into(&device, &group, accumulator_ptr)?;
    }
    let total = device.clone_dtoh(&accumulator)?;
    Ok(total.first().copied().unwrap_or(0.0).sqrt())
}

/// One AdamW update of every parameter given, in one launch per parameter dtype.
pub struct AdamWLaunch<'a> {
    /// `(parameter, gradient, exp_avg, exp_avg_sq, decay factor)`; the parameter and the
    /// moments (contiguous) are updated in place; the gradient has the parameter's dtype and is
    /// contiguous or a transposed 2-D view (`gradient_view`).
    pub tensors: Vec<(&'a Tensor, &'a Tensor, &'a Tensor, &'a Tensor, f32)>,
    pub grad_scale: f32,
    pub beta1: f32,
    pub beta2: f32,
    pub epsilon: f32,
    pub step_size: f32,
    pub bias_correction2_sqrt: f32,
}

impl AdamWLaunch<'_> {
    pub fn run(&self) -> Result<()> {
        let Some(first) = self.tensors.first() else {
            return Ok(());
        };
        let device = cuda_device(first.0)?.clone();
        let stream = device.cuda_stream();
        for dtype in [DType::BF16, DType::F32] {
            let group: Vec<_> = self
                .tensors
                .iter()
                .filter(|t| t.0.dtype() == dtype)
                .collect();
            if group.is_empty() {
                continue;
            }
            for (parameter, gradient, m, v, _) in &group {
                if gradient.dtype() != dtype || m.dtype() != DType::F32 || v.dtype() != DType::F32 {
                    bail!("multi-tensor AdamW: a gradient or moment has the wrong dtype")
                }
                if parameter.dims() != gradient.dims() || !parameter.is_contiguous() {
                    bail!("multi-tensor AdamW: parameter and gradient must be contiguous and of one shape")
                }
            }
            let column = |index: usize| -> Vec<&Tensor> {
                group
                    .iter()
                    .map(|t| match index {
                        0 => t.0,
                        1 => t.1,
                        2 => t.2,
                        _ => t.3,
                    })
                    .collect()
            };
            let offsets = offsets(&column(0));
            let total = *offsets.last().unwrap_or(&0);
            let mut gradient_cols = Vec::with_capacity(group.len());
            let mut gradient_addresses = Vec::with_capacity(group.len());
            for t in &group {
                let Some((address, cols)) = gradient_view(t.1)? else {
                    bail!(
                        "multi-tensor AdamW: unsupported gradient layout {:?}",
                        t.1.layout()
                    )
                };
                gradient_addresses.push(address);
                gradient_cols.push(cols);
            }
            let tables: Vec<_> = (0..4)
                .map(|index| match index {
                    1 => device.clone_htod(&gradient_addresses),
                    _ => device.clone_htod(&addresses(&column(index))?),
                })
                .collect::<Result<_>>()?;
            let gradient_cols = device.clone_htod(&gradient_cols)?;
            let gradient_cols_ptr = gradient_cols.device_ptr(&stream).0;
            let decay: Vec<f32> = group.iter().map(|t| t.4).collect();
            let decay = device.clone_htod(&decay)?;
            let offsets_device = device.clone_htod(&offsets)?;
            let pointers: Vec<u64> = tables.iter().map(|t| t.device_ptr(&stream).0).collect();
            let decay_ptr = decay.device_ptr(&stream).0;
            let offsets_ptr = offsets_device.device_ptr(&stream).0;
            let count = group.len() as i32;
            let name = format!("adamw_{}", suffix(dtype)?);
            launch!(
                device,
                &name,
                multi_tensor_config(total),
                &pointers[0],
                &pointers[1],
                &gradient_cols_ptr,
                &pointers[2],
                &pointers[3],
                &decay_ptr,
                &offsets_ptr,
                &count,
                &self.grad_scale,
                &self.beta1,
                &self.beta2,
                &self.epsilon,
                &self.step_size,
                &self.bias_correction2_sqrt,
            );
        }
        Ok(())
    }
}
