"""Continued DINOv3 self-supervised pretraining on JUMP Cell Painting at patch size 8 (the DINOv3 JUMP pretraining
project's recipe).

    python -m jaxvit.main --config=configs/jump_ssl.py --workdir=runs/jump_ssl \
        --config.data.data_dir=/path/to/cpg0000-jump-pilot --config.ssl.jump.load_data=load_data.csv \
        --config.model.pretrained=/path/to/dinov3_vits16_pretrain_lvd1689m-08c60483.pth

The student and teacher start from the released ViT-S/16 backbone with its patch embedding resized to 8 x 8
(`jaxvit.models.resize`), fresh DINO and iBOT heads; the 5 fluorescent channels are averaged to one grey image
replicated to RGB (`ssl.jump.channel_mode="average"`, the project's choice; "per_channel" makes each crop one
channel).
The load-data table's Metadata_Treatment labels (and Metadata_Split val rows) drive the k-NN monitor. Then
`python -m jaxvit.export --workdir=runs/jump_ssl --output=E` writes the final teacher as E/model (transformers) and
E/teacher_checkpoint.pth (the official format the project copies for DINOCell).

    python -m jaxvit.main --config=configs/jump_ssl.py:demo --workdir=runs/jump_ssl_demo

renders a synthetic 3-plate Cell Painting set (4 treatments, 7 channels, no download) and pretrains a tiny ViT at
patch 8 on the CPU in a few minutes; the k-NN accuracy on the treatments is logged before and after.
"""
from jaxvit.config import apply_variant, base_config
from jaxvit.config_recipes import dino_optimizer, small_demo
from jaxvit.demos import cells as syn


def get_config(arg: str = ""):
    c = base_config("ssl")
    c.model.arch = "dinov3_vits16"
    c.model.pretrained = "dinov3_vits16_pretrain_lvd1689m-08c60483.pth"
    c.model.dtype = "bfloat16"  # the project's param_dtype bf16 (fp16 gave NaNs)
    c.model.drop_path = 0.1
    s = c.ssl
    s.patch_size = 8
    s.epoch_length = 1250  # OFFICIAL_EPOCH_LENGTH
    s.crops.global_size, s.crops.local_size, s.crops.n_local = 224, 96, 8
    s.crops.global_scale = (0.4, 1.0)  # the project's: a larger minimum for cells
    c.train.epochs = 80
    c.train.batch_size = 48  # batch_size_per_gpu 48 on one A100: here the global batch
    c.optim.lr = 5e-5  # 1/10 of the from-scratch lr, before the sqrt_wrt_1024 scaling rule (as the official cfg)
    c.optim.lr_scaling = "sqrt_wrt_1024"
    c.optim.warmup_ratio = 10 / 80
    c.optim.lr_min_ratio = 1e-6 / 5e-5
    dino_optimizer(c)
    c.data.source = "jump"
    c.ssl.jump.channel_mode = "average"
    c.ssl.jump.intensity = "plate"
    c.data.image_size = 224
    c.data.crop_ratio = 1.0
    c.data.num_workers = 10
    c.data.cache_dir = "~/.cache/jaxvit"  # each site decoded and averaged to grey once (1080 x 1080: 1.2 MB)
    c.eval.test_split = ""
    c.eval.test_checkpoint = "final"
    # Evaluators (docs/evaluators.md): the k-NN monitor of the treatments on the teacher's [CLS] (the ssl task's
    # metrics, history columns val_knn_*) and teacher attention maps (attention_val.png).
    c.evals.val = dict(type="task")
    c.evals.attention = dict(type="attention", images=4)
    return apply_variant(c, arg, "jump_ssl.py", demo=demo)


def demo(c):
    """Synthetic Cell Painting (96 px sites), a tiny ViT from random init at patch 8 (`small_demo`)."""
    c.data.data_dir = "runs/demo_cells"
    c.data.cache_dir = ""  # the synthetic sites are small: decoded each time
    c.data.demo = "cells"
    # read as published: per-plate gzipped tables with S3 paths (mapped to data_dir), treatments from the
    # platemaps, 40 % of the wells held out for the k-NN evaluation
    j = c.ssl.jump
    j.load_data, j.path_map = syn.PUBLISHED_TABLES, (f"{syn.DEMO_S3}=.",)
    j.platemap_dir, j.label_column, j.holdout_by = syn.PLATEMAPS, "broad_sample", "well"
    c.data.val_fraction = 0.4
    small_demo(c, epochs=30, batch_size=32)
    c.model.overrides.num_registers = 0
    c.ssl.patch_size = 0
    c.ssl.teacher.warmup_temp_epochs = 3
    c.eval.every_steps = 55  # every 5 epochs of 11 steps
