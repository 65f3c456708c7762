// Host program for the wgmma backward (kernels/wgmma/backward.cuh): checks dK/dV and dQ against a
// double-precision CPU reference and against fa2's d128 kernels (flash_mma_backward_dkdv_bf16_d128 =
// fa2::backward_dkdv_wide, flash_mma_backward_dq_bf16_d128 = fa2::backward_dq_wide, from
// kernels/flash_attn.cu), strided heads bitwise against contiguous, determinism, and times both at
// Llama-3.1-8B's shape.
//
//   ./flash_wgmma_bwd_test host      CPU only: the descriptors of the 64- and 128-row tiles walked
//                                    through the canonical-layout model (DESIGN.md §2)
//   ./flash_wgmma_bwd_test [reps=20] host checks, then the GPU checks and the timing
//   ./flash_wgmma_bwd_test time [reps]  the 8B-shape timing only
//   ./flash_wgmma_bwd_test profile   one launch of each backward kernel at the 8B shape (for ncu)
//
// lse and delta come from fa2's forward (flash_mma_forward_bf16_d128) and flash_backward_delta_bf16,
// as in training; both backward implementations read the same lse, delta.
#include "../../../kernels/flash_attn.cu"
#include "../../../kernels/wgmma/backward.cuh"

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

constexpr int D = 128;

// ---------------------------------------------------------------------------------------------
// CPU-only: what wgmma reads through each descriptor the kernels build (the canonical layouts of
// CUTLASS's make_gmma_desc, 128-byte swizzle on the absolute address), against the tiles as
// load_tile lays them out.
static uint32_t swizzle128(uint32_t a) { return a ^ (((a >> 7) & 7) << 4); }
static uint32_t field(uint64_t d, int lo) { return (uint32_t)((d >> lo) & 0x3FFF) << 4; }
static uint32_t k_major_address(uint64_t d, int mn, int k) {
    return swizzle128(field(d, 0) + (mn / 8) * field(d, 32) + (mn % 8) * 128 + 2 * k);
}
static uint32_t mn_major_address(uint64_t d, int k, int mn) {
    return swizzle128(field(d, 0) + (mn / 64) * field(d, 16) + (k / 8) * field(d, 32) + (k % 8) * 128 + 2 * (mn % 64));
}
static bool host_checks() {
    long reads = 0, bad = 0;
    const uint32_t base = 0x6400;  // any 1024-aligned shared address
    for (int rows : {64, 128}) {
        // element (r, c) of a tile at base → its byte address
        auto at = [&](int r, int c) { return base + wgbw::swizzled(rows, r, c); };
        // K-major reads: 64 rows from row0 (as A: K/V/Q/dO rows of a warpgroup) or all `rows` (as B).
        for (int row0 = 0; row0 < rows; row0 += 64)
            for (int kk = 0; kk < 8; ++kk) {
                const uint64_t d = wgbw::k_major(base, rows, row0, kk);
                for (int mn = 0; mn < 64; ++mn)
                    for (int k = 0; k < 16; ++k, ++reads) bad += k_major_address(d, mn, k) != at(row0 + mn, 16 * kk + k);
            }
        // MN-major reads: B[k][n] = tile[16kk + k][n], n = 0..127.
        for (int kk = 0; kk < rows / 16; ++kk) {
            const uint64_t d = wgbw::mn_major(base, rows, kk);
            for (int k = 0; k < 16; ++k)
                for (int n = 0; n < 128; ++n, ++reads) bad += mn_major_address(d, k, n) != at(16 * kk + k, n);
        }
    }
    // Each tile a bijection onto its bytes.
    int collisions = 0;
    for (int rows : {64, 128}) {
        std::vector<char> seen(rows * 256, 0);
        for (int r = 0; r < rows; ++r)
            for (int c = 0; c < 128; ++c) {
                const uint32_t o = wgbw::swizzled(rows, r, c);
                collisions += o >= (uint32_t)rows * 256 || seen[o]++;
            }
    }
    const bool ok = bad == 0 && collisions == 0;
    printf("descriptor emulation (64- and 128-row tiles, K-major and MN-major): %ld element reads, %ld wrong; %d "
           "layout collisions: %s\n",
           reads, bad, collisions, ok ? "ok" : "FAIL");
    return ok;
}

