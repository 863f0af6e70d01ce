// CPU kernels of the sigmoid focal loss (dense targets and labels), forward and backward.
//
// Work is cut into fixed blocks of elements (or of rows, for labels) that at::parallel_for
// spreads over threads; a reduction sums each block in float lanes, then the blocks' partials
// in double, in block order: the result does not depend on the number of threads.
// float32 runs through branch-free loops the compiler vectorises (AVX-512 / AVX2 clones chosen
// at run time, csrc/common/cpu_dispatch.h); float16/bfloat16 are widened to float32 chunk by chunk;
// float64 runs the C library's functions.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <algorithm>
#include <type_traits>
#include <vector>

#include "common/cpu_dispatch.h"
#include "common/cpu_math.h"
#include "focal_loss/focal_loss_checks.h"
#include "focal_loss/focal_loss_math.h"

namespace retina_fast {
namespace focal {
namespace {

constexpr int64_t kChunk = 1024;   // elements widened / computed at once (stack buffers)
constexpr int64_t kBlock = 16384;  // elements per reduction block and per parallel task

// ---------------------------------------------------------------- float32 span kernels
// Targets are either an array `t` (dense: tce = t) or, with t == nullptr, the constants
// (tc, tcec): the modulating/alpha target and the cross-entropy target of every element of the
// span (labels: every column of a row but one shares them; they differ under label smoothing).

template <Gamma G>
HOST_DEVICE_INLINE void loss_span(const float* x, const float* t, float tc, float tcec, float* out,
                                  int64_t n, Params<float> p) {
  if (t) {
    for (int64_t i = 0; i < n; ++i) out[i] = loss<float, FastMath, G>(x[i], t[i], p);
  } else if (tc == 0.0f && tcec == 0.0f) {
    for (int64_t i = 0; i < n; ++i) out[i] = loss_t0<float, FastMath, G>(x[i], p);
  } else {
    for (int64_t i = 0; i < n; ++i) out[i] = loss<float, FastMath, G>(x[i], tc, tcec, p);
  }
}

template <Gamma G>
HOST_DEVICE_INLINE void grad_span(const float* x, const float* t, float tc, float tcec, const float* g,
                                  float gs, float* out, int64_t n, Params<float> p) {
  // out = gs * (g ? g[i] : 1) * dloss/dx
  if (t && g) {
    for (int64_t i = 0; i < n; ++i) out[i] = gs * g[i] * dloss<float, FastMath, G>(x[i], t[i], p);
  } else if (t) {
    for (int64_t i = 0; i < n; ++i) out[i] = gs * dloss<float, FastMath, G>(x[i], t[i], p);
  } else if (tc == 0.0f && tcec == 0.0f && g) {
    for (int64_t i = 0; i < n; ++i) out[i] = gs * g[i] * dloss_t0<float, FastMath, G>(x[i], p);
  } else if (tc == 0.0f && tcec == 0.0f) {
    for (int64_t i = 0; i < n; ++i) out[i] = gs * dloss_t0<float, FastMath, G>(x[i], p);
  } else if (g) {
    for (int64_t i = 0; i < n; ++i) out[i] = gs * g[i] * dloss<float, FastMath, G>(x[i], tc, tcec, p);
  } else {
    for (int64_t i = 0; i < n; ++i) out[i] = gs * dloss<float, FastMath, G>(x[i], tc, tcec, p);
  }
}

// Both gradients of the dense form: d/dx into ox, d/dt into ot (each times gs * g[i]).
template <Gamma G>
HOST_DEVICE_INLINE void grad2_span(const float* x, const float* t, const float* g, float gs, float* ox,
                                   float* ot, int64_t n, Params<float> p) {
  for (int64_t i = 0; i < n; ++i) {
    const float s = g ? gs * g[i] : gs;
    ox[i] = s * dloss<float, FastMath, G>(x[i], t[i], p);
    ot[i] = s * dloss_dt<float, FastMath, G>(x[i], t[i], p);
  }
}

// Runs __VA_ARGS__ as span<G>(...) with G the call's Gamma kind. An explicit switch, not a
// lambda: the span loops must inline into each clone before vectorisation, so each clone
// (AVX-512, AVX2, baseline) gets its own vector width.
#define RF_SPAN_SWITCH(kind, span, ...)                                  \
  switch (kind) {                                                         \
    case Gamma::Two: span<Gamma::Two>(__VA_ARGS__); break;                \
    case Gamma::Zero: span<Gamma::Zero>(__VA_ARGS__); break;              \
    case Gamma::One: span<Gamma::One>(__VA_ARGS__); break;                \
    default: span<Gamma::General>(__VA_ARGS__); break;                    \
  }

HOST_DEVICE_INLINE void loss_span_f32_impl(const float* x, const float* t, float tc, float tcec, float* out,
                                    int64_t n, float alpha, float gamma, Gamma kind) {
  const Params<float> p{alpha, gamma};
  RF_SPAN_SWITCH(kind, loss_span, x, t, tc, tcec, out, n, p)
}
RF_CPU_DISPATCH(void, loss_span_f32,
                (const float* x, const float* t, float tc, float tcec, float* out, int64_t n,
                float alpha, float gamma, Gamma kind),
                (x, t, tc, tcec, out, n, alpha, gamma, kind))

HOST_DEVICE_INLINE void grad_span_f32_impl(const float* x, const float* t, float tc, float tcec, const float* g,
                                    float gs, float* out, int64_t n, float alpha, float gamma,
                                    Gamma kind) {
  const Params<float> p{alpha, gamma};
  RF_SPAN_SWITCH(kind, grad_span, x, t, tc, tcec, g, gs, out, n, p)
}
RF_CPU_DISPATCH(void, grad_span_f32,
                (const float* x, const float* t, float tc, float tcec, const float* g, float gs,
                float* out, int64_t n, float alpha, float gamma, Gamma kind),
                (x, t, tc, tcec, g, gs, out, n, alpha, gamma, kind))

HOST_DEVICE_INLINE void grad2_span_f32_impl(const float* x, const float* t, const float* g, float gs, float* ox,
                                     float* ot, int64_t n, float alpha, float gamma, Gamma kind) {
  const Params<float> p{alpha, gamma};
  RF_SPAN_SWITCH(kind, grad2_span, x, t, g, gs, ox, ot, n, p)
}
RF_CPU_DISPATCH(void, grad2_span_f32,
                (const float* x, const float* t, const float* g, float gs, float* ox, float* ot,
                int64_t n, float alpha, float gamma, Gamma kind),
                (x, t, g, gs, ox, ot, n, alpha, gamma, kind))

// Sum of n floats in 16 independent lanes (vectorisable without reassociation), then double.
HOST_DEVICE_INLINE double sum_span_f32_impl(const float* v, int64_t n) {
  float lanes[16] = {0.f};
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) {
    for (int j = 0; j < 16; ++j) lanes[j] += v[i + j];
  }
  double s = 0.0;
  for (int j = 0; j < 16; ++j) s += lanes[j];
  for (; i < n; ++i) s += v[i];
  return s;
}
RF_CPU_DISPATCH(double, sum_span_f32, (const float* v, int64_t n), (v, n))

// ---------------------------------------------------------------- per-dtype chunk adapters
// acc_t: float for float/half/bfloat16, double for double.
template <typename scalar_t>
using acc_type = std::conditional_t<std::is_same<scalar_t, double>::value, double, float>;

template <typename scalar_t>
struct Chunk {
  using acc_t = acc_type<scalar_t>;

