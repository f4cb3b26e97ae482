// CPU versions of the native kernels (contracts in ../kernels.h).
// Every output element is produced by exactly one thread in a fixed order, so results are
// bit-identical from run to run whatever the thread count.
//
// This file is compiled once per instruction set (isa.h): as is, into fwpkm::isa_base, and by
// kernels_avx2.cpp with AVX2 and FMA into fwpkm::isa_avx2. dispatch.cpp picks one at load time.
#include "../kernels.h"
#include "isa.h"

#include <algorithm>
#include <cstdint>
#include <cmath>
#include <cstring>
#include <utility>
#include <vector>

#ifdef _OPENMP
#include <omp.h>
#endif
#if defined(__AVX2__)
#include <immintrin.h>
#endif

#ifndef FWPKM_CPU_ISA
#define FWPKM_CPU_ISA isa_base
#endif

namespace fwpkm {
namespace FWPKM_CPU_ISA {
namespace {

// This file is compiled once per instruction set into one module, so any template that the two
// compilations instantiate with the same arguments (std::vector<float>'s growth, std::sort with
// std::greater, std::to_string) would be one weak symbol of which the linker keeps a single
// copy, maybe the AVX2 one, which the default variant would then run on CPUs without AVX2.
// Every standard template here is therefore instantiated with a type of this anonymous
// namespace (an allocator, a comparator): local to each compilation. Error messages are built
// outside, in dispatch.cpp (bad_row). The check: `nm -C` of kernels_avx2's object lists no weak
// std:: definition.
template <typename T>
struct LocalAlloc : std::allocator<T> {
  using value_type = T;
  template <typename U>
  struct rebind {
    using other = LocalAlloc<U>;
  };
  LocalAlloc() = default;
  template <typename U>
  LocalAlloc(const LocalAlloc<U>&) {}
};
template <typename T>
using Vec = std::vector<T, LocalAlloc<T>>;
struct Greater {
  template <typename A>
  bool operator()(const A& a, const A& b) const { return a > b; }
};

// (score, index) ordering used everywhere: higher score first, then smaller index. NaN scores
// rank below every number (among themselves by index), as in the CUDA kernel: the order is total,
// so both backends select the same slots even from NaN scores.
template <typename T>
inline bool ranks_before(T sa, int64_t ia, T sb, int64_t ib) {
  const bool na = sa != sa, nb = sb != sb;
  if (na || nb) return na != nb ? nb : ia < ib;
  return sa > sb || (sa == sb && ia < ib);
}

// Insert (s, i) into the sorted buffer of length `count` (capacity k); returns the new count.
template <typename T>
inline int64_t insert_sorted(T* buf_s, int64_t* buf_i, int64_t count, int64_t k, T s, int64_t i) {
  if (count == k && !ranks_before(s, i, buf_s[k - 1], buf_i[k - 1])) return count;
  int64_t pos = count < k ? count : k - 1;
  while (pos > 0 && ranks_before(s, i, buf_s[pos - 1], buf_i[pos - 1])) {
    buf_s[pos] = buf_s[pos - 1];
    buf_i[pos] = buf_i[pos - 1];
    --pos;
  }
  buf_s[pos] = s;
  buf_i[pos] = i;
  return count < k ? count + 1 : count;
}

// Top-k of v[0..n) into (bs, bi), sorted by (value desc, index asc); returns min(n, k). The
// common case, a candidate strictly worse than the k-th, costs one comparison; NaN and ties take
// the full rule in insert_sorted.
template <typename T>
inline int64_t scan_topk(const T* v, int64_t n, int64_t k, T* bs, int64_t* bi) {
  int64_t count = 0;
  for (int64_t i = 0; i < n; ++i) {
    if (count == k && v[i] < bs[k - 1]) continue;
    count = insert_sorted(bs, bi, count, k, v[i], i);
  }
  return count;
}

// Per-thread scratch of select_topk (sized by topk_select_cpu).
template <typename T>
struct TopkScratch {
  Vec<T> maxima;                       // block maxima, then a copy of them to rank
  Vec<std::pair<T, int64_t>> cand;     // candidates at or above the threshold
  Vec<T> nd;                           // IDW: the negated distances
  Vec<uint64_t> keys;                  // float candidates as packed rank keys
  Vec<T> cv;                           // AVX2 float: the candidates' values (collect_rank, the
  Vec<int32_t> ci;                     // merge) and their indices
  int64_t blocks = 0;                          // the last select_topk's blocks (0: plain scan)
};

// The (score, index) order of ranks_before for float scores as one unsigned integer: the score's
// bits made monotone (-0 counted as +0, every NaN below -inf) above the complement of the index.
// Ranking candidates then compares integers: no NaN branches, no pair loads (the partial sort of
// pairs was a third of a PKM k = 32 top-k).
inline uint64_t rank_key(float v, int64_t i) {
  uint32_t b;
  std::memcpy(&b, &v, sizeof b);
  uint32_t ord;
  if (v != v) {
    ord = 0u;
  } else if (v == 0.0f) {
    ord = 0x80000000u;
  } else {
    ord = (b & 0x80000000u) ? ~b : (b | 0x80000000u);
  }
  return (uint64_t(ord) << 32) | uint64_t(0xffffffffu - uint32_t(i));
}

// The k best of c candidates, sorted, into (bs, bi): the generic pair ranking, and for float the
// packed keys (the same order; indices below 2^32).
template <typename T>
inline int64_t rank_candidates(const T* v, std::pair<T, int64_t>* cand, int64_t c, int64_t k,
                               T* bs, int64_t* bi, Vec<uint64_t>&) {
  const int64_t take = c < k ? c : k;
  std::partial_sort(cand, cand + take, cand + c, [](const std::pair<T, int64_t>& a,
                                                      const std::pair<T, int64_t>& b) {
    return ranks_before(a.first, a.second, b.first, b.second);
  });
  for (int64_t j = 0; j < take; ++j) {
    bs[j] = v[cand[j].second];
    bi[j] = cand[j].second;
  }
  return take;
}
// The k best of c packed rank keys (key[0, c) filled), sorted, into (bs, bi), bs[j] = v[bi[j]].
inline int64_t take_ranked(uint64_t* key, int64_t c, int64_t k, const float* v, float* bs,
                           int64_t* bi) {
  const int64_t take = c < k ? c : k;
  if (c > take) std::nth_element(key, key + (take - 1), key + c, Greater());
  std::sort(key, key + take, Greater());
  for (int64_t j = 0; j < take; ++j) {
    bi[j] = int64_t(0xffffffffu - uint32_t(key[j]));
    bs[j] = v[bi[j]];
  }
  return take;
}
inline int64_t rank_candidates(const float* v, std::pair<float, int64_t>* cand, int64_t c,
                               int64_t k, float* bs, int64_t* bi, Vec<uint64_t>& keys) {
  uint64_t* key = keys.data();
  for (int64_t j = 0; j < c; ++j) key[j] = rank_key(cand[j].first, cand[j].second);
  return take_ranked(key, c, k, v, bs, bi);
}

// The candidates of select_topk: the elements not below t0 (NaN included: it ranks last), from
// the blocks whose maximum is not below t0 (a NaN maximum: scanned). Which extra NaN a variant
// collects does not change the top k: at least k numbers are at or above t0.
template <typename T>
inline int64_t collect_candidates(const T* v, int64_t n, T t0, const T* mx, int64_t nb,
                                  std::pair<T, int64_t>* cand) {
  int64_t c = 0;
  for (int64_t b = 0; b < nb; ++b) {
    if (mx[b] < t0) continue;
    for (int64_t i = b; i < n; i += nb) {
      cand[c] = {v[i], i};
      c += !(v[i] < t0);
    }
  }
  return c;
}

// Selection by counting (AVX2, float). Among distinct numbers, x is the r-th largest (from 0)
// when exactly r numbers are greater than it: one broadcast compare per pair, no branches, where
// nth_element and partial sorts on a few dozen numbers branch unpredictably at every step (they
// were two thirds of PKM's k = 32 selection; for FwPKM's k = 8 counting also beats a sorted
// register of the 8 best, 1.47 -> 1.07 us per (token, head)). Ties are found, not ranked: the
// callers then take the general path.
template <typename T>
inline bool kth_largest_count(const T*, int64_t, int64_t, T*) {
  return false;
}
template <typename T>
inline int64_t rank_by_count(T*, const int32_t*, int64_t, int64_t, T*, int64_t*) {
  return -1;
}
template <typename T>
inline bool merge_by_count(const T*, const int64_t*, int64_t, int64_t, T*, int64_t*, TopkScratch<T>&) {
  return false;
}
template <typename T>
inline int64_t collect_rank(const T*, int64_t, T, int64_t, T*, int64_t*, TopkScratch<T>&) {
  return -1;
}
#if defined(__AVX2__)
constexpr int64_t kCountMax = 128;  // rank_by_count's most candidates (the work grows as c^2)

// For each of the 16 numbers in x0, x1: how many of v[0, nv) are greater (the lanes of c0, c1).
inline void count_above(const float* v, int64_t nv, __m256 x0, __m256 x1, __m256i* c0, __m256i* c1) {
  __m256i a0 = _mm256_setzero_si256(), a1 = _mm256_setzero_si256();
  for (int64_t j = 0; j < nv; ++j) {
    const __m256 y = _mm256_set1_ps(v[j]);
    a0 = _mm256_sub_epi32(a0, _mm256_castps_si256(_mm256_cmp_ps(y, x0, _CMP_GT_OQ)));
    a1 = _mm256_sub_epi32(a1, _mm256_castps_si256(_mm256_cmp_ps(y, x1, _CMP_GT_OQ)));
  }
  *c0 = a0;
  *c1 = a1;
}

// The k-th largest of nb numbers (no NaN; nb a multiple of 8, at most kCountMax) into *t: the
// least number with fewer than k numbers above it. Equal numbers need no care here.
inline bool kth_largest_count(const float* v, int64_t nb, int64_t k, float* t) {
  if (nb % 8 || nb > kCountMax || k > nb) return false;
  const __m256 inf = _mm256_set1_ps(__builtin_huge_valf());
  const __m256i kk = _mm256_set1_epi32(int(k));
  __m256 low = inf;
  for (int64_t i = 0; i < nb; i += 16) {  // two blocks of 8 per pass over the numbers
    const bool two = i + 8 < nb;
    const __m256 x0 = _mm256_loadu_ps(v + i), x1 = two ? _mm256_loadu_ps(v + i + 8) : inf;
    __m256i c0, c1;
    count_above(v, nb, x0, x1, &c0, &c1);
    low = _mm256_min_ps(low, _mm256_blendv_ps(inf, x0, _mm256_castsi256_ps(_mm256_cmpgt_epi32(kk, c0))));
    if (two)
      low = _mm256_min_ps(low, _mm256_blendv_ps(inf, x1, _mm256_castsi256_ps(_mm256_cmpgt_epi32(kk, c1))));
  }
  alignas(32) float out[8];
  _mm256_store_ps(out, low);
  float m = out[0];
  for (int j = 1; j < 8; ++j) m = out[j] < m ? out[j] : m;
  *t = m;
  return true;
}

// The k best of c candidates, sorted, into (bs, bi): values cv (numbers, no NaN; cv must have
// room for 16 more, which are overwritten), their indices ci. Candidate i goes to place r_i, the
// number of candidates above it. Returns min(c, k), or -1 when c > kCountMax or two candidates
// are equal (their order would need the indices: the caller ranks them in general).
inline int64_t rank_by_count(float* cv, const int32_t* ci, int64_t c, int64_t k, float* bs,
                             int64_t* bi) {
  if (c > kCountMax) return -1;
  const float ninf = -__builtin_huge_valf();
  for (int64_t j = c; j < c + 16; ++j) cv[j] = ninf;  // padding: above no candidate
  alignas(32) int32_t r[kCountMax + 16];
  for (int64_t i = 0; i < c; i += 16) {
    __m256i c0, c1;
    count_above(cv, c, _mm256_loadu_ps(cv + i), _mm256_loadu_ps(cv + i + 8), &c0, &c1);
    _mm256_store_si256(reinterpret_cast<__m256i*>(r + i), c0);
    _mm256_store_si256(reinterpret_cast<__m256i*>(r + i + 8), c1);
  }
  // distinct values give distinct places 0..c-1; a tie leaves a place empty
  int32_t at[kCountMax];
  uint64_t seen[kCountMax / 64] = {};
  for (int64_t i = 0; i < c; ++i) {
    at[r[i]] = int32_t(i);
    seen[r[i] >> 6] |= uint64_t(1) << (r[i] & 63);
  }
  for (int64_t w = 0; w * 64 < c; ++w) {
    const int64_t bits = c - w * 64 < 64 ? c - w * 64 : 64;
    if (seen[w] != (bits == 64 ? ~uint64_t(0) : (uint64_t(1) << bits) - 1)) return -1;
  }
  const int64_t take = c < k ? c : k;
  for (int64_t j = 0; j < take; ++j) {
    bs[j] = cv[at[j]];
    bi[j] = ci[at[j]];
  }
  return take;
}

// Left-packing: kPack[m] lists the set lanes of the 8-bit mask m, in order (one byte each).
struct PackTable {
  uint64_t lanes[256];
  constexpr PackTable() : lanes() {
    for (int m = 0; m < 256; ++m) {
      uint64_t v = 0;
      int o = 0;
      for (int b = 0; b < 8; ++b)
        if (m >> b & 1) v |= uint64_t(b) << (8 * o++);
      lanes[m] = v;
    }
  }
};
constexpr PackTable kPack{};
// Stores the lanes of (x, idx) selected by the mask m at cv + c, ci + c (8 lanes written).
inline int64_t pack_lanes(__m256 x, __m256i idx, unsigned m, float* cv, int32_t* ci, int64_t c) {
  const __m256i perm = _mm256_cvtepu8_epi32(_mm_cvtsi64_si128(int64_t(kPack.lanes[m])));
  _mm256_storeu_ps(cv + c, _mm256_permutevar8x32_ps(x, perm));
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(ci + c), _mm256_permutevar8x32_epi32(idx, perm));
  return c + __builtin_popcount(m);
}

// The k x k merge of topk_select by counting (k a multiple of 8, finite half scores): the sums
// of a's row and b's column fall (weakly, also when rounded or overflowed) as a and b grow, so
// the corner a' <= a, b' < m_a with m_a = ceil(k / (a + 1)) holds >= k sums at or above its last
// one; the best of those corners bounds the k-th sum from below, and the sums at or above the
// bound (~2-3 k) are ranked by counting. The sums are the scalar merge's (one rounding each).
// Returns false where that path must run: a non-finite half score, too many candidates, a tie.
inline bool merge_by_count(const float* hsc, const int64_t* hidx, int64_t k, int64_t n, float* os,
                           int64_t* oi, TopkScratch<float>& w) {
  if (k % 8 || k * k > int64_t(1) << 30) return false;
  for (int64_t j = 0; j < 2 * k; ++j)
    if (!(hsc[j] - hsc[j] == 0.0f)) return false;  // inf or NaN
  const float* hb = hsc + k;
  float t = -__builtin_huge_valf();
  for (int64_t a = 0; a < k; ++a) {
    const float s = hsc[a] + hb[(k + a) / (a + 1) - 1];
    t = s > t ? s : t;
  }
  float* cv = w.cv.data();
  int32_t* ci = w.ci.data();
  const __m256 tv = _mm256_set1_ps(t);
  const __m256i lane = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
  int64_t c = 0;
  for (int64_t a = 0; a < k && !(hsc[a] + hb[0] < t); ++a) {
    const __m256 ha = _mm256_set1_ps(hsc[a]);
    for (int64_t b = 0; b < k; b += 8) {
      const __m256 x = _mm256_add_ps(ha, _mm256_loadu_ps(hb + b));
      const unsigned m = unsigned(_mm256_movemask_ps(_mm256_cmp_ps(x, tv, _CMP_GE_OQ)));
      if (!m) break;  // this block is below the bound, and so is the rest of the row
      if (c + 8 > kCountMax) return false;
      c = pack_lanes(x, _mm256_add_epi32(lane, _mm256_set1_epi32(int(a * k + b))), m, cv, ci, c);
    }
  }
  int64_t* pos = oi;  // rank_by_count's indices are places a * k + b in the k x k square
  if (rank_by_count(cv, ci, c, k, os, pos) != k) return false;
  for (int64_t j = 0; j < k; ++j) pos[j] = hidx[pos[j] / k] * n + hidx[k + pos[j] % k];
  return true;
}

// The candidates of select_topk (v[i] >= t0 or NaN, in index order) left-packed into w.cv and
// w.ci, then ranked: by counting, or (NaN, ties, many candidates) as packed keys. Returns the
// count, as rank_candidates does.
inline int64_t collect_rank(const float* v, int64_t n, float t0, int64_t k, float* bs, int64_t* bi,
                            TopkScratch<float>& w) {
  if (n > int64_t(1) << 31) return -1;
  float* cv = w.cv.data();
  int32_t* ci = w.ci.data();
  const __m256 t = _mm256_set1_ps(t0);
  __m256i idx = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
  const __m256i eight = _mm256_set1_epi32(8);
  __m256 nan = _mm256_setzero_ps();
  int64_t c = 0, i = 0;
  for (; i + 8 <= n; i += 8, idx = _mm256_add_epi32(idx, eight)) {
    const __m256 x = _mm256_loadu_ps(v + i);
    const unsigned m = unsigned(_mm256_movemask_ps(_mm256_cmp_ps(x, t, _CMP_NLT_UQ)));
    nan = _mm256_or_ps(nan, _mm256_cmp_ps(x, x, _CMP_UNORD_Q));
    c = pack_lanes(x, idx, m, cv, ci, c);  // no branch: about half the blocks hold a candidate
  }
  bool any_nan = _mm256_movemask_ps(nan) != 0;
  for (; i < n; ++i) {
    if (v[i] < t0) continue;
    any_nan |= v[i] != v[i];
    cv[c] = v[i];
    ci[c++] = int32_t(i);
  }
  if (!any_nan) {
    const int64_t r = rank_by_count(cv, ci, c, k, bs, bi);
    if (r >= 0) return r;
  }
  uint64_t* key = w.keys.data();
  for (int64_t j = 0; j < c; ++j) key[j] = rank_key(cv[j], ci[j]);
  return take_ranked(key, c, k, v, bs, bi);
}
#endif

// How many blocks: more blocks give a tighter threshold (fewer candidates), but ranking their
// maxima costs more (branchy, ~40 % of the selection). Measured per (token, head) on one core of
// the development VM: k = 32, n = 512: 2k blocks 6.9 us, 4k 7.8 us; k = 8: 32 blocks (4k) 3.4 us,
// 16 (2k) 3.5 us.
inline int64_t topk_blocks(int64_t k) { return k * 2 > 32 ? k * 2 : 32; }
constexpr int64_t kSmallK = 16;  // select_topk's threshold by insertion up to this k

// Top-k of v[0..n) like scan_topk, for long lists. The k-th largest of nb >= k block maxima is a
// lower bound of the k-th largest value (each of those k maxima is a distinct element at least
// as large), so only the elements not below it, typically 1-2 k of them, are candidates: one
// vectorizable pass for the maxima, one for the candidates and a ranking of a few dozen,
// instead of ~k ln(n/k) insertions into the sorted list (most of the time for n = 512). NaN
// rank last: a block whose maximum reads NaN does not count, and with fewer than k numeric
// maxima the plain scan runs.
// Block b holds the elements b, b + nb, b + 2 nb, ... (strided: the block maxima are then an
// elementwise maximum of rows of nb values, which vectorizes). The candidates come from the
// blocks whose maximum is not below the threshold only. A block's
// maximum ignores a NaN after its first element, so such a NaN may be skipped: harmless, since
// the k blocks that set the threshold hold k numbers at or above it, and NaN ranks below every
// number. The block maxima stay in w (w.blocks) for idw_topk.
template <typename T>
inline int64_t select_topk(const T* v, int64_t n, int64_t k, T* bs, int64_t* bi,
                           TopkScratch<T>& w) {
  const int64_t nb = topk_blocks(k);
  w.blocks = 0;
  if (n < 4 * nb) return scan_topk(v, n, k, bs, bi);
  T* mx = w.maxima.data();
  T* rank = mx + nb;
  for (int64_t b = 0; b < nb; ++b) mx[b] = v[b];
  for (int64_t i = nb; i < n; i += nb) {
    const T* x = v + i;
    const int64_t len = n - i < nb ? n - i : nb;
    for (int64_t b = 0; b < len; ++b) mx[b] = x[b] > mx[b] ? x[b] : mx[b];
  }
  // k-th largest numeric maximum (NaN after every number); the NaN-aware comparison only when a
  // maximum is NaN (its two extra tests per comparison were a third of the selection)
  bool any_nan = false;
  for (int64_t b = 0; b < nb; ++b) any_nan |= mx[b] != mx[b];
  T t0;
  if (!any_nan && kth_largest_count(mx, nb, k, &t0)) {
  } else if (!any_nan && k <= kSmallK) {
    // small k: the k best maxima kept sorted while they stream by; most fail the first test.
    // A fifth of FwPKM's k = 8 selection went to nth_element's setup on 32 maxima.
    T best[kSmallK];
    int64_t c = 0;
    for (int64_t b = 0; b < nb; ++b) {
      const T v = mx[b];
      if (c == k && !(v > best[k - 1])) continue;
      int64_t p = c < k ? c++ : k - 1;
      for (; p > 0 && best[p - 1] < v; --p) best[p] = best[p - 1];
      best[p] = v;
    }
    t0 = best[k - 1];
  } else {
    std::memcpy(rank, mx, sizeof(T) * size_t(nb));
    if (any_nan)
      std::nth_element(rank, rank + (k - 1), rank + nb, [](T a, T b) { return a > b || (a == a && b != b); });
    else
      std::nth_element(rank, rank + (k - 1), rank + nb, Greater());
    t0 = rank[k - 1];
  }
  if (t0 != t0) return scan_topk(v, n, k, bs, bi);
  w.blocks = nb;
  if (const int64_t r = collect_rank(v, n, t0, k, bs, bi, w); r >= 0) return r;
  auto* cand = w.cand.data();
  const int64_t c = collect_candidates(v, n, t0, mx, nb, cand);
  return rank_candidates(v, cand, c, k, bs, bi, w.keys);
}

// Calls f(i) for (at least) every i with lo <= v[i] <= hi, v[i] a number: over the blocks of
// select_topk whose maximum is not below lo (every element when nb is 0); f checks again.
template <typename T, typename F>
inline void scan_within(const T* v, int64_t n, T lo, T hi, int64_t nb, const T* mx, F&& f) {
  (void)v;  // this version leaves the comparison to f; the AVX2 float overload below compares v
  (void)hi;
  const int64_t step = nb ? nb : 1;
  for (int64_t b = 0; b < step; ++b) {
    if (nb && mx[b] < lo) continue;
    for (int64_t i = b; i < n; i += step) f(i);
  }
}
#if defined(__AVX2__)
// AVX2, float: two compares of 8 elements, the few in range visited in index order.
template <typename F>
inline void scan_within(const float* v, int64_t n, float lo, float hi, int64_t, const float*, F&& f) {
  const __m256 l = _mm256_set1_ps(lo), h = _mm256_set1_ps(hi);
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    const __m256 x = _mm256_loadu_ps(v + i);
    unsigned m = unsigned(_mm256_movemask_ps(_mm256_and_ps(_mm256_cmp_ps(x, l, _CMP_GE_OQ),
                                                           _mm256_cmp_ps(x, h, _CMP_LE_OQ))));
    while (m) {
      f(i + __builtin_ctz(m));
      m &= m - 1;
    }
  }
  for (; i < n; ++i) f(i);
}
#endif

// IDW sub-scores s_i = -log(eps + dist_i) of one query half against n sub-keys, top-k into
// (bs, bi) sorted by (score desc, index asc). The score falls as the distance grows, so the scan
// ranks distances and takes k logarithms instead of n (the logarithms were most of the kernel).
// Exactness: two different distances can round to the same score, and then the smaller index must
// win. Every candidate whose score can equal the k-th one lies within a relative distance of
// 1e-4 of the k-th distance (a float score has 24 bits; a tie needs log((eps+d)/(eps+d_k)) below a
// few ulps of |s| <= 89, i.e. ~2e-5); those few are scored and merged exactly.
template <typename T>
inline int64_t idw_topk(const T* d, T q2, const T* k2, int64_t n, int64_t k, T teps, T* bs,
                        int64_t* bi, TopkScratch<T>& w) {
  T* nd = w.nd.data();
  auto dist_of = [&](int64_t i) {
    T dist = q2 + k2[i] - T(2) * d[i];
    return dist < T(0) ? T(0) : dist;  // cancellation in ||q||^2 + ||k||^2 - 2 q.k
  };
  // -dist ranks like the score (NaN last, ties by index); computed in one vectorizable pass
  for (int64_t i = 0; i < n; ++i) nd[i] = -dist_of(i);
  const int64_t count = select_topk(nd, n, k, bs, bi, w);
  const T dk = -bs[count - 1];
  // scores of the survivors, re-ranked in place: equal scores from unequal distances go by index
  for (int64_t j = 0; j < count; ++j) bs[j] = -std::log(teps - bs[j]);
  for (int64_t j = 1; j < count; ++j) {
    const T sv = bs[j];
    const int64_t iv = bi[j];
    int64_t p = j;
    for (; p > 0 && ranks_before(sv, iv, bs[p - 1], bi[p - 1]); --p) {
      bs[p] = bs[p - 1];
      bi[p] = bi[p - 1];
    }
    bs[p] = sv;
    bi[p] = iv;
  }
  int64_t out = count;
  if (count == k && std::isfinite(dk)) {
    const T reach = dk + (teps + dk) * T(1e-4);
    // blocks whose maximum -dist is below -reach hold no distance within reach (the maxima of
    // select_topk; a NaN maximum is scanned, and NaN distances are never within reach anyway)
    // the candidates are merged by the total order of insert_sorted: the result does not depend
    // on the order in which they are found
    auto near = [&](int64_t i) {
      const T dist = -nd[i];
      if (!(dist >= dk && dist <= reach)) return;
      bool kept = false;
      for (int64_t j = 0; j < k && !kept; ++j) kept = bi[j] == i;
      if (!kept) out = insert_sorted(bs, bi, out, k, -std::log(teps + dist), i);
    };
    scan_within(nd, n, -reach, -dk, w.blocks, w.maxima.data(), near);
  }
  return out;
}

// One IDW pair score from the pair's dot product and the two squared norms: s = log(1 / (eps +
// max(xn + kn - 2 dot, 0))) and that inverse, in the order of Pairs' torch expression. The one
// expression of idw_pairs and topk_select's pair scores (the same roundings, hence the same bits).
template <typename T>
inline void idw_pair(T xn, T kn, T dot, T teps, T* s, T* inv) {
  T d = (xn + kn) - T(2) * dot;
  d = d < T(0) ? T(0) : d;
  const T iv = T(1) / (teps + d);
  *inv = iv;
  *s = std::log(iv);
}

// Below this many multiply-adds (or candidate visits) a kernel runs on the calling thread: an
// OpenMP parallel region costs a few microseconds on a quiet machine and a whole scheduler time
// slice when another process holds a core, and the FwPKM windows of a small model call the
// kernels hundreds of times per step on a few thousand rows each.
constexpr int64_t kSerialWork = int64_t(1) << 15;
// An exp or log costs ~10-20 multiply-adds: loops that take one per element split at a
// sixteenth of the elements (a window's 8,192 pair scores: ~80 us of exp on one thread).
constexpr int64_t kExpWork = 16;

// row . x with kLanes independent partial sums (a single SIMD accumulator is a chain of
// dependent adds: the dot of a 512-float row then waits on add latency, not on memory), combined
// by a fixed tree: bit-identical from run to run and across thread counts.
constexpr int64_t kLanes = 16;
template <typename T>
inline T sum_lanes(T* part) {  // dot_lanes' fixed tree over its kLanes partial sums
  for (int64_t width = kLanes / 2; width > 0; width /= 2)
    for (int64_t j = 0; j < width; ++j) part[j] += part[j + width];
  return part[0];
}
template <typename T>
inline T dot_lanes(const T* row, const T* x, int64_t D) {
  T part[kLanes] = {};
  int64_t d = 0;
  for (; d + kLanes <= D; d += kLanes)
    for (int64_t j = 0; j < kLanes; ++j) part[j] += row[d + j] * x[d + j];
  for (int64_t j = 0; d < D; ++d, ++j) part[j] += row[d] * x[d];
  return sum_lanes(part);
}
// out[i] = r[i] . x for four rows, each summed exactly as dot_lanes sums it (the same lanes, the
// same tree: the same bits). One dot_lanes is a chain of D / kLanes dependent multiply-adds (one
// register of 16 lanes with AVX-512), so it waits on the add latency; four at once are four
// independent chains (the top-k's pair scores: 2 k dots per token).
template <typename T>
inline void dot_lanes_4(const T* const* r, const T* x, int64_t D, T* out) {
  const T *r0 = r[0], *r1 = r[1], *r2 = r[2], *r3 = r[3];  // (named: the loop then vectorizes)
  T p0[kLanes] = {}, p1[kLanes] = {}, p2[kLanes] = {}, p3[kLanes] = {};
  int64_t d = 0;
  for (; d + kLanes <= D; d += kLanes) {
    for (int64_t j = 0; j < kLanes; ++j) {
      const T xv = x[d + j];
      p0[j] += r0[d + j] * xv;
      p1[j] += r1[d + j] * xv;
      p2[j] += r2[d + j] * xv;
      p3[j] += r3[d + j] * xv;
    }
  }
  for (int64_t j = 0; d < D; ++d, ++j) {
    p0[j] += r0[d] * x[d];
    p1[j] += r1[d] * x[d];
    p2[j] += r2[d] * x[d];
    p3[j] += r3[d] * x[d];
  }
  out[0] = sum_lanes(p0);
  out[1] = sum_lanes(p1);
  out[2] = sum_lanes(p2);
  out[3] = sum_lanes(p3);
}

// Non-finite test through the exponent bits (all ones: infinity or NaN): an integer OR over the
// row, which vectorizes without reassociating floating-point adds.
template <typename T>
struct ExpBits;
template <>
struct ExpBits<float> {
  using U = uint32_t;
  static constexpr U kMask = 0x7f800000u;
};
template <>
struct ExpBits<double> {
  using U = uint64_t;
  static constexpr U kMask = 0x7ff0000000000000ull;
};
template <typename T>
inline bool row_finite(const T* row, int64_t D) {
  using U = typename ExpBits<T>::U;
  U any = 0;
  for (int64_t d = 0; d < D; ++d) {
    U b;
    std::memcpy(&b, row + d, sizeof b);
    any |= U((b & ExpBits<T>::kMask) == ExpBits<T>::kMask);
  }
  return any == 0;
}

// Rows are read in an order the hardware prefetcher cannot guess (the slots a query selected),
// so each row's first cache lines would cost a full memory latency. Asking for the row kAhead
// reads ahead overlaps those latencies (a hint only: results do not depend on it). Only the
// row's first kPrefetchBytes are asked for: once they arrive, the L2 streamer fetches the rest of
// the row by itself. Asking for every line of a 2 KB row (32 prefetches, 4 rows ahead, as
// before) filled the line-fill buffers with requests the streamer would have made anyway:
// random 2 KB rows of a 512 MiB table gathered at 11 GB/s on the 2-core VM, 18-19 GB/s with
// 4 lines 8 rows ahead (docs/BENCHMARKS.md, "part 5").
constexpr int64_t kAhead = 8;
constexpr int64_t kPrefetchBytes = 256;
template <typename T>
inline void prefetch_row(const T* row, int64_t D) {
  const char* p = reinterpret_cast<const char*>(row);
  const int64_t bytes = D * int64_t(sizeof(T)) < kPrefetchBytes ? D * int64_t(sizeof(T)) : kPrefetchBytes;
  for (int64_t b = 0; b < bytes; b += 64) __builtin_prefetch(p + b);
}

// dst = src for a row that is written now and read only if a call fails (the undo log):
// non-temporal stores, which skip reading the destination's lines first (read-for-ownership)
// and keep them out of the cache the rows being updated need. Measured on the 2-core VM
// (standalone, 4,000 random 2 KB rows of a 512 MiB table per window, after a gather of them):
// the log doubled the scatter's time (3.3 -> 6.7 ms for 8 windows), non-temporal stores took
// back 1.4 ms of that. A plain copy where the row is not 32-byte aligned or AVX is absent. The
// stores are ordered by stream_fence() before the thread's work is handed over.
template <typename T>
inline void copy_row_nt(T* dst, const T* src, int64_t D) {
  const size_t bytes = sizeof(T) * size_t(D);
#if defined(__AVX2__)
  if ((reinterpret_cast<uintptr_t>(dst) & 31) == 0 && bytes % 32 == 0) {
    const char* s = reinterpret_cast<const char*>(src);
    char* d = reinterpret_cast<char*>(dst);
    for (size_t b = 0; b < bytes; b += 32)
      _mm256_stream_si256(reinterpret_cast<__m256i*>(d + b),
                          _mm256_loadu_si256(reinterpret_cast<const __m256i*>(s + b)));
    return;
  }
#endif
  std::memcpy(dst, src, bytes);
}
template <typename T>
inline void zero_row_nt(T* dst, int64_t D) {
  const size_t bytes = sizeof(T) * size_t(D);
#if defined(__AVX2__)
  if ((reinterpret_cast<uintptr_t>(dst) & 31) == 0 && bytes % 32 == 0) {
    char* d = reinterpret_cast<char*>(dst);
    const __m256i z = _mm256_setzero_si256();
    for (size_t b = 0; b < bytes; b += 32) _mm256_stream_si256(reinterpret_cast<__m256i*>(d + b), z);
    return;
  }
#endif
  std::memset(dst, 0, bytes);
}
inline void stream_fence() {
#if defined(__AVX2__)
  _mm_sfence();
#endif
}

// out[0, n) = the softmax of in[0, n) (n >= 1; in may be out): the maximum subtracted, exp,
// divided by the sum accumulated in index order, each rounded in T. The one softmax of these
// kernels (addr_step's pair rows, read_weights' slots).
template <typename T>
inline void softmax_into(const T* in, T* out, int64_t n) {
  T mx = in[0];
  for (int64_t j = 1; j < n; ++j) mx = in[j] > mx ? in[j] : mx;
  T sum = T(0);
  for (int64_t j = 0; j < n; ++j) sum += (out[j] = std::exp(in[j] - mx));
  for (int64_t j = 0; j < n; ++j) out[j] /= sum;
}

// row += c * xm: one pair's term, the one rounding of every scatter here.
template <typename T>
inline void add_pair(T* row, int64_t D, T c, const T* xm) {
  for (int64_t d = 0; d < D; ++d) row[d] += c * xm[d];
}
// row += sum over the segment's pairs, in their order, of coef[pair] * x[pair / L]: the one
// summation of scatter_rows and scatter_rows_dense (the same order, hence the same rounding).
template <typename T>
inline void add_segment(T* row, int64_t D, const int64_t* pairs, int64_t count, const T* coef,
                        const T* x, int64_t L) {
  for (int64_t p = 0; p < count; ++p) {
    const int64_t pair = pairs[p];
    add_pair(row, D, coef[pair], x + (pair / L) * D);
  }
}

// Throws (bad_index, naming op and the array) on the first of the Q ids outside [0, R); called
// before a kernel reads or writes anything through them. The ids are counted in parallel first: the
// common case, all in range, costs one vectorizable pass.
inline void check_index(const char* op, const char* name, const int64_t* ids, int64_t Q, int64_t R) {
  int64_t bad = 0;
#pragma omp parallel for schedule(static) reduction(+ : bad) if (Q > kSerialWork)
  for (int64_t p = 0; p < Q; ++p) bad += ids[p] < 0 || ids[p] >= R;
  if (bad == 0) return;
  for (int64_t p = 0; p < Q; ++p)
    if (ids[p] < 0 || ids[p] >= R) bad_index(op, name, ids[p], R);
}
inline void check_rows(const char* op, const int64_t* rows, int64_t Q, int64_t R) {
  check_index(op, "rows", rows, Q, R);
}

// Inside a parallel region: the rows [lo, hi) of [0, R) this thread owns (all of them outside
// one), and the pairs' terms that land there added in increasing pair order (table[rows[p]] +=
// coef[p] * x[p / L]). Every row thus gets its terms in pair order whatever the thread count:
// scatter_rows' order over segment_rows' stable buckets, without the sort.
inline void owned_rows(int64_t R, int64_t* lo, int64_t* hi) {
#ifdef _OPENMP
  const int64_t nt = omp_get_num_threads(), t = omp_get_thread_num();
#else
  const int64_t nt = 1, t = 0;
#endif
  *lo = R * t / nt;
  *hi = R * (t + 1) / nt;
}
// (negate: the terms -coef[p] x[p / L], exactly: a sign flip rounds nothing)
template <typename T>
inline void add_owned_pairs(T* table, int64_t D, const int64_t* rows, int64_t Q, int64_t L,
                            const T* coef, const T* x, int64_t lo, int64_t hi, bool negate = false) {
  for (int64_t p = 0; p < Q; ++p) {
    const int64_t r = rows[p];
    if (r < lo || r >= hi) continue;
    add_pair(table + r * D, D, negate ? -coef[p] : coef[p], x + (p / L) * D);
  }
}

// f(l, rows[l], table[rows[l]] . x) for the L rows of one token (they share x), in l order, the
// dots four at a time (dot_lanes_4; the rest by dot_lanes: each as dot_lanes sums it). ahead (or
// null): the row ids kAhead pairs on, of which the first n_ahead exist; each group prefetches
// its own rows' successors there.
template <typename T, typename F>
inline void row_dots(const T* table, int64_t D, const int64_t* rows, int64_t L, const T* x,
                     const int64_t* ahead, int64_t n_ahead, F&& f) {
  for (int64_t l0 = 0; l0 < L; l0 += 4) {
    const int64_t n4 = L - l0 < 4 ? L - l0 : 4;
    for (int64_t i = 0; i < n4 && l0 + i < n_ahead; ++i) prefetch_row(table + ahead[l0 + i] * D, D);
    const T* r4[4];
    T dot[4];
    for (int64_t i = 0; i < n4; ++i) r4[i] = table + rows[l0 + i] * D;
    if (n4 == 4) {
      dot_lanes_4(r4, x, D, dot);
    } else {
      for (int64_t i = 0; i < n4; ++i) dot[i] = dot_lanes(r4[i], x, D);
    }
    for (int64_t i = 0; i < n4; ++i) f(l0 + i, rows[l0 + i], dot[i]);
  }
}

// out = sum_l w[m, l] * table[rows[m, l]] for token m of M (pairs m * L + l), in l order: the
// one sum of gather_rows and read_write_rows. Prefetches the rows kAhead pairs on; saved (or
// null) gets the rows as read.
template <typename T>
inline void gather_token(const T* table, int64_t D, const int64_t* rows, const T* w, int64_t m,
                         int64_t M, int64_t L, T* out, T* saved) {
  for (int64_t d = 0; d < D; ++d) out[d] = T(0);
  for (int64_t l = 0; l < L; ++l) {
    if (m * L + l + kAhead < M * L) prefetch_row(table + rows[m * L + l + kAhead] * D, D);
    const T* row = table + rows[m * L + l] * D;
    const T wl = w[m * L + l];
    for (int64_t d = 0; d < D; ++d) out[d] += wl * row[d];
    if (saved) std::memcpy(saved + (m * L + l) * D, row, sizeof(T) * D);
  }
}

}  // namespace

