"""State-dict layouts of ViT backbones: ours and the ones released weights come in, detected and mapped both ways.

Our names are timm's classic `VisionTransformer` names (`dinovmf/models/vit.py`). The layouts:

- `dinovmf`: ours. timm's classic ViT, the original DINO's backbone and DINOv2's hub `.pth` without registers
  use these names too (DINOv2 adds `mask_token`, which our backbone also has).
- `timm`: timm's ports of the DINO-family models. `vit_*_patch14_dinov2` is ours; the register models
  `vit_*_patch14_reg4_dinov2` use `no_embed_class`: `pos_embed` covers the patches only and the CLS
  position is folded into `cls_token` (timm's `_convert_dinov2`); the DINOv3 models `vit_*_patch16_dinov3`
  are timm's `Eva`: layer scale `blocks.N.gamma_1` / `gamma_2`, the query / value biases `attn.q_bias` /
  `attn.v_bias` (the `_qkvb` variants; the key bias is a zero buffer), a SwiGLU's `fc1_g` / `fc1_x` when
  unpacked, no `pos_embed`, no RoPE periods (timm computes them).
- `dinov2`: facebookresearch/dinov2's `.pth` (`dinov2_vits14_reg4_pretrain.pth`, ...): `register_tokens`,
  `mask_token`, `blocks.N.ls1.gamma`, the fused SwiGLU as `mlp.w12` / `mlp.w3`; training checkpoints with
  `block_chunks` > 0 name blocks `blocks.C.N.`.
- `dinov3`: facebookresearch/dinov3's `.pth` (`dinov3_vits16_pretrain_lvd1689m-*.pth`, ...):
  `storage_tokens`, `rope_embed.periods` (bfloat16-rounded values), `attn.qkv.bias` with `attn.qkv.bias_mask`
  (1 on q and v, 0 on k: `mask_k_bias`), `mask_token`, `blocks.N.ls1.gamma`, a SwiGLU as `mlp.w1` / `w2` / `w3`.

`detect_layout(keys)` says which layout a state dict is in and which keys decided it; `to_dinovmf(state,
layout)` maps it to our names (`model.init_from`, `load_backbone`); `from_dinovmf(state, layout, model)` maps
ours back (`dinovmf export --layout`), so weights return to the code they came from.
"""
from __future__ import annotations

import re

import torch

from dinovmf.architectures import swiglu_hidden_dim

LAYOUTS = ("dinovmf", "timm", "dinov2", "dinov3")
ROPE_PERIODS_KEY = "rope.periods"   # computed from the head dimension; a file may carry it (DINOv3) or not (timm)
TRAINING_ONLY_KEYS = ("mask_token",)  # trained by iBOT only: our exports and timm's models leave it out
# Keys a file may lack, which then keep the model's value: the training-only mask token and the RoPE periods,
# which follow from the head dimension (timm does not store them; DINOv3 does).
OPTIONAL_KEYS = TRAINING_ONLY_KEYS + (ROPE_PERIODS_KEY,)
# What each layout is recognised by (regexes over whole keys), tried in this order; timm is also recognised by
# a register ViT whose pos_embed has no CLS slot (`_no_embed_class`). Also the text of UnknownLayoutError.
MARKERS = {
    "dinov3": (r"storage_tokens", r"rope_embed\.periods", r"blocks\.\d+\.attn\.qkv\.bias_mask",
               r"blocks\.\d+\.mlp\.w[12]\.weight"),
    "dinov2": (r"register_tokens", r"blocks\.\d+\.mlp\.w12\.weight", r"blocks\.\d+\.\d+\.norm1\.weight"),
    "timm": (r"blocks\.\d+\.gamma_1", r"blocks\.\d+\.attn\.[qv]_bias", r"blocks\.\d+\.mlp\.fc1_[gx]\.weight"),
    "dinovmf": (r"cls_token", r"patch_embed\.proj\.weight", r"blocks\.\d+\.norm1\.weight"),
}
LISTED = 12


