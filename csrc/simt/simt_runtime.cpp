// The host side of simt (see simt.h): fibers, the per-block scheduler, barriers and warp
// collectives, shared memory, launch checks and the error record.
//
// A fiber is a stack and a saved stack pointer; simt_ctx_switch saves the callee-saved
// registers on the stack it leaves and restores them from the one it enters (x86-64 System V;
// the MXCSR and x87 control words are left alone: nothing here changes them). One fiber per thread slot of a block, created once per OS thread
// and reused by every block and launch on it. Under AddressSanitizer every switch is announced
// (__sanitizer_start/finish_switch_fiber), so ASan knows which stack is live.
#include "simt/simt.h"
#include "simt/simt_control.h"

#include <sys/mman.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cstdio>
#include <cstdlib>
#include <mutex>
#include <string>
#include <vector>

#if defined(__SANITIZE_ADDRESS__)
#include <sanitizer/asan_interface.h>
#include <sanitizer/common_interface_defs.h>
#define SIMT_ASAN 1
#else
#define SIMT_ASAN 0
#endif

#if !defined(__x86_64__)
#error "simt's fiber switch is written for x86-64"
#endif

extern "C" void simt_ctx_switch(void** save_sp, void* load_sp);
extern "C" void simt_fiber_trampoline();
extern "C" __attribute__((visibility("hidden"), used)) void simt_fiber_entry();

// save_sp (rdi): where to store this stack's pointer; load_sp (rsi): the stack to resume.
asm(R"(
    .text
    .globl simt_ctx_switch
    .hidden simt_ctx_switch
    .type simt_ctx_switch, @function
simt_ctx_switch:
    pushq %rbp
    pushq %rbx
    pushq %r12
    pushq %r13
    pushq %r14
    pushq %r15
    movq %rsp, (%rdi)
    movq %rsi, %rsp
    popq %r15
    popq %r14
    popq %r13
    popq %r12
    popq %rbx
    popq %rbp
    ret
    .size simt_ctx_switch, .-simt_ctx_switch

    .globl simt_fiber_trampoline
    .hidden simt_fiber_trampoline
    .type simt_fiber_trampoline, @function
simt_fiber_trampoline:
    andq $-16, %rsp
    call simt_fiber_entry
    ud2
    .size simt_fiber_trampoline, .-simt_fiber_trampoline
)");

