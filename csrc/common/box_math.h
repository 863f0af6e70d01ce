#pragma once
// Box arithmetic shared by the CPU and CUDA kernels, in torchvision's exact operation order
// (see DESIGN.md): bitwise-equal IoU in float32 depends on it. Boxes are (x1, y1, x2, y2).
#include <cmath>

#include "common/host_device.h"

namespace retina_fast {

// torch.maximum / torch.minimum propagate NaN; a plain ?: would not.
template <typename T>
HOST_DEVICE_INLINE T nan_max(T a, T b) {
  return (a != a || a > b) ? a : b;
}
template <typename T>
HOST_DEVICE_INLINE T nan_min(T a, T b) {
  return (a != a || a < b) ? a : b;
}
// Tensor.clamp(min=0): NaN stays NaN.
template <typename T>
HOST_DEVICE_INLINE T clamp_min0(T a) {
  return a < T(0) ? T(0) : a;
}

// Elementary functions in the precision torch uses for T: float math for float and the
// 16-bit types (then rounded back to T), double math for double.
template <typename T>
HOST_DEVICE_INLINE T log_(T x) {
  return T(::logf(static_cast<float>(x)));
}
template <>
HOST_DEVICE_INLINE double log_<double>(double x) {
  return ::log(x);
}
template <typename T>
HOST_DEVICE_INLINE T exp_(T x) {
  return T(::expf(static_cast<float>(x)));
}
template <>
HOST_DEVICE_INLINE double exp_<double>(double x) {
  return ::exp(x);
}

// box_area: (x2 - x1) * (y2 - y1).
template <typename T>
HOST_DEVICE_INLINE T box_area(T x1, T y1, T x2, T y2) {
  return mul_rn(sub_rn(x2, x1), sub_rn(y2, y1));
}

// Rounding of `rb - lt` in torchvision's box_iou: that difference is taken in the boxes' own
// dtype (half/bfloat16 round it) and only then upcast to float32 (`_upcast(rb - lt)`), while
// the areas are computed after the upcast. IdentityRound serves float and double; the kernels
// pass a rounding through c10::Half / c10::BFloat16 for the 16-bit types.
struct IdentityRound {
  template <typename T>
  HOST_DEVICE_INLINE T operator()(T x) const {
    return x;
  }
};

// IoU from coordinates already in the accumulation type `acc_t` (float for float/half/
// bfloat16, double for double), as torchvision's box_iou computes it:
// inter = clamp(R(min(x2)-max(x1)), 0) * clamp(R(min(y2)-max(y1)), 0),
// union = area_a + area_b - inter, iou = inter / union (no epsilon: 0/0 is NaN).
template <typename acc_t, typename Round>
HOST_DEVICE_INLINE acc_t iou_coords(acc_t ax1, acc_t ay1, acc_t ax2, acc_t ay2, acc_t area_a,
                                    acc_t bx1, acc_t by1, acc_t bx2, acc_t by2, acc_t area_b,
                                    Round round) {
  const acc_t w = clamp_min0(round(sub_rn(nan_min(ax2, bx2), nan_max(ax1, bx1))));
  const acc_t h = clamp_min0(round(sub_rn(nan_min(ay2, by2), nan_max(ay1, by1))));
  const acc_t inter = mul_rn(w, h);
  const acc_t uni = sub_rn(add_rn(area_a, area_b), inter);
  return inter / uni;
}

// Intersection over union of a and b given their precomputed areas (float / double).
// Called by the NMS kernels as well: keep the signature.
template <typename T>
HOST_DEVICE_INLINE T box_iou_pair(const T* a, T area_a, const T* b, T area_b) {
  return iou_coords<T>(a[0], a[1], a[2], a[3], area_a, b[0], b[1], b[2], b[3], area_b,
                       IdentityRound());
}

// BoxCoder.encode_single(gt, anchor) for one pair: torchvision's encode_boxes order. T is the
// tensor dtype: every operation rounds to T, as torch's elementwise ops do for half/bfloat16.
template <typename T>
HOST_DEVICE_INLINE void encode_box(const T* gt, const T* anchor, T wx, T wy, T ww, T wh,
                                   T* out) {
  const T half = T(0.5);
  const T ex_w = sub_rn(anchor[2], anchor[0]);
  const T ex_h = sub_rn(anchor[3], anchor[1]);
  const T ex_cx = add_rn(anchor[0], mul_rn(half, ex_w));
  const T ex_cy = add_rn(anchor[1], mul_rn(half, ex_h));
  const T gt_w = sub_rn(gt[2], gt[0]);
  const T gt_h = sub_rn(gt[3], gt[1]);
  const T gt_cx = add_rn(gt[0], mul_rn(half, gt_w));
  const T gt_cy = add_rn(gt[1], mul_rn(half, gt_h));
  out[0] = T(mul_rn(wx, sub_rn(gt_cx, ex_cx)) / ex_w);
  out[1] = T(mul_rn(wy, sub_rn(gt_cy, ex_cy)) / ex_h);
  out[2] = mul_rn(ww, log_(T(gt_w / ex_w)));
  out[3] = mul_rn(wh, log_(T(gt_h / ex_h)));
}

// BoxCoder.decode_single for one box: dw, dh clamped from above only at `clip`.
template <typename T>
HOST_DEVICE_INLINE void decode_box(const T* code, const T* box, T wx, T wy, T ww, T wh, T clip,
                                   T* out) {
  const T half = T(0.5);
  const T w = sub_rn(box[2], box[0]);
  const T h = sub_rn(box[3], box[1]);
  const T cx = add_rn(box[0], mul_rn(half, w));
  const T cy = add_rn(box[1], mul_rn(half, h));
  const T dx = T(code[0] / wx);
  const T dy = T(code[1] / wy);
  T dw = T(code[2] / ww);
  T dh = T(code[3] / wh);
  // torch.clamp(max=clip) keeps NaN.
  dw = dw > clip ? clip : dw;
  dh = dh > clip ? clip : dh;
  const T pcx = add_rn(mul_rn(dx, w), cx);
  const T pcy = add_rn(mul_rn(dy, h), cy);
  const T pw = mul_rn(exp_(dw), w);
  const T ph = mul_rn(exp_(dh), h);
  const T hw = mul_rn(half, pw);
  const T hh = mul_rn(half, ph);
  out[0] = sub_rn(pcx, hw);
  out[1] = sub_rn(pcy, hh);
  out[2] = add_rn(pcx, hw);
  out[3] = add_rn(pcy, hh);
}

// Gradient of decode_box w.r.t. the code, given the gradient g of the 4 outputs. acc_t math.
// torch.clamp passes the gradient where the input is <= max (inclusive), and so does this.
template <typename acc_t>
HOST_DEVICE_INLINE void decode_box_backward(const acc_t* g, const acc_t* code, const acc_t* box,
                                            acc_t wx, acc_t wy, acc_t ww, acc_t wh, acc_t clip,
                                            acc_t* grad_code) {
  const acc_t w = box[2] - box[0];
  const acc_t h = box[3] - box[1];
  const acc_t dw = code[2] / ww;
  const acc_t dh = code[3] / wh;
  // x1 = cx' - pw/2, x2 = cx' + pw/2 with cx' = (c0/wx) w + cx, pw = exp(min(c2/ww, clip)) w.
  grad_code[0] = (g[0] + g[2]) * w / wx;
  grad_code[1] = (g[1] + g[3]) * h / wy;
  grad_code[2] = dw <= clip ? (g[2] - g[0]) * acc_t(0.5) * exp_(dw) * w / ww : acc_t(0);
  grad_code[3] = dh <= clip ? (g[3] - g[1]) * acc_t(0.5) * exp_(dh) * h / wh : acc_t(0);
}

}  // namespace retina_fast
