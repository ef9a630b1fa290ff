"""Native-dtype decoding, multi-field geometry, pre-flight checks and the CSV source, on real files
written to tmp_path."""
from __future__ import annotations

import json
import os
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import tifffile
from PIL import Image

from jaxvit.data import geometry as geo
from jaxvit.data.decode import load_array, normalize_channels, to_float
from jaxvit.data.preflight import check_files
from jaxvit.data.sources import CsvSource, ImageLoadError, load_image


def _rng(seed: int = 0) -> np.random.Generator:
    return np.random.default_rng(seed)


# ----------------------------------------------------------------------------- decode


def test_png_8bit_modes_and_16bit(tmp_path):
    rgb = _rng().integers(0, 256, (9, 11, 3), dtype=np.uint8)
    rgba = _rng(1).integers(0, 256, (9, 11, 4), dtype=np.uint8)
    gray16 = _rng(2).integers(0, 65536, (9, 11), dtype=np.uint16)
    gray16[0, 0] = 65535  # above the int16 range
    Image.fromarray(rgb).save(tmp_path / "rgb.png")
    Image.fromarray(rgba).save(tmp_path / "rgba.png")
    Image.fromarray(rgb[:, :, 0]).save(tmp_path / "gray.bmp")
    Image.fromarray(gray16).save(tmp_path / "gray16.png")
    Image.fromarray(rgb).convert("P").save(tmp_path / "palette.png")
    Image.fromarray(rgb).save(tmp_path / "rgb.jpg", quality=90)

    np.testing.assert_array_equal(load_array(tmp_path / "rgb.png"), rgb)
    np.testing.assert_array_equal(load_array(tmp_path / "rgba.png"), rgba)
    np.testing.assert_array_equal(load_array(tmp_path / "gray.bmp"), rgb[:, :, :1])
    x16 = load_array(str(tmp_path / "gray16.png"))
    assert x16.dtype == np.uint16 and x16.shape == (9, 11, 1)
    np.testing.assert_array_equal(x16[:, :, 0], gray16)
    # PIL decodes a 16-bit PGM as int32 mode "I": the file is 16-bit, so uint16 comes back.
    (tmp_path / "gray16.pgm").write_bytes(b"P5\n11 9\n65535\n" + gray16.astype(">u2").tobytes())
    x16 = load_array(tmp_path / "gray16.pgm")
    assert x16.dtype == np.uint16
    np.testing.assert_array_equal(x16[:, :, 0], gray16)
    palette_rgb = np.asarray(Image.open(tmp_path / "palette.png").convert("RGB"))
    np.testing.assert_array_equal(load_array(tmp_path / "palette.png"), palette_rgb)
    jpg = load_array(tmp_path / "rgb.jpg")
    assert jpg.dtype == np.uint8 and jpg.shape == (9, 11, 3)
    np.testing.assert_array_equal(jpg, np.asarray(Image.open(tmp_path / "rgb.jpg")))


def _write_png_rgb16(path: Path, x: np.ndarray) -> None:
    """Minimal 16-bit RGB PNG writer (PIL cannot write one)."""
    h, w, _ = x.shape
    rows = b"".join(b"\x00" + x[i].astype(">u2").tobytes() for i in range(h))

    def chunk(kind: bytes, data: bytes) -> bytes:
        crc = struct.pack(">I", zlib.crc32(kind + data))
        return struct.pack(">I", len(data)) + kind + data + crc

    ihdr = struct.pack(">IIBBBBB", w, h, 16, 2, 0, 0, 0)
    body = chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b"")
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + body)


def test_tiff_single_page_dtypes(tmp_path):
    u16 = _rng().integers(0, 65536, (7, 13), dtype=np.uint16)
    f32 = _rng(1).normal(size=(7, 13)).astype(np.float32)
    f64 = _rng(2).normal(size=(7, 13, 2))
    tifffile.imwrite(tmp_path / "u16.tif", u16)
    tifffile.imwrite(tmp_path / "f32.tiff", f32)
    tifffile.imwrite(tmp_path / "f64.tif", f64, photometric="minisblack", planarconfig="contig")
    refs = {"u16.tif": u16[:, :, None], "f32.tiff": f32[:, :, None], "f64.tif": f64}
    for name, ref in refs.items():
        x = load_array(tmp_path / name)
        assert x.dtype == ref.dtype and x.shape == ref.shape, name
        np.testing.assert_array_equal(x, ref)


