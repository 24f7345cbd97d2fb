"""A committed run folder's MLflow store, packed: ``mlflow-store.tar.xz`` holds ``.selfcal/mlflow.db`` and
``.selfcal/mlartifacts/`` as the GPU box left them.

Why packed: every call to the lent GPU carries the whole working tree within 64 MiB, and each lease's store
is about 4.8 MB of SQLite and small JSON copies that xz packs to about 0.2 MB; unpacked, four more leases would
have left the model's transfers a few MiB per call. The records an auditor reads by eye (manifests, metrics,
evaluations, dvc.lock) stay plain beside it. ``store_db`` gives the store's database either way: a plain
``.selfcal/mlflow.db``, or the archive unpacked once into a cache folder named by the archive's SHA-256 (so a
changed archive is a new folder, and a half-unpacked one is never used: it is renamed into place whole).
"""

from __future__ import annotations

import os
import shutil
import tarfile
import tempfile
from contextlib import closing, nullcontext
from pathlib import Path

from selfcal.errors import DataError
from selfcal.hashing import sha256_file

ARCHIVE = "mlflow-store.tar.xz"
STORE_DIR = ".selfcal"
DB = "mlflow.db"
MEMBERS = (f"{STORE_DIR}/{DB}", f"{STORE_DIR}/mlartifacts")


def cache_root() -> Path:
    return Path(os.environ.get("SELFCAL_STORE_CACHE", Path.home() / ".cache" / "selfcal" / "run-stores"))


def has_store(run: Path) -> bool:
    return (run / STORE_DIR / DB).is_file() or (run / ARCHIVE).is_file()


def write_archive(run: Path, *, live: bool = False) -> Path:
    """``run``/mlflow-store.tar.xz from ``run``/.selfcal (the database and the artifact copies), which stays:
    what ``tools/study_box.sh collect`` brings back from a box.

    ``live``: the store may be in use (collect while the run goes on, so a box given back between two device
    calls loses only the items in flight): the database goes in as SQLite's online backup, one consistent
    snapshot with what its write-ahead log holds, instead of the file's bytes, which a writer may be changing
    and which leave out what is still in ``mlflow.db-wal``."""
    db = run / STORE_DIR / DB
    if not db.is_file():
        raise DataError(f"{run}: no {STORE_DIR}/{DB} to pack")
    tmp = run / f".{ARCHIVE}.tmp"
    with tempfile.TemporaryDirectory(prefix=".snapshot-", dir=run) if live else nullcontext() as scratch:
        source = _backup(db, Path(scratch) / DB) if live else db
        try:
            with tarfile.open(tmp, "w:xz") as tar:
                tar.add(source, arcname=MEMBERS[0])
                for member in MEMBERS[1:]:
                    if (run / member).exists():
                        tar.add(run / member, arcname=member)
            tmp.replace(run / ARCHIVE)
        finally:
            tmp.unlink(missing_ok=True)
    return run / ARCHIVE


def _backup(db: Path, dest: Path) -> Path:
    """SQLite's online backup of ``db`` into ``dest`` (waits up to 60 s for a writer's lock)."""
    import sqlite3

    with (
        closing(sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=60)) as src,
        closing(sqlite3.connect(dest)) as out,
    ):
        src.backup(out)
    return dest


def pack(run: Path) -> Path:
    """Replace ``run``/.selfcal by ``run``/mlflow-store.tar.xz (a run folder as it is committed)."""
    archive = write_archive(run)
    shutil.rmtree(run / STORE_DIR)
    return archive


def store_db(run: Path) -> Path | None:
    """The run folder's ``mlflow.db`` (plain, or unpacked from its archive with ``mlartifacts`` beside it, as
    ``selfcal.lineage.store.moved_artifact`` finds them); None when the run folder has no store."""
    plain = run / STORE_DIR / DB
    if plain.is_file():
        return plain
    archive = run / ARCHIVE
    if not archive.is_file():
        return None
    target = cache_root() / sha256_file(archive)
    if not (target / STORE_DIR / DB).is_file():
        target.parent.mkdir(parents=True, exist_ok=True)
        scratch = Path(tempfile.mkdtemp(prefix=".unpack-", dir=target.parent))
        try:
            with tarfile.open(archive, "r:xz") as tar:
                names = tar.getnames()
                if f"{STORE_DIR}/{DB}" not in names or any(not n.startswith(f"{STORE_DIR}/") for n in names):
                    raise DataError(
                        f"{archive}: not a packed MLflow store (expected {STORE_DIR}/{DB} and nothing else)"
                    )
                tar.extractall(scratch, filter="data")
            try:
                scratch.rename(target)
            except OSError:  # another process unpacked the same archive first: theirs is the same
                pass
        except (tarfile.TarError, EOFError, OSError) as err:
            raise DataError(f"{archive}: cannot unpack ({err})") from err
        finally:
            shutil.rmtree(scratch, ignore_errors=True)  # gone already once renamed into place
    return target / STORE_DIR / DB
