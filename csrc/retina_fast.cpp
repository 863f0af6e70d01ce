// Every schema of torch.ops.retina_fast, defined once. Kernels register per dispatch key in
// the *_cpu.cpp / *_cuda.cu files (one TORCH_LIBRARY_IMPL per device file); fake (meta)
// kernels and autograd formulas are registered in Python beside the wrappers
// (retina_fast/ops/*.py).
#include <torch/library.h>

namespace retina_fast {

bool cuda_built() {
#ifdef RETINA_FAST_WITH_CUDA
  return true;
#else
  return false;
#endif
}

}  // namespace retina_fast

TORCH_LIBRARY(retina_fast, m) {
  m.def("_cuda_built() -> bool", &retina_fast::cuda_built);

  // ---- focal loss (csrc/focal_loss) ----
  // reduction: 0 none, 1 mean, 2 sum. alpha < 0: no alpha weighting.
  m.def(
      "sigmoid_focal_loss(Tensor inputs, Tensor targets, float alpha, float gamma, "
      "int reduction) -> Tensor");
  m.def(
      "sigmoid_focal_loss_backward(Tensor grad, Tensor inputs, Tensor targets, float alpha, "
      "float gamma, int reduction) -> Tensor");
  // labels[N] int64: [0, K) foreground class, -1 background, -2 ignored.
  m.def(
      "sigmoid_focal_loss_labels(Tensor logits, Tensor labels, float alpha, float gamma, "
      "int reduction, float label_smoothing) -> Tensor");
  m.def(
      "sigmoid_focal_loss_labels_backward(Tensor grad, Tensor logits, Tensor labels, "
      "float alpha, float gamma, int reduction, float label_smoothing) -> Tensor");

  // ---- boxes (csrc/boxes) ----

  // ---- nms and post-processing (csrc/nms) ----
  // Kept indices (int64) in descending score order, lower index first among equal scores;
  // suppress iff IoU > iou_threshold.
  m.def("nms(Tensor boxes, Tensor scores, float iou_threshold) -> Tensor");
  m.def("batched_nms(Tensor boxes, Tensor scores, Tensor idxs, float iou_threshold) -> Tensor");
  // Per-image kept lists of (image, class) segments: (keep [num_images, W] padded with -1,
  // counts [num_images]); W = max_per_image, or the largest count when max_per_image < 0.
  m.def(
      "batched_nms_multi(Tensor boxes, Tensor scores, Tensor idxs, Tensor image_ids, "
      "int num_images, float iou_threshold, int max_per_image) -> (Tensor, Tensor)");
  // RetinaNet post-processing of a batch: (boxes [B, D, 4], scores [B, D], labels [B, D] int64,
  // counts [B] int64), D = detections_per_img, rows past counts[b] padded (0, 0, -1).
  m.def(
      "postprocess_detections(Tensor cls_logits, Tensor bbox_regression, Tensor anchors, "
      "Tensor image_sizes, int[] num_anchors_per_level, float score_thresh, "
      "int topk_candidates, float nms_thresh, int detections_per_img) "
      "-> (Tensor, Tensor, Tensor, Tensor)");
}