template <typename T>
void topk_select_cpu(const T* dots, const T* qn, const T* kn, int64_t M, int64_t H, int64_t n,
                     int64_t k, int64_t tokens_per_group, int kind, double eps, int64_t* idx,
                     T* score, int64_t* half_idx, T* half_score, const T* x, const T* K, int64_t D,
                     T* pair_s, T* pair_inv, int64_t block) {
  const T teps = static_cast<T>(eps);
#pragma omp parallel if (M * H * 2 * n > kSerialWork)
  {
  TopkScratch<T> scratch;  // one per thread
  scratch.maxima.resize(size_t(2 * topk_blocks(k)));
  scratch.cand.resize(size_t(n));
  scratch.keys.resize(size_t(n));
  scratch.cv.resize(size_t(n + 144));  // collect_rank and merge_by_count: see there
  scratch.ci.resize(size_t(n + 144));
  if (kind == kIDW) scratch.nd.resize(size_t(n));
#pragma omp for schedule(static)
  for (int64_t mh = 0; mh < M * H; ++mh) {
    const int64_t m = mh / H, h = mh % H;
    const int64_t grp = m / tokens_per_group;
    int64_t* hidx = half_idx + mh * 2 * k;
    T* hsc = half_score + mh * 2 * k;
    // token m's half c: row (m, h, c) of [M, H, 2, n], or (m / block, h, c, m % block) of blocks
    const T* dm = block > 0 ? dots + (((m / block) * H + h) * 2 * block + m % block) * n : dots + mh * 2 * n;
    const int64_t dstep = block > 0 ? block * n : n;  // from half 0 to half 1
    for (int64_t c = 0; c < 2; ++c) {
      const T* d = dm + c * dstep;
      // (each fills all k entries, k <= n: a NaN score ranks last, it is not dropped)
      if (kind == kIDW) {
        const T q2 = qn[mh * 2 + c];
        const T* k2 = kn + ((grp * H + h) * 2 + c) * n;
        idw_topk(d, q2, k2, n, k, teps, hsc + c * k, hidx + c * k, scratch);
      } else {
        select_topk(d, n, k, hsc + c * k, hidx + c * k, scratch);
      }
      if (x != nullptr) {  // the exact scores of the list's pairs, while the query half is in cache
        const int64_t g = mh * 2 + c, base = ((grp * H + h) * 2 + c) * n;
        row_dots(K + base * D, D, hidx + c * k, k, x + g * D, static_cast<const int64_t*>(nullptr), 0,
                 [&](int64_t j, int64_t sub, T dot) {
                   if (kind == kIDW)
                     idw_pair(qn[g], kn[base + sub], dot, teps, pair_s + g * k + j, pair_inv + g * k + j);
                   else
                     pair_s[g * k + j] = dot;
                 });
      }
    }
    // k x k candidate merge: the true top-k has both halves inside the per-half top-k.
    // Both half lists are sorted, so a + b falls along a row (b up) and down the first column
    // (a up): once the list is full, a row stops at its first sum strictly below the k-th score,
    // and the merge stops at the first row whose best sum is. Only sums tied with the k-th score
    // are still inserted (a smaller slot may win the tie), so the result is the full merge's.
    // The scan visits O(k log k) candidates instead of k * k (k = 32: ~6x fewer).
    int64_t* oi = idx + mh * k;
    T* os = score + mh * k;
    if (merge_by_count(hsc, hidx, k, n, os, oi, scratch)) continue;
    int64_t count = 0;
    for (int64_t a = 0; a < k; ++a) {
      if (count == k && hsc[a] + hsc[k] < os[k - 1]) break;
      for (int64_t b = 0; b < k; ++b) {
        const T s = hsc[a] + hsc[k + b];
        if (count == k && s < os[k - 1]) break;
        const int64_t slot = hidx[a] * n + hidx[k + b];
        count = insert_sorted(os, oi, count, k, s, slot);
      }
    }
  }
  }  // omp parallel
}

