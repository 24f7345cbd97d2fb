"""Concurrent stage items (issue 17): device slots, and the dependency-ordered scheduler on Prefect's task
runner. The flow itself with --jobs 4 over real DVC items is in test_flows.py (worker A)."""

from __future__ import annotations

import threading
import time

import pytest

from flows.slots import SlotPool, plan_slots, visible_gpus


# -- device slots ------------------------------------------------------------------------------------------
def test_one_item_per_gpu_and_jobs_capped_by_the_gpus():
    slots = plan_slots(4, ["0", "1"], cpus=16)
    assert [s.gpu for s in slots] == ["0", "1"]  # 4 jobs asked, 2 GPUs: 2 items at once
    assert [s.env()["CUDA_VISIBLE_DEVICES"] for s in slots] == ["0", "1"]
    assert all(s.threads == 8 and s.env()["OMP_NUM_THREADS"] == "8" for s in slots)


def test_a_gpu_slot_numbers_devices_as_nvidia_smi_does_unless_the_box_chose(monkeypatch):
    """CUDA's default order is fastest first, nvidia-smi's (gpu.csv's index) the PCI bus: a slot's "GPU 1" must
    be nvidia-smi's 1, or per-GPU busy time is charged to the wrong items on a mixed box."""
    monkeypatch.delenv("CUDA_DEVICE_ORDER", raising=False)
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    gpu, cpu = plan_slots(1, ["1"], cpus=4)[0], plan_slots(1, [], cpus=4)[0]
    assert gpu.env()["CUDA_DEVICE_ORDER"] == "PCI_BUS_ID" and "CUDA_DEVICE_ORDER" not in cpu.env()
    monkeypatch.setenv("CUDA_DEVICE_ORDER", "FASTEST_FIRST")  # the box's choice is kept
    assert gpu.env()["CUDA_DEVICE_ORDER"] == "FASTEST_FIRST"
    # ids given to the flow under CUDA's default order keep meaning that order: not reinterpreted by bus
    monkeypatch.delenv("CUDA_DEVICE_ORDER")
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "1,3")
    assert "CUDA_DEVICE_ORDER" not in gpu.env()


def test_slots_per_gpu_share_a_gpu_after_every_gpu_has_one():
    slots = plan_slots(4, ["3", "5"], slots_per_gpu=2, cpus=16)
    assert [s.gpu for s in slots] == ["3", "5", "3", "5"]  # a second item per GPU only when all GPUs have one
    assert {s.env()["SELFCAL_GPU_SHARE"] for s in slots} == {"2"}  # auto batch sizes take half the free memory


def test_cpu_slots_divide_the_cores_and_hide_the_gpus():
    slots = plan_slots(2, [], cpus=2)
    assert [s.threads for s in slots] == [1, 1]
    assert all(s.env()["CUDA_VISIBLE_DEVICES"] == "" and s.env()["MKL_NUM_THREADS"] == "1" for s in slots)
    assert plan_slots(3, [], cpus=2)[0].threads == 1  # never zero threads


@pytest.mark.parametrize(
    ("env", "gpus"), [({"CUDA_VISIBLE_DEVICES": "2,3"}, ["2", "3"]), ({"CUDA_VISIBLE_DEVICES": ""}, [])]
)
def test_visible_gpus_follow_cuda_visible_devices(env, gpus):
    assert visible_gpus(env) == gpus


def test_a_gpu_slot_shows_its_item_the_gpu_id_it_was_given_not_the_slots_number():
    """On a box that lends GPUs 3 and 5, slot 0 is GPU 3: its item must see device 3, never device 0 (another
    run's GPU); a shared GPU's second slot names the same device as its first."""
    slots = plan_slots(4, ["3", "5"], slots_per_gpu=2, cpus=16)
    assert [s.env()["CUDA_VISIBLE_DEVICES"] for s in slots] == ["3", "5", "3", "5"]


def test_zero_jobs_or_zero_slots_per_gpu_are_refused_not_planned_as_no_slots():
    for jobs, per_gpu in [(0, 1), (2, 0)]:
        with pytest.raises(ValueError, match="at least 1"):
            plan_slots(jobs, ["0"], slots_per_gpu=per_gpu, cpus=4)


