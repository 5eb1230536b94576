"""A run worker SIGKILLed during `clip_embeddings` (the `gpu` pool, limit 1) must not wedge the instance.

Against a real `dagster dev` on a fresh DAGSTER_HOME holding a copy of the committed dagster_home/dagster.yaml
(unchanged: the committed settings are what is tested), with CURATION_ALERT_WEBHOOK pointed at a local server:

1. launch curation_job; as soon as the event log shows STEP_START for clip_embeddings (the step then holds the
   only `gpu` slot), SIGKILL the process that runs it (the pid recorded on that event: the run worker);
2. launch a second curation_job at once (it queues behind the dead run's `gpu` slot);
3. within KILL_BOUND_S of the kill: the killed run is FAILURE, the `gpu` pool has no slot claimed by it, and the
   run-failure sensor `curation_failure_alert` has POSTed an alert naming it;
4. the second run reaches SUCCESS.

Before dagster.yaml freed the slots of ended runs (run_monitoring.free_slots_after_run_end_seconds) step 3
failed: the dead run kept its `gpu` slot forever and the second run logged "blocked by limit for pool gpu".
"""
from __future__ import annotations

import os
import shutil
import signal
import time
from pathlib import Path

import pytest

from e2e.dagster_ui import dagster_dev, format_errors, launch_job, run_events, wait_until, workspace_location
from killed_run_helpers import (
    EMBED_STEP, GPU_POOL, AlertWebhook, pool_claims, run_status, sensor_tick_count, step_event,
)

pytestmark = pytest.mark.e2e

REPO = Path(__file__).resolve().parents[1]
FAILURE_SENSOR = "curation_failure_alert"
FAST_EVAL = {"seeds": [0], "modalities": ["image+text"], "num_boost_round": 50}
# Run 1 embeds one image per forward pass without the cache: the step lasts long enough to be killed mid-way
# (run config the Launchpad offers, nothing test-only in the product).
SLOW_EMBED_CONFIG = {"ops": {EMBED_STEP: {"config": {"batch_size": 1, "use_cache": False}},
                             "evaluation_report": {"config": FAST_EVAL}}}
NEXT_RUN_CONFIG = {"ops": {"evaluation_report": {"config": FAST_EVAL}}}
# From the kill: the dead run is FAILURE, its gpu slot is free and the alert is posted within this bound.
KILL_BOUND_S = 110
RUN_TIMEOUT_S = 300


def _env(root: Path, home: Path, webhook_url: str) -> dict[str, str]:
    env = dict(os.environ)
    env.update({
        "DAGSTER_HOME": str(home),
        "CURATION_ARTIFACTS_DIR": str(root / "artifacts"),
        "CURATION_DATA_DIR": str(REPO / "data" / "sample"),
        "CURATION_CLIP_MODEL": "tiny-random",
        "CURATION_DEVICE": "cpu",
        "CURATION_ALERT_WEBHOOK": webhook_url,
        "PYTHONUNBUFFERED": "1",
    })
    env.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    env.setdefault("OMP_NUM_THREADS", "2")
    if os.environ.get("CURATION_MODEL_CACHE"):  # tests/conftest.py gives each session its own
        env["CURATION_MODEL_CACHE"] = os.environ["CURATION_MODEL_CACHE"]
    return env


def test_a_killed_run_fails_frees_the_gpu_slot_alerts_and_the_next_run_succeeds(tmp_path):
    from dagster import DagsterInstance
    from dagster._core.events import DagsterEventType

    home = tmp_path / "dagster_home"
    home.mkdir()
    shutil.copy(REPO / "dagster_home" / "dagster.yaml", home / "dagster.yaml")

    with AlertWebhook() as webhook, \
            dagster_dev(REPO, _env(tmp_path, home, webhook.url), tmp_path / "dagster_dev.log") as server, \
            DagsterInstance.from_config(str(home)) as instance:
        location = workspace_location(server)
        # A run-failure sensor only reports failures after its first tick (that tick sets its cursor).
        wait_until(lambda: sensor_tick_count(server, location, FAILURE_SENSOR) > 0, 120, interval=1.0,
                   what=f"the first tick of {FAILURE_SENSOR}")

        killed = launch_job(server, location, "curation_job", SLOW_EMBED_CONFIG)
        started = wait_until(
            lambda: run_status(instance, killed) in ("FAILURE", "CANCELED", "SUCCESS") and "ended"
            or step_event(instance, killed, DagsterEventType.STEP_START),
            RUN_TIMEOUT_S, interval=0.1, what=f"{EMBED_STEP} to start in run {killed}")
        assert started != "ended", (f"run {killed} ended {run_status(instance, killed)} before {EMBED_STEP} "
                                    f"started:\n{format_errors(run_events(server, killed))}")
        worker_pid = started.pid
        # The in-process executor runs every step in the run worker: the pid on STEP_START is the one on RUN_START.
        run_start = instance.get_records_for_run(killed, of_type=DagsterEventType.RUN_START).records
        assert run_start and run_start[0].event_log_entry.dagster_event.pid == worker_pid, (worker_pid, run_start)
        assert worker_pid != os.getpid()
        os.kill(worker_pid, signal.SIGKILL)
        t_kill = time.monotonic()

        # The kill landed while the step held the gpu slot (otherwise this test would prove nothing).
        assert step_event(instance, killed, DagsterEventType.STEP_SUCCESS) is None, \
            f"{EMBED_STEP} finished before the kill: make the first run's step slower"
        assert killed in pool_claims(instance)["claimed_by"], pool_claims(instance)

        following = launch_job(server, location, "curation_job", NEXT_RUN_CONFIG)

        marks: dict[str, float] = {}

        def settled() -> bool:
            now = time.monotonic() - t_kill
            if "failure" not in marks and run_status(instance, killed) == "FAILURE":
                marks["failure"] = now
            if "slot_freed" not in marks and killed not in pool_claims(instance)["claimed_by"]:
                marks["slot_freed"] = now
            if "alert" not in marks and webhook.alert_for(killed):
                marks["alert"] = webhook.alert_for(killed)[0] - t_kill
            return len(marks) == 3

        try:
            wait_until(settled, KILL_BOUND_S, interval=0.5, what="the killed run to be failed, freed and alerted")
        except TimeoutError as exc:
            pytest.fail(f"{exc}\nwithin {KILL_BOUND_S}s of the SIGKILL of run {killed} (pid {worker_pid}): "
                        f"reached {marks}; run status {run_status(instance, killed)}; "
                        f"{GPU_POOL} pool {pool_claims(instance)}; alerts {[p for _, p in webhook.received]}\n"
                        f"--- dagster dev log ---\n{server.log_tail(40)}")

        alert = webhook.alert_for(killed)[1]
        assert alert["event"] == "dagster_run_failed" and alert["job"] == "curation_job", alert

        status = wait_until(lambda: (s := run_status(instance, following)) in ("SUCCESS", "FAILURE", "CANCELED")
                            and s, RUN_TIMEOUT_S, interval=1.0, what=f"the next run {following} to finish")
        marks["next_success"] = time.monotonic() - t_kill
        print(f"\nkilled run {killed} (pid {worker_pid}); seconds after the kill: "
              + ", ".join(f"{k} {v:.1f}" for k, v in marks.items()))
        assert status == "SUCCESS", (f"next run {following} ended {status}:\n"
                                     f"{format_errors(run_events(server, following))}")
        assert not pool_claims(instance)["claimed_by"], pool_claims(instance)
