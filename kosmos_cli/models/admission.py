"""Where a continuous batch takes its requests from: a caller's iterable, or a `RequestQueue` that
outlives them (a server's), which other threads fill and cancel from while the batch runs."""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .generation import Request

__all__ = ["IterableRequests", "RequestQueue"]


class RequestQueue:
    """The requests of a batch that outlives them (a server): `put` and `cancel` from any thread,
    `close` to end the batch once what was put is done.

    The batch takes requests without waiting while it has rows running (a source that blocked would
    stall them all), and waits for one when it has none. `cancel(key)` drops a queued request, or
    frees a running one's row at the next host sync; a cancelled request gives no result."""

    def __init__(self):
        self._waiting: deque[Request] = deque()
        self._cancelled: set = set()
        self._closed = False
        self._changed = threading.Condition()

    def put(self, request: Request) -> None:
        with self._changed:
            if self._closed:
                raise RuntimeError("the queue is closed")
            self._waiting.append(request)
            self._changed.notify_all()

    def put_first(self, requests: list[Request]) -> None:
        """Requests taken by a batch that ended without finishing them, back at the head, in order."""
        with self._changed:
            self._waiting.extendleft(reversed(requests))
            self._changed.notify_all()

    def cancel(self, key: Any) -> None:
        with self._changed:
            before = len(self._waiting)
            self._waiting = deque(r for r in self._waiting if r.key != key)
            if len(self._waiting) == before:  # taken already: running, or done
                self._cancelled.add(key)

    def close(self) -> None:
        with self._changed:
            self._closed = True
            self._changed.notify_all()

    def __len__(self) -> int:
        """Requests waiting for a slot."""
        return len(self._waiting)

    def is_waiting(self, key: Any) -> bool:
        with self._changed:
            return any(r.key == key for r in self._waiting)

    def take(self, wait: bool) -> Request | None:
        """The next request; None when there is none now (only without ``wait``); StopIteration once
        closed and empty."""
        with self._changed:
            while wait and not self._waiting and not self._closed:
                self._changed.wait()
            if self._waiting:
                return self._waiting.popleft()
            if self._closed:
                raise StopIteration
            return None

    def cancelled(self) -> set:
        """The keys cancelled since the last call (those of requests taken already)."""
        with self._changed:
            keys, self._cancelled = self._cancelled, set()
            return keys


class IterableRequests:
    """A plain iterable of requests as the batch takes them: every take may wait (it is the caller's
    iterator), nothing is cancelled."""

    def __init__(self, requests: Iterable[Request]):
        self._requests = iter(requests)

    def take(self, wait: bool) -> Request:
        return next(self._requests)

    def cancelled(self) -> set:
        return set()
