"""Compression levels and the accuracy budgets they stand for (no torch: catalogs read these).

A level is the fraction of singular-value energy a compressed front keeps, in (0, 1] (1.0 =
uncompressed); a level < 1 stands for an accuracy budget of (1 - level) x 100 points (0.99 -> 1.0
point), the budget under which its per-layer ranks were chosen (pipelines/compress.py).
"""

from __future__ import annotations

from splitsense.errors import ConfigError

__all__ = ["budget_level", "check_energy", "level_budget_points"]


def check_energy(energy: float) -> float:
    if isinstance(energy, bool) or not isinstance(energy, (int, float)) or not 0 < energy <= 1:
        raise ConfigError(f"energy kept must be in (0, 1] (1.0 = uncompressed), got {energy!r}")
    return float(energy)


def level_budget_points(level: float) -> float:
    """The accuracy budget (points) a level < 1 stands for: (1 - level) x 100 (0.99 -> 1.0)."""
    level = check_energy(level)
    return round((1.0 - level) * 100.0, 6)


def budget_level(budget_points: float) -> float:
    """The level key of an accuracy budget in points: 1 - budget / 100 (1.0 -> 0.99)."""
    if isinstance(budget_points, bool) or not isinstance(budget_points, (int, float)):
        raise ConfigError(f"budget_points must be a number of accuracy points, got {budget_points!r}")
    if not 0 <= budget_points < 100:
        raise ConfigError(f"budget_points must be in [0, 100), got {budget_points!r}")
    return round(1.0 - float(budget_points) / 100.0, 9)
