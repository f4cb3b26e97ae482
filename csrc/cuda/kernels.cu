// CUDA versions of the four native kernels of fwpkm_ext (contract: csrc/kernels.h), plus the
// non-deterministic scatter_rows_atomic_cuda (csrc/cuda/extra.h). See csrc/cuda/README.md.
//
// Nothing here allocates: every buffer comes from the caller, every kernel is enqueued on the
// caller's stream and every launch is checked.
#include <cuda_runtime.h>

#include <climits>
#include <cstdint>
#include <string>

#include "common.cuh"
#include "extra.h"
#include "kernels.h"

namespace fwpkm {
namespace cuda_detail {

// =====================================================================================
// topk_select
// =====================================================================================
//
// One warp per (token m, head h). For each half c:
//   phase 1: lane j scans sub-keys i = j, j+32, ... computing the sub-score and keeps its own
//            top-`cap` list (sorted, in shared memory, column j of a [cap][32] array);
//   phase 2: k rounds of a warp arg-max over the 32 list heads; the winner lane pops its head.
// Then the k x k candidates (a_i + b_j, slot I1[i]*n + I2[j]) go through the same two phases.
//
// Order: descending score, ties broken by the smaller index. NaN scores rank below every
// number (among themselves by index), which makes the order total, so the butterfly arg-max
// gives every lane the same winner. Indices inside one list (sub-key ids, or slots, which are
// distinct because the per-half lists hold distinct ids) are unique, so the winner lane is the
// one whose head carries the winning index.

template <typename T>
__device__ __forceinline__ bool is_nan(T v) {
  return v != v;
}

// Strict "a ranks before b".
template <typename T>
__device__ __forceinline__ bool ranks_before(T va, int ia, T vb, int ib) {
  const bool na = is_nan(va), nb = is_nan(vb);
  if (na || nb) {
    if (na != nb) return nb;  // the number ranks before the NaN
    return ia < ib;
  }
  if (va != vb) return va > vb;
  return ia < ib;
}

// One lane's sorted top-`cap` list, stored with stride 32 (column `lane` of a [cap][32] array:
// no bank conflicts, and no lane ever touches another lane's column).
template <typename T>
struct LaneTopList {
  T* v;      // &vals[0][lane]
  int* id;   // &ids[0][lane]
  int cap;
  int cnt;
  T last_v;  // the entry at cap-1 once the list is full (the admission threshold)
  int last_i;

  __device__ __forceinline__ void init(T* vals, int* ids, int capacity, int lane) {
    v = vals + lane;
    id = ids + lane;
    cap = capacity;
    cnt = 0;
    last_v = T(0);
    last_i = 0;
  }