def test_tiff_five_channels_in_every_layout(tmp_path):
    hwc = _rng().integers(0, 65536, (20, 24, 5), dtype=np.uint16)
    chw = np.ascontiguousarray(hwc.transpose(2, 0, 1))
    tifffile.imwrite(tmp_path / "hwc.tif", hwc, photometric="minisblack", planarconfig="contig")
    tifffile.imwrite(tmp_path / "planar.tif", chw, photometric="minisblack",
                     planarconfig="separate")
    tifffile.imwrite(tmp_path / "chw_pages.tif", chw)  # 5 pages, axes unknown ("QYX")
    tifffile.imwrite(tmp_path / "hwc_default.tif", hwc)  # 20 pages of 24x5: by the shape rule
    for name in ["hwc.tif", "planar.tif", "chw_pages.tif", "hwc_default.tif"]:
        x = load_array(tmp_path / name)
        assert x.dtype == np.uint16, name
        np.testing.assert_array_equal(x, hwc, err_msg=name)


def test_multipage_tiff_pages_become_channels(tmp_path):
    pages = [_rng(i).integers(0, 4096, (10, 12), dtype=np.uint16) for i in range(3)]
    with tifffile.TiffWriter(tmp_path / "one_by_one.tif") as tif:
        for p in pages:
            tif.write(p)
    pil_pages = [Image.fromarray(p.astype(np.uint8)) for p in pages]
    pil_pages[0].save(tmp_path / "pil.tif", save_all=True, append_images=pil_pages[1:])
    np.testing.assert_array_equal(load_array(tmp_path / "one_by_one.tif"), np.stack(pages, -1))
    np.testing.assert_array_equal(load_array(tmp_path / "pil.tif"),
                                  np.stack(pages, -1).astype(np.uint8))


def test_npy_and_one_file_per_channel(tmp_path):
    a = _rng().integers(-5, 100_000, (6, 8, 3)).astype(np.int32)
    np.save(tmp_path / "hwc.npy", a)
    np.save(tmp_path / "chw.npy", np.ascontiguousarray(a.transpose(2, 0, 1)))
    np.save(tmp_path / "plane.npy", a[:, :, 0].astype(np.float64))
    np.testing.assert_array_equal(load_array(tmp_path / "hwc.npy"), a)
    np.testing.assert_array_equal(load_array(tmp_path / "chw.npy"), a)
    plane = load_array(tmp_path / "plane.npy")
    assert plane.dtype == np.float64 and plane.shape == (6, 8, 1)

    chans = [_rng(i).integers(0, 65536, (6, 8), dtype=np.uint16) for i in range(4)]
    files = [tmp_path / f"c{i}.png" for i in range(4)]
    for f, c in zip(files, chans):
        Image.fromarray(c).save(f)
    x = load_array([str(f) for f in files])
    assert x.dtype == np.uint16
    np.testing.assert_array_equal(x, np.stack(chans, -1))

    Image.fromarray(chans[0][:5]).save(tmp_path / "short.png")
    with pytest.raises(ImageLoadError) as e:
        load_array([files[0], files[1], tmp_path / "short.png"])
    assert e.value.path == str(tmp_path / "short.png") and "8x5" in str(e.value)
    Image.fromarray(chans[0].astype(np.uint8)).save(tmp_path / "u8.png")
    with pytest.raises(ImageLoadError, match="dtype uint8") as e:
        load_array([files[0], tmp_path / "u8.png"])
    assert e.value.path == str(tmp_path / "u8.png")


