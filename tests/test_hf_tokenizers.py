"""Tokenizers for Hugging Face: every training tokenizer exported so that transformers encodes to
training's ids (SentencePiece BPE and Unigram converted, including an appended end-of-document id;
GPT-2 BPE; tokenizer.json files and folders), and HFTokenizer reading a folder without
tokenizer.json through transformers."""
import os

import pytest

from hf_fixtures import SAMPLES, byte_level_tokenizer, corpus_lines
from megatron_ext.data.tokenizers import build_tokenizer, train_sentencepiece

TEXTS = list(SAMPLES) + corpus_lines()[:80] + [" ", "  x  ", "\n\nx", "x" * 50, "ünïcödé 🙂 mixed  spaces\t"]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    path = tmp_path_factory.mktemp("tok_corpus") / "corpus.txt"
    path.write_text("\n".join(corpus_lines()) + "\n", encoding="utf-8")
    return str(path)


def export_and_compare(tok, source, out, texts=TEXTS):
    from transformers import AutoTokenizer

    from megatron_ext.hf import tokenizer_export

    os.makedirs(out)
    files = tokenizer_export.write(tok, str(out), source)
    assert "tokenizer_config.json" in files
    assert tokenizer_export.check(str(out), tok, texts) == len(texts)
    hf = AutoTokenizer.from_pretrained(str(out))
    for text in texts:
        assert hf.encode(text) == tok.tokenize(text), text
    assert hf.eos_token_id == tok.eod
    return hf


@pytest.mark.parametrize("model_type", ["bpe", "unigram"])
def test_sentencepiece_exports_with_training_ids_and_no_bos(corpus, tmp_path, model_type):
    path = train_sentencepiece([corpus], str(tmp_path / "sp"), vocab_size=400, model_type=model_type)
    tok = build_tokenizer("SentencePieceTokenizer", tokenizer_model=path)
    hf = export_and_compare(tok, path, tmp_path / "hf")
    assert hf.encode("hello")[0] != tok.bos  # training added no begin-of-text token
    assert hf.decode(hf.encode(SAMPLES[1])) == SAMPLES[1]


NON_LATIN = ["Unicode: café, naïve, Ωμέγα, 你好, emoji 🙂", "你好 world", "🙂", "Ωμέγα", " 你好  x ", "a\u2047b"]


@pytest.mark.parametrize("model_type", ["bpe", "unigram"])
def test_sentencepiece_without_byte_fallback_decodes_unknown_pieces_as_sentencepiece(tmp_path, model_type):
    """English-only pieces and no byte fallback (many custom and older models): the text outside the
    pieces is the unknown piece, which SentencePiece decodes as ' \u2047 ' and the export must too."""
    import sentencepiece

    english = tmp_path / "english.txt"
    english.write_text("\n".join(line for line in corpus_lines() if line.isascii()) + "\n", encoding="utf-8")
    sentencepiece.SentencePieceTrainer.train(input=str(english), model_prefix=str(tmp_path / "nobf"), vocab_size=120,
                                             model_type=model_type, byte_fallback=False, hard_vocab_limit=False,
                                             minloglevel=2)
    tok = build_tokenizer("SentencePieceTokenizer", tokenizer_model=str(tmp_path / "nobf.model"))
    assert " \u2047 " in tok.detokenize(tok.tokenize(NON_LATIN[0]))  # unknown pieces are there
    hf = export_and_compare(tok, str(tmp_path / "nobf.model"), tmp_path / "hf", TEXTS + NON_LATIN)
    for text in TEXTS + NON_LATIN:
        ids = tok.tokenize(text)
        assert hf.decode(ids) == tok.detokenize(ids), text


def test_sentencepiece_without_eos_keeps_the_appended_id(corpus, tmp_path):
    import sentencepiece

    # SentencePiece's defaults otherwise: NFKC normalisation and extra whitespace removed (converted too)
    sentencepiece.SentencePieceTrainer.train(input=corpus, model_prefix=str(tmp_path / "noeos"), vocab_size=330,
                                             model_type="bpe", byte_fallback=True, eos_id=-1, pad_id=-1, minloglevel=2)
    tok = build_tokenizer("SentencePieceTokenizer", tokenizer_model=str(tmp_path / "noeos.model"))
    assert tok.eod == tok.vocab_size - 1  # one id past the pieces
    hf = export_and_compare(tok, str(tmp_path / "noeos.model"), tmp_path / "hf")
    assert hf.convert_ids_to_tokens(tok.eod) == "</s>" and len(hf) == tok.vocab_size


def test_gpt2_bpe_and_tokenizer_json_export(tmp_path):
    import json

    folder = tmp_path / "bl"
    byte_level_tokenizer(folder)
    config = json.loads((folder / "tokenizer_config.json").read_text())
    tok = build_tokenizer("HFTokenizer", tokenizer_model=str(folder / "tokenizer.json"))  # a lone tokenizer.json
    export_and_compare(tok, str(folder / "tokenizer.json"), tmp_path / "from_json")
    tok = build_tokenizer("HFTokenizer", tokenizer_model=str(folder))  # a folder: its files are copied
    export_and_compare(tok, str(folder), tmp_path / "from_folder")
    assert json.loads((tmp_path / "from_folder" / "tokenizer_config.json").read_text()) == config
    # GPT-2 vocab.json + merges.txt
    from tokenizers import ByteLevelBPETokenizer

    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(corpus_lines(), vocab_size=400, special_tokens=["<|endoftext|>"], show_progress=False)
    os.makedirs(tmp_path / "gpt2")
    vocab, merges = bpe.save_model(str(tmp_path / "gpt2"))
    tok = build_tokenizer("GPT2BPETokenizer", vocab_file=vocab, merge_file=merges)
    export_and_compare(tok, vocab, tmp_path / "from_gpt2")


def test_hf_tokenizer_folder_without_tokenizer_json_goes_through_transformers(corpus, tmp_path):
    """A Llama-2 style folder: tokenizer.model and tokenizer_config.json only."""
    import shutil

    path = train_sentencepiece([corpus], str(tmp_path / "sp"), vocab_size=400)
    folder = tmp_path / "llama2"
    folder.mkdir()
    shutil.copy(path, folder / "tokenizer.model")
    (folder / "tokenizer_config.json").write_text('{"tokenizer_class": "LlamaTokenizer", "add_bos_token": true}')
    tok = build_tokenizer("HFTokenizer", tokenizer_model=str(folder))
    from transformers import AutoTokenizer

    reference = AutoTokenizer.from_pretrained(str(folder))
    for text in SAMPLES:
        assert tok.tokenize(text) == reference.encode(text)  # what Megatron-DeepSpeed's AutoTokenizer gives
    assert tok.tokenize("hello")[0] == tok.bos == 1  # this folder's config adds the begin-of-text token
