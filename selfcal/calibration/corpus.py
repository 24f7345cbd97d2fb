"""Which windows of a real-text corpus make the set for a seed (documents and windows:
``selfcal.textdata``).

Documents are tokenized and concatenated (EOS between documents) into one stream,
cut into non-overlapping windows of ``seq_len`` tokens, and shuffled once with a
fixed permutation. The set for seed k is block k of that order, so the sets of
seeds 0..K-1 never share a window. A corpus with fewer than (k+1)·n windows is an
error naming how many disjoint sets it can give, unless ``allow_overlap`` asks for
windows drawn at random per seed instead.
"""

from __future__ import annotations

import numpy as np

from selfcal.errors import DataError

_PERMUTATION_SEED = 20241022  # fixed: block k of one order is the same set on every run


def check_windows(total: int, n: int, seed: int, *, allow_overlap: bool, name: str, seq_len: int) -> None:
    """Whether ``total`` windows can give seed ``seed``'s set of ``n``: the one rule ``pick_windows`` applies, also
    run by ``selfcal check`` before any stage (the corpus tokenized, no model loaded)."""
    if total < n:
        raise DataError(
            f"{name}: corpus gives {total} windows of {seq_len} tokens, fewer than the {n} requested "
            f"(a smaller window_stride gives overlapping windows)"
        )
    disjoint_sets = total // n
    if not (0 <= seed < disjoint_sets) and not allow_overlap:
        raise DataError(
            f"{name}: corpus gives {total} windows of {seq_len} tokens, enough for {disjoint_sets} disjoint "
            f"set(s) of {n} (seeds 0..{disjoint_sets - 1}); seed {seed} would reuse windows. "
            f"Use fewer/smaller sets, a larger corpus, or allow_overlap: true"
        )


def pick_windows(
    all_windows: np.ndarray, n: int, seed: int, *, allow_overlap: bool, name: str
) -> tuple[np.ndarray, dict]:
    """Block ``seed`` of a fixed shuffle (disjoint across seeds), or a per-seed draw if allowed."""
    total = len(all_windows)
    seq_len = all_windows.shape[1] if all_windows.ndim == 2 else 0
    check_windows(total, n, seed, allow_overlap=allow_overlap, name=name, seq_len=seq_len)
    disjoint_sets = total // n
    if 0 <= seed < disjoint_sets:
        order = np.random.default_rng(_PERMUTATION_SEED).permutation(total)
        idx = order[seed * n : (seed + 1) * n]
        return all_windows[idx], {
            "windows_total": total,
            "disjoint_sets": disjoint_sets,
            "block": seed,
            "overlap_allowed": False,
        }
    idx = np.random.default_rng(seed).choice(total, size=n, replace=False)
    return all_windows[idx], {
        "windows_total": total,
        "disjoint_sets": disjoint_sets,
        "block": None,
        "overlap_allowed": True,
    }
