#pragma once
// simt: the CUDA execution model on the CPU, so the project's .cu files run as written.
//
// Each CUDA thread of a block is a fiber (its own stack, switched in user space on one OS
// thread); the blocks of a grid run one after another. A fiber runs until it reaches a
// synchronisation point (__syncthreads and its _or/_and/_count forms, or a warp collective:
// the shuffles, votes and __syncwarp), then the next ready fiber runs. A barrier releases when
// every live thread of the block waits at it (at the same call site: a divergent barrier is an
// error); a warp collective when every lane its mask names waits at one (a named lane that has
// exited is an error). Nothing else orders threads, so the order in which ready fibers run
// within a barrier interval is a free choice: forward, reversed or shuffled (set_schedule). A
// kernel whose result depends on that order has a race; the race check runs each op under all
// three and compares the outputs bit for bit (simt_device.cpp).
//
// Shared memory is allocated per block, one heap block per array (RF_SHARED, and the dynamic
// array of RF_EXTERN_SHARED sized at launch), filled with 0xFF bytes (NaN floats, -1 integers:
// a read before any write shows), so AddressSanitizer sees a read one element past any of them.
//
// This header is the device side: it replaces the CUDA built-ins (threadIdx, blockIdx, ...),
// intrinsics, atomics and launches for host compilation. The host runtime behind it is
// simt_runtime.cpp; the CUDA/ATen/CUB headers the .cu files include are shadowed in shadow/.
// Only the emulator build includes it (-DRETINA_FAST_SIMT, build_tools/simt.py).
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <source_location>
#include <tuple>
#include <type_traits>
#include <utility>

// ------------------------------------------------------------------ built-in types

struct uint3 {
  unsigned int x, y, z;
};

struct dim3 {
  unsigned int x, y, z;
  constexpr dim3(unsigned int vx = 1, unsigned int vy = 1, unsigned int vz = 1) : x(vx), y(vy), z(vz) {}
};

typedef struct simt_stream_st* cudaStream_t;

enum cudaError_t : int {
  cudaSuccess = 0,
  cudaErrorInvalidValue = 1,
  cudaErrorLaunchFailure = 719,
  cudaErrorInvalidConfiguration = 9,
  cudaErrorAssert = 710,
};

namespace simt {

// ------------------------------------------------------------------ the runtime's interface

struct ThreadCtx;  // one emulated thread (simt_runtime.cpp)

// The built-in variables of the emulated thread running now on this OS thread (the scheduler
// sets them before it switches to a fiber). Initial-exec TLS: one load, no call.
struct Now {
  uint3 tid;
  uint3 bidx;
  dim3 bdim;
  dim3 gdim;
  ThreadCtx* cur;  // nullptr outside a kernel
};
extern thread_local Now tl_now __attribute__((tls_model("initial-exec")));

inline ThreadCtx* current() { return tl_now.cur; }

// Barriers. `site` identifies the call site (every thread of the block must wait at the same).
int syncthreads(int pred, int mode, const char* file, int line);  // mode 0 plain, 1 or, 2 and, 3 count
// Warp collectives: op codes below; value bytes up to 8.
enum WarpOp : int { kShflIdx, kShflUp, kShflDown, kShflXor, kVoteAll, kVoteAny, kVoteBallot, kSyncWarp };
uint64_t warp_op(WarpOp op, unsigned mask, uint64_t value, int arg, int width, const char* file, int line);

// Shared memory of the current block: the array declared at `tag` (allocated on first use in
// the block), and the dynamic array sized at launch.
void* shared_alloc(const void* tag, size_t bytes, size_t align);
void* dynamic_shared();

// A failed device-side assertion: recorded (the launch check raises it), the thread goes on.
void device_assert_fail(const char* cond, const char* msg, const char* file, int line);

// Launch: runs `body(ctx)` once per emulated thread of every block.
struct LaunchDim {
  dim3 d;
  long long raw[3];
  std::source_location loc;
  template <typename I, std::enable_if_t<std::is_integral_v<I>, int> = 0>
  LaunchDim(I v, std::source_location l = std::source_location::current())
      : d(static_cast<unsigned int>(v)), raw{static_cast<long long>(v), 1, 1}, loc(l) {}
  LaunchDim(dim3 v, std::source_location l = std::source_location::current())
      : d(v), raw{v.x, v.y, v.z}, loc(l) {}
};
void run_grid(const LaunchDim& grid, const LaunchDim& block, size_t shmem, void (*body)(void*), void* ctx);

// The first error of the launches since the last check (cudaSuccess if none), and its text;
// take_error clears it.
cudaError_t peek_error();
cudaError_t take_error(const char** text);

template <typename... KArgs, typename... Args>
void launch(void (*kernel)(KArgs...), const LaunchDim& grid, const LaunchDim& block, size_t shmem,
            cudaStream_t /*stream: every launch is synchronous here*/, Args&&... args) {
  // The arguments are converted to the kernel's parameter types once, as a launch copies them
  // to the device; every thread then gets its own copy.
  struct Ctx {
    void (*k)(KArgs...);
    std::tuple<std::decay_t<KArgs>...> a;
  } ctx{kernel, std::tuple<std::decay_t<KArgs>...>(static_cast<std::decay_t<KArgs>>(std::forward<Args>(args))...)};
  run_grid(grid, block, shmem, [](void* p) {
    Ctx* c = static_cast<Ctx*>(p);
    std::apply(c->k, c->a);
  }, &ctx);
}

template <typename T>
inline uint64_t to_bits(T v) {
  static_assert(sizeof(T) <= 8 && std::is_trivially_copyable_v<T>, "warp collectives move at most 8 bytes");
  uint64_t b = 0;
  std::memcpy(&b, &v, sizeof(T));
  return b;
}
template <typename T>
inline T from_bits(uint64_t b) {
  T v;
  std::memcpy(&v, &b, sizeof(T));
  return v;
}

}  // namespace simt

