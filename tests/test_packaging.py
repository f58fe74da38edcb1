"""What we ship: the sdist and wheel `python -m build` makes (the package and nothing else), the wheel
installed in a fresh environment and run, and the install hints, which must name what pip can install."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import tarfile
import tomllib
import zipfile
from pathlib import Path

import pytest

from kosmos_cli.cli import PDF_REQUIREMENT, RAY_REQUIREMENT
from tests.helpers import ROOT
from tests.helpers.images import write_image

PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())


def test_the_install_hints_pin_what_pyproject_pins():
    extras = PYPROJECT["project"]["optional-dependencies"]
    assert extras["pdf"] == [PDF_REQUIREMENT] and extras["ray"] == [RAY_REQUIREMENT]


def test_no_user_facing_text_names_our_distribution_with_an_extra():
    """`pip install "kosmos-transcribe[...]"` fails for a newcomer (the name is not on PyPI) and would
    install whoever registered it; a checkout's extras are `pip install ".[pdf]"`."""
    texts = [ROOT / "README.md", *ROOT.glob("examples/*.md"), *ROOT.glob("benchmarks/*"), *ROOT.glob("kosmos_cli/**/*.py")]
    offenders = [str(path.relative_to(ROOT)) for path in texts
                 if path.is_file() and re.search(r"kosmos-transcribe\[", path.read_text(errors="replace"))]
    assert offenders == []


# The files of a source tree that are not the package: each must stay out of the sdist and the wheel.
JUNK = ["tests/test_junk.py", ".venv/lib/python3.11/site-packages/junk.py", "build/lib/kosmos_cli/stale.py",
        "kosmos_cli/__pycache__/cli.cpython-311.pyc", "kosmos_cli/models/__pycache__/layers.cpython-311.pyc",
        "examples/sample.pdf", "benchmarks/throughput.py"]


def _source_tree(target: Path) -> set[str]:
    """A copy of the repository's package and build files at ``target``, with `JUNK` planted in it; returns
    the package's files (relative paths), which the sdist and the wheel must hold, no more, no less."""
    for name in ("pyproject.toml", "README.md", "MANIFEST.in", "LICENSE"):
        shutil.copy2(ROOT / name, target / name)
    shutil.copytree(ROOT / "kosmos_cli", target / "kosmos_cli",
                    ignore=shutil.ignore_patterns("__pycache__", "*.py[cod]"))
    package = {path.relative_to(target).as_posix() for path in (target / "kosmos_cli").rglob("*") if path.is_file()}
    for name in JUNK:
        (target / name).parent.mkdir(parents=True, exist_ok=True)
        (target / name).write_bytes(b"junk = 1\n")
    return package


def _build(source: Path, out: Path) -> tuple[Path, Path]:
    """`python -m build` as a user runs it in a checkout (sdist, then the wheel from the unpacked sdist),
    offline: no isolated environment, so setuptools comes from this one."""
    proc = subprocess.run([sys.executable, "-m", "build", "--no-isolation", "--outdir", str(out), str(source)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    (sdist,), (wheel,) = out.glob("*.tar.gz"), out.glob("*.whl")
    return sdist, wheel


def _fresh_environment(env: Path) -> Path:
    """A new virtual environment whose only package is none yet; the packages kosmos depends on come
    from this one's site-packages through a .pth line (a path line adds the folder, it runs none of the
    .pth files in it, so this environment's own editable kosmos stays out). Returns its python."""
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(env)], check=True, timeout=60)
    python = env / "bin" / "python"
    site = Path(subprocess.run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                               capture_output=True, text=True, check=True).stdout.strip())
    ours = {sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]}
    (site / "dependencies.pth").write_text("".join(f"{path}\n" for path in sorted(ours)))
    return python


def test_the_built_wheel_installs_and_runs_in_a_fresh_environment(tmp_path, k25):
    pytest.importorskip("build", reason='the test extra installs it: pip install -e ".[test]"')
    source, out, env = tmp_path / "source", tmp_path / "dist", tmp_path / "env"
    source.mkdir()
    package = _source_tree(source)
    sdist, wheel = _build(source, out)

    top = f"kosmos_transcribe-{PYPROJECT['project']['version']}"
    with tarfile.open(sdist) as tar:
        names = {name.removeprefix(f"{top}/") for name in tar.getnames() if not tar.getmember(name).isdir()}
    metadata = {name for name in names if name.startswith("kosmos_transcribe.egg-info/")}
    assert names - metadata == package | {"PKG-INFO", "README.md", "LICENSE", "pyproject.toml", "setup.cfg", "MANIFEST.in"}
    with zipfile.ZipFile(wheel) as whl:
        names = set(whl.namelist())
    assert {name for name in names if not name.startswith(f"{top}.dist-info/")} == package
    page = {f"kosmos_cli/server/static/{name}" for name in ("index.html", "page.js", "markdown.js", "page.css", "icon.svg")}
    assert page <= names  # the page at / (package data, not Python): kosmos serve reads it from the package
    assert "kosmos = kosmos_cli.__main__:main" in zipfile.ZipFile(wheel).read(f"{top}.dist-info/entry_points.txt").decode()

    python = _fresh_environment(env)
    subprocess.run([sys.executable, "-m", "pip", "--python", str(python), "install", "--no-deps", "--no-index",
                    "--quiet", str(wheel)], check=True, capture_output=True, timeout=120)
    clean = {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}
    kosmos = env / "bin" / "kosmos"

    def run(*args):
        return subprocess.run([str(a) for a in args], capture_output=True, text=True, env=clean, cwd=tmp_path,
                              timeout=120)

    where = run(python, "-c", "import kosmos_cli; print(kosmos_cli.__file__)")
    assert Path(where.stdout.strip()).is_relative_to(env), where  # the wheel's copy, not the checkout's
    version = run(kosmos, "--version")
    assert version.returncode == 0 and version.stdout == f"kosmos {PYPROJECT['project']['version']}\n", version
    write_image(tmp_path / "page.png")
    smoke = run(kosmos, "ocr", "page.png", "--model", k25, "--max-new-tokens", "8", "-f", "jsonl")
    assert smoke.returncode == 0, smoke.stderr
    (record,) = [json.loads(line) for line in smoke.stdout.splitlines()]
    assert record["source"] == "page.png" and record["error"] is None and record["width"] == 64
    assert all(line.startswith("kosmos: ") for line in smoke.stderr.splitlines()), smoke.stderr
