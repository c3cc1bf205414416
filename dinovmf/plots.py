"""PNG plots of a finished run, from its metrics.jsonl: out_dir/plots/*.png.

- loss.png: training loss (and its CE part) per step;
- prototypes.png: min / mean / max prototype norm, and used / unique prototypes;
- throughput.png: images/s and MFU;
- evaluation.png: the run's summary figure, kNN top-1 of the trained teacher next to the random-init
  baseline (when evaluated) beside the loss curve.
"""
from __future__ import annotations

from pathlib import Path

from dinovmf.monitor import read_metrics


def _series(records: list[dict], key: str) -> tuple[list[int], list[float]]:
    pts = [(r["step"], r[key]) for r in records if isinstance(r.get(key), (int, float))]
    return [p[0] for p in pts], [p[1] for p in pts]


def _figure(ncols: int):
    import matplotlib
    matplotlib.use("Agg")  # files only; never needs a display
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, ncols, figsize=(5.5 * ncols, 4), squeeze=False)
    return plt, fig, axes[0]


def _save(plt, fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _plot_loss(ax, train: list[dict]) -> None:
    ax.plot(*_series(train, "loss"), label="loss")
    if any(r.get("loss_koleo") for r in train):  # show the DINO term alone only when KoLeo adds to it
        ax.plot(*_series(train, "loss_dino"), ":", label="DINO cross-entropy")
    ax.set(xlabel="step", ylabel="loss", title="training loss")
    ax.grid(alpha=0.3)
    ax.legend()


def plot_run(out_dir: str | Path, summary: dict | None = None) -> list[Path]:
    """Write the plots of `out_dir`'s metrics.jsonl into out_dir/plots; returns the files written."""
    out_dir = Path(out_dir)
    metrics_path = out_dir / "metrics.jsonl"
    if not metrics_path.is_file():
        raise ValueError(f"plot_run: {metrics_path} does not exist (has the run logged anything?)")
    records = read_metrics(metrics_path)
    train = [r for r in records if r.get("kind") == "train"]
    summary = dict(summary or {})
    for r in records:  # kNN numbers of earlier evaluations of this run, if the caller has none
        if r.get("kind") == "eval":
            summary = {**{k: v for k, v in r.items() if k.startswith("knn")}, **summary}
    plots = out_dir / "plots"
    plots.mkdir(parents=True, exist_ok=True)
    written = []
    if not train:
        return written

    plt, fig, (ax,) = _figure(1)
    _plot_loss(ax, train)
    written.append(_save(plt, fig, plots / "loss.png"))

    plt, fig, (ax_norm, ax_used) = _figure(2)
    for stat in ("min", "mean", "max"):
        x, y = _series(train, f"proto_norm_{stat}")
        ax_norm.plot(x, y, label=stat)
    ax_norm.set(xlabel="step", ylabel="||w_k||", title="prototype norms")
    ax_norm.legend()
    ax_norm.grid(alpha=0.3)
    for key, label in (("teacher_used_prototypes", "used (argmax of >= 1 sample)"),
                       ("unique_prototypes", "unique (merge within 1e-3 cosine)")):
        x, y = _series(train, key)
        if x:
            ax_used.plot(x, y, label=label)
    ax_used.set(xlabel="step", ylabel="prototypes", title="prototype utilisation")
    ax_used.legend()
    ax_used.grid(alpha=0.3)
    written.append(_save(plt, fig, plots / "prototypes.png"))

    plt, fig, (ax_ips, ax_mfu) = _figure(2)
    x, y = _series(train, "img_per_s")
    ax_ips.plot(x, y)
    ax_ips.set(xlabel="step", ylabel="images / s", title="throughput (all processes)")
    ax_ips.grid(alpha=0.3)
    x, y = _series(train, "mfu")
    ax_mfu.plot(x, [100 * v for v in y])
    ax_mfu.set(xlabel="step", ylabel="MFU (%)", title="model FLOPs utilisation")
    ax_mfu.grid(alpha=0.3)
    written.append(_save(plt, fig, plots / "throughput.png"))

    if "knn_top1" in summary:
        plt, fig, (ax_knn, ax_loss) = _figure(2)
        names, values = ["trained teacher"], [summary["knn_top1"]]
        if "knn_top1_random_init" in summary:
            names.insert(0, "random init")
            values.insert(0, summary["knn_top1_random_init"])
        bars = ax_knn.bar(names, values, color=["#999999", "#1f77b4"][-len(values):])
        for bar, v in zip(bars, values):
            ax_knn.text(bar.get_x() + bar.get_width() / 2, v + 1, f"{v:.1f}%", ha="center")
        ax_knn.set(ylabel="kNN top-1 (%)", title="kNN evaluation (k=20, T=0.07)", ylim=(0, 105))
        _plot_loss(ax_loss, train)
        written.append(_save(plt, fig, plots / "evaluation.png"))
    return written
