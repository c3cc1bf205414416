// Pieces shared by the CPU loss kernels (dino_loss_cpu.cpp: row-major, dino_loss_kmajor.cpp: k-major): input
// checks, the denormal guard, and the k-major kernels' entry points (registered in dino_loss_cpu.cpp).
#pragma once
#include <torch/extension.h>

#include <vector>
#if defined(__x86_64__)
#include <xmmintrin.h>
#endif

namespace dinovmf {

// Flush-to-zero and denormals-are-zero for one worker thread's loop (MXCSR is per thread; restored on
// exit). exp() of logits ~87 below the row max lands just above FLT_MIN, and products of such values with
// weights are denormal: x86 handles those ~100x slower (a 5x slower teacher pass was measured at teacher
// temperature 0.04). Values below 1.2e-38 next to a row that sums to 1 change nothing.
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
