"""``selfcal``: run pipeline steps by hand, check params, or run the whole flow.

Each step reads the validated params.yaml ($SELFCAL_PARAMS or --params) and writes
the same artifacts the DVC stages write; ``dvc repro`` is the reproducible way to
run them all, ``selfcal run`` the one-command way through Prefect.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from selfcal.pipeline.common import run_cli, setup_logging


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="selfcal",
        description="Compress causal LMs with self-generated calibration data, with lineage.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Examples:\n"
        "  selfcal check                              validate params.yaml and find the model\n"
        "  selfcal generate --source self --seed 0    sample one calibration set\n"
        "  selfcal compress --source self --seed 0 --method gptq\n"
        "  selfcal evaluate dense                     score the uncompressed model\n"
        "  selfcal aggregate                          write artifacts/report/results.{csv,md}\n"
        "  selfcal run                                the whole pipeline (Prefect flow over dvc repro)\n"
        "  selfcal lineage stories260K-gptq-self:1    model -> calibration set -> generator, commit, metrics\n"
        "  selfcal verify stories260K-gptq-self       recompute every registered hash on disk\n"
        "  selfcal restore stories260K-gptq-self:1 /tmp/v1   a version's files, even after a later run replaced them\n"
        "  selfcal models                             every registered model version and its calibration set\n",
    )
    _add_common(p)
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    sub.add_parser(
        "check",
        help="validate params, the model, each method's layer plan and dvc.yaml's params keys; no compute",
        description="Everything about the params that could fail a stage later, found in seconds: the schema, "
        "the model and its context window, tokenizer-dependent settings (first_token_words), each listed "
        "method's static layer checks, and every params key dvc.yaml's stages read.",
    )

    g = sub.add_parser(
        "generate",
        help="write one calibration set (source x seed)",
        description="One calibration set of calibration.n_samples x seq_len tokens from SOURCE (self: the model "
        "samples it from BOS) with SEED, into artifacts/calibration/SOURCE-sSEED (tokens.safetensors + a "
        "manifest with its content digest; the same params and seed give the same digest). With tracking on, "
        "logged as an MLflow dataset of a generate run. The `dvc repro` stage item generate@SOURCE-SEED.",
    )
    g.add_argument("--source", required=True, help="a key of calibration.sources")
    g.add_argument("--seed", required=True, type=int, help="one of calibration.seeds")

    c = sub.add_parser(
        "compress",
        help="compress the base model with one calibration set and method",
        description="The base model compressed by METHOD (llm-compressor oneshot) with the calibration set "
        "SOURCE-sSEED, saved as safetensors into artifacts/checkpoints/SOURCE-sSEED-METHOD with a manifest "
        "(content digest, the set's digest, recipe, library versions), checked (only target layers changed) "
        "and, with tracking on, registered as a model version. The `dvc repro` stage item compress@....",
    )
    c.add_argument("--source", required=True, help="a key of calibration.sources (its set must be generated)")
    c.add_argument("--seed", required=True, type=int, help="one of calibration.seeds")
    c.add_argument("--method", required=True, help="one of compression.methods")

    e = sub.add_parser(
        "evaluate",
        help="score 'dense' or a checkpoint name (SOURCE-sSEED-METHOD)",
        description="Zero-shot acc on evaluation.tasks (lm-eval's tasks; evaluation.engine: fast or lm-eval) and "
        "the perplexity sets, for the base model "
        "('dense') or one checkpoint, into artifacts/evaluations/NAME.json and artifacts/metrics/NAME.json; "
        "with tracking on, logged to the model's registered version. The `dvc repro` stage item evaluate@....",
    )
    e.add_argument("target", help="'dense' or a checkpoint directory name under artifacts/checkpoints")

    i = sub.add_parser(
        "inspect",
        help="diagnostics of a calibration set (perplexity, repetition, diversity, coverage, Zipf, activations)",
        description="Either CALIB_SET (a calibration set directory) with --model, or --source/--seed to "
        "inspect a set of the pipeline and write artifacts/diagnostics/NAME.json.",
    )
    i.add_argument("calib_set", nargs="?", help="calibration set directory (tokens.safetensors + manifest.json)")
    i.add_argument("--model", help="model (hub id or directory); default: model.path from params")
    i.add_argument("--reference", help="corpus file for the activation-statistics distance; default: params")
    i.add_argument("--source", help="a key of calibration.sources: inspect the pipeline's set of it (with --seed)")
    i.add_argument("--seed", type=int, help="one of calibration.seeds (with --source)")

    sub.add_parser(
        "aggregate",
        help="summarise metrics (and diagnostics) into CSV and Markdown tables",
        description="Every evaluation record the params define, grouped by method x source: mean and sample "
        "std over the seeds (std only where two or more sets have the metric), into artifacts/report/"
        "results.{csv,md}, by_source.md (the paper's layout), diagnostics.md and metrics.json (DVC metrics).",
    )
    sr = sub.add_parser(
        "study-report",
        help="write a study's committed record: tables, stage times and every model's lineage (lineage.json)",
        description="After `selfcal run --profile NAME` (tracking on): the aggregate tables from the evaluation "
        "records, the stage wall times and every checkpoint's registered version, calibration set, commit and "
        "code digest from MLflow, into OUT (e.g. reports/NAME). A checkpoint without a registered version is "
        "listed as missing; models the params define but nobody evaluated yet are listed as pending.",
    )
    sr.add_argument("--out", required=True, help="folder to write (created)")
    sr.add_argument("--title", default="selfcal study", help="the report's heading")
    sr.add_argument(
        "--experiments",
        action="store_true",
        help="add the set-size sweep from this workspace's DVC experiments (dvc exp run --queue -S "
        "calibration.n_samples=..., then dvc queue start --jobs N)",
    )
    sr.add_argument(
        "--runs",
        nargs="+",
        type=Path,
        metavar="DIR",
        help="read run folders committed from other machines instead of the workspace (each holding "
        "artifacts/evaluations and the MLflow store, .selfcal/mlflow.db or packed as mlflow-store.tar.xz, as "
        "tools/study_box.sh collect brings a GPU lease's chunk back)",
    )
    sr.add_argument(
        "--paper-table",
        type=Path,
        default=Path("../shared/reference/williams2025_appendix_tables.csv"),
        metavar="CSV",
        help="the paper's appendix tables, for the same self-vs-real-data test on its numbers (default: "
        "../shared/reference/williams2025_appendix_tables.csv; skipped when absent)",
    )

    store_help = (
        "MLflow store (default: tracking.tracking_uri in params, else $MLFLOW_TRACKING_URI, else .selfcal/mlflow.db)"
    )
    lg = sub.add_parser(
        "lineage",
        help="trace a registered model to its calibration set, generator, code, params and metrics",
        description="MODEL[:VERSION] prints the chain model -> checkpoint -> calibration set -> generator, "
        "with commit, params, library versions and metrics (default version: the newest). "
        "--calibration DIGEST lists every model version made from that calibration set.",
    )
    lg.add_argument("model", nargs="?", metavar="MODEL[:VERSION]", help="a registered model name, optionally :VERSION")
    lg.add_argument("--calibration", metavar="DIGEST", help="calibration content digest (or a prefix of 8+ hex digits)")
    lg.add_argument("--json", action="store_true", help="print JSON instead of text")
    lg.add_argument("--tracking-uri", help=store_help)
    ms = sub.add_parser(
        "models",
        help="list every registered model version with its method, calibration set and checkpoint",
        description="Every version in the MLflow model registry, by name then version, with the lineage tags "
        "selfcal registered (method, calibration set and digest, checkpoint); versions registered by "
        "hand say 'no selfcal lineage'. Then `selfcal lineage NAME:VERSION` traces one.",
    )
    ms.add_argument("--json", action="store_true", help="print JSON instead of text")
    ms.add_argument("--tracking-uri", help=store_help)
    vf = sub.add_parser(
        "verify",
        help="recompute the hashes of a registered model's checkpoint, calibration set and metrics on disk",
        description="Exit 0 when every file matches what was registered; otherwise one line per problem "
        "naming the file, and exit status 2.",
    )
    vf.add_argument("model", metavar="MODEL[:VERSION]", help="a registered model name, optionally :VERSION")
    vf.add_argument("--tracking-uri", help=store_help)
    rs = sub.add_parser(
        "restore",
        help="copy a registered version's checkpoint and calibration set, verified, into a new folder",
        description="Finds the version's files in the workspace or, when a later run replaced them there, in the "
        "DVC cache (by the md5s recorded at registration), verifies them against the registry, and copies them "
        "into DEST/checkpoint and DEST/calibration. DEST must be new or empty; the workspace is not touched.",
    )
    rs.add_argument("model", metavar="MODEL[:VERSION]", help="a registered model name, optionally :VERSION")
    rs.add_argument("dest", metavar="DEST", help="a new or empty folder")
    rs.add_argument("--tracking-uri", help=store_help)

    r = sub.add_parser(
        "run",
        help="run the whole pipeline as a Prefect flow (local ephemeral API)",
        description="The Prefect flow in flows/pipeline.py on Prefect's temporary local API (or PREFECT_API_URL): "
        "one retried task per DVC stage item, holding the workspace lock (.selfcal/run.lock) for the whole run. "
        "--jobs N runs up to N independent items at once, each on its own GPU slot (or share of the CPU); "
        "--fan-out sends the items to a work pool's workers instead.",
    )
    r.add_argument("--profile", help="profiles/NAME.yaml (or a path) to validate and install as params.yaml first")
    r.add_argument("--force", action="store_true", help="re-run stages even if DVC says they are up to date")
    r.add_argument(
        "--sync-remote", action="store_true", help="dvc pull before and dvc push after (default remote, run-cache)"
    )
    r.add_argument("--retries", type=_whole(0), default=2, help="retries per stage item (default 2)")
    r.add_argument(
        "--retry-delay", type=_seconds(0), default=30, metavar="SECONDS", help="pause before a retry (default 30)"
    )
    r.add_argument(
        "--timeout", type=_seconds(), metavar="SECONDS", help="limit per attempt of one stage item (default none)"
    )
    r.add_argument(
        "--lock-timeout",
        type=float,
        default=0,
        metavar="SECONDS",
        help="wait this long for a run holding the workspace (default 0: fail)",
    )
    r.add_argument(
        "--jobs",
        "-j",
        type=_whole(1),
        default=1,
        metavar="N",
        help="stage items at once, each as soon as the items it reads are done (default 1); on GPUs at most "
        "GPUs x --slots-per-gpu, each item on its own GPU; on a CPU the cores are divided among them",
    )
    r.add_argument(
        "--slots-per-gpu",
        type=_whole(1),
        default=1,
        metavar="K",
        help="items that may share one GPU (default 1; small models fit several)",
    )
    r.add_argument(
        "--mps",
        action="store_true",
        help="items sharing a GPU (--slots-per-gpu > 1) run their kernels side by side through a CUDA MPS "
        "daemon the run starts and quits (nvidia-cuda-mps-control); where it cannot start, they take turns "
        "on the GPU as without it, and the log says why",
    )
    r.add_argument(
        "--fan-out",
        metavar="DEPLOYMENT",
        help="run each item as a flow run of this selfcal-item deployment (e.g. selfcal-item/items) on the work "
        "pool's workers, --jobs at once; needs a Prefect server (PREFECT_API_URL) and a shared DVC remote",
    )
    r.add_argument(
        "--only",
        action="append",
        metavar="PATTERN",
        help="run only the stage items matching this shell-style pattern (repeatable; e.g. 'evaluate@self-*' "
        "'evaluate_dense'), each with the items it reads: one chunk of a grid at a time; of the items ready at "
        "once, the deepest go first (models finish end to end), then the first pattern's (start long ones first)",
    )
    for command in sub.choices.values():  # also after the command: `selfcal run -v`, `selfcal check --params x`
        _add_common(command, argparse.SUPPRESS)
    return p


def _add_common(p: argparse.ArgumentParser, default: object = None) -> None:
    """The options every command takes. A command's own copies default to SUPPRESS, so one given before the
    command is not reset by the command's parser (argparse copies only what a subparser set)."""
    p.add_argument("--params", default=default, help="params file (default: $SELFCAL_PARAMS or ./params.yaml)")
    flag = {} if default is None else {"default": default}
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging", **flag)
    p.add_argument("--no-progress", action="store_true", help="hide progress bars", **flag)


