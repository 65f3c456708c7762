// Standalone benchmark and check of the flash-attention kernels of kernels/flash_attn.cu (bf16):
// the backward (wide d128 dK/dV and dQ; d64) and the forward (wide d128: fa2::forward_wide; d64),
// against the kernels main launched before them (instantiated here from the same templates:
// fa2::backward_dkdv<bf16, 128>, fa2::backward_dq<bf16, D, false>, fa2::forward<bf16, 128> (the
// 64 × 64 d128 forward), fa2::forward<bf16, D, false>) and a double-precision CPU reference.
//
//   nvcc -arch=sm_90 -O3 -std=c++17 -o flash_bench benches/gpu/flash_bench.cu
//   (-L DIR where libcudart_static.a lives if nvcc does not find it)
//   ./flash_bench [reps=20]
//   ./flash_bench profile   (one launch of each forward and backward kernel at the 8B shape, for ncu)
//
// Prints, per small case (ragged tails, GQA, causal with offset, key validity, d64 and d128),
// max|gpu − ref| / max|ref| of o and max|gpu − ref| of lse for the forward kernels (rows with no
// visible key: lse −inf and o 0 exactly), and of dq, dk, dv for the new and the old backward
// kernels; strided heads ([B, T, H, D]) against contiguous ones, bitwise; then, at the
// Llama-3.1-8B shape (B=1, H=32, KVH=8, T=S=4096, D=128, causal) and the 1B shape (B=8, H=32,
// KVH=8, T=512, D=64), median kernel times over `reps` runs (ms per layer, ×32 per step,
// TFLOP/s; the forward: the previous kernel, the new one and forward_wide's A/B variants),
// new-vs-old differences and a run-to-run bitwise check of the new kernels.
#include "../../kernels/flash_attn.cu"

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

// The kernels main launched before the wide d128 ones (128 threads, fa2::dkdv_smem / fa2::dq_smem),
// with main's block order (heavy query tiles first within each head only): d128 dK/dV, dQ of
// d128 and d64 (d64 dK/dV is unchanged: its entry point serves both), and the forward.
extern "C" __global__ void __launch_bounds__(fa2::NT) old_dkdv_d128(const bf16* q, const bf16* k, const bf16* v,
    const unsigned char* valid, const bf16* grad, const float* lse, const float* delta, bf16* dk, bf16* dv,
    int heads, int kv_heads, int queries, int keys, int offset, int causal, float scale, int qb, int kb) {
    fa2::backward_dkdv<bf16, 128>(q, k, v, valid, grad, lse, delta, dk, dv, heads, kv_heads, queries, keys,
                                  offset, causal, scale, qb, kb);
}
template <int D>
__global__ void __launch_bounds__(fa2::NT) old_dq(const bf16* q, const bf16* k, const bf16* v,
    const unsigned char* valid, const bf16* grad, const float* lse, const float* delta, bf16* dq, int heads,
    int kv_heads, int queries, int keys, int offset, int causal, float scale, int qb, int kb) {
    fa2::backward_dq<bf16, D, false>(q, k, v, valid, grad, lse, delta, dq, heads, kv_heads, queries, keys, offset,
                                     causal, scale, qb, kb);
}
template <int D>
__global__ void __launch_bounds__(fa2::NT, 3) old_forward(const bf16* q, const bf16* k, const bf16* v,
    const unsigned char* valid, bf16* o, float* lse, int heads, int kv_heads, int queries, int keys, int offset,
    int causal, float scale, int qb, int kb) {
    fa2::forward<bf16, D, false>(q, k, v, valid, o, lse, heads, kv_heads, queries, keys, offset, causal, scale, qb,
                                 kb);
}
// The d128 forward main launched before forward_wide (64 × 64 tiles, 4 warps of 16 rows, heavy
// tiles first over all heads), and A/B variants of forward_wide: <BK (keys per cp.async tile),
// SUB (keys per softmax step)>.
extern "C" __global__ void __launch_bounds__(fa2::NT, 3) prev_forward_d128(const bf16* q, const bf16* k, const bf16* v,
    const unsigned char* valid, bf16* o, float* lse, int heads, int kv_heads, int queries, int keys, int offset,
    int causal, float scale, int qb, int kb) {
    fa2::forward<bf16, 128>(q, k, v, valid, o, lse, heads, kv_heads, queries, keys, offset, causal, scale, qb, kb);
}
template <int BK, int SUB>
__global__ void __launch_bounds__(fa2::WIDE_FWD_NT, 2) forward_wide_variant(const bf16* q, const bf16* k,
    const bf16* v, const unsigned char* valid, bf16* o, float* lse, int heads, int kv_heads, int queries, int keys,
    int offset, int causal, float scale, int qb, int kb) {
    fa2::forward_wide<bf16, 128, BK, SUB>(q, k, v, valid, o, lse, heads, kv_heads, queries, keys, offset, causal,
                                          scale, qb, kb);
}
// A/B variant: the wide d128 dQ in main's block order.
extern "C" __global__ void __launch_bounds__(fa2::WIDE_DQ_NT, 2) dq_wide_head_order(const bf16* q, const bf16* k,
    const bf16* v, const unsigned char* valid, const bf16* grad, const float* lse, const float* delta, bf16* dq,
    int heads, int kv_heads, int queries, int keys, int offset, int causal, float scale, int qb, int kb) {
    fa2::backward_dq_wide<bf16, 128, false>(q, k, v, valid, grad, lse, delta, dq, heads, kv_heads, queries, keys,
                                            offset, causal, scale, qb, kb);
}
struct Shape {
    int B, H, KVH, T, S, D, causal;
    bool masked;  // some keys invalid
};