  // losses of x[0:n] (targets t, or the constants tc / tcec, see loss_span) into out[0:n],
  // n <= kChunk
  static void loss(const scalar_t* x, const scalar_t* t, acc_t tc, acc_t tcec, acc_t* out, int64_t n,
                   double alpha, double gamma, Gamma kind) {
    if constexpr (std::is_same<scalar_t, double>::value) {
      const Params<double> p{alpha, gamma};
      RETINA_FAST_DISPATCH_GAMMA(kind, G, [&] {
        for (int64_t i = 0; i < n; ++i)
          out[i] = t ? focal::loss<double, StdMath, G>(x[i], t[i], p)
                     : focal::loss<double, StdMath, G>(x[i], tc, tcec, p);
      });
    } else if constexpr (std::is_same<scalar_t, float>::value) {
      loss_span_f32(x, t, tc, tcec, out, n, float(alpha), float(gamma), kind);
    } else {
      float xb[kChunk], tb[kChunk];
      widen(x, xb, n);
      if (t) widen(t, tb, n);
      loss_span_f32(xb, t ? tb : nullptr, tc, tcec, out, n, float(alpha), float(gamma), kind);
    }
  }

  // gs * (g ? g[i] : 1) * dloss/dx into out[0:n]
  static void grad(const scalar_t* x, const scalar_t* t, acc_t tc, acc_t tcec, const scalar_t* g,
                   acc_t gs, acc_t* out, int64_t n, double alpha, double gamma, Gamma kind) {
    if constexpr (std::is_same<scalar_t, double>::value) {
      const Params<double> p{alpha, gamma};
      RETINA_FAST_DISPATCH_GAMMA(kind, G, [&] {
        for (int64_t i = 0; i < n; ++i)
          out[i] = gs * (g ? g[i] : 1.0) *
                   (t ? focal::dloss<double, StdMath, G>(x[i], t[i], p)
                      : focal::dloss<double, StdMath, G>(x[i], tc, tcec, p));
      });
    } else if constexpr (std::is_same<scalar_t, float>::value) {
      grad_span_f32(x, t, tc, tcec, g, gs, out, n, float(alpha), float(gamma), kind);
    } else {
      float xb[kChunk], tb[kChunk], gb[kChunk];
      widen(x, xb, n);
      if (t) widen(t, tb, n);
      if (g) widen(g, gb, n);
      grad_span_f32(xb, t ? tb : nullptr, tc, tcec, g ? gb : nullptr, gs, out, n, float(alpha),
                    float(gamma), kind);
    }
  }

