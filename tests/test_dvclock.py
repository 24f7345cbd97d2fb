"""tools/dvclock.py: dvc.lock copied, and a run ended, under DVC's own repo lock (two committed run folders
came back with a dvc.lock that was empty or cut mid-line)."""

from __future__ import annotations

import subprocess
import sys
import time

import pytest

from tests.helpers import REPO, load_script

LOCK = b"schema: '2.0'\nstages:\n  generate@self-0:\n    cmd: python -m selfcal.stages.generate self 0\n"

#: DVC taking its repo lock (dvc/lock.py, zc.lockfile) in another process: writes ``dvc.lock`` the way
#: dump_yaml does (truncate, then write) with a pause in between, then lets go
WRITER = """
import sys, time
from pathlib import Path
from dvc.lock import make_lock
root = Path(sys.argv[1])
lock = make_lock(str(root / ".dvc" / "tmp" / "lock"), tmp_dir=str(root / ".dvc" / "tmp"), wait=True)
with lock:
    fh = open(root / "dvc.lock", "w")  # truncated here
    print("writing", flush=True)
    time.sleep(1.5)
    fh.write(sys.argv[2])
    fh.close()
"""

#: DVC trying its repo lock once, as a dvc without --wait-for-lock would
PROBE = """
import sys
from dvc.lock import LockError, make_lock
lock = make_lock(sys.argv[1] + "/.dvc/tmp/lock", tmp_dir=sys.argv[1] + "/.dvc/tmp")
try:
    lock._do_lock()
except LockError:
    print("locked out")
else:
    print("took it")
    lock.unlock()
"""


@pytest.fixture(scope="module")
def dvclock():
    return load_script("tools/dvclock.py")


def _workspace(tmp_path, data: bytes = LOCK):
    (tmp_path / ".dvc" / "tmp").mkdir(parents=True)
    (tmp_path / "dvc.lock").write_bytes(data)
    return tmp_path


def test_a_lock_file_cut_short_or_empty_is_told_from_a_whole_one(dvclock):
    assert dvclock.lock_file_problem(LOCK) is None
    assert dvclock.lock_file_problem((REPO / "dvc.lock").read_bytes()) is None
    assert dvclock.lock_file_problem(b"") == "empty"  # parses, as nothing: lease 8's copy
    assert dvclock.lock_file_problem(LOCK[:-9]) == "no final newline (a write cut short)"  # lease 10's n3
    assert dvclock.lock_file_problem(b"stages: [\n") == "not YAML (ParserError)"
    assert dvclock.lock_file_problem(b"schema: '2.0'\n") == "not a lock file (no schema and stages)"
    # the two that came back so (kept as they came: the records, not the lock, carry each model's lineage)
    runs = REPO / "reports" / "SmolLM2-135M"
    assert dvclock.lock_file_problem((runs / "runs/2026-12-04-h200-i/dvc.lock").read_bytes()) == "empty"
    cut = (runs / "sweep-n/runs/2026-12-04-h200-n3/dvc.lock").read_bytes()
    assert dvclock.lock_file_problem(cut) == "no final newline (a write cut short)"


def test_copy_waits_for_a_dvc_that_is_rewriting_the_lock_file_and_brings_back_the_whole_file(dvclock, tmp_path):
    """Lease 8: collect copied dvc.lock between DVC's truncation and its write and brought back 0 bytes (which
    parses). Holding DVC's lock, the copy waits for the write to end."""
    root = _workspace(tmp_path / "ws", b"schema: '2.0'\nstages: {}\n")
    writer = subprocess.Popen([sys.executable, "-c", WRITER, str(root), LOCK.decode()], stdout=subprocess.PIPE,
                              text=True)  # fmt: skip
    try:
        assert writer.stdout.readline().strip() == "writing"
        assert (root / "dvc.lock").read_bytes() == b""  # what a plain copy would have taken
        t0 = time.monotonic()
        assert dvclock.main(["copy", str(root), str(tmp_path / "out.lock"), "--wait", "30"]) == 0
        assert time.monotonic() - t0 > 0.5  # it waited for the writer
        assert (tmp_path / "out.lock").read_bytes() == LOCK
    finally:
        writer.wait(timeout=30)


def test_a_damaged_lock_file_is_replaced_by_the_last_good_copy_with_a_warning(dvclock, tmp_path, capsys):
    root = _workspace(tmp_path / "ws")
    good, out = tmp_path / "good.lock", tmp_path / "out.lock"
    assert dvclock.main(["copy", str(root), str(out), "--last-good", str(good)]) == 0
    assert out.read_bytes() == good.read_bytes() == LOCK
    (root / "dvc.lock").write_bytes(LOCK + b"  compress@self-0-gptq:\n    cmd: python -m sel")  # killed mid-write
    out.unlink()
    assert dvclock.main(["copy", str(root), str(out), "--last-good", str(good)]) == 0
    assert out.read_bytes() == LOCK
    assert "is damaged (no final newline (a write cut short)): the last good copy" in capsys.readouterr().err
    out.unlink()
    assert dvclock.main(["copy", str(root), str(out)]) == 0  # no good copy: nothing comes back, said
    assert not out.exists() and "there is no good copy: none comes back" in capsys.readouterr().err
    assert dvclock.main(["copy", str(tmp_path / "none"), str(out)]) == 0 and not out.exists()  # no lock yet


def test_run_holds_dvcs_lock_while_the_command_runs_and_lets_go_after(dvclock, tmp_path):
    """``study_box.sh stop`` ends the run inside ``run``: no dvc can then be halfway through rewriting
    dvc.lock when it is killed (lease 10's n3)."""
    root = _workspace(tmp_path / "ws")
    probe = [sys.executable, "-c", PROBE, str(root)]
    inside = subprocess.run([sys.executable, str(REPO / "tools" / "dvclock.py"), "run", str(root), "--", *probe],
                            capture_output=True, text=True, timeout=60)  # fmt: skip
    assert inside.returncode == 0 and inside.stdout.strip() == "locked out", inside.stderr
    after = subprocess.run(probe, capture_output=True, text=True, timeout=60)
    assert after.stdout.strip() == "took it"
    # a lock held elsewhere past --wait: the command still runs, and it is said
    writer = subprocess.Popen([sys.executable, "-c", WRITER, str(root), LOCK.decode()], stdout=subprocess.PIPE,
                              text=True)  # fmt: skip
    try:
        assert writer.stdout.readline().strip() == "writing"
        late = subprocess.run([sys.executable, str(REPO / "tools" / "dvclock.py"), "run", str(root), "--wait",
                               "0.2", "--", "true"], capture_output=True, text=True, timeout=60)  # fmt: skip
        assert late.returncode == 0 and "not free within 0.2 s: running true without it" in late.stderr
    finally:
        writer.wait(timeout=30)
