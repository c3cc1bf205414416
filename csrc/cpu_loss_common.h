// Pieces shared by the CPU loss kernels (dino_loss_cpu.cpp: row-major, dino_loss_kmajor.cpp: k-major): input
// checks, the denormal guard, and the k-major kernels' entry points (registered in dino_loss_cpu.cpp).
#pragma once
#include <torch/extension.h>

#include <algorithm>
#include <cmath>
#include <vector>
#if defined(__x86_64__)
#include <xmmintrin.h>
#endif

namespace dinovmf {

// Flush-to-zero and denormals-are-zero for one worker thread's loop (MXCSR is per thread; restored on
// exit). exp() of logits ~87 below the row max lands just above FLT_MIN, and products of such values with
// weights are denormal: x86 handles those far slower (microcode assists), which made the teacher pass
// several times slower at teacher temperature 0.04. Values below 1.2e-38 next to a row that sums to 1
// change nothing.
struct FlushDenormals {
#if defined(__x86_64__)
  unsigned int saved;
  FlushDenormals() : saved(_mm_getcsr()) { _mm_setcsr(saved | 0x8040); }
  ~FlushDenormals() { _mm_setcsr(saved); }
#endif
};

inline void check_cpu_contiguous(const at::Tensor& x, const char* name) {
  TORCH_CHECK(x.device().is_cpu(), name, " must be a CPU tensor, got ", x.device());
  TORCH_CHECK(x.is_contiguous(), name, " must be contiguous");
}

// Data pointer of an optional fp32 [n] vector, or nullptr when absent.
inline float* optional_vector(const c10::optional<at::Tensor>& x, int64_t n, const char* name) {
  if (!x.has_value() || !x->defined()) return nullptr;
  check_cpu_contiguous(*x, name);
  TORCH_CHECK(x->scalar_type() == at::kFloat && x->numel() == n, name, " must be a float32 tensor of ", n,
              " elements");
  return x->data_ptr<float>();
}

// A row's softmax partials from its tiles (per tile: its max m_t, sum e, sum e (l - m_t), with e = exp(l - m_t)),
// merged in tile order in double: m = max_t m_t, se = sum_k exp(l_k - m), shifted = sum_k exp(l_k - m)(l_k - m).
// `stride`: the distance between one row's consecutive tiles in the arrays; tsel null: shifted is 0.
struct MergedTiles {
  double m, se, shifted;
};

inline MergedTiles merge_tiles(const float* tm, const float* tse, const float* tsel, int64_t n_tiles,
                               int64_t stride) {
  MergedTiles r{-INFINITY, 0, 0};
  for (int64_t t = 0; t < n_tiles; ++t) r.m = std::max<double>(r.m, tm[t * stride]);
  for (int64_t t = 0; t < n_tiles; ++t) {
    const double d = tm[t * stride] - r.m, w = std::exp(d);
    r.se += w * tse[t * stride];
    if (tsel) r.shifted += w * (tsel[t * stride] + d * tse[t * stride]);
  }
  return r;
}

// k-major kernels (dino_loss_kmajor.cpp; contracts there).
at::Tensor ce_cols(at::Tensor& logits_t, const c10::optional<at::Tensor>& col_scale,
                   const c10::optional<at::Tensor>& bias, const at::Tensor& teacher_probs_t, int64_t row0,
                   int64_t n_rows, int64_t B, int64_t T, bool same_view, const c10::optional<at::Tensor>& row_weight,
                   double grad_scale, bool write_grad, const c10::optional<at::Tensor>& col_grad_sum);
std::vector<at::Tensor> teacher_cols(at::Tensor& dots_t, int64_t n_rows, const at::Tensor& col_a,
                                     const at::Tensor& col_b, int64_t stat_kind,
                                     const c10::optional<at::Tensor>& stat_weight);
int64_t kmajor_lanes();

}  // namespace dinovmf
