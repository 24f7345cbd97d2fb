"""The paper's temperature schedule (Williams et al., arXiv 2410.17170, Sec. 3).

t_i = t_init + (i / n) * (t_final - t_init) for generation step i <= n, then t_final.
Step 0 is the first token sampled after BOS. Each concatenated generation (after an
EOS) starts the schedule again, since it is an independent sample from BOS.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class LinearSchedule:
    t_initial: float
    t_final: float
    steps: int

    def __post_init__(self) -> None:
        if self.t_initial < 0 or self.t_final < 0:
            raise ValueError("temperatures must be >= 0")
        if self.steps < 0:
            raise ValueError("schedule steps must be >= 0")

    def __call__(self, step: int) -> float:
        if step < 0:
            raise ValueError(f"step must be >= 0, got {step}")
        if self.steps == 0 or step >= self.steps:
            return self.t_final
        return self.t_initial + (step / self.steps) * (self.t_final - self.t_initial)
