"""The wheel a user installs: one top-level name, `clipfleet`, and every module of the tree in it."""
from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
# The repository's folders and where setuptools' package-dir puts them (pyproject.toml).
MAPPED = {"producer": "clipfleet/producer", "workers": "clipfleet/workers", "shared": "clipfleet/shared",
          "search": "clipfleet/search", "sandbox": "clipfleet/sandbox"}


@pytest.fixture(scope="module")
def source(tmp_path_factory) -> Path:
    """A copy of the checkout's files (git's view: tracked and not ignored), so the build writes
    nothing into the checkout and the tests compare the wheel with what it was built from."""
    source = tmp_path_factory.mktemp("source")
    listed = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=REPO, check=True,
                            capture_output=True).stdout.decode().split("\0")
    for name in filter(None, listed):
        if (REPO / name).is_file():
            (source / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / name, source / name)
    return source


@pytest.fixture(scope="module")
def wheel(source, tmp_path_factory) -> zipfile.ZipFile:
    out = tmp_path_factory.mktemp("wheel")
    # No build isolation and no index: the venv's setuptools builds it, offline.
    built = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
                            "--no-index", "-q", "-w", str(out), str(source)],
                           capture_output=True, text=True, timeout=300)
    assert built.returncode == 0, built.stdout + built.stderr
    # `make install` stays quiet: setuptools has nothing to warn about in pyproject.toml
    assert "Warning" not in built.stdout + built.stderr, built.stdout + built.stderr
    [path] = out.glob("clipfleet-*.whl")
    with zipfile.ZipFile(path) as archive:
        yield archive


def test_the_only_top_level_name_is_clipfleet(wheel):
    top = {name.split("/", 1)[0] for name in wheel.namelist()}
    dist_info = {name for name in top if name.endswith(".dist-info")}
    assert top - dist_info == {"clipfleet"}
    assert len(dist_info) == 1 and dist_info.pop().startswith("clipfleet-")
    assert "clipfleet/__init__.py" not in wheel.namelist()  # a namespace package, as pyproject says


def test_every_module_of_the_tree_is_in_the_wheel(source, wheel):
    """A package missing from pyproject's list would import in the checkout and fail once installed."""
    names = set(wheel.namelist())
    modules = [path.relative_to(source).as_posix() for folder in MAPPED for path in (source / folder).rglob("*.py")]
    assert len(modules) > 50
    missing = [name for name in modules if MAPPED[name.split("/", 1)[0]] + "/" + name.split("/", 1)[1] not in names]
    assert missing == []
    assert any(name.startswith("clipfleet/shared/models/shapes/") for name in names)  # the shipped model
    assert any(name.startswith("clipfleet/search/static/") for name in names)


def test_the_console_script_points_into_the_namespace(wheel):
    [entry_points] = [name for name in wheel.namelist() if name.endswith(".dist-info/entry_points.txt")]
    assert "clipfleet = clipfleet.producer.cli:entry" in wheel.read(entry_points).decode()
