"""bench/bench_step.py and its baseline bench/dino_original.py (the original DINO step).

The baseline is only worth timing if it computes what the original computes; the oracle is dinovmf's
own `dino` method, which implements the same maths (logit centering, unit prototypes) differently
(fused kernels, one pass per student view). From identical weights and crops:
- the loss, every head gradient (and the backbone's) and the updated center agree (to fp32 rounding);
- several FULL steps with clipping off (the two clip differently by design: per parameter vs global
  norm) agree in loss and in every student and teacher parameter, including a step with the last
  layer frozen: this checks the step machinery (parameter groups and weight decay, schedules, the
  freeze, AdamW, the EMA loop, the center), not just the loss.
Per-parameter clipping is checked against its definition; the benchmark runs end to end at tiny sizes.
"""
import csv
import math

import pytest
import torch

from bench import bench_step
from bench.dino_original import (G_NAME, V_NAME, OriginalDINOHead, clip_gradients_per_parameter,
                                 state_from_dinovmf)
from dinovmf.data.synthetic import synthetic_crops

TINY = ["model.drop_path=0.0", "optim.warmup_epochs=0", "loss.warmup_teacher_temp_epochs=0"]


def _pair(norm_last_layer: bool, extra=()):
    """(dinovmf training, original step object, cfg) at the tiny size from the same weights."""
    overrides = TINY + [f"model.norm_last_layer={str(norm_last_layer).lower()}"] + list(extra)
    cfg = bench_step.bench_config("tiny", "dino", overrides)
    ours = bench_step.dinovmf_training(cfg, torch.device("cpu"))
    original, step = bench_step.original_training(cfg, torch.device("cpu"), norm_last_layer, like=ours)
    return ours, original, step, cfg


def _original_name(name: str) -> str:
    return {"head.v": V_NAME, "head.g": G_NAME}.get(name, name)


@pytest.mark.parametrize("norm_last_layer", [True, False])
def test_original_loss_head_gradients_and_center_equal_dinovmf_dino(norm_last_layer):
    ours, original, _, cfg = _pair(norm_last_layer)
    crops = synthetic_crops(cfg.crops, cfg.train.batch_size, seed=1)
    temp = 0.05
    # Twice: the second loss is centred by the center the first one updated (not zero any more).
    for _ in range(2):
        ours.student.zero_grad(set_to_none=True)
        original.student.zero_grad(set_to_none=True)
        terms, _ = ours.objective(ours.student, ours.teacher, crops, temp)
        loss = sum(terms.values())
        loss.backward()
        loss_o = original.loss(original.student(crops), original.teacher(crops[:2]), temp)
        loss_o.backward()
        assert abs(loss.item() - loss_o.item()) <= 1e-5 * max(1.0, abs(loss_o.item()))
        torch.testing.assert_close(ours.objective.dino.center.center, original.loss.center.reshape(-1),
                                   rtol=1e-5, atol=1e-6)
    grads_o = {n: p.grad for n, p in original.student.named_parameters() if p.grad is not None}
    compared = 0
    for name, p in ours.student.named_parameters():
        if p.grad is None:
            continue
        g_o = grads_o[_original_name(name)].reshape(p.shape)
        scale = p.grad.abs().max().item()
        torch.testing.assert_close(p.grad, g_o, rtol=1e-4, atol=1e-5 * max(scale, 1e-6), msg=name)
        compared += name.startswith("head.")
    head_params = 2 * 3 + 1 + (0 if norm_last_layer else 1)  # 3 Linear (w, b), v, and g when it trains
    assert compared == head_params


def test_original_full_steps_equal_dinovmf_steps_without_clipping():
    # Step 0 has the last layer frozen (1 step of freeze); clipping off on both sides.
    ours, original, original_step, cfg = _pair(True, ["optim.clip_grad=0", "optim.freeze_last_layer=0.001"])
    crops = synthetic_crops(cfg.crops, cfg.train.batch_size, seed=2)
    v_before = original.student.state_dict()[V_NAME].clone()
    for i in range(3):
        loss, loss_o = float(ours.step(crops, i)), original_step(crops, i)
        assert abs(loss - loss_o) <= 1e-5 * max(1.0, abs(loss_o)), f"step {i}"
        if i == 0:  # frozen: the prototypes did not move (and the rest did)
            torch.testing.assert_close(original.student.state_dict()[V_NAME], v_before, rtol=0, atol=0)
    # The key bias of attention gets a gradient that is zero in exact arithmetic (softmax ignores a
    # per-query shift), so both sides feed AdamW rounding noise, which it scales to steps of up to lr:
    # that slice may differ by up to (steps x lr); everything else must agree to rounding.
    lr_bound = 3 * bench_step.build_schedules(cfg, bench_step.STEPS_PER_EPOCH).lr
    dim = ours.student.backbone.embed_dim
    for mine, theirs in ((ours.student, original.student), (ours.teacher, original.teacher)):
        expected = state_from_dinovmf(mine.state_dict())
        got = theirs.state_dict()
        assert set(expected) == set(got)
        for key, value in expected.items():
            if key.endswith("attn.qkv.bias"):
                key_bias = slice(dim, 2 * dim)
                torch.testing.assert_close(got[key][key_bias], value[key_bias], rtol=0, atol=lr_bound, msg=key)
                got_key, value = got[key].clone(), value.clone()
                got_key[key_bias] = value[key_bias] = 0
                torch.testing.assert_close(got_key, value, rtol=1e-4, atol=1e-6, msg=key)
                continue
            torch.testing.assert_close(got[key], value, rtol=1e-4, atol=1e-6, msg=key)
    torch.testing.assert_close(ours.objective.dino.center.center, original.loss.center.reshape(-1),
                               rtol=1e-5, atol=1e-6)
    assert not torch.equal(original.student.state_dict()[V_NAME], v_before)  # trained after the freeze


