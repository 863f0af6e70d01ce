// CUDA kernels of nms, batched_nms, batched_nms_multi and the fused RetinaNet post-processing.
//
// NMS: boxes are put in processing order by stable radix sorts (score descending, then class,
// then image, each stable, so a segment = (image, class) is contiguous and score-ordered, ties
// by lower index as on the CPU). A 64x64-tile bitmask kernel computes IoU only inside a
// segment: tile (row block, column block) exists only while a row of the block has columns
// left in its segment, so different classes never cost an IoU, and the mask is stored as the
// upper triangle (half of torchvision's square). The greedy scan runs on the GPU, one block
// per chunk (per image in the post-processing), only over the words of a row's own segment.
// Then kept boxes are ordered by score (stable) per image. Host syncs: one, to learn the
// output size (nms, batched_nms, batched_nms_multi with max_per_image < 0); none otherwise.
//
// Post-processing: per level a fused kernel writes, for every (image, logit), a 64-bit key
// (float bits of torch's sigmoid << 32 | ~index) when sigmoid > score_thresh and 0 otherwise;
// torch.topk over the keys picks the best min(topk, n) per image, ties by lower index, with no
// host sync. Then one kernel decodes and clips the candidates into a padded [B, C] layout, and
// the NMS above runs with one chunk per image. Outputs are padded [B, D]: no host sync at all.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <cub/cub.cuh>
#include <torch/library.h>

#include <cstdint>
#include <limits>
#include <vector>

#include "common/box_math.h"
#include "common/cuda_utils.cuh"
#include "nms/nms_common.h"

