// Flash-attention-style scaled dot-product attention (forward and backward), compiled to PTX by
// build.rs ($OUT_DIR/flash_attn.ptx) and launched from src/ops/flash.rs. The CPU reference is the
// explicit composition in src/ops/attention.rs (and the op's own CPU loops in src/ops/flash.rs);
// tests/cuda_kernels.rs compares them on fresh random inputs.
//
// Shapes (all contiguous): q, o, dq [B, H, T, D]; k, v, dk, dv [B, KVH, S, D] with H a multiple of
// KVH (query head h reads kv head h / (H/KVH), never copied); valid [B, S] u8 (null = all valid);
// lse, delta [B, H, T] f32. Key j is visible to query i iff valid[b][j] and, when causal,
// j <= offset + i (the queries are the last T of the S keys after `offset` earlier ones). A row
// with no visible key gets output 0, lse -inf, and no gradient.
//
// The kernels are tiled over keys with the online softmax (forward) and FA2's recomputation of P
// from q, k and the saved log-sum-exp (backward: delta = rowsum(dO∘O), then dK/dV per key tile
// summed over the query heads of a group, then dQ per query tile: no atomics, deterministic).
// Three families: `flash_*` (f32 arithmetic on CUDA cores, shared-memory tiles with 16×16 threads
// and register micro-tiles; inputs bf16, f16 or f32), `flash_tc_*` (bf16/f16 on tensor cores,
// nvcuda::wmma with f32 accumulation; namespace tc; kept for comparison, PEFTPIPE_FLASH=wmma) and
// `flash_mma_*` (bf16/f16, FlashAttention-2 style: mma.sync on register fragments, ldmatrix,
// cp.async; namespace fa2; the default; head_dim 128 uses wider per-warp tiles, forward_wide,
// backward_dkdv_wide / backward_dq_wide). head_dim 64 and 128. The backward's delta kernel
// (flash_backward_delta_*) serves all three.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <mma.h>
#include <stdint.h>

typedef __nv_bfloat16 bf16;

namespace {

__device__ __forceinline__ float to_f(float v) { return v; }
__device__ __forceinline__ float to_f(bf16 v) { return __bfloat162float(v); }
__device__ __forceinline__ float to_f(__half v) { return __half2float(v); }
template <typename T> __device__ __forceinline__ T from_f(float v);
template <> __device__ __forceinline__ float from_f<float>(float v) { return v; }
template <> __device__ __forceinline__ bf16 from_f<bf16>(float v) { return __float2bfloat16_rn(v); }
template <> __device__ __forceinline__ __half from_f<__half>(float v) { return __float2half_rn(v); }

constexpr int THREADS = 256;  // 16 × 16
constexpr int PAD = 1;        // odd row strides: column walks hit distinct banks

__device__ __forceinline__ bool visible(const unsigned char* valid_row, int key, int row, int queries,
                                        int keys, int offset, int causal) {
    return row < queries && key < keys && (valid_row == nullptr || valid_row[key] != 0) &&
           (!causal || key <= offset + row);
}

// rows × D elements of `src` (row stride D, `available` rows exist) into `dst` (row stride D + PAD)
// as f32, zero past the end.
template <typename T, int ROWS, int D>
__device__ __forceinline__ void load_tile(float (*dst)[D + PAD], const T* __restrict__ src, int available) {
    for (int index = threadIdx.x; index < ROWS * D; index += THREADS) {
        const int r = index / D, c = index % D;
        dst[r][c] = r < available ? to_f(src[(size_t)r * D + c]) : 0.0f;
    }
}

// ---------------------------------------------------------------------------------------------
// Forward: one block per (query tile, b·H + h).
template <typename T, int D, int BQ, int BK>
__device__ void flash_forward(const T* __restrict__ q, const T* __restrict__ k, const T* __restrict__ v,
                              const unsigned char* __restrict__ valid, T* __restrict__ o,
                              float* __restrict__ lse, int heads, int kv_heads, int queries, int keys,
                              int offset, int causal, float scale) {
    constexpr int RI = BQ / 16, CS = BK / 16, CD = D / 16;
    __shared__ float qs[BQ][D + PAD];
    __shared__ float kvs[BK][D + PAD];
    __shared__ float ss[BQ][BK + PAD];
    __shared__ float row_m[BQ], row_l[BQ], row_alpha[BQ];

    const int tid = threadIdx.x, tx = tid % 16, ty = tid / 16;
    const int warp = tid / 32, lane = tid % 32;
    const int bh = blockIdx.y, b = bh / heads, h = bh % heads;
    const int kvh = h / (heads / kv_heads);
    const int q0 = blockIdx.x * BQ;
    const T* qb = q + ((size_t)bh * queries + q0) * D;
    const T* kb = k + (size_t)(b * kv_heads + kvh) * keys * D;
    const T* vb = v + (size_t)(b * kv_heads + kvh) * keys * D;
    const unsigned char* valid_row = valid ? valid + (size_t)b * keys : nullptr;

    load_tile<T, BQ, D>(qs, qb, queries - q0);
    if (tid < BQ) {
        row_m[tid] = -INFINITY;
        row_l[tid] = 0.0f;
        row_alpha[tid] = 0.0f;
    }
    float acc[RI][CD];
#pragma unroll
    for (int i = 0; i < RI; ++i)
#pragma unroll
        for (int j = 0; j < CD; ++j) acc[i][j] = 0.0f;
    const int last_row = min(q0 + BQ, queries) - 1;
    const int key_end = causal ? min(keys, offset + last_row + 1) : keys;
    __syncthreads();

    for (int k0 = 0; k0 < key_end; k0 += BK) {
        load_tile<T, BK, D>(kvs, kb + (size_t)k0 * D, keys - k0);
        __syncthreads();
        float s[RI][CS];
#pragma unroll
        for (int i = 0; i < RI; ++i)
#pragma unroll
            for (int j = 0; j < CS; ++j) s[i][j] = 0.0f;
#pragma unroll 8
        for (int d = 0; d < D; ++d) {
            float a[RI], bk[CS];
#pragma unroll
            for (int i = 0; i < RI; ++i) a[i] = qs[ty + 16 * i][d];
#pragma unroll
            for (int j = 0; j < CS; ++j) bk[j] = kvs[tx + 16 * j][d];
#pragma unroll
            for (int i = 0; i < RI; ++i)
#pragma unroll
                for (int j = 0; j < CS; ++j) s[i][j] = fmaf(a[i], bk[j], s[i][j]);
        }
#pragma unroll
        for (int i = 0; i < RI; ++i)
#pragma unroll
            for (int j = 0; j < CS; ++j) {
                const int r = ty + 16 * i, c = tx + 16 * j;
                ss[r][c] = visible(valid_row, k0 + c, q0 + r, queries, keys, offset, causal)
                               ? s[i][j] * scale
                               : -INFINITY;
            }
        __syncthreads();
        // Online softmax, one warp per row; then V replaces K in shared memory.
        for (int r = warp; r < BQ; r += THREADS / 32) {
            float mx = -INFINITY;
            for (int c = lane; c < BK; c += 32) mx = fmaxf(mx, ss[r][c]);
#pragma unroll
            for (int step = 16; step > 0; step >>= 1) mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, step));
            const float m_old = row_m[r];
            const float m_new = fmaxf(m_old, mx);
            float sum = 0.0f;
            for (int c = lane; c < BK; c += 32) {
                const float x = ss[r][c];
                const float p = x == -INFINITY ? 0.0f : __expf(x - m_new);
                ss[r][c] = p;
                sum += p;
            }
#pragma unroll
            for (int step = 16; step > 0; step >>= 1) sum += __shfl_xor_sync(0xffffffffu, sum, step);
            if (lane == 0) {
                const float alpha = m_old == -INFINITY ? 0.0f : __expf(m_old - m_new);
                row_alpha[r] = alpha;
                row_l[r] = row_l[r] * alpha + sum;
                row_m[r] = m_new;
            }
        }
        load_tile<T, BK, D>(kvs, vb + (size_t)k0 * D, keys - k0);
        __syncthreads();
#pragma unroll
        for (int i = 0; i < RI; ++i) {
            const float alpha = row_alpha[ty + 16 * i];
#pragma unroll
            for (int j = 0; j < CD; ++j) acc[i][j] *= alpha;
        }
#pragma unroll 4
        for (int c = 0; c < BK; ++c) {
            float p[RI], vv[CD];
#pragma unroll
            for (int i = 0; i < RI; ++i) p[i] = ss[ty + 16 * i][c];
#pragma unroll
            for (int j = 0; j < CD; ++j) vv[j] = kvs[c][tx + 16 * j];
#pragma unroll
            for (int i = 0; i < RI; ++i)
#pragma unroll
                for (int j = 0; j < CD; ++j) acc[i][j] = fmaf(p[i], vv[j], acc[i][j]);
        }
        __syncthreads();
    }
#pragma unroll
    for (int i = 0; i < RI; ++i) {
        const int r = ty + 16 * i;
        if (q0 + r >= queries) continue;
        const float l = row_l[r];
        const float inverse = l > 0.0f ? 1.0f / l : 0.0f;
        T* out = o + ((size_t)bh * queries + q0 + r) * D;
#pragma unroll
        for (int j = 0; j < CD; ++j) out[tx + 16 * j] = from_f<T>(acc[i][j] * inverse);
    }
    if (tid < BQ && q0 + tid < queries) {
        const float l = row_l[tid];
        lse[(size_t)bh * queries + q0 + tid] = l > 0.0f ? row_m[tid] + logf(l) : -INFINITY;
    }
}

// ---------------------------------------------------------------------------------------------
// Backward, step 1: delta[row] = Σ_d dO[row][d]·O[row][d], one warp per row.
template <typename T>
__device__ void flash_backward_delta(const T* __restrict__ o, const T* __restrict__ grad,
                                     float* __restrict__ delta, long long rows, int dim, int heads,
                                     int queries, int bthd) {
    const long long row = (long long)blockIdx.x * (THREADS / 32) + threadIdx.x / 32;
    const int lane = threadIdx.x % 32;
    if (row >= rows) return;
    // `row` is (b·heads + h)·queries + t; o and grad are stored [B, H, T, D] or, with `bthd`,
    // [B, T, H, D] (fa2::row_offset).
    long long at = row * dim;
    if (bthd) {
        const long long bh = row / queries, t = row % queries, b = bh / heads, h = bh % heads;
        at = ((b * queries + t) * heads + h) * dim;
    }
    float sum = 0.0f;
    for (int d = lane; d < dim; d += 32)
        sum += to_f(o[at + d]) * to_f(grad[at + d]);
#pragma unroll
    for (int step = 16; step > 0; step >>= 1) sum += __shfl_xor_sync(0xffffffffu, sum, step);
    if (lane == 0) delta[row] = sum;
}

// S = Q·Kᵀ and dP = dO·Vᵀ for one (query tile, key tile) pair, then P = exp(S·scale − lse) and
// dS = P∘(dP − delta) (unscaled) into `ps` / `ds` (rows: queries, cols: keys).
template <int D, int BQ, int BK>
__device__ __forceinline__ void probabilities_and_ds(
    const float (*qs)[D + PAD], const float (*dos)[D + PAD], const float (*ks)[D + PAD],
    const float (*vs)[D + PAD], const float* lse_s, const float* delta_s, float (*ps)[BK + PAD],
    float (*ds)[BK + PAD], const unsigned char* valid_row, int q0, int k0, int queries, int keys,
    int offset, int causal, float scale) {
    constexpr int RI = BQ / 16, CS = BK / 16;
    const int tx = threadIdx.x % 16, ty = threadIdx.x / 16;
    float s[RI][CS], dp[RI][CS];
#pragma unroll
    for (int i = 0; i < RI; ++i)
#pragma unroll
        for (int j = 0; j < CS; ++j) s[i][j] = dp[i][j] = 0.0f;
#pragma unroll 8
    for (int d = 0; d < D; ++d) {
        float a[RI], g[RI], bk[CS], bv[CS];
#pragma unroll
        for (int i = 0; i < RI; ++i) {
            a[i] = qs[ty + 16 * i][d];
            g[i] = dos[ty + 16 * i][d];
        }
#pragma unroll
        for (int j = 0; j < CS; ++j) {
            bk[j] = ks[tx + 16 * j][d];
            bv[j] = vs[tx + 16 * j][d];
        }
#pragma unroll
        for (int i = 0; i < RI; ++i)
#pragma unroll
            for (int j = 0; j < CS; ++j) {
                s[i][j] = fmaf(a[i], bk[j], s[i][j]);
                dp[i][j] = fmaf(g[i], bv[j], dp[i][j]);
            }
    }
#pragma unroll
    for (int i = 0; i < RI; ++i)
#pragma unroll
        for (int j = 0; j < CS; ++j) {
            const int r = ty + 16 * i, c = tx + 16 * j;
            const bool seen = visible(valid_row, k0 + c, q0 + r, queries, keys, offset, causal);
            const float p = seen ? __expf(s[i][j] * scale - lse_s[r]) : 0.0f;
            ps[r][c] = p;
            ds[r][c] = seen ? p * (dp[i][j] - delta_s[r]) : 0.0f;
        }
}

// Backward, step 2: dK, dV for one key tile of one kv head, over every query head of its group
// and every query tile that can see it. One block per (key tile, b·KVH + kvh).
template <typename T, int D, int BQ, int BK>
__device__ void flash_backward_dkdv(const T* __restrict__ q, const T* __restrict__ k,
                                    const T* __restrict__ v, const unsigned char* __restrict__ valid,
                                    const T* __restrict__ grad, const float* __restrict__ lse,
                                    const float* __restrict__ delta, T* __restrict__ dk,
                                    T* __restrict__ dv, int heads, int kv_heads, int queries, int keys,
                                    int offset, int causal, float scale) {
    constexpr int RK = BK / 16, CD = D / 16;
    __shared__ float ks[BK][D + PAD];
    __shared__ float vs[BK][D + PAD];
    __shared__ float qs[BQ][D + PAD];
    __shared__ float dos[BQ][D + PAD];
    __shared__ float ps[BQ][BK + PAD];
    __shared__ float ds[BQ][BK + PAD];
    __shared__ float lse_s[BQ], delta_s[BQ];

    const int tid = threadIdx.x, tx = tid % 16, ty = tid / 16;
    const int bkv = blockIdx.y, b = bkv / kv_heads, kvh = bkv % kv_heads;
    const int group = heads / kv_heads;
    const int k0 = blockIdx.x * BK;
    const unsigned char* valid_row = valid ? valid + (size_t)b * keys : nullptr;
    load_tile<T, BK, D>(ks, k + ((size_t)bkv * keys + k0) * D, keys - k0);
    load_tile<T, BK, D>(vs, v + ((size_t)bkv * keys + k0) * D, keys - k0);
    float acc_dk[RK][CD], acc_dv[RK][CD];
#pragma unroll
    for (int i = 0; i < RK; ++i)
#pragma unroll
        for (int j = 0; j < CD; ++j) acc_dk[i][j] = acc_dv[i][j] = 0.0f;
    // The first query that can see key k0 is k0 − offset.
    const int first_query = causal ? max(0, k0 - offset) : 0;
    const int q_start = (first_query / BQ) * BQ;

    for (int g = 0; g < group; ++g) {
        const int bh = b * heads + kvh * group + g;
        for (int q0 = q_start; q0 < queries; q0 += BQ) {
            __syncthreads();  // the previous pass is done with qs/dos/ps/ds
            load_tile<T, BQ, D>(qs, q + ((size_t)bh * queries + q0) * D, queries - q0);
            load_tile<T, BQ, D>(dos, grad + ((size_t)bh * queries + q0) * D, queries - q0);
            if (tid < BQ) {
                const bool inside = q0 + tid < queries;
                const float l = inside ? lse[(size_t)bh * queries + q0 + tid] : -INFINITY;
                lse_s[tid] = l == -INFINITY ? 0.0f : l;  // no visible key: P is 0 anyway
                delta_s[tid] = inside ? delta[(size_t)bh * queries + q0 + tid] : 0.0f;
            }
            __syncthreads();
            probabilities_and_ds<D, BQ, BK>(qs, dos, ks, vs, lse_s, delta_s, ps, ds, valid_row, q0, k0,
                                            queries, keys, offset, causal, scale);
            __syncthreads();
            // dV += Pᵀ·dO, dK += dSᵀ·Q (rows: keys ty + 16i, cols: d tx + 16j).
#pragma unroll 4
            for (int r = 0; r < BQ; ++r) {
                float p[RK], dsv[RK], g_row[CD], q_row[CD];
#pragma unroll
                for (int i = 0; i < RK; ++i) {
                    p[i] = ps[r][ty + 16 * i];
                    dsv[i] = ds[r][ty + 16 * i];
                }
#pragma unroll
                for (int j = 0; j < CD; ++j) {
                    g_row[j] = dos[r][tx + 16 * j];
                    q_row[j] = qs[r][tx + 16 * j];
                }
#pragma unroll
                for (int i = 0; i < RK; ++i)
#pragma unroll
                    for (int j = 0; j < CD; ++j) {
                        acc_dv[i][j] = fmaf(p[i], g_row[j], acc_dv[i][j]);
                        acc_dk[i][j] = fmaf(dsv[i], q_row[j], acc_dk[i][j]);
                    }
            }
        }
    }
#pragma unroll
    for (int i = 0; i < RK; ++i) {
        const int r = ty + 16 * i;
        if (k0 + r >= keys) continue;
        const size_t base = ((size_t)bkv * keys + k0 + r) * D;
#pragma unroll
        for (int j = 0; j < CD; ++j) {
            dk[base + tx + 16 * j] = from_f<T>(acc_dk[i][j] * scale);
            dv[base + tx + 16 * j] = from_f<T>(acc_dv[i][j]);
        }
    }
}

