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
from flax import traverse_util
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from jaxvit import config as config_lib
from jaxvit import checkpoint, cluster, debug_nans, evals, lora, optim, sharding, tasks, xla_options
from jaxvit.checkpoint import Checkpoints, LoopState, cast_frozen, eval_variables
from jaxvit.data import changes, pipeline
from jaxvit.errors import NonFiniteError, Preempted
from jaxvit.files import atomic_write, write_csv
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
    trainable = jax.tree_util.tree_map(
        lambda x: x.astype(jnp.float32) if jnp.issubdtype(x.dtype, jnp.floating) else x, trainable)
    frozen = cast_frozen(frozen, cfg.model.frozen_dtype)

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
        sq_norms = jax.tree_util.tree_map(lambda g: jnp.sum(jnp.square(g)), grads)  # per leaf: which are not finite
        grad_norm = jnp.sqrt(optax.tree.sum(sq_norms))
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
                   bad=jnp.sum(batch["bad"]) if "bad" in batch else jnp.int32(0), lr=lr_schedule(state["step"]),
                   grad_finite=jnp.stack([jnp.isfinite(x) for x in jax.tree_util.tree_leaves(sq_norms)]))
        return new, out

    return step


# ------------------------------------------------------------------------------------------- the loop

class Trainer:
    """Holds what the loop needs; `run` trains, evaluates, checkpoints and finally tests."""

    def __init__(self, cfg, workdir: str | Path):
        config_lib.validate(cfg)
        self.cfg, self.workdir = cfg, Path(workdir).absolute()
        self.is_main = jax.process_index() == 0
        self.lock = cluster.lock_workdir(self.workdir, cfg.train.lock_stale_s)
        self.stop_signals = cluster.StopSignals(cfg.train.preempt_signals, cfg.train.preempt_check_every)
        self.nonfinite_run = 0  # non-finite steps in a row
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
        self.evals = evals.declared(cfg)  # name -> Evaluator (jaxvit.evals): run at the evaluation points
        self.best_metric = cfg.checkpoint.best_metric or self.task.best_metric
        # every metric with a best checkpoint -> its sign (LoopState.bests)
        self.bests = {self.best_metric: self._sign(self.best_metric, cfg.checkpoint.best_mode)} | {
            tag: self._sign(tag, mode) for tag, _, mode in (t.partition(":") for t in cfg.checkpoint.also_best)}
        self.writer = create_writer(self.workdir, self.is_main)
        self.keep_period = cfg.checkpoint.keep_every_epochs * self.steps_per_epoch
        self.ckpts = Checkpoints(self.workdir / "checkpoints", keep=cfg.checkpoint.keep, keep_period=self.keep_period)
        self.frozen = self._frozen_fingerprint()

    def _sign(self, tag: str, mode: str = "") -> float:
        """1 when a higher value of "<evaluator>/<metric>" is better, else -1: `mode`, else the evaluator's."""
        e = self.evals.get(tag.split("/", 1)[0])
        mode = mode or (self.task.best_mode if e is None or e.kind == "task" else e.mode)
        return 1.0 if mode == "max" else -1.0

    def _frozen_fingerprint(self) -> dict:
        """The fingerprint of the weights no phase trains (not stored in checkpoints unless store_frozen)."""
        c = self.cfg
        rules = [optim.trainable_rule(p.trainable, c, self.task.head, self.task.frozen) for p in self.phases]
        params = {k: v for k, v in self.variables.items() if k in PARAM_COLLECTIONS}
        names = [optim.path_str(k) for k in traverse_util.flatten_dict(params)
                 if not any(rule(optim.path_str(k)) for rule in rules)]
        return checkpoint.fingerprint(self.variables, names, checkpoint.frozen_source(c), c.checkpoint.store_frozen)

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

    def _phase_over(self, loop: LoopState, step: int) -> bool:
        phase, last = self.phases[loop.phase], loop.phase == len(self.phases) - 1
        by_length = (not last or self.cfg.train.stage2_epochs) and phase.length(self.steps_per_epoch) and (
            step - loop.phase_start >= phase.length(self.steps_per_epoch))
        patience_over = phase.patience and loop.since_best >= phase.patience and step >= self.cfg.train.min_steps
        return bool(by_length or patience_over)

    # -- evaluation
    def _due(self, step: int) -> list[evals.Evaluator]:
        """The evaluators due at `step` (each on its schedule; all at step 0 and at the last step)."""
        return [e for e in self.evals.values() if step == 0 or e.due(step, self.eval_every, self.total_steps)]

    def evaluate(self, state: dict, due: list[evals.Evaluator]) -> dict[str, dict]:
        """{evaluator name: its results} of the evaluators due."""
        variables = eval_variables(state)
        return {e.name: e.run(self.task, self.model, variables, self.mesh, self.workdir if self.is_main else None)
                for e in due}

    def dry_run(self) -> dict:
        """One compiled and executed training step and one evaluation batch (construction already checked the
        config, the data and the model with its weights); nothing is saved."""
        c = self.cfg
        data = pipeline.train_iterator(self.train_src, self.task.train_transform(), c.data,
                                       global_batch=c.train.batch_size, seed=c.seed,
                                       batch_transform=self.task.batch_transform())
        try:
            state, step_fn, _ = self._phase_setup(0, self.variables, 0)
            state, metrics = step_fn(state, self._global_batch(next(data)))
            loss = float(jax.device_get(metrics["loss"]))
            split = c.eval.val_split or c.eval.test_split
            if split:  # the task's evaluation outputs (what every evaluator scores) on one batch
                src = pipeline.FirstN(self.task.source(split), c.eval.batch_size)
                self.task.outputs(self.model, eval_variables(state), src, self.mesh)
        finally:
            data.close()
            self.stop_signals.restore()
            if self.lock:
                self.lock.release()
        log.info("dry run passed: one training step (loss %.4f) and one %s batch", loss, split or "(no eval split)")
        return {"dry_run_loss": loss}

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
        setup = {}

        def template(loop: LoopState) -> dict:  # the state of the checkpoint's phase, to restore into
            setup["phase"] = self._phase_setup(loop.phase, self.variables, loop.phase_start)
            return setup["phase"][0]
        resumed = self.ckpts.restore_latest(template, data, self.frozen)
        state, loop = resumed or (template(LoopState()), LoopState())
        _, step_fn, mults = setup["phase"]
        splits = {c.data.train_split: self.train_src,
                  **{s: self.task.source(s) for s in (c.eval.val_split, c.eval.test_split) if s}}
        resumed_step = int(state["step"]) if resumed else None
        if changes.check(self.workdir, changes.describe(splits, c.data.data_dir), resumed_step, c.data.allow_changed,
                         self.is_main):
            log.warning("data.allow_changed=True: resuming on changed data, the data order restarts at step %d",
                        resumed_step)
            data.set_state({"step": resumed_step})  # the same on every process, whether or not this one saw it
        if resumed:
            step = int(state["step"])
            log.info("resumed from step %d (phase %s)", step, self.phases[loop.phase].name)
            last = loop.phase == len(self.phases) - 1
            if step < self.total_steps and not (last and self._phase_over(loop, step)):
                loop.final_step = None  # a finished run given more steps (not one that stopped early)
            if loop.final_step is None and self._phase_over(loop, step) and not last:
                state, step_fn = self._next_phase(state, loop, step)  # saved just before its phase switch
        self._log_overview(state, mults)
        if c.eval.at_start and not resumed and self.evals:
            self._eval_point(state, loop, 0, 0.0, self._due(0))  # the curves' start (k-NN of the initial teacher)
            if 0 in loop.kept_steps():  # a best (of any metric) at the start
                self.save(0, state, data, loop)
        try:
            if loop.final_step is None:
                state = self._loop(state, step_fn, data, loop)
        finally:  # a run that stops on an error or a signal still completes the checkpoints it started
            try:
                self.ckpts.wait()
            finally:
                data.close()
                self.stop_signals.restore()
                if self.lock:
                    self.lock.release()
        if self.is_main and loop.history:
            plot_training_curves(self.workdir / "training_history.csv", self.workdir / "training_curves.png",
                                 self.task.history_aliases.values())
        return self._final_test(state)

    def save(self, step: int, state: dict, data: Any, loop: LoopState) -> None:
        """A resume point: the train state (without weights frozen for the whole run), data position, loop state."""
        self.ckpts.save(step, state, data, loop, self.frozen)

    def _loop(self, state: dict, step_fn: Callable, data: Any, loop: LoopState) -> dict:
        """Steps until the end (or an early stop): logs, evaluations, resume points, phase switches."""
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
            due = self._due(step)
            at_eval = step % self.eval_every == 0 or step == self.total_steps or bool(due)
            preempt = self.stop_signals.requested(step)  # every process gets the same answer
            save_now = (c.checkpoint.every_steps and step % c.checkpoint.every_steps == 0 or preempt
                        or self.keep_period and step % self.keep_period == 0)
            if step % t.log_every_steps == 0 or at_eval or save_now:
                ips = n_log * t.batch_size / (time.time() - t_log)
                # the one host sync per log period
                self._log_train(jax.device_get(pending), loop, step, ips, state["trainable"])
                pending, t_log, n_log = [], time.time(), 0
            if at_eval:
                self._eval_point(state, loop, step, (step - step_eval) * t.batch_size / (time.time() - t_eval), due)
                t_eval, step_eval = time.time(), step
            stop = self._phase_over(loop, step) and loop.phase == len(self.phases) - 1
            if stop and loop.since_best >= self.phases[-1].patience > 0:
                log.info("stopping early at step %d: %s has not improved for %d evaluations", step,
                         self.best_metric, loop.since_best)
            elif stop:
                log.info("the last phase's %d epochs are done at step %d", self.phases[-1].epochs, step)
            if stop or step == self.total_steps:
                loop.final_step = step
            if at_eval or save_now or loop.final_step:  # before a phase switch: the state just evaluated
                self.save(step, state, data, loop)
            if loop.final_step:
                break
            if preempt:
                raise Preempted(f"{self.stop_signals.received or 'a signal to another process'}: stopped after step "
                                f"{step} with a resume point; run the same command again to continue")
            if self._phase_over(loop, step):
                state, step_fn = self._next_phase(state, loop, step)
        return state

    def _eval_point(self, state: dict, loop: LoopState, step: int, ips: float, due: list[evals.Evaluator]) -> None:
        """The evaluators due, a history row (their metrics as <name>_<metric>), the best step."""
        results = self.evaluate(state, due)
        scalars = {f"{name}/{k}": r[k] for name, r in results.items()
                   for k in self.evals[name].metrics(type(self.task)) if r.get(k) is not None}
        sums = loop.sums
        n = max(sums.pop("steps", 0), 1)
        train = {f"train/{k}": v / n for k, v in sums.items()}
        row = dict(epoch=_epochs(step, self.steps_per_epoch), step=step, phase=self.phases[loop.phase].name,
                   **self._columns(train), **self._columns(scalars), lr=loop.lr, images_per_s=ips)
        loop.sums = {}
        loop.history.append(row)
        self._write_history(loop.history)
        # TensorBoard: eval/<column>; evaluators: <name>/<metric>
        columns = ("epoch", *(t.replace("/", "_", 1) for t in train), "lr", "images_per_s")
        self.writer.write_scalars(step, {f"eval/{k}": row[k] for k in columns} | scalars)
        log.info("step %d (epoch %s): %s", step, row["epoch"], ", ".join(f"{k} {v:.4f}" for k, v in scalars.items()))
        if self.best_metric not in loop.bests and loop.best is not None:  # a loop state written before `bests`
            loop.bests[self.best_metric] = [loop.best, loop.best_step]
        for tag, sign in self.bests.items():
            if (value := scalars.get(tag)) is not None and (
                    tag not in loop.bests or sign * (value - loop.bests[tag][0]) > 0):
                loop.bests[tag] = [float(value), step]
        if self.best_metric in scalars:  # `best` and patience follow checkpoint.best_metric
            loop.best, loop.best_step = loop.bests[self.best_metric]
            loop.since_best = 0 if loop.best_step == step else loop.since_best + 1

    def _columns(self, scalars: dict[str, float]) -> dict[str, float]:
        """History columns of {"<evaluator or train>/<metric>": value}: <evaluator>_<metric>, each followed by
        <evaluator>_<alias> where the task names an alias of the metric (`Task.history_aliases`; train metrics and
        the task's own evaluators)."""
        out = {}
        for tag, v in scalars.items():
            name, metric = tag.split("/", 1)
            out[f"{name}_{metric}"] = v
            alias = self.task.history_aliases.get(metric)
            if alias and (name == "train" or self.evals[name].kind == "task"):
                out[f"{name}_{alias}"] = v
        return out

    def _next_phase(self, state: dict, loop: LoopState, step: int):
        index = loop.phase + 1
        log.info("phase %r from step %d", self.phases[index].name, step)
        loop.phase, loop.phase_start, loop.since_best = index, step, 0
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
            source = checkpoint.Source(lambda: self.variables, checkpoint.frozen_source(c), c.model.frozen_dtype)
            variables = checkpoint.read(self.workdir, name, source).variables()
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

    def _log_train(self, ms: list[dict], loop: LoopState, step: int, ips: float, trainable: dict) -> None:
        """Console + TensorBoard for one log period; sums since the last evaluation go into the loop state, so a
        resumed run reports the same means."""
        names = [k for k in ms[0] if k not in ("nonfinite", "bad", "lr", "grad_norm", "grad_finite")]
        sums = loop.sums
        for m in ms:
            for k in names:
                sums[k] = sums.get(k, 0.0) + (float(m[k]) if np.isfinite(m[k]) else 0.0)
            sums["steps"] = sums.get("steps", 0) + 1
        loop.lr = float(ms[-1]["lr"])
        agg = {k: float(np.mean([m[k] for m in ms])) for k in (*names, "grad_norm")}
        nonfinite, bad = int(sum(m["nonfinite"] for m in ms)), int(sum(m["bad"] for m in ms))
        self.writer.write_scalars(step, {"train/" + k: v for k, v in agg.items()} | {
            "train/lr": loop.lr, "train/images_per_s": ips})
        eta = (self.total_steps - step) * self.cfg.train.batch_size / ips
        log.info("step %d/%d (epoch %s) %s lr %.2e %.1f img/s ETA %s%s", step, self.total_steps,
                 _epochs(step, self.steps_per_epoch), " ".join(f"{k} {agg[k]:.4f}" for k in names), loop.lr,
                 ips, _hms(eta), f" ({bad} unreadable examples replaced)" if bad else "")
        if nonfinite:
            self._check_nonfinite(ms, step, trainable)
        else:
            self.nonfinite_run = 0

    def _check_nonfinite(self, ms: list[dict], step: int, trainable: dict) -> None:
        """Warn about skipped non-finite steps; stop at the first (train.skip_nonfinite=False) or after
        train.max_nonfinite_steps in a row, in one line naming the step, the loss and the first bad paths."""
        t = self.cfg.train
        limit = t.max_nonfinite_steps if t.skip_nonfinite else 1
        for i, m in enumerate(ms):
            self.nonfinite_run = self.nonfinite_run + 1 if m["nonfinite"] else 0
            if self.nonfinite_run >= limit:
                at = step - len(ms) + i + 1
                leaves = jax.tree_util.tree_leaves_with_path(trainable)
                grads = [jax.tree_util.keystr(p) for (p, _), ok in zip(leaves, m["grad_finite"]) if not ok]
                params = [jax.tree_util.keystr(p) for p, x in leaves if not bool(jnp.isfinite(x).all())]
                raise NonFiniteError(
                    f"{self.nonfinite_run} non-finite step(s) in a row up to step {at} (loss {float(m['loss'])}); "
                    f"non-finite gradients: {', '.join(grads[:3]) or 'none'}{' ...' if len(grads) > 3 else ''}; "
                    f"non-finite parameters: {', '.join(params[:3]) or 'none'}; the resume points saved before are "
                    "intact: lower optim.lr" + ("" if t.skip_nonfinite else
                                                " or set train.skip_nonfinite=True to skip such steps"))
        log.warning("%d step(s) before step %d had a non-finite loss or gradient; their updates were not applied",
                    sum(int(m["nonfinite"]) for m in ms), step)

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
        fields = list(dict.fromkeys(k for row in history for k in row))
        atomic_write(path, lambda tmp: write_csv(tmp, fields, history))


def _epochs(step: int, steps_per_epoch: int) -> float | int:
    e = step / steps_per_epoch
    return int(e) if e == int(e) else round(e, 3)


def _hms(seconds: float) -> str:
    s = int(max(seconds, 0))
    return f"{s // 3600:02d}:{s % 3600 // 60:02d}:{s % 60:02d}"


def run(cfg, workdir: str | Path, dry_run: bool = False) -> dict:
    """Train (and test) one run (cross-validation, cv.folds, is `jaxvit.cv.run`); `dry_run`: see Trainer.dry_run."""
    if dry_run:
        cfg = tasks.task_class(cfg.task).dry_run_config(cfg)
        if cfg.cv.folds:  # cross-validation: the first fold stands for all
            cfg = cfg.copy_and_resolve_references()
            cfg.cv.fold, cfg.cv.folds = int(cfg.cv.folds[0]), ()
        return Trainer(cfg, workdir).dry_run()
    return Trainer(cfg, workdir).run()
