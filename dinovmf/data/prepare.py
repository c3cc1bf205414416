"""Image folder -> FFCV .beton (`dinovmf prepare`), and `resolve_dataset` for the trainer.

A .beton holds two fields, `image` (RGBImageField: raw pixels for small images, JPEG above
`RAW_MAX_PIXELS`) and `label` (IntField). Class sub-folders give labels (sorted names -> 0..C-1); a
flat folder gives label -1. Every image is decoded once before writing, so a corrupt or unreadable
file is skipped and reported instead of killing FFCV's writer processes halfway through. The file is
written beside OUT under a temporary name and renamed into place, so OUT is either absent, the old
file, or the complete new one.

Very large images. PIL refuses to open an image above twice `Image.MAX_IMAGE_PIXELS` (178956970 pixels:
its guard against decompression bombs, small files that decode into gigabytes); such an image is
reported as too large, not as corrupt. With `max_resolution` it is shrunk anyway, up to
`SHRINK_MAX_PIXELS`: the limit is lifted for that image alone, and every image larger than
`max_resolution` is shrunk as it is read (`load_rgb`), so a 20000 x 20000 image is never converted to RGB
at full size.
"""
from __future__ import annotations

import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import numpy as np

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".ppm", ".pgm", ".tif", ".tiff", ".webp", ".gif")
# Images up to this many pixels are stored raw (exact, and decoding is a memcpy); larger ones as JPEG.
RAW_MAX_PIXELS = 256 * 256
JPEG_QUALITY = 90
FIELDS = ("image", "label")
# The largest image `max_resolution` shrinks (3 GiB as 8-bit RGB); PIL's own limit is twice MAX_IMAGE_PIXELS.
SHRINK_MAX_PIXELS = 1 << 30
_PIXEL_LIMIT = threading.Lock()  # Image.MAX_IMAGE_PIXELS is global: lifted under this lock, for one open()


@dataclass
class PrepareReport:
    """What `prepare_dataset` wrote."""
    out: Path
    num_images: int
    class_names: list[str]
    corrupt: list[Path] = field(default_factory=list)
    too_large: list[Path] = field(default_factory=list)  # above PIL's decompression-bomb limit
    seconds: float | None = None  # wall time of the check + write

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def summary(self) -> str:
        lines = [f"wrote {self.num_images} images"
                 + (f" in {self.num_classes} classes" if self.class_names else " (unlabelled, label -1)")
                 + f" to {self.out}"
                 + (f" in {self.seconds:.1f} s ({self.num_images / self.seconds:.0f} images/s)"
                    if self.seconds else "")]
        if self.corrupt:
            lines.append(f"skipped {len(self.corrupt)} corrupt or unreadable image(s):")
            lines += [f"  {p}" for p in self.corrupt]
        if self.too_large:
            lines.append(f"skipped {len(self.too_large)} image(s) too large to decode safely (above PIL's "
                         f"decompression-bomb limit of {_pil_limit()} pixels); --max-resolution N shrinks such "
                         f"images while preparing (up to {SHRINK_MAX_PIXELS} pixels):")
            lines += [f"  {p} ({_size(p)[0]} x {_size(p)[1]})" for p in self.too_large]
        return "\n".join(lines)


def list_images(src: Path) -> tuple[list[Path], list[int], list[str]]:
    """(files, labels, class names) of an image folder; class sub-folders or a flat folder (label -1)."""
    def images_in(d: Path) -> list[Path]:
        return sorted(p for p in d.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)

    classes = sorted(d.name for d in src.iterdir()
                     if d.is_dir() and not d.name.startswith(".") and images_in(d))
    if classes:
        files, labels = [], []
        for label, name in enumerate(classes):
            found = images_in(src / name)
            files += found
            labels += [label] * len(found)
        return files, labels, classes
    files = images_in(src)
    return files, [-1] * len(files), []


