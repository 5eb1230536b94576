"""Helpers for the browser end-to-end test: a `dagster dev` subprocess, headless system Chromium, GraphQL calls.

Nothing here downloads a browser or a driver: Chromium and chromedriver are the Debian packages, passed explicitly
to Selenium, and `BrowserUnavailable` carries the reason when they are missing or do not start (the test skips with
it, so a machine without Chromium never reports a silent pass).
"""
from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import httpx

CHROMIUM_CANDIDATES = ("/usr/bin/chromium", "/usr/bin/chromium-browser")
CHROMEDRIVER = "/usr/bin/chromedriver"
# Other layouts (another distro, a local build) can point at theirs; nothing is ever downloaded.
CHROMIUM_ENV, CHROMEDRIVER_ENV = "E2E_CHROMIUM", "E2E_CHROMEDRIVER"
CHROME_FLAGS = (
    "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync", "--disable-dev-shm-usage",
)
REPOSITORY_NAME = "__repository__"


class BrowserUnavailable(RuntimeError):
    """Chromium or chromedriver is missing or does not start; the message says which and why."""


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until(predicate: Callable[[], Any], timeout: float, interval: float = 1.0, what: str = "condition") -> Any:
    """Poll until `predicate()` is truthy and return its value; TimeoutError naming `what` otherwise."""
    deadline = time.monotonic() + timeout
    last_exc: Exception | None = None
    while time.monotonic() < deadline:
        try:
            value = predicate()
            if value:
                return value
        except Exception as exc:  # noqa: BLE001 - polled conditions fail transiently (page still loading etc.)
            last_exc = exc
        time.sleep(interval)
    raise TimeoutError(f"timed out after {timeout:.0f}s waiting for {what}"
                       + (f" (last error: {last_exc!r})" if last_exc else ""))


# ------------------------------------------------------------------------------------------------ dagster dev

class DagsterDev:
    """A running `dagster dev` (webserver + daemon + code server) in its own process group."""

    def __init__(self, proc: subprocess.Popen, port: int, log_path: Path):
        self.proc = proc
        self.port = port
        self.log_path = log_path
        self.base_url = f"http://127.0.0.1:{port}"
        self.location = ""  # code location name, once loaded

    def log_tail(self, n: int = 60) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return "(no log)"

    def graphql(self, query: str, variables: dict | None = None, timeout: float = 60) -> dict:
        r = httpx.post(f"{self.base_url}/graphql", json={"query": query, "variables": variables or {}},
                       timeout=timeout)
        r.raise_for_status()
        body = r.json()
        if body.get("errors"):
            raise RuntimeError(f"GraphQL errors: {body['errors']}")
        return body["data"]


@contextmanager
def dagster_dev(repo: Path, env: dict[str, str], log_path: Path, startup_timeout: float = 180) -> Iterator[DagsterDev]:
    """Start `dagster dev` on 127.0.0.1:<free port> for repo/workspace.yaml; always kill its process group."""
    port = free_port()
    cmd = [sys.executable, "-m", "dagster", "dev", "-h", "127.0.0.1", "-p", str(port),
           "-w", str(repo / "workspace.yaml")]
    log = open(log_path, "wb")
    # Own session/process group, and SIGINT back to default: a shell that started pytest in the background leaves
    # SIGINT ignored, and `dagster dev` maps SIGTERM onto the SIGINT handler, so it would ignore both.
    proc = subprocess.Popen(cmd, cwd=repo, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    server = DagsterDev(proc, port, log_path)
    try:
        deadline = time.monotonic() + startup_timeout
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"dagster dev exited with {proc.returncode}:\n{server.log_tail()}")
            try:
                if httpx.get(f"{server.base_url}/server_info", timeout=5).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise TimeoutError(f"dagster dev did not answer on port {port} within {startup_timeout:.0f}s\n"
                                   f"--- dagster dev log ---\n{server.log_tail()}")
            time.sleep(1)
        yield server
    finally:
        _kill_group(proc)
        log.close()


def _kill_group(proc: subprocess.Popen, grace: float = 20) -> None:
    """Ctrl-C the whole group (webserver, daemon, code server, run workers), then SIGKILL what is left."""
    pgid = proc.pid  # start_new_session=True: the child leads its own group
    for sig, wait in ((signal.SIGINT, grace), (signal.SIGKILL, 10)):
        try:
            os.killpg(pgid, sig)
        except ProcessLookupError:
            break
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            try:
                proc.wait(timeout=0.2)
            except subprocess.TimeoutExpired:
                pass
            try:
                os.killpg(pgid, 0)
            except ProcessLookupError:
                return
    try:
        proc.wait(timeout=5)
    except subprocess.TimeoutExpired:
        pass


