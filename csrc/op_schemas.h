#pragma once
// The schema of every op of torch.ops.retina_fast, defined once: the extension defines them in
// its namespace (retina_fast.cpp), the CPU emulator of the CUDA sources in retina_fast_simt
// (csrc/simt/simt_device.cpp), so both take the same arguments.
#include <torch/library.h>

namespace retina_fast {

inline void define_op_schemas(torch::Library& m) {
  // ---- focal loss (csrc/focal_loss) ----
  // reduction: 0 none, 1 mean, 2 sum. alpha < 0: no alpha weighting.
  m.def(
      "sigmoid_focal_loss(Tensor inputs, Tensor targets, float alpha, float gamma, "
      "int reduction) -> Tensor");
  m.def(
      "sigmoid_focal_loss_backward(Tensor grad, Tensor inputs, Tensor targets, float alpha, "
      "float gamma, int reduction) -> Tensor");
  // Both gradients, for soft targets that need one: (d/d inputs, d/d targets).
  m.def(
      "sigmoid_focal_loss_backward_with_targets(Tensor grad, Tensor inputs, Tensor targets, "
      "float alpha, float gamma, int reduction) -> (Tensor, Tensor)");
  // Label smoothing s (labels form): the cross-entropy sees 1 - s/2 and s/2, the alpha weight
  // and the modulating factor the unsmoothed 1 and 0 (apex's and EfficientDet's convention).
  // labels[N] int64: [0, K) foreground class, -1 background, -2 ignored.
  // weights[N] (optional): row i's loss is multiplied by weights[i] (per-image normalisers).
  m.def(
      "sigmoid_focal_loss_labels(Tensor logits, Tensor labels, Tensor? weights, float alpha, "
      "float gamma, int reduction, float label_smoothing) -> Tensor");
  m.def(
      "sigmoid_focal_loss_labels_backward(Tensor grad, Tensor logits, Tensor labels, "
      "Tensor? weights, float alpha, float gamma, int reduction, float label_smoothing) -> Tensor");
  // Forward of a reduced loss (reduction 1 mean or 2 sum) whose gradient is needed:
  // (loss, d loss / d logits) from one pass and one sigmoid per element; the loss is bitwise
  // that of the plain forward, the gradient that of the backward for an upstream gradient of 1.
  m.def(
      "sigmoid_focal_loss_labels_with_grad(Tensor logits, Tensor labels, Tensor? weights, "
      "float alpha, float gamma, int reduction, float label_smoothing) -> (Tensor, Tensor)");
  m.def(
      "sigmoid_focal_loss_with_grad(Tensor inputs, Tensor targets, float alpha, float gamma, "
      "int reduction) -> (Tensor, Tensor)");
  // Benchmark hook (CPU): the per-element math alone, see focal_loss_cpu.cpp.
  m.def(
      "_focal_math_bench(Tensor x, Tensor? t, int reps, int mode, float alpha, float gamma) "
      "-> Tensor");

  // ---- boxes (csrc/boxes) ----
  // Boxes are (x1, y1, x2, y2). box_iou: [N, 4] x [M, 4] -> [N, M] (float32 for 16-bit boxes).
  m.def("box_iou(Tensor boxes1, Tensor boxes2) -> Tensor");
  // cell_anchors [sum(cells_per_level), 4]; grid_sizes and strides: (h, w) per level.
  m.def(
      "grid_anchors(Tensor cell_anchors, int[] cells_per_level, int[] grid_sizes, "
      "int[] strides) -> Tensor");
  // anchors [A, 4], gt_boxes [B, M, 4], gt_counts [B] -> int64 [B, A]: gt index, -1, -2.
  // gt_crowd [B, M] bool (optional): crowd rows are never matched; a background anchor whose
  // intersection with a crowd box over its own area is >= crowd_ioa_thresh becomes -2.
  m.def(
      "match_anchors(Tensor anchors, Tensor gt_boxes, Tensor gt_counts, float high, float low, "
      "bool allow_low_quality_matches, bool zero_iou_quirk, Tensor? gt_crowd=None, "
      "float crowd_ioa_thresh=0.5) -> Tensor");
  // matches [B, A] (from match_anchors), anchors [A, 4], gt_boxes [B, M, 4], gt_labels [B, M]
  // -> (labels [B, A] int64: gt label, -1, -2; regression targets [B, A, 4], 0 off foreground).
  // A match outside [0, M) other than -1/-2 is an error on both devices; on CUDA it is a
  // device-side assertion (no host sync). check_matches is kept for compatibility: no effect.
  m.def(
      "gather_targets(Tensor matches, Tensor anchors, Tensor gt_boxes, Tensor gt_labels, "
      "float[] weights, bool check_matches=True) -> (Tensor, Tensor)");
  // RetinaNet's box loss over the foreground anchors (matches >= 0) of a padded batch, gathered
  // and computed in one pass: sum over images b of image_weights[b] * (sum over b's foreground
  // anchors of the loss of bbox_regression[b, a] against gt_boxes[b, matches[b, a]] and anchor
  // a). loss_type 0: L1 on encoded targets, 1: smooth L1 (beta), 2: GIoU on decoded boxes
  // (eps, clip). -> 0-d float32 (float64 for float64 codes).
  m.def(
      "matched_box_loss(Tensor bbox_regression, Tensor anchors, Tensor matches, Tensor gt_boxes, "
      "Tensor image_weights, int loss_type, float[] weights, float clip, float beta, float eps) -> Tensor");
  m.def(
      "matched_box_loss_backward(Tensor grad, Tensor bbox_regression, Tensor anchors, Tensor matches, "
      "Tensor gt_boxes, Tensor image_weights, int loss_type, float[] weights, float clip, float beta, "
      "float eps) -> Tensor");
  m.def("encode_boxes(Tensor reference_boxes, Tensor proposals, float[] weights) -> Tensor");
  // rel_codes [N, 4k] or [B, N, 4k]; boxes [N, 4] or [B, N, 4].
  m.def("decode_boxes(Tensor rel_codes, Tensor boxes, float[] weights, float clip) -> Tensor");
  m.def(
      "decode_boxes_backward(Tensor grad, Tensor rel_codes, Tensor boxes, float[] weights, "
      "float clip) -> Tensor");

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
  // upcast: float16/bfloat16 logits and codes are read as float32 (exactly) and everything is
  // computed and returned in float32, as for .float() copies of them, without the copies.
  m.def(
      "postprocess_detections(Tensor cls_logits, Tensor bbox_regression, Tensor anchors, "
      "Tensor image_sizes, int[] num_anchors_per_level, float score_thresh, "
      "int topk_candidates, float nms_thresh, int detections_per_img, bool upcast=False) "
      "-> (Tensor, Tensor, Tensor, Tensor)");
}

}  // namespace retina_fast
