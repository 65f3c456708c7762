// peftpipe's fused CUDA kernels, compiled to PTX by build.rs (only with `--features cuda`) and
// launched from src/ops/cuda.rs. Every kernel has a CPU reference: the op in src/ops it replaces
// on CUDA; tests/cuda_kernels.rs compares the two on fresh random inputs.
//
// Conventions: bf16 and f32 variants of each kernel (suffix _bf16 / _f32), arithmetic in f32,
// one rounding to the storage type at the end; all tensors contiguous; sizes as 64-bit where a
// product of dimensions can pass 2^31.
#include <cuda_bf16.h>
#include <stdint.h>

typedef __nv_bfloat16 bf16;

__device__ __forceinline__ float to_float(float v) { return v; }
__device__ __forceinline__ float to_float(bf16 v) { return __bfloat162float(v); }
template <typename T> __device__ __forceinline__ T from_float(float v);
template <> __device__ __forceinline__ float from_float<float>(float v) { return v; }
template <> __device__ __forceinline__ bf16 from_float<bf16>(float v) { return __float2bfloat16_rn(v); }

// Sum over the block; `scratch` holds 32 floats. Ends with a barrier, so it can be called again.
__device__ float block_sum(float value, float* scratch) {
    for (int offset = 16; offset > 0; offset >>= 1) value += __shfl_xor_sync(0xffffffffu, value, offset);
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int warps = (blockDim.x + 31) >> 5;
    if (lane == 0) scratch[warp] = value;
    __syncthreads();
    if (warp == 0) {
        value = lane < warps ? scratch[lane] : 0.0f;
        for (int offset = 16; offset > 0; offset >>= 1) value += __shfl_xor_sync(0xffffffffu, value, offset);
        __syncwarp();
        if (lane == 0) scratch[0] = value;
    }
    __syncthreads();
    const float total = scratch[0];
    __syncthreads();
    return total;
}

__device__ float block_max(float value, float* scratch) {
    for (int offset = 16; offset > 0; offset >>= 1) value = fmaxf(value, __shfl_xor_sync(0xffffffffu, value, offset));
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int warps = (blockDim.x + 31) >> 5;
    if (lane == 0) scratch[warp] = value;
    __syncthreads();
    if (warp == 0) {
        value = lane < warps ? scratch[lane] : -INFINITY;
        for (int offset = 16; offset > 0; offset >>= 1) value = fmaxf(value, __shfl_xor_sync(0xffffffffu, value, offset));
        __syncwarp();
        if (lane == 0) scratch[0] = value;
    }
    __syncthreads();
    const float total = scratch[0];
    __syncthreads();
    return total;
}

__device__ __forceinline__ bool aligned16(const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; }
// 16 bytes of T, for loads and stores of whole chunks.
template <typename T> union Chunk {
    static constexpr int N = 16 / sizeof(T);
    uint4 word;
    T v[N];
};
// Every buffer 16-byte aligned and n a multiple of a chunk: the kernels read and write 16 bytes per
// thread and step (the arithmetic per element is the same either way).
template <typename T>
__device__ __forceinline__ bool chunked(size_t n, const void* a, const void* b, const void* c, const void* d) {
    return n % Chunk<T>::N == 0 && aligned16(a) && aligned16(b) && aligned16(c) && aligned16(d);
}
// ---------------------------------------------------------------------------------------------
// RMSNorm, one block per row. Forward as Hugging Face: y = w · (x·r rounded to T), r = 1/sqrt(mean(x²) + eps).
// Backward for x only: dx = r·(g·w) − x·r³·mean((g·w)·x).
//
// Rows are read and written 16 bytes at a time (8 bf16 / 4 f32 per access) when the row length is
// a multiple of that and every buffer is 16-byte aligned (the launcher's tensors are), else one
// value at a time; the arithmetic per value is the same, only the order of the row sums differs.

template <typename T>
__device__ void rms_norm_forward(const T* x, const T* w, T* y, int cols, float eps) {
    __shared__ float scratch[32];
    constexpr int N = Chunk<T>::N;
    const size_t row = blockIdx.x;
    const T* xr = x + row * cols;
    T* yr = y + row * cols;
    const bool vector = chunked<T>(cols, x, w, y, y);
    float squares = 0.0f;
    if (vector) {
        for (int i = threadIdx.x; i < cols / N; i += blockDim.x) {
            Chunk<T> v; v.word = reinterpret_cast<const uint4*>(xr)[i];
#pragma unroll
            for (int e = 0; e < N; ++e) squares += to_float(v.v[e]) * to_float(v.v[e]);
        }
    } else {
        for (int i = threadIdx.x; i < cols; i += blockDim.x) { const float v = to_float(xr[i]); squares += v * v; }
    }
    squares = block_sum(squares, scratch);
    const float r = rsqrtf(squares / cols + eps);
    if (vector) {
        for (int i = threadIdx.x; i < cols / N; i += blockDim.x) {
            Chunk<T> v, g, out;
            v.word = reinterpret_cast<const uint4*>(xr)[i];
            g.word = reinterpret_cast<const uint4*>(w)[i];
#pragma unroll
            for (int e = 0; e < N; ++e) out.v[e] = from_float<T>(to_float(from_float<T>(to_float(v.v[e]) * r)) * to_float(g.v[e]));
            reinterpret_cast<uint4*>(yr)[i] = out.word;
        }
    } else {
        for (int i = threadIdx.x; i < cols; i += blockDim.x) {
            const float normalized = to_float(from_float<T>(to_float(xr[i]) * r));
            yr[i] = from_float<T>(normalized * to_float(w[i]));
        }
    }
}

