"""Items sharing one GPU: K processes at once taking turns on it (CUDA's default) against running side by side
through MPS (``selfcal run --mps``), with one process alone as the bound, in one run.

Each process does what a generate item does on the GPU: it loads the model and generates n x L self-calibration
tokens with the lockstep generator (seed = its index, temperature 1.0), then prints its times and a digest of
the tokens. The configurations, one after the other:

- alone: one process (K processes side by side can at best finish in this time, until the GPU is full)
- time-slicing: K processes at once, no MPS daemon
- mps: K processes at once through a daemon started as ``selfcal run --mps`` starts it (``flows/mps.py``);
  where it cannot start, the row says why and nothing runs

Each process gets the environment a stage item on a slot gets (``flows/slots.py``: the one GPU, shared by K;
on a CPU, its share of the cores, where this only checks the harness). The K processes load their models, then
wait at a barrier: the parent releases them together once all K are loaded, so their generations overlap
from the first step. Loads end at different times (8.8-12.5 s on the H200 in lease 12): without the barrier
the first processes generate with fewer neighbours, and the sum of their own rates overstated the GPU's
throughput. Reported per configuration: wall time from the first start to the last exit; the generation
span, from the release to the last process's end; the **throughput**, all K processes' tokens over that span
(what the GPU did); the sum of each process's own tokens/s beside it (the measure of lease 12, before the
barrier); each process's load and generation seconds; and whether each seed's tokens are bit-identical to the
time-slicing run's (MPS runs the same kernels; a difference would be a finding). The last line is a verdict:
``mps`` when MPS made the same tokens at 1.1x time-slicing's throughput or more, else ``time-slicing``.

    python benchmarks/gpu_sharing.py --model ~/.cache/selfcal-models/SmolLM2-135M-Instruct --copies 6 \\
        --n 128 --seq-len 512 --out benchmarks/results/gpu-sharing-h200-smollm2.json
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

#: the barrier's two lines: a copy says READY once loaded, and generates on the parent's GO
READY, GO = "gpu_sharing: ready", "go"


def worker(args) -> None:
    import torch

    from benchmarks.generate import SCHEDULE, load
    from selfcal.calibration.generator import generate_self_calibration

    t0 = time.perf_counter()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model, bos, eos = load(args.model, args.dtype if device == "cuda" else "float32", device)
    loaded = time.perf_counter() - t0
    print(READY, flush=True)  # the barrier: generate only once the parent has every copy loaded
    if sys.stdin.readline().strip() != GO:
        raise SystemExit("gpu_sharing worker: no go from the parent")
    started = time.time()
    tokens, stats = generate_self_calibration(
        model,
        n=args.n,
        seq_len=args.seq_len,
        bos_id=bos,
        eos_id=eos,
        schedule=SCHEDULE,
        seed=args.worker,
        batch_size=args.n,
        progress=False,
    )
    print(
        json.dumps(
            {
                "seed": args.worker,
                "device": device,
                "load_seconds": round(loaded, 2),
                "generation_seconds": round(stats.seconds, 2),
                "generation_start": started,
                "generation_end": time.time(),
                "tokens": int(stats.tokens),
                "tokens_per_s": round(stats.tokens / stats.seconds, 1),
                "cuda_graphs": stats.cuda_graphs,
                "digest": hashlib.sha256(tokens.tobytes()).hexdigest()[:16],
            }
        )
    )


def slots(copies: int):
    """What a stage item on a slot gets (``flows/slots.py``): the first GPU, shared by ``copies``, or a share of
    the cores."""
    from flows.slots import plan_slots, visible_gpus

    return plan_slots(copies, visible_gpus()[:1], copies)


def run_copies(args, copies: int, env: dict[str, str], over: dict[str, str] | None = None) -> dict:
    """``copies`` workers at once, each with a slot's environment (then ``over``: a daemon's, as the flow adds),
    released together once all have loaded; their tokens over the span from the release to the last end."""
    cmd = [sys.executable, __file__, "--worker"]
    common = ["--model", args.model, "--dtype", args.dtype, "--n", str(args.n), "--seq-len", str(args.seq_len)]
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as logs:
        # stderr to files, not pipes: a copy that logs while the parent waits at the barrier must not block
        errs = [open(Path(logs) / f"{i}.err", "w") for i in range(copies)]  # noqa: SIM115 (closed below)
        procs = [
            subprocess.Popen(
                [*cmd, str(i), *common],
                env={**env, **slot.env(), **(over or {})},
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=errs[i],
                text=True,
            )
            for i, slot in enumerate(slots(copies))
        ]
        results = []
        try:
            for i, p in enumerate(procs):
                if not _wait_ready(p):
                    p.wait()
                    raise SystemExit(f"a copy failed before generating ({p.returncode}): {_last_line(logs, i)}")
            released = time.time()
            for p in procs:
                p.stdin.write(GO + "\n")
                p.stdin.close()
            for i, p in enumerate(procs):
                out = p.stdout.read()
                p.wait()
                if p.returncode != 0:
                    raise SystemExit(f"a copy failed ({p.returncode}): {_last_line(logs, i)}")
                results.append(json.loads(out.strip().splitlines()[-1]))
        finally:  # a failed copy or a TERM: no copy is left running (an MPS daemon's quit waits for its clients)
            for p in procs:
                if p.poll() is None:
                    p.kill()
                    p.wait()
            for f in errs:
                f.close()
    wall = time.perf_counter() - start
    return {"copies": copies, "wall_seconds": round(wall, 2), **throughput(results, released), "processes": results}


def throughput(results: list[dict], released: float) -> dict:
    """What the GPU did: every copy's tokens over the span from the release to the last copy's end. The sum of
    each copy's own rate is kept beside it; it equals the throughput only when all generations overlap
    exactly, and overstates it otherwise."""
    span = max(r["generation_end"] for r in results) - released
    return {
        "generation_span_seconds": round(span, 3),
        "throughput_tokens_per_s": round(sum(r["tokens"] for r in results) / span, 1),
        "sum_of_process_rates": round(sum(r["tokens_per_s"] for r in results), 1),
    }


def _wait_ready(p: subprocess.Popen) -> bool:
    """Until the copy says it has loaded (True), or exits first (False); lines before it are not the barrier's."""
    for line in p.stdout:
        if line.strip() == READY:
            return True
    return False


