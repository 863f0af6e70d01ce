#pragma once
// The CPU greedy NMS shared by nms / batched_nms / batched_nms_multi and the fused
// post-processing: a stable score sort, grouping into segments (class, or (image, class)),
// then greedy suppression per segment, segments in parallel.
//
// Greedy NMS keeps box i iff no box *kept before it* overlaps it with IoU > thr, so each
// candidate is tested against the kept boxes only. With thr >= 0 a pair without a positive
// intersection can never suppress (its IoU is 0, -0 or NaN), so the kept boxes live in a
// uniform grid and a candidate looks only at the kept boxes that share a cell with it. Boxes
// too big for the grid or with infinite coordinates are tested against everything, exactly;
// NaN and empty/inverted boxes can neither suppress nor be suppressed. With thr < 0 (every
// pair suppresses) or for small segments the test is a plain vectorised scan over the kept
// boxes. Either way every IoU that decides anything is computed by box_iou_pair, in
// torchvision's operation order.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <numeric>
#include <vector>

#include "common/box_math.h"
#include "common/cpu_dispatch.h"
#include "nms/nms_common.h"


namespace retina_fast {
namespace nms {
namespace cpu {

// Kept boxes, structure of arrays, so the linear test vectorises.
template <typename F>
struct KeptBoxes {
  std::vector<F> x1, y1, x2, y2, area;
  int64_t size = 0;
  void reset(int64_t cap) {
    if (static_cast<int64_t>(x1.size()) < cap) {
      x1.resize(cap), y1.resize(cap), x2.resize(cap), y2.resize(cap), area.resize(cap);
    }
    size = 0;
  }
  void push(const F* b, F a) {
    x1[size] = b[0], y1[size] = b[1], x2[size] = b[2], y2[size] = b[3], area[size] = a;
    ++size;
  }
};

// Does any of the m kept boxes overlap c (area ca) with IoU > thr? Blocks of 32 without early
// exit inside, so the compiler vectorises the IoU (no -ffast-math: NaN semantics stay).
template <typename F>
HOST_DEVICE_INLINE bool any_iou_above_impl(const F* x1, const F* y1, const F* x2, const F* y2, const F* ar,
                               int64_t m, const F* c, F ca, F thr) {
  constexpr int64_t kStep = 32;
  for (int64_t k0 = 0; k0 < m; k0 += kStep) {
    const int64_t k1 = std::min(m, k0 + kStep);
    int hit = 0;
    for (int64_t k = k0; k < k1; ++k) {
      const F a[4] = {x1[k], y1[k], x2[k], y2[k]};
      hit |= box_iou_pair(a, ar[k], c, ca) > thr;
    }
    if (hit) return true;
  }
  return false;
}

HOST_DEVICE_INLINE bool any_iou_above_f32_impl(const float* x1, const float* y1,
                                                   const float* x2, const float* y2,
                                                   const float* ar, int64_t m, const float* c,
                                                   float ca, float thr) {
  return any_iou_above_impl<float>(x1, y1, x2, y2, ar, m, c, ca, thr);
}
RF_CPU_DISPATCH(bool, any_iou_above_f32,
                (const float* x1, const float* y1, const float* x2, const float* y2,
                const float* ar, int64_t m, const float* c, float ca, float thr),
                (x1, y1, x2, y2, ar, m, c, ca, thr))

template <typename F>
inline bool any_iou_above(const KeptBoxes<F>& k, const F* c, F ca, F thr) {
  if constexpr (std::is_same<F, float>::value) {
    return any_iou_above_f32(k.x1.data(), k.y1.data(), k.x2.data(), k.y2.data(), k.area.data(),
                             k.size, c, ca, thr);
  } else {
    return any_iou_above_impl<F>(k.x1.data(), k.y1.data(), k.x2.data(), k.y2.data(),
                                 k.area.data(), k.size, c, ca, thr);
  }
}

// The kept boxes of one grid cell, in blocks of 8: [x1 x8, y1 x8, x2 x8, y2 x8, area x8].
// Unused lanes hold NaN (a NaN IoU never suppresses), so a block is tested whole, in SIMD.
template <typename F>
struct Cell {
  static constexpr int kLanes = 8;
  std::vector<F> d;
  int32_t n = 0;
  void clear() { d.clear(), n = 0; }
  void push(const F* b, F a) {
    if (n % kLanes == 0) d.resize(d.size() + 5 * kLanes, std::numeric_limits<F>::quiet_NaN());
    F* blk = d.data() + (n / kLanes) * 5 * kLanes + n % kLanes;
    blk[0] = b[0], blk[kLanes] = b[1], blk[2 * kLanes] = b[2], blk[3 * kLanes] = b[3];
    blk[4 * kLanes] = a;
    ++n;
  }
};

template <typename F>
HOST_DEVICE_INLINE bool cell_hit_impl(const F* d, int64_t nblk, const F* c, F ca, F thr) {
  constexpr int L = Cell<F>::kLanes;
  for (int64_t k = 0; k < nblk; ++k) {
    const F* blk = d + k * 5 * L;
    int hit = 0;
    for (int j = 0; j < L; ++j) {
      const F a[4] = {blk[j], blk[L + j], blk[2 * L + j], blk[3 * L + j]};
      hit |= box_iou_pair(a, blk[4 * L + j], c, ca) > thr;
    }
    if (hit) return true;
  }
  return false;
}

HOST_DEVICE_INLINE bool cell_hit_f32_impl(const float* d, int64_t nblk, const float* c,
                                              float ca, float thr) {
  return cell_hit_impl<float>(d, nblk, c, ca, thr);
}
RF_CPU_DISPATCH(bool, cell_hit_f32,
                (const float* d, int64_t nblk, const float* c, float ca, float thr),
                (d, nblk, c, ca, thr))

template <typename F>
inline bool cell_hit(const Cell<F>& cell, const F* c, F ca, F thr) {
  const int64_t nblk = (cell.n + Cell<F>::kLanes - 1) / Cell<F>::kLanes;
  if constexpr (std::is_same<F, float>::value) {
    return cell_hit_f32(cell.d.data(), nblk, c, ca, thr);
  } else {
    return cell_hit_impl<F>(cell.d.data(), nblk, c, ca, thr);
  }
}

template <typename F>
class GreedyNms {
 public:
  // Segments up to this size use the linear test: building a grid does not pay below it
  // (quick timings on random boxes, 2-core CPU; not critical within 2x).
  static constexpr int64_t kLinearMax = 48;
  // A box spanning more grid cells than this is tested against every kept box instead.
  static constexpr int64_t kMaxCells = 64;

