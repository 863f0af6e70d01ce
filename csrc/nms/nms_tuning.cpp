// The scan_shared_limit knob of the CUDA NMS (see nms_tuning.h). Compiled in every build so
// the schema's test hook exists with or without CUDA.
#include <algorithm>
#include <atomic>
#include <cstdint>

#include "nms/nms_tuning.h"

namespace retina_fast {
namespace nms {
namespace {
std::atomic<int64_t> g_scan_shared_limit{32 * 1024};
}  // namespace

int64_t scan_shared_limit() { return g_scan_shared_limit.load(); }

int64_t set_scan_shared_limit(int64_t bytes) {
  if (bytes < 0) return g_scan_shared_limit.load();
  return g_scan_shared_limit.exchange(std::min<int64_t>(bytes, 48 * 1024));
}

}  // namespace nms
}  // namespace retina_fast