// Backward, step 3: dQ for one query tile, over the key tiles it can see. One block per
// (query tile, b·H + h).
template <typename T, int D, int BQ, int BK>
__device__ void flash_backward_dq(const T* __restrict__ q, const T* __restrict__ k,
                                  const T* __restrict__ v, const unsigned char* __restrict__ valid,
                                  const T* __restrict__ grad, const float* __restrict__ lse,
                                  const float* __restrict__ delta, T* __restrict__ dq, int heads,
                                  int kv_heads, int queries, int keys, int offset, int causal,
                                  float scale) {
    constexpr int RI = BQ / 16, CD = D / 16;
    __shared__ float qs[BQ][D + PAD];
    __shared__ float dos[BQ][D + PAD];
    __shared__ float ks[BK][D + PAD];
    __shared__ float vs[BK][D + PAD];
    __shared__ float ps[BQ][BK + PAD];
    __shared__ float ds[BQ][BK + PAD];
    __shared__ float lse_s[BQ], delta_s[BQ];

    const int tid = threadIdx.x, tx = tid % 16, ty = tid / 16;
    const int bh = blockIdx.y, b = bh / heads, h = bh % heads;
    const int kvh = h / (heads / kv_heads);
    const int q0 = blockIdx.x * BQ;
    const size_t kv_base = (size_t)(b * kv_heads + kvh) * keys * D;
    const unsigned char* valid_row = valid ? valid + (size_t)b * keys : nullptr;
    load_tile<T, BQ, D>(qs, q + ((size_t)bh * queries + q0) * D, queries - q0);
    load_tile<T, BQ, D>(dos, grad + ((size_t)bh * queries + q0) * D, queries - q0);
    if (tid < BQ) {
        const bool inside = q0 + tid < queries;
        const float l = inside ? lse[(size_t)bh * queries + q0 + tid] : -INFINITY;
        lse_s[tid] = l == -INFINITY ? 0.0f : l;
        delta_s[tid] = inside ? delta[(size_t)bh * queries + q0 + tid] : 0.0f;
    }
    float acc[RI][CD];
#pragma unroll
    for (int i = 0; i < RI; ++i)
#pragma unroll
        for (int j = 0; j < CD; ++j) acc[i][j] = 0.0f;
    const int last_row = min(q0 + BQ, queries) - 1;
    const int key_end = causal ? min(keys, offset + last_row + 1) : keys;

    for (int k0 = 0; k0 < key_end; k0 += BK) {
        __syncthreads();  // the previous pass is done with ks/vs/ds
        load_tile<T, BK, D>(ks, k + kv_base + (size_t)k0 * D, keys - k0);
        load_tile<T, BK, D>(vs, v + kv_base + (size_t)k0 * D, keys - k0);
        __syncthreads();
        probabilities_and_ds<D, BQ, BK>(qs, dos, ks, vs, lse_s, delta_s, ps, ds, valid_row, q0, k0,
                                        queries, keys, offset, causal, scale);
        __syncthreads();
        // dQ += dS·K (rows: queries ty + 16i, cols: d tx + 16j).
#pragma unroll 4
        for (int c = 0; c < BK; ++c) {
            float dsv[RI], k_row[CD];
#pragma unroll
            for (int i = 0; i < RI; ++i) dsv[i] = ds[ty + 16 * i][c];
#pragma unroll
            for (int j = 0; j < CD; ++j) k_row[j] = ks[c][tx + 16 * j];
#pragma unroll
            for (int i = 0; i < RI; ++i)
#pragma unroll
                for (int j = 0; j < CD; ++j) acc[i][j] = fmaf(dsv[i], k_row[j], acc[i][j]);
        }
    }
#pragma unroll
    for (int i = 0; i < RI; ++i) {
        const int r = ty + 16 * i;
        if (q0 + r >= queries) continue;
        T* out = dq + ((size_t)bh * queries + q0 + r) * D;
#pragma unroll
        for (int j = 0; j < CD; ++j) out[tx + 16 * j] = from_f<T>(acc[i][j] * scale);
    }
}


// ---------------------------------------------------------------------------------------------
// Tensor-core variants for bf16/f16 (nvcuda::wmma 16×16×16, f32 accumulation): the same
// algorithms, with the tiles kept in the input type in shared memory, every tile product on
// tensor cores, and P / dS rounded to the input type as the operand of the second product (as
// FlashAttention-2 does). Row strides are padded by 8 elements (16 bytes), which keeps every
// 16-row / 16-column fragment pointer 32-byte aligned.
namespace tc {
using namespace nvcuda;

constexpr int HPAD = 8;  // 16-bit tiles
constexpr int FPAD = 4;  // f32 tiles

typedef wmma::fragment<wmma::accumulator, 16, 16, 16, float> Acc;

// ROWS × D elements of `src` (row stride D) into `dst` (row stride D + HPAD), 16 bytes at a
// time; zero past `available` rows. D is a multiple of 8 and `src` 16-byte aligned.
template <typename T, int ROWS, int D>
__device__ __forceinline__ void load_tile(T (*dst)[D + HPAD], const T* __restrict__ src, int available) {
    constexpr int CHUNKS = D / 8;
    for (int index = threadIdx.x; index < ROWS * CHUNKS; index += THREADS) {
        const int r = index / CHUNKS, c = (index % CHUNKS) * 8;
        uint4 value = make_uint4(0, 0, 0, 0);
        if (r < available) value = *reinterpret_cast<const uint4*>(src + (size_t)r * D + c);
        *reinterpret_cast<uint4*>(&dst[r][c]) = value;
    }
}

// out[m0.., n0..] (16×16, f32, row stride ldo) = A·B over K, A row-major (lda), B given by
// `B_LAYOUT` (ldb); `a` and `b` point at the block's first row / column.
template <typename T, typename B_LAYOUT, int K>
__device__ __forceinline__ void block_product(Acc& acc, const T* a, int lda, const T* b, int ldb, int b_step) {
    wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::row_major> fa;
    wmma::fragment<wmma::matrix_b, 16, 16, 16, T, B_LAYOUT> fb;
#pragma unroll
    for (int k = 0; k < K; k += 16) {
        wmma::load_matrix_sync(fa, a + k, lda);
        wmma::load_matrix_sync(fb, b + (size_t)k * b_step, ldb);
        wmma::mma_sync(acc, fa, fb, acc);
    }
}

// Forward: as flash_forward, S = Q·Kᵀ and P·V on tensor cores.
template <typename T, int D, int BQ, int BK>
__device__ void forward(const T* __restrict__ q, const T* __restrict__ k, const T* __restrict__ v,
                        const unsigned char* __restrict__ valid, T* __restrict__ o, float* __restrict__ lse,
                        int heads, int kv_heads, int queries, int keys, int offset, int causal, float scale) {
    constexpr int RI = BQ / 16, CD = D / 16;
    constexpr int LS = BK + FPAD, LO = D + FPAD;
    constexpr int SCRATCH = BQ * LS > BQ * LO ? BQ * LS : BQ * LO;
    __shared__ __align__(32) T qs[BQ][D + HPAD];
    __shared__ __align__(32) T ks[BK][D + HPAD];
    __shared__ __align__(32) T vs[BK][D + HPAD];
    __shared__ __align__(32) T ps[BQ][BK + HPAD];
    __shared__ __align__(32) float scratch[SCRATCH];  // S (BQ × LS), then P·V (BQ × LO)
    __shared__ float row_m[BQ], row_l[BQ], row_alpha[BQ];

    const int tid = threadIdx.x, tx = tid % 16, ty = tid / 16;
    const int warp = tid / 32, lane = tid % 32;
    const int bh = blockIdx.y, b = bh / heads, h = bh % heads;
    const int kvh = h / (heads / kv_heads);
    const int q0 = blockIdx.x * BQ;
    const T* kb = k + (size_t)(b * kv_heads + kvh) * keys * D;
    const T* vb = v + (size_t)(b * kv_heads + kvh) * keys * D;
    const unsigned char* valid_row = valid ? valid + (size_t)b * keys : nullptr;

    load_tile<T, BQ, D>(qs, q + ((size_t)bh * queries + q0) * D, queries - q0);
    if (tid < BQ) {
        row_m[tid] = -INFINITY;
        row_l[tid] = 0.0f;
        row_alpha[tid] = 0.0f;
    }
    float acc[RI][CD];
#pragma unroll
    for (int i = 0; i < RI; ++i)
#pragma unroll
        for (int j = 0; j < CD; ++j) acc[i][j] = 0.0f;
    const int last_row = min(q0 + BQ, queries) - 1;
    const int key_end = causal ? min(keys, offset + last_row + 1) : keys;

    for (int k0 = 0; k0 < key_end; k0 += BK) {
        __syncthreads();  // the previous tile is done with ks, vs, ps, scratch
        load_tile<T, BK, D>(ks, kb + (size_t)k0 * D, keys - k0);
        load_tile<T, BK, D>(vs, vb + (size_t)k0 * D, keys - k0);
        __syncthreads();
        // S blocks (BQ/16 × BK/16), one per warp in turn; Kᵀ is K read column-major.
        for (int block = warp; block < (BQ / 16) * (BK / 16); block += THREADS / 32) {
            const int m0 = (block / (BK / 16)) * 16, n0 = (block % (BK / 16)) * 16;
            Acc s;
            wmma::fill_fragment(s, 0.0f);
            block_product<T, wmma::col_major, D>(s, &qs[m0][0], D + HPAD, &ks[n0][0], D + HPAD, 1);
            wmma::store_matrix_sync(scratch + m0 * LS + n0, s, LS, wmma::mem_row_major);
        }
        __syncthreads();
        for (int r = warp; r < BQ; r += THREADS / 32) {
            float x[(BK + 31) / 32];
            float mx = -INFINITY;
#pragma unroll
            for (int t = 0; t < (BK + 31) / 32; ++t) {
                const int c = lane + 32 * t;
                x[t] = -INFINITY;
                if (c < BK && visible(valid_row, k0 + c, q0 + r, queries, keys, offset, causal))
                    x[t] = scratch[r * LS + c] * scale;
                mx = fmaxf(mx, x[t]);
            }
#pragma unroll
            for (int step = 16; step > 0; step >>= 1) mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, step));
            const float m_old = row_m[r];
            const float m_new = fmaxf(m_old, mx);
            float sum = 0.0f;
#pragma unroll
            for (int t = 0; t < (BK + 31) / 32; ++t) {
                const int c = lane + 32 * t;
                const float p = x[t] == -INFINITY ? 0.0f : __expf(x[t] - m_new);
                if (c < BK) ps[r][c] = from_f<T>(p);
                sum += p;
            }
#pragma unroll
            for (int step = 16; step > 0; step >>= 1) sum += __shfl_xor_sync(0xffffffffu, sum, step);
            if (lane == 0) {
                const float alpha = m_old == -INFINITY ? 0.0f : __expf(m_old - m_new);
                row_alpha[r] = alpha;
                row_l[r] = row_l[r] * alpha + sum;
                row_m[r] = m_new;
            }
        }
        __syncthreads();
        // P·V blocks (BQ/16 × D/16) into scratch (S is consumed).
        for (int block = warp; block < (BQ / 16) * (D / 16); block += THREADS / 32) {
            const int m0 = (block / (D / 16)) * 16, n0 = (block % (D / 16)) * 16;
            Acc pv;
            wmma::fill_fragment(pv, 0.0f);
            block_product<T, wmma::row_major, BK>(pv, &ps[m0][0], BK + HPAD, &vs[0][n0], D + HPAD, D + HPAD);
            wmma::store_matrix_sync(scratch + m0 * LO + n0, pv, LO, wmma::mem_row_major);
        }
        __syncthreads();
#pragma unroll
        for (int i = 0; i < RI; ++i) {
            const int r = ty + 16 * i;
            const float alpha = row_alpha[r];
#pragma unroll
            for (int j = 0; j < CD; ++j) acc[i][j] = acc[i][j] * alpha + scratch[r * LO + tx + 16 * j];
        }
    }
    __syncthreads();
#pragma unroll
    for (int i = 0; i < RI; ++i) {
        const int r = ty + 16 * i;
        if (q0 + r >= queries) continue;
        const float l = row_l[r];
        const float inverse = l > 0.0f ? 1.0f / l : 0.0f;
        T* out = o + ((size_t)bh * queries + q0 + r) * D;
#pragma unroll
        for (int j = 0; j < CD; ++j) out[tx + 16 * j] = from_f<T>(acc[i][j] * inverse);
    }
    if (tid < BQ && q0 + tid < queries) {
        const float l = row_l[tid];
        lse[(size_t)bh * queries + q0 + tid] = l > 0.0f ? row_m[tid] + logf(l) : -INFINITY;
    }
}

