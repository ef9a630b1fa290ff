"""Parity of the Flax backbones with transformers' PyTorch models, both ways, in both weight layouts."""
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from transformers import (AutoModel, DINOv3ViTConfig, DINOv3ViTModel, Dinov2Config, Dinov2Model,
                          Dinov2WithRegistersConfig, Dinov2WithRegistersModel)

from helpers.torch_models import perturbed, rel_err
from jaxvit.models import WeightLoadError, get_config, load_pretrained, save_pretrained
from jaxvit.models.weights import config_from_hf

torch.manual_seed(0)

TINY = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2)
# name -> (model class, config): every family variant at a tiny size.
VARIANTS = {
    "dinov2": (Dinov2Model, Dinov2Config(**TINY, image_size=56, patch_size=14)),
    "dinov2_swiglu": (Dinov2Model, Dinov2Config(**TINY, image_size=56, patch_size=14, use_swiglu_ffn=True)),
    "dinov2_reg": (Dinov2WithRegistersModel,
                   Dinov2WithRegistersConfig(**TINY, image_size=56, patch_size=14, num_register_tokens=4)),
    "dinov2_reg_swiglu": (Dinov2WithRegistersModel, Dinov2WithRegistersConfig(
        **TINY, image_size=56, patch_size=14, num_register_tokens=4, use_swiglu_ffn=True)),
    "dinov3": (DINOv3ViTModel, DINOv3ViTConfig(**TINY, intermediate_size=128, patch_size=16, num_register_tokens=4)),
    "dinov3_swiglu": (DINOv3ViTModel, DINOv3ViTConfig(**TINY, intermediate_size=96, patch_size=16,
                                                       num_register_tokens=4, use_gated_mlp=True,
                                                       hidden_act="silu")),
    "dinov3_nobias": (DINOv3ViTModel, DINOv3ViTConfig(**TINY, intermediate_size=96, patch_size=16,
                                                       num_register_tokens=4, use_gated_mlp=True,
                                                       query_bias=False, value_bias=False)),  # GELU gate
}


