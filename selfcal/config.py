"""Typed, validated pipeline parameters, loaded once from ``params.yaml``.

Every stage validates the whole file before it does any work, so a typo in a key
that only a later stage reads still fails the first stage, not the third one an
hour later. Errors are flattened to one line that names the offending key.
"""

from __future__ import annotations

import difflib
import functools
import os
import re
import types
from pathlib import Path
from typing import Annotated, Any, Literal, Union, get_args, get_origin

import yaml
from pydantic import BaseModel, Field, ValidationError, create_model, field_validator

from selfcal.compression.methods import METHODS
from selfcal.errors import ConfigError
from selfcal.paths import resolve_path
from selfcal.schema import Strict

DEFAULT_PARAMS = Path("params.yaml")
# Names that become folder names and CLI words: no leading "-" (an option), no "." or "/".
SAFE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]*")
# A source name YAML 1.2 (DVC's ruamel) reads as a number, though PyYAML (1.1) reads a string: DVC's matrix
# would name its items after the number (1e3 -> 1000.0), and `dvc repro` would drop them without a word.
NUMERIC_NAME = re.compile(r"[-+]?(\d[\d_]*(\.\d*)?([eE][-+]?\d+)?|0[xX][0-9a-fA-F_]+|0[oO][0-7_]+|0[bB][01_]+)")
PARAMS_ENV = "SELFCAL_PARAMS"
REGISTERED_NAME_FIELDS = ("base", "method", "source", "seed")


class ModelConfig(Strict):
    # A hub id ("HuggingFaceTB/SmolLM2-135M") or a local directory; relative paths
    # are resolved against the directory holding params.yaml.
    path: str
    revision: str | None = None
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    device: Literal["auto", "cpu", "cuda"] = "auto"
    trust_remote_code: bool = False


class SourceBase(Strict):
    """What every calibration source has: its own set size, for a set-size sweep run as one profile (one source
    per n, so the points are items of one run: concurrent on the GPU, chunked with ``--only``, each model
    registered), instead of one DVC experiment per n whose items run one at a time."""

    n_samples: int | None = Field(None, ge=1)  # None: calibration.n_samples

    def record(self) -> dict:
        """The params recorded with a set (its manifest's ``source_params``): an unset ``n_samples`` is left out,
        so a set made before this field existed keeps its manifest and digest."""
        out = self.model_dump()
        if out.get("n_samples") is None:
            out.pop("n_samples", None)
        return out


#: The smallest temperature a sampler is given. Below it sampling is greedy in all but name, and a tiny one
#: overflows: logits / 1e-45 are inf in float32, softmax of them NaN, and the inverse CDF then picks the
#: vocabulary's last id at every step (an audit's set of 1e-45 was token 511 throughout).
MIN_TEMPERATURE = 1e-3


def sampling_temperature(t: float, *, greedy: bool) -> float:
    if t == 0.0 and greedy:
        return t
    if t < MIN_TEMPERATURE:
        raise ValueError(
            f"{t:g} is below {MIN_TEMPERATURE:g}: sampling there is greedy in all but name, and as t nears 0 "
            f"logits / t overflow float32{'; use 0 for greedy' if greedy else ''}"
        )
    return t


class SelfSourceConfig(SourceBase):
    """The paper's self-calibration: BOS-only prompt, ancestral sampling, linear temperature."""

    kind: Literal["self"]
    t_initial: float = Field(1.0, ge=0.0, le=10.0, allow_inf_nan=False)
    t_final: float = Field(1.0, ge=0.0, le=10.0, allow_inf_nan=False)
    schedule_steps: int = Field(10, ge=0)
    top_k: int | None = Field(None, ge=1)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    # For multilingual models the paper constrains the first generated token to English
    # stop words; list the words here (their first token is allowed), or leave empty.
    first_token_words: list[str] = Field(default_factory=list)

    @field_validator("t_initial", "t_final")
    @classmethod
    def _greedy_or_sampled(cls, t: float) -> float:
        return sampling_temperature(t, greedy=True)


class CorpusSourceConfig(SourceBase):
    """Windows of real text: C4, WikiText, Cosmopedia, ... from a local file or the hub."""

    kind: Literal["corpus"]
    # A local .jsonl/.json/.txt/.parquet file or a directory of them, or a hub dataset id.
    path: str
    text_field: str = "text"
    hub_config: str | None = None
    hub_split: str = "train"
    max_documents: int = Field(100_000, ge=1)  # hub streaming only
    # Sets for different seeds take disjoint blocks of windows. When the corpus is too
    # small for that, refuse unless overlap between seeds is explicitly allowed.
    allow_overlap: bool = False
    # Tokens between window starts; null = seq_len (disjoint windows). Smaller: overlapping windows, for a corpus
    # with fewer than n windows of seq_len (the Cosmopedia stand-in: 124 windows of 2048 for sets of 128).
    window_stride: int | None = Field(None, ge=1)


