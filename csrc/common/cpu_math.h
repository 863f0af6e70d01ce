#pragma once
// Math policies for CPU kernels.
//
// FastMath: branch-free float exp/log/log1p (Cephes-style range reduction + minimax
// polynomials, ~1-2 ulp) that GCC/Clang auto-vectorise when inlined into a loop. glibc's
// expf/log1pf are calls the compiler cannot vectorise without -ffast-math, and -ffast-math
// would break NaN propagation; these keep NaN in, NaN out.
// StdMath: the C library functions, for float64 (gradcheck) and anything else.
#include <cmath>
#include <cstdint>
#include <cstring>

#include "common/host_device.h"

namespace retina_fast {

namespace detail {
HOST_DEVICE_INLINE float bits_to_float(int32_t i) {
  float f;
  std::memcpy(&f, &i, sizeof f);
  return f;
}
HOST_DEVICE_INLINE int32_t float_to_bits(float f) {
  int32_t i;
  std::memcpy(&i, &f, sizeof i);
  return i;
}
}  // namespace detail

struct FastMath {
  static HOST_DEVICE_INLINE float exp(float x) {
    // exp(x) = 2^n exp(r), n = round(x / ln2), |r| <= ln2 / 2.
    // Domain: accurate for x <= 88 (every caller passes x <= 0); x > 88 gives +inf.
    const float xc = x > 88.0f ? 88.0f : (x < -87.3365478515625f ? -87.3365478515625f : x);
    // Round to nearest by the 1.5 * 2^23 trick (vectorises with SSE2; no nearbyint call).
    const float magic = 12582912.0f;
    const float n = (xc * 1.44269504088896341f + magic) - magic;
    float r = xc - n * 0.693359375f;
    r = r - n * -2.12194440e-4f;
    const float r2 = r * r;
    float y = 1.9875691500e-4f;
    y = y * r + 1.3981999507e-3f;
    y = y * r + 8.3334519073e-3f;
    y = y * r + 4.1665795894e-2f;
    y = y * r + 1.6666665459e-1f;
    y = y * r + 5.0000001201e-1f;
    y = y * r2 + r + 1.0f;
    const float scale = detail::bits_to_float((static_cast<int32_t>(n) + 127) << 23);
    float res = y * scale;
    res = x < -87.3365478515625f ? 0.0f : res;            // underflow (denormals: 0)
    res = x > 88.0f ? INFINITY : res;                     // see domain above
    return x != x ? x : res;                              // NaN in, NaN out
  }

  // Natural log for x > 0 normal; x == 0 -> -inf, x < 0 or NaN -> NaN.
  static HOST_DEVICE_INLINE float log(float x) {
    const int32_t bits = detail::float_to_bits(x);
    int32_t e = ((bits >> 23) & 0xff) - 126;
    float m = detail::bits_to_float((bits & 0x807fffff) | 0x3f000000);  // [0.5, 1)
    const bool small = m < 0.707106781186547524f;
    e = small ? e - 1 : e;
    m = small ? m + m - 1.0f : m - 1.0f;
    const float z = m * m;
    float y = 7.0376836292e-2f;
    y = y * m - 1.1514610310e-1f;
    y = y * m + 1.1676998740e-1f;
    y = y * m - 1.2420140846e-1f;
    y = y * m + 1.4249322787e-1f;
    y = y * m - 1.6668057665e-1f;
    y = y * m + 2.0000714765e-1f;
    y = y * m - 2.4999993993e-1f;
    y = y * m + 3.3333331174e-1f;
    y = y * m * z;
    const float fe = static_cast<float>(e);
    y = y + fe * -2.12194440e-4f;
    y = y - 0.5f * z;
    float res = m + y + fe * 0.693359375f;
    res = x == 0.0f ? -INFINITY : res;
    res = x == INFINITY ? INFINITY : res;
    return (x < 0.0f || x != x) ? NAN : res;
  }

  // log1p(e) for e >= 0, given inv = 1 / (1 + e) (the sigmoid already computed it):
  // log(u) + (e - (u - 1)) / u with u = fl(1 + e) corrects u's rounding error to first order,
  // so tiny e gives e, not 0. No division of its own.
  static HOST_DEVICE_INLINE float log1p_given_inv(float e, float inv) {
    const float u = 1.0f + e;
    return log(u) + (e - (u - 1.0f)) * inv;
  }
};

struct StdMath {
  template <typename T>
  static HOST_DEVICE_INLINE T exp(T x) {
    return std::exp(x);
  }
  template <typename T>
  static HOST_DEVICE_INLINE T log(T x) {
    return std::log(x);
  }
  template <typename T>
  static HOST_DEVICE_INLINE T log1p_given_inv(T e, T /*inv*/) {
    return std::log1p(e);
  }
};

}  // namespace retina_fast
