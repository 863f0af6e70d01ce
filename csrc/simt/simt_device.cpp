// The emulated device and the library of the simt build.
//
// torch.ops.retina_fast_simt: every op of op_schemas.h, with the project's CUDA kernels (run by
// the emulator) as its CPU kernels, plus controls: the thread schedule, the race check, counts.
//
// The device "simt" (torch's PrivateUse1 backend, renamed from Python: retina_fast/_simt.py):
// host memory behind a device of its own, so a test can move tensors `.to("simt")` and every
// torch.ops.retina_fast op on them runs the emulated CUDA kernel, while tensors on "cpu" run
// the CPU kernels; the two can be compared in one process, as CUDA and CPU are on a GPU. torch's
// own ops on simt tensors run on the CPU through torch's boxed CPU fallback; the few that must
// not copy (allocation, views, copies between devices) are registered here.
#include <ATen/ATen.h>
#include <ATen/CPUGeneratorImpl.h>
#include <ATen/EmptyTensor.h>
#include <ATen/detail/PrivateUse1HooksInterface.h>
#include <ATen/NativeFunctions.h>
#include <ATen/native/CPUFallback.h>
#include <ATen/native/Resize.h>
#include <c10/core/Allocator.h>
#include <c10/core/impl/DeviceGuardImplInterface.h>
#include <c10/core/impl/alloc_cpu.h>
#include <torch/library.h>

#include <atomic>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>

#include "op_schemas.h"
#include "simt/simt.h"
#include "simt/simt_control.h"
#include "simt/simt_registry.h"
#include "nms/nms_tuning.h"

namespace simt {

// ------------------------------------------------------------------ errors raised on the host

const char* cuda_error_name(cudaError_t e) {
  switch (e) {
    case cudaSuccess: return "no error";
    case cudaErrorInvalidValue: return "invalid argument";
    case cudaErrorInvalidConfiguration: return "invalid configuration argument";
    case cudaErrorAssert: return "device-side assert triggered";
    case cudaErrorLaunchFailure: return "unspecified launch failure";
  }
  return "unknown error";
}

[[noreturn]] void throw_launch_error(const char* file, int line) {
  const char* text = nullptr;
  const cudaError_t e = take_error(&text);
  TORCH_CHECK(false, "CUDA error (simt emulator): ", cuda_error_name(e), ": ", text ? text : "",
              " [checked at ", file, ":", line, "]");
}

// ------------------------------------------------------------------ the race check

namespace {
std::atomic<bool> g_race_check{std::getenv("RF_SIMT_RACECHECK") != nullptr &&
                               std::string(std::getenv("RF_SIMT_RACECHECK")) != "0"};
std::atomic<long> g_races{0};
std::atomic<long> g_ops{0};
thread_local int tl_saved_schedule = kScheduleForward;
uint64_t g_shuffle_seed = 0x5EED5EEDull;
}  // namespace

bool race_check_enabled() { return g_race_check.load(); }

void before_op(const char* name) {
  if (peek_error() != cudaSuccess) {
    const char* text = nullptr;
    const cudaError_t e = take_error(&text);
    TORCH_CHECK(false, "CUDA error (simt emulator) left unchecked before ", name, ": ", cuda_error_name(e), ": ",
                text ? text : "");
  }
}

void after_op(const char* name) {
  ++g_ops;
  if (peek_error() != cudaSuccess) {
    const char* text = nullptr;
    const cudaError_t e = take_error(&text);
    TORCH_CHECK(false, "CUDA error (simt emulator) in ", name, " that no launch check raised: ",
                cuda_error_name(e), ": ", text ? text : "");
  }
}

void set_schedule_for_check(int which) {
  if (which < 0) {
    set_schedule(tl_saved_schedule, g_shuffle_seed);
    return;
  }
  if (which == 0) tl_saved_schedule = get_schedule();
  const int modes[3] = {kScheduleForward, kScheduleReverse, kScheduleShuffle};
  set_schedule(modes[which], g_shuffle_seed);
}

namespace {
// A CPU view of any tensor of this process's host memory (CPU or simt), made contiguous.
at::Tensor host_contiguous(const at::Tensor& t) {
  if (t.device().is_cpu()) return t.contiguous();
  at::Tensor cpu = at::from_blob(t.data_ptr(), t.sizes(), t.strides(), t.options().device(at::kCPU));
  return cpu.contiguous();
}
}  // namespace

void compare_outputs(const char* name, const char* schedule, const std::vector<at::Tensor>& a,
                     const std::vector<at::Tensor>& b) {
  TORCH_CHECK(a.size() == b.size(), "simt race check: ", name, " returned ", a.size(), " tensors, then ", b.size());
  for (size_t i = 0; i < a.size(); ++i) {
    if (!a[i].defined() && !b[i].defined()) continue;
    bool same = a[i].defined() == b[i].defined() && a[i].sizes() == b[i].sizes() &&
                a[i].scalar_type() == b[i].scalar_type();
    int64_t first = -1;
    if (same && a[i].numel() > 0) {
      const at::Tensor x = host_contiguous(a[i]), y = host_contiguous(b[i]);
      const size_t es = x.element_size();
      const char* px = static_cast<const char*>(x.data_ptr());
      const char* py = static_cast<const char*>(y.data_ptr());
      if (std::memcmp(px, py, es * x.numel()) != 0) {
        same = false;
        for (int64_t e = 0; e < x.numel(); ++e)
          if (std::memcmp(px + e * es, py + e * es, es) != 0) {
            first = e;
            break;
          }
      }
    }
    if (!same) {
      ++g_races;
      std::fprintf(stderr, "[simt] RACE: %s output %zu differs between the forward and the %s thread order%s\n", name,
                   i, schedule, first >= 0 ? (" at element " + std::to_string(first)).c_str() : "");
      TORCH_CHECK(false, "simt race check: ", name, " output ", i, " differs between the forward and the ", schedule,
                  " thread order", first >= 0 ? " at flat element " + std::to_string(first) : std::string(),
                  ": a result depends on the order of threads between two barriers (a read and a write, or two "
                  "writes, of one address by different threads with no barrier between them)");
    }
  }
}

std::vector<torch::Library*>& op_libraries() {
  static std::vector<torch::Library*>* libs = [] {
    auto* v = new std::vector<torch::Library*>();
    v->push_back(new torch::Library(torch::Library::IMPL, "retina_fast_simt", c10::DispatchKey::CPU, __FILE__,
                                    __LINE__));
    v->push_back(new torch::Library(torch::Library::IMPL, "retina_fast", c10::DispatchKey::PrivateUse1, __FILE__,
                                    __LINE__));
    return v;
  }();
  return *libs;
}

}  // namespace simt

