"""A committed run folder's MLflow store packed as mlflow-store.tar.xz (selfcal.lineage.run_store)."""

from __future__ import annotations

import tarfile

import pytest


@pytest.fixture
def run(tmp_path, monkeypatch):
    monkeypatch.setenv("SELFCAL_STORE_CACHE", str(tmp_path / "cache"))
    folder = tmp_path / "runs" / "lease-d"
    (folder / ".selfcal" / "mlartifacts" / "abc" / "artifacts").mkdir(parents=True)
    (folder / ".selfcal" / "mlflow.db").write_bytes(b"SQLite format 3\x00" + bytes(range(256)) * 40)
    (folder / ".selfcal" / "mlartifacts" / "abc" / "artifacts" / "manifest.json").write_text('{"a": 1}\n')
    (folder / "artifacts").mkdir()
    (folder / "artifacts" / "keep.json").write_text("{}\n")
    return folder


def test_a_packed_store_opens_to_the_same_bytes_with_its_artifacts_beside_it_and_unpacks_once(run, tmp_path):
    from selfcal.lineage.run_store import ARCHIVE, has_store, pack, store_db

    db_bytes = (run / ".selfcal" / "mlflow.db").read_bytes()
    assert store_db(run) == run / ".selfcal" / "mlflow.db"  # plain: used where it is
    pack(run)
    assert (run / ARCHIVE).is_file() and not (run / ".selfcal").exists() and has_store(run)
    assert (run / "artifacts" / "keep.json").is_file()  # the plain records stay
    db = store_db(run)
    assert db.read_bytes() == db_bytes and (tmp_path / "cache") in db.parents
    assert (db.parent / "mlartifacts" / "abc" / "artifacts" / "manifest.json").read_text() == '{"a": 1}\n'
    before = db.stat().st_mtime_ns
    assert store_db(run) == db and db.stat().st_mtime_ns == before  # the second open reuses the unpacked copy
    assert not [p for p in (tmp_path / "cache").iterdir() if p.name.startswith(".unpack-")]


def test_no_store_is_none_and_a_broken_or_foreign_archive_is_refused_leaving_nothing_half_unpacked(run, tmp_path):
    from selfcal.errors import DataError
    from selfcal.lineage.run_store import ARCHIVE, has_store, pack, store_db

    empty = tmp_path / "runs" / "empty"
    empty.mkdir()
    assert store_db(empty) is None and not has_store(empty)
    with pytest.raises(DataError, match="no .selfcal/mlflow.db to pack"):
        pack(empty)

    archive = pack(run)
    archive.write_bytes(archive.read_bytes()[:200])  # cut short
    with pytest.raises(DataError, match=f"{ARCHIVE}: cannot unpack"):
        store_db(run)
    foreign = tmp_path / "runs" / "foreign"
    foreign.mkdir()
    (tmp_path / "evil.txt").write_text("x")
    with tarfile.open(foreign / ARCHIVE, "w:xz") as tar:
        tar.add(tmp_path / "evil.txt", arcname="../evil.txt")
    with pytest.raises(DataError, match="not a packed MLflow store"):
        store_db(foreign)
    assert not [p for p in (tmp_path / "cache").iterdir()]  # nothing left behind by either


def test_a_live_store_is_packed_as_one_consistent_snapshot_with_what_its_write_ahead_log_holds(tmp_path):
    """collect runs while the study goes on: the file's bytes would leave out the rows still in
    ``mlflow.db-wal`` (and may change under the copy); the live archive is SQLite's online backup."""
    import sqlite3

    from selfcal.lineage.run_store import ARCHIVE, write_archive

    run = tmp_path / "run"
    (run / ".selfcal" / "mlartifacts").mkdir(parents=True)
    db = run / ".selfcal" / "mlflow.db"
    writer = sqlite3.connect(db)
    writer.execute("PRAGMA journal_mode=WAL")
    writer.execute("PRAGMA wal_autocheckpoint=0")  # the rows stay in the WAL, as under a busy writer
    writer.execute("CREATE TABLE runs (name TEXT)")
    writer.executemany("INSERT INTO runs VALUES (?)", [(f"item-{i}",) for i in range(50)])
    writer.commit()
    try:

        def rows(archive_dir):
            with tarfile.open(run / ARCHIVE) as tar:
                tar.extractall(archive_dir, filter="data")
            con = sqlite3.connect(archive_dir / ".selfcal" / "mlflow.db")
            try:
                return con.execute("SELECT count(*) FROM runs").fetchone()[0]
            except sqlite3.DatabaseError:
                return None
            finally:
                con.close()

        write_archive(run)  # the file's bytes: the rows are not in them yet
        assert rows(tmp_path / "bytes") in (None, 0)
        write_archive(run, live=True)
        assert rows(tmp_path / "live") == 50
        assert sorted(p.name for p in run.iterdir()) == [".selfcal", ARCHIVE]  # no scratch, no partial archive
    finally:
        writer.close()
