"""Gemma 3 1B against transformers: tokens/s and peak memory of a LoRA training step, same shape, precision.

    .venv/bin/python bench/gemma3.py                  # writes the `## Gemma 3 1B vs transformers` section
    .venv/bin/python bench/gemma3.py --no-write --rounds 1 --steps 1 --seq 32   # a quick check, printed only

The `gemma-3-1b` preset (the hub model's shape, 262k vocabulary, random init), LoRA rank 16 on every block
linear (microft's `--lora-targets all`; transformers + PEFT's `all-linear`), micro-batch 1 × a short
sequence so it finishes on a small CPU. Both sides run the same precision: bf16 autocast where the CPU has
native bf16, else fp32. Each configuration is a fresh subprocess (bench/steploop.py), so its peak RSS is
its own; the rounds alternate the two (transformers, microft, then microft, transformers, ...) so a host
whose speed drifts meets both alike. Full fine-tuning of 1B parameters (16 bytes each with AdamW in fp32)
does not fit the memory of the small machines this runs on, LoRA is how people tune it there.
"""

from __future__ import annotations

import argparse
import datetime

from docs_section import publish
from harness import DOC, command_line, gib, load_average, machine, median, model_label, run_config, table
from speed import cpu_description, native_bf16

HEADING = "## Gemma 3 1B vs transformers"
MODEL = "gemma-3-1b"


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--micro-bs", type=int, default=1)
    p.add_argument("--lora", type=int, default=16, metavar="R")
    p.add_argument("--rounds", type=int, default=2, help="processes per side, alternating")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--steps", type=int, default=3, help="timed steps per process")
    p.add_argument("--no-write", action="store_true",
                   help="print the section instead of writing docs/benchmarks.md")
    return p.parse_args(argv)


def measure(a, precision: str) -> dict[str, list[dict]]:
    """impl -> its runs' records, the order alternating round by round."""
    shape = ["--model", MODEL, "--precision", precision, "--lora", str(a.lora), "--micro-bs", str(a.micro_bs),
             "--seq", str(a.seq), "--warmup", str(a.warmup), "--steps", str(a.steps)]
    runs: dict[str, list[dict]] = {"hf": [], "microft": []}
    for r in range(a.rounds):
        for impl in ("hf", "microft") if r % 2 == 0 else ("microft", "hf"):
            rec = run_config(["--impl", impl, *shape], timeout=1800)
            runs[impl].append(rec)
            print(f"[gemma3] round {r + 1}/{a.rounds} {impl}: {rec['tokens_per_sec']:.2f} tokens/s, peak "
                  f"{gib(rec['peak_bytes'])}")
    return runs


def section(a, runs: dict[str, list[dict]], precision: str, started: str, load: tuple[str, str]) -> str:
    names = {"hf": "transformers + PEFT", "microft": "microft"}
    stats = {}
    for impl, recs in runs.items():
        times = [t for rec in recs for t in rec["step_times"]]
        stats[impl] = {"tps": a.micro_bs * a.seq / median(times), "peak": max(r["peak_bytes"] for r in recs),
                       "build": max(r["peak_build_bytes"] for r in recs), "steps": times,
                       "trainable": recs[0]["trainable_params"]}
    rows = [[names[i], f"{s['tps']:.2f}", " / ".join(f"{t:.1f}" for t in s["steps"]), gib(s["peak"]),
             gib(s["build"]), f"{s['trainable'] / 1e6:.1f}M"] for i, s in stats.items()]
    hf, mf = stats["hf"], stats["microft"]
    return "\n".join([
        f"Command: {command_line()} ({started}). {machine('cpu')}. {cpu_description()}. Load average "
        f"(1/5/15 min) before: {load[0]}, after: {load[1]}.",
        "",
        f"Shape: {model_label(MODEL)}, random init; LoRA rank {a.lora} (alpha {2 * a.lora}) on every block "
        f"linear, micro-batch {a.micro_bs} × seq {a.seq}; both sides `{precision}` (bf16 autocast on a CPU "
        f"with native bf16, else fp32), fused AdamW, clipping at 1.0. {a.rounds} fresh "
        f"process{'es' * (a.rounds != 1)} per side, alternating, each {a.warmup} warm-up "
        f"step{'s' * (a.warmup != 1)} then {a.steps} timed; tokens/s from "
        "the median of all timed steps of a side, peak RSS the largest of its processes.",
        "",
        table(["", "tokens/s", "step times (s)", "peak RSS", "peak RSS building the model", "trainable"],
              rows),
        "",
        f"- microft: **{mf['tps'] / hf['tps']:.2f}×** transformers' tokens/s; peak RSS "
        f"{gib(mf['peak'])} against {gib(hf['peak'])} ({mf['peak'] / hf['peak']:.2f}×).",
    ])


def main(argv: list[str] | None = None) -> dict[str, float]:
    a = parse(argv)
    started = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    precision = "bf16-mixed" if native_bf16("cpu") else "fp32"
    before = load_average()
    runs = measure(a, precision)
    body = section(a, runs, precision, started, (before, load_average()))
    publish(DOC, HEADING, body, not a.no_write, "gemma3")
    return {impl: median([t for r in recs for t in r["step_times"]]) for impl, recs in runs.items()}


if __name__ == "__main__":
    main()
