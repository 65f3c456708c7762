//! Flash-attention-style attention: `softmax(q·kᵀ·scale)·v` over the keys each query may see,
//! without ever materialising a score matrix on CUDA.
//!
//! Owns [`flash_attention`], a differentiable op over `(q, k, v)` (candle `CustomOp3`): its
//! forward keeps only the output and the log-sum-exp of every row (f32 on CUDA, f64 on the CPU),
//! its backward recomputes the probabilities from them (FA2: `δ = rowsum(dO∘O)`,
//! `dS = P∘(dP − δ)`) and returns all three gradients, `dk`/`dv` summed over the query heads that
//! share a key/value head. On CUDA it runs
//! `kernels/flash_attn.cu` (bf16/f16/f32, head_dim 64 and 128; bf16/f16 on tensor cores by the
//! FlashAttention-2-style `flash_mma_*` kernels, or the older `nvcuda::wmma` ones `flash_tc_*` with
//! `PEFTPIPE_FLASH=wmma`, see [`TensorCoreKernels`]); on the CPU it runs plain f64 loops
//! of the same algorithm (the reference the tests hold both the kernels and the explicit
//! composition against). Also owns [`CausalMask`] (what a model call attends over, as validity +
//! offset and, built on demand, as the additive mask) and the dispatchers the models call,
//! [`causal_attention`] and [`full_attention`]: the kernels where they apply
//! ([`kernel_applies`], switched off by `PEFTPIPE_UNFUSED=flash_attention`), otherwise the explicit
//! composition of `ops::attention` (always on the CPU, which stays the tested reference).
//!
//! Semantics: key `j` is visible to query `i` iff `key_valid[b][j]` and, when causal,
//! `j <= offset + i`. A row with no visible key gives output 0 and no gradient (the explicit
//! composition's finite mask gives such a row, a padding query, a uniform average instead; the two
//! agree on every other row). Must not: know about models, or give the validity a gradient.

use std::sync::OnceLock;

#[cfg(feature = "cuda")]
use candle_core::{
    backend::BackendStorage, CpuStorage, CudaStorage, CustomOp3, Layout, Shape, Storage,
};
use candle_core::{bail, DType, Device, Result, Tensor};

use super::attach::with_backward3;
use super::attention::{attention, causal_mask};

/// Head dimensions the CUDA kernels take (others use the explicit composition).
pub const HEAD_DIMS: [usize; 2] = [64, 128];

/// Whether the flash kernels read `x`, a logical `[B, heads, T, D]` tensor, where it lies when it
/// is stored as `[B, T, heads, D]` (a projection's `[B, T, heads·D]` output seen through
/// `reshape` + `transpose(1, 2)`, no copy made): CUDA, bf16/f16, the FlashAttention-2-style or
/// Hopper kernels (the default; not with `PEFTPIPE_FLASH=wmma`), and not switched off by
/// `PEFTPIPE_UNFUSED=strided_heads`. Models use it to decide whether to hand their heads over as
/// such views (`ops::rope_heads`) or as contiguous copies (everywhere else, the CPU included).
pub fn reads_strided_heads(x: &Tensor) -> bool {
    #[cfg(feature = "cuda")]
    {
        x.device().is_cuda()
            && matches!(x.dtype(), DType::BF16 | DType::F16)
            && super::cuda::enabled("strided_heads")
            && super::cuda::enabled("flash_attention")
            && super::cuda::enabled("flash_tensor_cores")
            && TensorCoreKernels::from_env().is_ok_and(TensorCoreKernels::read_strided_heads)
    }
    #[cfg(not(feature = "cuda"))]
    {
        let _ = x;
        false
    }
}

/// `x [B, T, heads·head_dim]` (a value projection's output) as heads `[B, heads, T, head_dim]`:
/// a view of `x` (stored `[B, T, heads, head_dim]`, no copy) where the flash kernels read heads
/// where they lie ([`reads_strided_heads`]), else a contiguous copy.
pub fn attention_heads(x: &Tensor, heads: usize, head_dim: usize) -> Result<Tensor> {
    let (batch, length, _) = x.dims3()?;
    let heads_view = x
        .reshape((batch, length, heads, head_dim))?
        .transpose(1, 2)?;
    if reads_strided_heads(x) {
        Ok(heads_view)
    } else {
        heads_view.contiguous()
    }
}

/// Whether `x` (logical `[B, H, T, D]`) is stored as `[B, T, H, D]`: the strides of
/// `reshape((B, T, H, D))?.transpose(1, 2)` of a contiguous tensor, starting 16-byte aligned.
fn stored_bthd(x: &Tensor) -> bool {
    let Ok((batch, heads, length, dim)) = x.dims4() else {
        return false;
    };
    let layout = x.layout();
    let stride = layout.stride();
    let aligned = (layout.start_offset() * x.dtype().size_in_bytes()) % 16 == 0;
    aligned
        && stride[3] == 1
        && stride[1] == dim
        && (length == 1 || stride[2] == heads * dim)
        && (batch == 1 || stride[0] == length * heads * dim)
}

/// `x` (logical `[B, H, T, D]`) stored as `[B, T, H, D]`: itself when it already is, else one copy.
#[cfg_attr(not(feature = "cuda"), allow(dead_code))]
fn to_bthd(x: &Tensor) -> Result<Tensor> {
    if stored_bthd(x) {
        return Ok(x.clone());
    }
    x.transpose(1, 2)?.contiguous()?.transpose(1, 2)
}

/// Which kernels run bf16/f16 flash attention on tensor cores (CUDA only; the CPU runs the
/// reference loops either way).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum TensorCoreKernels {
    /// The fastest that applies, the default: on a GPU of compute capability 9.0 (Hopper), bf16
    /// with head_dim 128 runs the `wgmma` kernels (`kernels/flash_wgmma.cu`: a warp-specialised
    /// TMA forward, whose output differs from [`Self::Mma`]'s in the order of its sums, and dK/dV
    /// and dQ kernels that, given the same forward output, give [`Self::Mma`]'s gradients bit for
    /// bit); everything else runs [`Self::Mma`].
    #[default]
    Auto,
    /// FlashAttention-2 style (`flash_mma_*`) everywhere: `mma.sync` on register fragments,
    /// `ldmatrix`, `cp.async` tiles. `PEFTPIPE_FLASH=mma`.
    Mma,
    /// The first tensor-core kernels (`flash_tc_*`, `nvcuda::wmma` with shared-memory round trips),
    /// kept for comparison: `PEFTPIPE_FLASH=wmma`.
    Wmma,
}

