"""Training configuration: dataclass defaults <- YAML preset <- dotted command-line overrides.

A preset is either a name (``demo``, ``vit_b16_in1k``: a YAML file shipped as the data package
``dinovmf.configs``) or a path to a YAML file. Overrides are ``key=value`` strings with dotted keys
(``optim.lr=1e-3``, ``data.val=embedded``); values are parsed as YAML and then coerced to the field's
declared type, so ``1e-3`` is a float even though YAML 1.1 would read it as a string. Any unknown key,
in a YAML file or an override, is an error that names the closest valid key.
"""
from __future__ import annotations

import dataclasses
import difflib
import importlib.resources
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from dinovmf.architectures import (FFN_KINDS, OPTION_KEYS, POS_ENCODINGS, POS_RESAMPLINGS, BackboneOptions, arch_names,
                                   resolve_arch)
from dinovmf.kernels.common import CENTERING_MODES

METHODS = ("dino", "dino_vmf", "ibot_vmf")
# DINO's two global crops: the views the teacher sees and every student view is paired with. The crop
# augmentation recipe (blur 1.0 / 0.1, solarise on the second) is defined for exactly two, so this is a
# constant of the method, not a setting; the data loader, the objectives and the FLOP count read it here.
N_GLOBAL_CROPS = 2


@dataclass
class DataConfig:
    train: str = "embedded"          # `embedded`, an image folder (prepared into the run dir) or a .beton
    val: str | None = None           # same forms; when set, kNN runs at the end of training
    num_workers: int = 2
    loader: str = "auto"             # auto (FFCV for a .beton when importable), ffcv, pil


@dataclass
class ModelConfig:
    # A size (vit_tiny, vit_small, vit_base, vit_large, vit_giant2) or a backbone preset (dinov2_vits14[_reg4],
    # dinov2_vitb14, dinov2_vitl14, dinov2_vitg14, dinov3_vits16, dinov3_vitb16, dinov3_vitl16:
    # dinovmf.architectures). The backbone options below left at null take the architecture's value (a size: the
    # classic ViT; a preset: the released model's).
    arch: str = "vit_small"
    depth: int | None = None         # number of blocks; None: the architecture's (12, or 24 for vit_large)
    patch_size: int | None = None    # None: 16, or the preset's (DINOv2: 14)
    drop_path: float = 0.1
    attn_backend: str = "sdpa"
    num_register_tokens: int | None = None  # registers (DINOv3: storage tokens); None: 0, or the preset's (4)
    img_size: int | None = None      # learned position grid = img_size / patch; None: the preset's (DINOv2: 518)
    #                                  or crops.global_size
    layerscale_init: float | None = None  # LayerScale init value; None: the architecture's (off, presets 1e-5); 0: off
    ffn: str | None = None           # mlp | swiglu (DINOv2's fused sizing); None: the architecture's (mlp)
    pos_encoding: str | None = None  # learned | rope (DINOv3's 2-D RoPE); None: the architecture's
    qkv_bias: bool | None = None     # None: the architecture's (true); with rope the key bias is masked (DINOv3)
    # How learned positions are resampled for other crop sizes: exact | antialias (DINOv2 presets, timm) | offset
    # (DINO's +0.1 kludge: the original DINO ViT and DINOv2's hub models without registers); None: the arch's
    pos_embed_resample: str | None = None
    out_dim: int = 65536             # K, the number of prototypes
    hidden_dim: int = 2048
    bottleneck_dim: int = 256        # p, the sphere the prototypes live on
    head_layers: int = 3
    norm_last_layer: bool | None = None  # None: by method (dino -> True, *_vmf -> False)
    proto_norm_init_spread: float = 0.0  # sigma of log g_k ~ N(0, sigma^2) at init (free norms only); 0: g = 1
    # Continue pretraining (dinovmf.models.init_from): start the student and teacher backbones from the
    # weights in this file (a dinovmf .pt checkpoint or export .safetensors, or a timm / DINO ViT state
    # dict, .safetensors or .pth); the head starts fresh. Ignored when resuming a run's own checkpoint.
    init_from: str | None = None
    init_strict: bool = True         # every backbone tensor from the file, and nothing else in it
    # With init_strict=false: backbone key patterns (fnmatch, e.g. [reg_token, blocks.*.ls1.gamma]) that may
    # be missing from the file (kept fresh) or extra in it (dropped); any other difference is still an error.
    init_ignore: list[str] = field(default_factory=list)
    # A .pt / .pth init_from file that holds more than tensors and plain types is refused (unpickling it
    # could run code); true loads it anyway. Only for files you trust.
    init_trust_pickle: bool = False


