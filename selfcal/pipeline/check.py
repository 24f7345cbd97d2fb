"""``selfcal check``: everything about the params that can fail a stage, found without compute.

Passing it means ``dvc repro`` will not fail on params: the schema, the model, the context
window, the tokenizer-dependent settings, each method's static layer plan, and every params
key dvc.yaml's stages read (DVC refuses a stage whose params key is missing from the file).
"""

from __future__ import annotations

import itertools
import math
import re
from pathlib import Path

import yaml

from selfcal.config import Params
from selfcal.errors import ConfigError

_INTERP = re.compile(r"\$\{\s*([^}]+?)\s*\}")


def _lookup(data: object, dotted: str) -> tuple[bool, object]:
    node = data
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            return False, None
        node = node[part]
    return True, node


def _matrix_items(matrix: dict, raw: dict) -> list[dict]:
    axes = {}
    for key, spec in matrix.items():
        values = spec
        if isinstance(spec, str) and (m := _INTERP.fullmatch(spec.strip())):
            found, values = _lookup(raw, m.group(1))
            values = (list(values) if isinstance(values, (dict, list)) else []) if found else []
        axes[key] = list(values) if isinstance(values, (list, dict)) else [values]
    return [dict(zip(axes, combo, strict=True)) for combo in itertools.product(*axes.values())]


def dvc_param_keys(dvc_yaml: Path, raw: dict) -> list[tuple[str, str]]:
    """(stage, dotted params key) for every params entry of dvc.yaml, matrices expanded."""
    spec = yaml.safe_load(dvc_yaml.read_text()) or {}
    out: list[tuple[str, str]] = []
    for stage, body in (spec.get("stages") or {}).items():
        items = _matrix_items(body["matrix"], raw) if isinstance(body.get("matrix"), dict) else [{}]
        for entry in body.get("params") or []:
            if isinstance(entry, dict):  # {other.yaml: [keys]}: another file, not ours
                continue
            for item in items:
                key = _INTERP.sub(
                    lambda m, item=item: str(item.get(m.group(1).removeprefix("item."), m.group(0))), str(entry)
                )
                if "${" not in key:
                    out.append((stage, key))
    return list(dict.fromkeys(out))


def dvc_interpolations(dvc_yaml: Path) -> list[tuple[str, str]]:
    """(stage, dotted params key) for every ``${...}`` dvc.yaml interpolates from params (its outs, deps, cmd,
    matrices), the matrix item's own ``${item.*}`` / ``${key}`` aside."""
    spec = yaml.safe_load(dvc_yaml.read_text()) or {}
    out: list[tuple[str, str]] = []

    def walk(stage: str, node: object) -> None:
        if isinstance(node, dict):
            for k, v in node.items():
                if k != "params":  # params entries: dvc_param_keys, matrices expanded
                    walk(stage, k)
                    walk(stage, v)
        elif isinstance(node, list):
            for v in node:
                walk(stage, v)
        elif isinstance(node, str):
            for m in _INTERP.finditer(node):
                key = m.group(1)
                if not (key.startswith("item.") or key in ("item", "key")):
                    out.append((stage, key))

    for stage, body in (spec.get("stages") or {}).items():
        walk(stage, body)
    return list(dict.fromkeys(out))


def check_dvc_params(params_file: Path, dvc_yaml: Path, raw: dict | None = None) -> None:
    """Every params key a DVC stage reads or interpolates is spelt out in the params file: DVC does not know
    the schema's defaults and fails with "Parameters '...' are missing from 'params.yaml'" (a params entry)
    or "Could not find 'paths.artifacts'" (an interpolated path). ``raw``: the file's data, if read already."""
    if raw is None:
        raw = yaml.safe_load(params_file.read_text()) or {}
    interpolated = dvc_interpolations(dvc_yaml)
    keys = dvc_param_keys(dvc_yaml, raw) + interpolated
    for stage, key in keys:
        found, _ = _lookup(raw, key)
        if not found:
            raise ConfigError(
                f"{params_file.name}: {key}: dvc.yaml's stage '{stage}' reads it, but it is not set in the file "
                f"(DVC would stop with \"Parameters '{key}' are missing\" or \"Could not find '{key}'\"); write "
                f"the section out (`{{}}` takes the defaults)"
            )
    check_dvc_reads_alike(params_file, raw, keys, interpolated={k for _, k in interpolated})
    check_artifacts_in_repo(params_file, raw, dvc_yaml.parent)


#: YAML 1.1's booleans (PyYAML reads them as True/False; YAML 1.2 only true/false)
_YAML11_BOOLS = {
    w: w.lower() in ("y", "yes", "true", "on")
    for w in "y Y yes Yes YES n N no No NO true True TRUE false False FALSE on On ON off Off OFF".split()
}