// ---------------------------------------------------------------------------------------------
struct Shape {
    int B, H, KVH, T, S, causal;
    bool masked;
};
struct Buffers {
    Shape sh;
    int q_bthd = 0, kv_bthd = 0;
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
    fill(x.hdo, x.nq);
    x.hvalid.assign((size_t)sh.B * sh.S, 1);
    if (sh.masked)
        for (size_t i = 0; i < x.hvalid.size(); ++i) x.hvalid[i] = (rng() % 5) != 0;
    bf16** qp[] = {&x.q, &x.o, &x.dout, &x.dq};
    for (auto p : qp) CK(cudaMalloc(p, x.nq * 2));
    bf16** kp[] = {&x.k, &x.v, &x.dk, &x.dv};
    for (auto p : kp) CK(cudaMalloc(p, x.nk * 2));
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
    void* p[] = {x.q, x.k, x.v, x.o, x.dout, x.dq, x.dk, x.dv, x.lse, x.delta, x.valid};
    for (auto e : p) CK(cudaFree(e));
}
static float scale_of() { return 1.0f / std::sqrt((float)D); }
static const unsigned char* valid_of(const Buffers& x) { return x.sh.masked ? x.valid : nullptr; }

// fa2's forward (o, lse) and delta = rowsum(dO∘O), in the layout x.q_bthd says.
static void forward(Buffers& x) {
    const Shape& s = x.sh;
    const int smem = fa2::forward_wide_smem<128>();
    CK(cudaFuncSetAttribute(flash_mma_forward_bf16_d128, cudaFuncAttributeMaxDynamicSharedMemorySize, smem));
    flash_mma_forward_bf16_d128<<<dim3((s.T + fa2::WIDE_FWD_BQ - 1) / fa2::WIDE_FWD_BQ, s.B * s.H), fa2::WIDE_FWD_NT,
                                  smem>>>(x.q, x.k, x.v, valid_of(x), x.o, x.lse, s.H, s.KVH, s.T, s.S, s.S - s.T,
                                          s.causal, scale_of(), x.q_bthd, x.kv_bthd);
    CK(cudaGetLastError());
    const long long rows = (long long)s.B * s.H * s.T;
    flash_backward_delta_bf16<<<(rows + 7) / 8, 256>>>(x.o, x.dout, x.delta, rows, D, s.H, s.T, x.q_bthd);
    CK(cudaGetLastError());
}

enum Kernel { WGMMA, FA2 };
static const char* kernel_name[] = {"wgmma", "fa2"};

