"""Orbax checkpoints: one manager per run, one directory per saved step.

    <workdir>/checkpoints/<step>/state    what training changes: trainable weights, optimizer state, EMA, mutable
                                          collections, rng, step (+ the frozen weights when checkpoint.store_frozen)
                                /data     the grain iterator (one file per process)
                                /loop     the loop state (`LoopState`, JSON): phase, best metric and step, history, ...
                                /frozen   fingerprint of the weights not stored (names, shapes, dtypes, CRC32)

The newest `checkpoint.keep` steps are kept, plus the steps the loop state records as `best` (and the bests of
`checkpoint.also_best`) and as `final`, and every `checkpoint.keep_every_epochs`-th epoch's, so rotation never
deletes them. Weights frozen for the whole run (the LoRA base, a task's frozen models) are reloaded from their
source (model.pretrained, or the initialisation from the run's seed) and checked against the fingerprint.
`read(workdir, which)` is the one reader (evaluate, predict, export, tests).

Orbax writes each step into a temporary directory and renames it when complete, so a killed save leaves the
previous step intact; a step that does not restore (truncated file, missing item) is skipped by a resume with a
warning and moved to <workdir>/broken_checkpoints/. The training batch at step t depends only on (seed, t), so a run
resumed by another number of processes (whose iterator files do not match) restarts the data at the saved step.
"""
from __future__ import annotations

import dataclasses
import logging
import shutil
import zlib
from pathlib import Path
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from flax import traverse_util

from jaxvit import optim
from jaxvit.data import pipeline
from jaxvit.errors import DataError, MissingDataError, UserError

log = logging.getLogger("jaxvit")
ROLES = ("best", "final", "latest")


class CheckpointError(UserError, OSError):
    """A checkpoint that cannot be written (full disk, I/O error) or read (broken, missing, of an older layout)."""


@dataclasses.dataclass
class LoopState:
    """What the loop needs besides the train state to continue exactly; JSON in each checkpoint."""

    phase: int = 0  # index into the run's phases
    phase_start: int = 0  # the step the phase began at
    best: float | None = None  # best value of checkpoint.best_metric so far
    best_step: int | None = None  # the step that reached it (kept by rotation)
    bests: dict = dataclasses.field(default_factory=dict)  # {"<evaluator>/<metric>": [best value, its step]} of
    # checkpoint.best_metric and checkpoint.also_best (read as best_<evaluator>_<metric>; kept by rotation)
    since_best: int = 0  # evaluations without improvement (patience)
    final_step: int | None = None  # set on the run's last checkpoint
    history: list = dataclasses.field(default_factory=list)  # the rows of training_history.csv
    sums: dict = dataclasses.field(default_factory=dict)  # train metric sums since the last evaluation
    lr: float = 0.0  # learning rate of the last logged step
    extra: dict = dataclasses.field(default_factory=dict)  # other JSON-able fields (e.g. a data fingerprint)

    def to_json(self) -> dict:
        return dataclasses.asdict(self)

    def kept_steps(self) -> set[int]:
        """The steps this loop state names (best ones, final), which rotation keeps."""
        return {s for s in (self.best_step, self.final_step, *(step for _, step in self.bests.values()))
                if s is not None}

    @classmethod
    def from_json(cls, d: dict) -> LoopState:
        names = {f.name for f in dataclasses.fields(cls)}
        extra = {**d.get("extra", {}), **{k: v for k, v in d.items() if k not in names}}
        return cls(**{k: v for k, v in d.items() if k in names and k != "extra"}, extra=extra)


# ------------------------------------------------------------------------------------------- frozen weights

def cast_frozen(tree: dict, dtype: str) -> dict:
    """Frozen matrices (ndim >= 2, floating) stored in model.frozen_dtype, as the train state holds them."""
    return jax.tree_util.tree_map(
        lambda x: x.astype(dtype) if jnp.issubdtype(x.dtype, jnp.floating) and x.ndim >= 2 else x, tree)


