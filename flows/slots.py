"""Device slots: which GPU (and how many CPU threads) each concurrently running stage item gets.

A box with G GPUs and ``slots_per_gpu`` K has G x K slots; an item takes a free one for as long as its
``dvc`` runs and sees only that GPU (``CUDA_VISIBLE_DEVICES``), so items never share a GPU unless K > 1
asks for it (small models: several items on one H200). With K > 1, ``SELFCAL_GPU_SHARE`` tells the stage
to size automatic batches for 1/K of the GPU's free memory. Without a GPU a slot is a share of the CPU:
the cores are divided among the running items (``OMP_NUM_THREADS`` and friends, read by torch at start),
so N items do not each start one thread per core and thrash. Prefect's task runner bounds how many items
run; a limit only counts, it cannot say *which* GPU is free, hence this pool.
"""

from __future__ import annotations

import os
import queue
from contextlib import contextmanager
from dataclasses import dataclass

# The variables torch, OpenMP, MKL and OpenBLAS read for their thread pools at start.
THREAD_VARS = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")
GPU_SHARE_ENV = "SELFCAL_GPU_SHARE"


@dataclass(frozen=True)
class Slot:
    index: int
    gpu: str | None  # a CUDA device id as the box names it; None on a CPU-only box
    threads: int
    share: int  # items that may share this GPU at once (slots_per_gpu)
    extra: tuple[tuple[str, str], ...] = ()  # more variables for a GPU slot's items (an MPS daemon's directories)

    def env(self) -> dict[str, str]:
        out = {var: str(self.threads) for var in THREAD_VARS}
        if self.gpu is None:
            out["CUDA_VISIBLE_DEVICES"] = ""  # a CPU slot: no stage may wander onto a GPU
        else:
            out["CUDA_VISIBLE_DEVICES"] = self.gpu
            # CUDA numbers devices fastest first, nvidia-smi by PCI bus: in bus order, the id an item's log line
            # names ("GPU 1") is the index of nvidia-smi's samples (gpu.csv), so per-GPU busy time matches the
            # items that ran there. Ids the flow was given (CUDA_VISIBLE_DEVICES) mean the order they were given
            # in: that is kept, whatever it is, or an item could land on a GPU it was not given
            order = os.environ.get("CUDA_DEVICE_ORDER")
            if order is None and "CUDA_VISIBLE_DEVICES" not in os.environ:
                order = "PCI_BUS_ID"
            if order is not None:
                out["CUDA_DEVICE_ORDER"] = order
            out[GPU_SHARE_ENV] = str(self.share)
            out.update(self.extra)
        return out

    def describe(self) -> str:
        where = f"GPU {self.gpu}" if self.gpu is not None else "CPU"
        return f"slot {self.index} ({where}, {self.threads} CPU thread{'s' if self.threads != 1 else ''})"


def visible_gpus(environ: dict[str, str] | None = None) -> list[str]:
    """The GPUs this process may hand out: ``CUDA_VISIBLE_DEVICES`` when set (ids as given), else every
    device torch counts (without creating a CUDA context), else none."""
    env = os.environ if environ is None else environ
    if "CUDA_VISIBLE_DEVICES" in env:
        return [d.strip() for d in env["CUDA_VISIBLE_DEVICES"].split(",") if d.strip() and d.strip() != "-1"]
    try:
        import torch

        return [str(i) for i in range(torch.cuda.device_count())]
    except Exception:  # no torch, no driver: a CPU box
        return []


def plan_slots(jobs: int, gpus: list[str], slots_per_gpu: int = 1, cpus: int | None = None) -> list[Slot]:
    """The slots for ``jobs`` concurrent items: GPU slots round-robin over the GPUs (at most
    len(gpus) x slots_per_gpu of them), else CPU slots; each with an equal share of the cores."""
    if jobs < 1 or slots_per_gpu < 1:
        raise ValueError("jobs and slots_per_gpu must be at least 1")
    cpus = cpus or os.cpu_count() or 1
    if gpus:
        n = min(jobs, len(gpus) * slots_per_gpu)
        threads = max(1, cpus // n)
        # GPU-major order: slot i takes GPU i mod G, so a second item goes to a second GPU before sharing one.
        return [Slot(i, gpus[i % len(gpus)], threads, slots_per_gpu) for i in range(n)]
    threads = max(1, cpus // jobs)
    return [Slot(i, None, threads, 1) for i in range(jobs)]


class SlotPool:
    """Free slots; ``take`` blocks until one is free (the task runner never starts more items than slots)."""

    def __init__(self, slots: list[Slot]):
        self.slots = slots
        self._free: queue.Queue[Slot] = queue.Queue()
        for slot in slots:
            self._free.put(slot)

    @contextmanager
    def take(self):
        slot = self._free.get()
        try:
            yield slot
        finally:
            self._free.put(slot)
