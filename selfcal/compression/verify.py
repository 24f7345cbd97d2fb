"""Check that a saved checkpoint is what its method claims, from the files on disk.

Pruning: every targeted layer's measured sparsity and N:M compliance (the share of
M-wide input groups with at most N non-zeros, which must be exactly 1). Quantization:
the most distinct values any quantization group holds (at most 2**bits) and the
relative reconstruction error ||W_q - W_ref|| / ||W_ref|| per layer. Untouched: every
tensor outside what the method may change (embeddings, lm_head, norms, ignored and
skipped layers) is bit-identical to the base model's, tied or untied. Any violation
fails the stage: a checkpoint that does not verify is never published.
"""

from __future__ import annotations

from pathlib import Path

import torch

from selfcal.errors import VerificationError


def load_dense(checkpoint: Path):
    """The checkpoint as transformers serves it, decompressed to dense weights."""
    import json

    from transformers import AutoModelForCausalLM
    from transformers.utils.quantization_config import CompressedTensorsConfig

    kwargs = {}
    if "quantization_config" in json.loads((checkpoint / "config.json").read_text()):
        kwargs["quantization_config"] = CompressedTensorsConfig(run_compressed=False)
    return AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32, **kwargs)


def targeted_weights(model, targets: set[str]) -> dict[str, torch.Tensor]:
    """CPU float32 copies of the weights of the nn.Linear modules named in ``targets``."""
    return {
        name: m.weight.detach().float().cpu().clone()
        for name, m in model.named_modules()
        if isinstance(m, torch.nn.Linear) and name in targets
    }


def read_tensors(directory: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a model folder's safetensors files, as stored (no dtype change)."""
    from safetensors.torch import load_file

    files = sorted(directory.glob("*.safetensors"))
    if not files:
        raise VerificationError(f"{directory}: no .safetensors weights")
    out: dict[str, torch.Tensor] = {}
    for f in files:
        out.update(load_file(str(f)))
    return out


def _module_of(tensor_name: str) -> str:
    return tensor_name.rsplit(".", 1)[0] if "." in tensor_name else ""


def module_names(directory: Path) -> list[str]:
    """The modules that own a tensor in a model folder (from its safetensors headers)."""
    from safetensors import safe_open

    names: set[str] = set()
    for f in sorted(directory.glob("*.safetensors")):
        with safe_open(str(f), "pt") as handle:
            names.update(_module_of(k) for k in handle.keys())
    return sorted(names)


def _same_bits(base: torch.Tensor, saved: torch.Tensor) -> bool:
    """Bit-identical once the base tensor is in the dtype the model was compressed (and saved) in."""
    if base.shape != saved.shape:
        return False
    cast = base.to(saved.dtype).contiguous()
    return bool(torch.equal(cast.view(torch.uint8), saved.contiguous().view(torch.uint8)))


def check_untouched(base_dir: Path, checkpoint: Path, changed_modules: set[str]) -> dict:
    """Every base tensor of a module outside ``changed_modules`` is in the checkpoint, bit-identical;
    the checkpoint adds no tensor outside them. The first violation is an error naming the tensor.

    Tied embeddings are stored once (``model.embed_tokens.weight``), so a pruned or quantized
    lm_head of a tied model shows up here as a changed embedding.
    """
    base = read_tensors(base_dir)
    saved = read_tensors(checkpoint)
    checked = 0
    for name, tensor in base.items():
        if _module_of(name) in changed_modules:
            continue
        if name not in saved:
            raise VerificationError(f"{name}: left untouched by the method, but missing from the saved checkpoint")
        if not _same_bits(tensor, saved[name]):
            raise VerificationError(
                f"{name}: must be bit-identical to the base model, but the saved checkpoint differs"
            )
        checked += 1
    extra = [n for n in saved if n not in base and _module_of(n) not in changed_modules]
    if extra:
        raise VerificationError(f"{extra[0]}: the saved checkpoint adds a tensor outside the compressed layers")
    return {"tensors_checked": checked, "tensors_changed": len(base) - checked}


def check_pruning(weights: dict[str, torch.Tensor], sparsity: float, n_m: tuple[int, int] | None) -> dict:
    layers = {}
    for name, w in weights.items():
        entry = {"sparsity": float((w == 0).float().mean())}
        if n_m:
            n, m = n_m
            if w.shape[1] % m:
                raise VerificationError(f"{name}: input width {w.shape[1]} is not a multiple of {m}")
            groups = (w.reshape(w.shape[0], -1, m) != 0).sum(-1)
            entry["nm_compliance"] = float((groups <= n).float().mean())
        layers[name] = entry
    bad = [n for n, e in layers.items() if e.get("nm_compliance", 1.0) < 1.0]
    if bad:
        raise VerificationError(
            f"{bad[0]}: {layers[bad[0]]['nm_compliance']:.4f} of groups keep the N:M pattern (must be 1)"
        )
    low = [n for n, e in layers.items() if e["sparsity"] < sparsity - 1e-3]
    if low:
        raise VerificationError(f"{low[0]}: sparsity {layers[low[0]]['sparsity']:.4f} below the requested {sparsity}")
    return layers


def check_round_trip(saved: dict[str, torch.Tensor], before: dict[str, torch.Tensor]) -> None:
    """The checkpoint, reloaded with transformers, holds exactly the weights the model had in memory."""
    for name, w in saved.items():
        if not torch.equal(w, before[name]):
            raise VerificationError(f"{name}: reloaded weights differ from the compressed model's before saving")


def max_values_per_group(w: torch.Tensor, group_size: int | None) -> int:
    groups = w.reshape(w.shape[0], -1, group_size) if group_size else w.unsqueeze(1)
    flat = groups.reshape(-1, groups.shape[-1])
    sorted_vals = flat.sort(dim=-1).values
    return int(((sorted_vals[:, 1:] != sorted_vals[:, :-1]).sum(-1) + 1).max())


def check_quantization(
    weights: dict[str, torch.Tensor], reference: dict[str, torch.Tensor], bits: int, group_size: int | None
) -> dict:
    layers = {}
    for name, w in weights.items():
        ref = reference[name]
        layers[name] = {
            "bits": bits,
            "group_size": group_size,
            "max_values_per_group": max_values_per_group(w, group_size),
            "rel_error": float((w - ref).norm() / ref.norm().clamp_min(1e-12)),
        }
    over = [n for n, e in layers.items() if e["max_values_per_group"] > 2**bits]
    if over:
        raise VerificationError(
            f"{over[0]}: a group holds {layers[over[0]]['max_values_per_group']} distinct values, more than 2**{bits}"
        )
    return layers


def size_on_disk(directory: Path) -> int:
    return sum(p.stat().st_size for p in directory.glob("*.safetensors"))


def peak_rss_bytes() -> int:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def summary(layers: dict[str, dict], family: str) -> dict:
    if not layers:
        return {}
    if family == "pruning":
        out = {"mean_sparsity": sum(e["sparsity"] for e in layers.values()) / len(layers)}
        if all("nm_compliance" in e for e in layers.values()):
            out["min_nm_compliance"] = min(e["nm_compliance"] for e in layers.values())
        return out
    return {
        "mean_rel_error": sum(e["rel_error"] for e in layers.values()) / len(layers),
        "max_values_per_group": max(e["max_values_per_group"] for e in layers.values()),
    }
