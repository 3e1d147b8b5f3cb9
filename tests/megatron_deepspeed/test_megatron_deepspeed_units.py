"""The Megatron-DeepSpeed integration's parts that need no fork process: name mapping and roles,
the fork's param-group layout, the scheduler adapter, our flags on a fork-like parser, activation
(the start-up hook, a missing hook point) and the packaging of the start-up hook."""
import argparse
import math
import os
import subprocess
import sys
import sysconfig
import textwrap
import types

import pytest
import torch

from megatron_deepspeed.fork_harness import REPO, noise_free
from megatron_ext.megatron_deepspeed import activation, arguments, layouts, names, optimizer, parametrization, project_api, \
    scheduler

# -- names and roles -----------------------------------------------------------------------------

FORK_GPT = {
    "language_model.embedding.word_embeddings.weight": ("embedding.word_embeddings.weight", "embedding"),
    "language_model.encoder.layers.0.input_layernorm.weight": ("decoder.layers.0.input_layernorm.weight", "norm"),
    "language_model.encoder.layers.0.self_attention.query_key_value.weight":
        ("decoder.layers.0.self_attention.linear_qkv.weight", "hidden"),
    "language_model.encoder.layers.0.self_attention.dense.weight":
        ("decoder.layers.0.self_attention.linear_proj.weight", "hidden"),
    "language_model.encoder.layers.0.post_attention_layernorm.weight":
        ("decoder.layers.0.pre_mlp_layernorm.weight", "norm"),
    "language_model.encoder.layers.0.mlp.dense_h_to_4h.weight": ("decoder.layers.0.mlp.linear_fc1.weight", "hidden"),
    "language_model.encoder.layers.1.mlp.dense_4h_to_h.bias": ("decoder.layers.1.mlp.linear_fc2.bias", "bias"),
    "language_model.encoder.layers.1.mlp.deepspeed_moe.gate.wg.weight": ("decoder.layers.1.mlp.router.weight", "router"),
    "language_model.encoder.layers.1.mlp.deepspeed_moe.experts.deepspeed_experts.1.dense_h_to_4h.weight":
        ("decoder.layers.1.mlp.experts.local_experts.1.linear_fc1.weight", "hidden"),
    "language_model.encoder.final_layernorm.weight": ("decoder.final_layernorm.weight", "final_norm"),
    "language_model.output_layer.weight": ("output_layer.weight", "output"),
}


def _role(core, shape):
    return project_api.param_role(core, torch.empty(shape, device="meta"))


@pytest.mark.parametrize("fork_name", sorted(FORK_GPT))
def test_fork_names_map_to_megatron_core_names_and_roles(fork_name):
    core, role = FORK_GPT[fork_name]
    assert names.core_name(fork_name) == core
    assert names.fork_name(core) == fork_name
    assert _role(core, (8,) if role in ("norm", "final_norm", "bias") else (8, 8)) == role


def test_pipeline_model_names_get_the_right_roles():
    pipe = {"0.word_embeddings.weight": "embedding", "tied_modules.embed.word_embeddings.weight": "embedding",
            "2.input_layernorm.weight": "norm", "2.self_attention.query_key_value.weight": "hidden",
            "3.mlp.dense_4h_to_h.weight": "hidden", "5.weight": "final_norm", "6.lm_head.weight": "output"}
    assert names.is_pipeline_model(pipe)
    for name, role in pipe.items():
        core = names.core_name(name, pipeline=True)
        assert _role(core, (8,) if "norm" in role else (8, 8)) == role, name


