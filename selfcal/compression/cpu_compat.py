"""The one workaround selfcal applies to llm-compressor, for AWQ on machines without CUDA.

llm-compressor 0.14's ``IntermediatesCache.pin_memory`` pins cached activations so
later host-to-device copies can be asynchronous. Without an accelerator, pinning
raises "Cannot access accelerator device" and AWQ fails on CPU. Pinning only helps
copies to a GPU, so on a CUDA-less process it is safe to make it a no-op. The patch
is applied only when CUDA is unavailable and only to that method; remove it when
the pinned llm-compressor version no longer needs it.
"""

from __future__ import annotations


def allow_awq_without_cuda() -> bool:
    """Make ``IntermediatesCache.pin_memory`` a no-op when CUDA is absent; True if patched."""
    import torch

    if torch.cuda.is_available():
        return False
    from llmcompressor.pipelines.cache import IntermediatesCache

    if getattr(IntermediatesCache.pin_memory, "selfcal_noop", False):
        return True

    def pin_memory(self, batch_index: int, input_names: list[str] | None = None) -> None:
        return None

    pin_memory.selfcal_noop = True  # type: ignore[attr-defined]
    IntermediatesCache.pin_memory = pin_memory
    return True
