"""Test harness: run a Megatron-DeepSpeed entry point and record every logged iteration exactly.

    python record_run.py OUT.jsonl SCRIPT.py [flags]
    python record_run.py OUT.jsonl -m megatron_ext.megatron_deepspeed [--plugins MODE] SCRIPT.py [flags]

The fork prints its losses rounded (6 decimals, LR to 6 digits); the tests compare runs to 1e-6,
so this wraps the fork's ``training_log`` (by name in ``megatron.training``) and writes one JSON
line per iteration: iteration, loss ("lm loss" as logged, full precision), learning rate (the
value the fork logs: the optimizer's first group after the step), consumed samples, grad norm,
and when it was logged (``time.perf_counter()``, and the process's CPU time, ``time.process_time()``;
for benchmarks/megatron_deepspeed.py).
It imports ``megatron.training`` before running the target, as the target would, so whatever
switches the plug-ins on (the start-up hook, ``install()``, ``-m``) has already patched it or
patches it then.
"""
import inspect
import json
import os
import runpy
import sys
import time


def main():
    out, target = sys.argv[1], sys.argv[2:]
    module = None
    if target[0] == "-m":
        module, target = target[1], target[2:]
    script = next(t for t in target if t.endswith(".py"))
    sys.path.insert(0, os.path.dirname(os.path.abspath(script)))
    import megatron.training as training  # the fork's

    original = training.training_log
    signature = inspect.signature(original)
    sink = open(out, "w") if int(os.environ.get("RANK", "0")) == 0 else None

    def training_log(*a, **kw):
        logged, cpu = time.perf_counter(), time.process_time()
        b = signature.bind(*a, **kw).arguments
        if sink is not None:
            from megatron import get_args

            args = get_args()
            loss = b["loss_dict"].get("lm loss")
            grad_norm = b.get("grad_norm")
            sink.write(json.dumps({
                "iteration": int(b["iteration"]),
                "loss": float(loss.item() if hasattr(loss, "item") else loss) if loss is not None else None,
                "lr": float(b["learning_rate"]),
                "consumed_samples": int(args.consumed_train_samples),
                "grad_norm": float(grad_norm) if grad_norm is not None else None,
                "time": logged,
                "cpu": cpu,
            }) + "\n")
            sink.flush()
        return original(*a, **kw)

    training.training_log = training_log
    if module is not None:
        sys.argv = [module, *target]
        runpy.run_module(module, run_name="__main__", alter_sys=True)
    else:
        sys.argv = list(target)
        runpy.run_path(script, run_name="__main__")


if __name__ == "__main__":
    main()