  // boxes: [n, 4] of one segment in processing order (descending score), areas: [n],
  // keep: [n] out, 1 kept / 0 suppressed. thr: the comparison threshold in F (see
  // iou_threshold_as); thr_nonneg: the double threshold was >= 0.
  void run(const F* boxes, const F* areas, int64_t n, F thr, bool thr_nonneg, uint8_t* keep) {
    kept_.reset(n);
    if (!thr_nonneg || n <= kLinearMax || !setup_grid(boxes, n)) {
      for (int64_t i = 0; i < n; ++i) {
        const F* c = boxes + 4 * i;
        const bool hit = any_iou_above(kept_, c, areas[i], thr);
        keep[i] = !hit;
        if (!hit) kept_.push(c, areas[i]);
      }
      return;
    }
    for (int64_t i = 0; i < n; ++i) {
      const F* c = boxes + 4 * i;
      const F ca = areas[i];
      int64_t cx0 = 0, cy0 = 0, cx1 = -1, cy1 = -1;
      const Kind kind = classify(c, cx0, cy0, cx1, cy1);
      if (kind == kNever) {
        keep[i] = 1;
        continue;
      }
      bool hit;
      if (kind == kBig) {
        hit = any_iou_above(kept_, c, ca, thr);
      } else {
        hit = false;
        for (int64_t k : big_) {
          const F a[4] = {kept_.x1[k], kept_.y1[k], kept_.x2[k], kept_.y2[k]};
          if (box_iou_pair(a, kept_.area[k], c, ca) > thr) {
            hit = true;
            break;
          }
        }
        // A kept box sits in every cell it touches, so it may be tested more than once:
        // cheaper than deduplicating, the test is a SIMD block.
        for (int64_t cy = cy0; cy <= cy1 && !hit; ++cy) {
          for (int64_t cx = cx0; cx <= cx1 && !hit; ++cx) {
            hit = cell_hit(cells_[cy * gx_ + cx], c, ca, thr);
          }
        }
      }
      keep[i] = !hit;
      if (hit) continue;
      const int32_t k = static_cast<int32_t>(kept_.size);
      kept_.push(c, ca);
      if (kind == kBig) {
        big_.push_back(k);
      } else {
        for (int64_t cy = cy0; cy <= cy1; ++cy) {
          for (int64_t cx = cx0; cx <= cx1; ++cx) {
            Cell<F>& cell = cells_[cy * gx_ + cx];
            if (cell.n == 0) used_.push_back(static_cast<int32_t>(cy * gx_ + cx));
            cell.push(c, ca);
          }
        }
      }
    }
  }