  // dense form, both gradients: gs * (g ? g[i] : 1) * dloss/dx into ox, * dloss/dt into ot
  static void grad2(const scalar_t* x, const scalar_t* t, const scalar_t* g, acc_t gs, acc_t* ox,
                    acc_t* ot, int64_t n, double alpha, double gamma, Gamma kind) {
    if constexpr (std::is_same<scalar_t, double>::value) {
      const Params<double> p{alpha, gamma};
      RETINA_FAST_DISPATCH_GAMMA(kind, G, [&] {
        for (int64_t i = 0; i < n; ++i) {
          const double s = gs * (g ? g[i] : 1.0);
          ox[i] = s * focal::dloss<double, StdMath, G>(x[i], t[i], p);
          ot[i] = s * focal::dloss_dt<double, StdMath, G>(x[i], t[i], p);
        }
      });
    } else if constexpr (std::is_same<scalar_t, float>::value) {
      grad2_span_f32(x, t, g, gs, ox, ot, n, float(alpha), float(gamma), kind);
    } else {
      float xb[kChunk], tb[kChunk], gb[kChunk];
      widen(x, xb, n);
      widen(t, tb, n);
      if (g) widen(g, gb, n);
      grad2_span_f32(xb, tb, g ? gb : nullptr, gs, ox, ot, n, float(alpha), float(gamma), kind);
    }
  }

  static void widen(const scalar_t* v, float* out, int64_t n) {
    for (int64_t i = 0; i < n; ++i) out[i] = float(v[i]);
  }