template <typename T>
void gather_rows_cpu(const T* table, int64_t R, int64_t D, const int64_t* rows, const T* w,
                     int64_t M, int64_t L, T* out, T* saved) {
  (void)R;
#pragma omp parallel for schedule(static) if (M * L * D > kSerialWork)
  for (int64_t m = 0; m < M; ++m) gather_token(table, D, rows, w, m, M, L, out + m * D, saved);
}

// f(pair, row, table[row] . x[m]) for every pair m * L + l of M tokens (rows [M, L]): row_dots
// per token, the rows prefetched kAhead pairs on. The one walk of gather_dot and idw_pairs.
template <typename T, typename F>
inline void token_row_dots(const T* table, int64_t D, const int64_t* rows, const T* x, int64_t M,
                           int64_t L, F&& f) {
#pragma omp parallel for schedule(static) if (M * L * D > kSerialWork)
  for (int64_t m = 0; m < M; ++m) {
    const int64_t n_ahead = M * L - m * L - kAhead;  // pairs with a successor kAhead on
    row_dots(table, D, rows + m * L, L, x + m * D, n_ahead > 0 ? rows + m * L + kAhead : nullptr,
             n_ahead, [&](int64_t l, int64_t r, T dot) { f(m * L + l, r, dot); });
  }
}

