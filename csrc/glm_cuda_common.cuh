// Device helpers shared by the .cu files: fp32 <-> storage type conversions and a block-wide sum.
// CUDA headers only.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include "glm_ops.h"

namespace glm {

// Loads widen to fp32; stores round to nearest even (what torch's .to(dtype) does).
__device__ __forceinline__ float to_float(float v) { return v; }
__device__ __forceinline__ float to_float(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename T> __device__ __forceinline__ T from_float(float v);
template <> __device__ __forceinline__ float from_float<float>(float v) { return v; }
template <> __device__ __forceinline__ __half from_float<__half>(float v) { return __float2half_rn(v); }
template <> __device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float v) {
  return __float2bfloat16_rn(v);
}

// fp32 value rounded to T's precision, returned as fp32.
template <typename T> __device__ __forceinline__ float round_to(float v) { return to_float(from_float<T>(v)); }

constexpr int kWarpSize = 32;

// Sum of `v` over the block; every thread gets the result. `scratch` holds one float per warp
// (blockDim.x <= 1024, so 32). Safe to call repeatedly: it synchronises before returning, so the
// next call cannot overwrite `scratch` while a thread still reads it.
__device__ __forceinline__ float block_sum(float v, float* scratch) {
  for (int offset = kWarpSize / 2; offset > 0; offset >>= 1) v += __shfl_xor_sync(0xffffffffu, v, offset);
  const int warp = threadIdx.x / kWarpSize;
  const int lane = threadIdx.x % kWarpSize;
  const int num_warps = (blockDim.x + kWarpSize - 1) / kWarpSize;
  if (lane == 0) scratch[warp] = v;
  __syncthreads();
  float total = 0.f;
  for (int w = 0; w < num_warps; ++w) total += scratch[w];  // same order in every thread
  __syncthreads();
  return total;
}

}  // namespace glm