  static double sum(const acc_t* v, int64_t n) {
    if constexpr (std::is_same<acc_t, float>::value) {
      return sum_span_f32(v, n);
    } else {
      double s = 0.0;
      for (int64_t i = 0; i < n; ++i) s += v[i];
      return s;
    }
  }

  static void store(const acc_t* v, scalar_t* out, int64_t n) {
    for (int64_t i = 0; i < n; ++i) out[i] = static_cast<scalar_t>(v[i]);
  }
};

double sum_partials(const std::vector<double>& partials) {
  double s = 0.0;
  for (double v : partials) s += v;
  return s;
}

// ---------------------------------------------------------------- dense targets

at::Tensor dense_forward_cpu(const at::Tensor& inputs, const at::Tensor& targets, double alpha,
                             double gamma, int64_t reduction) {
  const char* op = "retina_fast::sigmoid_focal_loss";
  check_dense(inputs, targets, gamma, reduction, op);
  const at::Tensor x = inputs.contiguous();
  const at::Tensor t = targets.to(inputs.scalar_type()).contiguous();
  const int64_t n = x.numel();
  const Gamma kind = gamma_kind(gamma);
  at::Tensor out = reduction == kNone ? at::empty_like(x) : at::Tensor();
  const int64_t nblocks = (n + kBlock - 1) / kBlock;
  std::vector<double> partials(reduction == kNone ? 0 : nblocks, 0.0);

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "focal_fwd_cpu", [&] {
    using C = Chunk<scalar_t>;
    using acc_t = typename C::acc_t;
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    const scalar_t* tp = t.const_data_ptr<scalar_t>();
    scalar_t* op_ = out.defined() ? out.mutable_data_ptr<scalar_t>() : nullptr;
    at::parallel_for(0, nblocks, 1, [&](int64_t b0, int64_t b1) {
      acc_t buf[kChunk];
      for (int64_t b = b0; b < b1; ++b) {
        const int64_t end = std::min(n, (b + 1) * kBlock);
        double acc = 0.0;
        for (int64_t i = b * kBlock; i < end; i += kChunk) {
          const int64_t len = std::min(kChunk, end - i);
          C::loss(xp + i, tp + i, acc_t(0), acc_t(0), buf, len, alpha, gamma, kind);
          if (op_) C::store(buf, op_ + i, len);
          else acc += C::sum(buf, len);
        }
        if (!op_) partials[b] = acc;
      }
    });
  });
  if (reduction == kNone) return out;
  double total = sum_partials(partials);
  if (reduction == kMean) total /= double(n);  // n == 0: NaN, as torch.mean of nothing
  return at::scalar_tensor(total, x.options());
}

at::Tensor dense_backward_cpu(const at::Tensor& grad, const at::Tensor& inputs,
                              const at::Tensor& targets, double alpha, double gamma,
                              int64_t reduction) {
  const char* op = "retina_fast::sigmoid_focal_loss_backward";
  check_dense(inputs, targets, gamma, reduction, op);
  check_grad(grad, inputs, reduction, op);
  const at::Tensor x = inputs.contiguous();
  const at::Tensor t = targets.to(inputs.scalar_type()).contiguous();
  const int64_t n = x.numel();
  const Gamma kind = gamma_kind(gamma);
  at::Tensor gin = at::empty_like(x);
  if (n == 0) return gin;
  at::Tensor g = reduction == kNone ? grad.to(x.scalar_type()).contiguous() : at::Tensor();
  double gscale = 1.0;
  if (reduction != kNone) {
    gscale = grad.item<double>();
    if (reduction == kMean) gscale /= double(n);
  }
  const int64_t nblocks = (n + kBlock - 1) / kBlock;

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "focal_bwd_cpu", [&] {
    using C = Chunk<scalar_t>;
    using acc_t = typename C::acc_t;
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    const scalar_t* tp = t.const_data_ptr<scalar_t>();
    const scalar_t* gp = g.defined() ? g.const_data_ptr<scalar_t>() : nullptr;
    scalar_t* out = gin.mutable_data_ptr<scalar_t>();
    at::parallel_for(0, nblocks, 1, [&](int64_t b0, int64_t b1) {
      acc_t buf[kChunk];
      for (int64_t i = b0 * kBlock, end = std::min(n, b1 * kBlock); i < end; i += kChunk) {
        const int64_t len = std::min(kChunk, end - i);
        C::grad(xp + i, tp + i, acc_t(0), acc_t(0), gp ? gp + i : nullptr, acc_t(gscale), buf, len,
                alpha, gamma, kind);
        C::store(buf, out + i, len);
      }
    });
  });
  return gin;
}