def _seconds(least: float | None = None):
    """A duration in seconds: above 0, or at least ``least``; a finite number either way."""

    def parse(text: str) -> float:
        import math

        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds") from None
        if not math.isfinite(value) or (value < least if least is not None else value <= 0):
            raise argparse.ArgumentTypeError(
                f"{text} is not {'at least ' + str(least) if least is not None else 'above 0'}"
            )
        return value

    return parse


def _whole(least: int):
    """A whole number of at least ``least`` (retries from 0, jobs and slots from 1)."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
        if value < least:
            raise argparse.ArgumentTypeError(f"{value} is less than {least}")
        return value

    return parse


def _run(args) -> None:
    """Refuse at once, in one line, what the flow would refuse only after Prefect started.

    The flow checks all of this again (a deployment has no CLI in front of it);
    here it only spares the user a server start and a traceback.
    """
    import logging
    from pathlib import Path

    from selfcal.errors import ConfigError
    from selfcal.profiles import check_profile
    from selfcal.workspace_lock import workspace_lock

    if args.params:  # the flow reads ./params.yaml, as DVC does
        raise ConfigError("run: DVC reads ./params.yaml; choose other params with --profile, not --params")
    if args.profile:  # all of `selfcal check`, before the flow installs it as params.yaml
        check_profile(Path.cwd(), args.profile)
    if args.lock_timeout <= 0:
        with workspace_lock(Path.cwd(), label="selfcal run (start-up check)"):
            pass
    if args.fan_out and not os.environ.get("PREFECT_API_URL"):
        raise ConfigError(
            "run --fan-out: the items go to the workers of a Prefect server's work pool; set PREFECT_API_URL "
            "(a temporary local API has no workers)"
        )
    if args.mps and args.fan_out:
        raise ConfigError("run --mps: with --fan-out the items run on the workers; MPS is their boxes' to set up")
    if args.mps:
        from flows.slots import visible_gpus

        if not visible_gpus():
            raise ConfigError("run --mps: no GPU is visible here (CUDA_VISIBLE_DEVICES, torch), so nothing to share")
    # A temporary local server has nobody to report usage to (and no network on many GPU boxes).
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    # Prefect waits 20 s for its temporary server; a fresh Prefect home (database migrations) on a
    # busy 2-core box can take longer, and the run then dies before its first item.
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "180")

    # Prefect prints its own console lines, naming the task run (the stage item), only
    # when it finds the root logger free; everything this command logs goes through it.
    logging.getLogger().handlers.clear()
    from flows.pipeline import pipeline

    summary = pipeline(
        profile=args.profile,
        force=args.force,
        sync_remote=args.sync_remote,
        retries=args.retries,
        retry_delay_seconds=args.retry_delay,
        timeout_seconds=args.timeout,
        lock_timeout=args.lock_timeout,
        jobs=args.jobs,
        slots_per_gpu=args.slots_per_gpu,
        fan_out=args.fan_out,
        only=args.only,
        mps=args.mps,
    )
    print(summary)


def _audit_client(args):
    """The store to audit: --tracking-uri, else the params' own, else $MLFLOW_TRACKING_URI; no params file needed."""
    from selfcal.config import load_params, params_path
    from selfcal.errors import ConfigError
    from selfcal.lineage.tracking import open_client, tracking_uri_and_key

    if args.tracking_uri:
        return open_client(args.tracking_uri, "--tracking-uri")
    if params_path(args.params).is_file():
        return open_client(*tracking_uri_and_key(load_params(args.params)))
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return open_client(os.environ["MLFLOW_TRACKING_URI"], "$MLFLOW_TRACKING_URI")
    raise ConfigError(
        f"{args.command}: no params file, --tracking-uri or $MLFLOW_TRACKING_URI to find the MLflow store"
    )


