"""Side-by-side timing of the input-pipeline fixes against the old paths, in one process (alternating rounds,
best round reported): per-core examples/s of a workload's train transform on files in its published format.

    PYTHONPATH=. taskset -c 1 python benchmarks/ab_transforms.py [--examples=16] [--rounds=3]

dinocell: distance maps of the cells meeting the crop window vs of the whole mask (outputs identical).
biomass:  JPEG draft decoding at the smallest covering scale vs a full decode (pixels differ slightly).
The old path is the same transform with the fixed function swapped back for the old call.
"""
import argparse
import json
import tempfile
import time

import numpy as np

from jaxvit import benchmark, tasks
from jaxvit.config import load_config_file
from jaxvit.data.sources import load_image
from jaxvit.tasks import biomass as biomass_task
from jaxvit.tasks.cell_distance import data as cell_data
from jaxvit.tasks.cell_distance.targets import distance_map

OLD = {  # module, attribute, the old call
    "dinocell": (cell_data, "distance_map", lambda labels, window=None: distance_map(labels)),
    "biomass": (biomass_task, "load_image", lambda path, min_size=None: load_image(path)),
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
    args = ap.parse_args()
    for name, (module, attr, old_call) in OLD.items():
        cfg = load_config_file(f"configs/{name}.py")
        with tempfile.TemporaryDirectory() as tmp:
            files = benchmark.write_workload_files(cfg, tmp, 8)
            task = tasks.create(cfg)
            source, transform = task.source(cfg.data.train_split), task.train_transform()
            new_call, best = getattr(module, attr), {"old": 0.0, "new": 0.0}
            for _ in range(args.rounds):
                for path, call in (("old", old_call), ("new", new_call)):
                    setattr(module, attr, call)
                    best[path] = max(best[path], rate(transform, source, args.examples))
            setattr(module, attr, new_call)
        print(json.dumps(dict(workload=name, files=files, old_per_core=round(best["old"], 2),
                              new_per_core=round(best["new"], 2), speedup=round(best["new"] / best["old"], 2),
                              examples=args.examples, rounds=args.rounds, date=benchmark._now())), flush=True)


if __name__ == "__main__":
    main()
