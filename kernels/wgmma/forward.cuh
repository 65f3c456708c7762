// A first Hopper (sm_90a) flash-attention forward on wgmma.mma_async: head_dim 128, bf16, causal
// or full, with the interface of fa2's forward (kernels/flash_attn.cu): q, k, v, valid, o, lse,
// heads, kv_heads, queries, keys, offset, causal, scale, q_bthd, kv_bthd; heads read as
// [B, H, T, D] (bthd 0) or [B, T, H, D] (bthd 1, fa2::row_offset); GQA head h reads kv head
// h / (heads / kv_heads); key j visible to query i iff valid[b][j] (valid may be null) and, when
// causal, j <= offset + i; rows with no visible key get O 0 and lse -inf; lse [B, H, T] f32.
//
// Run on an H200 (README.md beside it: commands, checks, timings): every kernel here passes the
// f64-reference, fa2, strided-bitwise and determinism checks. DESIGN.md explains every layout.
// Three kernels share the primitives below:
//   * flash_wgmma_forward_bf16_d128 (this header's description): all 256 threads load with
//     cp.async, one __syncthreads per key tile; 0.95x fa2 at the 8B shape;
//   * forward_ws / flash_wgmma_forward_tma_bf16_d128 (further down): a TMA producer warpgroup,
//     mbarrier K/V pipeline, setmaxnreg, intra-warpgroup overlap, pingpong; ~1.55x fa2;
//   * forward_persistent / flash_wgmma_forward_persistent_bf16_d128: the same pipeline in a
//     persistent grid, with tree-shaped softmax reductions; ~1.7x fa2 (~0.25 ms/layer).
//
// Shape of the first kernel (FlashAttention-3's d128 causal tile, without its TMA / warp-specialised
// producer / pingpong / intra-warpgroup overlap; DESIGN.md says what each of those would add):
//   * one block of 256 threads = 2 warpgroups per (128-query tile, b·H + h), heavy (late) causal
//     tiles first over all heads (fa2's query_tile_order); warpgroup w owns queries q0 + 64w ..
//     q0 + 64w + 63, warp u (0..3) of it rows 16u .. 16u + 15 of those 64;
//   * Q (128 × 128) once, K and V in 128-key tiles, double-buffered, by cp.async (every thread
//     copies), into 128-byte-swizzled shared memory (swizzled_offset below);
//   * per key tile: S = Q·Kᵀ by 8 wgmma m64n128k16 (A = Q and B = K both from shared memory,
//     "K-major"), mask, online softmax on the S accumulators in registers, P rounded to bf16 in
//     registers, O += P·V by 8 wgmma m64n128k16 with A = P from registers (the RS form) and B = V
//     from shared memory read "MN-major" (transposed: imm-trans-b 1); each group of 8 is committed
//     and waited for before its accumulators are touched (no overlap inside a warpgroup; the
//     two warpgroups and the next tile's cp.async overlap each other). -DWGFA_OVERLAP builds the
//     A/B variant with FA3's intra-warpgroup overlap (S_j issued together with P_{j-1}·V_{j-1},
//     the softmax of S_j running under that P·V; 3 V buffers); -DWGFA_PV_N64 issues P·V as two
//     m64n64k16 per k-step (a fallback that never uses the descriptor's LBO);
//   * O normalised and stored straight from the accumulators (bf16 pairs), lse by one thread per
//     row. No atomics; every sum in a fixed order: deterministic.
//
// Register ownership (thread = 128·w + 32·u + lane, g = lane / 4, t = lane % 4; PTX ISA "wgmma
// .m64nNk16 register fragment" for D and A, = CUTLASS's CLayout_64xN / ALayout_64x16):
//   S, P (f32, 64 × 128 per warpgroup, s[64]): s[4J + e], J = 0..15, e = 0..3 holds
//       S[row][col] with row = 16u + g + 8·(e >> 1) (of the warpgroup's 64), col = 8J + 2t + (e & 1)
//       (key k0 + col of the tile).
//   O (f32, 64 × 128, o[64]): the same map, col = head-dim column 8J + 2t + (e & 1).
//   P as the A operand of k-step kk (keys 16kk .. 16kk + 15), 4 × .b32 of two bf16 (low = lower
//   column): a[0] = P[16u + g][16kk + 2t, +1], a[1] = P[16u + g + 8][16kk + 2t, +1],
//   a[2] = P[16u + g][16kk + 8 + 2t, +1], a[3] = P[16u + g + 8][16kk + 8 + 2t, +1]
//   = pack(s[8kk + 0, 1]), pack(s[8kk + 2, 3]), pack(s[8kk + 4, 5]), pack(s[8kk + 6, 7])
//   (J = 2kk gives a[0], a[1]; J = 2kk + 1 gives a[2], a[3]). So a row of S/P/O lives in the 4
//   threads of one quad (lanes 4g .. 4g + 3), each holding 2 × 16 of its 128 columns: row
//   maxima and sums need only shfl_xor 1 and 2, as in fa2.
#pragma once
#include <cuda.h>  // CUtensorMap (type only: the maps are encoded on the host)
#include <cuda_bf16.h>
#include <stdint.h>

#include "common.cuh"

