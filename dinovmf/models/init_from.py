"""`model.init_from`: start a run's backbone from weights the user already has (continue pretraining).

`load_init_weights(backbone, path)` copies into a freshly built backbone the weights of
- a dinovmf training checkpoint (`checkpoints/step_XXXXXXX/`, or a single-file `step_XXXXXXX.pt` of
  earlier versions): its teacher backbone, the EMA network that DINO evaluates and releases;
- a dinovmf export (`dinovmf export`: `.safetensors` + `.json`, recognised by its safetensors metadata);
- a ViT state dict, `.safetensors` or `.pth` / `.pt`, in any layout of `dinovmf.models.layouts`: timm's
  (`VisionTransformer`: classic, `vit_*_patch14_dinov2`, `vit_*_patch14_reg4_dinov2`; `Eva`:
  `vit_*_patch16_dinov3`), DINOv2's and DINOv3's released `.pth`, the original DINO's backbone release
  (`dino_deitsmall16_pretrain.pth`) or the `teacher` of a DINO training checkpoint (`checkpoint.pth`), a timm /
  DeiT training checkpoint (`model`). The layout is detected from the keys and reported.

Heads are never loaded: the DINO head and its prototypes start fresh, so `optim.freeze_last_layer` freezes
fresh prototypes as in any run. The position embeddings are resampled to the run's patch grid
(`crops.global_size / patch_size`) the way the forward pass resamples them for other crop sizes.

Anything that does not fit is an error before training starts, never a silent partial load: a key the
model has and the file lacks (missing) or the reverse (unexpected) is an `InitKeysError` listing them,
a tensor of another shape an `InitShapeError` naming it and both shapes; both describe the file's and
the model's architecture (blocks, width, patch, FFN, position encoding, registers, layer scale, qkv bias) and
name the `model.*` overrides that would make the model match the file. `ignore` (`model.init_strict=false`
`model.init_ignore=[...]`) accepts differences on the keys it names, and only those: such a key keeps
its fresh initialisation when missing or mis-shaped, and is dropped when unexpected.
"""
from __future__ import annotations

import json
import os
from fnmatch import fnmatchcase
from pathlib import Path
from typing import Sequence

import torch

from dinovmf.architectures import BACKBONE_PRESETS

from .export import METADATA_KEY, WRAPPER_PREFIXES, strip_prefixes
from .layouts import OPTIONAL_KEYS, ROPE_PERIODS_KEY, describe, describe_text, match_hint, to_dinovmf
from .rope import ROPE_BASE
from .vit import VisionTransformer, resize_pos_embed

# Prefixes around a backbone's keys: DDP / torch.compile wrappers, and the `backbone.` of a training
# network (DINO's and our MultiCropWrapper).
PREFIXES = WRAPPER_PREFIXES + ("backbone.",)
# Keys under these (after the prefixes) belong to a head, not to the backbone: timm's classifier (`head.`),
# DINO's and our DINO head (`head.`), iBOT's patch head (ours: `patch_head.`), DINOv2's (`dino_head.`,
# `ibot_head.`). They are dropped: the run's head starts fresh.
HEAD_PREFIXES = ("head.", "patch_head.", "dino_head.", "ibot_head.")
# Largest relative difference between a file's RoPE periods and the model's (bfloat16 rounding: 2^-8).
PERIODS_RTOL = 2 ** -8
# Checkpoint entries that hold a backbone's state dict, in order of preference: the EMA teacher of a
# dinovmf or DINO training checkpoint, then timm / DeiT (`model`) and Lightning-style (`state_dict`) ones.
CONTAINER_KEYS = ("teacher", "model", "state_dict")
LISTED = 12  # keys or shapes shown in an error before "... (N more)"


class InitFromError(ValueError):
    """`model.init_from` cannot be used: no such file, an unreadable one, or weights that do not fit."""


class InitKeysError(InitFromError):
    """Backbone keys missing from the file (`missing`) or present only in the file (`unexpected`)."""

    def __init__(self, where: str, architecture: str, missing: list[str], unexpected: list[str], hint: str = ""):
        self.missing, self.unexpected = missing, unexpected
        lines = [f"{where} does not match this backbone ({architecture}):"]
        if missing:
            lines.append(f"  missing from the file ({len(missing)}): {_listing(missing)}")
        if unexpected:
            lines.append(f"  unexpected in the file ({len(unexpected)}): {_listing(unexpected)}")
        if hint:
            lines.append(f"  to build the file's architecture: {hint}")
        lines.append("  to start named keys fresh (missing) or drop them (unexpected): "
                     "model.init_strict=false model.init_ignore=[PATTERN,...]")
        super().__init__("\n".join(lines))


