// CPU implementation of the fused DINO-vMF loss ops (dinovmf._C). Parallel over rows with
// at::parallel_for; inner loops are the vectorised float loops of cpu_vec_math.h. bf16/fp16 inputs are
// converted to fp32 one tile at a time, and every accumulation is fp32 (per tile) and double (across tiles).
// The Python side (dinovmf/_ext.py) wraps these in autograd Functions and runs the Sinkhorn driver.
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <vector>

#include "cpu_vec_math.h"
#include "vmf_bias.h"

namespace dinovmf {
namespace {

constexpr int64_t kTile = 2048;  // 8 KiB of fp32: a tile and its teacher sum stay in L1
enum Mode : int64_t { kNone = 0, kLogit = 1, kProb = 2, kShift = 3 };

// Pointer to `n` floats of `src`: the input itself for fp32, else `buf` after conversion.
template <typename scalar_t>
const float* as_float(const scalar_t* src, float* buf, int64_t n) {
  if constexpr (std::is_same_v<scalar_t, float>) {
    return src;
  } else {
    for (int64_t i = 0; i < n; ++i) buf[i] = static_cast<float>(src[i]);
    return buf;
  }
}

template <typename scalar_t>
void add_as_float(const scalar_t* src, float* acc, int64_t n) {
  for (int64_t i = 0; i < n; ++i) acc[i] += static_cast<float>(src[i]);
}

// sum exp(y - m) over a whole row (terms written to `out` if not null): fp32 lanes within a tile, double
// across tiles, so a 131072-wide row sums to 1 within a few fp32 ulps instead of ~K/8 ulps.
double sum_exp_row(const float* y, float m, float* out, int64_t K) {
  double s = 0;
  for (int64_t k0 = 0; k0 < K; k0 += kTile)
    s += vec::sum_exp(y + k0, m, out ? out + k0 : nullptr, std::min(kTile, K - k0));
  return s;
}

void check_cpu_contiguous(const at::Tensor& x, const char* name) {
  TORCH_CHECK(x.device().is_cpu(), name, " must be a CPU tensor, got ", x.device());
  TORCH_CHECK(x.is_contiguous(), name, " must be contiguous");
}

// --- cross-entropy ---------------------------------------------------------------------------------

// Sum of the teacher rows paired with student view s, for columns [k0, k0 + n).
template <typename scalar_t>
void teacher_sum_tile(const scalar_t* P, int64_t T, int64_t B, int64_t K, int64_t s, int64_t b, int64_t k0,
                      int64_t n, float* pbar) {
  std::fill(pbar, pbar + n, 0.f);
  for (int64_t t = 0; t < T; ++t)
    if (t != s) add_as_float(P + (t * B + b) * K + k0, pbar, n);
}

template <typename scalar_t, typename prob_t>
void ce_forward_kernel(const at::Tensor& logits, const at::Tensor& probs, float* row_loss, float* row_lse,
                       float* row_psum) {
  const int64_t S = logits.size(0), B = logits.size(1), K = logits.size(2), T = probs.size(0);
  const scalar_t* L = logits.data_ptr<scalar_t>();
  const prob_t* P = probs.data_ptr<prob_t>();
  at::parallel_for(0, S * B, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> lbuf(kTile), pbar(kTile);
    for (int64_t row = begin; row < end; ++row) {
      const int64_t s = row / B, b = row % B;
      const scalar_t* l_row = L + row * K;
      float m = -INFINITY;  // pass 1: the row max (the row then sits in L2 for pass 2)
      for (int64_t k0 = 0; k0 < K; k0 += kTile) {
        const int64_t n = std::min(kTile, K - k0);
        m = std::max(m, vec::max_of(as_float(l_row + k0, lbuf.data(), n), n));
      }
      const float m_safe = std::isfinite(m) ? m : 0.f;
      double se = 0, dot = 0, psum = 0;
      for (int64_t k0 = 0; k0 < K; k0 += kTile) {
        const int64_t n = std::min(kTile, K - k0);
        const float* l = as_float(l_row + k0, lbuf.data(), n);
        teacher_sum_tile(P, T, B, K, s, b, k0, n, pbar.data());
        float part[3];
        vec::ce_tile(l, pbar.data(), m_safe, n, part);
        se += part[0];
        dot += part[1];
        psum += part[2];
      }
      const double lse = m_safe + std::log(se);
      row_loss[row] = static_cast<float>(psum * lse - dot);
      row_lse[row] = static_cast<float>(lse);
      row_psum[row] = static_cast<float>(psum);
    }
  });
}

std::vector<at::Tensor> ce_forward(const at::Tensor& logits, const at::Tensor& probs) {
  check_cpu_contiguous(logits, "student_logits");
  check_cpu_contiguous(probs, "teacher_probs");
  TORCH_CHECK(logits.dim() == 3 && probs.dim() == 3 && logits.size(1) == probs.size(1) &&
                  logits.size(2) == probs.size(2),
              "student_logits [S,B,K] and teacher_probs [T,B,K] must agree in B and K");
  auto stats = at::empty({3, logits.size(0) * logits.size(1)}, logits.options().dtype(at::kFloat));
  float* base = stats.data_ptr<float>();
  const int64_t rows = stats.size(1);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, logits.scalar_type(), "ce_forward", [&] {
    using logit_t = scalar_t;
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, probs.scalar_type(), "ce_forward_p", [&] {
      ce_forward_kernel<logit_t, scalar_t>(logits, probs, base, base + rows, base + 2 * rows);
    });
  });
  return {stats[0], stats[1], stats[2]};
}