namespace wgfa {

typedef __nv_bfloat16 bf16;

// Shared primitives (common.cuh).
using wgcore::cp_async16;
using wgcore::cp_async_commit;
using wgcore::descriptor;
using wgcore::exp2_ftz;
using wgcore::fence_proxy_async;
using wgcore::fence_registers;
using wgcore::pack_bf16;
using wgcore::require_smem;
using wgcore::row_offset;
using wgcore::row_stride;
using wgcore::smem_address;
using wgcore::wgmma_commit;
using wgcore::wgmma_fence;
using wgcore::wgmma_wait;


constexpr int D = 128;               // head dim (the only one here)
constexpr int BQ = 128, BK = 128;    // queries and keys per tile
constexpr int WARPGROUPS = 2, THREADS = 128 * WARPGROUPS;
constexpr float LOG2E = 1.4426950408889634f;

// ---- shared memory: 128-row tiles of 128 bf16 columns, 128-byte swizzle ----
// A tile (Q, K or V: 128 rows × 128 columns of bf16) is two 64-column halves of 16 KiB, each 128
// rows of 128 bytes (64 bf16). Inside a half, row r starts at r·128 and its 16-byte chunk c (columns
// 8c .. 8c + 7 of the half) sits at chunk position c ^ (r % 8): the Swizzle<3,4,3> pattern (byte
// address bits [4,7) ^= bits [7,10)), which the hardware applies to the *absolute* shared address,
// hence every tile starts at a multiple of 1024 bytes (the kernel rounds its base up).
// Seen as a wgmma operand:
//   K-major (Q as A, K as B of S = Q·Kᵀ: the reduced dim, the head dim, is contiguous): 8-row
//   "core" groups 1024 bytes apart (SBO), rows 128 bytes apart inside a group (implied by the
//   swizzle mode), a k-step of 16 columns = 32 bytes inside the 128-byte row (start address + 32
//   per step) and the second half (columns 64..127, k-steps 4..7) 16 KiB further; LBO unused
//   (16 bytes, encoded 1, as CUTLASS writes it).
//   MN-major (V as B of O = P·V: B[k = key][n = d] with n contiguous): 8 keys × 64 d per 1024-byte
//   atom, 8-key groups 1024 bytes apart (SBO), the second 64 d (n 64..127) one half = 16 KiB away
//   (LBO), a k-step of 16 keys = 2048 bytes (start address + 2048 per step).
constexpr int ROW_BYTES = 128;                     // one swizzled row: 64 bf16
constexpr int HALF_BYTES = 128 * ROW_BYTES;        // 128 rows × 64 columns: 16 KiB
constexpr int TILE_BYTES = 2 * HALF_BYTES;         // 128 × 128 bf16: 32 KiB
#ifdef WGFA_OVERLAP
constexpr int V_STAGES = 3;                        // step j's P·V reads V[j − 1] while V[j + 1] loads
#else
constexpr int V_STAGES = 2;
#endif
constexpr int Q_OFFSET = 0;                        // Q
constexpr int K_OFFSET = TILE_BYTES;               // K[stage] = K_OFFSET + stage · TILE_BYTES, 2 stages
constexpr int V_OFFSET = 3 * TILE_BYTES;           // V[stage], V_STAGES stages
constexpr int FLAGS_OFFSET = (3 + V_STAGES) * TILE_BYTES;  // key flags [2][BK] (only with `valid`)
constexpr int SMEM_BYTES = FLAGS_OFFSET + 2 * BK + 1024;   // + slack to round the base up to 1024

// Byte offset of element (row, col) of a 128-row tile from the tile's (1024-aligned) start.
__host__ __device__ constexpr uint32_t swizzled_offset(int row, int col) {
    return (uint32_t)((col / 64) * HALF_BYTES + row * ROW_BYTES + ((((col % 64) / 8) ^ (row % 8)) * 16) +
                      (col % 8) * 2);
}

// The 64-bit shared-memory matrix descriptor (PTX ISA "Matrix Descriptor Format"; CUTLASS
// cute::GmmaDescriptor):
//   bits  0..13  start address >> 4         (18-bit shared address, 16-byte aligned)
//   bits 16..29  leading-dimension byte offset >> 4 (LBO)
//   bits 32..45  stride-dimension byte offset >> 4  (SBO)
//   bits 49..51  base offset (0: every swizzle atom starts 1024-aligned, as here)
//   bits 62..63  swizzle mode: 0 none, 1 128-byte, 2 64-byte, 3 32-byte
// K-major operand: rows row0 .. row0 + 8·groups − 1 of the tile at `tile`, k-step kk (columns
// 16kk .. 16kk + 15). row0 must be a multiple of 8 (here 0 or 64).
__host__ __device__ constexpr uint64_t k_major(uint32_t tile, int row0, int kk) {
    return descriptor(tile + (kk / 4) * HALF_BYTES + row0 * ROW_BYTES + (kk % 4) * 32, 16, 1024);
}
// MN-major operand (B = V): k-step kk (keys 16kk .. 16kk + 15), all 128 head-dim columns
// (two 64-column halves LBO = HALF_BYTES apart).
__host__ __device__ constexpr uint64_t mn_major(uint32_t tile, int kk) {
    return descriptor(tile + kk * 16 * ROW_BYTES, HALF_BYTES, 1024);
}
// The same with one 64-column half `half` only (for the m64n64 fallback, which never uses LBO).
__host__ __device__ constexpr uint64_t mn_major_half(uint32_t tile, int kk, int half) {
    return descriptor(tile + half * HALF_BYTES + kk * 16 * ROW_BYTES, HALF_BYTES, 1024);
}

// ---- primitives (the only inline PTX) ----
// 16 bytes global → shared (address `dst`), asynchronously; `fill` false writes 16 zero bytes.
__device__ __forceinline__ void cp_async_wait_all() { asm volatile("cp.async.wait_group 0;\n" ::: "memory"); }
// Generic-proxy writes to shared memory (cp.async, st.shared) made visible to the async proxy that
// wgmma reads its shared operands through; each writer runs it before the barrier that publishes.
// wgmma.fence: orders this warpgroup's earlier register accesses (the accumulators, the A
// fragments) before the wgmma.mma_async that follow; needed before the first wgmma of a batch
// whenever those registers were written by ordinary instructions since the last wait.
// Compiler-only fence on accumulator registers (CUTLASS's warpgroup_fence_operand): keeps the
// compiler from moving their reads/writes across wgmma issue / wait.

#define WGFA_D4(i) "+f"(d[i]), "+f"(d[i + 1]), "+f"(d[i + 2]), "+f"(d[i + 3])
#define WGFA_D16(i) WGFA_D4(i), WGFA_D4(i + 4), WGFA_D4(i + 8), WGFA_D4(i + 12)
#define WGFA_R32 "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, " \
                 "%20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31}"
#define WGFA_R64 "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, " \
                 "%20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, %32, %33, %34, %35, %36, %37, "  \
                 "%38, %39, %40, %41, %42, %43, %44, %45, %46, %47, %48, %49, %50, %51, %52, %53, %54, %55, "  \
                 "%56, %57, %58, %59, %60, %61, %62, %63}"

// d (64 × 128 f32) = A·B (+ d when accumulate != 0); A (64 × 16) and B (16 × 128) both K-major
// from shared memory (imm-trans-a 0, imm-trans-b 0), bf16.
__device__ __forceinline__ void wgmma_m64n128_ss(float (&d)[64], uint64_t a, uint64_t b, int accumulate) {
    asm volatile(
        "{\n.reg .pred p;\nsetp.ne.b32 p, %66, 0;\n"
        "wgmma.mma_async.sync.aligned.m64n128k16.f32.bf16.bf16 " WGFA_R64 ", %64, %65, p, 1, 1, 0, 0;\n}\n"
        : WGFA_D16(0), WGFA_D16(16), WGFA_D16(32), WGFA_D16(48)
        : "l"(a), "l"(b), "r"(accumulate));
}
// d (64 × 128 f32) += A·B; A (64 × 16 bf16) from registers (a[0..3], the layout above), B
// (16 × 128) from shared memory, MN-major (imm-trans-b 1).
__device__ __forceinline__ void wgmma_m64n128_rs_tb(float (&d)[64], const uint32_t (&a)[4], uint64_t b) {
    asm volatile(
        "{\n.reg .pred p;\nsetp.ne.b32 p, %69, 0;\n"
        "wgmma.mma_async.sync.aligned.m64n128k16.f32.bf16.bf16 " WGFA_R64
        ", {%64, %65, %66, %67}, %68, p, 1, 1, 1;\n}\n"
        : WGFA_D16(0), WGFA_D16(16), WGFA_D16(32), WGFA_D16(48)
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(b), "r"(1));
}
// d[OFF .. OFF + 31] (64 × 64 f32: columns 0..63 of a 64 × 128 accumulator with OFF = 0, columns
// 64..127 with OFF = 32) += A·B, B 16 × 64 MN-major: the fallback that never relies on LBO
// (WGFA_PV_N64).
#define WGFA_O4(i) "+f"(d[OFF + i]), "+f"(d[OFF + i + 1]), "+f"(d[OFF + i + 2]), "+f"(d[OFF + i + 3])
#define WGFA_O16(i) WGFA_O4(i), WGFA_O4(i + 4), WGFA_O4(i + 8), WGFA_O4(i + 12)
template <int OFF>
__device__ __forceinline__ void wgmma_m64n64_rs_tb(float (&d)[64], const uint32_t (&a)[4], uint64_t b) {
    asm volatile(
        "{\n.reg .pred p;\nsetp.ne.b32 p, %37, 0;\n"
        "wgmma.mma_async.sync.aligned.m64n64k16.f32.bf16.bf16 " WGFA_R32
        ", {%32, %33, %34, %35}, %36, p, 1, 1, 1;\n}\n"
        : WGFA_O16(0), WGFA_O16(16)
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(b), "r"(1));
}

// ---- end of primitives ----

// 128 rows × 128 columns of `src` (row stride `stride` elements, `available` rows exist, src points
// at an existing row) into the swizzled tile at shared address `tile`; rows past `available` are
// zero-filled. NTHREADS threads (0 .. NTHREADS − 1 = threadIdx.x) share the copy: 2048 16-byte
// chunks, 16 per row; consecutive threads take consecutive chunks of a row (coalesced 256-byte
// rows), and the 8 chunks of a half-row land in 8 distinct 16-byte bank groups after the XOR.
template <int NTHREADS>
__device__ __forceinline__ void load_tile(uint32_t tile, const bf16* __restrict__ src, int available, int stride) {
    static_assert((128 * 16) % NTHREADS == 0, "every thread copies the same number of chunks");
#pragma unroll 1
    for (int pass = 0; pass < 128 * 16 / NTHREADS; ++pass) {
        const int index = threadIdx.x + pass * NTHREADS;
        const int r = index / 16, c = (index % 16) * 8;
        const bool inside = r < available;
        cp_async16(tile + swizzled_offset(r, c), inside ? src + (size_t)r * stride + c : src, inside);
    }
}


// fa2::query_tile_order: causal blocks walk the heads fastest and the query tiles from the last.
struct TileHead {
    int tile, bh;
};
__device__ __forceinline__ TileHead query_tile_order(int causal) {
    if (!causal) return {(int)blockIdx.x, (int)blockIdx.y};
    const int linear = blockIdx.y * gridDim.x + blockIdx.x;
    return {(int)(gridDim.x - 1 - linear / gridDim.y), (int)(linear % gridDim.y)};
}

// ---- pieces of the forward (shared by the plain loop and the WGFA_OVERLAP variant) ----

// S (s, 64 × 128 of this warpgroup) = Q rows 64·wg .. 64·wg + 63 · (K tile at `ks`)ᵀ: 8 wgmma
// issued, the first with scale-d 0. The caller fences before and commits after.
__device__ __forceinline__ void issue_qk(float (&s)[64], uint32_t qs, int wg, uint32_t ks) {
#pragma unroll
    for (int kk = 0; kk < D / 16; ++kk) wgmma_m64n128_ss(s, k_major(qs, 64 * wg, kk), k_major(ks, 0, kk), kk > 0);
}
// acc += P (pa: bf16 A fragments, the header's map) · (V tile at `vs`): 8 wgmma (16 with
// WGFA_PV_N64) issued. The caller fences before and commits after.
__device__ __forceinline__ void issue_pv(float (&acc)[64], const uint32_t (&pa)[32], uint32_t vs) {
#pragma unroll
    for (int kk = 0; kk < BK / 16; ++kk) {
        const uint32_t a[4] = {pa[4 * kk], pa[4 * kk + 1], pa[4 * kk + 2], pa[4 * kk + 3]};
#ifdef WGFA_PV_N64
        // Columns 0..63 are acc[0..31] (J = 0..7), 64..127 acc[32..63] (J = 8..15).
        wgmma_m64n64_rs_tb<0>(acc, a, mn_major_half(vs, kk, 0));
        wgmma_m64n64_rs_tb<32>(acc, a, mn_major_half(vs, kk, 1));
#else
        wgmma_m64n128_rs_tb(acc, a, mn_major(vs, kk));
#endif
    }
}
// s[4J + e] = −inf where key k0 + 8J + 2t + (e & 1) is invisible to query row0 + 8·(e >> 1):
// past `keys`, flagged invalid (flags: the tile's 128 key flags in shared memory, or null), or
// after the row's causal limit offset + row.
__device__ __forceinline__ void mask_tile(float (&s)[64], int k0, int keys, const unsigned char* flags, int causal,
                                          int offset, int row0, int t) {
#pragma unroll
    for (int j = 0; j < 16; ++j)
#pragma unroll
        for (int e = 0; e < 4; ++e) {
            const int c = 8 * j + 2 * t + (e & 1), key = k0 + c;
            const int row = row0 + 8 * (e >> 1);
            const bool seen =
                key < keys && (flags == nullptr || flags[c] != 0) && (!causal || key <= offset + row);
            if (!seen) s[4 * j + e] = -INFINITY;
        }
}
// Online softmax of one tile (fa2's): half 0 = row0 (e = 0, 1), half 1 = row0 + 8 (e = 2, 3); a
// row lives in one quad. Updates the raw row maxima and this thread's share of the row sums, turns
// s into p = exp2(s·c − max·c) (c = scale·log2 e), and returns in alpha the factor by which O's
// rows must be rescaled (0 while nothing was visible).
__device__ __forceinline__ void softmax_tile(float (&s)[64], float (&row_max)[2], float (&row_sum)[2],
                                             float (&alpha)[2], float scale_log2) {
#pragma unroll
    for (int half = 0; half < 2; ++half) {
        float mx = row_max[half];
#pragma unroll
        for (int j = 0; j < 16; ++j) mx = fmaxf(mx, fmaxf(s[4 * j + 2 * half], s[4 * j + 2 * half + 1]));
        mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
        mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
        // Nothing visible yet: every p is exp2(-inf) = 0 with any finite subtrahend.
        const float m_scaled = mx == -INFINITY ? 0.0f : mx * scale_log2;
        alpha[half] = row_max[half] == -INFINITY ? 0.0f : exp2_ftz(row_max[half] * scale_log2 - m_scaled);
        row_max[half] = mx;
        row_sum[half] *= alpha[half];
#pragma unroll
        for (int j = 0; j < 16; ++j)
#pragma unroll
            for (int e = 2 * half; e < 2 * half + 2; ++e) {
                const float p = exp2_ftz(fmaf(s[4 * j + e], scale_log2, -m_scaled));
                s[4 * j + e] = p;
                row_sum[half] += p;
            }
    }
}
__device__ __forceinline__ void rescale(float (&acc)[64], const float (&alpha)[2]) {
#pragma unroll
    for (int j = 0; j < 16; ++j)
#pragma unroll
        for (int e = 0; e < 4; ++e) acc[4 * j + e] *= alpha[e >> 1];
}
// P as bf16 A fragments: k-step kk takes s[8kk .. 8kk + 7] in pairs (the header's map).
__device__ __forceinline__ void pack_p(uint32_t (&pa)[32], const float (&s)[64]) {
#pragma unroll
    for (int i = 0; i < 32; ++i) pa[i] = pack_bf16(s[2 * i], s[2 * i + 1]);
}
// lse (one thread per row) and O / l as bf16 (rows row0 and row0 + 8, columns 8J + 2t, +1: one
// 4-byte store per (J, half)); rows at or past `queries` skipped.
__device__ __forceinline__ void store_output(const float (&acc)[64], const float (&row_max)[2],
                                             const float (&row_sum)[2], bf16* __restrict__ o,
                                             float* __restrict__ lse, int b, int h, int bh, int heads, int queries,
                                             int q_bthd, int row0, int t, float scale) {
    float inverse[2];
#pragma unroll
    for (int half = 0; half < 2; ++half) {
        float l = row_sum[half];
        l += __shfl_xor_sync(0xffffffffu, l, 1);
        l += __shfl_xor_sync(0xffffffffu, l, 2);
        inverse[half] = l > 0.0f ? 1.0f / l : 0.0f;
        const int row = row0 + 8 * half;
        if (t == 0 && row < queries)
            lse[(size_t)bh * queries + row] = l > 0.0f ? row_max[half] * scale + logf(l) : -INFINITY;
    }
#pragma unroll
    for (int half = 0; half < 2; ++half) {
        const int row = row0 + 8 * half;
        if (row >= queries) continue;
        bf16* dst = o + row_offset(b, h, row, heads, queries, q_bthd) + 2 * t;
#pragma unroll
        for (int j = 0; j < 16; ++j)
            *reinterpret_cast<uint32_t*>(dst + 8 * j) =
                pack_bf16(acc[4 * j + 2 * half] * inverse[half], acc[4 * j + 2 * half + 1] * inverse[half]);
    }
}

// The forward. Grid (ceil(queries / 128), B·H), THREADS threads, SMEM_BYTES dynamic shared memory.
// V has V_STAGES buffers: 2 for the plain loop, 3 with WGFA_OVERLAP (there step j's P·V reads
// V[j − 1] while V[j + 1] streams in).
__device__ __forceinline__ void forward(const bf16* __restrict__ q, const bf16* __restrict__ k,
                                        const bf16* __restrict__ v, const unsigned char* __restrict__ valid,
                                        bf16* __restrict__ o, float* __restrict__ lse, int heads, int kv_heads,
                                        int queries, int keys, int offset, int causal, float scale, int q_bthd,
                                        int kv_bthd) {
    require_smem(SMEM_BYTES);
    extern __shared__ __align__(1024) unsigned char smem_raw[];
    // Round up to 1024 bytes: the 128-byte swizzle is a function of the absolute address.
    const uint32_t raw = smem_address(smem_raw);
    const uint32_t base = (raw + 1023u) & ~1023u;
    unsigned char* const smem = smem_raw + (base - raw);
    const uint32_t qs = base + Q_OFFSET;
    unsigned char* const flags0 = smem + FLAGS_OFFSET;

    const int tid = threadIdx.x, wg = tid / 128, u = (tid % 128) / 32, lane = tid % 32, g = lane / 4, t = lane % 4;
    const TileHead order = query_tile_order(causal);
    const int bh = order.bh, b = bh / heads, h = bh % heads;
    const int kvh = h / (heads / kv_heads);
    const int q0 = order.tile * BQ;
    const int warp_q0 = q0 + 64 * wg + 16 * u;  // this warp's first query
    const int row0 = warp_q0 + g;                // the query of s[4J + 0, 1]; row0 + 8: s[4J + 2, 3]
    const int qst = row_stride(heads, q_bthd), kst = row_stride(kv_heads, kv_bthd);
    const bf16* kb = k + row_offset(b, kvh, 0, kv_heads, keys, kv_bthd);
    const bf16* vb = v + row_offset(b, kvh, 0, kv_heads, keys, kv_bthd);
    const unsigned char* valid_row = valid ? valid + (size_t)b * keys : nullptr;
    const float scale_log2 = scale * LOG2E;
    const int last_row = min(q0 + BQ, queries) - 1;
    const int key_end = causal ? min(keys, offset + last_row + 1) : keys;
    const int tiles = key_end > 0 ? (key_end + BK - 1) / BK : 0;
    auto k_tile = [&](int step) { return base + K_OFFSET + (step & 1) * TILE_BYTES; };
    auto v_tile = [&](int step) { return base + V_OFFSET + (step % V_STAGES) * TILE_BYTES; };

    load_tile<THREADS>(qs, q + row_offset(b, h, q0, heads, queries, q_bthd), queries - q0, qst);
    if (tiles > 0) {
        load_tile<THREADS>(k_tile(0), kb, keys, kst);
        load_tile<THREADS>(v_tile(0), vb, keys, kst);
    }
    cp_async_commit();

    float acc[64];  // O, the map in the header
#pragma unroll
    for (int i = 0; i < 64; ++i) acc[i] = 0.0f;
    float s[64];    // S then P of the current key tile (zeroed once: the first wgmma ignores it)
#pragma unroll
    for (int i = 0; i < 64; ++i) s[i] = 0.0f;
    uint32_t pa[32];  // P as bf16 A fragments
#pragma unroll
    for (int i = 0; i < 32; ++i) pa[i] = 0u;
    float row_max[2] = {-INFINITY, -INFINITY};  // raw (unscaled) running maxima of rows row0, row0 + 8
    float row_sum[2] = {0.0f, 0.0f};            // this thread's share of the rows' sums
    float alpha[2];

#pragma unroll 1
    for (int step = 0; step < tiles; ++step) {
        const int k0 = step * BK;
        unsigned char* flags = flags0 + (step & 1) * BK;
        // flags[step & 1] was last read in step − 2; every thread passed step − 1's barrier after it.
        if (valid_row)
            for (int c = tid; c < BK; c += THREADS) flags[c] = k0 + c < keys ? valid_row[k0 + c] : 0;
        cp_async_wait_all();
        fence_proxy_async();
        __syncthreads();  // this step's K, V (and Q) landed and are visible to wgmma; flags written;
                          // both warpgroups finished step − 1 (all its wgmma waited for), so the
                          // buffers written next (K of step − 1; V of step − 1, or of step − 2 with
                          // WGFA_OVERLAP) are free
        if (step + 1 < tiles) {
            const int k1 = k0 + BK;
            load_tile<THREADS>(k_tile(step + 1), kb + (size_t)k1 * kst, keys - k1, kst);
            load_tile<THREADS>(v_tile(step + 1), vb + (size_t)k1 * kst, keys - k1, kst);
        }
        cp_async_commit();
        // Mask where some key of the tile may be invisible to some row of this warp.
        const bool mask = valid_row != nullptr || k0 + BK > keys || (causal && k0 + BK - 1 > offset + warp_q0);
#ifndef WGFA_OVERLAP
        // S = Q·Kᵀ; wait; softmax; O += P·V; wait.
        fence_registers(s);
        wgmma_fence();
        issue_qk(s, qs, wg, k_tile(step));
        wgmma_commit();
        wgmma_wait<0>();
        fence_registers(s);
        if (mask) mask_tile(s, k0, keys, valid_row ? flags : nullptr, causal, offset, row0, t);
        softmax_tile(s, row_max, row_sum, alpha, scale_log2);
        rescale(acc, alpha);
        pack_p(pa, s);
        fence_registers(acc);
        fence_registers(pa);
        wgmma_fence();
        issue_pv(acc, pa, v_tile(step));
        wgmma_commit();
        wgmma_wait<0>();
        fence_registers(acc);
#else
        // FA3's intra-warpgroup overlap: issue S_j = Q·K_jᵀ, then O += P_{j−1}·V_{j−1} (P from
        // the previous step, relative to its maxima); wait for S_j only and run its softmax while
        // P·V runs; wait for P·V, then rescale O to the new maxima and pack P_j for the next step
        // (or the tail below). Invariant at the end of step j: acc = Σ_{i<j} exp(S_i − m_j)·V_i,
        // pa = exp(S_j − m_j), row_sum = Σ_{i≤j} rowsum exp(S_i − m_j) (in units of scale·log2 e).
        fence_registers(s);
        fence_registers(acc);
        fence_registers(pa);
        wgmma_fence();
        issue_qk(s, qs, wg, k_tile(step));
        wgmma_commit();
        if (step > 0) issue_pv(acc, pa, v_tile(step - 1));
        wgmma_commit();  // an empty group at step 0: wait<1> below then still means "S_j done"
        wgmma_wait<1>();
        fence_registers(s);
        if (mask) mask_tile(s, k0, keys, valid_row ? flags : nullptr, causal, offset, row0, t);
        softmax_tile(s, row_max, row_sum, alpha, scale_log2);
        wgmma_wait<0>();
        fence_registers(acc);
        fence_registers(pa);
        rescale(acc, alpha);
        pack_p(pa, s);
#endif
    }
#ifdef WGFA_OVERLAP
    if (tiles > 0) {  // the last tile's P·V
        fence_registers(acc);
        fence_registers(pa);
        wgmma_fence();
        issue_pv(acc, pa, v_tile(tiles - 1));
        wgmma_commit();
        wgmma_wait<0>();
        fence_registers(acc);
    }
#endif
    cp_async_wait_all();
    store_output(acc, row_max, row_sum, o, lse, b, h, bh, heads, queries, q_bthd, row0, t, scale);
}

// ============================================================================================
// The warp-specialised forward (FlashAttention-3's structure; new names, the pieces above reused).
//
//   * 3 warpgroups, 384 threads: warpgroup 0 is the producer, 1 and 2 the consumers (consumer c =
//     warpgroup c + 1 owns queries q0 + 64c .. q0 + 64c + 63, exactly as warpgroup c of the plain
//     kernel). setmaxnreg moves registers: producer 24, consumers 240 (24·128 + 2·240·128 ≤ 64 Ki).
//   * One producer thread loads everything with TMA (cp.async.bulk.tensor.4d, 128-byte swizzle:
//     the same smem image as swizzled_offset, one 64-column half = one 64 × 128 box per call) into
//     Q (once) and STAGES stages of K and V, each stage guarded by mbarriers: full (1 arrival with
//     expect_tx 32 KiB + the TMA's transaction bytes) and empty (8 arrivals: lane 0 of each
//     consumer warp after its wgmma reading the stage waited). TMA writes through the async proxy:
//     no proxy fence, no __syncthreads in the loop. Rows past the tensor's end (T, S) are
//     zero-filled by the TMA unit; the tensor maps carry the [B,H,T,D] / [B,T,H,D] strides.
//   * OVERLAP: FA3's intra-warpgroup overlap (S_j issued with P_{j−1}·V_{j−1}, the softmax of S_j
//     under that P·V; the invariant of the WGFA_OVERLAP loop above).
//   * PINGPONG: the two consumers issue their GEMMs in strict alternation (named barriers 1, 2 of
//     256 threads: consumer c waits on barrier 1 + c before issuing, then arrives on the other's),
//     so one consumer's softmax runs while the other's GEMMs occupy the tensor cores.
//   * Key validity is read straight from global memory in mask_tile (only tiles that need a mask).
// Interface: fa2's, except q, k, v come as tensor maps (bf16, SWIZZLE_128B, OOB fill zero, dims and
// box as at tma_load_tile; flash_wgmma_test.cu's make_map encodes them).
constexpr int WS_THREADS = 384;
constexpr int WS_PRODUCER_REGS = 24, WS_CONSUMER_REGS = 240;
template <int STAGES> struct WsLayout {
    static constexpr int Q = 0;
    static constexpr int K = TILE_BYTES;                            // K[s] = K + s · TILE_BYTES
    static constexpr int V = (1 + STAGES) * TILE_BYTES;             // V[s]
    static constexpr int BARRIERS = (1 + 2 * STAGES) * TILE_BYTES;  // u64 full_q, full_k[S], full_v[S], empty_k[S], empty_v[S]
    static constexpr int BYTES = BARRIERS + 8 * (1 + 4 * STAGES) + 1024;
};

__device__ __forceinline__ void mbar_init(uint32_t bar, uint32_t count) {
    asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;\n" ::"r"(bar), "r"(count) : "memory");
}
__device__ __forceinline__ void mbar_expect_tx(uint32_t bar, uint32_t bytes) {
    asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;\n" ::"r"(bar), "r"(bytes) : "memory");
}
__device__ __forceinline__ void mbar_arrive(uint32_t bar) {
    asm volatile("mbarrier.arrive.shared::cta.b64 _, [%0];\n" ::"r"(bar) : "memory");
}
// Wait until the phase with parity `parity` of the barrier completed (a fresh barrier counts its
// phase "−1", parity 1, as complete: the producer's first wait on an empty barrier passes).
__device__ __forceinline__ void mbar_wait(uint32_t bar, uint32_t parity) {
    uint32_t done;
    do {
        asm volatile(
            "{\n.reg .pred p;\nmbarrier.try_wait.parity.shared::cta.b64 p, [%1], %2;\nselp.u32 %0, 1, 0, p;\n}\n"
            : "=r"(done)
            : "r"(bar), "r"(parity)
            : "memory");
    } while (!done);
}
// One TMA box (coordinates innermost first) into shared memory at `dst`, completing on `bar`.
__device__ __forceinline__ void tma_load_4d(uint32_t dst, const CUtensorMap* map, int c0, int c1, int c2, int c3,
                                            uint32_t bar) {
    asm volatile(
        "cp.async.bulk.tensor.4d.shared::cluster.global.tile.mbarrier::complete_tx::bytes [%0], [%1, {%2, %3, %4, %5}], "
        "[%6];\n" ::"r"(dst),
        "l"(reinterpret_cast<uint64_t>(map)), "r"(c0), "r"(c1), "r"(c2), "r"(c3), "r"(bar)
        : "memory");
}
// A 128-row × 128-column tile = two 64-column boxes, 16 KiB apart (the two halves of §3).
// The maps order their dimensions so the strides grow: {D, T, H, B} for [B,H,T,D] (bthd 0, box {64,
// 128, 1, 1}) and {D, H, T, B} for [B,T,H,D] (bthd 1, box {64, 1, 128, 1}); either way the box lands
// as 128 rows of 128 bytes.
__device__ __forceinline__ void tma_load_tile(uint32_t dst, const CUtensorMap* map, int row, int head, int b,
                                              int bthd, uint32_t bar) {
    const int c1 = bthd ? head : row, c2 = bthd ? row : head;
    tma_load_4d(dst, map, 0, c1, c2, b, bar);
    tma_load_4d(dst + HALF_BYTES, map, 64, c1, c2, b, bar);
}
__device__ __forceinline__ void named_sync(int id, int count) {
    asm volatile("bar.sync %0, %1;\n" ::"r"(id), "r"(count) : "memory");
}
__device__ __forceinline__ void named_arrive(int id, int count) {
    asm volatile("bar.arrive %0, %1;\n" ::"r"(id), "r"(count) : "memory");
}
template <int N> __device__ __forceinline__ void setmaxnreg_dec() { asm volatile("setmaxnreg.dec.sync.aligned.u32 %0;\n" ::"n"(N)); }
template <int N> __device__ __forceinline__ void setmaxnreg_inc() { asm volatile("setmaxnreg.inc.sync.aligned.u32 %0;\n" ::"n"(N)); }

// softmax_tile with tree-shaped reductions (row maxima over the 32 values of a thread, and the row
// sums of the new p); same contract as softmax_tile.
__device__ __forceinline__ void softmax_tile_tree(float (&s)[64], float (&row_max)[2], float (&row_sum)[2],
                                                  float (&alpha)[2], float scale_log2) {
#pragma unroll
    for (int half = 0; half < 2; ++half) {
        float v[16];
#pragma unroll
        for (int j = 0; j < 16; ++j) v[j] = fmaxf(s[4 * j + 2 * half], s[4 * j + 2 * half + 1]);
#pragma unroll
        for (int i = 0; i < 8; ++i) v[i] = fmaxf(v[i], v[i + 8]);
#pragma unroll
        for (int i = 0; i < 4; ++i) v[i] = fmaxf(v[i], v[i + 4]);
        v[0] = fmaxf(fmaxf(v[0], v[2]), fmaxf(v[1], v[3]));
        float mx = fmaxf(row_max[half], v[0]);
        mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
        mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
        const float m_scaled = mx == -INFINITY ? 0.0f : mx * scale_log2;
        alpha[half] = row_max[half] == -INFINITY ? 0.0f : exp2_ftz(row_max[half] * scale_log2 - m_scaled);
        row_max[half] = mx;
#pragma unroll
        for (int j = 0; j < 16; ++j) {
            const float p0 = exp2_ftz(fmaf(s[4 * j + 2 * half], scale_log2, -m_scaled));
            const float p1 = exp2_ftz(fmaf(s[4 * j + 2 * half + 1], scale_log2, -m_scaled));
            s[4 * j + 2 * half] = p0;
            s[4 * j + 2 * half + 1] = p1;
            v[j] = p0 + p1;
        }
#pragma unroll
        for (int i = 0; i < 8; ++i) v[i] += v[i + 8];
#pragma unroll
        for (int i = 0; i < 4; ++i) v[i] += v[i + 4];
        v[0] = (v[0] + v[2]) + (v[1] + v[3]);
        row_sum[half] = fmaf(row_sum[half], alpha[half], v[0]);
    }
}

// One consumer step of the OVERLAP + PINGPONG pipeline (forward_ws with OPT != 0, and
// forward_persistent): wait for K; take the scheduler turn (unless `take_turn` is false: consumer
// 0's very first step); issue S = Q·Kᵀ and, unless FIRST (a tile's step 0), the previous P·V;
// hand the turn over; wait for S, release K (and `also_release` when non-zero: the persistent
// kernel's Q); mask, softmax; wait for P·V, release the previous V; rescale O, pack P; wait for
// this step's V (read by the next step's P·V or the tail). OPT bits:
//   1  softmax_tile_tree instead of softmax_tile (another summation order);
//   2  skip O's rescale in threads whose two alphas are both exactly 1 (bitwise the same result);
//   4  without a validity mask, mask_tile with a literal null `flags` (the check folds away).
template <bool FIRST, int OPT>
__device__ __forceinline__ void ws_step(float (&acc)[64], float (&s_acc)[64], uint32_t (&pa)[32], float (&row_max)[2],
                                        float (&row_sum)[2], uint32_t qs, int cw, uint32_t k_smem,
                                        uint32_t v_prev_smem, uint32_t full_k, uint32_t full_v, uint32_t empty_k,
                                        uint32_t empty_v_prev, uint32_t also_release, uint32_t parity, bool take_turn,
                                        bool mask, int k0, int keys, const unsigned char* flags, int causal,
                                        int offset, int row0, int t, int lane, float scale_log2) {
    mbar_wait(full_k, parity);
    if (take_turn) named_sync(1 + cw, 256);
    fence_registers(s_acc);
    fence_registers(acc);
    fence_registers(pa);
    wgmma_fence();
    issue_qk(s_acc, qs, cw, k_smem);
    wgmma_commit();
    if constexpr (!FIRST) issue_pv(acc, pa, v_prev_smem);
    wgmma_commit();
    named_arrive(2 - cw, 256);
    wgmma_wait<1>();
    fence_registers(s_acc);
    if (lane == 0) {
        mbar_arrive(empty_k);
        if (also_release) mbar_arrive(also_release);
    }
    if (mask) {
        if ((OPT & 4) && flags == nullptr)
            mask_tile(s_acc, k0, keys, nullptr, causal, offset, row0, t);
        else
            mask_tile(s_acc, k0, keys, flags, causal, offset, row0, t);
    }
    float alpha[2];
    if constexpr ((OPT & 1) != 0)
        softmax_tile_tree(s_acc, row_max, row_sum, alpha, scale_log2);
    else
        softmax_tile(s_acc, row_max, row_sum, alpha, scale_log2);
    wgmma_wait<0>();
    fence_registers(acc);
    fence_registers(pa);
    if (!FIRST && lane == 0) mbar_arrive(empty_v_prev);
    if ((OPT & 2) == 0 || alpha[0] != 1.0f || alpha[1] != 1.0f) rescale(acc, alpha);
    pack_p(pa, s_acc);
    mbar_wait(full_v, parity);
}

template <int STAGES, bool OVERLAP, bool PINGPONG, int OPT = 0>
__device__ __forceinline__ void forward_ws(const CUtensorMap* tq, const CUtensorMap* tk, const CUtensorMap* tv,
                                           const unsigned char* __restrict__ valid, bf16* __restrict__ o,
                                           float* __restrict__ lse, int heads, int kv_heads, int queries, int keys,
                                           int offset, int causal, float scale, int q_bthd, int kv_bthd) {
    using L = WsLayout<STAGES>;
    require_smem(L::BYTES);
    extern __shared__ __align__(1024) unsigned char smem_raw[];
    const uint32_t raw = smem_address(smem_raw);
    const uint32_t base = (raw + 1023u) & ~1023u;
    const uint32_t qs = base + L::Q, bars = base + L::BARRIERS;
    const uint32_t full_q = bars;
    auto full_k = [&](int s) { return bars + 8u * (1 + s); };
    auto full_v = [&](int s) { return bars + 8u * (1 + STAGES + s); };
    auto empty_k = [&](int s) { return bars + 8u * (1 + 2 * STAGES + s); };
    auto empty_v = [&](int s) { return bars + 8u * (1 + 3 * STAGES + s); };
    auto k_tile = [&](int s) { return base + L::K + s * TILE_BYTES; };
    auto v_tile = [&](int s) { return base + L::V + s * TILE_BYTES; };

    const int tid = threadIdx.x, wg = tid / 128;
    const TileHead order = query_tile_order(causal);
    const int bh = order.bh, b = bh / heads, h = bh % heads;
    const int kvh = h / (heads / kv_heads);
    const int q0 = order.tile * BQ;
    const int last_row = min(q0 + BQ, queries) - 1;
    const int key_end = causal ? min(keys, offset + last_row + 1) : keys;
    const int tiles = key_end > 0 ? (key_end + BK - 1) / BK : 0;

    if (tid == 0) {
        mbar_init(full_q, 1);
        for (int s = 0; s < STAGES; ++s) {
            mbar_init(full_k(s), 1);
            mbar_init(full_v(s), 1);
            mbar_init(empty_k(s), 8);
            mbar_init(empty_v(s), 8);
        }
        asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory");
        fence_proxy_async();
    }
    __syncthreads();

    if (wg == 0) {  // producer
        setmaxnreg_dec<WS_PRODUCER_REGS>();
        if (tid == 0 && tiles > 0) {
            mbar_expect_tx(full_q, TILE_BYTES);
            tma_load_tile(qs, tq, q0, h, b, q_bthd, full_q);
#pragma unroll 1
            for (int step = 0; step < tiles; ++step) {
                const int s = step % STAGES;
                const uint32_t parity = ((step / STAGES) & 1) ^ 1;
                mbar_wait(empty_k(s), parity);
                mbar_expect_tx(full_k(s), TILE_BYTES);
                tma_load_tile(k_tile(s), tk, step * BK, kvh, b, kv_bthd, full_k(s));
                mbar_wait(empty_v(s), parity);
                mbar_expect_tx(full_v(s), TILE_BYTES);
                tma_load_tile(v_tile(s), tv, step * BK, kvh, b, kv_bthd, full_v(s));
            }
        }
        return;
    }
    setmaxnreg_inc<WS_CONSUMER_REGS>();
    const int cw = wg - 1, u = (tid % 128) / 32, lane = tid % 32, g = lane / 4, t = lane % 4;
    const int warp_q0 = q0 + 64 * cw + 16 * u;
    const int row0 = warp_q0 + g;
    const unsigned char* valid_row = valid ? valid + (size_t)b * keys : nullptr;
    const float scale_log2 = scale * LOG2E;

    float acc[64];
#pragma unroll
    for (int i = 0; i < 64; ++i) acc[i] = 0.0f;
    float s_acc[64];
#pragma unroll
    for (int i = 0; i < 64; ++i) s_acc[i] = 0.0f;
    uint32_t pa[32];
#pragma unroll
    for (int i = 0; i < 32; ++i) pa[i] = 0u;
    float row_max[2] = {-INFINITY, -INFINITY};
    float row_sum[2] = {0.0f, 0.0f};
    float alpha[2];

    if (tiles > 0) mbar_wait(full_q, 0);
    if constexpr (OPT != 0) {
        static_assert(OVERLAP && PINGPONG, "the OPT variants build on OVERLAP + PINGPONG");
        const unsigned char* valid_row = valid ? valid + (size_t)b * keys : nullptr;
#pragma unroll 1
        for (int step = 0; step < tiles; ++step) {
            const int k0 = step * BK, st = step % STAGES, prev = (step + STAGES - 1) % STAGES;
            const uint32_t parity = (step / STAGES) & 1;
            const bool mask =
                valid_row != nullptr || k0 + BK > keys || (causal && k0 + BK - 1 > offset + warp_q0);
            const unsigned char* flags = valid_row ? valid_row + k0 : nullptr;
            if (step == 0)
                ws_step<true, OPT>(acc, s_acc, pa, row_max, row_sum, qs, cw, k_tile(st), 0u, full_k(st), full_v(st),
                                   empty_k(st), 0u, 0u, parity, cw != 0, mask, k0, keys, flags, causal, offset,
                                   row0, t, lane, scale_log2);
            else
                ws_step<false, OPT>(acc, s_acc, pa, row_max, row_sum, qs, cw, k_tile(st), v_tile(prev), full_k(st),
                                    full_v(st), empty_k(st), empty_v(prev), 0u, parity, true, mask, k0, keys, flags,
                                    causal, offset, row0, t, lane, scale_log2);
        }
    } else {
#pragma unroll 1
    for (int step = 0; step < tiles; ++step) {
        const int k0 = step * BK;
        const int st = step % STAGES;
        const uint32_t parity = (step / STAGES) & 1;
        const int prev = (step + STAGES - 1) % STAGES;
        const uint32_t prev_parity = ((step - 1) / STAGES) & 1;
        const bool mask = valid_row != nullptr || k0 + BK > keys || (causal && k0 + BK - 1 > offset + warp_q0);
        const unsigned char* flags = valid_row ? valid_row + k0 : nullptr;
        mbar_wait(full_k(st), parity);
        if constexpr (OVERLAP) {
            if (PINGPONG && (cw != 0 || step != 0)) named_sync(1 + cw, 256);
            fence_registers(s_acc);
            fence_registers(acc);
            fence_registers(pa);
            wgmma_fence();
            issue_qk(s_acc, qs, cw, k_tile(st));
            wgmma_commit();
            if (step > 0) issue_pv(acc, pa, v_tile(prev));  // V[step − 1] was waited for last step
            wgmma_commit();
            if (PINGPONG) named_arrive(2 - cw, 256);
            wgmma_wait<1>();
            fence_registers(s_acc);
            if (lane == 0) mbar_arrive(empty_k(st));
            if (mask) mask_tile(s_acc, k0, keys, flags, causal, offset, row0, t);
            softmax_tile(s_acc, row_max, row_sum, alpha, scale_log2);
            wgmma_wait<0>();
            fence_registers(acc);
            fence_registers(pa);
            if (step > 0 && lane == 0) mbar_arrive(empty_v(prev));
            rescale(acc, alpha);
            pack_p(pa, s_acc);
            mbar_wait(full_v(st), parity);  // for the next step's P·V (or the tail)
        } else {
            if (PINGPONG && (cw != 0 || step != 0)) named_sync(1 + cw, 256);
            fence_registers(s_acc);
            wgmma_fence();
            issue_qk(s_acc, qs, cw, k_tile(st));
            wgmma_commit();
            if (PINGPONG) named_arrive(2 - cw, 256);
            wgmma_wait<0>();
            fence_registers(s_acc);
            if (lane == 0) mbar_arrive(empty_k(st));
            if (mask) mask_tile(s_acc, k0, keys, flags, causal, offset, row0, t);
            softmax_tile(s_acc, row_max, row_sum, alpha, scale_log2);
            rescale(acc, alpha);
            pack_p(pa, s_acc);
            mbar_wait(full_v(st), parity);
            fence_registers(acc);
            fence_registers(pa);
            wgmma_fence();
            issue_pv(acc, pa, v_tile(st));
            wgmma_commit();
            wgmma_wait<0>();
            fence_registers(acc);
            if (lane == 0) mbar_arrive(empty_v(st));
        }
        (void)prev_parity;
    }
    }
    if constexpr (OVERLAP) {
        if (tiles > 0) {  // the last tile's P·V
            fence_registers(acc);
            fence_registers(pa);
            wgmma_fence();
            issue_pv(acc, pa, v_tile((tiles - 1) % STAGES));
            wgmma_commit();
            wgmma_wait<0>();
            fence_registers(acc);
        }
    }
    // Consumer 0 skipped its first wait; this one takes consumer 1's last arrival, so both named
    // barriers end with no pending arrivals.
    if (PINGPONG && cw == 0 && tiles > 0) named_sync(1, 256);
    store_output(acc, row_max, row_sum, o, lse, b, h, bh, heads, queries, q_bthd, row0, t, scale);
}

// ============================================================================================
// The persistent warp-specialised forward: forward_ws's pipeline (OVERLAP and PINGPONG always on)
// with a grid of (at most) one block per SM that walks the work tiles itself, so the producer loads
// the next tile's Q and first K/V while the consumers finish the previous tile (its last P·V and
// the output stores) — the prologue/epilogue latency that a plain grid pays once per block.
//   * Work tile L = 0 .. tiles_total − 1 in fa2's order (causal: heaviest query tiles first, heads
//     fastest); block c takes, in round r, L = r·G + c (r even) or r·G + G − 1 − c (r odd) for a
//     grid of G blocks: the snake order pairs a heavy pick with a light one, static (no atomics, no
//     counter to reset), and the result of a tile never depends on which block computed it.
//   * The K/V stage counter runs on across tiles; Q gets its own full/empty pair (empty: the 8
//     consumer warps after the tile's last S = Q·Kᵀ waited), so the next Q streams in during the last
//     softmax, P·V and the epilogue.
//   * The step is ws_step (tile step 0 peeled: no P·V, hence no branch around a wgmma); OPT as
//     there (bit 1: softmax_tile_tree, 2: skip O's rescale when alpha = 1, 4: mask without flags).
template <int STAGES> struct WsPersistentLayout {
    static constexpr int Q = 0;
    static constexpr int K = TILE_BYTES;
    static constexpr int V = (1 + STAGES) * TILE_BYTES;
    // u64 full_q, empty_q, full_k[S], full_v[S], empty_k[S], empty_v[S]
    static constexpr int BARRIERS = (1 + 2 * STAGES) * TILE_BYTES;
    static constexpr int BYTES = BARRIERS + 8 * (2 + 4 * STAGES) + 1024;
};

template <int STAGES, int OPT>
__device__ __forceinline__ void forward_persistent(const CUtensorMap* tq, const CUtensorMap* tk, const CUtensorMap* tv,
                                                   const unsigned char* __restrict__ valid, bf16* __restrict__ o,
                                                   float* __restrict__ lse, int batch, int heads, int kv_heads,
                                                   int queries, int keys, int offset, int causal, float scale,
                                                   int q_bthd, int kv_bthd) {
    using L = WsPersistentLayout<STAGES>;
    require_smem(L::BYTES);
    extern __shared__ __align__(1024) unsigned char smem_raw[];
    const uint32_t raw = smem_address(smem_raw);
    const uint32_t base = (raw + 1023u) & ~1023u;
    const uint32_t qs = base + L::Q, bars = base + L::BARRIERS;
    const uint32_t full_q = bars, empty_q = bars + 8;
    auto full_k = [&](int s) { return bars + 8u * (2 + s); };
    auto full_v = [&](int s) { return bars + 8u * (2 + STAGES + s); };
    auto empty_k = [&](int s) { return bars + 8u * (2 + 2 * STAGES + s); };
    auto empty_v = [&](int s) { return bars + 8u * (2 + 3 * STAGES + s); };
    auto k_tile = [&](int s) { return base + L::K + s * TILE_BYTES; };
    auto v_tile = [&](int s) { return base + L::V + s * TILE_BYTES; };

    const int tid = threadIdx.x, wg = tid / 128;
    const int q_tiles = (queries + BQ - 1) / BQ, bhs = batch * heads, total = q_tiles * bhs;
    const int grid = gridDim.x, c = blockIdx.x;
    // The r-th work tile of this block (or −1 past the end), decoded into (query tile, b·H + h).
    auto work = [&](int r, int& tile, int& bh) {
        const int linear = r * grid + ((r & 1) ? grid - 1 - c : c);
        if (linear >= total) return false;
        if (causal) {
            tile = q_tiles - 1 - linear / bhs;
            bh = linear % bhs;
        } else {
            tile = linear % q_tiles;
            bh = linear / q_tiles;
        }
        return true;
    };
    auto key_tiles = [&](int tile) {
        const int last_row = min(tile * BQ + BQ, queries) - 1;
        const int key_end = causal ? min(keys, offset + last_row + 1) : keys;
        return key_end > 0 ? (key_end + BK - 1) / BK : 0;
    };

    if (tid == 0) {
        mbar_init(full_q, 1);
        mbar_init(empty_q, 8);
        for (int s = 0; s < STAGES; ++s) {
            mbar_init(full_k(s), 1);
            mbar_init(full_v(s), 1);
            mbar_init(empty_k(s), 8);
            mbar_init(empty_v(s), 8);
        }
        asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory");
        fence_proxy_async();
    }
    __syncthreads();

    if (wg == 0) {  // producer
        setmaxnreg_dec<WS_PRODUCER_REGS>();
        if (tid == 0) {
            int pipe = 0, qn = 0, tile, bh;
#pragma unroll 1
            for (int r = 0; work(r, tile, bh); ++r) {
                const int tiles = key_tiles(tile);
                if (tiles == 0) continue;
                const int b = bh / heads, h = bh % heads, kvh = h / (heads / kv_heads);
                mbar_wait(empty_q, (qn & 1) ^ 1);
                mbar_expect_tx(full_q, TILE_BYTES);
                tma_load_tile(qs, tq, tile * BQ, h, b, q_bthd, full_q);
                ++qn;
#pragma unroll 1
                for (int step = 0; step < tiles; ++step, ++pipe) {
                    const int s = pipe % STAGES;
                    const uint32_t parity = ((pipe / STAGES) & 1) ^ 1;
                    mbar_wait(empty_k(s), parity);
                    mbar_expect_tx(full_k(s), TILE_BYTES);
                    tma_load_tile(k_tile(s), tk, step * BK, kvh, b, kv_bthd, full_k(s));
                    mbar_wait(empty_v(s), parity);
                    mbar_expect_tx(full_v(s), TILE_BYTES);
                    tma_load_tile(v_tile(s), tv, step * BK, kvh, b, kv_bthd, full_v(s));
                }
            }
        }
        return;
    }
    setmaxnreg_inc<WS_CONSUMER_REGS>();
    const int cw = wg - 1, u = (tid % 128) / 32, lane = tid % 32, g = lane / 4, t = lane % 4;
    const float scale_log2 = scale * LOG2E;
    int pipe = 0, qn = 0, tile, bh;
    bool first = true;  // consumer 0 skips the scheduler wait of its very first step
#pragma unroll 1
    for (int r = 0; work(r, tile, bh); ++r) {
        const int tiles = key_tiles(tile);
        const int b = bh / heads, h = bh % heads;
        const int q0 = tile * BQ;
        const int warp_q0 = q0 + 64 * cw + 16 * u;
        const int row0 = warp_q0 + g;
        const unsigned char* valid_row = valid ? valid + (size_t)b * keys : nullptr;

        float acc[64];
#pragma unroll
        for (int i = 0; i < 64; ++i) acc[i] = 0.0f;
        float s_acc[64];
#pragma unroll
        for (int i = 0; i < 64; ++i) s_acc[i] = 0.0f;
        uint32_t pa[32];
#pragma unroll
        for (int i = 0; i < 32; ++i) pa[i] = 0u;
        float row_max[2] = {-INFINITY, -INFINITY};
        float row_sum[2] = {0.0f, 0.0f};

        if (tiles > 0) mbar_wait(full_q, qn & 1);
#pragma unroll 1
        for (int step = 0; step < tiles; ++step, ++pipe) {
            const int k0 = step * BK, st = pipe % STAGES, prev = (pipe + STAGES - 1) % STAGES;
            const uint32_t parity = (pipe / STAGES) & 1;
            const bool mask =
                valid_row != nullptr || k0 + BK > keys || (causal && k0 + BK - 1 > offset + warp_q0);
            const unsigned char* flags = valid_row ? valid_row + k0 : nullptr;
            const uint32_t q_release = step == tiles - 1 ? empty_q : 0u;  // the tile's last read of Q
            if (step == 0)
                ws_step<true, OPT>(acc, s_acc, pa, row_max, row_sum, qs, cw, k_tile(st), 0u, full_k(st), full_v(st),
                                   empty_k(st), 0u, q_release, parity, cw != 0 || !first, mask, k0, keys, flags,
                                   causal, offset, row0, t, lane, scale_log2);
            else
                ws_step<false, OPT>(acc, s_acc, pa, row_max, row_sum, qs, cw, k_tile(st), v_tile(prev), full_k(st),
                                    full_v(st), empty_k(st), empty_v(prev), q_release, parity, true, mask, k0, keys,
                                    flags, causal, offset, row0, t, lane, scale_log2);
            first = false;
        }
        if (tiles > 0) {  // the last tile's P·V, then release its V stage
            const int last = (pipe + STAGES - 1) % STAGES;
            fence_registers(acc);
            fence_registers(pa);
            wgmma_fence();
            issue_pv(acc, pa, v_tile(last));
            wgmma_commit();
            wgmma_wait<0>();
            fence_registers(acc);
            if (lane == 0) mbar_arrive(empty_v(last));
            ++qn;
        }
        store_output(acc, row_max, row_sum, o, lse, b, h, bh, heads, queries, q_bthd, row0, t, scale);
    }
    if (cw == 0 && !first) named_sync(1, 256);  // consumer 1's last arrival (see forward_ws)
}

}  // namespace wgfa

