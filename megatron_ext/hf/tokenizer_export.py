"""The training tokenizer as Hugging Face tokenizer files that encode to the same ids.

* ``HFTokenizer`` from a folder (or a cached hub name): its tokenizer files are copied as they are.
  From a lone ``tokenizer.json``: it is wrapped with the begin/end-of-text tokens training found.
* ``GPT2BPETokenizer``: the same ``tokenizers`` byte-level BPE, wrapped.
* ``SentencePieceTokenizer``: converted here to a ``tokenizers`` object that reproduces
  SentencePiece's encoding of the model's own settings (``transformers``' Llama converter does not:
  it drops SentencePiece's dummy-prefix space before leading whitespace, and splits whitespace runs
  the model keeps whole). Read from the model file (protobuf): normalisation (precompiled rules,
  extra-whitespace removal, the dummy prefix, whitespace as U+2581), pieces and scores (BPE merges
  in score order, or a Unigram lattice), byte fallback (without it the unknown piece decodes to the
  model's ``unk_surface``, as SentencePiece decodes it); control pieces become special tokens. No
  begin-of-text token is added, as in training (``sp.encode``); an end-of-document id appended past
  the pieces (models without one) becomes an added ``</s>``.

Every export is checked: sample texts must encode to the training tokenizer's ids and decode back
the same way (``check``), else the export stops with the first text that differs. One difference
remains by design: a literal special-token string in the text (``"</s>"``) is that token for
Hugging Face, plain characters for SentencePiece.
"""
from __future__ import annotations

import json
import os
import shutil
from typing import List, Optional

from megatron_ext.hf import HFError, require
from megatron_ext.data.hub import resolve
from megatron_ext.data.tokenizers import GPT2BPETokenizer, HFTokenizer, SentencePieceTokenizer
from megatron_ext.data.tokenizers import build_tokenizer

# Copied from a tokenizer folder when present (the files transformers' tokenizers read).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
                   "chat_template.jinja", "chat_template.json", "tokenizer.model", "vocab.json", "merges.txt")

SAMPLES = (
    "Hello world! This is a test of the exported tokenizer.",
    "  leading spaces,   runs of   spaces, and a trailing space ",
    "new\nlines\n\nand\ttabs",
    "Unicode: café, naïve, Ωμέγα, 你好, emoji 🙂",
    "numbers 12345 and 3.14159, code: def f(x): return x**2",
    "UPPER lower MiXeD",
    " ",
    "a",
)

# SentencePiece piece types (sentencepiece_model.proto)
_NORMAL, _UNKNOWN, _CONTROL, _USER_DEFINED, _UNUSED, _BYTE = 1, 2, 3, 4, 5, 6
_UNIGRAM, _BPE = 1, 2


def training_tokenizer(args, tokenizer_type: Optional[str] = None, tokenizer_model: Optional[str] = None,
                       vocab_file: Optional[str] = None, merge_file: Optional[str] = None):
    """(tokenizer object, type name, source) the run trained with, or (None, None, reason) for
    runs on synthetic token ids; overrides replace the saved flags (moved files)."""

    kind = tokenizer_type or getattr(args, "tokenizer_type", None)
    model = tokenizer_model or getattr(args, "tokenizer_model", None)
    vocab = vocab_file or getattr(args, "vocab_file", None)
    merges = merge_file or getattr(args, "merge_file", None)
    if kind is None or str(kind).lower() == "nulltokenizer" or (model is None and vocab is None):
        return None, None, "the run trained on token ids without a tokenizer (--mock-data / NullTokenizer)"
    try:
        tok = build_tokenizer(kind, tokenizer_model=model, vocab_file=vocab, merge_file=merges)
    except (ValueError, OSError) as e:
        raise HFError(f"the checkpoint's tokenizer ({kind} {model or vocab}): {str(e).splitlines()[0]}; give its "
                      "current location with --tokenizer-model (or --vocab-file/--merge-file), or --no-tokenizer") \
            from None
    return tok, tok.name, model or vocab


def write(tok, out_dir: str, source: str) -> List[str]:
    """Write Hugging Face tokenizer files for our tokenizer ``tok`` into ``out_dir``; returns their names."""

    if isinstance(tok, HFTokenizer):
        folder = resolve(source, "--tokenizer-model")
        if os.path.isdir(folder) and os.path.isfile(os.path.join(folder, "tokenizer_config.json")):
            copied = []
            for name in TOKENIZER_FILES:
                if os.path.isfile(os.path.join(folder, name)):
                    shutil.copyfile(os.path.join(folder, name), os.path.join(out_dir, name))
                    copied.append(name)
            return copied
        backend = tok._tok
    elif isinstance(tok, GPT2BPETokenizer):
        backend = tok._tok._tokenizer  # the tokenizers.Tokenizer inside ByteLevelBPETokenizer
    elif isinstance(tok, SentencePieceTokenizer):
        backend = sentencepiece_tokenizer(tok)
    else:
        raise HFError(f"{tok.name}: no Hugging Face form of this tokenizer")
    return _save_wrapped(backend, tok, out_dir)


