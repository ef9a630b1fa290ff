"""jaxvit.tasks.ssl against the official DINOv2 code (PyPI `dinov2==0.0.1.dev2`, the loss and masking code of
github.com/facebookresearch/dinov2): Sinkhorn-Knopp, centring, the DINO / iBOT / KoLeo losses (values and
gradients, float32, rel 1e-5) and the iBOT block masks, bit-identical when the official generator is fed the
same random draws. DINOv3's `DINOLoss.forward` and `GramLoss` (not on PyPI) are transcribed below."""
import importlib.util
import socket
from functools import partial
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
dinov2_loss = pytest.importorskip("dinov2.loss")  # Makefile: pip install --no-deps dinov2==0.0.1.dev2

from jaxvit.tasks.ssl import losses as L  # noqa: E402
from jaxvit.tasks.ssl import masking as M  # noqa: E402

RTOL = 1e-5
TINY = float(np.finfo(np.float32).tiny)  # XLA on CPU flushes float32 denormals (< 1.2e-38) to zero; torch keeps them


def _official(name):
    """dinov2/data/<name>.py loaded alone (the dinov2.data package imports torchvision, which we do not install)."""
    path = Path(importlib.util.find_spec("dinov2").submodule_search_locations[0]) / "data" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"_official_dinov2_{name}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module", autouse=True)
def process_group():
    """The official losses all-reduce through torch.distributed: one gloo process of world size 1."""
    import torch.distributed as dist
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def close(got, want, rtol=RTOL, atol=TINY):
    np.testing.assert_allclose(np.asarray(got), np.asarray(want, dtype=np.float32), rtol=rtol, atol=atol)


def randn(rng, *shape, scale=1.0):
    return (scale * rng.standard_normal(shape)).astype(np.float32)


def probs(rng, *shape):
    return np.asarray(jax.nn.softmax(randn(rng, *shape, scale=3.0), axis=-1))


def T(a):
    return torch.from_numpy(np.array(a))  # a writable copy

# ---------------------------------------------------------------------------------------------- teacher targets


def _sinkhorn64(logits, temp, n_iters=3):
    """The official algorithm in float64 (the reference both float32 versions are measured against)."""
    q = np.exp(logits.astype(np.float64) / temp).T
    k, b = q.shape
    q /= q.sum()
    for _ in range(n_iters):
        q /= q.sum(1, keepdims=True) * k
        q /= q.sum(0, keepdims=True) * b
    return (q * b).T


def close_probs(got, want, floor=1e-20):
    """rel 1e-5 on the probabilities above `floor`. Below ~1e-20 the official float32 code is itself off (its
    exp(l / temp) / total reaches the denormals: up to 1% against float64 at 1e-28, 100% lower down), ours is
    within 5e-6 of float64 down to 1e-30 (compare with _sinkhorn64 and floor=1e-30)."""
    got, want = np.asarray(got), np.asarray(want, dtype=np.float32)
    keep = want > floor
    close(got[keep], want[keep])
    assert np.all(got[~keep] <= 10 * floor)


def test_sinkhorn_matches_official_dino_and_ibot():
    rng = np.random.default_rng(0)
    logits = randn(rng, 24, 40)  # B != K; logits / temp of std 14
    sk = jax.jit(L.sinkhorn_knopp, static_argnames="n_iters")
    got = sk(logits, 0.07)
    close_probs(got, dinov2_loss.DINOLoss(40).sinkhorn_knopp_teacher(T(logits), teacher_temp=0.07))
    close_probs(got, _sinkhorn64(logits, 0.07), floor=1e-30)
    close(got.sum(-1), np.ones(24))
    for temp, n_iters in [(0.05, 5), (0.1, 1), (0.1, 0)]:
        want = dinov2_loss.DINOLoss(40).sinkhorn_knopp_teacher(T(logits), temp, n_iters)
        close_probs(sk(logits, temp, n_iters=n_iters), want)
    # iBOT's version counts the masked tokens (n_masked_patches); padding rows are dropped by `valid`
    ibot = dinov2_loss.iBOTPatchLoss(40).sinkhorn_knopp_teacher(T(logits[:17]), 0.07, torch.tensor([17]))
    padded = sk(logits, 0.07, valid=jnp.arange(24) < 17)
    close_probs(padded[:17], ibot)
    assert np.all(np.asarray(padded[17:]) == 0)


