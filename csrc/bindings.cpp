// pybind11 entry points of fwpkm_ext._C. Arguments are raw addresses (tensor.data_ptr()), sizes
// and, for CUDA, the address of the stream; Python (fwpkm_ext/_native.py) checks shapes, dtypes
// and devices before calling, and owns every buffer.
#include <pybind11/pybind11.h>

#include <cstdint>
#include <stdexcept>
#include <string>

#include "kernels.h"
#include "cpu/isa.h"
#ifdef FWPKM_WITH_CUDA
#include "cuda/extra.h"  // scatter_rows_atomic_cuda (CUDA only, not in the shared contract)
#endif

namespace py = pybind11;
using fwpkm::ScoreKind;

namespace {

enum DType : int { kF32 = 0, kF64 = 1 };

template <typename T>
T* P(std::uintptr_t a) {
  return reinterpret_cast<T*>(a);
}

void check_dtype(int dtype, const char* op) {
  if (dtype != kF32 && dtype != kF64)
    throw std::invalid_argument(std::string("fwpkm ") + op + ": dtype code must be 0 (float32) or 1 (float64)");
}

bool is_cuda(const std::string& device, const char* op) {
  if (device == "cpu") return false;
  if (device == "cuda") {
#ifdef FWPKM_WITH_CUDA
    return true;
#else
    throw std::invalid_argument(std::string("fwpkm ") + op +
                                ": this build of fwpkm_ext has no CUDA kernels (see fwpkm_ext.build_info())");
#endif
  }
  throw std::invalid_argument(std::string("fwpkm ") + op + ": unknown device '" + device + "'");
}

#define FWPKM_DISPATCH(DTYPE, OP, ...)             \
  if ((DTYPE) == kF32) {                          \
    using T = float;                              \
    __VA_ARGS__;                                  \
  } else {                                        \
    using T = double;                             \
    __VA_ARGS__;                                  \
  }

void topk_select(const std::string& device, int dtype, std::uintptr_t dots, std::uintptr_t qn,
                 std::uintptr_t kn, int64_t M, int64_t H, int64_t n, int64_t k,
                 int64_t tokens_per_group, int kind, double eps, std::uintptr_t idx,
                 std::uintptr_t score, std::uintptr_t half_idx, std::uintptr_t half_score,
                 std::uintptr_t stream, int64_t block) {
  check_dtype(dtype, "topk_select");
  (void)stream;  // used by CUDA builds only
  if (kind != fwpkm::kIDW && kind != fwpkm::kDot)
    throw std::invalid_argument("fwpkm topk_select: kind must be 0 (idw) or 1 (dot)");
  if (k < 1 || k > n) throw std::invalid_argument("fwpkm topk_select: need 1 <= k <= n");
  if (tokens_per_group < 1) throw std::invalid_argument("fwpkm topk_select: tokens_per_group < 1");
  const bool cuda = is_cuda(device, "topk_select");
  if (block < 0 || (block > 0 && (cuda || M % block != 0)))
    throw std::invalid_argument("fwpkm topk_select: block must be 0, or (CPU) divide M");
  if (M == 0) return;
  py::gil_scoped_release nogil;
  FWPKM_DISPATCH(dtype, "topk_select", {
    if (cuda) {
#ifdef FWPKM_WITH_CUDA
      fwpkm::topk_select_cuda<T>(P<const T>(dots), P<const T>(qn), P<const T>(kn), M, H, n, k,
                                 tokens_per_group, kind, eps, P<int64_t>(idx), P<T>(score),
                                 P<int64_t>(half_idx), P<T>(half_score), reinterpret_cast<void*>(stream));
#endif
    } else {
      fwpkm::topk_select_cpu<T>(P<const T>(dots), P<const T>(qn), P<const T>(kn), M, H, n, k,
                                tokens_per_group, kind, eps, P<int64_t>(idx), P<T>(score),
                                P<int64_t>(half_idx), P<T>(half_score), nullptr, nullptr, 0,
                                nullptr, nullptr, block);
    }
  })
}

void gather_rows(const std::string& device, int dtype, std::uintptr_t table, int64_t R, int64_t D,
                 std::uintptr_t rows, std::uintptr_t w, int64_t M, int64_t L, std::uintptr_t out,
                 std::uintptr_t saved, std::uintptr_t stream) {
  check_dtype(dtype, "gather_rows");
  (void)stream;  // used by CUDA builds only
  const bool cuda = is_cuda(device, "gather_rows");
  if (M == 0) return;
  py::gil_scoped_release nogil;
  FWPKM_DISPATCH(dtype, "gather_rows", {
    if (cuda) {
#ifdef FWPKM_WITH_CUDA
      fwpkm::gather_rows_cuda<T>(P<const T>(table), R, D, P<const int64_t>(rows), P<const T>(w), M,
                                 L, P<T>(out), P<T>(saved), reinterpret_cast<void*>(stream));
#endif
    } else {
      fwpkm::gather_rows_cpu<T>(P<const T>(table), R, D, P<const int64_t>(rows), P<const T>(w), M, L,
                                P<T>(out), P<T>(saved));
    }
  })
}

void gather_dot(const std::string& device, int dtype, std::uintptr_t table, int64_t R, int64_t D,
                std::uintptr_t rows, std::uintptr_t x, int64_t M, int64_t L, std::uintptr_t gw,
                std::uintptr_t stream) {
  check_dtype(dtype, "gather_dot");
  (void)stream;  // used by CUDA builds only
  const bool cuda = is_cuda(device, "gather_dot");
  if (M == 0) return;
  py::gil_scoped_release nogil;
  FWPKM_DISPATCH(dtype, "gather_dot", {
    if (cuda) {
#ifdef FWPKM_WITH_CUDA
      fwpkm::gather_dot_cuda<T>(P<const T>(table), R, D, P<const int64_t>(rows), P<const T>(x), M, L,
                                P<T>(gw), reinterpret_cast<void*>(stream));
#endif
    } else {
      fwpkm::gather_dot_cpu<T>(P<const T>(table), R, D, P<const int64_t>(rows), P<const T>(x), M, L,
                               P<T>(gw));
    }
  })
}

void scatter_rows(const std::string& device, int dtype, std::uintptr_t table, int64_t R, int64_t D,
                  std::uintptr_t urows, std::uintptr_t offsets, int64_t U, std::uintptr_t order,
                  std::uintptr_t coef, std::uintptr_t x, int64_t L, std::uintptr_t stream,
                  std::uintptr_t nonfinite) {
  check_dtype(dtype, "scatter_rows");
  (void)stream;  // used by CUDA builds only
  const bool cuda = is_cuda(device, "scatter_rows");
  if (cuda && nonfinite)
    throw std::invalid_argument("fwpkm scatter_rows: the non-finite row count is CPU only");
  if (U == 0) return;
  py::gil_scoped_release nogil;
  FWPKM_DISPATCH(dtype, "scatter_rows", {
    if (cuda) {
#ifdef FWPKM_WITH_CUDA
      fwpkm::scatter_rows_cuda<T>(P<T>(table), R, D, P<const int64_t>(urows),
                                  P<const int64_t>(offsets), U, P<const int64_t>(order),
                                  P<const T>(coef), P<const T>(x), L, reinterpret_cast<void*>(stream));
#endif
    } else {
      fwpkm::scatter_rows_cpu<T>(P<T>(table), R, D, P<const int64_t>(urows), P<const int64_t>(offsets),
                                 U, P<const int64_t>(order), P<const T>(coef), P<const T>(x), L,
                                 P<int64_t>(nonfinite));
    }
  })
}

// CPU only: scatter_rows into a whole dense table, every row written once (see kernels.h).
void scatter_rows_dense(int dtype, std::uintptr_t table, int64_t R, int64_t D, std::uintptr_t urows,
                        std::uintptr_t offsets, int64_t U, std::uintptr_t order, std::uintptr_t coef,
                        std::uintptr_t x, int64_t L, std::uintptr_t src, std::uintptr_t gw) {
  check_dtype(dtype, "scatter_rows_dense");
  if (R == 0 || D == 0) return;
  py::gil_scoped_release nogil;
  FWPKM_DISPATCH(dtype, "scatter_rows_dense", {
    fwpkm::scatter_rows_dense_cpu<T>(P<T>(table), R, D, P<const int64_t>(urows),
                                     P<const int64_t>(offsets), U, P<const int64_t>(order),
                                     P<const T>(coef), P<const T>(x), L, P<const T>(src), P<T>(gw));
  })
}

// Non-deterministic variant of scatter_rows (same arguments and contract): on CUDA, one warp per
// pair with atomicAdd (csrc/cuda/extra.h); the summation order, hence the rounding, changes from
// run to run. There is no atomic CPU kernel: device "cpu" runs the deterministic CPU kernel.
void scatter_rows_atomic(const std::string& device, int dtype, std::uintptr_t table, int64_t R,
                         int64_t D, std::uintptr_t urows, std::uintptr_t offsets, int64_t U,
                         std::uintptr_t order, std::uintptr_t coef, std::uintptr_t x, int64_t L,
                         std::uintptr_t stream) {
  check_dtype(dtype, "scatter_rows_atomic");
  (void)stream;  // used by CUDA builds only
  const bool cuda = is_cuda(device, "scatter_rows_atomic");
  if (U == 0) return;
  py::gil_scoped_release nogil;
  FWPKM_DISPATCH(dtype, "scatter_rows_atomic", {
    if (cuda) {
#ifdef FWPKM_WITH_CUDA
      fwpkm::scatter_rows_atomic_cuda<T>(P<T>(table), R, D, P<const int64_t>(urows),
                                         P<const int64_t>(offsets), U, P<const int64_t>(order),
                                         P<const T>(coef), P<const T>(x), L,
                                         reinterpret_cast<void*>(stream));
#endif
    } else {
      fwpkm::scatter_rows_cpu<T>(P<T>(table), R, D, P<const int64_t>(urows), P<const int64_t>(offsets),
                                 U, P<const int64_t>(order), P<const T>(coef), P<const T>(x), L);
    }
  })
}

// CPU only: scatter_rows in place with its undo log (kernels.h: map_rows without the copy, then
// scatter_rows copying each row it writes for the first time into the log). Returns the new U.
// Every refusal (a row outside the table, more rows than the log holds) comes from map_rows,
// before anything is written; the map is then as it was.
int64_t scatter_rows_logged(int dtype, std::uintptr_t table, int64_t R, int64_t D,
                            std::uintptr_t urows, std::uintptr_t offsets, int64_t U,
                            std::uintptr_t order, std::uintptr_t coef, std::uintptr_t x, int64_t L,
                            std::uintptr_t nonfinite, std::uintptr_t slot, std::uintptr_t touched,
                            int64_t used, int64_t cap, std::uintptr_t log, std::uintptr_t ids) {
  check_dtype(dtype, "scatter_rows_logged");
  if (U == 0) return used;
  py::gil_scoped_release nogil;
  int64_t out = used;
  FWPKM_DISPATCH(dtype, "scatter_rows_logged", {
    fwpkm::scatter_rows_logged_cpu<T>(P<T>(table), R, D, P<const int64_t>(urows),
                                      P<const int64_t>(offsets), U, P<const int64_t>(order),
                                      P<const T>(coef), P<const T>(x), L, P<int64_t>(nonfinite),
                                      P<int64_t>(slot), P<int64_t>(touched), &out, cap, P<T>(log),
                                      P<int64_t>(ids));
  })
  return out;
}

// CPU only: the addressing loss' terms and key step of one window (see kernels.h).
int64_t addr_step(int dtype, std::uintptr_t s, std::uintptr_t inv, std::uintptr_t rows, int64_t M,
               int64_t L, std::uintptr_t x, std::uintptr_t K, int64_t R, int64_t D, double rpg,
               double w, double lr, double eps, std::uintptr_t prob, std::uintptr_t u,
               std::uintptr_t gamma, std::uintptr_t pbar, std::uintptr_t out) {
  check_dtype(dtype, "addr_step");
  py::gil_scoped_release nogil;
  int64_t bad = 0;
  FWPKM_DISPATCH(dtype, "addr_step", {
    bad = fwpkm::addr_step_cpu<T>(P<const T>(s), inv ? P<const T>(inv) : nullptr, P<const int64_t>(rows),
                            M, L, P<const T>(x), P<const T>(K), R, D, rpg, w, lr, eps, P<T>(prob),
                            P<T>(u), P<T>(gamma), P<T>(pbar), out ? P<T>(out) : nullptr);
  })
  return bad;
}

// CPU only: the addressing loss' second-order term (see kernels.h).
void addr_vjp(int dtype, std::uintptr_t prob, std::uintptr_t u, std::uintptr_t gamma,
              std::uintptr_t dphi, std::uintptr_t inv, std::uintptr_t rows, int64_t M, int64_t L,
              std::uintptr_t x, std::uintptr_t K, std::uintptr_t lam, int64_t R, int64_t D,
              double rpg, std::uintptr_t gk, std::uintptr_t gx) {
  check_dtype(dtype, "addr_vjp");
  py::gil_scoped_release nogil;
  FWPKM_DISPATCH(dtype, "addr_vjp", {
    fwpkm::addr_vjp_cpu<T>(P<const T>(prob), P<const T>(u), P<const T>(gamma), P<const T>(dphi),
                           inv ? P<const T>(inv) : nullptr, P<const int64_t>(rows), M, L,
                           P<const T>(x), P<const T>(K), P<const T>(lam), R, D, rpg, P<T>(gk),
                           P<T>(gx));
  })
}

// CPU only: the read weights (see kernels.h).
void read_weights(int dtype, std::uintptr_t s, std::uintptr_t pos, int64_t M, int64_t H, int64_t k,
                  std::uintptr_t w) {
  check_dtype(dtype, "read_weights");
  if (M * H * k == 0) return;
  py::gil_scoped_release nogil;
  FWPKM_DISPATCH(dtype, "read_weights", {
    fwpkm::read_weights_cpu<T>(P<const T>(s), P<const int64_t>(pos), M, H, k, P<T>(w));
  })
}

// CPU only: squared row norms (see kernels.h).
void row_norms(int dtype, std::uintptr_t x, int64_t R, int64_t D, std::uintptr_t out) {
  check_dtype(dtype, "row_norms");
  if (R == 0) return;
  py::gil_scoped_release nogil;
  FWPKM_DISPATCH(dtype, "row_norms", { fwpkm::row_norms_cpu<T>(P<const T>(x), R, D, P<T>(out)); })
}

bool all_within(int dtype, std::uintptr_t x, int64_t n, double lim) {
  check_dtype(dtype, "all_within");
  py::gil_scoped_release nogil;
  bool ok = true;
  FWPKM_DISPATCH(dtype, "all_within", { ok = fwpkm::all_within_cpu<T>(P<const T>(x), n, static_cast<T>(lim)); })
  return ok;
}

void slot_scores(int dtype, std::uintptr_t q, std::uintptr_t K, std::uintptr_t idx, int64_t M,
                 int64_t H, int64_t n, int64_t D, int64_t k, int64_t tokens_per_group,
                 std::uintptr_t s) {
  check_dtype(dtype, "slot_scores");
  if (M * H * k == 0) return;
  py::gil_scoped_release nogil;
  FWPKM_DISPATCH(dtype, "slot_scores", {
    fwpkm::slot_scores_cpu<T>(P<const T>(q), P<const T>(K), P<const int64_t>(idx), M, H, n, D, k,
                              tokens_per_group, P<T>(s));
  })
}

// CPU only: one whole window of an in-place streaming call (see kernels.h, WindowStep). The
// arguments come by name in a dict (fwpkm_ext/_native.py window_step builds and checks it):
// addresses, sizes and the window's scalars.
int64_t window_step(int dtype, const py::dict& d) {
  check_dtype(dtype, "window_step");
  auto addr = [&](const char* key) { return d[key].cast<std::uintptr_t>(); };
  auto num = [&](const char* key) { return d[key].cast<int64_t>(); };
  auto real = [&](const char* key) { return d[key].cast<double>(); };
  int64_t bad = 0;
  FWPKM_DISPATCH(dtype, "window_step", {
    fwpkm::WindowStep<T> a{};
    a.dots = P<const T>(addr("dots"));
    a.K = P<const T>(addr("K"));
    a.x = P<const T>(addr("x"));
    a.v = P<const T>(addr("v"));
    a.g = P<const T>(addr("g"));
    a.mask = P<const T>(addr("mask"));
    a.B = num("B"); a.L = num("L"); a.Tt = num("Tt"); a.H = num("H"); a.n = num("n");
    a.k = num("k"); a.S = num("S"); a.d2 = num("d2"); a.dv = num("dv"); a.la = num("la");
    a.kind = int(num("kind"));
    a.eps = real("eps"); a.lr = real("lr"); a.addr_w = real("addr_w"); a.ent_eps = real("ent_eps");
    a.idx = P<int64_t>(addr("idx"));
    a.half = P<int64_t>(addr("half"));
    a.w = P<T>(addr("w"));
    a.vhat = P<T>(addr("vhat"));
    a.V = P<T>(addr("V"));
    a.new_keys = P<T>(addr("new_keys"));
    a.slot = P<int64_t>(addr("slot"));
    a.touched = P<int64_t>(addr("touched"));
    a.used = P<int64_t>(addr("used"));
    a.cap = num("cap");
    a.log = P<T>(addr("log"));
    a.nonfinite = P<int64_t>(addr("nonfinite"));
    a.work = reinterpret_cast<void*>(addr("work"));
    py::gil_scoped_release nogil;
    bad = fwpkm::window_step_cpu<T>(a);
  })
  return bad;
}

// CPU only: IDW pair scores and 1 / (eps + distance) (see kernels.h).
void idw_pairs(int dtype, std::uintptr_t table, int64_t R, int64_t D, std::uintptr_t rows,
               std::uintptr_t x, int64_t M, int64_t L, std::uintptr_t xn, std::uintptr_t kn,
               double eps, std::uintptr_t s, std::uintptr_t inv) {
  check_dtype(dtype, "idw_pairs");
  if (M * L == 0) return;
  py::gil_scoped_release nogil;
  FWPKM_DISPATCH(dtype, "idw_pairs", {
    fwpkm::idw_pairs_cpu<T>(P<const T>(table), R, D, P<const int64_t>(rows), P<const T>(x), M, L,
                            P<const T>(xn), P<const T>(kn), eps, P<T>(s), P<T>(inv));
  })
}

// CPU only: the value write's pair coefficients (see kernels.h).
void segment_coefs(int dtype, std::uintptr_t offsets, int64_t U, std::uintptr_t order,
                   std::uintptr_t w, double scale, int64_t Q, std::uintptr_t coef) {
  check_dtype(dtype, "segment_coefs");
  py::gil_scoped_release nogil;
  FWPKM_DISPATCH(dtype, "segment_coefs", {
    fwpkm::segment_coefs_cpu<T>(P<const int64_t>(offsets), U, P<const int64_t>(order), P<const T>(w),
                                scale, Q, P<T>(coef));
  })
}

// CPU only: the unsorted pair update of a small table (see kernels.h).
void scatter_pairs(int dtype, std::uintptr_t table, int64_t R, int64_t D, std::uintptr_t rows,
                   int64_t M, int64_t L, std::uintptr_t coef, std::uintptr_t x) {
  check_dtype(dtype, "scatter_pairs");
  if (M * L == 0 || D == 0) return;
  py::gil_scoped_release nogil;
  FWPKM_DISPATCH(dtype, "scatter_pairs", {
    fwpkm::scatter_pairs_cpu<T>(P<T>(table), R, D, P<const int64_t>(rows), M, L, P<const T>(coef),
                                P<const T>(x));
  })
}

// CPU only: rows/pairs/order/urows/offsets/work are int64 host buffers (see kernels.h).
int64_t segment_rows(std::uintptr_t rows, std::uintptr_t pairs, int64_t Q, int64_t R,
                     std::uintptr_t order, std::uintptr_t urows, std::uintptr_t offsets,
                     std::uintptr_t work) {
  py::gil_scoped_release nogil;
  return fwpkm::segment_rows_cpu(P<const int64_t>(rows), pairs ? P<const int64_t>(pairs) : nullptr,
                                 Q, R, P<int64_t>(order), P<int64_t>(urows), P<int64_t>(offsets),
                                 P<int64_t>(work));
}

// CPU only: idx/half/pos are int64 host buffers (see kernels.h).
void read_positions(std::uintptr_t idx, std::uintptr_t half, int64_t G, int64_t k, int64_t n,
                    std::uintptr_t pos) {
  py::gil_scoped_release nogil;
  fwpkm::read_positions_cpu(P<const int64_t>(idx), P<const int64_t>(half), G, k, n, P<int64_t>(pos));
}

// CPU only: slot/rows/cid/touched int64 and table/compact float host buffers (see kernels.h).
int64_t map_rows(int dtype, std::uintptr_t slot, int64_t R, std::uintptr_t rows, int64_t Q,
                 std::uintptr_t cid, std::uintptr_t touched, int64_t U, int64_t cap,
                 std::uintptr_t table, std::uintptr_t compact, int64_t D) {
  check_dtype(dtype, "map_rows");
  py::gil_scoped_release nogil;
  int64_t out = 0;
  FWPKM_DISPATCH(dtype, "map_rows", {
    out = fwpkm::map_rows_cpu<T>(P<int64_t>(slot), R, P<const int64_t>(rows), Q, P<int64_t>(cid),
                                 P<int64_t>(touched), U, cap, P<const T>(table), P<T>(compact), D);
  })
  return out;
}

// The instruction-set variant of the CPU kernels (csrc/cpu/isa.h), by name.
const char* const kIsaNames[fwpkm::kIsaCount] = {"base", "avx2", "avx512"};

int isa_code(const std::string& name) {
  for (int i = 0; i < fwpkm::kIsaCount; ++i)
    if (name == kIsaNames[i]) return i;
  throw std::invalid_argument("fwpkm cpu_isa: expected 'base', 'avx2' or 'avx512', got '" + name + "'");
}

std::string cpu_isa() { return kIsaNames[fwpkm::cpu_isa()]; }

std::string set_cpu_isa(const std::string& name) {
  return kIsaNames[fwpkm::set_cpu_isa(isa_code(name))];
}

py::list cpu_isas_available() {
  py::list out;
  for (int i = 0; i < fwpkm::kIsaCount; ++i)
    if (fwpkm::cpu_isa_available(i)) out.append(kIsaNames[i]);
  return out;
}

}  // namespace