// S = Q·Kᵀ and dP = dO·Vᵀ (tensor cores) into f32 `sf` / `dpf`, then P and dS = P∘(dP − δ)
// (unscaled) in the input type into `ps` / `ds` (rows: queries, cols: keys). Ends synchronised.
template <typename T, int D, int BQ, int BK>
__device__ __forceinline__ void probabilities_and_ds(
    T (*qs)[D + HPAD], T (*dos)[D + HPAD], T (*ks)[D + HPAD], T (*vs)[D + HPAD], const float* lse_s,
    const float* delta_s, float* sf, float* dpf, T (*ps)[BK + HPAD], T (*ds)[BK + HPAD],
    const unsigned char* valid_row, int q0, int k0, int queries, int keys, int offset, int causal,
    float scale) {
    constexpr int LS = BK + FPAD;
    constexpr int BLOCKS = (BQ / 16) * (BK / 16);
    const int warp = threadIdx.x / 32;
    for (int job = warp; job < 2 * BLOCKS; job += THREADS / 32) {
        const int block = job % BLOCKS;
        const int m0 = (block / (BK / 16)) * 16, n0 = (block % (BK / 16)) * 16;
        Acc acc;
        wmma::fill_fragment(acc, 0.0f);
        if (job < BLOCKS) {
            block_product<T, wmma::col_major, D>(acc, &qs[m0][0], D + HPAD, &ks[n0][0], D + HPAD, 1);
            wmma::store_matrix_sync(sf + m0 * LS + n0, acc, LS, wmma::mem_row_major);
        } else {
            block_product<T, wmma::col_major, D>(acc, &dos[m0][0], D + HPAD, &vs[n0][0], D + HPAD, 1);
            wmma::store_matrix_sync(dpf + m0 * LS + n0, acc, LS, wmma::mem_row_major);
        }
    }
    __syncthreads();
    for (int index = threadIdx.x; index < BQ * BK; index += THREADS) {
        const int r = index / BK, c = index % BK;
        const bool seen = visible(valid_row, k0 + c, q0 + r, queries, keys, offset, causal);
        const float p = seen ? __expf(sf[r * LS + c] * scale - lse_s[r]) : 0.0f;
        ps[r][c] = from_f<T>(p);
        ds[r][c] = from_f<T>(seen ? p * (dpf[r * LS + c] - delta_s[r]) : 0.0f);
    }
    __syncthreads();
}

// Per-warp staging of an accumulator block to global memory in the input type, times `factor`,
// rows past `rows_left` skipped. `stage` is this warp's 16 × 16 f32 scratch.
template <typename T>
__device__ __forceinline__ void store_block(T* dst, int ld, Acc& acc, float factor, int rows_left, float* stage) {
    wmma::store_matrix_sync(stage, acc, 16, wmma::mem_row_major);
    __syncwarp();
    const int lane = threadIdx.x % 32;
    for (int e = lane; e < 256; e += 32) {
        const int r = e / 16, c = e % 16;
        if (r < rows_left) dst[(size_t)r * ld + c] = from_f<T>(stage[e] * factor);
    }
    __syncwarp();
}

// dK, dV for one key tile of one kv head (as flash_backward_dkdv), accumulated in fragments.
template <typename T, int D, int BQ, int BK>
__device__ void backward_dkdv(const T* __restrict__ q, const T* __restrict__ k, const T* __restrict__ v,
                              const unsigned char* __restrict__ valid, const T* __restrict__ grad,
                              const float* __restrict__ lse, const float* __restrict__ delta,
                              T* __restrict__ dk, T* __restrict__ dv, int heads, int kv_heads, int queries,
                              int keys, int offset, int causal, float scale) {
    constexpr int LS = BK + FPAD;
    constexpr int BLOCKS = (BK / 16) * (D / 16);
    constexpr int PER_WARP = (BLOCKS + THREADS / 32 - 1) / (THREADS / 32);
    __shared__ __align__(32) T ks[BK][D + HPAD];
    __shared__ __align__(32) T vs[BK][D + HPAD];
    __shared__ __align__(32) T qs[BQ][D + HPAD];
    __shared__ __align__(32) T dos[BQ][D + HPAD];
    __shared__ __align__(32) T ps[BQ][BK + HPAD];
    __shared__ __align__(32) T ds[BQ][BK + HPAD];
    __shared__ __align__(32) float sf[BQ * LS];
    __shared__ __align__(32) float dpf[BQ * LS];
    __shared__ __align__(32) float stage[THREADS / 32][256];
    __shared__ float lse_s[BQ], delta_s[BQ];

    const int tid = threadIdx.x, warp = tid / 32;
    const int bkv = blockIdx.y, b = bkv / kv_heads, kvh = bkv % kv_heads;
    const int group = heads / kv_heads;
    const int k0 = blockIdx.x * BK;
    const unsigned char* valid_row = valid ? valid + (size_t)b * keys : nullptr;
    load_tile<T, BK, D>(ks, k + ((size_t)bkv * keys + k0) * D, keys - k0);
    load_tile<T, BK, D>(vs, v + ((size_t)bkv * keys + k0) * D, keys - k0);
    Acc acc_dk[PER_WARP], acc_dv[PER_WARP];
#pragma unroll
    for (int t = 0; t < PER_WARP; ++t) {
        wmma::fill_fragment(acc_dk[t], 0.0f);
        wmma::fill_fragment(acc_dv[t], 0.0f);
    }
    const int first_query = causal ? max(0, k0 - offset) : 0;
    const int q_start = (first_query / BQ) * BQ;

    for (int g = 0; g < group; ++g) {
        const int bh = b * heads + kvh * group + g;
        for (int q0 = q_start; q0 < queries; q0 += BQ) {
            __syncthreads();
            load_tile<T, BQ, D>(qs, q + ((size_t)bh * queries + q0) * D, queries - q0);
            load_tile<T, BQ, D>(dos, grad + ((size_t)bh * queries + q0) * D, queries - q0);
            if (tid < BQ) {
                const bool inside = q0 + tid < queries;
                const float l = inside ? lse[(size_t)bh * queries + q0 + tid] : -INFINITY;
                lse_s[tid] = l == -INFINITY ? 0.0f : l;
                delta_s[tid] = inside ? delta[(size_t)bh * queries + q0 + tid] : 0.0f;
            }
            __syncthreads();
            probabilities_and_ds<T, D, BQ, BK>(qs, dos, ks, vs, lse_s, delta_s, sf, dpf, ps, ds, valid_row,
                                               q0, k0, queries, keys, offset, causal, scale);
            // dV += Pᵀ·dO and dK += dSᵀ·Q: Pᵀ is P read column-major.
#pragma unroll
            for (int t = 0; t < PER_WARP; ++t) {
                const int block = warp + t * (THREADS / 32);
                if (block >= BLOCKS) break;
                const int m0 = (block / (D / 16)) * 16, n0 = (block % (D / 16)) * 16;
                wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::col_major> fa;
                wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::row_major> fb;
#pragma unroll
                for (int kk = 0; kk < BQ; kk += 16) {
                    wmma::load_matrix_sync(fa, &ps[kk][m0], BK + HPAD);
                    wmma::load_matrix_sync(fb, &dos[kk][n0], D + HPAD);
                    wmma::mma_sync(acc_dv[t], fa, fb, acc_dv[t]);
                    wmma::load_matrix_sync(fa, &ds[kk][m0], BK + HPAD);
                    wmma::load_matrix_sync(fb, &qs[kk][n0], D + HPAD);
                    wmma::mma_sync(acc_dk[t], fa, fb, acc_dk[t]);
                }
            }
        }
    }
#pragma unroll
    for (int t = 0; t < PER_WARP; ++t) {
        const int block = warp + t * (THREADS / 32);
        if (block >= BLOCKS) break;
        const int m0 = (block / (D / 16)) * 16, n0 = (block % (D / 16)) * 16;
        const size_t base = ((size_t)bkv * keys + k0 + m0) * D + n0;
        store_block<T>(dk + base, D, acc_dk[t], scale, keys - k0 - m0, stage[warp]);
        store_block<T>(dv + base, D, acc_dv[t], 1.0f, keys - k0 - m0, stage[warp]);
    }
}

// dQ for one query tile (as flash_backward_dq), accumulated in fragments.
template <typename T, int D, int BQ, int BK>
__device__ void backward_dq(const T* __restrict__ q, const T* __restrict__ k, const T* __restrict__ v,
                            const unsigned char* __restrict__ valid, const T* __restrict__ grad,
                            const float* __restrict__ lse, const float* __restrict__ delta, T* __restrict__ dq,
                            int heads, int kv_heads, int queries, int keys, int offset, int causal, float scale) {
    constexpr int LS = BK + FPAD;
    constexpr int BLOCKS = (BQ / 16) * (D / 16);
    constexpr int PER_WARP = (BLOCKS + THREADS / 32 - 1) / (THREADS / 32);
    __shared__ __align__(32) T qs[BQ][D + HPAD];
    __shared__ __align__(32) T dos[BQ][D + HPAD];
    __shared__ __align__(32) T ks[BK][D + HPAD];
    __shared__ __align__(32) T vs[BK][D + HPAD];
    __shared__ __align__(32) T ps[BQ][BK + HPAD];
    __shared__ __align__(32) T ds[BQ][BK + HPAD];
    __shared__ __align__(32) float sf[BQ * LS];
    __shared__ __align__(32) float dpf[BQ * LS];
    __shared__ __align__(32) float stage[THREADS / 32][256];
    __shared__ float lse_s[BQ], delta_s[BQ];

    const int tid = threadIdx.x, warp = tid / 32;
    const int bh = blockIdx.y, b = bh / heads, h = bh % heads;
    const int kvh = h / (heads / kv_heads);
    const int q0 = blockIdx.x * BQ;
    const size_t kv_base = (size_t)(b * kv_heads + kvh) * keys * D;
    const unsigned char* valid_row = valid ? valid + (size_t)b * keys : nullptr;
    load_tile<T, BQ, D>(qs, q + ((size_t)bh * queries + q0) * D, queries - q0);
    load_tile<T, BQ, D>(dos, grad + ((size_t)bh * queries + q0) * D, queries - q0);
    if (tid < BQ) {
        const bool inside = q0 + tid < queries;
        const float l = inside ? lse[(size_t)bh * queries + q0 + tid] : -INFINITY;
        lse_s[tid] = l == -INFINITY ? 0.0f : l;
        delta_s[tid] = inside ? delta[(size_t)bh * queries + q0 + tid] : 0.0f;
    }
    Acc acc[PER_WARP];
#pragma unroll
    for (int t = 0; t < PER_WARP; ++t) wmma::fill_fragment(acc[t], 0.0f);
    const int last_row = min(q0 + BQ, queries) - 1;
    const int key_end = causal ? min(keys, offset + last_row + 1) : keys;

    for (int k0 = 0; k0 < key_end; k0 += BK) {
        __syncthreads();
        load_tile<T, BK, D>(ks, k + kv_base + (size_t)k0 * D, keys - k0);
        load_tile<T, BK, D>(vs, v + kv_base + (size_t)k0 * D, keys - k0);
        __syncthreads();
        probabilities_and_ds<T, D, BQ, BK>(qs, dos, ks, vs, lse_s, delta_s, sf, dpf, ps, ds, valid_row, q0,
                                           k0, queries, keys, offset, causal, scale);
        // dQ += dS·K.
#pragma unroll
        for (int t = 0; t < PER_WARP; ++t) {
            const int block = warp + t * (THREADS / 32);
            if (block >= BLOCKS) break;
            const int m0 = (block / (D / 16)) * 16, n0 = (block % (D / 16)) * 16;
            block_product<T, wmma::row_major, BK>(acc[t], &ds[m0][0], BK + HPAD, &ks[0][n0], D + HPAD, D + HPAD);
        }
    }
#pragma unroll
    for (int t = 0; t < PER_WARP; ++t) {
        const int block = warp + t * (THREADS / 32);
        if (block >= BLOCKS) break;
        const int m0 = (block / (D / 16)) * 16, n0 = (block % (D / 16)) * 16;
        store_block<T>(dq + ((size_t)bh * queries + q0 + m0) * D + n0, D, acc[t], scale, queries - q0 - m0,
                       stage[warp]);
    }
}

}  // namespace tc

// ---------------------------------------------------------------------------------------------
// FlashAttention-2-style kernels for bf16/f16 (namespace fa2): mma.sync.m16n8k16 with f32
// accumulation on fragments held in registers, operands fetched from shared memory by ldmatrix,
// tiles brought in by cp.async (zero-filled past the end) overlapped with the math, online softmax
// on the accumulator fragments with exp2 and a log2(e)-prescaled scale. 4 warps (128 threads) per
// block, each warp owning 16 rows of its block's tile; dynamic shared memory (sizes in
// fa2::*_smem below, mirrored in src/ops/flash.rs, checked at entry).
//
// Fragment layouts (PTX ISA, "Matrix Fragments for mma.m16n8k16 with floating point type"), with
// lane = 0..31, g = lane / 4 (groupID), t = lane % 4 (threadID_in_group):
//   A (16×16, row-major, 4 × .b32 = 8 × 16-bit):
//     a[0] = A[g    ][2t, 2t+1]     a[1] = A[g + 8][2t, 2t+1]
//     a[2] = A[g    ][2t+8, 2t+9]   a[3] = A[g + 8][2t+8, 2t+9]
//   B (16×8, K × N, "col": 2 × .b32):
//     b[0] = B[2t, 2t+1][g]         b[1] = B[2t+8, 2t+9][g]
//   C/D (16×8 f32, 4 floats):
//     c[0], c[1] = C[g][2t], C[g][2t+1]      c[2], c[3] = C[g + 8][2t], C[g + 8][2t+1]
//   (in every .b32 the lower-indexed element sits in the low 16 bits).
// ldmatrix.m8n8.x4.b16: lanes 8i..8i+7 give the addresses of rows 0..7 of matrix i; register i
// of lane l receives matrix i's row l / 4, columns 2(l % 4), 2(l % 4) + 1; with .trans it receives
// rows 2(l % 4), 2(l % 4) + 1 of column l / 4 instead (the transposed 8×8 matrix).
// Consequences used below (all tiles row-major in shared memory, row stride LD elements):
//   * A from rows [m0, m0+16) × cols [k0, k0+16): lane l addresses row m0 + l % 16, column
//     k0 + 8 (l / 16): matrices (rows 0-7, cols 0-7), (8-15, 0-7), (0-7, 8-15), (8-15, 8-15)
//     = a[0..3].
//   * B = Xᵀ where X is stored [n][k] (K for S = Q·Kᵀ): B[k][n] = X[n][k], so b[0] of the n-block
//     at n0 is X[n0 + g][k0 + 2t, +1] = the plain 8×8 matrix X[n0..+8][k0..+8]. Two n-blocks per
//     x4: matrix i = l / 8 is X rows n0 + 8 (i / 2) + l % 8, columns k0 + 8 (i % 2): registers
//     (b[0], b[1]) of n-block n0, then of n-block n0 + 8.
//   * B = X where X is stored [k][n] (V for O = P·V): b[0] of n-block n0 is X[k0 + 2t, +1][n0 + g],
//     the .trans load of X[k0..+8][n0..+8]. Matrix i is X rows k0 + 8 (i % 2) + l % 8, columns
//     n0 + 8 (i / 2): (b[0], b[1]) of n-block n0, then of n-block n0 + 8.
//   * A from an accumulator (P = softmax(S) as the A operand of P·V): the C fragments of n-blocks
//     2kk and 2kk+1 are exactly the A fragment of k-block kk: a[0] = (c[0], c[1]) of n-block 2kk,
//     a[1] = (c[2], c[3]) of 2kk, a[2] = (c[0], c[1]) of 2kk+1, a[3] = (c[2], c[3]) of 2kk+1.
// Rows are padded by SPAD = 8 elements (16 bytes): a row stride of 144 or 272 bytes puts the 8 rows
// an ldmatrix phase reads in 8 distinct 16-byte bank groups.
namespace fa2 {

constexpr int WARPS = 4;
constexpr int NT = 32 * WARPS;
constexpr int SPAD = 8;
constexpr float LOG2E = 1.4426950408889634f;

// Tiles: d64 forward BQ × BK = 64 × 64; d64 dK/dV 64 keys × 64 queries, dQ 64 × 64 (forward,
// backward_dkdv and backward_dq also take d128, with 32-query dK/dV tiles: the d128 kernels before
// the wide ones below, kept for comparison in benches/gpu/flash_bench.cu); d128: WIDE_* below.
constexpr int FWD_BQ = 64, FWD_BK = 64;
constexpr int BWD_BK = 64;
template <int D> __host__ __device__ constexpr int dkdv_bq() { return D == 64 ? 64 : 32; }
constexpr int DQ_BQ = 64, DQ_BK = 64;

// Dynamic shared memory of each kernel in bytes (16-bit elements); src/ops/flash.rs has the same.
template <int D> __host__ __device__ constexpr int forward_smem() { return (FWD_BQ + 2 * FWD_BK) * (D + SPAD) * 2 + FWD_BK; }
template <int D> __host__ __device__ constexpr int dkdv_smem() {
    return (2 * BWD_BK + 4 * dkdv_bq<D>()) * (D + SPAD) * 2 + 4 * dkdv_bq<D>() * 4 + BWD_BK;
}
template <int D> __host__ __device__ constexpr int dq_smem() { return (2 * DQ_BQ + 4 * DQ_BK) * (D + SPAD) * 2 + 2 * DQ_BK; }

// ---- fa2 primitives (the only inline PTX; everything below them is plain CUDA C++) ----
__device__ __forceinline__ uint32_t smem_address(const void* pointer) {
    return static_cast<uint32_t>(__cvta_generic_to_shared(pointer));
}

// A launch with less dynamic shared memory than the kernel lays out is a bug on the host side:
// trap (a launch error) rather than scribble over shared memory.
__device__ __forceinline__ void require_smem(int bytes) {
    uint32_t available;
    asm volatile("mov.u32 %0, %%dynamic_smem_size;" : "=r"(available));
    if (available < static_cast<uint32_t>(bytes)) __trap();
}

// 16 bytes global → shared, asynchronously; `fill` false writes 16 zero bytes and reads nothing.
__device__ __forceinline__ void cp_async16(void* dst, const void* src, bool fill) {
    const int bytes = fill ? 16 : 0;
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(smem_address(dst)), "l"(src),
                 "r"(bytes)
                 : "memory");
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::: "memory"); }
template <int N> __device__ __forceinline__ void cp_async_wait() {
    asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
}

