"""The base ConfigDict every config file starts from: every key jaxvit reads, with its default."""
from __future__ import annotations

import ml_collections as mlc

from jaxvit.data.pipeline import default_data_config


def base_config() -> mlc.ConfigDict:
    c = mlc.ConfigDict()
    c.seed = 0

    c.model = mlc.ConfigDict()
    c.model.arch = "dinov2_vits14"  # preset name (jaxvit.models.PRESETS)
    c.model.pretrained = ""  # transformers dir, cached hub id or original .pth; "" = random init
    c.model.overrides = mlc.ConfigDict()  # ViTConfig fields, e.g. hidden_size=192 for a custom size
    c.model.dtype = "float32"  # compute dtype: float32 | bfloat16 (params stay float32)
    c.model.remat = "none"  # none | full | dots
    c.model.frozen_dtype = "float32"  # storage of frozen weights (e.g. the LoRA base): float32 | bfloat16
    c.model.drop_path = 0.0
    c.model.pool = "cls"  # cls | cls_mean
    c.model.head_hidden = ()
    c.model.head_dropout = 0.0  # the guide's --dropout

    c.lora = mlc.ConfigDict()
    c.lora.enabled = False
    c.lora.rank = 16
    c.lora.alpha = 32.0
    c.lora.dropout = 0.1
    c.lora.targets = ("query", "key", "value", "dense")  # regexes over module paths (jaxvit.lora.matches)

    c.train = mlc.ConfigDict()
    c.train.epochs = 10
    c.train.batch_size = 32  # global batch over all devices and hosts
    c.train.grad_accum = 1  # micro-batches per step (same maths, less memory)
    c.train.freeze_first_n_layers = 0  # full fine-tuning: freeze embeddings + the first N blocks
    c.train.stage1_epochs = 0  # two-stage: train the head only for this many epochs first (0 = off)
    c.train.stage1_patience = 0  # ... or until val accuracy stops improving for this many epochs (0 = off)
    c.train.label_smoothing = 0.0
    c.train.mixup_alpha = 0.0  # MixUp Beta(alpha, alpha); 0 = off
    c.train.cutmix_alpha = 0.0  # CutMix Beta(alpha, alpha); 0 = off (with both on, one is picked per batch)
    c.train.ema_decay = 0.0  # EMA of trainable params, used for evaluation when > 0
    c.train.skip_nonfinite = False  # True: skip a step with a non-finite loss/grad; False: stop the run
    c.train.log_every_steps = 20
    c.train.max_steps = 0  # stop early after this many steps (debugging); 0 = run all epochs

    c.optim = mlc.ConfigDict()
    c.optim.lr = 1e-4  # base learning rate (the head's)
    c.optim.weight_decay = 0.05
    c.optim.b1 = 0.9
    c.optim.b2 = 0.999
    c.optim.eps = 1e-8
    c.optim.schedule = "cosine"  # cosine | onecycle | constant
    c.optim.warmup_ratio = 0.1
    c.optim.warmup_steps = 0  # overrides warmup_ratio when > 0
    c.optim.lr_min_ratio = 0.0  # cosine floor, as a fraction of lr
    c.optim.grad_clip = 1.0  # global-norm clip; 0 = off
    c.optim.layer_decay = 1.0  # block i gets lr * decay ** (depth - i)
    c.optim.lr_mults = ()  # ((regex over variable paths, multiplier), ...): first match wins

    c.data = default_data_config()
    c.data.classes = ()  # class names in label order; () = sorted directory names
    c.data.synthetic = False  # render the synthetic GZ2 set into data_dir first (the demo)

    c.eval = mlc.ConfigDict()
    c.eval.batch_size = 64
    c.eval.test_checkpoint = "best_acc"  # which checkpoint the end-of-run test evaluation uses

    c.checkpoint = mlc.ConfigDict()
    c.checkpoint.every_epochs = 1
    c.checkpoint.every_steps = 0  # also save mid-epoch every N steps (0 = off)
    c.checkpoint.keep = 3  # periodic checkpoints kept

    # Device mesh (jaxvit/sharding.py): batch over data*fsdp; params over fsdp (FSDP) and tensor (heads / MLP).
    c.mesh = mlc.ConfigDict()
    c.mesh.data = -1  # data parallel; -1 = the devices left over
    c.mesh.fsdp = 1  # parameter + optimizer-state sharding
    c.mesh.tensor = 1  # tensor parallel: attention heads and MLP hidden units (keep within one host)
    c.mesh.fsdp_min_size = 2 ** 18  # leaves with fewer elements stay replicated under FSDP
    return c


def load_config_file(spec: str) -> mlc.ConfigDict:
    """`path/to/config.py[:arg]` -> its get_config(arg)."""
    import importlib.util
    path, _, arg = spec.partition(":")
    module_spec = importlib.util.spec_from_file_location("_jaxvit_config", path)
    if module_spec is None:
        raise FileNotFoundError(f"config file {path!r} not found")
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module.get_config(arg) if arg else module.get_config()


def unknown_overrides(cfg: mlc.ConfigDict, keys: list[str]) -> list[str]:
    """Messages for every dotted key that `cfg` does not have, each listing the valid keys at that level."""
    problems = []
    for key in keys:
        node, parts = cfg, key.split(".")
        for depth, part in enumerate(parts):
            if isinstance(node, mlc.ConfigDict) and part in node:
                node = node[part]
                continue
            where = ".".join(parts[:depth]) or "the top level"
            valid = sorted(node.keys()) if isinstance(node, mlc.ConfigDict) else []
            problems.append(f"unknown config key {key!r}: {part!r} is not under {where}; valid keys there: "
                            f"{', '.join(valid) if valid else '(none: ' + where + ' is a value)'}")
            break
    return problems


def check_overrides(argv: list[str]) -> None:
    """Exit with a clear message when --config.KEY=... names a key the config does not have."""
    spec = next((a.split("=", 1)[1] for a in argv if a.startswith("--config=")), None)
    keys = [a[len("--config."):].split("=", 1)[0] for a in argv if a.startswith("--config.")]
    if spec is None or not keys:
        return
    problems = unknown_overrides(load_config_file(spec), keys)
    if problems:
        raise SystemExit("\n".join(problems))
