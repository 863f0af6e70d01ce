// CPU kernels of the box ops: box_iou, grid_anchors, match_anchors, gather_targets,
// encode_boxes, decode_boxes (+ backward).
//
// match_anchors never builds the [M, A] IoU matrix. Anchors are cut into chunks of kChunk
// (one parallel task per image and chunk) and sub-blocks of kSub, each with the bounding box
// of its anchors. Pass 1 walks gts outer, sub-blocks middle, anchors inner (a branch-free loop
// the compiler vectorises; an AVX2 clone is picked at run time): running best gt per anchor,
// and per gt the max over the chunk. A sub-block the gt cannot overlap is skipped: every IoU
// there is exactly +0 (see regular_box in boxes_math.h), which the running values already
// assume. Pass 2 (low-quality restore) recomputes IoU only for anchors below `high` that could
// tie a gt's maximum (their best IoU is >= that maximum), again skipping disjoint sub-blocks.
// Per-gt maxima are combined chunk by chunk with max, which is exact in any order: results do
// not depend on the number of threads.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <limits>
#include <type_traits>
#include <vector>

#include "boxes/box_loss_math.h"
#include "boxes/boxes_checks.h"
#include "boxes/boxes_math.h"
#include "common/cpu_dispatch.h"

namespace retina_fast {
namespace boxes {
namespace {

constexpr int64_t kSub = 64;      // anchors per skip test
constexpr int64_t kChunk = 2048;  // anchors per parallel task (multiple of kSub)
// match_anchors' per-(image, anchor) scratch (best IoU and gt, 8 bytes a pair) covers at most
// this many pairs at once: images are matched in groups of at most kGroupPairs / A (at least
// one), so the scratch stays ~128 MB whatever B A is (a batch of 16 at 1333 px is 3M pairs: one
// group).
constexpr int64_t kGroupPairs = int64_t(1) << 24;
constexpr int kLanes = 8;

// ---------------------------------------------------------------- IoU spans
// One gt (g*) against n anchors given as structure-of-arrays in acc_t.

// Pass 1 span: update the running best (bv, bi) of n anchors with gt `g`; returns the
// NaN-propagating max IoU of the span.
template <typename acc_t, typename Round>
HOST_DEVICE_INLINE acc_t best_span(acc_t gx1, acc_t gy1, acc_t gx2, acc_t gy2, acc_t ga, const acc_t* x1,
                       const acc_t* y1, const acc_t* x2, const acc_t* y2, const acc_t* ar,
                       int64_t n, acc_t* bv, int32_t* bi, int32_t g) {
  const Round r;
  acc_t lanes[kLanes];
  for (int j = 0; j < kLanes; ++j) lanes[j] = acc_t(0);
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes) {
    for (int j = 0; j < kLanes; ++j) {
      const int64_t k = i + j;
      const acc_t v = iou_coords(gx1, gy1, gx2, gy2, ga, x1[k], y1[k], x2[k], y2[k], ar[k], r);
      const acc_t b = bv[k];
      const bool up = (v > b) | ((v != v) & (b == b));
      bv[k] = up ? v : b;
      bi[k] = up ? g : bi[k];
      lanes[j] = nan_max(lanes[j], v);
    }
  }
  acc_t m = lanes[0];
  for (int j = 1; j < kLanes; ++j) m = nan_max(m, lanes[j]);
  for (; i < n; ++i) {
    const acc_t v = iou_coords(gx1, gy1, gx2, gy2, ga, x1[i], y1[i], x2[i], y2[i], ar[i], r);
    if (better(v, bv[i])) {
      bv[i] = v;
      bi[i] = g;
    }
    m = nan_max(m, v);
  }
  return m;
}

// Pass 2 span: hit[i] |= (IoU == target).
template <typename acc_t, typename Round>
HOST_DEVICE_INLINE void tie_span(acc_t gx1, acc_t gy1, acc_t gx2, acc_t gy2, acc_t ga, const acc_t* x1,
                     const acc_t* y1, const acc_t* x2, const acc_t* y2, const acc_t* ar,
                     int64_t n, acc_t target, uint8_t* hit) {
  const Round r;
  for (int64_t i = 0; i < n; ++i) {
    const acc_t v = iou_coords(gx1, gy1, gx2, gy2, ga, x1[i], y1[i], x2[i], y2[i], ar[i], r);
    hit[i] |= uint8_t(v == target);
  }
}

// Crowd span: m[i] = NaN-propagating max(m[i], intersection / max(area_i, 1e-6)) of n anchors
// with the crowd box g: the share of each anchor inside it (anchor area clamped as the
// reference clamps it).
template <typename acc_t, typename Round>
HOST_DEVICE_INLINE void ioa_span(acc_t gx1, acc_t gy1, acc_t gx2, acc_t gy2, const acc_t* x1, const acc_t* y1,
                                 const acc_t* x2, const acc_t* y2, const acc_t* ar, int64_t n, acc_t* m) {
  const Round r;
  for (int64_t i = 0; i < n; ++i) {
    const acc_t v = ioa_coords(gx1, gy1, gx2, gy2, x1[i], y1[i], x2[i], y2[i], ar[i], r);
    m[i] = nan_max(m[i], v);
  }
}

// One row of box_iou.
template <typename acc_t, typename Round>
HOST_DEVICE_INLINE void iou_row(acc_t gx1, acc_t gy1, acc_t gx2, acc_t gy2, acc_t ga, const acc_t* x1,
                    const acc_t* y1, const acc_t* x2, const acc_t* y2, const acc_t* ar,
                    int64_t n, acc_t* out) {
  const Round r;
  for (int64_t i = 0; i < n; ++i)
    out[i] = iou_coords(gx1, gy1, gx2, gy2, ga, x1[i], y1[i], x2[i], y2[i], ar[i], r);
}

// float32 entry points, one variant per ISA (the hot loops).
HOST_DEVICE_INLINE float best_span_f32_impl(float gx1, float gy1, float gx2, float gy2, float ga,
                                     const float* x1, const float* y1, const float* x2,
                                     const float* y2, const float* ar, int64_t n, float* bv,
                                     int32_t* bi, int32_t g) {
  return best_span<float, IdentityRound>(gx1, gy1, gx2, gy2, ga, x1, y1, x2, y2, ar, n, bv, bi, g);
}
RF_CPU_DISPATCH(float, best_span_f32,
                (float gx1, float gy1, float gx2, float gy2, float ga, const float* x1,
                const float* y1, const float* x2, const float* y2, const float* ar, int64_t n,
                float* bv, int32_t* bi, int32_t g),
                (gx1, gy1, gx2, gy2, ga, x1, y1, x2, y2, ar, n, bv, bi, g))
HOST_DEVICE_INLINE void tie_span_f32_impl(float gx1, float gy1, float gx2, float gy2, float ga,
                                   const float* x1, const float* y1, const float* x2,
                                   const float* y2, const float* ar, int64_t n, float target,
                                   uint8_t* hit) {
  tie_span<float, IdentityRound>(gx1, gy1, gx2, gy2, ga, x1, y1, x2, y2, ar, n, target, hit);
}
RF_CPU_DISPATCH(void, tie_span_f32,
                (float gx1, float gy1, float gx2, float gy2, float ga, const float* x1,
                const float* y1, const float* x2, const float* y2, const float* ar, int64_t n,
                float target, uint8_t* hit),
                (gx1, gy1, gx2, gy2, ga, x1, y1, x2, y2, ar, n, target, hit))
HOST_DEVICE_INLINE void ioa_span_f32_impl(float gx1, float gy1, float gx2, float gy2, const float* x1,
                                   const float* y1, const float* x2, const float* y2, const float* ar,
                                   int64_t n, float* m) {
  ioa_span<float, IdentityRound>(gx1, gy1, gx2, gy2, x1, y1, x2, y2, ar, n, m);
}
RF_CPU_DISPATCH(void, ioa_span_f32,
                (float gx1, float gy1, float gx2, float gy2, const float* x1, const float* y1,
                const float* x2, const float* y2, const float* ar, int64_t n, float* m),
                (gx1, gy1, gx2, gy2, x1, y1, x2, y2, ar, n, m))
HOST_DEVICE_INLINE void iou_row_f32_impl(float gx1, float gy1, float gx2, float gy2, float ga,
                                  const float* x1, const float* y1, const float* x2,
                                  const float* y2, const float* ar, int64_t n, float* out) {
  iou_row<float, IdentityRound>(gx1, gy1, gx2, gy2, ga, x1, y1, x2, y2, ar, n, out);
}
RF_CPU_DISPATCH(void, iou_row_f32,
                (float gx1, float gy1, float gx2, float gy2, float ga, const float* x1,
                const float* y1, const float* x2, const float* y2, const float* ar, int64_t n,
                float* out),
                (gx1, gy1, gx2, gy2, ga, x1, y1, x2, y2, ar, n, out))

// Dispatch to the float32 clones where scalar_t is float; generic templates otherwise.
template <typename scalar_t>
struct Spans {
  using acc_t = acc_type<scalar_t>;
  using R = round_for<scalar_t>;
  static constexpr bool kF32 = std::is_same<scalar_t, float>::value;

