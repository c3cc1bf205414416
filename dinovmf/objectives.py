"""What a training step optimises, per `method`: the student/teacher pair and the loss built for it.

The loop in `dinovmf.train` knows nothing method-specific: it asks `build_objective(cfg)` for a module
whose forward runs the teacher and the student on a batch of crops and returns (loss, metrics), and
whose state_dict (center buffers) goes into the checkpoint as "loss". A new method (iBOT-vMF: masked
global crops, a patch head and a second center) registers one more class in `OBJECTIVES`.
"""
from __future__ import annotations

import contextlib

import torch
from torch import nn

from dinovmf.models import DINOHead, MultiCropWrapper, build_backbone


class SSLModel(MultiCropWrapper):
    """A `MultiCropWrapper` whose forward also returns the prototypes.

    The prototypes `W = g v / ||v||` must be computed inside forward: DDP and FSDP2 only make the
    parameters available (FSDP2 all-gathers them) during a module's forward. Subclassing keeps the
    state_dict keys of a plain MultiCropWrapper (`backbone.*`, `head.*`), which `dinovmf export` reads.
    """

    def forward(self, crops, masks=None, return_patches: bool = False) -> dict:
        out = dict(super().forward(crops, masks=masks, return_patches=return_patches))
        out["prototypes"] = self.head.prototypes()
        if self.patch_head is not None:  # iBOT with a separate patch head
            out["patch_prototypes"] = self.patch_head.prototypes()
        return out


def model_args(cfg) -> dict:
    """The `build_backbone` kwargs of this config, kept in every checkpoint (`dinovmf export` reads it).
    `depth` only when it overrides the architecture's, so standard models keep the standard args."""
    args = {"name": cfg.model.arch, "patch_size": cfg.model.patch_size, "img_size": cfg.crops.global_size,
            "num_register_tokens": cfg.model.num_register_tokens}
    if cfg.model.depth is not None:
        args["depth"] = cfg.model.depth
    return args


def build_ssl_model(cfg, drop_path: float) -> nn.Module:
    """Student (drop_path = cfg.model.drop_path) or teacher (drop_path = 0) network for `cfg`."""
    backbone = build_backbone(drop_path_rate=drop_path, attn_backend=cfg.model.attn_backend, **model_args(cfg))
    if cfg.method != "ibot_vmf":
        # Only iBOT masks patches; an unused trainable parameter would make DDP wait for its gradient.
        backbone.mask_token.requires_grad_(False)
    head = DINOHead(backbone.embed_dim, out_dim=cfg.model.out_dim, hidden_dim=cfg.model.hidden_dim,
                    bottleneck_dim=cfg.model.bottleneck_dim, nlayers=cfg.model.head_layers,
                    norm_last_layer=cfg.norm_last_layer)
    patch_head = None
    if cfg.method == "ibot_vmf" and not cfg.ibot.shared_head:
        patch_head = DINOHead(backbone.embed_dim, out_dim=cfg.patch_out_dim, hidden_dim=cfg.model.hidden_dim,
                              bottleneck_dim=cfg.model.bottleneck_dim, nlayers=cfg.model.head_layers,
                              norm_last_layer=cfg.norm_last_layer)
    return SSLModel(backbone, head, patch_head)


def autocast_context(device: torch.device, amp: str):
    """bf16 autocast on CUDA for amp=auto/bf16; on CPU only when asked for (amp=bf16)."""
    if amp == "bf16" or (amp == "auto" and device.type == "cuda"):
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def cls_loss(cfg) -> nn.Module:
    """The CLS-token `DINOLoss` of `cfg` (shared by every method's objective)."""
    from dinovmf.loss import DINOLoss

    return DINOLoss(cfg.model.out_dim, p=cfg.model.bottleneck_dim, vmf=cfg.vmf,
                    student_temp=cfg.loss.student_temp, centering=cfg.centering,
                    center_momentum=cfg.loss.center_momentum, koleo_weight=cfg.loss.koleo_weight,
                    backend=cfg.loss.backend)


