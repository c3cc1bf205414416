"""`Trainer`: the state of one DINO / DINO-vMF / iBOT-vMF run and its training step.

    trainer = Trainer(cfg, out_dir, steps_per_epoch=len(loader))  # or Trainer.resume(path, ...)
    summary = trainer.fit(loader)                                   # the loop: logs, checkpoints, stops
    metrics = trainer.train_step(crops, step)                       # one step, no loader (benchmarks, tests)
    trainer.save()

The order of construction is the point (issue #15): build the networks (same seed on every rank; the
student's backbone loaded from `model.init_from` when set, before the teacher copies it), then
`parallelize` them (DDP or FSDP2, torch.compile), THEN build everything that holds their parameters (the
optimizer, the frozen-prototype list, the clipping list) from the parallelised student. The Trainer owns
the models, the objective (with its center state), the optimizer, the schedules and the RNG; checkpoints
hold all of it, so `Trainer.resume` continues a run step for step.

Reproducibility. Model initialisation uses `train.seed` on every rank; then each rank seeds its own
stream (drop-path, iBOT masks). Crops and augmentations are pure functions of (seed, epoch, rank, batch),
so `fit` on a resumed trainer re-creates the epoch's loader and skips the batches already trained on,
with the RNG state left where the checkpoint had it.
"""
from __future__ import annotations

from pathlib import Path

import torch

from dinovmf import checkpoint as ckpt
from dinovmf import distributed as D
from dinovmf.config import Config, config_from_dict, dump_yaml
from dinovmf.models import build_ssl_model, init_student, model_args
from dinovmf.models.init_from import load_init_weights
from dinovmf.monitor import ActivationProbe, CollapseDetector, Monitor, gradient_probes, peak_flops
from dinovmf.objectives import build_objective
from dinovmf.optim import build_optimizer, clip_gradients, ema_update, set_hyperparameters
from dinovmf.parallelize import ddp_options, parallelize
from dinovmf.schedules import Schedules, build_schedules
from dinovmf.step_timing import SHARE_PREFIX, DataWaitCheck, StepTiming, instrument_communication
from dinovmf.stopping import NonFiniteLossError, NonFiniteLossGuard, StopSignal, TimeLimit

UTILISATION_EPS = 1e-3  # cosine distance under which two prototypes count as one (unique prototypes)


