// The vMF column bias log C_p(kappa) - log C_p(kappa0) by the Debye expansion (U1..U4), shared by the
// C++ (double) and CUDA (float) ops. Same algebra as kernels/vmf_bias.py; see kernels/common.py for the
// derivation: up to a constant in p, log C_p(kappa) = nu (log(1+s) - s) + 0.5 log s - log series(1/s)
// with z = kappa/nu, s = sqrt(1+z^2). Taking the difference term by term keeps the large constant
// (about +344 at p = 256) out of the floating-point result.
#pragma once
#include <cmath>

#ifdef __CUDACC__
#define DINOVMF_HD __host__ __device__ __forceinline__
#else
#define DINOVMF_HD inline
#endif

namespace dinovmf {

#ifndef __CUDACC__
using std::log;
using std::log1p;
using std::sqrt;
#endif

// 1 + U1(t)/nu + U2(t)/nu^2 + U3(t)/nu^3 + U4(t)/nu^4 (DLMF 10.41.10).
template <typename T>
DINOVMF_HD T debye_series(T t, T nu) {
  const T t2 = t * t;
  const T u1 = t * (T(3) - T(5) * t2) / T(24);
  const T u2 = t2 * (T(81) + t2 * (T(-462) + t2 * T(385))) / T(1152);
  const T u3 = t * t2 * (T(30375) + t2 * (T(-369603) + t2 * (T(765765) - T(425425) * t2))) / T(414720);
  const T u4 = t2 * t2 *
               (T(4465125) + t2 * (T(-94121676) + t2 * (T(349922430) + t2 * (T(-446185740) + t2 * T(185910725))))) /
               T(39813120);
  const T inv_nu = T(1) / nu;
  return T(1) + inv_nu * (u1 + inv_nu * (u2 + inv_nu * (u3 + inv_nu * u4)));
}

// Reference-point terms for kappa0 = 1/temp, computed once per call in double.
struct DebyeRef {
  double nu, z0, s0, log_series0;
};

inline DebyeRef debye_reference(double temp, double p) {
  DebyeRef r;
  r.nu = p / 2.0 - 1.0;
  r.z0 = (1.0 / temp) / r.nu;
  r.s0 = std::sqrt(1.0 + r.z0 * r.z0);
  r.log_series0 = std::log(debye_series<double>(1.0 / r.s0, r.nu));
  return r;
}

// log C_p(kappa) - log C_p(kappa0). s - s0 is formed as (z - z0)(z + z0)/(s + s0) and log((1+s)/(1+s0))
// as log1p of it, so kappa near kappa0 loses no bits even with nu in the hundreds multiplying it.
template <typename T>
DINOVMF_HD T log_cp_diff(T kappa, T nu, T z0, T s0, T log_series0) {
  const T z = kappa / nu;
  const T s = sqrt(T(1) + z * z);
  const T ds = (z - z0) * (z + z0) / (s + s0);
  return nu * (log1p(ds / (T(1) + s0)) - ds) + T(0.5) * log(s / s0) - log(debye_series(T(1) / s, nu)) +
         log_series0;
}

}  // namespace dinovmf
