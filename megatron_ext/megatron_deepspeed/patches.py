"""The wrappers put on the fork's hook points (``hook_points.py``), and the state they share.

Each wrapper calls the fork's own function and adds what the plug-ins need around it; a family
the fork runs itself (``ownership.py``) goes straight to the fork's code. The wrappers read their
arguments by NAME (``inspect.signature``), so commits that reorder parameters still work.
"""
from __future__ import annotations

import contextlib
import functools
from collections import Counter
import inspect
import json
import os
import sys
from typing import Optional

from megatron_ext.megatron_deepspeed import arguments as fork_arguments
from megatron_ext.megatron_deepspeed import hook_points, layouts, loop, optimizer as fork_optimizer
from megatron_ext.megatron_deepspeed import parametrization as fork_parametrization
from megatron_ext.megatron_deepspeed import project_api
from megatron_ext.megatron_deepspeed.errors import ActivationError, fail
from megatron_ext.megatron_deepspeed.scheduler import ForkScheduler

# a JSON file: what the plug-ins did in this run (rank 0's; with "{rank}" in the path, every rank's)
REPORT_ENV = "MEGATRON_EXT_REPORT"


class Session:
    """The plug-ins' view of one fork run."""

    def __init__(self, mode: str, fork):
        self.mode = mode
        self.fork = fork  # qualname -> the fork's original object
        self.arguments = fork_arguments.ForkArguments(mode)
        self.owner = None
        self.args = None
        self.optimizer = None  # the base (torch) optimizer
        self.engine = None
        self.scheduler: Optional[ForkScheduler] = None
        self.finder = None
        self.finder_ran = False
        self.parametrization = None
        self.applied = None
        self.engine_is_ready = False
        self.calls = Counter()  # optimizer hooks called (reported)

    # -- helpers --------------------------------------------------------------------------------
    def view(self):
        return fork_arguments.our_view(self.args)

    def say(self, text: str) -> None:
        if int(os.environ.get("RANK", "0")) == 0:
            print(f"megatron_ext: {text}", flush=True)

    def engine_ready(self, engine) -> None:
        if self.engine_is_ready or not hasattr(engine, "basic_optimizer"):
            return
        self.engine_is_ready = True
        self.engine = engine
        if self.optimizer is None:
            self.optimizer = engine.basic_optimizer
        self.calls["engine_ready"] += 1
        try:
            project_api.engine_ready(self.optimizer, engine)
        except project_api.UnsupportedEngineSetting as e:
            fail(str(e))

    def evaluation_weights(self):
        if self.engine is None or self.optimizer is None:
            return contextlib.nullcontext()
        if callable(getattr(self.optimizer, "eval_mode", None)):
            self.calls["evaluation_weights"] += 1
        return project_api.evaluation_weights(self.optimizer, self.engine)

    def write_report(self) -> None:
        path, rank = os.environ.get(REPORT_ENV), int(os.environ.get("RANK", "0"))
        if not path or (rank != 0 and "{rank}" not in path):
            return
        path = path.replace("{rank}", str(rank))
        groups = []
        if self.optimizer is not None:
            for g in self.optimizer.param_groups:
                groups.append({k: v for k, v in g.items() if isinstance(v, (int, float, str, bool)) and k != "params"}
                              | {"numel": sum(p.numel() for p in g["params"])})
        report = {"mode": self.mode, "ownership": self.owner.summary() if self.owner else None,
                  "optimizer": type(self.optimizer).__name__ if self.optimizer is not None else None,
                  "scheduler": type(self.scheduler.inner).__name__ if self.scheduler is not None else None,
                  "param_groups": groups,
                  "parametrization": self.applied.report() if self.applied is not None else None,
                  "lr_finder_ran": self.finder_ran, "hook_calls": dict(self.calls)}
        with open(path, "w") as f:
            json.dump(report, f, indent=1, default=str)


