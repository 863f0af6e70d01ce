#pragma once
// simt shadow of c10/cuda/CUDAGuard.h: the emulated device has one index; the guard checks the
// tensor is on it (the op's own device check says which devices it takes).
#include <c10/core/Device.h>
#include <c10/util/Exception.h>

namespace c10 {
namespace cuda {

struct CUDAGuard {
  explicit CUDAGuard(c10::Device d) {
    TORCH_CHECK(d.is_cpu() || d.type() == c10::DeviceType::PrivateUse1,
                "simt: a CUDA guard for a tensor on ", d, ", not on the emulated device");
  }
  explicit CUDAGuard(c10::DeviceIndex) {}
};
struct OptionalCUDAGuard {
  explicit OptionalCUDAGuard(std::optional<c10::Device>) {}
};

}  // namespace cuda
}  // namespace c10

namespace at {
namespace cuda {
using c10::cuda::CUDAGuard;
using c10::cuda::OptionalCUDAGuard;
}  // namespace cuda
}  // namespace at
