"""MLflow adapter: one parent run per pipeline execution, one nested run per stage item.

DVC starts every stage as its own process, so the stages find their common parent
run by an *execution id*: ``$SELFCAL_EXECUTION_ID`` when an orchestrator sets it
(the Prefect flow does), otherwise the pid and start time of the enclosing
``dvc`` process, which is the same for every stage of one ``dvc repro``.
"""

from __future__ import annotations

import functools
import logging
import os
import socket
import uuid
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from selfcal.config import Params
from selfcal.errors import ConfigError
from selfcal.lineage import tags as T
from selfcal.paths import experiment_origin

log = logging.getLogger(__name__)
EXECUTION_ENV = "SELFCAL_EXECUTION_ID"
_TAG_EXEC = T.EXECUTION_ID
_TAG_STAGE = T.STAGE  # lineage reads stage runs back by this tag
_MODELS_SCHEME = "models:/"


def _dvc_ancestor() -> str | None:
    """Identify the enclosing ``dvc`` process (pid + start tick) from /proc, if any."""
    pid = os.getppid()
    for _ in range(8):
        if pid <= 1:
            return None
        try:
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
            stat = Path(f"/proc/{pid}/stat").read_text()
        except OSError:
            return None
        args = [part.decode(errors="replace") for part in cmd[:3]]
        if any(Path(a).name == "dvc" for a in args[:2]) or args[1:3] == ["-m", "dvc"]:
            start = stat.rsplit(")", 1)[1].split()[19]
            return f"dvc-{pid}-{start}"
        pid = int(stat.rsplit(")", 1)[1].split()[1])
    return None


@functools.cache
def _process_execution_id() -> str:
    """Outside DVC and Prefect, the steps one process runs belong to one execution."""
    return _dvc_ancestor() or f"standalone-{os.getpid()}-{uuid.uuid4().hex[:8]}"


def execution_id() -> str:
    return os.environ.get(EXECUTION_ENV) or _process_execution_id()


def tracking_uri(params: Params) -> str:
    return tracking_uri_and_key(params)[0]


def configured_uri(params: Params) -> tuple[str, str] | None:
    """The store URI someone set, and where (for an error to name): ``tracking.tracking_uri``, else
    ``$MLFLOW_TRACKING_URI``; None when neither is set (the default sqlite file under ``paths.state``)."""
    if params.tracking.tracking_uri:
        return params.tracking.tracking_uri, "tracking.tracking_uri"
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return os.environ["MLFLOW_TRACKING_URI"], "$MLFLOW_TRACKING_URI"
    return None


def tracking_uri_and_key(params: Params) -> tuple[str, str]:
    """The store the stages log to, and where that came from: the configured URI, else a sqlite file under
    ``paths.state`` (created)."""
    if (configured := configured_uri(params)) is not None:
        return configured
    store = store_dir(params)
    store.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{(store / 'mlflow.db').resolve()}", "paths.state"


def store_dir(params: Params) -> Path:
    """The folder of the default sqlite store and its artifacts: ``paths.state``, or, in a DVC experiment's copy
    of the workspace (``dvc exp run --queue`` / ``--temp``), the original workspace's: the copy is deleted when
    the experiment ends, and an audit's temporary experiment registered its models in a store that went with
    it."""
    origin = experiment_origin(params.root)
    state, root = params.state_dir, Path(params.root).resolve()
    if origin is not None and root in state.parents:
        return origin / state.relative_to(root)
    return state


def check_store_uri(uri: str, key: str = "tracking.tracking_uri") -> None:
    """``uri`` is one MLflow has a store for (``htp://`` passed, then every stage died in MLflow with its own
    exception). The scheme only: whether a server answers is the reader's business (a coordinator may check
    params on a box that cannot reach the workers' store)."""
    # MLflow's own scheme tables (mlflow/tracking/_model_registry/utils.py, _tracking_service/utils.py): the
    # registry's is the narrower, and every stage registers or reads versions
    from mlflow.tracking._model_registry.utils import _get_store_registry
    from mlflow.tracking._tracking_service.utils import _tracking_store_registry

    for registry in (_tracking_store_registry, _get_store_registry()):
        try:
            registry.get_store_builder(uri)
        except Exception:  # noqa: BLE001 - MLflow's exception types differ by store kind
            raise ConfigError(
                f"{key}: {uri!r} is no MLflow store URI (sqlite:///FILE, postgresql://..., http(s)://HOST, or a folder)"
            ) from None


