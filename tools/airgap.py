"""Prepare what a GPU box without network needs to run selfcal, in parts that fit a transfer limit.

A lent GPU box (or an air-gapped worker) has its own Python, torch (CUDA) and transformers, and no package
index. This tool, run where the index is reachable:

    python tools/airgap.py wheels --set eval --out .bundle/wheels      # the pinned packages the box lacks
    python tools/airgap.py split FILE... --out .bundle/parts --part-mib 60
    python tools/airgap.py pack --out .bundle --call-mib 64 --split MODEL.gguf.whl --tar ../shared \
        --exclude models --git-bundle      # all of it, in transfer folders .bundle/c1, c2, ... under the limit

- ``wheels``: each package of the set at the version this environment pins (importlib.metadata), as a
  wheel for the box's Python (default CPython 3.12, manylinux x86_64); where the index has only an
  sdist, the wheel is built here (``pip wheel --no-deps``: pure-Python packages only). torch and
  transformers are never bundled: the box's own run the stages, and lineage records their versions.
- ``split``: any large file (a model's weights, a GGUF, a data archive) into numbered parts of at most
  ``--part-mib`` MiB, with ``parts.json`` (each file's sha256 and its parts), so the parts travel in
  separate transfers.

- ``pack``: the wheels, the split files, folders as ``.tar.xz`` and the commit as a git bundle, distributed into
  transfer folders ``c1``, ``c2`` … of at most ``--transfer-mib`` each (``transfers.json``, in every one, says
  what is where and each file's size); copy each into one folder on the box as it arrives. ``--call-mib``
  sizes them for a device call that also carries the git working tree (the lent H200: 64 MiB in all).
- ``check`` (on the box): has every transfer arrived, whole? One line naming the missing ones, exit 1.

On the box, ``sh tools/airgap_bootstrap.sh BUNDLE_DIR SITE_DIR`` runs ``check`` first (a pack's folder),
joins the parts (checking every sha256), installs the wheels into SITE_DIR with no index and no dependency
resolution, and imports each package once; put SITE_DIR on PYTHONPATH.
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
        "ruamel.yaml.clib",  # DVC's dvc.lock reads in C (pyproject.toml says why)
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


def pack(pieces: dict[str, list[Path]], out: Path, transfer_mib: int) -> list[Path]:
    """Distribute ``pieces`` ({subfolder: files}: ``wheels``, ``parts``, ``""`` for the rest) into transfer
    folders ``out/c1``, ``out/c2`` … of at most ``transfer_mib`` MiB each (largest first, first fit), keeping
    each file's subfolder, so that copying every transfer's contents into one folder on the box gives the
    bundle ``airgap_bootstrap.sh`` takes. Writes ``transfers.json`` (what went where, with sizes) into ``out`` and
    into every transfer, for ``check`` on the box. A file over the
    limit is refused: split it first."""
    import shutil

    limit = transfer_mib << 20
    # each file's size read once: it places the file and is what ``check`` expects on the box
    files = sorted(((sub, f, f.stat().st_size) for sub, fs in pieces.items() for f in fs), key=lambda x: -x[2])
    bins: list[list[tuple[str, Path, int]]] = []
    sizes: list[int] = []
    for sub, f, size in files:
        if size > limit:
            raise SystemExit(f"airgap: {f} is {size >> 20} MiB, over the {transfer_mib} MiB transfer: split it")
        i = next((k for k, used in enumerate(sizes) if used + size <= limit), None)
        if i is None:
            bins.append([])
            sizes.append(0)
            i = len(bins) - 1
        bins[i].append((sub, f, size))
        sizes[i] += size
    for old in out.glob("c[0-9]*"):
        shutil.rmtree(old)
    folders, manifest = [], {}
    for k, content in enumerate(bins, start=1):
        folder = out / f"c{k}"
        for sub, f, _ in content:
            (folder / sub).mkdir(parents=True, exist_ok=True)
            shutil.copy2(f, folder / sub / f.name)
        folders.append(folder)
        manifest[folder.name] = {
            "mib": round(sizes[k - 1] / 2**20, 1),
            "files": {f"{s}/{f.name}".lstrip("/"): size for s, f, size in content},
        }
        print(f"airgap: {folder}: {len(content)} file(s), {manifest[folder.name]['mib']} MiB", flush=True)
    text = json.dumps(manifest, indent=2) + "\n"
    # every transfer carries the whole list, so whichever arrives, the box can say which ones have not
    for target in (out, *folders):
        (target / "transfers.json").write_text(text)
    return folders


def missing(stash: Path) -> dict[str, list[str]]:
    """The files of each transfer absent from ``stash`` (or of another size), by transfer; empty when all
    arrived. Lease 8: the box was given back between the first and the second transfer, the next ones landed
    on a new box, and the install failed only at the import check (a wheel of c1's missing)."""
    listing = stash / "transfers.json"
    if not listing.is_file():
        raise SystemExit(f"airgap: {stash} has no transfers.json: no transfer of a pack has arrived there")
    gone: dict[str, list[str]] = {}
    for transfer, entry in json.loads(listing.read_text()).items():
        absent = [
            name
            for name, size in entry["files"].items()
            if not (stash / name).is_file() or (stash / name).stat().st_size != size
        ]
        if absent:
            gone[transfer] = absent
    return gone


def check(stash: Path) -> None:
    """One line and exit 1 when a transfer is missing (before anything is installed), else one line."""
    gone = missing(stash)
    if gone:
        which = ", ".join(f"{t} ({len(files)} file(s), e.g. {files[0]})" for t, files in gone.items())
        raise SystemExit(
            f"airgap: {stash} lacks {which}: carry {' '.join(gone)} again "
            "(a box given back between transfers starts empty: `warm: false` in a call's answer)"
        )
    print(f"airgap: {stash}: every transfer arrived", flush=True)


CALL_MARGIN_MIB = 6  # what a call counts beyond the files' bytes: 45 MiB parts + an 18.7 MiB tree were refused


def tree_bytes(root: Path) -> int:
    """The bytes of the working tree the lent GPU copies with every call: the files git tracks and the untracked
    ones it does not ignore (a run folder unpacked mid-lease and not yet committed travels too)."""
    args = ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"]
    listed = subprocess.run(args, cwd=root, capture_output=True) if root.is_dir() else None
    if listed is None or listed.returncode != 0:
        raise SystemExit(f"airgap: --call-mib needs a git checkout (the tree that travels with every call): {root}")
    return sum((root / n).stat().st_size for n in listed.stdout.decode().split("\0") if n and (root / n).is_file())


def transfer_limit(call_mib: int, tree: int) -> int:
    """The largest transfer (MiB) that fits one device call beside the working tree: ``call_mib`` less the tree
    and a margin. Lease 10: the tree had grown to 18.7 MiB with the run folders, and transfers of 45 MiB were
    refused; the README's rule (58 - tree) was right, the number typed was not."""
    mib = call_mib - CALL_MARGIN_MIB - -(-tree // (1 << 20))
    if mib < 8:
        raise SystemExit(
            f"airgap: the working tree ({tree / (1 << 20):.1f} MiB) leaves {mib} MiB per transfer in a "
            f"{call_mib} MiB call: shrink the tree"
        )
    return mib


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
    k = sub.add_parser(
        "pack",
        help="everything a box needs in transfers under a size limit: wheels, big files split, folders as "
        "tar.xz, the git commit as a bundle",
    )
    k.add_argument("--set", choices=sorted(ROOTS), default="pipeline")
    k.add_argument("--python", default="3.12")
    k.add_argument("--out", type=Path, required=True, help="e.g. .bundle (wheels/ is kept there as a cache)")
    k.add_argument("--transfer-mib", type=int, default=60, help="per transfer (default 60)")
    k.add_argument(
        "--call-mib",
        type=int,
        help="size the transfers to a device call's limit that counts the git working tree too (the lent H200: "
        f"64): each transfer gets that less the tracked files and {CALL_MARGIN_MIB} MiB (overrides --transfer-mib)",
    )
    k.add_argument("--split", nargs="*", type=Path, default=[], metavar="FILE", help="big files (a model's GGUF)")
    k.add_argument("--tar", nargs="*", type=Path, default=[], metavar="DIR", help="folders to carry as DIR.tar.xz")
    k.add_argument("--exclude", nargs="*", default=[], help="tar --exclude patterns (e.g. models)")
    k.add_argument("--git-bundle", action="store_true", help="HEAD as repo.bundle (lineage's commit on the box)")
    c = sub.add_parser("check", help="(on the box) has every transfer of the pack arrived? (transfers.json)")
    c.add_argument("stash", type=Path)
    j = sub.add_parser("join", help="(on the box) reassemble and check the split files")
    j.add_argument("directory", type=Path)
    j.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()
    if args.cmd == "wheels":
        got = wheels(closure(ROOTS[args.set]), args.out, args.python)
        print(f"airgap: {len(got)} wheel(s), {sum(p.stat().st_size for p in got) >> 20} MiB in {args.out}")
    elif args.cmd == "split":
        split(args.files, args.out, args.part_mib)
    elif args.cmd == "pack":
        _pack(args)
    elif args.cmd == "check":
        check(args.stash)
    else:
        args.out.mkdir(parents=True, exist_ok=True)
        join(args.directory, args.out)


def _pack(args) -> None:
    out = args.out
    if args.call_mib is not None:
        tree = tree_bytes(Path.cwd())
        args.transfer_mib = transfer_limit(args.call_mib, tree)
        print(
            f"airgap: transfers of at most {args.transfer_mib} MiB ({args.call_mib} MiB per call, less the "
            f"{tree / (1 << 20):.1f} MiB tracked tree and {CALL_MARGIN_MIB} MiB)"
        )
    got = wheels(closure(ROOTS[args.set]), out / "wheels", args.python)
    parts_dir = out / "parts"
    if parts_dir.exists():
        import shutil

        shutil.rmtree(parts_dir)
    parts = []
    if args.split:
        split(args.split, parts_dir, max(1, args.transfer_mib - 4))
        parts = sorted(parts_dir.iterdir())
    rest = []
    for folder in args.tar:
        target = out / f"{folder.resolve().name}.tar.xz"
        excludes = [x for e in args.exclude for x in ("--exclude", e)]
        subprocess.run(
            ["tar", "-cJf", str(target), *excludes, "-C", str(folder.resolve().parent), folder.resolve().name],
            check=True,
        )
        rest.append(target)
    if args.git_bundle:
        target = out / "repo.bundle"
        subprocess.run(["git", "bundle", "create", str(target), "HEAD"], check=True, capture_output=True)
        rest.append(target)
    pack({"wheels": got, "parts": parts, "": rest}, out, args.transfer_mib)


if __name__ == "__main__":
    main()
