"""The sizing model behind `dinovmf plan`: what a run needs on a cluster, with every assumption stated.

From a config (architecture, crops, K, per-GPU batch, method) and a cluster (GPU kind and count, bus
bandwidth inside and across nodes, CPU cores per GPU, checkpoint write bandwidth) it predicts

- per-GPU images/s from the models' own FLOP count (`objectives.flops_per_image`, the training log's) at a
  stated MFU of the data-sheet peak (`monitor.GPU_PEAK_BF16`, the training log's peak table);
- the bytes one step all-reduces (DDP) or all-gathers and reduce-scatters (FSDP2), their time at the bus
  bandwidth, and the part the compute cannot hide (`exposed_comm_seconds`);
- the loader CPU cores each GPU needs, from the per-core rate measured in bench/results/data_pipeline.csv;
- checkpoint size, write time and the time the loop waits for it;
- wall time and GPU-hours for a number of epochs (or steps).

It is checked against the CPU runs of bench/bench_scaling.py (bytes per step, scaling efficiency) and
against published DINO / DINOv2 / DINOv3 runs (`PUBLISHED_RUNS`; tests/test_plan.py). The model in one
paragraph: a step takes max(compute + exposed communication, loader time per batch); compute =
batch x FLOPs per image / (MFU x peak); collectives are ring algorithms at the bus bandwidth (nccl-tests'
"busbw"; across nodes the per-GPU share of the network); DDP hides its all-reduce behind the backward
except what does not fit and the last bucket; FSDP2 hides its all-gathers behind the forward and its
backward all-gathers and reduce-scatters behind the backward, except the first gather and the last
reduce-scatter; each rank writes its shard of a checkpoint (`train.ckpt_async`: in the background, the
loop waiting only for the copy of its shard into host memory).
"""
from __future__ import annotations

import csv
from dataclasses import dataclass, field
from pathlib import Path

IMAGENET_1K_TRAIN_IMAGES = 1_281_167   # ILSVRC-2012 train split
DEFAULT_MFU = 0.35                      # see docs/DESIGN.md §3: between the published runs' 25% and 46%
FP32_BYTES = 4
DATA_PIPELINE_CSV = Path(__file__).resolve().parents[1] / "bench" / "results" / "data_pipeline.csv"
# `--loader` names -> the data_pipeline.csv rows measuring that pipeline end to end (decode, crops, augment).
LOADER_PIPELINES = {"ffcv": "ffcv_end_to_end", "pil": "pil_end_to_end", "dino_pil": "dino_pil"}
GB = 1e9
# Device -> pinned host memory per GPU, the copy an asynchronous save waits for (PCIe Gen4/5 x16 carry
# 25-50 GB/s; a conservative share, since the copy runs beside the step's own traffic).
STAGING_GBPS = 10.0


@dataclass(frozen=True)
class Cluster:
    """The hardware a plan is for. Bandwidths are bus bandwidths per GPU in GB/s (what nccl-tests report
    as busbw); `inter_node_gbps` is each GPU's share of the network and applies once there are 2+ nodes."""
    gpu: str
    peak_flops: float                 # per GPU, FLOP/s
    peak_source: str
    nodes: int = 1
    gpus_per_node: int = 8
    intra_node_gbps: float = 200.0    # NVLink-class
    inter_node_gbps: float = 25.0     # one 200 Gb/s NIC per GPU
    cpu_cores_per_gpu: float = 8.0
    fs_write_gbps: float = 2.0        # what the checkpoint filesystem takes from each writer (every rank writes)

    @property
    def gpus(self) -> int:
        return self.nodes * self.gpus_per_node

    @property
    def bus_gbps(self) -> float:
        return self.inter_node_gbps if self.nodes > 1 else self.intra_node_gbps


def cluster_for(gpu: str, peak_tflops: float | None = None, **kwargs) -> Cluster:
    """A `Cluster` of `gpu` (a `monitor.GPU_PEAK_BF16` kind, any case) or of any name with `peak_tflops`.
    An unknown kind without a peak is a ValueError listing the known ones."""
    from dinovmf.monitor import GPU_PEAK_BF16, gpu_peak

    if peak_tflops is not None:
        if not peak_tflops > 0:
            raise ValueError(f"--peak-tflops must be > 0, got {peak_tflops}")
        return Cluster(gpu, peak_tflops * 1e12, "--peak-tflops", **kwargs)
    peak = gpu_peak(gpu)
    if peak is None:
        raise ValueError(f"unknown GPU kind {gpu!r}: known kinds are {', '.join(GPU_PEAK_BF16)} "
                         "(dinovmf.monitor.GPU_PEAK_BF16); for another GPU give its dense bf16 peak with "
                         "--peak-tflops")
    return Cluster(gpu, peak, f"{gpu} data-sheet dense tensor-core peak, dinovmf.monitor.GPU_PEAK_BF16", **kwargs)


