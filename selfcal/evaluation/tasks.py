"""lm-eval tasks, and how to read them from local files when the hub is unreachable.

A local task is lm-eval's own YAML for that task with only the data source replaced
(and, where the local copy stores a field differently, the template that reads it),
so prompts, preprocessing and metrics stay exactly lm-eval's.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from pathlib import Path

from selfcal.errors import DataError
from selfcal.paths import shown_path
from selfcal.registry import Registry


@dataclass(frozen=True)
class LocalTask:
    name: str  # lm-eval's task name
    file: str  # relative to the data directory
    split: str  # the split key lm-eval's config evaluates (test_split / validation_split)
    # The folder of lm-eval's task YAMLs (under lm_eval/tasks) that defines it: indexing only
    # these folders takes a second, indexing all ~14,000 YAMLs of lm-eval 0.4.13 takes 15-35 s.
    lm_eval_dir: str = ""
    overrides: dict = field(default_factory=dict)
    # Data distributed on request only: a missing file skips the task (and says so)
    # instead of failing the evaluation.
    on_request: bool = False


TASKS: Registry[LocalTask] = Registry("task")


def register(task: LocalTask) -> LocalTask:
    return TASKS.register(task.name, task)


# The local ARC and OpenBookQA copies store choices as a plain list and the answer as an
# index; every other local copy keeps the hub dataset's field names, so nothing changes.
_LIST_CHOICES = {"doc_to_target": "{{gold}}", "doc_to_choice": "{{choices}}"}
register(LocalTask("arc_easy", "arc_easy/test.jsonl", "test_split", "arc", _LIST_CHOICES))
register(LocalTask("arc_challenge", "arc_challenge/test.jsonl", "test_split", "arc", _LIST_CHOICES))
register(LocalTask("openbookqa", "openbookqa/test.jsonl", "test_split", "openbookqa", _LIST_CHOICES))
register(LocalTask("boolq", "boolq/validation.jsonl", "validation_split", "super_glue/boolq"))
register(LocalTask("hellaswag", "hellaswag/validation.jsonl", "validation_split", "hellaswag"))
register(LocalTask("lambada_openai", "lambada_openai/lambada_test.jsonl", "test_split", "lambada"))
register(LocalTask("piqa", "piqa/validation.jsonl", "validation_split", "piqa"))
register(LocalTask("rte", "rte/validation.jsonl", "validation_split", "glue/rte"))
register(LocalTask("winogrande", "winogrande/validation.jsonl", "validation_split", "winogrande"))
# Distributed on request only: put the 2016 validation set (the hub's field names) here.
register(LocalTask("storycloze_2016", "storycloze/validation.jsonl", "validation_split", "storycloze", on_request=True))


@functools.cache
def task_manager():
    """lm-eval's index of the YAMLs of the registered tasks, one per process, shared by every task
    and every model scored in it. Only their folders are indexed: the full index parses every
    YAML lm-eval ships (15-35 s on a 2-core machine) to find these ten."""
    from pathlib import Path as _Path

    import lm_eval.tasks
    from lm_eval.tasks import TaskManager

    root = _Path(lm_eval.tasks.__file__).parent
    folders = sorted({str(root / t.lm_eval_dir) for t in TASKS.values() if t.lm_eval_dir})
    return TaskManager(include_path=folders, include_defaults=False)


def _builtin_config(name: str) -> dict:
    from lm_eval.tasks._yaml_loader import load_yaml

    entry = task_manager().task_index.get(name)
    if entry is None or entry.yaml_path is None:
        raise DataError(f"lm-eval has no YAML task named {name!r}")
    return load_yaml(entry.yaml_path, resolve_func=True)


def local_task_config(name: str, data_dir: Path) -> dict:
    """lm-eval's config for ``name``, reading ``data_dir/<file>`` instead of the hub."""
    task = TASKS.get(name, key="evaluation.tasks")
    path = (data_dir / task.file).resolve()
    if not path.is_file():
        raise DataError(f"{path}: data file for task {name!r} not found (evaluation.data_dir={data_dir})")
    cfg = _builtin_config(name)
    for key in ("tag", "group", "training_split", "validation_split", "test_split", "fewshot_split", "dataset_name"):
        cfg.pop(key, None)
    split = task.split.removesuffix("_split")
    cfg.update(
        {
            "dataset_path": "json",
            "dataset_kwargs": {"data_files": {split: str(path)}},
            task.split: split,
            **task.overrides,
        }
    )
    return cfg


def missing_task_files(names: list[str], data_dir: Path) -> list[tuple[str, str]]:
    """(task, file relative to data_dir) for each listed task whose local file is absent; tasks whose data is
    distributed on request only are skipped at evaluation with a logged reason, so they are not listed."""
    return [
        (name, task.file)
        for name in names
        if not (task := TASKS.get(name, key="evaluation.tasks")).on_request and not (data_dir / task.file).is_file()
    ]


def resolve_tasks(names: list[str], data_dir: Path | None, *, root: Path | None = None) -> tuple[list, dict[str, str]]:
    """Task specs for lm-eval (hub names, or local configs) and the tasks skipped, with why.

    Runs before any model is loaded, so a missing data file costs nothing. A reason names its
    file relative to ``root`` (the project), so records and reports carry no machine's paths.
    """
    if data_dir is None:
        return list(names), {}
    specs, skipped = [], {}
    for name in names:
        task = TASKS.get(name, key="evaluation.tasks")
        if task.on_request and not (data_dir / task.file).is_file():
            shown = shown_path(data_dir / task.file, root)
            skipped[name] = f"{shown} not found; its data is distributed on request only"
            continue
        specs.append(local_task_config(name, data_dir))
    return specs, skipped
