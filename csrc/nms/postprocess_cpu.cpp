// CPU kernel of the fused RetinaNet post-processing (torchvision
// RetinaNet.postprocess_detections for a whole batch).
//
// 1. Scan: the logits of every (image, level) are compared with a logit cut a little below
//    logit(score_thresh), in blocks the compiler vectorises; almost every element of a
//    trained model's output stops here, and no sigmoid is computed for it.
// 2. Select: the sigmoid of the survivors is computed by at::sigmoid itself (so the scores
//    are torch's, bit for bit, on its vectorised path), the exact `score > score_thresh`
//    test in the logits' dtype is applied, and the top-k (descending score, lower index first
//    on ties) is kept.
// 3. Per image: decode (decode_box, torchvision's order), clip, batched NMS by label with the
//    segmented CPU engine, first detections_per_img in descending score order (ties: the
//    candidate that comes first in level order).
// Stages 1-2 run in parallel over (image, level, chunk), stage 3 over images.
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

constexpr int64_t kScanChunk = int64_t(1) << 18;  // logits per scan task

// Flat indices i in [begin, end) with x[i] >= cut, appended to out. (>=: with cut = -inf, for
// a threshold < 0, -inf logits, whose score 0 passes, must not be dropped here.)
HOST_DEVICE_INLINE void scan_f32_impl(const float* x, int64_t begin, int64_t end, float cut,
                                   std::vector<int64_t>& out) {
  int64_t i = begin;
  for (; i + 16 <= end; i += 16) {
    int any = 0;
    for (int j = 0; j < 16; ++j) any |= x[i + j] >= cut;
    if (!any) continue;
    for (int j = 0; j < 16; ++j) {
      if (x[i + j] >= cut) out.push_back(i + j);
    }
  }
  for (; i < end; ++i) {
    if (x[i] >= cut) out.push_back(i);
  }
}
RF_CPU_DISPATCH(void, scan_f32,
                (const float* x, int64_t begin, int64_t end, float cut, std::vector<int64_t>& out),
                (x, begin, end, cut, out))

template <typename scalar_t>
void scan(const scalar_t* x, int64_t begin, int64_t end, float cut, std::vector<int64_t>& out) {
  if constexpr (std::is_same<scalar_t, float>::value) {
    scan_f32(x, begin, end, cut, out);
  } else {
    for (int64_t i = begin; i < end; ++i) {
      if (static_cast<double>(x[i]) >= static_cast<double>(cut)) out.push_back(i);
    }
  }
}

// A logit cut such that x < cut implies sigmoid(x) <= thresh as torch rounds it (its float
// sigmoid is within a few ulp of exact and monotone up to that error; the margin covers it
// with room to spare, and the exact test follows for everything above the cut).
template <typename scalar_t>
float logit_cut(double thresh_t) {
  if (!(thresh_t > 0.0)) return -std::numeric_limits<float>::infinity();
  if (thresh_t >= 1.0) return std::numeric_limits<float>::infinity();
  const double z = std::log(thresh_t) - std::log1p(-thresh_t);
  const bool reduced = sizeof(scalar_t) == 2;
  const double margin = (reduced ? 0.1 : 1e-3) * (1.0 + std::fabs(z));
  return static_cast<float>(z - margin);
}

struct Cand {
  double score;  // the score in the logits' dtype, widened (exact)
  int64_t idx;  // flat index within the level, anchor * K + label
};

