"""Convergence of a search: when more generations of the same optimizer stop paying.

:class:`ConvergenceMonitor` watches the best fitness the optimizer was told, generation by
generation, and the optimizer's own test (``converged()``, CMA-ES: its stop tests and a collapsed
step size). It depends only on told values, so a replayed run converges at the same generation.
What happens then is ``optimizer.on_converge``: ``restart`` (CMA-ES: IPOP — a new random point,
twice the population; other optimizers cannot restart and stop), ``stop`` or ``continue``.
"""

from __future__ import annotations

import math


class ConvergenceMonitor:
    """``update(best_of_generation, optimizer)`` returns why the search has converged, or None.

    Converged: the optimizer says so, or the best since the last (re)start has not improved by
    more than ``tol`` for ``patience`` generations."""

    def __init__(self, patience: int, tol: float = 1e-3):
        self.patience, self.tol = int(patience), float(tol)
        self.reset()

    def reset(self) -> None:
        self.best, self.flat = -math.inf, 0

    def update(self, generation_best: float, optimizer) -> str | None:
        if generation_best > self.best + self.tol:
            self.best, self.flat = float(generation_best), 0
        else:
            self.flat += 1
        own = getattr(optimizer, "converged", None)
        reason = own() if own is not None else None
        if reason:
            return reason
        if self.flat >= self.patience:
            return f"no better best (by more than {self.tol:g}) for {self.patience} generations"
        return None
