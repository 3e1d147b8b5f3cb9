"""Evaluation: next-token accuracy in validation records (TP-correct arg-max), and the
multiple-choice hook (--eval-mc-file, HellaSwag format) that scores endings by log-likelihood.

The known-answer case: a tiny model trained on one repeated sentence, tokenized by a SentencePiece
model trained here, must pick the ending that continues the sentence in tests/data/mc_tiny.jsonl."""
import json
import os
import textwrap

import numpy as np
import pytest

from conftest import REPO, TINY, error_lines, free_port, read_metrics, run_module, run_trainer
from megatron_ext.data.tokenizers import NullTokenizer, build_tokenizer, train_sentencepiece
from megatron_ext.training.evaluation import (
    MCExample, choose, encode_mc_example, ending_log_likelihoods, read_mc_file, vocab_parallel_argmax)

MC_FILE = os.path.join(REPO, "tests", "data", "mc_tiny.jsonl")
SENTENCE = "every small model reads this sentence many times until it knows which word comes next"


# --------------------------------------------------------------------------------------------
# Scoring, on exact numbers
# --------------------------------------------------------------------------------------------


def fixed_log_probs(sequences):
    """log p(next token) = -token / 4 whatever the history: exact binary fractions."""
    return [[-t / 4 for t in s[1:]] for s in sequences]


def test_endings_are_scored_by_mean_and_by_sum_log_probability():
    tok = NullTokenizer(10)  # eod 9; text is token ids
    example = encode_mc_example(tok, MCExample("x:1", "1 2", ["5", "2 2 2", "8 1"], 1), max_tokens=16)
    assert example.sequences == [[9, 1, 2, 5], [9, 1, 2, 2, 2, 2], [9, 1, 2, 8, 1]]
    assert example.ending_lengths == [1, 3, 2]
    scores = ending_log_likelihoods(example, fixed_log_probs)
    assert scores == [(-1.25, 1), (-1.5, 3), (-2.25, 2)]
    assert example.characters == [2, 6, 4]  # " 5", " 2 2 2", " 8 1": the text each ending adds
    # per token: -1.25, -0.5, -1.125 -> 1; sum (acc): 0 (the short one); per character (acc_norm):
    # -0.625, -0.25, -0.5625 -> 1
    assert choose(scores, example.characters) == (1, 0, 1)
    assert choose([(-1.0, 2), (-0.5, 1), (-3.0, 3)], [2, 1, 3]) == (0, 1, 0)  # equal: the first wins


def test_long_contexts_are_cut_from_the_left():
    tok = NullTokenizer(10)
    example = encode_mc_example(tok, MCExample("x:1", "1 2 3 4 5 6", ["7 8", "7"], 0), max_tokens=4)
    assert example.sequences == [[4, 5, 6, 7, 8], [3, 4, 5, 6, 7]]  # 4 model inputs + the last label
    assert example.ending_lengths == [2, 1]
    with pytest.raises(ValueError, match=r"^x:1: ending 1 is 5 tokens, more than --seq-length 4$"):
        encode_mc_example(tok, MCExample("x:1", "1", ["2", "1 2 3 4 5"], 0), max_tokens=4)


# --------------------------------------------------------------------------------------------
# The file format
# --------------------------------------------------------------------------------------------


def test_the_tiny_file_and_hellaswag_field_names(tmp_path):
    examples = read_mc_file(MC_FILE)
    assert len(examples) == 7 and [e.label for e in examples] == [0, 1, 1, 0, 1, 2, 0]
    assert examples[1].context == "every small model reads this sentence many times until it"  # ctx_a + ctx_b
    assert examples[0].where == f"{MC_FILE}:1"
    assert len(read_mc_file(MC_FILE, limit=3)) == 3
    path = tmp_path / "aliases.jsonl"
    path.write_text(json.dumps({"query": "q", "choices": ["a", "b"], "gold": 1}) + "\n\n"
                    + json.dumps({"ctx": "c", "ctx_a": "ignored", "endings": ["a", "b", "c"], "label": "2"}) + "\n")
    a, b = read_mc_file(str(path))
    assert (a.context, a.endings, a.label) == ("q", ["a", "b"], 1)
    assert (b.context, b.label, b.where) == ("c", 2, f"{path}:3")


