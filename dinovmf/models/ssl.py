"""The student / teacher network of a run: backbone + DINO head (+ iBOT's patch head), built from a config.

`build_ssl_model(cfg, drop_path)` is the one place a training network is constructed: the trainer builds
the student and the teacher with it, tests and studies rebuild the step-0 weights with it (same seed, same
draw), and `model_args(cfg)` is what a checkpoint records so `dinovmf export` can rebuild the backbone.
`cfg` is a `dinovmf.config.Config`; only its `method`, `model.*`, `crops.global_size`, `ibot.*` and the
derived `backbone` / `norm_last_layer` / `patch_out_dim` are read.
"""
from __future__ import annotations

from torch import nn

from dinovmf.architectures import resolve_arch

from .head import DINOHead
from .multicrop import MultiCropWrapper
from .vit import build_backbone


class SSLModel(MultiCropWrapper):
    """A `MultiCropWrapper` whose forward also returns the prototypes as weight-norm parameters (v, g).

    The fused head-to-loss op (`dinovmf.head_loss`) takes the prototypes as `(v [K, p], g [K])` with
    `w_k = g_k v_k / ||v_k||`: it never forms W, and its gradients reach v and g directly. They are
    returned from inside forward because DDP and FSDP2 only make the parameters usable there (FSDP2
    all-gathers them for the forward; the root module keeps them unsharded until its backward).
    Subclassing keeps the state_dict keys of a plain MultiCropWrapper (`backbone.*`, `head.*`), which
    checkpoints, `dinovmf export` and `dinovmf eval` read.
    """

    def forward(self, crops, masks=None, return_patches: bool = False) -> dict:
        out = dict(super().forward(crops, masks=masks, return_patches=return_patches))
        out["prototypes"] = (self.head.v, self.head.g)
        if self.patch_head is not None:  # iBOT with a separate patch head
            out["patch_prototypes"] = (self.patch_head.v, self.patch_head.g)
        return out

    def prototype_parameters(self) -> list[nn.Parameter]:
        """v and g of every head: the last layer DINO freezes for `optim.freeze_last_layer` epochs.

        Call it on the model the optimizer trains, after parallelisation: FSDP2 replaces every parameter
        by a sharded one, and a list taken before would hold tensors nobody trains.
        """
        params = list(self.head.prototype_parameters())
        if self.patch_head is not None:
            params += self.patch_head.prototype_parameters()
        return params


def model_args(cfg) -> dict:
    """The `build_backbone` kwargs of this config, kept in every checkpoint (`dinovmf export` reads it): the
    architecture's name, the resolved patch size, position grid (`img_size`) and registers; `depth` only when
    it overrides the architecture's and the other options (layer scale, FFN, position encoding, qkv bias,
    position resampling) only where the config sets them to another value than the architecture's, so standard
    models keep the standard args."""
    options, defaults = cfg.backbone, resolve_arch(cfg.model.arch)[1]
    args = {"name": cfg.model.arch, "patch_size": options.patch_size,
            "img_size": options.img_size or cfg.crops.global_size,
            "num_register_tokens": options.num_register_tokens}
    if cfg.model.depth is not None:
        args["depth"] = cfg.model.depth
    for key in ("layerscale_init", "ffn", "pos_encoding", "qkv_bias", "pos_embed_resample"):
        if getattr(options, key) != getattr(defaults, key):
            value = getattr(options, key)
            args[key] = 0 if key == "layerscale_init" and value is None else value  # 0: off, as the config
    return args


def init_student(cfg) -> SSLModel:
    """The student at step 0 (on the CPU): `build_ssl_model` from `train.seed`, then the prototype norms
    spread log-normally when `model.proto_norm_init_spread` > 0 (drawn after the build, so every other
    weight is the same as without the spread). Studies and tests rebuild the step-0 weights with it."""
    import torch

    torch.manual_seed(cfg.train.seed)
    student = build_ssl_model(cfg, cfg.model.drop_path)
    for head in (student.head, student.patch_head):
        if head is not None:
            head.spread_norms_(cfg.model.proto_norm_init_spread)
    return student


def build_ssl_model(cfg, drop_path: float) -> SSLModel:
    """Student (drop_path = cfg.model.drop_path) or teacher (drop_path = 0) network for `cfg`.

    Draws its initial weights from torch's default generator: seed it first for a reproducible model.
    """
    backbone = build_backbone(drop_path_rate=drop_path, attn_backend=cfg.model.attn_backend, **model_args(cfg))
    if cfg.method != "ibot_vmf":
        # Only iBOT masks patches; an unused trainable parameter would make DDP wait for its gradient.
        backbone.mask_token.requires_grad_(False)

    def head(out_dim: int) -> DINOHead:
        return DINOHead(backbone.embed_dim, out_dim=out_dim, hidden_dim=cfg.model.hidden_dim,
                        bottleneck_dim=cfg.model.bottleneck_dim, nlayers=cfg.model.head_layers,
                        norm_last_layer=cfg.norm_last_layer)

    cls_head = head(cfg.model.out_dim)
    patch_head = head(cfg.patch_out_dim) if cfg.method == "ibot_vmf" and not cfg.ibot.shared_head else None
    return SSLModel(backbone, cls_head, patch_head)
