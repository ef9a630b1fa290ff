"""Cell segmentation data as published: LIVECell's COCO polygons and Cellpose's NAME_img / NAME_masks pairs, and
validation held out of train (data.val_fraction)."""
from __future__ import annotations

import json

import numpy as np
import pytest
import tifffile
from PIL import Image

from jaxvit.config import base_config
from jaxvit.data.sources import ImageLoadError
from jaxvit.errors import DataError, MissingDataError
from jaxvit.tasks.cell_distance.data import PairedSource, load_mask
from jaxvit.tasks.cell_distance.task import CellDistance, check_pair

H, W = 40, 56


def _square(x0, y0, x1, y1):  # a polygon along pixel edges: covers columns x0..x1-1, rows y0..y1-1
    return [x0, y0, x1, y0, x1, y1, x0, y1]


def _livecell(root, split="train", as_dict=True):
    """LIVECell's download: annotations/LIVECell/livecell_coco_<split>.json, images/livecell_train_val_images/."""
    images_dir = root / "images" / "livecell_train_val_images"
    images_dir.mkdir(parents=True, exist_ok=True)
    images, annotations, truth = [], [], {}
    for k in range(3):
        name = f"A172_Phase_A7_1_00d00h00m_{k + 1}.tif"
        tifffile.imwrite(images_dir / name, np.random.default_rng(k).integers(0, 255, (H, W), dtype=np.uint8))
        images.append({"id": 100 + k, "file_name": name, "height": H, "width": W})
        boxes = [(2, 3, 12, 9), (20, 5, 31, 20 + k), (10, 25, 50, 38)][: k + 1]
        mask = np.zeros((H, W), np.int32)
        for cell, (x0, y0, x1, y1) in enumerate(boxes, start=1):
            annotations.append({"id": 1000 + 10 * k + cell, "image_id": 100 + k, "category_id": 1, "iscrowd": 0,
                                "segmentation": [_square(x0, y0, x1, y1)], "bbox": [x0, y0, x1 - x0, y1 - y0]})
            mask[y0:y1, x0:x1] = cell
        truth[name] = mask
    ann = {str(a["id"]): a for a in annotations} if as_dict else annotations  # LIVECell stores a dict
    path = root / "annotations" / "LIVECell" / f"livecell_coco_{split}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"images": images, "annotations": ann, "categories": [{"id": 1, "name": "cell"}]}))
    return truth, path


@pytest.mark.parametrize("as_dict", [True, False])
def test_livecell_coco_polygons_become_instance_masks(tmp_path, as_dict):
    truth, path = _livecell(tmp_path, as_dict=as_dict)
    src = PairedSource(tmp_path, "train")
    assert src.location == str(path) and len(src) == 3
    for image, mask in zip(src.paths, src.mask_paths):
        np.testing.assert_array_equal(load_mask(mask), truth[image.rsplit("/", 1)[1]])
        check_pair(dict(zip(src.paths, src.mask_paths)), image)


def test_the_dinocell_demo_is_livecell_layout_whose_polygons_give_back_the_rendered_cells(tmp_path):
    """The demo writes COCO polygons of the rendered cells; read through the LIVECell reader they rasterise to the
    renderer's labels pixel for pixel (0 of 3.1 M pixels differ over the default demo's 336 sites)."""
    from jaxvit.demos import cells
    root = cells.write_livecell(tmp_path, counts=(3, 2, 2), size=48)
    assert (root / "annotations" / "LIVECell" / "livecell_coco_val.json").is_file()
    assert len(list((root / "images" / "livecell_train_val_images").iterdir())) == 5
    for s, split in enumerate(("train", "val", "test")):
        src = PairedSource(root, split)
        assert len(src) == (3, 2, 2)[s] and src.location.endswith(f"livecell_coco_{split}.json")
        for i, (image, mask) in enumerate(zip(src.paths, src.mask_paths)):
            rng = np.random.default_rng([0, 7, s, i])  # the demo's stream of site i of this split
            ph = cells._phenotype(cells.TREATMENTS[i % 4], rng.uniform(*cells._POTENCY))
            _, labels = cells.render_site(ph, rng, 48)
            assert image.endswith(f"{split}_site_{i:04d}.tif") and labels.max() > 0
            np.testing.assert_array_equal(load_mask(mask), labels)
            assert tifffile.imread(image).shape == (5, 48, 48)


