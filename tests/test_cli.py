"""The jaxvit command: shipped configs by name, one flag vocabulary with deprecated aliases, --help everywhere,
the platform line and the CPU-jax-on-a-GPU-machine check, and WORKDIR/log.txt."""
import logging
import os
import re
import subprocess
import sys
import zipfile
from pathlib import Path

import jax
import pytest

from jaxvit import accelerator, benchmark, cli
from jaxvit.config import load_config_file, packaged_configs, resolve_config_spec
from jaxvit.errors import ConfigError
from jaxvit.run_io import log_to_file

REPO = Path(__file__).resolve().parents[1]


def _jaxvit(*args, cwd):
    env = dict(os.environ, PYTHONPATH=str(REPO), JAX_PLATFORMS="cpu")
    return subprocess.run([sys.executable, "-m", "jaxvit.cli", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=120)


def test_configs_by_name_from_any_directory(tmp_path, monkeypatch):
    shipped = packaged_configs()
    assert {"gz2_lora", "biomass", "terramind_stage3"} <= set(shipped)
    monkeypatch.chdir(tmp_path)  # no configs/ here
    assert resolve_config_spec("gz2_lora:demo") == f"{shipped['gz2_lora']}:demo"
    assert resolve_config_spec("configs/gz2_lora.py") == str(shipped["gz2_lora"])
    own = tmp_path / "mine.py"
    own.write_text("from jaxvit.config import base_config\ndef get_config():\n    c = base_config()\n"
                   "    c.seed = 7\n    return c\n")
    assert load_config_file(str(own)).seed == 7  # a path still works
    assert load_config_file("gz2_lora:demo").data.demo == "gz2"
    with pytest.raises(ConfigError, match="gz2_lora"):
        resolve_config_spec("gz2_lorax")


@pytest.mark.slow  # three fresh processes (about 20 s each on a loaded 2-core machine)
def test_configs_command_and_print_config(tmp_path):
    listing = _jaxvit("configs", cwd=tmp_path)
    assert listing.returncode == 0
    lines = dict(line.split(None, 1) for line in listing.stdout.strip().splitlines())
    assert set(lines) == set(packaged_configs())
    assert lines["gz2_lora"].startswith("GZ2 five-class galaxy morphology")
    printed = _jaxvit("train", "--config=gz2_lora:demo", "--print_config", "--config.train.epochs=3", cwd=tmp_path)
    assert printed.returncode == 0, printed.stderr
    assert "epochs: 3" in printed.stdout and "demo: gz2" in printed.stdout
    bad = _jaxvit("train", "--config=gz2_lora", "--print_config", "--config.train.epoch=3", cwd=tmp_path)
    assert bad.returncode == 2 and "'epoch' is not under train" in bad.stderr


def test_every_command_explains_its_flags(tmp_path, capsys):
    for command in cli.COMMANDS:
        if command in ("configs", "train"):
            continue
        with pytest.raises(SystemExit) as done:
            cli.main([command, "--help"])
        assert done.value.code == 0
        text = capsys.readouterr().out
        assert text.startswith(f"usage: jaxvit {command}")
        usage, lines = text.split("\n\n")[0], text.splitlines()
        starts = [i for i, ln in enumerate(lines) if ln.startswith("  -")] + [len(lines)]
        for flag in set(re.findall(r"(--\w+)", usage)) - {"--help"}:  # each has a help text
            i = next(i for i in starts if lines[i].startswith(f"  {flag}"))
            block = " ".join(lines[i:next(j for j in starts if j > i)]).split()[1:]
            assert [w for w in block if not w.isupper()], (command, flag)
    with pytest.raises(SystemExit) as done:
        cli.main(["train", "--help"])
    train = capsys.readouterr().out
    assert done.value.code == 0 and "jaxvit train" in train
    assert all(f in train for f in ("--config", "--workdir", "--dry_run", "--print_config"))


def test_one_vocabulary_with_deprecated_aliases(capsys):
    args = benchmark.parse_args(["--batch=4", "--res=32", "--override=depth=2",
                                 "--config.model.overrides.hidden_size=64"])
    assert (args.batch_size, args.image_size, args.override) == (4, 32, "depth=2,hidden_size=64")
    err = capsys.readouterr().err
    assert "--batch is deprecated; use --batch_size" in err and "--res is deprecated; use --image_size" in err
    new = benchmark.parse_args(["--batch_size=4", "--image_size=32", "--config.model.overrides.depth=2"])
    assert (new.batch_size, new.image_size, new.override) == (4, 32, "depth=2")
    assert "deprecated" not in capsys.readouterr().err
    ap = cli.parser("evaluate", None)
    cli.add_checkpoint(ap)
    assert [ap.parse_args(a).checkpoint for a in ([], ["--checkpoint=periodic"], ["--checkpoint=best_val_f1_macro"])] \
        == ["best", "latest", "best_val_f1_macro"]  # 'periodic': the old name of latest, which checkpoint.read takes


def test_platform_line_and_gpu_check(tmp_path, caplog):
    assert accelerator.describe_devices(jax.devices("cpu")) == f"{jax.device_count('cpu')} x cpu"
    no_gpu = dict(dev_dir=tmp_path, which=lambda name: None)
    assert accelerator.visible_gpu(**no_gpu) is None
    accelerator.check(require=False, platform="cpu", **no_gpu)  # a CPU machine: silent
    with pytest.raises(ConfigError, match="require_accelerator"):
        accelerator.check(require=True, platform="cpu", **no_gpu)
    (tmp_path / "nvidia0").write_text("")  # a GPU device node, as the NVIDIA driver makes under /dev
    with caplog.at_level(logging.WARNING, logger="jaxvit"):
        accelerator.check(require=False, platform="cpu", dev_dir=tmp_path, which=lambda name: None)
    assert "jaxvit[cuda12]" in caplog.text and str(tmp_path / "nvidia0") in caplog.text
    with pytest.raises(ConfigError, match=r"jaxvit\[cuda12\]"):
        accelerator.check(require=True, platform="cpu", dev_dir=tmp_path, which=lambda name: None)
    smi = accelerator.visible_gpu(tmp_path / "none", which=lambda name: "/usr/bin/nvidia-smi")
    assert smi == "nvidia-smi on PATH"
    accelerator.check(require=True, platform="gpu", dev_dir=tmp_path)  # jax on the GPU: fine


def test_log_txt_appends_across_runs(tmp_path):
    root = logging.getLogger()
    for attempt in range(2):  # a run and its resume
        before = list(root.handlers)
        log_to_file(tmp_path)
        logging.getLogger("jaxvit").info("attempt %d", attempt)
        logging.getLogger("jaxvit").warning("careful %d", attempt)
        for h in set(root.handlers) - set(before):
            root.removeHandler(h)
            h.close()
    lines = (tmp_path / "log.txt").read_text().splitlines()
    assert [ln.split(" p0 ", 1)[1] for ln in lines] == ["INFO attempt 0", "WARNING careful 0",
                                                         "INFO attempt 1", "WARNING careful 1"]


@pytest.mark.slow
def test_wheel_ships_configs_and_the_command(tmp_path):
    subprocess.run([sys.executable, "-m", "pip", "wheel", str(REPO), "-w", str(tmp_path), "--no-deps", "-q",
                    "--no-build-isolation"], check=True, capture_output=True, timeout=300)
    (wheel,) = tmp_path.glob("jaxvit-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert {f"jaxvit/configs/{n}.py" for n in packaged_configs()} <= set(names)
    entry = next(n for n in names if n.endswith("entry_points.txt"))
    assert "jaxvit = jaxvit.cli:main" in zipfile.ZipFile(wheel).read(entry).decode()


@pytest.mark.slow
def test_dry_run_steps_and_evaluates_without_a_checkpoint(gz2_dir, tmp_path):
    import math

    from conftest import tiny_config
    from jaxvit import train
    workdir = tmp_path / "run"
    result = train.run(tiny_config(gz2_dir), workdir, dry_run=True)
    assert math.isfinite(result["dry_run_loss"])
    assert not [p for p in (workdir / "checkpoints").rglob("*") if p.is_file()]  # nothing saved
    assert not (workdir / "config.json").exists()
