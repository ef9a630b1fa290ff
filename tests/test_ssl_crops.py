"""Tests of the DINOv2 multi-crop views (jaxvit.tasks.ssl.crops)."""
import dataclasses
import pickle

import numpy as np
import pytest
from PIL import Image, ImageFilter

from jaxvit.data.transforms import IMAGENET_MEAN, IMAGENET_STD, normalize
from jaxvit.tasks.ssl.crops import MultiCrop, MultiCropConfig

# every random op off, crops of the whole image: a view is resize + normalise
PLAIN = MultiCropConfig(
    global_size=32, local_size=16, n_local=2, global_scale=(1.0, 1.0), local_scale=(1.0, 1.0),
    hflip=0.0, color_jitter_prob=0.0, grayscale_prob=0.0, blur_probs=(0.0, 0.0, 0.0), solarize_prob_global2=0.0,
)


def _image(h=48, w=48, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def _smooth_image(size=40):
    y, x = np.mgrid[0:size, 0:size]
    img = np.stack([x * 255 // (size - 1), y * 255 // (size - 1), (x + y) * 255 // (2 * size - 2)], -1)
    return img.astype(np.uint8)


def _resized(image, size):
    return np.asarray(Image.fromarray(image).resize((size, size), Image.Resampling.BICUBIC))


def _unnormalize(x):
    return x * np.float32(IMAGENET_STD) + np.float32(IMAGENET_MEAN)


def test_shapes_dtype_defaults():
    out = MultiCrop(MultiCropConfig())(_image(256, 320), np.random.default_rng(0))
    assert set(out) == {"global", "local"}
    assert out["global"].shape == (2, 224, 224, 3) and out["global"].dtype == np.float32
    assert out["local"].shape == (8, 96, 96, 3) and out["local"].dtype == np.float32
    assert np.all(np.isfinite(out["global"])) and np.all(np.isfinite(out["local"]))


def test_no_local_crops():
    out = MultiCrop(dataclasses.replace(PLAIN, n_local=0))(_image(), np.random.default_rng(0))
    assert out["local"].shape == (0, 16, 16, 3)


def test_deterministic_and_seed_dependent():
    mc, img = MultiCrop(MultiCropConfig(global_size=64, local_size=32, n_local=4)), _image(80, 96)
    a, b = mc(img, np.random.default_rng(5)), mc(img, np.random.default_rng(5))
    c = mc(img, np.random.default_rng(6))
    for k in ("global", "local"):
        np.testing.assert_array_equal(a[k], b[k])
        assert not np.array_equal(a[k], c[k])
    assert not np.array_equal(a["global"][0], a["global"][1])  # the two global views differ


def test_plain_views_are_resize_and_normalize():
    img = _image(48, 48)
    out = MultiCrop(PLAIN)(img, np.random.default_rng(0))
    g = normalize(_resized(img, 32), IMAGENET_MEAN, IMAGENET_STD)
    loc = normalize(_resized(img, 16), IMAGENET_MEAN, IMAGENET_STD)
    np.testing.assert_allclose(out["global"][0], g, atol=1e-6)
    np.testing.assert_allclose(out["global"][1], g, atol=1e-6)
    np.testing.assert_allclose(out["local"], np.stack([loc, loc]), atol=1e-6)


def test_hflip_forced():
    img = _image(48, 48)
    out = MultiCrop(dataclasses.replace(PLAIN, hflip=1.0))(img, np.random.default_rng(0))
    g = normalize(_resized(img, 32)[:, ::-1], IMAGENET_MEAN, IMAGENET_STD)
    np.testing.assert_allclose(out["global"][0], g, atol=1e-6)


def test_grayscale_forced():
    img = _image(32, 32)
    cfg = dataclasses.replace(PLAIN, grayscale_prob=1.0)
    out = MultiCrop(cfg)(img, np.random.default_rng(0))
    rgb = _resized(img, 32).astype(np.float64)
    luma = rgb @ np.array([0.299, 0.587, 0.114])  # ITU-R 601-2
    for view in (out["global"][0], out["global"][1]):
        px = _unnormalize(view) * 255.0
        np.testing.assert_allclose(px[..., 0], px[..., 1], atol=1e-3)  # replicated to 3 channels
        np.testing.assert_allclose(px[..., 0], px[..., 2], atol=1e-3)
        np.testing.assert_allclose(px[..., 0], luma, atol=1.01)  # PIL's fixed-point rounding
    assert out["local"].shape == (2, 16, 16, 3)


def test_solarize_forced_only_on_global2():
    img = _image(32, 32)
    cfg = dataclasses.replace(PLAIN, solarize_prob_global2=1.0, solarize_threshold=100)
    out = MultiCrop(cfg)(img, np.random.default_rng(0))
    base = _resized(img, 32)
    sol = np.where(base >= 100, 255 - base, base).astype(np.uint8)
    np.testing.assert_allclose(out["global"][1], normalize(sol, IMAGENET_MEAN, IMAGENET_STD), atol=1e-6)
    np.testing.assert_allclose(out["global"][0], normalize(base, IMAGENET_MEAN, IMAGENET_STD), atol=1e-6)
    np.testing.assert_allclose(out["local"][0], normalize(_resized(img, 16), IMAGENET_MEAN, IMAGENET_STD),
                               atol=1e-6)


def _gauss_blur_reference(x, sigma, radius=8):
    """Exact separable Gaussian (edge-replicated) of an (H, W, C) float array."""
    t = np.arange(-radius, radius + 1)
    k = np.exp(-0.5 * (t / sigma) ** 2)
    k /= k.sum()
    p = np.pad(x, ((radius, radius), (radius, radius), (0, 0)), mode="edge")
    p = sum(k[i] * p[i:i + x.shape[0]] for i in range(len(k)))
    return sum(k[i] * p[:, i:i + x.shape[1]] for i in range(len(k)))


@pytest.mark.parametrize("which", [0, 1, 2])  # global 1, global 2, locals
def test_blur_forced(which):
    img = _smooth_image(40)
    probs = [0.0, 0.0, 0.0]
    probs[which] = 1.0
    sigma = 1.5
    cfg = dataclasses.replace(PLAIN, global_size=40, local_size=40, blur_probs=tuple(probs),
                              blur_sigma=(sigma, sigma))
    out = MultiCrop(cfg)(img, np.random.default_rng(0))
    views = [out["global"][0], out["global"][1], out["local"][0]]
    base = _resized(img, 40)
    blurred = np.asarray(Image.fromarray(base).filter(ImageFilter.GaussianBlur(radius=sigma)))
    for i, v in enumerate(views):
        want = blurred if i == which else base
        np.testing.assert_allclose(v, normalize(want, IMAGENET_MEAN, IMAGENET_STD), atol=1e-6)
    # PIL's box-blur approximation is close to an exact Gaussian of that sigma (interior pixels)
    ref = _gauss_blur_reference(base.astype(np.float64), sigma)
    assert np.abs(blurred.astype(np.float64) - ref)[6:-6, 6:-6].max() <= 2.0
    # and it really blurs: a random image loses most of its high-frequency energy
    noisy = _image(40, 40)
    v = MultiCrop(cfg)(noisy, np.random.default_rng(0))
    v = [v["global"][0], v["global"][1], v["local"][0]][which]
    sharp = normalize(_resized(noisy, 40), IMAGENET_MEAN, IMAGENET_STD)
    assert np.abs(np.diff(v, axis=1)).mean() < 0.5 * np.abs(np.diff(sharp, axis=1)).mean()


def test_blur_sigma_drawn_in_range():
    img = _image(40, 40)
    cfg = dataclasses.replace(PLAIN, global_size=40, blur_probs=(1.0, 0.0, 0.0), blur_sigma=(0.5, 1.0))
    out = MultiCrop(cfg)(img, np.random.default_rng(3))["global"][0]
    base = _resized(img, 40)
    errs = {s: np.abs(out - normalize(np.asarray(Image.fromarray(base).filter(ImageFilter.GaussianBlur(s))),
                                      IMAGENET_MEAN, IMAGENET_STD)).mean() for s in (0.3, 0.75, 1.5)}
    assert errs[0.75] < errs[0.3] and errs[0.75] < errs[1.5]


def test_local_crops_cover_smaller_areas():
    # pixel values encode coordinates: R = column, G = row (256 x 256 so they fit in uint8)
    y, x = np.mgrid[0:256, 0:256]
    img = np.stack([x, y, np.zeros_like(x)], -1).astype(np.uint8)
    cfg = dataclasses.replace(MultiCropConfig(), global_size=64, local_size=32, n_local=8, hflip=0.0,
                              color_jitter_prob=0.0, grayscale_prob=0.0, blur_probs=(0.0, 0.0, 0.0),
                              solarize_prob_global2=0.0)

    def area_fraction(view, size):
        px = _unnormalize(view) * 255.0
        # output pixel centres span (size - 1) / size of the box side
        w = np.ptp(px[..., 0]) * size / (size - 1)
        h = np.ptp(px[..., 1]) * size / (size - 1)
        return w * h / 256.0**2

    glob, loc = [], []
    for seed in range(4):
        out = MultiCrop(cfg)(img, np.random.default_rng(seed))
        glob += [area_fraction(v, 64) for v in out["global"]]
        loc += [area_fraction(v, 32) for v in out["local"]]
    lo, hi = cfg.global_scale
    assert all(lo * 0.9 <= a <= hi * 1.05 for a in glob), glob
    lo, hi = cfg.local_scale
    assert all(lo * 0.9 <= a <= hi * 1.1 for a in loc), loc
    assert max(loc) < np.median(glob) and np.mean(loc) < 0.5 * np.mean(glob)


def test_pickle_round_trip():
    mc = MultiCrop(MultiCropConfig(global_size=48, local_size=24, n_local=3))
    mc2 = pickle.loads(pickle.dumps(mc))
    assert mc2.cfg == mc.cfg
    img = _image(64, 64)
    a, b = mc(img, np.random.default_rng(11)), mc2(img, np.random.default_rng(11))
    for k in ("global", "local"):
        np.testing.assert_array_equal(a[k], b[k])


def test_grey_image_gives_the_views_of_its_rgb_copy():
    grey = np.random.default_rng(3).integers(0, 256, (90, 70), dtype=np.uint8)
    base = MultiCropConfig(global_size=40, local_size=24, n_local=3)
    forced = dataclasses.replace(base, hflip=1.0, color_jitter_prob=1.0, blur_probs=(1.0, 1.0, 1.0),
                                 solarize_prob_global2=1.0)
    for cfg in (base, forced):  # every random op: crops, flips, jitter (all four), grayscale, blur, solarize
        for seed in range(6):
            a = MultiCrop(cfg)(grey, np.random.default_rng(seed))
            b = MultiCrop(cfg)(np.repeat(grey[:, :, None], 3, axis=2), np.random.default_rng(seed))
            for k in ("global", "local"):
                np.testing.assert_array_equal(a[k], b[k])


def test_rejects_bad_input_and_config():
    with pytest.raises(ValueError):
        MultiCrop(PLAIN)(np.zeros((8, 8, 2), np.uint8), np.random.default_rng(0))
    with pytest.raises(ValueError):
        MultiCropConfig(grayscale_prob=1.5)
    with pytest.raises(ValueError):
        MultiCropConfig(blur_probs=(1.0, 0.1))