# ------------------------------------------------------------------------------------ the models

@dataclass(frozen=True)
class ModelSize:
    """What the plan needs from the networks, read from the models themselves (built on the meta device)."""
    flops_per_image: float            # the training log's MFU numerator (student 3x forward + teacher forward)
    student_forward_flops: float
    teacher_forward_flops: float
    student_params: int
    teacher_params: int
    trainable_params: int
    block_params: int                 # the transformer blocks' (FSDP2 shards and re-gathers them per block)
    root_params: int                  # the rest: embeddings and heads (FSDP2's root group)
    student_backbone_calls: int       # one per crop resolution (MultiCropWrapper); the teacher makes one


def model_size(cfg) -> ModelSize:
    import torch

    from dinovmf.models import build_ssl_model
    from dinovmf.objectives import build_objective

    with torch.device("meta"):
        student = build_ssl_model(cfg, cfg.model.drop_path)
        teacher = build_ssl_model(cfg, 0.0)
    objective = build_objective(cfg)
    s_fwd, t_fwd = objective.forward_flops(student)
    numel = lambda params: sum(p.numel() for p in params)  # noqa: E731
    blocks = numel(student.backbone.blocks.parameters())
    total = numel(student.parameters())
    sizes = {cfg.crops.global_size} | ({cfg.crops.local_size} if cfg.crops.n_local else set())
    return ModelSize(flops_per_image=objective.flops_per_image(student), student_forward_flops=float(s_fwd),
                     teacher_forward_flops=float(t_fwd), student_params=total,
                     teacher_params=numel(teacher.parameters()),
                     trainable_params=numel(p for p in student.parameters() if p.requires_grad),
                     block_params=blocks, root_params=total - blocks, student_backbone_calls=len(sizes))


# ------------------------------------------------------------------------------- communication

def comm_bytes_per_step(size: ModelSize, fsdp: bool, param_bytes: int = FP32_BYTES) -> dict[str, int]:
    """Bytes each step hands to collectives (the full message, as `dinovmf.step_timing` counts them).

    DDP: one all-reduce of every trainable gradient in fp32. FSDP2 (`dinovmf.parallelize`: `fully_shard` per
    block, then the root), in the compute dtype (`param_bytes`: 2 under bf16 mixed precision): each network's
    root group once per step; the blocks once per backbone call, because a block is resharded after every
    forward (the student calls its backbone once per crop resolution, and again per call in the backward;
    the teacher once); then one reduce-scatter of the trainable gradients in fp32."""
    if not fsdp:
        return {"all_reduce": size.trainable_params * FP32_BYTES}
    forward, backward = _fsdp_gathered_params(size)
    return {"all_gather": (forward + backward) * param_bytes,
            "reduce_scatter": size.trainable_params * FP32_BYTES}


def _fsdp_gathered_params(size: ModelSize) -> tuple[int, int]:
    """Parameters FSDP2 all-gathers per step in the forward (student and teacher) and in the backward."""
    teacher_blocks = size.teacher_params - size.root_params
    forward = 2 * size.root_params + size.block_params * size.student_backbone_calls + teacher_blocks
    return forward, size.block_params * size.student_backbone_calls


def collective_seconds(kind: str, nbytes: float, gpus: int, bus_gbps: float) -> float:
    """Ring-algorithm time of one collective of `nbytes` over `gpus` GPUs at `bus_gbps` GB/s bus bandwidth:
    an all-reduce moves 2 (N-1)/N of the message through every GPU's link, an all-gather or a
    reduce-scatter (N-1)/N (the definition behind nccl-tests' busbw)."""
    if gpus <= 1 or nbytes <= 0:
        return 0.0
    factor = {"all_reduce": 2.0, "all_gather": 1.0, "reduce_scatter": 1.0}[kind] * (gpus - 1) / gpus
    return factor * nbytes / (bus_gbps * GB)


