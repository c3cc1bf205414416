// Body of the fused photometric augmentation of one crop; included by augment_cpu.cpp once per
// instruction set, inside its own namespace, with DINOVMF_AUG_VEC_BYTES set to the vector width (no
// include guard on purpose: the same pattern as cpu_vec_math_impl.h, with its own helpers so that the
// two files can change independently).
//
// One crop, in rows: a row of the source is read once (uint8 RGB interleaved, or float planes; the
// flip is a reversed read) into three float row buffers, every per-pixel op runs on vectors of
// kW pixels held in registers (the four jitter steps in the crop's drawn order, grayscale, then
// solarisation and normalisation), and the row is written once to the three output planes. A crop
// whose parameters draw blur instead writes its rows, blurred horizontally, to a scratch image, and
// the vertical blur pass applies solarisation and normalisation as it writes the output. Contrast
// blends with the mean luma of the image as it is when contrast runs, so a crop that draws jitter
// first stages the image after the steps before contrast, summing its luma (see augment_crop).

constexpr int64_t kW = DINOVMF_AUG_VEC_BYTES / 4;  // fp32 lanes
typedef float vf __attribute__((vector_size(DINOVMF_AUG_VEC_BYTES)));
typedef int32_t vi __attribute__((vector_size(DINOVMF_AUG_VEC_BYTES)));

// A broadcast. `x - 0` folds to x (exact for every x), so this compiles to a bare broadcast; `vf{} + x`
// would not (without -ffast-math GCC keeps that add, -0 + 0 being +0), and a lane-by-lane fill
// compiles to one masked insert per lane.
__attribute__((always_inline)) inline vf splat(float x) { return x - vf{}; }
__attribute__((always_inline)) inline vf load(const float* p) {
  vf v;
  std::memcpy(&v, p, sizeof(v));  // an unaligned vector load
  return v;
}
__attribute__((always_inline)) inline void store(float* p, vf v) { std::memcpy(p, &v, sizeof(v)); }
__attribute__((always_inline)) inline vf load_tail(const float* p, int64_t n) {  // lanes >= n are 0
  vf v = splat(0.f);
  for (int64_t i = 0; i < n; ++i) v[i] = p[i];
  return v;
}
__attribute__((always_inline)) inline vf sel(vi m, vf a, vf b) { return (vf)((m & (vi)a) | (~m & (vi)b)); }
// Written as vector conditionals so that GCC emits min/max instructions, not compare + blend.
__attribute__((always_inline)) inline vf vmin(vf a, vf b) { return a < b ? a : b; }
__attribute__((always_inline)) inline vf vmax(vf a, vf b) { return a > b ? a : b; }
__attribute__((always_inline)) inline vf clamp01(vf a) { return vmin(vmax(a, splat(0.f)), splat(1.f)); }
__attribute__((always_inline)) inline vf vfloor(vf a) {
  const vf t = __builtin_convertvector(__builtin_convertvector(a, vi), vf);  // truncation towards 0
  return t - sel(t > a, splat(1.f), splat(0.f));
}
__attribute__((always_inline)) inline vf luma(vf r, vf g, vf b) {
  return splat(kLuma[0]) * r + splat(kLuma[1]) * g + splat(kLuma[2]) * b;
}

// HSV hue rotation by 6 * shift sectors without materialising HSV (as augment.adjust_hue): max and
// max - min are kept, and channel n (5, 3, 1 for r, g, b) = max - delta * clamp(min(k, 4 - k), 0, 1)
// with k = (n + 6 h) mod 6.
__attribute__((always_inline)) inline void hue_rotate(vf& r, vf& g, vf& b, float shift6) {
  const vf maxc = vmax(r, vmax(g, b)), delta = maxc - vmin(r, vmin(g, b));
  const vf num = sel(maxc == r, g - b, sel(maxc == g, (b - r) + splat(2.f) * delta, (r - g) + splat(4.f) * delta));
  vf h6 = num / vmax(delta, splat(1e-12f)) + splat(shift6);
  h6 = h6 - splat(6.f) * vfloor(h6 * splat(1.f / 6.f));  // in [0, 6], so n + h6 needs one wrap below
  vf out[3];
  const float n[3] = {5.f, 3.f, 1.f};
  for (int c = 0; c < 3; ++c) {
    vf k = splat(n[c]) + h6;
    k = sel(k >= splat(6.f), k - splat(6.f), k);
    out[c] = maxc - delta * clamp01(vmin(k, splat(4.f) - k));
  }
  r = out[0];
  g = out[1];
  b = out[2];
}

