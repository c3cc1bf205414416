"""Benchmark: the data path as a user gets it. Decode-only vs end-to-end multi-crop images/s per worker count.

    python -m bench.bench_data [--images 384] [--workers 1 2] [--batch 32] [--rounds 3]

Source: `--images` synthetic photo-like JPEGs (`write_photo_like_jpegs`: 1/f colour noise, a few
upscaled embedded-dataset objects, fine grain; short side 256-427 px, JPEG quality 90). No real
photos are available here; this stands in for the issue's 600 real JPEGs of the same sizes (decoding
cost depends on size and entropy, which these match roughly; the CSV says which source was used).

Pipelines, each at every worker count, DINO's 2 x 224 + 10 x 96 crops, batch `--batch`:
- `<backend>_decode`: decode + crops only (uint8 crops out, `MultiCropLoader.decoded_batches`): the
  ceiling, reported beside every row as `decode_only_images_per_s`;
- `<backend>_end_to_end`: decode + crops + augmentation, finished normalised float crops in the
  training process (CPU device: the fused C++ kernel in the loader's workers);
  backends `ffcv` (numba threads) and `pil` (DataLoader processes reading the JPEG folder);
- `dino_pil`: the original DINO pipeline (`DataAugmentationDINO` per image in DataLoader workers), as
  a PIL-only port (bench/dino_pil_baseline.py: torchvision does not import with this torch wheel).
Two rates per pipeline, each the median of `--rounds` epochs, the pipelines alternating round by round
so machine noise hits them alike (after a warm-up epoch that holds FFCV's compilation):
- `images_per_s`: wall-clock, steady state (images after the first batch over the time after it);
- `images_per_cpu_s`: images per CPU-second of the whole epoch, this process and its DataLoader
  workers together: the per-core throughput, and on a machine shared with other jobs the rate that
  does not depend on how much CPU the scheduler happened to give the benchmark.
The `fraction_of_decode_only` / `x_vs_dino_pil` columns compare at the same worker count (`cpu_*` the
same for the CPU-time rates). Written to bench/results/data_pipeline.csv / .png.
"""
from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from bench.harness import record
from dinovmf.config import CropsConfig
from dinovmf.data.ffcv_loader import ffcv_available
from dinovmf.data.loader import MultiCropLoader

SOURCE = "synthetic photo-like JPEG, short side 256-427 px, q90"


