// Index bookkeeping of the window recurrence on the CPU (contracts in ../kernels.h), each a few
// torch ops with temporaries otherwise:
//   read_positions  where each selected slot's two sub-keys sit in the per-half top-k lists: k x k
//                   integer comparisons per (token, head, half) instead of (rows, k, k) boolean
//                   and product temporaries (8 ms of a default-model training step; < 1 ms here)
//   map_rows        the compact ids of table rows (TouchedRows.map), adding and copying the rows
//                   not seen yet: one serial pass over the ids instead of a lookup, a test, a
//                   bucketing of the new rows, two scatters and a second lookup
//   segment_coefs   the value write's pair coefficients scale * w / N_row from the segments: one
//                   pass instead of a count expansion, a zeroed table, an indexed write, a
//                   reciprocal, a cast and two products
#include "../kernels.h"

#include <cstring>
#include <stdexcept>
#include <string>

namespace fwpkm {

void read_positions_cpu(const int64_t* idx, const int64_t* half, int64_t G, int64_t k, int64_t n,
                        int64_t* pos) {
#pragma omp parallel for schedule(static) if (G * k * k > (int64_t(1) << 13))
  for (int64_t g = 0; g < G; ++g) {
    const int64_t* sel = idx + g * k;
    for (int64_t c = 0; c < 2; ++c) {
      const int64_t* list = half + (g * 2 + c) * k;
      int64_t* out = pos + (g * 2 + c) * k;
      for (int64_t j = 0; j < k; ++j) {
        const int64_t sub = c == 0 ? sel[j] / n : sel[j] % n;
        int64_t at = 0;  // not found (never, for lists the search made): 0, as the torch path
        for (int64_t l = 0; l < k; ++l) {
          if (list[l] == sub) {
            at = l;
            break;
          }
        }
        out[j] = at;
      }
    }
  }
}

template <typename T>
int64_t map_rows_cpu(int64_t* slot, int64_t R, const int64_t* rows, int64_t Q, int64_t* cid,
                     int64_t* touched, int64_t U, int64_t cap, const T* table, T* compact,
                     int64_t D) {
  const int64_t U0 = U;
  auto undo = [&]() {  // on a refusal: the map as it was
    for (int64_t u = U0; u < U; ++u) slot[touched[u]] = -1;
  };
  // serial: ids in order of first occurrence, the same whatever the thread count
  for (int64_t j = 0; j < Q; ++j) {
    const int64_t r = rows[j];
    if (r < 0 || r >= R) {
      undo();
      throw std::invalid_argument("fwpkm map_rows: row id " + std::to_string(r) + " at " +
                                  std::to_string(j) + " is outside [0, " + std::to_string(R) + ")");
    }
    int64_t c = slot[r];
    if (c < 0) {
      if (U == cap) {
        undo();
        throw std::length_error("fwpkm map_rows: more than " + std::to_string(cap) +
                                " distinct rows (the compact table's capacity)");
      }
      c = slot[r] = U;
      touched[U++] = r;
    }
    cid[j] = c;
  }
  if (compact == nullptr) return U;
  // the new rows' values, copied in parallel (rows in random order: prefetched ahead)
#pragma omp parallel for schedule(static) if ((U - U0) * D > (int64_t(1) << 15))
  for (int64_t u = U0; u < U; ++u) {
    if (u + 4 < U) __builtin_prefetch(table + touched[u + 4] * D);
    std::memcpy(compact + u * D, table + touched[u] * D, sizeof(T) * size_t(D));
  }
  return U;
}

template int64_t map_rows_cpu<float>(int64_t*, int64_t, const int64_t*, int64_t, int64_t*, int64_t*,
                                     int64_t, int64_t, const float*, float*, int64_t);
template int64_t map_rows_cpu<double>(int64_t*, int64_t, const int64_t*, int64_t, int64_t*,
                                      int64_t*, int64_t, int64_t, const double*, double*, int64_t);

template <typename T>
void segment_coefs_cpu(const int64_t* offsets, int64_t U, const int64_t* order, const T* w,
                       double scale, int64_t Q, T* coef) {
  std::memset(coef, 0, sizeof(T) * size_t(Q));
  const T ts = static_cast<T>(scale);
  for (int64_t u = 0; u < U; ++u) {
    const int64_t a = offsets[u], b = offsets[u + 1];
    const T inv = static_cast<T>(1.0 / double(b - a));
    for (int64_t p = a; p < b; ++p) {
      const int64_t pair = order[p];
      coef[pair] = (ts * w[pair]) * inv;
    }
  }
}

template void segment_coefs_cpu<float>(const int64_t*, int64_t, const int64_t*, const float*, double,
                                       int64_t, float*);
template void segment_coefs_cpu<double>(const int64_t*, int64_t, const int64_t*, const double*,
                                        double, int64_t, double*);

}  // namespace fwpkm
