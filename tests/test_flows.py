"""The Prefect flow over DVC, for real: `selfcal run` on a tiny model in Prefect's ephemeral mode.

One workspace ("worker A") runs the whole flow once while a stage item fails on purpose and two
more runs try the same workspace; a second workspace is killed mid-compress and resumed; a third
("worker B") shares A's DVC remote and MLflow store. Everything else here takes seconds.
"""

from __future__ import annotations

import asyncio
import inspect
import json
import os
import re
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest
import yaml

from flows.dvc_items import GUARD_STAGE, stage_items
from selfcal.errors import ConfigError, ModelNotFoundError
from selfcal.profiles import apply_profile
from selfcal.scratch import find_scratch
from selfcal.workspace_lock import WorkspaceBusyError, lock_path, read_holder, workspace_lock
from tests.helpers import REPO, pipeline_workspace, small_params, write_params

# These evaluate models on the ARC-Easy and WikiText-2 files of ../shared/data.
pytestmark = pytest.mark.usefixtures("shared_data")

FLAKY_ITEM = "compress@self-0-wanda"
METHODS = {"compression.methods": ["gptq", "wanda"], "compression.wanda": {"sparsity": 0.5, "mask_structure": "2:4"}}


# --- helpers -------------------------------------------------------------------------------------


def _env(prefect_home: Path, *, path_first: Path | None = None, **extra: str) -> dict[str, str]:
    """What a worker's shell would have: the venv on PATH, its own Prefect home, no leaked test state."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "PREFECT_", "SELFCAL_PARAMS"))}
    path = [str(Path(sys.executable).parent), env["PATH"]]
    if path_first is not None:
        path.insert(0, str(path_first))
    env.update(
        PATH=os.pathsep.join(path), PREFECT_HOME=str(prefect_home), PREFECT_SERVER_ANALYTICS_ENABLED="false", **extra
    )
    return env


def _start(ws: Path, env: dict, *args: str) -> subprocess.Popen:
    """`selfcal run ARGS` in its own process group, so a test can kill all of it like a worker dying."""
    cmd = [sys.executable, "-m", "selfcal.cli", "run", "--retry-delay", "1", *args]
    return subprocess.Popen(
        cmd, cwd=ws, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True
    )


def _finish(proc: subprocess.Popen, timeout: float = 600) -> tuple[int, str]:
    out, _ = proc.communicate(timeout=timeout)
    return proc.returncode, out


def _ran(output: str) -> Counter:
    """How often DVC started each stage item's command."""
    return Counter(re.findall(r"Running stage '([^']+)'", output))


def _dvc(ws: Path, env: dict, *args: str) -> str:
    proc = subprocess.run([sys.executable, "-m", "dvc", *args], cwd=ws, env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout + proc.stderr


def _digests(ws: Path) -> dict[str, object]:
    """What must not depend on how a run went: set contents, checkpoint files, scores.

    Left out on purpose: timings, and the files that record them (a checkpoint's run.json and
    manifest, hence its tree digest); the checkpoint's content digest leaves them out itself.
    """
    art = ws / "artifacts"
    out: dict[str, object] = {}
    for d in sorted((art / "calibration").iterdir()):
        out[f"calibration/{d.name}"] = json.loads((d / "manifest.json").read_text())["content_digest"]
    for d in sorted((art / "checkpoints").iterdir()):
        m = json.loads((d / "manifest.json").read_text())
        out[f"checkpoints/{d.name}"] = m["content_digest"]
    for f in sorted((art / "evaluations").glob("*.json")):
        m = json.loads(f.read_text())
        scores = {t: r["acc"] for t, r in m["zero_shot"]["tasks"].items()}
        out[f"metrics/{f.stem}"] = (
            m.get("calibration_digest"),
            scores,
            {k: v["nll"] for k, v in m["perplexity"].items()},
        )
    return out


def _mlflow_stages(uri: str) -> dict[str, list[str]]:
    """Execution id -> sorted stage tags of its runs, in one tracking store."""
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=uri)
    runs = client.search_runs([client.get_experiment_by_name("selfcal").experiment_id])
    by_exec: dict[str, list[str]] = {}
    for r in runs:
        by_exec.setdefault(r.data.tags["selfcal.execution_id"], []).append(r.data.tags["selfcal.stage"])
    return {k: sorted(v) for k, v in by_exec.items()}