template <typename T>
__device__ void rms_norm_backward(const T* x, const T* w, const T* g, T* dx, int cols, float eps) {
    __shared__ float scratch[32];
    constexpr int N = Chunk<T>::N;
    const size_t row = blockIdx.x;
    const T* xr = x + row * cols;
    const T* gr = g + row * cols;
    T* dr = dx + row * cols;
    const bool vector = chunked<T>(cols, x, w, g, dx);
    float squares = 0.0f, projection = 0.0f;
    if (vector) {
        for (int i = threadIdx.x; i < cols / N; i += blockDim.x) {
            Chunk<T> xv, wv, gv;
            xv.word = reinterpret_cast<const uint4*>(xr)[i];
            wv.word = reinterpret_cast<const uint4*>(w)[i];
            gv.word = reinterpret_cast<const uint4*>(gr)[i];
#pragma unroll
            for (int e = 0; e < N; ++e) {
                const float v = to_float(xv.v[e]);
                squares += v * v;
                projection += to_float(gv.v[e]) * to_float(wv.v[e]) * v;
            }
        }
    } else {
        for (int i = threadIdx.x; i < cols; i += blockDim.x) {
            const float v = to_float(xr[i]);
            squares += v * v;
            projection += to_float(gr[i]) * to_float(w[i]) * v;
        }
    }
    squares = block_sum(squares, scratch);
    projection = block_sum(projection, scratch);
    const float r = rsqrtf(squares / cols + eps);
    const float c = r * r * r * projection / cols;
    if (vector) {
        for (int i = threadIdx.x; i < cols / N; i += blockDim.x) {
            Chunk<T> xv, wv, gv, out;
            xv.word = reinterpret_cast<const uint4*>(xr)[i];
            wv.word = reinterpret_cast<const uint4*>(w)[i];
            gv.word = reinterpret_cast<const uint4*>(gr)[i];
#pragma unroll
            for (int e = 0; e < N; ++e) out.v[e] = from_float<T>(r * (to_float(gv.v[e]) * to_float(wv.v[e])) - to_float(xv.v[e]) * c);
            reinterpret_cast<uint4*>(dr)[i] = out.word;
        }
    } else {
        for (int i = threadIdx.x; i < cols; i += blockDim.x) {
            const float gw = to_float(gr[i]) * to_float(w[i]);
            dr[i] = from_float<T>(r * gw - to_float(xr[i]) * c);
        }
    }
}

extern "C" __global__ void rms_norm_forward_bf16(const bf16* x, const bf16* w, bf16* y, int cols, float eps) { rms_norm_forward(x, w, y, cols, eps); }
extern "C" __global__ void rms_norm_forward_f32(const float* x, const float* w, float* y, int cols, float eps) { rms_norm_forward(x, w, y, cols, eps); }
extern "C" __global__ void rms_norm_backward_bf16(const bf16* x, const bf16* w, const bf16* g, bf16* dx, int cols, float eps) { rms_norm_backward(x, w, g, dx, cols, eps); }
extern "C" __global__ void rms_norm_backward_f32(const float* x, const float* w, const float* g, float* dx, int cols, float eps) { rms_norm_backward(x, w, g, dx, cols, eps); }

// ---------------------------------------------------------------------------------------------
// LayerNorm (GPT-2), one block per row. Forward as Hugging Face in the storage type: x̂ = (x − mean)·r
// rounded to T, times w (rounded), plus b (rounded; `has_bias` 0: no bias, `b` is not read), with
// r = 1/sqrt(var + eps); mean and variance in f32, two passes (no E[x²] − E[x]² cancellation).
// Backward for x only: dx = r·(g·w − mean(g·w) − x̂·mean(g·w·x̂)), x̂ in f32, recomputed from x.
template <typename T>
__device__ void layer_norm_stats(const T* xr, int cols, float eps, float* scratch, float* mean, float* r) {
    float sum = 0.0f;
    for (int i = threadIdx.x; i < cols; i += blockDim.x) sum += to_float(xr[i]);
    const float m = block_sum(sum, scratch) / cols;
    float squares = 0.0f;
    for (int i = threadIdx.x; i < cols; i += blockDim.x) { const float d = to_float(xr[i]) - m; squares += d * d; }
    *mean = m;
    *r = rsqrtf(block_sum(squares, scratch) / cols + eps);
}

template <typename T>
__device__ void layer_norm_forward(const T* x, const T* w, const T* b, T* y, int cols, float eps, int has_bias) {
    __shared__ float scratch[32];
    const size_t row = blockIdx.x;
    const T* xr = x + row * cols;
    T* yr = y + row * cols;
    float mean, r;
    layer_norm_stats(xr, cols, eps, scratch, &mean, &r);
    for (int i = threadIdx.x; i < cols; i += blockDim.x) {
        const float normalized = to_float(from_float<T>((to_float(xr[i]) - mean) * r));
        float value = to_float(from_float<T>(normalized * to_float(w[i])));
        if (has_bias) value += to_float(b[i]);
        yr[i] = from_float<T>(value);
    }
}

