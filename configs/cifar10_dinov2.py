"""CIFAR-10 with DINOv2 ViT-B/14 at 224 px, the DINOv2 CIFAR-10 project's two-phase recipe.

    python -m jaxvit.main --config=configs/cifar10_dinov2.py --workdir=runs/cifar10 \
        --config.data.tfds_data_dir=/path/to/tensorflow_datasets

Reads tfds's cifar10 with tfds.data_source (no TensorFlow at run time). Prepare it once where there is internet:
`pip install tensorflow tensorflow-datasets && tfds build cifar10 --file_format=array_record --data_dir=D`, or put
cifar-10-binary.tar.gz in a directory and pass --config.data.manual_dir=DIR (jaxvit builds it on the first run;
tfds encodes the images with TensorFlow there). facebook/dinov2-base must be in the local HF cache (or pass
--config.model.pretrained=/path). Validation and test are the two halves of CIFAR-10's test set (5,000 each), as
the project's error analysis (30 errors in 5,000) implies; the project expects 96.5-97.0% val accuracy after phase 1 and
99.3-99.6% after phase 2 (99.40% test).

    python -m jaxvit.main --config=configs/cifar10_dinov2.py:demo --workdir=runs/cifar10_demo

runs the same recipe on real data shipped with scikit-learn (1,797 handwritten 8x8 digits, upscaled 2x as the project
upscales 32 -> 224) through the npz source, with a small ViT from random initialisation: see docs/cifar10.md for time
and accuracy on a 2-core CPU.
"""
from jaxvit.config import apply_variant, base_config


def get_config(arg: str = ""):
    c = base_config()
    c.model.arch = "dinov2_vitb14"
    c.model.pretrained = "facebook/dinov2-base"
    c.model.dtype = "bfloat16"  # the project trains in fp16 autocast
    # Linear(768,1024)-BN-ReLU-Drop(.5)-Linear(1024,512)-BN-ReLU-Drop(.5)-Linear(512,256)-BN-ReLU-Drop(.25)-Linear
    c.model.head_hidden = (1024, 512, 256)
    c.model.head_norm, c.model.head_act = "batch", "relu"
    c.model.head_dropout = 0.0  # no dropout on the CLS features themselves
    c.model.head_hidden_dropout = (0.5, 0.5, 0.25)

    c.data.source = "tfds:cifar10"
    c.data.image_size = 224  # 32 px upscaled, as the project does
    c.data.crop_ratio = 1.0  # eval: the whole image resized, no centre crop
    c.data.num_workers = 8
    c.data.aug.crop_scale = (0.8, 1.0)
    c.data.aug.vflip, c.data.aug.rot90, c.data.aug.rotate_degrees = False, False, 0.0  # natural images: h-flip only
    c.data.aug.color_jitter = (0.2, 0.2, 0.2, 0.0)
    c.data.aug.erasing_prob = 0.25
    c.eval.val_split, c.eval.test_split = "test[:5000]", "test[5000:]"

    c.train.batch_size = 64
    # Phase 1: the head alone for 10 epochs; phase 2: everything for the remaining 40, the backbone at 1e-6.
    c.train.stage1_epochs, c.train.epochs = 10, 50
    c.optim.lr = 1e-4
    c.optim.lr_mults = ((r"^params/backbone/", 0.01),)
    c.train.label_smoothing = 0.1
    c.train.mixup_alpha, c.train.cutmix_alpha = 0.2, 1.0
    c.train.ema_decay = 0.9999
    c.optim.schedule = "onecycle"
    c.optim.grad_clip = 1.0
    c.optim.weight_decay = 0.05
    c.eval.batch_size = 128
    c.evals.val = dict(type="task")  # accuracy, F1 and loss on eval.val_split each epoch (picks `best`)
    return apply_variant(c, arg, "cifar10_dinov2.py", demo=demo, probes=probes)


def probes(c):
    """`:probes`: also, during training, the CIFAR-10 project's embedding study and corruption table (off by
    default: each adds minutes per evaluation at ViT-B size): k-NN and a linear probe on the backbone's frozen
    CLS + mean patch features every 5 epochs, accuracy under corruptions every 10 (the end of phase 1, ...)."""
    epoch = 50000 // c.train.batch_size  # steps of one epoch of CIFAR-10's 50,000 training images
    every = 5 * epoch
    c.evals.knn = dict(type="knn", every_steps=every, k=20, pool="cls_mean", max_train=10000)
    c.evals.linear = dict(type="linear_probe", every_steps=every, pool="cls_mean", max_train=10000)
    c.evals.robustness = dict(type="robustness", every_steps=10 * epoch,
                              severities=(1, 3, 5))


def demo(c):
    """scikit-learn's digits (real, no download) as npz, a small ViT from random init, the same two phases."""
    c.data.demo, c.data.source, c.data.data_dir = "digits", "npz", "runs/cifar10_demo_data"
    c.eval.val_split, c.eval.test_split = "val", "test"
    c.data.image_size = 16  # 8 px digits upscaled 2x
    c.data.num_workers = 2
    c.data.aug.crop_scale = (0.7, 1.0)
    c.data.aug.hflip = False  # digits are not mirror-symmetric
    c.model.arch, c.model.pretrained, c.model.dtype = "dinov2_vits14", "", "float32"
    c.model.overrides.update(dict(patch_size=4, hidden_size=96, depth=4, num_heads=3, mlp_hidden=288, pos_grid=4))
    c.model.pool = "cls_mean"  # a randomly initialised CLS token carries little of the image at first
    c.model.head_hidden = (256, 128, 64)
    c.train.batch_size = 64
    # A random backbone has nothing to preserve: phase 2 trains it at the head's rate (the recipe's 1e-6 is for
    # pretrained weights), and the EMA horizon fits ~400 steps instead of ~39k.
    c.train.stage1_epochs, c.train.epochs = 5, 60
    c.optim.lr, c.optim.lr_mults = 2e-3, ()
    c.train.ema_decay = 0.99
    c.eval.batch_size = 128
