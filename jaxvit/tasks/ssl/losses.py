"""DINOv2/DINOv3 self-supervised losses in JAX: teacher targets (Sinkhorn-Knopp, centred softmax), the DINO
[CLS] cross-entropy, the masked iBOT patch cross-entropy, the KoLeo spreading term and DINOv3's Gram anchoring.

Pure float32 functions (inputs are cast), jit-able with static shapes. Batch statistics (Sinkhorn sums, the
centre, means over the batch) are over the arrays given: under plain `jit` with a sharded global batch these
`jnp` reductions are already global; inside `shard_map` / `pmap` pass `axis_name` where offered (the official
code's `all_reduce`) or `pmean` the loss. Parity with `dinov2.loss` is tested in tests/test_ssl_losses.py.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

F32 = jnp.float32
HIGHEST = jax.lax.Precision.HIGHEST  # the products stay float32 (no TF32/bf16 passes on GPU/TPU)


def _psum(x, axis_name):
    return x if axis_name is None else jax.lax.psum(x, axis_name)


def sinkhorn_knopp(teacher_logits, temp, n_iters: int = 3, axis_name=None, valid=None):
    """Q = exp(l/temp) / sum; n_iters x (Q /= K * sum_b Q; Q /= B * sum_k Q); return B * Q  ([B, K] rows sum to 1).

    The official `sinkhorn_knopp_teacher` in the [B, K] layout (its K x B matrix transposed): "rows" (one per
    prototype) are sums over the batch axis, all-reduced over `axis_name` (B is the global batch); "columns" (one
    per sample) are sums over K. Stable: each prototype's (global) max of l is subtracted before / temp and exp,
    a factor the first prototype normalisation cancels (n_iters=0: the global max), so the result is the same
    without the official overflow (inf/NaN once l/temp > ~88) and without flushing whole rare prototypes, as one
    global shift would (a sample ~88 * temp below every prototype's max still underflows: zeros, official NaN).
    `valid` ([B] bool) drops padding rows (zero probabilities; B counts the valid rows, like the iBOT version's
    `n_masked_patches_tensor`)."""
    valid = jnp.ones(teacher_logits.shape[:1], bool) if valid is None else valid
    l = jnp.where(valid[:, None], teacher_logits.astype(F32), -jnp.inf)
    lmax = jnp.max(l, axis=0 if n_iters else None, keepdims=True)
    lmax = lmax if axis_name is None else jax.lax.pmax(lmax, axis_name)
    q = jnp.exp((l - jnp.where(jnp.isfinite(lmax), lmax, 0.0)) / temp)  # shifted before / temp: exact-er
    b, k = _psum(valid.sum().astype(F32), axis_name), l.shape[1]
    tiny = jnp.finfo(F32).tiny  # zero sums only where nothing is valid (no masked token): zeros, not NaN
    q = q / jnp.maximum(_psum(q.sum(), axis_name), tiny)
    for _ in range(n_iters):
        q = q / jnp.maximum(_psum(q.sum(0, keepdims=True), axis_name), tiny) / k
        q = q / jnp.maximum(q.sum(1, keepdims=True), tiny) / jnp.maximum(b, 1)  # padding rows: 0 / tiny
    return q * b


def softmax_center(teacher_logits, center, temp):
    """p = softmax((l - center) / temp) over the last axis (DINO centring and sharpening of the teacher)."""
    return jax.nn.softmax((teacher_logits.astype(F32) - center) / temp, axis=-1)


def update_center(center, teacher_logits, momentum: float = 0.9, axis_name=None, valid=None):
    """center' = m * center + (1 - m) * mean_b l_b (mean over the global batch; `valid` [B] drops padding rows)."""
    l = teacher_logits.astype(F32).reshape(-1, teacher_logits.shape[-1])
    w = jnp.ones(l.shape[:1], F32) if valid is None else valid.reshape(-1).astype(F32)
    mean = _psum(w @ l, axis_name) / _psum(w.sum(), axis_name)
    return momentum * center + (1 - momentum) * mean.reshape(jnp.shape(center))


def dino_loss(student_logits, teacher_probs, student_temp: float = 0.1, ignore_diagonal: bool = False,
              pair_reduction: str = "mean"):
    """L = -1/(B n_pairs) sum_{(s,t),b} sum_k t_tbk log_softmax(s_sb / temp)_k, pairs (s,t) (s != t if ignore_diagonal).

    student_logits [S, B, K], teacher_probs [T, B, K]. "mean" is DINOv3's `DINOLoss.forward` exactly
    (n_pairs = S*T, or S*T - min(S, T) when the same-index pairs are ignored). "sum" returns the sum over pairs
    of the per-pair batch means, which is what DINOv2's `DINOLoss.forward(student_list, teacher_list)` returns
    (its training step then divides by the total number of pairs itself)."""
    lsm = jax.nn.log_softmax(student_logits.astype(F32) / student_temp, axis=-1)
    per_pair = -jnp.einsum("sbk,tbk->st", lsm, teacher_probs.astype(F32), precision=HIGHEST) / lsm.shape[1]
    s, t = per_pair.shape
    if ignore_diagonal:
        per_pair = jnp.where(jnp.eye(s, t, dtype=bool), 0.0, per_pair)
    if pair_reduction == "sum":
        return per_pair.sum()
    if pair_reduction != "mean":
        raise ValueError(f"pair_reduction={pair_reduction!r}: use 'mean' or 'sum'")
    return per_pair.sum() / (s * t - (min(s, t) if ignore_diagonal else 0))


def ibot_loss(student_patch_logits, teacher_patch_probs, masks, student_temp: float = 0.1):
    """L = -1/N sum_{masked (n, p)} (1 / max(|mask_n|, 1)) sum_k t_np,k log_softmax(s_np / temp)_k.

    Rows of the [M, K] inputs are the masked tokens in row-major order of `masks` [N, P] (the official
    `mask_indices_list`); rows past masks.sum() are padding and ignored, so M may be a static upper bound."""
    masks = masks.reshape(masks.shape[0], -1)
    m = student_patch_logits.shape[0]
    weight = masks / jnp.maximum(masks.sum(-1, keepdims=True), 1).astype(F32)
    (idx,) = jnp.nonzero(masks.reshape(-1), size=m, fill_value=0)
    token_w = jnp.where(jnp.arange(m) < masks.sum(), weight.reshape(-1)[idx], 0.0)
    lsm = jax.nn.log_softmax(student_patch_logits.astype(F32) / student_temp, axis=-1)
    ce = -jnp.sum(teacher_patch_probs.astype(F32) * lsm, axis=-1)
    return jnp.sum(ce * token_w) / masks.shape[0]


def koleo_loss(x, eps: float = 1e-8):
    """L = -mean_i log(||x_i - x_nn(i) + eps|| + eps), x L2-normalised, nn(i) = argmax_{j != i} <x_i, x_j>."""
    x = x.astype(F32)
    x = x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), eps)
    dots = jnp.matmul(x, x.T, precision=HIGHEST)
    dots = jnp.where(jnp.eye(x.shape[0], dtype=bool), -1.0, dots)
    nn = jnp.argmax(jax.lax.stop_gradient(dots), axis=1)
    dist = jnp.linalg.norm(x - x[nn] + eps, axis=-1)  # torch.nn.PairwiseDistance(eps) adds eps to the difference
    return -jnp.mean(jnp.log(dist + eps))


def gram_loss(student_patches, teacher_patches, img_level: bool = True, remove_neg: bool = False,
              normalize: bool = True):
    """L = mean (X_s X_s^T - X_t X_t^T)^2, X the L2-normalised patch features of one image (img_level) or of the batch.

    [B, P, D] inputs; img_level=False flattens them to [B*P, D] (one (BP)^2 Gram matrix; DINOv3's default config
    has img_level false). remove_neg clamps negative similarities of both Gram matrices to 0 first. DINOv3's
    `GramLoss` (`dinov3/loss/gram_loss.py`; its `remove_only_teacher_neg` is not offered)."""
    def gram(x):
        x = x.astype(F32)
        if normalize:
            x = x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), 1e-12)
        if not img_level:
            x = x.reshape(-1, x.shape[-1])
        g = jnp.matmul(x, jnp.swapaxes(x, -1, -2), precision=HIGHEST)
        return jnp.maximum(g, 0.0) if remove_neg else g
    return jnp.mean((gram(student_patches) - gram(teacher_patches)) ** 2)