class VocabSourceConfig(SourceBase):
    """Uniformly random tokens from the tokenizer's non-special vocabulary."""

    kind: Literal["vocab"]


class JiSourceConfig(SourceBase):
    """Ji et al.'s self-generating synthesis (arXiv 2410.17711, github.com/Dereck0602/calibration_data):
    prompts are the first ``prompt_tokens`` token ids of real texts (the tokenizer's BOS included,
    where it adds one), sampled until EOS; the most perplexing ``drop_fraction`` of the pool is
    dropped and the rest, joined with spaces, is cut into random windows."""

    kind: Literal["ji"]
    prompt_path: str  # corpus whose texts give the prompts (Wikipedia in the paper)
    text_field: str = "text"
    prompt_tokens: int = Field(2, ge=1)  # generate_data.py: input_ids[:2]
    temperature: float = Field(0.6, gt=0.0, allow_inf_nan=False)
    top_p: float = Field(0.95, gt=0.0, le=1.0)
    top_k: int = Field(50, ge=1)
    repetition_penalty: float = Field(1.2, ge=1.0)
    max_new_tokens: int = Field(2048, ge=1)  # generate_data.py: max_new_tokens=2048
    pool_size: int = Field(5000, ge=1)  # generations before filtering (their wikipedia_5k.json)
    drop_fraction: float = Field(0.2, ge=0.0, lt=1.0)  # sample_ppl.py: keep ppl < 80th percentile

    @field_validator("temperature")
    @classmethod
    def _sampled(cls, t: float) -> float:
        return sampling_temperature(t, greedy=False)


SourceConfig = Annotated[
    SelfSourceConfig | CorpusSourceConfig | VocabSourceConfig | JiSourceConfig, Field(discriminator="kind")
]


class DiagnosticsConfig(Strict):
    # Real text whose layer-input statistics the sets are compared with (n x seq_len
    # windows of it, block 0); None skips the activation distance.
    reference_path: str | None = None
    reference_text_field: str = "text"
    batch_size: int = Field(8, ge=1)
    # Cut the reference every this many tokens (overlapping windows when < seq_len), for a reference
    # shorter than n x seq_len tokens; None: back-to-back windows. `selfcal check` counts them.
    window_stride: int | None = Field(None, ge=1)


class CalibrationConfig(Strict):
    n_samples: int = Field(128, ge=1)
    seq_len: int = Field(2048, ge=2)
    # strict: YAML's true/false are not seeds; a seed is a non-negative integer.
    seeds: list[Annotated[int, Field(strict=True, ge=0)]] = Field(default_factory=lambda: [0], min_length=1)
    # Rows generated at once; "auto": as many as free device memory holds (64 on CPU).
    batch_size: Annotated[int, Field(ge=1)] | Literal["auto"] = "auto"
    sources: dict[str, SourceConfig] = Field(min_length=1)
    diagnostics: DiagnosticsConfig = DiagnosticsConfig()

    def samples_for(self, source: str) -> int:
        """Sequences in ``source``'s sets: its own ``n_samples``, else the global one."""
        return self.sources[source].n_samples or self.n_samples

    @field_validator("sources", mode="before")
    @classmethod
    def _names_are_strings(cls, sources: object) -> object:
        """``on:`` is True to PyYAML, ``null:`` None, ``2024-01-01:`` a date: the error said
        ``calibration.sources.1: Input should be a valid string``, naming a key nobody wrote."""
        for name in sources if isinstance(sources, dict) else ():
            if not isinstance(name, str):
                what = "null" if name is None else f"{type(name).__name__} {name}"
                raise ValueError(
                    f"a source name reads as {what} in YAML, not as a name (unquoted "
                    "on/off/yes/no, null, numbers and dates are values): give it a letter-led name"
                )
        return sources

    @field_validator("sources")
    @classmethod
    def _names_are_path_safe(cls, sources: dict[str, SourceConfig]) -> dict[str, SourceConfig]:
        for name in sources:
            if not SAFE_NAME.fullmatch(name):
                raise ValueError(
                    f"source name {name!r} must start with a letter or digit, then letters, digits, '-' or '_'"
                )
            if NUMERIC_NAME.fullmatch(name):
                raise ValueError(f"source name {name!r} reads as a number in DVC's YAML; give it a letter")
        return sources

    @field_validator("seeds")
    @classmethod
    def _unique_seeds(cls, seeds: list[int]) -> list[int]:
        if len(set(seeds)) != len(seeds):
            raise ValueError(f"seeds must be unique, got {seeds}")
        return seeds


