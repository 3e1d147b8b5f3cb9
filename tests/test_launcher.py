"""``bash train_alcf.sh``: the real script with DRY_RUN=1 for every variable, alias, the
overriding rule, the iteration arithmetic and each bad input; and the demo end to end."""
import json
import os
import shlex
import subprocess

import pytest

from conftest import REPO, _env, error_lines, read_metrics, run_in_process

# Every variable the launcher reads; stripped from the test environment so the machine's own
# settings (a PBS_NODEFILE, an OPT in the shell...) cannot leak into a test.
LAUNCHER_VARS = """DATA_FILE_LIST TOKENIZER_TYPE TOKENIZER_MODEL DATA_CACHE_PATH TRAIN_TOKENS TRAIN_ITERS TRAIN_ITER
MICRO_BATCH GRAD_ACC_STEPS GLOBAL_BATCH LR LR_DECAY_STYLE LR_WARMUP_FRAC LR_WARMUP_FRACTION LR_DECAY_ITERS OPT
OPTIMIZER OPTIM ADAM_BETA1 ADAM_BETA2 ADAM_EPS WEIGHT_DECAY CLIP_GRAD MODEL_ARCH NLAYERS NUM_LAYERS HIDDEN HEADS
NHEADS NUM_KV_HEAD FFN_HIDDEN_SIZE SEQ SEQ_LEN ROPE_THETA NO_LLAMA TP PP SP EP EP_PARALLEL_SIZE ZERO_STAGE DTYPE
USE_ACTIVATION_CHECKPOINTING ACT_CKPT_NUM_LAYERS CPU_OPTIMIZER LOAD SAVE SAVE_INTERVAL OVERRIDE_CKPT_OPT_PARAM
EVAL_INTERVAL EVAL_ITERS LOG_INTERVAL TRAIN_SPLIT VAL_SPLIT TEST_SPLIT NO_TENSORBOARD WANDB_MODE WB_PROJECT
WANDB_PROJECT LAUNCH_WITH LAUNCH_CMD HOSTFILE PBS_NODEFILE NGPU_PER_HOST EXEC DS_CONFIG DRY_RUN DEMO_DIR SEED
MASTER_PORT NUM_EXPERTS MOE_TOPK""".split()


def launch(env=None, extra=(), dry_run=True, timeout=120, shell=False):
    """``bash train_alcf.sh`` with ``env``; a dry run goes through the launcher's own entry point in
    this process (everything but the two-line shell wrapper) unless ``shell``."""
    full = {k: v for k, v in _env().items() if k not in LAUNCHER_VARS}
    if dry_run:
        full["DRY_RUN"] = "1"
    full.update(env or {})
    if dry_run and not shell:
        return launch_in_process(full, extra)
    return subprocess.run(["bash", os.path.join(REPO, "train_alcf.sh"), *extra], capture_output=True, text=True,
                          env=full, timeout=timeout, cwd=REPO)


def launch_in_process(environ, extra):
    from megatron_ext.launcher.__main__ import main

    saved = dict(os.environ)
    os.environ.clear()
    os.environ.update(environ, MEGATRON_EXT_ROOT=REPO)
    try:
        return run_in_process(main, extra, cwd=REPO)
    finally:
        os.environ.clear()
        os.environ.update(saved)


def resolved(proc):
    """(trainer argv as the trainer parses it, full command, settings table dict)."""
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.splitlines()
    command = shlex.split(lines[lines.index("command:") + 1])
    settings = {}
    for line in lines:
        parts = line.split()
        if line.startswith("  ") and len(parts) >= 3 and parts[-1].endswith("]") and "[" in line:
            key = line[2:].split("  ")[0].strip()
            settings[key] = line[2:].split("[")[0][len(key):].strip()
    from megatron_ext.arguments import build_parser
    from megatron_ext.plan import build_plan

    i = command.index("megatron_ext.train")
    args = build_plan(build_parser().parse_args(command[i + 1:]), int(settings["WORLD_SIZE"]), check_files=False).args
    return args, command, settings


