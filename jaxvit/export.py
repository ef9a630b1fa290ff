"""Export a trained run to PyTorch: a transformers backbone, the head in safetensors, and for LoRA runs the
base model plus a PEFT adapter.

    python -m jaxvit.export --workdir=W --output=D [--checkpoint=best] [--no_check]

Without --checkpoint the task's choice (`Task.default_export_checkpoint`, logged): best, or final where "best" means
little (a self-supervised run exports its final teacher, as the official training does).

    D/model/                 fine-tuned backbone, LoRA merged: transformers.AutoModel.from_pretrained(D/model)
    D/head.safetensors       the head as torch Linear weights: `weight` (out, in) and `bias` for a linear head,
                             the keys of nn.Sequential(Linear, [BatchNorm1d,] GELU() | ReLU(), ..., Linear) when
                             it has hidden layers (running statistics included)
    D/head_config.json       task, pool, hidden, num_outputs, classes (a classifier's), in_features, preprocessing
    D/base_model/            (LoRA runs) the frozen base backbone
    D/peft_adapter/          (LoRA runs) adapter_config.json + adapter_model.safetensors:
                             peft.PeftModel.from_pretrained(AutoModel.from_pretrained(D/base_model), D/peft_adapter)

    D/classifier/            (classifier runs with a linear head on DINOv2) a transformers image classifier +
                             its image processor: transformers.pipeline(..., model="D/classifier")

Tasks with other models write their own files (`Task.export`, described in the task's module) or refuse in one line.

The export then reloads itself with torch/transformers/PEFT and prints the largest difference from the Flax
model on a batch (`load_torch_classifier` rebuilds backbone + head in PyTorch).
"""
from __future__ import annotations

import json
import logging
import sys
from pathlib import Path
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from jaxvit import cli, lora, run_io, tasks
from jaxvit.errors import UserError, exit_on_user_error
from jaxvit.models import ViTConfig, save_pretrained

log = logging.getLogger("jaxvit")

PEFT_PREFIX = "base_model.model."
# jaxvit Linear name -> transformers (5.x, in-memory) module name, which is what PEFT adapters address.
_ATTENTION = {"query": "attention.q_proj", "key": "attention.k_proj", "value": "attention.v_proj",
              "dense": "attention.o_proj"}
_MLP = {"dinov2": {"fc1": "mlp.fc1", "fc2": "mlp.fc2"}, "dinov3": {"fc1": "mlp.up_proj", "fc2": "mlp.down_proj"}}


def torch_module_name(cfg: ViTConfig, path: Sequence[str]) -> str:
    """e.g. ("encoder", "layer_3", "attention", "query") -> "encoder.layer.3.attention.q_proj" (DINOv2) or
    "model.layer.3.attention.q_proj" (DINOv3)."""
    if len(path) != 4 or path[0] != "encoder" or not path[1].startswith("layer_"):
        raise ValueError(f"{'/'.join(path)} is not a Linear inside an encoder block")
    block = f"{'encoder' if cfg.family == 'dinov2' else 'model'}.layer.{path[1][len('layer_'):]}"
    leaf = path[3]
    name = _ATTENTION.get(leaf) or _MLP[cfg.family].get(leaf) or (
        f"mlp.{leaf}" if leaf in ("gate_proj", "up_proj", "down_proj") else None)
    if name is None:
        raise ValueError(f"no transformers module for jaxvit Linear {'/'.join(path)}")
    return f"{block}.{name}"


def _num(x: float) -> float | int:
    return int(x) if float(x).is_integer() else float(x)


# ------------------------------------------------------------------------------------------- writing

