// cuda_emu: the current stream and device properties (see ../../cuda_emu.h).
#pragma once
#include "../../cuda_emu.h"

namespace at::cuda {
struct EmulatedStream {
  operator cudaStream_t() const { return nullptr; }
};
inline EmulatedStream getCurrentCUDAStream(c10::DeviceIndex = -1) { return {}; }
inline cudaDeviceProp* getCurrentDeviceProperties() { return ::rnnrec_emu::device_props(); }
}  // namespace at::cuda