class UnknownLayoutError(ValueError):
    """A state dict in none of LAYOUTS: says which layouts were tried and which keys decide each."""


def _matching(keys, patterns) -> list[str]:
    return [k for k in keys if any(re.fullmatch(p, k) for p in patterns)]


def _no_embed_class(state: dict) -> bool:
    """timm's register ViT: registers, and a pos_embed over a square patch grid without a CLS slot."""
    pos = state.get("pos_embed")
    if "reg_token" not in state or pos is None or pos.ndim != 3:
        return False
    side = int(round(pos.shape[1] ** 0.5))
    return side * side == pos.shape[1]


def detect_layout(state: dict[str, torch.Tensor]) -> tuple[str, list[str]]:
    """(layout, the keys that decided it) of a backbone state dict (prefixes and heads already removed).
    UnknownLayoutError when no layout's marker keys are there."""
    keys = list(state)
    for layout, patterns in MARKERS.items():
        found = _matching(keys, patterns)
        if layout == "timm" and _no_embed_class(state):
            found += ["reg_token", "pos_embed (no CLS slot)"]
        if found:
            return layout, found[:LISTED]
    tried = "; ".join(f"{layout}: {' / '.join(_readable(p) for p in patterns)}" for layout, patterns in MARKERS.items())
    shown = ", ".join(keys[:LISTED]) + (f", ... ({len(keys) - LISTED} more)" if len(keys) > LISTED else "")
    raise UnknownLayoutError(f"not a ViT backbone in any known layout; tried {tried} (timm also: reg_token with "
                             f"a pos_embed without CLS slot); the file's keys: {shown or 'none'}")


def _readable(pattern: str) -> str:
    r"""A marker regex as a user reads key names: `blocks\.\d+\.gamma_1` -> `blocks.N.gamma_1`."""
    return pattern.replace(r"\d+", "N").replace(r"[12]", "1").replace(r"[qv]", "q").replace(r"[gx]", "g") \
        .replace("\\", "")


# ------------------------------------------------------------------------------------------ to ours

def to_dinovmf(state: dict[str, torch.Tensor], layout: str | None = None) -> tuple[dict[str, torch.Tensor], str]:
    """(the state dict under our names, its layout); the layout is detected when not given."""
    layout = layout or detect_layout(state)[0]
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    state = dict(state)
    if layout == "dinov2":
        state = {re.sub(r"^blocks\.\d+\.(\d+)\.", r"blocks.\1.", k): v for k, v in state.items()}  # block chunks
        _rename(state, {"register_tokens": "reg_token"})
        _rename_blocks(state, {"mlp.w12": "mlp.fc1", "mlp.w3": "mlp.fc2"})
    elif layout == "dinov3":
        _rename(state, {"storage_tokens": "reg_token", "rope_embed.periods": ROPE_PERIODS_KEY})
        _rename_blocks(state, {"mlp.w3": "mlp.fc2"})
        _pack_swiglu(state, "mlp.w1", "mlp.w2")
        _split_masked_qkv_bias(state)
    elif layout == "timm":
        _rename_blocks(state, {"gamma_1": "ls1.gamma", "gamma_2": "ls2.gamma"})
        _pack_swiglu(state, "mlp.fc1_g", "mlp.fc1_x")
        if _no_embed_class(state):  # the CLS position was folded into cls_token: ours adds a zero one
            pos = state["pos_embed"]
            state["pos_embed"] = torch.cat((pos.new_zeros(1, 1, pos.shape[-1]), pos), dim=1)
    return state, layout


def _rename(state: dict, names: dict[str, str]) -> None:
    for old, new in names.items():
        if old in state:
            state[new] = state.pop(old)


def _rename_blocks(state: dict, parts: dict[str, str]) -> None:
    """`blocks.N.<old>.*` -> `blocks.N.<new>.*` for each (old, new) of `parts`."""
    for key in list(state):
        for old, new in parts.items():
            match = re.fullmatch(rf"(blocks\.\d+\.){re.escape(old)}(\..+)?", key)
            if match:
                state[f"{match.group(1)}{new}{match.group(2) or ''}"] = state.pop(key)
                break