 private:
  enum Kind { kNever, kBig, kGrid };

  static bool finite4(const F* c) {
    return std::isfinite(c[0]) && std::isfinite(c[1]) && std::isfinite(c[2]) &&
           std::isfinite(c[3]);
  }

  // Grid over the extent of the finite, non-empty boxes; cell side ~ their mean size, at most
  // ~2n cells. false: nothing to grid (every box NaN, empty or infinite).
  bool setup_grid(const F* b, int64_t n) {
    double minx = INFINITY, miny = INFINITY, maxx = -INFINITY, maxy = -INFINITY, sum = 0.0;
    int64_t cnt = 0;
    for (int64_t i = 0; i < n; ++i) {
      const F* c = b + 4 * i;
      if (!finite4(c) || !(c[2] > c[0]) || !(c[3] > c[1])) continue;
      minx = std::min<double>(minx, c[0]), miny = std::min<double>(miny, c[1]);
      maxx = std::max<double>(maxx, c[2]), maxy = std::max<double>(maxy, c[3]);
      sum += std::max<double>(double(c[2]) - double(c[0]), double(c[3]) - double(c[1]));
      ++cnt;
    }
    if (cnt == 0) return false;
    double cs = sum / double(cnt);
    const double W = maxx - minx, H = maxy - miny;
    if (!(cs > 0.0) || !std::isfinite(W) || !std::isfinite(H)) return false;
    const double limit = 2.0 * double(n) + 64.0;
    double gx = std::floor(W / cs) + 1.0, gy = std::floor(H / cs) + 1.0;
    if (gx * gy > limit) {
      cs *= std::sqrt(gx * gy / limit);
      gx = std::floor(W / cs) + 1.0, gy = std::floor(H / cs) + 1.0;
      while (gx * gy > 2.0 * limit) {  // rounding of floor(): shrink until it fits
        cs *= 1.25;
        gx = std::floor(W / cs) + 1.0, gy = std::floor(H / cs) + 1.0;
      }
    }
    minx_ = minx, miny_ = miny, inv_cs_ = 1.0 / cs;
    gx_ = static_cast<int64_t>(gx), gy_ = static_cast<int64_t>(gy);
    for (int32_t u : used_) cells_[u].clear();  // keeps their memory for the next segment
    used_.clear(), big_.clear();
    if (static_cast<int64_t>(cells_.size()) < gx_ * gy_) cells_.resize(gx_ * gy_);
    return true;
  }

