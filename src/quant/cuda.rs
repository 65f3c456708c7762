//! The CUDA path of [`super::QuantizedWeight`]: launching `kernels/nf4.cu` (compiled to PTX by
//! build.rs with `--features cuda`) on candle's stream.
//!
//! Owns the dequantization of a device-resident 4-bit weight into a fresh bf16 / f16 / f32
//! tensor, bit-equal to the CPU reference (the kernel rounds every product and sum on its own),
//! and the fused dequantize + GEMM of the frozen linear (`y = x·dequant(W)ᵀ` and its input
//! gradient `dx = dy·dequant(W)`, bf16 / f16 on tensor cores, the weight dequantized tile by tile
//! into shared memory and never materialised). Which of fused and dequantize + cuBLAS runs is
//! decided in `super::linear`. The module is loaded once per device through
//! `CudaDevice::get_or_load_custom_func` (module `peftpipe_nf4`).
//! Must not: be reached for CPU tensors or other dtypes (the caller dispatches).
#![expect(
    unsafe_code,
    reason = "allocating uninitialised device memory and launching kernels are FFI calls"
)]

use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc::driver::{
    DevicePtr, LaunchArgs, LaunchConfig, PushKernelArg,
};
use candle_core::cuda_backend::WrapErr;
use candle_core::op::BackpropOp;
use candle_core::{bail, CudaStorage, DType, Device, Layout, Result, Storage, Tensor};

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
    let weight = WeightArgs::of(inner)?;
    let block_size = inner.block_size as i32;
    let count64 = count as u64;
    // Four groups of 8 values per thread and pass (kernels/nf4.cu), grid-stride past 132 × 32
    // blocks.
    let blocks = count.div_ceil(8 * 4).div_ceil(256).clamp(1, 132 * 32) as u32;
    let config = LaunchConfig {
        grid_dim: (blocks, 1, 1),
        block_dim: (256, 1, 1),
        shared_mem_bytes: 0,
    };
    let function = device.get_or_load_custom_func(name, MODULE, PTX)?;
    let mut builder = function.builder();
    weight.push(&mut builder);
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

/// The weight's kernel arguments, in the order every kernel of `kernels/nf4.cu` takes them: the
/// packed codes, the code table, then `Absmax` (plain `f32` absmax, or the nested state).
struct WeightArgs {
    packed: u64,
    code: u64,
    plain: u64,
    quantized: u64,
    nested_scale: u64,
    nested_code: u64,
    offset: f32,
    nested_block: i32,
}

impl WeightArgs {
    fn of(inner: &Inner) -> Result<Self> {
        let (packed, table) = (address(&inner.packed)?, address(&inner.code)?);
        Ok(match &inner.absmax {
            DeviceAbsmax::Plain(values) => Self {
                packed,
                code: table,
                plain: address(values)?,
                quantized: 0,
                nested_scale: 0,
                nested_code: 0,
                offset: 0.0,
                nested_block: 1,
            },
            DeviceAbsmax::Nested {
                quantized,
                scale,
                code,
                block_size,
                offset,
            } => Self {
                packed,
                code: table,
                plain: 0,
                quantized: address(quantized)?,
                nested_scale: address(scale)?,
                nested_code: address(code)?,
                offset: *offset,
                nested_block: i32::try_from(*block_size).map_err(|_| {
                    candle_core::Error::Msg(format!("nf4 kernels: nested block of {block_size}"))
                })?,
            },
        })
    }

    /// Push the eight arguments onto a launch.
    fn push<'a>(&'a self, builder: &mut LaunchArgs<'a>) {
        builder.arg(&self.packed);
        builder.arg(&self.code);
        builder.arg(&self.plain);
        builder.arg(&self.quantized);
        builder.arg(&self.nested_scale);
        builder.arg(&self.nested_code);
        builder.arg(&self.offset);
        builder.arg(&self.nested_block);
    }
}

/// Rows up to which the fused kernels take their small tile (16 rows × 32 columns); above it,
/// 64 × 64. Must match the `_m16` / `_m64` instantiations in kernels/nf4.cu.
const SMALL_TILE_ROWS: usize = 16;

