#pragma once
// CPU kernels compiled three times, for AVX-512, AVX2 and the baseline ISA, with one picked at
// the first call: the widest the CPU (and OS) supports, or a narrower one named by the
// environment variable RETINA_FAST_CPU_ISA (avx512 | avx2 | baseline), which tests use to run
// every variant on one machine. The hot loops inline into each variant and vectorise there
// for its vector width. AVX-512 was 3.7x faster than AVX2 per thread for the focal loss on the
// dev machine (2.6 vs 9.6 ns/element, forward, one thread), likely because 32 vector registers
// end the register spills seen in the AVX2 variant.
//
//   RF_CPU_DISPATCH(ret, name, (params), (args))
// defines `static ret name(params)` that calls name##_impl(args) compiled for the chosen ISA.
// name##_impl must be defined before, always inlined (HOST_DEVICE_INLINE), and everything it
// calls too, so the whole loop is compiled for each target.
namespace retina_fast {

enum class CpuIsa : int { Baseline = 0, Avx2 = 1, Avx512 = 2 };

// The ISA the CPU kernels run (decided once, at the first call; see above).
CpuIsa cpu_isa();
const char* cpu_isa_name(CpuIsa isa);

template <typename Fn>
inline Fn pick_isa(Fn avx512, Fn avx2, Fn base) {
  switch (cpu_isa()) {
    case CpuIsa::Avx512: return avx512;
    case CpuIsa::Avx2: return avx2;
    default: return base;
  }
}

}  // namespace retina_fast

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define RF_ISA_AVX512 __attribute__((target("avx512f")))
#define RF_ISA_AVX2 __attribute__((target("avx2")))
#else
#define RF_ISA_AVX512
#define RF_ISA_AVX2
#endif

#define RF_CPU_DISPATCH(ret, name, params, args)                                          \
  RF_ISA_AVX512 static ret name##_avx512 params { return name##_impl args; }              \
  RF_ISA_AVX2 static ret name##_avx2 params { return name##_impl args; }                  \
  static ret name##_base params { return name##_impl args; }                              \
  static inline ret name params {                                                         \
    using fn_t = ret(*) params;                                                           \
    static const fn_t fn = ::retina_fast::pick_isa<fn_t>(name##_avx512, name##_avx2,     \
                                                         name##_base);                    \
    return fn args;                                                                       \
  }