@pytest.mark.parametrize("tied, moe", [(False, False), (True, False), (False, True)])
def test_a_whole_pipeline_model_maps_to_megatron_core_names_and_back(tied, moe):
    """GPTModelPipe's positions: 1 the embedding, 2-4 the three layers, (MoE: 5 caches its loss), then
    the final norm and the output layer; a tied embedding named by its tie key."""
    layout = names.PipeLayout(3, moe=moe, tied=tied)
    norm = 5 + moe
    pipe = {("tied_modules.embed." if tied else "1.") + "word_embeddings.weight": "embedding.word_embeddings.weight",
            "2.input_layernorm.weight": "decoder.layers.0.input_layernorm.weight",
            "4.self_attention.query_key_value.weight": "decoder.layers.2.self_attention.linear_qkv.weight",
            f"{norm}.weight": "decoder.final_layernorm.weight"}
    if not tied:
        pipe[f"{norm + 1}.lm_head.weight"] = "output_layer.weight"
    if moe:
        pipe["3.mlp.deepspeed_moe.experts.deepspeed_experts.1.dense_h_to_4h.weight"] = \
            "decoder.layers.1.mlp.experts.local_experts.1.linear_fc1.weight"
    assert names.rename_map(pipe, pipe=layout) == pipe
    assert names.rename_map(pipe.values(), to_core=False, pipe=layout) == {core: n for n, core in pipe.items()}
    for stray in (f"{norm + 2}.lm_head.weight", "5.input_layernorm.weight" if not moe else "6.input_layernorm.weight"):
        with pytest.raises(names.UnknownParameterError):
            names.rename_map([stray], pipe=layout)


def test_a_zero_3_partitioned_matrix_is_hidden_not_a_norm():
    """Under ZeRO 3 the fork's parameters are empty 1-D placeholders; DeepSpeed keeps the shape."""
    placeholder = torch.nn.Parameter(torch.empty(0))
    placeholder.ds_shape = torch.Size([24, 8])
    assert project_api.param_role("decoder.layers.0.self_attention.linear_qkv.weight", placeholder) == "hidden"


def test_an_unknown_parameter_is_refused_in_one_line():
    with pytest.raises(names.UnknownParameterError, match=r"^parameter language_model.pooler.dense.weight .*=off$"):
        names.core_names([("language_model.embedding.word_embeddings.weight", None),
                          ("language_model.pooler.dense.weight", None)])


# -- param groups --------------------------------------------------------------------------------


class FakeForkModel:
    def __init__(self):
        shapes = {"language_model.embedding.word_embeddings.weight": (32, 8),
                  "language_model.encoder.layers.0.input_layernorm.weight": (8,),
                  "language_model.encoder.layers.0.self_attention.query_key_value.weight": (24, 8),
                  "language_model.encoder.layers.0.mlp.dense_4h_to_h.weight": (8, 16),
                  "language_model.encoder.final_layernorm.weight": (8,),
                  "language_model.output_layer.weight": (32, 8)}
        self.params = [(n, torch.nn.Parameter(torch.randn(s))) for n, s in shapes.items()]

    def named_parameters(self):
        return iter(self.params)


def _our_args(*argv):
    from megatron_ext.arguments import build_parser

    args = build_parser().parse_args(["--mock-data", *argv])
    args.parametrization = args.parametrization or "sp"
    args.global_batch_size, args.train_iters = 4, 20
    return args


def test_element_wise_optimizers_get_the_forks_two_groups_and_matrix_optimizers_one_per_role():
    model = FakeForkModel()
    args = _our_args("--optimizer", "adamw")
    adamw = optimizer.build([model], args, project_api.parametrization_for(args))
    decay, no_decay = adamw.param_groups
    assert (decay["name"], no_decay["name"]) == ("wd_no_scale_lr", "no_wd_no_scale_lr")
    names_of = {id(p): n for n, p in model.params}
    assert [names_of[id(p)] for p in decay["params"]] == [model.params[i][0] for i in (0, 2, 3, 5)]  # model order
    assert decay["wd_mult"] == 1.0 and no_decay["wd_mult"] == 0.0
    args = _our_args("--optimizer", "muon")
    muon = optimizer.build([model], args, project_api.parametrization_for(args))
    assert [(g["role"], g["use_matrix"]) for g in muon.param_groups] == [
        ("embedding", False), ("norm", False), ("hidden", True), ("final_norm", False), ("output", False)]