def test_every_primary_variable_maps_to_its_flag(tmp_path, hf_corpus):
    data_list = tmp_path / "list.txt"
    data_list.write_text(open(hf_corpus["data_list"]).read())  # DRY_RUN resolves the data files and tokenizer
    tok = hf_corpus["tokenizer"]
    env = dict(DATA_FILE_LIST=str(data_list), TOKENIZER_TYPE="HFTokenizer", TOKENIZER_MODEL=str(tok),
               DATA_CACHE_PATH=str(tmp_path / "cache"), TRAIN_ITERS="123", MICRO_BATCH="2", GRAD_ACC_STEPS="3",
               LR="0.0007", LR_DECAY_STYLE="linear", LR_WARMUP_FRAC="0.1", LR_DECAY_ITERS="100", OPT="adamw",
               ADAM_BETA1="0.8", ADAM_BETA2="0.99", ADAM_EPS="1e-6", WEIGHT_DECAY="0.05", CLIP_GRAD="0.3",
               NLAYERS="3", HIDDEN="96", HEADS="6", NUM_KV_HEAD="3", FFN_HIDDEN_SIZE="200", SEQ="48",
               ROPE_THETA="50000", TP="1", ZERO_STAGE="2", DTYPE="bf16", SAVE=str(tmp_path / "run"),
               LOAD=str(tmp_path / "old"), SAVE_INTERVAL="7", EVAL_INTERVAL="9", EVAL_ITERS="4", LOG_INTERVAL="2",
               TRAIN_SPLIT="80", VAL_SPLIT="15", TEST_SPLIT="5", SEED="42", NO_TENSORBOARD="1",
               USE_ACTIVATION_CHECKPOINTING="1", ACT_CKPT_NUM_LAYERS="1", CPU_OPTIMIZER="1")
    args, command, settings = resolved(launch(env))
    assert (args.train_iters, args.micro_batch_size, args.global_batch_size) == (123, 2, 6)
    assert (args.lr, args.lr_decay_style, args.lr_warmup_fraction, args.lr_decay_iters) == (7e-4, "linear", 0.1, 100)
    assert (args.optimizer, args.adam_beta1, args.adam_beta2, args.adam_eps) == ("adamw", 0.8, 0.99, 1e-6)
    assert (args.weight_decay, args.clip_grad) == (0.05, 0.3)
    assert (args.num_layers, args.hidden_size, args.num_attention_heads, args.num_key_value_heads) == (3, 96, 6, 3)
    assert (args.ffn_hidden_size, args.seq_length, args.rope_theta) == (200, 48, 50000)
    assert args.model_style == "llama" and args.zero_stage == 2 and args.bf16
    assert args.save == str(tmp_path / "run") and args.load == str(tmp_path / "old")
    assert (args.save_interval, args.eval_interval, args.eval_iters, args.log_interval) == (7, 9, 4, 2)
    assert args.split == "80,15,5" and args.seed == 42 and args.no_tensorboard
    assert args.recompute_activations and args.recompute_num_layers == 1 and args.cpu_optimizer
    assert args.data_file_list == str(data_list) and args.data_cache_path == str(tmp_path / "cache")
    assert args.tokenizer_type == "HFTokenizer" and args.tokenizer_model == str(tok)
    assert args.use_checkpoint_opt_param_scheduler  # OVERRIDE_CKPT_OPT_PARAM unset
    assert args.deepspeed_config == str(tmp_path / "run" / "ds_config.json")
    assert settings["GRAD_ACC_STEPS"] == "3" and settings["GLOBAL_BATCH"] == "6"
    assert command[1:3] == ["-m", "megatron_ext.train"]  # one process: plain python
    # the generated DeepSpeed config honours CLIP_GRAD, ZERO_STAGE, DTYPE, batch and CPU_OPTIMIZER
    proc = launch(env)
    config = json.loads(proc.stdout.split("DeepSpeed config (generated):\n", 1)[1].split("\nDRY_RUN=1")[0])
    assert config["gradient_clipping"] == 0.3 and config["zero_optimization"]["stage"] == 2
    assert config["bf16"]["enabled"] and config["train_batch_size"] == 6
    assert config["gradient_accumulation_steps"] == 3 and config["train_micro_batch_size_per_gpu"] == 2
    assert config["zero_optimization"]["offload_optimizer"] == {"device": "cpu"}
    assert "nothing was started or written" in proc.stdout
    assert not (tmp_path / "run").exists()


