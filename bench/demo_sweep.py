"""The demo, per seed: held-out exact match (overall and per task), training time, machine load.

    PYTHONPATH=. python bench/demo_sweep.py                    # the built-in demo, seeds 0 1 2
    PYTHONPATH=. python bench/demo_sweep.py --short --seeds 0   # the shortened run tests/test_demo.py runs
    PYTHONPATH=. python bench/demo_sweep.py --set n_layer=2 lr=3e-3 --threads 2

Each seed is `runs.run_finetune` on the demo's settings (DEMO_RUN: what a bare `microft finetune` runs),
with checkpoints in a temporary directory removed afterwards; `--set` overrides a DEMO_RUN setting or a
DEMO_MODEL field (n_layer, n_head, n_embd, n_positions) for design sweeps. Prints one line per seed and
a summary with the spread; `--json FILE` appends the rows. Records the CPU, torch threads and load.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time

import torch

import microft.data.demo as demo
from microft.config import RunConfig
from microft.models.config import ModelConfig
from microft.perf import cpu_model
from microft.runs import run_finetune

# tests/test_demo.py's shortened demo (keep the two in step)
SHORT = {"max_steps": 400, "train_size": 4000, "heldout_size": 60}


def run_one(seed: int, settings: dict, train_size: int, heldout_size: int) -> dict:
    """One demo run through `run_finetune`; per-task scores from its --predict output."""
    sizes = demo.DEMO_TRAIN_SIZE, demo.DEMO_HELDOUT_SIZE
    demo.DEMO_TRAIN_SIZE, demo.DEMO_HELDOUT_SIZE = train_size, heldout_size
    try:
        with tempfile.TemporaryDirectory(prefix="demo-sweep-") as tmp:
            cfg = RunConfig(**{**settings, "seed": seed, "out": f"{tmp}/run", "predict": True,
                               "log_format": "plain"})
            events: list[dict] = []
            load0 = os.getloadavg()[0]
            t0 = time.perf_counter()
            summary = run_finetune(cfg, events.append)
            wall = time.perf_counter() - t0
            with open(summary["predictions"]) as f:
                preds = [json.loads(line)["prediction"] for line in f]
    finally:
        demo.DEMO_TRAIN_SIZE, demo.DEMO_HELDOUT_SIZE = sizes
    scores = demo.exact_match_by_task(preds, demo.demo_heldout(heldout_size, seed))
    return {
        "seed": seed, "before": summary["demo_accuracy_before"], "after": summary["demo_accuracy_after"],
        "by_task": {k: v for k, v in scores.items() if k != "all"}, "train_s": summary["time_s"],
        "wall_s": wall, "steps": summary["steps"], "final_loss": summary["final_loss"],
        "load": (load0, os.getloadavg()[0]),
    }


def parse_value(v: str):
    for cast in (int, float):
        try:
            return cast(v)
        except ValueError:
            pass
    return {"true": True, "false": False}.get(v.lower(), v)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--short", action="store_true", help="the shortened run tests/test_demo.py runs")
    p.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                   help="override a DEMO_RUN setting or a DEMO_MODEL field")
    p.add_argument("--train-size", type=int, default=demo.DEMO_TRAIN_SIZE)
    p.add_argument("--heldout-size", type=int, default=demo.DEMO_HELDOUT_SIZE)
    p.add_argument("--threads", type=int,
                   help="torch threads (sets OMP_NUM_THREADS; default: the demo's one thread)")
    p.add_argument("--json", help="append the rows to this JSONL file")
    args = p.parse_args()
    settings = dict(demo.DEMO_RUN)
    if args.short:
        settings["max_steps"] = SHORT["max_steps"]
        args.train_size, args.heldout_size = SHORT["train_size"], SHORT["heldout_size"]
    for kv in args.set:
        k, v = kv.split("=", 1)
        if k in ModelConfig.model_fields:
            demo.DEMO_MODEL[k] = parse_value(v)
        else:
            settings[k] = parse_value(v)
    if args.threads:  # the demo keeps torch's thread count when OMP_NUM_THREADS is set
        os.environ["OMP_NUM_THREADS"] = str(args.threads)
        torch.set_num_threads(args.threads)
    print(f"cpu: {cpu_model()}, {os.cpu_count()} cores; settings {settings}; model {demo.DEMO_MODEL}",
          flush=True)
    rows = []
    for seed in args.seeds:
        r = run_one(seed, settings, args.train_size, args.heldout_size)
        r["threads"] = torch.get_num_threads()
        rows.append(r)
        tasks_s = " ".join(f"{k} {100 * v:.0f}" for k, v in sorted(r["by_task"].items()))
        print(f"seed {seed}: held-out exact match {100 * r['before']:.1f}% -> {100 * r['after']:.1f}% "
              f"[{tasks_s}]  train {r['train_s']:.1f}s, whole run {r['wall_s']:.1f}s, {r['threads']} torch "
              f"thread(s), final loss {r['final_loss']:.3f}, load {r['load'][0]:.2f}->{r['load'][1]:.2f}",
              flush=True)
        if args.json:
            with open(args.json, "a") as f:
                f.write(json.dumps({**r, "settings": settings, "model": demo.DEMO_MODEL,
                                    "cpu": cpu_model()}) + "\n")
    accs = [r["after"] for r in rows]
    print(f"summary: after {' '.join(f'{100 * a:.1f}%' for a in accs)}; min {100 * min(accs):.1f}%, "
          f"mean {100 * statistics.mean(accs):.1f}%, spread {100 * (max(accs) - min(accs)):.1f} pts; "
          f"train {statistics.mean(r['train_s'] for r in rows):.1f}s mean", flush=True)


if __name__ == "__main__":
    sys.exit(main())
