"""Evaluation during training (docs/evaluation.md).

* Validation / test: the mean LM loss over the fixed evaluation batches and the next-token accuracy
  (the fraction of unmasked positions whose arg-max prediction is the label), from one forward pass.
* ``--eval-per-corpus``: the same for each corpus of the data list on its own validation samples,
  with every validation (data-mixture experiments compare mixtures corpus by corpus).
* ``--eval-mc-file``: a multiple-choice set in HellaSwag's jsonl format, scored by the
  log-likelihood of each ending given its context, every ``--eval-mc-interval`` iterations and at
  the end, split across data-parallel ranks. A file in HellaSwag's full format (every row with
  ``activity_label``, ``ctx_a``, ``ctx_b``, ``endings``, ``label``) is built and scored as
  lm-evaluation-harness's ``hellaswag`` task does (``hellaswag.py``), so ``acc`` and ``acc_norm``
  are lm-eval's numbers; other files keep the plain rule (``ctx`` as given, after the
  end-of-document token). Both report ``acc`` (sum of log-likelihoods), ``acc_norm`` (lm-eval's:
  divided by the ending's length in characters) and ``mc_accuracy`` (mean per token).
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
from typing import Callable, List, NamedTuple, Optional, Sequence, Tuple

import torch

from megatron_ext.argtypes import positive_int
from megatron_ext.training import hellaswag
from megatron_ext.data.gpt_data import build_corpus_validation_sets
from megatron_ext.data.gpt_data import make_loader
from megatron_ext.optimizers.common import hooks as optimizer_hooks
from megatron_ext.training import pipeline
from megatron_ext.training.loss import captured_logits, dp_mean, dp_sum, lm_losses, loss_mask_of, masked_mean
from megatron_ext.training.loss import dp_sum
from megatron_ext.training.loss import lm_losses
from megatron_ext.training.metrics import print_rank0

MC_SPLIT = "mc_eval"  # the metrics.jsonl split of multiple-choice records
CORPUS_SPLIT = "validation_per_corpus"  # the metrics.jsonl split of per-corpus validation records

# --------------------------------------------------------------------------------------------
# Flags
# --------------------------------------------------------------------------------------------


def add_mc_eval_arguments(g) -> None:
    g.add_argument("--eval-mc-file", default=None, metavar="FILE.jsonl",
                   help="multiple-choice set in HellaSwag's jsonl format (ctx or ctx_a+ctx_b, endings, label; "
                        "with activity_label, ctx_a, ctx_b on every row: built and scored as lm-eval's hellaswag "
                        "task), reported as acc, acc_norm and per-token accuracy (docs/evaluation.md)")
    g.add_argument("--eval-mc-interval", type=positive_int, default=None, metavar="N",
                   help="score --eval-mc-file every N iterations and at the end (default --eval-interval)")
    g.add_argument("--eval-mc-limit", type=positive_int, default=None, metavar="K",
                   help="score only the first K examples of --eval-mc-file")


def add_corpus_eval_arguments(g) -> None:
    g.add_argument("--eval-per-corpus", action="store_true",
                   help="with every validation, the loss of each corpus of the data list on its own validation "
                        "samples (log, metrics.jsonl split validation_per_corpus, TensorBoard)")
    g.add_argument("--eval-per-corpus-iters", type=positive_int, default=None, metavar="N",
                   help="global batches per corpus with --eval-per-corpus (default --eval-iters)")


def check_corpus_eval(args, sources=None) -> None:
    """--eval-per-corpus needs a data list, a validation split and evaluation; fills
    --eval-per-corpus-iters."""
    if not args.eval_per_corpus:
        if args.eval_per_corpus_iters is not None:
            raise ValueError("--eval-per-corpus-iters has no effect without --eval-per-corpus")
        return
    if args.mock_data:
        raise ValueError("--eval-per-corpus needs a data list (--data-path or --data-file-list), not --mock-data")
    if float(args.split.split(",")[1]) == 0:
        raise ValueError(f"--eval-per-corpus needs a validation split: --split {args.split} has none")
    if args.eval_iters == 0:
        raise ValueError("--eval-per-corpus with --eval-iters 0: no validation to follow")
    if args.eval_per_corpus_iters is None:
        args.eval_per_corpus_iters = args.eval_iters
    # every corpus then has validation documents: the run plan's data check (data/data_checks.py)
    # requires one of every prefix in every split the run reads

def mc_examples_for(args, tokenizer, notes: Optional[List[str]] = None) -> Optional[tuple]:
    """The --eval-mc-file examples, read and tokenized (None without the file, or when the tokenizer
    is not known yet); which rule builds them goes to ``notes``. Fills --eval-mc-interval; raises
    ValueError (one line) for settings that cannot work or a bad line of the file, so both are
    reported before any work starts (run plan)."""
    if args.eval_mc_file is None:
        for dest in ("eval_mc_interval", "eval_mc_limit"):
            if getattr(args, dest) is not None:
                raise ValueError(f"--{dest.replace('_', '-')} has no effect without --eval-mc-file")
        return None
    if args.mock_data and args.tokenizer_model is None and args.vocab_file is None:
        raise ValueError("--eval-mc-file needs a tokenizer for its text: --mock-data has none unless "
                         "--tokenizer-model (or --vocab-file/--merge-file) names one")
    if args.eval_mc_interval is None:
        args.eval_mc_interval = args.eval_interval
    if tokenizer is None:
        return None
    examples = read_mc_file(args.eval_mc_file, args.eval_mc_limit, notes)
    return tuple(encode_mc_example(tokenizer, example, args.seq_length) for example in examples)


# --------------------------------------------------------------------------------------------
# Validation loss and next-token accuracy
# --------------------------------------------------------------------------------------------


def vocab_parallel_argmax(logits: torch.Tensor, real_vocab_size: int, tp_rank: int = 0, tp_size: int = 1,
                          group=None) -> torch.Tensor:
    """Arg-max over the full vocabulary of logits split across tensor-parallel ranks (each rank holds
    the contiguous shard ``[tp_rank * v, (tp_rank + 1) * v)``). Padded ids (>= ``real_vocab_size``)
    never win. Ties go to the smallest id, as ``torch.argmax`` over the whole row does."""
    width = logits.size(-1)
    start = tp_rank * width
    real = max(0, min(width, real_vocab_size - start))
    if real > 0:
        values, index = logits[..., :real].float().max(dim=-1)
        index = index + start
    else:  # a shard holding only padding
        values = torch.full(logits.shape[:-1], -math.inf, device=logits.device)
        index = torch.zeros(logits.shape[:-1], dtype=torch.long, device=logits.device)
    if tp_size == 1:
        return index
    best = values.clone()
    torch.distributed.all_reduce(best, op=torch.distributed.ReduceOp.MAX, group=group)
    index = torch.where(values == best, index, torch.full_like(index, torch.iinfo(torch.long).max))
    torch.distributed.all_reduce(index, op=torch.distributed.ReduceOp.MIN, group=group)
    return index


def evaluate(engine, dataset, args, device, iters: Optional[int] = None) -> Optional[dict]:
    """``{"lm_loss", "accuracy"}`` over the first ``iters`` (default ``--eval-iters``) global batches of ``dataset``.

    ``lm_loss`` is the mean of the micro-batch mean losses, averaged over data-parallel ranks;
    ``accuracy`` is correct / unmasked positions summed over every micro-batch and rank. Under
    pipeline parallelism each global batch's micro-batches pass the stages in one forward-only
    schedule and the last stage scores them."""
    from megatron.core import parallel_state as ps

    iters = args.eval_iters if iters is None else iters
    if dataset is None or iters == 0:
        return None
    engine.eval()
    total, count = torch.zeros((), device=device), 0
    hits = torch.zeros(2, dtype=torch.long, device=device)  # correct, positions
    vocab = getattr(args, "vocab_size_unpadded", None) or args.padded_vocab_size
    tp = (ps.get_tensor_model_parallel_rank(), ps.get_tensor_model_parallel_world_size(),
          ps.get_tensor_model_parallel_group())

    def forward(model, batch):
        """The per-token losses; on the last stage also counts the arg-max hits."""
        with captured_logits(engine.module if model is engine else model) as out:
            losses = lm_losses(model, batch, device)
        if "logits" in out:  # (the last stage)
            predicted = vocab_parallel_argmax(out["logits"], vocab, *tp).transpose(0, 1)  # [s, b] -> [b, s]
            labels = batch["labels"].to(device, non_blocking=True)
            mask = batch["loss_mask"].to(device, non_blocking=True) > 0
            hits[0] += ((predicted == labels) & mask).sum()
            hits[1] += mask.sum()
        return losses

    def loss(losses, batch):
        value = masked_mean(losses, loss_mask_of(batch, device))
        return value, {"lm loss": value.detach().clone()}

    # The optimizer's evaluation weights (schedule-free: the average x) while evaluating.
    with torch.no_grad(), optimizer_hooks.evaluation_weights(engine.basic_optimizer, engine):
        batches = make_loader(dataset, args, consumed=0, total=iters * args.global_batch_size)
        if pipeline.is_pipelined():
            group = []
            for batch in batches:
                group.append(batch)
                count += 1
                if len(group) == args.gradient_accumulation_steps:
                    for kept in pipeline.schedule(engine, group, forward, loss, forward_only=True):
                        total += kept["lm loss"]
                    group = []
        else:
            for batch in batches:
                total += loss(forward(engine, batch), batch)[0]
                count += 1
    engine.train()
    correct, positions = dp_sum(hits).tolist()
    return {"lm_loss": dp_mean(total / max(count, 1)),
            "accuracy": correct / positions if positions else float("nan")}


class CorpusValidation:
    """``--eval-per-corpus``: each corpus's validation loss, perplexity and next-token accuracy."""

    def __init__(self, datasets: dict, iters: int):
        self.datasets, self.iters = datasets, iters

    @classmethod
    def from_plan(cls, plan) -> Optional["CorpusValidation"]:
        a = plan.args
        if not a.eval_per_corpus:
            return None

        samples = a.eval_per_corpus_iters * a.global_batch_size
        return cls(build_corpus_validation_sets(a, plan.tokenizer, plan.data_sources, samples), a.eval_per_corpus_iters)

    def run(self, engine, args, device, iteration: int, consumed: int, metrics) -> dict:

        losses, ppls, accuracies = {}, {}, {}
        for name, dataset in self.datasets.items():
            result = evaluate(engine, dataset, args, device, self.iters)
            losses[name], accuracies[name] = result["lm_loss"], result["accuracy"]
            ppls[name] = math.exp(min(result["lm_loss"], 20.0))
        record = dict(iteration=iteration, consumed_samples=consumed, lm_loss=losses, ppl=ppls, accuracy=accuracies)
        print_rank0(f" validation loss per corpus at iteration {iteration} | "
                    + " | ".join(f"{name}: {loss:.6E}" for name, loss in losses.items()))
        metrics.write(CORPUS_SPLIT, record)
        return record


