"""The LR and expert search guide through ``megatron-ext sweep``: variant rules (top-1 softmax gets
--moe-router-pre-softmax, top-2 runs as written), the guide's views as recommendation rules
(final loss, stability, convergence speed = iterations to a target loss, efficiency = tokens/s),
and the committed expert-search configs, every variant's command checked by the trainer."""
import math
import os

import pytest

from conftest import REPO, TINY
from megatron_ext.commands.sweep import run_argv
from megatron_ext.sweeps.recommend import instability, recommend
from megatron_ext.sweeps.spec import SweepError, apply_rules, expand, load_config, parse_grid, parse_rule

BASE = TINY + ["--mock-data"]
GRID = ["--grid", "num_experts=4,8,16", "moe_router_topk=1,2"]
TOP1 = "moe_router_topk=1: moe_router_pre_softmax=true"


def test_rules_set_per_variant_values():
    variants = apply_rules(expand(parse_grid(["num_experts=4,8", "moe_router_topk=1,2"]), []), [parse_rule(TOP1, "r")])
    assert variants == [
        {"num_experts": "4", "moe_router_topk": "1", "moe_router_pre_softmax": "true"},
        {"num_experts": "4", "moe_router_topk": "2"},
        {"num_experts": "8", "moe_router_topk": "1", "moe_router_pre_softmax": "true"},
        {"num_experts": "8", "moe_router_topk": "2"},
    ]
    # a variant's own setting wins over a rule
    own = apply_rules([{"moe_router_topk": "1", "moe_router_pre_softmax": "false"}], [parse_rule(TOP1, "r")])
    assert own == [{"moe_router_topk": "1", "moe_router_pre_softmax": "false"}]
    with pytest.raises(SweepError, match="no variant sets moe_router_topk"):
        apply_rules([{"lr": "1"}], [parse_rule(TOP1, "r")])
    with pytest.raises(SweepError, match="matches no variant"):
        apply_rules([{"moe_router_topk": "2"}], [parse_rule(TOP1, "r")])
    with pytest.raises(SweepError, match="is not 'KEY=V ...: KEY=V ...'"):
        parse_rule("moe_router_topk=1 moe_router_pre_softmax=true", "--rule")


def test_the_guides_grid_runs_as_written_with_the_rule(tmp_path, capsys):
    """Without the rule the top-1 softmax variants are refused before anything runs (in one line);
    with it every variant's command passes the trainer's checks and only top-1 gets pre-softmax."""
    out = tmp_path / "sweep"
    assert run_argv([*GRID, "--steps", "2", "--out", str(out), "--dry-run", "--", *BASE]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "variant num_experts=4,moe_router_topk=1" in err[0] and "--moe-router-pre-softmax" in err[0]
    assert run_argv([*GRID, "--rule", TOP1, "--steps", "2", "--out", str(out), "--dry-run", "--", *BASE]) == 0
    commands = [line for line in capsys.readouterr().out.splitlines() if line and not line.startswith("#")]
    assert len(commands) == 6 and not out.exists()
    for line in commands:
        assert ("--moe-router-pre-softmax" in line) == ("--moe-router-topk 1" in line), line


def test_committed_expert_search_configs_expand_to_the_guides_grid():
    for name, steps in (("expert_search.yaml", 800), ("expert_search_cpu.yaml", 200)):
        cfg = load_config(os.path.join(REPO, "experiments", name))
        assert cfg["grid"] == {"NUM_EXPERTS": ["4", "8", "16"], "MOE_TOPK": ["1", "2"]} and cfg["steps"] == steps
        variants = apply_rules(expand(cfg["grid"], []), cfg["rules"])
        assert len(variants) == 6
        assert all((v.get("MOE_ROUTER_PRE_SOFTMAX") == "1") == (v["MOE_TOPK"] == "1") for v in variants)
    assert load_config(os.path.join(REPO, "experiments", "expert_search.yaml"))["eval_interval"] == 100


def _result(name, train, valid, tokens_per_second, status="finished"):
    return {"name": name, "values": {"num_experts": name}, "status": status, "final_val_loss": valid[-1][1],
            "final_train_loss": train[-1][1], "tokens_per_second": tokens_per_second,
            "curves": {"val_loss": valid, "train_loss": train}, "instability": instability(train, valid)}


def test_recommendation_rules_of_the_guide():
    results = [
        # lowest final loss, but a bumpy train loss and slow
        _result("4", [(10, 7.0), (20, 5.0), (30, 5.6), (40, 4.0)], [(20, 5.2), (40, 4.1)], 900.0),
        # smooth, reaches 4.6 first, the slowest to train per token
        _result("8", [(10, 7.0), (20, 5.5), (30, 5.0), (40, 4.5)], [(20, 4.45), (40, 4.3)], 800.0),
        # fastest per token, never below 4.5
        _result("16", [(10, 7.0), (20, 6.0), (30, 5.5), (40, 5.0)], [(20, 5.5), (40, 4.5)], 1500.0),
        _result("32", [(10, 7.0), (20, math.nan)], [(20, math.nan)], 2000.0, status="failed"),
    ]
    rec = recommend(results, "val_loss", ["num_experts"])
    by = rec["by_rule"]
    assert rec["best"]["name"] == "4" and by["val_loss"]["name"] == "4"
    assert by["stability"]["name"] == "8" and by["stability"]["max_loss_rise"] == 0.0
    assert results[0]["max_loss_rise"] == pytest.approx(5.6 / 5.0 - 1)
    # default target: the highest final validation loss of the finished variants (4.5): every one reaches it
    assert rec["target_loss"] == 4.5 and [r["steps_to_target"] for r in results] == [40, 20, 40, None]
    assert by["convergence"]["name"] == "8" and by["convergence"]["steps_to_target"] == 20
    assert by["efficiency"]["name"] == "16"  # 32 failed: never recommended
    rec = recommend(results, "convergence", ["num_experts"], target_loss=4.2)
    assert rec["best"]["name"] == "4" and [r["steps_to_target"] for r in results] == [40, None, None, None]
    assert "iterations to reach the target validation loss" in rec["rule"]
    rec = recommend(results, "stability", ["num_experts"])
    assert [r["name"] for r in rec["ranking"]] == ["8", "16", "4"]  # ties (0.0) broken by the lower final loss


@pytest.mark.slow
def test_the_expert_grid_trains_and_every_rule_recommends(tmp_path, capsys):
    """The six variants train for real (one trainer process each), and the recommendation names a
    best variant by each of the guide's views."""
    import json

    out = tmp_path / "experts"
    code = run_argv([*GRID, "--rule", TOP1, "--steps", "4", "--eval-interval", "2", "--out", str(out), "--",
                     *BASE, "--lr", "1e-2", "--micro-batch-size", "4"])
    printed = capsys.readouterr().out
    assert code == 0, printed
    rec = json.load(open(out / "recommendation.json"))
    assert len(rec["ranking"]) + len(rec["unstable"]) >= 6 and not rec["failed"]
    assert set(rec["by_rule"]) >= {"val_loss", "stability", "convergence", "efficiency"}
    assert "best by rule: " in printed
    for name in os.listdir(out):
        if name.startswith("num_experts="):
            command = json.load(open(out / name / "variant.json"))["command"]
            assert ("--moe-router-pre-softmax" in command) == ("moe_router_topk=1" in name), name