  int64_t cell_of(double v, double lo, int64_t g) const {
    const double t = std::floor((v - lo) * inv_cs_);
    return t < 0.0 ? 0 : (t >= double(g) ? g - 1 : static_cast<int64_t>(t));
  }

  Kind classify(const F* c, int64_t& cx0, int64_t& cy0, int64_t& cx1, int64_t& cy1) const {
    if (c[0] != c[0] || c[1] != c[1] || c[2] != c[2] || c[3] != c[3]) return kNever;  // NaN IoU
    if (!(c[2] > c[0]) || !(c[3] > c[1])) return kNever;  // empty: intersection always 0
    if (!finite4(c)) return kBig;
    cx0 = cell_of(c[0], minx_, gx_), cx1 = cell_of(c[2], minx_, gx_);
    cy0 = cell_of(c[1], miny_, gy_), cy1 = cell_of(c[3], miny_, gy_);
    return (cx1 - cx0 + 1) * (cy1 - cy0 + 1) > kMaxCells ? kBig : kGrid;
  }

  KeptBoxes<F> kept_;
  double minx_ = 0, miny_ = 0, inv_cs_ = 1;
  int64_t gx_ = 1, gy_ = 1;
  std::vector<Cell<F>> cells_;
  std::vector<int32_t> used_, big_;
};

// ------------------------------------------------------------------------------ sorting

// order = argsort of keys, ascending, stable (LSD radix, 11-bit digits).
inline void radix_argsort_u32(const uint32_t* keys, int64_t n, std::vector<int32_t>& order) {
  order.resize(n);
  std::vector<uint32_t> ka(keys, keys + n), kb(n);
  std::vector<int32_t> ib(n);
  std::iota(order.begin(), order.end(), 0);
  if (n <= 64) {
    std::stable_sort(order.begin(), order.end(),
                     [&](int32_t a, int32_t b) { return keys[a] < keys[b]; });
    return;
  }
  for (int shift = 0; shift < 32; shift += 11) {
    const int bits = std::min(11, 32 - shift);
    const uint32_t mask = (1u << bits) - 1u;
    std::vector<int64_t> cnt((1u << bits) + 1, 0);
    for (int64_t i = 0; i < n; ++i) cnt[((ka[i] >> shift) & mask) + 1]++;
    if (cnt[1] == n) continue;  // every key has digit 0 here: nothing moves
    bool single = false;
    for (size_t d = 1; d < cnt.size(); ++d) single |= cnt[d] == n;
    if (single) continue;
    for (size_t d = 1; d < cnt.size(); ++d) cnt[d] += cnt[d - 1];
    for (int64_t i = 0; i < n; ++i) {
      const int64_t dst = cnt[(ka[i] >> shift) & mask]++;
      kb[dst] = ka[i];
      ib[dst] = order[i];
    }
    ka.swap(kb);
    order.swap(ib);
  }
}

// Stable descending-score order of n scores (NaN first, ties by lower index).
template <typename score_t>
inline void score_order(const score_t* s, int64_t n, std::vector<int32_t>& order) {
  if constexpr (std::is_same<score_t, double>::value) {
    order.resize(n);
    std::iota(order.begin(), order.end(), 0);
    std::stable_sort(order.begin(), order.end(), [&](int32_t a, int32_t b) {
      return score_key_desc64(s[a]) < score_key_desc64(s[b]);
    });
  } else {
    std::vector<uint32_t> keys(n);
    for (int64_t i = 0; i < n; ++i) keys[i] = score_key_desc(static_cast<float>(s[i]));
    radix_argsort_u32(keys.data(), n, order);
  }
}

// Reorders `order` stably by key[order[p]]: a counting sort when the key range is small,
// else a comparison sort.
inline void stable_group(std::vector<int32_t>& order, const int64_t* key) {
  const int64_t n = static_cast<int64_t>(order.size());
  if (n <= 1) return;
  int64_t lo = key[order[0]], hi = lo;
  bool sorted = true;
  for (int64_t p = 1; p < n; ++p) {
    const int64_t k = key[order[p]];
    lo = std::min(lo, k), hi = std::max(hi, k);
    sorted &= key[order[p - 1]] <= k;
  }
  if (sorted) return;
  // (hi - lo) may overflow int64 for adversarial keys: compare in unsigned.
  const uint64_t range = static_cast<uint64_t>(hi) - static_cast<uint64_t>(lo);
  if (range < static_cast<uint64_t>(2 * n + 1024)) {
    std::vector<int64_t> cnt(range + 2, 0);
    for (int64_t p = 0; p < n; ++p) cnt[static_cast<uint64_t>(key[order[p]]) - lo + 1]++;
    for (size_t d = 1; d < cnt.size(); ++d) cnt[d] += cnt[d - 1];
    std::vector<int32_t> out(n);
    for (int64_t p = 0; p < n; ++p) out[cnt[static_cast<uint64_t>(key[order[p]]) - lo]++] = order[p];
    order.swap(out);
  } else {
    std::stable_sort(order.begin(), order.end(),
                     [&](int32_t a, int32_t b) { return key[a] < key[b]; });
  }
}

// ------------------------------------------------------------------------------ driver

// Greedy NMS of n boxes in segments. boxes: [n, 4] (scalar_t, contiguous); scores: [n];
// group keys (may be null): boxes with different keys never interact. Sets keep[i] (original
// index) and returns the stable descending-score order in `order`.
template <typename scalar_t, typename score_t>
void segmented_nms(const scalar_t* boxes, const score_t* scores, int64_t n,
                   const int64_t* key_minor, const int64_t* key_major, double thr_d,
                   std::vector<int32_t>& score_sorted, std::vector<uint8_t>& keep) {
  using F = typename IouType<scalar_t>::type;
  score_order(scores, n, score_sorted);
  std::vector<int32_t> order = score_sorted;
  if (key_minor) stable_group(order, key_minor);
  if (key_major) stable_group(order, key_major);
  // Segment boundaries in `order`.
  std::vector<int64_t> bounds{0};
  for (int64_t p = 1; p < n; ++p) {
    const int32_t a = order[p - 1], b = order[p];
    if ((key_minor && key_minor[a] != key_minor[b]) || (key_major && key_major[a] != key_major[b]))
      bounds.push_back(p);
  }
  bounds.push_back(n);
  const int64_t nseg = static_cast<int64_t>(bounds.size()) - 1;
  // Boxes in processing order, widened to F.
  std::vector<F> sb(4 * n), sa(n);
  at::parallel_for(0, n, 4096, [&](int64_t p0, int64_t p1) {
    for (int64_t p = p0; p < p1; ++p) {
      const scalar_t* b = boxes + 4 * int64_t(order[p]);
      F* o = sb.data() + 4 * p;
      o[0] = F(b[0]), o[1] = F(b[1]), o[2] = F(b[2]), o[3] = F(b[3]);
      sa[p] = box_area(o[0], o[1], o[2], o[3]);
    }
  });
  const F thr = iou_threshold_as<F>(thr_d);
  const bool nonneg = thr_d >= 0.0;
  std::vector<uint8_t> kp(n);
  // Segments cost ~ their size; a grain of 1 segment lets big and small ones spread.
  at::parallel_for(0, nseg, 1, [&](int64_t s0, int64_t s1) {
    GreedyNms<F> g;
    for (int64_t s = s0; s < s1; ++s) {
      const int64_t b = bounds[s], e = bounds[s + 1];
      g.run(sb.data() + 4 * b, sa.data() + b, e - b, thr, nonneg, kp.data() + b);
    }
  });
  keep.assign(n, 0);
  for (int64_t p = 0; p < n; ++p) keep[order[p]] = kp[p];
}

}  // namespace cpu
}  // namespace nms
}  // namespace retina_fast
