// cuda_emu: the CUDA runtime API as far as csrc/rnnrec_cuda.cu uses it (see cuda_emu.h).
#pragma once
#include "cuda_emu.h"