#: Seconds an auditing command waits for a tracking server's /health before saying it does not answer
#: (MLflow's own client retries a dead server for minutes, then names the model as missing)
HEALTH_TIMEOUT_S = 5.0


def open_client(uri: str, key: str = "tracking.tracking_uri"):
    """A client for reading an existing store, checked first: a URI MLflow has no store for, a missing sqlite file
    or folder (an error, not a new store) and a server that does not answer are each one line naming ``key``."""
    import mlflow

    logging.getLogger("alembic").setLevel(logging.WARNING)
    check_store_uri(uri, key)
    parsed = urlparse(uri)
    if parsed.scheme == "sqlite":
        db = Path(uri.removeprefix("sqlite:///")) if uri.startswith("sqlite:///") else None
        if db is not None and not db.is_file():
            raise ConfigError(f"{key}: no MLflow store at {db} (run the pipeline with tracking enabled first)")
    elif parsed.scheme in ("", "file"):
        from urllib.request import url2pathname

        folder = Path(url2pathname(parsed.path) if parsed.scheme == "file" else uri)
        if not folder.is_dir():
            raise ConfigError(f"{key}: no MLflow store at {folder} (no such folder)")
    elif parsed.scheme in ("http", "https"):
        _probe_server(uri, key)
    elif parsed.scheme.split("+")[0] in DATABASE_PORTS:
        _probe_database(uri, key)
    return mlflow.MlflowClient(tracking_uri=uri)


#: The database backends MLflow's SQLAlchemy store takes, and their default ports
DATABASE_PORTS = {"postgresql": 5432, "mysql": 3306, "mssql": 1433}


def _probe_database(uri: str, key: str) -> None:
    """A database store's driver is installed and its host accepts a connection within ``HEALTH_TIMEOUT_S``
    (SQLAlchemy otherwise fails with a traceback: ``postgresql://`` wants psycopg 3, not psycopg2)."""
    import socket

    from sqlalchemy.engine import make_url

    url = make_url(uri)
    try:
        url.get_dialect().import_dbapi()
    except ImportError as err:
        raise ConfigError(
            f"{key}: {url.drivername} needs the {err.name or 'database'} driver, which is not installed (name an "
            "installed one, e.g. postgresql+psycopg2:// with psycopg2-binary)"
        ) from None
    host, port = url.host or "localhost", url.port or DATABASE_PORTS[url.get_backend_name()]
    try:
        socket.create_connection((host, port), timeout=HEALTH_TIMEOUT_S).close()
    except OSError as err:
        raise ConfigError(f"{key}: the database at {host}:{port} does not answer ({err})") from None


def shown_uri(uri: str) -> str:
    """``uri`` with any password in it masked, for messages."""
    parsed = urlparse(uri)
    if parsed.password is None:
        return uri
    return parsed._replace(netloc=parsed.netloc.replace(f":{parsed.password}@", ":***@", 1)).geturl()


