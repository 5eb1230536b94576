"""Memory of image queries against a real uvicorn process (issue 9, item 2).

A 9400x9400 PNG (88 Mpx, just under Pillow's own bomb limit) compresses to a few hundred KB but used to decode to
~1.1 GB per request. Now the pixel count is read from the header and refused (413) before decoding, images under
the cap decode a few at a time and are shrunk at once. 20 such uploads at once must leave the server's peak RSS
within 500 MB of idle.
"""
from __future__ import annotations

import io
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
from PIL import Image, ImageDraw

from api_helpers import running_uvicorn

pytestmark = pytest.mark.e2e


def _status_kb(pid: int, key: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    raise KeyError(key)


def _png(size: tuple[int, int], mode: str) -> bytes:
    img = Image.new(mode, size, 0)
    draw = ImageDraw.Draw(img)
    for x in range(0, size[0], 37):  # some structure, so that it is not a trivially empty image
        draw.line([(x, 0), (size[0] - x, size[1])], fill=255, width=3)
    buf = io.BytesIO()
    img.save(buf, format="PNG", optimize=False)
    return buf.getvalue()


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads VmRSS/VmHWM from /proc")
def test_concurrent_pixel_bombs_keep_server_memory_bounded(sample_artifacts_dir, tmp_path):
    bomb = _png((9400, 9400), "1")  # 88.4 Mpx
    under_cap = _png((3900, 3900), "L")  # 15.2 Mpx: decoded (under the 16 Mpx default), then shrunk
    assert len(bomb) < 2_000_000
    env = {"CURATION_CLIP_MODEL": "tiny-random", "CURATION_DEVICE": "cpu", "CURATION_API_RELOAD_INTERVAL_S": "0",
           "CURATION_API_TORCH_THREADS": "1"}
    unset = ("CURATION_API_MAX_UPLOAD_PIXELS", "CURATION_API_MAX_CONCURRENT_DECODES", "CURATION_API_MAX_UPLOAD_BYTES")
    with running_uvicorn(sample_artifacts_dir, env, tmp_path / "uvicorn.log", unset=unset) as (proc, base):
        # Warm up the image path once (allocations that stay for the process's life), then measure.
        small = io.BytesIO()
        Image.new("RGB", (300, 200), (10, 200, 30)).save(small, format="JPEG")
        assert httpx.post(f"{base}/search/image", files={"file": ("s.jpg", small.getvalue())}, timeout=60).status_code == 200
        try:
            Path(f"/proc/{proc.pid}/clear_refs").write_text("5")  # reset VmHWM to the current RSS
        except OSError:
            pass
        idle_kb = _status_kb(proc.pid, "VmRSS")
        uploads = [bomb] * 20 + [under_cap] * 4
        with httpx.Client(timeout=120) as client, ThreadPoolExecutor(len(uploads)) as pool:
            responses = list(pool.map(
                lambda data: client.post(f"{base}/search/image", files={"file": ("q.png", data, "image/png")}), uploads))
        peak_kb = _status_kb(proc.pid, "VmHWM")
        statuses = [r.status_code for r in responses]
        assert set(statuses) <= {200, 413}, statuses
        assert statuses[:20] == [413] * 20 and statuses[20:] == [200] * 4
        assert "CURATION_API_MAX_UPLOAD_PIXELS" in responses[0].json()["detail"]
        grew_mb = (peak_kb - idle_kb) / 1024
        assert grew_mb < 500, f"peak RSS grew by {grew_mb:.0f} MB over idle ({idle_kb / 1024:.0f} MB)"


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads VmRSS/VmHWM from /proc")
def test_banner_uploads_keep_server_memory_bounded(sample_artifacts_dir, tmp_path):
    """A 2x100,000 PNG is 200 kpx (far under every pixel cap) and ~1 KB, but CLIP's processor resizes the shortest
    edge to 224 first: 224x11,200,000 pixels, several GB, before keeping the centre 224x224. The loader cuts such
    an image to its centre first (core/pixels.centre_window): four at once stay within 300 MB of idle, and answer."""
    banner = _png((2, 100_000), "RGB")
    tall = _png((100_000, 3), "L")
    assert len(banner) < 400_000 and len(tall) < 400_000
    env = {"CURATION_CLIP_MODEL": "tiny-random", "CURATION_DEVICE": "cpu", "CURATION_API_RELOAD_INTERVAL_S": "0",
           "CURATION_API_TORCH_THREADS": "1"}
    with running_uvicorn(sample_artifacts_dir, env, tmp_path / "uvicorn.log") as (proc, base):
        small = io.BytesIO()
        Image.new("RGB", (300, 200), (10, 200, 30)).save(small, format="JPEG")
        assert httpx.post(f"{base}/search/image", files={"file": ("s.jpg", small.getvalue())}, timeout=60).status_code == 200
        try:
            Path(f"/proc/{proc.pid}/clear_refs").write_text("5")
        except OSError:
            pass
        idle_kb = _status_kb(proc.pid, "VmRSS")
        uploads = [banner, tall, banner, tall]
        with httpx.Client(timeout=120) as client, ThreadPoolExecutor(len(uploads)) as pool:
            responses = list(pool.map(
                lambda data: client.post(f"{base}/search/image", files={"file": ("q.png", data, "image/png")}), uploads))
        peak_kb = _status_kb(proc.pid, "VmHWM")
        assert [r.status_code for r in responses] == [200] * 4, [r.text[:200] for r in responses]
        assert all(len(r.json()) == 5 for r in responses)
        grew_mb = (peak_kb - idle_kb) / 1024
        assert grew_mb < 300, f"peak RSS grew by {grew_mb:.0f} MB over idle ({idle_kb / 1024:.0f} MB)"
