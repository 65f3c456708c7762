// Host program for the wgmma forwards (kernels/wgmma/forward.cuh): checks every variant (the
// Kernel enum below) against a double-precision CPU reference and against the fa2 d128 forward main
// launches (flash_mma_forward_bf16_d128 = fa2::forward_wide, from kernels/flash_attn.cu), checks
// strided heads bitwise and determinism, and times them all at the 8B shape. The TMA variants get
// their tensor maps from make_map (cuTensorMapEncodeTiled through cudaGetDriverEntryPointByVersion:
// no -lcuda). README.md has the commands and the H200 figures.
//
//   ./flash_wgmma_test host      CPU only: descriptor encodings (worked example), and an emulation
//                                of what wgmma reads through each descriptor (the canonical layouts
//                                of CUTLASS's make_gmma_desc) against the tiles as the kernel lays
//                                them out; runs anywhere
//   ./flash_wgmma_test [reps=20] host checks, then on the GPU: the primitive unit test (SS K-major
//                                and RS MN-major products of one 64 × 128 × 128 tile, both P·V
//                                forms), the forward cases, strided heads, the 8B-shape timing
//   ./flash_wgmma_test profile   one launch of each forward at the 8B shape (for ncu / nsys)
//
// Per forward case it prints, for each wgmma kernel and for fa2: max|o − ref| / max|ref| and
// max|lse − ref| over rows with a visible key (rows without one: lse −inf and o 0 exactly), then
// new against fa2: max|Δo|, max|Δo| / max|o_fa2| and max|Δlse| (not bitwise: the sums run in a
// different order).
#include "../../../kernels/flash_attn.cu"
#define WGFA_HARNESS  // the A/B entries of forward.cuh
#include "../../../kernels/wgmma/forward.cuh"

#include <cudaTypedefs.h>  // PFN_cuTensorMapEncodeTiled

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <random>
#include <vector>

