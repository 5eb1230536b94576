"""The inbox on disk is the truth for every process of the service, and for racing requests within one.

Each test fails on the code before the fix it names: a delta that was per process and replayed once, a duplicate
check made outside the inbox lock, ids unbounded, tombstones and rollbacks ignored by the served results.
"""
from __future__ import annotations

import threading

import pytest
from fastapi.testclient import TestClient

from api.main import create_app
from api_helpers import make_settings
from curation_dagster.core.artifacts import curated_dir, images_dir, load_version
from curation_dagster.core.inbox import ALLOCATED_ID_BASE, Inbox
from test_inbox_api import AUTH, TOKEN, _form, _jpeg, publish_with_inbox


def _app(artifacts, encoder, **kw):
    return TestClient(create_app(make_settings(artifacts, write_token=TOKEN, **kw), encoder_loader=lambda m, d: encoder))


def _add(c, seed, **form):
    return c.post("/records", files={"image": ("p.jpg", _jpeg(seed), "image/jpeg")}, data=_form(**form), headers=AUTH)


def test_two_workers_see_each_others_products_ids_and_duplicates(artifacts_copy, tiny_encoder):
    """uvicorn --workers 2: two processes, two deltas, one inbox (two apps in one process stand for them)."""
    with _app(artifacts_copy, tiny_encoder) as a, _app(artifacts_copy, tiny_encoder) as b:
        assert b.get("/stats").json()["inbox"] == 0  # b has synced before a adds anything
        r = _add(a, 41)
        assert r.status_code == 201, r.text
        rid = r.json()["record_id"]
        assert b.get(f"/record/{rid}").status_code == 200
        assert b.get("/stats").json()["inbox"] == 1
        assert _add(a, 42, productid=4242, title="Lampe de bureau en laiton").status_code == 201
        same_id = _add(b, 43, productid=4242, title="Chaise pliante en hêtre")
        assert same_id.status_code == 409 and same_id.json()["detail"]["evidence"] == "productid"
        again = _add(b, 41)  # the very product a added: a near-duplicate for b too
        assert again.status_code == 409 and again.json()["detail"]["duplicate_of"] == rid
        assert b.delete(f"/records/{rid}", headers=AUTH).status_code == 200
        assert a.get(f"/record/{rid}").status_code == 404
        assert [e.record_id for e in Inbox(artifacts_copy).entries()] == [4242]


def test_identical_uploads_at_once_give_one_201(artifacts_copy, tiny_encoder):
    with _app(artifacts_copy, tiny_encoder) as c:
        results: list[int] = []
        go = threading.Barrier(6)

        def add():
            go.wait()
            results.append(_add(c, 51).status_code)

        threads = [threading.Thread(target=add) for _ in range(6)]
        [t.start() for t in threads]
        [t.join() for t in threads]
        assert sorted(results) == [201] + [409] * 5
        assert len(Inbox(artifacts_copy).entries()) == 1


@pytest.mark.parametrize("productid", [ALLOCATED_ID_BASE, 2**63 - 1])
def test_client_ids_stay_below_the_allocated_range(artifacts_copy, tiny_encoder, productid):
    with _app(artifacts_copy, tiny_encoder) as c:
        assert _add(c, 61, productid=productid).status_code == 422
        r = _add(c, 62)
        assert r.status_code == 201 and r.json()["record_id"] == ALLOCATED_ID_BASE + 1
        assert c.get(f"/record/{r.json()['record_id']}").status_code == 200


def test_a_deleted_productid_is_not_reused_and_a_stale_image_file_is_replaced(artifacts_copy, tiny_encoder):
    stale = images_dir(artifacts_copy) / "image_777_product_777.jpg"
    stale.write_bytes(_jpeg(70))  # left by some earlier row of that name
    with _app(artifacts_copy, tiny_encoder) as c:
        r = _add(c, 71, productid=777)
        assert r.status_code == 201
        assert c.get(r.json()["image_url"]).content == _jpeg(71)
        assert c.delete("/records/777", headers=AUTH).status_code == 200
        again = _add(c, 72, productid=777)
        assert again.status_code == 409 and "deleted" in again.json()["detail"]["message"]
        assert c.get("/record/777").status_code == 404


