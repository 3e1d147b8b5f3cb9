"""megatron-ext import-hf on tiny transformers models built here: a Llama with GQA and Llama 3.x
rope scaling, a tied-embedding Llama and a Mixtral; our model's logits within 1e-4 of transformers'
(fp32); import then export gives the same bits (also through a TP=2 import, and through the trainer
loading it with --finetune at TP=2 and saving it again); a continued-pretraining run from an import
trains; the flags file and train_alcf.env describe the model; hub names through the local cache;
one-line refusals."""
import concurrent.futures
import json
import os
import shlex
import types

import pytest
import torch

from conftest import error_lines, read_metrics, run_module, run_trainer
from hf_fixtures import command_env, fake_hub_cache, one_process_megatron, tiny_hf_model  # noqa: F401 (fixtures)

TOL = 1e-4
LLAMA3_ROPE = {"rope_type": "llama3", "rope_theta": 10000.0, "factor": 32.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
MODELS = {
    "llama3": ("LlamaForCausalLM", dict(rope_parameters=LLAMA3_ROPE, rms_norm_eps=1e-5)),
    "tied": ("LlamaForCausalLM", dict(tie_word_embeddings=True, num_key_value_heads=4, max_position_embeddings=256)),
    "mixtral": ("MixtralForCausalLM", dict(num_local_experts=4, num_experts_per_tok=2)),
}


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("hf_models")
    return {name: tiny_hf_model(root / name, arch, **config) for name, (arch, config) in MODELS.items()}


def do_import(source, out, **options):
    from megatron_ext.hf.importer import ImportOptions, import_hf

    options.setdefault("seq_length", 64)
    return import_hf(ImportOptions(source=str(source), out_dir=str(out), **options), say=lambda _: None)


def do_export(checkpoint, out, **options):
    from megatron_ext.hf.export import ExportOptions, export

    return export(ExportOptions(checkpoint=str(checkpoint), out_dir=str(out), **options), say=lambda _: None)


def safetensors(folder):
    from safetensors.torch import load_file

    return load_file(os.path.join(folder, "model.safetensors"))


@pytest.mark.parametrize("name", sorted(MODELS))
def test_imported_model_computes_transformers_logits(models, tmp_path, one_process_megatron, name):  # noqa: F811
    summary = do_import(models[name], tmp_path / "ck", verify=True)
    assert summary["architecture"] == MODELS[name][0]
    assert summary["verify"]["max_abs_logit_difference"] < TOL
    if name == "llama3":  # the comparison is sensitive to the rope scaling it must reproduce
        from transformers import AutoModelForCausalLM

        from megatron_ext.hf import checkpoint_reader, reference_model

        weights = checkpoint_reader.read(str(tmp_path / "ck"))
        assert weights.args.use_rope_scaling and weights.args.rope_scaling_factor == 32.0
        unscaled = types.SimpleNamespace(**{**vars(weights.args), "use_rope_scaling": False})
        theirs = AutoModelForCausalLM.from_pretrained(models[name], dtype=torch.float32).eval()
        diff, _ = reference_model.compare(reference_model.build(unscaled, weights.state), theirs, 400, 64)
        assert diff > 100 * TOL


@pytest.mark.parametrize("name,tp", [("llama3", 1), ("llama3", 2), ("tied", 2), ("mixtral", 1)])
def test_import_then_export_gives_the_same_bits(models, tmp_path, name, tp):
    do_import(models[name], tmp_path / "ck", tensor_model_parallel_size=tp)
    assert sorted(os.listdir(tmp_path / "ck" / "global_step0")) == [f"mp_rank_{r:02d}_model_states.pt" for r in range(tp)]
    do_export(tmp_path / "ck", tmp_path / "hf")
    source, back = safetensors(models[name]), safetensors(tmp_path / "hf")
    assert sorted(source) == sorted(back)
    for key in source:
        assert source[key].dtype == back[key].dtype and torch.equal(source[key], back[key]), key
    a, b = (json.loads(open(os.path.join(p, "config.json")).read()) for p in (models[name], tmp_path / "hf"))
    for key in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
                "intermediate_size", "rms_norm_eps", "tie_word_embeddings", "rope_parameters",
                "max_position_embeddings", "num_local_experts", "num_experts_per_tok"):
        assert a.get(key) == b.get(key), key


