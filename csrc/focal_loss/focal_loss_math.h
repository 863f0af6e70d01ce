#pragma once
// Sigmoid focal loss for one element, and its derivative with respect to the logit, written
// once for the CPU and CUDA kernels. `M` supplies exp, log and log1p_given_inv(e, 1/(1+e))
// (= log1p(e)) so that each side can use
// its fastest accurate functions (vectorisable polynomials on the CPU, libdevice on CUDA).
//
// With p = sigmoid(x), q = 1 - p, t the target in [0, 1] (and tce the cross-entropy's target,
// = t except under label smoothing, see loss() below):
//   ce   = max(x, 0) - x tce + log1p(exp(-|x|))        binary cross-entropy with logits
//   m    = 1 - p_t = p (1 - t) + q t
//   loss = a_t * ce * m^gamma,   a_t = alpha t + (1 - alpha)(1 - t)  (a_t = 1 if alpha < 0)
//   dloss/dx = a_t * [ (p - tce) m^gamma + ce * gamma m^(gamma-1) * p q (1 - 2t) ]
// p and q are both formed from e = exp(-|x|) so neither cancels: the loss and gradient stay
// finite and accurate for |x| = 100 in float32 (e underflows to 0, nothing divides by it).

#include <cmath>
#include <cstdint>

#include "common/host_device.h"

