"""Training telemetry: progress (bar or lines), metrics.jsonl, TensorBoard, throughput / MFU, collapse, probes.

Only the main process writes; other ranks get a `Monitor(enabled=False)` whose methods do nothing, so
the loop calls it unconditionally.
"""
from __future__ import annotations

import functools
import json
import math
import sys
import time
from pathlib import Path

import torch
from torch import nn

from dinovmf.step_timing import SHARE_PREFIX

# Dense bf16 tensor-core peaks (FLOP/s, no sparsity) from the vendors' data sheets, by device-name substring
# (checked in this order, so "A100" is found before "A10"); MFU is relative to these. Sources: NVIDIA H100
# Tensor Core GPU data sheet (SXM5: 989.4 TFLOPS bf16; H200 has the same tensor cores), NVIDIA A100 data
# sheet (312), L40S data sheet (362.05), A10 data sheet (125), Ada (RTX 4090) architecture white paper (165.2,
# fp32 accumulate), Tesla V100 SXM2 data sheet (125: fp16, which V100 trains in; it has no bf16).
GPU_PEAK_BF16 = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "A10": 125e12,
                 "4090": 165e12, "V100": 125e12}


def gpu_peak(name: str) -> float | None:
    """The data-sheet peak of the GPU whose name (a device name or a kind: "H100", "a100") contains one of
    `GPU_PEAK_BF16`'s keys, else None."""
    upper = name.upper()
    return next((peak for key, peak in GPU_PEAK_BF16.items() if key in upper), None)


@functools.lru_cache(maxsize=None)
def _peak_flops(device: str) -> tuple[float, str]:
    device = torch.device(device)
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        peak = gpu_peak(name)
        if peak is not None:
            return peak, f"{name} bf16 data sheet"
        return matmul_rate(device, torch.bfloat16, 8192), f"{name}: measured bf16 matmul (no data-sheet peak known)"
    return matmul_rate(device, torch.float32, 1024), "measured fp32 matmul on this CPU"


def peak_flops(device: torch.device | str) -> tuple[float, str]:
    """(peak FLOP/s, how it was obtained) for MFU on `device`: the one definition the training log and the
    benchmarks share.

    GPUs: the data-sheet dense bf16 peak by model name (a measured bf16 matmul rate for an unknown GPU).
    CPUs have no such number we can trust, so the fp32 matmul rate is measured (the best a ViT step could
    reach here). Measured once per device and process, so every MFU a process prints uses the same peak.
    """
    return _peak_flops(str(torch.device(device)))


def matmul_rate(device: torch.device, dtype: torch.dtype, n: int) -> float:
    """FLOP/s of an n x n x n matmul: the best of a few short windows (other processes only ever slow it)."""
    g = torch.Generator().manual_seed(0)  # its own generator: measuring must not move the training RNG
    a, b = (torch.randn(n, n, generator=g).to(device=device, dtype=dtype) for _ in range(2))
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    a @ b  # warm-up (thread pool, allocator, kernel selection)
    sync()
    best = 0.0
    for _ in range(5):
        start = time.perf_counter()
        a @ b
        a @ b
        sync()
        best = max(best, 4 * n ** 3 / (time.perf_counter() - start))
    return best


def mfu(images_per_s: float, flops_per_image: float, peak: float) -> float:
    """Model FLOP utilisation: achieved matmul FLOP/s over the peak (NaN when the peak is unknown)."""
    return images_per_s * flops_per_image / peak if peak and math.isfinite(peak) else float("nan")


class CollapseDetector:
    """Warns once per kind of collapse, fed every step (`Trainer.fit` reads the entropies with the loss):

    * `uniform`: the teacher's mean entropy stays near log K (centering dominates) and
    * `one-hot`: near 0 (one prototype takes everything: sharpening dominates), for `patience` steps;
    * `uniform student`: the student's entropy stays at log K to within `uniform_tol` nats for
      `student_patience` steps: its logits are equal across prototypes and the loss sits at ln K. A
      training student never gets there (its temperature keeps it sharp); a diverging run passes there
      on its way to NaN, within a few steps, hence the shorter patience.

    A step already checked is skipped (a deferred loss guard offers a step's values until the next is read).
    """

    def __init__(self, num_prototypes: int, high: float = 0.98, low: float = 0.02, patience: int = 10,
                 uniform_tol: float = 1e-3, student_patience: int = 3):
        self.log_k = math.log(num_prototypes)
        self.high, self.low, self.patience = high, low, patience
        self.uniform_tol, self.student_patience = uniform_tol, student_patience
        self._streaks: dict[str, int] = {}
        self._last_step: int | None = None
        self.warned: set[str] = set()

    def check(self, step: int, teacher_entropy: float, student_entropy: float = float("nan")) -> str | None:
        """The warning text when a collapse is detected at this step (once per kind), else None."""
        if step == self._last_step:
            return None
        self._last_step = step
        ratio = teacher_entropy / self.log_k
        kinds = {"uniform": ratio > self.high, "one-hot": ratio < self.low,
                 "uniform student": abs(student_entropy - self.log_k) <= self.uniform_tol}
        for kind, now in kinds.items():
            self._streaks[kind] = self._streaks.get(kind, 0) + 1 if now else 0
        for kind, patience in (("uniform", self.patience), ("one-hot", self.patience),
                               ("uniform student", self.student_patience)):
            if self._streaks[kind] >= patience and kind not in self.warned:
                self.warned.add(kind)
                return self._message(kind, step, teacher_entropy, student_entropy)
        return None

    def _message(self, kind: str, step: int, teacher_entropy: float, student_entropy: float) -> str:
        if kind == "uniform student":
            return (f"possible collapse at step {step}: the student's entropy {student_entropy:.4f} has been "
                    f"log K = {self.log_k:.4f} for {self._streaks[kind]} steps: its outputs are uniform and the "
                    "loss sits at ln K (a diverging run: lower optim.lr, keep optim.clip_grad)")
        what = ("near log K: the teacher outputs are close to uniform (centering too strong or teacher "
                "temperature too high)" if kind == "uniform" else
                "near 0: one prototype takes every sample (teacher temperature too low / centering too weak)")
        return (f"possible collapse at step {step}: teacher entropy {teacher_entropy:.3f} "
                f"(log K = {self.log_k:.3f}) is {what}")


