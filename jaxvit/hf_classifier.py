"""A classification run as a transformers image classifier: D/classifier/, which
`transformers.pipeline("image-classification", model="D/classifier")` runs with jaxvit's own preprocessing.

    D/classifier/config.json               Dinov2[WithRegisters]ForImageClassification, id2label / label2id
    D/classifier/model.safetensors         backbone (LoRA merged) + `classifier` Linear
    D/classifier/preprocessor_config.json  BitImageProcessorPil: jaxvit's evaluation resize, crop, mean and std

transformers' DINOv2 classifier reads cat(CLS, mean of the patch tokens) - jaxvit's `cls_mean` pool. A `cls` run
gets zeros for the patch-mean half of the weights: the same logits. Written for DINOv2 (with or without registers)
runs with a linear head; for the rest (DINOv3 has no transformers classification class, heads with hidden layers)
nothing is written and the log says so (D/model + D/head.safetensors still hold the model).
"""
from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np

from jaxvit.models.weights import config_to_hf, export_state_dict, write_state_dict

log = logging.getLogger("jaxvit")

_CLASSES = {"dinov2": ("Dinov2ForImageClassification", "dinov2"),
            "dinov2_with_registers": ("Dinov2WithRegistersForImageClassification", "dinov2_with_registers")}


def unsupported(run) -> str | None:
    """Why `run` has no transformers classifier export, or None."""
    model = run.model
    if getattr(model, "head_hidden", ()):
        return f"its head has hidden layers {tuple(model.head_hidden)} (transformers' classifier is one Linear)"
    if getattr(model, "pool", None) not in ("cls", "cls_mean"):
        return f"pool={getattr(model, 'pool', None)!r}"
    model_type = config_to_hf(model.backbone)["model_type"]
    if model_type not in _CLASSES:
        return f"transformers has no {model_type} image-classification class"
    return None


def preprocessor_config(data) -> dict:
    """BitImageProcessorPil settings of jaxvit's evaluation transform (`jaxvit.data.transforms.resize_center_crop`):
    PIL bicubic resize of the shorter side to max(size, round(size / crop_ratio)), centre crop, x / 255, mean/std."""
    size = int(data.image_size)
    return {"image_processor_type": "BitImageProcessorPil", "do_convert_rgb": True,
            "do_resize": True, "size": {"shortest_edge": max(size, round(size / data.crop_ratio))},
            "resample": 3,  # PIL.Image.BICUBIC
            "do_center_crop": True, "crop_size": {"height": size, "width": size},
            "do_rescale": True, "rescale_factor": 1 / 255,
            "do_normalize": True, "image_mean": [float(m) for m in data.mean],
            "image_std": [float(s) for s in data.std]}


def export_hf_classifier(run, out_dir: str | Path) -> Path | None:
    """Write OUT/classifier/ (see the module docstring); None (and a log line) where it does not apply."""
    why = unsupported(run)
    if why:
        log.info("no transformers classifier (D/classifier) for this run: %s; D/model + D/head.safetensors hold it",
                 why)
        return None
    model, classes = run.model, list(run.task.classes)
    hf = config_to_hf(model.backbone)
    architecture, prefix = _CLASSES[hf["model_type"]]
    kernel = np.asarray(run.variables["params"]["head"]["out"]["kernel"], np.float32).T  # (classes, in)
    if model.pool == "cls":  # the patch-mean half of transformers' input gets zero weights
        kernel = np.concatenate([kernel, np.zeros_like(kernel)], axis=1)
    sd = {f"{prefix}.{k}": v for k, v in export_state_dict(model.backbone, run.backbone_params(), "hf").items()}
    sd["classifier.weight"] = np.ascontiguousarray(kernel)
    sd["classifier.bias"] = np.asarray(run.variables["params"]["head"]["out"]["bias"], np.float32)
    out = Path(out_dir) / "classifier"
    write_state_dict(sd, out / "model.safetensors")
    config = hf | {"architectures": [architecture], "id2label": {str(i): c for i, c in enumerate(classes)},
                   "label2id": {c: i for i, c in enumerate(classes)}, "torch_dtype": "float32"}
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    (out / "preprocessor_config.json").write_text(json.dumps(preprocessor_config(run.cfg.data), indent=2) + "\n")
    log.info("transformers classifier: %s (%s, %d classes)", out, architecture, len(classes))
    return out
