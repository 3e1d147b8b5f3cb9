"""Tokenizers under the Megatron-DeepSpeed type names users already pass (``--tokenizer-type``).

Every tokenizer exposes what preprocessing and megatron-core's ``GPTDataset`` read: ``vocab_size``
(real, unpadded), ``eod`` (also as ``eos``), ``pad`` (always -1), ``bos`` (or None), ``tokenize``,
``detokenize``, ``name`` and ``unique_identifiers`` (GPTDataset JSON-encodes it into the hash that
names its index cache). Everything loads from local files; nothing here touches the network.
"""
from __future__ import annotations

import os
from typing import Callable, Dict, Iterable, Iterator, List, Optional, Sequence, Tuple

from megatron_ext.optional import require
from megatron_ext.data.hub import resolve

# Looked up, in this order, in HF vocabularies (and SentencePiece models without an eos id).
EOS_CANDIDATES = ("</s>", "<|endoftext|>", "<|end_of_text|>", "<eos>")
BOS_CANDIDATES = ("<s>", "<|begin_of_text|>", "<|startoftext|>", "<bos>")


class Tokenizer:
    """Common interface; subclasses set ``name``, ``vocab_size``, ``eod`` and ``bos``."""

    name: str = "Tokenizer"
    vocab_size: int
    eod: int
    bos: Optional[int] = None
    unique_identifiers: Dict[str, object]

    def _identify(self, *paths: str) -> None:
        self.unique_identifiers = {"class": self.name,
                                   "tokenizer_path": [os.path.abspath(p) for p in paths],
                                   "vocab_size": self.vocab_size, "eod": self.eod}

    @property
    def eos(self) -> int:
        return self.eod

    @property
    def pad(self) -> int:
        # GPTDataset masks every label equal to `pad`; -1 can never be a real token, so no real
        # token (e.g. an eos that doubles as pad in the vocabulary) silently leaves the loss.
        return -1

    def tokenize(self, text: str) -> List[int]:
        raise NotImplementedError

    def detokenize(self, ids: Iterable[int]) -> str:
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{self.name}(vocab_size={self.vocab_size}, eod={self.eod}, bos={self.bos})"


def _require(value, flag: str, type_name: str, what: str):
    if value is None:
        raise ValueError(f"{type_name} needs {flag} ({what})")
    return value


def _existing(path: str, flag: str) -> str:
    path = os.path.expanduser(str(path))
    if not os.path.exists(path):
        raise FileNotFoundError(f"{flag}: no such file: {path}")
    return path


def _first_in(vocab: Dict[str, int], names: Sequence[str]) -> Optional[int]:
    return next((vocab[n] for n in names if n in vocab), None)


class SentencePieceTokenizer(Tokenizer):
    name = "SentencePieceTokenizer"

    def __init__(self, model_file: str):
        import sentencepiece

        path = _existing(model_file, "--tokenizer-model")
        if os.path.isdir(path):  # an HF-style model directory ships its SentencePiece model as this
            path = _existing(os.path.join(path, "tokenizer.model"), "--tokenizer-model")
        try:
            self._sp = sentencepiece.SentencePieceProcessor(model_file=path)
        except (OSError, RuntimeError) as e:
            raise ValueError(f"--tokenizer-model {path}: not a SentencePiece model ({e})") from None
        self._n_pieces = n = self._sp.get_piece_size()
        self.bos = self._sp.bos_id() if self._sp.bos_id() >= 0 else None
        eod = self._sp.eos_id()
        if eod < 0:
            pieces = {self._sp.id_to_piece(i): i for i in range(n)}
            eod = _first_in(pieces, EOS_CANDIDATES)
        if eod is None:
            # No end-of-document piece at all: use one id past the model's pieces (Megatron's own
            # SentencePiece wrapper appends its special tokens the same way); vocab grows by one.
            eod, n = n, n + 1
        self.eod, self.vocab_size = eod, n
        self._identify(path)

    def tokenize(self, text: str) -> List[int]:
        return self._sp.encode(text)

    def detokenize(self, ids: Iterable[int]) -> str:
        # An appended eod id is unknown to sentencepiece; it decodes to nothing, like eos does.
        return self._sp.decode([int(i) for i in ids if int(i) < self._n_pieces])