def fingerprint(variables: dict, names: list[str], source: str, stored: bool = False) -> dict:
    """{"source", "stored", "leaves": {name: [shape, dtype, crc32]}} of the leaves `names` of `variables` (as
    loaded from `source`); `stored`: whether checkpoints store them anyway (checkpoint.store_frozen)."""
    flat = {optim.path_str(k): v for k, v in traverse_util.flatten_dict(variables).items()}
    leaves = {}
    for n in names:
        a = np.ascontiguousarray(jax.device_get(flat[n]))
        leaves[n] = [list(a.shape), str(a.dtype), zlib.crc32(a.view(np.uint8).reshape(-1))]
    return {"source": source, "stored": stored, "leaves": leaves}


def check_fingerprint(saved: dict, now: dict) -> None:
    """A one-line error when the frozen weights loaded now are not those the checkpoint was trained with."""
    a, b = saved.get("leaves", {}), now.get("leaves", {})
    differ = sorted(set(a) ^ set(b)) or [k for k in sorted(a) if a[k] != b[k]]
    if differ:
        raise DataError(f"the frozen weights loaded from {now['source']} differ from those the run was trained "
                        f"with (from {saved['source']}): {len(differ)} of {len(a)} tensors, first {differ[0]!r}: "
                        f"saved {a.get(differ[0])}, now {b.get(differ[0])}; restore the original weights file")


def frozen_source(cfg) -> str:
    """Where a run's weights frozen for the whole run come from, for messages."""
    init = f"the initialisation of seed {cfg.seed}"
    return f"model.pretrained={cfg.model.pretrained!r} (else {init})" if cfg.model.pretrained else init


@dataclasses.dataclass
class Source:
    """The variables a run started from (`variables()` loads them), named for messages, and model.frozen_dtype."""

    variables: Callable[[], dict]
    name: str
    frozen_dtype: str


def _drop(tree: dict, names: list[str]) -> dict:
    drop = {tuple(n.split("/")) for n in names}
    return traverse_util.unflatten_dict({k: v for k, v in traverse_util.flatten_dict(tree).items()
                                         if k not in drop})


def lean(state: dict, frozen: dict) -> dict:
    """The train state without the frozen leaves the fingerprint `frozen` lists (unless it says they are stored)."""
    names = [] if frozen.get("stored", True) else list(frozen["leaves"])
    return dict(state, frozen=_drop(state["frozen"], names)) if names else state


def fill_frozen(state: dict, source_variables: dict, frozen_dtype: str) -> dict:
    """A lean state completed with the frozen leaves of `source_variables` (cast as training cast them)."""
    return dict(state, frozen=optim.combine(cast_frozen(source_variables, frozen_dtype), state["frozen"]))


# ------------------------------------------------------------------------------------------- writing

def _nbytes(tree: Any) -> int:
    return sum(x.size * x.dtype.itemsize for x in jax.tree_util.tree_leaves(tree) if hasattr(x, "dtype"))


def _abstract(tree: Any) -> Any:
    return jax.tree_util.tree_map(ocp.utils.to_shape_dtype_struct, tree)