impl TensorCoreKernels {
    /// From `PEFTPIPE_FLASH`: unset, empty or `auto` → [`Self::Auto`], `mma` → [`Self::Mma`],
    /// `wmma` → [`Self::Wmma`]; anything else is an error naming the variable.
    pub fn from_env() -> Result<Self> {
        match std::env::var("PEFTPIPE_FLASH") {
            Err(std::env::VarError::NotPresent) => Ok(Self::Auto),
            Ok(value) => match value.trim() {
                "" | "auto" => Ok(Self::Auto),
                "mma" => Ok(Self::Mma),
                "wmma" => Ok(Self::Wmma),
                other => bail!(
                    "PEFTPIPE_FLASH={other:?}: expected `auto` (the default), `mma` or `wmma`"
                ),
            },
            Err(error) => bail!("PEFTPIPE_FLASH: {error}"),
        }
    }

    /// Whether these kernels read heads stored `[B, T, H, D]` where they lie (all but the wmma
    /// ones).
    fn read_strided_heads(self) -> bool {
        self != Self::Wmma
    }
}

/// Whether `device` runs the Hopper (`wgmma`) flash kernels for bf16 heads of `head_dim` under
/// [`TensorCoreKernels::Auto`]: a CUDA device of compute capability 9.0 with head_dim 128, in a
/// build whose CUDA_COMPUTE_CAP was 90 (build.rs compiles the module for `compute_90a` only then).
pub fn hopper_kernels_apply(device: &Device, head_dim: usize) -> bool {
    #[cfg(feature = "cuda")]
    {
        match device {
            Device::Cuda(cuda) => gpu::hopper(cuda) && head_dim == 128,
            _ => false,
        }
    }
    #[cfg(not(feature = "cuda"))]
    {
        let _ = (device, head_dim);
        false
    }
}

/// Which keys each query sees.
#[derive(Clone, Debug, Default)]
pub struct Visibility {
    /// `j <= offset + i` (the queries are the last keys after `offset` earlier ones).
    pub causal: bool,
    pub offset: usize,
    /// `[B, S]`, nonzero = a real key; `None`: every key is real.
    pub key_valid: Option<Tensor>,
}

impl Visibility {
    /// Every key visible to every query (LLaMA-Adapter's prompt branch).
    pub fn all() -> Self {
        Self::default()
    }

    /// Causal over queries that are the keys `offset..offset + T`, keys `key_valid` (`[B, S]`).
    pub fn causal(offset: usize, key_valid: Option<Tensor>) -> Self {
        Self {
            causal: true,
            offset,
            key_valid,
        }
    }
}

/// What one model call attends over: per-key validity rows and the first query's key index, with
/// the two tensors the attention paths take built on first use (validity `[B, S]` u8 for the
/// kernels, the additive `[B, 1, T, S]` f32 mask of [`causal_mask`] for the explicit composition).
#[derive(Debug)]
pub struct CausalMask {
    key_valid: Vec<Vec<bool>>,
    first_query: usize,
    num_queries: usize,
    device: Device,
    additive: OnceLock<Tensor>,
    valid: OnceLock<Option<Tensor>>,
}

impl CausalMask {
    /// Key `j` visible to query `i` iff `key_valid[b][j]` and `j <= first_query + i`.
    pub fn new(
        key_valid: Vec<Vec<bool>>,
        first_query: usize,
        num_queries: usize,
        device: &Device,
    ) -> Result<Self> {
        let keys = key_valid.first().map_or(0, Vec::len);
        if key_valid.iter().any(|row| row.len() != keys) {
            bail!("causal mask: key rows have different lengths")
        }
        if first_query + num_queries > keys {
            bail!("causal mask: {num_queries} queries from key {first_query} exceed {keys} keys")
        }
        Ok(Self {
            key_valid,
            first_query,
            num_queries,
            device: device.clone(),
            additive: OnceLock::new(),
            valid: OnceLock::new(),
        })
    }

    /// Index of the first query among the keys.
    pub fn first_query(&self) -> usize {
        self.first_query
    }

    /// The additive mask `[B, 1, T, S]` (f32, 0 or [`super::MASK_VALUE`]).
    pub fn additive(&self) -> Result<Tensor> {
        if let Some(mask) = self.additive.get() {
            return Ok(mask.clone());
        }
        let mask = causal_mask(
            &self.key_valid,
            self.first_query,
            self.num_queries,
            &self.device,
        )?;
        Ok(self.additive.get_or_init(|| mask).clone())
    }

    /// Validity `[B, S]` (u8, 1 = real key); `None` when every key is real.
    pub fn key_valid(&self) -> Result<Option<Tensor>> {
        if let Some(valid) = self.valid.get() {
            return Ok(valid.clone());
        }
        let valid = if self.key_valid.iter().flatten().all(|&v| v) {
            None
        } else {
            let batch = self.key_valid.len();
            let keys = self.key_valid.first().map_or(0, Vec::len);
            let flat: Vec<u8> = self
                .key_valid
                .iter()
                .flatten()
                .map(|&v| u8::from(v))
                .collect();
            Some(Tensor::from_vec(flat, (batch, keys), &self.device)?)
        };
        Ok(self.valid.get_or_init(|| valid).clone())
    }

    /// The visibility the kernels take.
    pub fn visibility(&self) -> Result<Visibility> {
        Ok(Visibility::causal(self.first_query, self.key_valid()?))
    }
}

/// Whether [`causal_attention`] / [`full_attention`] run the CUDA kernels for `q` (on CUDA, bf16,
/// f16 or f32, head_dim in [`HEAD_DIMS`], at most 65535 batch × heads (the grid's second
/// dimension), and `flash_attention` not listed in `PEFTPIPE_UNFUSED`, nor `PEFTPIPE_FUSED=0`).
/// bf16/f16 run on tensor cores unless `PEFTPIPE_UNFUSED` also lists `flash_tensor_cores` (which
/// kernels: [`TensorCoreKernels`]).
pub fn kernel_applies(q: &Tensor) -> bool {
    #[cfg(feature = "cuda")]
    {
        q.device().is_cuda()
            && matches!(q.dtype(), DType::BF16 | DType::F16 | DType::F32)
            && q.rank() == 4
            && HEAD_DIMS.contains(&q.dims()[3])
            && q.dims()[0] * q.dims()[1] <= 65_535
            && super::cuda::enabled("flash_attention")
    }
    #[cfg(not(feature = "cuda"))]
    {
        let _ = q;
        false
    }
}

/// `attention(q, k, v, Some(mask.additive()), scale)` (`q [B, H, T, D]`, `k`, `v`
/// `[B, KVH, S, D]`): the flash kernels where [`kernel_applies`], else that explicit composition.
pub fn causal_attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    mask: &CausalMask,
    scale: f64,
) -> Result<Tensor> {
    if kernel_applies(q) {
        return flash_attention(q, k, v, &mask.visibility()?, scale);
    }
    attention(q, k, v, Some(&mask.additive()?), scale)
}

/// `attention(q, k, v, None, scale)`: every key visible to every query.
pub fn full_attention(q: &Tensor, k: &Tensor, v: &Tensor, scale: f64) -> Result<Tensor> {
    if kernel_applies(q) {
        return flash_attention(q, k, v, &Visibility::all(), scale);
    }
    attention(q, k, v, None, scale)
}

