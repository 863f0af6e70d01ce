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

// box_area: (x2 - x1) * (y2 - y1).
template <typename T>
HOST_DEVICE_INLINE T box_area(T x1, T y1, T x2, T y2) {
  return mul_rn(sub_rn(x2, x1), sub_rn(y2, y1));
}

// Intersection over union of a and b given their precomputed areas, as torchvision's
// box_iou computes it: inter = clamp(min(x2)-max(x1), 0) * clamp(min(y2)-max(y1), 0),
// union = area_a + area_b - inter, iou = inter / union (no epsilon: 0/0 is NaN).
template <typename T>
HOST_DEVICE_INLINE T box_iou_pair(const T* a, T area_a, const T* b, T area_b) {
  const T w = clamp_min0(sub_rn(nan_min(a[2], b[2]), nan_max(a[0], b[0])));
  const T h = clamp_min0(sub_rn(nan_min(a[3], b[3]), nan_max(a[1], b[1])));
  const T inter = mul_rn(w, h);
  const T uni = sub_rn(add_rn(area_a, area_b), inter);
  return inter / uni;
}

// BoxCoder.encode_single(gt, anchor) for one pair: torchvision's encode_boxes order.
template <typename T>
HOST_DEVICE_INLINE void encode_box(const T* gt, const T* anchor, T wx, T wy, T ww, T wh,
                                   T* out) {
  const T ex_w = sub_rn(anchor[2], anchor[0]);
  const T ex_h = sub_rn(anchor[3], anchor[1]);
  const T ex_cx = add_rn(anchor[0], mul_rn(T(0.5), ex_w));
  const T ex_cy = add_rn(anchor[1], mul_rn(T(0.5), ex_h));
  const T gt_w = sub_rn(gt[2], gt[0]);
  const T gt_h = sub_rn(gt[3], gt[1]);
  const T gt_cx = add_rn(gt[0], mul_rn(T(0.5), gt_w));
  const T gt_cy = add_rn(gt[1], mul_rn(T(0.5), gt_h));
  out[0] = mul_rn(wx, sub_rn(gt_cx, ex_cx)) / ex_w;
  out[1] = mul_rn(wy, sub_rn(gt_cy, ex_cy)) / ex_h;
  out[2] = mul_rn(ww, T(::log(gt_w / ex_w)));
  out[3] = mul_rn(wh, T(::log(gt_h / ex_h)));
}

// BoxCoder.decode_single for one box: dw, dh clamped from above only at `clip`.
template <typename T>
HOST_DEVICE_INLINE void decode_box(const T* code, const T* box, T wx, T wy, T ww, T wh, T clip,
                                   T* out) {
  const T w = sub_rn(box[2], box[0]);
  const T h = sub_rn(box[3], box[1]);
  const T cx = add_rn(box[0], mul_rn(T(0.5), w));
  const T cy = add_rn(box[1], mul_rn(T(0.5), h));
  const T dx = code[0] / wx;
  const T dy = code[1] / wy;
  T dw = code[2] / ww;
  T dh = code[3] / wh;
  // torch.clamp(max=clip) keeps NaN.
  dw = dw > clip ? clip : dw;
  dh = dh > clip ? clip : dh;
  const T pcx = add_rn(mul_rn(dx, w), cx);
  const T pcy = add_rn(mul_rn(dy, h), cy);
  const T pw = mul_rn(T(::exp(dw)), w);
  const T ph = mul_rn(T(::exp(dh)), h);
  const T hw = mul_rn(T(0.5), pw);
  const T hh = mul_rn(T(0.5), ph);
  out[0] = sub_rn(pcx, hw);
  out[1] = sub_rn(pcy, hh);
  out[2] = add_rn(pcx, hw);
  out[3] = add_rn(pcy, hh);
}

}  // namespace retina_fast
