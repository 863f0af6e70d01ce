#pragma once
// RF_TARGET_CLONES: compile a CPU function twice, for AVX2 and for the baseline ISA, and let
// the loader pick the clone for the running CPU (GCC/Clang ifunc). The hot loops inline into
// each clone and vectorise there, so the extension runs AVX2 code where the CPU has it and
// still loads everywhere else.
#if defined(__x86_64__) && defined(__linux__) && (defined(__GNUC__) || defined(__clang__))
#define RF_TARGET_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define RF_TARGET_CLONES
#endif
