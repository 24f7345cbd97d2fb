"""The scaling table (issue 20) from run folders: the flow's wall time, jobs and GPUs, each item once and on
which GPU, each GPU's busy fraction. Fake logs in the format flows/pipeline.py writes, plus a committed H200
run's real log."""

from __future__ import annotations

import json

import pytest

from tests.helpers import REPO, load_script

ITEMS = ["generate@self-0", "compress@self-0-gptq", "evaluate@self-0-gptq", "evaluate_dense"]


def _log(minutes: float, jobs: int, gpus: list[str], *, start="23:50:00.000", twice=False) -> str:
    """A flow log as the run folder keeps it: begin, slots, one attempt per item (round robin over the GPUs),
    each item finished, the flow finished ``minutes`` after it began (past midnight when start is late)."""
    from datetime import datetime, timedelta

    t0 = datetime.strptime(start, "%H:%M:%S.%f")

    def at(seconds: float) -> str:
        return (t0 + timedelta(seconds=seconds)).strftime("%H:%M:%S.%f")[:-3]

    slots = "; ".join(f"slot {i} (GPU {gpus[i % len(gpus)]}, 4 CPU threads)" for i in range(jobs))
    lines = [
        f"{at(0)} | INFO    | Flow run 'quick-fox' - Beginning flow run 'quick-fox' for flow 'selfcal-pipeline'",
        f"{at(1)} | INFO    | Flow run 'quick-fox' - {len(ITEMS)} stage items (--only evaluate@self-0-gptq)",
        f"{at(1)} | INFO    | Flow run 'quick-fox' - {jobs} item(s) at once: {slots}",
    ]
    for n, item in enumerate(ITEMS):
        gpu = gpus[n % len(gpus)]
        lines.append(
            f"{at(2 + n)} | INFO    | Task run '{item}' - attempt 1 on slot {n % jobs} (GPU {gpu}, 4 CPU threads): "
            f"dvc repro --single-item {item}"
        )
        lines.append(f"{at(3 + n)} | INFO    | Task run '{item}' - Finished in state Completed()")
    if twice:
        lines.append(f"{at(30)} | INFO    | Task run '{ITEMS[0]}' - Finished in state Completed()")
    lines.append(f"{at(60 * minutes)} | INFO    | Flow run 'quick-fox' - Finished in state Completed()")
    return "\n".join(lines) + "\n"


def _gpu_csv(busy: dict[str, int], minutes: int) -> str:
    """nvidia-smi every minute from a minute before the flow (23:50 on 2026-12-04) to a minute after its end,
    each GPU at its utilization inside the flow and 100% outside it (not the flow's: left out)."""
    from datetime import datetime, timedelta

    t0 = datetime(2026, 12, 4, 23, 49)
    lines = []
    for m in range(minutes + 3):
        t = t0 + timedelta(minutes=m)
        inside = 1 <= m <= minutes + 1
        lines += [f"{t:%Y/%m/%d %H:%M:%S}.000, {g}, {u if inside else 100} %, 100 MiB\n" for g, u in busy.items()]
    return "".join(lines)


def _folder(tmp_path, name, log, gpu_csv=None):
    d = tmp_path / name
    d.mkdir()
    (d / "run.log").write_text(log)
    if gpu_csv is not None:
        (d / "gpu.csv").write_text(gpu_csv)
    return d


@pytest.fixture(scope="module")
def scaling_cli():
    return load_script("benchmarks/scaling.py")