# --------------------------------------------------------------------------------------------
# Multiple choice (HellaSwag format)
# --------------------------------------------------------------------------------------------


HELLASWAG = "hellaswag"  # lm-eval's hellaswag task (hellaswag.py)
PLAIN = "plain"  # ctx as given, after the end-of-document token
RULES = {HELLASWAG: "HellaSwag as lm-eval's hellaswag task builds and scores it",
         PLAIN: "plain: ctx (or ctx_a + ctx_b) as given, after the end-of-document token"}


@dataclasses.dataclass
class MCExample:
    where: str  # "file:line", for error messages
    context: str
    endings: List[str]
    label: int
    rule: str = PLAIN  # HELLASWAG: context and endings are lm-eval's (cleaned)


@dataclasses.dataclass
class EncodedMCExample:
    sequences: List[List[int]]  # per ending: (end-of-document token,) context, ending
    ending_lengths: List[int]  # per ending: how many of its sequence's last tokens are the ending
    label: int
    characters: List[int] = dataclasses.field(default_factory=list)  # per ending: what acc_norm divides by
    rule: str = PLAIN


def _first_field(obj: dict, names: Sequence[str]):
    return next(((n, obj[n]) for n in names if n in obj), (None, None))


def parse_mc_record(obj, where: str, rule: str = PLAIN) -> MCExample:
    """One jsonl record -> MCExample; ValueError ``where: what is wrong`` otherwise. ``HELLASWAG``:
    the context and endings lm-eval's hellaswag task builds from the record."""
    if not isinstance(obj, dict):
        raise ValueError(f"{where}: expected a JSON object, got {type(obj).__name__}")
    if rule == HELLASWAG:
        for name in ("activity_label", "ctx_a", "ctx_b"):
            if not isinstance(obj[name], str):
                raise ValueError(f"{where}: field '{name}' must be a string")
        plain = parse_mc_record({k: v for k, v in obj.items() if k not in ("ctx", "query")}, where)
        endings = hellaswag.endings(obj)
        if not all(endings):
            raise ValueError(f"{where}: ending {endings.index('')} is empty after lm-eval's HellaSwag clean-up")
        return MCExample(where, hellaswag.context(obj), endings, plain.label, HELLASWAG)
    name, context = _first_field(obj, ("ctx", "query"))
    if name is None:
        if "ctx_a" not in obj:
            raise ValueError(f"{where}: missing field 'ctx' (or 'ctx_a' and 'ctx_b')")
        name, context = "ctx_a", obj["ctx_a"]
        ctx_b = obj.get("ctx_b", "")
        if not isinstance(ctx_b, str):
            raise ValueError(f"{where}: field 'ctx_b' must be a string")
        if isinstance(context, str) and ctx_b:
            context = f"{context} {ctx_b}"  # how HellaSwag builds its own 'ctx'
    if not isinstance(context, str):
        raise ValueError(f"{where}: field '{name}' must be a string")
    name, endings = _first_field(obj, ("endings", "choices"))
    if name is None:
        raise ValueError(f"{where}: missing field 'endings'")
    if (not isinstance(endings, list) or len(endings) < 2
            or not all(isinstance(e, str) and e.strip() for e in endings)):
        raise ValueError(f"{where}: field '{name}' must be a list of at least 2 non-empty strings")
    name, label = _first_field(obj, ("label", "gold"))
    if name is None:
        raise ValueError(f"{where}: missing field 'label' (HellaSwag's test split has no labels)")
    if isinstance(label, str) and label.strip().isdigit():
        label = int(label)
    if isinstance(label, bool) or not isinstance(label, int):
        raise ValueError(f"{where}: field '{name}' must be an integer, got {label!r}")
    if not 0 <= label < len(endings):
        raise ValueError(f"{where}: label {label} is out of range for {len(endings)} endings (0..{len(endings) - 1})")
    return MCExample(where, context, list(endings), label)


