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

// y[i] = x[i] * c[i] + b[i]; a null `c` means 1, a null `b` means 0 (y may alias x).
static inline void col_affine(const float* x, const float* c, const float* b, float* y, int64_t n) {
  int64_t i = 0;
  if (c && b) {
    for (; i + kW <= n; i += kW) store(y + i, load(x + i) * load(c + i) + load(b + i));
    for (; i < n; ++i) y[i] = x[i] * c[i] + b[i];
  } else if (c) {
    for (; i + kW <= n; i += kW) store(y + i, load(x + i) * load(c + i));
    for (; i < n; ++i) y[i] = x[i] * c[i];
  } else if (b) {
    for (; i + kW <= n; i += kW) store(y + i, load(x + i) + load(b + i));
    for (; i < n; ++i) y[i] = x[i] + b[i];
  } else if (y != x) {
    std::memcpy(y, x, n * sizeof(float));
  }
}

// Forward tile of the cross-entropy, one exp per element: e[i] = exp(l[i] - m) (e may alias l), and
// out4 = {sum e, sum e (l - m), sum pbar l, sum pbar}; fp32 lanes (the caller adds tiles in double).
static inline void ce_fwd_tile(const float* l, const float* pbar, float m, float* e, int64_t n, float* out4) {
  vf se = splat(0.f), sel = splat(0.f), dot = splat(0.f), ps = splat(0.f);
  int64_t i = 0;
  for (; i + kW <= n; i += kW) {
    const vf lv = load(l + i), pv = load(pbar + i), d = lv - splat(m), ev = exp8(d);
    store(e + i, ev);
    se += ev;
    sel += ev * d;
    dot += pv * lv;
    ps += pv;
  }
  float se_t = 0.f, sel_t = 0.f, dot_t = 0.f, ps_t = 0.f;
  if (i < n) {  // the tail through a padded vector: the same exp polynomial as the body
    const int64_t r = n - i;
    const vf lv = load_tail(l + i, r, m), d = lv - splat(m);
    const vf ev = exp8(d);
    for (int64_t j = 0; j < r; ++j) {
      e[i + j] = ev[j];
      se_t += ev[j];
      sel_t += ev[j] * d[j];
      dot_t += pbar[i + j] * l[i + j];
      ps_t += pbar[i + j];
    }
  }
  out4[0] = hsum(se) + se_t;
  out4[1] = hsum(sel) + sel_t;
  out4[2] = hsum(dot) + dot_t;
  out4[3] = hsum(ps) + ps_t;
}

// Gradient tile from the stored exponentials: g = (f e - pbar) s; out = g * c (c null: g); acc += g when
// acc is not null. `out` may alias `e`.
static inline void ce_grad_tile(const float* e, const float* pbar, float f, float s, const float* c, float* out,
                                float* acc, int64_t n) {
  int64_t i = 0;
  const vf fv = splat(f), sv = splat(s);
  for (; i + kW <= n; i += kW) {
    const vf g = (fv * load(e + i) - load(pbar + i)) * sv;
    if (acc) store(acc + i, load(acc + i) + g);
    store(out + i, c ? g * load(c + i) : g);
  }
  for (; i < n; ++i) {
    const float g = (f * e[i] - pbar[i]) * s;
    if (acc) acc[i] += g;
    out[i] = c ? g * c[i] : g;
  }
}

// In place y[i] <- exp(y[i] - m); out3 = {sum e, sum e (y - m), sum e w} (w null: the last is 0).
static inline void exp_tile(float* y, float m, const float* w, int64_t n, float* out3) {
  vf se = splat(0.f), sey = splat(0.f), sew = splat(0.f);
  int64_t i = 0;
  for (; i + kW <= n; i += kW) {
    const vf d = load(y + i) - splat(m), ev = exp8(d);
    store(y + i, ev);
    se += ev;
    sey += ev * d;
    if (w) sew += ev * load(w + i);
  }
  float se_t = 0.f, sey_t = 0.f, sew_t = 0.f;
  if (i < n) {
    const int64_t r = n - i;
    const vf d = load_tail(y + i, r, m) - splat(m), ev = exp8(d);
    for (int64_t j = 0; j < r; ++j) {
      y[i + j] = ev[j];
      se_t += ev[j];
      sey_t += ev[j] * d[j];
      if (w) sew_t += ev[j] * w[i + j];
    }
  }
  out3[0] = hsum(se) + se_t;
  out3[1] = hsum(sey) + sey_t;
  out3[2] = hsum(sew) + sew_t;
}