class Trainer:
    """One run: models, objective, optimizer, schedules, center state and RNG (see the module docstring).

    `cfg`: a `dinovmf.config.Config`. `out_dir`: where `fit` / `save` write (checkpoints, metrics, config);
    None for a trainer that only runs steps. `device`: default this rank's GPU, else the CPU. Joins the
    process group when launched by torchrun / srun. `steps_per_epoch`: loader batches per epoch, which
    converts the epoch-valued settings (warm-ups, last-layer freeze, the run length when `steps` is unset)
    into steps; `fit(loader)` fills it in from `len(loader)` when not given. `load_init_from`: start the
    backbones from `model.init_from` when it is set (`resume` passes False).
    """

    def __init__(self, cfg: Config, out_dir: str | Path | None = None, device: str | torch.device | None = None,
                 *, steps_per_epoch: int | None = None, load_init_from: bool = True):
        self.cfg = cfg
        self.out_dir = None if out_dir is None else Path(out_dir)
        self.info = D.init_distributed(cfg.dist.backend)
        self.device = D.device_for(self.info) if device is None else torch.device(device)

        student = init_student(cfg)  # train.seed: the same weights on every rank
        if cfg.model.init_from is not None and load_init_from:
            # Into the student before the teacher copies it and before DDP / FSDP2 wrap or shard it; every
            # rank reads the file, so all start equal. `resume` skips it: the checkpoint's weights win.
            report = load_init_weights(student.backbone, cfg.model.init_from, strict=cfg.model.init_strict,
                                       ignore=cfg.model.init_ignore)
            if self.info.is_main:
                print(report, flush=True)
        student = student.to(self.device)
        teacher = build_ssl_model(cfg, 0.0).to(self.device)
        teacher.load_state_dict(student.state_dict())
        teacher.requires_grad_(False)
        self.models = parallelize(student, teacher, self.info, self.device, fsdp=cfg.dist.fsdp,
                                  compile=cfg.train.compile,
                                  mixed_precision=self.device.type == "cuda" and cfg.train.amp != "none",
                                  ddp_options=ddp_options(cfg.dist))
        # Parallelised; now capture the parameters that train (FSDP2 replaced them all).
        self.optimizer = build_optimizer(self.models.student, cfg)
        self.trainable = [p for p in self.models.student.parameters() if p.requires_grad]
        self.frozen_prototypes = self.models.student.prototype_parameters()
        self.objective = build_objective(cfg).to(self.device)
        self.timing = StepTiming(self.device, self.info.is_distributed)  # where each step's time goes
        instrument_communication(self.models, self.objective, self.timing)

        self.step = 0  # optimisation steps done
        self.schedules: Schedules | None = None
        if steps_per_epoch is not None:
            self.schedules = build_schedules(cfg, steps_per_epoch, self.info.world_size)
        self.loss_guard = NonFiniteLossGuard(self.device)
        self.probe = ActivationProbe(list(self.models.student.backbone.blocks)) if cfg.train.probes else None
        torch.manual_seed(cfg.train.seed + 1000 * self.info.rank + 1)  # per-rank drop-path / mask streams

    # ------------------------------------------------------------------------------------ one step

    def train_step(self, crops: list[torch.Tensor], step: int) -> dict:
        """One optimisation step on `crops` (global crops first) with the schedules' values at `step`.

        Returns the metrics as 0-d device tensors (no host sync) plus the step's hyper-parameters:
        `loss`, `loss_<term>` for each weighted term the objective returned, the objective's metrics,
        `grad_norm` (before clipping), lr, wd, momentum, teacher_temp. Raises `NonFiniteLossError`.
        """
        cfg, models, values = self.cfg, self.models, self._schedules().at(step)
        set_hyperparameters(self.optimizer, values["lr"], values["wd"])
        # Before the forward: the fused loss computes the prototype gradient there, and the last step's
        # .grad freed first lets it reuse that memory (dinovmf.cpu_memory) and lowers the forward's peak.
        self.optimizer.zero_grad(set_to_none=True)
        self.timing.begin("forward")
        terms, metrics = self.objective(models.student_forward, models.teacher, crops, values["teacher_temp"])
        loss = sum(terms.values())
        self.loss_guard.check(loss, step)
        self.timing.begin("backward")
        loss.backward()
        self.timing.begin("optimizer")
        if self.probe is not None:  # stability probes (train.probes): the raw gradients, before clipping
            metrics.update({**gradient_probes(models.student.named_parameters()), **self.probe.read()})
        if cfg.optim.clip_grad > 0:
            metrics["grad_norm"] = clip_gradients(self.trainable, cfg.optim.clip_grad)
        if values["freeze_last_layer"]:  # DINO's cancel_gradients_last_layer; AdamW skips a None gradient
            for p in self.frozen_prototypes:
                p.grad = None
        self.optimizer.step()
        ema_update(models.teacher, models.student, values["momentum"])
        self.timing.end()
        self.step = step + 1
        return {"loss": loss.detach(), **{f"loss_{name}": t.detach() for name, t in terms.items()}, **metrics,
                **{k: values[k] for k in ("lr", "wd", "momentum", "teacher_temp")}}

    def _schedules(self) -> Schedules:
        if self.schedules is None:
            raise ValueError("Trainer needs steps_per_epoch (Trainer(..., steps_per_epoch=N)) to run steps "
                             "without a loader: it converts the epoch-valued settings into steps")
        return self.schedules

    # ------------------------------------------------------------------------------------ the loop

    def fit(self, loader) -> dict:
        """Train from `self.step` to the end of the schedules on `loader`; returns the last logged metrics
        plus `step` and `interrupted`.

        `loader`: iterable of `(crops, labels)` with `set_epoch(e)` and `len()` (a `MultiCropLoader`).
        Logs every `train.log_every` steps, checkpoints every `train.ckpt_every` and at the end; stops
        cleanly (checkpoint saved) on SIGTERM / SIGINT or when `train.time_limit_min` is spent, and raises
        `NonFiniteLossError` on a NaN / inf loss, keeping the last good checkpoint.
        """
        cfg, info = self.cfg, self.info
        if self.out_dir is None:
            raise ValueError("Trainer.fit needs an out_dir (checkpoints and metrics go there)")
        self._set_steps_per_epoch(len(loader))
        sched = self.schedules
        monitor = self._monitor(sched)
        collapse = CollapseDetector(cfg.model.out_dim)
        data_wait = DataWaitCheck(cfg, loader)
        monitor.start_window()
        self.timing.reset()  # the same window as the monitor's: shares and img/s describe the same steps
        time_limit = TimeLimit(cfg.train.time_limit_min)
        last, interrupted, out_of_time = {}, False, False
        try:
            with StopSignal() as signal:
                while self.step < sched.total_steps and not (interrupted or out_of_time):
                    epoch = self.step // sched.steps_per_epoch
                    for crops, _labels in self.timing.timed_iter("data", self._epoch_batches(loader, epoch)):
                        metrics = self.train_step(crops, self.step)
                        monitor.advance()
                        if self.step % cfg.train.log_every == 0 or self.step == sched.total_steps:
                            last = self._log(monitor, collapse, metrics, epoch, data_wait)
                        if self.step % cfg.train.ckpt_every == 0 and self.step < sched.total_steps:
                            with self.timing.phase("checkpoint"):
                                self.save()
                        with self.timing.comm():  # waits for the slowest rank
                            interrupted, out_of_time = D.any_rank(signal.received_locally,
                                                                  time_limit.expired_locally())
                        if interrupted or out_of_time:
                            break
                if out_of_time:
                    monitor.message(f"time limit of {time_limit.minutes} min reached at step {self.step}")
                self.save()
        except NonFiniteLossError as e:
            good = ckpt.latest_checkpoint(ckpt.checkpoint_dir(self.out_dir))
            monitor.message(f"ERROR: {e}. Last good checkpoint: {good or 'none (no checkpoint was written)'}")
            monitor.log(self.step, {"message": str(e)}, kind="error")
            raise
        finally:
            monitor.close()
        if interrupted and info.is_main:
            print(f"stopped by signal at step {self.step}; checkpoint saved, continue with --resume auto",
                  flush=True)
        return {**last, "step": self.step, "interrupted": interrupted}

    def _set_steps_per_epoch(self, steps_per_epoch: int) -> None:
        if self.schedules is None:
            self.schedules = build_schedules(self.cfg, steps_per_epoch, self.info.world_size)
        elif self.schedules.steps_per_epoch != steps_per_epoch:
            raise ValueError(f"the loader has {steps_per_epoch} batches per epoch, but this trainer's schedules "
                             f"were built for {self.schedules.steps_per_epoch} (did the dataset change?)")

    def _epoch_batches(self, loader, epoch: int):
        """The batches of `epoch` still to train on: a resumed run skips the ones it already trained on,
        with the RNG state kept as the checkpoint left it."""
        sched = self.schedules
        loader.set_epoch(epoch)
        batches = iter(loader)
        done = self.step - epoch * sched.steps_per_epoch
        if done:
            rng = ckpt.rng_state()
            for _ in range(done):
                next(batches)
            ckpt.set_rng_state(rng)
        for batch in batches:
            if self.step >= sched.total_steps:
                return
            yield batch

    def _monitor(self, sched: Schedules) -> Monitor:
        cfg, info = self.cfg, self.info
        if info.is_main:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            (self.out_dir / "config.yaml").write_text(dump_yaml(cfg))
        flops = self.objective.flops_per_image(self.models.student)
        peak, peak_source = peak_flops(self.device) if info.is_main else (float("nan"), "")
        monitor = Monitor(self.out_dir, sched.total_steps, self.step, cfg.train.batch_size * info.world_size,
                          flops, peak, enabled=info.is_main)
        depth = "" if cfg.model.depth is None else f" ({cfg.model.depth} blocks)"
        monitor.message(f"dinovmf train: {cfg.method} {cfg.model.arch}/{cfg.model.patch_size}{depth} "
                        f"K={cfg.model.out_dim} | {info.world_size} process(es) on {self.device.type}"
                        f"{' (FSDP2)' if self.models.fsdp else ''} | {sched.steps_per_epoch} steps/epoch, "
                        f"{sched.total_steps} steps | {flops / 1e9:.1f} GFLOP/img, MFU vs {peak / 1e12:.2f} "
                        f"TFLOP/s ({peak_source})")
        return monitor

    def _log(self, monitor: Monitor, collapse: CollapseDetector, metrics: dict, epoch: int,
             data_wait: DataWaitCheck) -> dict:
        """Turn the step's metrics into floats (the one host sync of a log step) and record them."""
        self.loss_guard.flush()
        values = to_floats(metrics)
        shares = self.timing.read()  # every rank: its window ends here
        shares[f"{SHARE_PREFIX}data_max"] = D.max_over_ranks(shares[f"{SHARE_PREFIX}data"])  # a slow loader anywhere
        if not monitor.enabled:
            return values
        record = {"epoch": epoch, **values, **monitor.throughput(self.step), **shares}
        for stat in ("min", "mean", "max"):  # prototype norms from the loss's kappa = ||w_k|| / student_temp
            if f"kappa_{stat}" in values:
                record[f"proto_norm_{stat}"] = values[f"kappa_{stat}"] * self.cfg.loss.student_temp
        every = self.cfg.train.utilisation_every or self.cfg.train.log_every
        if not self.models.fsdp and self.step % every == 0:  # FSDP shards W across ranks: skip the O(K^2 p) count
            record.update(unique_prototypes(self.models.student))
        monitor.log(self.step, record)
        for warning in (collapse.check(self.step, values.get("teacher_entropy", float("nan"))),
                        data_wait.check(self.step, shares[f"{SHARE_PREFIX}data_max"])):
            if warning:
                monitor.warn(self.step, warning)
        return values

    def teacher_backbone(self) -> torch.nn.Module | None:
        """The teacher's backbone as a plain module, e.g. for kNN evaluation. Under FSDP2 its full weights
        are gathered into a fresh copy: a collective (every rank calls it) that returns None on ranks > 0."""
        teacher = self.models.teacher
        if not self.models.fsdp:
            return teacher.backbone
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        from dinovmf.models import build_backbone

        state = get_model_state_dict(teacher, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        if not self.info.is_main:
            return None
        with torch.device("meta"):
            backbone = build_backbone(attn_backend=self.cfg.model.attn_backend, **model_args(self.cfg))
        prefix = "backbone."
        backbone.load_state_dict({k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)},
                                 assign=True)
        return backbone.to(self.device).eval()

    # ------------------------------------------------------------------------------------ checkpoints

    def save(self) -> Path | None:
        """Checkpoint this step to out_dir/checkpoints (atomic; the last `train.keep_last` kept). Every rank
        calls it (FSDP2 gathers the shards, the RNG states are per rank); returns the path on rank 0."""
        if self.out_dir is None:
            raise ValueError("Trainer.save needs an out_dir")
        self.loss_guard.flush()  # never checkpoint weights updated by a step whose loss was not finite
        models, info = self.models, self.info
        state = ckpt.gather_training_state(models.student, models.teacher, self.optimizer)
        rng = ckpt.rng_state()
        if info.is_distributed:
            gathered = [None] * info.world_size
            torch.distributed.all_gather_object(gathered, rng)
            rng = gathered
        path = None
        if info.is_main:
            state.update(step=self.step, config=self.cfg.to_dict(), model_args=model_args(self.cfg),
                         loss=self.objective.state_dict(), rng=rng,
                         steps_per_epoch=None if self.schedules is None else self.schedules.steps_per_epoch)
            path = ckpt.save_checkpoint(state, self.out_dir, self.cfg.train.keep_last)
        D.barrier()
        return path

    def _restore(self, state: dict, path: str | Path) -> None:
        """Weights, optimizer, centers, step and this rank's RNG state from a checkpoint of any world size
        and wrapping (one process, DDP, FSDP2)."""
        ckpt.restore_training_state(state, self.models.student, self.models.teacher, self.optimizer)
        self.objective.load_state_dict(state["loss"])
        self.step = int(state["step"])
        rngs = state["rng"] if isinstance(state["rng"], list) else [state["rng"]]  # one per rank that wrote it
        if len(rngs) == self.info.world_size:
            ckpt.set_rng_state(rngs[self.info.rank])
        else:  # written by another world size: fresh per-rank streams, still a function of (seed, rank, step)
            torch.manual_seed(self.cfg.train.seed + 1000 * self.info.rank + 1 + self.step)
        if self.info.is_main:
            print(f"resumed from step {self.step} ({path})", flush=True)

    @classmethod
    def resume(cls, path: str | Path, cfg: Config | None = None, out_dir: str | Path | None = None,
               device: str | torch.device | None = None, *, steps_per_epoch: int | None = None) -> "Trainer":
        """A Trainer continuing checkpoint `path`; `cfg` defaults to the checkpoint's own config and
        `steps_per_epoch` to the one the checkpointed run used."""
        state = ckpt.load_checkpoint(path, map_location="cpu")
        if cfg is None:
            cfg = config_from_dict(state["config"], source=str(path))
        trainer = cls(cfg, out_dir, device, steps_per_epoch=steps_per_epoch or state.get("steps_per_epoch"),
                      load_init_from=False)
        trainer._restore(state, path)
        if cfg.model.init_from is not None and trainer.info.is_main:
            print(f"model.init_from={cfg.model.init_from} not loaded: resuming from {path}, whose weights win",
                  flush=True)
        return trainer


def to_floats(metrics: dict) -> dict:
    """Metrics as Python floats: every tensor in one stack and one device-to-host copy."""
    names = [k for k, v in metrics.items() if torch.is_tensor(v)]
    out = {k: float(v) for k, v in metrics.items() if isinstance(v, (bool, int, float))}
    if names:
        device = metrics[names[0]].device
        values = torch.stack([metrics[k].detach().reshape(()).float().to(device) for k in names]).tolist()
        out.update(zip(names, values))
    return out


@torch.no_grad()
def unique_prototypes(model) -> dict:
    """Unique prototypes (greedy merge within UTILISATION_EPS cosine distance) of the CLS head, and of
    iBOT's patch head when it has its own: O(K^2 p), hence periodic."""
    from dinovmf.prototypes import prototype_utilisation

    heads = {"unique_prototypes": model.head}
    if model.patch_head is not None:
        heads["patch_unique_prototypes"] = model.patch_head
    return {name: float(prototype_utilisation(head.prototypes().detach().float(), UTILISATION_EPS))
            for name, head in heads.items()}