def load_rgb(path: Path, max_resolution: int | None = None) -> np.ndarray:
    """uint8 [H, W, 3] pixels of an image file (any mode converted to RGB); raises on a bad file, and
    PIL's DecompressionBombError on an image too large to open. With `max_resolution`, an image whose
    longer side exceeds it may be up to `SHRINK_MAX_PIXELS` and is shrunk as it is read (PIL's
    `thumbnail`: a JPEG decodes at 1/2, 1/4 or 1/8 scale first), before any conversion to RGB."""
    with _open(path, lift_limit=max_resolution is not None) as im:
        if max_resolution is not None and max(im.size) > max_resolution:
            im.thumbnail((max_resolution, max_resolution))
        else:
            im.load()
        return np.asarray(im if im.mode == "RGB" else im.convert("RGB"))


def _open(path: Path, lift_limit: bool = False):
    """`Image.open(path)`; `lift_limit`: PIL's pixel limit raised to SHRINK_MAX_PIXELS for this call."""
    from PIL import Image
    if not lift_limit:
        return Image.open(path)
    with _PIXEL_LIMIT:
        default, Image.MAX_IMAGE_PIXELS = Image.MAX_IMAGE_PIXELS, SHRINK_MAX_PIXELS // 2  # PIL raises above 2x
        try:
            return Image.open(path)
        finally:
            Image.MAX_IMAGE_PIXELS = default


def _pil_limit() -> int:
    from PIL import Image
    return 2 * Image.MAX_IMAGE_PIXELS


def _size(path: Path) -> tuple[int, int]:
    """(width, height) from the file's header (no decoding)."""
    with _open(path, lift_limit=True) as im:
        return im.size


def _check(path: Path, max_resolution: int | None = None) -> str | None:
    """None when `path` decodes, else why not: "too large" (PIL's decompression-bomb limit) or "corrupt"."""
    from PIL import Image
    try:
        load_rgb(path, max_resolution)
        return None
    except Image.DecompressionBombError:
        return "too large"
    except Exception:  # noqa: BLE001 - PIL raises many types for bad files; any of them means skip
        return "corrupt"


class _ImageList:
    """The indexable dataset FFCV's writer reads: (uint8 HWC image, label)."""

    def __init__(self, files: list[Path], labels: list[int], max_resolution: int | None = None):
        self.files, self.labels, self.max_resolution = files, labels, max_resolution

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int):
        return load_rgb(self.files[i], self.max_resolution), int(self.labels[i])


def _resolve_src(src: str | os.PathLike) -> Path:
    if str(src) in ("embedded", "embedded:train", "embedded:val"):
        from .embedded import ensure_embedded
        return ensure_embedded()[str(src).partition(":")[2] or "train"]
    path = Path(src)
    if not path.exists():
        raise FileNotFoundError(f"source {str(src)!r} does not exist (give an image folder or 'embedded')")
    if not path.is_dir():
        raise ValueError(f"source {str(src)!r} is not a folder (give an image folder or 'embedded')")
    return path


