"""TerraMind tokenizer (DiVAE: ViT encoder, FSQ, patched-UNet diffusion decoder, DDIM) against terratorch's own
torch modules on random weights: encoder, FSQ ids, one decoder pass, DDIM steps, a full few-step decode from
fixed noise; checkpoint import/export; the soft-code gradient path.

terratorch is installed with --no-deps (its package __init__ pulls the geospatial stack and torchvision): the
tokenizer files are imported as they are, below stub parent packages (tests/helpers/terratorch.py, `load_upstream`).
"""
from __future__ import annotations

import importlib
import importlib.util
import sys
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("diffusers")
if importlib.util.find_spec("terratorch") is None:  # its package __init__ cannot be imported: look it up only
    pytest.skip("terratorch is not installed (pip install --no-deps terratorch)", allow_module_level=True)

from jaxvit.models.terramind.tokenizer import (Tokenizer, decode_ids, decode_probs, encode_ids, export_state_dict,  # noqa: E402
                                               import_params, load_tokenizer, save_tokenizer, tokenizer_config)
from jaxvit.models.terramind.tokenizer import ddim, fsq  # noqa: E402
from jaxvit.models.weights import WeightLoadError  # noqa: E402
from helpers.terratorch import stub_packages  # noqa: E402

TM = "terratorch.models.backbones.terramind"
TINY = dict(channels=3, image_size=32, patch_size=8, enc_dim=32, enc_depth=2, enc_heads=2, dec_channels=32,
            dec_channel_mult=(1, 2), dec_res_blocks=1, dec_attention_resolutions=(2,), dec_num_heads=2,
            dec_patch_size=2)


def load_upstream():
    """terratorch's tokenizer package, imported from its installed files without running the package
    __init__s above it. Its `terramind/utils.py` imports torchvision for a helper the tokenizer does not call
    here (denormalize with undo_std=False): torchvision is stubbed only while that file loads. The parent
    packages are stubbed by tests/helpers/terratorch.py."""
    if f"{TM}.tokenizer.vqvae" in sys.modules:
        return sys.modules[f"{TM}.tokenizer.vqvae"]
    stub_packages(TM)
    fake = {n: types.ModuleType(n) for n in ("torchvision", "torchvision.transforms",
                                             "torchvision.transforms.functional")}
    saved = {n: sys.modules.get(n) for n in fake}
    sys.modules.update(fake)
    try:
        importlib.import_module(f"{TM}.utils")
    finally:
        for n, m in saved.items():
            if m is None:
                sys.modules.pop(n)
            else:
                sys.modules[n] = m
    return importlib.import_module(f"{TM}.tokenizer.vqvae")


def upstream_divae(cfg, seed: int = 0):
    """terratorch's DiVAE at cfg's sizes (encoder/decoder presets registered beside vit_b_enc / unet_patched),
    every parameter random (upstream zero-initialises some convs, which would make the decoder trivial)."""
    vq = load_upstream()
    vit_models = sys.modules[f"{TM}.tokenizer.models.vit_models"]
    unet = sys.modules[f"{TM}.tokenizer.models.unet.unet"]

    def vit_test_enc(in_channels, patch_size, resolution, patch_proj=True, post_mlp=False):
        return vit_models.ViTEncoder(in_channels=in_channels, patch_size=patch_size, resolution=resolution,
                                     dim_tokens=cfg.enc_dim, depth=cfg.enc_depth, num_heads=cfg.enc_heads,
                                     mlp_ratio=cfg.enc_mlp_ratio, qkv_bias=True, patch_proj=patch_proj,
                                     post_mlp=post_mlp)

    def unet_test(**kw):
        return unet.PatchedUNetCondCat(patch_size=cfg.dec_patch_size, model_channels=cfg.dec_channels,
                                       num_res_blocks=cfg.dec_res_blocks,
                                       attention_resolutions=list(cfg.dec_attention_resolutions),
                                       channel_mult=cfg.dec_channel_mult, num_heads=cfg.dec_num_heads, **kw)

    vit_models.vit_test_enc, unet.unet_test = vit_test_enc, unet_test
    torch.manual_seed(seed)
    model = vq.DiVAE(image_size=cfg.image_size, n_channels=cfg.channels, enc_type="vit_test_enc",
                     dec_type="unet_test", prediction_type=cfg.prediction_type, post_mlp=cfg.post_mlp,
                     patch_size=cfg.patch_size, quant_type="fsq", codebook_size="-".join(map(str, cfg.levels)),
                     latent_dim=cfg.latent_dim, clip_sample=cfg.clip_sample, thresholding=cfg.thresholding)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name == "encoder.pos_emb":
                continue
            if p.ndim == 1:
                p.copy_((1.0 if name.endswith("weight") else 0.0) + 0.1 * torch.randn_like(p))
            else:
                fan_in = p[0].numel()
                p.copy_(torch.randn_like(p) * (3.0 if name.startswith("quant_proj") else 1.0) / fan_in ** 0.5)
    return model.eval()


