"""benchmarks/gpu_check.py: the dry run (every step on the CPU), the budget, timeouts, the carried
wheels (installed after the machine's own packages) and the results it writes as it goes."""

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.helpers import ROOT

sys.path.insert(0, str(ROOT / "benchmarks"))
import gpu_check  # noqa: E402

CHECK = [sys.executable, str(ROOT / "benchmarks" / "gpu_check.py")]


def probe_wheel(folder):
    """A wheel built here, offline: a module of its own, and a `typer` that must not win over the
    machine's (the check's CLI steps would fail if it did)."""
    source = folder / "probe-src"
    source.mkdir(parents=True)
    (source / "kosmos_check_probe.py").write_text("CARRIED = True\n")
    (source / "typer.py").write_text("raise ImportError('a carried wheel shadowed the machine typer')\n")
    (source / "setup.py").write_text("from setuptools import setup\n"
                                     "setup(name='kosmos-check-probe', version='1.0', py_modules=['kosmos_check_probe', 'typer'])\n")
    wheels = folder / "wheels"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-index", "--no-build-isolation",
                    "-w", str(wheels), str(source)], check=True, capture_output=True)
    return wheels


def test_the_dry_run_measures_every_step(tmp_path):
    out, work = tmp_path / "out", tmp_path / "work"
    started = time.monotonic()
    done = subprocess.run([*CHECK, "--dry-run", "--out", str(out), "--work", str(work), "--budget", "1200",
                           "--wheels", str(probe_wheel(tmp_path))], cwd=ROOT, capture_output=True, text=True, timeout=900)
    seconds = time.monotonic() - started
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    results = json.loads((out / "results.json").read_text())
    steps = results["steps"]
    assert list(steps) == [step.name for step in gpu_check.STEPS]
    assert {name: s["status"] for name, s in steps.items()} == dict.fromkeys(steps, "ok"), steps

    env = steps["environment"]["measured"]
    assert env["compile_ok"] is True and env["device"] == "cpu"
    assert results["meta"]["wheels"]["installed"] == ["kosmos_check_probe-1.0-py3-none-any.whl"]
    assert env["kosmos_check_probe_from"] == str(work / "site")  # carried: importable from the target
    assert env["typer_from"] != str(work / "site")  # the machine's own package stays in charge
    assert results["meta"]["wheels"]["hidden_as_on_the_gpu_machine"] == gpu_check.ABSENT_THERE

    runs = steps["cuda_graphs"]["measured"]["runs"]
    assert [(r["cache"], r["dynamo_graphs"], r["same_ids_as_eager"]) for r in runs] == [("cold", 1, True), ("warm", 1, True)]
    assert all(0 <= r["logprob_difference"] <= 1e-5 for r in runs)
    systems = [row["system"] for name in ("kosmos", "kosmos_flex", "transformers", "confidence_cost")
               for row in steps[name]["measured"]["rows"]]
    assert systems == ["kosmos-sdpa", "kosmos-flex", "hf1", "hfb", "kosmos-sdpa", "kosmos-unscored"]
    assert all("median_s" in row for row in steps["confidence_cost"]["measured"]["rows"])
    assert [r["cache"] for r in steps["first_page"]["measured"]["runs"]] == ["cold", "warm"]
    assert all(0 < r["first_page_s"] <= r["process_s"] for r in steps["first_page"]["measured"]["runs"])
    assert steps["auto_batch"]["measured"]["slots_tried"] == [4]
    assert 0 < steps["bf16"]["measured"]["top1_agreement"] <= 1 and steps["bf16"]["measured"]["steps"] > 0
    assert steps["gpu_tests"]["measured"]["test_ids"] and "skipped" in steps["gpu_tests"]["measured"]["summary"]

    assert sorted(p.name for p in out.iterdir()) == ["results.json", "results.md", "steps.log"]  # <= 8 come back
    logs = (out / "steps.log").read_text()
    assert [line for line in logs.splitlines() if line.startswith("=====")] == [f"===== {name}: ok =====" for name in steps]
    table = (out / "results.md").read_text()
    assert table == done.stdout
    for name in steps:
        assert f"| {name} | ok |" in table
    assert "| kosmos-sdpa | 4 | 2 |" in table and "| sdpa | warm | 1 |" in table
    print(f"dry run: {seconds:.0f} s")