// Both gradients of the dense form: (d/d inputs, d/d targets), targets' in the targets' dtype.
std::tuple<at::Tensor, at::Tensor> dense_backward_with_targets_cpu(
    const at::Tensor& grad, const at::Tensor& inputs, const at::Tensor& targets, double alpha,
    double gamma, int64_t reduction) {
  const char* op = "retina_fast::sigmoid_focal_loss_backward_with_targets";
  check_dense(inputs, targets, gamma, reduction, op);
  check_grad(grad, inputs, reduction, op);
  const at::Tensor x = inputs.contiguous();
  const at::Tensor t = targets.to(inputs.scalar_type()).contiguous();
  const int64_t n = x.numel();
  const Gamma kind = gamma_kind(gamma);
  at::Tensor gin = at::empty_like(x), gt = at::empty_like(x);
  if (n == 0) return {gin, gt.to(targets.scalar_type())};
  at::Tensor g = reduction == kNone ? grad.to(x.scalar_type()).contiguous() : at::Tensor();
  double gscale = 1.0;
  if (reduction != kNone) {
    gscale = grad.item<double>();
    if (reduction == kMean) gscale /= double(n);
  }
  const int64_t nblocks = (n + kBlock - 1) / kBlock;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "focal_bwd2_cpu", [&] {
    using C = Chunk<scalar_t>;
    using acc_t = typename C::acc_t;
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    const scalar_t* tp = t.const_data_ptr<scalar_t>();
    const scalar_t* gp = g.defined() ? g.const_data_ptr<scalar_t>() : nullptr;
    scalar_t* ox = gin.mutable_data_ptr<scalar_t>();
    scalar_t* ot = gt.mutable_data_ptr<scalar_t>();
    at::parallel_for(0, nblocks, 1, [&](int64_t b0, int64_t b1) {
      acc_t bx[kChunk], bt[kChunk];
      for (int64_t i = b0 * kBlock, end = std::min(n, b1 * kBlock); i < end; i += kChunk) {
        const int64_t len = std::min(kChunk, end - i);
        C::grad2(xp + i, tp + i, gp ? gp + i : nullptr, acc_t(gscale), bx, bt, len, alpha, gamma, kind);
        C::store(bx, ox + i, len);
        C::store(bt, ot + i, len);
      }
    });
  });
  return {gin, gt.to(targets.scalar_type())};
}

// ---------------------------------------------------------------- labels

struct LabelTargets {
  // cross-entropy target of the labelled class and of every other class (the modulating
  // factor and alpha see the unsmoothed 1 and 0: see focal_loss_math.h)
  double pos, neg;
};

inline LabelTargets label_targets(double label_smoothing) {
  return {1.0 - 0.5 * label_smoothing, 0.5 * label_smoothing};
}

// Rows per block: ~kBlock elements, at least one row.
inline int64_t rows_per_block(int64_t K) { return std::max<int64_t>(1, kBlock / std::max<int64_t>(K, 1)); }

[[noreturn]] void bad_label(const char* op, int64_t row, int64_t label, int64_t K) {
  TORCH_CHECK(false, op, ": expected every label in [0, K) = [0, ", K,
              ") (foreground), -1 (background) or -2 (ignored), got labels[", row, "] = ",
              label);
}