// The crop's jitter steps [first, last) on one vector of pixels.
__attribute__((always_inline)) inline void jitter(vf& r, vf& g, vf& b, const CropParams& cp, int first, int last) {
  for (int s = first; s < last; ++s) {
    switch (cp.ops[s]) {
      case kOpBrightness: {
        const vf f = splat(cp.brightness), one = splat(1.f);  // f >= 0: only the upper clamp binds
        r = vmin(r * f, one), g = vmin(g * f, one), b = vmin(b * f, one);
        break;
      }
      case kOpContrast: {
        const vf f = splat(cp.contrast), o = splat((1.f - cp.contrast) * cp.mean_luma);
        r = clamp01(f * r + o), g = clamp01(f * g + o), b = clamp01(f * b + o);
        break;
      }
      case kOpSaturation: {
        const vf f = splat(cp.saturation), o = splat(1.f - cp.saturation) * luma(r, g, b);
        r = clamp01(f * r + o), g = clamp01(f * g + o), b = clamp01(f * b + o);
        break;
      }
      default:
        hue_rotate(r, g, b, cp.hue6);
    }
  }
}

// Row y of the source into r, g, b (floats in [0, 1]), reversed when the crop is flipped.
template <typename src_t>
inline void load_row(const src_t* src, int64_t H, int64_t W, int64_t y, bool flip, float* r, float* g, float* b) {
  if constexpr (std::is_same_v<src_t, uint8_t>) {
    // A forward loop (GCC vectorises this deinterleave; a reversed read it does not), reversed below.
    const uint8_t* s = src + y * W * 3;
    const float k = 1.f / 255.f;
    for (int64_t x = 0; x < W; ++x) r[x] = s[3 * x] * k, g[x] = s[3 * x + 1] * k, b[x] = s[3 * x + 2] * k;
    if (flip) std::reverse(r, r + W), std::reverse(g, g + W), std::reverse(b, b + W);
  } else {
    const float* planes[3] = {src + y * W, src + (H + y) * W, src + (2 * H + y) * W};
    float* rows[3] = {r, g, b};
    for (int c = 0; c < 3; ++c) {
      if (flip) {
        for (int64_t x = 0; x < W; ++x) rows[c][x] = planes[c][W - 1 - x];
      } else {
        std::memcpy(rows[c], planes[c], W * sizeof(float));
      }
    }
  }
}

// The first n lanes of v to p.
__attribute__((always_inline)) inline void store_n(float* p, vf v, int64_t n) {
  if (n == kW) {
    store(p, v);
  } else {
    for (int64_t i = 0; i < n; ++i) p[i] = v[i];
  }
}

// A whole vector to p, non-temporally when asked and p is aligned to the vector.
__attribute__((always_inline)) inline void store_out(float* p, vf v, bool stream) {
#if defined(__x86_64__)
  if (stream && (reinterpret_cast<uintptr_t>(p) % sizeof(vf)) == 0) {
#if DINOVMF_AUG_VEC_BYTES == 64
    _mm512_stream_ps(p, (__m512)v);
#elif DINOVMF_AUG_VEC_BYTES == 32
    _mm256_stream_ps(p, (__m256)v);
#else
    _mm_stream_ps(p, (__m128)v);
#endif
    return;
  }
#endif
  store(p, v);
}

