"""The `ssl` task: heads against the official DINOHead, the official schedules, the teacher as the EMA of the
student, the frozen prototypes of the first epoch, iBOT batch masks, and a short run through the loop."""
import csv

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from helpers.tiny import TINY_VIT, tiny_ssl_config
from jaxvit import optim, sharding, tasks
from jaxvit.data import pipeline
from jaxvit.tasks.ssl.model import DINOHead, HeadConfig
from jaxvit.train import Trainer, init_state, make_step

torch = pytest.importorskip("torch")


def flat(tree):
    return {"/".join(k): np.asarray(v) for k, v in traverse_util.flatten_dict(tree).items()}


@pytest.mark.parametrize("weight_norm, use_bn", [(True, False), (False, False), (True, True)])
def test_dino_head_matches_the_official_head(weight_norm, use_bn):
    from dinov2.layers.dino_head import DINOHead as Official
    torch.manual_seed(0)
    official = Official(24, 50, use_bn=use_bn, nlayers=3, hidden_dim=40, bottleneck_dim=16).train()
    with torch.no_grad():
        for p in official.parameters():
            p.add_(torch.randn_like(p) * 0.1)  # biases, BatchNorm affine and weight_g away from their initial 0 / 1
    if not weight_norm:  # DINOv3's plain prototypes: the same head without weight_norm
        torch.nn.utils.remove_weight_norm(official.last_layer)
    sd = {k: v.detach().numpy() for k, v in official.state_dict().items()}
    linear = [0, 3, 6] if use_bn else [0, 2, 4]  # Sequential(Linear, [BatchNorm1d,] GELU, ...)
    params = {f"mlp_{i}": {"kernel": sd[f"mlp.{j}.weight"].T, "bias": sd[f"mlp.{j}.bias"]} for i, j in enumerate(linear)}
    if use_bn:
        params.update({f"bn_{i}": {"scale": sd[f"mlp.{j + 1}.weight"], "bias": sd[f"mlp.{j + 1}.bias"]}
                       for i, j in enumerate(linear[:2])})
    if weight_norm:
        params.update(kernel=sd["last_layer.weight_v"].T, weight_g=sd["last_layer.weight_g"][:, 0])
    else:
        params["kernel"] = sd["last_layer.weight"].T
    x = np.random.default_rng(0).standard_normal((5, 24)).astype(np.float32)
    got = DINOHead(HeadConfig(50, 40, 16, 3, weight_norm, use_bn)).apply({"params": params}, x)
    want = official(torch.from_numpy(x)).detach().numpy()  # training mode: BatchNorm uses the batch statistics
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def test_schedules_match_the_official_cosine_scheduler():
    from dinov2.utils.utils import CosineScheduler
    cases = [dict(base_value=0.992, final_value=1.0, total_iters=37),  # teacher momentum
             dict(base_value=0.04, final_value=0.4, total_iters=50),  # weight decay
             dict(base_value=0.07, final_value=0.07, total_iters=12, warmup_iters=12, start_warmup_value=0.04),
             dict(base_value=1e-3, final_value=1e-6, total_iters=40, warmup_iters=10)]  # temperature, lr
    for case in cases:
        official = CosineScheduler(**case)
        mine = optim.cosine(case["base_value"], case["final_value"], case["total_iters"],
                            case.get("warmup_iters", 0), case.get("start_warmup_value", 0.0))
        steps = np.arange(case["total_iters"] + 3)
        np.testing.assert_allclose(np.asarray(jax.vmap(mine)(steps)), [official[int(i)] for i in steps],
                                   rtol=1e-6, atol=1e-9, err_msg=str(case))


