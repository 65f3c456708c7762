// 4-bit (NF4 / FP4) blockwise dequantization for peftpipe's quantized linear layers
// (src/quant/cuda.rs launches these; src/quant/blockwise.rs and double_quant.rs are the CPU
// reference they must equal bit for bit).
//
// Layout (bitsandbytes'): two 4-bit codes per byte, the first value in the high nibble; one absmax
// per `block_size` values, either plain f32 or double-quantized: absmax = code8[q] * scale[b / 256]
// + offset. Every product and sum is rounded on its own (__fmul_rn / __fadd_rn): nvcc would
// otherwise contract `a * b + c` into one FMA and differ from bitsandbytes in the last bit.

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <stdint.h>

namespace {

struct Absmax {
    const float* plain;          // f32 [blocks], or null when nested
    const uint8_t* quantized;    // u8 [blocks] (nested)
    const float* nested_scale;   // f32 [blocks / nested_block] (nested)
    const float* nested_code;    // f32 [256] (nested)
    float offset;
    int nested_block;
};

__device__ __forceinline__ float absmax_of(const Absmax& a, unsigned long long block) {
    if (a.plain != nullptr) {
        return a.plain[block];
    }
    // bitsandbytes' nested block (256) is a power of two: a shift, not a 64-bit division.
    const unsigned long long nested =
        (a.nested_block & (a.nested_block - 1)) == 0 ? block >> (__ffs(a.nested_block) - 1) : block / a.nested_block;
    float value = __fmul_rn(a.nested_code[a.quantized[block]], a.nested_scale[nested]);
    return __fadd_rn(value, a.offset);
}

template <typename T> __device__ __forceinline__ T from_f32(float x);
template <> __device__ __forceinline__ float from_f32<float>(float x) { return x; }
template <> __device__ __forceinline__ __nv_bfloat16 from_f32<__nv_bfloat16>(float x) {
    return __float2bfloat16_rn(x);
}
template <> __device__ __forceinline__ __half from_f32<__half>(float x) { return __float2half_rn(x); }

// Eight values as T into `out`: 8·sizeof(T) bytes, in 16-byte stores.
template <typename T>
__device__ __forceinline__ void store8(T* out, const float (&v)[8]) {
    union {
        T values[8];
        uint4 words[sizeof(T) / 2];
    } u;
#pragma unroll
    for (int e = 0; e < 8; ++e) u.values[e] = from_f32<T>(v[e]);
    uint4* dst = reinterpret_cast<uint4*>(out);
#pragma unroll
    for (int w = 0; w < (int)sizeof(T) / 2; ++w) dst[w] = u.words[w];
}

// Grid-stride over the values: groups of eight (one absmax each: the block size is a multiple of
// 8) through 4-byte loads and 16-byte stores when the buffers are aligned for them, so a warp reads
// 128 and writes 512 consecutive bytes per instruction (bf16), four groups in flight per thread;
// then the rest (or everything, when the buffers are not aligned) one packed byte (two values)
// per thread. The code tables (16 levels; the nested absmax's 256) are read from shared memory.
constexpr int DQ_UNROLL = 4;

template <typename T>
__device__ void dequantize(const uint8_t* packed, const float* code, Absmax absmax, int block_size,
                           unsigned long long count, T* out) {
    __shared__ float levels[16];
    __shared__ float nested_levels[256];
    if (threadIdx.x < 16) {
        levels[threadIdx.x] = code[threadIdx.x];
    }
    if (absmax.plain == nullptr) {
        for (int i = threadIdx.x; i < 256; i += blockDim.x) nested_levels[i] = absmax.nested_code[i];
        absmax.nested_code = nested_levels;
    }
    __syncthreads();
    const unsigned long long stride = (unsigned long long)gridDim.x * blockDim.x;
    const unsigned long long thread = (unsigned long long)blockIdx.x * blockDim.x + threadIdx.x;
    const bool narrow = block_size % 8 == 0 && reinterpret_cast<uintptr_t>(packed) % 4 == 0 &&
                        reinterpret_cast<uintptr_t>(out) % 16 == 0;
    // A power-of-two block size (bitsandbytes' are) is a shift, not a 64-bit division.
    const bool pow2 = (block_size & (block_size - 1)) == 0;
    const int shift = __ffs(block_size) - 1;
    // Values done by the group loop before the byte loop starts.
    unsigned long long done = 0;
    if (narrow) {
        const unsigned long long groups = count / 8;
        for (unsigned long long first = thread; first < groups; first += DQ_UNROLL * stride) {
            uint32_t word[DQ_UNROLL];
            float scale[DQ_UNROLL];
#pragma unroll
            for (int u = 0; u < DQ_UNROLL; ++u) {
                const unsigned long long i = first + u * stride;
                if (i < groups) {
                    word[u] = reinterpret_cast<const uint32_t*>(packed)[i];
                    scale[u] = absmax_of(absmax, pow2 ? (8 * i) >> shift : 8 * i / block_size);
                }
            }
#pragma unroll
            for (int u = 0; u < DQ_UNROLL; ++u) {
                const unsigned long long i = first + u * stride;
                if (i < groups) {
                    float v[8];
#pragma unroll
                    for (int j = 0; j < 4; ++j) {
                        const uint32_t byte = (word[u] >> (8 * j)) & 0xff;
                        v[2 * j] = __fmul_rn(levels[byte >> 4], scale[u]);
                        v[2 * j + 1] = __fmul_rn(levels[byte & 0x0f], scale[u]);
                    }
                    store8<T>(out + 8 * i, v);
                }
            }
        }
        done = 8 * groups;
    }
    const unsigned long long bytes = (count + 1) / 2;
    for (unsigned long long i = done / 2 + thread; i < bytes; i += stride) {
        const uint8_t byte = packed[i];
        const unsigned long long first = 2 * i;
        const unsigned long long block = first / block_size;
        const float scale = absmax_of(absmax, block);
        out[first] = from_f32<T>(__fmul_rn(levels[byte >> 4], scale));
        if (first + 1 < count) {
            const unsigned long long next_block = (first + 1) / block_size;
            const float next_scale = next_block == block ? scale : absmax_of(absmax, next_block);
            out[first + 1] = from_f32<T>(__fmul_rn(levels[byte & 0x0f], next_scale));
        }
    }
}

}  // namespace