// The A/B entries of the harness (benches/gpu/wgmma/flash_wgmma_test.cu defines WGFA_HARNESS):
// kernels/flash_wgmma.cu, the product's module, ships only the persistent forward below.
#ifdef WGFA_HARNESS
extern "C" __global__ void __launch_bounds__(wgfa::THREADS, 1)
    flash_wgmma_forward_bf16_d128(const wgfa::bf16* q, const wgfa::bf16* k, const wgfa::bf16* v,
                                  const unsigned char* valid, wgfa::bf16* o, float* lse, int heads, int kv_heads,
                                  int queries, int keys, int offset, int causal, float scale, int q_bthd,
                                  int kv_bthd) {
#if defined(__CUDA_ARCH__) && defined(__CUDA_ARCH_FEAT_SM90_ALL)
    wgfa::forward(q, k, v, valid, o, lse, heads, kv_heads, queries, keys, offset, causal, scale, q_bthd, kv_bthd);
#else
    __trap();  // wgmma needs sm_90a
#endif
}

// Warp-specialised TMA forward (forward_ws above): template variants for the A/B test, and
// flash_wgmma_forward_tma_bf16_d128 = forward_ws<2, OVERLAP, PINGPONG, OPT 0> under a plain name
// (the non-persistent form; the persistent entry below is faster).
// Grid (ceil(queries / 128), B·H), wgfa::WS_THREADS threads, WsLayout<STAGES>::BYTES dynamic smem.
template <int STAGES, bool OVERLAP, bool PINGPONG, int OPT = 0>
__global__ void __launch_bounds__(wgfa::WS_THREADS, 1)
    flash_wgmma_forward_ws(const __grid_constant__ CUtensorMap tq, const __grid_constant__ CUtensorMap tk,
                           const __grid_constant__ CUtensorMap tv, const unsigned char* valid, wgfa::bf16* o,
                           float* lse, int heads, int kv_heads, int queries, int keys, int offset, int causal,
                           float scale, int q_bthd, int kv_bthd) {
#if defined(__CUDA_ARCH__) && defined(__CUDA_ARCH_FEAT_SM90_ALL)
    wgfa::forward_ws<STAGES, OVERLAP, PINGPONG, OPT>(&tq, &tk, &tv, valid, o, lse, heads, kv_heads, queries, keys, offset,
                                                causal, scale, q_bthd, kv_bthd);
#else
    __trap();
#endif
}
extern "C" __global__ void __launch_bounds__(wgfa::WS_THREADS, 1)
    flash_wgmma_forward_tma_bf16_d128(const __grid_constant__ CUtensorMap tq, const __grid_constant__ CUtensorMap tk,
                                      const __grid_constant__ CUtensorMap tv, const unsigned char* valid,
                                      wgfa::bf16* o, float* lse, int heads, int kv_heads, int queries, int keys,
                                      int offset, int causal, float scale, int q_bthd, int kv_bthd) {
#if defined(__CUDA_ARCH__) && defined(__CUDA_ARCH_FEAT_SM90_ALL)
    wgfa::forward_ws<2, true, true>(&tq, &tk, &tv, valid, o, lse, heads, kv_heads, queries, keys, offset, causal,
                                    scale, q_bthd, kv_bthd);
#else
    __trap();
#endif
}
#endif  // WGFA_HARNESS

