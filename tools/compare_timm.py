"""Real timm against `model.init_from`: timm's DINOv2 / DINOv3 ports with random weights, loaded through dinovmf.

timm cannot be imported in the project's venv (its torchvision needs another torch than the CPU 2.13 wheel), so
this runs in two steps and two environments; timm is never a dependency of the project:

    python3 -m venv /work/timm-venv && /work/timm-venv/bin/pip install torch==2.14.1 torchvision==0.29.1 timm safetensors
    /work/timm-venv/bin/python tools/compare_timm.py save --out /tmp/timm_compare     # timm: weights, inputs, features
    .venv/bin/python tools/compare_timm.py compare --out /tmp/timm_compare            # dinovmf: load, run, compare

`save` builds each model of MODELS with timm (`pretrained=False`), draws every layer-scale gamma, bias and norm
weight at random (timm's init has gammas of 1e-5, which would make every block nearly the identity and hide a
wrong block), writes its state dict as timm saves it (`<model>.safetensors`), fixed random images at two sizes
and timm's `forward_features` on them (`<model>.pt`: plain tensors) and `<model>.json`. `compare` loads each
state dict into the matching dinovmf backbone through `dinovmf.models.init_from.load_init_weights` (the code
`model.init_from` runs), runs it on the same images and records the largest absolute difference of the CLS and
of the patch features to `bench/results/timm_compare.{csv,png}`.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

# timm model -> (dinovmf architecture and options, the two input sizes: the native grid first)
MODELS = {
    "vit_small_patch14_dinov2": ({"name": "dinov2_vits14"}, (518, 224)),
    "vit_small_patch14_reg4_dinov2": ({"name": "dinov2_vits14_reg4"}, (518, 224)),
    "vit_giant_patch14_dinov2": ({"name": "dinov2_vitg14"}, (518, 224)),  # SwiGLU (timm: packed GluMlp)
    "vit_small_patch16_dinov3_qkvb": ({"name": "dinov3_vits16"}, (224, 96)),
    "vit_small_patch16_dinov3": ({"name": "dinov3_vits16", "qkv_bias": False}, (224, 96)),
    "vit_base_patch16_dinov3_qkvb": ({"name": "dinov3_vitb16"}, (224, 96)),
}
BATCH = 2


def save(out: Path) -> None:
    """Step 1, in a venv with timm: weights, images and timm's features of every model of MODELS."""
    import timm
    from safetensors.torch import save_file

    out.mkdir(parents=True, exist_ok=True)
    for name, (_, sizes) in MODELS.items():
        torch.manual_seed(0)
        model = timm.create_model(name, pretrained=False, num_classes=0, dynamic_img_size=True).eval()
        with torch.no_grad():
            for key, p in model.named_parameters():
                if key.endswith(("gamma", "gamma_1", "gamma_2")):
                    p.uniform_(0.2, 1.0)
                elif key.endswith(("bias", "q_bias", "v_bias")):
                    p.normal_(0.0, 0.1)
                elif "norm" in key and key.endswith("weight"):
                    p.normal_(1.0, 0.1)
            images = {size: torch.randn(BATCH, 3, size, size) for size in sizes}
            tokens = {size: model.forward_features(x) for size, x in images.items()}
        prefix = model.num_prefix_tokens
        features = {f"{kind}_{size}": t for size, t in tokens.items()
                    for kind, t in (("cls", t[:, 0]), ("patch", t[:, prefix:]))}
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(out / f"{name}.safetensors"))
        torch.save({**{f"images_{s}": x for s, x in images.items()}, **features}, out / f"{name}.pt")
        (out / f"{name}.json").write_text(json.dumps({"timm": timm.__version__, "torch": torch.__version__,
                                                      "sizes": list(sizes), "num_prefix_tokens": prefix}))
        print(f"saved {name} (timm {timm.__version__}, torch {torch.__version__})", flush=True)


def compare(out: Path, results_dir: Path | None) -> list[dict]:
    """Step 2, in the project's venv: each saved model through model.init_from, against timm's features."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from bench.harness import record
    from dinovmf.models import build_backbone
    from dinovmf.models.init_from import load_init_weights

    rows = []
    for name, (args, sizes) in MODELS.items():
        meta = json.loads((out / f"{name}.json").read_text())
        saved = torch.load(out / f"{name}.pt", weights_only=True)
        model = build_backbone(**args).eval()
        report = load_init_weights(model, out / f"{name}.safetensors")
        print(report, flush=True)
        for size in sizes:
            with torch.no_grad():
                ours = model.forward_features(saved[f"images_{size}"])
            row = {"timm_model": name, "dinovmf_arch": " ".join(f"{k}={v}" for k, v in args.items()),
                   "size": size, "native_grid": size == sizes[0], "timm": meta["timm"], "timm_torch": meta["torch"]}
            for kind in ("cls", "patch"):
                theirs = saved[f"{kind}_{size}"]
                row[f"max_abs_diff_{kind}"] = float((ours[kind] - theirs).abs().max())
                row[f"max_abs_{kind}"] = float(theirs.abs().max())
            rows.append(row)
    record("timm_compare", rows, x="size", y="max_abs_diff_patch", group="timm_model",
           title="dinovmf (model.init_from) vs timm: max |diff| of the patch features (0: bitwise equal)",
           results_dir=results_dir)
    return rows


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("step", choices=("save", "compare"))
    parser.add_argument("--out", default="/tmp/timm_compare", help="folder for the weights, images and features")
    parser.add_argument("--results-dir", default=None, help="default: bench/results")
    args = parser.parse_args(argv)
    if args.step == "save":
        save(Path(args.out))
    else:
        compare(Path(args.out), args.results_dir)


if __name__ == "__main__":
    main()
