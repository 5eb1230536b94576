"""The evaluation report: report.md, metrics.json and the plots of an EvaluationResult, written atomically.

The experiment (split, fits, metrics, verdict) is core/evaluation.py; this module only presents its result: on disk
for people and tools (relative PNG links), and inline for the Dagster UI (the same markdown with the plots embedded
as data URIs, rendered by the same function rather than rewritten afterwards).
"""
from __future__ import annotations

import base64
import json
from pathlib import Path

import numpy as np

from .atomic import replace_dir, staging_dir
from .evaluation import METRICS, TRAINING_SETS, _SET_DESCRIPTIONS, MEANINGLESS_NOTE, EvaluationResult, _fmt_delta, _jsonable  # noqa: F401

# File names inside a report directory (the markdown embeds the plots by these relative paths).
REPORT_MD = "report.md"
METRICS_JSON = "metrics.json"
METRICS_PNG = "metrics_by_training_set.png"
PER_CLASS_PNG = "per_class_f1.png"
ALIGNMENT_PNG = "alignment_histogram.png"
CONFUSION_PNG = "confusion_curated.png"


def _name(code: int, category_names: dict[int, str] | None) -> str:
    if category_names and int(code) in category_names:
        return f"{code} {category_names[int(code)]}"
    return str(code)

