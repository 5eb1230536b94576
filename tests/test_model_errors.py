"""A model that cannot be loaded fails the run once, with one message that says how to fix it."""
from __future__ import annotations

import dagster as dg

from curation_dagster.checks import ALL_CHECKS
from curation_dagster.definitions import ASSETS
from curation_dagster.resources import build_resources
from pipeline_helpers import SAMPLE_DIR


def test_missing_model_fails_once_with_one_clear_message(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # no network here anyway: fail fast, as an offline user would
    model = "no-such-org/no-such-clip"
    resources = build_resources(data_dir=str(SAMPLE_DIR), artifacts_dir=str(tmp_path), model=model, device="cpu")
    selection = dg.AssetSelection.assets("clip_embeddings").upstream() | dg.AssetSelection.assets("clean_rejections")
    result = dg.materialize([*ASSETS, *ALL_CHECKS], resources=resources, selection=selection,
                            run_config={"ops": {"sampled_products": {"config": {"per_class_cap": 1}}}},
                            instance=dg.DagsterInstance.ephemeral(), raise_on_error=False)
    assert not result.success
    failures = [e for e in result.all_events if e.event_type_value == "STEP_FAILURE"]
    assert [e.step_key for e in failures] == ["clip_embeddings"]
    error = failures[0].event_specific_data.error
    text = error.message + "".join(error.stack) + str(error.cause or "")
    assert text.count(f"cannot load model {model!r}") == 1, text
    assert f"hf download {model}" in text and "huggingface-cli" not in text
    assert "CURATION_CLIP_MODEL=tiny-random" in text
    assert error.cause is None  # no chained copy of the same failure
