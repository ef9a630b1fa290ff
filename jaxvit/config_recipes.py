"""Config recipes several config files share (configs/*.py import them): the official DINO optimizer and the SSL
demos' CPU-sized run."""
from __future__ import annotations


def dino_optimizer(c):
    """The official DINOv2/DINOv3 optimizer around optim.lr: AdamW (0.9, 0.999), weight decay cosine 0.04 -> 0.4,
    layer decay 0.9, patch embedding lr x 0.2, gradients clipped to 3.0 per module."""
    c.optim.weight_decay, c.optim.weight_decay_end = 0.04, 0.4
    c.optim.layer_decay = 0.9
    c.optim.lr_mults = ((r"/embeddings/patch_embeddings/", 0.2),)
    c.optim.grad_clip, c.optim.clip_per_module = 3.0, True
    c.optim.b1, c.optim.b2 = 0.9, 0.999


def small_demo(c, epochs: int, batch_size: int) -> None:
    """The demos' CPU-sized run: a ViT of width 128, depth 4 (patch 8) from random init, 64 px global and 4 x 32
    px local crops, heads of 1,024 prototypes with BatchNorm and weight-normalised prototypes. From random init
    the official heads stay on DINO's initial plateau for the whole CPU budget (outputs nearly the same for
    every image, targets uniform; README); these two official options give the targets structure at once."""
    c.data.image_size, c.data.num_workers = 64, 2
    c.model.pretrained, c.model.dtype, c.model.drop_path = "", "float32", 0.0
    c.model.overrides.update(dict(patch_size=8, hidden_size=128, depth=4, num_heads=4, mlp_hidden=384))
    s = c.ssl
    s.epoch_length = 0  # one pass over the data
    s.crops.global_size, s.crops.local_size, s.crops.n_local = 64, 32, 4
    for head in (s.dino, s.ibot):
        head.n_prototypes, head.hidden_dim, head.bottleneck_dim = 1024, 256, 64
    s.head_use_bn, s.head_weight_norm = True, True
    s.knn.k = 10
    c.train.epochs, c.train.batch_size = epochs, batch_size
    c.optim.lr, c.optim.lr_scaling, c.optim.warmup_ratio, c.optim.lr_min_ratio = 5e-4, "none", 0.1, 0.0
    c.eval.at_start, c.eval.batch_size = True, 128
