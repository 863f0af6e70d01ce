#pragma once
// Matching and anchor math shared by boxes_cpu.cpp and boxes_cuda.cu (HOST_DEVICE).
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cstdint>
#include <type_traits>

#include "common/box_math.h"
#include "common/host_device.h"

namespace retina_fast {
namespace boxes {

// float32 for float/half/bfloat16, double for double: the dtype box_iou returns.
template <typename scalar_t>
using acc_type = std::conditional_t<std::is_same<scalar_t, double>::value, double, float>;

// `rb - lt` rounded to the boxes' dtype (see IdentityRound in common/box_math.h).
template <typename scalar_t>
struct RoundTo {
  template <typename T>
  HOST_DEVICE_INLINE T operator()(T x) const {
    return static_cast<T>(static_cast<scalar_t>(x));
  }
};
template <typename scalar_t>
using round_for = std::conditional_t<std::is_same<scalar_t, c10::Half>::value ||
                                         std::is_same<scalar_t, c10::BFloat16>::value,
                                     RoundTo<scalar_t>, IdentityRound>;

// A box is "regular" when its coordinates are finite and moderate and its area is positive:
// for a regular gt and a regular anchor that do not overlap, min(x2)-max(x1) <= 0 (or the y
// analogue), so inter = 0 and union = area_g + area_a > 0 and the IoU is exactly +0, the value
// the matcher assumes for pairs it skips. Anything else (NaN, inf, zero or negative area,
// where 0/0 = NaN or 0/negative = -0 can appear) is always computed.
template <typename acc_t>
HOST_DEVICE_INLINE bool regular_box(acc_t x1, acc_t y1, acc_t x2, acc_t y2, acc_t area) {
  const acc_t lim = acc_t(1e18);
  return x1 > -lim && x1 < lim && y1 > -lim && y1 < lim && x2 > -lim && x2 < lim &&
         y2 > -lim && y2 < lim && area > acc_t(0);
}

// The gt (regular) cannot overlap any box inside the bounding box (bx1, by1, bx2, by2) of a
// group of regular anchors.
template <typename acc_t>
HOST_DEVICE_INLINE bool disjoint(acc_t gx1, acc_t gy1, acc_t gx2, acc_t gy2, acc_t bx1,
                                 acc_t by1, acc_t bx2, acc_t by2) {
  return gx2 <= bx1 || gx1 >= bx2 || gy2 <= by1 || gy1 >= by2;
}

// Intersection of anchor a with crowd box g over the anchor's area (area_a = box_area of a),
// as the loss's crowd regions define it: inter = clamp(R(min(x2)-max(x1)), 0) *
// clamp(R(min(y2)-max(y1)), 0) (NaN-propagating min/max, as torch.minimum/maximum), divided
// by max(area_a, 1e-6) (clamp(min=1e-6) keeps a NaN area NaN).
template <typename acc_t, typename Round>
HOST_DEVICE_INLINE acc_t ioa_coords(acc_t gx1, acc_t gy1, acc_t gx2, acc_t gy2, acc_t ax1, acc_t ay1,
                                    acc_t ax2, acc_t ay2, acc_t area_a, Round round) {
  const acc_t w = clamp_min0(round(sub_rn(nan_min(ax2, gx2), nan_max(ax1, gx1))));
  const acc_t h = clamp_min0(round(sub_rn(nan_min(ay2, gy2), nan_max(ay1, gy1))));
  const acc_t floor = acc_t(1e-6);
  return mul_rn(w, h) / (area_a < floor ? floor : area_a);
}

// torch.max(dim) semantics for the running best gt of an anchor, gts visited in increasing
// index: a later gt wins only when strictly greater, or when it is the first NaN.
template <typename acc_t>
HOST_DEVICE_INLINE bool better(acc_t v, acc_t best) {
  return v > best || (v != v && best == best);
}

// Matcher labels before the low-quality restore: < low -> -1, [low, high) -> -2, else the
// best gt (NaN compares false both ways and keeps its gt index, as in torchvision).
template <typename acc_t>
HOST_DEVICE_INLINE int64_t threshold_label(acc_t best, int64_t idx, acc_t high, acc_t low) {
  if (best < low) return -1;
  if (best < high) return -2;
  return idx;
}

// Order-preserving bits of an IoU (>= 0, -0 or NaN) for integer atomicMax: -0 -> 0 and every
// NaN -> the canonical quiet NaN, which sorts above +inf, so the max propagates NaN as
// torch.max does.
HOST_DEVICE_INLINE uint32_t iou_bits(float v) {
  if (v != v) return 0x7fc00000u;
  if (v <= 0.f) return 0u;
  union {
    float f;
    uint32_t u;
  } c;
  c.f = v;
  return c.u;
}
HOST_DEVICE_INLINE unsigned long long iou_bits(double v) {
  if (v != v) return 0x7ff8000000000000ull;
  if (v <= 0.0) return 0ull;
  union {
    double f;
    unsigned long long u;
  } c;
  c.f = v;
  return c.u;
}
HOST_DEVICE_INLINE float iou_from_bits(uint32_t u) {
  union {
    float f;
    uint32_t u;
  } c;
  c.u = u;
  return c.f;
}
HOST_DEVICE_INLINE double iou_from_bits(unsigned long long u) {
  union {
    double f;
    unsigned long long u;
  } c;
  c.u = u;
  return c.f;
}

// One anchor of torchvision's AnchorGenerator.grid_anchors: the int32 shift (arange(W) *
// stride) is converted to the anchors' dtype, then added to the cell anchor in that dtype.
template <typename scalar_t>
HOST_DEVICE_INLINE scalar_t shifted(int32_t shift, scalar_t cell) {
  return static_cast<scalar_t>(static_cast<scalar_t>(shift) + cell);
}

}  // namespace boxes
}  // namespace retina_fast
