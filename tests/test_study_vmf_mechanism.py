"""studies/vmf_mechanism.py at a toy budget: the grid's configs, the rows, resuming, the report."""
import csv
import json
import os
import subprocess
import sys

import pytest
import yaml

from studies import vmf_mechanism as study
from dinovmf.models import init_student

KNN = ["--knn-memory-per-class", "10", "--knn-queries-per-class", "5"]


def test_cells_differ_only_in_what_the_grid_varies():
    (off, on) = [study.run_config(c, 3, "vit_tiny", 10, None, ()) for c in study.grid(["off", "on"], ["logit"],
                                                                                        [0.25], [4.0])]
    assert (off.method, off.vmf, on.method, on.vmf) == ("dino", False, "dino_vmf", True)
    for cfg in (off, on):
        assert not cfg.norm_last_layer and cfg.centering == "logit" and cfg.train.seed == 3 and cfg.steps == 10
        assert (cfg.model.proto_norm_init_spread, cfg.optim.proto_norm_lr_mult) == (0.25, 4.0)
    a, b = off.to_dict(), on.to_dict()
    assert {k for k in a if a[k] != b[k]} == {"method"}  # everything else, every group, is equal


def test_grid_runs_records_resumes_and_reports(tmp_path, monkeypatch):
    monkeypatch.setenv("DINOVMF_DATA", str(tmp_path / "data"))
    out, results = tmp_path / "runs", tmp_path / "results"
    args = ["--steps", "2", "--seeds", "0", "--centering", "prob", "--spreads", "0.5", "--out", str(out),
            "--results-dir", str(results), *KNN]
    rows = study.main(args)

    assert [(r["vmf"], r["seed"]) for r in rows] == [("off", 0), ("on", 0)]
    off, on = rows
    cfg = study.run_config(study.Cell("on", "prob", 0.5, 1.0), 0, "vit_tiny", 2, None, ())
    start = init_student(cfg).head.g.detach()
    for r in rows:
        assert r["steps_completed"] == r["evaluated_step"] == 2 and not r["diverged"] and not r["collapsed"]
        assert (r["norm_start_min"], r["norm_start_max"]) == (start.min().item(), start.max().item())
        assert r["norm_start_median"] == start.median().item() and r["norm_mid_step"] == 1
        assert r["norm_min"] < 0.5 < 2 < r["norm_max"] and r["logc_range"] > 1  # spread norms, large log C_p gaps
        for prefix in ("", "centered_"):
            assert -1 <= r[f"{prefix}norm_wins_spearman"] <= 1 and 0 <= r[f"{prefix}top_norm_decile_wins"] <= 1
            assert 1 <= r[f"{prefix}used_prototypes"] <= 256
        assert 0 <= r["knn_top1"] <= 100
        run_dir = out / r["run_id"]
        assert [p.name for p in (run_dir / "checkpoints").iterdir()] == ["step_0000002.pt"]  # pruned to the last
        trained = yaml.safe_load((run_dir / "config.yaml").read_text())
        assert trained["model"]["proto_norm_init_spread"] == 0.5 and trained["loss"]["centering"] == "prob"
    # Within the frozen-prototype warm-up the norms are the initial ones in both runs (same seed); the
    # end norms are those of the prototypes g v / ||v||, so equal to float32 rounding.
    assert off["norm_max"] == on["norm_max"] == pytest.approx(start.max().item(), rel=1e-6)

    with open(results / "study_vmf_mechanism.csv") as f:
        recorded = list(csv.DictReader(f))
    assert [r["run_id"] for r in recorded] == [r["run_id"] for r in rows]
    assert {"vmf", "centering", "norm_spread", "seed", "knn_top1", "used_prototypes", "unique_prototypes",
            "norm_min", "norm_max", "diverged"} <= set(recorded[0])
    assert (results / "study_vmf_mechanism.png").stat().st_size > 0
    md = (results / "study_vmf_mechanism.md").read_text()
    assert "| 1 | prob | off | 0.5 | 1 |" in md and "| 1 | prob | 0.5 | 1 |" in md  # cell row and paired row

    # Resume: finished runs are skipped (nothing trains), a new seed runs; the CSV gains only the new
    # rows; text written around the tables survives the report.
    (results / "study_vmf_mechanism.md").write_text("my reading\n" + md + "\nmore of my reading\n")
    trained_cells = []
    real = study.run_cell
    monkeypatch.setattr(study, "run_cell", lambda cell, seed, *a: trained_cells.append((cell.vmf, seed))
                        or real(cell, seed, *a))
    rows = study.main([*args[:3], "0,1", *args[4:], "--vmf", "on"])
    assert trained_cells == [("on", 1)] and len(rows) == 3
    with open(results / "study_vmf_mechanism.csv") as f:
        seeds = sorted(r["run_id"].rsplit("/", 1)[1] for r in csv.DictReader(f))
    assert seeds == ["seed0", "seed0", "seed1"]
    md = (results / "study_vmf_mechanism.md").read_text()
    assert md.startswith("my reading\n") and md.endswith("more of my reading\n")
    assert "| 1 | prob | on | 0.5 | 2 |" in md and "| 1 | prob | off | 0.5 | 1 |" in md

    saved = json.loads((out / off["run_id"] / "study_row.json").read_text())
    assert saved == off

    # --reevaluate: the same checkpoints, another kNN memory: the rows change there, the norms do not.
    again = study.main([*args[:-4], "--knn-memory-per-class", "20", "--knn-queries-per-class", "5", "--reevaluate",
                        "--no-record"])
    assert [r["knn_memory"] for r in again] == [200, 200, 100]  # seed 0 (this grid) evaluated again, not 1
    assert [again[0][k] for k in study.NORM_KEYS] == [off[k] for k in study.NORM_KEYS]
    rows = again
    assert study.main([*args, "--report-only"]) == rows  # reports without data or training


