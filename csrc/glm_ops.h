// C interface between the CUDA kernels (adamw.cu, rms_norm.cu: CUDA headers only, plain nvcc) and the
// torch binding (cuda_ops.cpp). Both sides include this header, so a signature mismatch is a compile
// error rather than a silent ABI bug across the extern "C" boundary.
//
// Every launcher validates its dtype codes, launches on `stream` and returns cudaGetLastError(), or
// cudaErrorInvalidValue for a dtype combination it has no instantiation for. Pointers are raw device
// pointers to contiguous buffers; sizes are element counts.
#pragma once

#include <cuda_runtime_api.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

// Element types understood by the launchers (the binding maps torch dtypes onto these).
enum GlmDtype { GLM_FLOAT32 = 0, GLM_FLOAT16 = 1, GLM_BFLOAT16 = 2 };

// ---------------------------------------------------------------------------------------------
// AdamW (decoupled weight decay, bias-corrected), one multi-tensor step; see kernels/adamw.py for
// the math. Per element, in fp32:
//   g = grad * inv_grad_scale [/ *grad_scale]      w = master (or param when masters == NULL)
//   w *= decay_factor;  m = b1 m + (1-b1) g;  v = b2 v + (1-b2) g^2
//   w -= step_size * m / (sqrt(v) / bias_correction2_sqrt + eps)
//   store m, v, w (master), round_to_param_dtype(w) -> param
// ---------------------------------------------------------------------------------------------
typedef struct GlmAdamwHyper {
  float beta1;
  float one_minus_beta1;        // computed in fp64 on the host: 1 - 0.9f in fp32 is 4 ulps off 0.1
  float beta2;
  float one_minus_beta2;
  float eps;
  float decay_factor;           // 1 - lr * weight_decay
  float step_size;              // lr / (1 - beta1^step)
  float bias_correction2_sqrt;  // sqrt(1 - beta2^step)
  float inv_grad_scale;         // multiplies every gradient (1 when unscaled)
  const float* grad_scale;      // device scalar the gradients are divided by, or NULL
} GlmAdamwHyper;

// params[i]: param_dtype; grads[i]: grad_dtype; masters[i], exp_avgs[i], exp_avg_sqs[i]: fp32.
// `masters` may be NULL (params are updated in place, through fp32). Host arrays of num_tensors.
cudaError_t glm_adamw_step(void* const* params, float* const* masters, const void* const* grads,
                           float* const* exp_avgs, float* const* exp_avg_sqs, const int64_t* numels,
                           int num_tensors, int param_dtype, int grad_dtype, const GlmAdamwHyper* hyper,
                           cudaStream_t stream);

// ---------------------------------------------------------------------------------------------
// RMSNorm over rows of x [rows, cols]:  rstd = 1 / sqrt(mean(x^2) + eps);  y = w * round_x(x * rstd).
// Supported (x_dtype, w_dtype): equal dtypes, or w fp32 with x fp16/bf16. y and dy have w's dtype,
// dx has x's dtype.
// ---------------------------------------------------------------------------------------------
cudaError_t glm_rms_norm_fwd(const void* x, const void* weight, void* y, float* rstd, int64_t rows,
                             int64_t cols, float eps, int x_dtype, int w_dtype, cudaStream_t stream);

// Backward with nh = x * rstd, g = dy * w:
//   dx = rstd * (g - nh * mean(g * nh))            (per row)
//   dw_partial[b, :] = sum over the rows handled by block b of dy * round_x(nh)
// dw_partial is [num_partials, cols] fp32 (one launched block per partial); the caller sums dim 0.
cudaError_t glm_rms_norm_bwd(const void* dy, const void* x, const void* weight, const float* rstd,
                             void* dx, float* dw_partial, int64_t rows, int64_t cols, int num_partials,
                             int x_dtype, int w_dtype, cudaStream_t stream);

#ifdef __cplusplus
}
#endif
