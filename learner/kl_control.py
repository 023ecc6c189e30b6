"""The KL coefficient: fixed, or adapted towards a target KL.

The adaptive controller is Ziegler et al., "Fine-Tuning Language Models from
Human Preferences" (2019), section 2.2: after each step with measured KL,
    error = clip(KL / target - 1, -0.2, 0.2)
    coef <- coef * (1 + error * n / horizon)
where n is the number of samples in the step. A KL above the target raises the
coefficient, one below lowers it, by at most 0.2 * n / horizon per step.
Standard library only.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class KLController:
    """The current KL coefficient; `update` adapts it when a target is set."""

    coef: float
    target: float | None = None  # nats per sequence; None keeps coef fixed
    horizon: int = 10_000  # samples over which a full 20% correction accrues

    def update(self, kl: float, n_samples: int) -> float:
        """Adapt to the KL measured on a step of `n_samples`; returns the new coefficient."""
        if self.target is not None:
            error = min(max(kl / self.target - 1.0, -0.2), 0.2)
            self.coef *= 1.0 + error * n_samples / self.horizon
        return self.coef