namespace retina_fast {
namespace focal {

// How the modulating factor m^gamma is computed; chosen once per call, not per element.
// OneAndHalf: EfficientDet's gamma (effdet, google/automl): m^1.5 = m sqrt(m), a vector
// square root instead of the general exp(gamma log m) (~20x the time per element on the CPU,
// benchmarks/bench_dropin.py effdet case).
enum class Gamma : int { Two = 0, Zero = 1, One = 2, General = 3, OneAndHalf = 4 };

inline Gamma gamma_kind(double gamma) {
  if (gamma == 2.0) return Gamma::Two;
  if (gamma == 0.0) return Gamma::Zero;
  if (gamma == 1.0) return Gamma::One;
  if (gamma == 1.5) return Gamma::OneAndHalf;
  return Gamma::General;
}

template <typename T>
struct Params {
  T alpha;  // < 0: no alpha weighting
  T gamma;
};

// m^gamma (pow) and m^(gamma-1) * gamma (dpow), for m in [0, 1].
template <typename T, typename M, Gamma G>
HOST_DEVICE_INLINE T modulator(T m, T gamma) {
  if (G == Gamma::Two) return m * m;
  if (G == Gamma::Zero) return T(1);
  if (G == Gamma::One) return m;
  if (G == Gamma::OneAndHalf) return m * std::sqrt(m);
  // m == 0 -> 0 for gamma > 0 (0^gamma); log(0) is never evaluated into the result.
  const T safe = m > T(0) ? m : T(1);
  const T r = M::exp(gamma * M::log(safe));
  return m > T(0) ? r : T(0);
}

// d(m^gamma)/dm = gamma m^(gamma-1). At m == 0 it is multiplied by p q == 0 (m can only
// reach 0 when p hits its target exactly), so 0 is the limit we return there.
template <typename T, typename M, Gamma G>
HOST_DEVICE_INLINE T dmodulator(T m, T mod, T gamma) {
  if (G == Gamma::Two) return T(2) * m;
  if (G == Gamma::Zero) return T(0);
  if (G == Gamma::One) return T(1);
  if (G == Gamma::OneAndHalf) return T(1.5) * std::sqrt(m);
  return m > T(0) ? gamma * mod / m : T(0);
}

// Shared front half of the loss and gradient: p, q, max(x, 0) and log1p(e). The cross-entropy
// is formed as (max(x,0) - x t) + log1p(e): at t = 1 the first bracket cancels exactly and the
// small log1p term survives (x + log1p(e) - x would round it away).
template <typename T>
struct Sig {
  T p, q, relu, l1p;
};

template <typename T, typename M>
HOST_DEVICE_INLINE Sig<T> sigmoid_parts(T x) {
  const T ax = x < T(0) ? -x : x;
  const T e = M::exp(-ax);
  const T inv = T(1) / (T(1) + e);
  const bool pos = x >= T(0);
  Sig<T> s;
  s.p = pos ? inv : e * inv;
  s.q = pos ? e * inv : inv;
  // NaN logits: x >= 0 is false, e is NaN, so p, q and softplus are NaN (they propagate).
  s.relu = x > T(0) ? x : T(0);
  s.l1p = M::log1p_given_inv(e, inv);
  return s;
}

template <typename T>
HOST_DEVICE_INLINE T alpha_t(T alpha, T t) {
  return alpha >= T(0) ? alpha * t + (T(1) - alpha) * (T(1) - t) : T(1);
}

// Infinite logits give torchvision's values, so that every form and device agrees with it and
// with each other: torchvision evaluates BCE-with-logits as (1 - t) x + m + log(e^-m + e^(-x-m)),
// m = max(-x, 0), which is NaN at x = -inf (-inf + inf) and (1 - t) * inf at x = +inf (inf for
// t < 1, NaN at t = 1); autograd through it gives a NaN gradient at either infinity. Finite
// logits never take these branches (selects, not branches: the CPU loops still vectorise).
template <typename T>
HOST_DEVICE_INLINE bool finite_logit(T x) {
  const T ax = x < T(0) ? -x : x;
  return ax < T(INFINITY);  // false for +-inf and NaN
}
// Cross-entropy at a non-finite logit: (1 - t) * x at +inf, NaN at -inf and NaN.
template <typename T>
HOST_DEVICE_INLINE T ce_nonfinite(T x, T t) {
  return x > T(0) ? (T(1) - t) * x : T(NAN);
}

// `t` is the label the alpha weight and the modulating factor see; `tce` is the target of the
// cross-entropy. They differ only under label smoothing s (labels form): t in {0, 1} is the
// unsmoothed label and tce = 1 - s/2 or s/2 its smoothed value, the convention of NVIDIA apex's
// fused focal loss (MLPerf RetinaNet) and EfficientDet's official loss. The dense form has
// tce = t (soft targets, exactly torchvision's formula).
template <typename T, typename M, Gamma G>
HOST_DEVICE_INLINE T loss(T x, T t, T tce, Params<T> prm) {
  const Sig<T> s = sigmoid_parts<T, M>(x);
  T ce = (s.relu - x * tce) + s.l1p;
  ce = finite_logit(x) ? ce : ce_nonfinite(x, tce);
  const T m = s.p * (T(1) - t) + s.q * t;
  return alpha_t(prm.alpha, t) * ce * modulator<T, M, G>(m, prm.gamma);
}

template <typename T, typename M, Gamma G>
HOST_DEVICE_INLINE T dloss(T x, T t, T tce, Params<T> prm) {
  const Sig<T> s = sigmoid_parts<T, M>(x);
  const T ce = (s.relu - x * tce) + s.l1p;
  const T m = s.p * (T(1) - t) + s.q * t;
  const T mod = modulator<T, M, G>(m, prm.gamma);
  const T p_minus_t = s.p * (T(1) - tce) - s.q * tce;  // p - tce without cancellation at tce = 1
  const T dm_dx = s.p * s.q * (T(1) - T(2) * t);
  const T g = alpha_t(prm.alpha, t) *
              (p_minus_t * mod + ce * dmodulator<T, M, G>(m, mod, prm.gamma) * dm_dx);
  return finite_logit(x) ? g : T(NAN);
}

template <typename T, typename M, Gamma G>
HOST_DEVICE_INLINE T loss(T x, T t, Params<T> prm) {
  return loss<T, M, G>(x, t, t, prm);
}

template <typename T, typename M, Gamma G>
HOST_DEVICE_INLINE T dloss(T x, T t, Params<T> prm) {
  return dloss<T, M, G>(x, t, t, prm);
}

// d loss / d t of the dense form (tce = t): the gradient with respect to soft targets, as
// autograd through torchvision's formula gives it:
//   a'(t) ce m^g + a(t) (-x) m^g + a(t) ce g m^(g-1) (q - p),   a' = 2 alpha - 1 (0 if alpha < 0)
template <typename T, typename M, Gamma G>
HOST_DEVICE_INLINE T dloss_dt(T x, T t, Params<T> prm) {
  const Sig<T> s = sigmoid_parts<T, M>(x);
  const T ce = (s.relu - x * t) + s.l1p;
  const T m = s.p * (T(1) - t) + s.q * t;
  const T mod = modulator<T, M, G>(m, prm.gamma);
  const T a = alpha_t(prm.alpha, t);
  const T da = prm.alpha >= T(0) ? T(2) * prm.alpha - T(1) : T(0);
  const T g = da * ce * mod - a * x * mod + a * ce * dmodulator<T, M, G>(m, mod, prm.gamma) * (s.q - s.p);
  return finite_logit(x) ? g : T(NAN);
}

// The same two functions at t = 0 (every background column of the labels form, without
// label smoothing: ~99 % of a detector's elements). The compiler may not drop `x * 0` (inf, NaN),
// so the algebra is done here: ce = softplus(x), m = p, p - t = p, dm/dx = p q. Identical to
// loss/dloss at t = 0 for every x, infinities included.
template <typename T, typename M, Gamma G>
HOST_DEVICE_INLINE T loss_t0(T x, Params<T> prm) {
  const Sig<T> s = sigmoid_parts<T, M>(x);
  const T a = prm.alpha >= T(0) ? T(1) - prm.alpha : T(1);
  T ce = s.relu + s.l1p;
  ce = finite_logit(x) ? ce : ce_nonfinite(x, T(0));
  return a * ce * modulator<T, M, G>(s.p, prm.gamma);
}

template <typename T, typename M, Gamma G>
HOST_DEVICE_INLINE T dloss_t0(T x, Params<T> prm) {
  const Sig<T> s = sigmoid_parts<T, M>(x);
  const T a = prm.alpha >= T(0) ? T(1) - prm.alpha : T(1);
  const T mod = modulator<T, M, G>(s.p, prm.gamma);
  const T g = a * (s.p * mod + (s.relu + s.l1p) * dmodulator<T, M, G>(s.p, mod, prm.gamma) * (s.p * s.q));
  return finite_logit(x) ? g : T(NAN);
}

// Loss and gradient of one element from one sigmoid (the forward of a loss whose gradient is
// needed: the backward then only scales it). Bitwise equal to loss/dloss and loss_t0/dloss_t0:
// the same operations in the same order, only the shared ones done once.
template <typename T, typename M, Gamma G>
HOST_DEVICE_INLINE void loss_and_dloss(T x, T t, T tce, Params<T> prm, T& l, T& d) {
  const Sig<T> s = sigmoid_parts<T, M>(x);
  const bool fin = finite_logit(x);
  const T ce = (s.relu - x * tce) + s.l1p;
  const T m = s.p * (T(1) - t) + s.q * t;
  const T mod = modulator<T, M, G>(m, prm.gamma);
  const T a = alpha_t(prm.alpha, t);
  l = a * (fin ? ce : ce_nonfinite(x, tce)) * mod;
  const T p_minus_t = s.p * (T(1) - tce) - s.q * tce;
  const T dm_dx = s.p * s.q * (T(1) - T(2) * t);
  const T g = a * (p_minus_t * mod + ce * dmodulator<T, M, G>(m, mod, prm.gamma) * dm_dx);
  d = fin ? g : T(NAN);
}

template <typename T, typename M, Gamma G>
HOST_DEVICE_INLINE void loss_and_dloss_t0(T x, Params<T> prm, T& l, T& d) {
  const Sig<T> s = sigmoid_parts<T, M>(x);
  const bool fin = finite_logit(x);
  const T a = prm.alpha >= T(0) ? T(1) - prm.alpha : T(1);
  const T ce = s.relu + s.l1p;
  const T mod = modulator<T, M, G>(s.p, prm.gamma);
  l = a * (fin ? ce : ce_nonfinite(x, T(0))) * mod;
  const T g = a * (s.p * mod + ce * dmodulator<T, M, G>(s.p, mod, prm.gamma) * (s.p * s.q));
  d = fin ? g : T(NAN);
}

// Runs __VA_ARGS__ (a lambda body) with `G` bound to the call's Gamma kind as a
// compile-time constant (C++17: no templated lambdas).
#define RETINA_FAST_DISPATCH_GAMMA(kind, G, ...)                              \
  switch (kind) {                                                            \
    case ::retina_fast::focal::Gamma::Two: {                                 \
      constexpr ::retina_fast::focal::Gamma G = ::retina_fast::focal::Gamma::Two; \
      __VA_ARGS__();                                                         \
      break;                                                                 \
    }                                                                        \
    case ::retina_fast::focal::Gamma::Zero: {                                \
      constexpr ::retina_fast::focal::Gamma G = ::retina_fast::focal::Gamma::Zero; \
      __VA_ARGS__();                                                         \
      break;                                                                 \
    }                                                                        \
    case ::retina_fast::focal::Gamma::One: {                                 \
      constexpr ::retina_fast::focal::Gamma G = ::retina_fast::focal::Gamma::One; \
      __VA_ARGS__();                                                         \
      break;                                                                 \
    }                                                                        \
    case ::retina_fast::focal::Gamma::OneAndHalf: {                          \
      constexpr ::retina_fast::focal::Gamma G = ::retina_fast::focal::Gamma::OneAndHalf; \
      __VA_ARGS__();                                                         \
      break;                                                                 \
    }                                                                        \
    default: {                                                               \
      constexpr ::retina_fast::focal::Gamma G = ::retina_fast::focal::Gamma::General; \
      __VA_ARGS__();                                                         \
      break;                                                                 \
    }                                                                        \
  }

// Labels convention of sigmoid_focal_loss_labels.
constexpr int64_t kBackground = -1;
constexpr int64_t kIgnore = -2;

}  // namespace focal
}  // namespace retina_fast
