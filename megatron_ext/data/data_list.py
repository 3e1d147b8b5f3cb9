"""Data-source lists: Megatron-DeepSpeed's ``DATA_FILE_LIST`` files and ``--data-path`` tokens.

A list file has one source per line, ``weight path-prefix [corpus]``; ``#`` starts a comment (whole
line or trailing, so a prefix cannot contain ``#``) and blank lines are ignored. ``corpus`` defaults
to the prefix's basename. Prefixes are kept as written: Megatron-DeepSpeed lists use absolute
paths, and a relative prefix is resolved against the current directory when the data is opened
(not against the list file's directory).

Every problem in a list is collected and reported at once, each as ``FILE:LINE: problem``.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from typing import List, Optional, Sequence, Tuple


@dataclass
class DataSource:
    weight: float
    prefix: str
    corpus: str
    origin: str = field(default="", compare=False, repr=False)  # "FILE:LINE" it was read from, if any


class DataListError(ValueError):
    """A data list or ``--data-path`` that cannot be used; the message names every problem."""


def _parse_weight(token: str) -> Tuple[Optional[float], Optional[str]]:
    """(weight, None) or (None, problem)."""
    try:
        w = float(token)
    except ValueError:
        return None, f"weight {token!r} is not a number"
    if not math.isfinite(w) or w <= 0:
        return None, f"weight {token!r} must be a finite number > 0"
    return w, None


def _is_number(token: str) -> bool:
    try:
        float(token)
        return True
    except ValueError:
        return False


def _raise_problems(what: str, problems: List[str]) -> None:
    if problems:
        n = len(problems)
        raise DataListError(f"{n} problem{'s' if n > 1 else ''} in {what}: " + "; ".join(problems))


def _read_lines(path: str) -> List[str]:
    try:
        with open(path, encoding="utf-8") as f:
            return f.read().splitlines()
    except FileNotFoundError:
        raise DataListError(f"data file list not found: {path}") from None
    except (OSError, UnicodeDecodeError) as e:
        raise DataListError(f"cannot read data file list {path}: {e}") from None


def _parse_lines(path: str, lines: Sequence[str]) -> Tuple[List[DataSource], List[str]]:
    sources, problems = [], []
    for lineno, line in enumerate(lines, 1):
        fields = line.split("#", 1)[0].split()
        if not fields:
            continue
        where = f"{path}:{lineno}"
        if len(fields) not in (2, 3):
            problems.append(f"{where}: expected 'weight path-prefix [corpus]', "
                            f"got {len(fields)} field{'s' if len(fields) > 1 else ''}")
            continue
        weight, problem = _parse_weight(fields[0])
        if problem:
            problems.append(f"{where}: {problem}")
            continue
        prefix = fields[1]
        corpus = fields[2] if len(fields) == 3 else os.path.basename(prefix)
        sources.append(DataSource(weight, prefix, corpus, origin=where))
    if not sources and not problems:
        problems.append(f"{path}: no data sources (every line is blank or a comment)")
    return sources, problems


def read_data_file_list(path: str) -> Tuple[List[DataSource], List[str]]:
    """(sources, problems) of one list file, without raising: for callers that report the
    problems of several lists at once (an unreadable file is one problem)."""
    try:
        return _parse_lines(path, _read_lines(path))
    except DataListError as e:
        return [], [str(e)]


def parse_data_file_list(path: str) -> List[DataSource]:
    """Parse a ``weight path-prefix [corpus]`` list file into sources (weights as written)."""
    sources, problems = _parse_lines(path, _read_lines(path))
    _raise_problems(f"data file list {path}", problems)
    return sources


def parse_data_path(tokens: Sequence[str]) -> List[DataSource]:
    """Parse Megatron ``--data-path`` tokens: one prefix, or ``W1 P1 W2 P2 ...`` pairs."""
    tokens = list(tokens)
    if not tokens:
        raise DataListError("--data-path: no data prefix given")
    if len(tokens) == 1:
        if _is_number(tokens[0]):
            raise DataListError(f"--data-path: {tokens[0]!r} looks like a weight with no "
                                "path prefix after it")
        return [DataSource(1.0, tokens[0], os.path.basename(tokens[0]))]
    if len(tokens) % 2:
        raise DataListError(
            f"--data-path: expected a single prefix or 'weight prefix' pairs, got {len(tokens)} "
            f"values: {' '.join(tokens)}")
    sources, problems = [], []
    for i in range(0, len(tokens), 2):
        pair = f"pair {i // 2 + 1} ({tokens[i]} {tokens[i + 1]})"
        weight, problem = _parse_weight(tokens[i])
        if problem:
            problems.append(f"{pair}: {problem}")
        elif _is_number(tokens[i + 1]):
            problems.append(f"{pair}: expected a path prefix after the weight, got a number")
        else:
            sources.append(DataSource(weight, tokens[i + 1], os.path.basename(tokens[i + 1])))
    _raise_problems("--data-path", problems)
    return sources


def missing_files(sources: Sequence[DataSource]) -> List[str]:
    """Every missing ``.bin``/``.idx`` file, as ``FILE:LINE: path`` when the source came from a list."""
    return [f"{s.origin}: {s.prefix}{ext}" if s.origin else f"{s.prefix}{ext}"
            for s in sources for ext in (".bin", ".idx") if not os.path.isfile(s.prefix + ext)]


def check_sources_exist(sources: Sequence[DataSource]) -> None:
    """Raise a DataListError naming every missing ``.bin``/``.idx`` file."""
    missing = missing_files(sources)
    if missing:
        n = len(missing)
        raise DataListError(f"{n} data file{'s' if n > 1 else ''} missing: " + "; ".join(missing))


def blend_of(sources: Sequence[DataSource]) -> Tuple[List[str], List[float]]:
    """(prefixes, weights normalised to sum 1), the form megatron-core's ``blend`` takes."""
    if not sources:
        raise DataListError("no data sources to blend")
    total = math.fsum(s.weight for s in sources)
    return [s.prefix for s in sources], [s.weight / total for s in sources]
