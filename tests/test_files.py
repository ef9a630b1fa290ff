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
