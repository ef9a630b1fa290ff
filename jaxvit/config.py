"""The base ConfigDict every config file starts from (every key jaxvit reads, with its default), and the
checks that turn a bad value into one clear line before anything runs."""
from __future__ import annotations

from pathlib import Path

import ml_collections as mlc

from jaxvit import evals, tasks, tta
from jaxvit.demos import DEMO_SETS
from jaxvit.data.pipeline import default_data_config
from jaxvit.errors import ConfigError
from jaxvit.models import PRESETS
from jaxvit.sharding import DEFAULT_MESH


def base_config(task: str = "classification") -> mlc.ConfigDict:
    """Every key with its default; the task's own section (config.<task>) is added when it has one."""
    c = mlc.ConfigDict()
    c.task = task  # a key of jaxvit.tasks.TASKS
    c.seed = 0  # every random stream (init, data order, augmentation, dropout) derives from it

    c.model = mlc.ConfigDict()
    c.model.arch = "dinov2_vits14"  # preset name (jaxvit.models.PRESETS)
    c.model.pretrained = ""  # transformers dir, hub id (downloaded / cached) or original .pth; "" = random init
    c.model.overrides = mlc.ConfigDict()  # ViTConfig fields, e.g. hidden_size=192 for a custom size
    c.model.dtype = "float32"  # compute dtype: float32 | bfloat16 (params stay float32)
    c.model.remat = "none"  # none | full | dots
    c.model.frozen_dtype = "float32"  # storage of frozen weights (e.g. the LoRA base): float32 | bfloat16
    c.model.drop_path = 0.0  # stochastic depth, rising linearly over the blocks to this rate
    c.model.pool = "cls"  # cls | cls_mean
    c.model.head_hidden = ()  # hidden widths of an MLP head; () = one Linear
    c.model.head_dropout = 0.0  # the GZ2 DINOv3 project's --dropout: on the head input (and after hidden layers by default)
    c.model.head_hidden_dropout = ()  # dropout after each hidden layer; () = head_dropout
    c.model.head_norm = "none"  # none | batch: BatchNorm after each hidden Dense (the CIFAR-10 recipe's head)
    c.model.head_act = "gelu"  # gelu | relu

    c.lora = mlc.ConfigDict()
    c.lora.enabled = False  # train LoRA adapters (and the head); the backbone stays frozen
    c.lora.rank = 16
    c.lora.alpha = 32.0  # the adapters are scaled by alpha / rank
    c.lora.dropout = 0.1  # dropout on the adapter input
    c.lora.targets = ("query", "key", "value", "dense")  # regexes over module paths (jaxvit.lora.matches)

    c.train = mlc.ConfigDict()
    c.train.epochs = 10  # length of an epoch-based run
    c.train.steps = 0  # > 0: a step-based run of this many steps (epochs is then ignored)
    c.train.batch_size = 32  # global batch over all devices and hosts
    c.train.grad_accum = 1  # micro-batches per step (same maths, less memory)
    c.train.freeze_first_n_layers = 0  # full fine-tuning: freeze embeddings + the first N blocks
    # Phases: a tuple of dicts with keys name, trainable ("head" | "all" | regexes over variable paths), epochs,
    # steps, patience (evaluations without a better best metric), lr (0: optim.lr), lr_mults (): optim.lr_mults).
    # The last phase runs to the end of training: train.epochs / train.steps, or the sum of all phases' lengths
    # when every phase has epochs or steps.
    c.train.phases = ()
    c.train.freeze_backbone = False  # shorthand for one phase training the head alone (a linear-probe-like run)
    c.train.stage1_epochs = 0  # shorthand for phases head -> all: the head alone for this many epochs first
    c.train.stage1_patience = 0  # ... or until the best metric has not improved for this many evaluations
    c.train.stage2_epochs = 0  # > 0: the second stage (everything) runs this many epochs after stage 1 ends
    c.train.label_smoothing = 0.0  # classification targets: (1 - s) one-hot + s / classes
    c.train.mixup_alpha = 0.0  # MixUp Beta(alpha, alpha); 0 = off
    c.train.cutmix_alpha = 0.0  # CutMix Beta(alpha, alpha); 0 = off (with both on, one is picked per batch)
    c.train.ema_decay = 0.0  # EMA of trainable params, used for evaluation when > 0
    c.train.skip_nonfinite = False  # True: skip a step with a non-finite loss/grad; False: stop the run
    c.train.max_nonfinite_steps = 50  # with skip_nonfinite: stop after this many non-finite steps in a row
    c.train.preempt_signals = ("SIGTERM", "SIGUSR1")  # save a resume point and exit 75 (docs/cluster.md)
    c.train.preempt_check_every = 1  # several processes: agree on a stop every N steps (a tiny all-gather)
    c.train.lock_stale_s = 600  # a workdir lock whose heartbeat is older than this is taken over
    c.train.debug_nans = False  # stop at the first non-finite value, naming the operation and parameters (slow)
    c.train.min_steps = 0  # patience never ends the last phase before this step
    c.train.log_every_steps = 20  # console / TensorBoard period (the only host sync of the metrics)
    c.train.require_accelerator = False  # True: stop when jax runs on the CPU (e.g. a CPU-only jax on a GPU machine)

    c.optim = mlc.ConfigDict()
    c.optim.lr = 1e-4  # base learning rate (the head's)
    c.optim.weight_decay = 0.05  # AdamW, on matrices only (not biases, norms, tokens, LayerScale)
    c.optim.b1 = 0.9  # AdamW betas and epsilon
    c.optim.b2 = 0.999
    c.optim.eps = 1e-8
    c.optim.schedule = "cosine"  # cosine | onecycle | constant
    c.optim.warmup_ratio = 0.1  # linear warmup over this fraction of the steps
    c.optim.warmup_steps = 0  # overrides warmup_ratio when > 0
    c.optim.lr_min_ratio = 0.0  # cosine floor, as a fraction of lr
    c.optim.grad_clip = 1.0  # global-norm clip; 0 = off
    c.optim.clip_per_module = False  # True: clip each module (params/backbone, params/<head>) separately (DINO)
    c.optim.weight_decay_end = -1.0  # >= 0: weight decay follows a cosine from weight_decay to this (DINO 0.4)
    c.optim.lr_scaling = "none"  # none | sqrt_wrt_1024 (lr x 4 sqrt(B/1024), DINO) | linear_wrt_256 (lr x B/256)
    c.optim.layer_decay = 1.0  # block i gets lr * decay ** (depth - i)
    c.optim.lr_mults = ()  # ((regex over variable paths, multiplier), ...): first match wins
    c.optim.backbone_lr = 0.0  # > 0: the backbone's lr itself (not a multiple of optim.lr; before lr_scaling)

    c.data = default_data_config()
    c.data.classes = ()  # class names in label order; () = sorted directory names
    c.data.demo = ""  # write a demo set into data_dir first: gz2 | digits | pasture | cells | sar (jaxvit.demos)

    c.eval = mlc.ConfigDict()
    c.eval.batch_size = 64
    c.eval.every_steps = 0  # evaluate (and save a resume point) every N steps; 0 = at the end of each epoch
    c.eval.at_start = False  # also evaluate before the first step (a history row at step 0)
    c.eval.val_split = "val"  # split evaluated during training ("" = none)
    c.eval.test_split = "test"  # split evaluated at the end ("" = none)
    c.eval.test_checkpoint = "best"  # best | final: the weights the end-of-run test uses
    # Test-time augmentation (jaxvit/tta.py), in validation during training too: outputs averaged over the plain
    # image and these views: hflip, vflip, rot90 (3 rotations), crops5 (4 corners + centre, 7/8 of the side).
    c.eval.tta = ()
    # Evaluators (jaxvit/evals, docs/evaluators.md): evals.<name> = dict(type=task|knn|linear_probe|robustness|
    # attention, every_steps=0, split="", ...), each on its own schedule, logged as <name>_<metric> /
    # <name>/<metric>. Empty: the task's own metrics on eval.val_split, named "val" (and SSL attention maps).
    c.evals = mlc.ConfigDict()

    c.cv = mlc.ConfigDict()  # cross-validation (jaxvit.cv; tasks with supports_cv, e.g. biomass)
    c.cv.folds = ()  # train these folds of the train split, each into WORKDIR/fold_<k>, then cv_results.json; () = off
    c.cv.n_folds = 5  # folds the train split is cut into
    c.cv.fold_csv = ""  # folds from a CSV (fold + image_path / image_id / sample_id); "" = the task's grouping
    c.cv.fold = -1  # the fold this run holds out for validation (set by the driver); -1 = eval.val_split
    c.cv.predict_split = ""  # after the folds: this split predicted by the folds' mean -> WORKDIR/submission.csv

    c.checkpoint = mlc.ConfigDict()
    c.checkpoint.every_steps = 0  # also save a resume point every N steps (0 = only at evaluations)
    c.checkpoint.keep = 3  # newest steps kept (besides the best and final ones)
    c.checkpoint.store_frozen = False  # also store weights frozen for the whole run (else: reloaded from their source)
    c.checkpoint.best_metric = ""  # "<evaluator>/<metric>" picking the best checkpoint (e.g. "val/accuracy",
    # "knn/accuracy"); "" = the task's (of the default evaluator "val")
    c.checkpoint.best_mode = ""  # max | min; "" = the task's
    # More best checkpoints, kept beside the best_metric one: "<evaluator>/<metric>[:max|min]" each (e.g.
    # "val/f1_macro", "val/loss:min"; no suffix: the direction best_mode="" picks), read as
    # --checkpoint=best_<evaluator>_<metric>
    c.checkpoint.also_best = ()
    c.checkpoint.keep_every_epochs = 0  # also keep the checkpoint of every N-th epoch (0 = none), never rotated

    # Device mesh (jaxvit/sharding.py): batch over data*fsdp; params over fsdp (FSDP) and tensor (heads / MLP).
    # data: data parallel (-1 = the devices left over); fsdp: parameter + optimizer-state sharding; tensor:
    # attention heads and MLP hidden units (keep within one host); fsdp_min_size: smaller leaves stay replicated.
    c.mesh = mlc.ConfigDict(DEFAULT_MESH)
    section = tasks.config_section(task)
    if section is not None:
        c[task] = section
    return c


