"""Orbax checkpoints: resume points and the weights inference needs.

    <workdir>/checkpoints/periodic/<step>/{state, data, meta}   resume points (the newest `keep`): the whole
                                                               train state, the grain iterator, loop metadata
    <workdir>/checkpoints/{best,final}/<step>/{variables, info} evaluation variables only (EMA weights when on;
                                                               no optimizer state) and a JSON description

Orbax writes each checkpoint into a temporary directory and renames it when complete, so a killed run never
leaves a corrupt one. The training batch at step t depends only on (seed, t), so a run resumed by a different
number of processes (whose per-process iterator files do not match) restarts the data at the saved step.
Workdirs of jaxvit before the task redesign (`best_acc`, `best_f1`, `final` holding a full `state`) still read.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

from jaxvit import optim
from jaxvit.data import pipeline
from jaxvit.errors import MissingDataError

log = logging.getLogger("jaxvit")
INFERENCE = ("best", "final")
OLD_NAMES = {"best": "best_acc"}  # the name an older workdir used


def _abstract(tree: Any) -> Any:
    return jax.tree_util.tree_map(ocp.utils.to_shape_dtype_struct, tree)


def _manager(root: Path, name: str, keep: int) -> ocp.CheckpointManager:
    # Several processes: orbax names its barriers after the step ("5"), the same for every manager saving step 5
    # at once; a per-manager prefix keeps them apart (else: a hang).
    return ocp.CheckpointManager(root / name, options=ocp.CheckpointManagerOptions(
        max_to_keep=keep, create=True,
        multiprocessing_options=ocp.options.MultiprocessingOptions(barrier_sync_key_prefix=name)))


class Checkpoints:
    def __init__(self, root: str | Path, keep: int = 3):
        self.root = Path(root).absolute()  # orbax needs absolute paths
        self.periodic = _manager(self.root, "periodic", keep)
        self._inference: dict[str, ocp.CheckpointManager] = {}

    def latest(self) -> int | None:
        return self.periodic.latest_step()

    def save(self, step: int, state: dict, data: Any, meta: dict) -> None:
        """A resume point: state, the data iterator's position and the loop's metadata."""
        if step in self.periodic.all_steps():
            return
        self.periodic.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                                         data=pipeline.iterator_save_args(data),
                                                         meta=ocp.args.JsonSave(meta)))

    def read_meta(self, step: int) -> dict:
        return self.periodic.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]

    def restore(self, step: int, template: dict, data: Any) -> dict:
        """The state at `step`, shaped and sharded like `template`; the iterator is restored in place (from the
        step alone when the checkpoint was written by another number of processes)."""
        items = dict(state=ocp.args.StandardRestore(_abstract(template)))
        own = self.root / "periodic" / str(step) / "data" / (
            f"process_{jax.process_index()}-of-{jax.process_count()}.json")
        if own.exists():
            items["data"] = pipeline.iterator_restore_args(data)
        state = self.periodic.restore(step, args=ocp.args.Composite(**items))["state"]
        if "data" not in items:
            log.info("checkpoint %d was written by another number of processes: data resume from its step", step)
            data.set_state({"step": step})
        return state

    def save_inference(self, name: str, step: int, variables: dict, info: dict) -> None:
        """`name` (best | final) at `step`: evaluation variables and a JSON description; one kept per name."""
        if name not in self._inference:
            self._inference[name] = _manager(self.root, name, 1)
        mngr = self._inference[name]
        if step in mngr.all_steps():
            return
        mngr.save(step, args=ocp.args.Composite(variables=ocp.args.StandardSave(variables),
                                                info=ocp.args.JsonSave(info)))

    def wait(self) -> None:
        for m in [self.periodic, *self._inference.values()]:
            m.wait_until_finished()


# ------------------------------------------------------------------------------------------- reading

def steps(directory: Path) -> list[int]:
    """Finalised orbax steps under `directory` (temporary, unfinished saves have non-numeric names)."""
    if not directory.is_dir():
        return []
    return sorted(int(p.name) for p in directory.iterdir() if p.name.isdigit() and any(p.iterdir()))


def find(workdir: str | Path, checkpoint: str | int = "best") -> tuple[str, int, Path]:
    """(name, step, directory) of a checkpoint name (its newest step) or a step number (of any kind)."""
    root = Path(workdir).absolute() / "checkpoints"
    kinds = {d.name: steps(d) for d in sorted(root.iterdir())} if root.is_dir() else {}
    available = ", ".join(f"{k} {v}" for k, v in kinds.items() if v) or "none"
    spec = str(checkpoint)
    if spec.isdigit():
        step = int(spec)
        name = next((k for k in ("periodic", *kinds) if step in kinds.get(k, [])), None)
    else:
        name = spec if kinds.get(spec) or spec not in OLD_NAMES else OLD_NAMES[spec]
        step = (kinds.get(name) or [None])[-1]
    if name is None or step is None:
        raise MissingDataError(f"no checkpoint {spec!r} under {root}; available: {available}")
    return name, step, root / name / str(step)


def _restore_numpy(directory: Path, keys: tuple[str, ...] | None = None) -> dict:
    """A saved pytree as numpy arrays (only `keys` of its top level, when given), on any number of devices."""
    ckptr = ocp.PyTreeCheckpointer()
    absl_log = logging.getLogger("absl")  # orbax warns that the step's metadata is one directory up
    level, absl_log.level = absl_log.level, logging.ERROR
    try:
        saved = ckptr.metadata(directory).item_metadata
        item = {k: saved[k] for k in (keys or saved.keys()) if k in saved}
        restore_args = jax.tree_util.tree_map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), item)
        return ckptr.restore(directory, args=ocp.args.PyTreeRestore(item=item, restore_args=restore_args,
                                                                    partial_restore=True))
    finally:
        absl_log.level = level


def read_variables(directory: Path) -> tuple[dict, int, bool]:
    """(evaluation variables, step, whether they are EMA weights) of a checkpoint directory: an inference save,
    or a resume point / older named checkpoint (its `state`, without the optimizer state)."""
    if (directory / "variables").is_dir():
        info = ocp.JsonCheckpointHandler().restore(directory / "info") if (directory / "info").is_dir() else {}
        return _restore_numpy(directory / "variables"), int(directory.name), bool(info.get("ema", False))
    state = _restore_numpy(directory / "state", ("step", "trainable", "frozen", "ema", "mutable"))
    return eval_variables(state), int(directory.name), "ema" in state


def eval_variables(state: dict) -> dict:
    """Model variables for evaluation from a train state: the frozen part, the trainable weights and any mutable
    collections (e.g. BatchNorm statistics), with their EMA in place of both when EMA is on."""
    live = optim.combine(optim.combine(state["trainable"], state["frozen"]), state.get("mutable", {}))
    return optim.combine(live, state.get("ema", {}))
