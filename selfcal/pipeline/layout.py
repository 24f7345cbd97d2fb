"""Where each artifact lives. One place, so stages, dvc.yaml and tests agree."""

from __future__ import annotations

from pathlib import Path

from selfcal.config import Params

DENSE = "dense"


def calib_name(source: str, seed: int) -> str:
    return f"{source}-s{seed}"


def calibration_dir(params: Params, source: str, seed: int) -> Path:
    return params.artifacts_dir / "calibration" / calib_name(source, seed)


def checkpoint_name(source: str, seed: int, method: str) -> str:
    return f"{calib_name(source, seed)}-{method}"


def guard_file(params: Params) -> Path:
    """The guard stage's output: every other stage depends on it, so it runs first."""
    return params.artifacts_dir / "checked.json"


def checkpoints_root(params: Params) -> Path:
    return params.artifacts_dir / "checkpoints"


def checkpoint_dir(params: Params, source: str, seed: int, method: str) -> Path:
    return checkpoint_path(params, checkpoint_name(source, seed, method))


def checkpoint_path(params: Params, name: str) -> Path:
    """The checkpoint folder of a checkpoint name (``SOURCE-sSEED-METHOD``), always inside the
    checkpoints folder: a name with a path in it (``../../x``) is refused, not followed."""
    from selfcal.config import SAFE_NAME
    from selfcal.errors import ConfigError

    if not SAFE_NAME.fullmatch(name):
        raise ConfigError(
            f"{name!r} is not a checkpoint name: give 'dense' or SOURCE-sSEED-METHOD "
            f"(a folder of {shown(checkpoints_root(params), params)}), not a path"
        )
    return checkpoints_root(params) / name


def shown(path: Path, params: Params) -> str:
    from selfcal.paths import shown_path

    return shown_path(path, params.root)


def metrics_dir(params: Params) -> Path:
    return params.artifacts_dir / "metrics"


def metrics_file(params: Params, name: str) -> Path:
    """The flat metrics of one evaluated model (``acc.TASK``, ``mean_acc``, ``ppl.SET``): DVC metrics."""
    return metrics_dir(params) / f"{name}.json"


def evaluation_file(params: Params, name: str) -> Path:
    """The full evaluation record of one model (``selfcal.records.EvaluationRecord``)."""
    return params.artifacts_dir / "evaluations" / f"{name}.json"


def report_dir(params: Params) -> Path:
    return params.artifacts_dir / "report"


def results_markdown(params: Params) -> Path:
    return report_dir(params) / "results.md"


def report_metrics_file(params: Params) -> Path:
    """The aggregate's DVC metrics: mean per method x source."""
    return report_dir(params) / "metrics.json"


def evaluation_targets(params: Params) -> list[str]:
    """Every model the current params evaluate: the dense base (the reference row), then each checkpoint."""
    return [DENSE] + [
        checkpoint_name(source, seed, method)
        for source, seed in calibration_names(params)
        for method in params.compression.methods
    ]


def diagnostics_file(params: Params, name: str) -> Path:
    return params.artifacts_dir / "diagnostics" / f"{name}.json"


def calibration_names(params: Params) -> list[tuple[str, int]]:
    return [(source, seed) for source in params.calibration.sources for seed in params.calibration.seeds]


def prepared_dir(params: Params) -> Path:
    """lm-eval's requests prepared per (task, data, tokenizer, lm-eval version, limit), shared by every evaluate
    item of the workspace (selfcal.evaluation.prepared): a cache, derived from tracked inputs, not a DVC output."""
    return params.state_dir / "prepared-tasks"
