"""bench.harness: the CSV/PNG record, the table, and the timing / memory helpers."""
import csv
import math
import time

import pytest
import torch

from bench import harness


def _read(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_record_appends_stamped_rows_and_plots(tmp_path, capsys):
    rows = [{"n": n, "impl": impl, "ms": n * (2 if impl == "a" else 1.0)} for impl in "ab" for n in (1, 4, 16)]
    path = harness.record("demo", rows, x="n", y="ms", group="impl", logx=True, results_dir=tmp_path)
    out = capsys.readouterr().out
    assert path == tmp_path / "demo.csv" and (tmp_path / "demo.png").stat().st_size > 0
    assert "impl" in out and "32" in out  # the table was printed
    got = _read(path)
    assert len(got) == 6
    assert got[0]["device"] == harness.device_name() and got[0]["torch"] == torch.__version__
    assert got[0]["date"].endswith("+00:00")  # UTC ISO
    assert [float(r["ms"]) for r in got] == [r["ms"] for r in rows]

    # A second run appends; a new column rewrites the header and keeps the old rows.
    harness.record("demo", [{"n": 2, "impl": "c", "ms": 1.5, "gbps": 3.0}], x="n", y="ms", results_dir=tmp_path)
    got = _read(path)
    assert len(got) == 7 and got[-1]["gbps"] == "3.0" and got[0]["gbps"] == "" and got[0]["impl"] == "a"


def test_record_rejects_bad_rows(tmp_path):
    with pytest.raises(ValueError, match="rows"):
        harness.record("x", [], x="n", y="ms", results_dir=tmp_path)
    with pytest.raises(ValueError, match="y='ms'"):
        harness.record("x", [{"n": 1}], x="n", y="ms", results_dir=tmp_path)
    with pytest.raises(ValueError, match="device"):
        harness.record("x", [{"n": 1, "ms": 1, "device": "mine"}], x="n", y="ms", results_dir=tmp_path)
    with pytest.raises(ValueError, match="name"):
        harness.record("a/b", [{"n": 1, "ms": 1}], x="n", y="ms", results_dir=tmp_path)


def test_format_table_aligns_columns():
    lines = harness.format_table([{"a": 1, "b": 0.123456}, {"a": 100, "b": float("nan")}], ["a", "b"]).splitlines()
    assert len({len(line) for line in lines}) == 1  # every line equally wide
    assert "0.1235" in lines[2] and "nan" in lines[3]


def test_device_name_names_cpu_cores():
    assert "cores)" in harness.device_name("cpu")


def test_timeit_returns_median_milliseconds():
    calls = []
    ms = harness.timeit(lambda: (calls.append(1), time.sleep(0.002)), warmup=2, iters=5, sync=False)
    assert len(calls) == 7
    assert 1.5 <= ms < 50
    with pytest.raises(ValueError, match="iters"):
        harness.timeit(lambda: None, iters=0)


def test_peak_memory_cpu_sees_a_large_temporary():
    n = 1 << 20  # a 4 MiB float32 temporary allocated and freed inside fn
    peak = harness.peak_memory(lambda: torch.ones(n).sum(), device="cpu")
    assert not math.isnan(peak), "the pinned torch's profiler records memory events; NaN means it broke"
    assert 4 * n <= peak < 4 * n * 4
