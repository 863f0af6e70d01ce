#pragma once
// Host-side argument checks shared by the CPU and CUDA focal-loss kernels.
#include <ATen/ATen.h>

#include "common/checks.h"

namespace retina_fast {
namespace focal {

enum Reduction : int64_t { kNone = 0, kMean = 1, kSum = 2 };

inline void check_common(double gamma, int64_t reduction, const char* op) {
  TORCH_CHECK(reduction == kNone || reduction == kMean || reduction == kSum, op,
              ": expected reduction 0 (none), 1 (mean) or 2 (sum), got ", reduction);
  TORCH_CHECK(gamma >= 0.0, op, ": expected gamma >= 0, got ", gamma);
}

inline void check_dense(const at::Tensor& inputs, const at::Tensor& targets, double gamma,
                        int64_t reduction, const char* op) {
  check_common(gamma, reduction, op);
  check_floating(inputs, op, "inputs");
  check_floating(targets, op, "targets");
  check_same_device(inputs, targets, op, "inputs", "targets");
  TORCH_CHECK(inputs.sizes() == targets.sizes(), op,
              ": expected targets of the same shape as inputs ", inputs.sizes(), ", got ",
              targets.sizes());
}

inline void check_labels(const at::Tensor& logits, const at::Tensor& labels, double gamma,
                         int64_t reduction, double label_smoothing, const char* op) {
  check_common(gamma, reduction, op);
  check_floating(logits, op, "logits");
  check_dim(logits, 2, op, "logits", "[N, K]");
  TORCH_CHECK(labels.scalar_type() == at::kLong, op,
              ": expected labels of dtype int64 (torch.long), got ", labels.scalar_type());
  check_dim(labels, 1, op, "labels", "[N]");
  check_same_device(logits, labels, op, "logits", "labels");
  TORCH_CHECK(labels.size(0) == logits.size(0), op, ": expected labels of shape [N] = [",
              logits.size(0), "] to match logits ", logits.sizes(), ", got ", labels.sizes());
  TORCH_CHECK(label_smoothing >= 0.0 && label_smoothing <= 1.0, op,
              ": expected label_smoothing in [0, 1], got ", label_smoothing);
}

// Optional per-row weights [N], floating, on the logits' device.
inline void check_row_weights(const c10::optional<at::Tensor>& weights, const at::Tensor& logits,
                              const char* op) {
  if (!weights.has_value()) return;
  const at::Tensor& w = *weights;
  check_floating(w, op, "weights");
  check_same_device(w, logits, op, "weights", "logits");
  TORCH_CHECK(w.dim() == 1 && w.size(0) == logits.size(0), op,
              ": expected weights of shape [N] = [", logits.size(0), "], got ", w.sizes());
}

inline void check_grad(const at::Tensor& grad, const at::Tensor& like, int64_t reduction,
                       const char* op) {
  check_same_device(grad, like, op, "grad", "inputs");
  if (reduction == kNone) {
    TORCH_CHECK(grad.sizes() == like.sizes(), op, ": expected grad of shape ", like.sizes(),
                ", got ", grad.sizes());
  } else {
    TORCH_CHECK(grad.numel() == 1, op, ": expected a scalar grad for a reduced loss, got shape ",
                grad.sizes());
  }
}

}  // namespace focal
}  // namespace retina_fast