// Number of rows whose label is not `ignore`, validating every label on the way.
int64_t count_valid_rows(const int64_t* lp, int64_t N, int64_t K, const char* op) {
  int64_t valid = 0;
  for (int64_t r = 0; r < N; ++r) {
    const int64_t l = lp[r];
    if (l < kIgnore || l >= K) bad_label(op, r, l, K);
    valid += l != kIgnore;
  }
  return valid;
}

at::Tensor labels_forward_cpu(const at::Tensor& logits, const at::Tensor& labels,
                              const c10::optional<at::Tensor>& weights, double alpha, double gamma,
                              int64_t reduction, double label_smoothing) {
  const char* op = "retina_fast::sigmoid_focal_loss_labels";
  check_labels(logits, labels, gamma, reduction, label_smoothing, op);
  check_row_weights(weights, logits, op);
  const at::Tensor x = logits.contiguous();
  const at::Tensor lab = labels.contiguous();
  const at::Tensor w = weights.has_value() ? weights->to(at::kDouble).contiguous() : at::Tensor();
  const int64_t N = x.size(0), K = x.size(1);
  const Gamma kind = gamma_kind(gamma);
  const LabelTargets tg = label_targets(label_smoothing);
  at::Tensor out = reduction == kNone ? at::empty_like(x) : at::Tensor();
  const int64_t rpb = rows_per_block(K);
  const int64_t nblocks = (N + rpb - 1) / rpb;
  std::vector<double> partials(nblocks, 0.0);
  std::vector<int64_t> valid(nblocks, 0);

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "focal_labels_fwd_cpu", [&] {
    using C = Chunk<scalar_t>;
    using acc_t = typename C::acc_t;
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    const int64_t* lp = lab.const_data_ptr<int64_t>();
    const double* wp = w.defined() ? w.const_data_ptr<double>() : nullptr;
    scalar_t* op_ = out.defined() ? out.mutable_data_ptr<scalar_t>() : nullptr;
    at::parallel_for(0, nblocks, 1, [&](int64_t b0, int64_t b1) {
      acc_t buf[kChunk];
      for (int64_t b = b0; b < b1; ++b) {
        double acc = 0.0;
        int64_t nvalid = 0;
        for (int64_t r = b * rpb, rend = std::min(N, (b + 1) * rpb); r < rend; ++r) {
          const int64_t l = lp[r];
          if (l < kIgnore || l >= K) bad_label(op, r, l, K);
          const scalar_t* xr = xp + r * K;
          if (l == kIgnore) {
            if (op_) std::fill(op_ + r * K, op_ + (r + 1) * K, scalar_t(0));
            continue;
          }
          ++nvalid;
          for (int64_t c = 0; c < K; c += kChunk) {
            const int64_t len = std::min(kChunk, K - c);
            C::loss(xr + c, nullptr, acc_t(0), acc_t(tg.neg), buf, len, alpha, gamma, kind);
            if (l >= c && l < c + len) {
              C::loss(xr + l, nullptr, acc_t(1), acc_t(tg.pos), buf + (l - c), 1, alpha, gamma, kind);
            }
            if (op_) {
              if (wp) {
                const acc_t wr = acc_t(wp[r]);
                for (int64_t i = 0; i < len; ++i) buf[i] *= wr;
              }
              C::store(buf, op_ + r * K + c, len);
            } else {
              acc += (wp ? wp[r] : 1.0) * C::sum(buf, len);
            }
          }
        }
        partials[b] = acc;
        valid[b] = nvalid;
      }
    });
  });
  if (reduction == kNone) return out;
  double total = sum_partials(partials);
  if (reduction == kMean) {
    int64_t nvalid = 0;
    for (int64_t v : valid) nvalid += v;
    total /= double(nvalid) * double(K);  // nothing valid: 0 / 0 = NaN, as torch.mean
  }
  // A sum over 10^7 half elements overflows half: reduced results are float32 (or float64).
  return at::scalar_tensor(total, x.options().dtype(x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat));
}

