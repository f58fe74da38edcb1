"""The page at `/` in a real browser (headless Chromium, driven by Playwright: tests/helpers/browser.py)
against real `kosmos serve` processes whose checkpoints write known transcripts (tests/helpers/
scripted.py): pages appear with the records' boxes, drawn where the records say at the size shown,
and their text (grounding boxes too, from a server in this process whose Kosmos-2 answers are fixed); a box and its line light up together; downloads are the `-o` writer's files; errors
show in plain words; a document's text that looks like HTML stays text; the page asks for the API
key; it reaches no other host; and it can be used with the keyboard, at 320 CSS pixels and at 200%
zoom. Screenshots (desktop and phone) go to the artifacts folder (`KOSMOS_TEST_ARTIFACTS`, else
pytest's tmp), with the browser's and Playwright's versions.
"""

from __future__ import annotations

import base64
import io
import json
import re
import signal
import time
from importlib.metadata import version

import httpx
import pypdfium2 as pdfium
import pytest
from PIL import Image, ImageDraw, ImageFont

from kosmos_cli.server.page import POLICY
from kosmos_cli.writers.overlay import CONFIDENCE_BINS, confidence_colour
from tests.helpers.browser import Tab, artifacts_folder, launch, missing
from tests.helpers.cli import needs_script, run_kosmos
from tests.helpers.damaged import overcounted_pdf
from tests.helpers.images import noise_image
from tests.helpers.server import start_server

KEY = "page-test-key"
HOSTILE = "<img src=x onerror=alert(1)>"  # a document's text, as the model reads it
BUDGET = "64"  # new tokens a page: the scripted transcripts need 27, markdown stops here
KEEP = 0.1  # minutes the guarded server keeps a result (6 s): long enough to show it, short to see it expire

pytestmark = needs_script


# --------------------------------------------------------------------------------------------------
# Servers, documents, the browser: one each per module
# --------------------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def hostile(build_once):
    """Tiny Kosmos-2.5 whose OCR transcript is one line of HTML with a script in it."""
    from tests.helpers.scripted import make_scripted_checkpoint

    transcript = "<bbox><x_10><y_10><x_200><y_40></bbox>" + HOSTILE
    return build_once("hostile", lambda path: make_scripted_checkpoint(path, transcript, lambda k: 12 if k < 6 else 8))


def _serve(*args):
    process, url = start_server(*map(str, args), "--device", "cpu", "--max-new-tokens", BUDGET, "-q")
    return process, url


def _stop(process):
    process.send_signal(signal.SIGTERM)
    process.communicate(timeout=60)


@pytest.fixture(scope="module")
def server(scripted):
    """The scripted checkpoint (three lines, confidences 0.87, 0.54, 0.42), one slot (as a local run
    decodes), uploads up to 0.25 MiB."""
    process, url = _serve("--model", scripted, "--batch-size", "1", "--max-upload-mb", "0.25")
    yield url
    _stop(process)


@pytest.fixture(scope="module")
def guarded(hostile):
    """The hostile checkpoint behind an API key, results kept for `KEEP` minutes."""
    process, url = _serve("--model", hostile, "--api-key", KEY, "--keep-results", KEEP)
    yield url
    _stop(process)


@pytest.fixture(scope="module")
def unkept(scripted):
    """The scripted checkpoint on a server that keeps no results."""
    process, url = _serve("--model", scripted, "--keep-results", "0")
    yield url
    _stop(process)


@pytest.fixture(scope="module")
def grounding(k2):
    """Tiny Kosmos-2 (random: it writes a caption and, in practice, no boxes)."""
    process, url = start_server("--model", k2, "--device", "cpu", "--max-new-tokens", "16", "-q")
    yield url
    _stop(process)


@pytest.fixture
def grounded_boxes(k2, fixed_answers, tmp_path):
    """A server in this process on the tiny Kosmos-2, whose answers are fixed before parsing
    (`fixed_answers`: a caption with grounded phrases and their boxes) and then go the real way: the
    task's parser, the record, the stream. A random Kosmos-2 writes no boxes."""
    import threading

    import uvicorn

    from kosmos_cli import load
    from kosmos_cli.server.app import ServerConfig, create_app
    from kosmos_cli.server.bridge import Bridge
    from tests.helpers.server import free_port, healthy

    engine = load(k2, device="cpu", compile=False)
    bridge = Bridge(engine, slots=1, max_new_tokens=16, max_prompt_tokens=engine.prompt_length("<grounding> An image of") + 64)
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(create_app(engine, bridge, ServerConfig(uploads=tmp_path / "uploads")),
                                           host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while not healthy(url):
        assert time.monotonic() < deadline, "the in-process server did not start"
        time.sleep(0.05)
    yield url
    server.should_exit = True
    thread.join(30)
    bridge.close(timeout=30)


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory):
    return artifacts_folder(tmp_path_factory)


