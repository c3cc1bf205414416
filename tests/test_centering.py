"""Teacher distribution modes against their definitions, the teacher row reference's by-products (row
entropy, argmax, column scale, in-place output), the EMA center (also across 2 gloo ranks), and
Sinkhorn-Knopp against a literal loop."""

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from dinovmf.centering import (TeacherCenter, row_entropy, sinkhorn_reference, teacher_distribution,
                               teacher_distribution_reference, teacher_rows_reference)
from dinovmf.vmf import log_vmf_normalizer

N, K, P, TEMP = 6, 9, 8, 0.07


def _dots():
    return torch.randn(N, K, dtype=torch.float64) * 0.5


def _vmf_bias_oracle(weight_norm, temp, p):
    kappa = torch.cat([weight_norm / temp, torch.tensor([1 / temp], dtype=torch.float64)])
    log_c = log_vmf_normalizer(kappa, p)
    return log_c[:-1] - log_c[-1]


def sinkhorn_loop(scores, iterations=3):
    """DINOv2's sinkhorn_reference_teacher, literally, in numpy float64 (one process)."""
    q = np.exp(scores.numpy().astype(np.float64)).T  # [K, B]
    k, b = q.shape
    q /= q.sum()
    for _ in range(iterations):
        for i in range(k):
            q[i] /= q[i].sum() * k
        for j in range(b):
            q[:, j] /= q[:, j].sum() * b
    return torch.from_numpy((q * b).T)


@pytest.mark.parametrize("with_vmf", [False, True])
def test_modes_match_their_definitions(seed, with_vmf):
    dots = _dots()
    weight_norm = torch.rand(K, dtype=torch.float64) + 0.5 if with_vmf else None
    r = dots + (TEMP * _vmf_bias_oracle(weight_norm, TEMP, P) if with_vmf else 0)
    center_logit = torch.randn(K, dtype=torch.float64)
    center_prob = torch.rand(K, dtype=torch.float64) + 0.1

    probs, stat = teacher_distribution_reference(dots, TEMP, "logit", center_logit, weight_norm, P)
    torch.testing.assert_close(probs, torch.softmax((r - center_logit) / TEMP, dim=1))
    torch.testing.assert_close(stat, r.mean(0))

    probs, stat = teacher_distribution_reference(dots, TEMP, "prob", center_prob, weight_norm, P)
    s = torch.exp(r / TEMP) / torch.exp(r / TEMP).sum(1, keepdim=True)
    want = s / center_prob
    torch.testing.assert_close(probs, want / want.sum(1, keepdim=True))
    torch.testing.assert_close(stat, s.mean(0))

    probs, stat = teacher_distribution_reference(dots, TEMP, "none", None, weight_norm, P)
    torch.testing.assert_close(probs, torch.softmax(r / TEMP, dim=1))
    assert stat is None

    probs, stat = teacher_distribution_reference(dots, TEMP, "sinkhorn", None, weight_norm, P)
    torch.testing.assert_close(probs, sinkhorn_loop(r / TEMP))
    assert stat is None


def test_float32_dots_give_float32_probs(seed):
    probs, stat = teacher_distribution_reference(_dots().float(), TEMP, "logit", torch.zeros(K))
    assert probs.dtype == torch.float32 and stat.dtype == torch.float32
    torch.testing.assert_close(probs.sum(1), torch.ones(N))


def test_sinkhorn_balances_columns_and_survives_large_scores(seed):
    scores = torch.randn(64, 8, dtype=torch.float64) * 3 + 900.0  # exp(900) overflows without the shift
    q = sinkhorn_reference(scores, iterations=50)
    assert torch.isfinite(q).all()
    torch.testing.assert_close(q.sum(1), torch.ones(64, dtype=torch.float64))
    torch.testing.assert_close(q.sum(0), torch.full((8,), 64 / 8, dtype=torch.float64), rtol=1e-3, atol=0)


def test_dispatch_and_bad_arguments(seed):
    dots = _dots()
    got = teacher_distribution(dots, TEMP, "logit", torch.zeros(K, dtype=torch.float64), backend="torch")
    torch.testing.assert_close(got[0], torch.softmax(dots / TEMP, 1))
    with pytest.raises(ValueError, match="mode"):
        teacher_distribution_reference(dots, TEMP, "softmax")
    with pytest.raises(ValueError, match="center"):
        teacher_distribution_reference(dots, TEMP, "logit")
    with pytest.raises(ValueError, match="center"):
        teacher_distribution_reference(dots, TEMP, "prob", torch.ones(K + 1))
    with pytest.raises(ValueError, match="temp"):
        teacher_distribution_reference(dots, 0.0, "none")
    with pytest.raises(ValueError, match="p "):
        teacher_distribution_reference(dots, TEMP, "none", weight_norm=torch.ones(K, dtype=torch.float64))
    with pytest.raises(ValueError, match="weight_norm"):
        teacher_distribution_reference(dots, TEMP, "none", weight_norm=torch.ones(K + 1), p=P)
    with pytest.raises(ValueError, match="dots"):
        teacher_distribution_reference(dots.long(), TEMP, "none")


