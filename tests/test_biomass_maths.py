"""jaxvit.tasks.biomass.maths: the Image2Biomass metric against numpy and scikit-learn, the losses against PyTorch and scipy,
the consistency terms on consistent and inconsistent predictions, and the long-CSV pivot with its errors."""
import csv
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxvit.tasks.biomass import maths as bm
from jaxvit.errors import DataError

W = np.asarray(bm.WEIGHTS)


def _consistent(rng, n):
    """[n, 5] masses obeying GDM = Green + Clover and Total = GDM + Dead."""
    g, d, c = rng.gamma(2.0, 20.0, (3, n)).astype(np.float32)
    return np.stack([g, d, c, g + c, (g + c) + d], axis=1)


@pytest.fixture
def data():
    rng = np.random.default_rng(0)
    y = _consistent(rng, 40)
    p = y + rng.normal(0, 10, y.shape).astype(np.float32)
    return y, p


# ---------------------------------------------------------------------------------------------------- metrics


def test_weighted_r2_matches_formula_and_sklearn(data):
    from sklearn.metrics import r2_score
    y, p = (a.astype(np.float64) for a in data)  # sklearn computes in the inputs' precision
    w = np.broadcast_to(W, y.shape)
    ybar = (w * y).sum() / w.sum()
    direct = 1 - (w * (y - p) ** 2).sum() / (w * (y - ybar) ** 2).sum()
    got = bm.weighted_r2(y, p)
    assert isinstance(got, float)
    assert got == pytest.approx(direct, rel=1e-10)
    assert got == pytest.approx(r2_score(y.ravel(), p.ravel(), sample_weight=w.ravel()), rel=1e-10)
    assert bm.weighted_r2(y, y) == 1.0


def test_weighted_r2_drops_missing_rows(data):
    from sklearn.metrics import r2_score
    y, p = (a.astype(np.float64) for a in data)
    y[3, 1] = y[7, 4] = np.nan
    keep = np.isfinite(y.ravel())
    w = np.broadcast_to(W, y.shape).ravel()
    assert bm.weighted_r2(y, p) == pytest.approx(
        r2_score(y.ravel()[keep], p.ravel()[keep], sample_weight=w[keep]), rel=1e-10)


def test_target_metrics_match_sklearn(data):
    from sklearn.metrics import mean_absolute_error, mean_squared_error, r2_score
    y, p = (a.astype(np.float64) for a in data)
    m = bm.target_metrics(y, p)
    assert set(m) == {"weighted_r2"} | {f"{k}_{s}" for k in ("r2", "rmse", "mae") for s in bm.SHORT}
    assert m["weighted_r2"] == bm.weighted_r2(y, p)
    for j, s in enumerate(bm.SHORT):
        assert m[f"r2_{s}"] == pytest.approx(r2_score(y[:, j], p[:, j]), rel=1e-9)
        assert m[f"rmse_{s}"] == pytest.approx(math.sqrt(mean_squared_error(y[:, j], p[:, j])), rel=1e-9)
        assert m[f"mae_{s}"] == pytest.approx(mean_absolute_error(y[:, j], p[:, j]), rel=1e-9)


def test_metric_shape_check():
    with pytest.raises(ValueError, match=r"\[N, 5\]"):
        bm.weighted_r2(np.zeros((4, 4)), np.zeros((4, 4)))


# ------------------------------------------------------------------------------------------------- completion


def test_complete_derives_dead_and_clover():
    raw = np.array([[10.0, 99.0, 99.0, 14.0, 20.0]], np.float32)  # Green, (Dead), (Clover), GDM, Total
    np.testing.assert_allclose(bm.complete(raw), [[10, 6, 99, 14, 20]])
    np.testing.assert_allclose(bm.complete(raw, train_clover=False), [[10, 6, 4, 14, 20]])
    np.testing.assert_allclose(bm.complete(raw, train_dead=True), raw)
    assert float(bm.mass_balance(bm.complete(raw, train_clover=False))[0]) == 0.0
    np.testing.assert_allclose(bm.loss_weights(), [0.1, 0, 0.1, 0.2, 0.5])
    np.testing.assert_allclose(bm.loss_weights(True, False), [0.1, 0.1, 0, 0.2, 0.5])


# ----------------------------------------------------------------------------------------------------- losses