  static acc_t best(const acc_t* g, const acc_t* const* a, int64_t off, int64_t n, acc_t* bv,
                    int32_t* bi, int32_t gi) {
    if constexpr (kF32)
      return best_span_f32(g[0], g[1], g[2], g[3], g[4], a[0] + off, a[1] + off, a[2] + off,
                           a[3] + off, a[4] + off, n, bv, bi, gi);
    else
      return best_span<acc_t, R>(g[0], g[1], g[2], g[3], g[4], a[0] + off, a[1] + off,
                                 a[2] + off, a[3] + off, a[4] + off, n, bv, bi, gi);
  }
  static void tie(const acc_t* g, const acc_t* const* a, int64_t off, int64_t n, acc_t target,
                  uint8_t* hit) {
    if constexpr (kF32)
      tie_span_f32(g[0], g[1], g[2], g[3], g[4], a[0] + off, a[1] + off, a[2] + off, a[3] + off,
                   a[4] + off, n, target, hit);
    else
      tie_span<acc_t, R>(g[0], g[1], g[2], g[3], g[4], a[0] + off, a[1] + off, a[2] + off,
                         a[3] + off, a[4] + off, n, target, hit);
  }
  static void ioa(const acc_t* g, const acc_t* const* a, int64_t off, int64_t n, acc_t* m) {
    if constexpr (kF32)
      ioa_span_f32(g[0], g[1], g[2], g[3], a[0] + off, a[1] + off, a[2] + off, a[3] + off,
                   a[4] + off, n, m);
    else
      ioa_span<acc_t, R>(g[0], g[1], g[2], g[3], a[0] + off, a[1] + off, a[2] + off, a[3] + off,
                         a[4] + off, n, m);
  }
  static void row(const acc_t* g, const acc_t* const* a, int64_t n, acc_t* out) {
    if constexpr (kF32)
      iou_row_f32(g[0], g[1], g[2], g[3], g[4], a[0], a[1], a[2], a[3], a[4], n, out);
    else
      iou_row<acc_t, R>(g[0], g[1], g[2], g[3], g[4], a[0], a[1], a[2], a[3], a[4], n, out);
  }
};

// Boxes [n, 4] as five acc_t arrays x1, y1, x2, y2, area (area after the upcast, as
// torchvision's box_area does it).
template <typename scalar_t>
std::vector<acc_type<scalar_t>> to_soa(const scalar_t* p, int64_t n) {
  using acc_t = acc_type<scalar_t>;
  std::vector<acc_t> s(5 * n);
  at::parallel_for(0, n, 4096, [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i) {
      const acc_t x1 = acc_t(p[4 * i]), y1 = acc_t(p[4 * i + 1]);
      const acc_t x2 = acc_t(p[4 * i + 2]), y2 = acc_t(p[4 * i + 3]);
      s[i] = x1;
      s[n + i] = y1;
      s[2 * n + i] = x2;
      s[3 * n + i] = y2;
      s[4 * n + i] = box_area(x1, y1, x2, y2);
    }
  });
  return s;
}

// ---------------------------------------------------------------- box_iou

at::Tensor box_iou_cpu(const at::Tensor& boxes1, const at::Tensor& boxes2) {
  check_box_iou(boxes1, boxes2);
  const at::ScalarType st = promoted(boxes1, boxes2);
  const at::Tensor b1 = boxes1.to(st).contiguous();
  const at::Tensor b2 = boxes2.to(st).contiguous();
  const int64_t N = b1.size(0), M = b2.size(0);
  at::Tensor out = at::empty({N, M}, b1.options().dtype(iou_dtype(st)));
  if (N == 0 || M == 0) return out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, st, "box_iou_cpu", [&] {
    using acc_t = acc_type<scalar_t>;
    const std::vector<acc_t> s1 = to_soa(b1.const_data_ptr<scalar_t>(), N);
    const std::vector<acc_t> s2 = to_soa(b2.const_data_ptr<scalar_t>(), M);
    const acc_t* a[5] = {s2.data(), s2.data() + M, s2.data() + 2 * M, s2.data() + 3 * M,
                         s2.data() + 4 * M};
    acc_t* op = out.mutable_data_ptr<acc_t>();
    at::parallel_for(0, N, std::max<int64_t>(1, 32768 / M), [&](int64_t i0, int64_t i1) {
      for (int64_t i = i0; i < i1; ++i) {
        const acc_t g[5] = {s1[i], s1[N + i], s1[2 * N + i], s1[3 * N + i], s1[4 * N + i]};
        Spans<scalar_t>::row(g, a, M, op + i * M);
      }
    });
  });
  return out;
}