template <typename scalar_t, typename prob_t>
void ce_backward_kernel(const at::Tensor& logits, const at::Tensor& probs, const float* row_lse,
                        const float* row_psum, float g, at::Tensor& grad) {
  const int64_t S = logits.size(0), B = logits.size(1), K = logits.size(2), T = probs.size(0);
  const scalar_t* L = logits.data_ptr<scalar_t>();
  const prob_t* P = probs.data_ptr<prob_t>();
  scalar_t* G = grad.data_ptr<scalar_t>();
  at::parallel_for(0, S * B, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> lbuf(kTile), pbar(kTile), gbuf(kTile);
    for (int64_t row = begin; row < end; ++row) {
      const int64_t s = row / B, b = row % B;
      for (int64_t k0 = 0; k0 < K; k0 += kTile) {
        const int64_t n = std::min(kTile, K - k0);
        const float* l = as_float(L + row * K + k0, lbuf.data(), n);
        teacher_sum_tile(P, T, B, K, s, b, k0, n, pbar.data());
        scalar_t* out = G + row * K + k0;
        if constexpr (std::is_same_v<scalar_t, float>) {
          vec::ce_grad_tile(l, pbar.data(), row_lse[row], row_psum[row], g, out, n);
        } else {
          vec::ce_grad_tile(l, pbar.data(), row_lse[row], row_psum[row], g, gbuf.data(), n);
          for (int64_t i = 0; i < n; ++i) out[i] = static_cast<scalar_t>(gbuf[i]);
        }
      }
    }
  });
}

// grad_out is the upstream scalar gradient; scale = 1 / (n_pairs * B).
at::Tensor ce_backward(const at::Tensor& logits, const at::Tensor& probs, const at::Tensor& row_lse,
                       const at::Tensor& row_psum, const at::Tensor& grad_out, double scale) {
  check_cpu_contiguous(logits, "student_logits");
  check_cpu_contiguous(probs, "teacher_probs");
  const float g = grad_out.item<float>() * static_cast<float>(scale);
  auto grad = at::empty_like(logits);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, logits.scalar_type(), "ce_backward", [&] {
    using logit_t = scalar_t;
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, probs.scalar_type(), "ce_backward_p", [&] {
      ce_backward_kernel<logit_t, scalar_t>(logits, probs, row_lse.data_ptr<float>(), row_psum.data_ptr<float>(), g,
                                            grad);
    });
  });
  return grad;
}

// --- teacher ---------------------------------------------------------------------------------------

// [K] fp32 vMF column bias: Debye in double from the norms (p >= 32), a given tensor, or zeros.
std::vector<float> column_bias(const c10::optional<at::Tensor>& weight_norm, const c10::optional<at::Tensor>& bias,
                               int64_t K, double temp, double p) {
  std::vector<float> out(K, 0.f);
  if (bias.has_value() && bias->defined()) {
    auto b = bias->to(at::kFloat).contiguous();
    TORCH_CHECK(b.numel() == K, "bias must have K elements");
    std::copy(b.data_ptr<float>(), b.data_ptr<float>() + K, out.begin());
  } else if (weight_norm.has_value() && weight_norm->defined()) {
    auto wn = weight_norm->to(at::kDouble).contiguous();
    TORCH_CHECK(wn.numel() == K, "weight_norm must have K elements");
    const double* w = wn.data_ptr<double>();
    const DebyeRef r = debye_reference(temp, p);
    at::parallel_for(0, K, 4096, [&](int64_t begin, int64_t end) {
      for (int64_t k = begin; k < end; ++k)
        out[k] = static_cast<float>(log_cp_diff<double>(w[k] / temp, r.nu, r.z0, r.s0, r.log_series0));
    });
  }
  return out;
}

