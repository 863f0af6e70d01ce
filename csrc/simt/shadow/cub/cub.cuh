#pragma once
// simt shadow of CUB: the device-wide algorithms the project calls, as CUB documents them, run
// on the host (device memory is host memory here), and BlockScan as a block collective.
//
// Device-wide calls follow CUB's two-phase temp-storage protocol: with d_temp_storage == nullptr
// they only write the bytes needed; the real call fails (cudaErrorInvalidValue) when given fewer,
// and writes the whole temp block it asked for, so a short allocation is an ASan report.
// Radix sorts are stable in both directions and order keys as CUB does: unsigned keys as they
// are, signed integers by two's complement value, floats by value (-0 before +0), over the bits
// [begin_bit, end_bit) of that order-preserving form.
#include <algorithm>
#include <cstdint>
#include <cstring>
#include <numeric>
#include <type_traits>
#include <vector>

#include "simt/simt.h"

namespace cub {

namespace simt_detail {

template <typename K>
inline uint64_t ordered_bits(K k) {
  if constexpr (std::is_floating_point_v<K>) {
    using U = std::conditional_t<sizeof(K) == 8, uint64_t, uint32_t>;
    U u;
    std::memcpy(&u, &k, sizeof(K));
    const U sign = U(1) << (8 * sizeof(K) - 1);
    return (u & sign) ? U(~u) : U(u | sign);
  } else if constexpr (std::is_signed_v<K>) {
    using U = std::make_unsigned_t<K>;
    return static_cast<uint64_t>(static_cast<U>(static_cast<U>(k) ^ (U(1) << (8 * sizeof(K) - 1))));
  } else {
    return static_cast<uint64_t>(k);
  }
}

template <typename K>
inline uint64_t digits(K k, int begin_bit, int end_bit) {
  const uint64_t b = ordered_bits(k) >> begin_bit;
  const int w = end_bit - begin_bit;
  return w >= 64 ? b : (b & ((uint64_t(1) << w) - 1));
}

inline cudaError_t temp_protocol(void* d_temp, size_t& bytes, size_t need) {
  if (d_temp == nullptr) {
    bytes = need;
    return cudaSuccess;
  }
  if (bytes < need) return cudaErrorInvalidValue;
  std::memset(d_temp, 0xAB, need);
  return cudaSuccess;
}

// Stable sort of keys (and values) in [lo, hi) by their digits.
template <typename K, typename V>
void sort_range(const K* kin, K* kout, const V* vin, V* vout, int lo, int hi, int begin_bit, int end_bit,
                bool descending) {
  const int n = hi - lo;
  if (n <= 0) return;
  std::vector<int> idx(n);
  std::iota(idx.begin(), idx.end(), lo);
  std::vector<uint64_t> d(n);
  for (int i = 0; i < n; ++i) d[i] = digits(kin[lo + i], begin_bit, end_bit);
  std::stable_sort(idx.begin(), idx.end(), [&](int a, int b) {
    return descending ? d[a - lo] > d[b - lo] : d[a - lo] < d[b - lo];
  });
  std::vector<K> ks(n);
  for (int i = 0; i < n; ++i) ks[i] = kin[idx[i]];
  std::copy(ks.begin(), ks.end(), kout + lo);
  if (vin != nullptr) {
    std::vector<V> vs(n);
    for (int i = 0; i < n; ++i) vs[i] = vin[idx[i]];
    std::copy(vs.begin(), vs.end(), vout + lo);
  }
}

template <typename K>
inline bool bits_ok(int begin_bit, int end_bit) {
  return 0 <= begin_bit && begin_bit < end_bit && end_bit <= int(8 * sizeof(K));
}

template <typename K, typename V>
cudaError_t radix_sort(void* d_temp, size_t& bytes, const K* kin, K* kout, const V* vin, V* vout, int n,
                       int begin_bit, int end_bit, bool descending) {
  const size_t need = size_t(std::max(n, 0)) * (sizeof(K) + sizeof(V) + sizeof(int)) + 256;
  if (n < 0 || !bits_ok<K>(begin_bit, end_bit)) return cudaErrorInvalidValue;
  const cudaError_t e = temp_protocol(d_temp, bytes, need);
  if (e != cudaSuccess || d_temp == nullptr) return e;
  sort_range(kin, kout, vin, vout, 0, n, begin_bit, end_bit, descending);
  return cudaSuccess;
}

template <typename K, typename V, typename BeginIt, typename EndIt>
cudaError_t segmented_sort(void* d_temp, size_t& bytes, const K* kin, K* kout, const V* vin, V* vout, int n,
                           int segments, BeginIt begin, EndIt end, int begin_bit, int end_bit, bool descending) {
  const size_t need = size_t(std::max(n, 0)) * (sizeof(K) + sizeof(V) + sizeof(int)) +
                      size_t(std::max(segments, 0)) * 16 + 256;
  if (n < 0 || segments < 0 || !bits_ok<K>(begin_bit, end_bit)) return cudaErrorInvalidValue;
  const cudaError_t e = temp_protocol(d_temp, bytes, need);
  if (e != cudaSuccess || d_temp == nullptr) return e;
  for (int s = 0; s < segments; ++s) {
    const int lo = static_cast<int>(begin[s]), hi = static_cast<int>(end[s]);
    if (hi <= lo) continue;
    if (lo < 0 || hi > n) {
      ::simt::device_assert_fail("0 <= begin[s] && end[s] <= num_items", "cub segmented sort: a segment out of range",
                                 __FILE__, __LINE__);
      continue;
    }
    sort_range(kin, kout, vin, vout, lo, hi, begin_bit, end_bit, descending);
  }
  return cudaSuccess;
}

struct NullType {};

}  // namespace simt_detail

struct DeviceRadixSort {
  template <typename K, typename V>
  static cudaError_t SortPairs(void* t, size_t& b, const K* kin, K* kout, const V* vin, V* vout, int n,
                               int begin_bit = 0, int end_bit = sizeof(K) * 8, cudaStream_t = nullptr) {
    return simt_detail::radix_sort(t, b, kin, kout, vin, vout, n, begin_bit, end_bit, false);
  }
  template <typename K, typename V>
  static cudaError_t SortPairsDescending(void* t, size_t& b, const K* kin, K* kout, const V* vin, V* vout, int n,
                                         int begin_bit = 0, int end_bit = sizeof(K) * 8, cudaStream_t = nullptr) {
    return simt_detail::radix_sort(t, b, kin, kout, vin, vout, n, begin_bit, end_bit, true);
  }
  template <typename K>
  static cudaError_t SortKeys(void* t, size_t& b, const K* kin, K* kout, int n, int begin_bit = 0,
                              int end_bit = sizeof(K) * 8, cudaStream_t = nullptr) {
    return simt_detail::radix_sort<K, char>(t, b, kin, kout, nullptr, nullptr, n, begin_bit, end_bit, false);
  }
  template <typename K>
  static cudaError_t SortKeysDescending(void* t, size_t& b, const K* kin, K* kout, int n, int begin_bit = 0,
                                        int end_bit = sizeof(K) * 8, cudaStream_t = nullptr) {
    return simt_detail::radix_sort<K, char>(t, b, kin, kout, nullptr, nullptr, n, begin_bit, end_bit, true);
  }
};

struct DeviceSegmentedRadixSort {
  template <typename K, typename V, typename BeginIt, typename EndIt>
  static cudaError_t SortPairs(void* t, size_t& b, const K* kin, K* kout, const V* vin, V* vout, int n, int segs,
                               BeginIt begin, EndIt end, int begin_bit = 0, int end_bit = sizeof(K) * 8,
                               cudaStream_t = nullptr) {
    return simt_detail::segmented_sort(t, b, kin, kout, vin, vout, n, segs, begin, end, begin_bit, end_bit, false);
  }
  template <typename K, typename V, typename BeginIt, typename EndIt>
  static cudaError_t SortPairsDescending(void* t, size_t& b, const K* kin, K* kout, const V* vin, V* vout, int n,
                                         int segs, BeginIt begin, EndIt end, int begin_bit = 0,
                                         int end_bit = sizeof(K) * 8, cudaStream_t = nullptr) {
    return simt_detail::segmented_sort(t, b, kin, kout, vin, vout, n, segs, begin, end, begin_bit, end_bit, true);
  }
  template <typename K, typename BeginIt, typename EndIt>
  static cudaError_t SortKeys(void* t, size_t& b, const K* kin, K* kout, int n, int segs, BeginIt begin, EndIt end,
                              int begin_bit = 0, int end_bit = sizeof(K) * 8, cudaStream_t = nullptr) {
    return simt_detail::segmented_sort<K, char>(t, b, kin, kout, nullptr, nullptr, n, segs, begin, end, begin_bit,
                                                end_bit, false);
  }
  template <typename K, typename BeginIt, typename EndIt>
  static cudaError_t SortKeysDescending(void* t, size_t& b, const K* kin, K* kout, int n, int segs, BeginIt begin,
                                        EndIt end, int begin_bit = 0, int end_bit = sizeof(K) * 8,
                                        cudaStream_t = nullptr) {
    return simt_detail::segmented_sort<K, char>(t, b, kin, kout, nullptr, nullptr, n, segs, begin, end, begin_bit,
                                                end_bit, true);
  }
};

struct DeviceScan {
  template <typename In, typename Out>
  static cudaError_t InclusiveSum(void* t, size_t& b, In in, Out out, int n, cudaStream_t = nullptr) {
    return scan(t, b, in, out, n, true);
  }
  template <typename In, typename Out>
  static cudaError_t ExclusiveSum(void* t, size_t& b, In in, Out out, int n, cudaStream_t = nullptr) {
    return scan(t, b, in, out, n, false);
  }

