// cuda_emu: cooperative groups' grid group (see cuda_emu.h).
#pragma once
#include "cuda_emu.h"

namespace cooperative_groups {
struct grid_group {
  void sync() const { ::rnnrec_emu::grid_sync(); }
};
inline grid_group this_grid() { return grid_group{}; }
}  // namespace cooperative_groups
