"""The training loop: one jitted, buffer-donating step; evaluation, checkpoints and logs around it.

State is a plain dict pytree: {step, rng, trainable, frozen, opt_state[, ema]}. `trainable` and `frozen`
partition the model variables ({"params": ..., "lora": ...}) by path, so gradients and optimizer state
exist for the trainable leaves only.
"""
from __future__ import annotations

import csv
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
from jax.sharding import NamedSharding, PartitionSpec as P

from jaxvit import checkpoint as ckpt
from jaxvit import evaluate, lora, optim, sharding, xla_options
from jaxvit.data import pipeline
from jaxvit.data.sources import ImageFolder, scan
from jaxvit.models import get_config, load_pretrained
from jaxvit.models.heads import Classifier
from jaxvit.tasks import classification
from jaxvit.writers import create_writer

log = logging.getLogger("jaxvit")


# ------------------------------------------------------------------------------------------- the model

def build_model(cfg, num_classes: int, rng: jax.Array) -> tuple[Classifier, dict]:
    """Classifier and its variables {"params": {"backbone", "head"}[, "lora"]}; pretrained weights loaded."""
    runtime = dict(dtype=cfg.model.dtype, remat=cfg.model.remat, drop_path=cfg.model.drop_path,
                   lora_alpha=cfg.lora.alpha, lora_dropout=cfg.lora.dropout, **cfg.model.overrides.to_dict())
    if cfg.model.pretrained:
        backbone, backbone_params = load_pretrained(cfg.model.pretrained, **runtime)
        vit_cfg = backbone.cfg
    else:
        vit_cfg, backbone_params = get_config(cfg.model.arch, **runtime), None
    model = Classifier(vit_cfg, num_classes, cfg.model.pool, tuple(cfg.model.head_hidden), cfg.model.head_dropout)
    size = cfg.data.image_size
    init_rng, lora_rng = jax.random.split(rng)
    variables = jax.jit(model.init)(init_rng, jnp.zeros((1, size, size, vit_cfg.num_channels)))
    variables = {"params": dict(variables["params"])}
    fresh = ["params/head"]
    if backbone_params is not None:
        variables["params"]["backbone"] = backbone_params
    else:
        fresh.append("params/backbone")
    if cfg.lora.enabled:
        variables["lora"] = {"backbone": lora.init_adapters(variables["params"]["backbone"], cfg.lora.targets,
                                                            cfg.lora.rank, lora_rng)}
        fresh.append("lora (B = 0: starts equal to the base model)")
    log.info("initialised fresh (not in any checkpoint): %s", ", ".join(fresh))
    return model, variables


# ------------------------------------------------------------------------------------------- the step