// ------------------------------------------------------------------ built-in variables

#define threadIdx (static_cast<const uint3&>(::simt::tl_now.tid))
#define blockIdx (static_cast<const uint3&>(::simt::tl_now.bidx))
#define blockDim (static_cast<const dim3&>(::simt::tl_now.bdim))
#define gridDim (static_cast<const dim3&>(::simt::tl_now.gdim))
constexpr int warpSize = 32;

// ------------------------------------------------------------------ qualifiers

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline __attribute__((always_inline))
#define __launch_bounds__(...)
#define __noinline__ __attribute__((noinline))

// ------------------------------------------------------------------ barriers and warp collectives

#define __syncthreads() ((void)::simt::syncthreads(1, 0, __FILE__, __LINE__))
#define __syncthreads_or(p) ::simt::syncthreads((p) ? 1 : 0, 1, __FILE__, __LINE__)
#define __syncthreads_and(p) ::simt::syncthreads((p) ? 1 : 0, 2, __FILE__, __LINE__)
#define __syncthreads_count(p) ::simt::syncthreads((p) ? 1 : 0, 3, __FILE__, __LINE__)
#define __syncwarp(...) ((void)::simt::warp_op(::simt::kSyncWarp, ::simt::detail_mask(__VA_ARGS__), 0, 0, 32, __FILE__, __LINE__))

namespace simt {
inline unsigned detail_mask() { return 0xffffffffu; }
inline unsigned detail_mask(unsigned m) { return m; }
}  // namespace simt

#define __shfl_sync(mask, v, src, ...) ::simt::shfl(::simt::kShflIdx, mask, v, src, __FILE__, __LINE__ __VA_OPT__(,) __VA_ARGS__)
#define __shfl_up_sync(mask, v, d, ...) ::simt::shfl(::simt::kShflUp, mask, v, d, __FILE__, __LINE__ __VA_OPT__(,) __VA_ARGS__)
#define __shfl_down_sync(mask, v, d, ...) ::simt::shfl(::simt::kShflDown, mask, v, d, __FILE__, __LINE__ __VA_OPT__(,) __VA_ARGS__)
#define __shfl_xor_sync(mask, v, m, ...) ::simt::shfl(::simt::kShflXor, mask, v, m, __FILE__, __LINE__ __VA_OPT__(,) __VA_ARGS__)
#define __all_sync(mask, p) (::simt::warp_op(::simt::kVoteAll, mask, (p) ? 1 : 0, 0, 32, __FILE__, __LINE__) != 0)
#define __any_sync(mask, p) (::simt::warp_op(::simt::kVoteAny, mask, (p) ? 1 : 0, 0, 32, __FILE__, __LINE__) != 0)
#define __ballot_sync(mask, p) \
  static_cast<unsigned>(::simt::warp_op(::simt::kVoteBallot, mask, (p) ? 1 : 0, 0, 32, __FILE__, __LINE__))

