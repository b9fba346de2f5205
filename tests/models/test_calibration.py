"""Calibration metrics and Sequential Temperature Scaling (``dspark.models.calibration``).

Synthetic rounds: each draft position k has a true logit ``z_k``; given drafts 1..k-1
accepted, draft k is accepted with probability ``sigmoid(z_k / T_true_k)``. The raw head
(``T = 1``) is then miscalibrated wherever ``T_true_k != 1``, and STS should recover
``T_true``.
"""

import json

import numpy as np
import pytest
import torch

from dspark.models.calibration import (
    auc,
    brier,
    calibration_report,
    ece,
    fit_sts,
    labels_from_accepted,
    survival,
)

T_TRUE = (0.5, 2.0, 1.0)


def _sigmoid(x):
    return 1.0 / (1.0 + np.exp(-x))


def _rounds(n, temps, seed, varying=False):
    """(logits [N, K] NaN beyond proposed, proposed [N], accepted [N]) from sequential acceptance."""
    rng = np.random.default_rng(seed)
    k = len(temps)
    z = rng.normal(1.0, 2.0, size=(n, k))  # [N, K]
    ok = rng.random((n, k)) < _sigmoid(z / np.asarray(temps))  # [N, K]
    prefix = np.cumprod(ok, axis=1).sum(axis=1)  # [N] accepted length if all K proposed
    proposed = rng.choice([k - 1, k], size=n, p=[0.3, 0.7]) if varying else np.full(n, k)
    accepted = np.minimum(prefix, proposed)
    z[np.arange(k) >= proposed[:, None]] = np.nan
    return z, proposed, accepted


def _pairwise_auc(p, y):
    """Exact Mann-Whitney AUC over all (positive, negative) pairs; equal scores count 1/2."""
    pos, neg = p[y == 1][:, None], p[y == 0][None, :]
    return float(((pos > neg) + 0.5 * (pos == neg)).mean())


# ----------------------------------------------------------------------------- metrics


def test_ece_is_near_zero_when_labels_follow_the_predictions():
    rng = np.random.default_rng(0)
    pred = rng.random(200_000)
    label = (rng.random(pred.size) < pred).astype(float)
    assert ece(pred, label) <= 0.02


def test_ece_is_large_when_labels_are_systematically_off():
    rng = np.random.default_rng(1)
    pred = rng.random(50_000)
    label = (rng.random(pred.size) < pred**3).astype(float)  # far less often than predicted
    assert ece(pred, label) >= 0.2


def test_ece_matches_a_hand_computation_and_puts_one_in_the_last_bin():
    pred = [0.1, 0.1, 0.9, 1.0]
    label = [0, 1, 1, 1]
    # two bins: [0, 0.5) holds 0.1, 0.1 (mean label 0.5); [0.5, 1] holds 0.9, 1.0 (label 1)
    assert ece(pred, label, num_bins=2) == pytest.approx(0.5 * 0.4 + 0.5 * 0.05)
    assert ece([1.0], [1.0]) == 0.0


def test_auc_is_one_for_perfect_separation_and_zero_when_reversed():
    pred = np.array([0.05, 0.2, 0.3, 0.7, 0.8, 0.99])
    label = np.array([0, 0, 0, 1, 1, 1])
    assert auc(pred, label) == 1.0
    assert auc(pred, 1 - label) == 0.0


def test_auc_is_one_half_for_random_scores():
    rng = np.random.default_rng(2)
    pred = rng.random(20_000)
    label = (rng.random(pred.size) < 0.4).astype(float)
    assert auc(pred, label) == pytest.approx(0.5, abs=0.05)


def test_auc_is_none_without_negatives_or_positives():
    assert auc([0.2, 0.9], [1, 1]) is None
    assert auc([0.2, 0.9], [0, 0]) is None


def test_auc_agrees_with_exact_pairwise_mann_whitney():
    rng = np.random.default_rng(3)
    for _ in range(5):
        pred = rng.random(300)
        label = (rng.random(pred.size) < pred).astype(float)
        assert auc(pred, label, num_bins=1000) == pytest.approx(
            _pairwise_auc(pred, label), abs=1e-3
        )
    # scores on bin centres: same bin <=> equal score, so ties count 1/2 in both and agree exactly
    pred = (rng.integers(0, 10, size=200) + 0.5) / 10
    label = (rng.random(pred.size) < pred).astype(float)
    assert auc(pred, label, num_bins=10) == pytest.approx(_pairwise_auc(pred, label), abs=1e-12)


def test_brier_is_the_mean_squared_error():
    assert brier([0.0, 0.5, 1.0, 0.8], [0, 1, 1, 0]) == pytest.approx((0.25 + 0.64) / 4)


# ----------------------------------------------------------------------- survival, labels


def test_survival_is_the_prefix_product_and_keeps_nan_padding():
    z = np.array([[0.0, 0.0, 2.0], [1.0, np.nan, np.nan], [np.nan, np.nan, np.nan]])
    out = survival(z)
    assert out[0] == pytest.approx([0.5, 0.25, 0.25 * _sigmoid(2.0)])
    assert out[1, 0] == pytest.approx(_sigmoid(1.0))
    assert np.isnan(out[1, 1:]).all() and np.isnan(out[2]).all()
    scaled = survival(z, temperatures=[1.0, 1.0, 4.0])
    assert scaled[0, 2] == pytest.approx(0.25 * _sigmoid(0.5))


