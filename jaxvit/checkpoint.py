"""Orbax checkpoints of the train state, the grain iterator and run metadata.

Layout: `<workdir>/checkpoints/periodic/<step>/` (the newest `keep`, used to resume) and
`<workdir>/checkpoints/{best_acc,best_f1,final}/<step>/` (one each). Orbax writes each checkpoint to a
temporary directory and renames it when complete, so a killed run never leaves a corrupt checkpoint.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp

from jaxvit.data import pipeline


def _abstract(state: dict) -> dict:
    return jax.tree_util.tree_map(ocp.utils.to_shape_dtype_struct, state)


class Checkpoints:
    def __init__(self, root: str | Path, keep: int = 3):
        self.root = Path(root).absolute()
        self.periodic = self._manager("periodic", keep)
        self.named: dict[str, ocp.CheckpointManager] = {}

    def _manager(self, name: str, keep: int) -> ocp.CheckpointManager:
        # Multi-process: orbax names its barriers after the step directory ("5"), the same for every manager that
        # saves step 5 at once (periodic, best_acc, best_f1); a per-manager prefix keeps them apart (else: hang).
        return ocp.CheckpointManager(self.root / name, options=ocp.CheckpointManagerOptions(
            max_to_keep=keep, create=True,
            multiprocessing_options=ocp.options.MultiprocessingOptions(barrier_sync_key_prefix=name)))

    def _named(self, name: str) -> ocp.CheckpointManager:
        if name not in self.named:
            self.named[name] = self._manager(name, 1)
        return self.named[name]

    def latest(self) -> int | None:
        return self.periodic.latest_step()

    @staticmethod
    def _save(mngr: ocp.CheckpointManager, step: int, state: dict, data: Any, meta: dict) -> None:
        if step in mngr.all_steps():
            return
        mngr.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                                data=pipeline.iterator_save_args(data),
                                                meta=ocp.args.JsonSave(meta)))

    def save_periodic(self, step: int, state: dict, data: Any, meta: dict) -> None:
        self._save(self.periodic, step, state, data, meta)

    def save_named(self, name: str, step: int, state: dict, data: Any, meta: dict) -> None:
        self._save(self._named(name), step, state, data, meta)

    def read_meta(self, step: int) -> dict:
        return self.periodic.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]

    def restore(self, step: int, state: dict, data: Any) -> dict:
        """State shaped and sharded like `state`; the iterator is restored in place."""
        out = self.periodic.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(_abstract(state)), data=pipeline.iterator_restore_args(data)))
        return out["state"]

    def restore_named(self, name: str) -> dict:
        """The raw state saved as `name` (numpy leaves; its trainable/frozen split is the one it was saved
        with, which may differ from the current stage's)."""
        mngr = self._named(name)
        step = mngr.latest_step()
        if step is None:
            raise FileNotFoundError(f"no {name!r} checkpoint under {self.root / name}")
        return mngr.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore()))["state"]

    def wait(self) -> None:
        for m in [self.periodic, *self.named.values()]:
            m.wait_until_finished()
