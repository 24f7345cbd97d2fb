"""Calibration batch size in the compress stage: llm-compressor's default (one sample per forward) against
larger batches, on the same model, the same calibration set and the same recipe, alone on the device.

llm-compressor's sequential pipeline runs every calibration sample through each decoder layer twice (to
gather statistics, then to pass the outputs on) with eager attention forced, and every forward goes through
its offloading wrapper: with one sample per forward that is 2 x n x layers small launches. The statistics
are sums over samples (see ``MethodConfig.batch_size``), so the batch changes only rounding; this measures
what it changes in time, and how far the checkpoints then differ (2:4 masks, 4-bit codes, weights).

The compress step is the pipeline's own (``selfcal.pipeline.compress.compress``: verification included);
``oneshot_s`` is the time inside ``oneshot``, ``wall_s`` the whole step (model load, save, verify).

    python benchmarks/compress_batch.py --profile profiles/study-smollm2.yaml --n 64 --out r.json   # GPU
    python benchmarks/compress_batch.py --profile profiles/study-stories260K.yaml --device cpu        # CPU
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from selfcal.config import parse_params  # noqa: E402
from selfcal.pipeline import layout  # noqa: E402
from selfcal.pipeline.compress import compress  # noqa: E402
from selfcal.pipeline.generate import generate  # noqa: E402


def params_for(profile: Path, work: Path, *, n: int, method: str, batch: int, device: str | None):
    raw = yaml.safe_load(profile.read_text())
    raw["calibration"]["n_samples"] = n
    raw["calibration"]["seeds"] = [0]
    raw["calibration"]["sources"] = {"c4": raw["calibration"]["sources"]["c4"]}
    raw["calibration"]["diagnostics"] = {"reference_path": None}
    raw["compression"]["methods"] = [method]
    raw["compression"].setdefault(method, {})["batch_size"] = batch
    if device:
        raw["model"]["device"] = device
    raw["tracking"] = {"enabled": False}
    raw["paths"] = {"artifacts": str(work / "artifacts"), "state": str(work / "state")}
    # the profile's relative paths are relative to the folder it would be installed in (the repo root)
    return parse_params(raw, root=profile.resolve().parents[1])


def agreement(a: dict, b: dict) -> dict:
    """How far two checkpoints of one method apart are: equal 2:4 zeros, equal packed 4-bit words, max |dw|."""
    zeros = codes = 0.0
    nz = nc = 0
    max_dw = 0.0
    for name, x in a.items():
        y = b[name]
        if name.endswith("weight_packed"):
            codes += (x == y).float().mean().item()
            nc += 1
        elif x.is_floating_point() and x.ndim == 2 and name.endswith("proj.weight"):
            zeros += ((x == 0) == (y == 0)).float().mean().item()
            nz += 1
            max_dw = max(max_dw, (x.float() - y.float()).abs().max().item())
    return {
        "same_zero_pattern": round(zeros / nz, 6) if nz else None,
        "same_packed_words": round(codes / nc, 6) if nc else None,
        "max_abs_weight_diff": max_dw if nz else None,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--profile", type=Path, default=Path("profiles/study-smollm2.yaml"))
    p.add_argument("--methods", nargs="+", default=["sparsegpt", "gptq"])
    p.add_argument("--batches", nargs="+", type=int, default=[1, 16])
    p.add_argument("--n", type=int, default=64, help="calibration samples (the profile's seq_len)")
    p.add_argument("--device", default=None, help="override the profile's model.device")
    p.add_argument("--out", type=Path, help="write the JSON result here too")
    a = p.parse_args()
    from safetensors.torch import load_file

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for method in a.methods:
            weights = {}
            for batch in a.batches:
                work = Path(tmp) / f"{method}-b{batch}"
                params = params_for(a.profile, work, n=a.n, method=method, batch=batch, device=a.device)
                generate(params, "c4", 0, progress=False)
                if torch.cuda.is_available():
                    torch.cuda.synchronize()
                t0 = time.perf_counter()
                manifest = compress(params, "c4", 0, method)
                wall = time.perf_counter() - t0
                weights[batch] = load_file(layout.checkpoint_dir(params, "c4", 0, method) / "model.safetensors")
                row = {
                    "method": method,
                    "batch_size": batch,
                    "n": a.n,
                    "seq_len": params.calibration.seq_len,
                    "oneshot_s": manifest.compress_seconds,
                    "wall_s": round(wall, 3),
                    "peak_cuda_bytes": manifest.verification.get("peak_cuda_bytes"),
                }
                if batch != a.batches[0]:
                    row[f"vs_batch_{a.batches[0]}"] = agreement(weights[a.batches[0]], weights[batch])
                rows.append(row)
                print(json.dumps(row), flush=True)
    result = {
        "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else platform.processor() or "cpu",
        "torch": torch.__version__,
        "profile": str(a.profile),
        "rows": rows,
    }
    text = json.dumps(result, indent=2)
    print(text)
    if a.out:
        a.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
