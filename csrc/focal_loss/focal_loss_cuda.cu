// CUDA kernels of the sigmoid focal loss (dense targets and labels), forward and backward.
//
// Grid-stride loops over elements with int64 indices (N*K passes 2^31 at batch 16 x 120k
// anchors x 91 classes would not, but a few more classes would); 4-wide vector loads and
// stores where the pointers allow. Math in float32 for half/bfloat16 (float64 for double).
// Reductions write one partial per block, then one block sums the partials in a fixed order:
// deterministic, no float atomics. Gradients of reduced losses read the upstream grad from
// device memory, so nothing synchronises with the host.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <type_traits>

#include "common/cuda_utils.cuh"
#include "focal_loss/focal_loss_checks.h"
#include "focal_loss/focal_loss_math.h"

namespace retina_fast {
namespace focal {
namespace {

using cuda::kThreads;

struct CudaMath {
  __device__ static __forceinline__ float exp(float x) { return ::expf(x); }
  __device__ static __forceinline__ float log(float x) { return ::logf(x); }
  __device__ static __forceinline__ float log1p_given_inv(float e, float) { return ::log1pf(e); }
  __device__ static __forceinline__ double exp(double x) { return ::exp(x); }
  __device__ static __forceinline__ double log(double x) { return ::log(x); }
  __device__ static __forceinline__ double log1p_given_inv(double e, double) { return ::log1p(e); }
};

template <typename scalar_t>
using acc_type = std::conditional_t<std::is_same<scalar_t, double>::value, double, float>;

constexpr int kVec = 4;

// Target of element i of a grid-stride loop (start(i0, stride), then advance() per step):
// get(i, t, tce, w) sets the target (alpha weight and modulating factor), the cross-entropy's
// target (they differ under label smoothing, see focal_loss_math.h) and the row weight, and
// returns false for an ignored element.
template <typename scalar_t, typename acc_t>
struct DenseTarget {
  const scalar_t* t;
  __device__ __forceinline__ void start(int64_t, int64_t) {}
  __device__ __forceinline__ void advance() {}
  __device__ __forceinline__ bool get(int64_t i, acc_t& out, acc_t& tce, acc_t& w) const {
    out = acc_t(t[i]);
    tce = out;
    w = acc_t(1);
    return true;
  }
};

// Row r = i / K and column c = i % K are carried along the loop instead of dividing per
// element: a 64-bit division is ~100 integer instructions, enough to make this memory-bound
// kernel compute-bound.
template <typename acc_t>
struct LabelTarget {
  const int64_t* labels;
  const acc_t* weights;  // [N] or nullptr
  int64_t K;
  acc_t pos, neg;
  int64_t r = 0, c = 0, sr = 0, sc = 0;
  __device__ __forceinline__ void start(int64_t i0, int64_t stride) {
    r = i0 / K;
    c = i0 - r * K;
    sr = stride / K;
    sc = stride - sr * K;
  }
  __device__ __forceinline__ void advance() {
    c += sc;
    r += sr;
    if (c >= K) {
      c -= K;
      ++r;
    }
  }
  __device__ __forceinline__ bool get(int64_t, acc_t& out, acc_t& tce, acc_t& w) const {
    const int64_t l = labels[r];
    RF_DEVICE_ASSERT(l >= kIgnore && l < K, "retina_fast::sigmoid_focal_loss_labels: expected every label in [0, K) "
                     "(foreground), -1 (background) or -2 (ignored)");
    out = l == c ? acc_t(1) : acc_t(0);
    tce = l == c ? pos : neg;
    w = weights ? weights[r] : acc_t(1);
    return l != kIgnore;
  }
};

// ------------------------------------------------------------------ forward

template <typename scalar_t, Gamma G, typename Target>
__global__ void forward_kernel(const scalar_t* __restrict__ x, Target tgt, int64_t n,
                               Params<acc_type<scalar_t>> p, scalar_t* __restrict__ out,
                               acc_type<scalar_t>* __restrict__ partials) {
  using acc_t = acc_type<scalar_t>;
  RF_SHARED(acc_t, smem, [32]);
  acc_t acc = 0;
  const int64_t stride = int64_t(gridDim.x) * blockDim.x;
  const int64_t i0 = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  tgt.start(i0, stride);
  for (int64_t i = i0; i < n; i += stride, tgt.advance()) {
    acc_t t, tce, w;
    const bool use = tgt.get(i, t, tce, w);
    const acc_t v = use ? w * loss<acc_t, CudaMath, G>(acc_t(x[i]), t, tce, p) : acc_t(0);
    if (out) out[i] = scalar_t(v);
    else acc += v;
  }
  if (!out) {
    acc = cuda::block_reduce_sum(acc, smem);
    if (threadIdx.x == 0) partials[blockIdx.x] = acc;
  }
}

// Dense float path with 4-wide loads (pointers aligned to a pack): a vector body over the
// first n / kVec packs, then the n % kVec tail elements, one per thread of the grid's first
// threads. Any n takes this path; only misaligned storage falls back to forward_kernel.
template <typename scalar_t, Gamma G>
__global__ void forward_dense_vec_kernel(const scalar_t* __restrict__ x,
                                         const scalar_t* __restrict__ t, int64_t n,
                                         Params<acc_type<scalar_t>> p, scalar_t* __restrict__ out,
                                         acc_type<scalar_t>* __restrict__ partials) {
  using acc_t = acc_type<scalar_t>;
  using P = cuda::Pack<scalar_t, kVec>;
  RF_SHARED(acc_t, smem, [32]);
  acc_t acc = 0;
  const int64_t nvec = n / kVec;
  const int64_t stride = int64_t(gridDim.x) * blockDim.x;
  const int64_t gid = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  const int64_t tail = nvec * kVec + gid;
  if (tail < n) {
    const acc_t v = loss<acc_t, CudaMath, G>(acc_t(x[tail]), acc_t(t[tail]), p);
    if (out) out[tail] = scalar_t(v);
    acc += v;
  }
  for (int64_t i = gid; i < nvec; i += stride) {
    const P xv = reinterpret_cast<const P*>(x)[i];
    const P tv = reinterpret_cast<const P*>(t)[i];
    P ov;
#pragma unroll
    for (int j = 0; j < kVec; ++j) {
      const acc_t v = loss<acc_t, CudaMath, G>(acc_t(xv.v[j]), acc_t(tv.v[j]), p);
      ov.v[j] = scalar_t(v);
      acc += v;
    }
    if (out) reinterpret_cast<P*>(out)[i] = ov;
  }
  if (!out) {
    acc = cuda::block_reduce_sum(acc, smem);
    if (threadIdx.x == 0) partials[blockIdx.x] = acc;
  }
}

// Sum of partials in one block, in a fixed order; divides by *count * scale_k (mean) if given.
template <typename acc_t, typename out_t>
__global__ void finish_sum_kernel(const acc_t* __restrict__ partials, int64_t n,
                                  const int64_t* __restrict__ count, double divisor,
                                  out_t* __restrict__ out) {
  RF_SHARED(acc_t, smem, [32]);
  acc_t acc = 0;
  for (int64_t i = threadIdx.x; i < n; i += blockDim.x) acc += partials[i];
  acc = cuda::block_reduce_sum(acc, smem);
  if (threadIdx.x == 0) {
    double total = double(acc);
    if (count) total /= double(*count) * divisor;
    else if (divisor != 1.0) total /= divisor;
    *out = out_t(total);
  }
}

// Non-ignored rows (for the labels' mean).
__global__ void count_valid_kernel(const int64_t* __restrict__ labels, int64_t n,
                                   unsigned long long* __restrict__ count) {
  RF_SHARED(unsigned long long, smem, [32]);
  unsigned long long c = 0;
  const int64_t stride = int64_t(gridDim.x) * blockDim.x;
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += stride)
    c += labels[i] != kIgnore;
  c = cuda::block_reduce_sum(c, smem);
  if (threadIdx.x == 0) atomicAdd(count, c);  // integer: order does not matter
}

// ------------------------------------------------------------------ backward

// grad_in[i] = (g ? g[i] : 1) * (*gscale) / (count ? *count * div : div) * dloss/dx.
// gscale (the upstream gradient of a reduced loss) is read in acc_t: float64 logits keep a
// float64 gradient scale, as on the CPU.
template <typename scalar_t, Gamma G, typename Target>
__global__ void backward_kernel(const scalar_t* __restrict__ x, Target tgt, int64_t n,
                                Params<acc_type<scalar_t>> p, const scalar_t* __restrict__ g,
                                const acc_type<scalar_t>* __restrict__ gscale,
                                const int64_t* __restrict__ count, double div,
                                scalar_t* __restrict__ gin) {
  using acc_t = acc_type<scalar_t>;
  acc_t s = 1;
  if (gscale) s = acc_t(double(*gscale) / (count ? double(*count) * div : div));
  const int64_t stride = int64_t(gridDim.x) * blockDim.x;
  const int64_t i0 = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  tgt.start(i0, stride);
  for (int64_t i = i0; i < n; i += stride, tgt.advance()) {
    acc_t t, tce, w;
    acc_t v = 0;
    if (tgt.get(i, t, tce, w)) {
      v = s * w * dloss<acc_t, CudaMath, G>(acc_t(x[i]), t, tce, p);
      if (g) v *= acc_t(g[i]);
    }
    gin[i] = scalar_t(v);
  }
}

// Vector body + scalar tail, as forward_dense_vec_kernel.
template <typename scalar_t, Gamma G>
__global__ void backward_dense_vec_kernel(const scalar_t* __restrict__ x,
                                          const scalar_t* __restrict__ t, int64_t n,
                                          Params<acc_type<scalar_t>> p,
                                          const scalar_t* __restrict__ g,
                                          const acc_type<scalar_t>* __restrict__ gscale,
                                          double div, scalar_t* __restrict__ gin) {
  using acc_t = acc_type<scalar_t>;
  using P = cuda::Pack<scalar_t, kVec>;
  acc_t s = 1;
  if (gscale) s = acc_t(double(*gscale) / div);
  const int64_t nvec = n / kVec;
  const int64_t stride = int64_t(gridDim.x) * blockDim.x;
  const int64_t gid = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  const int64_t tail = nvec * kVec + gid;
  if (tail < n) {
    acc_t v = s * dloss<acc_t, CudaMath, G>(acc_t(x[tail]), acc_t(t[tail]), p);
    if (g) v *= acc_t(g[tail]);
    gin[tail] = scalar_t(v);
  }
  for (int64_t i = gid; i < nvec; i += stride) {
    const P xv = reinterpret_cast<const P*>(x)[i];
    const P tv = reinterpret_cast<const P*>(t)[i];
    P gv;
    if (g) gv = reinterpret_cast<const P*>(g)[i];
    P ov;
#pragma unroll
    for (int j = 0; j < kVec; ++j) {
      acc_t v = s * dloss<acc_t, CudaMath, G>(acc_t(xv.v[j]), acc_t(tv.v[j]), p);
      if (g) v *= acc_t(gv.v[j]);
      ov.v[j] = scalar_t(v);
    }
    reinterpret_cast<P*>(gin)[i] = ov;
  }
}

// Both gradients of the dense form (soft targets that need a gradient): d/dx and d/dt, each
// times (g ? g[i] : 1) * (*gscale) / div. One pass over the inputs, as backward_kernel.
template <typename scalar_t, Gamma G>
__global__ void backward_both_kernel(const scalar_t* __restrict__ x, const scalar_t* __restrict__ t,
                                     int64_t n, Params<acc_type<scalar_t>> p, const scalar_t* __restrict__ g,
                                     const acc_type<scalar_t>* __restrict__ gscale, double div,
                                     scalar_t* __restrict__ gx, scalar_t* __restrict__ gt) {
  using acc_t = acc_type<scalar_t>;
  acc_t s = 1;
  if (gscale) s = acc_t(double(*gscale) / div);
  const int64_t stride = int64_t(gridDim.x) * blockDim.x;
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += stride) {
    const acc_t xi = acc_t(x[i]), ti = acc_t(t[i]);
    const acc_t si = g ? s * acc_t(g[i]) : s;
    gx[i] = scalar_t(si * dloss<acc_t, CudaMath, G>(xi, ti, p));
    gt[i] = scalar_t(si * dloss_dt<acc_t, CudaMath, G>(xi, ti, p));
  }
}

// ------------------------------------------------------------------ host side

// 0-d int64 tensor on the device: the number of non-ignored rows (the labels' mean divisor).
at::Tensor count_valid_rows(const at::Tensor& labels, cudaStream_t stream) {
  at::Tensor count = at::zeros({}, labels.options());
  const int64_t n = labels.numel();
  if (n == 0) return count;
  cuda::launch(count_valid_kernel, cuda::grid_for(n), kThreads, 0, stream,
      labels.const_data_ptr<int64_t>(), n,
      reinterpret_cast<unsigned long long*>(count.mutable_data_ptr<int64_t>()));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return count;
}

// The vector kernels need every pointer aligned to a pack (a view with a storage offset may
// not be); any length works (vector body + scalar tail).
template <typename scalar_t>
bool can_vectorize(std::initializer_list<const void*> ptrs) {
  for (const void* p : ptrs)
    if (p && reinterpret_cast<uintptr_t>(p) % (sizeof(scalar_t) * kVec) != 0) return false;
  return true;
}

// Launch the forward for a target functor; returns the loss tensor.
template <typename scalar_t, typename Target>
at::Tensor launch_forward(const at::Tensor& x, const at::Tensor& t_dense, Target tgt,
                          int64_t reduction, double alpha, double gamma, at::ScalarType red_dtype,
                          const at::Tensor& labels_for_mean, int64_t K) {
  using acc_t = acc_type<scalar_t>;
  const int64_t n = x.numel();
  cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  const Params<acc_t> p{acc_t(alpha), acc_t(gamma)};
  const Gamma kind = gamma_kind(gamma);
  at::Tensor out = reduction == kNone ? at::empty_like(x) : at::Tensor();
  if (reduction == kNone && n == 0) return out;
  const bool dense = t_dense.defined();
  const bool vec = dense && can_vectorize<scalar_t>({x.const_data_ptr(), t_dense.const_data_ptr(),
                                                     out.defined() ? out.const_data_ptr() : nullptr});
  const int64_t blocks = cuda::grid_for(vec ? std::max<int64_t>(n / kVec, n % kVec) : n);
  at::Tensor partials = at::empty({reduction == kNone ? 0 : blocks},
                                  x.options().dtype(c10::CppTypeToScalarType<acc_t>::value));
  scalar_t* outp = out.defined() ? out.mutable_data_ptr<scalar_t>() : nullptr;
  acc_t* pp = partials.numel() ? partials.mutable_data_ptr<acc_t>() : nullptr;
  RETINA_FAST_DISPATCH_GAMMA(kind, G, [&] {
    if (vec) {
      cuda::launch(forward_dense_vec_kernel<scalar_t, G>, blocks, kThreads, 0, stream,
          x.const_data_ptr<scalar_t>(), t_dense.const_data_ptr<scalar_t>(), n, p, outp, pp);
    } else {
      cuda::launch(forward_kernel<scalar_t, G, Target>, blocks, kThreads, 0, stream,
          x.const_data_ptr<scalar_t>(), tgt, n, p, outp, pp);
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  if (reduction == kNone) return out;
  at::Tensor result = at::empty({}, partials.options());
  at::Tensor count;
  double divisor = 1.0;
  if (reduction == kMean) {
    if (labels_for_mean.defined()) {
      count = count_valid_rows(labels_for_mean, stream);
      divisor = double(K);
    } else {
      divisor = double(n);  // n == 0: 0 / 0 = NaN, as torch.mean of nothing
    }
  }
  cuda::launch(finish_sum_kernel<acc_t, acc_t>, 1, 1024, 0, stream,
      pp, blocks, count.defined() ? count.const_data_ptr<int64_t>() : nullptr,
      reduction == kMean ? divisor : 1.0, result.mutable_data_ptr<acc_t>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  result = result.to(red_dtype);  // no-op unless the dense op's output is half/bfloat16
  return result;
}

template <typename scalar_t, typename Target>
at::Tensor launch_backward(const at::Tensor& grad, const at::Tensor& x, const at::Tensor& t_dense,
                           Target tgt, int64_t reduction, double alpha, double gamma,
                           const at::Tensor& labels_for_mean, int64_t K) {
  using acc_t = acc_type<scalar_t>;
  const int64_t n = x.numel();
  at::Tensor gin = at::empty_like(x);
  if (n == 0) return gin;
  cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  const Params<acc_t> p{acc_t(alpha), acc_t(gamma)};
  const Gamma kind = gamma_kind(gamma);
  at::Tensor g, gs, count;
  double div = 1.0;
  if (reduction == kNone) {
    g = grad.to(x.scalar_type()).contiguous();
  } else {
    gs = grad.reshape({}).to(c10::CppTypeToScalarType<acc_t>::value);
    if (reduction == kMean) {
      if (labels_for_mean.defined()) {
        count = count_valid_rows(labels_for_mean, stream);
        div = double(K);
      } else {
        div = double(n);
      }
    }
  }
  const scalar_t* gp = g.defined() ? g.const_data_ptr<scalar_t>() : nullptr;
  const acc_t* gsp = gs.defined() ? gs.const_data_ptr<acc_t>() : nullptr;
  const bool dense = t_dense.defined();
  const bool vec = dense && !count.defined() &&
                   can_vectorize<scalar_t>({x.const_data_ptr(), t_dense.const_data_ptr(), gp,
                                            gin.const_data_ptr()});
  const int64_t blocks = cuda::grid_for(vec ? std::max<int64_t>(n / kVec, n % kVec) : n);
  RETINA_FAST_DISPATCH_GAMMA(kind, G, [&] {
    if (vec) {
      cuda::launch(backward_dense_vec_kernel<scalar_t, G>, blocks, kThreads, 0, stream,
          x.const_data_ptr<scalar_t>(), t_dense.const_data_ptr<scalar_t>(), n, p, gp, gsp,
          div, gin.mutable_data_ptr<scalar_t>());
    } else {
      cuda::launch(backward_kernel<scalar_t, G, Target>, blocks, kThreads, 0, stream,
          x.const_data_ptr<scalar_t>(), tgt, n, p, gp, gsp,
          count.defined() ? count.const_data_ptr<int64_t>() : nullptr, div,
          gin.mutable_data_ptr<scalar_t>());
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return gin;
}

at::Tensor dense_forward_cuda(const at::Tensor& inputs, const at::Tensor& targets, double alpha,
                              double gamma, int64_t reduction) {
  const char* op = "retina_fast::sigmoid_focal_loss";
  check_dense(inputs, targets, gamma, reduction, op);
  check_device(inputs, at::kCUDA, op, "inputs");
  const c10::cuda::CUDAGuard guard(inputs.device());
  const at::Tensor x = inputs.contiguous();
  const at::Tensor t = targets.to(inputs.scalar_type()).contiguous();
  at::Tensor result;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "focal_fwd_cuda", [&] {
    using acc_t = acc_type<scalar_t>;
    result = launch_forward<scalar_t>(x, t, DenseTarget<scalar_t, acc_t>{t.const_data_ptr<scalar_t>()},
                                      reduction, alpha, gamma, x.scalar_type(), at::Tensor(), 0);
  });
  return result;
}

at::Tensor dense_backward_cuda(const at::Tensor& grad, const at::Tensor& inputs,
                               const at::Tensor& targets, double alpha, double gamma,
                               int64_t reduction) {
  const char* op = "retina_fast::sigmoid_focal_loss_backward";
  check_dense(inputs, targets, gamma, reduction, op);
  check_grad(grad, inputs, reduction, op);
  check_device(inputs, at::kCUDA, op, "inputs");
  const c10::cuda::CUDAGuard guard(inputs.device());
  const at::Tensor x = inputs.contiguous();
  const at::Tensor t = targets.to(inputs.scalar_type()).contiguous();
  at::Tensor gin;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "focal_bwd_cuda", [&] {
    using acc_t = acc_type<scalar_t>;
    gin = launch_backward<scalar_t>(grad, x, t, DenseTarget<scalar_t, acc_t>{t.const_data_ptr<scalar_t>()},
                                    reduction, alpha, gamma, at::Tensor(), 0);
  });
  return gin;
}

std::tuple<at::Tensor, at::Tensor> dense_backward_with_targets_cuda(
    const at::Tensor& grad, const at::Tensor& inputs, const at::Tensor& targets, double alpha,
    double gamma, int64_t reduction) {
  const char* op = "retina_fast::sigmoid_focal_loss_backward_with_targets";
  check_dense(inputs, targets, gamma, reduction, op);
  check_grad(grad, inputs, reduction, op);
  check_device(inputs, at::kCUDA, op, "inputs");
  const c10::cuda::CUDAGuard guard(inputs.device());
  const at::Tensor x = inputs.contiguous();
  const at::Tensor t = targets.to(inputs.scalar_type()).contiguous();
  const int64_t n = x.numel();
  at::Tensor gx = at::empty_like(x), gt = at::empty_like(x);
  if (n == 0) return {gx, gt.to(targets.scalar_type())};
  cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "focal_bwd2_cuda", [&] {
    using acc_t = acc_type<scalar_t>;
    const Params<acc_t> p{acc_t(alpha), acc_t(gamma)};
    at::Tensor g, gs;
    if (reduction == kNone) g = grad.to(x.scalar_type()).contiguous();
    else gs = grad.reshape({}).to(c10::CppTypeToScalarType<acc_t>::value);
    const double div = reduction == kMean ? double(n) : 1.0;
    RETINA_FAST_DISPATCH_GAMMA(gamma_kind(gamma), G, [&] {
      cuda::launch(backward_both_kernel<scalar_t, G>, cuda::grid_for(n), kThreads, 0, stream,
          x.const_data_ptr<scalar_t>(), t.const_data_ptr<scalar_t>(), n, p,
          g.defined() ? g.const_data_ptr<scalar_t>() : nullptr, gs.defined() ? gs.const_data_ptr<acc_t>() : nullptr,
          div, gx.mutable_data_ptr<scalar_t>(), gt.mutable_data_ptr<scalar_t>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
  return {gx, gt.to(targets.scalar_type())};
}


// ------------------------------------------------------------------ forward with gradient

// Loss partials per block and grad_in[i] = s * w * dloss/dx from one sigmoid per element, with
// s = 1 / (count ? *count * div : div) (the backward's scale for an upstream gradient of 1).
template <typename scalar_t, Gamma G, typename Target>
__global__ void forward_grad_kernel(const scalar_t* __restrict__ x, Target tgt, int64_t n,
                                    Params<acc_type<scalar_t>> p, const int64_t* __restrict__ count,
                                    double div, scalar_t* __restrict__ gin,
                                    acc_type<scalar_t>* __restrict__ partials) {
  using acc_t = acc_type<scalar_t>;
  RF_SHARED(acc_t, smem, [32]);
  const acc_t s = acc_t(1.0 / (count ? double(*count) * div : div));
  acc_t acc = 0;
  const int64_t stride = int64_t(gridDim.x) * blockDim.x;
  const int64_t i0 = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  tgt.start(i0, stride);
  for (int64_t i = i0; i < n; i += stride, tgt.advance()) {
    acc_t t, tce, w;
    acc_t v = 0, d = 0;
    if (tgt.get(i, t, tce, w)) {
      acc_t l;
      loss_and_dloss<acc_t, CudaMath, G>(acc_t(x[i]), t, tce, p, l, d);
      v = w * l;
      d = (s * w) * d;
    }
    gin[i] = scalar_t(d);
    acc += v;
  }
  acc = cuda::block_reduce_sum(acc, smem);
  if (threadIdx.x == 0) partials[blockIdx.x] = acc;
}

template <typename scalar_t, typename Target>
std::tuple<at::Tensor, at::Tensor> launch_forward_grad(const at::Tensor& x, Target tgt, int64_t reduction,
                                                       double alpha, double gamma, at::ScalarType red_dtype,
                                                       const at::Tensor& labels_for_mean, int64_t K) {
  using acc_t = acc_type<scalar_t>;
  const int64_t n = x.numel();
  cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  const Params<acc_t> p{acc_t(alpha), acc_t(gamma)};
  at::Tensor gin = at::empty_like(x);
  const int64_t blocks = cuda::grid_for(n);
  at::Tensor partials = at::empty({blocks}, x.options().dtype(c10::CppTypeToScalarType<acc_t>::value));
  at::Tensor count;
  double divisor = 1.0;
  if (reduction == kMean) {
    if (labels_for_mean.defined()) {
      count = count_valid_rows(labels_for_mean, stream);
      divisor = double(K);
    } else {
      divisor = double(n);
    }
  }
  const int64_t* cp = count.defined() ? count.const_data_ptr<int64_t>() : nullptr;
  at::Tensor result = at::empty({}, partials.options());
  if (n > 0) {
    RETINA_FAST_DISPATCH_GAMMA(gamma_kind(gamma), G, [&] {
      cuda::launch(forward_grad_kernel<scalar_t, G, Target>, blocks, kThreads, 0, stream,
          x.const_data_ptr<scalar_t>(), tgt, n, p, cp, divisor, gin.mutable_data_ptr<scalar_t>(),
          partials.mutable_data_ptr<acc_t>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  }
  cuda::launch(finish_sum_kernel<acc_t, acc_t>, 1, 1024, 0, stream,
      partials.const_data_ptr<acc_t>(), n > 0 ? blocks : 0, cp, reduction == kMean ? divisor : 1.0,
      result.mutable_data_ptr<acc_t>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {result.to(red_dtype), gin};
}

std::tuple<at::Tensor, at::Tensor> dense_forward_with_grad_cuda(const at::Tensor& inputs,
                                                                const at::Tensor& targets,
                                                                double alpha, double gamma,
                                                                int64_t reduction) {
  const char* op = "retina_fast::sigmoid_focal_loss_with_grad";
  check_dense(inputs, targets, gamma, reduction, op);
  check_device(inputs, at::kCUDA, op, "inputs");
  TORCH_CHECK(reduction == kMean || reduction == kSum, op,
              ": expected reduction 1 (mean) or 2 (sum), got ", reduction);
  const c10::cuda::CUDAGuard guard(inputs.device());
  const at::Tensor x = inputs.contiguous();
  const at::Tensor t = targets.to(inputs.scalar_type()).contiguous();
  std::tuple<at::Tensor, at::Tensor> out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "focal_fwd_grad_cuda", [&] {
    using acc_t = acc_type<scalar_t>;
    out = launch_forward_grad<scalar_t>(x, DenseTarget<scalar_t, acc_t>{t.const_data_ptr<scalar_t>()},
                                        reduction, alpha, gamma, x.scalar_type(), at::Tensor(), 0);
  });
  return out;
}

// Row weights in the math dtype (float32, float64 for float64 logits), or undefined.
at::Tensor row_weights(const c10::optional<at::Tensor>& weights, const at::Tensor& x) {
  if (!weights.has_value()) return at::Tensor();
  return weights->to(x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat).contiguous();
}

at::Tensor labels_forward_cuda(const at::Tensor& logits, const at::Tensor& labels,
                               const c10::optional<at::Tensor>& weights, double alpha, double gamma,
                               int64_t reduction, double label_smoothing) {
  const char* op = "retina_fast::sigmoid_focal_loss_labels";
  check_labels(logits, labels, gamma, reduction, label_smoothing, op);
  check_row_weights(weights, logits, op);
  check_device(logits, at::kCUDA, op, "logits");
  const c10::cuda::CUDAGuard guard(logits.device());
  const at::Tensor x = logits.contiguous();
  const at::Tensor lab = labels.contiguous();
  const at::Tensor w = row_weights(weights, x);
  const int64_t K = x.size(1);
  const at::ScalarType red = x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  if (K == 0) {  // no classes: nothing to index the labels with (and no division by K)
    if (reduction == kNone) return at::empty_like(x);
    return reduction == kSum ? at::zeros({}, x.options().dtype(red))
                             : at::full({}, NAN, x.options().dtype(red));
  }
  at::Tensor result;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "focal_labels_fwd_cuda", [&] {
    using acc_t = acc_type<scalar_t>;
    LabelTarget<acc_t> tgt{lab.const_data_ptr<int64_t>(), w.defined() ? w.const_data_ptr<acc_t>() : nullptr,
                           K, acc_t(1.0 - 0.5 * label_smoothing), acc_t(0.5 * label_smoothing)};
    result = launch_forward<scalar_t>(x, at::Tensor(), tgt, reduction, alpha, gamma, red, lab, K);
  });
  return result;
}

at::Tensor labels_backward_cuda(const at::Tensor& grad, const at::Tensor& logits,
                                const at::Tensor& labels, const c10::optional<at::Tensor>& weights,
                                double alpha, double gamma, int64_t reduction,
                                double label_smoothing) {
  const char* op = "retina_fast::sigmoid_focal_loss_labels_backward";
  check_labels(logits, labels, gamma, reduction, label_smoothing, op);
  check_row_weights(weights, logits, op);
  check_grad(grad, logits, reduction, op);
  check_device(logits, at::kCUDA, op, "logits");
  const c10::cuda::CUDAGuard guard(logits.device());
  const at::Tensor x = logits.contiguous();
  const at::Tensor lab = labels.contiguous();
  const at::Tensor w = row_weights(weights, x);
  const int64_t K = x.size(1);
  if (K == 0) return at::empty_like(x);
  at::Tensor gin;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "focal_labels_bwd_cuda", [&] {
    using acc_t = acc_type<scalar_t>;
    LabelTarget<acc_t> tgt{lab.const_data_ptr<int64_t>(), w.defined() ? w.const_data_ptr<acc_t>() : nullptr,
                           K, acc_t(1.0 - 0.5 * label_smoothing), acc_t(0.5 * label_smoothing)};
    gin = launch_backward<scalar_t>(grad, x, at::Tensor(), tgt, reduction, alpha, gamma, lab, K);
  });
  return gin;
}

std::tuple<at::Tensor, at::Tensor> labels_forward_with_grad_cuda(
    const at::Tensor& logits, const at::Tensor& labels, const c10::optional<at::Tensor>& weights,
    double alpha, double gamma, int64_t reduction, double label_smoothing) {
  const char* op = "retina_fast::sigmoid_focal_loss_labels_with_grad";
  check_labels(logits, labels, gamma, reduction, label_smoothing, op);
  check_row_weights(weights, logits, op);
  check_device(logits, at::kCUDA, op, "logits");
  TORCH_CHECK(reduction == kMean || reduction == kSum, op,
              ": expected reduction 1 (mean) or 2 (sum), got ", reduction);
  const c10::cuda::CUDAGuard guard(logits.device());
  const at::Tensor x = logits.contiguous();
  const at::Tensor lab = labels.contiguous();
  const at::Tensor w = row_weights(weights, x);
  const int64_t K = x.size(1);
  const at::ScalarType red = x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  if (K == 0) {
    return {reduction == kSum ? at::zeros({}, x.options().dtype(red)) : at::full({}, NAN, x.options().dtype(red)),
            at::empty_like(x)};
  }
  std::tuple<at::Tensor, at::Tensor> out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "focal_labels_fwd_grad_cuda", [&] {
    using acc_t = acc_type<scalar_t>;
    LabelTarget<acc_t> tgt{lab.const_data_ptr<int64_t>(), w.defined() ? w.const_data_ptr<acc_t>() : nullptr,
                           K, acc_t(1.0 - 0.5 * label_smoothing), acc_t(0.5 * label_smoothing)};
    out = launch_forward_grad<scalar_t>(x, tgt, reduction, alpha, gamma, red, lab, K);
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(retina_fast, CUDA, m) {
  m.impl("sigmoid_focal_loss", &dense_forward_cuda);
  m.impl("sigmoid_focal_loss_backward", &dense_backward_cuda);
  m.impl("sigmoid_focal_loss_backward_with_targets", &dense_backward_with_targets_cuda);
  m.impl("sigmoid_focal_loss_labels", &labels_forward_cuda);
  m.impl("sigmoid_focal_loss_labels_backward", &labels_backward_cuda);
  m.impl("sigmoid_focal_loss_labels_with_grad", &labels_forward_with_grad_cuda);
  m.impl("sigmoid_focal_loss_with_grad", &dense_forward_with_grad_cuda);
}

}  // namespace focal
}  // namespace retina_fast
