// CPU kernel of the fused RetinaNet post-processing (torchvision
// RetinaNet.postprocess_detections for a whole batch).
//
// 1. Select, per (image, level), streaming over the logits in index order: a logit cut that
//    starts at the one for score_thresh and rises with the k-th best score found so far
//    (sigmoid_score_cut, nms_common.h: below the cut a score can neither pass the threshold
//    nor beat k lower-indexed candidates). The scan compares logits with the cut in blocks
//    the compiler vectorises; the few logits at or above it are scored in batches by
//    at::sigmoid itself (so the scores are torch's, bit for bit, on its vectorised path), the
//    exact `score > score_thresh` test in the logits' dtype is applied, and the best k are
//    kept (descending score, lower index first on ties). Nothing is ever sized by the number
//    of scores above the threshold: memory is O(topk) per stream, time ~ the scan.
//    Streams run in parallel over chunks of (image, level); each keeps the exact top-k of its
//    chunks, and the union of the streams' top-k holds the level's top-k (a total order), so
//    the result does not depend on the thread count.
// 2. Per image: decode (decode_box, torchvision's order), clip, batched NMS by label with the
//    segmented CPU engine, first detections_per_img in descending score order (ties: the
//    candidate that comes first in level order).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "common/box_math.h"
#include "nms/nms_common.h"
#include "nms/nms_cpu_engine.h"

namespace retina_fast {
namespace nms {
namespace {

constexpr int64_t kScanChunk = int64_t(1) << 18;  // logits per task (load balance only)
// Logits per test in the scan: one branch per 64 compares (4 AVX-512 vectors) ran the scan at
// 1.34 ms for 120,087 x 91 float logits vs 2.25 ms with blocks of 16, on one thread of the
// dev VM (the input read alone: ~1.4 ms).
constexpr int64_t kBlock = 64;

// Appends to out[n...] the flat indices i in [begin, end) with x[i] >= cut, stopping after the
// first block of kBlock that brings n to `limit` or more (out has room for limit + kBlock - 1);
// returns where it stopped. (>=: with cut = -inf, for a threshold < 0, -inf logits, whose score
// 0 passes, must not be dropped here; NaN never passes.) Compared in cmp_t: float for the float
// types, double for float64.
template <typename scalar_t, typename cmp_t>
HOST_DEVICE_INLINE int64_t scan_impl(const scalar_t* x, int64_t begin, int64_t end, cmp_t cut,
                                     int64_t* out, int64_t& n, int64_t limit) {
  int64_t i = begin;
  for (; i + kBlock <= end; i += kBlock) {
    int any = 0;
    for (int j = 0; j < kBlock; ++j) any |= static_cast<cmp_t>(x[i + j]) >= cut;
    if (!any) continue;
    for (int j = 0; j < kBlock; ++j) {
      out[n] = i + j;
      n += static_cast<cmp_t>(x[i + j]) >= cut;
    }
    if (n >= limit) return i + kBlock;
  }
  for (; i < end && n < limit; ++i) {
    out[n] = i;
    n += static_cast<cmp_t>(x[i]) >= cut;
  }
  return i;
}

HOST_DEVICE_INLINE int64_t scan_f32_impl(const float* x, int64_t begin, int64_t end, float cut,
                                         int64_t* out, int64_t& n, int64_t limit) {
  return scan_impl<float, float>(x, begin, end, cut, out, n, limit);
}
RF_CPU_DISPATCH(int64_t, scan_f32,
                (const float* x, int64_t begin, int64_t end, float cut, int64_t* out, int64_t& n,
                 int64_t limit),
                (x, begin, end, cut, out, n, limit))

template <typename scalar_t>
int64_t scan(const scalar_t* x, int64_t begin, int64_t end, float cut, int64_t* out, int64_t& n,
             int64_t limit) {
  if constexpr (std::is_same<scalar_t, float>::value) {
    return scan_f32(x, begin, end, cut, out, n, limit);
  } else if constexpr (std::is_same<scalar_t, double>::value) {
    return scan_impl<double, double>(x, begin, end, static_cast<double>(cut), out, n, limit);
  } else {
    return scan_impl<scalar_t, float>(x, begin, end, cut, out, n, limit);
  }
}

struct Cand {
  double score;  // the score in the logits' dtype, widened (exact)
  int64_t idx;  // flat index within the level, anchor * K + label
};

// Descending score, lower index first among equal scores: a total order on candidates.
struct Better {
  bool operator()(const Cand& a, const Cand& c) const {
    return a.score > c.score || (a.score == c.score && a.idx < c.idx);
  }
};

// The exact top-k of one (image, level), fed ranges of its logits in increasing index order.
// scalar_t: the dtype scores are computed and compared in; in_t: the logits' storage (float16 /
// bfloat16 under upcast, read as float32, exactly; else scalar_t).
template <typename scalar_t, typename in_t = scalar_t>
class LevelTopK {
 public:
  LevelTopK(int64_t k, scalar_t thresh, const at::Tensor& like)
      : k_(k), thresh_(thresh),
        cap_(std::min<int64_t>(std::max<int64_t>(2 * std::min<int64_t>(k, 4096), 512), 8192)) {
    pend_.resize(cap_ + kBlock);
    const int64_t padded = (cap_ + kBlock + 63) / 64 * 64;
    in_ = at::empty({padded}, like.options());
    out_ = at::empty({padded}, like.options());
  }

