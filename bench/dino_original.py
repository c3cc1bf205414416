"""The ORIGINAL DINO training step (facebookresearch/dino), written eagerly from its published algorithm:
the baseline that `bench/bench_step.py` times dinovmf's step against.

What is the original's and kept as it is, because it is what dinovmf must beat:
- head: MLP (Linear, GELU, Linear, GELU, Linear to the bottleneck), L2-normalise, then a bias-free
  `weight_norm`-ed Linear(p, K) whose output ARE the logits [N, K] (a full [N, K] tensor per head call);
  g filled with 1 and frozen for `norm_last_layer` (DINO), trainable otherwise (free norms);
- multi-crop: one backbone call per group of consecutive same-size crops, one head call on all of them;
- loss: logits / student_temp, split per crop; teacher softmax((logits - center) / temp) split in 2;
  the double loop over (teacher chunk, student chunk != it), each term a log_softmax of the student
  chunk and a row-sum; then the center EMA of the raw teacher logits' batch mean (momentum 0.9);
- step: lr / weight decay written into the two parameter groups (weights decayed; biases and 1-D
  parameters not), `loss.item()` finiteness check (a host sync), zero_grad, backward, per-parameter
  gradient clipping (one norm and one `.item()` per parameter), last-layer gradients dropped while
  frozen, `torch.optim.AdamW` with its defaults (on CPU tensors PyTorch then runs its for-loop
  implementation: neither foreach nor fused is forced), the teacher EMA as a Python loop over
  parameter pairs, `loss.item()` again for logging.

What differs from the original, on purpose (both sides of the benchmark then differ only in the head,
the loss and the step):
- the backbone is dinovmf's `VisionTransformer` (the same architecture as DINO's ViT; see
  `dinovmf.models.vit`), built by the caller, and the head's MLP is dinovmf's `projection_mlp` (the
  same layers and initialisation as DINO's), so both sides run the very same code there;
- schedule values come in as a dict (dinovmf's `Schedules.at(step)`: lr, wd, momentum,
  teacher_temp, freeze_last_layer) instead of the original's precomputed arrays;
- no DDP: the center's all-reduce is a no-op on one process, as the original's on a world of one;
- the EMA is `t.mul_(m).add_(s, alpha=1 - m)`, which spares the original's `(1 - m) * s` temporary:
  if anything, a slightly faster baseline.
"""
from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from dinovmf.models.head import projection_mlp

N_GLOBAL = 2
CLIP_EPS = 1e-6  # the original's clip coefficient: clip / (norm + 1e-6)
LAST_LAYER = "last_layer"  # the name the original's last-layer freeze matches parameters by
# Parameter names of the weight-normalised last layer (torch.nn.utils.parametrizations.weight_norm).
G_NAME = "head.last_layer.parametrizations.weight.original0"  # g [K, 1]
V_NAME = "head.last_layer.parametrizations.weight.original1"  # v [K, p]


class OriginalDINOHead(nn.Module):
    """MLP -> L2-normalise -> weight-normalised Linear(p, K) without bias; forward returns the logits."""

    def __init__(self, in_dim: int, out_dim: int, hidden_dim: int = 2048, bottleneck_dim: int = 256,
                 nlayers: int = 3, norm_last_layer: bool = True):
        super().__init__()
        self.mlp = projection_mlp(in_dim, hidden_dim, bottleneck_dim, nlayers)  # the same MLP as DINO's
        self.last_layer = nn.utils.parametrizations.weight_norm(nn.Linear(bottleneck_dim, out_dim, bias=False))
        g = self.last_layer.parametrizations.weight.original0
        with torch.no_grad():
            g.fill_(1.0)
        g.requires_grad_(not norm_last_layer)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.normalize(self.mlp(x), dim=-1, p=2)
        return self.last_layer(x)


