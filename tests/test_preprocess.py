"""tools/preprocess_data.py end to end: real subprocesses and worker pools, a real SentencePiece
model, and the output read back with megatron-core's IndexedDataset."""
import json
import os
import subprocess
import sys
import warnings

import numpy as np
import pytest

from megatron_ext.data.preprocess import main, normalise_argv
from megatron_ext.data.tokenizers import build_tokenizer, train_sentencepiece

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOOL = os.path.join(REPO, "tools", "preprocess_data.py")

with warnings.catch_warnings():  # megatron.core warns that Transformer Engine/Apex are absent
    warnings.simplefilter("ignore")
    from megatron.core.datasets.indexed_dataset import IndexedDataset

WORDS = "the quick brown fox jumps over a lazy dog while data models learn tokens fast".split()


def sentence(i):
    return " ".join(WORDS[(i * 7 + j) % len(WORDS)] for j in range(4 + i % 11))


@pytest.fixture(scope="module")
def sp_model(tmp_path_factory):
    folder = tmp_path_factory.mktemp("sp")
    corpus = folder / "corpus.txt"
    corpus.write_text("\n".join(sentence(i) for i in range(300)) + "\nUnicode café 你好\n")
    return train_sentencepiece([str(corpus)], str(folder / "tiny"), vocab_size=320)


@pytest.fixture(scope="module")
def tok(sp_model):
    return build_tokenizer("SentencePieceTokenizer", tokenizer_model=sp_model)


def run_tool(*args, cwd):
    return subprocess.run([sys.executable, TOOL, *map(str, args)], cwd=cwd, capture_output=True,
                          text=True, timeout=300)


def read_docs(prefix):
    ds = IndexedDataset(str(prefix))
    # one sequence per document
    assert list(ds.document_indices) == list(range(len(ds) + 1))
    return ds, [ds[i].tolist() for i in range(len(ds))]


def written_files(folder):
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file())


