"""One pipeline run per workspace at a time.

DVC refuses a second ``dvc`` process in a workspace, but only for the length of
one command: a flow runs dozens of them, and two interleaved flows would each
see the other's half-updated ``dvc.lock`` and params. So a run holds this lock
from before it touches params.yaml until its last ``dvc push``.

It is ``flock(2)`` on ``.selfcal/run.lock`` because the kernel drops it when the
holder dies, ``kill -9`` included: a crashed run never leaves a stale lock for
someone to delete by hand. The holder writes who it is into the file so that a
refused run can name it. util-linux ``flock(1)`` takes the same lock, so shell
steps (a deployment's code sync) can guard themselves with it too.
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path

from selfcal.errors import SelfcalError

LOCK_FILE = Path(".selfcal") / "run.lock"


class WorkspaceBusyError(SelfcalError):
    """Another run holds the workspace; the message names it."""


@dataclass(frozen=True)
class Holder:
    pid: int
    host: str
    started_utc: str
    label: str

    def describe(self) -> str:
        return f"{self.label} (pid {self.pid} on {self.host}, since {self.started_utc})"


def lock_path(root: Path) -> Path:
    return Path(root) / LOCK_FILE


def read_holder(root: Path) -> Holder | None:
    """Who holds the workspace, as its holder recorded it (None: nobody recorded)."""
    try:
        return Holder(**json.loads(lock_path(root).read_text()))
    except (OSError, ValueError, TypeError):
        return None


def _try_lock(fd: int) -> bool:
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    return True


def _record(fd: int, holder: Holder) -> None:
    os.ftruncate(fd, 0)
    os.pwrite(fd, (json.dumps(asdict(holder)) + "\n").encode(), 0)
    os.fsync(fd)


@contextmanager
def workspace_lock(
    root: Path,
    *,
    label: str,
    timeout: float = 0.0,
    poll_seconds: float = 1.0,
    on_wait: Callable[[Holder | None], None] | None = None,
) -> Iterator[Holder]:
    """Hold the workspace for the ``with`` block, waiting up to ``timeout`` seconds.

    ``on_wait`` is called once, with the current holder, when the lock is busy
    and the caller is about to wait, so a long wait shows up in its logs.
    """
    path = lock_path(root)
    path.parent.mkdir(parents=True, exist_ok=True)
    # O_RDWR without O_TRUNC: opening must not erase the current holder's record.
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        deadline = time.monotonic() + max(timeout, 0.0)
        told = False
        while not _try_lock(fd):
            holder = read_holder(root)
            if time.monotonic() >= deadline:
                who = holder.describe() if holder else "a process that did not record itself (e.g. a code sync)"
                raise WorkspaceBusyError(
                    f"workspace {Path(root).resolve()} is in use by {who}; gave up after {timeout:g} s "
                    f"(lock {path}; raise the lock timeout to wait)"
                )
            if on_wait is not None and not told:
                on_wait(holder)
                told = True
            time.sleep(poll_seconds)
        me = Holder(
            pid=os.getpid(),
            host=socket.gethostname(),
            started_utc=datetime.now(timezone.utc).isoformat(timespec="seconds"),
            label=label,
        )
        _record(fd, me)
        try:
            yield me
        finally:
            os.ftruncate(fd, 0)  # no stale record for the next reader; the kernel drops the lock itself
    finally:
        os.close(fd)