at::Tensor labels_backward_cpu(const at::Tensor& grad, const at::Tensor& logits,
                               const at::Tensor& labels, const c10::optional<at::Tensor>& weights,
                               double alpha, double gamma, int64_t reduction,
                               double label_smoothing) {
  const char* op = "retina_fast::sigmoid_focal_loss_labels_backward";
  check_labels(logits, labels, gamma, reduction, label_smoothing, op);
  check_row_weights(weights, logits, op);
  check_grad(grad, logits, reduction, op);
  const at::Tensor x = logits.contiguous();
  const at::Tensor lab = labels.contiguous();
  const at::Tensor w = weights.has_value() ? weights->to(at::kDouble).contiguous() : at::Tensor();
  const int64_t N = x.size(0), K = x.size(1);
  const Gamma kind = gamma_kind(gamma);
  const LabelTargets tg = label_targets(label_smoothing);
  at::Tensor gin = at::empty_like(x);
  if (N == 0 || K == 0) return gin;
  at::Tensor g = reduction == kNone ? grad.to(x.scalar_type()).contiguous() : at::Tensor();
  double gscale = 1.0;
  if (reduction != kNone) {
    gscale = grad.item<double>();
    if (reduction == kMean) {
      gscale /= double(count_valid_rows(lab.const_data_ptr<int64_t>(), N, K, op)) * double(K);
    }
  }
  const int64_t rpb = rows_per_block(K);
  const int64_t nblocks = (N + rpb - 1) / rpb;

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "focal_labels_bwd_cpu", [&] {
    using C = Chunk<scalar_t>;
    using acc_t = typename C::acc_t;
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    const scalar_t* gp = g.defined() ? g.const_data_ptr<scalar_t>() : nullptr;
    const int64_t* lp = lab.const_data_ptr<int64_t>();
    const double* wp = w.defined() ? w.const_data_ptr<double>() : nullptr;
    scalar_t* out = gin.mutable_data_ptr<scalar_t>();
    at::parallel_for(0, nblocks, 1, [&](int64_t b0, int64_t b1) {
      acc_t buf[kChunk];
      for (int64_t r = b0 * rpb, rend = std::min(N, b1 * rpb); r < rend; ++r) {
        const int64_t l = lp[r];
        if (l < kIgnore || l >= K) bad_label(op, r, l, K);
        scalar_t* orow = out + r * K;
        if (l == kIgnore) {  // ignored anchors: zero gradient, whatever the logits hold
          std::fill(orow, orow + K, scalar_t(0));
          continue;
        }
        const scalar_t* xr = xp + r * K;
        const scalar_t* gr = gp ? gp + r * K : nullptr;
        const acc_t gs = acc_t(wp ? gscale * wp[r] : gscale);
        for (int64_t c = 0; c < K; c += kChunk) {
          const int64_t len = std::min(kChunk, K - c);
          C::grad(xr + c, nullptr, acc_t(0), acc_t(tg.neg), gr ? gr + c : nullptr, gs, buf, len, alpha,
                  gamma, kind);
          if (l >= c && l < c + len) {
            C::grad(xr + l, nullptr, acc_t(1), acc_t(tg.pos), gr ? gr + l : nullptr, gs, buf + (l - c), 1,
                    alpha, gamma, kind);
          }
          C::store(buf, orow + c, len);
        }
      }
    });
  });
  return gin;
}

}  // namespace

TORCH_LIBRARY_IMPL(retina_fast, CPU, m) {
  m.impl("sigmoid_focal_loss", &dense_forward_cpu);
  m.impl("sigmoid_focal_loss_backward", &dense_backward_cpu);
  m.impl("sigmoid_focal_loss_backward_with_targets", &dense_backward_with_targets_cpu);
  m.impl("sigmoid_focal_loss_labels", &labels_forward_cpu);
  m.impl("sigmoid_focal_loss_labels_backward", &labels_backward_cpu);
}

}  // namespace focal
}  // namespace retina_fast