def make_train_step(model: Classifier, cfg, tx: optax.GradientTransformation, num_classes: int,
                    lr_schedule: Callable) -> Callable:
    t = cfg.train

    def loss_fn(trainable, frozen, images, soft, rng):
        logits = model.apply(optim.combine(trainable, frozen), images, train=True, rngs={"dropout": rng})
        return classification.loss(logits, soft).mean(), logits

    def step(state, batch):
        rng = jax.random.fold_in(jax.random.wrap_key_data(state["rng"]), state["step"])
        mix_rng, drop_rng = jax.random.split(rng)
        soft = classification.targets(batch["label"], num_classes, t.label_smoothing)
        images, soft = classification.mix(batch["image"], soft, mix_rng, t.mixup_alpha, t.cutmix_alpha)
        grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
        if t.grad_accum == 1:
            (loss, logits), grads = grad_fn(state["trainable"], state["frozen"], images, soft, drop_rng)
        else:  # equal micro-batches: the mean of their gradients is the gradient of the full batch
            k = t.grad_accum
            split = lambda x: x.reshape(k, x.shape[0] // k, *x.shape[1:])

            def micro(carry, xs):
                i, (img, sft) = xs
                (l, lg), g = grad_fn(state["trainable"], state["frozen"], img, sft, jax.random.fold_in(drop_rng, i))
                return jax.tree_util.tree_map(jnp.add, carry, g), (l, lg)

            zeros = jax.tree_util.tree_map(jnp.zeros_like, state["trainable"])
            grads, (losses, logits) = jax.lax.scan(micro, zeros, (jnp.arange(k), (split(images), split(soft))))
            grads = jax.tree_util.tree_map(lambda g: g / k, grads)
            loss, logits = losses.mean(), logits.reshape(-1, logits.shape[-1])
        updates, opt_state = tx.update(grads, state["opt_state"], state["trainable"])
        trainable = optax.apply_updates(state["trainable"], updates)
        grad_norm = optax.tree.norm(grads)
        finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
        keep = lambda new, old: jax.tree_util.tree_map(lambda a, b: jnp.where(finite, a, b), new, old)
        new = dict(state, step=state["step"] + 1, trainable=keep(trainable, state["trainable"]),
                   opt_state=keep(opt_state, state["opt_state"]))
        if "ema" in state:
            new["ema"] = keep(optim.ema_update(state["ema"], new["trainable"], t.ema_decay), state["ema"])
        metrics = dict(loss=loss, accuracy=jnp.mean(jnp.argmax(logits, -1) == batch["label"]),
                       grad_norm=grad_norm, nonfinite=1 - finite.astype(jnp.int32),
                       bad_images=jnp.sum(batch["bad"]), lr=lr_schedule(state["step"]))
        return new, metrics

    return step


def eval_variables(state: dict) -> dict:
    """Model variables for evaluation: EMA weights when EMA is on."""
    return optim.combine(state.get("ema", state["trainable"]), state["frozen"])


# ------------------------------------------------------------------------------------------- the loop

class Trainer:
    """Holds what the loop needs; `run` trains, validates, checkpoints and finally tests."""

    def __init__(self, cfg, workdir: str | Path):
        self.cfg, self.workdir = cfg, Path(workdir)
        self.is_main = jax.process_index() == 0
        self.mesh = sharding.make_mesh(cfg.mesh)  # config.mesh: data / fsdp / tensor (jaxvit/sharding.py)
        self.replicated = NamedSharding(self.mesh, P())
        self.batch_sharding = NamedSharding(self.mesh, sharding.batch_spec(self.mesh))
        self._preflight()
        c = cfg
        self.train_src = ImageFolder(c.data.data_dir, "train", c.data.classes or None)
        self.classes = self.train_src.classes
        self.val_src = ImageFolder(c.data.data_dir, "val", self.classes)
        self.steps_per_epoch = pipeline.steps_per_epoch(len(self.train_src), c.train.batch_size)
        self.total_steps = c.train.epochs * self.steps_per_epoch
        if c.train.max_steps:
            self.total_steps = min(self.total_steps, c.train.max_steps)
        self.model, variables = build_model(c, len(self.classes), jax.random.key(c.seed))
        self.depth = self.model.backbone.depth
        self.variables_template = variables
        self.writer = create_writer(self.workdir, self.is_main)
        self.ckpts = ckpt.Checkpoints(self.workdir / "checkpoints", keep=c.checkpoint.keep)

    # -- setup helpers
    def _preflight(self):
        c = self.cfg
        n_proc = jax.process_count()
        # Global batches: split over the mesh's batch shards and processes, or a clear error (sharding.py).
        per_dev, per_proc = sharding.batch_shares(c.train.batch_size, self.mesh, micro=c.train.grad_accum)
        sharding.batch_shares(c.eval.batch_size, self.mesh, "eval.batch_size")
        log.info("mesh %s over %d processes: global batch %d = %d per batch shard, %d per process",
                 dict(self.mesh.shape), n_proc, c.train.batch_size, per_dev, per_proc)
        if c.data.synthetic and self.is_main:
            from jaxvit.data.synthetic_gz2 import write_dataset
            write_dataset(c.data.data_dir, seed=c.seed)
        if n_proc > 1:
            from jax.experimental import multihost_utils
            multihost_utils.sync_global_devices("synthetic data written")
        report = scan(c.data.data_dir, ("train", "val", "test"), decode=True)
        log.info("data in %s:\n%s", c.data.data_dir, report.summary())
        if report.unreadable and not c.data.skip_bad_images:
            raise ValueError(f"{len(report.unreadable)} unreadable images (data.skip_bad_images=False): "
                             + "; ".join(f"{p}: {r}" for p, r in report.unreadable[:20]))

    def _partition(self, variables: dict, stage: int) -> tuple[dict, dict]:
        return optim.split(variables, lambda p: optim.is_trainable(p, self.cfg, stage))

    def _init_state(self, variables: dict, stage: int, start_step: int) -> tuple[dict, Any]:
        trainable, frozen = self._partition(variables, stage)
        tx, schedule, mults = optim.make_optimizer(self.cfg, trainable, self._stage_steps(stage, start_step),
                                                   self.depth)
        # model.frozen_dtype: frozen matrices stored narrower; trainable leaves are always float32.
        cast = lambda tree, dt, ndim: jax.tree_util.tree_map(
            lambda x: x.astype(dt) if jnp.issubdtype(x.dtype, jnp.floating) and x.ndim >= ndim else x, tree)
        trainable, frozen = cast(trainable, jnp.float32, 0), cast(frozen, jnp.dtype(self.cfg.model.frozen_dtype), 2)

        def init(trainable, frozen):
            state = dict(step=jnp.asarray(start_step, jnp.int32),
                         rng=jax.random.key_data(jax.random.key(self.cfg.seed + 1)),
                         trainable=trainable, frozen=frozen, opt_state=tx.init(trainable))
            if self.cfg.train.ema_decay:
                state["ema"] = jax.tree_util.tree_map(jnp.copy, trainable)
            return state

        # Created straight into its shardings (FSDP / tensor parallel from config.mesh).
        self.state_sharding = sharding.state_shardings(jax.eval_shape(init, trainable, frozen), self.mesh,
                                                       self.cfg.mesh.fsdp_min_size)
        parts = (self.state_sharding["trainable"], self.state_sharding["frozen"])
        state = jax.jit(init, in_shardings=parts, out_shardings=self.state_sharding)(
            *jax.device_put((trainable, frozen), parts))
        return state, (tx, schedule, mults)

    def _stage_steps(self, stage: int, start_step: int) -> int:
        t = self.cfg.train
        if stage == 1 and t.stage1_epochs:
            return t.stage1_epochs * self.steps_per_epoch
        return self.total_steps - start_step

    def _compile(self, tx, schedule, num_classes: int):
        step = make_train_step(self.model, self.cfg, tx, num_classes, lambda s: schedule(s - self.stage_start))
        return xla_options.jit(step, in_shardings=(self.state_sharding, self.batch_sharding),
                               out_shardings=(self.state_sharding, self.replicated), donate_argnums=0)

    def _global_batch(self, local: dict) -> dict:
        return {k: jax.make_array_from_process_local_data(self.batch_sharding, v) for k, v in local.items()}

    # -- evaluation
    def evaluate_split(self, state: dict, split: str, out_dir: Path | None = None) -> dict:
        src = self.val_src if split == "val" else ImageFolder(self.cfg.data.data_dir, split, self.classes)
        return evaluate.evaluate_source(self.model, eval_variables(state), src, self.cfg, self.mesh,
                                        out_dir=out_dir if self.is_main else None)

    # -- the loop
    def run(self) -> dict:
        c, t = self.cfg, self.cfg.train
        if self.is_main:
            self.workdir.mkdir(parents=True, exist_ok=True)
            (self.workdir / "config.json").write_text(c.to_json_best_effort(indent=2))
            (self.workdir / "classes.json").write_text(json.dumps(self.classes))
        data = pipeline.train_iterator(self.train_src, c.data, global_batch=t.batch_size, seed=c.seed)
        meta = dict(stage=1 if (t.stage1_epochs or t.stage1_patience) else 2, stage_start=0, best_acc=-1.0,
                    best_f1=-1.0, history=[], since_best=0, epoch_sums=dict(loss=0.0, accuracy=0.0, steps=0),
                    lr=0.0)
        latest = self.ckpts.latest()
        if latest is not None:
            meta = self.ckpts.read_meta(latest)
        self.stage_start = meta["stage_start"]
        state, (tx, schedule, mults) = self._init_state(self.variables_template, meta["stage"], meta["stage_start"])
        if latest is not None:
            state = self.ckpts.restore(latest, state, data)
            log.info("resumed from %s (step %d, stage %d)", latest, int(state["step"]), meta["stage"])
        self._log_overview(state, mults)
        step_fn = self._compile(tx, schedule, len(self.classes))
        step = int(state["step"])
        pending, t_log, n_log = [], time.time(), 0
        t_start, step_start = time.time(), step
        while step < self.total_steps:
            epoch = step // self.steps_per_epoch
            state, m = step_fn(state, self._global_batch(next(data)))
            pending.append(m)
            step += 1
            n_log += 1
            mid_epoch_save = c.checkpoint.every_steps and step % c.checkpoint.every_steps == 0 and (
                step % self.steps_per_epoch)
            if step % t.log_every_steps == 0 or step % self.steps_per_epoch == 0 or mid_epoch_save:
                fetched = jax.device_get(pending)  # the one host sync per log period
                ips = n_log * t.batch_size / (time.time() - t_log)
                self._log_train(fetched, meta, step, epoch, ips, (self.total_steps - step) * t.batch_size / ips)
                pending, t_log, n_log = [], time.time(), 0
            if mid_epoch_save:
                self.ckpts.save_periodic(step, state, data, meta)
            if step % self.steps_per_epoch and step < self.total_steps:
                continue
            # End of an epoch (or of a max_steps run).
            val = self.evaluate_split(state, "val")
            epoch_ips = (step - step_start) * t.batch_size / (time.time() - t_start)
            t_start, step_start = time.time(), step
            sums = meta["epoch_sums"]
            row = dict(epoch=epoch + 1, step=step, stage=meta["stage"], train_loss=sums["loss"] / sums["steps"],
                       train_acc=sums["accuracy"] / sums["steps"], val_loss=val["loss"], val_acc=val["accuracy"],
                       val_f1=val["f1_macro"], lr=meta["lr"], images_per_s=epoch_ips)
            meta["epoch_sums"] = dict(loss=0.0, accuracy=0.0, steps=0)
            meta["history"].append(row)
            self._write_history(meta["history"])
            self.writer.write_scalars(step, {f"epoch/{k}": v for k, v in row.items() if k != "epoch"})
            log.info("epoch %d: val_loss %.4f val_acc %.4f val_f1 %.4f", epoch + 1, val["loss"], val["accuracy"],
                     val["f1_macro"])
            improved = val["accuracy"] > meta["best_acc"]
            meta["since_best"] = 0 if improved else meta["since_best"] + 1
            if improved:
                meta["best_acc"] = val["accuracy"]
                self.ckpts.save_named("best_acc", step, state, data, meta)
            if val["f1_macro"] > meta["best_f1"]:
                meta["best_f1"] = val["f1_macro"]
                self.ckpts.save_named("best_f1", step, state, data, meta)
            if meta["stage"] == 1 and self._stage1_done(meta, epoch + 1):
                state, (tx, schedule, mults), step_fn = self._enter_stage2(state, meta, step)
            if (epoch + 1) % c.checkpoint.every_epochs == 0 or step >= self.total_steps:
                self.ckpts.save_periodic(step, state, data, meta)
        self.ckpts.save_named("final", step, state, data, meta)
        self.ckpts.wait()
        if self.is_main:
            evaluate.write_training_curves(self.workdir)
        data.close()
        return self._final_test(state, meta)

    def _stage1_done(self, meta: dict, epochs_done: int) -> bool:
        t = self.cfg.train
        by_epochs = t.stage1_epochs and epochs_done >= t.stage1_epochs
        by_patience = t.stage1_patience and meta["since_best"] >= t.stage1_patience
        return bool(by_epochs or by_patience)

    def _enter_stage2(self, state: dict, meta: dict, step: int):
        log.info("stage 2 from step %d: unfreezing the backbone", step)
        meta.update(stage=2, stage_start=step)
        self.stage_start = step
        variables = optim.combine(state["trainable"], state["frozen"])
        new_state, opt = self._init_state(variables, 2, step)
        self._log_overview(new_state, opt[2])
        return new_state, opt, self._compile(opt[0], opt[1], len(self.classes))

    def _final_test(self, state: dict, meta: dict) -> dict:
        name = self.cfg.eval.test_checkpoint
        if name != "final":
            state = self.ckpts.restore_named(name)
            state = jax.device_put(state, sharding.state_shardings(state, self.mesh, self.cfg.mesh.fsdp_min_size))
        results = self.evaluate_split(state, "test", self.workdir / "eval_test")
        log.info("test (%s checkpoint): accuracy %.4f, macro F1 %.4f", name, results["accuracy"],
                 results["f1_macro"])
        self.writer.flush()
        return results

    # -- logging
    def _log_train(self, ms: list[dict], meta: dict, step: int, epoch: int, ips: float, eta_s: float):
        """Console + TensorBoard for one log period; epoch sums go into `meta` so a resumed run reports the
        same epoch means."""
        sums = meta["epoch_sums"]
        for m in ms:
            sums["loss"] += float(m["loss"]) if np.isfinite(m["loss"]) else 0.0
            sums["accuracy"] += float(m["accuracy"])
            sums["steps"] += 1
        meta["lr"] = float(ms[-1]["lr"])
        agg = {k: float(np.mean([m[k] for m in ms])) for k in ("loss", "accuracy", "grad_norm")}
        nonfinite, bad = int(sum(m["nonfinite"] for m in ms)), int(sum(m["bad_images"] for m in ms))
        self.writer.write_scalars(step, {"train/" + k: v for k, v in agg.items()} | {
            "train/lr": meta["lr"], "train/images_per_s": ips})
        log.info("epoch %d step %d/%d loss %.4f acc %.3f lr %.2e %.1f img/s ETA %s%s", epoch + 1, step,
                 self.total_steps, agg["loss"], agg["accuracy"], meta["lr"], ips, _hms(eta_s),
                 f" ({bad} unreadable images replaced)" if bad else "")
        if nonfinite:
            msg = (f"{nonfinite} step(s) before step {step} had a non-finite loss or gradient; their updates were "
                   "not applied")
            if not self.cfg.train.skip_nonfinite:
                raise FloatingPointError(msg + ". The last checkpoint is intact; lower optim.lr or set "
                                         "train.skip_nonfinite=True to skip such steps.")
            log.warning(msg)

    def _log_overview(self, state: dict, mults: dict):
        n_train = lora.count(state["trainable"])
        n_total = n_train + lora.count(state["frozen"])
        if self.is_main:
            log.info("parameters:\n%s", parameter_overview.get_parameter_overview(state["trainable"],
                                                                                    include_stats=False))
            groups = sorted(set(mults.values()))
            log.info("trainable %s / %s parameters (%.2f%%); lr multiplier groups: %s", f"{n_train:,}",
                     f"{n_total:,}", 100 * n_train / n_total, groups)

    def _write_history(self, history: list[dict]):
        if not self.is_main:
            return
        path = self.workdir / "training_history.csv"
        tmp = path.with_suffix(".tmp")
        with tmp.open("w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(history[0]))
            w.writeheader()
            w.writerows(history)
        tmp.replace(path)


def _hms(seconds: float) -> str:
    s = int(max(seconds, 0))
    return f"{s // 3600:02d}:{s % 3600 // 60:02d}:{s % 60:02d}"


def run(cfg, workdir: str | Path) -> dict:
    return Trainer(cfg, workdir).run()