def _lineage(args) -> None:
    import json

    from selfcal.errors import ConfigError
    from selfcal.lineage import store, trace

    if (args.model is None) == (args.calibration is None):
        raise ConfigError("lineage: give MODEL[:VERSION] or --calibration DIGEST (one of them)")
    client = _audit_client(args)
    if args.calibration is not None:
        digest = store.check_digest(args.calibration)
        models = trace.models_from_calibration(client, digest)
        print(json.dumps(models, indent=2) if args.json else trace.format_models(digest, models))
        return
    chain = trace.trace(client, store.resolve_version(client, args.model))
    print(json.dumps(chain, indent=2) if args.json else trace.format_text(chain))


def _models(args) -> None:
    import json

    from selfcal.lineage import trace

    models = trace.all_models(_audit_client(args))
    print(json.dumps(models, indent=2) if args.json else trace.format_model_list(models))


def _verify(args) -> None:
    from selfcal.errors import VerificationError
    from selfcal.lineage import store
    from selfcal.lineage.verify import verify

    client = _audit_client(args)
    report = verify(client, store.resolve_version(client, args.model))
    for line in report.problems:
        print(f"verify: {line}", file=sys.stderr)
    for line in report.notes:
        print(f"verify: note: {line}", file=sys.stderr)
    if not report.ok:
        raise VerificationError(f"{report.ref} failed verification: {len(report.problems)} problem(s) listed above")
    print(f"verify: ok: {report.ref}: {', '.join(report.checked)} match the registry")