#[derive(Clone, Copy, Debug)]
struct Dims {
    batch: usize,
    heads: usize,
    kv_heads: usize,
    queries: usize,
    keys: usize,
    head_dim: usize,
}

impl Dims {
    fn group(&self) -> usize {
        self.heads / self.kv_heads
    }
}

fn check(q: &Tensor, k: &Tensor, v: &Tensor, visibility: &Visibility) -> Result<Dims> {
    let (batch, heads, queries, head_dim) = q.dims4()?;
    let (k_batch, kv_heads, keys, k_dim) = k.dims4()?;
    if k.dims() != v.dims() || k_batch != batch || k_dim != head_dim {
        bail!(
            "flash attention: q {:?}, k {:?}, v {:?} are inconsistent",
            q.shape(),
            k.shape(),
            v.shape()
        )
    }
    if q.dtype() != k.dtype() || q.dtype() != v.dtype() {
        bail!("flash attention: q, k and v must have one dtype")
    }
    if kv_heads == 0 || heads % kv_heads != 0 {
        bail!(
            "flash attention: {heads} query heads are not a multiple of {kv_heads} key/value heads"
        )
    }
    if visibility.causal && visibility.offset + queries > keys {
        bail!(
            "flash attention: {queries} causal queries from key {} exceed {keys} keys",
            visibility.offset
        )
    }
    if let Some(valid) = &visibility.key_valid {
        if valid.dims() != [batch, keys] {
            bail!(
                "flash attention: key validity {:?} is not [{batch}, {keys}]",
                valid.shape()
            )
        }
    }
    Ok(Dims {
        batch,
        heads,
        kv_heads,
        queries,
        keys,
        head_dim,
    })
}

/// The flash op itself (no dispatch): `q [B, H, T, D]`, `k`, `v` `[B, KVH, S, D]` → `[B, H, T, D]`,
/// differentiable in all three. CUDA: the kernels (bf16/f16/f32, head_dim 64/128, errors
/// otherwise; the tensor-core family from `PEFTPIPE_FLASH`, see [`TensorCoreKernels::from_env`]);
/// CPU: the f64 reference loops.
pub fn flash_attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    visibility: &Visibility,
    scale: f64,
) -> Result<Tensor> {
    let kernels = if q.device().is_cuda() {
        TensorCoreKernels::from_env()?
    } else {
        TensorCoreKernels::default()
    };
    flash_attention_with(q, k, v, visibility, scale, kernels)
}

/// [`flash_attention`] with the tensor-core kernel family given instead of read from
/// `PEFTPIPE_FLASH` (forward and backward both use it).
pub fn flash_attention_with(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    visibility: &Visibility,
    scale: f64,
    kernels: TensorCoreKernels,
) -> Result<Tensor> {
    let dims = check(q, k, v, visibility)?;
    let valid = match &visibility.key_valid {
        None => None,
        Some(valid) if valid.dtype() == DType::U8 => Some(valid.detach().contiguous()?),
        Some(valid) => Some(valid.detach().to_dtype(DType::F32)?.ne(0f32)?),
    };
    let valid = valid.map(|v| v.to_device(q.device())).transpose()?;
    // The FlashAttention-2-style and Hopper kernels read heads stored [B, T, H, D] where they lie;
    // the wmma ones (and the CPU) take contiguous copies.
    let strided = reads_strided_heads(q) && kernels.read_strided_heads();
    let q_bthd = strided && stored_bthd(q);
    let kv_bthd = strided && stored_bthd(k) && stored_bthd(v);
    let params = Params {
        dims,
        causal: visibility.causal,
        offset: visibility.offset,
        scale,
        valid,
        q_bthd,
        kv_bthd,
        #[cfg(feature = "cuda")]
        kernels,
    };
    #[cfg(not(feature = "cuda"))]
    let _ = kernels; // only CUDA has tensor-core kernels to choose from
    let keep = |x: &Tensor, bthd: bool| if bthd { Ok(x.clone()) } else { x.contiguous() };
    let (q, k, v) = (keep(q, q_bthd)?, keep(k, kv_bthd)?, keep(v, kv_bthd)?);
    let (output, lse) = forward(&q.detach(), &k.detach(), &v.detach(), &params)?;
    // The node shares the output's storage (`ops::attach`): no copy, and the output it keeps for
    // the backward is the one handed out.
    with_backward3(
        "flash-attention",
        [&q, &k, &v],
        output,
        move |[q, k, v], output, grad| {
            let grad = grad.detach().to_dtype(q.dtype())?;
            let (dq, dk, dv) = backward(
                &q.detach(),
                &k.detach(),
                &v.detach(),
                &output.detach(),
                &lse,
                &grad,
                &params,
            )?;
            // A constant input (a frozen query or keys) gets no gradient entry.
            let keep = |input: &Tensor, grad: Tensor| input.track_op().then_some(grad);
            Ok([keep(q, dq), keep(k, dk), keep(v, dv)])
        },
    )
}

#[derive(Clone, Debug)]
struct Params {
    dims: Dims,
    causal: bool,
    offset: usize,
    scale: f64,
    /// `[B, S]` u8 on the inputs' device.
    valid: Option<Tensor>,
    /// q (and so the output, dO and dq) is stored `[B, T, H, D]` rather than contiguous.
    #[cfg_attr(
        not(feature = "cuda"),
        expect(dead_code, reason = "only the CUDA kernels read strided heads")
    )]
    q_bthd: bool,
    /// k and v (and so dk and dv) are stored `[B, S, KVH, D]` rather than contiguous.
    #[cfg_attr(
        not(feature = "cuda"),
        expect(dead_code, reason = "only the CUDA kernels read strided heads")
    )]
    kv_bthd: bool,
    /// The bf16/f16 tensor-core kernels (read by the CUDA launches only).
    #[cfg(feature = "cuda")]
    kernels: TensorCoreKernels,
}

fn forward(q: &Tensor, k: &Tensor, v: &Tensor, params: &Params) -> Result<(Tensor, Tensor)> {
    match q.device() {
        Device::Cpu => reference::forward(q, k, v, params),
        #[cfg(feature = "cuda")]
        Device::Cuda(_) => gpu::forward(q, k, v, params),
        other => bail!("flash attention: no implementation on {other:?}"),
    }
}

fn backward(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    output: &Tensor,
    lse: &Tensor,
    grad: &Tensor,
    params: &Params,
) -> Result<(Tensor, Tensor, Tensor)> {
    match q.device() {
        Device::Cpu => reference::backward(q, k, v, output, lse, &grad.contiguous()?, params),
        #[cfg(feature = "cuda")]
        Device::Cuda(_) => gpu::backward(q, k, v, output, lse, grad, params),
        other => bail!("flash attention: no implementation on {other:?}"),
    }
}

/// The CPU implementation: the kernels' algorithm as plain f64 loops.
mod reference {
    use super::*;

