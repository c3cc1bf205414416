"""The embedded default dataset: procedurally generated, labelled images for CPU demos and CI.

Ten classes, five shapes (disk, square, triangle, ring, plus) and five textures (horizontal,
vertical and diagonal stripes, checkerboard, dot grid), each drawn in a random foreground colour on
a random background colour, at a random position and scale, with pixel noise. Foreground and
background colours are drawn from the same distribution and every class covers a similar fraction
of the image with foreground, so the mean colour says almost nothing about the class: a network has
to see shape and texture. `tests/test_data_embedded.py` checks both halves of that claim (a
gradient-histogram kNN is well above chance, a mean-RGB kNN is not).

Every image is a pure function of (split, index), so the dataset is identical on every machine. It
is written once, as PNG files in class sub-folders named `<label>_<name>` (so `dinovmf prepare`, which
numbers sorted folder names, gives back these labels, and treats it like any image
folder), into a temporary directory that is renamed into place when complete.
"""
from __future__ import annotations

import os
import shutil
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

CLASSES = ("disk", "square", "triangle", "ring", "plus",
           "hstripes", "vstripes", "diagonal", "checker", "dots")
SPLITS = {"train": 3000, "val": 500}
IMAGE_SIZE = 64
# Bump when the generator changes, so a cache made by an older version is not reused.
VERSION = 2
_SPLIT_IDS = {"train": 0, "val": 1}


def cache_root(root: str | os.PathLike | None = None) -> Path:
    """Where datasets are cached: `root`, else $DINOVMF_DATA, else ~/.cache/dinovmf."""
    if root is not None:
        return Path(root)
    env = os.environ.get("DINOVMF_DATA")
    return Path(env) if env else Path.home() / ".cache" / "dinovmf"


def _colour_pair(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Foreground and background colours, i.i.d. uniform RGB, redrawn until their lumas differ."""
    luma = np.array([0.299, 0.587, 0.114])
    while True:
        fg, bg = rng.uniform(0, 1, 3), rng.uniform(0, 1, 3)
        if abs(luma @ (fg - bg)) > 0.2:
            return fg, bg


def _shape_distance(cls: str, dx: np.ndarray, dy: np.ndarray, r: float) -> np.ndarray:
    """Signed distance-like field of a shape of radius r centred at 0 (negative inside)."""
    if cls == "disk":
        return np.hypot(dx, dy) - r
    if cls == "square":
        return np.maximum(np.abs(dx), np.abs(dy)) - 0.85 * r
    if cls == "triangle":
        # Equilateral, pointing up (image y grows downwards): three half-planes.
        s3 = np.sqrt(3.0) / 2
        e1 = dy - 0.5 * r
        e2 = -s3 * dx - 0.5 * dy - 0.5 * r
        e3 = s3 * dx - 0.5 * dy - 0.5 * r
        return np.maximum(e1, np.maximum(e2, e3)) * 1.3
    if cls == "ring":
        return np.abs(np.hypot(dx, dy) - 0.8 * r) - 0.3 * r
    if cls == "plus":
        w = 0.3 * r
        ax, ay = np.abs(dx), np.abs(dy)
        return np.minimum(np.maximum(ax - w, ay - r), np.maximum(ay - w, ax - r))
    raise ValueError(f"unknown shape class {cls!r}")


def _texture_mask(cls: str, x: np.ndarray, y: np.ndarray, freq: float, phase: float) -> np.ndarray:
    """Boolean foreground of a periodic texture with `freq` cycles per image side."""
    t = 2 * np.pi * freq
    if cls == "hstripes":
        return np.sin(t * y + phase) > 0
    if cls == "vstripes":
        return np.sin(t * x + phase) > 0
    if cls == "diagonal":
        return np.sin(t * (x + y) / np.sqrt(2) + phase) > 0
    if cls == "checker":
        return np.sin(t * x + phase) * np.sin(t * y + phase) > 0
    if cls == "dots":
        fx = (x * freq + phase / (2 * np.pi)) % 1.0 - 0.5
        fy = (y * freq + phase / (2 * np.pi)) % 1.0 - 0.5
        return np.hypot(fx, fy) < 0.3
    raise ValueError(f"unknown texture class {cls!r}")


def render_image(split: str, index: int, size: int = IMAGE_SIZE) -> tuple[np.ndarray, int]:
    """Image `index` of `split` as uint8 [size, size, 3] and its label (index mod 10)."""
    if split not in _SPLIT_IDS:
        raise ValueError(f"split must be one of {sorted(_SPLIT_IDS)}, got {split!r}")
    label = index % len(CLASSES)
    cls = CLASSES[label]
    rng = np.random.default_rng([VERSION, _SPLIT_IDS[split], index])
    fg, bg = _colour_pair(rng)
    coords = (np.arange(size) + 0.5) / size
    y, x = np.meshgrid(coords, coords, indexing="ij")
    cx, cy = rng.uniform(0.3, 0.7, 2)
    pixel = 1.0 / size
    if label < 5:
        r = rng.uniform(0.2, 0.32)
        sd = _shape_distance(cls, x - cx, y - cy, r)
        alpha = np.clip(0.5 - sd / pixel, 0.0, 1.0)  # one-pixel anti-aliased edge
    else:
        half = rng.uniform(0.2, 0.3)
        region = np.maximum(np.abs(x - cx), np.abs(y - cy)) < half
        alpha = (region & _texture_mask(cls, x, y, rng.uniform(4.0, 7.0), rng.uniform(0, 2 * np.pi)))
        alpha = alpha.astype(np.float64)
    img = bg * (1 - alpha[..., None]) + fg * alpha[..., None]
    img += rng.normal(0.0, 0.04, img.shape)
    return (np.clip(img, 0, 1) * 255 + 0.5).astype(np.uint8), label


def class_folder(label: int) -> str:
    """Folder name of a class: "<label>_<name>", so that sorted folder names give back the labels."""
    return f"{label}_{CLASSES[label]}"


def _write_split(split: str, out_dir: Path, count: int, size: int) -> None:
    from PIL import Image

    def write(i: int) -> None:
        img, label = render_image(split, i, size)
        Image.fromarray(img).save(out_dir / class_folder(label) / f"{i:05d}.png", compress_level=1)

    for label in range(len(CLASSES)):
        (out_dir / class_folder(label)).mkdir(parents=True, exist_ok=True)
    # numpy and zlib release the GIL for much of the work; images are independent of each other.
    with ThreadPoolExecutor(max_workers=min(4, os.cpu_count() or 1)) as pool:
        list(pool.map(write, range(count)))


def ensure_embedded(root: str | os.PathLike | None = None) -> dict[str, Path]:
    """Image folders of the embedded dataset, {"train": Path, "val": Path}, generated on first use.

    Each split is generated into a temporary directory beside its final place and renamed into
    place when complete, so an interrupted run leaves no half-written dataset and concurrent
    callers never see one.
    """
    base = cache_root(root) / f"embedded-v{VERSION}-{IMAGE_SIZE}px"
    base.mkdir(parents=True, exist_ok=True)
    paths = {}
    for split, count in SPLITS.items():
        final = base / split
        if not final.is_dir():
            tmp = Path(tempfile.mkdtemp(prefix=f".{split}-", dir=base))
            try:
                _write_split(split, tmp, count, IMAGE_SIZE)
                os.rename(tmp, final)
            except OSError:
                if not final.is_dir():  # not "another process finished first"
                    raise
            finally:
                if tmp.exists():
                    shutil.rmtree(tmp, ignore_errors=True)
        paths[split] = final
    return paths
