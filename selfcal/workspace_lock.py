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

Every writer takes it (``write_guard``): ``selfcal run`` for the whole run, ``selfcal
generate/compress/evaluate/aggregate/inspect`` for their step, each DVC stage's command, and a
plain ``dvc repro`` through the ``guard`` stage that runs first (it leaves a small holder process
that keeps the lock for that ``dvc`` process until it exits). A process whose ancestor owns the
lock (the flow's ``dvc`` children, a ``dvc repro``'s stages) is part of that run and goes on.
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
    # The process the lock is held for: the holder itself, or the ``dvc`` a guard holds it for.
    owner_pid: int | None = None

    @property
    def owner(self) -> int:
        return self.owner_pid or self.pid

    def describe(self) -> str:
        return f"{self.label} (pid {self.owner} on {self.host}, since {self.started_utc})"


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
    owner_pid: int | None = None,
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
            owner_pid=owner_pid,
        )
        _record(fd, me)
        try:
            yield me
        finally:
            os.ftruncate(fd, 0)  # no stale record for the next reader; the kernel drops the lock itself
    finally:
        os.close(fd)


def held_by_ancestor(holder: Holder | None, pid: int | None = None) -> bool:
    """Whether the lock's owner is this process or one of its ancestors (part of the same run)."""
    import psutil

    if holder is None or holder.host != socket.gethostname():
        return False
    try:
        chain = [psutil.Process(pid or os.getpid()), *psutil.Process(pid or os.getpid()).parents()]
    except psutil.NoSuchProcess:
        return False
    return any(p.pid == holder.owner for p in chain)


@contextmanager
def write_guard(root: Path, *, label: str) -> Iterator[Holder | None]:
    """Hold the workspace for one writing command, or go on inside the run that holds it.

    Refused at once (no waiting) with the holder's command, pid and start time when another
    run holds it: a writer must never interleave with a run's artifacts and dvc.lock.
    """
    from contextlib import ExitStack

    holder = read_holder(root)
    if holder is not None and held_by_ancestor(holder):
        yield holder
        return
    stack = ExitStack()
    try:
        me = stack.enter_context(workspace_lock(root, label=label))
    except WorkspaceBusyError:
        holder = read_holder(root)
        if holder is not None and held_by_ancestor(holder):  # recorded between our two looks
            yield holder
            return
        who = holder.describe() if holder else "a process that did not record itself (e.g. a code sync)"
        raise WorkspaceBusyError(
            f"{label}: workspace {Path(root).resolve()} is in use by {who}; "
            f"wait for it to finish (lock {lock_path(root)})"
        ) from None
    with stack:
        yield me


def hold_for(root: Path, owner_pid: int, label: str, *, poll_seconds: float = 0.2) -> int:
    """Hold the workspace lock on behalf of process ``owner_pid`` until it exits (the guard
    stage's holder for a plain ``dvc repro``). Prints ``held`` once the lock is taken, or the
    refusal, on stdout. Returns an exit status."""
    import psutil

    try:
        owner = psutil.Process(owner_pid)
        born = owner.create_time()
    except psutil.NoSuchProcess:
        print(f"owner process {owner_pid} is gone", flush=True)
        return 2
    try:
        with workspace_lock(root, label=label, owner_pid=owner_pid):
            print("held", flush=True)
            while True:
                try:
                    if owner.create_time() != born or owner.status() == psutil.STATUS_ZOMBIE:
                        return 0
                except psutil.NoSuchProcess:
                    return 0
                time.sleep(poll_seconds)
    except WorkspaceBusyError as err:
        print(str(err), flush=True)
        return 2


if __name__ == "__main__":  # python -m selfcal.workspace_lock ROOT OWNER_PID LABEL
    import sys

    raise SystemExit(hold_for(Path(sys.argv[1]), int(sys.argv[2]), sys.argv[3]))
