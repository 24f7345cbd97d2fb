"""``selfcal run --mps``: the run's own MPS daemon, checked by a probe, handed to GPU items, ended when the run
ends; every way starting it can fail leaves the run to time-slicing and no daemon behind. A stand-in
``nvidia-cuda-mps-control`` plays NVIDIA's (this box has no GPU): ``-f`` is a foreground daemon process that
answers clients (``get_server_list``, ``quit`` on stdin) through a file in the pipe directory it is given."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

from flows import mps
from flows.slots import plan_slots

FAKE = """#!/bin/sh
dir=$CUDA_MPS_PIPE_DIRECTORY
[ -n "$dir" ] || dir=/nonexistent-default-pipe
if [ "$1" = "-f" ]; then
    [ -z "$FAKE_MPS_REFUSE" ] || { echo "An instance of this daemon is already running"; exit 1; }
    echo "$*" >> "$dir/calls"
    echo "order=$CUDA_DEVICE_ORDER visible=$CUDA_VISIBLE_DEVICES" > "$dir/daemon-env"
    trap 'rm -f "$dir/control"; exit 0' TERM
    [ -n "$FAKE_MPS_MUTE" ] || echo $$ > "$dir/control"
    while [ -f "$dir/control" ] || [ -n "$FAKE_MPS_MUTE" ]; do sleep 0.1; done
    exit 0
fi
if ! [ -f "$dir/control" ] || ! kill -0 "$(cat "$dir/control")" 2>/dev/null; then
    echo "Cannot find MPS control daemon process" >&2; exit 1
fi
while read -r cmd; do
    case $cmd in
        get_server_list) if [ -f "$dir/servers" ]; then cat "$dir/servers"; fi ;;
        quit)
            echo quit >> "$dir/calls"; [ -z "$FAKE_MPS_QUIT_HANGS" ] || sleep 30
            rm -f "$dir/control" "$dir/servers" ;;
    esac
done
exit 0
"""

# what a CUDA client does to the stand-in: the daemon starts a server for it
SERVE = [
    sys.executable,
    "-c",
    "import os; open(os.environ['CUDA_MPS_PIPE_DIRECTORY'] + '/servers', 'w').write('4242')",
]


@pytest.fixture
def fake_control(tmp_path, monkeypatch):
    """A workspace whose MPS directory is under tmp_path, with the stand-in first on PATH."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    tool = bin_dir / mps.CONTROL
    tool.write_text(FAKE)
    tool.chmod(tool.stat().st_mode | stat.S_IEXEC)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.delenv(mps.PIPE_ENV, raising=False)
    monkeypatch.setattr(mps, "home", lambda root: tmp_path / "mps")
    monkeypatch.setattr(mps, "ANSWER_TIMEOUT", 3.0)
    workspace = tmp_path / "ws"
    workspace.mkdir()
    yield workspace
    mps.stop(tmp_path / "mps" / "pipe", timeout=2)


def _calls(pipe: Path) -> list[str]:
    return (pipe / "calls").read_text().split()


def _running(pid: int) -> bool:
    """A stand-in daemon process that runs (not one that ended, not yet reaped)."""
    return mps._alive(pid) and b"nvidia-cuda-mps-control" in Path(f"/proc/{pid}/cmdline").read_bytes()


def test_a_started_daemon_served_the_probe_reaches_gpu_items_and_quits(fake_control):
    daemon = mps.start(fake_control, probe=SERVE)
    assert daemon.servers == ("4242",) and _running(daemon.pid)
    assert mps.server_list(daemon.pipe) == ["4242"]
    assert mps.sharing({mps.PIPE_ENV: str(daemon.pipe)}).startswith("MPS (a daemon answers at")
    assert mps.stop(daemon.pipe) == "quit"
    assert not _running(daemon.pid) and mps.server_list(daemon.pipe) is None
    assert mps.stop(daemon.pipe) == "none"
    assert _calls(daemon.pipe) == ["-f", "quit"]