def test_load_array_errors_name_the_file(tmp_path):
    (tmp_path / "garbage.png").write_bytes(b"not an image at all" * 10)
    (tmp_path / "garbage.tif").write_bytes(b"II*\x00garbage")
    np.save(tmp_path / "4d.npy", np.zeros((2, 3, 4, 5)))
    _write_png_rgb16(tmp_path / "rgb16.png", np.full((3, 4, 3), 1000, np.uint16))
    for name in ["garbage.png", "garbage.tif", "4d.npy", "rgb16.png", "missing.png"]:
        with pytest.raises(ImageLoadError) as e:
            load_array(tmp_path / name)
        assert e.value.path == str(tmp_path / name) and name in str(e.value)
    with pytest.raises(ImageLoadError, match="16-bit colour PNG"):
        load_array(tmp_path / "rgb16.png")


def test_to_float_and_normalize_channels():
    u8 = np.array([[0, 128, 255]], np.uint8)
    u16 = np.array([[0, 1000, 65535]], np.uint16)
    i32_small = np.array([[0, 1000, 65535]], np.int32)
    i32_big = np.array([[-10, 50, 200_000]], np.int32)
    f64 = np.array([[-1.5, 0.25, 3.0]])
    for x, div in [(u8, 255), (u16, 65535), (i32_small, 65535), (i32_big, 200_000), (f64, 1)]:
        y = to_float(x)
        assert y.dtype == np.float32
        np.testing.assert_allclose(y, x.astype(np.float64) / div, rtol=1e-6)
    np.testing.assert_array_equal(to_float(u16, "none"), u16.astype(np.float32))
    with pytest.raises(ValueError):
        to_float(u8, "minmax")

    x = _rng().normal(size=(4, 3, 5)).astype(np.float32)
    mean, std = [0.1, 0.2, 0.3, 0.4, 0.5], [1.0, 2.0, 0.5, 4.0, 0.25]
    y = normalize_channels(x, mean, std)
    for c in range(5):
        np.testing.assert_allclose(y[..., c], (x[..., c] - mean[c]) / std[c], rtol=1e-5)
    np.testing.assert_allclose(normalize_channels(x, [0.5], [2.0]), (x - 0.5) / 2.0, rtol=1e-6)
    with pytest.raises(ValueError, match="expected 1 or 5"):
        normalize_channels(x, [0.1, 0.2], [1.0])


# ----------------------------------------------------------------------------- geometry


