#pragma once
// Helpers shared by every CUDA file: launch geometry, block reductions, vector packs.
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>

#include <algorithm>
#include <cstdint>

namespace retina_fast {
namespace cuda {

constexpr int kThreads = 256;

// Enough blocks to fill the device a few times over; grid-stride loops do the rest.
inline int64_t grid_for(int64_t work_items, int threads = kThreads) {
  const int sms = at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
  const int64_t needed = (work_items + threads - 1) / threads;
  return std::max<int64_t>(1, std::min<int64_t>(needed, int64_t(sms) * 8));
}

template <typename T, int N>
struct alignas(sizeof(T) * N) Pack {
  T v[N];
};

template <int N, typename T>
inline bool is_aligned(const T* p) {
  return reinterpret_cast<uintptr_t>(p) % (sizeof(T) * N) == 0;
}

// Sum over a block; every thread gets the result in thread 0 only. Fixed order: deterministic.
template <typename acc_t>
__device__ __forceinline__ acc_t block_reduce_sum(acc_t v, acc_t* shared /* [32] */) {
  const int lane = threadIdx.x % 32;
  const int warp = threadIdx.x / 32;
  for (int o = 16; o > 0; o >>= 1) v += __shfl_down_sync(0xffffffffu, v, o);
  if (lane == 0) shared[warp] = v;
  __syncthreads();
  const int nwarps = (blockDim.x + 31) / 32;
  v = (threadIdx.x < nwarps) ? shared[lane] : acc_t(0);
  if (warp == 0) {
    for (int o = 16; o > 0; o >>= 1) v += __shfl_down_sync(0xffffffffu, v, o);
  }
  return v;
}

}  // namespace cuda
}  // namespace retina_fast
