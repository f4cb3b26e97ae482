// Small shared helpers for the CUDA kernels of fwpkm_ext (device code only; not installed).
#pragma once
#include <cuda_runtime.h>

#include <cstdint>
#include <stdexcept>
#include <string>

namespace fwpkm {
namespace cuda_detail {

constexpr int kWarp = 32;
constexpr unsigned kFullMask = 0xffffffffu;
constexpr int kBlockThreads = 256;                 // 8 warps for the row kernels
constexpr int kWarpsPerBlock = kBlockThreads / kWarp;
constexpr int64_t kMaxBlocks = int64_t(1) << 20;  // grid-stride loops cover the rest
constexpr int kMaxSmemBytes = 48 * 1024;          // default dynamic shared memory limit

// ---------------------------------------------------------------- host helpers

inline void check_launch(const char* op) {
  const cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess) {
    throw std::runtime_error(std::string("fwpkm ") + op + ": " + cudaGetErrorString(err));
  }
}

[[noreturn]] inline void bad_arg(const char* op, const std::string& what) {
  throw std::invalid_argument(std::string("fwpkm ") + op + ": " + what);
}

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

inline unsigned grid_blocks(int64_t items, int64_t per_block) {
  int64_t b = ceil_div(items, per_block);
  if (b < 1) b = 1;
  if (b > kMaxBlocks) b = kMaxBlocks;
  return static_cast<unsigned>(b);
}

inline bool aligned16(const void* p) {
  return p == nullptr || (reinterpret_cast<std::uintptr_t>(p) & 15u) == 0;
}

// Elements per 16-byte vector: 4 floats, 2 doubles.
template <typename T>
constexpr int vec_width() {
  return static_cast<int>(16 / sizeof(T));
}

// Number of 32-lane vector chunks processed together per row pass (register tile width),
// rounded up to a power of two, at most 8.
inline int chunk_count(int64_t D, int vec) {
  const int64_t c = ceil_div(D, int64_t(kWarp) * vec);
  return c <= 1 ? 1 : c <= 2 ? 2 : c <= 4 ? 4 : 8;
}

// Calls f(std::integral_constant<int, VEC>{}, std::integral_constant<int, NCH>{}) with
// VEC = vec_width<T>() when `vectorized` else 1, and NCH in {1, 2, 4, 8}.
template <int V>
struct IntC {
  static constexpr int value = V;
};

template <int VEC, typename F>
inline void dispatch_nch(int nch, F&& f) {
  switch (nch) {
    case 1: f(IntC<VEC>{}, IntC<1>{}); break;
    case 2: f(IntC<VEC>{}, IntC<2>{}); break;
    case 4: f(IntC<VEC>{}, IntC<4>{}); break;
    default: f(IntC<VEC>{}, IntC<8>{}); break;
  }
}

template <typename T, typename F>
inline void dispatch_vec(bool vectorized, int64_t D, F&& f) {
  if (vectorized) {
    dispatch_nch<vec_width<T>()>(chunk_count(D, vec_width<T>()), f);
  } else {
    dispatch_nch<1>(chunk_count(D, 1), f);
  }
}

// ---------------------------------------------------------------- device helpers

// Explicitly rounded arithmetic: keeps nvcc from contracting a*b+c into an FMA, so that
// sequential sums give the same bits as a plain (non-FMA) CPU loop.
__device__ __forceinline__ float add_rn(float a, float b) { return __fadd_rn(a, b); }
__device__ __forceinline__ double add_rn(double a, double b) { return __dadd_rn(a, b); }
__device__ __forceinline__ float sub_rn(float a, float b) { return __fsub_rn(a, b); }
__device__ __forceinline__ double sub_rn(double a, double b) { return __dsub_rn(a, b); }
__device__ __forceinline__ float mul_rn(float a, float b) { return __fmul_rn(a, b); }
__device__ __forceinline__ double mul_rn(double a, double b) { return __dmul_rn(a, b); }

// acc + a * b with two roundings (no FMA).
template <typename T>
__device__ __forceinline__ T madd_rn(T acc, T a, T b) {
  return add_rn(acc, mul_rn(a, b));
}

__device__ __forceinline__ float fma_dev(float a, float b, float c) { return fmaf(a, b, c); }
__device__ __forceinline__ double fma_dev(double a, double b, double c) { return fma(a, b, c); }

// Full-precision natural log (never the fast-math intrinsic). The float version goes through
// double and rounds once: correctly rounded except in astronomically rare cases, so it agrees
// with any CPU log that is itself correctly rounded or nearly so (CUDA's logf is only <= 1 ulp).
__device__ __forceinline__ float dev_log(float x) {
  return static_cast<float>(log(static_cast<double>(x)));
}
__device__ __forceinline__ double dev_log(double x) { return log(x); }

template <typename T>
__device__ __forceinline__ T dev_nan();
template <>
__device__ __forceinline__ float dev_nan<float>() {
  return __int_as_float(0x7fc00000);
}
template <>
__device__ __forceinline__ double dev_nan<double>() {
  return __longlong_as_double(0x7ff8000000000000LL);
}

// 16-byte (or scalar) vector of VEC elements of T.
template <typename T, int VEC>
struct alignas(sizeof(T) * VEC) Pack {
  T v[VEC];
};

template <typename T, int VEC>
__device__ __forceinline__ Pack<T, VEC> load_pack(const T* p) {
  return *reinterpret_cast<const Pack<T, VEC>*>(p);
}

template <typename T, int VEC>
__device__ __forceinline__ void store_pack(T* p, const Pack<T, VEC>& v) {
  *reinterpret_cast<Pack<T, VEC>*>(p) = v;
}

__device__ __forceinline__ int lane_id() { return static_cast<int>(threadIdx.x) & (kWarp - 1); }

// Global warp id and total warp count (grid-stride loops over warp-sized work items).
__device__ __forceinline__ int64_t global_warp() {
  return static_cast<int64_t>(blockIdx.x) * (blockDim.x / kWarp) + threadIdx.x / kWarp;
}
__device__ __forceinline__ int64_t warp_count() {
  return static_cast<int64_t>(gridDim.x) * (blockDim.x / kWarp);
}

}  // namespace cuda_detail
}  // namespace fwpkm
