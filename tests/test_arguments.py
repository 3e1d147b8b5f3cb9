"""Megatron-DeepSpeed spellings, real boolean flags, derived values, and one-line errors."""
import pytest

from conftest import TINY, error_lines, run_module
from megatron_ext.arguments import ArgumentsError, build_parser, normalise_argv
from megatron_ext.plan import build_plan, parse_args

BASE = ["--mock-data", "--train-iters", "10"]


def test_dash_and_underscore_spellings_are_the_same_flag():
    a = parse_args(BASE + ["--lr_decay_style", "linear", "--micro_batch_size=3", "--adam-beta1", "0.8"], world_size=1)
    assert a.lr_decay_style == "linear" and a.micro_batch_size == 3 and a.adam_beta1 == 0.8
    assert normalise_argv(["--data_path", "a_b_c", "--x_y=p_q"]) == ["--data-path", "a_b_c", "--x-y=p_q"]
    assert normalise_argv(["--a_b", "--", "--x_y"]) == ["--a-b", "--", "--x_y"]  # after --: values, as typed


def test_llama_style_defaults_and_gpt2_style():
    a = parse_args(BASE + ["--hidden-size", "96", "--num-attention-heads", "4"], world_size=1)
    assert (a.swiglu, a.normalization, a.position_embedding_type) == (True, "RMSNorm", "rope")
    assert a.untie_embeddings_and_output_weights and not a.add_bias_linear
    assert a.ffn_hidden_size == 256  # 8/3 * 96 = 256, already a multiple of 64
    g = parse_args(BASE + ["--model-style", "gpt2"], world_size=1)
    assert (g.swiglu, g.normalization, g.position_embedding_type) == (False, "LayerNorm", "learned_absolute")
    assert g.ffn_hidden_size == 4 * g.hidden_size and g.add_bias_linear
    # explicit flags beat the style
    o = parse_args(BASE + ["--model-style", "gpt2", "--swiglu", "--normalization", "rmsnorm",
                           "--untie-embeddings-and-output-weights", "--disable-bias-linear"], world_size=1)
    assert o.swiglu and o.normalization == "RMSNorm" and o.untie_embeddings_and_output_weights
    assert o.add_bias_linear is False
    assert parse_args(BASE + ["--no-swiglu"], world_size=1).swiglu is False


def test_boolean_flags_take_no_value():
    with pytest.raises(SystemExit):
        parse_args(BASE + ["--bf16", "False"], world_size=1)


def test_batch_arithmetic_and_training_length():
    a = parse_args(BASE + ["--micro-batch-size", "2", "--global-batch-size", "16"], world_size=4)
    assert a.data_parallel_size == 4 and a.gradient_accumulation_steps == 2
    a = parse_args(["--mock-data", "--micro-batch-size", "2", "--gradient-accumulation-steps", "3",
                    "--seq-length", "64", "--train-tokens", "10000"], world_size=2)
    assert a.global_batch_size == 12
    assert a.train_iters == 10000 // (64 * 12)
    a = parse_args(BASE + ["--tensor-model-parallel-size", "2"], world_size=4)
    assert a.data_parallel_size == 2
    a = parse_args(["--mock-data", "--train-samples", "100", "--global-batch-size", "8"], world_size=1)
    assert a.train_iters == 12


@pytest.mark.parametrize("argv, message", [
    (BASE + ["--global-batch-size", "6", "--micro-batch-size", "4"], "--global-batch-size 6 is not divisible"),
    (BASE + ["--num-attention-heads", "3", "--hidden-size", "64"], "--num-attention-heads 3 does not divide --hidden-size 64"),
    (BASE + ["--num-key-value-heads", "3"], "--num-key-value-heads 3 does not divide"),
    (["--mock-data"], "no training length"),
    (["--train-iters", "5"], "no training data"),
    (BASE + ["--bf16", "--fp16"], "mutually exclusive"),
    (BASE + ["--pipeline-model-parallel-size", "2"], "--pipeline-model-parallel-size 2 = 2 does not divide the world size 1"),
    (BASE + ["--save-interval", "5"], "--save-interval needs --save"),
    (BASE + ["--min-lr", "1", "--lr", "0.1"], "--min-lr 1.0 is larger than --lr 0.1"),
    (BASE + ["--lr-warmup-fraction", "0.1", "--lr-warmup-iters", "5"], "not both"),
    (BASE + ["--lr-warmup-iters", "50"], "warmup (50 samples) is longer than the decay length"),
    (BASE + ["--adam-beta2", "1.5"], "--adam-beta2 must be in [0, 1)"),
])
def test_invalid_combinations_give_one_line(argv, message, capsys):
    with pytest.raises(SystemExit) as e:
        parse_args(argv, world_size=1)
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err


