"""The training loop for every task: state, the jitted step over the mesh, phases, evaluation points,
checkpoints, logs. The task (`jaxvit.tasks`) supplies the model, data, loss and evaluation.

State is a plain dict pytree: {step, rng, trainable, frozen, opt_state[, ema][, mutable]}. `trainable` and
`frozen` partition the parameter collections ({"params", "lora"}) by path for the current phase, so
gradients and optimizer state exist for the trainable leaves only; `mutable` holds any other collection
(BatchNorm statistics, task state), updated by the task's loss; `ema` averages `trainable` and BatchNorm statistics.

One step: batch (dict of fields, sharded over the mesh's batch axes) -> task.loss(model, variables, batch,
rng) per micro-batch -> mean loss, grads of `trainable` -> optimizer (phase lr x multipliers) -> new state
(unchanged when the loss or gradient is not finite) -> EMA.
"""
from __future__ import annotations

import csv
import dataclasses
import json
import logging
import time
from pathlib import Path
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from clu import parameter_overview
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from jaxvit import config as config_lib
from jaxvit import debug_nans, lora, optim, sharding, tasks, xla_options
from jaxvit.checkpoint import Checkpoints, eval_variables, find, read_variables
from jaxvit.data import pipeline
from jaxvit.errors import ConfigError
from jaxvit.report import plot_training_curves, stem
from jaxvit.writers import create_writer

log = logging.getLogger("jaxvit")
PARAM_COLLECTIONS = ("params", "lora")


# ------------------------------------------------------------------------------------------- phases

@dataclasses.dataclass(frozen=True)
class Phase:
    """A stretch of training with its own trainable set and learning rate. Every phase but the last ends after
    `epochs` or `steps`, or after `patience` evaluations without a better best metric; the last runs to the
    end of training (or stops early after `patience`). When every phase has epochs or steps, training is
    their sum (train.epochs / train.steps are then not used)."""

    name: str
    trainable: str | tuple[str, ...] = "all"  # "head" | "all" | regexes over variable paths
    epochs: int = 0
    steps: int = 0
    patience: int = 0
    lr: float = 0.0  # 0: optim.lr
    lr_mults: tuple = ()  # (): optim.lr_mults

    def length(self, steps_per_epoch: int) -> int:
        return self.steps or self.epochs * steps_per_epoch


def phases(cfg) -> list[Phase]:
    """train.phases, or the shorthands train.freeze_backbone (the head alone) and the two-stage train.stage1_epochs /
    stage1_patience, or one phase."""
    t = cfg.train
    if t.phases:
        return [Phase(**{k: tuple(v) if isinstance(v, list) else v for k, v in dict(p).items()})
                for p in t.phases]
    if t.freeze_backbone:
        return [Phase("head", "head")]
    if t.stage1_epochs or t.stage1_patience or t.stage2_epochs:
        return [Phase("head", "head", epochs=t.stage1_epochs, patience=t.stage1_patience),
                Phase("all", epochs=t.stage2_epochs)]
    return [Phase("all")]


# ------------------------------------------------------------------------------------------- state and step

def partition(variables: dict, rule: Callable[[str], bool]) -> tuple[dict, dict, dict]:
    """(trainable, frozen, mutable): parameter collections split by `rule` over paths; other collections."""
    params = {k: v for k, v in variables.items() if k in PARAM_COLLECTIONS}
    mutable = {k: v for k, v in variables.items() if k not in PARAM_COLLECTIONS}
    return (*optim.split(params, rule), mutable)


def _averaged(trainable: dict, mutable: dict) -> dict:
    """What the EMA averages: the trainable weights and BatchNorm statistics (so that the statistics follow the
    averaged weights, as timm's ModelEmaV2 averages buffers); other task state is not averaged."""
    return optim.combine(trainable, {k: v for k, v in mutable.items() if k == "batch_stats"})


