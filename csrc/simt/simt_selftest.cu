// Kernels that test the emulator itself (tests/simt/test_emulator.py): each CUDA construct the
// project's kernels use, with its documented result, and each fault the emulator must report.
// Compiled only into the simt build (csrc/simt is not part of the extension's sources); written
// as CUDA, with the spellings of common/cuda_utils.cuh.
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <cub/cub.cuh>
#include <torch/library.h>

#include "common/cuda_utils.cuh"

namespace retina_fast {
namespace simt_selftest {
namespace {

// out[t] = the shuffle `op` of in[t] (0 idx, 1 up, 2 down, 3 xor), arg and width as CUDA's.
__global__ void shfl_kernel(const int* in, int n, int op, int arg, int width, int* out) {
  const int t = threadIdx.x;
  const int v = t < n ? in[t] : 0;
  int r = 0;
  switch (op) {
    case 0: r = __shfl_sync(0xffffffffu, v, arg, width); break;
    case 1: r = __shfl_up_sync(0xffffffffu, v, unsigned(arg), width); break;
    case 2: r = __shfl_down_sync(0xffffffffu, v, unsigned(arg), width); break;
    default: r = __shfl_xor_sync(0xffffffffu, v, arg, width); break;
  }
  if (t < n) out[t] = r;
}

// out[t] = (all, any, ballot) of pred over t's warp, and the block's (or, and, count).
__global__ void vote_kernel(const int* pred, int* out) {
  const int t = threadIdx.x;
  const int p = pred[t];
  out[6 * t + 0] = __all_sync(0xffffffffu, p);
  out[6 * t + 1] = __any_sync(0xffffffffu, p);
  out[6 * t + 2] = int(__ballot_sync(0xffffffffu, p));
  out[6 * t + 3] = __syncthreads_or(p);
  out[6 * t + 4] = __syncthreads_and(p);
  out[6 * t + 5] = __syncthreads_count(p);
}

constexpr int kScanThreads = 128;

__global__ void block_scan_kernel(const int64_t* in, int64_t* out, int64_t* total) {
  using BlockScan = cub::BlockScan<int64_t, kScanThreads>;
  RF_SHARED(typename BlockScan::TempStorage, tmp, );
  int64_t o = 0, agg = 0;
  BlockScan(tmp).ExclusiveSum(in[blockIdx.x * kScanThreads + threadIdx.x], o, agg);
  out[blockIdx.x * kScanThreads + threadIdx.x] = o;
  if (threadIdx.x == 0) total[blockIdx.x] = agg;
}

// Shared memory is per block: each block writes its index, then reads it back after a barrier.
__global__ void shared_per_block_kernel(int* out) {
  RF_SHARED(int, s, [64]);
  s[threadIdx.x] = int(blockIdx.x);
  __syncthreads();
  out[blockIdx.x * 64 + threadIdx.x] = s[63 - threadIdx.x] + int(gridDim.x * 1000);
}

// The faults the emulator reports (kind): 0 divergent __syncthreads, 1 deadlock, 2 a shuffle
// naming a lane that has exited, 3 a failed device-side assertion, 4 a race (two threads of a
// block, no barrier between a write and a read of one shared address; the race check finds it),
// 5 the same with the barrier (no race), 6 a read one element past a shared array (ASan).
__global__ void fault_kernel(int kind, int* out) {
  RF_SHARED(int, s, [32]);
  const int t = threadIdx.x;
  if (kind == 0) {
    if (t < 16) __syncthreads();
    else __syncthreads();
  } else if (kind == 1) {
    if (t == 0) {
      out[0] = __shfl_sync(0xffffffffu, t, 1);
    } else {
      __syncthreads();
    }
  } else if (kind == 2) {
    if (t == 5) return;
    out[t] = __shfl_sync(0xffffffffu, t, 0);
  } else if (kind == 3) {
    RF_DEVICE_ASSERT(t != 7, "selftest: thread 7 fails");
  } else if (kind == 4 || kind == 5) {
    s[t] = t * 3 + 1;
    if (kind == 5) __syncthreads();
    out[t] = s[(t + 1) % 32];
  } else if (kind == 6) {
    s[t] = t;
    __syncthreads();
    const int* p = s;  // through a pointer: ASan's check, not UBSan's array-bounds one
    out[t] = p[t + 1];  // t = 31 reads s[32]
  }
}

at::Tensor shfl(const at::Tensor& in, int64_t op, int64_t arg, int64_t width, int64_t threads) {
  at::Tensor x = in.to(at::kInt).contiguous();
  at::Tensor out = at::zeros_like(x);
  cuda::launch(shfl_kernel, 1, threads, 0, at::cuda::getCurrentCUDAStream(), x.const_data_ptr<int>(),
               int(x.numel()), int(op), int(arg), int(width), out.mutable_data_ptr<int>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

at::Tensor vote(const at::Tensor& pred) {
  at::Tensor p = pred.to(at::kInt).contiguous();
  at::Tensor out = at::zeros({p.numel(), 6}, p.options());
  cuda::launch(vote_kernel, 1, p.numel(), 0, at::cuda::getCurrentCUDAStream(), p.const_data_ptr<int>(),
               out.mutable_data_ptr<int>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

std::tuple<at::Tensor, at::Tensor> block_scan(const at::Tensor& in) {
  at::Tensor x = in.to(at::kLong).contiguous();
  TORCH_CHECK(x.numel() % kScanThreads == 0, "selftest: a multiple of ", kScanThreads, " values");
  const int64_t blocks = x.numel() / kScanThreads;
  at::Tensor out = at::empty_like(x), total = at::empty({blocks}, x.options());
  cuda::launch(block_scan_kernel, blocks, kScanThreads, 0, at::cuda::getCurrentCUDAStream(),
               x.const_data_ptr<int64_t>(), out.mutable_data_ptr<int64_t>(), total.mutable_data_ptr<int64_t>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {out, total};
}

at::Tensor shared_per_block(int64_t blocks) {
  at::Tensor out = at::empty({blocks * 64}, at::TensorOptions().dtype(at::kInt));
  cuda::launch(shared_per_block_kernel, blocks, 64, 0, at::cuda::getCurrentCUDAStream(), out.mutable_data_ptr<int>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

// Through the race check, as every op of the library.
at::Tensor fault(int64_t kind) {
  return ::simt::run_checked<at::Tensor>("_selftest_fault", [&] {
    at::Tensor out = at::zeros({32}, at::TensorOptions().dtype(at::kInt));
    cuda::launch(fault_kernel, 1, 32, 0, at::cuda::getCurrentCUDAStream(), int(kind), out.mutable_data_ptr<int>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    return out;
  });
}

// A launch with the given geometry and dynamic shared memory (launch-configuration checks).
__global__ void empty_kernel() {}
void launch_config(int64_t grid, int64_t block, int64_t shmem) {
  cuda::launch(empty_kernel, grid, block, size_t(shmem), at::cuda::getCurrentCUDAStream());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// CUB: radix sort of (keys, values = iota), optionally segmented by offsets [S + 1], over bits
// [begin_bit, end_bit); returns (keys, values). Keys int64, int32 (as uint32 when unsigned_keys),
// float32 or float64.
template <typename K>
std::tuple<at::Tensor, at::Tensor> sort_typed(const at::Tensor& keys, const c10::optional<at::Tensor>& offsets,
                                              int64_t begin_bit, int64_t end_bit, bool descending) {
  const int n = int(keys.numel());
  at::Tensor kin = keys.contiguous(), kout = at::full_like(kin, 0);
  at::Tensor vin = at::arange(n, keys.options().dtype(at::kInt)), vout = at::full_like(vin, -1);
  const K* kp = reinterpret_cast<const K*>(kin.const_data_ptr());
  K* kop = reinterpret_cast<K*>(kout.mutable_data_ptr());
  size_t bytes = 0;
  auto run = [&](void* tmp) -> cudaError_t {
    if (offsets.has_value()) {
      const int* off = offsets->const_data_ptr<int>();
      const int segs = int(offsets->numel()) - 1;
      return descending ? cub::DeviceSegmentedRadixSort::SortPairsDescending(
                              tmp, bytes, kp, kop, vin.const_data_ptr<int>(), vout.mutable_data_ptr<int>(), n, segs,
                              off, off + 1, int(begin_bit), int(end_bit))
                        : cub::DeviceSegmentedRadixSort::SortPairs(tmp, bytes, kp, kop, vin.const_data_ptr<int>(),
                                                                   vout.mutable_data_ptr<int>(), n, segs, off, off + 1,
                                                                   int(begin_bit), int(end_bit));
    }
    return descending ? cub::DeviceRadixSort::SortPairsDescending(tmp, bytes, kp, kop, vin.const_data_ptr<int>(),
                                                                  vout.mutable_data_ptr<int>(), n, int(begin_bit),
                                                                  int(end_bit))
                      : cub::DeviceRadixSort::SortPairs(tmp, bytes, kp, kop, vin.const_data_ptr<int>(),
                                                        vout.mutable_data_ptr<int>(), n, int(begin_bit),
                                                        int(end_bit));
  };
  C10_CUDA_CHECK(run(nullptr));
  TORCH_CHECK(bytes > 0, "selftest: the size query asked for no temp storage");
  at::Tensor tmp = at::empty({int64_t(bytes)}, keys.options().dtype(at::kByte));
  size_t short_bytes = bytes - 1;
  std::swap(bytes, short_bytes);
  TORCH_CHECK(run(tmp.data_ptr()) == cudaErrorInvalidValue, "selftest: a short temp storage was accepted");
  std::swap(bytes, short_bytes);
  C10_CUDA_CHECK(run(tmp.data_ptr()));
  return {kout, vout};
}

std::tuple<at::Tensor, at::Tensor> radix_sort(const at::Tensor& keys, const c10::optional<at::Tensor>& offsets,
                                              int64_t begin_bit, int64_t end_bit, bool descending, bool unsigned_keys) {
  switch (keys.scalar_type()) {
    case at::kLong: return sort_typed<int64_t>(keys, offsets, begin_bit, end_bit, descending);
    case at::kInt:
      return unsigned_keys ? sort_typed<uint32_t>(keys, offsets, begin_bit, end_bit, descending)
                           : sort_typed<int32_t>(keys, offsets, begin_bit, end_bit, descending);
    case at::kFloat: return sort_typed<float>(keys, offsets, begin_bit, end_bit, descending);
    case at::kDouble: return sort_typed<double>(keys, offsets, begin_bit, end_bit, descending);
    default: TORCH_CHECK(false, "selftest: keys int64, int32, float32 or float64");
  }
}

at::Tensor device_scan(const at::Tensor& in, bool inclusive) {
  at::Tensor x = in.to(at::kLong).contiguous(), out = at::full_like(x, -7);
  size_t bytes = 0;
  auto run = [&](void* tmp) {
    return inclusive ? cub::DeviceScan::InclusiveSum(tmp, bytes, x.const_data_ptr<int64_t>(),
                                                     out.mutable_data_ptr<int64_t>(), int(x.numel()))
                     : cub::DeviceScan::ExclusiveSum(tmp, bytes, x.const_data_ptr<int64_t>(),
                                                     out.mutable_data_ptr<int64_t>(), int(x.numel()));
  };
  C10_CUDA_CHECK(run(nullptr));
  at::Tensor tmp = at::empty({int64_t(bytes)}, x.options().dtype(at::kByte));
  C10_CUDA_CHECK(run(tmp.data_ptr()));
  return out;
}

}  // namespace
}  // namespace simt_selftest
}  // namespace retina_fast

TORCH_LIBRARY_FRAGMENT(retina_fast_simt, m) {
  using namespace retina_fast::simt_selftest;
  m.def("_selftest_shfl(Tensor x, int op, int arg, int width, int threads) -> Tensor", &shfl);
  m.def("_selftest_vote(Tensor pred) -> Tensor", &vote);
  m.def("_selftest_block_scan(Tensor x) -> (Tensor, Tensor)", &block_scan);
  m.def("_selftest_shared_per_block(int blocks) -> Tensor", &shared_per_block);
  m.def("_selftest_fault(int kind) -> Tensor", &fault);
  m.def("_selftest_launch(int grid, int block, int shmem) -> ()", &launch_config);
  m.def("_selftest_radix_sort(Tensor keys, Tensor? offsets, int begin_bit, int end_bit, bool descending, "
        "bool unsigned_keys=False) -> (Tensor, Tensor)",
        &radix_sort);
  m.def("_selftest_device_scan(Tensor x, bool inclusive) -> Tensor", &device_scan);
}
