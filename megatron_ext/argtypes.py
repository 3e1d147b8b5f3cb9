"""Value types for command-line flags (``type=`` in argparse), shared by the core parser and
plug-ins: each rejects a bad value with a message argparse turns into one line naming the flag."""
import argparse
import difflib
import math


def positive_int(value: str) -> int:
    try:
        v = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid positive integer: {value!r}") from None
    if v <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {value!r}")
    return v


def nonneg_int(value: str) -> int:
    try:
        v = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid non-negative integer: {value!r}") from None
    if v < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {value!r}")
    return v


def finite_float(value: str) -> float:
    try:
        v = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid number: {value!r}") from None
    if not math.isfinite(v):
        raise argparse.ArgumentTypeError(f"must be finite, got {value!r}")
    return v


def nonneg_float(value: str) -> float:
    v = finite_float(value)
    if v < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {value!r}")
    return v


def positive_float(value: str) -> float:
    v = finite_float(value)
    if v <= 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {value!r}")
    return v


def fraction(value: str) -> float:
    v = finite_float(value)
    if not 0.0 <= v <= 1.0:
        raise argparse.ArgumentTypeError(f"must be in [0, 1], got {value!r}")
    return v


def choice_ci(*choices: str):
    """Case-insensitive choice returning the canonical spelling."""
    lookup = {c.lower(): c for c in choices}

    def parse(value: str) -> str:
        try:
            return lookup[value.lower()]
        except KeyError:
            raise argparse.ArgumentTypeError(f"invalid choice {value!r} (choose from {', '.join(choices)})") from None

    return parse


# -- names of flags ---------------------------------------------------------------------------
def close_hint(word: str, known) -> str:
    """' (did you mean X?)' for the closest of ``known``, or ''."""
    close = difflib.get_close_matches(word, list(known), n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""


def negated_option(option: str) -> str:
    """The other spelling of an ``argparse.BooleanOptionalAction`` flag (--x <-> --no-x)."""
    name = option[2:]
    return "--" + name[3:] if name.startswith("no-") else "--no-" + name