def test_groups_split_to_the_count_of_the_rank_with_the_most_keeping_their_options():
    """DeepSpeed's ZeRO reduces each group's grad norm over the model-parallel group: a pipeline stage
    with fewer roles than another must still have as many groups (it hung at PP 2)."""
    args = _our_args("--optimizer", "muon")
    groups = project_api.param_groups(optimizer.NamedAsCore([FakeForkModel()]), project_api.parametrization_for(args))
    split = optimizer.split_to_count(groups, len(groups) + 1)  # the hidden group (2 matrices) in two
    assert len(split) == len(groups) + 1 and [g["role"] for g in split].count("hidden") == 2
    names_of = lambda gs: [n for g in gs for n in g["param_names"]]  # noqa: E731
    assert names_of(split) == names_of(groups)  # every parameter once, in order, with its own name
    for g in split:
        original = next(o for o in groups if o["role"] == g["role"])
        assert {k: v for k, v in g.items() if k not in ("params", "param_names")} == \
            {k: v for k, v in original.items() if k not in ("params", "param_names")}
        assert [id(p) for p in g["params"]] == [id(p) for p, n in zip(original["params"], original["param_names"])
                                                  if n in g["param_names"]]
    with pytest.raises(Exception, match="cannot split its 5 into as many"):
        optimizer.split_to_count(groups, 99)


def test_an_expert_is_redrawn_per_data_parallel_rank_and_swiglu_fc1_sharded_as_gate_r_up_r(monkeypatch):
    expert, dense = torch.nn.Parameter(torch.zeros(4, 2)), torch.nn.Parameter(torch.zeros(4, 2))
    expert.allreduce = False  # DeepSpeed-MoE's mark
    monkeypatch.setattr("megatron.core.parallel_state.get_data_parallel_rank", lambda: 1, raising=False)
    name = "3.mlp.deepspeed_moe.experts.deepspeed_experts.0.dense_h_to_4h.weight"
    assert parametrization._redraw_key(name, expert) == name + "/data-parallel-rank-1"
    assert parametrization._redraw_key("3.mlp.dense_h_to_4h.weight", dense) == "3.mlp.dense_h_to_4h.weight"
    whole = torch.nn.Parameter(torch.zeros(8, 2))  # [gate (4 rows); up (4 rows)] at TP 1
    parametrization.redraw(whole, 1.0, 7, "w")
    shards = []
    for rank in (0, 1):
        shard = torch.nn.Parameter(torch.zeros(4, 2))
        parametrization.redraw(shard, 1.0, 7, "w", (0, rank, 2), stride=2)
        shards.append(shard.detach())
    gate, up = whole.detach().chunk(2)
    assert torch.equal(shards[0], torch.cat([gate[:2], up[:2]])) and torch.equal(shards[1], torch.cat([gate[2:], up[2:]]))


def test_experts_the_fork_does_not_slice_are_marked_whole_for_our_tensor_parallel_code():
    """The fork's expert linears keep megatron's tensor-parallel attribute though each tensor-parallel
    rank holds the whole expert (``is_expert_without_slicing``): Muon/Shampoo must not gather them."""
    whole, sliced = torch.nn.Linear(2, 2), torch.nn.Linear(2, 2)
    whole.is_expert_without_slicing, sliced.is_expert_without_slicing = True, False
    for p in (*whole.parameters(), *sliced.parameters()):
        p.tensor_model_parallel = True
    layouts.mark_whole_experts([torch.nn.Sequential(whole, sliced)])
    assert [project_api.is_tensor_parallel(p) for p in (whole.weight, whole.bias, sliced.weight)] == [False, False, True]
    assert parametrization._tp_layout(whole.weight) == (0, 0, 1)


def _layout_args(tmp_path, optimizer_name="muon", pipeline=True, model=(), **config):
    path = tmp_path / "ds.json"
    path.write_text(__import__("json").dumps(config))
    fields = dict(deepspeed=True, deepspeed_config=str(path), ds_pipeline_enabled=pipeline, optimizer=optimizer_name,
                  num_layers=4, pipeline_model_parallel_size=2, num_experts=[1], expert_interval=2)
    return types.SimpleNamespace(**{**fields, **dict(model)})


@pytest.mark.parametrize("config, pipeline, message", [
    ({"zero_optimization": {"stage": 2}}, True, r"^ZeRO stage 2 \(.*\) with the pipeline model: DeepSpeed's pipeline engine"),
    ({"zero_optimization": {"stage": 0}, "bf16": {"enabled": True}}, True,
     r"^--optimizer muon does not run under DeepSpeed's bf16 optimizer, which DeepSpeed uses for bf16 on its pipeline "
     r"engine at ZeRO 0; use ZeRO 1$"),
    ({"zero_optimization": {"stage": 1}, "bf16": {"enabled": True}, "data_types": {"grad_accum_dtype": "fp32"}}, False,
     r"at ZeRO 1 with data_types.grad_accum_dtype fp32; drop that setting .* or use ZeRO 2$"),
])
def test_layouts_the_plugins_cannot_run_are_one_line(tmp_path, config, pipeline, message):
    owner = arguments.Ownership("all", True, True, True, True, "muon", "cosine")
    with pytest.raises(ValueError, match=message):
        layouts.check(_layout_args(tmp_path, pipeline=pipeline, **config), owner)