namespace simt {
template <typename T>
inline T shfl(WarpOp op, unsigned mask, T v, int arg, const char* file, int line, int width = 32) {
  return from_bits<T>(warp_op(op, mask, to_bits(v), arg, width, file, line));
}
}  // namespace simt

// ------------------------------------------------------------------ atomics
// Blocks and threads of a launch run on one OS thread and a fiber is never switched inside an
// atomic, so each is a plain read-modify-write; the __atomic builtins keep them atomic for a
// sanitizer that watches memory.

template <typename T>
inline T atomicAdd(T* p, T v) {
  if constexpr (std::is_integral_v<T>) {
    return __atomic_fetch_add(p, v, __ATOMIC_RELAXED);
  } else {
    const T old = *p;
    *p = old + v;
    return old;
  }
}
template <typename T>
inline T atomicSub(T* p, T v) {
  return __atomic_fetch_sub(p, v, __ATOMIC_RELAXED);
}
template <typename T>
inline T atomicMax(T* p, T v) {
  static_assert(std::is_integral_v<T>, "atomicMax: integer types");
  T old = __atomic_load_n(p, __ATOMIC_RELAXED);
  while (old < v && !__atomic_compare_exchange_n(p, &old, v, false, __ATOMIC_RELAXED, __ATOMIC_RELAXED)) {
  }
  return old;
}
template <typename T>
inline T atomicMin(T* p, T v) {
  static_assert(std::is_integral_v<T>, "atomicMin: integer types");
  T old = __atomic_load_n(p, __ATOMIC_RELAXED);
  while (old > v && !__atomic_compare_exchange_n(p, &old, v, false, __ATOMIC_RELAXED, __ATOMIC_RELAXED)) {
  }
  return old;
}
template <typename T>
inline T atomicOr(T* p, T v) {
  return __atomic_fetch_or(p, v, __ATOMIC_RELAXED);
}
template <typename T>
inline T atomicAnd(T* p, T v) {
  return __atomic_fetch_and(p, v, __ATOMIC_RELAXED);
}
template <typename T>
inline T atomicExch(T* p, T v) {
  return __atomic_exchange_n(p, v, __ATOMIC_RELAXED);
}
template <typename T>
inline T atomicCAS(T* p, T expected, T desired) {
  __atomic_compare_exchange_n(p, &expected, desired, false, __ATOMIC_RELAXED, __ATOMIC_RELAXED);
  return expected;
}

inline void __threadfence() { __atomic_thread_fence(__ATOMIC_SEQ_CST); }
inline void __threadfence_block() { __atomic_thread_fence(__ATOMIC_SEQ_CST); }

// ------------------------------------------------------------------ intrinsics
// Rounded arithmetic: the host rounds every operation (built with -ffp-contract=off).

inline float __fmul_rn(float a, float b) { return a * b; }
inline float __fadd_rn(float a, float b) { return a + b; }
inline float __fsub_rn(float a, float b) { return a - b; }
inline float __fdiv_rn(float a, float b) { return a / b; }
inline double __dmul_rn(double a, double b) { return a * b; }
inline double __dadd_rn(double a, double b) { return a + b; }
inline double __dsub_rn(double a, double b) { return a - b; }
inline double __ddiv_rn(double a, double b) { return a / b; }

inline unsigned int __float_as_uint(float f) { return simt::from_bits<unsigned int>(simt::to_bits(f)); }
inline int __float_as_int(float f) { return simt::from_bits<int>(simt::to_bits(f)); }
inline float __uint_as_float(unsigned int u) { return simt::from_bits<float>(simt::to_bits(u)); }
inline float __int_as_float(int u) { return simt::from_bits<float>(simt::to_bits(u)); }
inline long long __double_as_longlong(double d) { return simt::from_bits<long long>(simt::to_bits(d)); }
inline double __longlong_as_double(long long v) { return simt::from_bits<double>(simt::to_bits(v)); }

