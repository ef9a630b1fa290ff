"""Pasture biomass (CSIRO Image2Biomass): five dry masses in grams from a top-down pasture photo.

Data: `<data.data_dir>/{train,val,test}.csv` in the competition's long format (one row per image x target; image
paths relative to the CSV), pivoted to one example per image (`maths.pivot_long`). Training-only metadata
(Height_Ave_cm, Pre_GSHH_NDVI, Species) feed auxiliary heads when their weights are > 0.

Model: backbone + head with five mass outputs (Green, Dead, Clover, GDM, Total, in units of the train split's
per-target std), plus five log-variances with `biomass.uncertainty`, then height, NDVI and species logits when
those heads are on. Dead (and, with train_clover=False, Clover) is derived from the identities instead of
trained. The loss (`biomass.loss`): `smooth_l1` on standardised masses with the metric's target weights, or
`planthydra` (log1p + cosine + compositional, in grams); optional Huber for Dead, mass balance, Gaussian NLL and QC
plausibility terms. The best checkpoint has the highest validation weighted R^2 (the competition's metric, raw
grams). Images are resized whole to data.image_size (or padded to square first, `biomass.pad_to_square`); training
augments with flips, quarter turns and colour jitter (data.aug.*) and the seed's CLAHE, motion blur, perspective
jitter and border mask (biomass.*, `jaxvit.data.photo_aug`; `data.py`), never crops (the masses are of the whole frame).
Training decodes JPEG photos at the smallest DCT scale (1/2, 1/4, 1/8) that still covers the views
(`load_image(min_size=...)`: 2000 x 1000 photos, 448 px halves: 1000 x 500), pixels slightly different from a
full decode; evaluation decodes in full. With data.cache_dir (configs/biomass.py: ~/.cache/jaxvit) each photo's
resized views are computed once per setting and kept there (`jaxvit.data.cache`), unless perspective jitter or the
border mask change the photo before the resize.
"""
from __future__ import annotations

import csv
import functools
import json
import logging
from pathlib import Path
from typing import Any, Callable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from jaxvit import tta
from jaxvit.data.sources import load_image
from jaxvit.data.transforms import TransformConfig
from jaxvit.errors import ConfigError, DataError
from jaxvit.tasks.base import Task, apply_train, build_head_model, check_files, finish_score
from jaxvit.models import load_pretrained
from jaxvit.models.depth_anything import DepthAnything
from jaxvit.tasks.biomass import maths
from jaxvit.tasks.biomass.data import PastureExample, PastureSource
from jaxvit.tasks.biomass.model import BiomassModel

log = logging.getLogger("jaxvit")
LOSSES = ("smooth_l1", "mse", "planthydra")
FOLD_STRATEGIES = ("stratified", "group")


