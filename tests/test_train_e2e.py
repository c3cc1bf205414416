"""The real training loop on a tiny config (outputs, schedules, faults, telemetry), the training step on
its own, and the demo preset learning on the embedded data through the CLI."""
import math

import pytest
import torch
from _train_utils import (check_prototypes_frozen_then_train, fit, read_records, signal_before_batch,
                          tiny_config, tiny_data)

from dinovmf import checkpoint as ckpt
from dinovmf.cli import main
from dinovmf.data.synthetic import synthetic_crops
from dinovmf.models import build_ssl_model
from dinovmf.monitor import CollapseDetector
from dinovmf.optim import ema_update, param_groups
from dinovmf.prototypes import koleo_proto_loss
from dinovmf.train import NonFiniteLossError, train
from dinovmf.trainer import Trainer, to_floats


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return tiny_data(tmp_path_factory.mktemp("tiny"))


def test_few_steps_end_to_end(data, tmp_path, capsys):
    cfg = tiny_config(*data, ["steps=4", "train.ckpt_every=2"])
    summary = train(cfg, tmp_path)

    records = read_records(tmp_path)
    assert [r["step"] for r in records] == [1, 2, 3, 4]
    for r in records:
        assert math.isfinite(r["loss"]) and r["img_per_s"] > 0 and 0 < r["mfu"]
        assert r["loss"] == r["loss_dino"]  # the one weighted term of dino_vmf without KoLeo
        assert r["proto_norm_min"] <= r["proto_norm_mean"] <= r["proto_norm_max"]
        assert 1 <= r["unique_prototypes"] <= 64 and 1 <= r["teacher_used_prototypes"] <= 64
    assert [r["teacher_temp"] for r in records[:3]] == sorted(r["teacher_temp"] for r in records[:3])
    assert records[0]["lr"] == 0.0 and records[2]["lr"] > 0  # warm-up from 0 over 2 steps

    assert [s for s, _ in ckpt.list_checkpoints(tmp_path / "checkpoints")] == [2, 4]
    state = ckpt.load_checkpoint(ckpt.latest_checkpoint(tmp_path / "checkpoints"))
    assert {"step", "config", "student", "teacher", "optimizer", "loss", "rng", "model_args"} <= set(state)
    assert state["model_args"] == {"name": "vit_tiny", "patch_size": 8, "img_size": 32, "num_register_tokens": 0,
                                   "depth": 2}
    assert state["config"]["data"]["train"] == str(data[0])
    center = next(iter(state["loss"].values()))
    assert center.shape == (64,) and not torch.allclose(center, torch.full((64,), 1 / 64))  # prob centering moved

    # The teacher is an EMA of the student: different from it, and both moved away from the initialisation.
    torch.manual_seed(cfg.train.seed)
    init = build_ssl_model(cfg, 0.0).state_dict()
    key = "backbone.blocks.0.attn.qkv.weight"
    assert not torch.equal(state["teacher"][key], state["student"][key])
    assert not torch.equal(state["teacher"][key], init[key])
    # Prototypes are frozen for the first 0.4 epoch = 2 steps: still at init in the step-2 checkpoint.
    step2 = ckpt.load_checkpoint(tmp_path / "checkpoints" / "step_0000002.pt")
    assert torch.equal(step2["student"]["head.v"], init["head.v"])
    assert not torch.equal(state["student"]["head.v"], init["head.v"])

    assert read_records(tmp_path, "eval")[0]["knn_top1"] == summary["knn_top1"]
    # `dinovmf eval knn` on the final checkpoint reproduces the number the run printed.
    latest = str(ckpt.latest_checkpoint(tmp_path / "checkpoints"))
    assert main(["eval", "knn", latest, "--train", str(data[0]), "--val", str(data[1]), "--loader", "pil"]) == 0
    assert f"kNN top-1: {summary['knn_top1']:.2f}%" in capsys.readouterr().out
    for name in ("loss", "prototypes", "throughput", "evaluation"):
        assert (tmp_path / "plots" / f"{name}.png").stat().st_size > 1000
    assert (tmp_path / "config.yaml").is_file() and any((tmp_path / "tensorboard").iterdir())


def test_non_finite_loss_stops_and_keeps_last_good_checkpoint(data, tmp_path):
    """A NaN batch at step 3 (a crafted input, through the public `fit`): the run raises naming the step,
    the step-2 checkpoint stays the newest (and finite), and the error is in metrics.jsonl."""
    cfg = tiny_config(data[0], None, ["steps=6", "train.ckpt_every=2"])

    def nan_batch_at_3(i, crops):
        return [c * float("nan") for c in crops] if i == 3 else crops

    with pytest.raises(NonFiniteLossError, match=r"non-finite loss \(nan\) at step 3"):
        fit(cfg, tmp_path, nan_batch_at_3)
    assert [s for s, _ in ckpt.list_checkpoints(tmp_path / "checkpoints")] == [2]
    kept = ckpt.load_checkpoint(ckpt.latest_checkpoint(tmp_path / "checkpoints"))
    assert all(torch.isfinite(v).all() for v in kept["student"].values())
    assert read_records(tmp_path, "error")[0]["step"] == 3