def torch_forward(model, images_nhwc: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return model(pixel_values=torch.from_numpy(images_nhwc).permute(0, 3, 1, 2)).last_hidden_state.numpy()


def flax_forward(module, params, images_nhwc, **kw) -> np.ndarray:
    return np.asarray(module.apply({"params": params}, jnp.asarray(images_nhwc), **kw)["last_hidden_state"])


def images(h, w, n=2, seed=0):
    return np.random.default_rng(seed).standard_normal((n, h, w, 3)).astype(np.float32)


@pytest.fixture(scope="module", params=sorted(VARIANTS))
def hf_checkpoint(request, tmp_path_factory):
    model_cls, config = VARIANTS[request.param]
    model = perturbed(model_cls, config)
    path = tmp_path_factory.mktemp(request.param)
    model.save_pretrained(path)
    return request.param, model, path


def sizes(name):
    p = 14 if name.startswith("dinov2") else 16
    return [(4 * p, 4 * p), (224 // p * p, 224 // p * p), (3 * p, 5 * p)]  # native grid, 224-ish, non-square


def test_hf_parity(hf_checkpoint):
    name, model, path = hf_checkpoint
    module, params = load_pretrained(path)
    for h, w in sizes(name):
        x = images(h, w)
        ref = torch_forward(model, x)
        out = flax_forward(module, params, x)
        assert out.shape == ref.shape
        assert rel_err(out, ref) <= 1e-4, (name, h, w, rel_err(out, ref))


def test_hf_export_roundtrip(hf_checkpoint, tmp_path):
    name, model, path = hf_checkpoint
    module, params = load_pretrained(path)
    save_pretrained(module, params, tmp_path / "hf", format="hf")
    reloaded = AutoModel.from_pretrained(tmp_path / "hf").eval()
    x = images(*sizes(name)[2])
    assert rel_err(torch_forward(reloaded, x), torch_forward(model, x)) <= 1e-5


def _official_state_dict(hf_dir, name):
    """The original repositories' key layout, written from transformers' on-disk file, independently of
    jaxvit's key map."""
    from safetensors.torch import load_file
    sd = load_file(hf_dir / "model.safetensors")
    v2 = name.startswith("dinov2")
    out = {}
    layers = sorted({int(k.split(".")[2 if v2 else 1]) for k in sd if ".layer." in "." + k})
    pre = "encoder.layer." if v2 else "layer."
    emb = "embeddings."
    out["cls_token"] = sd[emb + "cls_token"]
    out["mask_token"] = sd[emb + "mask_token"].reshape(1, -1)
    if emb + "register_tokens" in sd:
        out["register_tokens" if v2 else "storage_tokens"] = sd[emb + "register_tokens"]
    if v2:
        out["pos_embed"] = sd[emb + "position_embeddings"]
    proj = emb + ("patch_embeddings.projection." if v2 else "patch_embeddings.")
    out["patch_embed.proj.weight"], out["patch_embed.proj.bias"] = sd[proj + "weight"], sd[proj + "bias"]
    for i in layers:
        s, t = f"{pre}{i}.", f"blocks.{i}."
        for n in ("norm1", "norm2"):
            out[t + n + ".weight"], out[t + n + ".bias"] = sd[s + n + ".weight"], sd[s + n + ".bias"]
        q, k, v, o = ([f"attention.attention.{n}" for n in ("query", "key", "value")] + ["attention.output.dense"]
                      if v2 else [f"attention.{n}_proj" for n in "qkvo"])
        out[t + "attn.qkv.weight"] = torch.cat([sd[s + n + ".weight"] for n in (q, k, v)])
        if s + q + ".bias" in sd:
            kb = sd.get(s + k + ".bias", torch.zeros_like(sd[s + q + ".bias"]))
            out[t + "attn.qkv.bias"] = torch.cat([sd[s + q + ".bias"], kb, sd[s + v + ".bias"]])
        if not v2 and s + q + ".bias" in sd:
            out[t + "attn.qkv.bias_mask"] = torch.ones(3 * kb.shape[0])
        out[t + "attn.proj.weight"], out[t + "attn.proj.bias"] = sd[s + o + ".weight"], sd[s + o + ".bias"]
        out[t + "ls1.gamma"], out[t + "ls2.gamma"] = sd[s + "layer_scale1.lambda1"], sd[s + "layer_scale2.lambda1"]
        ren = {"mlp.fc1": "mlp.fc1", "mlp.fc2": "mlp.fc2", "mlp.weights_in": "mlp.w12", "mlp.weights_out": "mlp.w3",
               "mlp.up_proj": "mlp.fc1", "mlp.down_proj": "mlp.fc2"}
        if s + "mlp.gate_proj.weight" in sd:
            ren = {"mlp.gate_proj": "mlp.w1", "mlp.up_proj": "mlp.w2", "mlp.down_proj": "mlp.w3"}
        for a, b in ren.items():
            for suffix in (".weight", ".bias"):
                if s + a + suffix in sd:
                    out[t + b + suffix] = sd[s + a + suffix]
    norm = "layernorm" if v2 else "norm"
    out["norm.weight"], out["norm.bias"] = sd[norm + ".weight"], sd[norm + ".bias"]
    if not v2:
        out["rope_embed.periods"] = torch.ones(4)
    return out


def test_official_parity_and_roundtrip(hf_checkpoint, tmp_path):
    name, model, path = hf_checkpoint
    # A training checkpoint: teacher/student wrappers, `backbone.` prefix and a DINO head to ignore.
    backbone = _official_state_dict(path, name)
    ckpt = {"teacher": {**{"backbone." + k: v for k, v in backbone.items()}, "dino_head.mlp.0.weight": torch.ones(2)},
            "student": {"backbone." + k: v * 0 for k, v in backbone.items()}}
    torch.save(ckpt, tmp_path / "teacher_checkpoint.pth")
    # Head count and activation are not in the shapes: published widths imply them, tiny test models don't.
    overrides = dict(num_heads=2, act=load_pretrained(path)[0].cfg.act)
    module, params = load_pretrained(tmp_path / "teacher_checkpoint.pth", **overrides)
    x = images(*sizes(name)[2])
    ref = torch_forward(model, x)
    assert rel_err(flax_forward(module, params, x), ref) <= 1e-4
    # Round trip through the official layout.
    save_pretrained(module, params, tmp_path / "official", format="official")
    module2, params2 = load_pretrained(tmp_path / "official" / "model.pth", **overrides)
    assert rel_err(flax_forward(module2, params2, x), ref) <= 1e-5


@pytest.mark.slow
@pytest.mark.parametrize("arch,model_cls,config_cls,extra", [
    ("dinov2_vits14", Dinov2Model, Dinov2Config, dict(image_size=518, patch_size=14)),
    ("dinov3_vits16", DINOv3ViTModel, DINOv3ViTConfig, dict(patch_size=16, num_register_tokens=4)),
])
def test_real_vits_configuration(arch, model_cls, config_cls, extra, tmp_path):
    """The published ViT-S sizes, random weights, at 224 px and a non-square size."""
    cfg = get_config(arch)
    hf_cfg = config_cls(hidden_size=384, num_hidden_layers=12, num_attention_heads=6, **extra,
                        **({"intermediate_size": 1536} if arch.startswith("dinov3") else {}))
    model = perturbed(model_cls, hf_cfg)
    # Keep activations in a sane range for a 12-layer random net.
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lambda1" in n:
                p.mul_(0.1)
    model.save_pretrained(tmp_path)
    assert config_from_hf(json.loads((tmp_path / "config.json").read_text())) == cfg
    module, params = load_pretrained(tmp_path)
    p = cfg.patch_size
    for h, w in [(224 // p * p, 224 // p * p), (10 * p, 7 * p)]:
        x = images(h, w, n=1)
        assert rel_err(flax_forward(module, params, x), torch_forward(model, x)) <= 1e-4


def test_bf16_close_to_fp32(hf_checkpoint):
    name, model, path = hf_checkpoint
    module, params = load_pretrained(path)
    module16, _ = load_pretrained(path, dtype="bfloat16")
    x = images(*sizes(name)[1])
    ref = flax_forward(module, params, x)
    out = flax_forward(module16, params, x).astype(np.float32)
    assert rel_err(out, ref) <= 5e-2  # bf16 has 8 mantissa bits; documented in docs/backbones.md


def test_outputs_mask_and_intermediates(hf_checkpoint):
    name, model, path = hf_checkpoint
    module, params = load_pretrained(path)
    cfg = module.cfg
    x = images(*sizes(name)[2])
    n_patches = (x.shape[1] // cfg.patch_size) * (x.shape[2] // cfg.patch_size)
    mask = np.zeros((2, n_patches), bool)
    mask[:, ::3] = True
    out = module.apply({"params": params}, x, mask=mask, return_layers=(0, -1), return_attention=True)
    model.set_attn_implementation("eager")  # sdpa does not return attention probabilities
    with torch.no_grad():
        ref = model(pixel_values=torch.from_numpy(x).permute(0, 3, 1, 2), bool_masked_pos=torch.from_numpy(mask),
                    output_hidden_states=True, output_attentions=True)
    assert rel_err(np.asarray(out["last_hidden_state"]), ref.last_hidden_state.numpy()) <= 1e-4
    assert rel_err(np.asarray(out["intermediate"][0]), ref.hidden_states[1].numpy()) <= 1e-4
    assert rel_err(np.asarray(out["attentions"][-1]), ref.attentions[-1].numpy()) <= 1e-4
    assert out["patch_tokens"].shape == (2, n_patches, cfg.hidden_size)
    assert out["register_tokens"].shape == (2, cfg.num_registers, cfg.hidden_size)
    np.testing.assert_array_equal(out["pooler_output"], out["last_hidden_state"][:, 0])


def test_strict_loading_names_keys(tmp_path):
    model_cls, config = VARIANTS["dinov2"]
    sd = perturbed(model_cls, config).state_dict()
    cfg_json = Dinov2Config(**TINY, image_size=56, patch_size=14).to_dict()
    from safetensors.torch import save_file
    broken = {k: v for k, v in sd.items() if k != "encoder.layer.1.norm2.bias"}
    broken["encoder.layer.0.extra.weight"] = torch.zeros(3)
    broken["layernorm.weight"] = torch.zeros(7)
    save_file({k: v.contiguous() for k, v in broken.items()}, tmp_path / "model.safetensors")
    (tmp_path / "config.json").write_text(json.dumps(cfg_json))
    with pytest.raises(WeightLoadError) as e:
        load_pretrained(tmp_path)
    msg = str(e.value)
    assert "encoder.layer.1.norm2.bias" in msg and "encoder.layer.0.extra.weight" in msg
    assert "layernorm.weight" in msg and str(tmp_path) in msg


def test_uncached_hub_id_is_a_clear_error(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(WeightLoadError, match="local Hugging Face cache"):
        load_pretrained("facebook/dinov2-small")


def test_jit_and_grad_run(hf_checkpoint):
    name, _, path = hf_checkpoint
    module, params = load_pretrained(path, drop_path=0.1, remat="dots")
    x = jnp.asarray(images(*sizes(name)[0]))

    @jax.jit
    def loss(p, rng):
        out = module.apply({"params": p}, x, train=True, rngs={"dropout": rng})
        return jnp.mean(out["pooler_output"] ** 2)

    g = jax.grad(loss)(params, jax.random.key(0))
    assert all(np.isfinite(np.asarray(v)).all() for v in jax.tree_util.tree_leaves(g))


@pytest.mark.integration
def test_attention_implementations_agree(hf_checkpoint):
    """The CPU default (heads-first einsum) equals jax.nn.dot_product_attention's XLA path, with gradients."""
    name, _, path = hf_checkpoint
    x = jnp.asarray(images(*sizes(name)[2]))
    results = {}
    for impl in ("einsum", "xla"):
        module, params = load_pretrained(path, attn_impl=impl)
        forward = lambda p: module.apply({"params": p}, x)["last_hidden_state"]
        results[impl] = (forward(params), jax.grad(lambda p: jnp.sum(forward(p) ** 2))(params))
    (out_e, grad_e), (out_x, grad_x) = results.values()
    assert rel_err(np.asarray(out_e), np.asarray(out_x)) <= 1e-5
    flat = lambda tree: np.concatenate([np.ravel(g) for g in jax.tree_util.tree_leaves(tree)])
    assert rel_err(flat(grad_e), flat(grad_x)) <= 1e-5


def test_hashed_dropout_mask_statistics():
    from jaxvit.models.layers import hashed_dropout
    x, rate = jnp.ones((64, 128, 128)), 0.1
    a = np.asarray(hashed_dropout(jax.random.key(0), x, rate))
    b = np.asarray(hashed_dropout(jax.random.key(1), x, rate))
    np.testing.assert_array_equal(a, hashed_dropout(jax.random.key(0), x, rate))  # a key fixes the mask
    keep_a, keep_b = a != 0, b != 0
    np.testing.assert_allclose(a[keep_a], 1 / (1 - rate), rtol=1e-6)  # inverted dropout keeps the mean
    sigma = np.sqrt(0.09 / x.size)
    assert abs(keep_a.mean() - 0.9) < 5 * sigma
    assert abs((keep_a & keep_b).mean() - 0.81) < 5 * np.sqrt(0.81 * 0.19 / x.size)  # independent keys
    for axis in range(3):  # no pattern along any axis: every slice keeps ~90%
        per_slice = keep_a.mean(axis=tuple(i for i in range(3) if i != axis))
        assert np.abs(per_slice - 0.9).max() < 5 * np.sqrt(0.09 * x.shape[axis] / x.size)
    assert np.asarray(hashed_dropout(jax.random.key(0), x, 0.0)).min() == 1.0
    assert not np.asarray(hashed_dropout(jax.random.key(0), x, 1.0)).any()  # all dropped, no 0 / 0
