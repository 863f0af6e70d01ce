// CUDA kernels of the box ops: box_iou, grid_anchors, match_anchors, gather_targets,
// encode_boxes, decode_boxes (+ backward).
//
// match_anchors never writes the [M, A] IoU matrix. Two kernels, grid (anchor tiles, B):
//  pass 1: one thread per anchor walks the image's gts (staged in shared memory in tiles),
//    keeping its best (IoU, gt) in registers; per gt, a warp whose IoUs are not all zero
//    reduces them (NaN-propagating max on order-preserving bits) and lane 0 folds the result
//    into a shared-memory slot with an integer atomicMax; each block then folds its slots
//    into the global per-gt maxima [B, M]. Integer max is exact in any order: deterministic.
//    A warp skips a gt that cannot overlap the bounding box of its 32 anchors (every IoU
//    there is exactly +0; see regular_box in boxes_math.h).
//  pass 2: thresholds, and the low-quality restore for anchors labelled -1/-2 whose best IoU
//    reaches a gt's maximum: IoU recomputed, compared with ==.
// Memory: O(B*A) for the best IoU/index and O(B*M) for the maxima. All index math is int64.
// Rounding: -fmad=false for the whole extension plus __fmul_rn & co. in box_math.h, so every
// IoU rounds as on the CPU and in torchvision.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <limits>
#include <type_traits>
#include <vector>

#include "boxes/box_loss_math.h"
#include "boxes/boxes_checks.h"
#include "boxes/boxes_math.h"
#include "common/cuda_utils.cuh"

