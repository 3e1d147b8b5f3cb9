"""megatron-ext eval: lm-evaluation-harness on a checkpoint the trainer wrote, offline.

The trainer's --eval-mc-file score and lm_eval's on the same items and checkpoint: a tiny model
trained a few steps on one repeated sentence (SentencePiece tokenizer) scores tests/data/mc_tiny.jsonl
in the trainer (--eval-at-start of a --finetune run: the checkpoint's weights) and through
``eval --mc-file``: lm_eval's acc equals the trainer's unnormalised accuracy (the same
log-likelihoods), acc_norm (per character) differs from the trainer's per-token normalised accuracy.
A built-in task (hellaswag) runs on a local file with --task-data; results land next to the
checkpoint; bad input is one line before any export."""
import glob
import json
import os

import numpy as np
import pytest

from conftest import REPO, TINY, error_lines, read_metrics, run_module, run_trainer
from hf_fixtures import command_env  # noqa: F401 (fixture)

MC_FILE = os.path.join(REPO, "tests", "data", "mc_tiny.jsonl")
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
    return {"run": folder / "run", "trainer": read_metrics(folder / "mc.jsonl", "mc_eval")[0], "folder": folder}


@pytest.mark.slow
def test_lm_eval_acc_is_the_trainers_unnormalised_accuracy(trained, tmp_path):
    proc = run_module("megatron_ext.cli", ["eval", str(trained["run"]), "--mc-file", MC_FILE, "--log-samples",
                                           "--export-dir", str(tmp_path / "hf")], timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = glob.glob(str(trained["run"] / "lm_eval_global_step8_*.json"))  # next to the checkpoint
    assert len(results) == 1 and f"wrote {results[0]}" in proc.stdout
    data = json.load(open(results[0]))
    metrics = data["results"]["mc_tiny"]
    trainer = trained["trainer"]
    assert metrics["acc,none"] == pytest.approx(trainer["mc_accuracy_unnormalized"], abs=1e-12)
    # per item: lm_eval's log-likelihoods are the trainer's scorer's, on the exported model
    import torch
    from transformers import AutoModelForCausalLM

    from megatron_ext.data.tokenizers import build_tokenizer
    from megatron_ext.training.evaluation import encode_mc_example, ending_log_likelihoods, read_mc_file

    model = AutoModelForCausalLM.from_pretrained(str(tmp_path / "hf"), dtype=torch.float32).eval()
    tok = build_tokenizer("SentencePieceTokenizer", str(trained["folder"] / "sp.model"))

    def token_log_probs(sequences):
        out = []
        for s in sequences:
            with torch.no_grad():
                lp = torch.log_softmax(model(torch.tensor([s])).logits[0].float(), -1)
            out.append([lp[i, s[i + 1]].item() for i in range(len(s) - 1)])
        return out

    samples = sorted(data["samples"]["mc_tiny"], key=lambda s: s["doc_id"])
    per_token_hits = per_char_hits = 0
    for example, sample in zip(read_mc_file(MC_FILE), samples):
        ours = ending_log_likelihoods(encode_mc_example(tok, example, 64), token_log_probs)
        theirs = [float(r[0][0]) for r in sample["resps"]]
        assert [s for s, _ in ours] == pytest.approx(theirs, abs=1e-4)
        per_token_hits += max(range(len(ours)), key=lambda k: ours[k][0] / ours[k][1]) == example.label
        per_char_hits += sample["acc_norm"]
    assert per_token_hits / len(samples) == pytest.approx(trainer["mc_accuracy"], abs=1e-12)
    assert per_char_hits / len(samples) == pytest.approx(metrics["acc_norm,none"], abs=1e-12)
    # reported in docs/huggingface.md: how far the two normalisations land apart on these items
    print(f"trainer per-token {trainer['mc_accuracy']:.4f}, unnormalised {trainer['mc_accuracy_unnormalized']:.4f}; "
          f"lm_eval acc {metrics['acc,none']:.4f}, acc_norm {metrics['acc_norm,none']:.4f}, "
          f"acc_bytes {metrics['acc_bytes,none']:.4f}")


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
    for argv, expected in [
        ([str(tmp_path / "missing"), "--tasks", "x"], "no such checkpoint or model directory"),
        ([str(tmp_path), "--mc-file", str(bad)], "not a checkpoint"),
        ([str(tmp_path), "--limit", "0"], "--limit: must be positive"),
    ]:
        capsys.readouterr()
        try:
            code = main(["eval", *argv])
        except SystemExit as e:  # argparse's own exit for a bad option value
            code = e.code
        err = capsys.readouterr().err
        lines = error_lines(err)
        assert code == 2 and len(lines) == 1 and expected in lines[0], err