def test_alias_spellings(tmp_path):
    env = dict(LR_WARMUP_FRACTION="0.2", SEQ_LEN="32", OPTIMIZER="adamw", TRAIN_ITER="77", NUM_LAYERS="5",
               NHEADS="2", HIDDEN="64", NUM_KV_HEAD="2", SAVE=str(tmp_path / "r"))
    args, _, settings = resolved(launch(env))
    assert (args.lr_warmup_fraction, args.seq_length, args.train_iters) == (0.2, 32, 77)
    assert (args.num_layers, args.num_attention_heads) == (5, 2)
    assert settings["OPT"] == "adamw"
    args, _, _ = resolved(launch(dict(OPTIM="adamw", LAUNCH_CMD="python", SAVE=str(tmp_path / "r"))))
    assert args.optimizer == "adamw"


def test_train_tokens_arithmetic_and_iters_win(tmp_path):
    env = dict(TRAIN_TOKENS="1e5", SEQ="64", MICRO_BATCH="4", GRAD_ACC_STEPS="2", SAVE=str(tmp_path / "r"))
    proc = launch(env)
    args, _, _ = resolved(proc)
    assert args.train_iters == 100000 // (64 * 8) == 195
    assert "TRAIN_TOKENS=100000 -> TRAIN_ITERS = 100000 // (64 x 8) = 195 (99840 tokens trained, 160 dropped" in proc.stdout
    args, _, _ = resolved(launch({**env, "TRAIN_ITERS": "10"}))
    assert args.train_iters == 10
    # an extra --micro-batch-size moves the global batch, and so the iterations TRAIN_TOKENS buys
    proc = launch(env, extra=["--micro-batch-size", "2"])
    args, _, settings = resolved(proc)
    assert args.global_batch_size == 4 and args.train_iters == 100000 // (64 * 4) == 390
    assert settings["GLOBAL_BATCH"] == "4" and settings["TRAIN_ITERS"] == "390"
    assert "= 390 (99840 tokens trained, 160 dropped by rounding)" in proc.stdout
    # an extra --train-iters wins, and the note says so instead of claiming the division gave it
    proc = launch(env, extra=["--train-iters", "10"])
    args, _, _ = resolved(proc)
    assert args.train_iters == 10
    assert "note: --train-iters 10 wins over TRAIN_TOKENS=100000" in proc.stdout
    assert "TRAIN_TOKENS=100000 -> TRAIN_ITERS" not in proc.stdout


def test_global_batch_and_two_process_torchrun(tmp_path):
    args, command, settings = resolved(launch(dict(NGPU_PER_HOST="2", MICRO_BATCH="2", GLOBAL_BATCH="12",
                                                   SAVE=str(tmp_path / "r"))))
    assert args.global_batch_size == 12 and settings["GRAD_ACC_STEPS"] == "3" and settings["WORLD_SIZE"] == "2"
    assert command[1:5] == ["-m", "torch.distributed.run", "--nproc_per_node", "2"]


def test_extra_arguments_win_over_variables(tmp_path):
    proc = launch(dict(LR="0.1", OPT="adamw", MICRO_BATCH="2", CLIP_GRAD="0.5", SAVE=str(tmp_path / "r")),
                  extra=["--lr", "0.5", "--micro-batch-size", "3", "--clip-grad", "0.25", "--init-method-std", "0.01"])
    args, command, _ = resolved(proc)
    assert (args.lr, args.micro_batch_size, args.clip_grad, args.init_method_std) == (0.5, 3, 0.25, 0.01)
    assert command[-8:] == ["--lr", "0.5", "--micro-batch-size", "3", "--clip-grad", "0.25", "--init-method-std", "0.01"]
    config = json.loads(proc.stdout.split("DeepSpeed config (generated):\n", 1)[1].split("\nDRY_RUN=1")[0])
    assert config["gradient_clipping"] == 0.25 and config["train_micro_batch_size_per_gpu"] == 3


