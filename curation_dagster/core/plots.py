"""The project's PNG plots (matplotlib, headless).

Figures are built with ``matplotlib.figure.Figure`` and the Agg canvas directly, never ``pyplot``: no global
figure state, no GUI backend, safe in Dagster worker threads. Each public function has a ``build_*`` twin that
returns the Figure, so tests can inspect what was drawn. Files are written to a temp name then renamed.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from .atomic import atomic_file

DPI = 100
MEANINGLESS_TEXT = "tiny-random model: scores are meaningless"
_SET_COLOURS = {"raw": "#7f7f7f", "curated": "#2ca02c", "random": "#1f77b4"}
_METRIC_LABELS = {"accuracy": "accuracy", "macro_f1": "macro-F1", "weighted_f1": "weighted-F1"}


def _label(code, category_names: dict[int, str] | None, width: int = 28) -> str:
    name = (category_names or {}).get(int(code))
    if not name:
        return str(code)
    name = name if len(name) <= width else name[: width - 1] + "…"
    return f"{code} {name}"


def _new_figure(width: float, height: float) -> Figure:
    fig = Figure(figsize=(width, height), dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _mark_meaningless(fig: Figure, title: str = "") -> None:
    """The note goes in the suptitle, so the constrained layout makes room for it above every panel."""
    fig.suptitle(
        MEANINGLESS_TEXT + (f"\n{title}" if title else ""), color="#d62728", fontsize=11, fontweight="bold",
        bbox={"facecolor": "#fff0f0", "edgecolor": "#d62728", "boxstyle": "round,pad=0.2"},
    )


def save_figure(fig: Figure, path) -> Path:
    """Save as PNG atomically (temp file in the same directory, then rename)."""
    path = Path(path)
    with atomic_file(path) as tmp:
        fig.savefig(tmp, format="png", dpi=DPI, bbox_inches="tight")
    return path


# --------------------------------------------------------------------------------------------- alignment


def build_alignment_histogram(
    scores, thresholds: dict | float | None, *, title: str = "", meaningless: bool = False
) -> Figure:
    scores = np.asarray(scores, dtype=float).ravel()
    finite = scores[np.isfinite(scores)]
    if isinstance(thresholds, dict):
        lines = {str(k): float(v) for k, v in thresholds.items() if v is not None}
    elif thresholds is None:
        lines = {}
    else:
        lines = {"threshold": float(thresholds)}
    fig = _new_figure(7, 4)
    ax = fig.add_subplot()
    if finite.size:
        ax.hist(finite, bins=min(60, max(10, int(np.sqrt(finite.size)))), color="#4c72b0", alpha=0.85)
    else:
        ax.text(0.5, 0.5, "no finite scores", ha="center", va="center", transform=ax.transAxes)
    colours = ["#d62728", "#ff7f0e", "#9467bd", "#8c564b"]
    if len(lines) > len(colours):
        # Per-class thresholds: one line each would bury the histogram; show their range and median instead.
        values = np.array(sorted(lines.values()))
        ax.axvspan(values[0], values[-1], color="#d62728", alpha=0.12,
                   label=f"{len(values)} per-class thresholds: {values[0]:.3f} … {values[-1]:.3f}")
        ax.axvline(float(np.median(values)), color="#d62728", linestyle="--", linewidth=1.8,
                   label=f"median threshold {np.median(values):.3f}")
    else:
        for i, (name, value) in enumerate(lines.items()):
            below = int((finite < value).sum())
            ax.axvline(value, color=colours[i % len(colours)], linestyle="--", linewidth=1.8,
                       label=f"{name} = {value:.3f} ({below} of {finite.size} below)")
    if lines:
        ax.legend(loc="upper right", fontsize=8)
    ax.set_xlabel("image–text alignment score (cosine)")
    ax.set_ylabel("rows")
    n_bad = scores.size - finite.size
    ax.set_title((title or "alignment scores") + f" — n={finite.size}" + (f" ({n_bad} non-finite)" if n_bad else ""))
    if meaningless:
        _mark_meaningless(fig)
    return fig


def alignment_histogram(scores, thresholds: dict | float | None, path, *, title: str = "", meaningless: bool = False) -> Path:
    """Histogram of alignment scores with a dashed line per threshold (dict: name -> value)."""
    return save_figure(build_alignment_histogram(scores, thresholds, title=title, meaningless=meaningless), path)


# --------------------------------------------------------------------------------------------- metrics


def build_metrics_bar_chart(metrics: dict, *, title: str = "", meaningless: bool | None = None) -> Figure:
    """Grouped bars (metric x training set) with seed std error bars; one panel per feature modality."""
    mods = metrics.get("modalities")
    if not mods:
        raise ValueError("metrics has no 'modalities' section (expected EvaluationResult.metrics)")
    if meaningless is None:
        meaningless = bool(metrics.get("meaningless"))
    names = list(_METRIC_LABELS)
    fig = _new_figure(4.2 * len(mods) + 1.0, 4.2)
    axes = fig.subplots(1, len(mods), squeeze=False)[0]
    width = 0.26
    x = np.arange(len(names))
    for ax, (modality, mod) in zip(axes, mods.items()):
        for j, set_name in enumerate(("raw", "curated", "random")):
            s = mod["sets"][set_name]
            means = [s["mean"][k] for k in names]
            stds = [s["std"][k] for k in names]
            ax.bar(x + (j - 1) * width, means, width, yerr=stds, capsize=3, color=_SET_COLOURS[set_name],
                   label=f"{set_name} (n={s['n_train']})", gid=f"{modality}:{set_name}")
        ax.set_xticks(x, [_METRIC_LABELS[k] for k in names])
        ax.set_ylim(0, 1.05)
        ax.set_title(f"features: {modality}")
        ax.grid(axis="y", alpha=0.3)
        ax.legend(fontsize=8, loc="lower right")
    seeds = metrics.get("config", {}).get("seeds")
    axes[0].set_ylabel(f"held-out test score (mean ± std, {len(seeds) if seeds else '?'} seeds)")
    if meaningless:
        _mark_meaningless(fig, title)
    elif title:
        fig.suptitle(title)
    return fig


def metrics_bar_chart(metrics: dict, path, *, title: str = "", meaningless: bool | None = None) -> Path:
    """Accuracy / macro-F1 / weighted-F1 of raw, curated and random, with error bars (EvaluationResult.metrics)."""
    return save_figure(build_metrics_bar_chart(metrics, title=title, meaningless=meaningless), path)


def build_per_class_f1_chart(
    per_class_raw: dict, per_class_curated: dict, category_names=None, *, meaningless: bool = False
) -> Figure:
    keys = sorted({int(k) for k in per_class_raw} | {int(k) for k in per_class_curated})
    if not keys:
        raise ValueError("per-class F1 dictionaries are empty")

    def get(d: dict, k: int) -> float:
        v = d.get(k, d.get(str(k)))
        return float(v) if v is not None else 0.0

    raw = np.array([get(per_class_raw, k) for k in keys])
    cur = np.array([get(per_class_curated, k) for k in keys])
    fig = _new_figure(8, max(3.0, 0.32 * len(keys) + 1.2))
    ax = fig.add_subplot()
    y = np.arange(len(keys))
    h = 0.4
    ax.barh(y - h / 2, raw, h, color=_SET_COLOURS["raw"], label="raw", gid="raw")
    ax.barh(y + h / 2, cur, h, color=_SET_COLOURS["curated"], label="curated", gid="curated")
    ax.set_yticks(y, [_label(k, category_names) for k in keys], fontsize=8)
    ax.invert_yaxis()
    ax.set_xlim(0, 1.0)
    ax.set_xlabel("F1 on the held-out test set (mean over seeds)")
    ax.set_title(f"per-class F1: raw vs curated — mean Δ {np.mean(cur - raw):+.3f}")
    ax.grid(axis="x", alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    if meaningless:
        _mark_meaningless(fig)
    return fig


def per_class_f1_chart(per_class_raw: dict, per_class_curated: dict, path, category_names=None, *,
                       meaningless: bool = False) -> Path:
    """Paired horizontal bars of per-class F1 (keys: class codes, int or str)."""
    return save_figure(build_per_class_f1_chart(per_class_raw, per_class_curated, category_names,
                                                meaningless=meaningless), path)


def build_confusion_matrix_plot(cm: np.ndarray, class_order, category_names=None, *, meaningless: bool = False) -> Figure:
    from sklearn.metrics import ConfusionMatrixDisplay

    cm = np.asarray(cm)
    k = len(class_order)
    if cm.ndim != 2 or cm.shape != (k, k):
        raise ValueError(f"confusion matrix has shape {cm.shape}; expected ({k}, {k}) to match class_order")
    support = cm.sum(axis=1, keepdims=True)
    norm = np.divide(cm, support, out=np.zeros(cm.shape, dtype=float), where=support > 0)
    size = max(4.5, 0.34 * k + 2.5)
    fig = _new_figure(size, size)
    ax = fig.add_subplot()
    labels = [_label(c, category_names, width=22) for c in class_order]
    disp = ConfusionMatrixDisplay(norm, display_labels=labels)
    disp.plot(ax=ax, include_values=k <= 12, values_format=".2f", cmap="Blues", colorbar=True,
              xticks_rotation="vertical")
    ax.tick_params(labelsize=7 if k > 12 else 9)
    acc = np.trace(cm) / cm.sum() if cm.sum() else float("nan")
    ax.set_title(f"curated model, row-normalised (n={int(cm.sum())}, accuracy {acc:.3f})")
    if meaningless:
        _mark_meaningless(fig)
    return fig


def confusion_matrix_plot(cm: np.ndarray, class_order, path, category_names=None, *, meaningless: bool = False) -> Path:
    """Row-normalised confusion matrix (rows = true class) via scikit-learn's ConfusionMatrixDisplay."""
    return save_figure(build_confusion_matrix_plot(cm, class_order, category_names, meaningless=meaningless), path)