def test_a_malformed_inbox_entry_is_skipped_not_fatal(artifacts_copy, tiny_encoder):
    with _app(artifacts_copy, tiny_encoder) as c:
        rid = _add(c, 81).json()["record_id"]
    entries = Inbox(artifacts_copy).root / "entries"
    for i, body in enumerate(["{}", "[]", '{"record_id": "abc"}', '{"record_id": true}']):
        bad = entries / f"20260101T000000.00000{i}Z_5_deadbee{i}"
        bad.mkdir()
        (bad / "record.json").write_text(body)
    with _app(artifacts_copy, tiny_encoder) as c:
        assert c.get("/stats").json()["inbox"] == 1
        assert c.get(f"/record/{rid}").status_code == 200


def test_rolling_current_back_brings_inbox_products_back(artifacts_copy, tiny_encoder):
    with _app(artifacts_copy, tiny_encoder) as c:
        svc = c.app.state.service
        v1 = load_version(artifacts_copy).version
        rid = _add(c, 91).json()["record_id"]
        publish_with_inbox(artifacts_copy)
        assert svc.check_for_update()
        assert c.get("/stats").json()["inbox"] == 0 and c.get(f"/record/{rid}").status_code == 200
        (curated_dir(artifacts_copy) / "CURRENT").write_text(v1 + "\n")
        assert svc.check_for_update()
        assert c.get("/stats").json()["inbox"] == 1
        assert c.get(f"/record/{rid}").json()["record_id"] == rid


def test_deleting_a_product_a_served_version_contains_hides_it_at_once(artifacts_copy, tiny_encoder):
    with _app(artifacts_copy, tiny_encoder) as c:
        rid = _add(c, 95).json()["record_id"]
        publish_with_inbox(artifacts_copy)
        assert c.app.state.service.check_for_update()
        query = {"file": ("q.jpg", _jpeg(95), "image/jpeg")}
        assert c.post("/search/image", files=query, data={"top_k": "3"}).json()[0]["record_id"] == rid
        neighbour = c.get(f"/similar/{rid}", params={"top_k": 1}).json()[0]["record_id"]
        picture = c.get(f"/record/{rid}").json()["image_url"]
        assert c.get(picture).status_code == 200
        assert c.delete(f"/records/{rid}", headers=AUTH).json() == {"deleted": rid}
        assert c.get(picture).status_code == 404
        hits = c.post("/search/image", files=query, data={"top_k": "3"}).json()
        assert rid not in [h["record_id"] for h in hits] and len(hits) == 3
        assert c.get(f"/record/{rid}").status_code == 404
        assert c.get(f"/similar/{rid}").status_code == 404
        assert rid not in [h["record_id"] for h in c.get(f"/similar/{neighbour}", params={"top_k": 5}).json()]


def test_an_unwritable_inbox_is_507_not_500(artifacts_copy, tiny_encoder):
    with _app(artifacts_copy, tiny_encoder) as c:
        rid = _add(c, 97).json()["record_id"]
        root = Inbox(artifacts_copy).root
        moved = root.with_name("inbox-moved")
        root.rename(moved)
        root.write_text("a file where the inbox folder should be")
        r = _add(c, 98)
        assert r.status_code == 507 and "stored durably" in r.json()["detail"]
        assert c.delete(f"/records/{rid}", headers=AUTH).status_code == 507
        # reads never fail because of it: the delta keeps what it had
        assert c.post("/search", json={"query": "lampe", "top_k": 3}).status_code == 200
        assert c.get("/stats").json()["inbox"] == 1 and c.get(f"/record/{rid}").status_code == 200
    with _app(artifacts_copy, tiny_encoder) as c:  # and a service starts with it
        assert c.post("/search", json={"query": "lampe", "top_k": 3}).status_code == 200
        assert c.get("/stats").json()["inbox"] == 0
