"""Tokenize text corpora into megatron-core indexed datasets (``<prefix>_<key>_document.bin/.idx``).

Inputs are files, directories (walked recursively) or globs. ``.jsonl``/``.json`` files are JSON
lines, one document per line, read from ``--json-keys`` (one output dataset per key). Any other
file is plain text: the whole file is one document, or each non-blank line with
``--text-split-lines``.

A file named on the command line is always an input (a bad one is an error). A file FOUND in a
folder or by a glob is an input only if it can be read as one: a ``.jsonl``/``.json`` file whose
first record is a JSON object with every ``--json-keys`` key, or any other file whose first 64 KiB
are UTF-8 text without NUL bytes. Hidden files, our own ``.bin``/``.idx`` outputs and everything
else (images, binaries, JSON of another shape) are skipped, and the summary says which and why.

Each document is stored as ONE sequence (lengths ``[len(doc)]``), with the end-of-document token
appended unless ``--no-append-eod``. Documents that tokenize to nothing are skipped and counted:
megatron-core's dataset builder hangs on zero-length documents.

Bad input (a missing input, a malformed JSON line, a JSON line without the key, an unknown
tokenizer, ...) ends the run with one ``error:`` line on stderr and exit code 2. Output is written
under temporary names and renamed only once everything succeeded, so a failed run leaves nothing.
"""
from __future__ import annotations

import argparse
import glob
import itertools
import json
import multiprocessing
import os
import sys
import threading
import time
import warnings
from typing import Iterator, List, Optional, Sequence, Tuple

import numpy as np
from tqdm import tqdm

from megatron_ext.argtypes import normalise_argv, one_line_errors
from megatron_ext.data.tokenizers import build_tokenizer

PROG = "preprocess_data.py"
SKIPPED_SUFFIXES = (".bin", ".idx")  # our own outputs, never inputs when walking folders
BATCH_BYTES, BATCH_DOCS = 1 << 20, 4096  # documents per task sent to a worker
MAX_BYTES_IN_FLIGHT = 256 << 20  # input read ahead of the writer when using workers


class InputError(Exception):
    """Bad input or arguments: reported as one line, exit code 2."""


def build_parser() -> argparse.ArgumentParser:
    p = one_line_errors(argparse.ArgumentParser(
        prog=PROG, allow_abbrev=False, description="Tokenize text/JSON-lines corpora into megatron-core indexed datasets."))
    g = p.add_argument_group("input")
    g.add_argument("--input", nargs="+", required=True, metavar="PATH",
                   help="files, directories or globs; .jsonl/.json are JSON lines, anything else "
                        "plain text")
    g.add_argument("--json-keys", nargs="+", default=["text"], metavar="KEY",
                   help="JSON keys to tokenize, one output dataset each (default: text)")
    g.add_argument("--text-split-lines", action="store_true",
                   help="plain text: each non-blank line is a document (default: each file)")
    g = p.add_argument_group("tokenizer")
    g.add_argument("--tokenizer-type", required=True,
                   help="SentencePieceTokenizer, HFTokenizer, GPT2BPETokenizer or NullTokenizer")
    g.add_argument("--tokenizer-model",
                   help="SentencePiece .model, or HF tokenizer.json / its folder")
    g.add_argument("--vocab-file", help="GPT-2 vocab.json")
    g.add_argument("--merge-file", help="GPT-2 merges.txt")
    g.add_argument("--vocab-size", type=int, help="NullTokenizer vocabulary size")
    g.add_argument("--append-eod", action=argparse.BooleanOptionalAction, default=True,
                   help="append the end-of-document token to every document (default: on)")
    g = p.add_argument_group("output")
    g.add_argument("--output-prefix", required=True,
                   help="writes <prefix>_<key>_document.bin/.idx")
    g.add_argument("--dataset-impl", choices=["mmap"], default="mmap",
                   help="accepted for Megatron-DeepSpeed scripts; mmap is the only format")
    g = p.add_argument_group("runtime")
    g.add_argument("--workers", type=int, default=1, help="tokenizer processes (default: 1)")
    g.add_argument("--log-interval", type=int, default=10000,
                   help="without a terminal, log progress every N documents (0: never)")
    return p