  void reset(const in_t* x) {
    x_ = x;
    n_ = 0;
    kept_.clear();
    pruned_ = false;
    floor_ = -std::numeric_limits<double>::infinity();
    cut_ = float_at_most(sigmoid_score_cut(static_cast<double>(thresh_), SigmoidBound<scalar_t>::rel,
                                           SigmoidBound<scalar_t>::tiny));
    done_ = cut_ == std::numeric_limits<float>::infinity();  // score_thresh >= 1: nothing passes
  }

  void feed(int64_t begin, int64_t end) {
    while (begin < end && !done_) {
      begin = scan<in_t>(x_, begin, end, cut_, pend_.data(), n_, cap_);
      if (n_ >= cap_) flush();
    }
  }

  // The kept candidates (at most k, unordered); the object can be reset afterwards.
  std::vector<Cand>& finish() {
    flush();
    prune();
    return kept_;
  }

 private:
  // Scores the pending logits (padded to whole vectors so every element takes torch's
  // vectorised sigmoid path, as in a full-tensor call), keeps those above the threshold.
  void flush() {
    const int64_t m = n_;
    n_ = 0;
    if (m == 0) return;
    const int64_t padded = (m + 63) / 64 * 64;
    scalar_t* ip = in_.mutable_data_ptr<scalar_t>();
    for (int64_t j = 0; j < m; ++j) ip[j] = static_cast<scalar_t>(x_[pend_[j]]);
    for (int64_t j = m; j < padded; ++j) ip[j] = scalar_t(0);
    at::Tensor o = out_.narrow(0, 0, padded);
    at::sigmoid_out(o, in_.narrow(0, 0, padded));
    const scalar_t* s = o.const_data_ptr<scalar_t>();
    // floor_: the k-th best score once k are held; a later logit must beat it strictly.
    for (int64_t j = 0; j < m; ++j) {
      const double sj = static_cast<double>(s[j]);
      if (s[j] > thresh_ && sj > floor_) kept_.push_back({sj, pend_[j]});
    }
    // The first prune as soon as k are held (to raise the cut early), later ones once 2k are:
    // amortised O(1) per kept candidate for any k.
    const int64_t held = static_cast<int64_t>(kept_.size());
    if (held >= k_ && (!pruned_ || held - k_ >= k_)) prune();
  }

  // Keeps the best k and raises the cut to the k-th best score: a later logit (higher index)
  // with a score <= it cannot enter.
  void prune() {
    if (static_cast<int64_t>(kept_.size()) < k_) return;
    std::nth_element(kept_.begin(), kept_.begin() + (k_ - 1), kept_.end(), Better());
    kept_.resize(k_);
    pruned_ = true;
    const double sk = kept_[k_ - 1].score;
    floor_ = sk;
    const float c = float_at_most(sigmoid_score_cut(sk, SigmoidBound<scalar_t>::rel,
                                                    SigmoidBound<scalar_t>::tiny));
    cut_ = std::max(cut_, c);
    if (sk >= 1.0) done_ = true;  // no score exceeds 1: the k kept cannot be beaten
  }