def test_flags_file_and_train_alcf_env_describe_the_model(models, tmp_path):
    from megatron_ext.arguments import build_parser
    from megatron_ext.launcher.resolve import resolve

    summary = do_import(models["llama3"], tmp_path / "ck", tensor_model_parallel_size=2)
    lines = [l for l in open(summary["launch"]["args_file"]).read().splitlines() if not l.startswith("#")]
    flags = [word for line in lines for word in shlex.split(line)]
    args = build_parser().parse_args(flags + ["--mock-data", "--train-iters", "1"])
    assert (args.num_layers, args.hidden_size, args.ffn_hidden_size, args.num_key_value_heads) == (2, 64, 96, 2)
    assert (args.rope_theta, args.use_rope_scaling, args.rope_scaling_factor, args.norm_epsilon) == (10000, True, 32.0, 1e-5)
    assert args.finetune and args.load == str(tmp_path / "ck") and args.tensor_model_parallel_size == 2
    assert args.tokenizer_type == "HFTokenizer" and os.path.isfile(os.path.join(args.tokenizer_model, "tokenizer.json"))
    # train_alcf.sh with the env file (as `source` would set it): the launcher's command carries the model
    env = {}
    for line in open(summary["launch"]["env_file"]).read().splitlines():
        if line.startswith("export "):
            key, value = line[len("export "):].split("=", 1)
            env[key] = shlex.split(value)[0] if value else ""
    data_list = tmp_path / "list.txt"
    data_list.write_text("1.0 /nowhere/prefix corpus\n")
    env["DATA_FILE_LIST"] = str(data_list)
    # the data list names no real data: plan the command without resolving the files
    launch = resolve(env, shlex.split(env.pop("TRAIN_ALCF_EXTRA_ARGS")), "/tmp", accelerator=("cpu", 2),
                     check_files=False)
    argv = launch.trainer_argv
    final = build_parser().parse_args(argv)
    assert (final.num_layers, final.hidden_size, final.num_key_value_heads, final.seq_length) == (2, 64, 2, 64)
    assert final.use_rope_scaling and final.max_position_embeddings == 16384 and final.finetune
    assert final.load == str(tmp_path / "ck") and final.tensor_model_parallel_size == 2


@pytest.mark.slow
def test_trainer_continues_an_import(models, tmp_path):
    """TP=2: the trainer loads the import with --finetune and saves it again unchanged (lr 0), export
    gives the source's bits; MoE: a continued-pretraining run trains."""
    llama = do_import(models["llama3"], tmp_path / "llama", tensor_model_parallel_size=2)
    mixtral = do_import(models["mixtral"], tmp_path / "mixtral")

    def flags(summary):
        lines = [l for l in open(summary["launch"]["args_file"]).read().splitlines() if not l.startswith("#")]
        return [w for line in lines for w in shlex.split(line)] + [
            "--mock-data", "--micro-batch-size", "2", "--eval-iters", "0", "--log-interval", "1"]

    jobs = [
        lambda: run_trainer(flags(llama) + ["--train-iters", "1", "--lr", "0", "--weight-decay", "0",
                                           "--save", str(tmp_path / "same"), "--save-interval", "1"], nproc=2),
        lambda: run_trainer(flags(mixtral) + ["--train-iters", "12", "--lr", "3e-3", "--lr-warmup-iters", "0",
                                             "--metrics-file", str(tmp_path / "cpt.jsonl")]),
    ]
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        for future in [pool.submit(job) for job in jobs]:
            future.result()
    do_export(tmp_path / "same", tmp_path / "hf")
    source, back = safetensors(models["llama3"]), safetensors(tmp_path / "hf")
    assert all(torch.equal(source[k], back[k]) for k in source)
    losses = [r["lm_loss"] for _, r in sorted(read_metrics(tmp_path / "cpt.jsonl").items())]
    assert len(losses) == 12 and all(l == l for l in losses)  # finite
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3 - 0.05, losses


