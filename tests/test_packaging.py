"""What a regular install of the package carries: every subpackage (``pyproject.toml`` lists
them) and the top-level ``templates/`` inside the package, where ``tagrelay.web.templates``
finds them through importlib.resources, away from any source checkout."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path
from typing import Any

import pytest
from setuptools import find_packages

ROOT = Path(__file__).resolve().parent.parent


def setuptools_config() -> dict[str, Any]:
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    config: dict[str, Any] = pyproject["tool"]["setuptools"]
    return config


def test_pyproject_lists_every_package_and_maps_the_templates() -> None:
    config = setuptools_config()
    assert sorted(config["packages"]) == sorted(
        [*find_packages(ROOT / "src"), "tagrelay.templates"]
    )
    assert config["package-dir"] == {"": "src", "tagrelay.templates": "templates"}
    assert config["package-data"]["tagrelay.templates"] == ["*"]


@pytest.mark.slow
def test_a_wheel_install_finds_its_templates_away_from_the_checkout(tmp_path: Path) -> None:
    # Built from a copy: a build leaves build/ and *.egg-info behind in the tree it reads.
    source = tmp_path / "source"
    skipped = (".git", ".venv", "node_modules", "tests", "bench", "data", "build", "dist")
    ignore = shutil.ignore_patterns(*skipped, "__pycache__", "*.egg-info", ".*_cache")
    shutil.copytree(ROOT, source, ignore=ignore)
    build = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(tmp_path), str(source)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert build.returncode == 0, build.stderr
    [wheel] = tmp_path.glob("tagrelay-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    shipped = {p.name for p in (ROOT / "templates").iterdir() if p.is_file()}
    assert {f"tagrelay/templates/{name}" for name in shipped} <= names
    assert "tagrelay/config/schema.json" in names

    target = tmp_path / "site"
    install = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "install",
            "-q",
            "--no-deps",
            "--target",
            str(target),
            str(wheel),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert install.returncode == 0, install.stderr
    probe = (
        "from tagrelay.web.templates import templates_dir; "
        "from tagrelay.web.script import render_snippet; "
        "print(templates_dir())"
    )
    env = {k: v for k, v in os.environ.items() if k != "TAGRELAY_TEMPLATES"}
    env["PYTHONPATH"] = str(target)
    found = subprocess.run(
        [sys.executable, "-c", probe],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=tmp_path,
        env=env,
    )
    assert found.returncode == 0, found.stderr
    assert Path(found.stdout.strip()) == target / "tagrelay" / "templates"