def test_presets_overrides_style_and_user_deepspeed_config(tmp_path):
    args, _, settings = resolved(launch(dict(SAVE=str(tmp_path / "r"))))
    assert settings["MODEL_ARCH"] == "tiny"  # no accelerator: the CPU demo size
    args, _, _ = resolved(launch(dict(MODEL_ARCH="7B", HIDDEN="1024", NO_LLAMA="1", TP="2", NGPU_PER_HOST="4",
                                      SAVE=str(tmp_path / "r"))))
    assert (args.num_layers, args.hidden_size, args.num_attention_heads) == (32, 1024, 32)
    assert args.model_style == "gpt2" and args.tensor_model_parallel_size == 2
    args, _, _ = resolved(launch(dict(MODEL_ARCH="auroragpt-2b", SAVE=str(tmp_path / "r"))))
    assert args.num_layers == 24 and args.hidden_size == 2048
    user = tmp_path / "ds.json"
    user.write_text(json.dumps({"zero_optimization": {"stage": 2}}))
    proc = launch(dict(DS_CONFIG=str(user), SAVE=str(tmp_path / "r")))
    args, _, _ = resolved(proc)
    assert args.deepspeed_config == str(user) and "DeepSpeed config (generated)" not in proc.stdout


def test_launch_modes(tmp_path):
    hostfile = tmp_path / "nodes"
    hostfile.write_text("x1000c0s0b0n0\nx1000c0s0b0n1\n")
    _, command, settings = resolved(launch(dict(PBS_NODEFILE=str(hostfile), NGPU_PER_HOST="12",
                                                LAUNCH_WITH="mpiexec", SAVE=str(tmp_path / "r"))))
    assert command[:7] == ["mpiexec", "--envall", "-n", "24", "-ppn", "12", "--hostfile"] and command[7] == str(hostfile)
    assert settings["NHOSTS"] == "2" and settings["WORLD_SIZE"] == "24"
    _, command, _ = resolved(launch(dict(LAUNCH_WITH="deepspeed", NGPU_PER_HOST="2", SAVE=str(tmp_path / "r"))))
    assert command[:5] == ["deepspeed", "--num_gpus", "2", "--module", "megatron_ext.train"]


@pytest.mark.parametrize("env, message", [
    (dict(TRAIN_TOKENS="lots"), "TRAIN_TOKENS='lots' is not an integer"),
    (dict(LR="fast"), "LR='fast' is not a number"),
    (dict(MICRO_BATCH="two"), "MICRO_BATCH='two' is not an integer"),
    (dict(MICRO_BATCH="2.5"), "MICRO_BATCH='2.5' is not an integer"),
    (dict(GLOBAL_BATCH="10", MICRO_BATCH="4"), "GLOBAL_BATCH=10 is not divisible by data-parallel size 1 x MICRO_BATCH=4"),
    (dict(MODEL_ARCH="8B"), "MODEL_ARCH='8B' is not a known preset"),
    (dict(OPT="adamww"), "OPT='adamww': unknown optimizer 'adamww' (did you mean 'adamw'?)"),
    (dict(DATA_FILE_LIST="/no/such/list.txt"), "DATA_FILE_LIST=/no/such/list.txt: no such file"),
    (dict(ZERO_STAGE="4"), "ZERO_STAGE=4 must be one of 0, 1, 2, 3"),
    (dict(TP="3", NGPU_PER_HOST="3"), "TP=3 does not divide HEADS=4"),
])
def test_bad_input_is_one_line_naming_the_variable(tmp_path, env, message):
    proc = launch({**env, "SAVE": str(tmp_path / "run")})
    assert proc.returncode == 2
    lines = error_lines(proc.stderr)
    assert len(lines) == 1 and message in lines[0], proc.stderr[-2000:]
    assert "iteration=" not in proc.stdout and not (tmp_path / "run").exists()


