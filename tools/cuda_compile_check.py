"""Compile-check every csrc/*.cu with nvcc against the installed torch's headers; no GPU needed.

Runs `nvcc -c` once per source with one -gencode per target architecture (sm_90 for H100, sm_80 for
A100), so device code is compiled for both while the host side is parsed once. CPU wheels of torch
ship the ATen/c10 CUDA headers but not the build-generated `c10/cuda/impl/cuda_cmake_macros.h`; when
it is missing, an equivalent one-line header goes into a temporary include directory.

    python tools/cuda_compile_check.py [sources...] [--arch 90 80]

Exit status 0 when every source compiles; 2 when nvcc is not found.
"""
from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CMAKE_MACROS = "c10/cuda/impl/cuda_cmake_macros.h"


def torch_include_dirs() -> list[str]:
    from torch.utils.cpp_extension import include_paths

    return include_paths()


def nvcc_command(source: Path, out: Path, archs: list[str], includes: list[str]) -> list[str]:
    # Same language flags as setup.py's CUDAExtension, so a pass here means the real build compiles.
    cmd = [shutil.which("nvcc") or "nvcc", "-c", str(source), "-o", str(out), "-O3", "--use_fast_math",
           "-std=c++17", "-diag-suppress=3306", "-DTORCH_EXTENSION_NAME=_C_cuda"]
    for arch in archs:
        cmd.append(f"-gencode=arch=compute_{arch},code=sm_{arch}")
    for inc in includes:
        cmd += ["-I", inc]
    return cmd


def check(sources: list[Path], archs: list[str]) -> dict[str, str]:
    """{source: ""} on success, else {source: compiler output}. Raises FileNotFoundError without nvcc."""
    if shutil.which("nvcc") is None:
        raise FileNotFoundError("nvcc not found on PATH")
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        includes = torch_include_dirs() + [str(ROOT / "csrc")]
        if not any(Path(d, CMAKE_MACROS).exists() for d in includes):
            shim = Path(tmp, "shim", CMAKE_MACROS)
            shim.parent.mkdir(parents=True)
            shim.write_text("#pragma once\n#define C10_CUDA_BUILD_SHARED_LIBS\n")
            includes.append(str(Path(tmp, "shim")))
        for src in sources:
            proc = subprocess.run(nvcc_command(src, Path(tmp, src.stem + ".o"), archs, includes),
                                  capture_output=True, text=True)
            results[str(src)] = "" if proc.returncode == 0 else (proc.stdout + proc.stderr)
    return results


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("sources", nargs="*", type=Path, help="default: every csrc/*.cu")
    ap.add_argument("--arch", nargs="+", default=["90", "80"], help="compute capabilities (default: 90 80)")
    args = ap.parse_args(argv)
    sources = args.sources or sorted((ROOT / "csrc").glob("*.cu"))
    if not sources:
        print("no .cu sources found", file=sys.stderr)
        return 1
    try:
        results = check(sources, args.arch)
    except FileNotFoundError as e:
        print(e, file=sys.stderr)
        return 2
    for src, err in results.items():
        print(f"{'ok  ' if not err else 'FAIL'} {os.path.relpath(src, ROOT)} (sm_{', sm_'.join(args.arch)})")
        if err:
            print(err, file=sys.stderr)
    return 0 if all(not e for e in results.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
