// k-major ("column") CPU kernels of the fused head-to-loss op: the student chunk's logits and the teacher's
// dots stored transposed, [K, C] with one lane per row. MKL's sgemm writes z @ W^T faster as W @ z^T (the
// [K, C] layout) at DINO's head (docs/DESIGN.md §2), and a transpose costs what that saves, so the CPU op
// keeps these matrices k-major
// and its three other GEMMs read them as they are (dinovmf/head_loss.py). Same maths as the row-major
// `ce_rows` / `teacher_rows` (dino_loss_cpu.cpp; docs/INTERFACES.md): per row a softmax over K.
//
// Work is split over tiles of kb prototypes (kb x C floats stay in L2 between a tile's two sweeps), each
// tile writing per-lane partial results (its max, sums); the host merges them per lane in tile order
// (double), then a second parallel pass over the tiles writes the gradient or the probabilities. Every
// [K] output belongs to one tile, so results do not depend on the thread count or scheduling.
// Lanes are vectorised: C must be a multiple of `kmajor_lanes()` (the caller pads with zero rows; lanes
// from n_rows on are padding, given weight 0).
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <vector>

#include "cpu_loss_common.h"
#include "cpu_vec_math.h"

namespace dinovmf {
namespace {

// Rows of a tile: about 128 KiB of the [K, C] matrix.
int64_t tile_rows(int64_t K, int64_t C) { return std::max<int64_t>(16, std::min<int64_t>(K, 32768 / C)); }

// fn(t, k0, n) for every tile t of kb rows (k0 .. k0 + n - 1) of K, in parallel, denormals flushed.
template <typename F>
void for_each_tile(int64_t K, int64_t kb, const F& fn) {
  at::parallel_for(0, (K + kb - 1) / kb, 1, [&](int64_t t0, int64_t t1) {
    FlushDenormals ftz;
    for (int64_t t = t0; t < t1; ++t) fn(t, t * kb, std::min(kb, K - t * kb));
  });
}

void check_kmajor(const at::Tensor& x, const char* name) {
  check_cpu_contiguous(x, name);
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kFloat, name, " must be a float32 [K, C] tensor");
  TORCH_CHECK(x.size(1) % vec::lanes() == 0, name, " must have a multiple of ", vec::lanes(), " columns, got ",
              x.size(1));
}

// The teacher columns each lane's pbar sums (see vec::pbar_vec): src [n_vec, n_terms], idx [n_vec, n_terms, W].
struct Pairing {
  int64_t n_terms;
  std::vector<int32_t> src, idx;
};

Pairing pairing(int64_t C, int64_t row0, int64_t n_rows, int64_t B, int64_t T, bool same_view, int64_t n_teacher) {
  const int64_t W = vec::lanes(), n_vec = C / W;
  Pairing p;
  p.n_terms = same_view ? 1 : T;
  p.src.assign(n_vec * p.n_terms, -2);
  p.idx.assign(n_vec * p.n_terms * W, -1);
  for (int64_t v = 0; v < n_vec; ++v) {
    for (int64_t j = 0; j < p.n_terms; ++j) {
      int32_t* col = p.idx.data() + (v * p.n_terms + j) * W;
      for (int64_t l = 0; l < W; ++l) {
        const int64_t i = v * W + l, r = row0 + i;
        if (i >= n_rows) continue;
        if (same_view) {
          TORCH_CHECK(r < n_teacher, "row ", r, " has no teacher row (", n_teacher, " teacher rows)");
          col[l] = static_cast<int32_t>(r);
        } else if (r / B != j) {  // teacher view j pairs with every student view but its own
          col[l] = static_cast<int32_t>(j * B + r % B);
        }
      }
      bool any = false, consecutive = true;
      for (int64_t l = 0; l < W; ++l) {
        any = any || col[l] >= 0;
        consecutive = consecutive && col[l] >= 0 && col[l] == col[0] + l;
      }
      p.src[v * p.n_terms + j] = !any ? -2 : consecutive ? col[0] : -1;
    }
  }
  return p;
}

}  // namespace

int64_t kmajor_lanes() { return vec::lanes(); }