@pytest.mark.slow
def test_demo_end_to_end_with_two_processes_then_resume(tmp_path):
    """No variables but a short schedule: builds the corpus, trains with torchrun on 2 ranks, saves,
    and the same command resumes from the checkpoint."""
    run = tmp_path / "run"
    env = dict(DEMO_DIR=str(tmp_path / "demo"), SAVE=str(run), NGPU_PER_HOST="2", MICRO_BATCH="4",
               TRAIN_ITERS="30", EVAL_INTERVAL="15", EVAL_ITERS="2", SAVE_INTERVAL="15", LOG_INTERVAL="5",
               DATA_CACHE_PATH=str(tmp_path / "cache"))
    first = launch(env, dry_run=False, timeout=600)
    assert first.returncode == 0, first.stderr[-4000:]
    assert "data-parallel size    : 2" in first.stdout
    for name in (".env", "train_args.txt", "launch.sh", "ds_config.json", "latest", "global_step30"):
        assert (run / name).exists(), name
    assert "torch.distributed.run" in (run / "launch.sh").read_text()
    assert "MICRO_BATCH=4" in (run / ".env").read_text()
    valid = read_metrics(run / "metrics.jsonl", "validation")
    assert valid[0]["lm_loss"] > 7.5  # ~ln(4096) before training
    assert valid[30]["lm_loss"] < valid[0]["lm_loss"] - 1.0, valid
    second = launch({**env, "TRAIN_ITERS": "35"}, dry_run=False, timeout=600)
    assert second.returncode == 0, second.stderr[-4000:]
    assert "start iteration       : 30" in second.stdout
    assert sorted(read_metrics(run / "metrics.jsonl"))[-1] == 35


def test_numbers_reach_the_trainer_exactly_as_typed(tmp_path):
    proc = launch(dict(LR="3.3333333e-4", ADAM_BETA2="0.9999999", ADAM_EPS="1.234567891e-9", SAVE=str(tmp_path / "r")))
    args, command, settings = resolved(proc)
    assert args.lr == 3.3333333e-4 and args.adam_beta2 == 0.9999999 and args.adam_eps == 1.234567891e-9
    assert command[command.index("--lr") + 1] == "3.3333333e-4"
    assert command[command.index("--adam-beta2") + 1] == "0.9999999"
    assert settings["LR"] == "3.3333333e-4"


@pytest.mark.parametrize("case", ["tokenizer", "data"])
def test_dry_run_resolves_the_tokenizer_and_data_files(tmp_path, hf_corpus, case):
    data_list = tmp_path / "list.txt"
    data_list.write_text("1.0 /nowhere/prefix corpus\n" if case == "data" else open(hf_corpus["data_list"]).read())
    tok = hf_corpus["tokenizer"] if case == "data" else str(tmp_path / "missing.json")
    proc = launch(dict(DATA_FILE_LIST=str(data_list), TOKENIZER_MODEL=tok, SAVE=str(tmp_path / "r")))
    assert proc.returncode == 2
    lines = error_lines(proc.stderr)
    assert len(lines) == 1, proc.stderr[-2000:]
    assert ("/nowhere/prefix.bin" in lines[0]) if case == "data" else ("missing.json" in lines[0])


def test_plan_errors_name_the_variables_that_produced_the_flags(tmp_path):
    user = tmp_path / "ds.json"
    user.write_text(json.dumps({"zero_optimization": {"stage": 3}}))
    proc = launch(dict(OPT="muon", DS_CONFIG=str(user), SAVE=str(tmp_path / "r")))
    assert proc.returncode == 2
    assert error_lines(proc.stderr) == ["train_alcf.sh: error: OPT=muon supports --zero-stage 0, 1 and 2, not 3 "
                                        "(whole matrices are gathered from ZeRO 0/1/2 layouts only)"]


def test_bad_input_through_the_script_itself_starts_and_writes_nothing(tmp_path):
    proc = launch(dict(GLOBAL_BATCH="10", MICRO_BATCH="4", SAVE=str(tmp_path / "run")), dry_run=False)
    assert proc.returncode == 2
    assert error_lines(proc.stderr) == ["train_alcf.sh: error: GLOBAL_BATCH=10 is not divisible by data-parallel "
                                        "size 1 x MICRO_BATCH=4"]
    assert "iteration=" not in proc.stdout and not (tmp_path / "run").exists()