# ---------------------------------------------------------------------------------------- inputs

def _is_json(path: str) -> bool:
    return path.endswith((".jsonl", ".json"))


SNIFF_BYTES = 64 << 10


def unreadable_reason(path: str, json_keys: Sequence[str]) -> Optional[str]:
    """Why a file found in a folder is not an input (None: it is one); see the module docstring."""
    try:
        with open(path, "rb") as f:
            head = f.read(SNIFF_BYTES)
    except OSError as e:
        return f"cannot be read ({e.strerror})"
    if _is_json(path):
        first = next((line for line in head.splitlines() if line.strip()), b"")
        try:
            obj = json.loads(first)
        except (ValueError, UnicodeDecodeError):
            return "not JSON lines"
        missing = [k for k in json_keys if not isinstance(obj, dict) or not isinstance(obj.get(k), str)]
        return f"no {', '.join(repr(k) for k in missing)} text (--json-keys)" if missing else None
    if b"\0" in head:
        return "binary"
    try:
        head.decode("utf-8")
    except UnicodeDecodeError as e:
        if e.start < len(head) - 4:  # a multi-byte character cut by the 64 KiB window is fine
            return "not UTF-8 text"
    return None


def _files_under(folder: str, json_keys: Sequence[str], skipped: List[Tuple[str, str]]) -> List[str]:
    found = []
    for root, dirs, files in os.walk(folder):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for name in sorted(files):
            path = os.path.join(root, name)
            if name.startswith(".") or name.endswith(SKIPPED_SUFFIXES):
                continue
            reason = unreadable_reason(path, json_keys)
            if reason is None:
                found.append(path)
            else:
                skipped.append((path, reason))
    return found


def expand_inputs(patterns: Sequence[str], json_keys: Sequence[str] = ("text",),
                  skipped: Optional[List[Tuple[str, str]]] = None) -> List[str]:
    """Files named by ``--input``, in order, each once; raises InputError for a dead entry. Files
    found in folders or by globs that are not inputs go to ``skipped`` as (path, why)."""
    skipped = [] if skipped is None else skipped
    files: List[str] = []
    for pattern in patterns:
        path = os.path.expanduser(pattern)
        if any(c in path for c in "*?["):
            found = []
            for match in sorted(glob.glob(path, recursive=True)):
                if os.path.isdir(match):
                    found += _files_under(match, json_keys, skipped)
                elif not match.endswith(SKIPPED_SUFFIXES):
                    reason = unreadable_reason(match, json_keys)
                    if reason is None:
                        found.append(match)
                    else:
                        skipped.append((match, reason))
            if not found:
                raise InputError(f"--input: no files match {pattern}" + _skipped_note(skipped))
        elif os.path.isdir(path):
            found = _files_under(path, json_keys, skipped)
            if not found:
                raise InputError(f"--input: folder {pattern} holds no input files" + _skipped_note(skipped))
        elif os.path.isfile(path):
            found = [path]
        else:
            raise InputError(f"--input: no such file or directory: {pattern}")
        files += found
    seen, unique = set(), []
    for f in files:
        if os.path.realpath(f) not in seen:
            seen.add(os.path.realpath(f))
            unique.append(f)
    return unique


def _skipped_list(skipped: Sequence[Tuple[str, str]]) -> str:
    shown = "; ".join(f"{path} ({why})" for path, why in skipped[:5])
    return shown + (f"; and {len(skipped) - 5} more" if len(skipped) > 5 else "")


def _skipped_note(skipped: Sequence[Tuple[str, str]]) -> str:
    return f" ({len(skipped)} skipped: {_skipped_list(skipped)})" if skipped else ""


# The reader sends batches of raw documents (Task); decoding, JSON parsing and tokenizing happen in
# the workers, which send back per-key flat id arrays plus a (documents x keys) length table, or an
# error (Result). Batching keeps inter-process overhead small for corpora of short documents.
Doc = Tuple[str, str, bytes]  # where ("file:line"), kind ("json" | "text" | "error"), payload
Task = Tuple[List[Doc], int]  # documents, input bytes they cover
Result = Tuple[Optional[np.ndarray], Optional[List[np.ndarray]], int, Optional[str]]


