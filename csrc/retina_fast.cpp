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
}
