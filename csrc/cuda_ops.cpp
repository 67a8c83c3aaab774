// Torch binding for the CUDA kernels in adamw.cu and rms_norm.cu (raw-pointer launchers declared in
// glm_ops.h). The ops are registered with torch.library under the `glm_engine` namespace:
//
//   glm_engine::rms_norm_fwd(Tensor x, Tensor weight, float eps) -> (Tensor y, Tensor rstd)
//   glm_engine::rms_norm_bwd(Tensor dy, Tensor x, Tensor weight, Tensor rstd) -> (Tensor dx, Tensor dweight)
//   glm_engine::adamw_step(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] exp_avgs,
//                          Tensor(c!)[] exp_avg_sqs, Tensor(d!)[] master_params, float lr, float beta1,
//                          float beta2, float eps, float weight_decay, int step, float inv_grad_scale,
//                          Tensor? grad_scale) -> ()
//
// Python (kernels/_cuda.py) adds the fake (meta) implementations and the autograd.Function. Every
// input is checked here first (device, shape, dtype, contiguity) so a misuse is a readable error,
// not a kernel reading out of bounds. Built by setup.py only when torch has CUDA.
#include <Python.h>

#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime_api.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <optional>
#include <string>
#include <tuple>
#include <vector>

#include "glm_ops.h"

namespace {

// Backward blocks per SM: each block keeps one fp32 dweight partial row, summed afterwards.
constexpr int kBwdBlocksPerSm = 2;

int dtype_code(const at::Tensor& t, const char* op, const char* name) {
  switch (t.scalar_type()) {
    case at::kFloat: return GLM_FLOAT32;
    case at::kHalf: return GLM_FLOAT16;
    case at::kBFloat16: return GLM_BFLOAT16;
    default: break;
  }
  TORCH_CHECK(false, op, ": ", name, " has dtype ", t.scalar_type(), " (shape ", t.sizes(),
              "); supported dtypes are float32, float16 and bfloat16");
  return -1;
}

void check_cuda_contiguous(const at::Tensor& t, const char* op, const std::string& name, const at::Device& device) {
  TORCH_CHECK(t.is_cuda(), op, ": ", name, " must be a CUDA tensor, got one on ", t.device(), " (shape ",
              t.sizes(), ")");
  TORCH_CHECK(t.device() == device, op, ": ", name, " is on ", t.device(), " but the other inputs are on ", device);
  TORCH_CHECK(t.is_contiguous(), op, ": ", name, " must be contiguous, got shape ", t.sizes(), " with strides ",
              t.strides());
}

void check_launch(cudaError_t err, const char* op) {
  TORCH_CHECK(err == cudaSuccess, op, ": CUDA launch failed: ", cudaGetErrorString(err));
}

void check_norm_dtypes(const at::Tensor& x, const at::Tensor& weight, const char* op) {
  dtype_code(x, op, "x");
  dtype_code(weight, op, "weight");
  const bool same = x.scalar_type() == weight.scalar_type();
  const bool fp32_weight = weight.scalar_type() == at::kFloat;
  TORCH_CHECK(same || fp32_weight, op, ": x is ", x.scalar_type(), " and weight is ", weight.scalar_type(),
              "; supported are equal dtypes, or a float32 weight with a float16/bfloat16 x");
}

void check_norm_shapes(const at::Tensor& x, const at::Tensor& weight, const char* op) {
  TORCH_CHECK(x.dim() == 2, op, ": x must be 2-D [rows, cols], got shape ", x.sizes());
  TORCH_CHECK(x.size(1) > 0, op, ": x must have at least one column, got shape ", x.sizes());
  TORCH_CHECK(weight.dim() == 1 && weight.size(0) == x.size(1), op, ": weight shape ", weight.sizes(),
              " does not match the last dim of x ", x.sizes());
}

std::tuple<at::Tensor, at::Tensor> rms_norm_fwd(const at::Tensor& x, const at::Tensor& weight, double eps) {
  const char* op = "glm_engine::rms_norm_fwd";
  check_cuda_contiguous(x, op, "x", x.device());
  check_cuda_contiguous(weight, op, "weight", x.device());
  check_norm_shapes(x, weight, op);
  check_norm_dtypes(x, weight, op);
  TORCH_CHECK(eps >= 0.0, op, ": eps must be >= 0, got ", eps);
  const c10::cuda::CUDAGuard guard(x.device());
  const int64_t rows = x.size(0);
  const int64_t cols = x.size(1);
  at::Tensor y = at::empty({rows, cols}, x.options().dtype(weight.scalar_type()));
  at::Tensor rstd = at::empty({rows}, x.options().dtype(at::kFloat));
  if (rows > 0) {
    check_launch(glm_rms_norm_fwd(x.data_ptr(), weight.data_ptr(), y.data_ptr(), rstd.data_ptr<float>(), rows, cols,
                                  static_cast<float>(eps), dtype_code(x, op, "x"), dtype_code(weight, op, "weight"),
                                  c10::cuda::getCurrentCUDAStream().stream()),
                 op);
  }
  return {y, rstd};
}

std::tuple<at::Tensor, at::Tensor> rms_norm_bwd(const at::Tensor& dy, const at::Tensor& x, const at::Tensor& weight,
                                                const at::Tensor& rstd) {
  const char* op = "glm_engine::rms_norm_bwd";
  check_cuda_contiguous(x, op, "x", x.device());
  check_cuda_contiguous(dy, op, "dy", x.device());
  check_cuda_contiguous(weight, op, "weight", x.device());
  check_cuda_contiguous(rstd, op, "rstd", x.device());
  check_norm_shapes(x, weight, op);
  check_norm_dtypes(x, weight, op);
  TORCH_CHECK(dy.sizes() == x.sizes(), op, ": dy shape ", dy.sizes(), " != x shape ", x.sizes());
  TORCH_CHECK(dy.scalar_type() == weight.scalar_type(), op, ": dy has dtype ", dy.scalar_type(),
              " but the forward output (weight's dtype) is ", weight.scalar_type());
  TORCH_CHECK(rstd.scalar_type() == at::kFloat && rstd.dim() == 1 && rstd.size(0) == x.size(0), op,
              ": rstd must be float32 [rows] = [", x.size(0), "], got ", rstd.scalar_type(), " ", rstd.sizes());
  const c10::cuda::CUDAGuard guard(x.device());
  const int64_t rows = x.size(0);
  const int64_t cols = x.size(1);
  at::Tensor dx = at::empty_like(x);
  if (rows == 0) return {dx, at::zeros_like(weight)};
  int sms = 0;
  check_launch(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, x.get_device()), op);
  const int num_partials = static_cast<int>(std::min<int64_t>(rows, static_cast<int64_t>(kBwdBlocksPerSm) * sms));
  at::Tensor dw_partial = at::empty({num_partials, cols}, x.options().dtype(at::kFloat));
  check_launch(glm_rms_norm_bwd(dy.data_ptr(), x.data_ptr(), weight.data_ptr(), rstd.data_ptr<float>(), dx.data_ptr(),
                                dw_partial.data_ptr<float>(), rows, cols, num_partials, dtype_code(x, op, "x"),
                                dtype_code(weight, op, "weight"), c10::cuda::getCurrentCUDAStream().stream()),
               op);
  return {dx, dw_partial.sum(0).to(weight.scalar_type())};
}

