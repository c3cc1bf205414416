"""The training loop: student + EMA teacher, per-step schedules, checkpoints, faults, monitoring, eval.

`train(cfg, out_dir, resume)` runs one process's share of a run: alone, or as one rank of a torchrun /
srun job (the process group is set up from the environment by `dinovmf.distributed`). Method-specific
work (which crops each network sees, the loss) lives in `dinovmf.objectives`.

Reproducibility and resume. Model initialisation uses `train.seed` on every rank (DDP also
broadcasts rank 0's weights). Crops and augmentations are pure functions of (seed, epoch, rank, batch),
so a resumed run re-creates the epoch's loader and skips the batches already trained on; the torch RNG
(drop-path) is restored from the checkpoint after that skip, so the resumed run follows the loss
trajectory of an uninterrupted one step for step.
"""
from __future__ import annotations

import dataclasses
import math
import signal
import time
from pathlib import Path

import torch
from torch import nn

from dinovmf import checkpoint as ckpt
from dinovmf import distributed as D
from dinovmf.config import Config, dump_yaml
from dinovmf.models import DINOHead
from dinovmf.monitor import ActivationProbe, CollapseDetector, Monitor, gradient_probes, peak_flops
from dinovmf.objectives import build_objective, build_ssl_model, model_args
from dinovmf.schedules import build_schedules

N_GLOBAL = 2
UTILISATION_EPS = 1e-3  # cosine distance under which two prototypes count as one (unique prototypes)


class NonFiniteLossError(RuntimeError):
    """The loss became NaN / inf; the run stopped without saving over the last good checkpoint."""


# --------------------------------------------------------------------------------------------- pieces

