// RMSNorm forward and backward over rows of a contiguous [rows, cols] input (see glm_ops.h for the
// math; the reference is kernels/rms_norm.py's rms_norm_reference). CUDA headers only: compiles with
// plain `nvcc -c -arch=sm_90 rms_norm.cu`.
//
// One block per row (grid-stride over rows); each thread strides over the columns, the row's sum
// is a block reduction in fp32. The second pass re-reads the row, which is then in L1/L2.
#include <stdint.h>

#include "glm_cuda_common.cuh"
#include "glm_ops.h"

namespace glm {

constexpr int kMaxThreads = 1024;
// Columns per thread the block size aims at: 8 keeps the loads of a 4096-wide row to 512 threads.
// A starting point, not yet swept on a GPU.
constexpr int kColsPerThread = 8;
// Forward grid cap; larger inputs loop over rows (grid-stride).
constexpr int64_t kMaxFwdBlocks = 1 << 20;

int threads_for(int64_t cols) {
  int64_t t = (cols + kColsPerThread - 1) / kColsPerThread;
  t = (t + glm::kWarpSize - 1) / glm::kWarpSize * glm::kWarpSize;  // whole warps: block_sum needs them
  if (t < glm::kWarpSize) t = glm::kWarpSize;
  if (t > kMaxThreads) t = kMaxThreads;
  return static_cast<int>(t);
}

// X: input storage type, W: weight type (also y and dy).
template <typename X, typename W>
__global__ void rms_norm_fwd_kernel(const X* __restrict__ x, const W* __restrict__ weight, W* __restrict__ y,
                                    float* __restrict__ rstd, int64_t rows, int64_t cols, float eps) {
  __shared__ float scratch[kMaxThreads / glm::kWarpSize];
  for (int64_t row = blockIdx.x; row < rows; row += gridDim.x) {
    const X* xr = x + row * cols;
    W* yr = y + row * cols;
    float sum_sq = 0.f;
    for (int64_t j = threadIdx.x; j < cols; j += blockDim.x) {
      const float v = glm::to_float(xr[j]);
      sum_sq += v * v;
    }
    sum_sq = glm::block_sum(sum_sq, scratch);
    // Correctly rounded div/sqrt, independent of --use_fast_math (reference: torch.rsqrt in fp32).
    const float r = __fdiv_rn(1.f, __fsqrt_rn(__fdiv_rn(sum_sq, static_cast<float>(cols)) + eps));
    if (threadIdx.x == 0) rstd[row] = r;
    for (int64_t j = threadIdx.x; j < cols; j += blockDim.x) {
      const float normed = glm::round_to<X>(glm::to_float(xr[j]) * r);
      yr[j] = glm::from_float<W>(normed * glm::to_float(weight[j]));
    }
  }
}

// Block b handles rows b, b + gridDim.x, ...; thread t owns columns t, t + blockDim.x, ... of its
// block's dweight partial row, so the read-modify-write of dw_partial needs no atomics (the partial
// row, cols * 4 bytes, stays in L2 between rows).
template <typename X, typename W>
__global__ void rms_norm_bwd_kernel(const W* __restrict__ dy, const X* __restrict__ x,
                                    const W* __restrict__ weight, const float* __restrict__ rstd,
                                    X* __restrict__ dx, float* __restrict__ dw_partial, int64_t rows,
                                    int64_t cols) {
  __shared__ float scratch[kMaxThreads / glm::kWarpSize];
  float* dw = dw_partial + static_cast<int64_t>(blockIdx.x) * cols;
  for (int64_t j = threadIdx.x; j < cols; j += blockDim.x) dw[j] = 0.f;
  const float inv_cols = __fdiv_rn(1.f, static_cast<float>(cols));
  for (int64_t row = blockIdx.x; row < rows; row += gridDim.x) {
    const X* xr = x + row * cols;
    const W* dyr = dy + row * cols;
    X* dxr = dx + row * cols;
    const float r = rstd[row];
    float dot = 0.f;  // sum_j g_j * nh_j
    for (int64_t j = threadIdx.x; j < cols; j += blockDim.x) {
      const float nh = glm::to_float(xr[j]) * r;
      dot += glm::to_float(dyr[j]) * glm::to_float(weight[j]) * nh;
    }
    const float mean_dot = glm::block_sum(dot, scratch) * inv_cols;
    for (int64_t j = threadIdx.x; j < cols; j += blockDim.x) {
      const float nh = glm::to_float(xr[j]) * r;
      const float d = glm::to_float(dyr[j]);
      const float g = d * glm::to_float(weight[j]);
      dxr[j] = glm::from_float<X>(r * (g - nh * mean_dot));
      dw[j] += d * glm::round_to<X>(nh);
    }
  }
}

template <typename X, typename W>
cudaError_t fwd_launch(const void* x, const void* weight, void* y, float* rstd, int64_t rows, int64_t cols,
                       float eps, cudaStream_t stream) {
  const int64_t blocks = rows < kMaxFwdBlocks ? rows : kMaxFwdBlocks;
  rms_norm_fwd_kernel<X, W><<<static_cast<unsigned>(blocks), threads_for(cols), 0, stream>>>(
      static_cast<const X*>(x), static_cast<const W*>(weight), static_cast<W*>(y), rstd, rows, cols, eps);
  return cudaGetLastError();
}

template <typename X, typename W>
cudaError_t bwd_launch(const void* dy, const void* x, const void* weight, const float* rstd, void* dx,
                       float* dw_partial, int64_t rows, int64_t cols, int num_partials, cudaStream_t stream) {
  rms_norm_bwd_kernel<X, W><<<num_partials, threads_for(cols), 0, stream>>>(
      static_cast<const W*>(dy), static_cast<const X*>(x), static_cast<const W*>(weight), rstd,
      static_cast<X*>(dx), dw_partial, rows, cols);
  return cudaGetLastError();
}

// Explicit instantiations for the supported (x, weight) pairs.
#define GLM_RMS_NORM_INSTANTIATE(X, W)                                                                      \
  template cudaError_t fwd_launch<X, W>(const void*, const void*, void*, float*, int64_t, int64_t, float,   \
                                        cudaStream_t);                                                      \
  template cudaError_t bwd_launch<X, W>(const void*, const void*, const void*, const float*, void*, float*, \
                                        int64_t, int64_t, int, cudaStream_t);
GLM_RMS_NORM_INSTANTIATE(float, float)
GLM_RMS_NORM_INSTANTIATE(__half, __half)
GLM_RMS_NORM_INSTANTIATE(__nv_bfloat16, __nv_bfloat16)
GLM_RMS_NORM_INSTANTIATE(__half, float)
GLM_RMS_NORM_INSTANTIATE(__nv_bfloat16, float)
#undef GLM_RMS_NORM_INSTANTIATE

}  // namespace glm

