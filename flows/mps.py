"""CUDA MPS for the stage items that share a GPU (``selfcal run --mps``).

Without MPS, processes on one GPU take turns: the GPU runs one process's kernels at a time. Items whose
kernels each fill a small part of an H200 (the lockstep generator's 128-row decoding steps, SparseGPT's
column loops over 576-wide layers) then keep it "busy" while most of its SMs idle: lease 11 ran six items at
once on one H200 at 85% busy, and a set that takes 12 s alone took 70-129 s there. Under NVIDIA's
Multi-Process Service one server holds the GPU's context for every client process, and the clients'
kernels run side by side.

``selfcal run --mps`` starts a control daemon of the run's own (``nvidia-cuda-mps-control -f``, a process of
its own session; its pipe and log directories under /tmp, one per workspace, since a unix socket's path must
stay short), checks with a one-process CUDA probe that a server answered for it, hands both directories to
every item (``CUDA_MPS_PIPE_DIRECTORY``, ``CUDA_MPS_LOG_DIRECTORY``) and, once its items are ended, quits it
(or, if it does not quit, ends its process). If starting fails in any way, the items share the GPU by
time-slicing as they would without ``--mps``, and the log says why: a nightly run is not lost to it.
It changes no setting of the GPU (the compute mode is the box owner's) and limits no client's share of the
SMs (``CUDA_MPS_ACTIVE_THREAD_PERCENTAGE`` unset), so each item's kernels are chosen as without MPS.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

CONTROL = "nvidia-cuda-mps-control"
PIPE_ENV = "CUDA_MPS_PIPE_DIRECTORY"
LOG_ENV = "CUDA_MPS_LOG_DIRECTORY"
DEFAULT_PIPE = Path("/tmp/nvidia-mps")  # where clients look when PIPE_ENV is unset (a box's own daemon)
PID_FILE = "daemon.pid"  # beside pipe/ and log/: the daemon this module started, for a later stop to end
PROBE = [sys.executable, "-c", "import torch; torch.ones(1, device='cuda').add_(1); torch.cuda.synchronize()"]
PROBE_TIMEOUT = 60.0  # seconds: importing torch on a busy box takes some, a probe that hangs takes a lease
ANSWER_TIMEOUT = 10.0  # seconds for a new daemon to answer, and for one query to it


class MpsUnavailable(RuntimeError):
    """MPS could not be started or did not serve the probe (the run goes on by time-slicing)."""


@dataclass(frozen=True)
class Mps:
    pipe: Path
    log: Path
    pid: int  # the control daemon's
    servers: tuple[str, ...]  # the server pids the daemon listed after the probe

    def env(self) -> dict[str, str]:
        return {PIPE_ENV: str(self.pipe), LOG_ENV: str(self.log)}

    def describe(self) -> str:
        return f"MPS (daemon {self.pid} at {self.pipe}, server pid {', '.join(self.servers)})"


def home(root: Path) -> Path:
    """The run's MPS directory for the workspace at ``root``: short and the same for every run of it."""
    digest = hashlib.sha1(str(Path(root).resolve()).encode()).hexdigest()[:10]
    return Path("/tmp") / f"selfcal-mps-{digest}"


def _env(pipe: Path, log: Path | None = None) -> dict[str, str]:
    env = {**os.environ, PIPE_ENV: str(pipe)}
    if log is not None:
        env[LOG_ENV] = str(log)
    return env


def _ask(pipe: Path, command: str, timeout: float) -> subprocess.CompletedProcess | None:
    """One command to the daemon at ``pipe`` (client mode: the command on stdin); None if it could not be asked."""
    if shutil.which(CONTROL) is None:
        return None
    try:
        return subprocess.run(
            [CONTROL], input=f"{command}\n", env=_env(pipe), capture_output=True, text=True, timeout=timeout
        )
    except (subprocess.SubprocessError, OSError):
        return None


def server_list(pipe: Path, timeout: float = ANSWER_TIMEOUT) -> list[str] | None:
    """The server pids of the daemon whose pipe directory is ``pipe``; None when no daemon answers there."""
    done = _ask(pipe, "get_server_list", timeout)
    return None if done is None or done.returncode != 0 else done.stdout.split()


