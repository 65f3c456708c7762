//! [`QuantizedWeight`] (a 4-bit linear weight resident on a device) and [`quantized_linear`], the
//! frozen linear map over it.
//!
//! Owns the custom op `y = x·dequant(W)ᵀ` and the choice of how it multiplies ([`QuantGemm`]).
//! Two paths: *dequantize + GEMM* dequantizes `W` into a scratch tensor of `x`'s dtype (CPU: the
//! bit-exact reference of [`super::blockwise`]; CUDA: `kernels/nf4.cu`) and runs the backend's
//! GEMM (cuBLAS on CUDA), then drops the scratch; *fused* (CUDA, bf16 / f16) dequantizes tiles of
//! `W` into shared memory inside one tensor-core GEMM kernel (`kernels/nf4.cu`, `nf4_gemm_*`). The
//! backward returns `dx = dy·dequant(W)` by the same choice (rebuilding the weight, never keeping
//! it) and nothing for `W` (a frozen base: no weight gradient). Both paths multiply the same
//! 16-bit weights (`level · absmax` rounded once to the dtype); only the summation order differs.
//! Must not: produce a gradient for the weight or the bias, or keep a dequantized copy.

use std::sync::{Arc, OnceLock};

use candle_core::backend::BackendStorage;
use candle_core::{
    bail, CpuStorage, CudaStorage, CustomOp1, DType, Device, Layout, MetalStorage, Result, Shape,
    Storage, Tensor,
};

use super::double_quant;
use super::nf4::QuantType;
use super::tensor::{Absmax, NestedAbsmax, QuantizedTensor};

/// The absmax of a [`QuantizedWeight`] on its device.
pub(super) enum DeviceAbsmax {
    /// `f32 [blocks]`.
    Plain(Tensor),
    /// `u8 [blocks]` codes, `f32 [blocks / 256]` scales, the `f32 [256]` code and the offset.
    Nested {
        quantized: Tensor,
        scale: Tensor,
        code: Tensor,
        block_size: usize,
        offset: f32,
    },
}

pub(super) struct Inner {
    /// The dtype the weight had before quantization (bitsandbytes' `quant_state.dtype`).
    pub(super) dtype: DType,
    pub(super) out_features: usize,
    pub(super) in_features: usize,
    pub(super) quant_type: QuantType,
    pub(super) block_size: usize,
    /// `u8 [ceil(out · in / 2)]`.
    pub(super) packed: Tensor,
    /// `f32 [16]`: the levels of `quant_type`.
    pub(super) code: Tensor,
    pub(super) absmax: DeviceAbsmax,
}

/// A frozen 4-bit linear weight `[out, in]` on one device (cheap to clone: shared).
#[derive(Clone)]
pub struct QuantizedWeight {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for QuantizedWeight {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("QuantizedWeight")
            .field("out_features", &self.inner.out_features)
            .field("in_features", &self.inner.in_features)
            .field("quant_type", &self.inner.quant_type)
            .field("block_size", &self.inner.block_size)
            .field("device", self.inner.packed.device())
            .finish()
    }
}

impl QuantizedWeight {
    /// Upload a 2-D quantized tensor (`[out, in]`) to `device`.
    pub fn new(tensor: &QuantizedTensor, device: &Device) -> Result<Self> {
        tensor.check()?;
        let [out_features, in_features] = tensor.shape.as_slice() else {
            bail!(
                "a quantized linear weight must be 2-D ([out, in]), got shape {:?}",
                tensor.shape
            )
        };
        let packed = Tensor::from_slice(&tensor.packed, tensor.packed.len(), device)?;
        let code = Tensor::new(&tensor.quant_type.code(), device)?;
        let absmax = match &tensor.absmax {
            Absmax::Plain(values) => DeviceAbsmax::Plain(Tensor::new(values.as_slice(), device)?),
            Absmax::Nested(nested) => DeviceAbsmax::Nested {
                quantized: Tensor::new(nested.quantized.as_slice(), device)?,
                scale: Tensor::new(nested.scale.as_slice(), device)?,
                code: Tensor::new(nested.code.as_slice(), device)?,
                block_size: nested.block_size,
                offset: nested.offset,
            },
        };
        Ok(Self {
            inner: Arc::new(Inner {
                dtype: tensor.dtype,
                out_features: *out_features,
                in_features: *in_features,
                quant_type: tensor.quant_type,
                block_size: tensor.block_size,
                packed,
                code,
                absmax,
            }),
        })
    }

