"""Tokens/s and model FLOPs utilisation (MFU) of the trainer on one accelerator, per preset and
attention backend, in one command:

    python benchmarks/mfu.py                      # 125M, 350M, 2B; every backend that runs here
    python benchmarks/mfu.py --presets 2B --backends te sdpa --peak-tflops 989
    python benchmarks/mfu.py --presets tiny --micro-batch 1 --iters 6 --peak-tflops 0.1   # CPU smoke run

Each (preset, backend) trains the preset's llama-style shape on synthetic tokens (vocabulary
32,000, bf16, ZeRO 1, AdamW, one process, the preset's sequence length unless --seq) with the
largest micro batch that fits: from --max-micro-batch down by halves until a run does not run out
of memory (--micro-batch fixes it). A fresh process per run; its speed is the median iteration
time of the logging windows after the first (the trainer logs every --log-interval iterations,
so the step has no host sync in between).

Model FLOPs per token (PaLM's MFU convention, the one Megatron-LM reports): 6 x the matrix
parameters the token passes through (every transformer matrix and the output layer; not the
input embedding lookup) + 12 x layers x hidden x sequence for attention scores, counted as full
(non-causal) attention. MFU = model FLOPs/s / the accelerator's peak dense bf16 FLOP/s (the table
below, by device name; --peak-tflops overrides). Target (issue 18): MFU >= 45% for 2B with the
fastest backend on one H100/H200-class GPU.
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

PRESETS = ("125M", "350M", "2B")
MAX_MICRO_BATCH = {"tiny": 4, "125M": 32, "350M": 16, "2B": 8}
VOCAB = 32000


def device_name() -> str:
    import torch

    if torch.cuda.is_available():
        return torch.cuda.get_device_name(0)
    if hasattr(torch, "xpu") and torch.xpu.is_available():
        return torch.xpu.get_device_name(0)
    return "cpu"


def peak_tflops(name: str):
    """Peak dense bf16 TFLOP/s of the device torch names (the memory plan's table), or None."""
    from megatron_ext.planning.devices import for_model

    device = for_model(name)
    return device.peak_tflops if device is not None else None


def available_backends():
    from megatron_ext.models.features.attention_backend import transformer_engine_problem

    return (["te"] if transformer_engine_problem() is None else []) + ["sdpa", "local"]


def model_flops_per_token(shape: dict, seq: int, vocab: int = VOCAB) -> float:
    h, layers, ffn = shape["hidden_size"], shape["num_layers"], shape["ffn_hidden_size"]
    heads, kv = shape["num_attention_heads"], shape["num_key_value_heads"]
    head_dim = h // heads
    per_layer = h * (h + 2 * kv * head_dim) + h * h + 3 * h * ffn  # QKV, projection, SwiGLU fc1 (2 ffn) + fc2
    matrices = layers * per_layer + h * vocab  # + the (untied) output layer
    return 6.0 * matrices + 12.0 * layers * h * seq


def train_flags(preset: str, backend: str, micro_batch: int, seq: int, opts) -> list:
    from megatron_ext.launcher.presets import MODEL_PRESETS

    shape = MODEL_PRESETS[preset]
    flags = [f"--{k.replace('_', '-')}={v}" for k, v in shape.items() if k not in ("seq_length", "rope_theta")]
    return flags + [
        f"--seq-length={seq}", f"--rope-theta={shape['rope_theta']}", "--model-style=llama",
        "--mock-data", f"--vocab-size={VOCAB}", f"--micro-batch-size={micro_batch}", f"--train-iters={opts.iters}",
        f"--log-interval={opts.log_interval}", "--eval-iters=0", "--eval-interval=1000000", "--lr=1e-4",
        "--zero-stage=1", f"--attention-backend={backend}", "--optimizer=adamw",
    ] + (["--bf16"] if opts.dtype == "bf16" else [])


def run_one(preset, backend, micro_batch, seq, opts, tmp):
    """Median seconds per iteration, or None when it ran out of memory."""
    metrics = os.path.join(tmp, f"{preset}-{backend}-{micro_batch}.jsonl")
    cmd = [sys.executable, __file__, "--child", *train_flags(preset, backend, micro_batch, seq, opts),
           f"--metrics-file={metrics}"]
    if opts.sync_debug:
        cmd.insert(3, "--sync-debug")
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO)
    text = proc.stdout + proc.stderr
    for line in text.splitlines():
        if line.startswith("SYNCS "):
            print(f"    {preset} {backend} micro batch {micro_batch}: {line}")
    if proc.returncode != 0:
        if "out of memory" in text.lower() or "outofmemory" in text.lower():
            return None
        raise RuntimeError(f"{preset}/{backend}/micro batch {micro_batch} failed:\n{text[-4000:]}")
    with open(metrics) as f:
        windows = [json.loads(line) for line in f if '"train"' in line]
    times = [w["elapsed_time_per_iteration_ms"] / 1000 for w in windows[1:]] or \
            [w["elapsed_time_per_iteration_ms"] / 1000 for w in windows]
    return statistics.median(times)


