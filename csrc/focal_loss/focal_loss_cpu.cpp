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
#include <cstdlib>
#include <type_traits>
#include <vector>

#include "common/cpu_block_cache.h"
#include "common/cpu_dispatch.h"
#include "common/cpu_math.h"
#include "focal_loss/focal_loss_checks.h"
#include "focal_loss/focal_loss_math.h"

namespace retina_fast {
namespace focal {
namespace {

constexpr int64_t kChunk = 1024;   // dense form: elements computed (and summed) at once
constexpr int64_t kSpan = 4096;    // labels form: whole rows computed at once (stack buffers)
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

// Loss into lo and gs * dloss/dx into go from one sigmoid per element (the forward of a loss
// whose gradient is needed). Targets as in loss_span.
template <Gamma G>
HOST_DEVICE_INLINE void fused_span(const float* x, const float* t, float tc, float tcec, float* lo,
                                   float* go, float gs, int64_t n, Params<float> p) {
  if (t) {
    for (int64_t i = 0; i < n; ++i) {
      float l, d;
      loss_and_dloss<float, FastMath, G>(x[i], t[i], t[i], p, l, d);
      lo[i] = l;
      go[i] = gs * d;
    }
  } else if (tc == 0.0f && tcec == 0.0f) {
    for (int64_t i = 0; i < n; ++i) {
      float l, d;
      loss_and_dloss_t0<float, FastMath, G>(x[i], p, l, d);
      lo[i] = l;
      go[i] = gs * d;
    }
  } else {
    for (int64_t i = 0; i < n; ++i) {
      float l, d;
      loss_and_dloss<float, FastMath, G>(x[i], tc, tcec, p, l, d);
      lo[i] = l;
      go[i] = gs * d;
    }
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
    case Gamma::OneAndHalf: span<Gamma::OneAndHalf>(__VA_ARGS__); break;  \
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

HOST_DEVICE_INLINE void fused_span_f32_impl(const float* x, const float* t, float tc, float tcec, float* lo,
                                     float* go, float gs, int64_t n, float alpha, float gamma,
                                     Gamma kind) {
  const Params<float> p{alpha, gamma};
  RF_SPAN_SWITCH(kind, fused_span, x, t, tc, tcec, lo, go, gs, n, p)
}
RF_CPU_DISPATCH(void, fused_span_f32,
                (const float* x, const float* t, float tc, float tcec, float* lo, float* go,
                float gs, int64_t n, float alpha, float gamma, Gamma kind),
                (x, t, tc, tcec, lo, go, gs, n, alpha, gamma, kind))

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

// sum_span_f32 of each of `rows` rows of K floats.
HOST_DEVICE_INLINE void row_sums_f32_impl(const float* v, int64_t rows, int64_t K, double* sums) {
  for (int64_t r = 0; r < rows; ++r) sums[r] = sum_span_f32_impl(v + r * K, K);
}
RF_CPU_DISPATCH(void, row_sums_f32, (const float* v, int64_t rows, int64_t K, double* sums),
                (v, rows, K, sums))

// v[r, j] = (s[r] * g[r, j]) * v[r, j] (g == nullptr: s[r] * v[r, j]) over rows of K floats.
HOST_DEVICE_INLINE void scale_rows_f32_impl(float* v, const float* g, const float* s, int64_t rows,
                                     int64_t K) {
  for (int64_t r = 0; r < rows; ++r) {
    float* vr = v + r * K;
    const float sr = s[r];
    if (g) {
      const float* gr = g + r * K;
      for (int64_t j = 0; j < K; ++j) vr[j] = (sr * gr[j]) * vr[j];
    } else {
      for (int64_t j = 0; j < K; ++j) vr[j] = sr * vr[j];
    }
  }
}
RF_CPU_DISPATCH(void, scale_rows_f32, (float* v, const float* g, const float* s, int64_t rows, int64_t K),
                (v, g, s, rows, K))

// ---------------------------------------------------------------- per-dtype chunk adapters
// acc_t: float for float/half/bfloat16, double for double.
template <typename scalar_t>
using acc_type = std::conditional_t<std::is_same<scalar_t, double>::value, double, float>;

template <typename scalar_t>
struct Chunk {
  using acc_t = acc_type<scalar_t>;

  // losses of x[0:n] (targets t, or the constants tc / tcec, see loss_span) into out[0:n],
  // n <= kSpan
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
      float xb[kSpan], tb[kSpan];
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
      float xb[kSpan], tb[kSpan], gb[kSpan];
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

  // loss into lo, gs * dloss/dx into go, from one sigmoid per element (targets as in loss)
  static void fused(const scalar_t* x, const scalar_t* t, acc_t tc, acc_t tcec, acc_t* lo, acc_t* go,
                    acc_t gs, int64_t n, double alpha, double gamma, Gamma kind) {
    if constexpr (std::is_same<scalar_t, double>::value) {
      const Params<double> p{alpha, gamma};
      RETINA_FAST_DISPATCH_GAMMA(kind, G, [&] {
        for (int64_t i = 0; i < n; ++i) {
          double l, d;
          if (t) focal::loss_and_dloss<double, StdMath, G>(x[i], t[i], t[i], p, l, d);
          else focal::loss_and_dloss<double, StdMath, G>(x[i], tc, tcec, p, l, d);
          lo[i] = l;
          go[i] = gs * d;
        }
      });
    } else if constexpr (std::is_same<scalar_t, float>::value) {
      fused_span_f32(x, t, tc, tcec, lo, go, gs, n, float(alpha), float(gamma), kind);
    } else {
      float xb[kSpan], tb[kSpan];
      widen(x, xb, n);
      if (t) widen(t, tb, n);
      fused_span_f32(xb, t ? tb : nullptr, tc, tcec, lo, go, gs, n, float(alpha), float(gamma), kind);
    }
  }

  static void row_sums(const acc_t* v, int64_t rows, int64_t K, double* sums) {
    if constexpr (std::is_same<acc_t, float>::value) {
      row_sums_f32(v, rows, K, sums);
    } else {
      for (int64_t r = 0; r < rows; ++r) sums[r] = sum(v + r * K, K);
    }
  }

  // v[r, j] = (s[r] * g[r, j]) * v[r, j], or s[r] * v[r, j] without g (g in acc_t)
  static void scale_rows(acc_t* v, const acc_t* g, const acc_t* s, int64_t rows, int64_t K) {
    if constexpr (std::is_same<acc_t, float>::value) {
      scale_rows_f32(v, g, s, rows, K);
    } else {
      for (int64_t r = 0; r < rows; ++r)
        for (int64_t j = 0; j < K; ++j)
          v[r * K + j] = g ? (s[r] * g[r * K + j]) * v[r * K + j] : s[r] * v[r * K + j];
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

// A gradient-sized output ([N, K], tens of MB), once per training step: on 2 MB pages, from
// a cache of freed blocks that are touched already (common/cpu_block_cache.h). A fresh
// allocation this large pays the first touch of every page at every call: 1.8 ns per float32
// element with 4 kB pages here (more than the focal loss math, ~1.5 ns), 0.35 ns with huge
// pages, ~0 from the cache (benchmarks/bench_focal_floor.py, bench_focal_loss.py). Small
// outputs get at::empty.
at::Tensor empty_output_like(const at::Tensor& like) { return cached_empty_like(like); }

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
  at::Tensor out = reduction == kNone ? empty_output_like(x) : at::Tensor();
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
  at::Tensor gin = empty_output_like(x);
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
  at::Tensor gin = empty_output_like(x), gt = empty_output_like(x);
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

// One pass of the labels form over logits [N, K]: any of the reduced loss (per-block partial
// sums), the unreduced loss, and the gradient (times gscale, the row weight and, for the
// unreduced backward, the upstream gradient).
struct LabelsPass {
  const int64_t* lab;  // [N]
  const double* w;     // [N] row weights, or nullptr
  int64_t N, K;
  double alpha, gamma;
  Gamma kind;
  LabelTargets tg;
  bool sum;          // per-block partial sums of the (weighted) loss
  void* loss_out;    // [N, K] weighted losses (reduction 'none'), or nullptr
  void* grad_out;    // [N, K] gradient, or nullptr
  const void* g;     // [N, K] upstream gradient (backward of 'none'), or nullptr
  double gscale;     // gradient scale: upstream scalar, divided by the count for 'mean'
  const char* op;
};

// Rows are processed in groups of whole rows that are contiguous in memory (up to kSpan
// elements; a row longer than that is cut into column chunks): one span call computes every
// element at the background target, a second one the group's labelled elements (gathered into
// a contiguous buffer, so they too run on the vector path: one span call per labelled element
// cost ~25 ns a foreground row, 16 % of the kernel at 98 % foreground), which are scattered
// back; then each row is summed, scaled or zeroed. Few calls per group, so the per-element math dominates
// (benchmarks/bench_focal_floor.py measures how close it gets to the math alone). Sums per
// row (16 float lanes, then double) and per block in a fixed order: independent of threads.
template <typename scalar_t>
void labels_pass(const scalar_t* xp, const LabelsPass& P, std::vector<double>& partials,
                 std::vector<int64_t>& valid) {
  using C = Chunk<scalar_t>;
  using acc_t = typename C::acc_t;
  constexpr bool kDirect = std::is_same<acc_t, scalar_t>::value;  // gradient computed in place
  const int64_t N = P.N, K = P.K;
  const int64_t rpb = rows_per_block(K);
  const int64_t nblocks = (N + rpb - 1) / rpb;
  const int64_t group_rows = K == 0 ? rpb : (K <= kSpan ? kSpan / K : 1);
  const acc_t tneg = acc_t(P.tg.neg), tpos = acc_t(P.tg.pos);
  const bool want_loss = P.sum || P.loss_out;
  const bool want_grad = P.grad_out != nullptr;
  scalar_t* lo = static_cast<scalar_t*>(P.loss_out);
  scalar_t* go = static_cast<scalar_t*>(P.grad_out);
  const scalar_t* gu = static_cast<const scalar_t*>(P.g);
  at::parallel_for(0, nblocks, 1, [&](int64_t b0, int64_t b1) {
    std::vector<acc_t> lbuf(want_loss ? kSpan : 0), gbuf(want_grad && !kDirect ? kSpan : 0);
    std::vector<acc_t> ubuf(gu && !kDirect ? kSpan : 0);
    std::vector<acc_t> scale(want_grad || P.w ? kSpan : 0);
    std::vector<double> sums(P.sum ? kSpan : 0);
    std::vector<uint8_t> ignored(kSpan);
    // the group's labelled elements: offsets within the group, logits, loss and gradient
    std::vector<int64_t> fgj(kSpan);
    std::vector<scalar_t> fgx(kSpan);
    std::vector<acc_t> fgl(want_loss ? kSpan : 0), fgg(want_grad ? kSpan : 0);
    for (int64_t b = b0; b < b1; ++b) {
      double acc = 0.0;
      int64_t nvalid = 0;
      const int64_t rend = std::min(N, (b + 1) * rpb);
      for (int64_t r = b * rpb; r < rend;) {
        const int64_t nr = std::min(group_rows, rend - r);
        for (int64_t c0 = 0; c0 < K || (K == 0 && c0 == 0); c0 += kSpan) {
          const int64_t len = K <= kSpan ? K : std::min(kSpan, K - c0);
          const int64_t n = nr * len, base = r * K + c0;  // nr == 1 or len == K: contiguous
          acc_t* gd = nullptr;
          if (want_grad) gd = kDirect ? reinterpret_cast<acc_t*>(go + base) : gbuf.data();
          if (want_loss && want_grad)
            C::fused(xp + base, nullptr, acc_t(0), tneg, lbuf.data(), gd, acc_t(1), n, P.alpha, P.gamma, P.kind);
          else if (want_loss)
            C::loss(xp + base, nullptr, acc_t(0), tneg, lbuf.data(), n, P.alpha, P.gamma, P.kind);
          else
            C::grad(xp + base, nullptr, acc_t(0), tneg, nullptr, acc_t(1), gd, n, P.alpha, P.gamma, P.kind);
          bool any_ignored = false;
          int64_t nfg = 0;
          for (int64_t i = 0; i < nr; ++i) {
            const int64_t row = r + i, l = P.lab[row];
            if (l < kIgnore || l >= K) bad_label(P.op, row, l, K);
            ignored[i] = l == kIgnore;
            any_ignored = any_ignored || l == kIgnore;
            if (l == kIgnore) continue;
            if (c0 == 0) ++nvalid;
            const double wr = P.w ? P.w[row] : 1.0;
            if (want_grad) scale[i] = acc_t(P.gscale * wr);
            else if (P.w) scale[i] = acc_t(wr);
            if (l < c0 || l >= c0 + len) continue;
            const int64_t j = i * len + (l - c0);  // the labelled element, within the group
            fgj[nfg] = j;
            fgx[nfg++] = xp[base + j];
          }
          if (nfg > 0) {  // the labelled elements at the foreground target, in one span call
            if (want_loss && want_grad)
              C::fused(fgx.data(), nullptr, acc_t(1), tpos, fgl.data(), fgg.data(), acc_t(1), nfg, P.alpha, P.gamma, P.kind);
            else if (want_loss)
              C::loss(fgx.data(), nullptr, acc_t(1), tpos, fgl.data(), nfg, P.alpha, P.gamma, P.kind);
            else
              C::grad(fgx.data(), nullptr, acc_t(1), tpos, nullptr, acc_t(1), fgg.data(), nfg, P.alpha, P.gamma, P.kind);
            for (int64_t k = 0; k < nfg; ++k) {
              if (want_loss) lbuf[fgj[k]] = fgl[k];
              if (want_grad) gd[fgj[k]] = fgg[k];
            }
          }
          if (P.sum) {
            C::row_sums(lbuf.data(), nr, len, sums.data());
            for (int64_t i = 0; i < nr; ++i)
              if (!ignored[i]) acc += (P.w ? P.w[r + i] : 1.0) * sums[i];
          }
          if (lo) {
            if (P.w) C::scale_rows(lbuf.data(), nullptr, scale.data(), nr, len);
            for (int64_t i = 0; i < nr && any_ignored; ++i)
              if (ignored[i]) std::fill(&lbuf[i * len], &lbuf[(i + 1) * len], acc_t(0));
            C::store(lbuf.data(), lo + base, n);
          }
          if (want_grad) {
            const acc_t* up = nullptr;
            if (gu) {
              if constexpr (kDirect) {
                up = reinterpret_cast<const acc_t*>(gu + base);
              } else {
                C::widen(gu + base, ubuf.data(), n);
                up = ubuf.data();
              }
            }
            for (int64_t i = 0; i < nr; ++i)
              if (ignored[i]) scale[i] = acc_t(0);
            C::scale_rows(gd, up, scale.data(), nr, len);
            // ignored rows: zero, whatever the logits hold (0 * NaN would not be)
            for (int64_t i = 0; i < nr && any_ignored; ++i)
              if (ignored[i]) std::fill(gd + i * len, gd + (i + 1) * len, acc_t(0));
            if constexpr (!kDirect) C::store(gd, go + base, n);
          }
          if (K == 0) break;
        }
        r += nr;
      }
      partials[b] = acc;
      valid[b] = nvalid;
    }
  });
}

// The labels form's common set-up: checks, contiguous inputs, double row weights.
struct LabelsInputs {
  at::Tensor x, lab, w;
  int64_t N, K;
};

LabelsInputs labels_inputs(const at::Tensor& logits, const at::Tensor& labels,
                           const c10::optional<at::Tensor>& weights, double gamma, int64_t reduction,
                           double label_smoothing, const char* op) {
  check_labels(logits, labels, gamma, reduction, label_smoothing, op);
  check_row_weights(weights, logits, op);
  LabelsInputs in;
  in.x = logits.contiguous();
  in.lab = labels.contiguous();
  in.w = weights.has_value() ? weights->to(at::kDouble).contiguous() : at::Tensor();
  in.N = in.x.size(0);
  in.K = in.x.size(1);
  return in;
}

LabelsPass make_pass(const LabelsInputs& in, double alpha, double gamma, double label_smoothing,
                     const char* op) {
  LabelsPass P{};
  P.lab = in.lab.const_data_ptr<int64_t>();
  P.w = in.w.defined() ? in.w.const_data_ptr<double>() : nullptr;
  P.N = in.N;
  P.K = in.K;
  P.alpha = alpha;
  P.gamma = gamma;
  P.kind = gamma_kind(gamma);
  P.tg = label_targets(label_smoothing);
  P.gscale = 1.0;
  P.op = op;
  return P;
}

// Runs the pass; returns the reduced loss (reduction sum/mean), or an undefined tensor.
at::Tensor run_labels_pass(const LabelsInputs& in, const LabelsPass& P, int64_t reduction) {
  const int64_t nblocks = (in.N + rows_per_block(in.K) - 1) / rows_per_block(in.K);
  std::vector<double> partials(nblocks, 0.0);
  std::vector<int64_t> valid(nblocks, 0);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, in.x.scalar_type(), "focal_labels_cpu", [&] {
    labels_pass<scalar_t>(in.x.const_data_ptr<scalar_t>(), P, partials, valid);
  });
  if (reduction == kNone || !P.sum) return at::Tensor();
  double total = sum_partials(partials);
  if (reduction == kMean) {
    int64_t nvalid = 0;
    for (int64_t v : valid) nvalid += v;
    total /= double(nvalid) * double(in.K);  // nothing valid: 0 / 0 = NaN, as torch.mean
  }
  // A sum over 10^7 half elements overflows half: reduced results are float32 (or float64).
  return at::scalar_tensor(total, in.x.options().dtype(in.x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat));
}

at::Tensor labels_forward_cpu(const at::Tensor& logits, const at::Tensor& labels,
                              const c10::optional<at::Tensor>& weights, double alpha, double gamma,
                              int64_t reduction, double label_smoothing) {
  const char* op = "retina_fast::sigmoid_focal_loss_labels";
  const LabelsInputs in = labels_inputs(logits, labels, weights, gamma, reduction, label_smoothing, op);
  LabelsPass P = make_pass(in, alpha, gamma, label_smoothing, op);
  at::Tensor out = reduction == kNone ? empty_output_like(in.x) : at::Tensor();
  P.sum = reduction != kNone;
  P.loss_out = out.defined() ? out.data_ptr() : nullptr;
  at::Tensor total = run_labels_pass(in, P, reduction);
  return reduction == kNone ? out : total;
}

at::Tensor labels_backward_cpu(const at::Tensor& grad, const at::Tensor& logits,
                               const at::Tensor& labels, const c10::optional<at::Tensor>& weights,
                               double alpha, double gamma, int64_t reduction,
                               double label_smoothing) {
  const char* op = "retina_fast::sigmoid_focal_loss_labels_backward";
  const LabelsInputs in = labels_inputs(logits, labels, weights, gamma, reduction, label_smoothing, op);
  check_grad(grad, logits, reduction, op);
  at::Tensor gin = empty_output_like(in.x);
  if (in.N == 0 || in.K == 0) return gin;
  LabelsPass P = make_pass(in, alpha, gamma, label_smoothing, op);
  at::Tensor g = reduction == kNone ? grad.to(in.x.scalar_type()).contiguous() : at::Tensor();
  if (reduction != kNone) {
    P.gscale = grad.item<double>();
    if (reduction == kMean)
      P.gscale /= double(count_valid_rows(P.lab, in.N, in.K, op)) * double(in.K);
  }
  P.grad_out = gin.data_ptr();
  P.g = g.defined() ? g.const_data_ptr() : nullptr;
  run_labels_pass(in, P, reduction);
  return gin;
}

// Forward of a reduced loss whose gradient is needed: (loss, d loss / d logits) from one pass,
// one sigmoid per element. The loss is bitwise that of labels_forward_cpu, the gradient that of
// labels_backward_cpu for an upstream gradient of 1; autograd's backward then only scales it.
std::tuple<at::Tensor, at::Tensor> labels_forward_with_grad_cpu(
    const at::Tensor& logits, const at::Tensor& labels, const c10::optional<at::Tensor>& weights,
    double alpha, double gamma, int64_t reduction, double label_smoothing) {
  const char* op = "retina_fast::sigmoid_focal_loss_labels_with_grad";
  const LabelsInputs in = labels_inputs(logits, labels, weights, gamma, reduction, label_smoothing, op);
  TORCH_CHECK(reduction == kMean || reduction == kSum, op,
              ": expected reduction 1 (mean) or 2 (sum), got ", reduction);
  LabelsPass P = make_pass(in, alpha, gamma, label_smoothing, op);
  at::Tensor gin = empty_output_like(in.x);
  if (reduction == kMean && in.N > 0 && in.K > 0)
    P.gscale /= double(count_valid_rows(P.lab, in.N, in.K, op)) * double(in.K);
  P.sum = true;
  P.grad_out = gin.data_ptr();
  at::Tensor total = run_labels_pass(in, P, reduction);
  return {total, gin};
}

// The dense form's counterpart: (loss, d loss / d inputs) for reduction sum/mean.
std::tuple<at::Tensor, at::Tensor> dense_forward_with_grad_cpu(const at::Tensor& inputs,
                                                               const at::Tensor& targets,
                                                               double alpha, double gamma,
                                                               int64_t reduction) {
  const char* op = "retina_fast::sigmoid_focal_loss_with_grad";
  check_dense(inputs, targets, gamma, reduction, op);
  TORCH_CHECK(reduction == kMean || reduction == kSum, op,
              ": expected reduction 1 (mean) or 2 (sum), got ", reduction);
  const at::Tensor x = inputs.contiguous();
  const at::Tensor t = targets.to(inputs.scalar_type()).contiguous();
  const int64_t n = x.numel();
  const Gamma kind = gamma_kind(gamma);
  at::Tensor gin = empty_output_like(x);
  const int64_t nblocks = (n + kBlock - 1) / kBlock;
  std::vector<double> partials(nblocks, 0.0);
  // the gradient scale of dense_backward_cpu for an upstream gradient of 1
  const double gscale = reduction == kMean ? 1.0 / double(n) : 1.0;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "focal_fwd_grad_cpu", [&] {
    using C = Chunk<scalar_t>;
    using acc_t = typename C::acc_t;
    constexpr bool kDirect = std::is_same<acc_t, scalar_t>::value;
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    const scalar_t* tp = t.const_data_ptr<scalar_t>();
    scalar_t* gp = gin.mutable_data_ptr<scalar_t>();
    at::parallel_for(0, nblocks, 1, [&](int64_t b0, int64_t b1) {
      std::vector<acc_t> lbuf(kChunk), gbuf(kDirect ? 0 : kChunk);
      for (int64_t b = b0; b < b1; ++b) {
        const int64_t end = std::min(n, (b + 1) * kBlock);
        double acc = 0.0;
        for (int64_t i = b * kBlock; i < end; i += kChunk) {
          const int64_t len = std::min(kChunk, end - i);
          acc_t* gd = kDirect ? reinterpret_cast<acc_t*>(gp + i) : gbuf.data();
          C::fused(xp + i, tp + i, acc_t(0), acc_t(0), lbuf.data(), gd, acc_t(gscale), len, alpha, gamma, kind);
          if constexpr (!kDirect) C::store(gd, gp + i, len);
          acc += C::sum(lbuf.data(), len);
        }
        partials[b] = acc;
      }
    });
  });
  double total = sum_partials(partials);
  if (reduction == kMean) total /= double(n);
  return {at::scalar_tensor(total, x.options()), gin};
}

// Benchmark hook (benchmarks/bench_focal_floor.py): the per-element math alone. Runs the span
// function of `mode` (0 forward, 1 backward, 2 both from one sigmoid) `reps` times over the
// float32 logits x (targets t, or the labels form's background target when t is None) on the
// calling thread, in this process's ISA variant; x should fit in L1. Returns [2, n]: the
// outputs (loss, gradient), so that nothing is optimised away.
at::Tensor focal_math_bench_cpu(const at::Tensor& x, const c10::optional<at::Tensor>& t, int64_t reps,
                                int64_t mode, double alpha, double gamma) {
  const char* op = "retina_fast::_focal_math_bench";
  TORCH_CHECK(x.scalar_type() == at::kFloat && x.dim() == 1, op, ": expected float32 x of shape [n], got ",
              x.scalar_type(), " ", x.sizes());
  TORCH_CHECK(!t.has_value() || (t->scalar_type() == at::kFloat && t->sizes() == x.sizes()), op,
              ": expected float32 t of x's shape");
  TORCH_CHECK(mode >= 0 && mode <= 2 && reps >= 0, op, ": expected mode 0, 1 or 2 and reps >= 0");
  const at::Tensor xc = x.contiguous();
  const at::Tensor tc = t.has_value() ? t->contiguous() : at::Tensor();
  at::Tensor out = at::zeros({2, x.numel()}, x.options());
  const float* xp = xc.const_data_ptr<float>();
  const float* tp = tc.defined() ? tc.const_data_ptr<float>() : nullptr;
  float* lo = out.mutable_data_ptr<float>();
  float* go = lo + x.numel();
  const int64_t n = x.numel();
  const Gamma kind = gamma_kind(gamma);
  for (int64_t k = 0; k < reps; ++k) {
    if (mode == 0) loss_span_f32(xp, tp, 0.f, 0.f, lo, n, float(alpha), float(gamma), kind);
    else if (mode == 1) grad_span_f32(xp, tp, 0.f, 0.f, nullptr, 1.f, go, n, float(alpha), float(gamma), kind);
    else fused_span_f32(xp, tp, 0.f, 0.f, lo, go, 1.f, n, float(alpha), float(gamma), kind);
  }
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(retina_fast, CPU, m) {
  m.impl("sigmoid_focal_loss", &dense_forward_cpu);
  m.impl("sigmoid_focal_loss_backward", &dense_backward_cpu);
  m.impl("sigmoid_focal_loss_backward_with_targets", &dense_backward_with_targets_cpu);
  m.impl("sigmoid_focal_loss_labels", &labels_forward_cpu);
  m.impl("sigmoid_focal_loss_labels_backward", &labels_backward_cpu);
  m.impl("sigmoid_focal_loss_labels_with_grad", &labels_forward_with_grad_cpu);
  m.impl("sigmoid_focal_loss_with_grad", &dense_forward_with_grad_cpu);
  m.impl("_focal_math_bench", &focal_math_bench_cpu);
}

}  // namespace focal
}  // namespace retina_fast