// Persistent variant (forward_persistent): grid min(#SMs, work tiles) blocks of WS_THREADS, smem
// WsPersistentLayout<STAGES>::BYTES; `batch` is B (the grid no longer encodes it).
template <int STAGES, int OPT>
__global__ void __launch_bounds__(wgfa::WS_THREADS, 1)
    flash_wgmma_forward_persistent(const __grid_constant__ CUtensorMap tq, const __grid_constant__ CUtensorMap tk,
                                   const __grid_constant__ CUtensorMap tv, const unsigned char* valid, wgfa::bf16* o,
                                   float* lse, int batch, int heads, int kv_heads, int queries, int keys, int offset,
                                   int causal, float scale, int q_bthd, int kv_bthd) {
#if defined(__CUDA_ARCH__) && defined(__CUDA_ARCH_FEAT_SM90_ALL)
    wgfa::forward_persistent<STAGES, OPT>(&tq, &tk, &tv, valid, o, lse, batch, heads, kv_heads, queries, keys,
                                                   offset, causal, scale, q_bthd, kv_bthd);
#else
    __trap();
#endif
}

// The configuration to ship (measured as "p2-fsm": forward_persistent<2, 7>): fa2's arguments with
// tensor maps for q, k, v, plus `batch`; grid min(#SMs, ceil(queries / 128) · batch · heads)
// blocks of wgfa::WS_THREADS threads, wgfa::WsPersistentLayout<2>::BYTES (164,944) bytes of
// dynamic shared memory.
extern "C" __global__ void __launch_bounds__(wgfa::WS_THREADS, 1)
    flash_wgmma_forward_persistent_bf16_d128(const __grid_constant__ CUtensorMap tq,
                                             const __grid_constant__ CUtensorMap tk,
                                             const __grid_constant__ CUtensorMap tv, const unsigned char* valid,
                                             wgfa::bf16* o, float* lse, int batch, int heads, int kv_heads,
                                             int queries, int keys, int offset, int causal, float scale, int q_bthd,
                                             int kv_bthd) {
#if defined(__CUDA_ARCH__) && defined(__CUDA_ARCH_FEAT_SM90_ALL)
    wgfa::forward_persistent<2, 7>(&tq, &tk, &tv, valid, o, lse, batch, heads, kv_heads, queries, keys, offset, causal,
                                   scale, q_bthd, kv_bthd);
#else
    __trap();
#endif
}