def test_sinkhorn_is_stable_where_the_official_overflows():
    rng = np.random.default_rng(1)
    logits = 4.0 + randn(rng, 16, 32, scale=0.5)  # logits / temp = 100 +- 12.5: exp overflows in float32
    official = dinov2_loss.DINOLoss(32).sinkhorn_knopp_teacher(T(logits), teacher_temp=0.04).numpy()
    assert not np.isfinite(official).all()
    got = np.asarray(L.sinkhorn_knopp(logits, 0.04))
    assert np.isfinite(got).all()
    close(got.sum(-1), np.ones(16))
    # shifting the logits is a no-op mathematically: the official result on a safe shift is the same
    shifted = dinov2_loss.DINOLoss(32).sinkhorn_knopp_teacher(T(logits - 3.5), teacher_temp=0.04)
    assert np.isfinite(shifted.numpy()).all()
    close_probs(got, shifted)
    close_probs(got, _sinkhorn64(logits, 0.04), floor=1e-30)
    # extreme logits (l / temp ~ +-1000), where a single global max-shift would flush whole prototypes
    wide = randn(rng, 16, 32, scale=40.0)
    got = np.asarray(L.sinkhorn_knopp(wide, 0.04))
    assert np.isfinite(got).all() and np.all(got.max(0) > 1e-3)  # no prototype flushed
    sums = got.sum(-1)  # a sample > ~88 * temp below every prototype's max underflows to zeros (official: NaN)
    assert np.all((np.abs(sums - 1) < 1e-5) | (sums == 0)) and np.mean(sums == 0) < 0.2


def test_sinkhorn_and_center_over_a_named_axis_equal_the_global_batch():
    rng = np.random.default_rng(2)
    logits = randn(rng, 24, 10, scale=2.0)
    shards = logits.reshape(4, 6, 10)  # 4 "devices" of 6 samples, vmapped with a named axis like shard_map
    got = jax.vmap(partial(L.sinkhorn_knopp, temp=0.1, axis_name="d"), axis_name="d")(shards)
    close(got.reshape(24, 10), L.sinkhorn_knopp(logits, 0.1))
    center = randn(rng, 1, 10)
    per_shard = jax.vmap(lambda l: L.update_center(center, l, 0.9, axis_name="d"), axis_name="d")(shards)
    close(per_shard[0], L.update_center(center, logits, 0.9))


def test_softmax_center_and_update_center_match_official():
    rng = np.random.default_rng(3)
    official = dinov2_loss.DINOLoss(12)
    center = jnp.zeros((1, 12))
    for step in range(3):  # the official update is applied lazily at the next softmax_center_teacher
        logits = randn(rng, 8, 12, scale=2.0)
        want = official.softmax_center_teacher(T(logits), teacher_temp=0.06)
        close(L.softmax_center(logits, center, 0.06), want)
        official.update_center(T(logits))
        center = L.update_center(center, logits, 0.9)
    official.apply_center_update()
    close(center, official.center)
    # iBOT: the centre is the mean over the masked tokens ([1, M, K] in the official code)
    ibot, ibot_center = dinov2_loss.iBOTPatchLoss(12), jnp.zeros((1, 1, 12))
    for step in range(2):
        tokens = randn(rng, 1, 15, 12)
        close(L.softmax_center(tokens, ibot_center, 0.07), ibot.softmax_center_teacher(T(tokens), 0.07))
        ibot.update_center(T(tokens))
        ibot_center = L.update_center(ibot_center, tokens[0], 0.9)
    ibot.apply_center_update()
    close(ibot_center, ibot.center)
    padded = np.concatenate([tokens[0], randn(rng, 5, 12)])
    got = L.update_center(jnp.zeros((1, 1, 12)), padded, 0.5, valid=np.arange(20) < 15)  # padding rows dropped
    close(got, 0.5 * tokens[0].mean(0)[None, None])


# ------------------------------------------------------------------------------------------------------- DINO