class OriginalMultiCrop(nn.Module):
    """backbone (CLS features [B, D] per call) + head; crops grouped by consecutive equal size."""

    def __init__(self, backbone: nn.Module, head: OriginalDINOHead):
        super().__init__()
        self.backbone, self.head = backbone, head

    def forward(self, crops: Sequence[torch.Tensor]) -> torch.Tensor:
        sizes = torch.tensor([c.shape[-1] for c in crops])
        ends = torch.cumsum(torch.unique_consecutive(sizes, return_counts=True)[1], 0).tolist()
        features, start = [], 0
        for end in ends:
            features.append(self.backbone(torch.cat(list(crops[start:end]))))
            start = end
        return self.head(torch.cat(features))


class OriginalDINOLoss(nn.Module):
    """DINO's cross-entropy over (teacher global crop, other student crop) pairs, with logit centering."""

    def __init__(self, out_dim: int, n_crops: int, student_temp: float = 0.1, center_momentum: float = 0.9):
        super().__init__()
        self.n_crops, self.student_temp, self.center_momentum = n_crops, student_temp, center_momentum
        self.register_buffer("center", torch.zeros(1, out_dim))

    def forward(self, student_output: torch.Tensor, teacher_output: torch.Tensor,
                teacher_temp: float) -> torch.Tensor:
        student_chunks = (student_output / self.student_temp).chunk(self.n_crops)
        teacher_chunks = F.softmax((teacher_output - self.center) / teacher_temp, dim=-1).detach().chunk(N_GLOBAL)
        total, n_terms = 0.0, 0
        for iq, q in enumerate(teacher_chunks):
            for v, student_chunk in enumerate(student_chunks):
                if v == iq:
                    continue
                total = total + torch.sum(-q * F.log_softmax(student_chunk, dim=-1), dim=-1).mean()
                n_terms += 1
        total = total / n_terms
        self.update_center(teacher_output)
        return total

    @torch.no_grad()
    def update_center(self, teacher_output: torch.Tensor) -> None:
        batch_center = torch.sum(teacher_output, dim=0, keepdim=True)
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.all_reduce(batch_center)
            batch_center = batch_center / (len(teacher_output) * torch.distributed.get_world_size())
        else:
            batch_center = batch_center / len(teacher_output)
        self.center = self.center * self.center_momentum + batch_center * (1 - self.center_momentum)


def original_param_groups(model: nn.Module) -> list[dict]:
    """[regularised (weights), not regularised (biases and 1-D parameters, weight_decay 0)].

    Note the original's rule is by shape, so a trainable weight-norm g ([K, 1]: 2-D) is decayed.
    """
    regularized, not_regularized = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (not_regularized if name.endswith(".bias") or p.ndim == 1 else regularized).append(p)
    return [{"params": regularized}, {"params": not_regularized, "weight_decay": 0.0}]


def clip_gradients_per_parameter(model: nn.Module, clip: float) -> list[float]:
    """Scale each gradient whose own L2 norm exceeds `clip` down to about `clip`; returns the norms
    (one `.item()` each, as the original collects them)."""
    norms = []
    for p in model.parameters():
        if p.grad is None:
            continue
        norm = p.grad.norm(2)
        norms.append(norm.item())
        coef = clip / (norm + CLIP_EPS)
        if coef < 1:
            p.grad.mul_(coef)
    return norms


def cancel_last_layer_gradients(model: nn.Module) -> None:
    """The original's last-layer freeze: every parameter named like the last layer loses its gradient."""
    for name, p in model.named_parameters():
        if LAST_LAYER in name:
            p.grad = None


@torch.no_grad()
def ema_parameter_loop(teacher: nn.Module, student: nn.Module, momentum: float) -> None:
    """teacher <- m * teacher + (1 - m) * student, one parameter pair at a time."""
    for param_s, param_t in zip(student.parameters(), teacher.parameters()):
        param_t.mul_(momentum).add_(param_s.detach(), alpha=1 - momentum)