@pytest.mark.slow
def test_jsonl_two_workers(tmp_path, sp_model, tok):
    texts = [sentence(i) for i in range(40)] + ["Unicode café 你好\nsecond line"]
    texts[5] = texts[17] = ""  # empty documents are skipped, not written as zero-length ones
    with open(tmp_path / "docs.jsonl", "w", encoding="utf-8") as f:
        for i, text in enumerate(texts):
            f.write(json.dumps({"id": i, "text": text}) + ("\n\n" if i == 3 else "\n"))

    # underscore spellings, as some Megatron scripts write them
    r = run_tool("--input", "docs.jsonl", "--output_prefix", "out/corpus", "--json_keys", "text",
                 "--tokenizer_type", "Llama2Tokenizer", "--tokenizer-model", sp_model,
                 "--workers", "2", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert "39 documents" in r.stdout and "2 empty documents skipped" in r.stdout

    ds, docs = read_docs(tmp_path / "out" / "corpus_text_document")
    assert ds.index.dtype == np.uint16
    expected = [tok.tokenize(t) + [tok.eod] for t in texts if t]
    assert docs == expected
    assert all(d[-1] == tok.eod for d in docs)
    assert tok.detokenize(docs[-1]) == texts[-1]
    assert written_files(tmp_path / "out") == ["corpus_text_document.bin",
                                               "corpus_text_document.idx"]


@pytest.mark.slow
def test_plain_text_folder_two_workers(tmp_path, sp_model, tok):
    src = tmp_path / "src"
    (src / "sub").mkdir(parents=True)
    files = {"a.txt": sentence(1) + "\n" + sentence(2) + "\n", "b.md": sentence(3),
             "empty.txt": "", "sub/c.txt": "last file\n"}
    for name, text in files.items():
        (src / name).write_text(text, encoding="utf-8")
    (src / ".hidden").write_text("never read")
    (src / "old_text_document.bin").write_bytes(b"\x00\xff")  # earlier output: not an input

    r = run_tool("--input", src, "--output-prefix", tmp_path / "plain", "--tokenizer-type",
                 "SentencePieceTokenizer", "--tokenizer-model", sp_model, "--workers", "2",
                 cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert "1 empty documents skipped" in r.stdout and "from 4 input files" in r.stdout
    _, docs = read_docs(tmp_path / "plain_text_document")
    # each file is one document, in sorted walk order
    assert docs == [tok.tokenize(files[n]) + [tok.eod] for n in ("a.txt", "b.md", "sub/c.txt")]


def test_split_lines_glob_no_eod(tmp_path, sp_model, tok, capsys):
    (tmp_path / "one.txt").write_text("first line\n\n   \nsecond line\r\n")
    (tmp_path / "two.txt").write_text("third line")
    assert main(["--input", str(tmp_path / "*.txt"), "--text-split-lines", "--no-append-eod",
                 "--output-prefix", str(tmp_path / "lines"), "--tokenizer-type",
                 "SentencePieceTokenizer", "--tokenizer-model", sp_model]) == 0
    assert "3 documents" in capsys.readouterr().out
    _, docs = read_docs(tmp_path / "lines_text_document")
    assert docs == [tok.tokenize(t) for t in ("first line", "second line", "third line")]


def test_several_json_keys(tmp_path, sp_model, tok):
    rows = [{"title": f"title {i}", "body": sentence(i)} for i in range(5)]
    (tmp_path / "d.json").write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert main(["--input", str(tmp_path / "d.json"), "--json-keys", "title", "body",
                 "--output-prefix", str(tmp_path / "multi"), "--tokenizer-type",
                 "SentencePieceTokenizer", "--tokenizer-model", sp_model]) == 0
    for key in ("title", "body"):
        _, docs = read_docs(tmp_path / f"multi_{key}_document")
        assert docs == [tok.tokenize(r[key]) + [tok.eod] for r in rows]


def test_output_feeds_megatron_gpt_dataset(tmp_path, sp_model, tok):
    from megatron.core.datasets.blended_megatron_dataset_builder import (
        BlendedMegatronDatasetBuilder)
    from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig

    (tmp_path / "d.jsonl").write_text(
        "".join(json.dumps({"text": sentence(i)}) + "\n" for i in range(200)))
    assert main(["--input", str(tmp_path / "d.jsonl"), "--output-prefix", str(tmp_path / "g"),
                 "--tokenizer-type", "SentencePieceTokenizer", "--tokenizer-model", sp_model]) == 0
    config = GPTDatasetConfig(
        random_seed=1, sequence_length=32, blend=([str(tmp_path / "g_text_document")], None),
        split="90,10,0", tokenizer=tok, reset_position_ids=False, reset_attention_mask=False,
        eod_mask_loss=False, mid_level_dataset_surplus=0.005)
    train, _, _ = BlendedMegatronDatasetBuilder(GPTDataset, [20, 2, None], lambda: True,
                                                config).build()
    sample = train[0]
    assert sample["tokens"].shape == (32,)
    assert bool(sample["loss_mask"].all())  # pad is -1: no real token is masked as padding
    assert int((sample["tokens"] == tok.eod).sum()) >= 1


def test_underscore_flags_are_normalised():
    assert normalise_argv(["--output_prefix=a_b", "--json_keys", "my_key", "--", "--x_y"]) == \
        ["--output-prefix=a_b", "--json-keys", "my_key", "--", "--x_y"]


# ------------------------------------------------------------------------------- bad inputs

BAD_CASES = {
    "missing input": ("nope.jsonl", [], "no such file or directory: nope.jsonl"),
    "unknown tokenizer": ("good.jsonl", ["--tokenizer-type", "WordPiece"],
                          "unknown tokenizer type 'WordPiece'"),
    "malformed json": ("bad.jsonl", [], "bad.jsonl:2: malformed JSON"),
    "missing key": ("nokey.jsonl", [], "nokey.jsonl:4: no key 'text'"),
    "missing tokenizer model": ("good.jsonl", ["--tokenizer-model", "gone.model"],
                                "--tokenizer-model: no such file: gone.model"),
}


@pytest.mark.parametrize("case", sorted(BAD_CASES))
def test_bad_input_one_line_exit_2_no_output(tmp_path, sp_model, case):
    (tmp_path / "good.jsonl").write_text('{"text": "fine"}\n')
    (tmp_path / "bad.jsonl").write_text('{"text": "fine"}\n{"text": "cut\n')
    (tmp_path / "nokey.jsonl").write_text('{"text": "a"}\n{"text": "b"}\n\n{"body": "c"}\n')
    before = written_files(tmp_path)
    source, extra, message = BAD_CASES[case]
    args = ["--tokenizer-type", "SentencePieceTokenizer", "--tokenizer-model", sp_model, *extra]
    r = run_tool("--input", source, "--output-prefix", "out/data", *args, cwd=tmp_path)
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "error: " in lines[0] and message in lines[0], r.stderr
    assert written_files(tmp_path) == before and not (tmp_path / "out").exists()


def test_all_documents_empty(tmp_path, sp_model, capsys):
    (tmp_path / "e.jsonl").write_text('{"text": ""}\n{"text": ""}\n')
    with pytest.raises(SystemExit) as e:
        main(["--input", str(tmp_path / "e.jsonl"), "--output-prefix", str(tmp_path / "e"),
              "--tokenizer-type", "SentencePieceTokenizer", "--tokenizer-model", sp_model])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "all 2 documents are empty" in err[0]
    assert written_files(tmp_path) == ["e.jsonl"]


def test_tokenizer_failure_names_document(tmp_path, capsys):
    (tmp_path / "ids.txt").write_text("1 2 3\n4 five 6\n")
    with pytest.raises(SystemExit):
        main(["--input", str(tmp_path / "ids.txt"), "--text-split-lines", "--output-prefix",
              str(tmp_path / "n"), "--tokenizer-type", "NullTokenizer", "--vocab-size", "10"])
    assert f"{tmp_path / 'ids.txt'}:2: cannot tokenize" in capsys.readouterr().err
    assert written_files(tmp_path) == ["ids.txt"]
