// read_positions on the CPU (contract in ../kernels.h): where each selected slot's two sub-keys
// sit in the per-half top-k lists. k x k integer comparisons per (token, head, half), done in
// place of the (rows, k, k) boolean and product temporaries that the same comparison costs in
// torch (8 ms of a default-model training step; well under 1 ms here).
#include "../kernels.h"

namespace fwpkm {

void read_positions_cpu(const int64_t* idx, const int64_t* half, int64_t G, int64_t k, int64_t n,
                        int64_t* pos) {
#pragma omp parallel for schedule(static) if (G * k * k > (int64_t(1) << 16))
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

}  // namespace fwpkm