def test_per_parameter_clipping_caps_each_gradient_norm_and_keeps_directions():
    model = torch.nn.Linear(3, 2)
    big, small = torch.tensor([[6.0, 0.0, 8.0], [0.0, 0.0, 0.0]]), torch.tensor([0.6, 0.8])
    model.weight.grad, model.bias.grad = big.clone(), small.clone()
    norms = clip_gradients_per_parameter(model, clip=3.0)
    assert norms == pytest.approx([10.0, 1.0])
    torch.testing.assert_close(model.weight.grad, big * 3.0 / (10.0 + 1e-6))  # norm ~3, same direction
    torch.testing.assert_close(model.bias.grad, small, rtol=0, atol=0)        # under the clip: untouched


def test_original_head_outputs_weight_normalised_logits():
    head = OriginalDINOHead(8, 5, hidden_dim=6, bottleneck_dim=4, norm_last_layer=True)
    g = head.last_layer.parametrizations.weight.original0
    assert g.shape == (5, 1) and not g.requires_grad and torch.all(g == 1)
    x = torch.randn(3, 8)
    z = torch.nn.functional.normalize(head.mlp(x), dim=-1)
    v = head.last_layer.parametrizations.weight.original1
    torch.testing.assert_close(head(x), z @ torch.nn.functional.normalize(v, dim=1).T)
    assert OriginalDINOHead(8, 5, 6, 4, norm_last_layer=False).last_layer.parametrizations.weight.original0.requires_grad


def test_bench_step_runs_end_to_end_at_tiny_sizes(tmp_path):
    rows = bench_step.main(["--configs", "tiny", "--steps", "2", "--warmup", "1", "--profile-steps", "1",
                            "--results-dir", str(tmp_path)])
    assert [r["impl"] for r in rows] == list(bench_step.IMPLEMENTATIONS) + [bench_step.OP_FLOOR]
    with open(tmp_path / "step_vs_dino.csv", newline="") as f:
        written = list(csv.DictReader(f))
    assert (tmp_path / "step_vs_dino.png").stat().st_size > 0
    assert len(written) == 5
    by_impl = {r["impl"]: r for r in written}
    for name, (_, _, baseline) in bench_step.IMPLEMENTATIONS.items():
        r = by_impl[name]
        assert float(r["step_ms"]) > 0 and float(r["cpu_ms"]) > 0 and math.isfinite(float(r["loss"]))
        assert r["commit"] and r["load_avg"]
        phases = sum(float(r[f"{k}_pct"]) for k in ("backward", "optimizer", "other"))
        assert phases == pytest.approx(100.0, abs=0.5) and r["top_ops"]
        if baseline:
            ratio = float(by_impl[name]["step_ms"]) / float(by_impl[baseline]["step_ms"])
            assert r["baseline"] == baseline and float(r["time_ratio"]) == pytest.approx(ratio, rel=1e-3)
            assert float(r["speedup"]) == pytest.approx(1 / ratio, rel=1e-3) and float(r["cpu_speedup"]) > 0
    # The op's own time and its GEMM floor, and the step's speed-up had the op cost only that floor.
    floor = float(by_impl[bench_step.OP_FLOOR]["step_ms"])
    assert floor > 0
    for name in ("dinovmf_dino", "dinovmf_dino_vmf"):
        r = by_impl[name]
        op, step = float(r["op_ms"]), float(r["step_ms"])
        assert 0 < op < step and float(r["op_floor_ms"]) == pytest.approx(floor)
        assert float(r["step_ms_at_op_floor"]) == pytest.approx(step - op + floor, rel=1e-6)
        baseline = float(by_impl[bench_step.IMPLEMENTATIONS[name][2]]["step_ms"])
        assert float(r["speedup_at_op_floor"]) == pytest.approx(baseline / (step - op + floor), rel=1e-6)
    # Same weights, same crops, same maths: the dino rows log the same loss.
    assert float(by_impl["dinovmf_dino"]["loss"]) == pytest.approx(float(by_impl["original_dino"]["loss"]), rel=1e-4)


def test_op_clock_times_the_fused_op_and_restores_it():
    import dinovmf.loss
    op = dinovmf.loss.head_to_loss
    z, v = torch.nn.functional.normalize(torch.randn(8, 4), dim=1), torch.randn(6, 4)
    with bench_step.op_clock() as spent:
        assert dinovmf.loss.head_to_loss is not op
        out = dinovmf.loss.head_to_loss(z, z[:4], v, v, student_temp=0.1, teacher_temp=0.04,
                                           center=torch.zeros(6), n_global=2)
    assert dinovmf.loss.head_to_loss is op and spent[0] > 0 and torch.isfinite(out.loss)
