// The choice of CPU kernel variant (see cpu_dispatch.h), made once per process.
#include "common/cpu_dispatch.h"

#include <c10/util/Exception.h>

#include <cstdlib>
#include <cstring>

namespace retina_fast {

namespace {

CpuIsa best_supported() {
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
  __builtin_cpu_init();
  // libgcc's checks include the OS's support for the wider registers (XCR0).
  if (__builtin_cpu_supports("avx512f")) return CpuIsa::Avx512;
  if (__builtin_cpu_supports("avx2")) return CpuIsa::Avx2;
#endif
  return CpuIsa::Baseline;
}

CpuIsa choose() {
  const CpuIsa best = best_supported();
  const char* env = std::getenv("RETINA_FAST_CPU_ISA");
  if (env == nullptr || *env == '\0' || std::strcmp(env, "auto") == 0) return best;
  CpuIsa want;
  if (std::strcmp(env, "avx512") == 0) want = CpuIsa::Avx512;
  else if (std::strcmp(env, "avx2") == 0) want = CpuIsa::Avx2;
  else if (std::strcmp(env, "baseline") == 0) want = CpuIsa::Baseline;
  else
    TORCH_CHECK(false, "retina_fast: expected RETINA_FAST_CPU_ISA to be avx512, avx2, baseline or auto, got '",
                env, "'");
  // Never more than the CPU has: a wider request runs the widest supported variant.
  return static_cast<int>(want) < static_cast<int>(best) ? want : best;
}

}  // namespace

CpuIsa cpu_isa() {
  static const CpuIsa isa = choose();
  return isa;
}

const char* cpu_isa_name(CpuIsa isa) {
  switch (isa) {
    case CpuIsa::Avx512: return "avx512";
    case CpuIsa::Avx2: return "avx2";
    default: return "baseline";
  }
}

}  // namespace retina_fast
