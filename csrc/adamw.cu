// Multi-tensor AdamW step (see glm_ops.h for the math and kernels/adamw.py for the reference).
// CUDA headers only: compiles with plain `nvcc -c -arch=sm_90 adamw.cu`.
//
// One launch covers up to kMaxTensors tensors and kMaxBlocks chunks of kChunk elements; the tensor
// pointers and the block -> (tensor, chunk) map travel in the kernel's parameter block (< 4 KiB,
// the limit on every architecture), so no device-side table has to be uploaded. Larger lists are
// split over several launches on the same stream.
#include <stdint.h>

#include "glm_cuda_common.cuh"
#include "glm_ops.h"

namespace glm {

constexpr int kMaxTensors = 24;
constexpr int kMaxBlocks = 320;
constexpr int kThreads = 512;
// Elements per block: 32 per thread, enough work to hide a block's start-up; small tensors take a
// single partial chunk. A starting point, not yet swept on a GPU.
constexpr int64_t kChunk = 32 * kThreads;

struct AdamwBatch {
  void* params[kMaxTensors];
  float* masters[kMaxTensors];
  const void* grads[kMaxTensors];
  float* exp_avgs[kMaxTensors];
  float* exp_avg_sqs[kMaxTensors];
  int64_t numels[kMaxTensors];
  int block_tensor[kMaxBlocks];  // slot in the arrays above
  int block_chunk[kMaxBlocks];   // chunk index within that tensor
};
static_assert(sizeof(AdamwBatch) + sizeof(GlmAdamwHyper) <= 4096, "kernel parameters must fit in 4 KiB");

template <typename P, typename G, bool kHasMaster>
__global__ void __launch_bounds__(kThreads) adamw_kernel(AdamwBatch batch, GlmAdamwHyper h) {
  const int slot = batch.block_tensor[blockIdx.x];
  const int64_t begin = static_cast<int64_t>(batch.block_chunk[blockIdx.x]) * kChunk;
  const int64_t n = batch.numels[slot];
  const int64_t end = begin + kChunk < n ? begin + kChunk : n;
  P* __restrict__ param = static_cast<P*>(batch.params[slot]);
  float* __restrict__ master = batch.masters[slot];
  const G* __restrict__ grad = static_cast<const G*>(batch.grads[slot]);
  float* __restrict__ exp_avg = batch.exp_avgs[slot];
  float* __restrict__ exp_avg_sq = batch.exp_avg_sqs[slot];

  float grad_mul = h.inv_grad_scale;
  if (h.grad_scale != nullptr) grad_mul = __fdiv_rn(grad_mul, *h.grad_scale);
  // Explicitly rounded sqrt/div: the results do not depend on --use_fast_math.
  for (int64_t i = begin + threadIdx.x; i < end; i += kThreads) {
    const float g = glm::to_float(grad[i]) * grad_mul;
    float w = kHasMaster ? master[i] : glm::to_float(param[i]);
    float m = exp_avg[i];
    float v = exp_avg_sq[i];
    w *= h.decay_factor;
    m = h.beta1 * m + h.one_minus_beta1 * g;
    v = h.beta2 * v + h.one_minus_beta2 * g * g;
    const float denom = __fdiv_rn(__fsqrt_rn(v), h.bias_correction2_sqrt) + h.eps;
    w -= h.step_size * __fdiv_rn(m, denom);
    exp_avg[i] = m;
    exp_avg_sq[i] = v;
    if (kHasMaster) master[i] = w;
    param[i] = glm::from_float<P>(w);
  }
}

// The host-side arrays glm_adamw_step receives (see glm_ops.h).
struct TensorLists {
  void* const* params;
  float* const* masters;  // NULL: no master weights
  const void* const* grads;
  float* const* exp_avgs;
  float* const* exp_avg_sqs;
  const int64_t* numels;
  int num_tensors;
};

template <typename P, typename G, bool kHasMaster>
cudaError_t adamw_launch(const TensorLists& lists, const GlmAdamwHyper& hyper, cudaStream_t stream) {
  AdamwBatch batch;
  int slots = 0;
  int blocks = 0;
  for (int t = 0; t < lists.num_tensors; ++t) {
    const int64_t n = lists.numels[t];
    if (n == 0) continue;
    int slot = slots++;
    batch.params[slot] = lists.params[t];
    batch.masters[slot] = kHasMaster ? lists.masters[t] : nullptr;
    batch.grads[slot] = lists.grads[t];
    batch.exp_avgs[slot] = lists.exp_avgs[t];
    batch.exp_avg_sqs[slot] = lists.exp_avg_sqs[t];
    batch.numels[slot] = n;
    const int64_t chunks = (n + kChunk - 1) / kChunk;
    for (int64_t c = 0; c < chunks; ++c) {
      batch.block_tensor[blocks] = slot;
      batch.block_chunk[blocks] = static_cast<int>(c);
      ++blocks;
      const bool last_chunk = c == chunks - 1;
      if (blocks == kMaxBlocks || (slots == kMaxTensors && last_chunk)) {
        adamw_kernel<P, G, kHasMaster><<<blocks, kThreads, 0, stream>>>(batch, hyper);
        const cudaError_t err = cudaGetLastError();
        if (err != cudaSuccess) return err;
        blocks = 0;
        if (last_chunk) {
          slots = 0;
        } else {  // the rest of tensor t goes into the next launch, as its slot 0
          batch.params[0] = batch.params[slot];
          batch.masters[0] = batch.masters[slot];
          batch.grads[0] = batch.grads[slot];
          batch.exp_avgs[0] = batch.exp_avgs[slot];
          batch.exp_avg_sqs[0] = batch.exp_avg_sqs[slot];
          batch.numels[0] = batch.numels[slot];
          slot = 0;
          slots = 1;
        }
      }
    }
  }
  if (blocks > 0) adamw_kernel<P, G, kHasMaster><<<blocks, kThreads, 0, stream>>>(batch, hyper);
  return cudaGetLastError();
}

template <typename P, typename G>
cudaError_t adamw_dispatch_master(const TensorLists& lists, const GlmAdamwHyper& hyper, cudaStream_t stream) {
  if (lists.masters != nullptr) return adamw_launch<P, G, true>(lists, hyper, stream);
  return adamw_launch<P, G, false>(lists, hyper, stream);
}

template <typename P>
cudaError_t adamw_dispatch_grad(int grad_dtype, const TensorLists& lists, const GlmAdamwHyper& hyper,
                                cudaStream_t stream) {
  switch (grad_dtype) {
    case GLM_FLOAT32: return adamw_dispatch_master<P, float>(lists, hyper, stream);
    case GLM_FLOAT16: return adamw_dispatch_master<P, __half>(lists, hyper, stream);
    case GLM_BFLOAT16: return adamw_dispatch_master<P, __nv_bfloat16>(lists, hyper, stream);
    default: return cudaErrorInvalidValue;
  }
}

// Explicit instantiations: param dtype x grad dtype x (master or not) = 18 kernels.
#define GLM_ADAMW_INSTANTIATE(P, G)                                                                      \
  template cudaError_t adamw_launch<P, G, true>(const TensorLists&, const GlmAdamwHyper&, cudaStream_t); \
  template cudaError_t adamw_launch<P, G, false>(const TensorLists&, const GlmAdamwHyper&, cudaStream_t);
GLM_ADAMW_INSTANTIATE(float, float)
GLM_ADAMW_INSTANTIATE(float, __half)
GLM_ADAMW_INSTANTIATE(float, __nv_bfloat16)
GLM_ADAMW_INSTANTIATE(__half, float)
GLM_ADAMW_INSTANTIATE(__half, __half)
GLM_ADAMW_INSTANTIATE(__half, __nv_bfloat16)
GLM_ADAMW_INSTANTIATE(__nv_bfloat16, float)
GLM_ADAMW_INSTANTIATE(__nv_bfloat16, __half)
GLM_ADAMW_INSTANTIATE(__nv_bfloat16, __nv_bfloat16)
#undef GLM_ADAMW_INSTANTIATE

}  // namespace glm

extern "C" cudaError_t glm_adamw_step(void* const* params, float* const* masters, const void* const* grads,
                                      float* const* exp_avgs, float* const* exp_avg_sqs, const int64_t* numels,
                                      int num_tensors, int param_dtype, int grad_dtype,
                                      const GlmAdamwHyper* hyper, cudaStream_t stream) {
  if (num_tensors < 0 || hyper == nullptr) return cudaErrorInvalidValue;
  if (num_tensors == 0) return cudaSuccess;
  const glm::TensorLists lists{params, masters, grads, exp_avgs, exp_avg_sqs, numels, num_tensors};
  switch (param_dtype) {
    case GLM_FLOAT32: return glm::adamw_dispatch_grad<float>(grad_dtype, lists, *hyper, stream);
    case GLM_FLOAT16: return glm::adamw_dispatch_grad<__half>(grad_dtype, lists, *hyper, stream);
    case GLM_BFLOAT16: return glm::adamw_dispatch_grad<__nv_bfloat16>(grad_dtype, lists, *hyper, stream);
    default: return cudaErrorInvalidValue;
  }
}
