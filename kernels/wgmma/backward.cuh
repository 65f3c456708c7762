// Hopper (sm_90a) flash-attention BACKWARD on wgmma.mma_async: head_dim 128, bf16, the
// deterministic two-kernel split of kernels/flash_attn.cu (no atomics, every sum in a fixed order):
//
//   flash_wgmma_backward_dkdv_bf16_d128   interface of flash_mma_backward_dkdv_bf16_d128
//   flash_wgmma_backward_dq_bf16_d128     interface of flash_mma_backward_dq_bf16_d128
//
// (q, k, v, valid, grad, lse, delta, dk/dv or dq, heads, kv_heads, queries, keys, offset, causal,
// scale, q_bthd, kv_bthd): heads read/written as [B, H, T, D] (bthd 0) or [B, T, H, D] (bthd 1);
// GQA head h reads kv head h / (heads / kv_heads); key j visible to query i iff valid[b][j] (valid
// may be null) and, when causal, j <= offset + i; lse, delta [B, H, T] f32 (lse −inf: the row sees
// nothing and gets no gradient); dK = scale·Σ dSᵀQ, dV = Σ PᵀdO, dQ = scale·Σ dS·K, with
// P = exp(S·scale − lse), dS = P∘(dP − delta). dK/dV of a kv head are summed over the query heads of
// its group in head order, then query tiles in increasing order (fa2's order of steps).
//
// Layouts and the descriptor format: DESIGN.md beside this file (§2–§4); the same 128-byte-swizzled
// [row][d] tiles as the forward, here also with 64-row tiles (halves of 64 rows × 128 bytes = 8 KiB).
// This file has its own copies of the few primitives (namespace wgbw) so that it does not depend on
// the forward file, which another session edits.
//
// dK/dV (one block of 256 threads = 2 warpgroups per (128-key tile, b·KVH + kvh); warpgroup w owns
// keys k0 + 64w .. + 63; launch order walks the kv heads fastest, as fa2's): per step (query head of
// the group, 64-query tile), with Q and dO of the step in KV_STAGES cp.async buffers:
//   Sᵀ  = K_w · Qᵀ      wgmma m64n64k16 SS × 8 (A = K rows, B = Q rows, both K-major)
//   dPᵀ = V_w · dOᵀ     wgmma m64n64k16 SS × 8
//   Pᵀ  = exp2(Sᵀ·scale·log2e − lse·log2e[query]) (masked), dSᵀ = Pᵀ∘(dPᵀ − δ[query])
//   dV += Pᵀ · dO       wgmma m64n128k16 RS × 4 (A = Pᵀ bf16 from the accumulators, B = dO MN-major)
//   dK += dSᵀ · Q       wgmma m64n128k16 RS × 4 (B = Q MN-major)
// S and dP are issued as two commit groups: the exp of Pᵀ runs while dPᵀ is computed, the dV
// product is issued before dSᵀ is formed; with KV_DEFER the dK product stays in flight across the
// next step's barrier. Registers per thread: dK 64 + dV 64 + Sᵀ 32 + dPᵀ 32 + fragments 32.
//
// dQ (one block of 256 threads per (128-query tile, b·H + h), heavy causal tiles first over all heads
// as fa2's query_tile_order; warpgroup w owns queries q0 + 64w .. + 63): per DQ_BK-key step (K, V in
// DQ_STAGES buffers), in NH halves of 64 keys (WGBW_DQ_SPLIT): S_h = Q_w·K_hᵀ, dP_h = dO_w·V_hᵀ
// (m64n64k16 SS × 8 each, all issued up front as separate commit groups), dS = P∘(dP − δ),
// dQ += dS_h·K_h (m64n128k16 RS × 4, B = K MN-major). A warpgroup skips key tiles it cannot see.
//
// Summation orders (16-wide k-steps in increasing order; query heads, then query tiles, for dK/dV;
// key tiles in increasing order for dQ) and the rounding of P and dS are fa2's, so on the H200 the
// outputs are bitwise equal to flash_mma_backward_{dkdv,dq}_bf16_d128's.
//
// Build-time variants: below (WGBW_*).
#pragma once
#include <cuda_bf16.h>
#include <stdint.h>

#include "common.cuh"