def init_state(cfg, variables: dict, rule: Callable[[str], bool], tx: optax.GradientTransformation, mesh: Mesh,
               step: int = 0) -> tuple[dict, Any]:
    """(state, its shardings): created straight into the mesh layout (FSDP / tensor parallel from config.mesh).
    Trainable leaves are float32; frozen matrices are stored in model.frozen_dtype."""
    trainable, frozen, mutable = partition(variables, rule)
    cast = lambda tree, dt, ndim: jax.tree_util.tree_map(
        lambda x: x.astype(dt) if jnp.issubdtype(x.dtype, jnp.floating) and x.ndim >= ndim else x, tree)
    trainable, frozen = cast(trainable, jnp.float32, 0), cast(frozen, jnp.dtype(cfg.model.frozen_dtype), 2)

    def init(trainable, frozen, mutable):
        state = dict(step=jnp.asarray(step, jnp.int32), rng=jax.random.key_data(jax.random.key(cfg.seed + 1)),
                     trainable=trainable, frozen=frozen, opt_state=tx.init(trainable))
        if cfg.train.ema_decay:
            state["ema"] = jax.tree_util.tree_map(jnp.copy, _averaged(trainable, mutable))
        if mutable:
            state["mutable"] = mutable
        return state

    shardings = sharding.state_shardings(jax.eval_shape(init, trainable, frozen, mutable), mesh,
                                         cfg.mesh.fsdp_min_size)
    parts = tuple(shardings.get(k, {}) for k in ("trainable", "frozen", "mutable"))
    state = jax.jit(init, in_shardings=parts, out_shardings=shardings)(
        *jax.device_put((trainable, frozen, mutable), parts))
    return state, shardings