@pytest.mark.parametrize("layers, interval, refused", [(2, 2, True), (4, 3, True), (2, 1, False), (4, 2, False)])
def test_experts_at_pipeline_parallel_need_an_moe_layer_on_the_first_stage(tmp_path, layers, interval, refused):
    """Measured with the fork alone: 2 layers, --expert-interval 2 (layer 2 is the MoE one) fails at PP 2
    in DeepSpeed's pipeline backward; --expert-interval 1 trains."""
    args = _layout_args(tmp_path, model={"num_layers": layers, "num_experts": [2], "expert_interval": interval},
                        zero_optimization={"stage": 1})
    owner = arguments.Ownership("all", True, True, True, True, "muon", "cosine")
    if refused:
        with pytest.raises(ValueError, match=r"^--num-experts with the pipeline model: the first of 2 pipeline stages "
                                             rf"holds no MoE layer \(one layer in --expert-interval {interval} is one\)"):
            layouts.check(args, owner)
    else:
        layouts.check(args, owner)


@pytest.mark.parametrize("config, pipeline", [
    ({"zero_optimization": {"stage": 1}, "bf16": {"enabled": True}}, True),  # ZeRO's own optimizer: Muon runs
    ({"zero_optimization": {"stage": 0}, "bf16": {"enabled": True}}, False),  # no pipeline: not the bf16 optimizer
    ({"zero_optimization": {"stage": 2}}, False),
])
def test_layouts_the_plugins_run_pass(tmp_path, config, pipeline):
    owner = arguments.Ownership("all", True, True, True, True, "muon", "cosine")
    layouts.check(_layout_args(tmp_path, pipeline=pipeline, **config), owner)
    layouts.check(_layout_args(tmp_path, "adamw", pipeline=pipeline, **config), owner)  # AdamW runs under it too


def test_per_role_multipliers_keep_one_group_per_role():
    args = _our_args("--optimizer", "adamw", "--parametrization", "mup", "--hidden-size", "64", "--mup-base-hidden", "32")
    groups = optimizer.build([FakeForkModel()], args, project_api.parametrization_for(args)).param_groups
    assert {g["role"]: g["lr_mult"] for g in groups}["hidden"] == pytest.approx(0.5) and len(groups) == 5


# -- the scheduler adapter -----------------------------------------------------------------------


def _fork_scheduler(*argv):
    args = _our_args("--lr", "1e-3", "--min-lr", "1e-5", "--lr-warmup-iters", "2", *argv)
    opt = torch.optim.SGD([{"params": [torch.nn.Parameter(torch.zeros(2))], "lr_mult": 0.5, "wd_mult": 1.0}], lr=0.0)
    return scheduler.ForkScheduler(project_api.param_scheduler(opt, args)), opt, args


def test_the_adapter_sets_the_lr_of_the_samples_consumed_and_saves_both_formats():
    from megatron_ext.schedules.common.scheduler import build_schedule

    adapter, opt, args = _fork_scheduler()
    curve = build_schedule(args)
    assert opt.param_groups[0]["lr"] == 0.0  # iteration 1 trains at lr(0), as the fork's own scheduler
    for step in range(1, 21):
        adapter.step(increment=4)
        assert opt.param_groups[0]["lr"] == pytest.approx(0.5 * curve.lr(4.0 * step), rel=1e-12)
    state = adapter.state_dict()
    assert state["num_steps"] == 80 and state["lr_decay_style"] == "cosine" and state["max_lr"] == 1e-3
    fresh, opt2, _ = _fork_scheduler()
    fresh.load_state_dict(state)
    assert fresh.num_steps == 80 and opt2.param_groups[0]["lr"] == opt.param_groups[0]["lr"]


