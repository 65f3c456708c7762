//! The CUDA path of [`super::QuantizedWeight`]: launching `kernels/nf4.cu` (compiled to PTX by
//! build.rs with `--features cuda`) on candle's stream.
//!
//! Owns the dequantization of a device-resident 4-bit weight into a fresh bf16 / f16 / f32
//! tensor, bit-equal to the CPU reference (the kernel rounds every product and sum on its own).
//! The frozen linear's GEMM stays cuBLAS through candle (`super::linear`). The module is loaded
//! once per device through `CudaDevice::get_or_load_custom_func` (module `peftpipe_nf4`).
//! Must not: be reached for CPU tensors or other dtypes (the caller dispatches).
#![expect(
    unsafe_code,
    reason = "allocating uninitialised device memory and launching kernels are FFI calls"
)]

use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc::driver::{DevicePtr, LaunchConfig, PushKernelArg};
use candle_core::cuda_backend::WrapErr;
use candle_core::op::BackpropOp;
use candle_core::{bail, CudaStorage, DType, Device, Result, Storage, Tensor};

use super::linear::{DeviceAbsmax, Inner};

const PTX: &str = include_str!(concat!(env!("OUT_DIR"), "/nf4.ptx"));
const MODULE: &str = "peftpipe_nf4";

/// The device address of a contiguous u8 / f32 CUDA tensor's first element.
fn address(tensor: &Tensor) -> Result<u64> {
    let (storage, layout) = tensor.storage_and_layout();
    let Storage::Cuda(cuda) = &*storage else {
        bail!("nf4 kernels: a tensor is not on a CUDA device")
    };
    let Some((start, _)) = layout.contiguous_offsets() else {
        bail!("nf4 kernels: a tensor is not contiguous")
    };
    let stream = cuda.device.cuda_stream();
    let (base, size) = match cuda.dtype() {
        DType::U8 => (cuda.as_cuda_slice::<u8>()?.device_ptr(&stream).0, 1),
        DType::F32 => (cuda.as_cuda_slice::<f32>()?.device_ptr(&stream).0, 4),
        other => bail!("nf4 kernels: unexpected dtype {other:?}"),
    };
    Ok(base + (start * size) as u64)
}

/// `dequant(W)` `[out, in]` in `dtype` on the weight's GPU.
pub(super) fn dequantize(inner: &Inner, dtype: DType) -> Result<Tensor> {
    let Device::Cuda(device) = inner.packed.device() else {
        bail!("nf4 kernels: the weight is not on a CUDA device")
    };
    let count = inner.out_features * inner.in_features;
    let stream = device.cuda_stream();
    // SAFETY: the kernel launched below writes every one of the `count` elements.
    let (storage, out, name) = match dtype {
        DType::F32 => {
            let slice = unsafe { device.alloc::<f32>(count)? };
            let pointer = slice.device_ptr(&stream).0;
            let storage = CudaStorage::wrap_cuda_slice(slice, device.clone());
            (storage, pointer, "nf4_dequantize_f32")
        }
        DType::BF16 => {
            let slice = unsafe { device.alloc::<half::bf16>(count)? };
            let pointer = slice.device_ptr(&stream).0;
            let storage = CudaStorage::wrap_cuda_slice(slice, device.clone());
            (storage, pointer, "nf4_dequantize_bf16")
        }
        DType::F16 => {
            let slice = unsafe { device.alloc::<half::f16>(count)? };
            let pointer = slice.device_ptr(&stream).0;
            let storage = CudaStorage::wrap_cuda_slice(slice, device.clone());
            (storage, pointer, "nf4_dequantize_f16")
        }
        other => bail!("nf4 kernels: unsupported output dtype {other:?}"),
    };
    let packed = address(&inner.packed)?;
    let code = address(&inner.code)?;
    let (plain, quantized, nested_scale, nested_code, offset, nested_block) = match &inner.absmax {
        DeviceAbsmax::Plain(values) => (address(values)?, 0u64, 0u64, 0u64, 0f32, 1i32),
        DeviceAbsmax::Nested {
            quantized,
            scale,
            code,
            block_size,
            offset,
        } => (
            0u64,
            address(quantized)?,
            address(scale)?,
            address(code)?,
            *offset,
            *block_size as i32,
        ),
    };
    let block_size = inner.block_size as i32;
    let count64 = count as u64;
    let blocks = count.div_ceil(2).div_ceil(256).clamp(1, 132 * 32) as u32;
    let config = LaunchConfig {
        grid_dim: (blocks, 1, 1),
        block_dim: (256, 1, 1),
        shared_mem_bytes: 0,
    };
    let function = device.get_or_load_custom_func(name, MODULE, PTX)?;
    let mut builder = function.builder();
    builder.arg(&packed);
    builder.arg(&code);
    builder.arg(&plain);
    builder.arg(&quantized);
    builder.arg(&nested_scale);
    builder.arg(&nested_code);
    builder.arg(&offset);
    builder.arg(&nested_block);
    builder.arg(&block_size);
    builder.arg(&count64);
    builder.arg(&out);
    // SAFETY: the arguments match `nf4_dequantize_*` in kernels/nf4.cu: live contiguous buffers
    // of the sizes QuantizedWeight::new checked, and an output of `count` elements.
    unsafe { builder.launch(config) }.w()?;
    Ok(Tensor::from_storage(
        Storage::Cuda(storage),
        (inner.out_features, inner.in_features),
        BackpropOp::none(),
        false,
    ))
}
