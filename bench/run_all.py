"""Run every benchmark in turn with its default settings for this device (`make bench`).

Each benchmark appends its rows to bench/results/<name>.csv (stamped with device, versions and date) and
redraws bench/results/<name>.png. Run on a quiet machine: the numbers are only as good as the machine's
idleness. On a GPU the defaults switch to the issue sizes (ViT-B, batch 64, bf16).
"""
from __future__ import annotations

import subprocess
import sys
import time

BENCHMARKS = (
    ("bench.bench_vmf_normalizer", []),
    ("bench.bench_loss", ["--k", "4096", "16384", "65536"]),
    ("bench.bench_model", []),
    ("bench.bench_augment", []),
    ("bench.bench_data", []),
    ("bench.bench_train", []),
    ("bench.bench_step", []),
    ("bench.bench_scaling", []),
)


def main(argv: list[str] | None = None) -> int:
    only = set(argv if argv is not None else sys.argv[1:])
    failed = []
    for module, args in BENCHMARKS:
        if only and module.split(".")[-1] not in only:
            continue
        print(f"== {module} {' '.join(args)}", flush=True)
        start = time.perf_counter()
        rc = subprocess.call([sys.executable, "-m", module, *args])
        print(f"== {module}: exit {rc} after {time.perf_counter() - start:.0f} s", flush=True)
        if rc:
            failed.append(module)
    if failed:
        print(f"failed: {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