class CompressionBase(Strict):
    """``methods`` plus one section per registered method (added by ``compression_model``)."""

    methods: list[str] = Field(default_factory=lambda: ["gptq"], min_length=1)

    @field_validator("methods")
    @classmethod
    def _known_methods(cls, methods: list[str]) -> list[str]:
        return METHODS.check(methods)

    def section(self, method: str):
        return getattr(self, method)


@functools.cache
def _compression_model(names: tuple[str, ...]) -> type[CompressionBase]:
    fields = {name: (METHODS.get(name).Config, Field(default_factory=METHODS.get(name).Config)) for name in names}
    return create_model("CompressionConfig", __base__=CompressionBase, **fields)


def compression_model() -> type[CompressionBase]:
    """The ``compression`` section's schema, assembled from the method registry: a section per method."""
    return _compression_model(tuple(METHODS.names()))


def CompressionConfig(**values) -> CompressionBase:  # noqa: N802 - reads as the class it builds
    """A validated ``compression`` section (defaults for every method not given)."""
    return compression_model()(**values)


class PerplexityConfig(Strict):
    # A .txt file is scored as one string (GPTQ's WikiText-2 protocol); any other corpus
    # (.jsonl/.json/.parquet, a folder, or a hub dataset id) is its documents joined by
    # blank lines, as GPTQ's C4 validation perplexity joins them.
    path: str
    text_field: str = "text"
    hub_config: str | None = None
    hub_split: str = "validation"
    max_documents: int = Field(100_000, ge=1)
    # Non-overlapping windows of this many tokens (the GPTQ/SparseGPT protocol);
    # None means the model's context window, capped at 2048.
    seq_len: int | None = Field(None, ge=2)
    max_windows: int | None = Field(None, ge=1)


class EvaluationConfig(Strict):
    tasks: list[str] = Field(default_factory=lambda: ["arc_easy"])
    # Local copies of the task data (see selfcal.evaluation.tasks); None = the hub.
    data_dir: str | None = None
    limit: int | None = Field(None, ge=1)
    # "auto": lm-eval's largest-batch search on a GPU, a fixed 16 on CPU (see harness).
    batch_size: Annotated[int, Field(ge=1)] | Literal["auto"] = "auto"
    # "fast": lm-eval's requests prepared once per tokenizer, scored in token-budget batches on the device,
    # aggregated as lm-eval does (selfcal.evaluation.fast); "lm-eval": lm-eval's own HFLM, batch_size above.
    engine: Literal["fast", "lm-eval"] = "fast"
    # The fast engine's tokens per forward pass; "auto": 131072 on a GPU (halved on out-of-memory), 4096 on CPU.
    batch_tokens: Annotated[int, Field(ge=16)] | Literal["auto"] = "auto"
    # Named perplexity sets, e.g. {wikitext2: {...}, c4: {...}}; each is a metric.
    perplexity: dict[str, PerplexityConfig] = Field(default_factory=dict)

    @field_validator("tasks")
    @classmethod
    def _known_tasks(cls, tasks: list[str]) -> list[str]:
        from selfcal.evaluation.tasks import TASKS

        return TASKS.check(tasks)


class TrackingConfig(Strict):
    enabled: bool = True
    experiment: str = "selfcal"
    # None: $MLFLOW_TRACKING_URI if set, else a sqlite file under `paths.state`.
    tracking_uri: str | None = None
    # Registry name of each checkpoint; seeds (and re-runs) become its versions.
    registered_model_name: str = "{base}-{method}-{source}"

    @field_validator("experiment")
    @classmethod
    def _named(cls, name: str) -> str:
        if not name.strip():  # MLflow refuses it, but only once a stage opens its run
            raise ValueError("must not be empty: MLflow files every run under an experiment's name")
        return name

    @field_validator("registered_model_name")
    @classmethod
    def _known_fields(cls, template: str) -> str:
        import string

        try:
            fields = {f for _, f, _, _ in string.Formatter().parse(template) if f is not None}
        except ValueError as err:
            raise ValueError(f"not a valid template: {err}") from None
        unknown = sorted(fields - set(REGISTERED_NAME_FIELDS))
        if unknown:
            raise ValueError(
                f"unknown field {{{unknown[0]}}}; use {', '.join('{' + f + '}' for f in REGISTERED_NAME_FIELDS)}"
            )
        return template


