// Host harness of benches/gpu/flash_mma_emulator/run.sh (see there).
#include <algorithm>
#include <barrier>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <deque>
#include <functional>
#include <random>
#include <thread>
#include <vector>
#include <memory>
#include <string>

#define __device__
#define __host__
#define __forceinline__ inline
#define __restrict__ __restrict
using std::max;
using std::min;

struct bf16 { uint16_t bits; };
struct __half { uint16_t bits; };
struct Dim3 { int x = 0, y = 0, z = 0; };
thread_local Dim3 threadIdx, blockIdx, gridDim;
constexpr int MAX_WARPS = 8;

namespace emu {
struct Block {
    std::unique_ptr<std::barrier<>> bar;
    std::unique_ptr<std::barrier<>> warp_bar[MAX_WARPS];
    unsigned char* smem;
    size_t smem_bytes;
    uintptr_t ptr_slot[MAX_WARPS][32];
    uint32_t a_slot[MAX_WARPS][32][4];
    uint32_t b_slot[MAX_WARPS][32][2];
    float f_slot[MAX_WARPS][32];
};
thread_local Block* blk;
bool deferred = false;
thread_local std::vector<std::function<void()>> open_group;
thread_local std::deque<std::vector<std::function<void()>>> groups;
inline void warp_sync() { blk->warp_bar[threadIdx.x / 32]->arrive_and_wait(); }
inline void check_smem(const void* p, size_t n) {
    const unsigned char* c = (const unsigned char*)p;
    if (c < blk->smem || c + n > blk->smem + blk->smem_bytes) { fprintf(stderr, "smem out of range\n"); abort(); }
}
inline float to_float(bf16 v) { uint32_t u = (uint32_t)v.bits << 16; float f; memcpy(&f, &u, 4); return f; }
inline float to_float(__half v) { _Float16 h; memcpy(&h, &v.bits, 2); return (float)h; }
template <typename T> T from_float(float f);
template <> bf16 from_float<bf16>(float f) {
    uint32_t u; memcpy(&u, &f, 4);
    if (std::isnan(f)) return bf16{0x7fc0};
    u += 0x7fff + ((u >> 16) & 1);
    return bf16{(uint16_t)(u >> 16)};
}
template <> __half from_float<__half>(float f) { _Float16 h = (_Float16)f; __half r; memcpy(&r.bits, &h, 2); return r; }
}  // namespace emu

inline void __syncthreads() { emu::blk->bar->arrive_and_wait(); }
inline float __shfl_xor_sync(unsigned, float v, int x) {
    const int w = threadIdx.x / 32, lane = threadIdx.x % 32;
    emu::blk->f_slot[w][lane] = v;
    emu::warp_sync();
    const float r = emu::blk->f_slot[w][lane ^ x];
    emu::warp_sync();
    return r;
}

#include "fa2_body.inc"

// Blocks of `nt` threads (fa2::NT unless given), one after the other.
template <class F> void launch(int gx, int gy, size_t smem_bytes, F body, int nt = fa2::NT) {
    if (nt > 32 * MAX_WARPS) { fprintf(stderr, "launch: %d threads\n", nt); abort(); }
    for (int by = 0; by < gy; ++by)
        for (int bx = 0; bx < gx; ++bx) {
            emu::Block b;
            b.bar = std::make_unique<std::barrier<>>(nt);
            for (auto& w : b.warp_bar) w = std::make_unique<std::barrier<>>(32);
            std::vector<unsigned char> mem(smem_bytes + 16);
            b.smem = (unsigned char*)(((uintptr_t)mem.data() + 15) & ~(uintptr_t)15);
            b.smem_bytes = smem_bytes;
            memset(b.smem, 0xff, smem_bytes);  // NaN everywhere before the kernel writes
            std::vector<std::thread> threads;
            for (int tid = 0; tid < nt; ++tid)
                threads.emplace_back([&, tid] {
                    threadIdx = {tid, 0, 0};
                    blockIdx = {bx, by, 0};
                    gridDim = {gx, gy, 1};
                    emu::blk = &b;
                    emu::open_group.clear();
                    emu::groups.clear();
                    body();
                    if (!emu::groups.empty() || !emu::open_group.empty()) { fprintf(stderr, "cp.async left pending at exit\n"); abort(); }
                });
            for (auto& t : threads) t.join();
        }
}

struct Case {
    const char* name;
    int B, H, KVH, T, S, offset, causal, D;
    std::function<bool(int, int)> valid;  // (b, j); null = all valid
};

