// CPU kernels of the fused head-to-loss op (dinovmf._C): `ce_rows` (the student side of a chunk of rows:
// loss terms, by-products and the logits' gradient, in place), `teacher_rows` (the teacher softmax rows,
// their centre statistic, entropy and argmax) and `column_lse` (the Sinkhorn column step). The contract
// is docs/INTERFACES.md ("Backends"); dinovmf/_ext.py holds the Python wrappers and dinovmf/head_loss.py
// the host loop (GEMMs through BLAS) around them.
//
// Parallel over rows with at::parallel_for; inner loops are the vectorised float loops of cpu_vec_math.h.
// bf16/fp16 inputs are converted to fp32 one tile at a time; every accumulation is fp32 within a tile and
// double across tiles, so a 131072-wide row sums to 1 within a few fp32 ulps. Column sums ([K] vectors)
// are accumulated per block of rows and the blocks added in block order: for a given thread count the
// results do not depend on scheduling.
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <vector>

#include "cpu_loss_common.h"
#include "cpu_vec_math.h"

namespace dinovmf {
namespace {

constexpr int64_t kTile = 2048;  // 8 KiB of fp32: a tile of logits and its teacher sum stay in L1

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
void store_from_float(const float* src, scalar_t* dst, int64_t n) {
  for (int64_t i = 0; i < n; ++i) dst[i] = static_cast<scalar_t>(src[i]);
}

// Contiguous blocks of rows, one [K] partial sum each, added in block order afterwards (deterministic).
struct RowBlocks {
  int64_t count, rows_per_block;
  RowBlocks(int64_t rows) {
    count = std::max<int64_t>(1, std::min<int64_t>(rows, at::get_num_threads()));
    rows_per_block = (rows + count - 1) / count;
  }
  int64_t begin(int64_t blk) const { return blk * rows_per_block; }
  int64_t end(int64_t blk, int64_t rows) const { return std::min(rows, (blk + 1) * rows_per_block); }
};

void reduce_partials(const std::vector<float>& partial, int64_t blocks, int64_t K, float* out) {
  for (int64_t blk = 0; blk < blocks; ++blk) vec::axpy(out, 1.f, partial.data() + blk * K, K);
}

// --- ce_rows ---------------------------------------------------------------------------------------

// Pbar for columns [k0, k0 + n): the teacher row itself when there is one (no copy), else a sum in `buf`.
const float* pbar_tile(const float* const* rows, int64_t n_rows, int64_t k0, int64_t n, float* buf) {
  if (n_rows == 1) return rows[0] + k0;
  std::fill(buf, buf + n, 0.f);
  for (int64_t t = 0; t < n_rows; ++t) vec::axpy(buf, 1.f, rows[t] + k0, n);
  return buf;
}

struct CeArgs {
  int64_t C, K, Nt, B, T;
  const float* col_scale;
  const float* bias;
  const float* P;
  const int64_t* row_index;
  bool same_view;
  const float* row_weight;
  float grad_scale;
  float* col_grad_sum;
  float* stats;  // [4, C]
};

template <typename scalar_t>
void ce_rows_kernel(const CeArgs& a, const scalar_t* L, scalar_t* GO) {
  const int64_t C = a.C, K = a.K, n_tiles = (K + kTile - 1) / kTile;
  const RowBlocks blocks(C);
  std::vector<float> partial(a.col_grad_sum ? blocks.count * K : 0, 0.f);
  // fp32 logits overwritten by their own gradient: the exponentials can live in the row itself.
  const bool e_in_row = std::is_same_v<scalar_t, float> && GO != nullptr &&
                        static_cast<const void*>(GO) == static_cast<const void*>(L);
  at::parallel_for(0, blocks.count, 1, [&](int64_t blk0, int64_t blk1) {
    FlushDenormals ftz;
    std::vector<float> lt(kTile), pb(kTile), gt(kTile), ebuf(e_in_row ? 0 : K);
    std::vector<float> tile_max(n_tiles), tile_se(n_tiles), tile_sel(n_tiles);
    std::vector<const float*> trows(std::max<int64_t>(1, a.T));
    // Sum of all T teacher rows of one image: the Pbar of its S - T views not paired with themselves.
    // Rows come image by image, so it is formed once per image and thread (and stays in L2).
    std::vector<float> image_sum(!a.same_view && a.T >= 2 ? K : 0);
    int64_t image_sum_of = -1;
    for (int64_t blk = blk0; blk < blk1; ++blk) {
      float* part = a.col_grad_sum ? partial.data() + blk * K : nullptr;
      for (int64_t i = blocks.begin(blk); i < blocks.end(blk, C); ++i) {
        const int64_t r = a.row_index[i];
        int64_t nt = 0;
        if (a.same_view) {
          TORCH_CHECK(r >= 0 && r < a.Nt, "row_index ", r, " out of range for ", a.Nt, " teacher rows");
          trows[nt++] = a.P + r * K;
        } else {
          TORCH_CHECK(r >= 0, "row_index must be >= 0, got ", r);
          const int64_t s = r / a.B, b = r % a.B;
          for (int64_t t = 0; t < a.T; ++t)
            if (t != s) trows[nt++] = a.P + (t * a.B + b) * K;
          if (nt == a.T && nt >= 2) {  // every teacher view: the cached per-image sum
            if (image_sum_of != b) {
              std::fill(image_sum.begin(), image_sum.end(), 0.f);
              for (int64_t t = 0; t < nt; ++t) vec::axpy(image_sum.data(), 1.f, trows[t], K);
              image_sum_of = b;
            }
            trows[0] = image_sum.data();
            nt = 1;
          }
        }
        const scalar_t* l_row = L + i * K;
        float* e = e_in_row ? reinterpret_cast<float*>(GO + i * K) : ebuf.data();
        // Pass 1, tile by tile: l = raw * col_scale + bias (in L1), the tile max, then one exp per element,
        // stored for pass 2; per-tile sums are rescaled to the row max once it is known.
        double dot = 0, psum = 0;
        for (int64_t t = 0, k0 = 0; k0 < K; ++t, k0 += kTile) {
          const int64_t n = std::min(kTile, K - k0);
          const float* raw = as_float(l_row + k0, lt.data(), n);
          vec::col_affine(raw, a.col_scale ? a.col_scale + k0 : nullptr, a.bias ? a.bias + k0 : nullptr, lt.data(), n);
          const float m = vec::max_of(lt.data(), n);
          float part4[4];
          vec::ce_fwd_tile(lt.data(), pbar_tile(trows.data(), nt, k0, n, pb.data()), m, e + k0, n, part4);
          tile_max[t] = m;
          tile_se[t] = part4[0];
          tile_sel[t] = part4[1];
          dot += part4[2];
          psum += part4[3];
        }
        const MergedTiles merged = merge_tiles(tile_max.data(), tile_se.data(), tile_sel.data(), n_tiles, 1);
        const double m = merged.m, se = merged.se, shifted = merged.shifted;
        const double lse = m + std::log(se), entropy = std::log(se) - shifted / se;
        a.stats[i] = static_cast<float>(psum * lse - dot);
        a.stats[C + i] = static_cast<float>(lse);
        a.stats[2 * C + i] = static_cast<float>(psum);
        a.stats[3 * C + i] = static_cast<float>(lse - entropy);  // sum_k softmax_k l_k
        if (GO == nullptr) continue;
        // Pass 2: G = (psum softmax - Pbar) * grad_scale * w from the stored exponentials.
        const float s = a.grad_scale * (a.row_weight ? a.row_weight[i] : 1.f);
        scalar_t* g_row = GO + i * K;
        for (int64_t t = 0, k0 = 0; k0 < K; ++t, k0 += kTile) {
          const int64_t n = std::min(kTile, K - k0);
          const float f = static_cast<float>(psum * std::exp(static_cast<double>(tile_max[t]) - m) / se);
          const float* cs = a.col_scale ? a.col_scale + k0 : nullptr;
          const float* p = pbar_tile(trows.data(), nt, k0, n, pb.data());
          float* acc = part ? part + k0 : nullptr;
          if constexpr (std::is_same_v<scalar_t, float>) {
            vec::ce_grad_tile(e + k0, p, f, s, cs, g_row + k0, acc, n);
          } else {
            vec::ce_grad_tile(e + k0, p, f, s, cs, gt.data(), acc, n);
            store_from_float(gt.data(), g_row + k0, n);
          }
        }
      }
    }
  });
  if (a.col_grad_sum) reduce_partials(partial, blocks.count, K, a.col_grad_sum);
}

// Returns stats [4, c] fp32: loss_row, lse, psum, sum_k softmax_k l_k. See docs/INTERFACES.md.
at::Tensor ce_rows(const at::Tensor& logits, const c10::optional<at::Tensor>& col_scale,
                   const c10::optional<at::Tensor>& bias, const at::Tensor& teacher_probs,
                   const at::Tensor& row_index, int64_t B, int64_t T, bool same_view,
                   const c10::optional<at::Tensor>& row_weight, double grad_scale,
                   const c10::optional<at::Tensor>& grad_out, const c10::optional<at::Tensor>& col_grad_sum) {
  check_cpu_contiguous(logits, "logits");
  check_cpu_contiguous(teacher_probs, "teacher_probs");
  check_cpu_contiguous(row_index, "row_index");
  TORCH_CHECK(logits.dim() == 2 && teacher_probs.dim() == 2 && teacher_probs.size(1) == logits.size(1),
              "logits [c, K] and teacher_probs [Nt, K] must agree in K");
  TORCH_CHECK(teacher_probs.scalar_type() == at::kFloat, "teacher_probs must be float32");
  TORCH_CHECK(row_index.scalar_type() == at::kLong && row_index.numel() == logits.size(0),
              "row_index must be int64 [c]");
  const int64_t C = logits.size(0), K = logits.size(1);
  TORCH_CHECK(same_view || (B >= 1 && T >= 1 && teacher_probs.size(0) == T * B), "teacher_probs must have T*B rows");
  CeArgs a;
  a.C = C;
  a.K = K;
  a.Nt = teacher_probs.size(0);
  a.B = B;
  a.T = same_view ? 1 : T;
  a.col_scale = optional_vector(col_scale, K, "col_scale");
  a.bias = optional_vector(bias, K, "bias");
  a.P = teacher_probs.data_ptr<float>();
  a.row_index = row_index.data_ptr<int64_t>();
  a.same_view = same_view;
  a.row_weight = optional_vector(row_weight, C, "row_weight");
  a.grad_scale = static_cast<float>(grad_scale);
  a.col_grad_sum = optional_vector(col_grad_sum, K, "col_grad_sum");
  auto stats = at::empty({4, C}, logits.options().dtype(at::kFloat));
  a.stats = stats.data_ptr<float>();
  const bool has_grad = grad_out.has_value() && grad_out->defined();
  if (has_grad) {
    check_cpu_contiguous(*grad_out, "grad_out");
    TORCH_CHECK(grad_out->sizes() == logits.sizes() && grad_out->scalar_type() == logits.scalar_type(),
                "grad_out must have the shape and dtype of logits");
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, logits.scalar_type(), "ce_rows", [&] {
    ce_rows_kernel<scalar_t>(a, logits.data_ptr<scalar_t>(), has_grad ? grad_out->data_ptr<scalar_t>() : nullptr);
  });
  return stats;
}

// --- teacher_rows ----------------------------------------------------------------------------------

enum StatKind : int64_t { kStatNone = 0, kStatMeanLogits = 1, kStatMeanReweighted = 2 };

struct TeacherArgs {
  int64_t N, K, stat_kind;
  const float* col_a;
  const float* col_b;
  const float* stat_weight;
  float* out;  // [N, K] fp32 or nullptr (row log-sum-exp only)
  float *row_lse, *row_entropy, *stat;
  int64_t* row_argmax;
};

// Output logits y = dots * a + b. With `out`: softmax rows written there (in place over y), their entropy and
// argmax, and the centre statistic. Without: only the row log-sum-exp (the Sinkhorn row step).
template <typename scalar_t>
void teacher_rows_kernel(const TeacherArgs& a, const scalar_t* D) {
  const int64_t N = a.N, K = a.K, n_tiles = (K + kTile - 1) / kTile;
  const float inv_n = 1.f / static_cast<float>(N);
  const RowBlocks blocks(N);
  std::vector<float> partial(a.stat_kind != kStatNone ? blocks.count * K : 0, 0.f);
  at::parallel_for(0, blocks.count, 1, [&](int64_t blk0, int64_t blk1) {
    FlushDenormals ftz;
    std::vector<float> dbuf(kTile), yt(kTile), tile_max(n_tiles), tile_se(n_tiles);
    for (int64_t blk = blk0; blk < blk1; ++blk) {
      float* part = partial.empty() ? nullptr : partial.data() + blk * K;
      for (int64_t row = blocks.begin(blk); row < blocks.end(blk, N); ++row) {
        const scalar_t* d_row = D + row * K;
        if (a.out == nullptr) {  // log-sum-exp only: tile max, one exp per element, tiles merged in double
          for (int64_t t = 0, k0 = 0; k0 < K; ++t, k0 += kTile) {
            const int64_t n = std::min(kTile, K - k0);
            vec::col_affine(as_float(d_row + k0, dbuf.data(), n), a.col_a + k0, a.col_b + k0, yt.data(), n);
            tile_max[t] = vec::max_of(yt.data(), n);
            tile_se[t] = vec::sum_exp(yt.data(), tile_max[t], n);
          }
          const MergedTiles merged = merge_tiles(tile_max.data(), tile_se.data(), nullptr, n_tiles, 1);
          a.row_lse[row] = static_cast<float>(merged.m + std::log(merged.se));
          continue;
        }
        float* y = a.out + row * K;  // may alias the fp32 dots: each element is read before it is written
        float m = -INFINITY;
        for (int64_t k0 = 0; k0 < K; k0 += kTile) {  // pass 1: y and its max
          const int64_t n = std::min(kTile, K - k0);
          vec::col_affine(as_float(d_row + k0, dbuf.data(), n), a.col_a + k0, a.col_b + k0, y + k0, n);
          m = std::max(m, vec::max_of(y + k0, n));
          if (a.stat_kind == kStatMeanLogits) vec::axpy(part + k0, inv_n, y + k0, n);
        }
        double se = 0, sey = 0, sew = 0;
        for (int64_t k0 = 0; k0 < K; k0 += kTile) {  // pass 2: e = exp(y - m) in place (the row is in L2)
          const int64_t n = std::min(kTile, K - k0);
          float s3[3];
          vec::exp_tile(y + k0, m, a.stat_kind == kStatMeanReweighted ? a.stat_weight + k0 : nullptr, n, s3);
          se += s3[0];
          sey += s3[1];
          sew += s3[2];
        }
        a.row_lse[row] = static_cast<float>(m + std::log(se));
        a.row_entropy[row] = static_cast<float>(std::log(se) - sey / se);
        const float inv_se = static_cast<float>(1.0 / se);
        float best = -INFINITY;
        int64_t best_k = 0;
        for (int64_t k0 = 0; k0 < K; k0 += kTile) {  // pass 3: normalise, argmax (first maximum wins)
          const int64_t n = std::min(kTile, K - k0);
          float tile_best;
          const int64_t k = vec::scale_argmax(y + k0, inv_se, n, &tile_best);
          if (k >= 0 && tile_best > best) {
            best = tile_best;
            best_k = k0 + k;
          }
          if (a.stat_kind == kStatMeanReweighted)  // softmax(y) * w / sum(softmax(y) * w), averaged over rows
            vec::axpy_mul(part + k0, static_cast<float>(se / sew) * inv_n, y + k0, a.stat_weight + k0, n);
        }
        a.row_argmax[row] = best_k;
      }
    }
  });
  if (a.stat_kind != kStatNone) {
    std::fill(a.stat, a.stat + K, 0.f);
    reduce_partials(partial, blocks.count, K, a.stat);
  }
}

// Returns {row_lse [N], row_entropy [N], row_argmax [N] int64, stat [K]} (the last three empty without
// `out`; stat empty for stat_kind 0). stat_kind: 0 none, 1 mean_rows(y), 2 mean_rows(normalise(softmax(y) w)).
std::vector<at::Tensor> teacher_rows(const at::Tensor& dots, const at::Tensor& col_a, const at::Tensor& col_b,
                                     const c10::optional<at::Tensor>& out, int64_t stat_kind,
                                     const c10::optional<at::Tensor>& stat_weight) {
  check_cpu_contiguous(dots, "dots");
  TORCH_CHECK(dots.dim() == 2, "dots must be [N, K]");
  TORCH_CHECK(stat_kind >= kStatNone && stat_kind <= kStatMeanReweighted, "stat_kind must be 0..2, got ", stat_kind);
  const int64_t N = dots.size(0), K = dots.size(1);
  auto f32 = dots.options().dtype(at::kFloat);
  TeacherArgs a;
  a.N = N;
  a.K = K;
  a.col_a = optional_vector(col_a, K, "col_a");
  a.col_b = optional_vector(col_b, K, "col_b");
  TORCH_CHECK(a.col_a && a.col_b, "col_a and col_b are required");
  const bool has_out = out.has_value() && out->defined();
  a.stat_kind = has_out ? stat_kind : kStatNone;
  a.stat_weight = optional_vector(stat_weight, K, "stat_weight");
  TORCH_CHECK(a.stat_kind != kStatMeanReweighted || a.stat_weight, "stat_kind 2 needs stat_weight");
  at::Tensor lse = at::empty({N}, f32), entropy, argmax, stat;
  a.row_lse = lse.data_ptr<float>();
  a.out = nullptr;
  a.row_entropy = a.stat = nullptr;
  a.row_argmax = nullptr;
  if (has_out) {
    check_cpu_contiguous(*out, "out");
    TORCH_CHECK(out->scalar_type() == at::kFloat && out->sizes() == dots.sizes(), "out must be float32 [N, K]");
    TORCH_CHECK(out->data_ptr() != dots.data_ptr() || dots.scalar_type() == at::kFloat,
                "out may alias dots only when dots are float32");
    a.out = out->data_ptr<float>();
    entropy = at::empty({N}, f32);
    argmax = at::empty({N}, dots.options().dtype(at::kLong));
    a.row_entropy = entropy.data_ptr<float>();
    a.row_argmax = argmax.data_ptr<int64_t>();
    if (a.stat_kind != kStatNone) {
      stat = at::empty({K}, f32);
      a.stat = stat.data_ptr<float>();
    }
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, dots.scalar_type(), "teacher_rows", [&] {
    teacher_rows_kernel<scalar_t>(a, dots.data_ptr<scalar_t>());
  });
  return {lse, entropy, argmax, stat};
}

// out[k] = logsumexp_n(dots[n,k] * a[k] + b[k] + row_shift[n]): the Sinkhorn column step.
at::Tensor column_lse(const at::Tensor& dots, const at::Tensor& col_a, const at::Tensor& col_b,
                      const at::Tensor& row_shift) {
  check_cpu_contiguous(dots, "dots");
  TORCH_CHECK(dots.dim() == 2, "dots must be [N, K]");
  const int64_t N = dots.size(0), K = dots.size(1);
  const float* ca = optional_vector(col_a, K, "col_a");
  const float* cb = optional_vector(col_b, K, "col_b");
  const float* vp = optional_vector(row_shift, N, "row_shift");
  auto out = at::empty({K}, dots.options().dtype(at::kFloat));
  float* o = out.data_ptr<float>();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, dots.scalar_type(), "column_lse", [&] {
    const scalar_t* D = dots.data_ptr<scalar_t>();
    at::parallel_for(0, (K + kTile - 1) / kTile, 1, [&](int64_t t0, int64_t t1) {
      FlushDenormals ftz;
      std::vector<float> dbuf(kTile), y(kTile), m(kTile), s(kTile), cv(kTile);
      for (int64_t t = t0; t < t1; ++t) {
        const int64_t k0 = t * kTile, n = std::min(kTile, K - k0);
        for (int64_t r = 0; r < N; ++r) {
          for (int64_t i = 0; i < n; ++i) cv[i] = cb[k0 + i] + vp[r];
          vec::col_affine(as_float(D + r * K + k0, dbuf.data(), n), ca + k0, cv.data(), y.data(), n);
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

// --- weight-norm gradient -------------------------------------------------------------------------

// In place, one pass over [K, p]: u_k <- u_k - (u_k . v_k / v_norm_k^2) v_k (the gradient w.r.t. v of
// w = g v / ||v|| from u = (g / ||v||) dL/dw); returns u_k . v_k (before the update), from which the host
// forms dL/dg. Rows are independent: parallel over k.
at::Tensor weight_norm_backward_(at::Tensor& u, const at::Tensor& v, const at::Tensor& v_norm) {
  check_cpu_contiguous(u, "u");
  check_cpu_contiguous(v, "v");
  TORCH_CHECK(u.scalar_type() == at::kFloat && v.scalar_type() == at::kFloat && u.sizes() == v.sizes() &&
                  u.dim() == 2,
              "u and v must be float32 [K, p] tensors of one shape");
  const int64_t K = u.size(0), p = u.size(1);
  const float* vn = optional_vector(v_norm, K, "v_norm");
  auto dots = at::empty({K}, u.options());
  float *U = u.data_ptr<float>(), *out = dots.data_ptr<float>();
  const float* V = v.data_ptr<float>();
  at::parallel_for(0, K, 256, [&](int64_t k0, int64_t k1) {
    FlushDenormals ftz;
    for (int64_t k = k0; k < k1; ++k) {
      const float d = vec::dot(U + k * p, V + k * p, p);
      out[k] = d;
      vec::axpy(U + k * p, -d / (vn[k] * vn[k]), V + k * p, p);
    }
  });
  return dots;
}

}  // namespace
}  // namespace dinovmf

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "dinovmf fused head-to-loss kernels (CPU): ce_rows, teacher_rows, column_lse";
  m.def("ce_rows", &dinovmf::ce_rows, "student rows of a chunk -> stats [4, c]; gradient in grad_out");
  m.def("teacher_rows", &dinovmf::teacher_rows, "teacher softmax rows -> (row_lse, row_entropy, row_argmax, stat)");
  m.def("column_lse", &dinovmf::column_lse, "per-prototype log-sum-exp over rows (Sinkhorn column step)");
  m.def("weight_norm_backward_", &dinovmf::weight_norm_backward_, "u <- u - (u.v/|v|^2) v in place; returns u.v");
  m.def("ce_cols", &dinovmf::ce_cols, "k-major student chunk [K, C] -> stats [4, n_rows]; gradient in place");
  m.def("teacher_cols", &dinovmf::teacher_cols, "k-major teacher softmax columns in place -> (lse, entropy, argmax, stat)");
  m.def("kmajor_lanes", &dinovmf::kmajor_lanes, "the lane multiple the k-major kernels need (the SIMD width)");
  m.def("cpu_isa", [] { return std::string(dinovmf::vec::isa_name()); }, "the SIMD instruction set the loops use");
}