@pytest.fixture(scope="module")
def browser(artifacts):
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        missing("Playwright's Python package is not installed: pip install -e \".[test]\"")
    with sync_playwright() as playwright:
        browser = launch(playwright)
        versions = f"Chromium {browser.version}, Playwright {version('playwright')}"
        (artifacts / "versions.txt").write_text(versions + "\n")
        print(versions)
        yield browser
        browser.close()


@pytest.fixture
def tab(browser, server):
    tab = Tab.open(browser, server + "/")
    yield tab
    tab.close()


def _lines_page(size, lines, shade) -> Image.Image:
    """A page with each of the transcript's lines (text, polygon) written inside its box."""
    page = Image.new("RGB", size, shade)
    draw = ImageDraw.Draw(page)
    for text, polygon in lines:
        x0, y0, y1 = polygon[0], polygon[1], polygon[5]
        draw.text((x0 + 4, y0 + 1), text, fill=(20, 20, 20), font=ImageFont.load_default(size=int((y1 - y0) * 0.8)))
    return page


@pytest.fixture(scope="module")
def documents(server, tmp_path_factory):
    """``doc.pdf``: two pages (images) on which the scripted transcript's lines are written where the
    model will put their boxes (asked of the server on a blank page of the same size; at 72 dpi a
    576×288 pt page is rendered 576×288 px); ``photo.png``: one such page as an image."""
    folder = tmp_path_factory.mktemp("page-documents")
    size = (576, 288)
    blank = io.BytesIO()
    Image.new("RGB", size, "white").save(blank, format="PNG")
    answer = httpx.post(f"{server}/v1/ocr", files={"file": ("blank.png", blank.getvalue())}, timeout=60)
    (record,) = [json.loads(line) for line in answer.text.splitlines()]
    lines = [(line["text"], line["polygon"]) for line in record["lines"]]
    pages = [_lines_page(size, lines, shade) for shade in ((250, 248, 240), (240, 246, 250))]
    pdf = pdfium.PdfDocument.new()
    for image in pages:
        page = pdf.new_page(*size)
        picture = pdfium.PdfImage.new(pdf)
        picture.set_bitmap(pdfium.PdfBitmap.from_pil(image))
        picture.set_matrix(pdfium.PdfMatrix().scale(*size))
        page.insert_obj(picture)
        page.gen_content()
        page.close()
    pdf.save(str(folder / "doc.pdf"))
    pdf.close()
    pages[0].save(folder / "photo.png")
    return folder


# --------------------------------------------------------------------------------------------------
# Driving the page
# --------------------------------------------------------------------------------------------------


def ready(tab: Tab) -> None:
    tab.page.wait_for_function("() => !document.getElementById('run').disabled")


def transcribe(tab: Tab, path, task: str | None = None, dpi: str | None = None, pages: int | None = None) -> str | None:
    """Choose ``path`` and run; waits until the page says it is done (and, with ``pages``, until that
    many page images have loaded) or shows an error. Returns the result id the answer named."""
    page = tab.page
    ready(tab)
    page.set_input_files("#file", str(path))
    if task:
        page.select_option("#task", task)
    page.fill("#dpi", dpi or "")
    answers = []
    listen = lambda response: answers.append(response) if response.request.method == "POST" else None
    page.on("response", listen)
    page.click("#run")
    settle(tab, pages)
    page.remove_listener("response", listen)
    return answers[-1].headers.get("x-kosmos-result") if answers else None  # none when the connection broke


def settle(tab: Tab, pages: int | None = None) -> None:
    tab.page.wait_for_function("""() => document.getElementById('status').textContent.startsWith('Done')
                                  || !document.getElementById('error').hidden""", timeout=60_000)
    if pages:
        tab.page.wait_for_function(f"() => document.querySelectorAll('.sheet.loaded').length === {pages}",
                                   timeout=30_000)


