// Primitives shared by the Hopper flash kernels (forward.cuh: namespace wgfa; backward.cuh:
// namespace wgbw), which bring them in by name: shared-memory addresses and the size check,
// cp.async, the async-proxy fence, wgmma fence / commit / wait, the compiler fences around
// in-flight accumulators (DESIGN.md §1), the 64-bit shared-memory matrix descriptor with the
// 128-byte swizzle (DESIGN.md §2), bf16 packing, exp2 and the [B, H, T, D] / [B, T, H, D] row
// offsets of head_dim-128 heads.
#pragma once
#include <cuda_bf16.h>
#include <stdint.h>

namespace wgcore {

constexpr int D = 128;  // head dim

__device__ __forceinline__ uint32_t smem_address(const void* pointer) {
    return static_cast<uint32_t>(__cvta_generic_to_shared(pointer));
}
__device__ __forceinline__ void require_smem(int bytes) {
    uint32_t available;
    asm volatile("mov.u32 %0, %%dynamic_smem_size;" : "=r"(available));
    if (available < static_cast<uint32_t>(bytes)) __trap();
}
__device__ __forceinline__ void cp_async16(uint32_t dst, const void* src, bool fill) {
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(src), "r"(fill ? 16 : 0)
                 : "memory");
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::: "memory"); }
__device__ __forceinline__ void fence_proxy_async() { asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory"); }
__device__ __forceinline__ void wgmma_fence() { asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory"); }
__device__ __forceinline__ void wgmma_commit() { asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory"); }
template <int N> __device__ __forceinline__ void wgmma_wait() {
    asm volatile("wgmma.wait_group.sync.aligned %0;\n" ::"n"(N) : "memory");
}
template <int N> __device__ __forceinline__ void fence_registers(float (&r)[N]) {
#pragma unroll
    for (int i = 0; i < N; ++i) asm volatile("" : "+f"(r[i])::"memory");
}
template <int N> __device__ __forceinline__ void fence_registers(uint32_t (&r)[N]) {
#pragma unroll
    for (int i = 0; i < N; ++i) asm volatile("" : "+r"(r[i])::"memory");
}
__host__ __device__ constexpr uint64_t descriptor(uint32_t address, uint32_t leading_bytes, uint32_t stride_bytes) {
    return (uint64_t)((address & 0x3FFFFu) >> 4) | ((uint64_t)((leading_bytes >> 4) & 0x3FFFu) << 16) |
           ((uint64_t)((stride_bytes >> 4) & 0x3FFFu) << 32) | (1ull << 62);
}
__device__ __forceinline__ uint32_t pack_bf16(float lo, float hi) {
    __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);  // .x = lo (low 16 bits)
    return *reinterpret_cast<uint32_t*>(&v);
}
__device__ __forceinline__ float exp2_ftz(float x) {
    float y;
    asm("ex2.approx.ftz.f32 %0, %1;\n" : "=f"(y) : "f"(x));
    return y;
}
__device__ __forceinline__ size_t row_offset(int b, int h, int t, int heads, int length, int bthd) {
    return bthd ? (((size_t)b * length + t) * heads + h) * D : (((size_t)b * heads + h) * length + t) * D;
}
__device__ __forceinline__ int row_stride(int heads, int bthd) { return bthd ? heads * D : D; }

}  // namespace wgcore
