"""Depth Anything in Flax against transformers' DepthAnythingForDepthEstimation (random weights), its weight
import/export, and the ViT `feature_maps` against transformers' Dinov2Backbone."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.numpy import load_file, save_file
from transformers import DepthAnythingConfig, DepthAnythingForDepthEstimation, Dinov2Backbone, Dinov2Config
from transformers.models.dpt.image_processing_pil_dpt import get_resize_output_image_size

from helpers.torch_models import TINY_DINOV2, depth_anything, perturbed, rel_err
from jaxvit.models import DepthAnything, WeightLoadError, depth, load_pretrained, save_pretrained
from jaxvit.models.depth_anything import bilinear_resize, input_size


def torch_depth(model, x: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return model(pixel_values=torch.from_numpy(x).permute(0, 3, 1, 2)).predicted_depth.numpy()


def images(h: int, w: int, n: int = 2) -> np.ndarray:
    return np.random.default_rng(h * w).standard_normal((n, h, w, 3)).astype(np.float32)


@pytest.fixture(scope="module")
def relative_dir(tmp_path_factory):
    """(torch model, its transformers directory, (module, params) loaded from that directory)."""
    model = depth_anything()
    path = tmp_path_factory.mktemp("da_relative")
    model.save_pretrained(path)
    return model, path, load_pretrained(path)


def check_parity(model, loaded, sizes) -> np.ndarray:
    """Asserts parity on each (h, w) of `sizes`; returns the last reference map."""
    module, params = loaded
    assert isinstance(module, DepthAnything)
    for h, w in sizes:
        x = images(h, w)
        ref = torch_depth(model, x)
        out = np.asarray(depth(module, params, jnp.asarray(x)))
        assert out.shape == ref.shape == (2, h, w)
        assert 0.2 < (ref > 0).mean() and ref.std() > 0  # a live map, not a dead ReLU or constant
        assert rel_err(out, ref) <= 1e-4, (h, w, rel_err(out, ref))
    return ref


def test_relative_parity_from_disk(relative_dir):
    """An odd, non-square 3x5 patch grid: position interpolation, the stride-2 reassemble conv rounding up."""
    model, _, loaded = relative_dir
    check_parity(model, loaded, [(42, 70)])


def test_metric_parity(tmp_path):
    model = depth_anything("metric")
    model.save_pretrained(tmp_path)
    ref = check_parity(model, load_pretrained(tmp_path), [(56, 84)])
    assert 0 < ref.min() and ref.max() < 20 and ref.std() > 1  # sigmoid x max_depth, not saturated


@pytest.mark.slow
def test_parity_more_sizes(relative_dir, tmp_path):
    """Native 4x4 grid (no position interpolation), non-square, tall and larger inputs; other neck factors,
    widths and head input."""
    model, _, loaded = relative_dir
    check_parity(model, loaded, [(56, 56), (56, 84), (98, 42), (126, 182)])
    model = depth_anything(reassemble_factors=[2, 1, 0.5, 0.25], neck_hidden_sizes=[8, 16, 24, 32],
                           fusion_hidden_size=16, head_hidden_size=8, head_in_index=-2)
    model.save_pretrained(tmp_path)
    check_parity(model, load_pretrained(tmp_path), [(56, 84), (70, 98)])


@pytest.mark.slow
def test_parity_small_architecture(tmp_path):
    """The Depth-Anything-V2-Small architecture (ViT-S/14, blocks 3, 6, 9, 12, default neck) at 266x364."""
    torch.manual_seed(0)
    backbone = Dinov2Config(hidden_size=384, num_attention_heads=6, image_size=518, patch_size=14,
                            out_indices=[3, 6, 9, 12], reshape_hidden_states=False)
    model = perturbed(DepthAnythingForDepthEstimation, DepthAnythingConfig(backbone_config=backbone))
    model.save_pretrained(tmp_path)
    check_parity(model, load_pretrained(tmp_path), [(266, 364)])


def test_export_reloads_identically(relative_dir, tmp_path):
    model, _, (module, params) = relative_dir
    save_pretrained(module, params, tmp_path / "out")
    reloaded = DepthAnythingForDepthEstimation.from_pretrained(tmp_path / "out").eval()
    original, again = model.state_dict(), reloaded.state_dict()
    assert original.keys() == again.keys()
    for k in original:
        assert torch.equal(original[k], again[k]), k
    x = images(56, 84)
    np.testing.assert_array_equal(torch_depth(reloaded, x), torch_depth(model, x))
    assert reloaded.config.backbone_config.out_indices == model.config.backbone_config.out_indices


def test_bad_and_missing_keys(relative_dir, tmp_path):
    _, path, _ = relative_dir
    sd = load_file(path / "model.safetensors")
    sd["neck.convs.9.weight"] = sd.pop("neck.convs.2.weight")
    sd["head.conv2.weight"] = sd["head.conv2.weight"][:, :4]
    save_file(sd, str(tmp_path / "model.safetensors"))
    (tmp_path / "config.json").write_text((path / "config.json").read_text())
    with pytest.raises(WeightLoadError) as e:
        load_pretrained(tmp_path)
    msg = str(e.value)
    assert "missing keys (1): neck.convs.2.weight" in msg and "unexpected keys (1): neck.convs.9.weight" in msg
    assert "head.conv2.weight (16, 4, 3, 3) -> head/conv2/kernel" in msg and str(tmp_path) in msg


def test_hub_id_from_local_cache_only(relative_dir, tmp_path, monkeypatch):
    """A hub id resolves through the local Hugging Face cache (never the network); absent, a clear error."""
    import huggingface_hub.constants
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    hub_id = "depth-anything/Depth-Anything-V2-Small-hf"
    with pytest.raises(WeightLoadError, match="not in the local Hugging Face cache"):
        load_pretrained(hub_id)
    repo = tmp_path / "models--depth-anything--Depth-Anything-V2-Small-hf"
    snapshot = repo / "snapshots" / ("0" * 40)
    snapshot.mkdir(parents=True)
    for name in ("config.json", "model.safetensors"):
        (snapshot / name).write_bytes((relative_dir[1] / name).read_bytes())
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("0" * 40)
    module, params = load_pretrained(hub_id)
    assert isinstance(module, DepthAnything) and module.cfg.out_indices == (1, 2, 3, 4)
    with pytest.raises(WeightLoadError, match="leave arch unset"):
        load_pretrained(hub_id, arch="dinov2_vits14")


def test_vit_feature_maps_match_dinov2_backbone(tmp_path):
    """feature_maps with and without the final norm against Dinov2Backbone(reshape_hidden_states=True), whose
    out_indices count the embeddings as 0: block i's output is index i + 1."""
    torch.manual_seed(0)
    config = Dinov2Config(**TINY_DINOV2, out_indices=[1, 3, 4], reshape_hidden_states=True)
    backbone = perturbed(Dinov2Backbone, config)
    backbone.save_pretrained(tmp_path)
    module, params = load_pretrained(tmp_path)
    x = images(42, 70)

    @jax.jit
    def feature_maps(params, x):
        return [module.apply({"params": params}, x, return_layers=(0, 2, 3), norm_layers=norm)["feature_maps"]
                for norm in (True, False)]

    for outs, norm in zip(feature_maps(params, jnp.asarray(x)), (True, False)):
        backbone.config.apply_layernorm = norm
        with torch.no_grad():
            refs = backbone(pixel_values=torch.from_numpy(x).permute(0, 3, 1, 2)).feature_maps
        for out, ref in zip(outs, refs, strict=True):
            ref = ref.numpy().transpose(0, 2, 3, 1)
            assert out.shape == ref.shape == (2, 3, 5, 64)
            assert rel_err(np.asarray(out), ref) <= 1e-5


@pytest.mark.parametrize("align_corners", [True, False])
def test_bilinear_resize_matches_torch(align_corners):
    x = np.random.default_rng(0).standard_normal((2, 5, 7, 3)).astype(np.float32)
    for size in [(10, 14), (13, 4), (3, 1), (5, 7)]:
        ref = F.interpolate(torch.from_numpy(x).permute(0, 3, 1, 2), size=size, mode="bilinear",
                            align_corners=align_corners).permute(0, 2, 3, 1).numpy()
        out = np.asarray(bilinear_resize(jnp.asarray(x), size, align_corners))
        np.testing.assert_allclose(out, ref, rtol=0, atol=1e-6)


def test_input_size_matches_the_image_processor():
    for h, w in [(480, 640), (1080, 1920), (518, 518), (300, 200), (2000, 600)]:
        ref = get_resize_output_image_size(np.zeros((3, h, w)), (518, 518), keep_aspect_ratio=True, multiple=14)
        assert input_size(h, w) == (ref.height, ref.width)
