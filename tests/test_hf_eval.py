"""megatron-ext eval: lm-evaluation-harness on a checkpoint the trainer wrote, offline.

The trainer's --eval-mc-file score and lm_eval's on the same items and checkpoint: a tiny model
trained a few steps on one repeated sentence (SentencePiece tokenizer) scores tests/data/mc_tiny.jsonl
in the trainer (--eval-at-start of a --finetune run: the checkpoint's weights) and through
``eval --mc-file``: lm_eval's acc and acc_norm are the trainer's (the same log-likelihoods and
lengths); the trainer's per-token accuracy is another metric. tests/data/hellaswag_tiny.jsonl, in
HellaSwag's full format, is scored by the trainer exactly as lm_eval's own hellaswag task scores it
(a file where building the context as lm-eval does changes the answer). A built-in task runs on a
local file with --task-data; results land next to the checkpoint; bad input is one line before any
export."""
import glob
import json
import os

import numpy as np
import pytest

from conftest import REPO, TINY, error_lines, read_metrics, run_module, run_trainer
from hf_fixtures import command_env  # noqa: F401 (fixture)

MC_FILE = os.path.join(REPO, "tests", "data", "mc_tiny.jsonl")
HELLASWAG_FILE = os.path.join(REPO, "tests", "data", "hellaswag_tiny.jsonl")
SENTENCE = "every small model reads this sentence many times until it knows which word comes next"


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    from megatron_ext.data.tokenizers import build_tokenizer, train_sentencepiece

    folder = tmp_path_factory.mktemp("hf_eval")
    (folder / "corpus.txt").write_text((SENTENCE + "\n") * 20)
    model = train_sentencepiece([str(folder / "corpus.txt")], str(folder / "sp"), 360)
    tok = build_tokenizer("SentencePieceTokenizer", model)
    builder = IndexedDatasetBuilder(str(folder / "doc.bin"), dtype=np.uint16)
    for i in range(200):
        ids = tok.tokenize(" ".join([SENTENCE] * (1 + i % 3))) + [tok.eod]
        builder.add_document(np.array(ids, dtype=np.uint16), [len(ids)])
    builder.finalize(str(folder / "doc.idx"))
    flags = TINY + ["--micro-batch-size", "4", "--global-batch-size", "4", "--lr", "3e-3",
                    "--lr-decay-style", "constant", "--eval-iters", "0", "--split", "90,10,0",
                    "--data-path", str(folder / "doc"), "--tokenizer-type", "SentencePieceTokenizer",
                    "--tokenizer-model", model]
    run_trainer(flags + ["--train-iters", "8", "--save", str(folder / "run"), "--save-interval", "8"])
    # the trainer's score of the saved weights: a --finetune run scores them before its first step
    run_trainer(flags + ["--train-iters", "1", "--load", str(folder / "run"), "--finetune", "--eval-at-start",
                         "--eval-mc-file", MC_FILE, "--metrics-file", str(folder / "mc.jsonl")])
    return {"run": folder / "run", "trainer": read_metrics(folder / "mc.jsonl", "mc_eval")[0], "folder": folder,
            "flags": flags}


