"""Self-calibration throughput: selfcal's lockstep generator against what a user would otherwise run.

One process, one model, one device; every generator samples BOS-only, pure ancestral sampling:

- ``lockstep``: ``generate_self_calibration`` (static KV cache, per-row restarts, CUDA graphs on CUDA);
  ms per step, and the GPU's busy fraction from the profiler over the timed steps.
- ``rounds``: the generator this replaced (benchmarks/rounds_generator.py), until it is deleted.
- ``hf_generate``: transformers ``generate``, all rows at once (dynamic cache), and ``hf_static``
  with ``cache_implementation="static"``; EOS suppressed (min_new_tokens) so rows fill to length.
- ``hf_continuous``: transformers continuous batching (``generate_batch``), one request per row.
- ``one_by_one``: ``generate`` per sequence.
- ``bound``: bytes a step must read (weights once, each row's live KV cache) over the measured
  device copy bandwidth, summed over the steps of the lockstep run.

The slower baselines run on fewer or shorter rows (their own ``--*-seq-len``/``--*-n``); tokens/s
is per generated token either way, and the shorter length flatters them (their step cost grows
with the cache). ``--check-rows`` re-generates that many rows in float32 and replays them by full
recomputation without any cache (``selfcal.calibration.replay``): tokens must be identical.

    python benchmarks/generate.py --model ../shared/models/stories260K --n 128 --seq-len 256
    python benchmarks/generate.py --model SmolLM2-135M-Instruct --dtype bfloat16 --n 128 --seq-len 2048
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.rounds_generator import generate_self_calibration as rounds_generate  # noqa: E402
from selfcal.calibration.generator import generate_self_calibration  # noqa: E402
from selfcal.calibration.schedule import LinearSchedule  # noqa: E402

SCHEDULE = LinearSchedule(1.0, 1.0, 10)


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def timed(device: str, fn):
    sync(device)
    t0 = time.perf_counter()
    out = fn()
    sync(device)
    return out, time.perf_counter() - t0


def load(path: str, dtype: str, device: str):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=getattr(torch, dtype), use_safetensors=True)
    model = model.to(device).eval()
    cfg = model.config
    bos = cfg.bos_token_id if cfg.bos_token_id is not None else cfg.eos_token_id
    gen_eos = getattr(model.generation_config, "eos_token_id", None)
    eos = sorted({*(gen_eos if isinstance(gen_eos, list) else [gen_eos]), cfg.eos_token_id} - {None})
    return model, bos, eos


def row(name, tokens, seconds, **extra) -> dict:
    return {
        "generator": name,
        "tokens": int(tokens),
        "seconds": round(seconds, 3),
        "tokens_per_s": tokens / seconds,
        **extra,
    }


def lockstep(model, args, bos, eos) -> dict:
    kw = dict(n=args.n, seq_len=args.seq_len, bos_id=bos, eos_id=eos, schedule=SCHEDULE, seed=0, progress=False)
    kw["batch_size"] = args.batch_size if args.batch_size == "auto" else int(args.batch_size)
    generate_self_calibration(model, **{**kw, "n": min(args.n, 8), "seq_len": min(args.seq_len, 64)})  # warm-up
    (tokens, stats), seconds = timed(args.device, lambda: generate_self_calibration(model, **kw))
    out = row(
        "lockstep",
        tokens.size,
        seconds,
        rows=args.n,
        seq_len=args.seq_len,
        batch=stats.batch_size,
        forward_steps=stats.forward_steps,
        ms_per_step=1000 * seconds / stats.forward_steps,
        generations=stats.generations,
        cuda_graphs=stats.cuda_graphs,
    )
    if args.device.startswith("cuda"):
        out["gpu_busy"] = busy_fraction(model, args, bos, eos)
    return out, tokens


def busy_fraction(model, args, bos, eos) -> float:
    """Kernel time over wall time for one whole lockstep run of a short set (profiler)."""
    from torch.profiler import ProfilerActivity, profile

    seq = min(args.seq_len, 256)
    kw = dict(n=args.n, seq_len=seq, bos_id=bos, eos_id=eos, schedule=SCHEDULE, seed=1, progress=False)
    kw["batch_size"] = args.batch_size if args.batch_size == "auto" else int(args.batch_size)
    generate_self_calibration(model, **kw)
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        _, wall = timed(args.device, lambda: generate_self_calibration(model, **kw))
    kernel_us = sum(e.device_time_total for e in prof.key_averages() if e.device_type.name == "CUDA")
    if args.out_dir:
        table = prof.key_averages().table(sort_by="device_time_total", row_limit=25)
        (Path(args.out_dir) / "lockstep_profile.txt").write_text(table)
    return min(1.0, kernel_us / 1e6 / wall)


def rounds(model, args, bos, eos) -> dict:
    n, seq = args.rounds_n or args.n, args.rounds_seq_len or args.seq_len
    kw = dict(n=n, seq_len=seq, bos_id=bos, eos_id=eos, schedule=SCHEDULE, seed=0, batch_size=n, progress=False)
    (tokens, stats), seconds = timed(args.device, lambda: rounds_generate(model, **kw))
    return row(
        "rounds (before)",
        tokens.size,
        seconds,
        rows=n,
        seq_len=seq,
        forward_steps=stats.forward_steps,
        ms_per_step=1000 * seconds / stats.forward_steps,
    )


@torch.inference_mode()
def hf_generate(model, args, bos, static: bool) -> dict:
    n, seq = args.hf_n or args.n, args.hf_seq_len or args.seq_len
    new = seq - 1
    ids = torch.full((n, 1), bos, device=args.device)
    extra = {"cache_implementation": "static"} if static else {}
    gen = dict(do_sample=True, temperature=1.0, top_k=0, top_p=1.0, max_new_tokens=new, min_new_tokens=new, **extra)
    model.generate(
        input_ids=ids[:2],
        attention_mask=torch.ones_like(ids[:2]),
        pad_token_id=bos,
        **{**gen, "max_new_tokens": 4, "min_new_tokens": 4},
    )
    out, seconds = timed(
        args.device, lambda: model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), pad_token_id=bos, **gen)
    )
    name = "hf generate, static cache" if static else "hf generate"
    return row(name, out.numel(), seconds, rows=n, seq_len=seq, forward_steps=new, ms_per_step=1000 * seconds / new)


def hf_continuous(model, args, bos) -> dict:
    from transformers import GenerationConfig

    n, new = args.cb_n or args.n, args.cb_new_tokens
    cfg = GenerationConfig(
        do_sample=True, temperature=1.0, top_k=0, top_p=1.0, max_new_tokens=new, eos_token_id=None, pad_token_id=bos
    )
    model.generate_batch(inputs=[[bos]] * 2, generation_config=cfg, max_new_tokens=4)
    out, seconds = timed(args.device, lambda: model.generate_batch(inputs=[[bos]] * n, generation_config=cfg))
    tokens = sum(len(o.generated_tokens) + 1 for o in out.values())
    return row("hf continuous batching", tokens, seconds, rows=n, seq_len=new + 1)


@torch.inference_mode()
def one_by_one(model, args, bos) -> dict:
    seq = args.naive_seq_len or args.seq_len
    new = seq - 1

    def loop():
        total = 0
        for _ in range(args.naive_n):
            out = model.generate(
                input_ids=torch.tensor([[bos]], device=args.device),
                do_sample=True,
                temperature=1.0,
                top_k=0,
                top_p=1.0,
                max_new_tokens=new,
                min_new_tokens=new,
                pad_token_id=bos,
            )
            total += out.numel()
        return total

    total, seconds = timed(args.device, loop)
    return row("one generate per sequence", total, seconds, rows=args.naive_n, seq_len=seq)


def candidates(model, args, bos, eos) -> list[dict]:
    """The lockstep generator with other attention windows and kernels (one full run each)."""
    out = []
    for spec in filter(None, args.candidates.split(",")):
        attention, _, chunk = spec.partition(":")
        name = {"matmul": "selfcal_lockstep", "sdpa": "selfcal_lockstep_sdpa"}[attention]
        window = int(chunk) if chunk else args.seq_len
        kw = dict(n=args.n, seq_len=args.seq_len, bos_id=bos, eos_id=eos, schedule=SCHEDULE, seed=0, progress=False)
        kw.update(batch_size="auto", window_chunk=window, attention=name)
        (tokens, stats), seconds = timed(args.device, lambda kw=kw: generate_self_calibration(model, **kw))
        label = f"lockstep, {attention} attention, window chunk {window}"
        r = row(label, tokens.size, seconds, rows=args.n, seq_len=args.seq_len, forward_steps=stats.forward_steps)
        r["ms_per_step"] = 1000 * seconds / stats.forward_steps
        print(json.dumps(r), flush=True)
        out.append(r)
    return out


def pool(model, args, bos, eos) -> list[dict]:
    """Ji et al.'s pool (temperature 0.6, top-k 50, top-p 0.95, repetition penalty 1.2, stop at EOS):
    selfcal's pool engine against batched ``generate`` as the paper's code runs it."""
    from selfcal.calibration.pool import PoolSampling, generate_pool

    g = torch.Generator().manual_seed(0)
    prompts = [[bos, int(t)] for t in torch.randint(10, model.config.vocab_size, (args.pool,), generator=g)]
    ji = PoolSampling(temperature=0.6, top_k=50, top_p=0.95, repetition_penalty=1.2)
    kw = dict(max_new_tokens=args.pool_new, eos_ids=eos, sampling=ji, seed=0, batch_size=args.pool_batch)
    generate_pool(model, prompts[:4], **{**kw, "max_new_tokens": 8})
    res, seconds = timed(args.device, lambda: generate_pool(model, prompts, **kw))
    toks = sum(len(x) for x in res.generations)
    ours = row("pool engine (Ji settings)", toks, seconds, rows=args.pool, seq_len=args.pool_new + 2)
    ours.update(
        forward_steps=res.forward_steps,
        ms_per_step=1000 * seconds / res.forward_steps,
        stopped_at_eos=sum(res.stopped_at_eos),
        batch=res.batch,
        cuda_graphs=res.cuda_graphs,
    )
    if args.device.startswith("cuda") and args.out_dir:
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            generate_pool(model, prompts[: args.pool_batch], **{**kw, "max_new_tokens": 64})
            sync(args.device)
        table = prof.key_averages().table(sort_by="device_time_total", row_limit=25)
        (Path(args.out_dir) / "pool_profile.txt").write_text(table)

    @torch.inference_mode()
    def hf():
        total = steps = 0
        for i in range(0, args.pool, args.pool_batch):
            batch = torch.tensor(prompts[i : i + args.pool_batch], device=args.device)
            out = model.generate(
                input_ids=batch,
                attention_mask=torch.ones_like(batch),
                do_sample=True,
                temperature=0.6,
                top_p=0.95,
                top_k=50,
                repetition_penalty=1.2,
                max_new_tokens=args.pool_new,
                eos_token_id=eos,
                pad_token_id=eos[0],
            )
            steps += out.shape[1] - 2
            eos_t = torch.tensor(eos, device=out.device)
            for r in out[:, 2:]:
                hit = torch.nonzero(torch.isin(r, eos_t)).flatten()
                total += 2 + (int(hit[0]) + 1 if hit.numel() else r.numel())
        return total, steps

    (hf_tokens, hf_steps), hf_seconds = timed(args.device, hf)
    theirs = row(
        "hf generate in batches (Ji settings)", hf_tokens, hf_seconds, rows=args.pool, seq_len=args.pool_new + 2
    )
    theirs.update(forward_steps=hf_steps, ms_per_step=1000 * hf_seconds / hf_steps)
    return [ours, theirs]


def copy_bandwidth(device: str) -> float:
    """Bytes read + written per second by a large device-to-device copy (the memory ceiling)."""
    if not device.startswith("cuda"):
        return float("nan")
    x = torch.empty(1 << 30, dtype=torch.uint8, device=device)
    y = torch.empty_like(x)
    for _ in range(3):
        y.copy_(x)
    sync(device)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(20):
        y.copy_(x)
    end.record()
    sync(device)
    return 2 * x.numel() * 20 / (start.elapsed_time(end) / 1000)


def bound(model, args, tokens, bandwidth: float) -> dict:
    """Fewest bytes per step: every weight once, each row's live KV (its generation so far) once."""
    import numpy as np

    cfg = model.config
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    kv_heads = getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    per_token = 2 * cfg.num_hidden_layers * kv_heads * head_dim * next(model.parameters()).element_size()
    eos = set(args.eos)
    live = 0
    for r in tokens:
        start = 0
        for p in range(len(r) - 1):
            live += p - start + 1
            if int(r[p]) in eos:
                start = p + 1
    steps = tokens.shape[1] - 1
    total_bytes = weights * steps * int(np.ceil(tokens.shape[0] / max(1, args.bound_batch))) + live * per_token
    seconds = total_bytes / bandwidth
    return row("bandwidth bound", tokens.size, seconds, bytes_per_step=total_bytes / steps, bandwidth=bandwidth)