def _probe_server(uri: str, key: str) -> None:
    """A tracking server answers ``/health`` within ``HEALTH_TIMEOUT_S``. Any HTTP answer counts (a proxy may guard
    /health), and so does a TLS handshake this probe cannot verify (MLflow's client has its own certificate
    settings, MLFLOW_TRACKING_INSECURE_TLS and the like): only silence, a refused connection or a port that
    speaks no HTTP is refused. Credentials in the URI are left out of the probe and masked in the message."""
    import http.client
    import ssl
    import urllib.error
    import urllib.request

    parsed = urlparse(uri)
    host = parsed.hostname or ""
    netloc = f"[{host}]" if ":" in host else host
    if parsed.port is not None:
        netloc += f":{parsed.port}"
    health = parsed._replace(netloc=netloc, path=parsed.path.rstrip("/") + "/health", query="", fragment="")
    try:
        urllib.request.urlopen(health.geturl(), timeout=HEALTH_TIMEOUT_S).close()
    except (urllib.error.HTTPError, ssl.SSLError):
        return  # an HTTP status, or TLS this probe cannot verify: the server is there
    except urllib.error.URLError as err:
        if isinstance(err.reason, ssl.SSLError):
            return
        reason = err.reason
    except http.client.HTTPException as err:  # not an OSError: a port that speaks no HTTP
        reason = f"{type(err).__name__}: {err}"
    except (OSError, ValueError) as err:
        reason = err
    else:
        return
    raise ConfigError(f"{key}: the MLflow server at {shown_uri(uri)} does not answer ({reason})")


@dataclass(frozen=True)
class RegisteredVersion:
    """A model version and the MLflow 3 LoggedModel it was registered from."""

    name: str
    version: str
    model_id: str | None

    @property
    def ref(self) -> str:
        return f"{self.name}:{self.version}"


def model_id_of(version) -> str | None:
    """The LoggedModel behind a model version: stores that drop ``model_id`` still keep the ``models:/`` source."""
    if getattr(version, "model_id", None):
        return version.model_id
    source = version.source or ""
    rest = source.removeprefix(_MODELS_SCHEME)
    return rest if source.startswith(_MODELS_SCHEME) and rest and "/" not in rest else None


def _experiment_id(mlflow, params: Params) -> str:
    name = params.tracking.experiment
    exp = mlflow.get_experiment_by_name(name)
    if exp is not None:
        return exp.experiment_id
    if tracking_uri(params).startswith(("http://", "https://", "databricks")):
        # A tracking server owns its artifact root (shared by every worker); a workspace's local
        # folder would pin every later worker's artifacts to this machine's disk.
        return mlflow.create_experiment(name)
    artifacts = (store_dir(params) / "mlartifacts").resolve()
    return mlflow.create_experiment(name, artifact_location=artifacts.as_uri())