def exposed_comm_seconds(size: ModelSize, fsdp: bool, gpus: int, bus_gbps: float, forward_s: float,
                         backward_s: float, bucket_cap_mb: float = 25.0, param_bytes: int = FP32_BYTES) -> dict:
    """The communication a step cannot hide behind its compute (see the module docstring), in seconds:
    {"total": all collectives back to back, "exposed": what the step waits for}."""
    nbytes = comm_bytes_per_step(size, fsdp, param_bytes)
    if not fsdp:
        total = collective_seconds("all_reduce", nbytes["all_reduce"], gpus, bus_gbps)
        last_bucket = min(1.0, bucket_cap_mb * 2 ** 20 / max(1, nbytes["all_reduce"]))
        return {"total": total, "exposed": max(total * last_bucket, total - backward_s)}
    gather = lambda params: collective_seconds("all_gather", params * param_bytes, gpus, bus_gbps)  # noqa: E731
    forward_gather, backward_gather = map(gather, _fsdp_gathered_params(size))
    scatter = collective_seconds("reduce_scatter", size.trainable_params * FP32_BYTES, gpus, bus_gbps)
    root_share = size.root_params / max(1, size.student_params)  # the root group goes first / last
    exposed = (max(forward_gather * root_share, forward_gather - forward_s)
               + max(scatter * root_share, backward_gather + scatter - backward_s))
    return {"total": forward_gather + backward_gather + scatter, "exposed": exposed}


# ------------------------------------------------------------------------------------ the loader

def loader_core_rate(loader: str = "ffcv", path: str | Path | None = None) -> tuple[float, str]:
    """(images per CPU-core-second, source) of a loader pipeline, end to end (decode, crops, augmentation):
    the newest one-worker row of bench/results/data_pipeline.csv (`bench/bench_data.py`) for `loader`
    (a `LOADER_PIPELINES` name)."""
    if loader not in LOADER_PIPELINES:
        raise ValueError(f"--loader must be one of {', '.join(LOADER_PIPELINES)}, got {loader!r}")
    path = Path(path) if path is not None else DATA_PIPELINE_CSV
    if not path.is_file():
        raise ValueError(f"{path} is missing (it comes with the source checkout; run python -m bench.bench_data "
                         "to measure it here), or give the rate with --loader-rate IMAGES_PER_CORE_S")
    with open(path, newline="") as f:
        rows = [r for r in csv.DictReader(f) if r.get("pipeline") == LOADER_PIPELINES[loader]
                and r.get("num_workers") == "1"]
    if not rows:
        raise ValueError(f"{path} has no one-worker row for pipeline {LOADER_PIPELINES[loader]!r}")
    row = max(rows, key=lambda r: r.get("date", ""))
    return float(row["images_per_cpu_s"]), (f"{LOADER_PIPELINES[loader]}, 1 worker, {row['device']}, "
                                            f"{row['date'][:10]} ({path.name})")


# -------------------------------------------------------------------------------------- the plan

