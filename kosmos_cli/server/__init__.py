"""`kosmos serve`: one warm model for many clients.

`app` holds the HTTP routes, `bridge` the way every request's pages reach the engine's one running
batch. `serve` loads the model (a model that cannot load ends the command as a run would), starts the
server, warms the model up with one page (/health says 503 until then) and, on SIGTERM or Ctrl-C,
stops taking requests, lets those running finish within ``grace`` seconds and exits.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import signal
import sys
import tempfile
import threading
from pathlib import Path

from PIL import Image

__all__ = ["FOLDER_PREFIX", "SERVE_REQUIREMENTS", "remove_stale_folders", "serve"]

FOLDER_PREFIX = "kosmos-serve-"  # a server's private folder in the temporary directory

# What the server needs beyond kosmos' own dependencies, as pyproject.toml's `serve` extra pins it.
SERVE_REQUIREMENTS = ('"fastapi>=0.115,<1"', '"uvicorn>=0.30,<1"', '"python-multipart>=0.0.18,<0.1"',
                      '"prometheus-client>=0.20,<1"')


def serve(engine, *, host: str, port: int, api_key: str | None, slots: int | None, max_new_tokens: int | None,
          dpi: float, max_upload_bytes: int, max_pages: int, max_queue: int, keep_minutes: float, keep_bytes: int,
          cors_origin: str | None, grace: float, quiet: bool, workers=None) -> int:
    """Run the server until it is stopped; returns the exit code. ``engine``: the loaded engine, or
    with ``workers`` (`EngineSpec`s, one a device) the model's `Checkpoint`, its engines loaded in
    worker processes (a model that cannot load there ends the command as a run would)."""
    import uvicorn

    from ..distributed.processes import WorkersLost
    from ..tasks import tasks_for
    from .app import MAX_QUESTION_TOKENS, ServerConfig, create_app, is_loopback
    from .bridge import Bridge, Upload

    logger = logging.getLogger("kosmos.server")
    if not logger.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("kosmos: %(message)s"))
        logger.addHandler(handler)
        logger.propagate = False
    logger.setLevel(logging.WARNING if quiet else logging.INFO)

    tasks = tasks_for(engine.kind)
    longest = max(engine.prompt_length(task.prompt) for task in tasks) + MAX_QUESTION_TOKENS
    budget = max_new_tokens or max(task.max_new_tokens for task in tasks)
    try:
        bridge = Bridge(engine, slots=slots, max_new_tokens=budget, max_prompt_tokens=longest, workers=workers)
    except WorkersLost as err:
        logger.error(str(err))
        return 2 if err.wrong_model else 1
    config = ServerConfig(host=host, api_key=api_key, max_upload_bytes=max_upload_bytes, max_pages=max_pages,
                          max_queue=max_queue, keep_minutes=keep_minutes, keep_bytes=keep_bytes, cors_origin=cors_origin,
                          dpi=dpi)
    remove_stale_folders(config.uploads)
    if not is_loopback(host) and api_key is None:
        logger.warning(f"listening on {host} without an API key: anyone who can reach this port can use the model "
                       "and read what it returns; set --api-key (or KOSMOS_API_KEY) and put a TLS-terminating proxy "
                       "in front")
    ready = threading.Event()

    def warm_up():
        page = config.uploads / "warm-up.png"
        Image.new("RGB", (64, 64), "white").save(page)
        submission = bridge.submit(Upload(page, page.name, tasks[0], tasks[0].prompt, max_new_tokens=4))
        list(submission.records())
        page.unlink()
        ready.set()
        logger.info(f"ready: {engine}, http://{host}:{port}")

    app = create_app(engine, bridge, config, ready)
    threading.Thread(target=warm_up, name="kosmos-warm-up", daemon=True).start()
    # A second before uvicorn cancels what still runs, the requests left end with a record saying why.
    ending = lambda: bridge.abort("the server is shutting down")
    server = _server_class(uvicorn, max(0.0, grace - 1), ending)(
        uvicorn.Config(app, host=host, port=port, log_level="warning", access_log=False,
                       timeout_graceful_shutdown=grace))
    try:
        server.run()
    finally:
        bridge.close(timeout=grace)
        shutil.rmtree(config.uploads, ignore_errors=True)
    return 0


def remove_stale_folders(mine: Path) -> None:
    """Delete the private folders (uploads, kept results) that servers which are gone left behind: a
    folder names its server's process in a file ``pid``; ``mine`` gets this one's."""
    (mine / "pid").write_text(str(os.getpid()))
    for folder in Path(tempfile.gettempdir()).glob(f"{FOLDER_PREFIX}*"):
        if folder == mine or not folder.is_dir():
            continue
        try:
            pid = int((folder / "pid").read_text())
            os.kill(pid, 0)  # still running: leave it
            continue
        except (FileNotFoundError, ValueError, ProcessLookupError):
            shutil.rmtree(folder, ignore_errors=True)
        except PermissionError:  # another user's server, alive
            continue


def _server_class(uvicorn, grace: float, end_requests):
    """uvicorn's server with the command's signal rules: the first SIGTERM or Ctrl-C stops taking
    requests and lets those running finish for ``grace`` seconds, then calls ``end_requests``, and
    the command exits 0; a second one exits at once with 130. (uvicorn's own handlers would end the
    process by the signal.)"""

    class Server(uvicorn.Server):
        @contextlib.contextmanager
        def capture_signals(self):
            if threading.current_thread() is not threading.main_thread():
                yield
                return

            def stop(signum, frame):
                if self.should_exit:
                    os._exit(130)
                logging.getLogger("kosmos.server").info("stopping: no new requests; a second signal ends it at once")
                self.should_exit = True
                timer = threading.Timer(grace, end_requests)
                timer.daemon = True
                timer.start()

            originals = {sig: signal.signal(sig, stop) for sig in (signal.SIGINT, signal.SIGTERM)}
            try:
                yield
            finally:
                for sig, handler in originals.items():
                    signal.signal(sig, handler)

    return Server