template <typename T>
void gather_dot_cpu(const T* table, int64_t R, int64_t D, const int64_t* rows, const T* x,
                    int64_t M, int64_t L, T* gw) {
  (void)R;
  token_row_dots(table, D, rows, x, M, L, [&](int64_t ml, int64_t, T dot) { gw[ml] = dot; });
}

template <typename T>
void idw_pairs_cpu(const T* table, int64_t R, int64_t D, const int64_t* rows, const T* x,
                   int64_t M, int64_t L, const T* xn, const T* kn, double eps, T* s, T* inv) {
  check_rows("idw_pairs", rows, M * L, R);
  const T teps = static_cast<T>(eps);
  token_row_dots(table, D, rows, x, M, L, [&](int64_t ml, int64_t r, T dot) {
    idw_pair(xn[ml / L], kn[r], dot, teps, s + ml, inv + ml);
  });
}

template <typename T>
void scatter_rows_cpu(T* table, int64_t R, int64_t D, const int64_t* urows, const int64_t* offsets,
                      int64_t U, const int64_t* order, const T* coef, const T* x, int64_t L,
                      int64_t* nonfinite, T* log, const int64_t* log_id) {
  (void)R;
  int64_t bad = 0;
  auto one = [&](int64_t u) -> int64_t {  // 1 when the row came out non-finite (and it counts)
    if (u + kAhead < U) prefetch_row(table + urows[u + kAhead] * D, D);
    T* row = table + urows[u] * D;
    if (log && log_id[u] >= 0) copy_row_nt(log + log_id[u] * D, row, D);
    add_segment(row, D, order + offsets[u], offsets[u + 1] - offsets[u], coef, x, L);
    return nonfinite && !row_finite(row, D);
  };
  // Segments can be long (a training step's hot rows): chunks of 16 rows go to whichever thread
  // is free. A logged write (a streaming window: one or two pairs per row) splits them evenly
  // instead, each thread a contiguous run of rows (measured: 6.9 -> 5.3 ms for the windows
  // above). Either way one thread writes a row, so the sums do not depend on the schedule.
#pragma omp parallel reduction(+ : bad) if ((offsets[U] - offsets[0]) * D > kSerialWork)
  {
    if (log) {
#pragma omp for schedule(static) nowait
      for (int64_t u = 0; u < U; ++u) bad += one(u);
      stream_fence();
    } else {
#pragma omp for schedule(dynamic, 16) nowait
      for (int64_t u = 0; u < U; ++u) bad += one(u);
    }
  }
  if (nonfinite) *nonfinite += bad;
}