def test_the_table_gives_wall_speed_up_busy_per_gpu_and_each_item_once_with_its_gpu(tmp_path, scaling_cli, capsys):
    one = _folder(tmp_path, "jobs1", _log(40, 1, ["0"]), _gpu_csv({"0": 90, "1": 0}, 40))
    four = _folder(tmp_path, "jobs4", _log(16, 4, ["0", "1"]), _gpu_csv({"0": 80, "1": 60}, 16))
    out = tmp_path / "table.md"
    assert scaling_cli.main([str(one), str(four), "--out", str(out)]) == 0
    table = out.read_text()
    assert table == capsys.readouterr().out
    # 40 min past midnight / 16 min = 2.5x; busy over the flow's own minutes only, GPU 1 idle in the first
    assert "| jobs1 | 1 | 1 | 40.0 min | 1.00× | 0: 90%, 1: 0% | 4 of 4 (yes) | 0: 4 |" in table
    assert "| jobs4 | 2 | 4 | 16.0 min | 2.50× | 0: 80%, 1: 60% | 4 of 4 (yes) | 0: 2, 1: 2 |" in table
    rows = json.loads(out.with_suffix(".json").read_text())
    assert rows[1]["per_gpu"] == {"0": 2, "1": 2} and rows[1]["speedup"] == pytest.approx(2.5)


def test_runs_of_different_items_or_an_item_run_twice_are_not_a_speed_up(tmp_path, scaling_cli, capsys):
    from selfcal.errors import DataError
    from selfcal.report.scaling import read_flow_log, scaling_rows

    twice = read_flow_log(_folder(tmp_path, "twice", _log(10, 2, ["0"], twice=True)) / "run.log")
    assert twice.twice() == [ITEMS[0]]
    assert scaling_rows([("twice", twice, {})])[0].once is False
    short = _log(10, 2, ["0"]).replace("Task run 'evaluate_dense' - Finished in state Completed()", "x")
    a = _folder(tmp_path, "a", _log(20, 1, ["0"]))
    b = _folder(tmp_path, "b", short)
    with pytest.raises(DataError, match="runs a and b finished different items \\(1: evaluate_dense"):
        scaling_rows([(d.name, read_flow_log(d / "run.log"), {}) for d in (a, b)])
    cut = _folder(tmp_path, "cut", _log(10, 1, ["0"]).rsplit("\n", 2)[0] + "\n")  # no "Flow run ... Finished"
    assert scaling_cli.main([str(cut)]) == 2
    assert "no flow run that began and finished" in capsys.readouterr().err
    assert scaling_cli.main([str(tmp_path / "nowhere")]) == 2
    assert "no run.log in" in capsys.readouterr().err


def test_a_committed_h200_run_reads_as_it_ran():
    """Lease 10's Ji run: 4 items at once on the one GPU, its 23 items each once, Completed after 19.8 min."""
    from selfcal.report.gpu_usage import busy_per_gpu, gpu_samples
    from selfcal.report.scaling import read_flow_log

    folder = REPO / "reports" / "SmolLM2-135M" / "runs" / "2026-12-04-h200-k"
    run = read_flow_log(folder / "run.log")
    assert (run.jobs, run.gpus, run.state) == (4, ["0"], "Completed")
    assert run.wall_seconds == pytest.approx(19 * 60 + 48.2, abs=0.5)  # 14:39:25.694 -> 14:59:13.875
    assert run.planned == 23 and len(run.completed) == 23 and not run.twice()
    assert set(run.gpu_of().values()) == {"0"}
    busy = busy_per_gpu(gpu_samples(folder / "gpu.csv"))
    assert list(busy) == ["0"] and 0.8 < busy["0"] < 1.0  # the report's 91%


