"""Weighted k-nearest-neighbour classification of frozen features (DINO's protocol).

For each test feature: cosine similarity to every train feature (both L2-normalised), the k most
similar, each votes for its class with weight exp(sim / T), the class with the largest total wins.
DINO's defaults are k = 20, T = 0.07.

Memory-bounded: test rows are processed in chunks of at most `max_elements // n_train` rows, so the
similarity block never exceeds `max_elements` entries, whatever the size of the train set.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def _check(train_feats, train_labels, test_feats, k, temperature):
    if train_feats.ndim != 2 or test_feats.ndim != 2:
        raise ValueError(f"features must be 2-D [N, D], got train {tuple(train_feats.shape)} and "
                         f"test {tuple(test_feats.shape)}")
    if train_feats.shape[1] != test_feats.shape[1]:
        raise ValueError(f"train and test features differ in dimension: {train_feats.shape[1]} vs "
                         f"{test_feats.shape[1]}")
    if train_labels.shape != (train_feats.shape[0],):
        raise ValueError(f"train_labels must have shape [{train_feats.shape[0]}], got {tuple(train_labels.shape)}")
    if train_labels.numel() and int(train_labels.min()) < 0:
        raise ValueError("train_labels must be class indices >= 0 (-1 marks an unlabelled image)")
    if not 1 <= k:
        raise ValueError(f"k must be >= 1, got {k}")
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")


@torch.no_grad()
def knn_predict(train_feats: torch.Tensor, train_labels: torch.Tensor, test_feats: torch.Tensor,
                k: int = 20, temperature: float = 0.07, num_classes: int | None = None,
                max_elements: int = 2 ** 26) -> torch.Tensor:
    """Class scores [N_test, C] of weighted kNN voting (argmax is the prediction)."""
    _check(train_feats, train_labels, test_feats, k, temperature)
    k = min(k, train_feats.shape[0])
    if num_classes is None:
        num_classes = int(train_labels.max()) + 1
    train = F.normalize(train_feats.float(), dim=1)
    test = F.normalize(test_feats.float(), dim=1)
    labels = train_labels.to(train.device).long()
    chunk = max(1, max_elements // train.shape[0])
    scores = []
    for start in range(0, test.shape[0], chunk):
        sims = test[start:start + chunk] @ train.T                     # [c, N_train]
        top_sims, top_idx = sims.topk(k, dim=1)                          # [c, k]
        weights = (top_sims / temperature).exp()
        votes = torch.zeros(top_idx.shape[0], num_classes, device=train.device)
        votes.scatter_add_(1, labels[top_idx], weights)
        scores.append(votes)
    return torch.cat(scores)


@torch.no_grad()
def knn_classify(train_feats: torch.Tensor, train_labels: torch.Tensor, test_feats: torch.Tensor,
                 test_labels: torch.Tensor, k: int = 20, temperature: float = 0.07,
                 max_elements: int = 2 ** 26) -> dict:
    """Top-1 (and top-5 when there are >= 5 classes) accuracy in percent of weighted kNN."""
    if test_labels.shape != (test_feats.shape[0],):
        raise ValueError(f"test_labels must have shape [{test_feats.shape[0]}], got {tuple(test_labels.shape)}")
    num_classes = int(max(train_labels.max(), test_labels.max())) + 1
    scores = knn_predict(train_feats, train_labels, test_feats, k, temperature, num_classes, max_elements)
    target = test_labels.to(scores.device).long()
    result = {"top1": 100.0 * (scores.argmax(1) == target).float().mean().item()}
    if num_classes >= 5:
        top5 = scores.topk(5, dim=1).indices
        result["top5"] = 100.0 * (top5 == target[:, None]).any(1).float().mean().item()
    return result