static void dkdv(Buffers& x, Kernel w) {
    const Shape& s = x.sh;
    const int off = s.S - s.T;
    if (w == WGMMA) {
        auto fn = flash_wgmma_backward_dkdv_bf16_d128;
        CK(cudaFuncSetAttribute(fn, cudaFuncAttributeMaxDynamicSharedMemorySize, wgbw::DKDV_SMEM));
        fn<<<dim3((s.S + wgbw::KV_BK - 1) / wgbw::KV_BK, s.B * s.KVH), wgbw::THREADS, wgbw::DKDV_SMEM>>>(
            x.q, x.k, x.v, valid_of(x), x.dout, x.lse, x.delta, x.dk, x.dv, s.H, s.KVH, s.T, s.S, off, s.causal,
            scale_of(), x.q_bthd, x.kv_bthd);
    } else {
        const int smem = fa2::dkdv_wide_smem<128>();
        auto fn = flash_mma_backward_dkdv_bf16_d128;
        CK(cudaFuncSetAttribute(fn, cudaFuncAttributeMaxDynamicSharedMemorySize, smem));
        fn<<<dim3((s.S + fa2::WIDE_BK - 1) / fa2::WIDE_BK, s.B * s.KVH), fa2::WIDE_DKDV_NT, smem>>>(
            x.q, x.k, x.v, valid_of(x), x.dout, x.lse, x.delta, x.dk, x.dv, s.H, s.KVH, s.T, s.S, off, s.causal,
            scale_of(), x.q_bthd, x.kv_bthd);
    }
    CK(cudaGetLastError());
}
static void dq(Buffers& x, Kernel w) {
    const Shape& s = x.sh;
    const int off = s.S - s.T;
    if (w == WGMMA) {
        auto fn = flash_wgmma_backward_dq_bf16_d128;
        CK(cudaFuncSetAttribute(fn, cudaFuncAttributeMaxDynamicSharedMemorySize, wgbw::DQ_SMEM));
        fn<<<dim3((s.T + wgbw::DQ_BQ - 1) / wgbw::DQ_BQ, s.B * s.H), wgbw::THREADS, wgbw::DQ_SMEM>>>(
            x.q, x.k, x.v, valid_of(x), x.dout, x.lse, x.delta, x.dq, s.H, s.KVH, s.T, s.S, off, s.causal,
            scale_of(), x.q_bthd, x.kv_bthd);
    } else {
        const int smem = fa2::dq_wide_smem<128>();
        auto fn = flash_mma_backward_dq_bf16_d128;
        CK(cudaFuncSetAttribute(fn, cudaFuncAttributeMaxDynamicSharedMemorySize, smem));
        fn<<<dim3((s.T + fa2::WIDE_DQ_BQ - 1) / fa2::WIDE_DQ_BQ, s.B * s.H), fa2::WIDE_DQ_NT, smem>>>(
            x.q, x.k, x.v, valid_of(x), x.dout, x.lse, x.delta, x.dq, s.H, s.KVH, s.T, s.S, off, s.causal,
            scale_of(), x.q_bthd, x.kv_bthd);
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
template <typename A, typename B> static double rel(const A& a, const B& b) {
    double diff = 0, mag = 0;
    for (size_t i = 0; i < a.size(); ++i) {
        if (!std::isfinite((double)a[i])) return INFINITY;
        diff = std::max(diff, std::fabs((double)a[i] - (double)b[i]));
        mag = std::max(mag, std::fabs((double)b[i]));
    }
    return mag > 0 ? diff / mag : diff;
}
// Rows (of D values) that no visible pair touches (a query that sees no key, a key no query sees):
// count, and whether the GPU rows are exactly 0 there.
static bool zero_rows_exact(const std::vector<float>& g, const std::vector<char>& touched, int& count) {
    bool exact = true;
    count = 0;
    for (size_t row = 0; row < touched.size(); ++row) {
        if (touched[row]) continue;
        ++count;
        for (int d = 0; d < D; ++d) exact = exact && g[row * D + d] == 0.0f;
    }
    return exact;
}

// Double-precision reference gradients (heads contiguous).
static void reference(const Buffers& x, std::vector<double>& rdq, std::vector<double>& rdk, std::vector<double>& rdv,
                      std::vector<char>& touched_q, std::vector<char>& touched_k) {
    const Shape& s = x.sh;
    const int group = s.H / s.KVH, off = s.S - s.T;
    const double scale = 1.0 / std::sqrt((double)D);
    rdq.assign(x.nq, 0);
    rdk.assign(x.nk, 0);
    rdv.assign(x.nk, 0);
    touched_q.assign(x.nq / D, 0);
    touched_k.assign(x.nk / D, 0);
    std::vector<double> p(s.S), dp(s.S);
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
                    touched_q[qb / D + i] = 1;
                    touched_k[kb / D + j] = 1;
                }
                if (mx == -INFINITY) continue;
                double sum = 0;
                for (int j = 0; j < s.S; ++j) sum += p[j] = p[j] == -INFINITY ? 0 : std::exp(p[j] - mx);
                double delta = 0;
                for (int j = 0; j < s.S; ++j) {
                    p[j] /= sum;
                    dp[j] = 0;
                    if (p[j] == 0) continue;
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

static bool check_small(Shape sh, const char* name) {
    Buffers x = make(sh, 1234);
    forward(x);
    std::vector<double> rdq, rdk, rdv;
    std::vector<char> tq, tk;
    reference(x, rdq, rdk, rdv, tq, tk);
    bool ok = true;
    std::vector<float> out[2][3];
    for (Kernel w : {WGMMA, FA2}) {
        CK(cudaMemset(x.dq, 0xff, x.nq * 2));
        CK(cudaMemset(x.dk, 0xff, x.nk * 2));
        CK(cudaMemset(x.dv, 0xff, x.nk * 2));
        dkdv(x, w);
        dq(x, w);
        CK(cudaDeviceSynchronize());
        out[w][0] = fetch(x.dq, x.nq);
        out[w][1] = fetch(x.dk, x.nk);
        out[w][2] = fetch(x.dv, x.nk);
        const double eq = rel(out[w][0], rdq), ek = rel(out[w][1], rdk), ev = rel(out[w][2], rdv);
        int zq, zk, zv;
        const bool exact = zero_rows_exact(out[w][0], tq, zq) & zero_rows_exact(out[w][1], tk, zk) &
                           zero_rows_exact(out[w][2], tk, zv);
        const bool good = eq < 2e-2 && ek < 2e-2 && ev < 2e-2 && exact;  // NaN fails too
        ok = ok && good;
        printf("  %-36s %-5s: rel err dq %.2e dk %.2e dv %.2e; zero rows dq %d dk %d dv %d %s %s\n", name,
               kernel_name[w], eq, ek, ev, zq, zk, zv, exact ? "exact" : "NOT EXACT", good ? "ok" : "FAIL");
    }
    printf("  %-36s wgmma vs fa2: max|d|/max|fa2| dq %.2e dk %.2e dv %.2e\n", name, rel(out[WGMMA][0], out[FA2][0]),
           rel(out[WGMMA][1], out[FA2][1]), rel(out[WGMMA][2], out[FA2][2]));
    release(x);
    return ok;
}

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

// The wgmma backward on heads stored [B, T, H, D] gives the same bits as on contiguous heads.
static bool check_strided(Shape sh, const char* name, int q_bthd, int kv_bthd) {
    Buffers x = make(sh, 99);
    forward(x);
    dkdv(x, WGMMA);
    dq(x, WGMMA);
    CK(cudaDeviceSynchronize());
    const auto rq = raw(x.dq, x.nq * 2), rk = raw(x.dk, x.nk * 2), rv = raw(x.dv, x.nk * 2);
    // lse and delta are [B, H, T] whatever the layout: keep the contiguous run's.
    auto bytes = [](const std::vector<bf16>& h) {
        return std::vector<unsigned char>((const unsigned char*)h.data(), (const unsigned char*)h.data() + h.size() * 2);
    };
    auto put = [](bf16* dst, const std::vector<unsigned char>& h) {
        CK(cudaMemcpy(dst, h.data(), h.size(), cudaMemcpyHostToDevice));
    };
    if (q_bthd) {
        put(x.q, swap_heads(bytes(x.hq), sh.B, sh.H, sh.T, false));
        put(x.dout, swap_heads(bytes(x.hdo), sh.B, sh.H, sh.T, false));
    }
    if (kv_bthd) {
        put(x.k, swap_heads(bytes(x.hk), sh.B, sh.KVH, sh.S, false));
        put(x.v, swap_heads(bytes(x.hv), sh.B, sh.KVH, sh.S, false));
    }
    x.q_bthd = q_bthd;
    x.kv_bthd = kv_bthd;
    CK(cudaMemset(x.dq, 0xff, x.nq * 2));
    CK(cudaMemset(x.dk, 0xff, x.nk * 2));
    CK(cudaMemset(x.dv, 0xff, x.nk * 2));
    dkdv(x, WGMMA);
    dq(x, WGMMA);
    CK(cudaDeviceSynchronize());
    auto gq = raw(x.dq, x.nq * 2), gk = raw(x.dk, x.nk * 2), gv = raw(x.dv, x.nk * 2);
    if (q_bthd) gq = swap_heads(gq, sh.B, sh.H, sh.T, true);
    if (kv_bthd) {
        gk = swap_heads(gk, sh.B, sh.KVH, sh.S, true);
        gv = swap_heads(gv, sh.B, sh.KVH, sh.S, true);
    }
    const bool same = gq == rq && gk == rk && gv == rv;
    printf("  %-36s strided q %d k/v %d: dq, dk, dv bitwise equal to contiguous: %s\n", name, q_bthd, kv_bthd,
           same ? "yes" : "NO");
    release(x);
    return same;
}

template <typename F> static float median_ms(int reps, F&& f) {
    cudaEvent_t a, b;
    CK(cudaEventCreate(&a));
    CK(cudaEventCreate(&b));
    f();  // warm-up
    std::vector<float> t;
    for (int r = 0; r < reps; ++r) {
        CK(cudaEventRecord(a));
        f();
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
    forward(x);
    double pairs = 0;
    for (int i = 0; i < sh.T; ++i) pairs += sh.causal ? std::min(sh.S, std::max(0, sh.S - sh.T + i + 1)) : sh.S;
    pairs *= (double)sh.B * sh.H;
    const double f_dkdv = 8.0 * D * pairs, f_dq = 6.0 * D * pairs;  // 4 and 3 GEMMs of 2·D flops per pair
    printf("%s (B=%d H=%d KVH=%d T=%d S=%d D=%d causal=%d), median of %d:\n", name, sh.B, sh.H, sh.KVH, sh.T, sh.S, D,
           sh.causal, reps);
    float tkv[2], tq[2];
    for (Kernel w : {FA2, WGMMA}) {
        tkv[w] = median_ms(reps, [&] { dkdv(x, w); });
        printf("  dK/dV %-5s %.3f ms/layer %5.1f ms/step (x32) %.0f TFLOP/s\n", kernel_name[w], tkv[w], 32 * tkv[w],
               f_dkdv / tkv[w] * 1e-9);
    }
    printf("  dK/dV speed-up wgmma over fa2: %.2fx\n", tkv[FA2] / tkv[WGMMA]);
    for (Kernel w : {FA2, WGMMA}) {
        tq[w] = median_ms(reps, [&] { dq(x, w); });
        printf("  dQ    %-5s %.3f ms/layer %5.1f ms/step (x32) %.0f TFLOP/s\n", kernel_name[w], tq[w], 32 * tq[w],
               f_dq / tq[w] * 1e-9);
    }
    printf("  dQ    speed-up wgmma over fa2: %.2fx\n", tq[FA2] / tq[WGMMA]);
    printf("  dK/dV + dQ: fa2 %.1f ms/step, wgmma %.1f ms/step (%.2fx)\n", 32 * (tkv[FA2] + tq[FA2]),
           32 * (tkv[WGMMA] + tq[WGMMA]), (tkv[FA2] + tq[FA2]) / (tkv[WGMMA] + tq[WGMMA]));
    // wgmma against fa2 at this shape, and bitwise determinism over 4 runs.
    dkdv(x, FA2);
    dq(x, FA2);
    const auto fq = fetch(x.dq, x.nq), fk = fetch(x.dk, x.nk), fv = fetch(x.dv, x.nk);
    dkdv(x, WGMMA);
    dq(x, WGMMA);
    const auto nq = raw(x.dq, x.nq * 2), nk = raw(x.dk, x.nk * 2), nv = raw(x.dv, x.nk * 2);
    const auto wq = fetch(x.dq, x.nq), wk = fetch(x.dk, x.nk), wv = fetch(x.dv, x.nk);
    bool same = true;
    for (int r = 0; r < 3; ++r) {
        CK(cudaMemset(x.dq, 0, x.nq * 2));
        CK(cudaMemset(x.dk, 0, x.nk * 2));
        CK(cudaMemset(x.dv, 0, x.nk * 2));
        dkdv(x, WGMMA);
        dq(x, WGMMA);
        same = same && raw(x.dq, x.nq * 2) == nq && raw(x.dk, x.nk * 2) == nk && raw(x.dv, x.nk * 2) == nv;
    }
    const double eq = rel(wq, fq), ek = rel(wk, fk), ev = rel(wv, fv);
    printf("  wgmma vs fa2: max|d|/max|fa2| dq %.2e dk %.2e dv %.2e; wgmma bitwise identical over 4 runs: %s\n", eq,
           ek, ev, same ? "yes" : "NO");
    release(x);
    return same && eq < 2e-2 && ek < 2e-2 && ev < 2e-2;
}

int main(int argc, char** argv) {
    const char* mode = argc > 1 ? argv[1] : "";
    printf("wgmma backward variant: KV_LATE %d\n", WGBW_KV_LATE);
    printf("wgmma backward: dK/dV stages %d defer %d, %d bytes smem; dQ stages %d defer %d key tile %d split %d, %d "
           "bytes smem; %d threads\n",
           wgbw::KV_STAGES, wgbw::KV_DEFER, wgbw::DKDV_SMEM, wgbw::DQ_STAGES, wgbw::DQ_DEFER, wgbw::DQ_BK,
           WGBW_DQ_SPLIT, wgbw::DQ_SMEM, wgbw::THREADS);
    bool ok = host_checks();
    if (strcmp(mode, "host") == 0) {
        printf("host checks: %s\n", ok ? "all ok" : "FAILURES");
        return ok ? 0 : 1;
    }
    cudaDeviceProp prop;
    CK(cudaGetDeviceProperties(&prop, 0));
    printf("device: %s (sm_%d%d)\n", prop.name, prop.major, prop.minor);
    if (prop.major != 9) {
        fprintf(stderr, "wgmma needs an sm_90 GPU (H100/H200)\n");
        return 1;
    }
    const Shape big = {1, 32, 8, 4096, 4096, 1, false};
    if (strcmp(mode, "profile") == 0) {
        Buffers x = make(big, 42);
        forward(x);
        dkdv(x, FA2);
        dkdv(x, WGMMA);
        dq(x, FA2);
        dq(x, WGMMA);
        CK(cudaDeviceSynchronize());
        release(x);
        return 0;
    }
    if (strcmp(mode, "time") == 0) {
        const int reps = argc > 2 ? atoi(argv[2]) : 20;
        ok &= bench(big, "8B shape", reps);
        printf("overall: %s\n", ok ? "all ok" : "FAILURES");
        return ok ? 0 : 1;
    }
    const int reps = argc > 1 ? atoi(argv[1]) : 20;
    printf("backward vs a double-precision CPU reference (max|err| / max|ref|):\n");
    ok &= check_small({2, 4, 2, 300, 300, 1, false}, "causal B2 H4 KVH2 T=S=300");
    ok &= check_small({2, 4, 1, 200, 333, 1, true}, "causal+valid H4 KVH1 T200 S333");
    ok &= check_small({1, 4, 2, 300, 257, 0, true}, "full+valid H4 KVH2 T300 S257");
    ok &= check_small({2, 2, 2, 77, 77, 1, true}, "causal+valid H2 KVH2 T=S=77");
    ok &= check_small({1, 2, 1, 5, 20, 0, false}, "full H2 KVH1 T5 S20");
    ok &= check_small({1, 2, 1, 150, 100, 1, false}, "causal H2 KVH1 T150 S100 (offset<0)");
    ok &= check_small({1, 4, 1, 640, 640, 1, false}, "causal H4 KVH1 T=S=640");
    ok &= check_strided({2, 4, 2, 300, 300, 1, false}, "causal B2 H4 KVH2 T=S=300", 1, 1);
    ok &= check_strided({2, 4, 1, 200, 333, 1, true}, "causal+valid H4 KVH1 T200 S333", 1, 0);
    ok &= check_strided({2, 4, 1, 200, 333, 1, true}, "causal+valid H4 KVH1 T200 S333", 0, 1);
    printf("correctness: %s\n", ok ? "all ok" : "FAILURES");
    ok &= bench(big, "8B shape", reps);
    printf("overall: %s\n", ok ? "all ok" : "FAILURES");
    return ok ? 0 : 1;
}