def _allow_client_optimizer_under_zero(session) -> None:
    """DeepSpeed refuses an optimizer class it does not know under ZeRO unless the config allows it
    (our trainer's generated config does); the fork's config comes from the user's JSON."""
    config = getattr(session.args, "deepspeed_config_dict", None)
    if not isinstance(config, dict):
        return
    from deepspeed.runtime.zero.utils import is_zero_supported_optimizer

    stage = (config.get("zero_optimization") or {}).get("stage", 0)
    if stage and not config.get("zero_allow_untested_optimizer") and not is_zero_supported_optimizer(session.optimizer):
        config["zero_allow_untested_optimizer"] = True
        session.say(f"DeepSpeed config: zero_allow_untested_optimizer = true (--optimizer {session.args.optimizer} "
                    f"is megatron_ext's, under ZeRO {stage})")


def _universal_group_mismatch(session) -> Optional[str]:
    """DeepSpeed's universal load pairs the checkpoint's param groups with the optimizer's by
    position and silently skips the surplus: a different count would leave parameters unloaded."""
    args = session.args
    if not (getattr(args, "universal_checkpoint", False) and getattr(args, "load", None) and session.owner.optimizer):
        return None
    tag = getattr(args, "load_tag", None) or project_api.read_latest(args.load, project_api.LATEST_UNIVERSAL)
    path = project_api.universal_optimizer_state_file(os.path.join(args.load, str(tag)))
    if tag is None or not os.path.isfile(path):
        return None  # DeepSpeed reports a missing checkpoint itself
    saved = len(project_api.load_states(path)["param_groups"])
    ours = len(session.optimizer.param_groups)
    if saved == ours:
        return None
    layout = "roles" if ours > 2 else "fork"
    return (f"--load {args.load} ({tag}): the universal checkpoint has {saved} optimizer param groups, --optimizer "
            f"{args.optimizer} here has {ours} (DeepSpeed would leave parameters unloaded); convert the source "
            f"checkpoint with megatron-ext convert --optimizer-groups {layout}")


def _bind(fn, a, kw):
    bound = inspect.signature(fn).bind(*a, **kw)
    bound.apply_defaults()
    return bound


def _wrap(module, name, make):
    original = getattr(module, name)
    wrapper = functools.wraps(original)(make(original))
    wrapper.__megatron_ext_original__ = original
    setattr(module, name, wrapper)