def test_hellaswag_rows_are_built_as_lm_evals_hellaswag_task(tmp_path):
    """Every row with HellaSwag's full fields: lm-eval's context (activity label, ctx_a, ctx_b
    capitalised) and clean-up (' [title]' -> '. ', bracketed tags removed, double spaces once), its
    request (no token before the context, ' ' + ending, split where the context's own tokens end)."""
    from megatron_ext.training import hellaswag

    assert hellaswag.clean("  a [title] b  [header] c [step] d ") == "a. b  c d"  # one pass of double spaces
    # the same as lm-eval's own clean-up and context, on text where each of its steps matters
    from lm_eval.tasks.hellaswag import utils as lm_eval_hellaswag

    tricky = ["  a [title] b  [header] c [step] d ", "x   y    z", "[a] [b]] c [", "end [title]", " [title] x",
              "Ünïcode  [tag]ß", "no tags", ""]
    for text in tricky:
        assert hellaswag.clean(text) == lm_eval_hellaswag.preprocess(text), text
    row = {"activity_label": " Label [x] ", "ctx_a": "a  b", "ctx_b": "éCOLE [title] then", "endings": [" e1 ", "e  2"],
           "label": "0"}
    theirs = lm_eval_hellaswag.process_docs(__import__("datasets").Dataset.from_list([row]))[0]
    assert (hellaswag.context(row), hellaswag.endings(row)) == (theirs["query"], theirs["choices"])
    rows = [{"activity_label": "Baking cookies", "ctx_a": "A woman  mixes dough [header].", "ctx_b": "then SHE",
             "ctx": "raw context", "endings": ["bakes it [title] Done", "eats  it"], "label": "1"},
            {"activity_label": "1 2", "ctx_a": "3", "ctx_b": "", "endings": ["4 5", "6"], "label": 0}]
    path = tmp_path / "hs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    notes = []
    first, second = read_mc_file(str(path), notes=notes)
    assert first.context == "Baking cookies: A woman mixes dough . Then she" and first.label == 1
    assert first.endings == ["bakes it. Done", "eats it"] and first.rule == "hellaswag"
    assert notes == [f"--eval-mc-file {path}: 2 examples, HellaSwag as lm-eval's hellaswag task builds and scores it"]
    assert second.context == "1 2: 3" and second.endings == ["4 5", "6"]
    tok = NullTokenizer(10)  # text is token ids
    plain_ids = MCExample("x:1", "1 2 3", ["4 5", "6"], 0, rule="hellaswag")
    encoded = encode_mc_example(tok, plain_ids, max_tokens=16)
    assert encoded.sequences == [[1, 2, 3, 4, 5], [1, 2, 3, 6]]  # no end-of-document token in front
    assert encoded.ending_lengths == [2, 1] and encoded.characters == [3, 1]  # acc_norm: the ending alone


GOOD = {"ctx": "c", "endings": ["a", "b"], "label": 0}


@pytest.mark.parametrize("line, message", [
    ("{not json", "malformed JSON"),
    ("[1, 2]", "expected a JSON object, got list"),
    (json.dumps({"endings": ["a", "b"], "label": 0}), "missing field 'ctx' (or 'ctx_a' and 'ctx_b')"),
    (json.dumps({"ctx": 3, "endings": ["a", "b"], "label": 0}), "field 'ctx' must be a string"),
    (json.dumps({"ctx": "c", "label": 0}), "missing field 'endings'"),
    (json.dumps({"ctx": "c", "endings": ["a"], "label": 0}), "must be a list of at least 2 non-empty strings"),
    (json.dumps({"ctx": "c", "endings": ["a", " "], "label": 0}), "must be a list of at least 2 non-empty strings"),
    (json.dumps({"ctx": "c", "endings": ["a", "b"]}), "missing field 'label'"),
    (json.dumps({"ctx": "c", "endings": ["a", "b"], "label": 2}), "label 2 is out of range for 2 endings (0..1)"),
    (json.dumps({"ctx": "c", "endings": ["a", "b"], "label": -1}), "label -1 is out of range"),
    (json.dumps({"ctx": "c", "endings": ["a", "b"], "label": True}), "field 'label' must be an integer"),
])
def test_bad_lines_are_named_by_file_and_line(tmp_path, line, message):
    path = tmp_path / "mc.jsonl"
    path.write_text(json.dumps(GOOD) + "\n" + line + "\n" + json.dumps(GOOD) + "\n")
    with pytest.raises(ValueError) as info:
        read_mc_file(str(path))
    assert str(info.value).startswith(f"{path}:2: ") and message in str(info.value)
    assert "\n" not in str(info.value)


def test_missing_and_empty_files(tmp_path):
    with pytest.raises(ValueError, match="--eval-mc-file: no such file: .*nope.jsonl"):
        read_mc_file(str(tmp_path / "nope.jsonl"))
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(ValueError, match="no examples"):
        read_mc_file(str(tmp_path / "empty.jsonl"))


# --------------------------------------------------------------------------------------------
# Arg-max over a vocabulary split across tensor-parallel ranks
# --------------------------------------------------------------------------------------------

