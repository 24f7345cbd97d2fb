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
import subprocess
import sys
import tempfile
from importlib import metadata
from pathlib import Path

# What the box lacks for each purpose (its image has torch, transformers, numpy, pandas, pyarrow, jinja2,
# pyyaml, requests, scikit-learn, sacrebleu, xxhash, fsspec ... : KINDS.md's package list).
SETS = {
    # the evaluation stage (lm-eval and the fast path) and selfcal's own params schema
    "eval": [
        "lm_eval",
        "datasets",
        "evaluate",
        "dill",
        "multiprocess",
        "sqlitedict",
        "pytablewriter",
        "DataProperty",
        "mbstrdecoder",
        "pathvalidate",
        "tabledata",
        "tcolorpy",
        "typepy",
        "chardet",
        "rouge_score",
        "nltk",
        "word2number",
        "more_itertools",
        "fsspec",
        "pydantic",
        "pydantic_core",
        "annotated_types",
        "typing_inspection",
    ],
    # + compression (llm-compressor) and the GGUF reader that builds SmolLM2 from ../shared's recipe
    "stages": ["llmcompressor", "compressed_tensors", "loguru", "gguf"],
}
SETS["stages"] = SETS["eval"] + SETS["stages"]
PLATFORMS = [f"manylinux_2_{n}_x86_64" for n in (17, 24, 27, 28, 31, 34, 35, 39)] + ["manylinux2014_x86_64"]


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
    w.add_argument("--set", choices=sorted(SETS), default="eval")
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
        got = wheels(SETS[args.set], args.out, args.python)
        print(f"airgap: {len(got)} wheel(s), {sum(p.stat().st_size for p in got) >> 20} MiB in {args.out}")
    elif args.cmd == "split":
        split(args.files, args.out, args.part_mib)
    else:
        args.out.mkdir(parents=True, exist_ok=True)
        join(args.directory, args.out)


if __name__ == "__main__":
    main()