def skip_first_visit_dialog(server: DagsterDev) -> None:
    """Mark the 'Join the Dagster community' dialog as seen (it would otherwise cover the first page)."""
    server.graphql("mutation { setNuxSeen }")


def workspace_location(server: DagsterDev, timeout: float = 120) -> str:
    """The name of the (single) code location once it has loaded; raises with its load error if it failed."""
    query = """{ workspaceOrError { __typename ... on Workspace { locationEntries { name loadStatus
        locationOrLoadError { __typename ... on PythonError { message } } } } ... on PythonError { message } } }"""
    deadline = time.monotonic() + timeout
    while True:
        ws = server.graphql(query)["workspaceOrError"]
        if ws["__typename"] != "Workspace":
            raise RuntimeError(f"workspace failed to load: {ws}")
        entries = ws["locationEntries"]
        if len(entries) != 1:
            raise RuntimeError(f"expected one code location, got {entries}")
        entry = entries[0]
        err = entry["locationOrLoadError"]
        if err and err["__typename"] == "PythonError":
            raise RuntimeError(f"code location {entry['name']} failed to load: {err['message']}")
        if entry["loadStatus"] == "LOADED" and err:
            return entry["name"]
        if time.monotonic() > deadline:
            raise TimeoutError(f"code location {entry['name']} still {entry['loadStatus']} after {timeout:.0f}s")
        time.sleep(1)


def launch_job(server: DagsterDev, location: str, job: str, run_config: dict) -> str:
    """Submit a run through Dagster's own GraphQL client; returns the run id."""
    from dagster_graphql import DagsterGraphQLClient

    client = DagsterGraphQLClient("127.0.0.1", port_number=server.port, timeout=60)
    return client.submit_job_execution(job, repository_location_name=location, repository_name=REPOSITORY_NAME,
                                       run_config=run_config)


TERMINAL_STATUSES = {"SUCCESS", "FAILURE", "CANCELED"}


def run_status(server: DagsterDev, run_id: str) -> str:
    data = server.graphql("query($id: ID!) { runOrError(runId: $id) { __typename ... on Run { status } "
                          "... on PythonError { message } ... on RunNotFoundError { message } } }", {"id": run_id})
    r = data["runOrError"]
    if r["__typename"] != "Run":
        raise RuntimeError(f"run {run_id}: {r}")
    return r["status"]


def wait_for_run(server: DagsterDev, run_id: str, timeout: float) -> str:
    return wait_until(lambda: (s := run_status(server, run_id)) in TERMINAL_STATUSES and s, timeout,
                      interval=2.0, what=f"run {run_id} to finish")


_EVENTS_QUERY = """query($id: ID!, $after: String) { logsForRun(runId: $id, afterCursor: $after) { __typename
  ... on EventConnection { cursor hasMore events { __typename
    ... on MessageEvent { message level stepKey }
    ... on ExecutionStepFailureEvent { error { message causes { message } } }
    ... on RunFailureEvent { pipelineFailureError: error { message } }
    ... on MaterializationEvent { assetKey { path } }
    ... on AssetCheckEvaluationEvent { evaluation { checkName success severity assetKey { path } } } } }
  ... on PythonError { message } } }"""


def run_events(server: DagsterDev, run_id: str) -> list[dict]:
    events: list[dict] = []
    after = None
    while True:
        conn = server.graphql(_EVENTS_QUERY, {"id": run_id, "after": after})["logsForRun"]
        if conn["__typename"] != "EventConnection":
            raise RuntimeError(f"logsForRun({run_id}): {conn}")
        events += conn["events"]
        if not conn["hasMore"]:
            return events
        after = conn["cursor"]


def format_errors(events: list[dict]) -> str:
    """The run's ERROR-level events, with the root causes of step failures (what a failed test should print)."""
    lines = []
    for e in events:
        if e.get("level") != "ERROR":
            continue
        lines.append(f"[{e.get('stepKey') or '-'}] {e['__typename']}: {e.get('message', '')}")
        err = e.get("error") or e.get("pipelineFailureError")
        if err:
            lines.append("    " + err["message"].strip())
            lines += ["    caused by: " + c["message"].strip() for c in err.get("causes") or []]
    return "\n".join(lines) or "(no ERROR events)"


def defined_asset_checks(server: DagsterDev) -> set[tuple[str, str]]:
    """(asset, check name) for every asset check the code location defines."""
    data = server.graphql("""{ assetNodes { assetKey { path }
        assetChecksOrError { __typename ... on AssetChecks { checks { name } } } } }""")
    out = set()
    for node in data["assetNodes"]:
        checks = node["assetChecksOrError"]
        if checks["__typename"] != "AssetChecks":
            raise RuntimeError(f"asset checks of {node['assetKey']}: {checks}")
        out |= {("/".join(node["assetKey"]["path"]), c["name"]) for c in checks["checks"]}
    return out


