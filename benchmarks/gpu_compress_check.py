"""Run every compression method on a GPU and reload the result there (used with the device tool).

python benchmarks/gpu_compress_check.py MODEL_DIR OUT_DIR
"""

import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from selfcal.calibration.generator import generate_self_calibration  # noqa: E402
from selfcal.calibration.schedule import LinearSchedule  # noqa: E402
from selfcal.compression import apply  # noqa: E402
from selfcal.config import CompressionConfig  # noqa: E402


def main(model_dir: str, out_dir: str) -> None:
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    base = AutoModelForCausalLM.from_pretrained(model_dir).cuda().eval()
    tokens, _ = generate_self_calibration(
        base,
        n=128,
        seq_len=512,
        bos_id=tok.bos_token_id,
        eos_id=tok.eos_token_id,
        schedule=LinearSchedule(1, 1, 10),
        seed=0,
        batch_size=128,
        progress=False,
    )
    quant = {"group_size": 32, "skip_indivisible": True}
    cfg = CompressionConfig(methods=["gptq", "awq", "sparsegpt", "wanda"], gptq=quant, awq=quant)
    config = AutoConfig.from_pretrained(model_dir).to_dict()
    report = {"device": torch.cuda.get_device_name(), "torch": torch.__version__}
    ids = torch.tensor(tokens[:4, :128], dtype=torch.long).cuda()
    for method in cfg.methods:
        model = AutoModelForCausalLM.from_pretrained(model_dir).cuda().eval()
        out = Path(out_dir) / method
        t0 = time.perf_counter()
        manifest = apply.compress(
            model, tok, tokens, apply.plan(method, cfg, config), out, manifest_fields={}, base_dir=Path(model_dir)
        )
        seconds = time.perf_counter() - t0
        reloaded = AutoModelForCausalLM.from_pretrained(out).cuda().eval()
        with torch.no_grad():
            logits = reloaded(input_ids=ids).logits
            nll = torch.nn.functional.cross_entropy(
                logits[:, :-1].reshape(-1, logits.shape[-1]).float(), ids[:, 1:].reshape(-1)
            )
        report[method] = {
            "seconds": round(seconds, 2),
            "reload_device": str(next(reloaded.parameters()).device),
            "finite": bool(torch.isfinite(logits).all()),
            "nll_on_calib": float(nll),
            "verification": {k: v for k, v in manifest.verification.items() if k not in ("skipped_layers",)},
        }
        print(method, json.dumps(report[method]), flush=True)
    Path(out_dir, "gpu_compress.json").write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
