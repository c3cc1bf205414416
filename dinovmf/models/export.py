"""Export the teacher backbone of a training checkpoint, in our (timm) key names or another layout.

The teacher (the EMA network) is what DINO evaluates and releases. The backbone's parameters already
carry timm's `vit_base_patch16_224` names (`cls_token`, `pos_embed`, `patch_embed.proj.*`,
`blocks.N.{norm1,attn.qkv,attn.proj,norm2,mlp.fc1,mlp.fc2}.*`, `norm.*`; `reg_token` with registers),
so the default export strips the wrapper prefix and drops `mask_token`, which only iBOT training uses.
`layout=` writes the names of another layout of `dinovmf.models.layouts` instead (`timm`: timm's
register / DINOv3 models; `dinov2`, `dinov3`: the released `.pth` files), so weights that came from one of
those go back into the code that reads them.

Written next to each other: `OUT.safetensors` or `OUT.pth` (a plain dict of tensors, which
`torch.load(weights_only=True)` reads; a safetensors file also carries the config in its metadata) and
`OUT.json` (the config and the layout, readable without tooling). Both are written to a temporary file
and renamed, so an interrupted export never leaves a truncated file under the name.

Layout note for timm users: with registers, our `pos_embed` covers CLS + patches and the registers get
no position embedding (DINOv2); timm's register models use `no_embed_class` instead, which `layout="timm"`
writes (the CLS position folded into `cls_token`).
"""
from __future__ import annotations

import inspect
import json
import os
import tempfile
from pathlib import Path

import torch

from dinovmf.architectures import OPTION_KEYS
from dinovmf.serialization import load_torch_file

from .layouts import LAYOUTS, OPTIONAL_KEYS, from_dinovmf, to_dinovmf
from .vit import VisionTransformer, build_backbone

FORMAT = "dinovmf.vit"
FORMAT_VERSION = 1
METADATA_KEY = "dinovmf_config"
# Prefixes that DDP (`module.`) and torch.compile (`_orig_mod.`) add to state_dict keys.
WRAPPER_PREFIXES = ("module.", "_orig_mod.")
# build_backbone kwargs that define the architecture (the rest only affect training or kernels).
ARCHITECTURE_ARGS = ("name", "depth") + OPTION_KEYS


def strip_prefixes(key: str, prefixes: tuple[str, ...] = WRAPPER_PREFIXES) -> str:
    """`key` without any leading `prefixes`, in any order and repetition (`module._orig_mod.x` -> `x`)."""
    changed = True
    while changed:
        changed = False
        for prefix in prefixes:
            if key.startswith(prefix):
                key, changed = key[len(prefix):], True
    return key


def _read_checkpoint(ckpt_path: Path, which: str = "teacher", trust_pickle: bool = False) -> dict:
    """A training checkpoint of either format (a step_N directory or a single .pt file) as a dict holding the
    `which` ("teacher" or "student") network's state dict and "model_args", read without running pickled
    code (dinovmf.serialization; `trust_pickle` for a .pt file holding more). ValueError otherwise."""
    from dinovmf.checkpoint import network_state

    network, state = network_state(ckpt_path, which, trust_pickle=trust_pickle)
    return {**state, which: network}


def _architecture_args(model_args: dict) -> dict:
    """The architecture-defining build_backbone kwargs of `model_args` (ValueError if malformed)."""
    if not isinstance(model_args, dict) or "name" not in model_args:
        raise ValueError(f"model_args must be a dict of build_backbone kwargs with a 'name', "
                         f"got {model_args!r}")
    known = set(inspect.signature(build_backbone).parameters)
    unknown = sorted(set(model_args) - known)
    if unknown:
        raise ValueError(f"model_args has keys build_backbone does not take: {unknown}")
    return {k: model_args[k] for k in ARCHITECTURE_ARGS if k in model_args}


def teacher_backbone_state(teacher_state: dict) -> dict[str, torch.Tensor]:
    """`backbone.*` entries of a MultiCropWrapper state_dict (the teacher's or the student's), prefix (and
    DDP/compile wrappers) removed."""
    out = {}
    for key, value in teacher_state.items():
        key = strip_prefixes(key)
        if key.startswith("backbone."):
            out[strip_prefixes(key[len("backbone."):])] = value
    if not out:
        raise ValueError("the checkpoint's network state has no 'backbone.*' entries")
    return out