def error(tab: Tab) -> str | None:
    box = tab.page.locator("#error")
    return box.text_content() if box.is_visible() else None


def kept_records(url: str, result: str, key: str | None = None) -> list[dict]:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    answer = httpx.get(f"{url}/v1/results/{result}", headers=headers)
    assert answer.status_code == 200, answer.text
    return [json.loads(line) for line in answer.text.splitlines()]


# What the page shows of each page: the image's place and natural size, every box's corners in the
# window's CSS pixels (the SVG's own transform applied), the boxes' stroke colours, the lines' text.
DRAWN = """() => [...document.querySelectorAll("#results .page")].map((section) => {
  const img = section.querySelector("img.page-img");
  const box = img.getBoundingClientRect();
  const shapes = [...section.querySelectorAll("polygon.shape")];
  return {
    image: [box.left, box.top, box.width, box.height], natural: [img.naturalWidth, img.naturalHeight],
    corners: shapes.map((shape) => Array.from(shape.points, (point) =>
      new DOMPoint(point.x, point.y).matrixTransform(shape.getScreenCTM())).map((p) => [p.x, p.y])),
    strokes: shapes.map((shape) => getComputedStyle(shape).stroke),
    texts: [...section.querySelectorAll(".lines .item-text")].map((item) => item.textContent),
    confidences: [...section.querySelectorAll(".lines .conf")].map((item) => item.textContent),
  };
})"""


def assert_drawn_as_recorded(tab: Tab, records: list[dict]) -> None:
    """Each page's boxes are its record's polygons scaled to the image as displayed, in the colour of
    the overlay PNGs' bin, and its text is the record's lines."""
    drawn = tab.page.evaluate(DRAWN)
    assert len(drawn) == len(records)
    for page, record in zip(drawn, records):
        left, top, width, height = page["image"]
        assert page["natural"] == [record["width"], record["height"]]  # the PNG is the page the polygons are on
        assert width > 0 and height > 0
        expected = [[[left + x * width / record["width"], top + y * height / record["height"]]
                     for x, y in zip(line["polygon"][0::2], line["polygon"][1::2])] for line in record["lines"]]
        assert len(page["corners"]) == len(expected) == 3
        for got, want in zip(page["corners"], expected):
            assert got == [pytest.approx(point, abs=0.05) for point in want]
        assert page["strokes"] == ["rgb({}, {}, {})".format(*confidence_colour(line["confidence"]))
                                   for line in record["lines"]]
        assert page["texts"] == [line["text"] for line in record["lines"]]
        assert page["confidences"] == [f"{line['confidence']:.2f}" for line in record["lines"]]


# --------------------------------------------------------------------------------------------------
# Tests
# --------------------------------------------------------------------------------------------------


def test_the_page_loads_without_the_key_and_sends_its_policy(guarded):
    """The page and its files need no key (the API does), carry the policy and nosniff, revalidate
    with their ETag, and keep the loopback Host check."""
    for path in ("/", "/static/page.js", "/static/markdown.js", "/static/page.css", "/static/icon.svg"):
        answer = httpx.get(guarded + path)
        assert answer.status_code == 200, path
        assert answer.headers["content-security-policy"] == POLICY and POLICY.startswith("default-src 'self';")
        assert answer.headers["x-content-type-options"] == "nosniff"
        assert answer.headers["cache-control"] == "no-cache"
        again = httpx.get(guarded + path, headers={"If-None-Match": answer.headers["etag"]})
        assert again.status_code == 304 and again.content == b""
    assert httpx.get(guarded + "/").headers["content-type"] == "text/html; charset=utf-8"
    assert httpx.get(guarded + "/static/page.js").headers["content-type"].startswith("text/javascript")
    assert httpx.get(guarded + "/v1/info").status_code == 401
    assert httpx.get(guarded + "/static/other.js").status_code == 401  # not the page's: the API's rules
    assert httpx.get(guarded + "/static/other.js", headers={"Authorization": f"Bearer {KEY}"}).status_code == 404
    elsewhere = httpx.get(guarded + "/", headers={"Host": "evil.example"})
    assert elsewhere.status_code == 403


