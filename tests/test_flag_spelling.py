"""Flag spelling, once (megatron_ext/flag_spelling.py): every on/off flag of the trainer's parser, set
to true and to false through a sweep key, an experiment config's key and a checkpoint's saved
arguments (cooldown), parses to that value; values keep their typed spelling; a value the parser
would refuse is one line naming the key. In-process: the parser is built once."""
import argparse

import pytest

from megatron_ext.arguments import build_parser
from megatron_ext.commands import cooldown
from megatron_ext.experiment_config import ConfigError, job_flags
from megatron_ext.flag_spelling import FlagSpelling, FlagValueError
from megatron_ext.megatron_deepspeed import checkpoints
from megatron_ext.plan import parse_args
from megatron_ext.sweeps.spec import Settings, SweepError, TrainerKeys, build_specs

BASE = ["--mock-data", "--train-iters", "4"]


@pytest.fixture(scope="module")
def parser():
    return build_parser()


def switches(parser):
    """(key, option, destination, what the flag gives) of every flag without a value that sets
    something (not --help), the last read by parsing the flag alone."""
    out = []
    for action in parser._actions:
        if action.nargs == 0 and argparse.SUPPRESS not in (action.dest, action.default):
            for option in action.option_strings:
                given = getattr(parser.parse_args([option]), action.dest)
                out.append((option[2:].replace("-", "_"), option, action.dest, given))
    return out


def on_off(parser):
    found = [s for s in switches(parser) if isinstance(s[3], bool)]
    assert len(found) > 60 and {s[1] for s in found} >= {"--swiglu", "--no-swiglu", "--tie-embeddings-and-output-weights",
                                                        "--disable-bias-linear", "--bf16", "--muon-nesterov"}
    return found


def parsed(parser, argv, dest):
    return getattr(parser.parse_args(argv), dest)


def yaml_flags(parser, key, value):
    return job_flags("job.yaml", {"model": {key: value}}, parser, [])[0]


@pytest.mark.parametrize("value", [True, False])
def test_every_on_off_flag_through_sweep_keys_and_experiment_configs(parser, value):
    keys = TrainerKeys(parser)
    for key, option, dest, given in on_off(parser):
        wanted = given if value else not given  # no_swiglu=true is swiglu False
        for argv in (keys.flags(key, "true" if value else "false"), yaml_flags(parser, key, value)):
            # `is`: False or True, never None, which the model style would fill in
            assert parsed(parser, argv, dest) is wanted, (key, value, argv)


@pytest.mark.parametrize("value", [True, False])
def test_every_on_off_flag_through_a_checkpoints_saved_arguments(parser, value):
    """``megatron-ext cooldown`` rebuilds the flags of a checkpoint's saved (destination -> value)
    arguments; the flags it sets itself are left to it."""
    dests = {dest for _, _, dest, _ in on_off(parser)} - cooldown._SKIP
    argv = cooldown.argv_from_args({dest: value for dest in dests})
    for dest in dests:
        assert parsed(parser, argv, dest) is value, (dest, argv)


def test_false_for_a_flag_that_sets_a_value(parser):
    """A flag that sets a name (--use-rotary-position-embeddings: rope, --enable-mup: mup): false is
    its absence where no default gives that name, otherwise an error naming the key."""
    keys = TrainerKeys(parser)
    named = [s for s in switches(parser) if not isinstance(s[3], bool)]
    assert {s[1] for s in named} >= {"--use-rotary-position-embeddings", "--enable-mup"}
    refused = set()
    for key, option, dest, given in named:
        assert parsed(parser, keys.flags(key, "true"), dest) == given
        try:
            argv = keys.flags(key, "false")
        except SweepError as e:
            assert str(e).startswith(f"{key}: false cannot be said with {option}"), e
            refused.add(key)
            continue
        assert getattr(parse_args(BASE + argv, world_size=1), dest) != given, key  # after the plan's defaults
    assert refused == {"use_rotary_position_embeddings"}  # the llama style's default is rope


