"""pyproject.toml installs the repository's modules, all of them and nothing else (`pip install
-e .` is what makes `from model import NVEmbed` work outside the root; make run / make test do it
in .venv)."""

import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def test_pyproject_installs_every_module_at_the_root_and_no_other():
    tomllib = pytest.importorskip("tomllib",
                                  reason="tomllib is in the standard library from Python 3.11")
    setuptools = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]
    assert sorted(setuptools["py-modules"]) == sorted(path.stem for path in REPO.glob("*.py"))
    packages = sorted(path.parent.name for path in REPO.glob("*/__init__.py")
                      if path.parent.name != "tests")
    assert sorted(setuptools["packages"]) == packages


def test_requirements_txt_lists_pyprojects_dependencies_and_no_extra():
    """requirements.txt (the default job's packages) and pyproject.toml's dependencies agree, and
    neither names an extra's package: gguf, accelerate and bm25s are needed only by what asks."""
    tomllib = pytest.importorskip("tomllib",
                                  reason="tomllib is in the standard library from Python 3.11")
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    lines = [line.strip() for line in (REPO / "requirements.txt").read_text().splitlines()]
    assert [line for line in lines if line and not line.startswith("#")] == project["dependencies"]
    names = {d.split(">")[0].split("=")[0].split("<")[0] for d in project["dependencies"]}
    assert not names & {"gguf", "accelerate", "bm25s", "sentence-transformers", "peft", "mteb"}
    assert {"gguf", "bm25"} <= set(project["optional-dependencies"])


def test_a_missing_extra_is_named_in_one_line(monkeypatch, capsys):
    """mine.py --model bm25 without bm25s installed: one line naming the extra, exit status 2."""
    import sys

    import mine

    monkeypatch.setitem(sys.modules, "bm25s", None)  # import bm25s now raises ImportError
    monkeypatch.setattr(sys, "argv", ["mine.py"])
    with pytest.raises(SystemExit) as stopped:
        mine.main(["--model", "bm25", "--out", str(REPO / "runs" / "never-written.jsonl")])
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert stopped.value.code == 2
    assert line == ("mine.py: error: the BM25 teacher (--model bm25) needs the bm25s package: "
                    "pip install -e '.[bm25]'")
    assert not (REPO / "runs" / "never-written.jsonl").exists()


def test_no_tracked_file_has_a_line_over_100_characters():
    """The project's rule, lines of at most 100 characters, in every .py file git tracks and in the
    Makefile, pyproject.toml and requirements.txt. Skipped outside a git checkout (an sdist)."""
    if shutil.which("git") is None or not (REPO / ".git").exists():
        pytest.skip("not a git checkout: git or the .git folder is absent")
    listed = subprocess.run(["git", "ls-files", "-z", "--", "*.py", "Makefile", "pyproject.toml",
                             "requirements.txt"], cwd=REPO, capture_output=True, text=True)
    if listed.returncode != 0:
        pytest.skip(f"git ls-files failed: {listed.stderr.strip()}")
    names = [name for name in listed.stdout.split("\0") if name and (REPO / name).is_file()]
    assert {"Makefile", "pyproject.toml", "requirements.txt"} <= set(names)
    too_long = [f"{name}:{number}: {len(line)} characters"
                for name in names
                for number, line in enumerate((REPO / name).read_text(encoding="utf-8")
                                              .splitlines(), 1)
                if len(line) > 100]
    assert not too_long, "lines over 100 characters:\n" + "\n".join(too_long)