def test_pages_show_the_records_boxes_and_text(tab, server, documents, artifacts):
    page = tab.page
    ready(tab)
    assert page.locator("#task option").all_text_contents() == ["OCR: lines with their boxes", "Markdown"]
    result = transcribe(tab, documents / "doc.pdf", dpi="72", pages=2)
    assert error(tab) is None
    records = kept_records(server, result)
    assert [(r["source"], r["page"], r["width"], r["height"]) for r in records] == [("doc.pdf", 1, 576, 288),
                                                                                    ("doc.pdf", 2, 576, 288)]
    assert page.text_content("#status").startswith("Done: 2 / 2 pages in ")
    assert page.locator("#results .page h2").all_text_contents() == ["Page 1", "Page 2"]
    assert_drawn_as_recorded(tab, records)
    # The legend: the overlay's bins and unknown, in its words.
    assert page.locator("#legend-list li").all_text_contents() == [label for *_, label in CONFIDENCE_BINS] + ["unknown"]
    page.locator("polygon.shape").nth(1).hover()  # the screenshot shows a box and its line lit up
    page.screenshot(path=str(artifacts / "page-desktop.png"), full_page=True)

    page.set_viewport_size({"width": 390, "height": 844})  # a phone: the boxes shrink with the image
    assert_drawn_as_recorded(tab, records)
    page.screenshot(path=str(artifacts / "page-phone.png"), full_page=True)
    tab.assert_clean()


def test_a_box_and_its_line_light_up_together(tab, documents):
    page = tab.page
    transcribe(tab, documents / "photo.png", pages=1)
    hot = lambda: page.evaluate("""() => [...document.querySelectorAll('#results .hot')].map(
        (e) => `${e.tagName.toLowerCase()}:${e.dataset.line}`).sort()""")
    box, line = page.locator("polygon.shape"), page.locator(".lines li")

    box.nth(1).hover()
    assert hot() == ["li:1", "polygon:1"]
    page.hover("h1")
    assert hot() == []
    line.nth(2).hover()
    assert hot() == ["li:2", "polygon:2"]
    page.hover("h1")

    box.nth(0).focus()  # focus, from the keyboard: Tab moves on to the next box
    assert hot() == ["li:0", "polygon:0"]
    page.keyboard.press("Tab")
    assert page.evaluate("() => document.activeElement.dataset.line") == "1"
    assert hot() == ["li:1", "polygon:1"]
    line.nth(2).focus()
    assert hot() == ["li:2", "polygon:2"]
    page.keyboard.press("Shift+Tab")
    assert hot() == ["li:1", "polygon:1"]
    tab.assert_clean()


def test_downloads_are_the_o_writers_files(tab, server, scripted, documents, tmp_path):
    page = tab.page
    result = transcribe(tab, documents / "doc.pdf", dpi="72", pages=2)
    names = page.locator("#download-buttons button").all_text_contents()
    assert names == ["doc.txt", "doc.json", "doc.pdf", "doc.hocr", "doc.alto.xml", "doc.jsonl"]
    got = {}
    for name in ("doc.json", "doc.jsonl"):
        with page.expect_download() as download:
            page.get_by_role("button", name=f"Download {name}", exact=True).click()
        assert download.value.suggested_filename == name
        got[name] = download.value.path().read_bytes()

    local = run_kosmos("ocr", "doc.pdf", "--model", scripted, "--device", "cpu", "--batch-size", "1",
                       "--dpi", "72", "--max-new-tokens", BUDGET, "-o", tmp_path / "out", "--outputs", "json",
                       cwd=documents)
    assert local.returncode == 0, local.stderr
    assert got["doc.json"] == (tmp_path / "out" / "doc.json").read_bytes()
    assert got["doc.jsonl"].decode() == httpx.get(f"{server}/v1/results/{result}").text
    assert error(tab) is None
    tab.assert_clean()


