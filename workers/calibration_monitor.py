"""Online calibration-drift monitor of the drafter's confidence head (issue 13, point 3).

Vocabulary (the same as ``dspark.models.calibration``, so the online ECE is the number
``dspark eval`` reports offline):

* An *observation* of position k is one verified round with ``proposed >= k``: the round's
  raw logits ``z_1 .. z_k`` (its *prefix*) and its accepted count.
* The *prediction* at position k is the prefix survival
  ``pred_k = prod_{i <= k} sigmoid(z_i / T_i)`` under the monitor's current temperatures;
  the *label* is ``y_k = 1[accepted >= k]``. Every verified position is an observation,
  also after the first rejection (it is then an observed 0): this is the definition of
  ``calibration_report``, whose summary ECE ``dspark eval`` and STS fitting use.
* The *conditional acceptance* ``c_k = P(draft k accepted | drafts 1..k-1 accepted)`` is what
  the head's ``sigmoid(z_k / T_k)`` predicts on its own; it is reported per position as a
  diagnostic (mean predicted vs observed over the observations with ``accepted >= k - 1``),
  but drift is judged on the survival ECE above.
* The *window* of position k holds its last ``window`` observations. Later positions are
  verified less often (the budget's ℓ_r), so their windows reach further back in time.
* The *online ECE* is the count-weighted mean over positions of each window's binned ECE
  (``num_bins`` equal-width bins), exactly ``calibration_report(...)["summary"]["ece"]`` of
  the windows' rounds.
* *Drift*: the online ECE exceeds ``threshold`` with at least ``min_samples`` observations.
* A *refit* re-runs Sequential Temperature Scaling (``fit_sts_prefixes``, the fit of
  ``dspark.training.calibrate``) on the windows and adopts the new temperatures; the windows
  keep their raw logits, so they are re-scored under the new temperatures.
"""

from __future__ import annotations

import logging
import math
import threading
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass

import numpy as np

