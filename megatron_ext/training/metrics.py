"""What a run prints and records: the start-up block, the Megatron-DeepSpeed log line, and the
same numbers as JSON lines (``<save>/metrics.jsonl`` or ``--metrics-file``) and TensorBoard
scalars (when tensorboard is installed)."""
from __future__ import annotations

import json
import os
from typing import Optional

import torch

from megatron_ext.training.moe_mtp_metrics import log_line_fields


def is_rank0() -> bool:
    return not torch.distributed.is_initialized() or torch.distributed.get_rank() == 0


def print_rank0(message: str) -> None:
    if is_rank0():
        print(message, flush=True)


def format_log_line(r: dict, train_iters: int) -> str:
    return (
        f" iteration={r['iteration']:8d}/{train_iters:8d} |"
        f" consumed_samples={r['consumed_samples']:12d} |"
        f" consumed_tokens={r['consumed_tokens']:12d} |"
        f" elapsed_time_per_iteration_ms={r['elapsed_time_per_iteration_ms']:.1f} |"
        f" learning_rate={r['learning_rate']:.6E} |"
        f" global_batch_size={r['global_batch_size']:5d} |"
        f" lm loss={r['lm_loss']:.6E} |"
        f"{log_line_fields(r)}"  # MoE / MTP losses and expert load, when the model has them
        f" grad_norm={r['grad_norm']:.4f} |"
        f" tokens_per_second={r['tokens_per_second']:.1f} |"
        f" TFLOPs={r['tflops']:.4f} |"
    )


def startup_table(plan, num_params: int, start: dict, schedule: str = "",
                  active_params: Optional[int] = None) -> str:
    """The start-up block: the run plan's rows (with ``schedule``, the one that actually runs after
    a checkpoint was loaded), the parameter count (a mixture of experts: total and active per token,
    which the TFLOPs count) and where the run starts."""
    params = f"{num_params:,}"
    if active_params is not None and active_params != num_params:
        params += f" total, {active_params:,} active per token (the TFLOPs count these)"
    rows = [(k, schedule) if k == "lr schedule" and schedule else (k, v) for k, v in plan.rows()]
    rows = [("parameters", params), *rows,
            ("resumed from", start["path"] or "-"), ("start iteration", start["iteration"])]
    width = max(len(k) for k, _ in rows)
    lines = ["-" * 60, "megatron_ext run"] + [f"  {k:<{width}} : {v}" for k, v in rows]
    lines += [f"  note: {note}" for note in plan.notes] + ["-" * 60]
    return "\n".join(lines)


def scalars_of(split: str, record: dict) -> dict:
    """The TensorBoard / W&B scalars of a record: ``split/key`` for numbers, ``split/key/name`` for a
    mapping of numbers (per-corpus losses); lists (expert load) stay in metrics.jsonl only."""
    scalars = {f"{split}/{k}": v for k, v in record.items() if k != "iteration" and isinstance(v, (int, float))}
    scalars.update({f"{split}/{k}/{name}": v for k, values in record.items() if isinstance(values, dict)
                    for name, v in values.items() if isinstance(v, (int, float))})
    return scalars


class MetricsWriter:
    """Rank 0 appends one JSON object per logged iteration / evaluation; TensorBoard mirrors it."""

    def __init__(self, args):
        self.file = None
        self.tb = None
        self.wandb = None
        if not is_rank0():
            return
        path = args.metrics_file or (os.path.join(args.save, "metrics.jsonl") if args.save else None)
        if path:
            os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
            self.file = open(path, "a")
        if args.tensorboard_dir and not args.no_tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                print_rank0("note: tensorboard is not installed; no TensorBoard scalars (pip install tensorboard)")
            else:
                self.tb = SummaryWriter(log_dir=args.tensorboard_dir)
        if args.wandb_project:
            try:
                import wandb
            except ImportError:
                print_rank0("note: wandb is not installed; not logging to Weights & Biases (pip install wandb)")
            else:
                self.wandb = wandb.init(project=args.wandb_project, name=args.wandb_exp_name,
                                        config={k: v for k, v in vars(args).items() if not k.startswith("_")},
                                        dir=args.save)

    def write(self, split: str, record: dict) -> None:
        if self.file is not None:
            self.file.write(json.dumps({"split": split, **record}) + "\n")
            self.file.flush()
        scalars = scalars_of(split, record)
        if self.tb is not None:
            for key, value in scalars.items():
                self.tb.add_scalar(key, value, record["iteration"])
        if self.wandb is not None:
            self.wandb.log(scalars, step=record["iteration"])

    def close(self) -> None:
        if self.file is not None:
            self.file.close()
        if self.tb is not None:
            self.tb.close()
        if self.wandb is not None:
            self.wandb.finish()