def param_groups(model: nn.Module, proto_norm_lr_mult: float = 1.0) -> list[dict]:
    """DINO's split: weight decay on matrices only; biases and 1-D parameters (norms, g) undecayed.

    Parameters that never train (the frozen prototype norm g of `norm_last_layer=True`) are left out.
    With `proto_norm_lr_mult` != 1 the trainable prototype norms g get a third, undecayed group whose
    `lr_mult` scales the scheduled lr (at 1 there are two groups, as in checkpoints written before it).
    """
    norms = {id(h.g) for h in model.modules() if isinstance(h, DINOHead)} if proto_norm_lr_mult != 1 else set()
    decay, no_decay, proto_norm = [], [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if id(p) in norms:
            proto_norm.append(p)
        else:
            (no_decay if name.endswith(".bias") or p.ndim <= 1 else decay).append(p)
    groups = [{"params": decay, "name": "decay"}, {"params": no_decay, "name": "no_decay", "weight_decay": 0.0}]
    if proto_norm:
        groups.append({"params": proto_norm, "name": "proto_norm", "weight_decay": 0.0,
                       "lr_mult": proto_norm_lr_mult})
    return groups


def build_optimizer(model: nn.Module, cfg: Config, device: torch.device) -> torch.optim.AdamW:
    """AdamW, fused on CUDA (one kernel for all parameters), foreach on CPU; lr/wd set per step."""
    kwargs = {"fused": True} if device.type == "cuda" else {"foreach": True}
    return torch.optim.AdamW(param_groups(model, cfg.optim.proto_norm_lr_mult), lr=0.0,
                             weight_decay=cfg.optim.weight_decay, betas=tuple(cfg.optim.betas), **kwargs)


def init_student(cfg: Config) -> nn.Module:
    """The student at step 0 (on the CPU): built from train.seed, then its prototype norms spread
    log-normally when model.proto_norm_init_spread > 0 (drawn after the build, so the weights are the
    same as without the spread)."""
    torch.manual_seed(cfg.train.seed)
    student = build_ssl_model(cfg, cfg.model.drop_path)
    for head in (student.head, student.patch_head):
        if head is not None:
            head.spread_norms_(cfg.model.proto_norm_init_spread)
    return student


def _local(t: torch.Tensor) -> torch.Tensor:
    """The local shard of an FSDP2 DTensor parameter, or the tensor itself."""
    return t.to_local() if hasattr(t, "to_local") else t


@torch.no_grad()
def ema_update(teacher: nn.Module, student: nn.Module, momentum: float) -> None:
    """teacher <- momentum * teacher + (1 - momentum) * student, for every parameter (one foreach op).

    Under FSDP2 both networks are resharded first (the root module keeps its parameters unsharded
    after a forward without backward, as the teacher's), so the update runs on matching local shards.
    """
    for model in (teacher, student):
        if hasattr(model, "reshard"):  # an FSDPModule
            model.reshard()
    t_params = [_local(p) for p in teacher.parameters()]
    s_params = [_local(p.detach()) for p in student.parameters()]
    if len(t_params) != len(s_params):
        raise RuntimeError("teacher and student have different parameter lists")
    torch._foreach_lerp_(t_params, s_params, 1.0 - momentum)


def last_layer_params(model: nn.Module) -> list[nn.Parameter]:
    """The prototype parameters (v, g of the head, and of iBOT's patch head), frozen for the first epoch(s)."""
    model = D.unwrap(model)
    params = list(model.head.prototype_parameters())
    if model.patch_head is not None:
        params += model.patch_head.prototype_parameters()
    return params


class StopSignal:
    """Turns SIGTERM / SIGINT into a flag the loop checks after each step (then saves and exits)."""

    def __init__(self):
        self.received: int | None = None
        self._previous = {}

    def __enter__(self):
        for sig in (signal.SIGTERM, signal.SIGINT):
            try:
                self._previous[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread: leave the default handlers
                pass
        return self

    def _handle(self, signum, frame):
        self.received = signum

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def should_stop(self, info: D.DistInfo, device: torch.device) -> bool:
        """True on every rank when any rank got a signal (one tiny all-reduce per step when distributed)."""
        flag = float(self.received is not None)
        if info.is_distributed:
            t = torch.tensor([flag], device=device)
            torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
            flag = t.item()
        return flag > 0


class TimeLimit:
    """A wall-clock budget for training (e.g. a demo that must finish in minutes, or a job slot).

    Checked after each step; rank 0's clock decides, so every rank stops after the same step.
    """

    def __init__(self, minutes: float | None):
        self.deadline = None if minutes is None else time.monotonic() + 60.0 * minutes
        self.reached = False

    def __call__(self, info: D.DistInfo, device: torch.device) -> bool:
        if self.deadline is None:
            return False
        self.reached = D.broadcast_object(time.monotonic() >= self.deadline) if info.is_distributed else (
            time.monotonic() >= self.deadline)
        return self.reached


def _state_dicts(student, teacher, optimizer, fsdp: bool) -> tuple[dict, dict, dict]:
    """Full (unsharded, CPU) state dicts of the models and optimizer, whatever the wrapping."""
    if fsdp:
        from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                             get_optimizer_state_dict)
        opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
        return (get_model_state_dict(student, options=opts), get_model_state_dict(teacher, options=opts),
                get_optimizer_state_dict(student, optimizer, options=opts))
    return D.unwrap(student).state_dict(), teacher.state_dict(), optimizer.state_dict()


def _load_state_dicts(state, student, teacher, optimizer, fsdp: bool) -> None:
    if fsdp:
        from torch.distributed.checkpoint.state_dict import (StateDictOptions, set_model_state_dict,
                                                             set_optimizer_state_dict)
        opts = StateDictOptions(full_state_dict=True, broadcast_from_rank0=False)
        set_model_state_dict(student, state["student"], options=opts)
        set_model_state_dict(teacher, state["teacher"], options=opts)
        set_optimizer_state_dict(student, optimizer, state["optimizer"], options=opts)
        return
    D.unwrap(student).load_state_dict(state["student"])
    teacher.load_state_dict(state["teacher"])
    optimizer.load_state_dict(state["optimizer"])


def _prepare_data(spec: str, out_dir: Path, info: D.DistInfo, split: str = "train", loader: str = "auto") -> Path:
    """Resolve a data spec to a dataset path; rank 0 prepares (an image folder -> .beton), others wait.

    With `data.loader=pil` an image folder is read as it is: converting it to a .beton would only
    cost time.
    """
    from dinovmf.data import resolve_dataset

    if loader == "pil" and Path(spec).is_dir():
        return Path(spec)
    workdir = out_dir / "data"
    path = None
    if info.is_main:
        path = resolve_dataset(spec, workdir, split=split)
    D.barrier()
    if not info.is_main:
        path = resolve_dataset(spec, workdir, split=split)
    return Path(path)


# ------------------------------------------------------------------------------------------- the loop

def train(cfg: Config, out_dir: str | Path, resume: str | None = None) -> dict:
    """Train `cfg` into `out_dir`; returns the final metrics (loss, step, knn_top1 when evaluated...).

    `resume`: None, "auto" (newest checkpoint in out_dir/checkpoints, or a fresh start) or a path.
    Raises `NonFiniteLossError` when the loss becomes NaN/inf (last good checkpoint kept) and
    ValueError for unusable input (missing data, bad checkpoint).
    """
    info = D.init_distributed(cfg.dist.backend)
    try:
        return _train(cfg, Path(out_dir), resume, info)
    finally:
        D.cleanup()


def _train(cfg: Config, out_dir: Path, resume: str | None, info: D.DistInfo) -> dict:
    from dinovmf.data import MultiCropConfig, MultiCropLoader
    from dinovmf.data.augment import dino_view_recipes

    device = D.device_for(info)
    out_dir.mkdir(parents=True, exist_ok=True)
    resume_path = ckpt.resolve_resume(resume, out_dir)

    # Data first: a missing dataset should fail before minutes of model building.
    train_path = _prepare_data(cfg.data.train, out_dir, info, "train", cfg.data.loader)
    loader = MultiCropLoader(train_path, cfg.train.batch_size, MultiCropConfig.from_config(cfg.crops), device,
                             seed=cfg.train.seed, rank=info.rank, world_size=info.world_size,
                             num_workers=cfg.data.num_workers, drop_last=True, backend=cfg.data.loader,
                             view_recipes=dino_view_recipes(**dataclasses.asdict(cfg.augment)))
    steps_per_epoch = len(loader)
    sched = build_schedules(cfg, steps_per_epoch, info.world_size)

    # Same seed on every rank for initialisation; the teacher starts as a copy of the student.
    student = init_student(cfg).to(device)
    teacher = build_ssl_model(cfg, 0.0).to(device)
    teacher.load_state_dict(student.state_dict())
    teacher.requires_grad_(False)
    objective = build_objective(cfg).to(device)
    frozen_last_layer = last_layer_params(student)

    if cfg.dist.fsdp and info.is_distributed:
        mp = device.type == "cuda" and cfg.train.amp != "none"
        D.apply_fsdp(student, list(student.backbone.blocks), info, mixed_precision=mp)
        D.apply_fsdp(teacher, list(teacher.backbone.blocks), info, mixed_precision=mp)
    optimizer = build_optimizer(student, cfg, device)

    start_step, rng = 0, None
    if resume_path is not None:
        state = ckpt.load_checkpoint(resume_path, map_location="cpu")
        _load_state_dicts(state, student, teacher, optimizer, cfg.dist.fsdp and info.is_distributed)
        objective.load_state_dict(state["loss"])
        start_step = int(state["step"])
        rng = state["rng"][info.rank] if isinstance(state["rng"], list) else state["rng"]
        if info.is_main:
            print(f"resumed from step {start_step} ({resume_path})", flush=True)
    # Different drop-path masks per rank; restored below on resume.
    torch.manual_seed(cfg.train.seed + 1000 * info.rank + 1)

    train_module = student if (cfg.dist.fsdp and info.is_distributed) else D.wrap_ddp(student, info, device)
    if cfg.train.compile:
        train_module = torch.compile(train_module)
        teacher_fwd = torch.compile(teacher)
    else:
        teacher_fwd = teacher

    if info.is_main:
        (out_dir / "config.yaml").write_text(dump_yaml(cfg))
    images_per_step = cfg.train.batch_size * info.world_size
    flops = training_flops_per_image(cfg, student)
    peak, peak_source = peak_flops(device) if info.is_main else (float("nan"), "")
    monitor = Monitor(out_dir, sched.total_steps, start_step, images_per_step, flops, peak, enabled=info.is_main)
    depth = "" if cfg.model.depth is None else f" ({cfg.model.depth} blocks)"
    monitor.message(f"dinovmf train: {cfg.method} {cfg.model.arch}/{cfg.model.patch_size}{depth} K={cfg.model.out_dim}"
                    f" | {info.world_size} process(es) on {device.type} | {steps_per_epoch} steps/epoch,"
                    f" {sched.total_steps} steps | {flops / 1e9:.1f} GFLOP/img, MFU vs {peak / 1e12:.2f}"
                    f" TFLOP/s ({peak_source})")
    collapse = CollapseDetector(cfg.model.out_dim)
    probe = ActivationProbe(list(D.unwrap(student).backbone.blocks)) if cfg.train.probes else None

    out_of_time = TimeLimit(cfg.train.time_limit_min)
    step, last = start_step, {}
    interrupted = False
    try:
        with StopSignal() as stop:
            while step < sched.total_steps:
                epoch = step // steps_per_epoch
                loader.set_epoch(epoch)
                batches = iter(loader)
                for _ in range(step - epoch * steps_per_epoch):  # mid-epoch resume: skip trained batches
                    next(batches)
                if rng is not None:  # after the skip, so the RNG is exactly where the checkpoint left it
                    ckpt.set_rng_state(rng)
                    rng = None
                for crops, _labels in batches:
                    if step >= sched.total_steps or step // steps_per_epoch != epoch:
                        break
                    last = _train_step(cfg, step, sched.at(step), crops, train_module, student, teacher_fwd,
                                       teacher, objective, optimizer, frozen_last_layer, probe)
                    step += 1
                    monitor.advance()
                    if step % cfg.train.log_every == 0 or step == sched.total_steps:
                        _log(cfg, step, epoch, last, monitor, collapse, student,
                             cfg.dist.fsdp and info.is_distributed)
                    if step % cfg.train.ckpt_every == 0 and step < sched.total_steps:
                        _save(cfg, out_dir, step, student, teacher, optimizer, objective, info)
                    if stop.should_stop(info, device):
                        interrupted = True
                        break
                    if out_of_time(info, device):
                        monitor.message(f"time limit of {cfg.train.time_limit_min} min reached at step {step}")
                        break
                if interrupted or out_of_time.reached:
                    break
            _save(cfg, out_dir, step, student, teacher, optimizer, objective, info)
    except NonFiniteLossError as e:
        good = ckpt.latest_checkpoint(ckpt.checkpoint_dir(out_dir))
        monitor.message(f"ERROR: {e}. Last good checkpoint: {good or 'none (no checkpoint was written)'}")
        monitor.log(step, {"message": str(e)}, kind="error")
        raise
    finally:
        monitor.close()
        if probe is not None:
            probe.remove()

    summary = {"step": step, "interrupted": interrupted, **{k: v for k, v in last.items() if _scalar(v)}}
    if interrupted:
        if info.is_main:
            print(f"stopped by signal at step {step}; checkpoint saved, continue with --resume auto", flush=True)
        return summary
    if cfg.data.val:
        summary.update(evaluate_knn_after_training(cfg, out_dir, teacher, device, info))
    if info.is_main:
        from dinovmf.plots import plot_run
        summary["plots"] = [str(p) for p in plot_run(out_dir, summary)]
    return summary


def _scalar(v) -> bool:
    return isinstance(v, (int, float, bool))


def _train_step(cfg, step, values, crops, train_module, student, teacher_fwd, teacher, objective, optimizer,
                frozen_last_layer, probe) -> dict:
    for group in optimizer.param_groups:
        group["lr"] = values["lr"] * group.get("lr_mult", 1.0)
        if group["name"] == "decay":
            group["weight_decay"] = values["wd"]
    loss, metrics, _ = objective(train_module, teacher_fwd, crops, values["teacher_temp"])
    if cfg.train.debug_nan_step is not None and step == cfg.train.debug_nan_step:
        loss = loss * float("nan")  # testing hook: a non-finite loss at a chosen step
        metrics["loss"] = float("nan")
    if not math.isfinite(metrics["loss"]):
        raise NonFiniteLossError(f"non-finite loss ({metrics['loss']}) at step {step}; stopping. Try a lower "
                                 "optim.lr, a smaller optim.clip_grad, or train.amp=none, and run with "
                                 "train.probes=true to see which layer blows up")
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    grad_norm = None
    if cfg.optim.clip_grad > 0:
        grad_norm = torch.nn.utils.clip_grad_norm_(student.parameters(), cfg.optim.clip_grad)
    if values["freeze_last_layer"]:
        for p in frozen_last_layer:
            p.grad = None
    out = dict(metrics)
    if cfg.train.probes:
        out.update(gradient_probes(student.named_parameters()))
        if probe is not None:
            out.update(probe.read())
    optimizer.step()
    ema_update(teacher, student, values["momentum"])
    out.update(lr=values["lr"], wd=values["wd"], momentum=values["momentum"], teacher_temp=values["teacher_temp"])
    if grad_norm is not None:
        out["grad_norm"] = float(_local(grad_norm).item() if hasattr(grad_norm, "to_local") else grad_norm)
    return out


@torch.no_grad()
def unique_prototypes(model: nn.Module, head: str = "head") -> float:
    """Unique prototypes (greedy merge within UTILISATION_EPS cosine distance) of `head` ("head", or
    iBOT's "patch_head"): O(K^2 p), so periodic."""
    from dinovmf.prototypes import prototype_utilisation

    weight = getattr(D.unwrap(model), head).prototypes().detach().float()
    return float(prototype_utilisation(weight, UTILISATION_EPS))


def _log(cfg, step, epoch, metrics, monitor, collapse, student, fsdp: bool) -> None:
    if not monitor.enabled:
        return
    record = {"epoch": epoch, **{k: v for k, v in metrics.items() if _scalar(v)}, **monitor.throughput(step)}
    # Prototype norms from the loss's kappa = ||w_k|| / student_temp (no extra pass over W).
    for stat in ("min", "mean", "max"):
        if f"kappa_{stat}" in metrics:
            record[f"proto_norm_{stat}"] = metrics[f"kappa_{stat}"] * cfg.loss.student_temp
    every = cfg.train.utilisation_every or cfg.train.log_every
    if not fsdp and step % every == 0:  # FSDP shards W across ranks: skip the O(K^2) count there
        record["unique_prototypes"] = unique_prototypes(student)
        if D.unwrap(student).patch_head is not None:
            record["patch_unique_prototypes"] = unique_prototypes(student, "patch_head")
    monitor.log(step, record)
    warning = collapse.check(step, metrics.get("teacher_entropy", float("nan")))
    if warning:
        monitor.warn(step, warning)


def _save(cfg, out_dir, step, student, teacher, optimizer, objective, info) -> None:
    """Every rank contributes (FSDP gathers shards, RNG states are per rank); rank 0 writes."""
    fsdp = cfg.dist.fsdp and info.is_distributed
    s_state, t_state, o_state = _state_dicts(student, teacher, optimizer, fsdp)
    rng = ckpt.rng_state()
    if info.is_distributed:
        gathered = [None] * info.world_size
        torch.distributed.all_gather_object(gathered, rng)
        rng = gathered
    if info.is_main:
        state = {"step": step, "config": cfg.to_dict(), "model_args": model_args(cfg), "student": s_state,
                 "teacher": t_state, "optimizer": o_state, "loss": objective.state_dict(), "rng": rng,
                 "time": time.time()}
        ckpt.save_checkpoint(state, out_dir, cfg.train.keep_last)
    D.barrier()


def training_flops_per_image(cfg, model: nn.Module) -> float:
    """Matmul FLOPs per image of one multi-crop step, from the models' own counters.

    Student: forward + backward (3x forward) of every crop through backbone and head, plus the
    student logits (2 p K per crop, forward and backward). Teacher: forward of the global crops and
    their logits. Norms, softmax and the optimizer are ignored, as usual for MFU.
    """
    model = D.unwrap(model)
    backbone, head = model.backbone, model.head
    g, l, n_local = cfg.crops.global_size, cfg.crops.local_size, cfg.crops.n_local
    logits = 2 * cfg.model.bottleneck_dim * cfg.model.out_dim
    student = (N_GLOBAL * backbone.forward_flops(g) + n_local * backbone.forward_flops(l)
               + head.flops(N_GLOBAL + n_local) + logits * (N_GLOBAL + n_local))
    teacher = N_GLOBAL * backbone.forward_flops(g) + head.flops(N_GLOBAL) + logits * N_GLOBAL
    if cfg.method == "ibot_vmf":  # iBOT: the patch head runs on every patch token of the global crops
        patch_rows = N_GLOBAL * (g // cfg.model.patch_size) ** 2
        patch_head = model.patch_head if model.patch_head is not None else head
        student += patch_head.flops(patch_rows)
        teacher += patch_head.flops(patch_rows)
    return float(3 * student + teacher)


# ------------------------------------------------------------------------------------------- evaluation

def evaluate_knn_after_training(cfg, out_dir: Path, teacher: nn.Module, device, info: D.DistInfo) -> dict:
    """kNN top-1 of the trained teacher backbone on data.val (train features from data.train); with
    eval.baseline, also of a random-initialised backbone (the student's step-0 weights)."""
    from dinovmf.eval.run import knn_for_backbone
    from dinovmf.models import build_backbone

    train_path = _prepare_data(cfg.data.train, out_dir, info, "train", cfg.data.loader)
    val_path = _prepare_data(cfg.data.val, out_dir, info, "val", cfg.data.loader)
    if not info.is_main:
        return {}
    image_size = cfg.eval.image_size or cfg.crops.global_size
    backbone = D.unwrap(teacher).backbone
    loading = {"loader_backend": cfg.data.loader, "num_workers": cfg.data.num_workers}
    result = knn_for_backbone(backbone, train_path, val_path, image_size, cfg.eval.batch_size, device,
                              cfg.eval.knn_k, cfg.eval.knn_temperature, **loading)
    summary = {"knn_top1": result["top1"]}
    print(f"kNN top-1: {result['top1']:.2f}% (trained teacher, k={cfg.eval.knn_k}, T={cfg.eval.knn_temperature})",
          flush=True)
    if cfg.eval.baseline:
        torch.manual_seed(cfg.train.seed)  # the same draw as the student's initialisation
        random_init = build_backbone(drop_path_rate=0.0, attn_backend=cfg.model.attn_backend,
                                     **model_args(cfg)).to(device)
        base = knn_for_backbone(random_init, train_path, val_path, image_size, cfg.eval.batch_size, device,
                                cfg.eval.knn_k, cfg.eval.knn_temperature, **loading)
        summary["knn_top1_random_init"] = base["top1"]
        print(f"kNN top-1: {base['top1']:.2f}% (random-init baseline)", flush=True)
    with open(out_dir / "metrics.jsonl", "a") as f:
        import json
        f.write(json.dumps({"kind": "eval", "step": None, **summary}) + "\n")
    return summary