template <typename T>
__device__ void layer_norm_backward(const T* x, const T* w, const T* g, T* dx, int cols, float eps) {
    __shared__ float scratch[32];
    const size_t row = blockIdx.x;
    const T* xr = x + row * cols;
    const T* gr = g + row * cols;
    T* dr = dx + row * cols;
    float mean, r;
    layer_norm_stats(xr, cols, eps, scratch, &mean, &r);
    float sum_gw = 0.0f, sum_gw_xhat = 0.0f;
    for (int i = threadIdx.x; i < cols; i += blockDim.x) {
        const float gw = to_float(gr[i]) * to_float(w[i]);
        sum_gw += gw;
        sum_gw_xhat += gw * (to_float(xr[i]) - mean) * r;
    }
    const float mean_gw = block_sum(sum_gw, scratch) / cols;
    const float mean_gw_xhat = block_sum(sum_gw_xhat, scratch) / cols;
    for (int i = threadIdx.x; i < cols; i += blockDim.x) {
        const float gw = to_float(gr[i]) * to_float(w[i]);
        const float x_hat = (to_float(xr[i]) - mean) * r;
        dr[i] = from_float<T>(r * (gw - mean_gw - x_hat * mean_gw_xhat));
    }
}

extern "C" __global__ void layer_norm_forward_bf16(const bf16* x, const bf16* w, const bf16* b, bf16* y, int cols, float eps, int has_bias) { layer_norm_forward(x, w, b, y, cols, eps, has_bias); }
extern "C" __global__ void layer_norm_forward_f32(const float* x, const float* w, const float* b, float* y, int cols, float eps, int has_bias) { layer_norm_forward(x, w, b, y, cols, eps, has_bias); }
extern "C" __global__ void layer_norm_backward_bf16(const bf16* x, const bf16* w, const bf16* g, bf16* dx, int cols, float eps) { layer_norm_backward(x, w, g, dx, cols, eps); }
extern "C" __global__ void layer_norm_backward_f32(const float* x, const float* w, const float* g, float* dx, int cols, float eps) { layer_norm_backward(x, w, g, dx, cols, eps); }

// ---------------------------------------------------------------------------------------------
// RoPE, rotate-half layout: x [B, H, T, D], tables cos/sin [B, T, D/2]. One thread per pair
// (i, i + D/2). `sign` = +1 forward, −1 backward (the transpose of a rotation is the rotation by −θ).
// When D/2 is a multiple of 16 bytes' worth of T and the buffers are 16-byte aligned, a thread takes
// 16 bytes' worth of consecutive pairs (one index computation, 16-byte accesses); same arithmetic.
template <typename T>
__device__ void rope(const T* x, const T* cos, const T* sin, T* y, int heads, int length, int half, float sign, size_t pairs, int bthd) {
    constexpr int N = Chunk<T>::N;
    if (chunked<T>(half, x, cos, sin, y)) {
        for (size_t chunk = blockIdx.x * (size_t)blockDim.x + threadIdx.x; chunk < pairs / N;
             chunk += (size_t)gridDim.x * blockDim.x) {
            const size_t p = chunk * N;
            const size_t row = p / half;
            const int i = (int)(p % half);
            const size_t t = bthd ? (row / heads) % length : row % length;
            const size_t b = row / ((size_t)length * heads);
            const size_t table = (b * length + t) * half + i;
            const size_t base = row * 2 * half + i;
            Chunk<T> c, s, x1, x2, y1, y2;
            c.word = *reinterpret_cast<const uint4*>(cos + table);
            s.word = *reinterpret_cast<const uint4*>(sin + table);
            x1.word = *reinterpret_cast<const uint4*>(x + base);
            x2.word = *reinterpret_cast<const uint4*>(x + base + half);
#pragma unroll
            for (int e = 0; e < N; ++e) {
                const float ce = to_float(c.v[e]), se = sign * to_float(s.v[e]), a = to_float(x1.v[e]), b2 = to_float(x2.v[e]);
                y1.v[e] = from_float<T>(a * ce - b2 * se);
                y2.v[e] = from_float<T>(b2 * ce + a * se);
            }
            *reinterpret_cast<uint4*>(y + base) = y1.word;
            *reinterpret_cast<uint4*>(y + base + half) = y2.word;
        }
        return;
    }
    for (size_t p = blockIdx.x * (size_t)blockDim.x + threadIdx.x; p < pairs; p += (size_t)gridDim.x * blockDim.x) {
        const size_t row = p / half;                 // (b, h, t) flattened, or (b, t, h) with `bthd`
        const int i = (int)(p % half);
        const size_t t = bthd ? (row / heads) % length : row % length;
        const size_t b = row / ((size_t)length * heads);
        const size_t table = (b * length + t) * half + i;
        const float c = to_float(cos[table]), s = sign * to_float(sin[table]);
        const size_t base = row * 2 * half + i;
        const float x1 = to_float(x[base]), x2 = to_float(x[base + half]);
        y[base] = from_float<T>(x1 * c - x2 * s);
        y[base + half] = from_float<T>(x2 * c + x1 * s);
    }
}
// `x` and `y` may be one buffer (each pair is read before it is written): RoPE in place.
extern "C" __global__ void rope_bf16(const bf16* x, const bf16* c, const bf16* s, bf16* y, int heads, int length, int half, float sign, size_t pairs, int bthd) { rope(x, c, s, y, heads, length, half, sign, pairs, bthd); }
extern "C" __global__ void rope_f32(const float* x, const float* c, const float* s, float* y, int heads, int length, int half, float sign, size_t pairs, int bthd) { rope(x, c, s, y, heads, length, half, sign, pairs, bthd); }


