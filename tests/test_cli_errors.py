"""The `kosmos` command's edges: flags checked before any work, output folder problems, failures as
records and messages, the positional prompt rule, Ctrl-C, and the version and stdout conventions."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from test_cli import ROOT
from test_cli import k25  # noqa: F401  (the checkpoint, as a fixture)


@pytest.fixture
def png(tmp_path) -> Path:
    path = tmp_path / "good.png"
    Image.new("RGB", (64, 48), "white").save(path)
    return path


# --------------------------------------------------------------------------------------------------
# 23. No NumPy warning when NumPy is absent
# --------------------------------------------------------------------------------------------------


def test_no_numpy_warning_without_numpy(k25, png):
    code = ("import sys; sys.modules['numpy'] = None\n"
            "from kosmos_cli.cli import app\n"
            f"app(['md', {str(png)!r}, '--model', {k25!r}, '--max-new-tokens', '2', '-q'])\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == "" and proc.stdout

