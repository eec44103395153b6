"""Installing and the doors: 0_install.sh, the package's declared commands, the numbered scripts, ./clipsearch."""
from __future__ import annotations

import importlib
import inspect
import os
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
STAMP = REPO / ".venv" / ".clipsearch-installed"
PACKAGE = REPO / "package"
CLI_DIR = PACKAGE / "clipsearch" / "cli"
NUMBERED_SCRIPTS = sorted(path.name for path in REPO.glob("[1-4]_*.sh"))
tomllib = pytest.importorskip("tomllib", reason="tomllib is in the standard library from Python 3.11")


def pyproject() -> dict:
    return tomllib.loads((PACKAGE / "pyproject.toml").read_text())


def command_modules() -> set[str]:
    """The commands: every module of clipsearch/cli/ but the shared helpers (common, train_args)."""
    return {path.stem for path in CLI_DIR.glob("*.py")} - {"__init__", "common", "train_args"}


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


def test_every_command_is_declared_and_every_declared_entry_point_imports():
    scripts = pyproject()["project"]["scripts"]
    declared = {}
    for script, target in scripts.items():
        module, _, command = target.partition(":")
        assert module == "clipsearch.console", f"{script} = {target}: entries go through clipsearch.console"
        assert script == "clipsearch-" + command.replace("_", "-"), f"{script} should be named after {command}"
        declared[command] = target
    assert command_modules() <= set(declared), f"commands without a script: {command_modules() - set(declared)}"
    problems = []
    for command in sorted(declared):
        try:
            main = importlib.import_module(f"clipsearch.cli.{command}").main
        except (ImportError, AttributeError) as error:
            problems.append(f"clipsearch.cli.{command}.main does not import: {error}")
            continue
        if list(inspect.signature(main).parameters)[:1] != ["argv"]:
            problems.append(f"clipsearch.cli.{command}.main should take argv (tests call it with a list)")
        if not callable(getattr(importlib.import_module("clipsearch.console"), command, None)):
            problems.append(f"clipsearch.console has no entry {command}")
    assert not problems, "\n".join(problems)


def test_a_console_entry_prints_a_user_error_as_one_line(monkeypatch, capsys):
    from clipsearch import console
    from clipsearch.cli.common import UserError

    def failing_main(argv):
        raise UserError("no checkpoint at models/nowhere.ckpt")

    monkeypatch.setattr(importlib.import_module("clipsearch.cli.sample_data"), "main", failing_main)
    with pytest.raises(SystemExit) as exit_info:
        console.sample_data()
    assert exit_info.value.code == 1
    assert capsys.readouterr().err == "error: no checkpoint at models/nowhere.ckpt\n"


def test_commands_import_no_heavy_library_before_parsing():
    """--help and typos answer at once only if importing a command loads no torch, Lightning or transformers."""
    probe = (
        "import importlib, sys\n"
        "for command in sys.argv[1:]:\n"
        "    importlib.import_module('clipsearch.cli.' + command)\n"
        "    heavy = [name for name in ('torch', 'lightning', 'transformers', 'open_clip', 'faiss') if name in sys.modules]\n"
        "    if heavy:\n"
        "        sys.exit(f'importing clipsearch.cli.{command} loaded {heavy}')\n"
    )
    completed = subprocess.run([sys.executable, "-c", probe, *sorted(command_modules())], capture_output=True,
                               text=True, timeout=120)
    assert completed.returncode == 0, completed.stderr[-2000:]


def test_every_dependency_is_pinned_in_requirements():
    """pyproject names what the package needs; requirements.txt (and -bench.txt) pin the tested version of each."""
    def name(requirement: str) -> str:
        return re.split(r"[<>=!~;\[ ]", requirement, maxsplit=1)[0].lower().replace("_", "-")

    project = pyproject()["project"]
    needed = {name(r) for r in project["dependencies"]}
    needed |= {name(r) for extra in project["optional-dependencies"].values() for r in extra}
    lines = [line for file in ("requirements.txt", "requirements-bench.txt") for line in
             (PACKAGE / file).read_text().splitlines()]
    pinned = {name(line) for line in lines if "==" in line and not line.startswith("#")}
    assert needed <= pinned, f"not pinned in requirements.txt: {sorted(needed - pinned)}"
    assert not any(re.search(r"==", r) for r in project["dependencies"]), "pins belong in requirements.txt"


