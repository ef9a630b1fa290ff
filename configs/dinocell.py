"""DINOCell: cell instance segmentation by distance-map regression on a DINOv3 backbone (step 6 of the DINOv3 JUMP
pretraining project).

    python -m jaxvit.main --config=configs/dinocell.py --workdir=runs/dinocell \
        --config.data.data_dir=/data/livecell           # {train,val,test}/images/ + {train,val,test}/masks/
        [--config.model.pretrained=runs/jump_ssl/export/model]   # or a transformers dir / original .pth

The recipe (DINOCell's training/finetune/train.py and pipeline): the backbone exported by the JUMP
continued pretraining (`configs/jump_ssl.py`, then `python -m jaxvit.export`: ViT-S at patch 8), blocks
[2, 5, 8, 11] through the final norm into the U-Net decoder (widths 256, 128, 64, 32), sigmoid + MSE on the
per-cell distance map, 256 px random crops with flips / quarter turns / zoom 0.8-1.2 / brightness 0.95-1.05 /
inversion 0.5, grayscale (channel average) with CLAHE, AdamW lr 1e-4, weight decay 0.1, 250 warmup steps, batch 8,
100 epochs, stopping after 7 evaluations without a better validation AP@0.5 (DINOCell stops on the validation
loss); evaluation on whole images with 256 px tiles overlapping by 32 px, markers at map > 0.47, watershed inside
map > 0.09. Variants:

    :frozen   the backbone frozen, only the decoder trained (the per-channel heads on the JUMP backbone;
              pick a channel with --config.cell_distance.channels=4, e.g. Hoechst of a 5-channel stack)
    :lora     LoRA r16 on the backbone's attention, decoder trained
    :demo     renders synthetic Cell Painting sites with touching cells into runs/dinocell_demo_data in
              LIVECell's layout (images + COCO polygons; no download) and trains a small ViT from random init on the CPU (docs/dinocell.md: time and AP@0.5)
"""
from jaxvit.config import apply_variant, base_config


def get_config(arg: str = ""):
    c = base_config("cell_distance")
    c.model.arch = "dinov3_vits16"
    c.model.pretrained = "runs/jump_ssl/export/model"  # the JUMP SSL export (ViT-S/8); any DINOv2/v3 backbone works
    s = c.cell_distance
    s.decoder_channels = (256, 128, 64, 32)  # layers: () = [2, 5, 8, 11] for 12 blocks, [4, 11, 17, 23] for 24
    s.peak_threshold, s.fill_threshold = 0.47, 0.09
    s.channel_mode, s.clahe = "average", True
    s.scale_range, s.brightness, s.invert_prob = (0.8, 1.2), 0.05, 0.5
    s.eval_size, s.tile_overlap = 1024, 32
    c.data.image_size = 256  # DINOCell's crop and sliding-window size
    c.data.aug.hflip, c.data.aug.vflip, c.data.aug.rot90 = True, True, True
    c.data.num_workers = 4
    c.data.cache_dir = "~/.cache/jaxvit"  # each image scaled and its distance map made once (LIVECell: 2.9 MB each)
    c.train.batch_size = 8
    c.train.epochs = 100
    c.train.phases = ({"name": "all", "patience": 7},)  # early stopping (DINOCell: patience 7)
    c.optim.lr = 1e-4
    c.optim.weight_decay = 0.1
    c.optim.warmup_steps = 250
    c.eval.batch_size = 8
    return apply_variant(c, arg, "dinocell.py", frozen=frozen, lora=lora, demo=demo)


def frozen(c):
    c.train.phases = ({"name": "head", "trainable": "head", "patience": 7},)


def lora(c):
    c.lora.enabled = True
    c.lora.rank, c.lora.alpha = 16, 32.0


def demo(c):
    """Synthetic touching cells (96 px, 5 stains averaged), a small ViT from random init at patch 8, 64 px crops;
    validation on whole images (2 x 2 tiles of 64 px) every 5 epochs and at the start (the untrained AP@0.5)."""
    c.data.demo, c.data.data_dir = "cells", "runs/dinocell_demo_data"
    c.model.pretrained = ""
    c.model.overrides.update(dict(patch_size=8, hidden_size=96, depth=4, num_heads=4, mlp_hidden=192,
                                  num_registers=0))
    s = c.cell_distance
    s.decoder_channels = (64, 32, 16, 16)
    s.clahe, s.scale_range, s.brightness, s.invert_prob = False, (0.9, 1.1), 0.05, 0.0
    s.eval_size, s.tile_overlap = 96, 32
    c.data.image_size = 64
    c.data.num_workers = 0  # in-process: no worker start-up at each evaluation
    c.data.cache_dir = ""  # the synthetic sites are small: decoded each time
    c.train.phases = ()
    c.train.epochs = 30
    c.train.batch_size = 16
    c.optim.lr = 5e-3
    c.optim.warmup_steps = 0
    c.optim.warmup_ratio = 0.05
    c.optim.weight_decay = 0.05
    c.eval.at_start = True
    c.eval.every_steps = 75  # every 5 epochs of 15 steps
    c.eval.batch_size = 48