# -- the demo never replaces what the user set ----------------------------------------------------------
def test_the_demo_keeps_every_variable_the_user_set(tmp_path, hf_corpus):
    """Without DATA_FILE_LIST the demo runs, but a variable the user set is the user's: the tokenizer
    (the demo corpus is tokenized with it, in a folder of its own) and every demo default."""
    from megatron_ext.launcher.resolve import DEMO_DEFAULTS

    demo_dir = tmp_path / "demo"
    mine = dict(MICRO_BATCH="3", LR="0.0005", EVAL_INTERVAL="7", EVAL_ITERS="2", SAVE_INTERVAL="9",
                LOG_INTERVAL="4", TRAIN_ITERS="11")
    assert set(DEMO_DEFAULTS) <= set(mine)  # every default the demo has of its own is tried here
    args, command, settings = resolved(launch(dict(DEMO_DIR=str(demo_dir), SAVE=str(tmp_path / "r"),
                                                   TOKENIZER_TYPE="HFTokenizer", TOKENIZER_MODEL=hf_corpus["tokenizer"],
                                                   **mine)))
    assert (args.micro_batch_size, args.lr, args.eval_interval, args.eval_iters, args.save_interval,
            args.log_interval, args.train_iters) == (3, 0.0005, 7, 2, 9, 4, 11)
    for var, value in mine.items():
        assert settings[var] == value, var
    assert args.tokenizer_type == "HFTokenizer" and args.tokenizer_model == hf_corpus["tokenizer"]
    assert settings["TOKENIZER_MODEL"] == hf_corpus["tokenizer"]
    lst = args.data_file_list
    assert lst.startswith(str(demo_dir / "by_tokenizer" / "HFTokenizer-")) and lst.endswith("data_file_list.txt")
    # the demo's own tokenizer only when neither variable is set
    args, _, settings = resolved(launch(dict(DEMO_DIR=str(demo_dir), SAVE=str(tmp_path / "r"))))
    assert args.tokenizer_model == str(demo_dir / "tokenizer.model") and settings["MICRO_BATCH"] == "8"


def test_the_demo_refuses_a_tokenizer_that_is_not_there(tmp_path):
    proc = launch(dict(DEMO_DIR=str(tmp_path / "demo"), SAVE=str(tmp_path / "r"),
                       TOKENIZER_TYPE="SentencePieceTokenizer", TOKENIZER_MODEL="/nonexistent/x.model"))
    assert proc.returncode == 2
    lines = error_lines(proc.stderr)
    assert len(lines) == 1 and "TOKENIZER_MODEL=/nonexistent/x.model" in lines[0] and "no such file" in lines[0], lines
    assert not (tmp_path / "demo").exists() and not (tmp_path / "r").exists()


def test_the_demo_corpus_is_tokenized_with_the_users_tokenizer_and_kept_per_tokenizer(tmp_path, hf_corpus):
    import numpy as np

    from megatron_ext.data.tokenizers import build_tokenizer, train_sentencepiece
    from megatron_ext.launcher.demo import prepare

    demo_dir = tmp_path / "demo"
    texts = demo_dir / "download" / "texts"  # the unpacked sdist, so nothing is downloaded here
    texts.mkdir(parents=True)
    speech = "Now is the winter of our discontent made glorious summer by this sun of York."
    (texts / "richard_gut.txt").write_text("\n\n".join([speech] * 400))
    (tmp_path / "other.txt").write_text((speech + "\n") * 50)
    other = train_sentencepiece([str(tmp_path / "other.txt")], str(tmp_path / "other"), 300)
    built = {}
    for kind, model in (("HFTokenizer", hf_corpus["tokenizer"]), ("SentencePieceTokenizer", other)):
        result = prepare(str(demo_dir), kind, model)
        assert result["tokenizer_model"] == model and os.path.isfile(result["data_file_list"])
        prefix = open(result["data_file_list"]).read().split("\n")[1].split()[1]
        from megatron.core.datasets.indexed_dataset import IndexedDataset

        dataset = IndexedDataset(prefix)  # kept while its memory-mapped documents are read
        first = np.array(dataset[0])
        tok = build_tokenizer(kind, tokenizer_model=model)
        assert speech in tok.detokenize(first.tolist())  # this tokenizer's ids
        built[kind] = result["data_file_list"]
        assert prepare(str(demo_dir), kind, model) == result  # the second time: reused
    assert len(set(built.values())) == 2 and not (demo_dir / "tokenizer.model").exists()


# -- parallel layouts: PP, EP and SP (docs/parallelism.md) -----------------------------------------------------------
def layout_block(proc):
    """The dry run's layout block as {label: value}."""
    lines = proc.stdout.splitlines()
    start = next(i for i, l in enumerate(lines) if l.startswith("parallel layout"))
    block = {}
    for line in lines[start + 1:]:
        if not line.startswith("  "):
            break
        label, value = line[2:].split(" : ", 1)
        block[label.strip()] = value
    return block


