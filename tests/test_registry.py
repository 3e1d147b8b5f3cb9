"""The generic plug-in registry: registration, aliases, errors, flags, entry-point discovery."""
import argparse
import subprocess
import sys
import textwrap

import pytest

from conftest import _env
from megatron_ext.registry import Arg, Registry, RegistryError, UnknownPluginError


def make_registry():
    reg = Registry("widget-test", "test widgets")

    @reg.register("alpha", aliases=["a", "first_one"], description="the first widget",
                  arguments=[Arg("--alpha-size", type=int, default=3, help="size")])
    def alpha():
        return "alpha"

    @reg.register("beta", description="the second widget",
                  arguments=[Arg("--shared-knob", type=float, default=0.5)])
    def beta():
        return "beta"

    @reg.register("gamma", description="shares a flag with beta",
                  arguments=[Arg("--shared-knob", type=float, default=0.5)])
    def gamma():
        return "gamma"

    return reg


def test_register_and_lookup_by_name_and_alias():
    reg = make_registry()
    assert reg.names() == ["alpha", "beta", "gamma"]
    assert reg.get("alpha").obj() == "alpha"
    assert reg.get("A").name == "alpha"
    # underscores and dashes are the same, as on the command line
    assert reg.get("first-one").name == "alpha"
    assert reg.get("FIRST_ONE").obj() == "alpha"
    assert "a" in reg and "delta" not in reg


def test_unknown_name_lists_known_names_and_closest_match():
    reg = make_registry()
    with pytest.raises(UnknownPluginError) as e:
        reg.get("alpah")
    msg = str(e.value)
    assert "unknown widget-test 'alpah'" in msg
    assert "did you mean 'alpha'" in msg
    assert "known: alpha, beta, gamma" in msg
    with pytest.raises(argparse.ArgumentTypeError, match="unknown widget-test 'zzz'"):
        reg.argument_type("zzz")


def test_duplicate_names_and_conflicting_flags_are_rejected():
    reg = make_registry()
    with pytest.raises(RegistryError, match="already taken"):
        reg.add("delta", object(), description="x", aliases=["a"])
    with pytest.raises(RegistryError, match="registered twice"):
        reg.add("beta", object(), description="x")
    with pytest.raises(RegistryError, match="declares --shared-knob differently"):
        reg.add("epsilon", object(), description="x", arguments=[Arg("--shared-knob", type=int, default=1)])
    with pytest.raises(RegistryError, match="one line"):
        reg.add("zeta", object(), description="two\nlines")


def test_plugin_flags_are_added_in_their_own_groups_once():
    reg = make_registry()
    parser = argparse.ArgumentParser()
    reg.add_arguments(parser)
    titles = [g.title for g in parser._action_groups]
    assert "widget-test 'alpha'" in titles and "widget-test 'beta'" in titles
    assert "widget-test 'gamma'" not in titles  # its only flag is already there via beta
    ns = parser.parse_args(["--alpha-size", "7", "--shared-knob", "0.25"])
    assert ns.alpha_size == 7 and ns.shared_knob == 0.25


def test_builtin_families_are_discovered_from_their_folders():
    from megatron_ext import registry

    fams = registry.families()
    assert {"optimizer", "lr-schedule", "parametrization"} <= set(fams)
    assert "adamw" in fams["optimizer"].names()
    assert {"constant", "linear", "cosine"} <= set(fams["lr-schedule"].names())
    assert fams["optimizer"].get("adamw").source == "megatron_ext.optimizers.adamw"


def _install_third_party_plugin(root):
    """A real (unpacked) distribution with a dist-info and a megatron_ext.plugins entry point."""
    pkg = root / "extra_opt_pkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text(textwrap.dedent('''
        import torch
        from megatron_ext.optimizers import OPTIMIZERS
        from megatron_ext.registry import Arg

        @OPTIMIZERS.register("plainsgd", aliases=["third-party-sgd"],
                             description="third-party plain SGD",
                             arguments=[Arg("--plainsgd-momentum", type=float, default=0.0)])
        def build(param_groups, args):
            return torch.optim.SGD(param_groups, lr=args.lr, momentum=args.plainsgd_momentum)
    '''))
    info = root / "extra_opt_pkg-1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: extra-opt-pkg\nVersion: 1.0\n")
    (info / "entry_points.txt").write_text("[megatron_ext.plugins]\nplainsgd = extra_opt_pkg\n")
    (info / "RECORD").write_text("")


def test_third_party_plugin_via_entry_point(tmp_path):
    _install_third_party_plugin(tmp_path)
    env = _env()
    env["PYTHONPATH"] = f"{tmp_path}:{env['PYTHONPATH']}"
    listing = subprocess.run([sys.executable, "-m", "megatron_ext.cli", "list", "-v"],
                             capture_output=True, text=True, env=env, check=True)
    assert "plainsgd" in listing.stdout and "third-party plain SGD" in listing.stdout
    assert "--plainsgd-momentum" in listing.stdout
    code = ("from megatron_ext.plan import parse_args;"
            "a = parse_args(['--mock-data', '--train-iters', '1', '--optimizer', 'third_party_sgd',"
            " '--plainsgd_momentum', '0.9'], world_size=1);"
            "print(a.optimizer, a.plainsgd_momentum)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
    assert out.stdout.split()[-2:] == ["plainsgd", "0.9"]


def test_engine_support_is_data_in_the_record_and_listed(capsys):
    from megatron_ext.cli import main
    from megatron_ext.optimizers import OPTIMIZERS
    from megatron_ext.registry import EngineSettings, PluginSettingError

    muon = OPTIMIZERS.get("muon")
    assert muon.engine.zero_stages == (0, 1, 2) and not muon.engine.cpu_offload
    with pytest.raises(PluginSettingError, match=r"^--optimizer muon does not support --cpu-optimizer"):
        OPTIMIZERS.check(muon, argparse.Namespace(**{a.dest: a.kwargs.get("default") for a in muon.arguments}),
                         EngineSettings(zero_stage=1, cpu_offload=True))
    assert main(["list", "-v"]) == 0
    out = capsys.readouterr().out
    assert "engine: ZeRO 0/1/2, no CPU offload" in out.split("  muon ", 1)[1].split("\n  ")[1]


def test_a_record_field_the_family_does_not_have_is_refused():
    reg = Registry("widget-fields", "test widgets")
    with pytest.raises(RegistryError, match="unknown record field"):
        reg.add("delta", object(), description="x", width_lr_exponents=lambda args: {})