def test_sigterm_saves_and_exits(data, tmp_path):
    import signal

    summary, _ = fit(tiny_config(data[0], None, ["steps=6"]), tmp_path, signal_before_batch(1))
    assert summary["interrupted"] and summary["step"] == 2  # the step in progress finishes, then it stops
    assert [s for s, _ in ckpt.list_checkpoints(tmp_path / "checkpoints")] == [2]
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # handlers restored


def test_time_limit_stops_after_the_step_that_spends_it(data, tmp_path):
    summary = train(tiny_config(data[0], None, ["steps=6", "train.time_limit_min=1e-6"]), tmp_path)
    assert summary["step"] == 1 and not summary["interrupted"]  # a normal end: saved (and evaluated)
    assert [s for s, _ in ckpt.list_checkpoints(tmp_path / "checkpoints")] == [1]


def test_train_step_without_a_loader_sums_named_terms_and_keeps_metrics_on_the_device():
    """`Trainer.train_step` is the public step (benchmarks call it): crops in, metrics out, no loader.
    Each weighted term is reported as loss_<name>, and the loss is their sum."""
    cfg = tiny_config("unused", None, ["steps=10", "loss.koleo_weight=0.1"])
    trainer = Trainer(cfg, steps_per_epoch=5)
    koleo = 0.1 * koleo_proto_loss(trainer.models.student.head.prototypes().detach()).item()  # before the update
    metrics = trainer.train_step(synthetic_crops(cfg.crops, cfg.train.batch_size), 0)
    assert trainer.step == 1
    # What the trainer computes stays on the device (turned into floats on log steps only).
    assert all(torch.is_tensor(metrics[k]) for k in ("loss", "loss_dino", "loss_koleo", "grad_norm"))
    values = to_floats(metrics)
    assert values["loss_koleo"] == pytest.approx(koleo, rel=1e-5) and values["loss_dino"] > 0
    assert values["loss"] == pytest.approx(values["loss_dino"] + values["loss_koleo"], rel=1e-6)
    with pytest.raises(ValueError, match="steps_per_epoch"):
        Trainer(cfg).train_step(synthetic_crops(cfg.crops, cfg.train.batch_size), 0)


def test_stability_probes_report_per_block_activations_and_gradient_norms():
    cfg = tiny_config("unused", None, ["steps=10", "train.probes=true"])
    trainer = Trainer(cfg, steps_per_epoch=5)
    values = to_floats(trainer.train_step(synthetic_crops(cfg.crops, cfg.train.batch_size), 1))
    assert {f"probe/act_rms_block{i}" for i in range(2)} <= set(values)  # model.depth=2
    assert values["probe/grad_norm_backbone"] > 0 and values["probe/grad_norm_prototypes"] > 0
    assert values["probe/grad_nonfinite"] == 0
    # Read right after backward (before clipping and the freeze): together they make up grad_norm.
    total = math.sqrt(sum(values[f"probe/grad_norm_{g}"] ** 2 for g in ("backbone", "head", "prototypes")))
    assert total == pytest.approx(values["grad_norm"], rel=1e-4)


def test_prototypes_are_frozen_for_the_freeze_steps_then_train():
    """optim.freeze_last_layer = 0.4 epoch of 5 steps = 2 steps: v and g (free norms: dino_vmf) are
    bitwise unchanged through steps 0-1 while the rest trains (lr > 0 from step 1), and move at step 2."""
    cfg = tiny_config("unused", None, ["steps=10", "optim.clip_grad=0"])
    check_prototypes_frozen_then_train(Trainer(cfg, steps_per_epoch=5), cfg)


def test_ema_update_matches_formula():
    torch.manual_seed(0)
    student, teacher = torch.nn.Linear(4, 3), torch.nn.Linear(4, 3)
    expected = [0.9 * t.detach().double() + 0.1 * s.detach().double()
                for t, s in zip(teacher.parameters(), student.parameters())]
    ema_update(teacher, student, 0.9)
    for p, e in zip(teacher.parameters(), expected):
        torch.testing.assert_close(p.detach().double(), e, rtol=1e-6, atol=1e-7)


def test_no_weight_decay_on_biases_norms_and_frozen_norms(data):
    cfg = tiny_config(data[0], None, ["method=dino"])  # norm_last_layer: g is frozen
    model = build_ssl_model(cfg, 0.0)
    decay, no_decay = param_groups(model)
    names = {id(p): n for n, p in model.named_parameters()}
    assert all(p.ndim >= 2 and not names[id(p)].endswith(".bias") for p in decay["params"])
    assert {names[id(p)] for p in no_decay["params"]} >= {"backbone.norm.weight", "backbone.blocks.0.attn.qkv.bias"}
    all_names = {names[id(p)] for g in (decay, no_decay) for p in g["params"]}
    assert "head.g" not in all_names and "backbone.mask_token" not in all_names