def test_dry_run_shows_the_layout_each_dimension_spans_and_what_each_rank_holds(tmp_path):
    """8 ranks on 2 hosts x 4: PP 2 x DP 4 with EP 2 of an 8-expert MoE (megatron-core's order: TP
    fastest, PP slowest, so a pipeline crosses the hosts and the experts stay inside one)."""
    hostfile = tmp_path / "nodes"
    hostfile.write_text("x1000c0s0b0n0\nx1000c0s0b0n1\n")
    proc = launch(dict(PBS_NODEFILE=str(hostfile), NGPU_PER_HOST="4", LAUNCH_WITH="mpiexec", PP="2", EP="2",
                       MODEL_ARCH="deepseek-v3-tiny", SAVE=str(tmp_path / "r")))
    args, _, _ = resolved(proc)
    assert (args.pipeline_model_parallel_size, args.expert_model_parallel_size, args.data_parallel_size) == (2, 2, 4)
    block = layout_block(proc)
    assert block["layout"] == "TP 1 x PP 2 x DP 4 = 8 ranks on 2 host(s) x 4; EP 2 x expert-DP 2 inside DP"
    assert block["pipeline-parallel groups"] == "4 of 2 ranks, e.g. 0,4; each across 2 hosts"
    assert block["expert-parallel groups"] == "4 of 2 ranks, e.g. 0-1; each inside one host"
    assert block["data-parallel groups"] == "2 of 4 ranks, e.g. 0-3; each inside one host"
    assert block["expert-data-parallel groups"] == "4 of 2 ranks, e.g. 0,2; each inside one host"
    assert block["stage 0 (ranks 0-3)"] == "layers 0-1, the word embedding"
    assert block["stage 1 (ranks 4-7)"] == "layers 2-3, the final norm and the output layer, 1 MTP layer(s)"
    assert block["each EP rank"].startswith("EP rank 0: experts 0-3; EP rank 1: experts 4-7 of each MoE layer")
    assert block["each DP rank"] == ("ZeRO 1: 1/4 of the optimizer state (over DP); the experts' over "
                                     "expert-DP: 1/2")
    # TP x PP of a dense model: TP inside a host, the tied output layer's copy of the embedding on the last stage
    proc = launch(dict(PBS_NODEFILE=str(hostfile), NGPU_PER_HOST="4", LAUNCH_WITH="mpiexec", TP="2", PP="2",
                       SAVE=str(tmp_path / "r")), extra=["--tie-embeddings-and-output-weights"])
    block = layout_block(proc)
    assert block["tensor-parallel groups"] == "4 of 2 ranks, e.g. 0-1; each inside one host"
    assert block["each TP rank"].startswith("1/2 of every weight matrix")
    assert block["stage 1 (ranks 4-7)"] == ("layers 2-3, the final norm and the output layer (a copy of the word "
                                           "embedding, tied)")
    assert "experts" not in " ".join(block)
    # a deep pipeline shows its ends
    hostfile.write_text("".join(f"n{i}\n" for i in range(16)))
    block = layout_block(launch(dict(PBS_NODEFILE=str(hostfile), NGPU_PER_HOST="4", LAUNCH_WITH="mpiexec", TP="4",
                                     PP="16", MODEL_ARCH="70B", SAVE=str(tmp_path / "r"))))
    assert block["pipeline-parallel groups"] == "4 of 16 ranks, e.g. 0,4,...,60 (every 4); each across 16 hosts"
    assert (block["stage 1 (ranks 4-7)"], block["stages 2..13"]) == ("layers 5-9", "5 layers each, in order")
    assert block["stage 15 (ranks 60-63)"] == "layers 75-79, the final norm and the output layer"


def test_run_directory_names_pipeline_and_expert_parallel_sizes(tmp_path):
    _, command, settings = resolved(launch(dict(NGPU_PER_HOST="2", PP="2")))
    assert settings["SAVE"].endswith("-tp1-pp2-fp32")
    _, _, settings = resolved(launch(dict(NGPU_PER_HOST="2", EP="2", NUM_EXPERTS="4", MOE_TOPK="2")))
    assert settings["SAVE"].endswith("-tp1-ep2-fp32-moe4x2")
    _, _, settings = resolved(launch(dict(NGPU_PER_HOST="2", EP_PARALLEL_SIZE="2", NUM_EXPERTS="4", MOE_TOPK="2")))
    assert settings["SAVE"].endswith("-tp1-ep2-fp32-moe4x2")  # the fork's MoE examples' name for EP
    _, _, settings = resolved(launch(dict(NGPU_PER_HOST="2")))  # PP 1, EP 1: the names earlier runs have
    name = os.path.basename(settings["SAVE"])
    assert name.endswith("-tp1-fp32") and "-pp" not in name and "-ep" not in name


