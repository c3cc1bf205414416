"""What a training step optimises, per `method`: which crops each network sees and the loss terms.

An objective is a module whose forward runs the teacher and the student on a batch of crops and returns
`(terms, metrics)`: `terms` maps a name to a WEIGHTED 0-d loss tensor (`{"dino": ..., "koleo": ...,
"ibot_patch": ...}`), which the trainer sums, backpropagates and logs as `loss_<name>`; `metrics` are 0-d
device tensors (or floats) for the log. Its state_dict (the teachers' center buffers) is checkpointed as
"loss". Adding a loss term is one entry in `terms` and one config field for its weight; adding a method is
one class in `OBJECTIVES`.

Layering: the objective calls the networks it is handed (the trainer built and parallelised them, see
`dinovmf.models.build_ssl_model` and `dinovmf.parallelize`) and the losses of `dinovmf.loss` /
`dinovmf.ibot`; it never builds a model.
"""
from __future__ import annotations

import contextlib

import torch
from torch import nn

from dinovmf.config import N_GLOBAL_CROPS
from dinovmf.loss import DINOLoss
from dinovmf.models.head import effective_prototypes
from dinovmf.prototypes import koleo_proto_loss


def autocast_context(device: torch.device, amp: str):
    """bf16 autocast on CUDA for amp=auto/bf16; on CPU only when asked for (amp=bf16)."""
    if amp == "bf16" or (amp == "auto" and device.type == "cuda"):
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def _without_losses(metrics: dict) -> dict:
    """A loss module's metrics minus its own loss values: the trainer logs the terms it actually summed."""
    return {k: v for k, v in metrics.items() if not k.startswith("loss")}


class DINOObjective(nn.Module):
    """`dino` and `dino_vmf`: DINO's cross-entropy between the teacher's distributions on the global crops
    and the student's on every crop (CLS token), with centering and, for vMF, the normaliser; plus
    KoLeo-proto on the student prototypes when `loss.koleo_weight > 0`.

    The networks run under autocast; the loss gets fp32 embeddings and prototypes, because the vMF
    normaliser log C_p is a large number whose differences matter (docs/DESIGN.md, precision).
    """

    def __init__(self, cfg):
        super().__init__()
        self.amp = cfg.train.amp
        self.koleo_weight = cfg.loss.koleo_weight
        self.global_size, self.local_size = cfg.crops.global_size, cfg.crops.local_size
        self.n_local = cfg.crops.n_local
        self.dino = DINOLoss(cfg.model.out_dim, p=cfg.model.bottleneck_dim, vmf=cfg.vmf,
                             student_temp=cfg.loss.student_temp, centering=cfg.centering,
                             center_momentum=cfg.loss.center_momentum, backend=cfg.loss.backend)

    def run_networks(self, student: nn.Module, teacher: nn.Module, crops: list[torch.Tensor],
                     masks: torch.Tensor | None = None) -> tuple[dict, dict]:
        """(student outputs on every crop, teacher outputs on the global crops), under autocast."""
        patches = masks is not None
        with autocast_context(crops[0].device, self.amp):
            with torch.no_grad():
                t_out = teacher(crops[:N_GLOBAL_CROPS], return_patches=patches)
            s_out = student(crops, masks=masks, return_patches=patches)
        return s_out, t_out

    def cls_terms(self, s_out: dict, t_out: dict, teacher_temp: float) -> tuple[dict, dict]:
        """The CLS-token terms ("dino", and "koleo" when weighted) and their metrics."""
        # Prototypes as (v, g), fp32 parameters: the fused op forms no W and its gradients reach v and g.
        dino, metrics = self.dino(s_out["z"].float(), t_out["z"].float(), s_out["prototypes"], t_out["prototypes"],
                                  teacher_temp, N_GLOBAL_CROPS)
        terms = {"dino": dino}
        if self.koleo_weight > 0:
            terms["koleo"] = self.koleo_weight * koleo_proto_loss(effective_prototypes(s_out["prototypes"]))
        return terms, _without_losses(metrics)

    def forward(self, student: nn.Module, teacher: nn.Module, crops: list[torch.Tensor],
                teacher_temp: float) -> tuple[dict, dict]:
        """(weighted loss terms, metrics) of one batch; the teacher sees the global crops only."""
        s_out, t_out = self.run_networks(student, teacher, crops)
        return self.cls_terms(s_out, t_out, teacher_temp)

    def flops_per_image(self, model: nn.Module) -> float:
        """Matmul FLOPs per image of one step (for MFU), from the models' own counters.

        Student: forward + backward (3x forward) of every crop through backbone and head, plus the student
        logits (2 p K per crop). Teacher: forward of the global crops and their logits. Norms, softmax and
        the optimizer are ignored, as usual for MFU.
        """
        student, teacher = self.forward_flops(model)
        return float(3 * student + teacher)

    def forward_flops(self, model: nn.Module) -> tuple[int, int]:
        """(student, teacher) forward FLOPs per image (`MultiCropWrapper.forward_flops`; `dinovmf.plan` splits
        a step's time with them)."""
        global_crops = [self.global_size] * N_GLOBAL_CROPS
        return (model.forward_flops(global_crops + [self.local_size] * self.n_local),
                model.forward_flops(global_crops))