def _save_wrapped(backend, tok, out_dir: str) -> List[str]:
    transformers = require("transformers")
    special = {"eos_token": backend.id_to_token(tok.eod)}
    if tok.bos is not None:
        special["bos_token"] = backend.id_to_token(tok.bos)
    unk = backend.id_to_token(0)
    if unk in ("<unk>", "<UNK>", "[UNK]"):
        special["unk_token"] = unk
    wrapped = transformers.PreTrainedTokenizerFast(tokenizer_object=backend, clean_up_tokenization_spaces=False,
                                                   **special)
    before = set(os.listdir(out_dir))
    wrapped.save_pretrained(out_dir)
    # transformers 5 names its class TokenizersBackend, unknown to 4.x; both read this name.
    config_path = os.path.join(out_dir, "tokenizer_config.json")
    with open(config_path) as f:
        config = json.load(f)
    config["tokenizer_class"] = "PreTrainedTokenizerFast"
    config.pop("backend", None)
    with open(config_path, "w") as f:
        json.dump(config, f, indent=2)
    return sorted(set(os.listdir(out_dir)) - before)


def sentencepiece_tokenizer(tok):
    """A ``tokenizers.Tokenizer`` that encodes like our SentencePieceTokenizer ``tok``."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers

    require("google.protobuf")
    from sentencepiece import sentencepiece_model_pb2

    path = tok.unique_identifiers["tokenizer_path"][0]
    proto = sentencepiece_model_pb2.ModelProto()
    with open(path, "rb") as f:
        proto.ParseFromString(f.read())
    trainer, norm = proto.trainer_spec, proto.normalizer_spec
    if trainer.treat_whitespace_as_suffix:
        raise HFError(f"{path}: a SentencePiece model with treat_whitespace_as_suffix is not converted")
    pieces = list(proto.pieces)
    if trainer.model_type == _UNIGRAM:
        model = models.Unigram([(p.piece, p.score) for p in pieces], unk_id=trainer.unk_id,
                               byte_fallback=trainer.byte_fallback)
    elif trainer.model_type == _BPE:
        from transformers.tokenization_utils_base import generate_merges

        vocab = {p.piece: i for i, p in enumerate(pieces)}
        atomic = {p.piece for p in pieces if p.type != _NORMAL}  # never merged into, never merged from
        merges = generate_merges(vocab, {p.piece: p.score for p in pieces if p.type == _NORMAL}, skip_tokens=atomic)
        model = models.BPE(vocab, merges, unk_token=pieces[trainer.unk_id].piece, fuse_unk=True,
                           byte_fallback=trainer.byte_fallback)
    else:
        raise HFError(f"{path}: SentencePiece model type {trainer.model_type} (word/char) is not converted; "
                      "BPE and Unigram models are")
    backend = Tokenizer(model)
    steps = []
    if norm.precompiled_charsmap:
        steps.append(normalizers.Precompiled(norm.precompiled_charsmap))
    if norm.remove_extra_whitespaces:
        steps += [normalizers.Strip(left=True, right=True), normalizers.Replace(Regex(" {2,}"), " ")]
    if norm.escape_whitespaces:
        steps.append(normalizers.Replace(" ", "\u2581"))
    if norm.add_dummy_prefix:
        steps.append(normalizers.Prepend("\u2581"))
    backend.normalizer = normalizers.Sequence(steps)
    if trainer.split_by_whitespace:
        # SentencePiece's pieces never span a non-space followed by U+2581, so cutting there (runs
        # of U+2581 stay with the word after them) changes no result and keeps words short.
        backend.pre_tokenizer = pre_tokenizers.Split(Regex("\u2581*[^\u2581]+|\u2581+"), behavior="isolated")
    # An unknown piece decodes to the model's unk_surface (" \u2047 " by default), as SentencePiece
    # decodes it, not to the piece's own text ("<unk>").
    steps = [decoders.Replace(pieces[trainer.unk_id].piece, trainer.unk_surface),
             decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse()]
    if norm.add_dummy_prefix:
        steps.append(decoders.Strip(" ", 1, 0))
    backend.decoder = decoders.Sequence(steps)
    backend.add_special_tokens([AddedToken(p.piece, special=True, normalized=False)
                                for p in pieces if p.type in (_CONTROL, _UNKNOWN)])
    backend.add_tokens([AddedToken(p.piece, special=False, normalized=False) for p in pieces if p.type == _USER_DEFINED])
    if tok.eod >= len(pieces):  # our SentencePieceTokenizer appended an end-of-document id
        backend.add_special_tokens([AddedToken("</s>", special=True, normalized=False)])
        if backend.token_to_id("</s>") != tok.eod:
            raise HFError(f"{path}: cannot give the appended end-of-document token its training id {tok.eod}")
    return backend


def check(out_dir: str, tok, texts=SAMPLES) -> int:
    """Raise HFError naming the first text the exported tokenizer encodes (or decodes) differently
    from the training tokenizer; returns the number of texts checked."""
    transformers = require("transformers")
    exported = transformers.AutoTokenizer.from_pretrained(out_dir, local_files_only=True)
    for text in texts:
        ours, theirs = tok.tokenize(text), exported.encode(text)
        if ours != theirs:
            raise HFError(f"the exported tokenizer encodes {text!r} as {theirs[:12]}..., training did as "
                          f"{ours[:12]}...; not exported (report this tokenizer)")
        if exported.decode(theirs) != tok.detokenize(ours):
            raise HFError(f"the exported tokenizer decodes {text!r} to {exported.decode(theirs)!r}, training's to "
                          f"{tok.detokenize(ours)!r}")
    return len(texts)
