"""``selfcal run --mps``: the run's own MPS daemon, checked by a probe, handed to GPU items, quit at the end;
every way it can fail leaves the run to time-slicing. A fake ``nvidia-cuda-mps-control`` stands in for
NVIDIA's (this box has no GPU): it keeps its state in the pipe directory it is given, as the real one does."""

from __future__ import annotations

import os
import stat
import sys

import pytest

from flows import mps
from flows.slots import plan_slots

FAKE = """#!/bin/sh
# -d: a daemon (its control file) unless told to fail; else a client: get_server_list / quit on stdin
dir=$CUDA_MPS_PIPE_DIRECTORY
[ -n "$dir" ] || dir=/nonexistent-default-pipe
if [ "$1" = "-d" ]; then
    [ -z "$FAKE_MPS_REFUSE" ] || { echo "An instance of this daemon is already running" >&2; exit 1; }
    echo up > "$dir/control"; echo "$*" >> "$dir/calls"
    echo "order=$CUDA_DEVICE_ORDER visible=$CUDA_VISIBLE_DEVICES" > "$dir/daemon-env"; exit 0
fi
[ -f "$dir/control" ] || { echo "Cannot find MPS control daemon process" >&2; exit 1; }
while read -r cmd; do
    case $cmd in
        get_server_list) [ -f "$dir/servers" ] && cat "$dir/servers" ;;
        quit) rm -f "$dir/control" "$dir/servers"; echo quit >> "$dir/calls" ;;
    esac
done
exit 0
"""

# what a CUDA client does to the fake: the daemon starts a server for it
SERVE = [
    sys.executable,
    "-c",
    "import os; open(os.environ['CUDA_MPS_PIPE_DIRECTORY'] + '/servers', 'w').write('4242\\n')",
]


@pytest.fixture
def fake_control(tmp_path, monkeypatch):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    tool = bin_dir / mps.CONTROL
    tool.write_text(FAKE)
    tool.chmod(tool.stat().st_mode | stat.S_IEXEC)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.delenv(mps.PIPE_ENV, raising=False)
    workspace = tmp_path / "ws"
    workspace.mkdir()
    yield workspace
    mps.stop(mps.home(workspace) / "pipe")


def test_a_started_daemon_served_the_probe_reaches_gpu_items_and_quits(fake_control):
    daemon = mps.start(fake_control, probe=SERVE)
    assert daemon.pipe == mps.home(fake_control) / "pipe" and daemon.servers == ("4242",)
    assert len(str(daemon.pipe / "control")) < 100  # a unix socket's path limit is 108
    assert mps.server_list(daemon.pipe) == ["4242"]
    assert mps.sharing({mps.PIPE_ENV: str(daemon.pipe)}).startswith("MPS (a daemon answers at")
    gpu, cpu = plan_slots(2, ["0"], 2)[0], plan_slots(1, [])[0]
    from dataclasses import replace

    assert replace(gpu, extra=tuple(daemon.env().items())).env()[mps.PIPE_ENV] == str(daemon.pipe)
    assert mps.PIPE_ENV not in cpu.env()
    assert mps.stop(daemon.pipe) is True
    assert mps.server_list(daemon.pipe) is None and mps.stop(daemon.pipe) is False
    assert (daemon.pipe / "calls").read_text().split() == ["-d", "quit"]


def test_a_daemon_a_killed_run_left_is_taken_over_not_started_twice(fake_control):
    first = mps.start(fake_control, probe=SERVE)
    second = mps.start(fake_control, probe=SERVE)
    assert second.pipe == first.pipe
    assert (first.pipe / "calls").read_text().split() == ["-d"]
    assert mps.main(["status", "--workspace", str(fake_control)]) == 0
    assert mps.main(["stop", "--workspace", str(fake_control)]) == 0
    assert mps.main(["status", "--workspace", str(fake_control)]) == 1


@pytest.mark.parametrize(
    ("probe", "timeout", "reason"),
    [
        ([sys.executable, "-c", "raise SystemExit('CUDA error: no device')"], 30, "probe under MPS failed: CUDA error"),
        ([sys.executable, "-c", "import time; time.sleep(30)"], 1, "probe under MPS hung for 1 s"),
        ([sys.executable, "-c", "pass"], 30, "started no server for it"),
    ],
)
def test_a_probe_that_fails_hangs_or_gets_no_server_quits_the_daemon(fake_control, probe, timeout, reason):
    with pytest.raises(mps.MpsUnavailable, match=reason):
        mps.start(fake_control, probe=probe, probe_timeout=timeout)
    assert mps.server_list(mps.home(fake_control) / "pipe") is None  # quit: no daemon left behind


