"""Every command line README.md gives for running the graph works as written (on a fresh instance)."""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from curation_dagster.core.artifacts import load_version, read_current_version_name
from kaggle_layout import kaggle_layout
from pipeline_helpers import REPO

COMMAND = re.compile(r"(dagster (?:asset materialize|job execute) [^`\n]*)")


def readme_commands() -> list[str]:
    found = COMMAND.findall((REPO / "README.md").read_text(encoding="utf-8"))
    return list(dict.fromkeys(c.strip() for c in found))


def test_readme_documents_the_main_job_and_a_stage_selection():
    cmds = readme_commands()
    assert "dagster job execute -m curation_dagster.definitions -j curation_job" in cmds
    assert any("--select" in c and "clean_products" in c for c in cmds)


@pytest.mark.parametrize("command", readme_commands())
def test_readme_command_runs(command, tmp_path):
    home = tmp_path / "dagster_home"
    home.mkdir()
    shutil.copy(REPO / "dagster_home" / "dagster.yaml", home / "dagster.yaml")
    kaggle_layout(tmp_path / "source", per_class=4, test_per_class=1)  # small, but the real file layout
    env = dict(os.environ, DAGSTER_HOME=str(home), CURATION_DATA_DIR=str(tmp_path / "source"),
               CURATION_CLIP_MODEL="tiny-random", PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")
    env.pop("CURATION_ARTIFACTS_DIR", None)  # the documented default: $DAGSTER_HOME/artifacts
    proc = subprocess.run(["bash", "-c", command], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    log = proc.stdout + proc.stderr
    assert "RUN_SUCCESS" in log
    artifacts = home / "artifacts"
    if "curation_job" in command or "'*'" in command:
        assert "curation_job" in log if "curation_job" in command else True
        version = read_current_version_name(artifacts)
        assert version and load_version(artifacts).count > 0
        assert f"published curated version {version}" in log
        assert "evaluation report written to" in log
    else:
        assert (artifacts / "tables" / "clean_products.parquet").is_file()
