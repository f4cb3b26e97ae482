// The native core of fwpkm_ext: four kernels, each with a CPU and a CUDA version.
//
// The core never allocates and never sees a torch type: Python allocates every buffer with torch
// and passes raw pointers, sizes and (CUDA) a stream. All buffers are dense row-major (contiguous).
// Indices are int64. Floating types: float and double on every backend.
//
// The four kernels cover the forward and backward of the whole FwPKM window recurrence:
//   topk_select   product-key search epilogue: sub-scores, per-half top-k, k x k merge
//   gather_rows   out[m] = sum_l w[m,l] * table[rows[m,l]]        (the read; optionally keeps rows)
//   gather_dot    gw[m,l] = table[rows[m,l]] . x[m]               (backward of the read w.r.t. w)
//   scatter_rows  table[urows[u]] += sum_{p in segment u} coef[p] * x[p / L]
//                 (write-back and every row-gradient: pairs pre-sorted by row, one writer per row,
//                  fixed summation order, hence deterministic)
#pragma once
#include <cstdint>

namespace fwpkm {

enum ScoreKind : int { kIDW = 0, kDot = 1 };

// Product-key top-k.
//   dots       [M, H, 2, n]  q_half . K_half[i] for token m, head h, half c (c = 0 first half);
//              CPU with block > 0: [M / block, H, 2, block, n] instead (token m = b * block + l
//              at [b, h, c, l]), the layout of one GEMM per (block, head, half) writing a
//              contiguous output (BLAS ran 10% slower into the interleaved rows)
//   qn         [M, H, 2]     ||q_half||^2          (IDW only; may be null for kDot)
//   kn         [G, H, 2, n]  ||K_half[i]||^2        (IDW only; may be null for kDot)
//   key group of token m is m / tokens_per_group (G = ceil(M / tokens_per_group))
// IDW sub-score: -log(eps + max(qn + kn - 2 dot, 0)); dot: the dot product itself.
// Outputs, sorted by descending score, ties broken by the smaller index:
//   idx        [M, H, k]     slot = i1 * n + i2
//   score      [M, H, k]     s_1[i1] + s_2[i2]
//   half_idx   [M, H, 2, k]  per-half top-k sub-key indices
//   half_score [M, H, 2, k]  their sub-scores
// With x [M * H * 2, D] (the query halves whose dots are `dots`) and K [G * H * 2 * n, D] (the
// keys; qn and kn their squared norms), CPU only: also the exact scores of the half lists,
// pair_s / pair_inv [M * H * 2, k], as idw_pairs (IDW; pair_inv = 1 / (eps + distance)) or
// gather_dot (dot; pair_inv unused) compute them for the rows of half_idx: bit for bit, from the
// same expressions, while the query half is in cache (window_step's pair scores).
template <typename T>
void topk_select_cpu(const T* dots, const T* qn, const T* kn, int64_t M, int64_t H, int64_t n,
                     int64_t k, int64_t tokens_per_group, int kind, double eps, int64_t* idx,
                     T* score, int64_t* half_idx, T* half_score, const T* x = nullptr,
                     const T* K = nullptr, int64_t D = 0, T* pair_s = nullptr, T* pair_inv = nullptr,
                     int64_t block = 0);

// Weighted gather: out[m, :] = sum_l w[m, l] * table[rows[m, l], :]  (accumulated in T).
//   table [R, D], rows [M, L], w [M, L], out [M, D]; saved [M, L, D] or null: the gathered rows.
template <typename T>
void gather_rows_cpu(const T* table, int64_t R, int64_t D, const int64_t* rows, const T* w,
                     int64_t M, int64_t L, T* out, T* saved);

// gw[m, l] = table[rows[m, l], :] . x[m, :]
template <typename T>
void gather_dot_cpu(const T* table, int64_t R, int64_t D, const int64_t* rows, const T* x,
                    int64_t M, int64_t L, T* gw);

// IDW sub-scores of (query half, sub-key) pairs (CPU only): with dot = table[rows[m, l]] . x[m]
// (gather_dot's sum), d = max((xn[m] + kn[rows[m, l]]) - 2 dot, 0), inv[m, l] = 1 / (eps + d)
// and s[m, l] = log(inv[m, l]) = -log(eps + d), each rounded in T in that order.
//   xn [M] = ||x[m]||^2, kn [R] = ||table[r]||^2
// A row outside [0, R) throws std::invalid_argument before anything is read.
template <typename T>
void idw_pairs_cpu(const T* table, int64_t R, int64_t D, const int64_t* rows, const T* x,
                   int64_t M, int64_t L, const T* xn, const T* kn, double eps, T* s, T* inv);

// Segmented row update, in place:
//   for u in [0, U): table[urows[u], :] += sum_{p = offsets[u]}^{offsets[u+1]-1} coef[order[p]] * x[order[p] / L, :]
// urows must be distinct (one writer per row); order lists pair ids (m * L + l) grouped by row.
// CPU only: when nonfinite is not null, *nonfinite += the number of updated rows that hold a
// NaN or an infinity afterwards (checked while the row is in cache: the all-or-nothing commit's
// overflow check without a pass over the table). When log is not null, row urows[u] is first
// copied, as it was, to log[log_id[u], :] for every u with log_id[u] >= 0 (the undo log of an
// in-place call, written while the row is in cache: no second random read of it).
template <typename T>
void scatter_rows_cpu(T* table, int64_t R, int64_t D, const int64_t* urows, const int64_t* offsets,
                      int64_t U, const int64_t* order, const T* coef, const T* x, int64_t L,
                      int64_t* nonfinite = nullptr, T* log = nullptr,
                      const int64_t* log_id = nullptr);

// A window's read and, for the rows it alone reads, its value write, in one pass (CPU only;
// window_step). For each token m of M (pairs p = m * L + l):
//   out[m, :] = sum_l w[p] * table[rows[p], :]      (gather_rows' sum)
//   r[m, :]   = (out[m, :] - y[m, :]) * wt[m]       (each rounded in T) for m < keep, else 0
// then for each pair p of m with lid[p] >= -1, in l order: the row table[rows[p]] is copied to
// log[lid[p], :] when lid[p] >= 0 (the undo log, as scatter_rows' log_id), then
//   table[rows[p], :] += coef[p] * r[m, :]          (scatter_rows' one-pair segment)
// and *nonfinite (when not null) counts the rows written that hold a NaN or an infinity after.
// lid[p] >= -1 promises that no other pair of the call (nor of the window it belongs to) reads
// or writes rows[p]: the pairs that share a row are the caller's to write afterwards with
// scatter_rows. y is read only for m < keep. Rows must lie in [0, R) (not checked: window_step's
// rows come from its own search).
template <typename T>
void read_write_rows_cpu(T* table, int64_t R, int64_t D, const int64_t* rows, const T* w,
                         int64_t M, int64_t L, T* out, const T* y, const T* wt, int64_t keep, T* r,
                         const T* coef, const int64_t* lid, T* log, int64_t* nonfinite);

// The in-place value write of a streaming call with its undo log (CPU only; window.cpp): the
// rows of urows not in the log yet join it as map_rows adds them (slot [R], touched [cap], ids
// *used, *used + 1, ...; *used is updated before any row is written, so a caller that fails
// later can put every logged row back), then scatter_rows writes each row, copying a row that
// joined just now to log[its id] [cap, D] first. ids [U]: scratch (the compact ids). More rows
// than cap throws std::length_error with nothing changed.
template <typename T>
void scatter_rows_logged_cpu(T* table, int64_t R, int64_t D, const int64_t* urows,
                             const int64_t* offsets, int64_t U, const int64_t* order, const T* coef,
                             const T* x, int64_t L, int64_t* nonfinite, int64_t* slot,
                             int64_t* touched, int64_t* used, int64_t cap, T* log, int64_t* ids);

// Unsorted pair update of a small table, in place (CPU only): for p = 0, 1, ..., M * L - 1 in
// that order, table[rows[p], :] += coef[p] * x[p / L, :]. rows [M, L], coef [M, L], x [M, D].
// Every row gets its terms in increasing p: the sums, and their rounding, of scatter_rows over
// segment_rows(rows)'s buckets, whatever the thread count. A row id outside [0, R) throws
// std::invalid_argument naming it, before anything is written.
template <typename T>
void scatter_pairs_cpu(T* table, int64_t R, int64_t D, const int64_t* rows, int64_t M, int64_t L,
                       const T* coef, const T* x);

// The same sums written into a whole dense table (CPU only): table[r, :] = the sum of row r's
// segment, 0 for a row without one. Every row is written exactly once (no zero pass before the
// scatter: one sequential write of the table). urows strictly increasing, within [0, R) (as
// segment_rows gives them); segments may be empty.
// With src [R, D] and gw [Q] (both set, or both null): also gw[p] = src[r] . x[p / L] for every
// pair p of row r's segment, exactly as gather_dot computes it (the same lanes and rounding),
// from one pass over src's rows in order instead of a read of a random row per pair (the
// gradient of a gather's weights, next to the gradient of its table: PKM's backward).
template <typename T>
void scatter_rows_dense_cpu(T* table, int64_t R, int64_t D, const int64_t* urows,
                            const int64_t* offsets, int64_t U, const int64_t* order, const T* coef,
                            const T* x, int64_t L, const T* src, T* gw);

// The addressing loss' key step of one window (CPU only; SPEC "Update", keys), for M pair rows
// of L pairs (query half m against key row rows[m, l]) whose rows are all the memory's rows:
//   s [M, L] the pairs' sub-scores; inv [M, L] = 1 / (eps_idw + distance) for IDW, null for dot
//   x [M, D] the query halves; K [R, D] the keys; rpg: the rows sharing the memory (the mean's
//   divisor); w: the loss weight; eps: the entropy's log epsilon
// Writes P = softmax(s) per row, pbar [R] = (sum of P over each key row's pairs) / rpg,
// u [M, L] = dL/dP = phi[rows] / rpg with phi = w (log(pbar + eps) + pbar / (pbar + eps)),
// gamma [M, L] = dL/ds = P (u - <P, u>), and, when out [R, D] is not null, the step
// out = K - lr dL/dK: out[r] = K[r] + sum_p c_p x[p / L] (- (sum_p c_p) K[r] for IDW), with
// c = -lr gamma (IDW: times 2 inv), each row's terms in pair order. Row sums accumulate in
// double. Returns the number of rows of out holding a NaN or an infinity (0 without out: the
// window's overflow check, made while the rows are in cache). A row outside [0, R) throws
// std::invalid_argument before anything is written.
template <typename T>
int64_t addr_step_cpu(const T* s, const T* inv, const int64_t* rows, int64_t M, int64_t L,
                      const T* x, const T* K, int64_t R, int64_t D, double rpg, double w,
                      double lr, double eps, T* P, T* u, T* gamma, T* pbar, T* out);

// The addressing loss' second-order term of one window (CPU only; the backward through
// addr_step's key step), for F = <lam, dL/dK>: with the window's pairs as addr_step takes them
// (rows [M, L], x [M, D], K [R, D], inv [M, L] for IDW or null for dot), its P, u, gamma [M, L],
// dphi [R] = d2L/dpbar2 and rpg,
//   psi = <lam_r, ds/dK> per pair (IDW: 2 inv (lam_r . x_m - lam_r . K_r); dot: lam_r . x_m),
//   pdot = P (psi - <P, psi>), dpbar = (sum of pdot over each row's pairs, in double) / rpg,
//   du = dphi[r] dpbar[r] / rpg, chi = pdot (u - <P, u>) + P (du - <pdot, u> - <P, du>)
// (<a, b>: the sum over a pair row). IDW: alpha = -2 inv (chi + gamma psi), beta = 2 inv gamma,
//   gx[m] = (sum_j alpha) x_m - sum_j alpha K_r + sum_j beta lam_r,
//   gk[r] = -sum alpha x_m + (sum alpha) K_r - (sum beta) lam_r over r's pairs;
// dot: gx[m] = sum_j chi K_r + sum_j gamma lam_r, gk[r] = sum chi x_m. gk and gx are written
// (not added). Each row's and each pair row's terms in pair order; dot products summed as
// gather_dot sums them. A row outside [0, R) throws std::invalid_argument first.
template <typename T>
void addr_vjp_cpu(const T* P, const T* u, const T* gamma, const T* dphi, const T* inv,
                  const int64_t* rows, int64_t M, int64_t L, const T* x, const T* K, const T* lam,
                  int64_t R, int64_t D, double rpg, T* gk, T* gx);

// Stable bucketing of pairs by row (CPU only; CUDA uses torch's sort), what scatter_rows needs:
//   the key of pair j (j in [0, Q)) is rows[pairs[j]] (pairs null: rows[j]), 0 <= key < R
//   order   [Q]        the pair ids (pairs[j], or j) by increasing key, equal keys in input order
//   urows   [U <= Q]   the distinct keys, increasing
//   offsets [U + 1]    the segment of urows[u] in order is [offsets[u], offsets[u + 1])
//   work    [segment_rows_work(Q, R)] int64 scratch
// Returns U. A key outside [0, R) throws std::invalid_argument naming it (nothing is promised
// about the outputs then).
int64_t segment_rows_work(int64_t Q, int64_t R);
int64_t segment_rows_cpu(const int64_t* rows, const int64_t* pairs, int64_t Q, int64_t R,
                         int64_t* order, int64_t* urows, int64_t* offsets, int64_t* work);

// Positions of the selected slots' sub-keys in the per-half lists (CPU only; CUDA uses torch):
//   idx  [G, k]     selected slots i1 * n + i2 (G = tokens x heads)
//   half [G, 2, k]  the per-half top-k sub-key indices (distinct within a list)
//   pos  [G, 2, k]  half[g, c, pos[g, c, j]] == (c == 0 ? idx[g, j] / n : idx[g, j] % n); 0 where
//                   the list lacks it (a search never produces that)
void read_positions_cpu(const int64_t* idx, const int64_t* half, int64_t G, int64_t k, int64_t n,
                        int64_t* pos);

// Compact ids of table rows (CPU only; CUDA uses torch ops), adding the rows not seen yet:
//   slot    [R]       compact id of each table row, -1 for rows not in the compact table (updated)
//   rows    [Q]       table rows, 0 <= rows[j] < R;  cid [Q]: out, slot[rows[j]] after the call
//   touched [cap]     touched[u]: the table row held by compact row u; rows [U, new U) appended
//   table   [R, D]    a new row's values are copied to compact [cap, D] at its id (both null:
//                     no copy; the caller copies them, e.g. scatter_rows' undo log)
// New rows get ids U, U + 1, ... in the order of their first occurrence in rows. Returns the new
// U. A row id outside [0, R) throws std::invalid_argument, more than cap rows std::length_error;
// slot is then as it was before the call.
template <typename T>
int64_t map_rows_cpu(int64_t* slot, int64_t R, const int64_t* rows, int64_t Q, int64_t* cid,
                     int64_t* touched, int64_t U, int64_t cap, const T* table, T* compact,
                     int64_t D);

// The value write's pair coefficients from segments (CPU only): for every pair p of segment u,
// coef[p] = (scale * w[p]) * (1 / count_u), rounded in T in that order (1 / count_u computed in
// double); 0 for the pairs of [0, Q) in no segment. order's ids must lie in [0, Q).
template <typename T>
void segment_coefs_cpu(const int64_t* offsets, int64_t U, const int64_t* order, const T* w,
                       double scale, int64_t Q, T* coef);

// Dot sub-scores of selected product-key slots (CPU only; the static PKM's read): for token m,
// head h and slot j (idx [M, H, k], each in [0, n * n)), with g = m / tokens_per_group,
//   s[m, h, 0, j] = q[m, h, 0, :] . K[g, h, 0, idx / n, :],  s[m, h, 1, j] = q[m, h, 1, :] . K[g, h, 1, idx % n, :]
// q [M, H, 2, D], K [G, H, 2, n, D], s [M, H, 2, k]. Each dot is summed as gather_dot sums it, so
// s is pair_scores' values over read_kid's rows, bit for bit; a half row that several slots of
// one (token, head) share is dotted once. An index outside [0, n * n) throws
// std::invalid_argument (naming idx) before anything is written.
template <typename T>
void slot_scores_cpu(const T* q, const T* K, const int64_t* idx, int64_t M, int64_t H, int64_t n,
                     int64_t D, int64_t k, int64_t tokens_per_group, T* s);

// Whether every element of x [n] is finite with |x| <= lim (CPU only; lim >= 0 finite: the
// largest number a caller allows, e.g. T's maximum for "finite"): one pass comparing the bits of
// |x| as unsigned integers (NaN and the infinities have the largest exponent, so they exceed every
// finite lim), which vectorizes and parallelizes without a floating-point reduction.
template <typename T>
bool all_within_cpu(const T* x, int64_t n, T lim);

// Squared norms of R rows (CPU only): out[r] = x[r, :] . x[r, :], summed as gather_dot sums (in
// lanes combined by a fixed tree): the IDW distance's ||q||^2 and ||K_r||^2.
template <typename T>
void row_norms_cpu(const T* x, int64_t R, int64_t D, T* out);

// The read weights of M tokens (CPU only; CUDA uses torch.softmax): token m's selected slot
// (h, j) scores a = s[g0, pos[g0, j]] + s[g0 + 1, pos[g0 + 1, j]] with g0 = (m * H + h) * 2 (its
// two sub-scores: the per-half pair scores s [M * H * 2, k] at read_positions' pos), and
// w [M, H * k] is the softmax of a over all H * k slots of the token: the maximum subtracted,
// exp, divided by the sum accumulated in slot order, each rounded in T. NaN propagates; pos must
// lie in [0, k).
template <typename T>
void read_weights_cpu(const T* s, const int64_t* pos, int64_t M, int64_t H, int64_t k, T* w);

// One window of an in-place streaming call, whole (CPU only; csrc/cpu/window.cpp): what the
// window loop of recurrence.forward does, kernel after kernel, for a window that writes when
// the call keeps nothing for a backward, writes the value table in place behind an undo log,
// and every token enters the addressing loss. The same kernels' arithmetic on the same data, in
// the same order for every row and token, as the loop's op-by-op path, so the same results bit
// for bit, without the ~130 torch operations around them per window (and with one random pass
// over the value rows fewer: read_write_rows). Token (b, l) (b < B, l < L) is m = b * L + l in the
// window's own arrays and row b * Tt + l of the per-token ones (v, g, mask, the outputs: each
// points at the window's first token of sequence 0 of a [B, Tt, ...] tensor). Its memory is
// b with S > 1 (one per sequence, S == B), else 0. G = B * L * H token heads.
template <typename T>
struct WindowStep {
  const T* dots;     // query half . sub-key, as topk_select takes them with block = L (S > 1) or
                     // B L (S = 1): [S > 1 ? B : 1, H, 2, S > 1 ? L : B L, n]
                     // (IDW: the squared norms of the query halves and the sub-keys come from
                     // row_norms, as recurrence.key_norms computes them on the CPU)
  const T* K;        // [S * H * 2 * n, d2] the keys
  const T* x;        // [B * L * H * 2, d2] the query halves
  const T* v;        // [B, Tt, dv] values (targets v[t + la])
  const T* g;        // [B, Tt] gates
  const T* mask;     // [B, Tt] (every token >= 0: all enter the addressing loss)
  int64_t B, L, Tt, H, n, k, S, d2, dv, la;
  int kind;          // kIDW or kDot
  double eps;        // the IDW score's epsilon
  double lr;         // the fast-weight learning rate
  double addr_w;     // the addressing loss weight
  double ent_eps;    // the addressing loss' log epsilon
  int64_t* idx;      // out [B, Tt, H, k]
  int64_t* half;     // out [B, Tt, H, 2, k]
  T* w;              // out [B, Tt, H * k] the read weights
  T* vhat;           // out [B, Tt, dv] the read
  T* V;              // [S * n * n, dv] the value table, written in place
  T* new_keys;       // out [S * H * 2 * n, d2]
  int64_t* slot;     // the undo log as scatter_rows_logged keeps it: map_rows' slot [S n n],
  int64_t* touched;  //   touched [cap] and its count *used (updated as soon as rows are added,
  int64_t* used;     //   so that a caller can put them back whatever happens next), the rows'
  int64_t cap;       //   values before the call in log [cap, dv]
  T* log;
  int64_t* nonfinite;  // += the value rows written that hold a NaN or an infinity
  void* work;        // window_step_work(sizeof(T), B, L, H, k, S, n, dv) bytes, 64-byte aligned
};
int64_t window_step_work(int64_t elem, int64_t B, int64_t L, int64_t H, int64_t k, int64_t S,
                         int64_t n, int64_t dv);
// Returns the number of rows of new_keys that hold a NaN or an infinity.
template <typename T>
int64_t window_step_cpu(const WindowStep<T>& a);

#ifdef FWPKM_WITH_CUDA
// CUDA versions: same contracts, device pointers, enqueued on `stream` (a cudaStream_t).
// Each throws std::runtime_error naming the op on a CUDA error. Reduced-precision q/v are
// handled in Python (dot products come out of torch's GEMM and are upcast before topk_select).
template <typename T>
void topk_select_cuda(const T* dots, const T* qn, const T* kn, int64_t M, int64_t H, int64_t n,
                      int64_t k, int64_t tokens_per_group, int kind, double eps, int64_t* idx,
                      T* score, int64_t* half_idx, T* half_score, void* stream);
template <typename T>
void gather_rows_cuda(const T* table, int64_t R, int64_t D, const int64_t* rows, const T* w,
                      int64_t M, int64_t L, T* out, T* saved, void* stream);
template <typename T>
void gather_dot_cuda(const T* table, int64_t R, int64_t D, const int64_t* rows, const T* x,
                     int64_t M, int64_t L, T* gw, void* stream);
template <typename T>
void scatter_rows_cuda(T* table, int64_t R, int64_t D, const int64_t* urows, const int64_t* offsets,
                       int64_t U, const int64_t* order, const T* coef, const T* x, int64_t L,
                       void* stream);
#endif

}  // namespace fwpkm
