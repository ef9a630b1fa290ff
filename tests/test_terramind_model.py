"""TerraMind v1 in Flax against terratorch's own modules (random weights, tiny sizes), checkpoint import/export,
and LoRA on the decoder's cross-attention.

terratorch's package __init__ pulls geospatial dependencies (and torchvision); it is installed with --no-deps and
only its model files are imported, through stub parent packages (tests/helpers/terratorch.py).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import traverse_util

from jaxvit import lora
from jaxvit.errors import ConfigError
from jaxvit.models.terramind import TerraMind, TerraMindConfig, init_params, param_shapes, terramind_config
from jaxvit.models.terramind.config import IMAGE, SEQUENCE, TOKENS, ModalitySpec
from jaxvit.models.terramind.weights import (WeightLoadError, export_state_dict, import_params, load_terramind,
                                             save_terramind)
from helpers.terratorch import import_terratorch

torch = pytest.importorskip("torch")
pytest.importorskip("einops")

VOCAB, COORDS_VOCAB = 64, 50
ENCODER = (ModalitySpec("untok_sen1grd@224", IMAGE, 2), ModalitySpec("untok_sen2l2a@224", IMAGE, 12),
           ModalitySpec("tok_sen2l2a@224", TOKENS, VOCAB), ModalitySpec("coords", SEQUENCE, COORDS_VOCAB, 4))
DECODER = (ModalitySpec("tok_sen2l2a@224", TOKENS, VOCAB), ModalitySpec("coords", SEQUENCE, COORDS_VOCAB, 4))
# Tiny stand-ins of the two released block types: base/large (gated SiLU, no biases), tiny/small (GELU, biases).
ARCHS = {
    "gated": dict(gated_mlp=True, act="silu", qkv_bias=False, proj_bias=False, mlp_bias=False),
    "plain": dict(gated_mlp=False, act="gelu", qkv_bias=True, proj_bias=True, mlp_bias=True),
}


def tiny_config(arch: str = "gated", **kw) -> TerraMindConfig:
    return TerraMindConfig(dim=32, encoder_depth=2, decoder_depth=2, num_heads=2, image_size=64,
                           encoder_modalities=ENCODER, decoder_modalities=DECODER, **(ARCHS[arch] | kw))


def terratorch_terramind():
    return import_terratorch("terratorch.models.backbones.terramind.model", "terramind", "encoder_embeddings",
                             "decoder_embeddings", "tm_utils")


def torch_model(cfg: TerraMindConfig, seed: int = 0):
    """terratorch's TerraMind of `cfg`, every parameter redrawn (norm weights around 1) so nothing is trivial."""
    from functools import partial
    tm, enc, dec, utils = terratorch_terramind()
    common = dict(patch_size=cfg.patch_size, image_size=cfg.image_size)

    def encoder_embedding(s):
        if s.kind == IMAGE:
            return enc.ImageEncoderEmbedding(num_channels=s.size, **common)
        if s.kind == TOKENS:
            return enc.ImageTokenEncoderEmbedding(vocab_size=s.size, **common)
        return enc.SequenceEncoderEmbedding(vocab_size=s.size, max_length=s.max_length)

    def decoder_embedding(s):
        if s.kind == TOKENS:
            return dec.ImageTokenDecoderEmbedding(vocab_size=s.size, **common)
        return dec.SequenceDecoderEmbedding(vocab_size=s.size, max_length=s.max_length)

    info = {s.key: dict(id=i + 1, type="seq" if s.kind == SEQUENCE else "img")
            for i, s in enumerate(dict.fromkeys(cfg.encoder_modalities + cfg.decoder_modalities))}
    torch.manual_seed(seed)
    model = tm.TerraMind(
        encoder_embeddings={s.key: encoder_embedding(s) for s in cfg.encoder_modalities},
        decoder_embeddings={s.key: decoder_embedding(s) for s in cfg.decoder_modalities},
        modality_info=info, dim=cfg.dim, encoder_depth=cfg.encoder_depth, decoder_depth=cfg.decoder_depth,
        num_heads=cfg.num_heads, mlp_ratio=cfg.mlp_ratio, qkv_bias=cfg.qkv_bias, proj_bias=cfg.proj_bias,
        mlp_bias=cfg.mlp_bias, act_layer=torch.nn.SiLU if cfg.act == "silu" else torch.nn.GELU,
        norm_layer=partial(utils.LayerNorm, eps=cfg.ln_eps, bias=False), gated_mlp=cfg.gated_mlp).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(1 + 0.2 * torch.randn_like(p) if "norm" in name else 0.3 * torch.randn_like(p))
    return model


