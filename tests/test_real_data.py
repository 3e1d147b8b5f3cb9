"""The whole data path on real files: a SentencePiece tokenizer trained here, tools/preprocess_data.py,
a weighted data file list over two corpora, megatron-core blended datasets with a cache, training."""
import json
import random

import pytest

from conftest import TINY, read_metrics, run_trainer, run_module
from megatron_ext.data.tokenizers import train_sentencepiece

WORDS = ("the model reads tokens and learns which word comes next in a sentence while the loss "
         "falls as training goes on and the data repeats").split()


def write_corpus(path, n_docs, seed):
    rng = random.Random(seed)
    with open(path, "w") as f:
        for _ in range(n_docs):
            start = rng.randrange(len(WORDS))
            text = " ".join(WORDS[(start + k) % len(WORDS)] for k in range(rng.randint(20, 60)))
            f.write(json.dumps({"text": text}) + "\n")


@pytest.mark.slow
def test_train_on_preprocessed_corpora_from_a_data_file_list(tmp_path):
    write_corpus(tmp_path / "a.jsonl", 300, 1)
    write_corpus(tmp_path / "b.jsonl", 200, 2)
    model = train_sentencepiece([str(tmp_path / "a.jsonl")], str(tmp_path / "sp"), 400)
    for name in ("a", "b"):
        run_module("tools.preprocess_data", ["--input", str(tmp_path / f"{name}.jsonl"), "--output-prefix",
                                             str(tmp_path / name), "--tokenizer-type", "SentencePieceTokenizer",
                                             "--tokenizer-model", model, "--workers", "2"], check=True)
    data_list = tmp_path / "data.txt"
    data_list.write_text(f"# two corpora\n0.7 {tmp_path}/a_text_document corpus_a\n"
                         f"0.3 {tmp_path}/b_text_document corpus_b  # trailing comment\n")
    cache = tmp_path / "cache"
    args = TINY + ["--train-iters", "40", "--lr", "3e-3", "--micro-batch-size", "4", "--split", "90,10,0",
                   "--data-file-list", str(data_list), "--data-cache-path", str(cache),
                   "--tokenizer-type", "SentencePieceTokenizer", "--tokenizer-model", model,
                   "--eval-interval", "20", "--eval-iters", "2", "--save", str(tmp_path / "run")]
    proc = run_trainer(args)
    assert "(padded 512)" in proc.stdout
    valid = read_metrics(tmp_path / "run" / "metrics.jsonl", "validation")
    assert sorted(valid) == [20, 40]
    train = read_metrics(tmp_path / "run" / "metrics.jsonl")
    assert train[1]["lm_loss"] > 5.0  # ~ln(400) at the start
    assert valid[40]["lm_loss"] < train[1]["lm_loss"] - 2.0, (train[1]["lm_loss"], valid[40]["lm_loss"])
    assert any(cache.rglob("*.npy"))  # megatron-core's index cache was written and is reused next time
