"""The variants of a sweep and the exact command of each.

A variant is a set of ``KEY=VALUE`` settings applied on top of one base launch. A key is a training
flag without its dashes (``lr`` -> ``--lr``; ``num_experts`` and ``num-experts`` -> ``--num-experts``).
With ``--launcher`` an UPPER_CASE key is a ``train_alcf.sh`` variable instead (``LR=1e-3``). Every
key is checked against the trainer's own parser (or against the variables the launcher reads) and
every variant's whole command is validated before the first one runs.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import hashlib
import io
import itertools
import json
import os
import re
import shlex
import sys
from typing import Dict, List, Optional, Sequence

from megatron_ext.argtypes import close_hint
from megatron_ext.flag_spelling import FlagSpelling, FlagValueError, value_text as typed_text
from megatron_ext.arguments import build_parser
from megatron_ext.arguments import normalise_argv
from megatron_ext.fileio import read_yaml_mapping
from megatron_ext.launcher.resolve import LaunchError, resolve
from megatron_ext.models.llama_moe_names import ALIASES
from megatron_ext.plan import plan_or_problem
from megatron_ext.planning import plan_record

PROG = "megatron-ext sweep"
ENV_KEY = re.compile(r"^[A-Z][A-Z0-9_]*$")
# Set per variant by the sweep (one value shared by the variants would mix their files).
OWNED_FLAGS = {
    "--metrics-file": "each variant writes DIR/<variant>/metrics.jsonl",
    "--save": "each variant saves in DIR/<variant>/checkpoints (--save-checkpoints)",
}
# Variables the launcher reads that describe the machine a job lands on, not the variant.
MACHINE_VARIABLES = ("HOSTFILE", "PBS_NODEFILE", "MASTER_PORT", "DRY_RUN")
MAX_NAME = 100
CONFIG_KEYS = ("out", "steps", "eval_interval", "nproc", "launcher", "save_checkpoints", "select",
               "spike_threshold", "target_loss", "retry", "base", "grid", "variants", "rules", "jobs")
JOB_KEYS = ("script", "submit", "walltime", "queue", "account", "options", "setup")


class SweepError(ValueError):
    """Bad sweep input; the message is one line."""


# --- keys and values -------------------------------------------------------------------------

def normalise_key(key: str) -> str:
    """``--num-experts`` / ``num-experts`` / ``num_experts`` -> ``num_experts``; ``LR`` stays."""
    key = key.strip().lstrip("-")
    return key if ENV_KEY.match(key) else key.replace("-", "_")


def value_text(value, key: str) -> str:
    """A config value (YAML gives numbers, booleans, lists) as the text a command line carries."""
    if value is None:
        raise SweepError(f"{key}: no value")
    if isinstance(value, (list, tuple)):  # a multi-value flag such as --data-path
        return " ".join(value_text(v, key) for v in value)
    try:
        return typed_text(value)
    except TypeError as e:
        raise SweepError(f"{key}: {e}") from None


def parse_grid(items: Sequence[str]) -> Dict[str, List[str]]:
    """``["lr=1e-4,3e-4", "seed=1,2"]`` -> ``{"lr": ["1e-4", "3e-4"], "seed": ["1", "2"]}``."""
    grid: Dict[str, List[str]] = {}
    for item in items:
        key, sep, values = item.partition("=")
        if not sep or not key.strip():
            raise SweepError(f"--grid {item!r}: expected KEY=V1,V2,... (e.g. lr=1e-4,3e-4)")
        key = normalise_key(key)
        vals = [v.strip() for v in values.split(",")]
        if any(v == "" for v in vals):
            raise SweepError(f"--grid {item!r}: empty value (values are comma-separated)")
        if key in grid:
            raise SweepError(f"--grid: key {key} given twice")
        grid[key] = list(dict.fromkeys(vals))
    return grid


def parse_variant_text(text: str, where: str) -> Dict[str, str]:
    """``"lr=1e-3 num_experts=4"`` -> ``{"lr": "1e-3", "num_experts": "4"}`` (shell quoting for
    values with spaces or commas: ``"data_path='1 a 1 b'"``; ``""`` is the base launch itself)."""
    try:
        tokens = shlex.split(text)
    except ValueError as e:
        raise SweepError(f"{where}: {e}") from None
    out: Dict[str, str] = {}
    for tok in tokens:
        key, sep, value = tok.partition("=")
        if not sep or not key or value == "":
            raise SweepError(f"{where}: {tok!r} is not KEY=VALUE")
        key = normalise_key(key)
        if key in out:
            raise SweepError(f"{where}: key {key} given twice")
        out[key] = value
    return out


def read_variants_file(path: str) -> List[Dict[str, str]]:
    """One variant per line (``lr=1e-3 num_experts=4``); ``#`` starts a comment."""
    try:
        with open(path) as f:
            lines = f.read().splitlines()
    except OSError as e:
        raise SweepError(f"--variants {path}: {e.strerror}") from None
    out = []
    for n, line in enumerate(lines, 1):
        line = line.split("#", 1)[0].strip()
        if line:
            out.append(parse_variant_text(line, f"{path}:{n}"))
    if not out:
        raise SweepError(f"--variants {path}: no variants in the file")
    return out


