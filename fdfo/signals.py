"""Ctrl-C and SIGTERM (a scheduler's pre-emption): a request to stop that is never lost.

A handler that raises KeyboardInterrupt is lost when the signal lands while Python runs a weakref callback or
`__del__` (torch and tqdm run them constantly): Python prints "Exception ignored" and carries on. So the handler
first records the signal; code that must not stop half-way (a training run's epochs) defers the stop and calls
`check()` where stopping leaves nothing half-done. Outside `deferred()` the handler also raises at once; if that
raise is swallowed, the record stays and the next `check()` stops. A second signal always raises at once.
"""

from __future__ import annotations

import contextlib
import signal
import sys
from typing import Iterator

_received: list[int] = []
_deferring = [False]


def _on_signal(signum: int, frame) -> None:
    _received.append(signum)
    if not _deferring[0] or len(_received) > 1:
        raise KeyboardInterrupt


def install() -> None:
    """Handle SIGINT and SIGTERM from now on (the entry points, before their heavy imports)."""
    signal.signal(signal.SIGINT, _on_signal)
    signal.signal(signal.SIGTERM, _on_signal)


def exit_code() -> int:
    """130 for Ctrl-C, 143 for SIGTERM: the shell's 128 + the signal's number."""
    return 128 + (_received[0] if _received else signal.SIGINT)


def check() -> None:
    """Stop here (KeyboardInterrupt) if a stop was asked for."""
    if _received:
        raise KeyboardInterrupt


@contextlib.contextmanager
def deferred() -> Iterator[None]:
    """Inside, a first signal only records the stop: the code stops at its next `check()`."""
    _deferring[0] = True
    try:
        check()
        yield
    finally:
        _deferring[0] = False


@contextlib.contextmanager
def quiet_start() -> Iterator[None]:
    """Around an entry point's imports: the handlers installed first, and a stop asked for during them an exit
    without a traceback once they are done (a raise inside a C++ extension's import aborts the process)."""
    install()
    try:
        with deferred():
            yield
        check()
    except KeyboardInterrupt:
        sys.exit(exit_code())