  const int64_t k_;
  const scalar_t thresh_;
  const int64_t cap_;  // pending logits per scoring batch
  const in_t* x_ = nullptr;
  std::vector<int64_t> pend_;
  int64_t n_ = 0;
  std::vector<Cand> kept_;
  at::Tensor in_, out_;
  float cut_ = 0.f;
  double floor_ = 0.0;
  bool pruned_ = false, done_ = false;
};

// scalar_t: the dtype of the scores, boxes and NMS; in_t: that of the logits and codes (under
// upcast float16/bfloat16, read as float32; else scalar_t). Anchors come as scalar_t.
template <typename scalar_t, typename in_t = scalar_t>
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> postprocess_impl(
    const at::Tensor& logits, const at::Tensor& regression, const at::Tensor& anchors,
    const at::Tensor& sizes, at::IntArrayRef num_anchors_per_level, double score_thresh,
    int64_t topk, double nms_thresh, int64_t D) {
  const int64_t B = logits.size(0), A = logits.size(1), K = logits.size(2);
  const int64_t L = static_cast<int64_t>(num_anchors_per_level.size());
  std::vector<int64_t> level_off(L + 1, 0);
  for (int64_t l = 0; l < L; ++l) level_off[l + 1] = level_off[l] + num_anchors_per_level[l];

  const in_t* xp = logits.const_data_ptr<in_t>();
  const in_t* rp = regression.const_data_ptr<in_t>();
  const scalar_t* ap = anchors.const_data_ptr<scalar_t>();
  const int64_t* sp = sizes.const_data_ptr<int64_t>();
  const bool shared_anchors = anchors.dim() == 2;
  // `scores > score_thresh` compares in the logits' dtype (the Python float is cast to it).
  const scalar_t thresh_t = static_cast<scalar_t>(score_thresh);

  // ---- 1. select: streams over tasks (image, level, chunk), in task order
  struct Task {
    int64_t q, begin, end;  // q = image * L + level
  };
  std::vector<Task> tasks;
  std::vector<int64_t> first_task(B * L + 1, 0);
  for (int64_t b = 0; b < B; ++b) {
    for (int64_t l = 0; l < L; ++l) {
      first_task[b * L + l] = static_cast<int64_t>(tasks.size());
      const int64_t n = num_anchors_per_level[l] * K;
      if (topk == 0) continue;
      for (int64_t s = 0; s < n; s += kScanChunk) tasks.push_back({b * L + l, s, std::min(n, s + kScanChunk)});
    }
  }
  first_task[B * L] = static_cast<int64_t>(tasks.size());
  // part[t]: the top-k of the stream that began at task t (empty for tasks that continued one)
  std::vector<std::vector<Cand>> part(tasks.size());
  at::parallel_for(0, static_cast<int64_t>(tasks.size()), 1, [&](int64_t t0, int64_t t1) {
    LevelTopK<scalar_t, in_t> sel(topk, thresh_t, anchors);
    int64_t start = t0;
    for (int64_t t = t0; t < t1; ++t) {
      const Task& tk = tasks[t];
      if (t == t0 || tk.q != tasks[t - 1].q) {
        if (t != t0) part[start].swap(sel.finish());
        start = t;
        const int64_t b = tk.q / L, l = tk.q % L;
        sel.reset(xp + (b * A + level_off[l]) * K);
      }
      sel.feed(tk.begin, tk.end);
    }
    if (t1 > t0) part[start].swap(sel.finish());
  });

  // ---- merge the streams of each (image, level): best k, in order
  std::vector<std::vector<Cand>> sel(B * L);
  at::parallel_for(0, B * L, 1, [&](int64_t q0, int64_t q1) {
    for (int64_t q = q0; q < q1; ++q) {
      std::vector<Cand>& out = sel[q];
      for (int64_t t = first_task[q]; t < first_task[q + 1]; ++t) {
        if (out.empty()) out.swap(part[t]);
        else out.insert(out.end(), part[t].begin(), part[t].end());
        std::vector<Cand>().swap(part[t]);
      }
      const int64_t k = std::min<int64_t>(topk, static_cast<int64_t>(out.size()));
      if (k < static_cast<int64_t>(out.size())) {
        std::nth_element(out.begin(), out.begin() + k, out.end(), Better());
        out.resize(k);
      }
      std::sort(out.begin(), out.end(), Better());
    }
  });

  // ---- 2. decode, clip, batched NMS, first D, per image
  at::Tensor boxes_out = at::zeros({B, D, 4}, anchors.options());
  at::Tensor scores_out = at::zeros({B, D}, anchors.options());
  at::Tensor labels_out = at::full({B, D}, -1, logits.options().dtype(at::kLong));
  at::Tensor counts = at::zeros({B}, logits.options().dtype(at::kLong));
  scalar_t* bo = boxes_out.mutable_data_ptr<scalar_t>();
  scalar_t* so = scores_out.mutable_data_ptr<scalar_t>();
  int64_t* lo = labels_out.mutable_data_ptr<int64_t>();
  int64_t* co = counts.mutable_data_ptr<int64_t>();
  const scalar_t one(1), zero(0);
  const scalar_t clip = static_cast<scalar_t>(std::log(1000.0 / 16.0));

  at::parallel_for(0, B, 1, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      int64_t m = 0;
      for (int64_t l = 0; l < L; ++l) m += sel[b * L + l].size();
      if (m == 0) continue;
      std::vector<scalar_t> bx(4 * m), sc(m);
      std::vector<int64_t> lab(m);
      const scalar_t H = static_cast<scalar_t>(sp[2 * b]), W = static_cast<scalar_t>(sp[2 * b + 1]);
      const scalar_t* anc = ap + (shared_anchors ? 0 : b * A * 4);
      int64_t j = 0;
      for (int64_t l = 0; l < L; ++l) {
        for (const Cand& c : sel[b * L + l]) {
          const int64_t a = level_off[l] + c.idx / K;
          lab[j] = c.idx % K;
          sc[j] = static_cast<scalar_t>(c.score);
          scalar_t* o = bx.data() + 4 * j;
          scalar_t code[4];
          decode_box<scalar_t>(codes_as<scalar_t>(rp + (b * A + a) * 4, code), anc + a * 4, one, one, one, one,
                               clip, o);
          o[0] = clamp_like_torch(o[0], zero, W);
          o[1] = clamp_like_torch(o[1], zero, H);
          o[2] = clamp_like_torch(o[2], zero, W);
          o[3] = clamp_like_torch(o[3], zero, H);
          ++j;
        }
      }
      std::vector<int32_t> order;
      std::vector<uint8_t> keep;
      cpu::segmented_nms<scalar_t, scalar_t>(bx.data(), sc.data(), m, lab.data(), nullptr,
                                             nms_thresh, order, keep);
      int64_t cnt = 0;
      for (int32_t i : order) {
        if (!keep[i]) continue;
        if (cnt == D) break;
        const int64_t r = b * D + cnt;
        for (int c = 0; c < 4; ++c) bo[4 * r + c] = bx[4 * int64_t(i) + c];
        so[r] = sc[i];
        lo[r] = lab[i];
        ++cnt;
      }
      co[b] = cnt;
    }
  });
  return {boxes_out, scores_out, labels_out, counts};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> postprocess_cpu(
    const at::Tensor& cls_logits, const at::Tensor& bbox_regression, const at::Tensor& anchors,
    const at::Tensor& image_sizes, at::IntArrayRef num_anchors_per_level, double score_thresh,
    int64_t topk_candidates, double nms_thresh, int64_t detections_per_img, bool upcast) {
  const char* op = "retina_fast::postprocess_detections";
  check_postprocess_args(cls_logits, bbox_regression, anchors, image_sizes, num_anchors_per_level,
                         score_thresh, topk_candidates, nms_thresh, detections_per_img, op);
  check_device(cls_logits, at::kCPU, op, "cls_logits");
  const at::Tensor x = cls_logits.contiguous();
  const at::Tensor r = bbox_regression.contiguous();
  const at::ScalarType math = postprocess_math_type(r.scalar_type(), upcast);
  // decode_single runs in the regression's dtype (float32 under upcast): anchors are cast to
  // it, as torchvision does.
  const at::Tensor a = anchors.to(math).contiguous();
  const at::Tensor s = image_sizes.to(at::kLong).contiguous();
  std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> out;
  if (math != x.scalar_type()) {
    AT_DISPATCH_REDUCED_FLOATING_TYPES(x.scalar_type(), "postprocess_cpu_upcast", [&] {
      out = postprocess_impl<float, scalar_t>(x, r, a, s, num_anchors_per_level, score_thresh,
                                              topk_candidates, nms_thresh, detections_per_img);
    });
    return out;
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "postprocess_cpu", [&] {
    out = postprocess_impl<scalar_t>(x, r, a, s, num_anchors_per_level, score_thresh,
                                     topk_candidates, nms_thresh, detections_per_img);
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(retina_fast, CPU, m) {
  m.impl("postprocess_detections", &postprocess_cpu);
}

}  // namespace nms
}  // namespace retina_fast
