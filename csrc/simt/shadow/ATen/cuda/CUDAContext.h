#pragma once
// simt shadow of ATen/cuda/CUDAContext.h: the current stream and device properties of the
// emulated device (an H200's SM count, so launch geometry is as on the GPU).
#include <c10/core/Device.h>

#include "simt/simt.h"

struct cudaDeviceProp {
  char name[256];
  int multiProcessorCount;
  int maxThreadsPerBlock;
  int warpSize;
  size_t sharedMemPerBlock;
  size_t sharedMemPerBlockOptin;
  int major, minor;
  int maxGridSize[3];
};

namespace simt {
// The grid-size limits the emulator enforces (CUDA's: 2^31 - 1, 65,535, 65,535); tests lower
// them (torch.ops.retina_fast_simt._simt_set_max_grid) to reach the code past a limit cheaply.
int max_grid(int dim);
}  // namespace simt

namespace at {
namespace cuda {

struct CUDAStream {
  operator cudaStream_t() const { return nullptr; }
  cudaStream_t stream() const { return nullptr; }
};

inline CUDAStream getCurrentCUDAStream(c10::DeviceIndex = -1) { return {}; }

inline cudaDeviceProp* getCurrentDeviceProperties() {
  static thread_local cudaDeviceProp p = {"simt (H200-like)", 132, 1024, 32, 48 * 1024, 227 * 1024, 9, 0, {0, 0, 0}};
  for (int i = 0; i < 3; ++i) p.maxGridSize[i] = ::simt::max_grid(i);
  return &p;
}

}  // namespace cuda
}  // namespace at