// ---------------------------------------------------------------- match_anchors

// Crowd gts (crowd[b * M + g] != 0) are no match candidates: matching and the low-quality
// restore see only the other gts, in their order (as if the crowd rows were removed), and
// after both an anchor labelled -1 whose share inside some crowd box reaches crowd_thresh
// (intersection / anchor area, see ioa_coords) becomes -2. Memory stays O(A + M) per image.
template <typename scalar_t>
void match_impl(const at::Tensor& anchors, const at::Tensor& gts, const int64_t* counts,
                const uint8_t* crowd, double high_d, double low_d, bool allow_lq, bool quirk,
                double crowd_thresh_d, at::Tensor& out) {
  using acc_t = acc_type<scalar_t>;
  using S = Spans<scalar_t>;
  const int64_t A = anchors.size(0), B = gts.size(0), M = gts.size(1);
  const acc_t high = acc_t(high_d), low = acc_t(low_d), crowd_thresh = acc_t(crowd_thresh_d);
  int64_t* labels = out.mutable_data_ptr<int64_t>();

  const std::vector<acc_t> sa = to_soa(anchors.const_data_ptr<scalar_t>(), A);
  const acc_t* a[5] = {sa.data(), sa.data() + A, sa.data() + 2 * A, sa.data() + 3 * A,
                       sa.data() + 4 * A};
  // Sub-block bounding boxes; regular = every anchor in it regular.
  const int64_t nsub = (A + kSub - 1) / kSub;
  std::vector<acc_t> sbox(4 * nsub);
  std::vector<uint8_t> sreg(nsub);
  at::parallel_for(0, nsub, 256, [&](int64_t s0, int64_t s1) {
    for (int64_t s = s0; s < s1; ++s) {
      acc_t bx1 = std::numeric_limits<acc_t>::infinity(), by1 = bx1;
      acc_t bx2 = -bx1, by2 = -bx1;
      bool reg = true;
      for (int64_t i = s * kSub, e = std::min(A, (s + 1) * kSub); i < e; ++i) {
        reg = reg && regular_box(a[0][i], a[1][i], a[2][i], a[3][i], a[4][i]);
        bx1 = std::min(bx1, a[0][i]);
        by1 = std::min(by1, a[1][i]);
        bx2 = std::max(bx2, a[2][i]);
        by2 = std::max(by2, a[3][i]);
      }
      sbox[4 * s] = bx1;
      sbox[4 * s + 1] = by1;
      sbox[4 * s + 2] = bx2;
      sbox[4 * s + 3] = by2;
      sreg[s] = reg;
    }
  });
  // gts: [B * M] rows of (x1, y1, x2, y2, area) and their regularity.
  std::vector<acc_t> g5(5 * B * M);
  std::vector<uint8_t> greg(B * M);
  const scalar_t* gp = gts.const_data_ptr<scalar_t>();
  for (int64_t r = 0; r < B * M; ++r) {
    const acc_t x1 = acc_t(gp[4 * r]), y1 = acc_t(gp[4 * r + 1]);
    const acc_t x2 = acc_t(gp[4 * r + 2]), y2 = acc_t(gp[4 * r + 3]);
    const acc_t ar = box_area(x1, y1, x2, y2);
    g5[5 * r] = x1;
    g5[5 * r + 1] = y1;
    g5[5 * r + 2] = x2;
    g5[5 * r + 3] = y2;
    g5[5 * r + 4] = ar;
    greg[r] = regular_box(x1, y1, x2, y2, ar);
  }
  auto skip = [&](int64_t grow, int64_t s) {
    const acc_t* g = &g5[5 * grow];
    return greg[grow] && sreg[s] &&
           disjoint(g[0], g[1], g[2], g[3], sbox[4 * s], sbox[4 * s + 1], sbox[4 * s + 2],
                    sbox[4 * s + 3]);
  };
  auto is_crowd = [&](int64_t b, int64_t g) { return crowd != nullptr && crowd[b * M + g] != 0; };
  // Per image: gts to match, crowd gts, and the first gt to match (the best gt of an anchor
  // that overlaps none, as torch.max's first index over the matched gts).
  std::vector<int64_t> nmatch(B, 0), ncrowd(B, 0);
  std::vector<int32_t> first(B, 0);
  for (int64_t b = 0; b < B; ++b) {
    bool found = false;
    for (int64_t g = 0; g < counts[b]; ++g) {
      if (is_crowd(b, g)) {
        ++ncrowd[b];
      } else {
        ++nmatch[b];
        if (!found) first[b] = int32_t(g);
        found = true;
      }
    }
  }

  const int64_t nchunk = (A + kChunk - 1) / kChunk;
  const int64_t group = std::max<int64_t>(1, std::min<int64_t>(B, kGroupPairs / std::max<int64_t>(A, 1)));
  std::vector<acc_t> best_val(group * A);
  std::vector<int32_t> best_idx(group * A);
  std::vector<acc_t> partial(group * nchunk * std::max<int64_t>(M, 1));
  std::vector<acc_t> gmax(B * M, acc_t(0));
  std::vector<uint8_t> restore_all(B, 0);

  // Images b0 .. b0 + nb - 1 at a time; bl = b - b0 indexes the group's scratch.
  for (int64_t b0 = 0; b0 < B; b0 += group) {
    const int64_t nb = std::min(group, B - b0);

    // Pass 1: best gt per anchor, per-chunk max per gt.
    at::parallel_for(0, nb * nchunk, 1, [&](int64_t t0, int64_t t1) {
      for (int64_t t = t0; t < t1; ++t) {
        const int64_t bl = t / nchunk, b = b0 + bl, c = t % nchunk;
        const int64_t a0 = c * kChunk, a1 = std::min(A, a0 + kChunk);
        acc_t* bv = best_val.data() + bl * A + a0;
        int32_t* bi = best_idx.data() + bl * A + a0;
        std::fill(bv, bv + (a1 - a0), acc_t(0));
        std::fill(bi, bi + (a1 - a0), first[b]);
        for (int64_t g = 0; g < counts[b]; ++g) {
          if (is_crowd(b, g)) continue;
          const int64_t grow = b * M + g;
          acc_t gm = acc_t(0);
          for (int64_t s = a0 / kSub; s * kSub < a1; ++s) {
            if (skip(grow, s)) continue;
            const int64_t i0 = s * kSub, n = std::min(kSub, a1 - i0);
            gm = nan_max(gm, S::best(&g5[5 * grow], a, i0, n, bv + (i0 - a0), bi + (i0 - a0),
                                     int32_t(g)));
          }
          partial[t * M + g] = gm;
        }
      }
    });

    // Per-gt maxima over all anchors (crowd gts: NaN, which restores nothing), and whether
    // some matched gt's maximum is 0.
    for (int64_t b = b0; b < b0 + nb; ++b) {
      for (int64_t g = 0; g < counts[b]; ++g) {
        if (is_crowd(b, g)) {
          gmax[b * M + g] = std::numeric_limits<acc_t>::quiet_NaN();
          continue;
        }
        acc_t m = acc_t(0);
        for (int64_t c = 0; c < nchunk; ++c) m = nan_max(m, partial[((b - b0) * nchunk + c) * M + g]);
        gmax[b * M + g] = m;
        if (m == acc_t(0)) restore_all[b] = allow_lq && quirk;
      }
    }

    // Pass 2: thresholds, the low-quality restore, then the crowd regions.
    at::parallel_for(0, nb * nchunk, 1, [&](int64_t t0, int64_t t1) {
      uint8_t hit[kChunk];
      acc_t smax[kChunk / kSub];
      acc_t ioa[kChunk];
      for (int64_t t = t0; t < t1; ++t) {
        const int64_t bl = t / nchunk, b = b0 + bl, c = t % nchunk;
        const int64_t a0 = c * kChunk, a1 = std::min(A, a0 + kChunk), n = a1 - a0;
        const acc_t* bv = best_val.data() + bl * A + a0;
        const int32_t* bi = best_idx.data() + bl * A + a0;
        int64_t* lab = labels + b * A + a0;
        const int64_t s_first = a0 / kSub;
        if (nmatch[b] == 0) {
          std::fill(lab, lab + n, int64_t(-1));
        } else if (restore_all[b]) {
          for (int64_t i = 0; i < n; ++i) lab[i] = bi[i];
        } else {
          for (int64_t i = 0; i < n; ++i) lab[i] = threshold_label(bv[i], int64_t(bi[i]), high, low);
          if (allow_lq) {
            // Only anchors labelled -1/-2 can change; an anchor can tie gt g's maximum only if
            // its own best IoU reaches it.
            bool any = false;
            for (int64_t s = s_first; s * kSub < a1; ++s) {
              acc_t m = -std::numeric_limits<acc_t>::infinity();
              for (int64_t i = s * kSub - a0, e = std::min(a1, (s + 1) * kSub) - a0; i < e; ++i)
                if (lab[i] < 0) m = std::max(m, bv[i]);
              smax[s - s_first] = m;
              any = any || m > -std::numeric_limits<acc_t>::infinity();
            }
            if (any) {
              std::fill(hit, hit + n, uint8_t(0));
              for (int64_t g = 0; g < counts[b]; ++g) {
                const int64_t grow = b * M + g;
                const acc_t gm = gmax[grow];
                if (!(gm > acc_t(0))) continue;  // NaN ties nothing; 0 only matters with the quirk
                for (int64_t s = s_first; s * kSub < a1; ++s) {
                  if (smax[s - s_first] < gm || skip(grow, s)) continue;
                  const int64_t i0 = s * kSub, len = std::min(kSub, a1 - i0);
                  S::tie(&g5[5 * grow], a, i0, len, gm, hit + (i0 - a0));
                }
              }
              for (int64_t i = 0; i < n; ++i)
                if (hit[i]) lab[i] = bi[i];
            }
          }
        }
        // Crowd regions: the largest share of each background anchor inside a crowd box (0 when
        // there is none: a threshold <= 0 then ignores every background anchor of every image,
        // as the reference does). A sub-block without background anchors, or disjoint from the
        // box (share exactly 0), is skipped.
        if (crowd == nullptr || (ncrowd[b] == 0 && !(acc_t(0) >= crowd_thresh))) continue;
        bool any_bg = false;
        for (int64_t s = s_first; s * kSub < a1; ++s) {
          bool bg = false;
          for (int64_t i = s * kSub - a0, e = std::min(a1, (s + 1) * kSub) - a0; i < e; ++i) bg = bg || lab[i] == -1;
          hit[s - s_first] = bg;
          any_bg = any_bg || bg;
        }
        if (!any_bg) continue;
        std::fill(ioa, ioa + n, acc_t(0));
        for (int64_t g = 0; g < counts[b]; ++g) {
          if (!is_crowd(b, g)) continue;
          const int64_t grow = b * M + g;
          for (int64_t s = s_first; s * kSub < a1; ++s) {
            if (!hit[s - s_first] || (crowd_thresh > acc_t(0) && skip(grow, s))) continue;
            const int64_t i0 = s * kSub, len = std::min(kSub, a1 - i0);
            S::ioa(&g5[5 * grow], a, i0, len, ioa + (i0 - a0));
          }
        }
        for (int64_t i = 0; i < n; ++i)
          if (lab[i] == -1 && ioa[i] >= crowd_thresh) lab[i] = -2;
      }
    });
  }  // image groups
}