#define CK(x)                                                                                    \
    do {                                                                                         \
        cudaError_t e_ = (x);                                                                    \
        if (e_ != cudaSuccess) {                                                                 \
            fprintf(stderr, "%s:%d %s: %s\n", __FILE__, __LINE__, #x, cudaGetErrorString(e_));   \
            exit(1);                                                                             \
        }                                                                                        \
    } while (0)

// ---------------------------------------------------------------------------------------------
// CPU-only checks of the layout arithmetic.

// What a wgmma operand read sees, from the descriptor alone, modelled on the canonical layouts
// (CUTLASS mma_traits_sm90_gmma.hpp, make_gmma_desc; element units T = 8 bf16 = 16 bytes):
//   K-major, 128B swizzle:  ((8, m), (T, 2)) : ((8T, SBO), (1, T))   LBO unused
//     → element (mn, k), k < 16, at start + (mn / 8)·SBO + (mn % 8)·128 + 2k
//   MN-major, 128B swizzle: ((T, 8, m), (8, k)) : ((1, T, LBO), (8T, SBO))
//     → element (k, mn) at start + (mn / 64)·LBO + (k / 8)·SBO + (k % 8)·128 + 2·(mn % 64)
// then the 128-byte swizzle on the absolute address: bits [4,7) ^= bits [7,10).
struct Decoded {
    uint32_t start, lbo, sbo, base_offset, mode;
};
static Decoded decode(uint64_t d) {
    return {(uint32_t)(d & 0x3FFF) << 4, (uint32_t)((d >> 16) & 0x3FFF) << 4, (uint32_t)((d >> 32) & 0x3FFF) << 4,
            (uint32_t)((d >> 49) & 7), (uint32_t)(d >> 62)};
}
static uint32_t swizzle128(uint32_t address) { return address ^ (((address >> 7) & 7) << 4); }
static uint32_t k_major_address(uint64_t d, int mn, int k) {
    const Decoded x = decode(d);
    return swizzle128(x.start + (mn / 8) * x.sbo + (mn % 8) * 128 + 2 * k);
}
static uint32_t mn_major_address(uint64_t d, int k, int mn) {
    const Decoded x = decode(d);
    return swizzle128(x.start + (mn / 64) * x.lbo + (k / 8) * x.sbo + (k % 8) * 128 + 2 * (mn % 64));
}

static bool host_checks() {
    bool ok = true;
    // Worked example (DESIGN.md): the tiles at a hypothetical 1024-aligned base 0x400.
    const uint32_t base = 0x400, qs = base + wgfa::Q_OFFSET, ks = base + wgfa::K_OFFSET, vs = base + wgfa::V_OFFSET;
    struct Expect {
        const char* what;
        uint64_t got, want;
    } expect[] = {
        {"Q  wg0 kk0", wgfa::k_major(qs, 0, 0), 0x4000004000010040ull},
        {"Q  wg0 kk1", wgfa::k_major(qs, 0, 1), 0x4000004000010042ull},
        {"Q  wg1 kk0", wgfa::k_major(qs, 64, 0), 0x4000004000010240ull},
        {"Q  wg0 kk4", wgfa::k_major(qs, 0, 4), 0x4000004000010440ull},
        {"K0 kk0    ", wgfa::k_major(ks, 0, 0), 0x4000004000010840ull},
        {"K0 kk1    ", wgfa::k_major(ks, 0, 1), 0x4000004000010842ull},
        {"V0 kk0    ", wgfa::mn_major(vs, 0), 0x4000004004001840ull},
        {"V0 kk1    ", wgfa::mn_major(vs, 1), 0x40000040040018C0ull},
    };
    printf("descriptors at smem base 0x%x (hand-computed in DESIGN.md):\n", base);
    for (const auto& e : expect) {
        const Decoded d = decode(e.got);
        const bool good = e.got == e.want;
        ok = ok && good;
        printf("  %s 0x%016llx start 0x%05x LBO %5u SBO %4u base_offset %u mode %u %s\n", e.what,
               (unsigned long long)e.got, d.start, d.lbo, d.sbo, d.base_offset, d.mode, good ? "ok" : "MISMATCH");
    }

    // A shared-memory image with Q, K[0..1], V[0..1] laid out by the kernel's swizzled_offset; each
    // element holds a code of (tile, row, col); every operand read of every k-step must find the
    // element the kernel means.
    const uint32_t img_base = 0x2400;  // any 1024-aligned shared address
    std::vector<uint32_t> image(256 * 1024 / 2, 0xFFFFFFFFu);  // 2-byte slots, code per slot
    auto code = [](int tile, int row, int col) { return (uint32_t)(tile << 16 | row << 8 | col); };
    const uint32_t tiles[5] = {wgfa::Q_OFFSET, wgfa::K_OFFSET, wgfa::K_OFFSET + wgfa::TILE_BYTES, wgfa::V_OFFSET,
                               wgfa::V_OFFSET + wgfa::TILE_BYTES};
    int collisions = 0;
    for (int tile = 0; tile < 5; ++tile)
        for (int r = 0; r < 128; ++r)
            for (int c = 0; c < 128; ++c) {
                const uint32_t a = img_base + tiles[tile] + wgfa::swizzled_offset(r, c);
                if (image[a / 2] != 0xFFFFFFFFu) ++collisions;
                image[a / 2] = code(tile, r, c);
            }
    const uint32_t end = img_base + 5 * wgfa::TILE_BYTES;
    long bad = 0, reads = 0;
    auto at = [&](uint32_t a) -> uint32_t { return a >= end || (a & 1) ? 0xEEEEEEEEu : image[a / 2]; };
    for (int tile = 0; tile < 5; ++tile) {
        const uint32_t t0 = img_base + tiles[tile];
        for (int kk = 0; kk < 8; ++kk) {
            if (tile <= 2) {
                // K-major reads: Q as A (rows 64·wg .., m = 64), K as B (n = 128 keys).
                const int groups = tile == 0 ? 2 : 1;
                for (int wg = 0; wg < groups; ++wg) {
                    const int row0 = tile == 0 ? 64 * wg : 0, rows = tile == 0 ? 64 : 128;
                    const uint64_t d = wgfa::k_major(t0, row0, kk);
                    for (int mn = 0; mn < rows; ++mn)
                        for (int k = 0; k < 16; ++k, ++reads)
                            bad += at(k_major_address(d, mn, k)) != code(tile, row0 + mn, 16 * kk + k);
                }
            } else {
                // MN-major reads of V: B[k][n] = V[16kk + k][n], n = 0..127, with LBO (n128) and per half (n64).
                const uint64_t d = wgfa::mn_major(t0, kk);
                for (int k = 0; k < 16; ++k)
                    for (int n = 0; n < 128; ++n, ++reads)
                        bad += at(mn_major_address(d, k, n)) != code(tile, 16 * kk + k, n);
                for (int half = 0; half < 2; ++half) {
                    const uint64_t dh = wgfa::mn_major_half(t0, kk, half);
                    for (int k = 0; k < 16; ++k)
                        for (int n = 0; n < 64; ++n, ++reads)
                            bad += at(mn_major_address(dh, k, n)) != code(tile, 16 * kk + k, 64 * half + n);
                }
            }
        }
    }
    // cp.async chunks: 16-byte aligned destinations, and the 8 chunks of a half-row in 8 distinct
    // 16-byte bank groups (conflict-free stores).
    int misaligned = 0, conflicts = 0;
    for (int r = 0; r < 128; ++r)
        for (int hc = 0; hc < 2; ++hc) {
            unsigned seen = 0;
            for (int c = 0; c < 8; ++c) {
                const uint32_t o = wgfa::swizzled_offset(r, 64 * hc + 8 * c);
                misaligned += o % 16 != 0;
                seen |= 1u << ((o / 16) % 8);
            }
            conflicts += seen != 0xFFu;
        }
    const bool layout_ok = collisions == 0 && bad == 0 && misaligned == 0 && conflicts == 0;
    ok = ok && layout_ok;
    printf("layout emulation: %ld operand element reads, %ld wrong; %d slot collisions; %d misaligned chunks; "
           "%d half-rows with bank-group conflicts: %s\n",
           reads, bad, collisions, misaligned, conflicts, layout_ok ? "ok" : "FAIL");
    printf("shared memory per block: %d bytes (%d for tiles + flags, 1024 alignment slack)\n", wgfa::SMEM_BYTES,
           wgfa::SMEM_BYTES - 1024);
    return ok;
}

// ---------------------------------------------------------------------------------------------
// GPU checks.

struct Shape {
    int B, H, KVH, T, S, causal;
    bool masked;  // some keys invalid
};
constexpr int D = 128;

struct Buffers {
    Shape sh;
    int q_bthd = 0, kv_bthd = 0;
    size_t nq, nk;
    bf16 *q, *k, *v, *o;
    float* lse;
    unsigned char* valid;
    std::vector<bf16> hq, hk, hv;
    std::vector<unsigned char> hvalid;
};

static float bf(bf16 x) { return __bfloat162float(x); }

static Buffers make(Shape sh, unsigned seed) {
    Buffers x;
    x.sh = sh;
    x.nq = (size_t)sh.B * sh.H * sh.T * D;
    x.nk = (size_t)sh.B * sh.KVH * sh.S * D;
    std::mt19937 rng(seed);
    std::uniform_real_distribution<float> u(-1.0f, 1.0f);
    auto fill = [&](std::vector<bf16>& h, size_t n) {
        h.resize(n);
        for (auto& e : h) e = __float2bfloat16(u(rng));
    };
    fill(x.hq, x.nq);
    fill(x.hk, x.nk);
    fill(x.hv, x.nk);
    x.hvalid.assign((size_t)sh.B * sh.S, 1);
    if (sh.masked)
        for (size_t i = 0; i < x.hvalid.size(); ++i) x.hvalid[i] = (rng() % 5) != 0;
    CK(cudaMalloc(&x.q, x.nq * 2));
    CK(cudaMalloc(&x.o, x.nq * 2));
    CK(cudaMalloc(&x.k, x.nk * 2));
    CK(cudaMalloc(&x.v, x.nk * 2));
    CK(cudaMalloc(&x.lse, (size_t)sh.B * sh.H * sh.T * 4));
    CK(cudaMalloc(&x.valid, x.hvalid.size()));
    CK(cudaMemcpy(x.q, x.hq.data(), x.nq * 2, cudaMemcpyHostToDevice));
    CK(cudaMemcpy(x.k, x.hk.data(), x.nk * 2, cudaMemcpyHostToDevice));
    CK(cudaMemcpy(x.v, x.hv.data(), x.nk * 2, cudaMemcpyHostToDevice));
    CK(cudaMemcpy(x.valid, x.hvalid.data(), x.hvalid.size(), cudaMemcpyHostToDevice));
    return x;
}
static void release(Buffers& x) {
    void* p[] = {x.q, x.k, x.v, x.o, x.lse, x.valid};
    for (auto e : p) CK(cudaFree(e));
}
static float scale_of() { return 1.0f / std::sqrt((float)D); }
static const unsigned char* valid_of(const Buffers& x) { return x.sh.masked ? x.valid : nullptr; }

// Kernels under test: the build's pointer-interface wgmma forward (plain / WGFA_OVERLAP /
// WGFA_PV_N64), the warp-specialised TMA variants (forward_ws<STAGES, OVERLAP, PINGPONG>; "tma" =
// flash_wgmma_forward_tma_bf16_d128, the shipped configuration), and fa2 last.
// Suffixes: -f tree softmax (OPT 1), -fsm + skip rescale at alpha 1 + mask without flags (OPT 7).
// "persist" = flash_wgmma_forward_persistent_bf16_d128, the extern "C" name of p2-fsm.
enum Kernel {
    WGMMA, WS2_OV_PP, WS2_OV, WS2_PP, WS3_OV_PP, TMA, WS2_F, WS2_FSM, P2, P2_F, P2_FSM, P3_FSM, PERSIST, FA2, KERNELS
};
static const char* kernel_name[] = {"wgmma", "ws2-ov-pp", "ws2-ov", "ws2-pp", "ws3-ov-pp", "tma",     "ws2-f",
                                    "ws2-fsm", "p2",        "p2-f",   "p2-fsm", "p3-fsm",    "persist", "fa2"};

// cuTensorMapEncodeTiled through the runtime's driver entry point (no -lcuda needed).
static PFN_cuTensorMapEncodeTiled_v12000 encode_fn() {
    static PFN_cuTensorMapEncodeTiled_v12000 fn = nullptr;
    if (!fn) {
        void* p = nullptr;
        cudaDriverEntryPointQueryResult q;
        CK(cudaGetDriverEntryPointByVersion("cuTensorMapEncodeTiled", &p, 12000, cudaEnableDefault, &q));
        if (q != cudaDriverEntryPointSuccess || p == nullptr) {
            fprintf(stderr, "cuTensorMapEncodeTiled not found\n");
            exit(1);
        }
        fn = (PFN_cuTensorMapEncodeTiled_v12000)p;
    }
    return fn;
}
// The tensor map of one operand: [B, heads, length, D] (bthd 0) → dims {D, length, heads, B}, box
// {64, 128, 1, 1}; [B, length, heads, D] (bthd 1) → dims {D, heads, length, B}, box {64, 1, 128,
// 1} (strides growing either way); bf16, 128-byte swizzle, out-of-bounds rows read as zeros.
static CUtensorMap make_map(const bf16* base, int B, int heads, int length, int bthd) {
    alignas(64) CUtensorMap m;
    const cuuint64_t row = (cuuint64_t)D * 2;
    cuuint64_t dims[4], strides[3];
    cuuint32_t box[4];
    if (bthd) {
        dims[1] = heads, dims[2] = length, strides[0] = row, strides[1] = row * heads, box[1] = 1, box[2] = 128;
    } else {
        dims[1] = length, dims[2] = heads, strides[0] = row, strides[1] = row * length, box[1] = 128, box[2] = 1;
    }
    dims[0] = D, dims[3] = B, strides[2] = row * heads * length, box[0] = 64, box[3] = 1;
    const cuuint32_t element_strides[4] = {1, 1, 1, 1};
    const CUresult r = encode_fn()(&m, CU_TENSOR_MAP_DATA_TYPE_BFLOAT16, 4, (void*)base, dims, strides, box,
                                   element_strides, CU_TENSOR_MAP_INTERLEAVE_NONE, CU_TENSOR_MAP_SWIZZLE_128B,
                                   CU_TENSOR_MAP_L2_PROMOTION_L2_256B, CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE);
    if (r != CUDA_SUCCESS) {
        fprintf(stderr, "cuTensorMapEncodeTiled failed: %d\n", (int)r);
        exit(1);
    }
    return m;
}

template <int STAGES, bool OVERLAP, bool PINGPONG, int OPT = 0> static void launch_ws(Buffers& x, bool shipped) {
    const Shape& s = x.sh;
    const CUtensorMap tq = make_map(x.q, s.B, s.H, s.T, x.q_bthd), tk = make_map(x.k, s.B, s.KVH, s.S, x.kv_bthd),
                      tv = make_map(x.v, s.B, s.KVH, s.S, x.kv_bthd);
    const int smem = wgfa::WsLayout<STAGES>::BYTES;
    auto fn = shipped ? flash_wgmma_forward_tma_bf16_d128 : flash_wgmma_forward_ws<STAGES, OVERLAP, PINGPONG, OPT>;
    CK(cudaFuncSetAttribute(fn, cudaFuncAttributeMaxDynamicSharedMemorySize, smem));
    fn<<<dim3((s.T + wgfa::BQ - 1) / wgfa::BQ, s.B * s.H), wgfa::WS_THREADS, smem>>>(
        tq, tk, tv, valid_of(x), x.o, x.lse, s.H, s.KVH, s.T, s.S, s.S - s.T, s.causal, scale_of(), x.q_bthd, x.kv_bthd);
}

// The persistent variants (flash_wgmma_forward_persistent<STAGES, OPT>): one block per SM at most.
template <int STAGES, int OPT> static void launch_persistent(Buffers& x, bool shipped = false) {
    const Shape& s = x.sh;
    const CUtensorMap tq = make_map(x.q, s.B, s.H, s.T, x.q_bthd), tk = make_map(x.k, s.B, s.KVH, s.S, x.kv_bthd),
                      tv = make_map(x.v, s.B, s.KVH, s.S, x.kv_bthd);
    const int smem = wgfa::WsPersistentLayout<STAGES>::BYTES;
    static int sms = 0;
    if (sms == 0) {
        int device;
        CK(cudaGetDevice(&device));
        CK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device));
    }
    const int total = (s.T + wgfa::BQ - 1) / wgfa::BQ * s.B * s.H;
    auto fn = shipped ? flash_wgmma_forward_persistent_bf16_d128 : flash_wgmma_forward_persistent<STAGES, OPT>;
    CK(cudaFuncSetAttribute(fn, cudaFuncAttributeMaxDynamicSharedMemorySize, smem));
    fn<<<std::min(sms, total), wgfa::WS_THREADS, smem>>>(tq, tk, tv, valid_of(x), x.o, x.lse, s.B, s.H, s.KVH, s.T,
                                                         s.S, s.S - s.T, s.causal, scale_of(), x.q_bthd, x.kv_bthd);
}

