"""Step 1: sample (or read) one calibration set for one (source, seed)."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

from selfcal import faults, textdata
from selfcal.calibration import corpus, sources
from selfcal.calibration.calibset import save_calibration_set
from selfcal.config import Params
from selfcal.errors import ConfigError
from selfcal.lineage import tags as T
from selfcal.lineage.registry import log_calibration
from selfcal.lineage.tracking import stage_run
from selfcal.modelio import ModelRef, context_window, fingerprint, load_model, load_tokenizer, pick_device
from selfcal.paths import resolve_path
from selfcal.pipeline import layout
from selfcal.pipeline.common import base_model, check_context, check_seed, check_source
from selfcal.records import CalibrationManifest

log = logging.getLogger("selfcal.generate")


@dataclass(frozen=True)
class GeneratePlan:
    spec: object  # the source's params section
    ref: ModelRef
    config: dict


# The widest array a set is held in while it is made: the vocabulary source draws int64 indices (the self
# generator and the corpus windows hold int32; a saved set is int32).
SET_BYTES_PER_TOKEN = 8


def _gib(n: float) -> str:
    n /= 2**30
    for unit in ("GiB", "TiB"):
        if n < 1024:
            return f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} PiB"


def check_set_fits(params: Params, memory: int | None = None) -> None:
    """Each source's set must fit this machine's memory: ``n_samples: 10000000000`` passed ``check`` and died in
    numpy's allocator with a traceback, after the model had loaded (generator.py allocates the whole set)."""
    import psutil

    cal = params.calibration
    memory = psutil.virtual_memory().total if memory is None else memory
    for name, spec in cal.sources.items():
        n = cal.samples_for(name)
        need = n * cal.seq_len * SET_BYTES_PER_TOKEN
        if need > memory:
            key = f"calibration.sources.{name}.n_samples" if spec.n_samples else "calibration.n_samples"
            raise ConfigError(
                f"{key}: a set of {n} x {cal.seq_len} tokens takes {_gib(need)} in memory while it is made, more "
                f"than this machine's {_gib(memory)}"
            )


def check_sources(config: dict, params: Params) -> None:
    """What a source generates must fit this machine's memory and the model's context (Ji et al.: prompt +
    max_new_tokens)."""
    check_set_fits(params)
    window = context_window(config)
    seq_len = params.calibration.seq_len
    for name, spec in params.calibration.sources.items():
        if spec.kind != "ji":
            continue
        if window is not None and spec.prompt_tokens + spec.max_new_tokens > window:
            raise ConfigError(
                f"calibration.sources.{name}.max_new_tokens: {spec.prompt_tokens} prompt + "
                f"{spec.max_new_tokens} new tokens "
                f"exceed the model's context window of {window} tokens"
            )
        kept = sources.most_kept(spec.pool_size, spec.drop_fraction)
        if kept == 0:
            raise ConfigError(
                f"calibration.sources.{name}.pool_size: a pool of {spec.pool_size} keeps no text (the filter keeps "
                f"those strictly below the {100 * (1 - spec.drop_fraction):g}th perplexity percentile); give a "
                "larger pool_size or drop_fraction 0"
            )
        # each kept text is at most its prompt and new tokens, and one more where texts are joined with a space
        most = kept * (spec.prompt_tokens + spec.max_new_tokens + 1)
        if most < seq_len + 1:
            raise ConfigError(
                f"calibration.sources.{name}.pool_size: at most {kept} kept texts of at most "
                f"{spec.prompt_tokens} + {spec.max_new_tokens} tokens give at most {most} tokens, too few for a "
                f"window of calibration.seq_len {seq_len}; give a larger pool_size or max_new_tokens"
            )


def preflight(params: Params, source: str, seed: int, *, count_windows: bool = False) -> GeneratePlan:
    """Everything generate checks before a model loads (``selfcal check`` runs it for every item, with
    ``count_windows``: a local corpus is tokenized, once per process, to know it can give this seed's set)."""
    cal = params.calibration
    check_source(params, source)
    check_seed(params, seed)
    ref, config = base_model(params)
    check_context(config, cal.seq_len, "calibration.seq_len")
    check_sources(config, params)
    spec = cal.sources[source]
    if count_windows and spec.kind == "corpus":
        tokens = _corpus_tokens(params, source, ref)
        if tokens is not None:
            corpus.check_windows(
                textdata.window_count(tokens, cal.seq_len, spec.window_stride),
                cal.samples_for(source),
                seed,
                allow_overlap=spec.allow_overlap,
                name=f"calibration.sources.{source}",
                seq_len=cal.seq_len,
            )
    return GeneratePlan(spec=spec, ref=ref, config=config)