template <typename scalar_t>
void teacher_rows_kernel(const at::Tensor& dots, const std::vector<float>& bias, const std::vector<float>& colv,
                         int64_t mode, double temp, float* probs, float* stat, float* row_lse) {
  const int64_t N = dots.size(0), K = dots.size(1);
  const scalar_t* D = dots.data_ptr<scalar_t>();
  const float inv_temp = static_cast<float>(1.0 / temp), inv_n = static_cast<float>(1.0 / N);
  const bool want_stat = stat != nullptr;
  // Rows go in one contiguous chunk per thread; for a deterministic stat each chunk has its own partial
  // [K] sum, and the partials are added in chunk order afterwards.
  const int64_t n_chunks = std::max<int64_t>(1, std::min<int64_t>(N, at::get_num_threads()));
  const int64_t rows_per_chunk = (N + n_chunks - 1) / n_chunks;
  std::vector<float> partial(want_stat ? n_chunks * K : 0, 0.f);
  std::vector<float> temp_bias(K);
  for (int64_t k = 0; k < K; ++k) temp_bias[k] = static_cast<float>(temp) * bias[k];
  at::parallel_for(0, n_chunks, 1, [&](int64_t c_begin, int64_t c_end) {
    std::vector<float> dbuf(K), y(K), x(mode == kProb ? K : 0);
    for (int64_t c = c_begin; c < c_end; ++c) {
      float* part = want_stat ? partial.data() + c * K : nullptr;
      for (int64_t row = c * rows_per_chunk; row < std::min(N, (c + 1) * rows_per_chunk); ++row) {
        const float* d = as_float(D + row * K, dbuf.data(), K);
        vec::affine(d, inv_temp, colv.data(), y.data(), K);  // y = dots/temp + bias + shift
        const float m = vec::max_of(y.data(), K);
        float* out = probs ? probs + row * K : nullptr;
        const double se = sum_exp_row(y.data(), m, out, K);
        if (row_lse) row_lse[row] = static_cast<float>(m + std::log(se));
        if (out) vec::scale_inplace(out, static_cast<float>(1.0 / se), K);
        if (mode == kLogit) {  // stat = mean_rows(r), r = dots + temp * bias
          vec::axpy(part, inv_n, d, K);
          vec::axpy(part, inv_n, temp_bias.data(), K);
        } else if (mode == kProb) {  // stat = mean_rows(softmax(r / temp))
          vec::affine(d, inv_temp, bias.data(), x.data(), K);
          const float mx = vec::max_of(x.data(), K);
          const double sx = sum_exp_row(x.data(), mx, nullptr, K);
          vec::axpy_exp(part, inv_n, x.data(), static_cast<float>(mx + std::log(sx)), K);
        }
      }
    }
  });
  if (want_stat) {
    std::fill(stat, stat + K, 0.f);
    for (int64_t c = 0; c < n_chunks; ++c) vec::axpy(stat, 1.f, partial.data() + c * K, K);
  }
}