def render_markdown(result: EvaluationResult, plots: dict[str, str] | None) -> str:
    """report.md: the verdict line first, then tables, the sets, the split, the settings, and the plots.

    ``plots`` maps a plot kind ('metrics', 'per_class', 'confusion', 'alignment') to a path relative to the
    report; None embeds the standard file names of the plots write_report always writes.
    """
    m = result.metrics
    if plots is None:
        plots = {"metrics": METRICS_PNG, "per_class": PER_CLASS_PNG, "confusion": CONFUSION_PNG}
    cfg = m["config"]
    split = m["split"]
    cur = m["curation"]
    lines = [f"**Verdict:** {result.verdict}", ""]
    lines.append("# Downstream evaluation: raw vs curated vs same-size random")
    lines.append("")
    if result.meaningless:
        lines += [
            f"> **{MEANINGLESS_NOTE}.** The embeddings come from a tiny random-weight CLIP (`{m['model']}`) built "
            "for offline smoke runs: this report shows that the pipeline runs end to end and that the experiment "
            "is wired fairly, not whether curation helps.",
            "",
        ]
    lines += [
        f"Model: `{m['model'] or 'unknown'}` · seeds: {cfg['seeds']} · values are mean ± "
        f"{m['std_convention']}; Δ is the per-seed paired difference curated − other. The verdict calls a "
        "difference real only when |mean Δ| exceeds two standard errors of the per-seed Δ — a rough bar with few "
        "seeds, not a significance test.",
        "",
    ]
    if m.get("excluded_unlabelled"):
        lines += [f"{m['excluded_unlabelled']} unlabelled rows (no prdtypecode, e.g. Kaggle's test part) are curated "
                  "and searchable but take no part in this evaluation: a classifier needs labels.", ""]
    for modality, mod in m["modalities"].items():
        red = mod.get("feature_reduction") or {"method": "none"}
        how = (f", PCA of {red['input_dims']} embedding dims fitted on the {red['fit_rows']} raw training rows only, "
               f"explained variance {red['explained_variance']:.3f}") if red["method"] == "pca" else ""
        lines += [f"## Features: {modality} ({mod['n_features']} dims{how})", ""]
        lines += [
            "| training set | rows | accuracy | macro-F1 | weighted-F1 | train s (mean) | rounds (mean) |",
            "|---|---:|---:|---:|---:|---:|---:|",
        ]
        capped = False
        for set_name in TRAINING_SETS:
            s = mod["sets"][set_name]
            cells = [f"{s['mean'][k]:.4f} ± {s['std'][k]:.4f}" for k in METRICS]
            rounds = [v["best_iteration"] for v in s["per_seed"].values()]
            capped |= max(rounds) >= cfg["num_boost_round"]
            lines.append(
                f"| {set_name} | {s['n_train']} | " + " | ".join(cells)
                + f" | {s['train_seconds']:.2f} | {np.mean(rounds):.0f} |"
            )
        lines.append("")
        if capped:
            lines.append(
                f"- some runs used all {cfg['num_boost_round']} rounds without early stopping: the validation loss "
                "was still falling, so more rounds (or a higher learning rate) may score higher for every set."
            )
        for other in ("random", "raw"):
            d = mod[f"delta_vs_{other}"]
            lines.append(
                f"- curated − {other}: accuracy {_fmt_delta(d['accuracy'])}, macro-F1 {_fmt_delta(d['macro_f1'])}, "
                f"weighted-F1 {_fmt_delta(d['weighted_f1'])}"
            )
        missing = {k: v["classes_missing"] for k, v in mod["sets"].items() if v["classes_missing"]}
        if missing:
            lines.append(
                "- classes absent from a training set (the model never predicts them): "
                + "; ".join(f"{k}: {v}" for k, v in missing.items())
            )
        lines.append("")
    if plots.get("metrics"):
        lines += [f"![metrics by training set]({plots['metrics']})", ""]

    lines += ["## The training sets", ""]
    lines += [f"- **{k}** — {v}." for k, v in _SET_DESCRIPTIONS.items()]
    lines += [
        f"- Curation kept {cur['n_curated']} of {cur['n_train_raw']} training rows "
        f"({100 * cur['kept_fraction']:.1f}%)" + (f"; classes lost entirely: {cur['classes_lost']}" if cur["classes_lost"] else "") + ".",
        "",
        "## The split",
        "",
        f"A stratified held-out test set of {split['n_test']} rows ({100 * cfg['test_fraction']:.0f}% per class, "
        f"split seed {split['split_seed']}) drawn from all {split['n_total']} clean rows *before* curation; it is "
        "never curated and never trained on. Curation is re-run on the training rows only. Early stopping uses a "
        f"stratified {100 * cfg['validation_fraction']:.0f}% validation split of each training set itself."
        + (f" Duplicates stay on one side: each of the {split.get('duplicate_groups', 0)} duplicate groups (curation's "
           "own rule, over all rows) is wholly in the test set or wholly in training, so no test row is scored "
           "against a copy of itself in training; the early-stopping splits keep groups whole the same way."
           if split.get("grouped_by_duplicates") else ""),
        f"Test record ids sha256: `{split['test_ids_sha256'][:16]}…`. F1 is averaged over the "
        f"{len(m['eval_classes'])} classes present in the test set"
        + (f" (no test rows: {split['classes_without_test_rows']})" if split["classes_without_test_rows"] else "")
        + ".",
        "",
    ]

    first = next(iter(m["modalities"].values()))
    lines += [f"## Per-class F1 ({next(iter(m['modalities']))}, mean over seeds)", ""]
    lines += ["| class | test rows | raw | curated | random |", "|---|---:|---:|---:|---:|"]
    for c in m["eval_classes"]:
        vals = [first["sets"][s]["per_class_f1"][str(c)] for s in TRAINING_SETS]
        lines.append(
            f"| {_name(c, result.category_names)} | {split['test_class_counts'][str(c)]} | "
            + " | ".join(f"{v:.3f}" for v in vals)
            + " |"
        )
    lines.append("")
    if plots.get("per_class"):
        lines += [f"![per-class F1 raw vs curated]({plots['per_class']})", ""]
    if plots.get("confusion"):
        lines += ["Confusion matrix of the curated model (first seed, row-normalised):", "", f"![confusion]({plots['confusion']})", ""]
    if plots.get("alignment"):
        lines += ["Alignment scores of the clean rows and the threshold(s) used:", "", f"![alignment scores]({plots['alignment']})", ""]

    params = m["lgbm_params"]
    lines += [
        "## Settings",
        "",
        f"LightGBM `lgb.train`, up to {cfg['num_boost_round']} rounds, early stopping after "
        f"{cfg['early_stopping_rounds']} rounds without improvement of the validation multi-logloss. "
        "`min_data_in_leaf`, `num_leaves` and `max_bin` are scaled to the raw training set's size and then used "
        "unchanged for all three sets; only the seed varies. "
        + (f"Features: the embeddings projected on their top {cfg['feature_dims']} principal components "
           "(`feature_dims`), fitted on the raw training rows only — the test rows never influence the projection, "
           "and all three sets share it (0 = the full embedding). "
           if cfg.get("feature_dims") else "Features: the full embeddings (`feature_dims` = 0, no reduction). ")
        + f"Evaluation settings: `{json.dumps({k: v for k, v in cfg.items() if k not in ('modalities',)}, sort_keys=True)}`. "
        "Parameters:",
        "",
        "```json",
        json.dumps({k: v for k, v in params.items() if k not in ("verbosity",)}, indent=1, sort_keys=True),
        "```",
        "",
    ]
    return "\n".join(lines)

