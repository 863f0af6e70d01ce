#pragma once
// Argument checks shared by every op: each message says what was expected and what came.
#include <ATen/ATen.h>

#include <string>

namespace retina_fast {

inline void check_floating(const at::Tensor& t, const char* op, const char* name) {
  TORCH_CHECK(at::isFloatingType(t.scalar_type()), op, ": expected ", name,
              " to be a floating tensor (float32, float64, float16 or bfloat16), got ",
              t.scalar_type());
}

inline void check_dim(const at::Tensor& t, int64_t dim, const char* op, const char* name,
                      const char* shape) {
  TORCH_CHECK(t.dim() == dim, op, ": expected ", name, " of shape ", shape, " (", dim,
              " dims), got shape ", t.sizes());
}

inline void check_same_device(const at::Tensor& a, const at::Tensor& b, const char* op,
                              const char* na, const char* nb) {
  TORCH_CHECK(a.device() == b.device(), op, ": expected ", na, " and ", nb,
              " on the same device, got ", na, " on ", a.device(), " and ", nb, " on ",
              b.device());
}

inline void check_device(const at::Tensor& t, at::DeviceType d, const char* op,
                         const char* name) {
#ifdef RETINA_FAST_SIMT
  // The CPU emulator of the CUDA kernels (csrc/simt) runs them on CPU tensors (its library
  // retina_fast_simt) and on its own device (PrivateUse1, "simt"); only that build.
  if (d == at::kCUDA) {
    TORCH_CHECK(t.is_cpu() || t.device().type() == at::DeviceType::PrivateUse1, op, ": expected ", name,
                " on the emulated CUDA device (simt or cpu), got ", t.device());
    return;
  }
#endif
  TORCH_CHECK(t.device().type() == d, op, ": expected ", name, " on ", d, ", got ",
              t.device());
}

}  // namespace retina_fast