@pytest.mark.parametrize("mode, init", [("logit", 0.0), ("prob", 1.0 / K)])
def test_teacher_center_ema(seed, mode, init):
    center = TeacherCenter(K, mode, momentum=0.8, backend="torch")
    torch.testing.assert_close(center.center, torch.full((K,), init))
    expected = center.center.clone()
    for _ in range(3):
        dots = _dots().float()
        probs = center(dots, TEMP)
        want_probs, stat = teacher_distribution_reference(dots, TEMP, mode, expected)
        torch.testing.assert_close(probs, want_probs)
        center.update()
        expected = 0.8 * expected + 0.2 * stat
        torch.testing.assert_close(center.center, expected)
    center.update(torch.ones(K))
    torch.testing.assert_close(center.center, 0.8 * expected + 0.2)
    with pytest.raises(RuntimeError, match="forward"):
        center.update()


def test_stateless_modes_and_bad_center_args():
    center = TeacherCenter(K, "sinkhorn")
    center(_dots(), TEMP)
    before = center.center.clone()
    center.update()
    torch.testing.assert_close(center.center, before)
    with pytest.raises(ValueError, match="mode"):
        TeacherCenter(K, "mean")
    with pytest.raises(ValueError, match="momentum"):
        TeacherCenter(K, "logit", momentum=1.5)


@pytest.mark.parametrize("mode", ["logit", "prob", "none", "sinkhorn"])
def test_teacher_rows_reference_col_scale_and_by_products(seed, mode):
    """r = dots * col_scale + temp * bias; row entropy and argmax are those of the output rows."""
    dots = _dots()
    col_scale = torch.rand(K, dtype=torch.float64) + 0.5
    bias = torch.randn(K, dtype=torch.float64) * 0.3
    center = {"logit": torch.randn(K, dtype=torch.float64), "prob": torch.rand(K, dtype=torch.float64) + 0.1}.get(mode)
    probs, stat, entropy, argmax = teacher_rows_reference(dots, TEMP, mode, center, col_scale, bias)
    # the same distribution from the raw scores written out by hand
    want_probs, want_stat = teacher_distribution_reference(dots * col_scale + TEMP * bias, TEMP, mode, center)
    torch.testing.assert_close(probs, want_probs)
    if want_stat is None:
        assert stat is None
    else:
        torch.testing.assert_close(stat, want_stat)
    want_entropy = torch.tensor([-sum(float(q) * np.log(float(q)) for q in row if q > 0) for row in probs],
                                dtype=torch.float64)
    torch.testing.assert_close(entropy, want_entropy)
    assert argmax.tolist() == [int(np.argmax(row.numpy())) for row in probs]  # numpy: first maximum


def test_teacher_rows_reference_writes_in_place_and_breaks_ties_low():
    dots = torch.zeros(2, K)
    dots[1, 3] = dots[1, 5] = 1.0  # a tie between columns 3 and 5
    out = dots  # in place over the dots
    probs, _, entropy, argmax = teacher_rows_reference(dots, TEMP, "none", out=out)
    assert probs.data_ptr() == dots.data_ptr()
    torch.testing.assert_close(dots[0], torch.full((K,), 1.0 / K))
    assert argmax.tolist() == [0, 3]
    torch.testing.assert_close(entropy[0], torch.tensor(float(np.log(K))))
    torch.testing.assert_close(row_entropy(torch.tensor([[0.5, 0.5, 0.0]])), torch.tensor([float(np.log(2))]))


# ---------------------------------------------------------------------------------------------------
# Two ranks (gloo on CPU): the statistic and Sinkhorn's sums are global.
# ---------------------------------------------------------------------------------------------------
def _global_batch():
    g = torch.Generator().manual_seed(1)
    return torch.randn(2 * N, K, generator=g)


def _rank_worker(rank, world, out_dir):
    # A file store: no port to probe and then lose to another process before binding it.
    dist.init_process_group("gloo", init_method=f"file://{out_dir}/store", rank=rank, world_size=world)
    try:
        local = _global_batch().chunk(world)[rank]
        results = {}
        for mode in ("logit", "prob"):
            center = TeacherCenter(K, mode, momentum=0.9, backend="torch")
            results[f"{mode}_probs"] = center(local, TEMP)
            center.update()
            results[f"{mode}_center"] = center.center.clone()
        results["sinkhorn"] = teacher_distribution_reference(local, TEMP, "sinkhorn")[0]
        torch.save(results, f"{out_dir}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_two_ranks_share_center_and_sinkhorn(tmp_path):
    mp.spawn(_rank_worker, args=(2, str(tmp_path)), nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    full = _global_batch()
    for mode in ("logit", "prob"):
        _, global_stat = teacher_distribution_reference(full, TEMP, mode, TeacherCenter(K, mode).center)
        want = 0.9 * TeacherCenter(K, mode).center + 0.1 * global_stat
        for r in ranks:
            torch.testing.assert_close(r[f"{mode}_center"], want)
    torch.testing.assert_close(torch.cat([r["sinkhorn"] for r in ranks]),
                               teacher_distribution_reference(full, TEMP, "sinkhorn")[0])
    # Sanity: a rank on its own would not have produced the global plan.
    alone = teacher_distribution_reference(full.chunk(2)[0], TEMP, "sinkhorn")[0]
    assert not torch.allclose(alone, ranks[0]["sinkhorn"], atol=1e-4)