// ---------------------------------------------------------------------------------------------
// SwiGLU: h = silu(gate) · up. Backward writes [2, n]: d_gate = g·up·silu'(gate), d_up = g·silu(gate),
// silu'(z) = σ(z)·(1 + z·(1 − σ(z))).
// One element of each: h = silu(z)·u; (d_gate, d_up) for the upstream gradient g.
// `e` = expf(−z), given by callers that need both (one exp per element, same bits).
template <typename T>
__device__ __forceinline__ T swiglu_value(T gate, T up, float e) {
    const float z = to_float(gate);
    const float silu = z / (1.0f + e);
    return from_float<T>(silu * to_float(up));
}
template <typename T>
__device__ __forceinline__ T swiglu_value(T gate, T up) {
    return swiglu_value(gate, up, expf(-to_float(gate)));
}
template <typename T>
__device__ __forceinline__ void swiglu_gradients(T gate, T up, T g, T& d_gate, T& d_up, float e) {
    const float z = to_float(gate);
    const float sigma = 1.0f / (1.0f + e);
    const float gi = to_float(g);
    d_gate = from_float<T>(gi * to_float(up) * sigma * (1.0f + z * (1.0f - sigma)));
    d_up = from_float<T>(gi * z * sigma);
}
template <typename T>
__device__ __forceinline__ void swiglu_gradients(T gate, T up, T g, T& d_gate, T& d_up) {
    swiglu_gradients(gate, up, g, d_gate, d_up, expf(-to_float(gate)));
}
// ---------------------------------------------------------------------------------------------
// out = a + b, elementwise (out may be a: y += x in place, a residual connection added into the
// branch output it follows, or a gradient summed into the one already stored). Sums in f32,
// rounded once, as candle's add does for bf16.
template <typename T>
__device__ void add(T* out, const T* a, const T* b, size_t n) {
    const size_t first = blockIdx.x * (size_t)blockDim.x + threadIdx.x, stride = (size_t)gridDim.x * blockDim.x;
    if (chunked<T>(n, out, a, b, b)) {
        constexpr int N = Chunk<T>::N;
        for (size_t i = first; i < n / N; i += stride) {
            Chunk<T> x, y;
            x.word = reinterpret_cast<const uint4*>(a)[i];
            y.word = reinterpret_cast<const uint4*>(b)[i];
#pragma unroll
            for (int e = 0; e < N; ++e) x.v[e] = from_float<T>(to_float(x.v[e]) + to_float(y.v[e]));
            reinterpret_cast<uint4*>(out)[i] = x.word;
        }
        return;
    }
    for (size_t i = first; i < n; i += stride) out[i] = from_float<T>(to_float(a[i]) + to_float(b[i]));
}
extern "C" __global__ void add_into_bf16(bf16* y, const bf16* x, size_t n) { add(y, y, x, n); }
extern "C" __global__ void add_into_f32(float* y, const float* x, size_t n) { add(y, y, x, n); }
extern "C" __global__ void add_bf16(bf16* out, const bf16* a, const bf16* b, size_t n) { add(out, a, b, n); }
extern "C" __global__ void add_f32(float* out, const float* a, const float* b, size_t n) { add(out, a, b, n); }

template <typename T>
__device__ void swiglu_forward(const T* gate, const T* up, T* h, size_t n) {
    const size_t first = blockIdx.x * (size_t)blockDim.x + threadIdx.x, stride = (size_t)gridDim.x * blockDim.x;
    if (chunked<T>(n, gate, up, h, h)) {
        constexpr int N = Chunk<T>::N;
        for (size_t i = first; i < n / N; i += stride) {
            Chunk<T> a, b, out;
            a.word = reinterpret_cast<const uint4*>(gate)[i];
            b.word = reinterpret_cast<const uint4*>(up)[i];
#pragma unroll
            for (int e = 0; e < N; ++e) out.v[e] = swiglu_value(a.v[e], b.v[e]);
            reinterpret_cast<uint4*>(h)[i] = out.word;
        }
        return;
    }
    for (size_t i = first; i < n; i += stride) h[i] = swiglu_value(gate[i], up[i]);
}
template <typename T>
__device__ void swiglu_backward(const T* gate, const T* up, const T* g, T* out, size_t n) {
    const size_t first = blockIdx.x * (size_t)blockDim.x + threadIdx.x, stride = (size_t)gridDim.x * blockDim.x;
    if (chunked<T>(n, gate, up, g, out)) {
        constexpr int N = Chunk<T>::N;
        for (size_t i = first; i < n / N; i += stride) {
            Chunk<T> a, b, c, d_gate, d_up;
            a.word = reinterpret_cast<const uint4*>(gate)[i];
            b.word = reinterpret_cast<const uint4*>(up)[i];
            c.word = reinterpret_cast<const uint4*>(g)[i];
#pragma unroll
            for (int e = 0; e < N; ++e) swiglu_gradients(a.v[e], b.v[e], c.v[e], d_gate.v[e], d_up.v[e]);
            reinterpret_cast<uint4*>(out)[i] = d_gate.word;
            reinterpret_cast<uint4*>(out + n)[i] = d_up.word;
        }
        return;
    }
    for (size_t i = first; i < n; i += stride) swiglu_gradients(gate[i], up[i], g[i], out[i], out[n + i]);
}
extern "C" __global__ void swiglu_forward_bf16(const bf16* a, const bf16* b, bf16* h, size_t n) { swiglu_forward(a, b, h, n); }
extern "C" __global__ void swiglu_forward_f32(const float* a, const float* b, float* h, size_t n) { swiglu_forward(a, b, h, n); }
extern "C" __global__ void swiglu_backward_bf16(const bf16* a, const bf16* b, const bf16* g, bf16* o, size_t n) { swiglu_backward(a, b, g, o, n); }
extern "C" __global__ void swiglu_backward_f32(const float* a, const float* b, const float* g, float* o, size_t n) { swiglu_backward(a, b, g, o, n); }

