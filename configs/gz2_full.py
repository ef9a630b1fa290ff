"""GZ2 five-class galaxy morphology: full fine-tuning of DINOv2-L/14 with the first 12 blocks frozen.

    python -m jaxvit.main --config=configs/gz2_full.py --workdir=runs/gz2_full \
        --config.data.data_dir=/path/to/dinov3-tng50-finetune

The Galaxy Zoo 2 DINOv3 project's layer-wise rates: blocks 0-11 frozen (the `:lr01` variant trains them at lr x 0.1
instead), blocks 12-23 and the final norm at lr x 0.5, the head at lr x 1.0; 50 epochs, global batch 16, lr 1e-5,
weight decay 0.05, 10% warmup then cosine. The project expects slightly higher accuracy than LoRA at a
higher memory cost.
"""
from jaxvit.config import apply_variant, base_config


def get_config(arg: str = ""):
    c = base_config()
    c.model.arch = "dinov2_vitl14"
    c.model.pretrained = "facebook/dinov2-large"
    c.model.head_dropout = 0.1
    c.lora.enabled = False
    c.train.epochs = 50
    c.train.batch_size = 16
    c.train.freeze_first_n_layers = 12
    c.optim.lr = 1e-5
    c.optim.weight_decay = 0.05
    c.optim.warmup_ratio = 0.1
    c.optim.lr_mults = ((r"^params/backbone/encoder/layer_([0-9]|1[01])/", 0.1), (r"^params/backbone/", 0.5))
    c.data.image_size = 224
    c.data.num_workers = 4
    c.data.aug.crop_ratio = (1.0, 1.0)  # keep galaxy axis ratios: they define the smooth classes
    # as the project keeps them: best by validation accuracy (best) and by F1 (best_val_f1_macro), every 5th epoch
    c.checkpoint.also_best = ("val/f1_macro",)
    c.checkpoint.keep_every_epochs = 5
    return apply_variant(c, arg, "gz2_full.py", lr01=lr01)


def lr01(c):
    """Blocks 0-11 trained at lr x 0.1 instead of frozen."""
    c.train.freeze_first_n_layers = 0
