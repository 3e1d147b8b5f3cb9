"""``megatron-ext run CONFIG.yaml``: OpenSeek-style experiment + job configs (Hydra ``defaults``,
``${experiment.x}`` interpolation, Megatron flag names as keys, a weight/prefix data_path), every
unknown or wrong key one line naming it, and a real run with everything in the experiment folder
(every rank's output in logs/, metrics with per-corpus losses, checkpoints, resume)."""
import glob
import json
import os
import shutil

import pytest

from conftest import REPO, error_lines
from megatron_ext.commands.run import run_argv
from megatron_ext.experiment_config import ConfigError, read

EXPERIMENT = """\
defaults:
  - _self_
  - train: train_tiny.yaml
experiment:
  exp_name: Tiny-Mixture
  exp_dir: {out}/${{experiment.exp_name}}
  dataset_base_dir: {data}
  seed: 7
  save_steps: 2
  load: null
  task: {{type: train, backend: megatron, entrypoint: flagscale/train/train_gpt.py}}
  runner: {{backend: torchrun, nnodes: 1, nproc_per_node: {nproc}}}
  envs: {{OMP_NUM_THREADS: 1}}
action: run
hydra:
  run:
    dir: ${{experiment.exp_dir}}/hydra
"""

JOB = """\
system:
  tensor_model_parallel_size: 1
  disable_bias_linear: true
  reset_position_ids: true
  reset_attention_mask: true
  overlap_grad_reduce: true
  precision:
    attention_softmax_in_fp32: true
  logging:
    log_interval: 1
  checkpoint:
    save_interval: ${experiment.save_steps}
    load: ${experiment.load}
model:
  num_layers: 2
  hidden_size: 64
  num_attention_heads: 4
  seq_length: 32
  swiglu: false
  untie_embeddings_and_output_weights: false
  multi_latent_attention: true
  kv_lora_rank: 16
  qk_head_dim: 16
  qk_pos_emb_head_dim: 8
  v_head_dim: 16
  num_experts: 4
  moe_layer_freq: "[0]+[1]*1"
  moe_router_topk: 2
  moe_grouped_gemm: true
  seed: ${experiment.seed}
  micro_batch_size: 2
  global_batch_size: 4
  train_iters: 3
  eval_interval: 2
  eval_iters: 1
  optimizer:
    weight_decay: 0.1
    lr_scheduler: {lr: 1.0e-3, lr_decay_style: cosine}
data:
  data_path:
    - 0.7
    - ${experiment.dataset_base_dir}/web/corpus_text_document
    - 0.3
    - ${experiment.dataset_base_dir}/books/corpus_text_document
  split: 90,10,0
  eval_per_corpus: true
  tokenizer:
    tokenizer_type: HFTokenizer
    tokenizer_path: ${experiment.dataset_base_dir}/tokenizer.json
"""


@pytest.fixture(scope="module")
def corpora(hf_corpus, tmp_path_factory):
    """Two corpora (the same documents) and the tokenizer under one base folder."""
    base = tmp_path_factory.mktemp("openseek_data")
    for name in ("web", "books"):
        os.makedirs(base / name)
        for ext in (".bin", ".idx"):
            shutil.copy(hf_corpus["prefix"] + ext, str(base / name / "corpus_text_document") + ext)
    shutil.copy(hf_corpus["tokenizer"], base / "tokenizer.json")
    return base


def write_pair(folder, data, nproc=1, experiment_edit=None, job_edit=None):
    """The experiment file and its job file in ``train/``, as OpenSeek lays them out."""
    exp = EXPERIMENT.format(out=folder / "out", data=data, nproc=nproc)
    job = JOB
    return _write_files(folder, "tiny", exp, job, experiment_edit, job_edit)