def state_from_dinovmf(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A dinovmf `SSLModel` state dict (backbone.*, head.mlp.*, head.v, head.g) in this baseline's
    layout: same backbone and MLP keys, v and g as the weight-norm parametrisation's original1 / original0."""
    out = {}
    for key, value in state.items():
        if key == "head.v":
            out[V_NAME] = value.clone()
        elif key == "head.g":
            out[G_NAME] = value.reshape(-1, 1).clone()
        elif key.startswith(("backbone.", "head.mlp.")):
            out[key] = value.clone()
        else:
            raise ValueError(f"state_from_dinovmf: no counterpart for {key!r} (a patch head?)")
    return out


class OriginalDINOStep:
    """Student, EMA teacher, loss and AdamW of the original DINO, and its training step.

    `backbone_fn(drop_path)` builds one backbone (student: `drop_path`, teacher: 0.0); the teacher
    starts as a copy of the student and never requires grad. `step(crops, values)` runs one training
    step with the schedule values {lr, wd, momentum, teacher_temp, freeze_last_layer} and returns the
    logged loss (a float).
    """

    def __init__(self, backbone_fn, n_crops: int, out_dim: int, hidden_dim: int, bottleneck_dim: int,
                 norm_last_layer: bool = True, drop_path: float = 0.0, student_temp: float = 0.1,
                 center_momentum: float = 0.9, clip_grad: float = 3.0, device: torch.device | str = "cpu"):
        self.clip_grad = clip_grad
        self.student = self._network(backbone_fn(drop_path), out_dim, hidden_dim, bottleneck_dim,
                                     norm_last_layer).to(device)
        self.teacher = self._network(backbone_fn(0.0), out_dim, hidden_dim, bottleneck_dim,
                                     norm_last_layer).to(device)
        self.teacher.load_state_dict(self.student.state_dict())
        self.teacher.requires_grad_(False)
        self.loss = OriginalDINOLoss(out_dim, n_crops, student_temp, center_momentum).to(device)
        self.optimizer = torch.optim.AdamW(original_param_groups(self.student))

    @staticmethod
    def _network(backbone: nn.Module, out_dim, hidden_dim, bottleneck_dim, norm_last_layer) -> OriginalMultiCrop:
        if hasattr(backbone, "mask_token"):  # dinovmf's ViT carries iBOT's mask token; DINO has none
            backbone.mask_token.requires_grad_(False)
        head = OriginalDINOHead(backbone.embed_dim, out_dim, hidden_dim, bottleneck_dim,
                                norm_last_layer=norm_last_layer)
        return OriginalMultiCrop(backbone, head)

    def load_dinovmf_state(self, student_state: dict, teacher_state: dict) -> None:
        """Start from a dinovmf student / teacher (`SSLModel.state_dict()`s), for same-weight comparisons."""
        self.student.load_state_dict(state_from_dinovmf(student_state))
        self.teacher.load_state_dict(state_from_dinovmf(teacher_state))

    def step(self, crops: list[torch.Tensor], values: dict) -> float:
        for i, group in enumerate(self.optimizer.param_groups):
            group["lr"] = values["lr"]
            if i == 0:  # only the regularised group follows the weight-decay schedule
                group["weight_decay"] = values["wd"]
        teacher_output = self.teacher(crops[:N_GLOBAL])  # no parameter requires grad: no graph
        student_output = self.student(crops)
        loss = self.loss(student_output, teacher_output, values["teacher_temp"])
        if not math.isfinite(loss.item()):
            raise FloatingPointError(f"loss is {loss.item()}, stopping training")
        self.optimizer.zero_grad()
        loss.backward()
        if self.clip_grad:
            clip_gradients_per_parameter(self.student, self.clip_grad)
        if values["freeze_last_layer"]:
            cancel_last_layer_gradients(self.student)
        self.optimizer.step()
        ema_parameter_loop(self.teacher, self.student, values["momentum"])
        return loss.item()