static void forward(Buffers& x, int which) {
    const Shape& s = x.sh;
    if (which == WGMMA) {
        CK(cudaFuncSetAttribute(flash_wgmma_forward_bf16_d128, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                wgfa::SMEM_BYTES));
        flash_wgmma_forward_bf16_d128<<<dim3((s.T + wgfa::BQ - 1) / wgfa::BQ, s.B * s.H), wgfa::THREADS,
                                        wgfa::SMEM_BYTES>>>(x.q, x.k, x.v, valid_of(x), x.o, x.lse, s.H, s.KVH, s.T,
                                                            s.S, s.S - s.T, s.causal, scale_of(), x.q_bthd,
                                                            x.kv_bthd);
    } else if (which == WS2_OV_PP) {
        launch_ws<2, true, true>(x, false);
    } else if (which == WS2_OV) {
        launch_ws<2, true, false>(x, false);
    } else if (which == WS2_PP) {
        launch_ws<2, false, true>(x, false);
    } else if (which == WS3_OV_PP) {
        launch_ws<3, true, true>(x, false);
    } else if (which == TMA) {
        launch_ws<2, true, true>(x, true);
    } else if (which == WS2_F) {
        launch_ws<2, true, true, 1>(x, false);
    } else if (which == WS2_FSM) {
        launch_ws<2, true, true, 7>(x, false);
    } else if (which == P2) {
        launch_persistent<2, 0>(x);
    } else if (which == P2_F) {
        launch_persistent<2, 1>(x);
    } else if (which == P2_FSM) {
        launch_persistent<2, 7>(x);
    } else if (which == P3_FSM) {
        launch_persistent<3, 7>(x);
    } else if (which == PERSIST) {
        launch_persistent<2, 7>(x, true);
    } else {
        const int smem = fa2::forward_wide_smem<128>();
        CK(cudaFuncSetAttribute(flash_mma_forward_bf16_d128, cudaFuncAttributeMaxDynamicSharedMemorySize, smem));
        flash_mma_forward_bf16_d128<<<dim3((s.T + fa2::WIDE_FWD_BQ - 1) / fa2::WIDE_FWD_BQ, s.B * s.H),
                                      fa2::WIDE_FWD_NT, smem>>>(x.q, x.k, x.v, valid_of(x), x.o, x.lse, s.H, s.KVH,
                                                                s.T, s.S, s.S - s.T, s.causal, scale_of(), x.q_bthd,
                                                                x.kv_bthd);
    }
    CK(cudaGetLastError());
}

