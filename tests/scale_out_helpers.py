"""Real services for the scale-out tests: a throw-away PostgreSQL cluster, a Redis server and celery workers.

Each helper starts its service on a free local port in a fresh temp dir and stops it (and removes the dir) on exit.
When a binary is missing or the service does not come up, it raises ``ServiceUnavailable`` with the reason; the
tests turn that into ``pytest.skip(reason)`` (never a silent pass).
"""
from __future__ import annotations

import contextlib
import glob
import os
import pwd
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Callable, Iterator

REPO = Path(__file__).resolve().parents[1]
SAMPLE_DIR = REPO / "data" / "sample"


class ServiceUnavailable(RuntimeError):
    """A service could not be installed/started here (the reason is the message)."""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(pred: Callable[[], object], timeout: float, *, interval: float = 0.5, what: str = "condition"):
    """Poll ``pred`` until it returns a truthy value (returned) or ``timeout`` seconds pass (TimeoutError)."""
    deadline = time.monotonic() + timeout
    last_exc: BaseException | None = None
    while True:
        try:
            value = pred()
            if value:
                return value
        except Exception as exc:  # noqa: BLE001 - the service may not accept connections yet
            last_exc = exc
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout:.0f}s waiting for {what}"
                               + (f" (last error: {last_exc!r})" if last_exc else ""))
        time.sleep(interval)


def _tail(path: Path, n: int = 30) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-n:])
    except OSError:
        return "(no log)"


def _stop(proc: subprocess.Popen, timeout: float = 20) -> None:
    """Stop a process this module started (its own process group), politely first."""
    if proc.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(10)


# --- PostgreSQL -------------------------------------------------------------------------------------------------

def _pg_bindir() -> Path | None:
    if shutil.which("initdb") and shutil.which("pg_ctl"):
        return Path(shutil.which("initdb")).parent
    # Debian/Ubuntu keep the server binaries out of PATH
    for d in sorted(glob.glob("/usr/lib/postgresql/*/bin"), key=lambda p: int(p.split("/")[-2].split(".")[0]),
                    reverse=True):
        if Path(d, "initdb").exists() and Path(d, "pg_ctl").exists():
            return Path(d)
    return None


@contextlib.contextmanager
def postgres_server(db: str = "dagster") -> Iterator[str]:
    """A PostgreSQL cluster initdb'ed into a temp dir, on a free port (trust auth, 127.0.0.1 only); yields the URL
    ``postgresql://postgres@127.0.0.1:<port>/<db>``. As root it runs as the ``postgres`` system user (the server
    refuses to run as root)."""
    bindir = _pg_bindir()
    if bindir is None:
        raise ServiceUnavailable("PostgreSQL server binaries (initdb, pg_ctl) not found "
                                 "(Debian: apt-get install postgresql)")
    try:
        import psycopg2
    except ImportError as exc:
        raise ServiceUnavailable(f"psycopg2 not importable ({exc}); pip install -e '.[postgres]'") from None
    run_as: list[str] = []
    root = Path(tempfile.mkdtemp(prefix="curation-pg-"))
    if os.geteuid() == 0:
        try:
            pw = pwd.getpwnam("postgres")
        except KeyError:
            shutil.rmtree(root, ignore_errors=True)
            raise ServiceUnavailable("running as root and there is no `postgres` user to run the server as") from None
        os.chown(root, pw.pw_uid, pw.pw_gid)
        os.chmod(root, 0o700)
        runuser = shutil.which("runuser")
        if runuser is None:
            shutil.rmtree(root, ignore_errors=True)
            raise ServiceUnavailable("running as root: runuser is needed to start PostgreSQL as `postgres`")
        run_as = [runuser, "-u", "postgres", "--"]
    data, log = root / "data", root / "postgres.log"
    port = free_port()
    try:
        r = subprocess.run([*run_as, str(bindir / "initdb"), "-D", str(data), "-U", "postgres", "-A", "trust",
                            "--no-sync", "-E", "UTF8", "--locale=C"], capture_output=True, text=True, timeout=120)
        if r.returncode != 0:
            raise ServiceUnavailable(f"initdb failed: {r.stderr.strip()[-500:]}")
        opts = f"-p {port} -k {root} -c listen_addresses=127.0.0.1 -c fsync=off -c max_connections=200"
        r = subprocess.run([*run_as, str(bindir / "pg_ctl"), "-D", str(data), "-l", str(log), "-o", opts, "-w",
                            "-t", "120", "start"], capture_output=True, text=True, timeout=180)
        if r.returncode != 0:
            raise ServiceUnavailable(f"pg_ctl start failed: {r.stderr.strip()[-300:]}\n{_tail(log)}")
        base = f"postgresql://postgres@127.0.0.1:{port}"

        def create_db():
            conn = psycopg2.connect(f"{base}/postgres", connect_timeout=5)
            conn.autocommit = True
            with conn.cursor() as cur:
                cur.execute(f'CREATE DATABASE "{db}"')
            conn.close()
            return True

        wait_for(create_db, 60, what="PostgreSQL to accept connections")
        yield f"{base}/{db}"
    finally:
        if (data / "postmaster.pid").exists():
            subprocess.run([*run_as, str(bindir / "pg_ctl"), "-D", str(data), "-m", "fast", "-w", "-t", "60", "stop"],
                           capture_output=True, timeout=90)
        shutil.rmtree(root, ignore_errors=True)