def test_the_sweep_says_false_for_the_styles_defaults(tmp_path):
    """The bug: untie_embeddings_and_output_weights=false (and add_bias_linear=false) emitted no flag,
    so the llama style's untied embeddings ran."""
    variants = [{"untie_embeddings_and_output_weights": "false", "add_bias_linear": "true", "swiglu": "false"},
                {"tie_embeddings_and_output_weights": "false", "disable_bias_linear": "false"}]
    specs = build_specs(Settings(out=str(tmp_path), base_flags=BASE, base_env={}), variants)
    for spec in specs:
        argv = spec["command"][spec["command"].index("megatron_ext.train") + 1:]
        args = parse_args(argv, world_size=1)
        values = spec["values"]
        if "untie_embeddings_and_output_weights" in values:
            assert args.untie_embeddings_and_output_weights is False and args.add_bias_linear is True
            assert args.swiglu is False
        else:
            assert args.untie_embeddings_and_output_weights is True and args.add_bias_linear is True
    gpt2 = build_specs(Settings(out=str(tmp_path), base_flags=BASE + ["--model-style", "gpt2"], base_env={}),
                       [{"tie_embeddings_and_output_weights": "false"}])[0]["command"]
    assert parse_args(gpt2[gpt2.index("megatron_ext.train") + 1:], world_size=1).untie_embeddings_and_output_weights


def test_values_keep_their_typed_spelling(parser):
    keys = TrainerKeys(parser)
    assert keys.flags("lr", "3.3333333e-4") == ["--lr", "3.3333333e-4"]  # as typed
    assert keys.flags("learning-rate", "1e-3") == ["--learning-rate", "1e-3"]  # an alias stays itself
    assert keys.flags("data_path", "0.5 'a b' 0.5 c") == ["--data-path", "0.5", "a b", "0.5", "c"]
    third = 1 / 3
    argv = yaml_flags(parser, "lr", third)
    assert float(argv[1]) == third  # a YAML float: its exact text, never rounded
    assert yaml_flags(parser, "data_path", [0.7, "a", 0.3, "b"]) == ["--data-path", "0.7", "a", "0.3", "b"]
    spelled = cooldown.argv_from_args({"lr": third, "data_path": ["1", "x"], "normalization": "LayerNorm"})
    assert float(spelled[spelled.index("--lr") + 1]) == third and spelled[spelled.index("--data-path") + 1:][:2] == ["1", "x"]
    # the Megatron-DeepSpeed integration's converted model (it printed 1.23457e-06 and 10000 before)
    ours = {"num_layers": 2, "hidden_size": 64, "ffn_hidden_size": 172, "num_attention_heads": 4,
            "num_key_value_heads": 2, "seq_length": 32, "max_position_embeddings": 32, "normalization": "RMSNorm",
            "norm_epsilon": 1.23456789e-06, "swiglu": False, "position_embedding_type": "rope", "rope_theta": 500000.5,
            "untie_embeddings_and_output_weights": False, "add_bias_linear": True, "make_vocab_size_divisible_by": 64}
    args = parser.parse_args(checkpoints.our_flags(ours).split())
    assert {k: getattr(args, k) for k in ours} == ours


@pytest.mark.parametrize("key, value, message", [
    ("num_layers", "abc", "num_layers (--num-layers): invalid positive integer: 'abc'"),
    ("zero_stage", "4", "zero_stage (--zero-stage): invalid choice: 4 (choose from 0, 1, 2, 3)"),
    ("normalization", "batchnorm", "normalization (--normalization): invalid choice 'batchnorm'"),
    ("optimizer", "adamm", "optimizer (--optimizer): unknown optimizer 'adamm' (did you mean 'adam'?)"),
    ("swiglu", "maybe", "swiglu: --swiglu is an on/off flag; use true or false, got 'maybe'"),
    ("data_path", "'a", "data_path: No closing quotation"),
])
def test_a_value_the_parser_refuses_is_one_line_naming_the_key(parser, key, value, message):
    with pytest.raises(SweepError) as e:
        TrainerKeys(parser).flags(key, value)
    assert str(e.value).startswith(message) and "\n" not in str(e.value)


@pytest.mark.parametrize("value, message", [
    (["a", "b"], "model.lr: --lr takes one value, got a list"),
    ("fast", "model.lr (--lr): invalid number: 'fast'"),
    (True, "model.lr (--lr): invalid number: 'true'"),
])
def test_experiment_config_values_the_parser_refuses(parser, value, message):
    with pytest.raises(ConfigError, match="^job.yaml: " + message.replace("(", r"\(").replace(")", r"\)")):
        yaml_flags(parser, "lr", value)


def test_a_destination_no_flag_can_say(parser):
    spelling = FlagSpelling(parser)
    with pytest.raises(FlagValueError, match="^x: no value"):
        spelling.flags("lr", None, name="x")
    with pytest.raises(FlagValueError, match="not a training flag"):
        spelling.flags("no_such_setting", 1)
    with pytest.raises(cooldown.CooldownError, match="cannot express seed=None"):
        cooldown.argv_from_args({"seed": None})