def test_tp_must_divide_heads_and_world():
    with pytest.raises(ArgumentsError, match="does not divide --num-attention-heads"):
        build_plan(build_parser().parse_args(BASE + ["--tensor-model-parallel-size", "3"]), 3)
    with pytest.raises(ArgumentsError, match="does not divide the world size 3"):
        build_plan(build_parser().parse_args(BASE + ["--tensor-model-parallel-size", "2"]), 3)


@pytest.mark.parametrize("argv, expected", [
    (["--lr-decay-stlye", "cosine"], "unrecognized argument --lr-decay-stlye (did you mean --lr-decay-style?)"),
    (["--optimizer", "adamww"], "argument --optimizer: unknown optimizer 'adamww' (did you mean 'adamw'?)"),
    (["--micro-batch-size", "two"], "argument --micro-batch-size: invalid positive integer: 'two'"),
    (["--zero-stage", "5"], "argument --zero-stage: invalid choice: 5"),
    (["--lr", "fast"], "argument --lr: invalid number: 'fast'"),
    (["--lr-decay-style", "cosin"], "unknown lr-schedule 'cosin' (did you mean 'cosine'?)"),
])
def test_command_line_errors_are_one_line_and_exit_2(argv, expected):
    proc = run_module("megatron_ext.train", TINY + BASE + argv)
    assert proc.returncode == 2
    lines = error_lines(proc.stderr)
    assert len(lines) == 1, proc.stderr
    assert expected in lines[0]
    assert "Traceback" not in proc.stderr


def test_engine_rules_apply_to_the_merged_deepspeed_config(tmp_path, capsys):
    """A user DeepSpeed JSON decides the ZeRO stage and offload that run: the plug-ins' engine
    support and the offload rule are checked against it, not against the flags alone."""
    stage3 = tmp_path / "z3.json"
    stage3.write_text('{"zero_optimization": {"stage": 3}}')
    with pytest.raises(ArgumentsError, match="--optimizer muon supports --zero-stage 0, 1 and 2, not 3"):
        build_plan(build_parser().parse_args(BASE + ["--optimizer", "muon", "--deepspeed-config", str(stage3)]), 1)
    offload0 = tmp_path / "o0.json"
    offload0.write_text('{"zero_optimization": {"stage": 0, "offload_optimizer": {"device": "cpu"}}}')
    with pytest.raises(ArgumentsError, match="--cpu-optimizer needs --zero-stage 1, 2 or 3"):
        build_plan(build_parser().parse_args(BASE + ["--deepspeed-config", str(offload0)]), 1)
    bf16 = tmp_path / "bf16.json"
    bf16.write_text('{"bf16": {"enabled": true}, "zero_optimization": {"stage": 2}}')
    plan = build_plan(build_parser().parse_args(BASE + ["--deepspeed-config", str(bf16)]), 1)
    assert (plan.engine.zero_stage, plan.engine.precision) == (2, "bf16")
    assert plan.args.zero_stage == 2 and plan.args.bf16  # the model is built in the precision that runs


def test_the_plan_does_not_touch_the_parsed_args_and_is_read_only():
    parsed = build_parser().parse_args(BASE + ["--micro-batch-size", "2"])
    plan = build_plan(parsed, 2)
    assert parsed.global_batch_size is None and plan.args.global_batch_size == 4
    with pytest.raises(AttributeError, match="read-only"):
        plan.args.train_iters = 7
