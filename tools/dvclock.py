"""DVC's repo lock from outside DVC, for a workspace where ``dvc`` processes are running.

DVC rewrites ``dvc.lock`` in place (``dvc/utils/serialize/_yaml.py``, ``dump_yaml`` -> ``open(path, "w")``),
under its repo lock ``.dvc/tmp/lock``: an ``flock`` on that file (``dvc/lock.py``, ``Lock._do_lock`` ->
``zc.lockfile.LockFile``). Two committed run folders show what reading or killing around that write does:
lease 8's ``i`` came back with a 0-byte ``dvc.lock`` (copied between the truncation and the write: it parsed,
as nothing), and lease 10's ``n3`` with one cut mid-line (``stop`` killed a ``dvc`` while it was "Updating
lock file"). Both take the same lock here, so no ``dvc`` is writing meanwhile:

  python tools/dvclock.py copy ROOT DEST [--wait S] [--last-good FILE]
        ROOT/dvc.lock -> DEST as one complete file; a copy that is no complete lock file (no ``schema`` and
        ``stages``, or no final newline: a write cut short) is not passed on: FILE, the last good copy, is,
        with a warning; a good copy also becomes FILE
  python tools/dvclock.py run ROOT [--wait S] -- CMD ARGS...
        CMD while the lock is held (``study_box.sh stop``: the run is ended with no ``dvc`` halfway through a
        write; one waiting for the lock dies waiting)

Waits up to S seconds (default 60) for the lock, which a ``dvc`` holds only for its short phases (reading the
workspace, hashing and recording a finished stage's outputs); past that it goes on without it and says so.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

POLL_S = 0.1


def say(msg: str) -> None:
    print(f"dvclock: {msg}", file=sys.stderr, flush=True)


@contextlib.contextmanager
def repo_lock(root: Path, wait: float) -> Iterator[bool]:
    """DVC's repo lock of ``root`` (an flock on ``.dvc/tmp/lock``, as zc.lockfile takes it), held for the body:
    yields whether it was taken within ``wait`` seconds (a workspace with no ``.dvc`` has no lock to take)."""
    tmp = root / ".dvc" / "tmp"
    if not (root / ".dvc").is_dir():
        yield False
        return
    tmp.mkdir(exist_ok=True)
    with open(tmp / "lock", "a+") as fh:
        deadline = time.monotonic() + wait
        while True:
            try:
                fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
                held = True
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    held = False
                    break
                time.sleep(POLL_S)
        try:
            yield held
        finally:
            if held:
                fcntl.flock(fh.fileno(), fcntl.LOCK_UN)


def lock_file_problem(data: bytes) -> str | None:
    """Why ``data`` is no complete dvc.lock, or None. DVC writes it whole, ending in a newline, as a mapping
    with ``schema`` and ``stages``; a 0-byte file parses (as nothing) and a cut one often does too."""
    if not data:
        return "empty"
    if not data.endswith(b"\n"):
        return "no final newline (a write cut short)"
    from ruamel.yaml import YAML  # DVC's own parser: on every box that runs DVC

    try:
        doc = YAML(typ="safe").load(data)
    except Exception as exc:  # noqa: BLE001 - any parse failure is the answer
        return f"not YAML ({type(exc).__name__})"
    if not isinstance(doc, dict) or "schema" not in doc or not isinstance(doc.get("stages"), dict):
        return "not a lock file (no schema and stages)"
    return None


def write_whole(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def copy(root: Path, dest: Path, wait: float, last_good: Path | None) -> int:
    src = root / "dvc.lock"
    if not src.exists():
        return 0  # no item recorded yet
    with repo_lock(root, wait) as held:
        data = src.read_bytes()
    if not held:
        say(f"DVC's lock was not free within {wait:g} s: {src} copied without it")
    problem = lock_file_problem(data)
    if problem is None:
        write_whole(dest, data)
        if last_good is not None:
            write_whole(last_good, data)
        return 0
    if last_good is not None and last_good.exists():
        write_whole(dest, last_good.read_bytes())
        say(f"{src} is damaged ({problem}): the last good copy ({last_good}) comes back instead")
    else:
        say(f"{src} is damaged ({problem}) and there is no good copy: none comes back")
    return 0


def run(root: Path, wait: float, cmd: list[str]) -> int:
    with repo_lock(root, wait) as held:
        if not held:
            say(f"DVC's lock was not free within {wait:g} s: running {cmd[0]} without it")
        return subprocess.call(cmd)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="command", required=True)
    c = sub.add_parser("copy", help="ROOT/dvc.lock -> DEST, whole")
    c.add_argument("root", type=Path)
    c.add_argument("dest", type=Path)
    c.add_argument("--wait", type=float, default=60.0)
    c.add_argument("--last-good", type=Path)
    r = sub.add_parser("run", help="a command while DVC's lock is held")
    r.add_argument("root", type=Path)
    r.add_argument("--wait", type=float, default=60.0)
    argv = sys.argv[1:] if argv is None else argv
    cmd: list[str] = []
    if "--" in argv:  # the command's own options are its own
        cut = argv.index("--")
        argv, cmd = argv[:cut], argv[cut + 1 :]
    args = ap.parse_args(argv)
    if args.command == "copy":
        return copy(args.root, args.dest, args.wait, args.last_good)
    if not cmd:
        ap.error("run: no command after --")
    return run(args.root, args.wait, cmd)


if __name__ == "__main__":
    sys.exit(main())
