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
    float value = __fmul_rn(a.nested_code[a.quantized[block]], a.nested_scale[block / a.nested_block]);
    return __fadd_rn(value, a.offset);
}

template <typename T> __device__ __forceinline__ T from_f32(float x);
template <> __device__ __forceinline__ float from_f32<float>(float x) { return x; }
template <> __device__ __forceinline__ __nv_bfloat16 from_f32<__nv_bfloat16>(float x) {
    return __float2bfloat16_rn(x);
}
template <> __device__ __forceinline__ __half from_f32<__half>(float x) { return __float2half_rn(x); }

// One thread per packed byte (two values), grid-stride.
template <typename T>
__device__ void dequantize(const uint8_t* packed, const float* code, Absmax absmax, int block_size,
                           unsigned long long count, T* out) {
    __shared__ float levels[16];
    if (threadIdx.x < 16) {
        levels[threadIdx.x] = code[threadIdx.x];
    }
    __syncthreads();
    const unsigned long long bytes = (count + 1) / 2;
    const unsigned long long stride = (unsigned long long)gridDim.x * blockDim.x;
    for (unsigned long long i = (unsigned long long)blockIdx.x * blockDim.x + threadIdx.x; i < bytes;
         i += stride) {
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
