"""Evaluation entry points shared by `dinovmf eval` and the end of `dinovmf train`: features of a backbone
(`dinovmf.models.load_backbone`) over datasets, then kNN or a linear probe."""
from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from .features import extract_features
from .knn import knn_classify
from .linear import probe_accuracy, train_linear_probe


class UnlabelledDataError(ValueError):
    """An evaluation that needs class labels (kNN, linear probe) got images without them (label -1)."""


def dataset_features(backbone: nn.Module, path: Path, image_size: int, batch_size: int, device,
                     loader_backend: str = "auto", num_workers: int | None = None):
    """(features [N, D], labels [N]) of `backbone` over the centre-cropped images at `path`;
    UnlabelledDataError when the images have no labels (both evaluations need them)."""
    from dinovmf.data import EvalLoader

    loader = EvalLoader(path, batch_size, image_size, device, num_workers=num_workers, backend=loader_backend)
    feats, labels = extract_features(backbone, loader, device, amp=torch.device(device).type == "cuda")
    if int(labels.min()) < 0:
        raise UnlabelledDataError(f"kNN and linear evaluation need class labels, but {str(path)!r} has "
                                  f"{int((labels < 0).sum())} unlabelled image(s) (label -1: a flat folder "
                                  "rather than one sub-folder per class)")
    return feats, labels


def knn_for_backbone(backbone: nn.Module, train_path: Path, val_path: Path, image_size: int, batch_size: int,
                     device, k: int = 20, temperature: float = 0.07, **loading) -> dict:
    """Weighted kNN accuracy (percent) of `backbone`'s CLS features: train set as memory, val as queries."""
    train_x, train_y = dataset_features(backbone, train_path, image_size, batch_size, device, **loading)
    val_x, val_y = dataset_features(backbone, val_path, image_size, batch_size, device, **loading)
    return knn_classify(train_x, train_y, val_x, val_y, k=k, temperature=temperature)


def linear_for_backbone(backbone: nn.Module, train_path: Path, val_path: Path, image_size: int, batch_size: int,
                        device, weight_decay: float = 1e-4, **loading) -> dict:
    """Linear-probe accuracy (percent) on frozen CLS features of `backbone`."""
    train_x, train_y = dataset_features(backbone, train_path, image_size, batch_size, device, **loading)
    val_x, val_y = dataset_features(backbone, val_path, image_size, batch_size, device, **loading)
    num_classes = int(max(train_y.max(), val_y.max())) + 1
    probe = train_linear_probe(train_x, train_y, num_classes, weight_decay=weight_decay)
    return {"top1": probe_accuracy(probe, val_x, val_y), "train_top1": probe_accuracy(probe, train_x, train_y)}