def latest_materialization_metadata(server: DagsterDev, asset: str) -> dict[str, str]:
    """label → a short text form of each metadata entry of the asset's latest materialization."""
    data = server.graphql("""query($key: AssetKeyInput!) { assetOrError(assetKey: $key) { __typename
        ... on Asset { assetMaterializations(limit: 1) { runId metadataEntries { __typename label
          ... on IntMetadataEntry { intValue } ... on FloatMetadataEntry { floatValue }
          ... on TextMetadataEntry { text } ... on PathMetadataEntry { path }
          ... on BoolMetadataEntry { boolValue } ... on MarkdownMetadataEntry { mdStr } } } } } }""",
                          {"key": {"path": [asset]}})
    node = data["assetOrError"]
    if node["__typename"] != "Asset" or not node["assetMaterializations"]:
        raise RuntimeError(f"{asset} has no materialization: {node}")
    out = {}
    for m in node["assetMaterializations"][0]["metadataEntries"]:
        value = next((v for k, v in m.items() if k not in ("__typename", "label")), None)
        out[m["label"]] = "" if value is None else str(value)
    return out


# ------------------------------------------------------------------------------------------------ chromium

def chromium_binary() -> str:
    if os.environ.get(CHROMIUM_ENV):
        path = os.environ[CHROMIUM_ENV]
        if not os.access(path, os.X_OK):
            raise BrowserUnavailable(f"${CHROMIUM_ENV}={path} is not an executable")
        return path
    for path in CHROMIUM_CANDIDATES:
        if os.access(path, os.X_OK):
            return path
    found = shutil.which("chromium")
    if found:
        return found
    raise BrowserUnavailable("Chromium is not installed (apt-get install chromium chromium-driver)")


def start_chromium(user_data_dir: Path | None = None, width: int = 1600, height: int = 1000, *,
                   console_log: bool = False):
    """Headless system Chromium through the system chromedriver; BrowserUnavailable(reason) if it cannot start.
    ``console_log`` keeps the browser console (driver.get_log("browser")), for tests that fail on console errors."""
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service
    except ImportError as exc:
        raise BrowserUnavailable(f"selenium is not installed ({exc}); pip install selenium") from None
    binary = chromium_binary()
    driver_path = os.environ.get(CHROMEDRIVER_ENV) or CHROMEDRIVER
    if not os.access(driver_path, os.X_OK):
        raise BrowserUnavailable(f"chromedriver {driver_path} is missing (apt-get install chromium-driver)")
    opts = webdriver.ChromeOptions()
    opts.binary_location = binary
    for flag in CHROME_FLAGS:
        opts.add_argument(flag)
    opts.add_argument(f"--user-data-dir={user_data_dir or tempfile.mkdtemp(prefix='e2e-chromium-')}")
    opts.add_argument(f"--window-size={width},{height}")
    if console_log:
        opts.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    try:
        driver = webdriver.Chrome(service=Service(driver_path), options=opts)
    except Exception as exc:  # noqa: BLE001 - any start failure becomes the skip reason
        raise BrowserUnavailable(f"Chromium ({binary}) did not start via {driver_path}: "
                                 f"{str(exc).splitlines()[0] if str(exc) else type(exc).__name__}") from None
    driver.set_page_load_timeout(60)
    set_viewport(driver, width, height)
    return driver


def set_viewport(driver, width: int, height: int) -> None:
    """Make the page viewport (not the emulated window) width x height, so screenshots have a known size."""
    driver.set_window_size(width, height)
    inner_w, inner_h = driver.execute_script("return [window.innerWidth, window.innerHeight]")
    driver.set_window_size(width + (width - inner_w), height + (height - inner_h))


def body_text(driver) -> str:
    from selenium.webdriver.common.by import By

    return driver.find_element(By.TAG_NAME, "body").text


def wait_for_texts(driver, texts: list[str], timeout: float, what: str) -> str:
    """Wait until every string is in the visible page text; TimeoutError lists the ones still missing."""
    state = {"missing": list(texts)}

    def ok():
        body = body_text(driver)
        state["missing"] = [t for t in texts if t not in body]
        return not state["missing"] and body

    try:
        return wait_until(ok, timeout, interval=0.5, what=what)
    except TimeoutError as exc:
        raise TimeoutError(f"{exc}; not shown: {state['missing']}") from None


def click_text(driver, text: str, timeout: float = 15, tag: str = "*") -> None:
    """Click the element whose own text is exactly `text` (menu items, buttons, tabs)."""
    from selenium.webdriver.common.by import By

    xpath = f"//{tag}[normalize-space(text())='{text}']"

    def click():
        for el in driver.find_elements(By.XPATH, xpath):
            if el.is_displayed():
                el.click()
                return True
        return False

    wait_until(click, timeout, interval=0.5, what=f"a clickable '{text}'")


