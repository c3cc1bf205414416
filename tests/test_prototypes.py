"""KoLeo-proto and the utilisation metrics against brute-force small-K implementations."""
import itertools

import pytest
import torch
import torch.nn.functional as F

from dinovmf.prototypes import (KOLEO_EPS, koleo_proto_loss, nearest_neighbours, prototype_utilisation,
                                used_prototypes)


def koleo_brute(weight):
    mu = F.normalize(weight.double(), dim=1)
    k = mu.shape[0]
    total = 0.0
    for i in range(k):
        nearest = min(torch.linalg.vector_norm(mu[i] - mu[j]) for j in range(k) if j != i)
        total = total + torch.log(nearest + KOLEO_EPS)
    return -total / k


def utilisation_brute(weight, eps):
    """Greedy merge, literally: visit prototypes in order; an unclaimed one claims all within eps."""
    mu = F.normalize(weight.double(), dim=1)
    k = mu.shape[0]
    owner = [None] * k
    reps = 0
    for i in range(k):
        if owner[i] is None:
            reps += 1
            for j in range(k):
                if owner[j] is None and 1 - float(mu[i] @ mu[j]) <= eps:
                    owner[j] = i
            owner[i] = i
    return reps


def _collapsed_prototypes(n_groups=5, per_group=7, p=6, spread=1e-3):
    """Groups of near-identical prototypes (partial collapse), shuffled, with varying norms."""
    centres = F.normalize(torch.randn(n_groups, p, dtype=torch.float64), dim=1)
    w = centres.repeat_interleave(per_group, 0) + spread * torch.randn(n_groups * per_group, p, dtype=torch.float64)
    w = w * (torch.rand(len(w), 1, dtype=torch.float64) + 0.5)
    return w[torch.randperm(len(w))]


@pytest.mark.parametrize("chunk_size", [None, 1, 4, 7])
def test_koleo_matches_brute_force_any_chunking(seed, chunk_size):
    w = torch.randn(23, 5, dtype=torch.float64, requires_grad=True)
    got = koleo_proto_loss(w, chunk_size=chunk_size)
    want = koleo_brute(w)
    torch.testing.assert_close(got, want)
    g_got, = torch.autograd.grad(got, w)
    g_want, = torch.autograd.grad(want, w)
    torch.testing.assert_close(g_got, g_want)


def test_koleo_gradcheck_and_collapse_raises_it(seed):
    w = torch.randn(9, 4, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(koleo_proto_loss, (w,))
    spread = koleo_proto_loss(F.normalize(torch.randn(40, 4, dtype=torch.float64), dim=1))
    assert koleo_proto_loss(_collapsed_prototypes(p=4)) > spread + 1  # near-duplicates are penalised


def test_koleo_exact_duplicates_stay_finite():
    w = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]], requires_grad=True)
    loss = koleo_proto_loss(w)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(w.grad).all()


def test_nearest_neighbours_chunked(seed):
    mu = F.normalize(torch.randn(17, 3), dim=1)
    sim = mu @ mu.T
    sim.fill_diagonal_(-2)
    for chunk in (1, 5, 17, 100):
        assert torch.equal(nearest_neighbours(mu, chunk), sim.argmax(1))


@pytest.mark.parametrize("eps", [0.0, 1e-4, 0.05, 0.5, 1.2])
@pytest.mark.parametrize("chunk_size", [None, 1, 6])
def test_utilisation_matches_greedy_brute_force(seed, eps, chunk_size):
    w = torch.cat([_collapsed_prototypes(), torch.randn(8, 6, dtype=torch.float64)])
    assert prototype_utilisation(w, eps, chunk_size=chunk_size) == utilisation_brute(w, eps)


def test_utilisation_counts_collapsed_groups(seed):
    w = _collapsed_prototypes(n_groups=5, per_group=7)
    assert prototype_utilisation(w, 1e-3) == 5
    assert prototype_utilisation(w, 0.0) == 35  # eps = 0: only exact duplicates merge
    assert prototype_utilisation(w.float(), 1e-3) == 5


def test_used_prototypes_counts_argmax_winners(seed):
    probs = torch.softmax(torch.randn(50, 12), dim=1)
    winners = {int(i) for i in probs.argmax(1)}
    assert used_prototypes(probs) == len(winners)
    assert used_prototypes(probs.log()) == len(winners)  # logits work as well as probabilities
    assert used_prototypes(probs.view(5, 10, 12)) == len(winners)
    one_hot = torch.eye(12)[[3, 3, 7]]
    assert used_prototypes(one_hot) == 2


@pytest.mark.parametrize("fn, args, name", [
    (koleo_proto_loss, (torch.randn(1, 4),), "weight"),
    (koleo_proto_loss, (torch.randn(4),), "weight"),
    (koleo_proto_loss, (torch.ones(3, 4, dtype=torch.long),), "weight"),
    (prototype_utilisation, (torch.randn(3, 4), -0.1), "eps"),
    (prototype_utilisation, (torch.randn(3, 4), 0.1, 0), "chunk_size"),
    (used_prototypes, (torch.zeros(3, 0),), "probs_or_logits"),
])
def test_bad_arguments(fn, args, name):
    with pytest.raises(ValueError, match=name):
        fn(*args)


def test_brute_force_helpers_agree_on_a_hand_example():
    # Three prototypes: two 0.01 rad apart (cos distance 5e-5), one orthogonal.
    w = torch.tensor([[1.0, 0.0], [0.99995, 0.0099998], [0.0, 2.0]], dtype=torch.float64)
    assert utilisation_brute(w, 1e-4) == 2 == prototype_utilisation(w, 1e-4)
    assert utilisation_brute(w, 1e-5) == 3 == prototype_utilisation(w, 1e-5)
    d = [float(torch.linalg.vector_norm(F.normalize(w[a], dim=0) - F.normalize(w[b], dim=0)))
         for a, b in itertools.permutations(range(3), 2)]
    assert min(d) == pytest.approx(0.01, rel=1e-3)
