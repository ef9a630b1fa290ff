"""Mesh and sharding rules; data / FSDP / tensor-parallel training on 8 CPU devices equals one device.

The 8-device checks (slow tier) run this file as a script in a subprocess with
XLA_FLAGS=--xla_force_host_platform_device_count=8 (other test modules may already have started jax with one
device); the script builds each mesh's state and step from the public pieces of `jaxvit.train`, writes what it
measured to a JSON file, and the tests below assert on it.
"""
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from jax.sharding import AbstractMesh, PartitionSpec as P

from helpers.tiny import ROOT, tiny_config
from jaxvit import sharding

NUM_HEADS = 4  # helpers.tiny's TINY_VIT (width 32) with 4 heads, so tensor = 4 splits the heads
MESHES = {  # name -> (data, fsdp, tensor): 1, 2, 4 and 8 devices; "one" is the single-device reference
    "one": (1, 1, 1), "data2": (2, 1, 1), "fsdp4": (1, 4, 1), "data8": (8, 1, 1), "fsdp": (2, 4, 1),
    "tensor": (2, 1, 4), "mixed": (2, 2, 2),
}
STEPS = 10
# fp32 tolerance: sharded runs sum gradients and logits in a different order (relative error ~1e-7 per
# step). Over 10 Adam steps the losses agree to ~1e-6; parameters to ~1e-5 (Adam's lr * g / |g| turns rounding
# in near-zero gradients into differences up to a fraction of lr = 1e-3, as in test_train's accumulation test).
LOSS_RTOL, PARAM_ATOL = 1e-5, 1e-4


def mesh(data=1, fsdp=1, tensor=1) -> AbstractMesh:
    return AbstractMesh((data, fsdp, tensor), sharding.AXES)


# ------------------------------------------------------------------------------------- rules, in-process

def test_tensor_parallel_rules_split_heads_and_mlp():
    m = mesh(tensor=4)
    spec = lambda path, shape: sharding.leaf_spec(path, shape, m, 2 ** 18)
    layer = "trainable/params/backbone/encoder/layer_3"
    for name in ("query", "key", "value"):
        assert spec(f"{layer}/attention/{name}/kernel", (64, 64)) == P(None, "tensor")
        assert spec(f"{layer}/attention/{name}/bias", (64,)) == P("tensor")
    assert spec(f"{layer}/attention/dense/kernel", (64, 64)) == P("tensor")
    assert spec(f"{layer}/attention/dense/bias", (64,)) == P()
    for name in ("fc1", "gate_proj", "up_proj"):
        assert spec(f"{layer}/mlp/{name}/kernel", (64, 256)) == P(None, "tensor")
    for name in ("fc2", "down_proj"):
        assert spec(f"{layer}/mlp/{name}/kernel", (256, 64)) == P("tensor")
    # LoRA factors follow their layer: B of a column-split layer, A of a row-split one; the rest replicated.
    lora = "trainable/lora/backbone/encoder/layer_3"
    assert spec(f"{lora}/attention/query/lora_b", (8, 64)) == P(None, "tensor")
    assert spec(f"{lora}/attention/query/lora_a", (64, 8)) == P()
    assert spec(f"{lora}/attention/dense/lora_a", (64, 8)) == P("tensor")
    assert spec(f"{lora}/mlp/fc2/lora_b", (8, 64)) == P()
    # Optimizer state mirrors the parameter paths (adam mu/nu inside multi_transform / masked states).
    opt = "opt_state/1/inner_states/x1/inner_state/0/mu/params/backbone/encoder/layer_3/attention/query/kernel"
    assert spec(opt, (64, 64)) == P(None, "tensor")
    assert spec("opt_state/1/inner_states/x1/inner_state/0/count", ()) == P()
    assert spec("trainable/params/head/out/kernel", (64, 5)) == P()
    with pytest.raises(ValueError, match="mesh.tensor=4 does not divide"):
        spec(f"{layer}/attention/query/kernel", (64, 66))


