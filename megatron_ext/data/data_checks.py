"""What the data files must satisfy before a run starts, checked by the run plan: each prefix's
``.idx`` readable and consistent with its ``.bin``, token ids within the tokenizer's vocabulary, and
every split the run reads holding at least one document of every prefix (megatron-core's
GPTDataset loops for ever on a split with no tokens). Every problem is one line naming the file.
"""
from __future__ import annotations

import os
from typing import List, Sequence, Tuple

import numpy as np

SPLIT_NAMES = ("train", "validation", "test")
# The token-id scan reads whole .bin files up to this size, and the first and last
# SCAN_EDGE_BYTES of larger ones (the loader checks every batch it reads as well).
SCAN_WHOLE_BYTES = 1 << 30
SCAN_EDGE_BYTES = 64 << 20


class DataFileError(ValueError):
    """Data files that cannot be used as given; the message is one line naming the file."""


def splits_read(args) -> Tuple[bool, bool, bool]:
    """Which splits the run reads: training always; validation and test only when evaluating
    (``--eval-iters`` > 0) and their ``--split`` weight is not 0."""
    weights = [float(x) for x in args.split.split(",")]
    evaluating = args.eval_iters > 0
    return True, evaluating and weights[1] > 0, evaluating and weights[2] > 0


def split_matrix(split: str) -> List:
    """megatron-core's own [begin, end) fractions of each split (None for a split of weight 0)."""
    from megatron.core.datasets.blended_megatron_dataset_config import (
        convert_split_vector_to_split_matrix,
        parse_and_normalize_split,
    )

    return convert_split_vector_to_split_matrix(parse_and_normalize_split(split))


def open_index(prefix: str):
    """megatron-core's IndexedDataset of ``prefix``, its ``.idx`` checked against its ``.bin``."""
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    dataset = IndexedDataset.__new__(IndexedDataset)
    try:
        dataset.__init__(prefix, mmap=True)
    except Exception as e:  # noqa: BLE001 - a damaged index fails in many ways inside megatron-core
        # megatron-core's __del__ deletes these two attributes, which a failed __init__ may not have
        # set: without them the destructor prints a traceback after our one line
        for name in ("bin_reader", "index"):
            dataset.__dict__.setdefault(name, None)
        detail = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise DataFileError(f"{prefix}.idx: not a readable Megatron index ({type(e).__name__}: {detail}); "
                            "preprocess the data again") from None
    lengths = dataset.index.sequence_lengths
    # Every sequence must lie inside the .bin (writers may leave bytes no sequence points at).
    ends = dataset.index.sequence_pointers + lengths.astype(np.int64) * np.dtype(dataset.index.dtype).itemsize
    needed = int(ends.max()) if len(ends) else 0
    actual = os.path.getsize(prefix + ".bin")
    if actual < needed:
        raise DataFileError(f"{prefix}.bin: {actual} bytes, but its .idx places {len(lengths)} documents in {needed} "
                            "bytes; the two files do not belong together (preprocess the data again)")
    return dataset


def max_token_id(prefix: str, dtype) -> Tuple[int, bool]:
    """(largest token id found, whether the whole file was read)."""
    path = prefix + ".bin"
    size = os.path.getsize(path)
    data = np.memmap(path, dtype=dtype, mode="r")
    if size <= SCAN_WHOLE_BYTES:
        return (int(data.max()) if data.size else -1), True
    edge = SCAN_EDGE_BYTES // np.dtype(dtype).itemsize
    return int(max(data[:edge].max(), data[-edge:].max())), False


def check_data_files(args, sources: Sequence, vocab_size: int) -> List[str]:
    """Raise DataFileError for the first unusable prefix; return notes for the start-up (e.g. a
    token-id scan that read only part of a very large file)."""
    matrix = split_matrix(args.split)
    read = splits_read(args)
    notes = []
    for source in sources:
        prefix = source.prefix
        dataset = open_index(prefix)
        documents = len(dataset.index.sequence_lengths)
        largest, whole = max_token_id(prefix, dataset.index.dtype)
        if largest >= vocab_size:
            raise DataFileError(f"{prefix}.bin holds token id {largest}, but the tokenizer has {vocab_size} tokens: "
                                "the data was made with another tokenizer (--tokenizer-model / TOKENIZER_MODEL)")
        if not whole:
            notes.append(f"{prefix}.bin: token ids checked in its first and last {SCAN_EDGE_BYTES >> 20} MiB; "
                         "every batch is checked as it is read")
        for i, name in enumerate(SPLIT_NAMES):
            if not read[i] or matrix[i] is None:
                continue
            begin = int(round(matrix[i][0] * documents))
            end = int(round(matrix[i][1] * documents))
            if end <= begin:
                weights = args.split.split(",")
                hint = ("raise its weight" if i == 0 else
                        f"raise its weight, set it to 0 (VAL_SPLIT/TEST_SPLIT=0) or pass --eval-iters 0")
                raise DataFileError(
                    f"--split {args.split}: the {name} split gets 0 of the {documents} documents of {prefix} "
                    f"(weight {weights[i]} of {sum(float(w) for w in weights):g}); {hint}")
    return notes
