"""Tiny configs: a ViT of patch 8, width 32, depth 2 on 32 px images, trained for a few steps in-process."""
from __future__ import annotations

from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
TINY_VIT = dict(patch_size=8, hidden_size=32, depth=2, num_heads=2, mlp_hidden=64, pos_grid=4)
LORA_RUN = dict(targets=("query", "value", "layer_1/mlp/fc2"), head_hidden=(16,), pool="cls_mean")


def tiny_config(data_dir, task: str = "classification", **train):
    """A tiny ViT (patch 8, width 32, depth 2) on 32 px images; 2 epochs of batch 8, in-process data."""
    from jaxvit.config import base_config
    c = base_config(task)
    c.data.data_dir = str(data_dir)
    c.data.image_size = 32
    c.data.crop_ratio = 1.0
    c.data.num_workers = 0
    c.model.overrides.update(TINY_VIT)
    c.train.epochs = 2
    c.train.batch_size = 8
    c.train.log_every_steps = 2
    c.eval.batch_size = 8
    c.optim.warmup_ratio = 0.0
    c.optim.lr = 1e-3
    c.checkpoint.keep = 20
    for k, v in train.items():
        c.train[k] = v
    return c


def tiny_ssl_config(data_dir, **train):
    """A tiny student (patch 8, width 32, depth 2) on 32 px global / 16 px local crops, heads of 64 prototypes."""
    from jaxvit.config import base_config
    c = base_config("ssl")
    c.data.data_dir = str(data_dir)
    c.data.image_size, c.data.crop_ratio, c.data.num_workers = 32, 1.0, 0
    c.model.overrides.update(TINY_VIT)
    s = c.ssl
    s.epoch_length = 0
    s.crops.global_size, s.crops.local_size, s.crops.n_local = 32, 16, 2
    for head in (s.dino, s.ibot):
        head.n_prototypes, head.hidden_dim, head.bottleneck_dim = 64, 32, 16
    s.teacher.warmup_temp_epochs = 1
    s.knn.k = 3
    s.attention_images = 2
    c.train.epochs, c.train.batch_size, c.train.log_every_steps = 2, 8, 1
    c.eval.batch_size, c.eval.test_split, c.eval.test_checkpoint = 8, "", "final"
    c.optim.lr, c.optim.warmup_ratio = 1e-3, 0.0
    for k, v in train.items():
        c.train[k] = v
    return c


def set_best_step(workdir: Path, step: int) -> None:
    """Records `step` as the run's best in the loop state of its newest checkpoint (orbax's JSON on disk)."""
    import json
    from jaxvit import checkpoint
    path = Path(workdir) / "checkpoints" / str(max(checkpoint.steps(workdir))) / "loop" / "metadata"
    path.write_text(json.dumps(dict(json.loads(path.read_text()), best_step=step)))
