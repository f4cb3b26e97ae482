// The CPU kernels of ../kernels.h, once per instruction set they are compiled for.
//
// kernels.cpp is built up to three times: as is into fwpkm::isa_base (the compiler's default
// target, e.g. x86-64 with SSE2 only, which any CPU of the architecture runs); by
// kernels_avx2.cpp with -mavx2 -mfma into fwpkm::isa_avx2; and by kernels_avx512.cpp with AVX-512
// F/BW/VL/DQ + FMA and 512-bit vectors into fwpkm::isa_avx512 (x86-64 builds whose compiler takes
// the flags). dispatch.cpp defines kernels.h's fwpkm::*_cpu by forwarding to the one picked when
// the module loads: the widest the CPU (and its OS) runs, unless FWPKM_CPU_ISA names another. A
// wheel built on one machine so runs everywhere, at the speed of the machine it runs on.
//
// Each variant is deterministic (fixed summation orders, one writer per output). Base and the
// others round differently where AVX2 and AVX-512 contract a * b + c into one FMA (one rounding
// instead of two); wider registers change no order, since the kernels fix theirs (AVX2 and
// AVX-512 have given the same bits so far, which nothing promises). Results are bit-identical
// across runs and thread counts with one variant, not across variants.
#pragma once
#include <cstdint>

#define FWPKM_CPU_KERNEL_DECLS                                                                       \
  template <typename T>                                                                              \
  void topk_select_cpu(const T* dots, const T* qn, const T* kn, int64_t M, int64_t H, int64_t n,     \
                       int64_t k, int64_t tokens_per_group, int kind, double eps, int64_t* idx,     \
                       T* score, int64_t* half_idx, T* half_score, const T* x, const T* K,         \
                       int64_t D, T* pair_s, T* pair_inv, int64_t block);                           \
  template <typename T>                                                                              \
  void gather_rows_cpu(const T* table, int64_t R, int64_t D, const int64_t* rows, const T* w,       \
                       int64_t M, int64_t L, T* out, T* saved);                                      \
  template <typename T>                                                                              \
  void gather_dot_cpu(const T* table, int64_t R, int64_t D, const int64_t* rows, const T* x,        \
                      int64_t M, int64_t L, T* gw);                                                  \
  template <typename T>                                                                              \
  void scatter_rows_cpu(T* table, int64_t R, int64_t D, const int64_t* urows,                       \
                        const int64_t* offsets, int64_t U, const int64_t* order, const T* coef,     \
                        const T* x, int64_t L, int64_t* nonfinite, T* log, const int64_t* log_id);   \
  template <typename T>                                                                              \
  void read_write_rows_cpu(T* table, int64_t R, int64_t D, const int64_t* rows, const T* w,         \
                           int64_t M, int64_t L, T* out, const T* y, const T* wt, int64_t keep,     \
                           T* r, const T* coef, const int64_t* lid, T* log, int64_t* nonfinite);    \
  template <typename T>                                                                              \
  void scatter_pairs_cpu(T* table, int64_t R, int64_t D, const int64_t* rows, int64_t M, int64_t L, \
                         const T* coef, const T* x);                                                 \
  template <typename T>                                                                              \
  void scatter_rows_dense_cpu(T* table, int64_t R, int64_t D, const int64_t* urows,                 \
                              const int64_t* offsets, int64_t U, const int64_t* order,              \
                              const T* coef, const T* x, int64_t L, const T* src, T* gw);            \
  template <typename T>                                                                              \
  void idw_pairs_cpu(const T* table, int64_t R, int64_t D, const int64_t* rows, const T* x,         \
                     int64_t M, int64_t L, const T* xn, const T* kn, double eps, T* s, T* inv);     \
  template <typename T>                                                                              \
  int64_t addr_step_cpu(const T* s, const T* inv, const int64_t* rows, int64_t M, int64_t L,        \
                        const T* x, const T* K, int64_t R, int64_t D, double rpg, double w,         \
                        double lr, double eps, T* P, T* u, T* gamma, T* pbar, T* out);       \
  template <typename T>                                                                              \
  void read_weights_cpu(const T* s, const int64_t* pos, int64_t M, int64_t H, int64_t k, T* w);     \
  template <typename T>                                                                              \
  void addr_vjp_cpu(const T* P, const T* u, const T* gamma, const T* dphi, const T* inv,            \
                    const int64_t* rows, int64_t M, int64_t L, const T* x, const T* K,              \
                    const T* lam, int64_t R, int64_t D, double rpg, T* gk, T* gx);                   \
  template <typename T>                                                                              \
  void row_norms_cpu(const T* x, int64_t R, int64_t D, T* out);                                    \
  template <typename T>                                                                              \
  bool all_within_cpu(const T* x, int64_t n, T lim);                                                 \
  template <typename T>                                                                              \
  void slot_scores_cpu(const T* q, const T* K, const int64_t* idx, int64_t M, int64_t H, int64_t n, \
                       int64_t D, int64_t k, int64_t tokens_per_group, T* s);