namespace retina_fast {
namespace boxes {
namespace {

using cuda::kThreads;
constexpr int kGtTile = 256;     // gts staged in shared memory at once
constexpr int kMaxLevels = 16;   // grid_anchors levels passed by value
constexpr unsigned kFull = 0xffffffffu;

template <typename acc_t>
using bits_type = std::conditional_t<std::is_same<acc_t, double>::value, unsigned long long,
                                     unsigned int>;

template <typename T>
__device__ __forceinline__ T warp_max(T v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) {
    const T u = __shfl_xor_sync(kFull, v, o);
    v = u > v ? u : v;
  }
  return v;
}
template <typename T>
__device__ __forceinline__ T warp_min_f(T v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) {
    const T u = __shfl_xor_sync(kFull, v, o);
    v = u < v ? u : v;
  }
  return v;
}

// ------------------------------------------------------------------ box_iou

template <typename scalar_t>
__global__ void box_iou_kernel(const scalar_t* __restrict__ b1, const scalar_t* __restrict__ b2,
                               int64_t N, int64_t M, acc_type<scalar_t>* __restrict__ out) {
  using acc_t = acc_type<scalar_t>;
  const round_for<scalar_t> r;
  const int64_t total = N * M;
  const int64_t stride = int64_t(gridDim.x) * blockDim.x;
  for (int64_t e = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; e < total; e += stride) {
    const int64_t i = e / M, j = e - i * M;
    const acc_t ax1 = acc_t(b1[4 * i]), ay1 = acc_t(b1[4 * i + 1]);
    const acc_t ax2 = acc_t(b1[4 * i + 2]), ay2 = acc_t(b1[4 * i + 3]);
    const acc_t bx1 = acc_t(b2[4 * j]), by1 = acc_t(b2[4 * j + 1]);
    const acc_t bx2 = acc_t(b2[4 * j + 2]), by2 = acc_t(b2[4 * j + 3]);
    out[e] = iou_coords(ax1, ay1, ax2, ay2, box_area(ax1, ay1, ax2, ay2), bx1, by1, bx2, by2,
                        box_area(bx1, by1, bx2, by2), r);
  }
}

at::Tensor box_iou_cuda(const at::Tensor& boxes1, const at::Tensor& boxes2) {
  check_box_iou(boxes1, boxes2);
  const c10::cuda::CUDAGuard guard(boxes1.device());
  const at::ScalarType st = promoted(boxes1, boxes2);
  const at::Tensor b1 = boxes1.to(st).contiguous();
  const at::Tensor b2 = boxes2.to(st).contiguous();
  const int64_t N = b1.size(0), M = b2.size(0);
  at::Tensor out = at::empty({N, M}, b1.options().dtype(iou_dtype(st)));
  if (N == 0 || M == 0) return out;
  cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, st, "box_iou_cuda", [&] {
    cuda::launch(box_iou_kernel<scalar_t>, cuda::grid_for(N * M), kThreads, 0, stream,
        b1.const_data_ptr<scalar_t>(), b2.const_data_ptr<scalar_t>(), N, M,
        out.mutable_data_ptr<acc_type<scalar_t>>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

// ------------------------------------------------------------------ match_anchors

// An anchor in registers plus the bounding box / regularity of its warp's anchors.
template <typename acc_t>
struct WarpAnchor {
  acc_t x1, y1, x2, y2, area;
  acc_t wx1, wy1, wx2, wy2;
  bool warp_regular;

  template <typename scalar_t>
  __device__ __forceinline__ void load(const scalar_t* __restrict__ anchors, int64_t a,
                                       bool valid) {
    const acc_t inf = std::numeric_limits<acc_t>::infinity();
    bool reg = true;
    if (valid) {
      x1 = acc_t(anchors[4 * a]);
      y1 = acc_t(anchors[4 * a + 1]);
      x2 = acc_t(anchors[4 * a + 2]);
      y2 = acc_t(anchors[4 * a + 3]);
      area = box_area(x1, y1, x2, y2);
      reg = regular_box(x1, y1, x2, y2, area);
    } else {
      x1 = y1 = x2 = y2 = area = acc_t(0);
    }
    warp_regular = __all_sync(kFull, reg);
    wx1 = warp_min_f(valid ? x1 : inf);
    wy1 = warp_min_f(valid ? y1 : inf);
    wx2 = warp_max(valid ? x2 : -inf);
    wy2 = warp_max(valid ? y2 : -inf);
  }
};

// Stage gts [t0, t0 + n) of image b in shared memory: x1, y1, x2, y2, area, regular.
template <typename scalar_t, typename acc_t>
__device__ __forceinline__ void stage_gts(const scalar_t* __restrict__ gts, int64_t row0, int n,
                                          acc_t (*sg)[kGtTile], uint8_t* sreg) {
  for (int k = threadIdx.x; k < n; k += blockDim.x) {
    const scalar_t* g = gts + 4 * (row0 + k);
    const acc_t x1 = acc_t(g[0]), y1 = acc_t(g[1]), x2 = acc_t(g[2]), y2 = acc_t(g[3]);
    const acc_t ar = box_area(x1, y1, x2, y2);
    sg[0][k] = x1;
    sg[1][k] = y1;
    sg[2][k] = x2;
    sg[3][k] = y2;
    sg[4][k] = ar;
    sreg[k] = regular_box(x1, y1, x2, y2, ar);
  }
}

// Crowd flags of the staged gts (0 without crowd information).
__device__ __forceinline__ void stage_crowd(const uint8_t* __restrict__ crowd, int64_t row0, int n,
                                            uint8_t* scrowd) {
  for (int k = threadIdx.x; k < n; k += blockDim.x) scrowd[k] = crowd ? crowd[row0 + k] : uint8_t(0);
}

template <typename acc_t>
__device__ __forceinline__ bool warp_skips(const WarpAnchor<acc_t>& w, acc_t (*sg)[kGtTile],
                                           const uint8_t* sreg, int k) {
  return w.warp_regular && sreg[k] &&
         disjoint(sg[0][k], sg[1][k], sg[2][k], sg[3][k], w.wx1, w.wy1, w.wx2, w.wy2);
}

__device__ __forceinline__ int64_t gt_count(const int64_t* counts, int64_t b, int64_t M) {
  const int64_t c = counts[b];
  RF_DEVICE_ASSERT(c >= 0 && c <= M, "retina_fast::match_anchors: expected every gt_counts[b] in [0, M]");
  return c < 0 ? 0 : (c > M ? M : c);  // after a failed assertion (the launch fails): in bounds
}

// Grid (anchor tiles, images): images run along y in a grid-stride loop, so any number of
// images fits the limit of gridDim.y (65,535; the device's maxGridSize[1]).
template <typename scalar_t>
__global__ void __launch_bounds__(kThreads) match_pass1_kernel(
    const scalar_t* __restrict__ anchors, int64_t A, const scalar_t* __restrict__ gts,
    const int64_t* __restrict__ counts, int64_t B, int64_t M, const uint8_t* __restrict__ crowd,
    const int32_t* __restrict__ first, acc_type<scalar_t>* __restrict__ best_val,
    int32_t* __restrict__ best_idx, bits_type<acc_type<scalar_t>>* __restrict__ gmax) {
  using acc_t = acc_type<scalar_t>;
  using bits_t = bits_type<acc_t>;
  RF_SHARED(acc_t, sg, [5][kGtTile]);
  RF_SHARED(uint8_t, sreg, [kGtTile]);
  RF_SHARED(uint8_t, scrowd, [kGtTile]);
  RF_SHARED(bits_t, smax, [kGtTile]);
  const round_for<scalar_t> r;
  const int64_t a = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  const bool valid = a < A;
  const int lane = threadIdx.x & 31;
  WarpAnchor<acc_t> w;
  w.load(anchors, a, valid);
  for (int64_t b = blockIdx.y; b < B; b += gridDim.y) {
    const int64_t Mb = gt_count(counts, b, M);
    acc_t bv = acc_t(0);
    // an anchor that overlaps no gt keeps the first gt to match (torch.max's first index)
    int32_t bi = first ? first[b] : 0;
    for (int64_t t0 = 0; t0 < Mb; t0 += kGtTile) {
      const int n = int(Mb - t0 < kGtTile ? Mb - t0 : kGtTile);
      __syncthreads();
      stage_gts(gts, b * M + t0, n, sg, sreg);
      stage_crowd(crowd, b * M + t0, n, scrowd);
      for (int k = threadIdx.x; k < n; k += blockDim.x) smax[k] = 0;
      __syncthreads();
      for (int k = 0; k < n; ++k) {
        // crowd gts are no candidates (their maximum stays 0 and pass 2 ignores it)
        if (scrowd[k] || warp_skips(w, sg, sreg, k)) continue;  // block- / warp-uniform
        acc_t v = iou_coords(sg[0][k], sg[1][k], sg[2][k], sg[3][k], sg[4][k], w.x1, w.y1, w.x2,
                             w.y2, w.area, r);
        if (!valid) v = acc_t(0);
        if (better(v, bv)) {
          bv = v;
          bi = int32_t(t0 + k);
        }
        bits_t e = iou_bits(v);
        if (__any_sync(kFull, e != 0)) {
          e = warp_max(e);
          if (lane == 0) atomicMax(&smax[k], e);
        }
      }
      __syncthreads();
      for (int k = threadIdx.x; k < n; k += blockDim.x)
        if (smax[k] != 0) atomicMax(&gmax[b * M + t0 + k], smax[k]);
    }
    if (valid) {
      best_val[b * A + a] = bv;
      best_idx[b * A + a] = bi;
    }
  }  // images
}

template <typename scalar_t>
__global__ void __launch_bounds__(kThreads) match_pass2_kernel(
    const scalar_t* __restrict__ anchors, int64_t A, const scalar_t* __restrict__ gts,
    const int64_t* __restrict__ counts, int64_t B, int64_t M,
    const acc_type<scalar_t>* __restrict__ best_val, const int32_t* __restrict__ best_idx,
    const bits_type<acc_type<scalar_t>>* __restrict__ gmax, acc_type<scalar_t> high,
    acc_type<scalar_t> low, bool allow_lq, bool quirk, const uint8_t* __restrict__ crowd,
    const int64_t* __restrict__ nmatch, const int64_t* __restrict__ ncrowd,
    acc_type<scalar_t> crowd_thresh, int64_t* __restrict__ labels) {
  using acc_t = acc_type<scalar_t>;
  RF_SHARED(acc_t, sg, [5][kGtTile]);
  RF_SHARED(uint8_t, sreg, [kGtTile]);
  RF_SHARED(uint8_t, scrowd, [kGtTile]);
  RF_SHARED(acc_t, sm, [kGtTile]);
  const round_for<scalar_t> r;
  const int64_t a = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  const bool valid = a < A;
  WarpAnchor<acc_t> w;
  w.load(anchors, a, valid);
  for (int64_t b = blockIdx.y; b < B; b += gridDim.y) {  // block-uniform, as in pass 1
    const int64_t Mb = gt_count(counts, b, M);
    const int64_t nm = nmatch ? nmatch[b] : Mb;  // gts to match (not crowd)
    const acc_t bv = valid ? best_val[b * A + a] : acc_t(0);
    const int64_t bi = valid ? int64_t(best_idx[b * A + a]) : 0;
    int64_t lab = -1;
    if (nm > 0) {  // block-uniform
      lab = threshold_label(bv, bi, high, low);
      if (allow_lq) {
        bool restore_all = false;
        if (quirk) {
          // A matched gt whose maximum is 0 ties with every anchor: all take their best gt.
          int zero = 0;
          for (int64_t k = threadIdx.x; k < Mb; k += blockDim.x)
            zero |= gmax[b * M + k] == 0 && !(crowd && crowd[b * M + k]);
          restore_all = __syncthreads_or(zero);
        }
        if (restore_all) {
          lab = bi;
        } else {
          const bool need = valid && lab < 0;
          bool hit = false;
          for (int64_t t0 = 0; t0 < Mb; t0 += kGtTile) {
            const int n = int(Mb - t0 < kGtTile ? Mb - t0 : kGtTile);
            __syncthreads();
            stage_gts(gts, b * M + t0, n, sg, sreg);
            for (int k = threadIdx.x; k < n; k += blockDim.x) sm[k] = iou_from_bits(gmax[b * M + t0 + k]);
            __syncthreads();
            if (!__any_sync(kFull, need && !hit)) continue;
            for (int k = 0; k < n; ++k) {
              const acc_t gm = sm[k];
              // NaN ties nothing; crowd gts keep a maximum of 0 and tie nothing either
              if (!(gm > acc_t(0)) || warp_skips(w, sg, sreg, k)) continue;
              if (need && !hit && !(bv < gm)) {
                const acc_t v = iou_coords(sg[0][k], sg[1][k], sg[2][k], sg[3][k], sg[4][k], w.x1, w.y1,
                                           w.x2, w.y2, w.area, r);
                hit = v == gm;
              }
            }
          }
          if (hit) lab = bi;
        }
      }
    }
    if (ncrowd && (ncrowd[b] > 0 || acc_t(0) >= crowd_thresh)) {  // block-uniform
      // Crowd regions: the largest share of a background anchor inside a crowd box (0 without
      // one, which a threshold <= 0 reaches, as on the CPU).
      const bool need = valid && lab == -1;
      if (__syncthreads_or(need)) {
        acc_t m = acc_t(0);
        for (int64_t t0 = 0; t0 < Mb; t0 += kGtTile) {
          const int n = int(Mb - t0 < kGtTile ? Mb - t0 : kGtTile);
          __syncthreads();
          stage_gts(gts, b * M + t0, n, sg, sreg);
          stage_crowd(crowd, b * M + t0, n, scrowd);
          __syncthreads();
          if (!__any_sync(kFull, need)) continue;
          for (int k = 0; k < n; ++k) {
            // disjoint boxes share exactly 0, which only a threshold <= 0 reaches
            if (!scrowd[k] || (crowd_thresh > acc_t(0) && warp_skips(w, sg, sreg, k))) continue;
            if (need)
              m = nan_max(m, ioa_coords(sg[0][k], sg[1][k], sg[2][k], sg[3][k], w.x1, w.y1, w.x2,
                                        w.y2, w.area, r));
          }
        }
        if (need && m >= crowd_thresh) lab = -2;
      }
    }
    if (valid) labels[b * A + a] = lab;
  }  // images
}

at::Tensor match_anchors_cuda(const at::Tensor& anchors, const at::Tensor& gt_boxes,
                              const at::Tensor& gt_counts, double high, double low,
                              bool allow_low_quality_matches, bool zero_iou_quirk,
                              const c10::optional<at::Tensor>& gt_crowd, double crowd_ioa_thresh) {
  check_match(anchors, gt_boxes, gt_counts, high, low, gt_crowd);
  const c10::cuda::CUDAGuard guard(anchors.device());
  const at::ScalarType st = promoted(anchors, gt_boxes);
  const at::Tensor an = anchors.to(st).contiguous();
  const at::Tensor gt = gt_boxes.to(st).contiguous();
  const at::Tensor cnt = gt_counts.to(at::kLong).contiguous();
  const int64_t A = an.size(0), B = gt.size(0), M = gt.size(1);
  TORCH_CHECK(M <= std::numeric_limits<int32_t>::max(),
              "retina_fast::match_anchors: expected M < 2^31 gts per image, got ", M);
  at::Tensor out = at::empty({B, A}, an.options().dtype(at::kLong));
  if (A == 0 || B == 0) return out;
  cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  // Per image on the device (no sync): gts to match, crowd gts, the first gt to match.
  const at::Tensor cr = crowd_mask(gt_crowd);
  at::Tensor nmatch, ncrowd, first;
  if (cr.defined() && M > 0) {
    const at::Tensor rows = at::arange(M, cnt.options()).unsqueeze(0) < cnt.unsqueeze(1);
    const at::Tensor crowd_rows = rows.logical_and(cr.ne(0));
    ncrowd = crowd_rows.sum(1);
    nmatch = cnt.clamp(0, M) - ncrowd;
    first = rows.logical_and(crowd_rows.logical_not()).to(at::kInt).argmax(1).to(at::kInt).contiguous();
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, st, "match_anchors_cuda", [&] {
    using acc_t = acc_type<scalar_t>;
    using bits_t = bits_type<acc_t>;
    const at::ScalarType acc_st = std::is_same<acc_t, double>::value ? at::kDouble : at::kFloat;
    const at::ScalarType bits_st = std::is_same<acc_t, double>::value ? at::kLong : at::kInt;
    at::Tensor best_val = at::empty({B, A}, an.options().dtype(acc_st));
    at::Tensor best_idx = at::empty({B, A}, an.options().dtype(at::kInt));
    at::Tensor gmax = at::zeros({B, std::max<int64_t>(M, 1)}, an.options().dtype(bits_st));
    const int64_t max_y = at::cuda::getCurrentDeviceProperties()->maxGridSize[1];  // 65,535
    const dim3 grid(unsigned((A + kThreads - 1) / kThreads), unsigned(std::min<int64_t>(B, max_y)));
    bits_t* gm = reinterpret_cast<bits_t*>(gmax.data_ptr());
    cuda::launch(match_pass1_kernel<scalar_t>, grid, kThreads, 0, stream,
        an.const_data_ptr<scalar_t>(), A, gt.const_data_ptr<scalar_t>(),
        cnt.const_data_ptr<int64_t>(), B, M, cr.defined() ? cr.const_data_ptr<uint8_t>() : nullptr,
        first.defined() ? first.const_data_ptr<int32_t>() : nullptr, best_val.mutable_data_ptr<acc_t>(),
        best_idx.mutable_data_ptr<int32_t>(), gm);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    cuda::launch(match_pass2_kernel<scalar_t>, grid, kThreads, 0, stream,
        an.const_data_ptr<scalar_t>(), A, gt.const_data_ptr<scalar_t>(),
        cnt.const_data_ptr<int64_t>(), B, M, best_val.const_data_ptr<acc_t>(),
        best_idx.const_data_ptr<int32_t>(), gm, acc_t(high), acc_t(low),
        allow_low_quality_matches, zero_iou_quirk, cr.defined() ? cr.const_data_ptr<uint8_t>() : nullptr,
        nmatch.defined() ? nmatch.const_data_ptr<int64_t>() : nullptr,
        ncrowd.defined() ? ncrowd.const_data_ptr<int64_t>() : nullptr, acc_t(crowd_ioa_thresh),
        out.mutable_data_ptr<int64_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

// ------------------------------------------------------------------ gather_targets

template <typename scalar_t>
__global__ void gather_targets_kernel(const int64_t* __restrict__ matches,
                                      const scalar_t* __restrict__ anchors,
                                      const scalar_t* __restrict__ gts,
                                      const int64_t* __restrict__ gt_labels, int64_t B,
                                      int64_t A, int64_t M, scalar_t wx, scalar_t wy,
                                      scalar_t ww, scalar_t wh, int64_t* __restrict__ labels,
                                      scalar_t* __restrict__ targets) {
  const int64_t total = B * A;
  const int64_t stride = int64_t(gridDim.x) * blockDim.x;
  for (int64_t r = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; r < total; r += stride) {
    const int64_t b = r / A, i = r - b * A, m = matches[r];
    RF_DEVICE_ASSERT(m >= -2 && m < M, "retina_fast::gather_targets: expected matches in [0, M), -1 or -2");
    if (m >= 0 && m < M) {
      labels[r] = gt_labels[b * M + m];
      encode_box(gts + 4 * (b * M + m), anchors + 4 * i, wx, wy, ww, wh, targets + 4 * r);
    } else {
      labels[r] = m == -2 ? -2 : -1;
      for (int j = 0; j < 4; ++j) targets[4 * r + j] = scalar_t(0);
    }
  }
}

std::tuple<at::Tensor, at::Tensor> gather_targets_cuda(const at::Tensor& matches,
                                                       const at::Tensor& anchors,
                                                       const at::Tensor& gt_boxes,
                                                       const at::Tensor& gt_labels,
                                                       at::ArrayRef<double> weights,
                                                       bool /*check_matches: always, a device-side assertion*/) {
  check_gather(matches, anchors, gt_boxes, gt_labels);
  const Weights w = check_weights(weights, "retina_fast::gather_targets");
  const c10::cuda::CUDAGuard guard(anchors.device());
  const at::ScalarType st = promoted(anchors, gt_boxes);
  const at::Tensor an = anchors.to(st).contiguous();
  const at::Tensor gt = gt_boxes.to(st).contiguous();
  const at::Tensor mt = matches.contiguous();
  const at::Tensor gl = gt_labels.contiguous();
  const int64_t B = mt.size(0), A = mt.size(1), M = gt.size(1);
  at::Tensor labels = at::empty({B, A}, mt.options());
  at::Tensor targets = at::empty({B, A, 4}, an.options());
  if (B * A == 0) return {labels, targets};
  cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, st, "gather_targets_cuda", [&] {
    cuda::launch(gather_targets_kernel<scalar_t>, cuda::grid_for(B * A), kThreads, 0, stream,
        mt.const_data_ptr<int64_t>(), an.const_data_ptr<scalar_t>(),
        gt.const_data_ptr<scalar_t>(), gl.const_data_ptr<int64_t>(), B, A, M,
        scalar_t(w.wx), scalar_t(w.wy), scalar_t(w.ww), scalar_t(w.wh),
        labels.mutable_data_ptr<int64_t>(), targets.mutable_data_ptr<scalar_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {labels, targets};
}

// ------------------------------------------------------------------ matched_box_loss

// One thread per anchor (grid-stride); only foreground anchors (match in [0, M)) read their
// codes, anchor and gt row. A match out of [-2, M) fails a device-side assertion, as the CPU
// kernel raises, and reads nothing. Block partials summed in a
// fixed order by one block: deterministic, no float atomics.
template <typename scalar_t, typename enc_t>
__global__ void box_loss_kernel(const scalar_t* __restrict__ reg, const enc_t* __restrict__ anchors,
                                const int64_t* __restrict__ matches, const enc_t* __restrict__ gts,
                                const double* __restrict__ iw, int64_t B, int64_t A, int64_t M,
                                BoxLoss kind, CoderParams cp, double beta, double eps,
                                double* __restrict__ partials) {
  using acc_t = acc_type<scalar_t>;
  RF_SHARED(double, smem, [32]);
  double acc = 0.0;
  const int64_t stride = int64_t(gridDim.x) * blockDim.x;
  for (int64_t r = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; r < B * A; r += stride) {
    const int64_t m = matches[r];
    RF_DEVICE_ASSERT(m >= -2 && m < M, "retina_fast::matched_box_loss: expected matches in [0, M), -1 or -2");
    if (m < 0 || m >= M) continue;
    const int64_t b = r / A, i = r - b * A;
    acc_t codes[4];
#pragma unroll
    for (int j = 0; j < 4; ++j) codes[j] = acc_t(reg[4 * r + j]);
    acc += iw[b] * double(box_loss_one<acc_t, enc_t>(kind, codes, anchors + 4 * i, gts + 4 * (b * M + m), cp,
                                                     acc_t(beta), acc_t(eps), acc_t(1), nullptr));
  }
  acc = cuda::block_reduce_sum(acc, smem);
  if (threadIdx.x == 0) partials[blockIdx.x] = acc;
}

template <typename out_t>
__global__ void box_loss_finish_kernel(const double* __restrict__ partials, int64_t n, out_t* __restrict__ out) {
  RF_SHARED(double, smem, [32]);
  double acc = 0.0;
  for (int64_t i = threadIdx.x; i < n; i += blockDim.x) acc += partials[i];
  acc = cuda::block_reduce_sum(acc, smem);
  if (threadIdx.x == 0) *out = out_t(acc);
}

template <typename scalar_t, typename enc_t>
__global__ void box_loss_backward_kernel(const acc_type<scalar_t>* __restrict__ grad, const scalar_t* __restrict__ reg,
                                         const enc_t* __restrict__ anchors, const int64_t* __restrict__ matches,
                                         const enc_t* __restrict__ gts, const double* __restrict__ iw,
                                         int64_t B, int64_t A, int64_t M, BoxLoss kind, CoderParams cp,
                                         double beta, double eps, scalar_t* __restrict__ out) {
  using acc_t = acc_type<scalar_t>;
  const double gscale = double(*grad);  // upstream scalar, read on the device: no sync
  const int64_t stride = int64_t(gridDim.x) * blockDim.x;
  for (int64_t r = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; r < B * A; r += stride) {
    const int64_t m = matches[r];
    RF_DEVICE_ASSERT(m >= -2 && m < M, "retina_fast::matched_box_loss_backward: expected matches in [0, M), -1 or -2");
    scalar_t* o = out + 4 * r;
    if (m < 0 || m >= M) {
#pragma unroll
      for (int j = 0; j < 4; ++j) o[j] = scalar_t(0);
      continue;
    }
    const int64_t b = r / A, i = r - b * A;
    acc_t codes[4], g[4];
#pragma unroll
    for (int j = 0; j < 4; ++j) codes[j] = acc_t(reg[4 * r + j]);
    box_loss_one<acc_t, enc_t>(kind, codes, anchors + 4 * i, gts + 4 * (b * M + m), cp, acc_t(beta), acc_t(eps),
                               acc_t(gscale * iw[b]), g);
#pragma unroll
    for (int j = 0; j < 4; ++j) o[j] = scalar_t(g[j]);
  }
}

inline at::ScalarType encode_dtype(const at::Tensor& anchors, const at::Tensor& gt_boxes) {
  return promoted(anchors, gt_boxes) == at::kDouble ? at::kDouble : at::kFloat;
}

at::Tensor matched_box_loss_cuda(const at::Tensor& bbox_regression, const at::Tensor& anchors,
                                 const at::Tensor& matches, const at::Tensor& gt_boxes,
                                 const at::Tensor& image_weights, int64_t loss_type,
                                 at::ArrayRef<double> weights, double clip, double beta, double eps) {
  const char* op = "retina_fast::matched_box_loss";
  check_box_loss(bbox_regression, anchors, matches, gt_boxes, image_weights, loss_type, beta, eps, op);
  const Weights w = check_weights(weights, op);
  const c10::cuda::CUDAGuard guard(bbox_regression.device());
  const at::ScalarType est = encode_dtype(anchors, gt_boxes);
  const at::Tensor reg = bbox_regression.contiguous();
  const at::Tensor an = anchors.to(est).contiguous();
  const at::Tensor gt = gt_boxes.to(est).contiguous();
  const at::Tensor mt = matches.contiguous();
  const at::Tensor iw = image_weights.to(at::kDouble).contiguous();
  const int64_t B = reg.size(0), A = reg.size(1), M = gt.size(1);
  const at::ScalarType out_t = reg.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  at::Tensor out = at::empty({}, reg.options().dtype(out_t));
  cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  const int64_t blocks = cuda::grid_for(std::max<int64_t>(B * A, 1));
  at::Tensor partials = at::zeros({blocks}, reg.options().dtype(at::kDouble));
  const CoderParams cp{w.wx, w.wy, w.ww, w.wh, clip};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, reg.scalar_type(), "matched_box_loss_cuda", [&] {
    if (B * A > 0) {
      if (est == at::kDouble) {
        cuda::launch(box_loss_kernel<scalar_t, double>, blocks, kThreads, 0, stream,
            reg.const_data_ptr<scalar_t>(), an.const_data_ptr<double>(), mt.const_data_ptr<int64_t>(),
            gt.const_data_ptr<double>(), iw.const_data_ptr<double>(), B, A, M, static_cast<BoxLoss>(loss_type),
            cp, beta, eps, partials.mutable_data_ptr<double>());
      } else {
        cuda::launch(box_loss_kernel<scalar_t, float>, blocks, kThreads, 0, stream,
            reg.const_data_ptr<scalar_t>(), an.const_data_ptr<float>(), mt.const_data_ptr<int64_t>(),
            gt.const_data_ptr<float>(), iw.const_data_ptr<double>(), B, A, M, static_cast<BoxLoss>(loss_type),
            cp, beta, eps, partials.mutable_data_ptr<double>());
      }
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
  });
  if (out_t == at::kDouble) {
    cuda::launch(box_loss_finish_kernel<double>, 1, 1024, 0, stream, partials.const_data_ptr<double>(), blocks,
                                                           out.mutable_data_ptr<double>());
  } else {
    cuda::launch(box_loss_finish_kernel<float>, 1, 1024, 0, stream, partials.const_data_ptr<double>(), blocks,
                                                          out.mutable_data_ptr<float>());
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

at::Tensor matched_box_loss_backward_cuda(const at::Tensor& grad, const at::Tensor& bbox_regression,
                                          const at::Tensor& anchors, const at::Tensor& matches,
                                          const at::Tensor& gt_boxes, const at::Tensor& image_weights,
                                          int64_t loss_type, at::ArrayRef<double> weights, double clip,
                                          double beta, double eps) {
  const char* op = "retina_fast::matched_box_loss_backward";
  check_box_loss(bbox_regression, anchors, matches, gt_boxes, image_weights, loss_type, beta, eps, op);
  TORCH_CHECK(grad.numel() == 1, op, ": expected a scalar grad, got shape ", grad.sizes());
  check_same_device(grad, bbox_regression, op, "grad", "bbox_regression");
  const Weights w = check_weights(weights, op);
  const c10::cuda::CUDAGuard guard(bbox_regression.device());
  const at::ScalarType est = encode_dtype(anchors, gt_boxes);
  const at::Tensor reg = bbox_regression.contiguous();
  const at::Tensor an = anchors.to(est).contiguous();
  const at::Tensor gt = gt_boxes.to(est).contiguous();
  const at::Tensor mt = matches.contiguous();
  const at::Tensor iw = image_weights.to(at::kDouble).contiguous();
  const int64_t B = reg.size(0), A = reg.size(1), M = gt.size(1);
  at::Tensor out = at::empty_like(reg);
  if (B * A == 0) return out;
  // the upstream gradient in the math dtype (float32 for 16-bit codes, float64 for float64)
  const at::Tensor g = grad.reshape({}).to(reg.scalar_type() == at::kDouble ? at::kDouble : at::kFloat);
  cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  const CoderParams cp{w.wx, w.wy, w.ww, w.wh, clip};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, reg.scalar_type(), "matched_box_loss_backward_cuda", [&] {
    if (est == at::kDouble) {
      cuda::launch(box_loss_backward_kernel<scalar_t, double>, cuda::grid_for(B * A), kThreads, 0, stream,
          g.const_data_ptr<acc_type<scalar_t>>(), reg.const_data_ptr<scalar_t>(), an.const_data_ptr<double>(),
          mt.const_data_ptr<int64_t>(), gt.const_data_ptr<double>(), iw.const_data_ptr<double>(), B, A, M,
          static_cast<BoxLoss>(loss_type), cp, beta, eps, out.mutable_data_ptr<scalar_t>());
    } else {
      cuda::launch(box_loss_backward_kernel<scalar_t, float>, cuda::grid_for(B * A), kThreads, 0, stream,
          g.const_data_ptr<acc_type<scalar_t>>(), reg.const_data_ptr<scalar_t>(), an.const_data_ptr<float>(),
          mt.const_data_ptr<int64_t>(), gt.const_data_ptr<float>(), iw.const_data_ptr<double>(), B, A, M,
          static_cast<BoxLoss>(loss_type), cp, beta, eps, out.mutable_data_ptr<scalar_t>());
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

// ------------------------------------------------------------------ encode / decode

template <typename scalar_t>
__global__ void encode_kernel(const scalar_t* __restrict__ ref, const scalar_t* __restrict__ prop,
                              int64_t rows, int64_t nprop, scalar_t wx, scalar_t wy, scalar_t ww,
                              scalar_t wh, scalar_t* __restrict__ out) {
  const int64_t stride = int64_t(gridDim.x) * blockDim.x;
  for (int64_t r = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; r < rows; r += stride)
    encode_box(ref + 4 * r, prop + 4 * (r % nprop), wx, wy, ww, wh, out + 4 * r);
}

at::Tensor encode_boxes_cuda(const at::Tensor& reference_boxes, const at::Tensor& proposals,
                             at::ArrayRef<double> weights) {
  const int64_t nprop = check_encode(reference_boxes, proposals);
  const Weights w = check_weights(weights, "retina_fast::encode_boxes");
  const c10::cuda::CUDAGuard guard(reference_boxes.device());
  const at::ScalarType st = promoted(reference_boxes, proposals);
  const at::Tensor ref = reference_boxes.to(st).contiguous();
  const at::Tensor prop = proposals.to(st).contiguous();
  at::Tensor out = at::empty(ref.sizes(), ref.options());
  const int64_t rows = ref.numel() / 4;
  if (rows == 0) return out;
  cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, st, "encode_boxes_cuda", [&] {
    cuda::launch(encode_kernel<scalar_t>, cuda::grid_for(rows), kThreads, 0, stream,
        ref.const_data_ptr<scalar_t>(), prop.const_data_ptr<scalar_t>(), rows, nprop,
        scalar_t(w.wx), scalar_t(w.wy), scalar_t(w.ww), scalar_t(w.wh),
        out.mutable_data_ptr<scalar_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

template <typename scalar_t>
__global__ void decode_kernel(const scalar_t* __restrict__ codes, const scalar_t* __restrict__ boxes,
                              int64_t n, int64_t k, int64_t box_rows, scalar_t wx, scalar_t wy,
                              scalar_t ww, scalar_t wh, scalar_t clip,
                              scalar_t* __restrict__ out) {
  const int64_t stride = int64_t(gridDim.x) * blockDim.x;
  for (int64_t e = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; e < n; e += stride) {
    const int64_t r = e / k;
    decode_box(codes + 4 * e, boxes + 4 * (r % box_rows), wx, wy, ww, wh, clip, out + 4 * e);
  }
}

template <typename scalar_t>
__global__ void decode_backward_kernel(const scalar_t* __restrict__ grad,
                                       const scalar_t* __restrict__ codes,
                                       const scalar_t* __restrict__ boxes, int64_t n, int64_t k,
                                       int64_t box_rows, acc_type<scalar_t> wx,
                                       acc_type<scalar_t> wy, acc_type<scalar_t> ww,
                                       acc_type<scalar_t> wh, acc_type<scalar_t> clip,
                                       scalar_t* __restrict__ out) {
  using acc_t = acc_type<scalar_t>;
  const int64_t stride = int64_t(gridDim.x) * blockDim.x;
  for (int64_t e = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; e < n; e += stride) {
    const int64_t br = (e / k) % box_rows;
    acc_t g[4], c[4], bx[4], res[4];
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      g[j] = acc_t(grad[4 * e + j]);
      c[j] = acc_t(codes[4 * e + j]);
      bx[j] = acc_t(boxes[4 * br + j]);
    }
    decode_box_backward(g, c, bx, wx, wy, ww, wh, clip, res);
#pragma unroll
    for (int j = 0; j < 4; ++j) out[4 * e + j] = scalar_t(res[j]);
  }
}

at::Tensor decode_boxes_cuda(const at::Tensor& rel_codes, const at::Tensor& boxes,
                             at::ArrayRef<double> weights, double clip) {
  const char* opn = "retina_fast::decode_boxes";
  const DecodeShape sh = check_decode(rel_codes, boxes, opn);
  const Weights w = check_weights(weights, opn);
  const c10::cuda::CUDAGuard guard(rel_codes.device());
  const at::Tensor codes = rel_codes.contiguous();
  const at::Tensor bx = boxes.to(codes.scalar_type()).contiguous();
  at::Tensor out = at::empty(codes.sizes(), codes.options());
  const int64_t n = sh.rows * sh.k;
  if (n == 0) return out;
  cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, codes.scalar_type(), "decode_boxes_cuda", [&] {
    cuda::launch(decode_kernel<scalar_t>, cuda::grid_for(n), kThreads, 0, stream,
        codes.const_data_ptr<scalar_t>(), bx.const_data_ptr<scalar_t>(), n, sh.k, sh.box_rows,
        scalar_t(w.wx), scalar_t(w.wy), scalar_t(w.ww), scalar_t(w.wh), scalar_t(clip),
        out.mutable_data_ptr<scalar_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

at::Tensor decode_boxes_backward_cuda(const at::Tensor& grad, const at::Tensor& rel_codes,
                                      const at::Tensor& boxes, at::ArrayRef<double> weights,
                                      double clip) {
  const char* opn = "retina_fast::decode_boxes_backward";
  const DecodeShape sh = check_decode(rel_codes, boxes, opn);
  const Weights w = check_weights(weights, opn);
  TORCH_CHECK(grad.sizes() == rel_codes.sizes(), opn, ": expected grad of shape ",
              rel_codes.sizes(), ", got ", grad.sizes());
  check_same_device(grad, rel_codes, opn, "grad", "rel_codes");
  const c10::cuda::CUDAGuard guard(rel_codes.device());
  const at::Tensor codes = rel_codes.contiguous();
  const at::Tensor g = grad.to(codes.scalar_type()).contiguous();
  const at::Tensor bx = boxes.to(codes.scalar_type()).contiguous();
  at::Tensor out = at::empty(codes.sizes(), codes.options());
  const int64_t n = sh.rows * sh.k;
  if (n == 0) return out;
  cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, codes.scalar_type(), "decode_boxes_backward_cuda", [&] {
    using acc_t = acc_type<scalar_t>;
    cuda::launch(decode_backward_kernel<scalar_t>, cuda::grid_for(n), kThreads, 0, stream,
        g.const_data_ptr<scalar_t>(), codes.const_data_ptr<scalar_t>(),
        bx.const_data_ptr<scalar_t>(), n, sh.k, sh.box_rows, acc_t(w.wx), acc_t(w.wy),
        acc_t(w.ww), acc_t(w.wh), acc_t(clip), out.mutable_data_ptr<scalar_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

// ------------------------------------------------------------------ grid_anchors

struct LevelTable {
  int64_t off[kMaxLevels + 1];  // first output anchor of each level, total at [L]
  int64_t cell0[kMaxLevels];    // first cell anchor of each level
  int64_t n[kMaxLevels];        // cell anchors per position
  int64_t W[kMaxLevels];        // grid width
  int32_t sh[kMaxLevels], sw[kMaxLevels];
  int L;
};

template <typename scalar_t>
__global__ void grid_anchors_kernel(const scalar_t* __restrict__ cell, LevelTable t,
                                    scalar_t* __restrict__ out) {
  const int64_t total = t.off[t.L];
  const int64_t stride = int64_t(gridDim.x) * blockDim.x;
  for (int64_t e = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; e < total; e += stride) {
    int l = 0;
    while (e >= t.off[l + 1]) ++l;
    const int64_t local = e - t.off[l];
    const int64_t k = local % t.n[l], p = local / t.n[l];
    const int32_t x = int32_t(p % t.W[l]) * t.sw[l], y = int32_t(p / t.W[l]) * t.sh[l];
    const scalar_t* c = cell + 4 * (t.cell0[l] + k);
    scalar_t* d = out + 4 * e;
    d[0] = shifted(x, c[0]);
    d[1] = shifted(y, c[1]);
    d[2] = shifted(x, c[2]);
    d[3] = shifted(y, c[3]);
  }
}

at::Tensor grid_anchors_cuda(const at::Tensor& cell_anchors, at::IntArrayRef cells_per_level,
                             at::IntArrayRef grid_sizes, at::IntArrayRef strides) {
  check_grid_anchors(cell_anchors, cells_per_level, grid_sizes, strides);
  const int64_t L = cells_per_level.size();
  TORCH_CHECK(L <= kMaxLevels, "retina_fast::grid_anchors: expected at most ", kMaxLevels,
              " levels on CUDA, got ", L);
  const c10::cuda::CUDAGuard guard(cell_anchors.device());
  const std::vector<int64_t> off = level_offsets(cells_per_level, grid_sizes);
  const at::Tensor cell = cell_anchors.contiguous();
  at::Tensor out = at::empty({off.back(), 4}, cell.options());
  if (off.back() == 0) return out;
  LevelTable t{};
  t.L = int(L);
  int64_t c0 = 0;
  for (int64_t l = 0; l < L; ++l) {
    t.off[l] = off[l];
    t.cell0[l] = c0;
    t.n[l] = cells_per_level[l];
    t.W[l] = grid_sizes[2 * l + 1];
    t.sh[l] = int32_t(strides[2 * l]);
    t.sw[l] = int32_t(strides[2 * l + 1]);
    c0 += cells_per_level[l];
  }
  t.off[L] = off[L];
  cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, cell.scalar_type(), "grid_anchors_cuda", [&] {
    cuda::launch(grid_anchors_kernel<scalar_t>, cuda::grid_for(off.back()), kThreads, 0, stream,
        cell.const_data_ptr<scalar_t>(), t, out.mutable_data_ptr<scalar_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

}  // namespace
}  // namespace boxes
}  // namespace retina_fast

TORCH_LIBRARY_IMPL(retina_fast, CUDA, m) {
  using namespace retina_fast::boxes;
  m.impl("box_iou", &box_iou_cuda);
  m.impl("grid_anchors", &grid_anchors_cuda);
  m.impl("match_anchors", &match_anchors_cuda);
  m.impl("gather_targets", &gather_targets_cuda);
  m.impl("matched_box_loss", &matched_box_loss_cuda);
  m.impl("matched_box_loss_backward", &matched_box_loss_backward_cuda);
  m.impl("encode_boxes", &encode_boxes_cuda);
  m.impl("decode_boxes", &decode_boxes_cuda);
  m.impl("decode_boxes_backward", &decode_boxes_backward_cuda);
}
