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
so `fit` on a resumed trainer re-creates the epoch's loader from the first sample not yet trained on,
with the RNG state left where the checkpoint had it. On another world size the run continues by samples
(`dinovmf.run_position`): the rest of the epoch is sharded over the new ranks and the schedules move on
from where they were.
"""
from __future__ import annotations

import inspect
import itertools
from pathlib import Path

import torch

from dinovmf import checkpoint as ckpt
from dinovmf import distributed as D
from dinovmf.checkpoint_writer import CheckpointError, CheckpointWriter
from dinovmf.config import Config, config_from_dict, dump_yaml
from dinovmf.models import build_ssl_model, init_student, model_args
from dinovmf.models.init_from import load_init_weights
from dinovmf.monitor import ActivationProbe, CollapseDetector, Monitor, gradient_probes, peak_flops
from dinovmf.objectives import build_objective
from dinovmf.optim import build_optimizer, clip_gradients, ema_update, set_hyperparameters
from dinovmf.parallelize import ddp_options, parallelize
from dinovmf.run_position import RunPosition, continued_schedules, describe_change
from dinovmf.schedules import Continuation, Schedules, build_schedules
from dinovmf.step_timing import SHARE_PREFIX, DataWaitCheck, StepTiming, instrument_communication
from dinovmf.stopping import NonFiniteLossError, NonFiniteLossGuard, StopSignal, TimeLimit
from dinovmf.watchdog import watchdog_for

UTILISATION_EPS = 1e-3  # cosine distance under which two prototypes count as one (unique prototypes)
# Metrics read with the loss every step (one copy), for the collapse detector.
COLLAPSE_METRICS = ("teacher_entropy", "student_entropy")


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
        self.info = D.init_distributed(cfg.dist.backend, cfg.dist.timeout_s)
        self.device = D.device_for(self.info) if device is None else torch.device(device)

        student = init_student(cfg)  # train.seed: the same weights on every rank
        if cfg.model.init_from is not None and load_init_from:
            # Into the student before the teacher copies it and before DDP / FSDP2 wrap or shard it; every
            # rank reads the file, so all start equal. `resume` skips it: the checkpoint's weights win.
            report = load_init_weights(student.backbone, cfg.model.init_from, strict=cfg.model.init_strict,
                                       ignore=cfg.model.init_ignore, trust_pickle=cfg.model.init_trust_pickle)
            if self.info.is_main:
                print(report, flush=True)
        student = student.to(self.device)
        teacher = build_ssl_model(cfg, 0.0).to(self.device)
        teacher.load_state_dict(student.state_dict())
        teacher.requires_grad_(False)
        teacher.eval()  # the EMA network never trains: no drop-path, no RoPE coordinate augmentation (as DINOv3)
        self.models = parallelize(student, teacher, self.info, self.device, fsdp=cfg.dist.fsdp,
                                  compile=cfg.train.compile,
                                  mixed_precision=self.device.type == "cuda" and cfg.train.amp != "none",
                                  ddp_options=ddp_options(cfg.dist))
        # Parallelised; now capture the parameters that train (FSDP2 replaced them all).
        self.optimizer = build_optimizer(self.models.student, cfg)
        self.trainable = [p for p in self.models.student.parameters() if p.requires_grad]
        self.frozen_prototypes = self.models.student.prototype_parameters()
        self.backbone_parameters = [p for p in self.models.student.backbone.parameters() if p.requires_grad]
        self.objective = build_objective(cfg).to(self.device)
        self.timing = StepTiming(self.device, self.info.is_distributed)  # where each step's time goes
        instrument_communication(self.models, self.objective, self.timing)

        self.step = 0  # optimisation steps done
        self.epoch, self.epoch_position = 0, 0  # the data epoch, and its samples trained on (all ranks)
        self.global_batch = cfg.train.batch_size * self.info.world_size
        self.schedules: Schedules | Continuation | None = None
        self.checkpoints: CheckpointWriter | None = None  # created by the first fit / save
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
        set_hyperparameters(self.optimizer, values["lr"], values["wd"], values["backbone_lr_scale"])
        # Before the forward: the fused loss computes the prototype gradient there, and the last step's
        # .grad freed first lets it reuse that memory (dinovmf.cpu_memory) and lowers the forward's peak.
        self.optimizer.zero_grad(set_to_none=True)
        self.timing.begin("forward")
        terms, metrics = self.objective(models.student_forward, models.teacher, crops, values["teacher_temp"])
        loss = sum(terms.values())
        # Numbered as the logs number steps (the n-th step is step n); the entropies ride along for fit's
        # collapse detector, read every step without a sync of their own.
        self.loss_guard.check(loss, step + 1, watch={k: metrics[k] for k in COLLAPSE_METRICS if k in metrics})
        self.timing.begin("backward")
        loss.backward()
        self.timing.begin("optimizer")
        if self.probe is not None:  # stability probes (train.probes): the raw gradients, before clipping
            metrics.update({**gradient_probes(models.student.named_parameters()), **self.probe.read()})
        if values["freeze_backbone"]:  # continued pretraining: only the head learns; before clipping, which
            for p in self.backbone_parameters:  # then measures the head's gradient alone. The backbone stays
                p.grad = None                   # fixed, so its EMA copy does too (lerp of equal tensors).
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
        cleanly (checkpoint saved) on SIGTERM / SIGUSR1 / SIGUSR2 / SIGINT (then `exit_code` says which:
        `stopping.EXIT_*`) or when `train.time_limit_min` is spent, and raises `NonFiniteLossError` on a
        NaN / inf loss, keeping the last good checkpoint. Under gloo a watchdog exits the process when
        ranks stop making progress (`dinovmf.watchdog`).
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
        writer = self._checkpoint_writer()
        last, interrupted, out_of_time, save_failed = {}, False, False, False
        try:
            with StopSignal() as signal, watchdog_for(info) as watchdog:
                while self.step < sched.total_steps and not (interrupted or out_of_time or save_failed):
                    epoch = self.epoch
                    for crops, _labels in self.timing.timed_iter("data", self._epoch_batches(loader)):
                        watchdog.progress(self.step)
                        metrics = self.train_step(crops, self.step)
                        watchdog.progress(self.step)
                        self.epoch_position += self.global_batch
                        monitor.advance()
                        self._check_collapse(monitor, collapse)
                        if self.step % cfg.train.log_every == 0 or self.step == sched.total_steps:
                            last = self._log(monitor, metrics, epoch, data_wait)
                        if self.step % cfg.train.ckpt_every == 0 and self.step < sched.total_steps:
                            with self.timing.phase("checkpoint"):
                                self.save()
                        with self.timing.comm():  # waits for the slowest rank
                            interrupted, out_of_time, save_failed = D.any_rank(
                                signal.received_locally, time_limit.expired_locally(), writer.failed())
                        if interrupted or out_of_time or save_failed:
                            break
                if out_of_time:
                    monitor.message(f"time limit of {time_limit.minutes} min reached at step {self.step}")
                if not save_failed:
                    self.save()
                writer.close()  # waits for the save in flight (a signal's exit too), frees the staging copy
        except NonFiniteLossError as e:
            try:
                writer.close()  # the save in flight holds good weights: the last good checkpoint may be it
            except CheckpointError as failed:
                monitor.message(f"ERROR: {failed}")
            good = ckpt.latest_checkpoint(ckpt.checkpoint_dir(self.out_dir))
            monitor.message(f"ERROR: {e}. Last good checkpoint: {good or 'none (no checkpoint was written)'}")
            monitor.log(e.step, {"message": str(e)}, kind="error")
            raise
        finally:
            monitor.close()
        if not interrupted:
            return {**last, "step": self.step, "interrupted": False}
        if info.is_main:
            print(f"stopped by signal at step {self.step}; checkpoint saved, continue with --resume auto "
                  f"(exit code {signal.exit_code})", flush=True)
        return {**last, "step": self.step, "interrupted": True, "exit_code": signal.exit_code}

    def _set_steps_per_epoch(self, steps_per_epoch: int) -> None:
        if self.schedules is None:
            self.schedules = build_schedules(self.cfg, steps_per_epoch, self.info.world_size)
        elif self.schedules.steps_per_epoch != steps_per_epoch:
            raise ValueError(f"the loader has {steps_per_epoch} batches per epoch, but this trainer's schedules "
                             f"were built for {self.schedules.steps_per_epoch} (did the dataset change?)")

    def _epoch_batches(self, loader):
        """The batches of `self.epoch` still to train on: from sample `self.epoch_position` of its order
        on (`loader.set_epoch(epoch, start=...)`); moves `self.epoch` on once the epoch is read to its end."""
        sched, start = self.schedules, self.epoch_position
        if not start:
            loader.set_epoch(self.epoch)
        elif "start" in inspect.signature(loader.set_epoch).parameters:
            loader.set_epoch(self.epoch, start=start)
        else:
            raise ValueError(f"cannot resume epoch {self.epoch} at its sample {start}: this loader's set_epoch "
                             "takes no `start` (the samples already trained on; see MultiCropLoader.set_epoch)")
        batches = iter(loader)
        first = ()
        if start:
            # Starting an epoch's reader may draw from the RNG (a DataLoader seeds its workers); the run
            # that wrote the checkpoint drew that at the epoch's start, before the checkpoint's RNG state.
            rng = ckpt.rng_state()
            first = tuple(itertools.islice(batches, 1))
            ckpt.set_rng_state(rng)
        for batch in itertools.chain(first, batches):
            if self.step >= sched.total_steps:
                return
            yield batch
        self.epoch, self.epoch_position = self.epoch + 1, 0

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
        monitor.message(f"dinovmf train: {cfg.method} {cfg.model.arch}/{cfg.backbone.patch_size}{depth} "
                        f"K={cfg.model.out_dim} | {info.world_size} process(es) on {self.device.type}"
                        f"{' (FSDP2)' if self.models.fsdp else ''} | {sched.steps_per_epoch} steps/epoch, "
                        f"{sched.total_steps} steps | {flops / 1e9:.1f} GFLOP/img, MFU vs {peak / 1e12:.2f} "
                        f"TFLOP/s ({peak_source})")
        return monitor

    def _log(self, monitor: Monitor, metrics: dict, epoch: int, data_wait: DataWaitCheck) -> dict:
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
        warning = data_wait.check(self.step, shares[f"{SHARE_PREFIX}data_max"])
        if warning:
            monitor.warn(self.step, warning, what="data_wait")
        return values

    def _check_collapse(self, monitor: Monitor, collapse: CollapseDetector) -> None:
        """Feed the collapse detector the entropies the loss guard read with the loss (every step; on CUDA
        the previous step's), and print its warning."""
        seen = self.loss_guard.latest
        if seen is None:
            return
        nan = float("nan")
        warning = collapse.check(seen["step"], seen.get("teacher_entropy", nan), seen.get("student_entropy", nan))
        if warning:
            monitor.warn(seen["step"], warning, what="collapse")

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
        """Checkpoint this step to out_dir/checkpoints/step_N/ (dinovmf.checkpoint; the last
        `train.keep_last` kept). Every rank calls it: each writes its own shard. With `train.ckpt_async`
        the write continues in the background (`self.checkpoints.wait()` waits for it). Returns the
        checkpoint's path on rank 0 (None elsewhere); a second call at the same step writes nothing."""
        if self.out_dir is None:
            raise ValueError("Trainer.save needs an out_dir")
        self.loss_guard.flush()  # never checkpoint weights updated by a step whose loss was not finite
        writer, models, info = self._checkpoint_writer(), self.models, self.info
        if writer.last_step != self.step:
            tensors, param_groups = ckpt.training_state(models.student, models.teacher, self.optimizer)
            tensors.update({f"loss/{k}": v for k, v in self.objective.state_dict().items()})
            tensors.update({f"rng/{info.rank}/{k}": v for k, v in ckpt.rng_tensors().items()})
            writer.save(self.step, tensors, self._trainer_state(param_groups) if info.is_main else None)
        return ckpt.checkpoint_path(self.out_dir, self.step) if info.is_main else None

    def _checkpoint_writer(self) -> CheckpointWriter:
        """The run's CheckpointWriter (created on first use, on every rank: it removes what interrupted
        writes left and, distributed, creates the process group its background writes use)."""
        if self.checkpoints is None:
            asynchronous = self.cfg.train.ckpt_async
            if asynchronous is None:
                asynchronous = self.info.is_distributed
            self.checkpoints = CheckpointWriter(self.out_dir, self.cfg.train.keep_last, asynchronous=asynchronous,
                                                rank=self.info.rank, world_size=self.info.world_size)
        return self.checkpoints

    def _position(self) -> RunPosition:
        sched = self.schedules
        base = sched.base if isinstance(sched, Continuation) else sched
        return RunPosition(step=self.step, epoch=self.epoch, epoch_position=self.epoch_position,
                           schedule_position=float(self.step) if sched is None else sched.position(self.step),
                           world_size=self.info.world_size, global_batch=self.global_batch,
                           steps_per_epoch=None if sched is None else sched.steps_per_epoch,
                           schedule_steps_per_epoch=None if base is None else base.steps_per_epoch,
                           schedule_global_batch=self.global_batch if base is None else base.global_batch)

    def _trainer_state(self, optimizer_param_groups: list[dict]) -> dict:
        """What a checkpoint holds besides tensors (trainer.json): plain JSON types only."""
        position = self._position()
        return {"format": ckpt.FORMAT, "version": ckpt.VERSION, "step": self.step, "config": self.cfg.to_dict(),
                "model_args": model_args(self.cfg), "steps_per_epoch": position.steps_per_epoch,
                "position": position.to_json(), "optimizer_param_groups": optimizer_param_groups}

    def _restore(self, path: Path, state: dict, steps_per_epoch: int | None) -> None:
        """Weights, optimizer, centers, step, data position, schedules and this rank's RNG state from
        checkpoint `path` (`state`: its trainer state) of any version, world size and wrapping."""
        info, models = self.info, self.models
        saved = RunPosition.from_checkpoint(state)
        rng = ckpt.restore_checkpoint(path, state, models.student, models.teacher, self.optimizer, self.objective,
                                      info.rank, with_rng=saved.world_size == info.world_size)
        self.step, self.epoch, self.epoch_position = saved.step, saved.epoch, saved.epoch_position
        if rng is not None:
            ckpt.set_rng_state(rng)
        else:  # written by another world size: fresh per-rank streams, still a function of (seed, rank, step)
            torch.manual_seed(self.cfg.train.seed + 1000 * info.rank + 1 + self.step)
        self.schedules = continued_schedules(saved, self.cfg, steps_per_epoch, self.global_batch)
        if info.is_main:
            print(f"resumed from step {self.step} ({path})", flush=True)
            change = self.schedules and describe_change(saved, self._position(), self.schedules.total_steps,
                                                        self.schedules.lr)
            if change:
                print(change, flush=True)

    @classmethod
    def resume(cls, path: str | Path, cfg: Config | None = None, out_dir: str | Path | None = None,
               device: str | torch.device | None = None, *, steps_per_epoch: int | None = None,
               trust_pickle: bool = False, verify: bool = True) -> "Trainer":
        """A Trainer continuing checkpoint `path` (a step_N directory, or a version-1 step_N.pt file) on
        this process's world size. `cfg` defaults to the checkpoint's own config; `steps_per_epoch` (this
        run's loader length) to the checkpointed run's. `trust_pickle`: load a version-1 file that holds
        more than tensors and plain types (it runs the file's pickled code: trusted files only).
        `verify`: check the files against the manifest first (`checkpoint.verify_checkpoint`; a
        ValueError naming what is wrong) - `train` has done it already, on rank 0."""
        path = Path(path)
        if verify:
            try:
                ckpt.verify_checkpoint(path)
            except ckpt.CheckpointUnreadable as e:
                raise ckpt.CheckpointUnreadable(f"checkpoint {str(path)!r} is unreadable: {e}") from None
        state = ckpt.read_trainer_state(path, trust_pickle=trust_pickle)
        if cfg is None:
            cfg = config_from_dict(state["config"], source=str(path))
        trainer = cls(cfg, out_dir, device, load_init_from=False)
        trainer._restore(path, state, steps_per_epoch)
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