 private:
  template <typename In, typename Out>
  static cudaError_t scan(void* t, size_t& b, In in, Out out, int n, bool inclusive) {
    using T = std::decay_t<decltype(in[0])>;
    if (n < 0) return cudaErrorInvalidValue;
    const cudaError_t e = simt_detail::temp_protocol(t, b, size_t(n) * sizeof(T) + 256);
    if (e != cudaSuccess || t == nullptr) return e;
    std::vector<T> v(n);
    T run = T(0);
    for (int i = 0; i < n; ++i) {
      const T x = in[i];
      if (inclusive) run = run + x;
      v[i] = run;
      if (!inclusive) run = run + x;
    }
    for (int i = 0; i < n; ++i) out[i] = v[i];
    return cudaSuccess;
  }
};

// A block-wide scan: every thread of the block calls it (a barrier inside). As with CUB, the
// caller must __syncthreads() before the TempStorage is used again.
template <typename T, int BLOCK_DIM_X, int ALGORITHM = 0, int BLOCK_DIM_Y = 1, int BLOCK_DIM_Z = 1>
class BlockScan {
  static constexpr int kThreads = BLOCK_DIM_X * BLOCK_DIM_Y * BLOCK_DIM_Z;

 public:
  struct TempStorage {
    T v[kThreads];
  };