struct Buffers {
    Shape sh;
    int q_bthd = 0, kv_bthd = 0;  // heads stored [B, T, H, D] (the new kernels' strided reads)
    size_t nq, nk;
    bf16 *q, *k, *v, *o, *dout, *dq, *dk, *dv;
    float *lse, *delta;
    unsigned char* valid;
    std::vector<bf16> hq, hk, hv, hdo;
    std::vector<unsigned char> hvalid;
};

static float bf(bf16 x) { return __bfloat162float(x); }

static Buffers make(Shape sh, unsigned seed) {
    Buffers x;
    x.sh = sh;
    x.nq = (size_t)sh.B * sh.H * sh.T * sh.D;
    x.nk = (size_t)sh.B * sh.KVH * sh.S * sh.D;
    std::mt19937 rng(seed);
    std::uniform_real_distribution<float> u(-1.0f, 1.0f);
    auto fill = [&](std::vector<bf16>& h, size_t n) {
        h.resize(n);
        for (auto& e : h) e = __float2bfloat16(u(rng));
    };
    fill(x.hq, x.nq);
    fill(x.hk, x.nk);
    fill(x.hv, x.nk);
    fill(x.hdo, x.nq);
    x.hvalid.assign((size_t)sh.B * sh.S, 1);
    if (sh.masked)
        for (size_t i = 0; i < x.hvalid.size(); ++i) x.hvalid[i] = (rng() % 5) != 0;
    bf16** ptrs[] = {&x.q, &x.o, &x.dout, &x.dq};
    for (auto p : ptrs) CK(cudaMalloc(p, x.nq * 2));
    bf16** kptrs[] = {&x.k, &x.v, &x.dk, &x.dv};
    for (auto p : kptrs) CK(cudaMalloc(p, x.nk * 2));
    CK(cudaMalloc(&x.lse, (size_t)sh.B * sh.H * sh.T * 4));
    CK(cudaMalloc(&x.delta, (size_t)sh.B * sh.H * sh.T * 4));
    CK(cudaMalloc(&x.valid, x.hvalid.size()));
    CK(cudaMemcpy(x.q, x.hq.data(), x.nq * 2, cudaMemcpyHostToDevice));
    CK(cudaMemcpy(x.k, x.hk.data(), x.nk * 2, cudaMemcpyHostToDevice));
    CK(cudaMemcpy(x.v, x.hv.data(), x.nk * 2, cudaMemcpyHostToDevice));
    CK(cudaMemcpy(x.dout, x.hdo.data(), x.nq * 2, cudaMemcpyHostToDevice));
    CK(cudaMemcpy(x.valid, x.hvalid.data(), x.hvalid.size(), cudaMemcpyHostToDevice));
    return x;
}

static void release(Buffers& x) {
    void* ptrs[] = {x.q, x.k, x.v, x.o, x.dout, x.dq, x.dk, x.dv, x.lse, x.delta, x.valid};
    for (auto p : ptrs) CK(cudaFree(p));
}

static float scale_of(const Shape& sh) { return 1.0f / std::sqrt((float)sh.D); }
static const unsigned char* valid_of(const Buffers& x) { return x.sh.masked ? x.valid : nullptr; }

// The forward kernels: F_NEW the entry point (d128: forward_wide, 128 queries × 64 keys; d64:
// forward); F_PREV d128: main's 64 × 64 forward, d64: main's before heavy-first-over-all-heads;
// then (d128 only) forward_wide variants <BK, SUB> (new: <64, 64>).
enum Fwd { F_NEW, F_PREV, F_V1, F_V2, F_COUNT };
static const char* fwd_name[] = {"new", "prev", "<32,32>", "<64,32>"};
using FwdFn = void (*)(const bf16*, const bf16*, const bf16*, const unsigned char*, bf16*, float*, int, int, int, int,
                       int, int, float, int, int);
