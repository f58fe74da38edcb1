"""`kosmos ocr ... --server URL`: the command as a client of a real `kosmos serve` process writes what
a local run of the same model writes, byte for byte (stdout, every -o file, overlays, exit codes),
resumes the same way, and refuses flags and servers it cannot use in one line."""

import signal

import pytest

from tests.helpers.cli import KOSMOS, kosmos, needs_script
from tests.helpers.images import noise_image
from tests.helpers.pdfs import make_image_pdf
from tests.helpers.server import free_port, start_server

KEY = "client-test-key"


@pytest.fixture(scope="module")
def server(scripted):
    """A server on the scripted checkpoint, one slot (a local run with --batch-size 1 decodes alike)."""
    if KOSMOS is None:
        pytest.skip("the `kosmos` console script is not installed")
    process, url = start_server("--model", scripted, "--batch-size", "1", "--api-key", KEY, "-q")
    yield url
    process.send_signal(signal.SIGTERM)
    process.communicate(timeout=60)


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    folder = tmp_path_factory.mktemp("client") / "in"
    folder.mkdir()
    for i in range(2):
        noise_image(64 + 16 * i, 48, seed=3 + i).save(folder / f"scan{i}.png")
    make_image_pdf(folder / "doc.pdf", 3)
    return folder


def files(root) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@needs_script
def test_the_client_writes_what_a_local_run_writes(server, scripted, inputs, tmp_path):
    missing = tmp_path / "missing.png"
    local = ["--model", scripted, "--device", "cpu", "--batch-size", "1"]
    remote = ["--server", server, "--api-key", KEY]

    here = kosmos("ocr", inputs, missing, *local, "-f", "jsonl")
    there = kosmos("ocr", inputs, missing, *remote, "-f", "jsonl")
    assert here.exit_code == there.exit_code == 1  # the missing input
    assert there.stdout == here.stdout and len(here.stdout.splitlines()) == 1 + 2 + 3

    outputs = ["--outputs", "txt,json,hocr,alto", "--overlay", "--dpi", "72", "--pages", "1,3"]
    assert kosmos("ocr", inputs, *local, "-o", tmp_path / "here", *outputs).exit_code == 0
    run = kosmos("ocr", inputs, *remote, "-o", tmp_path / "there", *outputs)
    assert run.exit_code == 0, run.stderr
    assert files(tmp_path / "there") == files(tmp_path / "here")
    assert any(name.endswith(".overlay-0003.png") for name in files(tmp_path / "there"))

    again = kosmos("ocr", inputs, *remote, "-o", tmp_path / "there", *outputs)  # resume: nothing to do
    assert again.exit_code == 0 and "0 pages in" in again.stderr and "already done" in again.stderr


@needs_script
def test_flags_and_servers_it_cannot_use(server, scripted, inputs, tmp_path):
    page = inputs / "scan0.png"
    for flags in (["--device", "cpu"], ["--batch-size", "2"], ["--dtype", "float32"], ["--no-compile"]):
        refused = kosmos("ocr", page, "--server", server, "--api-key", KEY, *flags)
        assert refused.exit_code == 2 and "with --server: the server decides" in refused.stderr
    other = kosmos("ocr", page, "--server", server, "--api-key", KEY, "--model", "microsoft/kosmos-2.5")
    assert other.exit_code == 2 and f"runs {scripted}" in other.stderr
    wrong_task = kosmos("ground", page, "--server", server, "--api-key", KEY)
    assert wrong_task.exit_code == 2 and "needs a kosmos-2 model" in wrong_task.stderr

    no_key = kosmos("ocr", page, "--server", server)
    assert no_key.exit_code == 1 and no_key.stderr.strip() == f"kosmos: the server at {server} needs an API key: " \
        "--api-key KEY or KOSMOS_API_KEY"
    bad_key = kosmos("ocr", page, "--server", server, "--api-key", "nope")
    assert bad_key.exit_code == 1 and "refused the API key" in bad_key.stderr
    nobody = f"http://127.0.0.1:{free_port()}"
    unreachable = kosmos("ocr", page, "--server", nobody, "-o", tmp_path / "out")
    assert unreachable.exit_code == 1 and unreachable.stderr.startswith(f"kosmos: cannot reach the server at {nobody}")
    assert len(unreachable.stderr.strip().splitlines()) == 1
