"""Calibration of the drafter's confidence head: metrics and Sequential Temperature Scaling.

Terms used throughout:

* A *round* is one speculative-decoding step. The drafter proposes ``m`` draft tokens
  (``proposed``, ``0 <= m <= K``) and the verifier accepts a prefix of ``a`` of them
  (``accepted``, ``0 <= a <= m``).
* ``logits[n, k-1]`` is the confidence head's raw logit ``z_k`` for draft position ``k`` of
  round ``n``; it is NaN (or ignored) where ``k > m``.
* The *prefix survival prediction* at position ``k`` is
  ``pred_k = prod_{i <= k} sigmoid(z_i / T_i)``: the predicted probability that the first
  ``k`` drafts are all accepted. ``T_i`` is 1 for raw logits, or a fitted temperature.
* The *label* at position ``k`` is ``y_k = 1[a >= k]``. Only positions ``k <= m`` count.
* *Sequential Temperature Scaling* (STS, DSpark paper section 3.2.1) fits ``T_1 .. T_K`` in
  order, each one minimising the ECE of ``pred_k`` with the earlier temperatures fixed.

Every function accepts numpy arrays, torch tensors or nested lists.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

DEFAULT_GRID = np.logspace(-1, 1, 201)  # 0.1 ... 10, 100 points per decade
_TIE_TOL = 1e-12  # ECE values this close count as a tie in fit_sts


def _as_float(x, name: str) -> np.ndarray:
    """``x`` as a float64 numpy array (torch tensors are detached and moved to the CPU)."""
    if hasattr(x, "detach"):
        x = x.detach().cpu()
    try:
        return np.asarray(x, dtype=np.float64)
    except (TypeError, ValueError) as err:
        raise ValueError(f"{name} must be numeric array-like: {err}") from None


def _as_int(x, name: str) -> np.ndarray:
    """``x`` as an int64 numpy array; every value must be a whole number."""
    arr = _as_float(x, name)
    if not np.all(np.isfinite(arr)) or np.any(arr != np.round(arr)):
        raise ValueError(f"{name} must hold whole numbers")
    return arr.astype(np.int64)


def _check_num_bins(num_bins) -> int:
    if isinstance(num_bins, bool) or not isinstance(num_bins, int | np.integer) or num_bins < 1:
        raise ValueError(f"num_bins must be an integer >= 1, got {num_bins!r}")
    return int(num_bins)


def _pred_label(pred, label) -> tuple[np.ndarray, np.ndarray]:
    """Flattened, validated (pred, label): same size, non-empty, pred in [0, 1], label in {0, 1}."""
    p = _as_float(pred, "pred").ravel()  # [N]
    y = _as_float(label, "label").ravel()  # [N]
    if p.size != y.size:
        raise ValueError(f"pred and label must have the same size, got {p.size} and {y.size}")
    if p.size == 0:
        raise ValueError("pred and label must not be empty")
    if not np.all((p >= 0.0) & (p <= 1.0)):
        raise ValueError("pred must lie in [0, 1] (no NaN)")
    if not np.all((y == 0.0) | (y == 1.0)):
        raise ValueError("label must be 0 or 1 (no NaN)")
    return p, y


def _bin_index(p: np.ndarray, num_bins: int) -> np.ndarray:
    """Equal-width bin of each prediction on [0, 1]; a prediction of exactly 1 is in the last."""
    return np.minimum((p * num_bins).astype(np.int64), num_bins - 1)  # [N]


def _bin_stats(p: np.ndarray, y: np.ndarray, num_bins: int):
    """Per-bin (count, sum of pred, sum of label), each ``[num_bins]``."""
    idx = _bin_index(p, num_bins)  # [N]
    count = np.bincount(idx, minlength=num_bins)  # [B]
    sum_p = np.bincount(idx, weights=p, minlength=num_bins)  # [B]
    sum_y = np.bincount(idx, weights=y, minlength=num_bins)  # [B]
    return count, sum_p, sum_y


def _ece_checked(p: np.ndarray, y: np.ndarray, num_bins: int) -> float:
    count, sum_p, sum_y = _bin_stats(p, y, num_bins)
    # sum_b (n_b / N) |mean_pred_b - mean_label_b| == sum_b |sum_p_b - sum_y_b| / N
    return float(np.abs(sum_p - sum_y).sum() / p.size)


def ece(pred, label, num_bins: int = 20) -> float:
    """Expected calibration error: ``sum_b (n_b / N) |mean_pred_b - mean_label_b|``.

    Bins are ``num_bins`` equal-width intervals of [0, 1]; a prediction of exactly 1.0 falls
    in the last bin. Empty input raises ValueError.
    """
    p, y = _pred_label(pred, label)
    return _ece_checked(p, y, _check_num_bins(num_bins))


def auc(pred, label, num_bins: int = 1000) -> float | None:
    """ROC AUC (Mann-Whitney) from ``num_bins``-bin histograms of positives and negatives.

    AUC is the probability that a random positive scores above a random negative; a pair in
    the same bin counts 1/2. None when there are no positives or no negatives.
    """
    p, y = _pred_label(pred, label)
    num_bins = _check_num_bins(num_bins)
    idx = _bin_index(p, num_bins)  # [N]
    pos = np.bincount(idx[y == 1.0], minlength=num_bins).astype(np.float64)  # [B]
    neg = np.bincount(idx[y == 0.0], minlength=num_bins).astype(np.float64)  # [B]
    n_pos, n_neg = pos.sum(), neg.sum()
    if n_pos == 0 or n_neg == 0:
        return None
    neg_below = np.cumsum(neg) - neg  # [B] negatives in strictly lower bins
    wins = (pos * (neg_below + 0.5 * neg)).sum()
    return float(wins / (n_pos * n_neg))


def brier(pred, label) -> float:
    """Brier score: mean of ``(pred - label)^2``."""
    p, y = _pred_label(pred, label)
    return float(np.mean((p - y) ** 2))


def _check_temperatures(temperatures, k: int) -> np.ndarray:
    """Length-K positive finite temperatures (all 1 when None)."""
    if temperatures is None:
        return np.ones(k)
    t = _as_float(temperatures, "temperatures").ravel()  # [K]
    if t.size != k:
        raise ValueError(f"temperatures must have length K={k}, got {t.size}")
    if not np.all(np.isfinite(t) & (t > 0)):
        raise ValueError("temperatures must be positive finite floats (> 0)")
    return t


def _sigmoid(x: np.ndarray) -> np.ndarray:
    """Numerically stable logistic function (NaN stays NaN): ``(1 + tanh(x / 2)) / 2``,
    one ufunc pass, no overflow."""
    return 0.5 * (1.0 + np.tanh(0.5 * x))


def survival(logits, temperatures: Sequence[float] | None = None) -> np.ndarray:
    """Prefix survival predictions ``prod_{i <= k} sigmoid(z_i / T_i)``, shape ``[N, K]``.

    ``logits`` is ``[N, K]`` with NaN where a position was not proposed; the proposed
    positions of each round must be a prefix (no finite value after a NaN). NaN is kept
    where not proposed. ``temperatures`` is a length-K sequence of positive floats, or None
    for all ones.
    """
    z = _as_float(logits, "logits")
    if z.ndim != 2:
        raise ValueError(f"logits must be 2-D [N, K], got shape {z.shape}")
    t = _check_temperatures(temperatures, z.shape[1])  # [K]
    missing = np.isnan(z)  # [N, K]
    if np.any(np.isinf(z)):
        raise ValueError("logits must be finite or NaN (not proposed), found inf")
    if np.any(missing[:, :-1] & ~missing[:, 1:]):
        raise ValueError("logits: proposed positions must be a prefix (a value after a NaN)")
    step = _sigmoid(np.where(missing, 0.0, z) / t)  # [N, K]
    surv = np.cumprod(step, axis=1)  # [N, K]
    surv[missing] = np.nan
    return surv


def labels_from_accepted(accepted, proposed, K: int) -> np.ndarray:
    """Labels ``y_k = 1[accepted >= k]``, shape ``[N, K]``, NaN where ``k > proposed``."""
    if isinstance(K, bool) or not isinstance(K, int | np.integer) or K < 1:
        raise ValueError(f"K must be an integer >= 1, got {K!r}")
    acc = _as_int(accepted, "accepted")
    prop = _as_int(proposed, "proposed")
    if acc.ndim != 1 or prop.shape != acc.shape:
        raise ValueError(
            f"accepted and proposed must be 1-D [N] of equal length, got {acc.shape} and {prop.shape}"
        )
    if np.any(prop < 0) or np.any(prop > K):
        raise ValueError(f"proposed must lie in [0, K={K}]")
    if np.any(acc < 0) or np.any(acc > prop):
        raise ValueError("accepted must lie in [0, proposed]")
    k = np.arange(1, K + 1)  # [K]
    labels = (acc[:, None] >= k).astype(np.float64)  # [N, K]
    labels[k > prop[:, None]] = np.nan
    return labels


def _rounds(logits, proposed, accepted) -> tuple[np.ndarray, np.ndarray]:
    """Validated (logits masked to NaN beyond ``proposed``, labels), both ``[N, K]``."""
    z = _as_float(logits, "logits")
    if z.ndim != 2:
        raise ValueError(f"logits must be 2-D [N, K], got shape {z.shape}")
    n, k = z.shape
    prop = _as_int(proposed, "proposed")
    if prop.shape != (n,):
        raise ValueError(f"proposed must have shape [N]=({n},), got {prop.shape}")
    if _as_float(accepted, "accepted").shape != (n,):
        raise ValueError(f"accepted must have shape [N]=({n},)")
    labels = labels_from_accepted(accepted, prop, k)  # [N, K]
    used = ~np.isnan(labels)  # [N, K] positions k <= proposed
    if np.any(~np.isfinite(z[used])):
        raise ValueError("logits must be finite at every proposed position (k <= proposed)")
    return np.where(used, z, np.nan), labels


def _reliability_bins(p: np.ndarray, y: np.ndarray, num_bins: int) -> list[list]:
    """Non-empty bins as ``[mean_pred, mean_label, count]`` lists."""
    count, sum_p, sum_y = _bin_stats(p, y, num_bins)
    nz = np.nonzero(count)[0]
    return [[float(sum_p[b] / count[b]), float(sum_y[b] / count[b]), int(count[b])] for b in nz]


def _weighted(values: list[float | None], weights: list[int]) -> float | None:
    """Weighted mean ignoring None entries; None when nothing is left."""
    pairs = [(v, w) for v, w in zip(values, weights) if v is not None]
    total = sum(w for _, w in pairs)
    return float(sum(v * w for v, w in pairs) / total) if total else None


def calibration_report(
    logits, proposed, accepted, temperatures: Sequence[float] | None = None, num_bins: int = 20
) -> dict:
    """Per-position calibration of prefix survival predictions, JSON-serialisable.

    Returns ``{"num_bins", "temperatures", "positions", "summary", "reliability"}``:
    ``positions`` lists, for each k = 1..K with at least one round proposing k,
    ``{"position", "count", "ece", "auc", "brier", "mean_pred", "mean_label"}`` (auc None
    when the position has only one label value); ``summary`` holds count-weighted
    ``ece``/``auc``/``brier`` over those positions (auc ignores None) and the total
    ``count``; ``reliability`` lists ``{"position", "bins": [[mean_pred, mean_label,
    count], ...]}`` over non-empty bins.
    """
    num_bins = _check_num_bins(num_bins)
    z, labels = _rounds(logits, proposed, accepted)  # [N, K] each
    t = _check_temperatures(temperatures, z.shape[1])  # [K]
    pred = survival(z, t)  # [N, K]
    positions, reliability = [], []
    for k in range(z.shape[1]):
        used = ~np.isnan(labels[:, k])  # [N]
        if not used.any():
            continue
        p, y = pred[used, k], labels[used, k]  # [n_k] each
        positions.append(
            {
                "position": k + 1,
                "count": int(used.sum()),
                "ece": _ece_checked(p, y, num_bins),
                "auc": auc(p, y),
                "brier": brier(p, y),
                "mean_pred": float(p.mean()),
                "mean_label": float(y.mean()),
            }
        )
        reliability.append({"position": k + 1, "bins": _reliability_bins(p, y, num_bins)})
    counts = [row["count"] for row in positions]
    summary = {"count": int(sum(counts))}
    for key in ("ece", "auc", "brier"):
        summary[key] = _weighted([row[key] for row in positions], counts)
    return {
        "num_bins": num_bins,
        "temperatures": [float(v) for v in t],
        "positions": positions,
        "summary": summary,
        "reliability": reliability,
    }


def _check_grid(grid) -> np.ndarray:
    g = DEFAULT_GRID if grid is None else _as_float(grid, "grid").ravel()  # [G]
    if g.size == 0 or not np.all(np.isfinite(g) & (g > 0)):
        raise ValueError("grid must be a non-empty sequence of positive finite temperatures")
    return g


def _best_temperature(
    prev: np.ndarray, z: np.ndarray, y: np.ndarray, grid: np.ndarray, num_bins: int
) -> float:
    """Grid temperature minimising ECE of ``prev * sigmoid(z / T)``; ties go closest to 1."""
    errs = np.array([_ece_checked(prev * _sigmoid(z / t), y, num_bins) for t in grid])  # [G]
    tied = np.nonzero(errs <= errs.min() + _TIE_TOL)[0]
    closeness = np.abs(np.log(grid[tied]))  # distance from T = 1 on the log scale
    return float(grid[tied[np.argmin(closeness)]])


def fit_sts(logits, proposed, accepted, grid=None, num_bins: int = 20) -> list[float]:
    """Sequential Temperature Scaling: one temperature per draft position, fitted in order.

    For k = 1..K, with ``a_hat_{k-1}`` the calibrated survival so far (``a_hat_0 = 1``), pick
    ``T_k`` from ``grid`` (default 0.1..10 log-spaced, 201 values) minimising the ECE of
    ``a_hat_k(T) = a_hat_{k-1} * sigmoid(z_k / T)`` against ``y_k`` over rounds proposing
    position k, then fix it. Positions nobody proposed get 1.0; ties go to the grid value
    closest to 1 (on the log scale).
    """
    num_bins = _check_num_bins(num_bins)
    g = _check_grid(grid)  # [G]
    z, labels = _rounds(logits, proposed, accepted)  # [N, K] each
    positions = []
    for k in range(z.shape[1]):
        used = ~np.isnan(labels[:, k])  # [N] rounds proposing position k + 1
        positions.append((z[used, : k + 1], labels[used, k]))
    return fit_sts_prefixes(positions, g, num_bins)


def fit_sts_prefixes(
    positions: Sequence[tuple[np.ndarray, np.ndarray]],
    grid=None,
    num_bins: int = 20,
    initial: Sequence[float] | None = None,
) -> list[float]:
    """STS on per-position samples: the one fit behind ``fit_sts`` and the online monitor.

    ``positions[k-1]`` is ``(prefix_logits [n_k, k], labels [n_k])``: for each round that
    observed position k, its raw logits ``z_1 .. z_k`` and ``y_k``. The rows of different
    positions need not be the same rounds (the online monitor keeps one sliding window per
    position). ``T_k`` is fitted as in ``fit_sts`` with ``a_hat_{k-1}`` recomputed from each
    row's own prefix under the temperatures already fitted; a position without rows keeps
    ``initial[k-1]`` (1.0 when ``initial`` is None).
    """
    num_bins = _check_num_bins(num_bins)
    g = _check_grid(grid)  # [G]
    k_max = len(positions)
    start = [1.0] * k_max if initial is None else list(_check_temperatures(initial, k_max))
    temps: list[float] = []
    for k, (prefix, label) in enumerate(positions):
        z = _as_float(prefix, "prefix_logits").reshape(-1, k + 1)  # [n_k, k + 1]
        y = _as_float(label, "labels").ravel()  # [n_k]
        if y.size != z.shape[0]:
            raise ValueError(f"position {k + 1}: {z.shape[0]} prefixes but {y.size} labels")
        if not (np.all(np.isfinite(z)) and np.all((y == 0.0) | (y == 1.0))):
            raise ValueError(f"position {k + 1}: logits must be finite and labels 0 or 1")
        if y.size == 0:
            temps.append(float(start[k]))
            continue
        prev = np.ones(y.size)  # [n_k] a_hat_{k-1}
        for i, t_i in enumerate(temps):
            prev = prev * _sigmoid(z[:, i] / t_i)
        temps.append(_best_temperature(prev, z[:, k], y, g, num_bins))
    return temps
