"""Step 0 (DVC stage `guard`): the workspace lock for a plain `dvc repro`, and `selfcal check`, before
DVC touches any other stage's outputs.

DVC removes a stale stage's outputs before it runs the stage's command, so a command that refuses
its params or a busy workspace has already cost the old, good output. This stage runs first
(every other stage depends on its output, which never changes, so it re-runs nothing) and is
always run (``always_changed``), so a refusal happens while every output is still in place.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys

from selfcal.artifacts import atomic_write_text
from selfcal.config import DEFAULT_PARAMS, PARAMS_ENV, Params, params_path
from selfcal.modelio import pick_device
from selfcal.pipeline import layout
from selfcal.pipeline.check import check
from selfcal.workspace_lock import WorkspaceBusyError, held_by_ancestor, read_holder, write_guard

log = logging.getLogger("selfcal.guard")
HOLDER_LABEL = "dvc repro"


def _dvc_ancestor() -> int | None:
    """The ``dvc`` process that runs this stage (its command runs under a shell), if any."""
    import psutil

    for proc in psutil.Process().parents():
        try:
            cmd = " ".join(proc.cmdline())
        except psutil.Error:
            continue
        if "dvc" in cmd and any(w in cmd.split() for w in ("repro", "exp", "run")):
            return proc.pid
    return None


def _hold_for_dvc(params: Params, owner: int) -> None:
    """Start the holder process for ``owner`` and wait until it has the lock (or says why not)."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "selfcal.workspace_lock", str(params.root), str(owner), HOLDER_LABEL],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        stdin=subprocess.DEVNULL,
        text=True,
        start_new_session=True,  # outlives this stage; ends when its dvc does
    )
    assert proc.stdout is not None
    first = proc.stdout.readline().strip()
    proc.stdout.close()
    if first != "held":
        raise WorkspaceBusyError(first.replace("dvc repro: ", "", 1) or "could not take the workspace lock")


def guard(params: Params, *, checked: str | None = None, stages_here: bool = True) -> str:
    """Take (or prove free) the workspace lock, run ``selfcal check`` unless ``checked`` is its summary for
    these very params (a profile checked just before it was installed), write the guard's constant output.

    ``stages_here``: the stages run on this machine (``dvc repro``, ``selfcal run``, a fan-out worker's item), so
    ``model.device`` must be one it has; ``selfcal check`` alone only notes it (it may run on a coordinator
    without the GPU workers' CUDA), as does the fanning-out flow's own guard."""
    holder = read_holder(params.root)
    if not (holder is not None and held_by_ancestor(holder)):
        owner = _dvc_ancestor()
        if owner is None:  # run by hand: just prove nobody else holds the workspace
            with write_guard(params.root, label="selfcal guard"):
                pass
        else:
            _hold_for_dvc(params, owner)
    # The file these params came from: $SELFCAL_PARAMS, else params.yaml in the params' own folder.
    file = params_path() if os.environ.get(PARAMS_ENV) else params.root / DEFAULT_PARAMS
    summary = checked if checked is not None else check(params, file)
    if stages_here:
        pick_device(params.model.device)  # "model.device: 'cuda' requested but no CUDA device is available"
    # Constant content: the stages that depend on it never re-run because of it.
    atomic_write_text(layout.guard_file(params), '{"checked": true}\n')
    log.info("%s", summary.splitlines()[0] if summary else "params ok")
    return summary