def expand(grid: Dict[str, List[str]], listed: List[Dict[str, str]]) -> List[Dict[str, str]]:
    """Every combination of the grid (first key slowest), then the listed variants; duplicates once."""
    out: List[Dict[str, str]] = []
    if grid:
        keys = list(grid)
        out += [dict(zip(keys, combo)) for combo in itertools.product(*(grid[k] for k in keys))]
    out += listed
    seen, unique = set(), []
    for values in out:
        ident = tuple(sorted(values.items()))
        if ident not in seen:
            seen.add(ident)
            unique.append(values)
    return unique


@dataclasses.dataclass
class Rule:
    """A variant-level setting: the variants whose values include every ``when`` pair also get the
    ``then`` settings (unless they set those keys themselves). E.g. top-1 softmax routing needs
    ``--moe-router-pre-softmax``, top-2 does not: ``moe_router_topk=1: moe_router_pre_softmax=true``."""

    when: Dict[str, str]
    then: Dict[str, str]
    text: str


def parse_rule(text: str, where: str) -> Rule:
    """``"moe_router_topk=1: moe_router_pre_softmax=true"`` (several pairs on each side allowed)."""
    cond, sep, settings = text.partition(":")
    if not sep:
        raise SweepError(f"{where}: {text!r} is not 'KEY=V ...: KEY=V ...' (the settings after the colon apply "
                         "to the variants that match the pairs before it)")
    when = parse_variant_text(cond, where)
    then = parse_variant_text(settings, where)
    if not when or not then:
        raise SweepError(f"{where}: {text!r} needs KEY=V pairs on both sides of the colon")
    return Rule(when, then, text.strip())


def apply_rules(variants: List[Dict[str, str]], rules: Sequence[Rule]) -> List[Dict[str, str]]:
    """The variants with each matching rule's settings added. A rule whose condition names a key no
    variant sets, or that matches no variant, is an error (a typo would otherwise do nothing)."""
    out = [dict(v) for v in variants]
    for rule in rules:
        for key in rule.when:
            if not any(key in v for v in variants):
                raise SweepError(f"rule {rule.text!r}: no variant sets {key}{close_hint(key, {k for v in variants for k in v})}")
        matched = 0
        for v, original in zip(out, variants):
            if all(original.get(k) == val for k, val in rule.when.items()):
                matched += 1
                for key, val in rule.then.items():
                    v.setdefault(key, val)
        if not matched:
            raise SweepError(f"rule {rule.text!r} matches no variant")
    return out


class TrainerKeys:
    """Sweep keys -> training flags, checked against the trainer's own parser."""

    def __init__(self, parser: argparse.ArgumentParser):
        self.parser = parser
        self.actions = parser._option_string_actions
        self.spelling = FlagSpelling(parser)

    def option(self, key: str) -> str:
        opt = "--" + key.replace("_", "-")
        if opt not in self.actions:
            known = {o[2:].replace("-", "_") for o in self.actions if o.startswith("--")}
            raise SweepError(f"key {key!r} is not a training flag{close_hint(key, known)}")
        owned = next((o for o in self.actions[opt].option_strings if o in OWNED_FLAGS), None)  # aliases too
        if owned:
            raise SweepError(f"key {key!r} cannot be swept: {OWNED_FLAGS[owned]}")
        return opt

    def flags(self, key: str, value: str) -> List[str]:
        try:
            return self.spelling.flags(self.option(key), value, name=key)
        except FlagValueError as e:
            raise SweepError(str(e)) from None


def check_base_flags(flags: List[str]) -> None:

    for tok in normalise_argv(flags):
        name = tok.split("=", 1)[0]
        name = ALIASES.get(name, (name,))[0]
        if name in OWNED_FLAGS:
            raise SweepError(f"{name} in the base flags: {OWNED_FLAGS[name]}")


