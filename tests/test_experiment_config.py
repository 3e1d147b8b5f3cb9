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
    if experiment_edit:
        exp = experiment_edit(exp)
    if job_edit:
        job = job_edit(job)
    os.makedirs(folder / "train", exist_ok=True)
    (folder / "train" / "train_tiny.yaml").write_text(job)
    (folder / "config_tiny.yaml").write_text(exp)
    return str(folder / "config_tiny.yaml")


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