    /// The host copy (bitsandbytes' layout), e.g. to save it or compare it bit for bit.
    pub fn to_host(&self) -> Result<QuantizedTensor> {
        let inner = &self.inner;
        let absmax = match &inner.absmax {
            DeviceAbsmax::Plain(values) => Absmax::Plain(values.to_vec1::<f32>()?),
            DeviceAbsmax::Nested {
                quantized,
                scale,
                code,
                block_size,
                offset,
            } => Absmax::Nested(NestedAbsmax {
                quantized: quantized.to_vec1::<u8>()?,
                scale: scale.to_vec1::<f32>()?,
                code: code.to_vec1::<f32>()?,
                block_size: *block_size,
                offset: *offset,
            }),
        };
        Ok(QuantizedTensor {
            shape: vec![inner.out_features, inner.in_features],
            dtype: inner.dtype,
            quant_type: inner.quant_type,
            block_size: inner.block_size,
            packed: inner.packed.to_vec1::<u8>()?,
            absmax,
        })
    }

    /// The dtype the weight had before quantization.
    pub fn original_dtype(&self) -> DType {
        self.inner.dtype
    }

    pub fn out_features(&self) -> usize {
        self.inner.out_features
    }

    pub fn in_features(&self) -> usize {
        self.inner.in_features
    }

    pub fn quant_type(&self) -> QuantType {
        self.inner.quant_type
    }

    pub fn block_size(&self) -> usize {
        self.inner.block_size
    }

    /// Whether the absmax values are double-quantized (8-bit, bitsandbytes' `compress_statistics`).
    pub fn double_quant(&self) -> bool {
        matches!(self.inner.absmax, DeviceAbsmax::Nested { .. })
    }

    pub fn device(&self) -> &Device {
        self.inner.packed.device()
    }

    /// Why the fused dequantize + GEMM kernel cannot multiply a `rows`-row activation of `dtype`
    /// by this weight (forward or input gradient), or `None` when it can: it needs a CUDA build
    /// and device, bf16 or f16, `in_features` a multiple of 64, a power-of-two block size of at
    /// least 16, a non-empty product, and dimensions that fit its launch grid.
    pub fn fused_unsupported(&self, dtype: DType, rows: usize) -> Option<String> {
        let inner = &self.inner;
        if !cfg!(feature = "cuda") {
            return Some("peftpipe was built without the `cuda` feature".into());
        }
        if !self.device().is_cuda() {
            return Some(format!(
                "the weight is on {:?}; the fused kernel is CUDA-only",
                self.device()
            ));
        }
        if !matches!(dtype, DType::BF16 | DType::F16) {
            return Some(format!(
                "{dtype:?} activations (the fused kernel takes bf16 or f16)"
            ));
        }
        if inner.in_features % 64 != 0 {
            return Some(format!(
                "in_features {} is not a multiple of 64",
                inner.in_features
            ));
        }
        if !inner.block_size.is_power_of_two() || inner.block_size < 16 {
            return Some(format!(
                "block size {} (the fused kernel needs a power of two of at least 16)",
                inner.block_size
            ));
        }
        if rows == 0 || inner.out_features == 0 {
            return Some("an empty product".into());
        }
        let limit = i32::MAX as usize;
        if rows > 64 * 65_535 || inner.out_features > limit || inner.in_features > limit {
            return Some(format!(
                "{rows} × {} × {} exceeds the fused kernel's grid",
                inner.out_features, inner.in_features
            ));
        }
        None
    }