def forward(cfg: TerraMindConfig):
    return jax.jit(TerraMind(cfg).apply, static_argnums=2)


def state_dict(model) -> dict[str, np.ndarray]:
    return {k: v.detach().numpy().copy() for k, v in model.state_dict().items()}


def rel_err(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.abs(a - b).max() / np.abs(b).max())


def batch(size: int, n: int = 2, seed: int = 0):
    rng = np.random.default_rng(seed)
    g = size // 16
    return dict(s1=rng.normal(size=(n, size, size, 2)).astype(np.float32),
                s2=rng.normal(size=(n, size, size, 12)).astype(np.float32),
                tokens=rng.integers(0, VOCAB, (n, g, g)), coords=rng.integers(1, COORDS_VOCAB, (n, 4)))


def nchw(x):
    return torch.from_numpy(x.transpose(0, 3, 1, 2).copy())


def torch_inputs(b, visible: np.ndarray, with_images: bool):
    """terratorch's mod_dict: S1 (and S2) pixels, coords, and the S2L2A tokens: the `visible` ones are encoder
    inputs, the others decoder targets that all attend to each other."""
    n, g = b["tokens"].shape[:2]
    hidden = torch.from_numpy(~visible.reshape(n, -1))
    none = torch.zeros(n, g * g, dtype=torch.bool)
    d = {"untok_sen1grd@224": {"tensor": nchw(b["s1"]), "input_mask": none}}
    if with_images:
        d["untok_sen2l2a@224"] = {"tensor": nchw(b["s2"]), "input_mask": none}
    d["coords"] = {"tensor": torch.from_numpy(b["coords"]), "input_mask": torch.zeros(n, 4, dtype=torch.bool),
                   "target_mask": torch.ones(n, 4, dtype=torch.bool),
                   "decoder_attention_mask": torch.zeros(n, 4, dtype=torch.int)}
    d["tok_sen2l2a@224"] = {"tensor": torch.from_numpy(b["tokens"]), "input_mask": hidden, "target_mask": ~hidden,
                            "decoder_attention_mask": torch.full((n, g * g), int(hidden[0].sum()))}
    return d


def torch_forward(model, mod_dict):
    """(encoder output of the kept tokens, decoder logits of the targets in position order)."""
    import copy
    with torch.no_grad():
        num_enc = int(sum((~d["input_mask"][0]).sum() for k, d in mod_dict.items()))
        num_dec = int((~mod_dict["tok_sen2l2a@224"]["target_mask"][0]).sum())
        enc = {k: model.encoder_embeddings[k](copy.copy(d)) for k, d in mod_dict.items()}
        tokens, emb, mask, _ = model.forward_mask_encoder(enc, num_enc)
        encoded = model.forward_encoder(tokens + emb, mask)
        logits = model(copy.deepcopy(mod_dict), num_enc, num_dec, return_logits=True)["tok_sen2l2a@224"]
    return encoded.numpy(), logits.numpy()


def test_parity_s1_s2_to_s2l2a_tokens():
    """S1GRD + S2L2A pixels and coords in, logits of every S2L2A token out, against terratorch's TerraMind
    (base/large block type)."""
    cfg = tiny_config("gated")
    model = torch_model(cfg)
    params = import_params(cfg, state_dict(model))
    b = batch(64)
    visible = np.zeros(b["tokens"].shape, bool)
    encoded, logits = torch_forward(model, torch_inputs(b, visible, with_images=True))
    out = forward(cfg)({"params": params}, {"S1GRD": b["s1"], "S2L2A": b["s2"], "coords": b["coords"]}, "S2L2A")
    errs = rel_err(out["encoder_output"], encoded), rel_err(out["logits"], logits)
    print(f"S1 + S2 -> S2L2A tokens: relative error encoder {errs[0]:.1e}, logits {errs[1]:.1e}")
    assert out["logits"].shape == (2, 16, VOCAB) and out["logits"].dtype == jnp.float32
    assert max(errs) < 1e-4