@dataclass
class Plan:
    """A prediction and the assumptions it rests on (`lines()` prints both)."""
    cfg: object
    cluster: Cluster
    mfu: float
    size: ModelSize
    loader_rate: float
    loader_source: str
    steps_per_epoch: int
    assumptions: list[tuple[str, str]] = field(default_factory=list)

    def __post_init__(self):
        cfg, c, size = self.cfg, self.cluster, self.size
        self.batch = cfg.train.batch_size
        self.fsdp = cfg.dist.fsdp
        self.param_bytes = 2 if cfg.train.amp != "none" else FP32_BYTES  # bf16 autocast on GPUs
        rate = self.mfu * c.peak_flops
        per_image_s = lambda flops: flops / rate  # noqa: E731
        self.forward_s = self.batch * per_image_s(size.student_forward_flops + size.teacher_forward_flops)
        self.backward_s = self.batch * per_image_s(2 * size.student_forward_flops)
        self.compute_s = self.batch * per_image_s(size.flops_per_image)
        self.comm_bytes = comm_bytes_per_step(size, self.fsdp, self.param_bytes)
        self.comm = exposed_comm_seconds(size, self.fsdp, c.gpus, c.bus_gbps, self.forward_s, self.backward_s,
                                         cfg.dist.bucket_cap_mb, self.param_bytes)
        self.loader_s = self.batch / (c.cpu_cores_per_gpu * self.loader_rate)
        self.step_s = max(self.compute_s + self.comm["exposed"], self.loader_s)
        self.loader_bound = self.loader_s > self.compute_s + self.comm["exposed"]
        self.cores_needed = self.batch / (self.compute_s + self.comm["exposed"]) / self.loader_rate
        self.checkpoint_bytes = FP32_BYTES * (size.student_params + size.teacher_params + 2 * size.trainable_params)
        shard = self.checkpoint_bytes / c.gpus  # every rank writes its own share, all at once
        self.checkpoint_write_s = shard / (c.fs_write_gbps * GB)
        self.checkpoint_async = cfg.train.ckpt_async if cfg.train.ckpt_async is not None else c.gpus > 1
        if self.checkpoint_async:  # the loop waits for the staging copy, and for a write still running at the next save
            interval_s = cfg.train.ckpt_every * self.step_s
            self.checkpoint_s = shard / (STAGING_GBPS * GB) + max(0.0, self.checkpoint_write_s - interval_s)
        else:
            self.checkpoint_s = self.checkpoint_write_s

    @property
    def images_per_s_per_gpu(self) -> float:
        return self.batch / self.step_s

    def run(self, *, epochs: float | None = None, steps: int | None = None) -> dict:
        """Wall time (h) and GPU-hours of `epochs` (of `steps_per_epoch`) or `steps`, checkpoints included."""
        steps = steps if steps is not None else int(round(epochs * self.steps_per_epoch))
        checkpoints = steps // self.cfg.train.ckpt_every + 1  # and the final one
        seconds = steps * self.step_s + checkpoints * self.checkpoint_s
        return {"steps": steps, "hours": seconds / 3600, "gpu_hours": seconds / 3600 * self.cluster.gpus,
                "checkpoints": checkpoints}

    def lines(self, epochs: tuple[float, ...] = (100, 300), steps: int | None = None) -> list[str]:
        cfg, c, size = self.cfg, self.cluster, self.size
        crops = f"2x{cfg.crops.global_size}+{cfg.crops.n_local}x{cfg.crops.local_size}"
        out = [f"dinovmf plan: {cfg.model.arch}/{cfg.model.patch_size}, {cfg.method}, {crops} crops, "
               f"K={cfg.model.out_dim}, batch {self.batch} per GPU ({self.batch * c.gpus} global), "
               f"{'FSDP2' if self.fsdp else 'DDP'}; {c.nodes} node(s) x {c.gpus_per_node} {c.gpu} = {c.gpus} GPUs",
               "assumptions:"]
        out += [f"  {name:<22} {text}" for name, text in self.assumptions]
        comm = ", ".join(f"{k.replace('_', '-')} {v / GB:.2f} GB" for k, v in self.comm_bytes.items())
        out += ["per step and GPU:",
                f"  compute                {1e3 * self.compute_s:.1f} ms "
                f"({size.flops_per_image / 1e9:.1f} GFLOP/image: forward {1e3 * self.forward_s:.1f} ms, "
                f"backward {1e3 * self.backward_s:.1f} ms)",
                f"  communication          {comm}: {1e3 * self.comm['total']:.1f} ms at {c.bus_gbps:g} GB/s, "
                f"{1e3 * self.comm['exposed']:.1f} ms not hidden behind compute",
                f"  loader                 {1e3 * self.loader_s:.1f} ms per batch on {c.cpu_cores_per_gpu:g} cores; "
                f"{self.cores_needed:.1f} cores per GPU keep up with the compute",
                f"  step                   {1e3 * self.step_s:.1f} ms"
                f"{' (loader-bound)' if self.loader_bound else ''}: {self.images_per_s_per_gpu:.0f} img/s per GPU, "
                f"{self.images_per_s_per_gpu * c.gpus:.0f} img/s in all, MFU "
                f"{self.images_per_s_per_gpu * size.flops_per_image / c.peak_flops:.0%}",
                f"  checkpoint             {self.checkpoint_bytes / GB:.2f} GB "
                f"(student, teacher, AdamW moments; fp32), {self.checkpoint_write_s:.1f} s to write, the loop "
                f"waits {self.checkpoint_s:.1f} s{' (async)' if self.checkpoint_async else ''}, "
                f"every {cfg.train.ckpt_every} steps",
                "runs:"]
        lengths = [("steps", steps)] if steps is not None else [("epochs", e) for e in epochs]
        for unit, n in lengths:
            r = self.run(**{unit: n})
            length = f"{n:g} epochs = {r['steps']} steps" if unit == "epochs" else f"{r['steps']} steps"
            out.append(f"  {length:<27} {_duration(r['hours'])} wall, {r['gpu_hours']:,.0f} GPU-hours "
                       f"({r['checkpoints']} checkpoints)")
        return out