template <typename T>
void read_write_rows_cpu(T* table, int64_t R, int64_t D, const int64_t* rows, const T* w,
                         int64_t M, int64_t L, T* out, const T* y, const T* wt, int64_t keep, T* r,
                         const T* coef, const int64_t* lid, T* log, int64_t* nonfinite) {
  (void)R;
  int64_t bad = 0;
  // Each token's rows are in L1 once its read is summed: the rows only this pair reads and
  // writes are updated then, instead of being fetched again by a scatter after the window's
  // read (one random pass over the rows fewer). One writer per row (lid marks a pair whose row
  // no other pair of the window reads), so the schedule changes nothing.
#pragma omp parallel reduction(+ : bad) if (M * L * D > kSerialWork)
  {
#pragma omp for schedule(static) nowait
    for (int64_t m = 0; m < M; ++m) {
      T* o = out + m * D;
      gather_token(table, D, rows, w, m, M, L, o, static_cast<T*>(nullptr));
      T* rm = r + m * D;
      if (m >= keep) {
        std::memset(rm, 0, sizeof(T) * size_t(D));
        continue;
      }
      const T* ym = y + m * D;
      const T wm = wt[m];
      for (int64_t d = 0; d < D; ++d) {
        const T diff = o[d] - ym[d];
        rm[d] = diff * wm;
      }
      for (int64_t l = 0; l < L; ++l) {
        const int64_t p = m * L + l;
        if (lid[p] < -1) continue;
        T* row = table + rows[p] * D;
        if (lid[p] >= 0) copy_row_nt(log + lid[p] * D, row, D);
        add_pair(row, D, coef[p], rm);
        bad += nonfinite && !row_finite(row, D);
      }
    }
    stream_fence();
  }
  if (nonfinite) *nonfinite += bad;
}

