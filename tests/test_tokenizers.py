"""Tokenizers: each type round-trips, names the right eod, never pads with a real id, and fails
with messages that name the flag to fix. Real models are trained here on a tiny corpus."""
import json
import os
import re

import pytest

from megatron_ext.data.tokenizers import build_tokenizer, train_sentencepiece

SAMPLES = ["Hello world, this is a tiny corpus.",
           "  two  spaces\nnew line\ttab and trailing space ",
           "Unicode: café, naïve, Ωμέγα, 你好, emoji 🙂",
           "numbers 12345 and 3.14159"]


def corpus_lines():
    words = "the quick brown fox jumps over a lazy dog while data models learn tokens".split()
    lines = [" ".join(words[(i + j) % len(words)] for j in range(3 + i % 9)) for i in range(300)]
    return lines + SAMPLES


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    path = tmp_path_factory.mktemp("corpus") / "corpus.txt"
    path.write_text("\n".join(corpus_lines()) + "\n", encoding="utf-8")
    return str(path)


@pytest.fixture(scope="module")
def sp_model(corpus, tmp_path_factory):
    folder = tmp_path_factory.mktemp("sp")
    return train_sentencepiece([corpus], str(folder / "tiny"), vocab_size=320)


def train_hf(corpus, path, special_tokens):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train([corpus], trainers.BpeTrainer(
        vocab_size=400, special_tokens=special_tokens, show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok.save(str(path))
    return str(path)


@pytest.fixture(scope="module")
def hf_json(corpus, tmp_path_factory):
    folder = tmp_path_factory.mktemp("hf")
    return train_hf(corpus, folder / "tokenizer.json", ["<unk>", "<s>", "</s>"])


@pytest.fixture(scope="module")
def gpt2_files(corpus, tmp_path_factory):
    from tokenizers import ByteLevelBPETokenizer

    folder = tmp_path_factory.mktemp("gpt2")
    tok = ByteLevelBPETokenizer()
    tok.train([corpus], vocab_size=400, min_frequency=1, special_tokens=["<|endoftext|>"],
              show_progress=False)
    vocab, merges = tok.save_model(str(folder))
    return vocab, merges


def check_common(tok):
    assert tok.pad == -1
    assert isinstance(tok.vocab_size, int) and 0 <= tok.eod < tok.vocab_size
    assert tok.eos == tok.eod
    json.dumps(tok.unique_identifiers)  # megatron-core hashes it into its cache names
    for text in SAMPLES:
        ids = tok.tokenize(text)
        assert ids and all(isinstance(i, int) and 0 <= i < tok.vocab_size for i in ids)
        assert tok.detokenize(ids) == text


# ------------------------------------------------------------------------------- SentencePiece

@pytest.mark.parametrize("type_name", ["SentencePieceTokenizer", "GPTSentencePieceTokenizer",
                                       "Llama2Tokenizer", "sentencepiecetokenizer"])
def test_sentencepiece_round_trip(sp_model, type_name):
    import sentencepiece

    tok = build_tokenizer(type_name, tokenizer_model=sp_model)
    sp = sentencepiece.SentencePieceProcessor(model_file=sp_model)
    check_common(tok)
    assert tok.name == "SentencePieceTokenizer"
    assert tok.vocab_size == sp.get_piece_size()
    assert (tok.eod, tok.bos) == (sp.eos_id(), sp.bos_id()) == (2, 1)
    assert tok.tokenize(SAMPLES[0]) == sp.encode(SAMPLES[0])
    assert tok.detokenize(tok.tokenize(SAMPLES[0]) + [tok.eod]) == SAMPLES[0]


def test_sentencepiece_model_folder(sp_model, tmp_path):
    os.symlink(sp_model, tmp_path / "tokenizer.model")
    assert build_tokenizer("Llama2Tokenizer", tokenizer_model=str(tmp_path)).eod == 2


def test_sentencepiece_without_eos_gets_an_extra_id(corpus, tmp_path):
    import sentencepiece

    sentencepiece.SentencePieceTrainer.train(
        input=corpus, model_prefix=str(tmp_path / "noeos"), vocab_size=330, model_type="bpe",
        byte_fallback=True, eos_id=-1, pad_id=-1, minloglevel=2)
    tok = build_tokenizer("SentencePieceTokenizer", tokenizer_model=str(tmp_path / "noeos.model"))
    model = sentencepiece.SentencePieceProcessor(model_file=str(tmp_path / "noeos.model"))
    n = model.get_piece_size()
    assert (tok.eod, tok.vocab_size) == (n, n + 1)
    assert tok.detokenize(tok.tokenize("hello world") + [tok.eod]) == "hello world"


def test_train_sentencepiece_vocab_is_a_soft_limit(corpus, tmp_path):
    path = train_sentencepiece([corpus], str(tmp_path / "sub" / "big"), vocab_size=50000)
    tok = build_tokenizer("SentencePieceTokenizer", tokenizer_model=path)
    assert os.path.isfile(path) and tok.vocab_size < 50000
    check_common(tok)


def test_train_sentencepiece_on_json_lines(tmp_path):
    rows = [{"text": line, "id": i} for i, line in enumerate(corpus_lines())]
    (tmp_path / "c.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    tok = build_tokenizer("SentencePieceTokenizer", tokenizer_model=train_sentencepiece(
        [str(tmp_path / "c.jsonl")], str(tmp_path / "js"), vocab_size=320))
    check_common(tok)

    (tmp_path / "bad.jsonl").write_text('{"text": "fine"}\n{"text": "cut\n')
    with pytest.raises(ValueError, match="bad.jsonl:2: malformed JSON"):
        train_sentencepiece([str(tmp_path / "c.jsonl"), str(tmp_path / "bad.jsonl")],
                            str(tmp_path / "bad"), vocab_size=320)
    assert not (tmp_path / "bad.model").exists()


# ---------------------------------------------------------------------------------- HF / GPT-2

@pytest.mark.parametrize("type_name", ["HFTokenizer", "HuggingFaceTokenizer", "hftokenizer"])
def test_hf_tokenizer_file_and_folder(hf_json, type_name):
    from tokenizers import Tokenizer

    raw = Tokenizer.from_file(hf_json)
    for model in (hf_json, os.path.dirname(hf_json)):
        tok = build_tokenizer(type_name, tokenizer_model=model)
        check_common(tok)
        assert tok.name == "HFTokenizer"
        assert tok.eod == raw.token_to_id("</s>") and tok.bos == raw.token_to_id("<s>")
        assert tok.vocab_size == raw.get_vocab_size(with_added_tokens=True)
        assert tok.tokenize(SAMPLES[2]) == raw.encode(SAMPLES[2]).ids


def test_hf_tokenizer_without_eos_says_what_to_add(corpus, tmp_path):
    path = train_hf(corpus, tmp_path / "tokenizer.json", ["<unk>"])
    with pytest.raises(ValueError, match="no end-of-document token.*add one of </s>"):
        build_tokenizer("HFTokenizer", tokenizer_model=path)


def test_flagscale_types_are_hf_tokenizers_with_flagscale_end_of_document(corpus, tmp_path):
    """FlagScale's (OpenSeek's) types over a Hugging Face tokenizer: HFTokenizer, ending documents
    where FlagScale does: QwenTokenizerFS with <|extra_204|>, HFTokenizerFS with the folder's own
    eos_token (here not the first of EOS_CANDIDATES), HFTokenizersTokenizerFS with <|endoftext|>."""
    folder = tmp_path / "qwen"
    folder.mkdir()
    path = train_hf(corpus, folder / "tokenizer.json", ["</s>", "<|endoftext|>", "<|extra_203|>", "<|extra_204|>"])
    (folder / "tokenizer_config.json").write_text(json.dumps({"eos_token": {"content": "<|extra_203|>"}}))
    from tokenizers import Tokenizer

    vocab = Tokenizer.from_file(path).get_vocab(with_added_tokens=True)
    assert build_tokenizer("HFTokenizer", tokenizer_model=str(folder)).eod == vocab["</s>"]
    expected = {"QwenTokenizerFS": "<|extra_204|>", "Qwen2TokenizerFS": "<|extra_204|>",
                "HFTokenizerFS": "<|extra_203|>", "Llama3TokenizerFS": "<|extra_203|>"}
    for type_name, eod in expected.items():
        tok = build_tokenizer(type_name, tokenizer_model=str(folder))
        assert tok.name == "HFTokenizer" and tok.eod == vocab[eod], type_name
        assert tok.tokenize(SAMPLES[0]) == build_tokenizer("HFTokenizer", tokenizer_model=str(folder)).tokenize(SAMPLES[0])
    assert build_tokenizer("HFTokenizersTokenizerFS", tokenizer_model=path).eod == vocab["<|endoftext|>"]
    plain = train_hf(corpus, tmp_path / "plain.json", ["</s>"])
    with pytest.raises(ValueError, match=r"no <\|extra_204\|> token in the vocabulary"):
        build_tokenizer("QwenTokenizerFS", tokenizer_model=plain)


def test_gpt2_bpe(gpt2_files):
    vocab, merges = gpt2_files
    tok = build_tokenizer("GPT2BPETokenizer", vocab_file=vocab, merge_file=merges)
    check_common(tok)
    with open(vocab, encoding="utf-8") as f:
        assert tok.eod == json.load(f)["<|endoftext|>"]


def test_gpt2_bpe_without_endoftext(gpt2_files, tmp_path):
    vocab, merges = gpt2_files
    with open(vocab, encoding="utf-8") as f:
        entries = json.load(f)
    del entries["<|endoftext|>"]
    (tmp_path / "vocab.json").write_text(json.dumps(entries), encoding="utf-8")
    with pytest.raises(ValueError, match=re.escape("has no <|endoftext|> token")):
        build_tokenizer("GPT2BPETokenizer", vocab_file=str(tmp_path / "vocab.json"),
                        merge_file=merges)


# -------------------------------------------------------------------------------------- Null

def test_null_tokenizer():
    tok = build_tokenizer("NullTokenizer", vocab_size=100)
    assert (tok.vocab_size, tok.eod, tok.pad, tok.bos) == (100, 99, -1, None)
    assert tok.tokenize(" 1 2\n3  98 ") == [1, 2, 3, 98]
    assert tok.detokenize([1, 2, 3]) == "1 2 3"
    with pytest.raises(ValueError, match="'x' is not an integer"):
        tok.tokenize("1 x")
    with pytest.raises(ValueError, match="outside"):
        tok.tokenize("100")


# ------------------------------------------------------------------------------------ errors

def test_unknown_type_lists_known_types():
    with pytest.raises(ValueError) as e:
        build_tokenizer("BertWordPiece")
    message = str(e.value)
    assert "\n" not in message and "'BertWordPiece'" in message
    for name in ("SentencePieceTokenizer", "HFTokenizer", "GPT2BPETokenizer", "NullTokenizer",
                 "Llama2Tokenizer", "HuggingFaceTokenizer"):
        assert name in message


@pytest.mark.parametrize("type_name,kwargs,flag", [
    ("SentencePieceTokenizer", {"tokenizer_model": "missing.model"}, "--tokenizer-model"),
    ("HFTokenizer", {"tokenizer_model": "missing/tokenizer.json"}, "--tokenizer-model"),
    ("GPT2BPETokenizer", {"vocab_file": "missing.json", "merge_file": "m.txt"}, "--vocab-file"),
])
def test_missing_file_names_flag_and_path(tmp_path, type_name, kwargs, flag):
    kwargs = {k: str(tmp_path / v) for k, v in kwargs.items()}
    with pytest.raises(FileNotFoundError) as e:
        build_tokenizer(type_name, **kwargs)
    assert flag in str(e.value) and str(tmp_path / "missing") in str(e.value)


def test_missing_merge_file_names_flag(gpt2_files, tmp_path):
    with pytest.raises(FileNotFoundError, match="--merge-file"):
        build_tokenizer("GPT2BPETokenizer", vocab_file=gpt2_files[0],
                        merge_file=str(tmp_path / "nope.txt"))


def test_hf_folder_without_tokenizer_json(tmp_path):
    with pytest.raises(FileNotFoundError, match="--tokenizer-model.*tokenizer.json"):
        build_tokenizer("HFTokenizer", tokenizer_model=str(tmp_path))


@pytest.mark.parametrize("type_name,flag", [
    ("SentencePieceTokenizer", "--tokenizer-model"), ("HFTokenizer", "--tokenizer-model"),
    ("GPT2BPETokenizer", "--vocab-file"), ("NullTokenizer", "--vocab-size")])
def test_missing_argument_names_flag(type_name, flag):
    with pytest.raises(ValueError, match=flag):
        build_tokenizer(type_name)


def test_not_a_model_file(tmp_path):
    bad = tmp_path / "bad.model"
    bad.write_text("not a model")
    with pytest.raises(ValueError, match="--tokenizer-model"):
        build_tokenizer("SentencePieceTokenizer", tokenizer_model=str(bad))
    with pytest.raises(ValueError, match="--tokenizer-model"):
        build_tokenizer("HFTokenizer", tokenizer_model=str(bad))
