#pragma once
// One spelling for functions that both the CPU (.cpp) and CUDA (.cu) files compile: the
// math lives once, in headers that include this one.
#if defined(__CUDACC__) || defined(__HIPCC__)
#define HOST_DEVICE __host__ __device__
#define HOST_DEVICE_INLINE __host__ __device__ __forceinline__
#else
#define HOST_DEVICE
// Forced: the CPU kernels rely on the per-element math inlining into their loops so the
// compiler can vectorise them (a call left in the loop body blocks that).
#if defined(__GNUC__) || defined(__clang__)
#define HOST_DEVICE_INLINE inline __attribute__((always_inline))
#else
#define HOST_DEVICE_INLINE inline
#endif
#endif

namespace retina_fast {

// Rounded (never contracted into an FMA) float arithmetic. Parity with torchvision is
// bitwise for IoU and the box coder, and the tie test `iou == max_iou` is rounding
// sensitive, so the CUDA side must round every product and sum as the CPU does.
template <typename T>
HOST_DEVICE_INLINE T mul_rn(T a, T b) {
  return a * b;
}
template <typename T>
HOST_DEVICE_INLINE T add_rn(T a, T b) {
  return a + b;
}
template <typename T>
HOST_DEVICE_INLINE T sub_rn(T a, T b) {
  return a - b;
}
#if defined(__CUDA_ARCH__)
template <>
__device__ __forceinline__ float mul_rn<float>(float a, float b) {
  return __fmul_rn(a, b);
}
template <>
__device__ __forceinline__ float add_rn<float>(float a, float b) {
  return __fadd_rn(a, b);
}
template <>
__device__ __forceinline__ float sub_rn<float>(float a, float b) {
  return __fsub_rn(a, b);
}
template <>
__device__ __forceinline__ double mul_rn<double>(double a, double b) {
  return __dmul_rn(a, b);
}
template <>
__device__ __forceinline__ double add_rn<double>(double a, double b) {
  return __dadd_rn(a, b);
}
template <>
__device__ __forceinline__ double sub_rn<double>(double a, double b) {
  return __dsub_rn(a, b);
}
#endif

template <typename T>
HOST_DEVICE_INLINE T min_(T a, T b) {
  return a < b ? a : b;
}
template <typename T>
HOST_DEVICE_INLINE T max_(T a, T b) {
  return a > b ? a : b;
}

}  // namespace retina_fast
