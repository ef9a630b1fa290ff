"""jaxvit.files.atomic_write: the old file or the complete new one, never part, and no temp file left behind."""
from __future__ import annotations

import numpy as np
import pytest

from jaxvit.files import atomic_write, atomic_write_text, write_csv


def test_a_failed_write_keeps_the_old_file_and_leaves_no_temp_file(tmp_path):
    path = atomic_write_text(tmp_path / "a" / "results.json", "old")
    assert path.read_text() == "old" and (path.stat().st_mode & 0o777) == 0o644

    def half_then_fail(tmp):
        tmp.write_text("half")
        raise OSError("disk full")
    with pytest.raises(OSError, match="disk full"):
        atomic_write(path, half_then_fail)
    assert path.read_text() == "old" and [p.name for p in path.parent.iterdir()] == ["results.json"]


def test_writers_that_go_by_the_suffix_write_the_file_itself(tmp_path):
    atomic_write(tmp_path / "x.npz", lambda tmp: np.savez(tmp, a=np.arange(3)))  # np.savez adds .npz to others
    with np.load(tmp_path / "x.npz") as z:
        np.testing.assert_array_equal(z["a"], np.arange(3))
    atomic_write(tmp_path / "t.csv", lambda tmp: write_csv(tmp, ["a", "b"], [{"a": 1}, {"a": 2, "b": 3}]))
    assert (tmp_path / "t.csv").read_text().splitlines() == ["a,b", "1,", "2,3"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["t.csv", "x.npz"]


# ------------------------------------------------------------------------------------------- demo sets, once

def _tables(calls):
    def write(out):
        calls.append(out)
        (out / "train").mkdir()
        (out / "train" / "a.txt").write_text("a")
        (out / "train.csv").write_text("path\ntrain/a.txt\n")
    return write


def test_a_demo_set_is_written_once_redone_when_damaged_and_never_over_foreign_files(tmp_path):
    from jaxvit.demos import write_once
    calls = []
    write_once(tmp_path, "toy", {"n": 1}, _tables(calls), ("train", "train.csv"))
    write_once(tmp_path, "toy", {"n": 1}, _tables(calls), ("train", "train.csv"))
    assert len(calls) == 1 and sorted(p.name for p in tmp_path.iterdir()) == [".toy.json", "train", "train.csv"]
    (tmp_path / "train" / "a.txt").unlink()  # a lost file: written again
    write_once(tmp_path, "toy", {"n": 1}, _tables(calls), ("train", "train.csv"))
    assert len(calls) == 2 and (tmp_path / "train" / "a.txt").read_text() == "a"

    def fail(out):
        (out / "train").mkdir()
        raise KeyboardInterrupt
    with pytest.raises(KeyboardInterrupt):  # an interrupted write keeps the old set and leaves no partial folder
        write_once(tmp_path, "toy", {"n": 2}, fail, ("train",))
    assert (tmp_path / "train" / "a.txt").exists() and not (tmp_path / ".toy.partial").exists()
    other = tmp_path / "other"
    (other / "train").mkdir(parents=True)
    (other / "train" / "mine.jpg").write_bytes(b"a user's image")
    with pytest.raises(FileExistsError, match="other/train exists and was not written by toy"):
        write_once(other, "toy", {"n": 1}, _tables(calls), ("train", "train.csv"))
    assert len(calls) == 2 and (other / "train" / "mine.jpg").read_bytes() == b"a user's image"


def test_a_demo_set_of_new_parameters_replaces_the_old_entries_also_under_an_older_marker(tmp_path):
    from jaxvit.demos import write_once
    (tmp_path / "train").mkdir()
    (tmp_path / "train" / "old.txt").write_text("old")
    (tmp_path / ".toy.json").write_text('{"n": 0}')  # an older jaxvit's marker: the parameters alone
    write_once(tmp_path, "toy", {"n": 1}, _tables([]), ("train", "train.csv"))
    assert sorted(p.name for p in (tmp_path / "train").iterdir()) == ["a.txt"]
    write_once(tmp_path, "toy", {"n": 2}, lambda out: (out / "val.csv").write_text("x"), ("val.csv",))
    assert sorted(p.name for p in tmp_path.iterdir()) == [".toy.json", "val.csv"]  # no stale train/
