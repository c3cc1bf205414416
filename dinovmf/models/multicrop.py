"""Multi-crop forward: backbone + head over 2 global and N local crops in as few calls as possible.

As DINO does, consecutive crops of the same resolution are concatenated along the
batch and run through the backbone in one call, so 2 x 224 + 10 x 96 costs two backbone calls; the
CLS features of all crops then go through the head in one call.

Outputs are view-major (row v * B + b is view v of image b), the order the loss expects.
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from .head import DINOHead
from .vit import VisionTransformer


def resolution_groups(crops: Sequence[torch.Tensor]) -> list[tuple[int, int]]:
    """[start, end) index ranges of consecutive crops with equal spatial size."""
    groups: list[tuple[int, int]] = []
    start = 0
    for i in range(1, len(crops) + 1):
        if i == len(crops) or crops[i].shape[-2:] != crops[start].shape[-2:]:
            groups.append((start, i))
            start = i
    return groups


class MultiCropWrapper(nn.Module):
    """Student / teacher network: `backbone` (a VisionTransformer) + `head` (a DINOHead).

    `patch_head` maps patch tokens for iBOT; None means the CLS head is shared for patches too.
    The global crops are the leading crops of the first resolution group (the loader puts them
    first); masks and patch outputs concern them only.
    """

    def __init__(self, backbone: VisionTransformer, head: DINOHead,
                 patch_head: DINOHead | None = None):
        super().__init__()
        self.backbone = backbone
        self.head = head
        # Registering the same module twice would duplicate its state_dict keys; keep a shared head
        # out of the module tree.
        if patch_head is head:
            patch_head = None
        self.patch_head = patch_head

    def forward(self, crops: torch.Tensor | Sequence[torch.Tensor],
                masks: torch.Tensor | Sequence[torch.Tensor] | None = None,
                return_patches: bool = False) -> dict[str, torch.Tensor]:
        """crops: list of [B,3,H,W] (global first) -> {"z": [V*B,p], "cls": [V*B,D]} view-major;
        with `return_patches`: "patch" [G*B,n,D] and "patch_z" [G*B,n,p] of the G global crops.

        `masks`: for the global crops only, a list of G bool [B, n] tensors or one [G*B, n] tensor
        (view-major); masked patches are replaced by the backbone's mask token.
        """
        if isinstance(crops, torch.Tensor):
            crops = [crops]
        crops = list(crops)
        if not crops:
            raise ValueError("crops must be a non-empty list of [B,3,H,W] tensors")
        B = crops[0].shape[0]
        if any(c.ndim != 4 or c.shape[0] != B for c in crops):
            raise ValueError("crops must all be [B,3,H,W] with the same B, got "
                             f"{[tuple(c.shape) for c in crops]}")
        groups = resolution_groups(crops)
        n_global = groups[0][1]
        global_masks = self._split_masks(masks, n_global, B)

        cls_parts, patch = [], None
        for gi, (start, end) in enumerate(groups):
            group_masks = torch.cat(global_masks) if gi == 0 and global_masks[0] is not None else None
            f = self.backbone.forward_features(torch.cat(crops[start:end]), group_masks)
            cls_parts.append(f["cls"])
            if gi == 0 and return_patches:
                patch = f["patch"]
        cls = torch.cat(cls_parts)

        out = {"cls": cls, "z": self.head(cls)}
        if return_patches:
            patch_head = self.patch_head if self.patch_head is not None else self.head
            out["patch"] = patch
            out["patch_z"] = patch_head(patch)
        return out

    @staticmethod
    def _split_masks(masks, n_global: int, batch: int) -> list[torch.Tensor | None]:
        """Masks as a list of G per-crop [B, n] tensors (or G Nones)."""
        if masks is None:
            return [None] * n_global
        if isinstance(masks, torch.Tensor):
            if masks.ndim != 2 or masks.shape[0] != n_global * batch:
                raise ValueError(f"masks must be [G*B, n] = [{n_global * batch}, n] for {n_global} "
                                 f"global crops, got {tuple(masks.shape)}")
            return list(masks.split(batch))
        masks = list(masks)
        if len(masks) != n_global:
            raise ValueError(f"masks must have one entry per global crop ({n_global}), got {len(masks)}")
        if any(not isinstance(m, torch.Tensor) for m in masks):
            raise ValueError("masks must be all tensors (or masks=None for no masking)")
        return masks

    def forward_flops(self, crop_sizes: Sequence[int]) -> int:
        """Matmul FLOPs of one image's forward through this network at square crops of `crop_sizes` px: the
        backbone per crop, the head MLP on every CLS token and the prototype logits (2 p K per crop, computed
        by the loss). The one FLOP count of the training log's MFU and of the benchmarks
        (`objectives.flops_per_image` adds iBOT's patch head; backward is counted as 2x forward there)."""
        head = self.head
        logits = 2 * head.bottleneck_dim * head.out_dim
        return (sum(self.backbone.forward_flops(size) for size in crop_sizes)
                + head.flops(len(crop_sizes)) + logits * len(crop_sizes))