static const FwdFn fwd_variant[] = {forward_wide_variant<32, 32>, forward_wide_variant<64, 32>};
static const int fwd_variant_smem[] = {fa2::forward_wide_smem<128, 32>(), fa2::forward_wide_smem<128, 64>()};

static void forward_only(Buffers& x, Fwd which) {
    const Shape& s = x.sh;
    FwdFn fn;
    int bq, smem;
    if (s.D == 128) {
        fn = which == F_NEW ? flash_mma_forward_bf16_d128 : which == F_PREV ? prev_forward_d128 : fwd_variant[which - F_V1];
        bq = which == F_PREV ? fa2::FWD_BQ : fa2::WIDE_FWD_BQ;
        smem = which == F_NEW ? fa2::forward_wide_smem<128>() : which == F_PREV ? fa2::forward_smem<128>() : fwd_variant_smem[which - F_V1];
    } else {
        fn = which == F_PREV ? old_forward<64> : flash_mma_forward_bf16_d64;
        bq = fa2::FWD_BQ;
        smem = fa2::forward_smem<64>();
    }
    CK(cudaFuncSetAttribute(fn, cudaFuncAttributeMaxDynamicSharedMemorySize, smem));
    fn<<<dim3((s.T + bq - 1) / bq, s.B * s.H), fa2::NT, smem>>>(x.q, x.k, x.v, valid_of(x), x.o, x.lse, s.H, s.KVH,
                                                               s.T, s.S, s.S - s.T, s.causal, scale_of(s), x.q_bthd,
                                                               x.kv_bthd);
    CK(cudaGetLastError());
}

static void forward(Buffers& x) {
    const Shape& s = x.sh;
    forward_only(x, F_NEW);
    const long long rows = (long long)s.B * s.H * s.T;
    flash_backward_delta_bf16<<<(rows + 7) / 8, 256>>>(x.o, x.dout, x.delta, rows, s.D, s.H, s.T, 0);
    CK(cudaGetLastError());
}

enum Which { NEW, OLD, HEAD_ORDER };

static void dkdv(Buffers& x, Which which) {
    const Shape& s = x.sh;
    const int off = s.S - s.T;
    if (s.D == 128 && which != OLD) {
        const int smem = fa2::dkdv_wide_smem<128>();
        auto fn = flash_mma_backward_dkdv_bf16_d128;
        CK(cudaFuncSetAttribute(fn, cudaFuncAttributeMaxDynamicSharedMemorySize, smem));
        fn<<<dim3((s.S + fa2::WIDE_BK - 1) / fa2::WIDE_BK, s.B * s.KVH),
                                            fa2::WIDE_DKDV_NT, smem>>>(
            x.q, x.k, x.v, valid_of(x), x.dout, x.lse, x.delta, x.dk, x.dv, s.H, s.KVH, s.T, s.S, off, s.causal,
            scale_of(s), x.q_bthd, x.kv_bthd);
    } else {
        auto fn = s.D == 128 ? old_dkdv_d128 : flash_mma_backward_dkdv_bf16_d64;
        const int smem = s.D == 128 ? fa2::dkdv_smem<128>() : fa2::dkdv_smem<64>();
        CK(cudaFuncSetAttribute(fn, cudaFuncAttributeMaxDynamicSharedMemorySize, smem));
        fn<<<dim3((s.S + 63) / 64, s.B * s.KVH), fa2::NT, smem>>>(x.q, x.k, x.v, valid_of(x), x.dout, x.lse,
                                                                 x.delta, x.dk, x.dv, s.H, s.KVH, s.T, s.S, off,
                                                                 s.causal, scale_of(s), 0, 0);
    }
    CK(cudaGetLastError());
}