static std::vector<float> fetch(const bf16* p, size_t n) {
    std::vector<bf16> h(n);
    CK(cudaMemcpy(h.data(), p, n * 2, cudaMemcpyDeviceToHost));
    std::vector<float> f(n);
    for (size_t i = 0; i < n; ++i) f[i] = bf(h[i]);
    return f;
}
static std::vector<unsigned char> raw(const void* p, size_t bytes) {
    std::vector<unsigned char> h(bytes);
    CK(cudaMemcpy(h.data(), p, bytes, cudaMemcpyDeviceToHost));
    return h;
}
static std::vector<float> fetch_f32(const float* p, size_t n) {
    std::vector<float> h(n);
    CK(cudaMemcpy(h.data(), p, n * 4, cudaMemcpyDeviceToHost));
    return h;
}
// max|a − b| / max|b|
template <typename A, typename B> static double rel(const A& a, const B& b) {
    double diff = 0, mag = 0;
    for (size_t i = 0; i < a.size(); ++i) {
        if (!std::isfinite((double)a[i])) return INFINITY;
        diff = std::max(diff, std::fabs((double)a[i] - (double)b[i]));
        mag = std::max(mag, std::fabs((double)b[i]));
    }
    return mag > 0 ? diff / mag : diff;
}
template <typename A, typename B> static double max_abs(const A& a, const B& b) {
    double diff = 0;
    for (size_t i = 0; i < a.size(); ++i) {
        const double e = std::fabs((double)a[i] - (double)b[i]);
        if (!(e <= diff)) diff = std::isfinite(e) ? e : (a[i] == b[i] ? diff : INFINITY);  // equal infinities: 0
    }
    return diff;
}

