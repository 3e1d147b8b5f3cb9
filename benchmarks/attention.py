"""Core attention, forward + backward: ``--attention-backend sdpa`` (torch's fused kernel) against
``local`` (megatron-core's DotProductAttention, the [b, heads, s, s] score matrix), in one run.

    python benchmarks/attention.py [--seqs 512 1024 2048 4096] [--heads 16 --groups 8 --head-dim 128]

For each sequence length and backend a fresh process builds the module (the real megatron-core
layer-spec class), runs forward + backward on random q/k/v of the 2B preset's attention shape
(batch 1, 16 heads, 8 KV groups, head dim 128, causal), and reports the median time of --repeats
and the peak resident memory the pass added (Linux VmHWM after clear_refs, glibc told to return
large blocks, so a freed buffer is not counted twice). Prints each length's time and memory and
their sdpa/local ratios, then how each backend's memory grows per doubling of the length.
Targets: sdpa's memory grows linearly (x2 per doubling, not x4); sdpa >= 2x faster at 2048.
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _rss_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def measure(backend, seq, opts):
    """In this (fresh) process: median seconds and peak added MiB of forward + backward."""
    sys.path.insert(0, REPO)
    import torch
    from megatron.core import parallel_state as ps
    from megatron.core.transformer.dot_product_attention import DotProductAttention
    from megatron.core.transformer.enums import AttnMaskType
    from megatron.core.transformer.transformer_config import TransformerConfig

    from megatron_ext.models.sdpa import SDPACoreAttention
    from megatron_ext.platform import init_distributed
    from megatron_ext.training.trainer import set_seeds

    init_distributed()
    ps.initialize_model_parallel()
    set_seeds(1)
    config = TransformerConfig(num_layers=1, hidden_size=opts.heads * opts.head_dim, num_attention_heads=opts.heads,
                               num_query_groups=opts.groups, attention_dropout=0.0, use_cpu_initialization=True,
                               masked_softmax_fusion=False,
                               attention_softmax_in_fp32=True)
    cls = SDPACoreAttention if backend == "sdpa" else DotProductAttention
    module = cls(config=config, layer_number=1, attn_mask_type=AttnMaskType.causal, attention_type="self")
    q = torch.randn(seq, opts.batch, opts.heads, opts.head_dim, requires_grad=True)
    k = torch.randn(seq, opts.batch, opts.groups, opts.head_dim, requires_grad=True)
    v = torch.randn(seq, opts.batch, opts.groups, opts.head_dim, requires_grad=True)
    grad_out = torch.randn(seq, opts.batch, opts.heads * opts.head_dim)

    def step():
        out = module(q, k, v, None)
        out.backward(grad_out)
        q.grad = k.grad = v.grad = None

    step()  # warm-up: lazily built buffers (megatron-core's global memory buffer, the causal mask)
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset the peak (VmHWM) to the current resident size
    before = _rss_kb("VmRSS")
    times = []
    for _ in range(opts.repeats):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    peak = _rss_kb("VmHWM") - before
    return statistics.median(times), peak / 1024


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seqs", type=int, nargs="+", default=[512, 1024, 2048, 4096])
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--heads", type=int, default=16)
    p.add_argument("--groups", type=int, default=8)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--child", nargs=2, metavar=("BACKEND", "SEQ"), help=argparse.SUPPRESS)
    opts = p.parse_args()
    if opts.child:
        t, mib = measure(opts.child[0], int(opts.child[1]), opts)
        print("RESULT " + json.dumps({"seconds": t, "peak_mib": mib}), flush=True)
        return 0

    # glibc keeps large freed blocks in its heap once its mmap threshold has grown; a fixed
    # threshold returns them, so the peak measures what the pass needs.
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "131072", "PYTHONPATH": REPO}
    results = {}
    for seq in opts.seqs:
        for backend in ("local", "sdpa"):
            cmd = [sys.executable, __file__, "--child", backend, str(seq), "--batch", str(opts.batch), "--heads",
                   str(opts.heads), "--groups", str(opts.groups), "--head-dim", str(opts.head_dim),
                   "--repeats", str(opts.repeats)]
            proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=REPO)
            line = [l for l in proc.stdout.splitlines() if l.startswith("RESULT ")]
            if proc.returncode != 0 or not line:
                print(proc.stdout[-2000:], proc.stderr[-4000:], file=sys.stderr)
                return 1
            results[backend, seq] = json.loads(line[-1][7:])
    print(f"core attention forward + backward, fp32, causal, batch {opts.batch}, {opts.heads} heads, "
          f"{opts.groups} KV groups, head dim {opts.head_dim} (median of {opts.repeats}; peak = resident "
          "memory the pass added)")
    print(f"{'seq':>6} | {'local ms':>9} {'sdpa ms':>9} {'speed-up':>8} | {'local MiB':>9} {'sdpa MiB':>9} "
          f"{'sdpa/local':>10}")
    for seq in opts.seqs:
        lo, sd = results["local", seq], results["sdpa", seq]
        print(f"{seq:>6} | {1000 * lo['seconds']:9.1f} {1000 * sd['seconds']:9.1f} {lo['seconds'] / sd['seconds']:7.2f}x"
              f" | {lo['peak_mib']:9.1f} {sd['peak_mib']:9.1f} {sd['peak_mib'] / lo['peak_mib']:10.3f}")
    for backend in ("local", "sdpa"):
        growth = [results[backend, b]["peak_mib"] / results[backend, a]["peak_mib"]
                  for a, b in zip(opts.seqs, opts.seqs[1:])]
        print(f"{backend} peak memory growth per step of the lengths above: "
              + ", ".join(f"x{g:.2f}" for g in growth) + "  (linear: x2 per doubling, quadratic: x4)")
    if 2048 in opts.seqs:
        speed = results["local", 2048]["seconds"] / results["sdpa", 2048]["seconds"]
        print(f"sdpa speed-up at 2048: {speed:.2f}x (target >= 2)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
