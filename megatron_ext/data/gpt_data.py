"""Training/validation data: megatron-core's blended GPT datasets, read in the order Megatron
reads them. Sample ``i`` of the run is global position ``i``; a global batch is a contiguous
range of positions, split into micro-batches and then across data-parallel ranks. Resuming at
``consumed_samples`` therefore continues with exactly the samples an uninterrupted run would see,
and the same global batch gives the same data at any data-parallel size."""
from __future__ import annotations

import os
from typing import Dict, Iterator, List, Optional, Tuple

import torch
from megatron_ext.data.data_checks import DataFileError
from megatron_ext.data.data_checks import splits_read
from megatron_ext.data.data_list import blend_of
from megatron_ext.data.data_list import check_sources_exist, parse_data_file_list, parse_data_path
from megatron_ext.data.tokenizers import build_tokenizer
from megatron_ext.platform.accelerator import has_gpu


def data_sources(args):
    """The (weight, prefix, corpus) list the flags name; None for mock data. Validates files."""

    if args.mock_data:
        return None
    sources = parse_data_file_list(args.data_file_list) if args.data_file_list else parse_data_path(args.data_path)
    check_sources_exist(sources)
    return sources


class MockTokenizer:
    """Just enough tokenizer for megatron-core's MockGPTDataset (no files)."""

    def __init__(self, vocab_size: int):
        self.vocab_size = vocab_size
        self.eod = vocab_size - 1
        self.pad = -1
        # megatron-core hashes the tokenizer's identity into the dataset cache key
        self.unique_identifiers = {"class": "MockTokenizer", "vocab_size": vocab_size}


def tokenizer_for(args, sources):
    """The tokenizer the flags name (a stand-in for mock data without a tokenizer)."""
    if sources is None and args.tokenizer_model is None and args.vocab_file is None:
        return MockTokenizer(args.vocab_size)

    return build_tokenizer(args.tokenizer_type, args.tokenizer_model, args.vocab_file, args.merge_file, args.vocab_size)


def split_sizes(args) -> Tuple[int, int, int]:
    """Samples needed from train/valid/test. Validation always reuses the same first
    ``eval_iters`` global batches, so successive evaluations are comparable."""
    weights = [float(x) for x in args.split.split(",")]
    eval_samples = args.eval_iters * args.global_batch_size
    return (
        args.train_iters * args.global_batch_size,
        eval_samples if weights[1] > 0 else 0,
        eval_samples if weights[2] > 0 else 0,
    )


def dataset_config(args, tokenizer, sources):
    """megatron-core's GPTDatasetConfig for ``sources`` (None: mock data), from the flags."""
    from megatron.core.datasets.gpt_dataset import GPTDatasetConfig

    return GPTDatasetConfig(
        random_seed=args.seed,
        sequence_length=args.seq_length,
        blend=blend_of(sources) if sources else None,
        split=args.split,
        path_to_cache=args.data_cache_path,
        tokenizer=tokenizer,
        reset_position_ids=args.reset_position_ids,
        reset_attention_mask=args.reset_attention_mask,
        eod_mask_loss=args.eod_mask_loss,
        # Only documents need a mask of their own: the plain causal one is built by the attention itself.
        create_attention_mask=args.reset_attention_mask,
        mmap_bin_files=True,
    )


def build_datasets(args, tokenizer, sources):
    from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
    from megatron.core.datasets.gpt_dataset import GPTDataset, MockGPTDataset

    config = dataset_config(args, tokenizer, sources)
    for i, read in enumerate(splits_read(args)):
        if not read:  # not built: megatron-core would loop for ever on a split with no tokens
            config.split_matrix[i] = None
    cls = MockGPTDataset if sources is None else GPTDataset
    sizes = list(split_sizes(args))
    return BlendedMegatronDatasetBuilder(cls, sizes, lambda: True, config).build()


