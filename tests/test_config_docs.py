"""docs/config-reference.md is generated from the code (jaxvit.config_docs) and must match it."""
from pathlib import Path

import pytest

from jaxvit import config, config_docs

PAGE = Path(__file__).resolve().parent.parent / "docs" / "config-reference.md"


def test_config_reference_is_current():
    current = config_docs.generate()
    if PAGE.read_text() != current:
        pytest.fail(f"docs/config-reference.md is stale: regenerate it with `{config_docs.COMMAND}`")


def test_reference_lists_every_key_with_its_default_and_comment():
    text = config_docs.generate()
    for key, value in config_docs.flatten(config.base_config()).items():
        assert f"| `{key}` | `{config_docs._cell(config_docs._format(value))}` |" in text, key
    assert "| `model.arch` | `\"dinov2_vits14\"` | preset name (jaxvit.models.PRESETS) |" in text
    # comments reached through a called function, a module-level dict and a wrapped comment
    assert "| `data.num_workers` | `2` | grain worker processes; 0 = in-process (threads) |" in text
    assert "| `ssl.jump.load_data` | `\"load_data.csv\"` | the table (or a glob of per-plate tables), relative to data.data_dir (or absolute) |" in text
    assert "fit a small tokenizer of tokenizer_overrides on the train tiles first" in text
    assert "| `ssl.crops.blur_probs` | `(0.0, 0.9, 0.5)` | global 1, global 2, locals" in text


def test_comments_follow_calls_dicts_and_keywords(tmp_path, monkeypatch):
    (tmp_path / "cfgmod_defaults.py").write_text(
        "EXTRA = {\n"
        "    'alpha': 1,  # the alpha\n"
        "    'beta': 2,\n"
        "}\n"
    )
    (tmp_path / "cfgmod.py").write_text(
        "import ml_collections as mlc\n"
        "from cfgmod_defaults import EXTRA\n\n\n"
        "def sub():\n"
        "    s = mlc.ConfigDict()\n"
        "    s.depth = 3  # how deep\n"
        "    #              (wrapped)\n"
        "    return s\n\n\n"
        "def build():\n"
        "    c = mlc.ConfigDict()\n"
        "    # the size\n"
        "    c.size = 4\n"
        "    c.a, c.b = 1, 2  # a and b\n"
        "    c.sub = sub()\n"
        "    c.extra = mlc.ConfigDict()\n"
        "    c.extra.update(EXTRA)\n"
        "    c.kw = mlc.ConfigDict(dict(\n"
        "        x=1,  # the x\n"
        "        y=2, z=3))  # y and z share a line\n"
        "    return c\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    import cfgmod
    assert config_docs.function_comments(cfgmod.build, "p.") == {
        "p.size": "the size", "p.a": "a and b", "p.b": "a and b", "p.sub.depth": "how deep (wrapped)",
        "p.extra.alpha": "the alpha", "p.kw": "y and z share a line", "p.kw.x": "the x"}