__device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], const void* pointer) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(smem_address(pointer)));
}
__device__ __forceinline__ void ldmatrix_x4_trans(uint32_t (&r)[4], const void* pointer) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(smem_address(pointer)));
}

// c += a·b on one m16n8k16 tile (f32 accumulation).
template <typename T>
__device__ __forceinline__ void mma(float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1);
template <>
__device__ __forceinline__ void mma<bf16>(float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, "
        "{%8, %9}, {%0, %1, %2, %3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}
template <>
__device__ __forceinline__ void mma<__half>(float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, "
        "{%8, %9}, {%0, %1, %2, %3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

// Two floats as one .b32 of the input type, `lo` in the low half.
template <typename T> __device__ __forceinline__ uint32_t pack(float lo, float hi);
template <> __device__ __forceinline__ uint32_t pack<bf16>(float lo, float hi) {
    __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);  // .x = lo (low 16 bits)
    return *reinterpret_cast<uint32_t*>(&v);
}
template <> __device__ __forceinline__ uint32_t pack<__half>(float lo, float hi) {
    __half2 v = __floats2half2_rn(lo, hi);  // .x = lo (low 16 bits)
    return *reinterpret_cast<uint32_t*>(&v);
}

// 2^x with subnormal results flushed to zero (one MUFU.EX2; exp2f adds a range fix-up around it).
__device__ __forceinline__ float exp2_ftz(float x) {
    float y;
    asm("ex2.approx.ftz.f32 %0, %1;\n" : "=f"(y) : "f"(x));
    return y;
}

// ---- end of fa2 primitives ----

// ROWS × D elements of `src` (row stride `stride`, `available` rows exist, src 16-byte aligned and
// pointing at an existing row) into `dst` (row stride D + SPAD), zero rows past `available`.
// THREADS_ threads (the block) share the copy.
template <typename T, int ROWS, int D, int THREADS_ = NT>
__device__ __forceinline__ void load_rows(T* dst, const T* __restrict__ src, int available, int stride) {
    constexpr int CHUNKS = D / 8;
    static_assert((ROWS * CHUNKS) % THREADS_ == 0, "every thread copies the same number of chunks");
#pragma unroll
    for (int pass = 0; pass < ROWS * CHUNKS / THREADS_; ++pass) {
        const int index = threadIdx.x + pass * THREADS_;
        const int r = index / CHUNKS, c = (index % CHUNKS) * 8;
        const bool inside = r < available;
        cp_async16(dst + r * (D + SPAD) + c, inside ? src + (size_t)r * stride + c : src, inside);
    }
}

// acc (16 × N, N/8 C fragments) += A · Xᵀ over K: A = this warp's 16 rows at `a` (row-major,
// stride LD), X = N rows at `x` (row-major [n][k], stride LD). S = Q·Kᵀ, dP = dO·Vᵀ, and their
// transposes K·Qᵀ, V·dOᵀ.
template <typename T, int K, int N, int LD>
__device__ __forceinline__ void gemm_xt(float (&acc)[N / 8][4], const T* a, const T* x) {
    const int lane = threadIdx.x % 32;
    const T* a_lane = a + (lane % 16) * LD + (lane / 16) * 8;
    const int i = lane / 8;
    const T* x_lane = x + (8 * (i / 2) + lane % 8) * LD + 8 * (i % 2);
#pragma unroll
    for (int kk = 0; kk < K / 16; ++kk) {
        uint32_t fa[4];
        ldmatrix_x4(fa, a_lane + kk * 16);
#pragma unroll
        for (int nn = 0; nn < N / 16; ++nn) {
            uint32_t fb[4];
            ldmatrix_x4(fb, x_lane + nn * 16 * LD + kk * 16);
            mma<T>(acc[2 * nn], fa, fb[0], fb[1]);
            mma<T>(acc[2 * nn + 1], fa, fb[2], fb[3]);
        }
    }
}

// acc (16 × N) += P · X over K: P (16 × K) given as the K/8 C fragments `p` of this warp
// (rounded to T here), X = K rows at `x` (row-major [k][n], stride LD). O += P·V, dV += Pᵀ·dO,
// dK += dSᵀ·Q, dQ += dS·K.
template <typename T, int K, int N, int LD>
__device__ __forceinline__ void gemm_px(float (&acc)[N / 8][4], const float (&p)[K / 8][4], const T* x) {
    const int lane = threadIdx.x % 32;
    const int i = lane / 8;
    const T* x_lane = x + (8 * (i % 2) + lane % 8) * LD + 8 * (i / 2);
#pragma unroll
    for (int kk = 0; kk < K / 16; ++kk) {
        uint32_t fa[4];
        fa[0] = pack<T>(p[2 * kk][0], p[2 * kk][1]);
        fa[1] = pack<T>(p[2 * kk][2], p[2 * kk][3]);
        fa[2] = pack<T>(p[2 * kk + 1][0], p[2 * kk + 1][1]);
        fa[3] = pack<T>(p[2 * kk + 1][2], p[2 * kk + 1][3]);
#pragma unroll
        for (int nn = 0; nn < N / 16; ++nn) {
            uint32_t fb[4];
            ldmatrix_x4_trans(fb, x_lane + kk * 16 * LD + nn * 16);
            mma<T>(acc[2 * nn], fa, fb[0], fb[1]);
            mma<T>(acc[2 * nn + 1], fa, fb[2], fb[3]);
        }
    }
}

// This warp's 16 × D accumulator (rows `row0 + r` relative to `dst`, which has row stride
// `stride`) to global memory in T, times `factor`, rows at or past `rows_left` skipped.
template <typename T, int D>
__device__ __forceinline__ void store_rows(T* dst, const float (&acc)[D / 8][4], float factor0, float factor1,
                                           int rows_left, int stride) {
    const int lane = threadIdx.x % 32, g = lane / 4, t = lane % 4;
#pragma unroll
    for (int half = 0; half < 2; ++half) {
        const int r = g + 8 * half;
        if (r >= rows_left) continue;
        const float factor = half == 0 ? factor0 : factor1;
        T* row = dst + (size_t)r * stride + 2 * t;
#pragma unroll
        for (int j = 0; j < D / 8; ++j)
            *reinterpret_cast<uint32_t*>(row + 8 * j) =
                pack<T>(acc[j][2 * half] * factor, acc[j][2 * half + 1] * factor);
    }
}

// Element offset of row `t` of head `h` of batch `b` of a logical [B, heads, length, D] tensor
// stored as [B, heads, length, D] (`bthd` 0: row stride D) or as [B, length, heads, D] (`bthd` 1:
// row stride heads·D, the layout of a projection's [B, T, heads·D] output, read without a copy).
__device__ __forceinline__ size_t row_offset(int b, int h, int t, int heads, int length, int d, int bthd) {
    return bthd ? (((size_t)b * length + t) * heads + h) * d : (((size_t)b * heads + h) * length + t) * d;
}
__device__ __forceinline__ int row_stride(int heads, int d, int bthd) { return bthd ? heads * d : d; }

template <int N> __device__ __forceinline__ void zero(float (&acc)[N][4]) {
#pragma unroll
    for (int j = 0; j < N; ++j)
#pragma unroll
        for (int e = 0; e < 4; ++e) acc[j][e] = 0.0f;
}

// The (query tile, b·H + h) of this block, for a grid of (query tiles, B·H) blocks. Under causal
// the last query tiles see the most keys and start first, over all heads: blocks in launch order
// walk the heads fastest and the tiles from the last down (with the tile as blockIdx.x alone, every
// head's heavy tile would start right after the previous head's light ones, and the heavy tiles of
// the last heads would start late and run alone at the end of the grid).
struct TileHead {
    int tile, bh;
};
template <bool GLOBAL_ORDER = true> __device__ __forceinline__ TileHead query_tile_order(int causal) {
    if (!causal) return {(int)blockIdx.x, (int)blockIdx.y};
    if (!GLOBAL_ORDER) return {(int)(gridDim.x - 1 - blockIdx.x), (int)blockIdx.y};
    const int linear = blockIdx.y * gridDim.x + blockIdx.x;
    return {(int)(gridDim.x - 1 - linear / gridDim.y), (int)(linear % gridDim.y)};
}

// Forward: one block per (64-query tile, b·H + h); warp w owns queries q0 + 16w .. q0 + 16w + 15.
// Per key tile: S = Q·Kᵀ (V streaming in meanwhile), mask, online softmax in registers, then
// O += P·V (the next K streaming in meanwhile).
template <typename T, int D, bool GLOBAL_ORDER = true>
__device__ void forward(const T* __restrict__ q, const T* __restrict__ k, const T* __restrict__ v,
                        const unsigned char* __restrict__ valid, T* __restrict__ o, float* __restrict__ lse,
                        int heads, int kv_heads, int queries, int keys, int offset, int causal, float scale,
                        int q_bthd, int kv_bthd) {
    constexpr int BQ = FWD_BQ, BK = FWD_BK, LD = D + SPAD;
    require_smem(forward_smem<D>());
    extern __shared__ __align__(16) unsigned char smem[];
    T* qs = reinterpret_cast<T*>(smem);
    T* ks = qs + BQ * LD;
    T* vs = ks + BK * LD;
    unsigned char* key_ok = reinterpret_cast<unsigned char*>(vs + BK * LD);

    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, g = lane / 4, t = lane % 4;
    // Causal: the last query tiles see the most keys; they start first (the light tiles fill the
    // tail of the grid instead of a heavy one running alone at its end).
    const TileHead order = query_tile_order<GLOBAL_ORDER>(causal);
    const int bh = order.bh, b = bh / heads, h = bh % heads;
    const int kvh = h / (heads / kv_heads);
    const int q0 = order.tile * BQ;
    const int warp_q0 = q0 + 16 * warp;  // this warp's first query
    const int qst = row_stride(heads, D, q_bthd), kst = row_stride(kv_heads, D, kv_bthd);
    const T* kb = k + row_offset(b, kvh, 0, kv_heads, keys, D, kv_bthd);
    const T* vb = v + row_offset(b, kvh, 0, kv_heads, keys, D, kv_bthd);
    const unsigned char* valid_row = valid ? valid + (size_t)b * keys : nullptr;
    const int last_row = min(q0 + BQ, queries) - 1;
    const int key_end = causal ? min(keys, offset + last_row + 1) : keys;
    const float scale_log2 = scale * LOG2E;

    load_rows<T, BQ, D>(qs, q + row_offset(b, h, q0, heads, queries, D, q_bthd), queries - q0, qst);
    if (key_end > 0) load_rows<T, BK, D>(ks, kb, keys, kst);
    cp_async_commit();

    float acc[D / 8][4];
    zero(acc);
    float row_max[2] = {-INFINITY, -INFINITY};  // raw (unscaled) running maxima of rows g, g + 8
    float row_sum[2] = {0.0f, 0.0f};            // this thread's share of the rows' sums

    for (int k0 = 0; k0 < key_end; k0 += BK) {
        if (valid_row)
            for (int c = threadIdx.x; c < BK; c += NT) key_ok[c] = k0 + c < keys ? valid_row[k0 + c] : 0;
        cp_async_wait<0>();
        __syncthreads();  // K (and Q) landed, key_ok written; every warp is done with V and key_ok
        load_rows<T, BK, D>(vs, vb + (size_t)k0 * kst, keys - k0, kst);
        cp_async_commit();

        float s[BK / 8][4];
        zero(s);
        gemm_xt<T, D, BK, LD>(s, qs + 16 * warp * LD, ks);
        // Masking where some key of the tile may be invisible to some row of this warp.
        const bool mask = valid_row != nullptr || k0 + BK > keys || (causal && k0 + BK - 1 > offset + warp_q0);
        if (mask) {
#pragma unroll
            for (int j = 0; j < BK / 8; ++j)
#pragma unroll
                for (int e = 0; e < 4; ++e) {
                    const int c = 8 * j + 2 * t + (e & 1), key = k0 + c;
                    const int row = warp_q0 + g + 8 * (e >> 1);
                    const bool seen = key < keys && (valid_row == nullptr || key_ok[c] != 0) &&
                                      (!causal || key <= offset + row);
                    if (!seen) s[j][e] = -INFINITY;
                }
        }
        // Online softmax: rows g (e = 0, 1) and g + 8 (e = 2, 3); a row lives in one quad.
#pragma unroll
        for (int half = 0; half < 2; ++half) {
            float mx = row_max[half];
#pragma unroll
            for (int j = 0; j < BK / 8; ++j) mx = fmaxf(mx, fmaxf(s[j][2 * half], s[j][2 * half + 1]));
            mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
            mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
            // Nothing visible yet: every p is exp2(-inf) = 0 with any finite subtrahend.
            const float m_scaled = mx == -INFINITY ? 0.0f : mx * scale_log2;
            const float alpha = row_max[half] == -INFINITY ? 0.0f : exp2f(row_max[half] * scale_log2 - m_scaled);
            row_max[half] = mx;
            row_sum[half] *= alpha;
#pragma unroll
            for (int j = 0; j < D / 8; ++j) {
                acc[j][2 * half] *= alpha;
                acc[j][2 * half + 1] *= alpha;
            }
#pragma unroll
            for (int j = 0; j < BK / 8; ++j)
#pragma unroll
                for (int e = 2 * half; e < 2 * half + 2; ++e) {
                    const float p = exp2f(fmaf(s[j][e], scale_log2, -m_scaled));
                    s[j][e] = p;
                    row_sum[half] += p;
                }
        }
        cp_async_wait<0>();
        __syncthreads();  // V landed; every warp is done with K
        if (k0 + BK < key_end) load_rows<T, BK, D>(ks, kb + (size_t)(k0 + BK) * kst, keys - k0 - BK, kst);
        cp_async_commit();
        gemm_px<T, BK, D, LD>(acc, s, vs);
    }
    cp_async_wait<0>();

    float inverse[2];
#pragma unroll
    for (int half = 0; half < 2; ++half) {
        float l = row_sum[half];
        l += __shfl_xor_sync(0xffffffffu, l, 1);
        l += __shfl_xor_sync(0xffffffffu, l, 2);
        inverse[half] = l > 0.0f ? 1.0f / l : 0.0f;
        const int row = warp_q0 + g + 8 * half;
        if (t == 0 && row < queries)
            lse[(size_t)bh * queries + row] = l > 0.0f ? row_max[half] * scale + logf(l) : -INFINITY;
    }
    store_rows<T, D>(o + row_offset(b, h, warp_q0, heads, queries, D, q_bthd), acc, inverse[0], inverse[1],
                     queries - warp_q0, qst);
}

// dK, dV for one 64-key tile of one kv head, over every query head of its group and every query
// tile that can see it; warp w owns keys k0 + 16w .. k0 + 16w + 15 and computes the transposed
// products Sᵀ = K·Qᵀ, dPᵀ = V·dOᵀ, so Pᵀ and dSᵀ come out as A operands of dV += Pᵀ·dO and
// dK += dSᵀ·Q. Query tiles are double-buffered: the next (head, tile) streams in while the current
// one is used. One block per (key tile, b·KVH + kvh).
template <typename T, int D>
__device__ void backward_dkdv(const T* __restrict__ q, const T* __restrict__ k, const T* __restrict__ v,
                              const unsigned char* __restrict__ valid, const T* __restrict__ grad,
                              const float* __restrict__ lse, const float* __restrict__ delta,
                              T* __restrict__ dk, T* __restrict__ dv, int heads, int kv_heads, int queries,
                              int keys, int offset, int causal, float scale, int q_bthd, int kv_bthd) {
    constexpr int BQ = dkdv_bq<D>(), BK = BWD_BK, LD = D + SPAD;
    require_smem(dkdv_smem<D>());
    extern __shared__ __align__(16) unsigned char smem[];
    T* ks = reinterpret_cast<T*>(smem);
    T* vs = ks + BK * LD;
    T* qs0 = vs + BK * LD;       // qs[buffer] = qs0 + buffer · 2·BQ·LD, dos[buffer] = qs[buffer] + BQ·LD
    float* lse0 = reinterpret_cast<float*>(qs0 + 4 * BQ * LD);  // lse·log2(e) [buffer][BQ], then delta
    unsigned char* key_ok = reinterpret_cast<unsigned char*>(lse0 + 4 * BQ);

    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, g = lane / 4, t = lane % 4;
    const int bkv = blockIdx.y, b = bkv / kv_heads, kvh = bkv % kv_heads;
    const int group = heads / kv_heads;
    const int k0 = blockIdx.x * BK;
    const int warp_k0 = k0 + 16 * warp;
    const unsigned char* valid_row = valid ? valid + (size_t)b * keys : nullptr;
    const float scale_log2 = scale * LOG2E;
    // The first query that can see key k0 is k0 − offset.
    const int first_query = causal ? max(0, k0 - offset) : 0;
    const int q_start = (first_query / BQ) * BQ;
    const int tiles = queries > q_start ? (queries - q_start + BQ - 1) / BQ : 0;
    const int steps = group * tiles;

    const int qst = row_stride(heads, D, q_bthd), kst = row_stride(kv_heads, D, kv_bthd);
    const size_t k_row0 = row_offset(b, kvh, k0, kv_heads, keys, D, kv_bthd);
    load_rows<T, BK, D>(ks, k + k_row0, keys - k0, kst);
    load_rows<T, BK, D>(vs, v + k_row0, keys - k0, kst);
    for (int c = threadIdx.x; c < BK; c += NT)
        key_ok[c] = k0 + c < keys && (valid_row == nullptr || valid_row[k0 + c] != 0);
    // Step `step` = (head kvh·group + step / tiles, query tile q_start + BQ·(step % tiles)) into
    // `buffer`: Q and dO by cp.async, lse·log2(e) (+inf where the row sees nothing or does not
    // exist: P = 0 there) and delta by plain stores.
    auto issue = [&](int step, int buffer) {
        const int h = kvh * group + step / tiles, bh = b * heads + h;
        const int tile_q0 = q_start + BQ * (step % tiles);
        T* qs = qs0 + buffer * 2 * BQ * LD;
        const size_t q_row0 = row_offset(b, h, tile_q0, heads, queries, D, q_bthd);
        load_rows<T, BQ, D>(qs, q + q_row0, queries - tile_q0, qst);
        load_rows<T, BQ, D>(qs + BQ * LD, grad + q_row0, queries - tile_q0, qst);
        float* lse_s = lse0 + buffer * 2 * BQ;
        for (int r = threadIdx.x; r < BQ; r += NT) {
            const bool inside = tile_q0 + r < queries;
            const float l = inside ? lse[(size_t)bh * queries + tile_q0 + r] : -INFINITY;
            lse_s[r] = l == -INFINITY ? INFINITY : l * LOG2E;
            lse_s[BQ + r] = inside ? delta[(size_t)bh * queries + tile_q0 + r] : 0.0f;
        }
    };
    if (steps > 0) issue(0, 0);
    cp_async_commit();

    float acc_dk[D / 8][4], acc_dv[D / 8][4];
    zero(acc_dk);
    zero(acc_dv);
    for (int step = 0; step < steps; ++step) {
        const int buffer = step & 1;
        if (step + 1 < steps) {
            issue(step + 1, buffer ^ 1);
            cp_async_commit();
            cp_async_wait<1>();
        } else {
            cp_async_wait<0>();
        }
        __syncthreads();  // this step's tiles (and K, V, key_ok) landed
        const int tile_q0 = q_start + BQ * (step % tiles);
        const T* qs = qs0 + buffer * 2 * BQ * LD;
        const T* dos = qs + BQ * LD;
        const float* lse_s = lse0 + buffer * 2 * BQ;
        const float* delta_s = lse_s + BQ;

        float s[BQ / 8][4], dp[BQ / 8][4];  // Sᵀ, dPᵀ: rows = keys g, g + 8; columns = queries
        zero(s);
        zero(dp);
        gemm_xt<T, D, BQ, LD>(s, ks + 16 * warp * LD, qs);
        gemm_xt<T, D, BQ, LD>(dp, vs + 16 * warp * LD, dos);
        const bool mask = valid_row != nullptr || k0 + BK > keys || (causal && warp_k0 + 15 > offset + tile_q0);
#pragma unroll
        for (int j = 0; j < BQ / 8; ++j)
#pragma unroll
            for (int e = 0; e < 4; ++e) {
                const int c = 8 * j + 2 * t + (e & 1);  // query tile_q0 + c
                const int r = 16 * warp + g + 8 * (e >> 1);  // key k0 + r
                float p = exp2f(fmaf(s[j][e], scale_log2, -lse_s[c]));
                if (mask && !(key_ok[r] && (!causal || k0 + r <= offset + tile_q0 + c))) p = 0.0f;
                s[j][e] = p;
                dp[j][e] = p * (dp[j][e] - delta_s[c]);
            }
        gemm_px<T, BQ, D, LD>(acc_dv, s, dos);
        gemm_px<T, BQ, D, LD>(acc_dk, dp, qs);
        __syncthreads();  // every warp is done with this buffer before step + 2 refills it
    }
    cp_async_wait<0>();
    const size_t base = row_offset(b, kvh, warp_k0, kv_heads, keys, D, kv_bthd);
    store_rows<T, D>(dk + base, acc_dk, scale, scale, keys - warp_k0, kst);
    store_rows<T, D>(dv + base, acc_dv, 1.0f, 1.0f, keys - warp_k0, kst);
}

// dQ for one 64-query tile over the key tiles it can see; warp w owns queries q0 + 16w ..
// q0 + 16w + 15. K/V tiles are double-buffered. One block per (query tile, b·H + h).
template <typename T, int D, bool GLOBAL_ORDER = true>
__device__ void backward_dq(const T* __restrict__ q, const T* __restrict__ k, const T* __restrict__ v,
                            const unsigned char* __restrict__ valid, const T* __restrict__ grad,
                            const float* __restrict__ lse, const float* __restrict__ delta, T* __restrict__ dq,
                            int heads, int kv_heads, int queries, int keys, int offset, int causal, float scale,
                            int q_bthd, int kv_bthd) {
    constexpr int BQ = DQ_BQ, BK = DQ_BK, LD = D + SPAD;
    require_smem(dq_smem<D>());
    extern __shared__ __align__(16) unsigned char smem[];
    T* qs = reinterpret_cast<T*>(smem);
    T* dos = qs + BQ * LD;
    T* ks0 = dos + BQ * LD;  // ks[buffer] = ks0 + buffer · 2·BK·LD, vs[buffer] = ks[buffer] + BK·LD
    unsigned char* key_ok0 = reinterpret_cast<unsigned char*>(ks0 + 4 * BK * LD);  // [buffer][BK]

    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, g = lane / 4, t = lane % 4;
    const TileHead order = query_tile_order<GLOBAL_ORDER>(causal);  // heavy tiles first
    const int bh = order.bh, b = bh / heads, h = bh % heads;
    const int kvh = h / (heads / kv_heads);
    const int q0 = order.tile * BQ;
    const int warp_q0 = q0 + 16 * warp;
    const int qst = row_stride(heads, D, q_bthd), kst = row_stride(kv_heads, D, kv_bthd);
    const T* kb = k + row_offset(b, kvh, 0, kv_heads, keys, D, kv_bthd);
    const T* vb = v + row_offset(b, kvh, 0, kv_heads, keys, D, kv_bthd);
    const unsigned char* valid_row = valid ? valid + (size_t)b * keys : nullptr;
    const float scale_log2 = scale * LOG2E;
    const int last_row = min(q0 + BQ, queries) - 1;
    const int key_end = causal ? min(keys, offset + last_row + 1) : keys;
    const int steps = (key_end + BK - 1) / BK;

    auto issue = [&](int step, int buffer) {
        const int tile_k0 = step * BK;
        T* ks = ks0 + buffer * 2 * BK * LD;
        load_rows<T, BK, D>(ks, kb + (size_t)tile_k0 * kst, keys - tile_k0, kst);
        load_rows<T, BK, D>(ks + BK * LD, vb + (size_t)tile_k0 * kst, keys - tile_k0, kst);
        unsigned char* key_ok = key_ok0 + buffer * BK;
        for (int c = threadIdx.x; c < BK; c += NT)
            key_ok[c] = tile_k0 + c < keys && (valid_row == nullptr || valid_row[tile_k0 + c] != 0);
    };
    const size_t q_row0 = row_offset(b, h, q0, heads, queries, D, q_bthd);
    load_rows<T, BQ, D>(qs, q + q_row0, queries - q0, qst);
    load_rows<T, BQ, D>(dos, grad + q_row0, queries - q0, qst);
    if (steps > 0) issue(0, 0);
    cp_async_commit();
    // Rows g and g + 8 of this warp: lse·log2(e) (+inf: no visible key or no such row → P = 0), delta.
    float lse_row[2], delta_row[2];
#pragma unroll
    for (int half = 0; half < 2; ++half) {
        const int row = warp_q0 + g + 8 * half;
        const bool inside = row < queries;
        const float l = inside ? lse[(size_t)bh * queries + row] : -INFINITY;
        lse_row[half] = l == -INFINITY ? INFINITY : l * LOG2E;
        delta_row[half] = inside ? delta[(size_t)bh * queries + row] : 0.0f;
    }

    float acc[D / 8][4];
    zero(acc);
    for (int step = 0; step < steps; ++step) {
        const int buffer = step & 1;
        if (step + 1 < steps) {
            issue(step + 1, buffer ^ 1);
            cp_async_commit();
            cp_async_wait<1>();
        } else {
            cp_async_wait<0>();
        }
        __syncthreads();  // this step's K, V, key_ok (and Q, dO) landed
        const int k0 = step * BK;
        const T* ks = ks0 + buffer * 2 * BK * LD;
        const T* vs = ks + BK * LD;
        const unsigned char* key_ok = key_ok0 + buffer * BK;

        float s[BK / 8][4], dp[BK / 8][4];
        zero(s);
        zero(dp);
        gemm_xt<T, D, BK, LD>(s, qs + 16 * warp * LD, ks);
        gemm_xt<T, D, BK, LD>(dp, dos + 16 * warp * LD, vs);
        const bool mask = valid_row != nullptr || k0 + BK > keys || (causal && k0 + BK - 1 > offset + warp_q0);
#pragma unroll
        for (int j = 0; j < BK / 8; ++j)
#pragma unroll
            for (int e = 0; e < 4; ++e) {
                const int c = 8 * j + 2 * t + (e & 1);  // key k0 + c
                const int half = e >> 1;
                const int row = warp_q0 + g + 8 * half;
                float p = exp2f(fmaf(s[j][e], scale_log2, -lse_row[half]));
                if (mask && !(key_ok[c] && (!causal || k0 + c <= offset + row))) p = 0.0f;
                s[j][e] = p * (dp[j][e] - delta_row[half]);  // dS
            }
        gemm_px<T, BK, D, LD>(acc, s, ks);
        __syncthreads();  // every warp is done with this buffer before step + 2 refills it
    }
    cp_async_wait<0>();
    store_rows<T, D>(dq + row_offset(b, h, warp_q0, heads, queries, D, q_bthd), acc, scale, scale,
                     queries - warp_q0, qst);
}

// ---- head_dim 128 backward with larger per-warp tiles (the d128 entry points) ----
// backward_dkdv / backward_dq above (d64; also what d128 ran before) give each warp 16 rows of
// its block's tile and take every other operand from shared memory, so an ldmatrix.x4 feeds at
// most two mma: ≈ 0.63 ldmatrix per mma for d128 dK/dV (and every warp re-reads the whole Q/dO
// tile). The two below give each warp 32 rows of every product (and, for dK/dV, half of the head
// dimension), ≈ 0.44 (dK/dV) and 0.42 (dQ) ldmatrix per mma. Register budget: 128 f32
// accumulators per thread (dK + dV, or dQ) plus 64 for S and dP; both kernels use 255 registers
// (ptxas, sm_90: dK/dV spills 4 bytes, dQ none), hence 8 warps per SM. Summation orders over keys
// and queries are the same as the previous kernels' (16-row mma steps in increasing order, heads
// in order), so on the H200 benchmark the gradients are bitwise equal to theirs.
//
// dK/dV (backward_dkdv_wide): one block of 8 warps (256 threads) per (128-key tile,
// b·KVH + kvh), looping over the query heads of the group and their 64-query tiles that can see
// the keys (Q, dO by cp.async, double-buffered; lse and delta loaded into registers a step ahead
// and stored after the step's math, so no warp waits on them). Warp w = (wk = w % 4, wq = w / 4):
//   phase 1: Sᵀ = K·Qᵀ and dPᵀ = V·dOᵀ for keys 32wk.. × queries 32wq.. (32 + 32 floats), then
//            Pᵀ and dSᵀ = Pᵀ∘(dPᵀ − δ) rounded to T into shared memory ([128 keys][64 + 8]);
//   phase 2: dV += Pᵀ·dO and dK += dSᵀ·Q for keys 32wk.. × head columns 64wq.. (64 + 64 floats).
// Two __syncthreads per query tile. Blocks in launch order walk the kv heads fastest, so the heavy
// key tiles (the first ones, under causal) start first. Shared memory 177,280 bytes: one block
// per SM.
//
// dQ (backward_dq_wide): one block of 4 warps per (128-query tile, b·H + h); warp w owns queries
// q0 + 32w .. + 31 and all D columns of dQ (128 floats); K and V come in 32-key tiles,
// double-buffered; a warp skips the key tiles it cannot see (causal). Heavy query tiles first
// over all heads (query_tile_order). Shared memory 104,512 bytes: two blocks per SM.
//
// Both use ex2.approx.ftz (exp2f adds a range fix-up around MUFU.EX2; P below 2^-126 is 0 here)
// and read the per-row / per-key values of the softmax into registers once per tile.
// Measured on the H200 at Llama-3.1-8B's shape (B 1, H 32, KVH 8, T = S = 4096, causal; 32 layers,
// benches/gpu/flash_bench.cu): dK/dV 62.4 → 30.5 ms per step (141 → 289 TFLOP/s), dQ 36.2 → 20.1
// ms (182 → 327 TFLOP/s). Tried and not kept (no faster): a barrier of the two warps sharing Pᵀ
// rows instead of the second __syncthreads; S and dP computed in one interleaved pass; dQ with 8
// warps and 256-query tiles (one block per SM: 25.1 ms per step against 20.1).
constexpr int WIDE_DKDV_NT = 256, WIDE_BK = 128, WIDE_BQ = 64, WIDE_LDP = WIDE_BQ + SPAD;
constexpr int WIDE_DQ_NT = 128, WIDE_DQ_BQ = 128, WIDE_DQ_BK = 32;
template <int D> __host__ __device__ constexpr int dkdv_wide_smem() {
    return (2 * WIDE_BK + 4 * WIDE_BQ) * (D + SPAD) * 2 + 2 * WIDE_BK * WIDE_LDP * 2 + 4 * WIDE_BQ * 4 + WIDE_BK;
}
template <int D> __host__ __device__ constexpr int dq_wide_smem() {
    return (2 * WIDE_DQ_BQ + 4 * WIDE_DQ_BK) * (D + SPAD) * 2 + 2 * WIDE_DQ_BK;
}

// acc (16·MB × 16·NB C fragments: acc[m][n], n-blocks of 8) += A · Xᵀ over K: A = 16·MB rows at
// `a` (row-major, stride LDA), X = 16·NB rows at `x` (row-major [n][k], stride LDX).
template <typename T, int MB, int NB, int K, int LDA, int LDX>
__device__ __forceinline__ void wide_gemm_xt(float (&acc)[MB][2 * NB][4], const T* a, const T* x) {
    const int lane = threadIdx.x % 32;
    const T* a_lane = a + (lane % 16) * LDA + (lane / 16) * 8;
    const int i = lane / 8;
    const T* x_lane = x + (8 * (i / 2) + lane % 8) * LDX + 8 * (i % 2);
#pragma unroll
    for (int kk = 0; kk < K / 16; ++kk) {
        uint32_t fa[MB][4];
#pragma unroll
        for (int m = 0; m < MB; ++m) ldmatrix_x4(fa[m], a_lane + m * 16 * LDA + kk * 16);
#pragma unroll
        for (int nn = 0; nn < NB; ++nn) {
            uint32_t fb[4];
            ldmatrix_x4(fb, x_lane + nn * 16 * LDX + kk * 16);
#pragma unroll
            for (int m = 0; m < MB; ++m) {
                mma<T>(acc[m][2 * nn], fa[m], fb[0], fb[1]);
                mma<T>(acc[m][2 * nn + 1], fa[m], fb[2], fb[3]);
            }
        }
    }
}

// acc (16·MB × 16·NB) += A · X over K: A = 16·MB rows at `a` in shared memory (row-major [m][k],
// stride LDA), X = K rows at `x` (row-major [k][n], stride LDX).
template <typename T, int MB, int NB, int K, int LDA, int LDX>
__device__ __forceinline__ void wide_gemm_ax(float (&acc)[MB][2 * NB][4], const T* a, const T* x) {
    const int lane = threadIdx.x % 32;
    const T* a_lane = a + (lane % 16) * LDA + (lane / 16) * 8;
    const int i = lane / 8;
    const T* x_lane = x + (8 * (i % 2) + lane % 8) * LDX + 8 * (i / 2);
#pragma unroll
    for (int kk = 0; kk < K / 16; ++kk) {
        uint32_t fa[MB][4];
#pragma unroll
        for (int m = 0; m < MB; ++m) ldmatrix_x4(fa[m], a_lane + m * 16 * LDA + kk * 16);
#pragma unroll
        for (int nn = 0; nn < NB; ++nn) {
            uint32_t fb[4];
            ldmatrix_x4_trans(fb, x_lane + kk * 16 * LDX + nn * 16);
#pragma unroll
            for (int m = 0; m < MB; ++m) {
                mma<T>(acc[m][2 * nn], fa[m], fb[0], fb[1]);
                mma<T>(acc[m][2 * nn + 1], fa[m], fb[2], fb[3]);
            }
        }
    }
}

// acc (16·MB × 16·NB) += P · X over K: P (16·MB × K) given as C fragments p[m][K/8] of this warp
// (rounded to T here), X = K rows at `x` (row-major [k][n], stride LDX).
template <typename T, int MB, int NB, int K, int LDX>
__device__ __forceinline__ void wide_gemm_px(float (&acc)[MB][2 * NB][4], const float (&p)[MB][K / 8][4],
                                             const T* x) {
    const int lane = threadIdx.x % 32;
    const int i = lane / 8;
    const T* x_lane = x + (8 * (i % 2) + lane % 8) * LDX + 8 * (i / 2);
#pragma unroll
    for (int kk = 0; kk < K / 16; ++kk) {
        uint32_t fa[MB][4];
#pragma unroll
        for (int m = 0; m < MB; ++m) {
            fa[m][0] = pack<T>(p[m][2 * kk][0], p[m][2 * kk][1]);
            fa[m][1] = pack<T>(p[m][2 * kk][2], p[m][2 * kk][3]);
            fa[m][2] = pack<T>(p[m][2 * kk + 1][0], p[m][2 * kk + 1][1]);
            fa[m][3] = pack<T>(p[m][2 * kk + 1][2], p[m][2 * kk + 1][3]);
        }
#pragma unroll
        for (int nn = 0; nn < NB; ++nn) {
            uint32_t fb[4];
            ldmatrix_x4_trans(fb, x_lane + kk * 16 * LDX + nn * 16);
#pragma unroll
            for (int m = 0; m < MB; ++m) {
                mma<T>(acc[m][2 * nn], fa[m], fb[0], fb[1]);
                mma<T>(acc[m][2 * nn + 1], fa[m], fb[2], fb[3]);
            }
        }
    }
}

// This warp's (16·MB) × (8·N) accumulator to global memory in T, times `factor`: row r of it at
// dst + r·stride, column c at + c; rows at or past `rows_left` skipped.
template <typename T, int MB, int N>
__device__ __forceinline__ void wide_store(T* dst, const float (&acc)[MB][N][4], float factor, int rows_left,
                                           int stride) {
    const int lane = threadIdx.x % 32, g = lane / 4, t = lane % 4;
#pragma unroll
    for (int m = 0; m < MB; ++m)
#pragma unroll
        for (int half = 0; half < 2; ++half) {
            const int r = 16 * m + g + 8 * half;
            if (r >= rows_left) continue;
            T* row = dst + (size_t)r * stride + 2 * t;
#pragma unroll
            for (int j = 0; j < N; ++j)
                *reinterpret_cast<uint32_t*>(row + 8 * j) =
                    pack<T>(acc[m][j][2 * half] * factor, acc[m][j][2 * half + 1] * factor);
        }
}

template <typename T, int D>
__device__ void backward_dkdv_wide(const T* __restrict__ q, const T* __restrict__ k, const T* __restrict__ v,
                                   const unsigned char* __restrict__ valid, const T* __restrict__ grad,
                                   const float* __restrict__ lse, const float* __restrict__ delta,
                                   T* __restrict__ dk, T* __restrict__ dv, int heads, int kv_heads, int queries,
                                   int keys, int offset, int causal, float scale, int q_bthd, int kv_bthd) {
    constexpr int BQ = WIDE_BQ, BK = WIDE_BK, LD = D + SPAD, LDP = WIDE_LDP, THR = WIDE_DKDV_NT;
    constexpr int DW = D / 2;  // head columns of dK, dV per warp
    require_smem(dkdv_wide_smem<D>());
    extern __shared__ __align__(16) unsigned char smem[];
    T* ks = reinterpret_cast<T*>(smem);
    T* vs = ks + BK * LD;
    T* qs0 = vs + BK * LD;  // qs[buffer] = qs0 + buffer · 2·BQ·LD, dos[buffer] = qs[buffer] + BQ·LD
    T* pts = qs0 + 4 * BQ * LD;  // Pᵀ [BK][LDP]
    T* dsts = pts + BK * LDP;    // dSᵀ [BK][LDP]
    float* lse0 = reinterpret_cast<float*>(dsts + BK * LDP);  // lse·log2(e) [buffer][BQ], then delta
    unsigned char* key_ok = reinterpret_cast<unsigned char*>(lse0 + 4 * BQ);

    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, g = lane / 4, t = lane % 4;
    const int wk = warp % 4, wq = warp / 4;
    // Blocks in launch order walk the kv heads fastest, so key tile 0 (under causal the heaviest)
    // of every head starts first.
    const int linear = blockIdx.y * gridDim.x + blockIdx.x;
    const int bkv = linear % gridDim.y, tile = linear / gridDim.y;
    const int b = bkv / kv_heads, kvh = bkv % kv_heads;
    const int group = heads / kv_heads;
    const int k0 = tile * BK;
    const int warp_k0 = k0 + 32 * wk;
    const unsigned char* valid_row = valid ? valid + (size_t)b * keys : nullptr;
    const float scale_log2 = scale * LOG2E;
    const int first_query = causal ? max(0, k0 - offset) : 0;
    const int q_start = (first_query / BQ) * BQ;
    const int tiles = queries > q_start ? (queries - q_start + BQ - 1) / BQ : 0;
    const int steps = group * tiles;

    const int qst = row_stride(heads, D, q_bthd), kst = row_stride(kv_heads, D, kv_bthd);
    const size_t k_row0 = row_offset(b, kvh, k0, kv_heads, keys, D, kv_bthd);
    load_rows<T, BK, D, THR>(ks, k + k_row0, keys - k0, kst);
    load_rows<T, BK, D, THR>(vs, v + k_row0, keys - k0, kst);
    for (int c = threadIdx.x; c < BK; c += THR)
        key_ok[c] = k0 + c < keys && (valid_row == nullptr || valid_row[k0 + c] != 0);
    // Step `step` = (head kvh·group + step / tiles, query tile q_start + BQ·(step % tiles)): Q and
    // dO into `buffer` by cp.async; thread r < BQ loads row r's lse and delta into registers
    // (`row_lse`, `row_delta`) and `stash` stores them later as lse·log2(e) (+inf where the row
    // sees nothing or does not exist: P = 0 there) and delta, so no warp waits on those loads.
    static_assert(BQ <= THR, "one thread per query row of lse and delta");
    float row_lse = -INFINITY, row_delta = 0.0f;
    auto issue = [&](int step, int buffer) {
        const int h = kvh * group + step / tiles, bh = b * heads + h;
        const int tile_q0 = q_start + BQ * (step % tiles);
        T* qs = qs0 + buffer * 2 * BQ * LD;
        const size_t q_row0 = row_offset(b, h, tile_q0, heads, queries, D, q_bthd);
        load_rows<T, BQ, D, THR>(qs, q + q_row0, queries - tile_q0, qst);
        load_rows<T, BQ, D, THR>(qs + BQ * LD, grad + q_row0, queries - tile_q0, qst);
        const int r = threadIdx.x;
        const bool inside = r < BQ && tile_q0 + r < queries;
        row_lse = inside ? lse[(size_t)bh * queries + tile_q0 + r] : -INFINITY;
        row_delta = inside ? delta[(size_t)bh * queries + tile_q0 + r] : 0.0f;
    };
    auto stash = [&](int buffer) {
        float* lse_s = lse0 + buffer * 2 * BQ;
        if (threadIdx.x < BQ) {
            lse_s[threadIdx.x] = row_lse == -INFINITY ? INFINITY : row_lse * LOG2E;
            lse_s[BQ + threadIdx.x] = row_delta;
        }
    };
    if (steps > 0) {
        issue(0, 0);
        stash(0);
    }
    cp_async_commit();

    float acc_dk[2][DW / 8][4], acc_dv[2][DW / 8][4];
#pragma unroll
    for (int m = 0; m < 2; ++m) {
        zero(acc_dk[m]);
        zero(acc_dv[m]);
    }
    for (int step = 0; step < steps; ++step) {
        const int buffer = step & 1;
        cp_async_wait<0>();
        __syncthreads();  // this step's tiles landed; every warp is done with the previous step
        if (step + 1 < steps) issue(step + 1, buffer ^ 1);
        cp_async_commit();
        const int tile_q0 = q_start + BQ * (step % tiles);
        const T* qs = qs0 + buffer * 2 * BQ * LD;
        const T* dos = qs + BQ * LD;
        const float* lse_s = lse0 + buffer * 2 * BQ;
        const float* delta_s = lse_s + BQ;

        {
            float s[2][4][4], dp[2][4][4];  // Sᵀ, dPᵀ: keys 32wk + 16m + (g, g + 8) × queries 32wq + 8j + ..
#pragma unroll
            for (int m = 0; m < 2; ++m) {
                zero(s[m]);
                zero(dp[m]);
            }
            wide_gemm_xt<T, 2, 2, D, LD, LD>(s, ks + 32 * wk * LD, qs + 32 * wq * LD);
            wide_gemm_xt<T, 2, 2, D, LD, LD>(dp, vs + 32 * wk * LD, dos + 32 * wq * LD);
            const bool mask =
                valid_row != nullptr || k0 + BK > keys || (causal && warp_k0 + 31 > offset + tile_q0 + 32 * wq);
            // lse, delta of this thread's 8 queries and the flags of its 4 keys, read once (and
            // before the first store to Pᵀ, which may alias them as far as the compiler knows).
            float col_lse[4][2], col_delta[4][2];
            bool row_ok[2][2];
#pragma unroll
            for (int j = 0; j < 4; ++j)
#pragma unroll
                for (int odd = 0; odd < 2; ++odd) {
                    col_lse[j][odd] = lse_s[32 * wq + 8 * j + 2 * t + odd];
                    col_delta[j][odd] = delta_s[32 * wq + 8 * j + 2 * t + odd];
                }
#pragma unroll
            for (int m = 0; m < 2; ++m)
#pragma unroll
                for (int half = 0; half < 2; ++half) row_ok[m][half] = key_ok[32 * wk + 16 * m + g + 8 * half] != 0;
#pragma unroll
            for (int m = 0; m < 2; ++m)
#pragma unroll
                for (int j = 0; j < 4; ++j)
#pragma unroll
                    for (int e = 0; e < 4; ++e) {
                        const int c = 32 * wq + 8 * j + 2 * t + (e & 1);  // query tile_q0 + c
                        const int r = 32 * wk + 16 * m + g + 8 * (e >> 1);  // key k0 + r
                        float p = exp2_ftz(fmaf(s[m][j][e], scale_log2, -col_lse[j][e & 1]));
                        if (mask && !(row_ok[m][e >> 1] && (!causal || k0 + r <= offset + tile_q0 + c))) p = 0.0f;
                        s[m][j][e] = p;
                        dp[m][j][e] = p * (dp[m][j][e] - col_delta[j][e & 1]);
                    }
#pragma unroll
            for (int m = 0; m < 2; ++m)
#pragma unroll
                for (int j = 0; j < 4; ++j) {
#pragma unroll
                    for (int half = 0; half < 2; ++half) {
                        const int at = (32 * wk + 16 * m + g + 8 * half) * LDP + 32 * wq + 8 * j + 2 * t;
                        *reinterpret_cast<uint32_t*>(pts + at) = pack<T>(s[m][j][2 * half], s[m][j][2 * half + 1]);
                        *reinterpret_cast<uint32_t*>(dsts + at) =
                            pack<T>(dp[m][j][2 * half], dp[m][j][2 * half + 1]);
                    }
                }
        }
        // Pᵀ, dSᵀ written. (A barrier of the two warps that write and read rows 32wk.., warps wk
        // and wk + 4, measured no faster on the H200.)
        __syncthreads();
        wide_gemm_ax<T, 2, DW / 16, BQ, LDP, LD>(acc_dv, pts + 32 * wk * LDP, dos + DW * wq);
        wide_gemm_ax<T, 2, DW / 16, BQ, LDP, LD>(acc_dk, dsts + 32 * wk * LDP, qs + DW * wq);
        if (step + 1 < steps) stash(buffer ^ 1);  // read after the next __syncthreads
    }
    cp_async_wait<0>();
    const size_t base = row_offset(b, kvh, warp_k0, kv_heads, keys, D, kv_bthd) + DW * wq;
    wide_store<T, 2, DW / 8>(dk + base, acc_dk, scale, keys - warp_k0, kst);
    wide_store<T, 2, DW / 8>(dv + base, acc_dv, 1.0f, keys - warp_k0, kst);
}

template <typename T, int D, bool GLOBAL_ORDER = true>
__device__ void backward_dq_wide(const T* __restrict__ q, const T* __restrict__ k, const T* __restrict__ v,
                                 const unsigned char* __restrict__ valid, const T* __restrict__ grad,
                                 const float* __restrict__ lse, const float* __restrict__ delta, T* __restrict__ dq,
                                 int heads, int kv_heads, int queries, int keys, int offset, int causal, float scale,
                                 int q_bthd, int kv_bthd) {
    constexpr int BQ = WIDE_DQ_BQ, BK = WIDE_DQ_BK, LD = D + SPAD, THR = WIDE_DQ_NT;
    require_smem(dq_wide_smem<D>());
    extern __shared__ __align__(16) unsigned char smem[];
    T* qs = reinterpret_cast<T*>(smem);
    T* dos = qs + BQ * LD;
    T* ks0 = dos + BQ * LD;  // ks[buffer] = ks0 + buffer · 2·BK·LD, vs[buffer] = ks[buffer] + BK·LD
    unsigned char* key_ok0 = reinterpret_cast<unsigned char*>(ks0 + 4 * BK * LD);  // [buffer][BK]

    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, g = lane / 4, t = lane % 4;
    const TileHead order = query_tile_order<GLOBAL_ORDER>(causal);  // heavy tiles first
    const int bh = order.bh, b = bh / heads, h = bh % heads;
    const int kvh = h / (heads / kv_heads);
    const int q0 = order.tile * BQ;
    const int warp_q0 = q0 + 32 * warp;
    const int qst = row_stride(heads, D, q_bthd), kst = row_stride(kv_heads, D, kv_bthd);
    const T* kb = k + row_offset(b, kvh, 0, kv_heads, keys, D, kv_bthd);
    const T* vb = v + row_offset(b, kvh, 0, kv_heads, keys, D, kv_bthd);
    const unsigned char* valid_row = valid ? valid + (size_t)b * keys : nullptr;
    const float scale_log2 = scale * LOG2E;
    const int last_row = min(q0 + BQ, queries) - 1;
    const int key_end = causal ? min(keys, offset + last_row + 1) : keys;
    const int steps = (key_end + BK - 1) / BK;
    // The last key any row of this warp can see, plus one (causal); the warp skips tiles past it.
    const int warp_key_end = causal ? offset + min(warp_q0 + 32, queries) : keys;

    // K and V of key tile `step` into `buffer` by cp.async; thread c < BK reads key c's flag into
    // `flag`, which `stash` stores later (no warp waits on the validity load).
    static_assert(BK <= THR, "one thread per key flag");
    bool flag = false;
    auto issue = [&](int step, int buffer) {
        const int tile_k0 = step * BK;
        T* ks = ks0 + buffer * 2 * BK * LD;
        load_rows<T, BK, D, THR>(ks, kb + (size_t)tile_k0 * kst, keys - tile_k0, kst);
        load_rows<T, BK, D, THR>(ks + BK * LD, vb + (size_t)tile_k0 * kst, keys - tile_k0, kst);
        const int c = threadIdx.x;
        flag = c < BK && tile_k0 + c < keys && (valid_row == nullptr || valid_row[tile_k0 + c] != 0);
    };
    auto stash = [&](int buffer) {
        if (threadIdx.x < BK) key_ok0[buffer * BK + threadIdx.x] = flag;
    };
    const size_t q_row0 = row_offset(b, h, q0, heads, queries, D, q_bthd);
    load_rows<T, BQ, D, THR>(qs, q + q_row0, queries - q0, qst);
    load_rows<T, BQ, D, THR>(dos, grad + q_row0, queries - q0, qst);
    if (steps > 0) {
        issue(0, 0);
        stash(0);
    }
    cp_async_commit();
    // Rows 16m + g + 8·half of this warp: lse·log2(e) (+inf: no visible key or no such row), delta.
    float lse_row[2][2], delta_row[2][2];
#pragma unroll
    for (int m = 0; m < 2; ++m)
#pragma unroll
        for (int half = 0; half < 2; ++half) {
            const int row = warp_q0 + 16 * m + g + 8 * half;
            const bool inside = row < queries;
            const float l = inside ? lse[(size_t)bh * queries + row] : -INFINITY;
            lse_row[m][half] = l == -INFINITY ? INFINITY : l * LOG2E;
            delta_row[m][half] = inside ? delta[(size_t)bh * queries + row] : 0.0f;
        }

    float acc[2][D / 8][4];
    zero(acc[0]);
    zero(acc[1]);
    for (int step = 0; step < steps; ++step) {
        const int buffer = step & 1;
        if (step + 1 < steps) {
            issue(step + 1, buffer ^ 1);
            cp_async_commit();
            cp_async_wait<1>();
        } else {
            cp_async_wait<0>();
        }
        __syncthreads();  // this step's K, V, key_ok (and Q, dO) landed
        const int k0 = step * BK;
        if (k0 < warp_key_end) {
            const T* ks = ks0 + buffer * 2 * BK * LD;
            const T* vs = ks + BK * LD;
            const unsigned char* key_ok = key_ok0 + buffer * BK;
            float s[2][BK / 8][4], dp[2][BK / 8][4];
#pragma unroll
            for (int m = 0; m < 2; ++m) {
                zero(s[m]);
                zero(dp[m]);
            }
            wide_gemm_xt<T, 2, BK / 16, D, LD, LD>(s, qs + 32 * warp * LD, ks);
            wide_gemm_xt<T, 2, BK / 16, D, LD, LD>(dp, dos + 32 * warp * LD, vs);
            const bool mask =
                valid_row != nullptr || k0 + BK > keys || (causal && k0 + BK - 1 > offset + warp_q0);
            bool col_ok[BK / 8][2];  // the flags of this thread's keys, read once
#pragma unroll
            for (int j = 0; j < BK / 8; ++j)
#pragma unroll
                for (int odd = 0; odd < 2; ++odd) col_ok[j][odd] = key_ok[8 * j + 2 * t + odd] != 0;
#pragma unroll
            for (int m = 0; m < 2; ++m)
#pragma unroll
                for (int j = 0; j < BK / 8; ++j)
#pragma unroll
                    for (int e = 0; e < 4; ++e) {
                        const int c = 8 * j + 2 * t + (e & 1);  // key k0 + c
                        const int half = e >> 1;
                        const int row = warp_q0 + 16 * m + g + 8 * half;
                        float p = exp2_ftz(fmaf(s[m][j][e], scale_log2, -lse_row[m][half]));
                        if (mask && !(col_ok[j][e & 1] && (!causal || k0 + c <= offset + row))) p = 0.0f;
                        s[m][j][e] = p * (dp[m][j][e] - delta_row[m][half]);  // dS
                    }
            wide_gemm_px<T, 2, D / 16, BK, LD>(acc, s, ks);
        }
        if (step + 1 < steps) stash(buffer ^ 1);
        __syncthreads();  // every warp is done with this buffer before step + 2 refills it
    }
    cp_async_wait<0>();
    wide_store<T, 2, D / 8>(dq + row_offset(b, h, warp_q0, heads, queries, D, q_bthd), acc, scale,
                            queries - warp_q0, qst);
}

// ---- head_dim 128 forward with 32 query rows per warp (the d128 entry point) ----
// forward above (d64; also what d128 ran before) gives each warp 16 query rows of a 64 × 64 tile
// and re-reads K and V from shared memory for every 16 rows: each ldmatrix.x4 feeds two mma (0.5
// ldmatrix per mma), two __syncthreads per key tile. forward_wide (FlashAttention-2's d128 tiling:
// 128 queries × 64 keys per block of 4 warps) gives each warp 32 query rows: warp w owns queries
// q0 + 32w .. + 31, all D columns of O (128 f32 accumulators per thread) and S for its 32 rows ×
// 64 keys (64 floats): 0.375 ldmatrix per mma for S = Q·Kᵀ, 0.25 for O += P·V. K and V come in
// BK = 64-key tiles, double-buffered: at the top of step s one __syncthreads (step s's K, V and
// key flags landed; every warp is done with step s − 1's buffer), then step s + 1's K and V are
// issued by cp.async into the other buffer and overlap step s's math; the key flags are read into
// a register at issue and stored to shared memory at the end of the step. One __syncthreads per
// key tile. (SUB < BK walks a tile in SUB-key softmax steps, S then SUB/2 floats: an A/B variant.)
// A warp skips the (sub-)tiles none of its rows can see (causal: the diagonal's last keys for the
// first warps). Online softmax as in forward, with ex2.approx.ftz (exp2f adds a range fix-up
// around MUFU.EX2; p below 2^-126 is 0 here). Heavy query tiles first over all heads
// (query_tile_order). lse / O semantics are forward's: rows with no visible key get O 0 and lse
// −inf. No atomics; every sum in a fixed order: deterministic.
// Registers (ptxas, sm_90, bf16 and f16, __launch_bounds__(128, 2)): 255, 44 bytes of spill
// stores (SUB = 32: 254, none); two blocks (8 warps) per SM; shared memory 104,576 bytes per
// block. The K/V copy loop is not unrolled: unrolled, its per-row offsets stay live across the key
// loop (SUB = 64 then spilled 64 bytes and ran 15.6 ms per step instead of 13.8).
// Measured on the H200 at Llama-3.1-8B's shape (B 1, H 32, KVH 8, T = S = 4096, causal; 32 layers,
// benches/gpu/flash_bench.cu): 17.1 → 13.8 ms per step (257 → 319 TFLOP/s). Tried and not kept
// (slower): 32-key softmax steps (SUB = 32: 14.8 ms; its loop unrolled: 14.6); 32-key tiles (BK =
// SUB = 32: 15.0); P rounded to bf16 fragments right after the softmax (more spills; 15.9 against
// 15.6 with the unrolled copy loop); skipping the accumulators' rescale when no row maximum of
// the warp grew (a warp vote per step; no faster at SUB = 32: 15.0 against 15.0, 15.1 against
// 14.8).
constexpr int WIDE_FWD_NT = 128, WIDE_FWD_BQ = 128, WIDE_FWD_BK = 64, WIDE_FWD_SUB = 64;
template <int D, int BK = WIDE_FWD_BK> __host__ __device__ constexpr int forward_wide_smem() {
    return (WIDE_FWD_BQ + 4 * BK) * (D + SPAD) * 2 + 2 * BK;
}

template <typename T, int D, int BK = WIDE_FWD_BK, int SUB = WIDE_FWD_SUB, bool GLOBAL_ORDER = true>
__device__ void forward_wide(const T* __restrict__ q, const T* __restrict__ k, const T* __restrict__ v,
                             const unsigned char* __restrict__ valid, T* __restrict__ o, float* __restrict__ lse,
                             int heads, int kv_heads, int queries, int keys, int offset, int causal, float scale,
                             int q_bthd, int kv_bthd) {
    constexpr int BQ = WIDE_FWD_BQ, LD = D + SPAD, THR = WIDE_FWD_NT;
    static_assert(BQ == 32 * (THR / 32), "32 query rows per warp");
    require_smem(forward_wide_smem<D, BK>());
    extern __shared__ __align__(16) unsigned char smem[];
    T* qs = reinterpret_cast<T*>(smem);
    T* ks0 = qs + BQ * LD;  // ks[buffer] = ks0 + buffer · 2·BK·LD, vs[buffer] = ks[buffer] + BK·LD
    unsigned char* key_ok0 = reinterpret_cast<unsigned char*>(ks0 + 4 * BK * LD);  // [buffer][BK]

    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, g = lane / 4, t = lane % 4;
    const TileHead order = query_tile_order<GLOBAL_ORDER>(causal);  // heavy tiles first
    const int bh = order.bh, b = bh / heads, h = bh % heads;
    const int kvh = h / (heads / kv_heads);
    const int q0 = order.tile * BQ;
    const int warp_q0 = q0 + 32 * warp;  // this warp's first query
    const int qst = row_stride(heads, D, q_bthd), kst = row_stride(kv_heads, D, kv_bthd);
    const T* kb = k + row_offset(b, kvh, 0, kv_heads, keys, D, kv_bthd);
    const T* vb = v + row_offset(b, kvh, 0, kv_heads, keys, D, kv_bthd);
    const unsigned char* valid_row = valid ? valid + (size_t)b * keys : nullptr;
    const float scale_log2 = scale * LOG2E;
    const int last_row = min(q0 + BQ, queries) - 1;
    const int key_end = causal ? min(keys, offset + last_row + 1) : keys;
    const int steps = (key_end + BK - 1) / BK;
    // The last key any row of this warp can see, plus one (causal); the warp skips tiles past it.
    const int warp_key_end = causal ? offset + min(warp_q0 + 32, queries) : keys;

    // K and V of key tile `step` into `buffer` by cp.async; thread c < BK reads key c's flag into
    // `flag`, which `stash` stores later (no warp waits on the validity load).
    static_assert(BK <= THR, "one thread per key flag");
    bool flag = false;
    auto issue = [&](int step, int buffer) {
        const int tile_k0 = step * BK;
        T* ks = ks0 + buffer * 2 * BK * LD;
        // As load_rows for K and V, in a loop that is not unrolled: unrolled, the per-row source
        // offsets are hoisted out of the key loop and held in registers the softmax needs.
        constexpr int CHUNKS = D / 8, ROW_STEP = THR / CHUNKS;
        static_assert(BK % ROW_STEP == 0, "every thread copies the same number of chunks");
        const int r0 = threadIdx.x / CHUNKS, col = (threadIdx.x % CHUNKS) * 8;
        const size_t at = (size_t)(tile_k0 + r0) * kst + col;
        const T* k_src = kb + at;
        const T* v_src = vb + at;
        T* k_dst = ks + r0 * LD + col;
#pragma unroll 1
        for (int r = tile_k0 + r0; r < tile_k0 + BK; r += ROW_STEP) {
            const bool inside = r < keys;
            cp_async16(k_dst, inside ? k_src : kb, inside);
            cp_async16(k_dst + BK * LD, inside ? v_src : vb, inside);
            k_src += (size_t)ROW_STEP * kst;
            v_src += (size_t)ROW_STEP * kst;
            k_dst += ROW_STEP * LD;
        }
        const int c = threadIdx.x;
        flag = c < BK && tile_k0 + c < keys && (valid_row == nullptr || valid_row[tile_k0 + c] != 0);
    };
    auto stash = [&](int buffer) {
        if (threadIdx.x < BK) key_ok0[buffer * BK + threadIdx.x] = flag;
    };
    load_rows<T, BQ, D, THR>(qs, q + row_offset(b, h, q0, heads, queries, D, q_bthd), queries - q0, qst);
    if (steps > 0) {
        issue(0, 0);
        stash(0);
    }
    cp_async_commit();

    float acc[2][D / 8][4];
    zero(acc[0]);
    zero(acc[1]);
    // Rows 16m + g + 8·half of this warp: raw (unscaled) running maxima, this thread's share of sums.
    float row_max[2][2], row_sum[2][2];
#pragma unroll
    for (int m = 0; m < 2; ++m)
#pragma unroll
        for (int half = 0; half < 2; ++half) {
            row_max[m][half] = -INFINITY;
            row_sum[m][half] = 0.0f;
        }
    for (int step = 0; step < steps; ++step) {
        const int buffer = step & 1;
        cp_async_wait<0>();
        __syncthreads();  // this step's K, V, key flags (and Q) landed; every warp is done with the other buffer
        if (step + 1 < steps) issue(step + 1, buffer ^ 1);
        cp_async_commit();
        // The tile in sub-tiles of SUB keys (S for 32 rows × SUB keys in registers at a time).
#pragma unroll 1
        for (int sub = 0; sub < BK / SUB; ++sub) {
            const int k0 = step * BK + sub * SUB;
            if (k0 >= warp_key_end) break;
            const T* ks = ks0 + buffer * 2 * BK * LD + sub * SUB * LD;
            const T* vs = ks0 + buffer * 2 * BK * LD + BK * LD + sub * SUB * LD;
            const unsigned char* key_ok = key_ok0 + buffer * BK + sub * SUB;
            float s[2][SUB / 8][4];
            zero(s[0]);
            zero(s[1]);
            wide_gemm_xt<T, 2, SUB / 16, D, LD, LD>(s, qs + 32 * warp * LD, ks);
            // Masking where some key of the sub-tile may be invisible to some row of this warp.
            const bool mask =
                valid_row != nullptr || k0 + SUB > keys || (causal && k0 + SUB - 1 > offset + warp_q0);
            if (mask) {
#pragma unroll
                for (int j = 0; j < SUB / 8; ++j)
#pragma unroll
                    for (int odd = 0; odd < 2; ++odd) {
                        const int c = 8 * j + 2 * t + odd;  // key k0 + c
                        const bool ok = key_ok[c] != 0;     // read once for the thread's four rows
#pragma unroll
                        for (int m = 0; m < 2; ++m)
#pragma unroll
                            for (int half = 0; half < 2; ++half) {
                                const int row = warp_q0 + 16 * m + g + 8 * half;
                                if (!(ok && (!causal || k0 + c <= offset + row))) s[m][j][2 * half + odd] = -INFINITY;
                            }
                    }
            }
            // Online softmax: rows 16m + g (e = 0, 1) and 16m + g + 8 (e = 2, 3); a row lives in one quad.
            float m_scaled[2][2], alpha[2][2];
#pragma unroll
            for (int m = 0; m < 2; ++m)
#pragma unroll
                for (int half = 0; half < 2; ++half) {
                    float mx = row_max[m][half];
#pragma unroll
                    for (int j = 0; j < SUB / 8; ++j) mx = fmaxf(mx, fmaxf(s[m][j][2 * half], s[m][j][2 * half + 1]));
                    mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
                    mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
                    // Nothing visible yet: every p is exp2(-inf) = 0 with any finite subtrahend.
                    m_scaled[m][half] = mx == -INFINITY ? 0.0f : mx * scale_log2;
                    alpha[m][half] = row_max[m][half] == -INFINITY
                                         ? 0.0f
                                         : exp2_ftz(row_max[m][half] * scale_log2 - m_scaled[m][half]);
                    row_max[m][half] = mx;
                }
#pragma unroll
            for (int m = 0; m < 2; ++m)
#pragma unroll
                for (int half = 0; half < 2; ++half)
#pragma unroll
                    for (int j = 0; j < D / 8; ++j) {
                        acc[m][j][2 * half] *= alpha[m][half];
                        acc[m][j][2 * half + 1] *= alpha[m][half];
                    }
#pragma unroll
            for (int m = 0; m < 2; ++m)
#pragma unroll
                for (int half = 0; half < 2; ++half) {
                    float sum = row_sum[m][half] * alpha[m][half];
#pragma unroll
                    for (int j = 0; j < SUB / 8; ++j)
#pragma unroll
                        for (int e = 2 * half; e < 2 * half + 2; ++e) {
                            const float p = exp2_ftz(fmaf(s[m][j][e], scale_log2, -m_scaled[m][half]));
                            s[m][j][e] = p;
                            sum += p;
                        }
                    row_sum[m][half] = sum;
                }
            wide_gemm_px<T, 2, D / 16, SUB, LD>(acc, s, vs);
        }
        if (step + 1 < steps) stash(buffer ^ 1);
    }
    cp_async_wait<0>();

#pragma unroll
    for (int m = 0; m < 2; ++m) {
        float inverse[2];
#pragma unroll
        for (int half = 0; half < 2; ++half) {
            float l = row_sum[m][half];
            l += __shfl_xor_sync(0xffffffffu, l, 1);
            l += __shfl_xor_sync(0xffffffffu, l, 2);
            inverse[half] = l > 0.0f ? 1.0f / l : 0.0f;
            const int row = warp_q0 + 16 * m + g + 8 * half;
            if (t == 0 && row < queries)
                lse[(size_t)bh * queries + row] = l > 0.0f ? row_max[m][half] * scale + logf(l) : -INFINITY;
        }
        const int row0 = warp_q0 + 16 * m;
        if (row0 < queries)
            store_rows<T, D>(o + row_offset(b, h, row0, heads, queries, D, q_bthd), acc[m], inverse[0], inverse[1],
                             queries - row0, qst);
    }
}

}  // namespace fa2
}  // namespace