// Double-precision reference: o and lse (−inf and o 0 for rows with no visible key); heads
// contiguous ([B, H, T, D]) as the host arrays are.
static void reference_forward(const Buffers& x, std::vector<double>& ro, std::vector<double>& rlse) {
    const Shape& s = x.sh;
    const int group = s.H / s.KVH, off = s.S - s.T;
    const double scale = 1.0 / std::sqrt((double)D);
    ro.assign(x.nq, 0);
    rlse.assign((size_t)s.B * s.H * s.T, -INFINITY);
    std::vector<double> p(s.S);
    for (int b = 0; b < s.B; ++b)
        for (int h = 0; h < s.H; ++h) {
            const size_t qb = ((size_t)b * s.H + h) * s.T * D, kb = ((size_t)b * s.KVH + h / group) * s.S * D;
            for (int i = 0; i < s.T; ++i) {
                double mx = -INFINITY;
                for (int j = 0; j < s.S; ++j) {
                    p[j] = -INFINITY;
                    if (!x.hvalid[(size_t)b * s.S + j] || (s.causal && j > off + i)) continue;
                    double acc = 0;
                    for (int d = 0; d < D; ++d) acc += (double)bf(x.hq[qb + (size_t)i * D + d]) * bf(x.hk[kb + (size_t)j * D + d]);
                    p[j] = acc * scale;
                    mx = std::max(mx, p[j]);
                }
                if (mx == -INFINITY) continue;
                double sum = 0;
                for (int j = 0; j < s.S; ++j) sum += p[j] == -INFINITY ? 0 : std::exp(p[j] - mx);
                rlse[((size_t)b * s.H + h) * s.T + i] = mx + std::log(sum);
                for (int j = 0; j < s.S; ++j) {
                    if (p[j] == -INFINITY) continue;
                    const double w = std::exp(p[j] - mx) / sum;
                    for (int d = 0; d < D; ++d) ro[qb + (size_t)i * D + d] += w * bf(x.hv[kb + (size_t)j * D + d]);
                }
            }
        }
}

