"""LR transfer across width (sp vs mup) and depth (sp vs completep) on the demo corpus.

For each parametrization and model size, train the real trainer for --iters iterations at each LR
of a power-of-two grid and record the final validation loss. Under a parametrization that
transfers, the best LR stays put as the model grows; under sp it drifts (down with width).

    python experiments/lr_transfer.py [--iters 200] [--out docs/img/lr_transfer] [--jobs 2]

Writes OUT.jsonl (one line per finished run, appended as runs finish: an interrupted experiment
resumes where it stopped), OUT.png (loss vs LR, one panel per sweep; needs matplotlib) and prints a
table of the best LR per size. Takes ~40 min on 2 idle CPU cores with the defaults. Not a test.
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

SWEEPS = {  # name -> (axis, sizes, parametrizations)
    "width": ("hidden", [64, 128, 256], ["sp", "mup"]),
    "depth": ("layers", [2, 4, 8], ["sp", "completep"]),
}
BASE_WIDTH, BASE_DEPTH = 64, 2
FIXED = {"width": {"layers": 2}, "depth": {"hidden": 128}}


def _env():
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR",
                                                             "MASTER_PORT")}
    env["OMP_NUM_THREADS"] = "1"  # --jobs processes share the cores
    return env


def run_one(demo, parametrization, hidden, layers, lr, iters, tmp):
    metrics = os.path.join(tmp, f"{parametrization}-h{hidden}-l{layers}-lr{lr:g}.jsonl")
    cmd = [sys.executable, "-m", "megatron_ext.train", "--num-layers", str(layers), "--hidden-size", str(hidden),
           "--num-attention-heads", "4", "--ffn-hidden-size", str(4 * hidden), "--seq-length", "128",
           "--micro-batch-size", "8", "--train-iters", str(iters), "--lr", f"{lr:g}",
           "--lr-warmup-iters", str(iters // 10), "--lr-decay-style", "cosine", "--min-lr", f"{lr / 10:g}",
           "--weight-decay", "0.1", "--eval-interval", str(10 * iters), "--eval-iters", "16", "--split", "98,2,0",
           "--log-interval", str(iters), "--zero-stage", "0",
           "--data-file-list", demo["data_file_list"], "--tokenizer-type", demo["tokenizer_type"],
           "--tokenizer-model", demo["tokenizer_model"], "--parametrization", parametrization,
           "--metrics-file", metrics]
    if parametrization in ("mup", "completep"):
        cmd += ["--mup-base-hidden", str(min(BASE_WIDTH, hidden))]
    if parametrization == "completep":
        cmd += ["--depth-base", str(min(BASE_DEPTH, layers))]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, env=_env())
    if proc.returncode != 0:
        raise RuntimeError(f"run failed: {' '.join(cmd)}\n{proc.stderr[-2000:]}")
    with open(metrics) as f:
        valid = [json.loads(line) for line in f if '"validation"' in line]
    loss = valid[-1]["lm_loss"]
    return loss if loss == loss else float("inf")  # NaN (diverged) -> inf


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--iters", type=int, default=200)
    p.add_argument("--lrs", default="0.00025,0.0005,0.001,0.002,0.004,0.008,0.016,0.032")
    p.add_argument("--sweeps", default="width,depth")
    p.add_argument("--jobs", type=int, default=2, help="runs at a time")
    p.add_argument("--out", default=os.path.join(REPO, "docs", "img", "lr_transfer"))
    p.add_argument("--report-only", action="store_true", help="run nothing: table and plot of the runs in OUT.jsonl")
    opts = p.parse_args()
    sys.path.insert(0, REPO)
    from megatron_ext.launcher.demo import prepare

    demo = prepare(os.path.join(REPO, "data", "demo"))
    lrs = [float(x) for x in opts.lrs.split(",")]
    jobs = []
    for sweep in opts.sweeps.split(","):
        axis, sizes, parametrizations = SWEEPS[sweep]
        for par in parametrizations:
            for size in sizes:
                shape = dict(FIXED[sweep], **{axis: size})
                for lr in lrs:
                    jobs.append((sweep, par, shape["hidden"], shape["layers"], size, lr))
    os.makedirs(os.path.dirname(opts.out) or ".", exist_ok=True)
    done = {}
    if os.path.exists(opts.out + ".jsonl"):
        with open(opts.out + ".jsonl") as f:
            for line in f:
                r = json.loads(line)
                done[(r["sweep"], r["parametrization"], r["size"], r["lr"], r["iters"])] = r
    todo = [] if opts.report_only else [j for j in jobs if (j[0], j[1], j[4], j[5], opts.iters) not in done]
    print(f"{len(jobs) - len(todo)} runs already done, {len(todo)} to go", flush=True)
    with tempfile.TemporaryDirectory() as tmp, ThreadPoolExecutor(opts.jobs) as pool, \
            open(opts.out + ".jsonl", "a") as log:
        futures = [pool.submit(run_one, demo, par, h, l, lr, opts.iters, tmp) for _, par, h, l, _, lr in todo]
        for (sweep, par, h, l, size, lr), fut in zip(todo, futures):
            loss = fut.result()
            r = dict(sweep=sweep, parametrization=par, hidden=h, layers=l, size=size, lr=lr, iters=opts.iters,
                     loss=loss)
            done[(sweep, par, size, lr, opts.iters)] = r
            log.write(json.dumps(r) + "\n")
            log.flush()
            print(f"{sweep:<5} {par:<9} hidden {h:<4} layers {l:<2} lr {lr:<8g} valid loss {loss:.4f}", flush=True)
    results = [done[key] for key in ((j[0], j[1], j[4], j[5], opts.iters) for j in jobs) if key in done]
    print("\nbest LR per size (validation loss at it):")
    for sweep in opts.sweeps.split(","):
        axis, sizes, parametrizations = SWEEPS[sweep]
        for par in parametrizations:
            best = []
            for size in sizes:
                rows = [r for r in results if r["sweep"] == sweep and r["parametrization"] == par and r["size"] == size]
                if not rows:  # --report-only on an unfinished experiment
                    continue
                top = min(rows, key=lambda r: r["loss"])
                best.append(f"{axis} {size}: {top['lr']:g} ({top['loss']:.3f})")
            print(f"  {par:<9} " + " | ".join(best))
    from megatron_ext.plotting import pyplot

    plt = pyplot()
    if plt is None:
        print("(matplotlib not installed: no plot)")
        return
    panels = [(s, par) for s in opts.sweeps.split(",") for par in SWEEPS[s][2]]
    fig, axes = plt.subplots(1, len(panels), figsize=(4 * len(panels), 3.4), squeeze=False)
    for ax, (sweep, par) in zip(axes[0], panels):
        axis, sizes, _ = SWEEPS[sweep]
        for size in sizes:
            rows = sorted((r for r in results if r["sweep"] == sweep and r["parametrization"] == par
                           and r["size"] == size), key=lambda r: r["lr"])
            ax.plot([r["lr"] for r in rows], [r["loss"] for r in rows], marker="o", label=f"{axis} {size}")
        ax.set_xscale("log", base=2)
        ax.set_title(f"{par}: LR vs {axis}")
        ax.set_xlabel("LR")
        ax.set_ylabel("validation loss")
        finite = [r["loss"] for r in results if r["sweep"] == sweep and r["loss"] != float("inf")]
        ax.set_ylim(min(finite) - 0.05, min(max(finite), min(finite) + 1.5))
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(opts.out + ".png", dpi=110)
    print(f"wrote {opts.out}.png (the runs are in {opts.out}.jsonl)")


if __name__ == "__main__":
    main()
