"""The per-file array cache (jaxvit/data/cache.py) and the biomass views it keeps: the same values as without it,
nothing stale after a file or a setting changes, whole entries when several processes write at once."""
import functools
import multiprocessing
import os

import ml_collections
import numpy as np
import pytest
from PIL import Image

from jaxvit.data.cache import ArrayCache
from jaxvit.data.transforms import TransformConfig
from jaxvit.tasks.biomass.data import PastureExample


def _aug(**keys) -> ml_collections.ConfigDict:
    aug = dict(pad_to_square=False, halves=False, perspective_jitter=0.0, border_mask=0.0, clahe_prob=0.5,
               motion_blur_prob=0.5)
    return ml_collections.ConfigDict({**aug, **keys})


def _photo(path, seed: int, size=(120, 60)) -> str:
    rgb = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), np.uint8)
    Image.fromarray(rgb).save(path, quality=90)
    return str(path)


def _views(transform: PastureExample, path: str, seed: int | None) -> np.ndarray:
    rng = None if seed is None else np.random.default_rng(seed)
    return transform({"path": path}, rng)["image"]


@pytest.mark.parametrize("halves", [False, True])
def test_cached_biomass_views_are_the_uncached_ones(tmp_path, halves):
    cfg = TransformConfig(image_size=32, color_jitter=(0.2, 0.2, 0.2, 0.02))
    paths = [_photo(tmp_path / f"p{i}.jpg", i) for i in range(3)]
    plain, cached = PastureExample(cfg, _aug(halves=halves)), PastureExample(cfg, _aug(halves=halves), tmp_path / "c")
    for rounds in range(2):  # the first computes and writes the entries, the second reads them
        for seed, path in enumerate(paths):
            for rng_seed in (seed, None):  # train, eval
                np.testing.assert_array_equal(_views(cached, path, rng_seed), _views(plain, path, rng_seed))
    assert len(list((tmp_path / "c").rglob("*.npy"))) == 2 * len(paths)  # train and eval views of each photo


def test_a_changed_photo_or_setting_is_not_served_from_the_cache(tmp_path):
    cfg = TransformConfig(image_size=32)
    path = _photo(tmp_path / "p.jpg", 0)
    cached = PastureExample(cfg, _aug(), tmp_path / "c")
    _views(cached, path, None)
    _photo(path, 1)  # new pixels (and the same size: the modification time tells)
    os.utime(path, ns=(os.stat(path).st_atime_ns, os.stat(path).st_mtime_ns + 1))
    np.testing.assert_array_equal(_views(cached, path, None), _views(PastureExample(cfg, _aug()), path, None))
    bigger = TransformConfig(image_size=48)
    assert _views(PastureExample(bigger, _aug(), tmp_path / "c"), path, None).shape == (48, 48, 3)
    # a random operation before the resize (perspective jitter): nothing cached for training
    jitter = PastureExample(cfg, _aug(perspective_jitter=0.05), tmp_path / "c")
    np.testing.assert_array_equal(_views(jitter, path, 3), _views(PastureExample(cfg, _aug(perspective_jitter=0.05)),
                                                                  path, 3))
    assert len(list((tmp_path / "c").rglob("*.npy"))) == 3


def test_a_folder_that_cannot_be_written_only_loses_the_cache(tmp_path, caplog):
    path = _photo(tmp_path / "p.jpg", 0)
    (tmp_path / "c").write_text("a file where the cache folder would be")
    cfg = TransformConfig(image_size=32)
    cached = PastureExample(cfg, _aug(), tmp_path / "c")
    for _ in range(2):
        np.testing.assert_array_equal(_views(cached, path, 1), _views(PastureExample(cfg, _aug()), path, 1))
    assert len([r for r in caplog.records if "cannot write" in r.getMessage()]) == 1


@pytest.mark.slow
def test_processes_writing_the_same_entries_at_once_leave_whole_files(tmp_path):
    path = _photo(tmp_path / "p.jpg", 0)
    cache = ArrayCache(tmp_path / "c", "test")
    make = functools.partial(np.full, (256, 256, 3), 7, np.uint8)
    with multiprocessing.get_context("spawn").Pool(4) as pool:
        results = pool.starmap(cache.get, [(path, {"n": i % 3}, make) for i in range(24)])
    assert all((r == 7).all() and r.shape == (256, 256, 3) for r in results)
    entries = sorted((tmp_path / "c").rglob("*"))
    assert len([e for e in entries if e.suffix == ".npy"]) == 3 and not [e for e in entries if ".tmp" in e.name]


def test_cached_rgb_decode_is_the_decode(tmp_path):
    from jaxvit.data.transforms import RGBExample
    path = _photo(tmp_path / "g.jpg", 0, (50, 40))
    cfg = TransformConfig(image_size=32)
    plain, cached = RGBExample(cfg), RGBExample(cfg, str(tmp_path / "c"))
    for _ in range(2):
        for seed in (0, None):
            rng = None if seed is None else np.random.default_rng(seed)
            got = cached({"path": path, "label": 1}, rng)
            rng = None if seed is None else np.random.default_rng(seed)
            np.testing.assert_array_equal(got["image"], plain({"path": path, "label": 1}, rng)["image"])
    assert len(list((tmp_path / "c" / "rgb8").rglob("*.npy"))) == 1
