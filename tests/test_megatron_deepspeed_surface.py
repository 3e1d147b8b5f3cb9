"""What users of the ALCF Megatron-DeepSpeed fork type works here as written: the flags its
launcher passes (with their meaning, or accepted with one printed note), its data lists, the
repository-root mix_datasets.py and DeepSpeed's own ds_to_universal flags."""
import glob
import os
import re
import subprocess
import sys

import pytest

from conftest import REPO, TINY, _env
from megatron_ext.plan import parse_plan

FIXTURE = os.environ.get("MEGATRON_DEEPSPEED_FIXTURE",
                         os.path.join(REPO, "..", "shared", "fixtures", "megatron-deepspeed-alcf"))
needs_fixture = pytest.mark.skipif(not os.path.isdir(FIXTURE), reason=f"no Megatron-DeepSpeed fixture at {FIXTURE}")
BASE = TINY + ["--mock-data", "--train-iters", "2"]

# Flags of the fork's ALCF/helpers.sh that are for other programs (the launcher, ds_to_universal...)
NOT_TRAINER_FLAGS = {"--gpus", "--gpus-per-node", "--hostfile", "--input_folder", "--output_folder", "--launcher",
                     "--login", "--require-virtualenv", "--show-current", "--verbose", "--shuffle-sample"}


@needs_fixture
def test_every_trainer_flag_of_the_fork_launcher_is_accepted():
    from megatron_ext.arguments import build_parser

    text = open(os.path.join(FIXTURE, "ALCF", "helpers.sh")).read()
    flags = sorted(set(re.findall(r"(?<![\w-])--[a-z0-9][a-z0-9_-]*", text)) - NOT_TRAINER_FLAGS)
    known = set(build_parser()._option_string_actions)
    assert [f for f in flags if f.replace("_", "-") not in known] == []


def test_fork_flags_keep_their_meaning_or_are_noted():
    plan = parse_plan(BASE + ["--rotary-position-embeddings-theta", "50000", "--checkpoint-num-layers", "1",
                              "--no-bias-gelu-fusion", "--no-masked-softmax-fusion", "--shuffle-sample-in-corpus",
                              "--timing-log-level", "1"], world_size=1)
    assert plan.args.rope_theta == 50000 and plan.args.recompute_num_layers == 1
    noted = [n.split(":")[0] for n in plan.notes]
    assert noted == ["--no-bias-gelu-fusion", "--no-masked-softmax-fusion", "--shuffle-sample-in-corpus",
                     "--timing-log-level"]
    assert all("accepted for Megatron-DeepSpeed compatibility" in n for n in plan.notes)


def test_fp32_gradient_accumulation_where_deepspeed_offers_it():
    flags = BASE + ["--bf16", "--accumulate-allreduce-grads-in-fp32"]
    plan = parse_plan(flags + ["--zero-stage", "1"], world_size=1)
    assert plan.ds_config["data_types"] == {"grad_accum_dtype": "fp32"} and not plan.notes
    for extra, why in ((["--zero-stage", "2"], "only for bf16 at ZeRO 1"),
                       (["--zero-stage", "1", "--optimizer", "muon"], "does not run under DeepSpeed's bf16 optimizer")):
        plan = parse_plan(flags + extra, world_size=1)
        assert "data_types" not in plan.ds_config and why in plan.notes[0]
    assert not parse_plan(BASE + ["--accumulate-allreduce-grads-in-fp32"], world_size=1).notes  # fp32 already


@needs_fixture
def test_the_fork_data_lists_parse_and_mix(tmp_path):
    from megatron_ext.data.data_list import read_data_file_list

    lists = sorted(glob.glob(os.path.join(FIXTURE, "ALCF", "data-lists", "**", "*.txt"), recursive=True))
    assert len(lists) > 10
    for path in lists:
        sources, problems = read_data_file_list(path)
        assert sources and not problems, (path, problems[:2])
    proc = subprocess.run([sys.executable, "mix_datasets.py", "--input", "0.9", lists[0], "0.1", lists[1], "--no-check"],
                          capture_output=True, text=True, env=_env(), cwd=REPO, timeout=120)
    assert proc.returncode == 0, proc.stderr
    mixed = [line.split() for line in proc.stdout.splitlines() if line.strip() and not line.startswith("#")]
    assert abs(sum(float(w) for w, *_ in mixed) - 1.0) < 1e-9


def test_ds_to_universal_takes_deepspeeds_flags(tmp_path):
    from megatron_ext.commands.to_universal import build_parser

    ns = build_parser("ds_to_universal.py").parse_args(
        ["--input_folder", "a", "--output_folder", "b", "--keep_temp_folder", "--num_merge_workers", "2",
         "--num_extract_workers", "3", "--no_strict"])
    assert (ns.keep_temp_folder, ns.num_merge_workers, ns.num_extract_workers, ns.strict) == (True, 2, 3, False)


@needs_fixture
def test_the_alcf_guides_headline_command_says_what_is_missing(tmp_path, hf_corpus):
    """`DATA_FILE_LIST=ALCF/data-lists/aurora/books.txt bash train_alcf.sh`: without the data (here,
    a CPU box) the dry run names the first missing file; with data but without the default tokenizer
    (google/gemma-7B) in the local Hugging Face cache it says how to get it."""
    from test_launcher import launch

    books = os.path.join(FIXTURE, "ALCF", "data-lists", "aurora", "books.txt")
    proc = launch(dict(DATA_FILE_LIST=books, SAVE=str(tmp_path / "r")))
    assert proc.returncode == 2 and "data files missing" in proc.stderr and ".bin" in proc.stderr
    proc = launch(dict(DATA_FILE_LIST=hf_corpus["data_list"], SAVE=str(tmp_path / "r"),
                       HF_HUB_CACHE=str(tmp_path / "empty-cache"), HF_HUB_OFFLINE="1"))
    assert proc.returncode == 2 and "google/gemma-7B" in proc.stderr and "cache" in proc.stderr
