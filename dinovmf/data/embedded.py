"""The embedded default dataset: procedurally generated, labelled images for CPU demos and CI.

Ten classes: five shapes (disk, square, triangle, ring, plus), of which each image holds 3 to 5
copies of one at random positions and sizes, and five textures (horizontal, vertical and diagonal
stripes, checkerboard, dot grid) covering the whole image at a random frequency and phase. The
foreground is one colour per image on a gently graded background; both are muted colours of random
hue (saturation <= 0.35), the foreground's luma more than 0.3 away from the background's where its
gradient starts; plus pixel noise.

Why it looks like this (measured with DINO-vMF on a small ViT, see the README):
- Colour must not be the easiest cue shared by two views of an image. With uniform random RGB
  colours (version 2) the student learned "which colour pair is this", an instance cue unrelated to
  the class, and the trained teacher's kNN fell below the random-init baseline. Muted colours and
  the demo's strong hue jitter (`augment.hue=0.5`) make colour a nuisance the views disagree on.
- Several instances of a shape, and textures over the whole image, mean that a small random crop
  (the local views) still shows the class, as on natural images where crops show object parts.
- Foreground and background colours come from one distribution, so the mean colour says almost
  nothing about the class. `tests/test_data_embedded.py` checks both halves of that claim (a
  gradient-histogram kNN is well above chance, a mean-RGB kNN is not).

Every image is a pure function of (split, index), so the dataset is identical on every machine. It
is written once, as PNG files in class sub-folders named `<label>_<name>` (so `dinovmf prepare`, which
numbers sorted folder names, gives back these labels, and treats it like any image
folder), into a temporary directory that is renamed into place when complete.
"""
from __future__ import annotations

import colorsys
import os
import shutil
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from dinovmf.kernels.augment_layout import LUMA_WEIGHTS

CLASSES = ("disk", "square", "triangle", "ring", "plus",
           "hstripes", "vstripes", "diagonal", "checker", "dots")
SPLITS = {"train": 3000, "val": 500}
IMAGE_SIZE = 64
# Bump when the generator changes, so a cache made by an older version is not reused.
VERSION = 3
_SPLIT_IDS = {"train": 0, "val": 1}


def cache_root(root: str | os.PathLike | None = None) -> Path:
    """Where datasets are cached: `root`, else $DINOVMF_DATA, else ~/.cache/dinovmf."""
    if root is not None:
        return Path(root)
    env = os.environ.get("DINOVMF_DATA")
    return Path(env) if env else Path.home() / ".cache" / "dinovmf"


LUMA = np.array(LUMA_WEIGHTS)  # the contrast a colour keeps under grayscale
MAX_SATURATION = 0.35
MIN_LUMA_CONTRAST = 0.3


def _colour(rng: np.random.Generator, far_from_luma: float | None = None) -> np.ndarray:
    """A muted RGB colour of random hue; with `far_from_luma`, one whose luma differs from it by > 0.3."""
    for _ in range(100):
        c = np.array(colorsys.hsv_to_rgb(rng.uniform(), rng.uniform(0, MAX_SATURATION), rng.uniform(0.05, 1)))
        if far_from_luma is None or abs(c @ LUMA - far_from_luma) > MIN_LUMA_CONTRAST:
            return c
    # A draw misses with p <= 0.7 whatever the background luma (measured), so 100 misses: p < 1e-15.
    raise AssertionError("no colour far enough in luma")


def _background(rng: np.random.Generator, x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, float]:
    """A linear gradient from a random colour half-way towards another, and the first colour's luma."""
    c1 = _colour(rng)
    c2 = c1 + 0.5 * (_colour(rng) - c1)
    angle = rng.uniform(0, 2 * np.pi)
    t = np.clip(0.5 + np.cos(angle) * (x - 0.5) + np.sin(angle) * (y - 0.5), 0, 1)[..., None]
    return c1 * (1 - t) + c2 * t, float(c1 @ LUMA)


def _shape_instances(rng: np.random.Generator) -> list[tuple[np.ndarray, float]]:
    """3 to 5 (centre, radius) pairs inside the image, non-overlapping (a draw that cannot fit is skipped)."""
    items: list[tuple[np.ndarray, float]] = []
    for _ in range(rng.integers(3, 6)):
        for _try in range(30):
            r = rng.uniform(0.1, 0.16)
            c = rng.uniform(r, 1 - r, 2)
            if all(np.hypot(*(c - c0)) > r + r0 + 0.02 for c0, r0 in items):
                items.append((c, r))
                break
    return items


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
    coords = (np.arange(size) + 0.5) / size
    y, x = np.meshgrid(coords, coords, indexing="ij")
    img, bg_luma = _background(rng, x, y)
    fg = _colour(rng, far_from_luma=bg_luma)
    if label < 5:
        alpha = np.zeros_like(x)
        for (cx, cy), r in _shape_instances(rng):
            sd = _shape_distance(cls, x - cx, y - cy, r)
            alpha = np.maximum(alpha, np.clip(0.5 - sd * size, 0.0, 1.0))  # one-pixel anti-aliased edge
    else:
        alpha = _texture_mask(cls, x, y, rng.uniform(4.0, 7.0), rng.uniform(0, 2 * np.pi)).astype(np.float64)
    img = img * (1 - alpha[..., None]) + fg * alpha[..., None]
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