def _block_image(h: int, w: int, seed: int) -> np.ndarray:
    """(h, w, 2) float: channel 0 is 0.1 or 0.9 on 8x8 blocks, channel 1 is noise."""
    blocks = _rng(seed).random((h // 8, w // 8)) < 0.5
    ch0 = np.where(np.kron(blocks, np.ones((8, 8), bool)), 0.9, 0.1)
    return np.stack([ch0, _rng(seed + 100).random((h, w))], -1).astype(np.float32)


def test_masks_follow_images_through_crops_flips_and_turns():
    image = _block_image(48, 64, seed=3)
    mask = (1 + (image[:, :, 0] > 0.5)).astype(np.int32)
    example = {"image": image, "mask": mask, "label": 7, "path": "a.png"}
    spatial = {"image": "bilinear", "mask": "nearest"}
    rng = _rng(0)
    seen = set()
    for _ in range(12):
        g = geo.sample_geometry(48, 64, (40, 56), rng, crop_scale=(0.2, 1.0),
                                hflip=True, vflip=True, rot90=True)
        seen.add((g.hflip, g.vflip, g.rot90))
        out = geo.apply_to_fields(example, g, spatial)
        assert out["label"] == 7 and out["path"] == "a.png"
        assert out["image"].shape == (40, 56, 2) and out["image"].dtype == np.float32
        assert out["mask"].shape == (40, 56) and out["mask"].dtype == np.int32
        v = out["image"][:, :, 0]
        pure = (np.abs(v - 0.1) < 1e-4) | (np.abs(v - 0.9) < 1e-4)  # away from block edges
        assert pure.mean() > 0.3
        np.testing.assert_array_equal(out["mask"][pure], 1 + (v[pure] > 0.5))
    assert len(seen) >= 6  # flips and turns were really exercised
    with pytest.raises(KeyError, match="depth"):
        geo.apply_to_fields(example, g, {"depth": "nearest"})


def test_nearest_keeps_ids_and_matches_pil():
    ids = np.array([0, 3, 7, 1000, 65535], np.uint16)
    mask = ids[_rng().integers(0, 5, (30, 50))]
    rng = _rng(1)
    for _ in range(10):
        g = geo.sample_geometry(30, 50, (37, 23), rng, vflip=True, rot90=True)
        out = geo.apply_geometry(mask, g, "nearest")
        assert out.dtype == np.uint16 and set(np.unique(out)) <= set(ids.tolist())
        h, w = (23, 37) if g.rot90 % 2 else (37, 23)
        ref = np.asarray(Image.fromarray(mask.astype(np.int32)).resize(
            (w, h), Image.Resampling.NEAREST, box=g.box))
        ref = ref[:, ::-1] if g.hflip else ref
        ref = ref[::-1] if g.vflip else ref
        np.testing.assert_array_equal(out, np.rot90(ref, g.rot90))
        multi = geo.apply_geometry(np.stack([mask, mask // 2], -1), g, "nearest")
        np.testing.assert_array_equal(multi[:, :, 1], out // 2)


def test_sample_geometry_is_seeded_and_boxes_are_valid():
    def draw(seed):
        return [geo.sample_geometry(60, 80, 32, r, vflip=True, rot90=True)
                for r in [_rng(seed)] for _ in range(20)]

    assert draw(5) == draw(5) and draw(5) != draw(6)
    for g in draw(7):
        x0, y0, x1, y1 = g.box
        assert 0 <= x0 < x1 <= 80 and 0 <= y0 < y1 <= 60 and g.out_size == (32, 32)
        area, aspect = (x1 - x0) * (y1 - y0) / (60 * 80), (x1 - x0) / (y1 - y0)
        assert 0.08 - 1e-9 <= area <= 1 + 1e-9 and 3 / 4 - 1e-9 <= aspect <= 4 / 3 + 1e-9
    # An impossible request (full area at aspect 2..3 on a square) falls back to a centred box.
    g = geo.sample_geometry(40, 40, 8, _rng(), crop_scale=(1, 1), crop_ratio=(2, 3))
    np.testing.assert_allclose(g.box, (0, 10, 40, 30))


def test_center_geometry():
    g = geo.center_geometry(100, 60, 32, crop_ratio=0.8)
    # shorter side 60 -> 32 / 0.8 = 40 px, so 32 output px span 48 source px, centred
    np.testing.assert_allclose(g.box, (6, 26, 54, 74))
    assert g.out_size == (32, 32) and not (g.hflip or g.vflip or g.rot90)
    np.testing.assert_allclose(geo.center_geometry(50, 100, (20, 40)).box, (0, 0, 100, 50))


def test_bilinear_constant_and_matches_pil_8bit():
    const = np.full((30, 40, 3), 40000, np.uint16)
    g = geo.sample_geometry(30, 40, (17, 65), _rng(), vflip=True, rot90=True)
    out = geo.apply_geometry(const, g, "bilinear")
    assert out.dtype == np.float32 and out.shape == (17, 65, 3)
    np.testing.assert_allclose(out, 40000, rtol=1e-5)

    yy, xx = np.mgrid[0:50, 0:70]
    gray = (127 + 60 * np.sin(xx / 5.0) * np.cos(yy / 7.0) + _rng().integers(-20, 20, (50, 70)))
    gray = gray.clip(0, 255).astype(np.uint8)
    for box, size in [((3.3, 5.7, 61.2, 44.9), (20, 24)), ((10.5, 2.25, 30.0, 20.0), (64, 48))]:
        g = geo.Geometry(box, size)
        ours = geo.apply_geometry(gray, g, "bilinear")
        pil = np.asarray(Image.fromarray(gray).resize((size[1], size[0]),
                                                      Image.Resampling.BILINEAR, box=box))
        assert ours.shape == pil.shape
        assert np.abs(ours - pil.astype(np.float32)).max() <= 1.0


# ----------------------------------------------------------------------------- preflight


@pytest.fixture
def image_dir(tmp_path):
    """30 small PNGs; 007 is truncated (header intact), 019 is garbage bytes."""
    paths = []
    for i in range(30):
        p = tmp_path / "imgs" / f"{i:03d}.png"
        p.parent.mkdir(exist_ok=True)
        Image.fromarray(_rng(i).integers(0, 256, (24, 24, 3), dtype=np.uint8)).save(p)
        paths.append(str(p))
    data = Path(paths[7]).read_bytes()
    Path(paths[7]).write_bytes(data[: len(data) // 2])
    Path(paths[19]).write_bytes(bytes(range(256)) * 2)
    return paths


class CountingDecode:
    def __init__(self):
        self.calls = 0

    def __call__(self, path):
        self.calls += 1
        return load_image(path)


def test_preflight_full_and_sample(image_dir):
    truncated, garbage = image_dir[7], image_dir[19]
    dec = CountingDecode()
    r = check_files(image_dir, "full", dec)
    assert r.mode == "full" and not r.cached and (r.checked, r.decoded, dec.calls) == (30, 30, 30)
    assert [p for p, _ in r.unreadable] == [truncated, garbage]

    # Header pass alone: only the garbage file fails (the truncated PNG's header is intact).
    dec = CountingDecode()
    r = check_files(image_dir, "sample", dec, sample=0)
    assert r.mode == "sample" and [p for p, _ in r.unreadable] == [garbage]
    assert (r.checked, r.decoded, dec.calls) == (30, 0, 0)
    # A sample of everything decodes all files whose header parsed.
    dec = CountingDecode()
    r = check_files(image_dir, "sample", dec, sample=30)
    assert [p for p, _ in r.unreadable] == [truncated, garbage] and dec.calls == r.decoded == 29
    dec = CountingDecode()
    r = check_files(image_dir, "sample", dec, sample=5, seed=1)
    assert garbage in dict(r.unreadable) and dec.calls == r.decoded <= 5
    assert set(dict(r.unreadable)) <= {truncated, garbage}

    assert check_files(image_dir, "auto", CountingDecode(), full_limit=29).mode == "sample"
    assert check_files(image_dir, "auto", CountingDecode(), full_limit=30).mode == "full"
    dec = CountingDecode()
    assert check_files(image_dir, "off", dec).mode == "off" and dec.calls == 0
    with pytest.raises(ValueError, match="preflight mode"):
        check_files(image_dir, "quick", dec)


def test_preflight_header_pass_for_tiff_and_npy(tmp_path):
    tifffile.imwrite(tmp_path / "ok.tif", np.zeros((4, 4), np.uint16))
    (tmp_path / "bad.tif").write_bytes(b"MM\x00*" + bytes(range(7, 47)))  # bad IFD offset
    np.save(tmp_path / "ok.npy", np.zeros((4, 4, 2)))
    np.save(tmp_path / "short.npy", np.zeros((40, 40)))
    data = (tmp_path / "short.npy").read_bytes()
    (tmp_path / "short.npy").write_bytes(data[:-100])
    paths = [str(tmp_path / n) for n in ["ok.tif", "bad.tif", "ok.npy", "short.npy"]]
    r = check_files(paths, "sample", load_array, sample=0)
    assert [p for p, _ in r.unreadable] == [paths[1], paths[3]]


def test_preflight_manifest_reuse_and_invalidation(image_dir, tmp_path):
    manifest = tmp_path / "run" / "preflight.json"
    dec = CountingDecode()
    first = check_files(image_dir, "full", dec, manifest=manifest)
    assert dec.calls == 30 and manifest.exists() and not first.cached
    assert json.loads(manifest.read_text())["mode"] == "full"
    for mode in ["full", "sample", "auto"]:  # a full result covers every request
        r = check_files(image_dir, mode, dec, manifest=manifest)
        assert r.cached and dec.calls == 30 and r.unreadable == first.unreadable
        assert (r.mode, r.decoded) == ("full", 30)

    # Any change to the file list re-runs the check.
    st = os.stat(image_dir[3])
    os.utime(image_dir[3], ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000))
    assert not check_files(image_dir, "full", dec, manifest=manifest).cached and dec.calls == 60
    assert check_files(image_dir, "full", dec, manifest=manifest).cached and dec.calls == 60
    assert not check_files(image_dir[1:], "full", dec, manifest=manifest).cached
    extra = Path(image_dir[0]).with_name("extra.png")
    Image.fromarray(np.zeros((5, 5), np.uint8)).save(extra)
    assert not check_files(image_dir + [str(extra)], "full", dec, manifest=manifest).cached

    # A sample result does not cover a full request or a bigger sample.
    small = tmp_path / "small.json"
    check_files(image_dir, "sample", dec, manifest=small, sample=5)
    assert check_files(image_dir, "sample", dec, manifest=small, sample=5).cached
    assert not check_files(image_dir, "sample", dec, manifest=small, sample=10).cached
    assert not check_files(image_dir, "full", dec, manifest=small).cached
    assert not list(tmp_path.glob("**/*.tmp*"))  # atomic writes leave no temporaries


# ----------------------------------------------------------------------------- CSV source


def _csv(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def _touch_images(root: Path, names: list[str]) -> None:
    for n in names:
        (root / n).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.zeros((4, 4), np.uint8)).save(root / n)


def test_csv_source_happy_path(tmp_path):
    _touch_images(tmp_path, ["img/a.png", "img/b.png"])
    _touch_images(tmp_path / "elsewhere", ["c.png"])
    c_abs = tmp_path / "elsewhere" / "c.png"
    csv_path = _csv(tmp_path / "data.csv",
                    "image_path, y1,y2,cls,note\n"
                    "img/a.png,0.5,-1,2,x\n"
                    f"img/b.png,1e-3,4,0,\n"
                    f"{c_abs},7,8.25,1,z\n")
    src = CsvSource(csv_path, target_columns=("y2", "y1"), label_column="cls")
    assert len(src) == 3 and src.paths == [str(tmp_path / "img/a.png"),
                                           str(tmp_path / "img/b.png"), str(c_abs)]
    assert src.targets.dtype == np.float32
    np.testing.assert_array_equal(src.targets, np.float32([[-1, 0.5], [4, 1e-3], [8.25, 7]]))
    np.testing.assert_array_equal(src.labels, [2, 0, 1])
    item = src[1]
    assert item["path"] == src.paths[1] and item["label"] == 0
    np.testing.assert_array_equal(item["targets"], np.float32([4, 1e-3]))

    # root= overrides the CSV's directory for relative paths; no targets gives [N, 0].
    (tmp_path / "sub").mkdir()
    moved = _csv(tmp_path / "sub" / "rel.csv", "file\nimg/a.png\n")
    src = CsvSource(moved, image_column="file", root=tmp_path)
    assert src.paths == [str(tmp_path / "img/a.png")] and src.targets.shape == (1, 0)
    assert "label" not in src[0]


def _csv_error(csv_path: Path, **kwargs) -> str:
    with pytest.raises(ValueError) as e:
        CsvSource(csv_path, **kwargs)
    msg = str(e.value)
    assert "\n" not in msg and str(csv_path) in msg
    return msg


def test_csv_source_errors(tmp_path):
    _touch_images(tmp_path, ["a.png", "b.png"])
    msg = _csv_error(_csv(tmp_path / "cols.csv", "path,y\na.png,1\n"), target_columns=("y", "z"))
    assert "'image_path'" in msg and "'z'" in msg and "['path', 'y']" in msg

    msg = _csv_error(_csv(tmp_path / "num.csv", "image_path,y\na.png,1\nb.png,abc\n"),
                     target_columns=("y",))
    assert "line 3" in msg and "'abc'" in msg and "'y'" in msg
    msg = _csv_error(_csv(tmp_path / "nan.csv", "image_path,y\na.png,nan\n"),
                     target_columns=("y",))
    assert "line 2" in msg and "'nan'" in msg
    msg = _csv_error(_csv(tmp_path / "lab.csv", "image_path,c\na.png,1.5\n"), label_column="c")
    assert "integer" in msg and "'1.5'" in msg

    assert "empty" in _csv_error(_csv(tmp_path / "empty.csv", ""))
    assert "no rows" in _csv_error(_csv(tmp_path / "header.csv", "image_path,y\n"))

    rows = "".join(f"missing{i}.png\n" for i in range(5))
    msg = _csv_error(_csv(tmp_path / "files.csv", "image_path\na.png\n" + rows))
    assert "5 of 6 image files do not exist" in msg and "missing0.png" in msg
    assert str(tmp_path) in msg  # names the root the paths were resolved against
