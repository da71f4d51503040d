// cuda_emu: the device guard (one emulated device; see ../../cuda_emu.h).
#pragma once
#include "../../cuda_emu.h"

namespace c10::cuda {
struct CUDAGuard {
  explicit CUDAGuard(c10::Device) {}
};
}  // namespace c10::cuda
