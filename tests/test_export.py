"""Export of LoRA runs (DINOv2 and DINOv3 families) to transformers + a safetensors head + a PEFT adapter,
reloaded with the real torch / transformers / peft packages. DINOv2 is the session's `lora_run` (conftest);
DINOv3 trains its own tiny run here."""
import json
from pathlib import Path
import jax
import shutil

import numpy as np
import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from peft.utils import get_peft_model_state_dict
from safetensors.numpy import load_file as load_numpy
from safetensors.torch import load_file
from transformers import AutoModel, DINOv3ViTConfig, DINOv3ViTModel

from helpers.tiny import LORA_RUN, tiny_config
from jaxvit import checkpoint, export, run_io
from jaxvit.predict import Predictor
from jaxvit.train import Trainer

DINOV3 = dict(targets=("query", "key", "value", "dense", "fc1", "fc2"), head_hidden=(), pool="cls")


@pytest.fixture(scope="module")
def dinov3_run(gz2_dir, tmp_path_factory):
    """A one-epoch LoRA run on a (randomly perturbed) transformers DINOv3 checkpoint with 4 register tokens."""
    torch.manual_seed(0)
    hf = DINOv3ViTModel(DINOv3ViTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                        intermediate_size=64, patch_size=8, num_register_tokens=4)).eval()
    with torch.no_grad():
        for p in hf.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    pretrained = tmp_path_factory.mktemp("dinov3_hf")
    hf.save_pretrained(pretrained)
    c = tiny_config(gz2_dir, epochs=1)
    c.model.arch, c.model.pretrained = "dinov3_vits16", str(pretrained)
    c.model.head_hidden, c.model.pool = DINOV3["head_hidden"], DINOV3["pool"]
    c.lora.enabled, c.lora.rank, c.lora.alpha, c.lora.targets = True, 4, 16.0, DINOV3["targets"]
    c.optim.lr = 2e-2
    workdir = tmp_path_factory.mktemp("dinov3_run")
    Trainer(c, workdir).run()
    return workdir


@pytest.fixture(params=["dinov2", "dinov3"])
def family_run(request):
    """(family, workdir, what the run was configured with)."""
    if request.param == "dinov2":
        return "dinov2", request.getfixturevalue("lora_run")[0], LORA_RUN
    return "dinov3", request.getfixturevalue("dinov3_run"), DINOV3


@pytest.mark.integration
def test_export_reloads_in_pytorch_and_peft(family_run, gz2_dir, tmp_path):
    family, workdir, spec = family_run
    out = tmp_path / "export"
    diffs = export.main([f"--workdir={workdir}", f"--output={out}", "--checkpoint=final"])
    assert set(diffs) == {"outputs_rel_diff", "peft_vs_model_rel_diff", "base_vs_model_rel_diff"}
    assert diffs["outputs_rel_diff"] <= 1e-4 and diffs["peft_vs_model_rel_diff"] <= 1e-5
    assert diffs["base_vs_model_rel_diff"] > 1e-3  # the adapter changes the backbone

    # Real test images, preprocessed as jaxvit evaluates them; jaxvit's probabilities from the checkpoint
    # (LoRA applied unmerged, as in training).
    predictor = Predictor.from_workdir(workdir, "final")
    x = np.stack([predictor.preprocess(p) for p in sorted(gz2_dir.glob("gz2_5class_test/*/*.png"))[:6]])
    want = predictor.outputs(x)
    pixels = torch.from_numpy(x).permute(0, 3, 1, 2)

    # PyTorch: transformers backbone + the head rebuilt by hand from head.safetensors.
    cfg = json.loads((out / "head_config.json").read_text())
    assert cfg["task"] == "classification" and cfg["classes"] == predictor.task.classes
    assert cfg["num_outputs"] == 5 and (cfg["hidden"], cfg["pool"]) == (list(spec["head_hidden"]), spec["pool"])
    final_step = max(checkpoint.steps(workdir))
    assert cfg["source"] == {"workdir": str(workdir), "checkpoint": f"final/{final_step}",
                             "ema": family == "dinov2"}  # the dinov2 run trains with EMA
    widths = [cfg["in_features"], *cfg["hidden"], cfg["num_outputs"]]
    if cfg["hidden"]:
        head = torch.nn.Sequential(torch.nn.Linear(widths[0], widths[1]), torch.nn.GELU(),
                                   torch.nn.Linear(widths[1], widths[2]))
    else:
        head = torch.nn.Linear(widths[0], widths[1])
        assert set(load_file(out / "head.safetensors")) == {"weight", "bias"}
    head.load_state_dict(load_file(out / "head.safetensors"))
    model = AutoModel.from_pretrained(out / "model").eval()
    with torch.no_grad():
        o = model(pixel_values=pixels)
        feats = o.pooler_output
        if cfg["pool"] == "cls_mean":
            feats = torch.cat([feats, o.last_hidden_state[:, cfg["num_prefix_tokens"]:].mean(1)], -1)
        got = torch.softmax(head(feats), -1).numpy()
    assert np.abs(got - want).max() <= 1e-4

    # PEFT: base model + adapter reproduces the merged model; the adapter matters.
    base = AutoModel.from_pretrained(out / "base_model").eval()
    with torch.no_grad():
        merged = o.last_hidden_state.numpy()
        plain = base(pixel_values=pixels).last_hidden_state.numpy()
        adapted = PeftModel.from_pretrained(base, out / "peft_adapter").eval()(pixel_values=pixels)
    scale = np.abs(merged).max()
    assert np.abs(adapted.last_hidden_state.numpy() - merged).max() <= 1e-5 * scale
    assert np.abs(plain - merged).max() > 1e-3 * scale

    # The adapter file has exactly the keys and shapes PEFT itself writes for this config.
    adapter_cfg = json.loads((out / "peft_adapter" / "adapter_config.json").read_text())
    assert (adapter_cfg["peft_type"], adapter_cfg["r"], adapter_cfg["lora_alpha"], adapter_cfg["task_type"]) == (
        "LORA", 4, 16, None)
    native = get_peft_model(AutoModel.from_pretrained(out / "base_model"), LoraConfig(
        r=4, lora_alpha=16, target_modules=adapter_cfg["target_modules"]))
    want_shapes = {k: tuple(v.shape) for k, v in get_peft_model_state_dict(native).items()}
    ours = load_numpy(out / "peft_adapter" / "adapter_model.safetensors")
    assert {k: v.shape for k, v in ours.items()} == want_shapes
    if family == "dinov2":  # a subset of layers: full module names
        assert "encoder.layer.1.mlp.fc2" in adapter_cfg["target_modules"]
        assert "encoder.layer.0.mlp.fc2" not in adapter_cfg["target_modules"]
        assert "base_model.model.encoder.layer.0.attention.q_proj.lora_A.weight" in ours
    else:
        assert sorted(adapter_cfg["target_modules"]) == ["down_proj", "k_proj", "o_proj", "q_proj", "up_proj",
                                                         "v_proj"]


