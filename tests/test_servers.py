"""One grid fanned out to two workers, on real servers (issue 17).

A real ``prefect server`` on PostgreSQL, a real ``mlflow server`` whose backend store is PostgreSQL, a
local-directory DVC remote, and two ``prefect worker`` processes, each with its own workspace (a clone
of one repository). A coordinator workspace runs ``selfcal run --fan-out selfcal-item/items --jobs 2``:
every stage item becomes a flow run of the per-item deployment, taken by whichever worker is free.
Checked: every item ran exactly once (nothing recomputed on the other worker), both workers took
items, and every registered model traces (``selfcal lineage``) and verifies (``selfcal verify``) from
either worker's workspace.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.request
import uuid
from pathlib import Path

import pytest

from tests.helpers import REPO, pipeline_workspace

pytestmark = [pytest.mark.usefixtures("shared_data"), pytest.mark.integration]

PG = "postgres@127.0.0.1:5432"
POOL, DEPLOYMENT = "selfcal-pool", "items"
# One method keeps the grid small (6 items) while two items are ready at once from the start (generate and the
# dense evaluation), so both workers get work.
METHODS = {"compression.methods": ["wanda"], "compression.wanda": {"sparsity": 0.5, "mask_structure": "2:4"}}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _psql(sql: str) -> None:
    subprocess.run(["psql", "-h", "127.0.0.1", "-U", "postgres", "-d", "postgres", "-qc", sql], check=True)


def _postgres_or_skip() -> None:
    try:
        _psql("select 1")
    except (OSError, subprocess.CalledProcessError):
        pytest.skip("PostgreSQL is not reachable on 127.0.0.1:5432 (psql -U postgres)")


def _wait_http(url: str, proc: subprocess.Popen, log: Path, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited ({proc.returncode}): {log.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.5)
    raise TimeoutError(f"{url} not healthy after {timeout} s: {log.read_text()[-3000:]}")


def _spawn(cmd: list[str], *, cwd: Path, env: dict, log: Path) -> subprocess.Popen:
    out = open(log, "w")  # noqa: SIM115 - kept open for the process's life
    return subprocess.Popen(cmd, cwd=cwd, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        try:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(timeout=30)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            os.killpg(proc.pid, signal.SIGKILL)


def _base_env(home: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "PREFECT_", "SELFCAL_"))}
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env["PATH"]])
    env.update(PREFECT_HOME=str(home), PREFECT_SERVER_ANALYTICS_ENABLED="false")
    return env


def _git(cwd: Path, *args: str) -> str:
    return subprocess.run(["git", *args], cwd=cwd, check=True, capture_output=True, text=True).stdout.strip()


def _create_deployment(api_url: str, home: Path) -> None:
    """The per-item deployment, as `prefect deploy` makes it from prefect.yaml's `items` entry: its pull step
    moves into each worker's own workspace ($SELFCAL_WORKSPACE, resolved when the worker runs it)."""
    code = f"""
import yaml
from prefect.client.orchestration import get_client
from prefect.client.schemas.actions import WorkPoolCreate
from prefect.utilities.callables import parameter_schema
from prefect.workers.process import ProcessWorker
from flows.item import item
spec = next(d for d in yaml.safe_load(open("prefect.yaml"))["deployments"] if d["name"] == "{DEPLOYMENT}")
with get_client(sync_client=True) as c:
    c.create_work_pool(WorkPoolCreate(name="{POOL}", type="process",
                       base_job_template=ProcessWorker.get_default_base_job_template()))
    flow_id = c.create_flow_from_name(item.name)
    c.create_deployment(flow_id=flow_id, name="{DEPLOYMENT}", work_pool_name="{POOL}",
        entrypoint=spec["entrypoint"], pull_steps=spec["pull"],
        parameter_openapi_schema=parameter_schema(item).model_dump_for_openapi())
"""
    env = {**_base_env(home), "PREFECT_API_URL": api_url, "PYTHONPATH": str(REPO)}
    subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, check=True, timeout=300)


