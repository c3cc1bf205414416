"""`check_beton`: is a file a complete FFCV .beton? Checked before FFCV reads one (issue #24).

FFCV reads a file cut short (an interrupted copy or write) without checking it and fails deep inside
numpy with `negative dimensions are not allowed`, naming neither the file nor the cause. A .beton is a
header (format version, field count, sample count, where the allocation table starts), the field
descriptors, the per-sample metadata, the data pages, and last the allocation table: one entry
(sample, pointer, size) per stored blob, up to the end of the file. So a cut file has its table start
beyond its end, or a table that is partial or covers fewer samples than the header counts.
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np

_FIX = "copy it again, or write it anew with `dinovmf prepare`"


def check_beton(path: str | os.PathLike) -> None:
    """Raise ValueError naming `path` and the cause when it cannot be a complete .beton. Needs FFCV (whose
    format definitions it reads): call it after `ffcv_loader.ffcv_available()`."""
    from ffcv.types import ALLOC_TABLE_TYPE, CURRENT_VERSION, FieldDescType, HeaderType

    path = Path(path)
    size = path.stat().st_size
    if size < HeaderType.itemsize:
        raise ValueError(f"dataset {path}: {size} bytes cannot hold a .beton (its header alone is "
                         f"{HeaderType.itemsize} bytes): the file is truncated or not a .beton; {_FIX}")
    header = np.fromfile(path, dtype=HeaderType, count=1)[0]
    if int(header["version"]) != CURRENT_VERSION:
        raise ValueError(f"dataset {path}: not an FFCV .beton (its first bytes read as format version "
                         f"{int(header['version'])}, FFCV writes {CURRENT_VERSION}): a corrupt file, or another "
                         f"format; {_FIX}")
    table_at = int(header["alloc_table_ptr"])
    fields_end = HeaderType.itemsize + int(header["num_fields"]) * FieldDescType.itemsize
    if not fields_end <= table_at <= size or (size - table_at) % ALLOC_TABLE_TYPE.itemsize:
        raise ValueError(f"dataset {path}: truncated .beton: the file has {size} bytes, but its header puts the "
                         f"allocation table, which ends a complete file, at byte {table_at}; {_FIX}")
    table = np.fromfile(path, dtype=ALLOC_TABLE_TYPE, offset=table_at)
    samples = int(header["num_samples"])
    if len(np.unique(table["sample_id"])) < samples or (
            len(table) and int((table["ptr"] + table["size"]).max()) > table_at):
        raise ValueError(f"dataset {path}: truncated or corrupt .beton: its allocation table does not place "
                         f"the data of all {samples} samples before the table; {_FIX}")
