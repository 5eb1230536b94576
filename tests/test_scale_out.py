"""Scale-out, exercised for real: a Postgres-backed instance, celery workers, and the Kubernetes config of docs/deploy.md.

1. ``test_postgres_instance_*``: a real PostgreSQL server (initdb + pg_ctl into a temp dir, free port) and an
   instance built from the committed dagster_home/dagster.postgres.yaml (storage from DAGSTER_PG_URL): the ingest
   part of the graph materialized on the bundled sample lands its run and events in Postgres.
2. ``test_sharded_job_on_two_celery_workers``: Redis (broker + results), TWO ``dagster-celery worker`` processes
   and the same Postgres instance; ingest_job → embedding_shards_job (one run per shard) → curate_from_shards_job
   of curation_dagster.definitions_sharded with CURATION_EXECUTOR=celery, each run launched by the
   ``dagster job execute`` CLI. Checks that shard steps ran on both workers (the engine event each worker writes
   names it) and that the published curated version equals a single-process run of the unsharded graph.
3. ``test_k8s_*``: the k8s_job_executor / K8sRunLauncher configuration that docs/deploy.md shows is validated by
   dagster-k8s itself, and the pod spec of a shard step carries the GPU request/limits, node selector, tolerations
   and the `gpu` pool.

A service that cannot be found or started skips its tests with the reason.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import yaml

from scale_out_helpers import (
    REPO, SAMPLE_DIR, CeleryWorker, ServiceUnavailable, celery_app, ping_workers, postgres_server, queued_messages,
    redis_server, set_consuming, wait_for,
)

PG_YAML = REPO / "dagster_home" / "dagster.postgres.yaml"
PER_CLASS_CAP = 3
FAST_EVAL = {"seeds": [0], "modalities": ["image+text"], "num_boost_round": 60}
N_SHARDS = 4  # what the sharded code location is told (CURATION_EMBED_SHARDS) in the workers and the CLI runs
GPU_SLOTS = 2  # the `gpu` pool on the test instance: one embedding step per worker
RUN_TIMEOUT_S = 420  # one `dagster job execute` (generous: a loaded 2-core machine; typical is well under a minute)


def _require(module: str, extra: str):
    try:
        return __import__(module)
    except ImportError as exc:
        pytest.skip(f"{module} not importable ({exc}); install the extra: pip install -e '.[{extra}]'")


@pytest.fixture(scope="module")
def pg_url():
    _require("dagster_postgres", "postgres")
    try:
        with postgres_server() as url:
            yield url
    except ServiceUnavailable as exc:
        pytest.skip(f"PostgreSQL unavailable: {exc}")


def _dagster_url(pg_url: str) -> str:
    """DAGSTER_PG_URL as docs/deploy.md writes it: the psycopg2 driver named (SQLAlchemy >= 2.1 defaults to psycopg 3)."""
    return pg_url.replace("postgresql://", "postgresql+psycopg2://", 1)


def _home(tmp_path: Path) -> Path:
    """A fresh DAGSTER_HOME holding an unchanged copy of the committed dagster.postgres.yaml."""
    home = tmp_path / "dagster_home"
    home.mkdir()
    shutil.copy(PG_YAML, home / "dagster.yaml")
    return home


def _pg_rows(url: str, sql: str, *args) -> list[tuple]:
    import psycopg2

    conn = psycopg2.connect(url)
    try:
        with conn.cursor() as cur:
            cur.execute(sql, args)
            return cur.fetchall()
    finally:
        conn.close()


# --- 1. Postgres instance -------------------------------------------------------------------------------------

def test_postgres_yaml_keeps_the_default_instance_settings():
    """dagster.postgres.yaml only swaps the storage: concurrency, run monitoring and telemetry are the defaults'."""
    default = yaml.safe_load((REPO / "dagster_home" / "dagster.yaml").read_text())
    pg = yaml.safe_load(PG_YAML.read_text())
    assert "storage" not in default  # SQLite stays the default for `dagster dev` and the README commands
    assert pg["storage"] == {"postgres": {"postgres_url": {"env": "DAGSTER_PG_URL"}}}
    assert {k: v for k, v in pg.items() if k != "storage"} == default