def test_lr_scaling_and_per_module_clipping(gz2_dir):
    c = tiny_ssl_config(gz2_dir)
    c.train.batch_size, c.optim.lr_scaling = 256, "sqrt_wrt_1024"
    assert optim.lr_scale(c) == pytest.approx(2.0)
    clip = optim.clip_per_module(1.0)
    grads = {"params": {"backbone": {"w": jnp.full((4,), 3.0)}, "dino_head": {"w": jnp.full((2,), 0.1)}}}
    out, _ = clip.update(grads, clip.init(grads))
    np.testing.assert_allclose(jnp.linalg.norm(out["params"]["backbone"]["w"]), 1.0, rtol=1e-6)
    np.testing.assert_allclose(out["params"]["dino_head"]["w"], 0.1)  # below the limit: untouched


def _setup(gz2_dir, configure=None, **ssl):
    c = tiny_ssl_config(gz2_dir)
    c.optim.weight_decay, c.optim.weight_decay_end = 0.04, 0.4
    for k, v in ssl.items():
        c.ssl[k] = v
    if configure is not None:
        configure(c)
    task = tasks.create(c)
    model, variables = task.build(jax.random.key(0))
    src = task.source("train")
    spe = task.steps_per_epoch(len(src), c.train.batch_size)
    task.set_run_length(3 * spe, spe)
    rule = optim.trainable_rule("all", c, task.head)
    tx, schedule, _ = optim.make_optimizer(c, optim.split({"params": variables["params"]}, rule)[0], 3 * spe,
                                           task.depth(model), lr_gates=task.lr_gates(spe))
    state, _ = init_state(c, variables, rule, tx, sharding.make_mesh(c.mesh))
    data = pipeline.train_iterator(src, task.train_transform(), c.data, global_batch=8, seed=0,
                                   batch_transform=task.batch_transform())
    return c, task, jax.jit(make_step(task, model, c, tx, schedule)), state, data, spe


@pytest.mark.slow
def test_teacher_is_the_ema_of_the_student_and_prototypes_wait_one_epoch(gz2_dir):
    c, task, step, state, data, spe = _setup(gz2_dir, epoch_length=2, head_weight_norm=True)
    assert spe == 2
    teacher = flat(state["mutable"]["teacher"])
    start = flat(state["trainable"]["params"])
    for i in range(3):
        state, metrics = step(state, next(data))
        assert np.isfinite(float(metrics["loss"]))
        student = flat(state["trainable"]["params"])
        m = float(task.momentum(i))
        teacher = {k: m * v + (1 - m) * student[k] for k, v in teacher.items()}
        for k, v in flat(state["mutable"]["teacher"]).items():
            np.testing.assert_allclose(v, teacher[k], rtol=1e-5, atol=1e-7, err_msg=k)
        frozen = i < spe  # the prototypes' lr is 0 during the first epoch (2 steps)
        for k in ("dino_head/kernel", "dino_head/weight_g", "ibot_head/kernel"):
            assert np.array_equal(student[k], start[k]) == frozen, (i, k)
        assert not np.array_equal(student["dino_head/mlp_0/kernel"], start["dino_head/mlp_0/kernel"])
    assert 0.992 < float(task.momentum(2)) < 1.0 and float(task.momentum(100)) == 1.0
    assert float(task.teacher_temp(0)) == pytest.approx(0.04) and float(task.teacher_temp(spe)) == pytest.approx(0.07)


@pytest.mark.integration
def test_ibot_masks_of_a_batch(gz2_dir):
    _, task, _, _, data, _ = _setup(gz2_dir)
    batch = next(data)
    masks = batch["masks"]  # [b, 2, P]
    assert masks.shape == (8, 2, 16) and masks.dtype == bool
    per_crop = masks.reshape(16, -1).sum(1)
    assert (per_crop > 0).sum() == 8  # half of the 2 * 8 global crops, exact (DINOv3 top-up)
    assert sorted(per_crop[per_crop > 0]) == sorted(int(16 * p) for p in np.linspace(0.1, 0.5, 9)[1:])
    assert masks.sum() <= task.mask_batch().max_masked(8)


@pytest.mark.integration
def test_softmax_centering_updates_the_centres(gz2_dir):
    _, task, step, state, data, _ = _setup(gz2_dir, centering="softmax")
    before = flat(state["mutable"]["centers"])
    state, metrics = step(state, next(data))
    assert np.isfinite(float(metrics["loss"]))
    assert all(not np.array_equal(v, before[k]) for k, v in flat(state["mutable"]["centers"]).items())