def hf_token_log_probs(folder):
    """The scorer's log-probabilities from the exported model in ``folder`` (transformers, fp32)."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32).eval()

    def token_log_probs(sequences):
        out = []
        for s in sequences:
            with torch.no_grad():
                lp = torch.log_softmax(model(torch.tensor([s])).logits[0].float(), -1)
            out.append([lp[i, s[i + 1]].item() for i in range(len(s) - 1)])
        return out

    return token_log_probs


@pytest.mark.slow
def test_lm_eval_acc_and_acc_norm_are_the_trainers(trained, tmp_path):
    proc = run_module("megatron_ext.cli", ["eval", str(trained["run"]), "--mc-file", MC_FILE, "--log-samples",
                                           "--export-dir", str(tmp_path / "hf")], timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = glob.glob(str(trained["run"] / "lm_eval_global_step8_*.json"))  # next to the checkpoint
    assert len(results) == 1 and f"wrote {results[0]}" in proc.stdout
    data = json.load(open(results[0]))
    metrics = data["results"]["mc_tiny"]
    trainer = trained["trainer"]
    assert trainer["mc_rule"] == "plain"  # mc_tiny.jsonl: line 3 lacks HellaSwag's full fields
    assert (metrics["acc,none"], metrics["acc_norm,none"]) == (trainer["acc"], trainer["acc_norm"])
    # per item: lm_eval's log-likelihoods are the trainer's scorer's, on the exported model
    from megatron_ext.data.tokenizers import build_tokenizer
    from megatron_ext.training.evaluation import choose, encode_mc_example, ending_log_likelihoods, read_mc_file

    token_log_probs = hf_token_log_probs(tmp_path / "hf")
    tok = build_tokenizer("SentencePieceTokenizer", str(trained["folder"] / "sp.model"))
    samples = sorted(data["samples"]["mc_tiny"], key=lambda s: s["doc_id"])
    per_token_hits = 0
    for example, sample in zip(read_mc_file(MC_FILE), samples):
        encoded = encode_mc_example(tok, example, 64)
        ours = ending_log_likelihoods(encoded, token_log_probs)
        theirs = [float(r[0][0]) for r in sample["resps"]]
        assert [s for s, _ in ours] == pytest.approx(theirs, abs=1e-4)
        choice = choose(ours, encoded.characters)
        assert (choice.acc == example.label, choice.acc_norm == example.label) == (sample["acc"], sample["acc_norm"])
        per_token_hits += choice.per_token == example.label
    assert per_token_hits / len(samples) == pytest.approx(trainer["mc_accuracy"], abs=1e-12)
    # reported in docs/huggingface.md: how far the per-token and per-character normalisations land apart
    print(f"trainer per-token {trainer['mc_accuracy']:.4f}, acc {trainer['acc']:.4f}, acc_norm {trainer['acc_norm']:.4f}; "
          f"lm_eval acc {metrics['acc,none']:.4f}, acc_norm {metrics['acc_norm,none']:.4f}, "
          f"acc_bytes {metrics['acc_bytes,none']:.4f}")


@pytest.mark.slow
def test_in_training_hellaswag_is_lm_evals_hellaswag_on_the_same_checkpoint(trained, tmp_path):
    """tests/data/hellaswag_tiny.jsonl (HellaSwag's full format, text this model never saw as such):
    the trainer's acc and acc_norm are lm_eval's hellaswag task's on the same checkpoint, exactly; on
    this file building the context as lm-eval does (activity label, capitalised ctx_b, the clean-up)
    changes the answer, so the plain rule would not give lm_eval's numbers."""
    run_trainer(trained["flags"] + ["--train-iters", "1", "--load", str(trained["run"]), "--finetune",
                                    "--eval-at-start", "--eval-mc-file", HELLASWAG_FILE,
                                    "--metrics-file", str(tmp_path / "mc.jsonl")])
    trainer = read_metrics(tmp_path / "mc.jsonl", "mc_eval")[0]
    assert trainer["mc_rule"] == "hellaswag" and trainer["mc_examples"] == 20
    out = tmp_path / "res.json"
    proc = run_module("megatron_ext.cli", ["eval", str(trained["run"]), "--tasks", "hellaswag", "--task-data",
                                           f"hellaswag={HELLASWAG_FILE}", "--mc-file", HELLASWAG_FILE, "--log-samples",
                                           "--export-dir", str(tmp_path / "hf"), "--output", str(out)], timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    data = json.load(open(out))
    lm_eval = data["results"]["hellaswag"]
    assert (lm_eval["acc,none"], lm_eval["acc_norm,none"]) == (trainer["acc"], trainer["acc_norm"])
    bridged = data["results"]["mc_hellaswag_tiny"]  # --mc-file of the same file: the same requests
    assert (bridged["acc,none"], bridged["acc_norm,none"]) == (trainer["acc"], trainer["acc_norm"])
    # the plain rule (ctx as given, after the end-of-document token) on the same export: other answers
    from megatron_ext.data.tokenizers import build_tokenizer
    from megatron_ext.training.evaluation import (
        PLAIN, choose, encode_mc_example, ending_log_likelihoods, parse_mc_record, read_mc_file)

    token_log_probs = hf_token_log_probs(tmp_path / "hf")
    tok = build_tokenizer("SentencePieceTokenizer", str(trained["folder"] / "sp.model"))
    samples = sorted(data["samples"]["hellaswag"], key=lambda s: s["doc_id"])
    plain = {"acc": 0, "acc_norm": 0}
    for example, sample, row in zip(read_mc_file(HELLASWAG_FILE), samples, map(json.loads, open(HELLASWAG_FILE))):
        encoded = encode_mc_example(tok, example, 64)
        ours = ending_log_likelihoods(encoded, token_log_probs)
        assert [s for s, _ in ours] == pytest.approx([float(r[0][0]) for r in sample["resps"]], abs=1e-4)
        choice = choose(ours, encoded.characters)
        assert (choice.acc == example.label, choice.acc_norm == example.label) == (sample["acc"], sample["acc_norm"])
        as_plain = encode_mc_example(tok, parse_mc_record(row, example.where, PLAIN), 64)
        picked = choose(ending_log_likelihoods(as_plain, token_log_probs), as_plain.characters)
        plain["acc"] += picked.acc == example.label
        plain["acc_norm"] += picked.acc_norm == example.label
    n = len(samples)
    assert (plain["acc"] / n, plain["acc_norm"] / n) != (lm_eval["acc,none"], lm_eval["acc_norm,none"])
    print(f"hellaswag_tiny: trainer acc {trainer['acc']:.4f}, acc_norm {trainer['acc_norm']:.4f} = lm_eval's; "
          f"the plain rule would give acc {plain['acc'] / n:.4f}, acc_norm {plain['acc_norm'] / n:.4f}")


@pytest.mark.slow
def test_builtin_task_on_local_data_and_one_line_errors(trained, tmp_path):
    # HellaSwag rows as its dataset has them (the mc file's first 4 lines carry every field)
    rows = [json.loads(l) for l in open(MC_FILE)][:2]
    data = tmp_path / "hellaswag_val.jsonl"
    with open(data, "w") as f:
        for r in rows:
            f.write(json.dumps({**r, "ctx_b": r.get("ctx_b", ""), "label": str(r["label"])}) + "\n")
    hf = tmp_path / "hf"
    export = run_module("megatron_ext.cli", ["export-hf", str(trained["run"]), str(hf)], timeout=300)
    assert export.returncode == 0, export.stderr[-2000:]
    out = tmp_path / "res.json"
    proc = run_module("megatron_ext.cli", ["eval", str(hf), "--tasks", "hellaswag", "--task-data",
                                           f"hellaswag={data}", "--limit", "2", "--output", str(out)], timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.load(open(out))
    assert set(result["results"]["hellaswag"]) >= {"acc,none", "acc_norm,none"}
    assert result["n-samples"]["hellaswag"]["effective"] == 2
    before = sorted(os.listdir(trained["run"]))
    # a built-in task whose data is not in the local cache: one line, before anything is exported
    proc = run_module("megatron_ext.cli", ["eval", str(trained["run"]), "--tasks", "hellaswag"],
                      env={"HF_DATASETS_CACHE": str(tmp_path / "empty")}, timeout=600)
    assert proc.returncode == 2, proc.stderr[-3000:]
    lines = error_lines(proc.stderr)
    assert len(lines) == 1 and "task hellaswag: its data cannot be loaded offline" in lines[0], proc.stderr[-2000:]
    assert sorted(os.listdir(trained["run"])) == before  # nothing exported, nothing written


def test_eval_input_errors_are_one_line(tmp_path, capsys, command_env):  # noqa: F811
    from megatron_ext.cli import main

    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"ctx": "c", "endings": ["a", "b"], "label": 7}\n')
    # HellaSwag rows without ctx_a (the trainer takes them, lm_eval's hellaswag task does not), and a
    # folder that passes for a Hugging Face model (the rows are checked before it is read)
    rows = [json.loads(line) for line in open(HELLASWAG_FILE)][:3]
    no_ctx_a = tmp_path / "no_ctx_a.jsonl"
    no_ctx_a.write_text("".join(json.dumps({k: v for k, v in r.items() if k != "ctx_a"}) + "\n" for r in rows))
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text("{}")
    (model / "model.safetensors").write_bytes(b"")
    for argv, expected in [
        ([str(tmp_path / "missing"), "--tasks", "x"], "no such checkpoint or model directory"),
        ([str(tmp_path), "--mc-file", str(bad)], "not a checkpoint"),
        ([str(tmp_path), "--limit", "0"], "--limit: must be positive"),
        ([str(model), "--tasks", "hellaswag", "--task-data", f"hellaswag={no_ctx_a}"],
         f"--task-data hellaswag={no_ctx_a}: line 1 lacks ctx_a; lm_eval's hellaswag task reads activity_label, "
         "ctx_a, ctx_b, endings, label from every row"),
    ]:
        capsys.readouterr()
        try:
            code = main(["eval", *argv])
        except SystemExit as e:  # argparse's own exit for a bad option value
            code = e.code
        err = capsys.readouterr().err
        lines = error_lines(err)
        assert code == 2 and len(lines) == 1 and expected in lines[0], err