// ---------------------------------------------------------------------------------------------
// Entry points: flash_{forward,backward_dkdv,backward_dq}_{bf16,f16,f32}_d{64,128} and
// flash_backward_delta_{bf16,f16,f32}. Tiles (BQ × BK): forward 64×32 (d64) and 32×32 (d128);
// backward 32×32 (d64) and 16×16 (d128), all within 48 KiB of static shared memory.
#define FLASH_ENTRIES(T, SUFFIX, D, FQ, FK, BQ, BK)                                                       \
    extern "C" __global__ void __launch_bounds__(THREADS) flash_forward_##SUFFIX##_d##D(                   \
        const T* q, const T* k, const T* v, const unsigned char* valid, T* o, float* lse, int heads,      \
        int kv_heads, int queries, int keys, int offset, int causal, float scale) {                       \
        flash_forward<T, D, FQ, FK>(q, k, v, valid, o, lse, heads, kv_heads, queries, keys, offset,      \
                                    causal, scale);                                                      \
    }                                                                                                    \
    extern "C" __global__ void __launch_bounds__(THREADS) flash_backward_dkdv_##SUFFIX##_d##D(             \
        const T* q, const T* k, const T* v, const unsigned char* valid, const T* grad, const float* lse,  \
        const float* delta, T* dk, T* dv, int heads, int kv_heads, int queries, int keys, int offset,     \
        int causal, float scale) {                                                                       \
        flash_backward_dkdv<T, D, BQ, BK>(q, k, v, valid, grad, lse, delta, dk, dv, heads, kv_heads,      \
                                          queries, keys, offset, causal, scale);                          \
    }                                                                                                    \
    extern "C" __global__ void __launch_bounds__(THREADS) flash_backward_dq_##SUFFIX##_d##D(               \
        const T* q, const T* k, const T* v, const unsigned char* valid, const T* grad, const float* lse,  \
        const float* delta, T* dq, int heads, int kv_heads, int queries, int keys, int offset,            \
        int causal, float scale) {                                                                       \
        flash_backward_dq<T, D, BQ, BK>(q, k, v, valid, grad, lse, delta, dq, heads, kv_heads, queries,   \
                                        keys, offset, causal, scale);                                    \
    }