def make_step(task, model, cfg, tx: optax.GradientTransformation, lr_schedule: Callable) -> Callable:
    """step(state, batch) -> (state, metrics): the un-jitted train step (jit it with the state's shardings)."""
    t = cfg.train

    def loss_fn(trainable, frozen, mutable, batch, rng, step):
        variables = optim.combine(optim.combine(trainable, frozen), mutable)
        loss, metrics, updates = task.loss(model, variables, batch, rng, step=step)
        return loss.mean(), (loss, metrics, updates)

    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

    def step(state, batch):
        rng = jax.random.fold_in(jax.random.wrap_key_data(state["rng"]), state["step"])
        mutable = state.get("mutable", {})
        if t.grad_accum == 1:
            (_, (losses, metrics, updates)), grads = grad_fn(state["trainable"], state["frozen"], mutable, batch, rng,
                                                             state["step"])
        else:  # equal micro-batches: the mean of their gradients is the gradient of the full batch
            k = t.grad_accum
            micro_batches = jax.tree_util.tree_map(lambda x: x.reshape(k, x.shape[0] // k, *x.shape[1:]), batch)

            def micro(carry, xs):
                grads, mut = carry
                i, mb = xs
                (_, (l, m, upd)), g = grad_fn(state["trainable"], state["frozen"], mut, mb, jax.random.fold_in(rng, i),
                                              state["step"])
                return (jax.tree_util.tree_map(jnp.add, grads, g), optim.combine(mut, upd)), (l, m)

            zeros = jax.tree_util.tree_map(jnp.zeros_like, state["trainable"])
            (grads, updates), (losses, metrics) = jax.lax.scan(micro, (zeros, mutable), (jnp.arange(k), micro_batches))
            grads = jax.tree_util.tree_map(lambda g: g / k, grads)
            losses, metrics = jax.tree_util.tree_map(lambda x: x.reshape(-1, *x.shape[2:]), (losses, metrics))
        loss = losses.mean()
        new_updates, opt_state = tx.update(grads, state["opt_state"], state["trainable"])
        trainable = optax.apply_updates(state["trainable"], new_updates)
        grad_norm = optax.tree.norm(grads)
        finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
        keep = lambda new, old: jax.tree_util.tree_map(lambda a, b: jnp.where(finite, a, b), new, old)
        new = dict(state, step=state["step"] + 1, trainable=keep(trainable, state["trainable"]),
                   opt_state=keep(opt_state, state["opt_state"]))
        if mutable:
            after = task.after_update(optim.combine(new["trainable"], state["frozen"]),
                                      optim.combine(mutable, updates), state["step"])
            new["mutable"] = keep(after, mutable)
        if "ema" in state:
            current = _averaged(new["trainable"], new.get("mutable", {}))
            new["ema"] = keep(optim.ema_update(state["ema"], current, t.ema_decay), state["ema"])
        out = {k: jnp.mean(v) for k, v in metrics.items()}
        out.update(loss=loss, grad_norm=grad_norm, nonfinite=1 - finite.astype(jnp.int32),
                   bad=jnp.sum(batch["bad"]) if "bad" in batch else jnp.int32(0), lr=lr_schedule(state["step"]))
        return new, out

    return step


# ------------------------------------------------------------------------------------------- the loop

class Trainer:
    """Holds what the loop needs; `run` trains, evaluates, checkpoints and finally tests."""

    def __init__(self, cfg, workdir: str | Path):
        config_lib.validate(cfg)
        self.cfg, self.workdir = cfg, Path(workdir).absolute()
        self.is_main = jax.process_index() == 0
        self.task = tasks.create(cfg, self.workdir)
        self.mesh = sharding.make_mesh(cfg.mesh)
        self.replicated = NamedSharding(self.mesh, P())
        self.batch_sharding = NamedSharding(self.mesh, sharding.batch_spec(self.mesh))
        self._preflight()
        t = cfg.train
        self.train_src = self.task.source(cfg.data.train_split)
        if cfg.data.train_limit:
            self.train_src = pipeline.FirstN(self.train_src, cfg.data.train_limit)
        self.steps_per_epoch = self.task.steps_per_epoch(len(self.train_src), t.batch_size)
        self.phases = phases(cfg)
        lengths = [p.length(self.steps_per_epoch) for p in self.phases]
        # Phases that all have a length define the run's; otherwise the last runs to train.steps / train.epochs.
        self.total_steps = sum(lengths) if (t.phases or t.stage2_epochs) and all(lengths) \
            else t.steps or t.epochs * self.steps_per_epoch
        self.eval_every = cfg.eval.every_steps or self.steps_per_epoch
        self.task.set_run_length(self.total_steps, self.steps_per_epoch)
        self.model, self.variables = self.task.build(jax.random.key(cfg.seed))
        self.depth = self.task.depth(self.model)
        self.best_metric = cfg.checkpoint.best_metric or self.task.best_metric
        if self.best_metric.split("/", 1)[1] not in self.task.history_metrics:
            raise ConfigError(f"checkpoint.best_metric={self.best_metric!r}: the {cfg.task} task reports "
                              + ", ".join(f"val/{m}" for m in self.task.history_metrics))
        self.best_sign = 1.0 if (cfg.checkpoint.best_mode or self.task.best_mode) == "max" else -1.0
        self.writer = create_writer(self.workdir, self.is_main)
        self.ckpts = Checkpoints(self.workdir / "checkpoints", keep=cfg.checkpoint.keep)

    def _preflight(self) -> None:
        c = self.cfg
        per_dev, per_proc = sharding.batch_shares(c.train.batch_size, self.mesh, micro=c.train.grad_accum)
        sharding.batch_shares(c.eval.batch_size, self.mesh, "eval.batch_size")
        log.info("mesh %s over %d processes: global batch %d = %d per batch shard, %d per process",
                 dict(self.mesh.shape), jax.process_count(), c.train.batch_size, per_dev, per_proc)
        if self.is_main:
            self.task.prepare()
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils
            multihost_utils.sync_global_devices("data prepared")
        splits = tuple(s for s in (c.data.train_split, c.eval.val_split, c.eval.test_split) if s)
        manifest = self.workdir / "preflight.json" if self.is_main else None
        self.task.preflight(splits, manifest)

    # -- phases and compilation
    def _phase_setup(self, index: int, variables: dict, start: int) -> tuple[dict, Callable, dict]:
        """(state, compiled step, lr multipliers) for phase `index` starting at step `start`."""
        phase = self.phases[index]
        rule = optim.trainable_rule(phase.trainable, self.cfg, self.task.head, self.task.frozen)
        trainable = partition(variables, rule)[0]
        length = phase.length(self.steps_per_epoch) if index < len(self.phases) - 1 or self.cfg.train.stage2_epochs \
            else 0
        tx, schedule, mults = optim.make_optimizer(self.cfg, trainable, length or self.total_steps - start,
                                                   self.depth, phase.lr or None, phase.lr_mults,
                                                   self.task.lr_gates(self.steps_per_epoch))
        state, self.state_sharding = init_state(self.cfg, variables, rule, tx, self.mesh, start)
        step = make_step(self.task, self.model, self.cfg, tx, lambda s: schedule(s - start))
        compiled = xla_options.jit(step, in_shardings=(self.state_sharding, self.batch_sharding),
                                   out_shardings=(self.state_sharding, self.replicated), donate_argnums=0)
        return state, compiled, mults

    def _phase_over(self, meta: dict, step: int) -> bool:
        phase, last = self.phases[meta["phase"]], meta["phase"] == len(self.phases) - 1
        by_length = (not last or self.cfg.train.stage2_epochs) and phase.length(self.steps_per_epoch) and (
            step - meta["phase_start"] >= phase.length(self.steps_per_epoch))
        patience_over = phase.patience and meta["since_best"] >= phase.patience and step >= self.cfg.train.min_steps
        return bool(by_length or patience_over)

    # -- evaluation
    def evaluate(self, state: dict, split: str, out_dir: Path | None = None) -> dict:
        return self.task.evaluate(self.model, eval_variables(state), split, self.mesh,
                                  out_dir if self.is_main else None)

    # -- the loop
    def run(self) -> dict:
        c, t = self.cfg, self.cfg.train
        if self.is_main:
            self.workdir.mkdir(parents=True, exist_ok=True)
            (self.workdir / "config.json").write_text(c.to_json_best_effort(indent=2))
            for name, content in self.task.run_files().items():
                (self.workdir / name).write_text(json.dumps(content, indent=2))
        data = pipeline.train_iterator(self.train_src, self.task.train_transform(), c.data, global_batch=t.batch_size,
                                       seed=c.seed, batch_transform=self.task.batch_transform())
        meta = dict(phase=0, phase_start=0, best=None, since_best=0, history=[], sums={}, lr=0.0)
        latest = self.ckpts.latest()
        if latest is not None:
            meta = self.ckpts.read_meta(latest)
        state, step_fn, mults = self._phase_setup(meta["phase"], self.variables, meta["phase_start"])
        if latest is not None:
            state = self.ckpts.restore(latest, state, data)
            log.info("resumed from step %d (phase %s)", latest, self.phases[meta["phase"]].name)
        self._log_overview(state, mults)
        if c.eval.at_start and latest is None and c.eval.val_split:
            self._eval_point(state, meta, 0, 0.0)  # the starting point of the curves (k-NN of the initial teacher)
        try:
            state, step = self._loop(state, step_fn, data, meta)
            self.ckpts.save_inference("final", step, eval_variables(state), self._info(step, meta))
        finally:  # a run that stops on an error still completes the checkpoints it started
            self.ckpts.wait()
            data.close()
        if self.is_main and meta["history"]:
            plot_training_curves(self.workdir / "training_history.csv", self.workdir / "training_curves.png")
        return self._final_test(state)

    def _loop(self, state: dict, step_fn: Callable, data: Any, meta: dict) -> tuple[dict, int]:
        """Steps until the end (or an early stop): logs, evaluations, phase switches, resume points."""
        c, t = self.cfg, self.cfg.train
        step = int(state["step"])
        pending, t_log, n_log, t_eval, step_eval = [], time.time(), 0, time.time(), step
        while step < self.total_steps:
            batch = self._global_batch(next(data))
            if t.debug_nans:
                state, m = debug_nans.checked_step(step_fn, state, batch, self.task, self.model, step)
            else:
                state, m = step_fn(state, batch)
            pending.append(m)
            step += 1
            n_log += 1
            at_eval = step % self.eval_every == 0 or step == self.total_steps
            save_now = c.checkpoint.every_steps and step % c.checkpoint.every_steps == 0
            if step % t.log_every_steps == 0 or at_eval or save_now:
                ips = n_log * t.batch_size / (time.time() - t_log)
                self._log_train(jax.device_get(pending), meta, step, ips)  # the one host sync per log period
                pending, t_log, n_log = [], time.time(), 0
            if at_eval:
                self._eval_point(state, meta, step, (step - step_eval) * t.batch_size / (time.time() - t_eval))
                t_eval, step_eval = time.time(), step
            stop = self._phase_over(meta, step) and meta["phase"] == len(self.phases) - 1
            if stop and meta["since_best"] >= self.phases[-1].patience > 0:
                log.info("stopping early at step %d: %s has not improved for %d evaluations", step,
                         self.best_metric, meta["since_best"])
            elif stop:
                log.info("the last phase's %d epochs are done at step %d", self.phases[-1].epochs, step)
            elif self._phase_over(meta, step):
                state, step_fn = self._next_phase(state, meta, step)
            if at_eval or save_now or stop:
                self.ckpts.save(step, state, data, meta)
            if stop:
                break
        return state, step

    def _eval_point(self, state: dict, meta: dict, step: int, ips: float) -> None:
        """Validation, a history row, the best checkpoint."""
        c = self.cfg
        val = self.evaluate(state, c.eval.val_split) if c.eval.val_split else {}
        sums = meta["sums"]
        n = max(sums.pop("steps", 0), 1)
        row = dict(epoch=_epochs(step, self.steps_per_epoch), step=step, phase=self.phases[meta["phase"]].name,
                   **{f"train_{k}": v / n for k, v in sums.items()},
                   **{f"val_{k}": val[k] for k in self.task.history_metrics if k in val},
                   lr=meta["lr"], images_per_s=ips)
        meta["sums"] = {}
        meta["history"].append(row)
        self._write_history(meta["history"])
        self.writer.write_scalars(step, {f"eval/{k}": v for k, v in row.items() if isinstance(v, (int, float))})
        log.info("step %d (epoch %s): %s", step, row["epoch"], ", ".join(
            f"{k} {v:.4f}" for k, v in row.items() if k.startswith("val_")))
        split, key = self.best_metric.split("/", 1)
        value = {"val": val}.get(split, {}).get(key)
        if value is None:
            return
        improved = meta["best"] is None or self.best_sign * (value - meta["best"]) > 0
        meta["since_best"] = 0 if improved else meta["since_best"] + 1
        if improved:
            meta["best"] = float(value)
            self.ckpts.save_inference("best", step, eval_variables(state), self._info(step, meta))

    def _info(self, step: int, meta: dict) -> dict:
        """What an inference checkpoint says about itself (the config makes it self-contained)."""
        return dict(step=step, task=self.cfg.task, metric=self.best_metric, best=meta["best"],
                    ema=bool(self.cfg.train.ema_decay), config=json.loads(self.cfg.to_json_best_effort()))

    def _next_phase(self, state: dict, meta: dict, step: int):
        index = meta["phase"] + 1
        log.info("phase %r from step %d", self.phases[index].name, step)
        meta.update(phase=index, phase_start=step, since_best=0)
        variables = optim.combine(optim.combine(state["trainable"], state["frozen"]), state.get("mutable", {}))
        state, step_fn, mults = self._phase_setup(index, variables, step)  # EMA restarts from the weights
        self._log_overview(state, mults)
        return state, step_fn

    def _final_test(self, state: dict) -> dict:
        c = self.cfg
        if not c.eval.test_split:
            return {}
        name = c.eval.test_checkpoint
        if name == "final":
            variables = eval_variables(state)
        else:
            variables = read_variables(find(self.workdir, name)[2])[0]
            variables = jax.device_put(variables, sharding.state_shardings(variables, self.mesh,
                                                                           c.mesh.fsdp_min_size))
        results = self.task.evaluate(self.model, variables, c.eval.test_split, self.mesh,
                                     self.workdir / f"eval_{stem(c.eval.test_split)}" if self.is_main else None)
        log.info("%s (%s checkpoint): %s", c.eval.test_split, name, ", ".join(
            f"{k} {results[k]:.4f}" for k in self.task.history_metrics if k in results))
        self.writer.flush()
        return results

    # -- logging
    def _global_batch(self, local: dict) -> dict:
        return {k: jax.make_array_from_process_local_data(self.batch_sharding, v) for k, v in local.items()}

    def _log_train(self, ms: list[dict], meta: dict, step: int, ips: float) -> None:
        """Console + TensorBoard for one log period; sums since the last evaluation go into `meta`, so a resumed
        run reports the same means."""
        names = [k for k in ms[0] if k not in ("nonfinite", "bad", "lr", "grad_norm")]
        sums = meta["sums"]
        for m in ms:
            for k in names:
                sums[k] = sums.get(k, 0.0) + (float(m[k]) if np.isfinite(m[k]) else 0.0)
            sums["steps"] = sums.get("steps", 0) + 1
        meta["lr"] = float(ms[-1]["lr"])
        agg = {k: float(np.mean([m[k] for m in ms])) for k in (*names, "grad_norm")}
        nonfinite, bad = int(sum(m["nonfinite"] for m in ms)), int(sum(m["bad"] for m in ms))
        self.writer.write_scalars(step, {"train/" + k: v for k, v in agg.items()} | {
            "train/lr": meta["lr"], "train/images_per_s": ips})
        eta = (self.total_steps - step) * self.cfg.train.batch_size / ips
        log.info("step %d/%d (epoch %s) %s lr %.2e %.1f img/s ETA %s%s", step, self.total_steps,
                 _epochs(step, self.steps_per_epoch), " ".join(f"{k} {agg[k]:.4f}" for k in names), meta["lr"],
                 ips, _hms(eta), f" ({bad} unreadable examples replaced)" if bad else "")
        if nonfinite:
            msg = (f"{nonfinite} step(s) before step {step} had a non-finite loss or gradient; their updates were "
                   "not applied")
            if not self.cfg.train.skip_nonfinite:
                raise FloatingPointError(msg + ". The last checkpoint is intact; lower optim.lr or set "
                                         "train.skip_nonfinite=True to skip such steps.")
            log.warning(msg)

    def _log_overview(self, state: dict, mults: dict) -> None:
        n_train = lora.count(state["trainable"])
        n_total = n_train + lora.count(state["frozen"])
        if self.is_main:
            log.info("parameters:\n%s", parameter_overview.get_parameter_overview(state["trainable"],
                                                                                    include_stats=False))
            log.info("trainable %s / %s parameters (%.2f%%); lr multiplier groups: %s", f"{n_train:,}",
                     f"{n_total:,}", 100 * n_train / max(n_total, 1), sorted(set(mults.values())))

    def _write_history(self, history: list[dict]) -> None:
        if not self.is_main:
            return
        path = self.workdir / "training_history.csv"
        tmp = path.with_suffix(".tmp")
        fields = list(dict.fromkeys(k for row in history for k in row))
        with tmp.open("w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=fields)
            w.writeheader()
            w.writerows(history)
        tmp.replace(path)


def _epochs(step: int, steps_per_epoch: int) -> float | int:
    e = step / steps_per_epoch
    return int(e) if e == int(e) else round(e, 3)


def _hms(seconds: float) -> str:
    s = int(max(seconds, 0))
    return f"{s // 3600:02d}:{s % 3600 // 60:02d}:{s % 60:02d}"


def run(cfg, workdir: str | Path) -> dict:
    """Train (and test) one run; with cv.folds, one run per fold (`jaxvit.cv`)."""
    if cfg.cv.folds:
        from jaxvit import cv
        return cv.run(cfg, workdir)
    return Trainer(cfg, workdir).run()