template <typename scalar_t>
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> postprocess_impl(
    const at::Tensor& logits, const at::Tensor& regression, const at::Tensor& anchors,
    const at::Tensor& sizes, at::IntArrayRef num_anchors_per_level, double score_thresh,
    int64_t topk, double nms_thresh, int64_t D) {
  const int64_t B = logits.size(0), A = logits.size(1), K = logits.size(2);
  const int64_t L = static_cast<int64_t>(num_anchors_per_level.size());
  std::vector<int64_t> level_off(L + 1, 0);
  for (int64_t l = 0; l < L; ++l) level_off[l + 1] = level_off[l] + num_anchors_per_level[l];

  const scalar_t* xp = logits.const_data_ptr<scalar_t>();
  const scalar_t* rp = regression.const_data_ptr<scalar_t>();
  const scalar_t* ap = anchors.const_data_ptr<scalar_t>();
  const int64_t* sp = sizes.const_data_ptr<int64_t>();
  const bool shared_anchors = anchors.dim() == 2;
  // `scores > score_thresh` compares in the logits' dtype (the Python float is cast to it).
  const scalar_t thresh_t = static_cast<scalar_t>(score_thresh);
  const float cut = logit_cut<scalar_t>(static_cast<double>(thresh_t));

  // ---- 1. scan
  struct Task {
    int64_t b, l, begin, end;
  };
  std::vector<Task> tasks;
  std::vector<int64_t> first_task(B * L + 1, 0);
  for (int64_t b = 0; b < B; ++b) {
    for (int64_t l = 0; l < L; ++l) {
      first_task[b * L + l] = static_cast<int64_t>(tasks.size());
      const int64_t n = num_anchors_per_level[l] * K;
      for (int64_t s = 0; s < n; s += kScanChunk) tasks.push_back({b, l, s, std::min(n, s + kScanChunk)});
    }
  }
  first_task[B * L] = static_cast<int64_t>(tasks.size());
  std::vector<std::vector<int64_t>> found(tasks.size());
  if (cut < std::numeric_limits<float>::infinity()) {
    at::parallel_for(0, static_cast<int64_t>(tasks.size()), 1, [&](int64_t t0, int64_t t1) {
      for (int64_t t = t0; t < t1; ++t) {
        const Task& tk = tasks[t];
        const scalar_t* x = xp + (tk.b * A + level_off[tk.l]) * K;
        scan(x, tk.begin, tk.end, cut, found[t]);
      }
    });
  }

  // ---- 2. exact scores and top-k per (image, level)
  std::vector<std::vector<Cand>> sel(B * L);
  at::parallel_for(0, B * L, 1, [&](int64_t q0, int64_t q1) {
    for (int64_t q = q0; q < q1; ++q) {
      const int64_t b = q / L, l = q % L;
      int64_t m = 0;
      for (int64_t t = first_task[q]; t < first_task[q + 1]; ++t) m += found[t].size();
      if (m == 0) continue;
      const scalar_t* x = xp + (b * A + level_off[l]) * K;
      // Padded to whole vectors so every element takes torch's vectorised sigmoid path.
      const int64_t padded = (m + 63) / 64 * 64;
      at::Tensor buf = at::zeros({padded}, logits.options());
      scalar_t* bp = buf.mutable_data_ptr<scalar_t>();
      std::vector<int64_t> idx;
      idx.reserve(m);
      for (int64_t t = first_task[q]; t < first_task[q + 1]; ++t) {
        for (int64_t i : found[t]) {
          bp[idx.size()] = x[i];
          idx.push_back(i);
        }
      }
      at::Tensor sig = at::sigmoid(buf);
      const scalar_t* s = sig.const_data_ptr<scalar_t>();
      std::vector<Cand>& out = sel[q];
      for (int64_t j = 0; j < m; ++j) {
        if (s[j] > thresh_t) out.push_back({static_cast<double>(s[j]), idx[j]});
      }
      const int64_t k = std::min<int64_t>(topk, static_cast<int64_t>(out.size()));
      auto better = [](const Cand& a, const Cand& c) {
        return a.score > c.score || (a.score == c.score && a.idx < c.idx);
      };
      if (k < static_cast<int64_t>(out.size())) {
        std::nth_element(out.begin(), out.begin() + k, out.end(), better);
        out.resize(k);
      }
      std::sort(out.begin(), out.end(), better);
    }
  });

  // ---- 3. decode, clip, batched NMS, first D, per image
  at::Tensor boxes_out = at::zeros({B, D, 4}, regression.options());
  at::Tensor scores_out = at::zeros({B, D}, logits.options());
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
          decode_box<scalar_t>(rp + (b * A + a) * 4, anc + a * 4, one, one, one, one, clip, o);
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
    int64_t topk_candidates, double nms_thresh, int64_t detections_per_img) {
  const char* op = "retina_fast::postprocess_detections";
  check_postprocess_args(cls_logits, bbox_regression, anchors, image_sizes, num_anchors_per_level,
                         score_thresh, topk_candidates, nms_thresh, detections_per_img, op);
  check_device(cls_logits, at::kCPU, op, "cls_logits");
  const at::Tensor x = cls_logits.contiguous();
  const at::Tensor r = bbox_regression.contiguous();
  // decode_single runs in the regression's dtype: anchors are cast to it, as torchvision does.
  const at::Tensor a = anchors.to(r.scalar_type()).contiguous();
  const at::Tensor s = image_sizes.to(at::kLong).contiguous();
  std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> out;
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