class Checkpoints:
    """A run's checkpoints (async orbax saves; errors of a save surface at the next save or `wait`)."""

    def __init__(self, root: str | Path, keep: int = 3, keep_period: int = 0):
        self.root = Path(root).absolute()  # orbax needs absolute paths
        _refuse_old_layout(self.root)
        self.keep, self.keep_period = keep, keep_period  # keep_period: steps that are its multiples are kept too
        self.mngr = ocp.CheckpointManager(self.root, options=ocp.CheckpointManagerOptions(
            create=True, cleanup_tmp_directories=True))  # a killed save's temporary directory is removed
        self._pending: tuple[int, int] | None = None  # (step, bytes) of a save in flight
        self._failed = False  # a save failed (and was reported): nothing more to wait for

    def steps(self) -> list[int]:
        return _steps(self.root)

    def save(self, step: int, state: dict, data: Any, loop: LoopState, frozen: dict) -> None:
        """One step: the train state without the leaves `frozen` fingerprints, the iterator and the loop state;
        older steps beyond `keep` that the loop state does not name (best, final) and that are not multiples of
        `keep_period` are deleted."""
        if step in self.mngr.all_steps():
            return
        stored = lean(state, frozen)
        self.wait()  # the previous save's errors first
        self._pending = (step, _nbytes(stored))
        try:
            self.mngr.save(step, args=ocp.args.Composite(
                state=ocp.args.StandardSave(stored), data=pipeline.iterator_save_args(data),
                loop=ocp.args.JsonSave(loop.to_json()), frozen=ocp.args.JsonSave(frozen)))
        except Exception as e:  # noqa: BLE001 - any write failure is reported the same way
            raise self._write_error(e) from e
        kept = set(sorted({*self.steps(), step})[-self.keep:]) | loop.kept_steps()
        for old in self.mngr.all_steps():
            if old not in kept and not (self.keep_period and old % self.keep_period == 0):
                self.mngr.delete(old)

    def wait(self) -> None:
        """Completes the save in flight; a failure is a CheckpointError naming the directory and bytes needed."""
        if self._failed:
            return
        try:
            self.mngr.wait_until_finished()
        except Exception as e:  # noqa: BLE001
            raise self._write_error(e) from e
        self._pending = None

    def _write_error(self, e: Exception) -> CheckpointError:
        step, nbytes = self._pending or (None, 0)
        self._pending, self._failed = None, True
        free = shutil.disk_usage(self.root).free
        previous = ([s for s in self.steps() if s != step] or ["none"])[-1]
        return CheckpointError(
            f"could not write checkpoint step {step} under {self.root} ({_reason(e)}): it needs about "
            f"{nbytes / 1e6:.1f} MB, {free / 1e6:.1f} MB are free there; the previous checkpoint ({previous}) is "
            "intact - free space (or lower checkpoint.keep) and run again to resume")

    def restore_latest(self, template: Callable[[LoopState], dict], data: Any,
                       frozen: dict) -> tuple[dict, LoopState] | None:
        """(state, loop state) of the newest step that restores, shaped and sharded like `template(loop state)`
        (whose frozen leaves fill what the checkpoint does not store; `frozen`: their fingerprint now); the iterator
        is restored in place. Newer steps that do not restore are reported and moved to broken_checkpoints/.
        None: no checkpoint."""
        for step in reversed(self.steps()):
            try:
                out = self._restore(step, template, data, frozen)
            except DataError:
                raise
            except Exception as e:  # noqa: BLE001 - any unreadable step is skipped the same way
                out, reason = None, _reason(e)
            if _everywhere(out is not None):
                return out
            older = [s for s in self.steps() if s < step]
            log.warning("checkpoint %s does not restore (%s); moved to broken_checkpoints/, resuming from %s",
                        self.root / str(step), reason if out is None else "on another process",
                        f"step {older[-1]}" if older else "the start")
            self._set_aside(step)
        return None

    def _restore(self, step: int, template: Callable[[LoopState], dict], data: Any,
                 frozen: dict) -> tuple[dict, LoopState]:
        about = self.mngr.restore(step, args=ocp.args.Composite(frozen=ocp.args.JsonRestore(),
                                                                loop=ocp.args.JsonRestore()))
        if not about["frozen"].get("stored", True):
            check_fingerprint(about["frozen"], frozen)
        loop = LoopState.from_json(about["loop"])
        template = template(loop)
        items = dict(state=ocp.args.StandardRestore(_abstract(lean(template, about["frozen"]))))
        own = self.root / str(step) / "data" / f"process_{jax.process_index()}-of-{jax.process_count()}.json"
        if own.exists():
            items["data"] = pipeline.iterator_restore_args(data)
        out = self.mngr.restore(step, args=ocp.args.Composite(**items))
        if "data" not in items:
            log.info("checkpoint %d was written by another number of processes: data resume from its step", step)
            data.set_state({"step": step})
        state = dict(out["state"], frozen=optim.combine(template["frozen"], out["state"]["frozen"]))
        return state, loop

    def _set_aside(self, step: int) -> None:
        if jax.process_index() == 0:
            target = self.root.parent / "broken_checkpoints" / str(step)
            target.parent.mkdir(exist_ok=True)
            shutil.rmtree(target, ignore_errors=True)
            (self.root / str(step)).rename(target)
        _everywhere(True)  # a barrier
        self.mngr.reload()