def replay_check(args, bos, eos) -> dict:
    """Rows generated in float32 on this device, replayed by full recomputation: identical tokens."""
    from selfcal.calibration.lockstep import LockstepRows, plan_for
    from selfcal.calibration.replay import replay
    from selfcal.calibration.sampling import row_uniforms

    model, _, _ = load(args.model, "float32", args.device)
    rows = range(args.check_rows)
    engine = LockstepRows(
        model, plan_for(bos_id=bos, eos_id=eos, schedule=SCHEDULE), row_uniforms(7, rows, args.seq_len), logprobs=True
    )
    engine.run()
    tokens = engine.out.cpu().numpy()
    rep = replay(
        model,
        tokens,
        seed=7,
        rows=rows,
        bos_id=bos,
        eos_ids=eos,
        schedule=SCHEDULE,
        logprobs=engine.logprobs.cpu().numpy(),
    )
    pool_check = None
    if args.pool:
        from selfcal.calibration.pool import PoolSampling, generate_pool, process_logits
        from selfcal.calibration.sampling import inverse_cdf as draw

        ji = PoolSampling(temperature=0.6, top_k=50, top_p=0.95, repetition_penalty=1.2)
        g = torch.Generator().manual_seed(1)
        prompts = [[bos, int(x)] for x in torch.randint(10, model.config.vocab_size, (args.check_rows,), generator=g)]
        res = generate_pool(model, prompts, max_new_tokens=128, eos_ids=eos, sampling=ji, seed=2, batch_size=4)
        u = row_uniforms(2, range(len(prompts)), 130)
        bad = total = 0
        with torch.inference_mode():
            for i, gen in enumerate(res.generations):
                ids = torch.tensor([gen], device=args.device)
                logits = model(input_ids=ids).logits[0]
                for q in range(2, len(gen)):
                    seen = torch.zeros(1, logits.shape[-1], dtype=torch.bool, device=args.device)
                    seen[0, ids[0, :q]] = True
                    tok = int(draw(process_logits(logits[q - 1 : q], ji, seen), u[i, q : q + 1].to(args.device))[0])
                    bad += tok != gen[q]
                    total += 1
        pool_check = {"generations": len(prompts), "tokens": total, "mismatched_tokens": bad}
    del model
    return {
        "pool_check": pool_check,
        "rows": args.check_rows,
        "seq_len": args.seq_len,
        "generations": rep.generations,
        "mismatched_tokens": rep.mismatches,
        "max_logprob_diff": rep.max_logprob_diff,
        "max_tie_distance": rep.max_tie_distance,
        "cuda_graphs": engine.use_graphs,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=str(Path(__file__).resolve().parents[2] / "shared/models/stories260K"))
    p.add_argument("--n", type=int, default=128, help="rows for the lockstep generator")
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--batch-size", default="auto")
    p.add_argument("--rounds-n", type=int, help="rows for the old rounds generator (default --n)")
    p.add_argument("--rounds-seq-len", type=int, help="length for the old rounds generator (default --seq-len)")
    p.add_argument("--hf-n", type=int)
    p.add_argument("--hf-seq-len", type=int)
    p.add_argument("--cb-n", type=int)
    p.add_argument("--cb-new-tokens", type=int, default=255)
    p.add_argument("--naive-n", type=int, default=4)
    p.add_argument("--naive-seq-len", type=int)
    p.add_argument("--skip", default="", help="comma list of: rounds,hf,hf_static,cb,naive,check")
    p.add_argument("--check-rows", type=int, default=4)
    p.add_argument("--candidates", default="", help="lockstep variants, e.g. matmul:64,matmul:2048,sdpa:128")
    p.add_argument("--pool", type=int, default=0, help="also time a Ji-style pool of this many prompts")
    p.add_argument("--pool-new", type=int, default=256, help="max new tokens per pool generation")
    p.add_argument("--pool-batch", type=int, default=128, help="rows at once for the pool (both sides)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--out-dir", help="write result.json (and the profile) here")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    skip = set(filter(None, args.skip.split(",")))
    model, bos, eos = load(args.model, args.dtype, args.device)
    args.eos = eos
    results = []
    failed: list[str] = []

    def run(name, fn):
        print(f"-- {name}", flush=True)
        try:
            r = fn()
        except Exception as exc:  # one baseline failing must not lose the others' numbers
            print(f"{name} failed: {type(exc).__name__}: {exc}", flush=True)
            failed.append(f"{name}: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}")
            return
        print(json.dumps(r), flush=True)
        results.append(r)

    new, tokens = lockstep(model, args, bos, eos)
    results.append(new)
    print(json.dumps(new), flush=True)
    if args.candidates:
        print("-- candidates", flush=True)
        results.extend(candidates(model, args, bos, eos))
    pool_rows = []
    if args.pool:
        print("-- pool", flush=True)
        try:
            pool_rows = pool(model, args, bos, eos)
        except Exception as exc:
            failed.append(f"pool: {type(exc).__name__}: {exc}")
            print(f"pool failed: {exc}", flush=True)
        for r in pool_rows:
            print(json.dumps(r), flush=True)
    if "rounds" not in skip:
        run("rounds", lambda: rounds(model, args, bos, eos))
    if "hf" not in skip:
        run("hf generate", lambda: hf_generate(model, args, bos, static=False))
    if "hf_static" not in skip:
        run("hf static", lambda: hf_generate(model, args, bos, static=True))
    if "cb" not in skip:
        run("hf continuous", lambda: hf_continuous(model, args, bos))
    if "naive" not in skip:
        run("one by one", lambda: one_by_one(model, args, bos))
    bw = copy_bandwidth(args.device)
    args.bound_batch = new["batch"]
    if bw == bw:
        results.append(bound(model, args, tokens, bw))
    check = replay_check(args, bos, eos) if "check" not in skip else None
    device = (
        torch.cuda.get_device_name()
        if args.device.startswith("cuda")
        else f"{platform.processor() or platform.machine()} x{torch.get_num_threads()} threads"
    )
    summary = {
        "model": args.model,
        "device": device,
        "dtype": args.dtype,
        "torch": torch.__version__,
        "results": results,
        "replay_check": check,
    }
    if args.out_dir:
        Path(args.out_dir).mkdir(parents=True, exist_ok=True)
        (Path(args.out_dir) / "result.json").write_text(json.dumps(summary, indent=2) + "\n")
    base = new["tokens_per_s"]
    print(f"\n{Path(args.model).name} on {device}, {args.dtype}, lockstep at {args.n} x {args.seq_len}")
    print("| generator | rows x len | tokens/s | ms/step | lockstep is |")
    print("|---|---|---|---|---|")
    for r in results:
        shape = f"{r.get('rows', args.n)} x {r.get('seq_len', args.seq_len)}"
        ms = f"{r['ms_per_step']:.2f}" if "ms_per_step" in r else "-"
        ratio = base / r["tokens_per_s"]
        print(f"| {r['generator']} | {shape} | {r['tokens_per_s']:,.0f} | {ms} | {ratio:.2f}x |")
    if pool_rows:
        print(f"\nJi-style pool: {args.pool} prompts, up to {args.pool_new} new tokens, {args.pool_batch} rows at once")
        print("| generator | tokens | tokens/s | forward steps | ms/step |")
        print("|---|---|---|---|---|")
        for r in pool_rows:
            print(
                f"| {r['generator']} | {r['tokens']:,} | {r['tokens_per_s']:,.0f} | "
                f"{r['forward_steps']:,} | {r['ms_per_step']:.2f} |"
            )
        print(f"pool engine is {pool_rows[0]['tokens_per_s'] / pool_rows[1]['tokens_per_s']:.2f}x batched generate")
    if "gpu_busy" in new:
        print(f"lockstep GPU busy fraction: {new['gpu_busy']:.2f}; CUDA graphs: {new['cuda_graphs']}")
    if check:
        print(
            f"replay check (float32, {check['rows']} rows): {check['mismatched_tokens']} mismatched tokens, "
            f"{check['generations']} generations, max |dlogprob| {check['max_logprob_diff']:.2e}, "
            f"mismatched uniforms at most {check['max_tie_distance']:.1e} outside the reference's interval"
        )
        if check.get("pool_check"):
            pc = check["pool_check"]
            print(
                f"pool replay check (float32, Ji settings): {pc['mismatched_tokens']} of {pc['tokens']} tokens "
                f"differ from a full recompute of {pc['generations']} generations"
            )


if __name__ == "__main__":
    main()