class ActivationProbe:
    """Forward hooks recording the RMS and max |x| of each block's output (stability probes).

    Attach to the student's transformer blocks; `read()` returns and clears the last statistics.
    """

    def __init__(self, blocks: list[nn.Module]):
        self.stats: dict[str, float] = {}
        self.handles = [b.register_forward_hook(self._hook(i)) for i, b in enumerate(blocks)]

    def _hook(self, index: int):
        def hook(module, inputs, output):
            x = output.detach().float() if torch.is_tensor(output) else None
            if x is not None:
                self.stats[f"probe/act_rms_block{index}"] = x.pow(2).mean().sqrt().item()
                self.stats[f"probe/act_absmax_block{index}"] = x.abs().max().item()
        return hook

    def read(self) -> dict[str, float]:
        out, self.stats = self.stats, {}
        return out

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


def gradient_probes(named_params) -> dict[str, float]:
    """Per-group gradient norms (backbone / head / prototypes) and the count of non-finite entries.

    A debugging aid (`train.probes`): it reads every gradient. Under FSDP2 each gradient is gathered first
    (a collective: every rank calls this, as every rank runs the training step).
    """
    groups: dict[str, list[torch.Tensor]] = {}
    nonfinite = 0
    for name, p in named_params:
        if p.grad is None:
            continue
        grad = p.grad.detach()
        if hasattr(grad, "full_tensor"):  # a DTensor shard
            grad = grad.full_tensor()
        group = ("prototypes" if name.endswith(("head.v", "head.g")) else "head" if "head." in name
                 else "backbone")
        groups.setdefault(group, []).append(grad.float().norm())
        nonfinite += int((~torch.isfinite(grad)).sum())
    out = {f"probe/grad_norm_{g}": torch.stack(v).norm().item() for g, v in groups.items()}
    out["probe/grad_nonfinite"] = float(nonfinite)
    return out


def format_duration(seconds: float) -> str:
    """1h02m, 3m05s, 42s."""
    seconds = max(0, int(round(seconds)))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours}h{minutes:02d}m"
    return f"{minutes}m{secs:02d}s" if minutes else f"{secs}s"