#define FLASH_DTYPE(T, SUFFIX)                                                                           \
    FLASH_ENTRIES(T, SUFFIX, 64, 64, 32, 32, 32)                                                         \
    FLASH_ENTRIES(T, SUFFIX, 128, 32, 32, 16, 16)                                                        \
    extern "C" __global__ void __launch_bounds__(THREADS) flash_backward_delta_##SUFFIX(                   \
        const T* o, const T* grad, float* delta, long long rows, int dim, int heads, int queries,         \
        int bthd) {                                                                                      \
        flash_backward_delta<T>(o, grad, delta, rows, dim, heads, queries, bthd);                        \
    }

FLASH_DTYPE(bf16, bf16)
FLASH_DTYPE(__half, f16)
FLASH_DTYPE(float, f32)

// Tensor-core entry points (bf16/f16): flash_tc_{forward,backward_dkdv,backward_dq}_{bf16,f16}_d{64,128}.
// Tiles: forward 64×32 (d64) and 32×32 (d128); backward 32×32 (d64) and 16×32 (d128).
#define FLASH_TC_ENTRIES(T, SUFFIX, D, FQ, FK, BQ, BK)                                                    \
    extern "C" __global__ void __launch_bounds__(THREADS) flash_tc_forward_##SUFFIX##_d##D(                \
        const T* q, const T* k, const T* v, const unsigned char* valid, T* o, float* lse, int heads,      \
        int kv_heads, int queries, int keys, int offset, int causal, float scale) {                       \
        tc::forward<T, D, FQ, FK>(q, k, v, valid, o, lse, heads, kv_heads, queries, keys, offset, causal, \
                                  scale);                                                                \
    }                                                                                                    \
    extern "C" __global__ void __launch_bounds__(THREADS) flash_tc_backward_dkdv_##SUFFIX##_d##D(          \
        const T* q, const T* k, const T* v, const unsigned char* valid, const T* grad, const float* lse,  \
        const float* delta, T* dk, T* dv, int heads, int kv_heads, int queries, int keys, int offset,     \
        int causal, float scale) {                                                                       \
        tc::backward_dkdv<T, D, BQ, BK>(q, k, v, valid, grad, lse, delta, dk, dv, heads, kv_heads,        \
                                        queries, keys, offset, causal, scale);                            \
    }                                                                                                    \
    extern "C" __global__ void __launch_bounds__(THREADS) flash_tc_backward_dq_##SUFFIX##_d##D(            \
        const T* q, const T* k, const T* v, const unsigned char* valid, const T* grad, const float* lse,  \
        const float* delta, T* dq, int heads, int kv_heads, int queries, int keys, int offset,            \
        int causal, float scale) {                                                                       \
        tc::backward_dq<T, D, BQ, BK>(q, k, v, valid, grad, lse, delta, dq, heads, kv_heads, queries,     \
                                      keys, offset, causal, scale);                                      \
    }

