"""Small helpers that turn stage results into Dagster UI metadata (tables, counts, inline plots)."""

import base64
from pathlib import Path

import dagster as dg
import polars as pl


def md_table(df: pl.DataFrame, max_rows: int = 20, max_width: int = 60) -> str:
    if df.is_empty():
        return "_(empty)_"
    df = df.head(max_rows)
    cols = df.columns

    def cell(v) -> str:
        s = "" if v is None else str(v)
        s = s.replace("|", "\\|").replace("\n", " ")
        return s if len(s) <= max_width else s[: max_width - 1] + "…"

    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in df.iter_rows()]
    return "\n".join(lines)


def counts_by(df: pl.DataFrame, col: str) -> dict[str, int]:
    if df.is_empty():
        return {}
    return {str(k): int(v) for k, v in df.group_by(col).len().sort(col).iter_rows()}


def image_md(path: Path, title: str = "") -> dg.MetadataValue:
    """A PNG shown inline in the asset's materialization page (and its path for download)."""
    data = base64.b64encode(Path(path).read_bytes()).decode()
    return dg.MetadataValue.md(f"{title}\n\n![{Path(path).name}](data:image/png;base64,{data})\n\n`{path}`")


def rejection_metadata(rejections: pl.DataFrame, n_in: int, n_out: int) -> dict:
    return {
        "rows_in": dg.MetadataValue.int(n_in),
        "rows_out": dg.MetadataValue.int(n_out),
        "rows_rejected": dg.MetadataValue.int(rejections.height),
        "rejected_by_reason": dg.MetadataValue.json(counts_by(rejections, "reason")),
        "rejections_preview": dg.MetadataValue.md(md_table(rejections.select("record_id", "reason", "detail"))),
    }


def selected_outputs(context: dg.AssetExecutionContext, outputs: list[dg.Output]):
    """The outputs of a subsettable multi-asset that this run selected (`--select '+clean_products'` picks one)."""
    selected = context.selected_output_names
    return [o for o in outputs if o.output_name in selected]