def test_a_checkpoint_of_the_forks_own_scheduler_resumes_under_our_rules():
    fork_state = {"max_lr": 1e-3, "lr_warmup_steps": 8, "lr_warmup_tokens": None, "num_steps": 40, "num_tokens": 2560,
                  "lr_decay_style": "cosine", "lr_decay_steps": 80, "lr_decay_tokens": None, "min_lr": 1e-5,
                  "start_wd": 0.01, "end_wd": 0.01, "wd_incr_style": "constant", "wd_incr_steps": 80}
    adapter, opt, _ = _fork_scheduler()
    adapter.load_state_dict(dict(fork_state))
    assert adapter.num_steps == 40 and opt.param_groups[0]["lr"] > 0
    other, _, _ = _fork_scheduler("--lr", "2e-3")
    with pytest.raises(project_api.schedule_resume_error(), match=r"max_lr \(--lr\) is 0.001 in the checkpoint"):
        other.load_state_dict(dict(fork_state))


# -- our flags on the fork's parser --------------------------------------------------------------


def fork_like_parser():
    """The shapes of the fork's own definitions that matter (measured in its arguments.py)."""
    p = argparse.ArgumentParser(prog="pretrain_gpt_alcf.py", allow_abbrev=False)
    p.add_argument("--optimizer", type=str, default="adam", choices=["adam", "adamw", "muon", "adam8bit"])
    p.add_argument("--lr-decay-style", type=str, default="linear", choices=["constant", "linear", "cosine"])
    p.add_argument("--muon-nesterov", type=bool, default=True)
    p.add_argument("--muon-ns-steps", type=int, default=6)
    p.add_argument("--muonadamw-eps", type=float, default=1e-12)
    p.add_argument("--lr_constant_plus_cooldown", action="store_true")
    p.add_argument("--lr_constant_plus_cooldown_frac", type=float, default=0.05)
    p.add_argument("--init-method-std", type=float, default=0.02)
    for flag, kind, default in (("--lr", float, None), ("--min-lr", float, 0.0), ("--hidden-size", int, 64),
                                ("--num-layers", int, 2), ("--num-attention-heads", int, 4),
                                ("--train-iters", int, 20), ("--micro-batch-size", int, 4),
                                ("--global-batch-size", int, 4), ("--seq-length", int, 64),
                                ("--weight-decay", float, 0.01), ("--zero-stage", int, 1)):
        p.add_argument(flag, type=kind, default=default)
    p.add_argument("--cpu-optimizer", action="store_true")
    p.add_argument("--weight-decay-incr-style", default="constant")
    p.add_argument("--start-weight-decay", type=float)
    p.add_argument("--end-weight-decay", type=float)
    p.add_argument("--untie-embeddings-and-output-weights", action="store_true")
    return p


def _parse(mode, *argv):
    fork_args = arguments.ForkArguments(mode)
    parser = fork_args.extend(fork_like_parser())
    args = parser.parse_args(["--lr", "1e-3", *argv])
    args.world_size = 1
    owner = fork_args.resolve(args)
    arguments.check(args, owner)
    return args, owner


def test_reused_flags_take_our_defaults_when_our_plugin_runs_and_the_forks_otherwise():
    ours, owner = _parse("all", "--optimizer", "muon")
    assert owner.optimizer and ours.muon_ns_steps == 5 and ours.muonadamw_eps == 1e-8
    theirs, owner = _parse("new", "--optimizer", "muon")
    assert not owner.optimizer and theirs.muon_ns_steps == 6 and theirs.muonadamw_eps == 1e-12


@pytest.mark.parametrize("argv, expected", [([], True), (["--muon-nesterov"], True), (["--muon-nesterov", "False"], False),
                                            (["--muon-nesterov", "false"], False), (["--no-muon-nesterov"], False)])
def test_the_type_bool_trap_is_a_real_boolean(argv, expected):
    assert _parse("all", "--optimizer", "muon", *argv)[0].muon_nesterov is expected