template <typename T>
void scatter_pairs_cpu(T* table, int64_t R, int64_t D, const int64_t* rows, int64_t M, int64_t L,
                       const T* coef, const T* x) {
  const int64_t Q = M * L;
  check_rows("scatter_pairs", rows, Q, R);
  // Each thread owns a range of rows and walks every pair in order (add_owned_pairs): one
  // writer per row, scatter_rows' sums without the sort. It suits tables of a few thousand rows
  // (the sub-keys): a thread's rows stay in its cache and x is read in order, where the bucketed
  // scatter reads x at random (1.1 s for PKM's 8.4 M key pairs at B = 8, measured).
#pragma omp parallel if (Q * D > kSerialWork)
  {
    int64_t lo, hi;
    owned_rows(R, &lo, &hi);
    add_owned_pairs(table, D, rows, Q, L, coef, x, lo, hi);
  }
}

template <typename T>
int64_t addr_step_cpu(const T* s, const T* inv, const int64_t* rows, int64_t M, int64_t L,
                      const T* x, const T* K, int64_t R, int64_t D, double rpg, double w,
                      double lr, double eps, T* P, T* u, T* gamma, T* pbar, T* out) {
  const int64_t Q = M * L;
  check_rows("addr_step", rows, Q, R);
  const T trpg = static_cast<T>(rpg), tw = static_cast<T>(w), teps = static_cast<T>(eps);
  // P: the softmax of each pair row (max subtracted, exp, divided by the sum)
#pragma omp parallel for schedule(static) if (Q * kExpWork > kSerialWork)
  for (int64_t m = 0; m < M; ++m) softmax_into(s + m * L, P + m * L, L);
  // pbar: per key row, the sum of its pairs' P in pair order (in double), over the rows sharing
  // the memory; then dL/dpbar = w (log(pbar + eps) + pbar / (pbar + eps)) in place of phi
  Vec<double> acc(static_cast<size_t>(R), 0.0);
  for (int64_t p = 0; p < Q; ++p) acc[size_t(rows[p])] += double(P[p]);
  Vec<T> phi(static_cast<size_t>(R));
  for (int64_t r = 0; r < R; ++r) {
    const T pb = static_cast<T>(acc[size_t(r)]) / trpg;
    pbar[r] = pb;
    const T pe = pb + teps;
    phi[size_t(r)] = tw * (std::log(pe) + pb / pe);
  }
  // u = dL/dP and gamma = dL/ds = P (u - <P, u>) per pair row; the key step's pair coefficient
  // c = -lr gamma (IDW: times ds/dK's 2 inv), summed per key row (in double) for the -c K term
#pragma omp parallel for schedule(static) if (Q > kSerialWork)
  for (int64_t m = 0; m < M; ++m) {
    T dotpu = T(0);
    for (int64_t j = 0; j < L; ++j) {
      const int64_t p = m * L + j;
      u[p] = phi[size_t(rows[p])] / trpg;
      dotpu += P[p] * u[p];
    }
    for (int64_t j = 0; j < L; ++j) {
      const int64_t p = m * L + j;
      gamma[p] = P[p] * (u[p] - dotpu);
    }
  }
  if (out == nullptr) return 0;
  Vec<T> c(static_cast<size_t>(Q));
  const T tlr = static_cast<T>(lr);
  for (int64_t p = 0; p < Q; ++p) c[size_t(p)] = inv ? T(2) * (-tlr * gamma[p]) * inv[p] : -tlr * gamma[p];
  std::fill(acc.begin(), acc.end(), 0.0);
  if (inv)
    for (int64_t p = 0; p < Q; ++p) acc[size_t(rows[p])] += double(c[size_t(p)]);
  // out = K + sum_p c_p x_m (one writer per row: threads own row ranges and walk the pairs in
  // order, as scatter_pairs), then (IDW) out -= (sum_p c_p) K. Each thread copies its own rows
  // first: in parallel, and into the cache of the thread that updates them.
  int64_t bad = 0;
#pragma omp parallel reduction(+ : bad) if (Q * D > kSerialWork)
  {
    int64_t lo, hi;
    owned_rows(R, &lo, &hi);
    std::memcpy(out + lo * D, K + lo * D, sizeof(T) * size_t((hi - lo) * D));
    add_owned_pairs(out, D, rows, Q, L, c.data(), x, lo, hi);
    if (inv) {
      for (int64_t r = lo; r < hi; ++r) {
        const T cs = static_cast<T>(acc[size_t(r)]);
        T* o = out + r * D;
        const T* kr = K + r * D;
        for (int64_t d = 0; d < D; ++d) o[d] -= cs * kr[d];
      }
    }
    for (int64_t r = lo; r < hi; ++r) bad += !row_finite(out + r * D, D);
  }
  return bad;
}