def flatten(d: dict, prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out


class StageRun:
    """What a stage may record; a no-op when tracking is disabled."""

    def __init__(self, mlflow=None):
        self._mlflow = mlflow

    @property
    def run_id(self) -> str | None:
        if self._mlflow is None:
            return None
        return self._mlflow.active_run().info.run_id

    def params(self, values: dict) -> None:
        if self._mlflow is not None:
            flat = {k: str(v)[:6000] for k, v in flatten(values).items()}
            self._mlflow.log_params(flat)

    def metrics(self, values: dict[str, float | None], *, model_id: str | None = None) -> None:
        """Log to this run; with ``model_id`` MLflow also attaches them to that LoggedModel."""
        if self._mlflow is not None:
            self._mlflow.log_metrics({k: float(v) for k, v in values.items() if v is not None}, model_id=model_id)

    def tags(self, values: dict[str, Any]) -> None:
        if self._mlflow is not None:
            self._mlflow.set_tags({k: str(v) for k, v in values.items()})

    def artifact(self, path: Path, artifact_path: str | None = None) -> None:
        if self._mlflow is not None:
            self._mlflow.log_artifact(str(path), artifact_path=artifact_path)

    def dataset(self, name: str, digest: str, source: Path, *, context: str, tags: dict[str, str]) -> None:
        """Record a directory on disk as an MLflow dataset (metadata only: the data stays where it is)."""
        if self._mlflow is None:
            return
        import warnings

        from mlflow.data.dataset_source_registry import resolve_dataset_source
        from mlflow.data.meta_dataset import MetaDataset

        with warnings.catch_warnings():
            # Two registered source types accept file URIs; they are the same class of source.
            warnings.filterwarnings("ignore", message=".*can be interpreted in multiple ways")
            src = resolve_dataset_source(source.resolve().as_uri())
        ds = MetaDataset(source=src, name=name, digest=digest)
        self._mlflow.log_input(ds, context=context, tags=tags)

    def register_model(
        self, name: str, *, tags: dict[str, str], params: dict[str, str], model_type: str
    ) -> RegisteredVersion | None:
        """Register a model whose files stay outside MLflow, as a new version of ``name``.

        An *external* LoggedModel (MLflow keeps only a stub MLmodel file) is the output
        of this run; the version's source is ``models:/<model_id>``, which a tracking
        server accepts where it refuses a local path. Where the files are is the
        caller's business, recorded in ``tags``.
        """
        if self._mlflow is None:
            return None
        from mlflow.entities import LoggedModelOutput
        from mlflow.exceptions import MlflowException
        from mlflow.protos.databricks_pb2 import RESOURCE_ALREADY_EXISTS, ErrorCode

        mlflow = self._mlflow
        run = mlflow.active_run()
        client = mlflow.MlflowClient()
        logged = mlflow.create_external_model(
            # LoggedModel names may not contain dots; registry names may.
            name=name.replace(".", "-"),
            source_run_id=run.info.run_id,
            tags=tags,
            params=params,
            model_type=model_type,
            experiment_id=run.info.experiment_id,
        )
        client.log_outputs(run.info.run_id, [LoggedModelOutput(logged.model_id, step=0)])
        try:
            client.create_registered_model(name)
        except MlflowException as err:
            if err.error_code != ErrorCode.Name(RESOURCE_ALREADY_EXISTS):
                raise
        mv = client.create_model_version(
            name,
            source=f"{_MODELS_SCHEME}{logged.model_id}",
            run_id=run.info.run_id,
            tags=tags,
            model_id=logged.model_id,
        )
        return RegisteredVersion(name=mv.name, version=str(mv.version), model_id=logged.model_id)

    def find_model_version(self, tag: str, value: str) -> RegisteredVersion | None:
        """The newest version carrying ``tag = value`` (e.g. the one registered for a checkpoint digest)."""
        if self._mlflow is None:
            return None
        found = self._mlflow.MlflowClient().search_model_versions(f"tags.`{tag}` = '{value}'")
        if not found:
            return None
        mv = max(found, key=lambda v: (v.creation_timestamp, int(v.version)))
        return RegisteredVersion(name=mv.name, version=str(mv.version), model_id=model_id_of(mv))

    def find_runs(self, tags: dict[str, str]) -> list[str]:
        """Ids of this experiment's other runs that carry every one of ``tags``, newest first."""
        if self._mlflow is None:
            return []
        active = self._mlflow.active_run()
        where = " and ".join(f"tags.`{k}` = '{v}'" for k, v in tags.items())
        found = self._mlflow.MlflowClient().search_runs(
            [active.info.experiment_id], filter_string=where, order_by=["attributes.start_time DESC"]
        )
        return [r.info.run_id for r in found if r.info.run_id != active.info.run_id]

    def tag_model_version(self, version: RegisteredVersion, tags: dict[str, str]) -> None:
        if self._mlflow is None:
            return
        client = self._mlflow.MlflowClient()
        for key, value in tags.items():
            client.set_model_version_tag(version.name, version.version, key, value)


def fail_dead_runs(client, experiment_id: str) -> list[str]:
    """Mark FAILED the RUNNING stage runs of this host whose process is gone (``kill -9``, a lost
    machine): without it they stay RUNNING forever in the UI. A pid reused since is told apart by
    the process's start time. Returns the run ids it ended."""
    import psutil

    host = socket.gethostname()
    ended = []
    for run in client.search_runs(
        [experiment_id], filter_string=f"attributes.status = 'RUNNING' and tags.`{T.HOST}` = '{host}'"
    ):
        pid = int(run.data.tags.get(T.PID, "0") or 0)
        try:
            alive = pid > 0 and psutil.Process(pid).create_time() * 1000 <= run.info.start_time + 1000
        except psutil.NoSuchProcess:
            alive = False
        if not alive:
            client.set_tag(run.info.run_id, T.FAILED_REASON, f"its process (pid {pid} on {host}) died")
            client.set_terminated(run.info.run_id, status="FAILED")
            ended.append(run.info.run_id)
            log.info("MLflow: marked run %s FAILED: its process (pid %d) died", run.info.run_id, pid)
    return ended


def _pipeline_run_id(mlflow, exp_id: str, exec_id: str) -> str | None:
    found = mlflow.search_runs(
        experiment_ids=[exp_id],
        filter_string=f"tags.`{_TAG_EXEC}` = '{exec_id}' and tags.`{_TAG_STAGE}` = 'pipeline'",
        output_format="list",
        max_results=1,
    )
    return found[0].info.run_id if found else None


def open_pipeline_run(params: Params, exec_id: str) -> str | None:
    """Create the parent run of one pipeline execution before its items start (None with tracking off).

    Stage items find their parent by execution id; when several start at once (``selfcal run --jobs N``, items
    fanned out to workers), each would find none and create its own. The orchestrator creates it first.
    """
    if not params.tracking.enabled:
        return None
    import mlflow

    logging.getLogger("alembic").setLevel(logging.WARNING)
    client = mlflow.MlflowClient(tracking_uri=tracking_uri(params))
    mlflow.set_tracking_uri(tracking_uri(params))
    exp_id = _experiment_id(mlflow, params)
    found = _pipeline_run_id(mlflow, exp_id, exec_id)
    if found:
        return found
    run = client.create_run(
        exp_id,
        run_name=f"pipeline {exec_id}",
        tags={_TAG_EXEC: exec_id, _TAG_STAGE: "pipeline", T.PID: str(os.getpid()), T.HOST: socket.gethostname()},
    )
    return run.info.run_id


def close_pipeline_run(params: Params, run_id: str | None, *, failed: bool) -> None:
    """End the parent run; one that no stage item ran under (every item up to date) is deleted, so a night
    that had nothing to do leaves no empty run behind."""
    if run_id is None:
        return
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=tracking_uri(params))
    run = client.get_run(run_id)
    children = client.search_runs(
        [run.info.experiment_id], filter_string=f"tags.`mlflow.parentRunId` = '{run_id}'", max_results=1
    )
    if not children and not failed:
        client.delete_run(run_id)
        return
    client.set_terminated(run_id, "FAILED" if failed else "FINISHED")