def child(argv, sync_debug: bool) -> int:
    """Run the trainer in this process; with ``sync_debug`` (CUDA) count synchronising calls by
    where they happen (torch's sync debug mode warns at each one)."""
    import warnings

    import torch

    from megatron_ext.train import run

    counts = {"step": 0, "logging": 0, "outside the loop": 0}
    if sync_debug and torch.cuda.is_available():
        def where():
            frame = sys._getframe()
            while frame is not None:
                if frame.f_code.co_name == "pretrain" and "logging_now" in frame.f_locals:
                    return "logging" if frame.f_locals["logging_now"] else "step"
                frame = frame.f_back
            return "outside the loop"

        shown = warnings.showwarning

        def count(message, category, filename, lineno, file=None, line=None):
            if "synchroniz" in str(message):
                counts[where()] += 1
            else:
                shown(message, category, filename, lineno, file, line)

        warnings.simplefilter("always")
        warnings.showwarning = count
        torch.cuda.set_sync_debug_mode("warn")
    code = run(argv)
    if sync_debug:
        found = ", ".join(f"{k}: {v}" for k, v in counts.items()) if torch.cuda.is_available() else "n/a (not CUDA)"
        print(f"SYNCS {found}", flush=True)
    return code or 0


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--presets", nargs="+", default=list(PRESETS))
    p.add_argument("--backends", nargs="+", default=None, help="default: every backend that runs here")
    p.add_argument("--seq", type=int, default=None, help="default: the preset's sequence length")
    p.add_argument("--micro-batch", type=int, default=None, help="fix the micro batch (default: largest that fits)")
    p.add_argument("--max-micro-batch", type=int, default=None, help="start of the search (default per preset)")
    p.add_argument("--iters", type=int, default=30)
    p.add_argument("--log-interval", type=int, default=5)
    p.add_argument("--dtype", choices=["bf16", "fp32"], default=None, help="default bf16 (fp32 on CPU)")
    p.add_argument("--peak-tflops", type=float, default=None, help="peak dense bf16 TFLOP/s of the device")
    p.add_argument("--sync-debug", action="store_true",
                   help="CUDA: count synchronising calls per place (torch.cuda.set_sync_debug_mode)")
    p.add_argument("--out", default=None, help="also write the results as JSON here")
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        rest = sys.argv[2:]
        debug = "--sync-debug" in rest
        return child([a for a in rest if a != "--sync-debug"], debug)
    opts = p.parse_args()

    from megatron_ext.launcher.presets import MODEL_PRESETS

    name = device_name()
    opts.dtype = opts.dtype or ("fp32" if name == "cpu" else "bf16")
    peak = opts.peak_tflops or peak_tflops(name)
    backends = opts.backends or available_backends()
    print(f"device: {name}; peak dense bf16: {f'{peak:g} TFLOP/s' if peak else 'unknown (give --peak-tflops)'}; "
          f"{opts.dtype}, ZeRO 1, one process, synthetic tokens (vocabulary {VOCAB})")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for preset in opts.presets:
            shape = MODEL_PRESETS[preset]
            seq = opts.seq or shape["seq_length"]
            for backend in backends:
                candidates = [opts.micro_batch] if opts.micro_batch else []
                if not candidates:
                    mb = opts.max_micro_batch or MAX_MICRO_BATCH.get(preset, 8)
                    while mb >= 1:
                        candidates.append(mb)
                        mb //= 2
                result = None
                for mb in candidates:
                    seconds = run_one(preset, backend, mb, seq, opts, tmp)
                    if seconds is not None:
                        result = (mb, seconds)
                        break
                    print(f"    {preset} {backend}: micro batch {mb} ran out of memory")
                if result is None:
                    rows.append(dict(preset=preset, backend=backend, seq=seq, micro_batch=None))
                    continue
                mb, seconds = result
                tokens = mb * seq / seconds
                flops = model_flops_per_token(shape, seq) * tokens
                rows.append(dict(preset=preset, backend=backend, seq=seq, micro_batch=mb, ms_per_iter=1000 * seconds,
                                 tokens_per_second=tokens, model_tflops=flops / 1e12,
                                 mfu=flops / (peak * 1e12) if peak else None))
                print(f"  {preset:>5} {backend:>5} seq {seq} micro batch {mb:>3}: {tokens:10.1f} tokens/s, "
                      f"{flops / 1e12:8.2f} model TFLOP/s" + (f", MFU {100 * rows[-1]['mfu']:.1f}%" if peak else ""),
                      flush=True)
    print(f"\n{'preset':>6} {'backend':>7} {'seq':>5} {'micro':>5} {'ms/iter':>9} {'tokens/s':>10} {'TFLOP/s':>8} "
          f"{'MFU':>6}  vs local")
    for r in rows:
        if r["micro_batch"] is None:
            print(f"{r['preset']:>6} {r['backend']:>7} {r['seq']:>5}   out of memory at micro batch 1")
            continue
        local = next((x for x in rows if x["preset"] == r["preset"] and x["backend"] == "local"
                      and x["micro_batch"] is not None), None)
        ratio = f"x{r['tokens_per_second'] / local['tokens_per_second']:.2f}" if local else "-"
        mfu = f"{100 * r['mfu']:5.1f}%" if r["mfu"] is not None else "   n/a"
        print(f"{r['preset']:>6} {r['backend']:>7} {r['seq']:>5} {r['micro_batch']:>5} {r['ms_per_iter']:9.1f} "
              f"{r['tokens_per_second']:10.1f} {r['model_tflops']:8.2f} {mfu}  {ratio}")
    if opts.out:
        with open(opts.out, "w") as f:
            json.dump(dict(device=name, peak_tflops=peak, rows=rows), f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