// SwiGLU's backward fused with the other use of the product it would recompute: in the backward
// of a low-rank update of the down projection (`ops::low_rank_swiglu_linear`), A's gradient
// tᵀ·h with h = silu(gate)·up. Writes out [2, rows, n] = (d_gate, d_up) as swiglu_backward does
// and partial[b][k][j] = Σ over the rows i of row block b of t[i][k]·h[i][j] (f32, summed over
// the blocks by sum_blocks_f32, in block order: deterministic), h rounded to bf16 exactly as
// swiglu_forward writes it but never stored. gate, up, g [rows, n] and t [rows, R] bf16, n a
// multiple of C, buffers 8-byte aligned. Block: 128 threads of C adjacent columns each, over
// rows [blockIdx.y·rows_per_block, +rows_per_block); t's rows of the block in shared memory.
template <int C> struct Bf16x;
template <> struct Bf16x<4> { typedef uint2 Word; };
template <> struct Bf16x<2> { typedef uint32_t Word; };
template <int R, int C>
__device__ void swiglu_backward_lora(const bf16* gate, const bf16* up, const bf16* g, const bf16* t, bf16* out, float* partial, int rows, int n, int rows_per_block) {
    typedef typename Bf16x<C>::Word Word;
    union Values { Word word; bf16 v[C]; };
    extern __shared__ float t_rows[];  // [rows_per_block][R]
    const int first = blockIdx.y * rows_per_block;
    const int count = min(rows_per_block, rows - first);
    for (int i = threadIdx.x; i < count * R; i += blockDim.x) t_rows[i] = __bfloat162float(t[(size_t)first * R + i]);
    __syncthreads();
    const int col = (blockIdx.x * blockDim.x + threadIdx.x) * C;
    if (col >= n) return;
    const size_t total = (size_t)rows * n;
    float acc[R][C];
#pragma unroll
    for (int k = 0; k < R; ++k)
#pragma unroll
        for (int e = 0; e < C; ++e) acc[k][e] = 0.0f;
#pragma unroll 2
    for (int r = 0; r < count; ++r) {
        const size_t at = (size_t)(first + r) * n + col;
        Values a, b, c, d_gate, d_up;
        a.word = *reinterpret_cast<const Word*>(gate + at);
        b.word = *reinterpret_cast<const Word*>(up + at);
        c.word = *reinterpret_cast<const Word*>(g + at);
        float h[C];
#pragma unroll
        for (int e = 0; e < C; ++e) {
            const float exp_minus = expf(-to_float(a.v[e]));
            swiglu_gradients(a.v[e], b.v[e], c.v[e], d_gate.v[e], d_up.v[e], exp_minus);
            h[e] = to_float(swiglu_value(a.v[e], b.v[e], exp_minus));
        }
        *reinterpret_cast<Word*>(out + at) = d_gate.word;
        *reinterpret_cast<Word*>(out + total + at) = d_up.word;
        const float* tr = t_rows + r * R;
#pragma unroll
        for (int k = 0; k < R; ++k) {
            const float tk = tr[k];
#pragma unroll
            for (int e = 0; e < C; ++e) acc[k][e] = fmaf(tk, h[e], acc[k][e]);
        }
    }
    float* p = partial + (size_t)blockIdx.y * R * n + col;
#pragma unroll
    for (int k = 0; k < R; ++k) {
        if constexpr (C == 4) {
            *reinterpret_cast<float4*>(p + (size_t)k * n) = make_float4(acc[k][0], acc[k][1], acc[k][2], acc[k][3]);
        } else {
            *reinterpret_cast<float2*>(p + (size_t)k * n) = make_float2(acc[k][0], acc[k][1]);
        }
    }
}
#define SWIGLU_LORA(R, C) \
    extern "C" __global__ void swiglu_backward_lora_bf16_r##R(const bf16* gate, const bf16* up, const bf16* g, const bf16* t, bf16* out, float* partial, int rows, int n, int rows_per_block) { \
        swiglu_backward_lora<R, C>(gate, up, g, t, out, partial, rows, n, rows_per_block); \
    }