def test_the_real_directory_is_short_enough_for_a_unix_socket():
    deep = Path("/srv") / ("very-long-workspace-name-" * 8)
    assert len(str(mps.home(deep) / "pipe" / "control")) < 100  # sun_path holds 108 bytes
    assert mps.home(deep) == mps.home(deep / "." / "x" / "..")  # the workspace resolved: the same for every run


def test_a_daemon_a_killed_run_left_is_ended_and_a_fresh_one_started(fake_control):
    first = mps.start(fake_control, probe=SERVE)
    second = mps.start(fake_control, probe=SERVE)
    assert second.pid != first.pid and not _running(first.pid) and _running(second.pid)
    assert _calls(second.pipe) == ["-f", "quit", "-f"]
    assert mps.main(["status", "--workspace", str(fake_control)]) == 0
    assert mps.main(["stop", "--workspace", str(fake_control)]) == 0
    assert mps.main(["status", "--workspace", str(fake_control)]) == 1 and not _running(second.pid)


def test_a_daemon_that_does_not_quit_is_ended_by_its_pid(fake_control, monkeypatch):
    daemon = mps.start(fake_control, probe=SERVE)
    monkeypatch.setenv("FAKE_MPS_QUIT_HANGS", "1")
    assert mps.stop(daemon.pipe, timeout=1) == "killed"
    assert not _running(daemon.pid) and mps.server_list(daemon.pipe) is None


@pytest.mark.parametrize(
    ("probe", "timeout", "reason"),
    [
        ([sys.executable, "-c", "raise SystemExit('CUDA error: no device')"], 30, "probe under MPS failed: CUDA error"),
        ([sys.executable, "-c", "import time; time.sleep(30)"], 1, "probe under MPS hung for 1 s"),
        ([sys.executable, "-c", "pass"], 30, "started no server for it"),
    ],
)
def test_a_probe_that_fails_hangs_or_gets_no_server_ends_the_daemon(fake_control, probe, timeout, reason):
    with pytest.raises(mps.MpsUnavailable, match=reason):
        mps.start(fake_control, probe=probe, probe_timeout=timeout)
    pipe = mps.home(fake_control) / "pipe"
    assert mps.server_list(pipe) is None and _calls(pipe) == ["-f", "quit"]
    assert not (pipe.parent / mps.PID_FILE).exists()


def test_an_interrupt_while_starting_leaves_no_daemon(fake_control, monkeypatch):
    real = subprocess.run

    def interrupted(cmd, *a, **k):
        if cmd == SERVE:
            raise KeyboardInterrupt
        return real(cmd, *a, **k)

    monkeypatch.setattr(mps.subprocess, "run", interrupted)
    with pytest.raises(KeyboardInterrupt):
        mps.start(fake_control, probe=SERVE)
    assert mps.server_list(mps.home(fake_control) / "pipe") is None


def test_a_refused_mute_or_missing_daemon_is_said_in_one_line(fake_control, monkeypatch, tmp_path):
    monkeypatch.setenv("FAKE_MPS_REFUSE", "1")
    with pytest.raises(mps.MpsUnavailable, match="-f exited 1: An instance of this daemon is already running"):
        mps.start(fake_control, probe=SERVE)
    monkeypatch.delenv("FAKE_MPS_REFUSE")
    monkeypatch.setenv("FAKE_MPS_MUTE", "1")
    monkeypatch.setattr(mps, "ANSWER_TIMEOUT", 1.0)
    with pytest.raises(mps.MpsUnavailable, match="-f did not answer in 1 s"):
        mps.start(fake_control, probe=SERVE)
    pid = int((tmp_path / "mps" / mps.PID_FILE).read_text()) if (tmp_path / "mps" / mps.PID_FILE).exists() else None
    assert pid is None  # ended by its pid: a mute daemon answers no quit
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    with pytest.raises(mps.MpsUnavailable, match="no nvidia-cuda-mps-control on PATH"):
        mps.start(fake_control, probe=SERVE)
    assert mps.sharing({}) == "time-slicing (no MPS daemon answers)"


