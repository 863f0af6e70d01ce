// The library torch.ops.retina_fast: its private hooks here, the schema of every op in
// op_schemas.h (shared with the CPU emulator of the CUDA sources). Kernels register per dispatch key in
// the *_cpu.cpp / *_cuda.cu files (one TORCH_LIBRARY_IMPL per device file); fake (meta)
// kernels and autograd formulas are registered in Python beside the wrappers
// (retina_fast/ops/*.py).
#include <torch/library.h>

#include <string>

#include "common/cpu_block_cache.h"
#include "op_schemas.h"
#include "common/cpu_dispatch.h"
#include "nms/nms_tuning.h"

namespace retina_fast {

std::string cpu_isa_str() { return cpu_isa_name(cpu_isa()); }

bool cuda_built() {
#ifdef RETINA_FAST_WITH_CUDA
  return true;
#else
  return false;
#endif
}

}  // namespace retina_fast

TORCH_LIBRARY(retina_fast, m) {
  m.def("_cuda_built() -> bool", &retina_fast::cuda_built);
  // The CPU kernel variant in use: "avx512", "avx2" or "baseline" (csrc/common/cpu_dispatch.h).
  m.def("_cpu_isa() -> str", &retina_fast::cpu_isa_str);
  // Test hook: the CUDA NMS scan's shared-memory budget in bytes (< 0: only read it); returns
  // the previous value. See csrc/nms/nms_tuning.h.
  m.def("_nms_scan_shared_limit(int bytes) -> int", &retina_fast::nms::set_scan_shared_limit);
  // The CPU block cache of large outputs (csrc/common/cpu_block_cache.h): free every kept
  // block (returns the bytes freed); [bytes kept, blocks kept, hits, misses].
  m.def("_cpu_cache_release() -> int", &retina_fast::cpu_cache_release);
  m.def("_cpu_cache_stats() -> int[]", &retina_fast::cpu_cache_stats);

  retina_fast::define_op_schemas(m);
}
