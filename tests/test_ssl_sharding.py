"""The SSL step on 8 simulated devices (data parallel, and data x FSDP x tensor) equals the single-device step:
Sinkhorn-Knopp, KoLeo and the iBOT gather see the global batch, and the teacher follows the same EMA.

Runs this file as a script in a subprocess with XLA_FLAGS=--xla_force_host_platform_device_count=8 (slow tier),
as tests/test_sharding.py does.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from helpers.tiny import ROOT

MESHES = {"one": (1, 1, 1), "data8": (8, 1, 1), "mixed": (2, 2, 2)}
STEPS = 3


@pytest.mark.slow
def test_ssl_step_on_8_devices_equals_one_device(gz2_dir, tmp_path):
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=8")
    proc = subprocess.run([sys.executable, __file__, str(gz2_dir), str(tmp_path)], cwd=ROOT, env=env,
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-5000:]
    out = json.loads((tmp_path / "measured.json").read_text())
    ref = out["losses"]["one"]
    assert len(ref) == STEPS and all(np.isfinite(ref))
    for name in MESHES:
        np.testing.assert_allclose(out["losses"][name], ref, rtol=1e-5, err_msg=name)
        assert out["teacher_diff"][name] < 1e-5, (name, out["teacher_diff"][name])


def _script(data_dir: Path, root: Path) -> None:
    import jax
    from flax import traverse_util
    from jax.sharding import NamedSharding, PartitionSpec as P

    from jaxvit import optim, sharding, tasks, xla_options
    from jaxvit.data import pipeline
    from jaxvit.train import init_state, make_step
    from helpers.tiny import tiny_ssl_config

    assert jax.device_count() == 8
    out = {"losses": {}, "teacher_diff": {}}
    ref = None
    for name, (data, fsdp, tensor) in MESHES.items():
        c = tiny_ssl_config(data_dir)
        c.model.overrides.num_heads = 4  # tensor = 2 splits the heads
        c.mesh.data, c.mesh.fsdp, c.mesh.tensor, c.mesh.fsdp_min_size = data, fsdp, tensor, 1
        task = tasks.create(c)
        model, variables = task.build(jax.random.key(0))
        src = task.source("train")
        spe = task.steps_per_epoch(len(src), c.train.batch_size)
        task.set_run_length(10 * spe, spe)
        mesh = sharding.make_mesh(c.mesh)
        batch_sharding = NamedSharding(mesh, sharding.batch_spec(mesh))
        rule = optim.trainable_rule("all", c, task.head)
        tx, schedule, _ = optim.make_optimizer(c, optim.split({"params": variables["params"]}, rule)[0], 10 * spe,
                                               task.depth(model), lr_gates=task.lr_gates(spe))
        state, shardings = init_state(c, variables, rule, tx, mesh)
        step = xla_options.jit(make_step(task, model, c, tx, schedule), in_shardings=(shardings, batch_sharding),
                               out_shardings=(shardings, NamedSharding(mesh, P())), donate_argnums=0)
        it = pipeline.train_iterator(src, task.train_transform(), c.data, global_batch=c.train.batch_size, seed=0,
                                     batch_transform=task.batch_transform())
        losses = []
        for _ in range(STEPS):
            batch = {k: jax.make_array_from_process_local_data(batch_sharding, v) for k, v in next(it).items()}
            state, m = step(state, batch)
            losses.append(float(m["loss"]))
        it.close()
        teacher = {k: np.asarray(v) for k, v in traverse_util.flatten_dict(state["mutable"]["teacher"]).items()}
        ref = ref or teacher
        out["losses"][name] = losses
        out["teacher_diff"][name] = max(float(np.abs(teacher[k] - ref[k]).max()) for k in ref)
    (root / "measured.json").write_text(json.dumps(out))


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).parent))
    _script(Path(sys.argv[1]), Path(sys.argv[2]))