def _dinov3_dino_forward(student_logits, teacher_probs, ignore_diagonal=False, student_temp=0.1):
    """dinov3/loss/dino_clstoken_loss.py DINOLoss.forward (github.com/facebookresearch/dinov3), verbatim."""
    student_crops, B, K = student_logits.shape
    teacher_crops, _, _ = teacher_probs.shape
    student_logits = torch.nn.functional.log_softmax(student_logits.float() / student_temp, dim=-1)
    if not ignore_diagonal:
        loss = -torch.einsum("s b k, t b k -> ", student_logits, teacher_probs)
        return loss / (B * student_crops * teacher_crops)
    loss = -torch.einsum("s b k, t b k -> s t", student_logits, teacher_probs)
    min_st = min(student_crops, teacher_crops)
    loss = torch.diagonal_scatter(loss, loss.new_zeros(min_st))
    return loss.sum() / (B * student_crops * teacher_crops - B * min_st)


def test_dino_loss_matches_official_dinov2_and_dinov3():
    rng = np.random.default_rng(4)
    s, t = randn(rng, 5, 6, 20, scale=2.0), probs(rng, 2, 6, 20)
    official = dinov2_loss.DINOLoss(20)
    loss = jax.jit(L.dino_loss, static_argnames=("ignore_diagonal", "pair_reduction"))
    # DINOv2's forward(list, list) sums the per-pair batch means
    close(loss(s, t, pair_reduction="sum"), official(list(T(s)), list(T(t))))
    for diag in (False, True):
        close(loss(s, t, ignore_diagonal=diag), _dinov3_dino_forward(T(s), T(t), diag))
    # DINOv2's global-crops call: teacher crops swapped and concatenated, one "pair" = the off-diagonal pairs
    g = s[:2]
    close(loss(g, t, ignore_diagonal=True), official([T(g).flatten(0, 1)], [T(t[::-1].copy()).flatten(0, 1)]))
    # DINOv2's whole DINO term (ssl_meta_arch): locals vs globals + globals cross, over the number of pairs
    n_terms = 3 * 2 + 2
    dinov2_total = (official(list(T(s[2:])), list(T(t)))
                    + official([T(g).flatten(0, 1)], [T(t[::-1].copy()).flatten(0, 1)]) * 2) / n_terms
    close(loss(s, t, ignore_diagonal=True), dinov2_total)


def test_dino_loss_gradient_matches_official():
    rng = np.random.default_rng(5)
    s, t = randn(rng, 3, 4, 16, scale=2.0), probs(rng, 2, 4, 16)
    s_torch = T(s.copy()).requires_grad_()
    dinov2_loss.DINOLoss(16)(list(s_torch), list(T(t))).backward()
    close(jax.grad(L.dino_loss)(s, t, pair_reduction="sum"), s_torch.grad, atol=1e-7)
    with pytest.raises(ValueError, match="pair_reduction"):
        L.dino_loss(s, t, pair_reduction="max")


# ------------------------------------------------------------------------------------------------------- iBOT


def test_ibot_loss_matches_official_with_ragged_and_padded_masks():
    rng = np.random.default_rng(6)
    masks = np.zeros((6, 16), bool)
    for i, n in enumerate([0, 3, 7, 1, 16, 5]):
        masks[i, rng.choice(16, n, replace=False)] = True
    m = int(masks.sum())
    s, t = randn(rng, m + 9, 24, scale=2.0), probs(rng, m + 9, 24)  # 9 padding rows (the official upperbound)
    official = dinov2_loss.iBOTPatchLoss(24)
    want = official.forward_masked(T(s[:m]), T(t[:m]), T(masks))
    loss = jax.jit(L.ibot_loss)
    close(loss(s[:m], t[:m], masks), want)
    close(loss(s, t, masks), want)
    weight = (1 / T(masks).sum(-1).clamp(min=1.0)).unsqueeze(-1).expand_as(T(masks))[T(masks)]  # the collate's
    close(loss(s, t, masks), official.forward_masked(T(s), T(t), T(masks), n_masked_patches=m, masks_weight=weight))
    close(loss(s, t, masks.reshape(6, 4, 4)), want)
    s_torch = T(s[:m].copy()).requires_grad_()
    official.forward_masked(s_torch, T(t[:m]), T(masks)).backward()
    close(jax.grad(L.ibot_loss)(s[:m], t[:m], masks), s_torch.grad, atol=1e-7)