def _python_shim(directory: Path, match: str, then: str) -> Path:
    """A `python` first on PATH that runs shell ``then`` when its arguments contain ``match``.

    DVC starts stage commands (`python -m stages.compress ...`) through PATH, so this acts on one
    stage item exactly as DVC runs it, and nothing test-only lives in the package.
    """
    directory.mkdir(parents=True, exist_ok=True)
    shim = directory / "python"
    shim.write_text(f'#!/bin/sh\ncase "$*" in *"{match}"*) {then} ;; esac\nexec "{sys.executable}" "$@"\n')
    shim.chmod(0o755)
    return directory


# Run a stage, but stop it dead just before it renames its finished checkpoint into place.
HANG_BEFORE_PUBLISH = """
import os, runpy, sys, time

real_replace = os.replace
def replace(src, dst, *args, **kwargs):
    if os.path.basename(os.path.dirname(str(dst))) == "checkpoints":
        open(os.environ["AT_PUBLISH"], "w").write(str(src))
        time.sleep(3600)
    return real_replace(src, dst, *args, **kwargs)
os.replace = replace
sys.path.insert(0, os.getcwd())
sys.argv = sys.argv[2:]  # [this file, "-m", MODULE, ARGS...] -> [MODULE, ARGS...]
runpy.run_module(sys.argv[0], run_name="__main__", alter_sys=True)
"""


def _spans(output: str) -> dict[str, tuple[float, float]]:
    """Each task run's (first log line, last log line) in seconds of the day, from Prefect's console log."""
    spans: dict[str, list[float]] = {}
    for h, m, sec, item in re.findall(r"^(\d\d):(\d\d):(\d\d\.\d+) \| \w+ +\| Task run '([^']+)'", output, re.M):
        t = int(h) * 3600 + int(m) * 60 + float(sec)
        span = spans.setdefault(item, [t, t])
        span[0], span[1] = min(span[0], t), max(span[1], t)
    return {k: (a, b) for k, (a, b) in spans.items()}


def _overlap(a: tuple[float, float], b: tuple[float, float]) -> bool:
    return a[0] < b[1] and b[0] < a[1]


def _wait_for(predicate, timeout: float, what: str, poll: float = 0.05):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(poll)
    raise AssertionError(f"timed out waiting for {what}")


# --- worker A: one full run, a failing item, two more runs against the same workspace -------------


@pytest.fixture(scope="module")
def shared(tmp_path_factory):
    """What several workers share: a DVC remote, an MLflow store with one artifact root, Prefect's home."""
    import mlflow

    root = tmp_path_factory.mktemp("shared")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    # The one config step a shared store needs: create the experiment with an artifact root every worker reaches.
    mlflow.MlflowClient(tracking_uri=uri).create_experiment(
        "selfcal", artifact_location=(root / "mlartifacts").as_uri()
    )
    return {"remote": root / "dvc-remote", "mlflow_uri": uri, "prefect_home": root / "prefect"}


