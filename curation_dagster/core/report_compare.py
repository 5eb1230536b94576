"""Compare evaluation reports across models: the latest ``metrics.json`` per model, side by side (markdown).

Every evaluation run writes ``$CURATION_ARTIFACTS_DIR/reports/<version>/metrics.json`` (core/evaluation.py) with
the model that embedded the rows (``"model"``) and, per modality and training set (raw / curated / random), the
mean and std over seeds of accuracy, macro-F1 and weighted-F1. Run the pipeline once per model (e.g.
``CURATION_CLIP_MODEL=openai/clip-vit-base-patch32`` then ``CURATION_CLIP_MODEL=google/siglip-base-patch16-256-multilingual``)
and ``python benchmarks/compare_reports.py`` prints one table with a column per model. The comparison is fair
only on the same held-out test rows: the table says whether the test-set hashes agree.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

METRICS = ("accuracy", "macro_f1", "weighted_f1")
SETS = ("raw", "curated", "random")


@dataclass(frozen=True)
class Report:
    model: str
    version: str
    path: Path
    metrics: dict


def find_reports(reports_dir: Path) -> list[Report]:
    """Every readable reports/*/metrics.json that names its model (unreadable files are skipped)."""
    out = []
    for path in sorted(Path(reports_dir).glob("*/metrics.json")):
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        if isinstance(data, dict) and data.get("model"):
            out.append(Report(str(data["model"]), path.parent.name, path, data))
    return out


def latest_per_model(reports: list[Report]) -> dict[str, Report]:
    """The newest report of each model: by metrics.json mtime, then by version name (names sort by time)."""
    best: dict[str, Report] = {}
    for r in reports:
        key = (r.path.stat().st_mtime_ns, r.version)
        cur = best.get(r.model)
        if cur is None or key > (cur.path.stat().st_mtime_ns, cur.version):
            best[r.model] = r
    return dict(sorted(best.items()))


def _fmt(mean, std=None) -> str:
    if not isinstance(mean, (int, float)):
        return "–"
    return f"{mean:.4f}" + (f" ± {std:.4f}" if isinstance(std, (int, float)) and std else "")


def _get(d: dict, *keys):
    for k in keys:
        if not isinstance(d, dict) or k not in d:
            return None
        d = d[k]
    return d


def compare_table(latest: dict[str, Report]) -> str:
    """A markdown table: one column per model, one row per (modality, training set, metric) + context rows."""
    if not latest:
        return "No evaluation reports found (run the pipeline's evaluation_report first).\n"
    models = list(latest)
    head = "| | " + " | ".join(f"`{m}`" for m in models) + " |\n|---|" + "---|" * len(models) + "\n"
    rows: list[str] = []

    def row(label: str, values: list[str]) -> None:
        rows.append(f"| {label} | " + " | ".join(values) + " |")

    row("report version", [latest[m].version for m in models])
    row("meaningless (random weights)", ["**yes**" if latest[m].metrics.get("meaningless") else "no" for m in models])
    row("test rows", [str(_get(latest[m].metrics, "split", "n_test") or "–") for m in models])
    row("curation kept", [_fmt(_get(latest[m].metrics, "curation", "kept_fraction")) for m in models])
    modalities: list[str] = []
    for m in models:
        for mod in (latest[m].metrics.get("modalities") or {}):
            if mod not in modalities:
                modalities.append(mod)
    for mod in modalities:
        for set_name in SETS:
            for metric in METRICS:
                values = [_fmt(_get(latest[m].metrics, "modalities", mod, "sets", set_name, "mean", metric),
                               _get(latest[m].metrics, "modalities", mod, "sets", set_name, "std", metric))
                          for m in models]
                row(f"{mod} · {set_name} · {metric}", values)
        values = [_fmt(_get(latest[m].metrics, "modalities", mod, "delta_vs_random", "macro_f1", "mean"),
                       _get(latest[m].metrics, "modalities", mod, "delta_vs_random", "macro_f1", "std"))
                  for m in models]
        row(f"{mod} · curated − random · macro_f1", values)
    hashes = {_get(latest[m].metrics, "split", "test_ids_sha256") for m in models}
    note = ("Same held-out test rows for every model (test-set hashes agree)." if len(hashes) == 1 and None not in hashes
            else "**Warning: the models were evaluated on different test rows** (test-set hashes differ or are "
                 "missing): the numbers are not directly comparable.")
    meaningless = [m for m in models if latest[m].metrics.get("meaningless")]
    if meaningless:
        note += " Columns marked meaningless come from random-weight models: their numbers mean nothing."
    return head + "\n".join(rows) + "\n\n" + note + "\n"


def compare_reports_dir(reports_dir: Path) -> str:
    return compare_table(latest_per_model(find_reports(reports_dir)))