def test_errors_show_in_plain_words_and_the_page_stays_usable(tab, server, documents, tmp_path):
    page = tab.page
    ready(tab)
    big = tmp_path / "big.png"
    noise_image(400, 300, seed=1).save(big)  # about 350 KB, past the server's 0.25 MiB
    posts = len([r for r in tab.requests if r[0] == "POST"])
    page.set_input_files("#file", str(big))
    page.click("#run")
    said = re.fullmatch(r"big\.png is ([0-9.]+) KB: larger than this server takes \(256 KB\)\. Nothing was sent\.",
                        error(tab))
    assert said and float(said[1]) == pytest.approx(big.stat().st_size / 1024, abs=0.05)
    assert len([r for r in tab.requests if r[0] == "POST"]) == posts  # refused before uploading

    # The server's own limit (the bytes counted as they arrive), for a page told a larger one.
    def larger_limit(route):
        info = route.fetch().json()
        info["limits"]["max_upload_bytes"] = 2**30
        route.fulfill(json=info)

    page.route("**/v1/info", larger_limit)
    page.reload()
    transcribe(tab, big)
    assert error(tab) == "Too large for this server: the upload is larger than this server takes (262144 bytes)."
    page.unroute("**/v1/info")
    page.reload()

    junk = tmp_path / "junk.png"
    junk.write_bytes(b"not an image at all")
    transcribe(tab, junk)
    assert error(tab).startswith("The server cannot read this file: junk.png: ")

    # What the server and the network do at other times, played to the page by the browser's routing:
    # the server's answer when its queue is full, a connection that breaks, a stream cut after a page.
    page.route("**/v1/ocr", lambda route: route.fulfill(
        status=429, headers={"Retry-After": "2"}, content_type="application/json",
        body=json.dumps({"error": "64 requests are waiting already; try again shortly"})))
    transcribe(tab, documents / "photo.png")
    assert error(tab) == "The server is busy: 64 requests are waiting already; try again shortly. Try again in 2 s."
    page.unroute("**/v1/ocr")
    page.route("**/v1/ocr", lambda route: route.abort("connectionreset"))
    transcribe(tab, documents / "photo.png")
    assert error(tab).startswith("The connection to the server was lost, or it cannot be reached")
    page.unroute("**/v1/ocr")

    with open(documents / "doc.pdf", "rb") as pdf:  # the server's real answer, cut after its first record
        answer = httpx.post(f"{server}/v1/ocr", files={"file": ("doc.pdf", pdf)}, data={"dpi": "72"}, timeout=60)
    assert answer.headers["x-kosmos-pages"] == "2"
    page.route("**/v1/ocr", lambda route: route.fulfill(
        status=200, headers={"X-Kosmos-Pages": "2"}, content_type="application/x-ndjson",
        body=answer.text.splitlines(keepends=True)[0]))
    transcribe(tab, documents / "doc.pdf", dpi="72")
    assert error(tab).startswith("The answer stopped after 1 of 2 pages: the connection to the server was lost.")
    assert page.locator("#results .page").count() == 1
    page.unroute("**/v1/ocr")

    # A page that cannot be rendered: its record's error, in the page's place; the others as usual.
    overcounted_pdf(tmp_path / "three.pdf")  # pdfium counts 3 pages and cannot load the third
    result = transcribe(tab, tmp_path / "three.pdf", dpi="72", pages=2)
    assert error(tab) is None and page.text_content("#status").startswith("Done: 3 / 3 pages")
    assert page.locator("#results .page h2").all_text_contents() == ["Page 1", "Page 2", "Page 3"]
    failed = [record["error"] for record in kept_records(server, result)]
    assert failed[:2] == [None, None] and "cannot load page" in failed[2]
    assert page.locator(".page-error").all_text_contents() == [f"This page failed: {failed[2]}"]

    transcribe(tab, documents / "doc.pdf", dpi="72", pages=2)  # and it still works
    assert error(tab) is None and page.locator("#results .page").count() == 2
    assert tab.violations() == [] and tab.errors == []


def test_markdown_shows_as_text_or_rendered(tab, server, documents):
    page = tab.page
    result = transcribe(tab, documents / "photo.png", task="md", pages=1)
    (record,) = kept_records(server, result)
    assert record["task"] == "md" and record["truncated"] and "<" in record["text"]  # tags the model wrote
    assert page.locator(".flag").text_content() == "cut at the token budget"
    assert page.locator("#legend").is_hidden() and page.locator("#md-view").is_visible()
    rendered = page.locator("#results .md").text_content()
    assert rendered == record["text"].replace("\n", "")  # no markdown in it: only text, its tags as text
    page.get_by_label("text", exact=True).check()
    assert page.locator("#results .md pre").text_content() == record["text"]
    assert page.evaluate("() => document.querySelectorAll('#results .md *').length") == 1  # the <pre> alone
    assert page.locator("#download-buttons button").all_text_contents() == ["photo.md", "photo.jsonl"]
    tab.assert_clean()


