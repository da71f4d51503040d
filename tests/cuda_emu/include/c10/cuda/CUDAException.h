// cuda_emu: CUDA error checks (see ../../cuda_emu.h). As c10's, a failed check also clears the
// runtime's last error before it raises.
#pragma once
#include "../../cuda_emu.h"

#define C10_CUDA_CHECK(EXPR)                                                              \
  do {                                                                                    \
    const cudaError_t rnnrec_emu_err = (EXPR);                                            \
    if (rnnrec_emu_err != cudaSuccess) (void)cudaGetLastError();                          \
    TORCH_CHECK(rnnrec_emu_err == cudaSuccess, "CUDA error (emulated): ",                 \
                cudaGetErrorString(rnnrec_emu_err));                                      \
  } while (0)
#define C10_CUDA_KERNEL_LAUNCH_CHECK() C10_CUDA_CHECK(cudaGetLastError())