#ifdef WGFA_HARNESS
// Unit test of the primitives alone (one warpgroup, one block), for isolating a layout mistake
// from the attention logic: a (128 × 128, rows 0..63 used) and bm (128 × 128) bf16 row-major in
// global memory, both loaded into swizzled tiles exactly as the forward loads Q, K and V; then
//   c_ss[64 × 128] = a[0..63] · bmᵀ       (SS, both K-major: the S = Q·Kᵀ path)
//   c_rs[64 × 128] = a[0..63] · bm        (RS: A fragments read from global in the header's layout,
//                                          B = bm MN-major: the O += P·V path)
// each written row-major f32 from the accumulators with the header's map.
template <bool PV_N64>
__global__ void __launch_bounds__(128, 1)
    wgmma_unit_test(const wgfa::bf16* a, const wgfa::bf16* bm, float* c_ss, float* c_rs) {
#if defined(__CUDA_ARCH__) && defined(__CUDA_ARCH_FEAT_SM90_ALL)
    using namespace wgfa;
    extern __shared__ __align__(1024) unsigned char smem_raw[];
    const uint32_t raw = smem_address(smem_raw);
    const uint32_t base = (raw + 1023u) & ~1023u;
    const uint32_t as = base, bs = base + TILE_BYTES;
    load_tile<128>(as, a, 128, D);
    load_tile<128>(bs, bm, 128, D);
    cp_async_commit();
    cp_async_wait_all();
    fence_proxy_async();
    __syncthreads();

    const int u = threadIdx.x / 32, lane = threadIdx.x % 32, g = lane / 4, t = lane % 4;
    float d[64];
    fence_registers(d);
    wgmma_fence();
#pragma unroll
    for (int kk = 0; kk < 8; ++kk) wgmma_m64n128_ss(d, k_major(as, 0, kk), k_major(bs, 0, kk), kk > 0);
    wgmma_commit();
    wgmma_wait<0>();
    fence_registers(d);
#pragma unroll
    for (int j = 0; j < 16; ++j)
#pragma unroll
        for (int e = 0; e < 4; ++e)
            c_ss[(16 * u + g + 8 * (e >> 1)) * 128 + 8 * j + 2 * t + (e & 1)] = d[4 * j + e];

    float acc[64];
#pragma unroll
    for (int i = 0; i < 64; ++i) acc[i] = 0.0f;
    uint32_t pa[32];
#pragma unroll
    for (int kk = 0; kk < 8; ++kk)
#pragma unroll
        for (int r = 0; r < 4; ++r) {
            const int row = 16 * u + g + 8 * (r & 1), col = 16 * kk + 8 * (r >> 1) + 2 * t;
            pa[4 * kk + r] = *reinterpret_cast<const uint32_t*>(a + row * D + col);
        }
    fence_registers(acc);
    fence_registers(pa);
    wgmma_fence();
#pragma unroll
    for (int kk = 0; kk < 8; ++kk) {
        const uint32_t fa[4] = {pa[4 * kk], pa[4 * kk + 1], pa[4 * kk + 2], pa[4 * kk + 3]};
        if constexpr (PV_N64) {
            wgmma_m64n64_rs_tb<0>(acc, fa, mn_major_half(bs, kk, 0));
            wgmma_m64n64_rs_tb<32>(acc, fa, mn_major_half(bs, kk, 1));
        } else {
            wgmma_m64n128_rs_tb(acc, fa, mn_major(bs, kk));
        }
    }
    wgmma_commit();
    wgmma_wait<0>();
    fence_registers(acc);
#pragma unroll
    for (int j = 0; j < 16; ++j)
#pragma unroll
        for (int e = 0; e < 4; ++e)
            c_rs[(16 * u + g + 8 * (e >> 1)) * 128 + 8 * j + 2 * t + (e & 1)] = acc[4 * j + e];
#else
    __trap();
#endif
}
// wgmma_unit_test<false>: P·V path as m64n128k16 (uses LBO); <true>: two m64n64k16 (no LBO).
template __global__ void wgmma_unit_test<false>(const wgfa::bf16*, const wgfa::bf16*, float*, float*);
template __global__ void wgmma_unit_test<true>(const wgfa::bf16*, const wgfa::bf16*, float*, float*);
#endif  // WGFA_HARNESS