#define NF4_DEQUANTIZE(NAME, T)                                                                    \
    extern "C" __global__ void NAME(const uint8_t* packed, const float* code, const float* plain,  \
                                    const uint8_t* quantized, const float* nested_scale,           \
                                    const float* nested_code, float offset, int nested_block,      \
                                    int block_size, unsigned long long count, T* out) {            \
        Absmax absmax{plain, quantized, nested_scale, nested_code, offset, nested_block};          \
        dequantize<T>(packed, code, absmax, block_size, count, out);                               \
    }

NF4_DEQUANTIZE(nf4_dequantize_f32, float)
NF4_DEQUANTIZE(nf4_dequantize_bf16, __nv_bfloat16)
NF4_DEQUANTIZE(nf4_dequantize_f16, __half)

// ---- Fused dequantize + GEMM (the frozen quantized linear) ----------------------------------------
//
//   forward   y[M, N]  = x[M, K]  · dequant(W)[N, K]ᵀ      (reduction over K)
//   backward  dx[M, K] = dy[M, N] · dequant(W)[N, K]       (reduction over N; the input gradient)
//
// bf16 / f16 activations, f32 accumulation on tensor cores (mma.sync.m16n8k16), output rounded once
// to the activation dtype. Each weight value is dequantized exactly as `dequantize` above does
// (`__fmul_rn(level, absmax)` rounded to nearest-even into T), so the fused product multiplies the
// very same 16-bit weights as the dequantize + cuBLAS path; only the summation order differs.
//
// Requirements the launcher (src/quant/cuda.rs) checks: K % 64 == 0 (every 16-value chunk of a
// weight row is then inside one absmax block, since block sizes are powers of two >= 32, and the
// packed bytes of a chunk are 8-byte aligned), a power-of-two block size, and an 8-byte aligned
// packed buffer. M, N are free (bounds-checked; the reduction tail of the backward, N % 64, is
// zero-filled in both operands). The activation rows are read with 16-byte loads when their base
// is 16-byte aligned and the row length a multiple of 8, element by element otherwise.
//
// Tiling: one block of 128 threads (4 warps) computes a BM × BN tile of the output; the reduction
// runs in steps of QG_BK = 64. Per step the activation tile [BM][64] is copied and the weight tile
// dequantized into shared memory, both stored "reduction-contiguous":
//   As[m][r]  = act[m0 + m][r0 + r]                         (m < BM, r < 64)
//   Bs[c][r]  = forward:  dequant(W)[n0 + c][r0 + r]          (c = output column n, r = k)
//               backward: dequant(W)[r0 + r][k0 + c]          (c = output column k, r = n)
// i.e. Bs[c][r] is B[r][c] of the mma's B = (reduction × output column) operand in both passes,
// so one fragment-loading and mma loop serves both. The global → register loads of step s + 1 are
// issued before the mma of step s (register prefetch), the stores to shared memory after it.
//
// Fragments of mma.sync.aligned.m16n8k16.row.col.f32.{bf16,f16}.{bf16,f16}.f32 (PTX ISA, "Matrix
// Fragments for mma.m16n8k16 with floating point type"); g = lane >> 2 (groupID), t = lane & 3
// (threadID_in_group); a .b32 register holds two 16-bit elements, the lower-indexed one in the
// low half (= the lower shared-memory address, little-endian):
//   A (16 × 16, row = m, col = reduction), a0..a7 in 4 registers:
//     reg0 = (a0, a1) = A[g    ][2t], A[g    ][2t + 1]
//     reg1 = (a2, a3) = A[g + 8][2t], A[g + 8][2t + 1]
//     reg2 = (a4, a5) = A[g    ][2t + 8], A[g    ][2t + 9]
//     reg3 = (a6, a7) = A[g + 8][2t + 8], A[g + 8][2t + 9]
//   B (16 × 8, row = reduction, col = output column), b0..b3 in 2 registers:
//     reg0 = (b0, b1) = B[2t    ][g], B[2t + 1][g]   = Bs[g][2t],     Bs[g][2t + 1]
//     reg1 = (b2, b3) = B[2t + 8][g], B[2t + 9][g]   = Bs[g][2t + 8], Bs[g][2t + 9]
//   C / D (16 × 8, f32), c0..c3:
//     c0 = C[g][2t], c1 = C[g][2t + 1], c2 = C[g + 8][2t], c3 = C[g + 8][2t + 1]
// Shared rows are padded to 72 elements (144 bytes = 36 words): the 32 lanes of a fragment load
// touch words g·36 + t (+ const), banks (4g + t) mod 32, all distinct.