MARKDOWN = f"""# Title with <b>tags</b>

A paragraph with **strong**, *emphasis*, `code <i>`, a [link](https://example.com/x) and
![a chart](https://example.com/c.png).
{HOSTILE}<script>alert(2)</script>

- one
- two <iframe src=https://example.com>

| a | b |
|---|--:|
| <svg onload=alert(3)> | 2 |
"""


def test_the_markdown_renderer_builds_only_safe_elements(tab):
    """The page's own renderer: markdown becomes elements, HTML in the text stays text."""
    ready(tab)
    got = tab.page.evaluate("""async (text) => {
      const { renderMarkdown } = await import("/static/markdown.js");
      const box = document.createElement("div");
      box.appendChild(renderMarkdown(text));
      document.body.appendChild(box);
      return { tags: [...box.querySelectorAll("*")].map((e) => e.tagName.toLowerCase()),
               attributes: [...box.querySelectorAll("*")].flatMap((e) => e.getAttributeNames()),
               text: box.textContent, h3: box.querySelector("h3").textContent,
               cells: [...box.querySelectorAll("td")].map((e) => e.textContent) };
    }""", MARKDOWN)
    assert set(got["tags"]) == {"h3", "p", "strong", "em", "code", "span", "br", "ul", "li", "div", "table", "thead",
                                "tbody", "tr", "th", "td"}
    assert set(got["attributes"]) <= {"class", "title"}  # the link's address only as a tooltip
    assert got["h3"] == "Title with <b>tags</b>"
    for literal in (HOSTILE, "<script>alert(2)</script>", "<iframe src=https://example.com>", "code <i>"):
        assert literal in got["text"]
    assert got["cells"] == ["<svg onload=alert(3)>", "2"]
    time.sleep(0.2)  # an onerror/onload would have run by now
    tab.assert_clean()


DROP = """async ([name, data]) => {
  const bytes = Uint8Array.from(atob(data), (c) => c.charCodeAt(0));
  const files = new DataTransfer();
  files.items.add(new File([bytes], name, { type: "image/png" }));
  const drop = document.getElementById("drop");
  for (const kind of ["dragover", "drop"]) {
    drop.dispatchEvent(new DragEvent(kind, { dataTransfer: files, bubbles: true, cancelable: true }));
  }
}"""


def enter_key(tab: Tab, key: str) -> None:
    tab.page.wait_for_selector("#key-form", state="visible")
    tab.page.get_by_label("API key").fill(key)
    tab.page.get_by_role("button", name="Use this key").click()


def test_the_key_is_asked_once_and_a_documents_html_stays_text(browser, guarded, hostile, documents):
    tab = Tab.open(browser, guarded + "/")
    page = tab.page
    enter_key(tab, "wrong")
    page.wait_for_function("() => document.getElementById('key-why').textContent.includes('refused')")
    before = len(tab.requests)
    enter_key(tab, KEY)
    ready(tab)
    assert page.text_content("#model").startswith(f"{hostile} (kosmos-2.5) · uploads up to 100 MB")

    page.evaluate(DROP, ["scan.png", base64.b64encode((documents / "photo.png").read_bytes()).decode()])
    assert page.text_content("#drop-hint") == "Dropped: scan.png"
    with page.expect_response(lambda r: r.url.endswith("/v1/ocr")) as answer:
        page.click("#run")
    settle(tab, pages=1)
    (record,) = kept_records(guarded, answer.value.headers["x-kosmos-result"], KEY)
    assert [line["text"] for line in record["lines"]] == [HOSTILE]
    assert page.locator(".lines .item-text").all_text_contents() == [HOSTILE]
    confidence = f"{record['lines'][0]['confidence']:.2f}"
    assert page.locator("polygon.shape title").text_content() == f"Line 1: {HOSTILE} (confidence {confidence})"
    # One image on the page: the page PNG, fetched with the key and shown from a blob: URL.
    assert page.evaluate("() => [...document.images].map((i) => i.src.split(':')[0])") == ["blob"]
    time.sleep(0.2)
    assert not any(url.split("?")[0].endswith("/x") for _, url, _ in tab.requests)

    # The page and its files came without a key; every API call since the key was entered sent it.
    files = [(url.removeprefix(guarded), headers) for _, url, headers in tab.requests if "/v1/" not in url]
    assert {"/", "/static/page.css", "/static/page.js", "/static/markdown.js"} <= {path for path, _ in files}
    assert not any("authorization" in headers for _, headers in files)
    since = [(url.removeprefix(guarded), headers.get("authorization")) for _, url, headers in tab.requests[before:]
             if "/v1/" in url]
    result = answer.value.headers["x-kosmos-result"]
    assert [url for url, _ in since] == ["/v1/info", "/v1/ocr", f"/v1/results/{result}/pages/1.png"]
    assert {key for _, key in since} == {f"Bearer {KEY}"}
    page.reload()  # the key stays with the tab
    ready(tab)
    assert page.locator("#key-form").is_hidden()
    tab.assert_clean()
    other = tab.context.new_page()  # another tab asks again
    other.goto(guarded + "/")
    other.wait_for_selector("#key-form", state="visible")
    tab.close()