def test_cell_polygons_keep_separate_pieces_and_leave_holes_out():
    from jaxvit.demos.cells import cell_polygons
    from jaxvit.tasks.cell_distance.layouts import rasterise
    mask = np.zeros((12, 12), bool)
    mask[1:8, 1:8] = True
    mask[3:5, 3:5] = False  # a hole
    mask[9:11, 9] = True  # a second piece
    polygons = [np.asarray(p, np.float32).reshape(-1, 2) for p in cell_polygons(mask)]
    assert len(polygons) == 2
    filled = mask.copy()
    filled[3:5, 3:5] = True  # COCO polygons have no holes: the hole's pixels join the cell
    np.testing.assert_array_equal(rasterise([polygons], 12, 12) == 1, filled)


def test_coco_mistakes_are_named(tmp_path):
    _, path = _livecell(tmp_path)
    coco = json.loads(path.read_text())
    next(iter(coco["annotations"].values()))["segmentation"] = {"size": [H, W], "counts": "abc"}
    path.write_text(json.dumps(coco))
    with pytest.raises(DataError, match="annotation 1001 has an RLE segmentation"):
        PairedSource(tmp_path, "train")
    (tmp_path / "images" / "livecell_train_val_images" / "A172_Phase_A7_1_00d00h00m_2.tif").unlink()
    _, other = _livecell(tmp_path / "other")
    (tmp_path / "other" / "images" / "livecell_train_val_images" / "A172_Phase_A7_1_00d00h00m_2.tif").unlink()
    with pytest.raises(MissingDataError, match="1 of 3 images of .*livecell_coco_train.json are not below"):
        PairedSource(tmp_path / "other", "train")
    with pytest.raises(ImageLoadError, match="no image id 7"):
        load_mask(f"{other}#7")


def test_cellpose_pairs(tmp_path):
    split = tmp_path / "train"
    split.mkdir()
    masks = {}
    for k in range(2):
        Image.fromarray(np.full((H, W), 40 * k, np.uint8)).save(split / f"{k:03d}_img.png")
        masks[k] = np.zeros((H, W), np.uint16)
        masks[k][5:15, 5:20] = 1
        masks[k][20:30, 10:40] = 2 + k
        Image.fromarray(masks[k]).save(split / f"{k:03d}_masks.png")
    src = PairedSource(tmp_path, "train")
    assert [p.rsplit("/", 1)[1] for p in src.paths] == ["000_img.png", "001_img.png"]
    np.testing.assert_array_equal(load_mask(src.mask_paths[1]), masks[1])
    (split / "001_masks.png").unlink()
    with pytest.raises(DataError, match="1 of 2 Cellpose images .* no NAME_masks file, e.g. \\['001_img.png'\\]"):
        PairedSource(tmp_path, "train")


def test_val_fraction_holds_out_images_of_the_train_split(tmp_path):
    for k in range(20):
        truth, _ = _livecell(tmp_path / f"part{k}")  # 60 images in all, below one data_dir
    c = base_config("cell_distance")
    c.data.data_dir, c.data.val_fraction = str(tmp_path), 0.25
    (tmp_path / "livecell_coco_train.json").write_text(json.dumps(_merge(tmp_path)))
    task = CellDistance(c)
    train, val = task.source("train"), task.source("val")
    assert len(train) + len(val) == 60 and not set(train.paths) & set(val.paths) and 5 <= len(val) <= 25
    assert val[0] == {"path": val.paths[0], "mask": val.mask_paths[0]}


def _merge(root):
    """One COCO file over the parts' images (ids and file names made unique)."""
    images, annotations = [], []
    for k, part in enumerate(sorted(root.glob("part*"))):
        coco = json.loads(next(part.rglob("*.json")).read_text())
        for im in coco["images"]:
            new = f"p{k}_{im['file_name']}"
            (part / "images" / "livecell_train_val_images" / im["file_name"]).rename(
                part / "images" / "livecell_train_val_images" / new)
            images.append(im | {"id": 1000 * k + im["id"], "file_name": new})
        annotations += [a | {"image_id": 1000 * k + a["image_id"]} for a in coco["annotations"].values()]
        next(part.rglob("*.json")).unlink()
    return {"images": images, "annotations": annotations}