def no_spinners(driver) -> bool:
    """True when no running Dagster loading spinner is on screen."""
    from selenium.webdriver.common.by import By

    spinners = driver.find_elements(By.CSS_SELECTOR, "[class*='Spinner_spinner']:not([class*='Spinner_stopped'])")
    return not any(e.is_displayed() for e in spinners)


def settle(driver, timeout: float = 30, quiet: float = 1.5) -> None:
    """Wait for spinners to go and the page text to stop changing (rendering, late GraphQL answers)."""
    wait_until(lambda: no_spinners(driver), timeout, interval=0.5, what="loading spinners to disappear")
    deadline = time.monotonic() + timeout
    last = body_text(driver)
    stable_since = time.monotonic()
    while time.monotonic() < deadline:
        time.sleep(0.5)
        now = body_text(driver)
        if now != last:
            last, stable_since = now, time.monotonic()
        elif time.monotonic() - stable_since >= quiet:
            return


def open_lineage(driver, base_url: str, asset_names: list[str], width: int = 2400, height: int = 1300,
                 timeout: float = 60) -> str:
    """Open Global asset lineage with every group expanded, fitted to a width x height viewport.

    Groups render collapsed by default; "Expand all groups" (Alt+E, or the canvas context menu) is remembered in
    localStorage, and a reload fits the expanded graph to the view. At 2400x1300 the nodes are drawn in full
    (status, checks, kinds); smaller viewports show bare names.
    """
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    # The UI middle-truncates long asset names in graph nodes ("published…_version"): look for their start.
    asset_names = [n if len(n) <= 20 else n[:9] for n in asset_names]
    set_viewport(driver, width, height)
    driver.get(f"{base_url}/asset-groups")
    wait_for_texts(driver, ["Global asset lineage", "Materialize all"], timeout, "the lineage page")
    settle(driver)
    if not all(name in body_text(driver) for name in asset_names):
        ActionChains(driver).key_down(Keys.ALT).send_keys("e").key_up(Keys.ALT).perform()
        try:
            wait_for_texts(driver, asset_names, 10, "groups to expand (Alt+E)")
        except TimeoutError:
            search = driver.find_element(By.XPATH, "//input[@placeholder='Search and filter assets']")
            ActionChains(driver).move_to_element_with_offset(search, 0, 80).context_click().perform()
            click_text(driver, "Expand all groups")
        driver.refresh()
    text = wait_for_texts(driver, asset_names, timeout, "every asset node in the lineage graph")
    settle(driver)
    return text


def show(driver, url: str, texts: list[str], what: str, width: int = 1600, height: int = 1000,
         timeout: float = 60) -> str:
    """Open url in a width x height viewport and wait until the texts are shown and the page has settled."""
    set_viewport(driver, width, height)
    driver.get(url)
    text = wait_for_texts(driver, texts, timeout, what)
    settle(driver)
    return text


def open_markdown_metadata(driver, key: str, timeout: float = 30):
    """Click "[Show Markdown]" in the asset page's metadata row `key`; return the dialog once its images loaded.

    Markdown metadata (reports, inline base64 plots) is shown in a dialog, not in the table cell.
    """
    from selenium.webdriver.common.by import By

    row = driver.find_element(By.XPATH, f"//tr[td[1][normalize-space()='{key}']]")
    row.find_element(By.XPATH, ".//*[normalize-space(text())='[Show Markdown]']").click()
    dialog = wait_until(lambda: [d for d in driver.find_elements(By.CSS_SELECTOR, ".bp5-dialog") if d.is_displayed()],
                        timeout, interval=0.5, what=f"the '{key}' markdown dialog")[0]
    wait_until(lambda: all(driver.execute_script("return arguments[0].complete", i)
                           for i in dialog.find_elements(By.TAG_NAME, "img")),
               timeout, interval=0.5, what=f"the images in '{key}' to load")
    settle(driver)
    return dialog


def decoded_images(driver, element) -> list[tuple[str, int]]:
    """(alt, natural width) of each <img> inside element; width 0 means the image did not decode (broken)."""
    from selenium.webdriver.common.by import By

    return [(img.get_attribute("alt") or "", int(driver.execute_script("return arguments[0].naturalWidth", img)))
            for img in element.find_elements(By.TAG_NAME, "img")]


def close_dialog(driver, dialog) -> None:
    from selenium.webdriver.common.by import By

    dialog.find_element(By.XPATH, ".//button[normalize-space()='Close']").click()
    wait_until(lambda: not any(d.is_displayed() for d in driver.find_elements(By.CSS_SELECTOR, ".bp5-dialog")), 15,
               interval=0.3, what="the dialog to close")


def screenshot(driver, path: Path) -> Path:
    """Save a PNG of the viewport."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if not driver.save_screenshot(str(path)):
        raise RuntimeError(f"could not save {path}")
    return path