def prepare_dataset(src: str | os.PathLike, out: str | os.PathLike, force: bool = False,
                    max_resolution: int | None = None, num_workers: int | None = None,
                    progress: bool = True) -> PrepareReport:
    """Write the images under `src` (a folder, or `embedded`) to the FFCV file `out`.

    Raises FileNotFoundError for a missing source, ValueError for a source without readable images
    or a bad argument, FileExistsError when `out` exists and not `force`.
    """
    from ffcv.fields import IntField, RGBImageField
    from ffcv.writer import DatasetWriter
    from tqdm import tqdm

    if max_resolution is not None and int(max_resolution) < 1:
        raise ValueError(f"max_resolution must be a positive number of pixels, got {max_resolution}")
    out = Path(out)
    if out.exists() and not force:
        raise FileExistsError(f"{out} exists; pass --force (force=True) to overwrite it")
    if out.is_dir():
        raise ValueError(f"out {str(out)!r} is a folder; give a file name such as data.beton")
    src_dir = _resolve_src(src)
    files, labels, classes = list_images(src_dir)
    if not files:
        raise ValueError(f"source {str(src_dir)!r} holds no images (looked for {', '.join(IMAGE_EXTENSIONS)})")

    started = time.perf_counter()
    # disable=None: tqdm draws its bar only on a terminal; in a log file a bar is a line per redraw.
    bar = partial(tqdm, disable=None if progress else True)
    workers = num_workers or min(8, os.cpu_count() or 1)
    with ThreadPoolExecutor(workers) as pool:  # PIL decodes without the GIL
        problems = list(bar(pool.map(partial(_check, max_resolution=max_resolution), files), total=len(files),
                            desc="checking images"))
    corrupt = [f for f, why in zip(files, problems) if why == "corrupt"]
    too_large = [f for f, why in zip(files, problems) if why == "too large"]
    labels = [lab for lab, why in zip(labels, problems) if why is None]
    files = [f for f, why in zip(files, problems) if why is None]
    if not files:
        skipped = PrepareReport(out, 0, classes, corrupt, too_large).summary().split("\n", 1)[1]
        raise ValueError(f"source {str(src_dir)!r}: no image can be written; {skipped}")

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    fields = {
        "image": RGBImageField(write_mode="smart", max_resolution=max_resolution,
                               smart_threshold=RAW_MAX_PIXELS * 3, jpeg_quality=JPEG_QUALITY),
        "label": IntField(),
    }
    try:
        # FFCV's writer always draws a tqdm bar (no option): give it ours, quiet off a terminal.
        with _writer_progress(partial(bar, desc="writing")):
            DatasetWriter(str(tmp), fields, num_workers=workers).from_indexed_dataset(
                _ImageList(files, labels, max_resolution), chunksize=64)
        os.replace(tmp, out)
    finally:
        if tmp.exists():
            tmp.unlink()
    return PrepareReport(out=out, num_images=len(files), class_names=classes, corrupt=corrupt,
                         too_large=too_large, seconds=time.perf_counter() - started)


@contextmanager
def _writer_progress(bar):
    """Swap the tqdm that `ffcv.writer` calls for `bar` while a dataset is written."""
    import ffcv.writer

    original = ffcv.writer.tqdm
    ffcv.writer.tqdm = bar
    try:
        yield
    finally:
        ffcv.writer.tqdm = original


def resolve_dataset(spec: str | os.PathLike, workdir: str | os.PathLike, split: str = "train") -> Path:
    """A dataset the loaders can read, from a config value.

    `spec` is `embedded` (its `split`; or `embedded:train` / `embedded:val` explicitly), a `.beton`
    file (returned as is), or an image folder (prepared into `workdir/<folder name>.beton` once and
    reused). Without FFCV an image folder is returned as is: the PIL loader reads folders.
    """
    from .ffcv_loader import ffcv_available

    spec_s = str(spec)
    if spec_s.startswith("embedded"):
        name, _, which = spec_s.partition(":")
        which = which or split
        if name != "embedded" or which not in ("train", "val"):
            raise ValueError(f"dataset spec {spec_s!r}: use embedded, embedded:train or embedded:val")
        from .embedded import ensure_embedded
        folder = ensure_embedded()[which]
        target = folder.parent / f"{which}.beton"  # cached beside the images, shared by runs
    else:
        path = Path(spec)
        if path.is_file() and path.suffix == ".beton":
            return path
        if not path.exists():
            raise FileNotFoundError(f"dataset {spec_s!r} does not exist")
        if not path.is_dir():
            raise ValueError(f"dataset {spec_s!r} is neither a .beton file nor an image folder")
        folder = path
        target = Path(workdir) / f"{path.resolve().name}.beton"
    if not ffcv_available():
        return folder
    if not target.exists():
        report = prepare_dataset(folder, target, progress=False)
        if report.corrupt or report.too_large:
            print(report.summary())
    return target
