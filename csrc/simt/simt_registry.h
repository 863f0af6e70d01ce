#pragma once
// Where the emulated CUDA kernels register. Each `TORCH_LIBRARY_IMPL(retina_fast, CUDA, m)`
// block of a .cu file (redefined by prelude.h) runs against an OpSink, whose impl() registers
// the kernel twice:
//   - torch.ops.retina_fast_simt.<op> on CPU tensors (the library's own namespace, for anyone
//     who loads it with torch.ops.load_library and compares it with the CPU ops);
//   - torch.ops.retina_fast.<op> on the emulated device "simt" (PrivateUse1, simt_device.cpp),
//     so the test suite's CUDA side runs these kernels with tensors moved `.to("simt")`.
// Each call goes through run_checked: launch errors no launch check took are raised, and with
// the race check on the op runs in forward, reversed and shuffled thread order, and the
// outputs must be equal bit for bit.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <memory>
#include <string>
#include <tuple>
#include <utility>
#include <vector>

namespace simt {

// The libraries the kernels register in (created on first use, never destroyed).
std::vector<torch::Library*>& op_libraries();

bool race_check_enabled();
// Runs f under the three schedules (when the race check is on) and compares; see above.
void before_op(const char* name);
void after_op(const char* name);
void compare_outputs(const char* name, const char* schedule, const std::vector<at::Tensor>& a,
                     const std::vector<at::Tensor>& b);
void set_schedule_for_check(int which);  // 0 forward, 1 reversed, 2 shuffled, -1 restore

inline void flatten(const at::Tensor& t, std::vector<at::Tensor>& out) { out.push_back(t); }
template <typename... T>
inline void flatten(const std::tuple<T...>& t, std::vector<at::Tensor>& out) {
  std::apply([&](const auto&... x) { (flatten(x, out), ...); }, t);
}
template <typename T>
inline void flatten(const T&, std::vector<at::Tensor>&) {}

template <typename R, typename F>
R run_checked(const char* name, F&& f) {
  before_op(name);
  if (!race_check_enabled()) {
    R r = f();
    after_op(name);
    return r;
  }
  set_schedule_for_check(0);
  R r0 = f();
  after_op(name);
  std::vector<at::Tensor> o0;
  flatten(r0, o0);
  const char* names[] = {"forward", "reversed", "shuffled"};
  for (int s = 1; s <= 2; ++s) {
    set_schedule_for_check(s);
    R r = f();
    set_schedule_for_check(-1);
    after_op(name);
    std::vector<at::Tensor> o;
    flatten(r, o);
    compare_outputs(name, names[s], o0, o);
  }
  return r0;
}

struct OpSink {
  template <typename R, typename... A>
  OpSink& impl(const char* name, R (*fn)(A...)) {
    const std::string n(name);
    auto wrapped = [fn, n](A... args) -> R { return run_checked<R>(n.c_str(), [&]() -> R { return fn(args...); }); };
    for (torch::Library* lib : op_libraries()) lib->impl(name, wrapped);
    return *this;
  }
};

struct Registrar {
  explicit Registrar(void (*f)(OpSink&)) {
    OpSink sink;
    f(sink);
  }
};

}  // namespace simt

#define RF_SIMT_LIBRARY_IMPL(m)                                                                 \
  static void RF_SIMT_CAT(rf_simt_impl_, __LINE__)(::simt::OpSink & m);                        \
  static const ::simt::Registrar RF_SIMT_CAT(rf_simt_reg_, __LINE__)(&RF_SIMT_CAT(rf_simt_impl_, __LINE__)); \
  static void RF_SIMT_CAT(rf_simt_impl_, __LINE__)(::simt::OpSink & m)