class HFTokenizer(Tokenizer):
    """A Hugging Face tokenizer: a ``tokenizer.json`` file, a folder, or a hub name (``org/name``)
    found in the local Hugging Face cache (never downloaded; ``megatron_ext/data/hub.py``).

    ``tokenizer.json`` is read with the ``tokenizers`` library; a folder without one (only a
    SentencePiece ``tokenizer.model`` or GPT-2 ``vocab.json``/``merges.txt``) goes through
    ``transformers``' ``AutoTokenizer`` (extra ``[hf]``), whose fast tokenizer is used the same way.
    ``tokenize`` applies the tokenizer's own post-processor, as Megatron-DeepSpeed's HFTokenizer does
    (``AutoTokenizer.encode``): a Llama-3 style file therefore prepends its begin-of-text token.
    """

    name = "HFTokenizer"

    def __init__(self, model_path: str, eod_token: Optional[str] = None):
        """``eod_token``: the end-of-document token (FlagScale's types name theirs; see
        ``FLAGSCALE_TYPES``), else the first of ``EOS_CANDIDATES`` in the vocabulary."""

        path = resolve(model_path, "--tokenizer-model")  # a local path, or a cached hub snapshot
        if os.path.isdir(path) and not os.path.isfile(os.path.join(path, "tokenizer.json")) and any(
                os.path.isfile(os.path.join(path, f)) for f in ("tokenizer.model", "vocab.json", "tokenizer_config.json")):
            self._tok = _fast_tokenizer_of(path)
        else:
            if os.path.isdir(path):
                path = _existing(os.path.join(path, "tokenizer.json"), "--tokenizer-model")
            self._tok = _tokenizer_json(path)
        vocab = self._tok.get_vocab(with_added_tokens=True)
        self.vocab_size = max(vocab.values(), default=-1) + 1  # ids of added tokens may leave holes
        self.bos = _first_in(vocab, BOS_CANDIDATES)
        if eod_token is not None and eod_token not in vocab:
            raise ValueError(f"--tokenizer-model {path}: no {eod_token} token in the vocabulary, which this "
                             "tokenizer type ends documents with")
        eod = vocab[eod_token] if eod_token is not None else _first_in(vocab, EOS_CANDIDATES)
        if eod is None:
            raise ValueError(
                f"--tokenizer-model {path}: no end-of-document token in the vocabulary; "
                f"add one of {', '.join(EOS_CANDIDATES)} to the tokenizer")
        self.eod = eod
        self._identify(path)

    def tokenize(self, text: str) -> List[int]:
        return self._tok.encode(text).ids

    def detokenize(self, ids: Iterable[int]) -> str:
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=False)


def _tokenizer_json(path: str):
    from tokenizers import Tokenizer as _HF

    try:
        return _HF.from_file(path)
    except Exception as e:  # the Rust side raises plain Exception on a malformed file
        raise ValueError(f"--tokenizer-model {path}: cannot load tokenizer.json ({e})") from None


def _fast_tokenizer_of(folder: str):
    """The ``tokenizers`` object behind ``AutoTokenizer`` for a folder without tokenizer.json."""
    transformers = require("transformers")
    try:
        tok = transformers.AutoTokenizer.from_pretrained(folder, local_files_only=True)
    except Exception as e:  # noqa: BLE001 - transformers raises many kinds for an unusable folder
        raise ValueError(f"--tokenizer-model {folder}: no tokenizer.json, and transformers cannot load a "
                         f"tokenizer from it ({type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''})") \
            from None
    backend = getattr(tok, "backend_tokenizer", None)
    if backend is None:
        raise ValueError(f"--tokenizer-model {folder}: transformers loads only a slow tokenizer from it; "
                         "HFTokenizer needs a fast one (tokenizer.json)")
    return backend


class GPT2BPETokenizer(Tokenizer):
    """GPT-2 byte-level BPE from ``vocab.json`` + ``merges.txt``."""

    name = "GPT2BPETokenizer"

    def __init__(self, vocab_file: str, merge_file: str):
        from tokenizers import ByteLevelBPETokenizer

        vocab_file = _existing(vocab_file, "--vocab-file")
        merge_file = _existing(merge_file, "--merge-file")
        try:
            self._tok = ByteLevelBPETokenizer(vocab_file, merge_file)
        except Exception as e:
            raise ValueError(f"--vocab-file {vocab_file} / --merge-file {merge_file}: cannot load "
                             f"GPT-2 BPE ({e})") from None
        vocab = self._tok.get_vocab()
        if "<|endoftext|>" not in vocab:
            raise ValueError(f"--vocab-file {vocab_file}: has no <|endoftext|> token, which "
                             "GPT2BPETokenizer uses as end-of-document; add it to vocab.json")
        self.eod = vocab["<|endoftext|>"]
        self.vocab_size = max(vocab.values()) + 1
        self._identify(vocab_file, merge_file)

    def tokenize(self, text: str) -> List[int]:
        return self._tok.encode(text).ids

    def detokenize(self, ids: Iterable[int]) -> str:
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=False)


