"""A setting given as data -> the trainer's flags, spelled by the trainer's own parser: the one place
that knows how a sweep key, an experiment config's key, a checkpoint's saved argument or the
Megatron-DeepSpeed integration's converted model becomes command-line flags.

* A key names a flag without its dashes (``lr``, ``num-experts``, ``--num_experts``; aliases too),
  or, where no flag has that name, an argument's destination (a checkpoint's saved ``args``).
* An on/off flag takes true or false (a bool, or a word ``argtypes.boolean`` reads). true gives the
  flag as the key names it. false gives the flag that says the opposite (``--no-swiglu``;
  ``--tie-embeddings-and-output-weights`` for ``untie_embeddings_and_output_weights``;
  ``--add-bias-linear`` for ``disable_bias_linear``), or nothing where the flag left out already
  means false: its default, and every model style's default where the style fills it in. Any other
  false would silently run the opposite of what was asked, so it is an error.
* A value keeps its spelling: text goes through as typed (``3.3333333e-4``), a float as its
  shortest exact text (``repr``: never rounded), a list as one token per item, text for a
  multi-value flag split like a shell line. A value the parser would refuse (its type, its choices,
  its number of values) is an error naming the key.
"""
from __future__ import annotations

import argparse
import shlex
from typing import Any, Dict, List, Optional

from megatron_ext.argtypes import boolean
from megatron_ext.arguments import MODEL_STYLES


class FlagValueError(ValueError):
    """A setting the trainer's parser would refuse, or cannot say; the message is one line naming it."""