  __device__ explicit BlockScan(TempStorage& s) : s_(s) {}

  __device__ void ExclusiveSum(T input, T& output) {
    T agg;
    ExclusiveSum(input, output, agg);
  }
  __device__ void ExclusiveSum(T input, T& output, T& block_aggregate) { scan(input, output, block_aggregate, false); }
  __device__ void InclusiveSum(T input, T& output) {
    T agg;
    scan(input, output, agg, true);
  }
  __device__ void InclusiveSum(T input, T& output, T& block_aggregate) { scan(input, output, block_aggregate, true); }

 private:
  __device__ void scan(T input, T& output, T& aggregate, bool inclusive) {
    const dim3 bd = blockDim;
    RF_SIMT_DEVICE_ASSERT(int(bd.x * bd.y * bd.z) == kThreads,
                          "cub::BlockScan: the block has another thread count than the template's");
    const int tid = int(threadIdx.x + bd.x * (threadIdx.y + bd.y * threadIdx.z));
    s_.v[tid] = input;
    __syncthreads();
    T run = T(0), all = T(0);
    for (int i = 0; i < kThreads; ++i) {
      if (i < tid || (inclusive && i == tid)) run = run + s_.v[i];
      all = all + s_.v[i];
    }
    output = run;
    aggregate = all;
  }
  TempStorage& s_;
};

}  // namespace cub