def apply(mode: str) -> None:
    """Resolve every hook point, then patch them (nothing is patched if one is missing)."""
    fork = hook_points.resolve()
    session = Session(mode, fork)
    initialize = sys.modules["megatron.initialize"]
    training = sys.modules["megatron.training"]

    def parse_args(original):
        def wrapper(*a, **kw):
            bound = _bind(original, a, kw)
            provider = bound.arguments.get("extra_args_provider")

            def extended(parser):
                if provider is not None:
                    parser = provider(parser)
                return session.arguments.extend(parser)

            bound.arguments["extra_args_provider"] = extended
            args = original(*bound.args, **bound.kwargs)
            try:
                session.owner = session.arguments.resolve(args)
                session.args = args
                fork_arguments.check(args, session.owner)
            except (ValueError, ActivationError) as e:  # UnknownPluginError is a ValueError too
                fail(str(e).strip().splitlines()[0])
            session.say(session.owner.summary())
            return args

        return wrapper

    def validate_args(original):
        def wrapper(*a, **kw):
            args = original(*a, **kw)
            session.args = args if args is not None else session.args
            if session.owner.ours("init") or session.owner.ours("optimizer"):
                session.parametrization = project_api.parametrization_for(session.view())
            return args

        return wrapper

    def get_model(original):
        def wrapper(*a, **kw):
            models = original(*a, **kw)
            layouts.mark_whole_experts(models)
            if session.owner.ours("init"):
                try:
                    session.applied = fork_parametrization.apply(models, session.view(), session.parametrization)
                except ActivationError as e:
                    fail(str(e))
                if session.applied.redrawn:
                    session.say("re-initialised " + ", ".join(f"{k} at std {v:.4g}" for k, v in session.applied.redrawn.items()))
                session.say(session.parametrization.summary())
            return models

        return wrapper

    def get_megatron_optimizer(original):
        def wrapper(*a, **kw):
            if not session.owner.ours("optimizer"):
                session.optimizer = original(*a, **kw)
                return session.optimizer
            bound = _bind(original, a, kw)
            view = session.view()
            try:
                session.optimizer = fork_optimizer.build(
                    bound.arguments["model"], view, session.parametrization or project_api.parametrization_for(view),
                    bound.arguments.get("no_weight_decay_cond"), bound.arguments.get("scale_lr_cond"),
                    bound.arguments.get("lr_mult", 1.0))
            except ActivationError as e:
                fail(str(e))
            _allow_client_optimizer_under_zero(session)
            return session.optimizer

        return wrapper

    def get_optimizer_param_scheduler(original):
        def wrapper(*a, **kw):
            args = session.args
            finder = session.owner.ours("lr_finder") and getattr(args, "lr_finder", False)
            if not (session.owner.ours("schedule") or finder):
                return original(*a, **kw)
            optimizer = _bind(original, a, kw).arguments["optimizer"]
            view = session.view()
            if finder:
                session.finder = project_api.lr_finder(view)
                inner = session.finder.scheduler(optimizer)
            else:
                inner = project_api.param_scheduler(optimizer, view)
            session.scheduler = ForkScheduler(inner)
            return session.scheduler

        return wrapper

    def load_checkpoint(original):
        def wrapper(*a, **kw):
            model = _bind(original, a, kw).arguments["model"]
            if model:
                session.engine_ready(model[0])
            problem = _universal_group_mismatch(session)
            if problem:
                fail(problem)
            try:
                return original(*a, **kw)
            except project_api.schedule_resume_error() as e:
                fail(str(e))

        return wrapper

    def setup_model_and_optimizer(original):
        def wrapper(*a, **kw):
            result = original(*a, **kw)
            model = result[0]
            if model:
                session.engine_ready(model[0])
                project_api.train_mode(session.optimizer, model[0])
            return result

        return wrapper

    def train_step(original):
        def wrapper(*a, **kw):
            if session.optimizer is None or not project_api.curvature_pass_due(session.optimizer):
                return original(*a, **kw)  # every step: no argument binding unless a pass is due
            bound = _bind(original, a, kw)
            session.calls["curvature_pass"] += 1
            bound.arguments["data_iterator"] = loop.curvature_pass(
                session.fork, session, bound.arguments["forward_step_func"], bound.arguments["data_iterator"],
                bound.arguments["model"][0])
            return original(*bound.args, **bound.kwargs)

        return wrapper

    def train(original):
        def wrapper(*a, **kw):
            if not (session.finder is not None and getattr(session.args, "lr_finder", False)):
                iteration = original(*a, **kw)
                session.write_report()
                return iteration
            b = _bind(original, a, kw).arguments
            start = loop.run_lr_finder(session.fork, session, training.train_step, b["forward_step_func"], b["model"],
                                       b["optimizer"], b["opt_param_scheduler"], b["train_data_iterator"])
            session.write_report()
            return start

        return wrapper

    def evaluate(original):
        def wrapper(*a, **kw):
            with session.evaluation_weights():
                return original(*a, **kw)

        return wrapper

    def save_checkpoint(original):
        def wrapper(*a, **kw):
            if session.finder_ran:
                session.say("LR finder run: no checkpoint is written")
                return None
            with session.evaluation_weights():
                return original(*a, **kw)

        return wrapper

    patches = {
        (initialize, "parse_args"): parse_args, (initialize, "validate_args"): validate_args,
        (training, "get_model"): get_model, (training, "get_megatron_optimizer"): get_megatron_optimizer,
        (training, "get_optimizer_param_scheduler"): get_optimizer_param_scheduler,
        (training, "load_checkpoint"): load_checkpoint,
        (training, "setup_model_and_optimizer"): setup_model_and_optimizer,
        (training, "train_step"): train_step, (training, "train"): train, (training, "evaluate"): evaluate,
        (training, "save_checkpoint"): save_checkpoint,
    }
    for (module, name), make in patches.items():
        _wrap(module, name, make)
