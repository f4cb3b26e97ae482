// CUDA-only extras of fwpkm_ext that are not part of the shared CPU/CUDA contract (kernels.h).
// Plain C++ header (no CUDA types), so host code can include it.
#pragma once
#include <cstdint>

namespace fwpkm {

// Same contract as scatter_rows_cuda (kernels.h), but parallel over pairs with atomicAdd:
// one warp per pair p in [offsets[0], offsets[U]), which finds its segment by binary search
// over offsets and atomically adds coef[order[p]] * x[order[p] / L, :] to table[urows[u], :].
// NOT deterministic: the summation order (hence the rounding) changes from run to run.
// Faster than the deterministic kernel when a few rows own very long segments.
template <typename T>
void scatter_rows_atomic_cuda(T* table, int64_t R, int64_t D, const int64_t* urows,
                              const int64_t* offsets, int64_t U, const int64_t* order,
                              const T* coef, const T* x, int64_t L, void* stream);

}  // namespace fwpkm
