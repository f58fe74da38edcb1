"""A real browser for the tests of the page at `/`: headless Chromium from Debian's `chromium` package,
driven by Playwright's Python package (never `playwright install`: it downloads a browser).

Without either, the tests skip with a message saying what to install; in CI (`CI=true`) they fail with
it instead, so that CI cannot pass without running them. A `Tab` is one page in a fresh browser
context that records every request the page makes (Playwright's request routing), every console
message, uncaught error, dialog and Content-Security-Policy violation.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

import pytest

CHROMIUM = os.environ.get("KOSMOS_CHROMIUM", "/usr/bin/chromium")
# Without the background-networking flags Chromium tries to reach Google's services (and, offline,
# floods the log with refused connections); the page's requests are its own either way.
ARGS = ["--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync"]
# Every CSP violation the page sees, kept where the test can read it (an init script runs before the
# page's own and, injected by the browser, is not subject to the page's policy).
_WATCH = """
window.__violations = [];
document.addEventListener("securitypolicyviolation", (e) => window.__violations.push(
  `${e.violatedDirective} blocked ${e.blockedURI || "inline"} in ${e.sourceFile}:${e.lineNumber}`));
"""


def in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() not in {"", "0", "false", "no"}


def missing(message: str) -> None:
    """Skip with ``message``, or fail with it in CI."""
    if in_ci():
        pytest.fail(f"{message} (CI=true: the browser tests must run)", pytrace=False)
    pytest.skip(message)


def launch(playwright):
    """Chromium at `CHROMIUM`, headless, or `missing`."""
    if not (os.path.isfile(CHROMIUM) and os.access(CHROMIUM, os.X_OK)):
        missing(f"no Chromium at {CHROMIUM}: `apt-get install chromium` (Debian's package; .ci/run installs it), "
                "or set KOSMOS_CHROMIUM to another Chromium")
    return playwright.chromium.launch(executable_path=CHROMIUM, args=ARGS)


@dataclass
class Tab:
    """One page of its own browser context, and what it did."""

    context: object
    page: object
    requests: list = field(default_factory=list)  # (method, url, headers), in order
    console: list = field(default_factory=list)  # (type, text)
    errors: list = field(default_factory=list)  # uncaught exceptions
    dialogs: list = field(default_factory=list)  # alert/confirm/prompt messages (dismissed)

    @classmethod
    def open(cls, browser, url: str, width: int = 1280, height: int = 900, **options) -> Tab:
        context = browser.new_context(viewport={"width": width, "height": height}, accept_downloads=True, **options)
        tab = cls(context, context.new_page())

        def route(route):
            request = route.request
            tab.requests.append((request.method, request.url, request.headers))
            route.continue_()

        context.route("**/*", route)
        context.add_init_script(_WATCH)
        tab.page.on("console", lambda message: tab.console.append((message.type, message.text)))
        tab.page.on("pageerror", lambda error: tab.errors.append(str(error)))
        tab.page.on("dialog", lambda dialog: (tab.dialogs.append(dialog.message), dialog.dismiss()))
        tab.page.goto(url)
        return tab

    def violations(self) -> list[str]:
        return self.page.evaluate("() => window.__violations")

    def assert_clean(self, host: str = "127.0.0.1") -> None:
        """No CSP violation, uncaught error or dialog, and no request to anywhere but ``host``."""
        assert self.violations() == []
        assert [text for kind, text in self.console if "Content Security Policy" in text] == []
        assert self.errors == [] and self.dialogs == []
        assert self.requests, "the routing recorded nothing"
        elsewhere = [url for _, url, _ in self.requests
                     if urlsplit(url).scheme != "http" or urlsplit(url).hostname != host]
        assert elsewhere == []

    def close(self) -> None:
        self.context.close()


def artifacts_folder(tmp_path_factory) -> Path:
    """Where screenshots and the versions go: $KOSMOS_TEST_ARTIFACTS/page, else a folder under pytest's tmp."""
    if os.environ.get("KOSMOS_TEST_ARTIFACTS"):
        folder = Path(os.environ["KOSMOS_TEST_ARTIFACTS"]) / "page"
        folder.mkdir(parents=True, exist_ok=True)
        return folder
    return tmp_path_factory.mktemp("page-artifacts")