def build_class_distribution_chart(before: dict, after: dict, title: str, category_names=None) -> Figure:
    def order(k: str) -> tuple:
        return (0, int(k)) if k.lstrip("-").isdigit() else (1, 0)  # codes, then "unlabelled"

    keys = sorted({str(k) for k in before} | {str(k) for k in after}, key=order)
    if not keys:
        raise ValueError("class distributions are empty")

    def get(d: dict, k: str) -> int:
        v = d.get(k)
        if v is None and k.lstrip("-").isdigit():
            v = d.get(int(k))
        return int(v or 0)

    b = np.array([get(before, k) for k in keys])
    a = np.array([get(after, k) for k in keys])
    fig = _new_figure(max(6.0, 0.32 * len(keys) + 2.0), 4.5)
    ax = fig.add_subplot()
    x = np.arange(len(keys))
    w = 0.4
    ax.bar(x - w / 2, b, w, color="#7f7f7f", label=f"before (n={b.sum()})", gid="before")
    ax.bar(x + w / 2, a, w, color="#2ca02c", label=f"after (n={a.sum()})", gid="after")
    ax.set_xticks(x, [_label(int(k), category_names, width=20) if order(k)[0] == 0 else k for k in keys],
                  rotation=90, fontsize=7)
    ax.set_ylabel("rows")
    ax.set_yscale("log" if b.max(initial=0) > 50 * max(1, a.max(initial=0)) else "linear")  # sampling: 85k vs 500
    ax.set_title(title)
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=8)
    return fig


def class_distribution_chart(before: dict, after: dict, path, title: str, category_names=None) -> Path:
    """Rows per class before and after a stage (e.g. sampling); keys are class codes."""
    return save_figure(build_class_distribution_chart(before, after, title, category_names), path)
