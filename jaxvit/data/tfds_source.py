"""tensorflow-datasets image classification data (`data.source=tfds:NAME`), read with `tfds.data_source`: random
access to array_record files, decoded with numpy and PIL, no TensorFlow at run time.

The data are prepared once, where TensorFlow and the internet are (`tfds build`), or here from the dataset's
downloaded archive placed in `data.manual_dir` (jaxvit then builds it on the first run). Split names may be tfds
slices: `eval.val_split="test[:5000]"`.
"""
from __future__ import annotations

import logging
from collections.abc import Sequence

import numpy as np

from jaxvit.data.labels import class_counts, resolve_labels
from jaxvit.errors import DataError, MissingDataError, UserError

log = logging.getLogger(__name__)


def _tfds():
    try:
        import tensorflow_datasets as tfds
    except ImportError as e:
        raise UserError("data.source='tfds:...' needs tensorflow-datasets: pip install -e '.[tfds]'") from e
    return tfds


def _build_command(name: str, data_dir: str) -> str:
    return (f"pip install tensorflow tensorflow-datasets && tfds build {name} --file_format=array_record"
            f"{' --data_dir=' + data_dir if data_dir else ''}")


def builder(name: str, data_dir: str):
    """The tfds builder of `name` in `data_dir` ("" = tfds's default directory); a clear error if tfds knows no
    such dataset."""
    tfds = _tfds()
    try:
        return tfds.builder(name, data_dir=data_dir or None)
    except tfds.core.registered.DatasetNotFoundError as e:
        raise MissingDataError(f"data.source='tfds:{name}': no tfds dataset {name!r} is registered or prepared in "
                               f"data.tfds_data_dir={data_dir!r}; check the name (tfds.list_builders())") from e


def prepare(name: str, data_dir: str, manual_dir: str = "") -> None:
    """Make sure `name` is prepared as array_record in `data_dir`: build it from `manual_dir` when given, else
    raise the one-line instruction that puts it there."""
    b = builder(name, data_dir)
    where = f"data.tfds_data_dir={data_dir!r}" if data_dir else "tfds's default data dir (~/tensorflow_datasets)"
    if b.is_prepared():
        if str(b.info.file_format.value) != "array_record":
            raise DataError(f"tfds dataset {name!r} in {where} is stored as {b.info.file_format.value}; random "
                            f"access needs array_record: rebuild with `{_build_command(name, data_dir)}`")
        return
    if not manual_dir:
        raise MissingDataError(f"tfds dataset {name!r} is not prepared in {where}: run `{_build_command(name, data_dir)}`"
                               f" where there is internet (then copy that directory here), or put the dataset's "
                               f"downloaded archive in a directory and set data.manual_dir to it")
    tfds = _tfds()
    log.info("building tfds dataset %s from %s into %s", name, manual_dir, data_dir or "the default dir")
    try:
        b.download_and_prepare(file_format="array_record",
                               download_config=tfds.download.DownloadConfig(manual_dir=manual_dir))
    except Exception as e:  # tfds raises many types; the cause is kept in the chain
        raise DataError(f"building tfds dataset {name!r} from data.manual_dir={manual_dir!r} failed "
                        f"({type(e).__name__}: {str(e).splitlines()[0][:300]}); put the archive(s) the builder "
                        f"expects there, or run `{_build_command(name, data_dir)}` where there is internet") from e


class TfdsSource:
    """One split of a prepared tfds image classification dataset -> examples {"image": uint8 (H, W, 3), "label"}.
    The image and label features are the builder's supervised keys (default "image", "label")."""

    files = False

    def __init__(self, name: str, split: str, data_dir: str = "", classes: Sequence[str] | None = None):
        tfds = _tfds()
        self.name, self.split, self.data_dir = name, split, data_dir
        self.location = f"tfds:{name}[{split}] in {data_dir or '~/tensorflow_datasets'}"
        b = builder(name, data_dir)
        if not b.is_prepared():
            prepare(name, data_dir)  # raises the instruction
        keys = b.info.supervised_keys or ("image", "label")
        self.image_key, self.label_key = keys[0], keys[1]
        features = b.info.features
        for key in (self.image_key, self.label_key):
            if key not in features:
                raise DataError(f"{self.location}: no feature {key!r} (features: {list(features)}); jaxvit reads "
                                "image classification datasets (an image and a class label)")
        names = getattr(features[self.label_key], "names", None)
        try:
            self._ds = tfds.data_source(name, split=split, data_dir=data_dir or None, download=False)
        except ValueError as e:  # an unknown split or a bad slice
            raise DataError(f"{self.location}: {e}; splits: {list(b.info.splits)}") from e
        skip = tfds.data_source(name, split=split, data_dir=data_dir or None, download=False,
                                decoders={self.image_key: tfds.decode.SkipDecoding()})
        labels = [r[self.label_key] for r in skip.__getitems__(range(len(skip)))]
        self.labels, self.classes = resolve_labels(labels, classes if classes is not None else names, self.location)
        self.paths = [f"tfds:{name}/{split}#{i}" for i in range(len(self.labels))]

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> dict:
        image = np.asarray(self._ds[int(i)][self.image_key])
        if image.ndim == 3 and image.shape[-1] == 1:
            image = image[..., 0]
        if image.ndim == 2:
            image = np.repeat(image[:, :, None], 3, 2)
        return {"image": image, "label": int(self.labels[i])}

    def class_counts(self) -> np.ndarray:
        return class_counts(self.labels, self.classes)
