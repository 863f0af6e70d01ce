// See cpu_block_cache.h.
#include "common/cpu_block_cache.h"

#include <cstdint>
#include <cstdlib>
#include <mutex>
#include <vector>
#include <utility>

#if defined(__linux__)
#include <pthread.h>
#include <sys/mman.h>
#endif

namespace retina_fast {
namespace {

constexpr size_t kPage = size_t(2) << 20;  // 2 MB: the x86-64 huge page
constexpr size_t kMinBytes = 2 * kPage;

size_t limit_from_env() {
  const char* s = std::getenv("RETINA_FAST_CPU_CACHE_MB");
  if (s == nullptr || *s == '\0') return size_t(1024) << 20;
  char* end = nullptr;
  const long long mb = std::strtoll(s, &end, 10);
  if (end == s || *end != '\0' || mb < 0) return size_t(1024) << 20;  // unreadable: the default
  return size_t(mb) << 20;
}

struct Cache {
  std::mutex mu;
  std::vector<std::pair<size_t, void*>> blocks;  // (bytes, pointer), kept for reuse
  size_t kept = 0;
  size_t limit = limit_from_env();
  int64_t hits = 0, misses = 0;
};

#if defined(__linux__)
void fork_prepare();
void fork_release();
#endif

Cache& cache() {
  // Never destroyed: a tensor freed during process exit still finds it.
  static Cache* c = [] {
    auto* p = new Cache;
#if defined(__linux__)
    pthread_atfork(fork_prepare, fork_release, fork_release);
#endif
    return p;
  }();
  return *c;
}

#if defined(__linux__)
void fork_prepare() { cache().mu.lock(); }
void fork_release() { cache().mu.unlock(); }
#endif

void* allocate(size_t bytes) {
  void* p = nullptr;
#if defined(__linux__)
  if (posix_memalign(&p, kPage, bytes) != 0) return nullptr;
#if defined(MADV_HUGEPAGE)
  madvise(p, bytes, MADV_HUGEPAGE);  // advice only: failure leaves 4 kB pages
#endif
#else
  if (posix_memalign(&p, 64, bytes) != 0) return nullptr;
#endif
  return p;
}

// A freed block is kept, the oldest kept blocks freed to stay within the limit (blocks of a
// size no longer asked for do not stay forever); a block over the limit itself is freed.
void give_back(void* p, size_t bytes) {
  std::vector<void*> evicted;
  Cache& c = cache();
  {
    std::lock_guard<std::mutex> g(c.mu);
    if (bytes <= c.limit) {
      size_t drop = 0;
      while (c.kept + bytes > c.limit) {
        c.kept -= c.blocks[drop].first;
        evicted.push_back(c.blocks[drop].second);
        ++drop;
      }
      c.blocks.erase(c.blocks.begin(), c.blocks.begin() + int64_t(drop));
      c.blocks.emplace_back(bytes, p);
      c.kept += bytes;
      p = nullptr;
    }
  }
  for (void* q : evicted) std::free(q);
  std::free(p);
}

// The smallest kept block of at least `bytes` and at most 25 % more, with its size; null if none.
std::pair<void*, size_t> take(size_t bytes) {
  Cache& c = cache();
  std::lock_guard<std::mutex> g(c.mu);
  size_t best = c.blocks.size();
  for (size_t i = 0; i < c.blocks.size(); ++i) {
    const size_t b = c.blocks[i].first;
    if (b >= bytes && b <= bytes + bytes / 4 && (best == c.blocks.size() || b < c.blocks[best].first))
      best = i;
  }
  if (best == c.blocks.size()) {
    ++c.misses;
    return {nullptr, 0};
  }
  ++c.hits;
  const auto blk = c.blocks[best];
  c.kept -= blk.first;
  c.blocks.erase(c.blocks.begin() + int64_t(best));
  return {blk.second, blk.first};
}

}  // namespace

at::Tensor cached_empty_like(const at::Tensor& like) {
  const size_t nbytes = size_t(like.numel()) * like.element_size();
  if (nbytes < kMinBytes || like.layout() != at::kStrided || !like.device().is_cpu())
    return at::empty(like.sizes(), like.options());
  const size_t rounded = (nbytes + kPage - 1) / kPage * kPage;
  auto [p, have] = take(rounded);  // `have`: the block's own size, under which it goes back
  if (p == nullptr) {
    p = allocate(rounded);
    have = rounded;
    if (p == nullptr) return at::empty(like.sizes(), like.options());
  }
  const size_t size = have;
  return at::from_blob(p, like.sizes(), [size](void* q) { give_back(q, size); }, like.options());
}

int64_t cpu_cache_release() {
  std::vector<std::pair<size_t, void*>> blocks;
  {
    Cache& c = cache();
    std::lock_guard<std::mutex> g(c.mu);
    blocks.swap(c.blocks);
    c.kept = 0;
  }
  int64_t freed = 0;
  for (auto& b : blocks) {
    std::free(b.second);
    freed += int64_t(b.first);
  }
  return freed;
}

std::vector<int64_t> cpu_cache_stats() {
  Cache& c = cache();
  std::lock_guard<std::mutex> g(c.mu);
  return {int64_t(c.kept), int64_t(c.blocks.size()), c.hits, c.misses};
}

}  // namespace retina_fast
