// Fused photometric augmentation of crops on the CPU: DINO's colour jitter (per-crop order), grayscale,
// Gaussian blur, solarisation and normalisation in one pass per crop (csrc/augment_cpu_impl.h).
//
// Two entry points share one kernel:
// - the torch op `torch.ops.dinovmf.augment_crops(images, params, mean, std, isa=-1)`, parallel over
//   the crops with at::parallel_for (registered as a fragment of the `dinovmf` namespace, so it lives
//   in the dinovmf._C extension beside the loss ops without touching their module definition);
// - the C function `dinovmf_augment_crop_u8`, one crop, single-threaded, which FFCV's decoder calls
//   through ctypes from inside its numba threads (dinovmf/data/ffcv_loader.py), so decoding and
//   augmentation of an image run in the same worker thread.
// The parameter row layout is dinovmf/data/augment_params.py's PARAM_NAMES; the reference is
// dinovmf/data/augment.py's augment_reference.
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <vector>

#if defined(__x86_64__)
#include <immintrin.h>  // the non-temporal stores of augment_cpu_impl.h
#endif

namespace dinovmf {
namespace augment {

// Columns of a parameter row (augment_params.PARAM_NAMES) and jitter op ids (augment_params.JITTER_OPS).
enum Param : int64_t {
  kFlip = 0, kJitter, kOp0, kOp1, kOp2, kOp3, kBrightness, kContrast, kSaturation, kHue, kGray, kBlur, kSigma,
  kSolarize, kNumParams
};
enum JitterOp : int { kOpBrightness = 0, kOpContrast = 1, kOpSaturation = 2, kOpHue = 3 };
constexpr float kLuma[3] = {0.299f, 0.587f, 0.114f};  // ITU-R 601, as augment.LUMA_WEIGHTS
constexpr int64_t kMaxLanes = 16;                      // the widest vector path (AVX-512)

// One crop's parameters, decoded from its row.
struct CropParams {
  bool flip = false, jitter = false, gray = false, solarize = false;
  int ops[4] = {0, 1, 2, 3};
  float brightness = 1.f, contrast = 1.f, saturation = 1.f, hue6 = 0.f;  // hue6: the shift in sextants
  float mean_luma = 0.f;                                                 // filled in by the kernel
  int64_t radius = 0;                                                    // blur radius; 0: no blur
  const float* weights = nullptr;                                        // 2 * radius + 1 taps
  float inv_std[3], shift[3];                                            // normalise: v * inv_std + shift
  bool stream_out = false;  // write the output with non-temporal stores (see augment_crop)
};

// Floats of one row buffer: the row rounded up to whole vectors, plus the blur's reflected border.
inline int64_t row_floats(int64_t W, int64_t radius) {
  return 2 * radius + (W + kMaxLanes - 1) / kMaxLanes * kMaxLanes + kMaxLanes;
}

// Decode row `p`; returns an error message, or nullptr. `weights` receives the blur kernel.
const char* decode_params(const float* p, int64_t H, int64_t W, const float* mean, const float* std,
                          std::vector<float>& weights, CropParams& cp) {
  cp.flip = p[kFlip] > 0.5f;
  cp.jitter = p[kJitter] > 0.5f;
  cp.gray = p[kGray] > 0.5f;
  cp.solarize = p[kSolarize] > 0.5f;
  int seen = 0;
  for (int s = 0; s < 4; ++s) {
    const float v = p[kOp0 + s];
    if (!(v >= -0.5f && v < 3.5f)) return "params: op0..op3 must be jitter op ids in 0..3";
    cp.ops[s] = int(std::lround(v));
    seen |= 1 << cp.ops[s];
  }
  if (seen != 15) return "params: op0..op3 must be a permutation of 0..3";
  cp.brightness = p[kBrightness];
  cp.contrast = p[kContrast];
  cp.saturation = p[kSaturation];
  cp.hue6 = 6.f * p[kHue];
  cp.radius = 0;
  if (p[kBlur] > 0.5f) {
    const float sigma = p[kSigma];
    if (!(sigma > 0.f) || !std::isfinite(sigma)) return "params: a blurred crop needs a finite sigma > 0";
    // ceil(3 sigma) in float32, at most side - 1 (reflect padding), as augment.blur_radius.
    cp.radius = std::min<int64_t>(int64_t(std::ceil(3.0f * sigma)), std::min(H, W) - 1);
    if (cp.radius > 0) {
      weights.resize(2 * cp.radius + 1);
      double total = 0;
      for (int64_t i = -cp.radius; i <= cp.radius; ++i) total += std::exp(-0.5 * (i / double(sigma)) * (i / double(sigma)));
      for (int64_t i = -cp.radius; i <= cp.radius; ++i)
        weights[i + cp.radius] = float(std::exp(-0.5 * (i / double(sigma)) * (i / double(sigma))) / total);
      cp.weights = weights.data();
    }
  }
  for (int c = 0; c < 3; ++c) {
    if (!(std[c] > 0.f)) return "std must be > 0";
    cp.inv_std[c] = 1.f / std[c];
    cp.shift[c] = -mean[c] / std[c];
  }
  return nullptr;
}

#if defined(__x86_64__) && defined(__GNUC__)
#define DINOVMF_AUG_X86 1
namespace avx512 {
#pragma GCC push_options
#pragma GCC target("avx512f,avx512dq,avx512bw,avx512vl,avx2,fma")
#define DINOVMF_AUG_VEC_BYTES 64
#include "augment_cpu_impl.h"
#undef DINOVMF_AUG_VEC_BYTES
#pragma GCC pop_options
}  // namespace avx512
namespace avx2 {
#pragma GCC push_options
#pragma GCC target("avx2,fma")
#define DINOVMF_AUG_VEC_BYTES 32
#include "augment_cpu_impl.h"
#undef DINOVMF_AUG_VEC_BYTES
#pragma GCC pop_options
}  // namespace avx2
#endif
namespace base {
#define DINOVMF_AUG_VEC_BYTES 16
#include "augment_cpu_impl.h"
#undef DINOVMF_AUG_VEC_BYTES
}  // namespace base

// Instruction sets: 0 baseline (SSE2 on x86-64, 4 lanes), 1 AVX2 + FMA (8), 2 AVX-512 (16).
enum Isa : int64_t { kBase = 0, kAvx2 = 1, kAvx512 = 2 };

bool isa_supported(int64_t isa) {
#ifdef DINOVMF_AUG_X86
  if (isa == kAvx512)
    return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512dq") &&
           __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512vl");
  if (isa == kAvx2) return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
#endif
  return isa == kBase;
}

// The default: the widest path the CPU has (faster per crop where both exist, bench/bench_augment.py);
// DINOVMF_CPU_BASELINE=1 forces the baseline, as for the loss ops.
int64_t default_isa() {
  static const int64_t isa = std::getenv("DINOVMF_CPU_BASELINE") ? kBase
                             : isa_supported(kAvx512)              ? kAvx512
                             : isa_supported(kAvx2)                ? kAvx2
                                                                   : kBase;
  return isa;
}

template <typename src_t>
void run_crop(int64_t isa, const src_t* src, int64_t H, int64_t W, const CropParams& cp, float* dst, float* rows,
              float* planes) {
#ifdef DINOVMF_AUG_X86
  if (isa == kAvx512) return avx512::augment_crop(src, H, W, cp, dst, rows, planes);
  if (isa == kAvx2) return avx2::augment_crop(src, H, W, cp, dst, rows, planes);
#endif
  base::augment_crop(src, H, W, cp, dst, rows, planes);
}

// Per-thread buffers of the kernel, grown on demand.
struct Scratch {
  std::vector<float> rows, planes, weights;
  void reserve(int64_t H, int64_t W, const CropParams& cp) {
    const int64_t n = 3 * row_floats(W, cp.radius);
    if (int64_t(rows.size()) < n) rows.resize(n);
    if ((cp.radius || cp.jitter) && int64_t(planes.size()) < 3 * H * W) planes.resize(3 * H * W);
  }
};

template <typename src_t>
const char* augment_one(int64_t isa, const src_t* src, int64_t H, int64_t W, const float* params, const float* mean,
                        const float* std, float* dst, Scratch& scratch, bool stream_out = false) {
  CropParams cp;
  if (const char* err = decode_params(params, H, W, mean, std, scratch.weights, cp)) return err;
  cp.stream_out = stream_out;
  scratch.reserve(H, W, cp);
  run_crop(isa, src, H, W, cp, dst, scratch.rows.data(), scratch.planes.data());
  return nullptr;
}

at::Tensor augment_crops(const at::Tensor& images, const at::Tensor& params, at::ArrayRef<double> mean,
                         at::ArrayRef<double> std, int64_t isa) {
  TORCH_CHECK(images.device().is_cpu() && params.device().is_cpu(), "augment_crops: images and params must be CPU tensors");
  TORCH_CHECK(images.dim() == 4, "augment_crops: images must be uint8 [N, H, W, 3] or float32 [N, 3, H, W], got ",
              images.sizes());
  const bool u8 = images.scalar_type() == at::kByte;
  TORCH_CHECK(u8 ? images.size(3) == 3 : (images.scalar_type() == at::kFloat && images.size(1) == 3),
              "augment_crops: images must be uint8 [N, H, W, 3] or float32 [N, 3, H, W], got ", images.scalar_type(),
              " ", images.sizes());
  const int64_t N = images.size(0), H = u8 ? images.size(1) : images.size(2), W = u8 ? images.size(2) : images.size(3);
  TORCH_CHECK(params.scalar_type() == at::kFloat && params.dim() == 2 && params.size(0) == N &&
                  params.size(1) == kNumParams,
              "augment_crops: params must be float32 [N=", N, ", ", int64_t(kNumParams), "], got ",
              params.scalar_type(), " ", params.sizes());
  TORCH_CHECK(mean.size() == 3 && std.size() == 3, "augment_crops: mean and std must have 3 values");
  if (isa < 0) isa = default_isa();
  TORCH_CHECK(isa_supported(isa), "augment_crops: isa=", isa, " is not supported by this CPU");
  const at::Tensor src = images.contiguous(), prm = params.contiguous();
  at::Tensor out = at::empty({N, 3, H, W}, images.options().dtype(at::kFloat));
  const float m[3] = {float(mean[0]), float(mean[1]), float(mean[2])};
  const float s[3] = {float(std[0]), float(std[1]), float(std[2])};
  const float* P = prm.data_ptr<float>();
  float* O = out.data_ptr<float>();
  const int64_t plane = 3 * H * W;
  std::vector<const char*> errors(N, nullptr);
  at::parallel_for(0, N, 1, [&](int64_t begin, int64_t end) {
    Scratch scratch;
    for (int64_t i = begin; i < end; ++i) {
      if (u8) {
        errors[i] = augment_one(isa, src.data_ptr<uint8_t>() + i * plane, H, W, P + i * kNumParams, m, s, O + i * plane,
                                scratch);
      } else {
        errors[i] = augment_one(isa, src.data_ptr<float>() + i * plane, H, W, P + i * kNumParams, m, s, O + i * plane,
                                scratch);
      }
    }
  });
  for (int64_t i = 0; i < N; ++i) TORCH_CHECK(errors[i] == nullptr, "augment_crops: row ", i, ": ", errors[i]);
  return out;
}

bool has_isa(int64_t isa) { return isa_supported(isa); }

}  // namespace augment
}  // namespace dinovmf