at::Tensor match_anchors_cpu(const at::Tensor& anchors, const at::Tensor& gt_boxes,
                             const at::Tensor& gt_counts, double high, double low,
                             bool allow_low_quality_matches, bool zero_iou_quirk,
                             const c10::optional<at::Tensor>& gt_crowd, double crowd_ioa_thresh) {
  check_match(anchors, gt_boxes, gt_counts, high, low, gt_crowd);
  const at::ScalarType st = promoted(anchors, gt_boxes);
  const at::Tensor an = anchors.to(st).contiguous();
  const at::Tensor gt = gt_boxes.to(st).contiguous();
  const at::Tensor cnt = gt_counts.to(at::kLong).contiguous();
  const at::Tensor cr = crowd_mask(gt_crowd);
  const int64_t A = an.size(0), B = gt.size(0), M = gt.size(1);
  check_counts_values(cnt, M);
  TORCH_CHECK(M <= std::numeric_limits<int32_t>::max(),
              "retina_fast::match_anchors: expected M < 2^31 gts per image, got ", M);
  at::Tensor out = at::empty({B, A}, an.options().dtype(at::kLong));
  if (A == 0 || B == 0) return out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, st, "match_anchors_cpu", [&] {
    match_impl<scalar_t>(an, gt, cnt.const_data_ptr<int64_t>(),
                         cr.defined() ? cr.const_data_ptr<uint8_t>() : nullptr, high, low,
                         allow_low_quality_matches, zero_iou_quirk, crowd_ioa_thresh, out);
  });
  return out;
}