@dataclass
class OptimConfig:
    lr: float = 5e-4                 # per 256 images; scaled by global batch / 256
    min_lr: float = 1e-6
    warmup_epochs: float = 10.0
    weight_decay: float = 0.04
    weight_decay_end: float = 0.4
    momentum_teacher: float = 0.996
    momentum_teacher_end: float = 1.0
    clip_grad: float = 3.0           # 0 disables clipping
    freeze_last_layer: float = 1.0   # epochs during which the prototypes get no update
    betas: tuple[float, float] = (0.9, 0.999)
    proto_norm_lr_mult: float = 1.0  # lr of the prototype norms g = this x lr (free norms only; 0 freezes g)
    # Continued pretraining (README "Continue pretraining"; the `continue` preset): for this many steps the
    # backbone and its EMA copy stay fixed while the fresh head and prototypes learn; then the backbone's lr
    # warms up from 0 over optim.warmup_epochs. Needs model.init_from.
    freeze_backbone_steps: int = 0
    layer_decay: float = 1.0         # layer-wise lr decay (BEiT / DINOv2): block i of L gets lr x decay^(L - i)


@dataclass
class CropsConfig:
    """DINO's multi-crop recipe: `n_global` large crops (teacher and student) + `n_local` small ones.

    Scales are fractions of the source image's area, as in RandomResizedCrop. The data package reads
    this class directly (`dinovmf.data`); `validate_crops` checks it.
    """
    n_global: typing.ClassVar[int] = N_GLOBAL_CROPS  # a constant of the method, not a key (see N_GLOBAL_CROPS)
    global_size: int = 224
    local_size: int = 96
    n_local: int = 10
    global_scale: tuple[float, float] = (0.4, 1.0)
    local_scale: tuple[float, float] = (0.05, 0.4)

    @property
    def num_crops(self) -> int:
        return self.n_global + self.n_local

    def crop_specs(self) -> list[tuple[int, tuple[float, float]]]:
        """(output size, scale range) of every crop, global crops first."""
        return ([(self.global_size, tuple(self.global_scale))] * self.n_global
                + [(self.local_size, tuple(self.local_scale))] * self.n_local)


@dataclass
class AugmentConfig:
    """Photometric augmentation of the crops: DINO's recipe by default (see dinovmf.data.augment)."""
    flip_p: float = 0.5
    jitter_p: float = 0.8            # colour jitter: brightness, contrast, saturation, hue in random order
    brightness: float = 0.4
    contrast: float = 0.4
    saturation: float = 0.2
    hue: float = 0.1                 # at most 0.5 (half the hue circle)
    gray_p: float = 0.2
    blur_sigma: tuple[float, float] = (0.1, 2.0)  # in pixels of the crop: DINO's values are for 224 px
    blur_p: tuple[float, float, float] = (1.0, 0.1, 0.5)  # global 1, global 2, local crops
    solarize_p: float = 0.2          # second global crop only


@dataclass
class LossConfig:
    centering: str | None = None     # None: by method (dino -> logit, *_vmf -> prob)
    center_momentum: float = 0.9
    student_temp: float = 0.1
    teacher_temp: float = 0.07
    warmup_teacher_temp: float = 0.04
    warmup_teacher_temp_epochs: float = 30.0
    koleo_weight: float = 0.0
    backend: str = "auto"