// ------------------------------------------------------------------ the NMS tuning knob
// The CUDA NMS reads scan_shared_limit(); the tests set it through the extension's own
// torch.ops.retina_fast._nms_scan_shared_limit, so the emulated kernels read that one when the
// extension is loaded, else the default (the library also loads on its own).

namespace retina_fast {
namespace nms {
int64_t scan_shared_limit() {
  const auto handle = c10::Dispatcher::singleton().findSchema({"retina_fast::_nms_scan_shared_limit", ""});
  if (!handle.has_value()) return 32 * 1024;  // nms_tuning.cpp's default
  return handle->typed<int64_t(int64_t)>().call(-1);
}
}  // namespace nms
}  // namespace retina_fast

// ------------------------------------------------------------------ the device

namespace {

void simt_delete(void* p) { c10::free_cpu(p); }

struct SimtAllocator final : c10::Allocator {
  c10::DataPtr allocate(size_t n) override {
    void* p = n ? c10::alloc_cpu(n) : nullptr;
    return {p, p, &simt_delete, c10::Device(c10::DeviceType::PrivateUse1, 0)};
  }
  c10::DeleterFnPtr raw_deleter() const override { return &simt_delete; }
  void copy_data(void* dest, const void* src, std::size_t count) const final { default_copy_data(dest, src, count); }
};

SimtAllocator g_alloc;
constexpr c10::DispatchKeySet kSimtKeys(c10::DispatchKey::PrivateUse1);

at::Tensor simt_empty(c10::IntArrayRef size, std::optional<at::ScalarType> dtype, std::optional<at::Layout>,
                      std::optional<at::Device>, std::optional<bool>, std::optional<at::MemoryFormat> mf) {
  return at::detail::empty_generic(size, &g_alloc, kSimtKeys, c10::dtype_or_default(dtype), mf);
}

at::Tensor simt_empty_strided(c10::IntArrayRef size, c10::IntArrayRef stride, std::optional<at::ScalarType> dtype,
                              std::optional<at::Layout>, std::optional<at::Device>, std::optional<bool>) {
  return at::detail::empty_strided_generic(size, stride, &g_alloc, kSimtKeys, c10::dtype_or_default(dtype));
}

// A CPU tensor over the same memory (sizes, strides, offset), for copies through CPU kernels.
at::Tensor as_cpu(const at::Tensor& t) {
  if (t.is_cpu()) return t;
  TORCH_CHECK(t.device().type() == c10::DeviceType::PrivateUse1, "simt: a copy between simt and ", t.device());
  c10::DataPtr dp(t.storage().mutable_data(), c10::Device(c10::kCPU));
  c10::Storage st(c10::Storage::use_byte_size_t{}, t.storage().nbytes(), std::move(dp), nullptr, false);
  at::Tensor c = at::detail::make_tensor<c10::TensorImpl>(std::move(st), c10::DispatchKeySet(c10::DispatchKey::CPU),
                                                          t.dtype());
  c.unsafeGetTensorImpl()->set_sizes_and_strides(t.sizes(), t.strides());
  c.unsafeGetTensorImpl()->set_storage_offset(t.storage_offset());
  return c;
}

at::Tensor simt_copy_from(const at::Tensor& self, const at::Tensor& dst, bool) {
  as_cpu(dst).copy_(as_cpu(self));
  return dst;
}

at::Tensor simt_copy_from_and_resize(const at::Tensor& self, const at::Tensor& dst) {
  if (dst.sizes() != self.sizes()) dst.resize_(self.sizes());
  return simt_copy_from(self, dst, false);
}

const at::Tensor& simt_resize(const at::Tensor& self, c10::IntArrayRef size, std::optional<at::MemoryFormat> mf) {
  c10::TensorImpl* impl = self.unsafeGetTensorImpl();
  impl->set_sizes_contiguous(size);
  const auto bytes = at::detail::computeStorageNbytesContiguous(size, impl->dtype().itemsize(), impl->storage_offset());
  at::native::maybe_resize_storage_cpu(impl, bytes);
  if (mf.has_value() && *mf != at::MemoryFormat::Preserve) impl->empty_tensor_restride(*mf);
  return self;
}

at::Tensor& simt_set_storage(at::Tensor& self, c10::Storage src, int64_t offset, c10::IntArrayRef size,
                             c10::IntArrayRef stride) {
  self.unsafeGetTensorImpl()->set_storage_keep_dtype(std::move(src));
  self.unsafeGetTensorImpl()->set_storage_offset(offset);
  self.unsafeGetTensorImpl()->set_sizes_and_strides(size, stride);
  return self;
}

at::Tensor& simt_set_storage_plain(at::Tensor& self, c10::Storage src) {
  const int64_t n = static_cast<int64_t>(src.nbytes() / self.dtype().itemsize());
  return simt_set_storage(self, std::move(src), 0, {n}, {1});
}

void simt_fallback(const c10::OperatorHandle& op, torch::jit::Stack* stack) { at::native::cpu_fallback(op, stack); }

// The device's current stream and index: one device, index 0.
struct SimtGuard final : c10::impl::DeviceGuardImplInterface {
  c10::DeviceType type() const override { return c10::DeviceType::PrivateUse1; }
  c10::Device exchangeDevice(c10::Device) const override { return c10::Device(c10::DeviceType::PrivateUse1, 0); }
  c10::Device getDevice() const override { return c10::Device(c10::DeviceType::PrivateUse1, 0); }
  void setDevice(c10::Device) const override {}
  void uncheckedSetDevice(c10::Device) const noexcept override {}
  c10::Stream getStream(c10::Device d) const noexcept override { return c10::Stream(c10::Stream::DEFAULT, d); }
  c10::Stream getDefaultStream(c10::Device d) const override { return c10::Stream(c10::Stream::DEFAULT, d); }
  c10::Stream exchangeStream(c10::Stream s) const noexcept override { return s; }
  c10::DeviceIndex deviceCount() const noexcept override { return 1; }
  bool queryStream(const c10::Stream&) const override { return true; }
  void synchronizeStream(const c10::Stream&) const override {}
  void synchronizeDevice(const c10::DeviceIndex) const override {}
};

// Random numbers for simt tensors come from a CPU generator that says it is the device's.
struct SimtGenerator : at::CPUGeneratorImpl {
  explicit SimtGenerator(c10::DeviceIndex i) {
    device_ = c10::Device(c10::DeviceType::PrivateUse1, i);
    key_set_ = c10::DispatchKeySet(c10::DispatchKey::PrivateUse1);
  }
};

struct SimtHooks final : at::PrivateUse1HooksInterface {
  bool isBuilt() const override { return true; }
  bool isAvailable() const override { return true; }
  bool hasPrimaryContext(c10::DeviceIndex) const override { return true; }
  c10::DeviceIndex deviceCount() const override { return 1; }
  c10::DeviceIndex getCurrentDevice() const override { return 0; }
  const at::Generator& getDefaultGenerator(c10::DeviceIndex) const override {
    static at::Generator g = at::make_generator<SimtGenerator>(0);
    return g;
  }
  at::Generator getNewGenerator(c10::DeviceIndex i) const override { return at::make_generator<SimtGenerator>(i); }
  at::Device getDeviceFromPtr(void*) const override { return c10::Device(c10::DeviceType::PrivateUse1, 0); }
  c10::Allocator* getPinnedMemoryAllocator() const override { return c10::GetCPUAllocator(); }
};

const int g_hooks_registered = (at::RegisterPrivateUse1HooksInterface(new SimtHooks()), 0);

}  // namespace