class NullTokenizer(Tokenizer):
    """Text is whitespace-separated integer ids; ``eod`` is the last id, ``vocab_size - 1``."""

    name = "NullTokenizer"

    def __init__(self, vocab_size: int):
        self.vocab_size = int(vocab_size)
        if self.vocab_size < 1:
            raise ValueError(f"NullTokenizer needs --vocab-size >= 1, got {vocab_size}")
        self.eod = self.vocab_size - 1
        self._identify()

    def tokenize(self, text: str) -> List[int]:
        ids = []
        for tok in text.split():
            try:
                i = int(tok)
            except ValueError:
                raise ValueError(f"NullTokenizer: {tok!r} is not an integer token id") from None
            if not 0 <= i < self.vocab_size:
                raise ValueError(f"NullTokenizer: token id {i} outside [0, {self.vocab_size})")
            ids.append(i)
        return ids

    def detokenize(self, ids: Iterable[int]) -> str:
        return " ".join(str(int(i)) for i in ids)


def _build_sp(a):
    return SentencePieceTokenizer(_require(a["tokenizer_model"], "--tokenizer-model",
                                           "SentencePieceTokenizer", "a SentencePiece .model file"))


def _build_hf(a):
    return HFTokenizer(_require(a["tokenizer_model"], "--tokenizer-model", "HFTokenizer",
                                "a tokenizer.json file or a directory holding one"))


# FlagScale's (OpenSeek's) tokenizer types over a Hugging Face tokenizer folder or file (their
# tokenizer_path is our --tokenizer-model): our HFTokenizer with the end-of-document token each of
# them uses (None: the tokenizer's own eos_token, from its tokenizer_config.json). Documents end
# with it in their preprocessed data, so it is what --reset-position-ids / --reset-attention-mask /
# --eod-mask-loss must find. FlagScale's other types (Aquila's BPE with a special-tokens file,
# Qwen2-VL) have no equivalent here.
FLAGSCALE_TYPES = {
    "QwenTokenizerFS": "<|extra_204|>",
    "Qwen2TokenizerFS": "<|extra_204|>",
    "HFTokenizersTokenizerFS": "<|endoftext|>",
    "HFTokenizerFS": None,
    "Llama3TokenizerFS": None,
}


def _configured_eos(model_path: str) -> Optional[str]:
    """The eos_token of a tokenizer folder's tokenizer_config.json (None without one)."""
    import json

    path = resolve(model_path, "--tokenizer-model")
    config = os.path.join(path, "tokenizer_config.json") if os.path.isdir(path) else None
    if not config or not os.path.isfile(config):
        return None
    with open(config, encoding="utf-8") as f:
        eos = json.load(f).get("eos_token")
    return eos.get("content") if isinstance(eos, dict) else eos


def _flagscale_builder(type_name: str):
    def build(a):
        model = _require(a["tokenizer_model"], "--tokenizer-model", type_name,
                         "the Hugging Face tokenizer folder (FlagScale's tokenizer_path)")
        eod = FLAGSCALE_TYPES[type_name] or _configured_eos(model)
        return HFTokenizer(model, eod_token=eod)

    return build


def _build_gpt2(a):
    return GPT2BPETokenizer(
        _require(a["vocab_file"], "--vocab-file", "GPT2BPETokenizer", "the GPT-2 vocab.json"),
        _require(a["merge_file"], "--merge-file", "GPT2BPETokenizer", "the GPT-2 merges.txt"))


def _build_null(a):
    return NullTokenizer(_require(a["vocab_size"], "--vocab-size", "NullTokenizer",
                                  "number of token ids"))


# canonical name, aliases, builder
_TYPES: List[Tuple[str, Tuple[str, ...], Callable]] = [
    ("SentencePieceTokenizer", ("GPTSentencePieceTokenizer", "Llama2Tokenizer"), _build_sp),
    ("HFTokenizer", ("HuggingFaceTokenizer",), _build_hf),
    ("GPT2BPETokenizer", (), _build_gpt2),
    ("NullTokenizer", (), _build_null),
] + [(name, (), _flagscale_builder(name)) for name in FLAGSCALE_TYPES]
_BY_NAME = {n.lower(): b for name, aliases, b in _TYPES for n in (name, *aliases)}