static bool unit_test() {
    std::mt19937 rng(7);
    std::uniform_real_distribution<float> u(-1.0f, 1.0f);
    std::vector<bf16> ha(128 * 128), hb(128 * 128);
    for (auto& e : ha) e = __float2bfloat16(u(rng));
    for (auto& e : hb) e = __float2bfloat16(u(rng));
    // CPU: ss[m][n] = Σ_k a[m][k] b[n][k], rs[m][n] = Σ_k a[m][k] b[k][n], m < 64.
    std::vector<double> ss(64 * 128, 0), rs(64 * 128, 0);
    for (int m = 0; m < 64; ++m)
        for (int n = 0; n < 128; ++n)
            for (int k = 0; k < 128; ++k) {
                ss[m * 128 + n] += (double)bf(ha[m * 128 + k]) * bf(hb[n * 128 + k]);
                rs[m * 128 + n] += (double)bf(ha[m * 128 + k]) * bf(hb[k * 128 + n]);
            }
    bf16 *a, *b;
    float *css, *crs;
    CK(cudaMalloc(&a, ha.size() * 2));
    CK(cudaMalloc(&b, hb.size() * 2));
    CK(cudaMalloc(&css, 64 * 128 * 4));
    CK(cudaMalloc(&crs, 64 * 128 * 4));
    CK(cudaMemcpy(a, ha.data(), ha.size() * 2, cudaMemcpyHostToDevice));
    CK(cudaMemcpy(b, hb.data(), hb.size() * 2, cudaMemcpyHostToDevice));
    const int smem = 2 * wgfa::TILE_BYTES + 1024;
    bool ok = true;
    for (int n64 = 0; n64 < 2; ++n64) {
        auto fn = n64 ? wgmma_unit_test<true> : wgmma_unit_test<false>;
        CK(cudaFuncSetAttribute(fn, cudaFuncAttributeMaxDynamicSharedMemorySize, smem));
        CK(cudaMemset(css, 0xff, 64 * 128 * 4));
        CK(cudaMemset(crs, 0xff, 64 * 128 * 4));
        fn<<<1, 128, smem>>>(a, b, css, crs);
        CK(cudaGetLastError());
        CK(cudaDeviceSynchronize());
        const auto gss = fetch_f32(css, 64 * 128), grs = fetch_f32(crs, 64 * 128);
        const double ess = max_abs(gss, ss), ers = max_abs(grs, rs);
        // f32 accumulation of 128 exact bf16 products of magnitude < 1: |error| well under 1e-3.
        const bool good = ess < 1e-3 && ers < 1e-3;
        ok = ok && good;
        printf("  unit: S-path (SS, K-major) max|err| %.2e; P·V-path (RS, MN-major, %s) max|err| %.2e %s\n", ess,
               n64 ? "2 × m64n64" : "m64n128", ers, good ? "ok" : "FAIL");
        if (!good) {  // the first wrong elements: which rows / columns move where tells the layout bug
            int shown = 0;
            for (int i = 0; i < 64 * 128 && shown < 8; ++i)
                if (std::fabs(grs[i] - rs[i]) >= 1e-3 || std::fabs(gss[i] - ss[i]) >= 1e-3) {
                    printf("    [%2d][%3d] ss gpu %+.5f cpu %+.5f | rs gpu %+.5f cpu %+.5f\n", i / 128, i % 128, gss[i],
                           ss[i], grs[i], rs[i]);
                    ++shown;
                }
        }
    }
    void* p[] = {a, b, css, crs};
    for (auto e : p) CK(cudaFree(e));
    return ok;
}

static bool check_forward(Shape sh, const char* name) {
    Buffers x = make(sh, 4321);
    std::vector<double> ro, rlse;
    reference_forward(x, ro, rlse);
    bool ok = true;
    std::vector<float> out[KERNELS], outl[KERNELS];
    for (int w = 0; w < KERNELS; ++w) {
        CK(cudaMemset(x.o, 0xff, x.nq * 2));
        CK(cudaMemset(x.lse, 0xff, rlse.size() * 4));
        forward(x, w);
        CK(cudaDeviceSynchronize());
        out[w] = fetch(x.o, x.nq);
        outl[w] = fetch_f32(x.lse, rlse.size());
        const auto& o = out[w];
        const auto& l = outl[w];
        const double eo = rel(o, ro);
        double el = 0;
        int unseen = 0;
        bool exact = true;
        for (size_t r = 0; r < rlse.size(); ++r) {
            if (rlse[r] == -INFINITY) {
                ++unseen;
                exact = exact && l[r] == -INFINITY;
                for (int d = 0; d < D; ++d) exact = exact && o[r * D + d] == 0.0f;
            } else {
                el = std::isfinite(l[r]) ? std::max(el, std::fabs((double)l[r] - rlse[r])) : INFINITY;
            }
        }
        const bool good = eo < 2e-2 && el < 1e-3 && exact;
        ok = ok && good;
        printf("  %-34s %-9s: rel err o %.2e, abs err lse %.2e, %d rows without keys %s %s\n", name, kernel_name[w],
               eo, el, unseen, exact ? "exact" : "NOT EXACT", good ? "ok" : "FAIL");
    }
    for (int w = 0; w < FA2; ++w)
        printf("  %-34s %-9s vs fa2: max|do| %.2e, max|do|/max|o| %.2e, max|dlse| %.2e\n", name, kernel_name[w],
               max_abs(out[w], out[FA2]), rel(out[w], out[FA2]), max_abs(outl[w], outl[FA2]));
    release(x);
    return ok;
}