def _corpus_tokens(params: Params, source: str, ref: ModelRef) -> int | None:
    spec = params.calibration.sources[source]

    def count() -> int | None:
        tokenizer = load_tokenizer(ref, trust_remote_code=params.model.trust_remote_code)
        return sources.corpus_tokens(spec, root=params.root, name=source, tokenizer=tokenizer)

    return textdata.cached_token_count(
        resolve_path(spec.path, params.root), (spec.text_field, str(ref.local_dir)), count
    )


def generate(params: Params, source: str, seed: int, *, progress: bool = True) -> CalibrationManifest:
    cal = params.calibration
    planned = preflight(params, source, seed)
    spec, ref = planned.spec, planned.ref
    device = pick_device(params.model.device)
    out = layout.calibration_dir(params, source, seed)
    item = layout.calib_name(source, seed)
    source_impl = sources.get(spec.kind)
    with stage_run(params, "generate", item) as run:
        model = None
        if source_impl.needs_model:
            log.info("loading %s on %s", ref.name, device)
            model = load_model(
                ref, dtype=params.model.dtype, device=device, trust_remote_code=params.model.trust_remote_code
            )
        faults.point("generate:after-load")
        tokenizer = load_tokenizer(ref, trust_remote_code=params.model.trust_remote_code)
        n = cal.samples_for(source)
        log.info("%s (%s): %d x %d tokens, seed %d", source, spec.kind, n, cal.seq_len, seed)
        t0 = time.perf_counter()
        request = sources.SourceRequest(
            n=n,
            seq_len=cal.seq_len,
            seed=seed,
            batch_size=cal.batch_size,
            root=params.root,
            name=source,
            progress=progress,
        )
        result = source_impl.build(spec, request, model=model, tokenizer=tokenizer)
        faults.point("generate:after-sampling")
        source_params = spec.record()
        identity = {
            "source": source,
            "source_params": source_params,
            "source_version": source_impl.version,
            "seed": seed,
            "n_samples": n,
            "seq_len": cal.seq_len,
            # The base model whose tokenizer (and, for generated sources, weights) made the set.
            "model": fingerprint(ref),
        }
        manifest = _unchanged(out, result.tokens, identity)
        if manifest is not None:
            log.info(
                "%s already holds this very set (content digest %s, written %s): left as it was",
                out,
                manifest.content_digest[:16],
                manifest.created_utc,
            )
        else:
            manifest = save_calibration_set(
                out,
                result.tokens,
                tokenizer.batch_decode(result.tokens.tolist()),  # only for a set that is written
                **identity,
                device=device if model is not None else None,
                provenance=result.provenance,
                wall_seconds=round(time.perf_counter() - t0, 3),
            )
            log.info("wrote %s (content digest %s)", out, manifest.content_digest[:16])
        run.params(
            {
                "source": source,
                "seed": seed,
                "n_samples": n,
                "seq_len": cal.seq_len,
                "source_params": source_params,
                "model": ref.name,
            }
        )
        run.tags(
            {
                T.CALIBRATION_DIGEST: manifest.content_digest,
                T.BASE_DIGEST: manifest.model.digest,
                T.GENERATOR_USES_WEIGHTS: str(source_impl.needs_model).lower(),
            }
        )
        faults.point("generate:before-log")
        log_calibration(run, item, out, manifest.content_digest, context="generated")
        numeric = {k: v for k, v in result.provenance.items() if isinstance(v, (int, float))}
        run.metrics(numeric)
        run.artifact(out / "manifest.json", "calibration")
    return manifest


def _unchanged(out, tokens, identity: dict) -> CalibrationManifest | None:
    """The set already in ``out`` when it is this one (the same tokens, source, params, seed and base model),
    else None. Kept, not rewritten: a second ``selfcal generate`` of one item only changed the manifest's run
    facts, and every model registered from the set then failed ``selfcal verify`` (its pinned manifest sha256
    gone, with no DVC cache to find it in). Under ``dvc repro`` the folder is gone before the stage runs."""
    from selfcal.calibration.calibset import load_calibration_set
    from selfcal.errors import SelfcalError
    from selfcal.hashing import sha256_tokens

    if not (out / "manifest.json").is_file():
        return None
    try:
        existing = load_calibration_set(out).manifest  # its tokens checked against its content digest
    except (SelfcalError, OSError, ValueError):
        return None
    if existing.content_digest != sha256_tokens(tokens):
        return None
    return existing if all(getattr(existing, k) == v for k, v in identity.items()) else None
