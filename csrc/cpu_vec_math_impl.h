// Body of the SIMD float loops; included by cpu_vec_math.h once per instruction set, inside its own
// namespace, with DINOVMF_VEC_BYTES set to the vector width (no include guard on purpose).

constexpr int64_t kW = DINOVMF_VEC_BYTES / 4;  // fp32 lanes
typedef float vf __attribute__((vector_size(DINOVMF_VEC_BYTES)));
typedef int32_t vi __attribute__((vector_size(DINOVMF_VEC_BYTES)));

__attribute__((always_inline)) inline vf splat(float x) { return vf{} + x; }
__attribute__((always_inline)) inline vf load(const float* p) {
  vf v;
  std::memcpy(&v, p, sizeof(v));  // an unaligned vector load
  return v;
}
__attribute__((always_inline)) inline void store(float* p, vf v) { std::memcpy(p, &v, sizeof(v)); }
__attribute__((always_inline)) inline float hsum(vf v) {
  float s = 0.f;
  for (int i = 0; i < kW; ++i) s += v[i];
  return s;
}
__attribute__((always_inline)) inline float hmax(vf v) {
  float m = v[0];
  for (int i = 1; i < kW; ++i) m = v[i] > m ? v[i] : m;
  return m;
}
__attribute__((always_inline)) inline vf vmax(vf a, vf b) { return (vf)(((vi)(a > b) & (vi)a) | (~(vi)(a > b) & (vi)b)); }

// exp(x) per lane; x < -87.5 (including -inf) gives 0, where the true value is subnormal or 0.
__attribute__((always_inline)) inline vf exp8(vf x) {
  const vf lo = splat(-87.5f), hi = splat(88.5f), magic = splat(12582912.0f);  // 1.5 * 2^23
  const vi underflow = x < lo;
  vf xc = vmax(x, lo);
  xc = (vf)(((vi)(xc > hi) & (vi)hi) | (~(vi)(xc > hi) & (vi)xc));
  const vf t = xc * splat(1.44269504088896341f) + magic;  // adding magic rounds to an integer in the low bits
  const vf n = t - magic;
  const vi e = (vi)t - 0x4B400000;  // that integer, read from the bits of t
  vf r = xc - n * splat(0.693359375f);  // Cody-Waite split of ln 2: exact product, then the correction
  r = r - n * splat(-2.12194440e-4f);
  vf y = splat(1.9875691500e-4f);
  y = y * r + splat(1.3981999507e-3f);
  y = y * r + splat(8.3334519073e-3f);
  y = y * r + splat(4.1665795894e-2f);
  y = y * r + splat(1.6666665459e-1f);
  y = y * r + splat(5.0000001201e-1f);
  y = y * (r * r) + r + splat(1.0f);
  const vf scale = (vf)((e + 127) << 23);
  return (vf)((vi)(y * scale) & ~underflow);
}

// Tail lanes: copy into a padded vector (padding chosen by the caller so that it contributes nothing).
__attribute__((always_inline)) inline vf load_tail(const float* p, int64_t n, float pad) {
  vf v = splat(pad);
  for (int64_t i = 0; i < n; ++i) v[i] = p[i];
  return v;
}

static inline float max_of(const float* x, int64_t n) {
  vf m = splat(-INFINITY);
  int64_t i = 0;
  for (; i + kW <= n; i += kW) m = vmax(load(x + i), m);
  if (i < n) m = vmax(load_tail(x + i, n - i, -INFINITY), m);
  return hmax(m);
}

// y[i] = d[i] * a + c[i]
static inline void affine(const float* d, float a, const float* c, float* y, int64_t n) {
  int64_t i = 0;
  for (; i + kW <= n; i += kW) store(y + i, load(d + i) * splat(a) + load(c + i));
  for (; i < n; ++i) y[i] = d[i] * a + c[i];
}