def _pack_swiglu(state: dict, gate: str, value: str) -> None:
    """A SwiGLU stored as two linears (`blocks.N.<gate>`, `blocks.N.<value>`) -> our packed `mlp.fc1` (gate
    rows first)."""
    for key in list(state):
        match = re.fullmatch(rf"(blocks\.\d+\.){re.escape(gate)}\.(weight|bias)", key)
        other = match and f"{match.group(1)}{value}.{match.group(2)}"
        if match and other in state:
            state[f"{match.group(1)}mlp.fc1.{match.group(2)}"] = torch.cat((state.pop(key), state.pop(other)))


def _split_masked_qkv_bias(state: dict) -> None:
    """DINOv3's `attn.qkv.bias` [3D] (+ `bias_mask`) -> our `attn.q_bias`, `attn.v_bias` [D]. The key bias never
    acts in DINOv3 (masked), so it is dropped; a file whose key bias is unmasked and nonzero (a model trained
    without `mask_k_bias`) is refused: our RoPE attention would silently drop a bias that changed its outputs."""
    for key in [k for k in state if re.fullmatch(r"blocks\.\d+\.attn\.qkv\.bias", k)]:
        bias, mask = state.pop(key), state.pop(key + "_mask", None)
        D = bias.shape[0] // 3
        if mask is not None:
            expected = torch.cat((torch.ones(D), torch.zeros(D), torch.ones(D))).to(mask.dtype)
            if not torch.equal(mask, expected):
                raise ValueError(f"{key}_mask is not DINOv3's key-bias mask (1 on q and v, 0 on k)")
        elif bias[D:2 * D].abs().max() > 0:
            raise ValueError(f"{key} has a nonzero key bias and no bias_mask: this DINOv3 model was trained "
                             "without mask_k_bias, and dinovmf's RoPE attention masks the key bias")
        prefix = key[:-len("qkv.bias")]
        state[prefix + "q_bias"], state[prefix + "v_bias"] = bias[:D], bias[2 * D:]


# ------------------------------------------------------------------------------------------ from ours

def from_dinovmf(state: dict[str, torch.Tensor], layout: str, model) -> dict[str, torch.Tensor]:
    """Our state dict (of `model`, a VisionTransformer) in `layout`'s names, for `dinovmf export --layout`.

    `dinovmf` and `timm` leave out the mask token (only iBOT trains it; neither timm model has one) and timm
    the RoPE periods (timm computes them); `dinov2` / `dinov3` keep both, as their `.pth` files do. ValueError
    when the layout cannot hold the model (DINOv2 has no RoPE, DINOv3 no learned position embeddings).
    """
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    rope = model.pos_encoding == "rope"
    if layout == "dinov2" and rope:
        raise ValueError("layout dinov2 holds learned position embeddings; this backbone uses RoPE "
                         "(use --layout dinov3 or timm)")
    if layout == "dinov3" and not rope:
        raise ValueError("layout dinov3 holds a RoPE backbone; this one has learned position embeddings "
                         "(use --layout dinov2 or timm)")
    state = {k: v.detach().cpu().contiguous() for k, v in state.items()}
    if layout in ("dinovmf", "timm"):
        for key in TRAINING_ONLY_KEYS:
            state.pop(key, None)
    if layout == "timm":
        state.pop(ROPE_PERIODS_KEY, None)
        if rope:
            _rename_blocks(state, {"ls1.gamma": "gamma_1", "ls2.gamma": "gamma_2"})
        elif "reg_token" in state:  # timm's no_embed_class: fold the CLS position into cls_token
            state["cls_token"] = state["cls_token"] + state["pos_embed"][:, :1]
            state["pos_embed"] = state["pos_embed"][:, 1:].contiguous()
    elif layout == "dinov2":
        _rename(state, {"reg_token": "register_tokens"})
        _rename_blocks(state, {"mlp.fc1": "mlp.w12", "mlp.fc2": "mlp.w3"} if model.ffn == "swiglu" else {})
    elif layout == "dinov3":
        _rename(state, {"reg_token": "storage_tokens", ROPE_PERIODS_KEY: "rope_embed.periods"})
        for key in [k for k in state if re.fullmatch(r"blocks\.\d+\.attn\.q_bias", k)]:
            prefix = key[:-len("q_bias")]
            q, v = state.pop(key), state.pop(prefix + "v_bias")
            state[prefix + "qkv.bias"] = torch.cat((q, torch.zeros_like(q), v))
            state[prefix + "qkv.bias_mask"] = torch.cat((torch.ones_like(q), torch.zeros_like(q), torch.ones_like(q)))
        if model.ffn == "swiglu":
            for key in list(state):
                match = re.fullmatch(r"(blocks\.\d+\.mlp\.)fc1\.(weight|bias)", key)
                if match:
                    gate, value = state.pop(key).chunk(2)
                    state[f"{match.group(1)}w1.{match.group(2)}"] = gate.contiguous()
                    state[f"{match.group(1)}w2.{match.group(2)}"] = value.contiguous()
            _rename_blocks(state, {"mlp.fc2": "mlp.w3"})
    return state


