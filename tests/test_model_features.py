"""Model features are records (megatron_ext/models/feature.py): a feature registered once reaches
every consumer (the parser, the run plan's checks and derived fields, the start-up rows, the
model's config and layer specs, export-hf's and convert's refusals) with no edit anywhere else."""
import types

import pytest

from conftest import TINY, plan_error
from megatron_ext.argtypes import positive_int
from megatron_ext.models import features
from megatron_ext.models.feature import Feature, Support, saved_value

BASE = TINY + ["--mock-data", "--train-iters", "1"]


def _widths(saved):
    return [f"--tiny-width {saved_value(saved, 'tiny_width')}"] if saved_value(saved, "tiny_width") else []


@pytest.fixture
def tiny_feature(monkeypatch):
    """A feature with every hook; ``calls`` records what the model hooks saw."""
    calls = []

    def add_arguments(g):
        g.add_argument("--tiny-width", type=positive_int, default=None, help="a test feature's width")

    def validate(a):
        if a.tiny_width is not None and a.tiny_width > a.ffn_hidden_size:  # needs the final ffn size
            raise ValueError(f"--tiny-width {a.tiny_width} is larger than --ffn-hidden-size {a.ffn_hidden_size}")

    def layer_specs(specs, config, args):
        calls.append(("layer_specs", config.disable_parameter_transpose_cache, specs[0] is not None))
        return specs

    feature = Feature(
        name="tiny", title="a tiny test feature", add_arguments=add_arguments, validate=validate,
        plan_fields=lambda a: {"tiny_area": (a.tiny_width or 0) ** 2},
        config_kwargs=lambda a: {"disable_parameter_transpose_cache": a.tiny_width is not None},
        layer_specs=layer_specs, summary=lambda a: f"width {a.tiny_width}" if a.tiny_width else "", row="tiny",
        export_hf=Support(_widths, "no Hugging Face class computes it"),
        convert=Support(_widths, "the fork has no tiny feature"))
    monkeypatch.setattr(features, "FEATURES", list(features.FEATURES))
    features.register(feature)
    return calls


def test_a_registered_feature_reaches_every_consumer(tiny_feature, capsys, mcore):
    from megatron_ext.arguments import build_parser
    from megatron_ext.hf import HFError
    from megatron_ext.hf.config_mapping import export_architecture
    from megatron_ext.megatron_deepspeed import checkpoints
    from megatron_ext.models.gpt import build_model, transformer_config
    from megatron_ext.plan import parse_plan

    parser = build_parser()
    assert "a tiny test feature" in parser.format_help() and "--tiny-width" in parser.format_help()
    # the plan: its check (after the model shape is final: swiglu's ffn of 64 x 8/3 is 192) and derived field
    assert plan_error(capsys, BASE + ["--tiny-width", "200"]) == \
        "megatron_ext.train: error: --tiny-width 200 is larger than --ffn-hidden-size 192"
    plan = parse_plan(BASE + ["--tiny-width", "8"], world_size=1)
    assert plan.args.tiny_area == 64
    rows = dict(plan.rows())
    assert rows["tiny"] == "width 8" and list(rows).index("tiny") > list(rows).index("parametrization")
    assert "tiny" not in dict(parse_plan(BASE, world_size=1).rows())  # no row while the feature is off
    # the model: its config field and its layer-spec hook
    assert transformer_config(plan.args, plan.parametrization).disable_parameter_transpose_cache
    build_model(plan.args, 1000, plan.parametrization)
    assert tiny_feature == [("layer_specs", True, True)]
    # the tools refuse what its record says they cannot carry, in one line
    with pytest.raises(HFError, match=r"^--tiny-width 8: no Hugging Face class computes it$"):
        export_architecture(types.SimpleNamespace(**vars(plan.args)))
    source = checkpoints.Source("global_step1", checkpoints.OURS, {"args": dict(vars(plan.args))}, [])
    with pytest.raises(checkpoints.ConvertError, match=r"^global_step1: --tiny-width 8: the fork has no tiny feature$"):
        checkpoints._refuse_ours_to_fork(source)


def test_the_built_in_records_keep_their_order_and_names_are_unique():
    names = [f.name for f in features.FEATURES]
    # the backend's layer-spec rewrite (sdpa) runs before multi-latent attention's local core attention
    assert names.index("attention backend") < names.index("multi-latent attention")
    with pytest.raises(ValueError, match="already registered"):
        features.register(features.FEATURES[0])


@pytest.mark.parametrize("saved, tool, expected", [
    ({"attention_backend": "te"}, "export_hf", "--attention-backend te: Transformer Engine's parameter names"),
    ({"qk_layernorm": True}, "export_hf", "--qk-layernorm without --multi-latent-attention: no Hugging Face"),
    ({"qk_layernorm": True, "multi_latent_attention": True}, "export_hf", None),
    ({"num_experts": 8, "mtp_num_layers": 1}, "export_hf", None),
    ({"attention_backend": "sdpa"}, "convert", None),
    ({"num_experts": 8, "mtp_num_layers": 1}, "convert", "--mtp-num-layers 1: no counterpart in Megatron-DeepSpeed's"),
    ({"num_experts": 8, "moe_router_topk": 2, "ffn_hidden_size": 64}, "convert", None),  # DeepSpeed-MoE's top-2
    ({"num_experts": 8, "moe_router_topk": 2, "moe_router_pre_softmax": True, "moe_router_score_function": "sigmoid",
      "ffn_hidden_size": 64, "moe_ffn_hidden_size": 32}, "convert",
     "--moe-router-topk 2 with --moe-router-pre-softmax, --moe-router-score-function sigmoid, --moe-ffn-hidden-size 32: "),
    ({"multi_latent_attention": True, "qk_layernorm": True}, "convert", "--multi-latent-attention, --qk-layernorm: "),
    ({"qk_layernorm": True, "attention_backend": "te"}, "convert", "--attention-backend te: "),
])
def test_what_the_tools_carry_is_the_records_data(saved, tool, expected):
    problem = features.refusal(tool, saved)
    assert problem == expected if expected is None else problem.startswith(expected), problem
