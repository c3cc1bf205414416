"""Smoke tests of the GPU-only paths of a real training step (issue #16 §5); `make gpu-check` runs them.

Each GPU test is skipped without CUDA (CPU CI has none) and says so. The steps are the trainer's own
(`tests/_step_api.py`), on random crops already on the device. No timing here: speed lives in bench/.
One CPU test keeps the step helper itself working between GPU sessions.
"""
import math
from pathlib import Path

import pytest
import torch

from _step_api import build_step_state, config, train_step

from dinovmf.data.synthetic import synthetic_crops

requires_gpu = pytest.mark.skipif(not torch.cuda.is_available(),
                                  reason="GPU smoke test: needs a CUDA device (`make gpu-check` runs it on one)")
# A small but real model: ViT-Tiny/16, 2 x 64 px + 4 x 32 px crops, K = 8192 (two Triton tiles of 4096),
# p = 256 (the in-kernel Debye vMF bias), no drop-path (so two runs see the same computation).
SMALL = ["method=dino_vmf", "model.arch=vit_tiny", "model.patch_size=16", "model.drop_path=0",
         "model.out_dim=8192", "crops.global_size=64", "crops.local_size=32", "crops.n_local=4",
         "train.batch_size=16"]


def _losses(overrides: list[str], device: torch.device, steps: int = 2) -> list[float]:
    state = build_step_state(config(SMALL + overrides), device)
    crops = (synthetic_crops(state.cfg.crops, state.cfg.train.batch_size, device, seed=i) for i in range(steps))
    return [float(train_step(state, i, c)["loss"]) for i, c in enumerate(crops)]


def test_step_helper_trains_on_cpu():
    """The helper the GPU tests use runs a real step here too (tiny sizes), and the step moves the weights."""
    cpu = torch.device("cpu")
    tiny = ["model.out_dim=64", "model.hidden_dim=64", "model.bottleneck_dim=32", "model.patch_size=8", "model.depth=2",
            "crops.global_size=32", "crops.local_size=16", "crops.n_local=2", "train.batch_size=4"]
    state = build_step_state(config(SMALL + tiny), cpu)
    before = [p.detach().clone() for p in state.models.student.parameters()]
    metrics = train_step(state, 0, synthetic_crops(state.cfg.crops, state.cfg.train.batch_size, cpu))
    assert math.isfinite(metrics["loss"])
    assert any(not torch.equal(b, p) for b, p in zip(before, state.models.student.parameters()))


@requires_gpu
def test_bf16_autocast_step_computes_in_bf16_and_stays_finite():
    device = torch.device("cuda")
    state = build_step_state(config(SMALL + ["train.amp=bf16"]), device)
    seen = []
    block = state.models.student.backbone.blocks[0].attn.qkv
    handle = block.register_forward_hook(lambda mod, inp, out: seen.append(out.dtype))
    before = [p.detach().clone() for p in state.models.student.parameters()]
    try:
        metrics = train_step(state, 0, synthetic_crops(state.cfg.crops, state.cfg.train.batch_size, device))
    finally:
        handle.remove()
    assert seen and all(d == torch.bfloat16 for d in seen), f"qkv ran in {seen}, not bf16"
    assert math.isfinite(metrics["loss"])
    params = list(state.models.student.parameters())
    assert all(torch.isfinite(p).all() for p in params)
    assert any(not torch.equal(b, p) for b, p in zip(before, params))


@requires_gpu
def test_compiled_step_matches_eager_step():
    """torch.compile of student and teacher gives the eager losses over two steps (the second depends on
    the first AdamW update). fp32 (train.amp=none, TF32 matmuls off by torch's default): the two differ only
    by inductor's reordered fp32 reductions, ~1e-6 relative per layer; 2e-4 of a loss ~ log K = 9 is far
    above that and far below any real defect (a missing term or wrong gradient moves it by > 1e-2)."""
    device = torch.device("cuda")
    eager = _losses(["train.amp=none"], device)
    compiled = _losses(["train.amp=none", "train.compile=true"], device)
    assert all(math.isfinite(x) for x in eager + compiled)
    assert compiled == pytest.approx(eager, rel=2e-4)


