// rnnrec_avx2.cpp built into librnnrec_fast_ops.so, the op without Python (setup.py; see rnnrec_cpu.cpp)
#define RNNREC_STANDALONE 1
#include "../rnnrec_avx2.cpp"