def backbone_config(model: VisionTransformer, arch_args: dict) -> dict:
    """JSON-serialisable description of an exported backbone (rebuild args + timm layout facts)."""
    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "model_args": {**{"patch_size": model.patch_size, "img_size": model.img_size,
                          "num_register_tokens": model.num_register_tokens}, **arch_args},
        "embed_dim": model.embed_dim,
        "depth": model.depth,
        "num_heads": model.num_heads,
        "mlp_ratio": model.mlp_ratio,
        "layer_norm_eps": model.layer_norm_eps,
        "layerscale_init": model.layerscale_init,
        "ffn": model.ffn,
        "pos_encoding": model.pos_encoding,
        "qkv_bias": model.qkv_bias,
        "class_token": True,
        "pos_embed_covers": "cls+patches" if model.pos_embed is not None else None,  # registers have none
        "pos_embed_resample": model.pos_embed_resample,
        "num_classes": 0,
    }


def _uninitialised_backbone(**arch_args) -> VisionTransformer:
    """A backbone with allocated but unset parameters: every one is about to be overwritten by a
    state_dict, so the random initialisation (most of the build time) is skipped."""
    with torch.device("meta"):
        model = build_backbone(**arch_args)
    model = model.to_empty(device="cpu")
    model.init_buffers()
    return model


