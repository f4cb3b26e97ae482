// One whole window of an in-place streaming call on the CPU (contract in ../kernels.h,
// WindowStep): recurrence._windows' op-by-op path for a window that writes, as one call. Every
// number comes from the same kernel arithmetic as there (the fwpkm::*_cpu entry points of
// dispatch.cpp, so the instruction set picked at load applies), on the same inputs, in the same
// order per row; the glue between them (row ids, contributing pairs, which rows one pair alone
// reads) is integer work or the same two roundings as the torch expressions it replaces.
// Compiled once, for the default target: the glue is a few passes over a window's few thousand
// pairs. One change of schedule: the read and the residual are computed token by token in
// read_write_rows, which also writes the rows no other pair of the window reads while they are in
// cache; the other rows are written by scatter_rows after the whole read, as in the op-by-op
// path. The logged value write of that path (scatter_rows_logged_cpu, map_rows then
// scatter_rows) is here too: _native.scatter_rows_logged calls it.
#include "../kernels.h"

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <stdexcept>

namespace fwpkm {
namespace {

// Byte offsets of the scratch arrays in `work` (each 64-byte aligned).
struct WorkLayout {
  int64_t qn, kn, score, half_score, idx, half, kid, s, inv, pos, w, rows, r, pid, order, urows, offsets,
      seg, coef, ids, P, u, gamma, pbar, lid, urows2, offsets2, order2, ids2, wt, total;
  WorkLayout(int64_t elem, int64_t B, int64_t L, int64_t H, int64_t k, int64_t S, int64_t n,
             int64_t dv) {
    const int64_t M = B * L, G = M * H, M2 = G * 2, Q = M * H * k, RV = S * n * n, R2 = S * H * 2 * n;
    int64_t at = 0;
    auto take = [&](int64_t bytes) {
      const int64_t here = at;
      at += (bytes + 63) / 64 * 64;
      return here;
    };
    const int64_t i8 = int64_t(sizeof(int64_t));
    qn = take(M2 * elem);
    kn = take(R2 * elem);
    score = take(G * k * elem);
    half_score = take(M2 * k * elem);
    idx = take(G * k * i8);
    half = take(M2 * k * i8);
    kid = take(M2 * k * i8);
    s = take(M2 * k * elem);
    inv = take(M2 * k * elem);
    pos = take(M2 * k * i8);
    w = take(Q * elem);
    rows = take(Q * i8);
    r = take(M * dv * elem);
    pid = take(Q * i8);
    order = take(Q * i8);
    urows = take(Q * i8);
    offsets = take((Q + 1) * i8);
    const int64_t sw = segment_rows_work(Q, RV);
    seg = take((sw > RV + 1 ? sw : RV + 1) * i8);  // enough for any Q' <= Q (see segment_rows_work)
    coef = take(Q * elem);
    ids = take(Q * i8);
    P = take(M2 * k * elem);
    u = take(M2 * k * elem);
    gamma = take(M2 * k * elem);
    pbar = take(R2 * elem);
    lid = take(Q * i8);
    urows2 = take(Q * i8);
    offsets2 = take((Q + 1) * i8);
    order2 = take(Q * i8);
    ids2 = take(Q * i8);
    wt = take(M * elem);
    total = at;
  }
};

template <typename X>
X* at(void* base, int64_t off) {
  return reinterpret_cast<X*>(static_cast<char*>(base) + off);
}

}  // namespace

int64_t window_step_work(int64_t elem, int64_t B, int64_t L, int64_t H, int64_t k, int64_t S,
                         int64_t n, int64_t dv) {
  return WorkLayout(elem, B, L, H, k, S, n, dv).total;
}

namespace {

// The undo log's ids of the U rows about to be written: rows new to the log join it first (ids
// from *used on; map_rows throws before changing anything when they do not fit) and *used says
// so before any row is written; ids[q] is the log row to copy urows[q] to, or -1 when it was
// logged by an earlier write of the call.
template <typename T>
void log_ids(const int64_t* urows, int64_t U, int64_t R, int64_t D, int64_t* slot, int64_t* touched,
             int64_t* used, int64_t cap, int64_t* ids) {
  const int64_t before = *used;
  *used = map_rows_cpu<T>(slot, R, urows, U, ids, touched, before, cap, nullptr, nullptr, D);
  for (int64_t q = 0; q < U; ++q) ids[q] = ids[q] >= before ? ids[q] : -1;
}

}  // namespace

template <typename T>
void scatter_rows_logged_cpu(T* table, int64_t R, int64_t D, const int64_t* urows,
                             const int64_t* offsets, int64_t U, const int64_t* order, const T* coef,
                             const T* x, int64_t L, int64_t* nonfinite, int64_t* slot,
                             int64_t* touched, int64_t* used, int64_t cap, T* log, int64_t* ids) {
  log_ids<T>(urows, U, R, D, slot, touched, used, cap, ids);
  scatter_rows_cpu<T>(table, R, D, urows, offsets, U, order, coef, x, L, nonfinite, log, ids);
}

template <typename T>
int64_t window_step_cpu(const WindowStep<T>& a) {
  const int64_t B = a.B, L = a.L, H = a.H, n = a.n, k = a.k, S = a.S, d2 = a.d2, dv = a.dv;
  const int64_t M = B * L, G = M * H, M2 = G * 2, HK = H * k, Q = M * HK;
  const int64_t N = n * n, RV = S * N, R2 = S * H * 2 * n;
  const bool per_seq = S > 1;
  if (per_seq && S != B) throw std::invalid_argument("fwpkm window_step: S > 1 needs S == B");
  const WorkLayout lay(int64_t(sizeof(T)), B, L, H, k, S, n, dv);
  void* wk = a.work;
  const bool idw = a.kind == kIDW;
  T* score = at<T>(wk, lay.score);
  T* half_score = at<T>(wk, lay.half_score);
  int64_t* idx = at<int64_t>(wk, lay.idx);
  int64_t* half = at<int64_t>(wk, lay.half);
  int64_t* kid = at<int64_t>(wk, lay.kid);
  T* s = at<T>(wk, lay.s);
  T* inv = idw ? at<T>(wk, lay.inv) : nullptr;
  int64_t* pos = at<int64_t>(wk, lay.pos);
  T* w = at<T>(wk, lay.w);
  int64_t* rows = at<int64_t>(wk, lay.rows);
  T* r = at<T>(wk, lay.r);
  int64_t* pid = at<int64_t>(wk, lay.pid);
  int64_t* order = at<int64_t>(wk, lay.order);
  int64_t* urows = at<int64_t>(wk, lay.urows);
  int64_t* offsets = at<int64_t>(wk, lay.offsets);
  int64_t* seg = at<int64_t>(wk, lay.seg);
  T* coef = at<T>(wk, lay.coef);
  int64_t* ids = at<int64_t>(wk, lay.ids);
  auto grp = [&](int64_t m) { return per_seq ? m / L : int64_t(0); };
  T* qn = idw ? at<T>(wk, lay.qn) : nullptr;
  T* kn = idw ? at<T>(wk, lay.kn) : nullptr;
  if (idw) {  // recurrence.key_norms of the query halves and of the keys
    row_norms_cpu<T>(a.x, M2, d2, qn);
    row_norms_cpu<T>(a.K, R2, d2, kn);
  }

  // the search's epilogue (search): per-half top-k and the slots, and the read's exact pair
  // scores (Pairs: idw_pairs / gather_dot over key_rows' rows, the same expressions) while each
  // query half is in cache
  topk_select_cpu<T>(a.dots, qn, kn, M, H, n, k, per_seq ? L : M, a.kind, a.eps, idx, score,
                     half, half_score, a.x, a.K, d2, s, inv, per_seq ? L : M);
  // the read (Window): pair rows into the keys (key_rows, for the key step), the slots' places
  // in the half lists (read_positions) and the read weights
  for (int64_t gc = 0; gc < M2; ++gc) {
    const int64_t m = gc / (2 * H), h = (gc / 2) % H, c = gc % 2;
    const int64_t base = ((grp(m) * H + h) * 2 + c) * n;
    for (int64_t j = 0; j < k; ++j) kid[gc * k + j] = base + half[gc * k + j];
  }
  read_positions_cpu(idx, half, G, k, n, pos);
  read_weights_cpu<T>(s, pos, M, H, k, w);
  // value rows (idx + the memory's first row)
  for (int64_t m = 0; m < M; ++m)
    for (int64_t j = 0; j < HK; ++j) rows[m * HK + j] = idx[m * HK + j] + grp(m) * N;
  // the write (contributing, value_coefs): token l of a sequence writes when its target
  // v[l + la] is in the window and its mask is > 0; its residual r = (vhat - y) * (g * mask * on),
  // rounded as the torch expressions; the contributing tokens' pairs in increasing order
  const int64_t keep = L - a.la > 0 ? L - a.la : 0;
  auto on = [&](int64_t m) { return m % L < keep && a.mask[(m / L) * a.Tt + m % L] > T(0); };
  T* wt = at<T>(wk, lay.wt);
  for (int64_t m = 0; m < M; ++m) {
    const int64_t b = m / L, l = m % L;
    wt[m] = l < keep ? (a.g[b * a.Tt + l] * a.mask[b * a.Tt + l]) * (on(m) ? T(1) : T(0)) : T(0);
  }
  int64_t Qc = 0;
  for (int64_t m = 0; m < M; ++m)
    if (on(m))
      for (int64_t j = 0; j < HK; ++j) pid[Qc++] = m * HK + j;
  const int64_t U = segment_rows_cpu(rows, pid, Qc, RV, order, urows, offsets, seg);
  segment_coefs_cpu<T>(offsets, U, order, w, -a.lr * double(HK), Q, coef);
  // the undo log's ids, before any row is written (as scatter_rows_logged takes them)
  log_ids<T>(urows, U, RV, dv, a.slot, a.touched, a.used, a.cap, ids);
  // A row that one pair alone reads in the window is written in the read's pass, while it is in
  // cache (read_write_rows: lid = its log id, or -1); the rows several pairs read (a segment of
  // two or more, or a row a non-writing token reads too) after the whole read, by scatter_rows.
  // Either way each row gets the terms scatter_rows would give it, in the same order.
  int64_t* lid = at<int64_t>(wk, lay.lid);
  std::fill(lid, lid + Q, int64_t(-2));
  for (int64_t q = 0; q < U; ++q)
    if (offsets[q + 1] - offsets[q] == 1) lid[order[offsets[q]]] = ids[q];
  for (int64_t m = 0; m < M; ++m) {
    if (on(m)) continue;
    for (int64_t j = 0; j < HK; ++j) {  // a row a non-writing token reads is written after the read
      const int64_t* hit = std::lower_bound(urows, urows + U, rows[m * HK + j]);
      if (hit != urows + U && *hit == rows[m * HK + j]) {
        const int64_t q = hit - urows;
        if (offsets[q + 1] - offsets[q] == 1) lid[order[offsets[q]]] = -2;
      }
    }
  }
  int64_t* urows2 = at<int64_t>(wk, lay.urows2);
  int64_t* offsets2 = at<int64_t>(wk, lay.offsets2);
  int64_t* order2 = at<int64_t>(wk, lay.order2);
  int64_t* ids2 = at<int64_t>(wk, lay.ids2);
  int64_t U2 = 0;
  offsets2[0] = 0;
  for (int64_t q = 0; q < U; ++q) {
    if (offsets[q + 1] - offsets[q] == 1 && lid[order[offsets[q]]] >= -1) continue;
    urows2[U2] = urows[q];
    ids2[U2] = ids[q];
    int64_t o2 = offsets2[U2];
    for (int64_t e = offsets[q]; e < offsets[q + 1]; ++e) order2[o2++] = order[e];
    offsets2[++U2] = o2;
  }
  // the read, one sequence at a time (its window is contiguous in vhat), with the single rows'
  // write; then the shared rows' write
  for (int64_t b = 0; b < B; ++b)
    read_write_rows_cpu<T>(a.V, RV, dv, rows + b * L * HK, w + b * L * HK, L, HK,
                           a.vhat + b * a.Tt * dv, keep > 0 ? a.v + (b * a.Tt + a.la) * dv : a.v,
                           wt + b * L, keep, r + b * L * dv, coef + b * L * HK, lid + b * L * HK,
                           a.log, a.nonfinite);
  scatter_rows_cpu<T>(a.V, RV, dv, urows2, offsets2, U2, order2, coef, r, HK, a.nonfinite, a.log, ids2);
  // the key step (updated_keys / addr_step); every token row counts (rows per memory: L or B L)
  const int64_t bad = addr_step_cpu<T>(s, inv, kid, M2, k, a.x, a.K, R2, d2,
                                       double(per_seq ? L : M), a.addr_w, a.lr, a.ent_eps,
                                       at<T>(wk, lay.P), at<T>(wk, lay.u), at<T>(wk, lay.gamma),
                                       at<T>(wk, lay.pbar), a.new_keys);
  // the selections and weights into the call's per-token outputs
  for (int64_t b = 0; b < B; ++b) {
    std::memcpy(a.idx + b * a.Tt * HK, idx + b * L * HK, sizeof(int64_t) * size_t(L * HK));
    std::memcpy(a.half + b * a.Tt * 2 * HK, half + b * L * 2 * HK, sizeof(int64_t) * size_t(L * 2 * HK));
    std::memcpy(a.w + b * a.Tt * HK, w + b * L * HK, sizeof(T) * size_t(L * HK));
  }
  return bad;
}

#define FWPKM_INSTANTIATE(T)                                                                  \
  template void scatter_rows_logged_cpu<T>(T*, int64_t, int64_t, const int64_t*, const int64_t*,  \
                                           int64_t, const int64_t*, const T*, const T*, int64_t,  \
                                           int64_t*, int64_t*, int64_t*, int64_t*, int64_t, T*,   \
                                           int64_t*);
FWPKM_INSTANTIATE(float)
FWPKM_INSTANTIATE(double)
#undef FWPKM_INSTANTIATE
template int64_t window_step_cpu<float>(const WindowStep<float>&);
template int64_t window_step_cpu<double>(const WindowStep<double>&);

}  // namespace fwpkm
