"""One MFU: the training log, the benchmarks and (later) the sizing model share one FLOP count
(`MultiCropWrapper.forward_flops`, via the objective) and one peak (`dinovmf.monitor.peak_flops`)."""
from __future__ import annotations

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from _train_utils import fit, read_records, tiny_config, tiny_data
from bench import bench_model
from bench.bench_step import STEPS_PER_EPOCH, dinovmf_training
from bench.bench_train import run_one
from dinovmf.data.synthetic import synthetic_crops
from dinovmf.monitor import mfu, peak_flops
from dinovmf.objectives import build_objective
from dinovmf.trainer import Trainer


def test_forward_flops_matches_flop_counter_with_the_prototype_logits():
    """The count of one image's crops through backbone, head and logits equals torch's FlopCounterMode."""
    cfg = tiny_config("unused", None, ["model.attn_backend=math"])
    trainer = Trainer(cfg, steps_per_epoch=STEPS_PER_EPOCH)
    model = trainer.models.student
    crops = synthetic_crops(cfg.crops, 2)
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        z = model(crops)["z"]
        z @ model.head.prototypes().t()
    sizes = [c.shape[-1] for c in crops]
    assert counter.get_total_flops() == 2 * model.forward_flops(sizes)


def test_benchmarks_and_objective_count_the_same_student():
    cfg = tiny_config("unused")
    trainer = Trainer(cfg, steps_per_epoch=STEPS_PER_EPOCH)
    model, crops = trainer.models.student, synthetic_crops(cfg.crops, 3)
    student, teacher = build_objective(cfg).forward_flops(model)
    assert bench_model.step_flops(model, crops) == 3 * 3 * student
    assert trainer.objective.flops_per_image(model) == 3 * student + teacher
    # the teacher sees the two global crops only
    assert teacher == model.forward_flops([cfg.crops.global_size] * 2)


def test_peak_is_measured_once_per_process():
    first, source = peak_flops(torch.device("cpu"))
    assert first > 0 and "measured" in source
    assert peak_flops("cpu") == (first, source)


def test_training_log_and_bench_train_report_the_same_mfu_for_the_same_step(tmp_path):
    """The MFU a training log line shows equals what bench_train computes at that log line's images/s."""
    train, _ = tiny_data(tmp_path)
    cfg = tiny_config(train, None, ["steps=3"])
    fit(cfg, tmp_path / "run")
    logged = [r for r in read_records(tmp_path / "run") if "mfu" in r]
    assert logged, "the training log has no MFU"
    training = dinovmf_training(cfg, torch.device("cpu"))
    bench_flops = training.objective.flops_per_image(training.student)
    peak, _ = peak_flops(torch.device("cpu"))
    for record in logged:
        assert record["mfu"] == pytest.approx(mfu(record["img_per_s"], bench_flops, peak), rel=1e-12)
    row = run_one(cfg, steps=1, warmup=0, device=torch.device("cpu"))
    assert row["mfu"] == pytest.approx(mfu(row["images_per_s"], bench_flops, peak), rel=1e-12)
    assert row["gflop_per_image"] * 1e9 == pytest.approx(bench_flops, rel=1e-12)
