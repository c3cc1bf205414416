"""Reading files a user names without running code from them.

A `.pt` / `.pth` file is a pickle, and unpickling can call any importable function: a file that "loads"
can have written files or opened a shell by then. So every file a user names (`--resume PATH`, `dinovmf
export / eval / attention`, `model.init_from`) is read here, one of two ways:

- torch pickle files: `torch.load(weights_only=True)`, which rebuilds tensors and plain containers only,
  plus the few classes legacy files need (`LEGACY_SAFE_GLOBALS`: numpy arrays for the RNG states of
  single-file dinovmf checkpoints, `argparse.Namespace` for DINO's `checkpoint.pth`), allowed only for
  that call. Anything else is refused with an `UnsafeFileError` naming what the file would import and
  the opt-in (`--trust-pickle`, `model.init_trust_pickle=true`) that loads it with full unpickling;
- `torch.distributed.checkpoint` directories (dinovmf's checkpoints): DCP pickles its `.metadata` and
  would load non-tensor entries with `weights_only=False`. `safe_reader` unpickles the metadata with an
  allowlist of DCP's own metadata classes, and `safe_load_planner` refuses non-tensor entries: dinovmf's
  checkpoints hold tensors only (their other state is JSON).

This module imports nothing from dinovmf, so every layer (models included) can read files through it.
"""
from __future__ import annotations

import argparse
import io
import os
import pickle
from pathlib import Path

import numpy as np
import torch

TRUST_PICKLE = "--trust-pickle"

# Classes whose reconstruction runs no code of the file's choosing, allowed (for one call each) on top of
# torch's tensors and containers: numpy arrays of plain dtypes (the RNG states in single-file dinovmf
# checkpoints) and argparse.Namespace (the `args` of the original DINO's checkpoint.pth).
LEGACY_SAFE_GLOBALS = [np._core.multiarray._reconstruct, np.ndarray, np.dtype, np.dtypes.UInt32DType,
                       argparse.Namespace]


class UnsafeFileError(ValueError):
    """A file would import code when unpickled, and the user has not opted in to trusting it."""


def load_torch_file(path: str | os.PathLike, *, trust_pickle: bool = False, what: str = "checkpoint",
                    opt_in: str = TRUST_PICKLE):
    """`torch.load` of `path` onto the CPU, restricted to tensors and plain types (module docstring).

    `trust_pickle=True` unpickles anything (the user vouched for the file). Raises `UnsafeFileError`
    naming the globals the file would import and `opt_in`, or ValueError when the file cannot be read
    as a torch file at all; `what` names the file's role in both messages.
    """
    path = Path(path)
    if trust_pickle:
        try:
            return torch.load(path, map_location="cpu", weights_only=False)
        except Exception as e:  # noqa: BLE001 - pickle / zip errors: not a torch file
            raise ValueError(f"{what} {str(path)!r} cannot be read by torch.load: {_first_line(e)}") from None
    try:
        with torch.serialization.safe_globals(LEGACY_SAFE_GLOBALS):
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        unsafe = _unsafe_globals(path)
        if not unsafe:
            raise ValueError(f"{what} {str(path)!r} cannot be read by torch.load: {_first_line(e)}") from None
        raise UnsafeFileError(
            f"{what} {str(path)!r} is a pickle that imports {', '.join(unsafe[:4])}"
            f"{' ...' if len(unsafe) > 4 else ''}; loading it could run code, so it was not loaded. If you "
            f"trust this file, pass {opt_in}") from None
    except Exception as e:  # noqa: BLE001 - zip / truncation errors: not a (complete) torch file
        raise ValueError(f"{what} {str(path)!r} cannot be read by torch.load: {_first_line(e)}") from None


def _unsafe_globals(path: Path) -> list[str]:
    """The globals `path` imports beyond what `load_torch_file` allows (read from the pickle, not run)."""
    allowed = {f"{g.__module__}.{g.__qualname__}" for g in LEGACY_SAFE_GLOBALS}
    try:
        found = torch.serialization.get_unsafe_globals_in_checkpoint(path)
    except Exception:  # noqa: BLE001 - not a zip file: a legacy (non-zip) pickle
        with open(path, "rb") as f:
            found = _pickle_globals(f.read())
    return [g for g in found if g not in allowed]