def write_photo_like_jpegs(folder: Path, count: int, seed: int = 0) -> None:
    """`count` natural-image-like JPEGs: colour noise with a 1/f spectrum (octaves of upsampled random
    fields, amplitude halving per octave), 2-4 embedded-dataset images upscaled as objects, and grain."""
    from PIL import Image

    from dinovmf.data.embedded import render_image
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(count):
        short = int(rng.integers(256, 428))
        aspect = float(rng.choice([1.0, 4 / 3, 3 / 2, 3 / 4, 2 / 3]))
        h, w = (short, int(short * aspect)) if aspect >= 1 else (int(short / aspect), short)
        img = np.zeros((h, w, 3))
        for octave in range(6):
            cells = 2 ** (octave + 1)
            field = rng.uniform(-1, 1, (cells, cells, 3)).astype(np.float32)
            up = np.asarray(Image.fromarray(field[..., 0]).resize((w, h), Image.BICUBIC))
            img += 0.5 ** octave * np.stack([up] + [np.asarray(Image.fromarray(field[..., c]).resize(
                (w, h), Image.BICUBIC)) for c in (1, 2)], axis=-1)
        img = 0.5 + 0.25 * img
        for _ in range(int(rng.integers(2, 5))):
            obj, _ = render_image("train", int(rng.integers(0, 3000)))
            side = int(rng.integers(short // 4, short // 2))
            obj = np.asarray(Image.fromarray(obj).resize((side, side), Image.BICUBIC)) / 255.0
            top, left = int(rng.integers(0, h - side)), int(rng.integers(0, w - side))
            img[top:top + side, left:left + side] = 0.3 * img[top:top + side, left:left + side] + 0.7 * obj
        img += rng.normal(0, 0.02, img.shape)
        Image.fromarray((np.clip(img, 0, 1) * 255).astype(np.uint8)).save(folder / f"{i:05d}.jpg", quality=90)


def _cpu_seconds() -> float:
    """CPU time of this process (all threads) and of its children that have been waited for (DataLoader
    workers, joined at the end of each epoch)."""
    import resource
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def _rates(batches) -> tuple[float, float]:
    """(images/s after the first batch arrived, images per CPU-second over the whole epoch)."""
    cpu0 = _cpu_seconds()
    it = iter(batches)
    total = next(it)[-1].shape[0]
    t0, n = time.perf_counter(), 0
    for batch in it:
        n += batch[-1].shape[0]
    wall = time.perf_counter() - t0
    del it  # DataLoader workers shut down (and are waited for) when the iterator ends
    return n / wall, (total + n) / (_cpu_seconds() - cpu0)


class Pipeline:
    """One measured pipeline: `epoch()` runs an epoch and returns its `_rates`."""

    def __init__(self, name: str, backend: str, workers: int, epoch):
        self.name, self.backend, self.workers, self._epoch = name, backend, workers, epoch
        self.rates: list[float] = []
        self.cpu_rates: list[float] = []

    def run(self) -> None:
        rate, cpu_rate = self._epoch()
        self.rates.append(rate)
        self.cpu_rates.append(cpu_rate)


def _loader_pipelines(data: Path, backend: str, workers: int, batch: int) -> list[Pipeline]:
    loader = MultiCropLoader(data, batch, CropsConfig(), "cpu", backend=backend, num_workers=workers)
    state = {"epoch": 0}

    def epoch(decoded: bool):
        def run():
            state["epoch"] += 1
            loader.set_epoch(state["epoch"])
            return _rates(loader.decoded_batches() if decoded else loader)
        return run

    return [Pipeline(f"{backend}_decode", backend, workers, epoch(True)),
            Pipeline(f"{backend}_end_to_end", backend, workers, epoch(False))]


def _dino_pipeline(folder: Path, workers: int, batch: int) -> Pipeline:
    from torch.utils.data import DataLoader

    from bench.dino_pil_baseline import ImageFiles
    dataset = ImageFiles(sorted(folder.glob("*.jpg")))

    def run():
        return _rates(DataLoader(dataset, batch_size=batch, shuffle=True, num_workers=workers, drop_last=True))
    return Pipeline("dino_pil", "pil", workers, run)


def measure(folder: Path, beton: Path | None, workers: list[int], batch: int, rounds: int) -> list[dict]:
    rows = []
    for w in workers:
        pipelines = []
        if beton is not None:
            pipelines += _loader_pipelines(beton, "ffcv", w, batch)
        pipelines += _loader_pipelines(folder, "pil", w, batch) + [_dino_pipeline(folder, w, batch)]
        for p in pipelines:  # warm-up: FFCV's compilation, first imports in the workers
            p.run()
            p.rates.clear()
            p.cpu_rates.clear()
        for _ in range(rounds):
            for p in pipelines:
                p.run()
        rate = {p.name: statistics.median(p.rates) for p in pipelines}
        cpu_rate = {p.name: statistics.median(p.cpu_rates) for p in pipelines}
        for p in pipelines:
            ceiling, cpu_ceiling = rate[f"{p.backend}_decode"], cpu_rate[f"{p.backend}_decode"]
            rows.append({"pipeline": p.name, "num_workers": w, "batch": batch, "rounds": rounds,
                         "images_per_s": rate[p.name], "images_per_s_per_worker": rate[p.name] / w,
                         "decode_only_images_per_s": ceiling, "fraction_of_decode_only": rate[p.name] / ceiling,
                         "x_vs_dino_pil": rate[p.name] / rate["dino_pil"],
                         "images_per_cpu_s": cpu_rate[p.name], "decode_only_images_per_cpu_s": cpu_ceiling,
                         "cpu_fraction_of_decode_only": cpu_rate[p.name] / cpu_ceiling,
                         "cpu_x_vs_dino_pil": cpu_rate[p.name] / cpu_rate["dino_pil"], "source": SOURCE,
                         "note": ("ceiling: decode + crops, no augmentation" if p.name.endswith("_decode") else
                                  "PIL-only port of DINO's DataAugmentationDINO (torchvision does not import "
                                  "with this torch)" if p.name == "dino_pil" else
                                  "decode + crops + fused augmentation in the workers, float crops out")})
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=384)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "photos"
        write_photo_like_jpegs(folder, args.images)
        beton = None
        if ffcv_available():
            from dinovmf.data.prepare import prepare_dataset
            beton = Path(tmp) / "photos.beton"
            prepare_dataset(folder, beton, progress=False)
        rows = measure(folder, beton, args.workers, args.batch, args.rounds)
    record("data_pipeline", rows, x="num_workers", y="images_per_s", group="pipeline", device="cpu",
           title=f"multi-crop images/s (2x224 + 10x96), {args.images} synthetic photo-like JPEGs, "
                 f"torch {torch.get_num_threads()} threads")


if __name__ == "__main__":
    main()
