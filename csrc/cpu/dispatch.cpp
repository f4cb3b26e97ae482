// kernels.h's CPU kernels: each forwards to the instruction-set variant picked at load (isa.h).
#include <atomic>
#include <cstdlib>
#include <cstring>
#include <stdexcept>
#include <string>

#include "../kernels.h"
#include "isa.h"

namespace fwpkm {
namespace {

bool avx2_runs() {
#if defined(FWPKM_HAVE_AVX2) && (defined(__GNUC__) || defined(__clang__))
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
#else
  return false;
#endif
}

// libgcc's (and compiler-rt's) feature bits for AVX-512 are set only when the OS saves the
// registers (XCR0), so a kernel that disables AVX-512 for processes is seen as a CPU without it.
bool avx512_runs() {
#if defined(FWPKM_HAVE_AVX512) && (defined(__GNUC__) || defined(__clang__))
  return avx2_runs() && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
         __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq");
#else
  return false;
#endif
}

// The widest variant the CPU runs, or the one FWPKM_CPU_ISA names (base, avx2, avx512) when this
// build and CPU run it; any other value is ignored (a module that fails to load helps nobody).
int initial_isa() {
  const int widest = avx512_runs() ? kIsaAvx512 : avx2_runs() ? kIsaAvx2 : kIsaBase;
  const char* env = std::getenv("FWPKM_CPU_ISA");
  if (env == nullptr) return widest;
  if (std::strcmp(env, "base") == 0) return kIsaBase;
  if (std::strcmp(env, "avx2") == 0 && avx2_runs()) return kIsaAvx2;
  return widest;
}

std::atomic<int> g_isa{initial_isa()};

}  // namespace

void bad_index(const char* op, const char* name, int64_t value, int64_t R) {
  throw std::invalid_argument(std::string("fwpkm ") + op + ": " + name + " holds " +
                              std::to_string(value) + ", outside [0, " + std::to_string(R) + ")");
}

void bad_row(const char* op, int64_t row, int64_t R) { bad_index(op, "rows", row, R); }

bool cpu_isa_available(int isa) {
  return isa == kIsaBase || (isa == kIsaAvx2 && avx2_runs()) || (isa == kIsaAvx512 && avx512_runs());
}

int cpu_isa() { return g_isa.load(std::memory_order_relaxed); }

int set_cpu_isa(int isa) {
  if (!cpu_isa_available(isa))
    throw std::invalid_argument("fwpkm set_cpu_isa: instruction set " + std::to_string(isa) +
                                " is not available in this build on this CPU");
  return g_isa.exchange(isa);
}

#if defined(FWPKM_HAVE_AVX512)
#define FWPKM_RUN(fn, ...)                                                      \
  (cpu_isa() == kIsaAvx512 ? isa_avx512::fn(__VA_ARGS__)                        \
   : cpu_isa() == kIsaAvx2 ? isa_avx2::fn(__VA_ARGS__)                          \
                           : isa_base::fn(__VA_ARGS__))
#elif defined(FWPKM_HAVE_AVX2)
#define FWPKM_RUN(fn, ...) \
  (cpu_isa() == kIsaAvx2 ? isa_avx2::fn(__VA_ARGS__) : isa_base::fn(__VA_ARGS__))
#else
#define FWPKM_RUN(fn, ...) isa_base::fn(__VA_ARGS__)
#endif

template <typename T>
void topk_select_cpu(const T* dots, const T* qn, const T* kn, int64_t M, int64_t H, int64_t n,
                     int64_t k, int64_t tokens_per_group, int kind, double eps, int64_t* idx,
                     T* score, int64_t* half_idx, T* half_score, const T* x, const T* K, int64_t D,
                     T* pair_s, T* pair_inv, int64_t block) {
  FWPKM_RUN(topk_select_cpu<T>, dots, qn, kn, M, H, n, k, tokens_per_group, kind, eps, idx, score,
            half_idx, half_score, x, K, D, pair_s, pair_inv, block);
}

template <typename T>
void gather_rows_cpu(const T* table, int64_t R, int64_t D, const int64_t* rows, const T* w,
                     int64_t M, int64_t L, T* out, T* saved) {
  FWPKM_RUN(gather_rows_cpu<T>, table, R, D, rows, w, M, L, out, saved);
}

template <typename T>
void gather_dot_cpu(const T* table, int64_t R, int64_t D, const int64_t* rows, const T* x,
                    int64_t M, int64_t L, T* gw) {
  FWPKM_RUN(gather_dot_cpu<T>, table, R, D, rows, x, M, L, gw);
}

template <typename T>
void scatter_rows_cpu(T* table, int64_t R, int64_t D, const int64_t* urows, const int64_t* offsets,
                      int64_t U, const int64_t* order, const T* coef, const T* x, int64_t L,
                      int64_t* nonfinite, T* log, const int64_t* log_id) {
  FWPKM_RUN(scatter_rows_cpu<T>, table, R, D, urows, offsets, U, order, coef, x, L, nonfinite, log,
            log_id);
}

template <typename T>
void read_write_rows_cpu(T* table, int64_t R, int64_t D, const int64_t* rows, const T* w,
                         int64_t M, int64_t L, T* out, const T* y, const T* wt, int64_t keep, T* r,
                         const T* coef, const int64_t* lid, T* log, int64_t* nonfinite) {
  FWPKM_RUN(read_write_rows_cpu<T>, table, R, D, rows, w, M, L, out, y, wt, keep, r, coef, lid, log,
            nonfinite);
}
template <typename T>
void scatter_pairs_cpu(T* table, int64_t R, int64_t D, const int64_t* rows, int64_t M, int64_t L,
                       const T* coef, const T* x) {
  FWPKM_RUN(scatter_pairs_cpu<T>, table, R, D, rows, M, L, coef, x);
}

template <typename T>
void scatter_rows_dense_cpu(T* table, int64_t R, int64_t D, const int64_t* urows,
                            const int64_t* offsets, int64_t U, const int64_t* order, const T* coef,
                            const T* x, int64_t L, const T* src, T* gw) {
  FWPKM_RUN(scatter_rows_dense_cpu<T>, table, R, D, urows, offsets, U, order, coef, x, L, src, gw);
}

template <typename T>
int64_t addr_step_cpu(const T* s, const T* inv, const int64_t* rows, int64_t M, int64_t L,
                      const T* x, const T* K, int64_t R, int64_t D, double rpg, double w,
                      double lr, double eps, T* P, T* u, T* gamma, T* pbar, T* out) {
  return FWPKM_RUN(addr_step_cpu<T>, s, inv, rows, M, L, x, K, R, D, rpg, w, lr, eps, P, u, gamma, pbar,
            out);
}

template <typename T>
void idw_pairs_cpu(const T* table, int64_t R, int64_t D, const int64_t* rows, const T* x,
                   int64_t M, int64_t L, const T* xn, const T* kn, double eps, T* s, T* inv) {
  FWPKM_RUN(idw_pairs_cpu<T>, table, R, D, rows, x, M, L, xn, kn, eps, s, inv);
}

template <typename T>
void read_weights_cpu(const T* s, const int64_t* pos, int64_t M, int64_t H, int64_t k, T* w) {
  FWPKM_RUN(read_weights_cpu<T>, s, pos, M, H, k, w);
}

template <typename T>
void row_norms_cpu(const T* x, int64_t R, int64_t D, T* out) {
  FWPKM_RUN(row_norms_cpu<T>, x, R, D, out);
}

template <typename T>
void addr_vjp_cpu(const T* P, const T* u, const T* gamma, const T* dphi, const T* inv,
                  const int64_t* rows, int64_t M, int64_t L, const T* x, const T* K, const T* lam,
                  int64_t R, int64_t D, double rpg, T* gk, T* gx) {
  FWPKM_RUN(addr_vjp_cpu<T>, P, u, gamma, dphi, inv, rows, M, L, x, K, lam, R, D, rpg, gk, gx);
}

template <typename T>
bool all_within_cpu(const T* x, int64_t n, T lim) {
  return FWPKM_RUN(all_within_cpu<T>, x, n, lim);
}

template <typename T>
void slot_scores_cpu(const T* q, const T* K, const int64_t* idx, int64_t M, int64_t H, int64_t n,
                     int64_t D, int64_t k, int64_t tokens_per_group, T* s) {
  FWPKM_RUN(slot_scores_cpu<T>, q, K, idx, M, H, n, D, k, tokens_per_group, s);
}

#undef FWPKM_RUN

#define FWPKM_INSTANTIATE(T) FWPKM_CPU_KERNEL_INSTANTIATIONS(T)
FWPKM_INSTANTIATE(float)
FWPKM_INSTANTIATE(double)
#undef FWPKM_INSTANTIATE

}  // namespace fwpkm
