"""The pages' own scripts (api/static/*.js) run under node against a minimal DOM (tests/web/dom_shim.mjs), and the
pages behind a proxy prefix. From a review of the pages (2026-11-29): each case failed before its fix. No XSS was
found; xss_text_only.mjs keeps it that way (hostile text in every field stays text, nothing goes through innerHTML)."""
from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest
from api_helpers import HashEncoder, build_sample_artifact, make_settings
from fastapi.testclient import TestClient

from api.main import create_app

WEB = Path(__file__).resolve().parent.parent / "web"


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory):
    d = tmp_path_factory.mktemp("pages")
    build_sample_artifact(d, HashEncoder(), rows=20)
    return d


def test_pages_behind_a_proxy_prefix_name_their_assets_relative_to_themselves(artifacts):
    """Behind --root-path /api the page is https://host/api/; it named /static/search.js and /static/style.css,
    outside /api, so it loaded unstyled and did nothing. Assets and links are now relative to the page."""
    app = create_app(make_settings(artifacts), encoder_loader=lambda m, d: HashEncoder())
    with TestClient(app, root_path="/api") as c:
        for page in ("/api/", "/api/curation"):
            r = c.get(page)
            assert r.status_code == 200
            refs = re.findall(r'(?:src|href)="([^"]+)"', r.text)
            assert refs and not [u for u in refs if u.startswith("/")], refs
            for asset in (u for u in refs if u.startswith("static/")):
                assert c.get(f"/api/{asset}").status_code == 200, asset
        assert c.head("/api/").status_code == 200  # monitors and link checkers use HEAD


def _node(script: str) -> str:
    done = subprocess.run(["node", "--experimental-detect-module", str(WEB / script)], capture_output=True,
                          text=True, timeout=60, cwd=WEB)
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout


@pytest.mark.skipif(shutil.which("node") is None, reason="node is not installed")
@pytest.mark.parametrize("script, expect", [
    # behind /api: calls, served images and links under the prefix; an absolute image URL left alone
    ("root_path_prefix.mjs", ["fetched: /api/stats | /api/curation/removals?",
                              "images : /api/images/7_7.jpg | https://cdn.example/images/8_8.jpg", "links  : /api/#record=8"]),
    # /stats answered 503 at page load; once a search succeeds the header and the category filter catch up
    ("search_503_then_ready.mjs", ['banner     : ""', "categories : [ '(All)', 'Piscine (2583)' ]"]),
    # an overloaded server says busy, not "not ready"
    ("search_busy_503.mjs", ['status     : "The search service is busy: 8 queries']),
    # /curation?category=2583 with no removals in that category: the filter stays shown and applied
    ("curation_url_category.mjs", ['select     : "2583"', "after reason change, request: /curation/removals?page=1&page_size=10&category=2583"]),
    # a description cut at 400 characters never splits an emoji
    ("curation_emoji_cut.mjs", ["well-formed UTF-16: true"]),
    # an error after a good page leaves no stale paging next to the empty list
    ("curation_error_after_page.mjs", ['summary  : ""', 'page-info: "" | next disabled: true']),
    # hostile text stays text everywhere
    ("xss_text_only.mjs", ["innerHTML writes: 0"]),
])
def test_page_script(script, expect):
    out = _node(script)
    for line in expect:
        assert line in out, out