class _Log:
    def __init__(self):
        self.lines: list[tuple[str, str]] = []

    def info(self, msg, *a):
        self.lines.append(("info", msg % a))

    def warning(self, msg, *a):
        self.lines.append(("warning", msg % a))


def test_the_flow_hands_the_daemon_to_gpu_slots_and_ends_it_after_the_items_however_it_leaves(
    fake_control, monkeypatch
):
    from flows import pipeline

    order: list[str] = []
    monkeypatch.setattr(pipeline, "kill_running", lambda: order.append("items ended"))
    stop = mps.stop
    monkeypatch.setattr(mps, "stop", lambda pipe, **k: order.append("daemon ended") or stop(pipe, **k))
    monkeypatch.setattr(mps, "PROBE", SERVE)
    log = _Log()
    with pipeline._gpu_sharing(fake_control, plan_slots(3, ["0"], 3), True, log) as slots:
        pipe = Path(slots[0].env()[mps.PIPE_ENV])
        assert all(s.env()[mps.PIPE_ENV] == str(pipe) for s in slots) and mps.server_list(pipe) == ["4242"]
        order.clear()
    assert order == ["items ended", "daemon ended"] and mps.server_list(pipe) is None
    assert log.lines[0][1].startswith("items sharing a GPU take it by MPS (daemon ")
    assert log.lines[-1] == ("info", "MPS daemon ended (quit)")

    with pytest.raises(RuntimeError, match="an item failed"):
        with pipeline._gpu_sharing(fake_control, plan_slots(2, ["0"], 2), True, _Log()):
            assert mps.server_list(pipe) == ["4242"]
            raise RuntimeError("an item failed")
    assert mps.server_list(pipe) is None


def test_where_the_daemon_cannot_start_the_flow_says_so_and_items_take_turns(fake_control, monkeypatch):
    from flows.pipeline import _gpu_sharing

    monkeypatch.setattr(mps, "PROBE", [sys.executable, "-c", "pass"])
    log = _Log()
    with _gpu_sharing(fake_control, plan_slots(2, ["0"], 2), True, log) as slots:
        assert all(mps.PIPE_ENV not in s.env() for s in slots)
    assert log.lines[0][0] == "warning" and "started no server" in log.lines[0][1] and "time-slicing" in log.lines[0][1]
    assert log.lines[1] == ("info", "items sharing a GPU take it by time-slicing (no MPS daemon answers)")

    log = _Log()
    with _gpu_sharing(fake_control, plan_slots(2, []), True, log):
        pass
    assert log.lines == [("warning", "--mps: no GPU here, so nothing to share: ignored")]


def test_under_the_daemon_an_item_names_its_gpu_as_the_server_numbers_it(fake_control, monkeypatch):
    """The MPS server numbers the GPUs it was started with from 0; a client naming the box's id fails (NVIDIA's
    MPS guide): the flow given GPUs 2 and 3 hands its items 0 and 1, and its log keeps the box's ids."""
    from flows.pipeline import _gpu_sharing

    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "2,3")
    probe = [sys.executable, "-c", SERVE[2] + "; open('seen', 'w').write(os.environ.get('CUDA_VISIBLE_DEVICES', '-'))"]
    monkeypatch.setattr(mps, "PROBE", probe)
    monkeypatch.chdir(fake_control)
    with _gpu_sharing(fake_control, plan_slots(4, ["2", "3"], 2), True, _Log()) as slots:
        assert [s.env()["CUDA_VISIBLE_DEVICES"] for s in slots] == ["0", "1", "0", "1"]
        assert [s.describe().split(",")[0] for s in slots] == [f"slot {i} (GPU {g}" for i, g in enumerate("2323")]
        pipe = Path(slots[0].env()[mps.PIPE_ENV])
        assert (pipe / "daemon-env").read_text().split() == ["order=", "visible=2,3"]  # the box's order: given
        assert (fake_control / "seen").read_text() == "-"  # the probe, a client, names no GPU: it sees the server's

    monkeypatch.delenv("CUDA_VISIBLE_DEVICES")
    with _gpu_sharing(fake_control, plan_slots(2, ["0", "1", "2"], 1), True, _Log()) as slots:
        assert [s.env()["CUDA_VISIBLE_DEVICES"] for s in slots] == ["0", "1"]
        assert (pipe / "daemon-env").read_text().split() == ["order=PCI_BUS_ID", "visible="]  # as the slots number