def test_fsdp_shards_large_leaves_on_their_largest_divisible_dim():
    m = mesh(fsdp=4)
    spec = lambda path, shape, min_size=1000: sharding.leaf_spec(path, shape, m, min_size)
    assert spec("trainable/params/backbone/encoder/layer_0/mlp/fc1/kernel", (64, 256)) == P(None, "fsdp")
    assert spec("trainable/params/backbone/encoder/layer_0/mlp/fc2/kernel", (256, 64)) == P("fsdp")
    assert spec("frozen/params/backbone/embeddings/patch_embeddings/kernel", (14, 14, 3, 64)) == P(
        None, None, None, "fsdp")
    assert spec("trainable/params/backbone/embeddings/position_embeddings", (1, 1370, 64)) == P(None, None, "fsdp")
    assert spec("x/odd", (999, 3)) == P()  # no dimension divides by 4
    assert spec("trainable/params/backbone/encoder/layer_0/mlp/fc1/bias", (256,)) == P()  # small: replicated
    assert spec("rng", (2,)) == P() and spec("step", ()) == P()
    # With tensor parallelism too, FSDP takes a dimension tensor left free.
    both = sharding.leaf_spec("p/attention/query/kernel", (64, 64), mesh(fsdp=2, tensor=2), 1000)
    assert both == P("fsdp", "tensor")


@pytest.mark.parametrize("arch, sizes", [("dinov2_vitg14", (1, 8, 1)), ("dinov3_vit7b16", (1, 8, 1)),
                                         ("dinov3_vit7b16", (1, 4, 2))])
def test_fsdp_divides_the_big_models_state_by_the_mesh_size(arch, sizes):
    """The real ViT-g/14 and ViT-7B/16 parameter trees (shapes only): all but ~0.1% of the parameters split."""
    import jax
    import jax.numpy as jnp
    from jaxvit.models import get_config
    from jaxvit.models.heads import Classifier
    model = Classifier(get_config(arch), 5)
    params = jax.eval_shape(model.init, jax.random.key(0), jax.ShapeDtypeStruct((1, 224, 224, 3), jnp.float32))
    m = mesh(*sizes)
    total = per_device = 0
    for path, x in jax.tree_util.tree_leaves_with_path({"trainable": params}):
        spec = sharding.leaf_spec(sharding.path_str(path), x.shape, m, 2 ** 18)
        total += x.size
        per_device += x.size / np.prod([m.shape[a] for a in jax.tree_util.tree_leaves(tuple(spec)) if a])
    assert total / per_device > 7.9  # of 8 devices


def test_mesh_shape_resolves_the_rest_and_rejects_bad_sizes():
    assert sharding.mesh_shape(dict(data=-1, fsdp=2, tensor=1), 8) == dict(data=4, fsdp=2, tensor=1)
    assert sharding.mesh_shape(dict(data=1, fsdp=-1, tensor=2), 8) == dict(data=1, fsdp=4, tensor=2)
    with pytest.raises(ValueError, match="do not divide"):
        sharding.mesh_shape(dict(data=-1, fsdp=3, tensor=1), 8)
    with pytest.raises(ValueError, match="at most one -1"):
        sharding.mesh_shape(dict(data=-1, fsdp=-1, tensor=1), 8)
    with pytest.raises(ValueError, match="needs 16 devices"):
        sharding.mesh_shape(dict(data=4, fsdp=4, tensor=1), 8)


def test_batch_spec_and_indivisible_global_batch():
    assert sharding.batch_spec(mesh(2, 4, 2)) == P(("data", "fsdp"))
    assert sharding.batch_spec(mesh(1, 4, 2)) == P("fsdp")
    assert sharding.batch_spec(mesh(1, 1, 8)) == P()  # pure tensor parallel: every device sees the whole batch
    m = sharding.make_mesh(dict(data=-1, fsdp=1, tensor=1))
    assert sharding.batch_shares(8, m) == (8, 8)
    with pytest.raises(ValueError, match=r"train.batch_size=8 is the global batch .* 3 micro-batches"):
        sharding.batch_shares(8, m, micro=3)


# ------------------------------------------------------------------------------------- 8 devices, subprocess

