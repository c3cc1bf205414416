"""kNN and linear-probe evaluation against float64 oracles (explicit loops, scipy)."""
import numpy as np
import pytest
import torch
from scipy.optimize import minimize
from scipy.special import logsumexp

from dinovmf.eval import knn_classify, knn_predict, linear_probe_objective, probe_accuracy, train_linear_probe


def knn_oracle(train, train_y, test, k, T, C):
    """DINO's weighted voting, one test row at a time, in float64 numpy."""
    train = train / np.linalg.norm(train, axis=1, keepdims=True)
    test = test / np.linalg.norm(test, axis=1, keepdims=True)
    scores = np.zeros((len(test), C))
    for i, x in enumerate(test):
        sims = train @ x
        for j in np.argsort(-sims, kind="stable")[:k]:
            scores[i, train_y[j]] += np.exp(sims[j] / T)
    return scores


def clustered(n, centers, noise, gen):
    """`n` points around `centers` [C, d] with Gaussian noise, and their labels."""
    y = torch.randint(0, centers.shape[0], (n,), generator=gen)
    d = centers.shape[1]
    return centers[y] + noise * torch.randn(n, d, generator=gen, dtype=torch.float64), y


@pytest.mark.parametrize("k, T, max_elements", [(20, 0.07, 2 ** 26), (5, 0.5, 1000), (1, 0.07, 50)])
def test_knn_scores_match_oracle(k, T, max_elements):
    gen = torch.Generator().manual_seed(0)
    centers = torch.randn(7, 16, generator=gen, dtype=torch.float64)
    train, train_y = clustered(300, centers, 1.0, gen)
    test, _ = clustered(40, centers, 1.0, gen)
    ours = knn_predict(train.float(), train_y, test.float(), k, T, 7, max_elements)  # chunked when small
    ref = knn_oracle(train.numpy(), train_y.numpy(), test.numpy(), k, T, 7)
    np.testing.assert_allclose(ours.double().numpy(), ref, rtol=2e-4)


def test_knn_accuracy_matches_oracle_and_separates_clusters():
    gen = torch.Generator().manual_seed(1)
    centers = torch.randn(6, 8, generator=gen, dtype=torch.float64)
    train, train_y = clustered(400, centers, 0.3, gen)
    test, test_y = clustered(100, centers, 0.3, gen)
    acc = knn_classify(train, train_y, test, test_y)
    ref = knn_oracle(train.numpy(), train_y.numpy(), test.numpy(), 20, 0.07, 6)
    assert acc["top1"] == pytest.approx(100 * np.mean(ref.argmax(1) == test_y.numpy()))
    assert acc["top1"] > 90 and acc["top5"] >= acc["top1"]
    noise_train, noise_test = torch.randn(400, 8, generator=gen), torch.randn(100, 8, generator=gen)
    assert knn_classify(noise_train, train_y, noise_test, test_y)["top1"] < 40  # chance is ~17%


def test_knn_bad_input():
    x, y = torch.randn(10, 4), torch.zeros(10, dtype=torch.long)
    with pytest.raises(ValueError, match="dimension"):
        knn_predict(x, y, torch.randn(3, 5))
    with pytest.raises(ValueError, match="train_labels"):
        knn_predict(x, y[:5], x)
    with pytest.raises(ValueError, match="k must be"):
        knn_predict(x, y, x, k=0)
    with pytest.raises(ValueError, match="temperature"):
        knn_predict(x, y, x, temperature=0.0)


def test_linear_probe_reaches_scipy_optimum():
    gen = torch.Generator().manual_seed(2)
    x, y = clustered(200, torch.randn(3, 5, generator=gen, dtype=torch.float64), 2.0, gen)  # overlapping classes: the optimum is not at infinity
    wd = 1e-2
    probe = train_linear_probe(x, y, 3, weight_decay=wd, dtype=torch.float64)
    mean, std = probe.mean.numpy(), probe.std.numpy()
    xs, Y = (x.numpy() - mean) / std, y.numpy()

    def objective(theta):  # the same objective, in numpy, with its gradient
        W, b = theta[:15].reshape(3, 5), theta[15:]
        logits = xs @ W.T + b
        p = np.exp(logits - logsumexp(logits, axis=1, keepdims=True))
        loss = np.mean(logsumexp(logits, axis=1) - logits[np.arange(len(Y)), Y]) + 0.5 * wd * np.sum(W * W)
        p[np.arange(len(Y)), Y] -= 1
        gW = p.T @ xs / len(Y) + wd * W
        return loss, np.concatenate([gW.ravel(), p.mean(0)])

    ref = minimize(objective, np.zeros(18), jac=True, method="L-BFGS-B", options={"gtol": 1e-12, "ftol": 1e-15})
    with torch.no_grad():
        ours = linear_probe_objective(probe, x, y, wd).item()
    assert ours == pytest.approx(ref.fun, rel=1e-8)
    np.testing.assert_allclose(probe.linear.weight.detach().numpy().ravel(), ref.x[:15], atol=1e-4)
    ref_logits = xs @ ref.x[:15].reshape(3, 5).T + ref.x[15:]
    assert probe_accuracy(probe, x, y) == pytest.approx(100 * np.mean(ref_logits.argmax(1) == Y))
    assert probe_accuracy(probe, x, y) > 45  # chance is ~33%


def test_linear_probe_bad_input():
    with pytest.raises(ValueError, match="train_labels"):
        train_linear_probe(torch.randn(5, 3), torch.zeros(4, dtype=torch.long))
    with pytest.raises(ValueError, match="weight_decay"):
        train_linear_probe(torch.randn(5, 3), torch.zeros(5, dtype=torch.long), weight_decay=-1)
