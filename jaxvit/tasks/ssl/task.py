"""Continued DINO self-supervised pretraining (DINO + iBOT + KoLeo [+ Gram]) as a task of the training loop.

The student is the trainable model; the teacher (`mutable["teacher"]`, a copy of the student at the start) is its
EMA with the momentum schedule, updated after each optimizer step (`after_update`). One step, as DINOv3's
`SSLMetaArch.forward_backward`:
  teacher(global crops) -> DINO head on [CLS], iBOT head on the patches the student sees masked -> Sinkhorn-Knopp
  (or centred softmax) at the teacher temperature;
  student(global crops with masks, local crops) -> DINO head on every [CLS], iBOT head on the masked patches;
  loss = w_dino (global-pair and local-pair terms weighted by their pair counts) + w_koleo * 2 * KoLeo
         + w_ibot * iBOT [+ w_gram * Gram].
Differences from the official code (docs/jump-ssl.md): batch statistics (Sinkhorn, KoLeo neighbours, Gram) are over the
global batch of a step (or of a micro-batch with train.grad_accum > 1), not over one GPU's batch.
Evaluation is a k-NN classifier on the teacher's [CLS] features (`ssl.knn`; `jaxvit.evals.knn`), plus attention
maps of the teacher (an `attention` evaluator, `jaxvit.evals`).
"""
from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Any, Callable

import jax
import jax.numpy as jnp
import ml_collections as mlc
import numpy as np

from jaxvit import metrics, optim, report
from jaxvit.data import labelled
from jaxvit.errors import ConfigError
from jaxvit.models import get_config, load_pretrained
from jaxvit.models.resize import resize_patch_kernel
from jaxvit.tasks.base import Task, check_files
from jaxvit.tasks.ssl import export, losses
from jaxvit.tasks.ssl.crops import MultiCrop, MultiCropConfig
from jaxvit.tasks.ssl.data import EvalExample, MaskBatch, RGBViews, TrainExample, grid
from jaxvit.tasks.ssl.model import HeadConfig, SSLModel

log = logging.getLogger("jaxvit")


def _head_config(section: mlc.ConfigDict) -> mlc.ConfigDict:
    h = mlc.ConfigDict()
    h.loss_weight = 1.0
    h.n_prototypes = 65536
    h.hidden_dim = 2048
    h.bottleneck_dim = 256
    h.nlayers = 3
    section.update(h)
    return section


