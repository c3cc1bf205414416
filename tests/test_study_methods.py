"""studies/methods.py end to end at a toy budget: it trains, evaluates, records, and re-evaluates."""
import csv
import json

import pytest
import yaml

from studies import methods as study_methods


def test_study_trains_records_and_reevaluates(tmp_path, monkeypatch):
    monkeypatch.setenv("DINOVMF_DATA", str(tmp_path / "data"))
    out, results = tmp_path / "runs", tmp_path / "results"
    common = ["--models", "vit_tiny", "--methods", "dino,dino_vmf", "--out", str(out),
              "--results-dir", str(results), "--knn-memory-per-class", "20", "--knn-queries-per-class", "10"]
    rows = study_methods.main(common + ["--steps-tiny", "2"])

    assert [r["method"] for r in rows] == ["dino", "dino_vmf"]
    for r in rows:
        assert r["steps_completed"] == r["evaluated_step"] == 2 and not r["nan_seen"]
        assert 0 <= r["knn_top1"] <= 100 and (r["knn_memory"], r["knn_queries"]) == (200, 100)
        assert 1 <= r["used_prototypes"] <= 256 and r["unique_prototypes"] == 256
    dino, vmf = rows
    assert abs(dino["norm_min"] - 1) < 1e-6 and abs(dino["norm_max"] - 1) < 1e-6  # DINO: unit prototypes
    with open(results / "study_methods.csv") as f:
        assert [r["method"] for r in csv.DictReader(f)] == ["dino", "dino_vmf"]
    assert (results / "study_methods.png").stat().st_size > 0

    # --reevaluate: same checkpoints, another kNN memory -> the rows change there and only there.
    again = study_methods.main(common[:-4] + ["--knn-memory-per-class", "30", "--knn-queries-per-class", "10",
                                              "--reevaluate", "--no-record"])
    assert [r["knn_memory"] for r in again] == [300, 300]
    saved = json.loads((out / "vit_tiny" / "dino_vmf" / study_methods.ROW_FILE).read_text())
    assert saved["knn_memory"] == 300 and saved["used_prototypes"] == again[1]["used_prototypes"]
    assert {k: v for k, v in saved.items() if k.startswith("norm")} == {k: v for k, v in vmf.items()
                                                                         if k.startswith("norm")}


def test_study_set_overrides_name_a_separate_series(tmp_path, monkeypatch):
    monkeypatch.setenv("DINOVMF_DATA", str(tmp_path / "data"))
    out, results = tmp_path / "runs", tmp_path / "results"
    rows = study_methods.main(["--models", "vit_tiny", "--methods", "dino_vmf_logit_center", "--steps-tiny", "1",
                               "--set", "optim.clip_grad=0", "--name", "study_stress", "--out", str(out),
                               "--results-dir", str(results), "--knn-memory-per-class", "10",
                               "--knn-queries-per-class", "5"])
    (row,) = rows
    assert row["recipe"] == "demo optim.clip_grad=0" and row["overrides"] == ["optim.clip_grad=0"]
    assert row["steps_completed"] == 1
    trained = yaml.safe_load((out / "vit_tiny" / "dino_vmf_logit_center" / "config.yaml").read_text())
    assert trained["optim"]["clip_grad"] == 0 and trained["loss"]["centering"] == "logit"
    assert trained["method"] == "dino_vmf"
    assert (results / "study_stress.csv").is_file() and (results / "study_stress.png").is_file()
    assert not (results / "study_methods.csv").exists()


def test_study_rejects_a_bad_override_before_training(tmp_path, capsys):
    with pytest.raises(SystemExit):
        study_methods.main(["--set", "optim.lrr=1", "--out", str(tmp_path / "runs")])
    err = capsys.readouterr().err
    assert "optim.lrr" in err and "optim.lr" in err
    assert not (tmp_path / "runs").exists()