def test_parity_partial_tokens_and_resized_positions():
    """S1 pixels plus half of the S2L2A tokens as encoder inputs (`input_masks`), the other half as targets
    (`target_mask`), on a 3 x 3 grid: position tables resized from the stored 4 x 4 (bicubic); tiny/small
    block type (GELU MLP, biases)."""
    cfg = tiny_config("plain")
    model = torch_model(cfg, seed=1)
    params = import_params(cfg, state_dict(model))
    b = batch(48, seed=1)
    rng = np.random.default_rng(2)
    visible = np.stack([rng.permutation(9) < 4 for _ in range(2)]).reshape(2, 3, 3)
    encoded, logits = torch_forward(model, torch_inputs(b, visible, with_images=False))
    out = forward(cfg)(
        {"params": params}, {"S1GRD": b["s1"], "coords": b["coords"], "tok_sen2l2a@224": b["tokens"]}, "S2L2A",
        input_masks={"tok_sen2l2a@224": ~visible}, target_mask=visible)
    kept = np.asarray(out["encoder_keep"])
    ours_enc = np.stack([np.asarray(out["encoder_output"])[i][kept[i]] for i in range(2)])
    ours_logits = np.stack([np.asarray(out["logits"])[i][~visible[i].reshape(-1)] for i in range(2)])
    errs = rel_err(ours_enc, encoded), rel_err(ours_logits, logits)
    print(f"partial tokens, 3x3 grid: relative error encoder {errs[0]:.1e}, logits {errs[1]:.1e}")
    assert max(errs) < 1e-4


def test_checkpoint_round_trip(tmp_path):
    """terratorch state dict -> file -> load_terramind (config read from the file) -> save_terramind -> the torch
    module loads it strictly and every tensor (buffers and tied copies included) comes back unchanged."""
    cfg = tiny_config("plain")
    model = torch_model(cfg)
    sd = state_dict(model)
    torch.save(model.state_dict(), tmp_path / "TerraMind_tiny.pt")
    module, params = load_terramind(tmp_path / "TerraMind_tiny.pt", num_heads=2)  # heads: not in the weights
    assert module.cfg == cfg
    out = save_terramind(cfg, params, tmp_path / "export" / "TerraMind_tiny.pt")
    again = torch_model(cfg, seed=5)
    again.load_state_dict(torch.load(out, weights_only=True), strict=True)
    back = state_dict(again)
    assert set(back) == set(sd)
    for k in sd:  # parameters exactly; the sin-cos buffers are recomputed (float32 pow: last-ulp differences)
        np.testing.assert_allclose(back[k], sd[k], rtol=0, atol=1e-5 if k.endswith("pos_emb") else 0, err_msg=k)
    flat, flat2 = (traverse_util.flatten_dict(p) for p in (params, import_params(cfg, export_state_dict(cfg, params))))
    assert flat.keys() == flat2.keys() and all(np.array_equal(flat[k], flat2[k]) for k in flat)


def test_strict_key_report():
    cfg = tiny_config("gated")
    sd = export_state_dict(cfg, init_params(cfg))
    with pytest.raises(WeightLoadError, match=r"unexpected keys \(1\): decoder\.0\.cross_attn\.qq\.weight"):
        import_params(cfg, sd | {"decoder.0.cross_attn.qq.weight": np.zeros((32, 32), np.float32)})
    missing = {k: v for k, v in sd.items() if k != "decoder.1.cross_attn.kv.weight"}
    with pytest.raises(WeightLoadError, match=r"missing keys \(1\): decoder\.1\.cross_attn\.kv\.weight"):
        import_params(cfg, missing)
    untied = sd | {"decoder_embeddings.tok_sen2l2a@224.to_logits.weight": np.ones((VOCAB, 32), np.float32)}
    with pytest.raises(WeightLoadError, match=r"to_logits\.weight differs from .*token_emb\.weight"):
        import_params(cfg, untied)
    with pytest.raises(WeightLoadError, match=r"decoder\.0\.cross_attn\.q\.weight \(32, 16\)"):
        import_params(cfg, sd | {"decoder.0.cross_attn.q.weight": np.zeros((32, 16), np.float32)})
    filled = import_params(cfg, missing, strict=False)  # initialised from a fresh init
    assert filled["decoder"]["layer_1"]["cross_attn"]["kv"]["kernel"].shape == (32, 64)


SEED_TARGETS = ("decoder/.*/cross_attn/(q|kv|proj)",)


