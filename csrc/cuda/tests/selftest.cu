// Standalone GPU self-test of the CUDA kernels against the CPU kernels (csrc/cpu/kernels.cpp).
// Not part of the extension (CMake only globs csrc/cuda/*.cu). Build and run on a GPU machine:
//
//   nvcc -std=c++17 -O3 -DFWPKM_WITH_CUDA -Icsrc -arch=native csrc/cuda/tests/selftest.cu
//        csrc/cuda/kernels.cu csrc/cpu/kernels.cpp csrc/cpu/dispatch.cpp -o /tmp/fwpkm_selftest (one line)
//   /tmp/fwpkm_selftest            # checks; exit status 0 when everything matches
//   /tmp/fwpkm_selftest --bench    # plus timings at the paper's shapes
//
// Bitwise checks: topk_select (kind dot: every output; kind IDW: indices, and scores up to the
// last-ulp differences of the two log implementations, reported separately), gather_rows,
// scatter_rows. Tolerance checks: gather_dot (tree vs sequential sum), scatter_rows_atomic.
#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <limits>
#include <numeric>
#include <random>
#include <stdexcept>
#include <string>
#include <vector>

#include "cuda/extra.h"
#include "kernels.h"

using fwpkm::kDot;
using fwpkm::kIDW;

#define CK(x)                                                                          \
  do {                                                                                 \
    cudaError_t e_ = (x);                                                              \
    if (e_ != cudaSuccess) {                                                           \
      std::fprintf(stderr, "%s:%d %s: %s\n", __FILE__, __LINE__, #x, cudaGetErrorString(e_)); \
      std::exit(2);                                                                    \
    }                                                                                  \
  } while (0)

static int g_fail = 0;
static int g_warn = 0;
static std::mt19937_64 g_rng(1234);

template <typename T>
struct DevBuf {
  T* p = nullptr;
  size_t n = 0;
  size_t off = 0;  // element offset into the allocation (to test unaligned pointers)
  void* base = nullptr;
  explicit DevBuf(size_t count, size_t offset = 0) : n(count), off(offset) {
    CK(cudaMalloc(&base, (count + offset + 1) * sizeof(T)));
    p = reinterpret_cast<T*>(base) + offset;
  }
  DevBuf(const std::vector<T>& h, size_t offset = 0) : DevBuf(h.size(), offset) { up(h); }
  ~DevBuf() { cudaFree(base); }
  void up(const std::vector<T>& h) {
    if (!h.empty()) CK(cudaMemcpy(p, h.data(), h.size() * sizeof(T), cudaMemcpyHostToDevice));
  }
  std::vector<T> down() const {
    std::vector<T> h(n);
    if (n) CK(cudaMemcpy(h.data(), p, n * sizeof(T), cudaMemcpyDeviceToHost));
    return h;
  }
  DevBuf(const DevBuf&) = delete;
  DevBuf& operator=(const DevBuf&) = delete;
};

template <typename T>
static bool same_bits(T a, T b) {
  return std::memcmp(&a, &b, sizeof(T)) == 0;
}

template <typename T>
static const char* tname() {
  return sizeof(T) == 4 ? "float" : "double";
}

static void report(bool ok, const std::string& what) {
  if (!ok) {
    ++g_fail;
    std::printf("FAIL %s\n", what.c_str());
  } else {
    std::printf("ok   %s\n", what.c_str());
  }
}

// ------------------------------------------------------------------------------ topk_select

template <typename T>
static void test_topk(int64_t M, int64_t H, int64_t n, int64_t k, int64_t tpg, int kind,
                      bool quantized, cudaStream_t stream) {
  const int64_t G = std::max<int64_t>(1, (M + tpg - 1) / tpg);
  std::vector<T> dots(M * H * 2 * n), qn(M * H * 2), kn(G * H * 2 * n);
  std::uniform_real_distribution<double> U01(0.0, 1.0);
  std::uniform_int_distribution<int> Q(0, 12);
  for (auto& v : dots) v = quantized ? T(Q(g_rng) * 0.25) : T(U01(g_rng) * 2 - 1);
  for (auto& v : qn) v = quantized ? T(Q(g_rng) * 0.5 + 3) : T(U01(g_rng) + 2);
  for (auto& v : kn) v = quantized ? T(Q(g_rng) * 0.5) : T(U01(g_rng));
  const double eps = 1e-3;
  std::vector<int64_t> idx(M * H * k), hidx(M * H * 2 * k);
  std::vector<T> sc(M * H * k), hsc(M * H * 2 * k);
  fwpkm::topk_select_cpu<T>(dots.data(), qn.data(), kn.data(), M, H, n, k, tpg, kind, eps,
                            idx.data(), sc.data(), hidx.data(), hsc.data());

  DevBuf<T> d_dots(dots), d_qn(qn), d_kn(kn);
  DevBuf<int64_t> d_idx(idx.size()), d_hidx(hidx.size());
  DevBuf<T> d_sc(sc.size()), d_hsc(hsc.size());
  fwpkm::topk_select_cuda<T>(d_dots.p, kind == kIDW ? d_qn.p : nullptr,
                             kind == kIDW ? d_kn.p : nullptr, M, H, n, k, tpg, kind, eps, d_idx.p,
                             d_sc.p, d_hidx.p, d_hsc.p, stream);
  CK(cudaStreamSynchronize(stream));
  const auto g_idx = d_idx.down(), g_hidx = d_hidx.down();
  const auto g_sc = d_sc.down(), g_hsc = d_hsc.down();

  // A pair score is the sum of two half scores, each of which may differ in its last ulp
  // between the host and the device log. Where the halves nearly cancel, that is far more than
  // an ulp of the sum, so differences are measured against the row's largest half score.
  std::vector<double> row_scale(size_t(M * H), 1e-30);
  for (size_t i = 0; i < hsc.size(); ++i) {
    double& r = row_scale[i / size_t(2 * k)];
    r = std::max(r, std::fabs(double(hsc[i])));
  }
  int64_t bad_i = 0, bad_hi = 0, bad_s = 0, bad_hs = 0, ulp_s = 0;
  for (size_t i = 0; i < idx.size(); ++i) {
    bad_i += idx[i] != g_idx[i];
    if (!same_bits(sc[i], g_sc[i])) {
      const double scale = std::max(std::fabs(double(sc[i])), 2 * row_scale[i / size_t(k)]);
      const double rel = std::fabs(double(sc[i]) - double(g_sc[i])) / scale;
      if (rel < 4 * std::numeric_limits<T>::epsilon()) ++ulp_s; else ++bad_s;
    }
  }
  for (size_t i = 0; i < hidx.size(); ++i) {
    bad_hi += hidx[i] != g_hidx[i];
    if (!same_bits(hsc[i], g_hsc[i])) {
      const double rel = std::fabs(double(hsc[i]) - double(g_hsc[i])) /
                         std::max(1e-30, std::fabs(double(hsc[i])));
      if (rel < 4 * std::numeric_limits<T>::epsilon()) ++ulp_s; else ++bad_hs;
    }
  }
  char buf[256];
  std::snprintf(buf, sizeof buf,
                "topk<%s> kind=%s M=%ld H=%ld n=%ld k=%ld tpg=%ld %s: idx %ld, half_idx %ld, "
                "score %ld, half_score %ld mismatches; %ld last-ulp score diffs",
                tname<T>(), kind == kIDW ? "idw" : "dot", long(M), long(H), long(n), long(k),
                long(tpg), quantized ? "ties" : "cont", long(bad_i), long(bad_hi), long(bad_s),
                long(bad_hs), long(ulp_s));
  if (kind == kDot) {
    report(bad_i + bad_hi + bad_s + bad_hs + ulp_s == 0, buf);
  } else {
    // IDW: the device log and the host log may differ in the last ulp; that can flip a
    // near-tie. Everything else must match.
    const bool ok = bad_s + bad_hs == 0 && (ulp_s > 0 || bad_i + bad_hi == 0);
    if (ok && (ulp_s > 0 || bad_i + bad_hi > 0)) {
      ++g_warn;
      std::printf("WARN %s\n", buf);
    } else {
      report(ok, buf);
    }
  }
}

// ------------------------------------------------------------------------------ gather_rows

template <typename T>
static void test_gather(int64_t R, int64_t D, int64_t M, int64_t L, bool with_saved, size_t misalign,
                        cudaStream_t stream) {
  std::normal_distribution<double> N01(0.0, 1.0);
  std::uniform_int_distribution<int64_t> RI(0, R - 1);
  std::vector<T> table(R * D), w(M * L), x(M * D);
  std::vector<int64_t> rows(M * L);
  for (auto& v : table) v = T(N01(g_rng));
  for (auto& v : w) v = T(N01(g_rng));
  for (auto& v : x) v = T(N01(g_rng));
  for (auto& r : rows) r = RI(g_rng);

  std::vector<T> out(M * D), saved(with_saved ? M * L * D : 0), gw(M * L);
  fwpkm::gather_rows_cpu<T>(table.data(), R, D, rows.data(), w.data(), M, L, out.data(),
                            with_saved ? saved.data() : nullptr);
  fwpkm::gather_dot_cpu<T>(table.data(), R, D, rows.data(), x.data(), M, L, gw.data());

  DevBuf<T> d_table(table, misalign), d_w(w), d_x(x, misalign);
  DevBuf<int64_t> d_rows(rows);
  DevBuf<T> d_out(out.size()), d_saved(saved.size()), d_gw(gw.size());
  // poison outputs
  if (!out.empty()) CK(cudaMemset(d_out.p, 0xff, out.size() * sizeof(T)));
  if (!gw.empty()) CK(cudaMemset(d_gw.p, 0xff, gw.size() * sizeof(T)));
  fwpkm::gather_rows_cuda<T>(d_table.p, R, D, d_rows.p, d_w.p, M, L, d_out.p,
                             with_saved ? d_saved.p : nullptr, stream);
  fwpkm::gather_dot_cuda<T>(d_table.p, R, D, d_rows.p, d_x.p, M, L, d_gw.p, stream);
  CK(cudaStreamSynchronize(stream));
  const auto g_out = d_out.down(), g_saved = d_saved.down(), g_gw = d_gw.down();
  int64_t bad = 0, bad_saved = 0, bad_gw = 0;
  for (size_t i = 0; i < out.size(); ++i) bad += !same_bits(out[i], g_out[i]);
  for (size_t i = 0; i < saved.size(); ++i) bad_saved += !same_bits(saved[i], g_saved[i]);
  const double tol = sizeof(T) == 4 ? 1e-4 : 1e-12;
  for (size_t i = 0; i < gw.size(); ++i) {
    const double scale = std::sqrt(double(D)) + 1.0;
    bad_gw += !(std::fabs(double(gw[i]) - double(g_gw[i])) <= tol * scale);
  }
  char buf[256];
  std::snprintf(buf, sizeof buf,
                "gather<%s> R=%ld D=%ld M=%ld L=%ld saved=%d misalign=%zu: out %ld (bitwise), "
                "saved %ld, gather_dot %ld mismatches",
                tname<T>(), long(R), long(D), long(M), long(L), int(with_saved), misalign,
                long(bad), long(bad_saved), long(bad_gw));
  report(bad + bad_saved + bad_gw == 0, buf);
}

// ------------------------------------------------------------------------------ scatter_rows

template <typename T>
static void test_scatter(int64_t R, int64_t D, int64_t M, int64_t L, int64_t U, size_t misalign,
                         cudaStream_t stream) {
  std::normal_distribution<double> N01(0.0, 1.0);
  std::vector<T> table(R * D), coef(M * L), x(M * D);
  for (auto& v : table) v = T(N01(g_rng));
  for (auto& v : coef) v = T(N01(g_rng));
  for (auto& v : x) v = T(N01(g_rng));
  // U distinct rows; pairs 0..M*L-1 (a random subset of them) split among the rows, some
  // segments empty, some long.
  std::vector<int64_t> perm(R);
  std::iota(perm.begin(), perm.end(), 0);
  std::shuffle(perm.begin(), perm.end(), g_rng);
  std::vector<int64_t> urows(perm.begin(), perm.begin() + U);
  std::vector<int64_t> pairs(M * L);
  std::iota(pairs.begin(), pairs.end(), 0);
  std::shuffle(pairs.begin(), pairs.end(), g_rng);
  const int64_t P = (M * L) * 3 / 4;
  std::vector<int64_t> order(pairs.begin(), pairs.begin() + P);
  std::vector<int64_t> offsets(U + 1, 0);
  {
    std::uniform_int_distribution<int64_t> cut(0, P);
    std::vector<int64_t> cuts(U > 0 ? U - 1 : 0);
    for (auto& c : cuts) c = cut(g_rng);
    if (U > 2) cuts[0] = cuts[1];  // force an empty segment
    std::sort(cuts.begin(), cuts.end());
    for (int64_t u = 1; u < U; ++u) offsets[u] = cuts[u - 1];
    if (U > 0) offsets[U] = P;
  }
  std::vector<T> ref = table;
  fwpkm::scatter_rows_cpu<T>(ref.data(), R, D, urows.data(), offsets.data(), U, order.data(),
                             coef.data(), x.data(), L);

  DevBuf<T> d_table(table, misalign), d_table2(table, misalign), d_coef(coef), d_x(x, misalign);
  DevBuf<int64_t> d_urows(urows), d_offsets(offsets), d_order(order);
  fwpkm::scatter_rows_cuda<T>(d_table.p, R, D, d_urows.p, d_offsets.p, U, d_order.p, d_coef.p,
                              d_x.p, L, stream);
  fwpkm::scatter_rows_atomic_cuda<T>(d_table2.p, R, D, d_urows.p, d_offsets.p, U, d_order.p,
                                     d_coef.p, d_x.p, L, stream);
  CK(cudaStreamSynchronize(stream));
  const auto g1 = d_table.down(), g2 = d_table2.down();
  int64_t bad = 0, bad_atomic = 0;
  const double tol = sizeof(T) == 4 ? 1e-4 : 1e-12;
  for (size_t i = 0; i < ref.size(); ++i) {
    bad += !same_bits(ref[i], g1[i]);
    bad_atomic += !(std::fabs(double(ref[i]) - double(g2[i])) <= tol * (1 + std::fabs(double(ref[i]))) * 8);
  }
  char buf[256];
  std::snprintf(buf, sizeof buf,
                "scatter<%s> R=%ld D=%ld M=%ld L=%ld U=%ld P=%ld misalign=%zu: %ld (bitwise), "
                "atomic %ld mismatches",
                tname<T>(), long(R), long(D), long(M), long(L), long(U), long(P), misalign,
                long(bad), long(bad_atomic));
  report(bad + bad_atomic == 0, buf);
}

// ------------------------------------------------------------------------------ errors

static void test_errors(cudaStream_t stream) {
  bool threw = false;
  try {
    fwpkm::topk_select_cuda<float>(nullptr, nullptr, nullptr, 4, 1, 4, 8, 1, kDot, 0.0, nullptr,
                                   nullptr, nullptr, nullptr, stream);
  } catch (const std::exception& e) {
    threw = std::string(e.what()).find("topk_select_cuda") != std::string::npos;
  }
  report(threw, "topk k > n throws naming the op");
  threw = false;
  try {
    fwpkm::topk_select_cuda<double>(nullptr, nullptr, nullptr, 4, 1, 8192, 200, 1, kDot, 0.0,
                                    nullptr, nullptr, nullptr, nullptr, stream);
  } catch (const std::exception& e) {
    threw = true;
  }
  report(threw, "topk k too large for shared memory throws");
  // empty problems: no launch, no error (null pointers are never touched)
  fwpkm::topk_select_cuda<float>(nullptr, nullptr, nullptr, 0, 1, 4, 2, 1, kIDW, 1e-3, nullptr,
                                 nullptr, nullptr, nullptr, stream);
  fwpkm::gather_rows_cuda<float>(nullptr, 0, 4, nullptr, nullptr, 0, 3, nullptr, nullptr, stream);
  fwpkm::gather_dot_cuda<float>(nullptr, 0, 4, nullptr, nullptr, 0, 3, nullptr, stream);
  fwpkm::scatter_rows_cuda<float>(nullptr, 0, 4, nullptr, nullptr, 0, nullptr, nullptr, nullptr,
                                  3, stream);
  CK(cudaStreamSynchronize(stream));
  report(cudaGetLastError() == cudaSuccess, "empty problems are no-ops");
}

// ------------------------------------------------------------------------------ bench

template <typename F>
static float time_ms(F&& f, cudaStream_t s, int iters = 20) {
  cudaEvent_t a, b;
  CK(cudaEventCreate(&a));
  CK(cudaEventCreate(&b));
  f();
  CK(cudaEventRecord(a, s));
  for (int i = 0; i < iters; ++i) f();
  CK(cudaEventRecord(b, s));
  CK(cudaEventSynchronize(b));
  float ms = 0;
  CK(cudaEventElapsedTime(&ms, a, b));
  cudaEventDestroy(a);
  cudaEventDestroy(b);
  return ms / iters;
}

static void bench(cudaStream_t s) {
  std::normal_distribution<float> N01(0.f, 1.f);
  struct Cfg { int64_t M, H, n, k; int kind; };
  for (Cfg c : {Cfg{32768, 1, 512, 8, kIDW}, Cfg{32768, 4, 512, 32, kDot},
                Cfg{8192, 1, 4096, 64, kIDW}}) {
    std::vector<float> dots(c.M * c.H * 2 * c.n), qn(c.M * c.H * 2), kn(c.H * 2 * c.n);
    for (auto& v : dots) v = N01(g_rng);
    for (auto& v : qn) v = 2 + std::fabs(N01(g_rng));
    for (auto& v : kn) v = 1 + std::fabs(N01(g_rng));
    DevBuf<float> d(dots), q(qn), kk(kn), sc(c.M * c.H * c.k), hs(c.M * c.H * 2 * c.k);
    DevBuf<int64_t> ix(c.M * c.H * c.k), hx(c.M * c.H * 2 * c.k);
    const float ms = time_ms([&] {
      fwpkm::topk_select_cuda<float>(d.p, q.p, kk.p, c.M, c.H, c.n, c.k, c.M, c.kind, 1e-3, ix.p,
                                     sc.p, hx.p, hs.p, s);
    }, s);
    std::printf("bench topk<float> M=%ld H=%ld n=%ld k=%ld %s: %.3f ms (%.1f GB/s of dots)\n",
                long(c.M), long(c.H), long(c.n), long(c.k), c.kind == kIDW ? "idw" : "dot", ms,
                dots.size() * 4.0 / ms / 1e6);
  }
  {
    const int64_t R = 262144, D = 512, M = 32768, L = 8;
    std::vector<float> w(M * L), x(M * D);
    std::vector<int64_t> rows(M * L), urows, offsets, order(M * L);
    std::uniform_int_distribution<int64_t> RI(0, R - 1);
    for (auto& v : w) v = N01(g_rng);
    for (auto& v : x) v = N01(g_rng);
    for (auto& r : rows) r = RI(g_rng);
    DevBuf<float> table(R * D), d_w(w), d_x(x), out(M * D), saved(M * L * D), gw(M * L);
    CK(cudaMemset(table.p, 0, R * D * sizeof(float)));
    DevBuf<int64_t> d_rows(rows);
    float ms = time_ms([&] {
      fwpkm::gather_rows_cuda<float>(table.p, R, D, d_rows.p, d_w.p, M, L, out.p, nullptr, s);
    }, s);
    std::printf("bench gather_rows<float> M=%ld L=%ld D=%ld: %.3f ms (%.1f GB/s rows read)\n",
                long(M), long(L), long(D), ms, M * L * D * 4.0 / ms / 1e6);
    ms = time_ms([&] {
      fwpkm::gather_rows_cuda<float>(table.p, R, D, d_rows.p, d_w.p, M, L, out.p, saved.p, s);
    }, s);
    std::printf("bench gather_rows<float> +saved: %.3f ms\n", ms);
    ms = time_ms([&] {
      fwpkm::gather_dot_cuda<float>(table.p, R, D, d_rows.p, d_x.p, M, L, gw.p, s);
    }, s);
    std::printf("bench gather_dot<float>: %.3f ms (%.1f GB/s rows read)\n", ms,
                M * L * D * 4.0 / ms / 1e6);
    // scatter: sort pairs by row
    std::vector<int64_t> pid(M * L);
    std::iota(pid.begin(), pid.end(), 0);
    std::sort(pid.begin(), pid.end(), [&](int64_t a, int64_t b) {
      return rows[a] != rows[b] ? rows[a] < rows[b] : a < b;
    });
    for (size_t i = 0; i < pid.size(); ++i) {
      if (i == 0 || rows[pid[i]] != rows[pid[i - 1]]) {
        urows.push_back(rows[pid[i]]);
        offsets.push_back(int64_t(i));
      }
      order[i] = pid[i];
    }
    offsets.push_back(int64_t(pid.size()));
    const int64_t U = int64_t(urows.size());
    DevBuf<int64_t> d_u(urows), d_o(offsets), d_ord(order);
    ms = time_ms([&] {
      fwpkm::scatter_rows_cuda<float>(table.p, R, D, d_u.p, d_o.p, U, d_ord.p, d_w.p, d_x.p, L, s);
    }, s);
    std::printf("bench scatter_rows<float> U=%ld P=%ld: %.3f ms\n", long(U), long(M * L), ms);
    ms = time_ms([&] {
      fwpkm::scatter_rows_atomic_cuda<float>(table.p, R, D, d_u.p, d_o.p, U, d_ord.p, d_w.p, d_x.p,
                                             L, s);
    }, s);
    std::printf("bench scatter_rows_atomic<float>: %.3f ms\n", ms);
  }
}

int main(int argc, char** argv) {
  cudaStream_t stream;
  CK(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking));

  struct TK { int64_t M, H, n, k, tpg; };
  const TK tks[] = {{5, 1, 1, 1, 1},     {7, 2, 5, 3, 3},      {33, 1, 33, 8, 4},
                    {64, 1, 512, 8, 16}, {17, 4, 512, 32, 5},  {9, 1, 4096, 64, 9},
                    {6, 3, 100, 64, 2},  {3, 2, 4096, 8, 1},   {40, 1, 64, 64, 7},
                    {11, 2, 31, 31, 11}, {300, 1, 512, 8, 300}, {2, 1, 2000, 17, 1}};
  for (const TK& t : tks) {
    for (int kind : {kDot, kIDW}) {
      for (bool q : {true, false}) {
        test_topk<float>(t.M, t.H, t.n, t.k, t.tpg, kind, q, stream);
        test_topk<double>(t.M, t.H, t.n, t.k, t.tpg, kind, q, stream);
      }
    }
  }
  struct GC { int64_t R, D, M, L; };
  const GC gcs[] = {{10, 1, 5, 3},     {50, 3, 7, 8},      {50, 4, 37, 8},   {100, 6, 9, 40},
                    {300, 130, 13, 8}, {1000, 512, 64, 8}, {64, 1030, 5, 33}, {32, 3000, 3, 2},
                    {16, 8, 4, 0},     {16, 4096, 2, 5}};
  for (const GC& g : gcs) {
    for (bool sv : {false, true}) {
      for (size_t mis : {size_t(0), size_t(1)}) {
        test_gather<float>(g.R, g.D, g.M, g.L, sv, mis, stream);
        test_gather<double>(g.R, g.D, g.M, g.L, sv, mis, stream);
      }
    }
  }
  struct SC { int64_t R, D, M, L, U; };
  const SC scs[] = {{10, 1, 5, 3, 4},     {50, 3, 7, 8, 20},     {500, 4, 37, 8, 100},
                    {300, 130, 13, 8, 50}, {2000, 512, 64, 8, 300}, {64, 1030, 5, 33, 3},
                    {32, 3000, 30, 2, 1},  {100, 16, 200, 8, 7}};
  for (const SC& c : scs) {
    for (size_t mis : {size_t(0), size_t(1)}) {
      test_scatter<float>(c.R, c.D, c.M, c.L, c.U, mis, stream);
      test_scatter<double>(c.R, c.D, c.M, c.L, c.U, mis, stream);
    }
  }
  test_errors(stream);
  if (argc > 1 && std::string(argv[1]) == "--bench") bench(stream);
  CK(cudaStreamDestroy(stream));
  std::printf("%d failures, %d warnings\n", g_fail, g_warn);
  return g_fail ? 1 : 0;
}
