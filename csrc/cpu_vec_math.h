// SIMD float loops for the CPU ops, written with GCC/Clang vector extensions so they do not depend on
// the auto-vectoriser: std::exp never vectorises without -ffast-math, and a branch-free scalar exp was
// turned back into branches by GCC. The loops (cpu_vec_math_impl.h) are compiled twice: for AVX2+FMA
// (8 lanes) under `#pragma GCC target`, and for baseline SSE2 (4 lanes); `vec::` picks one at run time,
// since setup.py builds without -march flags so the extension runs on any x86-64. (target_clones was
// tried first: GCC then does not inline the vector helpers into the clone, and it ran 6x slower.)
// exp is a Cephes-style polynomial: max relative error 1.2e-7 against std::exp over [-87, 88].
#pragma once
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>

namespace dinovmf {

#if defined(__x86_64__) && defined(__GNUC__)
#define DINOVMF_HAVE_AVX2_PATH 1
namespace vec_avx2 {
#pragma GCC push_options
#pragma GCC target("avx2,fma")
#define DINOVMF_VEC_BYTES 32
#include "cpu_vec_math_impl.h"
#undef DINOVMF_VEC_BYTES
#pragma GCC pop_options
}  // namespace vec_avx2
#endif

namespace vec_base {
#define DINOVMF_VEC_BYTES 16
#include "cpu_vec_math_impl.h"
#undef DINOVMF_VEC_BYTES
}  // namespace vec_base

namespace vec {

inline bool use_avx2() {
#ifdef DINOVMF_HAVE_AVX2_PATH
  // DINOVMF_CPU_BASELINE=1 forces the SSE2 path (tests use it to cover both paths on an AVX2 machine).
  static const bool yes = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
                          std::getenv("DINOVMF_CPU_BASELINE") == nullptr;
  return yes;
#else
  return false;
#endif
}

#ifdef DINOVMF_HAVE_AVX2_PATH
#define DINOVMF_DISPATCH(name)                                                             \
  template <typename... Args>                                                              \
  inline auto name(Args... args) {                                                         \
    return use_avx2() ? vec_avx2::name(args...) : vec_base::name(args...);                 \
  }
#else
#define DINOVMF_DISPATCH(name)                                                             \
  template <typename... Args>                                                              \
  inline auto name(Args... args) {                                                         \
    return vec_base::name(args...);                                                        \
  }
#endif

// One branch per call; every call covers a tile or a row, so the branch costs nothing.
DINOVMF_DISPATCH(max_of)
DINOVMF_DISPATCH(col_affine)
DINOVMF_DISPATCH(ce_fwd_tile)
DINOVMF_DISPATCH(ce_grad_tile)
DINOVMF_DISPATCH(exp_tile)
DINOVMF_DISPATCH(scale_argmax)
DINOVMF_DISPATCH(axpy)
DINOVMF_DISPATCH(axpy_mul)
DINOVMF_DISPATCH(sum_exp)
DINOVMF_DISPATCH(online_lse)
#undef DINOVMF_DISPATCH

}  // namespace vec
}  // namespace dinovmf