def test_run_refuses_mps_without_a_gpu_or_with_fan_out_in_one_line(capsys, monkeypatch, tmp_path):
    from selfcal.cli import main

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    assert main(["run", "--mps"]) == 2
    assert "run --mps: no GPU is visible here" in capsys.readouterr().err
    monkeypatch.setenv("PREFECT_API_URL", "http://127.0.0.1:9/api")
    assert main(["run", "--mps", "--fan-out", "selfcal-item/items"]) == 2
    assert "run --mps: with --fan-out the items run on the workers" in capsys.readouterr().err


def test_the_benchmarks_verdict_takes_mps_only_for_the_same_tokens_faster():
    from benchmarks.gpu_sharing import verdict

    def row(rate, same=True):
        return {"throughput_tokens_per_s": rate, "processes": [{"same_tokens_as_time_slicing": same}]}

    assert verdict({"time-slicing": row(100), "mps": row(111)}) == "mps"
    assert verdict({"time-slicing": row(100), "mps": row(109)}) == "time-slicing"
    assert verdict({"time-slicing": row(100), "mps": row(300, same=False)}) == "time-slicing"
    unavailable = {"unavailable": "no nvidia-cuda-mps-control on PATH"}
    assert verdict({"time-slicing": row(100), "mps": unavailable}) == "time-slicing"


def test_the_benchmarks_copies_generate_only_when_released_and_its_throughput_is_tokens_over_the_span(tiny_model):
    """Lease 12's benchmark summed each copy's own rate: copies whose loads ended at different times generated
    partly alone, so the sum overstated what the GPU did. Copies now wait at a barrier after loading, and the
    throughput is all their tokens over the span from the release to the last end."""
    import argparse

    from benchmarks import gpu_sharing

    cmd = [sys.executable, gpu_sharing.__file__, "--worker", "0", "--model", str(tiny_model), "--n", "2"]
    p = subprocess.Popen(
        [*cmd, "--seq-len", "8"], stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True
    )
    assert gpu_sharing._wait_ready(p)
    time.sleep(1.0)
    released = time.time()
    out, _ = p.communicate(gpu_sharing.GO + "\n", timeout=120)
    alone = json.loads(out.strip().splitlines()[-1])
    assert alone["generation_start"] >= released and alone["tokens"] > 0

    args = argparse.Namespace(model=str(tiny_model), dtype="float32", n=2, seq_len=8)
    row = gpu_sharing.run_copies(args, 2, dict(os.environ))
    procs = row["processes"]
    assert [q["seed"] for q in procs] == [0, 1] and procs[0]["digest"] == alone["digest"] != procs[1]["digest"]
    span = max(q["generation_end"] for q in procs) - min(q["generation_start"] for q in procs)
    assert row["generation_span_seconds"] >= round(span, 3)
    tokens, rounded = sum(q["tokens"] for q in procs), row["generation_span_seconds"]  # the span to 1 ms
    assert tokens / (rounded + 0.0006) <= row["throughput_tokens_per_s"] <= tokens / (rounded - 0.0006)
    assert row["sum_of_process_rates"] == pytest.approx(sum(q["tokens_per_s"] for q in procs), abs=0.2)


def test_a_pid_file_names_its_daemon_only_while_that_process_runs(tmp_path):
    """The pid and its start time: a pid the system has given to another process since names nothing."""
    (tmp_path / mps.PID_FILE).write_text(mps._pid_line(os.getpid()))
    assert mps._daemon_pid(tmp_path) == os.getpid()
    (tmp_path / mps.PID_FILE).write_text(f"{os.getpid()} 0\n")
    assert mps._daemon_pid(tmp_path) is None
    (tmp_path / mps.PID_FILE).write_text("not a pid\n")
    assert mps._daemon_pid(tmp_path) is None
