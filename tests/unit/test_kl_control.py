"""The adaptive KL coefficient, worked by hand."""

from __future__ import annotations

import pytest

from learner.kl_control import KLController


def test_fixed_coefficient_never_moves():
    ctl = KLController(coef=0.05)
    assert ctl.update(kl=100.0, n_samples=256) == 0.05


def test_adaptive_coefficient_by_hand():
    # KL 12 against target 6: error = 12 / 6 - 1 = 1, clipped to 0.2;
    # coef = 0.1 * (1 + 0.2 * 256 / 10000) = 0.1 * 1.00512 = 0.100512.
    ctl = KLController(coef=0.1, target=6.0, horizon=10_000)
    assert ctl.update(kl=12.0, n_samples=256) == pytest.approx(0.100512)
    # KL 5.7: error = 5.7 / 6 - 1 = -0.05; coef = 0.100512 * (1 - 0.05 * 0.0256) = 0.10038334.
    assert ctl.update(kl=5.7, n_samples=256) == pytest.approx(0.100512 * (1 - 0.05 * 0.0256))


def test_adaptive_coefficient_settles_the_kl_near_the_target():
    # A toy system whose KL is inversely proportional to the coefficient: KL = 0.6 / coef.
    # Its fixed point is coef = 0.1, where KL = 6 = the target.
    ctl = KLController(coef=0.02, target=6.0, horizon=1_000)
    for _ in range(400):
        ctl.update(kl=0.6 / ctl.coef, n_samples=64)
    assert ctl.coef == pytest.approx(0.1, rel=0.02)
