"""One generator, one set, for `farm-bench` A/B pairs on a CPU (whole process, paired runs):

    farm-bench -n 5 --timeout 600 --vs "python benchmarks/generate_cpu_pair.py rounds" -- \\
        python benchmarks/generate_cpu_pair.py lockstep
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.rounds_generator import generate_self_calibration as rounds  # noqa: E402
from selfcal.calibration.generator import generate_self_calibration as lockstep  # noqa: E402
from selfcal.calibration.schedule import LinearSchedule  # noqa: E402


def main() -> None:
    from transformers import AutoModelForCausalLM

    which = sys.argv[1]
    path = sys.argv[2] if len(sys.argv) > 2 else str(Path(__file__).resolve().parents[2] / "shared/models/stories260K")
    model = AutoModelForCausalLM.from_pretrained(path, use_safetensors=True).eval()
    fn = {"lockstep": lockstep, "rounds": rounds}[which]
    kw = dict(n=128, seq_len=256, bos_id=1, eos_id=2, schedule=LinearSchedule(1.0, 1.0, 10), seed=0, progress=False)
    tokens, _ = fn(model, batch_size=128, **kw)
    assert tokens.shape == (128, 256)


if __name__ == "__main__":
    main()
