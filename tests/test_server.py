"""`kosmos serve`'s API through FastAPI's test client, on the checkpoint that writes a known
transcript: the records are the command's own, page by page and in order; the key, the host check,
the upload limits and bad requests get their status and a plain message; requests run side by side;
a request cancelled mid-run leaves nothing running. (`test_installed_command`-style runs of the real
server process are in test_serve_command.py.)"""

import json
import re
import threading
import time

import pytest
from fastapi.testclient import TestClient

from kosmos_cli import load
from kosmos_cli.server.app import ServerConfig, create_app
from kosmos_cli.server.bridge import Bridge, Upload
from kosmos_cli.tasks import TASKS
from tests.helpers.cli import jsonl, kosmos
from tests.helpers.images import noise_image
from tests.helpers.pdfs import make_image_pdf

KEY = "s3cret-key"


@pytest.fixture(scope="module")
def bridge(scripted):
    engine = load(str(scripted), device="cpu", compile=False)
    bridge = Bridge(engine, slots=2, max_new_tokens=64, max_prompt_tokens=engine.prompt_length("<ocr>") + 64)
    yield bridge
    bridge.close(timeout=60)


def client(bridge, tmp_path, **config) -> TestClient:
    app = create_app(bridge.engine, bridge, ServerConfig(uploads=tmp_path, **config))
    return TestClient(app, base_url="http://localhost")


@pytest.fixture
def page(tmp_path):
    path = tmp_path / "page.png"
    noise_image(64, 48, seed=3).save(path)
    return path


def post(http, path, task="ocr", name=None, headers=None, **fields):
    with open(path, "rb") as f:
        return http.post(f"/v1/{task}", files={"file": (name or path.name, f)}, data=fields, headers=headers or {})


def records(response) -> list[dict]:
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == "application/x-ndjson"
    return [json.loads(line) for line in response.text.splitlines()]


def test_a_page_is_the_commands_record(bridge, scripted, page, tmp_path):
    http = client(bridge, tmp_path / "uploads")
    assert http.get("/health").json() == {"status": "ok"}
    info = http.get("/v1/info").json()
    assert (info["model"], info["kind"], info["tasks"]) == (str(scripted), "kosmos-2.5", ["ocr", "md"])

    response = post(http, page, name="scan 1.png")
    assert response.headers["x-kosmos-pages"] == "1"
    (record,) = records(response)
    command = kosmos("ocr", page, "--model", scripted, "-f", "jsonl", "--max-new-tokens", "64")
    (expected,) = jsonl(command.stdout)
    assert record == {**expected, "source": "scan 1.png"}
    assert [line["text"] for line in record["lines"]] == ["ab", "cd ef", "gh"]
    # the upload left the uploads folder: kept with the result (see the tests of kept results)
    assert [p.name for p in (tmp_path / "uploads").iterdir()] == ["results"]


def test_pages_come_in_order(bridge, tmp_path):
    http = client(bridge, tmp_path / "uploads")
    pdf = make_image_pdf(tmp_path / "doc.pdf", 4)
    response = post(http, pdf, task="md", pages="2-4", max_new_tokens="5", dpi="72")
    assert response.headers["x-kosmos-pages"] == "3"
    got = records(response)
    assert [(r["source"], r["page"], r["task"]) for r in got] == [("doc.pdf", n, "md") for n in (2, 3, 4)]
    assert all(r["new_tokens"] == 5 and r["truncated"] for r in got)


def test_the_key_and_the_host(bridge, page, tmp_path):
    http = client(bridge, tmp_path, api_key=KEY)
    assert http.get("/health").status_code == 200  # no key needed
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": KEY}):
        refused = http.get("/v1/info", headers=headers)
        assert refused.status_code == 401 and refused.headers["www-authenticate"] == "Bearer"
        assert post(http, page, headers=headers).status_code == 401
    assert http.get("/v1/info", headers={"Authorization": f"Bearer {KEY}"}).status_code == 200
    assert len(records(post(http, page, headers={"Authorization": f"Bearer {KEY}"}))) == 1

    elsewhere = http.get("/v1/info", headers={"Authorization": f"Bearer {KEY}", "Host": "evil.example:8000"})
    assert elsewhere.status_code == 403 and "localhost only" in elsewhere.json()["error"]
    public = client(bridge, tmp_path, host="0.0.0.0")  # bound beyond loopback: any name
    assert public.get("/v1/info", headers={"Host": "ocr.example.org"}).status_code == 200


