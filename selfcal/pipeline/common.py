"""What every step does first: resolve the model and check the request fits it."""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable

from selfcal import faults
from selfcal.config import Params
from selfcal.errors import ConfigError, SelfcalError
from selfcal.modelio import ModelRef, context_window, model_config, resolve_model
from selfcal.workspace_lock import write_guard

log = logging.getLogger("selfcal")


def base_model(params: Params) -> tuple[ModelRef, dict]:
    ref = resolve_model(params.model.path, root=params.root, revision=params.model.revision)
    return ref, model_config(ref)


def check_context(config: dict, seq_len: int, key: str) -> None:
    window = context_window(config)
    if window is not None and seq_len > window:
        raise ConfigError(f"{key}: {seq_len} exceeds the model's context window of {window} tokens")


def setup_logging(verbose: bool = False) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    # Per-request HTTP logs from Prefect's client and MLflow drown the pipeline's own.
    for noisy in ("httpx", "httpcore", "alembic", "urllib3"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def check_source(params: Params, source: str) -> None:
    """A set's source is one the params define (generate's check; ``inspect --source slef`` said "calibration
    tokens missing (run the generate stage first)", which generate would then refuse)."""
    if source not in params.calibration.sources:
        raise ConfigError(
            f"calibration.sources: no source named {source!r}; defined: {sorted(params.calibration.sources)}"
        )


def check_seed(params: Params, seed: int) -> None:
    """A set's seed is one the params list: a set of another (an audit's `generate --seed 7`) was written where
    DVC's graph has no item for it, tracked by nothing, as `compress` already refused an unlisted method."""
    if seed not in params.calibration.seeds:
        raise ConfigError(
            f"calibration.seeds: {seed} is not listed ({params.calibration.seeds}); list it there first, so the "
            "set is an item of the pipeline"
        )


def check_artifacts_dir(params: Params) -> None:
    """The artifacts and state folders are folders this user can write (or can be made): one line otherwise
    (a ``paths.state`` that named a file passed ``selfcal check``, then the first stage died in MLflow's set-up)."""
    _check_writable_dir(params.artifacts_dir, "paths.artifacts")
    _check_writable_dir(params.state_dir, "paths.state")


def _check_writable_dir(path, key: str) -> None:
    import os

    if path.exists() and not path.is_dir():
        raise ConfigError(f"{key}: {path} is a file, not a folder")
    probe = path
    while not probe.exists():
        probe = probe.parent
    if not probe.is_dir():
        raise ConfigError(f"{key}: {probe} (on the way to {path}) is a file, not a folder")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise ConfigError(f"{key}: {probe} is not writable by this user")


def sweep_if_sole_writer(params: Params, holder) -> None:
    """Delete the scratch killed writers left, when this process holds the workspace itself (no run
    around it whose other items may be writing): nobody else can be writing then."""
    import os

    from selfcal.scratch import sweep_scratch

    if holder is not None and holder.pid == os.getpid() and params.artifacts_dir.is_dir():
        for path in sweep_scratch(params.artifacts_dir):
            logging.getLogger("selfcal").info("removed scratch a killed writer left: %s", path)


def run_step(step: Callable[[Params], object], *, label: str | None = None, lock: bool = True) -> int:
    """A DVC stage's whole process: logging, the validated params ($SELFCAL_PARAMS or ./params.yaml),
    the step under the workspace lock (or inside the run that holds it), and a SelfcalError as one
    line with exit status 2."""
    from selfcal.config import load_params

    setup_logging()

    def body() -> None:
        params = load_params()
        check_artifacts_dir(params)
        if not lock:
            step(params)
            return
        with write_guard(params.root, label=label or f"dvc stage {' '.join(sys.argv[1:]) or sys.argv[0]}") as holder:
            sweep_if_sole_writer(params, holder)
            faults.point("stage:start")
            step(params)

    return run_cli(body)


def one_line(message: str) -> str:
    """A message as one printable line: a value from the input (a YAML string with a control
    character, a newline) must not split or garble the error it is quoted in."""
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in message)


def run_cli(fn: Callable[[], object]) -> int:
    """Turn a SelfcalError into one line on stderr and exit status 2, Ctrl-C into one line and 130; a reader that
    closed the pipe (``selfcal models | head -1``) ends the output quietly, as Python's docs advise ("Note on
    SIGPIPE"), not a traceback."""
    try:
        fn()
        sys.stdout.flush()
    except SelfcalError as err:
        print(f"selfcal: error: {one_line(str(err))}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # Ctrl-C: the scratch folders are gone as it unwinds; one line, not a traceback
        print("selfcal: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        if not _stdout_closed():
            raise  # another pipe (a subprocess's, a socket's) broke: the stage's own failure, not the reader's
        import os

        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # the exit's own flush must not fail again
        return 1
    return 0


def _stdout_closed() -> bool:
    """Whether the reader of stdout is gone: poll(2) says POLLERR on the write end of a pipe no one reads."""
    import select

    try:
        poll = select.poll()
        poll.register(sys.stdout.fileno(), select.POLLOUT)
        return any(events & select.POLLERR for _, events in poll.poll(0))
    except (OSError, ValueError, AttributeError):  # no poll here, or stdout is no file
        return False