static void dq(Buffers& x, Which which) {
    const Shape& s = x.sh;
    const int off = s.S - s.T;
    if (s.D == 128 && which != OLD) {
        const int smem = fa2::dq_wide_smem<128>();
        auto fn = which == HEAD_ORDER ? dq_wide_head_order : flash_mma_backward_dq_bf16_d128;
        CK(cudaFuncSetAttribute(fn, cudaFuncAttributeMaxDynamicSharedMemorySize, smem));
        fn<<<dim3((s.T + fa2::WIDE_DQ_BQ - 1) / fa2::WIDE_DQ_BQ, s.B * s.H),
                                          fa2::WIDE_DQ_NT, smem>>>(x.q, x.k, x.v, valid_of(x), x.dout, x.lse,
                                                                   x.delta, x.dq, s.H, s.KVH, s.T, s.S, off,
                                                                   s.causal, scale_of(s), x.q_bthd, x.kv_bthd);
    } else {
        auto fn = s.D == 128 ? old_dq<128> : which == OLD ? old_dq<64> : flash_mma_backward_dq_bf16_d64;
        const int smem = s.D == 128 ? fa2::dq_smem<128>() : fa2::dq_smem<64>();
        CK(cudaFuncSetAttribute(fn, cudaFuncAttributeMaxDynamicSharedMemorySize, smem));
        fn<<<dim3((s.T + 63) / 64, s.B * s.H), fa2::NT, smem>>>(x.q, x.k, x.v, valid_of(x), x.dout, x.lse, x.delta,
                                                               x.dq, s.H, s.KVH, s.T, s.S, off, s.causal,
                                                               scale_of(s), 0, 0);
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
static std::vector<unsigned char> raw(const bf16* p, size_t n) {
    std::vector<unsigned char> h(n * 2);
    CK(cudaMemcpy(h.data(), p, n * 2, cudaMemcpyDeviceToHost));
    return h;
}

// max|a − b| / max|b|
template <typename A, typename B> static double rel(const A& a, const B& b) {
    double diff = 0, mag = 0;
    for (size_t i = 0; i < a.size(); ++i) {
        if (!std::isfinite((double)a[i])) return INFINITY;  // NaN would slip through std::max
        diff = std::max(diff, std::fabs((double)a[i] - (double)b[i]));
        mag = std::max(mag, std::fabs((double)b[i]));
    }
    return mag > 0 ? diff / mag : diff;
}

// Scaled scores p[j] = q_i·k_j·scale of query row i (−inf where key j is not visible); returns
// their maximum (−inf when no key is visible). qb, kb: the head's first q and k element.
static double row_scores(const Buffers& x, int b, int i, size_t qb, size_t kb, double scale, std::vector<double>& p) {
    const Shape& s = x.sh;
    const int D = s.D, off = s.S - s.T;
    double mx = -INFINITY;
    for (int j = 0; j < s.S; ++j) {
        p[j] = -INFINITY;
        if (!x.hvalid[(size_t)b * s.S + j] || (s.causal && j > off + i)) continue;
        double acc = 0;
        for (int d = 0; d < D; ++d) acc += (double)bf(x.hq[qb + (size_t)i * D + d]) * bf(x.hk[kb + (size_t)j * D + d]);
        p[j] = acc * scale;
        mx = std::max(mx, p[j]);
    }
    return mx;
}

// Double-precision reference gradients.
static void reference(const Buffers& x, std::vector<double>& rdq, std::vector<double>& rdk, std::vector<double>& rdv) {
    const Shape& s = x.sh;
    const int D = s.D, group = s.H / s.KVH;
    const double scale = 1.0 / std::sqrt((double)D);
    rdq.assign(x.nq, 0);
    rdk.assign(x.nk, 0);
    rdv.assign(x.nk, 0);
    std::vector<double> p(s.S), dp(s.S);
    for (int b = 0; b < s.B; ++b)
        for (int h = 0; h < s.H; ++h) {
            const int kvh = h / group;
            const size_t qb = ((size_t)b * s.H + h) * s.T * D, kb = ((size_t)b * s.KVH + kvh) * s.S * D;
            for (int i = 0; i < s.T; ++i) {
                const double mx = row_scores(x, b, i, qb, kb, scale, p);
                if (mx == -INFINITY) continue;
                double sum = 0;
                for (int j = 0; j < s.S; ++j) sum += p[j] = p[j] == -INFINITY ? 0 : std::exp(p[j] - mx);
                double delta = 0;
                for (int j = 0; j < s.S; ++j) {
                    p[j] /= sum;
                    if (p[j] == 0) { dp[j] = 0; continue; }
                    double acc = 0;
                    for (int d = 0; d < D; ++d) acc += (double)bf(x.hdo[qb + (size_t)i * D + d]) * bf(x.hv[kb + (size_t)j * D + d]);
                    dp[j] = acc;
                    delta += p[j] * acc;
                }
                for (int j = 0; j < s.S; ++j) {
                    if (p[j] == 0) continue;
                    const double ds = p[j] * (dp[j] - delta);
                    for (int d = 0; d < D; ++d) {
                        rdq[qb + (size_t)i * D + d] += scale * ds * bf(x.hk[kb + (size_t)j * D + d]);
                        rdk[kb + (size_t)j * D + d] += scale * ds * bf(x.hq[qb + (size_t)i * D + d]);
                        rdv[kb + (size_t)j * D + d] += p[j] * bf(x.hdo[qb + (size_t)i * D + d]);
                    }
                }
            }
        }
}

static std::vector<float> fetch_f32(const float* p, size_t n) {
    std::vector<float> h(n);
    CK(cudaMemcpy(h.data(), p, n * 4, cudaMemcpyDeviceToHost));
    return h;
}

// Double-precision reference forward: o and lse (−inf for rows with no visible key, o 0 there).
static void reference_forward(const Buffers& x, std::vector<double>& ro, std::vector<double>& rlse) {
    const Shape& s = x.sh;
    const int D = s.D, group = s.H / s.KVH;
    const double scale = 1.0 / std::sqrt((double)D);
    ro.assign(x.nq, 0);
    rlse.assign((size_t)s.B * s.H * s.T, -INFINITY);
    std::vector<double> p(s.S);
    for (int b = 0; b < s.B; ++b)
        for (int h = 0; h < s.H; ++h) {
            const size_t qb = ((size_t)b * s.H + h) * s.T * D, kb = ((size_t)b * s.KVH + h / group) * s.S * D;
            for (int i = 0; i < s.T; ++i) {
                const double mx = row_scores(x, b, i, qb, kb, scale, p);
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

// The forward kernels against reference_forward: max|o − ref| / max|ref|, max|lse − ref| over rows
// with a visible key; rows without one must give lse −inf and o 0 exactly.
static bool check_forward(Shape sh, const char* name) {
    Buffers x = make(sh, 4321);
    std::vector<double> ro, rlse;
    reference_forward(x, ro, rlse);
    bool ok = true;
    for (int wi = 0; wi < F_COUNT; ++wi) {
        const Fwd w = (Fwd)wi;
        if (sh.D != 128 && w >= F_V1) continue;
        CK(cudaMemset(x.o, 0xff, x.nq * 2));
        CK(cudaMemset(x.lse, 0xff, rlse.size() * 4));
        forward_only(x, w);
        CK(cudaDeviceSynchronize());
        const auto o = fetch(x.o, x.nq);
        const auto l = fetch_f32(x.lse, rlse.size());
        const double eo = rel(o, ro);
        double el = 0;
        int unseen = 0;
        bool exact = true;
        for (size_t r = 0; r < rlse.size(); ++r) {
            if (rlse[r] == -INFINITY) {
                ++unseen;
                exact = exact && l[r] == -INFINITY;
                for (int d = 0; d < sh.D; ++d) exact = exact && o[r * sh.D + d] == 0.0f;
            } else {
                el = std::isfinite(l[r]) ? std::max(el, std::fabs((double)l[r] - rlse[r])) : INFINITY;
            }
        }
        const bool good = eo < 2e-2 && el < 1e-3 && exact;
        ok = ok && good;
        printf("  %-40s fwd %-9s: rel err o %.2e, abs err lse %.2e, %d rows without keys %s %s\n", name,
               fwd_name[w], eo, el, unseen, exact ? "exact" : "NOT EXACT", good ? "ok" : "FAIL");
    }
    release(x);
    return ok;
}

static bool check_small(Shape sh, const char* name) {
    Buffers x = make(sh, 1234);
    forward(x);
    std::vector<double> rdq, rdk, rdv;
    reference(x, rdq, rdk, rdv);
    bool ok = true;
    const char* names[] = {"new", "old", "head order"};
    for (Which w : {NEW, OLD, HEAD_ORDER}) {
        if (sh.D != 128 && w > OLD) continue;
        CK(cudaMemset(x.dq, 0xff, x.nq * 2));
        CK(cudaMemset(x.dk, 0xff, x.nk * 2));
        CK(cudaMemset(x.dv, 0xff, x.nk * 2));
        dkdv(x, w);
        dq(x, w);
        CK(cudaDeviceSynchronize());
        const double eq = rel(fetch(x.dq, x.nq), rdq), ek = rel(fetch(x.dk, x.nk), rdk), ev = rel(fetch(x.dv, x.nk), rdv);
        const bool good = eq < 2e-2 && ek < 2e-2 && ev < 2e-2;  // NaN fails too
        ok = ok && good;
        printf("  %-40s %-11s: rel err dq %.2e dk %.2e dv %.2e %s\n", name, names[w], eq, ek, ev,
               good ? "ok" : "FAIL");
    }
    release(x);
    return ok;
}

// [B, A, L, D] ↔ [B, L, A, D] (`back`: the inverse).
static std::vector<unsigned char> swap_heads(const std::vector<unsigned char>& x, int B, int A, int L, int D,
                                             bool back) {
    std::vector<unsigned char> y(x.size());
    for (int b = 0; b < B; ++b)
        for (int a = 0; a < A; ++a)
            for (int l = 0; l < L; ++l) {
                const size_t bhld = (((size_t)b * A + a) * L + l) * D * 2, blhd = (((size_t)b * L + l) * A + a) * D * 2;
                memcpy(&y[back ? bhld : blhd], &x[back ? blhd : bhld], D * 2);
            }
    return y;
}

// The new kernels reading and writing heads stored [B, T, H, D] (q_bthd, kv_bthd as given) give
// the same bits as with contiguous heads (after the layout is undone).
static bool check_strided(Shape sh, const char* name, int q_bthd, int kv_bthd) {
    Buffers x = make(sh, 99);
    forward(x);
    dkdv(x, NEW);
    dq(x, NEW);
    const auto rq = raw(x.dq, x.nq), rk = raw(x.dk, x.nk), rv = raw(x.dv, x.nk);
    const auto ro = raw(x.o, x.nq);
    auto put = [](bf16* dst, const std::vector<unsigned char>& h) {
        CK(cudaMemcpy(dst, h.data(), h.size(), cudaMemcpyHostToDevice));
    };
    auto as_bytes = [](const std::vector<bf16>& h) {
        return std::vector<unsigned char>((const unsigned char*)h.data(), (const unsigned char*)h.data() + h.size() * 2);
    };
    if (q_bthd) {
        put(x.q, swap_heads(as_bytes(x.hq), sh.B, sh.H, sh.T, sh.D, false));
        put(x.dout, swap_heads(as_bytes(x.hdo), sh.B, sh.H, sh.T, sh.D, false));
        put(x.o, swap_heads(ro, sh.B, sh.H, sh.T, sh.D, false));
    }
    if (kv_bthd) {
        put(x.k, swap_heads(as_bytes(x.hk), sh.B, sh.KVH, sh.S, sh.D, false));
        put(x.v, swap_heads(as_bytes(x.hv), sh.B, sh.KVH, sh.S, sh.D, false));
    }
    // The forward on the strided heads: o (in q's layout) and lse bitwise equal to contiguous.
    const auto rl = fetch_f32(x.lse, (size_t)sh.B * sh.H * sh.T);
    x.q_bthd = q_bthd;
    x.kv_bthd = kv_bthd;
    CK(cudaMemset(x.lse, 0xff, rl.size() * 4));
    std::vector<unsigned char> so;
    if (q_bthd) {  // o is written in place of the swapped copy put above
        CK(cudaMemset(x.o, 0xff, x.nq * 2));
        forward_only(x, F_NEW);
        so = swap_heads(raw(x.o, x.nq), sh.B, sh.H, sh.T, sh.D, true);
        put(x.o, swap_heads(ro, sh.B, sh.H, sh.T, sh.D, false));
    } else {
        forward_only(x, F_NEW);
        so = raw(x.o, x.nq);
    }
    const auto sl = fetch_f32(x.lse, rl.size());
    const bool fsame = so == ro && memcmp(sl.data(), rl.data(), rl.size() * 4) == 0;
    const long long rows = (long long)sh.B * sh.H * sh.T;
    flash_backward_delta_bf16<<<(rows + 7) / 8, 256>>>(x.o, x.dout, x.delta, rows, sh.D, sh.H, sh.T, q_bthd);
    CK(cudaMemset(x.dq, 0xff, x.nq * 2));
    CK(cudaMemset(x.dk, 0xff, x.nk * 2));
    CK(cudaMemset(x.dv, 0xff, x.nk * 2));
    dkdv(x, NEW);
    dq(x, NEW);
    CK(cudaDeviceSynchronize());
    auto gq = raw(x.dq, x.nq), gk = raw(x.dk, x.nk), gv = raw(x.dv, x.nk);
    if (q_bthd) gq = swap_heads(gq, sh.B, sh.H, sh.T, sh.D, true);
    if (kv_bthd) {
        gk = swap_heads(gk, sh.B, sh.KVH, sh.S, sh.D, true);
        gv = swap_heads(gv, sh.B, sh.KVH, sh.S, sh.D, true);
    }
    const bool same = gq == rq && gk == rk && gv == rv && fsame;
    printf("  %-40s strided q %d k/v %d: bitwise equal to contiguous: forward %s, all %s\n", name, q_bthd,
           kv_bthd, fsame ? "yes" : "NO", same ? "yes" : "NO");
    release(x);
    return same;
}

static float median_ms(int reps, void (*f)(Buffers&, Which), Buffers& x, Which w) {  // f: a captureless lambda too
    cudaEvent_t a, b;
    CK(cudaEventCreate(&a));
    CK(cudaEventCreate(&b));
    f(x, w);  // warm-up
    std::vector<float> t;
    for (int r = 0; r < reps; ++r) {
        CK(cudaEventRecord(a));
        f(x, w);
        CK(cudaEventRecord(b));
        CK(cudaEventSynchronize(b));
        float ms;
        CK(cudaEventElapsedTime(&ms, a, b));
        t.push_back(ms);
    }
    std::sort(t.begin(), t.end());
    return t[t.size() / 2];
}

static void bench(Shape sh, const char* name, int reps) {
    Buffers x = make(sh, 42);
    forward(x);
    CK(cudaDeviceSynchronize());
    // Visible (query, key) pairs summed over batch and heads.
    double pairs = 0;
    for (int i = 0; i < sh.T; ++i) pairs += sh.causal ? std::min(sh.S, sh.S - sh.T + i + 1) : sh.S;
    pairs *= (double)sh.B * sh.H;
    const double unit = 2.0 * sh.D * pairs;  // flops of one of the matrix products
    printf("%s (B=%d H=%d KVH=%d T=%d S=%d D=%d causal=%d), median of %d:\n", name, sh.B, sh.H, sh.KVH, sh.T, sh.S,
           sh.D, sh.causal, reps);
    float t[2][2];
    for (Which w : {OLD, NEW}) {
        t[w][0] = median_ms(reps, dkdv, x, w);
        t[w][1] = median_ms(reps, dq, x, w);
        printf("  %s dK/dV %.3f ms/layer %.1f ms/step %.0f TFLOP/s | dQ %.3f ms/layer %.1f ms/step %.0f TFLOP/s | sum %.1f ms/step\n",
               w == NEW ? "new" : "old", t[w][0], 32 * t[w][0], 4 * unit / t[w][0] * 1e-9, t[w][1], 32 * t[w][1],
               3 * unit / t[w][1] * 1e-9, 32 * (t[w][0] + t[w][1]));
    }
    if (sh.D == 128) {
        const float th = median_ms(reps, dq, x, HEAD_ORDER);
        printf("  variant: new dQ in main's block order (heavy tiles first within each head) %.3f ms/layer (%.1f "
               "ms/step)\n",
               th, 32 * th);
    }
    {
        // The Which argument carries a Fwd here.
        auto fwd = [](Buffers& y, Which w) { forward_only(y, (Fwd)w); };
        for (int wi = 0; wi < F_COUNT; ++wi) {
            const Fwd w = (Fwd)(wi == 0 ? F_PREV : wi == 1 ? F_NEW : wi);
            if (sh.D != 128 && w >= F_V1) continue;
            const float f = median_ms(reps, fwd, x, (Which)w);
            printf("  forward %-9s %.3f ms/layer %.1f ms/step %.0f TFLOP/s%s\n", fwd_name[w], f, 32 * f,
                   2 * unit / f * 1e-9,
                   sh.D == 128 ? "" : " (prev: main's block order; new: the unchanged d64 entry point)");
        }
        // New vs prev, and run-to-run bitwise equality of the new forward.
        forward_only(x, F_PREV);
        const auto po = fetch(x.o, x.nq);
        const auto pl = fetch_f32(x.lse, (size_t)sh.B * sh.H * sh.T);
        forward_only(x, F_NEW);
        const auto no = raw(x.o, x.nq);
        const auto nl = fetch_f32(x.lse, pl.size());
        double dl = 0;
        for (size_t r = 0; r < pl.size(); ++r) dl = std::max(dl, std::fabs((double)nl[r] - pl[r]));
        bool fsame = true;
        for (int r = 0; r < 3; ++r) {
            CK(cudaMemset(x.o, 0, x.nq * 2));
            CK(cudaMemset(x.lse, 0, pl.size() * 4));
            forward_only(x, F_NEW);
            fsame = fsame && raw(x.o, x.nq) == no && memcmp(fetch_f32(x.lse, pl.size()).data(), nl.data(), pl.size() * 4) == 0;
        }
        printf("  forward new vs prev: rel diff o %.2e, max |lse diff| %.2e; new bitwise identical over 4 runs: %s\n",
               rel(fetch(x.o, x.nq), po), dl, fsame ? "yes" : "NO");
        forward(x);  // lse, delta again for the checks below
    }
    printf("  speed-up dK/dV %.2fx dQ %.2fx both %.2fx\n", t[OLD][0] / t[NEW][0], t[OLD][1] / t[NEW][1],
           (t[OLD][0] + t[OLD][1]) / (t[NEW][0] + t[NEW][1]));
    // New vs old, and run-to-run bitwise equality of the new kernels.
    dkdv(x, OLD);
    dq(x, OLD);
    auto oq = fetch(x.dq, x.nq), ok_ = fetch(x.dk, x.nk), ov = fetch(x.dv, x.nk);
    dkdv(x, NEW);
    dq(x, NEW);
    auto rq = raw(x.dq, x.nq), rk = raw(x.dk, x.nk), rv = raw(x.dv, x.nk);
    printf("  new vs old: rel diff dq %.2e dk %.2e dv %.2e\n", rel(fetch(x.dq, x.nq), oq), rel(fetch(x.dk, x.nk), ok_),
           rel(fetch(x.dv, x.nk), ov));
    bool same = true;
    for (int r = 0; r < 3; ++r) {
        CK(cudaMemset(x.dq, 0, x.nq * 2));
        CK(cudaMemset(x.dk, 0, x.nk * 2));
        CK(cudaMemset(x.dv, 0, x.nk * 2));
        dkdv(x, NEW);
        dq(x, NEW);
        same = same && raw(x.dq, x.nq) == rq && raw(x.dk, x.nk) == rk && raw(x.dv, x.nk) == rv;
    }
    printf("  new kernels bitwise identical over 4 runs: %s\n", same ? "yes" : "NO");
    release(x);
}

int main(int argc, char** argv) {
    if (argc > 1 && strcmp(argv[1], "profile") == 0) {
        // One launch of each kernel at the 8B shape, for a profiler.
        Buffers x = make({1, 32, 8, 4096, 4096, 128, 1, false}, 42);
        forward(x);
        for (int w = 0; w < F_COUNT; ++w) forward_only(x, (Fwd)w);
        forward(x);
        for (Which w : {OLD, NEW, HEAD_ORDER}) {
            dkdv(x, w);
            dq(x, w);
        }
        CK(cudaDeviceSynchronize());
        release(x);
        return 0;
    }
    const int reps = argc > 1 ? atoi(argv[1]) : 20;
    bool ok = true;
    printf("correctness vs a double-precision CPU reference (max|err| / max|ref|):\n");
    ok &= check_forward({2, 4, 2, 300, 300, 128, 1, false}, "d128 causal B2 H4 KVH2 T=S=300");
    ok &= check_forward({2, 4, 1, 200, 333, 128, 1, true}, "d128 causal+valid H4 KVH1 T200 S333");
    ok &= check_forward({1, 4, 2, 300, 257, 128, 0, true}, "d128 full+valid H4 KVH2 T300 S257");
    ok &= check_forward({2, 2, 2, 77, 77, 128, 1, true}, "d128 causal+valid H2 KVH2 T=S=77");
    ok &= check_forward({1, 2, 1, 5, 20, 128, 0, false}, "d128 full H2 KVH1 T5 S20");
    ok &= check_forward({2, 4, 1, 200, 333, 64, 1, true}, "d64 causal+valid H4 KVH1 T200 S333");
    ok &= check_small({2, 4, 2, 300, 300, 128, 1, false}, "d128 causal B2 H4 KVH2 T=S=300");
    ok &= check_small({2, 4, 1, 200, 333, 128, 1, true}, "d128 causal+valid H4 KVH1 T200 S333");
    ok &= check_small({1, 4, 2, 300, 257, 128, 0, true}, "d128 full+valid H4 KVH2 T300 S257");
    ok &= check_small({1, 2, 2, 77, 77, 128, 1, false}, "d128 causal H2 KVH2 T=S=77");
    ok &= check_small({2, 4, 2, 300, 300, 64, 1, false}, "d64 causal B2 H4 KVH2 T=S=300");
    ok &= check_small({2, 4, 1, 200, 333, 64, 1, true}, "d64 causal+valid H4 KVH1 T200 S333");
    ok &= check_strided({2, 4, 2, 300, 300, 128, 1, false}, "d128 causal B2 H4 KVH2 T=S=300", 1, 1);
    ok &= check_strided({2, 4, 1, 200, 333, 128, 1, true}, "d128 causal+valid H4 KVH1 T200 S333", 1, 0);
    ok &= check_strided({2, 4, 1, 200, 333, 128, 1, true}, "d128 causal+valid H4 KVH1 T200 S333", 0, 1);
    printf("correctness: %s\n", ok ? "all ok" : "FAILURES");
    bench({1, 32, 8, 4096, 4096, 128, 1, false}, "8B shape", reps);
    bench({8, 32, 8, 512, 512, 64, 1, false}, "1B shape (d64: dK/dV unchanged, dQ in the new block order)", reps);
    return ok ? 0 : 1;
}