// Build-time variants (defaults = the fastest measured on the H200, README.md):
//   dK/dV: WGBW_KV_STAGES (3) Q/dO buffers, WGBW_KV_DEFER (1);
//   dQ:    WGBW_DQ_STAGES (2) K/V buffers, WGBW_DQ_DEFER (0), WGBW_DQ_BK (128) keys per step,
//          WGBW_DQ_SPLIT (1: a 128-key step as two 64-key halves, the second half's S/dP products
//          and the first half's dQ product overlapping the exp / dS of the other).
// DEFER 1: a step's last RS product (dK; dQ) stays in flight across the next step's barrier and
// is retired by the next step's first wait; the buffer written at the top of step j is then step
// j − 2's, so the loads run DIST = STAGES − 1 − DEFER steps ahead (STAGES >= 3 needed).
#ifndef WGBW_KV_STAGES
#define WGBW_KV_STAGES 3
#endif
#ifndef WGBW_KV_DEFER
#define WGBW_KV_DEFER 1
#endif
#ifndef WGBW_DQ_STAGES
#define WGBW_DQ_STAGES 2
#endif
#ifndef WGBW_DQ_DEFER
#define WGBW_DQ_DEFER 0
#endif
#ifndef WGBW_DQ_BK
#define WGBW_DQ_BK 128
#endif
#ifndef WGBW_DQ_SPLIT
#define WGBW_DQ_SPLIT 1
#endif
// WGBW_KV_LATE 1: dK/dV issues the cp.async loads of step + DIST after the step's Sᵀ/dPᵀ wgmmas (not
// before them), so the tensor cores start right after the barrier. Measured on the H200 (README.md,
// "Backward variants"): dK/dV 0.616 → 0.572–0.575 ms/layer at the 8B shape, gradients bitwise
// equal to fa2's; the default since the product's CUDA tests passed with it on the H200. The other
// variants measured that evening (dQ load/issue orders, warp-specialised dK/dV and dQ) were slower
// and were removed (their code: commit d479751).
#ifndef WGBW_KV_LATE
#define WGBW_KV_LATE 1
#endif

