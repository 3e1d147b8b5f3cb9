"""Value types for command-line flags (``type=`` in argparse), shared by the core parser and
plug-ins: each rejects a bad value with a message argparse turns into one line naming the flag.
Also the small rules every parser of the project follows: one-line errors, ``--a_b`` = ``--a-b``,
the did-you-mean hint, the words for true and false."""
import argparse
import difflib
import math
from typing import List, Optional, Sequence

TRUE_WORDS, FALSE_WORDS = ("true", "1", "yes", "on"), ("false", "0", "no", "off")


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


def boolean(value: str) -> bool:
    """true/false (also 1/0, yes/no, on/off, any case)."""
    word = str(value).strip().lower()
    if word in TRUE_WORDS:
        return True
    if word in FALSE_WORDS:
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {value!r}")


# -- parsers ----------------------------------------------------------------------------------
def one_line_errors(parser: argparse.ArgumentParser, prog: Optional[str] = None) -> argparse.ArgumentParser:
    """``parser`` reports a bad command line as one line, ``PROG: error: MESSAGE``, and exits with 2
    (argparse's default prints the whole usage first)."""
    parser.error = lambda message: parser.exit(2, f"{prog or parser.prog}: error: {message}\n")
    return parser


# -- names of flags ---------------------------------------------------------------------------
def normalise_argv(argv: Sequence[str]) -> List[str]:
    """``--lr_decay_style=x`` -> ``--lr-decay-style=x`` (Megatron scripts mix both spellings); values
    are left alone, and so is everything after ``--``, which argparse reads as values, never flags."""
    out = []
    for i, tok in enumerate(argv):
        if tok == "--":
            return out + list(argv[i:])
        if tok.startswith("--"):
            name, eq, value = tok.partition("=")
            tok = name.replace("_", "-") + eq + value
        out.append(tok)
    return out


def close_hint(word: str, known, cutoff: float = 0.6, most: int = 1, quote: bool = True) -> str:
    """' (did you mean 'X'?)' for the closest of ``known`` (``most`` of them at most; ``quote=False``
    for flags, which read unquoted), or ''."""
    close = difflib.get_close_matches(word, list(known), n=most, cutoff=cutoff)
    if not close:
        return ""
    return f" (did you mean {', '.join(repr(c) if quote else c for c in close)}?)"