def read_mc_file(path: str, limit: Optional[int] = None, notes: Optional[List[str]] = None) -> List[MCExample]:
    """The first ``limit`` (default all) examples of a jsonl file; blank lines are skipped. When every
    record read has HellaSwag's full fields the examples are built as lm-eval's hellaswag task does,
    otherwise by the plain rule; which one, and why, goes to ``notes``."""
    records = _read_mc_records(path, limit)
    lacking = [(where, hellaswag.missing_fields(obj)) for where, obj in records if hellaswag.missing_fields(obj)]
    rule = PLAIN if lacking else HELLASWAG
    examples = [parse_mc_record(obj, where, rule) for where, obj in records]
    if notes is not None:
        why = ""
        if rule == PLAIN and len(lacking) < len(records):  # some records are in HellaSwag's full format
            where, missing = lacking[0]
            why = f" ({where} lacks {', '.join(missing)} of HellaSwag's full format)"
        notes.append(f"--eval-mc-file {path}: {len(examples)} examples, {RULES[rule]}{why}")
    return examples


def _read_mc_records(path: str, limit: Optional[int]) -> List[Tuple[str, object]]:
    """("file:line", parsed JSON) of the first ``limit`` records of a jsonl file."""
    if not os.path.isfile(path):
        raise ValueError(f"--eval-mc-file: no such file: {path}")
    records = []
    try:
        with open(path, "rb") as f:
            for lineno, raw in enumerate(f, 1):
                where = f"{path}:{lineno}"
                try:
                    line = raw.decode("utf-8")
                except UnicodeDecodeError:
                    raise ValueError(f"{where}: not UTF-8 text") from None
                if not line.strip():
                    continue
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError as e:
                    raise ValueError(f"{where}: malformed JSON ({e.msg})") from None
                if not isinstance(obj, dict):
                    raise ValueError(f"{where}: expected a JSON object, got {type(obj).__name__}")
                records.append((where, obj))
                if limit is not None and len(records) == limit:
                    break
    except OSError as e:
        raise ValueError(f"--eval-mc-file {path}: cannot read ({e.strerror})") from None
    if not records:
        raise ValueError(f"--eval-mc-file {path}: no examples")
    return records