def write_report(
    result: EvaluationResult,
    out_dir: Path,
    *,
    alignment_scores: np.ndarray | None = None,
    alignment_thresholds: dict | None = None,
) -> dict[str, Path]:
    """Write report.md, metrics.json and the PNG plots into ``out_dir`` atomically.

    Everything goes to a sibling temp directory first, which is renamed into place once complete (an existing
    ``out_dir`` is replaced). The alignment histogram is written only when ``alignment_scores`` is given.
    ``result.markdown`` is updated to the exact text written to report.md. Returns name -> final path.
    """
    from curation_dagster.core import plots as P  # local: keeps matplotlib off the import path of evaluation

    out_dir = Path(out_dir)
    with staging_dir(out_dir.parent, prefix=out_dir.name) as tmp:
        primary = next(iter(result.metrics["modalities"]))
        sets = result.metrics["modalities"][primary]["sets"]
        files = {
            "metrics_plot": P.metrics_bar_chart(result.metrics, tmp / METRICS_PNG, meaningless=result.meaningless),
            "per_class_plot": P.per_class_f1_chart(
                sets["raw"]["per_class_f1"],
                sets["curated"]["per_class_f1"],
                tmp / PER_CLASS_PNG,
                category_names=result.category_names,
                meaningless=result.meaningless,
            ),
            "confusion_plot": P.confusion_matrix_plot(
                result.confusion,
                result.class_order,
                tmp / CONFUSION_PNG,
                category_names=result.category_names,
                meaningless=result.meaningless,
            ),
        }
        plot_refs = {"metrics": METRICS_PNG, "per_class": PER_CLASS_PNG, "confusion": CONFUSION_PNG}
        if alignment_scores is not None:
            files["alignment_plot"] = P.alignment_histogram(
                np.asarray(alignment_scores),
                alignment_thresholds,
                tmp / ALIGNMENT_PNG,
                title="alignment score (clean rows)",
                meaningless=result.meaningless,
            )
            plot_refs["alignment"] = ALIGNMENT_PNG
        result.markdown = render_markdown(result, plot_refs)
        (tmp / REPORT_MD).write_text(result.markdown, encoding="utf-8")
        files["report"] = tmp / REPORT_MD
        payload = {**result.metrics, "headline": result.headline}
        (tmp / METRICS_JSON).write_text(
            json.dumps(_jsonable(payload), indent=1, sort_keys=False, allow_nan=False), encoding="utf-8"
        )
        files["metrics"] = tmp / METRICS_JSON
        replace_dir(tmp, out_dir)
    result.plot_files = plot_refs
    return {k: out_dir / Path(v).name for k, v in files.items()}


def inline_markdown(result: EvaluationResult, report_dir: Path) -> str:
    """The report's markdown with its plots embedded (data URIs), for the Dagster UI, which cannot follow the
    relative links of report.md; rendered by render_markdown like the file, not rewritten from it."""
    plots = {}
    for kind, name in getattr(result, "plot_files", {}).items():
        path = Path(report_dir) / name
        if path.is_file():
            plots[kind] = "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode()
    return render_markdown(result, plots)