namespace retina_fast {
namespace nms {
namespace {

constexpr int kBlock = 64;  // boxes per mask tile side (bits of a word)
using Tensor = at::Tensor;

HOST_DEVICE_INLINE int64_t div_up(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Words of a chunk's triangular mask before row block rb (nb row blocks): rows of block r hold
// nb - r words (column blocks r..nb-1).
HOST_DEVICE_INLINE int64_t tri_offset(int64_t rb, int64_t nb) {
  return int64_t(kBlock) * (rb * nb - rb * (rb - 1) / 2);
}

inline at::TensorOptions byte_opts(const Tensor& like) {
  return like.options().dtype(at::kByte);
}

template <typename K, typename V>
void sort_pairs(const K* kin, K* kout, const V* vin, V* vout, int64_t n, cudaStream_t stream,
                const Tensor& like, int end_bit = sizeof(K) * 8) {
  if (n == 0) return;
  size_t bytes = 0;
  C10_CUDA_CHECK(cub::DeviceRadixSort::SortPairs(nullptr, bytes, kin, kout, vin, vout,
                                                 static_cast<int>(n), 0, end_bit, stream));
  Tensor tmp = at::empty({static_cast<int64_t>(bytes)}, byte_opts(like));
  C10_CUDA_CHECK(cub::DeviceRadixSort::SortPairs(tmp.data_ptr(), bytes, kin, kout, vin, vout,
                                                 static_cast<int>(n), 0, end_bit, stream));
}

// Stable sort within `segments` equal chunks of length L.
template <typename K, typename V>
void segmented_sort_pairs(const K* kin, K* kout, const V* vin, V* vout, int64_t segments,
                          int64_t L, cudaStream_t stream, const Tensor& like,
                          int end_bit = sizeof(K) * 8) {
  if (segments * L == 0) return;
  Tensor offsets = at::arange(0, (segments + 1) * L, L, like.options().dtype(at::kInt));
  const int* off = offsets.const_data_ptr<int>();
  size_t bytes = 0;
  C10_CUDA_CHECK(cub::DeviceSegmentedRadixSort::SortPairs(
      nullptr, bytes, kin, kout, vin, vout, static_cast<int>(segments * L),
      static_cast<int>(segments), off, off + 1, 0, end_bit, stream));
  Tensor tmp = at::empty({static_cast<int64_t>(bytes)}, byte_opts(like));
  C10_CUDA_CHECK(cub::DeviceSegmentedRadixSort::SortPairs(
      tmp.data_ptr(), bytes, kin, kout, vin, vout, static_cast<int>(segments * L),
      static_cast<int>(segments), off, off + 1, 0, end_bit, stream));
}

// ------------------------------------------------------------------------------ kernels

template <typename score_t, typename key_t>
__global__ void score_keys_kernel(const score_t* __restrict__ s, int64_t n, key_t* __restrict__ k,
                                  int32_t* __restrict__ iota) {
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n;
       i += int64_t(gridDim.x) * blockDim.x) {
    if constexpr (sizeof(key_t) == 8) {
      k[i] = score_key_desc64(static_cast<double>(s[i]));
    } else {
      k[i] = score_key_desc(static_cast<float>(s[i]));
    }
    iota[i] = static_cast<int32_t>(i);
  }
}

// Boxes in processing order, widened to F, with their areas.
template <typename scalar_t, typename F, typename idx_t>
__global__ void gather_boxes_kernel(const scalar_t* __restrict__ boxes, const idx_t* __restrict__ perm,
                                    int64_t n, F* __restrict__ out, F* __restrict__ areas) {
  for (int64_t p = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; p < n;
       p += int64_t(gridDim.x) * blockDim.x) {
    const scalar_t* b = boxes + 4 * int64_t(perm[p]);
    F* o = out + 4 * p;
    o[0] = F(b[0]), o[1] = F(b[1]), o[2] = F(b[2]), o[3] = F(b[3]);
    areas[p] = box_area(o[0], o[1], o[2], o[3]);
  }
}

// seg_end[p]: chunk-local end of p's segment, (major, minor) keys sorted within the chunk.
// major may be null. A position whose minor key is `invalid` is a segment of its own.
template <typename key_t>
__global__ void segment_end_kernel(const int64_t* __restrict__ major, const key_t* __restrict__ minor,
                                   int64_t total, int64_t L, key_t invalid,
                                   int64_t* __restrict__ seg_end) {
  for (int64_t p = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; p < total;
       p += int64_t(gridDim.x) * blockDim.x) {
    const int64_t base = (p / L) * L;
    const key_t mk = minor[p];
    const int64_t Mk = major ? major[p] : 0;
    if (mk == invalid) {
      seg_end[p] = p - base + 1;
      continue;
    }
    int64_t lo = p + 1, hi = base + L;  // first position past the segment, in [lo, hi]
    while (lo < hi) {
      const int64_t mid = lo + (hi - lo) / 2;
      const bool same = minor[mid] == mk && (!major || major[mid] == Mk);
      if (same) lo = mid + 1;
      else hi = mid;
    }
    seg_end[p] = lo - base;
  }
}

// Tile (column block x, row block y, chunk z) of the suppression bitmask.
template <typename F>
__global__ void __launch_bounds__(kBlock) mask_kernel(const F* __restrict__ boxes,
                                                      const F* __restrict__ areas,
                                                      const int64_t* __restrict__ seg_end,
                                                      int64_t L, int64_t nb, F thr,
                                                      uint64_t* __restrict__ mask) {
  const int64_t cb = blockIdx.x, rb = blockIdx.y, chunk = blockIdx.z;
  if (cb < rb) return;
  const int64_t base = chunk * L;
  const int64_t last_row = min(rb * kBlock + kBlock - 1, L - 1);
  if (cb * kBlock >= seg_end[base + last_row]) return;  // no row of the block reaches here
  __shared__ F sb[kBlock * 4];
  __shared__ F sa[kBlock];
  const int t = threadIdx.x;
  const int64_t col = cb * kBlock + t;
  if (col < L) {
    const F* b = boxes + 4 * (base + col);
    sb[4 * t] = b[0], sb[4 * t + 1] = b[1], sb[4 * t + 2] = b[2], sb[4 * t + 3] = b[3];
    sa[t] = areas[base + col];
  }
  __syncthreads();
  const int64_t row = rb * kBlock + t;
  if (row >= L) return;
  const F* rbx = boxes + 4 * (base + row);
  const F r[4] = {rbx[0], rbx[1], rbx[2], rbx[3]};
  const F ra = areas[base + row];
  const int64_t se = seg_end[base + row];
  uint64_t bits = 0;
  for (int j = (cb == rb ? t + 1 : 0); j < kBlock; ++j) {
    if (cb * kBlock + j >= se) break;
    // a = the higher-scored box, as on the CPU (kept box first).
    if (box_iou_pair(r, ra, sb + 4 * j, sa[j]) > thr) bits |= 1ull << j;
  }
  mask[chunk * tri_offset(nb, nb) + tri_offset(rb, nb) + int64_t(t) * (nb - rb) + (cb - rb)] = bits;
}

// Greedy scan of one chunk per block (torchvision's gather_keep_from_mask, on the triangle
// and limited to each row's segment). `removed`: nb words per chunk, in shared memory when
// they fit, else global scratch.
__global__ void scan_kernel(const uint64_t* __restrict__ mask, const int64_t* __restrict__ seg_end,
                            int64_t L, int64_t nb, uint64_t* __restrict__ removed_global,
                            uint8_t* __restrict__ keep) {
  extern __shared__ uint64_t removed_shared[];
  const int64_t chunk = blockIdx.x;
  uint64_t* removed = removed_global ? removed_global + chunk * nb : removed_shared;
  const int64_t base = chunk * L;
  const uint64_t* m = mask + chunk * tri_offset(nb, nb);
  const int tid = threadIdx.x;
  for (int64_t i = tid; i < nb; i += blockDim.x) removed[i] = 0;
  __syncthreads();
  for (int64_t rb = 0; rb < nb; ++rb) {
    uint64_t rv = removed[rb];
    __syncthreads();
    const uint64_t* blk = m + tri_offset(rb, nb);
    const int64_t stride = nb - rb;
    for (int in = 0; in < kBlock; ++in) {
      const int64_t i = rb * kBlock + in;
      if (i >= L) break;
      const bool kept = !((rv >> in) & 1ull);
      if (tid == 0) keep[base + i] = kept;
      if (kept) {
        const uint64_t* p = blk + int64_t(in) * stride;
        const int64_t ce = div_up(seg_end[base + i], kBlock);
        for (int64_t j = rb + 1 + tid; j < ce; j += blockDim.x) removed[j] |= p[j - rb];
        rv |= p[0];
      }
    }
    __syncthreads();
  }
}

// Runs mask + scan over `chunks` chunks of L sorted boxes. keep: [chunks * L] out.
template <typename F>
void mask_and_scan(const F* boxes, const F* areas, const int64_t* seg_end, int64_t chunks,
                   int64_t L, double thr_d, uint8_t* keep, const Tensor& like, cudaStream_t stream) {
  if (chunks * L == 0) return;
  const int64_t nb = div_up(L, kBlock);
  TORCH_CHECK(nb <= 65535, "retina_fast::nms (CUDA): at most 65535 * 64 boxes per chunk, got ", L);
  const int64_t words = chunks * tri_offset(nb, nb);
  Tensor mask = at::empty({words}, like.options().dtype(at::kLong));
  uint64_t* mp = reinterpret_cast<uint64_t*>(mask.mutable_data_ptr<int64_t>());
  const F thr = iou_threshold_as<F>(thr_d);
  const dim3 grid(nb, nb, chunks);
  mask_kernel<F><<<grid, kBlock, 0, stream>>>(boxes, areas, seg_end, L, nb, thr, mp);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  const size_t shared = nb * sizeof(uint64_t);
  Tensor scratch;
  uint64_t* rg = nullptr;
  if (shared > 32 * 1024) {
    scratch = at::empty({chunks * nb}, like.options().dtype(at::kLong));
    rg = reinterpret_cast<uint64_t*>(scratch.mutable_data_ptr<int64_t>());
  }
  const int threads = static_cast<int>(std::min<int64_t>(std::max<int64_t>(32, div_up(nb, 32) * 32), 1024));
  scan_kernel<<<chunks, threads, rg ? 0 : shared, stream>>>(mp, seg_end, L, nb, rg, keep);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

__global__ void scatter_keep_kernel(const uint8_t* __restrict__ keep_sorted, const int32_t* __restrict__ perm,
                                    int64_t n, uint8_t* __restrict__ keep_orig) {
  for (int64_t p = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; p < n;
       p += int64_t(gridDim.x) * blockDim.x) {
    keep_orig[perm[p]] = keep_sorted[p];
  }
}

// key[q] = image of the q-th box in score order if kept (and its image valid), else B.
__global__ void image_key_kernel(const uint8_t* __restrict__ keep_orig, const int32_t* __restrict__ score_perm,
                                 const int64_t* __restrict__ img, int64_t n, int64_t B,
                                 int64_t* __restrict__ key, int64_t* __restrict__ counts) {
  for (int64_t q = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; q < n;
       q += int64_t(gridDim.x) * blockDim.x) {
    const int32_t i = score_perm[q];
    const int64_t b = img ? img[i] : 0;
    const bool ok = keep_orig[i] && b >= 0 && b < B;
    key[q] = ok ? b : B;
    if (ok) atomicAdd(reinterpret_cast<unsigned long long*>(counts + b), 1ull);
  }
}

__global__ void write_keep_kernel(const int64_t* __restrict__ key, const int32_t* __restrict__ idx,
                                  const int64_t* __restrict__ offsets, int64_t n, int64_t B, int64_t W,
                                  int64_t* __restrict__ out) {
  for (int64_t q = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; q < n;
       q += int64_t(gridDim.x) * blockDim.x) {
    const int64_t b = key[q];
    if (b >= B) continue;
    const int64_t j = q - offsets[b];
    if (j < W) out[b * W + j] = idx[q];
  }
}

// ------------------------------------------------------------------------------ NMS driver

template <typename scalar_t, typename score_t>
std::tuple<Tensor, Tensor> multi_impl(const Tensor& boxes, const Tensor& scores, const Tensor& cls,
                                      const Tensor& img, int64_t B, double thr, int64_t max_per_image) {
  using F = typename IouType<scalar_t>::type;
  using key_t = typename std::conditional<std::is_same<score_t, double>::value, uint64_t, uint32_t>::type;
  cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  const int64_t n = boxes.size(0);
  const auto iopt = boxes.options().dtype(at::kInt);
  const auto lopt = boxes.options().dtype(at::kLong);
  const int64_t grid = cuda::grid_for(n);
  const int threads = cuda::kThreads;

  // 1. stable score order, then stable by class, then by image
  Tensor keys = at::empty({n}, lopt.dtype(sizeof(key_t) == 8 ? at::kLong : at::kInt));
  Tensor keys_s = at::empty_like(keys);
  Tensor iota = at::empty({n}, iopt), score_perm = at::empty({n}, iopt);
  key_t* kp = reinterpret_cast<key_t*>(keys.data_ptr());
  key_t* ksp = reinterpret_cast<key_t*>(keys_s.data_ptr());
  score_keys_kernel<score_t, key_t><<<grid, threads, 0, stream>>>(
      scores.const_data_ptr<score_t>(), n, kp, iota.mutable_data_ptr<int32_t>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  sort_pairs(kp, ksp, iota.const_data_ptr<int32_t>(), score_perm.mutable_data_ptr<int32_t>(), n, stream, boxes);
  Tensor perm = score_perm;
  for (const Tensor& group : {cls, img}) {
    if (!group.defined()) continue;
    Tensor g = group.index_select(0, perm);
    Tensor gs = at::empty_like(g), p2 = at::empty_like(perm);
    sort_pairs(g.const_data_ptr<int64_t>(), gs.mutable_data_ptr<int64_t>(), perm.const_data_ptr<int32_t>(),
               p2.mutable_data_ptr<int32_t>(), n, stream, boxes);
    perm = p2;
  }
  Tensor cls_s = cls.defined() ? cls.index_select(0, perm) : at::zeros({n}, lopt);
  Tensor img_s = img.defined() ? img.index_select(0, perm) : Tensor();

  // 2. segments, boxes in processing order, mask, scan
  Tensor seg_end = at::empty({n}, lopt);
  segment_end_kernel<int64_t><<<grid, threads, 0, stream>>>(
      img_s.defined() ? img_s.const_data_ptr<int64_t>() : nullptr, cls_s.const_data_ptr<int64_t>(), n, n,
      std::numeric_limits<int64_t>::max(), seg_end.mutable_data_ptr<int64_t>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  const auto fopt = boxes.options().dtype(c10::CppTypeToScalarType<F>::value);
  Tensor sb = at::empty({n, 4}, fopt), sa = at::empty({n}, fopt);
  gather_boxes_kernel<scalar_t, F, int32_t><<<grid, threads, 0, stream>>>(
      boxes.const_data_ptr<scalar_t>(), perm.const_data_ptr<int32_t>(), n, sb.mutable_data_ptr<F>(),
      sa.mutable_data_ptr<F>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  Tensor keep = at::empty({n}, byte_opts(boxes));
  mask_and_scan<F>(sb.const_data_ptr<F>(), sa.const_data_ptr<F>(), seg_end.const_data_ptr<int64_t>(), 1, n,
                   thr, keep.mutable_data_ptr<uint8_t>(), boxes, stream);

  // 3. kept boxes per image in score order
  Tensor keep_orig = at::empty({n}, byte_opts(boxes));
  scatter_keep_kernel<<<grid, threads, 0, stream>>>(keep.const_data_ptr<uint8_t>(), perm.const_data_ptr<int32_t>(),
                                                    n, keep_orig.mutable_data_ptr<uint8_t>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  Tensor counts = at::zeros({B}, lopt);
  Tensor ikey = at::empty({n}, lopt), ikey_s = at::empty({n}, lopt), final_idx = at::empty({n}, iopt);
  image_key_kernel<<<grid, threads, 0, stream>>>(
      keep_orig.const_data_ptr<uint8_t>(), score_perm.const_data_ptr<int32_t>(),
      img.defined() ? img.const_data_ptr<int64_t>() : nullptr, n, B, ikey.mutable_data_ptr<int64_t>(),
      counts.mutable_data_ptr<int64_t>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  sort_pairs(ikey.const_data_ptr<int64_t>(), ikey_s.mutable_data_ptr<int64_t>(), score_perm.const_data_ptr<int32_t>(),
             final_idx.mutable_data_ptr<int32_t>(), n, stream, boxes);
  Tensor offsets = at::cumsum(counts, 0) - counts;
  // The one host sync: the width of a data-dependent output.
  const int64_t W = max_per_image >= 0 ? max_per_image : (B > 0 ? counts.max().item<int64_t>() : 0);
  Tensor out = at::full({B, W}, -1, lopt);
  if (n > 0 && B > 0 && W > 0) {
    write_keep_kernel<<<grid, threads, 0, stream>>>(ikey_s.const_data_ptr<int64_t>(), final_idx.const_data_ptr<int32_t>(),
                                                    offsets.const_data_ptr<int64_t>(), n, B, W,
                                                    out.mutable_data_ptr<int64_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  return {out, counts.clamp_max(W)};
}

std::tuple<Tensor, Tensor> run_multi(const Tensor& boxes, const Tensor& scores, const Tensor& cls,
                                     const Tensor& img, int64_t B, double thr, int64_t max_per_image) {
  const at::cuda::CUDAGuard guard(boxes.device());
  const Tensor b = boxes.contiguous(), s = scores.contiguous();
  std::tuple<Tensor, Tensor> out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, b.scalar_type(), "nms_cuda", [&] {
    using box_t = scalar_t;
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, s.scalar_type(), "nms_cuda_scores", [&] {
      out = multi_impl<box_t, scalar_t>(b, s, cls, img, B, thr, max_per_image);
    });
  });
  return out;
}

Tensor nms_cuda(const Tensor& boxes, const Tensor& scores, double iou_threshold) {
  const char* op = "retina_fast::nms";
  check_nms_args(boxes, scores, iou_threshold, op);
  check_device(boxes, at::kCUDA, op, "boxes");
  if (boxes.size(0) == 0) return at::empty({0}, boxes.options().dtype(at::kLong));
  return std::get<0>(run_multi(boxes, scores, Tensor(), Tensor(), 1, iou_threshold, -1)).select(0, 0);
}

Tensor batched_nms_cuda(const Tensor& boxes, const Tensor& scores, const Tensor& idxs, double iou_threshold) {
  const char* op = "retina_fast::batched_nms";
  check_nms_args(boxes, scores, iou_threshold, op);
  check_index_arg(idxs, boxes, op, "idxs");
  check_device(boxes, at::kCUDA, op, "boxes");
  if (boxes.size(0) == 0) return at::empty({0}, boxes.options().dtype(at::kLong));
  return std::get<0>(run_multi(boxes, scores, idxs.to(at::kLong).contiguous(), Tensor(), 1, iou_threshold, -1))
      .select(0, 0);
}

std::tuple<Tensor, Tensor> batched_nms_multi_cuda(const Tensor& boxes, const Tensor& scores, const Tensor& idxs,
                                                  const Tensor& image_ids, int64_t num_images,
                                                  double iou_threshold, int64_t max_per_image) {
  const char* op = "retina_fast::batched_nms_multi";
  check_multi_args(boxes, scores, idxs, image_ids, num_images, iou_threshold, op);
  check_device(boxes, at::kCUDA, op, "boxes");
  if (boxes.size(0) == 0) {
    const int64_t W = std::max<int64_t>(max_per_image, 0);
    return {at::full({num_images, W}, -1, boxes.options().dtype(at::kLong)),
            at::zeros({num_images}, boxes.options().dtype(at::kLong))};
  }
  return run_multi(boxes, scores, idxs.to(at::kLong).contiguous(), image_ids.to(at::kLong).contiguous(),
                   num_images, iou_threshold, max_per_image);
}

// ------------------------------------------------------------------------------ post-processing

// torch's CUDA sigmoid: one / (one + exp(-x)) in opmath, rounded to the dtype.
template <typename scalar_t>
__device__ __forceinline__ scalar_t torch_sigmoid(scalar_t x) {
  using opmath_t = at::opmath_type<scalar_t>;
  const opmath_t one(1);
  return static_cast<scalar_t>(one / (one + ::exp(-static_cast<opmath_t>(x))));
}

template <typename scalar_t>
__global__ void level_keys_kernel(const scalar_t* __restrict__ logits, int64_t B, int64_t row_stride,
                                  int64_t level_start, int64_t nl, scalar_t thresh,
                                  int64_t* __restrict__ keys) {
  const int64_t total = B * nl;
  for (int64_t e = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; e < total;
       e += int64_t(gridDim.x) * blockDim.x) {
    const int64_t b = e / nl, i = e - b * nl;
    const scalar_t s = torch_sigmoid(logits[b * row_stride + level_start + i]);
    int64_t key = 0;
    if (s > thresh) {
      // s > thresh implies s > 0 (thresh may be negative: s >= 0 anyway), so the float bits
      // order like the values; NaN never passes.
      const uint64_t hi = float_bits(static_cast<float>(s));
      key = static_cast<int64_t>((hi << 32) | (0xFFFFFFFFull - static_cast<uint64_t>(i)));
      if (key == 0) key = 1;  // s == +0 exactly cannot pass a thresh >= 0; for thresh < 0 keep it valid
    }
    keys[e] = key;
  }
}

template <typename scalar_t>
__global__ void candidates_kernel(const int64_t* __restrict__ topk_keys, int64_t B, int64_t k, int64_t C,
                                  int64_t cand_off, const scalar_t* __restrict__ logits,
                                  const scalar_t* __restrict__ reg, const scalar_t* __restrict__ anchors,
                                  bool shared_anchors, const int64_t* __restrict__ sizes, int64_t A,
                                  int64_t K, int64_t level_anchor_off, scalar_t clip,
                                  uint8_t* __restrict__ valid, int64_t* __restrict__ labels,
                                  scalar_t* __restrict__ scores, scalar_t* __restrict__ boxes) {
  const int64_t total = B * k;
  for (int64_t e = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; e < total;
       e += int64_t(gridDim.x) * blockDim.x) {
    const int64_t b = e / k, j = e - b * k;
    const int64_t q = b * C + cand_off + j;
    const uint64_t key = static_cast<uint64_t>(topk_keys[e]);
    if (key == 0) {
      valid[q] = 0;
      continue;
    }
    const int64_t idx = static_cast<int64_t>(0xFFFFFFFFull - (key & 0xFFFFFFFFull));
    const int64_t a = level_anchor_off + idx / K;
    valid[q] = 1;
    labels[q] = idx % K;
    scores[q] = torch_sigmoid(logits[(b * A + a) * K + idx % K]);
    const scalar_t one(1), zero(0);
    scalar_t o[4];
    decode_box<scalar_t>(reg + (b * A + a) * 4, anchors + (shared_anchors ? 0 : b * A * 4) + a * 4, one, one,
                         one, one, clip, o);
    const scalar_t H = static_cast<scalar_t>(sizes[2 * b]), W = static_cast<scalar_t>(sizes[2 * b + 1]);
    scalar_t* out = boxes + 4 * q;
    out[0] = clamp_like_torch(o[0], zero, W);
    out[1] = clamp_like_torch(o[1], zero, H);
    out[2] = clamp_like_torch(o[2], zero, W);
    out[3] = clamp_like_torch(o[3], zero, H);
  }
}

template <typename scalar_t, typename key_t>
__global__ void cand_score_keys_kernel(const scalar_t* __restrict__ scores, const uint8_t* __restrict__ valid,
                                       int64_t n, key_t* __restrict__ keys, int32_t* __restrict__ iota) {
  for (int64_t q = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; q < n;
       q += int64_t(gridDim.x) * blockDim.x) {
    if constexpr (sizeof(key_t) == 8) {
      keys[q] = valid[q] ? score_key_desc64(static_cast<double>(scores[q])) : ~0ull;
    } else {
      keys[q] = valid[q] ? score_key_desc(static_cast<float>(scores[q])) : ~0u;
    }
    iota[q] = static_cast<int32_t>(q);
  }
}

__global__ void label_keys_kernel(const int32_t* __restrict__ perm, const uint8_t* __restrict__ valid,
                                  const int64_t* __restrict__ labels, int64_t n, uint32_t* __restrict__ keys) {
  for (int64_t p = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; p < n;
       p += int64_t(gridDim.x) * blockDim.x) {
    const int32_t q = perm[p];
    keys[p] = valid[q] ? static_cast<uint32_t>(labels[q]) : 0xFFFFFFFFu;
  }
}

__global__ void kept_keys_kernel(const uint8_t* __restrict__ keep_sorted, const uint32_t* __restrict__ label_keys,
                                 const int32_t* __restrict__ nms_perm, int64_t n,
                                 uint8_t* __restrict__ keep_cand) {
  for (int64_t p = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; p < n;
       p += int64_t(gridDim.x) * blockDim.x) {
    keep_cand[nms_perm[p]] = keep_sorted[p] && label_keys[p] != 0xFFFFFFFFu;
  }
}

__global__ void rank_keys_kernel(const uint8_t* __restrict__ keep_cand, const int32_t* __restrict__ score_perm,
                                 int64_t n, uint32_t* __restrict__ keys) {
  for (int64_t q = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; q < n;
       q += int64_t(gridDim.x) * blockDim.x) {
    keys[q] = keep_cand[score_perm[q]] ? 0u : 1u;
  }
}

// One block per image: the first D kept candidates in score order, and their count.
template <typename scalar_t>
__global__ void write_dets_kernel(const uint32_t* __restrict__ rank_keys, const int32_t* __restrict__ order,
                                  int64_t C, int64_t D, const scalar_t* __restrict__ cboxes,
                                  const scalar_t* __restrict__ cscores, const int64_t* __restrict__ clabels,
                                  scalar_t* __restrict__ boxes, scalar_t* __restrict__ scores,
                                  int64_t* __restrict__ labels, int64_t* __restrict__ counts) {
  __shared__ int64_t shared[32];
  const int64_t b = blockIdx.x;
  int64_t cnt = 0;
  for (int64_t d = threadIdx.x; d < C; d += blockDim.x) {
    const int64_t q = b * C + d;
    if (rank_keys[q] != 0u) continue;
    ++cnt;
    if (d >= D) continue;
    const int32_t c = order[q];
    const int64_t r = b * D + d;
    for (int j = 0; j < 4; ++j) boxes[4 * r + j] = cboxes[4 * int64_t(c) + j];
    scores[r] = cscores[c];
    labels[r] = clabels[c];
  }
  cnt = cuda::block_reduce_sum<int64_t>(cnt, shared);
  if (threadIdx.x == 0) counts[b] = cnt < D ? cnt : D;
}

template <typename scalar_t>
std::tuple<Tensor, Tensor, Tensor, Tensor> postprocess_impl(
    const Tensor& logits, const Tensor& reg, const Tensor& anchors, const Tensor& sizes,
    at::IntArrayRef levels, double score_thresh, int64_t topk, double nms_thresh, int64_t D) {
  using F = typename IouType<scalar_t>::type;
  using key_t = typename std::conditional<std::is_same<scalar_t, double>::value, uint64_t, uint32_t>::type;
  cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  const int64_t B = logits.size(0), A = logits.size(1), K = logits.size(2);
  const auto lopt = logits.options().dtype(at::kLong);
  Tensor boxes_out = at::zeros({B, D, 4}, reg.options());
  Tensor scores_out = at::zeros({B, D}, logits.options());
  Tensor labels_out = at::full({B, D}, -1, lopt);
  Tensor counts = at::zeros({B}, lopt);
  std::vector<int64_t> ks, koff{0}, aoff{0};
  for (int64_t a : levels) {
    TORCH_CHECK(a * K < (int64_t(1) << 32), "retina_fast::postprocess_detections (CUDA): expected at most 2^32 "
                "logits per image and level, got ", a * K);
    ks.push_back(std::min(topk, a * K));
    koff.push_back(koff.back() + ks.back());
    aoff.push_back(aoff.back() + a);
  }
  const int64_t C = koff.back();
  if (B == 0 || C == 0 || D == 0) return {boxes_out, scores_out, labels_out, counts};
  TORCH_CHECK(K < 0xFFFFFFFFll, "retina_fast::postprocess_detections (CUDA): expected K < 2^32 - 1, got ", K);
  TORCH_CHECK(B * C < std::numeric_limits<int32_t>::max(), "retina_fast::postprocess_detections (CUDA): too many "
              "candidates, B * C = ", B * C);
  const scalar_t thresh = static_cast<scalar_t>(score_thresh);
  const scalar_t clip = static_cast<scalar_t>(std::log(1000.0 / 16.0));
  const int threads = cuda::kThreads;

  // 1. per level: keys, top-k (no host sync), candidates
  Tensor valid = at::empty({B * C}, byte_opts(logits));
  Tensor clabels = at::empty({B * C}, lopt);
  Tensor cscores = at::empty({B * C}, logits.options());
  Tensor cboxes = at::empty({B * C, 4}, reg.options());
  Tensor keys;
  for (size_t l = 0; l < levels.size(); ++l) {
    const int64_t nl = levels[l] * K;
    if (ks[l] == 0) continue;
    if (!keys.defined() || keys.numel() < B * nl) keys = at::empty({B * nl}, lopt);
    Tensor kl = keys.narrow(0, 0, B * nl).view({B, nl});
    level_keys_kernel<scalar_t><<<cuda::grid_for(B * nl), threads, 0, stream>>>(
        logits.const_data_ptr<scalar_t>(), B, A * K, aoff[l] * K, nl, thresh, kl.mutable_data_ptr<int64_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    Tensor top = std::get<0>(at::topk(kl, ks[l], 1, true, true)).contiguous();
    candidates_kernel<scalar_t><<<cuda::grid_for(B * ks[l]), threads, 0, stream>>>(
        top.const_data_ptr<int64_t>(), B, ks[l], C, koff[l], logits.const_data_ptr<scalar_t>(),
        reg.const_data_ptr<scalar_t>(), anchors.const_data_ptr<scalar_t>(), anchors.dim() == 2,
        sizes.const_data_ptr<int64_t>(), A, K, aoff[l], clip, valid.mutable_data_ptr<uint8_t>(),
        clabels.mutable_data_ptr<int64_t>(), cscores.mutable_data_ptr<scalar_t>(),
        cboxes.mutable_data_ptr<scalar_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  keys = Tensor();

  // 2. per image: score order (stable: ties keep candidate order), then by label (stable)
  const int64_t n = B * C;
  const int64_t grid = cuda::grid_for(n);
  Tensor sk = at::empty({n}, lopt.dtype(sizeof(key_t) == 8 ? at::kLong : at::kInt)), sks = at::empty_like(sk);
  Tensor iota = at::empty({n}, lopt.dtype(at::kInt)), score_perm = at::empty_like(iota), nms_perm = at::empty_like(iota);
  key_t* skp = reinterpret_cast<key_t*>(sk.data_ptr());
  key_t* sksp = reinterpret_cast<key_t*>(sks.data_ptr());
  cand_score_keys_kernel<scalar_t, key_t><<<grid, threads, 0, stream>>>(
      cscores.const_data_ptr<scalar_t>(), valid.const_data_ptr<uint8_t>(), n, skp, iota.mutable_data_ptr<int32_t>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  segmented_sort_pairs(skp, sksp, iota.const_data_ptr<int32_t>(), score_perm.mutable_data_ptr<int32_t>(), B, C,
                       stream, logits);
  Tensor lk = at::empty({n}, lopt.dtype(at::kInt)), lks = at::empty_like(lk);
  uint32_t* lkp = reinterpret_cast<uint32_t*>(lk.data_ptr());
  uint32_t* lksp = reinterpret_cast<uint32_t*>(lks.data_ptr());
  label_keys_kernel<<<grid, threads, 0, stream>>>(score_perm.const_data_ptr<int32_t>(), valid.const_data_ptr<uint8_t>(),
                                                  clabels.const_data_ptr<int64_t>(), n, lkp);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  segmented_sort_pairs(lkp, lksp, score_perm.const_data_ptr<int32_t>(), nms_perm.mutable_data_ptr<int32_t>(), B, C,
                       stream, logits);

  // 3. NMS, one chunk per image
  Tensor seg_end = at::empty({n}, lopt);
  segment_end_kernel<uint32_t><<<grid, threads, 0, stream>>>(nullptr, lksp, n, C, 0xFFFFFFFFu,
                                                             seg_end.mutable_data_ptr<int64_t>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  const auto fopt = logits.options().dtype(c10::CppTypeToScalarType<F>::value);
  Tensor sb = at::empty({n, 4}, fopt), sa = at::empty({n}, fopt);
  gather_boxes_kernel<scalar_t, F, int32_t><<<grid, threads, 0, stream>>>(
      cboxes.const_data_ptr<scalar_t>(), nms_perm.const_data_ptr<int32_t>(), n, sb.mutable_data_ptr<F>(),
      sa.mutable_data_ptr<F>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  Tensor keep = at::empty({n}, byte_opts(logits));
  mask_and_scan<F>(sb.const_data_ptr<F>(), sa.const_data_ptr<F>(), seg_end.const_data_ptr<int64_t>(), B, C,
                   nms_thresh, keep.mutable_data_ptr<uint8_t>(), logits, stream);

  // 4. kept candidates first, in score order; the first D
  Tensor keep_cand = at::empty({n}, byte_opts(logits));
  kept_keys_kernel<<<grid, threads, 0, stream>>>(keep.const_data_ptr<uint8_t>(), lksp,
                                                 nms_perm.const_data_ptr<int32_t>(), n,
                                                 keep_cand.mutable_data_ptr<uint8_t>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  uint32_t* rk = lkp;  // reuse
  rank_keys_kernel<<<grid, threads, 0, stream>>>(keep_cand.const_data_ptr<uint8_t>(),
                                                 score_perm.const_data_ptr<int32_t>(), n, rk);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  Tensor final_perm = iota;  // reuse
  segmented_sort_pairs(rk, lksp, score_perm.const_data_ptr<int32_t>(), final_perm.mutable_data_ptr<int32_t>(), B,
                       C, stream, logits, 1);
  write_dets_kernel<scalar_t><<<B, cuda::kThreads, 0, stream>>>(
      lksp, final_perm.const_data_ptr<int32_t>(), C, D, cboxes.const_data_ptr<scalar_t>(),
      cscores.const_data_ptr<scalar_t>(), clabels.const_data_ptr<int64_t>(), boxes_out.mutable_data_ptr<scalar_t>(),
      scores_out.mutable_data_ptr<scalar_t>(), labels_out.mutable_data_ptr<int64_t>(),
      counts.mutable_data_ptr<int64_t>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {boxes_out, scores_out, labels_out, counts};
}

std::tuple<Tensor, Tensor, Tensor, Tensor> postprocess_cuda(
    const Tensor& cls_logits, const Tensor& bbox_regression, const Tensor& anchors, const Tensor& image_sizes,
    at::IntArrayRef num_anchors_per_level, double score_thresh, int64_t topk_candidates, double nms_thresh,
    int64_t detections_per_img) {
  const char* op = "retina_fast::postprocess_detections";
  check_postprocess_args(cls_logits, bbox_regression, anchors, image_sizes, num_anchors_per_level, score_thresh,
                         topk_candidates, nms_thresh, detections_per_img, op);
  check_device(cls_logits, at::kCUDA, op, "cls_logits");
  const at::cuda::CUDAGuard guard(cls_logits.device());
  const Tensor x = cls_logits.contiguous(), r = bbox_regression.contiguous();
  const Tensor a = anchors.to(r.scalar_type()).contiguous();
  const Tensor s = image_sizes.to(at::kLong).contiguous();
  std::tuple<Tensor, Tensor, Tensor, Tensor> out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "postprocess_cuda", [&] {
    out = postprocess_impl<scalar_t>(x, r, a, s, num_anchors_per_level, score_thresh, topk_candidates, nms_thresh,
                                     detections_per_img);
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(retina_fast, CUDA, m) {
  m.impl("nms", &nms_cuda);
  m.impl("batched_nms", &batched_nms_cuda);
  m.impl("batched_nms_multi", &batched_nms_multi_cuda);
  m.impl("postprocess_detections", &postprocess_cuda);
}

}  // namespace nms
}  // namespace retina_fast