def test_survival_accepts_torch_tensors_and_lists():
    z = torch.tensor([[1.0, -1.0]], requires_grad=True)
    assert survival(z) == pytest.approx(survival([[1.0, -1.0]]))


def test_labels_are_prefix_acceptance_with_nan_beyond_proposed():
    labels = labels_from_accepted([0, 2, 1], [2, 3, 1], K=3)
    expected = np.array([[0, 0, np.nan], [1, 1, 0], [1, np.nan, np.nan]])
    np.testing.assert_array_equal(labels, expected)


# -------------------------------------------------------------------------------- report


def test_report_counts_positions_weights_the_summary_and_is_json():
    z, proposed, accepted = _rounds(4_000, T_TRUE, seed=4, varying=True)
    z = np.concatenate([z, np.full((z.shape[0], 1), np.nan)], axis=1)  # position 4: never proposed
    report = calibration_report(z, proposed, accepted)
    rows = report["positions"]
    assert [r["position"] for r in rows] == [1, 2, 3]
    assert [r["count"] for r in rows] == [4_000, 4_000, int((proposed == 3).sum())]
    weights = np.array([r["count"] for r in rows]) / sum(r["count"] for r in rows)
    assert report["summary"]["ece"] == pytest.approx(float(weights @ [r["ece"] for r in rows]))
    assert report["summary"]["count"] == sum(r["count"] for r in rows)
    for row, rel in zip(rows, report["reliability"]):
        assert sum(b[2] for b in rel["bins"]) == row["count"]
    assert json.loads(json.dumps(report)) == report


# ----------------------------------------------------------------------------------- STS


@pytest.fixture(scope="module")
def sts_rounds():
    return _rounds(80_000, T_TRUE, seed=5, varying=True)


def test_fit_sts_recovers_per_position_temperatures(sts_rounds):
    temps = fit_sts(*sts_rounds)
    assert all(type(t) is float for t in temps)
    assert temps == pytest.approx(list(T_TRUE), rel=0.15)


def test_sts_calibrates_every_position_and_keeps_ranking(sts_rounds):
    temps = fit_sts(*sts_rounds)
    raw = calibration_report(*sts_rounds)["positions"]
    sts = calibration_report(*sts_rounds, temperatures=temps)["positions"]
    for r, s in zip(raw, sts):
        assert s["ece"] <= 0.02
        assert r["ece"] > s["ece"]
    # position 1 is a monotone transform of z_1: ranking (AUC) unchanged up to binning
    assert sts[0]["auc"] == pytest.approx(raw[0]["auc"], abs=2e-3)
    # later positions mix several temperatures; the true ones rank no worse than raw
    for r, s in zip(raw[1:], sts[1:]):
        assert s["auc"] >= r["auc"] - 2e-3


def test_fit_sts_gives_one_to_unproposed_positions_and_breaks_ties_towards_one():
    z = np.array([[0.0, np.nan], [0.0, np.nan], [0.0, np.nan]])  # sigmoid(0 / T) = 0.5 for every T
    temps = fit_sts(z, [1, 1, 1], [0, 1, 1], grid=[0.3, 0.9, 1.5, 3.0])
    assert temps == [0.9, 1.0]


@pytest.mark.parametrize(
    "call, fragment",
    [
        (lambda: ece([], []), "must not be empty"),
        (lambda: ece([0.5, 0.2], [1]), "same size"),
        (lambda: ece([1.5], [1]), "pred must lie in [0, 1]"),
        (lambda: ece([0.5], [2]), "label must be 0 or 1"),
        (lambda: ece([0.5], [1], num_bins=0), "num_bins must be an integer >= 1"),
        (lambda: survival([1.0, 2.0]), "logits must be 2-D"),
        (lambda: survival([[np.nan, 1.0]]), "must be a prefix"),
        (lambda: survival([[1.0, 2.0]], [1.0, 0.0]), "temperatures must be positive"),
        (lambda: survival([[1.0, 2.0]], [1.0]), "temperatures must have length K=2"),
        (lambda: labels_from_accepted([1], [4], K=3), "proposed must lie in [0, K=3]"),
        (lambda: labels_from_accepted([2], [1], K=3), "accepted must lie in [0, proposed]"),
        (lambda: labels_from_accepted([1.5], [2], K=3), "accepted must hold whole numbers"),
        (lambda: fit_sts([[1.0, 2.0]], [2, 2], [1, 1]), "proposed must have shape [N]=(1,)"),
        (lambda: fit_sts([[1.0, 2.0]], [2], [1, 0]), "accepted must have shape [N]=(1,)"),
        (lambda: fit_sts([[1.0, np.nan]], [2], [1]), "logits must be finite at every proposed"),
        (lambda: fit_sts([[1.0]], [1], [1], grid=[-1.0]), "grid must be"),
        (lambda: fit_sts([[1.0]], [1], [3]), "accepted must lie in [0, proposed]"),
    ],
)
def test_bad_inputs_raise_value_errors_naming_the_argument(call, fragment):
    with pytest.raises(ValueError) as err:
        call()
    assert fragment in str(err.value)
