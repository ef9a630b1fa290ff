"""Pasture biomass (the CSIRO Image2Biomass competition): five dry masses from a top-down photo, the CSIRO biomass
project's defaults (its experiment-priority guide) on DINOv3 ViT-B/16 (docs/biomass.md).

    python -m jaxvit.main --config=configs/biomass.py --workdir=runs/biomass \
        --config.data.data_dir=/data/csiro-biomass     # the Kaggle download: train.csv, test.csv, train/, test/

As the project's recipe: 5 folds of train.csv (stratified over State x Season x Species, or the project's fold CSV
with --config.cv.fold_csv=data/trainfold_group_location.csv), each trained in two stages (heads at 2e-4 until the
validation weighted R^2 has not improved for 10 evaluations or 30 epochs, then 20 epochs of everything with the
backbone at 1e-5), SmoothL1 with the metric's target weights, Dead derived (Total - GDM), Clover trained, flips /
quarter turns / colour jitter / CLAHE / motion blur, Depth Anything V2 Small depth features and depth attention,
global batch 16. Then WORKDIR/cv_results.json (CV weighted R^2), oof_predictions.csv and submission.csv (the
unlabelled test.csv predicted by the mean of the 5 folds' best checkpoints, in the competition's format).
The project expects CV weighted R^2 0.60-0.65 for this baseline. Variants: `:planthydra` (log1p + cosine +
compositional loss), `:aux` (+ height and NDVI heads), `:best` (the project's phase-6 combination, as far as jaxvit
implements it), `:demo` (a synthetic pasture set in the Kaggle layout rendered into runs/biomass_demo_data, a small
ViT from scratch, one fold).
"""
from jaxvit.config import apply_variant, base_config


def get_config(arg: str = ""):
    c = base_config("biomass")
    c.model.arch = "dinov3_vitb16"
    c.model.pretrained = "facebook/dinov3-vitb16-pretrain-lvd1689m"
    c.model.head_hidden = (512,)
    c.model.head_dropout = 0.1
    c.train.batch_size = 16
    c.train.epochs = 50
    c.train.stage1_epochs, c.train.stage1_patience, c.train.stage2_epochs = 30, 10, 20
    c.optim.lr = 2e-4  # --lr (the heads)
    c.optim.backbone_lr = 1e-5  # --backbone-lr (stage 2)
    c.cv.folds, c.cv.n_folds = (0, 1, 2, 3, 4), 5  # --folds, --n-folds
    c.cv.predict_split = "test"  # the unlabelled test.csv -> submission.csv (the folds' mean)
    c.eval.val_split, c.eval.test_split = "val", ""  # val = the held-out fold; test.csv has no labels
    c.optim.warmup_ratio = 0.05
    c.data.image_size = 448
    c.data.aug.hflip, c.data.aug.vflip, c.data.aug.rot90 = True, True, True
    c.data.aug.color_jitter = (0.2, 0.2, 0.2, 0.02)
    c.biomass.clahe_prob, c.biomass.motion_blur_prob = 0.3, 0.2  # the project's strong augmentation
    c.biomass.depth_model = "depth-anything/Depth-Anything-V2-Small-hf"  # depth features + attention (seed: ON)
    c.eval.batch_size = 32
    c.data.cache_dir = "~/.cache/jaxvit"  # each photo decoded and resized once (a 448 px view: 0.6 MB)
    return apply_variant(c, arg, "biomass.py", planthydra=planthydra, aux=aux, best=best, demo=demo)


def planthydra(c):
    c.biomass.loss = "planthydra"


def aux(c):
    planthydra(c)
    c.biomass.height_weight = c.biomass.ndvi_weight = 0.2


def best(c):
    aux(c)
    c.biomass.mass_balance_weight = 0.1
    c.train.stage1_epochs, c.train.stage2_epochs, c.train.epochs = 15, 45, 60
    c.optim.layer_decay = 0.8
    c.biomass.perspective_jitter = 0.03
    c.biomass.halves, c.biomass.cross_view_weight = True, 0.1


def demo(c):
    """Synthetic pastures (no download), a small ViT from random init trained whole; aux heads on."""
    c.data.demo, c.data.data_dir = "pasture", "runs/biomass_demo_data"
    c.data.image_size = 64
    c.data.num_workers = 2
    c.data.cache_dir = ""  # the synthetic photos are small: decoded each time
    c.model.arch, c.model.pretrained = "dinov3_vits16", ""
    c.biomass.depth_model = ""  # no Depth Anything weights offline; the synthetic photos have no relief anyway
    c.model.overrides.update(dict(patch_size=8, hidden_size=96, depth=4, num_heads=3, mlp_hidden=288))
    c.model.pool = "cls_mean"
    c.model.head_dropout = 0.0
    c.biomass.height_weight = c.biomass.ndvi_weight = 0.2
    c.train.stage1_epochs, c.train.stage1_patience, c.train.stage2_epochs, c.train.epochs = 0, 0, 0, 40
    c.cv.folds, c.cv.n_folds = (0,), 4  # one fold of four (80 validation photos); submission.csv from it
    c.train.batch_size = 32
    c.optim.lr, c.optim.lr_mults, c.optim.backbone_lr = 1e-3, (), 0.0
    c.eval.batch_size = 64
