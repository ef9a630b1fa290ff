"""Hub ids resolve from a real Hugging Face cache layout offline (HF_HUB_OFFLINE=1, a temp HF_HOME), and the
error when neither the network nor the cache has them names both ways."""
import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

from jaxvit.models import ViT, get_config, save_pretrained

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow  # each test starts a fresh offline process (about 20 s on a loaded 2-core machine)
COMMIT = "0123456789abcdef0123456789abcdef01234567"


def _cached_repo(hf_home: Path, repo: str) -> Path:
    """The directory huggingface_hub reads for `repo` at revision main: hub/models--org--name/snapshots/<commit>."""
    root = hf_home / "hub" / f"models--{repo.replace('/', '--')}"
    (root / "refs").mkdir(parents=True)
    (root / "refs" / "main").write_text(COMMIT)
    snapshot = root / "snapshots" / COMMIT
    snapshot.mkdir(parents=True)
    return snapshot


def _offline(hf_home: Path, code: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, HF_HOME=str(hf_home), HF_HUB_OFFLINE="1", PYTHONPATH=str(REPO), JAX_PLATFORMS="cpu")
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)


def test_hub_id_loads_offline_from_the_cache(tmp_path):
    cfg = get_config("dinov2_vits14", hidden_size=32, depth=2, num_heads=2, pos_grid=2)
    params = ViT(cfg).init(jax.random.key(0), np.zeros((1, 28, 28, 3), np.float32))["params"]
    save_pretrained(ViT(cfg), params, _cached_repo(tmp_path, "test-org/tiny-dinov2"))
    total = float(sum(np.abs(x).sum() for x in jax.tree.leaves(params)))
    done = _offline(tmp_path, "import jax, numpy as np\nfrom jaxvit.models import load_pretrained\n"
                    "m, p = load_pretrained('test-org/tiny-dinov2')\n"
                    "print(m.cfg.hidden_size, float(sum(np.abs(x).sum() for x in jax.tree.leaves(p))))")
    assert done.returncode == 0, done.stderr
    width, loaded = done.stdout.split()[-2:]
    assert int(width) == 32 and abs(float(loaded) - total) < 1e-3 * total


def test_tokenizer_file_resolves_offline(tmp_path):
    snapshot = _cached_repo(tmp_path, "ibm-esa-geospatial/TerraMind-1.0-Tokenizer-DEM")
    (snapshot / "TerraMind_Tokenizer_DEM.pt").write_bytes(b"weights")
    done = _offline(tmp_path, "from jaxvit.models.terramind.tokenizer.weights import _resolve\n"
                    "print(_resolve('dem'))")
    assert done.returncode == 0, done.stderr
    assert Path(done.stdout.split()[-1]).read_bytes() == b"weights"


def test_missing_offline_says_both_ways(tmp_path):
    (tmp_path / "hub").mkdir()
    done = _offline(tmp_path, "from jaxvit.errors import exit_on_user_error\n"
                    "from jaxvit.models import load_pretrained\n"
                    "exit_on_user_error(load_pretrained, 'facebook/dinov2-large')")
    assert done.returncode == 2
    line = done.stderr.strip().splitlines()[-1]
    assert "facebook/dinov2-large" in line and "HF_TOKEN" in line and "HF_HUB_OFFLINE=1" in line
    assert "huggingface-cli download facebook/dinov2-large" in line
