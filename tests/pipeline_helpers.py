"""Helpers shared by test modules (importable: tests/ is on sys.path through the root conftest)."""
from __future__ import annotations

import io
import struct
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SAMPLE_DIR = REPO / "data" / "sample"


SIDE_TABLES = ("raw_rejections", "clean_rejections", "curation_removals")


def up_to_publication():
    """Every asset up to and including publication, with the side tables the checks read (the multi-assets are
    subsettable, so their other outputs are not pulled in by themselves)."""
    import dagster as dg

    return dg.AssetSelection.assets("published_curated_version").upstream() | dg.AssetSelection.assets(*SIDE_TABLES)


FAST_EVAL = {"seeds": [0], "modalities": ["image+text"], "num_boost_round": 60}


def materialize_all(data_dir: Path, artifacts_dir: Path, *, run_config: dict | None = None, selection=None,
                    instance=None, model: str = "tiny-random", run_lease: str = "process"):
    """The whole graph through Dagster's materialize(), with a tiny random model (tiny-random by default, or
    tiny-random-siglip) and a fast evaluation."""
    import dagster as dg

    from curation_dagster.checks import ALL_CHECKS
    from curation_dagster.definitions import ASSETS
    from curation_dagster.resources import build_resources

    # (run config for an unselected asset is an error, so the fast evaluation is only set for full runs)
    config = {"ops": {"evaluation_report": {"config": dict(FAST_EVAL)}}} if selection is None else {"ops": {}}
    for op, cfg in (run_config or {}).get("ops", {}).items():
        config["ops"].setdefault(op, {"config": {}})["config"].update(cfg["config"])
    resources = build_resources(data_dir=str(data_dir), artifacts_dir=str(artifacts_dir), model=model,
                                device="cpu", run_lease=run_lease)
    return dg.materialize([*ASSETS, *ALL_CHECKS], resources=resources, run_config=config, selection=selection,
                          instance=instance, raise_on_error=True)


def many_scans_jpeg(side: int, scans: int) -> bytes:
    """A valid progressive greyscale JPEG (side x side, flat grey) whose smallest AC scan is repeated ``scans``
    times: ~31 bytes per scan, and libjpeg walks every block of the image for each scan."""
    from PIL import Image

    buf = io.BytesIO()
    Image.new("L", (side, side), 128).save(buf, "JPEG", progressive=True, quality=90)
    d = buf.getvalue()
    i, segs, sos = 2, [], []
    while True:
        m = d[i + 1]
        if m == 0xD9:
            break
        end = i + 2 + struct.unpack(">H", d[i + 2:i + 4])[0]
        if m == 0xDA:  # the scan header and its entropy-coded data, up to the next marker
            while not (d[end] == 0xFF and d[end + 1] != 0x00 and not 0xD0 <= d[end + 1] <= 0xD7):
                end += 1
            sos.append(d[i:end])
        segs.append(d[i:end])
        i = end
    return d[:2] + b"".join(segs) + min(sos, key=len) * scans + b"\xff\xd9"
