"""TerraMind stage 3: grounding optical (S2L2A) generation in SAR (S1) with adapters on a frozen TerraMind.

Two gradient paths reach the adapters (the TerraMind stage-3 project's generate-then-score path has none: sampling tokens is not
differentiable):
- tokens: TerraMind reads the S1 tile and predicts the S2L2A token of every position; cross-entropy against the
  tokens the frozen S2L2A tokenizer gives the paired optical tile (4M's objective, `token_weight`);
- pixels: the predicted distribution's expected FSQ codes go through the tokenizer's diffusion decoder
  (`timesteps` DDIM steps from a fixed noise, remat per step) to an optical tile, scored by the stage-3 project's terms:
  spectral L1 against the real tile, SAR consistency (edge and local-texture correlation with the S1 tile),
  cycle (TerraMind predicts the S1 tokens back from the generated tile), identity (the S2L2A tokens predicted
  from the real optical tile itself) and a perceptual distance on frozen DINO features (LPIPS needs
  torchvision weights; `perceptual_backbone`, "" = off).
Evaluation generates with the argmax tokens (hard decode) and reports SAR agreement (edge correlation of the
generated tile with the S1 tile; `sar_agreement_real` is the real optical tile's, `sar_agreement_tokens` that of
the tile decoded from the real tile's tokens: the ceiling of a perfect token predictor), spectral L1, token accuracy,
and with LoRA the change from the base model's generation (`change_l1`, `perceptual_change`).
"""
from __future__ import annotations

import dataclasses
import functools
import logging
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from jaxvit import lora, report
from jaxvit.data import geotiff
from jaxvit.files import atomic_write
from jaxvit.tasks.sar_grounding import pairs as sar_pairs
from jaxvit.errors import ConfigError, DataError
from jaxvit.models import ViT, load_pretrained
from jaxvit.models.terramind import TerraMind, init_params, load_terramind, terramind_config
from jaxvit.models.terramind.config import ModalitySpec, resolve
from jaxvit.models.terramind.tokenizer import Tokenizer, decode_ids, decode_probs, encode_ids, load_tokenizer
from jaxvit.models.terramind.tokenizer import init_params as init_tokenizer
from jaxvit.models.terramind.tokenizer import tokenizer_config
from jaxvit.tasks.base import Task, check_files
from jaxvit.tasks.sar_grounding import export, losses

log = logging.getLogger("jaxvit")

TERMS = ("token", "spectral", "sar_consistency", "cycle", "identity", "perceptual")


@dataclasses.dataclass(frozen=True)
class Stage3Model:
    """The modules of a stage-3 run; their params live under params/{terramind,tokenizer,s1_tokenizer,dino}."""

    terramind: TerraMind
    tokenizer: Tokenizer  # of the target (optical) modality
    s1_tokenizer: Tokenizer | None  # of the input (SAR) modality: the cycle term's targets
    dino: ViT | None  # the perceptual term's feature extractor