C10_REGISTER_GUARD_IMPL(PrivateUse1, SimtGuard);
REGISTER_ALLOCATOR(c10::DeviceType::PrivateUse1, &g_alloc);

TORCH_LIBRARY_IMPL(aten, PrivateUse1, m) {
  m.impl("empty.memory_format", &simt_empty);
  m.impl("empty_strided", &simt_empty_strided);
  m.impl("_copy_from", &simt_copy_from);
  m.impl("_copy_from_and_resize", &simt_copy_from_and_resize);
  m.impl("resize_", &simt_resize);
  m.impl("set_.source_Storage", &simt_set_storage_plain);
  m.impl("set_.source_Storage_storage_offset", &simt_set_storage);
  m.impl("as_strided", at::native::as_strided_tensorimpl);
  m.impl("view", at::native::view);
  m.impl("_reshape_alias", at::native::_reshape_alias);
  m.impl("unfold", at::native::unfold);
}

TORCH_LIBRARY_IMPL(_, PrivateUse1, m) { m.fallback(torch::CppFunction::makeFromBoxedFunction<&simt_fallback>()); }

// ------------------------------------------------------------------ the library

namespace {
void set_schedule_op(int64_t mode, int64_t seed) {
  TORCH_CHECK(mode >= 0 && mode <= 2, "simt: schedule 0 (forward), 1 (reversed) or 2 (shuffled), got ", mode);
  simt::set_schedule(static_cast<int>(mode), static_cast<uint64_t>(seed));
}
bool set_race_check_op(bool on) { return simt::g_race_check.exchange(on); }
int64_t set_max_grid_op(int64_t y, int64_t z) {
  TORCH_CHECK(y >= 1 && y <= 65535 && z >= 1 && z <= 65535, "simt: grid limits in [1, 65535], got ", y, ", ", z);
  return simt::set_max_grid(static_cast<int>(y), static_cast<int>(z));
}
std::vector<int64_t> stats_op() {
  return {simt::error_count(), simt::g_races.load(), simt::g_ops.load(), simt::get_schedule(),
          simt::race_check_enabled() ? 1 : 0};
}
}  // namespace

TORCH_LIBRARY(retina_fast_simt, m) {
  retina_fast::define_op_schemas(m);
  // Thread order within a barrier interval: 0 forward, 1 reversed, 2 shuffled (seeded).
  m.def("_simt_set_schedule(int mode, int seed=0) -> ()", &set_schedule_op);
  // Run every op under the three schedules and compare (returns the previous setting).
  m.def("_simt_set_race_check(bool on) -> bool", &set_race_check_op);
  // The device's gridDim.y and .z limits (65,535 as on a GPU), lowered by tests to reach the
  // code past the limit with few blocks; returns the previous y limit.
  m.def("_simt_set_max_grid(int y=65535, int z=65535) -> int", &set_max_grid_op);
  // [errors recorded, races found, op calls, schedule, race check on]
  m.def("_simt_stats() -> int[]", &stats_op);
}