    /// Device bytes of the packed codes and absmax state.
    pub fn storage_bytes(&self) -> usize {
        let bytes = |t: &Tensor| t.elem_count() * t.dtype().size_in_bytes();
        let inner = &self.inner;
        bytes(&inner.packed)
            + bytes(&inner.code)
            + match &inner.absmax {
                DeviceAbsmax::Plain(values) => bytes(values),
                DeviceAbsmax::Nested {
                    quantized,
                    scale,
                    code,
                    ..
                } => bytes(quantized) + bytes(scale) + bytes(code),
            }
    }

    /// The dense weight `[out, in]` in `dtype` (bf16, f16 or f32), on the weight's device:
    /// `level · absmax` in `f32`, rounded once to `dtype` (to nearest-even).
    pub fn dequantize(&self, dtype: DType) -> Result<Tensor> {
        if !matches!(dtype, DType::F32 | DType::BF16 | DType::F16) {
            bail!("dequantize: unsupported dtype {dtype:?} (bf16, f16 or f32)")
        }
        match self.device() {
            Device::Cpu => self.dequantize_cpu(dtype),
            #[cfg(feature = "cuda")]
            Device::Cuda(_) => super::cuda::dequantize(&self.inner, dtype),
            other => bail!("dequantize: no kernel for device {other:?}"),
        }
    }

    fn dequantize_cpu(&self, dtype: DType) -> Result<Tensor> {
        let inner = &self.inner;
        let absmax = match &inner.absmax {
            DeviceAbsmax::Plain(values) => values.to_vec1::<f32>()?,
            DeviceAbsmax::Nested {
                quantized,
                scale,
                code,
                block_size,
                offset,
            } => double_quant::dequantize_absmax(
                &quantized.to_vec1::<u8>()?,
                &scale.to_vec1::<f32>()?,
                &code.to_vec1::<f32>()?,
                *block_size,
                *offset,
            ),
        };
        let values = super::blockwise::dequantize_4bit(
            &inner.packed.to_vec1::<u8>()?,
            &absmax,
            &inner.quant_type.code(),
            inner.block_size,
            inner.out_features * inner.in_features,
        );
        Tensor::from_vec(
            values,
            (inner.out_features, inner.in_features),
            &Device::Cpu,
        )?
        .to_dtype(dtype)
    }
}

type MatmulPlan = ((usize, usize, usize, usize), Layout, Layout, Shape);

/// `y = x·wᵀ` for a contiguous `x [.., k]` and a contiguous `w [n, k]`: the (b, m, n, k) of the
/// GEMM, `x` seen as `[m, k]`, `wᵀ` as `[k, n]`, and the output shape `[.., n]`.
fn plan(x_layout: &Layout, w_layout: &Layout) -> Result<MatmulPlan> {
    let (n, k) = w_layout.shape().dims2()?;
    let dims = x_layout.dims();
    if dims.last() != Some(&k) {
        bail!(
            "quantized_linear: input {:?} does not match weight {:?} ([out, in])",
            x_layout.shape(),
            w_layout.shape()
        )
    }
    if !x_layout.is_contiguous() {
        bail!("quantized_linear: the input must be contiguous")
    }
    let m = x_layout.shape().elem_count() / k.max(1);
    let x2 = Layout::new((m, k).into(), vec![k, 1], x_layout.start_offset());
    let mut out: Vec<usize> = dims[..dims.len() - 1].to_vec();
    out.push(n);
    Ok((
        (1, m, n, k),
        x2,
        w_layout.transpose(0, 1)?,
        Shape::from(out),
    ))
}