def test_uploads_past_the_limit_are_refused_as_they_arrive(bridge, tmp_path):
    http = client(bridge, tmp_path / "uploads", max_upload_bytes=20_000)
    big = tmp_path / "big.png"
    noise_image(400, 300, seed=1).save(big)
    assert big.stat().st_size > 20_000
    assert post(http, big).status_code == 413

    # No Content-Length (chunked): the bytes are counted as they come.
    boundary = "kosmos-test-boundary"
    head = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"big.png\"\r\n"
            "Content-Type: image/png\r\n\r\n").encode()
    chunks = iter([head, big.read_bytes(), f"\r\n--{boundary}--\r\n".encode()])
    response = http.post("/v1/ocr", content=chunks, headers={"Content-Type": f"multipart/form-data; boundary={boundary}"})
    assert response.status_code == 413 and "larger than this server takes" in response.json()["error"]
    assert [p.name for p in (tmp_path / "uploads").iterdir()] == ["results"]  # no upload left behind


def test_bad_requests_say_what_is_wrong(bridge, page, tmp_path):
    http = client(bridge, tmp_path)
    junk = tmp_path / "junk.png"
    junk.write_bytes(b"not an image at all")
    cases = [
        (post(http, junk), 422, "junk.png: "),
        (post(http, page, task="ground"), 400, "needs a kosmos-2 model"),
        (post(http, page, pages="0"), 400, "pages: "),
        (post(http, page, pages="5-"), 422, "none of its 1 pages"),
        (post(http, page, max_new_tokens="65"), 400, "max_new_tokens must be from 1 to 64"),
        (post(http, page, dpi="lots"), 400, "dpi must be a number"),
        (post(http, page, task="md", question="why " * 100), 400, "the prompt is too long: "),
        (http.post("/v1/ocr", data={"pages": "1"}), 400, "no file"),
    ]
    for response, status, words in cases:
        assert response.status_code == status, response.text
        assert words in response.json()["error"]
        assert str(tmp_path) not in response.text  # the server's own paths stay its own
    too_many = client(bridge, tmp_path, max_pages=2)
    pdf = make_image_pdf(tmp_path / "doc.pdf", 3)
    assert post(too_many, pdf, dpi="72").status_code == 413