/// The fused dequantize + GEMM (`nf4_gemm_*` in kernels/nf4.cu) over a contiguous bf16 / f16
/// activation `act` of `rows` rows: forward (`backward == false`) `y [rows, out] = act [rows, in] ·
/// dequant(W)ᵀ`, backward `dx [rows, in] = act [rows, out] · dequant(W)`. The caller has checked
/// [`super::linear`]'s fused requirements (in_features % 64 == 0, a power-of-two block size, dims
/// that fit the grid); the launch rechecks what would make the kernel read out of bounds.
pub(super) fn fused_matmul(
    inner: &Inner,
    act: &CudaStorage,
    act_layout: &Layout,
    rows: usize,
    backward: bool,
) -> Result<CudaStorage> {
    let device = &act.device;
    let (reduction, columns) = if backward {
        (inner.out_features, inner.in_features)
    } else {
        (inner.in_features, inner.out_features)
    };
    let Some((start, end)) = act_layout.contiguous_offsets() else {
        bail!("nf4 kernels: the activation is not contiguous")
    };
    if end - start != rows * reduction {
        bail!(
            "nf4 kernels: an activation of {} values for {rows} rows of {reduction}",
            end - start
        )
    }
    if inner.in_features % 64 != 0 || !inner.block_size.is_power_of_two() || inner.block_size < 16 {
        bail!(
            "nf4 kernels: the fused GEMM needs in_features % 64 == 0 and a power-of-two block of \
             at least 16 (got {} and {})",
            inner.in_features,
            inner.block_size
        )
    }
    let (tile_rows, tile_columns, tile) = if rows <= SMALL_TILE_ROWS {
        (16usize, 32usize, "m16")
    } else {
        (64, 64, "m64")
    };
    let grid_x = u32::try_from(columns.div_ceil(tile_columns)).ok();
    let grid_y = u32::try_from(rows.div_ceil(tile_rows))
        .ok()
        .filter(|&y| y <= 65_535);
    let to_i32 = |value: usize| i32::try_from(value).ok();
    let (Some(grid_x), Some(grid_y), Some(rows32), Some(out32), Some(in32)) = (
        grid_x,
        grid_y,
        to_i32(rows),
        to_i32(inner.out_features),
        to_i32(inner.in_features),
    ) else {
        bail!(
            "nf4 kernels: {rows} × {} × {} is too large for the fused GEMM's grid",
            inner.out_features,
            inner.in_features
        )
    };
    let stream = device.cuda_stream();
    let count = rows * columns;
    // SAFETY: the kernel launched below writes every one of the `count` output elements (each
    // output element belongs to exactly one tile, and every tile is launched).
    let (storage, out, dtype_name, act_address) = match act.dtype() {
        DType::BF16 => {
            let slice = unsafe { device.alloc::<half::bf16>(count)? };
            let pointer = slice.device_ptr(&stream).0;
            let base = act.as_cuda_slice::<half::bf16>()?.device_ptr(&stream).0;
            let storage = CudaStorage::wrap_cuda_slice(slice, device.clone());
            (storage, pointer, "bf16", base + 2 * start as u64)
        }
        DType::F16 => {
            let slice = unsafe { device.alloc::<half::f16>(count)? };
            let pointer = slice.device_ptr(&stream).0;
            let base = act.as_cuda_slice::<half::f16>()?.device_ptr(&stream).0;
            let storage = CudaStorage::wrap_cuda_slice(slice, device.clone());
            (storage, pointer, "f16", base + 2 * start as u64)
        }
        other => bail!("nf4 kernels: the fused GEMM takes bf16 or f16, not {other:?}"),
    };
    let weight = WeightArgs::of(inner)?;
    if weight.packed % 8 != 0 {
        bail!("nf4 kernels: the packed weight is not 8-byte aligned")
    }
    let log2_block = inner.block_size.trailing_zeros() as i32;
    let name = format!(
        "nf4_gemm_{}_{dtype_name}_{tile}",
        if backward { "bwd" } else { "fwd" }
    );
    let config = LaunchConfig {
        grid_dim: (grid_x, grid_y, 1),
        block_dim: (128, 1, 1),
        shared_mem_bytes: 0,
    };
    let function = device.get_or_load_custom_func(&name, MODULE, PTX)?;
    let mut builder = function.builder();
    builder.arg(&act_address);
    weight.push(&mut builder);
    builder.arg(&log2_block);
    builder.arg(&rows32);
    builder.arg(&out32);
    builder.arg(&in32);
    builder.arg(&out);
    // SAFETY: the arguments match `nf4_gemm_*` in kernels/nf4.cu: a live contiguous activation
    // of `rows × reduction` elements, the weight state QuantizedWeight::new checked, and an
    // output of `rows × columns` elements; the grid covers every output tile.
    unsafe { builder.launch(config) }.w()?;
    Ok(storage)
}
