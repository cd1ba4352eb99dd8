"""One training process at a time in a run folder: rank 0 holds an exclusive lock on `<run>/.lock` for the life of
the run, so a second resume of a live run is refused, and leftovers of a killed checkpoint write are tidied only
by the holder (a live run's own temporary folder is never touched). The operating system drops the lock when
the process ends, however it ends (kill -9 included); the file keeps the last holder's name for the sentence."""

from __future__ import annotations

import fcntl
import json
import os
import socket
import sys
import time
from pathlib import Path

from fdfo import distributed
from fdfo.errors import UserError

LOCK_FILE = ".lock"


class RunInUse(UserError):
    pass


# This process's lock: (run folder, descriptor; None on ranks other than 0). A process trains one run at a time.
_held: list[tuple[Path, int | None]] = []


def hold(run_dir: Path) -> None:
    """Hold `run_dir`'s lock from now until `release()` or the process's end, or refuse (every rank alike) with a
    sentence naming the process that holds it."""
    run_dir = Path(run_dir)
    if _held and _held[0][0] == run_dir:
        return
    release()
    fd, refusal = take(run_dir) if distributed.is_main() else (None, None)
    refusal = distributed.broadcast_object(refusal)
    if refusal:
        raise RunInUse(refusal)
    _held.append((run_dir, fd))


def release() -> None:
    for _, fd in _held:
        if fd is not None:
            os.close(fd)  # closing the descriptor drops the lock
    _held.clear()


def take(run_dir: Path) -> tuple[int | None, str | None]:
    """(the locked file's descriptor, None), or (None, why not)."""
    path = run_dir / LOCK_FILE
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as e:
        return None, f"The run folder {run_dir} cannot be written ({e.strerror}); a run needs to write its checkpoints there."
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.read(fd, 4096).decode(errors="replace")
        os.close(fd)
        return None, (f"The run {run_dir} is in use: {describe(holder)} is training it. Wait for it to end (or stop "
                      "it) before resuming the run; to branch meanwhile, resume from one of its older checkpoints.")
    os.ftruncate(fd, 0)
    os.write(fd, json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "since": time.strftime("%Y-%m-%d %H:%M:%S"),
                             "command": " ".join(sys.argv)}).encode())
    return fd, None


def describe(holder: str) -> str:
    try:
        h = json.loads(holder)
        return f"process {h['pid']} on {h['host']} (since {h['since']}: {h['command']})"
    except (ValueError, KeyError, TypeError):
        return "another process"