FLASH_TC_ENTRIES(bf16, bf16, 64, 64, 32, 32, 32)
FLASH_TC_ENTRIES(bf16, bf16, 128, 32, 32, 16, 32)
FLASH_TC_ENTRIES(__half, f16, 64, 64, 32, 32, 32)
FLASH_TC_ENTRIES(__half, f16, 128, 32, 32, 16, 32)

// FlashAttention-2-style entry points (bf16/f16, dynamic shared memory of
// fa2::{forward,dkdv,dq}_smem<D>() bytes, or for d128 fa2::{forward,dkdv,dq}_wide_smem<128>()):
// flash_mma_{forward,backward_dkdv,backward_dq}_{bf16,f16}_d{64,128}. 128 threads each, except the
// d128 dK/dV kernel (256 threads). Registers (ptxas, sm_90, bf16): the d64 forward asks for three
// blocks per SM (155 registers; forward<T, 128> there: 168 and 48 bytes of spills), the d128
// forward (forward_wide) for two (254, no spills); d64
// dK/dV 225 (two blocks), d64 dQ three blocks (168); d128 dK/dV 255 (one block of 8 warps), d128
// dQ 255 (two blocks of 4 warps).
#define FLASH_MMA_FORWARD(T, SUFFIX, D, KERNEL, BLOCKS)                                                   \
    extern "C" __global__ void __launch_bounds__(fa2::NT, BLOCKS) flash_mma_forward_##SUFFIX##_d##D(       \
        const T* q, const T* k, const T* v, const unsigned char* valid, T* o, float* lse, int heads,      \
        int kv_heads, int queries, int keys, int offset, int causal, float scale, int q_bthd,             \
        int kv_bthd) {                                                                                   \
        fa2::KERNEL<T, D>(q, k, v, valid, o, lse, heads, kv_heads, queries, keys, offset, causal, scale,  \
                           q_bthd, kv_bthd);                                                             \
    }