def state_dict_np(model) -> dict[str, np.ndarray]:
    return {k: v.detach().numpy().copy() for k, v in model.state_dict().items()}


def rel_err(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-12))


def nchw(x) -> "torch.Tensor":
    return torch.from_numpy(np.ascontiguousarray(np.asarray(x).transpose(0, 3, 1, 2)))


def nhwc(t) -> np.ndarray:
    return t.detach().numpy().transpose(0, 2, 3, 1)


@pytest.fixture(scope="module")
def tiny():
    cfg = tokenizer_config("s2l2a", **TINY)
    model = upstream_divae(cfg)
    params = import_params(cfg, state_dict_np(model))
    return cfg, model, Tokenizer(cfg), params


@pytest.mark.parametrize("size", [32, 48])  # 48: the encoder's position grid is interpolated 4x4 -> 6x6
def test_encoder_and_fsq_parity(tiny, size):
    cfg, torch_model, model, params = tiny
    images = np.random.default_rng(size).normal(size=(2, size, size, cfg.channels)).astype(np.float32)
    with torch.no_grad():
        latent_t = torch_model.quant_proj(torch_model.encoder(nchw(images)))
        codes_t, _, ids_t = torch_model.quantize(latent_t)
    latent = model.apply({"params": params}, jnp.asarray(images), method=Tokenizer.latents)
    assert rel_err(latent, nhwc(latent_t)) < 1e-4
    codes, ids = fsq.quantize(jnp.asarray(nhwc(latent_t)), cfg.levels)  # same latent: ids must be identical
    np.testing.assert_array_equal(np.asarray(ids), ids_t.numpy())
    np.testing.assert_allclose(codes, nhwc(codes_t), rtol=0, atol=1e-7)  # digit / (level - 1), to an ulp
    np.testing.assert_array_equal(np.asarray(encode_ids(model, params, jnp.asarray(images))), ids_t.numpy())
    assert len(np.unique(ids_t.numpy())) > 4  # the random weights spread the tokens over the codebook
    up_codes = torch_model.quantize.indices_to_embedding(ids_t.long())
    np.testing.assert_allclose(fsq.ids_to_codes(ids, cfg.levels), nhwc(up_codes), rtol=0, atol=1e-7)


def test_decoder_network_parity(tiny):
    cfg, torch_model, model, params = tiny
    rng = np.random.default_rng(1)
    sample = rng.normal(size=(2, 32, 32, cfg.channels)).astype(np.float32)
    codes = rng.uniform(size=(2, 4, 4, cfg.latent_dim)).astype(np.float32)
    denoise = jax.jit(lambda x, t, c: model.apply({"params": params}, x, t, c, method=Tokenizer.denoise))
    for t in (999, 317):
        with torch.no_grad():
            want = torch_model.decoder(nchw(sample), torch.tensor(t), nchw(codes))
        got = denoise(jnp.asarray(sample), jnp.float32(t), jnp.asarray(codes))
        assert rel_err(got, nhwc(want)) < 1e-4, t
    with pytest.raises(ValueError, match="multiples of 4"):  # UNet patch 2, one halving: 4 px steps
        denoise(jnp.zeros((1, 30, 30, cfg.channels)), jnp.float32(0), jnp.asarray(codes[:1]))