@contextmanager
def stage_run(params: Params, stage: str, item: str) -> Iterator[StageRun]:
    if not params.tracking.enabled:
        yield StageRun()
        return
    import mlflow

    logging.getLogger("alembic").setLevel(logging.WARNING)
    mlflow.set_tracking_uri(tracking_uri(params))
    exp_id = _experiment_id(mlflow, params)
    fail_dead_runs(mlflow.MlflowClient(), exp_id)
    exec_id = execution_id()
    found = _pipeline_run_id(mlflow, exp_id, exec_id)
    with ExitStack() as stack:
        if found is None:  # the execution's first stage, no orchestrator (a plain `dvc repro`): it opens the parent
            parent = stack.enter_context(mlflow.start_run(experiment_id=exp_id, run_name=f"pipeline {exec_id}"))
            mlflow.set_tags({_TAG_EXEC: exec_id, _TAG_STAGE: "pipeline", T.PID: str(os.getpid())})
            mlflow.set_tag(T.HOST, socket.gethostname())
            found = parent.info.run_id
        # The child hangs under the parent without resuming it: items of one execution run at once (--jobs,
        # workers), and one that re-tagged the parent with its pid and ended it on exit had the next item's
        # fail_dead_runs mark the whole execution FAILED while it ran (seen on the H200 with eight items at once).
        with mlflow.start_run(experiment_id=exp_id, run_name=f"{stage}@{item}", nested=True, parent_run_id=found):
            mlflow.set_tags({_TAG_EXEC: exec_id, _TAG_STAGE: stage, T.ITEM: item, T.PID: str(os.getpid())})
            mlflow.set_tag(T.HOST, socket.gethostname())
            if params.model.trust_remote_code:
                mlflow.set_tag(T.TRUST_REMOTE_CODE, "true")
            log.info("MLflow: run %s under pipeline run %s", mlflow.active_run().info.run_id, found)
            yield StageRun(mlflow)
