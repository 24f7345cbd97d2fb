"""Property: whatever one value of params.yaml is changed to, `selfcal check` either passes or exits 2
with one line, never a traceback; and when it passes, every stage item's static plan (what the stage checks
before loading a model, each step's `preflight`) passes too (issue 16, item 3)."""

from __future__ import annotations

import copy
import os

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from selfcal.cli import main
from selfcal.config import load_params
from selfcal.pipeline import compress, evaluate, generate, inspect
from tests.helpers import small_params, write_params


def _leaves(node, prefix=()):
    if isinstance(node, dict):
        for k, v in node.items():
            yield from _leaves(v, (*prefix, k))
    else:
        yield prefix


VALUES = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-3, 5000),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=10),
    st.lists(st.integers(-2, 3), max_size=3),
    st.sampled_from(["../nowhere", "/etc/passwd", "./", "-h", "auto", "gptq", "self", {}, {"kind": "x"}]),
)


@pytest.fixture(scope="module")
def base(tiny_model, tmp_path_factory):
    """Every section in play, on local files only (unit tier): two sources, a corpus, a task folder, a
    perplexity text, tracking on."""
    work = tmp_path_factory.mktemp("prop")
    (work / "tasks" / "arc_easy").mkdir(parents=True)
    (work / "tasks" / "arc_easy" / "test.jsonl").write_text('{"question": "q", "choices": ["a"], "gold": 0}\n')
    (work / "wiki.txt").write_text("The quick brown fox jumps over the lazy dog. " * 50)
    params = small_params(
        tiny_model,
        work,
        **{
            "calibration.sources": {"self": {"kind": "self"}, "c4": {"kind": "corpus", "path": "./wiki.txt"}},
            "calibration.seeds": [0, 1],
            "compression.methods": ["gptq", "wanda"],
            "compression.wanda": {},
            "evaluation.data_dir": "./tasks",
            "evaluation.perplexity": {"wikitext2": {"path": "./wiki.txt", "seq_len": 64, "max_windows": 2}},
        },
    )
    return work, params


def _items(params: dict) -> list[tuple[str, int, str]]:
    """The stage items, spelt out from the raw params (not from the code under test)."""
    cal, comp = params["calibration"], params["compression"]
    return [(s, seed, m) for s in cal["sources"] for seed in cal["seeds"] for m in comp["methods"]]


@given(data=st.data())
@settings(
    max_examples=int(os.environ.get("SELFCAL_PROPERTY_EXAMPLES", "150")),
    deadline=None,
    derandomize=not os.environ.get("SELFCAL_PROPERTY_RANDOM"),  # CI: the same examples every run
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
def test_check_on_any_mutated_value_passes_or_refuses_in_one_line(base, capsys, data):
    work, params = base
    leaves = sorted(_leaves(params))
    where = data.draw(st.sampled_from(leaves), label="key")
    value = data.draw(VALUES, label="value")
    mutated = copy.deepcopy(params)
    node = mutated
    for k in where[:-1]:
        node = node[k]
    node[where[-1]] = value
    path = write_params(work / "params.yaml", mutated)
    capsys.readouterr()
    rc = main(["--params", str(path), "check"])  # an exception other than SelfcalError fails the test
    err = capsys.readouterr().err.strip().splitlines()
    assert rc in (0, 2)
    if rc == 2:
        assert len(err) == 1 and err[0].startswith("selfcal: error: "), err
        return
    checked = load_params(path)
    for source, seed, method in _items(mutated):  # check passed: no stage item may fail on params now
        generate.preflight(checked, source, seed)
        compress.preflight(checked, source, seed, method)
    evaluate.preflight(checked)
    inspect.preflight(checked)