def _pickle_globals(data: bytes) -> list[str]:
    """`module.name` of every GLOBAL / STACK_GLOBAL in a raw pickle, without executing it."""
    import pickletools

    names, strings = [], []
    try:
        for op, arg, _ in pickletools.genops(data):
            if op.name in ("SHORT_BINUNICODE", "BINUNICODE", "UNICODE"):
                strings.append(arg)
            elif op.name == "GLOBAL":
                names.append(arg.replace(" ", "."))
            elif op.name == "STACK_GLOBAL" and len(strings) >= 2:
                names.append(f"{strings[-2]}.{strings[-1]}")
    except Exception:  # noqa: BLE001 - a truncated pickle, or no pickle: what was found before the cut
        pass
    return names


def _first_line(e: BaseException) -> str:
    text = str(e).strip() or type(e).__name__
    return text.splitlines()[0]


# --------------------------------------------------------------------- torch.distributed.checkpoint


def _dcp_metadata_globals() -> dict[tuple[str, str], object]:
    """(module, name) -> object for everything a DCP `.metadata` pickle may import."""
    from torch.distributed.checkpoint import filesystem, metadata

    allowed = {("torch", "Size"): torch.Size,
               ("torch.serialization", "_get_layout"): torch.serialization._get_layout,
               ("torch.distributed.checkpoint.filesystem", "_StorageInfo"): filesystem._StorageInfo,
               ("pathlib", "PosixPath"): Path, ("pathlib", "WindowsPath"): Path, ("pathlib", "Path"): Path}
    for name in ("Metadata", "TensorStorageMetadata", "TensorProperties", "ChunkStorageMetadata",
                 "BytesStorageMetadata", "MetadataIndex", "StorageMeta", "_MEM_FORMAT_ENCODING"):
        if hasattr(metadata, name):
            allowed[("torch.distributed.checkpoint.metadata", name)] = getattr(metadata, name)
    for name in dir(torch):
        if isinstance(getattr(torch, name, None), torch.dtype):
            allowed[("torch", name)] = getattr(torch, name)
    return allowed


class _MetadataUnpickler(pickle.Unpickler):
    def __init__(self, stream, path: str):
        super().__init__(stream)
        self.allowed, self.path = _dcp_metadata_globals(), path

    def find_class(self, module: str, name: str):
        try:
            return self.allowed[(module, name)]
        except KeyError:
            raise UnsafeFileError(f"checkpoint {self.path!r}: its .metadata imports {module}.{name}, which "
                                  "no torch.distributed.checkpoint metadata does; not loaded") from None


def read_dcp_metadata(path: str | os.PathLike):
    """The `torch.distributed.checkpoint` Metadata of directory `path`, unpickled with an allowlist."""
    path = Path(path)
    with open(path / ".metadata", "rb") as f:
        return _MetadataUnpickler(io.BytesIO(f.read()), str(path)).load()


def safe_reader(path: str | os.PathLike):
    """A DCP FileSystemReader for `path` whose metadata is read by `read_dcp_metadata`."""
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.metadata import StorageMeta

    class SafeFileSystemReader(FileSystemReader):
        def read_metadata(self, *args, **kwargs):
            if kwargs.get("rank") is not None:
                raise UnsafeFileError(f"checkpoint {str(self.path)!r} has per-rank metadata, which dinovmf "
                                      "never writes")
            metadata = read_dcp_metadata(self.path)
            if getattr(metadata, "storage_meta", None) is None:
                metadata.storage_meta = StorageMeta()
            metadata.storage_meta.load_id = self.load_id
            return metadata

    return SafeFileSystemReader(path)


def safe_load_planner():
    """DCP's default load planner, refusing non-tensor entries: dinovmf's checkpoints hold tensors only, and
    DCP would unpickle such an entry with `weights_only=False`."""
    from torch.distributed.checkpoint import DefaultLoadPlanner

    class SafeLoadPlanner(DefaultLoadPlanner):
        def load_bytes(self, read_item, value):
            raise UnsafeFileError(f"checkpoint entry {read_item.dest_index.fqn!r} is a pickled object, not a "
                                  "tensor; dinovmf checkpoints hold tensors only, so it was not loaded")

    return SafeLoadPlanner()