def test_our_spellings_names_and_values_reach_the_forks_parser():
    args, owner = _parse("all", "--lr-decay-style", "constant", "--lr-constant-plus-cooldown", "--optimizer", "lion",
                         "--init-method-std", "auto")
    assert args.lr_constant_plus_cooldown and args.lr_constant_plus_cooldown_frac is None  # ours: default 0.05 applied later
    assert owner.optimizer and owner.schedule and args.optimizer == "lion"
    assert args.init_method_std == pytest.approx(math.sqrt(2 / (5 * 64)))


def test_a_bad_value_is_one_line(capsys):
    with pytest.raises(SystemExit) as exit_info:
        _parse("all", "--optimizer", "sgdd")
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("pretrain_gpt_alcf.py: error: argument --optimizer: unknown name 'sgdd'")


def test_an_init_flag_under_new_switches_our_init_on():
    assert not _parse("new", "--optimizer", "adamw")[1].init
    assert _parse("new", "--optimizer", "adamw", "--no-scaled-output-projection-init")[1].init


def test_a_parametrization_with_the_forks_own_optimizer_is_refused():
    with pytest.raises(ValueError, match=r"^--parametrization mup sets per-role LRs that the fork's own --optimizer adamw"):
        _parse("new", "--optimizer", "adamw", "--parametrization", "mup")


def test_a_flag_of_a_family_the_fork_runs_is_refused():
    with pytest.raises(ValueError, match="^--lr-wsd-decay-fraction has no effect: --lr-decay-style cosine is Megatron"):
        _parse("new", "--lr-decay-style", "cosine", "--lr-wsd-decay-fraction", "0.1")


def test_the_engine_the_forks_deepspeed_json_gives_is_the_one_checked(tmp_path):
    """DeepSpeed runs the fork's JSON, not its --zero-stage flag: a JSON at ZeRO 3 refuses Muon even
    when the flag says 1 (the rule our trainer applies to its merged config)."""
    ds = tmp_path / "ds.json"
    ds.write_text('{"zero_optimization": {"stage": 3}, "bf16": {"enabled": true}}')
    fork_args = arguments.ForkArguments("all")
    parser = fork_args.extend(fork_like_parser())
    parser.add_argument("--deepspeed", action="store_true")
    parser.add_argument("--deepspeed_config", type=str)
    args = parser.parse_args(["--lr", "1e-3", "--optimizer", "muon", "--zero-stage", "1", "--deepspeed",
                              "--deepspeed_config", str(ds)])
    args.world_size = 1
    assert project_api._engine_of(args).zero_stage == 3 and project_api._engine_of(args).precision == "bf16"
    with pytest.raises(ValueError, match=r"^--optimizer muon supports --zero-stage 0, 1 and 2, not 3"):
        arguments.check(args, fork_args.resolve(args))
    ds.write_text("{not json")
    with pytest.raises(ValueError, match=r"^--deepspeed_config .*ds.json: "):
        project_api._engine_of(args)


def test_the_forks_view_derives_batch_and_length_by_our_rules():
    args, _ = _parse("all", "--optimizer", "adamw", "--global-batch-size", "8", "--micro-batch-size", "2")
    view = arguments.our_view(args)
    assert (view.data_parallel_size, view.global_batch_size) == (1, 8)
    args.world_size, args.train_iters, args.train_samples = 2, None, 100
    assert arguments.our_view(args).train_iters == 12  # 100 samples // 8, rounding down as our plan does
    args.global_batch_size = 6
    with pytest.raises(ValueError, match=r"^--global-batch-size 6 is not divisible by data-parallel size 2 x "
                                         r"--micro-batch-size 2$"):
        arguments.our_view(args)


# -- activation ----------------------------------------------------------------------------------


def test_modes():
    assert [activation.parse_mode(v) for v in (None, "", "off", "new", "ALL", "1")] == ["off", "off", "off", "new", "all", "all"]
    with pytest.raises(activation.ActivationError, match=r"^MEGATRON_EXT_PLUGINS='al': expected one of all, new, off$"):
        activation.parse_mode("al")


def _python(code, env_extra, cwd=None):
    env = {k: v for k, v in os.environ.items() if k != "MEGATRON_EXT_PLUGINS"}
    env.update(env_extra)
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=cwd, timeout=120)


LOADED = "import sys; print(sorted(m for m in sys.modules if m.startswith(('megatron_ext', 'megatron.'))))"