void adamw_step(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs, at::TensorList exp_avg_sqs,
                at::TensorList master_params, double lr, double beta1, double beta2, double eps, double weight_decay,
                int64_t step, double inv_grad_scale, const std::optional<at::Tensor>& grad_scale) {
  const char* op = "glm_engine::adamw_step";
  const size_t n = params.size();
  TORCH_CHECK(grads.size() == n && exp_avgs.size() == n && exp_avg_sqs.size() == n, op,
              ": list lengths differ: params ", n, ", grads ", grads.size(), ", exp_avgs ", exp_avgs.size(),
              ", exp_avg_sqs ", exp_avg_sqs.size());
  const bool has_master = !master_params.empty();
  TORCH_CHECK(!has_master || master_params.size() == n, op, ": master_params has ", master_params.size(),
              " tensors but params has ", n, " (pass an empty list for no master weights)");
  TORCH_CHECK(step >= 1, op, ": step must be >= 1 (the count of updates including this one), got ", step);
  TORCH_CHECK(lr >= 0.0 && eps >= 0.0 && weight_decay >= 0.0, op, ": lr, eps and weight_decay must be >= 0, got lr=",
              lr, ", eps=", eps, ", weight_decay=", weight_decay);
  TORCH_CHECK(beta1 >= 0.0 && beta1 < 1.0 && beta2 >= 0.0 && beta2 < 1.0, op, ": betas must be in [0, 1), got (",
              beta1, ", ", beta2, ")");
  if (n == 0) return;
  const at::Device device = params[0].device();
  const at::ScalarType param_dtype = params[0].scalar_type();
  const at::ScalarType grad_dtype = grads[0].scalar_type();
  std::vector<void*> p_ptrs(n);
  std::vector<const void*> g_ptrs(n);
  std::vector<float*> m_ptrs(n), v_ptrs(n), w_ptrs(has_master ? n : 0);
  std::vector<int64_t> numels(n);
  for (size_t i = 0; i < n; ++i) {
    const at::Tensor& p = params[i];
    const std::string idx = "[" + std::to_string(i) + "]";
    check_cuda_contiguous(p, op, "params" + idx, device);
    check_cuda_contiguous(grads[i], op, "grads" + idx, device);
    check_cuda_contiguous(exp_avgs[i], op, "exp_avgs" + idx, device);
    check_cuda_contiguous(exp_avg_sqs[i], op, "exp_avg_sqs" + idx, device);
    TORCH_CHECK(p.scalar_type() == param_dtype && grads[i].scalar_type() == grad_dtype, op, ": params[", i,
                "] / grads[", i, "] have dtypes ", p.scalar_type(), " / ", grads[i].scalar_type(),
                " but params[0] / grads[0] have ", param_dtype, " / ", grad_dtype,
                "; one call takes one param dtype and one grad dtype (group them first)");
    TORCH_CHECK(exp_avgs[i].scalar_type() == at::kFloat && exp_avg_sqs[i].scalar_type() == at::kFloat, op,
                ": exp_avgs[", i, "] and exp_avg_sqs[", i, "] must be float32, got ", exp_avgs[i].scalar_type(),
                " and ", exp_avg_sqs[i].scalar_type());
    const int64_t numel = p.numel();
    TORCH_CHECK(grads[i].numel() == numel && exp_avgs[i].numel() == numel && exp_avg_sqs[i].numel() == numel, op,
                ": tensor ", i, " sizes differ: params ", p.sizes(), ", grads ", grads[i].sizes(), ", exp_avgs ",
                exp_avgs[i].sizes(), ", exp_avg_sqs ", exp_avg_sqs[i].sizes());
    p_ptrs[i] = p.data_ptr();
    g_ptrs[i] = grads[i].data_ptr();
    m_ptrs[i] = exp_avgs[i].data_ptr<float>();
    v_ptrs[i] = exp_avg_sqs[i].data_ptr<float>();
    numels[i] = numel;
    if (has_master) {
      const at::Tensor& w = master_params[i];
      check_cuda_contiguous(w, op, "master_params" + idx, device);
      TORCH_CHECK(w.scalar_type() == at::kFloat && w.numel() == numel, op, ": master_params[", i,
                  "] must be float32 with params[", i, "]'s ", numel, " elements, got ", w.scalar_type(), " ",
                  w.sizes());
      w_ptrs[i] = w.data_ptr<float>();
    }
  }
  const float* scale_ptr = nullptr;
  if (grad_scale.has_value()) {
    const at::Tensor& s = *grad_scale;
    check_cuda_contiguous(s, op, "grad_scale", device);
    TORCH_CHECK(s.scalar_type() == at::kFloat && s.numel() == 1, op,
                ": grad_scale must be a float32 tensor with one element, got ", s.scalar_type(), " ", s.sizes());
    scale_ptr = s.data_ptr<float>();
  }
  // Host-side scalars in double, rounded once to fp32 (as the Triton and torch backends do).
  const double bias_correction1 = 1.0 - std::pow(beta1, static_cast<double>(step));
  const double bias_correction2 = 1.0 - std::pow(beta2, static_cast<double>(step));
  GlmAdamwHyper hyper;
  hyper.beta1 = static_cast<float>(beta1);
  hyper.one_minus_beta1 = static_cast<float>(1.0 - beta1);
  hyper.beta2 = static_cast<float>(beta2);
  hyper.one_minus_beta2 = static_cast<float>(1.0 - beta2);
  hyper.eps = static_cast<float>(eps);
  hyper.decay_factor = static_cast<float>(1.0 - lr * weight_decay);
  hyper.step_size = static_cast<float>(lr / bias_correction1);
  hyper.bias_correction2_sqrt = static_cast<float>(std::sqrt(bias_correction2));
  hyper.inv_grad_scale = static_cast<float>(inv_grad_scale);
  hyper.grad_scale = scale_ptr;
  const c10::cuda::CUDAGuard guard(device);
  check_launch(glm_adamw_step(p_ptrs.data(), has_master ? w_ptrs.data() : nullptr, g_ptrs.data(), m_ptrs.data(),
                              v_ptrs.data(), numels.data(), static_cast<int>(n), dtype_code(params[0], op, "params"),
                              dtype_code(grads[0], op, "grads"), &hyper, c10::cuda::getCurrentCUDAStream().stream()),
               op);
}

}  // namespace

