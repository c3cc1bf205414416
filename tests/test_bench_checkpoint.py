"""bench/bench_checkpoint.py on a tiny model in this process: every method writes a checkpoint that reads
back, and the rows carry what the README quotes."""
import json
import math

from bench import bench_checkpoint as bench


def test_every_method_writes_reads_back_and_is_measured(tmp_path):
    bench.run_setup("tiny", "single", reps=1, root=tmp_path, margin=0)
    rows = json.loads((tmp_path / "rows.json").read_text())
    assert [r["method"] for r in rows] == list(bench.METHODS)
    for row in rows:
        for key in ("blocked_s", "total_s", "peak_extra_mb", "disk_mb", "verify_s", "resume_s"):
            assert math.isfinite(row[key]) and row[key] >= 0, (row["method"], key)
        assert row["disk_mb"] > 1 and row["blocked_s"] <= row["total_s"]
    assert rows[0]["blocked_vs_full"] == 1.0 and "blocked_first_s" in rows[2]
    assert not list((tmp_path / "run" / "checkpoints").iterdir())  # each checkpoint removed after its row
    assert bench.needed_bytes("tiny", "fsdp2x2") < bench.needed_bytes("tiny", "ddp2")
    # A machine without the memory: nothing runs, and the row says why.
    bench.run_setup("tiny", "single", reps=1, root=tmp_path / "full", margin=1 << 60)
    assert "not enough free memory" in json.loads((tmp_path / "full" / "rows.json").read_text())[0]["note"]