/// How [`quantized_linear_with`] multiplies `x` by the 4-bit weight (and `dy` by it, backward).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum QuantGemm {
    /// `PEFTPIPE_QGEMM` when set (`fused` or `dequant`; `auto` or unset: the rule), else the
    /// per-shape rule: the fused kernel for at most [`FUSED_MAX_ROWS`] rows (generation and
    /// inference, where dequantizing the whole weight for a few rows costs the most), and
    /// dequantize-then-cuBLAS above. Either way dequantize-then-GEMM wherever the fused kernel
    /// cannot run ([`QuantizedWeight::fused_unsupported`]), e.g. on the CPU or for `f32`.
    #[default]
    Auto,
    /// The fused kernel, or an error saying why it cannot run.
    Fused,
    /// Dequantize into a scratch weight, then the backend's GEMM.
    Dequantize,
}

/// Rows (the product of the input's leading dimensions) up to which [`QuantGemm::Auto`] picks
/// the fused kernel. Chosen without measurements (small products are where a transient dense
/// weight wastes the most); `PEFTPIPE_QGEMM` overrides it for measuring both paths.
pub const FUSED_MAX_ROWS: usize = 64;

impl QuantGemm {
    /// The `PEFTPIPE_QGEMM` override (read once per process): `Some(Fused)`, `Some(Dequantize)`,
    /// or `None` for the per-shape rule; any other value is an error naming the variable.
    fn from_env() -> Result<Option<QuantGemm>> {
        static CHOICE: OnceLock<std::result::Result<Option<QuantGemm>, String>> = OnceLock::new();
        let choice = CHOICE.get_or_init(|| match std::env::var("PEFTPIPE_QGEMM") {
            Err(std::env::VarError::NotPresent) => Ok(None),
            Ok(value) => match value.trim() {
                "" | "auto" => Ok(None),
                "fused" => Ok(Some(QuantGemm::Fused)),
                "dequant" => Ok(Some(QuantGemm::Dequantize)),
                other => Err(format!(
                    "PEFTPIPE_QGEMM={other:?}: expected `fused`, `dequant` or `auto`"
                )),
            },
            Err(error) => Err(format!("PEFTPIPE_QGEMM: {error}")),
        });
        match choice {
            Ok(choice) => Ok(*choice),
            Err(message) => bail!("{message}"),
        }
    }
}

/// `x [.., k]` seen as `[rows, k]`: checks the last dimension and contiguity, returns `rows`.
fn rows_of(x_layout: &Layout, k: usize) -> Result<usize> {
    if x_layout.dims().last() != Some(&k) {
        bail!(
            "quantized_linear: input {:?} does not match the weight's {k} input features",
            x_layout.shape()
        )
    }
    if !x_layout.is_contiguous() {
        bail!("quantized_linear: the input must be contiguous")
    }
    Ok(x_layout.shape().elem_count() / k.max(1))
}

struct QuantizedMatmul {
    weight: QuantizedWeight,
    gemm: QuantGemm,
}

impl QuantizedMatmul {
    /// Whether this product (`rows` rows of `dtype`) runs on the fused kernel.
    fn fused(&self, dtype: DType, rows: usize) -> Result<bool> {
        match self.gemm {
            QuantGemm::Dequantize => Ok(false),
            QuantGemm::Fused => match self.weight.fused_unsupported(dtype, rows) {
                Some(reason) => bail!("quantized_linear: the fused kernel cannot run: {reason}"),
                None => Ok(true),
            },
            QuantGemm::Auto => {
                let wanted = match QuantGemm::from_env()? {
                    Some(choice) => choice == QuantGemm::Fused,
                    None => rows <= FUSED_MAX_ROWS,
                };
                Ok(wanted && self.weight.fused_unsupported(dtype, rows).is_none())
            }
        }
    }

