"""Prepare what a GPU box without network needs to run selfcal, in parts that fit a transfer limit.

A lent GPU box (or an air-gapped worker) has its own Python, torch (CUDA) and transformers, and no package
index. This tool, run where the index is reachable:

    python tools/airgap.py wheels --set eval --out .bundle/wheels      # the pinned packages the box lacks
    python tools/airgap.py split FILE... --out .bundle/parts --part-mib 60

- ``wheels``: each package of the set at the version this environment pins (importlib.metadata), as a
  wheel for the box's Python (default CPython 3.12, manylinux x86_64); where the index has only an
  sdist, the wheel is built here (``pip wheel --no-deps``: pure-Python packages only). torch and
  transformers are never bundled: the box's own run the stages, and lineage records their versions.
- ``split``: any large file (a model's weights, a GGUF, a data archive) into numbered parts of at most
  ``--part-mib`` MiB, with ``parts.json`` (each file's sha256 and its parts), so the parts travel in
  separate transfers.

On the box, ``sh tools/airgap_bootstrap.sh BUNDLE_DIR SITE_DIR`` joins the parts (checking every sha256),
installs the wheels into SITE_DIR with no index and no dependency resolution, and imports each package
once; put SITE_DIR on PYTHONPATH.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import re
import subprocess
import sys
import tempfile
from importlib import metadata
from pathlib import Path

# What the GPU image already holds (KINDS.md's package list, read 2026-11-17): never bundled, the box's own
# versions run. torch and transformers above all: a CUDA torch wheel cannot travel (64 MiB per transfer),
# and the versions every artifact records say which ran.
BOX_HAS = frozenset(
    """absl-py accelerate aiofiles aiohappyeyeballs aiohttp aiosignal annotated-doc anyio attrs botorch build
    certifi charset-normalizer chex click cloudpickle cmake colorama contourpy coverage cupy-cuda13x cycler cython
    diffrax e3nn einops equinox etils execnet filelock flatbuffers flax fonttools formulaic frozenlist fsspec
    gpytorch grpcio h11 h5py hf-xet httpcore httpx huggingface-hub humanize hypothesis idna imageio iniconfig
    interface-meta jax jaxlib jaxtyping jinja2 joblib kiwisolver lazy-loader lightning lightning-utilities
    linear-operator lineax llvmlite lxml markdown markdown-it-py markupsafe matplotlib mdurl meson ml-dtypes
    mpi4py mpmath msgpack multidict multipledispatch mypy-extensions nanobind narwhals networkx ninja numba
    numba-cuda numpy numpyro onnx onnx-ir onnxruntime onnxscript opencv-python-headless optax opt-einsum
    opt-einsum-fx optimistix orbax-checkpoint packaging pandas pathspec patsy peft pillow pip pluggy portalocker
    prometheus-client propcache protobuf psutil pyarrow pybind11 py-cpuinfo pygments pyparsing pyproject-hooks
    pyre-extensions pytest pytest-benchmark pytest-cov pytest-mock pytest-timeout pytest-xdist python-dateutil
    pytorch-lightning pyyaml regex requests rich sacrebleu safetensors scikit-build-core scikit-image
    scikit-learn scipy seaborn sentencepiece sentence-transformers setuptools shellingham simplejson six
    sortedcontainers statsmodels sympy tabulate tensorboard tensorboard-data-server tensorstore threadpoolctl
    tifffile tiktoken timm tokenizers toolz torch torchaudio torchdiffeq torch-geometric torchmetrics
    torchvision tqdm transformers treescope triton typer typing-extensions typing-inspect urllib3 uvloop
    wadler-lindig werkzeug wheel wrapt xarray xxhash yarl zipp""".split()
)
_BOX_PREFIXES = ("nvidia-", "cuda-", "jax-cuda")

# Each set is the dependency closure of its roots as installed here (every version pinned to what this
# environment runs, the tests included), less what the box has.
ROOTS = {
    "eval": ["lm-eval", "datasets", "pydantic"],  # the evaluation stage and selfcal's params schema
    "stages": ["lm-eval", "datasets", "pydantic", "llmcompressor", "compressed-tensors", "gguf"],
    # + what `selfcal run` needs: DVC, Prefect (its ephemeral server too) and MLflow (sqlite store)
    "pipeline": [
        "lm-eval",
        "datasets",
        "pydantic",
        "llmcompressor",
        "compressed-tensors",
        "gguf",
        "mlflow",
        "prefect",
        "dvc",
    ],
}
# Markers are evaluated for the box (CPython 3.12 on Linux x86_64), not for this interpreter.
BOX_ENV = {
    "python_version": "3.12",
    "python_full_version": "3.12.3",
    "sys_platform": "linux",
    "platform_system": "Linux",
    "platform_machine": "x86_64",
    "os_name": "posix",
    "implementation_name": "cpython",
    "platform_python_implementation": "CPython",
    "extra": "",
}

PLATFORMS = [f"manylinux_2_{n}_x86_64" for n in (17, 24, 27, 28, 31, 34, 35, 39)] + ["manylinux2014_x86_64"]


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def on_box(name: str) -> bool:
    n = _norm(name)
    return n in BOX_HAS or n.startswith(_BOX_PREFIXES)


def closure(roots: list[str]) -> list[str]:
    """The installed distributions ``roots`` need (their ``Requires-Dist``, markers evaluated for the box, with
    the extras a requirement names: prefect's ``sqlalchemy[asyncio]`` brings greenlet), walked through
    installed metadata, less what the box has; names as installed."""
    from packaging.requirements import Requirement

    seen: dict[str, str] = {}
    extras: dict[str, set[str]] = {}
    todo = list(roots)
    while todo:
        name = todo.pop()
        n = _norm(name)
        if n in seen or on_box(n):
            continue
        try:
            dist = metadata.distribution(name)
        except metadata.PackageNotFoundError:
            if name == "gguf":  # not needed here (only the box converts the GGUF): newest on the index
                seen[n] = name
                continue
            raise SystemExit(
                f"airgap: {name} is not installed here; install the project first (pip install -e .)"
            ) from None
        seen[n] = dist.metadata["Name"]
        todo.extend(requirements(dist, extras.get(n, set())))
        for spec in dist.requires or []:  # the extras a requirement asks for (sqlalchemy[asyncio] -> greenlet)
            req = Requirement(spec)
            dep = _norm(req.name)
            if req.extras - extras.get(dep, set()) and (req.marker is None or req.marker.evaluate(BOX_ENV)):
                extras.setdefault(dep, set()).update(req.extras)
                seen.pop(dep, None)  # walked already without these extras: walk it again
                todo.append(req.name)
    return sorted(seen.values(), key=_norm)


def requirements(dist, wanted_extras: set[str]) -> list[str]:
    """The names ``dist`` requires on the box: its plain requirements, and those of ``wanted_extras``."""
    from packaging.requirements import Requirement

    out = []
    for spec in dist.requires or []:
        req = Requirement(spec)
        if req.marker is None:
            out.append(req.name)
            continue
        envs = [BOX_ENV] + [{**BOX_ENV, "extra": e} for e in sorted(wanted_extras)]
        if any(req.marker.evaluate(env) for env in envs):
            out.append(req.name)
    return out


def _pin(name: str) -> str:
    try:
        return f"{name}=={metadata.version(name)}"
    except metadata.PackageNotFoundError:
        return name  # not installed here (gguf): the newest the index has


def _pip(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pip", *args], capture_output=True, text=True, cwd=cwd)


def wheels(names: list[str], out: Path, python: str) -> list[Path]:
    out = out.resolve()  # pip wheel runs in a scratch folder
    out.mkdir(parents=True, exist_ok=True)
    for name in names:
        req = _pin(name)
        plat = [x for p in PLATFORMS for x in ("--platform", p)]
        proc = _pip(
            "download",
            "--no-deps",
            "--only-binary=:all:",
            "--python-version",
            python,
            "--implementation",
            "cp",
            *plat,
            "-d",
            str(out),
            req,
        )
        if proc.returncode != 0:  # no wheel on the index: build one from the sdist here (pure Python)
            with tempfile.TemporaryDirectory() as tmp:
                proc = _pip("wheel", "--no-deps", "--no-build-isolation", "-w", str(out), req, cwd=Path(tmp))
                if proc.returncode != 0:
                    proc = _pip("wheel", "--no-deps", "-w", str(out), req, cwd=Path(tmp))
            if proc.returncode != 0:
                raise SystemExit(f"airgap: no wheel for {req}: {proc.stderr.strip().splitlines()[-1:]}")
        print(f"airgap: {req}", flush=True)
    return sorted(out.glob("*.whl"))


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def split(files: list[Path], out: Path, part_mib: int) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    manifest_path = out / "parts.json"
    manifest = json.loads(manifest_path.read_text()) if manifest_path.is_file() else {}
    size = part_mib << 20
    for f in files:
        parts = []
        with open(f, "rb") as src:
            i = 0
            while chunk := src.read(size):
                part = out / f"{f.name}.part{i:03d}"
                part.write_bytes(chunk)
                parts.append(part.name)
                i += 1
        manifest[f.name] = {"sha256": _sha256(f), "bytes": f.stat().st_size, "parts": parts}
        print(f"airgap: {f.name}: {len(parts)} part(s) of at most {part_mib} MiB", flush=True)
    manifest_path.write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest_path


def join(directory: Path, out: Path) -> list[Path]:
    """Reassemble every file of ``parts.json`` whose parts are all present (the box's side; no pip needed)."""
    manifest = json.loads((directory / "parts.json").read_text())
    done = []
    for name, entry in manifest.items():
        parts = [directory / p for p in entry["parts"]]
        if not all(p.is_file() for p in parts):
            continue
        target = out / name
        with open(target, "wb") as dst:
            for p in parts:
                dst.write(p.read_bytes())
        if _sha256(target) != entry["sha256"]:
            raise SystemExit(f"airgap: {target}: sha256 mismatch after joining its parts")
        done.append(target)
        print(f"airgap: joined {target} ({entry['bytes']} bytes, sha256 ok)", flush=True)
    return done


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    w = sub.add_parser("wheels", help="wheels of the pinned packages the box lacks")
    w.add_argument("--set", choices=sorted(ROOTS), default="pipeline")
    w.add_argument("--out", type=Path, required=True)
    w.add_argument("--python", default="3.12", help="the box's Python (default 3.12)")
    s = sub.add_parser("split", help="split files into parts with a sha256 manifest")
    s.add_argument("files", nargs="+", type=Path)
    s.add_argument("--out", type=Path, required=True)
    s.add_argument("--part-mib", type=int, default=60)
    j = sub.add_parser("join", help="(on the box) reassemble and check the split files")
    j.add_argument("directory", type=Path)
    j.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()
    if args.cmd == "wheels":
        got = wheels(closure(ROOTS[args.set]), args.out, args.python)
        print(f"airgap: {len(got)} wheel(s), {sum(p.stat().st_size for p in got) >> 20} MiB in {args.out}")
    elif args.cmd == "split":
        split(args.files, args.out, args.part_mib)
    else:
        args.out.mkdir(parents=True, exist_ok=True)
        join(args.directory, args.out)


if __name__ == "__main__":
    main()