from dspark.models.calibration import ece, fit_sts_prefixes, survival
from dspark.workers.stats import RoundRecord

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class MonitorConfig:
    window: int = 4096
    """Observations kept per position (sliding), >= 1."""
    threshold: float = 0.05
    """Online ECE above which the head counts as drifted, in (0, 1)."""
    min_samples: int = 8192
    """Observations (all positions together) needed before drift is judged, >= 1.
    NOTE: a perfectly calibrated head still shows a binned ECE of about
    ``1 / sqrt(observations per position)`` (0.09 at 125, 0.03 at 1000), so a small
    ``min_samples`` makes the threshold fire on noise."""
    check_every: int = 1024
    """Observed rounds between drift checks in ``observe``, >= 1. NOTE: a check scores
    every window (about 12 ms at K = 7 with full 4096-deep windows), so it runs on a
    fraction of rounds; ``observe`` alone is a few microseconds."""
    num_bins: int = 20
    """ECE bins, >= 1; 20 is the offline default of ``calibration_report``."""
    refit: bool = False
    """On a transition into drift, refit the temperatures on the window (on the observing
    thread: about 150 ms at K = 7 with full windows, once per transition)."""
    min_position_samples: int = 500
    """A refit changes T_k only where position k's window holds at least this many
    observations (>= 1); elsewhere T_k is kept."""

    def __post_init__(self) -> None:
        for name in ("window", "min_samples", "check_every", "num_bins", "min_position_samples"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
        if not 0.0 < self.threshold < 1.0:
            raise ValueError(f"threshold must be in (0, 1), got {self.threshold!r}")
        if not isinstance(self.refit, bool):
            raise ValueError(f"refit must be a bool, got {self.refit!r}")


@dataclass(frozen=True)
class RefitEvent:
    """One adoption of refitted temperatures."""

    round_index: int
    """Observed rounds when the refit ran."""
    num_samples: int
    old_temperatures: tuple[float, ...]
    new_temperatures: tuple[float, ...]
    ece_before: float
    ece_after: float
    """Online ECE of the same window before and after (in-sample after)."""


@dataclass(frozen=True)
class CalibrationSnapshot:
    """The monitor's view of its windows at one moment (JSON via ``to_dict``)."""

    num_rounds: int
    """Rounds observed with confidence logits (rounds without are ignored)."""
    num_samples: tuple[int, ...]
    """Observations in each position's window, positions 1..K."""
    mean_predicted: tuple[float | None, ...]
    mean_observed: tuple[float | None, ...]
    """Per position: mean prefix-survival prediction and mean label (None when empty)."""
    ece_per_position: tuple[float | None, ...]
    mean_predicted_conditional: tuple[float | None, ...]
    mean_observed_conditional: tuple[float | None, ...]
    """Per position, over observations with ``accepted >= k - 1``: mean
    ``sigmoid(z_k / T_k)`` and the fraction with draft k accepted (diagnostic only)."""
    ece: float | None
    """Online ECE: count-weighted mean of ``ece_per_position`` (None without samples)."""
    overall_predicted: float | None
    overall_observed: float | None
    """Mean prediction and mean label over every observation in the windows."""
    drifted: bool
    """``ece > threshold`` with at least ``min_samples`` observations, as of this snapshot."""
    threshold: float
    temperatures: tuple[float, ...]
    num_refits: int
    refits: tuple[RefitEvent, ...]

    @property
    def total_samples(self) -> int:
        return sum(self.num_samples)

    def to_dict(self) -> dict:
        out = asdict(self)
        out["total_samples"] = self.total_samples
        for key, value in out.items():
            if isinstance(value, tuple):
                out[key] = list(value)
        out["refits"] = [
            {k: list(v) if isinstance(v, tuple) else v for k, v in event.items()}
            for event in out["refits"]
        ]
        return out


@dataclass(frozen=True)
class _PositionScore:
    """Position k's window scored under one set of temperatures."""

    count: int
    ece: float | None
    mean_pred: float | None
    mean_label: float | None
    cond_pred: float | None
    cond_label: float | None


def _mean(x: np.ndarray) -> float | None:
    return float(x.mean()) if x.size else None


def _score_position(prefix: np.ndarray, acc: np.ndarray, temps: Sequence[float],
                    num_bins: int) -> _PositionScore:
    """Score ``prefix`` ``[n, k]`` raw logits with ``acc`` ``[n]`` (accepted, clipped to k)."""
    n, k = prefix.shape
    if n == 0:
        return _PositionScore(0, None, None, None, None, None)
    pred = survival(prefix, temps[:k])[:, -1]  # [n]
    label = (acc >= k).astype(np.float64)  # [n]
    reached = acc >= k - 1  # [n] drafts 1..k-1 all accepted
    step = survival(prefix[reached, -1:], temps[k - 1 : k])[:, 0]  # [n_reached] sigmoid(z_k/T_k)
    return _PositionScore(n, ece(pred, label, num_bins), float(pred.mean()),
                          float(label.mean()), _mean(step), _mean(label[reached]))


def _weighted(values: list[float | None], counts: list[int]) -> float | None:
    total = sum(c for v, c in zip(values, counts) if v is not None)
    if not total:
        return None
    return float(sum(v * c for v, c in zip(values, counts) if v is not None) / total)


class _Window:
    """Position k's last ``size`` observations in a ring: raw prefix logits ``[size, k]``
    and accepted counts clipped to k ``[size]`` (order is irrelevant to every score)."""

    def __init__(self, size: int, k: int) -> None:
        self.logits = np.zeros((size, k), dtype=np.float64)
        self.accepted = np.zeros(size, dtype=np.int64)
        self.count = 0
        self.head = 0

    def append(self, logits: np.ndarray, accepted: int) -> None:
        self.logits[self.head] = logits
        self.accepted[self.head] = accepted
        self.head = (self.head + 1) % len(self.accepted)
        self.count = min(self.count + 1, len(self.accepted))

    def arrays(self, copy: bool = True) -> tuple[np.ndarray, np.ndarray]:
        """The filled rows: (prefix logits ``[n, k]``, accepted ``[n]``); views with
        ``copy=False``, for a reader that holds the monitor's lock."""
        logits, accepted = self.logits[: self.count], self.accepted[: self.count]
        return (logits.copy(), accepted.copy()) if copy else (logits, accepted)


def _scores(windows: list[tuple[np.ndarray, np.ndarray]], temps: Sequence[float],
            num_bins: int) -> list[_PositionScore]:
    """Every position's window (its ``_Window.arrays``) scored under ``temps``."""
    return [_score_position(prefix, acc, temps, num_bins) for prefix, acc in windows]


def _online_ece(scores: list[_PositionScore]) -> float | None:
    return _weighted([s.ece for s in scores], [s.count for s in scores])


class CalibrationMonitor:
    """Sliding-window calibration of the confidence head against verified rounds.

    ``observe`` (or ``on_round``, the engine's ``on_round`` signature) runs on the engine
    thread; ``snapshot`` and ``temperatures`` may be read from any thread. ``on_refit``, if
    given, is called with the new temperatures after a refit, on the observing thread and
    outside the monitor's lock.
    """

    def __init__(self, temperatures: Sequence[float], config: MonitorConfig | None = None,
                 on_refit: Callable[[tuple[float, ...]], None] | None = None) -> None:
        temps = tuple(float(t) for t in temperatures)
        if not temps or not all(math.isfinite(t) and t > 0 for t in temps):
            raise ValueError(
                f"temperatures must be a non-empty sequence of positive finite floats, got "
                f"{tuple(temperatures)!r}")
        if config is not None and not isinstance(config, MonitorConfig):
            raise ValueError(f"config must be a MonitorConfig, got {type(config).__name__}")
        if on_refit is not None and not callable(on_refit):
            raise ValueError("on_refit must be callable (it gets the new temperatures) or None")
        self.config = config or MonitorConfig()
        self.on_refit = on_refit
        self._temps = temps
        # NOTE: raw logits z_1..z_k and min(accepted, k), never scores, so a refit re-scores
        # the window without losing it
        self._windows = [_Window(self.config.window, k) for k in range(1, len(temps) + 1)]
        self._num_rounds = 0
        self._drifted = False
        self._refits: list[RefitEvent] = []
        self._lock = threading.Lock()

    @classmethod
    def for_drafter(cls, drafter_config, config: MonitorConfig | None = None,
                    on_refit: Callable[[tuple[float, ...]], None] | None = None
                    ) -> CalibrationMonitor:
        """A monitor of a DSpark drafter's head, starting from its STS temperatures (ones
        when it has none)."""
        if not drafter_config.confidence_head:
            raise ValueError(f"the {drafter_config.method} drafter has no confidence head")
        temps = drafter_config.sts_temperatures or (1.0,) * drafter_config.block_size
        return cls(temps, config, on_refit)

    @property
    def temperatures(self) -> tuple[float, ...]:
        with self._lock:
            return self._temps

    @property
    def refits(self) -> tuple[RefitEvent, ...]:
        """Every refit so far, oldest first."""
        with self._lock:
            return tuple(self._refits)

    def on_round(self, req_id: str, record: RoundRecord) -> None:
        """The engine's ``on_round`` callback."""
        self.observe(record)

    def observe(self, record: RoundRecord) -> None:
        """Add one verified round's positions to the windows; every ``check_every`` rounds,
        judge drift (warn on entering it; refit if enabled)."""
        if record.conf_logits is None:
            return
        logits = np.asarray(record.conf_logits, dtype=np.float64)
        self._check_record(record, logits)
        with self._lock:
            for k in range(1, record.proposed + 1):
                self._windows[k - 1].append(logits[:k], min(record.accepted, k))
            self._num_rounds += 1
            due = self._num_rounds % self.config.check_every == 0
            refit = self._judge_drift() if due else None
        if refit is not None and self.on_refit is not None:
            self.on_refit(refit)

    def check(self) -> None:
        """Judge drift now (as ``observe`` does every ``check_every`` rounds)."""
        with self._lock:
            refit = self._judge_drift()
        if refit is not None and self.on_refit is not None:
            self.on_refit(refit)

    def snapshot(self) -> CalibrationSnapshot:
        # NOTE: only the copy holds the lock; scoring runs outside it, so a status reader
        # never stalls the engine thread for more than a list copy
        with self._lock:
            windows = [w.arrays() for w in self._windows]
            temps, num_rounds, refits = self._temps, self._num_rounds, tuple(self._refits)
        scores = _scores(windows, temps, self.config.num_bins)
        counts = [s.count for s in scores]
        return CalibrationSnapshot(
            num_rounds=num_rounds,
            num_samples=tuple(counts),
            mean_predicted=tuple(s.mean_pred for s in scores),
            mean_observed=tuple(s.mean_label for s in scores),
            ece_per_position=tuple(s.ece for s in scores),
            mean_predicted_conditional=tuple(s.cond_pred for s in scores),
            mean_observed_conditional=tuple(s.cond_label for s in scores),
            ece=_online_ece(scores),
            overall_predicted=_weighted([s.mean_pred for s in scores], counts),
            overall_observed=_weighted([s.mean_label for s in scores], counts),
            drifted=self._is_drifted(scores),
            threshold=self.config.threshold,
            temperatures=temps,
            num_refits=len(refits),
            refits=refits,
        )

    # ------------------------------------------------------------------ internals
    def _check_record(self, record: RoundRecord, logits: np.ndarray) -> None:
        k_max = len(self._temps)
        if not 0 <= record.proposed <= k_max:
            raise ValueError(f"proposed must be in [0, {k_max}], got {record.proposed}")
        if not 0 <= record.accepted <= record.proposed:
            raise ValueError(
                f"accepted must be in [0, proposed={record.proposed}], got {record.accepted}")
        if len(logits) != record.proposed:
            raise ValueError(f"conf_logits must hold proposed={record.proposed} values, "
                             f"got {len(logits)}")
        if not np.isfinite(logits).all():
            raise ValueError("conf_logits must be finite")

    def _is_drifted(self, scores: list[_PositionScore]) -> bool:
        value = _online_ece(scores)
        enough = sum(s.count for s in scores) >= self.config.min_samples
        return value is not None and enough and value > self.config.threshold

    def _judge_drift(self) -> tuple[float, ...] | None:
        """Update the drift state (lock held); the new temperatures if a refit ran."""
        windows = [w.arrays(copy=False) for w in self._windows]
        scores = _scores(windows, self._temps, self.config.num_bins)
        drifted = self._is_drifted(scores)
        entering = drifted and not self._drifted
        self._drifted = drifted
        if not entering:
            return None
        value = _online_ece(scores)
        logger.warning(
            "confidence head drifted: online ECE %.4f > threshold %.4f over %d observations "
            "(per position: %s)%s", value, self.config.threshold,
            sum(s.count for s in scores),
            ", ".join("-" if s.ece is None else f"{s.ece:.3f}" for s in scores),
            "; refitting temperatures" if self.config.refit else "")
        if not self.config.refit:
            return None
        return self._refit(value, windows)

    def _refit(self, ece_before: float, windows: list[tuple[np.ndarray, np.ndarray]]
               ) -> tuple[float, ...]:
        """Fit STS on the windows, adopt it, record the event (lock held)."""
        old = self._temps
        positions = []
        for k, (prefix, acc) in enumerate(windows, start=1):
            if len(acc) < self.config.min_position_samples:  # too few: keep T_k
                prefix, acc = prefix[:0], acc[:0]
            positions.append((prefix, (acc >= k).astype(np.float64)))
        new = tuple(fit_sts_prefixes(positions, num_bins=self.config.num_bins, initial=old))
        scores = _scores(windows, new, self.config.num_bins)
        self._temps = new
        self._drifted = self._is_drifted(scores)
        self._refits.append(RefitEvent(
            self._num_rounds, sum(s.count for s in scores), old, new, ece_before,
            _online_ece(scores)))
        logger.warning("refitted confidence temperatures %s -> %s (online ECE %.4f -> %.4f)",
                       _fmt(old), _fmt(new), ece_before, self._refits[-1].ece_after)
        return new


def _fmt(temps: Sequence[float]) -> str:
    return "[" + ", ".join(f"{t:.3g}" for t in temps) + "]"