namespace simt {

thread_local Now tl_now __attribute__((tls_model("initial-exec"))) = {};

namespace {

constexpr size_t kStackBytes = SIMT_ASAN ? (512u << 10) : (128u << 10);
constexpr size_t kMaxSharedBytes = 48u << 10;  // per block, without the opt-in attribute

enum State : uint8_t { kReady, kAtBarrier, kAtWarp, kDone };

// ------------------------------------------------------------------ errors

std::mutex g_err_mu;
cudaError_t g_err = cudaSuccess;
std::string g_err_text;
std::atomic<long> g_err_count{0};

void record_error(cudaError_t code, const std::string& text) {
  std::lock_guard<std::mutex> lock(g_err_mu);
  ++g_err_count;
  if (g_err == cudaSuccess) {
    g_err = code;
    g_err_text = text;
  }
  if (std::getenv("RF_SIMT_VERBOSE")) std::fprintf(stderr, "[simt] %s\n", text.c_str());
}

std::string where(const char* file, int line) {
  const char* base = file;
  for (const char* p = file; *p; ++p)
    if (*p == '/') base = p + 1;
  return std::string(base) + ":" + std::to_string(line);
}

// ------------------------------------------------------------------ schedule

std::atomic<int> g_schedule{kScheduleForward};
std::atomic<uint64_t> g_seed{0x9E3779B97F4A7C15ull};
std::atomic<uint64_t> g_launches{0};
std::atomic<int> g_max_grid[3] = {2147483647, 65535, 65535};

}  // namespace

// ------------------------------------------------------------------ threads and the executor

struct ThreadCtx {
  void* sp = nullptr;
  char* stack = nullptr;  // mmap'd, guard page at the low end
  size_t stack_size = 0;
  void* asan_fake = nullptr;
  uint3 tid{0, 0, 0};
  unsigned linear = 0;
  State st = kDone;
  // barrier
  int bar_pred = 0, bar_mode = 0, bar_result = 0;
  const char* bar_file = "";
  int bar_line = 0;
  // warp collective
  WarpOp wop = kSyncWarp;
  unsigned wmask = 0;
  uint64_t wval = 0, wres = 0;
  int warg = 0, wwidth = 32;
  const char* wfile = "";
  int wline = 0;
};

namespace {

struct Executor {
  std::vector<ThreadCtx*> fibers;
  void* sched_sp = nullptr;
  void* sched_fake = nullptr;
  const void* sched_bottom = nullptr;
  size_t sched_size = 0;
  ThreadCtx* cur = nullptr;
  uint3 bidx{0, 0, 0};
  dim3 bdim, gdim;
  void (*body)(void*) = nullptr;
  void* ctx = nullptr;
  std::vector<std::pair<const void*, void*>> shared;
  size_t shared_bytes = 0;
  void* dyn = nullptr;
  size_t dyn_bytes = 0;
  bool shared_reported = false;
  std::string launch_site;
  uint64_t rng = 0;
  std::vector<unsigned> order;
  bool in_kernel = false;
  unsigned n = 0;     // threads of the block running
  int sched = 0;      // its schedule
};

thread_local Executor* tl_exec = nullptr;

Executor& exec() {
  if (!tl_exec) tl_exec = new Executor();  // one per OS thread, kept for the thread's life
  return *tl_exec;
}

void init_fiber_stack(ThreadCtx* t) {
#if SIMT_ASAN
  __asan_unpoison_memory_region(t->stack, t->stack_size);
#endif
  uintptr_t top = reinterpret_cast<uintptr_t>(t->stack + t->stack_size) & ~uintptr_t(15);
  uint64_t* p = reinterpret_cast<uint64_t*>(top);
  *--p = 0;                                                    // padding
  *--p = reinterpret_cast<uint64_t>(&simt_fiber_trampoline);  // ret
  for (int i = 0; i < 6; ++i) *--p = 0;                        // rbp rbx r12 r13 r14 r15
  t->sp = p;
  t->asan_fake = nullptr;
}

ThreadCtx* new_fiber() {
  ThreadCtx* t = new ThreadCtx();
  const size_t page = static_cast<size_t>(sysconf(_SC_PAGESIZE));
  void* m = mmap(nullptr, kStackBytes + page, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE,
                 -1, 0);
  if (m == MAP_FAILED) {
    std::fprintf(stderr, "simt: cannot map a fiber stack\n");
    std::abort();
  }
  mprotect(m, page, PROT_NONE);  // a stack overflow faults instead of corrupting memory
  t->stack = static_cast<char*>(m) + page;
  t->stack_size = kStackBytes;
  init_fiber_stack(t);
  return t;
}

void switch_to(Executor& ex, ThreadCtx* t) {
  ex.cur = t;
  tl_now.cur = t;
  tl_now.tid = t->tid;
#if SIMT_ASAN
  __sanitizer_start_switch_fiber(&ex.sched_fake, t->stack, t->stack_size);
#endif
  simt_ctx_switch(&ex.sched_sp, t->sp);
#if SIMT_ASAN
  __sanitizer_finish_switch_fiber(ex.sched_fake, nullptr, nullptr);
#endif
  ex.cur = nullptr;
  tl_now.cur = nullptr;
}

// From a fiber back to the block's scheduler; returns when this fiber is resumed.
void yield(Executor& ex, ThreadCtx* t) {
#if SIMT_ASAN
  __sanitizer_start_switch_fiber(&t->asan_fake, ex.sched_bottom, ex.sched_size);
#endif
  simt_ctx_switch(&t->sp, ex.sched_sp);
#if SIMT_ASAN
  __sanitizer_finish_switch_fiber(t->asan_fake, nullptr, nullptr);
#endif
}

// From one fiber straight to another of the same warp (no scheduler in between: a warp's
// lanes hand over to each other at every collective, the cheap path of warp-heavy kernels).
void switch_fiber(Executor& ex, ThreadCtx* from, ThreadCtx* to) {
  ex.cur = to;
  tl_now.cur = to;
  tl_now.tid = to->tid;
#if SIMT_ASAN
  __sanitizer_start_switch_fiber(&from->asan_fake, to->stack, to->stack_size);
#endif
  simt_ctx_switch(&from->sp, to->sp);
#if SIMT_ASAN
  __sanitizer_finish_switch_fiber(from->asan_fake, nullptr, nullptr);
#endif
}

ThreadCtx* self(const char* what) {
  ThreadCtx* t = tl_now.cur;
  if (!t) {
    std::fprintf(stderr, "simt: %s called outside a kernel\n", what);
    std::abort();
  }
  return t;
}

std::string thread_name(const Executor& ex, const ThreadCtx* t) {
  char buf[160];
  std::snprintf(buf, sizeof buf, "block (%u,%u,%u) thread (%u,%u,%u)", ex.bidx.x, ex.bidx.y, ex.bidx.z, t->tid.x,
                t->tid.y, t->tid.z);
  return buf;
}

uint64_t next_rand(uint64_t& s) {
  s ^= s << 13;
  s ^= s >> 7;
  s ^= s << 17;
  return s;
}

// ------------------------------------------------------------------ barrier and warp resolution

bool resolve_barrier(Executor& ex, unsigned n) {
  unsigned waiting = 0;
  for (unsigned i = 0; i < n; ++i) {
    const State s = ex.fibers[i]->st;
    if (s == kReady || s == kAtWarp) return false;
    waiting += s == kAtBarrier;
  }
  if (waiting == 0) return false;
  const ThreadCtx* first = nullptr;
  int any = 0, all = 1, count = 0;
  for (unsigned i = 0; i < n; ++i) {
    ThreadCtx* t = ex.fibers[i];
    if (t->st != kAtBarrier) continue;
    if (!first) {
      first = t;
    } else if (t->bar_line != first->bar_line || std::strcmp(t->bar_file, first->bar_file) != 0 ||
               t->bar_mode != first->bar_mode) {
      record_error(cudaErrorLaunchFailure,
                   "simt: divergent __syncthreads in the kernel launched at " + ex.launch_site + ": " +
                       thread_name(ex, first) + " waits at " + where(first->bar_file, first->bar_line) + ", " +
                       thread_name(ex, t) + " at " + where(t->bar_file, t->bar_line));
    }
    any |= t->bar_pred;
    all &= t->bar_pred;
    count += t->bar_pred;
  }
  const int mode = first->bar_mode;
  const int result = mode == 1 ? any : mode == 2 ? all : mode == 3 ? count : 0;
  for (unsigned i = 0; i < n; ++i) {
    ThreadCtx* t = ex.fibers[i];
    if (t->st != kAtBarrier) continue;
    t->bar_result = result;
    t->st = kReady;
  }
  return true;
}

void resolve_group(Executor& ex, unsigned base, unsigned group, unsigned exist) {
  ThreadCtx* lead = nullptr;
  for (unsigned l = 0; l < 32; ++l)
    if (group >> l & 1u) {
      lead = ex.fibers[base + l];
      break;
    }
  for (unsigned l = 0; l < 32; ++l) {
    if (!(group >> l & 1u)) continue;
    const ThreadCtx* t = ex.fibers[base + l];
    if (t->wop != lead->wop || (t->wmask & exist) != (lead->wmask & exist) || t->wwidth != lead->wwidth) {
      record_error(cudaErrorLaunchFailure, "simt: divergent warp collectives in the kernel launched at " +
                                               ex.launch_site + ": " + thread_name(ex, lead) + " at " +
                                               where(lead->wfile, lead->wline) + ", " + thread_name(ex, t) +
                                               " at " + where(t->wfile, t->wline));
      break;
    }
  }
  uint64_t ballot = 0;
  for (unsigned l = 0; l < 32; ++l)
    if ((group >> l & 1u) && ex.fibers[base + l]->wval) ballot |= 1ull << l;
  for (unsigned l = 0; l < 32; ++l) {
    if (!(group >> l & 1u)) continue;
    ThreadCtx* t = ex.fibers[base + l];
    const int w = t->wwidth;
    if (w <= 0 || w > 32 || (w & (w - 1)) != 0) {
      record_error(cudaErrorLaunchFailure, "simt: warp shuffle width " + std::to_string(w) +
                                               " is not a power of 2 in [1, 32] at " + where(t->wfile, t->wline));
    }
    const unsigned seg = l & ~unsigned(w - 1);
    int src = static_cast<int>(l);
    switch (t->wop) {
      case kShflIdx: src = static_cast<int>(seg + (static_cast<unsigned>(t->warg) & unsigned(w - 1))); break;
      case kShflUp:
        if (t->warg >= 0 && (l - seg) >= static_cast<unsigned>(t->warg)) src = static_cast<int>(l) - t->warg;
        break;
      case kShflDown:
        if (t->warg >= 0 && (l - seg) + static_cast<unsigned>(t->warg) < static_cast<unsigned>(w))
          src = static_cast<int>(l) + t->warg;
        break;
      case kShflXor: {
        const int x = static_cast<int>(l ^ static_cast<unsigned>(t->warg & 31));
        if (static_cast<unsigned>(x) / unsigned(w) <= l / unsigned(w)) src = x;
        break;
      }
      default: break;
    }
    switch (t->wop) {
      case kShflIdx:
      case kShflUp:
      case kShflDown:
      case kShflXor:
        if (!(group >> src & 1u)) {
          record_error(cudaErrorLaunchFailure,
                       "simt: warp shuffle at " + where(t->wfile, t->wline) + " in " + thread_name(ex, t) +
                           " reads lane " + std::to_string(src) + ", which is not in the mask or has no thread");
          t->wres = t->wval;
        } else {
          t->wres = ex.fibers[base + src]->wval;
        }
        break;
      case kVoteAll: t->wres = (ballot & group) == group; break;
      case kVoteAny: t->wres = ballot != 0; break;
      case kVoteBallot: t->wres = ballot; break;
      case kSyncWarp: t->wres = 0; break;
    }
  }
  for (unsigned l = 0; l < 32; ++l)
    if (group >> l & 1u) ex.fibers[base + l]->st = kReady;
}

// Resolves the warp collectives of the warp at `base` whose lanes have all arrived.
bool resolve_warp(Executor& ex, unsigned base, unsigned lanes) {
  const unsigned exist = lanes == 32 ? 0xffffffffu : ((1u << lanes) - 1u);
  bool any = false;
  unsigned handled = 0;
  for (unsigned l = 0; l < lanes; ++l) {
    ThreadCtx* t = ex.fibers[base + l];
    if (t->st != kAtWarp || (handled >> l & 1u)) continue;
    unsigned group = t->wmask & exist;
    if (!(group >> l & 1u)) {
      record_error(cudaErrorLaunchFailure, "simt: warp collective at " + where(t->wfile, t->wline) + " in " +
                                               thread_name(ex, t) + ": the calling lane is not in its mask");
      group |= 1u << l;
    }
    bool ready = true;
    for (unsigned j = 0; j < lanes; ++j) {
      if (!(group >> j & 1u)) continue;
      const ThreadCtx* u = ex.fibers[base + j];
      if (u->st == kDone) {
        record_error(cudaErrorLaunchFailure,
                     "simt: warp collective at " + where(t->wfile, t->wline) + " in " + thread_name(ex, t) +
                         ": lane " + std::to_string(j) + " named in its mask has exited");
        group &= ~(1u << j);
      } else if (u->st != kAtWarp) {
        ready = false;
      }
    }
    if (!ready) continue;
    handled |= group;
    resolve_group(ex, base, group, exist);
    any = true;
  }
  return any;
}

// A ready lane of the warp at `base`, in the schedule's order after lane `me` (me < 0: the
// first in that order; a shuffled schedule picks any); nullptr if none.
ThreadCtx* pick_ready(Executor& ex, unsigned base, unsigned lanes, int me) {
  if (ex.sched == kScheduleShuffle) {
    unsigned cand[32], k = 0;
    for (unsigned l = 0; l < lanes; ++l)
      if (ex.fibers[base + l]->st == kReady) cand[k++] = l;
    return k ? ex.fibers[base + cand[next_rand(ex.rng) % k]] : nullptr;
  }
  const bool rev = ex.sched == kScheduleReverse;
  const unsigned start = me < 0 ? (rev ? 0u : lanes - 1) : unsigned(me);  // the lane "before" the first
  for (unsigned i = 1; i <= lanes; ++i) {
    const unsigned l = rev ? (start + lanes - i) % lanes : (start + i) % lanes;
    if (me >= 0 && l == unsigned(me)) break;
    if (ex.fibers[base + l]->st == kReady) return ex.fibers[base + l];
  }
  return nullptr;
}

// t has just blocked (at a barrier or a collective) or finished: hand over to the next ready
// lane of its warp; when there is none, resolve the warp's collective if every lane it names
// waits at one, else go back to the scheduler. Returns when t is ready again (never if done).
void hand_over(Executor& ex, ThreadCtx* t) {
  const unsigned base = t->linear & ~31u;
  for (;;) {
    const unsigned lanes = std::min(32u, ex.n - base);
    if (ThreadCtx* next = pick_ready(ex, base, lanes, int(t->linear - base))) {
      switch_fiber(ex, t, next);
    } else if (t->st == kAtWarp && resolve_warp(ex, base, lanes)) {
      // resolved: t (if its collective was the one) goes on without a switch
    } else {
      yield(ex, t);
    }
    if (t->st == kReady) return;
  }
}

void free_shared(Executor& ex) {
  for (auto& s : ex.shared) std::free(s.second);
  ex.shared.clear();
  std::free(ex.dyn);
  ex.dyn = nullptr;
}

// Runs one block: warp by warp (in the schedule's order), each warp's ready lanes (in the
// schedule's order) until every lane waits at a warp collective, which then resolves and the
// warp goes on, or at the block barrier, or has finished; then the block barrier resolves.
void run_block(Executor& ex, unsigned n) {
  while (ex.fibers.size() < n) ex.fibers.push_back(new_fiber());
  for (unsigned i = 0; i < n; ++i) {
    ThreadCtx* t = ex.fibers[i];
    t->tid = uint3{i % ex.bdim.x, (i / ex.bdim.x) % ex.bdim.y, i / (ex.bdim.x * ex.bdim.y)};
    t->linear = i;
    t->st = kReady;
  }
  ex.shared_bytes = ex.dyn_bytes;
  ex.shared_reported = false;
  ex.dyn = std::malloc(ex.dyn_bytes ? ex.dyn_bytes : 1);
  if (ex.dyn_bytes) std::memset(ex.dyn, 0xFF, ex.dyn_bytes);
  const int sched = g_schedule.load(std::memory_order_relaxed);
  ex.sched = sched;
  ex.n = n;
  const unsigned nwarps = (n + 31) / 32;
  ex.order.resize(nwarps);
  unsigned live = n;
  while (live > 0) {
    bool progress = false;
    for (unsigned w = 0; w < nwarps; ++w) ex.order[w] = sched == kScheduleReverse ? nwarps - 1 - w : w;
    if (sched == kScheduleShuffle)
      for (unsigned i = nwarps; i > 1; --i) std::swap(ex.order[i - 1], ex.order[next_rand(ex.rng) % i]);
    for (unsigned wi = 0; wi < nwarps; ++wi) {
      const unsigned base = 32 * ex.order[wi], lanes = std::min(32u, n - base);
      // Start the warp at a ready lane; its lanes hand over to each other (hand_over) until
      // none is ready, then control comes back here.
      for (;;) {
        if (ThreadCtx* first = pick_ready(ex, base, lanes, -1)) {
          switch_to(ex, first);
          progress = true;
          continue;
        }
        if (!resolve_warp(ex, base, lanes)) break;
        progress = true;
      }
    }
    live = 0;
    for (unsigned i = 0; i < n; ++i) live += ex.fibers[i]->st != kDone;
    if (live == 0) break;
    if (resolve_barrier(ex, n)) continue;
    if (!progress) {
      std::string states;
      for (unsigned i = 0; i < n && states.size() < 600; ++i) {
        const ThreadCtx* t = ex.fibers[i];
        if (t->st == kAtBarrier) states += " " + thread_name(ex, t) + " at __syncthreads " + where(t->bar_file, t->bar_line) + ";";
        if (t->st == kAtWarp) states += " " + thread_name(ex, t) + " at a warp collective " + where(t->wfile, t->wline) + ";";
      }
      record_error(cudaErrorLaunchFailure, "simt: deadlock in the kernel launched at " + ex.launch_site + ":" + states);
      // Abandon the stuck threads: their stacks start afresh.
      for (unsigned i = 0; i < n; ++i) {
        ThreadCtx* t = ex.fibers[i];
        if (t->st != kDone) init_fiber_stack(t);
        t->st = kDone;
      }
      break;
    }
  }
  free_shared(ex);
}

}  // namespace

}  // namespace simt