class DINOObjective(nn.Module):
    """`dino` and `dino_vmf`: DINO's cross-entropy between the teacher's distributions on the global
    crops and the student's on every crop (CLS token), with centering and, for vMF, the normaliser.

    The networks run under autocast; the loss gets fp32 embeddings and prototypes, because the vMF
    normaliser log C_p is a large number whose differences matter (DESIGN §1, precision).
    """

    def __init__(self, cfg, n_global: int = 2):
        super().__init__()
        self.n_global = n_global
        self.amp = cfg.train.amp
        self.loss = cls_loss(cfg)

    def forward(self, student: nn.Module, teacher: nn.Module, crops: list[torch.Tensor],
                teacher_temp: float) -> tuple[torch.Tensor, dict, dict]:
        """(loss, metrics, teacher outputs) of one batch; the teacher sees the global crops only."""
        device = crops[0].device
        with autocast_context(device, self.amp):
            with torch.no_grad():
                t_out = teacher(crops[:self.n_global])
            s_out = student(crops)
        loss, metrics = self.loss(s_out["z"].float(), t_out["z"].float(), s_out["prototypes"].float(),
                                  t_out["prototypes"].float(), teacher_temp, self.n_global)
        return loss, metrics, t_out


class IBOTObjective(nn.Module):
    """`ibot_vmf`: the DINO-vMF CLS loss plus iBOT's masked patch loss on the global crops.

    The student sees the global crops with iBOT block masks (`dinovmf.masking`), the teacher sees them
    unmasked; both return patch features through the patch head (the CLS head when `ibot.shared_head`).
    `IBOTPatchLoss` then trains the student's predictions at the masked positions towards the teacher's
    patch distributions, with its own center. Total loss: `loss_cls + ibot.loss_weight * loss_patch`.

    Masks are drawn on the CPU from torch's default generator, whose state every checkpoint saves, so a
    resumed run draws the same masks as an uninterrupted one.
    """

    def __init__(self, cfg, n_global: int = 2):
        super().__init__()
        from dinovmf.ibot import IBOTPatchLoss
        from dinovmf.masking import BlockMaskGenerator

        self.n_global, self.amp = n_global, cfg.train.amp
        self.patch_weight = cfg.ibot.loss_weight
        self.loss = cls_loss(cfg)
        self.patch_loss = IBOTPatchLoss(cfg.patch_out_dim, p=cfg.model.bottleneck_dim, vmf=cfg.vmf,
                                        student_temp=cfg.loss.student_temp, centering=cfg.centering,
                                        center_momentum=cfg.loss.center_momentum, backend=cfg.loss.backend)
        self.masks = BlockMaskGenerator(cfg.crops.global_size // cfg.model.patch_size,
                                        min_ratio=cfg.ibot.mask_min_ratio, max_ratio=cfg.ibot.mask_max_ratio,
                                        mask_probability=cfg.ibot.mask_probability)

    def forward(self, student: nn.Module, teacher: nn.Module, crops: list[torch.Tensor],
                teacher_temp: float) -> tuple[torch.Tensor, dict, dict]:
        """(loss, metrics, teacher outputs) of one batch; see the class docstring."""
        device = crops[0].device
        masks = self.masks(self.n_global * crops[0].shape[0]).to(device, non_blocking=True)
        with autocast_context(device, self.amp):
            with torch.no_grad():
                t_out = teacher(crops[:self.n_global], return_patches=True)
            s_out = student(crops, masks=masks, return_patches=True)
        loss_cls, metrics = self.loss(s_out["z"].float(), t_out["z"].float(), s_out["prototypes"].float(),
                                      t_out["prototypes"].float(), teacher_temp, self.n_global)
        s_proto = s_out.get("patch_prototypes", s_out["prototypes"])
        t_proto = t_out.get("patch_prototypes", t_out["prototypes"])
        loss_patch, patch_metrics = self.patch_loss(s_out["patch_z"].float(), t_out["patch_z"].float(), masks,
                                                    s_proto.float(), t_proto.float(), teacher_temp)
        loss = loss_cls + self.patch_weight * loss_patch
        metrics = {**metrics, **patch_metrics, "loss_cls": metrics["loss"],
                   "loss": metrics["loss"] + self.patch_weight * patch_metrics["loss_patch"]}
        return loss, metrics, t_out


# method name -> constructor(cfg) of its objective module.
OBJECTIVES = {"dino": DINOObjective, "dino_vmf": DINOObjective, "ibot_vmf": IBOTObjective}


def build_objective(cfg) -> nn.Module:
    """The objective module of `cfg.method` (see `OBJECTIVES`)."""
    if cfg.method not in OBJECTIVES:
        raise ValueError(f"method must be one of {sorted(OBJECTIVES)}, got {cfg.method!r}")
    return OBJECTIVES[cfg.method](cfg)
