// The CPU kernels compiled for AVX-512 (F, BW, VL, DQ) + FMA, 512-bit vectors preferred (CMake adds
// the flags to this file only), into fwpkm::isa_avx512; dispatch.cpp runs them on CPUs that have
// all of these (see isa.h).
#define FWPKM_CPU_ISA isa_avx512
#include "kernels.cpp"