KNOWN_TYPES = ", ".join(name + (f" (aliases {', '.join(al)})" if al else "")
                        for name, al, _ in _TYPES)


def build_tokenizer(tokenizer_type: str, tokenizer_model: Optional[str] = None,
                    vocab_file: Optional[str] = None, merge_file: Optional[str] = None,
                    vocab_size: Optional[int] = None) -> Tokenizer:
    """Build the tokenizer named by ``tokenizer_type`` (case-insensitive, Megatron spellings)."""
    builder = _BY_NAME.get(str(tokenizer_type).lower())
    if builder is None:
        raise ValueError(f"unknown tokenizer type {tokenizer_type!r}; known types: {KNOWN_TYPES}")
    return builder(dict(tokenizer_model=tokenizer_model, vocab_file=vocab_file,
                        merge_file=merge_file, vocab_size=vocab_size))


def _text_lines(paths: Sequence[str], json_key: str, errors: list) -> Iterator[str]:
    """Training sentences; a bad JSON line is put in ``errors`` and ends the stream, because an
    exception raised inside sentencepiece's iterator comes back as an unreadable RuntimeError."""
    import json

    for path in paths:
        is_json = path.endswith((".jsonl", ".json"))
        with open(path, encoding="utf-8", errors="replace") as f:
            for lineno, line in enumerate(f, 1):
                if is_json:
                    if not line.strip():
                        continue
                    try:
                        obj = json.loads(line)
                    except json.JSONDecodeError as e:
                        errors.append(ValueError(f"{path}:{lineno}: malformed JSON ({e.msg})"))
                        return
                    text = obj.get(json_key) if isinstance(obj, dict) else None
                    if isinstance(text, str):
                        yield from (t for t in text.split("\n") if t)
                else:
                    line = line.rstrip("\n")
                    if line:
                        yield line


def train_sentencepiece(input_files: Sequence[str], model_prefix: str, vocab_size: int,
                        model_type: str = "bpe", json_key: str = "text",
                        input_sentence_size: int = 1_000_000, character_coverage: float = 0.9999,
                        num_threads: Optional[int] = None) -> str:
    """Train a SentencePiece model (Llama-style settings) and return the ``.model`` path.

    Text files are read one sentence per line; ``.jsonl``/``.json`` files are JSON lines whose
    ``json_key`` is split into lines. Ids: unk 0, bos 1, eos 2 (the eod), no pad. Byte fallback
    means no text is ever unknown; identity normalisation and kept whitespace make
    ``detokenize(tokenize(text)) == text``. ``vocab_size`` is a soft limit: a corpus too small
    for it gives a smaller vocabulary instead of an error.
    """
    import sentencepiece

    paths = [_existing(p, "input file") for p in input_files]
    if not paths:
        raise ValueError("train_sentencepiece needs at least one input file")
    os.makedirs(os.path.dirname(os.path.abspath(model_prefix)), exist_ok=True)
    errors: list = []
    try:
        sentencepiece.SentencePieceTrainer.train(
            sentence_iterator=_text_lines(paths, json_key, errors), model_prefix=model_prefix,
            vocab_size=vocab_size, model_type=model_type, character_coverage=character_coverage,
            byte_fallback=True, unk_id=0, bos_id=1, eos_id=2, pad_id=-1,
            normalization_rule_name="identity", remove_extra_whitespaces=False,
            split_digits=True, allow_whitespace_only_pieces=True, hard_vocab_limit=False,
            # A sample of lines is plenty for a small demo vocabulary and keeps training fast.
            input_sentence_size=input_sentence_size, shuffle_input_sentence=True,
            max_sentence_length=16384, num_threads=num_threads or os.cpu_count() or 1,
            minloglevel=2)  # quiet: sentencepiece logs every step to stderr otherwise
    except RuntimeError as e:
        if not errors:
            raise ValueError(f"SentencePiece training failed: {e}") from None
    if errors:  # training may have finished on the lines before the bad one: drop that model
        for ext in (".model", ".vocab"):
            if os.path.exists(model_prefix + ext):
                os.remove(model_prefix + ext)
        raise errors[0]
    return model_prefix + ".model"