class SarGrounding(Task):
    name = "sar_grounding"
    best_metric = "val/loss"
    history_metrics = ("loss", "token_accuracy", "sar_agreement", "sar_agreement_tokens", "spectral_l1", "change_l1")
    head = r"^params/head/"  # no head: a phase "all" trains the adapters (lora.enabled) or TerraMind
    frozen = r"^params/(tokenizer|s1_tokenizer|dino)/"

    @staticmethod
    def default_config() -> ml_collections.ConfigDict:
        c = ml_collections.ConfigDict()
        c.terramind = ""  # TerraMind v1 checkpoint (.pt / .safetensors, terratorch layout); "random": random `size`
        c.size = "base"  # tiny | small | base | large (random init, or the fields `overrides` do not set)
        c.overrides = ml_collections.ConfigDict()  # TerraMindConfig fields (a custom size, e.g. the demo's)
        c.tokenizer = ""  # target tokenizer: checkpoint file or released name in the local HF cache; "" = random
        c.s1_tokenizer = ""  # input tokenizer (for the cycle term); "" = random when cycle_weight > 0
        c.tokenizer_overrides = ml_collections.ConfigDict()  # TokenizerConfig fields of random tokenizers
        c.input, c.target = "S1GRD", "S2L2A"
        c.timesteps = 10  # DDIM denoising steps of the differentiable decode (the stage-3 project's "diffusion timesteps")
        c.remat_decode = True  # recompute each denoising step in the backward pass
        c.token_weight = 1.0  # masked-token cross-entropy of the target tokens (4M)
        c.spectral_weight = 1.0
        c.sar_consistency_weight = 1.0
        c.cycle_weight = 0.5
        c.identity_weight = 0.3
        c.perceptual_weight = 0.1  # the stage-3 project's lpips_weight, on DINO features
        c.perceptual_backbone = ""  # DINO backbone (transformers dir / hub id in the cache) for perceptual terms
        c.texture_window = 7  # local-std window of the SAR texture term
        c.preview_tiles = 8  # generated tiles written as PNG (RGB composite) + .npy by each evaluation with out_dir
        c.fit_tokenizer_steps = 0  # > 0 with a `tokenizer` path that does not exist: fit a small tokenizer of
        #                            tokenizer_overrides on the train tiles first and save it there (the demo)
        return c

    @classmethod
    def config_problems(cls, cfg) -> list[str]:
        s, out = cfg.sar_grounding, []
        out += [f"sar_grounding.{t}_weight={s[t + '_weight']}: weights must be >= 0" for t in TERMS
                if s[f"{t}_weight"] < 0]
        if s.perceptual_weight > 0 and not s.perceptual_backbone:
            out.append("sar_grounding.perceptual_weight > 0 needs sar_grounding.perceptual_backbone (a DINO "
                       "backbone: transformers dir or hub id); or set perceptual_weight=0")
        if s.timesteps < 1:
            out.append(f"sar_grounding.timesteps={s.timesteps}: use >= 1 denoising steps")
        if not s.terramind:
            out.append("sar_grounding.terramind is empty: set it to a TerraMind v1 checkpoint (.pt / .safetensors, "
                       "e.g. TerraMind_v1_base.pt) or to 'random' for a randomly initialised TerraMind of "
                       "sar_grounding.size (tests, demos)")
        return out

    def __init__(self, cfg, workdir: str | Path | None = None):
        super().__init__(cfg, workdir)
        self.s = s = cfg.sar_grounding
        self.input, self.target = resolve(s.input, "encoder"), resolve(s.target, "encoder")

    # -- data
    def source(self, split: str):
        return sar_pairs.open_split(self.cfg.data, split)

    def train_transform(self):
        return sar_pairs.pair_transform(self.cfg.data).train

    def eval_transform(self):
        return sar_pairs.pair_transform(self.cfg.data).eval

    def preflight(self, splits: tuple[str, ...], manifest: Path | None) -> None:
        """Every pair decoded as evaluation reads it (`data.preflight`, cached in the manifest; keyed by S2 path)."""
        pairs = {}
        for split in splits:
            src = self.source(split)
            pairs.update({src[i]["path"]: src[i] for i in range(len(src))})
        fmt = sar_pairs.pair_transform(self.cfg.data).fmt
        check_files(self.cfg, list(pairs), lambda path: fmt.load(pairs[path]), manifest)

    @classmethod
    def dry_run_config(cls, cfg):
        s = cfg.sar_grounding
        if s.fit_tokenizer_steps <= 0 or not s.tokenizer or Path(s.tokenizer).exists():
            return cfg
        log.info("dry run: the stand-in tokenizer (%d fitting steps) is not fitted; a random one of "
                 "sar_grounding.tokenizer_overrides stands in", s.fit_tokenizer_steps)
        cfg = cfg.copy_and_resolve_references()
        cfg.sar_grounding.tokenizer, cfg.sar_grounding.fit_tokenizer_steps = "", 0
        return cfg

    def prepare(self) -> None:
        """The demo set, then (fit_tokenizer_steps) a stand-in target tokenizer fitted on the train tiles."""
        super().prepare()
        s = self.s
        if s.fit_tokenizer_steps <= 0 or not s.tokenizer or Path(s.tokenizer).exists():
            return
        from jaxvit.models.terramind.tokenizer import save_tokenizer
        from jaxvit.tasks.sar_grounding import fit_tokenizer
        tok, params = self._tokenizer("", s.target, 0)
        src, transform = self.source(self.cfg.data.train_split), self.eval_transform()
        tiles = np.stack([transform(src[i])["s2"] for i in range(len(src))])
        params, _ = fit_tokenizer.fit(tok, params, tiles, s.fit_tokenizer_steps, seed=self.cfg.seed)
        atomic_write(s.tokenizer, lambda tmp: save_tokenizer(tok.cfg, params, tmp))  # complete or absent
        log.info("demo tokenizer fitted on %d tiles -> %s", len(tiles), s.tokenizer)

    # -- model
    def build(self, rng: jax.Array) -> tuple[Stage3Model, dict]:
        s, m = self.s, self.cfg.model
        tok, tok_params = self._tokenizer(s.tokenizer, s.target, 0)
        s1_tok, s1_params = (self._tokenizer(s.s1_tokenizer, s.input, 1) if s.cycle_weight > 0 else (None, None))
        runtime = dict(dtype=m.dtype, lora_alpha=self.cfg.lora.alpha, lora_dropout=self.cfg.lora.dropout)
        if s.terramind != "random":
            terramind, tm_params = load_terramind(s.terramind, **runtime)
        else:
            tm_cfg = terramind_config(s.size, **(self._demo_modalities(tok, s1_tok) | s.overrides.to_dict()),
                                      **runtime)
            terramind, tm_params = TerraMind(tm_cfg), init_params(tm_cfg, self.cfg.seed)
            log.info("TerraMind %s initialised at random (sar_grounding.terramind='random')", s.size)
        self._check_vocab(terramind, tok, s.target)
        if s1_tok is not None:
            self._check_vocab(terramind, s1_tok, s.input)
        params = {"terramind": tm_params, "tokenizer": tok_params}
        if s1_tok is not None:
            params["s1_tokenizer"] = s1_params
        dino = None
        if s.perceptual_weight > 0:
            dino, params["dino"] = load_pretrained(s.perceptual_backbone, dtype=m.dtype)
        variables = {"params": params}
        if self.cfg.lora.enabled:
            adapters = lora.init_adapters(tm_params, self.cfg.lora.targets, self.cfg.lora.rank, rng)
            if not adapters:
                raise ConfigError(f"lora.targets={tuple(self.cfg.lora.targets)} match no TerraMind layer; the "
                                  "stage-3 project's: ('decoder/.*/cross_attn/(q|kv|proj)',)")
            variables["lora"] = {"terramind": adapters}
            log.info("LoRA rank %d on %d TerraMind layers: %s trainable parameters", self.cfg.lora.rank,
                     len(jax.tree_util.tree_leaves(adapters)) // 2, f"{lora.count(adapters):,}")
        return Stage3Model(terramind, tok, s1_tok, dino), variables

    def _tokenizer(self, source: str, modality: str, seed: int) -> tuple[Tokenizer, dict]:
        if source:
            return load_tokenizer(source, modality.lower(), dtype=self.cfg.model.dtype,
                                  **self.s.tokenizer_overrides.to_dict())
        cfg = tokenizer_config(modality.lower(), channels=len(sar_pairs.STATS[modality].mean),
                               dtype=self.cfg.model.dtype,
                               **self.s.tokenizer_overrides.to_dict())
        log.info("%s tokenizer initialised at random (no checkpoint given)", modality)
        return Tokenizer(cfg), init_tokenizer(cfg, self.cfg.seed + seed)

    def _demo_modalities(self, tok: Tokenizer, s1_tok: Tokenizer | None) -> dict:
        """A random TerraMind's modalities: the two raw inputs and the token targets of the given tokenizers."""
        encoder = tuple(ModalitySpec(resolve(n, "encoder"), "image", len(sar_pairs.STATS[n].mean))
                        for n in (self.s.input, self.s.target))
        decoder = [ModalitySpec(resolve(self.s.target, "decoder"), "tokens", tok.cfg.vocab_size)]
        if s1_tok is not None:
            decoder.append(ModalitySpec(resolve(self.s.input, "decoder"), "tokens", s1_tok.cfg.vocab_size))
        return dict(encoder_modalities=encoder, decoder_modalities=tuple(decoder))

    @staticmethod
    def _check_vocab(terramind: TerraMind, tok: Tokenizer, modality: str) -> None:
        spec = terramind.cfg.spec(resolve(modality, "decoder"), "decoder")
        if spec.size != tok.cfg.vocab_size:
            raise ConfigError(f"TerraMind predicts {spec.size} {modality} token ids but the {modality} tokenizer "
                              f"has {tok.cfg.vocab_size} (FSQ levels {tok.cfg.levels}): use matching checkpoints")

    def depth(self, model: Stage3Model) -> int:
        return model.terramind.cfg.encoder_depth + model.terramind.cfg.decoder_depth

    # -- objective
    def _terramind(self, model: Stage3Model, variables: dict, inputs: dict, target: str, rng, train: bool):
        v = {"params": variables["params"]["terramind"]}
        if "lora" in variables:
            v["lora"] = variables["lora"]["terramind"]
        return model.terramind.apply(v, inputs, target, train=train, rngs={"dropout": rng})["logits"]

    def _dino_tokens(self, model: Stage3Model, variables: dict, s2: jax.Array) -> jax.Array:
        """Patch tokens of frozen DINO on the tile's RGB composite (B04, B03, B02 reflectance / 0.3, ImageNet
        normalisation), resized to a multiple of the patch size."""
        from jaxvit.data.transforms import IMAGENET_MEAN, IMAGENET_STD
        from jaxvit.models.depth_anything import bilinear_resize
        stats = sar_pairs.STATS[self.s.target]
        rgb_bands = [stats.bands.index(b) for b in ("B04", "B03", "B02")]
        mean, std = jnp.asarray(stats.mean)[jnp.asarray(rgb_bands)], jnp.asarray(stats.std)[jnp.asarray(rgb_bands)]
        rgb = jnp.clip((s2[..., rgb_bands] * std + mean) / 10000 / 0.3, 0, 1)
        x = (rgb - jnp.asarray(IMAGENET_MEAN)) / jnp.asarray(IMAGENET_STD)
        p = model.dino.cfg.patch_size
        x = bilinear_resize(x, tuple(max(round(n / p), 1) * p for n in x.shape[1:3]), align_corners=False)
        return model.dino.apply({"params": variables["params"]["dino"]}, x)["patch_tokens"]

    def objective(self, model: Stage3Model, variables: dict, batch: dict, rng: jax.Array, train: bool
                  ) -> tuple[jax.Array, dict]:
        """(weighted sum of the terms [B], every term and the generated tile); per example."""
        s, p = self.s, variables["params"]
        s1, s2 = batch["s1"], batch["s2"]
        b = s2.shape[0]
        ids = jax.lax.stop_gradient(encode_ids(model.tokenizer, p["tokenizer"], s2))
        logits = self._terramind(model, variables, {self.input: s1}, s.target, jax.random.fold_in(rng, 0), train)
        flat_ids = ids.reshape(b, -1)
        terms = {"token": optax.softmax_cross_entropy_with_integer_labels(logits, flat_ids).mean(-1)}
        out = {"token_accuracy": (logits.argmax(-1) == flat_ids).mean(-1)}
        image_terms = any(s[f"{t}_weight"] > 0 for t in ("spectral", "sar_consistency", "cycle", "perceptual"))
        if image_terms:
            noise = jax.random.normal(jax.random.fold_in(rng, 1), s2.shape, jnp.float32)
            probs = jax.nn.softmax(logits).reshape(*ids.shape, -1)
            gen = decode_probs(model.tokenizer, p["tokenizer"], probs, noise, timesteps=s.timesteps,
                               remat=s.remat_decode and train)
            valid = batch["valid"][..., None] if "valid" in batch else jnp.ones_like(s2[..., :1])
            err = (jnp.abs(gen - s2) * valid).reshape(b, -1).sum(-1)
            terms["spectral"] = err / jnp.maximum(valid.reshape(b, -1).sum(-1) * s2.shape[-1], 1.0)
            terms["sar_consistency"] = losses.sar_consistency(gen, s1, s.texture_window)
            if s.cycle_weight > 0:
                s1_ids = jax.lax.stop_gradient(encode_ids(model.s1_tokenizer, p["s1_tokenizer"], s1)).reshape(b, -1)
                back = self._terramind(model, variables, {self.target: gen}, s.input, jax.random.fold_in(rng, 2),
                                       train)
                terms["cycle"] = optax.softmax_cross_entropy_with_integer_labels(back, s1_ids).mean(-1)
            if s.perceptual_weight > 0:
                terms["perceptual"] = losses.feature_distance(self._dino_tokens(model, variables, gen),
                                                              self._dino_tokens(model, variables, s2))
            out["generated"] = gen
        if s.identity_weight > 0:
            same = self._terramind(model, variables, {self.target: s2}, s.target, jax.random.fold_in(rng, 3), train)
            terms["identity"] = optax.softmax_cross_entropy_with_integer_labels(same, flat_ids).mean(-1)
        total = sum(s[f"{t}_weight"] * v for t, v in terms.items() if s[f"{t}_weight"] > 0)
        return total, out | {f"{t}_loss": v for t, v in terms.items()}

    def loss(self, model: Stage3Model, variables: dict, batch: dict, rng: jax.Array, step=None):
        total, out = self.objective(model, variables, batch, rng, train=True)
        out.pop("generated", None)
        return total, out, {}

    # -- evaluation
    def _generate(self, model: Stage3Model, variables: dict, s1: jax.Array) -> jax.Array:
        """The optical tile TerraMind generates from S1: argmax tokens, decoded in `timesteps` DDIM steps from a
        noise fixed by the seed (deterministic)."""
        logits = self._terramind(model, variables, {self.input: s1}, self.s.target, jax.random.key(0), False)
        patch = model.tokenizer.cfg.patch_size
        ids = logits.argmax(-1).reshape(s1.shape[0], s1.shape[1] // patch, s1.shape[2] // patch)
        noise = jax.random.normal(jax.random.key(self.cfg.seed), (*s1.shape[:3], model.tokenizer.cfg.channels))
        return decode_ids(model.tokenizer, variables["params"]["tokenizer"], ids, noise, timesteps=self.s.timesteps)

    def outputs(self, model: Stage3Model, variables: dict, src, mesh: Any) -> tuple[dict, np.ndarray]:
        """({"metrics": {name: [N]} per-example metrics, "preview": [P, H, W, C] the first `preview_tiles`
        generated tiles, "preview_index": [P]}, readable mask [N]): generated tiles are reduced per batch, not
        kept."""
        from jaxvit import inference
        per_example: dict[str, np.ndarray] = {}
        ok = np.zeros(len(src), bool)
        preview, preview_index = [], []
        for out, index, mask in inference.batches(_eval_fn(self, model), variables, src, self.eval_transform(),
                                                  self.cfg.data, self.cfg.eval.batch_size, mesh):
            gen = out.pop("generated")
            for k, v in out.items():
                per_example.setdefault(k, np.zeros(len(src), np.float64))[index[mask]] = np.asarray(v)[mask]
            ok[index[mask]] = True
            for j in np.flatnonzero(mask)[:self.s.preview_tiles - len(preview)]:
                preview.append(np.asarray(gen[j]))
                preview_index.append(int(index[j]))
        return {"metrics": per_example, "preview": preview, "preview_index": preview_index}, ok

    def ensemble_outputs(self, members: list, src, mesh: Any):
        raise DataError("ensembles of sar_grounding runs are not supported (their token predictions would have to be "
                        "combined before decoding); evaluate each run on its own")

    def score(self, outputs: dict, ok: np.ndarray, src, out_dir: Path | None = None, extra: dict | None = None
              ) -> dict:
        """Means of the per-example metrics over the readable pairs; with out_dir, the results and the preview
        tiles (`<split>_generated/`)."""
        if not ok.any():
            raise DataError(f"split {src.split!r} has no readable pair ({src.location})")
        result = {k: float(v[ok].mean()) for k, v in outputs["metrics"].items()} | {"examples": int(ok.sum())}
        result |= extra or {}
        if out_dir is not None:
            tiles = [(src[i]["id"], t) for i, t in zip(outputs["preview_index"], outputs["preview"])]
            self.write_tiles(Path(out_dir) / f"{report.stem(src.split)}_generated", tiles)
            report.write_results_json(Path(out_dir) / f"{report.stem(src.split)}_results.json", result)
        return result

    def write_tiles(self, directory: Path, tiles: list[tuple[str, np.ndarray]]) -> None:
        """Each generated tile as <id>.npy (all bands, physical units: reflectance x 10000) and <id>.png (RGB)."""
        from PIL import Image
        directory.mkdir(parents=True, exist_ok=True)
        for name, tile in tiles:
            tile = np.asarray(tile, np.float32)
            np.save(directory / f"{name}.npy", sar_pairs.denormalize(tile, self.s.target))
            Image.fromarray(sar_pairs.rgb_composite(tile, self.s.target)).save(directory / f"{name}.png")

    def backbone_module(self, model: Stage3Model) -> None:
        return None  # TerraMind: no ViT attention maps or features

    def export(self, run, out: Path) -> Path:
        return export.export_terramind(run, out)

    def check_export(self, run, out: Path, images: np.ndarray) -> dict[str, float]:
        return export.check_terramind_export(run, out)

    def predict_files(self, model: Stage3Model, variables: dict, paths: list[Path], output: Path, batch_size: int
                      ) -> list[dict]:
        """S1 tiles (GeoTIFF / .npy, sides multiples of 32 px) -> generated optical tiles in `output`
        (<stem>.png RGB composite, <stem>.npy all bands in reflectance x 10000, and for a GeoTIFF input <stem>.tif:
        the bands with the input's transform and CRS)."""
        from jaxvit.data.sources import ImageLoadError
        fmt, generate = sar_pairs.pair_transform(self.cfg.data).fmt, jax.jit(functools.partial(self._generate, model))
        records = []
        for path in paths:
            try:
                s1 = fmt.read_s1(str(path))
                if s1.shape[0] % 32 or s1.shape[1] % 32:
                    raise ImageLoadError(str(path), f"size {s1.shape[1]}x{s1.shape[0]}: TerraMind's tokenizer decodes "
                                         "tiles whose sides are multiples of 32 px; crop or pad it")
            except ImageLoadError as e:
                records.append({"path": str(path), "error": e.reason})
                continue
            tile = np.asarray(generate(variables, jnp.asarray(np.nan_to_num(s1))[None]))[0]
            self.write_tiles(output, [(Path(path).stem, tile)])
            record = {"path": str(path), "png": str(output / f"{Path(path).stem}.png"),
                      "npy": str(output / f"{Path(path).stem}.npy")}
            georeference = geotiff.read_georeference(path)
            if georeference:
                record["tif"] = str(output / f"{Path(path).stem}.tif")
                geotiff.write_geotiff(record["tif"], sar_pairs.denormalize(np.asarray(tile, np.float32),
                                                                           self.s.target), georeference)
            records.append(record)
        return records


@functools.lru_cache(maxsize=8)
def _eval_fn(task: SarGrounding, model: Stage3Model):
    """fn(variables, batch) -> per-example metrics and the generated tile; one function per (task, model), so every
    validation reuses one compiled program."""
    generate = functools.partial(task._generate, model)

    def fn(variables, batch):
        rng = jax.random.key(task.cfg.seed)
        loss, out = task.objective(model, variables, batch, rng, train=False)
        gen = generate(variables, batch["s1"])
        s1, s2 = batch["s1"], batch["s2"]
        noise = jax.random.normal(jax.random.key(task.cfg.seed), s2.shape)
        true_ids = encode_ids(model.tokenizer, variables["params"]["tokenizer"], s2)
        ceiling = decode_ids(model.tokenizer, variables["params"]["tokenizer"], true_ids, noise,
                             timesteps=task.s.timesteps)  # what a perfect token predictor would generate
        res = {"loss": loss, "token_accuracy": out["token_accuracy"], "generated": gen,
               "sar_agreement": losses.sar_agreement(gen, s1), "sar_agreement_real": losses.sar_agreement(s2, s1),
               "sar_agreement_tokens": losses.sar_agreement(ceiling, s1), "spectral_l1": losses.spectral_l1(gen, s2)}
        res.update({k: v for k, v in out.items() if k.endswith("_loss")})
        if "lora" in variables:
            base = {k: v for k, v in variables.items() if k != "lora"}
            base_gen = generate(base, batch["s1"])
            res["change_l1"] = losses.spectral_l1(gen, base_gen)
            if model.dino is not None:
                res["perceptual_change"] = losses.feature_distance(task._dino_tokens(model, variables, gen),
                                                                   task._dino_tokens(model, variables, base_gen))
        else:
            res["change_l1"] = jnp.zeros_like(loss)
        return res
    return fn