    /// `dx = dy·dequant(W)` on the fused kernel (only reached when [`Self::fused`] said yes).
    #[cfg(feature = "cuda")]
    fn fused_input_gradient(&self, x: &Tensor, dy: &Tensor, rows: usize) -> Result<Tensor> {
        let dy = dy.contiguous()?;
        let dx = {
            let (storage, layout) = dy.storage_and_layout();
            let Storage::Cuda(dy) = &*storage else {
                bail!("quantized_linear: the gradient is not on the GPU like the weight")
            };
            super::cuda::fused_matmul(&self.weight.inner, dy, layout, rows, true)?
        };
        Ok(Tensor::from_storage(
            Storage::Cuda(dx),
            x.shape().clone(),
            candle_core::op::BackpropOp::none(),
            false,
        ))
    }

    #[cfg(not(feature = "cuda"))]
    fn fused_input_gradient(&self, _: &Tensor, _: &Tensor, _: usize) -> Result<Tensor> {
        bail!("quantized_linear: the fused kernel needs the `cuda` feature")
    }
}

impl CustomOp1 for QuantizedMatmul {
    fn name(&self) -> &'static str {
        "quantized-linear"
    }

    fn cpu_fwd(&self, x: &CpuStorage, x_layout: &Layout) -> Result<(CpuStorage, Shape)> {
        // Only to report an explicit `Fused` request, which cannot run on the CPU.
        self.fused(x.dtype(), rows_of(x_layout, self.weight.in_features())?)?;
        let w = self.weight.dequantize(x.dtype())?;
        let (storage, w_layout) = w.storage_and_layout();
        let Storage::Cpu(w) = &*storage else {
            bail!("quantized_linear: the weight is not on the CPU like the input")
        };
        let (bmnk, x2, wt, shape) = plan(x_layout, w_layout)?;
        Ok((x.matmul(w, bmnk, &x2, &wt)?, shape))
    }

    fn cuda_fwd(&self, x: &CudaStorage, x_layout: &Layout) -> Result<(CudaStorage, Shape)> {
        #[cfg(feature = "cuda")]
        {
            let rows = rows_of(x_layout, self.weight.in_features())?;
            if self.fused(x.dtype(), rows)? {
                let y = super::cuda::fused_matmul(&self.weight.inner, x, x_layout, rows, false)?;
                let mut shape = x_layout.dims().to_vec();
                if let Some(last) = shape.last_mut() {
                    *last = self.weight.out_features();
                }
                return Ok((y, Shape::from(shape)));
            }
        }
        let w = self.weight.dequantize(x.dtype())?;
        let (storage, w_layout) = w.storage_and_layout();
        let Storage::Cuda(w) = &*storage else {
            bail!("quantized_linear: the weight is not on the GPU like the input")
        };
        let (bmnk, x2, wt, shape) = plan(x_layout, w_layout)?;
        Ok((x.matmul(w, bmnk, &x2, &wt)?, shape))
    }

    fn metal_fwd(&self, _: &MetalStorage, _: &Layout) -> Result<(MetalStorage, Shape)> {
        bail!("quantized_linear: no Metal kernel")
    }

    /// `dx = dy·dequant(W)`; the weight is rebuilt here, not kept from the forward.
    fn bwd(&self, x: &Tensor, _y: &Tensor, dy: &Tensor) -> Result<Option<Tensor>> {
        let rows = dy.elem_count() / self.weight.out_features().max(1);
        if self.fused(dy.dtype(), rows)? {
            return self.fused_input_gradient(x, dy, rows).map(Some);
        }
        let w = self.weight.dequantize(dy.dtype())?;
        let dx = dy
            .reshape(((), self.weight.out_features()))?
            .matmul(&w)?
            .reshape(x.shape())?;
        Ok(Some(dx))
    }
}

/// Whether [`quantized_linear_accumulate`] runs for `rows` rows of `dtype`: a CUDA weight whose
/// product takes the dequantize + cuBLAS path (the fused kernel writes an output of its own).
pub fn accumulates_into(weight: &QuantizedWeight, rows: usize, dtype: DType) -> bool {
    let op = QuantizedMatmul {
        weight: weight.clone(),
        gemm: QuantGemm::Auto,
    };
    weight.device().is_cuda() && matches!(op.fused(dtype, rows), Ok(false))
}