@pytest.fixture(scope="module")
def worker_a(tiny_model, tmp_path_factory, shared):
    ws, data = pipeline_workspace(tmp_path_factory.mktemp("worker-a") / "ws", tiny_model, **METHODS)
    # The profile is the run's params: params.yaml itself starts out as something else entirely.
    (ws / "profiles" / "tiny.yaml").write_text(yaml.safe_dump(data, sort_keys=False))
    write_params(ws / "params.yaml", {**data, "calibration": {**data["calibration"], "seeds": [7]}})
    env_plain = _env(shared["prefect_home"], MLFLOW_TRACKING_URI=shared["mlflow_uri"])
    _dvc(ws, env_plain, "remote", "add", "--local", "-d", "shared", str(shared["remote"]))
    marker = ws.parent / "injected"
    fail_once = f'if mkdir "{marker}" 2>/dev/null; then echo "injected failure" >&2; exit 3; fi'
    shim = _python_shim(ws.parent / "shim", "stages.compress --source self --seed 0 --method wanda", fail_once)
    env = _env(shared["prefect_home"], path_first=shim, MLFLOW_TRACKING_URI=shared["mlflow_uri"])

    first = _start(ws, env, "--profile", "tiny", "--sync-remote", "--jobs", "4")
    holder = _wait_for(
        lambda: (h := read_holder(ws)) and h.label.startswith("selfcal-pipeline") and h,
        120,
        "run 1 to hold the workspace",
    )
    refused = subprocess.run(
        [sys.executable, "-m", "selfcal.cli", "run"], cwd=ws, env=env, capture_output=True, text=True, timeout=120
    )
    waiting = _start(ws, env, "--lock-timeout", "600")
    rc1, out1 = _finish(first)
    rc3, out3 = _finish(waiting)
    return {
        "ws": ws,
        "env": env,
        "holder": holder,
        "marker": marker,
        "first": (rc1, out1),
        "refused": refused,
        "waiting": (rc3, out3),
        "pid": first.pid,
    }


