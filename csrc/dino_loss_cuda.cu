// CUDA implementation of the fused DINO-vMF loss ops (dinovmf._C_cuda): same ops and semantics as the
// CPU ones in dino_loss_cpu.cpp. One block per row, each thread striding over K with an online
// log-sum-exp state, merged by warp shuffles and then across warps through shared memory. All math in
// fp32; bf16/fp16 are converted on load. Only ATen/c10 headers are used (no cuBLAS), so nvcc can
// compile-check this file against a CPU torch wheel (tools/cuda_compile_check.py).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <cuda_runtime.h>

#include <cmath>
#include <vector>

#include "vmf_bias.h"

namespace dinovmf {
namespace {

constexpr int kThreads = 512;  // 16 warps per row: enough loads in flight to saturate HBM with ~1 block/SM
constexpr unsigned kFullMask = 0xffffffffu;
enum Mode : int { kNone = 0, kLogit = 1, kProb = 2, kShift = 3 };
enum BiasKind : int { kNoBias = 0, kDebye = 1, kBiasTensor = 2 };

// Running log-sum-exp: sum_i exp(v_i) = s * exp(m).
struct Lse {
  float m, s;
};

__device__ __forceinline__ Lse lse_merge(Lse a, Lse b) {
  const float m = fmaxf(a.m, b.m);
  if (m == -INFINITY) return {m, 0.f};
  return {m, a.s * __expf(a.m - m) + b.s * __expf(b.m - m)};
}

__device__ __forceinline__ Lse lse_push(Lse a, float v) {
  if (v > a.m) return {v, a.s * __expf(a.m - v) + 1.f};
  if (v == -INFINITY) return a;
  return {a.m, a.s + __expf(v - a.m)};
}

__device__ __forceinline__ float lse_value(Lse a) { return a.m + __logf(a.s); }

// Block-wide reductions (blockDim.x == kThreads); every thread gets the result.
__device__ Lse block_lse(Lse v) {
  __shared__ float sm[32], ss[32];
  for (int off = 16; off > 0; off >>= 1)
    v = lse_merge(v, Lse{__shfl_xor_sync(kFullMask, v.m, off), __shfl_xor_sync(kFullMask, v.s, off)});
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  __syncthreads();  // the shared buffers may still be read by a previous call
  if (lane == 0) {
    sm[warp] = v.m;
    ss[warp] = v.s;
  }
  __syncthreads();
  const int n_warps = blockDim.x / 32;
  v = lane < n_warps ? Lse{sm[lane], ss[lane]} : Lse{-INFINITY, 0.f};
  for (int off = 16; off > 0; off >>= 1)
    v = lse_merge(v, Lse{__shfl_xor_sync(kFullMask, v.m, off), __shfl_xor_sync(kFullMask, v.s, off)});
  return v;
}

__device__ float block_sum(float v) {
  __shared__ float sh[32];
  for (int off = 16; off > 0; off >>= 1) v += __shfl_xor_sync(kFullMask, v, off);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  __syncthreads();
  if (lane == 0) sh[warp] = v;
  __syncthreads();
  v = lane < static_cast<int>(blockDim.x / 32) ? sh[lane] : 0.f;
  for (int off = 16; off > 0; off >>= 1) v += __shfl_xor_sync(kFullMask, v, off);
  return v;
}

// --- cross-entropy ---------------------------------------------------------------------------------

template <typename prob_t>
__device__ __forceinline__ float teacher_sum(const prob_t* P, int64_t T, int64_t B, int64_t K, int64_t s,
                                             int64_t b, int64_t k) {
  float pb = 0.f;
  for (int64_t t = 0; t < T; ++t)
    if (t != s) pb += static_cast<float>(P[(t * B + b) * K + k]);
  return pb;
}

template <typename scalar_t, typename prob_t>
__global__ void __launch_bounds__(kThreads) ce_forward_kernel(const scalar_t* __restrict__ L,
                                                              const prob_t* __restrict__ P, float* row_loss,
                                                              float* row_lse, float* row_psum, int64_t B, int64_t K,
                                                              int64_t T) {
  const int64_t row = blockIdx.x, s = row / B, b = row % B;
  const scalar_t* l_row = L + row * K;
  Lse st{-INFINITY, 0.f};
  float dot = 0.f, psum = 0.f;
  for (int64_t k = threadIdx.x; k < K; k += blockDim.x) {
    const float v = static_cast<float>(l_row[k]);
    st = lse_push(st, v);
    const float pb = teacher_sum(P, T, B, K, s, b, k);
    dot += pb * v;
    psum += pb;
  }
  const float lse = lse_value(block_lse(st));
  dot = block_sum(dot);
  psum = block_sum(psum);
  if (threadIdx.x == 0) {
    row_loss[row] = psum * lse - dot;
    row_lse[row] = lse;
    row_psum[row] = psum;
  }
}

template <typename scalar_t, typename prob_t>
__global__ void __launch_bounds__(kThreads) ce_backward_kernel(const scalar_t* __restrict__ L,
                                                               const prob_t* __restrict__ P,
                                                               const float* row_lse, const float* row_psum,
                                                               const float* grad_out, float scale,
                                                               scalar_t* __restrict__ G, int64_t B, int64_t K,
                                                               int64_t T) {
  const int64_t row = blockIdx.x, s = row / B, b = row % B;
  const float g = grad_out[0] * scale, lse = row_lse[row], psum = row_psum[row];
  for (int64_t k = threadIdx.x; k < K; k += blockDim.x) {
    const float v = static_cast<float>(L[row * K + k]);
    const float pb = teacher_sum(P, T, B, K, s, b, k);
    G[row * K + k] = static_cast<scalar_t>((psum * __expf(v - lse) - pb) * g);
  }
}

void check_cuda(const at::Tensor& x, const char* name) {
  TORCH_CHECK(x.is_cuda(), name, " must be a CUDA tensor, got ", x.device());
  TORCH_CHECK(x.is_contiguous(), name, " must be contiguous");
}

}  // namespace

std::vector<at::Tensor> ce_forward_cuda(const at::Tensor& logits, const at::Tensor& probs) {
  check_cuda(logits, "student_logits");
  check_cuda(probs, "teacher_probs");
  TORCH_CHECK(logits.dim() == 3 && probs.dim() == 3 && logits.size(1) == probs.size(1) &&
                  logits.size(2) == probs.size(2),
              "student_logits [S,B,K] and teacher_probs [T,B,K] must agree in B and K");
  const c10::cuda::CUDAGuard guard(logits.device());
  const int64_t S = logits.size(0), B = logits.size(1), K = logits.size(2), T = probs.size(0);
  auto stats = at::empty({3, S * B}, logits.options().dtype(at::kFloat));
  float* base = stats.data_ptr<float>();
  auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, logits.scalar_type(), "ce_forward_cuda", [&] {
    using logit_t = scalar_t;
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, probs.scalar_type(), "ce_forward_cuda_p", [&] {
      ce_forward_kernel<logit_t, scalar_t><<<S * B, kThreads, 0, stream>>>(
          logits.data_ptr<logit_t>(), probs.data_ptr<scalar_t>(), base, base + S * B, base + 2 * S * B, B, K, T);
    });
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {stats[0], stats[1], stats[2]};
}

at::Tensor ce_backward_cuda(const at::Tensor& logits, const at::Tensor& probs, const at::Tensor& row_lse,
                            const at::Tensor& row_psum, const at::Tensor& grad_out, double scale) {
  check_cuda(logits, "student_logits");
  check_cuda(probs, "teacher_probs");
  const c10::cuda::CUDAGuard guard(logits.device());
  const int64_t S = logits.size(0), B = logits.size(1), K = logits.size(2), T = probs.size(0);
  auto grad = at::empty_like(logits);
  auto g = grad_out.to(at::kFloat).contiguous();  // stays on the device: no host sync
  auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, logits.scalar_type(), "ce_backward_cuda", [&] {
    using logit_t = scalar_t;
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, probs.scalar_type(), "ce_backward_cuda_p", [&] {
      ce_backward_kernel<logit_t, scalar_t><<<S * B, kThreads, 0, stream>>>(
          logits.data_ptr<logit_t>(), probs.data_ptr<scalar_t>(), row_lse.data_ptr<float>(),
          row_psum.data_ptr<float>(), g.data_ptr<float>(), static_cast<float>(scale), grad.data_ptr<logit_t>(), B,
          K, T);
    });
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return grad;
}

// --- teacher ---------------------------------------------------------------------------------------

namespace {

struct BiasArgs {
  const float* weight_norm;  // kDebye
  const float* bias;         // kBiasTensor
  int kind;
  float inv_temp, nu, z0, s0, log_series0;
};

__device__ __forceinline__ float column_bias(const BiasArgs& a, int64_t k) {
  if (a.kind == kDebye) return log_cp_diff<float>(a.weight_norm[k] * a.inv_temp, a.nu, a.z0, a.s0, a.log_series0);
  if (a.kind == kBiasTensor) return a.bias[k];
  return 0.f;
}

// The logits whose softmax is the output, from x = dots/temp + bias.
__device__ __forceinline__ float shifted(float x, int mode, const float* center, const float* shift, float inv_temp,
                                         int64_t k) {
  if (mode == kLogit) return x - center[k] * inv_temp;
  if (mode == kProb) return x - __logf(center[k]);
  if (mode == kShift) return x + shift[k];
  return x;
}

template <typename scalar_t>
__global__ void __launch_bounds__(kThreads) teacher_rows_kernel(const scalar_t* __restrict__ D, BiasArgs bias,
                                                                const float* center, const float* shift, int mode,
                                                                float temp, float inv_n, float* probs, float* stat,
                                                                float* row_lse, int64_t K) {
  const int64_t row = blockIdx.x;
  const scalar_t* d_row = D + row * K;
  Lse st{-INFINITY, 0.f}, st_x{-INFINITY, 0.f};
  // pass 1: online log-sum-exp; the logit-mode stat (mean_rows of r) needs no normaliser
  for (int64_t k = threadIdx.x; k < K; k += blockDim.x) {
    const float d = static_cast<float>(d_row[k]), b = column_bias(bias, k);
    const float x = d * bias.inv_temp + b;
    st = lse_push(st, shifted(x, mode, center, shift, bias.inv_temp, k));
    if (mode == kLogit) atomicAdd(stat + k, (d + temp * b) * inv_n);
    if (mode == kProb) st_x = lse_push(st_x, x);
  }
  const float lse = lse_value(block_lse(st));
  const float lse_x = mode == kProb ? lse_value(block_lse(st_x)) : 0.f;
  if (row_lse != nullptr && threadIdx.x == 0) row_lse[row] = lse;
  if (probs == nullptr) return;
  // pass 2: normalise and write; the second read of the row mostly hits L2
  for (int64_t k = threadIdx.x; k < K; k += blockDim.x) {
    const float x = static_cast<float>(d_row[k]) * bias.inv_temp + column_bias(bias, k);
    probs[row * K + k] = __expf(shifted(x, mode, center, shift, bias.inv_temp, k) - lse);
    if (mode == kProb) atomicAdd(stat + k, __expf(x - lse_x) * inv_n);
  }
}

// out[k] = logsumexp_n(dots[n,k]/temp + bias[k] + row_shift[n]): one thread per column, coalesced over k.
template <typename scalar_t>
__global__ void column_lse_kernel(const scalar_t* __restrict__ D, BiasArgs bias, const float* row_shift, float* out,
                                  int64_t N, int64_t K) {
  const int64_t k = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (k >= K) return;
  const float b = column_bias(bias, k);
  Lse st{-INFINITY, 0.f};
  for (int64_t n = 0; n < N; ++n) st = lse_push(st, static_cast<float>(D[n * K + k]) * bias.inv_temp + b + row_shift[n]);
  out[k] = lse_value(st);
}

BiasArgs make_bias_args(const c10::optional<at::Tensor>& weight_norm, const c10::optional<at::Tensor>& bias,
                        int64_t K, double temp, double p, at::Tensor& keep_wn, at::Tensor& keep_bias) {
  BiasArgs a{nullptr, nullptr, kNoBias, static_cast<float>(1.0 / temp), 1.f, 0.f, 1.f, 0.f};
  if (bias.has_value() && bias->defined()) {
    keep_bias = bias->to(at::kFloat).contiguous();
    TORCH_CHECK(keep_bias.is_cuda() && keep_bias.numel() == K, "bias must be a CUDA tensor of K elements");
    a.bias = keep_bias.data_ptr<float>();
    a.kind = kBiasTensor;
  } else if (weight_norm.has_value() && weight_norm->defined()) {
    keep_wn = weight_norm->to(at::kFloat).contiguous();
    TORCH_CHECK(keep_wn.is_cuda() && keep_wn.numel() == K, "weight_norm must be a CUDA tensor of K elements");
    const DebyeRef r = debye_reference(temp, p);  // the kappa0 = 1/temp terms, in double on the host
    a.weight_norm = keep_wn.data_ptr<float>();
    a.kind = kDebye;
    a.nu = static_cast<float>(r.nu);
    a.z0 = static_cast<float>(r.z0);
    a.s0 = static_cast<float>(r.s0);
    a.log_series0 = static_cast<float>(r.log_series0);
  }
  return a;
}

}  // namespace

std::vector<at::Tensor> teacher_rows_cuda(const at::Tensor& dots, double temp, int64_t mode,
                                          const c10::optional<at::Tensor>& center,
                                          const c10::optional<at::Tensor>& shift,
                                          const c10::optional<at::Tensor>& weight_norm,
                                          const c10::optional<at::Tensor>& bias, double p, bool write_probs,
                                          bool write_lse) {
  check_cuda(dots, "dots");
  TORCH_CHECK(dots.dim() == 2, "dots must be [N, K]");
  TORCH_CHECK(mode >= kNone && mode <= kShift, "mode must be 0..3, got ", mode);
  const c10::cuda::CUDAGuard guard(dots.device());
  const int64_t N = dots.size(0), K = dots.size(1);
  at::Tensor keep_wn, keep_bias, center_f, shift_f;
  const BiasArgs b = make_bias_args(weight_norm, bias, K, temp, p, keep_wn, keep_bias);
  if (mode == kLogit || mode == kProb) {
    TORCH_CHECK(center.has_value() && center->numel() == K, "center must have K elements");
    center_f = center->to(at::kFloat).contiguous();
  }
  if (mode == kShift) {
    TORCH_CHECK(shift.has_value() && shift->numel() == K, "shift must have K elements");
    shift_f = shift->to(at::kFloat).contiguous();
  }
  auto f32 = dots.options().dtype(at::kFloat);
  at::Tensor probs = write_probs ? at::empty({N, K}, f32) : at::Tensor();
  at::Tensor stat = (mode == kLogit || mode == kProb) ? at::zeros({K}, f32) : at::Tensor();
  at::Tensor lse = write_lse ? at::empty({N}, f32) : at::Tensor();
  auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, dots.scalar_type(), "teacher_rows_cuda", [&] {
    teacher_rows_kernel<scalar_t><<<N, kThreads, 0, stream>>>(
        dots.data_ptr<scalar_t>(), b, center_f.defined() ? center_f.data_ptr<float>() : nullptr,
        shift_f.defined() ? shift_f.data_ptr<float>() : nullptr, static_cast<int>(mode), static_cast<float>(temp),
        static_cast<float>(1.0 / N), write_probs ? probs.data_ptr<float>() : nullptr,
        stat.defined() ? stat.data_ptr<float>() : nullptr, write_lse ? lse.data_ptr<float>() : nullptr, K);
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {probs, stat, lse};
}

at::Tensor column_lse_cuda(const at::Tensor& dots, double temp, const at::Tensor& row_shift,
                           const c10::optional<at::Tensor>& weight_norm, const c10::optional<at::Tensor>& bias,
                           double p) {
  check_cuda(dots, "dots");
  const c10::cuda::CUDAGuard guard(dots.device());
  const int64_t N = dots.size(0), K = dots.size(1);
  TORCH_CHECK(row_shift.numel() == N, "row_shift must have N elements");
  at::Tensor keep_wn, keep_bias;
  const BiasArgs b = make_bias_args(weight_norm, bias, K, temp, p, keep_wn, keep_bias);
  auto v = row_shift.to(at::kFloat).contiguous();
  auto out = at::empty({K}, dots.options().dtype(at::kFloat));
  const int threads = 256;
  const int blocks = static_cast<int>((K + threads - 1) / threads);
  auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, dots.scalar_type(), "column_lse_cuda", [&] {
    column_lse_kernel<scalar_t><<<blocks, threads, 0, stream>>>(dots.data_ptr<scalar_t>(), b, v.data_ptr<float>(),
                                                                 out.data_ptr<float>(), N, K);
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

}  // namespace dinovmf