#: The daemons this process started, by pid: polled, never reaped behind the subprocess module's back.
_DAEMONS: dict[int, subprocess.Popen] = {}


def _stat(pid: int) -> tuple[str, str] | None:
    """(state, start time in clock ticks since boot) of ``pid`` from /proc; None if there is no such process."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return fields[0], fields[19]  # stat fields 3 and 22


def _pid_line(pid: int) -> str:
    stat = _stat(pid)
    return f"{pid} {stat[1] if stat else '?'}\n"


def _daemon_pid(base: Path) -> int | None:
    """The daemon this module started under ``base``, if that process still runs: the pid file holds its pid
    and start time, so a pid the system has since given to another process names none."""
    try:
        pid_text, started = (base / PID_FILE).read_text().split()
        pid = int(pid_text)
    except (OSError, ValueError):
        return None
    stat = _stat(pid)
    return pid if stat is not None and stat[1] == started and stat[0] != "Z" else None


def _alive(pid: int) -> bool:
    """Whether ``pid`` runs: a daemon of this process by its Popen, any other by /proc (a zombie does not)."""
    if pid in _DAEMONS:
        return _DAEMONS[pid].poll() is None
    stat = _stat(pid)
    return stat is not None and stat[0] != "Z"


def _gone(pipe: Path, pid: int | None, seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while True:
        alive = pid is not None and _alive(pid)
        if not alive and server_list(pipe, timeout=2) is None:
            return True
        if time.monotonic() > deadline:
            return False
        time.sleep(0.2)


def _signal(pid: int, servers: list[str], sig: int) -> None:
    """``sig`` to the daemon's session (it leads it: the servers it spawned, if they stayed in it) and to the
    servers it listed, if they are still MPS servers."""
    targets = [lambda: os.killpg(pid, sig)]
    for server in servers:
        if server.isdigit() and b"nvidia-cuda-mps-server" in _cmdline(int(server)):
            targets.append(lambda s=int(server): os.kill(s, sig))
    for send in targets:
        try:
            send()
        except OSError:  # gone already, or not ours to signal
            pass


def _cmdline(pid: int) -> bytes:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return b""


def stop(pipe: Path, timeout: float = 30.0, *, pid: int | None = None) -> str:
    """End the daemon at ``pipe``: ``quit`` (it waits for its clients: stop them first), then, if it is still
    there, TERM and then KILL to the daemon this module started (``pid``, else the pid file's) and the servers it
    listed. At most about a minute. Says what happened: ``none`` (no daemon), ``quit``, ``killed`` or ``left``
    (it answers still, and no process of ours to end)."""
    base = pipe.parent
    pid = pid or _daemon_pid(base)
    servers = server_list(pipe)
    if servers is None and (pid is None or not _alive(pid)):
        (base / PID_FILE).unlink(missing_ok=True)
        return "none"
    _ask(pipe, "quit", timeout)
    outcome = "quit" if _gone(pipe, pid, 5) else "left"
    if outcome == "left" and pid is not None:
        for sig in (signal.SIGTERM, signal.SIGKILL):
            _signal(pid, servers or [], sig)
            if _gone(pipe, pid, 5):
                outcome = "killed"
                break
    if outcome != "left":
        (base / PID_FILE).unlink(missing_ok=True)
        if pid is not None:
            _DAEMONS.pop(pid, None)
    return outcome


def _last_line(text: str) -> str:
    lines = [line for line in (text or "").strip().splitlines() if line.strip()]
    return lines[-1].strip() if lines else "no output"


def client_devices(gpus: list[str]) -> dict[str, str]:
    """The ``CUDA_VISIBLE_DEVICES`` an item on each of ``gpus`` (the box's ids, as the flow hands them out) gives
    under the daemon: the MPS server numbers the devices it was started with from 0, in their order, and a client
    naming the box's id instead fails (NVIDIA's MPS guide, "CUDA_VISIBLE_DEVICES")."""
    return {gpu: str(i) for i, gpu in enumerate(gpus)}


def start(
    root: Path, *, device_order: str | None = None, probe: list[str] | None = None, probe_timeout: float = PROBE_TIMEOUT
) -> Mps:
    """A daemon for the run in the workspace ``root``, serving a one-process CUDA probe; MpsUnavailable, with no
    daemon left behind, if not (an interrupt on the way also ends it).

    The daemon runs in the foreground mode (``-f``) as a process of its own session, so its pid is known and a
    later ``stop`` can end it even when ``quit`` is not answered; one a killed run left is ended first (its
    devices may not be this run's). It sees the GPUs this process sees (``CUDA_VISIBLE_DEVICES`` as the flow was
    given it), numbered in ``device_order`` (the slots' ``CUDA_DEVICE_ORDER``), so ``client_devices`` names each
    item's GPU as the server numbers it. The probe, a client, names none: it sees them all."""
    if shutil.which(CONTROL) is None:
        raise MpsUnavailable(f"no {CONTROL} on PATH")
    base = home(root)
    pipe, log = base / "pipe", base / "log"
    try:
        pipe.mkdir(parents=True, exist_ok=True)
        log.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise MpsUnavailable(f"cannot make {base}: {e}") from None
    if stop(pipe) == "left":
        raise MpsUnavailable(f"a daemon at {pipe} that this run did not start does not quit")
    env = _env(pipe, log)
    if device_order:
        env["CUDA_DEVICE_ORDER"] = device_order
    client = {k: v for k, v in env.items() if k != "CUDA_VISIBLE_DEVICES"}
    output = log / "control-daemon.txt"
    daemon = None
    try:
        with open(output, "w") as out:
            daemon = subprocess.Popen(
                [CONTROL, "-f"],
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        _DAEMONS[daemon.pid] = daemon
        (base / PID_FILE).write_text(_pid_line(daemon.pid))
        deadline = time.monotonic() + ANSWER_TIMEOUT
        while server_list(pipe) is None:
            if daemon.poll() is not None:
                raise MpsUnavailable(f"{CONTROL} -f exited {daemon.returncode}: {_last_line(output.read_text())}")
            if time.monotonic() > deadline:
                raise MpsUnavailable(f"{CONTROL} -f did not answer in {ANSWER_TIMEOUT:g} s")
            time.sleep(0.2)
        try:
            done = subprocess.run(probe or PROBE, env=client, capture_output=True, text=True, timeout=probe_timeout)
        except subprocess.TimeoutExpired:
            raise MpsUnavailable(f"a one-process CUDA probe under MPS hung for {probe_timeout:g} s") from None
        if done.returncode != 0:
            raise MpsUnavailable(f"a one-process CUDA probe under MPS failed: {_last_line(done.stderr)}")
        servers = server_list(pipe)
        if not servers:
            raise MpsUnavailable(f"the probe ran, but the daemon started no server for it (see {log})")
    except BaseException as e:  # any failure, an interrupt too: no daemon of this run is left behind
        stop(pipe, pid=daemon.pid if daemon else None)
        if isinstance(e, (subprocess.SubprocessError, OSError)):
            raise MpsUnavailable(f"{CONTROL}: {e}") from None
        raise
    return Mps(pipe=pipe, log=log, pid=daemon.pid, servers=tuple(servers))


def sharing(environ: dict[str, str] | None = None) -> str:
    """How items sharing a GPU take it, as far as this process can tell: through whose MPS daemon, or in turns."""
    env = os.environ if environ is None else environ
    pipe = Path(env[PIPE_ENV]) if env.get(PIPE_ENV) else DEFAULT_PIPE
    if server_list(pipe) is not None:
        return f"MPS (a daemon answers at {pipe})"
    return "time-slicing (no MPS daemon answers)"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="The MPS daemon a `selfcal run --mps` in a workspace starts.")
    ap.add_argument("command", choices=["stop", "status"], help="stop: quit it (a killed run's); status: say if up")
    ap.add_argument("--workspace", type=Path, default=Path("."), help="the workspace the run ran in (default .)")
    args = ap.parse_args(argv)
    pipe = home(args.workspace) / "pipe"
    if args.command == "stop":
        outcome = stop(pipe)
        print(f"mps: {outcome} ({pipe})")
        return 1 if outcome == "left" else 0
    servers = server_list(pipe)
    print(f"mps: {'no daemon' if servers is None else 'daemon, servers ' + (' '.join(servers) or 'none')} at {pipe}")
    return 0 if servers is not None else 1


if __name__ == "__main__":
    sys.exit(main())