// [B, A, L, D] → [B, L, A, D] of 2-byte elements (`back`: the inverse).
static std::vector<unsigned char> swap_heads(const std::vector<unsigned char>& x, int B, int A, int L, bool back) {
    std::vector<unsigned char> y(x.size());
    for (int b = 0; b < B; ++b)
        for (int a = 0; a < A; ++a)
            for (int l = 0; l < L; ++l) {
                const size_t bald = (((size_t)b * A + a) * L + l) * D * 2, blad = (((size_t)b * L + l) * A + a) * D * 2;
                memcpy(&y[back ? bald : blad], &x[back ? blad : bald], D * 2);
            }
    return y;
}

// Heads stored [B, T, H, D] give the same bits as contiguous heads (after undoing the layout).
static bool check_strided(Shape sh, const char* name, int q_bthd, int kv_bthd, int which) {
    Buffers x = make(sh, 99);
    forward(x, which);
    CK(cudaDeviceSynchronize());
    const auto ro = raw(x.o, x.nq * 2);
    const auto rl = raw(x.lse, (size_t)sh.B * sh.H * sh.T * 4);
    auto bytes = [](const std::vector<bf16>& h) {
        return std::vector<unsigned char>((const unsigned char*)h.data(), (const unsigned char*)h.data() + h.size() * 2);
    };
    auto put = [](bf16* dst, const std::vector<unsigned char>& h) {
        CK(cudaMemcpy(dst, h.data(), h.size(), cudaMemcpyHostToDevice));
    };
    if (q_bthd) put(x.q, swap_heads(bytes(x.hq), sh.B, sh.H, sh.T, false));
    if (kv_bthd) {
        put(x.k, swap_heads(bytes(x.hk), sh.B, sh.KVH, sh.S, false));
        put(x.v, swap_heads(bytes(x.hv), sh.B, sh.KVH, sh.S, false));
    }
    x.q_bthd = q_bthd;
    x.kv_bthd = kv_bthd;
    CK(cudaMemset(x.o, 0xff, x.nq * 2));
    CK(cudaMemset(x.lse, 0xff, rl.size()));
    forward(x, which);
    CK(cudaDeviceSynchronize());
    auto so = raw(x.o, x.nq * 2);
    if (q_bthd) so = swap_heads(so, sh.B, sh.H, sh.T, true);
    const bool same = so == ro && raw(x.lse, rl.size()) == rl;
    printf("  %-34s %-9s strided q %d k/v %d: bitwise equal to contiguous: %s\n", name, kernel_name[which], q_bthd,
           kv_bthd, same ? "yes" : "NO");
    release(x);
    return same;
}

static float median_ms(int reps, Buffers& x, int w) {
    cudaEvent_t a, b;
    CK(cudaEventCreate(&a));
    CK(cudaEventCreate(&b));
    forward(x, w);  // warm-up
    std::vector<float> t;
    for (int r = 0; r < reps; ++r) {
        CK(cudaEventRecord(a));
        forward(x, w);
        CK(cudaEventRecord(b));
        CK(cudaEventSynchronize(b));
        float ms;
        CK(cudaEventElapsedTime(&ms, a, b));
        t.push_back(ms);
    }
    std::sort(t.begin(), t.end());
    CK(cudaEventDestroy(a));
    CK(cudaEventDestroy(b));
    return t[t.size() / 2];
}

static bool bench(Shape sh, const char* name, int reps) {
    Buffers x = make(sh, 42);
    double pairs = 0;  // visible (query, key) pairs over batch and heads
    for (int i = 0; i < sh.T; ++i) pairs += sh.causal ? std::min(sh.S, sh.S - sh.T + i + 1) : sh.S;
    pairs *= (double)sh.B * sh.H;
    const double flops = 4.0 * D * pairs;  // S = Q·Kᵀ and O = P·V
    printf("%s (B=%d H=%d KVH=%d T=%d S=%d D=%d causal=%d), median of %d:\n", name, sh.B, sh.H, sh.KVH, sh.T, sh.S, D,
           sh.causal, reps);
    float t[KERNELS];
    t[FA2] = median_ms(reps, x, FA2);
    printf("  forward %-9s %.3f ms/layer %.1f ms/step (x32) %.0f TFLOP/s\n", kernel_name[FA2], t[FA2], 32 * t[FA2],
           flops / t[FA2] * 1e-9);
    for (int w = 0; w < FA2; ++w) {
        t[w] = median_ms(reps, x, w);
        printf("  forward %-9s %.3f ms/layer %.1f ms/step (x32) %.0f TFLOP/s  %.2fx fa2\n", kernel_name[w], t[w],
               32 * t[w], flops / t[w] * 1e-9, t[FA2] / t[w]);
    }
    const size_t rows = (size_t)sh.B * sh.H * sh.T;
    forward(x, FA2);
    const auto fo = fetch(x.o, x.nq);
    const auto fl = fetch_f32(x.lse, rows);
    bool ok = true;
    for (int w = 0; w < FA2; ++w) {
        forward(x, w);
        const auto no = raw(x.o, x.nq * 2);
        const auto nl = raw(x.lse, rows * 4);
        const auto wo = fetch(x.o, x.nq);
        const auto wl = fetch_f32(x.lse, rows);
        bool same = true;
        for (int r = 0; r < 3; ++r) {
            CK(cudaMemset(x.o, 0, x.nq * 2));
            CK(cudaMemset(x.lse, 0, rows * 4));
            forward(x, w);
            same = same && raw(x.o, x.nq * 2) == no && raw(x.lse, rows * 4) == nl;
        }
        const double d_rel = rel(wo, fo);
        printf("  %-9s vs fa2: max|do| %.2e, max|do|/max|o| %.2e, max|dlse| %.2e; bitwise identical over 4 runs: %s\n",
               kernel_name[w], max_abs(wo, fo), d_rel, max_abs(wl, fl), same ? "yes" : "NO");
        ok = ok && same && d_rel < 2e-2;
    }
    release(x);
    return ok;
}

