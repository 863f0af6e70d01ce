#pragma once
// Tuning knobs of the NMS kernels, kept out of nms_common.h so nms_tuning.cpp compiles without
// ATen.
#include <cstdint>

namespace retina_fast {
namespace nms {

// Bytes of shared memory the CUDA greedy scan may take for one group's removed bits (32 KiB:
// groups up to 262,144 boxes) before it uses global scratch instead. Tests lower it, through
// torch.ops.retina_fast._nms_scan_shared_limit, to run the global path on small inputs.
int64_t scan_shared_limit();
// Sets the limit (clamped to [0, 48 KiB], the default dynamic shared memory) when bytes >= 0;
// returns the previous value.
int64_t set_scan_shared_limit(int64_t bytes);

}  // namespace nms
}  // namespace retina_fast
