"""Whether the Hugging Face hub can be reached, found out at once.

Without this, a read from an unreachable hub (no network, ``HF_HUB_OFFLINE=1``) fails only after
the libraries' retries, 20-30 s later and with their own error text; ``check`` and the stages ask
here first and say "offline" in one line.
"""

from __future__ import annotations

import functools
import os
import socket
from urllib.parse import urlparse

OFFLINE_VARS = ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE")
TIMEOUT_SECONDS = 2.0


@functools.lru_cache(maxsize=1)
def _probe(host: str, port: int) -> str | None:
    try:
        socket.create_connection((host, port), timeout=TIMEOUT_SECONDS).close()
    except OSError as err:
        return f"{host}:{port} unreachable ({type(err).__name__})"
    return None


def unreachable_reason() -> str | None:
    """None when the hub answers; otherwise why not (an offline variable, or no connection in 2 s)."""
    for var in OFFLINE_VARS:
        if os.environ.get(var, "").strip().lower() in ("1", "true", "yes", "on"):
            return f"{var} is set"
    endpoint = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    return _probe(endpoint.hostname or "huggingface.co", endpoint.port or (443 if endpoint.scheme == "https" else 80))