@pytest.fixture(scope="module")
def measured(gz2_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("sharding")
    # The persistent compilation cache (conftest's JAX_COMPILATION_CACHE_DIR) is inherited: the meshes share
    # the model init, and later sessions reuse every program.
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=8")
    t0 = time.time()
    proc = subprocess.run([sys.executable, __file__, str(gz2_dir), str(root)], cwd=ROOT, env=env,
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-5000:]
    out = json.loads((root / "measured.json").read_text())
    print(f"8-device script: {time.time() - t0:.0f} s")
    return out


@pytest.mark.slow
def test_every_mesh_gives_the_single_device_losses(measured):
    ref = measured["losses"]["one"]
    assert len(ref) == STEPS and len(set(ref)) == STEPS
    for name in MESHES:
        np.testing.assert_allclose(measured["losses"][name], ref, rtol=LOSS_RTOL, err_msg=name)
        assert measured["param_diff"][name] < PARAM_ATOL, name


@pytest.mark.slow
def test_batchnorm_statistics_are_global_batch_statistics_on_every_mesh(measured):
    ref = measured["batchnorm"]["one"]
    assert len(ref["stats"]) == 4 and all(np.abs(v).max() > 0 for v in ref["stats"].values())  # 2 layers' mean, var
    for name in ("data8", "mixed"):
        got = measured["batchnorm"][name]
        for key, value in ref["stats"].items():
            np.testing.assert_allclose(got["stats"][key], value, rtol=1e-4, atol=1e-5, err_msg=f"{name} {key}")
        # Normalising by batch statistics amplifies the summation-order rounding step by step (~10x over the first
        # five steps; by step 8-10 up to ~4e-3 on some data: chaotic growth, not a different statistic - per-device
        # statistics would change the first step's loss and the statistics checked above).
        np.testing.assert_allclose(got["losses"][:5], ref["losses"][:5], rtol=10 * LOSS_RTOL, err_msg=name)
        np.testing.assert_allclose(got["losses"], ref["losses"], rtol=1e-2, err_msg=name)


@pytest.mark.slow
def test_params_and_optimizer_state_are_sharded_as_configured(measured):
    specs, shapes = measured["specs"], measured["shard_shapes"]
    q, fc1, dense = "attention/query/kernel", "mlp/fc1/kernel", "attention/dense/kernel"
    # Pure data parallel: everything replicated, every device holds the whole (32, 32) kernel.
    assert specs["data8"][q] == [] and shapes["data8"][q] == [32, 32]
    # Tensor parallel over 4: q/k/v and fc1 split on the output dim, dense on the input dim.
    assert specs["tensor"][q] == specs["tensor"][fc1] == [None, "tensor"] and specs["tensor"][dense] == ["tensor"]
    assert shapes["tensor"][q] == [32, 8] and shapes["tensor"][fc1] == [32, 16] and shapes["tensor"][dense] == [8, 32]
    # FSDP over 4: the largest divisible dim; Adam's moments placed like their parameter.
    assert specs["fsdp"][q] == ["fsdp"] and shapes["fsdp"][q] == [8, 32]
    assert specs["fsdp"]["opt_mu/" + fc1] == specs["fsdp"][fc1] == [None, "fsdp"]
    assert shapes["fsdp"]["opt_mu/" + fc1] == shapes["fsdp"][fc1] == [32, 16]
    # Both: FSDP on the dim tensor left free.
    assert specs["mixed"][q] == ["fsdp", "tensor"] and shapes["mixed"][q] == [16, 16]
    # The step keeps the placement (explicit out_shardings) ...
    assert measured["after_step_specs"] == specs["mixed"]
    # ... and batches are split over data*fsdp (replicated over tensor).
    assert measured["batch_spec"]["mixed"] == [["data", "fsdp"]] and measured["batch_spec"]["tensor"] == ["data"]


@pytest.mark.slow
def test_checkpoint_from_one_mesh_restores_onto_another(measured):
    r = measured["restore"]
    assert r["specs_match_target"] and r["values_equal"] and r["data_step"] == 4
    np.testing.assert_allclose(r["losses"], measured["losses"]["one"], rtol=LOSS_RTOL)


@pytest.mark.slow
def test_full_run_on_a_mixed_mesh_with_lora_and_bf16_frozen_base(measured):
    r = measured["lora_run"]
    assert r["history_rows"] == 1
    # The resume point stores the frozen base in bfloat16 and trains the adapters and head in float32 ...
    assert r["frozen_dtypes"] == ["bfloat16"] and r["trainable_dtypes"] == ["float32"]
    assert r["final_backbone_dtypes"] == ["bfloat16"]  # ... and the final checkpoint keeps it so.
    # The run's test metrics (on the 2 x 2 x 2 mesh) are those of its saved final checkpoint, re-read from disk
    # and evaluated on one device.
    test, again = r["test"], r["reevaluated"]
    assert test["accuracy"] == again["accuracy"] and test["num_samples"] == again["num_samples"] == 15
    assert test["loss"] == pytest.approx(again["loss"], rel=1e-5)


# ------------------------------------------------------------------------------------- the script

def _config(data_dir: Path, mesh_sizes: tuple[int, int, int], batchnorm: bool = False):
    c = tiny_config(data_dir, log_every_steps=5)
    if batchnorm:  # the CIFAR-10 recipe's head: Dense-BatchNorm-ReLU
        c.model.head_hidden, c.model.head_norm, c.model.head_act = (16, 16), "batch", "relu"
    c.model.overrides.num_heads = NUM_HEADS
    c.optim.schedule = "constant"
    c.mesh.data, c.mesh.fsdp, c.mesh.tensor = mesh_sizes
    c.mesh.fsdp_min_size = 256
    return c


def _script(data_dir: Path, root: Path) -> None:
    import jax
    from flax import traverse_util
    from jax.sharding import NamedSharding

    from jaxvit import checkpoint, inference, optim, run_io, tasks, xla_options
    from jaxvit.data import pipeline
    from jaxvit.train import Trainer, init_state, make_step, partition

    assert jax.device_count() == 8
    layer0 = ("params", "backbone", "encoder", "layer_0")
    watched = {"attention/query/kernel": layer0 + ("attention", "query", "kernel"),
               "attention/dense/kernel": layer0 + ("attention", "dense", "kernel"),
               "mlp/fc1/kernel": layer0 + ("mlp", "fc1", "kernel")}

    def leaf(tree, path):
        for k in path:
            tree = tree[k]
        return tree

    def placement(state) -> tuple[dict, dict]:
        mu = state["opt_state"][1].inner_states["x1"].inner_state[0].mu  # clip, multi_transform -> adamw
        arrays = {k: leaf(state["trainable"], p) for k, p in watched.items()}
        arrays |= {"opt_mu/" + k: leaf(mu, p) for k, p in watched.items()}
        return ({k: spec_list(a.sharding.spec) for k, a in arrays.items()},
                {k: list(a.addressable_shards[0].data.shape) for k, a in arrays.items()})

    def spec_list(spec) -> list:  # JSON-able, trailing Nones dropped: P(None, None) and P() -> []
        entries = [list(a) if isinstance(a, tuple) else a for a in spec]
        while entries and entries[-1] is None:
            entries.pop()
        return entries

    def flat(tree) -> dict:
        return {k: np.asarray(v) for k, v in traverse_util.flatten_dict(tree).items()}

    class Setup:
        """One mesh's task, initial state (created into the mesh layout), compiled step and data, from the
        public pieces the train loop is made of."""

        def __init__(self, sizes, batchnorm=False):
            c = self.cfg = _config(data_dir, sizes, batchnorm)
            self.task = tasks.create(c)
            model, variables = self.task.build(jax.random.key(c.seed))
            self.mesh = sharding.make_mesh(c.mesh)
            self.batch_sharding = NamedSharding(self.mesh, sharding.batch_spec(self.mesh))
            rule = optim.trainable_rule("all", c, self.task.head)
            tx, schedule, _ = optim.make_optimizer(c, partition(variables, rule)[0], STEPS,
                                                   self.task.depth(model))
            self.state, self.shardings = init_state(c, variables, rule, tx, self.mesh)
            self.step = xla_options.jit(make_step(self.task, model, c, tx, schedule),
                                        in_shardings=(self.shardings, self.batch_sharding),
                                        out_shardings=(self.shardings, NamedSharding(self.mesh, P())),
                                        donate_argnums=0)
            self.data = pipeline.train_iterator(self.task.source("train"), self.task.train_transform(), c.data,
                                                global_batch=c.train.batch_size, seed=c.seed)

        def train(self, n: int) -> list[float]:
            losses = []
            for _ in range(n):
                batch = {k: jax.make_array_from_process_local_data(self.batch_sharding, v)
                         for k, v in next(self.data).items()}
                self.state, m = self.step(self.state, batch)
                losses.append(float(m["loss"]))
            return losses

    out = {k: {} for k in ("losses", "param_diff", "specs", "shard_shapes", "batch_spec")}
    ref_params = None
    for name, sizes in MESHES.items():
        s = Setup(sizes)
        out["specs"][name], out["shard_shapes"][name] = placement(s.state)
        out["batch_spec"][name] = spec_list(s.batch_sharding.spec)
        out["losses"][name] = s.train(STEPS)
        if name == "mixed":
            out["after_step_specs"] = placement(s.state)[0]
        params = flat(s.state["trainable"])
        ref_params = ref_params or params
        out["param_diff"][name] = max(float(np.abs(params[k] - ref_params[k]).max()) for k in params)
        s.data.close()

    # A BatchNorm head: one device per example on data8, so per-device statistics would differ completely.
    out["batchnorm"] = {}
    for name in ("one", "data8", "mixed"):
        s = Setup(MESHES[name], batchnorm=True)
        losses = s.train(1)  # the statistics of one step: those of the first global batch
        stats = {"/".join(k): v.tolist() for k, v in flat(s.state["mutable"]["batch_stats"]).items()}
        out["batchnorm"][name] = dict(losses=losses + s.train(STEPS - 1), stats=stats)
        s.data.close()

    # A resume point written on the FSDP mesh after 4 steps, restored onto the tensor-parallel mesh, continued.
    ckpt_root = root / "ckpt" / "checkpoints"
    a = Setup(MESHES["fsdp"])
    first = a.train(4)
    ckpts = checkpoint.Checkpoints(ckpt_root, keep=2)
    ckpts.save(4, a.state, a.data, checkpoint.LoopState(), {})
    ckpts.wait()
    saved = flat(a.state["trainable"])
    b = Setup(MESHES["tensor"])
    again = checkpoint.Checkpoints(ckpt_root, keep=2)
    b.state = again.restore_latest(lambda loop: b.state, b.data, {})[0]
    got = [x.sharding for x in jax.tree_util.tree_leaves(b.state)]
    want = jax.tree_util.tree_leaves(b.shardings)
    values_equal = all(np.array_equal(saved[k], v) for k, v in flat(b.state["trainable"]).items())
    data_step = b.data.step
    rest = b.train(STEPS - 4)  # the restored iterator continues at step 4
    out["restore"] = dict(specs_match_target=len(got) == len(want) and all(x == y for x, y in zip(got, want)),
                          values_equal=values_equal, data_step=data_step, losses=first + rest)
    a.data.close(), b.data.close()

    # End to end: Trainer.run on data x fsdp x tensor = 2 x 2 x 2, LoRA, frozen base stored as bfloat16; the test
    # split evaluated with the final weights, then those weights re-read from disk and evaluated on one device.
    c = _config(data_dir, MESHES["mixed"])
    c.lora.enabled, c.lora.rank = True, 4
    c.model.frozen_dtype = "bfloat16"
    c.train.epochs = 1
    c.eval.test_checkpoint = "final"
    workdir = root / "lora"
    results = Trainer(c, workdir).run()
    state = checkpoint.read(workdir, "latest", run_io.source_of(workdir)).state  # the lean base filled in
    run = run_io.load_run(workdir, "final")
    one = sharding.make_mesh(dict(data=1, fsdp=1, tensor=1))
    reevaluated = run.task.evaluate(run.model, inference.place(run.variables, one, run.cfg), "test", one)
    keys = ("accuracy", "loss", "num_samples")
    out["lora_run"] = dict(
        test={k: results[k] for k in keys}, reevaluated={k: reevaluated[k] for k in keys},
        history_rows=len((workdir / "training_history.csv").read_text().splitlines()) - 1,
        frozen_dtypes=sorted({str(v.dtype) for v in flat(state["frozen"]).values() if v.ndim >= 2}),
        trainable_dtypes=sorted({str(v.dtype) for v in flat(state["trainable"]).values()}),
        final_backbone_dtypes=sorted({str(v.dtype) for v in flat(run.variables["params"]["backbone"]).values()
                                      if v.ndim >= 2}))
    (root / "measured.json").write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    _script(Path(sys.argv[1]), Path(sys.argv[2]))
