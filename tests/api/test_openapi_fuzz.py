"""The OpenAPI document tells the truth (issue 9, item 9): schemathesis, every check, over every real route.

Bounded: a small curated version embedded with the HashEncoder stand-in (the model does not matter for what
the schema promises), a few examples per operation, no example database.
"""
from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import pytest
from api_helpers import HashEncoder, build_sample_artifact, make_settings
from fastapi.testclient import TestClient

schemathesis = pytest.importorskip("schemathesis")
from hypothesis import HealthCheck, settings  # noqa: E402  (after the importorskip)
from schemathesis.config import SchemathesisConfig  # noqa: E402

from api.main import create_app  # noqa: E402

# Built at import: schemathesis reads the schema at collection and runs the app's lifespan itself.
_ARTIFACTS = Path(tempfile.mkdtemp(prefix="openapi-fuzz-"))
build_sample_artifact(_ARTIFACTS, HashEncoder(), rows=40)
_TOKEN = "fuzz-write-token"
app = create_app(make_settings(_ARTIFACTS, max_upload_bytes=200_000, write_token=_TOKEN),
                 encoder_loader=lambda m, d: HashEncoder())
# Every check runs. A multipart "binary" field is any byte string to the generator, but the upload is documented
# as a JPEG, PNG or WebP image of bounded size and pixels: the documented 413/415 are correct answers to such data.
# Adding a product can also be refused for what only the server can judge, as documented: a near-duplicate (409),
# a title that cleaning empties or image and text that do not match (422). The write routes are called with the
# token (schemathesis also checks that they refuse calls without it).
_CONFIG = SchemathesisConfig.from_dict({
    "headers": {"Authorization": f"Bearer {_TOKEN}"},
    "checks": {"positive_data_acceptance": {"expected-statuses": ["2xx", "404", "413", "415"]}},
    "operations": [{"include-path-regex": "^/records", "checks": {"positive_data_acceptance": {
        "expected-statuses": ["2xx", "404", "409", "413", "415", "422"]}}}],
})
schema = schemathesis.openapi.from_asgi("/openapi.json", app, config=_CONFIG)


@pytest.fixture(scope="module", autouse=True)
def _cleanup():
    with TestClient(app):  # the service is up for the whole module
        yield
    shutil.rmtree(_ARTIFACTS, ignore_errors=True)


@schema.parametrize()
@settings(max_examples=20, deadline=None, database=None, derandomize=True,
          suppress_health_check=list(HealthCheck))
def test_openapi_contract(case):
    case.call_and_validate()