class SSL(Task):
    name = "ssl"
    best_metric = "val/knn_accuracy"
    best_mode = "max"
    history_metrics = ("knn_accuracy", "knn_f1_macro")
    # the final teacher, as the official training copies it (on unlabelled data the k-NN "best" is meaningless)
    default_export_checkpoint = "final"
    head = r"^params/(dino|ibot)_head/"
    class_labels = True

    @staticmethod
    def default_config() -> mlc.ConfigDict:
        from jaxvit.data.jump import CONFIG_DEFAULTS
        c = mlc.ConfigDict()
        c.jump = mlc.ConfigDict(CONFIG_DEFAULTS)  # data.source="jump": the load-data table (jaxvit.data.jump)
        c.epoch_length = 1250  # steps per epoch of the schedules (official OFFICIAL_EPOCH_LENGTH); 0 = one data pass
        c.patch_size = 0  # > 0: the student's patch size; a pretrained patch embedding is resized to it (16 -> 8)
        c.head_weight_norm = False  # prototypes weight-normalised (DINOv2) or plain (DINOv3)
        c.head_use_bn = False  # BatchNorm (batch statistics) after the heads' hidden layers (official use_bn, off)
        c.centering = "sinkhorn_knopp"  # sinkhorn_knopp | softmax (centre with momentum ssl.center_momentum)
        c.center_momentum = 0.9
        c.student_temp = 0.1
        c.freeze_last_layer_epochs = 1  # the prototypes' lr is 0 for this many epochs
        c.dino = _head_config(mlc.ConfigDict(dict(koleo_weight=0.1, global_ignore_diagonal=True)))
        c.ibot = _head_config(mlc.ConfigDict(dict(separate_head=True, mask_probability=0.5, mask_ratio=(0.1, 0.5),
                                                  mask_style="dinov3")))  # mask_style dinov3 (exact counts) | dinov2
        c.teacher = mlc.ConfigDict(dict(momentum=0.992, final_momentum=1.0, temp=0.07, warmup_temp=0.04,
                                        warmup_temp_epochs=30))
        # teacher: ema | weights
        c.gram = mlc.ConfigDict(dict(weight=0.0, teacher="ema", img_level=True, remove_neg=False))
        k = MultiCropConfig()
        c.crops = mlc.ConfigDict(dict(
            global_size=k.global_size, local_size=k.local_size, n_local=k.n_local, global_scale=k.global_scale,
            local_scale=k.local_scale, hflip=k.hflip, color_jitter=k.color_jitter,
            color_jitter_prob=k.color_jitter_prob, grayscale_prob=k.grayscale_prob,
            # global 1, global 2, locals: what the official code does (papers: 1.0, 0.1, 0.5)
            blur_probs=(0.0, 0.9, 0.5),
            blur_sigma=k.blur_sigma, solarize_prob=k.solarize_prob_global2))
        c.knn = mlc.ConfigDict(dict(k=20, temperature=0.07, train_split="train", max_train=20000))
        c.attention_images = 4  # teacher attention maps of this many val images at each evaluation (0 = none)
        return c

    @classmethod
    def default_evals(cls, cfg) -> dict[str, dict]:
        """The k-NN monitor (the task's metrics, "val") and ssl.attention_images teacher attention maps."""
        n = cfg.ssl.attention_images
        return super().default_evals(cfg) | ({"attention": dict(type="attention", images=n)}
                                             if n and cfg.eval.val_split else {})

    def __init__(self, cfg, workdir: str | Path | None = None):
        super().__init__(cfg, workdir)
        self.s = cfg.ssl
        self._classes = list(cfg.data.classes) or None
        self._sources: dict[str, Any] = {}

    # -- data
    @property
    def jump(self) -> bool:
        return self.cfg.data.source == "jump"

    def source(self, split: str):
        if split not in self._sources:
            if self.jump:
                from jaxvit.data import jump
                keys = mlc.ConfigDict({"data_dir": self.cfg.data.data_dir, "val_fraction": self.cfg.data.val_fraction,
                                       "cache_dir": self.cfg.data.cache_dir, **self.s.jump.to_dict()})
                self._sources[split] = jump.open_split(keys, split, self._classes)
            else:
                self._sources[split] = labelled.open_split(self.cfg.data, split, self._classes)
            if self._classes is None:
                self._classes = list(self._sources[split].classes)
        return self._sources[split]

    def _views(self, split: str) -> RGBViews:
        return RGBViews(self.source(split))

    def crop_config(self) -> MultiCropConfig:
        c = self.s.crops
        return MultiCropConfig(
            global_size=c.global_size, local_size=c.local_size, n_local=c.n_local,
            global_scale=tuple(c.global_scale), local_scale=tuple(c.local_scale), hflip=c.hflip,
            color_jitter=tuple(c.color_jitter), color_jitter_prob=c.color_jitter_prob,
            grayscale_prob=c.grayscale_prob, blur_probs=tuple(c.blur_probs), blur_sigma=tuple(c.blur_sigma),
            solarize_prob_global2=c.solarize_prob, mean=tuple(self.cfg.data.mean), std=tuple(self.cfg.data.std))

    def train_transform(self) -> TrainExample:
        return TrainExample(self._views(self.cfg.data.train_split), MultiCrop(self.crop_config()))

    def split_transform(self, split: str) -> EvalExample:
        return self.eval_transform(split)

    def eval_transform(self, split: str | None = None) -> EvalExample:
        d = self.cfg.data
        return EvalExample(self._views(split or self.cfg.data.train_split), d.image_size, d.crop_ratio,
                           tuple(d.mean), tuple(d.std))

    def mask_batch(self) -> MaskBatch:
        i = self.s.ibot
        return MaskBatch(grid(self.s.crops.global_size, self.patch_size), i.mask_probability,
                         tuple(i.mask_ratio), i.mask_style)

    def batch_transform(self) -> MaskBatch:
        return self.mask_batch()

    def preflight(self, splits: tuple[str, ...], manifest: Path | None) -> None:
        for split in splits:
            src = self.source(split)
            if self.jump and src.intensity == "plate":  # computed once here, so that the workers receive them
                for plate in sorted(set(src.plates)):
                    src.plate_stats(plate)
            counts = ", ".join(f"{c} {int(n)}" for c, n in zip(src.classes, src.class_counts()))
            log.info("%s: %d images (%s) from %s", split, len(src), counts, src.location)
        val, bank = self.cfg.eval.val_split, self.s.knn.train_split
        if val and len(self.source(val).classes) < 2:
            log.warning("the k-NN monitor has one class (%s) in %s: its accuracy means nothing; set data.classes "
                        "or ssl.jump.label_column to labelled data", self.source(val).classes[0], val)
        if val and val != bank and set(self.source(val).paths) & set(self.source(bank).paths):
            log.warning("the k-NN bank (ssl.knn.train_split=%r) and eval.val_split=%r share images (no split "
                        "column in the table?): every shared image finds itself, so the k-NN accuracy is inflated",
                        bank, val)
        paths = [p for s in splits if getattr(self.source(s), "files", False) and not self.jump
                 for p in self.source(s).paths]
        if paths:
            from jaxvit.data.sources import load_image
            check_files(self.cfg, paths, load_image, manifest)

    def steps_per_epoch(self, n_examples: int, batch_size: int) -> int:
        return self.s.epoch_length or n_examples // batch_size

    def lr_gates(self, steps_per_epoch: int) -> tuple[tuple[str, int], ...]:
        return ((r"^params/(dino|ibot)_head/(kernel|weight_g)$", self.s.freeze_last_layer_epochs * steps_per_epoch),)

    # -- model
    @property
    def patch_size(self) -> int:
        """The student's patch size, fixed by `build` (checkpoint or preset, overrides, ssl.patch_size)."""
        return self._vit.patch_size

    def _heads(self) -> tuple[HeadConfig, HeadConfig]:
        make = lambda h: HeadConfig(h.n_prototypes, h.hidden_dim, h.bottleneck_dim, h.nlayers, self.s.head_weight_norm,
                                    self.s.head_use_bn)
        return make(self.s.dino), make(self.s.ibot)

    def build(self, rng: jax.Array) -> tuple[SSLModel, dict]:
        cfg, s = self.cfg, self.s
        runtime = dict(dtype=cfg.model.dtype, remat=cfg.model.remat, drop_path=cfg.model.drop_path,
                       **cfg.model.overrides.to_dict())
        backbone = None
        if cfg.model.pretrained:
            module, backbone = load_pretrained(cfg.model.pretrained, **runtime)
            vit = module.cfg
            log.info("student and teacher backbones from %s", cfg.model.pretrained)
        else:
            vit = get_config(cfg.model.arch, **runtime)
            log.info("student backbone %s initialised at random", cfg.model.arch)
        if s.patch_size and s.patch_size != vit.patch_size:
            log.info("patch size %d -> %d%s", vit.patch_size, s.patch_size,
                     " (patch embedding resized: jaxvit.models.resize.resize_patch_kernel)" if backbone else "")
            if backbone is not None:
                emb = backbone["embeddings"]["patch_embeddings"]
                emb["kernel"] = resize_patch_kernel(np.asarray(emb["kernel"]), s.patch_size)
            vit = dataclasses.replace(vit, patch_size=s.patch_size)
        self._vit = vit
        dino, ibot = self._heads()
        model = SSLModel(vit, dino, ibot, s.ibot.separate_head)
        size = s.crops.global_size
        if size % vit.patch_size or s.crops.local_size % vit.patch_size:
            raise ConfigError(f"ssl.crops.global_size={size} and local_size={s.crops.local_size} must be multiples "
                              f"of the patch size {vit.patch_size}")
        init = jax.jit(lambda r: model.init(r, jnp.zeros((1, size, size, vit.num_channels)), method="init_all"))
        params = dict(init(rng)["params"])
        if backbone is not None:
            params["backbone"] = backbone
        fresh = ["dino_head", "ibot_head" if s.ibot.separate_head else "", "" if backbone else "backbone"]
        log.info("initialised fresh: %s; the teacher starts as a copy of the student", ", ".join(f for f in fresh if f))
        variables = {"params": params, "teacher": jax.tree_util.tree_map(jnp.copy, params)}
        if s.centering == "softmax":
            variables["centers"] = {"dino": jnp.zeros((dino.n_prototypes,)), "ibot": jnp.zeros((ibot.n_prototypes,))}
        elif s.centering != "sinkhorn_knopp":
            raise ConfigError(f"ssl.centering={s.centering!r}: use 'sinkhorn_knopp' or 'softmax'")
        if s.gram.weight and s.gram.teacher != "ema":
            module, gram = load_pretrained(s.gram.teacher, **runtime)
            if module.cfg.hidden_size != vit.hidden_size or module.cfg.patch_size != vit.patch_size:
                raise ConfigError(f"ssl.gram.teacher={s.gram.teacher!r}: its width/patch size "
                                  f"{module.cfg.hidden_size}/{module.cfg.patch_size} differ from the student's "
                                  f"{vit.hidden_size}/{vit.patch_size}")
            variables["gram_teacher"] = {"backbone": gram}
            log.info("Gram anchoring against the frozen backbone %s", s.gram.teacher)
        return model, variables

    def depth(self, model: SSLModel) -> int:
        return model.backbone.depth

    # -- schedules (of the step, inside the jitted step)
    def teacher_temp(self, step: jax.Array) -> jax.Array:
        t = self.s.teacher
        warmup = t.warmup_temp_epochs * self.epoch_steps
        return optim.cosine(t.temp, t.temp, warmup, warmup, t.warmup_temp)(step)

    def momentum(self, step: jax.Array) -> jax.Array:
        t = self.s.teacher
        return optim.cosine(t.momentum, t.final_momentum, self.total_steps)(step)

    # -- loss
    def loss(self, model: SSLModel, variables: dict, batch: dict, rng: jax.Array, step=None):
        s = self.s
        g, loc, masks = batch["global"], batch["local"], batch["masks"]  # [b, 2, G, G, C], [b, n, L, L, C], [b, 2, P]
        b, n_local = g.shape[0], loc.shape[1]
        globals_, locals_ = g.reshape(2 * b, *g.shape[2:]), loc.reshape(n_local * b, *loc.shape[2:])
        flat_masks = masks.reshape(2 * b, -1)
        n_proc = jax.process_count()  # masks are stratified per process: bound the masked tokens of the batch
        upper = min(n_proc * self.mask_batch().max_masked(self.cfg.train.batch_size // n_proc),
                    2 * b * int(flat_masks.shape[1] * self.s.ibot.mask_ratio[1]))
        (idx,) = jnp.nonzero(flat_masks.reshape(-1), size=upper, fill_value=0)
        valid = jnp.arange(upper) < flat_masks.sum()
        temp = self.teacher_temp(step)
        params = {"params": variables["params"]}
        teacher = {"params": jax.lax.stop_gradient(variables["teacher"])}

        # teacher: unmasked global crops
        t_out = model.apply(teacher, globals_)
        t_patches = t_out["patch_tokens"]
        t_cls = model.apply(teacher, t_out["pooler_output"], head="dino")  # [2b, K]
        t_ibot = model.apply(teacher, t_patches.reshape(-1, t_patches.shape[-1])[idx], head="ibot")  # [M, K]
        updates = {}
        if s.centering == "sinkhorn_knopp":
            t_cls_p = losses.sinkhorn_knopp(t_cls, temp)
            t_ibot_p = losses.sinkhorn_knopp(t_ibot, temp, valid=valid)
        else:
            c = variables["centers"]
            t_cls_p = losses.softmax_center(t_cls, c["dino"], temp)
            t_ibot_p = losses.softmax_center(t_ibot, c["ibot"], temp)
            updates["centers"] = {"dino": losses.update_center(c["dino"], t_cls, s.center_momentum),
                                  "ibot": losses.update_center(c["ibot"], t_ibot, s.center_momentum, valid=valid)}
        crop_major = lambda x: x.reshape(b, -1, x.shape[-1]).swapaxes(0, 1)  # [b * crops, K] -> [crops, b, K]
        t_cls_p = jax.lax.stop_gradient(crop_major(t_cls_p))
        t_ibot_p = jax.lax.stop_gradient(t_ibot_p)

        # student: masked global crops and local crops
        rng_g, rng_l = jax.random.split(rng)
        s_g = model.apply(params, globals_, train=True, mask=flat_masks, rngs={"dropout": rng_g})
        s_l = model.apply(params, locals_, train=True, rngs={"dropout": rng_l})
        s_cls = model.apply(params, jnp.concatenate([s_g["pooler_output"], s_l["pooler_output"]]), head="dino")
        s_global, s_local = crop_major(s_cls[:2 * b]), s_cls[2 * b:].reshape(b, n_local, -1).swapaxes(0, 1)
        s_patches = s_g["patch_tokens"]
        s_ibot = model.apply(params, s_patches.reshape(-1, s_patches.shape[-1])[idx], head="ibot")

        # losses, weighted as DINOv3's compute_losses
        global_terms = 2 if s.dino.global_ignore_diagonal else 4
        local_terms = 2 * n_local
        dino_global = losses.dino_loss(s_global, t_cls_p, s.student_temp, s.dino.global_ignore_diagonal)
        dino_local = losses.dino_loss(s_local, t_cls_p, s.student_temp) if n_local else jnp.float32(0)
        cls_pre = s_g["pooler_output"].reshape(b, 2, -1)
        koleo = (losses.koleo_loss(cls_pre[:, 0]) + losses.koleo_loss(cls_pre[:, 1])) / 2
        ibot = losses.ibot_loss(s_ibot, t_ibot_p, flat_masks, s.student_temp)
        total = (s.dino.loss_weight * (global_terms * dino_global + local_terms * dino_local)
                 / (global_terms + local_terms)
                 + s.dino.koleo_weight * 2 * koleo + s.ibot.loss_weight * ibot)
        parts = dict(dino_global=dino_global, dino_local=dino_local, koleo=koleo, ibot=ibot, teacher_temp=temp)
        if s.gram.weight:
            gram_t = t_patches if s.gram.teacher == "ema" else model.apply(
                {"params": jax.lax.stop_gradient(variables["gram_teacher"])}, globals_)["patch_tokens"]
            gram = losses.gram_loss(s_patches, jax.lax.stop_gradient(gram_t), s.gram.img_level, s.gram.remove_neg)
            total = total + s.gram.weight * gram
            parts["gram"] = gram
        per_example = lambda x: jnp.broadcast_to(x.astype(jnp.float32), (b,))
        return per_example(total), {k: per_example(v) for k, v in parts.items()}, updates

    def after_update(self, params: dict, mutable: dict, step: jax.Array) -> dict:
        m = self.momentum(step)
        teacher = jax.tree_util.tree_map(lambda t, p: m * t + (1 - m) * p.astype(t.dtype), mutable["teacher"],
                                         params["params"])
        return {**mutable, "teacher": teacher}

    # -- the teacher is the model the tools read and export
    def backbone_variables(self, variables: dict) -> dict:
        return {"params": variables["teacher"]["backbone"]} if "teacher" in variables else super().backbone_variables(
            variables)

    def export(self, run, out: Path) -> Path:
        return export.export_ssl(run, out)

    def check_export(self, run, out: Path, images: np.ndarray) -> dict[str, float]:
        return export.check_ssl_export(run, out, images)

    # -- evaluation: k-NN on the teacher's [CLS] (outputs -> score)
    def predict_fn(self, model: SSLModel) -> Callable:
        def features(variables, images):
            teacher = {"params": variables.get("teacher", variables["params"])}
            return model.apply(teacher, images)["pooler_output"].astype(jnp.float32)
        return features

    def outputs(self, model, variables: dict, src, mesh) -> tuple[np.ndarray, np.ndarray]:
        """k-NN class votes [N, C] (normalised; an ensemble averages them) of `src` against a bank of
        ssl.knn.train_split teacher [CLS] features (at most ssl.knn.max_train, a fixed random subset)."""
        from jaxvit.evals import features, knn
        k = self.s.knn
        train_f, train_y = features.labelled_features(self, model, variables, k.train_split, mesh, "cls",
                                                      k.max_train, self.cfg.seed)
        f, ok = features.extract(self, model, variables, src, mesh)
        votes = np.zeros((len(src), len(self._classes)), np.float32)
        votes[ok] = knn.knn_votes(train_f, train_y, features.pooled(f[ok], "cls"), [k.k], k.temperature,
                                  len(self._classes))[k.k]
        self.bank_examples = len(train_y)
        return votes, ok

    def score(self, outputs: np.ndarray, ok: np.ndarray, src, out_dir: Path | None = None,
              extra: dict | None = None) -> dict:
        y, pred, n = np.asarray(src.labels)[ok], outputs[ok].argmax(-1), len(self._classes)
        result = dict(knn_accuracy=metrics.accuracy(y, pred), knn_f1_macro=metrics.macro_f1(y, pred, n),
                      knn_k=self.s.knn.k, knn_train_examples=getattr(self, "bank_examples", None),
                      examples=int(len(y)), **(extra or {}))
        if out_dir is not None:
            Path(out_dir).mkdir(parents=True, exist_ok=True)
            report.write_results_json(Path(out_dir) / f"{report.stem(src.split)}_results.json", result)
        return result

