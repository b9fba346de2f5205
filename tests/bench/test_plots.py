"""Every plot in ``dspark.bench.plots`` writes a non-empty PNG file."""

import numpy as np
import pytest

from dspark.bench.plots import (
    plot_bars,
    plot_conditional_acceptance,
    plot_reliability,
    plot_threshold_sweep,
)
from dspark.models.calibration import calibration_report, fit_sts

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _assert_png(path):
    data = path.read_bytes()
    assert len(data) > len(PNG_MAGIC) and data.startswith(PNG_MAGIC)


def _reports():
    rng = np.random.default_rng(0)
    n, temps = 3_000, np.array([0.5, 2.0, 1.0, 1.5])
    z = rng.normal(1.0, 2.0, size=(n, temps.size))  # [N, K]
    ok = rng.random(z.shape) < 1.0 / (1.0 + np.exp(-z / temps))  # [N, K]
    accepted = np.cumprod(ok, axis=1).sum(axis=1)  # [N]
    proposed = np.full(n, temps.size)
    fitted = fit_sts(z, proposed, accepted)
    return {
        "raw": calibration_report(z, proposed, accepted),
        "STS": calibration_report(z, proposed, accepted, temperatures=fitted),
    }


def test_plot_reliability_writes_a_png_and_creates_parent_dirs(tmp_path):
    out = plot_reliability(_reports(), tmp_path / "nested" / "dir" / "reliability.png")
    assert out == tmp_path / "nested" / "dir" / "reliability.png"
    _assert_png(out)


def test_plot_conditional_acceptance_skips_missing_points(tmp_path):
    curves = {"dspark": [0.9, 0.8, None, 0.6], "eagle": [0.85, None, 0.7, 0.65]}
    _assert_png(plot_conditional_acceptance(curves, tmp_path / "cond.png", title="math"))


def test_plot_threshold_sweep_writes_a_png(tmp_path):
    curves = {"dspark": [(7.0, 4.1), (4.5, 3.6), (2.0, 2.0)], "fixed K": [(7.0, 3.9)]}
    _assert_png(plot_threshold_sweep(curves, tmp_path / "sweep.png"))


def test_plot_bars_writes_a_png_with_a_missing_cell(tmp_path):
    table = {"dspark": {"math": 4.1, "code": 3.7}, "eagle": {"math": 3.5}}
    _assert_png(plot_bars(table, tmp_path / "bars.png", title="accepted length τ"))


@pytest.mark.parametrize(
    "call",
    [
        lambda p: plot_reliability({}, p),
        lambda p: plot_conditional_acceptance({}, p),
        lambda p: plot_threshold_sweep({}, p),
        lambda p: plot_bars({}, p, title="x"),
    ],
)
def test_empty_inputs_raise_value_errors(tmp_path, call):
    with pytest.raises(ValueError, match="must be a non-empty dict"):
        call(tmp_path / "x.png")
    assert not (tmp_path / "x.png").exists()