    fn values(t: &Tensor) -> Result<Vec<f64>> {
        t.to_dtype(DType::F64)?.flatten_all()?.to_vec1::<f64>()
    }

    struct Inputs {
        q: Vec<f64>,
        k: Vec<f64>,
        v: Vec<f64>,
        valid: Option<Vec<u8>>,
    }

    impl Inputs {
        fn new(q: &Tensor, k: &Tensor, v: &Tensor, params: &Params) -> Result<Self> {
            let valid = params
                .valid
                .as_ref()
                .map(|t| t.flatten_all()?.to_vec1::<u8>())
                .transpose()?;
            Ok(Self {
                q: values(q)?,
                k: values(k)?,
                v: values(v)?,
                valid,
            })
        }

        fn visible(&self, params: &Params, b: usize, i: usize, j: usize) -> bool {
            let keys = params.dims.keys;
            self.valid.as_ref().is_none_or(|v| v[b * keys + j] != 0)
                && (!params.causal || j <= params.offset + i)
        }
    }

    /// Row offsets of query row `(b, h, i)` and of key row `(b, h / group, j)`.
    fn q_row(d: &Dims, b: usize, h: usize, i: usize) -> usize {
        ((b * d.heads + h) * d.queries + i) * d.head_dim
    }

    fn k_row(d: &Dims, b: usize, h: usize, j: usize) -> usize {
        ((b * d.kv_heads + h / d.group()) * d.keys + j) * d.head_dim
    }

    fn dot(a: &[f64], b: &[f64]) -> f64 {
        a.iter().zip(b).map(|(x, y)| x * y).sum()
    }

    /// Scores of row `(b, h, i)` (scaled; `None` where invisible).
    fn scores(x: &Inputs, p: &Params, b: usize, h: usize, i: usize) -> Vec<Option<f64>> {
        let d = &p.dims;
        let qi = q_row(d, b, h, i);
        let query = &x.q[qi..qi + d.head_dim];
        (0..d.keys)
            .map(|j| {
                x.visible(p, b, i, j).then(|| {
                    let kj = k_row(d, b, h, j);
                    dot(query, &x.k[kj..kj + d.head_dim]) * p.scale
                })
            })
            .collect()
    }

    pub(super) fn forward(
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        params: &Params,
    ) -> Result<(Tensor, Tensor)> {
        let x = Inputs::new(q, k, v, params)?;
        let d = params.dims;
        let mut output = vec![0f64; d.batch * d.heads * d.queries * d.head_dim];
        let mut lse = vec![f64::NEG_INFINITY; d.batch * d.heads * d.queries];
        for b in 0..d.batch {
            for h in 0..d.heads {
                for i in 0..d.queries {
                    let scores = scores(&x, params, b, h, i);
                    let max = scores
                        .iter()
                        .flatten()
                        .fold(f64::NEG_INFINITY, |m, &s| m.max(s));
                    if max == f64::NEG_INFINITY {
                        continue;
                    }
                    let sum: f64 = scores.iter().flatten().map(|s| (s - max).exp()).sum();
                    let qi = q_row(&d, b, h, i);
                    for (j, score) in scores.iter().enumerate() {
                        let Some(score) = score else { continue };
                        let weight = (score - max).exp() / sum;
                        let vj = k_row(&d, b, h, j);
                        for c in 0..d.head_dim {
                            output[qi + c] += weight * x.v[vj + c];
                        }
                    }
                    lse[(b * d.heads + h) * d.queries + i] = max + sum.ln();
                }
            }
        }
        let shape = (d.batch, d.heads, d.queries, d.head_dim);
        Ok((
            Tensor::from_vec(output, shape, &Device::Cpu)?.to_dtype(q.dtype())?,
            Tensor::from_vec(lse, (d.batch, d.heads, d.queries), &Device::Cpu)?,
        ))
    }

    pub(super) fn backward(
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        output: &Tensor,
        lse: &Tensor,
        grad: &Tensor,
        params: &Params,
    ) -> Result<(Tensor, Tensor, Tensor)> {
        let x = Inputs::new(q, k, v, params)?;
        let (output, grad) = (values(output)?, values(grad)?);
        let lse = values(lse)?;
        let d = params.dims;
        let mut dq = vec![0f64; x.q.len()];
        let mut dk = vec![0f64; x.k.len()];
        let mut dv = vec![0f64; x.v.len()];
        for b in 0..d.batch {
            for h in 0..d.heads {
                for i in 0..d.queries {
                    let row = (b * d.heads + h) * d.queries + i;
                    let qi = q_row(&d, b, h, i);
                    let g = &grad[qi..qi + d.head_dim];
                    let delta = dot(g, &output[qi..qi + d.head_dim]);
                    for (j, score) in scores(&x, params, b, h, i).into_iter().enumerate() {
                        let Some(score) = score else { continue };
                        let kj = k_row(&d, b, h, j);
                        let probability = (score - lse[row]).exp();
                        let dp = dot(g, &x.v[kj..kj + d.head_dim]);
                        let ds = probability * (dp - delta) * params.scale;
                        for c in 0..d.head_dim {
                            dq[qi + c] += ds * x.k[kj + c];
                            dk[kj + c] += ds * x.q[qi + c];
                            dv[kj + c] += probability * g[c];
                        }
                    }
                }
            }
        }
        let dtype = q.dtype();
        let tensor = |data: Vec<f64>, like: &Tensor| {
            Tensor::from_vec(data, like.shape(), &Device::Cpu)?.to_dtype(dtype)
        };
        Ok((tensor(dq, q)?, tensor(dk, k)?, tensor(dv, v)?))
    }
}

/// The CUDA implementation: launches of `kernels/flash_attn.cu`.
#[cfg(feature = "cuda")]
#[expect(
    unsafe_code,
    reason = "launching CUDA kernels and reading device pointers are FFI calls"
)]
mod gpu {
    use candle_core::cuda_backend::cudarc::driver::sys::{self, CUfunction_attribute};
    use candle_core::cuda_backend::cudarc::driver::{
        DevicePtr, DeviceRepr, LaunchConfig, PushKernelArg,
    };
    use candle_core::cuda_backend::WrapErr;
    use candle_core::CudaDevice;

    use super::*;

    const PTX: &str = include_str!(concat!(env!("OUT_DIR"), "/flash_attn.ptx"));
    const MODULE: &str = "flash_attn";
    /// `kernels/flash_wgmma.cu` for `compute_90a`; empty when built for another capability.
    const WGMMA_PTX: &str = include_str!(concat!(env!("OUT_DIR"), "/flash_wgmma.ptx"));
    const WGMMA_MODULE: &str = "flash_wgmma";
    /// Threads of the Hopper forward (a producer and two consumer warpgroups, `wgfa::WS_THREADS`)
    /// and of its dK/dV and dQ kernels (two warpgroups, `wgbw::THREADS`).
    const WGMMA_FORWARD_THREADS: u32 = 384;
    const WGMMA_BACKWARD_THREADS: u32 = 256;
    /// Dynamic shared memory of the Hopper kernels (`wgfa::WsPersistentLayout<2>::BYTES`,
    /// `wgbw::DKDV_SMEM`, `wgbw::DQ_SMEM`; each kernel traps on less).
    const WGMMA_SHARED_BYTES: (u32, u32, u32) = (164_944, 166_400, 197_888);
    /// Queries (forward, dQ) and keys (dK/dV) per block of the Hopper kernels.
    const WGMMA_TILE: usize = 128;