def _atomic_write(path: Path, write) -> None:
    """Call write(tmp_path), then rename tmp_path over `path` (same directory, so atomic)."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _checkpoint_backbone(ckpt: dict, ckpt_path: Path, which: str,
                         attn_backend: str = "sdpa") -> tuple[VisionTransformer, dict]:
    """(the `which` network's backbone of a read training checkpoint, its architecture args)."""
    arch_args = _architecture_args(ckpt["model_args"])
    model = _uninitialised_backbone(**arch_args, attn_backend=attn_backend)
    try:
        model.load_state_dict(teacher_backbone_state(ckpt[which]), strict=True)
    except RuntimeError as e:
        raise ValueError(f"{which} backbone of {str(ckpt_path)!r} does not match model_args "
                         f"{arch_args}: {e}") from None
    return model, arch_args


EXPORT_SUFFIXES = (".safetensors", ".pth")
# key_layout values written by earlier versions of the export.
LEGACY_LAYOUT_NAMES = {"timm vit_base_patch16_224": "dinovmf"}


def export_teacher_backbone(ckpt_path: str | os.PathLike, out_path: str | os.PathLike,
                            layout: str = "dinovmf", *, trust_pickle: bool = False) -> Path:
    """Write the teacher backbone of training checkpoint `ckpt_path` (a step_N directory or a single-file
    .pt checkpoint) to `out_path` (.safetensors or .pth) in `layout`'s key names
    (`dinovmf.models.layouts.LAYOUTS`) and its config to the `.json` beside it; returns the weights' path.
    `trust_pickle`: read a .pt file holding more than tensors and plain types.

    The state is loaded into a freshly built backbone first, so a checkpoint whose weights do not
    match its `model_args` fails here with a ValueError instead of producing an unloadable file.
    """
    from safetensors.torch import save_file

    ckpt_path, out_path = Path(ckpt_path), Path(out_path)
    if out_path.suffix not in EXPORT_SUFFIXES:
        raise ValueError(f"out_path must end in {' or '.join(EXPORT_SUFFIXES)}, got {str(out_path)!r}")
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    ckpt = _read_checkpoint(ckpt_path, trust_pickle=trust_pickle)
    model, arch_args = _checkpoint_backbone(ckpt, ckpt_path, "teacher")

    tensors = from_dinovmf(model.state_dict(), layout, model)
    config = backbone_config(model, arch_args)
    config["key_layout"] = layout
    if "step" in ckpt:
        config["step"] = int(ckpt["step"])

    out_path.parent.mkdir(parents=True, exist_ok=True)
    if out_path.suffix == ".safetensors":
        _atomic_write(out_path, lambda tmp: save_file(tensors, tmp, metadata={METADATA_KEY: json.dumps(config)}))
    else:
        _atomic_write(out_path, lambda tmp: torch.save(tensors, tmp))
    json_path = out_path.with_suffix(".json")
    _atomic_write(json_path, lambda tmp: Path(tmp).write_text(json.dumps(config, indent=2) + "\n"))
    return out_path


def _read_config(path: Path) -> dict:
    """The export config: `<path>.json` when present, else the safetensors metadata."""
    from safetensors import safe_open

    json_path = path.with_suffix(".json")
    if json_path.is_file():
        config = json.loads(json_path.read_text())
    elif path.suffix != ".safetensors":
        raise ValueError(f"{str(path)!r} has no {json_path.name}; it was not written by export_teacher_backbone")
    else:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
        if METADATA_KEY not in meta:
            raise ValueError(f"{str(path)!r} has no {json_path.name} and no dinovmf config in its "
                             "metadata; it was not written by export_teacher_backbone")
        config = json.loads(meta[METADATA_KEY])
    if config.get("format") != FORMAT:
        raise ValueError(f"{str(path)!r}: config format is {config.get('format')!r}, expected {FORMAT!r}")
    return config


def _export_weights(json_path: Path) -> Path:
    """The weights file an export's .json describes (.safetensors, else .pth)."""
    for suffix in EXPORT_SUFFIXES:
        if json_path.with_suffix(suffix).is_file():
            return json_path.with_suffix(suffix)
    return json_path.with_suffix(".safetensors")


def is_export(path: str | os.PathLike) -> bool:
    """Whether `path` is an export (.safetensors / .json, or a .pth with the export's .json beside it)."""
    path = Path(path)
    return path.suffix in (".safetensors", ".json") or (path.suffix == ".pth" and path.with_suffix(".json").is_file())


def load_backbone(path: str | os.PathLike, which: str = "teacher", attn_backend: str = "sdpa", *,
                  trust_pickle: bool = False) -> VisionTransformer:
    """A backbone, in eval mode on the CPU, from an export written by `export_teacher_backbone` (.safetensors or
    .pth with its .json, or the .json: the teacher, in any layout) or from a training checkpoint (a step_N
    directory or a single-file .pt: the `which` network, "teacher" or "student"; `trust_pickle` for a .pt
    holding more than tensors and plain types). The one loader of `dinovmf eval`, `dinovmf attention` and the
    Python API."""
    path = Path(path)
    if is_export(path):
        if which != "teacher":
            raise ValueError(f"{str(path)!r} is an export, which holds the teacher backbone only; "
                             f"the {which} needs a training checkpoint")
        return _load_export(_export_weights(path) if path.suffix == ".json" else path, attn_backend)
    model, _ = _checkpoint_backbone(_read_checkpoint(path, which, trust_pickle), path, which, attn_backend)
    return model.eval()


def _load_export(path: Path, attn_backend: str) -> VisionTransformer:
    from safetensors.torch import load_file

    if not path.is_file():
        raise ValueError(f"backbone file {str(path)!r} does not exist")
    config = _read_config(path)
    if path.suffix == ".pth":  # tensors only, read without running pickled code
        state = load_torch_file(path, what="export")
    else:
        try:
            state = load_file(str(path))
        except Exception as e:  # noqa: BLE001 - safetensors raises its own error types
            raise ValueError(f"{str(path)!r} is not a readable {path.suffix} file: {e}") from None
    layout = config.get("key_layout", "dinovmf")
    state, _ = to_dinovmf(state, LEGACY_LAYOUT_NAMES.get(layout, layout))
    model = _uninitialised_backbone(**config["model_args"], attn_backend=attn_backend)
    try:
        missing, unexpected = model.load_state_dict(state, strict=False)
    except RuntimeError as e:  # shape mismatches
        raise ValueError(f"{str(path)!r} does not match its config {config['model_args']}: {e}") from None
    if [k for k in missing if k not in OPTIONAL_KEYS] or unexpected:
        raise ValueError(f"{str(path)!r} does not match its config {config['model_args']}: "
                         f"missing {missing}, unexpected {unexpected}")
    if "mask_token" in missing:
        with torch.no_grad():
            model.mask_token.zero_()  # not exported; its fresh-model value
    return model.eval()