class Monitor:
    """Progress + metrics.jsonl + TensorBoard; computes img/s, MFU and the ETA between log calls.

    Progress goes to `stream` (stdout by default) in one of two forms. On a terminal (`progress="auto"`
    and `stream.isatty()`, or `progress="bar"`) a tqdm bar redrawn in place. Anywhere else (a job log, CI,
    `make demo > log`: `progress="lines"`) one line per logged step,

        step 40/600 | loss 5.1234 | 812.3 img/s | MFU 12.30% | data 3% | comm 8% | ETA 3m12s

    (`data` / `comm` / `ckpt`: shares of the window's wall time, `dinovmf.step_timing`) so a log file
    grows by one readable line every `train.log_every` steps instead of a carriage-return redraw per step.
    `progress="none"` shows nothing but messages.
    """

    def __init__(self, out_dir: str | Path, total_steps: int, start_step: int = 0, images_per_step: int = 1,
                 flops_per_image: float | None = None, peak: float | None = None, enabled: bool = True,
                 tensorboard: bool = True, progress: str = "auto", stream=None):
        if progress not in ("auto", "bar", "lines", "none"):
            raise ValueError(f"progress must be auto, bar, lines or none, got {progress!r}")
        self.enabled = enabled
        self.images_per_step = images_per_step
        self.flops_per_image, self.peak = flops_per_image, peak
        self.total_steps = total_steps
        self.stream = sys.stdout if stream is None else stream
        self._last_time, self._last_step = time.perf_counter(), start_step
        self._start_time, self._start_step = self._last_time, start_step
        self.bar = self.tb = self.jsonl = None
        if progress == "auto":
            isatty = getattr(self.stream, "isatty", None)
            progress = "bar" if isatty is not None and isatty() else "lines"
        self.progress = progress
        if not enabled:
            return
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        self.jsonl = open(out_dir / "metrics.jsonl", "a")
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
                self.tb = SummaryWriter(str(out_dir / "tensorboard"))
            except ImportError:  # tensorboard is optional
                self.tb = None
        if progress == "bar":
            from tqdm import tqdm
            self.bar = tqdm(total=total_steps, initial=start_step, unit="step", dynamic_ncols=True,
                            smoothing=0.1, file=self.stream)

    def start_window(self) -> None:
        """Start timing now (the loop's first step), leaving set-up (TensorBoard, the peak) out of the
        first window's img/s and the ETA."""
        self._last_time = self._start_time = time.perf_counter()

    def throughput(self, step: int) -> dict[str, float]:
        """img/s (global) and MFU since the previous call; resets the window."""
        now = time.perf_counter()
        elapsed, steps = now - self._last_time, step - self._last_step
        self._last_time, self._last_step = now, step
        if steps <= 0 or elapsed <= 0:
            return {}
        out = {"img_per_s": steps * self.images_per_step / elapsed, "step_time_s": elapsed / steps}
        if self.flops_per_image and self.peak and math.isfinite(self.peak):
            out["mfu"] = mfu(out["img_per_s"], self.flops_per_image, self.peak)
        return out

    def eta_s(self, step: int) -> float | None:
        """Seconds left to `total_steps` at the mean step time since this monitor started (None before a step)."""
        done = step - self._start_step
        if done <= 0:
            return None
        return (self.total_steps - step) * (time.perf_counter() - self._start_time) / done

    def progress_line(self, step: int, metrics: dict) -> str:
        """The one-line progress record of a log step (see the class docstring)."""
        parts = [f"step {step}/{self.total_steps}"]
        if "loss" in metrics:
            parts.append(f"loss {metrics['loss']:.4f}")
        if "img_per_s" in metrics:
            parts.append(f"{metrics['img_per_s']:.1f} img/s")
        if "mfu" in metrics:
            parts.append(f"MFU {100 * metrics['mfu']:.2f}%")
        for label, phase in (("data", "data"), ("comm", "comm"), ("ckpt", "checkpoint")):
            share = metrics.get(f"{SHARE_PREFIX}{phase}")
            if share is not None and math.isfinite(share) and (phase != "checkpoint" or share >= 0.005):
                parts.append(f"{label} {100 * share:.0f}%")
        eta = self.eta_s(step)
        if eta is not None:
            parts.append(f"ETA {format_duration(eta)}")
        return " | ".join(parts)

    def advance(self, n: int = 1) -> None:
        if self.bar is not None:
            self.bar.update(n)

    def log(self, step: int, metrics: dict, kind: str = "train") -> None:
        """Write one record (JSONL + TensorBoard) and show the headline numbers (bar or line)."""
        if not self.enabled:
            return
        record = {"kind": kind, "step": step, "time": time.time(), **metrics}
        self.jsonl.write(json.dumps(record) + "\n")
        self.jsonl.flush()
        if self.tb is not None:
            for k, v in metrics.items():
                if isinstance(v, (int, float)) and math.isfinite(v):
                    self.tb.add_scalar(f"{kind}/{k}", v, step)
        if kind != "train":
            return
        if self.bar is not None:
            shown = {k: metrics[k] for k in ("loss", "img_per_s", "mfu", "lr") if k in metrics}
            self.bar.set_postfix({k: f"{v:.3g}" for k, v in shown.items()}, refresh=False)
        elif self.progress == "lines":
            print(self.progress_line(step, metrics), file=self.stream, flush=True)

    def message(self, text: str) -> None:
        """Print a line (above the bar, when there is one); rank 0 only."""
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.write(text, file=self.stream)
        else:
            print(text, file=self.stream, flush=True)

    def warn(self, step: int, text: str, *, what: str) -> None:
        """Print a warning and keep it in metrics.jsonl (kind "warning", `what` under "warning": e.g.
        "collapse", "data_wait"), where tests, studies and plots find it."""
        if self.enabled:
            self.message(f"WARNING: {text}")
            self.log(step, {"message": text, "warning": what}, kind="warning")

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        if self.tb is not None:
            self.tb.close()
        if self.jsonl is not None:
            self.jsonl.close()
        self.bar = self.tb = self.jsonl = None


def read_metrics(path: str | Path) -> list[dict]:
    """The records of a metrics.jsonl (a torn last line from a killed run is skipped)."""
    records = []
    with open(path) as f:
        for line in f:
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return records