@pytest.mark.parametrize("prediction_type", ["sample", "epsilon", "v_prediction"])
def test_ddim_schedule_and_step(prediction_type):
    from diffusers import DDIMScheduler  # noqa: F401  (upstream's scheduler subclasses diffusers' mixins)
    load_upstream()
    sched_mod = sys.modules[f"{TM}.tokenizer.scheduling.scheduling_ddim"]
    cfg = tokenizer_config("s2l2a", prediction_type=prediction_type)
    up = sched_mod.DDIMScheduler(num_train_timesteps=1000, thresholding=True, clip_sample=True,
                                 beta_schedule="linear", prediction_type=prediction_type, zero_terminal_snr=True)
    assert rel_err(ddim.alphas_cumprod(cfg), up.alphas_cumprod.numpy()) < 1e-6
    for steps, spacing in [(10, "trailing"), (3, "trailing"), (7, "leading"), (7, "linspace")]:
        up.set_timesteps(steps, mode=spacing)
        np.testing.assert_array_equal(ddim.inference_timesteps(cfg, steps, spacing), up.timesteps.numpy())
    up.set_timesteps(10)
    rng = np.random.default_rng(2)
    sample, output = (rng.normal(size=(2, 8, 8, 3)).astype(np.float32) * 1.5 for _ in range(2))
    ac = ddim.alphas_cumprod(cfg)
    for t in (899 if prediction_type == "epsilon" else 999, 499, 99):  # epsilon at zero terminal SNR divides by 0
        want = up.step(nchw(output), t, nchw(sample)).prev_sample
        a_prev = ac[t - 100] if t >= 100 else np.float32(1.0)
        got = ddim.ddim_step(cfg, jnp.asarray(output), jnp.asarray(sample), jnp.float32(ac[t]), jnp.float32(a_prev))
        assert rel_err(got, nhwc(want)) < 1e-5, t


@pytest.mark.slow  # the fast tier keeps the one-pass decoder parity; this scans the whole DDIM loop
def test_full_decode_parity_from_fixed_noise(tiny):
    cfg, torch_model, model, params = tiny
    ids = np.random.default_rng(3).integers(0, cfg.vocab_size, size=(2, 4, 4))
    with torch.no_grad():
        want = torch_model.decode_tokens(torch.from_numpy(ids), timesteps=3, verbose=False,
                                         generator=torch.Generator().manual_seed(7))
    noise = torch.randn((2, cfg.channels, 32, 32), generator=torch.Generator().manual_seed(7))  # what it drew
    got = jax.jit(lambda i, n: decode_ids(model, params, i, n, timesteps=3))(jnp.asarray(ids), jnp.asarray(nhwc(noise)))
    assert rel_err(got, nhwc(want)) < 1e-4
    assert float(jnp.abs(got).max()) <= 1.0  # x0 is thresholded to [-1, 1] at the last step


def test_checkpoint_import_export_roundtrip(tiny, tmp_path):
    cfg, torch_model, _, params = tiny
    sd = state_dict_np(torch_model)
    path = tmp_path / "tok.pt"
    torch.save(torch_model.state_dict(), path)
    _, loaded = load_tokenizer(path, cfg)
    out = save_tokenizer(cfg, loaded, tmp_path / "back.pt")
    fresh = upstream_divae(cfg, seed=1)
    fresh.load_state_dict(torch.load(out, weights_only=True), strict=True)
    back = state_dict_np(fresh)
    assert back.keys() == sd.keys()
    for k in sd:
        np.testing.assert_array_equal(back[k], sd[k], err_msg=k)
    safetensors_path = save_tokenizer(cfg, params, tmp_path / "tok.safetensors")
    _, again = load_tokenizer(safetensors_path, cfg)
    assert all(jax.tree.leaves(jax.tree.map(lambda a, b: np.array_equal(np.asarray(a), np.asarray(b)), again, params)))