// Teacher row op. mode: 0 none, 1 logit, 2 prob, 3 shift (softmax(dots/temp + bias + shift)).
// Returns {probs [N,K] or empty, stat [K] (logit/prob) or empty, row_lse [N] or empty}.
std::vector<at::Tensor> teacher_rows(const at::Tensor& dots, double temp, int64_t mode,
                                     const c10::optional<at::Tensor>& center, const c10::optional<at::Tensor>& shift,
                                     const c10::optional<at::Tensor>& weight_norm,
                                     const c10::optional<at::Tensor>& bias, double p, bool write_probs,
                                     bool write_lse) {
  check_cpu_contiguous(dots, "dots");
  TORCH_CHECK(dots.dim() == 2, "dots must be [N, K]");
  TORCH_CHECK(mode >= kNone && mode <= kShift, "mode must be 0..3, got ", mode);
  const int64_t N = dots.size(0), K = dots.size(1);
  const std::vector<float> b = column_bias(weight_norm, bias, K, temp, p);
  std::vector<float> colv(b);  // the column offset of the output softmax, on top of dots/temp
  if (mode == kLogit || mode == kProb) {
    TORCH_CHECK(center.has_value() && center->numel() == K, "center must have K elements");
    auto c = center->to(at::kFloat).contiguous();
    const float* cp = c.data_ptr<float>();
    for (int64_t k = 0; k < K; ++k) colv[k] -= mode == kLogit ? cp[k] / static_cast<float>(temp) : std::log(cp[k]);
  } else if (mode == kShift) {
    TORCH_CHECK(shift.has_value() && shift->numel() == K, "shift must have K elements");
    auto sh = shift->to(at::kFloat).contiguous();
    for (int64_t k = 0; k < K; ++k) colv[k] += sh.data_ptr<float>()[k];
  }
  auto f32 = dots.options().dtype(at::kFloat);
  at::Tensor probs = write_probs ? at::empty({N, K}, f32) : at::Tensor();
  at::Tensor stat = (mode == kLogit || mode == kProb) ? at::empty({K}, f32) : at::Tensor();
  at::Tensor lse = write_lse ? at::empty({N}, f32) : at::Tensor();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, dots.scalar_type(), "teacher_rows", [&] {
    teacher_rows_kernel<scalar_t>(dots, b, colv, mode, temp, write_probs ? probs.data_ptr<float>() : nullptr,
                                  stat.defined() ? stat.data_ptr<float>() : nullptr,
                                  write_lse ? lse.data_ptr<float>() : nullptr);
  });
  return {probs, stat, lse};
}

// out[k] = logsumexp_n(dots[n,k]/temp + bias[k] + row_shift[n]): the Sinkhorn column step.
at::Tensor column_lse(const at::Tensor& dots, double temp, const at::Tensor& row_shift,
                      const c10::optional<at::Tensor>& weight_norm, const c10::optional<at::Tensor>& bias, double p) {
  check_cpu_contiguous(dots, "dots");
  const int64_t N = dots.size(0), K = dots.size(1);
  TORCH_CHECK(row_shift.numel() == N, "row_shift must have N elements");
  const std::vector<float> b = column_bias(weight_norm, bias, K, temp, p);
  auto v = row_shift.to(at::kFloat).contiguous();
  const float* vp = v.data_ptr<float>();
  auto out = at::empty({K}, dots.options().dtype(at::kFloat));
  float* o = out.data_ptr<float>();
  const float inv_temp = static_cast<float>(1.0 / temp);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, dots.scalar_type(), "column_lse", [&] {
    const scalar_t* D = dots.data_ptr<scalar_t>();
    at::parallel_for(0, (K + kTile - 1) / kTile, 1, [&](int64_t t0, int64_t t1) {
      std::vector<float> dbuf(kTile), y(kTile), m(kTile), s(kTile), cv(kTile);
      for (int64_t t = t0; t < t1; ++t) {
        const int64_t k0 = t * kTile, n = std::min(kTile, K - k0);
        for (int64_t r = 0; r < N; ++r) {
          for (int64_t i = 0; i < n; ++i) cv[i] = b[k0 + i] + vp[r];
          vec::affine(as_float(D + r * K + k0, dbuf.data(), n), inv_temp, cv.data(), y.data(), n);
          if (r == 0) {
            std::copy(y.begin(), y.begin() + n, m.begin());
            std::fill(s.begin(), s.begin() + n, 1.f);
          } else {
            vec::online_lse(m.data(), s.data(), y.data(), n);
          }
        }
        for (int64_t i = 0; i < n; ++i) o[k0 + i] = m[i] + std::log(s[i]);
      }
    });
  });
  return out;
}

}  // namespace
}  // namespace dinovmf

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "dinovmf fused DINO-vMF loss ops (CPU)";
  m.def("ce_forward", &dinovmf::ce_forward, "DINO cross-entropy forward -> (row_loss, row_lse, row_psum)");
  m.def("ce_backward", &dinovmf::ce_backward, "DINO cross-entropy backward -> grad of student_logits");
  m.def("teacher_rows", &dinovmf::teacher_rows, "teacher softmax rows -> (probs, stat, row_lse)");
  m.def("column_lse", &dinovmf::column_lse, "per-prototype log-sum-exp over rows (Sinkhorn column step)");
}
