"""dinovmf.optim.clip_gradients: the global-norm clip of torch.nn.utils.clip_grad_norm_, without the pass over
the gradients when the factor is 1 (CPU)."""
import pytest
import torch

from dinovmf.optim import clip_gradients


def _params(scale: float):
    gen = torch.Generator().manual_seed(0)
    params = [torch.nn.Parameter(torch.zeros(s)) for s in ((7, 3), (5,), (2, 2, 2))]
    for p in params:
        p.grad = torch.randn(p.shape, generator=gen) * scale
    params.append(torch.nn.Parameter(torch.zeros(3)))  # no gradient: ignored
    return params


@pytest.mark.parametrize("scale", [0.01, 10.0])
def test_clip_gradients_matches_torch(scale):
    ours, ref = _params(scale), _params(scale)
    total = clip_gradients(ours, max_norm=3.0)
    ref_total = torch.nn.utils.clip_grad_norm_([p for p in ref if p.grad is not None], max_norm=3.0)
    assert torch.equal(total, ref_total)
    for a, b in zip(ours, ref):
        assert (a.grad is None and b.grad is None) or torch.equal(a.grad, b.grad)
    clipped = torch.linalg.vector_norm(torch.cat([p.grad.flatten() for p in ours if p.grad is not None]))
    assert float(clipped) == pytest.approx(min(3.0, float(total)), rel=1e-5)


def test_no_pass_over_the_gradients_when_nothing_is_clipped(monkeypatch):
    calls = []
    real = torch.nn.utils.clip_grads_with_norm_
    monkeypatch.setattr(torch.nn.utils, "clip_grads_with_norm_", lambda *a, **k: calls.append(1) or real(*a, **k))
    small = _params(0.01)
    before = [p.grad.clone() for p in small if p.grad is not None]
    clip_gradients(small, max_norm=3.0)
    assert not calls and all(torch.equal(a, p.grad) for a, p in zip(before, small))
    clip_gradients(_params(10.0), max_norm=3.0)
    assert calls == [1]