# ------------------------------------------------------------------------------------------------------ KoLeo


@pytest.mark.filterwarnings("ignore:`torch.cuda.amp.autocast")
def test_koleo_loss_matches_official():
    rng = np.random.default_rng(7)
    x = randn(rng, 64, 8)  # nearest neighbours well inside the sphere: the loss is O(1), not ~0
    x_torch = T(x.copy()).requires_grad_()
    want = dinov2_loss.KoLeoLoss()(x_torch)
    want.backward()
    close(jax.jit(L.koleo_loss)(x), want.detach())
    close(jax.grad(L.koleo_loss)(x), x_torch.grad, atol=1e-6)
    x[3] = x[11]  # an exact duplicate: distance eps * sqrt(D), the official log(dist + eps)
    close(L.koleo_loss(x), dinov2_loss.KoLeoLoss()(T(x)))


# ------------------------------------------------------------------------------------------------------- Gram


def _dinov3_gram(output_feats, target_feats, img_level=True, remove_neg=False):
    """dinov3/loss/gram_loss.py GramLoss(apply_norm=True).forward, transcribed."""
    F = torch.nn.functional
    target_feats, output_feats = F.normalize(target_feats.float(), dim=-1), F.normalize(output_feats.float(), dim=-1)
    if not img_level:
        target_feats, output_feats = target_feats.flatten(0, 1), output_feats.flatten(0, 1)
    target_sim = target_feats @ target_feats.transpose(-1, -2)
    student_sim = output_feats @ output_feats.transpose(-1, -2)
    if remove_neg:
        target_sim[target_sim < 0] = 0.0
        student_sim[student_sim < 0] = 0.0
    return torch.nn.MSELoss()(student_sim, target_sim)


def test_gram_loss_hand_computed_and_dinov3():
    eye, same = np.array([[[1.0, 0.0], [0.0, 1.0]]]), np.array([[[1.0, 0.0], [3.0, 0.0]]])
    assert float(L.gram_loss(eye, same)) == pytest.approx(0.5)  # Gram I vs all-ones: 2 entries of 1 over 4
    opposite = np.array([[[2.0, 0.0], [-1.0, 0.0]]])  # Gram [[1, -1], [-1, 1]]
    assert float(L.gram_loss(opposite, same)) == pytest.approx(2.0)  # (-2)^2 * 2 / 4
    assert float(L.gram_loss(opposite, same, remove_neg=True)) == pytest.approx(0.5)
    both = np.concatenate([eye, same])  # batch level: one 4x4 Gram over the 4 patches of both images
    assert float(L.gram_loss(both, both[::-1], img_level=False)) == pytest.approx(
        np.mean((_gram4(both) - _gram4(both[::-1])) ** 2))
    rng = np.random.default_rng(8)
    s, t = randn(rng, 3, 10, 8), randn(rng, 3, 10, 8)
    for img_level in (True, False):
        for remove_neg in (False, True):
            close(jax.jit(L.gram_loss, static_argnums=(2, 3))(s, t, img_level, remove_neg),
                  _dinov3_gram(T(s), T(t), img_level, remove_neg))


def _gram4(x):
    x = x.reshape(-1, 2) / np.linalg.norm(x.reshape(-1, 2), axis=-1, keepdims=True)
    return x @ x.T


# ------------------------------------------------------------------------------------------------------ masks


class OfficialRandom:
    """Stands in for the `random` module of the official code, drawing as jaxvit.tasks.ssl.masking does."""

    def __init__(self, seed):
        self.rng = np.random.default_rng(seed)

    def uniform(self, a, b):
        return a + (b - a) * self.rng.random()

    def randint(self, a, b):
        return int(self.rng.integers(a, b + 1))

    def shuffle(self, x):
        x[:] = [x[i] for i in self.rng.permutation(len(x))]