def test_hub_names_resolve_through_the_local_cache_only(models, tmp_path, monkeypatch):
    from huggingface_hub import constants

    from megatron_ext.data.hub import HubError
    from megatron_ext.data.tokenizers import build_tokenizer

    cache = tmp_path / "hub"
    fake_hub_cache(cache, "tiny-org/tiny-llama", models["tied"])
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    summary = do_import("tiny-org/tiny-llama", tmp_path / "ck")
    assert summary["folder"].startswith(str(cache)) and summary["architecture"] == "LlamaForCausalLM"
    tok = build_tokenizer("HFTokenizer", tokenizer_model="tiny-org/tiny-llama")
    assert tok.vocab_size == 400 and tok.eod == 2
    for call in (lambda: do_import("tiny-org/not-cached", tmp_path / "ck2"),
                 lambda: build_tokenizer("HFTokenizer", tokenizer_model="tiny-org/not-cached")):
        with pytest.raises(HubError) as e:
            call()
        message = str(e.value)
        assert "\n" not in message and "not in the local Hugging Face cache" in message
        assert "hf download tiny-org/not-cached" in message and str(cache) in message
    assert not (tmp_path / "ck2").exists()


def _error(proc):
    assert proc.returncode == 2, proc.stderr[-3000:]
    lines = error_lines(proc.stderr)
    assert len(lines) == 1, proc.stderr[-3000:]
    return lines[0]


def _config_only(folder, architecture, **config):
    import transformers

    os.makedirs(folder)
    if architecture == "GPT2LMHeadModel":
        cfg = transformers.GPT2Config(vocab_size=400, n_embd=64, n_layer=2, n_head=4)
    else:
        cfg = getattr(transformers, architecture.replace("ForCausalLM", "Config"))(
            vocab_size=400, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4, **config)
    cfg.architectures = [architecture]
    cfg.save_pretrained(str(folder))
    return str(folder)


def test_bad_inputs_are_one_line_before_any_work(models, tmp_path, capsys, command_env):  # noqa: F811
    from megatron_ext.cli import main

    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "x").write_text("keep")
    cases = [
        ([str(tmp_path / "missing"), str(tmp_path / "o")], "no such file or directory"),
        ([str(busy), str(tmp_path / "o")], "no config.json"),
        ([_config_only(tmp_path / "gpt2", "GPT2LMHeadModel"), str(tmp_path / "o")],
         "architecture GPT2LMHeadModel is not supported"),
        ([_config_only(tmp_path / "yarn", "LlamaForCausalLM", rope_parameters={
            "rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0}), str(tmp_path / "o")], "rope_scaling='yarn'"),
        ([_config_only(tmp_path / "window", "MistralForCausalLM", sliding_window=64, max_position_embeddings=4096),
          str(tmp_path / "o")], "sliding_window=64"),
        ([_config_only(tmp_path / "top1", "MixtralForCausalLM", num_local_experts=4, num_experts_per_tok=1),
          str(tmp_path / "o")], "num_experts_per_tok=1"),
        ([models["tied"], str(tmp_path / "o"), "--tp", "3"], "--tensor-model-parallel-size 3 does not divide"),
        ([models["tied"], str(busy)], "exists and is not empty"),
    ]
    proc = run_module("megatron_ext.cli", ["import-hf", "no-such-org/no-such-model", str(tmp_path / "o")],
                      env={"HF_HUB_CACHE": str(tmp_path / "empty-cache")})  # the real command line, offline
    assert "not in the local Hugging Face cache" in _error(proc)
    for argv, expected in cases:
        capsys.readouterr()
        code = main(["import-hf", *argv])
        err = capsys.readouterr().err
        line = _error(types.SimpleNamespace(returncode=code, stderr=err))
        assert expected in line, line
    assert not (tmp_path / "o").exists() and os.listdir(busy) == ["x"]
    assert not [n for n in os.listdir(tmp_path) if n.startswith(".export-hf.")]