def head_state_dict(head: dict) -> dict[str, np.ndarray]:
    """torch-layout weights of the head (`head` = {collection: tree} of the head, e.g. params and batch_stats):
    a bare Linear's keys, or those of nn.Sequential(Linear, [BatchNorm1d,] act, ..., Linear) (see
    `load_torch_head`; dropout is the identity in eval mode and takes no index)."""
    params, stats = head["params"], head.get("batch_stats", {})
    n_hidden = sum(1 for k in params if k.startswith("hidden_"))
    stride = 3 if stats else 2  # Linear, [BatchNorm1d,] activation
    sd = {}
    for i in range(n_hidden + 1):
        layer = params[f"hidden_{i}" if i < n_hidden else "out"]
        prefix = f"{stride * i}." if n_hidden else ""
        sd[prefix + "weight"] = np.ascontiguousarray(np.asarray(layer["kernel"], np.float32).T)
        sd[prefix + "bias"] = np.asarray(layer["bias"], np.float32)
        if stats and i < n_hidden:
            bn, norm = f"{stride * i + 1}.", params[f"norm_{i}"]
            sd |= {bn + "weight": np.asarray(norm["scale"], np.float32), bn + "bias": np.asarray(norm["bias"], np.float32),
                   bn + "running_mean": np.asarray(stats[f"norm_{i}"]["mean"], np.float32),
                   bn + "running_var": np.asarray(stats[f"norm_{i}"]["var"], np.float32),
                   bn + "num_batches_tracked": np.zeros((), np.int64)}
    return sd


def write_head(out: Path, run: run_io.Run) -> dict:
    from safetensors.numpy import save_file
    model, data = run.model, run.cfg.data
    head = {col: tree["head"] for col, tree in run.variables.items() if "head" in tree}
    save_file(head_state_dict(head), str(out / "head.safetensors"), metadata={"format": "pt"})
    hidden = [int(h) for h in model.head_hidden]
    config = dict(
        task=run.cfg.task, pool=model.pool, hidden=hidden, num_outputs=model.num_outputs,
        classes=getattr(run.task, "classes", None),
        in_features=model.backbone.hidden_size * (2 if model.pool == "cls_mean" else 1), activation=model.head_act,
        norm=model.head_norm,
        num_prefix_tokens=model.backbone.num_prefix,
        torch_module=("nn.Sequential(Linear, " + ("BatchNorm1d, " if model.head_norm == "batch" else "")
                      + f"{model.head_act}, ..., Linear)") if hidden else "nn.Linear",
        pooling={"cls": "pooler_output", "cls_mean": "cat(pooler_output, last_hidden_state[:, num_prefix_tokens:]"
                 ".mean(1))"}[model.pool],
        preprocessing=dict(image_size=data.image_size, crop_ratio=data.crop_ratio, mean=list(data.mean),
                           std=list(data.std), resize="shorter side to round(image_size / crop_ratio), bicubic; "
                                                      "centre crop; x / 255; (x - mean) / std"),
        source=run_io.describe(run))
    (out / "head_config.json").write_text(json.dumps(config, indent=2) + "\n")
    return config


def peft_adapter(cfg: ViTConfig, backbone_params: dict, adapters: dict, dropout: float,
                 base_path: str) -> tuple[dict, dict[str, np.ndarray]]:
    """(adapter_config.json contents, adapter_model.safetensors tensors) in PEFT's LoRA format."""
    flat = traverse_util.flatten_dict(adapters)
    adapted = sorted(p[:-1] for p in flat if p[-1] == "lora_a")
    tensors, names, ranks = {}, [], set()
    for path in adapted:
        a, b = np.asarray(flat[path + ("lora_a",)], np.float32), np.asarray(flat[path + ("lora_b",)], np.float32)
        name = torch_module_name(cfg, path)
        names.append(name)
        ranks.add(a.shape[1])
        tensors[f"{PEFT_PREFIX}{name}.lora_A.weight"] = np.ascontiguousarray(a.T)  # (r, in)
        tensors[f"{PEFT_PREFIX}{name}.lora_B.weight"] = np.ascontiguousarray(b.T)  # (out, r)
    if len(ranks) != 1:
        raise ValueError(f"adapters of several ranks {sorted(ranks)}; jaxvit trains one rank")
    # Short module names when they select exactly the adapted modules (PEFT matches a name or a ".name" suffix).
    every = [torch_module_name(cfg, p) for p in lora.module_paths(backbone_params) if p[0] == "encoder"]
    leaves = sorted({n.rsplit(".", 1)[-1] for n in names})
    targets = leaves if sorted(n for n in every if n.rsplit(".", 1)[-1] in leaves) == sorted(names) else names
    config = dict(peft_type="LORA", task_type=None, r=ranks.pop(), lora_alpha=_num(cfg.lora_alpha),
                  lora_dropout=float(dropout), target_modules=targets, bias="none", fan_in_fan_out=False,
                  inference_mode=True, init_lora_weights=True, use_rslora=False, use_dora=False,
                  modules_to_save=None, rank_pattern={}, alpha_pattern={}, layers_to_transform=None,
                  layers_pattern=None, base_model_name_or_path=base_path, revision=None)
    return config, tensors


