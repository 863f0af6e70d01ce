#pragma once
// Large CPU outputs (the focal loss's [N, K] gradient: tens to hundreds of MB, allocated once
// per training step) on 2 MB pages, with freed blocks kept for the next call of the same size.
//
// Why: glibc serves an allocation this large with a fresh mmap and returns it to the system
// on free, so every call pays the first touch of every page again (page faults, and the
// kernel zeroing the pages): 4-5x the focal loss math at N = 4 x 30k, K = 80 on the 2-core
// dev VM (60-80 ms against 15 ms a call, measured with benchmarks/bench_focal_loss.py). A
// block kept here is touched already: the next step writes into it at memory speed. Like
// torch's CUDA caching allocator, and bounded:
//
// * only blocks of at least 4 MB, rounded up to 2 MB, go through here (smaller ones: at::empty);
// * a freed block is kept, and the oldest kept blocks are freed to keep the total within the
//   limit (RETINA_FAST_CPU_CACHE_MB, read once, default 1024; 0 keeps nothing);
// * a request takes the smallest kept block that fits and is at most 25 % larger;
// * torch.ops.retina_fast._cpu_cache_release() frees every kept block (returns the bytes
//   freed); _cpu_cache_stats() -> [bytes kept, blocks kept, hits, misses].
// Thread-safe (any thread may free a tensor); the cache survives fork (its lock is held over
// fork and released on both sides).
#include <ATen/ATen.h>

#include <cstdint>
#include <vector>

namespace retina_fast {

// An uninitialised CPU tensor of like's sizes and options (strided, contiguous), from the
// cache when it is large enough to go through it.
at::Tensor cached_empty_like(const at::Tensor& like);

int64_t cpu_cache_release();
std::vector<int64_t> cpu_cache_stats();

}  // namespace retina_fast