def _read_documents(files: Sequence[str], split_lines: bool) -> Iterator[Tuple[Doc, int]]:
    try:
        for path in files:
            with open(path, "rb") as f:
                if _is_json(path) or split_lines:
                    kind = "json" if _is_json(path) else "text"
                    for lineno, raw in enumerate(f, 1):
                        if raw.strip():
                            yield (f"{path}:{lineno}", kind, raw.rstrip(b"\r\n")), len(raw)
                else:
                    raw = f.read()
                    yield (path, "text", raw), len(raw)
    except OSError as e:  # reported in order, after the documents read before it
        yield ("", "error", f"cannot read input: {e}".encode()), 0


def read_batches(files: Sequence[str], split_lines: bool) -> Iterator[Task]:
    """Documents in input order, grouped into batches of about BATCH_BYTES."""
    batch, size = [], 0
    for doc, nbytes in _read_documents(files, split_lines):
        batch.append(doc)
        size += nbytes
        if size >= BATCH_BYTES or len(batch) >= BATCH_DOCS:
            yield batch, size
            batch, size = [], 0
    if batch:
        yield batch, size


def _decode(raw: bytes, where: str) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise InputError(f"{where}: not valid UTF-8 (byte {e.start})") from None


def _json_texts(raw: bytes, where: str, keys: Sequence[str]) -> List[str]:
    try:
        obj = json.loads(_decode(raw, where))
    except json.JSONDecodeError as e:
        raise InputError(f"{where}: malformed JSON ({e.msg} at column {e.pos + 1}); .json/.jsonl "
                         "inputs need one JSON object per line") from None
    if not isinstance(obj, dict):
        raise InputError(f"{where}: expected a JSON object, got {type(obj).__name__}")
    texts = []
    for key in keys:
        if key not in obj:
            have = ", ".join(list(obj)[:8]) or "none"
            raise InputError(f"{where}: no key {key!r} (--json-keys) in JSON object "
                             f"(its keys: {have})")
        if not isinstance(obj[key], str):
            raise InputError(f"{where}: key {key!r} is {type(obj[key]).__name__}, not a string")
        texts.append(obj[key])
    return texts


# ------------------------------------------------------------------------------------ tokenizing

_TOKENIZER = None
_KEYS: Sequence[str] = ("text",)
_APPEND_EOD = True


def _set_state(tokenizer, keys: Sequence[str], append_eod: bool) -> None:
    global _TOKENIZER, _KEYS, _APPEND_EOD
    _TOKENIZER, _KEYS, _APPEND_EOD = tokenizer, keys, append_eod


def _init_worker(tokenizer_kwargs: dict, keys: Sequence[str], append_eod: bool) -> None:
    _set_state(build_tokenizer(**tokenizer_kwargs), keys, append_eod)  # once per worker process


def _encode(task: Task) -> Result:
    """A batch of raw documents -> (lengths[doc, key], flat int32 ids per key, nbytes, error).

    A length of 0 marks a document whose text has no tokens (skipped by the writer)."""
    docs, nbytes = task
    lengths = np.zeros((len(docs), len(_KEYS)), dtype=np.int64)
    ids_per_key: List[List[int]] = [[] for _ in _KEYS]
    for i, (where, kind, payload) in enumerate(docs):
        if kind == "error":
            return None, None, nbytes, payload.decode()
        try:
            texts = (_json_texts(payload, where, _KEYS) if kind == "json"
                     else [_decode(payload, where)])
        except InputError as e:
            return None, None, nbytes, str(e)
        for k, text in enumerate(texts):
            try:
                ids = _TOKENIZER.tokenize(text)
            except Exception as e:  # e.g. NullTokenizer given a non-integer
                return None, None, nbytes, f"{where}: cannot tokenize: {e}"
            if len(ids):
                ids_per_key[k].extend(ids)
                if _APPEND_EOD:
                    ids_per_key[k].append(_TOKENIZER.eod)
                lengths[i, k] = len(ids) + _APPEND_EOD
    return lengths, [np.asarray(ids, dtype=np.int32) for ids in ids_per_key], nbytes, None


