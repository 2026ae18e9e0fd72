"""pyproject.toml installs the repository's modules, all of them and nothing else (`pip install -e .` is what
makes `from model import NVEmbed` work outside the root; make run / make test do it in .venv)."""

from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def test_pyproject_installs_every_module_at_the_root_and_no_other():
    tomllib = pytest.importorskip("tomllib", reason="tomllib is in the standard library from Python 3.11")
    setuptools = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]
    assert sorted(setuptools["py-modules"]) == sorted(path.stem for path in REPO.glob("*.py"))
    packages = sorted(path.parent.name for path in REPO.glob("*/__init__.py") if path.parent.name != "tests")
    assert sorted(setuptools["packages"]) == packages