def test_requests_side_by_side(bridge, page, tmp_path):
    http = client(bridge, tmp_path)
    got = [None] * 5

    def one(i):
        got[i] = records(post(http, page, name=f"copy{i}.png"))

    threads = [threading.Thread(target=one, args=(i,)) for i in range(5)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert [r[0]["source"] for r in got] == [f"copy{i}.png" for i in range(5)]
    assert len({json.dumps({**r[0], "source": ""}) for r in got}) == 1


def test_a_cancelled_request_leaves_nothing_running(bridge, tmp_path):
    """Cancelled at once, with pages being rendered, queued and running: the rest are dropped, its
    records end, nothing of it stays in the batch, and the next request gets the slots."""
    pdf = make_image_pdf(tmp_path / "doc.pdf", 20)
    submission = bridge.submit(Upload(pdf, "doc.pdf", TASKS["md"], "<md>", dpi=72, max_new_tokens=64))
    submission.cancel()
    got = []
    while (record := submission.next_record(timeout=10)) is not None:
        got.append(record)
    assert len(got) < 20
    assert bridge.busy == 0
    page = tmp_path / "after.png"
    noise_image(64, 48, seed=3).save(page)
    after = bridge.submit(Upload(page, "after.png", TASKS["ocr"], "<ocr>", max_new_tokens=64))
    assert [r.page for r in after.records()] == [1]


# --------------------------------------------------------------------------------------------------
# OpenAI-compatible: through the official client
# --------------------------------------------------------------------------------------------------


def openai_client(bridge, tmp_path):
    import openai

    return openai.OpenAI(base_url="http://localhost/v1", api_key="unused",
                         http_client=client(bridge, tmp_path / "uploads"), max_retries=0)


def message(page, text="<ocr>", url=None):
    import base64

    url = url or "data:image/png;base64," + base64.b64encode(page.read_bytes()).decode()
    return [{"role": "user", "content": [{"type": "text", "text": text}, {"type": "image_url", "image_url": {"url": url}}]}]


def test_chat_completions_with_the_openai_client(bridge, scripted, page, tmp_path):
    from tests.helpers.scripted import TRANSCRIPT

    ai = openai_client(bridge, tmp_path)
    assert [m.id for m in ai.models.list()] == [str(scripted)]
    done = ai.chat.completions.create(model=str(scripted), messages=message(page), max_tokens=64)
    (choice,) = done.choices
    assert (choice.message.role, choice.message.content, choice.finish_reason) == ("assistant", TRANSCRIPT, "stop")
    assert done.usage.completion_tokens == 27  # the transcript's tokens and EOS: the record's new_tokens
    assert done.usage.prompt_tokens == bridge.engine.prompt_length("<ocr>")

    cut = ai.chat.completions.create(model=str(scripted), messages=message(page), max_completion_tokens=6)
    assert cut.choices[0].finish_reason == "length" and TRANSCRIPT.startswith(cut.choices[0].message.content)

    chunks = list(ai.chat.completions.create(model=str(scripted), messages=message(page), stream=True,
                                             stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == TRANSCRIPT
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 27
    assert [p.name for p in (tmp_path / "uploads").iterdir()] == ["results"]  # each decoded image deleted


def test_chat_completions_refuse_what_they_cannot_do(bridge, scripted, page, tmp_path):
    import openai

    ai = openai_client(bridge, tmp_path)
    model = str(scripted)
    refused = [
        (dict(model=model, messages=message(page, url="https://example.com/page.png")), openai.BadRequestError, "data: URL"),
        (dict(model=model, messages=message(page, url="file:///etc/passwd")), openai.BadRequestError, "data: URL"),
        (dict(model=model, messages=message(page), n=2), openai.BadRequestError, "n must be 1"),
        (dict(model=model, messages=message(page), temperature=0.7), openai.BadRequestError, "greedy"),
        (dict(model=model, messages=message(page), max_tokens=65), openai.BadRequestError, "max_tokens"),
        (dict(model=model, messages=message(page), tools=[{"type": "function", "function": {"name": "f"}}]),
         openai.BadRequestError, "tools"),
        (dict(model="gpt-4o", messages=message(page)), openai.NotFoundError, "does not exist"),
        (dict(model=model, messages=message(page, "why " * 100)), openai.BadRequestError, "the prompt is too long"),
        (dict(model=model, messages=message(page, url="data:image/png;base64,bm90IGFuIGltYWdl")),
         openai.UnprocessableEntityError, "cannot be read"),
    ]
    for request, error, words in refused:
        with pytest.raises(error, match=words):
            ai.chat.completions.create(**request)


def test_metrics_and_a_full_queue(bridge, page, tmp_path):
    http = client(bridge, tmp_path)
    before = http.get("/metrics").text
    pages_before = float(re.search(r"^kosmos_pages_total (\S+)$", before, re.M)[1])
    assert len(records(post(http, page))) == 1
    text = http.get("/metrics").text
    assert float(re.search(r"^kosmos_pages_total (\S+)$", text, re.M)[1]) == pages_before + 1
    assert re.search(r'^kosmos_requests_total\{route="/v1/ocr",status="200"\} \d', text, re.M)
    assert re.search(r"^kosmos_page_seconds_count \d", text, re.M) and "kosmos_busy_slots" in text

    full = client(bridge, tmp_path, max_queue=0)
    refused = post(full, page)
    assert refused.status_code == 429 and refused.headers["retry-after"] == "2"
    chat = full.post("/v1/chat/completions", json={"messages": message(page)})
    assert chat.status_code == 429 and "waiting already" in chat.json()["error"]["message"]


def test_running_out_of_memory_queues_the_pages_again_with_fewer_slots(bridge, scripted, page, tmp_path, monkeypatch):
    """A stream that runs out of memory after taking a page: the page goes back to the head of the
    queue, the next stream has half the slots, and the record is the one a clean run gives."""
    import torch

    engine = load(str(scripted), device="cpu", compile=False)  # its own: the module's engine is streaming
    real = engine.stream
    calls = []

    def running_out_once(jobs, **options):
        calls.append(options["slots"])
        if len(calls) == 1:
            jobs.requests.take(wait=True)  # admitted, then the memory runs out
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        yield from real(jobs, **options)

    monkeypatch.setattr(engine, "stream", running_out_once)
    fresh = Bridge(engine, slots=2, max_new_tokens=64, max_prompt_tokens=bridge.max_prompt_tokens)
    try:
        got = records(post(client(fresh, tmp_path), page))
        assert fresh.slots == 1 and "kosmos_slots 1.0" in client(fresh, tmp_path).get("/metrics").text
    finally:
        fresh.close(timeout=60)
    assert calls == [2, 1]
    (want,) = records(post(client(bridge, tmp_path), page))
    (record,) = got
    # The same record, its confidences up to float rounding: one slot now, two there.
    plain = lambda r: {**r, "confidence": None, "lines": [{**line, "confidence": None, "word_confidences": None}
                                                          for line in r["lines"]]}
    assert plain(record) == plain(want)
    assert record["confidence"] == pytest.approx(want["confidence"], rel=2e-5)


# --------------------------------------------------------------------------------------------------
# Kept results
# --------------------------------------------------------------------------------------------------


def test_a_finished_request_is_kept_with_the_files_the_writer_makes(bridge, scripted, page, tmp_path, monkeypatch):
    """Records, document files (the -o writer's, byte for byte, without running the model again) and
    pages of a finished request, under the id its answer gave."""
    from PIL import Image
    import io

    http = client(bridge, tmp_path / "private")
    response = post(http, page)
    result = response.headers["x-kosmos-result"]
    assert http.get(f"/v1/results/{result}").text == response.text

    monkeypatch.chdir(page.parent)  # the command's records name the file as given: page.png
    command = kosmos("ocr", "page.png", "--model", scripted, "-o", "out", "--outputs", "txt,json,pdf,hocr,alto",
                     "--max-new-tokens", "64")
    assert command.exit_code == 0, command.stderr
    for name in ("page.txt", "page.json", "page.pdf", "page.hocr", "page.alto.xml"):
        got = http.get(f"/v1/results/{result}/{name}")
        assert got.status_code == 200 and got.content == (page.parent / "out" / name).read_bytes(), name
        assert got.headers["content-disposition"] == f"attachment; filename*=UTF-8''{name}"
    png = http.get(f"/v1/results/{result}/pages/1.png")
    assert png.headers["content-type"] == "image/png"
    assert Image.open(io.BytesIO(png.content)).size == (64, 48)

    assert http.get(f"/v1/results/{result}/pages/2.png").status_code == 404
    wrong = http.get(f"/v1/results/{result}/page.md")
    assert wrong.status_code == 404 and "page.txt" in wrong.json()["error"]
    assert http.get("/v1/results/0123456789abcdef").status_code == 404


def test_kept_results_expire_and_make_room(bridge, page, tmp_path):
    import time

    off = post(client(bridge, tmp_path / "a", keep_minutes=0), page)
    assert "x-kosmos-result" not in off.headers and list((tmp_path / "a" / "results").iterdir()) == []

    brief = client(bridge, tmp_path / "b", keep_minutes=0.5 / 60)  # half a second
    result = post(brief, page).headers["x-kosmos-result"]
    assert brief.get(f"/v1/results/{result}").status_code == 200
    time.sleep(0.6)
    assert brief.get(f"/v1/results/{result}").status_code == 404
    assert list((tmp_path / "b" / "results").iterdir()) == []

    small = client(bridge, tmp_path / "c", keep_bytes=page.stat().st_size + 3000)  # room for one
    first, second = (post(small, page).headers["x-kosmos-result"] for _ in range(2))
    assert small.get(f"/v1/results/{first}").status_code == 404
    assert small.get(f"/v1/results/{second}").status_code == 200


def test_folders_of_servers_that_are_gone_are_removed(tmp_path, monkeypatch):
    import os
    import subprocess
    import tempfile

    from kosmos_cli.server import FOLDER_PREFIX, remove_stale_folders

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    dead = subprocess.Popen(["true"])
    dead.wait()  # reaped: its pid names no process now
    folders = {name: tmp_path / f"{FOLDER_PREFIX}{name}" for name in ("gone", "alive", "mine", "no-pid")}
    for folder in folders.values():
        folder.mkdir()
    (folders["gone"] / "pid").write_text(str(dead.pid))
    (folders["alive"] / "pid").write_text(str(os.getppid()))
    remove_stale_folders(folders["mine"])
    assert sorted(p.name for p in tmp_path.iterdir()) == [f"{FOLDER_PREFIX}alive", f"{FOLDER_PREFIX}mine"]
    assert (folders["mine"] / "pid").read_text() == str(os.getpid())


def test_cors_headers_only_for_the_origin_named(bridge, tmp_path):
    preflight = {"Origin": "https://app.example.org", "Access-Control-Request-Method": "POST"}
    plain = client(bridge, tmp_path).options("/v1/ocr", headers=preflight)
    assert "access-control-allow-origin" not in plain.headers
    allowed = client(bridge, tmp_path, cors_origin="https://app.example.org")
    answer = allowed.options("/v1/ocr", headers=preflight)
    assert answer.status_code == 200 and answer.headers["access-control-allow-origin"] == "https://app.example.org"
    other = allowed.options("/v1/ocr", headers={**preflight, "Origin": "https://evil.example"})
    assert other.headers.get("access-control-allow-origin") != "https://evil.example"


def test_the_api_describes_itself(bridge, tmp_path):
    spec = client(bridge, tmp_path).get("/openapi.json").json()
    assert {"/v1/ocr", "/v1/md", "/v1/ground", "/v1/chat/completions", "/v1/models", "/v1/info", "/health",
            "/metrics", "/v1/results/{result}"} <= set(spec["paths"])
    body = spec["paths"]["/v1/ocr"]["post"]["requestBody"]["content"]["multipart/form-data"]["schema"]
    assert body["required"] == ["file"] and {"file", "pages", "dpi", "password", "max_new_tokens"} <= set(body["properties"])
    assert "prompt" in spec["paths"]["/v1/ground"]["post"]["requestBody"]["content"]["multipart/form-data"]["schema"]["properties"]


@pytest.mark.parametrize("case", ["ground", "ask"])
def test_grounding_and_questions_are_the_commands_records(k2, k25, page, tmp_path, case):
    """Kosmos-2 with a prompt, and a question to Kosmos-2.5 (the chat prompt): each on a server of its
    own, the record the command prints."""
    model, task, field, value, flag = {
        "ground": (k2, "ground", "prompt", "<grounding> A picture of", "--prompt"),
        "ask": (k25, "md", "question", "What is the total?", "--ask"),
    }[case]
    engine = load(model, device="cpu", compile=False)
    own = Bridge(engine, slots=2, max_new_tokens=16, max_prompt_tokens=engine.prompt_length(TASKS[task].prompt) + 256)
    try:
        (record,) = records(post(client(own, tmp_path / "uploads"), page, task=task, max_new_tokens="16",
                                 **{field: value}))
    finally:
        own.close(timeout=60)
    command = kosmos(task, page, "--model", model, flag, value, "--max-new-tokens", "16", "-f", "jsonl")
    assert command.exit_code == 0, command.stderr
    (expected,) = jsonl(command.stdout)
    assert record == {**expected, "source": "page.png"}
    if case == "ground":
        assert record["raw"].startswith(value)


def test_a_long_upload_does_not_hold_back_a_short_one(bridge, page, tmp_path):
    """Pages are taken from each request in turn: a one-page request sent after a 30-page one is done
    while most of the long one is still to come, and the pages waiting for a slot stay within the
    server's bound whatever the number of pages asked for."""
    long_pdf = make_image_pdf(tmp_path / "long.pdf", 30)
    long = bridge.submit(Upload(long_pdf, "long.pdf", TASKS["ocr"], "<ocr>", dpi=72, max_new_tokens=64))
    short = bridge.submit(Upload(page, "page.png", TASKS["ocr"], "<ocr>", max_new_tokens=64))
    waiting = []
    sampler = threading.Thread(target=lambda: [waiting.append(len(bridge.pages)) or time.sleep(0.005)
                                               for _ in range(200)])
    sampler.start()
    assert [r.page for r in short.records()] == [1]
    long_done = long._next  # pages of the long request done by then
    assert [r.page for r in long.records()] == list(range(1, 31))
    sampler.join()
    assert long_done < 10
    assert max(waiting) <= bridge.ahead


def test_a_file_name_is_only_a_label(bridge, page, tmp_path):
    uploads = tmp_path / "private" / "uploads"
    http = client(bridge, uploads)
    (record,) = records(post(http, page, name="../../escape.png", password="hunter2"))
    assert record["source"] == "escape.png"
    assert not (tmp_path / "escape.png").exists() and not (tmp_path / "private" / "escape.png").exists()