@pytest.fixture(scope="module")
def grid(tiny_model, tmp_path_factory):
    _postgres_or_skip()
    root = tmp_path_factory.mktemp("servers")
    tag = uuid.uuid4().hex[:8]
    dbs = {"prefect": f"selfcal_prefect_{tag}", "mlflow": f"selfcal_mlflow_{tag}"}
    for db in dbs.values():
        _psql(f"CREATE DATABASE {db}")
    procs: list[subprocess.Popen] = []
    try:
        # the servers
        prefect_port, mlflow_port = _free_port(), _free_port()
        home = root / "prefect-server"
        env = {
            **_base_env(home),
            "PREFECT_SERVER_DATABASE_CONNECTION_URL": f"postgresql+asyncpg://{PG}/{dbs['prefect']}",
        }
        prefect_log, mlflow_log = root / "prefect-server.log", root / "mlflow-server.log"
        cmd = [sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1", "--port", str(prefect_port)]
        procs.append(prefect := _spawn(cmd, cwd=root, env=env, log=prefect_log))
        mlflow_env = {**_base_env(home), "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
        cmd = [
            *(sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(mlflow_port)),
            *("--workers", "1", "--backend-store-uri", f"postgresql+psycopg2://{PG}/{dbs['mlflow']}"),
            *("--artifacts-destination", str(root / "mlartifacts")),
        ]
        procs.append(mlflow := _spawn(cmd, cwd=root, env=mlflow_env, log=mlflow_log))
        api_url, mlflow_uri = f"http://127.0.0.1:{prefect_port}/api", f"http://127.0.0.1:{mlflow_port}"

        # one repository (origin), three clones: two workers' workspaces and the coordinator's
        origin, _ = pipeline_workspace(root / "origin", tiny_model, **METHODS, **{"evaluation.limit": 8})
        remote = root / "dvc-remote"
        subprocess.run(
            [sys.executable, "-m", "dvc", "remote", "add", "-d", "shared", str(remote)], cwd=origin, check=True
        )
        _git(origin, "add", "-A")
        _git(origin, "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "grid")
        spaces = {}
        for name in ("coordinator", "worker-a", "worker-b"):
            _git(root, "clone", "-q", str(origin), name)
            spaces[name] = root / name

        _wait_http(f"{api_url}/health", prefect, prefect_log)
        _create_deployment(api_url, home)
        for name in ("worker-a", "worker-b"):
            ws = spaces[name]
            wenv = {
                **_base_env(root / f"prefect-{name}"),
                "PREFECT_API_URL": api_url,
                "PREFECT_WORKER_QUERY_SECONDS": "1",
                "MLFLOW_TRACKING_URI": mlflow_uri,
                "SELFCAL_WORKSPACE": str(ws),
                "SELFCAL_WORKER": name,
            }
            cmd = [sys.executable, "-m", "prefect", "worker", "start", "--pool", POOL, "--type", "process"]
            procs.append(_spawn([*cmd, "--name", name, "--limit", "1"], cwd=ws, env=wenv, log=root / f"{name}.log"))
        _wait_http(f"{mlflow_uri}/health", mlflow, mlflow_log)

        cenv = {
            **_base_env(root / "prefect-coordinator"),
            "PREFECT_API_URL": api_url,
            "MLFLOW_TRACKING_URI": mlflow_uri,
        }
        cmd = [sys.executable, "-m", "selfcal.cli", "run", "--fan-out", f"selfcal-item/{DEPLOYMENT}", "--jobs", "2"]
        run = subprocess.run(
            [*cmd, "--retry-delay", "1"],
            cwd=spaces["coordinator"],
            env=cenv,
            capture_output=True,
            text=True,
            timeout=1200,
        )
        yield {"run": run, "spaces": spaces, "mlflow_uri": mlflow_uri, "env": cenv, "root": root}
    finally:
        for proc in reversed(procs):
            _stop(proc)
        for db in dbs.values():
            _psql(f"DROP DATABASE IF EXISTS {db} WITH (FORCE)")


def _items(summary: str) -> list[tuple[str, str, str]]:
    """(item, outcome, where) rows of the run's summary table."""
    rows = re.findall(
        r"^\| (\S+@\S+|aggregate|evaluate_dense) \| ([^|]+) \| \d+ \| [\d.]+ \| ([^|]*) \|$", summary, re.M
    )
    return [(i, o.strip(), w.strip()) for i, o, w in rows]


def test_every_item_ran_once_and_both_workers_took_items(grid):
    run = grid["run"]
    assert run.returncode == 0, (run.stdout + run.stderr)[-6000:] + "\n" + _logs(grid)
    rows = _items(run.stdout)
    assert len(rows) == 6, run.stdout[-4000:]
    assert {outcome for _, outcome, _ in rows} == {"ran"}  # computed once each, on the worker that took it
    assert {where for _, _, where in rows} == {"worker-a", "worker-b"}
    for line in run.stdout.splitlines():
        assert "upstream_ran" not in line or "[]" in line


def test_every_model_traces_and_verifies_from_either_workspace(grid):
    run = grid["run"]
    assert run.returncode == 0
    env, uri = grid["env"], grid["mlflow_uri"]
    models = subprocess.run(
        [sys.executable, "-m", "selfcal.cli", "models", "--json", "--tracking-uri", uri],
        cwd=grid["root"],
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )
    versions = [m["model"] for m in json.loads(models.stdout)]
    assert [v.split(":")[0] for v in versions] == ["tiny-llama-wanda-self"]
    for ws in ("worker-a", "worker-b"):
        for ref in versions:
            for command in ("lineage", "verify"):
                proc = subprocess.run(
                    [sys.executable, "-m", "selfcal.cli", command, ref, "--tracking-uri", uri],
                    cwd=grid["spaces"][ws],
                    env=env,
                    capture_output=True,
                    text=True,
                )
                assert proc.returncode == 0, f"{command} {ref} from {ws}: {proc.stdout}{proc.stderr}"
                if command == "lineage":
                    assert "MISSING" not in proc.stdout and "git " in proc.stdout
                else:
                    assert "verify: ok:" in proc.stdout


def _logs(grid) -> str:
    root = grid["root"]
    return "\n".join(f"--- {p.name}\n{p.read_text()[-2500:]}" for p in sorted(root.glob("*.log")))