def _as_used(value: object) -> object:
    """What a scalar is to the schema, which coerces a number written as text (PyYAML reads ``1e-3`` as a
    string, YAML 1.2 as 0.001: both are 0.001 to a float field) and YAML 1.1's yes/no."""
    if isinstance(value, str):
        if value in _YAML11_BOOLS:
            return _YAML11_BOOLS[value]
        try:
            return float(value)
        except ValueError:
            return value
    return float(value) if isinstance(value, int) and not isinstance(value, bool) else value


def _first_difference(key: str, ours: object, theirs: object, *, as_text: bool) -> tuple[str, object, object] | None:
    """The first leaf where two readings of one value differ. ``as_text``: the value is interpolated into a path,
    a command or a matrix item's name, where its spelling counts (``1e3`` is not ``1000.0``, ``True`` not ``1``);
    else it is a params value, as the schema takes it (``1e-3`` is 0.001)."""
    if isinstance(ours, dict) and isinstance(theirs, dict) and list(ours) == list(theirs):
        return next(
            (d for k in ours if (d := _first_difference(f"{key}.{k}", ours[k], theirs[k], as_text=as_text))), None
        )
    if isinstance(ours, list) and isinstance(theirs, list) and len(ours) == len(theirs):
        pairs = enumerate(zip(ours, theirs, strict=True))
        return next((d for i, (a, b) in pairs if (d := _first_difference(f"{key}[{i}]", a, b, as_text=as_text))), None)

    def alike(a: object, b: object) -> bool:  # .nan is .nan to both readers
        return type(a) is type(b) and (a == b or (isinstance(a, float) and math.isnan(a) and math.isnan(b)))

    same = alike(ours, theirs) or (not as_text and alike(_as_used(ours), _as_used(theirs)))
    return None if same else (key, ours, theirs)


def check_dvc_reads_alike(params_file: Path, raw: dict, keys: list[tuple[str, str]], interpolated: set[str]) -> None:
    """Every value DVC reads from the params file reads the same to DVC as to selfcal. selfcal reads YAML 1.1
    (PyYAML), DVC YAML 1.2 (ruamel, ``dvc.utils.serialize.parse_yaml``): ``seeds: [0, 010]`` is [0, 8] to
    selfcal and [0, 10] to DVC, whose matrix then made ``*-10`` items that every stage refused;
    ``paths.artifacts: 1e3`` put DVC's outputs under ``1000.0/``; and where the two agree only on the hash,
    dvc.lock would record a value the stages did not use (``limit: 0200``: 128 to selfcal, 200 in dvc.lock).
    ``interpolated``: the keys whose spelling counts (see ``_first_difference``)."""
    from dvc.utils.serialize import parse_yaml

    try:
        theirs_all = parse_yaml(params_file.read_text(), str(params_file))
    except Exception as exc:  # DVC's reader refuses what PyYAML took: DVC would stop on it
        first = str(exc.__cause__ or exc).strip().splitlines()[0]
        raise ConfigError(f"{params_file.name}: DVC's YAML reader (ruamel) refuses the file: {first}") from exc
    for stage, key in keys:
        (_, ours), (_, theirs) = _lookup(raw, key), _lookup(theirs_all, key)
        if diff := _first_difference(key, ours, theirs, as_text=key in interpolated):
            where, a, b = diff
            raise ConfigError(
                f"{params_file.name}: {where}: selfcal reads {a!r} (YAML 1.1) and DVC reads {b!r} (YAML 1.2; "
                f"dvc.yaml's stage '{stage}' uses it): write it so both read it alike (no leading zeros on a "
                "number; quote a string that looks like a number, date or yes/no)"
            )


def check_artifacts_in_repo(params_file: Path, raw: dict, repo: Path) -> None:
    """DVC 3 saves no output outside its repository ("Saving cached external output ... is not supported since
    DVC 3.0"): ``paths.artifacts: ../outside`` passed and ``dvc repro`` failed after the first set was made."""
    found, value = _lookup(raw, "paths.artifacts")
    if not found or not isinstance(value, str):
        return
    where = (repo / Path(value).expanduser()).resolve()
    if not where.is_relative_to(repo.resolve()):
        raise ConfigError(
            f"{params_file.name}: paths.artifacts: {where} is outside the DVC repository {repo.resolve()}, and "
            "DVC 3 saves no outputs outside it; give a folder inside it (or run the stages with `selfcal`, "
            "not `dvc repro`)"
        )


def check_tokenizer_settings(params: Params, tokenizer) -> None:
    from selfcal.calibration.sources import first_token_candidates

    for name, spec in params.calibration.sources.items():
        words = getattr(spec, "first_token_words", None)
        if words:
            _, bad = first_token_candidates(words, tokenizer)
            if bad:
                raise ConfigError(
                    f"calibration.sources.{name}.first_token_words: not a single token after BOS with "
                    f"this tokenizer: {bad}"
                )