def test_postgres_instance_stores_runs_and_events(tmp_path, pg_url, monkeypatch):
    import dagster as dg
    from dagster_postgres import PostgresEventLogStorage, PostgresRunStorage, PostgresScheduleStorage

    from curation_dagster.definitions import ASSETS
    from curation_dagster.resources import build_resources

    home = _home(tmp_path)
    monkeypatch.setenv("DAGSTER_PG_URL", _dagster_url(pg_url))
    with dg.DagsterInstance.from_config(str(home)) as instance:
        assert isinstance(instance.run_storage, PostgresRunStorage)
        assert isinstance(instance.event_log_storage, PostgresEventLogStorage)
        assert isinstance(instance.schedule_storage, PostgresScheduleStorage)
        resources = build_resources(data_dir=str(SAMPLE_DIR), artifacts_dir=str(tmp_path / "artifacts"),
                                    model="tiny-random", device="cpu")
        result = dg.materialize(ASSETS, selection=dg.AssetSelection.groups("ingest"), instance=instance,
                                resources=resources,
                                run_config={"ops": {"sampled_products": {"config": {"per_class_cap": PER_CLASS_CAP}}}})
        assert result.success
        run_id = result.run_id
        n_clean = len(result.asset_value("clean_products"))

    # Straight from the database: the run and its events are rows in Postgres (not in a local SQLite file).
    assert _pg_rows(pg_url, "SELECT status FROM runs WHERE run_id = %s", run_id) == [("SUCCESS",)]
    materialized = {r[0] for r in _pg_rows(
        pg_url, "SELECT asset_key FROM event_logs WHERE run_id = %s AND dagster_event_type = %s",
        run_id, "ASSET_MATERIALIZATION")}
    assert {"raw_products", "sampled_products", "product_images", "clean_products"} <= {
        dg.AssetKey.from_db_string(k).to_user_string() for k in materialized}, materialized
    assert _pg_rows(pg_url, "SELECT count(*) FROM event_logs WHERE run_id = %s", run_id)[0][0] > 10
    assert not list((home).glob("**/*.db")), "an SQLite file was created next to the Postgres instance"

    # A second process-independent instance (another webserver/daemon/worker) sees the same history.
    with dg.DagsterInstance.from_config(str(home)) as again:
        rec = again.get_latest_materialization_event(dg.AssetKey("clean_products"))
        assert rec is not None and rec.run_id == run_id
        assert rec.asset_materialization.metadata  # the asset's metadata travelled too
    assert n_clean > 0


# --- 2. celery workers ----------------------------------------------------------------------------------------

def _env(home: Path, artifacts: Path, pg_url: str, broker: str, backend: str) -> dict[str, str]:
    env = dict(os.environ)
    env.update({
        "DAGSTER_HOME": str(home),
        "DAGSTER_PG_URL": _dagster_url(pg_url),
        "CURATION_EXECUTOR": "celery",
        "CURATION_CELERY_BROKER": broker,
        "CURATION_CELERY_BACKEND": backend,
        "CURATION_EMBED_SHARDS": str(N_SHARDS),
        "CURATION_DATA_DIR": str(SAMPLE_DIR),
        "CURATION_ARTIFACTS_DIR": str(artifacts),
        "CURATION_CLIP_MODEL": "tiny-random",
        "CURATION_DEVICE": "cpu",
        # tests/conftest.py: fp32 everywhere (1e-5 comparisons) and this session's private model cache
        "CURATION_PRECISION": os.environ.get("CURATION_PRECISION", "fp32"),
        "OMP_NUM_THREADS": "1",
        "OMP_WAIT_POLICY": "PASSIVE",
        "PYTHONUNBUFFERED": "1",
    })
    if os.environ.get("CURATION_MODEL_CACHE"):
        env["CURATION_MODEL_CACHE"] = os.environ["CURATION_MODEL_CACHE"]
    env.pop("CURATION_ALERT_WEBHOOK", None)
    return env


def _cli_run(job: str, env: dict[str, str], config: dict, log: Path, tags: dict | None = None) -> subprocess.Popen:
    cfg = log.with_suffix(".yaml")
    cfg.write_text(yaml.safe_dump(config))
    cmd = [str(Path(sys.executable).parent / "dagster"), "job", "execute", "-m", "curation_dagster.definitions_sharded",
           "-j", job, "-c", str(cfg)]
    if tags:
        cmd += ["--tags", json.dumps(tags)]
    fh = open(log, "wb")
    proc = subprocess.Popen(cmd, env=env, stdout=fh, stderr=subprocess.STDOUT, cwd=str(REPO), start_new_session=True)
    proc.log = log  # type: ignore[attr-defined]
    fh.close()
    return proc