TORCH_LIBRARY(glm_engine, m) {
  m.def("rms_norm_fwd(Tensor x, Tensor weight, float eps) -> (Tensor y, Tensor rstd)");
  m.def("rms_norm_bwd(Tensor dy, Tensor x, Tensor weight, Tensor rstd) -> (Tensor dx, Tensor dweight)");
  m.def(
      "adamw_step(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] exp_avgs, Tensor(c!)[] exp_avg_sqs, "
      "Tensor(d!)[] master_params, float lr, float beta1, float beta2, float eps, float weight_decay, int step, "
      "float inv_grad_scale, Tensor? grad_scale) -> ()");
}

TORCH_LIBRARY_IMPL(glm_engine, CUDA, m) {
  m.impl("rms_norm_fwd", &rms_norm_fwd);
  m.impl("rms_norm_bwd", &rms_norm_bwd);
  m.impl("adamw_step", &adamw_step);
}

// `import kernels._cuda_ops` runs the registrations above; the module itself has no Python API.
PyMODINIT_FUNC PyInit__cuda_ops(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_cuda_ops",
                                          "glm_engine CUDA ops (torch.ops.glm_engine.*)", -1, nullptr,
                                          nullptr, nullptr, nullptr, nullptr};
  return PyModule_Create(&module_def);
}
