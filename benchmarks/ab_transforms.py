"""Side-by-side timing of the input-pipeline fixes against the old paths, in one process (alternating rounds,
best round reported): per-core examples/s of a workload's train transform on files in its published format.

    PYTHONPATH=. taskset -c 1 python benchmarks/ab_transforms.py [--examples=16] [--rounds=3]

dinocell:       distance maps of the cells meeting the crop window vs of the whole mask (outputs identical).
biomass_draft:  JPEG draft decoding at the smallest covering scale vs a full decode (pixels differ slightly).
biomass_cache:  each photo's resized views from data.cache_dir (warm) vs decoded and resized each time (identical).
biomass:        both (the path before this work vs now).
gz2_cache:      each GZ2 JPEG decoded once, then read from data.cache_dir (warm) vs decoded each time (identical).
gz2_rotate:     rotation and crop in one resampling at the output's size vs a rotation at the source's size then
                the crop (pixels within a few levels).
gz2:            both.
The old path is the same transform with the fixed functions (or attributes) swapped back for the old ones. The
cached cases start cold: the best round is a warm one (every file read from the cache).
"""
import argparse
import json
import tempfile
import time

import numpy as np

from jaxvit import benchmark, tasks
from jaxvit.config import load_config_file
from jaxvit.data import transforms
from jaxvit.data.sources import load_image
from jaxvit.tasks.biomass import data as biomass_data
from jaxvit.tasks.cell_distance import data as cell_data
from jaxvit.tasks.cell_distance.targets import distance_map

FULL_DECODE = (lambda t: biomass_data, "load_image", lambda path, min_size=None: load_image(path))
BIOMASS_NO_CACHE = (lambda t: t, "cache", None)
GZ2_TWO_STEP = (lambda t: transforms, "rotated_resized_crop", lambda img, angle, *crop: transforms.random_resized_crop(
    img.rotate(angle, resample=transforms._TRAIN_RESAMPLE, fillcolor=(0, 0, 0)), *crop))
GZ2_NO_CACHE = (lambda t: t, "cache_dir", "")
OLD = {  # case: config, the old path as (the swapped attribute's owner given the transform, attribute, old value)s
    "dinocell": ("dinocell", [(lambda t: cell_data, "distance_map",
                               lambda labels, window=None: distance_map(labels))]),
    "biomass_draft": ("biomass", [FULL_DECODE]),
    "biomass_cache": ("biomass", [BIOMASS_NO_CACHE]),
    "biomass": ("biomass", [FULL_DECODE, BIOMASS_NO_CACHE]),
    "gz2_rotate": ("gz2_lora", [GZ2_TWO_STEP]),
    "gz2_cache": ("gz2_lora", [GZ2_NO_CACHE]),
    "gz2": ("gz2_lora", [GZ2_TWO_STEP, GZ2_NO_CACHE]),
}


def rate(transform, source, n: int) -> float:
    start = time.perf_counter()
    for k in range(n):
        transform(source[k % len(source)], np.random.default_rng(k))
    return n / (time.perf_counter() - start)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--examples", type=int, default=16)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--cases", default=",".join(OLD))
    args = ap.parse_args()
    for name in args.cases.split(","):
        config, swaps = OLD[name]
        cfg = load_config_file(f"configs/{config}.py")
        with tempfile.TemporaryDirectory() as tmp:
            files = benchmark.write_workload_files(cfg, tmp, 8)
            cached = any(attr.startswith("cache") for _, attr, _ in swaps)
            cfg.data.cache_dir = f"{tmp}/cache" if cached else ""  # the cache only where it is measured
            task = tasks.create(cfg)
            source, transform = task.source(cfg.data.train_split), task.train_transform()
            targets = [(owner(transform), attr) for owner, attr, _ in swaps]
            paths = {"old": [old for _, _, old in swaps], "new": [getattr(o, a) for o, a in targets]}
            best = {"old": 0.0, "new": 0.0}
            for _ in range(args.rounds):
                for path in ("old", "new"):
                    for (owner, attr), value in zip(targets, paths[path]):
                        object.__setattr__(owner, attr, value)  # the transforms are frozen dataclasses
                    best[path] = max(best[path], rate(transform, source, args.examples))
        print(json.dumps(dict(workload=name, files=files, old_per_core=round(best["old"], 2),
                              new_per_core=round(best["new"], 2), speedup=round(best["new"] / best["old"], 2),
                              examples=args.examples, rounds=args.rounds, date=benchmark._now())), flush=True)


if __name__ == "__main__":
    main()