def test_the_log_is_read_as_the_flow_wrote_it_retries_helpers_failures_and_restarts(tmp_path, scaling_cli, capsys):
    """A retry onto another GPU counts where it last ran; the remote's pull/push tasks and a failed attempt are
    no finished items; a log appended across starts is read for its last finished run; lines a few ms out of
    order are not the next day; a run that did not complete is no row; A+B adds two halves' walls."""
    from selfcal.errors import DataError
    from selfcal.report.scaling import read_flow_log, scaling_rows

    head = "10:00:00.000 | INFO    | Flow run 'a' - Beginning flow run 'a' for flow 'selfcal-pipeline'\n"
    cut = head + "10:00:01.000 | INFO    | Task run 'x' - attempt 1 on slot 0 (GPU 0, 4 CPU threads): dvc\n"
    log = cut + (
        "10:00:02.000 | INFO    | Flow run 'b' - Beginning flow run 'b' for flow 'selfcal-pipeline'\n"
        "10:00:02.500 | INFO    | Flow run 'b' - 2 stage items (--only y)\n"
        "10:00:03.000 | INFO    | Flow run 'b' - 2 item(s) at once: slot 0 (GPU 0, 4 CPU threads); "
        "slot 1 (GPU 1, 4 CPU threads)\n"
        "10:00:04.000 | INFO    | Task run 'dvc-pull' - Finished in state Completed()\n"
        "10:00:05.000 | INFO    | Task run 'y' - attempt 1 on slot 0 (GPU 0, 4 CPU threads): dvc repro y\n"
        "10:00:06.005 | INFO    | Task run 'z' - attempt 1 on slot 1 (GPU 1, 4 CPU threads): dvc repro z\n"
        "10:00:06.000 | INFO    | Task run 'y' - Finished in state Failed('out of memory')\n"
        "10:00:07.000 | INFO    | Task run 'y' - attempt 2 on slot 1 (GPU 1, 4 CPU threads): dvc repro y\n"
        "10:00:08.000 | INFO    | Task run 'y' - Finished in state Completed()\n"
        "10:00:09.000 | INFO    | Task run 'z' - Finished in state Completed()\n"
        "10:00:09.500 | INFO    | Task run 'dvc-push' - Finished in state Completed()\n"
        "10:01:02.000 | INFO    | Flow run 'b' - Finished in state Completed()\n"
    )
    (tmp_path / "run.log").write_text(log)
    run = read_flow_log(tmp_path / "run.log")
    assert (run.wall_seconds, run.jobs, run.gpus, run.planned) == (60.0, 2, ["0", "1"], 2)
    assert sorted(run.completed) == ["y", "z"] and run.gpu_of() == {"y": "1", "z": "1"}
    failed = tmp_path / "failed"
    failed.mkdir()
    (failed / "run.log").write_text(
        log.replace("Flow run 'b' - Finished in state Completed()", "Flow run 'b' - Finished in state Failed('x')")
    )
    with pytest.raises(DataError, match="did not complete have no wall time to compare: failed \\(Failed\\)"):
        scaling_rows([("failed", read_flow_log(failed / "run.log"), {})])
    # two halves of disjoint items, one after the other, against the whole at --jobs 2
    half1 = _folder(tmp_path, "h1", _log(30, 1, ["0"]).replace("evaluate_dense", "evaluate@c4-0-gptq"))
    half2 = _folder(tmp_path, "h2", _log(30, 1, ["0"]).replace("evaluate_dense", "evaluate@c4-1-gptq"))
    for n, item in enumerate(ITEMS[:3]):
        (half2 / "run.log").write_text((half2 / "run.log").read_text().replace(item, f"{item}-c4-{n}"))
    whole = (half1 / "run.log").read_text()
    extra = (half2 / "run.log").read_text().splitlines()[3:-1]  # its items, inside half 1's flow
    both = _folder(tmp_path, "both", "\n".join(whole.splitlines()[:-1] + extra + whole.splitlines()[-1:]) + "\n")
    (both / "run.log").write_text((both / "run.log").read_text().replace("1 item(s) at once", "2 item(s) at once"))
    assert scaling_cli.main([f"{half1}+{half2}", str(both)]) == 0
    table = capsys.readouterr().out
    assert "| h1+h2 | 1 | 1 | 60.0 min | 1.00× |" in table and "| both | 1 | 2 | 30.0 min | 2.00× |" in table
    assert scaling_cli.main([f"{half1}+{half1}"]) == 2
    assert "runs in sequence share items" in capsys.readouterr().err
