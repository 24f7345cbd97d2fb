"""Does the same self-calibration set come out of the same params and seed twice? Measured per setting.

Lease 3 made the five self sets of the SmolLM2 study again (a fresh box has no DVC cache) and got other
tokens than lease 1 from the same params, seed and source version, on the same kind of GPU with the same
torch and transformers; C4's windows came out identical. Sampling by inverse CDF on per-(seed, row)
uniforms is exact given the logits, so the logits' last bits moved between the runs. This runs the
pipeline's own generate step (``selfcal.pipeline.generate.generate``: the lockstep engine, the profile's
batch, bf16) in fresh processes, two at once per setting, and compares their token matrices:

- ``default``: as the pipeline runs it (CUDA graphs captured on a side stream, the lockstep's two-matmul
  attention);
- ``cublas-workspace``: ``CUBLAS_WORKSPACE_CONFIG=:4096:8`` (cuBLAS's documented condition for
  reproducible results when work runs on more than one stream);
- ``eager``: no CUDA graphs (every step launched from Python on the default stream);
- ``fused-sdpa``: torch's fused SDPA kernel instead of the two matmuls (CUDA's default until lease 5;
  its backend is torch's pick per call);
- ``deterministic``: ``torch.use_deterministic_algorithms(True, warn_only=True)`` + the cuBLAS setting.

Lease 5 (benchmarks/results/gen-determinism-h200-smollm2-lease5.json, run before the switch, so its
``default`` and ``cublas-workspace`` and ``eager`` are the fused kernel and its ``matmul-attention`` is
today's ``default``): in the three fused settings run (default, cublas-workspace, eager) the two processes
differed in all 128 rows, identical up to position 128 and the earliest difference at 129 (the first step
past one 128-slot attention window); the two matmuls gave identical sets (e7cec3d1...), 32.2 s a set against
27.9 (the step whole, two processes at once). ``deterministic`` was not run. ``lockstep.default_attention``
is the two matmuls since.

Per setting: whether the two processes agree (digest), rows identical, the first differing (row, position),
and, with ``--expect DIGEST``, whether it reproduces a set made before (e.g. lease 5's two-matmul self-s0).

What one run can and cannot tell: the two processes share one box; a set repeatable on one box may still
differ on another (leases 1 and 3 made the study's sets on two). ``--expect`` with the digest of an earlier
box's ``default`` answers that: the same digest on two boxes is reproducibility across boxes. ``--expect``
speaks for ``default`` (and ``cublas-workspace``) only: the other settings compute otherwise by construction.
Each setting's digests are kept (``--out``, rewritten after every setting, so a cut run keeps what it
finished).

    python benchmarks/gen_determinism.py --profile profiles/study-smollm2.yaml --out r.json \\
        --settings default fused-sdpa \\
        --expect e7cec3d1d881321dd73421937799b8028013f05ae03b22ef21440b036a3e2a43        # GPU (lease 5's)
    python benchmarks/gen_determinism.py --profile profiles/study-stories260K.yaml --n 8 --seq-len 64 \\
        --settings default eager                                                        # CPU (a check)
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SETTINGS = {
    "default": {},
    "cublas-workspace": {"CUBLAS_WORKSPACE_CONFIG": ":4096:8"},
    "eager": {"SELFCAL_BENCH_EAGER": "1"},
    "fused-sdpa": {"SELFCAL_BENCH_FUSED_SDPA": "1"},
    "deterministic": {"CUBLAS_WORKSPACE_CONFIG": ":4096:8", "SELFCAL_BENCH_DETERMINISTIC": "1"},
}


def child(profile: Path, work: Path, n: int | None, seq_len: int | None, seed: int) -> None:
    """One generation in this process, as the generate stage runs it; tokens and digest into ``work``."""
    import torch
    import yaml

    if os.environ.get("SELFCAL_BENCH_DETERMINISTIC"):
        torch.use_deterministic_algorithms(True, warn_only=True)
    if os.environ.get("SELFCAL_BENCH_EAGER"):
        from selfcal.calibration import generator

        class Eager(generator.LockstepRows):
            def __init__(self, *args, **kwargs):
                kwargs["use_graphs"] = False
                super().__init__(*args, **kwargs)

        generator.LockstepRows = Eager
    if os.environ.get("SELFCAL_BENCH_FUSED_SDPA"):
        from selfcal.calibration import lockstep

        lockstep.default_attention = lambda device: lockstep.SDPA_ATTENTION_NAME
    from selfcal.calibration.calibset import read_tokens
    from selfcal.config import parse_params
    from selfcal.pipeline import layout
    from selfcal.pipeline.generate import generate

    raw = yaml.safe_load(profile.read_text())
    cal = raw["calibration"]
    cal["sources"] = {"self": cal["sources"]["self"]}
    cal["seeds"] = [seed]
    cal["diagnostics"] = {"reference_path": None}
    if n:
        cal["n_samples"] = n
    if seq_len:
        cal["seq_len"] = seq_len
    raw["tracking"] = {"enabled": False}
    raw["paths"] = {"artifacts": str(work / "artifacts"), "state": str(work / "state")}
    params = parse_params(raw, root=profile.resolve().parents[1])
    t0 = time.perf_counter()
    manifest = generate(params, "self", seed, progress=False)
    tokens = read_tokens(layout.calibration_dir(params, "self", seed) / "tokens.safetensors")
    np.save(work / "tokens.npy", tokens)
    from selfcal.calibration import generator

    (work / "result.json").write_text(
        json.dumps(
            {
                "digest": manifest.content_digest,
                "seconds": round(time.perf_counter() - t0, 1),
                # what this process ran with, so a patch that did not take effect shows
                "engine": generator.LockstepRows.__name__,
                "attention": manifest.provenance.get("attention"),  # what the generator recorded it used
                "deterministic": torch.are_deterministic_algorithms_enabled(),
                "cublas_workspace": os.environ.get("CUBLAS_WORKSPACE_CONFIG"),
            }
        )
    )


def compare(a: np.ndarray, b: np.ndarray) -> dict:
    same_rows = int((a == b).all(axis=1).sum())
    diff = np.argwhere(a != b)
    first = None
    if len(diff):
        pos = diff[:, 1]
        r, p = diff[int(np.argmin(pos))]
        first = {"row": int(r), "position": int(p), "rows_differing": int(len(np.unique(diff[:, 0])))}
    return {"rows_identical": same_rows, "rows": int(a.shape[0]), "first_difference": first}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--profile", type=Path, required=True)
    ap.add_argument("--settings", nargs="+", default=list(SETTINGS), choices=list(SETTINGS))
    ap.add_argument("--n", type=int, help="rows (default: the profile's n_samples)")
    ap.add_argument("--seq-len", type=int, help="tokens per row (default: the profile's)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--expect", help="a committed set's content digest to compare with")
    ap.add_argument("--out", type=Path)
    ap.add_argument("--child", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(args.profile, args.child, args.n, args.seq_len, args.seed)
        return
    results = {"profile": str(args.profile), "seed": args.seed, "expect": args.expect, "settings": {}}
    with tempfile.TemporaryDirectory(prefix="gen-det-") as tmp:
        for setting in args.settings:
            env = os.environ | SETTINGS[setting]
            procs, works = [], []
            for k in range(2):  # two processes at once, as the study's slots run
                work = Path(tmp) / f"{setting}-{k}"
                work.mkdir()
                cmd = [sys.executable, __file__, "--profile", str(args.profile), "--seed", str(args.seed)]
                cmd += ["--child", str(work)]
                cmd += ["--n", str(args.n)] if args.n else []
                cmd += ["--seq-len", str(args.seq_len)] if args.seq_len else []
                procs.append(subprocess.Popen(cmd, env=env))
                works.append(work)
            codes = [p.wait() for p in procs]
            if any(codes):
                results["settings"][setting] = {"error": f"exit codes {codes}"}
                print(f"{setting}: failed (exit codes {codes})", flush=True)
                continue
            got = [json.loads((w / "result.json").read_text()) for w in works]
            entry = {
                "digests": [g["digest"] for g in got],
                "seconds": [g["seconds"] for g in got],
                "ran_with": {k: v for k, v in got[0].items() if k not in ("digest", "seconds")},
                "agree": got[0]["digest"] == got[1]["digest"],
                **compare(np.load(works[0] / "tokens.npy"), np.load(works[1] / "tokens.npy")),
            }
            if args.expect:
                entry["reproduces_expected"] = [g["digest"] == args.expect for g in got]
            results["settings"][setting] = entry
            print(f"{setting}: {json.dumps(entry)}", flush=True)
            if args.out:
                args.out.write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
