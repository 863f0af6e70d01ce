#pragma once
// simt shadow of c10/cuda/CUDAException.h: the launch check raises the first error the
// emulator recorded (an invalid launch, a failed device-side assertion, a deadlock, ...).
#include <c10/util/Exception.h>

#include "simt/simt.h"

namespace simt {
const char* cuda_error_name(cudaError_t e);
[[noreturn]] void throw_launch_error(const char* file, int line);
inline void launch_check(const char* file, int line) {
  if (peek_error() != cudaSuccess) throw_launch_error(file, line);
}
}  // namespace simt

#define C10_CUDA_KERNEL_LAUNCH_CHECK() ::simt::launch_check(__FILE__, __LINE__)
#define C10_CUDA_CHECK(EXPR)                                                               \
  do {                                                                                     \
    const cudaError_t rf_simt_err = (EXPR);                                                \
    TORCH_CHECK(rf_simt_err == cudaSuccess, "CUDA error: ", ::simt::cuda_error_name(rf_simt_err), \
                " (", #EXPR, ")");                                                         \
    ::simt::launch_check(__FILE__, __LINE__);                                              \
  } while (0)