@pytest.mark.parametrize("grid,cap", [((14, 14), None), ((16, 16), 128.0), ((7, 10), 20)])
def test_block_mask_is_the_official_generator_on_the_same_draws(grid, cap, monkeypatch):
    official = _official("masking")
    for seed in range(20):
        target = [0, 3, 12, 40, grid[0] * grid[1] // 2][seed % 5]
        monkeypatch.setattr(official, "random", OfficialRandom(seed))
        gen = official.MaskingGenerator(grid, num_masking_patches=target, max_num_patches=cap)
        want = gen(target)
        got = M.block_mask(np.random.default_rng(seed), grid, target, max_num_patches=cap)
        assert got.dtype == bool and got.shape == grid
        np.testing.assert_array_equal(got, want)


def test_block_mask_invariants():
    rng = np.random.default_rng(9)
    counts = []
    for target in rng.integers(0, 120, 200):
        mask = M.block_mask(rng, (14, 14), int(target))
        counts.append(mask.sum())
        assert mask.sum() <= target  # DINOv2 never tops up nor overshoots
        topped = M.block_mask(rng, (14, 14), int(target), top_up=True)
        assert topped.sum() == target  # DINOv3's complete_mask_randomly
    assert np.mean(np.array(counts) > 0) > 0.95
    assert not M.block_mask(rng, (14, 14), 0).any()
    # one block on an empty grid: a rectangle strictly inside the grid, within the cap and the aspect range
    bound = (np.sqrt(4 * 0.3) - 0.5) / (np.sqrt(4 / 0.3) + 0.5)  # worst case of the rounding at area 4
    log_aspect = (np.log(0.3), np.log(1 / 0.3))
    for cap in rng.integers(4, 80, 300):
        mask = np.zeros((14, 14), bool)
        added = M._add_block(rng, mask, int(cap), 4, log_aspect)
        rows, cols = np.flatnonzero(mask.any(1)), np.flatnonzero(mask.any(0))
        h, w = len(rows), len(cols)
        assert 0 < added == mask.sum() == h * w <= cap and h < 14 and w < 14
        assert rows[-1] - rows[0] + 1 == h and cols[-1] - cols[0] + 1 == w
        assert h / w >= bound and w / h >= bound


def _fake_samples(n):
    return [({"global_crops": [torch.zeros(1)] * 2, "local_crops": [torch.zeros(1)]}, None) for _ in range(n)]


def test_batch_masks_are_the_official_collate_on_the_same_draws(monkeypatch):
    masking, collate = _official("masking"), _official("collate")
    for seed, batch in [(0, 16), (1, 10), (2, 14), (3, 32), (4, 2), (5, 64)]:
        draws = OfficialRandom(seed)
        monkeypatch.setattr(masking, "random", draws)
        monkeypatch.setattr(collate, "random", draws)
        gen = masking.MaskingGenerator((16, 16), max_num_patches=0.5 * 224 // 14 * 224 // 14)  # train.py's
        out = collate.collate_data_and_cast(_fake_samples(batch // 2), (0.1, 0.5), 0.5, torch.float32,
                                            n_tokens=256, mask_generator=gen)
        got = M.batch_masks(np.random.default_rng(seed), batch, (16, 16))
        np.testing.assert_array_equal(got, out["collated_masks"].numpy())


def test_batch_masks_stratified_ratios():
    rng = np.random.default_rng(10)
    n_tokens, batch = 256, 32
    upper = (n_tokens * M._torch_linspace(0.1, 0.5, 17)[1:]).astype(int)  # float32, as the official collate
    for _ in range(5):
        masks = M.batch_masks(rng, batch, (16, 16))
        assert masks.shape == (batch, n_tokens) and masks.dtype == bool
        counts = np.sort(masks.sum(1))
        assert (counts > 0).sum() == batch // 2
        masked = counts[batch // 2:]  # DINOv2: each count <= its stratum's target <= the stratum's upper bound
        assert np.all(masked <= upper)
        exact = np.sort(M.batch_masks(rng, batch, (16, 16), style="dinov3").sum(1))
        np.testing.assert_array_equal(exact[batch // 2:], upper)  # DINOv3: int(N * probs[i+1]) exactly
        assert not exact[:batch // 2].any()
    with pytest.raises(ValueError, match="style"):
        M.batch_masks(rng, 4, (4, 4), style="ibot")