namespace {

constexpr int QG_BK = 64;                // reduction step
constexpr int QG_LD = QG_BK + 8;         // padded shared row, in 16-bit elements
constexpr int QG_THREADS = 128;          // 4 warps

template <typename T> struct Mma;
template <> struct Mma<__nv_bfloat16> {
    static __device__ __forceinline__ void run(float (&c)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]) {
        asm volatile(
            "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 "
            "{%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};\n"
            : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
            : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
    }
};
template <> struct Mma<__half> {
    static __device__ __forceinline__ void run(float (&c)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]) {
        asm volatile(
            "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 "
            "{%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};\n"
            : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
            : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
    }
};

template <typename T> __device__ __forceinline__ uint16_t bits_of(T x);
template <> __device__ __forceinline__ uint16_t bits_of<__nv_bfloat16>(__nv_bfloat16 x) {
    return __bfloat16_as_ushort(x);
}
template <> __device__ __forceinline__ uint16_t bits_of<__half>(__half x) { return __half_as_ushort(x); }

// The 16-bit pattern of one dequantized value, exactly as `dequantize` writes it.
template <typename T> __device__ __forceinline__ uint32_t dequant_bits(float level, float scale) {
    return bits_of<T>(from_f32<T>(__fmul_rn(level, scale)));
}

// Two dequantized values packed as a .b32: `first` in the low half.
template <typename T>
__device__ __forceinline__ uint32_t dequant_pair(const float* levels, uint32_t byte, float scale) {
    return dequant_bits<T>(levels[(byte >> 4) & 0x0f], scale) |
           (dequant_bits<T>(levels[byte & 0x0f], scale) << 16);
}

template <typename T, int BM, int BN, int WARPS_M, int WARPS_N, bool BACKWARD>
__device__ void fused_gemm(const uint16_t* __restrict__ act, const uint8_t* __restrict__ packed,
                           const float* __restrict__ code, Absmax absmax, int log2_block, int rows,
                           int out_features, int in_features, T* __restrict__ out) {
    static_assert(WARPS_M * WARPS_N * 32 == QG_THREADS, "4 warps");
    constexpr int WM = BM / WARPS_M;          // rows of a warp's tile
    constexpr int WN = BN / WARPS_N;          // columns of a warp's tile
    constexpr int MT = WM / 16;               // m16 tiles per warp
    constexpr int NT = WN / 8;                // n8 tiles per warp
    static_assert(MT * 16 == WM && NT * 8 == WN && MT >= 1 && NT >= 1, "warp tile");
    // Activation tile: BM rows × 64, in chunks of 8 elements (16 bytes).
    constexpr int A_CHUNKS = BM * QG_BK / 8;
    static_assert(A_CHUNKS % QG_THREADS == 0, "activation chunks per thread");
    constexpr int A_ITERS = A_CHUNKS / QG_THREADS;
    // Weight tile: 64 × BN values, in chunks of 16 values (8 packed bytes) along a weight row.
    constexpr int W_CHUNKS = QG_BK * BN / 16;
    static_assert(W_CHUNKS % QG_THREADS == 0, "weight chunks per thread");
    constexpr int W_ITERS = W_CHUNKS / QG_THREADS;
    static_assert(BN % 16 == 0, "BN");

    __shared__ __align__(16) uint16_t As[BM][QG_LD];
    __shared__ __align__(16) uint16_t Bs[BN][QG_LD];
    __shared__ float levels[16];

    const int tid = threadIdx.x;
    const int M = rows;
    const int N = out_features;
    const int K = in_features;
    const int cols = BACKWARD ? K : N;        // output columns
    const int red = BACKWARD ? N : K;         // reduction length (the activation's row length)
    const int c0 = blockIdx.x * BN;           // first output column of the tile
    const int m0 = blockIdx.y * BM;           // first output row of the tile

    if (tid < 16) {
        levels[tid] = code[tid];
    }
    const bool act_vector = ((reinterpret_cast<uintptr_t>(act) & 15) == 0) && (red % 8 == 0);

    // Registers of the next step's tiles.
    uint4 a_regs[A_ITERS];
    uint2 w_regs[W_ITERS];
    float w_scale[W_ITERS];
    bool w_valid[W_ITERS];

    auto load = [&](int r0) {
#pragma unroll
        for (int i = 0; i < A_ITERS; ++i) {
            const int chunk = tid + i * QG_THREADS;
            const int row = chunk / (QG_BK / 8);
            const int col = (chunk % (QG_BK / 8)) * 8;
            const int m = m0 + row;
            const int r = r0 + col;
            uint4 v = make_uint4(0, 0, 0, 0);
            if (m < M) {
                const uint16_t* p = act + (size_t)m * red + r;
                if (act_vector && r + 8 <= red) {
                    v = *reinterpret_cast<const uint4*>(p);
                } else {
                    uint32_t h[8];
#pragma unroll
                    for (int j = 0; j < 8; ++j) {
                        h[j] = (r + j < red) ? (uint32_t)p[j] : 0u;
                    }
                    v = make_uint4(h[0] | (h[1] << 16), h[2] | (h[3] << 16), h[4] | (h[5] << 16),
                                   h[6] | (h[7] << 16));
                }
            }
            a_regs[i] = v;
        }
#pragma unroll
        for (int i = 0; i < W_ITERS; ++i) {
            const int chunk = tid + i * QG_THREADS;
            int n, k;
            if (BACKWARD) {
                // Weight rows r0 .. r0 + 63 (the reduction), columns c0 .. c0 + BN - 1.
                constexpr int PER_ROW = BN / 16;
                n = r0 + chunk / PER_ROW;
                k = c0 + (chunk % PER_ROW) * 16;
            } else {
                // Weight rows c0 .. c0 + BN - 1 (the output columns), columns r0 .. r0 + 63.
                constexpr int PER_ROW = QG_BK / 16;
                n = c0 + chunk / PER_ROW;
                k = r0 + (chunk % PER_ROW) * 16;
            }
            const bool valid = n < N && k + 16 <= K;
            w_valid[i] = valid;
            w_regs[i] = make_uint2(0, 0);
            w_scale[i] = 0.0f;
            if (valid) {
                const unsigned long long flat = (unsigned long long)n * K + k;   // even, 16-aligned
                w_regs[i] = *reinterpret_cast<const uint2*>(packed + flat / 2);
                w_scale[i] = absmax_of(absmax, flat >> log2_block);
            }
        }
    };

    auto store = [&]() {
#pragma unroll
        for (int i = 0; i < A_ITERS; ++i) {
            const int chunk = tid + i * QG_THREADS;
            const int row = chunk / (QG_BK / 8);
            const int col = (chunk % (QG_BK / 8)) * 8;
            *reinterpret_cast<uint4*>(&As[row][col]) = a_regs[i];
        }
#pragma unroll
        for (int i = 0; i < W_ITERS; ++i) {
            const int chunk = tid + i * QG_THREADS;
            // 16 values: value 2j is the high nibble of byte j, value 2j + 1 its low nibble.
            const uint32_t words[2] = {w_regs[i].x, w_regs[i].y};
            uint32_t pairs[8];   // pairs[j] = values (2j, 2j + 1), value 2j in the low half
#pragma unroll
            for (int j = 0; j < 8; ++j) {
                const uint32_t byte = (words[j / 4] >> (8 * (j % 4))) & 0xff;   // little-endian
                pairs[j] = w_valid[i] ? dequant_pair<T>(levels, byte, w_scale[i]) : 0u;
            }
            if (BACKWARD) {
                constexpr int PER_ROW = BN / 16;
                const int r = chunk / PER_ROW;              // reduction index (weight row)
                const int c = (chunk % PER_ROW) * 16;       // first output column (weight column)
#pragma unroll
                for (int j = 0; j < 8; ++j) {
                    Bs[c + 2 * j][r] = (uint16_t)(pairs[j] & 0xffff);
                    Bs[c + 2 * j + 1][r] = (uint16_t)(pairs[j] >> 16);
                }
            } else {
                constexpr int PER_ROW = QG_BK / 16;
                const int c = chunk / PER_ROW;              // output column (weight row)
                const int r = (chunk % PER_ROW) * 16;       // first reduction index
                *reinterpret_cast<uint4*>(&Bs[c][r]) = make_uint4(pairs[0], pairs[1], pairs[2], pairs[3]);
                *reinterpret_cast<uint4*>(&Bs[c][r + 8]) = make_uint4(pairs[4], pairs[5], pairs[6], pairs[7]);
            }
        }
    };

    const int warp = tid / 32;
    const int lane = tid % 32;
    const int g = lane >> 2;
    const int t = lane & 3;
    const int wm = (warp / WARPS_N) * WM;   // warp's first row in the tile
    const int wn = (warp % WARPS_N) * WN;   // warp's first column in the tile

    float acc[MT][NT][4];
#pragma unroll
    for (int mt = 0; mt < MT; ++mt)
#pragma unroll
        for (int nt = 0; nt < NT; ++nt)
#pragma unroll
            for (int e = 0; e < 4; ++e) acc[mt][nt][e] = 0.0f;

    load(0);
    __syncthreads();   // `levels` is written
    for (int r0 = 0; r0 < red; r0 += QG_BK) {
        store();
        __syncthreads();
        if (r0 + QG_BK < red) {
            load(r0 + QG_BK);
        }
#pragma unroll
        for (int kk = 0; kk < QG_BK; kk += 16) {
            uint32_t a[MT][4];
            uint32_t b[NT][2];
#pragma unroll
            for (int mt = 0; mt < MT; ++mt) {
                const int row = wm + mt * 16 + g;
                a[mt][0] = *reinterpret_cast<const uint32_t*>(&As[row][kk + 2 * t]);
                a[mt][1] = *reinterpret_cast<const uint32_t*>(&As[row + 8][kk + 2 * t]);
                a[mt][2] = *reinterpret_cast<const uint32_t*>(&As[row][kk + 2 * t + 8]);
                a[mt][3] = *reinterpret_cast<const uint32_t*>(&As[row + 8][kk + 2 * t + 8]);
            }
#pragma unroll
            for (int nt = 0; nt < NT; ++nt) {
                const int col = wn + nt * 8 + g;
                b[nt][0] = *reinterpret_cast<const uint32_t*>(&Bs[col][kk + 2 * t]);
                b[nt][1] = *reinterpret_cast<const uint32_t*>(&Bs[col][kk + 2 * t + 8]);
            }
#pragma unroll
            for (int mt = 0; mt < MT; ++mt)
#pragma unroll
                for (int nt = 0; nt < NT; ++nt) Mma<T>::run(acc[mt][nt], a[mt], b[nt]);
        }
        __syncthreads();   // the next store overwrites As / Bs
    }

    // C fragment: c0 = (g, 2t), c1 = (g, 2t + 1), c2 = (g + 8, 2t), c3 = (g + 8, 2t + 1).
#pragma unroll
    for (int mt = 0; mt < MT; ++mt) {
#pragma unroll
        for (int nt = 0; nt < NT; ++nt) {
#pragma unroll
            for (int e = 0; e < 4; ++e) {
                const int m = m0 + wm + mt * 16 + g + (e >= 2 ? 8 : 0);
                const int c = c0 + wn + nt * 8 + 2 * t + (e & 1);
                if (m < M && c < cols) {
                    out[(size_t)m * cols + c] = from_f32<T>(acc[mt][nt][e]);
                }
            }
        }
    }
}

}  // namespace