def _joined(context: str, ending: str) -> str:
    """The text of context + ending: one space between them, as HellaSwag's endings have none."""
    if not context or context[-1].isspace() or ending[0].isspace():
        return context + ending
    return context + " " + ending


def _lm_eval_request(tokenizer, context: str, continuation: str) -> Tuple[List[int], int]:
    """(tokens of context + continuation, how many of the last ones are the continuation) as
    lm-eval's Hugging Face model splits a request: whitespace at the context's end moves to the
    continuation, and the tokens of the whole text are cut after as many as the context alone has."""
    moved = len(context) - len(context.rstrip())
    if moved:
        context, continuation = context[:-moved], context[-moved:] + continuation
    whole = tokenizer.tokenize(context + continuation)
    return whole, len(whole) - len(tokenizer.tokenize(context))


def encode_mc_example(tokenizer, example: MCExample, max_tokens: int) -> EncodedMCExample:
    """Token ids of each ending after its context. Plain rule: the context follows the
    end-of-document token (as a document starts in the training data); an ending's tokens are
    those of context + ending after their longest common prefix with the context's own tokens, so a
    token spanning the boundary is scored with the ending. HellaSwag rule: lm-eval's request (no
    token before the context, `` " " + ending``, ``_lm_eval_request``). Contexts are cut from the
    left to fit ``max_tokens`` model inputs."""
    if example.rule == HELLASWAG:
        return _encode_as_lm_eval(tokenizer, example, max_tokens)
    try:
        context = tokenizer.tokenize(example.context)
        sequences, lengths = [], []
        for k, ending in enumerate(example.endings):
            full = tokenizer.tokenize(_joined(example.context, ending))
            common = 0
            while common < min(len(context), len(full)) and context[common] == full[common]:
                common += 1
            if common == len(full):
                raise ValueError(f"ending {k} adds no tokens")
            if len(full) - common > max_tokens:
                raise ValueError(f"ending {k} is {len(full) - common} tokens, more than --seq-length {max_tokens}")
            sequences.append(([tokenizer.eod] + full)[-(max_tokens + 1):])
            lengths.append(len(full) - common)
    except ValueError as e:
        raise ValueError(f"{example.where}: {e}") from None
    # acc_norm divides by the text each ending adds (the joining space included, as in --mc-file's task)
    characters = [len(_joined(example.context, ending)) - len(example.context) for ending in example.endings]
    return EncodedMCExample(sequences, lengths, example.label, characters, PLAIN)