@pytest.mark.integration
def test_a_short_run_trains_evaluates_and_draws_attention(gz2_dir, tmp_path):
    c = tiny_ssl_config(gz2_dir, epochs=3)
    c.eval.at_start = True
    c.checkpoint.keep, c.checkpoint.also_best = 1, ("val/knn_f1_macro",)
    Trainer(c, tmp_path).run()
    rows = list(csv.DictReader((tmp_path / "training_history.csv").open()))
    assert [int(r["step"]) for r in rows] == [0, 5, 10, 15]
    from jaxvit import checkpoint
    loop = checkpoint.read(tmp_path, "final").loop  # every best (step 0 included) is on disk, kept by rotation
    assert set(loop.bests) == {"val/knn_accuracy", "val/knn_f1_macro"}
    assert checkpoint.steps(tmp_path) == sorted(loop.kept_steps())
    assert all(0.0 <= float(r["val_knn_accuracy"]) <= 1.0 for r in rows)
    losses = [float(r["train_loss"]) for r in rows[1:]]
    assert losses[-1] < losses[0], losses
    assert (tmp_path / "attention_val.png").stat().st_size > 0


@pytest.mark.slow
def test_killed_ssl_run_resumes_to_the_same_teacher(gz2_dir, tmp_path):
    """kill -9 after step 3 of 10, resume: the same history and bit-identical student and teacher; the export
    defaults to the final teacher."""
    import sys
    from helpers.processes import run_killed_and_resumed
    overrides = [f"--config.model.overrides.{k}={v}" for k, v in TINY_VIT.items()]
    cli = lambda w: [sys.executable, "-m", "jaxvit.main", "--config=configs/gz2_ssl.py:demo", f"--workdir={w}",
                     f"--config.data.data_dir={gz2_dir}", "--config.data.demo=", "--config.data.image_size=32",
                     "--config.data.num_workers=0", "--config.train.batch_size=8", "--config.eval.batch_size=8",
                     "--config.train.epochs=2", "--config.checkpoint.every_steps=1", "--config.checkpoint.keep=50",
                     "--config.ssl.crops.global_size=32", "--config.ssl.crops.local_size=16",
                     "--config.ssl.crops.n_local=2", "--config.ssl.dino.n_prototypes=64",
                     "--config.ssl.ibot.n_prototypes=64", *overrides]
    run_killed_and_resumed(cli, tmp_path)
    rows = lambda d: [{k: v for k, v in r.items() if k != "images_per_s"}
                      for r in csv.DictReader((tmp_path / d / "training_history.csv").open())]
    assert rows("run") == rows("ref")
    from jaxvit import checkpoint
    states = [checkpoint.read(tmp_path / d, 10).state for d in ("ref", "run")]
    for part in ("trainable", "mutable"):
        a, b = (flat(s[part]) for s in states)
        assert a.keys() == b.keys()
        for k in a:
            np.testing.assert_array_equal(a[k], b[k], err_msg=f"{part}/{k}")

    # `jaxvit export` without --checkpoint: the final teacher (as the official training copies it), not the best
    # by k-NN (made step 5 here); --checkpoint=best still exports that one.
    from helpers.tiny import set_best_step
    from jaxvit import export, run_io
    from jaxvit.models.weights import export_state_dict
    set_best_step(tmp_path / "ref", 5)
    for which, flags in (("final", []), ("best", ["--checkpoint=best"])):
        export.main([f"--workdir={tmp_path / 'ref'}", f"--output_dir={tmp_path / which}", "--no_check", *flags])
        got = torch.load(tmp_path / which / "teacher_checkpoint.pth")["teacher"]
        run = run_io.load_run(tmp_path / "ref", which)
        want = export_state_dict(run.model.backbone, run.variables["teacher"]["backbone"], "official")
        assert run.step == {"final": 10, "best": 5}[which]
        for k, v in want.items():
            np.testing.assert_array_equal(got[f"backbone.{k}"].numpy(), v, err_msg=k)