def _last_line(logs: str, i: int) -> str:
    lines = (Path(logs) / f"{i}.err").read_text().strip().splitlines()
    return lines[-1] if lines else "(no stderr)"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", required=True, help="a causal LM folder (safetensors)")
    ap.add_argument("--dtype", default="bfloat16", help="on CUDA (the CPU uses float32)")
    ap.add_argument("--copies", type=int, default=6, help="processes at once (K)")
    ap.add_argument("--n", type=int, default=128, help="sequences per process")
    ap.add_argument("--seq-len", type=int, default=512, help="tokens per sequence")
    ap.add_argument("--worker", type=int, default=None, help=argparse.SUPPRESS)
    ap.add_argument("--out", type=Path, help="JSON of every configuration")
    args = ap.parse_args()
    if args.worker is not None:
        return worker(args)

    from flows import mps

    env = {k: v for k, v in os.environ.items() if k not in (mps.PIPE_ENV, mps.LOG_ENV)}
    rows = {"alone": run_copies(args, 1, env), "time-slicing": run_copies(args, args.copies, env)}
    # the daemon's directory is the workspace's, as `selfcal run --mps` there makes it: `study_box.sh stop` (and
    # the next run) end one a TERM left; a TERM (the lease plan's `timeout`) ends this benchmark through its
    # `finally`, so the daemon goes with it
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    try:
        slot = slots(args.copies)[0]
        if slot.gpu is None:
            raise mps.MpsUnavailable("no GPU here")
        daemon = mps.start(Path.cwd(), device_order=slot.env().get("CUDA_DEVICE_ORDER"))
    except mps.MpsUnavailable as e:
        rows["mps"] = {"copies": args.copies, "unavailable": str(e)}
    else:
        try:
            # as the flow hands it to its items: the daemon's directories, the GPU as the server numbers it
            over = {**daemon.env(), "CUDA_VISIBLE_DEVICES": mps.client_devices([slot.gpu])[slot.gpu]}
            rows["mps"] = {**run_copies(args, args.copies, env, over), "daemon": daemon.describe()}
        finally:
            mps.stop(daemon.pipe)
    reference = {p["seed"]: p["digest"] for p in rows["time-slicing"]["processes"]}
    for row in rows.values():
        for p in row.get("processes", []):
            p["same_tokens_as_time_slicing"] = reference.get(p["seed"]) == p["digest"]
    result = {"model": args.model, "n": args.n, "seq_len": args.seq_len, "configurations": rows}
    if args.out:
        args.out.write_text(json.dumps(result, indent=1) + "\n")
    for name, row in rows.items():
        if "unavailable" in row:
            print(f"{name}: unavailable: {row['unavailable']}")
            continue
        same = all(p["same_tokens_as_time_slicing"] for p in row["processes"])
        print(
            f"{name}: {row['copies']} process(es), wall {row['wall_seconds']} s, generation span "
            f"{row['generation_span_seconds']} s, {row['throughput_tokens_per_s']:,.0f} tokens/s in all (sum of the "
            f"processes' own rates {row['sum_of_process_rates']:,.0f}), tokens same as time-slicing: {same}"
        )
    print(f"verdict: {verdict(rows)}")


def verdict(rows: dict) -> str:
    """``mps`` when it ran, made every seed's tokens bit-identical and gave 1.1x time-slicing's throughput or
    more; else ``time-slicing`` (the last line, for a script to pick ``--mps`` by)."""
    m, t = rows["mps"], rows["time-slicing"]
    ok = "processes" in m and all(p["same_tokens_as_time_slicing"] for p in m["processes"])
    return "mps" if ok and m["throughput_tokens_per_s"] >= 1.1 * t["throughput_tokens_per_s"] else "time-slicing"


if __name__ == "__main__":
    main()
