// CPU kernels of nms, batched_nms and batched_nms_multi (see nms_cpu_engine.h for the
// algorithm). Output order: descending score, lower index first among equal scores.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <torch/library.h>

#include <vector>

#include "nms/nms_common.h"
#include "nms/nms_cpu_engine.h"

namespace retina_fast {
namespace nms {
namespace {

// Runs the segmented NMS for any box/score dtype. keys may be undefined tensors.
void run_nms(const at::Tensor& boxes, const at::Tensor& scores, const at::Tensor& key_minor,
             const at::Tensor& key_major, double thr, std::vector<int32_t>& score_sorted,
             std::vector<uint8_t>& keep) {
  const at::Tensor b = boxes.contiguous();
  const at::Tensor s = scores.contiguous();
  const int64_t n = b.size(0);
  const int64_t* kmin = key_minor.defined() ? key_minor.const_data_ptr<int64_t>() : nullptr;
  const int64_t* kmaj = key_major.defined() ? key_major.const_data_ptr<int64_t>() : nullptr;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, b.scalar_type(), "nms_cpu", [&] {
    using box_t = scalar_t;
    const box_t* bp = b.const_data_ptr<box_t>();
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, s.scalar_type(), "nms_cpu_scores", [&] {
      cpu::segmented_nms<box_t, scalar_t>(bp, s.const_data_ptr<scalar_t>(), n, kmin, kmaj, thr,
                                          score_sorted, keep);
    });
  });
}

at::Tensor kept_in_order(const std::vector<int32_t>& order, const std::vector<uint8_t>& keep,
                         const at::Tensor& like) {
  int64_t m = 0;
  for (uint8_t k : keep) m += k;
  at::Tensor out = at::empty({m}, like.options().dtype(at::kLong));
  int64_t* o = out.mutable_data_ptr<int64_t>();
  for (int32_t i : order) {
    if (keep[i]) *o++ = i;
  }
  return out;
}

at::Tensor nms_cpu(const at::Tensor& boxes, const at::Tensor& scores, double iou_threshold) {
  const char* op = "retina_fast::nms";
  check_nms_args(boxes, scores, iou_threshold, op);
  check_device(boxes, at::kCPU, op, "boxes");
  if (boxes.size(0) == 0) return at::empty({0}, boxes.options().dtype(at::kLong));
  std::vector<int32_t> order;
  std::vector<uint8_t> keep;
  run_nms(boxes, scores, at::Tensor(), at::Tensor(), iou_threshold, order, keep);
  return kept_in_order(order, keep, boxes);
}

at::Tensor batched_nms_cpu(const at::Tensor& boxes, const at::Tensor& scores,
                           const at::Tensor& idxs, double iou_threshold) {
  const char* op = "retina_fast::batched_nms";
  check_nms_args(boxes, scores, iou_threshold, op);
  check_index_arg(idxs, boxes, op, "idxs");
  check_device(boxes, at::kCPU, op, "boxes");
  if (boxes.size(0) == 0) return at::empty({0}, boxes.options().dtype(at::kLong));
  const at::Tensor key = idxs.to(at::kLong).contiguous();
  std::vector<int32_t> order;
  std::vector<uint8_t> keep;
  run_nms(boxes, scores, key, at::Tensor(), iou_threshold, order, keep);
  return kept_in_order(order, keep, boxes);
}

// keep: [num_images, W] int64, the kept indices of each image in descending score order,
// padded with -1; counts: [num_images]. W = max_per_image if >= 0, else the largest count.
std::tuple<at::Tensor, at::Tensor> batched_nms_multi_cpu(
    const at::Tensor& boxes, const at::Tensor& scores, const at::Tensor& idxs,
    const at::Tensor& image_ids, int64_t num_images, double iou_threshold,
    int64_t max_per_image) {
  const char* op = "retina_fast::batched_nms_multi";
  check_multi_args(boxes, scores, idxs, image_ids, num_images, iou_threshold, op);
  check_device(boxes, at::kCPU, op, "boxes");
  const int64_t n = boxes.size(0);
  const at::Tensor img = image_ids.to(at::kLong).contiguous();
  const int64_t* ip = img.const_data_ptr<int64_t>();
  for (int64_t i = 0; i < n; ++i) {
    TORCH_CHECK(ip[i] >= 0 && ip[i] < num_images, op, ": expected every image id in [0, ",
                num_images, "), got image_ids[", i, "] = ", ip[i]);
  }
  at::Tensor counts = at::zeros({num_images}, boxes.options().dtype(at::kLong));
  std::vector<int32_t> order;
  std::vector<uint8_t> keep;
  if (n > 0) run_nms(boxes, scores, idxs.to(at::kLong).contiguous(), img, iou_threshold, order, keep);
  int64_t* cp = counts.mutable_data_ptr<int64_t>();
  const int64_t cap = max_per_image >= 0 ? max_per_image : INT64_MAX;
  for (int32_t i : order) {
    if (keep[i] && cp[ip[i]] < cap) cp[ip[i]]++;
  }
  int64_t width = max_per_image;
  if (width < 0) {
    width = 0;
    for (int64_t b = 0; b < num_images; ++b) width = std::max(width, cp[b]);
  }
  at::Tensor out = at::full({num_images, width}, -1, boxes.options().dtype(at::kLong));
  int64_t* o = out.mutable_data_ptr<int64_t>();
  std::vector<int64_t> fill(num_images, 0);
  for (int32_t i : order) {
    const int64_t b = ip[i];
    if (keep[i] && fill[b] < cp[b]) o[b * width + fill[b]++] = i;
  }
  return {out, counts};
}

// Quantized boxes and scores, as torchvision's quantized CPU NMS takes them: the IoU of the
// integer representations in float (a shared scale and zero point cancel in every width,
// height and ratio) and the order of the integer scores (scale > 0 keeps it). So the kept
// indices are those of nms() on the dequantized tensors where the dequantized IoUs round as the
// integer ones do (always for 8-bit types and integer scales), and torchvision's up to score
// ties (many here: 8-bit scores take at most 256 values), which ours breaks by lower index.
// Per-channel quantization is refused: with a zero point per coordinate the integers' IoU is
// not the boxes' (torchvision computes it anyway).
at::Tensor nms_quantized_cpu(const at::Tensor& boxes, const at::Tensor& scores,
                             double iou_threshold) {
  const char* op = "retina_fast::nms";
  TORCH_CHECK(boxes.is_quantized() && scores.is_quantized(), op,
              ": expected boxes and scores both quantized or both floating point, got boxes of ",
              boxes.scalar_type(), " and scores of ", scores.scalar_type());
  TORCH_CHECK(boxes.scalar_type() == scores.scalar_type(), op,
              ": expected quantized boxes and scores of the same dtype, got ",
              boxes.scalar_type(), " and ", scores.scalar_type());
  for (const at::Tensor* t : {&boxes, &scores}) {
    TORCH_CHECK(t->qscheme() == at::kPerTensorAffine, op,
                ": expected per-tensor affine quantization (one scale and zero point, which "
                "cancel in the IoU), got ", c10::toString(t->qscheme()), " for ",
                t == &boxes ? "boxes" : "scores");
  }
  // float coordinates are exact for 8-bit integers (torchvision computes in float too);
  // double scores keep every qint32 value distinct
  return nms_cpu(boxes.int_repr().to(at::kFloat), scores.int_repr().to(at::kDouble),
                 iou_threshold);
}

}  // namespace

TORCH_LIBRARY_IMPL(retina_fast, CPU, m) {
  m.impl("nms", &nms_cpu);
  m.impl("batched_nms", &batched_nms_cpu);
  m.impl("batched_nms_multi", &batched_nms_multi_cpu);
}

TORCH_LIBRARY_IMPL(retina_fast, QuantizedCPU, m) {
  m.impl("nms", &nms_quantized_cpu);
}

}  // namespace nms
}  // namespace retina_fast