// In place x[i] *= a; returns the index of the first largest result (the caller keeps the tile order).
static inline int64_t scale_argmax(float* x, float a, int64_t n, float* best) {
  vf mv = splat(-INFINITY), iv = splat(-1.f), lane;
  for (int j = 0; j < kW; ++j) lane[j] = static_cast<float>(j);
  int64_t i = 0;
  for (; i + kW <= n; i += kW) {  // indices as floats: exact below 2^24, and K is far below that
    const vf v = load(x + i) * splat(a);
    store(x + i, v);
    const vi gt = v > mv;  // strict: a lane keeps its first maximum
    mv = (vf)((gt & (vi)v) | (~gt & (vi)mv));
    iv = (vf)((gt & (vi)(lane + splat(static_cast<float>(i)))) | (~gt & (vi)iv));
  }
  float bv = -INFINITY;
  int64_t bi = -1;
  for (int j = 0; j < kW; ++j) {
    const int64_t idx = static_cast<int64_t>(iv[j]);
    if (idx >= 0 && (mv[j] > bv || (mv[j] == bv && idx < bi))) {
      bv = mv[j];
      bi = idx;
    }
  }
  for (; i < n; ++i) {
    x[i] *= a;
    if (x[i] > bv) {
      bv = x[i];
      bi = i;
    }
  }
  *best = bv;
  return bi;
}

// acc[i] += a * x[i]
static inline void axpy(float* acc, float a, const float* x, int64_t n) {
  int64_t i = 0;
  for (; i + kW <= n; i += kW) store(acc + i, load(acc + i) + splat(a) * load(x + i));
  for (; i < n; ++i) acc[i] += a * x[i];
}

// sum x[i] y[i] (fp32 lanes)
static inline float dot(const float* x, const float* y, int64_t n) {
  vf s = splat(0.f);
  int64_t i = 0;
  for (; i + kW <= n; i += kW) s += load(x + i) * load(y + i);
  float t = 0.f;
  for (; i < n; ++i) t += x[i] * y[i];
  return hsum(s) + t;
}

// acc[i] += a * x[i] * w[i]
static inline void axpy_mul(float* acc, float a, const float* x, const float* w, int64_t n) {
  int64_t i = 0;
  for (; i + kW <= n; i += kW) store(acc + i, load(acc + i) + splat(a) * load(x + i) * load(w + i));
  for (; i < n; ++i) acc[i] += a * x[i] * w[i];
}

