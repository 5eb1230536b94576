"""Jobs, the schedule and the sensors: how the pipeline runs without someone pressing a button."""
import hashlib
import json
import os
import urllib.request
from pathlib import Path

import dagster as dg

from .core.inbox import Inbox
from .resources import CurationPaths

curation_job = dg.define_asset_job(
    "curation_job",
    selection=dg.AssetSelection.all(),
    description="Every asset: source → sample → images → clean → embeddings → curated artifact → evaluation report.",
)

SCHEDULE_CRON_ENV = "CURATION_SCHEDULE_CRON"
DEFAULT_CRON = "0 3 * * *"

daily_curation = dg.ScheduleDefinition(
    name="daily_curation",
    job=curation_job,
    cron_schedule=os.environ.get(SCHEDULE_CRON_ENV, "").strip() or DEFAULT_CRON,
    execution_timezone="UTC",
    default_status=dg.DefaultScheduleStatus.STOPPED,
    description=f"Re-curates everything on a cron (${SCHEDULE_CRON_ENV}, default '{DEFAULT_CRON}' UTC). Off by "
                "default: switch it on in the UI (Automation → daily_curation) or `dagster schedule start daily_curation`.",
)


# ----------------------------------------------------------------------------------------- source sensor

def source_fingerprint(data_dir: Path) -> dict:
    """Cheap fingerprint of every file under the source dir: (relative path, size, mtime_ns) → one digest.

    Sizes and mtimes catch new, removed and rewritten files without reading 100k images; the CSVs are also listed
    by name so the run request can say which ones changed.
    """
    data_dir = Path(data_dir)
    h = hashlib.sha256()
    n = 0
    csvs = {}
    if data_dir.is_dir():
        for root, dirs, files in os.walk(data_dir):
            dirs.sort()
            for name in sorted(files):
                p = Path(root) / name
                try:
                    st = p.stat()
                except OSError:
                    continue
                rel = p.relative_to(data_dir).as_posix()
                entry = f"{rel}\0{st.st_size}\0{st.st_mtime_ns}"
                h.update(entry.encode())
                h.update(b"\n")
                n += 1
                if name.lower().endswith(".csv") and Path(root) == data_dir:
                    csvs[rel] = f"{st.st_size}:{st.st_mtime_ns}"
    return {"digest": h.hexdigest(), "n_files": n, "csv": csvs}


def _describe_change(old: dict | None, new: dict) -> str:
    if not old:
        return f"first fingerprint of the source ({new['n_files']} files)"
    parts = []
    changed = sorted(k for k in new["csv"] if old.get("csv", {}).get(k) != new["csv"][k])
    removed = sorted(set(old.get("csv", {})) - set(new["csv"]))
    if changed:
        parts.append("CSV new/changed: " + ", ".join(changed))
    if removed:
        parts.append("CSV removed: " + ", ".join(removed))
    diff = new["n_files"] - old.get("n_files", 0)
    parts.append(f"files: {old.get('n_files', 0)} → {new['n_files']} ({diff:+d})")
    if old.get("inbox") != new.get("inbox"):
        parts.append(f"API inbox: {old.get('inbox', '0:')} → {new.get('inbox')} (entries:hash)")
    return "; ".join(parts)


@dg.sensor(
    name="source_files_sensor",
    job=curation_job,
    minimum_interval_seconds=60,
    default_status=dg.DefaultSensorStatus.STOPPED,
    description="Requests a curation run when files under CURATION_DATA_DIR are added, removed or rewritten, or "
                "products are added to or deleted from the API's inbox "
                "(cursor = fingerprint of every file's path, size and mtime).",
)
def source_files_sensor(context: dg.SensorEvaluationContext, paths: CurationPaths):
    data_dir = paths.data
    new = source_fingerprint(data_dir)
    new["inbox"] = Inbox(paths.artifacts).fingerprint()  # products added through the API
    new["digest"] = hashlib.sha256((new["digest"] + new["inbox"]).encode()).hexdigest()
    old = json.loads(context.cursor) if context.cursor else None
    if old and old.get("digest") == new["digest"]:
        return dg.SkipReason(f"no change under {data_dir} ({new['n_files']} files)")
    why = _describe_change(old, new)
    context.update_cursor(json.dumps(new))
    return dg.RunRequest(run_key=new["digest"], tags={"curation/trigger": "source_change",
                                                       "curation/change": why[:200]})


# ----------------------------------------------------------------------------------------- failure alerts

ALERT_WEBHOOK_ENV = "CURATION_ALERT_WEBHOOK"


def post_alert(url: str, payload: dict, timeout: float = 5.0) -> int:
    req = urllib.request.Request(url, data=json.dumps(payload).encode(), method="POST",
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=timeout) as resp:  # noqa: S310 - the URL is the operator's own setting
        return resp.status


@dg.run_failure_sensor(
    name="curation_failure_alert",
    default_status=dg.DefaultSensorStatus.RUNNING,
    description=f"Logs every failed run; when ${ALERT_WEBHOOK_ENV} is set, POSTs a short JSON alert to it.",
)
def curation_failure_alert(context: dg.RunFailureSensorContext):
    run = context.dagster_run
    error = context.failure_event.message if context.failure_event else "unknown error"
    if error and "marked as failed from outside" in error:
        # A killed run worker: the engine event just before the failure says what happened (e.g. SIGKILL).
        recs = context.instance.get_records_for_run(run.run_id, of_type=dg.DagsterEventType.ENGINE_EVENT,
                                                    ascending=False, limit=1).records
        if recs and recs[0].event_log_entry.message:
            error = f"{error} {recs[0].event_log_entry.message}"
    payload = {"event": "dagster_run_failed", "job": run.job_name, "run_id": run.run_id,
               "error": (error or "")[:2000], "tags": dict(run.tags)}
    context.log.error(f"run {run.run_id} of {run.job_name} failed: {error}")
    url = os.environ.get(ALERT_WEBHOOK_ENV, "").strip()
    if url:
        try:
            status = post_alert(url, payload)
            context.log.info(f"alert posted to {ALERT_WEBHOOK_ENV} (HTTP {status})")
        except Exception as exc:  # an unreachable webhook must not crash the sensor daemon
            context.log.error(f"could not post the alert to {ALERT_WEBHOOK_ENV}: {exc}")


JOBS = [curation_job]
SCHEDULES = [daily_curation]
SENSORS = [source_files_sensor, curation_failure_alert]
