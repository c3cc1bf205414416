"""bench/bench_head_loss.py runs end to end at a tiny size (numbers go to results, not to tests: this only
checks that the benchmark works and reports what it claims)."""
import math

import pytest

from bench import bench_head_loss as bench


@pytest.mark.parametrize("method", list(bench.METHODS))
def test_measure_reports_every_implementation(method):
    x = bench.Inputs(3, 2, 4, 64, 16, method)
    rows = bench.measure(x, "tiny", method, threads=1, backend="cpp", compile_ref=False, iters=1, warmup=0)
    by_impl = {r["impl"]: r for r in rows}
    assert set(by_impl) == {"fused", "eager", "floor"}
    assert by_impl["floor"]["x_floor"] == 1.0 and "peak_extra_mb" not in by_impl["floor"]
    for name in ("fused", "eager"):
        assert by_impl[name]["ms"] > 0 and math.isfinite(by_impl[name]["peak_extra_x_logits"])
    # the eager reference holds at least the [N, K] logits and their gradient; at this size the fused op's one
    # chunk is all rows, so it holds one [N, K] buffer (the issue-size figures are in bench/results)
    assert by_impl["eager"]["peak_extra_x_logits"] >= 2.0
    assert by_impl["fused"]["peak_extra_x_logits"] <= by_impl["eager"]["peak_extra_x_logits"]