@requires_gpu
def test_triton_backend_runs_inside_training_step_and_matches_torch():
    """loss.backend=triton launches the package's Triton kernels in the step, and its losses equal the torch
    reference backend's over two steps. fp32: the kernels' error against float64 is <= 1e-5 relative (the
    backend tests' flash rule); 1e-4 leaves room for the second step's AdamW update of that difference."""
    import triton.runtime.jit as jit

    device = torch.device("cuda")
    launched = []
    run = jit.JITFunction.run

    def counting_run(self, *args, **kwargs):
        if self.fn.__module__.startswith("dinovmf.kernels"):
            launched.append(self.fn.__name__)
        return run(self, *args, **kwargs)

    jit.JITFunction.run = counting_run
    try:
        triton_losses = _losses(["train.amp=none", "loss.backend=triton"], device)
    finally:
        jit.JITFunction.run = run
    torch_losses = _losses(["train.amp=none", "loss.backend=torch"], device)
    assert launched, "loss.backend=triton launched no dinovmf Triton kernel"
    assert triton_losses == pytest.approx(torch_losses, rel=1e-4)


# One rank of a 2-process NCCL run through the public Trainer (as tests/test_distributed.py's gloo worker):
# the tiny config, then this rank's full student state on the CPU, for the test to compare across ranks.
NCCL_WORKER = """
import sys
from pathlib import Path
import torch
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
from _train_utils import tiny_config
from dinovmf.distributed import init_distributed
from dinovmf.train import build_train_loader
from dinovmf.trainer import Trainer

out, data = Path(sys.argv[1]), sys.argv[2]
info = init_distributed("nccl")
cfg = tiny_config(data, None, ["steps=3", "dist.backend=nccl"])
loader = build_train_loader(cfg, out, info)
trainer = Trainer(cfg, out, steps_per_epoch=len(loader))
trainer.fit(loader)
state = get_model_state_dict(trainer.models.student, options=StateDictOptions(full_state_dict=True))
torch.save({"step": trainer.step, "student": {k: v.cpu() for k, v in state.items()}}, out / f"rank{info.rank}.pt")
"""


@requires_gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="NCCL DDP smoke test: needs 2 GPUs")
def test_nccl_ddp_two_processes_keep_replicas_identical(tmp_path):
    """2 processes, one GPU each, DDP over NCCL: after 3 steps both ranks hold bitwise the same student."""
    from _train_utils import write_image_folder
    from test_distributed import free_port, torchrun, wait_all

    worker = tmp_path / "worker.py"
    worker.write_text(f"import sys\nsys.path.insert(0, {str(Path(__file__).parent)!r})\n" + NCCL_WORKER)
    data = write_image_folder(tmp_path / "train", "train", 4)
    wait_all([torchrun(["--nproc_per_node", "2", "--master_addr", "127.0.0.1", "--master_port", str(free_port())],
                       worker, tmp_path, data, [])])
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1))
    assert r0["step"] == r1["step"] == 3
    for key, value in r0["student"].items():
        assert torch.equal(value, r1["student"][key]), f"student.{key} differs between the NCCL ranks"


@requires_gpu
@pytest.mark.skipif(torch.cuda.is_available() and torch.cuda.get_device_properties(0).total_memory < 40 * 2**30,
                    reason="the ViT-B/16 step at batch 64 needs a 40 GiB+ GPU")
def test_vit_b_step_peak_memory_is_recorded():
    """Peak memory of one ViT-B/16 step at the benchmark's sizes (2 x 224 + 10 x 96, batch 64, K = 65536,
    bf16 autocast), written to <results>/gpu_smoke_memory.csv; it must at least hold the fp32 training
    state (weights, gradients, two AdamW moments)."""
    from bench.harness import record

    device = torch.device("cuda")
    cfg = config(["method=dino_vmf", "model.arch=vit_base", "model.patch_size=16", "crops.global_size=224",
                  "crops.local_size=96", "crops.n_local=10", "train.batch_size=64", "model.out_dim=65536"])
    state = build_step_state(cfg, device)
    crops = synthetic_crops(cfg.crops, cfg.train.batch_size, device)
    train_step(state, 0, crops)  # first step: optimizer state, allocator warm-up
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats(device)
    metrics = train_step(state, 1, crops)
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated(device)
    state_bytes = 4 * sum(p.numel() * p.element_size() for p in state.models.student.parameters())
    record("gpu_smoke_memory", [dict(arch="vit_base", batch=64, K=65536, crops="2x224+10x96",
                                     peak_mem_gib=peak / 2**30, training_state_gib=state_bytes / 2**30)],
           x="batch", y="peak_mem_gib", group="arch", title="peak memory of a ViT-B/16 DINO-vMF step", device=device)
    assert math.isfinite(metrics["loss"])
    assert peak >= state_bytes