SWIGLU_LORA(8, 4)
SWIGLU_LORA(16, 4)
SWIGLU_LORA(32, 2)
// out[i] = Σ_b partial[b·count + i] for b = 0, 1, .., blocks − 1, in that order.
extern "C" __global__ void sum_blocks_f32(const float* partial, float* out, int blocks, size_t count) {
    const size_t first = blockIdx.x * (size_t)blockDim.x + threadIdx.x, stride = (size_t)gridDim.x * blockDim.x;
    for (size_t i = first; i < count; i += stride) {
        float sum = 0.0f;
        for (int b = 0; b < blocks; ++b) sum += partial[(size_t)b * count + i];
        out[i] = sum;
    }
}

// ---------------------------------------------------------------------------------------------
// Cross-entropy on a chunk of logits [R, V], one block per row. `targets` [R] (u32, only read
// where weight ≠ 0), `weights` [R] (f32, 0 = ignored). Stats [R, 4]: lse, weighted NLL, weight,
// and the target's bits, so that the backward needs only (logits, stats).
//
// The forward reads each row once: every thread keeps a running (max, Σ exp(x − max)) over its
// values (the online softmax), merged across the block at the end; rows are read 16 bytes at a
// time when the row length is a multiple of a chunk and the buffers are 16-byte aligned. The
// backward reads and writes 16 bytes at a time on the same condition.

// Merge the partial log-sum-exp (om, os) into (m, s): s·e^(m−M) + os·e^(om−M), M = max(m, om).
__device__ __forceinline__ void lse_merge(float& m, float& s, float om, float os) {
    const float top = fmaxf(m, om);
    if (top == -INFINITY) return;  // both empty
    s = s * expf(m - top) + os * expf(om - top);
    m = top;
}

// (max, sum) over the block, merged as [`lse_merge`]; `scratch` holds 64 floats.
__device__ void block_lse(float& m, float& s, float* scratch) {
    for (int offset = 16; offset > 0; offset >>= 1) {
        const float om = __shfl_xor_sync(0xffffffffu, m, offset);
        const float os = __shfl_xor_sync(0xffffffffu, s, offset);
        lse_merge(m, s, om, os);
    }
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int warps = (blockDim.x + 31) >> 5;
    if (lane == 0) {
        scratch[warp] = m;
        scratch[32 + warp] = s;
    }
    __syncthreads();
    if (warp == 0) {
        m = lane < warps ? scratch[lane] : -INFINITY;
        s = lane < warps ? scratch[32 + lane] : 0.0f;
        for (int offset = 16; offset > 0; offset >>= 1) {
            const float om = __shfl_xor_sync(0xffffffffu, m, offset);
            const float os = __shfl_xor_sync(0xffffffffu, s, offset);
            lse_merge(m, s, om, os);
        }
        __syncwarp();
        if (lane == 0) {
            scratch[0] = m;
            scratch[32] = s;
        }
    }
    __syncthreads();
    m = scratch[0];
    s = scratch[32];
    __syncthreads();
}

template <typename T>
__device__ void cross_entropy_forward(const T* logits, const uint32_t* targets, const float* weights, float* stats, int vocab) {
    __shared__ float scratch[64];
    const size_t row = blockIdx.x;
    const T* lr = logits + row * vocab;
    float m = -INFINITY, s = 0.0f;
    constexpr int N = Chunk<T>::N;
    if (chunked<T>(vocab, lr, lr, lr, lr)) {
        const uint4* words = reinterpret_cast<const uint4*>(lr);
        for (int i = threadIdx.x; i < vocab / N; i += blockDim.x) {
            Chunk<T> c;
            c.word = words[i];
            float v[N];
            float top = -INFINITY;
#pragma unroll
            for (int e = 0; e < N; ++e) {
                v[e] = to_float(c.v[e]);
                top = fmaxf(top, v[e]);
            }
            if (top > m) {
                s *= expf(m - top);
                m = top;
            }
            if (m == -INFINITY) continue;
            float part = 0.0f;
#pragma unroll
            for (int e = 0; e < N; ++e) part += expf(v[e] - m);
            s += part;
        }
    } else {
        for (int i = threadIdx.x; i < vocab; i += blockDim.x) {
            const float v = to_float(lr[i]);
            if (v > m) {
                s *= expf(m - v);
                m = v;
            }
            if (m != -INFINITY) s += expf(v - m);
        }
    }
    block_lse(m, s, scratch);
    if (threadIdx.x == 0) {
        const float lse = logf(s) + m;
        const float w = weights[row];
        const uint32_t target = w != 0.0f ? targets[row] : 0xffffffffu;
        stats[4 * row] = lse;
        stats[4 * row + 1] = w != 0.0f ? (lse - to_float(lr[target])) * w : 0.0f;
        stats[4 * row + 2] = w;
        stats[4 * row + 3] = __uint_as_float(target);
    }
}
// dlogits = (softmax − onehot(target)) · weight, from the lse of the forward.
template <typename T>
__device__ void cross_entropy_backward(const T* logits, const float* stats, T* dlogits, int vocab) {
    const size_t row = blockIdx.x;
    const T* lr = logits + row * vocab;
    T* dr = dlogits + row * vocab;
    const float lse = stats[4 * row];
    const float w = stats[4 * row + 2];
    const uint32_t target = __float_as_uint(stats[4 * row + 3]);
    constexpr int N = Chunk<T>::N;
    if (chunked<T>(vocab, lr, lr, dr, dr)) {
        const uint4* in = reinterpret_cast<const uint4*>(lr);
        uint4* out = reinterpret_cast<uint4*>(dr);
        for (int i = threadIdx.x; i < vocab / N; i += blockDim.x) {
            Chunk<T> c, d;
            c.word = in[i];
#pragma unroll
            for (int e = 0; e < N; ++e) {
                const float p = expf(to_float(c.v[e]) - lse);
                d.v[e] = from_float<T>(w * (p - ((uint32_t)(i * N + e) == target ? 1.0f : 0.0f)));
            }
            out[i] = d.word;
        }
        return;
    }
    for (int i = threadIdx.x; i < vocab; i += blockDim.x) {
        const float p = expf(to_float(lr[i]) - lse);
        dr[i] = from_float<T>(w * (p - ((uint32_t)i == target ? 1.0f : 0.0f)));
    }
}
extern "C" __global__ void cross_entropy_forward_bf16(const bf16* l, const uint32_t* t, const float* w, float* s, int v) { cross_entropy_forward(l, t, w, s, v); }
extern "C" __global__ void cross_entropy_forward_f32(const float* l, const uint32_t* t, const float* w, float* s, int v) { cross_entropy_forward(l, t, w, s, v); }
extern "C" __global__ void cross_entropy_backward_bf16(const bf16* l, const float* s, bf16* d, int v) { cross_entropy_backward(l, s, d, v); }
extern "C" __global__ void cross_entropy_backward_f32(const float* l, const float* s, float* d, int v) { cross_entropy_backward(l, s, d, v); }