// Grid: (ceil(output columns / BN), ceil(M / BM)); 128 threads. `act` is x (forward) or dy
// (backward) as 16-bit patterns; the output is y [M, N] (forward) or dx [M, K] (backward).
#define NF4_GEMM(NAME, T, BM, BN, WARPS_M, WARPS_N, BACKWARD)                                         \
    extern "C" __global__ void __launch_bounds__(QG_THREADS)                                         \
        NAME(const uint16_t* act, const uint8_t* packed, const float* code, const float* plain,       \
             const uint8_t* quantized, const float* nested_scale, const float* nested_code,           \
             float offset, int nested_block, int log2_block, int rows, int out_features,              \
             int in_features, T* out) {                                                               \
        Absmax absmax{plain, quantized, nested_scale, nested_code, offset, nested_block};             \
        fused_gemm<T, BM, BN, WARPS_M, WARPS_N, BACKWARD>(act, packed, code, absmax, log2_block, rows, \
                                                          out_features, in_features, out);            \
    }

// Small tiles (M <= 16: generation / inference): 16 × 32, the 4 warps side by side along N.
NF4_GEMM(nf4_gemm_fwd_bf16_m16, __nv_bfloat16, 16, 32, 1, 4, false)
NF4_GEMM(nf4_gemm_fwd_f16_m16, __half, 16, 32, 1, 4, false)
NF4_GEMM(nf4_gemm_bwd_bf16_m16, __nv_bfloat16, 16, 32, 1, 4, true)
NF4_GEMM(nf4_gemm_bwd_f16_m16, __half, 16, 32, 1, 4, true)
// Larger tiles: 64 × 64, 2 × 2 warps of 32 × 32.
NF4_GEMM(nf4_gemm_fwd_bf16_m64, __nv_bfloat16, 64, 64, 2, 2, false)
NF4_GEMM(nf4_gemm_fwd_f16_m64, __half, 64, 64, 2, 2, false)
NF4_GEMM(nf4_gemm_bwd_bf16_m64, __nv_bfloat16, 64, 64, 2, 2, true)
NF4_GEMM(nf4_gemm_bwd_f16_m64, __half, 64, 64, 2, 2, true)
