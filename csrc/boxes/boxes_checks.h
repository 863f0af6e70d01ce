#pragma once
// Host-side argument checks and shape logic shared by the CPU and CUDA box kernels.
#include <ATen/ATen.h>

#include <vector>

#include "common/checks.h"

namespace retina_fast {
namespace boxes {

inline void check_boxes(const at::Tensor& t, int64_t dim, const char* op, const char* name,
                        const char* shape) {
  check_floating(t, op, name);
  check_dim(t, dim, op, name, shape);
  TORCH_CHECK(t.size(dim - 1) == 4, op, ": expected ", name, " of shape ", shape,
              " with a last dimension of 4 (x1, y1, x2, y2), got shape ", t.sizes());
}

// The dtype box_iou computes in: torch's promotion of the two inputs.
inline at::ScalarType promoted(const at::Tensor& a, const at::Tensor& b) {
  return at::promote_types(a.scalar_type(), b.scalar_type());
}

// box_iou returns float32 for half/bfloat16 boxes (torchvision upcasts before dividing).
inline at::ScalarType iou_dtype(at::ScalarType t) {
  return t == at::kDouble ? at::kDouble : at::kFloat;
}

inline void check_box_iou(const at::Tensor& b1, const at::Tensor& b2) {
  const char* op = "retina_fast::box_iou";
  check_boxes(b1, 2, op, "boxes1", "[N, 4]");
  check_boxes(b2, 2, op, "boxes2", "[M, 4]");
  check_same_device(b1, b2, op, "boxes1", "boxes2");
}

inline void check_match(const at::Tensor& anchors, const at::Tensor& gt_boxes,
                        const at::Tensor& gt_counts, double high, double low,
                        const c10::optional<at::Tensor>& gt_crowd = c10::nullopt) {
  const char* op = "retina_fast::match_anchors";
  check_boxes(anchors, 2, op, "anchors", "[A, 4]");
  check_boxes(gt_boxes, 3, op, "gt_boxes", "[B, M, 4]");
  TORCH_CHECK(gt_counts.scalar_type() == at::kLong || gt_counts.scalar_type() == at::kInt, op,
              ": expected gt_counts of dtype int64 or int32, got ", gt_counts.scalar_type());
  check_dim(gt_counts, 1, op, "gt_counts", "[B]");
  TORCH_CHECK(gt_counts.size(0) == gt_boxes.size(0), op, ": expected gt_counts of shape [B] = [",
              gt_boxes.size(0), "] to match gt_boxes ", gt_boxes.sizes(), ", got ",
              gt_counts.sizes());
  check_same_device(anchors, gt_boxes, op, "anchors", "gt_boxes");
  check_same_device(anchors, gt_counts, op, "anchors", "gt_counts");
  TORCH_CHECK(low <= high, op, ": expected low <= high, got low = ", low, " and high = ", high);
  if (gt_crowd.has_value()) {
    const at::Tensor& c = *gt_crowd;
    TORCH_CHECK(c.scalar_type() == at::kBool || c.scalar_type() == at::kByte, op,
                ": expected gt_crowd of dtype bool (or uint8), got ", c.scalar_type());
    TORCH_CHECK(c.dim() == 2 && c.size(0) == gt_boxes.size(0) && c.size(1) == gt_boxes.size(1), op,
                ": expected gt_crowd of shape [B, M] = [", gt_boxes.size(0), ", ", gt_boxes.size(1),
                "] (one flag per gt row), got ", c.sizes());
    check_same_device(anchors, c, op, "anchors", "gt_crowd");
  }
}

// The crowd flags as contiguous uint8 [B, M] (nonzero: crowd), or undefined.
inline at::Tensor crowd_mask(const c10::optional<at::Tensor>& gt_crowd) {
  if (!gt_crowd.has_value()) return at::Tensor();
  return gt_crowd->to(at::kByte).contiguous();
}

// Host check of the counts (CPU tensors only: on CUDA it would be a device sync; the Python
// wrapper checks there, and the kernels clamp to [0, M] so nothing reads out of bounds).
inline void check_counts_values(const at::Tensor& counts_cpu_long, int64_t M) {
  const int64_t* c = counts_cpu_long.const_data_ptr<int64_t>();
  for (int64_t b = 0; b < counts_cpu_long.numel(); ++b) {
    TORCH_CHECK(c[b] >= 0 && c[b] <= M, "retina_fast::match_anchors: expected every gt_counts[b] in [0, M] = [0, ",
                M, "], got gt_counts[", b, "] = ", c[b]);
  }
}

struct Weights {
  double wx, wy, ww, wh;
};

inline Weights check_weights(at::ArrayRef<double> w, const char* op) {
  TORCH_CHECK(w.size() == 4, op, ": expected 4 weights (wx, wy, ww, wh), got ", w.size());
  return {w[0], w[1], w[2], w[3]};
}

inline void check_gather(const at::Tensor& matches, const at::Tensor& anchors,
                         const at::Tensor& gt_boxes, const at::Tensor& gt_labels) {
  const char* op = "retina_fast::gather_targets";
  TORCH_CHECK(matches.scalar_type() == at::kLong, op,
              ": expected matches of dtype int64, got ", matches.scalar_type());
  check_dim(matches, 2, op, "matches", "[B, A]");
  check_boxes(anchors, 2, op, "anchors", "[A, 4]");
  check_boxes(gt_boxes, 3, op, "gt_boxes", "[B, M, 4]");
  TORCH_CHECK(gt_labels.scalar_type() == at::kLong, op,
              ": expected gt_labels of dtype int64, got ", gt_labels.scalar_type());
  check_dim(gt_labels, 2, op, "gt_labels", "[B, M]");
  TORCH_CHECK(matches.size(0) == gt_boxes.size(0) && matches.size(1) == anchors.size(0), op,
              ": expected matches of shape [B, A] = [", gt_boxes.size(0), ", ", anchors.size(0),
              "], got ", matches.sizes());
  TORCH_CHECK(gt_labels.size(0) == gt_boxes.size(0) && gt_labels.size(1) == gt_boxes.size(1), op,
              ": expected gt_labels of shape [B, M] = [", gt_boxes.size(0), ", ",
              gt_boxes.size(1), "], got ", gt_labels.sizes());
  check_same_device(anchors, gt_boxes, op, "anchors", "gt_boxes");
  check_same_device(anchors, matches, op, "anchors", "matches");
  check_same_device(anchors, gt_labels, op, "anchors", "gt_labels");
}

[[noreturn]] inline void bad_match(int64_t b, int64_t i, int64_t m, int64_t M,
                                   const char* op = "retina_fast::gather_targets") {
  TORCH_CHECK(false, op, ": expected matches in [0, M) = [0, ", M, "), -1 or -2, got matches[", b,
              ", ", i, "] = ", m);
}

// matched_box_loss(_backward): bbox_regression [B, A, 4], anchors [A, 4], matches [B, A],
// gt_boxes [B, M, 4], image_weights [B].
inline void check_box_loss(const at::Tensor& reg, const at::Tensor& anchors, const at::Tensor& matches,
                           const at::Tensor& gt_boxes, const at::Tensor& image_weights, int64_t loss_type,
                           double beta, double eps, const char* op) {
  check_boxes(reg, 3, op, "bbox_regression", "[B, A, 4]");
  check_boxes(anchors, 2, op, "anchors", "[A, 4]");
  check_boxes(gt_boxes, 3, op, "gt_boxes", "[B, M, 4]");
  TORCH_CHECK(matches.scalar_type() == at::kLong, op, ": expected matches of dtype int64, got ",
              matches.scalar_type());
  check_dim(matches, 2, op, "matches", "[B, A]");
  check_floating(image_weights, op, "image_weights");
  check_dim(image_weights, 1, op, "image_weights", "[B]");
  const int64_t B = reg.size(0), A = reg.size(1);
  TORCH_CHECK(anchors.size(0) == A, op, ": expected anchors of shape [A, 4] = [", A, ", 4], got ",
              anchors.sizes());
  TORCH_CHECK(matches.size(0) == B && matches.size(1) == A, op, ": expected matches of shape [B, A] = [", B,
              ", ", A, "], got ", matches.sizes());
  TORCH_CHECK(gt_boxes.size(0) == B, op, ": expected gt_boxes of shape [B, M, 4] with B = ", B, ", got ",
              gt_boxes.sizes());
  TORCH_CHECK(image_weights.size(0) == B, op, ": expected image_weights of shape [B] = [", B, "], got ",
              image_weights.sizes());
  TORCH_CHECK(loss_type >= 0 && loss_type <= 2, op,
              ": expected loss_type 0 (l1), 1 (smooth_l1) or 2 (giou), got ", loss_type);
  TORCH_CHECK(beta >= 0.0, op, ": expected beta >= 0, got ", beta);
  TORCH_CHECK(eps >= 0.0, op, ": expected eps >= 0, got ", eps);
  check_same_device(reg, anchors, op, "bbox_regression", "anchors");
  check_same_device(reg, matches, op, "bbox_regression", "matches");
  check_same_device(reg, gt_boxes, op, "bbox_regression", "gt_boxes");
  check_same_device(reg, image_weights, op, "bbox_regression", "image_weights");
}

// Shapes of encode_boxes: reference_boxes and proposals [..., 4] of equal shape, or proposals
// [N, 4] shared by reference_boxes [B, N, 4]. Returns the number of rows the proposals repeat
// over (N), i.e. proposal row = row % n_prop.
inline int64_t check_encode(const at::Tensor& ref, const at::Tensor& prop) {
  const char* op = "retina_fast::encode_boxes";
  check_floating(ref, op, "reference_boxes");
  check_floating(prop, op, "proposals");
  check_same_device(ref, prop, op, "reference_boxes", "proposals");
  TORCH_CHECK(ref.dim() >= 1 && ref.size(-1) == 4, op,
              ": expected reference_boxes of shape [..., 4], got ", ref.sizes());
  TORCH_CHECK(prop.dim() >= 1 && prop.size(-1) == 4, op,
              ": expected proposals of shape [..., 4], got ", prop.sizes());
  const bool same = ref.sizes() == prop.sizes();
  const bool shared = ref.dim() == 3 && prop.dim() == 2 && ref.size(1) == prop.size(0);
  TORCH_CHECK(same || shared, op,
              ": expected proposals of the shape of reference_boxes, or proposals [N, 4] with "
              "reference_boxes [B, N, 4], got reference_boxes ", ref.sizes(), " and proposals ",
              prop.sizes());
  return prop.numel() / 4;
}

// Shapes of decode_boxes: rel_codes [N, 4k] or [B, N, 4k]; boxes [N, 4] (shared) or [B, N, 4].
struct DecodeShape {
  int64_t rows;      // B * N
  int64_t k;         // codes per box
  int64_t box_rows;  // rows of boxes: box row = row % box_rows
};

inline DecodeShape check_decode(const at::Tensor& codes, const at::Tensor& boxes, const char* op) {
  check_floating(codes, op, "rel_codes");
  check_floating(boxes, op, "boxes");
  check_same_device(codes, boxes, op, "rel_codes", "boxes");
  TORCH_CHECK((codes.dim() == 2 || codes.dim() == 3) && codes.size(-1) % 4 == 0, op,
              ": expected rel_codes of shape [N, 4k] or [B, N, 4k], got ", codes.sizes());
  TORCH_CHECK((boxes.dim() == 2 || boxes.dim() == 3) && boxes.size(-1) == 4, op,
              ": expected boxes of shape [N, 4] or [B, N, 4], got ", boxes.sizes());
  const int64_t N = codes.size(-2);
  const bool ok = boxes.size(-2) == N &&
                  (boxes.dim() == 2 || (codes.dim() == 3 && boxes.size(0) == codes.size(0)));
  TORCH_CHECK(ok, op, ": expected boxes [N, 4] or [B, N, 4] matching rel_codes ", codes.sizes(),
              ", got ", boxes.sizes());
  const int64_t rows = codes.dim() == 3 ? codes.size(0) * N : N;
  return {rows, codes.size(-1) / 4, boxes.numel() / 4};
}

inline void check_grid_anchors(const at::Tensor& cell, at::IntArrayRef cells_per_level,
                               at::IntArrayRef grid_sizes, at::IntArrayRef strides) {
  const char* op = "retina_fast::grid_anchors";
  check_boxes(cell, 2, op, "cell_anchors", "[sum(cells_per_level), 4]");
  const int64_t L = cells_per_level.size();
  TORCH_CHECK(int64_t(grid_sizes.size()) == 2 * L && int64_t(strides.size()) == 2 * L, op,
              ": expected grid_sizes and strides of length 2 * levels = ", 2 * L,
              " ((h, w) per level), got ", grid_sizes.size(), " and ", strides.size());
  int64_t total = 0;
  for (int64_t l = 0; l < L; ++l) {
    TORCH_CHECK(cells_per_level[l] >= 0 && grid_sizes[2 * l] >= 0 && grid_sizes[2 * l + 1] >= 0,
                op, ": expected non-negative cells_per_level and grid_sizes, got level ", l,
                " with ", cells_per_level[l], " cells and grid ", grid_sizes[2 * l], "x",
                grid_sizes[2 * l + 1]);
    total += cells_per_level[l];
  }
  TORCH_CHECK(total == cell.size(0), op, ": expected cell_anchors with sum(cells_per_level) = ",
              total, " rows, got ", cell.size(0));
}

// Offsets of each level's first anchor in the output, plus the total at the end.
inline std::vector<int64_t> level_offsets(at::IntArrayRef cells_per_level,
                                          at::IntArrayRef grid_sizes) {
  std::vector<int64_t> off(cells_per_level.size() + 1, 0);
  for (size_t l = 0; l < cells_per_level.size(); ++l)
    off[l + 1] = off[l] + grid_sizes[2 * l] * grid_sizes[2 * l + 1] * cells_per_level[l];
  return off;
}

}  // namespace boxes
}  // namespace retina_fast