def _duration(hours: float) -> str:
    return f"{hours:6.1f} h" if hours < 48 else f"{hours / 24:6.2f} days"


def make_plan(cfg, cluster: Cluster, mfu: float = DEFAULT_MFU, *, loader: str = "ffcv",
              loader_rate: float | None = None, dataset_images: int = IMAGENET_1K_TRAIN_IMAGES,
              data_csv: str | Path | None = None, notes: dict[str, str] | None = None) -> Plan:
    """The plan of `cfg` on `cluster` (see the module docstring); `notes` add lines to the assumptions."""
    if not 0 < mfu <= 1:
        raise ValueError(f"--mfu must be in (0, 1], got {mfu}")
    if loader_rate is None:
        loader_rate, loader_source = loader_core_rate(loader, data_csv)
    else:
        if not loader_rate > 0:
            raise ValueError(f"--loader-rate must be > 0 images per core-second, got {loader_rate}")
        loader_source = "--loader-rate"
    c = cluster
    for name, value in (("gpus_per_node", c.gpus_per_node), ("nodes", c.nodes), ("intra_node_gbps", c.intra_node_gbps),
                        ("inter_node_gbps", c.inter_node_gbps), ("cpu_cores_per_gpu", c.cpu_cores_per_gpu),
                        ("fs_write_gbps", c.fs_write_gbps)):
        if not value > 0:
            raise ValueError(f"--{name.replace('_', '-')} must be > 0, got {value}")
    size = model_size(cfg)
    steps_per_epoch = dataset_images // (cfg.train.batch_size * c.gpus)
    if steps_per_epoch < 1:
        raise ValueError(f"the dataset ({dataset_images} images) is smaller than one global batch "
                         f"({cfg.train.batch_size} x {c.gpus} GPUs)")
    assumptions = [
        ("peak", f"{c.peak_flops / 1e12:.0f} TFLOP/s per GPU ({c.peak_source})"),
        ("MFU", f"{mfu:.0%} of the peak (--mfu), on the training log's FLOP count "
                "(objectives.flops_per_image: student forward + backward, teacher forward; matmuls only)"),
        ("interconnect", f"{c.intra_node_gbps:g} GB/s bus bandwidth per GPU in a node, {c.inter_node_gbps:g} "
                         "across nodes; ring collectives; DDP hides its all-reduce behind the backward (not its "
                         f"last {cfg.dist.bucket_cap_mb:g} MiB bucket); FSDP2 gathers behind the forward, "
                         "reduce-scatters behind the backward"),
        ("loader", f"{loader_rate:.0f} images per CPU-core-second ({loader_source}), "
                   f"{c.cpu_cores_per_gpu:g} cores per GPU, running beside the GPU"),
        ("checkpoints", f"each rank writes its shard at {c.fs_write_gbps:g} GB/s; asynchronous on 2+ GPUs "
                        f"(train.ckpt_async): the loop waits for the staging copy at {STAGING_GBPS:g} GB/s"),
        ("epoch", f"{dataset_images:,} images = {steps_per_epoch} steps of {cfg.train.batch_size} x {c.gpus}"),
    ] + list((notes or {}).items())
    return Plan(cfg, cluster, mfu, size, loader_rate, loader_source, steps_per_epoch, assumptions)


# ------------------------------------------------------------------------------ published runs

@dataclass(frozen=True)
class PublishedRun:
    """A run whose wall time its authors published, with the recipe and hardware the plan needs."""
    name: str
    overrides: tuple[str, ...]        # dinovmf config overrides giving the published recipe's shape
    gpu: str
    nodes: int
    hours: float                      # the published wall time
    epochs: float | None = None
    steps: int | None = None
    loader: str = "dino_pil"
    cluster: dict = field(default_factory=dict)
    sources: tuple[str, ...] = ()

    def plan(self) -> Plan:
        from dinovmf.config import load_config

        cluster = cluster_for(self.gpu, nodes=self.nodes, **self.cluster)
        return make_plan(load_config(None, list(self.overrides)), cluster, loader=self.loader,
                         notes={"published run": "; ".join(self.sources)})

    def predicted_hours(self) -> float:
        return self.plan().run(epochs=self.epochs, steps=self.steps)["hours"]