extern "C" void simt_fiber_entry() {
  simt::Executor& ex = *simt::tl_exec;
  simt::ThreadCtx* t = ex.cur;
#if SIMT_ASAN
  // The first switch into any fiber comes from the scheduler: its stack is the one to go back to.
  const void* bottom = nullptr;
  size_t size = 0;
  __sanitizer_finish_switch_fiber(nullptr, &bottom, &size);
  if (ex.sched_bottom == nullptr) {
    ex.sched_bottom = bottom;
    ex.sched_size = size;
  }
#endif
  for (;;) {
    ex.body(ex.ctx);
    t->st = simt::kDone;
    simt::hand_over(ex, t);  // returns only when the fiber is reused for another thread
  }
}

namespace simt {

int syncthreads(int pred, int mode, const char* file, int line) {
  ThreadCtx* t = self("__syncthreads");
  t->bar_pred = pred;
  t->bar_mode = mode;
  t->bar_file = file;
  t->bar_line = line;
  t->st = kAtBarrier;
  hand_over(*tl_exec, t);
  return t->bar_result;
}

uint64_t warp_op(WarpOp op, unsigned mask, uint64_t value, int arg, int width, const char* file, int line) {
  ThreadCtx* t = self("a warp collective");
  t->wop = op;
  t->wmask = mask;
  t->wval = value;
  t->warg = arg;
  t->wwidth = width;
  t->wfile = file;
  t->wline = line;
  t->st = kAtWarp;
  hand_over(*tl_exec, t);
  return t->wres;
}

void* shared_alloc(const void* tag, size_t bytes, size_t align) {
  self("shared memory");
  Executor& ex = *tl_exec;
  for (const auto& s : ex.shared)
    if (s.first == tag) return s.second;
  // The exact size, so AddressSanitizer guards the first byte past the array.
  void* p = nullptr;
  if (posix_memalign(&p, std::max<size_t>(align, sizeof(void*)), std::max<size_t>(bytes, 1)) != 0) {
    std::fprintf(stderr, "simt: out of memory for shared memory\n");
    std::abort();
  }
  std::memset(p, 0xFF, bytes);
  ex.shared.emplace_back(tag, p);
  ex.shared_bytes += bytes;
  if (ex.shared_bytes > kMaxSharedBytes && !ex.shared_reported) {
    ex.shared_reported = true;
    record_error(cudaErrorLaunchFailure, "simt: the kernel launched at " + ex.launch_site + " uses " +
                                             std::to_string(ex.shared_bytes) +
                                             " bytes of shared memory per block, more than 48 KiB");
  }
  return p;
}

void* dynamic_shared() {
  self("extern __shared__");
  return tl_exec->dyn;
}

void device_assert_fail(const char* cond, const char* msg, const char* file, int line) {
  std::string who = "(host)";
  if (tl_exec && tl_exec->cur) who = thread_name(*tl_exec, tl_exec->cur);
  record_error(cudaErrorAssert, std::string("device-side assertion failed at ") + where(file, line) + " in " + who +
                                    ": " + msg + " (" + cond + ")");
}

void run_grid(const LaunchDim& grid, const LaunchDim& block, size_t shmem, void (*body)(void*), void* ctx) {
  Executor& ex = exec();
  const std::string site = where(grid.loc.file_name(), static_cast<int>(grid.loc.line()));
  if (ex.in_kernel) {
    record_error(cudaErrorLaunchFailure, "simt: a kernel launched from inside a kernel at " + site);
    return;
  }
  const long long gmax[3] = {g_max_grid[0].load(), g_max_grid[1].load(), g_max_grid[2].load()};
  const long long bmax[3] = {1024, 1024, 64};
  for (int i = 0; i < 3; ++i) {
    if (grid.raw[i] < 1 || grid.raw[i] > gmax[i] || block.raw[i] < 1 || block.raw[i] > bmax[i]) {
      record_error(cudaErrorInvalidConfiguration,
                   "simt: invalid configuration argument at " + site + ": grid (" + std::to_string(grid.raw[0]) +
                       ", " + std::to_string(grid.raw[1]) + ", " + std::to_string(grid.raw[2]) + "), block (" +
                       std::to_string(block.raw[0]) + ", " + std::to_string(block.raw[1]) + ", " +
                       std::to_string(block.raw[2]) + ")");
      return;
    }
  }
  const unsigned n = block.d.x * block.d.y * block.d.z;
  if (n > 1024) {
    record_error(cudaErrorInvalidConfiguration,
                 "simt: invalid configuration argument at " + site + ": " + std::to_string(n) + " threads per block");
    return;
  }
  if (shmem > kMaxSharedBytes) {
    record_error(cudaErrorInvalidValue, "simt: the launch at " + site + " asks for " + std::to_string(shmem) +
                                            " bytes of dynamic shared memory, more than 48 KiB");
    return;
  }
  ex.launch_site = site;
  ex.gdim = grid.d;
  ex.bdim = block.d;
  tl_now.gdim = grid.d;
  tl_now.bdim = block.d;
  ex.body = body;
  ex.ctx = ctx;
  ex.dyn_bytes = shmem;
  ex.rng = g_seed.load() ^ (g_launches.fetch_add(1) * 0x9E3779B97F4A7C15ull);
  if (ex.rng == 0) ex.rng = 1;
  ex.in_kernel = true;
  for (unsigned z = 0; z < grid.d.z; ++z)
    for (unsigned y = 0; y < grid.d.y; ++y)
      for (unsigned x = 0; x < grid.d.x; ++x) {
        ex.bidx = uint3{x, y, z};
        tl_now.bidx = ex.bidx;
        run_block(ex, n);
      }
  ex.in_kernel = false;
}

cudaError_t peek_error() {
  std::lock_guard<std::mutex> lock(g_err_mu);
  return g_err;
}

cudaError_t take_error(const char** text) {
  std::lock_guard<std::mutex> lock(g_err_mu);
  static thread_local std::string out;
  const cudaError_t e = g_err;
  out = g_err_text;
  g_err = cudaSuccess;
  g_err_text.clear();
  if (text) *text = out.c_str();
  return e;
}

void set_schedule(int mode, uint64_t seed) {
  g_schedule.store(mode);
  g_seed.store(seed ? seed : 0x9E3779B97F4A7C15ull);
}

int get_schedule() { return g_schedule.load(); }

int max_grid(int dim) { return g_max_grid[dim].load(); }

int set_max_grid(int y, int z) {
  g_max_grid[2].store(z);
  return g_max_grid[1].exchange(y);
}

long error_count() { return g_err_count.load(); }

}  // namespace simt
