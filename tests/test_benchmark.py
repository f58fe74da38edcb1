"""The throughput benchmark stays runnable: a tiny end-to-end run of every system on the CPU."""

import json
import subprocess
import sys

from tests.helpers import ROOT


def test_throughput_benchmark_runs_every_system(tmp_path, kosmos25_sharded):
    """On the tests' tiny checkpoint (--model-dir), not the benchmark's `small` one: kosmos-flex
    compiles the decode step that tests/test_confidence.py and tests/test_generation.py compile on it,
    and the run's inductor cache (tests/conftest.py) holds it for whichever comes second, where the
    `small` model's compile was half of this test's 34 s. The GPU check's dry run
    (tests/test_gpu_check.py) builds the `small` checkpoint and runs every system on it."""
    out = tmp_path / "result.json"
    cmd = [sys.executable, str(ROOT / "benchmarks" / "throughput.py"), "--size", "small", "--device", "cpu",
           "--pages", "3", "--batch-size", "2", "--lengths", "2-6", "--dtype", "fp32", "--hf1-pages", "2", "--compile", "auto", "--repeat", "2",
           "--systems", "hf1,hfb,kosmos,kosmos-flex,kosmos-unscored",
           "--model-dir", str(kosmos25_sharded), "--json", str(out)]
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    rows = json.loads(out.read_text())["rows"]
    assert [r["system"] for r in rows] == ["hf1", "hfb", "kosmos", "kosmos-flex+compile", "kosmos-unscored"]
    assert [r["pages"] for r in rows] == [2, 3, 3, 3, 3]
    assert all(r["pages_per_s"] > 0 and r["new_tokens_per_s"] > 0 and r["median_s"] > 0 <= r["spread_s"] for r in rows)
    assert "kosmos / hfb" in done.stdout and "kosmos-flex / hfb" in done.stdout


def test_serving_benchmark_runs(tmp_path, kosmos25_tied):
    """benchmarks/serving.py end to end on the tests' tiny checkpoint: the command's pipeline, a
    `kosmos serve` process with concurrent clients, and the first-record times."""
    out = tmp_path / "serving.json"
    cmd = [sys.executable, str(ROOT / "benchmarks" / "serving.py"), "--pages", "4", "--clients", "2", "--slots", "2",
           "--tokens", "6", "--model-dir", str(kosmos25_tied), "--json", str(out)]
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads(out.read_text())
    assert result["run"]["pages"] == result["serve"]["pages"] == 4 and result["serve"]["vs_run"] > 0
    assert 0 < result["serve"]["latency_p50_s"] <= result["serve"]["latency_p99_s"]
    assert result["first_record"]["cold_command_s"] > 0 and result["first_record"]["warm_server_s"] > 0
