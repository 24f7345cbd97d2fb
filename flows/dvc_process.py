"""Run one ``dvc`` command for the flow: live output, a time limit, nothing left behind.

Output is handed over line by line as it comes, so a two-hour compress item
shows progress in the Prefect UI instead of one block at the end. On a timeout
(or any interruption) the whole process tree is killed: killing ``dvc`` alone
would orphan the stage it started, which would keep the GPU busy and race the
retry for the same output.
"""

from __future__ import annotations

import json
import subprocess
import sys
import threading
from collections.abc import Callable
from pathlib import Path

import psutil

from selfcal.errors import SelfcalError


class DvcCommandError(SelfcalError):
    """``dvc`` exited non-zero; the message carries its last error line."""


class DvcTimeoutError(SelfcalError, TimeoutError):
    """An attempt ran past its time limit and was killed."""


_RUNNING: set[int] = set()  # pids of the dvc processes this process started and that still run
_RUNNING_LOCK = threading.Lock()


def kill_running() -> None:
    """Kill every dvc tree this process started that still runs: the flow's last word when it is interrupted
    (Prefect neither kills a task's subprocess on cancel nor interrupts a task thread)."""
    with _RUNNING_LOCK:
        pids = list(_RUNNING)
    for pid in pids:
        _kill_tree(pid)


def _kill_tree(pid: int) -> None:
    try:
        root = psutil.Process(pid)
        procs = [*root.children(recursive=True), root]
    except psutil.NoSuchProcess:
        return
    for proc in procs:
        try:
            proc.kill()
        except psutil.NoSuchProcess:
            continue
    psutil.wait_procs(procs, timeout=30)


def _repair_rwlock(cwd: Path) -> None:
    """After a kill: DVC rewrites ``.dvc/tmp/rwlock`` (JSON) as stages start and end, and a kill in the
    middle of that write leaves it empty or cut, after which every dvc command fails ("Unable to read
    RWLock-file ... JSON structure is corrupted"). Every process of the tree that held it is dead now,
    so a file that does not parse is removed; DVC recreates it."""
    path = Path(cwd) / ".dvc" / "tmp" / "rwlock"
    try:
        json.loads(path.read_text())
    except FileNotFoundError:
        return
    except ValueError:
        path.unlink(missing_ok=True)


# Where the reason for a failure is, most telling first: the stage's own one-line error, then DVC's.
ERROR_MARKERS = ("selfcal: error:", "ERROR:")


def _reason(lines: list[str]) -> str:
    for marker in ERROR_MARKERS:
        found = [line.strip() for line in lines if marker in line]
        if found:
            return found[-1]
    return lines[-1].strip() if lines else "no output"


def run_dvc(
    args: list[str],
    *,
    cwd: Path,
    env: dict[str, str],
    on_line: Callable[[str], None],
    timeout: float | None = None,
) -> list[str]:
    """``python -m dvc ARGS`` in ``cwd`` with exactly ``env``; returns its output lines, raises on failure.

    DVC comes from this interpreter (it is a dependency of this package); the
    stage commands inside dvc.yaml find ``python`` on PATH, as under plain
    ``dvc repro``.
    """
    cmd = [sys.executable, "-m", "dvc", *args]
    proc = subprocess.Popen(
        cmd,
        cwd=cwd,
        env={**env, "PYTHONUNBUFFERED": "1"},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        errors="replace",
        bufsize=1,
    )
    with _RUNNING_LOCK:
        _RUNNING.add(proc.pid)
    lines: list[str] = []

    def pump() -> None:
        assert proc.stdout is not None
        for raw in proc.stdout:
            for line in raw.rstrip("\n").split("\r"):  # progress bars redraw with \r
                if line.strip():
                    lines.append(line)
                    on_line(line)

    reader = threading.Thread(target=pump, daemon=True)
    reader.start()
    shown = "dvc " + " ".join(args)
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        _kill_tree(proc.pid)
        _repair_rwlock(cwd)
        raise DvcTimeoutError(f"{shown}: still running after {timeout:g} s; killed it and its stage") from None
    except BaseException:
        _kill_tree(proc.pid)
        _repair_rwlock(cwd)
        raise
    finally:
        reader.join(timeout=10)
        with _RUNNING_LOCK:
            _RUNNING.discard(proc.pid)
    if proc.returncode != 0:
        raise DvcCommandError(f"{shown} exited with {proc.returncode}: {_reason(lines)}")
    return lines