// Student chunk, k-major: logits_t [K, C] holds raw = z @ v^T transposed for student rows row0 .. row0 +
// n_rows - 1 (view-major: row s B + b); l = raw * col_scale + bias. teacher_probs_t [K, ldp]: the teacher
// probabilities, k-major (column t B + b: teacher view t of image b). Returns stats [4, n_rows] (loss_row,
// lse, psum, sum_k softmax_k l_k, as ce_rows). logits_t is overwritten: with G * col_scale when write_grad
// (G = (psum softmax - pbar) * grad_scale * row_weight), and col_grad_sum += G's column sums.
at::Tensor ce_cols(at::Tensor& logits_t, const c10::optional<at::Tensor>& col_scale,
                   const c10::optional<at::Tensor>& bias, const at::Tensor& teacher_probs_t, int64_t row0,
                   int64_t n_rows, int64_t B, int64_t T, bool same_view, const c10::optional<at::Tensor>& row_weight,
                   double grad_scale, bool write_grad, const c10::optional<at::Tensor>& col_grad_sum) {
  check_kmajor(logits_t, "logits_t");
  check_cpu_contiguous(teacher_probs_t, "teacher_probs_t");
  const int64_t K = logits_t.size(0), C = logits_t.size(1);
  TORCH_CHECK(teacher_probs_t.dim() == 2 && teacher_probs_t.size(0) == K && teacher_probs_t.scalar_type() == at::kFloat,
              "teacher_probs_t must be float32 [K, Nt]");
  TORCH_CHECK(n_rows >= 1 && n_rows <= C && row0 >= 0, "n_rows must be in [1, C] and row0 >= 0");
  TORCH_CHECK(same_view || (B >= 1 && T >= 1 && T * B <= teacher_probs_t.size(1)), "the teacher has no T*B columns");
  const float* cs = optional_vector(col_scale, K, "col_scale");
  const float* bs = optional_vector(bias, K, "bias");
  const float* rw = optional_vector(row_weight, n_rows, "row_weight");
  float* cgs = optional_vector(col_grad_sum, K, "col_grad_sum");
  const Pairing pair = pairing(C, row0, n_rows, B, T, same_view, teacher_probs_t.size(1));
  const int64_t ldp = teacher_probs_t.size(1), kb = tile_rows(K, C), n_tiles = (K + kb - 1) / kb;
  float* L = logits_t.data_ptr<float>();
  const float* P = teacher_probs_t.data_ptr<float>();
  std::vector<float> tm(n_tiles * C), tse(n_tiles * C), tsel(n_tiles * C), tdot(n_tiles * C), tps(n_tiles * C);
  for_each_tile(K, kb, [&](int64_t t, int64_t k0, int64_t n) {
    vec::ce_cols_fwd_tile(L + k0 * C, n, C, cs ? cs + k0 : nullptr, bs ? bs + k0 : nullptr, P + k0 * ldp, ldp,
                          pair.src.data(), pair.idx.data(), pair.n_terms, tm.data() + t * C, tse.data() + t * C,
                          tsel.data() + t * C, tdot.data() + t * C, tps.data() + t * C);
  });
  auto stats = at::empty({4, n_rows}, logits_t.options());
  float* st = stats.data_ptr<float>();
  std::vector<float> f(write_grad ? n_tiles * C : 0, 0.f), s(C, 0.f);
  for (int64_t i = 0; i < n_rows; ++i) {  // merge the tiles of each lane, in tile order
    const MergedTiles merged = merge_tiles(tm.data() + i, tse.data() + i, tsel.data() + i, n_tiles, C);
    const double m = merged.m, se = merged.se, shifted = merged.shifted;
    double dot = 0, psum = 0;
    for (int64_t t = 0; t < n_tiles; ++t) {
      dot += tdot[t * C + i];
      psum += tps[t * C + i];
    }
    const double lse = m + std::log(se), entropy = std::log(se) - shifted / se;
    st[i] = static_cast<float>(psum * lse - dot);
    st[n_rows + i] = static_cast<float>(lse);
    st[2 * n_rows + i] = static_cast<float>(psum);
    st[3 * n_rows + i] = static_cast<float>(lse - entropy);
    if (!write_grad) continue;
    for (int64_t t = 0; t < n_tiles; ++t) f[t * C + i] = static_cast<float>(psum * std::exp(tm[t * C + i] - m) / se);
    s[i] = static_cast<float>(grad_scale) * (rw ? rw[i] : 1.f);
  }
  if (!write_grad) return stats;
  for_each_tile(K, kb, [&](int64_t t, int64_t k0, int64_t n) {
    vec::ce_cols_grad_tile(L + k0 * C, n, C, cs ? cs + k0 : nullptr, P + k0 * ldp, ldp, pair.src.data(),
                           pair.idx.data(), pair.n_terms, f.data() + t * C, s.data(), cgs ? cgs + k0 : nullptr);
  });
  return stats;
}