@dataclass
class IBOTConfig:
    """iBOT-vMF (method=ibot_vmf): masked patch prediction on the global crops (iBOT's recipe defaults)."""
    shared_head: bool = True         # patch tokens through the CLS head (iBOT ViT-S/B), or a head of their own
    patch_out_dim: int | None = None  # K of the separate patch head; None: model.out_dim
    loss_weight: float = 1.0         # weight of the patch loss next to the CLS loss
    mask_min_ratio: float = 0.0      # per masked image, floor(U[min, max] * patches) patches are masked
    mask_max_ratio: float = 0.3
    mask_probability: float = 0.5    # fraction of the global crops that are masked at all


@dataclass
class TrainConfig:
    batch_size: int = 64             # per process
    log_every: int = 10
    ckpt_every: int = 1000
    keep_last: int = 3
    ckpt_async: bool | None = None   # write checkpoints in the background; None: on for multi-process runs
    compile: bool = False
    amp: str = "auto"                # auto (bf16 on CUDA, off on CPU), bf16, none
    seed: int = 0
    time_limit_min: float | None = None  # wall-clock budget: stop training (save, then evaluate) when spent
    probes: bool = False             # activation / gradient statistics in the metrics (stability probes)
    utilisation_every: int = 0       # steps between prototype-utilisation metrics; 0: at log steps


@dataclass
class EvalConfig:
    knn_k: int = 20
    knn_temperature: float = 0.07
    batch_size: int = 128
    image_size: int | None = None    # None: crops.global_size
    baseline: bool = False           # also evaluate the step-0 backbone (random init, or model.init_from)


@dataclass
class DistConfig:
    backend: str = "auto"            # auto (nccl on CUDA, gloo on CPU), nccl, gloo
    fsdp: bool = False               # FSDP2 fully_shard per block instead of DDP (ViT-L)
    # Seconds ranks wait for each other: collectives time out after it (NCCL then dumps its flight recorder);
    # on gloo the watchdog names the stalled rank after 0.6 of it (dinovmf.watchdog). It must cover the
    # longest wait for one rank inside the loop, e.g. a rank still writing its checkpoint shard.
    timeout_s: float = 600.0
    # DDP only (dinovmf.parallelize; measured in bench/bench_scaling.py): gradient bucket size, gradients as
    # views of the buckets (no copy, less memory), and DDP's static-graph mode (every parameter gets a
    # gradient every step, the frozen prototypes included: their gradients are dropped after backward).
    bucket_cap_mb: float = 25.0
    gradient_as_bucket_view: bool = False
    static_graph: bool = False