# --- Redis ------------------------------------------------------------------------------------------------------

@contextlib.contextmanager
def redis_server() -> Iterator[str]:
    """``redis-server`` on a free port, no persistence; yields ``redis://127.0.0.1:<port>``."""
    exe = shutil.which("redis-server")
    if exe is None:
        raise ServiceUnavailable("redis-server not found (Debian: apt-get install redis-server)")
    try:
        import redis
    except ImportError as exc:
        raise ServiceUnavailable(f"redis client not importable ({exc}); pip install -e '.[celery]'") from None
    root = Path(tempfile.mkdtemp(prefix="curation-redis-"))
    port = free_port()
    log = root / "redis.log"
    with open(log, "wb") as fh:
        proc = subprocess.Popen([exe, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
                                 "--dir", str(root)], stdout=fh, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"redis://127.0.0.1:{port}"
    try:
        try:
            wait_for(lambda: proc.poll() is None and redis.Redis.from_url(url, socket_timeout=2).ping(), 60,
                     what="redis-server to answer PING")
        except TimeoutError as exc:
            raise ServiceUnavailable(f"redis-server did not start: {exc}\n{_tail(log)}") from None
        yield url
    finally:
        _stop(proc)
        shutil.rmtree(root, ignore_errors=True)


# --- celery workers ---------------------------------------------------------------------------------------------

class CeleryWorker:
    """One ``dagster-celery worker start`` process (celery, prefork pool, one task at a time)."""

    def __init__(self, name: str, config_yaml: Path, env: dict[str, str], log: Path):
        self.name, self.log = name, log
        bindir = str(Path(os.sys.executable).parent)
        exe = shutil.which("dagster-celery") or str(Path(bindir) / "dagster-celery")
        # dagster-celery starts `celery` by name: the interpreter's bin first, so a run without an activated venv
        # (.venv/bin/python -m pytest) finds it too
        env = {**env, "PATH": os.pathsep.join([bindir, env.get("PATH", "")])}
        self._fh = open(log, "wb")
        self.proc = subprocess.Popen(
            [exe, "worker", "start", "-A", "dagster_celery.app", "-y", str(config_yaml), "-n", name,
             "--", "--concurrency", "1", "--without-gossip", "--without-mingle", "--without-heartbeat"],
            env=env, stdout=self._fh, stderr=subprocess.STDOUT, start_new_session=True, cwd=str(REPO))

    @property
    def hostname(self) -> str:
        return f"{self.name}@{socket.gethostname()}"

    def stop(self) -> None:
        _stop(self.proc, timeout=30)
        self._fh.close()

    def log_tail(self, n: int = 30) -> str:
        return f"--- {self.name} ---\n{_tail(self.log, n)}"


def celery_app(broker: str, backend: str):
    from dagster_celery.executor import CeleryExecutor
    from dagster_celery.make_app import make_app

    return make_app(CeleryExecutor.for_cli(broker=broker, backend=backend).app_args())


def ping_workers(app, names: list[str], timeout: float = 2.0) -> set[str]:
    """Hostnames among ``names`` that answer a celery ping."""
    replies = app.control.ping(timeout=timeout) or []
    seen = {h for r in replies for h in r}
    return {n for n in names if n in seen}


def queued_messages(redis_url: str, queue: str = "dagster") -> int:
    """Messages waiting in the celery queue (kombu's redis transport keeps one list per priority band)."""
    import redis

    r = redis.Redis.from_url(redis_url)
    return sum(r.llen(k) for k in r.scan_iter(f"{queue}*") if r.type(k) == b"list")


def set_consuming(app, names: list[str], queue: str, on: bool, timeout: float = 120) -> None:
    """Make every worker in ``names`` consume ``queue`` (on) or stop consuming it (off), re-sending the control
    command until each worker's own report (``inspect active_queues``) says so."""

    def done() -> bool:
        pending = []
        for n in names:
            active = (app.control.inspect(destination=[n], timeout=5).active_queues() or {}).get(n)
            if active is None or (any(q["name"] == queue for q in active) != on):
                pending.append(n)
        if not pending:
            return True
        if on:
            app.control.add_consumer(queue, destination=pending, reply=True, timeout=5)
        else:
            app.control.cancel_consumer(queue, destination=pending, reply=True, timeout=5)
        return False

    wait_for(done, timeout, interval=0.2, what=f"workers {names} to {'consume' if on else 'stop consuming'} {queue}")