// ---------------------------------------------------------------- gather_targets

std::tuple<at::Tensor, at::Tensor> gather_targets_cpu(const at::Tensor& matches,
                                                      const at::Tensor& anchors,
                                                      const at::Tensor& gt_boxes,
                                                      const at::Tensor& gt_labels,
                                                      at::ArrayRef<double> weights,
                                                      bool /*check_matches: always, it is free here*/) {
  check_gather(matches, anchors, gt_boxes, gt_labels);
  const Weights w = check_weights(weights, "retina_fast::gather_targets");
  const at::ScalarType st = promoted(anchors, gt_boxes);
  const at::Tensor an = anchors.to(st).contiguous();
  const at::Tensor gt = gt_boxes.to(st).contiguous();
  const at::Tensor mt = matches.contiguous();
  const at::Tensor gl = gt_labels.contiguous();
  const int64_t B = mt.size(0), A = mt.size(1), M = gt.size(1);
  at::Tensor labels = at::empty({B, A}, mt.options());
  at::Tensor targets = at::empty({B, A, 4}, an.options());
  if (B * A == 0) return {labels, targets};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, st, "gather_targets_cpu", [&] {
    const scalar_t* ap = an.const_data_ptr<scalar_t>();
    const scalar_t* gp = gt.const_data_ptr<scalar_t>();
    const int64_t* mp = mt.const_data_ptr<int64_t>();
    const int64_t* lp = gl.const_data_ptr<int64_t>();
    int64_t* lo = labels.mutable_data_ptr<int64_t>();
    scalar_t* to = targets.mutable_data_ptr<scalar_t>();
    const scalar_t wx = scalar_t(w.wx), wy = scalar_t(w.wy), ww = scalar_t(w.ww),
                   wh = scalar_t(w.wh);
    at::parallel_for(0, B * A, 4096, [&](int64_t r0, int64_t r1) {
      for (int64_t r = r0; r < r1; ++r) {
        const int64_t b = r / A, i = r - b * A, m = mp[r];
        if (m < -2 || m >= M) bad_match(b, i, m, M);
        if (m >= 0) {
          lo[r] = lp[b * M + m];
          encode_box(gp + 4 * (b * M + m), ap + 4 * i, wx, wy, ww, wh, to + 4 * r);
        } else {
          lo[r] = m;
          for (int j = 0; j < 4; ++j) to[4 * r + j] = scalar_t(0);
        }
      }
    });
  });
  return {labels, targets};
}