// ---------------------------------------------------------------------------------------------
// Softmax over the last dimension after adding a constant f32 mask (attention: scores [B, H, T, S],
// mask [B, 1, T, S] shared by the heads; `mask` may be null). One block per row. The backward
// recomputes the f32 probabilities from the input (never from the rounded output):
// dx = y·(g − Σ g·y).
template <typename T>
__device__ __forceinline__ float masked_value(const T* x, const float* mask, size_t row, int i, int cols, int heads, int length) {
    float v = to_float(x[row * cols + i]);
    if (mask != nullptr) {
        const size_t t = row % length;
        const size_t b = row / ((size_t)length * heads);
        v += mask[(b * length + t) * cols + i];
    }
    return v;
}

template <typename T>
__device__ void masked_softmax_forward(const T* x, const float* mask, T* y, int cols, int heads, int length) {
    __shared__ float scratch[32];
    const size_t row = blockIdx.x;
    float m = -INFINITY;
    for (int i = threadIdx.x; i < cols; i += blockDim.x) m = fmaxf(m, masked_value(x, mask, row, i, cols, heads, length));
    m = block_max(m, scratch);
    float sum = 0.0f;
    for (int i = threadIdx.x; i < cols; i += blockDim.x) sum += expf(masked_value(x, mask, row, i, cols, heads, length) - m);
    sum = block_sum(sum, scratch);
    const float inverse = 1.0f / sum;
    for (int i = threadIdx.x; i < cols; i += blockDim.x)
        y[row * cols + i] = from_float<T>(expf(masked_value(x, mask, row, i, cols, heads, length) - m) * inverse);
}

template <typename T>
__device__ void masked_softmax_backward(const T* x, const float* mask, const T* g, T* dx, int cols, int heads, int length) {
    __shared__ float scratch[32];
    const size_t row = blockIdx.x;
    float m = -INFINITY;
    for (int i = threadIdx.x; i < cols; i += blockDim.x) m = fmaxf(m, masked_value(x, mask, row, i, cols, heads, length));
    m = block_max(m, scratch);
    float sum = 0.0f, dot = 0.0f;
    for (int i = threadIdx.x; i < cols; i += blockDim.x) {
        const float e = expf(masked_value(x, mask, row, i, cols, heads, length) - m);
        sum += e;
        dot += e * to_float(g[row * cols + i]);
    }
    sum = block_sum(sum, scratch);
    dot = block_sum(dot, scratch) / sum;
    const float inverse = 1.0f / sum;
    for (int i = threadIdx.x; i < cols; i += blockDim.x) {
        const float p = expf(masked_value(x, mask, row, i, cols, heads, length) - m) * inverse;
        dx[row * cols + i] = from_float<T>(p * (to_float(g[row * cols + i]) - dot));
    }
}
extern "C" __global__ void masked_softmax_forward_bf16(const bf16* x, const float* m, bf16* y, int c, int h, int l) { masked_softmax_forward(x, m, y, c, h, l); }
extern "C" __global__ void masked_softmax_forward_f32(const float* x, const float* m, float* y, int c, int h, int l) { masked_softmax_forward(x, m, y, c, h, l); }
extern "C" __global__ void masked_softmax_backward_bf16(const bf16* x, const float* m, const bf16* g, bf16* d, int c, int h, int l) { masked_softmax_backward(x, m, g, d, c, h, l); }
extern "C" __global__ void masked_softmax_backward_f32(const float* x, const float* m, const float* g, float* d, int c, int h, int l) { masked_softmax_backward(x, m, g, d, c, h, l); }