@pytest.mark.parametrize("beta", [1.0, 0.5, 0.0])
def test_smooth_l1_matches_torch(data, beta):
    import torch
    import torch.nn.functional as F
    y, p = data
    p = y + (p - y) / 8  # residuals on both sides of beta
    w = bm.loss_weights()
    ref = F.smooth_l1_loss(torch.from_numpy(p), torch.from_numpy(y), reduction="none", beta=beta)
    ref = (ref * torch.from_numpy(w)).sum(-1).numpy()
    got = bm.smooth_l1(p, y, w, beta)
    assert got.shape == (len(y),) and got.dtype == jnp.float32
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("delta", [5.0, 1.0])
def test_huber_matches_torch(data, delta):
    import torch
    import torch.nn.functional as F
    y, p = data
    ref = F.huber_loss(torch.from_numpy(p[:, 1]), torch.from_numpy(y[:, 1]), reduction="none", delta=delta)
    np.testing.assert_allclose(bm.huber(p[:, 1], y[:, 1], delta), ref.numpy(), rtol=1e-5, atol=1e-6)


def test_missing_targets_add_nothing_and_keep_gradients_finite(data):
    y, p = data
    y = y.copy()
    y[0, 2] = np.nan
    w = np.ones(5, np.float32)
    no_clover = bm.smooth_l1(p, data[0], np.array([1, 1, 0, 1, 1], np.float32))
    np.testing.assert_allclose(bm.smooth_l1(p, y, w)[0], no_clover[0], rtol=1e-6)
    assert np.isfinite(np.asarray(bm.planthydra(p, y, w))).all()
    losses = {"smooth_l1": lambda q: bm.smooth_l1(q, y, w), "huber": lambda q: bm.huber(q, y),
              "nll": lambda q: bm.gaussian_nll(q, jnp.zeros_like(q), y), "planthydra": lambda q: bm.planthydra(q, y, w)}
    for name, loss in losses.items():
        g = np.asarray(jax.grad(lambda q: loss(q).mean())(jnp.asarray(p)))
        assert np.isfinite(g).all(), name
        if name != "planthydra":  # its compositional term uses every output, observed or not
            assert g[0, 2] == 0, name


def test_planthydra_terms(data):
    y, p = data
    w = bm.loss_weights()
    # compositional: exactly zero when GDM = Green + Clover and Total = GDM + Dead, positive otherwise
    assert np.all(np.asarray(bm.compositional(y)) == 0.0)
    off = y.copy()
    off[:, 3] += 1.0
    assert np.all(np.asarray(bm.compositional(off)) > 0)
    off = y.copy()
    off[:, 4] -= 1.0
    assert np.all(np.asarray(bm.compositional(off)) > 0)
    # cosine: zero for vectors proportional to the truth
    np.testing.assert_allclose(bm.cosine_distance(3.0 * y, y), 0.0, atol=1e-6)
    assert np.all(np.asarray(bm.cosine_distance(p, y)) > 0)
    # whole loss: the truth costs nothing; the parts add up
    np.testing.assert_allclose(bm.planthydra(y, y, w), 0.0, atol=1e-6)
    log_part = bm.smooth_l1(np.log1p(np.maximum(p, 0)), np.log1p(y), w)
    expected = log_part + 0.4 * bm.cosine_distance(p, y) + 0.1 * bm.compositional(p)
    np.testing.assert_allclose(bm.planthydra(p, y, w), expected, rtol=1e-5)
    assert np.all(np.isfinite(np.asarray(bm.planthydra(-p, y, w))))  # negative outputs are clipped before log1p


def test_mass_balance(data):
    y, p = data
    assert np.all(np.asarray(bm.mass_balance(y)) == 0.0)
    off = y.copy()
    off[:, 4] *= 1.2
    mb = np.asarray(bm.mass_balance(off))
    assert mb.shape == (len(y),) and np.all((mb > 0) & (mb < 1))


def test_gaussian_nll_matches_scipy(data):
    from scipy.stats import norm
    y, p = data
    log_var = np.random.default_rng(1).normal(3.0, 1.0, y.shape).astype(np.float32)
    ref = -norm.logpdf(y, loc=p, scale=np.exp(0.5 * log_var)).sum(-1)
    np.testing.assert_allclose(bm.gaussian_nll(p, log_var, y), ref, rtol=1e-5)


def test_qc_plausibility(data):
    y, _ = data
    top = bm.plausible_max(y)
    np.testing.assert_allclose(top, 1.5 * y.max(0), rtol=1e-6)
    assert np.all(np.asarray(bm.qc_plausibility(y, top)) == 0.0)
    bad = y[:2].copy()
    bad[0, 1] = -2.0
    bad[1, 4] = top[4] + 3.0
    np.testing.assert_allclose(bm.qc_plausibility(bad, top), [4.0, 9.0], rtol=1e-5)
    np.testing.assert_allclose(bm.qc_plausibility(bad), [4.0, 0.0])