// ---------------------------------------------------------------- matched_box_loss

// One pass over the matches: each foreground anchor (match >= 0) reads its codes, its anchor
// and its gt row, and nothing else is touched; no encoded-target or gathered-gt tensor exists.
// Per image, partial sums over fixed chunks of anchors, added in order: independent of threads.
constexpr int64_t kLossChunk = 4096;

struct BoxLossArgs {
  BoxLoss kind;
  CoderParams cp;
  double beta, eps;
};

inline BoxLossArgs box_loss_args(int64_t loss_type, at::ArrayRef<double> weights, double clip, double beta,
                                 double eps, const char* op) {
  const Weights w = check_weights(weights, op);
  return {static_cast<BoxLoss>(loss_type), {w.wx, w.wy, w.ww, w.wh, clip}, beta, eps};
}

// dtype the targets are encoded in: float64 if the boxes are, else float32
inline at::ScalarType encode_dtype(const at::Tensor& anchors, const at::Tensor& gt_boxes) {
  return promoted(anchors, gt_boxes) == at::kDouble ? at::kDouble : at::kFloat;
}

at::Tensor matched_box_loss_cpu(const at::Tensor& bbox_regression, const at::Tensor& anchors,
                                const at::Tensor& matches, const at::Tensor& gt_boxes,
                                const at::Tensor& image_weights, int64_t loss_type,
                                at::ArrayRef<double> weights, double clip, double beta, double eps) {
  const char* op = "retina_fast::matched_box_loss";
  check_box_loss(bbox_regression, anchors, matches, gt_boxes, image_weights, loss_type, beta, eps, op);
  const BoxLossArgs args = box_loss_args(loss_type, weights, clip, beta, eps, op);
  const at::ScalarType est = encode_dtype(anchors, gt_boxes);
  const at::Tensor reg = bbox_regression.contiguous();
  const at::Tensor an = anchors.to(est).contiguous();
  const at::Tensor gt = gt_boxes.to(est).contiguous();
  const at::Tensor mt = matches.contiguous();
  const at::Tensor iw = image_weights.to(at::kDouble).contiguous();
  const int64_t B = reg.size(0), A = reg.size(1), M = gt.size(1);
  const int64_t nchunk = (A + kLossChunk - 1) / kLossChunk;
  std::vector<double> partial(B * nchunk, 0.0);
  const at::ScalarType out_t = reg.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, reg.scalar_type(), "matched_box_loss_cpu", [&] {
    using acc_t = acc_type<scalar_t>;
    const scalar_t* rp = reg.const_data_ptr<scalar_t>();
    const int64_t* mp = mt.const_data_ptr<int64_t>();
    auto run = [&](auto enc_tag) {
      using enc_t = decltype(enc_tag);
      const enc_t* ap = an.const_data_ptr<enc_t>();
      const enc_t* gp = gt.const_data_ptr<enc_t>();
      at::parallel_for(0, B * nchunk, 1, [&](int64_t t0, int64_t t1) {
        for (int64_t t = t0; t < t1; ++t) {
          const int64_t b = t / nchunk, a0 = (t % nchunk) * kLossChunk, a1 = std::min(A, a0 + kLossChunk);
          double acc = 0.0;
          for (int64_t i = a0; i < a1; ++i) {
            const int64_t m = mp[b * A + i];
            if (m < 0) {
              if (m < -2) bad_match(b, i, m, M, op);
              continue;
            }
            if (m >= M) bad_match(b, i, m, M, op);
            acc_t codes[4];
            for (int j = 0; j < 4; ++j) codes[j] = acc_t(rp[4 * (b * A + i) + j]);
            acc += double(box_loss_one<acc_t, enc_t>(args.kind, codes, ap + 4 * i, gp + 4 * (b * M + m), args.cp,
                                                     acc_t(args.beta), acc_t(args.eps), acc_t(1), nullptr));
          }
          partial[t] = acc;
        }
      });
    };
    if (est == at::kDouble) run(double());
    else run(float());
  });
  const double* wp = iw.const_data_ptr<double>();
  double total = 0.0;
  for (int64_t b = 0; b < B; ++b) {
    double s = 0.0;
    for (int64_t c = 0; c < nchunk; ++c) s += partial[b * nchunk + c];
    total += wp[b] * s;
  }
  return at::scalar_tensor(total, reg.options().dtype(out_t));
}

