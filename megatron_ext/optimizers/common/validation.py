"""Checks optimizer plug-ins share in their ``validate_args`` (one-line messages naming the flag).
Flags are given as their spelling; the value is read from ``args`` by the matching dest."""


def _value(args, flag: str):
    return getattr(args, flag.lstrip("-").replace("-", "_"))


def check_betas(args, *flags: str) -> None:
    """Momentum/decay coefficients must lie in [0, 1)."""
    for flag in flags:
        value = _value(args, flag)
        if not 0.0 <= value < 1.0:
            raise ValueError(f"{flag} must be in [0, 1), got {value}")


def check_positive(args, *flags: str) -> None:
    for flag in flags:
        value = _value(args, flag)
        if not value > 0:
            raise ValueError(f"{flag} must be > 0, got {value}")