@dataclass
class Config:
    method: str = "dino_vmf"
    steps: int | None = None         # total optimisation steps; None: epochs x len(loader)
    epochs: int = 100                # defines the schedules' length when steps is None
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    crops: CropsConfig = field(default_factory=CropsConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    ibot: IBOTConfig = field(default_factory=IBOTConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    dist: DistConfig = field(default_factory=DistConfig)

    def to_dict(self) -> dict:
        """Plain nested dict (tuples as lists) for YAML, JSON and checkpoints."""
        return _plain(dataclasses.asdict(self))

    @property
    def backbone(self) -> BackboneOptions:
        """The backbone's options: `model.arch`'s, with the `model.*` options that are set applied."""
        return resolve_arch(self.model.arch, **{k: getattr(self.model, k) for k in OPTION_KEYS})[1]

    @property
    def norm_last_layer(self) -> bool:
        """Unit prototypes for plain DINO; free prototype norms for the vMF methods."""
        if self.model.norm_last_layer is not None:
            return self.model.norm_last_layer
        return self.method == "dino"

    @property
    def centering(self) -> str:
        if self.loss.centering is not None:
            return self.loss.centering
        return "logit" if self.method == "dino" else "prob"

    @property
    def patch_out_dim(self) -> int:
        """K of iBOT's patch prototypes: the CLS head's when shared, else ibot.patch_out_dim (or model.out_dim)."""
        if self.ibot.shared_head or self.ibot.patch_out_dim is None:
            return self.model.out_dim
        return self.ibot.patch_out_dim

    @property
    def vmf(self) -> bool:
        return self.method in ("dino_vmf", "ibot_vmf")


def _plain(obj):
    if isinstance(obj, dict):
        return {k: _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    return obj


# ----------------------------------------------------------------------------------------- loading

def available_presets() -> list[str]:
    """Names accepted by `--config NAME` (the YAML files in dinovmf.configs)."""
    root = importlib.resources.files("dinovmf.configs")
    return sorted(p.name[:-5] for p in root.iterdir() if p.name.endswith(".yaml"))


def _read_preset(name_or_path: str) -> tuple[dict, str]:
    """The YAML mapping for a preset name or a file path, and where it came from."""
    path = Path(name_or_path)
    if name_or_path.endswith((".yaml", ".yml")) or path.is_file():
        if not path.is_file():
            raise ValueError(f"config: file {name_or_path!r} does not exist")
        text, source = path.read_text(), str(path)
    else:
        resource = importlib.resources.files("dinovmf.configs") / f"{name_or_path}.yaml"
        if not resource.is_file():
            names = available_presets()
            close = difflib.get_close_matches(name_or_path, names, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise ValueError(f"config: no preset named {name_or_path!r}{hint} (presets: {', '.join(names)};"
                             " or pass a path to a .yaml file)")
        text, source = resource.read_text(), f"preset {name_or_path!r}"
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise ValueError(f"config: {source} is not valid YAML: {e}") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ValueError(f"config: {source} must be a YAML mapping of keys, got {type(data).__name__}")
    return data, source


def _unknown_key(key: str, valid: list[str], source: str) -> ValueError:
    close = difflib.get_close_matches(key, valid, n=1, cutoff=0.5)
    hint = f"; did you mean {close[0]!r}?" if close else ""
    return ValueError(f"config: unknown key {key!r} in {source}{hint}")


def all_keys(obj=None, prefix: str = "") -> list[str]:
    """Every dotted key a config has (`optim.lr`, `steps`, ...)."""
    obj = Config() if obj is None else obj
    keys = []
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if dataclasses.is_dataclass(value):
            keys += all_keys(value, prefix + f.name + ".")
        else:
            keys.append(prefix + f.name)
    return keys


def _coerce(value, hint, key: str):
    """Convert a YAML-parsed value to the field's annotated type, or raise naming the key."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        # "none" also means null, except for a string field, where it can be a value (loss.centering=none).
        nulls = ("null", "~") if inner[0] is str else ("null", "none", "~")
        if isinstance(value, str) and value.lower() in nulls and type(None) in args:
            return None
        return _coerce(value, inner[0], key)
    if origin is list:  # a YAML list, or `a,b` / `[a,b]` as text (a pattern like `*.x` is not valid YAML)
        if isinstance(value, str):
            value = [v.strip() for v in value.strip("[] ").split(",") if v.strip()]
        if not isinstance(value, (list, tuple)):
            raise ValueError(f"config: {key} expects a list (e.g. {key}=[a,b]), got {value!r}")
        return [_coerce(v, args[0], key) for v in value]
    if origin is tuple:
        if isinstance(value, str):
            value = [v for v in value.strip("()[] ").split(",") if v.strip()]
        if not isinstance(value, (list, tuple)) or len(value) != len(args):
            raise ValueError(f"config: {key} expects {len(args)} values (e.g. {key}=0.4,1.0), got {value!r}")
        return tuple(_coerce(v, a, key) for v, a in zip(value, args))
    if hint is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "yes", "1", "on", "false", "no", "0", "off"):
            return value.lower() in ("true", "yes", "1", "on")
        if isinstance(value, int) and value in (0, 1):
            return bool(value)
        raise ValueError(f"config: {key} expects true/false, got {value!r}")
    if hint is int:
        # Reject bools (an int subclass) and fractional floats rather than silently truncating.
        if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
            raise ValueError(f"config: {key} expects an integer, got {value!r}")
        try:
            return int(value)
        except (TypeError, ValueError):
            raise ValueError(f"config: {key} expects an integer, got {value!r}") from None
    if hint is float:
        if isinstance(value, bool):
            raise ValueError(f"config: {key} expects a number, got {value!r}")
        try:
            return float(value)
        except (TypeError, ValueError):
            raise ValueError(f"config: {key} expects a number, got {value!r}") from None
    if hint is str:
        if isinstance(value, (dict, list)):
            raise ValueError(f"config: {key} expects a string, got {value!r}")
        return str(value)
    return value


def _set(cfg: Config, key: str, raw, source: str) -> None:
    """Set dotted `key` on `cfg` to `raw` (coerced), or raise with the closest valid key."""
    parts = key.split(".")
    obj = cfg
    for i, part in enumerate(parts):
        names = [f.name for f in dataclasses.fields(obj)]
        if part not in names:
            raise _unknown_key(key, all_keys(), source)
        if i == len(parts) - 1:
            if dataclasses.is_dataclass(getattr(obj, part)):
                raise ValueError(f"config: {key!r} is a group; set one of its keys, e.g. "
                                 f"{[k for k in all_keys() if k.startswith(key + '.')][0]}=...")
            hint = typing.get_type_hints(type(obj))[part]
            setattr(obj, part, _coerce(raw, hint, key))
        else:
            obj = getattr(obj, part)
            if not dataclasses.is_dataclass(obj):
                raise _unknown_key(key, all_keys(), source)


def _flatten(data: dict, prefix: str = "") -> list[tuple[str, object]]:
    items = []
    for k, v in data.items():
        if isinstance(v, dict):
            items += _flatten(v, f"{prefix}{k}.")
        else:
            items.append((f"{prefix}{k}", v))
    return items


def config_from_dict(data: dict, source: str = "dict") -> Config:
    """A Config from a nested mapping (a YAML preset or a checkpoint's "config"), validated."""
    cfg = Config()
    for key, value in _flatten(data):
        _set(cfg, key, value, source)
    validate(cfg)
    return cfg


def load_config(name_or_path: str | None = "demo", overrides: list[str] | None = None) -> Config:
    """Defaults, then the preset (name or YAML path; None: defaults only), then `key=value` overrides."""
    cfg = Config()
    if name_or_path is not None:
        data, source = _read_preset(name_or_path)
        for key, value in _flatten(data):
            _set(cfg, key, value, source)
    for item in overrides or []:
        if "=" not in item:
            raise ValueError(f"config: override {item!r} must look like key=value (e.g. steps=100)")
        key, text = item.split("=", 1)
        try:
            value = yaml.safe_load(text) if text != "" else None
        except yaml.YAMLError:
            value = text
        _set(cfg, key.strip(), value, "overrides")
    validate(cfg)
    return cfg


def validate(cfg: Config) -> None:
    """Reject values no run could use, naming the key."""
    if cfg.method not in METHODS:
        close = difflib.get_close_matches(cfg.method, METHODS, n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise ValueError(f"config: method must be one of {METHODS}, got {cfg.method!r}{hint}")
    if cfg.loss.centering is not None and cfg.loss.centering not in CENTERING_MODES:
        raise ValueError(f"config: loss.centering must be one of {CENTERING_MODES}, got {cfg.loss.centering!r}")
    if cfg.steps is not None and cfg.steps < 1:
        raise ValueError(f"config: steps must be >= 1, got {cfg.steps}")
    if cfg.epochs < 1:
        raise ValueError(f"config: epochs must be >= 1, got {cfg.epochs}")
    positive = {"train.batch_size": cfg.train.batch_size, "train.log_every": cfg.train.log_every,
                "train.ckpt_every": cfg.train.ckpt_every, "train.keep_last": cfg.train.keep_last,
                "model.out_dim": cfg.model.out_dim,
                "eval.knn_k": cfg.eval.knn_k, "optim.lr": cfg.optim.lr,
                "loss.student_temp": cfg.loss.student_temp, "loss.teacher_temp": cfg.loss.teacher_temp,
                "loss.warmup_teacher_temp": cfg.loss.warmup_teacher_temp,
                "eval.knn_temperature": cfg.eval.knn_temperature}
    for key, value in positive.items():
        if value <= 0:
            raise ValueError(f"config: {key} must be > 0, got {value}")
    if cfg.train.time_limit_min is not None and cfg.train.time_limit_min <= 0:
        raise ValueError(f"config: train.time_limit_min must be > 0 (or null), got {cfg.train.time_limit_min}")
    _validate_optim(cfg.optim)
    validate_crops(cfg.crops)
    if cfg.train.amp not in ("auto", "bf16", "none"):
        raise ValueError(f"config: train.amp must be auto, bf16 or none, got {cfg.train.amp!r}")
    if cfg.data.loader not in ("auto", "ffcv", "pil"):
        raise ValueError(f"config: data.loader must be auto, ffcv or pil, got {cfg.data.loader!r}")
    _validate_backbone(cfg)
    _validate_patch_grid(cfg)
    _validate_ibot(cfg)
    _validate_init_from(cfg.model)
    validate_augment(cfg.augment)
    _validate_proto_norms(cfg)
    _validate_continue(cfg)
    if cfg.dist.backend not in ("auto", "nccl", "gloo"):
        raise ValueError(f"config: dist.backend must be auto, nccl or gloo, got {cfg.dist.backend!r}")
    if not (math.isfinite(cfg.dist.timeout_s) and cfg.dist.timeout_s >= 1):
        raise ValueError(f"config: dist.timeout_s must be a number of seconds >= 1, got {cfg.dist.timeout_s} "
                         "(the default, 600, covers a checkpoint write; torch's own is 1800)")
    _validate_ddp_knobs(cfg.dist)
    if not 0.0 <= cfg.optim.momentum_teacher <= cfg.optim.momentum_teacher_end <= 1.0:
        raise ValueError("config: need 0 <= optim.momentum_teacher <= optim.momentum_teacher_end <= 1, got "
                         f"{cfg.optim.momentum_teacher} and {cfg.optim.momentum_teacher_end}")


def _validate_optim(optim: OptimConfig) -> None:
    """Values AdamW, the clipping and the schedules cannot use: torch's own errors would name no key (a
    negative weight decay) or none would come (a negative clip_grad disabled clipping silently)."""
    at_least_zero = {"optim.weight_decay": optim.weight_decay, "optim.weight_decay_end": optim.weight_decay_end,
                     "optim.min_lr": optim.min_lr, "optim.warmup_epochs": optim.warmup_epochs,
                     "optim.freeze_last_layer": optim.freeze_last_layer}
    for key, value in at_least_zero.items():
        if not (math.isfinite(value) and value >= 0):
            raise ValueError(f"config: {key} must be >= 0, got {value}")
    if not (math.isfinite(optim.clip_grad) and optim.clip_grad >= 0):
        raise ValueError(f"config: optim.clip_grad must be >= 0 (the largest gradient norm; 0 disables "
                         f"clipping), got {optim.clip_grad}")
    if not all(0.0 <= b < 1.0 for b in optim.betas):
        raise ValueError(f"config: optim.betas must both be in [0, 1), got {optim.betas}")


def _validate_backbone(cfg: Config) -> None:
    """`model.arch` a known size or preset, and each backbone option that is set a value a backbone can take."""
    m = cfg.model
    if m.arch not in arch_names():
        close = difflib.get_close_matches(m.arch, arch_names(), n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise ValueError(f"config: model.arch must be one of {arch_names()}, got {m.arch!r}{hint}")
    if m.depth is not None and m.depth < 1:
        raise ValueError(f"config: model.depth must be >= 1 (or null for the architecture's), got {m.depth}")
    for key in ("patch_size", "img_size"):
        if getattr(m, key) is not None and getattr(m, key) < 1:
            raise ValueError(f"config: model.{key} must be >= 1 (or null for the architecture's), got {getattr(m, key)}")
    if m.num_register_tokens is not None and m.num_register_tokens < 0:
        raise ValueError(f"config: model.num_register_tokens must be >= 0, got {m.num_register_tokens}")
    if m.layerscale_init is not None and not (math.isfinite(m.layerscale_init) and m.layerscale_init >= 0):
        raise ValueError(f"config: model.layerscale_init must be > 0 (0: no layer scale; null: the architecture's), "
                         f"got {m.layerscale_init}")
    kinds_of = {"ffn": FFN_KINDS, "pos_encoding": POS_ENCODINGS, "pos_embed_resample": POS_RESAMPLINGS}
    for key, kinds in kinds_of.items():
        if getattr(m, key) is not None and getattr(m, key) not in kinds:
            raise ValueError(f"config: model.{key} must be one of {kinds} (or null for the architecture's), "
                             f"got {getattr(m, key)!r}")


def _validate_patch_grid(cfg: Config) -> None:
    """Every image the ViT sees is cut into patch_size squares, which must tile it exactly (the patch
    embedding would otherwise fail after the data loader is built, naming its own arguments; iBOT's masks
    cover the global crop's patch grid)."""
    options = cfg.backbone
    p = options.patch_size
    sizes = {"crops.global_size": cfg.crops.global_size, "crops.local_size": cfg.crops.local_size}
    if cfg.eval.image_size is not None:
        sizes["eval.image_size"] = cfg.eval.image_size
    for key, size in sizes.items():
        if size % p:
            raise ValueError(f"config: {key} ({size}) must be a multiple of the patch size ({p}, model.patch_size "
                             f"or {cfg.model.arch}'s): the ViT cuts each image into {p} x {p} patches; "
                             f"e.g. {key}={max(p, size // p * p)}")
    grid = options.img_size or cfg.crops.global_size
    if options.pos_encoding == "learned" and grid % p:
        source = "model.img_size" if options.img_size else "crops.global_size"
        raise ValueError(f"config: {source} ({grid}) must be a multiple of the patch size ({p}): "
                         "the learned position embeddings cover a whole patch grid")


def _validate_ddp_knobs(dist: DistConfig) -> None:
    """DDP's knobs: a positive bucket size, and none of them set on an FSDP2 run, which they would not reach."""
    if not (math.isfinite(dist.bucket_cap_mb) and dist.bucket_cap_mb > 0):
        raise ValueError(f"config: dist.bucket_cap_mb must be a positive number of MiB, got {dist.bucket_cap_mb}")
    if dist.fsdp:
        default = DistConfig()
        for key in ("bucket_cap_mb", "gradient_as_bucket_view", "static_graph"):
            if getattr(dist, key) != getattr(default, key):
                raise ValueError(f"config: dist.{key} is a DDP setting, but this run uses FSDP2 (dist.fsdp=true); "
                                 f"leave it at {getattr(default, key)} or set dist.fsdp=false")


def _validate_proto_norms(cfg: Config) -> None:
    """The prototype-norm knobs act on g, which trains only with free norms (norm_last_layer false)."""
    spread, mult = cfg.model.proto_norm_init_spread, cfg.optim.proto_norm_lr_mult
    if not (math.isfinite(spread) and spread >= 0):
        raise ValueError(f"config: model.proto_norm_init_spread must be a finite sigma >= 0, got {spread}")
    if not (math.isfinite(mult) and mult >= 0):
        raise ValueError(f"config: optim.proto_norm_lr_mult must be finite and >= 0, got {mult}")
    if cfg.norm_last_layer:
        # With unit prototypes g is fixed at 1: a spread or an lr for it would be silently ignored.
        for key, value, default in (("model.proto_norm_init_spread", spread, 0.0),
                                    ("optim.proto_norm_lr_mult", mult, 1.0)):
            if value != default:
                raise ValueError(f"config: {key}={value} needs free prototype norms, but this run has unit "
                                 f"norms (method={cfg.method}, model.norm_last_layer={cfg.model.norm_last_layer});"
                                 " set model.norm_last_layer=false")


def _validate_continue(cfg: Config) -> None:
    """The continued-pretraining knobs: a backbone freeze needs weights worth keeping; decay in (0, 1]."""
    steps, decay = cfg.optim.freeze_backbone_steps, cfg.optim.layer_decay
    if steps < 0:
        raise ValueError(f"config: optim.freeze_backbone_steps must be >= 0, got {steps}")
    if steps and cfg.model.init_from is None:
        raise ValueError("config: optim.freeze_backbone_steps needs model.init_from (the weights to keep while the "
                         "fresh head learns); a random backbone has nothing to keep")
    if not (math.isfinite(decay) and 0 < decay <= 1):
        raise ValueError(f"config: optim.layer_decay must be in (0, 1] (1: off), got {decay}")


def _validate_init_from(model: ModelConfig) -> None:
    """Lenient loading must name what may differ, and only applies when there is a file to load."""
    if model.init_from is None:
        if not model.init_strict or model.init_ignore or model.init_trust_pickle:
            raise ValueError("config: model.init_strict / model.init_ignore / model.init_trust_pickle need "
                             "model.init_from (the weights to start from)")
    elif model.init_ignore and model.init_strict:
        raise ValueError(f"config: model.init_ignore={model.init_ignore} needs model.init_strict=false "
                         "(strict loading accepts no difference between the file and the model)")
    elif not model.init_strict and not model.init_ignore:
        raise ValueError("config: model.init_strict=false needs model.init_ignore, the keys that may differ "
                         "(e.g. model.init_ignore=[reg_token]); the error of a strict load lists them")


def validate_crops(crops: CropsConfig) -> None:
    """Reject crop settings no loader could use, naming the key (the loaders call this too)."""
    for key in ("global_size", "local_size"):
        if int(getattr(crops, key)) < 1:
            raise ValueError(f"config: crops.{key} must be a positive number of pixels, got {getattr(crops, key)}")
    if crops.n_local < 0:
        raise ValueError(f"config: crops.n_local must be >= 0, got {crops.n_local}")
    for key in ("global_scale", "local_scale"):
        lo, hi = getattr(crops, key)
        if not 0.0 < lo <= hi <= 1.0:
            raise ValueError(f"config: crops.{key} must satisfy 0 < low <= high <= 1, got {(lo, hi)}")


def validate_augment(aug: AugmentConfig) -> None:
    """Reject augmentation settings no run could use, naming the key (the loaders call this too)."""
    probabilities = {"flip_p": aug.flip_p, "jitter_p": aug.jitter_p, "gray_p": aug.gray_p,
                     "solarize_p": aug.solarize_p, **{f"blur_p[{i}]": p for i, p in enumerate(aug.blur_p)}}
    for key, p in probabilities.items():
        if not 0.0 <= p <= 1.0:
            raise ValueError(f"config: augment.{key} must be a probability in [0, 1], got {p}")
    for key in ("brightness", "contrast", "saturation"):
        if getattr(aug, key) < 0:
            raise ValueError(f"config: augment.{key} must be >= 0, got {getattr(aug, key)}")
    if not 0.0 <= aug.hue <= 0.5:
        raise ValueError(f"config: augment.hue must be in [0, 0.5], got {aug.hue}")
    lo, hi = aug.blur_sigma
    if not 0.0 < lo <= hi:
        raise ValueError(f"config: augment.blur_sigma must satisfy 0 < low <= high, got {aug.blur_sigma}")


def _validate_ibot(cfg: Config) -> None:
    ib = cfg.ibot
    if not 0.0 <= ib.mask_min_ratio <= ib.mask_max_ratio <= 1.0:
        raise ValueError("config: need 0 <= ibot.mask_min_ratio <= ibot.mask_max_ratio <= 1, got "
                         f"{ib.mask_min_ratio} and {ib.mask_max_ratio}")
    if not 0.0 <= ib.mask_probability <= 1.0:
        raise ValueError(f"config: ibot.mask_probability must be in [0, 1], got {ib.mask_probability}")
    if ib.patch_out_dim is not None and ib.patch_out_dim < 1:
        raise ValueError(f"config: ibot.patch_out_dim must be >= 1 (or null), got {ib.patch_out_dim}")
    if ib.loss_weight < 0:
        raise ValueError(f"config: ibot.loss_weight must be >= 0, got {ib.loss_weight}")


def dump_yaml(cfg: Config) -> str:
    """The resolved config as YAML (written to the run folder as config.yaml)."""
    return yaml.safe_dump(cfg.to_dict(), sort_keys=False)