at::Tensor matched_box_loss_backward_cpu(const at::Tensor& grad, const at::Tensor& bbox_regression,
                                         const at::Tensor& anchors, const at::Tensor& matches,
                                         const at::Tensor& gt_boxes, const at::Tensor& image_weights,
                                         int64_t loss_type, at::ArrayRef<double> weights, double clip,
                                         double beta, double eps) {
  const char* op = "retina_fast::matched_box_loss_backward";
  check_box_loss(bbox_regression, anchors, matches, gt_boxes, image_weights, loss_type, beta, eps, op);
  TORCH_CHECK(grad.numel() == 1, op, ": expected a scalar grad, got shape ", grad.sizes());
  check_same_device(grad, bbox_regression, op, "grad", "bbox_regression");
  const BoxLossArgs args = box_loss_args(loss_type, weights, clip, beta, eps, op);
  const at::ScalarType est = encode_dtype(anchors, gt_boxes);
  const at::Tensor reg = bbox_regression.contiguous();
  const at::Tensor an = anchors.to(est).contiguous();
  const at::Tensor gt = gt_boxes.to(est).contiguous();
  const at::Tensor mt = matches.contiguous();
  const at::Tensor iw = image_weights.to(at::kDouble).contiguous();
  const int64_t B = reg.size(0), A = reg.size(1), M = gt.size(1);
  at::Tensor out = at::empty_like(reg);
  if (B * A == 0) return out;
  const double gscale = grad.item<double>();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, reg.scalar_type(), "matched_box_loss_backward_cpu", [&] {
    using acc_t = acc_type<scalar_t>;
    const scalar_t* rp = reg.const_data_ptr<scalar_t>();
    const int64_t* mp = mt.const_data_ptr<int64_t>();
    const double* wp = iw.const_data_ptr<double>();
    scalar_t* op_ = out.mutable_data_ptr<scalar_t>();
    auto run = [&](auto enc_tag) {
      using enc_t = decltype(enc_tag);
      const enc_t* ap = an.const_data_ptr<enc_t>();
      const enc_t* gp = gt.const_data_ptr<enc_t>();
      at::parallel_for(0, B * A, kLossChunk, [&](int64_t r0, int64_t r1) {
        for (int64_t r = r0; r < r1; ++r) {
          const int64_t b = r / A, i = r - b * A, m = mp[r];
          scalar_t* o = op_ + 4 * r;
          if (m < 0) {
            if (m < -2) bad_match(b, i, m, M, op);
            o[0] = o[1] = o[2] = o[3] = scalar_t(0);
            continue;
          }
          if (m >= M) bad_match(b, i, m, M, op);
          acc_t codes[4], g[4];
          for (int j = 0; j < 4; ++j) codes[j] = acc_t(rp[4 * r + j]);
          box_loss_one<acc_t, enc_t>(args.kind, codes, ap + 4 * i, gp + 4 * (b * M + m), args.cp, acc_t(args.beta),
                                     acc_t(args.eps), acc_t(gscale * wp[b]), g);
          for (int j = 0; j < 4; ++j) o[j] = scalar_t(g[j]);
        }
      });
    };
    if (est == at::kDouble) run(double());
    else run(float());
  });
  return out;
}

// ---------------------------------------------------------------- encode / decode

at::Tensor encode_boxes_cpu(const at::Tensor& reference_boxes, const at::Tensor& proposals,
                            at::ArrayRef<double> weights) {
  const int64_t nprop = check_encode(reference_boxes, proposals);
  const Weights w = check_weights(weights, "retina_fast::encode_boxes");
  const at::ScalarType st = promoted(reference_boxes, proposals);
  const at::Tensor ref = reference_boxes.to(st).contiguous();
  const at::Tensor prop = proposals.to(st).contiguous();
  at::Tensor out = at::empty(ref.sizes(), ref.options());
  const int64_t rows = ref.numel() / 4;
  if (rows == 0) return out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, st, "encode_boxes_cpu", [&] {
    const scalar_t* rp = ref.const_data_ptr<scalar_t>();
    const scalar_t* pp = prop.const_data_ptr<scalar_t>();
    scalar_t* op = out.mutable_data_ptr<scalar_t>();
    const scalar_t wx = scalar_t(w.wx), wy = scalar_t(w.wy), ww = scalar_t(w.ww),
                   wh = scalar_t(w.wh);
    at::parallel_for(0, rows, 4096, [&](int64_t r0, int64_t r1) {
      for (int64_t r = r0; r < r1; ++r)
        encode_box(rp + 4 * r, pp + 4 * (r % nprop), wx, wy, ww, wh, op + 4 * r);
    });
  });
  return out;
}

at::Tensor decode_boxes_cpu(const at::Tensor& rel_codes, const at::Tensor& boxes,
                            at::ArrayRef<double> weights, double clip) {
  const char* opn = "retina_fast::decode_boxes";
  const DecodeShape sh = check_decode(rel_codes, boxes, opn);
  const Weights w = check_weights(weights, opn);
  const at::Tensor codes = rel_codes.contiguous();
  const at::Tensor bx = boxes.to(codes.scalar_type()).contiguous();
  at::Tensor out = at::empty(codes.sizes(), codes.options());
  if (codes.numel() == 0) return out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, codes.scalar_type(), "decode_boxes_cpu", [&] {
    const scalar_t* cp = codes.const_data_ptr<scalar_t>();
    const scalar_t* bp = bx.const_data_ptr<scalar_t>();
    scalar_t* op = out.mutable_data_ptr<scalar_t>();
    const scalar_t wx = scalar_t(w.wx), wy = scalar_t(w.wy), ww = scalar_t(w.ww),
                   wh = scalar_t(w.wh), cl = scalar_t(clip);
    const int64_t k = sh.k;
    at::parallel_for(0, sh.rows * k, 4096, [&](int64_t e0, int64_t e1) {
      for (int64_t e = e0; e < e1; ++e) {
        const int64_t r = e / k;
        decode_box(cp + 4 * e, bp + 4 * (r % sh.box_rows), wx, wy, ww, wh, cl, op + 4 * e);
      }
    });
  });
  return out;
}

