"""Deterministic fault injection: ``SELFCAL_FAULT_AT=NAME`` makes the process ``kill -9`` itself when
it reaches ``point(NAME)``.

The fault-injection test (tests/test_faults.py) kills generate and compress at each named point, as
a lost machine or the OOM killer would, then re-runs them: no half artifact may be left, the re-run
must give the same content digests as an uninterrupted run, and no MLflow run may stay RUNNING.
Outside that test the variable is unset and a point costs one dictionary lookup.
"""

from __future__ import annotations

import os
import signal

ENV = "SELFCAL_FAULT_AT"


def point(name: str) -> None:
    if os.environ.get(ENV) == name:
        os.kill(os.getpid(), signal.SIGKILL)
