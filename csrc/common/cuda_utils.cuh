#pragma once
// Helpers shared by every CUDA file: launch geometry, block reductions, vector packs.
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>

#include <algorithm>
#include <cstdint>
#include <utility>

#ifndef RETINA_FAST_SIMT
#include <cassert>
#endif

// Spellings that let the same .cu files build for a GPU (nvcc) and for the CPU emulator of the
// CUDA execution model (csrc/simt, -DRETINA_FAST_SIMT): there, shared arrays are allocated
// per block (so AddressSanitizer guards each one), launches run on emulated threads and a
// failed device-side assertion is raised by the launch check.
//   RF_SHARED(T, name, [dims]);         __shared__ T name[dims];  (T without a top-level comma)
//   RF_EXTERN_SHARED(T, name);          extern __shared__ T name[];
//   RF_DEVICE_ASSERT(cond, "message");  a device-side assertion: the kernel traps on a GPU (the
//                                       error surfaces at the next synchronisation, as torch's
//                                       own index checks do), the launch check raises in simt
#ifdef RETINA_FAST_SIMT
#define RF_SHARED(T, name, ...) RF_SIMT_SHARED(T, name, __VA_ARGS__)
#define RF_EXTERN_SHARED(T, name) RF_SIMT_EXTERN_SHARED(T, name)
#define RF_DEVICE_ASSERT(cond, msg) RF_SIMT_DEVICE_ASSERT(cond, msg)
#else
#define RF_SHARED(T, name, ...) __shared__ T name __VA_ARGS__
#define RF_EXTERN_SHARED(T, name) extern __shared__ T name[]
#define RF_DEVICE_ASSERT(cond, msg)                                                         \
  do {                                                                                      \
    if (!(cond)) __assert_fail(msg " (" #cond ")", __FILE__, static_cast<unsigned>(__LINE__), \
                               __func__);                                                   \
  } while (0)
#endif

namespace retina_fast {
namespace cuda {

constexpr int kThreads = 256;

// kernel<<<grid, block, shmem, stream>>>(args...) as a call, so the emulator can run it.
#ifdef RETINA_FAST_SIMT
using ::simt::launch;
#else
template <typename... KArgs, typename... Args>
inline void launch(void (*kernel)(KArgs...), dim3 grid, dim3 block, size_t shmem, cudaStream_t stream,
                   Args&&... args) {
  kernel<<<grid, block, shmem, stream>>>(std::forward<Args>(args)...);
}
#endif

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