def test_the_budget_skips_what_would_not_fit_and_says_so(tmp_path):
    out = tmp_path / "out"
    done = subprocess.run([*CHECK, "--dry-run", "--out", str(out), "--work", str(tmp_path / "work"), "--budget", "16",
                           "--steps", "cuda_graphs,bf16,gpu_tests"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    steps = json.loads((out / "results.json").read_text())["steps"]
    assert steps["cuda_graphs"] == {"status": "skipped", "why": "needs ~60 s, 16 s left", "measured": {}}
    assert steps["bf16"]["status"] == "ok"
    assert steps["gpu_tests"]["status"] == "skipped" and steps["gpu_tests"]["why"].startswith("needs ~30 s")
    assert "| cuda_graphs | skipped |  | needs ~60 s, 16 s left |" in done.stdout


def test_a_step_that_runs_over_is_stopped_with_every_process_it_started(tmp_path):
    pid_file = tmp_path / "grandchild"
    command = [sys.executable, "-c", f"import subprocess, time; p = subprocess.Popen(['sleep', '60']); "
                                     f"open({str(pid_file)!r}, 'w').write(str(p.pid)); time.sleep(60)"]
    with open(tmp_path / "log", "w") as log:
        started = time.monotonic()
        assert gpu_check.run_with_timeout(command, 2, stdout=log) == "timed out"
    assert time.monotonic() - started < 10
    grandchild = int(pid_file.read_text())
    time.sleep(0.2)
    assert not running(grandchild)
    with open(tmp_path / "log", "w") as log:
        assert gpu_check.run_with_timeout([sys.executable, "-c", "raise SystemExit(3)"], 10, stdout=log) == "failed"


def running(pid: int) -> bool:
    """Alive and not a zombie (a killed orphan may wait a while for whoever reaps it)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return False
    return state != "Z"


def test_a_compile_that_does_not_work_is_said_first(tmp_path):
    meta = {"started": "2026-12-07", "budget_s": 480, "dry_run": False, "wheels": {"installed": []}}
    env = {"gpu": "NVIDIA H100 80GB HBM3", "gpu_memory_gib": 79.2, "capability": "sm_90", "compile_ok": False,
           "compile_error": "InvalidCxxCompiler: no cc"}
    (tmp_path / "steps").mkdir()
    (tmp_path / "steps" / "environment.json").write_text(json.dumps(env))
    gpu_check.write_results(tmp_path, tmp_path, meta, {"environment": {"status": "failed", "seconds": 3.0, "why": "RuntimeError"}})
    table = (tmp_path / "results.md").read_text()
    assert "**torch.compile does not work on this machine: every compiled number below is eager (InvalidCxxCompiler" in table
    assert "NVIDIA H100 80GB HBM3, 79.2 GiB, sm_90; torch" in table and "| environment | failed | 3.0 | RuntimeError |" in table


@pytest.mark.network
def test_the_wheels_for_the_gpu_machine_resolve_alone_and_fit_the_carry(tmp_path, capsys):
    """Downloads from the package index: the pinned list for CPython 3.12 manylinux x86-64."""
    assert gpu_check.make_wheels(tmp_path / "wheels", "3.12") == 0
    printed = capsys.readouterr().out
    print(printed)
    wheels = sorted((tmp_path / "wheels").glob("*.whl"))
    assert [w.name.split("-")[0] + "==" + w.name.split("-")[1] for w in wheels] == gpu_check.WHEELS
    assert sum(w.stat().st_size for w in wheels) <= gpu_check.WHEEL_BUDGET
    for wheel in wheels:
        assert f"{wheel.name}\t{wheel.stat().st_size:,} bytes" in printed
    assert "resolves for Python 3.12 from these wheels alone: yes" in printed
    # The proof can fail: without the wheels the same set does not resolve.
    for wheel in wheels:
        wheel.unlink()
    assert not gpu_check.wheels_resolve(tmp_path / "wheels", "3.12")