def _slow(env, message):  # each is a new process (~5 s on the shared box): one in the fast tier
    return pytest.param(env, message, marks=pytest.mark.slow)


@pytest.mark.parametrize("env, message", [
    (dict(PP="3"), "PP=3 does not divide NLAYERS=4 (every stage holds the same number of layers)"),
    _slow(dict(NGPU_PER_HOST="3", PP="2"), "TP=1 x PP=2 = 2 does not divide the world size 3"),
    _slow(dict(NGPU_PER_HOST="2", NUM_EXPERTS="3", MOE_TOPK="2", EP="2"), "EP=2 does not divide NUM_EXPERTS=3"),
    _slow(dict(NGPU_PER_HOST="2", NUM_EXPERTS="4", MOE_TOPK="2", EP="4"),
          "EP=4 does not divide the data-parallel size 2"),
    _slow(dict(NGPU_PER_HOST="2", SP="2"), "SP=2: sequence parallelism (DeepSpeed-Ulysses) is not supported yet; use "
                                           "1, and for long sequences cut activation memory with "
                                           "--tensor-model-parallel-size"),
    _slow(dict(NGPU_PER_HOST="2", PP="2", ZERO_STAGE="2"), "PP=2 runs with --zero-stage 0 or 1, not 2"),
])
def test_a_layout_that_does_not_factor_is_one_line_through_the_script(tmp_path, env, message):
    """The run plan's rules (derivations.py), said in the variables, by the real script before any work."""
    proc = launch({**env, "SAVE": str(tmp_path / "run")}, shell=True)
    assert proc.returncode == 2
    lines = error_lines(proc.stderr)
    assert len(lines) == 1 and message in lines[0], proc.stderr[-2000:]
    assert not (tmp_path / "run").exists()


@pytest.mark.slow
@pytest.mark.parametrize("layout", ["pp2", "ep2"])
def test_pipeline_and_expert_parallel_launches_train(tmp_path, hf_corpus, layout):
    """A real launch on 2 CPU ranks: PP 2 of a dense model, EP 2 of a 4-expert top-2 MoE; each trains
    a few iterations and saves the layout's checkpoint files."""
    run = tmp_path / "run"
    env = dict(DATA_FILE_LIST=hf_corpus["data_list"], TOKENIZER_TYPE="HFTokenizer", TOKENIZER_MODEL=hf_corpus["tokenizer"],
               DATA_CACHE_PATH=str(tmp_path / "cache"), NGPU_PER_HOST="2", NLAYERS="2", HIDDEN="64", HEADS="4",
               NUM_KV_HEAD="4", FFN_HIDDEN_SIZE="128", SEQ="32", MICRO_BATCH="2", GLOBAL_BATCH="4", TRAIN_ITERS="4",
               LR="0.001", EVAL_ITERS="0", SAVE_INTERVAL="4", LOG_INTERVAL="1", SAVE=str(run),
               **(dict(PP="2") if layout == "pp2" else dict(EP="2", NUM_EXPERTS="4", MOE_TOPK="2")))
    proc = launch(env, dry_run=False, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert ("(1 layers a stage)" if layout == "pp2" else "(2 experts a rank, expert-data-parallel size 1)") \
        in proc.stdout
    train = read_metrics(run / "metrics.jsonl")
    assert sorted(train) == [1, 2, 3, 4] and all(0 < r["lm_loss"] < 20 for r in train.values()), train
    files = os.listdir(run / "global_step4")
    # the second stage's / second EP rank's own file (docs/parallelism.md, "What each rank holds")
    wanted = "mp_rank_01_model_states.pt" if layout == "pp2" else "expert_ep_rank_01_mp_rank_00_experts.pt"
    assert wanted in files, files