// Teacher, k-major: dots_t [K, C] (lanes from n_rows on are padding) becomes the softmax over k of
// y = dots * col_a + col_b for each lane, in place. Returns {row_lse [n_rows], row_entropy [n_rows],
// row_argmax [n_rows] int64 (the first maximum of y), stat [K] (stat_kind 1: mean over rows of y; 2: mean
// over rows of normalise(softmax(y) * stat_weight); 0: empty)}, as teacher_rows.
std::vector<at::Tensor> teacher_cols(at::Tensor& dots_t, int64_t n_rows, const at::Tensor& col_a,
                                     const at::Tensor& col_b, int64_t stat_kind,
                                     const c10::optional<at::Tensor>& stat_weight) {
  check_kmajor(dots_t, "dots_t");
  const int64_t K = dots_t.size(0), C = dots_t.size(1);
  TORCH_CHECK(n_rows >= 1 && n_rows <= C, "n_rows must be in [1, C]");
  TORCH_CHECK(stat_kind >= 0 && stat_kind <= 2, "stat_kind must be 0..2, got ", stat_kind);
  const float* a = optional_vector(col_a, K, "col_a");
  const float* b = optional_vector(col_b, K, "col_b");
  TORCH_CHECK(a && b, "col_a and col_b are required");
  const float* w = optional_vector(stat_weight, K, "stat_weight");
  TORCH_CHECK(stat_kind != 2 || w, "stat_kind 2 needs stat_weight");
  const int64_t kb = tile_rows(K, C), n_tiles = (K + kb - 1) / kb;
  const float inv_n = 1.f / static_cast<float>(n_rows);
  float* D = dots_t.data_ptr<float>();
  std::vector<float> mask(C, 0.f), tm(n_tiles * C), targ(n_tiles * C), tse(n_tiles * C), tsey(n_tiles * C),
      tsew(n_tiles * C), ysum(stat_kind == 1 ? K : 0);
  std::fill(mask.begin(), mask.begin() + n_rows, 1.f);
  for_each_tile(K, kb, [&](int64_t t, int64_t k0, int64_t n) {
    vec::teacher_cols_fwd_tile(D + k0 * C, n, C, a + k0, b + k0, stat_kind == 2 ? w + k0 : nullptr, mask.data(),
                               stat_kind == 1 ? ysum.data() + k0 : nullptr, tm.data() + t * C, targ.data() + t * C,
                               tse.data() + t * C, tsey.data() + t * C, tsew.data() + t * C);
  });
  auto f32 = dots_t.options();
  at::Tensor lse = at::empty({n_rows}, f32), entropy = at::empty({n_rows}, f32),
             argmax = at::empty({n_rows}, f32.dtype(at::kLong)), stat;
  float *lp = lse.data_ptr<float>(), *ep = entropy.data_ptr<float>();
  int64_t* ap = argmax.data_ptr<int64_t>();
  std::vector<float> f(n_tiles * C, 0.f), r(C, 0.f);
  for (int64_t i = 0; i < n_rows; ++i) {  // merge the tiles of each lane, in tile order
    const MergedTiles merged = merge_tiles(tm.data() + i, tse.data() + i, tsey.data() + i, n_tiles, C);
    const double m = merged.m, se = merged.se;
    int64_t t_best = 0;  // the first tile holding the maximum
    while (t_best + 1 < n_tiles && tm[t_best * C + i] != m) ++t_best;
    lp[i] = static_cast<float>(m + std::log(se));
    ep[i] = static_cast<float>(std::log(se) - merged.shifted / se);
    ap[i] = t_best * kb + static_cast<int64_t>(targ[t_best * C + i]);
    double sew = 0;
    for (int64_t t = 0; t < n_tiles; ++t) {
      const double rescale = std::exp(tm[t * C + i] - m);  // the tile's sums to the lane max
      f[t * C + i] = static_cast<float>(rescale / se);
      sew += rescale * tsew[t * C + i];
    }
    if (stat_kind == 2) r[i] = static_cast<float>(se / sew);
  }
  std::vector<float> wsum(stat_kind == 2 ? K : 0);
  for_each_tile(K, kb, [&](int64_t t, int64_t k0, int64_t n) {
    vec::teacher_cols_finish_tile(D + k0 * C, n, C, f.data() + t * C, stat_kind == 2 ? w + k0 : nullptr, r.data(),
                                  stat_kind == 2 ? wsum.data() + k0 : nullptr);
  });
  if (stat_kind != 0) {
    stat = at::empty({K}, f32);
    float* sp = stat.data_ptr<float>();
    const std::vector<float>& acc = stat_kind == 1 ? ysum : wsum;
    for (int64_t k = 0; k < K; ++k) sp[k] = acc[k] * inv_n;
  }
  return {lse, entropy, argmax, stat};
}

}  // namespace dinovmf
