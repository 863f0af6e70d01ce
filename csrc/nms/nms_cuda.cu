// CUDA kernels of nms, batched_nms, batched_nms_multi and the fused RetinaNet post-processing.
//
// NMS: boxes are put in processing order by stable radix sorts (score descending, then class,
// then image, each stable, so a segment = (image, class) is contiguous and score-ordered, ties
// by lower index as on the CPU). Each segment (a "group", see Groups) owns its own upper-
// triangular bitmask of 64x64 tiles, so the mask costs sum(segment size^2) / 128 words, never
// n^2, and different classes never cost an IoU. The greedy scan runs on the GPU: one warp per
// group of up to 2048 boxes (removed bits in registers), one block per larger group (removed
// bits in shared memory, or global scratch past 262,144 boxes). All grids are 1-D and grid-
// stride, so no count of images, segments or tiles meets a grid-dimension limit. Host syncs:
// with classes or images, one that sizes the mask (it also checks image ids, as the CPU does);
// one for the output size (nms, batched_nms, batched_nms_multi with max_per_image < 0).
//
// Post-processing: a radix select per (image, level) finds the top-k keys (score bits, index)
// computed on the fly from the logits, a few passes over them with a rising logit cut, so no
// memory is sized by the scores above score_thresh (see "1. per-(image, level) top-k select"
// below); the candidates are sorted per level, decoded and clipped into a padded [B, C] layout,
// and the NMS above runs with one group per image (its label segments cut the mask's columns),
// whose sizes the host knows. Outputs are padded [B, D]: no host sync at all.
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