class InitShapeError(InitFromError):
    """Tensors whose shape in the file differs from the model's: `mismatches` = [(key, file, model)]."""

    def __init__(self, where: str, architecture: str, mismatches: list[tuple[str, tuple, tuple]], hint: str = ""):
        self.mismatches = mismatches
        lines = [f"{where} does not fit this backbone ({architecture}): {len(mismatches)} tensor(s) differ "
                 "in shape:"]
        lines += [f"  {key}: file {list(file)}, model {list(model)}" for key, file, model in mismatches[:LISTED]]
        if len(mismatches) > LISTED:
            lines.append(f"  ... ({len(mismatches) - LISTED} more)")
        if hint:
            lines.append(f"  to build the file's architecture: {hint}")
        super().__init__("\n".join(lines))


def load_init_weights(backbone: VisionTransformer, path: str | os.PathLike, *, strict: bool = True,
                      ignore: Sequence[str] = (), trust_pickle: bool = False) -> str:
    """Copy the backbone weights of `path` into `backbone` (in place); returns a one-line report.

    `strict=False` with `ignore` (fnmatch patterns of our key names, e.g. `reg_token`, `blocks.*.ls1.*`)
    accepts differences on the matching keys only (module docstring); `mask_token`, which only iBOT
    training uses and exports leave out, keeps its fresh value when the file has none.
    `trust_pickle` (model.init_trust_pickle): read a .pt / .pth file that holds more than tensors and plain
    types (unpickling it can run code). Raises `InitFromError` (a ValueError): `InitKeysError`,
    `InitShapeError`, or a file problem.
    """
    path = require_file(path)
    raw, kind = read_weights(path, trust_pickle=trust_pickle)
    where = f"model.init_from {str(path)!r} ({kind})"
    state, dropped, layout = backbone_state(raw, where)
    if not kind.startswith("dinovmf"):  # a file from elsewhere: say which layout it was read as
        where = f"model.init_from {str(path)!r} ({kind}, {layout} layout)"
    target = backbone.state_dict()
    resized = _fit_pos_embed(state, backbone)
    patterns = () if strict else tuple(ignore)

    def accepted(key: str) -> bool:
        return any(fnmatchcase(key, p) for p in patterns)

    missing = [k for k in target if k not in state and k not in OPTIONAL_KEYS]
    unexpected = [k for k in state if k not in target]
    mismatched = [(k, tuple(state[k].shape), tuple(v.shape)) for k, v in target.items()  # in the model's order
                  if k in state and state[k].shape != v.shape]
    file_arch, model_arch = describe(state), describe(target)
    architecture = f"file: {describe_text(file_arch)}; model: {describe_text(model_arch)}"
    hint = match_hint(file_arch, model_arch)
    refused = [k for k in missing if not accepted(k)], [k for k in unexpected if not accepted(k)]
    if any(refused):
        raise InitKeysError(where, architecture, *map(_sorted, refused), hint=hint)
    if [m for m in mismatched if not accepted(m[0])]:
        raise InitShapeError(where, architecture, [m for m in mismatched if not accepted(m[0])], hint=hint)
    _check_rope_periods(state, target, where)

    # What is left differs only where `ignore` allows it; those keys keep their fresh values (and so does
    # the training-only mask token when the file has none, as an export).
    fresh = set(missing) | {k for k, _, _ in mismatched}
    loaded = {k: v for k, v in state.items() if k in target and k not in fresh}
    backbone.load_state_dict(loaded, strict=False)
    notes = [f"{where}: loaded {len(loaded)} of the backbone's {len(target)} tensors"]
    if resized:
        notes.append(resized)
    if _dinov2_without_registers(state) and backbone.pos_embed_resample != "offset":
        notes.append("a DINOv2 model without registers: DINOv2's own code resamples its positions for other crop "
                     "sizes with DINO's +0.1 offset (timm's port does not); model.pos_embed_resample=offset "
                     "reproduces DINOv2's features there")
    if fresh:
        notes.append(f"kept fresh: {_listing(_sorted(fresh))}")
    if unexpected:
        notes.append(f"dropped (init_ignore): {_listing(_sorted(unexpected))}")
    if dropped:
        notes.append(f"dropped {len(dropped)} head tensor(s)")
    differing = missing + unexpected + [k for k, _, _ in mismatched]
    unused = [p for p in patterns if not any(fnmatchcase(k, p) for k in differing)]
    if unused:
        notes.append(f"init_ignore patterns that matched nothing: {unused}")
    return "; ".join(notes) + "; the head starts fresh"