namespace wgbw {

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


constexpr int D = 128;
constexpr int THREADS = 256;
constexpr int KV_STAGES = WGBW_KV_STAGES, KV_DEFER = WGBW_KV_DEFER, KV_DIST = KV_STAGES - 1 - KV_DEFER;
constexpr int DQ_STAGES = WGBW_DQ_STAGES, DQ_DEFER = WGBW_DQ_DEFER, DQ_DIST = DQ_STAGES - 1 - DQ_DEFER;
static_assert(KV_STAGES <= 4 && (KV_DEFER == 0 || KV_DEFER == 1) && KV_DIST >= 1, "dK/dV stages / defer");
static_assert(DQ_STAGES <= 4 && (DQ_DEFER == 0 || DQ_DEFER == 1) && DQ_DIST >= 1, "dQ stages / defer");
constexpr float LOG2E = 1.4426950408889634f;

// ---- swizzled tiles of ROWS rows × 128 bf16 columns: two 64-column halves of ROWS·128 bytes ----
constexpr int ROW_BYTES = 128;
constexpr int TILE64 = 64 * 2 * ROW_BYTES;    // 16 KiB
constexpr int TILE128 = 128 * 2 * ROW_BYTES;  // 32 KiB
__host__ __device__ constexpr uint32_t swizzled(int rows, int row, int col) {
    return (uint32_t)((col / 64) * rows * ROW_BYTES + row * ROW_BYTES + ((((col % 64) / 8) ^ (row % 8)) * 16) +
                      (col % 8) * 2);
}
// K-major operand (d is the reduced dimension): rows row0 .. of a `rows`-row tile, k-step kk (d
// 16kk .. 16kk + 15). 8-row groups 1024 bytes apart; the second 64 d one half further.
__host__ __device__ constexpr uint64_t k_major(uint32_t tile, int rows, int row0, int kk) {
    return descriptor(tile + (kk / 4) * rows * ROW_BYTES + row0 * ROW_BYTES + (kk % 4) * 32, 16, 1024);
}
// MN-major operand B[k = row][n = d], all 128 d (two halves LBO = one half apart), k-step kk (rows
// 16kk .. 16kk + 15 of the tile).
__host__ __device__ constexpr uint64_t mn_major(uint32_t tile, int rows, int kk) {
    return descriptor(tile + kk * 16 * ROW_BYTES, rows * ROW_BYTES, 1024);
}

// ---- primitives ----
template <int N> __device__ __forceinline__ void cp_async_wait() {
    asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
}
// wait_group with an argument that is a constant after unrolling.
__device__ __forceinline__ void wgmma_wait_n(int n) {
    switch (n) {
        case 0: wgmma_wait<0>(); break;
        case 1: wgmma_wait<1>(); break;
        case 2: wgmma_wait<2>(); break;
        default: wgmma_wait<3>(); break;
    }
}

#define WGBW_D4(i) "+f"(d[i]), "+f"(d[i + 1]), "+f"(d[i + 2]), "+f"(d[i + 3])
#define WGBW_D16(i) WGBW_D4(i), WGBW_D4(i + 4), WGBW_D4(i + 8), WGBW_D4(i + 12)
#define WGBW_R32 "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, " \
                 "%20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31}"
#define WGBW_R64 "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, " \
                 "%20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, %32, %33, %34, %35, %36, %37, "  \
                 "%38, %39, %40, %41, %42, %43, %44, %45, %46, %47, %48, %49, %50, %51, %52, %53, %54, %55, "  \
                 "%56, %57, %58, %59, %60, %61, %62, %63}"

// d (64 × 64 f32) = A·B (+ d when accumulate != 0); A 64 × 16, B 16 × 64, both K-major in smem.
__device__ __forceinline__ void mma_ss_m64n64(float (&d)[32], uint64_t a, uint64_t b, int accumulate) {
    asm volatile(
        "{\n.reg .pred p;\nsetp.ne.b32 p, %34, 0;\n"
        "wgmma.mma_async.sync.aligned.m64n64k16.f32.bf16.bf16 " WGBW_R32 ", %32, %33, p, 1, 1, 0, 0;\n}\n"
        : WGBW_D16(0), WGBW_D16(16)
        : "l"(a), "l"(b), "r"(accumulate));
}
// d (64 × 128 f32) = A·B (+ d when accumulate != 0); A 64 × 16, B 16 × 128, both K-major in smem.
__device__ __forceinline__ void mma_ss_m64n128(float (&d)[64], uint64_t a, uint64_t b, int accumulate) {
    asm volatile(
        "{\n.reg .pred p;\nsetp.ne.b32 p, %66, 0;\n"
        "wgmma.mma_async.sync.aligned.m64n128k16.f32.bf16.bf16 " WGBW_R64 ", %64, %65, p, 1, 1, 0, 0;\n}\n"
        : WGBW_D16(0), WGBW_D16(16), WGBW_D16(32), WGBW_D16(48)
        : "l"(a), "l"(b), "r"(accumulate));
}
__device__ __forceinline__ void mma_ss(float (&d)[32], uint64_t a, uint64_t b, int accumulate) {
    mma_ss_m64n64(d, a, b, accumulate);
}
__device__ __forceinline__ void mma_ss(float (&d)[64], uint64_t a, uint64_t b, int accumulate) {
    mma_ss_m64n128(d, a, b, accumulate);
}
// d (64 × 128 f32) = A·B (+ d when accumulate != 0); A 64 × 16 bf16 from registers (a0..a3), B
// 16 × 128 MN-major in smem (imm-trans-b 1).
__device__ __forceinline__ void mma_rs_m64n128_tb(float (&d)[64], uint32_t a0, uint32_t a1, uint32_t a2, uint32_t a3,
                                                  uint64_t b, int accumulate) {
    asm volatile(
        "{\n.reg .pred p;\nsetp.ne.b32 p, %69, 0;\n"
        "wgmma.mma_async.sync.aligned.m64n128k16.f32.bf16.bf16 " WGBW_R64
        ", {%64, %65, %66, %67}, %68, p, 1, 1, 1;\n}\n"
        : WGBW_D16(0), WGBW_D16(16), WGBW_D16(32), WGBW_D16(48)
        : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "l"(b), "r"(accumulate));
}

// ROWS rows × 128 columns of src (row stride `stride` elements; rows at or past `available`
// zero-filled) into the swizzled ROWS-row tile at `tile`; all THREADS threads, consecutive threads
// on consecutive 16-byte chunks of a row.
template <int ROWS>
__device__ __forceinline__ void load_tile(uint32_t tile, const bf16* __restrict__ src, int available, int stride) {
#pragma unroll 1
    for (int pass = 0; pass < ROWS * 16 / THREADS; ++pass) {
        const int index = threadIdx.x + pass * THREADS;
        const int r = index / 16, c = (index % 16) * 8;
        const bool inside = r < available;
        cp_async16(tile + swizzled(ROWS, r, c), inside ? src + (size_t)r * stride + c : src, inside);
    }
}

// The four bf16 A fragments of k-step kk from a 64 × 64 accumulator (header of the forward file:
// k-step kk = columns 16kk .. 16kk + 15 = accumulator blocks J = 2kk, 2kk + 1).
template <int N> __device__ __forceinline__ void pack_fragments(uint32_t (&f)[N], const float (&x)[2 * N]) {
#pragma unroll
    for (int i = 0; i < N; ++i) f[i] = pack_bf16(x[2 * i], x[2 * i + 1]);
}

// acc (rows row0, row0 + 8 of this thread: acc[4J + 2·half + odd] = column 8J + 2t + odd) × factor
// to global rows (dst row r at dst + r·stride); rows at or past `rows` skipped.
__device__ __forceinline__ void store_rows(bf16* __restrict__ out, const float (&acc)[64], float factor, int b, int h,
                                           int heads, int length, int bthd, int row0, int t) {
#pragma unroll
    for (int half = 0; half < 2; ++half) {
        const int row = row0 + 8 * half;
        if (row >= length) continue;
        bf16* dst = out + row_offset(b, h, row, heads, length, bthd) + 2 * t;
#pragma unroll
        for (int j = 0; j < 16; ++j)
            *reinterpret_cast<uint32_t*>(dst + 8 * j) =
                pack_bf16(acc[4 * j + 2 * half] * factor, acc[4 * j + 2 * half + 1] * factor);
    }
}

// ---------------------------------------------------------------------------------------------
// dK / dV.
constexpr int KV_BK = 128, KV_BQ = 64;
constexpr int KV_K = 0, KV_V = TILE128, KV_QD = 2 * TILE128;  // stage s: Q at KV_QD + s·2·TILE64, dO + TILE64
constexpr int KV_ROWS = KV_QD + KV_STAGES * 2 * TILE64;         // [KV_STAGES][lse·log2e 64 | delta 64] f32
constexpr int DKDV_SMEM = KV_ROWS + KV_STAGES * 2 * KV_BQ * 4 + 1024;

__device__ __forceinline__ void backward_dkdv(const bf16* __restrict__ q, const bf16* __restrict__ k,
                                              const bf16* __restrict__ v, const unsigned char* __restrict__ valid,
                                              const bf16* __restrict__ grad, const float* __restrict__ lse,
                                              const float* __restrict__ delta, bf16* __restrict__ dk,
                                              bf16* __restrict__ dv, int heads, int kv_heads, int queries, int keys,
                                              int offset, int causal, float scale, int q_bthd, int kv_bthd) {
    require_smem(DKDV_SMEM);
    extern __shared__ __align__(1024) unsigned char smem_raw[];
    const uint32_t raw = smem_address(smem_raw);
    const uint32_t base = (raw + 1023u) & ~1023u;
    unsigned char* const smem = smem_raw + (base - raw);
    float* const rows0 = reinterpret_cast<float*>(smem + KV_ROWS);

    const int tid = threadIdx.x, wg = tid / 128, u = (tid % 128) / 32, lane = tid % 32, g = lane / 4, t = lane % 4;
    const int linear = blockIdx.y * gridDim.x + blockIdx.x;
    const int bkv = linear % gridDim.y, tile = linear / gridDim.y;
    const int b = bkv / kv_heads, kvh = bkv % kv_heads;
    const int group = heads / kv_heads;
    const int k0 = tile * KV_BK;
    const int warp_k0 = k0 + 64 * wg + 16 * u;
    const int key0 = warp_k0 + g;  // the key of acc[4J + 0, 1]; key0 + 8: acc[4J + 2, 3]
    const unsigned char* valid_row = valid ? valid + (size_t)b * keys : nullptr;
    const float scale_log2 = scale * LOG2E;
    const int first_query = causal ? max(0, k0 - offset) : 0;
    const int q_start = (first_query / KV_BQ) * KV_BQ;
    const int tiles = queries > q_start ? (queries - q_start + KV_BQ - 1) / KV_BQ : 0;
    const int steps = group * tiles;
    const int qst = row_stride(heads, q_bthd), kst = row_stride(kv_heads, kv_bthd);
    const uint32_t kt = base + KV_K, vt = base + KV_V;

    const size_t k_row0 = row_offset(b, kvh, k0, kv_heads, keys, kv_bthd);
    load_tile<128>(kt, k + k_row0, keys - k0, kst);
    load_tile<128>(vt, v + k_row0, keys - k0, kst);
    bool row_ok[2];
#pragma unroll
    for (int half = 0; half < 2; ++half) {
        const int key = key0 + 8 * half;
        row_ok[half] = key < keys && (valid_row == nullptr || valid_row[key] != 0);
    }

    // Step `step` = (head kvh·group + step / tiles, query tile q_start + 64·(step % tiles)). Thread
    // r < 64 reads row r's lse, thread 64 + r its delta, into `pending`; `stash` stores it later
    // (lse·log2 e, +inf where the row sees nothing or does not exist: P = 0 there).
    float pending = 0.0f;
    auto issue = [&](int step) {
        const int buffer = step % KV_STAGES;
        const int h = kvh * group + step / tiles, bh = b * heads + h;
        const int tq0 = q_start + KV_BQ * (step % tiles);
        const uint32_t qt = base + KV_QD + buffer * 2 * TILE64;
        const size_t q_row0 = row_offset(b, h, tq0, heads, queries, q_bthd);
        load_tile<64>(qt, q + q_row0, queries - tq0, qst);
        load_tile<64>(qt + TILE64, grad + q_row0, queries - tq0, qst);
        const int r = tid % 64;
        const bool inside = tid < 128 && tq0 + r < queries;
        if (tid < 64) pending = inside ? lse[(size_t)bh * queries + tq0 + r] : -INFINITY;
        else pending = inside ? delta[(size_t)bh * queries + tq0 + r] : 0.0f;
    };
    auto stash = [&](int step) {
        float* rows = rows0 + (step % KV_STAGES) * 2 * KV_BQ;
        if (tid < 64) rows[tid] = pending == -INFINITY ? INFINITY : pending * LOG2E;
        else if (tid < 128) rows[tid] = pending;
    };
#pragma unroll 1
    for (int i = 0; i < KV_DIST; ++i) {
        if (i < steps) {
            issue(i);
            stash(i);  // (waits for the loads once, in the prologue)
        }
        cp_async_commit();
    }

    // No accumulator is initialised by ordinary instructions before the loop: the first wgmma of
    // each product has scale-d 0 (S, dP: k-step 0; dK, dV: step 0, k-step 0). A zero-filled dK/dV
    // merging into the loop header next to an in-flight product makes ptxas serialise every wgmma
    // of the kernel (C7515) with KV_DEFER. S, dP are per-step values.
    float acc_dk[64], acc_dv[64];
    uint32_t pa[16], da[16];  // live across the loop with KV_DEFER (the products in flight read them)

#pragma unroll 1
    for (int step = 0; step < steps; ++step) {
        const int buffer = step % KV_STAGES;
        cp_async_wait<KV_DIST - 1>();
        fence_proxy_async();
        __syncthreads();  // this step's Q, dO (and K, V) landed and are visible to wgmma; its lse/delta
                          // stashed; every warpgroup finished the wgmma of step − 1 − KV_DEFER (waited
                          // for in step − 1 − KV_DEFER, or with KV_DEFER before step − 1's exp), so that
                          // step's buffers are free for step + KV_DIST
        const bool ahead = step + KV_DIST < steps;
#if !WGBW_KV_LATE
        if (ahead) issue(step + KV_DIST);
        cp_async_commit();
#endif
        const int tq0 = q_start + KV_BQ * (step % tiles);
        const uint32_t qt = base + KV_QD + buffer * 2 * TILE64, dt = qt + TILE64;
        const float* rows = rows0 + buffer * 2 * KV_BQ;
        const bool mask =
            valid_row != nullptr || k0 + KV_BK > keys || (causal && warp_k0 + 15 > offset + tq0);

        float s[32], dp[32];
        wgmma_fence();
#pragma unroll
        for (int kk = 0; kk < D / 16; ++kk) mma_ss_m64n64(s, k_major(kt, 128, 64 * wg, kk), k_major(qt, 64, 0, kk), kk > 0);
        wgmma_commit();
#pragma unroll
        for (int kk = 0; kk < D / 16; ++kk) mma_ss_m64n64(dp, k_major(vt, 128, 64 * wg, kk), k_major(dt, 64, 0, kk), kk > 0);
        wgmma_commit();
#if WGBW_KV_LATE
        if (ahead) issue(step + KV_DIST);
        cp_async_commit();
#endif
        wgmma_wait<1>();
        fence_registers(s);
        // Pᵀ: s[4J + e] = key key0 + 8(e >> 1), query tq0 + 8J + 2t + (e & 1).
#pragma unroll
        for (int j = 0; j < 8; ++j) {
            const float2 l = *reinterpret_cast<const float2*>(rows + 8 * j + 2 * t);
#pragma unroll
            for (int e = 0; e < 4; ++e) {
                const int c = 8 * j + 2 * t + (e & 1);
                float p = exp2_ftz(fmaf(s[4 * j + e], scale_log2, -((e & 1) ? l.y : l.x)));
                if (mask && !(row_ok[e >> 1] && (!causal || key0 + 8 * (e >> 1) <= offset + tq0 + c))) p = 0.0f;
                s[4 * j + e] = p;
            }
        }
        pack_fragments(pa, s);
        fence_registers(acc_dv);
        fence_registers(pa);
        wgmma_fence();
#pragma unroll
        for (int kk = 0; kk < KV_BQ / 16; ++kk)
            mma_rs_m64n128_tb(acc_dv, pa[4 * kk], pa[4 * kk + 1], pa[4 * kk + 2], pa[4 * kk + 3], mn_major(dt, 64, kk),
                              step > 0 || kk > 0);
        wgmma_commit();
        wgmma_wait<1>();  // Sᵀ and dPᵀ done (the dV group may still run)
        fence_registers(dp);
#pragma unroll
        for (int j = 0; j < 8; ++j) {
            const float2 dl = *reinterpret_cast<const float2*>(rows + KV_BQ + 8 * j + 2 * t);
#pragma unroll
            for (int e = 0; e < 4; ++e) dp[4 * j + e] = s[4 * j + e] * (dp[4 * j + e] - ((e & 1) ? dl.y : dl.x));
        }
        pack_fragments(da, dp);
        fence_registers(acc_dk);
        fence_registers(da);
        wgmma_fence();
#pragma unroll
        for (int kk = 0; kk < KV_BQ / 16; ++kk)
            mma_rs_m64n128_tb(acc_dk, da[4 * kk], da[4 * kk + 1], da[4 * kk + 2], da[4 * kk + 3], mn_major(qt, 64, kk),
                              step > 0 || kk > 0);
        wgmma_commit();
        if (ahead) stash(step + KV_DIST);
        if (!KV_DEFER) {
            wgmma_wait<0>();
            fence_registers(acc_dv);
            fence_registers(acc_dk);
            fence_registers(pa);
            fence_registers(da);
        }
    }
    wgmma_wait<0>();
    fence_registers(acc_dv);
    fence_registers(acc_dk);
    if (steps == 0) {  // no query sees these keys
#pragma unroll
        for (int i = 0; i < 64; ++i) acc_dk[i] = acc_dv[i] = 0.0f;
    }
    cp_async_wait<0>();
    store_rows(dk, acc_dk, scale, b, kvh, kv_heads, keys, kv_bthd, key0, t);
    store_rows(dv, acc_dv, 1.0f, b, kvh, kv_heads, keys, kv_bthd, key0, t);
}

// ---------------------------------------------------------------------------------------------
// dQ.
constexpr int DQ_BQ = 128, DQ_BK = WGBW_DQ_BK;  // key tile 64 or 128 (S, dP: DQ_BK / 2 floats each)
constexpr int DQ_KVTILE = DQ_BK * 2 * ROW_BYTES;
constexpr int DQ_Q = 0, DQ_DO = TILE128, DQ_KV = 2 * TILE128;  // stage s: K at DQ_KV + s·2·DQ_KVTILE, V after
constexpr int DQ_FLAGS = DQ_KV + DQ_STAGES * 2 * DQ_KVTILE;       // [DQ_STAGES][DQ_BK] key flags
constexpr int DQ_SMEM = DQ_FLAGS + DQ_STAGES * DQ_BK + 1024;

__device__ __forceinline__ void backward_dq(const bf16* __restrict__ q, const bf16* __restrict__ k,
                                            const bf16* __restrict__ v, const unsigned char* __restrict__ valid,
                                            const bf16* __restrict__ grad, const float* __restrict__ lse,
                                            const float* __restrict__ delta, bf16* __restrict__ dq, int heads,
                                            int kv_heads, int queries, int keys, int offset, int causal, float scale,
                                            int q_bthd, int kv_bthd) {
    constexpr int BK = DQ_BK;
    require_smem(DQ_SMEM);
    extern __shared__ __align__(1024) unsigned char smem_raw[];
    const uint32_t raw = smem_address(smem_raw);
    const uint32_t base = (raw + 1023u) & ~1023u;
    unsigned char* const smem = smem_raw + (base - raw);
    unsigned char* const flags0 = smem + DQ_FLAGS;

    const int tid = threadIdx.x, wg = tid / 128, u = (tid % 128) / 32, lane = tid % 32, g = lane / 4, t = lane % 4;
    int tile, bh;
    if (!causal) {
        tile = blockIdx.x;
        bh = blockIdx.y;
    } else {  // fa2::query_tile_order: heads fastest, the last (heaviest) query tiles first
        const int linear = blockIdx.y * gridDim.x + blockIdx.x;
        tile = gridDim.x - 1 - linear / gridDim.y;
        bh = linear % gridDim.y;
    }
    const int b = bh / heads, h = bh % heads;
    const int kvh = h / (heads / kv_heads);
    const int q0 = tile * DQ_BQ;
    const int wg_q0 = q0 + 64 * wg;
    const int warp_q0 = wg_q0 + 16 * u;
    const int row0 = warp_q0 + g;  // the query of acc[4J + 0, 1]; row0 + 8: acc[4J + 2, 3]
    const int qst = row_stride(heads, q_bthd), kst = row_stride(kv_heads, kv_bthd);
    const bf16* kb = k + row_offset(b, kvh, 0, kv_heads, keys, kv_bthd);
    const bf16* vb = v + row_offset(b, kvh, 0, kv_heads, keys, kv_bthd);
    const unsigned char* valid_row = valid ? valid + (size_t)b * keys : nullptr;
    const float scale_log2 = scale * LOG2E;
    const int last_row = min(q0 + DQ_BQ, queries) - 1;
    const int key_end = causal ? min(keys, offset + last_row + 1) : keys;
    const int steps = key_end > 0 ? (key_end + BK - 1) / BK : 0;
    // Keys this warpgroup can see end before wg_key_end (causal); it skips tiles past it.
    const int wg_key_end = causal ? min(keys, offset + min(wg_q0 + 64, queries)) : keys;
    const uint32_t qs = base + DQ_Q, dos = base + DQ_DO;

    const size_t q_row0 = row_offset(b, h, q0, heads, queries, q_bthd);
    load_tile<128>(qs, q + q_row0, queries - q0, qst);
    load_tile<128>(dos, grad + q_row0, queries - q0, qst);
    bool pending = false;
    auto issue = [&](int step) {
        const int buffer = step % DQ_STAGES, tk0 = step * BK;
        const uint32_t kt = base + DQ_KV + buffer * 2 * DQ_KVTILE;
        load_tile<BK>(kt, kb + (size_t)tk0 * kst, keys - tk0, kst);
        load_tile<BK>(kt + DQ_KVTILE, vb + (size_t)tk0 * kst, keys - tk0, kst);
        pending = tid < BK && tk0 + tid < keys && (valid_row == nullptr || valid_row[tk0 + tid] != 0);
    };
    auto stash = [&](int step) {
        if (tid < BK) flags0[(step % DQ_STAGES) * BK + tid] = pending;
    };
#pragma unroll 1
    for (int i = 0; i < DQ_DIST; ++i) {
        if (i < steps) {
            issue(i);
            stash(i);
        }
        cp_async_commit();
    }
    // lse·log2 e (+inf: no visible key or no such row) and delta of rows row0, row0 + 8.
    float row_lse[2], row_delta[2];
#pragma unroll
    for (int half = 0; half < 2; ++half) {
        const int row = row0 + 8 * half;
        const bool inside = row < queries;
        const float l = inside ? lse[(size_t)bh * queries + row] : -INFINITY;
        row_lse[half] = l == -INFINITY ? INFINITY : l * LOG2E;
        row_delta[half] = inside ? delta[(size_t)bh * queries + row] : 0.0f;
    }

    // As in dK/dV: no accumulator zero-filled before the loop (scale-d 0 on the first k-step of
    // the first step instead). Step 0 is computed iff wg_key_end > 0.
    // A step's BK keys are NH halves of BH keys (NH = 2 with WGBW_DQ_SPLIT and BK = 128): S_0, dP_0,
    // S_1, dP_1 issued as four commit groups; half h's exp runs while the later products do, and
    // dQ += dS_0·K_0 is issued before half 1's dS is formed.
    constexpr int NH = (WGBW_DQ_SPLIT && BK == 128) ? 2 : 1, BH = BK / NH;
    float acc[64];
    uint32_t da[NH][BH / 4];
    auto fence_da = [&] {
#pragma unroll
        for (int hh = 0; hh < NH; ++hh) fence_registers(da[hh]);
    };

#pragma unroll 1
    for (int step = 0; step < steps; ++step) {
        const int buffer = step % DQ_STAGES;
        cp_async_wait<DQ_DIST - 1>();
        fence_proxy_async();
        __syncthreads();
        const bool ahead = step + DQ_DIST < steps;
        if (ahead) issue(step + DQ_DIST);
        cp_async_commit();
        const int k0 = step * BK;
        if (k0 < wg_key_end) {
            const uint32_t kt = base + DQ_KV + buffer * 2 * DQ_KVTILE, vt = kt + DQ_KVTILE;
            const unsigned char* flags = flags0 + buffer * BK;
            const bool mask = valid_row != nullptr || k0 + BK > keys || (causal && k0 + BK - 1 > offset + warp_q0);
            float s[NH][BH / 2], dp[NH][BH / 2];
            wgmma_fence();
#pragma unroll
            for (int hh = 0; hh < NH; ++hh) {
#pragma unroll
                for (int kk = 0; kk < D / 16; ++kk)
                    mma_ss(s[hh], k_major(qs, 128, 64 * wg, kk), k_major(kt, BK, BH * hh, kk), kk > 0);
                wgmma_commit();
#pragma unroll
                for (int kk = 0; kk < D / 16; ++kk)
                    mma_ss(dp[hh], k_major(dos, 128, 64 * wg, kk), k_major(vt, BK, BH * hh, kk), kk > 0);
                wgmma_commit();
            }
#pragma unroll
            for (int hh = 0; hh < NH; ++hh) {
                // Groups issued after S_hh: the later SS groups and hh dQ groups.
                wgmma_wait_n(2 * NH - 1 - hh);  // S_hh done (and, with DQ_DEFER, the previous step's dQ)
                fence_registers(s[hh]);
                // P: s[hh][4J + e] = query row0 + 8(e >> 1), key k0 + BH·hh + 8J + 2t + (e & 1).
#pragma unroll
                for (int j = 0; j < BH / 8; ++j)
#pragma unroll
                    for (int e = 0; e < 4; ++e) {
                        const int c = BH * hh + 8 * j + 2 * t + (e & 1);
                        float p = exp2_ftz(fmaf(s[hh][4 * j + e], scale_log2, -row_lse[e >> 1]));
                        if (mask && !(flags[c] != 0 && (!causal || k0 + c <= offset + row0 + 8 * (e >> 1)))) p = 0.0f;
                        s[hh][4 * j + e] = p;
                    }
                wgmma_wait_n(2 * NH - 2 - hh);  // dP_hh done
                fence_registers(dp[hh]);
                fence_registers(acc);
                fence_registers(da[hh]);
#pragma unroll
                for (int i = 0; i < BH / 2; ++i) dp[hh][i] = s[hh][i] * (dp[hh][i] - row_delta[(i >> 1) & 1]);
                pack_fragments(da[hh], dp[hh]);
                fence_registers(acc);
                fence_registers(da[hh]);
                wgmma_fence();
#pragma unroll
                for (int kk = 0; kk < BH / 16; ++kk)
                    mma_rs_m64n128_tb(acc, da[hh][4 * kk], da[hh][4 * kk + 1], da[hh][4 * kk + 2], da[hh][4 * kk + 3],
                                      mn_major(kt, BK, (BH / 16) * hh + kk), step > 0 || hh > 0 || kk > 0);
                wgmma_commit();
            }
        } else if (DQ_DEFER) {
            // Skipped (and so are all later tiles): retire the in-flight dQ product, which reads a
            // K buffer that the next step's loads overwrite.
            wgmma_wait<0>();
            fence_registers(acc);
            fence_da();
        }
        if (ahead) stash(step + DQ_DIST);
        if (!DQ_DEFER) {
            wgmma_wait<0>();
            fence_registers(acc);
            fence_da();
        }
    }
    wgmma_wait<0>();
    fence_registers(acc);
    if (steps == 0 || wg_key_end <= 0) {  // these rows see no key
#pragma unroll
        for (int i = 0; i < 64; ++i) acc[i] = 0.0f;
    }
    cp_async_wait<0>();
    store_rows(dq, acc, scale, b, h, heads, queries, q_bthd, row0, t);
}

}  // namespace wgbw

