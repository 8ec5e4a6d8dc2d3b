"""One-line input errors that name the bad key or value and the allowed ones."""

from __future__ import annotations

from collections.abc import Iterable


class ConfigError(ValueError):
    """Bad user input (a config value, a name, a file). Its message is one line."""


def check_choice(key: str, value: object, allowed: Iterable[object]) -> None:
    """Raise ConfigError unless ``value`` is one of ``allowed``."""
    allowed = list(allowed)
    if value not in allowed:
        names = ", ".join(str(a) for a in allowed)
        raise ConfigError(f"{key}: unknown value {value!r}; allowed: {names}")


def check_range(
    key: str,
    value: float,
    low: float,
    high: float,
    *,
    low_open: bool = False,
    high_open: bool = False,
) -> None:
    """Raise ConfigError unless low <= value <= high (with optional open ends)."""
    ok_low = value > low if low_open else value >= low
    ok_high = value < high if high_open else value <= high
    if not (ok_low and ok_high):
        lo, hi = ("(" if low_open else "["), (")" if high_open else "]")
        raise ConfigError(f"{key}: {value!r} is outside the allowed range {lo}{low}, {high}{hi}")
