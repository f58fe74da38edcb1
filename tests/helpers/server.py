"""A real `kosmos serve` process for tests: started on a free port, waited for until healthy."""

from __future__ import annotations

import socket
import subprocess
import time

import httpx

from tests.helpers.cli import KOSMOS


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def healthy(url: str) -> bool:
    try:
        return httpx.get(f"{url}/health").status_code == 200
    except httpx.TransportError:
        return False


def start_server(*args: str, seconds: float = 120, command: tuple[str, ...] | None = None) -> tuple[subprocess.Popen, str]:
    """`kosmos serve *args --port P` (stdout and stderr piped), the installed command unless
    ``command`` names another way to run it; returns the process and its URL once /health says 200.
    Fails (AssertionError) if it does not within ``seconds``."""
    port = free_port()
    process = subprocess.Popen([*(command or (KOSMOS,)), "serve", *map(str, args), "--port", str(port)],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + seconds
    while not healthy(url):
        if time.monotonic() > deadline or process.poll() is not None:
            process.kill()
            raise AssertionError(f"the server did not become healthy: {process.communicate()[1][-2000:]}")
        time.sleep(0.1)
    return process, url
