"""Plots: what each figure draws (inspected on the Figure), and that the PNG lands atomically and is not blank."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from curation_dagster.core import plots
from curation_dagster.core.plots import MEANINGLESS_TEXT


def _suptitle(fig) -> str:
    return fig._suptitle.get_text() if fig._suptitle is not None else ""


def _check_png(path: Path) -> tuple[int, int]:
    assert path.is_file()
    with Image.open(path) as im:
        assert im.format == "PNG"
        arr = np.asarray(im.convert("L"), dtype=float)
        size = im.size
    assert arr.std() > 5  # something was drawn, not a blank canvas
    assert not [p for p in path.parent.iterdir() if p.name.endswith(".tmp")]  # no temp file left behind
    return size


def _metrics(meaningless=False):
    def s(n, acc):
        return {"n_train": n, "mean": {"accuracy": acc, "macro_f1": acc - 0.1, "weighted_f1": acc - 0.05},
                "std": {"accuracy": 0.01, "macro_f1": 0.02, "weighted_f1": 0.03}}
    mod = {"sets": {"raw": s(400, 0.8), "curated": s(300, 0.78), "random": s(300, 0.7)}}
    return {"meaningless": meaningless, "config": {"seeds": [0, 1, 2]}, "modalities": {"image+text": mod, "text": mod}}


def test_alignment_histogram_draws_each_threshold(tmp_path: Path):
    scores = np.r_[np.linspace(-0.2, 0.9, 200), np.nan]
    fig = plots.build_alignment_histogram(scores, {"min_alignment": 0.25, "p10": -0.1}, title="clean rows")
    ax = fig.axes[0]
    lines = {ln.get_label(): ln.get_xdata()[0] for ln in ax.get_lines()}
    assert len(lines) == 2
    (label_min,) = [k for k in lines if k.startswith("min_alignment")]
    assert lines[label_min] == pytest.approx(0.25)
    assert f"({int((scores[:-1] < 0.25).sum())} of 200 below)" in label_min
    assert sum(p.get_height() for p in ax.patches) == 200  # NaN left out of the bars ...
    assert "1 non-finite" in ax.get_title()  # ... and said so
    assert _suptitle(fig) == ""

    one = plots.build_alignment_histogram(scores, 0.3)
    assert [ln.get_label().split(" =")[0] for ln in one.axes[0].get_lines()] == ["threshold"]
    assert plots.build_alignment_histogram(scores, None).axes[0].get_lines() == []

    out = plots.alignment_histogram(scores, 0.3, tmp_path / "nested" / "hist.png", meaningless=True)
    w, h = _check_png(out)
    assert 500 < w < 900 and 300 < h < 600  # ~7x4 in at 100 dpi
    assert MEANINGLESS_TEXT in _suptitle(plots.build_alignment_histogram(scores, 0.3, meaningless=True))


def test_alignment_histogram_with_no_scores_still_renders(tmp_path: Path):
    _check_png(plots.alignment_histogram(np.array([]), 0.2, tmp_path / "empty.png"))


def test_metrics_bar_chart_heights_and_error_bars(tmp_path: Path):
    m = _metrics()
    fig = plots.build_metrics_bar_chart(m)
    assert len(fig.axes) == 2  # one panel per modality
    bars = {p.get_gid(): [] for p in fig.axes[0].patches}
    for p in fig.axes[0].patches:
        bars[p.get_gid()].append(p.get_height())
    assert bars["image+text:raw"] == pytest.approx([0.8, 0.7, 0.75])
    assert bars["image+text:random"] == pytest.approx([0.7, 0.6, 0.65])
    legend = [t.get_text() for t in fig.axes[0].get_legend().get_texts()]
    assert legend == ["raw (n=400)", "curated (n=300)", "random (n=300)"]
    from matplotlib.container import BarContainer

    bar_containers = [c for c in fig.axes[0].containers if isinstance(c, BarContainer)]
    assert len(bar_containers) == 3
    segs = bar_containers[0].errorbar.lines[2][0].get_segments()  # raw: vertical bars of +-std
    assert [s[1][1] - s[0][1] for s in segs] == pytest.approx([0.02, 0.04, 0.06])
    assert MEANINGLESS_TEXT not in _suptitle(fig)
    assert MEANINGLESS_TEXT in _suptitle(plots.build_metrics_bar_chart(_metrics(meaningless=True)))  # read from metrics
    _check_png(plots.metrics_bar_chart(m, tmp_path / "m.png"))
    with pytest.raises(ValueError, match="modalities"):
        plots.build_metrics_bar_chart({"config": {}})


def test_per_class_f1_chart(tmp_path: Path):
    raw = {"10": 0.5, "40": 0.9}
    cur = {10: 0.7, 40: 0.8, 50: 0.4}  # int keys and a class missing from raw
    fig = plots.build_per_class_f1_chart(raw, cur, {10: "Old / second-hand books"})
    ax = fig.axes[0]
    widths = {g: [p.get_width() for p in ax.patches if p.get_gid() == g] for g in ("raw", "curated")}
    assert widths == {"raw": pytest.approx([0.5, 0.9, 0.0]), "curated": pytest.approx([0.7, 0.8, 0.4])}
    ticks = [t.get_text() for t in ax.get_yticklabels()]
    assert ticks == ["10 Old / second-hand books", "40", "50"]
    _check_png(plots.per_class_f1_chart(raw, cur, tmp_path / "pc.png", meaningless=True))
    with pytest.raises(ValueError):
        plots.build_per_class_f1_chart({}, {})


def test_confusion_matrix_is_row_normalised(tmp_path: Path):
    cm = np.array([[8, 2, 0], [0, 5, 5], [0, 0, 0]])
    fig = plots.build_confusion_matrix_plot(cm, [10, 20, 30], {20: "Jeux"})
    data = np.asarray(fig.axes[0].images[0].get_array())
    assert data == pytest.approx(np.array([[0.8, 0.2, 0], [0, 0.5, 0.5], [0, 0, 0]]))  # empty row stays 0, no NaN
    assert "20 Jeux" in [t.get_text() for t in fig.axes[0].get_yticklabels()]
    assert "accuracy 0.650" in fig.axes[0].get_title()
    _check_png(plots.confusion_matrix_plot(cm, [10, 20, 30], tmp_path / "cm.png"))
    with pytest.raises(ValueError, match="class_order"):
        plots.confusion_matrix_plot(cm, [10, 20], tmp_path / "bad.png")


def test_class_distribution_chart(tmp_path: Path):
    before = {10: 5000, 20: 120, "30": 40}
    after = {10: 20, 20: 20}
    fig = plots.build_class_distribution_chart(before, after, "sampling")
    ax = fig.axes[0]
    heights = {g: [p.get_height() for p in ax.patches if p.get_gid() == g] for g in ("before", "after")}
    assert heights == {"before": [5000, 120, 40], "after": [20, 20, 0]}
    assert ax.get_yscale() == "log"  # 5000 vs 20: linear would hide the sample
    assert plots.build_class_distribution_chart({1: 30}, {1: 20}, "t").axes[0].get_yscale() == "linear"
    _check_png(plots.class_distribution_chart(before, after, tmp_path / "d.png", "sampling"))


def test_save_replaces_existing_file(tmp_path: Path):
    path = tmp_path / "h.png"
    path.write_bytes(b"old")
    plots.alignment_histogram(np.linspace(0, 1, 50), 0.5, path)
    assert path.read_bytes()[:4] == b"\x89PNG" and [p.name for p in tmp_path.iterdir()] == ["h.png"]