class _Backpressure:
    """Keeps the reader at most ``max_bytes`` ahead of the writer: ``Pool.imap`` would otherwise
    read its whole input into memory before the first result is written."""

    def __init__(self, max_bytes: int, min_items: int):
        self.max_bytes, self.min_items = max_bytes, min_items
        self.bytes = self.items = 0
        self.aborted = False
        self.cond = threading.Condition()

    def feed(self, tasks: Iterator[Task]) -> Iterator[Task]:
        for task in tasks:
            with self.cond:
                # min_items (>= one task per worker) keeps work in flight, so no deadlock.
                self.cond.wait_for(lambda: self.aborted or self.items < self.min_items
                                   or self.bytes < self.max_bytes)
                if self.aborted:
                    return
                self.bytes += task[1]
                self.items += 1
            yield task

    def done(self, nbytes: int) -> None:
        with self.cond:
            self.bytes -= nbytes
            self.items -= 1
            self.cond.notify_all()

    def abort(self) -> None:  # lets Pool.terminate() join the thread that runs feed()
        with self.cond:
            self.aborted = True
            self.cond.notify_all()


# --------------------------------------------------------------------------------------- writing

def _indexed_dataset_module():
    # megatron.core warns about missing Transformer Engine/Apex on import; irrelevant here.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*Transformer Engine and Apex")
        from megatron.core.datasets import indexed_dataset
    return indexed_dataset


class _Output:
    """One dataset written under temporary names, renamed on commit, removed on discard."""

    def __init__(self, module, key: str, prefix: str, dtype):
        self.key, self.prefix = key, prefix
        self.tmp_bin = f"{prefix}.bin.tmp-{os.getpid()}"
        self.tmp_idx = f"{prefix}.idx.tmp-{os.getpid()}"
        self.builder = module.IndexedDatasetBuilder(self.tmp_bin, dtype=dtype)
        self.documents = self.tokens = self.skipped = 0

    def add(self, flat: np.ndarray, lengths: np.ndarray) -> None:
        offset = 0
        for n in lengths.tolist():
            if n == 0:  # megatron-core hangs on zero-length documents
                self.skipped += 1
                continue
            self.builder.add_document(flat[offset:offset + n], [n])  # one sequence per document
            offset += n
            self.documents += 1
            self.tokens += n

    def commit(self) -> None:
        self.builder.finalize(self.tmp_idx)
        os.replace(self.tmp_bin, self.prefix + ".bin")
        os.replace(self.tmp_idx, self.prefix + ".idx")  # last: an .idx means a complete pair

    def discard(self) -> None:
        self.builder.data_file.close()
        for path in (self.tmp_bin, self.tmp_idx):
            if os.path.exists(path):
                os.remove(path)


def _missing_dirs(path: str) -> List[str]:
    """The folders makedirs(path) would create, deepest first."""
    missing = []
    while path and not os.path.exists(path):
        missing.append(path)
        path = os.path.dirname(path)
    return missing