def _finish(proc: subprocess.Popen, what: str, workers: list[CeleryWorker], timeout: float = RUN_TIMEOUT_S) -> None:
    try:
        rc = proc.wait(timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, 9)
        proc.wait(10)
        rc = f"timeout after {timeout}s"
    if rc != 0:
        tail = "\n".join(Path(proc.log).read_text(errors="replace").splitlines()[-40:])  # type: ignore[attr-defined]
        pytest.fail(f"{what}: `dagster job execute` ended {rc}\n{tail}\n" + "\n".join(w.log_tail() for w in workers))


def _celery_hosts(instance, run_id: str) -> dict[str, set[str]]:
    """step key → the celery worker hostnames that executed it (the engine event each worker writes first)."""
    from dagster._core.events import DagsterEventType

    hosts: dict[str, set[str]] = {}
    for rec in instance.get_records_for_run(run_id, of_type=DagsterEventType.ENGINE_EVENT, limit=1000).records:
        ev = rec.event_log_entry.dagster_event
        md = ev.engine_event_data.metadata if ev and ev.engine_event_data else {}
        if "Celery worker" in md:
            hosts.setdefault(ev.step_key, set()).add(md["Celery worker"].value)
    return hosts


def test_sharded_job_on_two_celery_workers(tmp_path, pg_url):
    _require("dagster_celery", "celery")
    import dagster as dg

    from pipeline_helpers import materialize_all, up_to_publication

    from curation_dagster.core.artifacts import load_version, read_current_version_name

    t0 = time.monotonic()
    try:
        broker_cm = redis_server()
        redis_url = broker_cm.__enter__()
    except ServiceUnavailable as exc:
        pytest.skip(f"Redis unavailable: {exc}")
    workers: list[CeleryWorker] = []
    procs: list[subprocess.Popen] = []
    try:
        broker, backend = f"{redis_url}/0", f"{redis_url}/1"
        home, artifacts = _home(tmp_path), tmp_path / "artifacts"
        env = _env(home, artifacts, pg_url, broker, backend)
        (home / "celery.yaml").write_text(yaml.safe_dump({"execution": {"config": {
            "broker": broker, "backend": backend,
            "config_source": {"worker_prefetch_multiplier": 1, "task_acks_late": True}}}}))

        instance_env = {"DAGSTER_PG_URL": _dagster_url(pg_url)}
        old = {k: os.environ.get(k) for k in instance_env}
        os.environ.update(instance_env)
        instance = dg.DagsterInstance.from_config(str(home))
        for k, v in old.items():
            if v is None:
                os.environ.pop(k)
            else:
                os.environ[k] = v
        # Two embedding steps may run at once (one per worker): the operator's `dagster instance concurrency set`.
        instance.event_log_storage.set_concurrency_slots("gpu", GPU_SLOTS)

        workers = [CeleryWorker(n, home / "celery.yaml", env, tmp_path / f"{n}.log") for n in ("w1", "w2")]
        app = celery_app(broker, backend)
        names = [w.hostname for w in workers]

        def both_up():
            for w in workers:
                if w.proc.poll() is not None:
                    pytest.fail(f"celery worker {w.name} exited {w.proc.returncode}\n{w.log_tail()}")
            return ping_workers(app, names) == set(names)

        wait_for(both_up, 180, interval=1.0, what="both celery workers to answer ping")
        t_workers = time.monotonic()

        ingest = _cli_run("ingest_job", env, {"ops": {"sampled_products": {"config": {"per_class_cap": PER_CLASS_CAP}}}},
                          tmp_path / "ingest.log")
        procs.append(ingest)
        _finish(ingest, "ingest_job", workers)
        t_ingest = time.monotonic()

        # Shards: hold both workers' consumers while the shard runs enqueue their steps (the `gpu` pool lets 2 of the
        # 4 steps in at once; the other 2 runs wait for a slot), then release both consumers at once: the queue then
        # holds 2 shard steps and a worker takes one step at a time (prefetch 1, acks late), so each worker gets
        # one of them whatever the timings.
        set_consuming(app, names, "dagster", on=False)
        shard_runs = [_cli_run("embedding_shards_job", env, {}, tmp_path / f"shard{s}.log",
                               tags={"dagster/partition": str(s)}) for s in range(N_SHARDS)]
        procs += shard_runs

        def all_queued():
            for p in shard_runs:
                if p.poll() is not None:
                    _finish(p, "a shard run (before its step was taken)", workers)
            return queued_messages(redis_url) >= GPU_SLOTS

        wait_for(all_queued, RUN_TIMEOUT_S, interval=0.5, what=f"{GPU_SLOTS} shard steps in the celery queue")
        t_queued = time.monotonic()
        app.control.add_consumer("dagster", destination=names)  # both at once (broadcast)
        set_consuming(app, names, "dagster", on=True)  # confirmed by each worker (re-sent if one missed it)
        for s, p in enumerate(shard_runs):
            _finish(p, f"embedding_shards_job partition {s}", workers)
        t_shards = time.monotonic()

        curate = _cli_run("curate_from_shards_job", env, {"ops": {"evaluation_report": {"config": FAST_EVAL}}},
                          tmp_path / "curate.log")
        procs.append(curate)
        _finish(curate, "curate_from_shards_job", workers)
        t_curate = time.monotonic()

        # Where each step ran (the Postgres event log the workers wrote to).
        jobs = ("ingest_job", "embedding_shards_job", "curate_from_shards_job")
        runs = [r for r in instance.get_runs() if r.job_name in jobs]  # (the Postgres server is shared by this module)
        by_job: dict[str, list] = {}
        for r in runs:
            by_job.setdefault(r.job_name, []).append(r)
        assert {j: len(v) for j, v in by_job.items()} == {
            "ingest_job": 1, "embedding_shards_job": N_SHARDS, "curate_from_shards_job": 1}
        assert all(r.status.value == "SUCCESS" for r in runs), [(r.job_name, r.status) for r in runs]
        shard_hosts: dict[str, str] = {}
        for r in by_job["embedding_shards_job"]:
            hosts = _celery_hosts(instance, r.run_id)
            assert set(hosts) == {"clip_embedding_shards"} and len(hosts["clip_embedding_shards"]) == 1, hosts
            shard_hosts[r.tags["dagster/partition"]] = next(iter(hosts["clip_embedding_shards"]))
        assert sorted(shard_hosts) == [str(s) for s in range(N_SHARDS)]
        assert set(shard_hosts.values()) == set(names), f"shard steps did not run on both workers: {shard_hosts}"
        other_steps = {k: h for r in by_job["ingest_job"] + by_job["curate_from_shards_job"]
                       for k, h in _celery_hosts(instance, r.run_id).items()}
        assert {"clean_products", "curated_products"} <= set(other_steps), other_steps
        assert all(h <= set(names) for h in other_steps.values()), other_steps
        instance.dispose()

        # The same graph in one process (unsharded, in-process executor) gives the same curated version.
        ref_dir = tmp_path / "reference"
        materialize_all(SAMPLE_DIR, ref_dir, selection=up_to_publication(),
                        run_config={"ops": {"sampled_products": {"config": {"per_class_cap": PER_CLASS_CAP}}}})
        t_ref = time.monotonic()
        got, ref = load_version(artifacts), load_version(ref_dir)
        assert read_current_version_name(artifacts) == got.version
        assert got.count == ref.count > 0
        assert got.records.columns == ref.records.columns
        # Same records: every column equal, except float scores (computed from the embeddings) within 1e-5.
        g, r = got.records.sort("record_id"), ref.records.sort("record_id")
        scores = [c for c in g.columns if g[c].dtype.is_float()]
        assert g.drop(scores).equals(r.drop(scores))
        for col in scores:
            assert np.allclose(g[col].to_numpy(), r[col].to_numpy(), atol=1e-5, equal_nan=True), col
        order_g = np.argsort(got.records["record_id"].to_numpy())
        order_r = np.argsort(ref.records["record_id"].to_numpy())
        assert np.abs(got.image_emb[order_g] - ref.image_emb[order_r]).max() < 1e-5
        assert np.abs(got.text_emb[order_g] - ref.text_emb[order_r]).max() < 1e-5
        print(f"\nceleryx2 on {N_SHARDS} shards: workers up {t_workers - t0:.1f}s, ingest {t_ingest - t_workers:.1f}s, "
              f"shards {t_shards - t_ingest:.1f}s (queued {t_queued - t_ingest:.1f}s, run {t_shards - t_queued:.1f}s), "
              f"curate {t_curate - t_shards:.1f}s, single-process reference {t_ref - t_curate:.1f}s; "
              f"shard → worker {shard_hosts}")
    finally:
        for p in procs:
            if p.poll() is None:
                os.killpg(p.pid, 9)
                p.wait(10)
        for w in workers:
            w.stop()
        broker_cm.__exit__(None, None, None)


