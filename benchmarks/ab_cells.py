"""Side-by-side timing of the JUMP SSL and DINOCell input fixes against the old paths, in one process (alternating
rounds, best round reported): per-core examples/s of the workload's train transform on files in its published
format, as `ab_transforms.py` does for the others.

    PYTHONPATH=. taskset -c 1 python benchmarks/ab_cells.py [--workloads=jump_ssl,dinocell] [--examples=16]

jump_ssl: sites from data.cache_dir (warm), grey views cropped and jittered as one channel, vs decoded each time
          and replicated to RGB before the crops (outputs identical).
dinocell: scaled images and whole distance maps from data.cache_dir (warm) vs decoded and the whole mask's maps
          made each time (outputs identical).
"new_first_pass" is the new path's first pass over the files, which fills the cache.
"""
import argparse
import json
import tempfile

from benchmarks.ab_transforms import rate
from jaxvit import benchmark, tasks
from jaxvit.config import load_config_file
from jaxvit.data import jump
from jaxvit.tasks.cell_distance import data as cell_data
from jaxvit.tasks.cell_distance.targets import distance_map
from jaxvit.tasks.ssl import data as ssl_data


def _jump_old_views(self, example, rng, n):
    mode = self.source.channel_mode if rng is not None else "average"
    return jump.to_rgb(self.source.load_stack(example), mode, rng, n, self.source.clahe)


OLD = {  # the old path: the task without data.cache_dir, with this attribute swapped back
    "jump_ssl": (ssl_data.RGBViews, "__call__", _jump_old_views),
    "dinocell": (cell_data, "distance_map", lambda labels, window=None: distance_map(labels)),
}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--workloads", default=",".join(OLD))
    ap.add_argument("--examples", type=int, default=16)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    for name in args.workloads.split(","):
        module, attr, old_call = OLD[name]
        cfg = load_config_file(f"configs/{name}.py")
        with tempfile.TemporaryDirectory() as tmp:
            files = benchmark.write_workload_files(cfg, tmp, 8)
            cfg.model.pretrained, cfg.data.cache_dir = "", ""  # no model is built
            new_cfg = cfg.copy_and_resolve_references()
            new_cfg.data.cache_dir = f"{tmp}/cache"
            old_task, new_task = tasks.create(cfg), tasks.create(new_cfg)
            source = old_task.source(cfg.data.train_split)
            transforms = {"old": old_task.train_transform(), "new": new_task.train_transform()}
            new_call, best = getattr(module, attr), {"old": 0.0, "new": 0.0}
            first = rate(transforms["new"], source, len(source))
            for _ in range(args.rounds):
                for path, call in (("old", old_call), ("new", new_call)):
                    setattr(module, attr, call)
                    best[path] = max(best[path], rate(transforms[path], source, args.examples))
            setattr(module, attr, new_call)
        print(json.dumps(dict(workload=name, files=files, old_per_core=round(best["old"], 2),
                              new_per_core=round(best["new"], 2), speedup=round(best["new"] / best["old"], 2),
                              new_first_pass=round(first, 2), examples=args.examples, rounds=args.rounds,
                              date=benchmark._now())), flush=True)


if __name__ == "__main__":
    main()
