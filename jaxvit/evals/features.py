"""Frozen backbone features and attention maps of a task's model (k-NN, linear probe, attention evaluators, the
`probe` and `predict` tools): the backbone of a backbone + head model, the teacher's of an SSL model."""
from __future__ import annotations

import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from jaxvit import inference
from jaxvit.models import ViT
from jaxvit.models.heads import pool_features


@functools.lru_cache(maxsize=16)
def features_fn(vit_cfg: Any) -> Callable:
    """fn(backbone variables, batch) -> CLS ++ mean patch token [B, 2D] float32 (the CLS part: first D columns);
    one function object per backbone, so every evaluation reuses one compiled program."""
    vit = ViT(vit_cfg)
    return lambda v, batch: pool_features(vit.apply(v, batch["image"]), "cls_mean").astype(jnp.float32)


def pooled(features: np.ndarray, pool: str) -> np.ndarray:
    """cls: the first half of `features_fn`'s columns; cls_mean: all."""
    return features[:, :features.shape[1] // 2] if pool == "cls" else features


def map_features(vit_cfg: Any, backbone_vars: dict, src: Any, transform: Callable, data_cfg: Any, batch_size: int,
                 mesh: Any) -> tuple[np.ndarray, np.ndarray]:
    """(features [N, 2D] of every example of `src`, readable mask [N]) of a ViT and its own variables."""
    return inference.map_source(features_fn(vit_cfg), backbone_vars, src, transform, data_cfg, batch_size, mesh)


def extract(task: Any, model: Any, variables: dict, src: Any, mesh: Any) -> tuple[np.ndarray, np.ndarray]:
    """`map_features` of a task's model (its backbone, an SSL run's teacher) over `src`, preprocessed by the
    task's evaluation transform of that split."""
    c = task.cfg
    return map_features(task.backbone_module(model).cfg, task.backbone_variables(variables), src,
                        task.split_transform(src.split), c.data, c.eval.batch_size, mesh)


def labelled_features(task: Any, model: Any, variables: dict, split: str, mesh: Any, pool: str, limit: int = 0,
                      seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(features, labels) of the readable examples of a task's labelled split; `limit` > 0: a fixed random subset
    of at most that many examples."""
    src = task.source(split)
    if limit and len(src) > limit:
        src = Subset(src, np.sort(np.random.default_rng(seed).choice(len(src), limit, replace=False)))
    f, ok = extract(task, model, variables, src, mesh)
    return pooled(f[ok], pool), np.asarray(src.labels)[ok]


@functools.lru_cache(maxsize=16)
def attention_fn(vit_cfg: Any) -> Callable:
    """fn(backbone variables, images [B, S, S, C]) -> the last block's CLS attention of each head over the patch
    grid [B, heads, S/p, S/p] float32."""
    vit, prefix, p = ViT(vit_cfg), vit_cfg.num_prefix, vit_cfg.patch_size

    def fn(v, x):
        attn = vit.apply(v, x, return_attention=True)["attentions"][-1][:, :, 0, prefix:]
        return attn.astype(jnp.float32).reshape(*attn.shape[:2], x.shape[1] // p, x.shape[2] // p)
    return jax.jit(fn)


class Subset:
    """A fixed subset of a labelled source's examples (e.g. the k-NN bank of a large split)."""

    def __init__(self, src, index: np.ndarray):
        self.src, self.index = src, index
        self.split, self.location, self.classes = src.split, src.location, src.classes
        self.labels = np.asarray(src.labels)[index]
        self.paths = [src.paths[i] for i in index]

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, i: int) -> dict:
        return self.src[int(self.index[i])]