def apply_variant(c: mlc.ConfigDict, arg: str, config_file: str, **variants) -> mlc.ConfigDict:
    """`c` changed by variant `arg` of a config file (`--config=FILE:arg`): variants maps names to functions."""
    if arg:
        if arg not in variants:
            raise ConfigError(f"unknown variant {arg!r} of {config_file}; use '' or one of {', '.join(variants)}")
        variants[arg](c)
    return c


def packaged_configs() -> dict[str, Path]:
    """The configs shipped with jaxvit (the repository's configs/, installed as jaxvit.configs): name -> file."""
    try:
        import jaxvit.configs
        folder = Path(jaxvit.configs.__file__).parent
    except ImportError:  # running from a source tree that is not installed (PYTHONPATH=.)
        folder = Path(__file__).resolve().parents[1] / "configs"
    return {f.stem: f for f in sorted(folder.glob("*.py")) if not f.name.startswith("_")}


def resolve_config_spec(spec: str) -> str:
    """`gz2_lora[:variant]` (a shipped config by name) or `path/to/file.py[:variant]` -> `file path[:variant]`."""
    path, sep, arg = spec.partition(":")
    if Path(path).is_file():
        return spec
    shipped = packaged_configs()
    name = Path(path).stem  # `configs/gz2_lora.py` from another directory: the shipped gz2_lora
    if name not in shipped:
        raise ConfigError(f"config {path!r} is neither a file nor a shipped config; use a path or one of "
                          f"{', '.join(shipped)} (`jaxvit configs` lists them)")
    return f"{shipped[name]}{sep}{arg}"


