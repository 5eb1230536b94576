"""Side-by-side evaluation of models: the latest reports/*/metrics.json per model as a markdown table.

    python benchmarks/compare_reports.py                 # $CURATION_ARTIFACTS_DIR/reports
    python benchmarks/compare_reports.py --reports DIR   # any reports directory

Run the pipeline once per model (CURATION_CLIP_MODEL=...) on the same data and split, then this script.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from curation_dagster.core import settings  # noqa: E402
from curation_dagster.core.report_compare import compare_reports_dir  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reports", type=Path, default=None,
                    help="reports directory (default: $CURATION_ARTIFACTS_DIR/reports)")
    args = ap.parse_args(argv)
    reports = args.reports or settings.artifacts_dir() / "reports"
    print(compare_reports_dir(reports), end="")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