# ------------------------------------------------------------------------------------------------ long -> wide


def _long_rows(y, labelled=True):
    rows = []
    for i, masses in enumerate(y):
        for name, m in zip(bm.TARGETS, masses):
            r = {"sample_id": f"ID{i}__{name}", "image_path": f"train/ID{i}.jpg", "Sampling_Date": "2015/9/4",
                 "State": "Tas", "Species": "Ryegrass", "Pre_GSHH_NDVI": "0.62", "Height_Ave_cm": "4.6",
                 "target_name": name}
            if labelled:
                r["target"] = repr(float(m))
            rows.append(r)
    return rows


def test_pivot_round_trip_through_csv(data, tmp_path):
    y, _ = data
    rows = _long_rows(y[:6])
    path = tmp_path / "train.csv"
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows[::-1])  # order of rows within and across images does not matter
    recs = bm.read_long_csv(path)
    assert list(recs) == [f"train/ID{i}.jpg" for i in range(5, -1, -1)]
    for i in range(6):
        r = recs[f"train/ID{i}.jpg"]
        assert r["targets"].dtype == np.float32
        np.testing.assert_array_equal(r["targets"], y[i])
        assert r["sample_ids"] == {t: f"ID{i}__{t}" for t in bm.TARGETS}
        assert r["metadata"] == {"Sampling_Date": "2015/9/4", "State": "Tas", "Species": "Ryegrass",
                                 "Pre_GSHH_NDVI": 0.62, "Height_Ave_cm": 4.6}


def test_pivot_test_csv_without_targets():
    rows = [{"sample_id": f"ID9__{t}", "image_path": "test/ID9.jpg", "target_name": t} for t in bm.TARGETS]
    recs = bm.pivot_long(rows, "test.csv")
    assert recs == {"test/ID9.jpg": {"targets": None, "metadata": {},
                                     "sample_ids": {t: f"ID9__{t}" for t in bm.TARGETS}}}


def test_pivot_allow_missing(data):
    rows = [r for r in _long_rows(data[0][:2]) if r["sample_id"] != "ID1__Dry_Dead_g"]
    with pytest.raises(DataError, match=r"t\.csv: image 'train/ID1\.jpg' \(line 7\) has no row for Dry_Dead_g"):
        bm.pivot_long(rows, "t.csv")
    recs = bm.pivot_long(rows, "t.csv", allow_missing=True)
    assert np.isnan(recs["train/ID1.jpg"]["targets"][1])
    assert np.isfinite(np.delete(recs["train/ID1.jpg"]["targets"], 1)).all()


def _edit(rows, i, **kw):
    rows = [dict(r) for r in rows]
    rows[i].update(kw)
    return rows


@pytest.mark.parametrize("edit, message", [
    (lambda r: [{k: v for k, v in x.items() if k != "image_path"} for x in r],
     r"t\.csv line 2: missing column\(s\) image_path"),
    (lambda r: _edit(r, 2, target_name="Dry_Weed_g"), r"t\.csv line 4: unknown target_name 'Dry_Weed_g'"),
    (lambda r: _edit(r, 3, target_name="Dry_Green_g"),
     r"t\.csv line 5: duplicate row for image 'train/ID0\.jpg' and target Dry_Green_g \(first at line 2\)"),
    (lambda r: _edit(r, 6, target="-1.5"),
     r"t\.csv line 8: negative mass -1\.5 for Dry_Dead_g of image 'train/ID1\.jpg'"),
    (lambda r: _edit(r, 6, target="abc"), r"t\.csv line 8: target \(Dry_Dead_g\) 'abc' is not a number"),
    (lambda r: _edit(r, 6, target="nan"), r"t\.csv line 8: .* is not a finite number"),
    (lambda r: _edit(r, 1, Height_Ave_cm="tall"), r"t\.csv line 3: Height_Ave_cm 'tall' is not a number"),
    (lambda r: _edit(r, 1, State="Vic"), r"t\.csv line 3: metadata of image 'train/ID0\.jpg' differ from its line 2"),
    (lambda r: [], r"t\.csv: no rows"),
])
def test_pivot_errors(data, edit, message):
    with pytest.raises(DataError, match=message):
        bm.pivot_long(edit(_long_rows(data[0][:2])), "t.csv")