# ------------------------------------------------------------------------------------------ describing

def describe(state: dict[str, torch.Tensor]) -> dict:
    """The architecture a state dict in our names holds: blocks, width, patch, ffn, positions, registers,
    layer scale, qkv bias (None where the keys do not say). Compared field by field in init_from's errors."""
    blocks = {int(k.split(".")[1]) for k in state if re.match(r"blocks\.\d+\.", k)}
    width = state["cls_token"].shape[-1] if "cls_token" in state else None
    proj = state.get("patch_embed.proj.weight")
    fc1 = state.get("blocks.0.mlp.fc1.weight")
    ffn = None
    if fc1 is not None and width:
        ffn = {4 * width: "mlp", 2 * swiglu_hidden_dim(4 * width): "swiglu"}.get(fc1.shape[0])
    reg = state.get("reg_token")
    return {
        "blocks": len(blocks), "width": width, "patch": proj.shape[-1] if proj is not None and proj.ndim == 4 else None,
        "ffn": ffn, "positions": "learned" if "pos_embed" in state else "rope",
        "registers": 0 if reg is None else reg.shape[1],
        "layer scale": "blocks.0.ls1.gamma" in state,
        "qkv bias": any(k in state for k in ("blocks.0.attn.qkv.bias", "blocks.0.attn.q_bias")),
    }


def describe_text(desc: dict) -> str:
    """'12 blocks, width 384, patch 14, mlp FFN, learned positions, 4 registers, layer scale, qkv bias'."""
    def shown(value):
        return "?" if value is None else value
    return ", ".join([f"{desc['blocks']} blocks", f"width {shown(desc['width'])}", f"patch {shown(desc['patch'])}",
                      f"{shown(desc['ffn'])} FFN", f"{desc['positions']} positions", f"{desc['registers']} registers",
                      "layer scale" if desc["layer scale"] else "no layer scale",
                      "qkv bias" if desc["qkv bias"] else "no qkv bias"])


# Config overrides that make the model match a file, per described field (the size needs model.arch / depth).
_HINTS = {"patch": "model.patch_size={}", "ffn": "model.ffn={}", "positions": "model.pos_encoding={}",
          "registers": "model.num_register_tokens={}", "qkv bias": "model.qkv_bias={}"}


def match_hint(file: dict, model: dict) -> str:
    """The `model.*` overrides that would give the model the file's architecture ('' when none would)."""
    hints = []
    for field, value in file.items():
        if value is None or value == model.get(field):
            continue
        if field in _HINTS:
            hints.append(_HINTS[field].format(str(value).lower() if isinstance(value, bool) else value))
        elif field == "layer scale":
            hints.append("model.layerscale_init=1e-5" if value else "model.layerscale_init=0")
        elif field in ("blocks", "width"):
            hints.append("model.arch / model.depth for the file's size")
    return " ".join(dict.fromkeys(hints))