def check_batch_tokens(batch, vocab_size: int) -> None:
    """Every token of a batch must be a token of the model's vocabulary (a larger id would fail deep
    inside the embedding); one line naming the id. The run plan checks the files, this every batch."""

    largest = int(batch["tokens"].numpy().max())  # the loader's host tensor: no device work
    if largest >= vocab_size:
        raise DataFileError(f"a training batch holds token id {largest}, but the tokenizer has {vocab_size} tokens: "
                            "the data was made with another tokenizer (--tokenizer-model / TOKENIZER_MODEL)")


def corpus_names(sources) -> Dict[str, list]:
    """Corpus name -> its sources, in list order. A data file list names corpora (several prefixes
    may form one corpus); ``--data-path`` prefixes are named by their file name, with as many
    parent folders as it takes to tell prefixes of the same file name apart."""
    groups: Dict[str, list] = {}
    for s in sources:
        groups.setdefault(s.corpus, []).append(s)
    out: Dict[str, list] = {}
    for name, members in groups.items():
        if len(members) == 1 or any(m.origin for m in members):  # one source, or a list's own corpus name
            out[name] = members
            continue
        depth = 1
        while len({_path_tail(m.prefix, depth) for m in members}) < len(members) and depth < 64:
            depth += 1
        for m in members:  # the same prefix twice stays one corpus
            out.setdefault(_path_tail(m.prefix, depth), []).append(m)
    return out


def _path_tail(prefix: str, parts: int) -> str:
    return "/".join(os.path.normpath(prefix).split(os.sep)[-parts - 1:])


def build_corpus_validation_sets(args, tokenizer, sources, samples: int):
    """Per corpus of the data list, ``samples`` validation samples of that corpus alone (its prefixes
    blended by their weights), from the same validation split the blended validation set reads:
    a fixed set per corpus whatever the mixture's weights. ``{name: dataset}``; ValueError (one
    line) for a corpus without validation documents."""
    from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
    from megatron.core.datasets.gpt_dataset import GPTDataset

    out = {}
    for name, members in corpus_names(sources).items():
        config = dataset_config(args, tokenizer, members)
        config.split_matrix[0] = config.split_matrix[2] = None  # only the validation split is read
        _, valid, _ = BlendedMegatronDatasetBuilder(GPTDataset, [0, samples, 0], lambda: True, config).build()
        if valid is None or len(valid) == 0:
            raise ValueError(f"--eval-per-corpus: corpus {name!r} has no validation documents with --split {args.split}")
        out[name] = valid
    return out


class PretrainingBatchSampler:
    """Micro-batches of this data-parallel rank, starting at global position ``consumed``."""

    def __init__(self, total: int, consumed: int, micro_batch: int, dp_rank: int, dp_size: int):
        self.total, self.consumed = total, consumed
        self.micro_batch, self.dp_rank, self.dp_size = micro_batch, dp_rank, dp_size

    def __iter__(self) -> Iterator[List[int]]:
        step = self.micro_batch * self.dp_size
        start = self.consumed
        while start + step <= self.total:
            first = start + self.dp_rank * self.micro_batch
            yield list(range(first, first + self.micro_batch))
            start += step

    def __len__(self) -> int:
        return max(0, (self.total - self.consumed) // (self.micro_batch * self.dp_size))


def make_loader(dataset, args, consumed: int, total: Optional[int] = None):
    from megatron.core import parallel_state as ps

    if dataset is None:
        return None
    sampler = PretrainingBatchSampler(
        min(len(dataset), total if total is not None else len(dataset)),
        consumed,
        args.micro_batch_size,
        ps.get_data_parallel_rank(),
        ps.get_data_parallel_world_size(),
    )
    return torch.utils.data.DataLoader(
        dataset,
        batch_sampler=sampler,
        num_workers=args.num_workers,
        pin_memory=has_gpu(),
        persistent_workers=False,
        # Its own generator: each iterator draws a base seed, which from the global stream would
        # shift dropout's random numbers (a resumed run builds one more loader than the original).
        generator=torch.Generator().manual_seed(args.seed + consumed),
    )