// Solarisation (where drawn) and normalisation of one vector, stored to the three output planes.
__attribute__((always_inline)) inline void finish(vf r, vf g, vf b, const CropParams& cp, float* out, int64_t plane,
                                                  int64_t n) {
  vf v[3] = {r, g, b};
  for (int c = 0; c < 3; ++c) {
    if (cp.solarize) v[c] = sel(v[c] >= splat(0.5f), splat(1.f) - v[c], v[c]);
    const vf o = v[c] * splat(cp.inv_std[c]) + splat(cp.shift[c]);
    if (n == kW) {
      store_out(out + c * plane, o, cp.stream_out);
    } else {
      store_n(out + c * plane, o, n);
    }
  }
}

// dst[x] = sum_k w[k] * pad[x + k] for x < W (pad holds the row with `radius` reflected pixels each side).
// Four vectors of outputs at a time: four independent FMA chains hide the FMA latency that a single
// accumulator per vector would wait on at every tap.
inline void blur_row(const float* pad, const float* w, int64_t taps, float* dst, int64_t W) {
  int64_t x = 0;
  for (; x + 4 * kW <= W; x += 4 * kW) {
    vf a0 = splat(0.f), a1 = splat(0.f), a2 = splat(0.f), a3 = splat(0.f);
    for (int64_t k = 0; k < taps; ++k) {
      const vf wk = splat(w[k]);
      const float* p = pad + x + k;
      a0 += wk * load(p), a1 += wk * load(p + kW), a2 += wk * load(p + 2 * kW), a3 += wk * load(p + 3 * kW);
    }
    store(dst + x, a0), store(dst + x + kW, a1), store(dst + x + 2 * kW, a2), store(dst + x + 3 * kW, a3);
  }
  for (; x + kW <= W; x += kW) {
    vf acc = splat(0.f);
    for (int64_t k = 0; k < taps; ++k) acc += splat(w[k]) * load(pad + x + k);
    store(dst + x, acc);
  }
  for (; x < W; ++x) {
    float acc = 0.f;
    for (int64_t k = 0; k < taps; ++k) acc += w[k] * pad[x + k];
    dst[x] = acc;
  }
}

inline int64_t reflect(int64_t i, int64_t n) { return i < 0 ? -i : (i >= n ? 2 * (n - 1) - i : i); }