def trainer_argv_problem(parser, argv: List[str], world_size: int) -> Optional[str]:
    """The trainer's own one-line error for ``argv`` at ``world_size`` (None when it would start),
    a variant whose memory plan (``megatron-ext plan --json``'s record) does not fit included."""

    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        plan, problem = plan_or_problem(parser, argv, world_size)
        return problem if plan is None else plan_record(plan)["refusal"]


class _ReadRecorder(dict):
    """An environment that remembers which variables were read (the launcher reads with .get)."""

    def __init__(self, *a, **kw):
        super().__init__(*a, **kw)
        self.read = set()

    def get(self, key, default=None):
        self.read.add(key)
        return super().get(key, default)


def launcher_repo() -> str:
    """Where ``train_alcf.sh`` runs the launcher: its root (MEGATRON_EXT_ROOT or the checkout this
    package lives in), else the current directory."""
    root = os.environ.get("MEGATRON_EXT_ROOT")
    if root:
        return os.path.abspath(root)
    here = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    return here if os.path.isfile(os.path.join(here, "train_alcf.sh")) else os.getcwd()


def resolve_launch(env: Dict[str, str], argv: List[str], repo: str):
    """``(Launch, names read)``: what ``train_alcf.sh`` with ``env`` and extra ``argv`` would run."""

    recorder = _ReadRecorder(env)
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        try:
            launch = resolve(recorder, argv, repo)
        except LaunchError as e:
            raise SweepError(str(e)) from None
    return launch, recorder.read


# --- the variants' commands --------------------------------------------------------------------

@dataclasses.dataclass
class Settings:
    """One sweep: the base launch and how every variant runs."""

    out: str
    base_flags: List[str]
    base_env: Dict[str, str]
    steps: Optional[int] = None
    eval_interval: Optional[int] = None
    nproc: int = 1
    launcher: bool = False
    save_checkpoints: bool = False
    rule_keys: List[str] = dataclasses.field(default_factory=list)  # keys that variant rules set


def variant_name(values: Dict[str, str]) -> str:
    """``lr=1e-3,seed=1``: the settings themselves, made safe as a directory name (a short hash
    keeps names that had to be changed or cut unique)."""
    if not values:
        return "base"
    text = ",".join(f"{k}={v}" for k, v in values.items())
    safe = re.sub(r"[^A-Za-z0-9._=,+-]", "_", text).lstrip(".")
    if safe != text or len(safe) > MAX_NAME:
        digest = hashlib.sha256(text.encode()).hexdigest()[:8]
        safe = f"{safe[:MAX_NAME - 9]}~{digest}"
    return safe