// The storage layouts the kernels are handed (argv[3], "Q,KV": 0 = [B, H, T, D], 1 = [B, T, H, D]);
// the data and the reference stay in [B, H, T, D].
int q_bthd = 0, kv_bthd = 0;

// [B, H, T, D] → the storage layout (`bthd`), and back.
template <typename T> std::vector<T> to_storage(const std::vector<T>& x, int B, int H, int L, int D, int bthd) {
    if (!bthd) return x;
    std::vector<T> y(x.size());
    for (int b = 0; b < B; ++b) for (int h = 0; h < H; ++h) for (int t = 0; t < L; ++t)
        memcpy(&y[(((size_t)b * L + t) * H + h) * D], &x[(((size_t)b * H + h) * L + t) * D], D * sizeof(T));
    return y;
}
template <typename T> std::vector<T> from_storage(const std::vector<T>& y, int B, int H, int L, int D, int bthd) {
    if (!bthd) return y;
    std::vector<T> x(y.size());
    for (int b = 0; b < B; ++b) for (int h = 0; h < H; ++h) for (int t = 0; t < L; ++t)
        memcpy(&x[(((size_t)b * H + h) * L + t) * D], &y[(((size_t)b * L + t) * H + h) * D], D * sizeof(T));
    return x;
}

template <typename T> double run(const Case& c, unsigned seed) {
    const int B = c.B, H = c.H, KVH = c.KVH, Tq = c.T, S = c.S, D = c.D, group = H / KVH;
    std::mt19937 rng(seed);
    std::normal_distribution<float> normal(0.f, 1.f);
    auto make = [&](size_t n) { std::vector<T> v(n); for (auto& x : v) x = emu::from_float<T>(normal(rng)); return v; };
    auto q = make((size_t)B * H * Tq * D), k = make((size_t)B * KVH * S * D), v = make((size_t)B * KVH * S * D);
    auto dO = make((size_t)B * H * Tq * D);
    std::vector<unsigned char> valid;
    if (c.valid) { valid.resize((size_t)B * S); for (int b = 0; b < B; ++b) for (int j = 0; j < S; ++j) valid[b * S + j] = c.valid(b, j); }
    const unsigned char* vp = c.valid ? valid.data() : nullptr;
    const float scale = 1.0f / std::sqrt((float)D);
    T nan_t = emu::from_float<T>(NAN);
    std::vector<T> o(q.size(), nan_t), dq(q.size(), nan_t), dk(k.size(), nan_t), dv(v.size(), nan_t);
    std::vector<float> lse((size_t)B * H * Tq, NAN), delta((size_t)B * H * Tq);
    auto F = [](T x) { return (double)emu::to_float(x); };

    // ---- kernels, on the inputs in their storage layouts
    const auto qs_ = to_storage(q, B, H, Tq, D, q_bthd), dOs = to_storage(dO, B, H, Tq, D, q_bthd);
    const auto ks_ = to_storage(k, B, KVH, S, D, kv_bthd), vs_ = to_storage(v, B, KVH, S, D, kv_bthd);
    {
    auto& q = qs_; auto& k = ks_; auto& v = vs_;
    if (D == 64) {
        launch((Tq + 63) / 64, B * H, fa2::forward_smem<64>(), [&] { fa2::forward<T, 64>(q.data(), k.data(), v.data(), vp, o.data(), lse.data(), H, KVH, Tq, S, c.offset, c.causal, scale, q_bthd, kv_bthd); });
    } else {
        // The d128 entry point's kernel (128-query tiles, 32 rows per warp).
        launch((Tq + fa2::WIDE_FWD_BQ - 1) / fa2::WIDE_FWD_BQ, B * H, fa2::forward_wide_smem<128>(), [&] { fa2::forward_wide<T, 128>(q.data(), k.data(), v.data(), vp, o.data(), lse.data(), H, KVH, Tq, S, c.offset, c.causal, scale, q_bthd, kv_bthd); }, fa2::WIDE_FWD_NT);
    }
    }
    o = from_storage(o, B, H, Tq, D, q_bthd);
    {
    auto& q = qs_; auto& k = ks_; auto& v = vs_; auto& dO = dOs;
    {
        const auto dOl = from_storage(dO, B, H, Tq, D, q_bthd);  // delta is indexed (b·H + h)·T + t
        for (size_t r = 0; r < delta.size(); ++r) { double s = 0; for (int d = 0; d < D; ++d) s += F(o[r * D + d]) * F(dOl[r * D + d]); delta[r] = (float)s; }
    }
    if (D == 64) {
        launch((S + 63) / 64, B * KVH, fa2::dkdv_smem<64>(), [&] { fa2::backward_dkdv<T, 64>(q.data(), k.data(), v.data(), vp, dO.data(), lse.data(), delta.data(), dk.data(), dv.data(), H, KVH, Tq, S, c.offset, c.causal, scale, q_bthd, kv_bthd); });
        launch((Tq + 63) / 64, B * H, fa2::dq_smem<64>(), [&] { fa2::backward_dq<T, 64>(q.data(), k.data(), v.data(), vp, dO.data(), lse.data(), delta.data(), dq.data(), H, KVH, Tq, S, c.offset, c.causal, scale, q_bthd, kv_bthd); });
    } else {
        // The d128 entry points' kernels (src/ops/flash.rs launches these).
        launch((S + fa2::WIDE_BK - 1) / fa2::WIDE_BK, B * KVH, fa2::dkdv_wide_smem<128>(), [&] { fa2::backward_dkdv_wide<T, 128>(q.data(), k.data(), v.data(), vp, dO.data(), lse.data(), delta.data(), dk.data(), dv.data(), H, KVH, Tq, S, c.offset, c.causal, scale, q_bthd, kv_bthd); }, fa2::WIDE_DKDV_NT);
        launch((Tq + fa2::WIDE_DQ_BQ - 1) / fa2::WIDE_DQ_BQ, B * H, fa2::dq_wide_smem<128>(), [&] { fa2::backward_dq_wide<T, 128>(q.data(), k.data(), v.data(), vp, dO.data(), lse.data(), delta.data(), dq.data(), H, KVH, Tq, S, c.offset, c.causal, scale, q_bthd, kv_bthd); }, fa2::WIDE_DQ_NT);
    }
    }
    dq = from_storage(dq, B, H, Tq, D, q_bthd);
    dk = from_storage(dk, B, KVH, S, D, kv_bthd);
    dv = from_storage(dv, B, KVH, S, D, kv_bthd);

    // ---- f64 reference on the same rounded inputs
    std::vector<double> ro(q.size(), 0), rlse(lse.size(), -INFINITY), rdq(q.size(), 0), rdk(k.size(), 0), rdv(v.size(), 0);
    std::vector<bool> seen_row(lse.size(), false);
    for (int b = 0; b < B; ++b) for (int h = 0; h < H; ++h) for (int i = 0; i < Tq; ++i) {
        const size_t row = ((size_t)b * H + h) * Tq + i;
        const T* qi = &q[row * D];
        const T* gi = &dO[row * D];
        std::vector<double> sc(S, -INFINITY);
        double mx = -INFINITY;
        for (int j = 0; j < S; ++j) {
            if (vp && !vp[b * S + j]) continue;
            if (c.causal && j > c.offset + i) continue;
            const T* kj = &k[(((size_t)b * KVH + h / group) * S + j) * D];
            double s = 0; for (int d = 0; d < D; ++d) s += F(qi[d]) * F(kj[d]);
            sc[j] = s * scale; mx = std::max(mx, sc[j]);
        }
        if (mx == -INFINITY) continue;
        seen_row[row] = true;
        double sum = 0; for (int j = 0; j < S; ++j) if (sc[j] > -INFINITY) sum += std::exp(sc[j] - mx);
        rlse[row] = mx + std::log(sum);
        double dl = 0;
        std::vector<double> out(D, 0);
        for (int j = 0; j < S; ++j) if (sc[j] > -INFINITY) {
            const T* vj = &v[(((size_t)b * KVH + h / group) * S + j) * D];
            const double p = std::exp(sc[j] - rlse[row]);
            for (int d = 0; d < D; ++d) out[d] += p * F(vj[d]);
        }
        for (int d = 0; d < D; ++d) { ro[row * D + d] = out[d]; dl += out[d] * F(gi[d]); }
        for (int j = 0; j < S; ++j) if (sc[j] > -INFINITY) {
            const size_t kr = (((size_t)b * KVH + h / group) * S + j) * D;
            const double p = std::exp(sc[j] - rlse[row]);
            double dp = 0; for (int d = 0; d < D; ++d) dp += F(gi[d]) * F(v[kr + d]);
            const double ds = p * (dp - dl) * scale;
            for (int d = 0; d < D; ++d) {
                rdq[row * D + d] += ds * F(k[kr + d]);
                rdk[kr + d] += ds * F(qi[d]);
                rdv[kr + d] += p * F(gi[d]);
            }
        }
    }
    // ---- compare
    double worst_all = 0;
    auto cmp = [&](const char* what, const std::vector<T>& got, const std::vector<double>& ref) {
        double m = 1e-6, w = 0; bool finite = true;
        for (double x : ref) m = std::max(m, std::fabs(x));
        for (size_t i = 0; i < got.size(); ++i) { const double g = F(got[i]); if (!std::isfinite(g)) finite = false; w = std::max(w, std::fabs(g - ref[i])); }
        const double rel = finite ? w / m : INFINITY;
        printf("  %-4s rel err %.2e%s\n", what, rel, finite ? "" : " (NON-FINITE)");
        worst_all = std::max(worst_all, rel);
    };
    cmp("o", o, ro);
    cmp("dq", dq, rdq);
    cmp("dk", dk, rdk);
    cmp("dv", dv, rdv);
    double lerr = 0; bool lok = true;
    for (size_t r = 0; r < lse.size(); ++r) {
        if (!seen_row[r]) {
            if (!(std::isinf(lse[r]) && lse[r] < 0)) lok = false;
            for (int d = 0; d < D; ++d) if (F(o[r * D + d]) != 0.0 || F(dq[r * D + d]) != 0.0) lok = false;
        } else lerr = std::max(lerr, std::fabs(lse[r] - rlse[r]));
    }
    printf("  lse abs err %.2e, unseen rows exact: %s\n", lerr, lok ? "yes" : "NO");
    if (!lok) worst_all = INFINITY;
    return std::max(worst_all, lerr);
}

