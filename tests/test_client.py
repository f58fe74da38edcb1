"""The command's server client, against a fake transport: a busy server (429) is asked again after
growing pauses, then given up on; a connection that drops keeps the records that came."""

import json

import httpx

from kosmos_cli import client
from kosmos_cli.tasks import TASKS


def fake(responses):
    """An httpx client whose answers are ``responses`` in turn (a status and a body, or an exception)."""
    asked = []

    def answer(request):
        asked.append(request)
        got = responses[len(asked) - 1]
        if isinstance(got, Exception):
            raise got
        status, body = got
        return httpx.Response(status, content=body)

    return httpx.Client(base_url="http://server", transport=httpx.MockTransport(answer)), asked


def record(page: int) -> bytes:
    return json.dumps({"source": "doc.pdf", "page": page, "task": "ocr", "model": "m", "text": f"page {page}"}).encode()


def test_a_busy_server_is_asked_again_then_given_up(tmp_path, monkeypatch):
    pauses = []
    monkeypatch.setattr(client.time, "sleep", pauses.append)
    doc = tmp_path / "doc.pdf"
    doc.write_bytes(b"%PDF")
    busy = (429, b'{"error": "busy"}')

    http, asked = fake([busy, busy, (200, record(1) + b"\n" + record(2) + b"\n")])
    records, error = client._ask(http, TASKS["ocr"], doc, [1, 2], {"dpi": "200"})
    assert error is None and sorted(records) == [1, 2] and pauses == [1, 2]
    assert [r.url.path for r in asked] == ["/v1/ocr"] * 3 and b'name="pages"\r\n\r\n1,2' in asked[-1].read()

    pauses.clear()
    http, asked = fake([busy] * (client.RETRIES + 1))
    records, error = client._ask(http, TASKS["ocr"], doc, [1], {})
    assert records == {} and error == "the server stayed busy (429, asked 6 times)" and pauses == [1, 2, 4, 8, 16]


def test_a_dropped_connection_keeps_what_came(tmp_path):
    doc = tmp_path / "doc.pdf"
    doc.write_bytes(b"%PDF")

    def halfway():
        yield record(1) + b"\n"
        raise httpx.ReadError("connection reset")

    http = httpx.Client(base_url="http://server", transport=httpx.MockTransport(
        lambda request: httpx.Response(200, content=halfway())))
    records, error = client._ask(http, TASKS["ocr"], doc, [1, 2], {})
    assert sorted(records) == [1] and error.startswith("the connection to the server was lost")