def _encode_as_lm_eval(tokenizer, example: MCExample, max_tokens: int) -> EncodedMCExample:
    sequences, lengths = [], []
    try:
        for k, ending in enumerate(example.endings):
            tokens, n = _lm_eval_request(tokenizer, example.context, hellaswag.TARGET_DELIMITER + ending)
            if n < 1:
                raise ValueError(f"ending {k} adds no tokens")
            if n > max_tokens:
                raise ValueError(f"ending {k} is {n} tokens, more than --seq-length {max_tokens}")
            sequences.append(tokens[-(max_tokens + 1):])
            lengths.append(n)
    except ValueError as e:
        raise ValueError(f"{example.where}: {e}") from None
    return EncodedMCExample(sequences, lengths, example.label, [len(e) for e in example.endings], HELLASWAG)


# log p(sequence[t + 1] | sequence[: t + 1]) for t = 0 .. len - 2, for each of a list of sequences
TokenLogProbs = Callable[[List[List[int]]], List[List[float]]]


def ending_log_likelihoods(example: EncodedMCExample, token_log_probs: TokenLogProbs) -> Optional[List[Tuple[float, int]]]:
    """(sum of the ending's token log-probabilities, number of ending tokens) for each ending (None
    on a pipeline stage before the last, which has no log-probabilities)."""
    per_token = token_log_probs(example.sequences)
    if per_token is None:
        return None
    return [(math.fsum(lp[len(lp) - n:]), n) for lp, n in zip(per_token, example.ending_lengths)]


class Choice(NamedTuple):
    per_token: int  # the ending with the highest mean log-probability per token
    acc: int  # ... the highest sum of log-probabilities (lm-eval's acc)
    acc_norm: int  # ... the highest sum divided by its length in characters (lm-eval's acc_norm)


