"""Package list only (everything else is in pyproject.toml): the jaxvit packages, and the top-level configs/
directory shipped as `jaxvit.configs` so `--config=gz2_lora` works from any directory."""
from setuptools import find_packages, setup

setup(packages=find_packages(include=["jaxvit*"]) + ["jaxvit.configs"], package_dir={"jaxvit.configs": "configs"})
