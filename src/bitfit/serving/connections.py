"""Connection limits of the HTTP service: a header deadline and a cap on open connections.

uvicorn's own keep-alive timer starts only after a response and restarts on every byte received,
so a client that opens a connection and sends part of its headers (or trickles them) holds a file
descriptor for ever; enough of them exhaust the process's open-file limit and then nobody else
can connect. This module owns the uvicorn protocol the service runs with (:func:`guarded_protocol`):

* **header deadline**: a connection must finish its request headers within ``header_timeout``
  seconds of opening (or of its previous response plus the keep-alive time); otherwise it is
  closed, however slowly it keeps sending;
* **connection cap**: at most ``max_connections`` connections are open; a new one past the cap
  closes the oldest connection that has no request in progress (one still sending headers or idle
  between requests), or, when every connection is mid-request, is itself closed at once. The
  default cap (:func:`default_max_connections`) stays below the open-file limit, so the server
  never runs out of descriptors.

The request *body* deadline is :class:`bitfit.serving.guard.RequestGuard`'s (an ASGI middleware).
"""

from __future__ import annotations

import logging
import os
from collections import OrderedDict
from typing import Optional

from ..errors import BitFitError

log = logging.getLogger(__name__)

DEFAULT_HEADER_TIMEOUT = 10.0  # seconds to send a request's headers
DEFAULT_KEEP_ALIVE = 5.0  # seconds an idle keep-alive connection stays open (uvicorn's default)
FD_RESERVE = 32  # descriptors kept free for the process itself (files, threads' pipes, the listening socket)


def open_fds() -> Optional[int]:
    """Descriptors this process has open now (Linux /proc, else None)."""
    try:
        return len(os.listdir("/proc/self/fd"))
    except OSError:  # pragma: no cover - not Linux
        return None


def fd_limit() -> Optional[int]:
    """This process's soft open-file limit (None where unknown or unlimited)."""
    try:
        import resource

        soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    except (ImportError, OSError, ValueError):  # pragma: no cover - not Unix
        return None
    return None if soft == resource.RLIM_INFINITY else int(soft)


def accept_backlog() -> int:
    """The listen backlog: also how many connections the event loop accepts in one go, before any of them can
    close an older one (a quarter of the free descriptors, 16 to 2048)."""
    limit = fd_limit()
    if limit is None:
        return 2048
    return max(16, min(2048, (limit - (open_fds() or 0)) // 4))


def default_max_connections() -> int:
    """The connection cap that keeps ``FD_RESERVE`` descriptors free under this process's open-file limit
    (one descriptor per connection) plus room for two accept batches (:func:`accept_backlog`); 1024 where the
    limit is unknown."""
    limit = fd_limit()
    if limit is None:
        return 1024
    return max(1, limit - (open_fds() or 0) - FD_RESERVE - 2 * accept_backlog())


def check_max_connections(value: Optional[int]) -> int:
    """``value`` (None: the default) checked against the open-file limit; a clear error where it cannot fit."""
    room = default_max_connections()
    if value is None:
        if room < 8:
            raise BitFitError(
                f"the open-file limit ({fd_limit()}) leaves room for only {room} connection(s) after the "
                f"{open_fds()} descriptors this process holds; raise it (ulimit -n 4096) or pass --max-connections")
        return room
    if not isinstance(value, int) or value < 1:
        raise BitFitError(f"--max-connections must be a positive integer, got {value!r}")
    if value > room:
        raise BitFitError(
            f"--max-connections {value} does not fit the open-file limit {fd_limit()} (this process holds "
            f"{open_fds()} descriptors and keeps {FD_RESERVE} plus two accept batches free): at most {room}; raise the limit (ulimit -n) "
            "or lower --max-connections")
    return value


def check_timeout(name: str, value, low: float = 0.1, high: float = 3600.0) -> float:
    """A timeout option in seconds within ``[low, high]``."""
    try:
        v = float(value)
    except (TypeError, ValueError):
        v = float("nan")
    if not low <= v <= high:  # also NaN
        raise BitFitError(f"{name} must be between {low:g} and {high:g} seconds, got {value!r}")
    return v


def guarded_protocol(header_timeout: float = DEFAULT_HEADER_TIMEOUT, max_connections: int = 1024):
    """A uvicorn HTTP protocol class (h11) with a header deadline and a connection cap (module docstring).
    Pass it as ``uvicorn.Config(app, http=...)``; each call gives a class with its own connection registry."""
    from uvicorn.protocols.http.h11_impl import H11Protocol

    live: "OrderedDict[GuardedH11Protocol, None]" = OrderedDict()  # open connections, oldest first
    counters = {"header_timeouts": 0, "evicted": 0, "refused": 0}

    class GuardedH11Protocol(H11Protocol):
        limits = {"header_timeout": header_timeout, "max_connections": max_connections}
        stats = counters
        connections_open = live

        def connection_made(self, transport) -> None:
            self._deadline = None
            super().connection_made(transport)
            if len(live) >= max_connections and not self._make_room():
                counters["refused"] += 1
                log.warning("connection refused: %d connections open, all mid-request (--max-connections)",
                            len(live))
                transport.abort()
                return
            live[self] = None
            self._arm(header_timeout)

        def _make_room(self) -> bool:
            """Close the oldest connection with no request in progress; False if there is none."""
            for other in live:
                if other._idle():
                    counters["evicted"] += 1
                    other._close()
                    return True
            return False

        def _idle(self) -> bool:
            return self.cycle is None or self.cycle.response_complete

        def _close(self) -> None:
            live.pop(self, None)
            self._disarm()
            if not self.transport.is_closing():
                self.transport.abort()  # frees the descriptor now (close() would wait for buffered writes)

        def _arm(self, seconds: float) -> None:
            self._disarm()
            self._deadline = self.loop.call_later(seconds, self._headers_late)

        def _disarm(self) -> None:
            if self._deadline is not None:
                self._deadline.cancel()
                self._deadline = None

        def _headers_late(self) -> None:
            self._deadline = None
            if self._idle():  # no request in progress: its headers are still not in
                counters["header_timeouts"] += 1
                self._close()

        def handle_events(self) -> None:
            super().handle_events()
            if self._deadline is not None and not self._idle():
                self._disarm()  # the request's headers are in; its body has the guard's deadline

        def on_response_complete(self) -> None:
            # the next request's headers are due within the keep-alive time plus the header time (a pipelined
            # request that is already complete disarms this again in handle_events)
            if not self.transport.is_closing():
                self._arm(self.timeout_keep_alive + header_timeout)
            super().on_response_complete()

        def connection_lost(self, exc) -> None:
            live.pop(self, None)
            self._disarm()
            super().connection_lost(exc)

    return GuardedH11Protocol


__all__ = ["DEFAULT_HEADER_TIMEOUT", "DEFAULT_KEEP_ALIVE", "FD_RESERVE", "accept_backlog", "check_max_connections", "check_timeout",
           "default_max_connections", "fd_limit", "guarded_protocol", "open_fds"]