at::Tensor decode_boxes_backward_cpu(const at::Tensor& grad, const at::Tensor& rel_codes,
                                     const at::Tensor& boxes, at::ArrayRef<double> weights,
                                     double clip) {
  const char* opn = "retina_fast::decode_boxes_backward";
  const DecodeShape sh = check_decode(rel_codes, boxes, opn);
  const Weights w = check_weights(weights, opn);
  TORCH_CHECK(grad.sizes() == rel_codes.sizes(), opn, ": expected grad of shape ",
              rel_codes.sizes(), ", got ", grad.sizes());
  check_same_device(grad, rel_codes, opn, "grad", "rel_codes");
  const at::Tensor codes = rel_codes.contiguous();
  const at::Tensor g = grad.to(codes.scalar_type()).contiguous();
  const at::Tensor bx = boxes.to(codes.scalar_type()).contiguous();
  at::Tensor out = at::empty(codes.sizes(), codes.options());
  if (codes.numel() == 0) return out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, codes.scalar_type(), "decode_boxes_backward_cpu", [&] {
    using acc_t = acc_type<scalar_t>;
    const scalar_t* cp = codes.const_data_ptr<scalar_t>();
    const scalar_t* gp = g.const_data_ptr<scalar_t>();
    const scalar_t* bp = bx.const_data_ptr<scalar_t>();
    scalar_t* op = out.mutable_data_ptr<scalar_t>();
    const int64_t k = sh.k;
    at::parallel_for(0, sh.rows * k, 4096, [&](int64_t e0, int64_t e1) {
      for (int64_t e = e0; e < e1; ++e) {
        const int64_t r = e / k;
        acc_t ga[4], ca[4], ba[4], res[4];
        for (int j = 0; j < 4; ++j) {
          ga[j] = acc_t(gp[4 * e + j]);
          ca[j] = acc_t(cp[4 * e + j]);
          ba[j] = acc_t(bp[4 * (r % sh.box_rows) + j]);
        }
        decode_box_backward(ga, ca, ba, acc_t(w.wx), acc_t(w.wy), acc_t(w.ww), acc_t(w.wh),
                            acc_t(clip), res);
        for (int j = 0; j < 4; ++j) op[4 * e + j] = scalar_t(res[j]);
      }
    });
  });
  return out;
}

// ---------------------------------------------------------------- grid_anchors

at::Tensor grid_anchors_cpu(const at::Tensor& cell_anchors, at::IntArrayRef cells_per_level,
                            at::IntArrayRef grid_sizes, at::IntArrayRef strides) {
  check_grid_anchors(cell_anchors, cells_per_level, grid_sizes, strides);
  const std::vector<int64_t> off = level_offsets(cells_per_level, grid_sizes);
  const at::Tensor cell = cell_anchors.contiguous();
  at::Tensor out = at::empty({off.back(), 4}, cell.options());
  if (off.back() == 0) return out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, cell.scalar_type(), "grid_anchors_cpu", [&] {
    const scalar_t* cp = cell.const_data_ptr<scalar_t>();
    scalar_t* op = out.mutable_data_ptr<scalar_t>();
    int64_t cell0 = 0;
    for (size_t l = 0; l < cells_per_level.size(); ++l) {
      const int64_t n = cells_per_level[l], W = grid_sizes[2 * l + 1];
      const int32_t sh = int32_t(strides[2 * l]), sw = int32_t(strides[2 * l + 1]);
      const int64_t npos = grid_sizes[2 * l] * W;
      const scalar_t* c = cp + 4 * cell0;
      scalar_t* o = op + 4 * off[l];
      if (n > 0) {
        at::parallel_for(0, npos, 1024, [&](int64_t p0, int64_t p1) {
          for (int64_t p = p0; p < p1; ++p) {
            // int32 arithmetic, as torch.arange(int32) * stride in torchvision.
            const int32_t x = int32_t(p % W) * sw, y = int32_t(p / W) * sh;
            for (int64_t k = 0; k < n; ++k) {
              scalar_t* d = o + 4 * (p * n + k);
              d[0] = shifted(x, c[4 * k]);
              d[1] = shifted(y, c[4 * k + 1]);
              d[2] = shifted(x, c[4 * k + 2]);
              d[3] = shifted(y, c[4 * k + 3]);
            }
          }
        });
      }
      cell0 += n;
    }
  });
  return out;
}

}  // namespace
}  // namespace boxes
}  // namespace retina_fast

TORCH_LIBRARY_IMPL(retina_fast, CPU, m) {
  using namespace retina_fast::boxes;
  m.impl("box_iou", &box_iou_cpu);
  m.impl("grid_anchors", &grid_anchors_cpu);
  m.impl("match_anchors", &match_anchors_cpu);
  m.impl("gather_targets", &gather_targets_cpu);
  m.impl("matched_box_loss", &matched_box_loss_cpu);
  m.impl("matched_box_loss_backward", &matched_box_loss_backward_cpu);
  m.impl("encode_boxes", &encode_boxes_cpu);
  m.impl("decode_boxes", &decode_boxes_cpu);
  m.impl("decode_boxes_backward", &decode_boxes_backward_cpu);
}