def load_config_file(spec: str) -> mlc.ConfigDict:
    """`path/to/config.py[:arg]` or `NAME[:arg]` (a shipped config) -> its get_config(arg)."""
    import importlib.util
    path, _, arg = resolve_config_spec(spec).partition(":")
    module_spec = importlib.util.spec_from_file_location("_jaxvit_config", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module.get_config(arg) if arg else module.get_config()


MOVED = {f"data.{k}": f"ssl.jump.{k}" for k in ("load_data", "channels", "label_column", "split_column",
                                                  "intensity", "channel_mode")}  # old key -> new key


def unknown_overrides(cfg: mlc.ConfigDict, keys: list[str]) -> list[str]:
    """Messages for every dotted key that `cfg` does not have, each listing the valid keys at that level."""
    problems = []
    for key in keys:
        if key in MOVED:
            problems.append(f"config key {key!r} is now {MOVED[key]!r} (JUMP's keys belong to the ssl task): "
                            f"pass --config.{MOVED[key]}=...")
            continue
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
        raise ConfigError("\n".join(problems))


# ------------------------------------------------------------------------------------------- validation

_CHOICES = {
    "model.dtype": ("float32", "bfloat16"), "model.frozen_dtype": ("float32", "bfloat16"),
    "model.remat": ("none", "full", "dots"), "model.pool": ("cls", "cls_mean"),
    "model.head_norm": ("none", "batch"), "model.head_act": ("gelu", "relu"),
    "optim.schedule": ("cosine", "onecycle", "constant"),
    "optim.lr_scaling": ("none", "sqrt_wrt_1024", "linear_wrt_256"), "data.preflight": ("auto", "full", "sample", "off"),
    "eval.test_checkpoint": ("best", "final"), "checkpoint.best_mode": ("", "max", "min"),
}
_POSITIVE = ("train.batch_size", "eval.batch_size", "train.grad_accum", "train.log_every_steps", "data.image_size",
             "checkpoint.keep", "lora.rank", "optim.lr", "data.preflight_sample",
             "train.max_nonfinite_steps", "train.preempt_check_every", "train.lock_stale_s")
_NON_NEGATIVE = ("seed", "train.epochs", "train.steps", "train.freeze_first_n_layers", "train.stage1_epochs",
                 "train.stage1_patience", "train.stage2_epochs", "optim.backbone_lr", "train.mixup_alpha", "train.cutmix_alpha", "optim.weight_decay",
                 "optim.warmup_steps", "optim.grad_clip", "model.drop_path", "data.num_workers", "data.prefetch",
                 "eval.every_steps", "checkpoint.every_steps", "checkpoint.keep_every_epochs", "train.min_steps",
                 "data.train_limit")
_UNIT = ("train.label_smoothing", "train.ema_decay", "optim.warmup_ratio", "optim.lr_min_ratio", "lora.dropout",
         "model.head_dropout", "data.aug.erasing_prob", "data.aug.color_jitter_prob", "data.val_fraction")  # in [0, 1)
_PHASE_KEYS = ("name", "trainable", "epochs", "steps", "patience", "lr", "lr_mults")


def _get(cfg: mlc.ConfigDict, key: str):
    node = cfg
    for part in key.split("."):
        node = node[part]
    return node


def problems(cfg: mlc.ConfigDict) -> list[str]:
    """One line per bad value: the key, the value, what is allowed."""
    out = []
    if cfg.task not in tasks.TASKS:
        out.append(f"task={cfg.task!r} is not a jaxvit task; use one of {', '.join(tasks.TASKS)}")
    for key, allowed in _CHOICES.items():
        if _get(cfg, key) not in allowed:
            out.append(f"{key}={_get(cfg, key)!r}: use one of {', '.join(repr(a) for a in allowed)}")
    for key in _POSITIVE:
        if not _get(cfg, key) > 0:
            out.append(f"{key}={_get(cfg, key)!r}: must be positive")
    for key in _NON_NEGATIVE:
        if _get(cfg, key) < 0:
            out.append(f"{key}={_get(cfg, key)!r}: must be >= 0")
    for key in _UNIT:
        if not 0 <= _get(cfg, key) < 1:
            out.append(f"{key}={_get(cfg, key)!r}: must lie in [0, 1)")
    if not (cfg.train.epochs or cfg.train.steps):
        out.append("train.epochs and train.steps are both 0: set one of them")
    if cfg.model.head_hidden_dropout and len(cfg.model.head_hidden_dropout) != len(cfg.model.head_hidden):
        out.append(f"model.head_hidden_dropout={tuple(cfg.model.head_hidden_dropout)}: one rate per hidden layer "
                   f"of model.head_hidden={tuple(cfg.model.head_hidden)}")
    if not 0 < cfg.data.crop_ratio <= 1:
        out.append(f"data.crop_ratio={cfg.data.crop_ratio!r}: must lie in (0, 1]")
    lo, hi = cfg.data.aug.crop_scale
    if not 0 < lo <= hi <= 1:
        out.append(f"data.aug.crop_scale={tuple(cfg.data.aug.crop_scale)!r}: need 0 < low <= high <= 1")
    if not 0 < cfg.optim.layer_decay <= 1:
        out.append(f"optim.layer_decay={cfg.optim.layer_decay!r}: must lie in (0, 1]")
    if cfg.data.val_fraction and cfg.eval.val_split != "val":
        out.append(f"data.val_fraction={cfg.data.val_fraction} holds out the split 'val', but eval.val_split="
                   f"{cfg.eval.val_split!r}: set eval.val_split='val'")
    if not cfg.data.data_dir and not cfg.data.source.startswith(("tfds:", "hf:")):
        out.append("data.data_dir is empty: pass --config.data.data_dir=/path/to/your/data")
    if cfg.cv.folds or cfg.cv.fold >= 0:
        if not tasks.task_class(cfg.task).supports_cv:
            out.append(f"cv.folds={tuple(cfg.cv.folds)}: the {cfg.task} task has no cross-validation folds")
        bad = [f for f in (*cfg.cv.folds, cfg.cv.fold) if f >= cfg.cv.n_folds]
        if bad:
            out.append(f"cv.folds={tuple(cfg.cv.folds)}: fold {bad[0]} is not below cv.n_folds={cfg.cv.n_folds}")
    if cfg.data.demo not in DEMO_SETS:
        out.append(f"data.demo={cfg.data.demo!r}: use one of {', '.join(repr(d) for d in DEMO_SETS)}")
    if not cfg.model.pretrained:
        if cfg.model.arch not in PRESETS:
            out.append(f"model.arch={cfg.model.arch!r} is not a preset; use one of {', '.join(sorted(PRESETS))}")
        else:
            patch = cfg.model.overrides.get("patch_size", PRESETS[cfg.model.arch].patch_size)
            if cfg.data.image_size % patch:
                out.append(f"data.image_size={cfg.data.image_size} is not a multiple of the patch size {patch}")
    if bad_views := tta.problem(cfg.eval.tta):
        out.append(bad_views)
    if not cfg.eval.val_split and cfg.eval.test_checkpoint == "best":
        out.append("eval.val_split is empty, so no best checkpoint exists: set eval.test_checkpoint='final'")
    if cfg.task in tasks.TASKS:
        out += evals.problems(cfg)
    others = [k for k in ("phases", "stage1_epochs", "stage1_patience", "stage2_epochs") if cfg.train[k]]
    if cfg.train.stage2_epochs and cfg.train.phases:
        out.append("train.stage2_epochs is a shorthand of the two-stage run; with train.phases give the last phase "
                   "its epochs instead")
    if cfg.train.freeze_backbone and others:
        out.append(f"train.freeze_backbone trains the head alone; it cannot be combined with train.{others[0]}")
    for i, phase in enumerate(cfg.train.phases):
        phase = dict(phase)
        unknown = sorted(set(phase) - set(_PHASE_KEYS))
        if unknown or "name" not in phase:
            out.append(f"train.phases[{i}]={phase!r}: needs a name; allowed keys {', '.join(_PHASE_KEYS)}")
        if any(phase.get(k, 0) < 0 for k in ("epochs", "steps", "patience", "lr")):
            out.append(f"train.phases[{i}]: epochs, steps, patience and lr must be >= 0")
        last = i == len(cfg.train.phases) - 1
        if not last and not (phase.get("epochs") or phase.get("steps") or phase.get("patience")):
            out.append(f"train.phases[{i}] ({phase.get('name')!r}) never ends: give it epochs, steps or patience")
    out += [f"{old}: the key is now {new} (JUMP's keys belong to the ssl task)" for old, new in MOVED.items()
            if old.split(".")[1] in cfg.data]
    if cfg.task in tasks.TASKS:
        out += tasks.task_class(cfg.task).config_problems(cfg)
    return out


def validate(cfg: mlc.ConfigDict) -> None:
    """Raise ConfigError listing every bad value (one line each)."""
    found = problems(cfg)
    if found:
        raise ConfigError("\n".join(found))
