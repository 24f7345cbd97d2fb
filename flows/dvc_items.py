"""The pipeline's stage items, in an order DVC can run one at a time.

Read from DVC's own graph rather than listed here: dvc.yaml's matrices expand
from params.yaml, so the items change with the profile, and only DVC knows them
all and which depends on which. (Named ``dvc_items``, not ``dvc``: Prefect puts
this folder on ``sys.path`` when it loads the flow, and ``dvc`` would shadow DVC.)
"""

from __future__ import annotations

import fnmatch
import os
import re
from pathlib import Path

# What `dvc repro` prints about an item -> what happened to it.
OUTCOMES = {
    "Running stage '{}'": "ran",
    "Stage '{}' is cached - skipping run": "restored from run-cache",
    "Stage '{}' didn't change, skipping": "up to date",
}


GUARD_STAGE = "guard"  # always changed; the flow does its work itself (flows/pipeline.py)


def stage_items(root: Path) -> list[str]:
    """Every stage item (``generate@self-0``, ``aggregate``…), dependencies first.

    Ties are broken by dvc.yaml's order, so all items of one stage stay together
    whenever the graph allows it; that is what a reader of the run expects to see.
    """
    return list(stage_graph(root))


def stage_graph(root: Path) -> dict[str, list[str]]:
    """Every stage item -> the items it depends on (whose outputs it reads), dependencies first (as
    ``stage_items``). Read once, before any item runs: concurrent ``dvc`` processes rewrite dvc.lock."""
    import networkx as nx
    from dvc.repo import Repo

    with Repo(str(root)) as repo:
        stages = list(repo.index.stages)
        position = {stage: i for i, stage in enumerate(stages)}
        # DVC's edges point from a stage to what it depends on; reversed, dependencies come first.
        graph = repo.index.graph
        order = nx.lexicographical_topological_sort(graph.reverse(copy=True), key=position.__getitem__)
        return {
            _target(stage, Path(root)): sorted(_target(dep, Path(root)) for dep in graph.successors(stage))
            for stage in order
        }


def select_items(graph: dict[str, list[str]], patterns: list[str] | None) -> dict[str, list[str]]:
    """The items matching any of ``patterns`` (shell-style: ``evaluate@self-*``), with every item they read
    from, transitively: a chunk of a grid that runs on its own (``selfcal run --only``).
    A pattern that matches no item is refused (a typo would otherwise run nothing and report success).

    The patterns' order is the chunk's order: the items the first pattern selects (and what they read) come
    first, then the second's, each group in the graph's order. The scheduler takes ready items deepest first,
    then in this order, so ``--only 'evaluate@ji-*' --only 'evaluate@vocab-*'`` starts Ji's long generation
    pools before vocab's sets instead of after them (measured: a Ji pool is minutes of sampling, a vocab set
    seconds). An item read by several patterns' items goes with the earliest, so every item still follows
    the items it reads (theirs is the same pattern or an earlier one, and the graph lists them first)."""
    if not patterns:
        return graph
    unmatched = [p for p in patterns if not any(fnmatch.fnmatchcase(i, p) for i in graph)]
    if unmatched:
        from selfcal.errors import ConfigError

        raise ConfigError(
            f"--only {unmatched[0]!r} matches no stage item of these params (items look like "
            f"{', '.join(list(graph)[:3])}; `dvc stage list` names them all)"
        )
    rank: dict[str, int] = {}
    for r, pattern in enumerate(patterns):
        todo = [i for i in graph if fnmatch.fnmatchcase(i, pattern)]
        while todo:
            item = todo.pop()
            if item not in rank:
                rank[item] = r
                todo.extend(graph[item])
    position = {item: n for n, item in enumerate(graph)}
    return {i: graph[i] for i in sorted(rank, key=lambda i: (rank[i], position[i]))}


def _target(stage, root: Path) -> str:
    """The item as ``dvc repro`` run in ``root`` names it (DVC's own ``addressing`` is relative to the cwd)."""
    dvcfile = os.path.relpath(stage.dvcfile.path, root)
    return stage.name if dvcfile == "dvc.yaml" else f"{dvcfile}:{stage.name}"


def outcome(item: str, lines: list[str]) -> str:
    """What ``dvc repro --single-item ITEM`` did, from its output."""
    for pattern, meaning in OUTCOMES.items():
        needle = re.escape(pattern.format(item))
        if any(re.search(needle, line) for line in lines):
            return meaning
    return "unknown"


def ran_items(lines: list[str]) -> list[str]:
    """The items whose command DVC started, from its output (``Running stage '…'``)."""
    return re.findall(r"Running stage '([^']+)'", "\n".join(lines))