  __device__ __forceinline__ void push(T x, int xi) {
    int pos;
    if (cnt < cap) {
      pos = cnt++;
    } else {
      if (!ranks_before(x, xi, last_v, last_i)) return;
      pos = cap - 1;  // the old last entry drops out
    }
    while (pos > 0) {
      const T pv = v[(pos - 1) * kWarp];
      const int pi = id[(pos - 1) * kWarp];
      if (!ranks_before(x, xi, pv, pi)) break;
      v[pos * kWarp] = pv;
      id[pos * kWarp] = pi;
      --pos;
    }
    v[pos * kWarp] = x;
    id[pos * kWarp] = xi;
    if (cnt == cap) {
      last_v = v[(cap - 1) * kWarp];
      last_i = id[(cap - 1) * kWarp];
    }
  }
};

// Merge the 32 lane lists of the warp; emit(r, value, index) is called by every lane for
// r = 0..k-1 in rank order (all lanes see the same values). Requires k <= total entries.
template <typename T, typename Emit>
__device__ __forceinline__ void warp_merge_lists(const LaneTopList<T>& list, int k, Emit&& emit) {
  int head = 0;
  T cv = dev_nan<T>();
  int ci = INT_MAX;  // sentinel (NaN, INT_MAX): ranks after every real entry
  if (head < list.cnt) {
    cv = list.v[0];
    ci = list.id[0];
  }
  for (int r = 0; r < k; ++r) {
    T bv = cv;
    int bi = ci;
#pragma unroll
    for (int off = kWarp / 2; off > 0; off >>= 1) {
      const T ov = __shfl_xor_sync(kFullMask, bv, off);
      const int oi = __shfl_xor_sync(kFullMask, bi, off);
      if (ranks_before(ov, oi, bv, bi)) {
        bv = ov;
        bi = oi;
      }
    }
    emit(r, bv, bi);
    if (head < list.cnt && ci == bi) {  // this lane owned the winner: pop it
      ++head;
      if (head < list.cnt) {
        cv = list.v[head * kWarp];
        ci = list.id[head * kWarp];
      } else {
        cv = dev_nan<T>();
        ci = INT_MAX;
      }
    }
  }
}

// Shared-memory layout of one warp (byte offsets from the warp's base):
//   vals [cap][32] T | hv [2][k] T | pad to 16 | ids [cap][32] int | hi [2][k] int | pad to 16
struct TopkLayout {
  int cap;
  int ids_off;
  int bytes;
};

inline int64_t round16(int64_t b) { return (b + 15) / 16 * 16; }

template <typename T>
inline TopkLayout topk_layout(int64_t n, int64_t k, int64_t& bytes64) {
  const int64_t cap1 = k < ceil_div(n, kWarp) ? k : ceil_div(n, kWarp);
  const int64_t cap2 = k < ceil_div(k * k, kWarp) ? k : ceil_div(k * k, kWarp);
  const int64_t cap = cap1 > cap2 ? cap1 : cap2;
  const int64_t entries = cap * kWarp + 2 * k;
  const int64_t ids_off = round16(entries * static_cast<int64_t>(sizeof(T)));
  bytes64 = ids_off + round16(entries * static_cast<int64_t>(sizeof(int)));
  TopkLayout lay;
  lay.cap = static_cast<int>(cap);
  lay.ids_off = static_cast<int>(ids_off);
  lay.bytes = static_cast<int>(bytes64 < INT_MAX ? bytes64 : INT_MAX);
  return lay;
}

template <typename T>
__global__ void topk_select_kernel(const T* __restrict__ dots, const T* __restrict__ qn,
                                   const T* __restrict__ kn, int64_t MH, int64_t H, int n, int k,
                                   int64_t tokens_per_group, int kind, T eps, TopkLayout lay,
                                   int64_t* __restrict__ idx, T* __restrict__ score,
                                   int64_t* __restrict__ half_idx, T* __restrict__ half_score) {
  extern __shared__ __align__(16) unsigned char topk_smem[];
  const int lane = lane_id();
  unsigned char* base = topk_smem + static_cast<size_t>(threadIdx.x / kWarp) * lay.bytes;
  T* vals = reinterpret_cast<T*>(base);
  T* hv = vals + lay.cap * kWarp;  // [2][k] per-half top-k scores
  int* ids = reinterpret_cast<int*>(base + lay.ids_off);
  int* hi = ids + lay.cap * kWarp;  // [2][k] per-half top-k sub-key ids
  const int cap1 = min(k, (n + kWarp - 1) / kWarp);
  const int cap2 = min(k, (k * k + kWarp - 1) / kWarp);
  const int kk = k * k;

  for (int64_t mh = global_warp(); mh < MH; mh += warp_count()) {
    const int64_t m = mh / H;
    const int64_t h = mh - m * H;

    for (int c = 0; c < 2; ++c) {
      const T* drow = dots + (mh * 2 + c) * n;
      const T* krow = nullptr;
      T q = T(0);
      if (kind == kIDW) {
        q = qn[mh * 2 + c];
        krow = kn + (((m / tokens_per_group) * H + h) * 2 + c) * n;
      }
      LaneTopList<T> list;
      list.init(vals, ids, cap1, lane);
      for (int i = lane; i < n; i += kWarp) {
        T s = drow[i];
        if (kind == kIDW) {
          // -log(eps + max(qn + kn - 2 dot, 0)); each operation rounded as written.
          T d2 = sub_rn(add_rn(q, krow[i]), mul_rn(T(2), s));
          d2 = d2 < T(0) ? T(0) : d2;
          s = -dev_log(add_rn(eps, d2));
        }
        list.push(s, i);
      }
      T* hv_c = hv + c * k;
      int* hi_c = hi + c * k;
      int64_t* hidx_out = half_idx ? half_idx + (mh * 2 + c) * k : nullptr;
      T* hsc_out = half_score ? half_score + (mh * 2 + c) * k : nullptr;
      warp_merge_lists(list, k, [&](int r, T v, int i) {
        if (lane == 0) {
          hv_c[r] = v;
          hi_c[r] = i;
          if (hidx_out) hidx_out[r] = i;
          if (hsc_out) hsc_out[r] = v;
        }
      });
    }
    __syncwarp();  // hv / hi written by lane 0 are read by every lane below

    {
      LaneTopList<T> list;
      list.init(vals, ids, cap2, lane);
      for (int p = lane; p < kk; p += kWarp) {
        const int a = p / k;
        const int b = p - a * k;
        const T s = add_rn(hv[a], hv[k + b]);
        const int slot = hi[a] * n + hi[k + b];
        list.push(s, slot);
      }
      int64_t* idx_out = idx + mh * k;
      T* sc_out = score + mh * k;
      warp_merge_lists(list, k, [&](int r, T v, int i) {
        if (lane == 0) {
          idx_out[r] = i;
          sc_out[r] = v;
        }
      });
    }
    __syncwarp();  // every lane is done with hv / hi before lane 0 rewrites them
  }
}

// =====================================================================================
// gather_rows: out[m] = sum_l w[m,l] * table[rows[m,l]]   (one warp per token row m)
// =====================================================================================
//
// The warp walks D in tiles of 32 * VEC * NCH elements (NCH 16-byte vectors per lane in
// registers) and, for each tile, the L pairs in order: acc += w * row with separately rounded
// multiply and add, the same bits as a sequential non-FMA CPU loop. (rows, w) are fetched 32
// at a time (one coalesced load) and broadcast by shuffles.
template <typename T, int VEC, int NCH>
__global__ void __launch_bounds__(kBlockThreads)
    gather_rows_kernel(const T* __restrict__ table, int64_t D, const int64_t* __restrict__ rows,
                       const T* __restrict__ w, int64_t M, int64_t L, T* __restrict__ out,
                       T* __restrict__ saved) {
  constexpr int64_t kTile = int64_t(kWarp) * VEC * NCH;
  const int lane = lane_id();
  for (int64_t m = global_warp(); m < M; m += warp_count()) {
    const int64_t* rows_m = rows + m * L;
    const T* w_m = w + m * L;
    for (int64_t d0 = 0; d0 < D; d0 += kTile) {
      T acc[NCH][VEC];
#pragma unroll
      for (int c = 0; c < NCH; ++c)
#pragma unroll
        for (int e = 0; e < VEC; ++e) acc[c][e] = T(0);

      for (int64_t lb = 0; lb < L; lb += kWarp) {
        const int cnt = static_cast<int>(L - lb < kWarp ? L - lb : kWarp);
        int64_t my_row = 0;
        T my_w = T(0);
        if (lane < cnt) {
          my_row = rows_m[lb + lane];
          my_w = w_m[lb + lane];
        }
        for (int j = 0; j < cnt; ++j) {
          const int64_t r = __shfl_sync(kFullMask, my_row, j);
          const T wl = __shfl_sync(kFullMask, my_w, j);
          const T* src = table + r * D;
          T* dst = saved ? saved + (m * L + lb + j) * D : nullptr;
#pragma unroll
          for (int c = 0; c < NCH; ++c) {
            const int64_t d = d0 + (int64_t(c) * kWarp + lane) * VEC;
            if (d < D) {
              const Pack<T, VEC> p = load_pack<T, VEC>(src + d);
#pragma unroll
              for (int e = 0; e < VEC; ++e) acc[c][e] = madd_rn(acc[c][e], wl, p.v[e]);
              if (dst) store_pack<T, VEC>(dst + d, p);
            }
          }
        }
      }

#pragma unroll
      for (int c = 0; c < NCH; ++c) {
        const int64_t d = d0 + (int64_t(c) * kWarp + lane) * VEC;
        if (d < D) {
          Pack<T, VEC> p;
#pragma unroll
          for (int e = 0; e < VEC; ++e) p.v[e] = acc[c][e];
          store_pack<T, VEC>(out + m * D + d, p);
        }
      }
    }
  }
}

// =====================================================================================
// gather_dot: gw[m,l] = table[rows[m,l]] . x[m]   (one warp per pair (m,l))
// =====================================================================================
//
// Per-lane partial sums over a fixed element assignment, then a butterfly shuffle reduction:
// deterministic (fixed order) but not the sequential CPU order, so it may differ from the CPU
// in the last bits.
template <typename T, int VEC, int NCH>
__global__ void __launch_bounds__(kBlockThreads)
    gather_dot_kernel(const T* __restrict__ table, int64_t D, const int64_t* __restrict__ rows,
                      const T* __restrict__ x, int64_t ML, int64_t L, T* __restrict__ gw) {
  constexpr int64_t kTile = int64_t(kWarp) * VEC * NCH;
  const int lane = lane_id();
  for (int64_t q = global_warp(); q < ML; q += warp_count()) {
    const int64_t m = q / L;
    const T* a = table + rows[q] * D;
    const T* b = x + m * D;
    T part[NCH];
#pragma unroll
    for (int c = 0; c < NCH; ++c) part[c] = T(0);
    for (int64_t d0 = 0; d0 < D; d0 += kTile) {
#pragma unroll
      for (int c = 0; c < NCH; ++c) {
        const int64_t d = d0 + (int64_t(c) * kWarp + lane) * VEC;
        if (d < D) {
          const Pack<T, VEC> pa = load_pack<T, VEC>(a + d);
          const Pack<T, VEC> pb = load_pack<T, VEC>(b + d);
#pragma unroll
          for (int e = 0; e < VEC; ++e) part[c] = fma_dev(pa.v[e], pb.v[e], part[c]);
        }
      }
    }
    T s = part[0];
#pragma unroll
    for (int c = 1; c < NCH; ++c) s += part[c];
#pragma unroll
    for (int off = kWarp / 2; off > 0; off >>= 1) s += __shfl_xor_sync(kFullMask, s, off);
    if (lane == 0) gw[q] = s;
  }
}

// =====================================================================================
// scatter_rows (deterministic): one warp per unique row u
// =====================================================================================
//
// table[urows[u]] += sum_{p in [offsets[u], offsets[u+1])} coef[order[p]] * x[order[p] / L]
// The warp walks D in register tiles; for each tile it loads the table row into registers,
// adds the pair terms in segment order (row += coef * x, separately rounded multiply and add:
// the same bits as the sequential CPU loop of csrc/cpu/kernels.cpp) and stores the row once.
// urows are distinct, so each row has exactly one writer: no atomics, and the result does
// not depend on scheduling.
template <typename T, int VEC, int NCH>
__global__ void __launch_bounds__(kBlockThreads)
    scatter_rows_kernel(T* __restrict__ table, int64_t D, const int64_t* __restrict__ urows,
                        const int64_t* __restrict__ offsets, int64_t U,
                        const int64_t* __restrict__ order, const T* __restrict__ coef,
                        const T* __restrict__ x, int64_t L) {
  constexpr int64_t kTile = int64_t(kWarp) * VEC * NCH;
  const int lane = lane_id();
  for (int64_t u = global_warp(); u < U; u += warp_count()) {
    const int64_t s0 = offsets[u];
    const int64_t s1 = offsets[u + 1];
    if (s1 <= s0) continue;  // empty segment: row untouched (warp-uniform branch)
    T* dst = table + urows[u] * D;
    for (int64_t d0 = 0; d0 < D; d0 += kTile) {
      T acc[NCH][VEC];
#pragma unroll
      for (int c = 0; c < NCH; ++c) {
        const int64_t d = d0 + (int64_t(c) * kWarp + lane) * VEC;
        if (d < D) {
          const Pack<T, VEC> p = load_pack<T, VEC>(dst + d);
#pragma unroll
          for (int e = 0; e < VEC; ++e) acc[c][e] = p.v[e];
        } else {
#pragma unroll
          for (int e = 0; e < VEC; ++e) acc[c][e] = T(0);
        }
      }

      for (int64_t pb = s0; pb < s1; pb += kWarp) {
        const int cnt = static_cast<int>(s1 - pb < kWarp ? s1 - pb : kWarp);
        int64_t my_off = 0;  // offset of the pair's x row: (pid / L) * D
        T my_coef = T(0);
        if (lane < cnt) {
          const int64_t pid = order[pb + lane];
          my_coef = coef[pid];
          my_off = (pid / L) * D;
        }
        for (int j = 0; j < cnt; ++j) {
          const T* src = x + __shfl_sync(kFullMask, my_off, j);
          const T cj = __shfl_sync(kFullMask, my_coef, j);
#pragma unroll
          for (int c = 0; c < NCH; ++c) {
            const int64_t d = d0 + (int64_t(c) * kWarp + lane) * VEC;
            if (d < D) {
              const Pack<T, VEC> p = load_pack<T, VEC>(src + d);
#pragma unroll
              for (int e = 0; e < VEC; ++e) acc[c][e] = madd_rn(acc[c][e], cj, p.v[e]);
            }
          }
        }
      }

#pragma unroll
      for (int c = 0; c < NCH; ++c) {
        const int64_t d = d0 + (int64_t(c) * kWarp + lane) * VEC;
        if (d < D) {
          Pack<T, VEC> p;
#pragma unroll
          for (int e = 0; e < VEC; ++e) p.v[e] = acc[c][e];
          store_pack<T, VEC>(dst + d, p);
        }
      }
    }
  }
}

// =====================================================================================
// scatter_rows_atomic (non-deterministic): one warp per pair, atomicAdd
// =====================================================================================
template <typename T>
__global__ void __launch_bounds__(kBlockThreads)
    scatter_rows_atomic_kernel(T* __restrict__ table, int64_t D,
                               const int64_t* __restrict__ urows,
                               const int64_t* __restrict__ offsets, int64_t U,
                               const int64_t* __restrict__ order, const T* __restrict__ coef,
                               const T* __restrict__ x, int64_t L) {
  const int lane = lane_id();
  const int64_t p0 = offsets[0];
  const int64_t p1 = offsets[U];
  for (int64_t p = p0 + global_warp(); p < p1; p += warp_count()) {
    // Invariant: offsets[lo] <= p < offsets[hi]; ends with p in segment lo (non-empty).
    int64_t lo = 0, hi = U;
    while (hi - lo > 1) {
      const int64_t mid = lo + (hi - lo) / 2;
      if (offsets[mid] <= p) {
        lo = mid;
      } else {
        hi = mid;
      }
    }
    T* dst = table + urows[lo] * D;
    const int64_t pid = order[p];
    const T cp = coef[pid];
    const T* src = x + (pid / L) * D;
    for (int64_t d = lane; d < D; d += kWarp) atomicAdd(dst + d, mul_rn(cp, src[d]));
  }
}

}  // namespace cuda_detail

// =====================================================================================
// Host entry points
// =====================================================================================

template <typename T>
void topk_select_cuda(const T* dots, const T* qn, const T* kn, int64_t M, int64_t H, int64_t n,
                      int64_t k, int64_t tokens_per_group, int kind, double eps, int64_t* idx,
                      T* score, int64_t* half_idx, T* half_score, void* stream) {
  using namespace cuda_detail;
  static const char* op = "topk_select_cuda";
  if (M < 0 || H < 0 || n < 0 || k < 0) bad_arg(op, "negative size");
  if (M == 0 || H == 0 || k == 0) return;
  if (k > n) bad_arg(op, "need k <= n (k = " + std::to_string(k) + ", n = " + std::to_string(n) + ")");
  if (n > 46340) bad_arg(op, "n too large (slot n*n must fit in int32), n = " + std::to_string(n));
  if (kind != kIDW && kind != kDot) bad_arg(op, "unknown score kind " + std::to_string(kind));
  if (kind == kIDW) {
    if (qn == nullptr || kn == nullptr) bad_arg(op, "IDW needs qn and kn");
    if (tokens_per_group <= 0) bad_arg(op, "tokens_per_group must be positive");
  }
  if (dots == nullptr || idx == nullptr || score == nullptr) bad_arg(op, "null buffer");

  int64_t bytes64 = 0;
  const TopkLayout lay = topk_layout<T>(n, k, bytes64);
  if (bytes64 > kMaxSmemBytes) {
    bad_arg(op, "k = " + std::to_string(k) + " needs " + std::to_string(bytes64) +
                    " bytes of shared memory per warp (max " + std::to_string(kMaxSmemBytes) +
                    "); k <= 64 always fits");
  }
  int wpb = static_cast<int>(kMaxSmemBytes / bytes64);
  if (wpb > 4) wpb = 4;
  if (wpb < 1) wpb = 1;
  const int64_t MH = M * H;
  const unsigned blocks = grid_blocks(MH, wpb);
  const size_t smem = static_cast<size_t>(wpb) * static_cast<size_t>(lay.bytes);
  topk_select_kernel<T><<<blocks, wpb * kWarp, smem, static_cast<cudaStream_t>(stream)>>>(
      dots, qn, kn, MH, H, static_cast<int>(n), static_cast<int>(k), tokens_per_group, kind,
      static_cast<T>(eps), lay, idx, score, half_idx, half_score);
  check_launch(op);
}

template <typename T>
void gather_rows_cuda(const T* table, int64_t R, int64_t D, const int64_t* rows, const T* w,
                      int64_t M, int64_t L, T* out, T* saved, void* stream) {
  using namespace cuda_detail;
  static const char* op = "gather_rows_cuda";
  (void)R;
  if (M < 0 || D < 0 || L < 0) bad_arg(op, "negative size");
  if (M == 0 || D == 0) return;
  const bool vec = D % vec_width<T>() == 0 && aligned16(table) && aligned16(out) && aligned16(saved);
  const unsigned blocks = grid_blocks(M, kWarpsPerBlock);
  cudaStream_t s = static_cast<cudaStream_t>(stream);
  dispatch_vec<T>(vec, D, [&](auto vc, auto nc) {
    constexpr int VEC = decltype(vc)::value;
    constexpr int NCH = decltype(nc)::value;
    gather_rows_kernel<T, VEC, NCH><<<blocks, kBlockThreads, 0, s>>>(table, D, rows, w, M, L, out, saved);
  });
  check_launch(op);
}

template <typename T>
void gather_dot_cuda(const T* table, int64_t R, int64_t D, const int64_t* rows, const T* x,
                     int64_t M, int64_t L, T* gw, void* stream) {
  using namespace cuda_detail;
  static const char* op = "gather_dot_cuda";
  (void)R;
  if (M < 0 || D < 0 || L < 0) bad_arg(op, "negative size");
  const int64_t ML = M * L;
  if (ML == 0) return;  // D == 0 still writes gw = 0
  const bool vec = D % vec_width<T>() == 0 && aligned16(table) && aligned16(x);
  const unsigned blocks = grid_blocks(ML, kWarpsPerBlock);
  cudaStream_t s = static_cast<cudaStream_t>(stream);
  dispatch_vec<T>(vec, D, [&](auto vc, auto nc) {
    constexpr int VEC = decltype(vc)::value;
    constexpr int NCH = decltype(nc)::value;
    gather_dot_kernel<T, VEC, NCH><<<blocks, kBlockThreads, 0, s>>>(table, D, rows, x, ML, L, gw);
  });
  check_launch(op);
}

template <typename T>
void scatter_rows_cuda(T* table, int64_t R, int64_t D, const int64_t* urows, const int64_t* offsets,
                       int64_t U, const int64_t* order, const T* coef, const T* x, int64_t L,
                       void* stream) {
  using namespace cuda_detail;
  static const char* op = "scatter_rows_cuda";
  (void)R;
  if (U < 0 || D < 0) bad_arg(op, "negative size");
  if (L < 0) bad_arg(op, "negative size");
  if (U == 0 || D == 0 || L == 0) return;  // L == 0: no pair ids exist, every segment is empty
  const bool vec = D % vec_width<T>() == 0 && aligned16(table) && aligned16(x);
  const unsigned blocks = grid_blocks(U, kWarpsPerBlock);
  cudaStream_t s = static_cast<cudaStream_t>(stream);
  dispatch_vec<T>(vec, D, [&](auto vc, auto nc) {
    constexpr int VEC = decltype(vc)::value;
    constexpr int NCH = decltype(nc)::value;
    scatter_rows_kernel<T, VEC, NCH><<<blocks, kBlockThreads, 0, s>>>(table, D, urows, offsets, U,
                                                                       order, coef, x, L);
  });
  check_launch(op);
}

template <typename T>
void scatter_rows_atomic_cuda(T* table, int64_t R, int64_t D, const int64_t* urows,
                              const int64_t* offsets, int64_t U, const int64_t* order,
                              const T* coef, const T* x, int64_t L, void* stream) {
  using namespace cuda_detail;
  static const char* op = "scatter_rows_atomic_cuda";
  (void)R;
  if (U < 0 || D < 0) bad_arg(op, "negative size");
  if (L < 0) bad_arg(op, "negative size");
  if (U == 0 || D == 0 || L == 0) return;  // L == 0: no pair ids exist, every segment is empty
  // The pair count offsets[U] - offsets[0] lives on the device; size the grid from U (about
  // two pairs per row) and let the grid-stride loop take the rest.
  const unsigned blocks = grid_blocks(2 * U, kWarpsPerBlock);
  scatter_rows_atomic_kernel<T><<<blocks, kBlockThreads, 0, static_cast<cudaStream_t>(stream)>>>(
      table, D, urows, offsets, U, order, coef, x, L);
  check_launch(op);
}

// ---------------------------------------------------------------- explicit instantiations

#define FWPKM_INSTANTIATE_CUDA(T)                                                                 \
  template void topk_select_cuda<T>(const T*, const T*, const T*, int64_t, int64_t, int64_t,      \
                                    int64_t, int64_t, int, double, int64_t*, T*, int64_t*, T*,    \
                                    void*);                                                       \
  template void gather_rows_cuda<T>(const T*, int64_t, int64_t, const int64_t*, const T*,         \
                                    int64_t, int64_t, T*, T*, void*);                             \
  template void gather_dot_cuda<T>(const T*, int64_t, int64_t, const int64_t*, const T*, int64_t, \
                                   int64_t, T*, void*);                                           \
  template void scatter_rows_cuda<T>(T*, int64_t, int64_t, const int64_t*, const int64_t*,        \
                                     int64_t, const int64_t*, const T*, const T*, int64_t, void*);\
  template void scatter_rows_atomic_cuda<T>(T*, int64_t, int64_t, const int64_t*, const int64_t*, \
                                            int64_t, const int64_t*, const T*, const T*, int64_t, \
                                            void*);

FWPKM_INSTANTIATE_CUDA(float)
FWPKM_INSTANTIATE_CUDA(double)

#undef FWPKM_INSTANTIATE_CUDA

}  // namespace fwpkm