def _restore(args) -> None:
    from pathlib import Path

    from selfcal.lineage import store
    from selfcal.lineage.verify import restore

    client = _audit_client(args)
    for path in restore(client, store.resolve_version(client, args.model), Path(args.dest)):
        print(f"restore: {store.show(path)}")


def _inspect(args, params) -> None:
    import json
    from pathlib import Path

    from selfcal.errors import ConfigError
    from selfcal.modelio import pick_device, resolve_model
    from selfcal.pipeline.inspect import REFERENCE_KEY, inspect_set, inspect_stage

    progress = not args.no_progress
    if args.calib_set is None:
        if args.source is None or args.seed is None:
            raise ConfigError("inspect: give CALIB_SET, or --source and --seed")
        inspect_stage(params, args.source, args.seed, progress=progress)
        return
    if args.source is not None or args.seed is not None:
        raise ConfigError("inspect: give CALIB_SET or --source and --seed, not both (the set would be inspected)")
    if args.model:
        ref = resolve_model(args.model, root=Path.cwd(), key="--model")
    else:
        ref = resolve_model(params.model.path, root=params.root, revision=params.model.revision)
    diag = params.calibration.diagnostics if params else None
    result = inspect_set(
        Path(args.calib_set),
        ref,
        device=pick_device(params.model.device if params else "auto"),
        dtype=params.model.dtype if params else "float32",
        reference_path=args.reference or (diag.reference_path if diag else None),
        root=Path.cwd() if args.reference or not params else params.root,
        batch_size=diag.batch_size if diag else 8,
        reference_stride=diag.window_stride if diag and not args.reference else None,
        reference_key="--reference" if args.reference else REFERENCE_KEY,
        progress=progress,
    )
    print(json.dumps(result, indent=2, sort_keys=True))