// The explicit instantiations (T = float, double) of those kernels, in whichever namespace the
// macro is used: each variant's (kernels.cpp) and the dispatching ones (dispatch.cpp).
#define FWPKM_CPU_KERNEL_INSTANTIATIONS(T)                                                                    \
  template void topk_select_cpu<T>(const T*, const T*, const T*, int64_t, int64_t, int64_t,      \
                                   int64_t, int64_t, int, double, int64_t*, T*, int64_t*, T*,    \
                                   const T*, const T*, int64_t, T*, T*, int64_t);                \
  template void gather_rows_cpu<T>(const T*, int64_t, int64_t, const int64_t*, const T*,         \
                                   int64_t, int64_t, T*, T*);                                    \
  template void gather_dot_cpu<T>(const T*, int64_t, int64_t, const int64_t*, const T*, int64_t, \
                                  int64_t, T*);                                                  \
  template void scatter_rows_cpu<T>(T*, int64_t, int64_t, const int64_t*, const int64_t*,        \
                                    int64_t, const int64_t*, const T*, const T*, int64_t,        \
                                    int64_t*, T*, const int64_t*);                               \
  template void read_write_rows_cpu<T>(T*, int64_t, int64_t, const int64_t*, const T*, int64_t,  \
                                       int64_t, T*, const T*, const T*, int64_t, T*, const T*,   \
                                       const int64_t*, T*, int64_t*);                            \
  template void scatter_pairs_cpu<T>(T*, int64_t, int64_t, const int64_t*, int64_t, int64_t,       \
                                     const T*, const T*);                                        \
  template void idw_pairs_cpu<T>(const T*, int64_t, int64_t, const int64_t*, const T*, int64_t,  \
                                 int64_t, const T*, const T*, double, T*, T*);                   \
  template void scatter_rows_dense_cpu<T>(T*, int64_t, int64_t, const int64_t*, const int64_t*,  \
                                          int64_t, const int64_t*, const T*, const T*, int64_t,  \
                                          const T*, T*);                                         \
  template int64_t addr_step_cpu<T>(const T*, const T*, const int64_t*, int64_t, int64_t,      \
                                    const T*, const T*, int64_t, int64_t, double, double, double, \
                                    double, T*, T*, T*, T*, T*);                  \
  template void read_weights_cpu<T>(const T*, const int64_t*, int64_t, int64_t, int64_t, T*);     \
  template void row_norms_cpu<T>(const T*, int64_t, int64_t, T*);                              \
  template void addr_vjp_cpu<T>(const T*, const T*, const T*, const T*, const T*, const int64_t*, \
                                int64_t, int64_t, const T*, const T*, const T*, int64_t, int64_t, \
                                double, T*, T*);                                                 \
  template bool all_within_cpu<T>(const T*, int64_t, T);                                         \
  template void slot_scores_cpu<T>(const T*, const T*, const int64_t*, int64_t, int64_t, int64_t, \
                                   int64_t, int64_t, int64_t, T*);

namespace fwpkm {
namespace isa_base {
FWPKM_CPU_KERNEL_DECLS
}  // namespace isa_base
namespace isa_avx2 {
FWPKM_CPU_KERNEL_DECLS
}  // namespace isa_avx2
namespace isa_avx512 {
FWPKM_CPU_KERNEL_DECLS
}  // namespace isa_avx512

enum CpuIsa : int { kIsaBase = 0, kIsaAvx2 = 1, kIsaAvx512 = 2 };
constexpr int kIsaCount = 3;

// Throws std::invalid_argument("fwpkm <op>: rows holds <row>, outside [0, R)"). Defined in
// dispatch.cpp, so that no variant builds strings itself (see kernels.cpp: no standard template
// may be shared between the variants).
[[noreturn]] void bad_row(const char* op, int64_t row, int64_t R);
// The same for index array `name`: "fwpkm <op>: <name> holds <value>, outside [0, R)".
[[noreturn]] void bad_index(const char* op, const char* name, int64_t value, int64_t R);

// Whether this build holds the variant and this CPU runs it.
bool cpu_isa_available(int isa);
// The variant the CPU kernels run now.
int cpu_isa();
// Run `isa` from now on (tests compare the variants); returns the previous one. A variant that
// is not available throws std::invalid_argument. Not meant to be called while kernels run.
int set_cpu_isa(int isa);
}  // namespace fwpkm
