#pragma once
// Helpers shared by the CPU and CUDA NMS / post-processing kernels: sort keys, the IoU
// threshold in float, the sigmoid as torch computes it, and the argument checks.
#include <ATen/ATen.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <type_traits>

#include "common/box_math.h"
#include "common/checks.h"
#include "common/host_device.h"
#include "nms/nms_tuning.h"

namespace retina_fast {
namespace nms {

// IoU (and therefore boxes) in float32 for float16/bfloat16/float32 inputs, float64 for float64.
template <typename scalar_t>
struct IouType {
  using type = float;
};
template <>
struct IouType<double> {
  using type = double;
};

HOST_DEVICE_INLINE uint32_t float_bits(float f) {
#if defined(__CUDA_ARCH__)
  return __float_as_uint(f);
#else
  uint32_t u;
  std::memcpy(&u, &f, sizeof u);
  return u;
#endif
}

HOST_DEVICE_INLINE uint64_t double_bits(double f) {
#if defined(__CUDA_ARCH__)
  return static_cast<uint64_t>(__double_as_longlong(f));
#else
  uint64_t u;
  std::memcpy(&u, &f, sizeof u);
  return u;
#endif
}

// Ascending key order == torch.sort(descending=True) order of the scores: NaN first (torch
// sorts NaN as the largest value), -0.0 and +0.0 tie. A stable sort of the keys then gives
// "descending score, lower index first among equal scores" on CPU and CUDA alike.
HOST_DEVICE_INLINE uint32_t score_key_desc(float s) {
  if (s != s) return 0u;
  if (s == 0.f) s = 0.f;
  uint32_t u = float_bits(s);
  u = (u & 0x80000000u) ? ~u : (u | 0x80000000u);  // monotone map to unsigned
  return ~u;  // >= 0x007FFFFF for every non-NaN score, so NaN (0) sorts first
}

HOST_DEVICE_INLINE uint64_t score_key_desc64(double s) {
  if (s != s) return 0ull;
  if (s == 0.0) s = 0.0;
  uint64_t u = double_bits(s);
  u = (u & 0x8000000000000000ull) ? ~u : (u | 0x8000000000000000ull);
  return ~u;
}

// torchvision's CPU kernel tests `iou > iou_threshold` with the float IoU promoted to double.
// The largest float <= thr gives the same answer for every float IoU, so float kernels (CPU and
// CUDA) compare in float and still decide exactly as the double comparison would.
inline float float_threshold(double thr) {
  float t = static_cast<float>(thr);
  if (static_cast<double>(t) > thr) t = std::nextafter(t, -std::numeric_limits<float>::infinity());
  return t;
}

template <typename F>
inline F iou_threshold_as(double thr) {
  return static_cast<F>(thr);
}
template <>
inline float iou_threshold_as<float>(double thr) {
  return float_threshold(thr);
}

// torch.clamp(x, min=lo, max=hi) = min(max(x, lo), hi), NaN kept.
template <typename T>
HOST_DEVICE_INLINE T clamp_like_torch(T x, T lo, T hi) {
  T y = x < lo ? lo : x;
  y = y > hi ? hi : y;
  return x != x ? x : y;
}

// ------------------------------------------------------------------------------ logit cuts
// The post-processing selects on logits and computes exact scores (torch's sigmoid) only for
// logits that may still make the top-k. A score bound s becomes a logit cut c with
//     x < c  =>  S(x) < s  (S: the score as torch computes it, before any dtype rounding),
// so after rounding to a dtype in which s is representable, S(x) <= s: x cannot beat a score
// s already held by k lower-indexed candidates, nor pass score_thresh = s.
//
// Error model: torch computes 1 / (1 + exp(-x)) in float (float32, float16, bfloat16: opmath
// float, then one rounding to the dtype) or in double, with an exp within a few ulp; the result
// is within a relative few ulp (~5e-7 in float, ~1e-15 in double) of the exact sigmoid while it
// is a normal number. The cut allows a relative kSigmoidRelErr (200x / 10^5x that) and gives up
// (-inf) below kSigmoidTiny, where subnormals (or flush-to-zero) end the relative bound.
template <typename scalar_t>
struct SigmoidBound {
  static constexpr double rel = 1e-4;
  static constexpr double tiny = 1e-30;
};
template <>
struct SigmoidBound<double> {
  static constexpr double rel = 1e-10;
  static constexpr double tiny = 1e-290;
};

// A box's 4 codes as T: the pointer itself when they are stored as T, else converted into tmp
// (float16/bfloat16 codes read as float32 by an upcast post-processing: exact).
template <typename T, typename in_t>
HOST_DEVICE_INLINE const T* codes_as(const in_t* p, T* tmp) {
  if constexpr (std::is_same<T, in_t>::value) {
    return p;
  } else {
    for (int c = 0; c < 4; ++c) tmp[c] = static_cast<T>(p[c]);
    return tmp;
  }
}

// The cut for score bound s with relative error `rel`: +inf when no score exceeds s (s >= 1),
// -inf when nothing can be excluded. Computed in double, then lowered by a margin far above
// the rounding error of log / log1p, so it never exceeds the exact logit(s / (1 + rel)).
HOST_DEVICE_INLINE double sigmoid_score_cut(double s, double rel, double tiny) {
  if (s >= 1.0) return std::numeric_limits<double>::infinity();
  if (!(s > tiny)) return -std::numeric_limits<double>::infinity();
  const double p = s / (1.0 + rel);
  const double z = ::log(p) - ::log1p(-p);
  return z - 1e-9 * (1.0 + ::fabs(z));
}

// The largest float <= c (c finite or infinite, never NaN): a float logit compared with it
// decides as the double comparison with c would, conservatively.
HOST_DEVICE_INLINE float float_at_most(double c) {
  float f = static_cast<float>(c);
  if (static_cast<double>(f) > c) f = ::nextafterf(f, -std::numeric_limits<float>::infinity());
  return f;
}

// ------------------------------------------------------------------------------ checks

inline void check_nms_args(const at::Tensor& boxes, const at::Tensor& scores, double thr,
                           const char* op) {
  check_floating(boxes, op, "boxes");
  check_floating(scores, op, "scores");
  TORCH_CHECK(boxes.dim() == 2 && boxes.size(1) == 4, op,
              ": expected boxes of shape [N, 4], got shape ", boxes.sizes());
  TORCH_CHECK(scores.dim() == 1 && scores.size(0) == boxes.size(0), op,
              ": expected scores of shape [N] = [", boxes.size(0), "] to match boxes ",
              boxes.sizes(), ", got shape ", scores.sizes());
  check_same_device(boxes, scores, op, "boxes", "scores");
  TORCH_CHECK(!std::isnan(thr), op, ": expected a number as iou_threshold, got NaN");
  TORCH_CHECK(boxes.size(0) <= std::numeric_limits<int32_t>::max(), op,
              ": expected at most 2^31 - 1 boxes, got ", boxes.size(0));
}

inline void check_index_arg(const at::Tensor& idx, const at::Tensor& boxes, const char* op,
                            const char* name) {
  TORCH_CHECK(!at::isFloatingType(idx.scalar_type()) && !at::isComplexType(idx.scalar_type()) &&
                  idx.scalar_type() != at::kBool,
              op, ": expected ", name, " of an integer dtype, got ", idx.scalar_type());
  TORCH_CHECK(idx.dim() == 1 && idx.size(0) == boxes.size(0), op, ": expected ", name,
              " of shape [N] = [", boxes.size(0), "] to match boxes ", boxes.sizes(),
              ", got shape ", idx.sizes());
  check_same_device(boxes, idx, op, "boxes", name);
}

inline void check_multi_args(const at::Tensor& boxes, const at::Tensor& scores,
                             const at::Tensor& idxs, const at::Tensor& image_ids,
                             int64_t num_images, double thr, const char* op) {
  check_nms_args(boxes, scores, thr, op);
  check_index_arg(idxs, boxes, op, "idxs");
  check_index_arg(image_ids, boxes, op, "image_ids");
  TORCH_CHECK(num_images >= 0, op, ": expected num_images >= 0, got ", num_images);
}

// The dtype the post-processing computes and returns in: the codes' (as torchvision decodes),
// or float32 for float16/bfloat16 ones under upcast.
inline at::ScalarType postprocess_math_type(at::ScalarType codes, bool upcast) {
  return upcast && (codes == at::kHalf || codes == at::kBFloat16) ? at::kFloat : codes;
}

inline void check_postprocess_args(const at::Tensor& cls_logits, const at::Tensor& bbox_regression,
                                   const at::Tensor& anchors, const at::Tensor& image_sizes,
                                   at::IntArrayRef num_anchors_per_level, double score_thresh,
                                   int64_t topk_candidates, double nms_thresh,
                                   int64_t detections_per_img, const char* op) {
  check_floating(cls_logits, op, "cls_logits");
  check_floating(bbox_regression, op, "bbox_regression");
  check_floating(anchors, op, "anchors");
  check_dim(cls_logits, 3, op, "cls_logits", "[B, A, K]");
  check_dim(bbox_regression, 3, op, "bbox_regression", "[B, A, 4]");
  const int64_t B = cls_logits.size(0), A = cls_logits.size(1);
  TORCH_CHECK(bbox_regression.size(0) == B && bbox_regression.size(1) == A &&
                  bbox_regression.size(2) == 4,
              op, ": expected bbox_regression of shape [B, A, 4] = [", B, ", ", A,
              ", 4] to match cls_logits ", cls_logits.sizes(), ", got shape ",
              bbox_regression.sizes());
  TORCH_CHECK(cls_logits.scalar_type() == bbox_regression.scalar_type(), op,
              ": expected cls_logits and bbox_regression of the same dtype, got ",
              cls_logits.scalar_type(), " and ", bbox_regression.scalar_type());
  TORCH_CHECK((anchors.dim() == 2 && anchors.size(0) == A && anchors.size(1) == 4) ||
                  (anchors.dim() == 3 && anchors.size(0) == B && anchors.size(1) == A &&
                   anchors.size(2) == 4),
              op, ": expected anchors of shape [A, 4] = [", A, ", 4] or [B, A, 4] = [", B, ", ",
              A, ", 4], got shape ", anchors.sizes());
  TORCH_CHECK(!at::isFloatingType(image_sizes.scalar_type()) && image_sizes.dim() == 2 &&
                  image_sizes.size(0) == B && image_sizes.size(1) == 2,
              op, ": expected image_sizes as an integer tensor of shape [B, 2] = [", B,
              ", 2] holding (height, width), got ", image_sizes.scalar_type(), " of shape ",
              image_sizes.sizes());
  check_same_device(cls_logits, bbox_regression, op, "cls_logits", "bbox_regression");
  check_same_device(cls_logits, anchors, op, "cls_logits", "anchors");
  check_same_device(cls_logits, image_sizes, op, "cls_logits", "image_sizes");
  int64_t total = 0;
  for (int64_t a : num_anchors_per_level) {
    TORCH_CHECK(a >= 0, op, ": expected num_anchors_per_level >= 0, got ", num_anchors_per_level);
    total += a;
  }
  TORCH_CHECK(total == A, op, ": expected num_anchors_per_level to sum to A = ", A, ", got ",
              num_anchors_per_level, " (sum ", total, ")");
  TORCH_CHECK(!std::isnan(score_thresh), op, ": expected a number as score_thresh, got NaN");
  TORCH_CHECK(!std::isnan(nms_thresh), op, ": expected a number as nms_thresh, got NaN");
  TORCH_CHECK(topk_candidates >= 0, op, ": expected topk_candidates >= 0, got ", topk_candidates);
  TORCH_CHECK(detections_per_img >= 0, op, ": expected detections_per_img >= 0, got ",
              detections_per_img);
}

}  // namespace nms
}  // namespace retina_fast