@pytest.mark.integration
def test_load_run_without_the_pretrained_weights(family_run, gz2_dir, tmp_path, caplog):
    """A run copied where its pretrained checkpoint is missing: a lean checkpoint (the LoRA base not stored) is a
    one-line error naming the source; with checkpoint.store_frozen=True it loads (the architecture from the config)."""
    family, workdir, _ = family_run

    def moved(run: Path) -> Path:
        copy = tmp_path / f"moved_{run.name}"
        shutil.copytree(run, copy)
        cfg = json.loads((copy / "config.json").read_text())
        cfg["model"]["pretrained"] = str(tmp_path / "not_here")
        (copy / "config.json").write_text(json.dumps(cfg))
        return copy

    with pytest.raises(checkpoint.CheckpointError, match=r"does not store the weights frozen .* from "
                                                         r"model.pretrained='.*not_here'.* does not load here") as e:
        run_io.load_run(moved(workdir), "final")
    assert "\n" not in str(e.value)
    if family == "dinov3":
        return  # one stored run is enough
    c = run_io.load_config(workdir)
    c.data.data_dir, c.train.epochs, c.eval.test_split = str(gz2_dir), 1, ""
    c.checkpoint.store_frozen = True
    Trainer(c, tmp_path / "stored").run()
    a, b = run_io.load_run(tmp_path / "stored", "final"), run_io.load_run(moved(tmp_path / "stored"), "final")
    assert "not available" in caplog.text
    assert a.model == b.model
    x = np.zeros((1, 32, 32, 3), np.float32)
    np.testing.assert_array_equal(a.model.apply(a.variables, x), b.model.apply(b.variables, x))


@pytest.mark.slow
def test_batchnorm_head_exports_to_torch_and_resumes_exactly(gz2_dir, tmp_path):
    """The CIFAR-10 recipe's head (Linear-BN-ReLU-Dropout blocks): running statistics live in the train state,
    survive a resume bit for bit, drive evaluation, and the exported nn.Sequential with BatchNorm1d reproduces
    jaxvit's outputs."""
    c = tiny_config(gz2_dir, epochs=2)
    c.model.head_hidden, c.model.head_norm, c.model.head_act = (16, 8), "batch", "relu"
    c.model.head_hidden_dropout = (0.5, 0.25)
    c.eval.test_split, c.eval.test_checkpoint = "", "final"
    c.checkpoint.every_steps = 1
    Trainer(c, tmp_path / "whole").run()
    # The same run "killed" after step 3: its later checkpoints removed, then resumed.
    shutil.copytree(tmp_path / "whole", tmp_path / "resumed")
    for step in checkpoint.steps(tmp_path / "resumed"):
        if step > 3:
            shutil.rmtree(tmp_path / "resumed" / "checkpoints" / str(step))
    Trainer(c, tmp_path / "resumed").run()
    whole, resumed = (run_io.load_run(tmp_path / d, "final") for d in ("whole", "resumed"))
    stats = whole.variables["batch_stats"]["head"]
    assert np.abs(np.asarray(stats["norm_0"]["mean"])).max() > 0 and not np.allclose(stats["norm_1"]["var"], 1)
    for a, b in zip(jax.tree_util.tree_leaves(whole.variables), jax.tree_util.tree_leaves(resumed.variables)):
        np.testing.assert_array_equal(a, b)
    export.export_run(whole, tmp_path / "export")
    head = export.load_torch_head(tmp_path / "export")
    assert isinstance(head[1], torch.nn.BatchNorm1d) and isinstance(head[2], torch.nn.ReLU)
    diffs = export.check_export(whole, tmp_path / "export")
    assert diffs["outputs_rel_diff"] <= 1e-4, diffs