def test_the_startup_hook_costs_nothing_unset_and_only_registers_when_set():
    pth = os.path.join(sysconfig.get_paths()["purelib"], "megatron_ext_plugins.pth")
    assert os.path.isfile(pth), "megatron_ext is not installed with its start-up hook (pip install -e .)"
    assert _python(LOADED, {}).stdout.strip() == "[]"
    assert _python(LOADED, {"MEGATRON_EXT_PLUGINS": "off"}).stdout.strip() == "[]"
    loaded = _python(LOADED, {"MEGATRON_EXT_PLUGINS": "all"}).stdout
    assert "megatron_ext.megatron_deepspeed.startup" in loaded and "megatron." not in loaded


def test_a_regular_install_puts_the_startup_hook_in_site_packages(tmp_path):
    proc = subprocess.run([sys.executable, "setup.py", "-q", "build_py", "--build-lib", str(tmp_path)], cwd=REPO,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    line = (tmp_path / "megatron_ext_plugins.pth").read_text()
    assert line.startswith("import os; ") and "megatron_ext.megatron_deepspeed.startup" in line
    assert (tmp_path / "megatron_ext" / "megatron_deepspeed" / "startup.py").is_file()


FAKE_FORK = {
    "megatron/__init__.py": "def get_args(): pass\ndef get_timers(): pass\ndef get_tokenizer(): pass\n"
                            "def get_num_microbatches(): pass\n",
    "megatron/arguments.py": "def parse_args(extra_args_provider=None, ignore_unknown_args=False): pass\n"
                             "def validate_args(args, defaults={}): pass\n"
                             "def core_transformer_config_from_args(args): pass\n",
    "megatron/initialize.py": "from megatron.arguments import parse_args, validate_args\n",
    "megatron/utils.py": "def get_ltor_masks_and_position_ids(*a): pass\n",
    "megatron/training.py": textwrap.dedent("""\
        import megatron.initialize
        def get_model(model_provider_func, model_type=None, wrap_with_ddp=True): pass
        def get_megatron_optimizer(model, no_weight_decay_cond=None, scale_lr_cond=None, lr_mult=1.0): pass
        def get_optimizer_param_scheduler(optimizer): pass
        def setup_model_and_optimizer(model_provider_func, model_type): pass
        def load_checkpoint(model, optimizer, opt_param_scheduler): pass
        def save_checkpoint(iteration, model, optimizer, opt_param_scheduler): pass
        def train(forward_step_func, model, optimizer, opt_param_scheduler, train_data_iterator, valid_data_iterator): pass
        def evaluate(forward_step_func, data_iterator, model): pass
        """),  # no train_step: another commit of the fork
}


def test_a_missing_hook_point_stops_the_run_in_one_line_before_anything_is_patched(tmp_path):
    for path, text in FAKE_FORK.items():
        (tmp_path / path).parent.mkdir(exist_ok=True)
        (tmp_path / path).write_text(text)
    code = ("import sys; sys.path.insert(0, '.'); import megatron_ext.megatron_deepspeed as m; m.install('all'); "
            "import megatron.training")
    proc = _python(code, {}, cwd=str(tmp_path))
    lines = noise_free(proc.stderr)
    assert proc.returncode == 2 and len(lines) == 1, proc.stderr
    assert lines[0].startswith("megatron_ext: error: this Megatron-DeepSpeed checkout does not fit: megatron.training "
                               "has no train_step (the hook point that runs SophiaG's curvature pass)")


def test_a_bad_mode_in_the_environment_is_one_line_once_the_fork_starts(tmp_path):
    for path, text in FAKE_FORK.items():
        (tmp_path / path).parent.mkdir(exist_ok=True)
        (tmp_path / path).write_text(text)
    quiet = _python("print('other programs run')", {"MEGATRON_EXT_PLUGINS": "al"}, cwd=str(tmp_path))
    assert quiet.returncode == 0 and quiet.stdout.strip() == "other programs run"
    proc = _python("import sys; sys.path.insert(0, '.'); import megatron.training", {"MEGATRON_EXT_PLUGINS": "al"},
                   cwd=str(tmp_path))
    assert proc.returncode == 2
    assert noise_free(proc.stderr) == ["megatron_ext: error: MEGATRON_EXT_PLUGINS='al': expected one of all, new, off"]

