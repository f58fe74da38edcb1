"""The `kosmos serve` command: a real server process answers, warns when it listens beyond loopback
without a key, and stops cleanly on SIGTERM; without its libraries, or with a model that cannot load,
it says so as a run would."""

import importlib.util
import json
import re
import signal
import time

import httpx

from tests.helpers.cli import kosmos, needs_script
from tests.helpers.images import noise_image
from tests.helpers.pdfs import make_image_pdf
from tests.helpers.server import start_server


@needs_script
def test_a_server_process_answers_and_stops_on_sigterm(scripted, tmp_path):
    server, url = start_server("--model", scripted, "--host", "0.0.0.0", "--max-new-tokens", "64", "--batch-size", "2")
    try:
        page = tmp_path / "page.png"
        noise_image(64, 48, seed=3).save(page)
        with open(page, "rb") as f:
            response = httpx.post(f"{url}/v1/ocr", files={"file": ("page.png", f)}, timeout=60)
        assert response.status_code == 200 and response.json()["text"] == "ab\ncd ef\ngh"

        # A client that leaves after the first record: the server cancels the rest of its pages. Until
        # then, the page of each record gone out can be fetched (a viewer shows each page as it comes),
        # but not a page still to come, nor the records or documents, which wait for the end.
        pdf = make_image_pdf(tmp_path / "long.pdf", 40)
        with open(pdf, "rb") as f, httpx.stream("POST", f"{url}/v1/md", files={"file": ("long.pdf", f)},
                                                data={"dpi": "72"}, timeout=60) as streamed:
            assert streamed.headers["x-kosmos-pages"] == "40"
            lines = streamed.iter_lines()  # kept: a dropped iterator closes the connection
            first = json.loads(next(lines))
            result = f"{url}/v1/results/{streamed.headers['x-kosmos-result']}"
            page = httpx.get(f"{result}/pages/{first['page']}.png")
            assert page.status_code == 200 and page.content.startswith(b"\x89PNG")
            assert [httpx.get(f"{result}{path}").status_code for path in ("/pages/40.png", "", "/long.md")] == [404] * 3
        deadline = time.monotonic() + 30
        while httpx.get(f"{result}/pages/{first['page']}.png").status_code != 404:  # the request is gone
            assert time.monotonic() < deadline
            time.sleep(0.1)
    finally:
        server.send_signal(signal.SIGTERM)
        stdout, stderr = server.communicate(timeout=60)
    assert server.returncode == 0, stderr
    assert stdout == ""
    assert "without an API key: anyone who can reach this port" in stderr and "TLS-terminating proxy" in stderr
    assert "POST /v1/ocr 200 1 pages" in stderr and "Traceback" not in stderr
    assert re.search(r"POST /v1/md 200 \d+ pages [\d.]+s \(client gone after \d+ of 40\)", stderr), stderr


def test_without_the_server_libraries_it_is_a_usage_error(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "fastapi" else real(name, *a))
    result = kosmos("serve")
    assert result.exit_code == 2
    assert result.stderr.startswith('kosmos: kosmos serve needs the server\'s libraries: pip install "fastapi>=0.115,<1"')


def test_a_model_that_does_not_load_ends_it_as_a_run(tmp_path):
    result = kosmos("serve", "--model", tmp_path, "--device", "cpu")
    assert result.exit_code == 1
    assert result.stderr.startswith(f"kosmos: cannot load model {tmp_path}: ")
    assert kosmos("serve", "--device", "tpu").exit_code == 2


@needs_script
def test_at_shutdown_running_requests_get_the_grace_then_a_record_that_says_why(scripted, tmp_path):
    import json
    import signal

    # <md> pages of this checkpoint run to their budget: 40 of 512 tokens on 2 slots take well over the
    # second the grace leaves them.
    server, url = start_server("--model", scripted, "--max-new-tokens", "512", "--batch-size", "2", "--grace", "2")
    pdf = make_image_pdf(tmp_path / "long.pdf", 40)
    with open(pdf, "rb") as f, httpx.stream("POST", f"{url}/v1/md", files={"file": ("long.pdf", f)},
                                            data={"dpi": "72", "max_new_tokens": "512"}, timeout=60) as streamed:
        lines = streamed.iter_lines()
        first = json.loads(next(lines))
        server.send_signal(signal.SIGTERM)
        rest = [json.loads(line) for line in lines]
    _, stderr = server.communicate(timeout=60)
    assert server.returncode == 0, stderr
    assert first["page"] == 1 and first["new_tokens"] == 512 and rest, "the stream ended early"
    assert rest[-1]["page"] == 0 and rest[-1]["error"].startswith("the server is shutting down: ")
    assert len(rest) < 40  # the rest of the pages were not done
    assert "stopping: no new requests" in stderr


@needs_script
def test_a_second_signal_ends_the_server_at_once(scripted, tmp_path):
    import signal
    import threading
    import time

    server, url = start_server("--model", scripted, "--max-new-tokens", "512", "--batch-size", "2", "--grace", "60")
    pdf = make_image_pdf(tmp_path / "long.pdf", 40)

    def upload():
        with open(pdf, "rb") as f:
            try:
                httpx.post(f"{url}/v1/md", files={"file": ("long.pdf", f)}, data={"dpi": "72"}, timeout=60)
            except httpx.HTTPError:
                pass  # the server went away under it: that is the point

    client = threading.Thread(target=upload)
    client.start()
    time.sleep(1)  # the request is running
    server.send_signal(signal.SIGTERM)
    time.sleep(0.5)
    began = time.monotonic()
    server.send_signal(signal.SIGTERM)
    server.communicate(timeout=30)
    client.join(60)
    assert server.returncode == 130 and time.monotonic() - began < 10  # not the 60 s of grace
