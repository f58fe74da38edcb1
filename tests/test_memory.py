"""Peak memory of reading a big page, measured in a child process (benchmarks/render_memory.py has the full table)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

# Render every page of the inputs through iter_pages and prefetch, as the CLI does; print the peak RSS
# in MiB. VmHWM, not getrusage: Linux carries ru_maxrss over from the parent (pytest) across fork+exec.
CHILD = """
import re, sys
from kosmos_cli.inputs import collect_inputs
from kosmos_cli.pages import iter_pages, prefetch
files, _ = collect_inputs(sys.argv[1:])
for job in prefetch(iter_pages(files)):
    assert job.image is not None, job
    job.image = None
with open("/proc/self/status") as status:
    print(int(re.search(r"VmHWM:\\s*(\\d+) kB", status.read()).group(1)) // 1024)
"""


def peak_rss_mib(*inputs: Path) -> int:
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(root), os.environ.get("PYTHONPATH", "")])}
    out = subprocess.run([sys.executable, "-c", CHILD, *map(str, inputs)], capture_output=True, text=True,
                         env=env, timeout=120)
    assert out.returncode == 0, out.stderr
    return int(out.stdout.split()[-1])


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads VmHWM from Linux's /proc")
def test_big_1_bit_scan_is_read_in_bounded_memory(tmp_path):
    """A 64 MP fax-like PNG: 64 MB decoded as 1 byte a pixel; no full-size copy or RGB conversion (256 MB)."""
    im = Image.new("1", (8000, 8000), 1)
    for k in range(40):
        im.paste(0, (200, 200 + 190 * k, 7800, 260 + 190 * k))  # "lines of text"
    path = tmp_path / "fax.png"
    im.save(path)
    del im
    baseline = peak_rss_mib()
    assert peak_rss_mib(path) - baseline < 150  # the old reader took ~400 MiB more