/// `c += x·dequant(W)ᵀ` in place for `x [rows, in]` and `c [rows, out]`, or with
/// `input_gradient` `c += x·dequant(W)` for `x = dy [rows, out]` and `c [rows, in]`: the weight
/// dequantized to `x`'s dtype and the product added by cuBLAS (`β = 1`). `c` must be contiguous
/// and read by nothing else. Only where [`accumulates_into`] said yes.
pub fn quantized_linear_accumulate(
    x: &Tensor,
    weight: &QuantizedWeight,
    c: &Tensor,
    input_gradient: bool,
) -> Result<()> {
    #[cfg(feature = "cuda")]
    {
        let w = weight.dequantize(x.dtype())?;
        crate::ops::cuda::gemm_accumulate(c, x, &w, !input_gradient, 1.0)
    }
    #[cfg(not(feature = "cuda"))]
    {
        let _ = (x, weight, c, input_gradient);
        bail!("quantized_linear_accumulate: CUDA only")
    }
}

/// `y = x·dequant(W)ᵀ (+ b)` for `x [.., in]` (bf16, f16 or f32; the weight is dequantized to
/// `x`'s dtype) and a frozen bias `[out]`; the gradient reaches `x` only. The GEMM path is
/// [`QuantGemm::Auto`].
pub fn quantized_linear(
    x: &Tensor,
    weight: &QuantizedWeight,
    bias: Option<&Tensor>,
) -> Result<Tensor> {
    quantized_linear_with(x, weight, bias, QuantGemm::Auto)
}

