#pragma once
// Force-included (-include simt/prelude.h) before each .cu file of the project in the simt
// build: torch's headers first (so no CUDA stand-in macro reaches them), then the device side
// of the emulator, then TORCH_LIBRARY_IMPL(ns, CUDA, m) turned into a registration of the same
// kernels as the emulated device's (simt_registry.h).
#include <ATen/ATen.h>
#include <torch/library.h>

#include "simt/simt.h"
#include "simt/simt_registry.h"

#undef TORCH_LIBRARY_IMPL
#define TORCH_LIBRARY_IMPL(ns, k, m) RF_SIMT_LIBRARY_IMPL(m)