# ------------------------------------------------------------------------------------------- reading

def require_file(path: str | os.PathLike) -> Path:
    """`path` (user-expanded) if it is a file of a kind `read_weights` reads (or a dinovmf checkpoint
    directory), else an `InitFromError`. `train` calls it before preparing the data, which can take hours,
    so a typo fails at once."""
    path = Path(path).expanduser()
    if path.is_dir() and (path / "trainer.json").is_file():
        return path
    if not path.is_file():
        raise InitFromError(f"model.init_from: {str(path)!r} does not exist"
                            + (" as a file or a dinovmf checkpoint directory" if path.is_dir() else ""))
    if path.suffix not in (".safetensors", ".pt", ".pth"):
        raise InitFromError(f"model.init_from: {str(path)!r} is neither a .safetensors nor a torch .pt / .pth file")
    return path


def read_weights(path: str | os.PathLike, *, trust_pickle: bool = False) -> tuple[dict[str, torch.Tensor], str]:
    """(the tensors of `path`, what kind of file it is) for a .safetensors or a torch .pt / .pth file, or a
    dinovmf checkpoint directory (its teacher). `trust_pickle`: see `load_init_weights`."""
    path = require_file(path)
    if path.is_dir():
        return _read_checkpoint_dir(path)
    if path.suffix == ".safetensors":
        return _read_safetensors(path)
    return _read_torch(path, trust_pickle)


def _read_checkpoint_dir(path: Path) -> tuple[dict[str, torch.Tensor], str]:
    from dinovmf.checkpoint import network_state

    try:
        teacher, state = network_state(path, "teacher")
    except ValueError as e:
        raise InitFromError(f"model.init_from: {e}") from None
    return teacher, f"dinovmf checkpoint, teacher at step {state.get('step')}"


def _read_safetensors(path: Path) -> tuple[dict[str, torch.Tensor], str]:
    from safetensors import safe_open
    from safetensors.torch import load_file

    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
        tensors = load_file(str(path))
    except Exception as e:  # noqa: BLE001 - safetensors raises its own error types
        raise InitFromError(f"model.init_from: {str(path)!r} is not a readable safetensors file: {e}") from None
    if METADATA_KEY not in metadata:  # exports carry their config in the metadata, whatever the .json
        return tensors, "safetensors state dict"
    step = json.loads(metadata[METADATA_KEY]).get("step")
    return tensors, "dinovmf export" + ("" if step is None else f", step {step}")


def _read_torch(path: Path, trust_pickle: bool = False) -> tuple[dict[str, torch.Tensor], str]:
    from dinovmf.serialization import load_torch_file

    try:
        # Tensors and plain types only (DINO's argparse arguments and dinovmf's numpy RNG states allowed):
        # unpickling anything else could run code, unless the user vouches for the file.
        obj = load_torch_file(path, trust_pickle=trust_pickle, what="model.init_from",
                              opt_in="model.init_trust_pickle=true")
    except ValueError as e:
        raise InitFromError(str(e)) from None
    if _is_state_dict(obj):
        return obj, "state dict"
    if isinstance(obj, dict):
        for key in CONTAINER_KEYS:
            if _is_state_dict(obj.get(key)):
                if key == "teacher" and "model_args" in obj:
                    return obj[key], f"dinovmf checkpoint, teacher at step {obj.get('step')}"
                return obj[key], f"checkpoint[{key!r}]"
    found = _listing([str(k) for k in obj]) if isinstance(obj, dict) else type(obj).__name__
    raise InitFromError(f"model.init_from: {str(path)!r} is neither a state dict nor a checkpoint holding one "
                        f"under {list(CONTAINER_KEYS)} (found: {found})")


def _is_state_dict(obj) -> bool:
    return isinstance(obj, dict) and bool(obj) and all(torch.is_tensor(v) for v in obj.values())


