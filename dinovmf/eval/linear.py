"""Linear probe on frozen features: multinomial logistic regression with L2 weight decay.

The features are standardised with the train set's mean and std (kept in the probe, so the same
transform applies at test time), then a linear layer is trained with full-batch L-BFGS on the
strongly convex objective `mean CE + weight_decay/2 ||W||^2`: it converges to the unique optimum,
which the tests compare against scipy's solution of the same objective.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class LinearProbe(nn.Module):
    """Standardise, then one linear layer: logits = ((x - mean) / std) @ W.T + b."""

    def __init__(self, mean: torch.Tensor, std: torch.Tensor, num_classes: int):
        super().__init__()
        self.register_buffer("mean", mean)
        self.register_buffer("std", std)
        self.linear = nn.Linear(mean.shape[0], num_classes)
        nn.init.zeros_(self.linear.weight)
        nn.init.zeros_(self.linear.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear((x.to(self.mean.dtype) - self.mean) / self.std)


def linear_probe_objective(probe: LinearProbe, x: torch.Tensor, y: torch.Tensor,
                           weight_decay: float) -> torch.Tensor:
    """mean cross-entropy + weight_decay / 2 * ||W||^2 (the bias is not decayed)."""
    return F.cross_entropy(probe(x), y) + 0.5 * weight_decay * probe.linear.weight.pow(2).sum()


def train_linear_probe(train_feats: torch.Tensor, train_labels: torch.Tensor, num_classes: int | None = None,
                       weight_decay: float = 1e-4, max_iter: int = 500, tol: float = 1e-9,
                       dtype: torch.dtype = torch.float32) -> LinearProbe:
    """Fit a `LinearProbe` to (features, labels) with L-BFGS; returns it in eval mode."""
    if train_feats.ndim != 2:
        raise ValueError(f"train_feats must be 2-D [N, D], got shape {tuple(train_feats.shape)}")
    if train_labels.shape != (train_feats.shape[0],):
        raise ValueError(f"train_labels must have shape [{train_feats.shape[0]}], got {tuple(train_labels.shape)}")
    if weight_decay < 0:
        raise ValueError(f"weight_decay must be >= 0, got {weight_decay}")
    x = train_feats.to(dtype)
    y = train_labels.long()
    if num_classes is None:
        num_classes = int(y.max()) + 1
    # Constant feature columns have std 0; dividing by 1 there keeps them at 0 after centring.
    std = x.std(0)
    std = torch.where(std > 1e-12, std, torch.ones_like(std))
    probe = LinearProbe(x.mean(0), std, num_classes).to(dtype)
    opt = torch.optim.LBFGS(probe.parameters(), lr=1.0, max_iter=max_iter, tolerance_grad=tol,
                            tolerance_change=tol, history_size=20, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = linear_probe_objective(probe, x, y, weight_decay)
        loss.backward()
        return loss

    opt.step(closure)
    return probe.eval()


@torch.no_grad()
def probe_accuracy(probe: LinearProbe, feats: torch.Tensor, labels: torch.Tensor) -> float:
    """Top-1 accuracy in percent."""
    return 100.0 * (probe(feats).argmax(1) == labels.long()).float().mean().item()
