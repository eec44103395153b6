"""0_install.sh: idempotent on an installed tree, clear errors on old Python or an unreachable index."""
from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
STAMP = REPO / ".venv" / ".clipsearch-installed"


def _snapshot(folder: Path) -> dict[str, float]:
    return {str(p): p.stat().st_mtime for p in folder.iterdir()}


@pytest.mark.skipif(not STAMP.exists(), reason="run bash 0_install.sh first: nothing installed to check")
def test_second_install_changes_nothing():
    site_packages = next((REPO / ".venv" / "lib").glob("python3*/site-packages"))
    before, stamp_before = _snapshot(site_packages), STAMP.read_text()
    completed = subprocess.run(["bash", "0_install.sh"], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert completed.returncode == 0, completed.stderr
    assert "up to date" in completed.stdout
    assert _snapshot(site_packages) == before and STAMP.read_text() == stamp_before


def test_old_python_is_refused_with_a_clear_message(tmp_path):
    fake_python = tmp_path / "python3.8"
    fake_python.write_text('#!/bin/sh\n[ "$1" = "--version" ] && echo "Python 3.8.10"; exit 1\n')
    fake_python.chmod(0o755)
    completed = subprocess.run(["bash", "0_install.sh"], cwd=REPO, capture_output=True, text=True,
                               env={**os.environ, "PYTHON": str(fake_python)}, timeout=60)
    assert completed.returncode == 1
    assert "Python >= 3.10 is needed" in completed.stderr and "3.8.10" in completed.stderr


def test_unreachable_index_is_reported(tmp_path):
    """A copy of the install files with pip pointed at a closed port: the script must say why it failed."""
    copy = tmp_path / "repo"
    (copy / "package").mkdir(parents=True)
    shutil.copy(REPO / "0_install.sh", copy)
    (copy / "package" / "requirements.txt").write_text("clipsearch-no-such-package==0.0.1\n")
    shutil.copy(REPO / "package" / "pyproject.toml", copy / "package")
    env = {**os.environ, "PIP_CONFIG_FILE": os.devnull, "PIP_INDEX_URL": "http://127.0.0.1:9/simple",
           "PIP_RETRIES": "0", "PIP_TIMEOUT": "2", "PIP_NO_INDEX": "", "PIP_FIND_LINKS": ""}
    env.pop("PIP_EXTRA_INDEX_URL", None)
    completed = subprocess.run(["bash", "0_install.sh"], cwd=copy, capture_output=True, text=True, env=env, timeout=180)
    assert completed.returncode == 1
    assert "pip could not install the pinned packages" in completed.stderr
    assert not (copy / ".venv" / ".clipsearch-installed").exists()