// Stable sort within `segments` equal chunks of length L (descending: largest key first,
// still stable).
template <typename K, typename V>
void segmented_sort_pairs(const K* kin, K* kout, const V* vin, V* vout, int64_t segments,
                          int64_t L, cudaStream_t stream, const Tensor& like,
                          int end_bit = sizeof(K) * 8, bool descending = false) {
  if (segments * L == 0) return;
  TORCH_CHECK(segments * L < std::numeric_limits<int32_t>::max(),
              "retina_fast (CUDA): a segmented sort of more than 2^31 - 1 items: ", segments, " x ", L);
  Tensor offsets = at::arange(0, (segments + 1) * L, L, like.options().dtype(at::kInt));
  const int* off = offsets.const_data_ptr<int>();
  const int items = static_cast<int>(segments * L), segs = static_cast<int>(segments);
  auto run = [&](void* tmp, size_t& bytes) {
    if (descending) {
      C10_CUDA_CHECK(cub::DeviceSegmentedRadixSort::SortPairsDescending(
          tmp, bytes, kin, kout, vin, vout, items, segs, off, off + 1, 0, end_bit, stream));
    } else {
      C10_CUDA_CHECK(cub::DeviceSegmentedRadixSort::SortPairs(
          tmp, bytes, kin, kout, vin, vout, items, segs, off, off + 1, 0, end_bit, stream));
    }
  };
  size_t bytes = 0;
  run(nullptr, bytes);
  Tensor tmp = at::empty({static_cast<int64_t>(bytes)}, byte_opts(like));
  run(tmp.data_ptr(), bytes);
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

// ------------------------------------------------------------------------------ groups
// A group is a run of boxes in processing order that one greedy scan handles: one (image,
// class) segment in nms / batched_nms / batched_nms_multi, one image in the post-processing
// (whose label segments are then cut by seg_end). Each group of len >= 2 owns an upper-
// triangular bitmask of group_words(len) words: row block rb (64 rows, fewer in the last)
// holds nb - rb words per row. So the mask costs ~ sum(len^2) / 128 words over the groups, not
// n^2 / 128, and a group of one box costs nothing.

HOST_DEVICE_INLINE int64_t nblocks_of(int64_t len) { return div_up(len, kBlock); }

HOST_DEVICE_INLINE int64_t group_tiles(int64_t len) {
  const int64_t nb = nblocks_of(len);
  return len < 2 ? 0 : nb * (nb + 1) / 2;
}

HOST_DEVICE_INLINE int64_t group_words(int64_t len) {
  if (len < 2) return 0;
  const int64_t nb = nblocks_of(len);
  return tri_offset(nb - 1, nb) + (len - int64_t(kBlock) * (nb - 1));
}

// Tiles of a group before row block rb.
HOST_DEVICE_INLINE int64_t tiles_before(int64_t rb, int64_t nb) { return rb * nb - rb * (rb - 1) / 2; }

// Either G groups given by arrays (start, len, word and tile offsets), or G uniform groups of
// length L back to back (start = g L): then nothing about them needs the device.
struct Groups {
  const int64_t* start = nullptr;
  const int64_t* len = nullptr;
  const int64_t* word_off = nullptr;
  const int64_t* tile_off = nullptr;
  int64_t G = 0;
  int64_t L = 0;

  __device__ __forceinline__ int64_t start_of(int64_t g) const { return start ? start[g] : g * L; }
  __device__ __forceinline__ int64_t len_of(int64_t g) const { return len ? len[g] : L; }
  __device__ __forceinline__ int64_t words_at(int64_t g) const {
    return word_off ? word_off[g] : g * group_words(L);
  }
  // The group of global tile t and t's index inside it.
  __device__ __forceinline__ int64_t group_of_tile(int64_t t, int64_t& local) const {
    if (!tile_off) {
      const int64_t per = group_tiles(L);
      const int64_t g = t / per;
      local = t - g * per;
      return g;
    }
    int64_t lo = 0, hi = G - 1;  // last g with tile_off[g] <= t
    while (lo < hi) {
      const int64_t mid = lo + (hi - lo + 1) / 2;
      if (tile_off[mid] <= t) lo = mid;
      else hi = mid - 1;
    }
    local = t - tile_off[lo];
    return lo;
  }
};

// seg_end[p]: group-local end of p's label segment, for uniform groups of length L whose
// label keys are sorted within the group. A key equal to `invalid` (an empty candidate slot)
// is a segment of its own.
__global__ void segment_end_kernel(const uint32_t* __restrict__ keys, int64_t total, int64_t L,
                                   uint32_t invalid, int64_t* __restrict__ seg_end) {
  for (int64_t p = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; p < total;
       p += int64_t(gridDim.x) * blockDim.x) {
    const int64_t base = (p / L) * L;
    const uint32_t k = keys[p];
    if (k == invalid) {
      seg_end[p] = p - base + 1;
      continue;
    }
    int64_t lo = p + 1, hi = base + L;  // first position past the segment, in [lo, hi]
    while (lo < hi) {
      const int64_t mid = lo + (hi - lo) / 2;
      if (keys[mid] == k) lo = mid + 1;
      else hi = mid;
    }
    seg_end[p] = lo - base;
  }
}

// One 64x64 tile (row block rb, column block cb >= rb of one group) per block iteration.
// seg_end (group-local, may be null: the group's end) limits the columns a row can suppress.
template <typename F>
__global__ void __launch_bounds__(kBlock) mask_kernel(const F* __restrict__ boxes,
                                                      const F* __restrict__ areas,
                                                      const int64_t* __restrict__ seg_end,
                                                      Groups grp, int64_t total_tiles, F thr,
                                                      uint64_t* __restrict__ mask) {
  RF_SHARED(F, sb, [kBlock * 4]);
  RF_SHARED(F, sa, [kBlock]);
  const int t = threadIdx.x;
  for (int64_t tile = blockIdx.x; tile < total_tiles; tile += gridDim.x) {
    int64_t lt;
    const int64_t g = grp.group_of_tile(tile, lt);
    const int64_t base = grp.start_of(g), len = grp.len_of(g), nb = nblocks_of(len);
    int64_t lo = 0, hi = nb - 1;  // row block: last rb with tiles_before(rb) <= lt
    while (lo < hi) {
      const int64_t mid = lo + (hi - lo + 1) / 2;
      if (tiles_before(mid, nb) <= lt) lo = mid;
      else hi = mid - 1;
    }
    const int64_t rb = lo, cb = rb + (lt - tiles_before(rb, nb));
    const int64_t last_row = min(rb * kBlock + kBlock - 1, len - 1);
    // Block-uniform: no row of the block reaches this column block (another label).
    if (seg_end && cb * kBlock >= seg_end[base + last_row]) continue;
    __syncthreads();  // the previous tile's readers are done with sb / sa
    const int64_t col = cb * kBlock + t;
    if (col < len) {
      const F* b = boxes + 4 * (base + col);
      sb[4 * t] = b[0], sb[4 * t + 1] = b[1], sb[4 * t + 2] = b[2], sb[4 * t + 3] = b[3];
      sa[t] = areas[base + col];
    }
    __syncthreads();
    const int64_t row = rb * kBlock + t;
    if (row >= len) continue;
    const F* rbx = boxes + 4 * (base + row);
    const F r[4] = {rbx[0], rbx[1], rbx[2], rbx[3]};
    const F ra = areas[base + row];
    const int64_t se = seg_end ? seg_end[base + row] : len;
    uint64_t bits = 0;
    for (int j = (cb == rb ? t + 1 : 0); j < kBlock; ++j) {
      if (cb * kBlock + j >= se) break;
      // a = the higher-scored box, as on the CPU (kept box first).
      if (box_iou_pair(r, ra, sb + 4 * j, sa[j]) > thr) bits |= 1ull << j;
    }
    mask[grp.words_at(g) + tri_offset(rb, nb) + int64_t(t) * (nb - rb) + (cb - rb)] = bits;
  }
}

// Greedy scan (torchvision's gather_keep_from_mask, on the triangle and limited to each row's
// segment), one warp per group of at most 32 row blocks (2048 boxes): the removed bits live in
// registers, word j in lane j. Bit `in` of a row block's removed word is final once rows
// before `in` are done (a row only marks later rows), so the kept flags are written after
// the block, by all lanes.
__global__ void scan_warp_kernel(const uint64_t* __restrict__ mask, const int64_t* __restrict__ seg_end,
                                 Groups grp, uint8_t* __restrict__ keep) {
  const int lane = threadIdx.x & 31;
  const int64_t warp = (int64_t(blockIdx.x) * blockDim.x + threadIdx.x) >> 5;
  const int64_t nwarps = (int64_t(gridDim.x) * blockDim.x) >> 5;
  for (int64_t g = warp; g < grp.G; g += nwarps) {
    const int64_t len = grp.len_of(g), base = grp.start_of(g), nb = nblocks_of(len);
    if (len == 0 || nb > 32) continue;  // warp-uniform; larger groups: scan_block_kernel
    if (len == 1) {
      if (lane == 0) keep[base] = 1;
      continue;
    }
    const uint64_t* m = mask + grp.words_at(g);
    uint64_t removed = 0;  // word `lane` of the group's removed bits
    for (int64_t rb = 0; rb < nb; ++rb) {
      uint64_t rv = __shfl_sync(0xffffffffu, removed, int(rb));
      const uint64_t* blk = m + tri_offset(rb, nb);
      const int64_t stride = nb - rb;
      const int rows = int(min(int64_t(kBlock), len - rb * kBlock));
      for (int in = 0; in < rows; ++in) {
        if ((rv >> in) & 1ull) continue;
        const uint64_t* p = blk + int64_t(in) * stride;
        const int64_t ce = seg_end ? div_up(seg_end[base + rb * kBlock + in], kBlock) : nb;
        if (lane > rb && lane < ce) removed |= p[lane - rb];
        rv |= p[0];
      }
      for (int in = lane; in < rows; in += 32) keep[base + rb * kBlock + in] = !((rv >> in) & 1ull);
    }
  }
}

// The same scan with one block per group larger than 2048 boxes. `removed` (nb words) is in
// shared memory when the largest group's words fit the limit, else in global scratch
// (max_nb words per block).
__global__ void scan_block_kernel(const uint64_t* __restrict__ mask, const int64_t* __restrict__ seg_end,
                                  Groups grp, int64_t max_nb, uint64_t* __restrict__ scratch,
                                  uint8_t* __restrict__ keep) {
  RF_EXTERN_SHARED(uint64_t, removed_shared);
  uint64_t* removed = scratch ? scratch + int64_t(blockIdx.x) * max_nb : removed_shared;
  const int tid = threadIdx.x;
  for (int64_t g = blockIdx.x; g < grp.G; g += gridDim.x) {
    const int64_t len = grp.len_of(g), base = grp.start_of(g), nb = nblocks_of(len);
    if (nb <= 32) continue;  // block-uniform
    const uint64_t* m = mask + grp.words_at(g);
    __syncthreads();  // the previous group's readers are done with `removed`
    for (int64_t i = tid; i < nb; i += blockDim.x) removed[i] = 0;
    __syncthreads();
    for (int64_t rb = 0; rb < nb; ++rb) {
      uint64_t rv = removed[rb];  // nobody writes word rb during this row block
      const uint64_t* blk = m + tri_offset(rb, nb);
      const int64_t stride = nb - rb;
      const int rows = int(min(int64_t(kBlock), len - rb * kBlock));
      for (int in = 0; in < rows; ++in) {
        if ((rv >> in) & 1ull) continue;
        const uint64_t* p = blk + int64_t(in) * stride;
        const int64_t ce = seg_end ? div_up(seg_end[base + rb * kBlock + in], kBlock) : nb;
        for (int64_t j = rb + 1 + tid; j < ce; j += blockDim.x) removed[j] |= p[j - rb];
        rv |= p[0];
      }
      for (int in = tid; in < rows; in += blockDim.x) keep[base + rb * kBlock + in] = !((rv >> in) & 1ull);
      __syncthreads();
    }
  }
}

// Mask + scan over the groups. total_words / total_tiles / max_len: of these groups (the
// callers know them: from the host for uniform groups, from the one sync otherwise).
template <typename F>
void mask_and_scan(const F* boxes, const F* areas, const int64_t* seg_end, const Groups& grp,
                   int64_t total_words, int64_t total_tiles, int64_t max_len, double thr_d,
                   uint8_t* keep, const Tensor& like, cudaStream_t stream) {
  if (grp.G == 0) return;
  Tensor mask = at::empty({std::max<int64_t>(total_words, 1)}, like.options().dtype(at::kLong));
  uint64_t* mp = reinterpret_cast<uint64_t*>(mask.mutable_data_ptr<int64_t>());
  if (total_tiles > 0) {
    const F thr = iou_threshold_as<F>(thr_d);
    const int64_t blocks = std::min<int64_t>(total_tiles, int64_t(1) << 20);
    cuda::launch(mask_kernel<F>, blocks, kBlock, 0, stream, boxes, areas, seg_end, grp, total_tiles, thr, mp);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  const int threads = cuda::kThreads;
  const int64_t warp_blocks = std::min<int64_t>(div_up(grp.G, threads / 32), 8192);
  cuda::launch(scan_warp_kernel, warp_blocks, threads, 0, stream, mp, seg_end, grp, keep);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  const int64_t max_nb = nblocks_of(max_len);
  if (max_nb > 32) {
    const int64_t blocks = std::min<int64_t>(grp.G, 1024);
    const int64_t shared = max_nb * int64_t(sizeof(uint64_t));
    Tensor scratch;
    uint64_t* sp = nullptr;
    if (shared > scan_shared_limit()) {
      scratch = at::empty({blocks * max_nb}, like.options().dtype(at::kLong));
      sp = reinterpret_cast<uint64_t*>(scratch.mutable_data_ptr<int64_t>());
    }
    cuda::launch(scan_block_kernel, blocks, threads, sp ? 0 : size_t(shared), stream, mp, seg_end, grp, max_nb, sp, keep);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
}

// ------------------------------------------------------------------------------ segments of nms

// Sorted (image, class) keys: head[p] = 1 where a segment starts. Also the first image id out
// of [0, B) in input order (stats[kFirstBad], atomicMin), which the host check reports.
__global__ void heads_kernel(const int64_t* __restrict__ cls_s, const int64_t* __restrict__ img_s,
                             const int64_t* __restrict__ img, int64_t n, int64_t B,
                             int64_t* __restrict__ head, int64_t* __restrict__ stats) {
  for (int64_t p = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; p < n;
       p += int64_t(gridDim.x) * blockDim.x) {
    head[p] = p == 0 || cls_s[p] != cls_s[p - 1] || (img_s && img_s[p] != img_s[p - 1]);
    if (img && (img[p] < 0 || img[p] >= B))
      atomicMin(reinterpret_cast<unsigned long long*>(stats + 2), static_cast<unsigned long long>(p));
  }
}

// seg[p] = inclusive count of heads (1-based segment id). Writes group starts, and G = seg[n-1].
__global__ void starts_kernel(const int64_t* __restrict__ head, const int64_t* __restrict__ seg, int64_t n,
                              int64_t* __restrict__ start, int64_t* __restrict__ stats) {
  for (int64_t p = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; p < n;
       p += int64_t(gridDim.x) * blockDim.x) {
    if (head[p]) start[seg[p] - 1] = p;
    if (p == n - 1) {
      start[seg[p]] = n;
      stats[0] = seg[p];
    }
  }
}

// Per group (entries g >= G are zero): length, mask words, tiles; the largest length.
__global__ void group_sizes_kernel(const int64_t* __restrict__ start, int64_t n, int64_t* __restrict__ len,
                                   int64_t* __restrict__ words, int64_t* __restrict__ tiles,
                                   int64_t* __restrict__ stats) {
  const int64_t G = stats[0];
  for (int64_t g = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; g < n;
       g += int64_t(gridDim.x) * blockDim.x) {
    const int64_t l = g < G ? start[g + 1] - start[g] : 0;
    len[g] = l;
    words[g] = group_words(l);
    tiles[g] = group_tiles(l);
    if (l > 0) atomicMax(reinterpret_cast<unsigned long long*>(stats + 1), static_cast<unsigned long long>(l));
  }
}

// Totals after the exclusive scans: stats[3] words, stats[4] tiles.
__global__ void totals_kernel(const int64_t* __restrict__ words, const int64_t* __restrict__ word_off,
                              const int64_t* __restrict__ tiles, const int64_t* __restrict__ tile_off,
                              int64_t n, int64_t* __restrict__ stats) {
  stats[3] = word_off[n - 1] + words[n - 1];
  stats[4] = tile_off[n - 1] + tiles[n - 1];
}

void exclusive_sum(const int64_t* in, int64_t* out, int64_t n, cudaStream_t stream, const Tensor& like) {
  size_t bytes = 0;
  C10_CUDA_CHECK(cub::DeviceScan::ExclusiveSum(nullptr, bytes, in, out, static_cast<int>(n), stream));
  Tensor tmp = at::empty({static_cast<int64_t>(bytes)}, byte_opts(like));
  C10_CUDA_CHECK(cub::DeviceScan::ExclusiveSum(tmp.data_ptr(), bytes, in, out, static_cast<int>(n), stream));
}

void inclusive_sum(const int64_t* in, int64_t* out, int64_t n, cudaStream_t stream, const Tensor& like) {
  size_t bytes = 0;
  C10_CUDA_CHECK(cub::DeviceScan::InclusiveSum(nullptr, bytes, in, out, static_cast<int>(n), stream));
  Tensor tmp = at::empty({static_cast<int64_t>(bytes)}, byte_opts(like));
  C10_CUDA_CHECK(cub::DeviceScan::InclusiveSum(tmp.data_ptr(), bytes, in, out, static_cast<int>(n), stream));
}

__global__ void scatter_keep_kernel(const uint8_t* __restrict__ keep_sorted, const int32_t* __restrict__ perm,
                                    int64_t n, uint8_t* __restrict__ keep_orig) {
  for (int64_t p = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; p < n;
       p += int64_t(gridDim.x) * blockDim.x) {
    keep_orig[perm[p]] = keep_sorted[p];
  }
}

// key[q] = image of the q-th box in score order if kept, else B.
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

// Host syncs: with classes or images, one to size the mask from the segments (and to check the
// image ids); then, when max_per_image < 0, one for the output width. nms (one segment) needs
// only the second.
template <typename scalar_t, typename score_t>
std::tuple<Tensor, Tensor> multi_impl(const Tensor& boxes, const Tensor& scores, const Tensor& cls,
                                      const Tensor& img, int64_t B, double thr, int64_t max_per_image,
                                      const char* op) {
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
  cuda::launch(score_keys_kernel<score_t, key_t>, grid, threads, 0, stream,
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

  // 2. groups = (image, class) segments of the sorted order
  Groups grp;
  int64_t total_words, total_tiles, max_len;
  Tensor gbuf;  // start [n + 1], len, word_off, tile_off, words, tiles [n] each
  if (!cls.defined() && !img.defined()) {
    grp.G = 1;
    grp.L = n;
    total_words = group_words(n);
    total_tiles = group_tiles(n);
    max_len = n;
  } else {
    Tensor cls_s = cls.defined() ? cls.index_select(0, perm) : at::zeros({n}, lopt);
    Tensor img_s = img.defined() ? img.index_select(0, perm) : Tensor();
    // stats: G, max len, first bad image id position, total words, total tiles
    Tensor stats = at::zeros({5}, lopt);
    stats.narrow(0, 2, 1).fill_(std::numeric_limits<int64_t>::max());
    Tensor head = at::empty({n}, lopt), seg = at::empty({n}, lopt);
    gbuf = at::empty({6 * n + 1}, lopt);
    int64_t* start = gbuf.mutable_data_ptr<int64_t>();
    int64_t *len = start + n + 1, *word_off = len + n, *tile_off = word_off + n, *words = tile_off + n,
            *tiles = words + n;
    int64_t* st = stats.mutable_data_ptr<int64_t>();
    cuda::launch(heads_kernel, grid, threads, 0, stream, cls_s.const_data_ptr<int64_t>(),
                                              img_s.defined() ? img_s.const_data_ptr<int64_t>() : nullptr,
                                              img.defined() ? img.const_data_ptr<int64_t>() : nullptr, n, B,
                                              head.mutable_data_ptr<int64_t>(), st);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    inclusive_sum(head.const_data_ptr<int64_t>(), seg.mutable_data_ptr<int64_t>(), n, stream, boxes);
    cuda::launch(starts_kernel, grid, threads, 0, stream, head.const_data_ptr<int64_t>(), seg.const_data_ptr<int64_t>(), n,
                                               start, st);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    cuda::launch(group_sizes_kernel, grid, threads, 0, stream, start, n, len, words, tiles, st);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    exclusive_sum(words, word_off, n, stream, boxes);
    exclusive_sum(tiles, tile_off, n, stream, boxes);
    cuda::launch(totals_kernel, 1, 1, 0, stream, words, word_off, tiles, tile_off, n, st);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    const Tensor h = stats.cpu();  // the sync that sizes the mask
    const int64_t* hs = h.const_data_ptr<int64_t>();
    if (hs[2] != std::numeric_limits<int64_t>::max()) {
      TORCH_CHECK(false, op, ": expected every image id in [0, ", B, "), got image_ids[", hs[2], "] = ",
                  img.select(0, hs[2]).item<int64_t>());
    }
    grp.start = start;
    grp.len = len;
    grp.word_off = word_off;
    grp.tile_off = tile_off;
    grp.G = hs[0];
    max_len = hs[1];
    total_words = hs[3];
    total_tiles = hs[4];
  }

  // 3. boxes in processing order, mask, scan
  const auto fopt = boxes.options().dtype(c10::CppTypeToScalarType<F>::value);
  Tensor sb = at::empty({n, 4}, fopt), sa = at::empty({n}, fopt);
  cuda::launch(gather_boxes_kernel<scalar_t, F, int32_t>, grid, threads, 0, stream,
      boxes.const_data_ptr<scalar_t>(), perm.const_data_ptr<int32_t>(), n, sb.mutable_data_ptr<F>(),
      sa.mutable_data_ptr<F>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  Tensor keep = at::empty({n}, byte_opts(boxes));
  mask_and_scan<F>(sb.const_data_ptr<F>(), sa.const_data_ptr<F>(), nullptr, grp, total_words, total_tiles,
                   max_len, thr, keep.mutable_data_ptr<uint8_t>(), boxes, stream);

  // 4. kept boxes per image in score order
  Tensor keep_orig = at::empty({n}, byte_opts(boxes));
  cuda::launch(scatter_keep_kernel, grid, threads, 0, stream, keep.const_data_ptr<uint8_t>(), perm.const_data_ptr<int32_t>(),
                                                    n, keep_orig.mutable_data_ptr<uint8_t>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  Tensor counts = at::zeros({B}, lopt);
  Tensor ikey = at::empty({n}, lopt), ikey_s = at::empty({n}, lopt), final_idx = at::empty({n}, iopt);
  cuda::launch(image_key_kernel, grid, threads, 0, stream,
      keep_orig.const_data_ptr<uint8_t>(), score_perm.const_data_ptr<int32_t>(),
      img.defined() ? img.const_data_ptr<int64_t>() : nullptr, n, B, ikey.mutable_data_ptr<int64_t>(),
      counts.mutable_data_ptr<int64_t>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  sort_pairs(ikey.const_data_ptr<int64_t>(), ikey_s.mutable_data_ptr<int64_t>(), score_perm.const_data_ptr<int32_t>(),
             final_idx.mutable_data_ptr<int32_t>(), n, stream, boxes);
  Tensor offsets = at::cumsum(counts, 0) - counts;
  // The width of a data-dependent output: a host sync.
  const int64_t W = max_per_image >= 0 ? max_per_image : (B > 0 ? counts.max().item<int64_t>() : 0);
  Tensor out = at::full({B, W}, -1, lopt);
  if (n > 0 && B > 0 && W > 0) {
    cuda::launch(write_keep_kernel, grid, threads, 0, stream, ikey_s.const_data_ptr<int64_t>(), final_idx.const_data_ptr<int32_t>(),
                                                    offsets.const_data_ptr<int64_t>(), n, B, W,
                                                    out.mutable_data_ptr<int64_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  return {out, counts.clamp_max(W)};
}

std::tuple<Tensor, Tensor> run_multi(const Tensor& boxes, const Tensor& scores, const Tensor& cls,
                                     const Tensor& img, int64_t B, double thr, int64_t max_per_image,
                                     const char* op) {
  const at::cuda::CUDAGuard guard(boxes.device());
  const Tensor b = boxes.contiguous(), s = scores.contiguous();
  std::tuple<Tensor, Tensor> out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, b.scalar_type(), "nms_cuda", [&] {
    using box_t = scalar_t;
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, s.scalar_type(), "nms_cuda_scores", [&] {
      out = multi_impl<box_t, scalar_t>(b, s, cls, img, B, thr, max_per_image, op);
    });
  });
  return out;
}

Tensor nms_cuda(const Tensor& boxes, const Tensor& scores, double iou_threshold) {
  const char* op = "retina_fast::nms";
  check_nms_args(boxes, scores, iou_threshold, op);
  check_device(boxes, at::kCUDA, op, "boxes");
  if (boxes.size(0) == 0) return at::empty({0}, boxes.options().dtype(at::kLong));
  return std::get<0>(run_multi(boxes, scores, Tensor(), Tensor(), 1, iou_threshold, -1, op)).select(0, 0);
}

Tensor batched_nms_cuda(const Tensor& boxes, const Tensor& scores, const Tensor& idxs, double iou_threshold) {
  const char* op = "retina_fast::batched_nms";
  check_nms_args(boxes, scores, iou_threshold, op);
  check_index_arg(idxs, boxes, op, "idxs");
  check_device(boxes, at::kCUDA, op, "boxes");
  if (boxes.size(0) == 0) return at::empty({0}, boxes.options().dtype(at::kLong));
  return std::get<0>(run_multi(boxes, scores, idxs.to(at::kLong).contiguous(), Tensor(), 1, iou_threshold, -1, op))
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
                   num_images, iou_threshold, max_per_image, op);
}

// ------------------------------------------------------------------------------ post-processing

// torch's CUDA sigmoid: one / (one + exp(-x)) in opmath, rounded to the dtype.
template <typename scalar_t>
__device__ __forceinline__ scalar_t torch_sigmoid(scalar_t x) {
  using opmath_t = at::opmath_type<scalar_t>;
  const opmath_t one(1);
  return static_cast<scalar_t>(one / (one + ::exp(-static_cast<opmath_t>(x))));
}

// ---- 1. per-(image, level) top-k select with a cut, never sized by the survivors
//
// Every logit of a level gets a key, computed on the fly and never stored: (hi, lo) with
// hi = bits(score) + 1 (score = torch's sigmoid in the dtype, widened to float, or double's own
// bits for float64) when score > score_thresh, else 0 (invalid), and lo = 2^32 - 1 - index.
// Scores are >= +0, so the bits order like the values; valid keys are unique and order as
// (score descending, lower index first). The top-k of a level are the k largest valid keys:
// a radix select finds the k-th largest, T, one digit (11 bits) per pass, and then every valid
// key >= T is a candidate (exactly min(k, valid) of them). Each pass is a histogram kernel
// (a block per chunk of a level, a shared histogram of the keys that match the digits found so
// far) and a resolve kernel (a block per (image, level): the digit holding the k-th key).
// A segment is done as soon as the digit's bin holds exactly the keys still needed (at a low
// score density right after the first pass: everything valid), and later passes skip it.
// A logit cut (sigmoid_score_cut, nms_common.h) that rises with the digits found lets every
// pass skip the sigmoid of logits that cannot match. Memory: the keys of the candidates,
// 2048 counters per (image, level) searched and a small state per (image, level); the host
// knows every size, so there is no host sync. The candidates are then sorted per level by key
// (cub segmented radix sort): the same order as before, (score desc, index asc).

constexpr int kSelThreads = 256;
constexpr int kSelDigitBits = 11;
constexpr int kSelBins = 1 << kSelDigitBits;
constexpr int64_t kSelChunk = 32768;  // logits per block task
constexpr int kSelMaxLevels = 32;     // levels per launch (more: several groups)
// Histogram counters allocated at most (images are processed in batches beyond it): 64 MB.
constexpr int64_t kSelHistBudget = int64_t(1) << 24;

// Levels [l0, l0 + n) of every image, by value in each launch.
struct SelGroup {
  int n = 0;
  int l0 = 0;
  int64_t L = 0;                     // levels in all (the state is [B, L])
  int64_t nsearch = 0;               // levels of the group with a histogram (nl > k > 0)
  int64_t nl[kSelMaxLevels];         // logits per image in the level
  int64_t aoff[kSelMaxLevels];       // first anchor of the level
  int64_t xoff[kSelMaxLevels];       // its first logit in an image row: aoff * K
  int64_t k[kSelMaxLevels];          // min(topk, nl)
  int64_t srank[kSelMaxLevels];      // histogram slot of the level, -1 if none
  int64_t koff[kSelMaxLevels + 1];   // candidate slots of the level in an image: [koff, koff + k)
  int64_t blk[kSelMaxLevels + 1];    // cumulative block tasks per image (chunks of kSelChunk)
};

struct SelState {
  uint64_t hi;   // the digits found so far (undetermined bits 0); once done, the threshold T
  uint32_t lo;
  int32_t mode;  // 0: searching, 1: done, candidates = valid keys >= (hi, lo), 2: no candidate
  int64_t need;  // keys still to take among those matching the digits found
  double xcut;   // no logit below it has a key matching the digits (or a valid key)
};

// Per dtype: the relative spacing of the dtype's values (2^-mantissa bits) and, for float16,
// its subnormal step: the largest dtype value below s is >= s * (1 - rel) - abs.
template <typename scalar_t> struct DtypeSpacing { static constexpr double rel = 0x1p-23, abs = 0.0; };
template <> struct DtypeSpacing<double> { static constexpr double rel = 0x1p-52, abs = 0.0; };
template <> struct DtypeSpacing<at::Half> { static constexpr double rel = 0x1p-10, abs = 0x1p-24; };
template <> struct DtypeSpacing<at::BFloat16> { static constexpr double rel = 0x1p-7, abs = 0.0; };

template <typename scalar_t>
__device__ __forceinline__ bool sel_key(scalar_t x, scalar_t thresh, int64_t i, uint64_t& hi, uint32_t& lo) {
  const scalar_t s = torch_sigmoid(x);
  if (!(s > thresh)) return false;  // NaN too
  if constexpr (std::is_same<scalar_t, double>::value) {
    hi = double_bits(s) + 1ull;  // s in [+0, 1]: < 2^62
  } else {
    hi = static_cast<uint64_t>(float_bits(static_cast<float>(s))) + 1ull;  // < 2^30
  }
  lo = 0xFFFFFFFFu - static_cast<uint32_t>(i);
  return true;
}

// The logit cut in the type logits are compared in: float for the float types (float_at_most
// keeps it conservative), double for float64.
template <typename scalar_t>
using cut_t = typename std::conditional<std::is_same<scalar_t, double>::value, double, float>::type;

template <typename scalar_t>
__device__ __forceinline__ cut_t<scalar_t> make_cut(double c) {
  if constexpr (std::is_same<scalar_t, double>::value) {
    return c;
  } else {
    return float_at_most(c);
  }
}

// A cut below which no logit has a key with high word >= hi: its score would be below
// s_lo = the score of hi - 1, so at most the largest dtype value below s_lo.
template <typename scalar_t>
__device__ double prefix_cut(uint64_t hi) {
  if (hi <= 1) return -std::numeric_limits<double>::infinity();
  double s_lo;
  if constexpr (std::is_same<scalar_t, double>::value) {
    s_lo = __longlong_as_double(static_cast<long long>(hi - 1));
  } else {
    s_lo = static_cast<double>(__uint_as_float(static_cast<uint32_t>(hi - 1)));
  }
  const double v = s_lo * (1.0 - DtypeSpacing<scalar_t>::rel) - DtypeSpacing<scalar_t>::abs;
  return sigmoid_score_cut(v, SigmoidBound<scalar_t>::rel, SigmoidBound<scalar_t>::tiny);
}

// Block task v of images [b0, b0 + nb): image b, level lg of the group, chunk [begin, end).
__device__ __forceinline__ void sel_task(const SelGroup& g, int64_t b0, int64_t v, int64_t& b, int& lg,
                                         int64_t& begin, int64_t& end) {
  const int64_t per = g.blk[g.n];
  const int64_t bl = v / per, r = v - bl * per;
  int l = 0;
  while (r >= g.blk[l + 1]) ++l;  // r < blk[n]; levels without tasks are passed over
  b = b0 + bl;
  lg = l;
  begin = (r - g.blk[l]) * kSelChunk;
  end = min(g.nl[l], begin + kSelChunk);
}

__global__ void sel_init_kernel(SelGroup g, int64_t B, bool none, SelState* __restrict__ st, double thresh_cut) {
  const int64_t total = B * g.n;
  for (int64_t e = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; e < total;
       e += int64_t(gridDim.x) * blockDim.x) {
    const int64_t b = e / g.n;
    const int lg = static_cast<int>(e - b * g.n);
    SelState s;
    s.hi = 0;
    s.lo = 0;
    s.need = g.k[lg];
    // k == nl: every valid logit is a candidate, no search.
    s.mode = (none || g.k[lg] == 0) ? 2 : (g.srank[lg] < 0 ? 1 : 0);
    s.xcut = thresh_cut;
    st[b * g.L + g.l0 + lg] = s;
  }
}

// hist: [nb, g.nsearch, kSelBins]. word 0: the digit is hi's bits [shift, shift + width), else
// lo's; (mhi, mlo): the bits found in earlier passes, which a key must match.
// in_t: the logits' storage, read as scalar_t (float16/bfloat16 under upcast; else scalar_t).
template <typename scalar_t, typename in_t = scalar_t>
__global__ void __launch_bounds__(kSelThreads) sel_hist_kernel(
    const in_t* __restrict__ logits, int64_t row, SelGroup g, int64_t b0, int64_t nb, scalar_t thresh,
    const SelState* __restrict__ st, uint32_t* __restrict__ hist, int word, int shift, int width,
    uint64_t mhi, uint32_t mlo) {
  RF_SHARED(uint32_t, h, [kSelBins]);
  const uint32_t dmask = (1u << width) - 1u;
  const int64_t total = nb * g.blk[g.n];
  for (int64_t v = blockIdx.x; v < total; v += gridDim.x) {
    int64_t b, begin, end;
    int lg;
    sel_task(g, b0, v, b, lg, begin, end);
    const SelState s = st[b * g.L + g.l0 + lg];
    if (s.mode != 0) continue;  // the same for the whole block
    for (int i = threadIdx.x; i < kSelBins; i += blockDim.x) h[i] = 0;
    __syncthreads();
    const in_t* x = logits + b * row + g.xoff[lg];
    const cut_t<scalar_t> cut = make_cut<scalar_t>(s.xcut);
    for (int64_t i = begin + threadIdx.x; i < end; i += blockDim.x) {
      const scalar_t xi = static_cast<scalar_t>(x[i]);
      if (!(static_cast<cut_t<scalar_t>>(xi) >= cut)) continue;  // NaN too
      uint64_t hi;
      uint32_t lo;
      if (!sel_key(xi, thresh, i, hi, lo)) continue;
      if (((hi ^ s.hi) & mhi) != 0 || ((lo ^ s.lo) & mlo) != 0) continue;
      const uint32_t d = (word == 0 ? static_cast<uint32_t>(hi >> shift) : (lo >> shift)) & dmask;
      atomicAdd(&h[d], 1u);
    }
    __syncthreads();
    uint32_t* gh = hist + ((b - b0) * g.nsearch + g.srank[lg]) * kSelBins;
    for (int i = threadIdx.x; i < kSelBins; i += blockDim.x) {
      if (h[i] != 0) atomicAdd(&gh[i], h[i]);
    }
    __syncthreads();  // h is cleared for the next task
  }
}

// One block per (image, level) still searching: the digit of the k-th largest key among those
// matching the digits found, from the histogram (which it clears for the next pass).
template <typename scalar_t>
__global__ void __launch_bounds__(kSelThreads) sel_resolve_kernel(
    SelGroup g, int64_t b0, int64_t nb, SelState* __restrict__ st, uint32_t* __restrict__ hist, bool first,
    int word, int shift) {
  using BlockScan = cub::BlockScan<int64_t, kSelThreads>;
  RF_SHARED(typename BlockScan::TempStorage, tmp, );
  constexpr int kPer = kSelBins / kSelThreads;
  static_assert(kPer * kSelThreads == kSelBins, "bins per thread");
  const int64_t total = nb * g.n;
  for (int64_t v = blockIdx.x; v < total; v += gridDim.x) {
    const int64_t bl = v / g.n;
    const int lg = static_cast<int>(v - bl * g.n);
    const int64_t q = (b0 + bl) * g.L + g.l0 + lg;
    const SelState s = st[q];
    if (s.mode != 0) continue;  // the same for the whole block
    uint32_t* h = hist + (bl * g.nsearch + g.srank[lg]) * kSelBins;
    // Thread t holds bins kSelBins - 1 - (kPer t + j), j < kPer: digits in descending order.
    uint32_t c[kPer];
    int64_t local = 0;
#pragma unroll
    for (int j = 0; j < kPer; ++j) {
      const int bin = kSelBins - 1 - (kPer * static_cast<int>(threadIdx.x) + j);
      c[j] = h[bin];
      h[bin] = 0;
      local += c[j];
    }
    int64_t above = 0, sum = 0;
    BlockScan(tmp).ExclusiveSum(local, above, sum);
    if (first && sum <= s.need) {
      // At most k valid logits: all of them (hi = lo = 0 and mode 1 take every valid key).
      if (threadIdx.x == 0) {
        SelState o = s;
        o.mode = 1;
        st[q] = o;
      }
    } else if (above < s.need && s.need <= above + local) {  // exactly one thread
      int64_t cum = above;
      int j = 0;
      for (; j < kPer - 1; ++j) {
        if (cum + c[j] >= s.need) break;
        cum += c[j];
      }
      const uint32_t d = static_cast<uint32_t>(kSelBins - 1 - (kPer * static_cast<int>(threadIdx.x) + j));
      SelState o = s;
      o.need = s.need - cum;  // the keys above this digit are all taken
      if (word == 0) {
        o.hi |= static_cast<uint64_t>(d) << shift;
      } else {
        o.lo |= d << shift;
      }
      // The bin holds exactly the keys still needed: T = the digits found, lower bits 0. (On
      // the last pass the keys are whole and unique, so this always holds there.)
      if (static_cast<int64_t>(c[j]) == o.need) o.mode = 1;
      o.xcut = fmax(s.xcut, prefix_cut<scalar_t>(o.hi));
      st[q] = o;
    }
    __syncthreads();  // tmp is reused by the next segment
  }
}

// The candidates: every valid key >= T of a done segment, in slots [koff, koff + k) of its image
// in any order (a counter per segment), key 0 in unused slots (written before). Float types
// store hi << 32 | lo in keys (hi < 2^30), float64 stores hi and lo apart.
template <typename scalar_t, typename in_t = scalar_t>
__global__ void __launch_bounds__(kSelThreads) sel_write_kernel(
    const in_t* __restrict__ logits, int64_t row, SelGroup g, int64_t b0, int64_t nb, scalar_t thresh,
    const SelState* __restrict__ st, uint32_t* __restrict__ counter, int64_t C, uint64_t* __restrict__ keys,
    uint32_t* __restrict__ keys_lo) {
  const int64_t total = nb * g.blk[g.n];
  for (int64_t v = blockIdx.x; v < total; v += gridDim.x) {
    int64_t b, begin, end;
    int lg;
    sel_task(g, b0, v, b, lg, begin, end);
    const int64_t q = b * g.L + g.l0 + lg;
    const SelState s = st[q];
    if (s.mode != 1) continue;
    const in_t* x = logits + b * row + g.xoff[lg];
    const cut_t<scalar_t> cut = make_cut<scalar_t>(s.xcut);
    for (int64_t i = begin + threadIdx.x; i < end; i += blockDim.x) {
      const scalar_t xi = static_cast<scalar_t>(x[i]);
      if (!(static_cast<cut_t<scalar_t>>(xi) >= cut)) continue;  // NaN too
      uint64_t hi;
      uint32_t lo;
      if (!sel_key(xi, thresh, i, hi, lo)) continue;
      if (hi < s.hi || (hi == s.hi && lo < s.lo)) continue;
      const uint32_t slot = atomicAdd(&counter[q], 1u);
      if (slot >= static_cast<uint64_t>(g.k[lg])) continue;  // never: exactly min(k, valid) keys are >= T
      const int64_t o = b * C + g.koff[lg] + slot;
      if constexpr (std::is_same<scalar_t, double>::value) {
        keys[o] = hi;
        keys_lo[o] = lo;
      } else {
        keys[o] = (hi << 32) | lo;
      }
    }
  }
}

// Segment bounds of the per-level sort of the candidates, for (image b, level l) at b * L + l.
__global__ void sel_offsets_kernel(SelGroup g, int64_t B, int64_t L, int64_t C, int* __restrict__ begin,
                                   int* __restrict__ end) {
  const int64_t total = B * g.n;
  for (int64_t e = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; e < total;
       e += int64_t(gridDim.x) * blockDim.x) {
    const int64_t b = e / g.n;
    const int lg = static_cast<int>(e - b * g.n);
    begin[b * L + g.l0 + lg] = static_cast<int>(b * C + g.koff[lg]);
    end[b * L + g.l0 + lg] = static_cast<int>(b * C + g.koff[lg] + g.k[lg]);
  }
}

// The j-th best candidate of (image, level) from the sorted keys: decoded and clipped into
// slot b * C + koff + j, its score from the key's bits (exactly torch's sigmoid in the dtype).
template <typename scalar_t, typename in_t = scalar_t>
__global__ void sel_candidates_kernel(const uint64_t* __restrict__ keys, const uint32_t* __restrict__ keys_lo,
                                      SelGroup g, int64_t B, int64_t C, const in_t* __restrict__ reg,
                                      const scalar_t* __restrict__ anchors, bool shared_anchors,
                                      const int64_t* __restrict__ sizes, int64_t A, int64_t K, scalar_t clip,
                                      uint8_t* __restrict__ valid, int64_t* __restrict__ labels,
                                      scalar_t* __restrict__ scores, scalar_t* __restrict__ boxes) {
  const int64_t c0 = g.koff[0], Cg = g.koff[g.n] - g.koff[0];
  const int64_t total = B * Cg;
  for (int64_t e = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; e < total;
       e += int64_t(gridDim.x) * blockDim.x) {
    const int64_t b = e / Cg, c = c0 + (e - b * Cg);
    int lg = 0;
    while (c >= g.koff[lg + 1]) ++lg;  // koff[n] > c; empty levels are passed over
    const int64_t q = b * C + c;
    uint64_t hi;
    uint32_t lo;
    if constexpr (std::is_same<scalar_t, double>::value) {
      hi = keys[q];
      lo = keys_lo[q];
    } else {
      hi = keys[q] >> 32;
      lo = static_cast<uint32_t>(keys[q]);
    }
    if (hi == 0) {
      valid[q] = 0;
      continue;
    }
    const int64_t idx = static_cast<int64_t>(0xFFFFFFFFu - lo);
    const int64_t a = g.aoff[lg] + idx / K;
    valid[q] = 1;
    labels[q] = idx % K;
    if constexpr (std::is_same<scalar_t, double>::value) {
      scores[q] = __longlong_as_double(static_cast<long long>(hi - 1));
    } else {
      scores[q] = static_cast<scalar_t>(__uint_as_float(static_cast<uint32_t>(hi - 1)));
    }
    const scalar_t one(1), zero(0);
    scalar_t o[4], code[4];
    decode_box<scalar_t>(codes_as<scalar_t>(reg + (b * A + a) * 4, code),
                         anchors + (shared_anchors ? 0 : b * A * 4) + a * 4, one, one, one, one, clip, o);
    const scalar_t H = static_cast<scalar_t>(sizes[2 * b]), W = static_cast<scalar_t>(sizes[2 * b + 1]);
    scalar_t* out = boxes + 4 * q;
    out[0] = clamp_like_torch(o[0], zero, W);
    out[1] = clamp_like_torch(o[1], zero, H);
    out[2] = clamp_like_torch(o[2], zero, W);
    out[3] = clamp_like_torch(o[3], zero, H);
  }
}

// Segmented radix sort of keys in [begin[s], end[s]) for each segment (descending, stable);
// items outside every segment are not written.
template <typename K, typename V>
void sort_segments_desc(const K* kin, K* kout, const V* vin, V* vout, int64_t items, int64_t segments,
                        const int* begin, const int* end, int end_bit, cudaStream_t stream, const Tensor& like) {
  if (items == 0 || segments == 0) return;
  const int n = static_cast<int>(items), segs = static_cast<int>(segments);
  auto run = [&](void* tmp, size_t& bytes) {
    if (vin == nullptr) {
      C10_CUDA_CHECK(cub::DeviceSegmentedRadixSort::SortKeysDescending(tmp, bytes, kin, kout, n, segs, begin, end,
                                                                       0, end_bit, stream));
    } else {
      C10_CUDA_CHECK(cub::DeviceSegmentedRadixSort::SortPairsDescending(tmp, bytes, kin, kout, vin, vout, n, segs,
                                                                        begin, end, 0, end_bit, stream));
    }
  };
  size_t bytes = 0;
  run(nullptr, bytes);
  Tensor tmp = at::empty({static_cast<int64_t>(bytes)}, byte_opts(like));
  run(tmp.data_ptr(), bytes);
}

// The passes of the radix select: (word, shift, width), most significant digit first.
struct SelPass {
  int word, shift, width;
  uint64_t mhi;
  uint32_t mlo;
};

inline std::vector<SelPass> sel_passes(int hi_bits) {
  std::vector<SelPass> p;
  for (int top = hi_bits; top > 0;) {
    const int w = std::min(kSelDigitBits, top);
    top -= w;
    p.push_back({0, top, w, top + w >= 64 ? 0ull : (~0ull << (top + w)), 0u});
  }
  for (int top = 32; top > 0;) {
    const int w = std::min(kSelDigitBits, top);
    top -= w;
    p.push_back({1, top, w, ~0ull, top + w >= 32 ? 0u : (~0u << (top + w))});
  }
  return p;
}

// ---- 2.-4. per image: score order, NMS, the first D

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
  RF_SHARED(int64_t, shared, [32]);
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

// scalar_t: the dtype of the scores, boxes and NMS; in_t: that of the logits and codes (under
// upcast float16/bfloat16, read as float32; else scalar_t). Anchors come as scalar_t.
template <typename scalar_t, typename in_t = scalar_t>
std::tuple<Tensor, Tensor, Tensor, Tensor> postprocess_impl(
    const Tensor& logits, const Tensor& reg, const Tensor& anchors, const Tensor& sizes,
    at::IntArrayRef levels, double score_thresh, int64_t topk, double nms_thresh, int64_t D) {
  using F = typename IouType<scalar_t>::type;
  using key_t = typename std::conditional<std::is_same<scalar_t, double>::value, uint64_t, uint32_t>::type;
  cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  const int64_t B = logits.size(0), A = logits.size(1), K = logits.size(2);
  const auto lopt = logits.options().dtype(at::kLong);
  Tensor boxes_out = at::zeros({B, D, 4}, anchors.options());
  Tensor scores_out = at::zeros({B, D}, anchors.options());
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
  constexpr bool is_double = std::is_same<scalar_t, double>::value;

  // 1. per (image, level): the top-k select (see above), then the candidates
  const int64_t L = static_cast<int64_t>(levels.size());
  const double thresh_cut = sigmoid_score_cut(static_cast<double>(thresh), SigmoidBound<scalar_t>::rel,
                                              SigmoidBound<scalar_t>::tiny);
  const bool none = thresh_cut == std::numeric_limits<double>::infinity();  // score_thresh >= 1
  std::vector<SelGroup> groups;
  int64_t max_search = 0;
  for (int64_t l0 = 0; l0 < L; l0 += kSelMaxLevels) {
    SelGroup g;
    g.n = static_cast<int>(std::min<int64_t>(kSelMaxLevels, L - l0));
    g.l0 = static_cast<int>(l0);
    g.L = L;
    g.blk[0] = 0;
    for (int lg = 0; lg < g.n; ++lg) {
      const int64_t l = l0 + lg, nl = levels[l] * K;
      g.nl[lg] = nl;
      g.aoff[lg] = aoff[l];
      g.xoff[lg] = aoff[l] * K;
      g.k[lg] = ks[l];
      g.srank[lg] = (ks[l] > 0 && nl > ks[l]) ? g.nsearch++ : -1;
      g.koff[lg] = koff[l];
      g.blk[lg + 1] = g.blk[lg] + (ks[l] > 0 && !none ? div_up(nl, kSelChunk) : 0);
    }
    g.koff[g.n] = koff[l0 + g.n];
    max_search = std::max(max_search, g.nsearch);
    groups.push_back(g);
  }
  // Images per select batch, so the histograms stay within kSelHistBudget counters.
  const int64_t nb_max =
      max_search == 0 ? B : std::max<int64_t>(1, std::min<int64_t>(B, kSelHistBudget / (max_search * kSelBins)));
  const std::vector<SelPass> passes = sel_passes(is_double ? 62 : 30);
  Tensor state = at::empty({B * L * static_cast<int64_t>(sizeof(SelState))}, byte_opts(logits));
  SelState* stp = reinterpret_cast<SelState*>(state.data_ptr());
  Tensor counter = at::zeros({B * L}, lopt.dtype(at::kInt));
  Tensor hist = at::zeros({std::max<int64_t>(1, nb_max * max_search * kSelBins)}, lopt.dtype(at::kInt));
  Tensor keys = at::zeros({B * C}, lopt), keys_s = at::empty({B * C}, lopt);  // 0: an empty slot
  Tensor keys_lo, keys_lo_s;
  if (is_double) {
    keys_lo = at::zeros({B * C}, lopt.dtype(at::kInt));
    keys_lo_s = at::empty({B * C}, lopt.dtype(at::kInt));
  }
  uint64_t* kp = reinterpret_cast<uint64_t*>(keys.data_ptr());
  uint64_t* ksp = reinterpret_cast<uint64_t*>(keys_s.data_ptr());
  uint32_t* klp = is_double ? reinterpret_cast<uint32_t*>(keys_lo.data_ptr()) : nullptr;
  uint32_t* klsp = is_double ? reinterpret_cast<uint32_t*>(keys_lo_s.data_ptr()) : nullptr;
  uint32_t* cnt = reinterpret_cast<uint32_t*>(counter.data_ptr());
  uint32_t* hp = reinterpret_cast<uint32_t*>(hist.data_ptr());
  Tensor seg = at::empty({2 * B * L}, lopt.dtype(at::kInt));
  int* seg_begin = seg.mutable_data_ptr<int>();
  int* seg_end_off = seg_begin + B * L;
  const int64_t max_grid = int64_t(at::cuda::getCurrentDeviceProperties()->multiProcessorCount) * 8;
  const in_t* xp = logits.const_data_ptr<in_t>();
  for (const SelGroup& g : groups) {
    cuda::launch(sel_init_kernel, cuda::grid_for(B * g.n), threads, 0, stream, g, B, none, stp, thresh_cut);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    cuda::launch(sel_offsets_kernel, cuda::grid_for(B * g.n), threads, 0, stream, g, B, L, C, seg_begin, seg_end_off);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    if (g.blk[g.n] == 0) continue;
    for (int64_t b0 = 0; b0 < B; b0 += nb_max) {
      const int64_t nb = std::min(nb_max, B - b0);
      const int64_t grid = std::min(nb * g.blk[g.n], max_grid);
      if (g.nsearch > 0) {
        const int64_t rgrid = std::min<int64_t>(nb * g.n, max_grid);
        for (size_t p = 0; p < passes.size(); ++p) {
          const SelPass& ps = passes[p];
          cuda::launch(sel_hist_kernel<scalar_t, in_t>, grid, kSelThreads, 0, stream, xp, A * K, g, b0, nb, thresh, stp, hp, ps.word,
                                                                     ps.shift, ps.width, ps.mhi, ps.mlo);
          C10_CUDA_KERNEL_LAUNCH_CHECK();
          cuda::launch(sel_resolve_kernel<scalar_t>, rgrid, kSelThreads, 0, stream, g, b0, nb, stp, hp, p == 0, ps.word,
                                                                         ps.shift);
          C10_CUDA_KERNEL_LAUNCH_CHECK();
        }
      }
      cuda::launch(sel_write_kernel<scalar_t, in_t>, grid, kSelThreads, 0, stream, xp, A * K, g, b0, nb, thresh, stp, cnt, C, kp,
                                                                  klp);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
  }
  // Each level's candidates in key order: (score desc, index asc), empty slots (key 0) last.
  const uint64_t* sorted_hi = ksp;
  const uint32_t* sorted_lo = nullptr;
  if constexpr (is_double) {
    // Stable: by lo (index asc), then by hi (score desc); the result is back in keys / keys_lo.
    sort_segments_desc<uint32_t, uint64_t>(klp, klsp, kp, ksp, B * C, B * L, seg_begin, seg_end_off, 32, stream,
                                           logits);
    sort_segments_desc<uint64_t, uint32_t>(ksp, kp, klsp, klp, B * C, B * L, seg_begin, seg_end_off, 62, stream,
                                           logits);
    sorted_hi = kp;
    sorted_lo = klp;
  } else {
    sort_segments_desc<uint64_t, uint32_t>(kp, ksp, nullptr, nullptr, B * C, B * L, seg_begin, seg_end_off, 62,
                                           stream, logits);
  }
  Tensor valid = at::empty({B * C}, byte_opts(logits));
  Tensor clabels = at::empty({B * C}, lopt);
  Tensor cscores = at::empty({B * C}, anchors.options());
  Tensor cboxes = at::empty({B * C, 4}, anchors.options());
  for (const SelGroup& g : groups) {
    const int64_t cg = g.koff[g.n] - g.koff[0];
    if (cg == 0) continue;
    cuda::launch(sel_candidates_kernel<scalar_t, in_t>, cuda::grid_for(B * cg), threads, 0, stream,
        sorted_hi, sorted_lo, g, B, C, reg.const_data_ptr<in_t>(), anchors.const_data_ptr<scalar_t>(),
        anchors.dim() == 2, sizes.const_data_ptr<int64_t>(), A, K, clip, valid.mutable_data_ptr<uint8_t>(),
        clabels.mutable_data_ptr<int64_t>(), cscores.mutable_data_ptr<scalar_t>(),
        cboxes.mutable_data_ptr<scalar_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  state = counter = hist = keys_s = keys_lo_s = seg = Tensor();
  keys = keys_lo = Tensor();

  // 2. per image: score order (stable: ties keep candidate order), then by label (stable)
  const int64_t n = B * C;
  const int64_t grid = cuda::grid_for(n);
  Tensor sk = at::empty({n}, lopt.dtype(sizeof(key_t) == 8 ? at::kLong : at::kInt)), sks = at::empty_like(sk);
  Tensor iota = at::empty({n}, lopt.dtype(at::kInt)), score_perm = at::empty_like(iota), nms_perm = at::empty_like(iota);
  key_t* skp = reinterpret_cast<key_t*>(sk.data_ptr());
  key_t* sksp = reinterpret_cast<key_t*>(sks.data_ptr());
  cuda::launch(cand_score_keys_kernel<scalar_t, key_t>, grid, threads, 0, stream,
      cscores.const_data_ptr<scalar_t>(), valid.const_data_ptr<uint8_t>(), n, skp, iota.mutable_data_ptr<int32_t>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  segmented_sort_pairs(skp, sksp, iota.const_data_ptr<int32_t>(), score_perm.mutable_data_ptr<int32_t>(), B, C,
                       stream, logits);
  Tensor lk = at::empty({n}, lopt.dtype(at::kInt)), lks = at::empty_like(lk);
  uint32_t* lkp = reinterpret_cast<uint32_t*>(lk.data_ptr());
  uint32_t* lksp = reinterpret_cast<uint32_t*>(lks.data_ptr());
  cuda::launch(label_keys_kernel, grid, threads, 0, stream, score_perm.const_data_ptr<int32_t>(), valid.const_data_ptr<uint8_t>(),
                                                  clabels.const_data_ptr<int64_t>(), n, lkp);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  segmented_sort_pairs(lkp, lksp, score_perm.const_data_ptr<int32_t>(), nms_perm.mutable_data_ptr<int32_t>(), B, C,
                       stream, logits);

  // 3. NMS, one chunk per image
  Tensor seg_end = at::empty({n}, lopt);
  cuda::launch(segment_end_kernel, grid, threads, 0, stream, lksp, n, C, 0xFFFFFFFFu, seg_end.mutable_data_ptr<int64_t>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  const auto fopt = logits.options().dtype(c10::CppTypeToScalarType<F>::value);
  Tensor sb = at::empty({n, 4}, fopt), sa = at::empty({n}, fopt);
  cuda::launch(gather_boxes_kernel<scalar_t, F, int32_t>, grid, threads, 0, stream,
      cboxes.const_data_ptr<scalar_t>(), nms_perm.const_data_ptr<int32_t>(), n, sb.mutable_data_ptr<F>(),
      sa.mutable_data_ptr<F>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  Tensor keep = at::empty({n}, byte_opts(logits));
  Groups grp;  // one group per image, C candidates each: sizes known here, no sync
  grp.G = B;
  grp.L = C;
  mask_and_scan<F>(sb.const_data_ptr<F>(), sa.const_data_ptr<F>(), seg_end.const_data_ptr<int64_t>(), grp,
                   B * group_words(C), B * group_tiles(C), C, nms_thresh, keep.mutable_data_ptr<uint8_t>(),
                   logits, stream);

  // 4. kept candidates first, in score order; the first D
  Tensor keep_cand = at::empty({n}, byte_opts(logits));
  cuda::launch(kept_keys_kernel, grid, threads, 0, stream, keep.const_data_ptr<uint8_t>(), lksp,
                                                 nms_perm.const_data_ptr<int32_t>(), n,
                                                 keep_cand.mutable_data_ptr<uint8_t>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  uint32_t* rk = lkp;  // reuse
  cuda::launch(rank_keys_kernel, grid, threads, 0, stream, keep_cand.const_data_ptr<uint8_t>(),
                                                 score_perm.const_data_ptr<int32_t>(), n, rk);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  Tensor final_perm = iota;  // reuse
  segmented_sort_pairs(rk, lksp, score_perm.const_data_ptr<int32_t>(), final_perm.mutable_data_ptr<int32_t>(), B,
                       C, stream, logits, 1);
  cuda::launch(write_dets_kernel<scalar_t>, B, cuda::kThreads, 0, stream,
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
    int64_t detections_per_img, bool upcast) {
  const char* op = "retina_fast::postprocess_detections";
  check_postprocess_args(cls_logits, bbox_regression, anchors, image_sizes, num_anchors_per_level, score_thresh,
                         topk_candidates, nms_thresh, detections_per_img, op);
  check_device(cls_logits, at::kCUDA, op, "cls_logits");
  const at::cuda::CUDAGuard guard(cls_logits.device());
  const Tensor x = cls_logits.contiguous(), r = bbox_regression.contiguous();
  const at::ScalarType math = postprocess_math_type(r.scalar_type(), upcast);
  const Tensor a = anchors.to(math).contiguous();
  const Tensor s = image_sizes.to(at::kLong).contiguous();
  std::tuple<Tensor, Tensor, Tensor, Tensor> out;
  if (math != x.scalar_type()) {
    AT_DISPATCH_REDUCED_FLOATING_TYPES(x.scalar_type(), "postprocess_cuda_upcast", [&] {
      out = postprocess_impl<float, scalar_t>(x, r, a, s, num_anchors_per_level, score_thresh, topk_candidates,
                                              nms_thresh, detections_per_img);
    });
    return out;
  }
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