def test_collapse_detector():
    det = CollapseDetector(num_prototypes=1000, patience=2)
    log_k = math.log(1000)
    assert det.check(1, 0.5 * log_k) is None
    assert det.check(2, 0.99 * log_k) is None  # one check is not a trend
    assert "near log K" in det.check(3, 0.995 * log_k)
    assert det.check(4, 0.999 * log_k) is None  # warned once per kind
    assert det.check(5, 0.001) is None and "near 0" in det.check(6, 0.0)


@pytest.fixture(scope="module")
def embedded_root(tmp_path_factory):
    """The embedded dataset (3000 train / 500 val images, 10 classes), generated once for this module."""
    from dinovmf.data import ensure_embedded

    root = tmp_path_factory.mktemp("embedded")
    ensure_embedded(root)
    return root


# The demo recipe with a faster teacher (EMA momentum 0.95 instead of 0.98) and 2 of its 4 blocks, run for
# its first LEARNING_STEPS steps (the schedules stay the full 8-epoch run's: lr at its peak, not decayed).
# Measured on the shared 2-core box, teacher kNN top-1 minus the random-init model's, at step 300:
# +11.8 (seed 0: 55.6 vs 43.8), +10.4 (seed 1), +15.6 (seed 2); with the demo's own momentum 0.98 the
# teacher lags too far behind the student at this point (+2.6 with 4 blocks, seed 0).
LEARNING = ["optim.momentum_teacher=0.95", "model.depth=2", "data.val=null", "data.loader=pil",
            "data.num_workers=0"]
LEARNING_STEPS = 300
LEARNING_MARGIN = 5.0  # kNN points; one kNN figure on 500 queries has a standard error of about 2.2


def test_a_short_seeded_demo_run_beats_its_random_init_knn(embedded_root, tmp_path):
    """Training learns: after 300 steps on the embedded data, the teacher's kNN top-1 (DINO's protocol,
    k=20, T=0.07, 3000 train images as memory, 500 val queries) beats the same network's step-0 weights
    by a margin."""
    import copy

    from dinovmf.config import load_config
    from dinovmf.data import ensure_embedded
    from dinovmf.distributed import DistInfo
    from dinovmf.eval.run import knn_for_backbone
    from dinovmf.train import build_train_loader

    data = ensure_embedded(embedded_root)  # already generated: just the folders
    cfg = load_config("demo", [f"data.train={data['train']}"] + LEARNING)
    loader = build_train_loader(cfg, tmp_path, DistInfo())
    trainer = Trainer(cfg, steps_per_epoch=len(loader))
    random_init = copy.deepcopy(trainer.models.teacher.backbone)
    step = 0
    while step < LEARNING_STEPS:
        loader.set_epoch(step // len(loader))
        for crops, _labels in loader:
            trainer.train_step(crops, step)
            step += 1
            if step == LEARNING_STEPS:
                break

    def knn(backbone) -> float:
        return knn_for_backbone(backbone, data["train"], data["val"], cfg.crops.global_size, cfg.eval.batch_size,
                                "cpu", cfg.eval.knn_k, cfg.eval.knn_temperature, loader_backend="pil",
                                num_workers=0)["top1"]

    trained, baseline = knn(trainer.models.teacher.backbone), knn(random_init)
    assert trained >= baseline + LEARNING_MARGIN, f"trained teacher {trained:.1f}% vs random init {baseline:.1f}%"


def test_demo_preset_runs_end_to_end_through_the_cli(embedded_root, tmp_path, monkeypatch, capsys):
    """`make demo`'s command for 3 steps (FFCV when installed): the .beton prepared from the embedded data,
    both kNN numbers printed as recorded, the evaluation figure written (the full demo is `make demo`)."""
    monkeypatch.setenv("DINOVMF_DATA", str(embedded_root))
    out = tmp_path / "demo"
    assert main(["train", "--config", "demo", "--out", str(out), "steps=3", "train.log_every=1"]) == 0
    printed = capsys.readouterr().out
    assert "4 blocks" in printed and "step 3/3 | loss " in printed  # progress lines: stdout is not a terminal
    evaluation = read_records(out, "eval")[0]
    assert (f"kNN top-1: trained teacher {evaluation['knn_top1']:.2f}% vs random init "
            f"{evaluation['knn_top1_random_init']:.2f}%") in printed
    assert (out / "plots" / "evaluation.png").is_file()
    assert [r["step"] for r in read_records(out)] == [1, 2, 3]
    from dinovmf.data import embedded
    assert (embedded_root / f"embedded-v{embedded.VERSION}-{embedded.IMAGE_SIZE}px" / "val").is_dir()