def run(args: argparse.Namespace) -> str:
    """Do the work; returns the summary line. Raises InputError for bad input."""
    start = time.time()
    tokenizer_kwargs = dict(tokenizer_type=args.tokenizer_type,
                            tokenizer_model=args.tokenizer_model, vocab_file=args.vocab_file,
                            merge_file=args.merge_file, vocab_size=args.vocab_size)
    if args.workers < 1:
        raise InputError(f"--workers must be at least 1, got {args.workers}")
    folder = os.path.dirname(os.path.abspath(args.output_prefix))
    blocker = next((d for d in [folder] + [os.path.dirname(m) for m in _missing_dirs(folder)]
                    if os.path.exists(d) and not os.path.isdir(d)), None)
    if blocker is not None:
        raise InputError(f"--output-prefix {args.output_prefix}: {blocker} is a file, not a folder")
    skipped: List[Tuple[str, str]] = []
    files = expand_inputs(args.input, list(dict.fromkeys(args.json_keys)), skipped)
    if skipped:
        print(f"{PROG}: skipped {len(skipped)} file(s) found in folders that are not inputs: "
              f"{_skipped_list(skipped)}", file=sys.stderr, flush=True)
    try:
        tokenizer = build_tokenizer(**tokenizer_kwargs)
    except (ValueError, OSError) as e:
        raise InputError(str(e)) from None
    keys = list(dict.fromkeys(args.json_keys))
    plain = [f for f in files if not _is_json(f)]
    if len(keys) > 1 and plain:
        raise InputError(f"--json-keys gives {len(keys)} keys but plain-text input {plain[0]} has "
                         "only one field; give one key or only JSON-lines inputs")

    tasks = read_batches(files, args.text_split_lines)
    pool = backpressure = None
    if args.workers > 1:
        # Our processes are the parallelism; the Rust tokenizers' own threads would oversubscribe.
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
        # Start workers before importing megatron.core/torch so forked workers stay small.
        pool = multiprocessing.Pool(args.workers, _init_worker,
                                    (tokenizer_kwargs, keys, args.append_eod))
        backpressure = _Backpressure(MAX_BYTES_IN_FLIGHT, 2 * args.workers)
        results = pool.imap(_encode, backpressure.feed(tasks))
    else:
        _set_state(tokenizer, keys, args.append_eod)
        results = map(_encode, tasks)
    results = iter(results)

    bar = tqdm(total=sum(os.path.getsize(f) for f in files), unit="B", unit_scale=True,
               desc="tokenizing", file=sys.stderr, disable=None, dynamic_ncols=True)
    log_every = args.log_interval if bar.disable else 0  # tqdm only draws on a terminal
    seen = 0
    outputs: List[_Output] = []
    new_dirs = _missing_dirs(os.path.dirname(os.path.abspath(args.output_prefix)))
    try:
        # Bad input in the first batch fails fast, before the slow megatron.core import (~3 s).
        first = next(results, None)
        if first is not None and first[3]:
            raise InputError(first[3])
        module = _indexed_dataset_module()
        dtype = module.DType.optimal_dtype(tokenizer.vocab_size)
        os.makedirs(os.path.dirname(os.path.abspath(args.output_prefix)), exist_ok=True)
        for key in keys:
            outputs.append(_Output(module, key, f"{args.output_prefix}_{key}_document", dtype))
        for lengths, flats, nbytes, error in itertools.chain([first] if first else [], results):
            if error:
                raise InputError(error)
            for k, out in enumerate(outputs):
                out.add(flats[k], lengths[:, k])
            if backpressure is not None:
                backpressure.done(nbytes)
            bar.update(nbytes)
            before, seen = seen, seen + len(lengths)
            if log_every and seen // log_every > before // log_every:
                print(f"{PROG}: {seen} documents read, {sum(o.tokens for o in outputs)} tokens, "
                      f"{time.time() - start:.0f} s", file=sys.stderr, flush=True)
        for out in outputs:
            if not out.documents:
                why = (f"all {out.skipped} documents are empty" if out.skipped
                       else "the inputs hold no documents")
                raise InputError(f"nothing to write for key {out.key!r}: {why}")
        for out in outputs:
            out.commit()
        bar.update(bar.total - bar.n)  # blank lines were never counted
    except BaseException:
        bar.leave = False  # clear the bar so the error line stands alone
        for out in outputs:
            out.discard()
        for d in new_dirs:  # deepest first; leave no empty folders behind either
            try:
                os.rmdir(d)
            except OSError:
                break
        raise
    finally:
        bar.close()
        if pool is not None:
            backpressure.abort()
            pool.terminate()
            pool.join()

    docs = sum(o.documents for o in outputs)
    tokens = sum(o.tokens for o in outputs)
    skipped = sum(o.skipped for o in outputs)
    written = ", ".join(f"{o.prefix}.bin/.idx" for o in outputs)
    return (f"{PROG}: {docs} documents, {tokens} tokens, {skipped} empty documents skipped, "
            f"from {len(files)} input file{'s' if len(files) != 1 else ''} -> {written} "
            f"({np.dtype(dtype).name}) in {time.time() - start:.1f} s")


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Command-line entry point: returns 0, or raises SystemExit(2) after one error line."""
    argv = normalise_argv(sys.argv[1:] if argv is None else argv)
    try:
        summary = run(build_parser().parse_args(argv))
    except InputError as e:
        print(f"{PROG}: error: {e}", file=sys.stderr, flush=True)
        raise SystemExit(2) from None
    print(summary, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
