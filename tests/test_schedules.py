"""Per-step schedules against DINO's precomputed numpy `cosine_scheduler` (the oracle)."""
import numpy as np
import pytest

from dinovmf.config import load_config
from dinovmf.schedules import build_schedules, cosine_schedule, linear_warmup


def dino_cosine_scheduler(base_value, final_value, epochs, niter_per_ep, warmup_epochs=0, start_warmup_value=0):
    """main_dino.py / utils.py cosine_scheduler, verbatim in float64."""
    warmup_schedule = np.array([])
    warmup_iters = warmup_epochs * niter_per_ep
    if warmup_epochs > 0:
        warmup_schedule = np.linspace(start_warmup_value, base_value, warmup_iters, endpoint=False)
    iters = np.arange(epochs * niter_per_ep - warmup_iters)
    schedule = final_value + 0.5 * (base_value - final_value) * (1 + np.cos(np.pi * iters / len(iters)))
    return np.concatenate((warmup_schedule, schedule))


@pytest.mark.parametrize("epochs, per_epoch, warmup", [(10, 7, 2), (5, 3, 0), (3, 11, 1)])
def test_cosine_matches_dino(epochs, per_epoch, warmup):
    ref = dino_cosine_scheduler(5e-4, 1e-6, epochs, per_epoch, warmup)
    ours = [cosine_schedule(s, epochs * per_epoch, 5e-4, 1e-6, warmup * per_epoch) for s in range(len(ref))]
    np.testing.assert_allclose(ours, ref, rtol=1e-12, atol=1e-18)
    assert cosine_schedule(len(ref) + 5, len(ref), 5e-4, 1e-6) == 1e-6  # holds the end past the run


def test_teacher_temperature_warmup():
    ref = np.concatenate((np.linspace(0.04, 0.07, 30), np.ones(10) * 0.07))  # DINOLoss's schedule, per epoch
    ours = [linear_warmup(s, 29, 0.04, 0.07) for s in range(40)]
    np.testing.assert_allclose(ours, ref, rtol=1e-12)


def test_bad_arguments():
    with pytest.raises(ValueError, match="total_steps"):
        cosine_schedule(0, 0, 1.0, 0.0)
    with pytest.raises(ValueError, match="warmup_steps"):
        cosine_schedule(0, 10, 1.0, 0.0, warmup_steps=-1)
    with pytest.raises(ValueError, match="steps_per_epoch"):
        build_schedules(load_config("demo"), 0)


def test_run_schedules_scale_lr_and_convert_epochs():
    cfg = load_config("vit_s16_in1k", ["train.batch_size=32"])
    sched = build_schedules(cfg, steps_per_epoch=100, world_size=4)
    assert sched.total_steps == 100 * cfg.epochs
    assert sched.lr == pytest.approx(5e-4 * 128 / 256)
    assert sched.warmup_steps == 1000 and sched.freeze_last_layer_steps == 100
    first, last = sched.at(0), sched.at(sched.total_steps - 1)
    assert first["lr"] == 0.0 and first["wd"] == pytest.approx(0.04) and first["momentum"] == pytest.approx(0.996)
    assert first["teacher_temp"] == 0.04 and first["freeze_last_layer"]
    assert last["wd"] == pytest.approx(0.4, abs=1e-6) and last["momentum"] == pytest.approx(1.0, abs=1e-8)
    assert last["teacher_temp"] == 0.07 and not last["freeze_last_layer"]
    assert sched.at(1000)["lr"] == pytest.approx(sched.lr)  # the peak right after warm-up


def test_steps_caps_the_run_and_the_warmups():
    sched = build_schedules(load_config("vit_s16_in1k", ["steps=50"]), steps_per_epoch=100)
    assert sched.total_steps == 50
    assert sched.warmup_steps == 50 and sched.teacher_temp_warmup_steps == 50