def _write_files(folder, name, exp, job, experiment_edit=None, job_edit=None):
    """``config_<name>.yaml`` and ``train/train_<name>.yaml`` (the texts edited first)."""
    exp, job = (experiment_edit or str)(exp), (job_edit or str)(job)
    os.makedirs(folder / "train", exist_ok=True)
    (folder / "train" / f"train_{name}.yaml").write_text(job)
    (folder / f"config_{name}.yaml").write_text(exp)
    return str(folder / f"config_{name}.yaml")


def test_keys_become_trainer_flags(tmp_path, corpora, capsys):
    config = write_pair(tmp_path, corpora)
    exp = read(config)
    argv = exp.argv
    assert exp.name == "Tiny-Mixture" and exp.folder == str(tmp_path / "out" / "Tiny-Mixture") and exp.nproc == 1
    assert argv[argv.index("--seed") + 1] == "7" and argv[argv.index("--save-interval") + 1] == "2"  # ${experiment.x}
    i = argv.index("--data-path")
    assert argv[i + 1:i + 5] == ["0.7", f"{corpora}/web/corpus_text_document", "0.3", f"{corpora}/books/corpus_text_document"]
    assert "--tie-embeddings-and-output-weights" in argv and "--no-swiglu" in argv  # false said explicitly
    assert "--load" in argv and argv[argv.index("--load") + 1] == os.path.join(exp.folder, "checkpoints")
    assert argv[argv.index("--tokenizer-model") + 1] == f"{corpora}/tokenizer.json"  # tokenizer_path
    assert any(n.startswith("system.overlap_grad_reduce: no effect here") for n in exp.notes)
    assert any(n.startswith("model.moe_grouped_gemm: no effect here") for n in exp.notes)
    assert exp.sources["--num-experts"] == "model.num_experts" and exp.env == {"OMP_NUM_THREADS": "1"}
    # the dry run plans the whole command with the trainer and writes nothing
    assert run_argv([config, "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "experiment Tiny-Mixture:" in out and "--log-dir" in out and "--eval-per-corpus" in out
    assert not (tmp_path / "out").exists()


def test_the_shipped_example_pair_reads(monkeypatch):
    monkeypatch.chdir(REPO)
    exp = read(os.path.join(REPO, "experiments", "openseek_demo", "config_deepseek_v3_tiny.yaml"))
    assert exp.folder == os.path.join(REPO, "outputs", "OpenSeek-demo-DeepSeek-V3-tiny")
    argv = exp.argv
    for flag in ("--multi-latent-attention", "--moe-router-enable-expert-bias", "--eval-per-corpus",
                 "--reset-attention-mask", "--num-mtp-predictor"):
        assert flag in argv, flag
    i = argv.index("--data-path")
    assert argv[i + 1:i + 5] == ["0.8", "data/demo/shakespeare_text_document", "0.2", "data/demo/docs_text_document"]


def _replace(old, new):
    return lambda text: text.replace(old, new)


@pytest.mark.parametrize("where, edit, message", [
    ("experiment", _replace("experiment:\n", "experimnt: 1\nexperiment:\n"),
     "experimnt: unknown top-level key (did you mean 'experiment'?)"),
    ("experiment", _replace("  seed: 7\n", "  seed: 7\n  sed: 8\n"),
     "experiment.sed: unknown key, and no ${experiment.sed} uses it"),
    ("experiment", _replace("nnodes: 1", "nnodes: 2"), "experiment.runner: one node only"),
    ("experiment", _replace("train_tiny.yaml", "train_other.yaml"), "defaults: train: train_other.yaml: no such file"),
    ("job", _replace("  num_layers: 2\n", "  num_layer: 2\n"),
     "model.num_layer: not a training flag (did you mean 'num_layers'?)"),
    ("job", _replace("${experiment.seed}", "${experiment.nope}"), "Interpolation key 'experiment.nope' not found"),
    ("job", _replace("  overlap_grad_reduce: true\n", "  recompute_method: block\n"),
     "system.recompute_method: 'block' is not supported here"),
    ("job", _replace("  log_interval: 1\n", "  log_interval: 1\n    save: elsewhere\n"),
     "system.logging.save: the experiment folder holds the checkpoints"),
    ("job", _replace("  log_interval: 1\n", "  log_interval: 1\n    output_dir: elsewhere\n"),
     "system.logging.output_dir: the experiment folder holds the checkpoints"),  # an alias of --save
    ("job", _replace("num_layers: 2", "num_layers: abc"), "model.num_layers (--num-layers): invalid positive integer"),
    ("job", _replace("moe_router_topk: 2", "moe_router_topk: 8"),
     "model.moe_router_topk (--moe-router-topk) 8 is larger than model.num_experts (--num-experts) 4"),
    ("job", _replace("  swiglu: false\n", "  swiglu: maybe\n"), "model.swiglu: --swiglu is an on/off flag"),
])
def test_every_bad_key_is_one_line_naming_it(tmp_path, corpora, capsys, where, edit, message):
    config = write_pair(tmp_path, corpora, **{f"{'experiment' if where == 'experiment' else 'job'}_edit": edit})
    assert run_argv([config]) == 2
    lines = error_lines(capsys.readouterr().err)
    assert len(lines) == 1 and message in lines[0], lines
    assert not (tmp_path / "out").exists()


def test_no_effect_keys_and_read_errors_are_config_errors(tmp_path, corpora):
    config = write_pair(tmp_path, corpora, job_edit=_replace("  overlap_grad_reduce: true\n",
                                                             "  context_parallel_size: 2\n"))
    with pytest.raises(ConfigError, match="system.context_parallel_size: 2 is not supported here"):
        read(config)


@pytest.mark.slow
def test_a_run_keeps_everything_in_the_experiment_folder(tmp_path, corpora, capsys):
    """Two ranks under torchrun: each rank's stdout in logs/, the metrics with a loss per corpus,
    checkpoints, the command and the resolved flags; the same command resumes."""
    config = write_pair(tmp_path, corpora, nproc=2)
    assert run_argv([config]) == 0, capsys.readouterr()
    folder = tmp_path / "out" / "Tiny-Mixture"
    for name in ("command.sh", "config.yaml", "train_args.txt", "resolved_args.json", "metrics.jsonl"):
        assert (folder / name).is_file(), name
    assert "torch.distributed.run --nproc_per_node 2" in (folder / "command.sh").read_text()
    assert json.load(open(folder / "resolved_args.json"))["multi_latent_attention"] is True
    outs = sorted(glob.glob(str(folder / "logs" / "*" / "attempt_0" / "*" / "stdout.log")))
    assert [os.path.basename(os.path.dirname(p)) for p in outs] == ["0", "1"]
    assert "iteration=       3/       3" in open(outs[0]).read()
    records = [json.loads(line) for line in open(folder / "metrics.jsonl")]
    per_corpus = [r for r in records if r["split"] == "validation_per_corpus"]
    assert [r["iteration"] for r in per_corpus] == [2, 3]
    assert sorted(per_corpus[-1]["lm_loss"]) == ["books/corpus_text_document", "web/corpus_text_document"]
    assert (folder / "checkpoints" / "latest").is_file()
    capsys.readouterr()
    assert run_argv([config]) == 0  # the same command: resumes, nothing left to train
    logs = sorted(glob.glob(str(folder / "logs" / "*" / "attempt_0" / "0" / "stdout.log")))
    assert len(logs) == 2 and "nothing to train" in open(logs[-1]).read()


# -- an OpenSeek pair as its users have it ---------------------------------------------------------------
# The shape of OpenSeek's config_deepseek_v3_*.yaml / train/train_deepseek_v3_*.yaml (FlagScale's
# experiment.task/runner/cmds/envs, action, hydra; the job's system/model/data groups: OpenSeek-Small
# with MLA, a mixture of experts, MTP, a weighted data_path under ${experiment.dataset_base_dir},
# FlagScale's QwenTokenizerFS), sizes scaled down to a CPU.
OPENSEEK_EXPERIMENT = """\
defaults:
  - _self_
  - train: train_deepseek_v3_small.yaml

experiment:
  exp_name: OpenSeek-Small-v1-Baseline
  dataset_base_dir: {data}
  seed: 42
  save_steps: 2
  load: null
  exp_dir: {out}/${{experiment.exp_name}}
  ckpt_format: torch
  task:
    type: train
    backend: megatron
    entrypoint: flagscale/train/train_gpt.py
  runner:
    per_node_task: false
    no_shared_fs: false
    rdzv_backend: static
    hostfile: null
    ssh_port: 22
  cmds:
    before_start: ulimit -n 4096
  envs:
    LOGLEVEL: "INFO"
    CUDA_VISIBLE_DEVICES: "0,1,2,3,4,5,6,7"
    CUDA_DEVICE_MAX_CONNECTIONS: 1
    WANDB_MODE: disabled

""" + EXPERIMENT[EXPERIMENT.index("action: run"):]  # action and hydra as in every FlagScale experiment file

OPENSEEK_JOB = """\
system:
  recompute_method: "uniform"
  recompute_granularity: "full"
  recompute_num_layers: 1
  moe_router_dtype: fp32
  no_shared_fs: ${experiment.runner.no_shared_fs}
  num_workers: 0
  tensor_model_parallel_size: 1
  pipeline_model_parallel_size: 1
  expert_model_parallel_size: 1
  context_parallel_size: 1
  disable_bias_linear: true
  reset_position_ids: True
  reset_attention_mask: True
  qk_layernorm: true
  sequence_parallel: true
  use_distributed_optimizer: true
  overlap_grad_reduce: true
  overlap_param_gather: true
  finetune: false
  precision:
    bf16: false
    attention_softmax_in_fp32: true
    accumulate_allreduce_grads_in_fp32: true
  logging:
    log_interval: 1
    tensorboard_log_interval: 1
    wandb_project: ${experiment.exp_name}
    wandb_exp_name: ${experiment.exp_name}
    log_timers_to_tensorboard: true
    log_validation_ppl_to_tensorboard: true
    log_throughput: true
    log_params_norm: true
    log_num_zeros_in_grad: true
    log_memory_to_tensorboard: true
  checkpoint:
    save_interval: ${experiment.save_steps}
    load: ${experiment.load}
    ckpt_format: ${experiment.ckpt_format}

model:
  transformer_impl: transformer_engine
  num_layers: 2
  hidden_size: 64
  num_attention_heads: 4
  group_query_attention: false
  num_query_groups: 4
  seq_length: 32
  max_position_embeddings: 32
  norm_epsilon: 1e-6
  use_rotary_position_embeddings: true
  rotary_base: 1000000
  swiglu: true
  normalization: RMSNorm
  init_method_std: 6e-3
  attention_dropout: 0.0
  hidden_dropout: 0.0
  clip_grad: 1.0
  position_embedding_type: rope
  untie_embeddings_and_output_weights: false
  no_position_embedding: true
  no_rope_fusion: true

  # mla args ==================
  multi_latent_attention: true
  kv_lora_rank: 16
  qk_head_dim: 16
  qk_pos_emb_head_dim: 8
  v_head_dim: 16

  # moe args ===================
  ffn_hidden_size: 128
  moe_ffn_hidden_size: 32
  moe_grouped_gemm: true
  moe_shared_expert_intermediate_size: 64
  num_experts: 8
  moe_router_load_balancing_type: "seq_aux_loss"
  moe_router_score_function: sigmoid
  moe_router_enable_expert_bias: true
  moe_router_bias_update_rate: 0.001
  moe_aux_loss_coeff: 0.0001
  moe_layer_freq: "[0]+[1]*1"
  moe_router_num_groups: 1
  moe_router_group_topk: 1
  moe_router_topk: 2
  moe_router_topk_scaling_factor: 2.446
  moe_token_dispatcher_type: "alltoall"

  # mtp args ===================
  num_mtp_predictor: 1
  mtp_loss_coeff: 0.3

  # training
  seed: ${experiment.seed}
  micro_batch_size: 2
  global_batch_size: 4
  eval_iters: 0
  train_samples: 8

  optimizer:
    weight_decay: 0.1
    adam_beta1: 0.9
    adam_beta2: 0.95
    lr_scheduler:
      lr: 3.0e-3
      min_lr: 3.0e-4
      lr_warmup_samples: 4
      lr_decay_style: cosine

data:
  # exp: baseline
  data_path:
    - 1.1068
    - ${experiment.dataset_base_dir}/Nemotron-CC-high-actual-actual-high/part_142_text_document
    - 0.3577
    - ${experiment.dataset_base_dir}/zh_cc-high-loss0/part_28_text_document
  split: 1
  no_mmap_bin_files: true
  tokenizer:
    tokenizer_type: QwenTokenizerFS
    tokenizer_path: ${experiment.dataset_base_dir}/tokenizer
    vocab_size: {vocab}
    make_vocab_size_divisible_by: 64
"""
RUNNER_NOTE = "experiment.runner: per_node_task, no_shared_fs, rdzv_backend, ssh_port: no effect here"


@pytest.fixture(scope="module")
def openseek_data(tmp_path_factory):
    """A Qwen-style Hugging Face tokenizer folder (FlagScale's QwenTokenizerFS ends documents with
    <|extra_204|>) and two corpora preprocessed with that type, under one base folder."""
    import transformers
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    from conftest import make_hf_corpus

    base = tmp_path_factory.mktemp("openseek_data")
    words = "the a model trains on data and learns to predict the next token of its text".split()
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator([" ".join(words)] * 10, trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<|endoftext|>", "<|extra_203|>", "<|extra_204|>"], show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    transformers.PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>").save_pretrained(
        str(base / "tokenizer"))
    made = make_hf_corpus(base / "made", documents=200, tokenizer=str(base / "tokenizer" / "tokenizer.json"))
    from megatron_ext.data.preprocess import main as preprocess

    for prefix in ("Nemotron-CC-high-actual-actual-high/part_142", "zh_cc-high-loss0/part_28"):
        os.makedirs(base / os.path.dirname(prefix), exist_ok=True)
        assert preprocess(["--input", str(base / "made" / "corpus.jsonl"), "--output-prefix", str(base / prefix),
                           "--tokenizer-type", "QwenTokenizerFS", "--tokenizer-model", str(base / "tokenizer")]) == 0
    return {"base": base, "vocab": len(tok.get_vocab()), "made": made}


def write_openseek_pair(folder, data, job_edit=None, experiment_edit=None):
    exp = OPENSEEK_EXPERIMENT.format(out=folder / "out", data=data["base"])
    job = OPENSEEK_JOB.replace("{vocab}", str(data["vocab"]))
    return _write_files(folder, "deepseek_v3_small", exp, job, experiment_edit, job_edit)


def test_an_openseek_pair_as_its_users_have_it_dry_runs(tmp_path, openseek_data, capsys):
    config = write_openseek_pair(tmp_path, openseek_data)
    assert run_argv([config, "--dry-run"]) == 0, capsys.readouterr().err
    out = capsys.readouterr().out
    assert RUNNER_NOTE in out  # FlagScale's runner settings: accepted, said once which ones do nothing
    exp = read(config)
    argv = exp.argv
    # the two keys of the position embedding agree: the flag once
    assert argv.count("--use-rotary-position-embeddings") == 1 and "--position-embedding-type" not in argv
    assert argv[argv.index("--tokenizer-type") + 1] == "QwenTokenizerFS"
    assert argv[argv.index("--tokenizer-model") + 1] == str(openseek_data["base"] / "tokenizer")
    assert "--recompute-activations" in argv and "--tie-embeddings-and-output-weights" in argv
    assert not (tmp_path / "out").exists()
    # QwenTokenizerFS is HFTokenizer ending documents with <|extra_204|>, as in FlagScale's preprocessed data
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    from megatron_ext.data.tokenizers import build_tokenizer

    tok = build_tokenizer("QwenTokenizerFS", tokenizer_model=str(openseek_data["base"] / "tokenizer"))
    dataset = IndexedDataset(str(openseek_data["base"] / "zh_cc-high-loss0" / "part_28_text_document"))
    assert int(dataset[0][-1]) == tok.eod == tok._tok.token_to_id("<|extra_204|>") != tok._tok.token_to_id("<|endoftext|>")


def test_every_problem_of_a_config_is_reported_at_once(tmp_path, openseek_data, capsys):
    def job(text):
        return (text.replace("position_embedding_type: rope", "position_embedding_type: learned_absolute")
                .replace("  num_layers: 2\n", "  num_layer: 2\n").replace("init_method_std: 6e-3", "init_method_std: x")
                .replace("QwenTokenizerFS", "AquilaTokenizerFS"))

    config = write_openseek_pair(tmp_path, openseek_data, job_edit=job,
                                 experiment_edit=lambda t: t.replace("    ssh_port: 22\n", "    ssh_prot: 22\n"))
    assert run_argv([config, "--dry-run"]) == 2
    lines = error_lines(capsys.readouterr().err)
    expected = ["experiment.runner.ssh_prot: unknown key (did you mean 'ssh_port'?)",
                "model.num_layer: not a training flag (did you mean 'num_layers'?)",
                "model.init_method_std (--init-method-std): invalid number: 'x'",
                "model.position_embedding_type: sets --position-embedding-type to 'learned_absolute', but "
                "model.use_rotary_position_embeddings set it to 'rope'",
                "data.tokenizer.tokenizer_type (--tokenizer-type): invalid choice 'AquilaTokenizerFS'"]
    assert len(lines) == len(expected), lines
    for line, want in zip(lines, expected):
        assert line.startswith("megatron-ext run: error: ") and want in line, (line, want)


def test_a_vocab_size_the_tokenizer_does_not_have_is_refused(tmp_path, openseek_data, capsys):
    config = write_openseek_pair(tmp_path, openseek_data,
                                 job_edit=lambda t: t.replace(f"vocab_size: {openseek_data['vocab']}", "vocab_size: 151851"))
    assert run_argv([config, "--dry-run"]) == 2
    lines = error_lines(capsys.readouterr().err)
    assert len(lines) == 1 and (f"data.tokenizer.vocab_size (--vocab-size) 151851: the tokenizer (QwenTokenizerFS "
                                f"{openseek_data['base'] / 'tokenizer'}) has {openseek_data['vocab']} tokens") in lines[0]


@pytest.mark.slow
def test_an_openseek_pair_as_its_users_have_it_runs(tmp_path, openseek_data, capsys):
    config = write_openseek_pair(tmp_path, openseek_data)
    assert run_argv([config]) == 0, capsys.readouterr()
    folder = tmp_path / "out" / "OpenSeek-Small-v1-Baseline"
    records = [json.loads(line) for line in open(folder / "metrics.jsonl")]
    train = [r for r in records if r["split"] == "train"]
    assert [r["iteration"] for r in train] == [1, 2]
    assert all(r["mtp_loss"] > 0 and r["moe_aux_loss"] > 0 and "decoder.layers.1" in r["expert_load"] for r in train)
    resolved = json.load(open(folder / "resolved_args.json"))
    assert resolved["tokenizer_type"] == "QwenTokenizerFS" and resolved["position_embedding_type"] == "rope"
    assert resolved["num_experts"] == 8 and resolved["multi_latent_attention"] is True
    assert (folder / "checkpoints" / "latest").is_file()
    assert "ulimit -n 4096" in (folder / "command.sh").read_text()