#define FLASH_MMA_BACKWARD(T, SUFFIX, D, DKDV, DKDV_THREADS, DKDV_BLOCKS, DQ, DQ_BLOCKS)                  \
    extern "C" __global__ void __launch_bounds__(DKDV_THREADS, DKDV_BLOCKS)                               \
        flash_mma_backward_dkdv_##SUFFIX##_d##D(const T* q, const T* k, const T* v,                       \
                                                const unsigned char* valid, const T* grad,                \
                                                const float* lse, const float* delta, T* dk, T* dv,       \
                                                int heads, int kv_heads, int queries, int keys,           \
                                                int offset, int causal, float scale, int q_bthd,          \
                                                int kv_bthd) {                                            \
        fa2::DKDV<T, D>(q, k, v, valid, grad, lse, delta, dk, dv, heads, kv_heads, queries, keys, offset, \
                        causal, scale, q_bthd, kv_bthd);                                                  \
    }                                                                                                    \
    extern "C" __global__ void __launch_bounds__(fa2::NT, DQ_BLOCKS) flash_mma_backward_dq_##SUFFIX##_d##D( \
        const T* q, const T* k, const T* v, const unsigned char* valid, const T* grad, const float* lse,  \
        const float* delta, T* dq, int heads, int kv_heads, int queries, int keys, int offset,            \
        int causal, float scale, int q_bthd, int kv_bthd) {                                              \
        fa2::DQ<T, D>(q, k, v, valid, grad, lse, delta, dq, heads, kv_heads, queries, keys, offset,      \
                      causal, scale, q_bthd, kv_bthd);                                                   \
    }

FLASH_MMA_FORWARD(bf16, bf16, 64, forward, 3)
FLASH_MMA_FORWARD(bf16, bf16, 128, forward_wide, 2)
FLASH_MMA_FORWARD(__half, f16, 64, forward, 3)
FLASH_MMA_FORWARD(__half, f16, 128, forward_wide, 2)
FLASH_MMA_BACKWARD(bf16, bf16, 64, backward_dkdv, fa2::NT, 1, backward_dq, 3)
FLASH_MMA_BACKWARD(__half, f16, 64, backward_dkdv, fa2::NT, 1, backward_dq, 3)
FLASH_MMA_BACKWARD(bf16, bf16, 128, backward_dkdv_wide, fa2::WIDE_DKDV_NT, 1, backward_dq_wide, 2)
FLASH_MMA_BACKWARD(__half, f16, 128, backward_dkdv_wide, fa2::WIDE_DKDV_NT, 1, backward_dq_wide, 2)