class PathsConfig(Strict):
    artifacts: str = "artifacts"
    state: str = ".selfcal"


class Params(Strict):
    model: ModelConfig
    calibration: CalibrationConfig
    compression: CompressionBase = Field(default_factory=CompressionConfig)
    evaluation: EvaluationConfig = EvaluationConfig()
    tracking: TrackingConfig = TrackingConfig()
    paths: PathsConfig = PathsConfig()
    # Directory params.yaml was read from; relative paths in it are resolved from here.
    root: Path = Field(default=Path("."), exclude=True)

    def resolve(self, path: str | os.PathLike[str]) -> Path:
        return resolve_path(path, self.root)

    @property
    def artifacts_dir(self) -> Path:
        return self.resolve(self.paths.artifacts)

    @property
    def state_dir(self) -> Path:
        return self.resolve(self.paths.state)


#: The labels pydantic puts in an error's location for the member of a union that failed (``int | 'auto'``
#: gives ``constrained-int`` and ``literal['auto']``): no key the user wrote
_UNION_MEMBER = re.compile(
    r"^(constrained-)?(int|float|str|bool|none|list\[.*\]|dict\[.*\]|literal\[.*\]|"
    r"function-(after|before|wrap|plain)\[.*\]|lax-or-strict\[.*\]|json-or-python\[.*\])$"
)


def _error_key(loc: tuple) -> str:
    parts = [str(p) for p in loc]
    # A discriminated union adds the matched tag after the source name
    # (calibration.sources.NAME.self.key); the user never wrote it.
    if len(parts) > 3 and parts[:2] == ["calibration", "sources"]:
        del parts[3]
    return ".".join(p for p in parts if not _UNION_MEMBER.match(p))


def _discriminator(err: dict) -> str:
    """The tag key of a union_tag_invalid error (``kind``), as the user wrote it (pydantic quotes it)."""
    return str(err.get("ctx", {}).get("discriminator", "kind")).strip("'")


def _error_message(err: dict) -> str:
    if err["type"] == "extra_forbidden":
        return "unknown key"
    if err["type"] == "missing":
        return "required key is missing"
    if err["type"] == "union_tag_invalid":  # calibration.sources.NAME.kind
        ctx = err.get("ctx", {})
        return f"unknown {_discriminator(err)} {ctx.get('tag')!r}; known: {ctx.get('expected_tags')}"
    if err["type"] == "union_tag_not_found":  # a source without its kind: pydantic's "Unable to extract tag"
        known = ", ".join(repr(t) for m in _members(SourceConfig) if (t := _tag(m)))
        return f"required key is missing; known: {known}"
    return err["msg"].removeprefix("Value error, ")


def _members(annotation) -> list:
    """The types an annotation may hold: the members of a union, the type inside ``Annotated``."""
    origin = get_origin(annotation)
    if origin is Annotated:
        return _members(get_args(annotation)[0])
    if origin in (Union, types.UnionType):
        return [m for a in get_args(annotation) for m in _members(a)]
    return [annotation]


def _tag(model: type) -> str | None:
    """A tagged union member's tag (``kind: Literal['self']`` gives ``self``), as pydantic puts it in a location."""
    field = model.model_fields.get("kind")
    args = get_args(field.annotation) if field is not None else ()
    return str(args[0]) if len(args) == 1 else None


def _models(annotations: list) -> list[type[BaseModel]]:
    """The schema models among the types ``annotations`` may hold."""
    return [m for a in annotations for m in _members(a) if isinstance(m, type) and issubclass(m, BaseModel)]


def _known_keys(model: type[BaseModel], loc: tuple) -> list[str]:
    """The keys the schema allows at ``loc`` (an error's location without its last key), to suggest the one a
    typo meant; [] where that cannot be told (a dict's free keys, a type that is no model)."""
    here: list = [model]
    for part in loc:
        models = _models(here)
        tagged = [m for m in models if _tag(m) == str(part)]
        if tagged:  # a union member's tag: the key stays the member's
            here = tagged
            continue
        nxt = [m.model_fields[str(part)].annotation for m in models if str(part) in m.model_fields]
        nxt += [get_args(m)[1] for a in here for m in _members(a) if get_origin(m) is dict]  # a free key's value
        here = nxt
    return sorted({k for m in _models(here) for k in m.model_fields} - {"root"})