int main(int argc, char** argv) {
    const bool host_only = argc > 1 && strcmp(argv[1], "host") == 0;
#ifdef WGFA_PV_N64
    const char* pv = "2 x m64n64k16 per k-step (WGFA_PV_N64)";
#else
    const char* pv = "m64n128k16";
#endif
#ifdef WGFA_OVERLAP
    const char* loop = "intra-warpgroup overlap (WGFA_OVERLAP), 3 V buffers";
#else
    const char* loop = "plain (S, softmax, P.V in sequence)";
#endif
    printf("wgmma forward variant: P.V %s; loop %s; %d bytes of shared memory\n", pv, loop, wgfa::SMEM_BYTES);
    bool ok = host_checks();
    if (host_only) {
        printf("host checks: %s\n", ok ? "all ok" : "FAILURES");
        return ok ? 0 : 1;
    }
    int device;
    cudaDeviceProp prop;
    CK(cudaGetDevice(&device));
    CK(cudaGetDeviceProperties(&prop, device));
    printf("device: %s (sm_%d%d), %zu bytes of opt-in shared memory per block\n", prop.name, prop.major, prop.minor,
           prop.sharedMemPerBlockOptin);
    if (prop.major != 9) {
        fprintf(stderr, "wgmma needs an sm_90 GPU (H100/H200)\n");
        return 1;
    }
    if (argc > 1 && strcmp(argv[1], "profile") == 0) {
        Buffers x = make({1, 32, 8, 4096, 4096, 1, false}, 42);
        for (int w = 0; w < KERNELS; ++w) forward(x, w);
        CK(cudaDeviceSynchronize());
        release(x);
        return 0;
    }
    const int reps = argc > 1 ? atoi(argv[1]) : 20;
    printf("primitive unit test (one warpgroup, one 64 × 128 × 128 product each way):\n");
    const bool unit_ok = unit_test();
    ok = ok && unit_ok;
    printf("forward vs a double-precision CPU reference (max|err| / max|ref|):\n");
    ok &= check_forward({2, 4, 2, 300, 300, 1, false}, "causal B2 H4 KVH2 T=S=300");
    ok &= check_forward({2, 4, 1, 200, 333, 1, true}, "causal+valid H4 KVH1 T200 S333");
    ok &= check_forward({1, 4, 2, 300, 257, 0, true}, "full+valid H4 KVH2 T300 S257");
    ok &= check_forward({2, 2, 2, 77, 77, 1, true}, "causal+valid H2 KVH2 T=S=77");
    ok &= check_forward({1, 2, 1, 5, 20, 0, false}, "full H2 KVH1 T5 S20");
    ok &= check_forward({1, 4, 1, 640, 640, 1, false}, "causal H4 KVH1 T=S=640 (5 tiles)");
    // More queries than keys (offset S − T = −200): rows 0..199 see no key, and the first query
    // tile has no key tile at all (a block / work tile with 0 steps).
    ok &= check_forward({1, 2, 1, 300, 100, 1, false}, "causal H2 KVH1 T300 S100 (offset -200)");
    for (int w = 0; w < FA2; ++w) {
        ok &= check_strided({2, 4, 2, 300, 300, 1, false}, "causal B2 H4 KVH2 T=S=300", 1, 1, w);
        ok &= check_strided({2, 4, 1, 200, 333, 1, true}, "causal+valid H4 KVH1 T200 S333", 1, 0, w);
        ok &= check_strided({2, 4, 1, 200, 333, 1, true}, "causal+valid H4 KVH1 T200 S333", 0, 1, w);
    }
    printf("correctness: %s\n", ok ? "all ok" : "FAILURES");
    ok &= bench({1, 32, 8, 4096, 4096, 1, false}, "8B shape", reps);
    printf("overall: %s\n", ok ? "all ok" : "FAILURES");
    return ok ? 0 : 1;
}