def value_text(value) -> str:
    """A typed value (YAML's, a saved argument's) as a command line carries it."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return repr(value)  # the shortest text that reads back as the same number
    if isinstance(value, (int, str)):
        return str(value)
    raise TypeError(f"expected a number, a string or a boolean, got {value!r}")


def _meaning(action: argparse.Action, option: str):
    """The value ``option`` (a flag without a value) gives its destination."""
    if isinstance(action, argparse.BooleanOptionalAction):
        return not option.startswith("--no-")
    return action.const


def _long(action: argparse.Action) -> str:
    return next((o for o in action.option_strings if o.startswith("--")), action.option_strings[0])


class FlagSpelling:
    """The flags of ``parser`` (the trainer's), indexed to spell settings with ``flags``."""

    def __init__(self, parser: argparse.ArgumentParser):
        self.parser = parser
        self.options = parser._option_string_actions
        self.by_dest: Dict[str, List[argparse.Action]] = {}
        for action in parser._actions:
            if action.option_strings and action.dest != argparse.SUPPRESS:
                self.by_dest.setdefault(action.dest, []).append(action)

    def option(self, key: str) -> Optional[str]:
        """``--x-y`` for the key ``x_y`` (``x-y``, ``--x_y``) when the parser has that flag, else None."""
        option = "--" + key.strip().lstrip("-").replace("_", "-")
        return option if option in self.options else None

    def flags(self, key: str, value: Any, name: Optional[str] = None) -> List[str]:
        """The flags that set ``key`` to ``value``. FlagValueError, one line naming ``name`` (default:
        the key), for a value the parser would refuse or a false no flag can say."""
        name = name or key
        if value is None:
            raise FlagValueError(f"{name}: no value")
        option = self.option(key)
        if option is not None:
            action = self.options[option]
            if action.nargs == 0:
                return self._on_off(action, option, self._bool(value, option, name), name)
            return self._valued(action, option, value, name)
        dest = key.strip().lstrip("-")
        if dest not in self.by_dest:
            raise FlagValueError(f"{name}: not a training flag")
        switches = [a for a in self.by_dest[dest] if a.nargs == 0]
        if isinstance(value, bool) and switches:
            return self._saying(dest, value, name, _long(switches[0]))
        valued = [a for a in self.by_dest[dest] if a.nargs != 0]
        if valued:
            return self._valued(valued[0], _long(valued[0]), value, name)
        return self._saying(dest, value, name, _long(switches[0]))

    # -- on/off flags ---------------------------------------------------------------------------
    @staticmethod
    def _bool(value, option: str, name: str) -> bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str):
            try:
                return boolean(value)
            except argparse.ArgumentTypeError:
                pass
        raise FlagValueError(f"{name}: {option} is an on/off flag; use true or false, got {value!r}")

    def _on_off(self, action: argparse.Action, option: str, on: bool, name: str) -> List[str]:
        meaning = _meaning(action, option)
        if on:
            return [option]
        if isinstance(meaning, bool):
            return self._saying(action.dest, not meaning, name, option)
        if all(v != meaning for v in self._left_out(action.dest)):
            return []  # left out, the destination is never what the flag sets
        instead = f"; set {action.dest} instead" if self.option(action.dest) else ""
        raise FlagValueError(f"{name}: false cannot be said with {option}: it sets {action.dest} to {meaning!r}, "
                             f"which a model style also gives without it{instead}")

    def _saying(self, dest: str, wanted, name: str, option: str) -> List[str]:
        """The flag that sets ``dest`` to ``wanted``, or nothing where leaving the flags out gives it."""
        for action in self.by_dest[dest]:
            if action.nargs == 0:
                for o in action.option_strings:
                    said = _meaning(action, o)
                    if type(said) is type(wanted) and said == wanted:
                        return [o]
        left_out = self._left_out(dest)
        if all(type(v) is type(wanted) and v == wanted for v in left_out):
            return []
        word = value_text(wanted) if isinstance(wanted, bool) else repr(wanted)
        raise FlagValueError(f"{name}: {word} cannot be said with {option}: no flag sets {dest} to {word}, and "
                             f"without one it can be {' or '.join(sorted({repr(v) for v in left_out}))}")

    def _left_out(self, dest: str) -> list:
        """What ``dest`` can be when no flag sets it: the parser's default, or where that is None
        (filled in by the run plan) every model style's default for it."""
        default = self.parser.get_default(dest)
        if default is not None:
            return [default]
        return [style[dest] for style in MODEL_STYLES.values() if dest in style] or [None]

    # -- flags with values ------------------------------------------------------------------------
    def _valued(self, action: argparse.Action, option: str, value, name: str) -> List[str]:
        several = action.nargs in ("+", "*", argparse.REMAINDER) or (isinstance(action.nargs, int) and action.nargs > 1)
        if isinstance(value, dict):
            raise FlagValueError(f"{name}: expected a value, got a mapping")
        if isinstance(value, (list, tuple)):
            if not several:
                raise FlagValueError(f"{name}: {option} takes one value, got a list")
            texts = [self._text(v, name) for v in value]
        elif several and isinstance(value, str):
            try:
                texts = shlex.split(value)
            except ValueError as e:
                raise FlagValueError(f"{name}: {e}") from None
        else:
            texts = [self._text(value, name)]
        problem = self._refusal(action, texts)
        if problem:
            raise FlagValueError(f"{name} ({option}): {problem}")
        return [option, *texts]

    @staticmethod
    def _text(value, name: str) -> str:
        try:
            return value_text(value)
        except TypeError as e:
            raise FlagValueError(f"{name}: {e}") from None

    def _refusal(self, action: argparse.Action, texts: List[str]) -> Optional[str]:
        """What the parser would say about ``texts`` as the values of ``action`` (None: nothing)."""
        nargs = action.nargs
        if (nargs == "+" and not texts) or (isinstance(nargs, int) and len(texts) != nargs):
            return f"expected {'at least one value' if nargs == '+' else f'{nargs} values'}, got {len(texts)}"
        convert = self.parser._registry_get("type", action.type, action.type)
        for text in texts:
            try:
                parsed = convert(text) if callable(convert) else text
            except argparse.ArgumentTypeError as e:
                return str(e)
            except (TypeError, ValueError):
                return f"invalid {getattr(convert, '__name__', repr(convert))} value: {text!r}"
            if action.choices is not None and parsed not in action.choices:
                return f"invalid choice: {parsed!r} (choose from {', '.join(map(repr, action.choices))})"
        return None