class Biomass(Task):
    name = "biomass"
    export_refusal = "its five-target heads are jaxvit-only; `jaxvit predict` and `jaxvit evaluate` run it"
    supports_cv = True
    best_metric = "val/weighted_r2"
    best_mode = "max"
    head = r"^params/head(_extra|_depth)?/"  # the head, the metadata priors and the depth attention
    frozen = r"^params/depth/"  # the Depth Anything model
    history_metrics = ("loss", "loss_masses", "mse", "weighted_r2", "r2_green", "r2_dead", "r2_clover", "r2_gdm",
                       "r2_total")

    @staticmethod
    def default_config() -> ml_collections.ConfigDict:
        c = ml_collections.ConfigDict()
        c.loss = "smooth_l1"  # smooth_l1 (the project's default) | mse (--no-smoothl1) | planthydra (--use-planthydra-loss)
        c.presence_weight = 0.0  # > 0: a presence logit per mass (BCE on mass > 0); absent masses predicted 0 (--use-presence-heads)
        c.fold_strategy = "stratified"  # cv folds without cv.fold_csv: stratified (State x Season x Species spread) | group
        c.train_dead = False  # False: Dead = Total - GDM (the CSIRO biomass project's default)
        c.train_clover = True  # False: Clover = GDM - Green
        c.huber_dead_delta = 0.0  # > 0: Huber loss (this delta, grams) on Dead (--use-huber --huber-delta)
        c.cosine_weight = 0.4  # planthydra: weight of 1 - cos(pred, true)
        c.compositional_weight = 0.1  # planthydra: weight of the GDM / Total identities
        c.mass_balance_weight = 0.0  # > 0: (Green + Dead + Clover - Total)^2 penalty (--use-mass-balance)
        c.uncertainty = False  # Gaussian NLL with a predicted log-variance per target (--use-uncertainty)
        c.qc_weight = 0.0  # > 0: penalty for masses < 0 or > 1.5 x the train max (--use-qc-plausibility)
        c.height_weight = 0.0  # > 0: auxiliary Height_Ave_cm head (--use-height-head --height-weight)
        c.ndvi_weight = 0.0  # > 0: auxiliary Pre_GSHH_NDVI head (--use-ndvi-head --ndvi-weight)
        c.species_weight = 0.0  # > 0: auxiliary species classification head (--use-species-head)
        c.species_prior = False  # blend the masses with the predicted species' train means (--use-species-prior)
        c.aos_weight = 0.0  # > 0: hallucinated AOS NDVI output feeding the masses (--use-aos-hallucination)
        c.state_scaling = False  # per-State learned density factor, State predicted (--use-state-scaling)
        c.state_weight = 0.1  # state_scaling: weight of the State classification loss
        c.depth_model = ""  # Depth Anything V2 (transformers dir or hub id in the local cache); "" = no depth
        c.depth_features = True  # depth_model: the depth map's mean, std, quantiles as features (--use-depth)
        c.depth_attention = True  # depth_model: patch tokens pooled with depth weights (--depth-attention)
        c.halves = False  # left and right halves as two views; masses = the halves' sum (the CSIRO biomass project's L/R views)
        c.cross_view_weight = 0.0  # halves: weight of the halves' disagreement (--use-cross-view-consistency)
        c.pad_to_square = False  # pad the photo to a square before resizing (--use-pad-to-square)
        c.clahe_prob = 0.0  # train: probability of CLAHE on the luminance (the CSIRO biomass project's --strong-aug)
        c.motion_blur_prob = 0.0  # train: probability of a motion blur of 3-7 px at a random angle (--strong-aug)
        c.perspective_jitter = 0.0  # train: corners moved by up to this fraction (--use-perspective-jitter)
        c.border_mask = 0.0  # train: black bands up to this fraction of each edge (--use-border-mask)
        return c

    @classmethod
    def config_problems(cls, cfg) -> list[str]:
        b, out = cfg.biomass, []
        if b.loss not in LOSSES:
            out.append(f"biomass.loss={b.loss!r}: use one of {', '.join(LOSSES)}")
        if b.fold_strategy not in FOLD_STRATEGIES:
            out.append(f"biomass.fold_strategy={b.fold_strategy!r}: use one of {', '.join(FOLD_STRATEGIES)}")
        if b.cross_view_weight > 0 and not b.halves:
            out.append("biomass.cross_view_weight > 0 needs biomass.halves=True (two views to compare)")
        if b.depth_model and not (b.depth_features or b.depth_attention):
            out.append("biomass.depth_model is set but depth_features and depth_attention are both off: "
                       "turn one on, or set depth_model='' (no depth)")
        if b.species_prior and b.species_weight <= 0:
            out.append("biomass.species_prior needs the species head: set biomass.species_weight > 0")
        if b.huber_dead_delta < 0:
            out.append(f"biomass.huber_dead_delta={b.huber_dead_delta}: must be >= 0 (0 = off)")
        return out

    def __init__(self, cfg, workdir: str | Path | None = None):
        super().__init__(cfg, workdir)
        saved = Path(workdir) / "biomass_stats.json" if workdir else None
        self._stats = json.loads(saved.read_text()) if saved is not None and saved.exists() else None

    @property
    def stats(self) -> dict:
        """Train-split per-target std, aux means/stds, species and state names, each species' mean masses,
        plausible maxima (saved with the run)."""
        if self._stats is None:
            src = self.source(self.cfg.data.train_split, names=None)
            finite = lambda a: a[np.isfinite(a)] if np.isfinite(a).any() else np.zeros(1)
            self._stats = {
                "scale": np.maximum(src.targets.std(0), 1e-3).tolist(),
                "max_mass": maths.plausible_max(src.targets).tolist(),
                "height": [float(finite(src.height).mean()), float(max(finite(src.height).std(), 1e-3))],
                "ndvi": [float(finite(src.ndvi).mean()), float(max(finite(src.ndvi).std(), 1e-3))],
                "species": src.names["species"], "states": src.names["state"],
                "species_mass": [src.targets[src.species == i].mean(0).tolist()
                                 for i in range(len(src.names["species"]))]}
        return self._stats

    # -- data
    def source(self, split: str, names: dict | None | bool = True) -> PastureSource:
        """`<split>.csv`; with cv.fold >= 0, the train split without that fold (train) or the fold alone (val).
        Categories are coded with the train split's names (names=None: the split's own)."""
        if names is True:
            names = {"species": self.stats["species"], "state": self.stats.get("states", [])}
        fold, train = self.cfg.cv.fold, self.cfg.data.train_split
        if fold < 0 or split not in (train, self.cfg.eval.val_split):
            return PastureSource(Path(self.cfg.data.data_dir) / f"{split}.csv", split, names)
        held_out = split != train
        keep = lambda paths, meta: (self.folds(paths, meta) == fold) == held_out
        return PastureSource(Path(self.cfg.data.data_dir) / f"{train}.csv", f"{split}_fold{fold}" if held_out
                             else split, names, keep)

    def folds(self, paths: list[str], metadata: list[dict]) -> np.ndarray:
        """Fold of each train image: cv.fold_csv, else by biomass.fold_strategy over State x Season x Species."""
        cv = self.cfg.cv
        if cv.fold_csv:
            return maths.read_fold_csv(cv.fold_csv, paths)
        make = maths.stratified_folds if self.cfg.biomass.fold_strategy == "stratified" else maths.group_folds
        return make(metadata, cv.n_folds, self.cfg.seed)

    def train_transform(self) -> PastureExample:
        return PastureExample(TransformConfig.from_config(self.cfg.data), self.cfg.biomass, self.cfg.data.cache_dir)

    eval_transform = train_transform

    def preflight(self, splits: tuple[str, ...], manifest: Path | None) -> None:
        check_files(self.cfg, [p for s in splits for p in self.source(s).paths], load_image, manifest)

    def run_files(self) -> dict[str, Any]:
        return {"biomass_stats.json": self.stats}

    # -- model and loss
    def _layout(self) -> dict[str, slice]:
        """Output columns of the head: masses, [log-variances], [height], [ndvi], [species logits], [AOS NDVI],
        [state logits]."""
        b, sizes = self.cfg.biomass, [("mass", 5)]
        sizes += [("log_var", 5)] if b.uncertainty else []
        sizes += [("presence", 5)] if b.presence_weight > 0 else []
        sizes += [("height", 1)] if b.height_weight > 0 else []
        sizes += [("ndvi", 1)] if b.ndvi_weight > 0 else []
        sizes += [("species", len(self.stats["species"]))] if b.species_weight > 0 else []
        sizes += [("aos", 1)] if b.aos_weight > 0 else []
        sizes += [("state", len(self.stats["states"]))] if b.state_scaling else []
        out, start = {}, 0
        for name, n in sizes:
            out[name], start = slice(start, start + n), start + n
        return out

    def build(self, rng: jax.Array):
        b, layout = self.cfg.biomass, self._layout()
        table = ()
        if b.species_prior:
            table = tuple(tuple(float(v) for v in np.asarray(row) / np.asarray(self.stats["scale"]))
                          for row in self.stats["species_mass"])
        spans = tuple((name, s.start, s.stop) for name, s in layout.items())
        depth = load_pretrained(b.depth_model, dtype=self.cfg.model.dtype) if b.depth_model else None
        if depth is not None and not isinstance(depth[0], DepthAnything):
            raise ConfigError(f"biomass.depth_model={b.depth_model!r} is not a Depth Anything checkpoint")
        make = functools.partial(BiomassModel, layout=spans, species_table=table, aos=b.aos_weight > 0,
                                 depth=depth[0].cfg if depth else None, depth_statistics=b.depth_features,
                                 depth_attention=b.depth_attention, data_mean=tuple(self.cfg.data.mean),
                                 data_std=tuple(self.cfg.data.std))
        model, variables = build_head_model(self.cfg, spans[-1][2], rng, make)
        if depth is not None:
            variables["params"]["depth"] = depth[1]
            log.info("depth features from %s (frozen)", b.depth_model)
        return model, variables

    def _masses(self, out: jax.Array) -> jax.Array:
        """Head output [B, K] -> the five masses in grams, derived columns filled in from the identities."""
        b = self.cfg.biomass
        grams = out[:, self._layout()["mass"]].astype(jnp.float32) * jnp.asarray(self.stats["scale"])
        return maths.complete(grams, b.train_dead, b.train_clover)

    def _combine(self, out: jax.Array, batch_size: int) -> tuple[jax.Array, jax.Array]:
        """Outputs of every view [B * V, K] -> (the photo's outputs [B, K], cross-view disagreement [B]). Halves: the
        masses add up (each half shows half the quadrat), the rest is averaged; the disagreement is the mean squared
        difference of the halves' standardised masses."""
        out = out.astype(jnp.float32).reshape(batch_size, -1, out.shape[-1])
        if out.shape[1] == 1:
            return out[:, 0], jnp.zeros(batch_size)
        mass = self._layout()["mass"]
        whole = out.mean(1).at[:, mass].set(out[:, :, mass].sum(1))
        return whole, jnp.mean((out[:, 0, mass] - out[:, 1, mass]) ** 2, -1)

    def _views(self, images: jax.Array) -> jax.Array:
        return images.reshape(-1, *images.shape[-3:])  # [B, V, S, S, C] (halves) or [B, S, S, C] -> [B * V, ...]

    def mass_terms(self, pred: jax.Array, true: jax.Array) -> dict[str, jax.Array]:
        """The objective's terms on the five masses in grams ([B] each): the training loss and the validation
        loss share them."""
        b = self.cfg.biomass
        scale = jnp.asarray(self.stats["scale"])
        weights = jnp.asarray(maths.loss_weights(b.train_dead, b.train_clover))
        if b.loss == "planthydra":
            terms = {"masses": maths.planthydra(pred, true, weights, b.cosine_weight, b.compositional_weight)}
        else:
            terms = {"masses": (maths.smooth_l1 if b.loss == "smooth_l1" else maths.mse)(
                pred / scale, true / scale, weights)}
        if b.huber_dead_delta > 0:
            terms["huber_dead"] = maths.WEIGHTS[maths.DEAD] * maths.huber(
                pred[:, maths.DEAD], true[:, maths.DEAD], b.huber_dead_delta)
        if b.mass_balance_weight > 0:
            terms["mass_balance"] = b.mass_balance_weight * maths.mass_balance(pred)
        if b.qc_weight > 0:
            terms["qc"] = b.qc_weight * maths.qc_plausibility(pred / scale,
                                                                jnp.asarray(self.stats["max_mass"]) / scale)
        return terms

    def loss(self, model, variables: dict, batch: dict, rng: jax.Array, step=None):
        b, layout = self.cfg.biomass, self._layout()
        views, updates = apply_train(model, variables, self._views(batch["image"]), rng)
        out, disagreement = self._combine(views, batch["targets"].shape[0])
        pred, true = self._masses(out), batch["targets"]
        scale = jnp.asarray(self.stats["scale"])
        terms = self.mass_terms(pred, true)
        if b.cross_view_weight > 0:
            terms["cross_view"] = b.cross_view_weight * disagreement
        if b.uncertainty:
            terms["nll"] = maths.gaussian_nll(pred / scale, out[:, layout["log_var"]], true / scale) / 5
        if b.presence_weight > 0:
            terms["presence"] = b.presence_weight * maths.presence_bce(out[:, layout["presence"]], true)
        for column, key, weight in (("height", "height", b.height_weight), ("ndvi", "ndvi", b.ndvi_weight),
                                    ("aos", "ndvi", b.aos_weight)):
            if column in layout:
                mean, std = self.stats[key]
                target = (batch[key] - mean) / std
                known = jnp.isfinite(target)
                err = optax.huber_loss(out[:, layout[column]][:, 0] - jnp.where(known, target, 0.0))
                terms[column] = weight * jnp.where(known, err, 0.0)
        for key, weight in (("species", b.species_weight), ("state", b.state_weight)):
            if key in layout:
                known = batch[key] >= 0
                ce = optax.softmax_cross_entropy_with_integer_labels(out[:, layout[key]], jnp.maximum(batch[key], 0))
                terms[key] = weight * jnp.where(known, ce, 0.0)
        metrics = {f"loss_{name}": term for name, term in terms.items()}  # the history's per-component losses
        metrics["abs_error_total_g"] = jnp.abs(pred[:, maths.TOTAL] - true[:, maths.TOTAL])
        return sum(terms.values()), metrics, updates

    # -- evaluation and prediction
    def predict_fn(self, model) -> Callable:
        names = tuple(self.cfg.eval.tta)

        def predict(variables, images):
            per_view = lambda x: model.apply(variables, x).astype(jnp.float32)
            out = tta.average(per_view, self._views(images), names)  # TTA views of each photo view
            whole = self._combine(out, images.shape[0])[0]
            masses = self._masses(whole)
            if "presence" in self._layout():  # a mass whose presence probability is below 1/2 is predicted 0
                masses = jnp.where(whole[:, self._layout()["presence"]] >= 0, masses, 0.0)
            return masses
        return predict

    def score(self, outputs: np.ndarray, ok: np.ndarray, src: PastureSource, out_dir: Path | None = None,
              extra: dict | None = None) -> dict:
        if not ok.any():
            raise DataError(f"no readable image in split {src.split!r} ({src.location})")
        if not src.labelled:
            raise DataError(f"{src.location} has no targets (the competition's test.csv): predict it "
                            "(cv.predict_split, jaxvit predict) instead of evaluating it")
        result = maths.target_metrics(src.targets[ok], outputs[ok])
        scale = np.asarray(self.stats["scale"])
        terms = {k: float(np.mean(v)) for k, v in self.mass_terms(outputs[ok], src.targets[ok]).items()}
        result["loss"] = sum(terms.values())  # the training objective's mass terms (the heads' terms need no photo)
        result.update({f"loss_{k}": v for k, v in terms.items()})
        result["mse"] = float(np.mean(((outputs[ok] - src.targets[ok]) / scale) ** 2))  # standardised masses
        kept = [src.paths[i] for i in np.flatnonzero(ok)]
        return finish_score(result, src, ok, extra, out_dir, "submission",
                            lambda path: self.write_predictions(path, kept, outputs[ok]))

    def describe_prediction(self, output: np.ndarray) -> dict:
        return {"targets": {n: float(v) for n, v in zip(maths.TARGETS, output)}}

    def write_submission(self, path: Path, src: PastureSource, outputs: np.ndarray) -> None:
        """The competition's submission.csv: one row per sample_id that `src`'s CSV lists (its order)."""
        with open(path, "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["sample_id", "target"])
            for ids, row in zip(src.sample_ids, outputs):
                w.writerows([ids[name], repr(float(v))] for name, v in zip(maths.TARGETS, row) if name in ids)
        solution = Path(src.location).with_name(f"{src.split}_solution.csv")  # hidden labels, where they exist
        if solution.is_file():
            scores = maths.score_submission(path, solution)
            path.with_name(path.stem + "_score.json").write_text(json.dumps(scores, indent=2) + "\n")
            log.info("%s scored against %s: weighted R^2 %.4f", path.name, solution, scores["weighted_r2"])

    def write_predictions(self, path: Path, paths: list[str], outputs: np.ndarray) -> None:
        """The competition's submission layout: sample_id (<image id>__<target>), target (grams)."""
        with open(path, "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["sample_id", "target"])
            for p, row in zip(paths, outputs):
                w.writerows([f"{Path(p).stem}__{name}", repr(float(v))] for name, v in zip(maths.TARGETS, row))