extern "C" __global__ void __launch_bounds__(wgbw::THREADS, 1)
    flash_wgmma_backward_dkdv_bf16_d128(const wgbw::bf16* q, const wgbw::bf16* k, const wgbw::bf16* v,
                                        const unsigned char* valid, const wgbw::bf16* grad, const float* lse,
                                        const float* delta, wgbw::bf16* dk, wgbw::bf16* dv, int heads, int kv_heads,
                                        int queries, int keys, int offset, int causal, float scale, int q_bthd,
                                        int kv_bthd) {
#if defined(__CUDA_ARCH__) && defined(__CUDA_ARCH_FEAT_SM90_ALL)
    wgbw::backward_dkdv(q, k, v, valid, grad, lse, delta, dk, dv, heads, kv_heads, queries, keys, offset, causal, scale,
                        q_bthd, kv_bthd);
#else
    __trap();  // wgmma needs sm_90a
#endif
}

extern "C" __global__ void __launch_bounds__(wgbw::THREADS, 1)
    flash_wgmma_backward_dq_bf16_d128(const wgbw::bf16* q, const wgbw::bf16* k, const wgbw::bf16* v,
                                      const unsigned char* valid, const wgbw::bf16* grad, const float* lse,
                                      const float* delta, wgbw::bf16* dq, int heads, int kv_heads, int queries,
                                      int keys, int offset, int causal, float scale, int q_bthd, int kv_bthd) {
#if defined(__CUDA_ARCH__) && defined(__CUDA_ARCH_FEAT_SM90_ALL)
    wgbw::backward_dq(q, k, v, valid, grad, lse, delta, dq, heads, kv_heads, queries, keys, offset, causal, scale,
                      q_bthd, kv_bthd);
#else
    __trap();
#endif
}