template <typename T>
void addr_vjp_cpu(const T* P, const T* u, const T* gamma, const T* dphi, const T* inv,
                  const int64_t* rows, int64_t M, int64_t L, const T* x, const T* K, const T* lam,
                  int64_t R, int64_t D, double rpg, T* gk, T* gx) {
  const int64_t Q = M * L;
  check_rows("addr_vjp", rows, Q, R);
  const T trpg = static_cast<T>(rpg);
  const bool idw = inv != nullptr;
  // The torch chain it replaces was ~60 small ops per window (a third of the recurrence's
  // backward at the default model's size); here two passes over the pairs and one over the rows.
  Vec<T> lk(static_cast<size_t>(idw ? R : 0)), psi(static_cast<size_t>(Q)), pdot(static_cast<size_t>(Q));
  Vec<T> a(static_cast<size_t>(Q)), b(static_cast<size_t>(Q));  // coefficients on K_r / x and on lam_r
#pragma omp parallel if (Q * D > kSerialWork)
  {
    if (idw) {
#pragma omp for schedule(static)
      for (int64_t r = 0; r < R; ++r) lk[size_t(r)] = dot_lanes(lam + r * D, K + r * D, D);
    }
#pragma omp for schedule(static)
    for (int64_t m = 0; m < M; ++m) {
      T sp = T(0);
      T* ps = psi.data();
      const T* lkr = lk.data();
      row_dots(lam, D, rows + m * L, L, x + m * D, static_cast<const int64_t*>(nullptr), 0,
               [&](int64_t j, int64_t r, T lx) {  // the token's lam rows . x, in pair order
                 const int64_t p = m * L + j;
                 ps[p] = idw ? (T(2) * inv[p]) * (lx - lkr[r]) : lx;
                 sp += P[p] * ps[p];
               });
      for (int64_t j = 0; j < L; ++j) {
        const int64_t p = m * L + j;
        pdot[size_t(p)] = P[p] * (psi[size_t(p)] - sp);
      }
    }
  }
  // dpbar per row: its pairs' pdot in pair order (double), over the rows sharing the memory
  Vec<double> acc(static_cast<size_t>(R), 0.0);
  for (int64_t p = 0; p < Q; ++p) acc[size_t(rows[p])] += double(pdot[size_t(p)]);
  Vec<T> dd(static_cast<size_t>(R));  // dphi * dpbar
  for (int64_t r = 0; r < R; ++r) dd[size_t(r)] = dphi[r] * (static_cast<T>(acc[size_t(r)]) / trpg);
#pragma omp parallel for schedule(static) if (Q * 16 > kSerialWork)
  for (int64_t m = 0; m < M; ++m) {
    T s_pu = T(0), s_du = T(0), s_pdu = T(0);
    for (int64_t j = 0; j < L; ++j) {
      const int64_t p = m * L + j;
      const T du = dd[size_t(rows[p])] / trpg;
      s_pu += P[p] * u[p];
      s_du += pdot[size_t(p)] * u[p];
      s_pdu += P[p] * du;
    }
    for (int64_t j = 0; j < L; ++j) {
      const int64_t p = m * L + j;
      const T du = dd[size_t(rows[p])] / trpg;
      const T chi = pdot[size_t(p)] * (u[p] - s_pu) + P[p] * (((du - s_du) - s_pdu));
      if (idw) {
        a[size_t(p)] = (T(-2) * inv[p]) * (chi + gamma[p] * psi[size_t(p)]);
        b[size_t(p)] = (T(2) * inv[p]) * gamma[p];
      } else {
        a[size_t(p)] = chi;
        b[size_t(p)] = gamma[p];
      }
    }
  }
  // gx per query half; gk per key row (threads own row ranges and walk the pairs in order)
  Vec<double> sa(static_cast<size_t>(idw ? R : 0), 0.0), sb(static_cast<size_t>(idw ? R : 0), 0.0);
  if (idw)
    for (int64_t p = 0; p < Q; ++p) {
      sa[size_t(rows[p])] += double(a[size_t(p)]);
      sb[size_t(rows[p])] += double(b[size_t(p)]);
    }
#pragma omp parallel if (Q * D > kSerialWork)
  {
#pragma omp for schedule(static) nowait
    for (int64_t m = 0; m < M; ++m) {
      T* g = gx + m * D;
      T sum_a = T(0);
      for (int64_t d = 0; d < D; ++d) g[d] = T(0);
      for (int64_t j = 0; j < L; ++j) {
        const int64_t p = m * L + j, r = rows[p];
        const T ap = idw ? -a[size_t(p)] : a[size_t(p)];
        add_pair(g, D, ap, K + r * D);
        add_pair(g, D, b[size_t(p)], lam + r * D);
        sum_a += a[size_t(p)];
      }
      if (idw) add_pair(g, D, sum_a, x + m * D);
    }
    int64_t lo, hi;
    owned_rows(R, &lo, &hi);
    std::memset(gk + lo * D, 0, sizeof(T) * size_t((hi - lo) * D));
    add_owned_pairs(gk, D, rows, Q, L, a.data(), x, lo, hi, idw);
    if (idw)
      for (int64_t r = lo; r < hi; ++r) {
        add_pair(gk + r * D, D, static_cast<T>(sa[size_t(r)]), K + r * D);
        add_pair(gk + r * D, D, -static_cast<T>(sb[size_t(r)]), lam + r * D);
      }
  }
}