def test_flow_runs_every_stage_item_in_ephemeral_mode(worker_a, shared):
    ws, (rc, out) = worker_a["ws"], worker_a["first"]
    assert rc == 0, out[-4000:]
    assert "Starting temporary server" in out and "Flow run" in out and "Finished in state Completed()" in out
    items = [i for i in stage_items(ws) if i != GUARD_STAGE]  # the flow does the guard's work itself
    assert len(items) == 8 and items[-1] == "aggregate"
    assert "Task run 'guard'" not in out and "guard: ok: params valid" in out
    for item in items:
        assert re.search(
            rf"Task run '{item}' - attempt 1 on slot \d \(CPU, 1 CPU thread\): dvc repro --single-item {item} --pull",
            out,
        )
    # --jobs 4 on a CPU: four slots of one thread each (2 cores), and items that read nothing of each other ran
    # at the same time (the two compress items and inspect, once generate was done)
    assert "4 item(s) at once: slot 0 (CPU, 1 CPU thread); slot 1" in out
    spans = _spans(out)
    assert _overlap(spans["compress@self-0-gptq"], spans["compress@self-0-wanda"]), spans
    # ... and never before what they read: generate ended before any compress began
    assert spans["generate@self-0"][1] <= min(spans["compress@self-0-gptq"][0], spans["compress@self-0-wanda"][0])
    # the profile was installed before anything ran, and the stages used it (seed 0, not 7)
    assert (ws / "params.yaml").read_text() == (ws / "profiles" / "tiny.yaml").read_text()
    assert "| gptq | self | 1 |" in (ws / "artifacts" / "report" / "results.md").read_text()
    # the summary artifact, as the Prefect API stores it
    proc = subprocess.run(
        [sys.executable, "-m", "prefect", "artifact", "inspect", "selfcal-results", "-o", "json"],
        env=worker_a["env"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    markdowns = [a["data"] for a in json.loads(proc.stdout)]  # one per run in this Prefect home
    assert any("| wanda | self | 1 |" in md and f"| {FLAKY_ITEM} | ran | 2 |" in md for md in markdowns)
    # one MLflow parent for the whole flow run, one child per stage item it ran
    (stages,) = [
        v for k, v in _mlflow_stages(shared["mlflow_uri"]).items() if k.startswith("prefect-") and "generate" in v
    ]
    assert stages == sorted(
        ["pipeline", "generate", "inspect", "compress", "compress", "evaluate", "evaluate", "evaluate", "aggregate"]
    )
    # Every real stage is up to date; only the guard (always changed, its work done by the flow) is listed.
    listed = [line for line in _dvc(ws, worker_a["env"], "status").splitlines() if line and not line[0].isspace()]
    assert listed == ["guard:"], listed


def test_a_failed_compress_item_is_retried_and_only_it_runs_again(worker_a):
    rc, out = worker_a["first"]
    assert rc == 0 and worker_a["marker"].is_dir()  # the failure was injected, and the run still completed
    assert "injected failure" in out
    ran = _ran(out)
    assert ran.pop(FLAKY_ITEM) == 2
    assert set(ran.values()) == {1} and len(ran) == 7  # every other item ran exactly once
    assert re.findall(r"attempt 2 on slot \d \([^)]*\): dvc repro --single-item (\S+)", out) == [FLAKY_ITEM]


def test_a_second_run_fails_at_once_naming_the_first(worker_a):
    refused = worker_a["refused"]
    assert refused.returncode == 2
    (line,) = refused.stderr.strip().splitlines()  # one line, no Prefect server started, no traceback
    assert line.startswith(f"selfcal: error: workspace {worker_a['ws']} is in use by selfcal-pipeline flow run")
    assert f"pid {worker_a['pid']} " in line and worker_a["holder"].started_utc in line


def test_a_run_that_waits_for_the_workspace_then_finds_nothing_to_do(worker_a):
    rc, out = worker_a["waiting"]
    assert rc == 0, out[-4000:]
    assert "workspace busy (selfcal-pipeline flow run" in out and "waiting up to 600 s" in out
    assert not _ran(out)  # it started after run 1 finished: DVC found every item done
    assert out.count("didn't change, skipping") == 8
    lock = yaml.safe_load((worker_a["ws"] / "dvc.lock").read_text())
    assert len(lock["stages"]) == 8
    assert not find_scratch(worker_a["ws"] / "artifacts")


# --- a run killed mid-compress, then resumed ------------------------------------------------------


def test_killed_run_leaves_no_half_output_and_resumes_to_the_same_hashes(worker_a, tiny_model, tmp_path, shared):
    ws, _ = pipeline_workspace(tmp_path / "ws", tiny_model, **{"tracking.enabled": False})  # GPTQ only
    (tmp_path / "hang.py").write_text(HANG_BEFORE_PUBLISH)
    at_publish = tmp_path / "at-publish"
    shim = _python_shim(
        tmp_path / "shim", "-m stages.compress", f'exec "{sys.executable}" "{tmp_path / "hang.py"}" "$@"'
    )
    env = _env(tmp_path / "prefect")
    run = _start(ws, {**env, "PATH": f"{shim}{os.pathsep}{env['PATH']}", "AT_PUBLISH": str(at_publish)})
    _wait_for(at_publish.is_file, 300, "the compress stage to reach its final rename")
    os.killpg(run.pid, signal.SIGKILL)  # the worker dies: flow, Prefect server, dvc and the stage, at once
    run.communicate()

    checkpoints = ws / "artifacts" / "checkpoints"
    scratch = find_scratch(checkpoints)
    assert [str(p) for p in scratch] == [at_publish.read_text()]  # the whole checkpoint, written but never published
    assert (scratch[0] / "manifest.json").is_file() and not (checkpoints / "self-s0-gptq").exists()
    lock = yaml.safe_load((ws / "dvc.lock").read_text())
    assert "compress@self-0-gptq" not in lock["stages"] and "generate@self-0" in lock["stages"]

    rc, out = _finish(_start(ws, env))
    assert rc == 0, out[-4000:]
    assert "removed scratch left by an interrupted stage" in out and not find_scratch(ws / "artifacts")
    ran = _ran(out)
    assert "generate@self-0" not in ran and "inspect@self-0" not in ran  # finished before the kill: kept
    assert ran["compress@self-0-gptq"] == 1
    resumed, uninterrupted = _digests(ws), _digests(worker_a["ws"])
    assert set(resumed) == {"calibration/self-s0", "checkpoints/self-s0-gptq", "metrics/self-s0-gptq", "metrics/dense"}
    assert resumed == {k: uninterrupted[k] for k in resumed}  # the same as worker A's, which nobody killed


# --- worker B: shares A's DVC remote and MLflow store --------------------------------------------


def test_a_second_worker_reuses_the_first_ones_results_through_the_shared_remote(
    worker_a, tiny_model, tmp_path, shared
):
    assert worker_a["first"][0] == 0
    # A's params for GPTQ, another evaluation slice: B evaluates again and computes nothing else.
    ws, _ = pipeline_workspace(tmp_path / "ws", tiny_model, **{"evaluation.limit": 10})
    env = _env(shared["prefect_home"], MLFLOW_TRACKING_URI=shared["mlflow_uri"])
    _dvc(ws, env, "remote", "add", "--local", "-d", "shared", str(shared["remote"]))
    rc, out = _finish(_start(ws, env, "--sync-remote"))
    assert rc == 0, out[-4000:]
    assert set(_ran(out)) == {"evaluate@self-0-gptq", "evaluate_dense", "aggregate"}
    for item in ("generate@self-0", "inspect@self-0", "compress@self-0-gptq"):
        assert f"Stage '{item}' is cached - skipping run" in out
    a, b = _digests(worker_a["ws"]), _digests(ws)
    for key in ("calibration/self-s0", "checkpoints/self-s0-gptq"):
        assert b[key] == a[key]  # A's files, fetched, not recomputed
    # both workers' executions are in the one store
    flows = sorted(v for k, v in _mlflow_stages(shared["mlflow_uri"]).items() if k.startswith("prefect-"))
    assert sorted(["pipeline", "evaluate", "evaluate", "aggregate"]) in flows and len(flows) == 2


# --- the pieces, in seconds ---------------------------------------------------------------------


def test_workspace_lock_names_its_holder_waits_and_survives_a_killed_holder(tmp_path):
    code = (
        "import sys, time; from pathlib import Path; from selfcal.workspace_lock import workspace_lock\n"
        "with workspace_lock(Path(sys.argv[1]), label='holder'):\n"
        "    print('held', flush=True); time.sleep(float(sys.argv[2]))\n"
        "    with open(Path(sys.argv[1]) / 'order', 'a') as f: f.write('holder leaves\\n')\n"
    )

    def hold(seconds: float) -> subprocess.Popen:
        proc = subprocess.Popen(
            [sys.executable, "-c", code, str(tmp_path), str(seconds)], stdout=subprocess.PIPE, text=True, cwd=REPO
        )
        assert proc.stdout.readline().strip() == "held"
        return proc

    holder = hold(60)
    with pytest.raises(WorkspaceBusyError, match=rf"in use by holder \(pid {holder.pid} on .*; gave up after 0 s"):
        with workspace_lock(tmp_path, label="second"):
            pass
    holder.kill()  # kill -9: the kernel drops the lock, nobody cleans up
    holder.wait()
    with workspace_lock(tmp_path, label="after the kill") as me:
        assert read_holder(tmp_path) == me
    assert read_holder(tmp_path) is None and lock_path(tmp_path).exists()

    waited: list = []
    holder = hold(1.0)
    with workspace_lock(tmp_path, label="patient", timeout=60, poll_seconds=0.05, on_wait=waited.append):
        with open(tmp_path / "order", "a") as f:
            f.write("patient enters\n")
    assert (tmp_path / "order").read_text() == "holder leaves\npatient enters\n"
    assert [h.label for h in waited] == ["holder"] and holder.wait(timeout=30) == 0


def test_profile_is_validated_before_it_replaces_params(tiny_model, tmp_path):
    good = small_params(tiny_model, tmp_path)
    write_params(tmp_path / "params.yaml", good)
    before = (tmp_path / "params.yaml").read_text()
    (tmp_path / "profiles").mkdir()
    (tmp_path / "profiles" / "broken.yaml").write_text(
        yaml.safe_dump({**good, "calibration": {**good["calibration"], "n_sample": 3}})
    )
    with pytest.raises(ConfigError, match=r"broken.yaml: calibration.n_sample: unknown key"):
        apply_profile(tmp_path, "broken")
    with pytest.raises(ConfigError, match=r"profile 'nope': .* not found; known profiles: \['broken'\]"):
        apply_profile(tmp_path, "nope")
    # what only `selfcal check` sees (a model folder that is not there) is refused before the install too: a
    # profile that passed the schema used to become params.yaml, then fail at the guard (an audit found it)
    (tmp_path / "profiles" / "nomodel.yaml").write_text(
        yaml.safe_dump({**good, "model": {**good["model"], "path": str(tmp_path / "gone")}})
    )
    with pytest.raises(ModelNotFoundError, match=r"model.path: local model directory .*gone' does not exist"):
        apply_profile(tmp_path, "nomodel")
    assert (tmp_path / "params.yaml").read_text() == before
    text = "# a comment survives\n" + yaml.safe_dump({**good, "calibration": {**good["calibration"], "seeds": [3]}})
    (tmp_path / "profiles" / "other.yaml").write_text(text)
    changed, summary = apply_profile(tmp_path, "other")
    assert changed is True and summary.startswith("ok: params valid")
    assert (tmp_path / "params.yaml").read_text() == text  # the file itself, as `cp` would
    assert apply_profile(tmp_path, "profiles/other.yaml")[0] is False


def test_scratch_of_a_killed_writer_is_found_and_ignored_by_dvc(tmp_path):
    """What selfcal.artifacts leaves when killed mid-write is what selfcal.scratch sweeps and DVC ignores."""
    code = (
        "import os, sys; from pathlib import Path; from selfcal.artifacts import atomic_dir, atomic_write_text\n"
        "root = Path(sys.argv[1])\n"
        "with atomic_dir(root / 'checkpoints' / 'a') as tmp:\n"
        "    (tmp / 'model.safetensors').write_bytes(b'half')\n"
        "    atomic_write_text(root / 'metrics' / 'b.json', '{}')\n"
        "    os._exit(9)\n"
    )
    art = tmp_path / "artifacts"
    subprocess.run([sys.executable, "-c", code, str(art)], cwd=REPO, check=False)
    found = find_scratch(art)
    assert [p.parent.name for p in found] == ["checkpoints"] and found[0].name.startswith(".a.tmp-")
    assert not (art / "checkpoints" / "a").exists()
    (art / "metrics" / ".b.json.tmp-0123abcd").write_text("{")  # a killed atomic_write_text
    assert len(find_scratch(art)) == 2
    (tmp_path / ".dvcignore").write_text((REPO / ".dvcignore").read_text())
    subprocess.run(["git", "init", "-q"], cwd=tmp_path, check=True)
    subprocess.run([sys.executable, "-m", "dvc", "init", "-q"], cwd=tmp_path, check=True)
    rel = [str(p.relative_to(tmp_path)) for p in find_scratch(art)]
    ignored = subprocess.run(
        [sys.executable, "-m", "dvc", "check-ignore", *rel], cwd=tmp_path, capture_output=True, text=True
    )
    assert ignored.stdout.split() == rel


def test_deployment_file_matches_the_flow():
    from prefect.cli.deploy._models import PrefectYamlModel
    from prefect.client.schemas.schedules import CronSchedule
    from prefect.flows import load_flow_from_entrypoint

    spec = yaml.safe_load((REPO / "prefect.yaml").read_text())
    model = PrefectYamlModel.model_validate(spec)  # the schema `prefect deploy` reads it with
    assert model.deployments
    (items,) = [d for d in model.deployments if d.entrypoint.startswith("flows/item.py")]
    flow = load_flow_from_entrypoint(str(REPO / items.entrypoint))
    assert flow.name == "selfcal-item" and items.name == "items"
    # each worker's own workspace, resolved when the worker runs the step (not when `prefect deploy` reads it)
    assert items.pull[-1]["prefect.deployments.steps.set_working_directory"]["directory"] == "{{ $SELFCAL_WORKSPACE }}"
    for dep in model.deployments:
        if dep is items:
            continue
        flow = load_flow_from_entrypoint(str(REPO / dep.entrypoint))
        assert flow.name == "selfcal-pipeline"
        signature = inspect.signature(flow.fn).parameters
        assert set(dep.parameters) <= set(signature) - {"workdir"}
        assert dep.parameters["sync_remote"] is True
        (schedule,) = dep.schedules
        CronSchedule(cron=schedule.cron, timezone=schedule.timezone)  # raises on a bad expression
        assert dep.work_pool.name == "gpu-pool" and dep.work_pool.job_variables["working_dir"]
        assert dep.concurrency_limit.limit == 1
    profiles = [d.parameters["profile"] for d in model.deployments if d is not items]
    assert None in profiles and all(p is None or (REPO / "profiles" / f"{p}.yaml").is_file() for p in profiles)


def test_deployment_pull_steps_sync_code_only_while_no_run_holds_the_workspace(tmp_path, monkeypatch):
    """Run prefect.yaml's own pull steps, as a worker would, against a local git repository.

    Each step's function is called with its inputs as written (they use no templates); Prefect's
    own step runner would also resolve templates through its API, i.e. start a server in pytest.
    """
    from prefect.utilities.importtools import import_object

    origin = tmp_path / "origin"
    (origin / "flows").mkdir(parents=True)
    (origin / "flows" / "sync_workspace.sh").write_text((REPO / "flows" / "sync_workspace.sh").read_text())
    (origin / "dvc.lock").write_text("v1\n")

    def git(*args: str, cwd: Path = origin) -> str:
        return subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True, check=True).stdout

    git("init", "-q", "-b", "main")
    git("add", ".")
    git("-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "v1")
    steps = yaml.safe_load((REPO / "prefect.yaml").read_text())["pull"]
    worker = tmp_path / "worker"
    worker.mkdir()
    monkeypatch.setenv("SELFCAL_GIT_URL", str(origin))
    monkeypatch.setenv("SELFCAL_GIT_REF", "main")
    monkeypatch.chdir(worker)

    def pull() -> None:
        for step in steps:
            ((fqn, inputs),) = step.items()
            result = import_object(fqn)(**{k: v for k, v in inputs.items() if k != "id"})
            if inspect.iscoroutine(result):
                asyncio.run(result)

    pull()
    ws = worker / "workspace"
    assert Path.cwd() == ws and (ws / "dvc.lock").read_text() == "v1\n"
    (ws / "dvc.lock").write_text("last night's run\n")  # what a run leaves behind
    (ws / "artifacts").mkdir()
    (origin / "dvc.lock").write_text("v2\n")
    (origin / "flows" / "new.py").write_text("v2\n")
    git("add", ".")
    git("-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "v2")

    monkeypatch.chdir(worker)
    with workspace_lock(ws, label="a run still going"):
        with pytest.raises(
            RuntimeError, match=r'is in use by \{"pid": \d+, .*"label": "a run still going".*\}; code not synced'
        ):
            pull()
    assert (ws / "dvc.lock").read_text() == "last night's run\n"  # untouched while the run held it

    monkeypatch.chdir(worker)
    pull()
    # the code moved; the workspace's own dvc.lock stayed: it records the outputs this box holds (the committed
    # one's, another machine's, made DVC rerun every stage whose deps matched it: the dense evaluation nightly)
    assert (ws / "flows" / "new.py").read_text() == "v2\n" and (ws / "artifacts").is_dir()
    assert (ws / "dvc.lock").read_text() == "last night's run\n" and not (ws / ".selfcal" / "dvc.lock.kept").exists()


def test_a_fanned_out_item_moves_the_workers_code_to_the_coordinators_commit_and_keeps_its_own_dvc_lock(tmp_path):
    """The item flow's `git reset --hard` to the coordinator's commit dropped the worker's dvc.lock, as the pull
    step did (flows/sync_workspace.sh says what that cost)."""
    import logging

    from flows.item import sync_workspace

    origin, ws = tmp_path / "origin", tmp_path / "ws"
    origin.mkdir()

    def git(*args: str, cwd: Path = origin) -> str:
        return subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True, check=True).stdout.strip()

    (origin / "dvc.lock").write_text("v1\n")
    (origin / "code.py").write_text("v1\n")
    git("init", "-q", "-b", "main")
    git("add", ".")
    git("-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "v1")
    git("clone", "-q", str(origin), str(ws), cwd=tmp_path)
    (ws / "dvc.lock").write_text("this worker's outputs\n")
    (origin / "code.py").write_text("v2\n")
    (origin / "dvc.lock").write_text("v2\n")
    git("-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qam", "v2")
    params = (REPO / "params.yaml").read_text()
    sync_workspace(ws, git("rev-parse", "HEAD"), params, logging.getLogger("test"))
    assert (ws / "code.py").read_text() == "v2\n" and (ws / "params.yaml").read_text() == params
    assert (ws / "dvc.lock").read_text() == "this worker's outputs\n"


def test_an_attempt_past_its_timeout_is_killed_with_its_stage(tmp_path):
    """Killing dvc alone would orphan the stage: it would hold the GPU and race the retry."""
    import psutil

    from flows.dvc_process import DvcTimeoutError, run_dvc

    subprocess.run(["git", "init", "-q"], cwd=tmp_path, check=True)
    subprocess.run([sys.executable, "-m", "dvc", "init", "-q"], cwd=tmp_path, check=True)
    (tmp_path / "dvc.yaml").write_text("stages:\n  hang:\n    cmd: sleep 67.25 && touch out\n    outs: [out]\n")
    lines: list[str] = []
    with pytest.raises(DvcTimeoutError, match=r"dvc repro hang: still running after 3 s; killed it and its stage"):
        run_dvc(["repro", "hang"], cwd=tmp_path, env=dict(os.environ), on_line=lines.append, timeout=3)
    assert "Running stage 'hang':" in lines
    assert not [p for p in psutil.process_iter(["cmdline"]) if "67.25" in " ".join(p.info["cmdline"] or [])]
    assert "hang" in _dvc(tmp_path, dict(os.environ), "status")  # DVC's own lock is free again


def test_run_refuses_a_params_file_dvc_would_not_read(capsys):
    from selfcal.cli import main

    assert main(["--params", "other.yaml", "run"]) == 2
    assert capsys.readouterr().err.strip() == (
        "selfcal: error: run: DVC reads ./params.yaml; choose other params with --profile, not --params"
    )


def test_run_refuses_a_profile_that_selfcal_check_refuses_in_one_line_before_prefect_and_the_install(
    tiny_model, tmp_path, monkeypatch, capsys
):
    """`selfcal run --profile` with a model folder that is not there replaced params.yaml, started Prefect's
    server, then failed (an audit's first finding): the CLI now runs all of `selfcal check` on the profile first."""
    import sys

    from selfcal.cli import main

    good = small_params(tiny_model, tmp_path)
    write_params(tmp_path / "params.yaml", good)
    before = (tmp_path / "params.yaml").read_text()
    (tmp_path / "profiles").mkdir()
    (tmp_path / "profiles" / "nomodel.yaml").write_text(
        yaml.safe_dump({**good, "model": {**good["model"], "path": str(tmp_path / "gone")}})
    )
    monkeypatch.chdir(tmp_path)
    sys.modules.pop("flows.pipeline", None)  # importing the flow is the first step of Prefect's start
    assert main(["run", "--profile", "nomodel"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("selfcal: error: model.path: local model directory") and "\n" not in err
    assert (tmp_path / "params.yaml").read_text() == before and "flows.pipeline" not in sys.modules