def check_exportable(task: str) -> None:
    """A one-line refusal, before anything is loaded, for a task without a PyTorch export."""
    refusal = tasks.task_class(task).export_refusal
    if refusal:
        raise UserError(f"jaxvit export: the {task} task has no PyTorch export: {refusal}")


def export_run(run: run_io.Run, output: str | Path) -> Path:
    """Write the export files of `run` (see the module docstring) to `output`."""
    from safetensors.numpy import save_file
    check_exportable(run.cfg.task)
    out = Path(output)
    out.mkdir(parents=True, exist_ok=True)
    own = run.task.export(run, out)
    if own is not None:
        return own
    vit_cfg = run.model.backbone
    save_pretrained(vit_cfg, run.backbone_params(), out / "model")
    write_head(out, run)
    run.task.export_extra(run, out)  # e.g. a classifier in transformers format
    if "lora" in run.variables:
        base = run.variables["params"]["backbone"]
        save_pretrained(vit_cfg, base, out / "base_model")
        config, tensors = peft_adapter(vit_cfg, base, run.variables["lora"]["backbone"], run.cfg.lora.dropout,
                                       str((out / "base_model").resolve()))
        (out / "peft_adapter").mkdir(exist_ok=True)
        (out / "peft_adapter" / "adapter_config.json").write_text(json.dumps(config, indent=2) + "\n")
        save_file(tensors, str(out / "peft_adapter" / "adapter_model.safetensors"), metadata={"format": "pt"})
    log.info("exported %s (%s) to %s", run.workdir, run.checkpoint, out)
    return out


# ------------------------------------------------------------------------------------------- reading back

def load_torch_head(export_dir: str | Path):
    """The head as a torch module (eval mode) from head.safetensors + head_config.json."""
    import torch
    from safetensors.torch import load_file
    d = Path(export_dir)
    cfg = json.loads((d / "head_config.json").read_text())
    widths = [cfg["in_features"], *cfg["hidden"], cfg["num_outputs"]]
    act = {"gelu": torch.nn.GELU, "relu": torch.nn.ReLU}[cfg.get("activation", "gelu")]
    layers: list[Any] = []
    for i, (n_in, n_out) in enumerate(zip(widths[:-1], widths[1:])):
        layers.append(torch.nn.Linear(n_in, n_out))
        if i < len(widths) - 2:
            layers += ([torch.nn.BatchNorm1d(n_out)] if cfg.get("norm") == "batch" else []) + [act()]
    head = layers[0] if len(layers) == 1 else torch.nn.Sequential(*layers)
    head.load_state_dict(load_file(str(d / "head.safetensors")))
    return head.eval()


def load_torch_classifier(export_dir: str | Path, backbone_dir: str | Path | None = None):
    """pixel_values (N, 3, H, W) -> logits, in PyTorch: transformers backbone (default D/model) + head."""
    import torch
    from transformers import AutoModel
    d = Path(export_dir)
    cfg = json.loads((d / "head_config.json").read_text())
    backbone = AutoModel.from_pretrained(backbone_dir or d / "model").eval()
    head = load_torch_head(d)

    @torch.no_grad()
    def classify(pixel_values, backbone=backbone):
        out = backbone(pixel_values=pixel_values)
        feats = out.pooler_output
        if cfg["pool"] == "cls_mean":
            feats = torch.cat([feats, out.last_hidden_state[:, cfg["num_prefix_tokens"]:].mean(1)], dim=-1)
        return head(feats)
    classify.backbone = backbone
    return classify