def choose(scores: Sequence[Tuple[float, int]], characters: Sequence[int]) -> Choice:
    """The ending each rule picks from ``scores`` ((sum, tokens) per ending); the first one wins a tie."""
    endings = range(len(scores))
    return Choice(per_token=max(endings, key=lambda k: scores[k][0] / scores[k][1]),
                  acc=max(endings, key=lambda k: scores[k][0]),
                  acc_norm=max(endings, key=lambda k: scores[k][0] / characters[k]))


def model_token_log_probs(engine, device) -> TokenLogProbs:
    """One forward of the model over all sequences (right-padded; causal attention makes padding
    invisible to earlier positions). The model's per-token loss with labels is exactly
    -log p(label): its vocabulary-parallel cross entropy, correct under tensor parallelism."""

    def run(sequences: List[List[int]]) -> Optional[List[List[float]]]:
        width = max(len(s) for s in sequences) - 1
        pad = sequences[0][0]  # any valid id: padded positions are never read
        rows = [s + [pad] * (width + 1 - len(s)) for s in sequences]
        ids = torch.tensor(rows, dtype=torch.long, device=device)
        positions = torch.arange(width, dtype=torch.long, device=device).expand(len(rows), width)
        batch = dict(tokens=ids[:, :-1], position_ids=positions, labels=ids[:, 1:],
                     loss_mask=torch.ones(ids[:, 1:].shape, device=device))
        if pipeline.is_pipelined():  # one micro-batch through the stages; the last has the losses
            kept = pipeline.schedule(engine, [batch], lambda model, b: lm_losses(model, b, device),
                                     lambda losses, b: (losses.sum(), {"losses": losses.detach()}), forward_only=True)
            if not kept:
                return None
            losses = kept[0]["losses"]
        else:
            losses = lm_losses(engine, batch, device)
        losses = losses.double().cpu()
        return [(-losses[i, : len(s) - 1]).tolist() for i, s in enumerate(sequences)]

    return run


class MultipleChoiceEval:
    """``--eval-mc-file``: accuracy on a multiple-choice set, split across data-parallel ranks."""

    def __init__(self, path: str, examples: List[EncodedMCExample]):
        self.path, self.examples = path, examples
        self.rule = examples[0].rule

    @classmethod
    def from_plan(cls, plan) -> Optional["MultipleChoiceEval"]:
        if plan.mc_examples is None:
            return None
        return cls(plan.args.eval_mc_file, list(plan.mc_examples))

    def due(self, iteration: int, args) -> bool:
        return iteration % args.eval_mc_interval == 0 and iteration < args.train_iters

    def run(self, engine, device, iteration: int, consumed: int, metrics) -> dict:
        from megatron.core import parallel_state as ps

        rank, size = ps.get_data_parallel_rank(), ps.get_data_parallel_world_size()
        token_log_probs = model_token_log_probs(engine, device)
        counts = torch.zeros(4, dtype=torch.long, device=device)  # per-token, acc, acc_norm correct; examples
        engine.eval()
        with torch.no_grad(), optimizer_hooks.evaluation_weights(engine.basic_optimizer, engine):
            # Every rank runs the same number of forwards (ZeRO-3 gathers parameters collectively):
            # a rank past the end repeats example 0 and does not count it.
            for first in range(0, len(self.examples), size):
                index = first + rank
                example = self.examples[index if index < len(self.examples) else 0]
                scores = ending_log_likelihoods(example, token_log_probs)
                if scores is not None and index < len(self.examples):
                    choice = choose(scores, example.characters)
                    counts += torch.tensor([*(int(k == example.label) for k in choice), 1], device=device)
        engine.train()
        per_token, acc, acc_norm, n = dp_sum(counts).tolist()
        record = dict(iteration=iteration, consumed_samples=consumed, acc=acc / n, acc_norm=acc_norm / n,
                      mc_accuracy=per_token / n, mc_examples=n, mc_rule=self.rule)
        print_rank0(f" multiple-choice eval at iteration {iteration} | acc: {acc / n:.4f} ({acc}/{n}) | "
                    f"acc_norm: {acc_norm / n:.4f} ({acc_norm}/{n}) | per token: {per_token / n:.4f} "
                    f"({per_token}/{n}) | {self.rule} rule | file: {os.path.basename(self.path)}")
        metrics.write(MC_SPLIT, record)
        return record