    /// Whether `device` runs the Hopper kernels: compute capability 9.0 and a module built for it.
    pub(super) fn hopper(device: &CudaDevice) -> bool {
        !WGMMA_PTX.is_empty()
            && device
                .cuda_stream()
                .context()
                .compute_capability()
                .is_ok_and(|capability| capability == (9, 0))
    }
    /// Threads of `flash_backward_delta_*` (one warp per row).
    const DELTA_THREADS: u32 = 256;

    fn suffix(dtype: DType) -> Result<&'static str> {
        Ok(match dtype {
            DType::BF16 => "bf16",
            DType::F16 => "f16",
            DType::F32 => "f32",
            other => bail!("flash attention kernels: unsupported dtype {other:?}"),
        })
    }

    /// A kernel family of kernels/flash_attn.cu.
    #[derive(Clone, Copy, Debug, PartialEq, Eq)]
    enum Family {
        /// `flash_*`: f32 arithmetic on CUDA cores (f32, and bf16/f16 where no tensor-core
        /// family applies), 256 threads.
        Scalar,
        /// `flash_tc_*`: nvcuda::wmma, 256 threads, static shared memory.
        Wmma,
        /// `flash_mma_*`: FlashAttention-2 style, 128 threads (256 for the d128 dK/dV kernel),
        /// dynamic shared memory.
        Mma,
        /// `flash_wgmma_*` (kernels/flash_wgmma.cu): Hopper, bf16, head_dim 128 only.
        Wgmma,
    }

    impl Family {
        /// The family for `dtype` whose every buffer (`addresses`) allows it: a tensor-core
        /// family (`kernels` picks which) for bf16/f16 with 16-byte aligned buffers, unless
        /// `PEFTPIPE_UNFUSED` lists `flash_tensor_cores`; otherwise the f32-arithmetic kernels,
        /// as for f32. Both tensor-core families take every head_dim in [`HEAD_DIMS`].
        /// [`TensorCoreKernels::Auto`] picks [`Family::Wgmma`] for bf16 heads of 128 on a
        /// Hopper `device` ([`hopper`]), [`Family::Mma`] otherwise.
        fn pick(
            dtype: DType,
            addresses: &[u64],
            kernels: TensorCoreKernels,
            head_dim: usize,
            device: &CudaDevice,
        ) -> Self {
            let tensor_cores = matches!(dtype, DType::BF16 | DType::F16)
                && addresses.iter().all(|a| a % 16 == 0)
                && crate::ops::cuda::enabled("flash_tensor_cores");
            match (tensor_cores, kernels) {
                (false, _) => Self::Scalar,
                (true, TensorCoreKernels::Wmma) => Self::Wmma,
                (true, TensorCoreKernels::Mma) => Self::Mma,
                (true, TensorCoreKernels::Auto) => {
                    if dtype == DType::BF16 && head_dim == 128 && hopper(device) {
                        Self::Wgmma
                    } else {
                        Self::Mma
                    }
                }
            }
        }

        /// Only [`Family::Mma`] and [`Family::Wgmma`] read heads stored `[B, T, H, D]`;
        /// `flash_attention_with` hands them over only when one of those runs, and the
        /// alignment `pick` checks is the one `stored_bthd` checked, so another family here is a
        /// bug, not a fallback.
        fn check_layouts(self, strided: bool) -> Result<()> {
            if strided && !matches!(self, Self::Mma | Self::Wgmma) {
                bail!("flash attention kernels: strided heads reached the {self:?} kernels")
            }
            Ok(())
        }

        fn prefix(self) -> &'static str {
            match self {
                Self::Scalar => "flash",
                Self::Wmma => "flash_tc",
                Self::Mma => "flash_mma",
                Self::Wgmma => "flash_wgmma",
            }
        }

        /// The module holding this family's kernels: `(name, PTX)`.
        fn module(self) -> (&'static str, &'static str) {
            match self {
                Self::Wgmma => (WGMMA_MODULE, WGMMA_PTX),
                _ => (MODULE, PTX),
            }
        }

        /// Threads of the forward and dQ kernels.
        fn threads(self) -> u32 {
            match self {
                Self::Scalar | Self::Wmma => 256,
                Self::Mma => 128,
                Self::Wgmma => WGMMA_BACKWARD_THREADS,
            }
        }

        /// Threads of the dK/dV kernel: the `flash_mma_*` d128 one has 8 warps
        /// (`fa2::WIDE_DKDV_NT`), every other kernel [`Self::threads`].
        fn dkdv_threads(self, head_dim: usize) -> u32 {
            match (head_dim, self) {
                (128, Self::Mma) => 256,
                _ => self.threads(),
            }
        }

        /// `(forward query tile, dQ query tile, dK/dV key tile)` for a head dimension, as
        /// instantiated in kernels/flash_attn.cu.
        fn tiles(self, head_dim: usize) -> Result<(usize, usize, usize)> {
            Ok(match (head_dim, self) {
                (64, Self::Mma) => (64, 64, 64),
                (128, Self::Mma) => (128, 128, 128),
                (128, Self::Wgmma) => (WGMMA_TILE, WGMMA_TILE, WGMMA_TILE),
                (other, Self::Wgmma) => {
                    bail!("flash attention: the Hopper kernels take head_dim 128, not {other}")
                }
                (64, _) => (64, 32, 32),
                (128, Self::Scalar) => (32, 16, 16),
                (128, Self::Wmma) => (32, 16, 32),
                (other, _) => bail!("flash attention kernels: unsupported head_dim {other}"),
            })
        }

        /// Dynamic shared memory of `(forward, dK/dV, dQ)` in bytes: the `fa2::*_smem<D>()` of
        /// kernels/flash_attn.cu for [`Family::Mma`] (the kernels trap on less), 0 for the
        /// others (static shared memory).
        fn shared_bytes(self, head_dim: usize) -> (u32, u32, u32) {
            match self {
                Self::Wgmma => return WGMMA_SHARED_BYTES,
                Self::Mma => {}
                Self::Scalar | Self::Wmma => return (0, 0, 0),
            }
            // Tiles of 16-bit elements with rows padded by 8; forward d64 (`fa2::forward_smem`):
            // Q 64 rows, K and V 64 rows, 64 key flags; d128 (`fa2::forward_wide_smem`): Q 128
            // rows, two buffers of K and V 64 rows and of 64 key flags. d64 (`fa2::dkdv_smem`,
            // `fa2::dq_smem`): dK/dV: K, V 64 rows,
            // two buffers of Q and dO 64 rows and of lse and delta (f32 per query), 64 key flags;
            // dQ: Q, dO 64 rows, two buffers of K and V 64 rows and of 64 key flags. d128
            // (`fa2::dkdv_wide_smem`, `fa2::dq_wide_smem`): dK/dV: K, V 128 rows, two buffers of
            // Q and dO 64 rows, Pᵀ and dSᵀ (128 × 64, rows padded by 8), two buffers of lse and
            // delta, 128 key flags; dQ: Q, dO 128 rows, two buffers of K and V 32 rows and of 32
            // key flags.
            let row = (head_dim as u32 + 8) * 2;
            if head_dim == 64 {
                (
                    (64 + 2 * 64) * row + 64,
                    (2 * 64 + 4 * 64) * row + 4 * 64 * 4 + 64,
                    (2 * 64 + 4 * 64) * row + 2 * 64,
                )
            } else {
                (
                    (128 + 4 * 64) * row + 2 * 64,
                    (2 * 128 + 4 * 64) * row + 2 * 128 * (64 + 8) * 2 + 4 * 64 * 4 + 128,
                    (2 * 128 + 4 * 32) * row + 2 * 32,
                )
            }
        }

        fn config(self, x: usize, y: usize, shared_bytes: u32) -> LaunchConfig {
            self.config_threads(x, y, shared_bytes, self.threads())
        }

        fn config_threads(
            self,
            x: usize,
            y: usize,
            shared_bytes: u32,
            threads: u32,
        ) -> LaunchConfig {
            LaunchConfig {
                grid_dim: (x as u32, y as u32, 1),
                block_dim: (threads, 1, 1),
                shared_mem_bytes: shared_bytes,
            }
        }
    }

    fn element_size(dtype: DType) -> Result<usize> {
        Ok(match dtype {
            DType::U8 => 1,
            DType::BF16 | DType::F16 => 2,
            DType::F32 => 4,
            other => bail!("flash attention kernels: unsupported dtype {other:?}"),
        })
    }

    /// The device address of the first element of a contiguous view of `storage`.
    fn address(storage: &CudaStorage, layout: &Layout) -> Result<u64> {
        let Some((start, _)) = layout.contiguous_offsets() else {
            bail!("flash attention kernels: an input is not contiguous")
        };
        start_address(storage, start)
    }

    /// The address of a `[B, H, T, D]` view of `storage`: contiguous, or stored `[B, T, H, D]`
    /// (`bthd`, checked by `stored_bthd` before the launch).
    fn heads_address(storage: &CudaStorage, layout: &Layout, bthd: bool) -> Result<u64> {
        if bthd {
            start_address(storage, layout.start_offset())
        } else {
            address(storage, layout)
        }
    }

    /// The device address of element `start` of `storage`.
    fn start_address(storage: &CudaStorage, start: usize) -> Result<u64> {
        let stream = storage.device.cuda_stream();
        let base = match storage.dtype() {
            DType::U8 => storage.as_cuda_slice::<u8>()?.device_ptr(&stream).0,
            DType::BF16 => storage.as_cuda_slice::<half::bf16>()?.device_ptr(&stream).0,
            DType::F16 => storage.as_cuda_slice::<half::f16>()?.device_ptr(&stream).0,
            DType::F32 => storage.as_cuda_slice::<f32>()?.device_ptr(&stream).0,
            other => bail!("flash attention kernels: unsupported dtype {other:?}"),
        };
        Ok(base + (start * element_size(storage.dtype())?) as u64)
    }

    /// The address of a `[B, H, T, D]` CUDA tensor, contiguous or (`bthd`) stored `[B, T, H, D]`.
    fn heads_tensor_address(tensor: &Tensor, bthd: bool) -> Result<u64> {
        let (storage, layout) = tensor.storage_and_layout();
        let Storage::Cuda(cuda) = &*storage else {
            bail!("flash attention kernels: a tensor is not on a CUDA device")
        };
        heads_address(cuda, layout, bthd)
    }

    /// The address of a contiguous CUDA tensor; 0 (a null pointer) for `None`.
    fn tensor_address(tensor: Option<&Tensor>) -> Result<u64> {
        let Some(tensor) = tensor else { return Ok(0) };
        let (storage, layout) = tensor.storage_and_layout();
        let Storage::Cuda(cuda) = &*storage else {
            bail!("flash attention kernels: a tensor is not on a CUDA device")
        };
        address(cuda, layout)
    }

    /// An uninitialised buffer of `count` elements (every one written by the next launches).
    fn alloc(device: &CudaDevice, dtype: DType, count: usize) -> Result<(CudaStorage, u64)> {
        // SAFETY (of the callers): the kernels launched next write every element.
        let storage = match dtype {
            DType::BF16 => CudaStorage::wrap_cuda_slice(
                unsafe { device.alloc::<half::bf16>(count.max(1))? },
                device.clone(),
            ),
            DType::F16 => CudaStorage::wrap_cuda_slice(
                unsafe { device.alloc::<half::f16>(count.max(1))? },
                device.clone(),
            ),
            DType::F32 => CudaStorage::wrap_cuda_slice(
                unsafe { device.alloc::<f32>(count.max(1))? },
                device.clone(),
            ),
            other => bail!("flash attention kernels: unsupported dtype {other:?}"),
        };
        let pointer = address(&storage, &Layout::contiguous(count.max(1)))?;
        Ok((storage, pointer))
    }

    macro_rules! launch {
        ($device:expr, $module:expr, $name:expr, $config:expr, $($arg:expr),+ $(,)?) => {{
            let config: LaunchConfig = $config;
            if config.grid_dim.0 > 0 && config.grid_dim.1 > 0 {
                let (module, ptx): (&str, &str) = $module;
                let function = $device.get_or_load_custom_func($name, module, ptx)?;
                if config.shared_mem_bytes > 0 {
                    // Dynamic shared memory beyond the default 48 KiB must be opted into.
                    function
                        .set_attribute(
                            CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
                            config.shared_mem_bytes as i32,
                        )
                        .w()?;
                }
                let mut builder = function.builder();
                $( builder.arg($arg); )+
                // SAFETY: the arguments match the kernel's signature in kernels/flash_attn.cu or
                // kernels/flash_wgmma.cu (pointers to live buffers of the sizes the kernel reads
                // and writes; tensor maps encoded over those buffers).
                unsafe { builder.launch(config) }.w()?;
            }
        }};
    }

    /// A TMA tensor map (`CUtensorMap`) handed to a kernel by value (`__grid_constant__`).
    #[repr(transparent)]
    struct TensorMap(sys::CUtensorMap);

    // SAFETY: a plain 128-byte struct of integers, passed by value as the kernel parameter.
    unsafe impl DeviceRepr for TensorMap {}

    impl TensorMap {
        /// The map the Hopper forward reads bf16 heads of 128 through (as its harness,
        /// benches/gpu/wgmma/flash_wgmma_test.cu `make_map`, builds it): rank 4 over
        /// `[B, H, T, D]` (or, `bthd`, `[B, T, H, D]`) starting at `address`, boxes of 64 columns
        /// × 128 rows of one head, 128-byte swizzle, rows past the end read as zeros.
        fn heads(
            address: u64,
            batch: usize,
            heads: usize,
            length: usize,
            bthd: bool,
        ) -> Result<Self> {
            let row = 128 * 2u64;
            let (batch, heads, length) = (batch as u64, heads as u64, length as u64);
            let (dims, strides, boxes) = if bthd {
                (
                    [128, heads, length, batch],
                    [row, row * heads, row * heads * length],
                    [64u32, 1, 128, 1],
                )
            } else {
                (
                    [128, length, heads, batch],
                    [row, row * length, row * heads * length],
                    [64u32, 128, 1, 1],
                )
            };
            let element_strides = [1u32; 4];
            let mut map = sys::CUtensorMap { opaque: [0; 16] };
            // SAFETY: the arrays have the rank's 4 (dims, boxes, element strides) and 3 (strides
            // of all but the innermost dimension) entries; the address is a live, 16-byte aligned
            // device buffer of `batch · heads · length` rows of 128 bf16 (checked by the caller).
            let result = unsafe {
                sys::cuTensorMapEncodeTiled(
                    &mut map,
                    sys::CUtensorMapDataType::CU_TENSOR_MAP_DATA_TYPE_BFLOAT16,
                    4,
                    address as *mut std::ffi::c_void,
                    dims.as_ptr(),
                    strides.as_ptr(),
                    boxes.as_ptr(),
                    element_strides.as_ptr(),
                    sys::CUtensorMapInterleave::CU_TENSOR_MAP_INTERLEAVE_NONE,
                    sys::CUtensorMapSwizzle::CU_TENSOR_MAP_SWIZZLE_128B,
                    sys::CUtensorMapL2promotion::CU_TENSOR_MAP_L2_PROMOTION_L2_256B,
                    sys::CUtensorMapFloatOOBfill::CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE,
                )
            };
            if result != sys::CUresult::CUDA_SUCCESS {
                bail!("flash attention: cuTensorMapEncodeTiled failed ({result:?})")
            }
            Ok(Self(map))
        }
    }

    /// The number of SMs of `device` (the persistent forward's grid).
    fn multiprocessors(device: &CudaDevice) -> Result<usize> {
        let count = device
            .cuda_stream()
            .context()
            .attribute(sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT)
            .w()?;
        Ok(usize::try_from(count).unwrap_or(1).max(1))
    }

    /// The scalar arguments every kernel takes after its pointers.
    struct Scalars {
        heads: i32,
        kv_heads: i32,
        queries: i32,
        keys: i32,
        offset: i32,
        causal: i32,
        scale: f32,
        q_bthd: i32,
        kv_bthd: i32,
    }

    impl Scalars {
        fn new(params: &Params) -> Result<Self> {
            let d = &params.dims;
            let int = |value: usize| {
                i32::try_from(value).map_err(|_| {
                    candle_core::Error::Msg(format!("flash attention: {value} exceeds i32"))
                })
            };
            Ok(Self {
                heads: int(d.heads)?,
                kv_heads: int(d.kv_heads)?,
                queries: int(d.queries)?,
                keys: int(d.keys)?,
                offset: int(params.offset)?,
                causal: i32::from(params.causal),
                scale: params.scale as f32,
                q_bthd: i32::from(params.q_bthd),
                kv_bthd: i32::from(params.kv_bthd),
            })
        }
    }

    /// Forward over `(q, k, v)`; writes the log-sum-exp into `lse` (a fresh f32 `[B, H, T]`).
    struct Forward {
        params: Params,
        lse: Tensor,
    }

    impl CustomOp3 for Forward {
        fn name(&self) -> &'static str {
            "flash-attention-forward"
        }

        crate::ops::cuda::cuda_only!(3);

        fn cuda_fwd(
            &self,
            q: &CudaStorage,
            ql: &Layout,
            k: &CudaStorage,
            kl: &Layout,
            v: &CudaStorage,
            vl: &Layout,
        ) -> Result<(CudaStorage, Shape)> {
            let d = self.params.dims;
            let device = &q.device;
            let count = ql.shape().elem_count();
            let (out, o) = alloc(device, q.dtype(), count)?;
            let (q_bthd, kv_bthd) = (self.params.q_bthd, self.params.kv_bthd);
            let qp = heads_address(q, ql, q_bthd)?;
            let (kp, vp) = (
                heads_address(k, kl, kv_bthd)?,
                heads_address(v, vl, kv_bthd)?,
            );
            let family = Family::pick(
                q.dtype(),
                &[qp, kp, vp, o],
                self.params.kernels,
                d.head_dim,
                device,
            );
            family.check_layouts(q_bthd || kv_bthd)?;
            let (block_queries, _, _) = family.tiles(d.head_dim)?;
            let (shared_bytes, _, _) = family.shared_bytes(d.head_dim);
            let valid = tensor_address(self.params.valid.as_ref())?;
            let lse = tensor_address(Some(&self.lse))?;
            let s = Scalars::new(&self.params)?;
            if family == Family::Wgmma {
                // Persistent: at most one block per SM walks the (query tile, batch, head) tiles;
                // q, k and v reach it as TMA tensor maps.
                let maps = [
                    TensorMap::heads(qp, d.batch, d.heads, d.queries, q_bthd)?,
                    TensorMap::heads(kp, d.batch, d.kv_heads, d.keys, kv_bthd)?,
                    TensorMap::heads(vp, d.batch, d.kv_heads, d.keys, kv_bthd)?,
                ];
                let tiles = d.queries.div_ceil(block_queries) * d.batch * d.heads;
                let blocks = tiles.min(multiprocessors(device)?);
                let batch = i32::try_from(d.batch).map_err(|_| {
                    candle_core::Error::Msg(format!(
                        "flash attention: batch {} exceeds i32",
                        d.batch
                    ))
                })?;
                launch!(
                    device,
                    family.module(),
                    "flash_wgmma_forward_persistent_bf16_d128",
                    family.config_threads(blocks, 1, shared_bytes, WGMMA_FORWARD_THREADS),
                    &maps[0],
                    &maps[1],
                    &maps[2],
                    &valid,
                    &o,
                    &lse,
                    &batch,
                    &s.heads,
                    &s.kv_heads,
                    &s.queries,
                    &s.keys,
                    &s.offset,
                    &s.causal,
                    &s.scale,
                    &s.q_bthd,
                    &s.kv_bthd
                );
            } else {
                let name = format!(
                    "{}_forward_{}_d{}",
                    family.prefix(),
                    suffix(q.dtype())?,
                    d.head_dim
                );
                launch!(
                    device,
                    family.module(),
                    &name,
                    family.config(
                        d.queries.div_ceil(block_queries),
                        d.batch * d.heads,
                        shared_bytes
                    ),
                    &qp,
                    &kp,
                    &vp,
                    &valid,
                    &o,
                    &lse,
                    &s.heads,
                    &s.kv_heads,
                    &s.queries,
                    &s.keys,
                    &s.offset,
                    &s.causal,
                    &s.scale,
                    &s.q_bthd,
                    &s.kv_bthd
                );
            }
            // Stored as q is: [B, T, H, D] when q is (`forward` views it back as [B, H, T, D]).
            let shape = if q_bthd {
                Shape::from((d.batch, d.queries, d.heads, d.head_dim))
            } else {
                ql.shape().clone()
            };
            Ok((out, shape))
        }
    }

    pub(super) fn forward(
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        params: &Params,
    ) -> Result<(Tensor, Tensor)> {
        let d = params.dims;
        let lse = Tensor::zeros((d.batch, d.heads, d.queries), DType::F32, q.device())?;
        let output = q.apply_op3_no_bwd(
            k,
            v,
            &Forward {
                params: params.clone(),
                lse: lse.clone(),
            },
        )?;
        let output = if params.q_bthd {
            output.transpose(1, 2)?
        } else {
            output
        };
        Ok((output, lse))
    }

    /// Backward over `(q, k, v)` → `[dq | dk | dv]` flattened into one buffer.
    struct Backward {
        params: Params,
        output: Tensor,
        grad: Tensor,
        lse: Tensor,
    }

    impl CustomOp3 for Backward {
        fn name(&self) -> &'static str {
            "flash-attention-backward"
        }

        crate::ops::cuda::cuda_only!(3);

        fn cuda_fwd(
            &self,
            q: &CudaStorage,
            ql: &Layout,
            k: &CudaStorage,
            kl: &Layout,
            v: &CudaStorage,
            vl: &Layout,
        ) -> Result<(CudaStorage, Shape)> {
            let d = self.params.dims;
            let device = &q.device;
            let dtype = q.dtype();
            let (nq, nk) = (ql.shape().elem_count(), kl.shape().elem_count());
            let total = nq + 2 * nk;
            let (out, dq) = alloc(device, dtype, total)?;
            let size = element_size(dtype)? as u64;
            let (dk, dv) = (dq + nq as u64 * size, dq + (nq + nk) as u64 * size);
            let rows = d.batch * d.heads * d.queries;
            let (_delta_storage, delta) = alloc(device, DType::F32, rows)?;
            let (q_bthd, kv_bthd) = (self.params.q_bthd, self.params.kv_bthd);
            let qp = heads_address(q, ql, q_bthd)?;
            let (kp, vp) = (
                heads_address(k, kl, kv_bthd)?,
                heads_address(v, vl, kv_bthd)?,
            );
            let valid = tensor_address(self.params.valid.as_ref())?;
            let lse = tensor_address(Some(&self.lse))?;
            let op = heads_tensor_address(&self.output, q_bthd)?;
            let gp = heads_tensor_address(&self.grad, q_bthd)?;
            let family = Family::pick(
                dtype,
                &[qp, kp, vp, gp, dq, dk, dv],
                self.params.kernels,
                d.head_dim,
                device,
            );
            family.check_layouts(q_bthd || kv_bthd)?;
            let (_, block_queries, block_keys) = family.tiles(d.head_dim)?;
            let (_, dkdv_bytes, dq_bytes) = family.shared_bytes(d.head_dim);
            let s = Scalars::new(&self.params)?;
            let sfx = suffix(dtype)?;
            let prefix = family.prefix();
            let (rows_i, dim_i) = (rows as i64, d.head_dim as i32);
            launch!(
                device,
                (MODULE, PTX),
                &format!("flash_backward_delta_{sfx}"),
                LaunchConfig {
                    grid_dim: (rows.div_ceil(DELTA_THREADS as usize / 32) as u32, 1, 1),
                    block_dim: (DELTA_THREADS, 1, 1),
                    shared_mem_bytes: 0,
                },
                &op,
                &gp,
                &delta,
                &rows_i,
                &dim_i,
                &s.heads,
                &s.queries,
                &s.q_bthd
            );
            launch!(
                device,
                family.module(),
                &format!("{prefix}_backward_dkdv_{sfx}_d{}", d.head_dim),
                family.config_threads(
                    d.keys.div_ceil(block_keys),
                    d.batch * d.kv_heads,
                    dkdv_bytes,
                    family.dkdv_threads(d.head_dim)
                ),
                &qp,
                &kp,
                &vp,
                &valid,
                &gp,
                &lse,
                &delta,
                &dk,
                &dv,
                &s.heads,
                &s.kv_heads,
                &s.queries,
                &s.keys,
                &s.offset,
                &s.causal,
                &s.scale,
                &s.q_bthd,
                &s.kv_bthd
            );
            launch!(
                device,
                family.module(),
                &format!("{prefix}_backward_dq_{sfx}_d{}", d.head_dim),
                family.config(
                    d.queries.div_ceil(block_queries),
                    d.batch * d.heads,
                    dq_bytes
                ),
                &qp,
                &kp,
                &vp,
                &valid,
                &gp,
                &lse,
                &delta,
                &dq,
                &s.heads,
                &s.kv_heads,
                &s.queries,
                &s.keys,
                &s.offset,
                &s.causal,
                &s.scale,
                &s.q_bthd,
                &s.kv_bthd
            );
            Ok((out, Shape::from(total)))
        }
    }

    pub(super) fn backward(
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        output: &Tensor,
        lse: &Tensor,
        grad: &Tensor,
        params: &Params,
    ) -> Result<(Tensor, Tensor, Tensor)> {
        // The output and dO are stored as q is; dq as q is, dk and dv as k and v are.
        let like_q = |x: &Tensor| {
            if params.q_bthd {
                to_bthd(x)
            } else {
                x.contiguous()
            }
        };
        let op = Backward {
            params: params.clone(),
            output: like_q(output)?,
            grad: like_q(grad)?,
            lse: lse.contiguous()?,
        };
        let packed = q.apply_op3_no_bwd(k, v, &op)?;
        let (nq, nk) = (q.elem_count(), k.elem_count());
        let unpack = |start: usize, count: usize, like: &Tensor, bthd: bool| -> Result<Tensor> {
            let part = packed.narrow(0, start, count)?;
            if bthd {
                let (batch, heads, length, dim) = like.dims4()?;
                part.reshape((batch, length, heads, dim))?.transpose(1, 2)
            } else {
                part.reshape(like.shape())
            }
        };
        Ok((
            unpack(0, nq, q, params.q_bthd)?,
            unpack(nq, nk, k, params.kv_bthd)?,
            unpack(nq + nk, nk, v, params.kv_bthd)?,
        ))
    }
}
