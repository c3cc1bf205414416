"""The sizing model (`dinovmf plan`): published runs land within 2x of their wall times, it uses the training
log's FLOP count and peak table, its checkpoint size is a real checkpoint's, its overlap arithmetic, and the
errors for bad input. (Its bytes per step against measured ones: tests/test_scaling.py.)"""
import csv

import pytest
from _train_utils import tiny_config

from dinovmf import plan as P
from dinovmf.cli import main
from dinovmf.monitor import GPU_PEAK_BF16


@pytest.mark.parametrize("run", P.PUBLISHED_RUNS, ids=lambda r: r.name)
def test_published_runs_are_predicted_within_2x_at_the_default_mfu(run):
    predicted = run.predicted_hours()
    print(f"{run.name}: predicted {predicted:.1f} h, published {run.hours:.1f} h, ratio {predicted / run.hours:.2f}")
    assert 0.5 <= predicted / run.hours <= 2.0
    assert run.sources and all("README" in s or ".yaml" in s or ".py" in s or "assumed" in s for s in run.sources)


def test_the_plan_counts_flops_and_peaks_as_the_training_log_does():
    from dinovmf.trainer import Trainer

    cfg = tiny_config("unused")
    trainer = Trainer(cfg, None, steps_per_epoch=1)
    size = P.model_size(cfg)
    assert size.flops_per_image == trainer.objective.flops_per_image(trainer.models.student)
    assert size.trainable_params == sum(p.numel() for p in trainer.trainable)
    assert P.cluster_for("h100").peak_flops == GPU_PEAK_BF16["H100"]
    plan = P.make_plan(cfg, P.cluster_for("A100"), mfu=0.5, loader_rate=100.0)
    assert plan.compute_s == pytest.approx(cfg.train.batch_size * size.flops_per_image / (0.5 * GPU_PEAK_BF16["A100"]))


def test_predicted_checkpoint_size_is_a_real_checkpoints(tmp_path):
    from dinovmf.trainer import Trainer

    cfg = tiny_config("unused", None, ["optim.freeze_last_layer=0"])
    trainer = Trainer(cfg, tmp_path, steps_per_epoch=1)
    from dinovmf.data.synthetic import synthetic_crops
    trainer.train_step(synthetic_crops(cfg.crops, cfg.train.batch_size), 0)  # AdamW state exists from here
    saved = trainer.save()  # a step_N directory: DCP's shard and metadata, trainer.json, manifest.json
    size = sum(f.stat().st_size for f in saved.rglob("*") if f.is_file())
    predicted = P.make_plan(cfg, P.cluster_for("H100"), loader_rate=1.0).checkpoint_bytes
    print(f"checkpoint: {size} B on disk, {predicted} B predicted")
    assert predicted <= size <= 1.05 * predicted  # the rest: names, config, RNG states, metadata


def test_ddp_hides_its_all_reduce_behind_the_backward_but_not_the_last_bucket():
    size = P.model_size(tiny_config("unused"))
    nbytes = P.comm_bytes_per_step(size, fsdp=False)["all_reduce"]
    total = P.collective_seconds("all_reduce", nbytes, 8, 1.0)
    assert total == pytest.approx(2 * 7 / 8 * nbytes / 1e9)
    long_backward = P.exposed_comm_seconds(size, False, 8, 1.0, forward_s=1, backward_s=10 * total, bucket_cap_mb=1)
    assert long_backward["exposed"] == pytest.approx(total * 2 ** 20 / nbytes)  # the last 1 MiB bucket
    short_backward = P.exposed_comm_seconds(size, False, 8, 1.0, forward_s=1, backward_s=0.25 * total,
                                            bucket_cap_mb=1)
    assert short_backward["exposed"] == pytest.approx(0.75 * total)
    assert P.exposed_comm_seconds(size, False, 1, 1.0, 1, 1)["total"] == 0  # one GPU: nothing to reduce


def test_loader_rate_is_the_newest_one_worker_row_of_the_data_benchmark(tmp_path):
    rate, source = P.loader_core_rate("ffcv")
    with open(P.DATA_PIPELINE_CSV, newline="") as f:
        rows = [r for r in csv.DictReader(f) if r["pipeline"] == "ffcv_end_to_end" and r["num_workers"] == "1"]
    assert rate == float(max(rows, key=lambda r: r["date"])["images_per_cpu_s"]) and "ffcv_end_to_end" in source
    with pytest.raises(ValueError, match="--loader-rate"):
        P.loader_core_rate("ffcv", tmp_path / "missing.csv")
    with pytest.raises(ValueError, match="ffcv, pil, dino_pil"):
        P.loader_core_rate("dali")


def test_cli_prints_the_plan_with_its_assumptions(capsys):
    assert main(["plan", "--config", "vit_b16_in1k", "--gpu", "H100", "--nodes", "4", "--epochs", "300"]) == 0
    out = capsys.readouterr().out
    for text in ("32 GPUs", "assumptions:", "MFU", "interconnect", "loader", "GFLOP/image", "all-reduce",
                 "cores per GPU keep up", "checkpoint", "300 epochs", "GPU-hours"):
        assert text in out, text


def test_unknown_gpu_lists_the_known_ones_and_peak_tflops_is_accepted(capsys):
    assert main(["plan", "--gpu", "MI300X"]) == 2
    err = capsys.readouterr().err
    assert "unknown GPU kind 'MI300X'" in err and "--peak-tflops" in err
    assert all(kind in err for kind in GPU_PEAK_BF16)
    assert main(["plan", "--gpu", "MI300X", "--peak-tflops", "1307", "--epochs", "100"]) == 0
    assert "1307 TFLOP/s per GPU (--peak-tflops)" in capsys.readouterr().out


@pytest.mark.parametrize("args, message", [
    (["--mfu", "0"], "--mfu must be in (0, 1]"),
    (["--nodes", "0"], "--nodes must be > 0"),
    (["--loader-rate", "-1"], "--loader-rate must be > 0"),
    (["--peak-tflops", "0"], "--peak-tflops must be > 0"),
])
def test_bad_numbers_are_one_line_errors(capsys, args, message):
    assert main(["plan", *args]) == 2
    assert message in capsys.readouterr().err