def test_no_tool_or_a_refused_daemon_is_said_in_one_line(fake_control, monkeypatch, tmp_path):
    monkeypatch.setenv("FAKE_MPS_REFUSE", "1")
    with pytest.raises(mps.MpsUnavailable, match="-d exited 1: An instance of this daemon is already running"):
        mps.start(fake_control, probe=SERVE)
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


def test_the_flow_hands_the_daemon_to_gpu_slots_or_says_why_they_take_turns(fake_control, monkeypatch):
    from flows.pipeline import _gpu_sharing

    log = _Log()
    monkeypatch.setattr(mps, "PROBE", SERVE)
    daemon, slots = _gpu_sharing(fake_control, plan_slots(3, ["0"], 3), True, log)
    assert daemon is not None and all(s.env()[mps.PIPE_ENV] == str(daemon.pipe) for s in slots)
    assert log.lines == [("info", f"items sharing a GPU take it by MPS (daemon at {daemon.pipe}, server pid 4242)")]
    mps.stop(daemon.pipe)

    log = _Log()
    monkeypatch.setattr(mps, "PROBE", [sys.executable, "-c", "pass"])
    daemon, slots = _gpu_sharing(fake_control, plan_slots(2, ["0"], 2), True, log)
    assert daemon is None and all(mps.PIPE_ENV not in s.env() for s in slots)
    assert log.lines[0][0] == "warning" and "started no server" in log.lines[0][1] and "time-slicing" in log.lines[0][1]
    assert log.lines[1] == ("info", "items sharing a GPU take it by time-slicing (no MPS daemon answers)")

    log = _Log()
    daemon, slots = _gpu_sharing(fake_control, plan_slots(2, []), True, log)
    assert daemon is None and log.lines == [("warning", "--mps: no GPU here, so nothing to share: ignored")]


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
    assert verdict({"time-slicing": row(100), "mps": {"unavailable": "no nvidia-cuda-mps-control on PATH"}}) == (
        "time-slicing"
    )


def test_under_the_daemon_an_item_names_its_gpu_as_the_server_numbers_it(fake_control, monkeypatch):
    """The MPS server numbers the GPUs it was started with from 0; a client naming the box's id fails (NVIDIA's
    MPS guide): the flow given GPUs 2 and 3 hands its items 0 and 1, and its log keeps the box's ids."""
    from flows.pipeline import _gpu_sharing

    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "2,3")
    probe = [sys.executable, "-c", SERVE[2] + "; open('seen', 'w').write(os.environ.get('CUDA_VISIBLE_DEVICES', '-'))"]
    monkeypatch.setattr(mps, "PROBE", probe)
    monkeypatch.chdir(fake_control)
    daemon, slots = _gpu_sharing(fake_control, plan_slots(4, ["2", "3"], 2), True, _Log())
    assert [s.env()["CUDA_VISIBLE_DEVICES"] for s in slots] == ["0", "1", "0", "1"]
    assert [s.describe().split(",")[0] for s in slots] == [
        "slot 0 (GPU 2",
        "slot 1 (GPU 3",
        "slot 2 (GPU 2",
        "slot 3 (GPU 3",
    ]
    assert (daemon.pipe / "daemon-env").read_text().split() == ["order=", "visible=2,3"]  # the box's order: given
    assert (fake_control / "seen").read_text() == "-"  # the probe, a client, names no GPU: it sees the server's
    mps.stop(daemon.pipe)

    monkeypatch.delenv("CUDA_VISIBLE_DEVICES")
    daemon, slots = _gpu_sharing(fake_control, plan_slots(2, ["0", "1", "2"], 1), True, _Log())
    assert [s.env()["CUDA_VISIBLE_DEVICES"] for s in slots] == ["0", "1"]
    assert (daemon.pipe / "daemon-env").read_text().split() == ["order=PCI_BUS_ID", "visible="]  # as the slots number