template <typename T>
void row_norms_cpu(const T* x, int64_t R, int64_t D, T* out) {
#pragma omp parallel for schedule(static) if (R * D > kSerialWork)
  for (int64_t r = 0; r < R; ++r) out[r] = dot_lanes(x + r * D, x + r * D, D);
}

template <typename T>
bool all_within_cpu(const T* x, int64_t n, T lim) {
  using U = typename ExpBits<T>::U;
  constexpr U kAbs = ~(U(1) << (8 * sizeof(U) - 1));
  U top, most = 0;
  std::memcpy(&top, &lim, sizeof top);
  top &= kAbs;
#pragma omp parallel for schedule(static) reduction(max : most) if (n > 16 * kSerialWork)
  for (int64_t i = 0; i < n; ++i) {
    U b;
    std::memcpy(&b, x + i, sizeof b);
    b &= kAbs;
    most = b > most ? b : most;
  }
  return most <= top;
}

template <typename T>
void slot_scores_cpu(const T* q, const T* K, const int64_t* idx, int64_t M, int64_t H, int64_t n,
                     int64_t D, int64_t k, int64_t tokens_per_group, T* s) {
  check_index("slot_scores", "idx", idx, M * H * k, n * n);
  // The top-k slots of a (token, head) crowd onto the few best half rows (the k x k merge's
  // corner): ~k/3 distinct rows per half for k = 32, so remembering the rows dotted already
  // skips most of the reads (up to kSeen of them; past that every slot is dotted).
  constexpr int64_t kSeen = 64;
#pragma omp parallel for schedule(static) if (M * H * k * D > kSerialWork)
  for (int64_t mh = 0; mh < M * H; ++mh) {
    const int64_t g = (mh / H) / tokens_per_group, h = mh % H;
    const int64_t* id = idx + mh * k;
    for (int64_t c = 0; c < 2; ++c) {
      const T* qc = q + (mh * 2 + c) * D;
      const T* Kc = K + ((g * H + h) * 2 + c) * n * D;
      T* sc = s + (mh * 2 + c) * k;
      int64_t seen_row[kSeen];
      T seen_s[kSeen];
      int64_t nseen = 0;
      for (int64_t j = 0; j < k; ++j) {
        const int64_t r = c ? id[j] % n : id[j] / n;
        int64_t f = 0;
        while (f < nseen && seen_row[f] != r) ++f;
        if (f < nseen) {
          sc[j] = seen_s[f];
          continue;
        }
        const T v = dot_lanes(Kc + r * D, qc, D);
        sc[j] = v;
        if (nseen < kSeen) {
          seen_row[nseen] = r;
          seen_s[nseen++] = v;
        }
      }
    }
  }
}

template <typename T>
void read_weights_cpu(const T* s, const int64_t* pos, int64_t M, int64_t H, int64_t k, T* w) {
  const int64_t HK = H * k;
  check_index("read_weights", "pos", pos, M * H * 2 * k, k);
#pragma omp parallel for schedule(static) if (M * HK * kExpWork > kSerialWork)
  for (int64_t m = 0; m < M; ++m) {
    T* wm = w + m * HK;
    for (int64_t h = 0; h < H; ++h) {
      const int64_t g0 = (m * H + h) * 2;
      const T* s0 = s + g0 * k;
      const T* s1 = s0 + k;
      const int64_t* p0 = pos + g0 * k;
      const int64_t* p1 = p0 + k;
      for (int64_t j = 0; j < k; ++j) wm[h * k + j] = s0[p0[j]] + s1[p1[j]];
    }
    softmax_into(wm, wm, HK);
  }
}

template <typename T>
void scatter_rows_dense_cpu(T* table, int64_t R, int64_t D, const int64_t* urows,
                            const int64_t* offsets, int64_t U, const int64_t* order, const T* coef,
                            const T* x, int64_t L, const T* src, T* gw) {
  // Rows in fixed chunks (not per thread): each row is zeroed, summed and written by one thread
  // in pair order, whatever the thread count. A chunk finds its first segment by binary search
  // (urows ascending). The table is written once, front to back, with non-temporal stores: a
  // row is summed in a per-thread buffer and streamed out (zeros where no pair lands), so no
  // line of the table is read before it is written (read-for-ownership; 512 MiB: 59-63 ->
  // 51-55 ms on the 2-core VM). With src, each pair's dot with src's row r comes from the same
  // pass, while x's row is in cache: src is read in row order, once.
  constexpr int64_t kChunk = 256;
  const int64_t chunks = (R + kChunk - 1) / kChunk;
#pragma omp parallel if (R * D > kSerialWork)
  {
  Vec<T> buf(static_cast<size_t>(D), T(0));
#pragma omp for schedule(static)
  for (int64_t ch = 0; ch < chunks; ++ch) {
    const int64_t r0 = ch * kChunk, r1 = r0 + kChunk < R ? r0 + kChunk : R;
    int64_t u = std::lower_bound(urows, urows + U, r0, [](int64_t a, int64_t b) { return a < b; }) - urows;
    for (int64_t r = r0; r < r1; ++r) {
      T* row = table + r * D;
      if (u < U && urows[u] == r) {
        if (u + kAhead < U && offsets[u + kAhead] < offsets[u + kAhead + 1]) {
          prefetch_row(x + (order[offsets[u + kAhead]] / L) * D, D);
          if (src) prefetch_row(src + urows[u + kAhead] * D, D);
        }
        std::memset(buf.data(), 0, sizeof(T) * size_t(D));
        if (src) {
          const T* srow = src + r * D;
          for (int64_t j = offsets[u]; j < offsets[u + 1]; ++j) {
            const int64_t pair = order[j];
            const T* xm = x + (pair / L) * D;
            add_pair(buf.data(), D, coef[pair], xm);
            gw[pair] = dot_lanes(srow, xm, D);
          }
        } else {
          add_segment(buf.data(), D, order + offsets[u], offsets[u + 1] - offsets[u], coef, x, L);
        }
        copy_row_nt(row, buf.data(), D);
        ++u;
      } else {
        zero_row_nt(row, D);
      }
    }
  }
  stream_fence();
  }  // omp parallel
}

#define FWPKM_INSTANTIATE(T) FWPKM_CPU_KERNEL_INSTANTIATIONS(T)
FWPKM_INSTANTIATE(float)
FWPKM_INSTANTIATE(double)
#undef FWPKM_INSTANTIATE

}  // namespace FWPKM_CPU_ISA
}  // namespace fwpkm