PUBLISHED_RUNS = (
    PublishedRun(
        "DINO ViT-S/16, 100 epochs, 8 V100", gpu="V100", nodes=1, hours=1.75 * 24, epochs=100,
        overrides=("method=dino", "model.arch=vit_small", "model.patch_size=16", "model.out_dim=65536",
                   "crops.n_local=8", "train.batch_size=64", "train.ckpt_every=2502", "train.amp=bf16"),
        cluster={"gpus_per_node": 8, "cpu_cores_per_gpu": 5, "intra_node_gbps": 100, "fs_write_gbps": 1},
        sources=("facebookresearch/dino README, 'Vanilla DINO training': ViT-small, one node with 8 GPUs, 100 "
                 "epochs, 'Training time is 1.75 day'",
                 "main_dino.py defaults: batch_size_per_gpu 64, local_crops_number 8 (2x224+8x96), out_dim "
                 "65536, use_fp16 (V100: fp16 tensor cores), num_workers 10 per GPU, checkpoint.pth every epoch",
                 "hardware assumed: V100 SXM2 (data-sheet peak), a DGX-1-class node (2 x 20 cores for 8 GPUs: 5 "
                 "cores per GPU), NVLink; loader: DINO's torchvision PIL pipeline (dino_pil row)")),
    PublishedRun(
        "DINOv2 ViT-L/16, ImageNet-1k, 32 A100", gpu="A100", nodes=4, hours=24.0, steps=125_000,
        overrides=("method=ibot_vmf", "ibot.shared_head=true", "model.arch=vit_large", "model.patch_size=16",
                   "model.out_dim=65536", "crops.n_local=8", "train.batch_size=64", "dist.fsdp=true",
                   "train.ckpt_every=12500", "train.amp=bf16"),
        cluster={"gpus_per_node": 8, "cpu_cores_per_gpu": 12, "intra_node_gbps": 200, "inter_node_gbps": 25},
        sources=("facebookresearch/dinov2 README, 'Fast setup: training DINOv2 ViT-L/16 on ImageNet-1k': 4 "
                 "A100-80GB nodes (32 GPUs), 'Training time is approximately 1 day'",
                 "dinov2/configs/train/vitl16_short.yaml + ssl_default_config.yaml: batch_size_per_gpu 64 "
                 "(2048 global), epochs 100 x OFFICIAL_EPOCH_LENGTH 1250 = 125k iterations, 2x224+8x96 crops, "
                 "65536 prototypes, iBOT head shared (separate_head: false), FSDP, eval every 12500",
                 "hardware assumed: 200 Gb/s per GPU across nodes, 12 CPU cores per GPU; loader: torchvision "
                 "PIL (dino_pil row)")),
    PublishedRun(
        "DINOv3 ViT-L/16, ImageNet-1k, 32 H100", gpu="H100", nodes=4, hours=14.0, steps=125_000,
        overrides=("method=ibot_vmf", "ibot.shared_head=false", "loss.centering=sinkhorn", "model.arch=vit_large",
                   "model.patch_size=16", "model.out_dim=65536", "crops.n_local=8", "train.batch_size=64",
                   "dist.fsdp=true", "train.ckpt_every=3750", "train.amp=bf16"),
        cluster={"gpus_per_node": 8, "cpu_cores_per_gpu": 12, "intra_node_gbps": 350, "inter_node_gbps": 50},
        sources=("facebookresearch/dinov3 README, 'Fast setup: training DINOv3 ViT-L/16 on ImageNet-1k': 4 "
                 "H100-80GB nodes (32 GPUs), 'Training time is approximately 14 hours'",
                 "dinov3/configs/train/vitl_im1k_lin834.yaml: batch_size_per_gpu 64 (2048 global), epochs 100 x "
                 "OFFICIAL_EPOCH_LENGTH 1250 = 125k iterations, 2x224+8x96 crops, 65536 prototypes, separate "
                 "iBOT head, sinkhorn_knopp centering, FSDP, checkpointing period 3750",
                 "hardware assumed: 400 Gb/s per GPU across nodes, 12 CPU cores per GPU; loader: torchvision "
                 "PIL (dino_pil row)")),
)