class IBOTObjective(DINOObjective):
    """`ibot_vmf`: the DINO-vMF CLS terms plus iBOT's masked patch loss on the global crops ("ibot_patch",
    weighted by `ibot.loss_weight`).

    The student sees the global crops with iBOT block masks (`dinovmf.masking`), the teacher sees them
    unmasked; both return patch features through the patch head (the CLS head when `ibot.shared_head`).
    `IBOTPatchLoss` trains the student's predictions at the masked positions towards the teacher's patch
    distributions, with its own center.

    Masks are drawn on the CPU from torch's default generator, whose state every checkpoint saves, so a
    resumed run draws the same masks as an uninterrupted one.
    """

    def __init__(self, cfg):
        super().__init__(cfg)
        from dinovmf.ibot import IBOTPatchLoss
        from dinovmf.masking import BlockMaskGenerator

        self.patch_weight = cfg.ibot.loss_weight
        self.patch_size = cfg.backbone.patch_size
        self.ibot_patch = IBOTPatchLoss(cfg.patch_out_dim, p=cfg.model.bottleneck_dim, vmf=cfg.vmf,
                                        student_temp=cfg.loss.student_temp, centering=cfg.centering,
                                        center_momentum=cfg.loss.center_momentum, backend=cfg.loss.backend)
        self.masks = BlockMaskGenerator(cfg.crops.global_size // self.patch_size,
                                        min_ratio=cfg.ibot.mask_min_ratio, max_ratio=cfg.ibot.mask_max_ratio,
                                        mask_probability=cfg.ibot.mask_probability)

    def forward(self, student: nn.Module, teacher: nn.Module, crops: list[torch.Tensor],
                teacher_temp: float) -> tuple[dict, dict]:
        """(weighted loss terms, metrics) of one batch; see the class docstring."""
        masks = self.masks(N_GLOBAL_CROPS * crops[0].shape[0]).to(crops[0].device, non_blocking=True)
        s_out, t_out = self.run_networks(student, teacher, crops, masks)
        terms, metrics = self.cls_terms(s_out, t_out, teacher_temp)
        s_proto = s_out.get("patch_prototypes", s_out["prototypes"])
        t_proto = t_out.get("patch_prototypes", t_out["prototypes"])
        patch, patch_metrics = self.ibot_patch(s_out["patch_z"].float(), t_out["patch_z"].float(), masks,
                                               s_proto, t_proto, teacher_temp)
        terms["ibot_patch"] = self.patch_weight * patch
        return terms, {**metrics, **_without_losses(patch_metrics)}

    def forward_flops(self, model: nn.Module) -> tuple[int, int]:
        student, teacher = super().forward_flops(model)
        # The patch head runs on every patch token of the global crops, in both networks.
        patch_rows = N_GLOBAL_CROPS * (self.global_size // self.patch_size) ** 2
        patch_head = model.patch_head if model.patch_head is not None else model.head
        return student + patch_head.flops(patch_rows), teacher + patch_head.flops(patch_rows)


# method name (every one of dinovmf.config.METHODS, which validates it) -> constructor(cfg) of its objective.
OBJECTIVES = {"dino": DINOObjective, "dino_vmf": DINOObjective, "ibot_vmf": IBOTObjective}


def build_objective(cfg) -> nn.Module:
    """The objective module of `cfg.method` (see `OBJECTIVES`)."""
    if cfg.method not in OBJECTIVES:
        raise ValueError(f"method must be one of {sorted(OBJECTIVES)}, got {cfg.method!r}")
    return OBJECTIVES[cfg.method](cfg)
