// SIMD float loops for the CPU ops, written with GCC/Clang vector extensions so they do not depend on
// the auto-vectoriser: std::exp never vectorises without -ffast-math, and a branch-free scalar exp was
// turned back into branches by GCC. The loops (cpu_vec_math_impl.h) are compiled three times: for AVX-512
// (16 lanes) and AVX2+FMA (8 lanes) under `#pragma GCC target`, and for baseline SSE2 (4 lanes); `vec::`
// picks the best one the CPU has at run time, since setup.py builds without -march flags so the extension
// runs on any x86-64. (target_clones was tried first: GCC then does not inline the vector helpers into
// the clone, and it ran several times slower.) DINOVMF_CPU_ISA=sse2|avx2 caps the choice (tests cover every path).
// exp is a Cephes-style polynomial: max relative error 1.2e-7 against std::exp over [-87, 88].
#pragma once
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>

namespace dinovmf {

#if defined(__x86_64__) && defined(__GNUC__)
#define DINOVMF_HAVE_X86_PATHS 1
namespace vec_avx512 {
#pragma GCC push_options
#pragma GCC target("avx512f,avx512dq,avx512vl,avx512bw,avx2,fma")
#define DINOVMF_VEC_BYTES 64
#include "cpu_vec_math_impl.h"
#undef DINOVMF_VEC_BYTES
#pragma GCC pop_options
}  // namespace vec_avx512

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

enum Isa : int { kSse2 = 0, kAvx2 = 1, kAvx512 = 2 };

// The instruction set the loops run with: the best this CPU has, capped by DINOVMF_CPU_ISA (sse2, avx2).
inline int isa() {
  static const int level = [] {
    int best = kSse2;
#ifdef DINOVMF_HAVE_X86_PATHS
    if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) best = kAvx2;
    if (best == kAvx2 && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512dq") &&
        __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512bw"))
      best = kAvx512;
#endif
    const char* cap = std::getenv("DINOVMF_CPU_ISA");
    if (cap && std::strcmp(cap, "sse2") == 0) best = kSse2;
    if (cap && std::strcmp(cap, "avx2") == 0 && best > kAvx2) best = kAvx2;
    return best;
  }();
  return level;
}

inline const char* isa_name() { return isa() == kAvx512 ? "avx512" : isa() == kAvx2 ? "avx2" : "sse2"; }

#ifdef DINOVMF_HAVE_X86_PATHS
#define DINOVMF_DISPATCH(name)                                                             \
  template <typename... Args>                                                              \
  inline auto name(Args... args) {                                                         \
    switch (isa()) {                                                                       \
      case kAvx512:                                                                        \
        return vec_avx512::name(args...);                                                  \
      case kAvx2:                                                                          \
        return vec_avx2::name(args...);                                                    \
      default:                                                                             \
        return vec_base::name(args...);                                                    \
    }                                                                                      \
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
DINOVMF_DISPATCH(dot)
DINOVMF_DISPATCH(axpy_mul)
DINOVMF_DISPATCH(sum_exp)
DINOVMF_DISPATCH(online_lse)
DINOVMF_DISPATCH(lanes)
DINOVMF_DISPATCH(ce_cols_fwd_tile)
DINOVMF_DISPATCH(ce_cols_grad_tile)
DINOVMF_DISPATCH(teacher_cols_fwd_tile)
DINOVMF_DISPATCH(teacher_cols_finish_tile)
#undef DINOVMF_DISPATCH

}  // namespace vec
}  // namespace dinovmf