def definition_key(definition: dict) -> str:
    """The variant's identity on disk: a changed command, environment or process count is a new
    variant (an old result is never taken for it)."""
    text = json.dumps(definition, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def _split_values(values: Dict[str, str], launcher: bool, keys: TrainerKeys):
    flags, env = [], {}
    for key, value in values.items():
        if ENV_KEY.match(key):
            if not launcher:
                lower = key.lower()
                hint = f" (or the flag {lower})" if "--" + lower.replace("_", "-") in keys.actions else ""
                raise SweepError(f"key {key!r} is a train_alcf.sh variable: sweeping it needs --launcher{hint}")
            env[key] = value
        else:
            flags += keys.flags(key, value)
    return flags, env


def build_specs(settings: Settings, variants: List[Dict[str, str]]) -> List[dict]:
    """Each variant's spec (name, key, values, command, environment, working directory), every
    key and every whole command checked first; raises SweepError (one line) on the first problem."""

    parser = build_parser()
    keys = TrainerKeys(parser)
    check_base_flags(settings.base_flags)
    out = os.path.abspath(settings.out)
    sweep_flags = []
    if settings.steps is not None:
        sweep_flags += ["--train-iters", str(settings.steps)]
    if settings.eval_interval is not None:
        sweep_flags += ["--eval-interval", str(settings.eval_interval)]
    repo = launcher_repo()
    for key in dict.fromkeys(k for values in variants for k in values):  # every key before any variant
        if not ENV_KEY.match(key):
            keys.option(key)
        elif not settings.launcher:
            _split_values({key: ""}, False, keys)
    specs, names = [], {}
    for values in variants:
        name = variant_name(values)
        if name in names:  # different settings that print alike ('a=1,b=2' vs a='1,b=2'): keep both
            name = f"{name}~{hashlib.sha256(json.dumps(values).encode()).hexdigest()[:6]}"
        names[name] = True
        label = f"variant {','.join(f'{k}={v}' for k, v in values.items()) or 'base'}"
        try:
            flags, env = _split_values(values, settings.launcher, keys)
        except SweepError as e:
            raise SweepError(f"{label}: {e}") from None
        vdir = os.path.join(out, name)
        definition_argv = settings.base_flags + sweep_flags + flags
        paths = ["--metrics-file", os.path.join(vdir, "metrics.jsonl")]
        ckpt = os.path.join(vdir, "checkpoints")
        env = {**settings.base_env, **env}
        spec = {"name": name, "values": values, "mode": "launcher" if settings.launcher else "train",
                "cwd": repo if settings.launcher else os.getcwd(), "resumes_from": None}
        if settings.launcher:
            argv = definition_argv + paths + ["--save", ckpt]
            try:
                launch, read = resolve_launch({**os.environ, **env}, argv, repo)
            except SweepError as e:
                raise SweepError(f"{label}: {e}") from None
            if launch.refusal:  # its memory plan does not fit the device
                raise SweepError(f"{label}: {launch.refusal}")
            for var in env:
                if var in values and var not in read:
                    raise SweepError(f"key {var!r} is not a variable train_alcf.sh reads{close_hint(var, read)}")
            inherited = {k: os.environ[k] for k in sorted(read)
                         if k in os.environ and k not in env and k not in MACHINE_VARIABLES}
            env = {**inherited, **env}
            tv = launch.trainer_argv  # the launcher adds --load (SAVE unless LOAD/--load say otherwise)
            load = tv[max(i for i, t in enumerate(tv) if t == "--load") + 1]
            spec["resumes_from"] = ckpt if os.path.abspath(load) == ckpt else None
            spec["command"] = [sys.executable, "-m", "megatron_ext.launcher", *argv]
            spec["resolves_to"] = launch.command
            definition = {"mode": "launcher", "argv": definition_argv, "env": env}
        else:
            argv = definition_argv + paths
            if settings.save_checkpoints:
                argv += ["--save", ckpt]
                if "--load" not in definition_argv:  # a rerun continues from the variant's own checkpoint
                    argv += ["--load", ckpt]
                    spec["resumes_from"] = ckpt
            problem = trainer_argv_problem(parser, argv, settings.nproc)
            if problem is not None:
                base_problem = trainer_argv_problem(parser, settings.base_flags + sweep_flags + paths, settings.nproc)
                where = "base flags" if base_problem == problem else label
                raise SweepError(f"{where}: {problem}")
            if settings.nproc == 1:
                command = [sys.executable, "-m", "megatron_ext.train", *argv]
            else:
                command = [sys.executable, "-m", "torch.distributed.run", "--standalone",
                           "--nproc_per_node", str(settings.nproc), "-m", "megatron_ext.train", *argv]
            spec["command"] = command
            definition = {"mode": "train", "argv": definition_argv, "env": env, "nproc": settings.nproc,
                          "save_checkpoints": settings.save_checkpoints}
        spec["env"] = env
        spec["key"] = definition_key(definition)
        specs.append(spec)
    return specs


def shell_line(spec: dict) -> str:
    """The variant's command as one shell line, its environment first."""
    env = " ".join(f"{k}={shlex.quote(v)}" for k, v in spec["env"].items())
    return (env + " " if env else "") + shlex.join(spec["command"])


# --- YAML experiment configs -------------------------------------------------------------------

def _positive_int(value, where: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise SweepError(f"{where}: expected a positive integer, got {value!r}")
    return value


def load_config(path: str) -> dict:
    """A sweep described in YAML (docs/sweeps.md): the same settings as the command line."""
    try:
        import yaml  # noqa: F401  (read_yaml_mapping's)
    except ImportError:
        raise SweepError("--config needs PyYAML (pip install pyyaml)") from None

    try:
        raw = read_yaml_mapping(path)
    except ValueError as e:
        raise SweepError(f"--config {e}") from None
    cfg = {}
    for key, value in raw.items():
        k = str(key).replace("-", "_")
        if k not in CONFIG_KEYS:
            raise SweepError(f"{path}: unknown setting {key!r}{close_hint(k, CONFIG_KEYS)}; "
                             f"known: {', '.join(CONFIG_KEYS)}")
        cfg[k] = value
    where = lambda k: f"{path}: {k}"  # noqa: E731
    for k in ("steps", "eval_interval", "nproc"):
        if cfg.get(k) is not None:
            _positive_int(cfg[k], where(k))
    for k in ("launcher", "save_checkpoints", "retry"):
        if k in cfg and not isinstance(cfg[k], bool):
            raise SweepError(f"{where(k)}: expected true or false, got {cfg[k]!r}")
    for k in ("spike_threshold", "target_loss"):
        if k in cfg and (isinstance(cfg[k], bool) or not isinstance(cfg[k], (int, float)) or cfg[k] <= 0):
            raise SweepError(f"{where(k)}: expected a positive number, got {cfg[k]!r}")
    for k in ("out", "select"):
        if k in cfg and not isinstance(cfg[k], str):
            raise SweepError(f"{where(k)}: expected a string, got {cfg[k]!r}")

    base = cfg.pop("base", None) or {}
    if not isinstance(base, dict) or set(base) - {"flags", "env"}:
        raise SweepError(f"{where('base')}: expected a mapping with flags: [...] and/or env: {{...}}")
    flags = base.get("flags") or []
    if isinstance(flags, str):
        flags = shlex.split(flags)
    if not isinstance(flags, list):
        raise SweepError(f"{where('base.flags')}: expected a list of flags or one string")
    cfg["base_flags"] = [value_text(v, where("base.flags")) for v in flags]
    env = base.get("env") or {}
    if not isinstance(env, dict):
        raise SweepError(f"{where('base.env')}: expected a mapping VARIABLE: value")
    cfg["base_env"] = {str(k): value_text(v, where(f"base.env.{k}")) for k, v in env.items()}

    grid = cfg.pop("grid", None) or {}
    if not isinstance(grid, dict):
        raise SweepError(f"{where('grid')}: expected a mapping key: [values]")
    cfg["grid"] = {}
    for key, values in grid.items():
        values = values if isinstance(values, list) else (str(values).split(",") if isinstance(values, str)
                                                          else [values])
        if not values:
            raise SweepError(f"{where('grid.' + str(key))}: no values")
        texts = [value_text(v, where(f"grid.{key}")).strip() for v in values]
        cfg["grid"][normalise_key(str(key))] = list(dict.fromkeys(texts))
    variants = cfg.pop("variants", None) or []
    if not isinstance(variants, list):
        raise SweepError(f"{where('variants')}: expected a list of variants")
    cfg["variants"] = []
    for i, v in enumerate(variants):
        if isinstance(v, str):
            cfg["variants"].append(parse_variant_text(v, where(f"variants[{i}]")))
        elif isinstance(v, dict):
            cfg["variants"].append({normalise_key(str(k)): value_text(x, where(f"variants[{i}].{k}"))
                                    for k, x in v.items()})
        else:
            raise SweepError(f"{where(f'variants[{i}]')}: expected a mapping or 'key=value ...', got {v!r}")
    rules = cfg.pop("rules", None) or []
    if not isinstance(rules, list):
        raise SweepError(f"{where('rules')}: expected a list of rules")
    cfg["rules"] = []
    for i, r in enumerate(rules):
        at = where(f"rules[{i}]")
        if isinstance(r, str):
            cfg["rules"].append(parse_rule(r, at))
        elif isinstance(r, dict) and set(r) == {"when", "set"} and all(isinstance(r[k], dict) and r[k] for k in r):
            pairs = [{normalise_key(str(k)): value_text(x, at) for k, x in r[side].items()} for side in ("when", "set")]
            text = " ".join(f"{k}={v}" for k, v in pairs[0].items()) + ": " + " ".join(
                f"{k}={v}" for k, v in pairs[1].items())
            cfg["rules"].append(Rule(pairs[0], pairs[1], text))
        else:
            raise SweepError(f"{at}: expected {{when: {{KEY: V}}, set: {{KEY: V}}}} or 'KEY=V: KEY=V', got {r!r}")
    jobs = cfg.pop("jobs", None) or {}
    if not isinstance(jobs, dict) or set(jobs) - set(JOB_KEYS):
        raise SweepError(f"{where('jobs')}: expected a mapping with some of {', '.join(JOB_KEYS)}")
    for k in ("options", "setup"):
        if isinstance(jobs.get(k), str):
            jobs[k] = [jobs[k]]
    cfg["jobs"] = jobs
    return cfg