def test_cuda_visible_devices_minus_one_hides_every_gpu():
    assert visible_gpus({"CUDA_VISIBLE_DEVICES": "-1"}) == []
    assert visible_gpus({"CUDA_VISIBLE_DEVICES": " 0, -1 "}) == ["0"]


def test_a_slot_is_never_handed_to_two_items_at_once():
    pool = SlotPool(plan_slots(2, ["0", "1"], cpus=2))
    held, clash = set(), []

    def work():
        for _ in range(20):
            with pool.take() as slot:
                if slot.index in held:
                    clash.append(slot.index)
                held.add(slot.index)
                time.sleep(0.001)
                held.discard(slot.index)

    threads = [threading.Thread(target=work) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not clash


STARTUP = "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS"


# -- the scheduler on Prefect's task runner -------------------------------------------------------------------
@pytest.fixture(scope="module")
def prefect_home(tmp_path_factory):
    import os

    home = tmp_path_factory.mktemp("prefect")
    names = ("PREFECT_HOME", "PREFECT_API_URL", "PREFECT_SERVER_ANALYTICS_ENABLED", STARTUP)
    saved = {k: os.environ.get(k) for k in names}
    # a fresh home on a busy 2-core box can take longer than Prefect's default 20 s (as in `selfcal run`)
    os.environ.update({"PREFECT_HOME": str(home), "PREFECT_SERVER_ANALYTICS_ENABLED": "false", STARTUP: "180"})
    os.environ.pop("PREFECT_API_URL", None)
    yield home
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


def test_a_stopped_schedule_ends_its_running_items_before_it_waits_for_them(prefect_home):
    """SIGTERM to `selfcal run` raised in the flow's thread, and the task runner's exit then waited for the
    running items' dvc trees to finish (minutes, or the deployment's 4-hour limit) before `kill_running`; now
    ``on_abort`` ends them first."""
    from prefect import flow, task

    from flows.schedule import run_in_order

    release = threading.Event()
    started = threading.Event()

    @task
    def item(item: str) -> dict:
        started.set()
        release.wait(60)  # a stage that runs until it is killed
        return {"item": item}

    def parameters_of(name: str) -> dict:
        if name == "b":
            started.wait(30)
            raise KeyboardInterrupt  # the stop arrives while "a" runs
        return {"item": name}

    @flow
    def grid(on_abort):
        return run_in_order({"a": [], "b": []}, item, parameters_of, jobs=2, on_abort=on_abort)

    t0 = time.monotonic()
    with pytest.raises(KeyboardInterrupt):
        grid(release.set)
    assert release.is_set() and time.monotonic() - t0 < 30


def test_items_run_after_what_they_read_at_most_jobs_at_once_and_a_failure_stops_only_its_dependents(prefect_home):
    from prefect import flow, task

    from flows.schedule import run_in_order

    log: list[tuple[str, str, float]] = []
    lock = threading.Lock()
    live = {"now": 0, "peak": 0}

    @task
    def fake(item: str) -> dict:
        with lock:
            live["now"] += 1
            live["peak"] = max(live["peak"], live["now"])
            log.append(("start", item, time.monotonic()))
        time.sleep(0.4)
        with lock:
            live["now"] -= 1
            log.append(("end", item, time.monotonic()))
        if item == "c":
            raise RuntimeError("c: injected failure")
        return {"item": item}

    graph = {"a": [], "b": ["a"], "c": ["a"], "x": [], "d": ["b"], "e": ["c"], "f": ["e", "d"]}

    @flow
    def grid():
        return run_in_order(graph, fake, lambda item: {"item": item}, jobs=2)

    out = grid()
    times = {(kind, item): t for kind, item, t in log}
    assert {r["item"] for r in out.results} == {"a", "b", "x", "d"}
    assert out.failed == {"c": "c: injected failure"}
    assert out.blocked == {"e": "c", "f": "c"}  # f read e, which never ran because of c
    assert ("start", "e") not in times and ("start", "f") not in times
    for item, deps in graph.items():
        for dep in deps:
            if ("start", item) in times:
                assert times[("end", dep)] <= times[("start", item)], f"{item} started before {dep} ended"
    assert live["peak"] == 2  # a and x at once, then b and c: never more than jobs
    assert out.failure_line().startswith("c: injected failure") and "2 item(s) after it not run" in out.failure_line()


def test_the_outcome_names_every_failed_and_every_blocked_item():
    """What the run's summary table and its one error line are made from."""
    from flows.schedule import Outcome

    out = Outcome(failed={"c": "c: boom", "g": "out of memory"}, blocked={"e": "c", "f": "c"})
    assert out.not_run() == {
        "c": "failed: c: boom",
        "g": "failed: out of memory",
        "e": "not run: c failed",
        "f": "not run: c failed",
    }
    assert out.failure_line() == "c: boom (1 more failed); 2 item(s) after it not run"
    assert Outcome(failed={"g": "out of memory"}).failure_line() == "g: out of memory"


def test_what_dvc_did_to_an_item_is_read_from_its_output_and_the_summary_lists_items_not_run(tmp_path):
    from flows.dvc_items import outcome, ran_items
    from flows.item import ItemRunError, parse_item_result
    from flows.summary import run_summary

    item = "compress@self-0-gptq"
    assert outcome(item, [f"Stage '{item}' is cached - skipping run"]) == "restored from run-cache"
    assert outcome(item, [f"Running stage '{item}':", "> python ..."]) == "ran"
    assert outcome(item, ["Stage 'compress@self-0-gptq2' didn't change, skipping"]) == "unknown"
    assert ran_items(["Running stage 'guard':", "Running stage 'generate@self-0':"]) == ["guard", "generate@self-0"]
    assert parse_item_result('{"item": "x", "outcome": "ran"}')["item"] == "x"
    with pytest.raises(ItemRunError, match="unexpected result"):
        parse_item_result('{"outcome": "ran"}')  # a result that names no item is no item's result
    done = [{"item": "a", "outcome": "ran", "attempts": 1, "seconds": 2.0, "where": "slot 0 (CPU, 1 CPU thread)"}]
    md = run_summary(done, tmp_path / "absent.md", None, {"c": "failed: boom", "e": "not run: c failed"})
    assert "# selfcal run: 3 stage items (1 failed, 1 not run, 1 ran)" in md
    assert "| c | failed: boom | | | |" in md and "| e | not run: c failed | | | |" in md


def _started(graph: dict[str, list[str]], jobs: int, seconds=lambda item: 0.05):
    """The order ``run_in_order`` starts a graph's items in, through a Prefect flow of fake items that each take
    ``seconds(item)``; and the run's outcome."""
    from prefect import flow, task

    from flows.schedule import run_in_order

    started: list[str] = []

    @task
    def fake(item: str) -> dict:
        started.append(item)
        time.sleep(seconds(item))
        return {"item": item}

    @flow
    def grid():
        return run_in_order(graph, fake, lambda item: {"item": item}, jobs=jobs)

    return started, grid()


def test_an_item_reading_two_items_waits_for_both(prefect_home):
    """c reads a and b; deepest-first would start it as soon as a finished if only one of its inputs counted."""
    started, out = _started({"a": [], "b": [], "c": ["a", "b"]}, jobs=1)
    assert started == ["a", "b", "c"] and not out.failed and not out.blocked


def test_an_item_that_becomes_ready_later_still_goes_before_waiting_shallower_items(prefect_home):
    """jobs=2: while g1 runs, only one place is free. Were more items than free places handed to the runner,
    g2 would queue there ahead of h0, which became ready (and is deeper) only after e0 finished."""
    graph = {"g0": [], "g1": [], "g2": [], "g3": [], "e0": ["g0"], "h0": ["e0"]}
    # g0 long enough for g1 to have started on a loaded box; g1 long enough for e0 and h0 to run while it does
    started, _ = _started(graph, jobs=2, seconds=lambda item: {"g0": 0.5, "g1": 3.0}.get(item, 0.05))
    assert set(started[:2]) == {"g0", "g1"} and started[2:4] == ["e0", "h0"], started  # g0, g1 start in either order


def test_a_crashed_or_lost_item_run_is_submitted_again_and_a_completed_one_read(prefect_home, monkeypatch):
    import json
    import uuid
    from types import SimpleNamespace

    from prefect import flow
    from prefect.states import Completed, Crashed, Running

    import flows.pipeline as pipeline

    attempts, cancelled = [], []
    states = [
        Crashed(message="Execution was aborted by Python system exit call."),  # its worker died
        Running(),  # a box that vanished: no final state in time
        Completed(
            message=json.dumps({"item": "compress@x", "outcome": "ran", "where": "worker-b", "upstream_ran": []})
        ),
    ]

    def fake_submit(deployment, parameters, timeout):
        attempts.append((deployment, parameters["item"], timeout))
        return SimpleNamespace(id=uuid.uuid4(), name=f"run-{len(attempts)}", state=states[len(attempts) - 1])

    monkeypatch.setattr(pipeline, "submit_item", fake_submit)
    monkeypatch.setattr(pipeline, "cancel_flow_run", cancelled.append)

    @flow
    def one():
        task = pipeline.fan_out_item.with_options(retries=2, retry_delay_seconds=0)
        return task("compress@x", "selfcal-item/items", {"execution_id": "e"}, 60)

    result = one()
    assert [a[1] for a in attempts] == ["compress@x"] * 3 and attempts[0][2] == 60
    assert len(cancelled) == 1  # the run without a final state was cancelled before the retry
    assert result["outcome"] == "ran" and result["where"] == "worker-b" and result["attempts"] == 3


def test_a_stopped_fan_out_cancels_the_flow_runs_it_had_on_the_workers(prefect_home, tmp_path):
    """A stopped `selfcal run --fan-out` submitted nothing more, but the items it had sent ran on to their end on
    the workers, writing and registering after the run that asked for them was gone. Here the deployment has
    no worker, so the two runs wait, Scheduled, until the stop: then both are cancelled and the flow ends."""
    import logging
    import os
    import signal

    from prefect import flow
    from prefect.client.orchestration import get_client

    import flows.pipeline as pipeline

    with get_client(sync_client=True) as client:
        client.create_deployment(flow_id=client.create_flow_from_name("selfcal-item"), name="idle")
    (tmp_path / "params.yaml").write_text("{}\n")

    def stop_when_both_wait() -> None:
        deadline = time.monotonic() + 120
        while len(pipeline.REMOTE_RUNS._runs.get("stop-me", ())) < 2 and time.monotonic() < deadline:
            time.sleep(0.1)
        os.kill(os.getpid(), signal.SIGINT)  # Ctrl-C

    @flow
    def coordinator():
        threading.Thread(target=stop_when_both_wait, daemon=True).start()
        return pipeline._fan_out(
            tmp_path, {"a": [], "b": []}, "selfcal-item/idle", "stop-me", False, 2, None,
            {"retries": 2, "retry_delay_seconds": 0}, logging.getLogger("test"),
        )  # fmt: skip

    t0 = time.monotonic()
    with pytest.raises(KeyboardInterrupt):
        coordinator()
    assert time.monotonic() - t0 < 90
    with get_client(sync_client=True) as client:
        runs = client.read_flow_runs()
    items = {r.parameters.get("item"): r.state for r in runs if r.parameters.get("execution_id") == "stop-me"}
    assert set(items) == {"a", "b"}, items  # each submitted once: a stopped item is not retried
    assert all(state.is_cancelled() for state in items.values()), items


def test_only_selects_the_matching_items_with_everything_they_read_and_refuses_a_pattern_matching_nothing():
    from flows.dvc_items import select_items
    from selfcal.errors import ConfigError

    graph = {
        "generate@self-0": [],
        "generate@c4-0": [],
        "compress@self-0-gptq": ["generate@self-0"],
        "compress@c4-0-gptq": ["generate@c4-0"],
        "evaluate@self-0-gptq": ["compress@self-0-gptq"],
        "evaluate@c4-0-gptq": ["compress@c4-0-gptq"],
        "evaluate_dense": [],
        "aggregate": ["evaluate@self-0-gptq", "evaluate@c4-0-gptq", "evaluate_dense"],
    }
    assert select_items(graph, None) == graph
    chunk = select_items(graph, ["evaluate@self-*", "evaluate_dense"])
    assert list(chunk) == ["generate@self-0", "compress@self-0-gptq", "evaluate@self-0-gptq", "evaluate_dense"]
    assert chunk["compress@self-0-gptq"] == ["generate@self-0"]
    assert list(select_items(graph, ["aggregate"])) == list(graph)  # the whole upstream comes along
    with pytest.raises(ConfigError, match=r"--only 'evaluate@slef-\*' matches no stage item"):
        select_items(graph, ["evaluate@self-*", "evaluate@slef-*"])


def test_only_patterns_order_the_chunk_so_the_first_patterns_long_items_start_first(prefect_home):
    """Lease 5's chunk: with dvc.yaml's order alone, Ji's pools (minutes each) would start after every vocab
    and Cosmopedia model. The patterns' order is the chunk's order; what an item reads keeps coming first,
    a shared item goes with the earliest pattern, and deepest-first still finishes models end to end."""

    from flows.dvc_items import select_items

    graph = {
        "generate@vocab-0": [],
        "generate@ji-0": [],
        "compress@vocab-0-gptq": ["generate@vocab-0"],
        "compress@ji-0-gptq": ["generate@ji-0"],
        "evaluate@vocab-0-gptq": ["compress@vocab-0-gptq"],
        "evaluate@ji-0-gptq": ["compress@ji-0-gptq"],
        "inspect@ji-0": ["generate@ji-0"],
        "aggregate": ["evaluate@vocab-0-gptq", "evaluate@ji-0-gptq"],
    }
    chunk = select_items(graph, ["evaluate@ji-*", "evaluate@vocab-*", "inspect@ji-*"])
    assert list(chunk) == [
        "generate@ji-0",
        "compress@ji-0-gptq",
        "evaluate@ji-0-gptq",
        "generate@vocab-0",
        "compress@vocab-0-gptq",
        "evaluate@vocab-0-gptq",
        "inspect@ji-0",
    ]
    assert all(list(chunk).index(d) < list(chunk).index(i) for i, deps in chunk.items() for d in deps)
    assert list(select_items(graph, ["evaluate@vocab-*", "aggregate"]))[:3] == list(
        select_items(graph, ["evaluate@vocab-*"])
    )

    started, _ = _started(chunk, jobs=1, seconds=lambda item: 0)
    # Ji's pool first; then what became ready deepest first (Ji's model end to end), vocab's set last of the roots.
    assert started[:4] == ["generate@ji-0", "compress@ji-0-gptq", "evaluate@ji-0-gptq", "inspect@ji-0"]
    assert started[4:] == ["generate@vocab-0", "compress@vocab-0-gptq", "evaluate@vocab-0-gptq"]


def test_of_the_ready_items_the_deepest_goes_first_so_models_finish_end_to_end(prefect_home):
    """On the H200 every ready item was queued at once: twenty compress items ahead of any evaluation, so a run
    cut short had checkpoints and no scores. Now an evaluation that becomes ready runs before waiting roots."""

    from flows.schedule import depths

    graph = {
        "gen-0": [],
        "gen-1": [],
        "gen-2": [],
        "comp-0": ["gen-0"],
        "comp-1": ["gen-1"],
        "comp-2": ["gen-2"],
        "eval-0": ["comp-0"],
        "eval-1": ["comp-1"],
        "eval-2": ["comp-2"],
    }
    assert depths(graph)["eval-2"] == 2 and depths(graph)["gen-1"] == 0
    started, _ = _started(graph, jobs=1)
    assert started == ["gen-0", "comp-0", "eval-0", "gen-1", "comp-1", "eval-1", "gen-2", "comp-2", "eval-2"]