#: Keys of a corpus or perplexity section that only a hub dataset reads (textdata._read_hub)
HUB_ONLY = ("hub_config", "hub_split", "max_documents")


def check_local_files(params: Params) -> None:
    """Every local text file the stages will read exists and reads as text (corpus and Ji sources,
    the diagnostics reference, the perplexity sets): read now, not after an hour of generation."""
    from selfcal import textdata
    from selfcal.paths import LOCAL_PREFIXES

    wanted: list[tuple[str, str, str]] = []
    hub_only: dict[str, list[str]] = {}  # path key -> the hub-only keys its section sets
    for name, spec in params.calibration.sources.items():
        for attr in ("path", "prompt_path"):
            if getattr(spec, attr, None):
                wanted.append((f"calibration.sources.{name}.{attr}", getattr(spec, attr), spec.text_field))
                hub_only[wanted[-1][0]] = sorted(set(HUB_ONLY) & spec.model_fields_set)
    diag = params.calibration.diagnostics
    if diag.reference_path:
        wanted.append(("calibration.diagnostics.reference_path", diag.reference_path, diag.reference_text_field))
    for name, ppl in params.evaluation.perplexity.items():
        wanted.append((f"evaluation.perplexity.{name}.path", ppl.path, ppl.text_field))
        hub_only[wanted[-1][0]] = sorted(set(HUB_ONLY) & ppl.model_fields_set)
    from selfcal.hub import unreachable_reason

    for key, value, field in wanted:
        is_local = params.resolve(value).exists() or value.startswith(LOCAL_PREFIXES)
        if hub_only.get(key) and is_local:
            # a hub dataset's config, split and streamed-document cap; a local file is read whole (an audit's
            # max_documents: 1 on the local C4 made the same set as without it)
            raise ConfigError(
                f"{key.rsplit('.', 1)[0]}.{hub_only[key][0]}: applies to a hub dataset only, and {value!r} is a "
                "local file, read whole: remove the key"
            )
        if is_local:
            textdata.read_documents(value, root=params.root, text_field=field, key=key)
        elif reason := unreachable_reason():
            raise ConfigError(
                f"{key}: {value!r} is not a local file and the Hugging Face hub is unreachable ({reason})"
            )
    if params.evaluation.tasks and params.evaluation.data_dir is None and (reason := unreachable_reason()):
        raise ConfigError(
            f"evaluation.data_dir: null reads {', '.join(params.evaluation.tasks)} from the Hugging Face hub, "
            f"which is unreachable ({reason}); point data_dir at local task copies (../shared/data)"
        )


def check_tracking_uri(params: Params) -> None:
    """The store URI the stages will log to is one MLflow has a store for (``htp://`` passed, then every stage
    died in MLflow with its own exception). The scheme only: whether the server answers is the stage's
    business (a coordinator may check params on a box that cannot reach the workers' store)."""
    from selfcal.lineage.tracking import check_store_uri, configured_uri

    if params.tracking.enabled and (configured := configured_uri(params)) is not None:
        check_store_uri(*configured)  # none set: a sqlite file under paths.state


def every_item(params: Params) -> int:
    """Each stage item's own static plan (what the stage checks before a model loads); returns how many."""
    from selfcal.pipeline import compress, evaluate, generate, inspect, layout

    inspect.preflight(params)
    n = 0
    for source, seed in layout.calibration_names(params):
        generate.preflight(params, source, seed, count_windows=True)
        n += 1
        for method in params.compression.methods:
            compress.preflight(params, source, seed, method)
            n += 1
    evaluate.preflight(params, count_windows=True)
    return n + 1


def check(params: Params, params_file: Path) -> str:
    """Run every static check; return the one-line summary ``selfcal check`` prints."""
    from selfcal.modelio import load_tokenizer, pick_device
    from selfcal.pipeline.common import base_model, check_artifacts_dir

    check_artifacts_dir(params)
    check_tracking_uri(params)
    ref, _ = base_model(params)
    check_local_files(params)
    every_item(params)
    if any(getattr(s, "first_token_words", None) for s in params.calibration.sources.values()):
        check_tokenizer_settings(params, load_tokenizer(ref, trust_remote_code=params.model.trust_remote_code))
    dvc_yaml = params_file.resolve().parent / "dvc.yaml"
    if dvc_yaml.is_file():
        check_dvc_params(params_file, dvc_yaml)
    summary = f"ok: params valid; model {ref.name} -> {ref.local_dir}"
    if params.model.device == "cuda" and pick_device("auto") != "cuda":
        # not refused: check may run on a coordinator without the GPU workers' CUDA; the guard stage, which runs
        # where the stages do, refuses it
        summary += "; note: model.device is cuda and this machine has no CUDA device: run the stages where one is"
    if params.model.trust_remote_code:
        # Said once here, and recorded as a tag on every stage run (lineage), never silently.
        summary += "; WARNING: model.trust_remote_code is true: the model folder's own Python code will run"
    return summary