# --- 3. Kubernetes --------------------------------------------------------------------------------------------

def _doc_block(heading: str, lang: str) -> str:
    """The first ```lang block under the docs/deploy.md section titled ``heading``."""
    text = (REPO / "docs" / "deploy.md").read_text()
    section = text.split(f"## {heading}\n", 1)[1].split("\n## ", 1)[0]
    return section.split(f"```{lang}\n", 1)[1].split("```", 1)[0]


def test_k8s_docs_show_the_executor_config_the_code_uses():
    _require("dagster_k8s", "k8s")
    from curation_dagster import definitions_sharded as ds

    ns: dict = {}
    exec(_doc_block("Putting the embedding steps on the GPU pool", "python"), ns)  # noqa: S102 - our own docs
    assert ns["GPU_STEP_K8S_CONFIG"] == ds.GPU_STEP_K8S_CONFIG
    assert ns["K8S_EXECUTOR_CONFIG"] == ds.K8S_EXECUTOR_CONFIG


def test_k8s_executor_and_run_launcher_config_validate_and_shard_pod_gets_the_gpu():
    _require("dagster_k8s", "k8s")
    import dagster as dg
    from dagster._config import validate_config
    from dagster_k8s import K8sRunLauncher, k8s_job_executor
    from dagster_k8s.job import DagsterK8sJobConfig, UserDefinedDagsterK8sConfig, construct_dagster_k8s_job

    from curation_dagster import definitions_sharded as ds

    # The executor config (plus what a run config adds on a cluster) passes dagster-k8s's own schema.
    run_cfg = {"job_namespace": "curation", "job_image": "registry.example.com/curation-dagster:0.1.0"}
    res = validate_config(k8s_job_executor.config_schema.config_type, {**ds.K8S_EXECUTOR_CONFIG, **run_cfg})
    assert res.success, res.errors
    executor = ds.select_executor("k8s")
    assert executor.name == "k8s"
    defs = dg.Definitions(assets=ds.SHARDED_ASSETS, jobs=[ds.embedding_shards_job], executor=executor,
                          resources=ds.build_resources())
    job = defs.resolve_job_def("embedding_shards_job")
    assert job.executor_def.name == "k8s"
    # The shard step is in the `gpu` pool (the instance's `dagster instance concurrency set gpu N` caps it).
    assert job.graph.node_named("clip_embedding_shards").definition.pool == "gpu"

    # The run launcher block of the Helm values in docs/deploy.md, as the chart hands it to K8sRunLauncher.
    helm = yaml.safe_load(_doc_block("Helm values (`dagster/dagster` chart)", "yaml"))
    launcher = helm["runLauncher"]
    assert launcher["type"] == "K8sRunLauncher"
    lc = launcher["config"]["k8sRunLauncher"]
    launcher_cfg = {"instance_config_map": "dagster-instance", "service_account_name": "dagster",
                    "job_namespace": "curation", "env_vars": lc["envVars"], "volumes": lc["volumes"],
                    "volume_mounts": lc["volumeMounts"]}
    res = validate_config(K8sRunLauncher.config_type(), launcher_cfg)
    assert res.success, res.errors
    assert {"CURATION_ARTIFACTS_DIR", "CURATION_CLIP_MODEL"} <= set(lc["envVars"])

    # The Job dagster-k8s would create for a shard step (what k8s_job_executor.launch_step builds).
    step_cfg = UserDefinedDagsterK8sConfig.from_dict(ds.K8S_EXECUTOR_CONFIG["per_step_k8s_config"]["clip_embedding_shards"])
    k8s_job = construct_dagster_k8s_job(
        DagsterK8sJobConfig(job_image=run_cfg["job_image"], dagster_home="/opt/dagster/dagster_home",
                            instance_config_map="dagster-instance"),
        args=["dagster", "api", "execute_step"], job_name="dagster-step-abc123", pod_name="dagster-step-abc123",
        component="step_worker", user_defined_k8s_config=step_cfg,
        labels={"dagster/job": "embedding_shards_job", "dagster/op": "clip_embedding_shards"})
    pod = k8s_job.spec.template.spec
    container = pod.containers[0]
    assert container.image == run_cfg["job_image"]
    assert container.resources.limits == {"nvidia.com/gpu": "1", "memory": "16Gi"}
    assert container.resources.requests == {"cpu": "4", "memory": "12Gi"}
    assert pod.node_selector == {"cloud.google.com/gke-accelerator": "nvidia-l4"}
    assert [(t.key, t.operator, t.effect) for t in pod.tolerations] == [("nvidia.com/gpu", "Exists", "NoSchedule")]
    assert k8s_job.spec.template.metadata.labels["dagster/op"] == "clip_embedding_shards"
    # Steps without an entry (ingest, curation) get no GPU.
    assert "clean_products" not in ds.K8S_EXECUTOR_CONFIG["per_step_k8s_config"]