// ---------------------------------------------------------------------------------------------
// Multi-tensor AdamW over a list of tensors given as device pointer tables. `offsets` [n + 1] are
// the prefix sums of the element counts; element e belongs to tensor t with offsets[t] ≤ e < offsets[t+1].
__device__ __forceinline__ int find_tensor(const int64_t* offsets, int tensors, int64_t e) {
    int lo = 0, hi = tensors - 1;
    while (lo < hi) {
        const int mid = (lo + hi + 1) >> 1;
        if (offsets[mid] <= e) lo = mid; else hi = mid - 1;
    }
    return lo;
}

// Gradients may be the transposed view of a contiguous buffer (what a matmul's backward gives a
// weight used as wᵀ): `cols[t]` = 0 for a contiguous tensor, else the view's column count C, and
// element j = (r, c) of the [R, C] view lives at c·R + r of the buffer.
__device__ __forceinline__ int64_t source_index(int64_t j, int64_t count, int64_t cols) {
    if (cols == 0) return j;
    const int64_t rows = count / cols;
    return (j % cols) * rows + j / cols;
}

// Multi-tensor cast f32 → bf16: tensor t's offsets[t+1] − offsets[t] contiguous values from src[t]
// to dst[t], rounded to nearest even as candle's cast rounds them (LoRA's factors, cast for the
// products once per forward in one launch instead of one per factor: ops::cast_all).
extern "C" __global__ void multi_cast_f32_bf16(const uint64_t* src, const uint64_t* dst, const int64_t* offsets, int tensors) {
    const int64_t total = offsets[tensors];
    for (int64_t e = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; e < total; e += (int64_t)gridDim.x * blockDim.x) {
        const int t = find_tensor(offsets, tensors, e);
        const int64_t j = e - offsets[t];
        reinterpret_cast<bf16*>(dst[t])[j] = __float2bfloat16_rn(reinterpret_cast<const float*>(src[t])[j]);
    }
}

// Σ g² over all tensors, accumulated in f64 (one atomic per block).
template <typename G>
__device__ void sum_squares(const uint64_t* grads, const int64_t* offsets, int tensors, double* out) {
    __shared__ float scratch[32];
    const int64_t total = offsets[tensors];
    float local = 0.0f;
    for (int64_t e = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; e < total; e += (int64_t)gridDim.x * blockDim.x) {
        const int t = find_tensor(offsets, tensors, e);
        const float g = to_float(reinterpret_cast<const G*>(grads[t])[e - offsets[t]]);
        local += g * g;
    }
    const float block = block_sum(local, scratch);
    if (threadIdx.x == 0) atomicAdd(out, (double)block);
}
extern "C" __global__ void sum_squares_bf16(const uint64_t* g, const int64_t* o, int n, double* out) { sum_squares<bf16>(g, o, n, out); }
extern "C" __global__ void sum_squares_f32(const uint64_t* g, const int64_t* o, int n, double* out) { sum_squares<float>(g, o, n, out); }

// torch's AdamW order: p ← p·decay[t]; m ← m + (1−β1)(g − m); v ← β2·v + (1−β2)·g²;
// p ← p − step_size · m / (sqrt(v)/bc2 + eps). g is scaled by `grad_scale` (clipping) first.
template <typename P>
__device__ void adamw(const uint64_t* params, const uint64_t* grads, const int64_t* grad_cols, const uint64_t* exp_avg, const uint64_t* exp_avg_sq,
                      const float* decay, const int64_t* offsets, int tensors, float grad_scale, float beta1, float beta2,
                      float epsilon, float step_size, float bias_correction2_sqrt) {
    const int64_t total = offsets[tensors];
    for (int64_t e = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; e < total; e += (int64_t)gridDim.x * blockDim.x) {
        const int t = find_tensor(offsets, tensors, e);
        const int64_t j = e - offsets[t];
        P* p = reinterpret_cast<P*>(params[t]);
        const int64_t source = source_index(j, offsets[t + 1] - offsets[t], grad_cols[t]);
        const float g = to_float(reinterpret_cast<const P*>(grads[t])[source]) * grad_scale;
        float* m = reinterpret_cast<float*>(exp_avg[t]);
        float* v = reinterpret_cast<float*>(exp_avg_sq[t]);
        float value = to_float(p[j]) * decay[t];
        const float mj = m[j] + (1.0f - beta1) * (g - m[j]);
        const float vj = beta2 * v[j] + (1.0f - beta2) * g * g;
        m[j] = mj;
        v[j] = vj;
        value -= step_size * (mj / (sqrtf(vj) / bias_correction2_sqrt + epsilon));
        p[j] = from_float<P>(value);
    }
}
extern "C" __global__ void adamw_bf16(const uint64_t* p, const uint64_t* g, const int64_t* gc, const uint64_t* m, const uint64_t* v, const float* d, const int64_t* o, int n,
                                      float s, float b1, float b2, float eps, float step, float bc2) { adamw<bf16>(p, g, gc, m, v, d, o, n, s, b1, b2, eps, step, bc2); }
extern "C" __global__ void adamw_f32(const uint64_t* p, const uint64_t* g, const int64_t* gc, const uint64_t* m, const uint64_t* v, const float* d, const int64_t* o, int n,
                                     float s, float b1, float b2, float eps, float step, float bc2) { adamw<float>(p, g, gc, m, v, d, o, n, s, b1, b2, eps, step, bc2); }