def test_the_built_package_installs_every_declared_script(tmp_path):
    """What `pip install ./package` puts in bin/: the wheel's console scripts (built offline, from a copy)."""
    source = tmp_path / "package"
    shutil.copytree(PACKAGE, source, ignore=shutil.ignore_patterns("__pycache__", "*.egg-info", "build"))
    completed = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(tmp_path / "dist"),
         str(source)], capture_output=True, text=True, timeout=300,
    )
    assert completed.returncode == 0, completed.stderr
    (wheel,) = (tmp_path / "dist").glob("clipsearch-*.whl")
    with zipfile.ZipFile(wheel) as archive:
        entry_points = next(n for n in archive.namelist() if n.endswith(".dist-info/entry_points.txt"))
        text = archive.read(entry_points).decode()
        assert any(n.startswith("clipsearch/models/configs/") and n.endswith(".json") for n in archive.namelist())
    for script, target in pyproject()["project"]["scripts"].items():
        assert f"{script} = {target}" in text


@pytest.mark.parametrize("script", NUMBERED_SCRIPTS)
def test_numbered_script_help_names_the_script(script):
    completed = subprocess.run(["bash", script, "--help"], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert completed.returncode == 0, completed.stderr[-2000:]
    assert completed.stdout.startswith(f"usage: bash {script}"), completed.stdout[:200]


def test_clipsearch_wrapper_lists_and_runs_every_command():
    completed = subprocess.run(["./clipsearch", "--help"], cwd=REPO, capture_output=True, text=True, timeout=30)
    assert completed.returncode == 0
    listed = completed.stdout.split("commands:", 1)[1].split()
    assert sorted(listed) == sorted(command_modules())
    completed = subprocess.run(["./clipsearch", "sample-data", "--help"], cwd=REPO, capture_output=True, text=True,
                               timeout=30)
    assert completed.returncode == 0 and completed.stdout.startswith("usage: ./clipsearch sample_data")
    completed = subprocess.run(["./clipsearch", "sample_dta"], cwd=REPO, capture_output=True, text=True, timeout=30)
    assert completed.returncode == 2 and "unknown command 'sample_dta'" in completed.stderr


def _clipsearch_imports() -> dict[str, set[str]]:
    """Each module of the package -> the package's modules it imports, at the top or inside functions."""
    import ast

    root = PACKAGE / "clipsearch"
    modules = {}
    for path in root.rglob("*.py"):
        parts = path.relative_to(PACKAGE).with_suffix("").parts
        modules[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    graph = {}
    for name, path in modules.items():
        imported = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                imported.update(alias.name for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and node.module:
                imported.add(node.module)
                imported.update(f"{node.module}.{alias.name}" for alias in node.names)
        graph[name] = {module for module in imported if module in modules and module != name}
    return graph


def test_the_layout_keeps_its_rules():
    """ARCHITECTURE.md: the library never imports cli/ (only the doors do), and no module imports
    back up into one that imports it, even inside a function."""
    graph = _clipsearch_imports()
    doors = {"clipsearch.console", "clipsearch.__main__", "clipsearch.export"}
    library_to_cli = sorted(f"{module} -> {imported}" for module, imports in graph.items()
                            if not module.startswith("clipsearch.cli") and module not in doors
                            for imported in imports if imported.startswith("clipsearch.cli"))
    assert not library_to_cli, library_to_cli
    mutual = sorted(f"{first} <-> {second}" for first, imports in graph.items() for second in imports
                    if first < second and first in graph[second])
    assert not mutual, mutual


def test_python_m_clipsearch_runs_any_command():
    env = {**os.environ, "PYTHONPATH": str(PACKAGE)}
    listed = subprocess.run([sys.executable, "-m", "clipsearch", "--help"], capture_output=True, text=True, env=env, timeout=60)
    assert listed.returncode == 0 and all(command in listed.stdout for command in command_modules())
    helped = subprocess.run([sys.executable, "-m", "clipsearch", "index", "--help"], capture_output=True, text=True,
                            env=env, timeout=60)
    assert helped.returncode == 0 and "--max_memory" in helped.stdout
    unknown = subprocess.run([sys.executable, "-m", "clipsearch", "indx"], capture_output=True, text=True, env=env, timeout=60)
    assert unknown.returncode == 2 and unknown.stderr.count("\n") == 1 and "unknown command" in unknown.stderr