/// [`quantized_linear`] on the GEMM path `gemm` (forward and input gradient alike).
pub fn quantized_linear_with(
    x: &Tensor,
    weight: &QuantizedWeight,
    bias: Option<&Tensor>,
    gemm: QuantGemm,
) -> Result<Tensor> {
    if !x.device().same_device(weight.device()) {
        bail!(
            "quantized_linear: input on {:?}, weight on {:?}",
            x.device(),
            weight.device()
        )
    }
    let x = x.contiguous()?;
    let op = QuantizedMatmul {
        weight: weight.clone(),
        gemm,
    };
    // An untracked input builds no graph node.
    let y = if x.track_op() {
        x.apply_op1(op)?
    } else {
        x.apply_op1_no_bwd(&op)?
    };
    match bias {
        Some(bias) => crate::ops::add_constant(&y, bias),
        None => Ok(y),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::quant::QuantConfig;
    use candle_core::Var;

    fn weight(
        out: usize,
        inp: usize,
        double_quant: bool,
    ) -> Result<(QuantizedTensor, QuantizedWeight)> {
        let w = Tensor::randn(0f32, 0.05, (out, inp), &Device::Cpu)?;
        let config = QuantConfig {
            double_quant,
            ..QuantConfig::default()
        };
        let q = QuantizedTensor::from_tensor(&w, &config)?;
        let device_weight = QuantizedWeight::new(&q, &Device::Cpu)?;
        Ok((q, device_weight))
    }

    #[test]
    fn forward_is_the_dense_matmul_over_the_dequantized_weight() -> Result<()> {
        for double_quant in [false, true] {
            let (q, w) = weight(24, 128, double_quant)?;
            let dense = q.dequantize(DType::F32, &Device::Cpu)?;
            assert_eq!(
                w.dequantize(DType::F32)?.flatten_all()?.to_vec1::<f32>()?,
                dense.flatten_all()?.to_vec1::<f32>()?
            );
            let x = Tensor::randn(0f32, 1.0, (2, 3, 128), &Device::Cpu)?;
            let bias = Tensor::randn(0f32, 1.0, 24, &Device::Cpu)?;
            let y = quantized_linear(&x, &w, Some(&bias))?;
            let reference = x.broadcast_matmul(&dense.t()?)?.broadcast_add(&bias)?;
            let difference = (&y - &reference)?.abs()?.max_all()?.to_scalar::<f32>()?;
            assert!(difference < 1e-5, "max |Δ| = {difference}");
        }
        Ok(())
    }

    #[test]
    fn backward_reaches_the_input_only_and_equals_dy_times_w() -> Result<()> {
        let (q, w) = weight(16, 64, true)?;
        let dense = q.dequantize(DType::F32, &Device::Cpu)?;
        let x = Var::randn(0f32, 1.0, (5, 64), &Device::Cpu)?;
        let bias = Var::randn(0f32, 1.0, 16, &Device::Cpu)?;
        let y = quantized_linear(x.as_tensor(), &w, Some(bias.as_tensor()))?;
        let grads = y.sqr()?.sum_all()?.backward()?;
        assert!(
            grads.get(bias.as_tensor()).is_none(),
            "the frozen bias got a gradient"
        );
        let dx = grads.get(x.as_tensor()).expect("the input has a gradient");
        let expected = (y.detach() * 2.0)?.matmul(&dense)?;
        let difference = (dx - &expected)?.abs()?.max_all()?.to_scalar::<f32>()?;
        assert!(difference < 1e-4, "max |Δ| = {difference}");
        Ok(())
    }

    #[test]
    fn untracked_input_builds_no_graph() -> Result<()> {
        let (_, w) = weight(8, 64, false)?;
        let x = Tensor::randn(0f32, 1.0, (2, 64), &Device::Cpu)?;
        assert!(!quantized_linear(&x, &w, None)?.track_op());
        Ok(())
    }

    #[test]
    fn bf16_forward_dequantizes_to_bf16() -> Result<()> {
        let (q, w) = weight(8, 64, true)?;
        let x = Tensor::randn(0f32, 1.0, (4, 64), &Device::Cpu)?.to_dtype(DType::BF16)?;
        let y = quantized_linear(&x, &w, None)?;
        assert_eq!(y.dtype(), DType::BF16);
        let dense = q.dequantize(DType::BF16, &Device::Cpu)?;
        let reference = x.matmul(&dense.t()?)?;
        let difference = (y.to_dtype(DType::F32)? - reference.to_dtype(DType::F32)?)?
            .abs()?
            .max_all()?
            .to_scalar::<f32>()?;
        assert!(difference < 0.05, "max |Δ| = {difference}");
        Ok(())
    }

    #[test]
    fn the_fused_kernel_is_refused_on_the_cpu_and_auto_falls_back() -> Result<()> {
        let (q, w) = weight(16, 64, true)?;
        let reason = w
            .fused_unsupported(DType::BF16, 4)
            .expect("no fused kernel on the CPU");
        assert!(
            reason.contains("cuda") || reason.contains("CUDA"),
            "{reason}"
        );
        let x = Tensor::randn(0f32, 1.0, (4, 64), &Device::Cpu)?.to_dtype(DType::BF16)?;
        let error = quantized_linear_with(&x, &w, None, QuantGemm::Fused)
            .expect_err("an explicit fused request on the CPU is an error");
        assert!(
            error.to_string().contains("fused kernel cannot run"),
            "{error}"
        );
        let dense = q.dequantize(DType::BF16, &Device::Cpu)?;
        for gemm in [QuantGemm::Auto, QuantGemm::Dequantize] {
            let y = quantized_linear_with(&x, &w, None, gemm)?;
            let reference = x.matmul(&dense.t()?)?;
            let difference = (y.to_dtype(DType::F32)? - reference.to_dtype(DType::F32)?)?
                .abs()?
                .max_all()?
                .to_scalar::<f32>()?;
            assert!(difference < 0.05, "{gemm:?}: max |Δ| = {difference}");
        }
        Ok(())
    }
}