def test_an_expired_result_says_so(browser, guarded, documents):
    tab = Tab.open(browser, guarded + "/")
    enter_key(tab, KEY)
    result = transcribe(tab, documents / "photo.png", pages=1)
    deadline = time.monotonic() + 30
    while httpx.get(f"{guarded}/v1/results/{result}", headers={"Authorization": f"Bearer {KEY}"}).status_code != 404:
        assert time.monotonic() < deadline
        time.sleep(0.25)
    tab.page.get_by_role("button", name="Download photo.json", exact=True).click()
    tab.page.wait_for_selector("#error", state="visible")
    assert error(tab) == (f"photo.json: the server no longer keeps this result (it keeps results {KEEP} minutes). "
                          "Run the document again to download it.")
    transcribe(tab, documents / "photo.png", pages=1)  # and it goes on
    assert error(tab) is None
    assert tab.violations() == [] and tab.errors == []
    tab.close()


def test_without_kept_results_the_page_says_why(browser, unkept, documents):
    tab = Tab.open(browser, unkept + "/")
    transcribe(tab, documents / "photo.png")
    page = tab.page
    assert error(tab) is None
    assert page.text_content("#results .note") == ("This server keeps no results (--keep-results 0), so the pages "
                                                   "show without their image and there is nothing to download.")
    assert page.locator("polygon.shape").count() == 3 and page.locator(".lines li").count() == 3
    assert page.evaluate("() => document.querySelector('img.page-img').getAttribute('src')") is None
    assert page.locator("#downloads").is_hidden()
    tab.assert_clean()
    tab.close()


# The controls and other focusable elements, in document order, with Chromium's computed names.
FOCUSABLE = """() => {
  const shown = (e) => e.getClientRects().length > 0 && getComputedStyle(e).visibility !== "hidden";
  const all = [...document.querySelectorAll("a[href], button, input, select, textarea, [tabindex]")]
    .filter((e) => shown(e) && !e.disabled && e.tabIndex >= 0 && !(e.type === "radio" && !e.checked));
  all.forEach((e, k) => { e.dataset.order = String(k); });
  return all.length;
}"""


def test_keyboard_labels_and_narrow_screens(tab, documents, artifacts):
    page = tab.page
    transcribe(tab, documents / "doc.pdf", dpi="72", pages=2)

    # Every control has a name (Chromium's accessibility tree: what a screen reader reads).
    cdp = tab.context.new_cdp_session(page)
    nodes = cdp.send("Accessibility.getFullAXTree")["nodes"]
    focusable = [n for n in nodes if any(p["name"] == "focusable" and p["value"]["value"]
                                         for p in n.get("properties", [])) and not n.get("ignored")]
    unnamed = [(n["role"]["value"], n.get("name")) for n in focusable if n["role"]["value"] not in {"RootWebArea"}
               and not (n.get("name") or {}).get("value", "").strip()]
    assert len(focusable) > 20 and unnamed == []
    roles = {n["role"]["value"] for n in focusable}
    assert {"button", "combobox", "textbox", "spinbutton", "image", "listitem"} <= roles

    # Tab from the top reaches every control, box and line, in document order, and shows where it is.
    count = page.evaluate(FOCUSABLE)
    page.click("h1")  # the start of sequential focus navigation: the top of the page
    order = []
    for _ in range(count):
        page.keyboard.press("Tab")
        order.append(page.evaluate("() => document.activeElement.dataset.order"))
    assert order == [str(k) for k in range(count)]
    page.focus("#run")
    page.keyboard.press("Shift+Tab")
    page.keyboard.press("Tab")
    assert page.evaluate("() => getComputedStyle(document.activeElement).outlineStyle") == "solid"

    # No sideways scrolling at 320 CSS pixels, nor at 200% zoom (a 1280-pixel window shows 640 CSS
    # pixels), with the markdown view's long unbroken text too.
    for width in (640, 320):
        page.set_viewport_size({"width": width, "height": 800})
        assert page.evaluate("() => document.documentElement.scrollWidth") <= width
    page.screenshot(path=str(artifacts / "page-320.png"), full_page=True)
    transcribe(tab, documents / "photo.png", task="md", pages=1)
    for width in (320, 640):
        page.set_viewport_size({"width": width, "height": 800})
        assert page.evaluate("() => document.documentElement.scrollWidth") <= width
    tab.assert_clean()


