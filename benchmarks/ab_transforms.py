"""Side-by-side timing of the input-pipeline fixes against the old paths, in one process (alternating rounds,
best round reported): per-core examples/s of a workload's train transform on files in its published format.

    PYTHONPATH=. taskset -c 1 python benchmarks/ab_transforms.py [--examples=16] [--rounds=3]

dinocell: scaled images and whole distance maps from the cache (filled by a first pass, "new_first_pass": the
          maps of the cells meeting the crop window) vs decoded and the whole mask's maps each time (identical).
biomass:  JPEG draft decoding at the smallest covering scale vs a full decode (pixels differ slightly).
jump_ssl: sites from the decoded-site cache (filled by a first pass, timed as "new_first_pass") with grey views
          resized as grey vs decoded each time and replicated to RGB before the crops (outputs identical).
The old path is the same transform with the fixed function swapped back for the old call.
"""
import argparse
import json
import tempfile
import time

import numpy as np

from jaxvit import benchmark, tasks
from jaxvit.config import load_config_file
from jaxvit.data import jump
from jaxvit.data.sources import load_image
from jaxvit.tasks import biomass as biomass_task
from jaxvit.tasks.cell_distance import data as cell_data
from jaxvit.tasks.cell_distance.targets import distance_map
from jaxvit.tasks.ssl import data as ssl_data


def _jump_old_views(self, example, rng, n):
    mode = self.source.channel_mode if rng is not None else "average"
    return jump.to_rgb(self.source.load_stack(example), mode, rng, n, self.source.clahe)


OLD = {  # module, attribute, the old call
    "dinocell": (cell_data, "distance_map", lambda labels, window=None: distance_map(labels)),
    "biomass": (biomass_task, "load_image", lambda path, min_size=None: load_image(path)),
    "jump_ssl": (ssl_data.RGBViews, "__call__", _jump_old_views),
}
CACHED = {"jump_ssl", "dinocell"}  # new path: with data.cache_dir, filled by a first pass


def rate(transform, source, n: int) -> float:
    start = time.perf_counter()
    for k in range(n):
        transform(source[k % len(source)], np.random.default_rng(k))
    return n / (time.perf_counter() - start)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--examples", type=int, default=16)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--workloads", default=",".join(OLD), help="comma-separated subset of " + ", ".join(OLD))
    args = ap.parse_args()
    for name in args.workloads.split(","):
        module, attr, old_call = OLD[name]
        cfg = load_config_file(f"configs/{name}.py")
        with tempfile.TemporaryDirectory() as tmp:
            files = benchmark.write_workload_files(cfg, tmp, 8)
            cfg.model.pretrained, cfg.data.cache_dir = "", ""  # no model is built; the old path has no cache
            task, new_cfg = tasks.create(cfg), cfg.copy_and_resolve_references()
            new_cfg.data.cache_dir = f"{tmp}/cache" if name in CACHED else ""
            new_task = tasks.create(new_cfg)
            source, transforms = task.source(cfg.data.train_split), {
                "old": task.train_transform(), "new": new_task.train_transform()}
            new_call, best = getattr(module, attr), {"old": 0.0, "new": 0.0}
            first = rate(transforms["new"], source, len(source)) if name in CACHED else None
            for _ in range(args.rounds):
                for path, call in (("old", old_call), ("new", new_call)):
                    setattr(module, attr, call)
                    best[path] = max(best[path], rate(transforms[path], source, args.examples))
            setattr(module, attr, new_call)
        print(json.dumps(dict(workload=name, files=files, old_per_core=round(best["old"], 2),
                              new_per_core=round(best["new"], 2), speedup=round(best["new"] / best["old"], 2),
                              **({} if first is None else {"new_first_pass": round(first, 2)}),
                              examples=args.examples, rounds=args.rounds, date=benchmark._now())), flush=True)


if __name__ == "__main__":
    main()
