// segment_rows on the CPU (contract in ../kernels.h): the stable bucketing of pair ids by row
// that every one-writer-per-row scatter needs. The keys are small non-negative integers, so a
// counting sort (range up to a few times the number of pairs) or an LSD radix sort with 11-bit
// digits replaces the comparison sort: O(Q) per digit instead of O(Q log Q), and no
// data-dependent branches. Serial: Q is at most a few hundred thousand pairs per call, which
// one core buckets in well under a millisecond, and a serial pass is trivially stable.
#include "../kernels.h"

#include <algorithm>
#include <cstring>
#include <stdexcept>
#include <string>

namespace fwpkm {
namespace {

constexpr int kDigitBits = 11;
constexpr int64_t kBuckets = int64_t(1) << kDigitBits;

bool counting_path(int64_t Q, int64_t R) { return R <= 4 * Q + 4096; }

[[noreturn]] void bad_key(int64_t j, int64_t key, int64_t R) {
  throw std::invalid_argument("fwpkm segment_rows: row id " + std::to_string(key) + " of pair " +
                              std::to_string(j) + " is outside [0, " + std::to_string(R) + ")");
}

}  // namespace

int64_t segment_rows_work(int64_t Q, int64_t R) {
  return counting_path(Q, R) ? R + 1 : 4 * Q + kBuckets;
}

int64_t segment_rows_cpu(const int64_t* rows, const int64_t* pairs, int64_t Q, int64_t R,
                         int64_t* order, int64_t* urows, int64_t* offsets, int64_t* work) {
  offsets[0] = 0;
  if (Q == 0) return 0;
  auto id = [&](int64_t j) { return pairs ? pairs[j] : j; };
  int64_t U = 0;
  if (counting_path(Q, R)) {
    int64_t* cnt = work;  // cnt[r + 1]: pairs of row r; after the prefix sum cnt[r]: its start
    std::memset(cnt, 0, sizeof(int64_t) * size_t(R + 1));
    for (int64_t j = 0; j < Q; ++j) {
      const int64_t key = rows[id(j)];
      if (key < 0 || key >= R) bad_key(j, key, R);
      ++cnt[key + 1];
    }
    for (int64_t r = 0; r < R; ++r) {
      if (cnt[r + 1] > 0) urows[U++] = r;
      cnt[r + 1] += cnt[r];
    }
    for (int64_t u = 0; u < U; ++u) offsets[u + 1] = cnt[urows[u] + 1];
    for (int64_t j = 0; j < Q; ++j) {  // in input order: stable
      const int64_t p = id(j);
      order[cnt[rows[p]]++] = p;
    }
    return U;
  }
  // LSD radix sort of (key, pair id), kDigitBits per pass, ping-ponging between two buffers
  int64_t *ka = work, *va = work + Q, *kb = work + 2 * Q, *vb = work + 3 * Q, *cnt = work + 4 * Q;
  for (int64_t j = 0; j < Q; ++j) {
    const int64_t p = id(j);
    const int64_t key = rows[p];
    if (key < 0 || key >= R) bad_key(j, key, R);
    ka[j] = key;
    va[j] = p;
  }
  int bits = 0;
  while (bits < 63 && (int64_t(1) << bits) < R) ++bits;
  for (int shift = 0; shift < bits; shift += kDigitBits) {
    std::memset(cnt, 0, sizeof(int64_t) * size_t(kBuckets));
    for (int64_t j = 0; j < Q; ++j) ++cnt[(ka[j] >> shift) & (kBuckets - 1)];
    int64_t run = 0;
    for (int64_t b = 0; b < kBuckets; ++b) {
      const int64_t c = cnt[b];
      cnt[b] = run;
      run += c;
    }
    for (int64_t j = 0; j < Q; ++j) {
      const int64_t pos = cnt[(ka[j] >> shift) & (kBuckets - 1)]++;
      kb[pos] = ka[j];
      vb[pos] = va[j];
    }
    std::swap(ka, kb);
    std::swap(va, vb);
  }
  std::memcpy(order, va, sizeof(int64_t) * size_t(Q));
  for (int64_t j = 0; j < Q; ++j) {
    if (j == 0 || ka[j] != ka[j - 1]) {
      urows[U] = ka[j];
      offsets[U] = j;
      ++U;
    }
  }
  offsets[U] = Q;
  return U;
}

}  // namespace fwpkm