// Returns sum exp(y - m); writes the terms to `out` when it is not null.
static inline float sum_exp(const float* y, float m, float* out, int64_t n) {
  vf s = splat(0.f);
  int64_t i = 0;
  for (; i + kW <= n; i += kW) {
    const vf e = exp8(load(y + i) - splat(m));
    if (out) store(out + i, e);
    s += e;
  }
  if (i < n) {
    const vf e = exp8(load_tail(y + i, n - i, -INFINITY) - splat(m));
    for (int64_t j = 0; j < n - i; ++j)
      if (out) out[i + j] = e[j];
    s += e;
  }
  return hsum(s);
}

static inline void scale_inplace(float* x, float a, int64_t n) {
  int64_t i = 0;
  for (; i + kW <= n; i += kW) store(x + i, load(x + i) * splat(a));
  for (; i < n; ++i) x[i] *= a;
}

// acc[i] += a * x[i]
static inline void axpy(float* acc, float a, const float* x, int64_t n) {
  int64_t i = 0;
  for (; i + kW <= n; i += kW) store(acc + i, load(acc + i) + splat(a) * load(x + i));
  for (; i < n; ++i) acc[i] += a * x[i];
}

// acc[i] += a * exp(y[i] - m)
static inline void axpy_exp(float* acc, float a, const float* y, float m, int64_t n) {
  int64_t i = 0;
  for (; i + kW <= n; i += kW) store(acc + i, load(acc + i) + splat(a) * exp8(load(y + i) - splat(m)));
  if (i < n) {
    const vf e = exp8(load_tail(y + i, n - i, -INFINITY) - splat(m));
    for (int64_t j = 0; j < n - i; ++j) acc[i + j] += a * e[j];
  }
}

// Per column online log-sum-exp over rows: (m, s) <- merge with y (m starts finite: the first row).
static inline void online_lse(float* m, float* s, const float* y, int64_t n) {
  int64_t i = 0;
  for (; i + kW <= n; i += kW) {
    const vf mo = load(m + i), yv = load(y + i), mn = vmax(mo, yv);
    store(s + i, load(s + i) * exp8(mo - mn) + exp8(yv - mn));
    store(m + i, mn);
  }
  for (; i < n; ++i) {
    const float mn = std::fmax(m[i], y[i]);
    s[i] = s[i] * std::exp(m[i] - mn) + std::exp(y[i] - mn);
    m[i] = mn;
  }
}

// Cross-entropy tile: sum exp(l - m), sum pbar * l, sum pbar (fp32 lanes; the caller adds tiles in double).
static inline void ce_tile(const float* l, const float* pbar, float m, int64_t n, float* out3) {
  vf se = splat(0.f), dot = splat(0.f), ps = splat(0.f);
  int64_t i = 0;
  for (; i + kW <= n; i += kW) {
    const vf lv = load(l + i), pv = load(pbar + i);
    se += exp8(lv - splat(m));
    dot += pv * lv;
    ps += pv;
  }
  float se_t = 0.f, dot_t = 0.f, ps_t = 0.f;
  for (; i < n; ++i) {
    se_t += std::exp(l[i] - m);
    dot_t += pbar[i] * l[i];
    ps_t += pbar[i];
  }
  out3[0] = hsum(se) + se_t;
  out3[1] = hsum(dot) + dot_t;
  out3[2] = hsum(ps) + ps_t;
}

// grad[i] = (psum * exp(l[i] - lse) - pbar[i]) * g
static inline void ce_grad_tile(const float* l, const float* pbar, float lse, float psum, float g, float* grad,
                                        int64_t n) {
  int64_t i = 0;
  for (; i + kW <= n; i += kW)
    store(grad + i, (splat(psum) * exp8(load(l + i) - splat(lse)) - load(pbar + i)) * splat(g));
  for (; i < n; ++i) grad[i] = (psum * std::exp(l[i] - lse) - pbar[i]) * g;
}