def _everywhere(ok: bool) -> bool:
    """`ok` on every process."""
    if jax.process_count() == 1:
        return ok
    from jax.experimental import multihost_utils
    return bool(np.all(multihost_utils.process_allgather(np.asarray(ok))))


def _reason(e: Exception) -> str:
    text = str(e)
    if "No space left on device" in text or getattr(e, "errno", None) == 28:
        return "no space left on device"
    return f"{type(e).__name__}: {(text.splitlines() or [''])[0][:200]}"


# ------------------------------------------------------------------------------------------- reading

@dataclasses.dataclass
class Saved:
    """One checkpoint read back as numpy: the train state (frozen leaves filled from their source when asked),
    the loop state and the frozen-weights fingerprint."""

    step: int
    which: str  # what was asked: best | best_<evaluator>_<metric> | final | latest | step
    state: dict
    loop: LoopState
    frozen: dict
    directory: Path

    @property
    def ema(self) -> bool:
        return "ema" in self.state

    missing_frozen: bool = False  # a lean checkpoint read without its source: the frozen leaves are not in `state`

    def variables(self) -> dict:
        if self.missing_frozen:
            raise CheckpointError(f"{self.directory} is lean (the frozen weights are not stored): read it with "
                                  "source=jaxvit.run_io.source_of(workdir), or load it with jaxvit.run_io.load_run")
        return eval_variables(self.state)


def steps(workdir: str | Path) -> list[int]:
    """The saved steps of a run (finished or not, readable or not)."""
    return _steps(Path(workdir).absolute() / "checkpoints")


def _steps(root: Path) -> list[int]:
    """Finalised steps (orbax's temporary directories have non-numeric names)."""
    if not root.is_dir():
        return []
    return sorted(int(p.name) for p in root.iterdir() if p.name.isdigit() and p.is_dir())


def _refuse_old_layout(root: Path) -> None:
    old = [n for n in ("periodic", "best", "final", "best_acc", "best_f1") if (root / n).is_dir()]
    if old:
        raise CheckpointError(f"{root} holds checkpoints of an older jaxvit ({', '.join(old)}/<step>); this version "
                              "reads <workdir>/checkpoints/<step>: train the run again (or read it with the jaxvit "
                              "release it was trained with)")


def _read_step(directory: Path) -> tuple[dict, LoopState, dict]:
    absl_log = logging.getLogger("absl")  # orbax warns that the step's metadata is one directory up
    level, absl_log.level = absl_log.level, logging.ERROR
    try:
        json_of = lambda item: ocp.JsonCheckpointHandler().restore(directory / item)  # noqa: E731
        ckptr = ocp.PyTreeCheckpointer()
        item = ckptr.metadata(directory / "state").item_metadata
        restore_args = jax.tree_util.tree_map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), item)
        state = ckptr.restore(directory / "state", args=ocp.args.PyTreeRestore(item=item, restore_args=restore_args))
        return state, LoopState.from_json(json_of("loop")), json_of("frozen")
    finally:
        absl_log.level = level


def _try_read(directory: Path) -> tuple[dict, LoopState, dict] | str:
    try:
        return _read_step(directory)
    except Exception as e:  # noqa: BLE001 - an unreadable checkpoint, whatever the reason
        return _reason(e)


def best_name(tag: str) -> str:
    """The checkpoint name of the best step by "<evaluator>/<metric>": best_<evaluator>_<metric>."""
    return "best_" + tag.replace("/", "_", 1)