extern "C" cudaError_t glm_rms_norm_fwd(const void* x, const void* weight, void* y, float* rstd, int64_t rows,
                                        int64_t cols, float eps, int x_dtype, int w_dtype, cudaStream_t stream) {
  if (rows < 0 || cols <= 0) return cudaErrorInvalidValue;
  if (rows == 0) return cudaSuccess;
  if (w_dtype == x_dtype) {
    switch (x_dtype) {
      case GLM_FLOAT32: return glm::fwd_launch<float, float>(x, weight, y, rstd, rows, cols, eps, stream);
      case GLM_FLOAT16: return glm::fwd_launch<__half, __half>(x, weight, y, rstd, rows, cols, eps, stream);
      case GLM_BFLOAT16:
        return glm::fwd_launch<__nv_bfloat16, __nv_bfloat16>(x, weight, y, rstd, rows, cols, eps, stream);
      default: return cudaErrorInvalidValue;
    }
  }
  if (w_dtype == GLM_FLOAT32 && x_dtype == GLM_FLOAT16)
    return glm::fwd_launch<__half, float>(x, weight, y, rstd, rows, cols, eps, stream);
  if (w_dtype == GLM_FLOAT32 && x_dtype == GLM_BFLOAT16)
    return glm::fwd_launch<__nv_bfloat16, float>(x, weight, y, rstd, rows, cols, eps, stream);
  return cudaErrorInvalidValue;
}

extern "C" cudaError_t glm_rms_norm_bwd(const void* dy, const void* x, const void* weight, const float* rstd,
                                        void* dx, float* dw_partial, int64_t rows, int64_t cols, int num_partials,
                                        int x_dtype, int w_dtype, cudaStream_t stream) {
  if (rows < 0 || cols <= 0 || num_partials <= 0) return cudaErrorInvalidValue;
  if (w_dtype == x_dtype) {
    switch (x_dtype) {
      case GLM_FLOAT32:
        return glm::bwd_launch<float, float>(dy, x, weight, rstd, dx, dw_partial, rows, cols, num_partials, stream);
      case GLM_FLOAT16:
        return glm::bwd_launch<__half, __half>(dy, x, weight, rstd, dx, dw_partial, rows, cols, num_partials, stream);
      case GLM_BFLOAT16:
        return glm::bwd_launch<__nv_bfloat16, __nv_bfloat16>(dy, x, weight, rstd, dx, dw_partial, rows, cols,
                                                        num_partials, stream);
      default: return cudaErrorInvalidValue;
    }
  }
  if (w_dtype == GLM_FLOAT32 && x_dtype == GLM_FLOAT16)
    return glm::bwd_launch<__half, float>(dy, x, weight, rstd, dx, dw_partial, rows, cols, num_partials, stream);
  if (w_dtype == GLM_FLOAT32 && x_dtype == GLM_BFLOAT16)
    return glm::bwd_launch<__nv_bfloat16, float>(dy, x, weight, rstd, dx, dw_partial, rows, cols, num_partials, stream);
  return cudaErrorInvalidValue;
}