def _format_error(err: ValidationError, source: str, model: type[BaseModel] | None = None) -> str:
    """One line for the whole error: the first problem, with a typo (an unknown key) before the required key it
    leaves missing, a union's alternatives said together (``int >= 1 or 'auto'``), and how many others."""
    errors = sorted(err.errors(), key=lambda e: e["type"] != "extra_forbidden")
    first = errors[0]
    key = _error_key(first["loc"])
    if first["type"] in ("union_tag_invalid", "union_tag_not_found"):
        key += "." + _discriminator(first)
    same = [e for e in errors if _error_key(e["loc"]) == key]
    if len(same) > 1 and all(e["msg"].startswith("Input should be ") for e in same):
        msg = "Input should be " + " or ".join(e["msg"].removeprefix("Input should be ") for e in same)
    else:
        same = [first]
        msg = _error_message(first)
    if first["type"] == "extra_forbidden":
        parent = first["loc"][:-1]
        missing = [str(e["loc"][-1]) for e in errors if e["type"] == "missing" and e["loc"][:-1] == parent]
        close = difflib.get_close_matches(str(first["loc"][-1]), missing, n=1)
        if close:
            msg += f" (did you mean {close[0]!r}? it is required and missing)"
            same = [*same, *(e for e in errors if e["type"] == "missing" and e["loc"] == (*parent, close[0]))]
        elif model is not None:
            known = _known_keys(model, parent)
            close = difflib.get_close_matches(str(first["loc"][-1]), known, n=1)
            if close:
                msg += f" (did you mean {close[0]!r}?)"
            elif known:
                msg += f"; known: {', '.join(known)}"
    rest = len(errors) - len(same)
    more = f" (+{rest} more)" if rest > 0 else ""
    return f"{source}: {key}: {msg}{more}"


@functools.cache
def _params_model(names: tuple[str, ...]) -> type[Params]:
    comp = _compression_model(names)
    return create_model("Params", __base__=Params, compression=(comp, Field(default_factory=comp)))


def parse_params(data: object, *, source: str = "params", root: Path = Path(".")) -> Params:
    """Validate a params mapping against the schema of the methods registered now."""
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: expected a mapping at the top level, got {type(data).__name__}")
    model = _params_model(tuple(METHODS.names()))
    try:
        params = model.model_validate({**data, "root": root})
    except ValidationError as err:
        raise ConfigError(_format_error(err, source, model)) from None
    return params


def params_path(path: str | os.PathLike[str] | None = None) -> Path:
    """The params file to use: ``path``, else $SELFCAL_PARAMS, else ./params.yaml."""
    return Path(path or os.environ.get(PARAMS_ENV) or DEFAULT_PARAMS)


def load_params(path: str | os.PathLike[str] | None = None) -> Params:
    """Read and validate params.yaml ($SELFCAL_PARAMS overrides the default location)."""
    p = params_path(path)
    if not p.is_file():
        raise ConfigError(f"{p}: params file not found")
    data = read_yaml(p.read_text(), source=p)
    return parse_params(data, source=str(p), root=p.resolve().parent)


class _UniqueKeyLoader(yaml.SafeLoader):
    """SafeLoader that refuses a mapping key given twice (PyYAML keeps the last one silently)."""

    def construct_mapping(self, node, deep=False):
        seen: dict = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                mark = key_node.start_mark
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicate key {key!r} (first at line {seen[key]})", mark
                )
            seen[key] = key_node.start_mark.line + 1
        return super().construct_mapping(node, deep=deep)


def read_yaml(text: str, *, source: str | os.PathLike[str]) -> Any:
    """Parse a params/profile file: one line on a syntax error or a duplicate key, naming
    ``FILE:LINE:COLUMN``."""
    try:
        return yaml.load(text, Loader=_UniqueKeyLoader)  # noqa: S506 - a SafeLoader subclass
    except yaml.MarkedYAMLError as err:
        mark = err.problem_mark or err.context_mark
        where = f"{source}:{mark.line + 1}:{mark.column + 1}" if mark else str(source)
        what = err.problem or str(err).splitlines()[0]
        raise ConfigError(f"{where}: not valid YAML: {what}") from None
    except yaml.YAMLError as err:
        raise ConfigError(f"{source}: not valid YAML: {str(err).splitlines()[0]}") from None