# ------------------------------------------------------------------------------------------- mapping

def backbone_state(raw: dict[str, torch.Tensor], where: str) -> tuple[dict[str, torch.Tensor], list[str], str]:
    """(the backbone's tensors under our names, the head keys dropped, the file's layout) from a state dict of
    any layout above: wrapper prefixes stripped, head entries dropped, the layout detected and mapped to our
    names (`dinovmf.models.layouts`)."""
    state, dropped, origin = {}, [], {}
    for key, value in raw.items():
        name = strip_prefixes(key, PREFIXES)
        if name.startswith(HEAD_PREFIXES):
            dropped.append(key)
            continue
        if name in state:  # e.g. a student and a teacher in one flat dict: which one is meant?
            raise InitFromError(f"{where}: {origin[name]!r} and {key!r} both map to {name!r}")
        state[name], origin[name] = value, key
    try:
        state, layout = to_dinovmf(state)
    except ValueError as e:  # an unknown layout, or a DINOv3 file this backbone cannot represent
        raise InitFromError(f"{where}: {e}") from None
    return state, dropped, layout


def _check_rope_periods(state: dict[str, torch.Tensor], target: dict[str, torch.Tensor], where: str) -> None:
    """A file's RoPE periods (DINOv3 stores them) must be the model's up to bfloat16 rounding: other periods
    mean another RoPE base, which no key or shape would reveal."""
    periods, ours = state.get(ROPE_PERIODS_KEY), target.get(ROPE_PERIODS_KEY)
    if periods is None or ours is None or periods.shape != ours.shape:
        return
    worst = float(((periods.double() - ours.double()).abs() / ours.double()).max())
    if worst > PERIODS_RTOL:
        raise InitFromError(f"{where}: the file's RoPE periods differ from this backbone's by up to {worst:.1%} "
                            f"(another RoPE base than {ROPE_BASE:g}?); file {periods.tolist()[:4]}..., "
                            f"model {ours.tolist()[:4]}...")


def _fit_pos_embed(state: dict[str, torch.Tensor], backbone: VisionTransformer) -> str:
    """Resample the file's `pos_embed` (CLS + a square patch grid) to the backbone's grid in place; returns
    a note for the report. Anything else (another width, no CLS position, a RoPE backbone) is left to the
    key and shape checks."""
    pos = state.get("pos_embed")
    if pos is None or backbone.pos_embed is None:
        return ""
    want = backbone.pos_embed.shape
    if pos.ndim != 3 or pos.shape == want or pos.shape[-1] != want[-1]:
        return ""
    side = int(round((pos.shape[1] - 1) ** 0.5))
    if side < 1 or side * side != pos.shape[1] - 1:
        return ""
    grid = backbone.patch_embed.grid_size
    state["pos_embed"] = resize_pos_embed(pos, (side, side), (grid, grid), backbone.pos_embed_resample)
    return f"pos_embed resized from a {side}x{side} to a {grid}x{grid} patch grid"


def _dinov2_without_registers(state: dict[str, torch.Tensor]) -> bool:
    """Layer scale, DINOv2's patch and position grid (14, 37 x 37, from its preset) with a CLS slot and no
    registers: DINOv2's ViT-S/B/L/g without registers, in its hub layout or timm's (the keys do not tell them
    apart, their resampling does)."""
    dinov2 = BACKBONE_PRESETS["dinov2_vits14"].options
    patch, grid = dinov2.patch_size, dinov2.img_size // dinov2.patch_size
    pos, weight = state.get("pos_embed"), state.get("patch_embed.proj.weight")
    return ("blocks.0.ls1.gamma" in state and "reg_token" not in state and weight is not None
            and tuple(weight.shape[-2:]) == (patch, patch) and pos is not None and pos.ndim == 3
            and pos.shape[1] == 1 + grid * grid)


def _sorted(keys) -> list[str]:
    """Keys in natural order (blocks.2 before blocks.10)."""
    return sorted(keys, key=lambda k: [(0, int(p), "") if p.isdigit() else (1, 0, p) for p in k.split(".")])


def _listing(keys: list[str]) -> str:
    shown = ", ".join(keys[:LISTED])
    return shown if len(keys) <= LISTED else f"{shown}, ... ({len(keys) - LISTED} more)"