// The whole crop: src (uint8 [H, W, 3] or float [3, H, W]) -> dst float [3, H, W], normalised.
// `rows` holds 3 padded row buffers (3 * row_floats(W, radius)); `planes` 3 * H * W floats, used when the
// crop draws jitter or blur (the staged image).
//
// Pass A (jitter drawn): each row gets the jitter steps before contrast and goes to `planes`, while the
// luma is summed: contrast's mean. Pass B: each row (from `planes`, or from src without jitter) gets the
// remaining steps and grayscale; then either solarisation + normalisation into dst, or the horizontal
// blur back into `planes` (the row is in the row buffers by then) and, after the last row, the vertical
// blur with solarisation + normalisation into dst.
template <typename src_t>
void augment_crop_body(const src_t* src, int64_t H, int64_t W, CropParams cp, float* dst, float* rows, float* planes) {
  const int64_t stride = row_floats(W, cp.radius);
  float* r = rows + cp.radius;  // row buffers with room for the blur's reflected border
  float* g = r + stride;
  float* b = g + stride;
  float* rgb[3] = {r, g, b};
  // Pad lanes past W hold zeros, so whole-vector loads there read finite values.
  std::fill(rows, rows + 3 * stride, 0.f);
  const int64_t plane = H * W;
  int first = 0;  // jitter steps already applied to `planes`
  if (cp.jitter) {
    while (cp.ops[first] != kOpContrast) ++first;
    double total = 0;
    for (int64_t y = 0; y < H; ++y) {
      load_row(src, H, W, y, cp.flip, r, g, b);
      vf acc = splat(0.f);
      for (int64_t x = 0; x < W; x += kW) {
        const int64_t n = std::min(kW, W - x);
        vf vr = load(r + x), vg = load(g + x), vb = load(b + x);
        jitter(vr, vg, vb, cp, 0, first);
        const vf l = luma(vr, vg, vb);
        if (n == kW) {
          acc += l;
        } else {
          for (int64_t i = 0; i < n; ++i) acc[i] += l[i];
        }
        store_n(planes + y * W + x, vr, n), store_n(planes + plane + y * W + x, vg, n);
        store_n(planes + 2 * plane + y * W + x, vb, n);
      }
      float row_sum = 0.f;
      for (int i = 0; i < kW; ++i) row_sum += acc[i];
      total += row_sum;
    }
    cp.mean_luma = float(total / double(plane));
  }
  const int last = cp.jitter ? 4 : 0;
  const int64_t taps = 2 * cp.radius + 1;
  for (int64_t y = 0; y < H; ++y) {
    if (cp.jitter) {
      for (int c = 0; c < 3; ++c) std::memcpy(rgb[c], planes + c * plane + y * W, W * sizeof(float));
    } else {
      load_row(src, H, W, y, cp.flip, r, g, b);
    }
    for (int64_t x = 0; x < W; x += kW) {
      vf vr = load(r + x), vg = load(g + x), vb = load(b + x);
      jitter(vr, vg, vb, cp, first, last);
      if (cp.gray) vr = vg = vb = luma(vr, vg, vb);
      if (cp.radius) {
        store(r + x, vr), store(g + x, vg), store(b + x, vb);
      } else {
        finish(vr, vg, vb, cp, dst + y * W + x, plane, std::min(kW, W - x));
      }
    }
    if (cp.radius) {
      for (int c = 0; c < 3; ++c) {
        float* row = rgb[c];
        for (int64_t i = 1; i <= cp.radius; ++i) row[-i] = row[i], row[W - 1 + i] = row[W - 1 - i];
        blur_row(row - cp.radius, cp.weights, taps, planes + c * plane + y * W, W);
      }
    }
  }
  if (!cp.radius) return;
  // Vertical pass: rows y - radius .. y + radius (reflected) of the horizontally blurred image, two
  // vectors of each channel at a time (six independent FMA chains, in registers as named variables: as
  // an array GCC kept the accumulators on the stack).
  for (int64_t y = 0; y < H; ++y) {
    int64_t x = 0;
    for (; x + 2 * kW <= W; x += 2 * kW) {
      vf r0 = splat(0.f), g0 = splat(0.f), b0 = splat(0.f), r1 = splat(0.f), g1 = splat(0.f), b1 = splat(0.f);
      for (int64_t k = 0; k < taps; ++k) {
        const float* p = planes + reflect(y + k - cp.radius, H) * W + x;
        const vf w = splat(cp.weights[k]);
        r0 += w * load(p), g0 += w * load(p + plane), b0 += w * load(p + 2 * plane);
        r1 += w * load(p + kW), g1 += w * load(p + plane + kW), b1 += w * load(p + 2 * plane + kW);
      }
      finish(r0, g0, b0, cp, dst + y * W + x, plane, kW);
      finish(r1, g1, b1, cp, dst + y * W + x + kW, plane, kW);
    }
    for (; x < W; x += kW) {
      const int64_t n = std::min(kW, W - x);
      vf acc_r = splat(0.f), acc_g = splat(0.f), acc_b = splat(0.f);
      for (int64_t k = 0; k < taps; ++k) {
        const float* p = planes + reflect(y + k - cp.radius, H) * W + x;
        const vf w = splat(cp.weights[k]);
        if (n == kW) {
          acc_r += w * load(p), acc_g += w * load(p + plane), acc_b += w * load(p + 2 * plane);
        } else {
          acc_r += w * load_tail(p, n), acc_g += w * load_tail(p + plane, n), acc_b += w * load_tail(p + 2 * plane, n);
        }
      }
      finish(acc_r, acc_g, acc_b, cp, dst + y * W + x, plane, n);
    }
  }
}

template <typename src_t>
void augment_crop(const src_t* src, int64_t H, int64_t W, const CropParams& cp, float* dst, float* rows,
                  float* planes) {
  augment_crop_body(src, H, W, cp, dst, rows, planes);
#if defined(__x86_64__)
  if (cp.stream_out) _mm_sfence();  // non-temporal stores are weakly ordered: publish them before returning
#endif
}