def test_kosmos2_asks_for_a_prompt_and_shows_its_caption(browser, grounding, documents):
    tab = Tab.open(browser, grounding + "/")
    page = tab.page
    ready(tab)
    assert page.locator("#task option").all_text_contents() == ["Grounded caption"]
    assert page.get_by_label("Prompt (empty: the model's, <grounding> An image of)").is_visible()
    page.fill("#prompt", "<grounding> A page")
    result = transcribe(tab, documents / "photo.png", pages=1)
    (record,) = kept_records(grounding, result)
    assert record["task"] == "ground" and record["text"].startswith("A page")  # the prompt reached the model
    assert page.text_content("#results .caption") == record["text"]
    assert page.locator("#results rect.shape").count() == sum(len(e["boxes"]) for e in record["entities"])
    assert page.locator("#download-buttons button").all_text_contents() == ["photo.txt", "photo.json", "photo.jsonl"]
    tab.assert_clean()
    tab.close()


# Every grounding box's corners in the window's CSS pixels, and the image's place.
RECTS = """() => {
  const box = document.querySelector("#results img.page-img").getBoundingClientRect();
  const rects = [...document.querySelectorAll("#results rect.shape")].map((rect) => {
    const m = rect.getScreenCTM(), b = rect.getBBox();
    const a = new DOMPoint(b.x, b.y).matrixTransform(m), z = new DOMPoint(b.x + b.width, b.y + b.height).matrixTransform(m);
    return [a.x, a.y, z.x, z.y];
  });
  return {image: [box.left, box.top, box.width, box.height], rects};
}"""


def test_grounding_boxes_are_drawn_where_the_record_puts_them(browser, grounded_boxes, documents):
    tab = Tab.open(browser, grounded_boxes + "/")
    page = tab.page
    result = transcribe(tab, documents / "photo.png", pages=1)
    (record,) = kept_records(grounded_boxes, result)
    boxes = [box for entity in record["entities"] for box in entity["pixel_boxes"]]  # the page's pixels
    assert len(record["entities"]) == 2 and len(boxes) >= 2  # the fixed answer's "a snowman" and "a fire"
    drawn = page.evaluate(RECTS)
    left, top, width, height = drawn["image"]
    sx, sy = width / record["width"], height / record["height"]
    assert width > 0 and height > 0
    assert drawn["rects"] == [[pytest.approx(v, abs=0.05) for v in (left + x0 * sx, top + y0 * sy,
                                                                      left + x1 * sx, top + y1 * sy)]
                              for x0, y0, x1, y1 in boxes]
    assert page.locator("#results .entities .item-text").all_text_contents() == [e["text"] for e in record["entities"]]
    first = page.locator("#results rect.shape").first
    first.hover()
    assert "hot" in page.locator("#results .entities li").first.get_attribute("class")
    tab.assert_clean()
    tab.close()


def test_a_missing_chromium_fails_in_ci_and_skips_elsewhere(monkeypatch):
    from tests.helpers import browser as helper

    monkeypatch.setattr(helper, "CHROMIUM", "/nonexistent/chromium")
    for ci, outcome in (("true", pytest.fail.Exception), ("", pytest.skip.Exception), ("false", pytest.skip.Exception)):
        monkeypatch.setenv("CI", ci)
        with pytest.raises(outcome, match="no Chromium at /nonexistent/chromium: `apt-get install chromium`"):
            helper.launch(None)
