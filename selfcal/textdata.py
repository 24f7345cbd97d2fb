"""Text data: documents from local files or the hub, and the token windows cut from them.

Ground floor of the project: calibration corpora, perplexity texts, diagnostics' reference
text and Ji et al.'s prompts all read documents here, the same way.

Formats: ``.jsonl``/``.json`` rows (``text_field``), ``.parquet`` (a column), plain text
(documents separated by blank lines) and WikiExtractor's ``<doc ...>`` files; a folder is
every such file below it, sorted. A value that is not a local path is a hub dataset id.
"""

from __future__ import annotations

import html
import json
import re
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np

from selfcal.errors import DataError
from selfcal.paths import LOCAL_PREFIXES, resolve_path

TEXT_SUFFIXES = {".txt", ".raw", ".utf8", ".md"}
JSON_SUFFIXES = {".jsonl", ".json"}


def _files(path: Path) -> list[Path]:
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.suffix in TEXT_SUFFIXES | JSON_SUFFIXES | {".parquet"})
        if not files:
            raise DataError(f"{path}: directory holds no .txt/.jsonl/.json/.parquet files")
        return files
    return [path]


def _read_file(path: Path, text_field: str) -> Iterator[str]:
    """The documents of one file; a file that is not UTF-8 text or valid JSON is one DataError."""
    try:
        yield from _read_file_unchecked(path, text_field)
    except UnicodeDecodeError as err:
        raise DataError(
            f"{path}: not UTF-8 text (byte 0x{err.object[err.start]:02x} at offset {err.start}); "
            "a corpus is .txt, .jsonl, .json or .parquet text"
        ) from None
    except json.JSONDecodeError as err:
        raise DataError(f"{path}: not valid JSON at line {err.lineno}, column {err.colno}: {err.msg}") from None


def _read_file_unchecked(path: Path, text_field: str) -> Iterator[str]:
    if path.suffix in JSON_SUFFIXES:
        with open(path) as f:
            first = f.read(1)
            f.seek(0)
            rows = json.load(f) if first == "[" else (json.loads(line) for line in f if line.strip())
            for i, row in enumerate(rows):
                if text_field not in row:
                    raise DataError(f"{path}: row {i} has no field {text_field!r} (set text_field)")
                yield row[text_field]
    elif path.suffix == ".parquet":
        import pyarrow.parquet as pq

        table = pq.read_table(path, columns=[text_field])
        yield from table.column(text_field).to_pylist()
    else:
        text = path.read_text()
        if text.lstrip().startswith("<doc "):
            yield from wikiextractor_documents(text)
        else:
            # Plain text: documents are separated by blank lines.
            yield from text.split("\n\n")


_DOC = re.compile(r"<doc\b([^>]*)>\n(.*?)</doc>", re.S)
_TITLE = re.compile(r'\btitle="([^"]*)"')


def wikiextractor_documents(text: str) -> Iterator[str]:
    """Article texts from WikiExtractor's ``<doc id url title>...</doc>`` format, without the
    title line it repeats first (a hub Wikipedia row's ``text`` has no title either)."""
    for match in _DOC.finditer(text):
        title = _TITLE.search(match.group(1))
        body = match.group(2).strip()
        first, _, rest = body.partition("\n")
        if title is not None and first.strip() == html.unescape(title.group(1)).strip():
            body = rest.strip()
        if body:
            yield body


def read_documents(
    spec_path: str,
    *,
    root: Path,
    text_field: str = "text",
    hub_config: str | None = None,
    hub_split: str = "train",
    max_documents: int = 100_000,
    key: str = "path",
) -> list[str]:
    """Non-empty documents from a local file/directory, or a hub dataset when no such path exists."""
    local = resolve_path(spec_path, root)
    if local.exists():
        docs = [d for f in _files(local) for d in _read_file(f, text_field) if d and d.strip()]
        if not docs:
            raise DataError(f"{local}: corpus is empty")
        return docs
    if spec_path.startswith(LOCAL_PREFIXES):
        raise DataError(f"{key}: corpus {str(local)!r} does not exist")
    return _read_hub(spec_path, hub_config, hub_split, text_field, max_documents, key)


def _read_hub(name: str, config: str | None, split: str, text_field: str, limit: int, key: str) -> list[str]:
    from selfcal.hub import unreachable_reason

    if reason := unreachable_reason():
        raise DataError(
            f"{key}: {name!r} is not a local file and the Hugging Face hub is unreachable ({reason}); give a local path"
        )
    try:
        from datasets import load_dataset

        stream = load_dataset(name, config, split=split, streaming=True)
        docs = []
        for row in stream:
            if row.get(text_field):
                docs.append(row[text_field])
            if len(docs) >= limit:
                break
    except Exception as err:  # offline, unknown dataset, auth: all mean "not reachable" here
        raise DataError(
            f"{key}: {name!r} is not a local file and the hub dataset could not be read "
            f"({type(err).__name__}: {str(err).splitlines()[0][:160]})"
        ) from None
    if not docs:
        raise DataError(f"{key}: hub dataset {name!r} gave no documents with field {text_field!r}")
    return docs


def token_stream(docs: list[str], tokenizer) -> np.ndarray:
    """All documents tokenized (no special tokens) and joined with EOS."""
    sep = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    encoded = tokenizer(docs, add_special_tokens=False, verbose=False)["input_ids"]
    out: list[int] = []
    for ids in encoded:
        out.extend(ids)
        out.extend(sep)
    return np.asarray(out, dtype=np.int64)


def windows(stream: np.ndarray, seq_len: int, stride: int | None = None) -> np.ndarray:
    """Consecutive windows of ``seq_len`` tokens, one every ``stride`` tokens (default ``seq_len``: disjoint)."""
    if stride is None or stride == seq_len:
        count = len(stream) // seq_len
        return stream[: count * seq_len].reshape(count, seq_len)
    if len(stream) < seq_len:
        return np.empty((0, seq_len), stream.dtype)
    return np.lib.stride_tricks.sliding_window_view(stream, seq_len)[::stride].copy()


def window_count(tokens: int, seq_len: int, stride: int | None = None) -> int:
    """How many windows ``windows`` cuts from a stream of ``tokens`` tokens."""
    if stride is None or stride == seq_len:
        return tokens // seq_len
    return 0 if tokens < seq_len else (tokens - seq_len) // stride + 1


_TOKEN_COUNTS: dict[tuple, int | None] = {}


def cached_token_count(path: Path, extra: tuple, count: Callable[[], int | None]) -> int | None:
    """``count()`` once per process for a local file or folder as it is now (its files' paths and mtimes are in
    the key, with ``extra``: text field, tokenizer): ``selfcal check`` tokenizes a corpus once, however many
    items read it."""
    files = [path] if path.is_file() else path.rglob("*")
    key = (str(path), tuple(sorted((str(f), f.stat().st_mtime_ns) for f in files)), *extra)
    if key not in _TOKEN_COUNTS:
        _TOKEN_COUNTS[key] = count()
    return _TOKEN_COUNTS[key]
