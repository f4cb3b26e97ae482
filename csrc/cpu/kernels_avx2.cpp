// The CPU kernels compiled for AVX2 + FMA (CMake adds -mavx2 -mfma to this file only), into
// fwpkm::isa_avx2; dispatch.cpp runs them on CPUs that have both (see isa.h).
#define FWPKM_CPU_ISA isa_avx2
#include "kernels.cpp"
