"""Mix data file lists into one: ``mix_datasets.py --inputs W1 LIST1 W2 LIST2 ... [--output FILE]``.

Each list's weights are normalised to sum 1, then scaled by ``W_i / sum(W)``, so list ``i`` gets a
share ``W_i / sum(W)`` of the samples and keeps its own internal proportions (the continual
pretraining "replay" recipe: ``--inputs 0.9 new.txt 0.1 old.txt``). Lines are read with the
trainer's own list parser (``megatron_ext.data.data_list``): ``weight path-prefix [corpus]``, ``#``
comments and blank lines ignored, corpus names kept (default: the prefix's basename). The result
is the same format, printed to stdout, or written to ``--output`` (atomically: a temporary file
renamed into place, so an existing file is replaced only by a complete list).

Every problem is reported at once before anything is written (exit code 2): unreadable lists,
malformed lines and bad weights as ``FILE:LINE: ...``, bad ``--inputs`` weights, and every
referenced ``.bin``/``.idx`` file that does not exist (``--no-check`` skips the existence check,
e.g. to prepare a list on a login node that does not mount the data).
"""
from __future__ import annotations

import argparse
import os
import sys
from fractions import Fraction
from typing import List, Optional, Sequence, Tuple

from megatron_ext.argtypes import one_line_errors
from megatron_ext.data.data_list import (DataListError, DataSource, _parse_weight, missing_files,
                                         read_data_file_list)
from megatron_ext.fileio import write_text_atomically

PROG = "mix_datasets.py"


def mix(inputs: Sequence[Tuple[str, str]], check: bool = True) -> List[DataSource]:
    """``[(weight, list path), ...]`` -> the mixed sources; raises one DataListError naming every
    problem of every list (weights given as strings, as typed)."""
    mixed, problems = _mix(inputs, check)
    if problems:
        raise DataListError(_summary(problems))
    return mixed


def _exact(weight: float) -> Fraction:
    """The decimal the weight was written as (``repr`` gives back "0.7" for 0.7), exactly."""
    return Fraction(repr(weight))


def _mix(inputs: Sequence[Tuple[str, str]], check: bool) -> Tuple[List[DataSource], List[str]]:
    problems: List[str] = []
    lists: List[Tuple[float, List[DataSource]]] = []
    for i, (weight_token, path) in enumerate(inputs, 1):
        weight, problem = _parse_weight(weight_token)
        if problem:
            problems.append(f"--inputs pair {i} ({weight_token} {path}): {problem}")
        sources, list_problems = read_data_file_list(path)
        problems += list_problems
        if check:
            problems += [f"missing {m}" for m in missing_files(sources)]
        if weight is not None and sources:
            lists.append((weight, sources))
    if problems:
        return [], problems
    # Exact arithmetic on the weights as written, rounded once at the end: 0.7 x 3/4 is 0.525,
    # not 0.5249999999999999.
    total = sum(_exact(w) for w, _ in lists)
    mixed = []
    for weight, sources in lists:
        inner = sum(_exact(s.weight) for s in sources)
        share = _exact(weight) / total
        mixed += [DataSource(float(share * _exact(s.weight) / inner), s.prefix, s.corpus, s.origin)
                  for s in sources]
    return mixed, []


def _summary(problems: List[str]) -> str:
    n = len(problems)
    return f"{n} problem{'s' if n > 1 else ''}: " + "; ".join(problems)


def format_list(sources: Sequence[DataSource]) -> str:
    """``weight prefix corpus`` lines; ``repr`` of the weight reads back as the same float."""
    return "".join(f"{s.weight!r} {s.prefix} {s.corpus}\n" for s in sources)


def _output_problems(output: Optional[str]) -> List[str]:
    if output is None:
        return []
    if os.path.isdir(output):
        return [f"--output {output}: is a directory"]
    folder = os.path.dirname(os.path.abspath(output))
    return [] if os.path.isdir(folder) else [f"--output {output}: directory {folder} does not exist"]


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--inputs", "--input", dest="inputs", nargs="+", action="extend", required=True,
                   metavar="W LIST", help="weight and data file list, repeated: W1 LIST1 W2 LIST2 ...")
    p.add_argument("--output", "-o", default=None, metavar="FILE",
                   help="write the mixed list here (atomically) instead of stdout")
    p.add_argument("--no-check", dest="check", action="store_false",
                   help="do not check that every .bin/.idx file exists")


def build_parser(prog: str = PROG) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, allow_abbrev=False, description=__doc__.split("\n\n", 1)[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    one_line_errors(p)
    add_arguments(p)
    return p


def run(ns: argparse.Namespace, prog: str = PROG) -> int:
    """Mix and print or write; one ``error:`` line naming every problem and 2 on bad input
    (nothing written)."""
    problems = _output_problems(ns.output)
    values = ns.inputs
    if len(values) % 2:
        problems.append(f"--inputs: expected pairs 'W1 LIST1 W2 LIST2 ...', got {len(values)} "
                        f"value{'s' if len(values) > 1 else ''}: " + " ".join(values))
        mixed = []
    else:
        mixed, mix_problems = _mix(list(zip(values[::2], values[1::2])), ns.check)
        problems += mix_problems
    if problems:
        print(f"{prog}: error: {_summary(problems)}", file=sys.stderr, flush=True)
        return 2
    text = format_list(mixed)
    if ns.output is None:
        sys.stdout.write(text)
        sys.stdout.flush()
    else:
        write_text_atomically(ns.output, text)
        print(f"wrote {ns.output}: {len(mixed)} sources from {len(values) // 2} lists", file=sys.stderr)
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    return run(build_parser().parse_args(argv))