WRITERS = ("generate", "compress", "evaluate", "inspect", "aggregate")  # take the workspace lock


def _dispatch(args, params, progress: bool) -> None:
    from selfcal.config import params_path

    if args.command == "check":
        from selfcal.pipeline.check import check

        print(check(params, params_path(args.params)))
    elif args.command == "generate":
        from selfcal.pipeline.generate import generate

        generate(params, args.source, args.seed, progress=progress)
    elif args.command == "compress":
        from selfcal.pipeline.compress import compress

        compress(params, args.source, args.seed, args.method)
    elif args.command == "evaluate":
        from selfcal.pipeline.evaluate import evaluate

        evaluate(params, args.target, progress=progress)
    elif args.command == "inspect":
        _inspect(args, params)
    elif args.command == "aggregate":
        from selfcal.pipeline.aggregate import aggregate

        aggregate(params)
    elif args.command == "study-report":
        from pathlib import Path

        from selfcal.pipeline.study_report import study_report

        out = study_report(
            params,
            Path(args.out),
            title=args.title,
            experiments=args.experiments,
            runs=args.runs,
            paper_table=args.paper_table,
        )
        print(f"study-report: wrote {out}")


AUDIT = {"lineage": _lineage, "verify": _verify, "models": _models, "restore": _restore}


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    setup_logging(args.verbose)
    if getattr(args, "no_progress", False):
        # the libraries' bars too (transformers' weight loading, llm-compressor's calibration, lm-eval's
        # contexts): tqdm reads TQDM_* from the environment (tqdm.utils.envwrap), which stage subprocesses inherit
        os.environ["TQDM_DISABLE"] = "1"

    def go() -> None:
        from selfcal.config import load_params, params_path

        if args.command in AUDIT:  # an auditor may have no params.yaml
            from mlflow.exceptions import MlflowException

            from selfcal.errors import DataError

            try:
                AUDIT[args.command](args)
            except MlflowException as err:  # a store MLflow opens but cannot serve (its folder store is read-only)
                raise DataError(f"{args.command}: MLflow: {str(err).strip().splitlines()[0]}") from None
            return
        if args.command == "run":
            _run(args)  # before load_params: the profile may replace params.yaml
            return
        if args.command == "inspect" and args.calib_set and args.model and not params_path(args.params).is_file():
            _inspect(args, None)  # a set and a model are all a one-off inspection needs
            return
        params = load_params(args.params)
        progress = not args.no_progress
        one_off = args.command == "inspect" and args.calib_set  # prints its result, writes nothing: no lock
        if args.command in WRITERS and not one_off:
            from selfcal.pipeline.common import check_artifacts_dir
            from selfcal.workspace_lock import write_guard

            check_artifacts_dir(params)

            from selfcal.pipeline.common import sweep_if_sole_writer

            with write_guard(params.root, label=f"selfcal {' '.join(argv if argv is not None else sys.argv[1:])}") as h:
                sweep_if_sole_writer(params, h)
                _dispatch(args, params, progress)
            return
        _dispatch(args, params, progress)

    return run_cli(go)


if __name__ == "__main__":
    sys.exit(main())