@pytest.mark.integration
def test_a_batch_without_masked_crops_has_zero_ibot_loss(gz2_dir):
    _, task, step, state, data, _ = _setup(gz2_dir)
    batch = next(data)
    batch["masks"] = np.zeros_like(batch["masks"])
    state, metrics = step(state, batch)
    assert float(metrics["ibot"]) == 0.0 and np.isfinite(float(metrics["loss"])) and int(metrics["nonfinite"]) == 0


@pytest.mark.slow
def test_export_of_the_teacher_reloads_in_pytorch(gz2_dir, tmp_path):
    """A short run's teacher: transformers directory and official teacher_checkpoint.pth, both equal to the Flax
    teacher; the checkpoint's DINO head loads into the official DINOHead and gives the same prototype scores."""
    from dinov2.layers.dino_head import DINOHead as Official
    from jaxvit import export, run_io
    c = tiny_ssl_config(gz2_dir, epochs=1)
    c.ssl.head_weight_norm = True
    Trainer(c, tmp_path / "run").run()
    run = run_io.load_run(tmp_path / "run", "final")
    out = export.export_run(run, tmp_path / "export")
    diffs = export.check_export(run, out)
    assert max(diffs.values()) < 1e-5, diffs
    sd = torch.load(out / "teacher_checkpoint.pth")["teacher"]
    head = Official(32, 64, nlayers=3, hidden_dim=32, bottleneck_dim=16)
    head.load_state_dict({k[len("dino_head."):]: v for k, v in sd.items() if k.startswith("dino_head.")})
    x = np.random.default_rng(0).standard_normal((3, 32)).astype(np.float32)
    want = run.model.apply({"params": run.variables["teacher"]}, x, head="dino")
    np.testing.assert_allclose(head(torch.from_numpy(x)).detach().numpy(), want, rtol=1e-5, atol=1e-6)


@pytest.mark.integration
def test_continued_pretraining_starts_from_the_checkpoint_with_a_resized_patch_embedding(gz2_dir, tmp_path, caplog):
    """Student and teacher start from a transformers checkpoint (patch 8) resized to patch 4; heads are fresh."""
    import logging
    from helpers.torch_models import tiny_hf_dinov2
    from jaxvit.models import load_pretrained
    from jaxvit.models.resize import resize_patch_kernel
    pretrained = tiny_hf_dinov2(tmp_path / "hf")
    c = tiny_ssl_config(gz2_dir)
    c.model.overrides = type(c.model.overrides)()
    c.model.pretrained, c.ssl.patch_size = str(pretrained), 4
    with caplog.at_level(logging.INFO, logger="jaxvit"):
        model, variables = tasks.create(c).build(jax.random.key(0))
    assert "patch size 8 -> 4" in caplog.text and "initialised fresh: dino_head, ibot_head" in caplog.text
    assert model.backbone.patch_size == 4
    _, base = load_pretrained(pretrained)
    want = flat(base)
    want["embeddings/patch_embeddings/kernel"] = np.asarray(resize_patch_kernel(
        want["embeddings/patch_embeddings/kernel"], 4))
    for tree in (variables["params"]["backbone"], variables["teacher"]["backbone"]):
        got = flat(tree)
        assert got.keys() == want.keys()
        for k in want:
            np.testing.assert_allclose(got[k], want[k], rtol=1e-6, err_msg=k)
    assert variables["params"]["dino_head"].keys() == variables["teacher"]["dino_head"].keys()


@pytest.mark.integration
def test_gram_anchoring_adds_its_term(gz2_dir):
    def gram_on(c):
        c.ssl.gram.weight = 0.5  # against the EMA teacher's patch features
    _, _, step, state, data, _ = _setup(gz2_dir, configure=gram_on)
    _, metrics = step(state, next(data))
    assert np.isfinite(float(metrics["gram"])) and float(metrics["gram"]) >= 0.0 and np.isfinite(float(metrics["loss"]))