@pytest.mark.integration
def test_lora_cross_attention_gradients_reach_every_adapter_only():
    """Frozen base stored in bfloat16 (model.frozen_dtype); a token cross-entropy reaches every adapter, and the
    trainer's partition trains the adapters and nothing else."""
    from jaxvit.train import partition
    from jaxvit.optim import trainable_rule
    cfg = tiny_config("gated")
    params = init_params(cfg)
    adapters = lora.init_adapters(params, SEED_TARGETS, rank=4, rng=jax.random.key(1))
    paths = {"/".join(k[:-1]) for k in traverse_util.flatten_dict(adapters)}
    assert paths == {f"decoder/layer_{i}/cross_attn/{n}" for i in range(2) for n in ("q", "kv", "proj")}
    encoder_attn = lora.init_adapters(params, ("encoder/.*/attn/(qkv|proj)",), 4, jax.random.key(1))
    assert len(traverse_util.flatten_dict(encoder_attn)) == 2 * 2 * cfg.encoder_depth
    # B = 0 at init gives A no gradient on the first step; start from a trained-looking B to see both factors.
    rng = np.random.default_rng(0)
    adapters = jax.tree_util.tree_map_with_path(
        lambda p, x: 0.05 * rng.standard_normal(x.shape, np.float32) if p[-1].key == "lora_b" else x, adapters)
    cfg_run = ml_collections.ConfigDict(dict(lora=dict(enabled=True), train=dict(freeze_first_n_layers=0)))
    trainable, frozen, _ = partition({"params": params, "lora": adapters}, trainable_rule("all", cfg_run, head="^$"))
    assert set(trainable) == {"lora"} and lora.count(trainable) == lora.count(adapters)
    # Stored as the trainer stores frozen matrices with model.frozen_dtype=bfloat16; computed in float32.
    frozen = jax.tree_util.tree_map(lambda x: np.asarray(x).astype(jnp.bfloat16) if x.ndim >= 2 else x, frozen)
    b = batch(64)

    def loss(trainable):
        out = TerraMind(cfg).apply(frozen | trainable, {"S1GRD": b["s1"]}, "S2L2A", train=True)
        logp = jax.nn.log_softmax(out["logits"])
        return -jnp.take_along_axis(logp, b["tokens"].reshape(2, -1, 1), -1).mean()

    grads = traverse_util.flatten_dict(jax.jit(jax.grad(loss))(trainable))
    assert all(np.isfinite(g).all() and np.abs(g).max() > 0 for g in grads.values()), \
        [k for k, g in grads.items() if not np.abs(g).max() > 0]


def test_seed_lora_parameter_count_on_base():
    """Rank-8 LoRA on base's decoder cross-attention (12 layers x q, kv, proj): 516,096 parameters (~0.5M)."""
    shapes = traverse_util.unflatten_dict({k: jax.ShapeDtypeStruct(v, jnp.float32)
                                           for k, v in param_shapes(terramind_config("base")).items()})
    adapters = jax.eval_shape(lambda: lora.init_adapters(shapes, SEED_TARGETS, 8, jax.random.key(0)))
    n, total = lora.count(adapters), lora.count(shapes)
    print(f"TerraMind v1 base: rank-8 LoRA on decoder cross-attention = {n:,} trainable parameters "
          f"({100 * n / total:.2f}% of {total:,})")
    assert n == 12 * 8 * ((768 + 768) + (768 + 2 * 768) + (768 + 768)) == 516_096


@pytest.mark.parametrize("name,dim,depths,heads,hidden", [
    ("tiny", 192, (12, 4), 3, 768), ("small", 384, (12, 6), 6, 1536), ("base", 768, (12, 12), 12, 2048),
    ("large", 1024, (24, 24), 16, 2730)])
def test_released_sizes(name, dim, depths, heads, hidden):
    cfg = terramind_config(name)
    assert (cfg.dim, (cfg.encoder_depth, cfg.decoder_depth), cfg.num_heads, cfg.mlp_hidden) == (
        dim, depths, heads, hidden)
    assert cfg.gated_mlp == (not cfg.qkv_bias) == (name in ("base", "large"))


def test_bad_inputs_are_named():
    cfg = tiny_config("gated")
    params = {"params": init_params(cfg)}

    def trace(inputs, target="S2L2A", **kw):  # errors are raised while tracing: nothing is compiled
        return jax.eval_shape(lambda: TerraMind(cfg).apply(params, inputs, target, **kw))

    s1 = np.zeros((1, 32, 32, 2), np.float32)
    with pytest.raises(ConfigError, match=r"\(untok_sen1grd@224\)' has shape \(1, 32, 32, 3\); expected \[B, H, W, 2"):
        trace({"S1GRD": np.zeros((1, 32, 32, 3), np.float32)})
    with pytest.raises(ConfigError, match=r"'untok_dem@224' has no encoder embedding"):
        trace({"DEM": np.zeros((1, 32, 32, 1), np.float32)})
    with pytest.raises(ConfigError, match=r"unknown modality 'S3'"):
        trace({"S3": s1})
    with pytest.raises(ConfigError, match=r"only image-token targets"):
        trace({"S1GRD": s1}, "coords")
    with pytest.raises(ConfigError, match=r"target_mask has shape \(1, 5\)"):
        trace({"S1GRD": s1}, target_mask=np.zeros((1, 5), bool))
    assert trace({"S1GRD": s1})["logits"].shape == (1, 4, VOCAB)
