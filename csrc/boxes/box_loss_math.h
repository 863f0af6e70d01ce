#pragma once
// Per-anchor box losses of RetinaNet and their gradients with respect to the predicted codes,
// shared by the CPU and CUDA kernels of matched_box_loss (HOST_DEVICE). One foreground anchor:
// its predicted codes, its anchor and its matched gt box.
//   L1 / smooth L1 on the encoded target (torchvision's v1 loss: BoxCoder.encode_single, then
//     F.l1_loss / F.smooth_l1_loss summed over the 4 codes);
//   GIoU on the decoded box (v2: BoxCoder.decode_single, then generalized_box_iou_loss), in
//     torchvision's operation order; its gradient is written out by hand, with torch's
//     conventions: torch.maximum/minimum split the gradient in half at ties, and the
//     intersection passes gradient only where it is positive (intsctk[mask] = ...).
#include <cstdint>

#include "common/box_math.h"
#include "common/host_device.h"

namespace retina_fast {
namespace boxes {

enum class BoxLoss : int64_t { L1 = 0, SmoothL1 = 1, GIoU = 2 };

struct CoderParams {
  double wx, wy, ww, wh, clip;
};

// |d|, and its derivative sign(d) (0 at 0, NaN stays NaN), as torch's abs.
template <typename T>
HOST_DEVICE_INLINE T abs_(T d) {
  return d < T(0) ? -d : d;
}
template <typename T>
HOST_DEVICE_INLINE T sign_(T d) {
  return d > T(0) ? T(1) : (d < T(0) ? T(-1) : (d == T(0) ? T(0) : d));
}

// torch.nn.functional.smooth_l1_loss of one difference (beta > 0) and its derivative.
template <typename T>
HOST_DEVICE_INLINE T smooth_l1(T d, T beta) {
  const T z = abs_(d);
  return z < beta ? T(0.5) * z * z / beta : z - T(0.5) * beta;
}
template <typename T>
HOST_DEVICE_INLINE T dsmooth_l1(T d, T beta) {
  return d < -beta ? T(-1) : (d > beta ? T(1) : d / beta);
}

// Coefficient of `a` in the gradient of torch.maximum(a, b) / torch.minimum(a, b).
template <typename T>
HOST_DEVICE_INLINE T dmax_a(T a, T b) {
  return a == b ? T(0.5) : (a < b ? T(0) : T(1));
}
template <typename T>
HOST_DEVICE_INLINE T dmin_a(T a, T b) {
  return a == b ? T(0.5) : (a > b ? T(0) : T(1));
}

// torchvision's generalized_box_iou_loss of box p against gt q (both x1, y1, x2, y2); with
// `grad`, also d loss / d p.
template <typename T>
HOST_DEVICE_INLINE T giou_loss(const T* p, const T* q, T eps, T* grad) {
  const T x1 = p[0], y1 = p[1], x2 = p[2], y2 = p[3];
  const T x1g = q[0], y1g = q[1], x2g = q[2], y2g = q[3];
  const T xk1 = nan_max(x1, x1g), yk1 = nan_max(y1, y1g);
  const T xk2 = nan_min(x2, x2g), yk2 = nan_min(y2, y2g);
  const bool mask = (yk2 > yk1) && (xk2 > xk1);
  const T iw = xk2 - xk1, ih = yk2 - yk1;
  const T inter = mask ? iw * ih : T(0);
  const T w1 = x2 - x1, h1 = y2 - y1;
  const T uni = w1 * h1 + (x2g - x1g) * (y2g - y1g) - inter;
  const T ue = uni + eps;
  const T iou = inter / ue;
  const T xc1 = nan_min(x1, x1g), yc1 = nan_min(y1, y1g);
  const T xc2 = nan_max(x2, x2g), yc2 = nan_max(y2, y2g);
  const T cw = xc2 - xc1, ch = yc2 - yc1;
  const T area_c = cw * ch;
  const T ce = area_c + eps;
  const T loss = T(1) - (iou - ((area_c - uni) / ce));
  if (grad) {
    // loss = 1 - I / (U + eps) + (C - U) / (C + eps), U = area1 + area2 - I
    const T dI = -T(1) / ue - inter / (ue * ue) + T(1) / ce;
    const T dA1 = inter / (ue * ue) - T(1) / ce;
    const T dC = T(1) / ce - (area_c - uni) / (ce * ce);
    const T mI = mask ? dI : T(0);
    grad[0] = -mI * ih * dmax_a(x1, x1g) - dA1 * h1 - dC * ch * dmin_a(x1, x1g);
    grad[1] = -mI * iw * dmax_a(y1, y1g) - dA1 * w1 - dC * cw * dmin_a(y1, y1g);
    grad[2] = mI * ih * dmin_a(x2, x2g) + dA1 * h1 + dC * ch * dmax_a(x2, x2g);
    grad[3] = mI * iw * dmin_a(y2, y2g) + dA1 * w1 + dC * cw * dmax_a(y2, y2g);
  }
  return loss;
}

// The loss of one foreground anchor and, with `grad`, gs * d loss / d codes.
//   codes: the predicted (dx, dy, dw, dh) in acc_t; anchor, gt: boxes in enc_t (the encoding
//   dtype: the promoted dtype of anchors and gts, float32 for 16-bit boxes).
// L1 / smooth L1 encode in enc_t and compare in acc_t (the Python loss's .to(pred.dtype));
// GIoU decodes in acc_t, with anchor and gt converted to acc_t, as torchvision decodes in the
// codes' dtype.
template <typename acc_t, typename enc_t>
HOST_DEVICE_INLINE acc_t box_loss_one(BoxLoss kind, const acc_t* codes, const enc_t* anchor,
                                      const enc_t* gt, const CoderParams& cp, acc_t beta, acc_t eps,
                                      acc_t gs, acc_t* grad) {
  if (kind == BoxLoss::GIoU) {
    acc_t an[4], g[4], box[4];
    for (int j = 0; j < 4; ++j) {
      an[j] = acc_t(anchor[j]);
      g[j] = acc_t(gt[j]);
    }
    decode_box(codes, an, acc_t(cp.wx), acc_t(cp.wy), acc_t(cp.ww), acc_t(cp.wh), acc_t(cp.clip), box);
    acc_t gb[4];
    const acc_t loss = giou_loss(box, g, eps, grad ? gb : nullptr);
    if (grad) {
      for (int j = 0; j < 4; ++j) gb[j] *= gs;
      decode_box_backward(gb, codes, an, acc_t(cp.wx), acc_t(cp.wy), acc_t(cp.ww), acc_t(cp.wh),
                          acc_t(cp.clip), grad);
    }
    return loss;
  }
  enc_t t[4];
  encode_box(gt, anchor, enc_t(cp.wx), enc_t(cp.wy), enc_t(cp.ww), enc_t(cp.wh), t);
  acc_t loss = acc_t(0);
  for (int j = 0; j < 4; ++j) {
    const acc_t d = codes[j] - acc_t(t[j]);
    if (kind == BoxLoss::SmoothL1 && beta > acc_t(0)) {
      loss += smooth_l1(d, beta);
      if (grad) grad[j] = gs * dsmooth_l1(d, beta);
    } else {
      loss += abs_(d);
      if (grad) grad[j] = gs * sign_(d);
    }
  }
  return loss;
}

}  // namespace boxes
}  // namespace retina_fast