inline int __popc(unsigned int x) { return __builtin_popcount(x); }
inline int __popcll(unsigned long long x) { return __builtin_popcountll(x); }
inline int __clz(int x) { return x == 0 ? 32 : __builtin_clz(static_cast<unsigned>(x)); }
inline int __clzll(long long x) { return x == 0 ? 64 : __builtin_clzll(static_cast<unsigned long long>(x)); }
inline int __ffs(int x) { return __builtin_ffs(x); }
inline int __ffsll(long long x) { return __builtin_ffsll(x); }
inline unsigned int __brev(unsigned int x) {
  x = ((x >> 1) & 0x55555555u) | ((x & 0x55555555u) << 1);
  x = ((x >> 2) & 0x33333333u) | ((x & 0x33333333u) << 2);
  x = ((x >> 4) & 0x0F0F0F0Fu) | ((x & 0x0F0F0F0Fu) << 4);
  x = ((x >> 8) & 0x00FF00FFu) | ((x & 0x00FF00FFu) << 8);
  return (x >> 16) | (x << 16);
}
template <typename T>
inline T __ldg(const T* p) {
  return *p;
}

// CUDA's device min/max overloads, which kernels call unqualified.
inline int min(int a, int b) { return a < b ? a : b; }
inline unsigned int min(unsigned int a, unsigned int b) { return a < b ? a : b; }
inline long min(long a, long b) { return a < b ? a : b; }
inline unsigned long min(unsigned long a, unsigned long b) { return a < b ? a : b; }
inline long long min(long long a, long long b) { return a < b ? a : b; }
inline unsigned long long min(unsigned long long a, unsigned long long b) { return a < b ? a : b; }
inline float min(float a, float b) { return __builtin_fminf(a, b); }
inline double min(double a, double b) { return __builtin_fmin(a, b); }
inline int max(int a, int b) { return a > b ? a : b; }
inline unsigned int max(unsigned int a, unsigned int b) { return a > b ? a : b; }
inline long max(long a, long b) { return a > b ? a : b; }
inline unsigned long max(unsigned long a, unsigned long b) { return a > b ? a : b; }
inline long long max(long long a, long long b) { return a > b ? a : b; }
inline unsigned long long max(unsigned long long a, unsigned long long b) { return a > b ? a : b; }
inline float max(float a, float b) { return __builtin_fmaxf(a, b); }
inline double max(double a, double b) { return __builtin_fmax(a, b); }

// ------------------------------------------------------------------ shared memory

#define RF_SIMT_CAT2(a, b) a##b
#define RF_SIMT_CAT(a, b) RF_SIMT_CAT2(a, b)
// RF_SHARED(T, name, [dims]): `__shared__ T name[dims];` as one heap block per block.
#define RF_SIMT_SHARED(T, name, ...)                                                          \
  using RF_SIMT_CAT(rf_shared_type_, name) = T __VA_ARGS__;                                   \
  static const char RF_SIMT_CAT(rf_shared_tag_, name) = 0;                                    \
  RF_SIMT_CAT(rf_shared_type_, name)& name = *static_cast<RF_SIMT_CAT(rf_shared_type_, name)*>( \
      ::simt::shared_alloc(&RF_SIMT_CAT(rf_shared_tag_, name), sizeof(RF_SIMT_CAT(rf_shared_type_, name)), \
                           alignof(RF_SIMT_CAT(rf_shared_type_, name))))
#define RF_SIMT_EXTERN_SHARED(T, name) T* name = static_cast<T*>(::simt::dynamic_shared())

#define RF_SIMT_DEVICE_ASSERT(cond, msg)                                       \
  do {                                                                         \
    if (!(cond)) ::simt::device_assert_fail(#cond, msg, __FILE__, __LINE__);    \
  } while (0)
inline void __trap() { simt::device_assert_fail("__trap()", "trap", "", 0); }