def test_aggregate_and_paired_effect_are_over_seeds():
    def row(vmf, seed, knn):
        return {"model": "m", "steps": 1, "recipe": "r", "norm_lr_mult": 1.0, "vmf": vmf, "centering": "prob",
                "norm_spread": 0.5, "seed": seed, "knn_top1": knn, "diverged": vmf == "off" and seed == 1,
                "collapsed": False, "knn_top1_random_init": 40.0}
    rows = [row("off", 0, 50.0), row("off", 1, 54.0), row("on", 0, 53.0), row("on", 1, 55.0), row("on", 2, 60.0)]
    off, on = study.aggregate(rows)
    assert (off["vmf"], off["seeds"], off["diverged"]) == ("off", [0, 1], 1)
    assert off["knn_top1"] == (52.0, pytest.approx(2.83, abs=0.01))
    assert on["knn_top1"][0] == pytest.approx(56.0) and on["seeds"] == [0, 1, 2]
    (effect,) = study.paired_vmf_effect(rows, ("knn_top1",))
    assert effect["n"] == 2 and effect["knn_top1"] == (2.0, pytest.approx(1.414, abs=1e-3))  # seed 2 has no pair


@pytest.mark.parametrize("flag, value, message", [
    ("--spreads", "-0.5", "model.proto_norm_init_spread must be a finite sigma >= 0"),
    ("--spreads", "abc", "--spreads: expected comma-separated numbers"),
    ("--vmf", "maybe", "--vmf"),
    ("--centering", "sinkhorn", "--centering"),
    ("--set", "optim.lrr=1", "did you mean 'optim.lr'"),
])
def test_bad_arguments_fail_before_training(flag, value, message, tmp_path, capsys):
    with pytest.raises(SystemExit):
        study.main([flag, value, "--out", str(tmp_path / "runs")])
    assert message in capsys.readouterr().err
    assert not (tmp_path / "runs").exists()


def test_spread_explanation_gives_the_kappa_and_log_normaliser_ranges(capsys):
    study.main(["--explain-spreads", "--spreads", "0,0.5"])
    out = capsys.readouterr().out
    assert "p = 128, tau = 0.1" in out
    assert "sigma 0: g in [1.00, 1.00], kappa in [10.0, 10.0], log C_p range 0.00 nats" in out
    wide = next(line for line in out.splitlines() if "sigma 0.5:" in line)
    assert float(wide.split("log C_p range ")[1].split()[0]) > 3


def test_a_run_is_claimed_by_one_live_process(tmp_path):
    run = tmp_path / "series" / "cell" / "seed0"
    assert study.claim_run(run)
    assert not study.claim_run(run)  # held by a live process (this one)
    study.release_run(run)
    assert study.claim_run(run)
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    (run.parent / "seed0.claim").write_text(dead.stdout.strip())  # a holder that has exited
    assert study.claim_run(run)
    assert (run.parent / "seed0.claim").read_text() == str(os.getpid())
