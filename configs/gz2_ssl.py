"""Continued DINOv2 self-supervised pretraining (DINO + iBOT + KoLeo) on GZ2 galaxy images, RGB at patch 14.

    python -m jaxvit.main --config=configs/gz2_ssl.py --workdir=runs/gz2_ssl \
        --config.data.data_dir=/path/to/dinov3-tng50-finetune

Reads <data_dir>/gz2_5class_{train,val}/<class>/ (the classification layout: the SSL loss ignores the labels; the
k-NN monitor on the teacher's [CLS] uses them) and facebook/dinov2-small from the local HF cache. Export the teacher
for fine-tuning with `python -m jaxvit.export --workdir=runs/gz2_ssl --output=runs/gz2_ssl/export`, then
`configs/gz2_lora.py --config.model.pretrained=runs/gz2_ssl/export`.

    python -m jaxvit.main --config=configs/gz2_ssl.py:demo --workdir=runs/gz2_ssl_demo

pretrains a tiny ViT on the synthetic galaxies (no download) for a few minutes on a CPU.
"""
from jaxvit.config import apply_variant, base_config
from jaxvit.config_recipes import dino_optimizer, small_demo


def get_config(arg: str = ""):
    c = base_config("ssl")
    c.model.arch = "dinov2_vits14"
    c.model.pretrained = "facebook/dinov2-small"
    c.model.dtype = "bfloat16"
    c.model.drop_path = 0.1
    s = c.ssl
    s.head_weight_norm = True  # DINOv2's prototypes
    s.epoch_length = 1250
    s.teacher.warmup_temp_epochs = 10
    s.crops.global_size, s.crops.local_size = 224, 98  # 98: a multiple of the patch size 14
    c.train.epochs = 30
    c.train.batch_size = 128
    c.optim.lr = 5e-5  # continued pretraining: about 1/10 of the from-scratch base lr 5e-4
    c.optim.lr_scaling = "sqrt_wrt_1024"
    c.optim.warmup_ratio = 10 / 30
    c.optim.lr_min_ratio = 1e-6 / 5e-5
    dino_optimizer(c)
    c.data.image_size = 224
    c.data.crop_ratio = 1.0
    c.data.num_workers = 8
    c.eval.every_steps = 0  # each (1250-step) epoch
    c.eval.test_split = ""
    c.eval.test_checkpoint = "final"
    # Evaluators (docs/evaluators.md), at each evaluation point: the k-NN monitor on the teacher's [CLS] (the ssl
    # task's metrics, ssl.knn; history columns val_knn_*; picks `best`) and teacher attention maps
    # (attention_val.png in the workdir).
    c.evals.val = dict(type="task")
    c.evals.attention = dict(type="attention", images=4)
    return apply_variant(c, arg, "gz2_ssl.py", demo=demo)


def demo(c):
    """Synthetic galaxies, a tiny ViT from random init (`small_demo`)."""
    c.data.data_dir = "runs/demo_data"
    c.data.demo = "gz2"
    small_demo(c, epochs=10, batch_size=64)
    c.model.overrides.pos_grid = 8
    c.ssl.teacher.warmup_temp_epochs = 2