def test_strict_report_names_keys(tiny):
    cfg, torch_model, _, _ = tiny
    sd = state_dict_np(torch_model)
    sd.pop("decoder.middle_block.1.qkv.weight")
    sd["decoder.extra.weight"] = np.zeros(3, np.float32)
    with pytest.raises(WeightLoadError, match=r"(?s)missing keys \(1\): decoder\.middle_block\.1\.qkv\.weight.*"
                                              r"unexpected keys \(1\): decoder\.extra\.weight"):
        import_params(cfg, sd)
    params = import_params(cfg, sd, strict=False)
    assert params["decoder"]["middle_block_1"]["qkv"]["kernel"].shape == (64, 192)
    wrong = tokenizer_config(cfg, channels=2)
    with pytest.raises(WeightLoadError, match=r"encoder\.proj\.weight"):
        import_params(wrong, state_dict_np(torch_model))


@pytest.mark.slow  # the backward of the UNet inside the DDIM scan compiles for ~12 s on the CPU
def test_soft_codes_reach_the_image_with_a_gradient(tiny):
    cfg, _, model, params = tiny
    rng = jax.random.key(4)
    logits = jax.random.normal(rng, (1, 4, 4, cfg.vocab_size)) * 3
    noise = jax.random.normal(jax.random.key(5), (1, 32, 32, cfg.channels))

    def loss(lg):
        img = decode_probs(model, params, jax.nn.softmax(lg, axis=-1), noise, timesteps=2)
        return jnp.mean((img - 0.3) ** 2)

    grad = jax.jit(jax.grad(loss))(logits)
    assert bool(jnp.all(jnp.isfinite(grad))) and float(jnp.abs(grad).max()) > 0
    ids = jnp.argmax(logits, axis=-1)  # at one-hot probabilities the soft codes are the ids' codes
    np.testing.assert_allclose(fsq.expected_codes(jax.nn.one_hot(ids, cfg.vocab_size), cfg.levels),
                               fsq.ids_to_codes(ids, cfg.levels), rtol=0, atol=1e-6)


@pytest.mark.slow
def test_released_s2l2a_architecture():
    """The released S2L2A tokenizer's architecture (terratorch's registered arguments): every key and shape
    imports strictly, exports identically, and encode + one decoder pass agree at 64 px on random weights."""
    cfg = tokenizer_config("terramind_v1_tokenizer_s2l2a")
    vq = load_upstream()
    torch.manual_seed(0)
    up = vq.DiVAE(image_size=256, n_channels=12, prediction_type="sample", post_mlp=True, patch_size=16,
                  quant_type="fsq", codebook_size="8-8-8-6-5", latent_dim=5, clip_sample=True).eval()
    with torch.no_grad():  # un-zero the zero-initialised convs
        for name, p in up.named_parameters():
            if not p.abs().sum():
                p.normal_(0, 0.02)
    sd = state_dict_np(up)
    params = import_params(cfg, sd)
    assert sum(v.size for v in jax.tree.leaves(params)) == sum(v.size for v in sd.values())
    back = export_state_dict(cfg, params)
    assert back.keys() == sd.keys() and all(np.array_equal(back[k], sd[k]) for k in sd)
    model = Tokenizer(cfg)
    images = np.random.default_rng(0).normal(size=(1, 64, 64, 12)).astype(np.float32)
    with torch.no_grad():
        latent_t = up.quant_proj(up.encoder(nchw(images)))
        out_t = up.decoder(nchw(images), torch.tensor(999), up.quantize(latent_t)[0])
    latent = model.apply({"params": params}, jnp.asarray(images), method=Tokenizer.latents)
    assert rel_err(latent, nhwc(latent_t)) < 1e-4
    codes = jnp.asarray(nhwc(up.quantize(latent_t)[0]))
    out = model.apply({"params": params}, jnp.asarray(images), jnp.float32(999), codes, method=Tokenizer.denoise)
    assert rel_err(out, nhwc(out_t)) < 1e-4
