"""The flow's dvc runner repairs what a kill can leave behind."""

from flows.dvc_process import _repair_rwlock


def test_a_cut_rwlock_is_removed_and_a_good_one_kept(tmp_path):
    lock = tmp_path / ".dvc" / "tmp" / "rwlock"
    lock.parent.mkdir(parents=True)
    lock.write_text("")  # what a kill in the middle of DVC's write leaves
    _repair_rwlock(tmp_path)
    assert not lock.exists()
    lock.write_text('{"read": {}, "write": {}}')
    _repair_rwlock(tmp_path)
    assert lock.read_text() == '{"read": {}, "write": {}}'
    _repair_rwlock(tmp_path / "elsewhere")  # no DVC folder: nothing to do