int main(int argc, char** argv) {
    emu::deferred = argc > 1 && std::string(argv[1]) == "deferred";
    const bool small = argc > 2 && std::string(argv[2]) == "small";
    if (argc > 3) sscanf(argv[3], "%d,%d", &q_bthd, &kv_bthd);
    printf("storage layouts: q/o/dO/dq %s, k/v/dk/dv %s\n", q_bthd ? "[B,T,H,D]" : "[B,H,T,D]", kv_bthd ? "[B,T,H,D]" : "[B,H,T,D]");
    std::vector<Case> cases = {
        {"gqa causal 77x77 left pad 5 (b1)", 2, 4, 2, 77, 77, 0, 1, 64, [](int b, int j) { return b == 0 || j >= 5; }},
        {"causal 45 after 16, right pad, 4 on 1", 2, 4, 1, 45, 61, 16, 1, 128, [](int b, int j) { return b == 0 || j < 54; }},
        {"1 query over 45 keys", 2, 4, 2, 1, 45, 44, 1, 64, [](int b, int j) { return b == 0 || j >= 3; }},
        {"gqa causal 150x150 8 on 2, pads", 2, 8, 2, 150, 150, 0, 1, 128, [](int b, int j) { return b == 0 ? j >= 70 : j < 131; }},
        {"gqa causal 150x150 8 on 2, pads d64", 2, 8, 2, 150, 150, 0, 1, 64, [](int b, int j) { return b == 0 ? j >= 70 : j < 131; }},
        {"causal 100 after 37, no valid", 1, 6, 3, 100, 137, 37, 1, 128, nullptr},
        {"causal 100 after 37, no valid d64", 1, 6, 3, 100, 137, 37, 1, 64, nullptr},
        {"non-causal 70x150 holes", 2, 2, 2, 70, 150, 0, 0, 128, [](int b, int j) { return b == 0 || !((j >= 40 && j < 107) || j % 7 == 3); }},
        {"non-causal 129x65 3 on 1", 1, 3, 1, 129, 65, 0, 0, 64, nullptr},
        {"non-causal 37x10", 2, 4, 2, 37, 10, 0, 0, 128, nullptr},
    };
    if (small) cases = {cases[0], cases[1], cases[7]};
    else if (argc > 2 && std::string(argv[2]) != "all") {  // a comma-separated list of case indices
        std::vector<Case> picked;
        std::string list = argv[2];
        size_t at = 0;
        while (at < list.size()) { size_t next = list.find(',', at); if (next == std::string::npos) next = list.size(); picked.push_back(cases.at(std::stoi(list.substr(at, next - at)))); at = next + 1; }
        cases = picked;
    }
    bool ok = true;
    unsigned seed = 1;
    for (auto& c : cases) {
        printf("%s (d%d) bf16\n", c.name, c.D);
        const double e1 = run<bf16>(c, seed++);
        printf("%s (d%d) f16\n", c.name, c.D);
        const double e2 = run<__half>(c, seed++);
        if (!(e1 < 3e-2) || !(e2 < 5e-3)) { ok = false; printf("  ^^^ FAIL\n"); }
        fflush(stdout);
    }
    printf(ok ? "ALL OK\n" : "FAILURES\n");
    return ok ? 0 : 1;
}