def read(workdir: str | Path, which: str | int = "best", source: Source | None = None) -> Saved:
    """The checkpoint `which` of a run: "best" | "final" | "latest" (the newest that restores) | a step |
    "best_<evaluator>_<metric>" (the best by checkpoint.best_metric or one of checkpoint.also_best).
    `source` (`jaxvit.run_io.source_of(workdir)`) fills the frozen weights a lean checkpoint does not store; they
    must match its fingerprint. Without it a lean checkpoint's state has only what it stores (its `variables()`
    refuse; `jaxvit.run_io.load_run` passes the source)."""
    root = Path(workdir).absolute() / "checkpoints"
    _refuse_old_layout(root)
    steps = _steps(root)
    spec = str(which)
    if spec not in ROLES and not spec.isdigit() and not spec.startswith("best_"):
        raise MissingDataError(f"checkpoint {spec!r}: use best, final, latest, best_<evaluator>_<metric> or a step "
                               "number")
    if not steps:
        raise MissingDataError(f"no checkpoint under {root}: has the run saved one yet?")
    newest, broken = None, []
    for step in reversed(steps):  # the newest that restores: the latest, and the loop state naming best / final
        got = _try_read(root / str(step))
        if isinstance(got, str):
            broken.append(f"{step} ({got})")
            continue
        newest = (step, got)
        break
    if newest is None:
        raise CheckpointError(f"no checkpoint under {root} restores: " + "; ".join(broken))
    if broken:
        log.warning("checkpoint(s) %s under %s do not restore; the newest good one is step %d", ", ".join(broken),
                    root, newest[0])
    loop = newest[1][1]
    named = dict(latest=newest[0], best=loop.best_step, final=loop.final_step,
                 **{best_name(tag): s for tag, (_, s) in loop.bests.items()})
    step = int(spec) if spec.isdigit() else named.get(spec)
    good = lambda: [s for s in steps if s != step and not isinstance(_try_read(root / str(s)), str)]  # noqa: E731
    if step is None and broken:
        raise CheckpointError(f"checkpoint {spec!r} of {root}: the newest checkpoints, which would name it, do not "
                              f"restore: {'; '.join(broken)}; good checkpoints: {', '.join(map(str, good()))} (pass "
                              "one as the checkpoint)")
    if step not in steps:
        available = f"steps {', '.join(map(str, steps))}; " + "; ".join(
            f"{k} {v}" for k, v in named.items() if k != "latest")
        raise MissingDataError(f"no checkpoint {spec!r} under {root}; available: {available}")
    got = newest[1] if step == newest[0] else _try_read(root / str(step))
    if isinstance(got, str):
        raise CheckpointError(f"checkpoint {spec} ({root / str(step)}) does not restore ({got}); good checkpoints: "
                              f"{', '.join(map(str, good())) or 'none'} (pass one as the checkpoint)")
    state, loop, frozen = got
    if not frozen.get("stored", True) and source is not None:
        try:
            variables = source.variables()
        except (OSError, ValueError) as e:
            raise CheckpointError(
                f"{root / str(step)} does not store the weights frozen for the whole run; they come from "
                f"{source.name}, which does not load here ({_reason(e)}); point model.pretrained in config.json at a "
                "copy of it (runs that must travel: checkpoint.store_frozen=True)") from e
        names = list(frozen["leaves"])
        check_fingerprint(frozen, fingerprint(variables, names, source.name))
        picked = {k: v for k, v in traverse_util.flatten_dict(variables).items() if optim.path_str(k) in names}
        state = fill_frozen(state, jax.device_get(traverse_util.unflatten_dict(picked)), source.frozen_dtype)
        state = jax.tree_util.tree_map(np.asarray, state)
    missing = not frozen.get("stored", True) and source is None and bool(frozen.get("leaves"))
    return Saved(step, "step" if spec.isdigit() else spec, state, loop, frozen, root / str(step), missing)


def eval_variables(state: dict) -> dict:
    """Model variables for evaluation from a train state: the frozen part, the trainable weights and any mutable
    collections (e.g. BatchNorm statistics), with their EMA in place of both when EMA is on."""
    live = optim.combine(optim.combine(state["trainable"], state["frozen"]), state.get("mutable", {}))
    return optim.combine(live, state.get("ema", {}))