def check_export(run: run_io.Run, export_dir: str | Path, n: int = 4, seed: int = 0) -> dict[str, float]:
    """Largest differences between the export reloaded in PyTorch and the Flax model on n random images: head
    outputs (D/model + head vs jaxvit, relative to their largest magnitude) and, for LoRA runs, PEFT base +
    adapter vs D/model."""
    import torch
    from transformers import AutoModel
    d = Path(export_dir)
    size = run.cfg.data.image_size
    x = np.random.default_rng(seed).standard_normal((n, size, size, 3)).astype(np.float32)
    own = run.task.check_export(run, d, x)
    if own is not None:
        return own
    with jax.default_matmul_precision("highest"):
        want = np.asarray(run.model.apply(run.variables, jnp.asarray(x)))
    pixels = torch.from_numpy(x).permute(0, 3, 1, 2)
    classify = load_torch_classifier(d)
    got = classify(pixels).numpy()
    diffs = {"outputs_rel_diff": float(np.abs(got - want).max() / np.abs(want).max())}
    if (d / "peft_adapter").exists():
        from peft import PeftModel
        with torch.no_grad():
            merged = classify.backbone(pixel_values=pixels).last_hidden_state.numpy()
            base = AutoModel.from_pretrained(d / "base_model").eval()
            plain = base(pixel_values=pixels).last_hidden_state.numpy()
            peft = PeftModel.from_pretrained(base, d / "peft_adapter").eval()
            adapted = peft(pixel_values=pixels).last_hidden_state.numpy()
        scale = np.abs(merged).max()
        diffs["peft_vs_model_rel_diff"] = float(np.abs(adapted - merged).max() / scale)
        diffs["base_vs_model_rel_diff"] = float(np.abs(plain - merged).max() / scale)  # what the adapter changes
    return diffs


def default_checkpoint(task: str) -> str:
    """The checkpoint exported when none is asked for: the task's `default_export_checkpoint` (logged)."""
    which = tasks.task_class(task).default_export_checkpoint
    log.info("exporting the %s checkpoint (the %s task's default; --checkpoint chooses another)", which, task)
    return which


def main(argv: Sequence[str] | None = None) -> dict[str, float]:
    ap = cli.parser("export", __doc__)
    ap.add_argument("--workdir", required=True, help="the trained run's directory")
    ap.add_argument("--output_dir", help="export directory (required)")
    cli.deprecated(ap, "--output", "--output_dir")
    cli.add_checkpoint(ap, default=None, default_help=" (default: the task's choice, logged: final for a "
                                                      "self-supervised run, else best)")
    ap.add_argument("--no_check", action="store_true", help="skip reloading the export with torch/transformers")
    ap.add_argument("--tolerance", type=float, default=1e-4,
                    help="largest accepted relative difference in the check")
    args = cli.parse(ap, argv)
    if not args.output_dir:
        ap.error("--output_dir is required")
    run_io.setup_logging()
    task = exit_on_user_error(lambda: run_io.load_config(args.workdir).task)
    exit_on_user_error(lambda: check_exportable(task))
    which = args.checkpoint or default_checkpoint(task)
    run = exit_on_user_error(run_io.load_run, args.workdir, which)
    out = export_run(run, args.output_dir)
    if args.no_check:
        return {}
    diffs = check_export(run, out)
    checked = {k: v for k, v in diffs.items() if not k.startswith("base_vs")}
    print("export check (PyTorch reload vs Flax): " + ", ".join(f"{k} {v:.3g}" for k, v in diffs.items()))
    if max(checked.values()) > args.tolerance:
        sys.exit(f"export check failed: a difference exceeds --tolerance={args.tolerance}")
    return diffs


if __name__ == "__main__":
    main()