// Returns sum exp(y - m) (the log-sum-exp of a tile, with the tile's own max).
static inline float sum_exp(const float* y, float m, int64_t n) {
  vf s = splat(0.f);
  int64_t i = 0;
  for (; i + kW <= n; i += kW) s += exp8(load(y + i) - splat(m));
  if (i < n) s += exp8(load_tail(y + i, n - i, -INFINITY) - splat(m));
  return hsum(s);
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

// --- k-major ("column") tiles -------------------------------------------------------------------------
// A tile is kb rows of a [K, C] k-major matrix (row k: the C lanes, one per student or teacher row, C a
// multiple of kW). Lane vector v covers lanes [v kW, v kW + kW). Per-lane results are float arrays [C].

static inline int64_t lanes() { return kW; }

// Pbar for lane vector v at prototype row P (the teacher probabilities of one k, [Nt] floats): the sum over
// j < n_terms of the term's column per lane. src[j] per (v, j): -2 skip, -1 gather (idx[j kW + lane], -1 =
// none), >= 0 the first lane's column (the lanes' columns are consecutive).
__attribute__((always_inline)) inline vf pbar_vec(const float* P, const int32_t* src, const int32_t* idx,
                                                  int64_t n_terms) {
  vf acc = splat(0.f);
  for (int64_t j = 0; j < n_terms; ++j) {
    const int32_t s = src[j];
    if (s >= 0) {
      acc += load(P + s);
    } else if (s == -1) {
      vf g = splat(0.f);
      for (int64_t l = 0; l < kW; ++l) {
        const int32_t c = idx[j * kW + l];
        if (c >= 0) g[l] = P[c];
      }
      acc += g;
    }
  }
  return acc;
}

// Cross-entropy pass 1 over one tile of raw logits L [kb, C] (row stride C), in place: l = raw * cs[k] +
// bias[k] (cs, bias null: 1, 0), then e = exp(l - m) with m the lane's tile max, written over L. Per lane:
// m, sum e, sum e (l - m), sum pbar l, sum pbar (written to the five [C] outputs). P: teacher rows [kb, ldp]
// of the same k; src/idx: the pairing (pbar_vec), n_vec x n_terms entries of src, n_vec x n_terms x kW of idx.
static inline void ce_cols_fwd_tile(float* L, int64_t kb, int64_t C, const float* cs, const float* bias,
                                    const float* P, int64_t ldp, const int32_t* src, const int32_t* idx,
                                    int64_t n_terms, float* m_out, float* se_out, float* sel_out, float* dot_out,
                                    float* ps_out) {
  const int64_t n_vec = C / kW;
  for (int64_t v = 0; v < n_vec; ++v) store(m_out + v * kW, splat(-INFINITY));
  for (int64_t k = 0; k < kb; ++k) {  // phase A: the logits and their lane max (the tile stays in L2)
    float* row = L + k * C;
    const vf c = splat(cs ? cs[k] : 1.f), b = splat(bias ? bias[k] : 0.f);
    for (int64_t v = 0; v < n_vec; ++v) {
      const vf l = load(row + v * kW) * c + b;
      store(row + v * kW, l);
      store(m_out + v * kW, vmax(load(m_out + v * kW), l));
    }
  }
  for (int64_t v = 0; v < n_vec; ++v) {
    store(se_out + v * kW, splat(0.f));
    store(sel_out + v * kW, splat(0.f));
    store(dot_out + v * kW, splat(0.f));
    store(ps_out + v * kW, splat(0.f));
  }
  for (int64_t k = 0; k < kb; ++k) {  // phase B: one exp per element, the sums, e written over l
    float* row = L + k * C;
    const float* prow = P + k * ldp;
    for (int64_t v = 0; v < n_vec; ++v) {
      const vf l = load(row + v * kW), m = load(m_out + v * kW), d = l - m, e = exp8(d);
      const vf pb = pbar_vec(prow, src + v * n_terms, idx + v * n_terms * kW, n_terms);
      store(row + v * kW, e);
      store(se_out + v * kW, load(se_out + v * kW) + e);
      store(sel_out + v * kW, load(sel_out + v * kW) + e * d);
      store(dot_out + v * kW, load(dot_out + v * kW) + pb * l);
      store(ps_out + v * kW, load(ps_out + v * kW) + pb);
    }
  }
}

// Cross-entropy pass 2 over one tile of exponentials E [kb, C], in place: g = (f e - pbar) s per lane
// (f, s: [C]); E becomes g * cs[k] (cs null: g); col_sum[k] += the sum over lanes of g (col_sum not null).
static inline void ce_cols_grad_tile(float* E, int64_t kb, int64_t C, const float* cs, const float* P, int64_t ldp,
                                     const int32_t* src, const int32_t* idx, int64_t n_terms, const float* f,
                                     const float* s, float* col_sum) {
  const int64_t n_vec = C / kW;
  for (int64_t k = 0; k < kb; ++k) {
    float* row = E + k * C;
    const float* prow = P + k * ldp;
    const vf c = splat(cs ? cs[k] : 1.f);
    vf acc = splat(0.f);
    for (int64_t v = 0; v < n_vec; ++v) {
      const vf pb = pbar_vec(prow, src + v * n_terms, idx + v * n_terms * kW, n_terms);
      const vf g = (load(f + v * kW) * load(row + v * kW) - pb) * load(s + v * kW);
      acc += g;
      store(row + v * kW, g * c);
    }
    if (col_sum) col_sum[k] += hsum(acc);
  }
}

// Teacher pass 1 over one tile of dots D [kb, C], in place: y = d * a[k] + b[k]; per lane the tile max m and
// its first row (argmax, as a float: exact below 2^24), then e = exp(y - m) over y; per lane sum e,
// sum e (y - m), sum e w[k] (w null: 0). ymean (not null): ymean[k] = sum over lanes of y * mask.
static inline void teacher_cols_fwd_tile(float* D, int64_t kb, int64_t C, const float* a, const float* b,
                                         const float* w, const float* mask, float* ymean, float* m_out,
                                         float* arg_out, float* se_out, float* sey_out, float* sew_out) {
  const int64_t n_vec = C / kW;
  for (int64_t v = 0; v < n_vec; ++v) {
    store(m_out + v * kW, splat(-INFINITY));
    store(arg_out + v * kW, splat(0.f));
  }
  for (int64_t k = 0; k < kb; ++k) {
    float* row = D + k * C;
    const vf av = splat(a[k]), bv = splat(b[k]), kf = splat(static_cast<float>(k));
    vf ysum = splat(0.f);
    for (int64_t v = 0; v < n_vec; ++v) {
      const vf y = load(row + v * kW) * av + bv, m = load(m_out + v * kW);
      store(row + v * kW, y);
      const vi gt = y > m;  // strict: a lane keeps its first maximum
      store(m_out + v * kW, (vf)((gt & (vi)y) | (~gt & (vi)m)));
      store(arg_out + v * kW, (vf)((gt & (vi)kf) | (~gt & (vi)load(arg_out + v * kW))));
      if (ymean) ysum += y * load(mask + v * kW);
    }
    if (ymean) ymean[k] = hsum(ysum);
  }
  for (int64_t v = 0; v < n_vec; ++v) {
    store(se_out + v * kW, splat(0.f));
    store(sey_out + v * kW, splat(0.f));
    store(sew_out + v * kW, splat(0.f));
  }
  for (int64_t k = 0; k < kb; ++k) {
    float* row = D + k * C;
    const vf wk = splat(w ? w[k] : 0.f);
    for (int64_t v = 0; v < n_vec; ++v) {
      const vf d = load(row + v * kW) - load(m_out + v * kW), e = exp8(d);
      store(row + v * kW, e);
      store(se_out + v * kW, load(se_out + v * kW) + e);
      store(sey_out + v * kW, load(sey_out + v * kW) + e * d);
      store(sew_out + v * kW, load(sew_out + v * kW) + e * wk);
    }
  }
}

// Teacher pass 2 over one tile of exponentials E [kb, C], in place: p = e f per lane (f: [C]); with w (not
// null): wsum[k] = w[k] sum over lanes of p r (r: [C], the lane's 1 / sum_k p_k w_k times its mask).
static inline void teacher_cols_finish_tile(float* E, int64_t kb, int64_t C, const float* f, const float* w,
                                            const float* r, float* wsum) {
  const int64_t n_vec = C / kW;
  for (int64_t k = 0; k < kb; ++k) {
    float* row = E + k * C;
    vf acc = splat(0.f);
    for (int64_t v = 0; v < n_vec; ++v) {
      const vf p = load(row + v * kW) * load(f + v * kW);
      store(row + v * kW, p);
      if (w) acc += p * load(r + v * kW);
    }
    if (w) wsum[k] = w[k] * hsum(acc);
  }
}
