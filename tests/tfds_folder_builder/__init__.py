"""A real tensorflow-datasets builder over local files, for the tests: it reads `<manual_dir>/*_<split>/<class>/
*.png` (the synthetic GZ2 layout) into PNG-encoded Image features, as tfds builders of downloaded archives do.
Importing this module registers it as `jaxvit_test_folder`."""
from pathlib import Path

import tensorflow_datasets as tfds

from jaxvit.demos.gz2 import CLASSES


class JaxvitTestFolder(tfds.core.GeneratorBasedBuilder):
    VERSION = tfds.core.Version("1.0.0")
    MANUAL_DOWNLOAD_INSTRUCTIONS = "a folder with <anything>_<split>/<class>/*.png"

    def _info(self):
        return self.dataset_info_from_configs(
            features=tfds.features.FeaturesDict({"image": tfds.features.Image(shape=(None, None, 3)),
                                                 "label": tfds.features.ClassLabel(names=list(CLASSES))}),
            supervised_keys=("image", "label"))

    def _split_generators(self, dl_manager):
        root = Path(dl_manager.manual_dir)
        return {split: self._generate_examples(next(root.glob(f"*_{split}"))) for split in ("train", "val", "test")}

    def _generate_examples(self, split_dir: Path):
        for label, name in enumerate(CLASSES):
            for path in sorted((split_dir / name).glob("*.png")):
                yield path.name, {"image": path, "label": label}
