"""Running the `kosmos` command in tests, in process (typer's CliRunner) or as the installed console
script, and reading what it writes."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
from typer.testing import CliRunner

from kosmos_cli.cli import app

FAST = ["--max-new-tokens", "8"]
PAGE_COMMENT = re.compile(r"^<!-- (.+), page (\d+) -->$")

KOSMOS = shutil.which("kosmos")
needs_script = pytest.mark.skipif(KOSMOS is None, reason="the `kosmos` console script is not installed")


def kosmos(*args, input: str | None = None):
    """Invoke the CLI in-process; never lets an exception other than SystemExit through unnoticed."""
    result = CliRunner().invoke(app, [str(a) for a in args], input=input)
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise result.exception
    assert "Traceback" not in result.stderr, result.stderr
    return result


def jsonl(stdout: str) -> list[dict]:
    """Every stdout line is one JSON object (nothing else is allowed on stdout)."""
    lines = stdout.splitlines()
    assert all(line.strip() for line in lines), stdout
    return [json.loads(line) for line in lines]


def state_file(out: Path, task: str, stem: str, page: int) -> Path:
    """Where a run with `-o out` keeps the finished state of one page."""
    return out / ".kosmos" / task / stem / f"{page:04d}.json"


def assert_no_temp_files(out: Path) -> None:
    """No temporary or hidden file left under `out` (the `.kosmos` state folder aside)."""
    leftovers = [p for p in out.rglob("*") if p.is_file() and (p.name.endswith(".tmp") or
                                                               (p.name.startswith(".") and p.name != ".kosmos"))]
    assert leftovers == []


def run_kosmos(*args, input: str | None = None, env: dict | None = None, cwd: Path | None = None):
    """Run the installed `kosmos` script (tests that use it are marked `needs_script`)."""
    return subprocess.run([KOSMOS, *map(str, args)], input=input, capture_output=True, text=True,
                          env={**os.environ, **(env or {})}, cwd=cwd, timeout=120)
