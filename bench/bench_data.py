"""Benchmark: the data path. Multi-crop decoding (FFCV vs PIL) and batched augmentation throughput.

    python -m bench.bench_data [--images 256] [--source-size 320] [--workers 1 2] [--batch 32]

Loader: a .beton of `--images` synthetic JPEG images of `--source-size` px (about ImageNet's decode
cost per image), decoded into DINO's 2 x 224 + 10 x 96 crops; reported as multi-crop images/s (one
image = all its crops) and per decoding worker (FFCV threads / PIL processes), after a warm-up epoch
that holds FFCV's numba compilation (its time is reported apart as `first_batch_s`).
Augmentation: `MultiCropAugmentation` on uint8 crops of that layout, on the CPU and (when present) the
GPU, in multi-crop images/s.

The issue's target (one H100 + 16 cores keeps ViT-B/16 fed: >= 1000 multi-crop images/s) needs a GPU
box; on a CPU-only machine only the CPU rows are measured.
"""
from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from bench.harness import record, timeit
from dinovmf.data.augment import MultiCropAugmentation
from dinovmf.data.crops import MultiCropConfig
from dinovmf.data.ffcv_loader import ffcv_available
from dinovmf.data.loader import MultiCropLoader


def _write_source_images(folder: Path, count: int, size: int) -> None:
    """Smooth random colour fields plus noise, saved as JPEG (so decoding costs what a photo costs)."""
    from PIL import Image
    rng = np.random.default_rng(0)
    folder.mkdir(parents=True)
    for i in range(count):
        coarse = rng.uniform(0, 255, (8, 8, 3)).astype(np.uint8)
        img = np.asarray(Image.fromarray(coarse).resize((size, size), Image.BICUBIC), dtype=np.float64)
        img = np.clip(img + rng.normal(0, 12, img.shape), 0, 255).astype(np.uint8)
        Image.fromarray(img).save(folder / f"{i:05d}.jpg", quality=90)


def bench_loader(beton: Path, crops: MultiCropConfig, batch: int, workers: list[int], backends: list[str]) -> list[dict]:
    rows = []
    for backend in backends:
        for w in workers:
            t0 = time.perf_counter()
            loader = MultiCropLoader(beton, batch, crops, "cpu", backend=backend, num_workers=w)
            it = loader.decoded_batches()
            next(it)
            first = time.perf_counter() - t0
            for _ in it:  # finish the warm-up epoch
                pass
            loader.set_epoch(1)
            t0 = time.perf_counter()
            n = sum(b[1].shape[0] for b in loader.decoded_batches())
            dt = time.perf_counter() - t0
            rows.append({"backend": backend, "num_workers": w, "images": n, "batch": batch,
                         "first_batch_s": first, "images_per_s": n / dt, "images_per_s_per_worker": n / dt / w})
    return rows


def bench_augment(crops: MultiCropConfig, batches: list[int], devices: list[str]) -> list[dict]:
    rows = []
    for device in devices:
        aug = MultiCropAugmentation(device)
        for b in batches:
            data = [torch.randint(0, 256, (b, s, s, 3), dtype=torch.uint8) for s, _ in crops.crop_specs()]
            if device != "cpu":
                data = [d.to(device) for d in data]
            g = torch.Generator(device=device).manual_seed(0)
            ms = timeit(lambda: aug(data, g), warmup=1, iters=3, sync=device != "cpu")
            rows.append({"device_kind": device, "batch": b, "torch_threads": torch.get_num_threads(),
                         "ms_per_batch": ms, "images_per_s": b / ms * 1e3})
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=256)
    ap.add_argument("--source-size", type=int, default=320)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--aug-batches", type=int, nargs="+", default=[8, 32])
    ap.add_argument("--skip-loader", action="store_true")
    args = ap.parse_args()
    crops = MultiCropConfig()

    if not args.skip_loader:
        with tempfile.TemporaryDirectory() as tmp:
            from dinovmf.data.prepare import prepare_dataset
            _write_source_images(Path(tmp) / "src", args.images, args.source_size)
            if ffcv_available():
                beton = Path(tmp) / "bench.beton"
                prepare_dataset(Path(tmp) / "src", beton, progress=False)
                backends = ["ffcv", "pil"]
            else:
                beton, backends = Path(tmp) / "src", ["pil"]
            rows = bench_loader(beton, crops, args.batch, args.workers, backends)
        record("data_loader", rows, x="num_workers", y="images_per_s", group="backend", device="cpu",
               title=f"multi-crop decode (2x224 + 10x96 from {args.source_size}px JPEG)")

    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    for device in devices:
        rows = bench_augment(crops, args.aug_batches, [device])
        record(f"data_augment_{device}", rows, x="batch", y="images_per_s", group="device_kind", device=device,
               title="MultiCropAugmentation (2x224 + 10x96), multi-crop images/s")


if __name__ == "__main__":
    main()
