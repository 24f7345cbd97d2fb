"""Perplexity on a text file, the way GPTQ/SparseGPT/Wanda report WikiText-2.

The file is tokenized as one string and cut into non-overlapping windows of
``seq_len`` tokens (stride = window, a trailing partial window is dropped). Each
window predicts its tokens 2..seq_len; perplexity is exp of the mean NLL over all
predicted tokens.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch

from selfcal.errors import ConfigError, DataError
from selfcal.paths import resolve_path
from selfcal.scoring import window_nll
from selfcal.textdata import read_documents


def token_windows(ids: torch.Tensor, seq_len: int, max_windows: int | None = None) -> torch.Tensor:
    n = ids.numel() // seq_len
    if n == 0:
        raise DataError(f"text has {ids.numel()} tokens, fewer than one window of {seq_len}")
    if max_windows is not None:
        n = min(n, max_windows)
    return ids[: n * seq_len].view(n, seq_len)


def perplexity_of_windows(model, windows: torch.Tensor, *, batch_size: int = 8, progress: bool = True) -> dict:
    """exp of the mean NLL over every predicted token of every window (the GPTQ protocol)."""
    sums = window_nll(model, windows, batch_size=batch_size, progress=progress, desc="perplexity")
    tokens = int(windows.shape[0]) * (int(windows.shape[1]) - 1)
    mean = float(sums.sum()) / tokens
    return {"perplexity": math.exp(mean), "nll": mean, "tokens": tokens, "windows": int(windows.shape[0])}


def read_perplexity_text(
    path: str,
    *,
    root: Path,
    text_field: str = "text",
    hub_config: str | None = None,
    hub_split: str = "validation",
    max_documents: int = 100_000,
    key: str = "evaluation.perplexity",
) -> str:
    """The text a perplexity set scores: a .txt file verbatim, any other corpus's documents joined by blank lines."""
    local = resolve_path(path, root)
    if local.suffix == ".txt" and local.is_file():
        text = local.read_text()
        if not text.strip():
            raise DataError(f"{local}: perplexity text file is empty")
        return text
    docs = read_documents(
        path,
        root=root,
        text_field=text_field,
        hub_config=hub_config,
        hub_split=hub_split,
        max_documents=max_documents,
        key=key,
    )
    return "\n\n".join(docs)


def text_ids(tokenizer, text: str) -> torch.Tensor:
    """The text as one token sequence (GPTQ's protocol: the whole file tokenized as one string). ``verbose=False``:
    a text longer than the model's context is the point here (it is cut into windows), not the "will result in
    indexing errors" transformers warns of, which ``selfcal check`` printed beside its one line."""
    return torch.tensor(tokenizer(text, verbose=False).input_ids, dtype=torch.long)


def check_one_window(n_tokens: int, seq_len: int, key: str) -> None:
    """A perplexity set must fill one window: refused by ``selfcal check`` and before the model loads, not after
    the zero-shot tasks have run."""
    if n_tokens < seq_len:
        raise ConfigError(
            f"{key}: the text has {n_tokens} tokens, fewer than one window of {seq_len}; give a longer text or a "
            f"smaller {key}.seq_len"
        )


def perplexity_of_ids(
    model, ids: torch.Tensor, *, seq_len: int, max_windows: int | None, batch_size: int = 8, progress: bool = True
) -> dict:
    result = perplexity_of_windows(
        model, token_windows(ids, seq_len, max_windows), batch_size=batch_size, progress=progress
    )
    return {**result, "seq_len": seq_len, "stride": seq_len}