// One uint8 crop [H, W, 3] -> float32 [3, H, W]; params[NUM_PARAMS]; mean_std = (mean[3], std[3]).
// Single-threaded (called from FFCV's numba threads); 0 on success, 1 on bad parameters. The output
// goes to a batch buffer that the training process reads much later, so it is written with
// non-temporal stores (no read-for-ownership of the destination, no eviction of the working set).
extern "C" __attribute__((visibility("default"))) int64_t dinovmf_augment_crop_u8(const uint8_t* src, int64_t H,
                                                                                  int64_t W, const float* params,
                                                                                  const float* mean_std, float* dst) {
  thread_local dinovmf::augment::Scratch scratch;
  const char* err = dinovmf::augment::augment_one(dinovmf::augment::default_isa(), src, H, W, params, mean_std,
                                                  mean_std + 3, dst, scratch, /*stream_out=*/true);
  return err == nullptr ? 0 : 1;
}

TORCH_LIBRARY_FRAGMENT(dinovmf, m) {
  m.def("augment_crops(Tensor images, Tensor params, float[] mean, float[] std, int isa=-1) -> Tensor");
  m.def("augment_has_isa(int isa) -> bool", &dinovmf::augment::has_isa);
}

TORCH_LIBRARY_IMPL(dinovmf, CPU, m) { m.impl("augment_crops", &dinovmf::augment::augment_crops); }