#ifndef FWPKM_VERSION
#define FWPKM_VERSION "0.0.0"
#endif
#ifndef FWPKM_CUDA_ARCHS
#define FWPKM_CUDA_ARCHS ""
#endif

PYBIND11_MODULE(_C, m) {
  m.doc() = "fwpkm_ext native kernels (no libtorch; pointers in, nothing allocated)";
  m.def("topk_select", &topk_select);
  m.def("gather_rows", &gather_rows);
  m.def("gather_dot", &gather_dot);
  m.def("scatter_rows", &scatter_rows);
  m.def("scatter_rows_atomic", &scatter_rows_atomic);
  m.def("scatter_rows_dense", &scatter_rows_dense);
  m.def("scatter_pairs", &scatter_pairs);
  m.def("scatter_rows_logged", &scatter_rows_logged);
  m.def("addr_step", &addr_step);
  m.def("addr_vjp", &addr_vjp);
  m.def("segment_coefs", &segment_coefs);
  m.def("idw_pairs", &idw_pairs);
  m.def("read_weights", &read_weights);
  m.def("row_norms", &row_norms);
  m.def("slot_scores", &slot_scores);
  m.def("all_within", &all_within);
  m.def("window_step", &window_step);
  m.def("window_step_work", &fwpkm::window_step_work);
  m.def("segment_rows", &segment_rows);
  m.def("segment_rows_work", &fwpkm::segment_rows_work);
  m.def("read_positions", &read_positions);
  m.def("map_rows", &map_rows);
  m.def("cpu_isa", &cpu_isa);
  m.def("set_cpu_isa", &set_cpu_isa);
  m.def("cpu_isas_available", &cpu_isas_available);
  py::dict info;
#ifdef FWPKM_WITH_CUDA
  info["cuda"] = true;
  info["cuda_archs"] = std::string(FWPKM_CUDA_ARCHS);
#else
  info["cuda"] = false;
  info["cuda_archs"] = std::string("");
#endif
#ifdef _OPENMP
  info["openmp"] = true;
#else
  info["openmp"] = false;
#endif
  info["version"] = std::string(FWPKM_VERSION);
#if defined(__VERSION__)
  info["compiler"] = std::string(__VERSION__);
#endif
  m.attr("BUILD_INFO") = info;
}