# Rows with ties inside a shard and across the shard boundary (ids 3 and 4), and padded ids
# (>= real vocabulary) holding the largest logits, which must never win.
LOGITS = [[0.0, 2.0, 2.0, 1.0, 0.5, 0.1, 9.0, 9.0],
          [0.0, 1.0, 1.0, 3.0, 3.0, 0.1, 9.0, 9.0],
          [0.0, 1.0, 1.0, 1.0, 3.0, 3.0, 9.0, 9.0],
          [5.0, 1.0, 1.0, 1.0, 1.0, 5.0, 9.0, 9.0]]


def test_argmax_on_one_rank_is_torch_argmax_over_the_real_vocabulary():
    import torch

    logits = torch.tensor(LOGITS)
    assert vocab_parallel_argmax(logits, 6).tolist() == [1, 3, 4, 0]
    assert vocab_parallel_argmax(logits, 6).tolist() == logits[:, :6].argmax(dim=-1).tolist()


@pytest.mark.slow
def test_argmax_split_across_two_ranks_equals_one_rank(tmp_path):
    script = tmp_path / "tp_argmax.py"
    script.write_text(textwrap.dedent(f"""
        import torch, torch.distributed as dist
        from megatron_ext.training.evaluation import vocab_parallel_argmax
        dist.init_process_group("gloo")
        rank = dist.get_rank()
        full = torch.tensor({LOGITS}).reshape(2, 2, 8)  # [s, b, v] as the output layer gives
        for real in (6, 3):  # 3: rank 1's shard is all padding
            shard = full[..., rank * 4:(rank + 1) * 4]
            got = vocab_parallel_argmax(shard, real, rank, 2, None)
            want = full[..., :real].argmax(dim=-1)
            assert torch.equal(got, want), (real, got.tolist(), want.tolist())
        for r in range(2):  # one rank at a time: both write to the same stdout
            if r == rank:
                print("rank", rank, "ok", flush=True)
            dist.barrier()
        dist.destroy_process_group()  # an un-destroyed gloo group can abort at interpreter exit
    """))
    proc = run_module("torch.distributed.run", ["--nproc_per_node", "2", "--master_port", str(free_port()),
                                                str(script)], timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "rank 0 ok" in proc.stdout and "rank 1 ok" in proc.stdout


# --------------------------------------------------------------------------------------------
# The trainer: one repeated sentence, a SentencePiece tokenizer, real .bin/.idx
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    folder = tmp_path_factory.mktemp("sentence")
    text = folder / "corpus.txt"
    text.write_text((SENTENCE + "\n") * 20)
    model = train_sentencepiece([str(text)], str(folder / "sp"), 360)  # 360: every word is one piece
    tok = build_tokenizer("SentencePieceTokenizer", model)
    assert len(tok.tokenize(SENTENCE)) == 15
    builder = IndexedDatasetBuilder(str(folder / "doc.bin"), dtype=np.uint16)
    for i in range(200):  # documents of 1-3 sentences, each closed by the end-of-document token
        ids = tok.tokenize(" ".join([SENTENCE] * (1 + i % 3))) + [tok.eod]
        builder.add_document(np.array(ids, dtype=np.uint16), [len(ids)])
    builder.finalize(str(folder / "doc.idx"))
    return {"model": model, "prefix": str(folder / "doc"), "folder": folder}


def train_args(corpus, name, micro_batch=4):
    return TINY + [
        "--micro-batch-size", str(micro_batch), "--global-batch-size", "4", "--train-iters", "20",
        "--lr", "3e-3", "--lr-decay-style", "constant", "--log-interval", "10",
        "--eval-interval", "10", "--eval-iters", "2", "--eval-at-start", "--split", "90,10,0",
        "--data-path", corpus["prefix"], "--tokenizer-type", "SentencePieceTokenizer",
        "--tokenizer-model", corpus["model"], "--eval-mc-file", MC_FILE,
        "--metrics-file", str(corpus["folder"] / f"{name}.jsonl")]


@pytest.fixture(scope="module")
def dp1(corpus):
    proc = run_trainer(train_args(corpus, "dp1"))
    return proc, corpus["folder"] / "dp1.jsonl"


def test_the_scorer_gets_the_known_answers_right(dp1):
    proc, metrics = dp1
    mc = read_metrics(metrics, "mc_eval")
    assert sorted(mc) == [0, 10, 20]  # --eval-at-start, every --eval-interval, the end
    assert mc[0]["mc_accuracy"] < 0.5  # the untrained model does not know them
    assert mc[20]["mc_accuracy"] == 1.0 and mc[20]["acc"] == 1.0 and mc[20]["acc_norm"] == 1.0
    assert all(r["mc_examples"] == 7 and r["mc_rule"] == "plain" for r in mc.values())
    assert (" multiple-choice eval at iteration 20 | acc: 1.0000 (7/7) | acc_norm: 1.0000 (7/7) | per token: 1.0000 "
            "(7/7) | plain rule | file: mc_tiny.jsonl") in proc.stdout
    # the start-up says which rule builds the examples, and why not lm-eval's HellaSwag here
    assert f"{MC_FILE}: 7 examples, plain: ctx (or ctx_a + ctx_b) as given" in proc.stdout
    assert f"({MC_FILE}:3 lacks activity_label, ctx_a, ctx_b of HellaSwag's full format)" in proc.stdout


def test_validation_records_have_next_token_accuracy(dp1):
    proc, metrics = dp1
    valid = read_metrics(metrics, "validation")
    assert sorted(valid) == [0, 10, 20]
    assert all(0.0 <= r["accuracy"] <= 1.0 for r in valid.values())
    assert valid[0]["accuracy"] < 0.05
    # Only the token after "next" is uncertain (another sentence or the end of the document).
    assert valid[20]["accuracy"] > 0.9
    assert f"| accuracy: {valid[20]['accuracy']:.4f}" in proc.stdout


@pytest.mark.slow
def test_tensor_parallel_accuracy_equals_one_rank(corpus, dp1):
    # Vocabulary padded to 384 as at TP 1 (128 x 2 would give 512): the same initial weights.
    run_trainer(train_args(corpus, "tp2") + ["--tensor-model-parallel-size", "2", "--make-vocab-size-divisible-by",
                                             "64"], nproc=2)
    one = read_metrics(dp1[1], "validation")
    two = read_metrics(corpus["folder"] / "tp2.jsonl", "validation")
    assert sorted(two) == sorted(one)
    for it in one:
        assert two[it]["accuracy"] == one[it]["accuracy"], it
        assert two[it]["lm_loss"] == pytest.approx(one[it]["lm_loss"], rel=1e-3), it


@pytest.mark.slow
def test_data_parallel_mc_accuracy_equals_one_rank(corpus, dp1):
    # 7 examples over 2 ranks: 4 and 3, the second rank runs one uncounted forward.
    run_trainer(train_args(corpus, "dp2", micro_batch=2), nproc=2)
    one = read_metrics(dp1[1], "mc_eval")
    two = read_metrics(corpus["folder"] / "dp2.jsonl", "mc_eval")
    assert sorted(two) == sorted(one)
    for it in one:
        for key in ("mc_accuracy", "acc", "acc_norm", "mc_examples"):
            assert two[it][key] == one[it][key], (it, key)


@pytest.mark.slow
def test_pipeline_parallel_evaluation_equals_one_rank(corpus, dp1):
    """PP 2: validation (loss and accuracy) and multiple-choice scores come from the last stage
    through megatron-core's forward-only schedule (docs/parallelism.md)."""
    run_trainer(train_args(corpus, "pp2") + ["--pipeline-model-parallel-size", "2"], nproc=2)
    for split, keys in (("validation", ("accuracy",)), ("mc_eval", ("mc_accuracy", "acc", "acc_norm",
                                                                    "mc_examples"))):
        one = read_metrics(dp1[1], split)
        two = read_metrics(corpus["folder"] / "pp2.jsonl", split)
        assert sorted(two) == sorted(one) == [0, 10, 20], split
        for it in one:
            assert all(two[it][key] == one[it][key] for key in keys), (split, it)
            if split == "validation":
                assert two[it]["lm_loss"] == pytest.approx(one[it]["lm_loss"], rel=1e-5), it


# --------------------------------------------------------------------------------------------
# Bad input: one line, exit 2, before any work
# --------------------------------------------------------------------------------------------


def _one_line_error(proc):
    assert proc.returncode == 2, proc.stderr[-3000:]
    lines = error_lines(proc.stderr)
    assert len(lines) == 1, proc.stderr[-3000:]
    assert "iteration=" not in proc.stdout
    return lines[0]


def test_bad_mc_file_stops_the_trainer_before_training(corpus, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps(GOOD) + "\n" + json.dumps({"ctx": "c", "endings": ["a", "b"], "label": 5}) + "\n")
    base = TINY + ["--mock-data", "--train-iters", "2", "--tokenizer-model", corpus["model"]]
    line = _one_line_error(run_trainer(base + ["--eval-mc-file", str(bad)], check=False))
    assert f"{bad}:2: label 5 is out of range for 2 endings" in line
    line = _one_line_error(run_trainer(TINY + ["--mock-data", "--train-iters", "2", "--eval-mc-file", MC_FILE],
                                       check=False))
    assert "--eval-mc-file needs a tokenizer" in line


def test_mc_flags_without_a_file_are_rejected():
    from megatron_ext.plan import parse_args

    with pytest.raises(SystemExit) as info:
        parse_args(["--mock-data", "--train-iters", "2", "--eval-mc-interval", "5"], world_size=1)
    assert info.value.code == 2
